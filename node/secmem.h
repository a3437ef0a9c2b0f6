/* secmem.h: the secure heap for key material (OpenSSL's mlocked, guarded
 * heap), wiping and constant-time comparison. */
#ifndef KR_SECMEM_H
#define KR_SECMEM_H

#include <stddef.h>
#include <stdint.h>

/* Sets up the secure heap of |size| bytes (a power of two). Call once, before
 * threads start. Returns 0, or KR_ENOMEM when the heap cannot be locked (the
 * caller decides whether to run without: see RLIMIT_MEMLOCK). */
int secmem_init(size_t size);
/* 1 when secmem_init set up a heap that is locked in memory (mlock held):
 * only then may key material be kept beyond one request. */
int secmem_locked(void);

/* Zeroed secure allocation; NULL on failure. Free with secmem_free. */
void *secmem_alloc(size_t len);
/* Wipes |len| bytes then frees. Accepts NULL. */
void secmem_free(void *ptr, size_t len);
/* Wipes |len| bytes of any memory. */
void secmem_wipe(void *ptr, size_t len);
/* 1 when equal, in time independent of the contents. */
int secmem_equal(const void *a, const void *b, size_t len);

/* Key material in the secure heap. */
typedef struct secbuf {
    uint8_t *data;
    size_t len;
} secbuf;

/* Allocates |len| zeroed secure bytes into |buf|. */
int secbuf_alloc(secbuf *buf, size_t len);
/* Copies |len| bytes into a fresh secure buffer. */
int secbuf_copy(secbuf *buf, const uint8_t *src, size_t len);
/* Wipes and frees; leaves {NULL, 0}. Accepts an empty buffer. */
void secbuf_free(secbuf *buf);

/* Process hardening for a process that holds keys: no core dumps, not
 * dumpable (no ptrace by other users). Returns 0 or KR_EINTERNAL. */
int secmem_harden_process(void);

#endif
