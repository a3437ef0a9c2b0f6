/* pbarena.h: an arena for messages protobuf-c unpacks. Every allocation of
 * one unpack is carved in order from a few blocks, and the whole goes at
 * once: no malloc and free per field. Unpacked messages carry plaintexts and
 * key material, so the arena wipes what it used before it reuses or frees it.
 * Not thread-safe: one owner at a time. */
#ifndef KR_PBARENA_H
#define KR_PBARENA_H

#include <stddef.h>

#include <protobuf-c/protobuf-c.h>

struct pb_arena;

/* An arena whose first block holds |first_block| bytes (at least 1 KB);
 * later blocks double up to 1 MB, and an allocation past half a block gets a
 * block of its own. Its blocks never hold more than |limit| bytes in all (0:
 * no bound): protobuf-c's unpack makes ~100 bytes of structs from 2 bytes of
 * input (an empty repeated message), so a bound on the input is not one on
 * memory. NULL when out of memory. */
struct pb_arena *pb_arena_new(size_t first_block, size_t limit);
/* An allocator for protobuf-c's unpack that carves from |arena|. Its free
 * does nothing: never free_unpacked a message unpacked with it. */
ProtobufCAllocator pb_arena_allocator(struct pb_arena *arena);
/* Why an allocation failed since the arena was made or reset: KR_ENOMEM,
 * KR_ETOOBIG (past the limit), or 0. protobuf-c's unpack fails the same way
 * on malformed bytes, and only this tells them apart. */
int pb_arena_failed(const struct pb_arena *arena);
/* Wipes every byte handed out and keeps only the first block: every message
 * unpacked into the arena is gone. */
void pb_arena_reset(struct pb_arena *arena);
/* Wipes and frees the arena and every message in it. NULL is ignored. */
void pb_arena_free(struct pb_arena *arena);

#endif
