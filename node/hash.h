/* hash.h: FNV-1a for the node's in-memory tables (caches, the usage map, an
 * entry's run of creates). Values never leave the process: not stable, not
 * for anything stored. */
#ifndef KR_HASH_H
#define KR_HASH_H

#include <stddef.h>
#include <stdint.h>

#define KR_HASH_INIT 1469598103934665603ull

static inline uint64_t kr_hash_bytes(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static inline uint64_t kr_hash_str(uint64_t h, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        h = (h ^ *p) * 1099511628211ull;
    return h;
}

static inline uint64_t kr_hash_u32(uint64_t h, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        h = (h ^ ((v >> (8 * i)) & 0xff)) * 1099511628211ull;
    return h;
}

#endif
