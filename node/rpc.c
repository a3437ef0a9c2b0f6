/* rpc.c: framing and (de)serialisation of the client protocol. */
#include "rpc.h"

#include <malloc.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"

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

/* --- request arenas ----------------------------------------------------------
 * A malloc, a wipe and a free for every field of every request were 6% of a
 * node serving 64-byte encrypts (perf); an arena is one malloc for a small
 * request and one wipe of the bytes used. Under AddressSanitizer each
 * allocation is followed by a poisoned gap and the unused room is poisoned,
 * so a read or write past a field is still caught (fuzz_request). */
#if defined(__SANITIZE_ADDRESS__)
#define RPC_ARENA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RPC_ARENA_ASAN 1
#endif
#endif
#ifdef RPC_ARENA_ASAN
#include <sanitizer/asan_interface.h>
#define RPC_ARENA_GAP 16u
#define arena_poison(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define arena_unpoison(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define RPC_ARENA_GAP 0u
#define arena_poison(p, n) ((void)(p), (void)(n))
#define arena_unpoison(p, n) ((void)(p), (void)(n))
#endif

#define RPC_ARENA_ALIGN _Alignof(max_align_t)
#define RPC_ARENA_MIN_BLOCK 1024u          /* an encrypt request takes ~600 bytes */
#define RPC_ARENA_MAX_BLOCK (1024u * 1024u) /* larger allocations get their own */

struct rpc_arena_block {
    struct rpc_arena_block *next;
    size_t used, cap;
    max_align_t data[];
};

/* Lives at the start of its first block. */
struct rpc_arena {
    struct rpc_arena_block *first; /* holds this header: freed last */
    struct rpc_arena_block *head;  /* carved from; newest first, then older */
    size_t next_cap;
};

static struct rpc_arena_block *arena_block_new(size_t cap)
{
    if (cap > SIZE_MAX - sizeof(struct rpc_arena_block))
        return NULL;
    struct rpc_arena_block *b = malloc(sizeof(*b) + cap);
    if (b == NULL)
        return NULL;
    b->next = NULL;
    b->used = 0;
    b->cap = cap;
    arena_poison(b->data, cap);
    return b;
}

/* |size| bytes from |b|, which has room: need <= cap - used. */
static void *arena_carve(struct rpc_arena_block *b, size_t size, size_t need)
{
    void *p = (uint8_t *)b->data + b->used;
    b->used += need;
    arena_unpoison(p, size);
    return p;
}

/* Rounded up to the alignment, with the sanitizer's gap (at least one
 * unit, so that even a 0-byte request gets its own address); 0 on overflow. */
static size_t arena_need(size_t size)
{
    if (size == 0)
        size = 1;
    if (size > SIZE_MAX - RPC_ARENA_GAP - RPC_ARENA_ALIGN)
        return 0;
    return (size + RPC_ARENA_GAP + RPC_ARENA_ALIGN - 1) & ~(size_t)(RPC_ARENA_ALIGN - 1);
}

static void *arena_take(void *data, size_t size)
{
    struct rpc_arena *a = data;
    size_t need = arena_need(size);
    if (need == 0)
        return NULL;
    struct rpc_arena_block *head = a->head;
    if (head->cap - head->used >= need)
        return arena_carve(head, size, need);
    /* One past half a block gets a block of its own; the head keeps its room. */
    size_t cap = need > a->next_cap / 2 ? need : a->next_cap;
    struct rpc_arena_block *b = arena_block_new(cap);
    if (b == NULL)
        return NULL;
    if (cap == need) {
        b->next = head->next;
        head->next = b;
    } else {
        b->next = head;
        a->head = b;
        if (a->next_cap < RPC_ARENA_MAX_BLOCK)
            a->next_cap *= 2;
    }
    return arena_carve(b, size, need);
}

/* protobuf-c frees parts of a message it failed to unpack: all of it goes
 * with the arena instead. */
static void arena_give_back(void *data, void *ptr)
{
    (void)data;
    (void)ptr;
}

static void arena_block_free(struct rpc_arena_block *b)
{
    arena_unpoison(b->data, b->cap);
    OPENSSL_cleanse(b->data, b->used);
    free(b);
}

static struct rpc_arena *arena_new(size_t payload_len)
{
    /* The decoded form is about twice the wire form (structs, pointers). */
    size_t first = payload_len < RPC_ARENA_MAX_BLOCK / 2 ? 2 * payload_len : RPC_ARENA_MAX_BLOCK;
    if (first < RPC_ARENA_MIN_BLOCK)
        first = RPC_ARENA_MIN_BLOCK;
    size_t header = arena_need(sizeof(struct rpc_arena));
    struct rpc_arena_block *b = arena_block_new(header + first);
    if (b == NULL)
        return NULL;
    struct rpc_arena *a = arena_carve(b, sizeof(*a), header);
    a->first = b;
    a->head = b;
    a->next_cap = first;
    return a;
}

void rpc_arena_free(struct rpc_arena *arena)
{
    if (arena == NULL)
        return;
    struct rpc_arena_block *first = arena->first, *b = arena->head;
    while (b != NULL) {
        struct rpc_arena_block *next = b->next;
        if (b != first)
            arena_block_free(b);
        b = next;
    }
    arena_block_free(first); /* the header goes last: it held the list */
}

int rpc_decode_request(const uint8_t *payload, size_t len, Keyraft__Request **out,
                       struct rpc_arena **arena)
{
    *out = NULL;
    *arena = NULL;
    struct rpc_arena *a = arena_new(len);
    if (a == NULL)
        return KR_ENOMEM;
    ProtobufCAllocator allocator = {arena_take, arena_give_back, a};
    Keyraft__Request *req = keyraft__request__unpack(&allocator, len, payload);
    if (req == NULL) {
        rpc_arena_free(a);
        return KR_EPROTO;
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
