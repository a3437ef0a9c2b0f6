/* crypto.h: key generation and operations on plaintext key material
 * (OpenSSL EVP). Material: raw bytes for AES/HMAC, DER PKCS#8 for RSA, EC and
 * Ed25519. Inputs are the caller's; outputs of secrets go to the secure heap. */
#ifndef KR_CRYPTO_H
#define KR_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#include "keyraft.pb-c.h"
#include "secmem.h"

typedef Keyraft__Algorithm crypto_alg;

int crypto_is_symmetric(crypto_alg alg);  /* AES or HMAC */
int crypto_is_aes(crypto_alg alg);
int crypto_is_hmac(crypto_alg alg);
int crypto_is_signing(crypto_alg alg);    /* RSA, EC, Ed25519 */

/* Fresh material for |alg| (RSA generation takes up to seconds: call it off
 * the loop thread). */
int crypto_generate(crypto_alg alg, secbuf *out_material);

/* Checks imported material fits |alg| (length, key type, curve, modulus
 * size). KR_EINVAL with no detail about the bytes otherwise. */
int crypto_check_material(crypto_alg alg, const uint8_t *material, size_t len);

/* Key check value, hex: AES: first 3 bytes of AES-ECB(key, 0^16); HMAC: first
 * 3 bytes of HMAC(key, 0^16); asymmetric: first 8 bytes of SHA-256(SPKI).
 * For asymmetric keys also the DER SubjectPublicKeyInfo (*out_pub malloc'd,
 * NULL for symmetric). */
int crypto_key_info(crypto_alg alg, const uint8_t *material, size_t len,
                    char out_kcv[17], uint8_t **out_pub, size_t *out_pub_len);

/* SHA-256, fetched once for the process (an implicit fetch per init costs a
 * lock and a lookup). */
struct evp_md_st;
const struct evp_md_st *crypto_sha256(void);

/* AES-GCM with a 256- or 128-bit key. Output: nonce (12, random) | ct | tag (16). */
#define CRYPTO_GCM_NONCE_LEN 12
#define CRYPTO_GCM_TAG_LEN 16
int crypto_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *aad, size_t aad_len,
                    const uint8_t *pt, size_t pt_len, uint8_t *out, size_t *out_len);
/* |out| holds in_len - 28 bytes. KR_EAUTH on tag mismatch (out is wiped). */
int crypto_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);

/* RSA-PSS (SHA-256, salt = digest length), ECDSA (SHA-256 for P-256, SHA-384
 * for P-384, DER signature), Ed25519 (pure). *out_sig malloc'd. */
int crypto_sign(crypto_alg alg, const uint8_t *material, size_t len,
                const uint8_t *msg, size_t msg_len, uint8_t **out_sig, size_t *out_sig_len);
/* A signing key parsed once: decoding PKCS#8 took ~0.5 ms per signature
 * (OpenSSL's decoder), the ECDSA signature itself ~20 us. OpenSSL keeps the
 * private scalars in its secure heap (secmem). Not thread-safe: one user at
 * a time. crypto_signer_free wipes and frees (NULL is fine). */
typedef struct crypto_signer crypto_signer;
int crypto_signer_new(crypto_alg alg, const uint8_t *material, size_t len,
                      crypto_signer **out);
int crypto_signer_sign(crypto_signer *signer, const uint8_t *msg, size_t msg_len,
                       uint8_t **out_sig, size_t *out_sig_len);
void crypto_signer_free(crypto_signer *signer);

/* 0 when valid, KR_EAUTH when not. */
int crypto_verify(crypto_alg alg, const uint8_t *material, size_t len,
                  const uint8_t *msg, size_t msg_len, const uint8_t *sig, size_t sig_len);
/* Verifies with a DER SPKI public key only. */
int crypto_verify_public(crypto_alg alg, const uint8_t *spki, size_t spki_len,
                         const uint8_t *msg, size_t msg_len, const uint8_t *sig, size_t sig_len);

/* HMAC-SHA256 / HMAC-SHA512. |out| holds 64 bytes. */
int crypto_mac(crypto_alg alg, const uint8_t *key, size_t key_len,
               const uint8_t *msg, size_t msg_len, uint8_t *out, size_t *out_len);
/* 0 when |mac| matches (constant time), KR_EAUTH when not. */
int crypto_mac_verify(crypto_alg alg, const uint8_t *key, size_t key_len,
                      const uint8_t *msg, size_t msg_len, const uint8_t *mac, size_t mac_len);

/* AES key wrap with padding (RFC 5649). Wrap output holds in_len + 15 bytes;
 * unwrap output holds in_len bytes (secure heap). KR_EAUTH on integrity failure. */
int crypto_kwp_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t in_len,
                    uint8_t *out, size_t *out_len);
int crypto_kwp_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t in_len,
                      uint8_t *out, size_t *out_len);

/* Secret bytes from OpenSSL's private DRBG (RAND_priv_bytes). With a locked
 * secure heap, draws of up to 64 bytes come from a per-thread pool of its
 * output there, each byte handed out once (crypto.c). */
int crypto_random(uint8_t *out, size_t len);

/* Up to CRYPTO_PUBLIC_RANDOM_MAX bytes for values that are not secret
 * (nonces, key ids), from a per-thread pool of DRBG output: each byte is
 * handed out once. Never for key material: use crypto_random. */
#define CRYPTO_PUBLIC_RANDOM_MAX 64
int crypto_public_random(uint8_t *out, size_t len);

#endif
