/* test_crypto.c: known-answer vectors and round trips for node/crypto.c. */
#include "crypto.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "keyraft.h"
#include "secmem.h"

/* Set by main when the locked secure heap is available. */
static int secure_heap_on;

/* Decodes a hex literal into a fresh malloc'd buffer. */
static uint8_t *unhex(const char *hex, size_t *out_len)
{
    size_t n = strlen(hex) / 2;
    uint8_t *buf = malloc(n > 0 ? n : 1);

    assert_non_null(buf);
    for (size_t i = 0; i < n; i++) {
        unsigned int v;
        assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
        buf[i] = (uint8_t)v;
    }
    *out_len = n;
    return buf;
}

/* ---- AES-GCM ----------------------------------------------------------- */

/* McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16
 * (AES-256, 96-bit IV, 20 bytes of AAD), laid out as nonce | ct | tag. */
static const char *tc16_key = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
static const char *tc16_aad = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
static const char *tc16_pt =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
static const char *tc16_blob =
    "cafebabefacedbaddecaf888"
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    "76fc6ece0f4e1768cddf8853bb2d551b";

static void test_gcm_kat_tc16(void **state)
{
    size_t klen, alen, plen, blen, out_len = 0;
    uint8_t *key = unhex(tc16_key, &klen), *aad = unhex(tc16_aad, &alen);
    uint8_t *pt = unhex(tc16_pt, &plen), *blob = unhex(tc16_blob, &blen);
    uint8_t out[64];
    (void)state;

    assert_int_equal(blen, plen + CRYPTO_GCM_NONCE_LEN + CRYPTO_GCM_TAG_LEN);
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), 0);
    assert_int_equal(out_len, plen);
    assert_memory_equal(out, pt, plen);
    free(key);
    free(aad);
    free(pt);
    free(blob);
}

/* Test case 14: AES-256 zero key, zero IV, one zero block, no AAD. */
static void test_gcm_kat_tc14(void **state)
{
    size_t blen, out_len = 0;
    uint8_t *blob = unhex("000000000000000000000000"
                          "cea7403d4d606b6e074ec5d3baf39d18"
                          "d0d1c8a799996bf0265b98b5d48ab919", &blen);
    uint8_t key[32] = {0}, zero[16] = {0}, out[16];
    (void)state;

    memset(out, 0xaa, sizeof(out));
    assert_int_equal(crypto_gcm_open(key, sizeof(key), NULL, 0, blob, blen, out, &out_len), 0);
    assert_int_equal(out_len, 16);
    assert_memory_equal(out, zero, 16);
    free(blob);
}

/* A forged or misbound ciphertext is refused and no plaintext is left behind. */
static void test_gcm_tamper(void **state)
{
    size_t klen, alen, blen, out_len = 12345;
    uint8_t *key = unhex(tc16_key, &klen), *aad = unhex(tc16_aad, &alen);
    uint8_t *blob = unhex(tc16_blob, &blen);
    uint8_t out[64], zero[64] = {0};
    size_t ct_len = blen - 28;
    (void)state;

    /* Flipped tag bit. */
    blob[blen - 1] ^= 0x01;
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), KR_EAUTH);
    assert_memory_equal(out, zero, ct_len);
    assert_int_equal(out_len, 12345);
    blob[blen - 1] ^= 0x01;

    /* Flipped ciphertext bit. */
    blob[20] ^= 0x80;
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), KR_EAUTH);
    assert_memory_equal(out, zero, ct_len);
    blob[20] ^= 0x80;

    /* Flipped nonce bit. */
    blob[0] ^= 0x01;
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), KR_EAUTH);
    blob[0] ^= 0x01;

    /* Wrong AAD, and no AAD at all. */
    aad[0] ^= 0x01;
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), KR_EAUTH);
    assert_memory_equal(out, zero, ct_len);
    aad[0] ^= 0x01;
    assert_int_equal(crypto_gcm_open(key, klen, NULL, 0, blob, blen, out, &out_len), KR_EAUTH);

    /* The untouched blob still opens: the failures above were the tampering. */
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, blen, out, &out_len), 0);

    /* Too short to hold nonce and tag; unsupported key size. */
    assert_int_equal(crypto_gcm_open(key, klen, aad, alen, blob, 27, out, &out_len), KR_EINVAL);
    assert_int_equal(crypto_gcm_open(key, 24, aad, alen, blob, blen, out, &out_len), KR_EINVAL);
    free(key);
    free(aad);
    free(blob);
}

/* Fills |out| with |len| bytes from the source under test; 0 on success. */
typedef int (*draw_fn)(uint8_t *out, size_t len);

/* A seal's nonce (|len| is the nonce's length). */
static int draw_nonce(uint8_t *out, size_t len)
{
    static const uint8_t key[32] = {1};
    uint8_t blob[64];
    size_t blob_len = 0;
    if (len != CRYPTO_GCM_NONCE_LEN || crypto_gcm_seal(key, 32, NULL, 0, key, 4, blob, &blob_len))
        return -1;
    memcpy(out, blob, len);
    return 0;
}

static int draw_secret(uint8_t *out, size_t len) { return crypto_random(out, len); }

/* |n| draws of |len| bytes never repeat one, and a forked child does not
 * hand out what its parent hands out next (a pool copied into the child). */
static void assert_draws_unique_across_fork(draw_fn draw, size_t len, int n)
{
    uint8_t *seen = calloc((size_t)n, len);
    assert_non_null(seen);
    for (int i = 0; i < n; i++) {
        assert_int_equal(draw(seen + (size_t)i * len, len), 0);
        for (int j = 0; j < i; j++)
            if (memcmp(seen + (size_t)i * len, seen + (size_t)j * len, len) == 0)
                fail_msg("draw %d repeated draw %d", i, j);
    }
    free(seen);

    uint8_t child[64], parent[64];
    assert_true(len <= sizeof(child));
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int ok = draw(child, len) == 0 && write(fds[1], child, len) == (ssize_t)len;
        _exit(ok ? 0 : 1);
    }
    assert_int_equal(read(fds[0], child, len), (ssize_t)len);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(draw(parent, len), 0);
    assert_memory_not_equal(child, parent, len);
    close(fds[0]);
    close(fds[1]);
}

/* Nonces come from a pool: 1,000 seals (past a refill) never repeat one, and
 * a forked child does not hand out the nonces its parent hands out next. */
static void test_gcm_nonces_unique_across_fork(void **state)
{
    (void)state;
    assert_draws_unique_across_fork(draw_nonce, CRYPTO_GCM_NONCE_LEN, 1000);
}

/* Public random values (key ids, nonces) share one pool: 4,000 draws of 8
 * and 12 bytes, past several refills of its 4 KB, never repeat one; the
 * bounds are refused. */
static void test_public_random_pool(void **state)
{
    (void)state;
    enum { N = 4000 };
    uint8_t (*seen)[12] = calloc(N, 12);
    assert_non_null(seen);
    for (int i = 0; i < N; i++) {
        size_t len = i % 2 ? 12 : 8;
        assert_int_equal(crypto_public_random(seen[i], len), 0);
        for (int j = i % 2; j < i; j += 2)
            if (memcmp(seen[i], seen[j], len) == 0)
                fail_msg("draw %d repeated draw %d", i, j);
    }
    free(seen);
    uint8_t big[CRYPTO_PUBLIC_RANDOM_MAX + 1];
    assert_int_equal(crypto_public_random(big, sizeof(big)), KR_EINVAL);
    assert_int_equal(crypto_public_random(NULL, 8), KR_EINVAL);
    assert_int_equal(crypto_public_random(big, 0), 0);
    assert_int_equal(crypto_public_random(big, CRYPTO_PUBLIC_RANDOM_MAX), 0);
}

static void *draw_in_thread(void *arg)
{
    size_t *used_inside = arg;
    uint8_t material[32];
    if (crypto_random(material, sizeof(material)) != 0)
        return NULL;
    *used_inside = CRYPTO_secure_used();
    OPENSSL_cleanse(material, sizeof(material));
    return arg;
}

/* Key material comes from a per-thread pool in the secure heap: 4,000 draws
 * of 32 bytes, past 30 refills of its 4 KB, never repeat one; a forked child
 * does not hand out what its parent hands out next; a thread's pool is taken
 * from the secure heap and given back when the thread exits. */
static void test_secret_random_pool(void **state)
{
    (void)state;
    if (!secmem_locked())
        skip(); /* no locked heap (RLIMIT_MEMLOCK): nothing is pooled */
    assert_draws_unique_across_fork(draw_secret, 32, 4000);

    size_t before = CRYPTO_secure_used(), inside = 0;
    pthread_t t;
    void *ret = NULL;
    assert_int_equal(pthread_create(&t, NULL, draw_in_thread, &inside), 0);
    assert_int_equal(pthread_join(t, &ret), 0);
    assert_ptr_equal(ret, &inside);
    assert_true(inside >= before + 4096); /* the thread's pool */
    assert_int_equal(CRYPTO_secure_used(), before);
}

static void gcm_roundtrip(size_t key_len)
{
    static const uint8_t msg[] = "attack at dawn, bring snacks";
    static const uint8_t aad[] = "domain|key|1|aes";
    uint8_t key[32], a[128], b[128], pt[128];
    size_t a_len = 0, b_len = 0, pt_len = 0;

    assert_int_equal(crypto_random(key, key_len), 0);
    assert_int_equal(crypto_gcm_seal(key, key_len, aad, sizeof(aad), msg, sizeof(msg), a, &a_len), 0);
    assert_int_equal(a_len, sizeof(msg) + 28);
    assert_int_equal(crypto_gcm_seal(key, key_len, aad, sizeof(aad), msg, sizeof(msg), b, &b_len), 0);
    /* Fresh nonce per seal: the same message never encrypts the same twice. */
    assert_memory_not_equal(a, b, CRYPTO_GCM_NONCE_LEN);
    assert_memory_not_equal(a, b, a_len);
    assert_int_equal(crypto_gcm_open(key, key_len, aad, sizeof(aad), a, a_len, pt, &pt_len), 0);
    assert_int_equal(pt_len, sizeof(msg));
    assert_memory_equal(pt, msg, sizeof(msg));
    assert_int_equal(crypto_gcm_open(key, key_len, aad, sizeof(aad), b, b_len, pt, &pt_len), 0);
    assert_memory_equal(pt, msg, sizeof(msg));

    /* Empty plaintext still authenticates the AAD. */
    assert_int_equal(crypto_gcm_seal(key, key_len, aad, sizeof(aad), NULL, 0, a, &a_len), 0);
    assert_int_equal(a_len, 28);
    assert_int_equal(crypto_gcm_open(key, key_len, aad, sizeof(aad), a, a_len, pt, &pt_len), 0);
    assert_int_equal(pt_len, 0);
    assert_int_equal(crypto_gcm_open(key, key_len, aad, sizeof(aad) - 1, a, a_len, pt, &pt_len),
                     KR_EAUTH);
    OPENSSL_cleanse(key, sizeof(key));
}

static void test_gcm_roundtrip(void **state)
{
    uint8_t key[24] = {0}, out[64];
    size_t out_len = 0;
    (void)state;

    gcm_roundtrip(16);
    gcm_roundtrip(32);
    assert_int_equal(crypto_gcm_seal(key, 24, NULL, 0, key, 8, out, &out_len), KR_EINVAL);
}

/* ---- HMAC ------------------------------------------------------------------ */

/* RFC 4231 test case 1: key = 0x0b * 20, data = "Hi There". */
static void test_hmac_kat(void **state)
{
    static const uint8_t data[] = "Hi There";
    size_t e256_len, e512_len, out_len = 0;
    uint8_t *e256 = unhex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                          &e256_len);
    uint8_t *e512 = unhex("87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
                          "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
                          &e512_len);
    uint8_t key[20], out[64];
    (void)state;

    memset(key, 0x0b, sizeof(key));
    assert_int_equal(crypto_mac(KEYRAFT__ALGORITHM__HMAC_SHA256, key, sizeof(key), data, 8, out,
                                &out_len), 0);
    assert_int_equal(out_len, 32);
    assert_memory_equal(out, e256, 32);
    assert_int_equal(crypto_mac(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8, out,
                                &out_len), 0);
    assert_int_equal(out_len, 64);
    assert_memory_equal(out, e512, 64);

    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA256, key, sizeof(key), data, 8,
                                       e256, e256_len), 0);
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8,
                                       e512, e512_len), 0);
    free(e256);
    free(e512);
}

static void test_hmac_verify_rejects(void **state)
{
    static const uint8_t data[] = "Hi There";
    uint8_t key[20], mac[64];
    size_t mac_len = 0;
    (void)state;

    memset(key, 0x0b, sizeof(key));
    assert_int_equal(crypto_mac(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8, mac,
                                &mac_len), 0);
    /* A correct prefix is not a MAC: full length only. */
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8,
                                       mac, 32), KR_EAUTH);
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8,
                                       mac, 0), KR_EAUTH);
    /* Wrong digest for the key's algorithm. */
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA256, key, sizeof(key), data, 8,
                                       mac, 32), KR_EAUTH);
    mac[63] ^= 0x01;
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8,
                                       mac, 64), KR_EAUTH);
    mac[63] ^= 0x01;
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 7,
                                       mac, 64), KR_EAUTH);
    assert_int_equal(crypto_mac_verify(KEYRAFT__ALGORITHM__HMAC_SHA512, key, sizeof(key), data, 8,
                                       mac, 64), 0);

    /* Key sizes outside 16..128 and non-HMAC algorithms are refused. */
    assert_int_equal(crypto_mac(KEYRAFT__ALGORITHM__HMAC_SHA256, key, 15, data, 8, mac, &mac_len),
                     KR_EINVAL);
    assert_int_equal(crypto_mac(KEYRAFT__ALGORITHM__AES_256, key, 20, data, 8, mac, &mac_len),
                     KR_EKEYTYPE);
}

/* ---- AES key wrap with padding ------------------------------------------- */

/* RFC 5649 section 6: both vectors use a 192-bit KEK. */
static const char *kwp_kek = "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8";

static void kwp_kat(const char *key_hex, const char *wrapped_hex)
{
    size_t kek_len, key_len, exp_len, out_len = 0, back_len = 0;
    uint8_t *kek = unhex(kwp_kek, &kek_len), *key = unhex(key_hex, &key_len);
    uint8_t *exp = unhex(wrapped_hex, &exp_len);
    uint8_t out[64], back[64];

    assert_int_equal(crypto_kwp_wrap(kek, kek_len, key, key_len, out, &out_len), 0);
    assert_int_equal(out_len, exp_len);
    assert_memory_equal(out, exp, exp_len);
    assert_int_equal(crypto_kwp_unwrap(kek, kek_len, exp, exp_len, back, &back_len), 0);
    assert_int_equal(back_len, key_len);
    assert_memory_equal(back, key, key_len);
    free(kek);
    free(key);
    free(exp);
}

static void test_kwp_kat(void **state)
{
    (void)state;
    kwp_kat("c37b7e6492584340bed12207808941155068f738",
            "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a");
    kwp_kat("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f");
}

static void test_kwp_roundtrip_and_tamper(void **state)
{
    uint8_t kek[32], other[32], key[40], wrapped[40 + 15], back[40 + 15], zero[48] = {0};
    size_t w_len = 0, b_len = 777;
    (void)state;

    assert_int_equal(crypto_random(kek, sizeof(kek)), 0);
    assert_int_equal(crypto_random(other, sizeof(other)), 0);
    assert_int_equal(crypto_random(key, sizeof(key)), 0);
    assert_int_equal(crypto_kwp_wrap(kek, 32, key, sizeof(key), wrapped, &w_len), 0);
    assert_int_equal(w_len, 48);
    assert_int_equal(crypto_kwp_unwrap(kek, 32, wrapped, w_len, back, &b_len), 0);
    assert_int_equal(b_len, sizeof(key));
    assert_memory_equal(back, key, sizeof(key));

    /* Wrong KEK and a flipped bit both fail the integrity check. */
    b_len = 777;
    memset(back, 0xaa, sizeof(back));
    assert_int_equal(crypto_kwp_unwrap(other, 32, wrapped, w_len, back, &b_len), KR_EAUTH);
    assert_memory_equal(back, zero, w_len - 8);
    assert_int_equal(b_len, 777);
    wrapped[10] ^= 0x04;
    assert_int_equal(crypto_kwp_unwrap(kek, 32, wrapped, w_len, back, &b_len), KR_EAUTH);
    wrapped[10] ^= 0x04;

    /* Lengths RFC 5649 cannot produce, and KEK sizes AES does not have. */
    assert_int_equal(crypto_kwp_unwrap(kek, 32, wrapped, w_len - 1, back, &b_len), KR_EINVAL);
    assert_int_equal(crypto_kwp_unwrap(kek, 32, wrapped, 8, back, &b_len), KR_EINVAL);
    assert_int_equal(crypto_kwp_wrap(kek, 20, key, sizeof(key), wrapped, &w_len), KR_EINVAL);
    assert_int_equal(crypto_kwp_wrap(kek, 32, key, 0, wrapped, &w_len), KR_EINVAL);

    /* 128-bit KEK. */
    assert_int_equal(crypto_kwp_wrap(kek, 16, key, 32, wrapped, &w_len), 0);
    assert_int_equal(w_len, 40);
    assert_int_equal(crypto_kwp_unwrap(kek, 16, wrapped, w_len, back, &b_len), 0);
    assert_int_equal(b_len, 32);
    assert_memory_equal(back, key, 32);
}

/* ---- Ed25519 KAT ------------------------------------------------------------ */

/* RFC 8032 section 7.1, TEST 1 (empty message). */
static const char *ed_seed = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
static const char *ed_pub = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
static const char *ed_sig =
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

/* The RFC seed as DER PKCS#8, built by OpenSSL (malloc'd). */
static uint8_t *ed_pkcs8(size_t *out_len)
{
    size_t seed_len;
    uint8_t *seed = unhex(ed_seed, &seed_len);
    EVP_PKEY *pkey = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, seed_len);
    PKCS8_PRIV_KEY_INFO *p8;
    unsigned char *der = NULL;
    int der_len;

    assert_non_null(pkey);
    p8 = EVP_PKEY2PKCS8(pkey);
    assert_non_null(p8);
    der_len = i2d_PKCS8_PRIV_KEY_INFO(p8, &der);
    assert_true(der_len > 0);
    PKCS8_PRIV_KEY_INFO_free(p8);
    EVP_PKEY_free(pkey);
    free(seed);
    *out_len = (size_t)der_len;
    return der;
}

static void test_ed25519_kat(void **state)
{
    size_t der_len, sig_len = 0, exp_len, pub_len, spki_len = 0;
    uint8_t *der = ed_pkcs8(&der_len);
    uint8_t *exp = unhex(ed_sig, &exp_len), *pub = unhex(ed_pub, &pub_len);
    uint8_t *sig = NULL, *spki = NULL;
    char kcv[17];
    (void)state;

    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__ED25519, der, der_len), 0);
    assert_int_equal(crypto_sign(KEYRAFT__ALGORITHM__ED25519, der, der_len, NULL, 0, &sig,
                                 &sig_len), 0);
    assert_int_equal(sig_len, 64);
    assert_memory_equal(sig, exp, 64);
    assert_int_equal(crypto_verify(KEYRAFT__ALGORITHM__ED25519, der, der_len, NULL, 0, exp, 64),
                     0);

    /* SPKI = the fixed Ed25519 prefix, then the RFC's public key. */
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__ED25519, der, der_len, kcv, &spki,
                                     &spki_len), 0);
    assert_int_equal(spki_len, 44);
    assert_memory_equal(spki + 12, pub, 32);
    assert_string_equal(kcv, "06e3fd8fda29bb60");
    assert_int_equal(crypto_verify_public(KEYRAFT__ALGORITHM__ED25519, spki, spki_len, NULL, 0,
                                          exp, 64), 0);
    exp[0] ^= 0x01;
    assert_int_equal(crypto_verify_public(KEYRAFT__ALGORITHM__ED25519, spki, spki_len, NULL, 0,
                                          exp, 64), KR_EAUTH);
    free(sig);
    free(spki);
    free(exp);
    free(pub);
    OPENSSL_free(der);
}

/* ---- Generation, signing, key info -------------------------------------------- */

/* Verifies |sig| with OpenSSL directly, with the parameters the contract
 * names, so a drift in crypto.c's parameters shows here. */
static int independent_verify(crypto_alg alg, const uint8_t *spki, size_t spki_len,
                              const char *md, const uint8_t *msg, size_t msg_len,
                              const uint8_t *sig, size_t sig_len)
{
    const unsigned char *p = spki;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)spki_len);
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok;

    assert_non_null(pkey);
    assert_non_null(mctx);
    assert_int_equal(EVP_DigestVerifyInit_ex(mctx, &pctx, md, NULL, NULL, pkey, NULL), 1);
    if (alg == KEYRAFT__ALGORITHM__RSA_2048 || alg == KEYRAFT__ALGORITHM__RSA_3072 ||
        alg == KEYRAFT__ALGORITHM__RSA_4096) {
        assert_true(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0);
        assert_true(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) > 0);
        assert_true(EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", NULL) > 0);
    }
    ok = EVP_DigestVerify(mctx, sig, sig_len, msg, msg_len) == 1;
    EVP_MD_CTX_free(mctx);
    EVP_PKEY_free(pkey);
    return ok;
}

static void sign_roundtrip(crypto_alg alg, const char *md)
{
    static const uint8_t msg[] = "pay 100 to alice";
    secbuf key = {NULL, 0};
    uint8_t *sig = NULL, *spki = NULL, *spki2 = NULL;
    size_t sig_len = 0, spki_len = 0, spki2_len = 0;
    uint8_t bad[sizeof(msg)];
    uint8_t digest[32];
    char kcv[17], hex[17];

    assert_int_equal(crypto_generate(alg, &key), 0);
    assert_non_null(key.data);
    if (secure_heap_on)
        assert_true(CRYPTO_secure_allocated(key.data));
    assert_int_equal(crypto_check_material(alg, key.data, key.len), 0);

    assert_int_equal(crypto_sign(alg, key.data, key.len, msg, sizeof(msg), &sig, &sig_len), 0);
    assert_int_equal(crypto_verify(alg, key.data, key.len, msg, sizeof(msg), sig, sig_len), 0);

    memcpy(bad, msg, sizeof(msg));
    bad[0] ^= 0x01;
    assert_int_equal(crypto_verify(alg, key.data, key.len, bad, sizeof(bad), sig, sig_len),
                     KR_EAUTH);
    assert_int_equal(crypto_verify(alg, key.data, key.len, msg, sizeof(msg), sig, sig_len - 1),
                     KR_EAUTH);

    assert_int_equal(crypto_key_info(alg, key.data, key.len, kcv, &spki, &spki_len), 0);
    assert_non_null(spki);
    assert_int_equal(crypto_verify_public(alg, spki, spki_len, msg, sizeof(msg), sig, sig_len),
                     0);
    assert_int_equal(crypto_verify_public(alg, spki, spki_len, bad, sizeof(bad), sig, sig_len),
                     KR_EAUTH);
    assert_true(independent_verify(alg, spki, spki_len, md, msg, sizeof(msg), sig, sig_len));

    /* The fingerprint is the first 8 bytes of SHA-256 over the SPKI, and stable. */
    assert_int_equal(EVP_Digest(spki, spki_len, digest, NULL, EVP_sha256(), NULL), 1);
    for (int i = 0; i < 8; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    assert_string_equal(kcv, hex);
    assert_int_equal(crypto_key_info(alg, key.data, key.len, hex, &spki2, &spki2_len), 0);
    assert_string_equal(kcv, hex);
    assert_int_equal(spki2_len, spki_len);
    assert_memory_equal(spki2, spki, spki_len);

    /* A signer parses once and signs many times, each verifiable. */
    crypto_signer *signer = NULL;
    assert_int_equal(crypto_signer_new(alg, key.data, key.len, &signer), 0);
    for (int i = 0; i < 3; i++) {
        uint8_t *s2 = NULL;
        size_t s2_len = 0;
        assert_int_equal(crypto_signer_sign(signer, msg, sizeof(msg), &s2, &s2_len), 0);
        assert_int_equal(crypto_verify_public(alg, spki, spki_len, msg, sizeof(msg), s2, s2_len),
                         0);
        free(s2);
    }
    crypto_signer_free(signer);
    signer = NULL;
    assert_int_equal(crypto_signer_new(alg, spki, spki_len, &signer), KR_EINVAL);
    assert_null(signer);
    assert_int_equal(crypto_signer_new(KEYRAFT__ALGORITHM__AES_256, key.data, key.len, &signer),
                     KR_EKEYTYPE);
    crypto_signer_free(NULL);

    /* A private key is not a public key and vice versa. */
    assert_int_equal(crypto_verify_public(alg, key.data, key.len, msg, sizeof(msg), sig,
                                          sig_len), KR_EINVAL);
    assert_int_equal(crypto_check_material(alg, spki, spki_len), KR_EINVAL);

    free(sig);
    free(spki);
    free(spki2);
    secbuf_free(&key);
    assert_null(key.data);
}

static void test_sign_rsa(void **state)
{
    (void)state;
    sign_roundtrip(KEYRAFT__ALGORITHM__RSA_2048, "SHA256");
    sign_roundtrip(KEYRAFT__ALGORITHM__RSA_3072, "SHA256");
    sign_roundtrip(KEYRAFT__ALGORITHM__RSA_4096, "SHA256");
}

static void test_sign_ec(void **state)
{
    (void)state;
    sign_roundtrip(KEYRAFT__ALGORITHM__EC_P256, "SHA256");
    sign_roundtrip(KEYRAFT__ALGORITHM__EC_P384, "SHA384");
    sign_roundtrip(KEYRAFT__ALGORITHM__ED25519, NULL);
}

/* ECDSA over P-384 hashes with SHA-384: a SHA-256 verifier must refuse it. */
static void test_ecdsa_p384_digest(void **state)
{
    static const uint8_t msg[] = "m";
    secbuf key = {NULL, 0};
    uint8_t *sig = NULL, *spki = NULL;
    size_t sig_len = 0, spki_len = 0;
    char kcv[17];
    (void)state;

    assert_int_equal(crypto_generate(KEYRAFT__ALGORITHM__EC_P384, &key), 0);
    assert_int_equal(crypto_sign(KEYRAFT__ALGORITHM__EC_P384, key.data, key.len, msg, 1, &sig,
                                 &sig_len), 0);
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__EC_P384, key.data, key.len, kcv, &spki,
                                     &spki_len), 0);
    assert_false(independent_verify(KEYRAFT__ALGORITHM__EC_P384, spki, spki_len, "SHA256", msg,
                                    1, sig, sig_len));
    assert_true(independent_verify(KEYRAFT__ALGORITHM__EC_P384, spki, spki_len, "SHA384", msg, 1,
                                   sig, sig_len));
    free(sig);
    free(spki);
    secbuf_free(&key);
}

static void test_generate_symmetric(void **state)
{
    static const struct {
        crypto_alg alg;
        size_t len;
    } cases[] = {
        {KEYRAFT__ALGORITHM__AES_128, 16},
        {KEYRAFT__ALGORITHM__AES_256, 32},
        {KEYRAFT__ALGORITHM__HMAC_SHA256, 32},
        {KEYRAFT__ALGORITHM__HMAC_SHA512, 64},
    };
    (void)state;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        secbuf a = {NULL, 0}, b = {NULL, 0};
        assert_int_equal(crypto_generate(cases[i].alg, &a), 0);
        assert_int_equal(crypto_generate(cases[i].alg, &b), 0);
        assert_int_equal(a.len, cases[i].len);
        assert_int_equal(b.len, cases[i].len);
        assert_memory_not_equal(a.data, b.data, a.len);
        if (secure_heap_on)
            assert_true(CRYPTO_secure_allocated(a.data));
        assert_int_equal(crypto_check_material(cases[i].alg, a.data, a.len), 0);
        secbuf_free(&a);
        secbuf_free(&b);
    }
}

static void test_generate_rejects(void **state)
{
    secbuf key = {(uint8_t *)0x1, 7};
    uint8_t k[32] = {0}, *sig = NULL;
    size_t sig_len = 0;
    (void)state;

    assert_int_equal(crypto_generate(KEYRAFT__ALGORITHM__ALG_UNSPECIFIED, &key), KR_EINVAL);
    assert_int_equal(crypto_generate((crypto_alg)99, &key), KR_EINVAL);
    /* Out-params untouched on failure. */
    assert_ptr_equal(key.data, (uint8_t *)0x1);
    assert_int_equal(key.len, 7);
    assert_int_equal(crypto_sign(KEYRAFT__ALGORITHM__AES_256, k, 32, k, 1, &sig, &sig_len),
                     KR_EKEYTYPE);
    assert_null(sig);
    assert_int_equal(crypto_verify(KEYRAFT__ALGORITHM__HMAC_SHA256, k, 32, k, 1, k, 32),
                     KR_EKEYTYPE);
}

static void test_predicates(void **state)
{
    (void)state;
    assert_true(crypto_is_aes(KEYRAFT__ALGORITHM__AES_128));
    assert_true(crypto_is_symmetric(KEYRAFT__ALGORITHM__HMAC_SHA512));
    assert_false(crypto_is_aes(KEYRAFT__ALGORITHM__HMAC_SHA256));
    assert_true(crypto_is_hmac(KEYRAFT__ALGORITHM__HMAC_SHA256));
    assert_true(crypto_is_signing(KEYRAFT__ALGORITHM__ED25519));
    assert_true(crypto_is_signing(KEYRAFT__ALGORITHM__RSA_3072));
    assert_false(crypto_is_signing(KEYRAFT__ALGORITHM__AES_256));
    assert_false(crypto_is_symmetric(KEYRAFT__ALGORITHM__EC_P256));
    assert_false(crypto_is_symmetric(KEYRAFT__ALGORITHM__ALG_UNSPECIFIED));
    assert_false(crypto_is_signing(KEYRAFT__ALGORITHM__ALG_UNSPECIFIED));
}

/* ---- Key check values and material checks ----------------------------------- */

static void test_kcv_symmetric(void **state)
{
    uint8_t zero[32] = {0}, hkey[20], *pub = (uint8_t *)0x1;
    size_t pub_len = 5;
    char kcv[17];
    (void)state;

    /* AES-ECB(0^128, 0^128) = 66e94bd4..., AES-ECB(0^256, 0^128) = dc95c078... */
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__AES_128, zero, 16, kcv, &pub, &pub_len),
                     0);
    assert_string_equal(kcv, "66e94b");
    assert_null(pub);
    assert_int_equal(pub_len, 0);
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__AES_256, zero, 32, kcv, NULL, NULL), 0);
    assert_string_equal(kcv, "dc95c0");

    /* HMAC(0x0b * 20, 0^16), from `openssl dgst -mac HMAC`. */
    memset(hkey, 0x0b, sizeof(hkey));
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__HMAC_SHA256, hkey, 20, kcv, NULL, NULL),
                     0);
    assert_string_equal(kcv, "6e2bc5");
    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__HMAC_SHA512, hkey, 20, kcv, NULL, NULL),
                     0);
    assert_string_equal(kcv, "c66999");

    assert_int_equal(crypto_key_info(KEYRAFT__ALGORITHM__AES_128, zero, 32, kcv, NULL, NULL),
                     KR_EINVAL);
}

static void test_check_material_lengths(void **state)
{
    uint8_t buf[130] = {0};
    (void)state;

    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_128, buf, 16), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_128, buf, 15), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_128, buf, 17), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_128, buf, 32), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_256, buf, 32), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_256, buf, 24), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__AES_256, buf, 33), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__HMAC_SHA256, buf, 16), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__HMAC_SHA512, buf, 128), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__HMAC_SHA256, buf, 15), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__HMAC_SHA512, buf, 129), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, buf, 0), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, buf, 64), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__ALG_UNSPECIFIED, buf, 32),
                     KR_EINVAL);
}

static void test_check_material_mismatch(void **state)
{
    secbuf rsa = {NULL, 0}, p384 = {NULL, 0};
    size_t ed_len;
    uint8_t *ed = ed_pkcs8(&ed_len);
    uint8_t *longer;
    (void)state;

    assert_int_equal(crypto_generate(KEYRAFT__ALGORITHM__RSA_2048, &rsa), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__RSA_2048, rsa.data, rsa.len), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__RSA_3072, rsa.data, rsa.len),
                     KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, rsa.data, rsa.len),
                     KR_EINVAL);

    assert_int_equal(crypto_generate(KEYRAFT__ALGORITHM__EC_P384, &p384), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P384, p384.data, p384.len), 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, p384.data, p384.len),
                     KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__ED25519, p384.data, p384.len),
                     KR_EINVAL);

    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, ed, ed_len), KR_EINVAL);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__RSA_2048, ed, ed_len), KR_EINVAL);

    /* Truncated, and with trailing bytes: material is exactly one DER object. */
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P384, p384.data, p384.len - 1),
                     KR_EINVAL);
    longer = malloc(p384.len + 1);
    assert_non_null(longer);
    memcpy(longer, p384.data, p384.len);
    longer[p384.len] = 0;
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P384, longer, p384.len + 1),
                     KR_EINVAL);
    OPENSSL_cleanse(longer, p384.len + 1);
    free(longer);

    /* Using mismatched material fails the same way. */
    {
        uint8_t *sig = NULL;
        size_t sig_len = 0;
        assert_int_equal(crypto_sign(KEYRAFT__ALGORITHM__EC_P256, p384.data, p384.len,
                                     (const uint8_t *)"x", 1, &sig, &sig_len), KR_EINVAL);
        assert_null(sig);
    }

    secbuf_free(&rsa);
    secbuf_free(&p384);
    OPENSSL_free(ed);
}

/* Legacy SEC1 "EC PRIVATE KEY" DER is not PKCS#8 and is refused. */
static void test_check_material_rejects_sec1(void **state)
{
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    unsigned char *der = NULL;
    int der_len;
    (void)state;

    assert_non_null(pkey);
    der_len = i2d_PrivateKey(pkey, &der);
    assert_true(der_len > 0);
    assert_int_equal(crypto_check_material(KEYRAFT__ALGORITHM__EC_P256, der, (size_t)der_len),
                     KR_EINVAL);
    OPENSSL_clear_free(der, (size_t)der_len);
    EVP_PKEY_free(pkey);
}

/* A bare PKCS#1 RSAPublicKey is not an SPKI and is refused. */
static void test_verify_public_rejects_pkcs1(void **state)
{
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    unsigned char *der = NULL, *spki = NULL;
    uint8_t sig[256] = {0};
    int der_len, spki_len;
    (void)state;

    assert_non_null(pkey);
    der_len = i2d_PublicKey(pkey, &der);
    assert_true(der_len > 0);
    assert_int_equal(crypto_verify_public(KEYRAFT__ALGORITHM__RSA_2048, der, (size_t)der_len,
                                          sig, 1, sig, sizeof(sig)), KR_EINVAL);
    /* The same key as SPKI loads, and the zero signature is simply invalid. */
    spki_len = i2d_PUBKEY(pkey, &spki);
    assert_true(spki_len > 0);
    assert_int_equal(crypto_verify_public(KEYRAFT__ALGORITHM__RSA_2048, spki, (size_t)spki_len,
                                          sig, 1, sig, sizeof(sig)), KR_EAUTH);
    assert_int_equal(crypto_verify_public(KEYRAFT__ALGORITHM__RSA_3072, spki, (size_t)spki_len,
                                          sig, 1, sig, sizeof(sig)), KR_EINVAL);
    OPENSSL_free(der);
    OPENSSL_free(spki);
    EVP_PKEY_free(pkey);
}

static void test_random(void **state)
{
    uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
    (void)state;

    assert_int_equal(crypto_random(a, sizeof(a)), 0);
    assert_int_equal(crypto_random(b, sizeof(b)), 0);
    assert_memory_not_equal(a, zero, sizeof(a));
    assert_memory_not_equal(a, b, sizeof(a));
    assert_int_equal(crypto_random(NULL, 0), 0);
    assert_int_equal(crypto_random(NULL, 1), KR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gcm_kat_tc16),
        cmocka_unit_test(test_gcm_kat_tc14),
        cmocka_unit_test(test_gcm_tamper),
        cmocka_unit_test(test_gcm_roundtrip),
        cmocka_unit_test(test_hmac_kat),
        cmocka_unit_test(test_hmac_verify_rejects),
        cmocka_unit_test(test_kwp_kat),
        cmocka_unit_test(test_kwp_roundtrip_and_tamper),
        cmocka_unit_test(test_ed25519_kat),
        cmocka_unit_test(test_sign_rsa),
        cmocka_unit_test(test_sign_ec),
        cmocka_unit_test(test_ecdsa_p384_digest),
        cmocka_unit_test(test_generate_symmetric),
        cmocka_unit_test(test_generate_rejects),
        cmocka_unit_test(test_predicates),
        cmocka_unit_test(test_kcv_symmetric),
        cmocka_unit_test(test_check_material_lengths),
        cmocka_unit_test(test_check_material_mismatch),
        cmocka_unit_test(test_check_material_rejects_sec1),
        cmocka_unit_test(test_verify_public_rejects_pkcs1),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_gcm_nonces_unique_across_fork),
        cmocka_unit_test(test_public_random_pool),
        cmocka_unit_test(test_secret_random_pool),
    };

    /* Material must land in the secure heap whenever one exists; when it
     * cannot be set up at all the tests still run on the ordinary heap. */
    (void)secmem_init(1u << 20);
    secure_heap_on = CRYPTO_secure_malloc_initialized();
    if (!secure_heap_on)
        fprintf(stderr, "test_crypto: no secure heap, placement checks skipped\n");
    return cmocka_run_group_tests(tests, NULL, NULL);
}
