/* public_random.h: random bytes that are not secret (nonces, key ids, request
 * ids), shared by the node and libkeyraft. Each OpenSSL RAND_bytes call costs a
 * DRBG lock and a getpid() system call (OpenSSL's fork check); these come from
 * a per-thread pool of RAND_bytes output drawn 4 KB at a time. Each byte is
 * handed out once and wiped as it goes; a forked child drops the pool it
 * inherited, so parent and child never hand out the same bytes. Never for key
 * material (the node's secret pool, crypto.c, takes from its own buffer in the
 * secure heap with kr__random_pool_take). */
#ifndef KR_PUBLIC_RANDOM_H
#define KR_PUBLIC_RANDOM_H

#include <stddef.h>
#include <stdint.h>

#define KR_PUBLIC_RANDOM_MAX 64

/* Fills |out| with |len| <= KR_PUBLIC_RANDOM_MAX bytes. Returns 0, or -1 when
 * |len| is over the limit, |out| is NULL with |len| > 0, or the DRBG fails. */
int kr__public_random(uint8_t *out, size_t len);

/* A pool's hand-out: |len| <= |size| bytes from the |*left| not yet handed
 * out at the end of |pool|, each wiped as it goes. When fewer than |len| are
 * left, the remainder is wiped and the pool refilled by |fill| (RAND_bytes or
 * RAND_priv_bytes; its errors are popped). Returns 0, or -1 when |fill| fails
 * (the pool is then empty). */
int kr__random_pool_take(uint8_t *pool, size_t size, size_t *left,
                         int (*fill)(unsigned char *buf, int num), uint8_t *out, size_t len);

#endif
