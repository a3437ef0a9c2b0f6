/* test_hsm.c: hsm against a real SoftHSM token in a temporary directory. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <p11-kit/pkcs11.h>
#include <p11-kit/p11-kit.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
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

/* Reads attributes of the MWK through a session of our own, on |label|. */
static CK_FUNCTION_LIST *raw_open_token(const char *label, CK_SESSION_HANDLE *out_session)
{
    CK_FUNCTION_LIST *m = p11_kit_module_load(MODULE, 0);
    assert_non_null(m);
    assert_int_equal(p11_kit_module_initialize(m), CKR_OK);
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    assert_int_equal(m->C_GetSlotList(CK_TRUE, slots, &n), CKR_OK);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        assert_int_equal(m->C_GetTokenInfo(slots[i], &info), CKR_OK);
        if (memcmp(info.label, label, strlen(label)) == 0 && info.label[strlen(label)] == ' ') {
            assert_int_equal(m->C_OpenSession(slots[i], CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                              NULL, NULL, out_session),
                             CKR_OK);
            return m;
        }
    }
    fail_msg("token %s not found", label);
    return NULL;
}

static CK_FUNCTION_LIST *raw_open(CK_SESSION_HANDLE *out_session)
{
    return raw_open_token(TOKEN, out_session);
}

static void raw_close(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE s)
{
    m->C_CloseSession(s);
    p11_kit_module_finalize(m);
    p11_kit_module_release(m);
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

/* --- MWK copy between tokens ------------------------------------------------- */

static const uint8_t copy_pt[32] = "domain key that must cross HSMs";
static const uint8_t copy_aad[] = "keyraft-domain-v1copy";

/* A fresh token (all copy tests share the SO and user PINs). */
static void make_token(const char *label)
{
    assert_int_equal(hsm_init_token(MODULE, label, SO_PIN, PIN), 0);
}

static struct hsm *open_token(const char *label)
{
    struct hsm_config cfg = {MODULE, label, PIN, "mwk"};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), 0);
    return hsm;
}

/* A new token with a fresh MWK; no handle is left open on it. */
static void make_token_with_mwk(const char *label)
{
    make_token(label);
    struct hsm *hsm = open_token(label);
    assert_int_equal(hsm_generate_mwk(hsm), 0);
    hsm_close(hsm);
}

/* Encrypts copy_pt under the MWK of the open handle. */
static uint8_t *encrypt_on(struct hsm *hsm, size_t *out_len)
{
    uint8_t *ct = NULL;
    assert_int_equal(
        hsm_mwk_encrypt(hsm, copy_aad, sizeof(copy_aad), copy_pt, sizeof(copy_pt), &ct, out_len),
        0);
    return ct;
}

/* Decrypts |ct| with the MWK of the open handle; returns the status. */
static int decrypt_on(struct hsm *hsm, const uint8_t *ct, size_t ct_len)
{
    uint8_t back[sizeof(copy_pt)];
    size_t back_len = 0;
    int rc = hsm_mwk_decrypt(hsm, copy_aad, sizeof(copy_aad), ct, ct_len, back, &back_len);
    if (rc == 0) {
        assert_int_equal(back_len, sizeof(copy_pt));
        assert_memory_equal(back, copy_pt, sizeof(copy_pt));
    }
    return rc;
}

static uint8_t *wrap_for(const char *from, const uint8_t *spki, size_t spki_len,
                         size_t *out_len)
{
    uint8_t *blob = NULL;
    assert_int_equal(
        hsm_wrap_mwk_for(MODULE, from, SO_PIN, PIN, "mwk", spki, spki_len, &blob, out_len), 0);
    assert_non_null(blob);
    return blob;
}

/* The whole copy: |to| makes a transport key, |from| wraps for it, |to|
 * unwraps. No handle may be open on |from| (see hsm_wrap_mwk_for). */
static void copy_mwk(const char *from, const char *to)
{
    struct hsm *dst = open_token(to);
    uint8_t *spki = NULL, *blob = NULL;
    size_t spki_len = 0, blob_len = 0;
    assert_int_equal(hsm_make_transport_key(dst, "transport", &spki, &spki_len), 0);
    blob = wrap_for(from, spki, spki_len, &blob_len);
    assert_int_equal(hsm_unwrap_mwk(dst, "transport", blob, blob_len), 0);
    hsm_close(dst);
    free(spki);
    free(blob);
}

static CK_ULONG raw_count(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE s, const char *label)
{
    CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE found[8];
    CK_ULONG n = 0;
    assert_int_equal(m->C_FindObjectsInit(s, tmpl, 1), CKR_OK);
    assert_int_equal(m->C_FindObjects(s, found, 8, &n), CKR_OK);
    assert_int_equal(m->C_FindObjectsFinal(s), CKR_OK);
    return n;
}

static CK_OBJECT_HANDLE raw_find_class(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE s,
                                       const char *label, CK_OBJECT_CLASS cls)
{
    CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, (void *)label, strlen(label)},
                           {CKA_CLASS, &cls, sizeof(cls)}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG n = 0;
    assert_int_equal(m->C_FindObjectsInit(s, tmpl, 2), CKR_OK);
    assert_int_equal(m->C_FindObjects(s, &h, 1, &n), CKR_OK);
    assert_int_equal(m->C_FindObjectsFinal(s), CKR_OK);
    assert_int_equal(n, 1);
    return h;
}

static EVP_PKEY *parse_spki(const uint8_t *spki, size_t len)
{
    const unsigned char *p = spki;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)len);
    assert_non_null(pkey);
    assert_ptr_equal(p, spki + len);
    return pkey;
}

static void test_transport_key(void **state)
{
    (void)state;
    make_token("kr-xfer-t");
    struct hsm *hsm = open_token("kr-xfer-t");
    uint8_t *spki = NULL, *again = (uint8_t *)"untouched";
    size_t spki_len = 0, again_len = 7;
    assert_int_equal(hsm_make_transport_key(hsm, "tk", &spki, &spki_len), 0);
    assert_int_equal(hsm_make_transport_key(hsm, "tk", &again, &again_len), KR_EEXIST);
    assert_string_equal((char *)again, "untouched");
    assert_int_equal(again_len, 7);
    assert_int_equal(hsm_make_transport_key(hsm, "", &again, &again_len), KR_EINVAL);

    /* A DER SubjectPublicKeyInfo of an RSA-2048 key, e = 65537. */
    EVP_PKEY *pkey = parse_spki(spki, spki_len);
    assert_true(EVP_PKEY_is_a(pkey, "RSA"));
    assert_int_equal(EVP_PKEY_get_bits(pkey), 2048);
    BIGNUM *n = NULL, *e = NULL;
    assert_true(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &n));
    assert_true(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, &e));
    assert_true(BN_is_word(e, 65537));

    /* It is the token's key, and the private half never leaves it. */
    hsm_close(hsm);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open_token("kr-xfer-t", &s);
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    CK_OBJECT_HANDLE pub = raw_find_class(m, s, "tk", CKO_PUBLIC_KEY);
    CK_OBJECT_HANDLE priv = raw_find_class(m, s, "tk", CKO_PRIVATE_KEY);
    uint8_t modulus[256];
    CK_BBOOL wrap = 0, encrypt = 1, token = 0;
    CK_ATTRIBUTE pub_attrs[] = {
        {CKA_MODULUS, modulus, sizeof(modulus)},
        {CKA_WRAP, &wrap, 1},
        {CKA_ENCRYPT, &encrypt, 1},
        {CKA_TOKEN, &token, 1},
    };
    assert_int_equal(m->C_GetAttributeValue(s, pub, pub_attrs, 4), CKR_OK);
    uint8_t n_bin[256];
    assert_int_equal(BN_bn2binpad(n, n_bin, sizeof(n_bin)), 256);
    assert_memory_equal(modulus, n_bin, sizeof(modulus));
    assert_true(wrap);
    assert_false(encrypt);
    assert_true(token);

    CK_BBOOL sensitive = 0, extractable = 1, unwrap = 0, decrypt = 1, priv_flag = 0, sign = 1;
    CK_ATTRIBUTE priv_attrs[] = {
        {CKA_SENSITIVE, &sensitive, 1}, {CKA_EXTRACTABLE, &extractable, 1},
        {CKA_UNWRAP, &unwrap, 1},       {CKA_DECRYPT, &decrypt, 1},
        {CKA_PRIVATE, &priv_flag, 1},   {CKA_SIGN, &sign, 1},
    };
    assert_int_equal(m->C_GetAttributeValue(s, priv, priv_attrs, 6), CKR_OK);
    assert_true(sensitive);
    assert_false(extractable);
    assert_true(unwrap);
    assert_false(decrypt);
    assert_true(priv_flag);
    assert_false(sign);
    uint8_t d[512];
    CK_ATTRIBUTE get_d = {CKA_PRIVATE_EXPONENT, d, sizeof(d)};
    assert_int_equal(m->C_GetAttributeValue(s, priv, &get_d, 1), CKR_ATTRIBUTE_SENSITIVE);
    raw_close(m, s);

    BN_free(n);
    BN_free(e);
    EVP_PKEY_free(pkey);
    free(spki);
}

static void test_mwk_copy_round_trip(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-a");
    make_token("kr-xfer-b");

    struct hsm *b = open_token("kr-xfer-b");
    uint8_t *spki = NULL;
    size_t spki_len = 0, blob_len = 0;
    assert_int_equal(hsm_make_transport_key(b, "transport", &spki, &spki_len), 0);
    uint8_t *blob = wrap_for("kr-xfer-a", spki, spki_len, &blob_len);
    assert_int_equal(blob_len, 256); /* one RSA-2048 block */
    assert_int_equal(hsm_find_mwk(b), KR_ENOTFOUND);
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len), 0);
    assert_int_equal(hsm_find_mwk(b), 0);

    /* Same key both ways: A's ciphertext opens on B, B's on A. */
    struct hsm *a = open_token("kr-xfer-a");
    size_t ct_a_len = 0, ct_b_len = 0;
    uint8_t *ct_a = encrypt_on(a, &ct_a_len);
    uint8_t *ct_b = encrypt_on(b, &ct_b_len);
    assert_int_equal(decrypt_on(b, ct_a, ct_a_len), 0);
    assert_int_equal(decrypt_on(a, ct_b, ct_b_len), 0);

    /* The transport key is gone: the blob cannot be replayed into B, and a
     * second MWK is refused. */
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len), KR_EEXIST);
    hsm_close(b);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open_token("kr-xfer-b", &s);
    assert_int_equal(raw_count(m, s, "transport"), 0);
    raw_close(m, s);

    /* Still the same after a restart of B. */
    b = open_token("kr-xfer-b");
    assert_int_equal(decrypt_on(b, ct_a, ct_a_len), 0);
    hsm_close(b);
    hsm_close(a);
    free(ct_a);
    free(ct_b);
    free(spki);
    free(blob);
}

static void test_copied_mwk_attributes(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-attr-a");
    make_token("kr-xfer-attr-b");
    copy_mwk("kr-xfer-attr-a", "kr-xfer-attr-b");

    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open_token("kr-xfer-attr-b", &s);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    assert_int_equal(raw_find(m, s, "mwk", &key), 0); /* private: not before login */
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    assert_int_equal(raw_find(m, s, "mwk", &key), 1);

    uint8_t value[64];
    CK_ATTRIBUTE get_value = {CKA_VALUE, value, sizeof(value)};
    assert_int_equal(m->C_GetAttributeValue(s, key, &get_value, 1), CKR_ATTRIBUTE_SENSITIVE);
    CK_BBOOL sensitive = 0, extractable = 0, trusted = 0, token = 0, priv = 0;
    CK_BBOOL enc = 0, dec = 0, wrap = 1, unwrap = 1;
    CK_ULONG len = 0;
    CK_KEY_TYPE type = 0;
    CK_ATTRIBUTE attrs[] = {
        {CKA_SENSITIVE, &sensitive, 1}, {CKA_EXTRACTABLE, &extractable, 1},
        {CKA_WRAP_WITH_TRUSTED, &trusted, 1}, {CKA_TOKEN, &token, 1},
        {CKA_PRIVATE, &priv, 1},        {CKA_ENCRYPT, &enc, 1},
        {CKA_DECRYPT, &dec, 1},         {CKA_WRAP, &wrap, 1},
        {CKA_UNWRAP, &unwrap, 1},       {CKA_VALUE_LEN, &len, sizeof(len)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
    };
    assert_int_equal(m->C_GetAttributeValue(s, key, attrs, sizeof(attrs) / sizeof(attrs[0])),
                     CKR_OK);
    assert_true(sensitive);
    assert_true(extractable);
    assert_true(trusted);
    assert_true(token);
    assert_true(priv);
    assert_true(enc);
    assert_true(dec);
    assert_false(wrap);
    assert_false(unwrap);
    /* SoftHSM leaves CKA_VALUE_LEN 0 on an unwrapped key: the round trip
     * with the source token is what shows it is the same 32-byte key. */
    assert_true(len == 0 || len == 32);
    assert_int_equal(type, CKK_AES);
    raw_close(m, s);
}

/* The copy is itself copyable: A -> B -> C, and C opens A's ciphertext. */
static void test_copy_chains_on(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-chain-a");
    make_token("kr-xfer-chain-b");
    make_token("kr-xfer-chain-c");
    copy_mwk("kr-xfer-chain-a", "kr-xfer-chain-b");
    copy_mwk("kr-xfer-chain-b", "kr-xfer-chain-c");

    struct hsm *a = open_token("kr-xfer-chain-a");
    size_t ct_len = 0;
    uint8_t *ct = encrypt_on(a, &ct_len);
    hsm_close(a);
    struct hsm *c = open_token("kr-xfer-chain-c");
    assert_int_equal(decrypt_on(c, ct, ct_len), 0);
    hsm_close(c);
    free(ct);
}

static void test_blob_opens_only_on_its_token(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-only-a");
    make_token("kr-xfer-only-b");
    make_token("kr-xfer-only-c");
    struct hsm *b = open_token("kr-xfer-only-b");
    struct hsm *c = open_token("kr-xfer-only-c");
    uint8_t *spki_b = NULL, *spki_c = NULL;
    size_t spki_b_len = 0, spki_c_len = 0, blob_len = 0;
    assert_int_equal(hsm_make_transport_key(b, "transport", &spki_b, &spki_b_len), 0);
    assert_int_equal(hsm_make_transport_key(c, "transport", &spki_c, &spki_c_len), 0);
    uint8_t *blob_b = wrap_for("kr-xfer-only-a", spki_b, spki_b_len, &blob_len);

    /* B's blob does not open on C, and leaves C without an MWK. */
    assert_int_equal(hsm_unwrap_mwk(c, "transport", blob_b, blob_len), KR_EAUTH);
    assert_int_equal(hsm_find_mwk(c), KR_ENOTFOUND);
    /* C's transport key survives the failure: its own blob still works. */
    size_t blob_c_len = 0;
    uint8_t *blob_c = wrap_for("kr-xfer-only-a", spki_c, spki_c_len, &blob_c_len);
    assert_memory_not_equal(blob_b, blob_c, blob_len);
    assert_int_equal(hsm_unwrap_mwk(c, "transport", blob_c, blob_c_len), 0);
    assert_int_equal(hsm_find_mwk(c), 0);
    /* And C's blob does not open on B. */
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob_c, blob_c_len), KR_EAUTH);
    assert_int_equal(hsm_find_mwk(b), KR_ENOTFOUND);

    hsm_close(b);
    hsm_close(c);
    free(spki_b);
    free(spki_c);
    free(blob_b);
    free(blob_c);
}

static void test_tampered_blob_is_eauth(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-tamper-a");
    make_token("kr-xfer-tamper-b");
    struct hsm *b = open_token("kr-xfer-tamper-b");
    uint8_t *spki = NULL;
    size_t spki_len = 0, blob_len = 0;
    assert_int_equal(hsm_make_transport_key(b, "transport", &spki, &spki_len), 0);
    uint8_t *blob = wrap_for("kr-xfer-tamper-a", spki, spki_len, &blob_len);

    const size_t where[] = {0, 1, 100, blob_len - 1};
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]); i++) {
        blob[where[i]] ^= 0x01;
        assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len), KR_EAUTH);
        blob[where[i]] ^= 0x01;
    }
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len - 1), KR_EAUTH);
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, 0), KR_EAUTH);
    assert_int_equal(hsm_find_mwk(b), KR_ENOTFOUND);
    /* The untouched blob still opens. */
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len), 0);
    assert_int_equal(hsm_find_mwk(b), 0);
    hsm_close(b);
    free(spki);
    free(blob);
}

/* What keeps the MWK from an attacker's key: the token wraps it only under a
 * key the SO marked trusted, and a user cannot mark one. */
static void test_untrusted_key_cannot_wrap_mwk(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-untrusted");
    struct hsm *hsm = open_token("kr-xfer-untrusted");
    uint8_t *spki = NULL;
    size_t spki_len = 0;
    assert_int_equal(hsm_make_transport_key(hsm, "attacker", &spki, &spki_len), 0);
    hsm_close(hsm);
    EVP_PKEY *pkey = parse_spki(spki, spki_len);
    BIGNUM *n = NULL;
    assert_true(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &n));
    uint8_t n_bin[256], e_bin[] = {1, 0, 1};
    assert_int_equal(BN_bn2binpad(n, n_bin, sizeof(n_bin)), 256);

    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open_token("kr-xfer-untrusted", &s);
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    CK_OBJECT_HANDLE mwk = CK_INVALID_HANDLE;
    assert_int_equal(raw_find(m, s, "mwk", &mwk), 1);
    CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
    CK_KEY_TYPE rsa = CKK_RSA;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)}, {CKA_KEY_TYPE, &rsa, sizeof(rsa)},
        {CKA_TOKEN, &no, 1},            {CKA_WRAP, &yes, 1},
        {CKA_MODULUS, n_bin, 256},      {CKA_PUBLIC_EXPONENT, e_bin, 3},
        {CKA_TRUSTED, &yes, 1},
    };
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE;
    /* The user cannot mark a key trusted... */
    assert_int_equal(m->C_CreateObject(s, tmpl, 7, &pub), CKR_ATTRIBUTE_READ_ONLY);
    /* ...and under an untrusted wrapping key the token refuses. */
    assert_int_equal(m->C_CreateObject(s, tmpl, 6, &pub), CKR_OK);
    CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};
    CK_MECHANISM mech = {CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    uint8_t blob[512];
    CK_ULONG blob_len = sizeof(blob);
    assert_int_equal(m->C_WrapKey(s, &mech, pub, mwk, blob, &blob_len), CKR_KEY_NOT_WRAPPABLE);
    assert_int_equal(m->C_DestroyObject(s, pub), CKR_OK);
    raw_close(m, s);
    BN_free(n);
    EVP_PKEY_free(pkey);
    free(spki);
}

/* An SPKI of a freshly generated OpenSSL key of |type| ("RSA" with |bits|,
 * or "EC"). */
static uint8_t *openssl_spki(const char *type, int bits, size_t *out_len)
{
    EVP_PKEY *pkey = strcmp(type, "RSA") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits)
                                              : EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(pkey);
    int len = i2d_PUBKEY(pkey, NULL);
    assert_true(len > 0);
    uint8_t *der = malloc((size_t)len), *p = der;
    assert_int_equal(i2d_PUBKEY(pkey, &p), len);
    EVP_PKEY_free(pkey);
    *out_len = (size_t)len;
    return der;
}

static void test_wrap_refusals(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-refuse");
    const char *tok = "kr-xfer-refuse";
    size_t spki_len = 0, rsa1024_len = 0, ec_len = 0;
    uint8_t *spki = openssl_spki("RSA", 2048, &spki_len);
    uint8_t *rsa1024 = openssl_spki("RSA", 1024, &rsa1024_len);
    uint8_t *ec = openssl_spki("EC", 0, &ec_len);
    uint8_t *blob = (uint8_t *)"untouched";
    size_t blob_len = 9;

    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, "wrong-so-pin", PIN, "mwk", spki, spki_len,
                                      &blob, &blob_len),
                     KR_EPERM);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, SO_PIN, "wrong-user-pin", "mwk", spki,
                                      spki_len, &blob, &blob_len),
                     KR_EPERM);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, SO_PIN, PIN, "no-such-mwk", spki, spki_len,
                                      &blob, &blob_len),
                     KR_ENOTFOUND);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, "kr-no-such-token", SO_PIN, PIN, "mwk", spki,
                                      spki_len, &blob, &blob_len),
                     KR_ENOTFOUND);
    /* Only an RSA key of 2048 bits or more is a recipient. */
    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, SO_PIN, PIN, "mwk", rsa1024, rsa1024_len,
                                      &blob, &blob_len),
                     KR_EINVAL);
    assert_int_equal(
        hsm_wrap_mwk_for(MODULE, tok, SO_PIN, PIN, "mwk", ec, ec_len, &blob, &blob_len),
        KR_EINVAL);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, SO_PIN, PIN, "mwk", spki, spki_len - 1, &blob,
                                      &blob_len),
                     KR_EINVAL);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, tok, SO_PIN, PIN, "mwk", (const uint8_t *)"junk",
                                      4, &blob, &blob_len),
                     KR_EINVAL);
    assert_string_equal((char *)blob, "untouched");
    assert_int_equal(blob_len, 9);

    /* No failure left a recipient key or a login behind: it still works. */
    blob = wrap_for(tok, spki, spki_len, &blob_len);
    assert_int_equal(blob_len, 256);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open_token(tok, &s);
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    assert_int_equal(raw_count(m, s, "keyraft-mwk-recipient"), 0);
    raw_close(m, s);
    free(blob);
    free(spki);
    free(rsa1024);
    free(ec);
}

static void test_wrap_while_handle_open_is_ebusy(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-busy");
    size_t spki_len = 0, blob_len = 0, ct_len = 0;
    uint8_t *spki = openssl_spki("RSA", 2048, &spki_len);
    uint8_t *blob = NULL;

    struct hsm *hsm = open_token("kr-xfer-busy");
    uint8_t *ct = encrypt_on(hsm, &ct_len);
    assert_int_equal(hsm_wrap_mwk_for(MODULE, "kr-xfer-busy", SO_PIN, PIN, "mwk", spki,
                                      spki_len, &blob, &blob_len),
                     KR_EBUSY);
    assert_null(blob);
    /* The open handle was not logged out. */
    assert_int_equal(decrypt_on(hsm, ct, ct_len), 0);
    hsm_close(hsm);

    /* Closed: now it works, and the reopened handle works too. */
    blob = wrap_for("kr-xfer-busy", spki, spki_len, &blob_len);
    hsm = open_token("kr-xfer-busy");
    assert_int_equal(decrypt_on(hsm, ct, ct_len), 0);
    hsm_close(hsm);
    free(ct);
    free(blob);
    free(spki);
}

/* A running member admits a node while it holds its own login: its handle
 * works again after, and the new token decrypts what the member encrypted. */
static void test_admit_wrap_with_open_handle(void **state)
{
    (void)state;
    make_token_with_mwk("kr-admit-a");
    assert_int_equal(hsm_init_token(MODULE, "kr-admit-b", SO_PIN, PIN), 0);
    struct hsm *member = open_token("kr-admit-a");
    struct hsm *joiner = open_token("kr-admit-b");
    uint8_t *spki = NULL, *blob = NULL;
    size_t spki_len = 0, blob_len = 0, ct_len = 0;
    assert_int_equal(hsm_make_transport_key(joiner, "transport", &spki, &spki_len), 0);
    uint8_t *ct = encrypt_on(member, &ct_len);
    assert_int_equal(hsm_admit_wrap_mwk(member, MODULE, "kr-admit-a", "wrong-so-pin", PIN, spki,
                                        spki_len, &blob, &blob_len),
                     KR_EPERM);
    assert_null(blob);
    assert_int_equal(decrypt_on(member, ct, ct_len), 0); /* back after a failure too */
    assert_int_equal(hsm_admit_wrap_mwk(member, MODULE, "kr-admit-a", SO_PIN, PIN, spki,
                                        spki_len, &blob, &blob_len),
                     0);
    assert_non_null(blob);
    assert_int_equal(decrypt_on(member, ct, ct_len), 0);
    assert_int_equal(hsm_unwrap_mwk(joiner, "transport", blob, blob_len), 0);
    assert_int_equal(hsm_find_mwk(joiner), 0);
    assert_int_equal(decrypt_on(joiner, ct, ct_len), 0);
    hsm_close(joiner);
    hsm_close(member);
    free(ct);
    free(blob);
    free(spki);
}

/* Child mode: a running node in another process, holding the user login on
 * |token| until stdin closes, then proving its handle still works. */
static int hold_login(const char *token)
{
    struct hsm_config cfg = {MODULE, token, PIN, "mwk"};
    struct hsm *hsm = NULL;
    if (hsm_open(&cfg, &hsm) != 0 || hsm_find_mwk(hsm) != 0)
        return 2;
    if (write(STDOUT_FILENO, "R", 1) != 1)
        return 3;
    char c;
    while (read(STDIN_FILENO, &c, 1) > 0)
        ;
    uint8_t *ct = NULL, back[sizeof(copy_pt)];
    size_t ct_len = 0, back_len = 0;
    int rc = hsm_mwk_encrypt(hsm, NULL, 0, copy_pt, sizeof(copy_pt), &ct, &ct_len);
    if (rc == 0)
        rc = hsm_mwk_decrypt(hsm, NULL, 0, ct, ct_len, back, &back_len);
    free(ct);
    hsm_close(hsm);
    return rc == 0 ? 0 : 4;
}

static void test_wrap_while_other_process_holds_login(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-proc");
    int to_child[2], from_child[2];
    assert_int_equal(pipe(to_child), 0);
    assert_int_equal(pipe(from_child), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(to_child[0], STDIN_FILENO);
        dup2(from_child[1], STDOUT_FILENO);
        close(to_child[1]);
        close(from_child[0]);
        execl("/proc/self/exe", "test_hsm", "--hold-login", "kr-xfer-proc", (char *)NULL);
        _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    char ready = 0;
    assert_int_equal(read(from_child[0], &ready, 1), 1);
    assert_int_equal(ready, 'R');

    size_t spki_len = 0, blob_len = 0;
    uint8_t *spki = openssl_spki("RSA", 2048, &spki_len);
    uint8_t *blob = wrap_for("kr-xfer-proc", spki, spki_len, &blob_len);
    assert_int_equal(blob_len, 256);

    close(to_child[1]);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    close(from_child[0]);
    free(spki);
    free(blob);
}

static void test_unwrap_refusals(void **state)
{
    (void)state;
    make_token_with_mwk("kr-xfer-un-a");
    make_token_with_mwk("kr-xfer-un-b"); /* already has an MWK of its own */
    struct hsm *b = open_token("kr-xfer-un-b");
    uint8_t *spki = NULL;
    size_t spki_len = 0, blob_len = 0, ct_len = 0;
    uint8_t *ct = encrypt_on(b, &ct_len);
    assert_int_equal(hsm_make_transport_key(b, "transport", &spki, &spki_len), 0);
    uint8_t *blob = wrap_for("kr-xfer-un-a", spki, spki_len, &blob_len);
    assert_int_equal(hsm_unwrap_mwk(b, "transport", blob, blob_len), KR_EEXIST);
    assert_int_equal(decrypt_on(b, ct, ct_len), 0); /* B's own MWK is untouched */
    assert_int_equal(hsm_unwrap_mwk(b, "no-such-transport", blob, blob_len), KR_EEXIST);
    hsm_close(b);

    make_token("kr-xfer-un-c");
    struct hsm *c = open_token("kr-xfer-un-c");
    assert_int_equal(hsm_unwrap_mwk(c, "no-such-transport", blob, blob_len), KR_ENOTFOUND);
    assert_int_equal(hsm_unwrap_mwk(c, "", blob, blob_len), KR_EINVAL);
    assert_int_equal(hsm_unwrap_mwk(c, "transport", NULL, 0), KR_EINVAL);
    hsm_close(c);
    free(ct);
    free(spki);
    free(blob);
}

/* --- the audit signing key ------------------------------------------------------ */

static EVP_PKEY *spki_to_pkey(const uint8_t *spki, size_t len)
{
    const unsigned char *p = spki;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)len);
    assert_non_null(pkey);
    assert_ptr_equal(p, spki + len);
    return pkey;
}

/* 1 when |sig| is a valid ECDSA signature of |digest| under |spki|. */
static int ecdsa_verifies(const uint8_t *spki, size_t spki_len, const uint8_t digest[32],
                          const uint8_t *sig, size_t sig_len)
{
    EVP_PKEY *pkey = spki_to_pkey(spki, spki_len);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    assert_non_null(ctx);
    assert_int_equal(EVP_PKEY_verify_init(ctx), 1);
    int ok = EVP_PKEY_verify(ctx, sig, sig_len, digest, 32) == 1;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(pkey);
    return ok;
}

static void test_audit_key(void **state)
{
    (void)state;
    struct hsm *hsm = open_hsm("mwk-audit-t");
    uint8_t *spki = NULL, *spki2 = NULL, *sig = NULL;
    size_t spki_len = 0, spki2_len = 0, sig_len = 0;
    uint8_t digest[32];
    for (size_t i = 0; i < sizeof(digest); i++)
        digest[i] = (uint8_t)(i * 7 + 1);

    /* Nothing to use before it is made. */
    assert_int_equal(hsm_audit_public_key(hsm, &spki, &spki_len), KR_ENOTFOUND);
    assert_int_equal(hsm_audit_sign(hsm, digest, &sig, &sig_len), KR_ENOTFOUND);

    assert_int_equal(hsm_audit_key_ensure(hsm), 0);
    assert_int_equal(hsm_audit_public_key(hsm, &spki, &spki_len), 0);
    EVP_PKEY *pkey = spki_to_pkey(spki, spki_len);
    assert_true(EVP_PKEY_is_a(pkey, "EC"));
    char group[64];
    size_t group_len = 0;
    assert_int_equal(EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                                    sizeof(group), &group_len),
                     1);
    assert_string_equal(group, "prime256v1");
    EVP_PKEY_free(pkey);

    /* Idempotent: the same key, from this handle and from a fresh one. */
    assert_int_equal(hsm_audit_key_ensure(hsm), 0);
    assert_int_equal(hsm_audit_public_key(hsm, &spki2, &spki2_len), 0);
    assert_int_equal(spki2_len, spki_len);
    assert_memory_equal(spki2, spki, spki_len);
    free(spki2);
    spki2 = NULL;
    hsm_close(hsm);
    hsm = open_hsm("mwk-audit-t");
    assert_int_equal(hsm_audit_key_ensure(hsm), 0);
    assert_int_equal(hsm_audit_public_key(hsm, &spki2, &spki2_len), 0);
    assert_int_equal(spki2_len, spki_len);
    assert_memory_equal(spki2, spki, spki_len);
    free(spki2);

    /* Another MWK label is another audit key. */
    struct hsm *other = open_hsm("mwk-audit-u");
    assert_int_equal(hsm_audit_key_ensure(other), 0);
    assert_int_equal(hsm_audit_public_key(other, &spki2, &spki2_len), 0);
    assert_false(spki2_len == spki_len && memcmp(spki2, spki, spki_len) == 0);
    free(spki2);
    hsm_close(other);

    /* Signatures verify with OpenSSL against the SPKI, and only for their digest. */
    assert_int_equal(hsm_audit_sign(hsm, digest, &sig, &sig_len), 0);
    assert_true(sig_len >= 8 && sig_len <= 72);
    assert_int_equal(sig[0], 0x30); /* DER SEQUENCE, not raw r|s */
    assert_true(ecdsa_verifies(spki, spki_len, digest, sig, sig_len));
    digest[5] ^= 0x01;
    assert_false(ecdsa_verifies(spki, spki_len, digest, sig, sig_len));
    digest[5] ^= 0x01;
    sig[sig_len - 1] ^= 0x01;
    assert_false(ecdsa_verifies(spki, spki_len, digest, sig, sig_len));
    free(sig);
    hsm_close(hsm);
    free(spki);
}

/* The private half: signs only, never readable or extractable. */
static void test_audit_key_attributes(void **state)
{
    (void)state;
    struct hsm *hsm = open_hsm("mwk-audit-a");
    assert_int_equal(hsm_audit_key_ensure(hsm), 0);
    hsm_close(hsm);

    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *m = raw_open(&s);
    assert_int_equal(m->C_Login(s, CKU_USER, (CK_UTF8CHAR *)PIN, strlen(PIN)), CKR_OK);
    const char *label = "mwk-audit-a-audit";
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;
    assert_int_equal(m->C_FindObjectsInit(s, tmpl, 2), CKR_OK);
    assert_int_equal(m->C_FindObjects(s, found, 2, &n), CKR_OK);
    assert_int_equal(m->C_FindObjectsFinal(s), CKR_OK);
    assert_int_equal(n, 1);

    uint8_t value[128];
    CK_ATTRIBUTE get_value = {CKA_VALUE, value, sizeof(value)};
    assert_int_equal(m->C_GetAttributeValue(s, found[0], &get_value, 1), CKR_ATTRIBUTE_SENSITIVE);

    CK_BBOOL sensitive = 0, extractable = 1, never_extractable = 0, token = 0, priv = 0;
    CK_BBOOL sign = 0, decrypt = 1, unwrap = 1, derive = 1;
    CK_KEY_TYPE type = 0;
    CK_ATTRIBUTE attrs[] = {
        {CKA_SENSITIVE, &sensitive, 1},
        {CKA_EXTRACTABLE, &extractable, 1},
        {CKA_NEVER_EXTRACTABLE, &never_extractable, 1},
        {CKA_TOKEN, &token, 1},
        {CKA_PRIVATE, &priv, 1},
        {CKA_SIGN, &sign, 1},
        {CKA_DECRYPT, &decrypt, 1},
        {CKA_UNWRAP, &unwrap, 1},
        {CKA_DERIVE, &derive, 1},
        {CKA_KEY_TYPE, &type, sizeof(type)},
    };
    assert_int_equal(m->C_GetAttributeValue(s, found[0], attrs, sizeof(attrs) / sizeof(attrs[0])),
                     CKR_OK);
    assert_true(sensitive);
    assert_false(extractable);
    assert_true(never_extractable);
    assert_true(token);
    assert_true(priv);
    assert_true(sign);
    assert_false(decrypt);
    assert_false(unwrap);
    assert_false(derive);
    assert_int_equal(type, CKK_EC);

    /* Exactly one public half, on the token. */
    cls = CKO_PUBLIC_KEY;
    assert_int_equal(m->C_FindObjectsInit(s, tmpl, 2), CKR_OK);
    assert_int_equal(m->C_FindObjects(s, found, 2, &n), CKR_OK);
    assert_int_equal(m->C_FindObjectsFinal(s), CKR_OK);
    assert_int_equal(n, 1);
    raw_close(m, s);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--hold-login") == 0)
        return hold_login(argv[2]);
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
        cmocka_unit_test(test_transport_key),
        cmocka_unit_test(test_mwk_copy_round_trip),
        cmocka_unit_test(test_copied_mwk_attributes),
        cmocka_unit_test(test_copy_chains_on),
        cmocka_unit_test(test_blob_opens_only_on_its_token),
        cmocka_unit_test(test_tampered_blob_is_eauth),
        cmocka_unit_test(test_untrusted_key_cannot_wrap_mwk),
        cmocka_unit_test(test_wrap_refusals),
        cmocka_unit_test(test_wrap_while_handle_open_is_ebusy),
        cmocka_unit_test(test_wrap_while_other_process_holds_login),
        cmocka_unit_test(test_admit_wrap_with_open_handle),
        cmocka_unit_test(test_unwrap_refusals),
        cmocka_unit_test(test_audit_key),
        cmocka_unit_test(test_audit_key_attributes),
    };
    return cmocka_run_group_tests(tests, setup_token_dir, remove_token_dir);
}
