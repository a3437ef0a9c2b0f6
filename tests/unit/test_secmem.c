/* test_secmem.c: secure heap, wiping, constant-time compare, process hardening. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/crypto.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keyraft.h"
#include "secmem.h"

#define HEAP_SIZE (1u << 16)

static int all_zero(const uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != 0)
            return 0;
    return 1;
}

/* Runs before secmem_init: the process still works without a secure heap. */
static void test_alloc_without_init(void **state)
{
    (void)state;
    assert_false(CRYPTO_secure_malloc_initialized());
    assert_false(secmem_locked());
    uint8_t *p = secmem_alloc(64);
    assert_non_null(p);
    assert_true(all_zero(p, 64));
    memset(p, 0xAB, 64);
    secmem_free(p, 64);
    secbuf buf = {NULL, 0};
    assert_int_equal(secbuf_copy(&buf, (const uint8_t *)"key", 3), 0);
    assert_memory_equal(buf.data, "key", 3);
    secbuf_free(&buf);
    assert_null(buf.data);
    assert_int_equal(buf.len, 0);
}

static void test_init_rejects_bad_size(void **state)
{
    (void)state;
    /* OpenSSL would abort the process on these. */
    assert_int_equal(secmem_init(3000), KR_EINVAL);
    assert_int_equal(secmem_init(0), KR_EINVAL);
    assert_false(CRYPTO_secure_malloc_initialized());
}

static void test_init_and_secure_alloc(void **state)
{
    (void)state;
    int rc = secmem_init(HEAP_SIZE);
    /* KR_ENOMEM: mlock refused (RLIMIT_MEMLOCK); the guarded heap is still used. */
    assert_true(rc == 0 || rc == KR_ENOMEM);
    assert_true(CRYPTO_secure_malloc_initialized());
    /* Locked only when mlock held: nothing may then be kept past a request. */
    assert_int_equal(secmem_locked(), rc == 0);
    assert_int_equal(secmem_init(HEAP_SIZE), rc); /* already set up: the same answer */

    uint8_t *p = secmem_alloc(32);
    assert_non_null(p);
    assert_true(CRYPTO_secure_allocated(p));
    assert_true(all_zero(p, 32));
    secmem_free(p, 32);

    secbuf buf = {NULL, 0};
    assert_int_equal(secbuf_alloc(&buf, 48), 0);
    assert_int_equal(buf.len, 48);
    assert_true(CRYPTO_secure_allocated(buf.data));
    assert_true(all_zero(buf.data, buf.len));
    secbuf_free(&buf);
}

/* Larger than the whole heap: refused, never quietly served from normal memory. */
static void test_exhaustion_is_null(void **state)
{
    (void)state;
    assert_true(CRYPTO_secure_malloc_initialized());
    assert_null(secmem_alloc(HEAP_SIZE * 2));
    secbuf buf = {(uint8_t *)"prior", 5};
    assert_int_equal(secbuf_alloc(&buf, HEAP_SIZE * 2), KR_ENOMEM);
    assert_int_equal(buf.len, 5); /* untouched on failure */
    uint8_t *p = secmem_alloc(16);
    assert_non_null(p);
    secmem_free(p, 16);
}

static void test_zero_length(void **state)
{
    (void)state;
    void *p = secmem_alloc(0);
    assert_non_null(p);
    secmem_free(p, 0);
    secbuf buf = {NULL, 0};
    assert_int_equal(secbuf_copy(&buf, NULL, 0), 0);
    assert_non_null(buf.data);
    assert_int_equal(buf.len, 0);
    secbuf_free(&buf);
    secmem_free(NULL, 10);
    secbuf_free(&buf); /* already empty */
    secbuf_free(NULL);
    secmem_wipe(NULL, 0);
}

static void test_wipe(void **state)
{
    (void)state;
    uint8_t stackbuf[40];
    memset(stackbuf, 0x5A, sizeof(stackbuf));
    secmem_wipe(stackbuf + 4, 32);
    assert_int_equal(stackbuf[3], 0x5A);
    assert_true(all_zero(stackbuf + 4, 32));
    assert_int_equal(stackbuf[36], 0x5A);
}

static void test_equal(void **state)
{
    (void)state;
    uint8_t a[32], b[32];
    memset(a, 0x11, sizeof(a));
    memcpy(b, a, sizeof(b));
    assert_true(secmem_equal(a, b, sizeof(a)));
    b[31] ^= 1;
    assert_false(secmem_equal(a, b, sizeof(a)));
    assert_true(secmem_equal(a, b, 31));
    b[31] ^= 1;
    b[0] ^= 0x80;
    assert_false(secmem_equal(a, b, sizeof(a)));
    assert_true(secmem_equal(a, b, 0));
}

static void test_copy_is_independent(void **state)
{
    (void)state;
    uint8_t src[16];
    memset(src, 0x42, sizeof(src));
    secbuf buf = {NULL, 0};
    assert_int_equal(secbuf_copy(&buf, src, sizeof(src)), 0);
    assert_ptr_not_equal(buf.data, src);
    memset(src, 0, sizeof(src));
    assert_int_equal(buf.data[0], 0x42);
    assert_int_equal(buf.data[15], 0x42);
    assert_int_equal(secbuf_copy(NULL, src, 1), KR_EINVAL);
    secbuf_free(&buf);
}

/* In a child, so the test process itself stays debuggable. */
static void test_harden_process(void **state)
{
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit rl;
        int ok = secmem_harden_process() == 0 && getrlimit(RLIMIT_CORE, &rl) == 0 &&
                 rl.rlim_cur == 0 && rl.rlim_max == 0 && prctl(PR_GET_DUMPABLE) == 0;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void)
{
    /* Order matters: the first tests run before the secure heap exists. */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_without_init),
        cmocka_unit_test(test_init_rejects_bad_size),
        cmocka_unit_test(test_init_and_secure_alloc),
        cmocka_unit_test(test_exhaustion_is_null),
        cmocka_unit_test(test_zero_length),
        cmocka_unit_test(test_wipe),
        cmocka_unit_test(test_equal),
        cmocka_unit_test(test_copy_is_independent),
        cmocka_unit_test(test_harden_process),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
