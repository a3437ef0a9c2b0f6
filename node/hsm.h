/* hsm.h: the node's HSM through PKCS#11 (the only module that sees pkcs11.h).
 * Holds the master wrap key (MWK): AES-256, sensitive, never in host memory. */
#ifndef KR_HSM_H
#define KR_HSM_H

#include <stddef.h>
#include <stdint.h>

struct hsm_config {
    const char *module_path;  /* PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so */
    const char *token_label;  /* the token is found by label: slot ids move */
    const char *pin;          /* user PIN; borrowed, the caller wipes it */
    const char *mwk_label;    /* CKA_LABEL of the MWK */
};

struct hsm;

/* Initialises a fresh token in a free slot of the module with |token_label|,
 * SO PIN and user PIN (C_InitToken + C_InitPIN). KR_EEXIST if a token with
 * that label is already there. */
int hsm_init_token(const char *module_path, const char *token_label,
                   const char *so_pin, const char *pin);

/* Loads the module (p11-kit), finds the token by label, opens a session and
 * logs in. On success *out is owned by the caller (hsm_close). Errors say
 * which step failed and with which CKR_ code, in the log. */
int hsm_open(const struct hsm_config *config, struct hsm **out);
void hsm_close(struct hsm *hsm);

/* Generates the MWK inside the token: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
 * CKA_EXTRACTABLE with CKA_WRAP_WITH_TRUSTED (copyable only under a trusted
 * key, HSM to HSM; never in plaintext). KR_EEXIST if one with the label exists. */
int hsm_generate_mwk(struct hsm *hsm);
/* 0 when the MWK is present, KR_ENOTFOUND otherwise. */
int hsm_find_mwk(struct hsm *hsm);

/* AES-256-GCM with the MWK inside the HSM. Output layout:
 * iv (12) | ciphertext (pt_len) | tag (16); the IV is random. *out is malloc'd
 * (not secret: it is wrapped). */
int hsm_mwk_encrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len,
                    const uint8_t *pt, size_t pt_len, uint8_t **out, size_t *out_len);
/* Inverse of hsm_mwk_encrypt. |out| must hold in_len - 28 bytes (caller owns
 * it: secure heap). KR_EAUTH on a wrong AAD or tampered input. */
int hsm_mwk_decrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);

/* Random bytes from the token's RNG (for the domain keys). */
int hsm_random(struct hsm *hsm, uint8_t *out, size_t len);

/* --- Copying the MWK to a new node's token, HSM to HSM -------------------------
 * The MWK is never plaintext on any host: the new node makes an RSA transport
 * key in its token, a member's token wraps its MWK under that public key
 * (RSA-OAEP, SHA-1: the only OAEP hash SoftHSM 2.6 wraps with), and the new
 * token unwraps it. The blob is safe to send: only the recipient token opens it.
 * Whoever passes an SPKI to hsm_wrap_mwk_for vouches for it (the SO PIN is
 * that authority): the caller must have authenticated the new node first. */

/* On the NEW node: generates an RSA-2048 pair labelled |label| in the token
 * (private: sensitive, never extractable, unwrap only; public: wrap only) and
 * returns the public key as DER SubjectPublicKeyInfo in *out_spki (malloc'd,
 * not secret). KR_EEXIST if an object with that label is already there. */
int hsm_make_transport_key(struct hsm *hsm, const char *label, uint8_t **out_spki,
                           size_t *out_len);

/* On a MEMBER node: wraps the MWK labelled |mwk_label| of token |token_label|
 * under the RSA public key |spki| (DER SubjectPublicKeyInfo, 2048 to 8192
 * bits) and returns the blob in *out_blob (malloc'd, not secret).
 * Standalone, with its own module handle and session, because of how PKCS#11
 * logins work: only the SO may mark the recipient key CKA_TRUSTED (without
 * which the token refuses to wrap the MWK), and login state belongs to the
 * whole process per token, so the SO cannot log in while this process holds
 * the user login. Hence the contract: no struct hsm (or other user session)
 * may be open, or be opened, on that token in this process during the call;
 * close it and reopen it after (KR_EBUSY when one is open, and it is left
 * logged in). Another process (the running node) holding the user login
 * does not matter. The call logs in as SO, imports the key as a session
 * object, logs out, logs in as user, wraps, and destroys the imported key.
 * KR_EPERM on a wrong PIN, KR_ENOTFOUND when the token has no such MWK,
 * KR_EINVAL on an SPKI that is not a fitting RSA key. */
int hsm_wrap_mwk_for(const char *module_path, const char *token_label, const char *so_pin,
                     const char *user_pin, const char *mwk_label, const uint8_t *spki,
                     size_t spki_len, uint8_t **out_blob, size_t *out_len);

/* hsm_wrap_mwk_for from a process that holds |hsm| open on the same token
 * (the running member node): ends this handle's session, wraps, and opens
 * and logs in a new session before returning; other users of |hsm| wait on
 * its lock meanwhile. The MWK handle is looked up again after. */
int hsm_admit_wrap_mwk(struct hsm *hsm, const char *module_path, const char *token_label,
                       const char *so_pin, const char *user_pin, const uint8_t *spki,
                       size_t spki_len, uint8_t **out_blob, size_t *out_len);

/* On the NEW node: unwraps |blob| with the transport key |transport_label|
 * into the token as the MWK (the handle's mwk_label), with the same
 * attributes as hsm_generate_mwk, so this copy can be copied on later; then
 * destroys the transport key pair. KR_EEXIST if the token already has an MWK,
 * KR_ENOTFOUND without that transport key, KR_EAUTH when the blob does not
 * open (tampered, or made for another token: the transport key is kept, so a
 * good blob can follow), KR_EHSM on other token failures. OAEP does not
 * authenticate the sender (the SPKI is public) and SoftHSM does not report
 * an unwrapped key's length: the caller proves the copy by decrypting, with
 * hsm_mwk_decrypt, something the member encrypted under its MWK. */
int hsm_unwrap_mwk(struct hsm *hsm, const char *transport_label, const uint8_t *blob,
                   size_t len);

/* --- The audit signing key -----------------------------------------------------
 * An EC P-256 key pair in the token labelled mwk_label + "-audit": the
 * private half (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, never extractable,
 * CKA_SIGN only) signs audit checkpoints; the public half is a token object
 * too. Each node has its own: it is not copied with the MWK. */

/* Finds the pair, or generates it when neither half is there. Idempotent.
 * KR_EHSM when only one half is on the token (never replaced automatically). */
int hsm_audit_key_ensure(struct hsm *hsm);

/* The audit public key as DER SubjectPublicKeyInfo (malloc'd, not secret),
 * built from the token's CKA_EC_PARAMS and CKA_EC_POINT. KR_ENOTFOUND
 * without the key (hsm_audit_key_ensure first). */
int hsm_audit_public_key(struct hsm *hsm, uint8_t **out_spki, size_t *out_len);

/* ECDSA (CKM_ECDSA) over a SHA-256 |digest| with the audit key inside the
 * token; *out_der_sig is a DER ECDSA-Sig-Value (malloc'd), as OpenSSL's
 * EVP_DigestVerify / EVP_PKEY_verify expect it. */
int hsm_audit_sign(struct hsm *hsm, const uint8_t digest[32], uint8_t **out_der_sig,
                   size_t *out_len);

#define HSM_GCM_IV_LEN 12
#define HSM_GCM_TAG_LEN 16

#endif
