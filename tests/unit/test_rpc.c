/* test_rpc.c: client protocol framing (4-byte BE length + protobuf) and the
 * Request / Response codecs. */
#include "rpc.h"
#include "pbarena.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"

struct bytes {
    uint8_t *data;
    size_t len;
};

static void append(struct bytes *b, const void *data, size_t len)
{
    uint8_t *nb = realloc(b->data, b->len + len + 1);
    assert_non_null(nb);
    b->data = nb;
    if (len > 0)
        memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void append_frame(struct bytes *b, const uint8_t *payload, size_t len)
{
    uint8_t hdr[4] = {(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8),
                      (uint8_t)len};
    append(b, hdr, 4);
    append(b, payload, len);
}

/* A packed Request: an encrypt with |pt_len| bytes of plaintext. */
static struct bytes pack_encrypt(uint64_t id, const char *key_name, size_t pt_len)
{
    uint8_t *pt = malloc(pt_len + 1);
    assert_non_null(pt);
    for (size_t i = 0; i < pt_len; i++)
        pt[i] = (uint8_t)(i * 13 + id);
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.name = (char *)key_name;
    Keyraft__EncryptRequest enc = KEYRAFT__ENCRYPT_REQUEST__INIT;
    enc.key = &ref;
    enc.plaintext.data = pt;
    enc.plaintext.len = pt_len;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.id = id;
    req.request_id = "rid-0001";
    req.min_index = 77;
    req.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    req.encrypt = &enc;
    struct bytes out = {0};
    out.len = keyraft__request__get_packed_size(&req);
    out.data = malloc(out.len + 1);
    assert_non_null(out.data);
    keyraft__request__pack(&req, out.data);
    free(pt);
    return out;
}

static void assert_encrypt(const Keyraft__Request *req, uint64_t id, const char *key_name,
                           size_t pt_len)
{
    assert_int_equal(req->id, id);
    assert_string_equal(req->request_id, "rid-0001");
    assert_int_equal(req->min_index, 77);
    assert_int_equal(req->op_case, KEYRAFT__REQUEST__OP_ENCRYPT);
    assert_string_equal(req->encrypt->key->name, key_name);
    assert_int_equal(req->encrypt->plaintext.len, pt_len);
    for (size_t i = 0; i < pt_len; i++)
        assert_int_equal(req->encrypt->plaintext.data[i], (uint8_t)(i * 13 + id));
}

/* Three frames: a request, an empty (but valid) frame, a bigger request. */
static struct bytes three_frames(struct bytes *p1, struct bytes *p3)
{
    *p1 = pack_encrypt(1, "alpha", 40);
    *p3 = pack_encrypt(3, "gamma", 700);
    struct bytes s = {0};
    append_frame(&s, p1->data, p1->len);
    append_frame(&s, NULL, 0);
    append_frame(&s, p3->data, p3->len);
    return s;
}

struct seen {
    size_t n;
    struct bytes frames[8];
};

/* Pulls every whole frame out of |r|, copying the payloads. */
static void drain(struct rpc_reader *r, struct seen *seen)
{
    for (;;) {
        const uint8_t *p = NULL;
        size_t len = 0;
        int rv = rpc_reader_next(r, &p, &len);
        assert_true(rv == 0 || rv == 1);
        if (rv == 0)
            return;
        assert_true(seen->n < 8);
        struct bytes *b = &seen->frames[seen->n++];
        b->data = NULL;
        b->len = 0;
        append(b, p, len);
    }
}

static void seen_free(struct seen *seen)
{
    for (size_t i = 0; i < seen->n; i++)
        free(seen->frames[i].data);
    seen->n = 0;
}

static void check_three(struct seen *seen, const struct bytes *p1, const struct bytes *p3)
{
    assert_int_equal(seen->n, 3);
    assert_int_equal(seen->frames[0].len, p1->len);
    assert_memory_equal(seen->frames[0].data, p1->data, p1->len);
    assert_int_equal(seen->frames[1].len, 0);
    assert_int_equal(seen->frames[2].len, p3->len);
    assert_memory_equal(seen->frames[2].data, p3->data, p3->len);
}

static void test_frames_split_at_every_byte(void **state)
{
    (void)state;
    struct bytes p1, p3;
    struct bytes s = three_frames(&p1, &p3);
    for (size_t cut = 0; cut <= s.len; cut++) {
        struct rpc_reader r;
        rpc_reader_init(&r, KR_MAX_FRAME);
        struct seen seen = {0};
        assert_int_equal(rpc_reader_feed(&r, s.data, cut), 0);
        drain(&r, &seen);
        assert_int_equal(rpc_reader_feed(&r, s.data + cut, s.len - cut), 0);
        drain(&r, &seen);
        check_three(&seen, &p1, &p3);
        seen_free(&seen);
        rpc_reader_cleanup(&r);
    }
    /* And one byte at a time: a frame shows up exactly when its last byte does. */
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    struct seen seen = {0};
    size_t ends[3] = {4 + p1.len, 4 + p1.len + 4, s.len};
    for (size_t i = 0; i < s.len; i++) {
        assert_int_equal(rpc_reader_feed(&r, s.data + i, 1), 0);
        size_t before = seen.n;
        drain(&r, &seen);
        size_t want = 0;
        for (size_t k = 0; k < 3; k++)
            want += (i + 1 >= ends[k]);
        assert_int_equal(seen.n, want);
        assert_true(seen.n - before <= 1);
    }
    check_three(&seen, &p1, &p3);
    seen_free(&seen);
    rpc_reader_cleanup(&r);
    free(s.data);
    free(p1.data);
    free(p3.data);
}

static void test_several_frames_in_one_feed(void **state)
{
    (void)state;
    struct bytes p1, p3;
    struct bytes s = three_frames(&p1, &p3);
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    /* The stream twice over, plus a partial header. */
    struct bytes twice = {0};
    append(&twice, s.data, s.len);
    append(&twice, s.data, s.len);
    append(&twice, "\0\0", 2);
    assert_int_equal(rpc_reader_feed(&r, twice.data, twice.len), 0);
    struct seen seen = {0};
    drain(&r, &seen);
    assert_int_equal(seen.n, 6);
    for (size_t i = 0; i < 6; i += 3) {
        struct seen part = {.n = 3};
        memcpy(part.frames, &seen.frames[i], 3 * sizeof(part.frames[0]));
        check_three(&part, &p1, &p3);
    }
    seen_free(&seen);
    /* Each payload decodes to what was sent. */
    const uint8_t *p = NULL;
    size_t len = 0;
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    assert_int_equal(rpc_reader_feed(&r, s.data + 2, 2 + p1.len), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 1);
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    assert_int_equal(rpc_decode_request(p, len, &req, &arena), 0);
    assert_encrypt(req, 1, "alpha", 40);
    pb_arena_free(arena);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    rpc_reader_cleanup(&r);
    free(twice.data);
    free(s.data);
    free(p1.data);
    free(p3.data);
}

static void test_oversized_length_refused_before_body(void **state)
{
    (void)state;
    struct rpc_reader r;
    rpc_reader_init(&r, 1024);
    static const uint8_t too_big[4] = {0x00, 0x00, 0x04, 0x01}; /* 1025 */
    const uint8_t *p = NULL;
    size_t len = 0;
    assert_int_equal(rpc_reader_feed(&r, too_big, 3), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    assert_int_equal(rpc_reader_feed(&r, too_big + 3, 1), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), KR_ETOOBIG);
    /* The stream cannot be resynchronised: it stays refused. */
    assert_int_equal(rpc_reader_next(&r, &p, &len), KR_ETOOBIG);
    rpc_reader_cleanup(&r);

    /* Exactly max_frame is fine: the reader waits for the body. */
    rpc_reader_init(&r, 1024);
    static const uint8_t at_cap[4] = {0x00, 0x00, 0x04, 0x00};
    assert_int_equal(rpc_reader_feed(&r, at_cap, 4), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    uint8_t body[1024];
    memset(body, 0, sizeof(body));
    assert_int_equal(rpc_reader_feed(&r, body, sizeof(body)), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 1);
    assert_int_equal(len, 1024);
    rpc_reader_cleanup(&r);

    /* A 4 GiB announcement with the protocol's own cap. */
    rpc_reader_init(&r, KR_MAX_FRAME);
    static const uint8_t huge[4] = {0xff, 0xff, 0xff, 0xff};
    assert_int_equal(rpc_reader_feed(&r, huge, 4), 0);
    assert_int_equal(rpc_reader_next(&r, &p, &len), KR_ETOOBIG);
    rpc_reader_cleanup(&r);
}

/* With the largest possible cap, an announced 4 GiB - 1 frame must wait for
 * its body: the length check may not wrap around. */
static void test_max_cap_length_does_not_wrap(void **state)
{
    (void)state;
    struct rpc_reader r;
    rpc_reader_init(&r, UINT32_MAX);
    static const uint8_t hdr[12] = {0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8};
    assert_int_equal(rpc_reader_feed(&r, hdr, sizeof(hdr)), 0);
    const uint8_t *p = NULL;
    size_t len = 0;
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    rpc_reader_cleanup(&r);
}

static void test_zero_length_frame_is_an_empty_request(void **state)
{
    (void)state;
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    static const uint8_t zero[4] = {0, 0, 0, 0};
    assert_int_equal(rpc_reader_feed(&r, zero, 4), 0);
    const uint8_t *p = NULL;
    size_t len = 99;
    assert_int_equal(rpc_reader_next(&r, &p, &len), 1);
    assert_int_equal(len, 0);
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    assert_int_equal(rpc_decode_request(p, len, &req, &arena), 0);
    assert_non_null(req);
    assert_non_null(arena);
    assert_int_equal(req->id, 0);
    assert_int_equal(req->op_case, KEYRAFT__REQUEST__OP__NOT_SET);
    assert_string_equal(req->request_id, "");
    pb_arena_free(arena);
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    rpc_reader_cleanup(&r);
}

static void test_decode_garbage(void **state)
{
    (void)state;
    static const struct {
        const char *bytes;
        size_t len;
    } cases[] = {
        {"\xff\xff\xff\xff", 4},                 /* unterminated varint tag */
        {"\x52\x10\x0a", 3},                     /* create: length past the end */
        {"\x08", 1},                             /* id: missing value */
        {"\x12\x03" "ab", 4},                    /* request_id cut short */
        {"\x0f\x00", 2},                         /* wire type 7 */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        Keyraft__Request *req = NULL;
        struct pb_arena *arena = NULL;
        assert_int_equal(
            rpc_decode_request((const uint8_t *)cases[i].bytes, cases[i].len, &req, &arena),
            KR_EPROTO);
        assert_null(req);
        assert_null(arena);
    }
    /* Every strict prefix of a real request that cuts a field is refused. */
    struct bytes p = pack_encrypt(9, "beta", 32);
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    assert_int_equal(rpc_decode_request(p.data, p.len - 1, &req, &arena), KR_EPROTO);
    assert_null(req);
    assert_null(arena);
    assert_int_equal(rpc_decode_request(p.data, p.len, &req, &arena), 0);
    assert_encrypt(req, 9, "beta", 32);
    pb_arena_free(arena);
    pb_arena_free(NULL);
    rpc_request_free(NULL);
    free(p.data);
}

/* A batch with fields of every size decodes into its arena whole: many
 * small allocations carved from shared blocks, blocks that grow, and fields
 * too large to share one. Each inner request is checked, then the whole
 * request packs back to the bytes that were sent (overlapping carvings or a
 * short block would change them; under ASan a field's overrun is caught). */
static void test_decode_large_batch_into_arena(void **state)
{
    (void)state;
    enum { N = 300 };
    static const size_t big = 700u * 1024u; /* over half the largest block */
    uint8_t *pt = malloc(big);
    assert_non_null(pt);
    for (size_t i = 0; i < big; i++)
        pt[i] = (uint8_t)(i * 7 + 3);
    Keyraft__KeyRef refs[N];
    Keyraft__EncryptRequest encs[N];
    Keyraft__Request subs[N], *sub_ptrs[N];
    char names[N][24];
    for (size_t i = 0; i < N; i++) {
        snprintf(names[i], sizeof(names[i]), "key-%zu", i);
        keyraft__key_ref__init(&refs[i]);
        refs[i].name = names[i];
        keyraft__encrypt_request__init(&encs[i]);
        encs[i].key = &refs[i];
        encs[i].plaintext.data = pt + i;
        /* 0 bytes, a few, a block's worth, and one far past it */
        encs[i].plaintext.len = i == N - 1 ? big - N : (i % 5 == 0 ? 0 : (i * 37) % 3000);
        keyraft__request__init(&subs[i]);
        subs[i].id = i + 1;
        subs[i].request_id = names[i];
        subs[i].op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
        subs[i].encrypt = &encs[i];
        sub_ptrs[i] = &subs[i];
    }
    Keyraft__BatchRequest batch = KEYRAFT__BATCH_REQUEST__INIT;
    batch.n_requests = N;
    batch.requests = sub_ptrs;
    Keyraft__Request outer = KEYRAFT__REQUEST__INIT;
    outer.id = 4242;
    outer.request_id = "batch-0001";
    outer.op_case = KEYRAFT__REQUEST__OP_BATCH;
    outer.batch = &batch;
    size_t len = keyraft__request__get_packed_size(&outer);
    uint8_t *wire = malloc(len);
    assert_non_null(wire);
    keyraft__request__pack(&outer, wire);

    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    assert_int_equal(rpc_decode_request(wire, len, &req, &arena), 0);
    assert_int_equal(req->id, 4242);
    assert_int_equal(req->op_case, KEYRAFT__REQUEST__OP_BATCH);
    assert_int_equal(req->batch->n_requests, N);
    for (size_t i = 0; i < N; i++) {
        const Keyraft__Request *r = req->batch->requests[i];
        assert_int_equal(r->id, i + 1);
        assert_string_equal(r->request_id, names[i]);
        assert_string_equal(r->encrypt->key->name, names[i]);
        assert_int_equal(r->encrypt->plaintext.len, encs[i].plaintext.len);
        if (encs[i].plaintext.len > 0)
            assert_memory_equal(r->encrypt->plaintext.data, pt + i, encs[i].plaintext.len);
    }
    uint8_t *again = malloc(len);
    assert_non_null(again);
    assert_int_equal(keyraft__request__get_packed_size(req), len);
    keyraft__request__pack(req, again);
    assert_memory_equal(again, wire, len);
    pb_arena_free(arena);
    free(again);
    free(wire);
    free(pt);
}

static size_t put_varint(uint8_t *p, size_t v)
{
    size_t n = 0;
    for (; v >= 0x80; v >>= 7)
        p[n++] = (uint8_t)(0x80 | (v & 0x7f));
    p[n++] = (uint8_t)v;
    return n;
}

/* A Request whose batch holds |n| empty requests (2 bytes each on the wire,
 * ~100 bytes each decoded), into |wire|; returns its length. */
static size_t batch_of_empty_requests(uint8_t *wire, size_t n)
{
    Keyraft__BatchRequest br = KEYRAFT__BATCH_REQUEST__INIT;
    Keyraft__Request outer = KEYRAFT__REQUEST__INIT;
    outer.op_case = KEYRAFT__REQUEST__OP_BATCH;
    outer.batch = &br;
    uint8_t head[8];
    size_t head_len = keyraft__request__pack(&outer, head); /* batch's tag, length 0 */
    assert_true(head_len >= 2 && head_len <= sizeof(head));
    size_t off = head_len - 1;
    memcpy(wire, head, off);
    off += put_varint(wire + off, 2 * n);
    for (size_t i = 0; i < n; i++) {
        wire[off++] = 0x0a; /* BatchRequest.requests (field 1), length 0 */
        wire[off++] = 0x00;
    }
    return off;
}

/* A frame-sized batch of empty requests would decode to ~200 MB: refused
 * with KR_ETOOBIG once it passes the limit (68 MB here). 100 of them, a small
 * batch, decode. */
static void test_decode_refuses_expansion(void **state)
{
    (void)state;
    size_t n = (KR_MAX_FRAME - 16) / 2;
    uint8_t *wire = malloc(KR_MAX_FRAME);
    assert_non_null(wire);
    size_t len = batch_of_empty_requests(wire, n);
    assert_true(len <= KR_MAX_FRAME);
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    assert_int_equal(rpc_decode_request(wire, len, &req, &arena), KR_ETOOBIG);
    assert_null(req);
    assert_null(arena);
    len = batch_of_empty_requests(wire, 100);
    assert_int_equal(rpc_decode_request(wire, len, &req, &arena), 0);
    assert_int_equal(req->op_case, KEYRAFT__REQUEST__OP_BATCH);
    assert_int_equal(req->batch->n_requests, 100);
    pb_arena_free(arena);
    free(wire);
}

static void test_encode_response_prefix(void **state)
{
    (void)state;
    /* Big enough that all four prefix bytes but the first matter. */
    size_t ct_len = 70000 + 3;
    uint8_t *ct = malloc(ct_len);
    assert_non_null(ct);
    for (size_t i = 0; i < ct_len; i++)
        ct[i] = (uint8_t)(i * 7);
    Keyraft__EncryptResponse enc = KEYRAFT__ENCRYPT_RESPONSE__INIT;
    enc.ciphertext.data = ct;
    enc.ciphertext.len = ct_len;
    enc.key_id = "0001aabbccddeeff00112233445566ff";
    enc.version = 4;
    Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
    resp.id = 0x1122334455ull;
    resp.status = KR_ESTATE;
    resp.message = "the key's state forbids it";
    resp.commit_index = 321;
    resp.result_case = KEYRAFT__RESPONSE__RESULT_ENCRYPT;
    resp.encrypt = &enc;

    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(rpc_encode_response(&resp, &buf, &len), 0);
    size_t body = keyraft__response__get_packed_size(&resp);
    assert_int_equal(len, 4 + body);
    assert_true(body > 65536);
    assert_int_equal(buf[0], (body >> 24) & 0xff);
    assert_int_equal(buf[1], (body >> 16) & 0xff);
    assert_int_equal(buf[2], (body >> 8) & 0xff);
    assert_int_equal(buf[3], body & 0xff);
    assert_int_equal(buf[1], 0x01);

    /* What a client reads back through the same framing. */
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    assert_int_equal(rpc_reader_feed(&r, buf, len), 0);
    const uint8_t *p = NULL;
    size_t plen = 0;
    assert_int_equal(rpc_reader_next(&r, &p, &plen), 1);
    Keyraft__Response *got = keyraft__response__unpack(NULL, plen, p);
    assert_non_null(got);
    assert_int_equal(got->id, 0x1122334455ull);
    assert_int_equal(got->status, KR_ESTATE);
    assert_string_equal(got->message, "the key's state forbids it");
    assert_int_equal(got->commit_index, 321);
    assert_int_equal(got->result_case, KEYRAFT__RESPONSE__RESULT_ENCRYPT);
    assert_int_equal(got->encrypt->version, 4);
    assert_int_equal(got->encrypt->ciphertext.len, ct_len);
    assert_memory_equal(got->encrypt->ciphertext.data, ct, ct_len);
    keyraft__response__free_unpacked(got, NULL);
    rpc_reader_cleanup(&r);
    free(buf);

    /* An empty response is a bare zero prefix. */
    Keyraft__Response empty = KEYRAFT__RESPONSE__INIT;
    assert_int_equal(rpc_encode_response(&empty, &buf, &len), 0);
    assert_int_equal(len, 4);
    assert_memory_equal(buf, "\0\0\0\0", 4);
    free(buf);
    free(ct);
}

/* A long-lived connection must not grow its buffer with the bytes it has
 * already consumed. */
static void test_reader_memory_stays_bounded(void **state)
{
    (void)state;
    struct bytes p = pack_encrypt(5, "k", 300);
    struct bytes frame = {0};
    append_frame(&frame, p.data, p.len);
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    size_t max_cap = 0;
    for (int i = 0; i < 2000; i++) {
        /* Frames arrive straddling feeds: half now, half with the next one. */
        size_t half = frame.len / 2;
        assert_int_equal(rpc_reader_feed(&r, frame.data, half), 0);
        const uint8_t *pl = NULL;
        size_t len = 0;
        while (rpc_reader_next(&r, &pl, &len) == 1)
            assert_int_equal(len, p.len);
        assert_int_equal(rpc_reader_feed(&r, frame.data + half, frame.len - half), 0);
        assert_int_equal(rpc_reader_next(&r, &pl, &len), 1);
        assert_memory_equal(pl, p.data, p.len);
        if (r.cap > max_cap)
            max_cap = r.cap;
    }
    assert_true(max_cap <= 4096);
    rpc_reader_cleanup(&r);
    assert_null(r.buf);
    /* Cleanup leaves a reader that can be cleaned up again. */
    rpc_reader_cleanup(&r);
    free(frame.data);
    free(p.data);
}

static void test_feed_nothing(void **state)
{
    (void)state;
    struct rpc_reader r;
    rpc_reader_init(&r, KR_MAX_FRAME);
    static const uint8_t none[1] = {0};
    assert_int_equal(rpc_reader_feed(&r, none, 0), 0);
    const uint8_t *p = NULL;
    size_t len = 0;
    assert_int_equal(rpc_reader_next(&r, &p, &len), 0);
    rpc_reader_cleanup(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frames_split_at_every_byte),
        cmocka_unit_test(test_several_frames_in_one_feed),
        cmocka_unit_test(test_oversized_length_refused_before_body),
        cmocka_unit_test(test_max_cap_length_does_not_wrap),
        cmocka_unit_test(test_zero_length_frame_is_an_empty_request),
        cmocka_unit_test(test_decode_garbage),
        cmocka_unit_test(test_decode_large_batch_into_arena),
        cmocka_unit_test(test_decode_refuses_expansion),
        cmocka_unit_test(test_encode_response_prefix),
        cmocka_unit_test(test_reader_memory_stays_bounded),
        cmocka_unit_test(test_feed_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
