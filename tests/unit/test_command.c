/* test_command.c: the CommandBatch codec that carries every write through raft. */
#include "command.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "pbarena.h"

#define KEY_ID "0001aabbccddeeff00112233445566ff"

/* One command of every op type, with distinct values in every field the FSM
 * reads, so a codec that drops or swaps a field shows up. */
struct sample {
    Keyraft__Command cmds[5];
    Keyraft__Command *ptrs[5];
    Keyraft__PutKeyCommand put_key;
    Keyraft__KeyRecord rec;
    Keyraft__KeyVersionRecord ver1;
    Keyraft__KeyVersionRecord *vers[1];
    Keyraft__Tag tag;
    Keyraft__Tag *tags[1];
    Keyraft__SetStateCommand set_state;
    Keyraft__AddVersionCommand add_version;
    Keyraft__KeyVersionRecord ver2;
    Keyraft__DestroyKeyCommand destroy;
    Keyraft__PutDomainCommand put_domain;
    Keyraft__DomainRecord domain;
    uint8_t sealed1[40];
    uint8_t sealed2[48];
    uint8_t wrapped[60];
};

static void sample_init(struct sample *s)
{
    memset(s, 0, sizeof(*s));
    for (size_t i = 0; i < sizeof(s->sealed1); i++)
        s->sealed1[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < sizeof(s->sealed2); i++)
        s->sealed2[i] = (uint8_t)(255 - i);
    for (size_t i = 0; i < sizeof(s->wrapped); i++)
        s->wrapped[i] = (uint8_t)(i ^ 0x5a);

    keyraft__key_version_record__init(&s->ver1);
    s->ver1.version = 1;
    s->ver1.created_at = 1700000000001ull;
    s->ver1.sealed.data = s->sealed1;
    s->ver1.sealed.len = sizeof(s->sealed1);
    s->ver1.kcv = "a1b2c3";
    s->vers[0] = &s->ver1;
    keyraft__tag__init(&s->tag);
    s->tag.key = "team";
    s->tag.value = "payments";
    s->tags[0] = &s->tag;
    keyraft__key_record__init(&s->rec);
    s->rec.id = KEY_ID;
    s->rec.name = "orders-key";
    s->rec.domain = "default";
    s->rec.algorithm = KEYRAFT__ALGORITHM__AES_256;
    s->rec.state = KEYRAFT__KEY_STATE__PRE_ACTIVE;
    s->rec.current_version = 1;
    s->rec.n_versions = 1;
    s->rec.versions = s->vers;
    s->rec.created_at = 1700000000000ull;
    s->rec.n_tags = 1;
    s->rec.tags = s->tags;
    s->rec.exportable = 1;
    keyraft__put_key_command__init(&s->put_key);
    s->put_key.key = &s->rec;

    keyraft__set_state_command__init(&s->set_state);
    s->set_state.key_id = KEY_ID;
    s->set_state.state = KEYRAFT__KEY_STATE__COMPROMISED;
    s->set_state.at = 1700000000123ull;
    s->set_state.reason = KEYRAFT__REVOKE_REASON__KEY_COMPROMISE;
    s->set_state.message = "laptop stolen";

    keyraft__key_version_record__init(&s->ver2);
    s->ver2.version = 2;
    s->ver2.created_at = 1700000000500ull;
    s->ver2.sealed.data = s->sealed2;
    s->ver2.sealed.len = sizeof(s->sealed2);
    keyraft__add_version_command__init(&s->add_version);
    s->add_version.key_id = KEY_ID;
    s->add_version.version = &s->ver2;

    keyraft__destroy_key_command__init(&s->destroy);
    s->destroy.key_id = KEY_ID;
    s->destroy.at = 1700000000999ull;

    keyraft__domain_record__init(&s->domain);
    s->domain.id = "tenant-7";
    s->domain.wrapped_key.data = s->wrapped;
    s->domain.wrapped_key.len = sizeof(s->wrapped);
    s->domain.created_at = 1690000000000ull;
    s->domain.mwk_label = "keyraft-mwk";
    keyraft__put_domain_command__init(&s->put_domain);
    s->put_domain.domain = &s->domain;

    static const char *const req_ids[5] = {"req-put", "", "req-add", "req-destroy", "req-dom"};
    for (int i = 0; i < 5; i++) {
        keyraft__command__init(&s->cmds[i]);
        s->cmds[i].request_id = (char *)req_ids[i];
        s->ptrs[i] = &s->cmds[i];
    }
    s->cmds[0].op_case = KEYRAFT__COMMAND__OP_PUT_KEY;
    s->cmds[0].put_key = &s->put_key;
    s->cmds[1].op_case = KEYRAFT__COMMAND__OP_SET_STATE;
    s->cmds[1].set_state = &s->set_state;
    s->cmds[2].op_case = KEYRAFT__COMMAND__OP_ADD_VERSION;
    s->cmds[2].add_version = &s->add_version;
    s->cmds[3].op_case = KEYRAFT__COMMAND__OP_DESTROY_KEY;
    s->cmds[3].destroy_key = &s->destroy;
    s->cmds[4].op_case = KEYRAFT__COMMAND__OP_PUT_DOMAIN;
    s->cmds[4].put_domain = &s->put_domain;
}

static void assert_bytes(ProtobufCBinaryData got, const uint8_t *want, size_t want_len)
{
    assert_int_equal(got.len, want_len);
    assert_memory_equal(got.data, want, want_len);
}

static void test_round_trip_all_ops(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode(s.ptrs, 5, malloc, &buf, &len), 0);
    assert_non_null(buf);
    /* raft_uv reads segments in 8-byte units. */
    assert_int_equal(len % 8, 0);
    assert_memory_equal(buf, "KRC1", 4);

    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode(buf, len, &b), 0);
    assert_non_null(b);
    assert_int_equal(b->n_commands, 5);

    const Keyraft__Command *c = b->commands[0];
    assert_int_equal(c->op_case, KEYRAFT__COMMAND__OP_PUT_KEY);
    assert_string_equal(c->request_id, "req-put");
    const Keyraft__KeyRecord *r = c->put_key->key;
    assert_non_null(r);
    assert_string_equal(r->id, KEY_ID);
    assert_string_equal(r->name, "orders-key");
    assert_string_equal(r->domain, "default");
    assert_int_equal(r->algorithm, KEYRAFT__ALGORITHM__AES_256);
    assert_int_equal(r->state, KEYRAFT__KEY_STATE__PRE_ACTIVE);
    assert_int_equal(r->current_version, 1);
    assert_int_equal(r->created_at, 1700000000000ull);
    assert_true(r->exportable);
    assert_int_equal(r->n_versions, 1);
    assert_int_equal(r->versions[0]->version, 1);
    assert_int_equal(r->versions[0]->created_at, 1700000000001ull);
    assert_string_equal(r->versions[0]->kcv, "a1b2c3");
    assert_bytes(r->versions[0]->sealed, s.sealed1, sizeof(s.sealed1));
    assert_int_equal(r->n_tags, 1);
    assert_string_equal(r->tags[0]->key, "team");
    assert_string_equal(r->tags[0]->value, "payments");

    c = b->commands[1];
    assert_int_equal(c->op_case, KEYRAFT__COMMAND__OP_SET_STATE);
    assert_string_equal(c->request_id, "");
    assert_string_equal(c->set_state->key_id, KEY_ID);
    assert_int_equal(c->set_state->state, KEYRAFT__KEY_STATE__COMPROMISED);
    assert_int_equal(c->set_state->at, 1700000000123ull);
    assert_int_equal(c->set_state->reason, KEYRAFT__REVOKE_REASON__KEY_COMPROMISE);
    assert_string_equal(c->set_state->message, "laptop stolen");

    c = b->commands[2];
    assert_int_equal(c->op_case, KEYRAFT__COMMAND__OP_ADD_VERSION);
    assert_string_equal(c->request_id, "req-add");
    assert_string_equal(c->add_version->key_id, KEY_ID);
    assert_int_equal(c->add_version->version->version, 2);
    assert_int_equal(c->add_version->version->created_at, 1700000000500ull);
    assert_bytes(c->add_version->version->sealed, s.sealed2, sizeof(s.sealed2));

    c = b->commands[3];
    assert_int_equal(c->op_case, KEYRAFT__COMMAND__OP_DESTROY_KEY);
    assert_string_equal(c->request_id, "req-destroy");
    assert_string_equal(c->destroy_key->key_id, KEY_ID);
    assert_int_equal(c->destroy_key->at, 1700000000999ull);

    c = b->commands[4];
    assert_int_equal(c->op_case, KEYRAFT__COMMAND__OP_PUT_DOMAIN);
    assert_string_equal(c->request_id, "req-dom");
    assert_string_equal(c->put_domain->domain->id, "tenant-7");
    assert_string_equal(c->put_domain->domain->mwk_label, "keyraft-mwk");
    assert_int_equal(c->put_domain->domain->created_at, 1690000000000ull);
    assert_bytes(c->put_domain->domain->wrapped_key, s.wrapped, sizeof(s.wrapped));

    /* Encoding the decoded batch gives the same bytes: followers and the
     * leader agree on what an entry says. */
    uint8_t *again = NULL;
    size_t again_len = 0;
    assert_int_equal(command_batch_encode(b->commands, b->n_commands, malloc, &again, &again_len),
                     0);
    assert_int_equal(again_len, len);
    assert_memory_equal(again, buf, len);

    free(again);
    command_batch_free(b);
    free(buf);
}

static size_t varint_size(size_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* The batcher in cluster.c sizes entries with command_size and
 * command_packed_cost: they must add up to the encoded payload (one tag byte
 * and a length varint per command). */
static void test_command_size_adds_up(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    size_t want = 0;
    for (int i = 0; i < 5; i++) {
        size_t n = command_size(s.ptrs[i]);
        assert_true(n > 0);
        want += 1 + varint_size(n) + n;
        assert_int_equal(command_packed_cost(n), 1 + varint_size(n) + n);
    }
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode(s.ptrs, 5, malloc, &buf, &len), 0);
    const uint8_t *payload = NULL;
    size_t payload_len = 0;
    assert_int_equal(command_entry_payload(buf, len, &payload, &payload_len), 0);
    assert_int_equal(payload_len, want);
    assert_ptr_equal(payload, buf + COMMAND_ENTRY_HEADER);
    assert_int_equal(len, command_entry_size(want));
    free(buf);
}

/* cluster.c builds entries from commands it packed when they were proposed
 * (command_entry_writer): the bytes must be protobuf-c's own for the same
 * batch, clock included, or followers would read another entry. */
static void test_writer_matches_protobuf(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    uint8_t *packed[5];
    size_t packed_len[5];
    for (int i = 0; i < 5; i++) {
        packed_len[i] = command_size(s.ptrs[i]);
        packed[i] = malloc(packed_len[i]);
        assert_non_null(packed[i]);
        assert_int_equal(keyraft__command__pack(s.ptrs[i], packed[i]), packed_len[i]);
    }
    const uint64_t clocks[] = {0, 1, 127, 128, 1700000000123ull, UINT64_MAX};
    for (size_t c = 0; c < sizeof(clocks) / sizeof(clocks[0]); c++) {
        for (size_t n = 1; n <= 5; n += 4) {
            size_t cost = 0;
            for (size_t i = 0; i < n; i++)
                cost += command_packed_cost(packed_len[i]);
            size_t len = command_entry_len(cost, clocks[c]);
            uint8_t *buf = malloc(len);
            assert_non_null(buf);
            struct command_entry_writer w;
            command_entry_begin(&w, buf, cost, clocks[c]);
            for (size_t i = 0; i < n; i++)
                command_entry_add(&w, packed[i], packed_len[i]);
            command_entry_end(&w);

            uint8_t *want = NULL;
            size_t want_len = 0;
            assert_int_equal(command_batch_encode_at(s.ptrs, n, clocks[c], malloc, &want,
                                                     &want_len),
                             0);
            assert_int_equal(len, want_len);
            assert_memory_equal(buf, want, len);
            Keyraft__CommandBatch *b = NULL;
            assert_int_equal(command_entry_decode(buf, len, &b), 0);
            assert_int_equal(b->n_commands, n);
            assert_true(b->time_ms == clocks[c]);
            assert_string_equal(b->commands[n - 1]->request_id, s.ptrs[n - 1]->request_id);
            command_batch_free(b);
            free(want);
            free(buf);
        }
    }
    for (int i = 0; i < 5; i++)
        free(packed[i]);
}

static void test_entry_framing(void **state)
{
    (void)state;
    /* Header plus payload, rounded up to 8. */
    static const size_t sizes[][2] = {{0, 8},   {1, 16},  {7, 16},  {8, 16},
                                      {9, 24},  {15, 24}, {16, 24}, {1000, 1008}};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        assert_int_equal(command_entry_size(sizes[i][0]), sizes[i][1]);

    uint8_t buf[32];
    memset(buf, 0xaa, sizeof(buf));
    memcpy(buf + COMMAND_ENTRY_HEADER, "payload-13b", 11);
    buf[COMMAND_ENTRY_HEADER + 11] = 0xbb;
    buf[COMMAND_ENTRY_HEADER + 12] = 0xcc;
    command_entry_frame(buf, 13);
    static const uint8_t hdr[8] = {'K', 'R', 'C', '1', 0, 0, 0, 13};
    assert_memory_equal(buf, hdr, 8);
    assert_memory_equal(buf + 8, "payload-13b\xbb\xcc", 13);
    for (size_t i = 8 + 13; i < 24; i++)
        assert_int_equal(buf[i], 0);
    assert_int_equal(buf[24], 0xaa); /* nothing written past the entry */

    const uint8_t *p = NULL;
    size_t n = 0;
    assert_int_equal(command_entry_payload(buf, 24, &p, &n), 0);
    assert_ptr_equal(p, buf + 8);
    assert_int_equal(n, 13);

    const uint8_t *const sentinel = (const uint8_t *)"x";
    p = sentinel;
    n = 77;
    assert_int_equal(command_entry_payload(buf, 7, &p, &n), KR_EPROTO);   /* short header */
    assert_int_equal(command_entry_payload(buf, 23, &p, &n), KR_EPROTO);  /* cut */
    assert_int_equal(command_entry_payload(buf, 32, &p, &n), KR_EPROTO);  /* trailing block */
    assert_int_equal(command_entry_payload(buf, 16, &p, &n), KR_EPROTO);  /* length > data */
    buf[0] = 'X';
    assert_int_equal(command_entry_payload(buf, 24, &p, &n), KR_EPROTO);  /* magic */
    buf[0] = 'K';
    buf[4] = 0x80; /* 2 GiB announced in a 24-byte entry */
    assert_int_equal(command_entry_payload(buf, 24, &p, &n), KR_EPROTO);
    buf[4] = 0;
    buf[7] = 17; /* fits the 8-byte rounding of 24 only as 16 */
    assert_int_equal(command_entry_payload(buf, 24, &p, &n), KR_EPROTO);
    assert_ptr_equal(p, sentinel);
    assert_int_equal(n, 77);

    /* An unframed CommandBatch (the pre-framing format) is refused. */
    struct sample s;
    sample_init(&s);
    Keyraft__CommandBatch batch = KEYRAFT__COMMAND_BATCH__INIT;
    batch.n_commands = 1;
    batch.commands = &s.ptrs[3];
    uint8_t raw[128];
    size_t raw_len = keyraft__command_batch__pack(&batch, raw);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode(raw, raw_len, &b), KR_EPROTO);
    assert_null(b);
    assert_int_equal(command_batch_decode(raw, raw_len, &b), 0);
    assert_int_equal(b->commands[0]->op_case, KEYRAFT__COMMAND__OP_DESTROY_KEY);
    command_batch_free(b);
}

static int alloc_calls;
static void *counting_alloc(size_t n)
{
    alloc_calls++;
    return malloc(n);
}
static void *failing_alloc(size_t n)
{
    (void)n;
    alloc_calls++;
    return NULL;
}

static void test_encode_rejects_bad_counts_and_alloc_failure(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    uint8_t *buf = (uint8_t *)&s; /* sentinel: must stay untouched on failure */
    size_t len = 77;

    alloc_calls = 0;
    assert_int_equal(command_batch_encode(s.ptrs, 0, counting_alloc, &buf, &len), KR_EINVAL);
    Keyraft__Command **many = calloc(COMMAND_BATCH_MAX_OPS + 1, sizeof(*many));
    assert_non_null(many);
    for (size_t i = 0; i <= COMMAND_BATCH_MAX_OPS; i++)
        many[i] = &s.cmds[1];
    assert_int_equal(
        command_batch_encode(many, COMMAND_BATCH_MAX_OPS + 1, counting_alloc, &buf, &len),
        KR_EINVAL);
    assert_int_equal(alloc_calls, 0);
    assert_ptr_equal(buf, (uint8_t *)&s);
    assert_int_equal(len, 77);

    assert_int_equal(command_batch_encode(s.ptrs, 5, failing_alloc, &buf, &len), KR_ENOMEM);
    assert_int_equal(alloc_calls, 1);
    assert_ptr_equal(buf, (uint8_t *)&s);

    /* The full batch is fine, and its buffer comes from the given allocator
     * (raft frees entries with raft_free). */
    assert_int_equal(command_batch_encode(many, COMMAND_BATCH_MAX_OPS, counting_alloc, &buf, &len),
                     0);
    assert_int_equal(alloc_calls, 2);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode(buf, len, &b), 0);
    assert_int_equal(b->n_commands, COMMAND_BATCH_MAX_OPS);
    command_batch_free(b);
    free(buf);
    free(many);
}

static void test_decode_rejects_empty_batch(void **state)
{
    (void)state;
    Keyraft__CommandBatch *b = (Keyraft__CommandBatch *)&b; /* sentinel */
    Keyraft__CommandBatch *const sentinel = b;
    /* An empty buffer is a valid protobuf: a batch without commands. */
    assert_int_equal(command_batch_decode((const uint8_t *)"", 0, &b), KR_EPROTO);
    assert_ptr_equal(b, sentinel);

    Keyraft__CommandBatch empty = KEYRAFT__COMMAND_BATCH__INIT;
    uint8_t buf[8];
    size_t len = keyraft__command_batch__pack(&empty, buf);
    assert_int_equal(command_batch_decode(buf, len, &b), KR_EPROTO);
    assert_ptr_equal(b, sentinel);

    /* The same, framed as a raft entry. */
    uint8_t entry[8];
    command_entry_frame(entry, 0);
    assert_int_equal(command_entry_decode(entry, sizeof(entry), &b), KR_EPROTO);
    assert_ptr_equal(b, sentinel);
}

static void test_decode_rejects_garbage(void **state)
{
    (void)state;
    static const struct {
        const char *bytes;
        size_t len;
    } cases[] = {
        {"\xff\xff\xff\xff", 4},             /* field 0 / bad wire type */
        {"\x0a\x05\x0a\x01", 4},             /* length runs past the end */
        {"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", 12}, /* varint too long */
        {"\x08\x01", 2},                     /* commands as a varint: wrong wire type */
        {"hello, world", 12},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        Keyraft__CommandBatch *b = NULL;
        assert_int_equal(command_batch_decode((const uint8_t *)cases[i].bytes, cases[i].len, &b),
                         KR_EPROTO);
        assert_null(b);
    }

    /* Every truncation of a valid entry is refused, never half-applied. */
    struct sample s;
    sample_init(&s);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode(s.ptrs, 5, malloc, &buf, &len), 0);
    const uint8_t *payload = NULL;
    size_t payload_len = 0;
    assert_int_equal(command_entry_payload(buf, len, &payload, &payload_len), 0);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_batch_decode(payload, payload_len - 1, &b), KR_EPROTO);
    assert_int_equal(command_batch_decode(payload, payload_len / 2, &b), KR_EPROTO);
    assert_null(b);
    /* A framed entry whose payload is garbage. */
    uint8_t entry[16];
    memcpy(entry + COMMAND_ENTRY_HEADER, "\xff\xff\xff\xff", 4);
    command_entry_frame(entry, 4);
    assert_int_equal(command_entry_decode(entry, sizeof(entry), &b), KR_EPROTO);
    assert_null(b);
    free(buf);
}

static void test_decode_rejects_opless_command(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    Keyraft__Command bare = KEYRAFT__COMMAND__INIT;
    bare.request_id = "only-an-id";
    Keyraft__Command *cmds[3] = {&s.cmds[0], &bare, &s.cmds[1]};
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode(cmds, 3, malloc, &buf, &len), 0);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode(buf, len, &b), KR_EPROTO);
    assert_null(b);
    free(buf);

    /* An op this build does not know (field 30) reads as no op at all. */
    static const uint8_t future[] = {0x0a, 0x03, 0xf2, 0x01, 0x00};
    assert_int_equal(command_batch_decode(future, sizeof(future), &b), KR_EPROTO);
    assert_null(b);
}

/* Packs |b| into a fresh buffer (for comparing decodes byte for byte). */
static uint8_t *pack_batch(const Keyraft__CommandBatch *b, size_t *len)
{
    *len = keyraft__command_batch__get_packed_size(b);
    uint8_t *buf = malloc(*len + 1);
    assert_non_null(buf);
    assert_int_equal(keyraft__command_batch__pack(b, buf), *len);
    return buf;
}

/* The FSM decodes every entry into one arena, reset after each: entries of
 * every size, a rejected one among them, decode as they do with malloc. A
 * reset that kept old blocks' room or lost the first block's would corrupt
 * or fail a later decode. */
static void test_decode_in_arena_matches_malloc(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    enum { BIG = 1000 };
    Keyraft__Command **many = calloc(BIG, sizeof(*many));
    assert_non_null(many);
    for (size_t i = 0; i < BIG; i++)
        many[i] = s.ptrs[i % 5];
    Keyraft__Command bare = KEYRAFT__COMMAND__INIT;
    bare.request_id = "only-an-id";
    Keyraft__Command *opless[2] = {s.ptrs[0], &bare};
    struct {
        Keyraft__Command *const *cmds;
        size_t n;
        int want;
    } entries[] = {{s.ptrs, 1, 0}, {s.ptrs, 5, 0}, {many, BIG, 0}, {opless, 2, KR_EPROTO},
                   {s.ptrs + 2, 3, 0}, {many, BIG, 0}, {s.ptrs, 5, 0}};
    struct pb_arena *arena = pb_arena_new(4096, 0);
    assert_non_null(arena);
    for (int round = 0; round < 3; round++) {
        for (size_t e = 0; e < sizeof(entries) / sizeof(entries[0]); e++) {
            uint8_t *buf = NULL;
            size_t len = 0;
            assert_int_equal(command_batch_encode_at(entries[e].cmds, entries[e].n,
                                                     1700000000000ull + e, malloc, &buf, &len),
                             0);
            Keyraft__CommandBatch *in_arena = NULL, *in_heap = NULL;
            assert_int_equal(command_entry_decode_in(arena, buf, len, &in_arena), entries[e].want);
            assert_int_equal(command_entry_decode(buf, len, &in_heap), entries[e].want);
            if (entries[e].want == 0) {
                assert_int_equal(in_arena->n_commands, entries[e].n);
                size_t a_len = 0, h_len = 0;
                uint8_t *a = pack_batch(in_arena, &a_len);
                uint8_t *h = pack_batch(in_heap, &h_len);
                assert_int_equal(a_len, h_len);
                assert_memory_equal(a, h, a_len);
                free(a);
                free(h);
                command_batch_free(in_heap);
            } else {
                assert_null(in_arena);
                assert_null(in_heap);
            }
            pb_arena_reset(arena);
            free(buf);
        }
    }
    pb_arena_free(arena);

    /* An arena that may not grow enough says so, and is whole after a reset:
     * the FSM then applies the entry again instead of skipping it. */
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode_at(many, BIG, 1, malloc, &buf, &len), 0);
    arena = pb_arena_new(4096, 64u * 1024u);
    assert_non_null(arena);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode_in(arena, buf, len, &b), KR_ETOOBIG);
    assert_null(b);
    assert_int_equal(pb_arena_failed(arena), KR_ETOOBIG);
    pb_arena_reset(arena);
    assert_int_equal(pb_arena_failed(arena), 0);
    assert_int_equal(command_entry_decode_in(arena, buf, len, &b), KR_ETOOBIG);
    pb_arena_reset(arena);
    uint8_t *small = NULL;
    size_t small_len = 0;
    assert_int_equal(command_batch_encode_at(s.ptrs, 5, 1, malloc, &small, &small_len), 0);
    assert_int_equal(command_entry_decode_in(arena, small, small_len, &b), 0);
    assert_int_equal(b->n_commands, 5);
    pb_arena_free(arena);
    free(small);
    free(buf);
    free(many);
}

static void test_decode_rejects_too_many_ops(void **state)
{
    (void)state;
    /* Built by hand: the encoder refuses to make it. */
    Keyraft__Command dest = KEYRAFT__COMMAND__INIT;
    Keyraft__DestroyKeyCommand d = KEYRAFT__DESTROY_KEY_COMMAND__INIT;
    d.key_id = KEY_ID;
    dest.op_case = KEYRAFT__COMMAND__OP_DESTROY_KEY;
    dest.destroy_key = &d;
    Keyraft__Command **many = calloc(COMMAND_BATCH_MAX_OPS + 1, sizeof(*many));
    assert_non_null(many);
    for (size_t i = 0; i <= COMMAND_BATCH_MAX_OPS; i++)
        many[i] = &dest;
    Keyraft__CommandBatch batch = KEYRAFT__COMMAND_BATCH__INIT;
    batch.n_commands = COMMAND_BATCH_MAX_OPS + 1;
    batch.commands = many;
    size_t len = keyraft__command_batch__get_packed_size(&batch);
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    keyraft__command_batch__pack(&batch, buf);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_batch_decode(buf, len, &b), KR_EPROTO);
    assert_null(b);
    free(buf);
    free(many);
}

static void test_decode_rejects_oversize(void **state)
{
    (void)state;
    /* A well-formed entry whose only fault is its size. */
    const size_t blob = COMMAND_BATCH_MAX_BYTES + 64u * 1024u;
    uint8_t *sealed = calloc(1, blob);
    assert_non_null(sealed);
    struct sample s;
    sample_init(&s);
    s.ver2.sealed.data = sealed;
    s.ver2.sealed.len = blob;
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode(&s.ptrs[2], 1, malloc, &buf, &len), 0);
    assert_true(len > blob);
    Keyraft__CommandBatch *b = NULL;
    assert_int_equal(command_entry_decode(buf, len, &b), KR_ETOOBIG);
    assert_null(b);
    free(buf);

    /* One at the entry cap itself still decodes. */
    s.ver2.sealed.len = COMMAND_BATCH_MAX_BYTES - 128;
    assert_int_equal(command_batch_encode(&s.ptrs[2], 1, malloc, &buf, &len), 0);
    assert_true(len <= COMMAND_BATCH_MAX_BYTES);
    assert_int_equal(command_entry_decode(buf, len, &b), 0);
    assert_int_equal(b->commands[0]->add_version->version->sealed.len,
                     COMMAND_BATCH_MAX_BYTES - 128);
    command_batch_free(b);
    free(buf);
    free(sealed);
}

static void test_op_names(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    assert_string_equal(command_op_name(&s.cmds[0]), "put_key");
    assert_string_equal(command_op_name(&s.cmds[1]), "set_state");
    assert_string_equal(command_op_name(&s.cmds[2]), "add_version");
    assert_string_equal(command_op_name(&s.cmds[3]), "destroy_key");
    assert_string_equal(command_op_name(&s.cmds[4]), "put_domain");
    Keyraft__Command bare = KEYRAFT__COMMAND__INIT;
    assert_string_equal(command_op_name(&bare), "unknown");
    /* Every op of command.proto has a name (the fuzzer found one without). */
    bare.op_case = KEYRAFT__COMMAND__OP_PUT_NODE;
    assert_string_equal(command_op_name(&bare), "put_node");
    bare.op_case = KEYRAFT__COMMAND__OP_REMOVE_NODE;
    assert_string_equal(command_op_name(&bare), "remove_node");
    bare.op_case = (Keyraft__Command__OpCase)99;
    assert_string_equal(command_op_name(&bare), "unknown");
    command_batch_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_all_ops),
        cmocka_unit_test(test_command_size_adds_up),
        cmocka_unit_test(test_writer_matches_protobuf),
        cmocka_unit_test(test_entry_framing),
        cmocka_unit_test(test_encode_rejects_bad_counts_and_alloc_failure),
        cmocka_unit_test(test_decode_rejects_empty_batch),
        cmocka_unit_test(test_decode_rejects_garbage),
        cmocka_unit_test(test_decode_rejects_opless_command),
        cmocka_unit_test(test_decode_rejects_too_many_ops),
        cmocka_unit_test(test_decode_in_arena_matches_malloc),
        cmocka_unit_test(test_decode_rejects_oversize),
        cmocka_unit_test(test_op_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
