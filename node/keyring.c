/* keyring.c: domain keys in the secure heap, wrapped by the MWK in the HSM, and
 * sealing of key material under them. */
#include "keyring.h"

#define KR_LOG_MODULE "keyring"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hash.h"
#include "keyraft.h"
#include "log.h"

#define KEYRING_DOMAIN_KEY_LEN 32
/* Domain and key ids are bounded so the AAD fits on the stack. */
#define KEYRING_ID_MAX 256
#define KEYRING_WRAPPED_LEN (HSM_GCM_IV_LEN + KEYRING_DOMAIN_KEY_LEN + HSM_GCM_TAG_LEN)
#define KEYRING_SEAL_OVERHEAD (CRYPTO_GCM_NONCE_LEN + CRYPTO_GCM_TAG_LEN)

/* AAD of a wrapped domain key: this prefix, then the domain id. */
static const char domain_aad_prefix[] = "keyraft-domain-v1";
/* AAD of sealed material: this prefix, then u32 BE length + domain id, u32 BE
 * length + key id, u32 BE version, u32 BE algorithm. */
static const char key_aad_prefix[] = "keyraft-key-v1";

#define DOMAIN_AAD_MAX (sizeof(domain_aad_prefix) - 1 + KEYRING_ID_MAX)
#define KEY_AAD_MAX (sizeof(key_aad_prefix) - 1 + 4 + KEYRING_ID_MAX + 4 + KEYRING_ID_MAX + 4 + 4)

struct domain {
    char *id;
    secbuf key;
};

/* One unsealed symmetric key version. |ident| (normal heap, nothing secret
 * in it) is the unseal's AAD followed by the sealed blob: a hit needs both
 * byte for byte, so a blob moved onto another key, version, domain or
 * algorithm still does not open. |material| is in the secure heap. */
struct unsealed {
    uint8_t *ident;
    size_t aad_len, sealed_len;
    secbuf material;
    uint64_t last_used_ms;
};

struct keyring {
    struct hsm *hsm;
    /* Many service threads seal and unseal; loading a domain is rare. */
    pthread_rwlock_t lock;
    struct domain *domains;
    size_t n_domains;
    size_t cap_domains;
    /* Opening a sealed version (a fresh GCM context and key schedule each
     * time) was 10% of a node serving 64-byte encrypts. Direct-mapped by the
     * AAD's hash; only AES and HMAC material (at most 128 bytes) is kept. */
    pthread_mutex_t cache_lock;
    struct unsealed cache[KEYRING_CACHE_SLOTS];
    size_t cache_entries;
    uint64_t cache_hits, cache_misses;
    int cache_enabled;
};

#define KEYRING_CACHE_MATERIAL_MAX 128

static uint64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Caller holds cache_lock. */
static void unsealed_drop(struct keyring *keyring, struct unsealed *u)
{
    if (u->ident == NULL)
        return;
    secbuf_free(&u->material);
    free(u->ident);
    memset(u, 0, sizeof(*u));
    keyring->cache_entries--;
}

static void cache_clear(struct keyring *keyring)
{
    pthread_mutex_lock(&keyring->cache_lock);
    for (size_t i = 0; i < KEYRING_CACHE_SLOTS; i++)
        unsealed_drop(keyring, &keyring->cache[i]);
    pthread_mutex_unlock(&keyring->cache_lock);
}

static int cacheable(struct keyring *keyring, crypto_alg alg, size_t sealed_len)
{
    return __atomic_load_n(&keyring->cache_enabled, __ATOMIC_RELAXED) &&
           crypto_is_symmetric(alg) &&
           sealed_len - KEYRING_SEAL_OVERHEAD <= KEYRING_CACHE_MATERIAL_MAX;
}

/* Two-way: a version may sit in either entry of its bucket, so two hot
 * versions whose hashes meet do not evict each other on every use (16 hot
 * keys in a direct-mapped table of 1,024 collide one time in nine). */
#define CACHE_WAYS 2

static struct unsealed *cache_bucket(struct keyring *keyring, const uint8_t *aad,
                                     size_t aad_len)
{
    uint64_t h = kr_hash_bytes(KR_HASH_INIT, aad, aad_len);
    return &keyring->cache[(h % (KEYRING_CACHE_SLOTS / CACHE_WAYS)) * CACHE_WAYS];
}

static int holds_aad(const struct unsealed *u, const uint8_t *aad, size_t aad_len)
{
    return u->ident != NULL && u->aad_len == aad_len && memcmp(u->ident, aad, aad_len) == 0;
}

/* The entry holding exactly this blob for this AAD, or NULL; counts the
 * hit or miss. Caller holds cache_lock. */
static struct unsealed *cache_find_locked(struct keyring *keyring, const uint8_t *aad,
                                          size_t aad_len, const uint8_t *sealed,
                                          size_t sealed_len)
{
    struct unsealed *bucket = cache_bucket(keyring, aad, aad_len);
    for (int way = 0; way < CACHE_WAYS; way++) {
        struct unsealed *u = &bucket[way];
        if (holds_aad(u, aad, aad_len) && u->sealed_len == sealed_len &&
            memcmp(u->ident + aad_len, sealed, sealed_len) == 0) {
            u->last_used_ms = monotonic_ms();
            keyring->cache_hits++;
            return u;
        }
    }
    keyring->cache_misses++;
    return NULL;
}

/* Best effort: with no memory the next unseal opens the blob again. */
static void cache_put(struct keyring *keyring, const uint8_t *aad, size_t aad_len,
                      const uint8_t *sealed, size_t sealed_len, const secbuf *material)
{
    struct unsealed fresh = {0};
    fresh.ident = malloc(aad_len + sealed_len);
    if (fresh.ident == NULL || secbuf_copy(&fresh.material, material->data, material->len)) {
        free(fresh.ident);
        return;
    }
    memcpy(fresh.ident, aad, aad_len);
    memcpy(fresh.ident + aad_len, sealed, sealed_len);
    fresh.aad_len = aad_len;
    fresh.sealed_len = sealed_len;
    fresh.last_used_ms = monotonic_ms();
    pthread_mutex_lock(&keyring->cache_lock);
    /* The entry for this AAD if one is held (another blob of it), else an
     * empty one, else the one used least recently. */
    struct unsealed *bucket = cache_bucket(keyring, aad, aad_len), *u = &bucket[0];
    for (int way = 0; way < CACHE_WAYS; way++) {
        struct unsealed *w = &bucket[way];
        if (holds_aad(w, aad, aad_len)) {
            u = w;
            break;
        }
        if (u->ident != NULL && (w->ident == NULL || w->last_used_ms < u->last_used_ms))
            u = w;
    }
    unsealed_drop(keyring, u);
    *u = fresh;
    keyring->cache_entries++;
    pthread_mutex_unlock(&keyring->cache_lock);
}

void keyring_cache_expire(struct keyring *keyring, uint64_t max_idle_ms)
{
    if (keyring == NULL)
        return;
    uint64_t now = monotonic_ms();
    pthread_mutex_lock(&keyring->cache_lock);
    for (size_t i = 0; i < KEYRING_CACHE_SLOTS && keyring->cache_entries > 0; i++) {
        struct unsealed *u = &keyring->cache[i];
        if (u->ident != NULL && now - u->last_used_ms >= max_idle_ms)
            unsealed_drop(keyring, u);
    }
    pthread_mutex_unlock(&keyring->cache_lock);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The domain, key id and version key_aad put in |aad|; 0 if it is not one. */
static int key_aad_parse(const uint8_t *aad, size_t len, char domain[KEYRING_ID_MAX + 1],
                         char key_id[KEYRING_ID_MAX + 1], uint32_t *version)
{
    size_t off = sizeof(key_aad_prefix) - 1;
    char *out[2] = {domain, key_id};
    for (int i = 0; i < 2; i++) {
        if (len < off + 4)
            return 0;
        uint32_t n = get_u32(aad + off);
        off += 4;
        if (n == 0 || n > KEYRING_ID_MAX || len < off + n)
            return 0;
        memcpy(out[i], aad + off, n);
        out[i][n] = '\0';
        off += n;
    }
    if (len != off + 8)
        return 0;
    *version = get_u32(aad + off);
    return 1;
}

void keyring_cache_sweep(struct keyring *keyring, keyring_still_sealed_cb still_sealed,
                         void *arg)
{
    if (keyring == NULL)
        return;
    char domain[KEYRING_ID_MAX + 1], key_id[KEYRING_ID_MAX + 1];
    uint32_t version = 0;
    pthread_mutex_lock(&keyring->cache_lock);
    for (size_t i = 0; i < KEYRING_CACHE_SLOTS && keyring->cache_entries > 0; i++) {
        struct unsealed *u = &keyring->cache[i];
        if (u->ident == NULL)
            continue;
        if (!key_aad_parse(u->ident, u->aad_len, domain, key_id, &version) ||
            !still_sealed(arg, domain, key_id, version, u->ident + u->aad_len, u->sealed_len))
            unsealed_drop(keyring, u);
    }
    pthread_mutex_unlock(&keyring->cache_lock);
}

void keyring_cache_enable(struct keyring *keyring, int enabled)
{
    __atomic_store_n(&keyring->cache_enabled, enabled != 0, __ATOMIC_RELAXED);
    if (!enabled)
        cache_clear(keyring);
}

void keyring_cache_stats(struct keyring *keyring, struct keyring_cache_stats *out)
{
    pthread_mutex_lock(&keyring->cache_lock);
    out->hits = keyring->cache_hits;
    out->misses = keyring->cache_misses;
    out->entries = keyring->cache_entries;
    pthread_mutex_unlock(&keyring->cache_lock);
}

static int id_valid(const char *id)
{
    if (id == NULL)
        return 0;
    size_t n = strnlen(id, KEYRING_ID_MAX + 1);
    return n > 0 && n <= KEYRING_ID_MAX;
}

static size_t put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return 4;
}

static size_t domain_aad(uint8_t out[DOMAIN_AAD_MAX], const char *domain_id)
{
    size_t n = sizeof(domain_aad_prefix) - 1, id_len = strlen(domain_id);
    memcpy(out, domain_aad_prefix, n);
    memcpy(out + n, domain_id, id_len);
    return n + id_len;
}

static size_t key_aad(uint8_t out[KEY_AAD_MAX], const char *domain_id, const char *key_id,
                      uint32_t version, crypto_alg alg)
{
    size_t n = sizeof(key_aad_prefix) - 1;
    size_t domain_len = strlen(domain_id), key_len = strlen(key_id);
    memcpy(out, key_aad_prefix, n);
    n += put_u32(out + n, (uint32_t)domain_len);
    memcpy(out + n, domain_id, domain_len);
    n += domain_len;
    n += put_u32(out + n, (uint32_t)key_len);
    memcpy(out + n, key_id, key_len);
    n += key_len;
    n += put_u32(out + n, version);
    n += put_u32(out + n, (uint32_t)alg);
    return n;
}

/* Caller holds the lock (read or write). */
static struct domain *domain_find(const struct keyring *keyring, const char *domain_id)
{
    for (size_t i = 0; i < keyring->n_domains; i++)
        if (strcmp(keyring->domains[i].id, domain_id) == 0)
            return &keyring->domains[i];
    return NULL;
}

/* Takes |key| on success (it is left {NULL, 0}); KR_EEXIST when the domain is
 * already loaded. Caller holds the write lock. */
static int domain_insert_locked(struct keyring *keyring, const char *domain_id, secbuf *key)
{
    if (domain_find(keyring, domain_id) != NULL)
        return KR_EEXIST;
    if (keyring->n_domains == keyring->cap_domains) {
        size_t cap = keyring->cap_domains ? keyring->cap_domains * 2 : 8;
        struct domain *grown = realloc(keyring->domains, cap * sizeof(*grown));
        if (grown == NULL)
            return KR_ENOMEM;
        keyring->domains = grown;
        keyring->cap_domains = cap;
    }
    char *id = strdup(domain_id);
    if (id == NULL)
        return KR_ENOMEM;
    keyring->domains[keyring->n_domains++] = (struct domain){id, *key};
    key->data = NULL;
    key->len = 0;
    return 0;
}

int keyring_new(struct hsm *hsm, struct keyring **out)
{
    if (hsm == NULL || out == NULL)
        return KR_EINVAL;
    struct keyring *keyring = calloc(1, sizeof(*keyring));
    if (keyring == NULL)
        return KR_ENOMEM;
    if (pthread_rwlock_init(&keyring->lock, NULL) != 0) {
        free(keyring);
        return KR_EINTERNAL;
    }
    if (pthread_mutex_init(&keyring->cache_lock, NULL) != 0) {
        pthread_rwlock_destroy(&keyring->lock);
        free(keyring);
        return KR_EINTERNAL;
    }
    keyring->hsm = hsm;
    *out = keyring;
    return 0;
}

void keyring_free(struct keyring *keyring)
{
    if (keyring == NULL)
        return;
    cache_clear(keyring);
    pthread_mutex_destroy(&keyring->cache_lock);
    for (size_t i = 0; i < keyring->n_domains; i++) {
        secbuf_free(&keyring->domains[i].key);
        free(keyring->domains[i].id);
    }
    free(keyring->domains);
    pthread_rwlock_destroy(&keyring->lock);
    free(keyring);
}

int keyring_unload_domain(struct keyring *keyring, const char *domain_id)
{
    int rv = KR_ENOTFOUND;
    pthread_rwlock_wrlock(&keyring->lock);
    for (size_t i = 0; i < keyring->n_domains; i++) {
        if (strcmp(keyring->domains[i].id, domain_id) != 0)
            continue;
        secbuf_free(&keyring->domains[i].key);
        free(keyring->domains[i].id);
        keyring->domains[i] = keyring->domains[--keyring->n_domains];
        rv = 0;
        break;
    }
    pthread_rwlock_unlock(&keyring->lock);
    /* The domain's keys go with it: unseals of other domains open again. */
    if (rv == 0)
        cache_clear(keyring);
    return rv;
}

int keyring_create_domain(struct keyring *keyring, const char *domain_id, uint8_t **out_wrapped,
                          size_t *out_wrapped_len)
{
    secbuf key = {NULL, 0};
    uint8_t *wrapped = NULL;
    size_t wrapped_len = 0;
    uint8_t aad[DOMAIN_AAD_MAX];
    int rc;

    if (keyring == NULL || !id_valid(domain_id) || out_wrapped == NULL ||
        out_wrapped_len == NULL)
        return KR_EINVAL;
    if (keyring_has_domain(keyring, domain_id)) {
        log_error("domain %s: a key is already loaded; refusing to replace it", domain_id);
        return KR_EEXIST;
    }
    rc = secbuf_alloc(&key, KEYRING_DOMAIN_KEY_LEN);
    if (rc != 0)
        goto out;
    rc = hsm_random(keyring->hsm, key.data, key.len);
    if (rc != 0) {
        log_error("domain %s: no random bytes from the HSM for its key", domain_id);
        goto out;
    }
    size_t aad_len = domain_aad(aad, domain_id);
    rc = hsm_mwk_encrypt(keyring->hsm, aad, aad_len, key.data, key.len, &wrapped, &wrapped_len);
    if (rc != 0) {
        log_error("domain %s: cannot wrap its key under the MWK", domain_id);
        goto out;
    }
    pthread_rwlock_wrlock(&keyring->lock);
    rc = domain_insert_locked(keyring, domain_id, &key);
    pthread_rwlock_unlock(&keyring->lock);
    if (rc == KR_EEXIST)
        log_error("domain %s: loaded by another thread meanwhile; keeping that key", domain_id);
    if (rc != 0)
        goto out;
    *out_wrapped = wrapped;
    *out_wrapped_len = wrapped_len;
    wrapped = NULL;
out:
    secbuf_free(&key);
    free(wrapped);
    return rc;
}

int keyring_load_domain(struct keyring *keyring, const char *domain_id, const uint8_t *wrapped,
                        size_t wrapped_len)
{
    secbuf key = {NULL, 0};
    uint8_t aad[DOMAIN_AAD_MAX];
    size_t key_len = 0;
    int rc;

    if (keyring == NULL || !id_valid(domain_id) || (wrapped == NULL && wrapped_len > 0))
        return KR_EINVAL;
    if (keyring_has_domain(keyring, domain_id))
        return 0;
    if (wrapped_len != KEYRING_WRAPPED_LEN) {
        log_error("domain %s: wrapped key is %zu bytes, not %d: it does not open", domain_id,
                  wrapped_len, KEYRING_WRAPPED_LEN);
        return KR_EAUTH;
    }
    rc = secbuf_alloc(&key, KEYRING_DOMAIN_KEY_LEN);
    if (rc != 0)
        goto out;
    /* The HSM call is slow: no lock is held across it. */
    size_t aad_len = domain_aad(aad, domain_id);
    rc = hsm_mwk_decrypt(keyring->hsm, aad, aad_len, wrapped, wrapped_len, key.data, &key_len);
    if (rc == KR_EAUTH)
        log_error("domain %s: wrapped key does not open under this MWK for this domain",
                  domain_id);
    if (rc != 0)
        goto out;
    pthread_rwlock_wrlock(&keyring->lock);
    rc = domain_insert_locked(keyring, domain_id, &key);
    pthread_rwlock_unlock(&keyring->lock);
    if (rc == KR_EEXIST) /* another thread loaded it meanwhile */
        rc = 0;
out:
    secbuf_free(&key);
    return rc;
}

int keyring_has_domain(const struct keyring *keyring, const char *domain_id)
{
    if (keyring == NULL || domain_id == NULL)
        return 0;
    pthread_rwlock_t *lock = (pthread_rwlock_t *)&keyring->lock;
    pthread_rwlock_rdlock(lock);
    int found = domain_find(keyring, domain_id) != NULL;
    pthread_rwlock_unlock(lock);
    return found;
}

int keyring_seal(struct keyring *keyring, const char *domain_id, const char *key_id,
                 uint32_t version, crypto_alg alg, const uint8_t *material, size_t len,
                 uint8_t **out_sealed, size_t *out_sealed_len)
{
    uint8_t aad[KEY_AAD_MAX];
    uint8_t *sealed = NULL;
    size_t sealed_len = 0;
    int rc;

    if (keyring == NULL || !id_valid(domain_id) || !id_valid(key_id) ||
        (material == NULL && len > 0) || out_sealed == NULL || out_sealed_len == NULL ||
        len > SIZE_MAX - KEYRING_SEAL_OVERHEAD)
        return KR_EINVAL;
    sealed = malloc(len + KEYRING_SEAL_OVERHEAD);
    if (sealed == NULL)
        return KR_ENOMEM;
    size_t aad_len = key_aad(aad, domain_id, key_id, version, alg);

    pthread_rwlock_rdlock(&keyring->lock);
    const struct domain *domain = domain_find(keyring, domain_id);
    if (domain == NULL)
        rc = KR_ENOTFOUND;
    else
        rc = crypto_gcm_seal(domain->key.data, domain->key.len, aad, aad_len, material, len,
                             sealed, &sealed_len);
    pthread_rwlock_unlock(&keyring->lock);
    if (rc == KR_ENOTFOUND)
        log_error("key %s: domain %s is not loaded", key_id, domain_id);
    else if (rc != 0)
        log_error("key %s version %u: cannot seal under domain %s", key_id, version, domain_id);
    if (rc != 0)
        goto out;
    *out_sealed = sealed;
    *out_sealed_len = sealed_len;
    sealed = NULL;
out:
    free(sealed);
    return rc;
}

/* Opens the blob under its domain key into |out| and caches it when
 * |cache|. */
static int unseal_open(struct keyring *keyring, const char *domain_id, const char *key_id,
                       uint32_t version, const uint8_t *aad, size_t aad_len,
                       const uint8_t *sealed, size_t sealed_len, int cache, secbuf *out)
{
    secbuf material = {NULL, 0};
    size_t material_len = 0;
    int rc = secbuf_alloc(&material, sealed_len - KEYRING_SEAL_OVERHEAD);
    if (rc != 0)
        return rc;

    pthread_rwlock_rdlock(&keyring->lock);
    const struct domain *domain = domain_find(keyring, domain_id);
    if (domain == NULL)
        rc = KR_ENOTFOUND;
    else
        rc = crypto_gcm_open(domain->key.data, domain->key.len, aad, aad_len, sealed,
                             sealed_len, material.data, &material_len);
    pthread_rwlock_unlock(&keyring->lock);
    if (rc == KR_ENOTFOUND)
        log_error("key %s: domain %s is not loaded", key_id, domain_id);
    else if (rc == KR_EAUTH)
        log_error("key %s version %u: sealed blob does not open under domain %s (tampered, or "
                  "bound to another key, version, domain or algorithm)",
                  key_id, version, domain_id);
    else if (rc != 0)
        log_error("key %s version %u: cannot unseal under domain %s", key_id, version,
                  domain_id);
    if (rc == 0 && material_len != material.len) {
        log_error("key %s version %u: unsealed %zu bytes, expected %zu", key_id, version,
                  material_len, material.len);
        rc = KR_EINTERNAL;
    }
    if (rc != 0)
        goto out;
    if (cache)
        cache_put(keyring, aad, aad_len, sealed, sealed_len, &material);
    *out = material;
    material.data = NULL;
    material.len = 0;
out:
    secbuf_free(&material);
    return rc;
}

/* keyring_unseal's use: a copy of the material in the secure heap. */
struct copy_out {
    secbuf *out;
    int rv;
};

static void copy_material(void *arg, const uint8_t *material, size_t len)
{
    struct copy_out *c = arg;
    c->rv = secbuf_copy(c->out, material, len);
}

int keyring_unseal(struct keyring *keyring, const char *domain_id, const char *key_id,
                   uint32_t version, crypto_alg alg, const uint8_t *sealed, size_t sealed_len,
                   secbuf *out)
{
    if (out == NULL)
        return KR_EINVAL;
    struct copy_out c = {out, 0};
    int rc = keyring_use(keyring, domain_id, key_id, version, alg, sealed, sealed_len,
                         copy_material, &c);
    return rc != 0 ? rc : c.rv;
}

int keyring_use(struct keyring *keyring, const char *domain_id, const char *key_id,
                uint32_t version, crypto_alg alg, const uint8_t *sealed, size_t sealed_len,
                keyring_use_fn use, void *arg)
{
    uint8_t aad[KEY_AAD_MAX];
    if (keyring == NULL || !id_valid(domain_id) || !id_valid(key_id) ||
        (sealed == NULL && sealed_len > 0) || use == NULL)
        return KR_EINVAL;
    if (sealed_len < KEYRING_SEAL_OVERHEAD) {
        log_error("key %s version %u: sealed blob of %zu bytes is truncated", key_id, version,
                  sealed_len);
        return KR_EAUTH;
    }
    size_t aad_len = key_aad(aad, domain_id, key_id, version, alg);
    int cache = cacheable(keyring, alg, sealed_len);
    if (cache && keyring_has_domain(keyring, domain_id)) {
        pthread_mutex_lock(&keyring->cache_lock);
        struct unsealed *u = cache_find_locked(keyring, aad, aad_len, sealed, sealed_len);
        if (u != NULL)
            use(arg, u->material.data, u->material.len);
        pthread_mutex_unlock(&keyring->cache_lock);
        if (u != NULL)
            return 0;
    }
    secbuf material = {NULL, 0};
    int rc = unseal_open(keyring, domain_id, key_id, version, aad, aad_len, sealed,
                         sealed_len, cache, &material);
    if (rc == 0)
        use(arg, material.data, material.len);
    secbuf_free(&material);
    return rc;
}
