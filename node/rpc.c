/* rpc.c: framing and (de)serialisation of the client protocol. */
#include "rpc.h"

#include <malloc.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "pbarena.h"

void rpc_reader_init(struct rpc_reader *r, uint32_t max_frame)
{
    memset(r, 0, sizeof(*r));
    r->max_frame = max_frame;
}

void rpc_reader_cleanup(struct rpc_reader *r)
{
    if (r->buf) {
        OPENSSL_cleanse(r->buf, r->cap);
        free(r->buf);
    }
    memset(r, 0, sizeof(*r));
}

int rpc_reader_feed(struct rpc_reader *r, const uint8_t *data, size_t len)
{
    if (len == 0)
        return 0;
    if (r->start > 0) {
        /* Slide the unconsumed tail to the front, wiping what moved away. */
        size_t keep = r->len - r->start;
        memmove(r->buf, r->buf + r->start, keep);
        OPENSSL_cleanse(r->buf + keep, r->len - keep);
        r->len = keep;
        r->start = 0;
    }
    if (r->len + len > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + len)
            cap *= 2;
        uint8_t *nb = malloc(cap);
        if (nb == NULL)
            return KR_ENOMEM;
        if (r->buf) {
            memcpy(nb, r->buf, r->len);
            OPENSSL_cleanse(r->buf, r->cap);
            free(r->buf);
        }
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, data, len);
    r->len += len;
    return 0;
}

int rpc_reader_next(struct rpc_reader *r, const uint8_t **payload, size_t *len)
{
    size_t avail = r->len - r->start;
    if (avail < 4)
        return 0;
    const uint8_t *p = r->buf + r->start;
    uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    if (n > r->max_frame)
        return KR_ETOOBIG;
    if (avail - 4 < n)
        return 0;
    *payload = p + 4;
    *len = n;
    r->start += 4 + (size_t)n;
    return 1;
}

static void *wiping_alloc(void *data, size_t size)
{
    (void)data;
    return malloc(size);
}

static void wiping_free(void *data, void *ptr)
{
    (void)data;
    if (ptr == NULL)
        return;
    OPENSSL_cleanse(ptr, malloc_usable_size(ptr));
    free(ptr);
}

static ProtobufCAllocator wiping_allocator = {wiping_alloc, wiping_free, NULL};

void rpc_request_free(Keyraft__Request *req)
{
    if (req != NULL)
        keyraft__request__free_unpacked(req, &wiping_allocator);
}

/* The decoded form takes about twice the wire form (structs, pointers); an
 * encrypt request ~600 bytes. A malloc, a wipe and a free per field were 6%
 * of a node serving 64-byte encrypts (perf). Legitimate requests decode to
 * a few times their size (10,000 tiny requests of a batch: ~20x, 2.5 MB); a
 * frame of empty repeated messages would make 50x. */
int rpc_decode_request(const uint8_t *payload, size_t len, Keyraft__Request **out,
                       struct pb_arena **arena)
{
    *out = NULL;
    *arena = NULL;
    struct pb_arena *a = pb_arena_new(2 * len, RPC_DECODED_LIMIT(len));
    if (a == NULL)
        return KR_ENOMEM;
    ProtobufCAllocator allocator = pb_arena_allocator(a);
    Keyraft__Request *req = keyraft__request__unpack(&allocator, len, payload);
    if (req == NULL) {
        int why = pb_arena_failed(a); /* unpack fails alike on bytes and on memory */
        int rv = why != 0 ? why : KR_EPROTO;
        pb_arena_free(a);
        return rv;
    }
    *out = req;
    *arena = a;
    return 0;
}

size_t rpc_response_frame_size(const Keyraft__Response *resp)
{
    return 4 + keyraft__response__get_packed_size(resp);
}

void rpc_encode_response_into(const Keyraft__Response *resp, size_t frame_size, uint8_t *buf)
{
    size_t n = frame_size - 4;
    buf[0] = (uint8_t)(n >> 24);
    buf[1] = (uint8_t)(n >> 16);
    buf[2] = (uint8_t)(n >> 8);
    buf[3] = (uint8_t)n;
    keyraft__response__pack(resp, buf + 4);
}

int rpc_encode_response(const Keyraft__Response *resp, uint8_t **out, size_t *out_len)
{
    size_t size = rpc_response_frame_size(resp);
    if (size - 4 > UINT32_MAX)
        return KR_ETOOBIG;
    uint8_t *buf = malloc(size);
    if (buf == NULL)
        return KR_ENOMEM;
    rpc_encode_response_into(resp, size, buf);
    *out = buf;
    *out_len = size;
    return 0;
}
