/* public_random.h: random bytes that are not secret (nonces, key ids, request
 * ids), shared by the node and libkeyraft. Each OpenSSL RAND_bytes call costs a
 * DRBG lock and a getpid() system call (OpenSSL's fork check); these come from
 * a per-thread pool of RAND_bytes output drawn 4 KB at a time. Each byte is
 * handed out once and wiped as it goes; a forked child drops the pool it
 * inherited, so parent and child never hand out the same bytes. Never for key
 * material. */
#ifndef KR_PUBLIC_RANDOM_H
#define KR_PUBLIC_RANDOM_H

#include <stddef.h>
#include <stdint.h>

#define KR_PUBLIC_RANDOM_MAX 64

/* Fills |out| with |len| <= KR_PUBLIC_RANDOM_MAX bytes. Returns 0, or -1 when
 * |len| is over the limit, |out| is NULL with |len| > 0, or the DRBG fails. */
int kr__public_random(uint8_t *out, size_t len);

#endif
