/* pbarena.c: see pbarena.h. */
#include "pbarena.h"

#include <openssl/crypto.h>
#include <stdint.h>
#include <stdlib.h>

#include "keyraft.h"

/* Under AddressSanitizer each allocation is followed by a poisoned gap and
 * the unused room is poisoned, so a read or write past a field is caught as
 * it would be with a malloc per field (fuzz_request, fuzz_command). */
#if defined(__SANITIZE_ADDRESS__)
#define PB_ARENA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PB_ARENA_ASAN 1
#endif
#endif
#ifdef PB_ARENA_ASAN
#include <sanitizer/asan_interface.h>
#define PB_ARENA_GAP 16u
#define arena_poison(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define arena_unpoison(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define PB_ARENA_GAP 0u
#define arena_poison(p, n) ((void)(p), (void)(n))
#define arena_unpoison(p, n) ((void)(p), (void)(n))
#endif

#define PB_ARENA_ALIGN _Alignof(max_align_t)
#define PB_ARENA_MIN_BLOCK 1024u
#define PB_ARENA_MAX_BLOCK (1024u * 1024u)

struct pb_arena_block {
    struct pb_arena_block *next;
    size_t used, cap;
    max_align_t data[];
};

/* Lives at the start of its first block. */
struct pb_arena {
    struct pb_arena_block *first; /* holds this header: kept by a reset, freed last */
    struct pb_arena_block *head;  /* carved from; newest first, then older */
    size_t first_cap, next_cap;
    size_t held, limit; /* bytes in blocks; the most they may hold (0: no bound) */
    int failed;         /* 0, KR_ENOMEM or KR_ETOOBIG since the last reset */
};

static struct pb_arena_block *block_new(size_t cap)
{
    if (cap > SIZE_MAX - sizeof(struct pb_arena_block))
        return NULL;
    struct pb_arena_block *b = malloc(sizeof(*b) + cap);
    if (b == NULL)
        return NULL;
    b->next = NULL;
    b->used = 0;
    b->cap = cap;
    arena_poison(b->data, cap);
    return b;
}

/* |size| bytes from |b|, which has room: need <= cap - used. */
static void *carve(struct pb_arena_block *b, size_t size, size_t need)
{
    void *p = (uint8_t *)b->data + b->used;
    b->used += need;
    arena_unpoison(p, size);
    return p;
}

/* Rounded up to the alignment, with the sanitizer's gap (at least one unit,
 * so that even a 0-byte allocation gets its own address); 0 on overflow. */
static size_t need_for(size_t size)
{
    if (size == 0)
        size = 1;
    if (size > SIZE_MAX - PB_ARENA_GAP - PB_ARENA_ALIGN)
        return 0;
    return (size + PB_ARENA_GAP + PB_ARENA_ALIGN - 1) & ~(size_t)(PB_ARENA_ALIGN - 1);
}

static void *arena_take(void *data, size_t size)
{
    struct pb_arena *a = data;
    size_t need = need_for(size);
    if (need == 0) {
        a->failed = KR_ETOOBIG;
        return NULL;
    }
    struct pb_arena_block *head = a->head;
    if (head->cap - head->used >= need)
        return carve(head, size, need);
    /* One past half a block gets a block of its own; the head keeps its room. */
    size_t cap = need > a->next_cap / 2 ? need : a->next_cap;
    if (a->limit != 0 && (cap > a->limit || a->held > a->limit - cap)) {
        a->failed = KR_ETOOBIG;
        return NULL;
    }
    struct pb_arena_block *b = block_new(cap);
    if (b == NULL) {
        a->failed = KR_ENOMEM;
        return NULL;
    }
    a->held += cap;
    if (cap == need) {
        b->next = head->next;
        head->next = b;
    } else {
        b->next = head;
        a->head = b;
        if (a->next_cap < PB_ARENA_MAX_BLOCK)
            a->next_cap *= 2;
    }
    return carve(b, size, need);
}

/* protobuf-c frees the parts of a message it failed to unpack: they go with
 * the arena instead. */
static void arena_give_back(void *data, void *ptr)
{
    (void)data;
    (void)ptr;
}

static void block_wipe(struct pb_arena_block *b)
{
    arena_unpoison(b->data, b->cap);
    OPENSSL_cleanse(b->data, b->used);
}

struct pb_arena *pb_arena_new(size_t first_block, size_t limit)
{
    size_t first = first_block < PB_ARENA_MIN_BLOCK ? PB_ARENA_MIN_BLOCK : first_block;
    if (first > PB_ARENA_MAX_BLOCK)
        first = PB_ARENA_MAX_BLOCK;
    size_t header = need_for(sizeof(struct pb_arena));
    struct pb_arena_block *b = block_new(header + first);
    if (b == NULL)
        return NULL;
    struct pb_arena *a = carve(b, sizeof(*a), header);
    a->first = b;
    a->head = b;
    a->first_cap = first;
    a->next_cap = first;
    a->held = header + first;
    a->limit = limit;
    a->failed = 0;
    return a;
}

ProtobufCAllocator pb_arena_allocator(struct pb_arena *arena)
{
    return (ProtobufCAllocator){arena_take, arena_give_back, arena};
}

/* Wipes and frees every block but the first. */
static void free_later_blocks(struct pb_arena *a)
{
    struct pb_arena_block *first = a->first, *b = a->head;
    while (b != NULL) {
        struct pb_arena_block *next = b->next;
        if (b != first) {
            block_wipe(b);
            free(b);
        }
        b = next;
    }
}

void pb_arena_reset(struct pb_arena *arena)
{
    free_later_blocks(arena);
    struct pb_arena_block *first = arena->first;
    size_t header = need_for(sizeof(struct pb_arena));
    /* The header stays: wipe and re-poison only what was carved after it. */
    arena_unpoison(first->data, first->cap);
    OPENSSL_cleanse((uint8_t *)first->data + header, first->used - header);
    arena_poison((uint8_t *)first->data + sizeof(struct pb_arena),
                 first->cap - sizeof(struct pb_arena));
    first->used = header;
    first->next = NULL;
    arena->head = first;
    arena->next_cap = arena->first_cap;
    arena->held = first->cap;
    arena->failed = 0;
}

int pb_arena_failed(const struct pb_arena *arena)
{
    return arena->failed;
}

void pb_arena_free(struct pb_arena *arena)
{
    if (arena == NULL)
        return;
    struct pb_arena_block *first = arena->first;
    free_later_blocks(arena);
    block_wipe(first); /* the header goes last: it held the list */
    free(first);
}
