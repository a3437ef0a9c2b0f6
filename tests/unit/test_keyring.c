/* test_keyring.c: domain keys under a SoftHSM MWK, and sealing bound to metadata. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "keyraft.h"
#include "keyring.h"

#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define TOKEN "kr-keyring-token"
#define PIN "user-pin-1234"
#define MWK "keyraft-mwk"
#define AES KEYRAFT__ALGORITHM__AES_256
#define HMAC KEYRAFT__ALGORITHM__HMAC_SHA256

static char tmpdir[64];

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static struct hsm *open_hsm(void)
{
    struct hsm_config cfg = {MODULE, TOKEN, PIN, MWK};
    struct hsm *hsm = NULL;
    if (hsm_open(&cfg, &hsm) != 0)
        return NULL;
    return hsm;
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/kr-test-keyring-XXXXXX");
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
    if (hsm_init_token(MODULE, TOKEN, "so-pin-0000", PIN) != 0)
        return -1;
    struct hsm *hsm = open_hsm();
    if (hsm == NULL)
        return -1;
    int rc = hsm_generate_mwk(hsm);
    hsm_close(hsm);
    return rc;
}

static int teardown(void **state)
{
    (void)state;
    return nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

struct fixture {
    struct hsm *hsm;
    struct keyring *keyring;
};

static int fixture_up(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    if (fx == NULL || (fx->hsm = open_hsm()) == NULL ||
        keyring_new(fx->hsm, &fx->keyring) != 0) {
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int fixture_down(void **state)
{
    struct fixture *fx = *state;
    keyring_free(fx->keyring);
    hsm_close(fx->hsm);
    free(fx);
    return 0;
}

static void create(struct keyring *keyring, const char *domain, uint8_t **wrapped,
                   size_t *wrapped_len)
{
    assert_int_equal(keyring_create_domain(keyring, domain, wrapped, wrapped_len), 0);
    assert_true(keyring_has_domain(keyring, domain));
}

static void seal(struct keyring *keyring, const char *domain, const char *key_id,
                 uint32_t version, crypto_alg alg, const uint8_t *material, size_t len,
                 uint8_t **sealed, size_t *sealed_len)
{
    assert_int_equal(keyring_seal(keyring, domain, key_id, version, alg, material, len, sealed,
                                  sealed_len),
                     0);
}

static void test_create_domain(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *again = NULL;
    size_t wrapped_len = 0, again_len = 0;
    assert_false(keyring_has_domain(fx->keyring, "tenant-a"));
    create(fx->keyring, "tenant-a", &wrapped, &wrapped_len);
    assert_int_equal(wrapped_len, HSM_GCM_IV_LEN + 32 + HSM_GCM_TAG_LEN);
    assert_false(keyring_has_domain(fx->keyring, "tenant-b"));
    /* A loaded domain key is never silently replaced. */
    assert_int_equal(keyring_create_domain(fx->keyring, "tenant-a", &again, &again_len),
                     KR_EEXIST);
    assert_null(again);
    free(wrapped);
}

static void test_seal_round_trip(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *s1 = NULL, *s2 = NULL, *big_sealed = NULL;
    size_t wrapped_len = 0, s1_len = 0, s2_len = 0, big_len = 0;
    const uint8_t material[32] = "aes-256 key material, 32 bytes";
    uint8_t big[1218];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i * 7);
    secbuf out = {NULL, 0};

    create(fx->keyring, "default", &wrapped, &wrapped_len);
    seal(fx->keyring, "default", "k-1", 1, AES, material, sizeof(material), &s1, &s1_len);
    assert_int_equal(s1_len, CRYPTO_GCM_NONCE_LEN + sizeof(material) + CRYPTO_GCM_TAG_LEN);
    assert_null(memmem(s1, s1_len, material, 8));
    seal(fx->keyring, "default", "k-1", 1, AES, material, sizeof(material), &s2, &s2_len);
    assert_memory_not_equal(s1, s2, s1_len);

    assert_int_equal(keyring_unseal(fx->keyring, "default", "k-1", 1, AES, s1, s1_len, &out), 0);
    assert_int_equal(out.len, sizeof(material));
    assert_memory_equal(out.data, material, sizeof(material));
    /* The caller's copy lives in the secure heap when there is one. */
    if (CRYPTO_secure_malloc_initialized())
        assert_true(CRYPTO_secure_allocated(out.data));
    secbuf_free(&out);
    assert_null(out.data);

    seal(fx->keyring, "default", "k-rsa", 3, KEYRAFT__ALGORITHM__RSA_2048, big, sizeof(big),
         &big_sealed, &big_len);
    assert_int_equal(
        keyring_unseal(fx->keyring, "default", "k-rsa", 3, KEYRAFT__ALGORITHM__RSA_2048,
                       big_sealed, big_len, &out),
        0);
    assert_int_equal(out.len, sizeof(big));
    assert_memory_equal(out.data, big, sizeof(big));
    secbuf_free(&out);

    free(wrapped);
    free(s1);
    free(s2);
    free(big_sealed);
}

static void test_unseal_other_metadata_is_eauth(void **state)
{
    struct fixture *fx = *state;
    uint8_t *w1 = NULL, *w2 = NULL, *sealed = NULL;
    size_t w1_len = 0, w2_len = 0, sealed_len = 0;
    const uint8_t material[32] = "bound to key k-7 version 2, AES";
    secbuf out = {(uint8_t *)"untouched", 9};

    create(fx->keyring, "dom-one", &w1, &w1_len);
    create(fx->keyring, "dom-two", &w2, &w2_len);
    seal(fx->keyring, "dom-one", "k-7", 2, AES, material, sizeof(material), &sealed,
         &sealed_len);

    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-one", "k-8", 2, AES, sealed, sealed_len, &out),
        KR_EAUTH);
    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-one", "k-7", 3, AES, sealed, sealed_len, &out),
        KR_EAUTH);
    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-one", "k-7", 2, HMAC, sealed, sealed_len, &out),
        KR_EAUTH);
    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-two", "k-7", 2, AES, sealed, sealed_len, &out),
        KR_EAUTH);
    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-none", "k-7", 2, AES, sealed, sealed_len, &out),
        KR_ENOTFOUND);
    /* Nothing was handed out on failure. */
    assert_int_equal(out.len, 9);
    assert_memory_equal(out.data, "untouched", 9);

    assert_int_equal(
        keyring_unseal(fx->keyring, "dom-one", "k-7", 2, AES, sealed, sealed_len, &out), 0);
    assert_memory_equal(out.data, material, sizeof(material));
    secbuf_free(&out);
    free(w1);
    free(w2);
    free(sealed);
}

static void test_tampered_blob_is_eauth(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *sealed = NULL;
    size_t wrapped_len = 0, sealed_len = 0;
    const uint8_t material[20] = "hmac key material..";
    secbuf out = {NULL, 0};

    create(fx->keyring, "tamper", &wrapped, &wrapped_len);
    seal(fx->keyring, "tamper", "k", 1, HMAC, material, sizeof(material), &sealed, &sealed_len);
    for (size_t i = 0; i < sealed_len; i++) {
        sealed[i] ^= 0x80;
        assert_int_equal(keyring_unseal(fx->keyring, "tamper", "k", 1, HMAC, sealed, sealed_len,
                                        &out),
                         KR_EAUTH);
        assert_null(out.data);
        sealed[i] ^= 0x80;
    }
    assert_int_equal(
        keyring_unseal(fx->keyring, "tamper", "k", 1, HMAC, sealed, sealed_len - 1, &out),
        KR_EAUTH);
    assert_int_equal(keyring_unseal(fx->keyring, "tamper", "k", 1, HMAC, sealed, 27, &out),
                     KR_EAUTH);
    assert_int_equal(
        keyring_unseal(fx->keyring, "tamper", "k", 1, HMAC, sealed, sealed_len, &out), 0);
    secbuf_free(&out);
    free(wrapped);
    free(sealed);
}

static void test_reload_in_fresh_keyring(void **state)
{
    (void)state;
    struct fixture *fx = NULL;
    uint8_t *wrapped = NULL, *sealed = NULL;
    size_t wrapped_len = 0, sealed_len = 0;
    const uint8_t material[32] = "outlives the node that made it.";
    secbuf out = {NULL, 0};

    assert_int_equal(fixture_up((void **)&fx), 0);
    create(fx->keyring, "persisted", &wrapped, &wrapped_len);
    seal(fx->keyring, "persisted", "k-42", 5, AES, material, sizeof(material), &sealed,
         &sealed_len);
    fixture_down((void **)&fx);

    /* A restarted node: new HSM session, empty keyring, blobs from the store. */
    assert_int_equal(fixture_up((void **)&fx), 0);
    assert_false(keyring_has_domain(fx->keyring, "persisted"));
    assert_int_equal(
        keyring_unseal(fx->keyring, "persisted", "k-42", 5, AES, sealed, sealed_len, &out),
        KR_ENOTFOUND);
    assert_int_equal(keyring_load_domain(fx->keyring, "persisted", wrapped, wrapped_len), 0);
    assert_true(keyring_has_domain(fx->keyring, "persisted"));
    assert_int_equal(keyring_load_domain(fx->keyring, "persisted", wrapped, wrapped_len), 0);
    assert_int_equal(
        keyring_unseal(fx->keyring, "persisted", "k-42", 5, AES, sealed, sealed_len, &out), 0);
    assert_memory_equal(out.data, material, sizeof(material));
    secbuf_free(&out);
    fixture_down((void **)&fx);
    free(wrapped);
    free(sealed);
}

static void test_wrapped_blob_bound_to_domain(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL;
    size_t wrapped_len = 0;
    struct keyring *other = NULL;

    create(fx->keyring, "owner", &wrapped, &wrapped_len);
    assert_int_equal(keyring_new(fx->hsm, &other), 0);
    assert_int_equal(keyring_load_domain(other, "thief", wrapped, wrapped_len), KR_EAUTH);
    assert_false(keyring_has_domain(other, "thief"));
    wrapped[HSM_GCM_IV_LEN + 3] ^= 1;
    assert_int_equal(keyring_load_domain(other, "owner", wrapped, wrapped_len), KR_EAUTH);
    wrapped[HSM_GCM_IV_LEN + 3] ^= 1;
    assert_int_equal(keyring_load_domain(other, "owner", wrapped, wrapped_len - 1), KR_EAUTH);
    assert_false(keyring_has_domain(other, "owner"));
    assert_int_equal(keyring_load_domain(other, "owner", wrapped, wrapped_len), 0);
    assert_true(keyring_has_domain(other, "owner"));

    /* Both keyrings hold the same key: what one seals, the other opens. */
    uint8_t *sealed = NULL;
    size_t sealed_len = 0;
    secbuf out = {NULL, 0};
    seal(fx->keyring, "owner", "k", 1, AES, (const uint8_t *)"same key", 8, &sealed,
         &sealed_len);
    assert_int_equal(keyring_unseal(other, "owner", "k", 1, AES, sealed, sealed_len, &out), 0);
    assert_memory_equal(out.data, "same key", 8);
    secbuf_free(&out);
    keyring_free(other);
    free(wrapped);
    free(sealed);
}

static void test_bad_arguments(void **state)
{
    struct fixture *fx = *state;
    uint8_t *blob = NULL;
    size_t blob_len = 0;
    char long_id[300];
    memset(long_id, 'x', sizeof(long_id) - 1);
    long_id[sizeof(long_id) - 1] = '\0';

    assert_int_equal(keyring_seal(fx->keyring, "nowhere", "k", 1, AES, (const uint8_t *)"m", 1,
                                  &blob, &blob_len),
                     KR_ENOTFOUND);
    assert_null(blob);
    assert_int_equal(keyring_create_domain(fx->keyring, "", &blob, &blob_len), KR_EINVAL);
    assert_int_equal(keyring_create_domain(fx->keyring, long_id, &blob, &blob_len), KR_EINVAL);
    assert_null(blob);
    keyring_free(NULL);
}

struct worker {
    struct keyring *keyring;
    int id;
    int failures;
};

static void *worker_run(void *arg)
{
    struct worker *w = arg;
    char key_id[32];
    for (uint32_t i = 0; i < 300; i++) {
        uint8_t material[32];
        uint8_t *sealed = NULL;
        size_t sealed_len = 0;
        secbuf out = {NULL, 0};
        memset(material, (int)(i + (uint32_t)w->id), sizeof(material));
        snprintf(key_id, sizeof(key_id), "k-%d-%u", w->id, i);
        if (keyring_seal(w->keyring, "shared", key_id, i, AES, material, sizeof(material),
                         &sealed, &sealed_len) != 0 ||
            keyring_unseal(w->keyring, "shared", key_id, i, AES, sealed, sealed_len, &out) != 0 ||
            memcmp(out.data, material, sizeof(material)) != 0)
            w->failures++;
        secbuf_free(&out);
        free(sealed);
    }
    return NULL;
}

/* Service threads seal and unseal while new domains are loaded. */
static void test_concurrent_use(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL;
    size_t wrapped_len = 0;
    pthread_t threads[4];
    struct worker workers[4];

    create(fx->keyring, "shared", &wrapped, &wrapped_len);
    free(wrapped);
    for (int i = 0; i < 4; i++) {
        workers[i] = (struct worker){fx->keyring, i, 0};
        assert_int_equal(pthread_create(&threads[i], NULL, worker_run, &workers[i]), 0);
    }
    for (int i = 0; i < 20; i++) {
        char domain[32];
        snprintf(domain, sizeof(domain), "growing-%d", i);
        create(fx->keyring, domain, &wrapped, &wrapped_len);
        free(wrapped);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(workers[i].failures, 0);
    }
}

/* Opens k-c version 4 of domain "cached" |times| times, each to |material|. */
static void open_times(struct keyring *keyring, const uint8_t *sealed, size_t sealed_len,
                       const uint8_t *material, size_t len, int times)
{
    for (int i = 0; i < times; i++) {
        secbuf out = {NULL, 0};
        assert_int_equal(
            keyring_unseal(keyring, "cached", "k-c", 4, AES, sealed, sealed_len, &out), 0);
        assert_int_equal(out.len, len);
        assert_memory_equal(out.data, material, len);
        secbuf_free(&out);
    }
}

/* A second open of the same version is served from the cache, but only for
 * the very same blob and metadata; unloading the domain, an idle expiry or
 * turning the cache off wipes what it holds. */
static void test_unsealed_cache(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *sealed = NULL, *ec_sealed = NULL;
    size_t wrapped_len = 0, sealed_len = 0, ec_len = 0;
    const uint8_t material[32] = "cached aes-256 material, 32 byt";
    uint8_t ec[138];
    memset(ec, 0x5a, sizeof(ec));
    secbuf out = {NULL, 0};
    struct keyring_cache_stats st;

    /* Off until its owner turns it on. */
    create(fx->keyring, "cached", &wrapped, &wrapped_len);
    seal(fx->keyring, "cached", "k-c", 4, AES, material, sizeof(material), &sealed, &sealed_len);
    open_times(fx->keyring, sealed, sealed_len, material, sizeof(material), 1);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 0);
    keyring_cache_enable(fx->keyring, 1);
    open_times(fx->keyring, sealed, sealed_len, material, sizeof(material), 3);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 1);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.hits, 2);

    /* Cached or not, a blob moved to other metadata or altered does not open. */
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-d", 4, AES, sealed, sealed_len,
                                    &out), KR_EAUTH);
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-c", 5, AES, sealed, sealed_len,
                                    &out), KR_EAUTH);
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-c", 4, HMAC, sealed, sealed_len,
                                    &out), KR_EAUTH);
    sealed[sealed_len - 1] ^= 1;
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-c", 4, AES, sealed, sealed_len,
                                    &out), KR_EAUTH);
    sealed[sealed_len - 1] ^= 1;
    assert_null(out.data);

    /* Asymmetric material is not kept. */
    seal(fx->keyring, "cached", "k-ec", 1, KEYRAFT__ALGORITHM__EC_P256, ec, sizeof(ec),
         &ec_sealed, &ec_len);
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-ec", 1,
                                    KEYRAFT__ALGORITHM__EC_P256, ec_sealed, ec_len, &out), 0);
    secbuf_free(&out);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 1);

    /* Used just now: a 60 s idle bound keeps it, 0 wipes it. */
    keyring_cache_expire(fx->keyring, 60000);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 1);
    keyring_cache_expire(fx->keyring, 0);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 0);

    /* Unloading the domain wipes its keys: no open without the domain key. */
    open_times(fx->keyring, sealed, sealed_len, material, sizeof(material), 1);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 1);
    assert_int_equal(keyring_unload_domain(fx->keyring, "cached"), 0);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(keyring_unseal(fx->keyring, "cached", "k-c", 4, AES, sealed, sealed_len,
                                    &out), KR_ENOTFOUND);

    /* Off: every use opens the blob, nothing is held. */
    assert_int_equal(keyring_load_domain(fx->keyring, "cached", wrapped, wrapped_len), 0);
    keyring_cache_enable(fx->keyring, 0);
    open_times(fx->keyring, sealed, sealed_len, material, sizeof(material), 2);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 0);

    free(wrapped);
    free(sealed);
    free(ec_sealed);
}

/* What keyring_use handed its callback. */
struct use_seen {
    int calls;
    size_t len;
    uint8_t material[64];
};

static void use_record(void *arg, const uint8_t *material, size_t len)
{
    struct use_seen *seen = arg;
    seen->calls++;
    seen->len = len;
    if (len <= sizeof(seen->material))
        memcpy(seen->material, material, len);
}

/* keyring_use hands over the same material keyring_unseal copies out: opened
 * on a miss (then cached), in place on a hit, and never for a blob that
 * does not open or a domain that is not loaded. */
static void test_use_in_place(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *sealed = NULL;
    size_t wrapped_len = 0, sealed_len = 0;
    const uint8_t material[32] = "in-place aes-256 material, 32 b";
    struct keyring_cache_stats st;
    struct use_seen seen = {0};

    create(fx->keyring, "inplace", &wrapped, &wrapped_len);
    seal(fx->keyring, "inplace", "k-u", 2, AES, material, sizeof(material), &sealed, &sealed_len);
    for (int cached = 0; cached <= 1; cached++) {
        keyring_cache_enable(fx->keyring, cached);
        for (int i = 1; i <= 3; i++) {
            assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 2, AES, sealed,
                                         sealed_len, use_record, &seen), 0);
            assert_int_equal(seen.len, sizeof(material));
            assert_memory_equal(seen.material, material, sizeof(material));
        }
        keyring_cache_stats(fx->keyring, &st);
        assert_int_equal(st.entries, cached ? 1 : 0);
    }
    assert_int_equal(seen.calls, 6);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.misses, 1); /* the first use with the cache on; then hits */
    assert_int_equal(st.hits, 2);

    /* Other metadata, an altered blob, no domain: an error, and |use| never runs. */
    seen.calls = 0;
    assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 3, AES, sealed, sealed_len,
                                 use_record, &seen), KR_EAUTH);
    sealed[CRYPTO_GCM_NONCE_LEN] ^= 1;
    assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 2, AES, sealed, sealed_len,
                                 use_record, &seen), KR_EAUTH);
    sealed[CRYPTO_GCM_NONCE_LEN] ^= 1;
    assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 2, AES, sealed, 8, use_record,
                                 &seen), KR_EAUTH);
    assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 2, AES, sealed, sealed_len,
                                 NULL, &seen), KR_EINVAL);
    assert_int_equal(keyring_unload_domain(fx->keyring, "inplace"), 0);
    assert_int_equal(keyring_use(fx->keyring, "inplace", "k-u", 2, AES, sealed, sealed_len,
                                 use_record, &seen), KR_ENOTFOUND);
    assert_int_equal(seen.calls, 0);

    free(wrapped);
    free(sealed);
}

/* A working set of hot versions far below the cache's size is opened once
 * each, however often it is used: two whose hashes meet share their bucket
 * instead of evicting each other on every use. The ids are fixed, so the
 * hashes are: two of these 16 share a slot of a direct-mapped table of the
 * same size (picked so; they fail the test there). */
#define HOT_KEYS 16
static void test_cache_hot_set_stays(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *sealed[HOT_KEYS] = {0};
    size_t wrapped_len = 0, sealed_len[HOT_KEYS] = {0};
    uint8_t material[32];
    struct keyring_cache_stats st;
    struct use_seen seen = {0};
    char id[32];

    create(fx->keyring, "hot", &wrapped, &wrapped_len);
    keyring_cache_enable(fx->keyring, 1);
    for (int k = 0; k < HOT_KEYS; k++) {
        snprintf(id, sizeof(id), "hot79-%d", k);
        memset(material, k, sizeof(material));
        seal(fx->keyring, "hot", id, 1, AES, material, sizeof(material), &sealed[k],
             &sealed_len[k]);
    }
    for (int round = 0; round < 4; round++) {
        for (int k = 0; k < HOT_KEYS; k++) {
            snprintf(id, sizeof(id), "hot79-%d", k);
            assert_int_equal(keyring_use(fx->keyring, "hot", id, 1, AES, sealed[k],
                                         sealed_len[k], use_record, &seen), 0);
            memset(material, k, sizeof(material));
            assert_memory_equal(seen.material, material, sizeof(material));
        }
    }
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, HOT_KEYS);
    assert_int_equal(st.misses, HOT_KEYS);
    assert_int_equal(st.hits, 3 * HOT_KEYS);
    for (int k = 0; k < HOT_KEYS; k++)
        free(sealed[k]);
    free(wrapped);
}

/* The sweep sees each cached version as it was sealed and wipes those its
 * callback says are no longer live (a destroyed version). */
struct sweep_seen {
    const uint8_t *live_sealed; /* the blob that stays */
    size_t live_len;
    int calls, matched;
};

static int sweep_keep_live(void *arg, const char *domain_id, const char *key_id,
                           uint32_t version, const uint8_t *sealed, size_t sealed_len)
{
    struct sweep_seen *seen = arg;
    seen->calls++;
    int live = strcmp(domain_id, "swept") == 0 && strcmp(key_id, "k-live") == 0 &&
               version == 2 && sealed_len == seen->live_len &&
               memcmp(sealed, seen->live_sealed, sealed_len) == 0;
    seen->matched += live;
    return live;
}

static void test_unsealed_cache_sweep(void **state)
{
    struct fixture *fx = *state;
    uint8_t *wrapped = NULL, *live = NULL, *gone = NULL;
    size_t wrapped_len = 0, live_len = 0, gone_len = 0;
    const uint8_t material[32] = "material swept or kept, 32 byte";
    secbuf out = {NULL, 0};
    struct keyring_cache_stats st;

    keyring_cache_enable(fx->keyring, 1);
    create(fx->keyring, "swept", &wrapped, &wrapped_len);
    seal(fx->keyring, "swept", "k-live", 2, AES, material, sizeof(material), &live, &live_len);
    seal(fx->keyring, "swept", "k-gone", 1, HMAC, material, sizeof(material), &gone, &gone_len);
    assert_int_equal(keyring_unseal(fx->keyring, "swept", "k-live", 2, AES, live, live_len, &out), 0);
    secbuf_free(&out);
    assert_int_equal(keyring_unseal(fx->keyring, "swept", "k-gone", 1, HMAC, gone, gone_len, &out), 0);
    secbuf_free(&out);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 2);

    struct sweep_seen seen = {live, live_len, 0, 0};
    keyring_cache_sweep(fx->keyring, sweep_keep_live, &seen);
    assert_int_equal(seen.calls, 2);
    assert_int_equal(seen.matched, 1);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.entries, 1);
    /* The live one is still a hit; the swept one opens again from its blob. */
    uint64_t hits = st.hits;
    assert_int_equal(keyring_unseal(fx->keyring, "swept", "k-live", 2, AES, live, live_len, &out), 0);
    secbuf_free(&out);
    keyring_cache_stats(fx->keyring, &st);
    assert_int_equal(st.hits, hits + 1);

    free(wrapped);
    free(live);
    free(gone);
}

int main(void)
{
    /* As the node does: key material in the secure heap (mlock may be refused
     * in a container; the heap is still used). */
    int rc = secmem_init(1u << 20);
    if (rc != 0 && rc != KR_ENOMEM)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_create_domain, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_seal_round_trip, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_unseal_other_metadata_is_eauth, fixture_up,
                                        fixture_down),
        cmocka_unit_test_setup_teardown(test_tampered_blob_is_eauth, fixture_up, fixture_down),
        cmocka_unit_test(test_reload_in_fresh_keyring),
        cmocka_unit_test_setup_teardown(test_wrapped_blob_bound_to_domain, fixture_up,
                                        fixture_down),
        cmocka_unit_test_setup_teardown(test_bad_arguments, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_concurrent_use, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_unsealed_cache, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_unsealed_cache_sweep, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_use_in_place, fixture_up, fixture_down),
        cmocka_unit_test_setup_teardown(test_cache_hot_set_stays, fixture_up, fixture_down),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
