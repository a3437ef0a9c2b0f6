/* audit.c: the audit chain in the store: the FSM's append of shipped batches
 * (deterministic), usage counters, the readers, the verifier and the
 * leader's signed checkpoints. The recorder and shipper are in auditship.c. */
#include "audit.h"

#define KR_LOG_MODULE "audit"
#include <inttypes.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "fsm.h"
#include "hsm.h"
#include "keyraft.h"
#include "log.h"
#include "record.pb-c.h"

#define HEAD_KEY "audit_head"
#define SRC_PREFIX "audit_src" /* then \0 and the node id (u64 BE) */
#define SRC_KEY_LEN (sizeof(SRC_PREFIX) + 8)
#define USAGE_PREFIX "usage" /* then \0 key_id \0 version (u32 BE) */
#define USAGE_KEY_ID_MAX 64
#define USAGE_KEY_MAX (sizeof(USAGE_PREFIX) + USAGE_KEY_ID_MAX + 1 + 4)
#define CHAIN_TAG "KRA1"
#define CHECKPOINT_TAG "keyraft-audit-checkpoint"
#define CHECKPOINT_OP "audit_checkpoint"
#define OVERSIZE_FIELD_MAX 256 /* principal / operation kept from an oversize record */
#define READ_MAX_BYTES (2u * 1024u * 1024u) /* one read page, well under a frame */
#define READ_SCAN_PER_ENTRY 50
#define READ_SCAN_BASE 10000
#define VERIFY_MAX_KEYS (2 * FSM_MAX_NODES + 1) /* own, members, retired members */

static void put_u64be(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_u64be(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static void src_key(uint8_t out[SRC_KEY_LEN], uint64_t node_id)
{
    memcpy(out, SRC_PREFIX, sizeof(SRC_PREFIX)); /* with its \0 */
    put_u64be(out + sizeof(SRC_PREFIX), node_id);
}

/* Returns the key length, or 0 for a key id that is empty or too long. */
static size_t usage_key(uint8_t out[USAGE_KEY_MAX], const char *key_id, uint32_t version)
{
    size_t n = key_id ? strlen(key_id) : 0;
    if (n == 0 || n > USAGE_KEY_ID_MAX)
        return 0;
    size_t off = 0;
    memcpy(out, USAGE_PREFIX, sizeof(USAGE_PREFIX));
    off += sizeof(USAGE_PREFIX);
    memcpy(out + off, key_id, n + 1);
    off += n + 1;
    out[off++] = (uint8_t)(version >> 24);
    out[off++] = (uint8_t)(version >> 16);
    out[off++] = (uint8_t)(version >> 8);
    out[off++] = (uint8_t)version;
    return off;
}

/* hash(seq) = SHA-256("KRA1" | seq u64 BE | prev | record). */
static int chain_hash(EVP_MD_CTX *ctx, uint64_t seq, const uint8_t prev[AUDIT_HASH_LEN],
                      const uint8_t *record, size_t len, uint8_t out[AUDIT_HASH_LEN])
{
    uint8_t seq_be[8];
    put_u64be(seq_be, seq);
    unsigned int out_len = 0;
    if (EVP_DigestInit_ex(ctx, crypto_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(ctx, CHAIN_TAG, sizeof(CHAIN_TAG) - 1) != 1 ||
        EVP_DigestUpdate(ctx, seq_be, sizeof(seq_be)) != 1 ||
        EVP_DigestUpdate(ctx, prev, AUDIT_HASH_LEN) != 1 ||
        (len > 0 && EVP_DigestUpdate(ctx, record, len) != 1) ||
        EVP_DigestFinal_ex(ctx, out, &out_len) != 1 || out_len != AUDIT_HASH_LEN) {
        ERR_clear_error();
        log_error("SHA-256 failed while hashing audit record %" PRIu64, seq);
        return KR_ECRYPTO;
    }
    return 0;
}

/* The message a checkpoint signs: SHA-256("keyraft-audit-checkpoint" | seq | hash). */
static int checkpoint_digest(uint64_t seq, const uint8_t hash[AUDIT_HASH_LEN],
                             uint8_t out[AUDIT_HASH_LEN])
{
    uint8_t buf[sizeof(CHECKPOINT_TAG) - 1 + 8 + AUDIT_HASH_LEN];
    memcpy(buf, CHECKPOINT_TAG, sizeof(CHECKPOINT_TAG) - 1);
    put_u64be(buf + sizeof(CHECKPOINT_TAG) - 1, seq);
    memcpy(buf + sizeof(CHECKPOINT_TAG) - 1 + 8, hash, AUDIT_HASH_LEN);
    unsigned int len = 0;
    if (EVP_Digest(buf, sizeof(buf), out, &len, crypto_sha256(), NULL) != 1 ||
        len != AUDIT_HASH_LEN) {
        ERR_clear_error();
        return KR_ECRYPTO;
    }
    return 0;
}

int audit_head(struct store *store, uint64_t *seq, uint8_t hash[AUDIT_HASH_LEN])
{
    if (store == NULL || seq == NULL || hash == NULL)
        return KR_EINVAL;
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, HEAD_KEY, sizeof(HEAD_KEY) - 1, &val, &len);
    if (rv == KR_ENOTFOUND) {
        *seq = 0;
        memset(hash, 0, AUDIT_HASH_LEN);
        return 0;
    }
    if (rv != 0)
        return rv;
    Keyraft__AuditHeadRecord *h = keyraft__audit_head_record__unpack(NULL, len, val);
    free(val);
    if (h == NULL || h->hash.len != AUDIT_HASH_LEN) {
        log_error("the audit head record (meta %s) is damaged", HEAD_KEY);
        if (h)
            keyraft__audit_head_record__free_unpacked(h, NULL);
        return KR_EIO;
    }
    *seq = h->seq;
    memcpy(hash, h->hash.data, AUDIT_HASH_LEN);
    keyraft__audit_head_record__free_unpacked(h, NULL);
    return 0;
}

int audit_usage_get(struct store *store, const char *key_id, uint32_t version, uint64_t *out)
{
    uint8_t key[USAGE_KEY_MAX];
    size_t klen = usage_key(key, key_id, version);
    if (store == NULL || out == NULL || klen == 0)
        return KR_EINVAL;
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, key, klen, &val, &len);
    if (rv == KR_ENOTFOUND) {
        *out = 0;
        return 0;
    }
    if (rv != 0)
        return rv;
    if (len != 8) {
        log_error("usage counter of %s v%" PRIu32 " is %zu bytes, not 8: damaged", key_id,
                  version, len);
        free(val);
        return KR_EIO;
    }
    *out = get_u64be(val);
    free(val);
    return 0;
}

/* --- FSM apply --------------------------------------------------------------------- */

/* |s| cut to at most |max| bytes, not inside a UTF-8 sequence. malloc'd. */
static char *utf8_prefix(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n > max) {
        n = max;
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
            n--;
    }
    char *out = malloc(n + 1);
    if (out != NULL) {
        memcpy(out, s, n);
        out[n] = '\0';
    }
    return out;
}

/* The short record standing in for one over AUDIT_MAX_RECORD_BYTES: who and
 * what (when the original decodes), and that it was too large. */
static int oversize_record(const uint8_t *rec, size_t len, uint64_t node_id, uint8_t **out,
                           size_t *out_len)
{
    Keyraft__AuditRecord *orig = keyraft__audit_record__unpack(NULL, len, rec);
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    char msg[128];
    char *principal = NULL, *operation = NULL;
    int rc = KR_ENOMEM;
    snprintf(msg, sizeof(msg), "record of %zu bytes too large (limit %d)%s", len,
             AUDIT_MAX_RECORD_BYTES, orig ? "" : "; it does not decode");
    r.node_id = node_id;
    r.message = msg;
    if (orig != NULL) {
        principal = utf8_prefix(orig->principal, OVERSIZE_FIELD_MAX);
        operation = utf8_prefix(orig->operation, OVERSIZE_FIELD_MAX);
        if (principal == NULL || operation == NULL)
            goto out;
        r.time_ms = orig->time_ms;
        r.node_id = orig->node_id;
        r.principal = principal;
        r.operation = operation;
        r.status = orig->status;
        r.key_version = orig->key_version;
        if (strlen(orig->key_id) <= USAGE_KEY_ID_MAX)
            r.key_id = orig->key_id;
    }
    size_t n = keyraft__audit_record__get_packed_size(&r);
    uint8_t *buf = malloc(n);
    if (buf == NULL)
        goto out;
    keyraft__audit_record__pack(&r, buf);
    *out = buf;
    *out_len = n;
    rc = 0;
out:
    free(principal);
    free(operation);
    if (orig)
        keyraft__audit_record__free_unpacked(orig, NULL);
    return rc;
}

static int cmp_usage(const void *a, const void *b)
{
    const Keyraft__UsageDelta *x = *(const Keyraft__UsageDelta *const *)a;
    const Keyraft__UsageDelta *y = *(const Keyraft__UsageDelta *const *)b;
    int c = strcmp(x->key_id, y->key_id);
    if (c != 0)
        return c;
    return x->version < y->version ? -1 : x->version > y->version;
}

/* Adds the batch's usage deltas to the counters. Deltas naming the same key
 * version are summed first (a batch's puts of one key would overwrite each
 * other); ties keep their order out of the comparison, and sums commute, so
 * every node writes the same values. */
static int apply_usage(struct store *store, struct store_batch *b,
                       const Keyraft__AuditSubmitRequest *batch)
{
    size_t n = batch->n_usage;
    if (n == 0)
        return 0;
    const Keyraft__UsageDelta **d = malloc(n * sizeof(*d));
    if (d == NULL)
        return KR_ENOMEM;
    size_t m = 0, ignored = 0;
    for (size_t i = 0; i < n; i++) {
        const Keyraft__UsageDelta *u = batch->usage[i];
        size_t kl = u && u->key_id ? strlen(u->key_id) : 0;
        if (u == NULL || kl == 0 || kl > USAGE_KEY_ID_MAX) {
            ignored++;
            continue;
        }
        if (u->count > 0)
            d[m++] = u;
    }
    if (ignored > 0)
        log_warn("audit batch from node %" PRIu64 ": %zu usage deltas with an empty key id or "
                 "one over %d characters ignored",
                 batch->node_id, ignored, USAGE_KEY_ID_MAX);
    qsort(d, m, sizeof(*d), cmp_usage);
    int rv = 0;
    for (size_t i = 0; i < m && rv == 0;) {
        uint64_t sum = 0;
        size_t j = i;
        for (; j < m && cmp_usage(&d[i], &d[j]) == 0; j++)
            sum = d[j]->count > UINT64_MAX - sum ? UINT64_MAX : sum + d[j]->count;
        uint64_t cur = 0;
        rv = audit_usage_get(store, d[i]->key_id, d[i]->version, &cur);
        if (rv == 0) {
            uint64_t next = sum > UINT64_MAX - cur ? UINT64_MAX : cur + sum;
            uint8_t key[USAGE_KEY_MAX], val[8];
            size_t klen = usage_key(key, d[i]->key_id, d[i]->version);
            put_u64be(val, next);
            store_batch_put(b, STORE_CF_META, key, klen, val, sizeof(val));
        }
        i = j;
    }
    free(d);
    return rv == KR_ENOMEM ? KR_ENOMEM : rv != 0 ? KR_EIO : 0;
}

/* Packs and queues AuditEntry {seq, prev, hash, rec} at audit CF key seq. */
static int put_entry(struct store_batch *b, uint64_t seq, const uint8_t prev[AUDIT_HASH_LEN],
                     const uint8_t hash[AUDIT_HASH_LEN], const uint8_t *rec, size_t len)
{
    Keyraft__AuditEntry e = KEYRAFT__AUDIT_ENTRY__INIT;
    e.seq = seq;
    e.prev_hash.data = (uint8_t *)prev;
    e.prev_hash.len = AUDIT_HASH_LEN;
    e.hash.data = (uint8_t *)hash;
    e.hash.len = AUDIT_HASH_LEN;
    e.record.data = (uint8_t *)rec;
    e.record.len = len;
    size_t n = keyraft__audit_entry__get_packed_size(&e);
    uint8_t *buf = malloc(n);
    if (buf == NULL)
        return KR_ENOMEM;
    keyraft__audit_entry__pack(&e, buf);
    uint8_t key[8];
    put_u64be(key, seq);
    store_batch_put(b, STORE_CF_AUDIT, key, sizeof(key), buf, n);
    free(buf);
    return 0;
}

int audit_source_position(struct store *store, uint64_t node_id, uint64_t *boot_id,
                          uint64_t *batch_seq)
{
    uint8_t skey[SRC_KEY_LEN];
    src_key(skey, node_id);
    uint8_t *val = NULL;
    size_t len = 0;
    *boot_id = *batch_seq = 0;
    int rv = store_get(store, STORE_CF_META, skey, sizeof(skey), &val, &len);
    if (rv == KR_ENOTFOUND)
        return 0;
    if (rv != 0)
        return KR_EIO;
    Keyraft__AuditSourceRecord *s = keyraft__audit_source_record__unpack(NULL, len, val);
    free(val);
    if (s == NULL) {
        log_error("audit source record of node %" PRIu64 " is damaged", node_id);
        return KR_EIO;
    }
    *boot_id = s->boot_id;
    *batch_seq = s->batch_seq;
    keyraft__audit_source_record__free_unpacked(s, NULL);
    return 0;
}

int audit_fsm_apply(struct store *store, struct store_batch *b,
                    const Keyraft__AuditSubmitRequest *batch)
{
    if (store == NULL || b == NULL || batch == NULL)
        return KR_EINVAL;
    uint8_t skey[SRC_KEY_LEN];
    src_key(skey, batch->node_id);
    uint64_t last_boot = 0, last_seq = 0;
    int rv = audit_source_position(store, batch->node_id, &last_boot, &last_seq);
    if (rv != 0)
        return rv;
    if (batch->boot_id < last_boot) {
        /* Skipping would lose the run's records unseen: refuse, so the node
         * fails closed and says why. */
        log_warn("audit batch from node %" PRIu64 ": boot id %" PRIu64 " is older than the "
                 "last one applied (%" PRIu64 "): did its clock go back?", batch->node_id,
                 batch->boot_id, last_boot);
        return KR_ESTATE;
    }
    if (!(batch->boot_id > last_boot || (batch->boot_id == last_boot && batch->batch_seq > last_seq))) {
        log_debug("audit batch %" PRIu64 "/%" PRIu64 " from node %" PRIu64
                  " already applied (at %" PRIu64 "/%" PRIu64 "): skipped",
                  batch->boot_id, batch->batch_seq, batch->node_id, last_boot, last_seq);
        return 0;
    }

    uint64_t seq = 0;
    uint8_t prev[AUDIT_HASH_LEN], hash[AUDIT_HASH_LEN];
    rv = audit_head(store, &seq, prev);
    if (rv != 0)
        return rv == KR_ENOMEM ? KR_ENOMEM : KR_EIO;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return KR_ENOMEM;
    size_t oversize = 0;
    for (size_t i = 0; i < batch->n_records && rv == 0; i++) {
        const uint8_t *rec = batch->records[i].data;
        size_t rec_len = batch->records[i].len;
        uint8_t *short_rec = NULL;
        if (rec_len > AUDIT_MAX_RECORD_BYTES) {
            rv = oversize_record(rec, rec_len, batch->node_id, &short_rec, &rec_len);
            if (rv != 0)
                break;
            rec = short_rec;
            oversize++;
        }
        seq++;
        rv = chain_hash(ctx, seq, prev, rec, rec_len, hash);
        if (rv == 0)
            rv = put_entry(b, seq, prev, hash, rec, rec_len);
        memcpy(prev, hash, AUDIT_HASH_LEN);
        free(short_rec);
    }
    EVP_MD_CTX_free(ctx);
    if (rv != 0)
        return rv == KR_ENOMEM ? KR_ENOMEM : KR_EIO;
    if (oversize > 0)
        log_warn("audit batch from node %" PRIu64 ": %zu records over %d bytes chained as short "
                 "records saying so",
                 batch->node_id, oversize, AUDIT_MAX_RECORD_BYTES);
    rv = apply_usage(store, b, batch);
    if (rv != 0)
        return rv;

    Keyraft__AuditSourceRecord src = KEYRAFT__AUDIT_SOURCE_RECORD__INIT;
    src.boot_id = batch->boot_id;
    src.batch_seq = batch->batch_seq;
    uint8_t sbuf[32];
    size_t slen = keyraft__audit_source_record__get_packed_size(&src);
    keyraft__audit_source_record__pack(&src, sbuf);
    store_batch_put(b, STORE_CF_META, skey, sizeof(skey), sbuf, slen);
    if (batch->n_records > 0) {
        Keyraft__AuditHeadRecord h = KEYRAFT__AUDIT_HEAD_RECORD__INIT;
        h.seq = seq;
        h.hash.data = prev;
        h.hash.len = AUDIT_HASH_LEN;
        uint8_t hbuf[64];
        size_t hlen = keyraft__audit_head_record__get_packed_size(&h);
        keyraft__audit_head_record__pack(&h, hbuf);
        store_batch_put(b, STORE_CF_META, HEAD_KEY, sizeof(HEAD_KEY) - 1, hbuf, hlen);
    }
    return 0;
}

/* --- readers ------------------------------------------------------------------------ */

static int read_filtered(const Keyraft__AuditReadRequest *req)
{
    return req->principal[0] || req->key_id[0] || req->operation[0] || req->since_ms ||
           req->until_ms || req->denied_only;
}

/* Whether a stored record passes the request's filters: since_ms <= time_ms
 * < until_ms (until 0: no end), exact principal / key_id / operation, and
 * status != 0 with denied_only. An undecodable record passes only when there
 * is no filter. */
static int read_matches(const Keyraft__AuditReadRequest *req, const Keyraft__AuditEntry *e)
{
    if (!read_filtered(req))
        return 1;
    Keyraft__AuditRecord *r = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    if (r == NULL)
        return 0;
    int ok = (!req->principal[0] || strcmp(r->principal, req->principal) == 0) &&
             (!req->key_id[0] || strcmp(r->key_id, req->key_id) == 0) &&
             (!req->operation[0] || strcmp(r->operation, req->operation) == 0) &&
             r->time_ms >= req->since_ms && (req->until_ms == 0 || r->time_ms < req->until_ms) &&
             (!req->denied_only || r->status != 0);
    keyraft__audit_record__free_unpacked(r, NULL);
    return ok;
}

struct entry_list {
    Keyraft__AuditEntry **v;
    size_t n, cap;
    size_t bytes;
};

static void entry_list_clear(struct entry_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        keyraft__audit_entry__free_unpacked(l->v[i], NULL);
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static int entry_list_push(struct entry_list *l, Keyraft__AuditEntry *e)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        Keyraft__AuditEntry **v = reallocarray(l->v, cap, sizeof(*v));
        if (v == NULL)
            return KR_ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = e;
    l->bytes += e->record.len + 2 * AUDIT_HASH_LEN + 16;
    return 0;
}

/* Drops the first |k| entries. */
static void entry_list_drop_front(struct entry_list *l, size_t k)
{
    for (size_t i = 0; i < k; i++) {
        l->bytes -= l->v[i]->record.len + 2 * AUDIT_HASH_LEN + 16;
        keyraft__audit_entry__free_unpacked(l->v[i], NULL);
    }
    memmove(l->v, l->v + k, (l->n - k) * sizeof(*l->v));
    l->n -= k;
}

/* One stored entry: its seq from the key, the entry decoded. A damaged one
 * is logged and skipped by readers (verify reports it). */
static Keyraft__AuditEntry *iter_entry(struct store_iter *it, uint64_t *seq)
{
    size_t klen = 0, vlen = 0;
    const uint8_t *k = store_iter_key(it, &klen);
    const uint8_t *v = store_iter_value(it, &vlen);
    if (klen != 8)
        return NULL;
    *seq = get_u64be(k);
    Keyraft__AuditEntry *e = keyraft__audit_entry__unpack(NULL, vlen, v);
    if (e == NULL)
        log_warn("audit entry %" PRIu64 " does not decode: skipped (audit verify reports it)",
                 *seq);
    return e;
}

/* Scans seqs [lo, hi] forward, appending matches to |out| while it holds
 * fewer than |want| (forward mode) or keeping only the newest |want| (keep_last).
 * *examined counts the entries looked at; stops at |budget|. *last_seen is
 * the last seq examined. */
static int scan_range(struct store *store, const Keyraft__AuditReadRequest *req, uint64_t lo,
                      uint64_t hi, size_t want, int keep_last, uint64_t budget,
                      uint64_t *examined, uint64_t *last_seen, struct entry_list *out, int *full)
{
    uint8_t lower[8], upper[8];
    put_u64be(lower, lo);
    int has_upper = hi < UINT64_MAX;
    if (has_upper)
        put_u64be(upper, hi + 1);
    struct store_iter *it = NULL;
    int rv = store_iter_new(store, STORE_CF_AUDIT, lower, sizeof(lower), has_upper ? upper : NULL,
                            has_upper ? sizeof(upper) : 0, &it);
    if (rv != 0)
        return rv;
    *full = 0;
    for (; store_iter_valid(it); store_iter_next(it)) {
        if (*examined >= budget)
            break;
        (*examined)++;
        uint64_t seq = 0;
        Keyraft__AuditEntry *e = iter_entry(it, &seq);
        *last_seen = seq; /* ascending */
        if (e == NULL)
            continue;
        if (!read_matches(req, e)) {
            keyraft__audit_entry__free_unpacked(e, NULL);
            continue;
        }
        if ((rv = entry_list_push(out, e)) != 0) {
            keyraft__audit_entry__free_unpacked(e, NULL);
            break;
        }
        if (keep_last) {
            if (out->n > want)
                entry_list_drop_front(out, out->n - want);
            while (out->n > 1 && out->bytes > READ_MAX_BYTES)
                entry_list_drop_front(out, 1);
        } else if (out->n >= want || out->bytes >= READ_MAX_BYTES) {
            *full = 1;
            break;
        }
    }
    if (rv == 0)
        rv = store_iter_status(it);
    store_iter_free(it);
    return rv;
}

int audit_read(struct store *store, const Keyraft__AuditReadRequest *req, uint32_t cap,
               Keyraft__AuditReadResponse **out)
{
    if (store == NULL || req == NULL || out == NULL || cap == 0)
        return KR_EINVAL;
    size_t want = req->limit > 0 && req->limit < cap ? req->limit : cap;
    uint64_t budget = (uint64_t)want * READ_SCAN_PER_ENTRY + READ_SCAN_BASE;
    uint64_t head = 0, examined = 0, next_after = 0;
    uint8_t head_hash[AUDIT_HASH_LEN];
    struct entry_list list = {0};
    int rv = audit_head(store, &head, head_hash);
    if (rv != 0)
        return rv;
    if (!req->tail) {
        uint64_t last_seen = req->after_seq;
        int full = 0;
        if (req->after_seq < UINT64_MAX)
            rv = scan_range(store, req, req->after_seq + 1, UINT64_MAX, want, 0, budget,
                            &examined, &last_seen, &list, &full);
        if (rv == 0) {
            /* More may follow: a full page, or the scan bound reached (the
             * client continues after the last entry examined). */
            if (full && list.n > 0 && list.v[list.n - 1]->seq < head)
                next_after = list.v[list.n - 1]->seq;
            else if (!full && examined >= budget && last_seen < head)
                next_after = last_seen;
        }
    } else {
        /* The store iterates forward only: look back in growing windows
         * ending at the head, keeping the newest matches, within the same
         * bound. Nothing follows a tail: next_after stays 0. */
        uint64_t floor = req->after_seq; /* seqs > floor */
        uint64_t hi = head, span = want > 0 ? want : 1;
        while (rv == 0 && hi > floor && list.n < want && examined < budget &&
               list.bytes < READ_MAX_BYTES) {
            uint64_t lo = hi - floor > span ? hi - span + 1 : floor + 1;
            struct entry_list win = {0};
            uint64_t last_seen = 0;
            int full = 0;
            size_t need = want - list.n;
            rv = scan_range(store, req, lo, hi, need, 1, budget, &examined, &last_seen, &win,
                            &full);
            if (rv == 0 && win.n > 0) {
                /* win (older) goes before list (newer). */
                Keyraft__AuditEntry **v = reallocarray(NULL, win.n + list.n, sizeof(*v));
                if (v == NULL) {
                    rv = KR_ENOMEM;
                } else {
                    memcpy(v, win.v, win.n * sizeof(*v));
                    if (list.n > 0)
                        memcpy(v + win.n, list.v, list.n * sizeof(*v));
                    free(list.v);
                    free(win.v);
                    list.v = v;
                    list.n += win.n;
                    list.cap = list.n;
                    list.bytes += win.bytes;
                    memset(&win, 0, sizeof(win));
                    while (list.n > 1 && list.bytes > READ_MAX_BYTES)
                        entry_list_drop_front(&list, 1);
                }
            }
            entry_list_clear(&win);
            hi = lo - 1;
            span = span > UINT64_MAX / 4 ? UINT64_MAX / 2 : span * 4;
        }
    }
    if (rv != 0) {
        entry_list_clear(&list);
        log_error("audit read failed: %s", kr_strerror(rv));
        return rv == KR_ENOMEM ? KR_ENOMEM : KR_EIO;
    }
    Keyraft__AuditReadResponse *resp = malloc(sizeof(*resp));
    if (resp == NULL) {
        entry_list_clear(&list);
        return KR_ENOMEM;
    }
    keyraft__audit_read_response__init(resp);
    resp->entries = list.v;
    resp->n_entries = list.n;
    resp->head_seq = head;
    resp->next_after = next_after;
    *out = resp;
    return 0;
}

void audit_read_free(Keyraft__AuditReadResponse *resp)
{
    if (resp == NULL)
        return;
    for (size_t i = 0; i < resp->n_entries; i++)
        keyraft__audit_entry__free_unpacked(resp->entries[i], NULL);
    free(resp->entries);
    free(resp);
}

/* --- verify --------------------------------------------------------------------------- */

struct trusted_key {
    const uint8_t *spki; /* borrowed (own_spki or the node registry) */
    size_t len;
    EVP_PKEY *pkey;      /* parsed on first use */
    int unusable;
};

struct verifier {
    struct store *store;
    Keyraft__AuditVerifyResponse *out;
    struct trusted_key keys[VERIFY_MAX_KEYS];
    size_t n_keys;
    EVP_MD_CTX *md;
    uint64_t good_cp_record; /* the record holding the last good checkpoint (0: none) */
    uint64_t good_cp_covers; /* the seq it covers */
};

static int set_problem(struct verifier *v, uint64_t seq, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_problem(struct verifier *v, uint64_t seq, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    char *p = strdup(buf);
    if (p == NULL)
        return KR_ENOMEM;
    v->out->ok = 0;
    v->out->first_bad_seq = seq;
    v->out->problem = p;
    log_warn("verify: %s", buf);
    return 0;
}

static void add_key(struct verifier *v, const uint8_t *spki, size_t len)
{
    if (spki == NULL || len == 0 || v->n_keys == VERIFY_MAX_KEYS)
        return;
    for (size_t i = 0; i < v->n_keys; i++)
        if (v->keys[i].len == len && memcmp(v->keys[i].spki, spki, len) == 0)
            return;
    v->keys[v->n_keys++] = (struct trusted_key){.spki = spki, .len = len};
}

/* The trusted key whose SPKI is exactly |spki|, parsed; NULL when none. */
static EVP_PKEY *trusted_pkey(struct verifier *v, const uint8_t *spki, size_t len)
{
    for (size_t i = 0; i < v->n_keys; i++) {
        struct trusted_key *k = &v->keys[i];
        if (k->len != len || memcmp(k->spki, spki, len) != 0)
            continue;
        if (k->pkey == NULL && !k->unusable) {
            const unsigned char *p = k->spki;
            k->pkey = d2i_PUBKEY(NULL, &p, (long)k->len);
            if (k->pkey == NULL || p != k->spki + k->len) {
                EVP_PKEY_free(k->pkey);
                k->pkey = NULL;
                k->unusable = 1;
                ERR_clear_error();
                log_warn("verify: a trusted audit key does not decode as an SPKI");
            }
        }
        return k->pkey;
    }
    return NULL;
}

static int ecdsa_ok(EVP_PKEY *pkey, const uint8_t digest[AUDIT_HASH_LEN], const uint8_t *sig,
                    size_t sig_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok = ctx != NULL && EVP_PKEY_verify_init(ctx) == 1 &&
             EVP_PKEY_verify(ctx, sig, sig_len, digest, AUDIT_HASH_LEN) == 1;
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

/* The stored hash of record |seq| (already walked and checked). */
static int stored_hash(struct store *store, uint64_t seq, uint8_t out[AUDIT_HASH_LEN])
{
    uint8_t key[8];
    put_u64be(key, seq);
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_AUDIT, key, sizeof(key), &val, &len);
    if (rv != 0)
        return rv;
    Keyraft__AuditEntry *e = keyraft__audit_entry__unpack(NULL, len, val);
    free(val);
    if (e == NULL || e->hash.len != AUDIT_HASH_LEN) {
        if (e)
            keyraft__audit_entry__free_unpacked(e, NULL);
        return KR_EIO;
    }
    memcpy(out, e->hash.data, AUDIT_HASH_LEN);
    keyraft__audit_entry__free_unpacked(e, NULL);
    return 0;
}

/* Checks the checkpoint in record |seq|. Returns 0 (a problem, if any, set in
 * v->out) or KR_EIO / KR_ENOMEM. */
static int check_checkpoint(struct verifier *v, uint64_t seq, const Keyraft__AuditCheckpoint *cp)
{
    if (cp->hash.len != AUDIT_HASH_LEN)
        return set_problem(v, seq, "record %" PRIu64 ": checkpoint (node %" PRIu64
                           ") holds a hash of %zu bytes, not %d",
                           seq, cp->node_id, cp->hash.len, AUDIT_HASH_LEN);
    if (cp->seq == 0 || cp->seq >= seq)
        return set_problem(v, seq, "record %" PRIu64 ": checkpoint (node %" PRIu64
                           ") covers record %" PRIu64 ", which does not come before it",
                           seq, cp->node_id, cp->seq);
    EVP_PKEY *pkey = trusted_pkey(v, cp->public_key.data, cp->public_key.len);
    if (pkey == NULL)
        return set_problem(v, seq, "record %" PRIu64 ": checkpoint (node %" PRIu64
                           ") is signed by a key that is not trusted (neither this node's "
                           "audit key nor one in the node registry)",
                           seq, cp->node_id);
    uint8_t digest[AUDIT_HASH_LEN];
    if (checkpoint_digest(cp->seq, cp->hash.data, digest) != 0)
        return KR_EIO;
    if (!ecdsa_ok(pkey, digest, cp->signature.data, cp->signature.len))
        return set_problem(v, seq, "record %" PRIu64 ": checkpoint (node %" PRIu64
                           ") signature does not verify: the checkpoint was forged or altered",
                           seq, cp->node_id);
    uint8_t have[AUDIT_HASH_LEN];
    int rv = stored_hash(v->store, cp->seq, have);
    if (rv != 0)
        return rv == KR_ENOMEM ? KR_ENOMEM : KR_EIO;
    if (CRYPTO_memcmp(have, cp->hash.data, AUDIT_HASH_LEN) != 0) {
        uint64_t from = v->good_cp_covers + 1;
        if (v->good_cp_record != 0)
            return set_problem(v, from, "checkpoint at record %" PRIu64 " (node %" PRIu64
                               ") covers a different hash for record %" PRIu64 ": records %"
                               PRIu64 "..%" PRIu64 " were rewritten (the previous good "
                               "checkpoint, at record %" PRIu64 ", covers up to %" PRIu64 ")",
                               seq, cp->node_id, cp->seq, from, cp->seq, v->good_cp_record,
                               v->good_cp_covers);
        return set_problem(v, from, "checkpoint at record %" PRIu64 " (node %" PRIu64
                           ") covers a different hash for record %" PRIu64 ": records 1..%"
                           PRIu64 " were rewritten (no earlier good checkpoint)",
                           seq, cp->node_id, cp->seq, cp->seq);
    }
    v->good_cp_record = seq;
    v->good_cp_covers = cp->seq;
    v->out->checkpoints++;
    v->out->last_checkpoint_seq = cp->seq;
    return 0;
}

/* The walk; stops at the first problem. */
static int verify_walk(struct verifier *v, uint64_t *out_last)
{
    Keyraft__AuditVerifyResponse *out = v->out;
    struct store_iter *it = NULL;
    int rv = store_iter_new(v->store, STORE_CF_AUDIT, NULL, 0, NULL, 0, &it);
    if (rv != 0)
        return rv;
    uint64_t expected = 1;
    uint8_t prev[AUDIT_HASH_LEN] = {0}, hash[AUDIT_HASH_LEN];
    for (; store_iter_valid(it) && out->ok; store_iter_next(it)) {
        size_t klen = 0, vlen = 0;
        const uint8_t *k = store_iter_key(it, &klen);
        const uint8_t *val = store_iter_value(it, &vlen);
        if (klen != 8) {
            rv = set_problem(v, expected, "after record %" PRIu64 ": an entry with a %zu-byte "
                             "key, not a record position (inserted)",
                             expected - 1, klen);
            break;
        }
        uint64_t at = get_u64be(k);
        if (at != expected) {
            if (expected == 1)
                rv = set_problem(v, 1, "record 1 is missing (deleted): the log starts at %"
                                 PRIu64, at);
            else
                rv = set_problem(v, expected, "record %" PRIu64 " is missing (deleted): %"
                                 PRIu64 " is followed by %" PRIu64,
                                 expected, expected - 1, at);
            break;
        }
        Keyraft__AuditEntry *e = keyraft__audit_entry__unpack(NULL, vlen, val);
        if (e == NULL) {
            rv = set_problem(v, at, "record %" PRIu64 ": the stored entry does not decode "
                             "(damaged or edited)", at);
            break;
        }
        if (e->seq != at) {
            rv = set_problem(v, at, "position %" PRIu64 " holds record %" PRIu64
                             " (reordered or moved)", at, e->seq);
        } else if (e->prev_hash.len != AUDIT_HASH_LEN || e->hash.len != AUDIT_HASH_LEN) {
            rv = set_problem(v, at, "record %" PRIu64 ": its hashes are not %d bytes (edited)",
                             at, AUDIT_HASH_LEN);
        } else if (CRYPTO_memcmp(e->prev_hash.data, prev, AUDIT_HASH_LEN) != 0) {
            if (at == 1)
                rv = set_problem(v, at, "record 1 does not start the chain (its previous hash "
                                 "is not zero)");
            else
                rv = set_problem(v, at, "record %" PRIu64 " does not chain to record %" PRIu64,
                                 at, at - 1);
        } else if ((rv = chain_hash(v->md, at, prev, e->record.data, e->record.len, hash)) != 0) {
            rv = KR_EIO;
        } else if (CRYPTO_memcmp(hash, e->hash.data, AUDIT_HASH_LEN) != 0) {
            rv = set_problem(v, at, "record %" PRIu64 ": content does not match its hash "
                             "(edited)", at);
        } else {
            out->records++;
            memcpy(prev, hash, AUDIT_HASH_LEN);
            /* A record that does not decode is chained as raw bytes: not
             * tampering. Only checkpoints need a look inside. */
            Keyraft__AuditRecord *r =
                keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
            if (r != NULL && r->checkpoint != NULL)
                rv = check_checkpoint(v, at, r->checkpoint);
            if (r)
                keyraft__audit_record__free_unpacked(r, NULL);
        }
        keyraft__audit_entry__free_unpacked(e, NULL);
        if (rv != 0)
            break;
        expected++;
    }
    if (rv == 0)
        rv = store_iter_status(it);
    store_iter_free(it);
    *out_last = expected - 1;
    return rv;
}

int audit_verify(struct store *store, const uint8_t *own_spki, size_t own_spki_len,
                 Keyraft__AuditVerifyResponse *out)
{
    if (store == NULL || out == NULL)
        return KR_EINVAL;
    keyraft__audit_verify_response__init(out);
    struct verifier v = {.store = store, .out = out};
    struct fsm_nodes nodes = {0}, retired = {0};
    uint8_t head_hash[AUDIT_HASH_LEN];
    uint64_t head = 0, last = 0;
    out->ok = 1;
    int rv = audit_head(store, &head, head_hash);
    if (rv != 0)
        return KR_EIO;
    out->head_seq = head;
    out->head_hash.data = malloc(AUDIT_HASH_LEN);
    if (out->head_hash.data == NULL)
        return KR_ENOMEM;
    memcpy(out->head_hash.data, head_hash, AUDIT_HASH_LEN);
    out->head_hash.len = AUDIT_HASH_LEN;
    rv = fsm_list_nodes(store, &nodes);
    if (rv != 0) {
        log_error("verify: the node registry is unreadable: %s", kr_strerror(rv));
        goto out;
    }
    rv = fsm_list_retired_nodes(store, &retired);
    if (rv != 0) {
        log_error("verify: the retired node keys are unreadable: %s", kr_strerror(rv));
        goto out;
    }
    add_key(&v, own_spki, own_spki_len);
    for (size_t i = 0; i < nodes.n; i++)
        add_key(&v, nodes.nodes[i]->audit_public_key.data, nodes.nodes[i]->audit_public_key.len);
    for (size_t i = 0; i < retired.n; i++)
        add_key(&v, retired.nodes[i]->audit_public_key.data,
                retired.nodes[i]->audit_public_key.len);
    v.md = EVP_MD_CTX_new();
    if (v.md == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    rv = verify_walk(&v, &last);
    if (rv != 0 || !out->ok)
        goto out;
    if (last > head) {
        /* The head was read before the walk's snapshot: records committed
         * since (the caller may run on a worker thread while the node
         * applies) are in the walk. Only a head that still lags says they
         * were appended outside the chain. */
        uint64_t now_head = 0;
        uint8_t now_hash[AUDIT_HASH_LEN];
        rv = audit_head(store, &now_head, now_hash);
        if (rv != 0)
            goto out;
        if (now_head >= last) {
            rv = stored_hash(store, last, head_hash);
            if (rv != 0)
                goto out;
            head = last;
            out->head_seq = head;
            memcpy(out->head_hash.data, head_hash, AUDIT_HASH_LEN);
        }
    }
    if (last + 1 == head) {
        rv = set_problem(&v, head, "record %" PRIu64 " is missing (deleted at the end): the head "
                         "says %" PRIu64 ", the last entry is %" PRIu64, head, head, last);
    } else if (last < head) {
        rv = set_problem(&v, last + 1, "records %" PRIu64 "..%" PRIu64 " are missing (deleted "
                         "at the end): the head says %" PRIu64 ", the last entry is %" PRIu64,
                         last + 1, head, head, last);
    } else if (last > head) {
        rv = set_problem(&v, head + 1, "records %" PRIu64 "..%" PRIu64 " lie past the head (%"
                         PRIu64 "): appended outside the chain, or the head was rolled back",
                         head + 1, last, head);
    } else if (head > 0) {
        uint8_t have[AUDIT_HASH_LEN];
        rv = stored_hash(store, head, have);
        if (rv == 0 && CRYPTO_memcmp(have, head_hash, AUDIT_HASH_LEN) != 0)
            rv = set_problem(&v, head, "record %" PRIu64 ": the head's hash differs from the "
                             "record's (head or record replaced)", head);
    }
out:
    for (size_t i = 0; i < v.n_keys; i++)
        EVP_PKEY_free(v.keys[i].pkey);
    EVP_MD_CTX_free(v.md);
    fsm_nodes_free(&nodes);
    fsm_nodes_free(&retired);
    if (rv != 0) {
        audit_verify_clear(out);
        return rv == KR_ENOMEM ? KR_ENOMEM : KR_EIO;
    }
    return 0;
}

void audit_verify_clear(Keyraft__AuditVerifyResponse *out)
{
    if (out == NULL)
        return;
    if (out->problem != NULL && out->problem != (char *)protobuf_c_empty_string)
        free(out->problem);
    free(out->head_hash.data);
    keyraft__audit_verify_response__init(out);
}

/* --- checkpoints ------------------------------------------------------------------------ */

int audit_make_checkpoint(struct store *store, struct hsm *hsm, uint64_t node_id,
                          uint64_t now_ms, uint8_t **out, size_t *out_len)
{
    if (store == NULL || hsm == NULL || out == NULL || out_len == NULL)
        return KR_EINVAL;
    uint64_t seq = 0;
    uint8_t hash[AUDIT_HASH_LEN], digest[AUDIT_HASH_LEN];
    uint8_t *sig = NULL, *spki = NULL, *buf = NULL;
    size_t sig_len = 0, spki_len = 0;
    int rv = audit_head(store, &seq, hash);
    if (rv != 0)
        return rv;
    if (seq == 0)
        return KR_ENOTFOUND;
    if ((rv = checkpoint_digest(seq, hash, digest)) != 0)
        return rv;
    if ((rv = hsm_audit_sign(hsm, digest, &sig, &sig_len)) != 0) {
        log_error("cannot sign the audit checkpoint at record %" PRIu64 ": %s", seq,
                  kr_strerror(rv));
        goto out;
    }
    if ((rv = hsm_audit_public_key(hsm, &spki, &spki_len)) != 0)
        goto out;
    Keyraft__AuditCheckpoint cp = KEYRAFT__AUDIT_CHECKPOINT__INIT;
    cp.seq = seq;
    cp.hash.data = hash;
    cp.hash.len = AUDIT_HASH_LEN;
    cp.node_id = node_id;
    cp.signature.data = sig;
    cp.signature.len = sig_len;
    cp.public_key.data = spki;
    cp.public_key.len = spki_len;
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.time_ms = now_ms;
    r.node_id = node_id;
    char signer[32];
    snprintf(signer, sizeof(signer), "node-%" PRIu64, node_id);
    r.principal = signer;
    r.operation = (char *)CHECKPOINT_OP;
    r.status = 0;
    r.checkpoint = &cp;
    size_t n = keyraft__audit_record__get_packed_size(&r);
    buf = malloc(n);
    if (buf == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    keyraft__audit_record__pack(&r, buf);
    *out = buf;
    *out_len = n;
    buf = NULL;
    rv = 0;
out:
    free(sig);
    free(spki);
    free(buf);
    return rv;
}
