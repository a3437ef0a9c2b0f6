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

int kr__public_random(uint8_t *out, size_t len)
{
    if ((out == NULL && len != 0) || len > KR_PUBLIC_RANDOM_MAX)
        return -1;
    pthread_once(&public_fork_once, public_fork_register);
    if (public_pool_left < len) {
        public_pool_drop(); /* a remainder too short is never handed out */
        if (RAND_bytes(public_pool, sizeof(public_pool)) != 1) {
            ERR_clear_error();
            return -1;
        }
        public_pool_left = sizeof(public_pool);
    }
    uint8_t *take = public_pool + sizeof(public_pool) - public_pool_left;
    memcpy(out, take, len);
    OPENSSL_cleanse(take, len); /* never handed out twice */
    public_pool_left -= len;
    return 0;
}
