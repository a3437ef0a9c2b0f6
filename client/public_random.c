/* public_random.c: see public_random.h. */
#include "public_random.h"

#include <pthread.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>

#define PUBLIC_POOL_BYTES 4096

static __thread uint8_t public_pool[PUBLIC_POOL_BYTES];
static __thread size_t public_pool_left;
static pthread_once_t public_fork_once = PTHREAD_ONCE_INIT;

/* In a forked child this runs on the one thread the child has: the other
 * threads' pools do not exist there. */
static void public_pool_drop(void)
{
    OPENSSL_cleanse(public_pool, sizeof(public_pool));
    public_pool_left = 0;
}

static void public_fork_register(void) { pthread_atfork(NULL, NULL, public_pool_drop); }

int kr__random_pool_take(uint8_t *pool, size_t size, size_t *left,
                         int (*fill)(unsigned char *buf, int num), uint8_t *out, size_t len)
{
    if (*left < len) {
        OPENSSL_cleanse(pool, size); /* a remainder too short is never handed out */
        *left = 0;
        ERR_set_mark();
        int ok = fill(pool, (int)size) == 1;
        ERR_pop_to_mark();
        if (!ok)
            return -1;
        *left = size;
    }
    uint8_t *take = pool + size - *left;
    memcpy(out, take, len);
    OPENSSL_cleanse(take, len); /* never handed out twice */
    *left -= len;
    return 0;
}

int kr__public_random(uint8_t *out, size_t len)
{
    if ((out == NULL && len != 0) || len > KR_PUBLIC_RANDOM_MAX)
        return -1;
    pthread_once(&public_fork_once, public_fork_register);
    return kr__random_pool_take(public_pool, sizeof(public_pool), &public_pool_left, RAND_bytes,
                                out, len);
}
