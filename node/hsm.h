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

#define HSM_GCM_IV_LEN 12
#define HSM_GCM_TAG_LEN 16

#endif
