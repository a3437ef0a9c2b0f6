/* secmem.c: key material in OpenSSL's secure heap, wiping, constant-time compare. */
#include "secmem.h"

#include <openssl/crypto.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include "keyraft.h"

/* Smallest secure-heap chunk; OpenSSL rounds it up to its free-list node size. */
#define SECMEM_MIN_CHUNK 16

static int heap_locked; /* secmem_init got a heap locked in memory */

int secmem_init(size_t size)
{
    /* OpenSSL asserts (aborts) on a size that is not a power of two. */
    if (size < 4 * SECMEM_MIN_CHUNK || (size & (size - 1)) != 0)
        return KR_EINVAL;
    if (CRYPTO_secure_malloc_initialized())
        return secmem_locked() ? 0 : KR_ENOMEM;
    /* 1: locked and guarded; 2: guarded and kept out of core dumps, but mlock
     * failed (RLIMIT_MEMLOCK). The heap stays in use either way. */
    int rc = CRYPTO_secure_malloc_init(size, SECMEM_MIN_CHUNK);
    if (rc == 1)
        __atomic_store_n(&heap_locked, 1, __ATOMIC_RELEASE);
    return rc == 1 ? 0 : KR_ENOMEM;
}

int secmem_locked(void) { return __atomic_load_n(&heap_locked, __ATOMIC_ACQUIRE); }

void *secmem_alloc(size_t len)
{
    /* A zero-length request still gets a unique pointer, so NULL means failure.
     * Without secmem_init OpenSSL serves this from the normal heap. */
    return OPENSSL_secure_zalloc(len ? len : 1);
}

void secmem_free(void *ptr, size_t len)
{
    if (ptr == NULL)
        return;
    OPENSSL_secure_clear_free(ptr, len ? len : 1);
}

void secmem_wipe(void *ptr, size_t len)
{
    if (ptr != NULL && len > 0)
        OPENSSL_cleanse(ptr, len);
}

int secmem_equal(const void *a, const void *b, size_t len)
{
    return CRYPTO_memcmp(a, b, len) == 0;
}

int secbuf_alloc(secbuf *buf, size_t len)
{
    if (buf == NULL)
        return KR_EINVAL;
    uint8_t *data = secmem_alloc(len);
    if (data == NULL)
        return KR_ENOMEM;
    buf->data = data;
    buf->len = len;
    return 0;
}

int secbuf_copy(secbuf *buf, const uint8_t *src, size_t len)
{
    if (buf == NULL || (src == NULL && len > 0))
        return KR_EINVAL;
    secbuf tmp = {NULL, 0};
    int rc = secbuf_alloc(&tmp, len);
    if (rc != 0)
        return rc;
    if (len > 0)
        memcpy(tmp.data, src, len);
    *buf = tmp;
    return 0;
}

void secbuf_free(secbuf *buf)
{
    if (buf == NULL)
        return;
    secmem_free(buf->data, buf->len);
    buf->data = NULL;
    buf->len = 0;
}

int secmem_harden_process(void)
{
    const struct rlimit none = {0, 0};
    if (setrlimit(RLIMIT_CORE, &none) != 0)
        return KR_EINTERNAL;
    /* Not dumpable: no core even if a limit is raised later, and no ptrace or
     * /proc/<pid>/mem for other processes of the same user. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        return KR_EINTERNAL;
    return 0;
}
