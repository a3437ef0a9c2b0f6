/* test_hsm.c: hsm against a real SoftHSM token in a temporary directory. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <p11-kit/pkcs11.h>
#include <p11-kit/p11-kit.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hsm.h"
#include "keyraft.h"

#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define TOKEN "kr-test-token"
#define SO_PIN "so-pin-0000"
#define PIN "user-pin-1234"

static char tmpdir[64];

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int setup_token_dir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/kr-test-hsm-XXXXXX");
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    char path[256];
    snprintf(path, sizeof(path), "%s/tokens", tmpdir);
    if (mkdir(path, 0700) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s/softhsm2.conf", tmpdir);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            tmpdir);
    fclose(f);
    setenv("SOFTHSM2_CONF", path, 1);
    return hsm_init_token(MODULE, TOKEN, SO_PIN, PIN) == 0 ? 0 : -1;
}

static int remove_token_dir(void **state)
{
    (void)state;
    return nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static struct hsm *open_hsm(const char *mwk_label)
{
    struct hsm_config cfg = {MODULE, TOKEN, PIN, mwk_label};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), 0);
    assert_non_null(hsm);
    return hsm;
}

/* An open handle whose MWK exists (made by whichever test needs it first). */
static struct hsm *open_with_mwk(const char *mwk_label)
{
    struct hsm *hsm = open_hsm(mwk_label);
    if (hsm_find_mwk(hsm) == KR_ENOTFOUND)
        assert_int_equal(hsm_generate_mwk(hsm), 0);
    assert_int_equal(hsm_find_mwk(hsm), 0);
    return hsm;
}

static void test_init_token_twice_is_eexist(void **state)
{
    (void)state;
    assert_int_equal(hsm_init_token(MODULE, TOKEN, SO_PIN, PIN), KR_EEXIST);
}

static void test_init_token_rejects_long_label(void **state)
{
    (void)state;
    assert_int_equal(hsm_init_token(MODULE, "a-label-that-is-longer-than-32-bytes", SO_PIN, PIN),
                     KR_EINVAL);
}

static void test_second_token_gets_its_own_slot(void **state)
{
    (void)state;
    assert_int_equal(hsm_init_token(MODULE, "kr-other-token", SO_PIN, "other-pin-99"), 0);
    /* Each token keeps its own PIN: the labels really select different tokens. */
    struct hsm_config cfg = {MODULE, "kr-other-token", PIN, "mwk"};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), KR_EPERM);
    assert_null(hsm);
    cfg.pin = "other-pin-99";
    assert_int_equal(hsm_open(&cfg, &hsm), 0);
    hsm_close(hsm);
}

static void test_open_unknown_label(void **state)
{
    (void)state;
    struct hsm_config cfg = {MODULE, "no-such-token", PIN, "mwk"};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), KR_ENOTFOUND);
    assert_null(hsm);
}

static void test_open_wrong_pin(void **state)
{
    (void)state;
    struct hsm_config cfg = {MODULE, TOKEN, "not-the-pin", "mwk"};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), KR_EPERM);
    assert_null(hsm);
}

static void test_open_bad_module(void **state)
{
    (void)state;
    struct hsm_config cfg = {"/nonexistent/libpkcs11.so", TOKEN, PIN, "mwk"};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), KR_EHSM);
    assert_null(hsm);
}

static void test_mwk_lifecycle(void **state)
{
    (void)state;
    struct hsm *hsm = open_hsm("mwk-lifecycle");
    uint8_t *ct = NULL;
    size_t ct_len = 0;
    assert_int_equal(hsm_find_mwk(hsm), KR_ENOTFOUND);
    assert_int_equal(hsm_mwk_encrypt(hsm, NULL, 0, (const uint8_t *)"x", 1, &ct, &ct_len),
                     KR_ENOTFOUND);
    assert_null(ct);
    assert_int_equal(hsm_generate_mwk(hsm), 0);
    assert_int_equal(hsm_find_mwk(hsm), 0);
    assert_int_equal(hsm_generate_mwk(hsm), KR_EEXIST);
    hsm_close(hsm);

    /* A second handle sees the same single key. */
    hsm = open_hsm("mwk-lifecycle");
    assert_int_equal(hsm_generate_mwk(hsm), KR_EEXIST);
    hsm_close(hsm);
}

static void test_round_trip(void **state)
{
    (void)state;
    struct hsm *hsm = open_with_mwk("mwk-main");
    const uint8_t pt[32] = "thirty-two bytes of domain key!";
    const uint8_t aad[] = "keyraft-domain-v1default";
    uint8_t *ct1 = NULL, *ct2 = NULL;
    size_t ct1_len = 0, ct2_len = 0;
    uint8_t back[32];
    size_t back_len = 0;

    assert_int_equal(hsm_mwk_encrypt(hsm, aad, sizeof(aad), pt, sizeof(pt), &ct1, &ct1_len), 0);
    assert_int_equal(ct1_len, HSM_GCM_IV_LEN + sizeof(pt) + HSM_GCM_TAG_LEN);
    assert_null(memmem(ct1, ct1_len, pt, 8)); /* not plaintext */
    assert_int_equal(hsm_mwk_encrypt(hsm, aad, sizeof(aad), pt, sizeof(pt), &ct2, &ct2_len), 0);
    assert_memory_not_equal(ct1, ct2, HSM_GCM_IV_LEN); /* fresh IV each time */
    assert_memory_not_equal(ct1 + HSM_GCM_IV_LEN, ct2 + HSM_GCM_IV_LEN, sizeof(pt));

    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct1, ct1_len, back, &back_len), 0);
    assert_int_equal(back_len, sizeof(pt));
    assert_memory_equal(back, pt, sizeof(pt));
    memset(back, 0, sizeof(back));
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct2, ct2_len, back, &back_len), 0);
    assert_memory_equal(back, pt, sizeof(pt));

    /* No AAD and an empty plaintext are valid too. */
    uint8_t *ct3 = NULL;
    size_t ct3_len = 0;
    assert_int_equal(hsm_mwk_encrypt(hsm, NULL, 0, NULL, 0, &ct3, &ct3_len), 0);
    assert_int_equal(ct3_len, HSM_GCM_IV_LEN + HSM_GCM_TAG_LEN);
    assert_int_equal(hsm_mwk_decrypt(hsm, NULL, 0, ct3, ct3_len, NULL, &back_len), 0);
    assert_int_equal(back_len, 0);
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct3, ct3_len, NULL, &back_len),
                     KR_EAUTH);

    free(ct1);
    free(ct2);
    free(ct3);
    hsm_close(hsm);
}

static void test_tampering_is_eauth(void **state)
{
    (void)state;
    struct hsm *hsm = open_with_mwk("mwk-main");
    const uint8_t pt[32] = "another thirty-two byte secret.";
    const uint8_t aad[] = "keyraft-domain-v1tenant-a";
    const uint8_t other_aad[] = "keyraft-domain-v1tenant-b";
    uint8_t *ct = NULL;
    size_t ct_len = 0;
    uint8_t back[64];
    size_t back_len = 0;

    assert_int_equal(hsm_mwk_encrypt(hsm, aad, sizeof(aad), pt, sizeof(pt), &ct, &ct_len), 0);
    assert_int_equal(hsm_mwk_decrypt(hsm, other_aad, sizeof(other_aad), ct, ct_len, back,
                                     &back_len),
                     KR_EAUTH);
    assert_int_equal(hsm_mwk_decrypt(hsm, NULL, 0, ct, ct_len, back, &back_len), KR_EAUTH);
    /* One flipped bit anywhere: IV, ciphertext, tag. */
    const size_t where[] = {0, HSM_GCM_IV_LEN, HSM_GCM_IV_LEN + 31, ct_len - 1};
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]); i++) {
        ct[where[i]] ^= 0x01;
        back_len = 12345;
        assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, ct_len, back, &back_len),
                         KR_EAUTH);
        assert_int_equal(back_len, 12345); /* untouched on failure */
        ct[where[i]] ^= 0x01;
    }
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, ct_len - 1, back, &back_len),
                     KR_EAUTH);
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, 27, back, &back_len), KR_EAUTH);
    /* The session is not wedged by the failures. */
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, ct_len, back, &back_len), 0);
    assert_memory_equal(back, pt, sizeof(pt));
    free(ct);
    hsm_close(hsm);
}

static void test_reopen_decrypts(void **state)
{
    (void)state;
    const uint8_t pt[32] = "survives a restart of the node.";
    const uint8_t aad[] = "reopen";
    uint8_t *ct = NULL;
    size_t ct_len = 0;
    uint8_t back[32];
    size_t back_len = 0;

    struct hsm *hsm = open_with_mwk("mwk-main");
    assert_int_equal(hsm_mwk_encrypt(hsm, aad, sizeof(aad), pt, sizeof(pt), &ct, &ct_len), 0);
    hsm_close(hsm);

    hsm = open_hsm("mwk-main");
    assert_int_equal(hsm_find_mwk(hsm), 0);
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, ct_len, back, &back_len), 0);
    assert_memory_equal(back, pt, sizeof(pt));
    hsm_close(hsm);

    /* A different MWK on the same token does not open it. */
    hsm = open_with_mwk("mwk-other");
    assert_int_equal(hsm_mwk_decrypt(hsm, aad, sizeof(aad), ct, ct_len, back, &back_len),
                     KR_EAUTH);
    hsm_close(hsm);
    free(ct);
}

static void test_random(void **state)
{
    (void)state;
    struct hsm *hsm = open_hsm("mwk-main");
    uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
    assert_int_equal(hsm_random(hsm, a, sizeof(a)), 0);
    assert_int_equal(hsm_random(hsm, b, sizeof(b)), 0);
    assert_memory_not_equal(a, zero, sizeof(a));
    assert_memory_not_equal(a, b, sizeof(a));
    hsm_close(hsm);
}

/* Reads attributes of the MWK through a session of our own. */
static CK_FUNCTION_LIST *raw_open(CK_SESSION_HANDLE *out_session)
{
    CK_FUNCTION_LIST *m = p11_kit_module_load(MODULE, 0);
    assert_non_null(m);
    assert_int_equal(p11_kit_module_initialize(m), CKR_OK);
    CK_SLOT_ID slots[16];
    CK_ULONG n = 16;
    assert_int_equal(m->C_GetSlotList(CK_TRUE, slots, &n), CKR_OK);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        assert_int_equal(m->C_GetTokenInfo(slots[i], &info), CKR_OK);
        if (memcmp(info.label, TOKEN, strlen(TOKEN)) == 0 && info.label[strlen(TOKEN)] == ' ') {
            assert_int_equal(m->C_OpenSession(slots[i], CKF_SERIAL_SESSION, NULL, NULL,
                                              out_session),
                             CKR_OK);
            return m;
        }
    }
    fail_msg("token %s not found", TOKEN);
    return NULL;
}

static CK_ULONG raw_find(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE s, const char *label,
                         CK_OBJECT_HANDLE *out)
{
    CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, (void *)label, strlen(label)}};
    CK_ULONG n = 0;
    assert_int_equal(m->C_FindObjectsInit(s, tmpl, 1), CKR_OK);
    assert_int_equal(m->C_FindObjects(s, out, 1, &n), CKR_OK);
    assert_int_equal(m->C_FindObjectsFinal(s), CKR_OK);
    return n;
}

static void test_mwk_attributes(void **state)
{
    (void)state;
    hsm_close(open_with_mwk("mwk-main"));

    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open(&s);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    /* CKA_PRIVATE: invisible before login. */
    assert_int_equal(raw_find(m, s, "mwk-main", &key), 0);
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    assert_int_equal(raw_find(m, s, "mwk-main", &key), 1);

    uint8_t value[64];
    CK_ATTRIBUTE get_value = {CKA_VALUE, value, sizeof(value)};
    assert_int_equal(m->C_GetAttributeValue(s, key, &get_value, 1), CKR_ATTRIBUTE_SENSITIVE);
    assert_int_equal((long)get_value.ulValueLen, -1L); /* CK_UNAVAILABLE_INFORMATION */

    CK_BBOOL sensitive = 0, extractable = 0, trusted = 0, token = 0, priv = 0, always = 0;
    CK_BBOOL wrap = 1, never_extractable = 1;
    CK_ULONG len = 0;
    CK_KEY_TYPE type = 0;
    CK_ATTRIBUTE attrs[] = {
        {CKA_SENSITIVE, &sensitive, 1},
        {CKA_EXTRACTABLE, &extractable, 1},
        {CKA_WRAP_WITH_TRUSTED, &trusted, 1},
        {CKA_TOKEN, &token, 1},
        {CKA_PRIVATE, &priv, 1},
        {CKA_ALWAYS_SENSITIVE, &always, 1},
        {CKA_NEVER_EXTRACTABLE, &never_extractable, 1},
        {CKA_WRAP, &wrap, 1},
        {CKA_VALUE_LEN, &len, sizeof(len)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
    };
    assert_int_equal(m->C_GetAttributeValue(s, key, attrs, sizeof(attrs) / sizeof(attrs[0])),
                     CKR_OK);
    assert_true(sensitive);
    assert_true(extractable);
    assert_true(trusted);
    assert_true(token);
    assert_true(priv);
    assert_true(always);
    assert_false(never_extractable);
    assert_false(wrap);
    assert_int_equal(len, 32);
    assert_int_equal(type, CKK_AES);

    /* Wrapping it under an ordinary (untrusted) key is refused. */
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES;
    CK_ULONG kek_len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE kek_tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)}, {CKA_KEY_TYPE, &aes, sizeof(aes)},
        {CKA_VALUE_LEN, &kek_len, sizeof(kek_len)}, {CKA_TOKEN, &no, 1},
        {CKA_WRAP, &yes, 1},
    };
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE kek = CK_INVALID_HANDLE;
    assert_int_equal(m->C_GenerateKey(s, &gen, kek_tmpl, 5, &kek), CKR_OK);
    CK_MECHANISM kwp = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
    uint8_t wrapped[128];
    CK_ULONG wrapped_len = sizeof(wrapped);
    assert_int_not_equal(m->C_WrapKey(s, &kwp, kek, key, wrapped, &wrapped_len), CKR_OK);

    m->C_CloseSession(s);
    p11_kit_module_finalize(m);
    p11_kit_module_release(m);
}

struct worker {
    struct hsm *hsm;
    int failures;
};

static void *worker_run(void *arg)
{
    struct worker *w = arg;
    for (int i = 0; i < 200; i++) {
        uint8_t pt[32], back[32];
        uint8_t *ct = NULL;
        size_t ct_len = 0, back_len = 0;
        memset(pt, i, sizeof(pt));
        if (hsm_mwk_encrypt(w->hsm, pt, 4, pt, sizeof(pt), &ct, &ct_len) != 0 ||
            hsm_mwk_decrypt(w->hsm, pt, 4, ct, ct_len, back, &back_len) != 0 ||
            back_len != sizeof(pt) || memcmp(back, pt, sizeof(pt)) != 0)
            w->failures++;
        free(ct);
    }
    return NULL;
}

static void test_threads_share_one_handle(void **state)
{
    (void)state;
    struct hsm *hsm = open_with_mwk("mwk-main");
    pthread_t threads[4];
    struct worker workers[4];
    for (int i = 0; i < 4; i++) {
        workers[i] = (struct worker){hsm, 0};
        assert_int_equal(pthread_create(&threads[i], NULL, worker_run, &workers[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(workers[i].failures, 0);
    }
    hsm_close(hsm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_token_twice_is_eexist),
        cmocka_unit_test(test_init_token_rejects_long_label),
        cmocka_unit_test(test_second_token_gets_its_own_slot),
        cmocka_unit_test(test_open_unknown_label),
        cmocka_unit_test(test_open_wrong_pin),
        cmocka_unit_test(test_open_bad_module),
        cmocka_unit_test(test_mwk_lifecycle),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_tampering_is_eauth),
        cmocka_unit_test(test_reopen_decrypts),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_mwk_attributes),
        cmocka_unit_test(test_threads_share_one_handle),
    };
    return cmocka_run_group_tests(tests, setup_token_dir, remove_token_dir);
}
