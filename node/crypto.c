/* crypto.c: key generation and operations on plaintext key material, over
 * OpenSSL 3.0 EVP only. Stateless but for algorithms fetched once. */
#include "crypto.h"

#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/encoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "keyraft.h"
#include "public_random.h"

#define CRYPTO_HMAC_MIN_KEY 16
#define CRYPTO_HMAC_MAX_KEY 128
#define CRYPTO_GCM_OVERHEAD (CRYPTO_GCM_NONCE_LEN + CRYPTO_GCM_TAG_LEN)
/* EVP takes int lengths; leave room for tag and padding arithmetic. */
#define CRYPTO_MAX_INPUT ((size_t)INT_MAX - 64)
/* An RSA-4096 PKCS#8 is about 2.4 KB: anything past this is not a key. */
#define CRYPTO_MAX_DER 16384
#define CRYPTO_KCV_SYM_BYTES 3
#define CRYPTO_KCV_ASYM_BYTES 8

/* What an asymmetric algorithm means to OpenSSL. */
struct asym_desc {
    crypto_alg alg;
    const char *type;  /* key management name for EVP_PKEY_is_a / decoders */
    int bits;          /* RSA modulus or EC field size; 0 for Ed25519 */
    const char *group; /* EC group name */
    int curve_nid;
    const char *md;    /* signature digest; NULL for pure Ed25519 */
};

static const struct asym_desc asym_table[] = {
    {KEYRAFT__ALGORITHM__RSA_2048, "RSA", 2048, NULL, NID_undef, "SHA256"},
    {KEYRAFT__ALGORITHM__RSA_3072, "RSA", 3072, NULL, NID_undef, "SHA256"},
    {KEYRAFT__ALGORITHM__RSA_4096, "RSA", 4096, NULL, NID_undef, "SHA256"},
    {KEYRAFT__ALGORITHM__EC_P256, "EC", 256, "P-256", NID_X9_62_prime256v1, "SHA256"},
    {KEYRAFT__ALGORITHM__EC_P384, "EC", 384, "P-384", NID_secp384r1, "SHA384"},
    {KEYRAFT__ALGORITHM__ED25519, "ED25519", 0, NULL, NID_undef, NULL},
};

static const struct asym_desc *asym_find(crypto_alg alg)
{
    for (size_t i = 0; i < sizeof(asym_table) / sizeof(asym_table[0]); i++)
        if (asym_table[i].alg == alg)
            return &asym_table[i];
    return NULL;
}

int crypto_is_aes(crypto_alg alg)
{
    return alg == KEYRAFT__ALGORITHM__AES_128 || alg == KEYRAFT__ALGORITHM__AES_256;
}

int crypto_is_hmac(crypto_alg alg)
{
    return alg == KEYRAFT__ALGORITHM__HMAC_SHA256 || alg == KEYRAFT__ALGORITHM__HMAC_SHA512;
}

int crypto_is_symmetric(crypto_alg alg)
{
    return crypto_is_aes(alg) || crypto_is_hmac(alg);
}

int crypto_is_signing(crypto_alg alg)
{
    return asym_find(alg) != NULL;
}

/* KR_EKEYTYPE for a known algorithm that does not fit the operation,
 * KR_EINVAL for a value outside the enum. */
static int wrong_alg(crypto_alg alg)
{
    return crypto_is_symmetric(alg) || crypto_is_signing(alg) ? KR_EKEYTYPE : KR_EINVAL;
}

static size_t aes_key_len(crypto_alg alg)
{
    return alg == KEYRAFT__ALGORITHM__AES_128 ? 16 : 32;
}

static const char *hmac_md(crypto_alg alg)
{
    return alg == KEYRAFT__ALGORITHM__HMAC_SHA256 ? "SHA256" : "SHA512";
}

static size_t hmac_len(crypto_alg alg)
{
    return alg == KEYRAFT__ALGORITHM__HMAC_SHA256 ? 32 : 64;
}

static int hmac_key_ok(size_t len)
{
    return len >= CRYPTO_HMAC_MIN_KEY && len <= CRYPTO_HMAC_MAX_KEY;
}

static void hex_encode(char *out, const uint8_t *in, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
    out[2 * len] = '\0';
}

/* 1 when |pkey| is exactly the key kind |d| names: type, modulus size, curve. */
static int pkey_fits(const struct asym_desc *d, EVP_PKEY *pkey)
{
    char group[64];

    if (!EVP_PKEY_is_a(pkey, d->type))
        return 0;
    if (d->bits != 0 && EVP_PKEY_get_bits(pkey) != d->bits)
        return 0;
    if (d->curve_nid != NID_undef) {
        /* Explicit-parameter keys have no group name and are refused. */
        if (!EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                            sizeof(group), NULL))
            return 0;
        if (OBJ_txt2nid(group) != d->curve_nid)
            return 0;
    }
    return 1;
}

/* Decodes exactly |len| bytes of DER PKCS#8 PrivateKeyInfo holding a key of
 * kind |d|; KR_EINVAL for anything else (SEC1, PKCS#1, trailing bytes). The
 * PKCS#8 parse comes first because OpenSSL's decoders also take the
 * type-specific formats. */
static int load_private(const struct asym_desc *d, const uint8_t *der, size_t len,
                        EVP_PKEY **out_pkey)
{
    PKCS8_PRIV_KEY_INFO *p8 = NULL;
    EVP_PKEY *pkey = NULL;
    const unsigned char *p = der;
    int rc = KR_EINVAL;

    if (der == NULL || len == 0 || len > CRYPTO_MAX_DER)
        return KR_EINVAL;
    p8 = d2i_PKCS8_PRIV_KEY_INFO(NULL, &p, (long)len);
    if (p8 == NULL || p != der + len)
        goto out;
    pkey = EVP_PKCS82PKEY(p8);
    if (pkey == NULL || !pkey_fits(d, pkey))
        goto out;
    *out_pkey = pkey;
    pkey = NULL;
    rc = 0;
out:
    EVP_PKEY_free(pkey);
    PKCS8_PRIV_KEY_INFO_free(p8); /* its ASN.1 callback wipes the key octets */
    return rc;
}

/* Decodes exactly |len| bytes of DER SubjectPublicKeyInfo of kind |d|. */
static int load_public(const struct asym_desc *d, const uint8_t *der, size_t len,
                       EVP_PKEY **out_pkey)
{
    EVP_PKEY *pkey = NULL;
    const unsigned char *p = der;

    if (der == NULL || len == 0 || len > CRYPTO_MAX_DER)
        return KR_EINVAL;
    pkey = d2i_PUBKEY(NULL, &p, (long)len);
    if (pkey == NULL || p != der + len || !pkey_fits(d, pkey)) {
        EVP_PKEY_free(pkey);
        return KR_EINVAL;
    }
    *out_pkey = pkey;
    return 0;
}

/* DER PKCS#8 of |pkey| into the secure heap; the encoder's heap copy is
 * wiped before it is freed. */
static int encode_private(EVP_PKEY *pkey, secbuf *out)
{
    OSSL_ENCODER_CTX *ectx = NULL;
    unsigned char *der = NULL;
    size_t der_len = 0;
    secbuf buf = {NULL, 0};
    int rc = KR_ECRYPTO;

    ectx = OSSL_ENCODER_CTX_new_for_pkey(pkey, EVP_PKEY_KEYPAIR, "DER", "PrivateKeyInfo",
                                         NULL);
    if (ectx == NULL || OSSL_ENCODER_CTX_get_num_encoders(ectx) == 0)
        goto out;
    if (!OSSL_ENCODER_to_data(ectx, &der, &der_len) || der == NULL || der_len == 0)
        goto out;
    rc = secbuf_copy(&buf, der, der_len);
    if (rc != 0)
        goto out;
    *out = buf;
    rc = 0;
out:
    OPENSSL_clear_free(der, der_len);
    OSSL_ENCODER_CTX_free(ectx);
    return rc;
}

static int generate_asym(const struct asym_desc *d, secbuf *out)
{
    EVP_PKEY *pkey = NULL;
    int rc;

    if (d->curve_nid != NID_undef)
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", d->group);
    else if (d->bits != 0)
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)d->bits);
    else
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, d->type);
    if (pkey == NULL)
        return KR_ECRYPTO;
    rc = encode_private(pkey, out);
    EVP_PKEY_free(pkey);
    return rc;
}

/* Key material comes from a per-thread pool of RAND_priv_bytes output in the
 * secure heap, drawn 4 KB at a time: one DRBG call (a lock, a getpid() for
 * OpenSSL's fork check and the CTR-DRBG's rekeying) per key was 4.7% of a
 * leader's loop creating keys. Each byte is handed out once and wiped as it
 * goes; a forked child drops the pool it inherited; a thread's pool is wiped
 * and freed when the thread exits. Pooled bytes are no easier to reach than
 * the DRBG's own state (in OpenSSL's ordinary heap), which predicts every
 * future output. Without a locked secure heap nothing is pooled: material is
 * drawn per call, as it may not outlive a request in unlocked memory. */
#define SECRET_POOL_BYTES 4096
#define SECRET_POOL_MAX_DRAW 64

static __thread uint8_t *secret_pool; /* secure heap */
static __thread size_t secret_pool_left;
static pthread_once_t secret_pool_once = PTHREAD_ONCE_INIT;
static pthread_key_t secret_pool_exit;
static int secret_pool_usable; /* set once, by secret_pool_setup */

static void secret_pool_wipe(void)
{
    if (secret_pool != NULL)
        OPENSSL_cleanse(secret_pool, SECRET_POOL_BYTES);
    secret_pool_left = 0;
}

static void secret_pool_free(void *pool) { secmem_free(pool, SECRET_POOL_BYTES); }

static void secret_pool_setup(void)
{
    secret_pool_usable = pthread_atfork(NULL, NULL, secret_pool_wipe) == 0 &&
                         pthread_key_create(&secret_pool_exit, secret_pool_free) == 0;
}

static int draw_secret(uint8_t *out, size_t len)
{
    ERR_set_mark();
    int ok = RAND_priv_bytes(out, (int)len) == 1;
    ERR_pop_to_mark();
    return ok ? 0 : KR_ECRYPTO;
}

/* |len| <= INT_MAX. */
static int secret_random(uint8_t *out, size_t len)
{
    if (len > SECRET_POOL_MAX_DRAW || !secmem_locked())
        return draw_secret(out, len);
    pthread_once(&secret_pool_once, secret_pool_setup);
    if (!secret_pool_usable)
        return draw_secret(out, len);
    if (secret_pool == NULL) {
        uint8_t *pool = secmem_alloc(SECRET_POOL_BYTES);
        if (pool == NULL)
            return draw_secret(out, len); /* the secure heap is full */
        if (pthread_setspecific(secret_pool_exit, pool) != 0) {
            secmem_free(pool, SECRET_POOL_BYTES);
            return draw_secret(out, len);
        }
        secret_pool = pool;
        secret_pool_left = 0;
    }
    int rv = kr__random_pool_take(secret_pool, SECRET_POOL_BYTES, &secret_pool_left,
                                  RAND_priv_bytes, out, len);
    return rv == 0 ? 0 : KR_ECRYPTO;
}

static int generate_random(size_t len, secbuf *out)
{
    secbuf buf = {NULL, 0};
    int rc;

    rc = secbuf_alloc(&buf, len);
    if (rc != 0)
        return rc;
    if (secret_random(buf.data, len) != 0) {
        secbuf_free(&buf);
        return KR_ECRYPTO;
    }
    *out = buf;
    return 0;
}

int crypto_generate(crypto_alg alg, secbuf *out_material)
{
    const struct asym_desc *d = asym_find(alg);
    int rc;

    if (out_material == NULL)
        return KR_EINVAL;
    ERR_set_mark();
    if (crypto_is_aes(alg))
        rc = generate_random(aes_key_len(alg), out_material);
    else if (crypto_is_hmac(alg))
        rc = generate_random(hmac_len(alg), out_material);
    else if (d != NULL)
        rc = generate_asym(d, out_material);
    else
        rc = KR_EINVAL;
    ERR_pop_to_mark();
    return rc;
}

/* Consistency of an imported private key with its own public half (for RSA
 * also the prime checks: tens of milliseconds at 4096 bits). */
static int pairwise_ok(EVP_PKEY *pkey)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    int ok;

    if (pctx == NULL)
        return 0;
    ok = EVP_PKEY_pairwise_check(pctx) == 1;
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

int crypto_check_material(crypto_alg alg, const uint8_t *material, size_t len)
{
    const struct asym_desc *d = asym_find(alg);
    EVP_PKEY *pkey = NULL;
    int rc = KR_EINVAL;

    if (material == NULL)
        return KR_EINVAL;
    if (crypto_is_aes(alg))
        return len == aes_key_len(alg) ? 0 : KR_EINVAL;
    if (crypto_is_hmac(alg))
        return hmac_key_ok(len) ? 0 : KR_EINVAL;
    if (d == NULL)
        return KR_EINVAL;
    ERR_set_mark();
    rc = load_private(d, material, len, &pkey);
    if (rc != 0)
        goto out;
    rc = pairwise_ok(pkey) ? 0 : KR_EINVAL;
out:
    EVP_PKEY_free(pkey);
    ERR_pop_to_mark();
    return rc;
}

/* First bytes of AES-ECB(key, 0^16). */
static int kcv_aes(crypto_alg alg, const uint8_t *key, size_t len, uint8_t kcv[16])
{
    static const uint8_t zero[16];
    const EVP_CIPHER *cipher;
    EVP_CIPHER_CTX *ctx = NULL;
    int n = 0, fin = 0;
    int rc = KR_ECRYPTO;

    if (len != aes_key_len(alg))
        return KR_EINVAL;
    cipher = len == 16 ? EVP_aes_128_ecb() : EVP_aes_256_ecb();
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return KR_ENOMEM;
    if (EVP_EncryptInit_ex2(ctx, cipher, key, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_set_padding(ctx, 0) != 1 ||
        EVP_EncryptUpdate(ctx, kcv, &n, zero, (int)sizeof(zero)) != 1 ||
        EVP_EncryptFinal_ex(ctx, kcv + n, &fin) != 1 || n + fin != 16)
        goto out;
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

/* First bytes of HMAC(key, 0^16). */
static int kcv_hmac(crypto_alg alg, const uint8_t *key, size_t len, uint8_t mac[64])
{
    static const uint8_t zero[16];
    size_t mac_len = 0;

    if (!hmac_key_ok(len))
        return KR_EINVAL;
    if (EVP_Q_mac(NULL, "HMAC", NULL, hmac_md(alg), NULL, key, len, zero, sizeof(zero), mac,
                  64, &mac_len) == NULL)
        return KR_ECRYPTO;
    return 0;
}

/* SPKI (malloc'd) and fingerprint of an asymmetric key. */
static int key_info_asym(const struct asym_desc *d, const uint8_t *material, size_t len,
                         char out_kcv[17], uint8_t **out_pub, size_t *out_pub_len)
{
    EVP_PKEY *pkey = NULL;
    unsigned char *spki = NULL;
    uint8_t *pub = NULL;
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    int spki_len;
    int rc;

    rc = load_private(d, material, len, &pkey);
    if (rc != 0)
        goto out;
    rc = KR_ECRYPTO;
    spki_len = i2d_PUBKEY(pkey, &spki);
    if (spki_len <= 0 || spki == NULL)
        goto out;
    if (EVP_Digest(spki, (size_t)spki_len, md, &md_len, EVP_sha256(), NULL) != 1)
        goto out;
    if (out_pub != NULL) {
        pub = malloc((size_t)spki_len);
        if (pub == NULL) {
            rc = KR_ENOMEM;
            goto out;
        }
        memcpy(pub, spki, (size_t)spki_len);
        *out_pub = pub;
        *out_pub_len = (size_t)spki_len;
        pub = NULL;
    }
    hex_encode(out_kcv, md, CRYPTO_KCV_ASYM_BYTES);
    rc = 0;
out:
    free(pub);
    OPENSSL_free(spki);
    EVP_PKEY_free(pkey);
    return rc;
}

int crypto_key_info(crypto_alg alg, const uint8_t *material, size_t len,
                    char out_kcv[17], uint8_t **out_pub, size_t *out_pub_len)
{
    const struct asym_desc *d = asym_find(alg);
    uint8_t block[64];
    int rc;

    if (material == NULL || out_kcv == NULL || (out_pub != NULL && out_pub_len == NULL))
        return KR_EINVAL;
    ERR_set_mark();
    if (d != NULL) {
        rc = key_info_asym(d, material, len, out_kcv, out_pub, out_pub_len);
        goto out;
    }
    if (crypto_is_aes(alg))
        rc = kcv_aes(alg, material, len, block);
    else if (crypto_is_hmac(alg))
        rc = kcv_hmac(alg, material, len, block);
    else
        rc = KR_EINVAL;
    if (rc != 0)
        goto out;
    hex_encode(out_kcv, block, CRYPTO_KCV_SYM_BYTES);
    if (out_pub != NULL) {
        *out_pub = NULL;
        *out_pub_len = 0;
    }
out:
    OPENSSL_cleanse(block, sizeof(block));
    ERR_pop_to_mark();
    return rc;
}

/* Algorithms fetched once: passing EVP_aes_256_gcm() or EVP_sha256() makes
 * OpenSSL fetch the implementation again on every init, under its global
 * lock (5% of a node serving 64-byte encrypts). Kept for the process's life. */
static EVP_CIPHER *fetched_gcm128, *fetched_gcm256;
static EVP_MD *fetched_sha256;
static pthread_once_t fetch_once = PTHREAD_ONCE_INIT;

static void fetch_algorithms(void)
{
    fetched_gcm128 = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    fetched_gcm256 = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    fetched_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    ERR_clear_error(); /* a failed fetch falls back to the implicit one */
}

const EVP_MD *crypto_sha256(void)
{
    pthread_once(&fetch_once, fetch_algorithms);
    return fetched_sha256 != NULL ? fetched_sha256 : EVP_sha256();
}

static const EVP_CIPHER *gcm_cipher(size_t key_len)
{
    pthread_once(&fetch_once, fetch_algorithms);
    if (key_len == 16)
        return fetched_gcm128 != NULL ? fetched_gcm128 : EVP_aes_128_gcm();
    if (key_len == 32)
        return fetched_gcm256 != NULL ? fetched_gcm256 : EVP_aes_256_gcm();
    return NULL;
}

/* The pool (client/public_random.c) is shared with libkeyraft's request ids. */
_Static_assert(CRYPTO_PUBLIC_RANDOM_MAX <= KR_PUBLIC_RANDOM_MAX, "the pool's limit");

int crypto_public_random(uint8_t *out, size_t len)
{
    if ((out == NULL && len != 0) || len > CRYPTO_PUBLIC_RANDOM_MAX)
        return KR_EINVAL;
    return kr__public_random(out, len) == 0 ? 0 : KR_ECRYPTO;
}

int crypto_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *aad, size_t aad_len,
                    const uint8_t *pt, size_t pt_len, uint8_t *out, size_t *out_len)
{
    const EVP_CIPHER *cipher = gcm_cipher(key_len);
    EVP_CIPHER_CTX *ctx = NULL;
    uint8_t *ct;
    int n = 0, fin = 0;
    int rc = KR_ECRYPTO;

    if (cipher == NULL || key == NULL || out == NULL || out_len == NULL ||
        (aad == NULL && aad_len != 0) || (pt == NULL && pt_len != 0))
        return KR_EINVAL;
    if (aad_len > CRYPTO_MAX_INPUT || pt_len > CRYPTO_MAX_INPUT)
        return KR_ETOOBIG;
    ct = out + CRYPTO_GCM_NONCE_LEN;
    ERR_set_mark();
    /* A random 96-bit nonce: callers bound the number of seals per key. */
    if (crypto_public_random(out, CRYPTO_GCM_NONCE_LEN) != 0)
        goto out;
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    if (EVP_EncryptInit_ex2(ctx, cipher, key, out, NULL) != 1)
        goto out;
    if (aad_len > 0 && EVP_EncryptUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        goto out;
    n = 0;
    if (pt_len > 0 && EVP_EncryptUpdate(ctx, ct, &n, pt, (int)pt_len) != 1)
        goto out;
    if (EVP_EncryptFinal_ex(ctx, ct + n, &fin) != 1 || (size_t)n + (size_t)fin != pt_len)
        goto out;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, CRYPTO_GCM_TAG_LEN, ct + pt_len) != 1)
        goto out;
    *out_len = pt_len + CRYPTO_GCM_OVERHEAD;
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    ERR_pop_to_mark();
    return rc;
}

int crypto_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len)
{
    const EVP_CIPHER *cipher = gcm_cipher(key_len);
    EVP_CIPHER_CTX *ctx = NULL;
    uint8_t tag[CRYPTO_GCM_TAG_LEN];
    size_t ct_len;
    int n = 0, fin = 0;
    int rc = KR_ECRYPTO;

    if (cipher == NULL || key == NULL || in == NULL || out_len == NULL ||
        (aad == NULL && aad_len != 0) || in_len < CRYPTO_GCM_OVERHEAD)
        return KR_EINVAL;
    ct_len = in_len - CRYPTO_GCM_OVERHEAD;
    if (out == NULL && ct_len != 0)
        return KR_EINVAL;
    if (aad_len > CRYPTO_MAX_INPUT || ct_len > CRYPTO_MAX_INPUT)
        return KR_ETOOBIG;
    memcpy(tag, in + CRYPTO_GCM_NONCE_LEN + ct_len, sizeof(tag));
    ERR_set_mark();
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    if (EVP_DecryptInit_ex2(ctx, cipher, key, in, NULL) != 1)
        goto out;
    if (aad_len > 0 && EVP_DecryptUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        goto out;
    n = 0;
    if (ct_len > 0 &&
        EVP_DecryptUpdate(ctx, out, &n, in + CRYPTO_GCM_NONCE_LEN, (int)ct_len) != 1)
        goto out;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, CRYPTO_GCM_TAG_LEN, tag) != 1)
        goto out;
    if (EVP_DecryptFinal_ex(ctx, out == NULL ? NULL : out + n, &fin) != 1) {
        rc = KR_EAUTH;
        goto out;
    }
    if ((size_t)n + (size_t)fin != ct_len)
        goto out;
    *out_len = ct_len;
    rc = 0;
out:
    /* Unauthenticated plaintext never reaches the caller. */
    if (rc != 0 && ct_len > 0)
        OPENSSL_cleanse(out, ct_len);
    EVP_CIPHER_CTX_free(ctx);
    ERR_pop_to_mark();
    return rc;
}

/* RSA-PSS, SHA-256, MGF1-SHA-256, salt = digest length: sign and verify alike
 * (verification refuses any other salt length). */
static int set_pss(EVP_PKEY_CTX *pctx)
{
    return EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
           EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) > 0 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", NULL) > 0;
}

static int is_rsa(const struct asym_desc *d)
{
    return d->curve_nid == NID_undef && d->bits != 0;
}

struct crypto_signer {
    const struct asym_desc *desc;
    EVP_PKEY *pkey;
};

int crypto_signer_new(crypto_alg alg, const uint8_t *material, size_t len,
                      crypto_signer **out)
{
    const struct asym_desc *d = asym_find(alg);
    if (d == NULL)
        return wrong_alg(alg);
    if (out == NULL)
        return KR_EINVAL;
    crypto_signer *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return KR_ENOMEM;
    ERR_set_mark();
    int rc = load_private(d, material, len, &s->pkey);
    ERR_pop_to_mark();
    if (rc != 0) {
        free(s);
        return rc;
    }
    s->desc = d;
    *out = s;
    return 0;
}

void crypto_signer_free(crypto_signer *signer)
{
    if (signer == NULL)
        return;
    EVP_PKEY_free(signer->pkey); /* OpenSSL clears private key material on free */
    free(signer);
}

int crypto_signer_sign(crypto_signer *signer, const uint8_t *msg, size_t msg_len,
                       uint8_t **out_sig, size_t *out_sig_len)
{
    static const uint8_t empty[1];
    EVP_MD_CTX *mctx = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    uint8_t *sig = NULL;
    size_t sig_len;
    int rc = KR_ECRYPTO;

    if (signer == NULL || out_sig == NULL || out_sig_len == NULL || (msg == NULL && msg_len != 0))
        return KR_EINVAL;
    if (msg == NULL)
        msg = empty;
    const struct asym_desc *d = signer->desc;
    ERR_set_mark();
    int size = EVP_PKEY_get_size(signer->pkey);
    if (size <= 0)
        goto out;
    sig_len = (size_t)size;
    sig = malloc(sig_len);
    mctx = EVP_MD_CTX_new();
    if (sig == NULL || mctx == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    if (EVP_DigestSignInit_ex(mctx, &pctx, d->md, NULL, NULL, signer->pkey, NULL) != 1)
        goto out;
    if (is_rsa(d) && !set_pss(pctx))
        goto out;
    if (EVP_DigestSign(mctx, sig, &sig_len, msg, msg_len) != 1)
        goto out;
    *out_sig = sig;
    *out_sig_len = sig_len;
    sig = NULL;
    rc = 0;
out:
    free(sig);
    EVP_MD_CTX_free(mctx);
    ERR_pop_to_mark();
    return rc;
}

int crypto_sign(crypto_alg alg, const uint8_t *material, size_t len,
                const uint8_t *msg, size_t msg_len, uint8_t **out_sig, size_t *out_sig_len)
{
    crypto_signer *signer = NULL;
    if (out_sig == NULL || out_sig_len == NULL || (msg == NULL && msg_len != 0))
        return asym_find(alg) == NULL ? wrong_alg(alg) : KR_EINVAL;
    int rc = crypto_signer_new(alg, material, len, &signer);
    if (rc == 0)
        rc = crypto_signer_sign(signer, msg, msg_len, out_sig, out_sig_len);
    crypto_signer_free(signer);
    return rc;
}

/* 0 when |sig| is valid for |msg| under |pkey|, KR_EAUTH otherwise. */
static int verify_pkey(const struct asym_desc *d, EVP_PKEY *pkey, const uint8_t *msg,
                       size_t msg_len, const uint8_t *sig, size_t sig_len)
{
    static const uint8_t empty[1];
    EVP_MD_CTX *mctx = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    int rc = KR_ECRYPTO;

    if (sig_len == 0)
        return KR_EAUTH;
    if (msg == NULL)
        msg = empty;
    mctx = EVP_MD_CTX_new();
    if (mctx == NULL)
        return KR_ENOMEM;
    if (EVP_DigestVerifyInit_ex(mctx, &pctx, d->md, NULL, NULL, pkey, NULL) != 1)
        goto out;
    if (is_rsa(d) && !set_pss(pctx))
        goto out;
    /* 0 is a bad signature, < 0 a malformed one: both are not valid. */
    rc = EVP_DigestVerify(mctx, sig, sig_len, msg, msg_len) == 1 ? 0 : KR_EAUTH;
out:
    EVP_MD_CTX_free(mctx);
    return rc;
}

int crypto_verify(crypto_alg alg, const uint8_t *material, size_t len,
                  const uint8_t *msg, size_t msg_len, const uint8_t *sig, size_t sig_len)
{
    const struct asym_desc *d = asym_find(alg);
    EVP_PKEY *pkey = NULL;
    int rc;

    if (d == NULL)
        return wrong_alg(alg);
    if ((msg == NULL && msg_len != 0) || (sig == NULL && sig_len != 0))
        return KR_EINVAL;
    ERR_set_mark();
    rc = load_private(d, material, len, &pkey);
    if (rc == 0)
        rc = verify_pkey(d, pkey, msg, msg_len, sig, sig_len);
    EVP_PKEY_free(pkey);
    ERR_pop_to_mark();
    return rc;
}

int crypto_verify_public(crypto_alg alg, const uint8_t *spki, size_t spki_len,
                         const uint8_t *msg, size_t msg_len, const uint8_t *sig, size_t sig_len)
{
    const struct asym_desc *d = asym_find(alg);
    EVP_PKEY *pkey = NULL;
    int rc;

    if (d == NULL)
        return wrong_alg(alg);
    if ((msg == NULL && msg_len != 0) || (sig == NULL && sig_len != 0))
        return KR_EINVAL;
    ERR_set_mark();
    rc = load_public(d, spki, spki_len, &pkey);
    if (rc == 0)
        rc = verify_pkey(d, pkey, msg, msg_len, sig, sig_len);
    EVP_PKEY_free(pkey);
    ERR_pop_to_mark();
    return rc;
}

int crypto_mac(crypto_alg alg, const uint8_t *key, size_t key_len,
               const uint8_t *msg, size_t msg_len, uint8_t *out, size_t *out_len)
{
    static const uint8_t empty[1];
    size_t mac_len = 0;
    int rc = 0;

    if (!crypto_is_hmac(alg))
        return wrong_alg(alg);
    if (key == NULL || !hmac_key_ok(key_len) || out == NULL || out_len == NULL ||
        (msg == NULL && msg_len != 0))
        return KR_EINVAL;
    if (msg == NULL)
        msg = empty;
    ERR_set_mark();
    if (EVP_Q_mac(NULL, "HMAC", NULL, hmac_md(alg), NULL, key, key_len, msg, msg_len, out,
                  EVP_MAX_MD_SIZE, &mac_len) == NULL ||
        mac_len != hmac_len(alg))
        rc = KR_ECRYPTO;
    else
        *out_len = mac_len;
    ERR_pop_to_mark();
    return rc;
}

int crypto_mac_verify(crypto_alg alg, const uint8_t *key, size_t key_len,
                      const uint8_t *msg, size_t msg_len, const uint8_t *mac, size_t mac_len)
{
    uint8_t expect[EVP_MAX_MD_SIZE];
    size_t expect_len = 0;
    int rc;

    if (mac == NULL && mac_len != 0)
        return KR_EINVAL;
    rc = crypto_mac(alg, key, key_len, msg, msg_len, expect, &expect_len);
    if (rc != 0)
        return rc;
    /* Full-length tags only: a truncated MAC is a forgery aid, not a MAC. */
    if (mac_len != expect_len || CRYPTO_memcmp(expect, mac, expect_len) != 0)
        rc = KR_EAUTH;
    OPENSSL_cleanse(expect, sizeof(expect));
    return rc;
}

static const EVP_CIPHER *kwp_cipher(size_t kek_len)
{
    if (kek_len == 16)
        return EVP_aes_128_wrap_pad();
    if (kek_len == 24)
        return EVP_aes_192_wrap_pad();
    if (kek_len == 32)
        return EVP_aes_256_wrap_pad();
    return NULL;
}

/* One pass of RFC 5649 in direction |enc|; 0 or -1 from EVP is reported as
 * KR_EAUTH when unwrapping (the integrity check), KR_ECRYPTO when wrapping. */
static int kwp_run(int enc, const uint8_t *kek, size_t kek_len, const uint8_t *in,
                   size_t in_len, uint8_t *out, size_t *out_len)
{
    const EVP_CIPHER *cipher = kwp_cipher(kek_len);
    EVP_CIPHER_CTX *ctx = NULL;
    int n = 0, fin = 0;
    int rc = KR_ECRYPTO;

    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return KR_ENOMEM;
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    if (EVP_CipherInit_ex2(ctx, cipher, kek, NULL, enc, NULL) != 1)
        goto out;
    if (EVP_CipherUpdate(ctx, out, &n, in, (int)in_len) != 1 ||
        EVP_CipherFinal_ex(ctx, out + n, &fin) != 1) {
        rc = enc ? KR_ECRYPTO : KR_EAUTH;
        goto out;
    }
    *out_len = (size_t)n + (size_t)fin;
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int crypto_kwp_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t in_len,
                    uint8_t *out, size_t *out_len)
{
    size_t wrapped = 0;
    int rc;

    if (kwp_cipher(kek_len) == NULL || kek == NULL || in == NULL || in_len == 0 ||
        out == NULL || out_len == NULL)
        return KR_EINVAL;
    if (in_len > CRYPTO_MAX_INPUT)
        return KR_ETOOBIG;
    ERR_set_mark();
    rc = kwp_run(1, kek, kek_len, in, in_len, out, &wrapped);
    /* RFC 5649: 8-byte AIV then the input padded to a multiple of 8. */
    if (rc == 0 && wrapped != 8 + (in_len + 7) / 8 * 8)
        rc = KR_ECRYPTO;
    if (rc == 0)
        *out_len = wrapped;
    ERR_pop_to_mark();
    return rc;
}

int crypto_kwp_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t in_len,
                      uint8_t *out, size_t *out_len)
{
    size_t plain = 0;
    int rc;

    if (kwp_cipher(kek_len) == NULL || kek == NULL || in == NULL || out == NULL ||
        out_len == NULL || in_len < 16 || in_len % 8 != 0)
        return KR_EINVAL;
    if (in_len > CRYPTO_MAX_INPUT)
        return KR_ETOOBIG;
    ERR_set_mark();
    rc = kwp_run(0, kek, kek_len, in, in_len, out, &plain);
    if (rc == 0 && (plain == 0 || plain > in_len - 8))
        rc = KR_ECRYPTO;
    if (rc == 0)
        *out_len = plain;
    else
        OPENSSL_cleanse(out, in_len - 8);
    ERR_pop_to_mark();
    return rc;
}

int crypto_random(uint8_t *out, size_t len)
{
    int rc = 0;

    if (out == NULL && len != 0)
        return KR_EINVAL;
    while (len > 0 && rc == 0) {
        size_t chunk = len > (size_t)INT_MAX ? (size_t)INT_MAX : len;
        rc = secret_random(out, chunk);
        out += chunk;
        len -= chunk;
    }
    return rc;
}
