/* keyring.h: the key hierarchy. MWK (in the HSM) wraps domain keys; domain keys
 * live in the secure heap and seal each key version's material with
 * AES-256-GCM, AAD = "keyraft-key-v1" | domain | key id | version | algorithm
 * (length-prefixed), so a blob moved to another key, version, domain or
 * algorithm does not open. */
#ifndef KR_KEYRING_H
#define KR_KEYRING_H

#include <stddef.h>
#include <stdint.h>

#include "crypto.h"
#include "hsm.h"
#include "secmem.h"

struct keyring;

/* |hsm| is borrowed and must outlive the keyring. */
int keyring_new(struct hsm *hsm, struct keyring **out);
/* Wipes every domain key. Accepts NULL. */
void keyring_free(struct keyring *keyring);

/* Makes a new domain key (HSM RNG), wraps it under the MWK (AAD binds the
 * domain id) and loads it. *out_wrapped is malloc'd; it is safe to store. */
int keyring_create_domain(struct keyring *keyring, const char *domain_id,
                          uint8_t **out_wrapped, size_t *out_wrapped_len);
/* Unwraps a stored domain key through the HSM into the secure heap. Loading
 * an already loaded domain is a no-op. KR_EAUTH when the blob does not open
 * under this MWK with this domain id. */
int keyring_load_domain(struct keyring *keyring, const char *domain_id,
                        const uint8_t *wrapped, size_t wrapped_len);
/* Wipes and forgets a loaded domain key: for a created domain whose
 * proposal failed, so that only committed domain keys stay loaded. */
int keyring_unload_domain(struct keyring *keyring, const char *domain_id);
int keyring_has_domain(const struct keyring *keyring, const char *domain_id);

/* Seals |material| for key |key_id| version |version|. *out_sealed is
 * malloc'd: nonce | ciphertext | tag. KR_ENOTFOUND for an unloaded domain. */
int keyring_seal(struct keyring *keyring, const char *domain_id, const char *key_id,
                 uint32_t version, crypto_alg alg, const uint8_t *material, size_t len,
                 uint8_t **out_sealed, size_t *out_sealed_len);
/* Opens a sealed blob into |out| (secure heap; secbuf_free it). KR_EAUTH when
 * the blob was tampered with or is bound to other metadata. AES and HMAC
 * material stays cached (see keyring_cache_expire): opening the same blob
 * for the same key, version, domain and algorithm again is a copy. */
int keyring_unseal(struct keyring *keyring, const char *domain_id, const char *key_id,
                   uint32_t version, crypto_alg alg, const uint8_t *sealed, size_t sealed_len,
                   secbuf *out);
/* keyring_unseal without the copy: runs |use| on the material, which is
 * valid only during the call. A cached version is used in place, with the
 * cache locked: |use| makes no keyring call. The return is the unseal's
 * status; |use| reports its own through |arg|, and is not run on failure. */
typedef void (*keyring_use_fn)(void *arg, const uint8_t *material, size_t len);
int keyring_use(struct keyring *keyring, const char *domain_id, const char *key_id,
                uint32_t version, crypto_alg alg, const uint8_t *sealed, size_t sealed_len,
                keyring_use_fn use, void *arg);

/* Unsealed AES and HMAC versions held in the secure heap: at most this many,
 * each dropped (wiped) when another version takes its slot, when its domain
 * is unloaded, or by keyring_cache_expire. Thread-safe. */
#define KEYRING_CACHE_SLOTS 1024
/* Wipes every cached version not used for |max_idle_ms| (0: all of them):
 * so a destroyed key, which is never opened again, leaves memory. */
void keyring_cache_expire(struct keyring *keyring, uint64_t max_idle_ms);
/* Asks |still_sealed| about every cached version (its domain, key id,
 * version and the sealed blob it was opened from) and wipes those it answers
 * 0 for: run it after commits so a destroyed version leaves memory at once
 * rather than when idle. Called with the cache locked: no keyring calls. */
typedef int (*keyring_still_sealed_cb)(void *arg, const char *domain_id, const char *key_id,
                                       uint32_t version, const uint8_t *sealed,
                                       size_t sealed_len);
void keyring_cache_sweep(struct keyring *keyring, keyring_still_sealed_cb still_sealed,
                         void *arg);
/* Off by default (the owner knows whether memory is locked); off wipes what
 * is held and opens every blob on each use. */
void keyring_cache_enable(struct keyring *keyring, int enabled);
struct keyring_cache_stats {
    uint64_t hits, misses;
    size_t entries;
};
void keyring_cache_stats(struct keyring *keyring, struct keyring_cache_stats *out);

#endif
