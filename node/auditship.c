/* auditship.c: the node's audit recorder: a bounded queue of packed records
 * and a usage map, filled from the loop thread, and a shipper thread that
 * sends them in batches (audit_submit) to the leader through libkeyraft and
 * drops them only once the leader acknowledged them as committed. */
#include "audit.h"

#define KR_LOG_MODULE "audit"
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hash.h"
#include "keyraft.h"
#include "log.h"

#define SHIP_EAGER 512               /* records queued that wake the shipper early */
#define SHIP_MAX_BYTES (1024u * 1024u) /* records per batch: one raft entry stays ~1 MB */
#define SHIP_BACKOFF_MAX_MS 250
#define SHIP_CALL_TIMEOUT_MS 1000    /* one audit_submit, leader hints included */
#define SHIP_WARN_EVERY_MS 10000     /* repeated failures are logged this often */
#define USAGE_KEY_ID_MAX 64          /* the FSM ignores longer key ids */
#define OVERSIZE_FIELD_MAX 256

struct qrec {
    uint8_t *data;
    size_t len;
    uint64_t at_ms; /* monotonic, when queued */
};

#define ACKED_SLOTS 4

struct usage_ent {
    struct usage_ent *next;
    uint32_t version;
    uint64_t pending;  /* counted, in no batch yet */
    uint64_t inflight; /* in the batch being shipped */
    /* Committed by the leader (acknowledged) but perhaps not yet applied by
     * this node's store: counted until the store's position passes |seq|.
     * When the slots are full the oldest two merge (counted a little longer). */
    struct {
        uint64_t seq, count;
    } acked[ACKED_SLOTS];
    unsigned n_acked;
    uint64_t hash;
    char key_id[];
};

struct audit_log {
    struct audit_config cfg; /* strings point at the copies below */
    char *endpoint, *ca_file, *cert_file, *key_file;
    kr_client *client;       /* the shipper thread's only */
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;       /* CLOCK_MONOTONIC */
    int sync_ready;

    /* Records, oldest first; the first inflight_records are the batch in flight. */
    struct qrec *q;
    size_t q_cap, q_head, q_n;

    struct usage_ent **buckets;
    size_t n_buckets, n_ents, n_pending_ents;

    /* The batch in flight: resent unchanged until acknowledged. */
    int inflight;
    size_t inflight_records;
    ProtobufCBinaryData *batch_records;
    Keyraft__UsageDelta *batch_deltas;
    Keyraft__UsageDelta **batch_delta_ptrs;
    size_t batch_n_deltas;
    struct usage_ent **batch_ents;
    uint64_t boot_id, batch_seq;

    uint64_t refused_unrecorded; /* refused while full, not yet told in a record */
    uint64_t refused_late;       /* appended after stop began */
    int stopping;
    uint64_t stop_deadline;

    uint64_t appended, acked, batches, overflowed;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* --- usage map -------------------------------------------------------------------- */

static uint64_t usage_hash(const char *key_id, uint32_t version)
{
    return kr_hash_u32(kr_hash_str(KR_HASH_INIT, key_id), version);
}

static struct usage_ent *usage_find_locked(struct audit_log *l, const char *key_id,
                                           uint32_t version, uint64_t h)
{
    if (l->n_buckets == 0)
        return NULL;
    for (struct usage_ent *e = l->buckets[h % l->n_buckets]; e; e = e->next)
        if (e->hash == h && e->version == version && strcmp(e->key_id, key_id) == 0)
            return e;
    return NULL;
}

static int usage_grow_locked(struct audit_log *l)
{
    size_t n = l->n_buckets ? l->n_buckets * 2 : 64;
    struct usage_ent **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return KR_ENOMEM;
    for (size_t i = 0; i < l->n_buckets; i++) {
        struct usage_ent *e = l->buckets[i];
        while (e) {
            struct usage_ent *next = e->next;
            e->next = b[e->hash % n];
            b[e->hash % n] = e;
            e = next;
        }
    }
    free(l->buckets);
    l->buckets = b;
    l->n_buckets = n;
    return 0;
}

/* Forgets the acknowledged counts this node's store holds now. */
static void usage_prune_locked(const struct audit_log *l, struct usage_ent *e,
                               uint64_t applied_boot, uint64_t applied_seq)
{
    if (applied_boot != l->boot_id)
        return; /* the store holds no batch of this run yet */
    unsigned keep = 0;
    for (unsigned i = 0; i < e->n_acked; i++)
        if (e->acked[i].seq > applied_seq)
            e->acked[keep++] = e->acked[i];
    e->n_acked = keep;
}

static void usage_remove_locked(struct audit_log *l, struct usage_ent *ent)
{
    struct usage_ent **pp = &l->buckets[ent->hash % l->n_buckets];
    while (*pp != ent)
        pp = &(*pp)->next;
    *pp = ent->next;
    free(ent);
    l->n_ents--;
}

/* --- queue --------------------------------------------------------------------------- */

static struct qrec *q_at(struct audit_log *l, size_t i)
{
    return &l->q[(l->q_head + i) % l->q_cap];
}

/* Room for one more record: the ring grows by doubling, up to max_pending. */
static int q_reserve_locked(struct audit_log *l)
{
    if (l->q_n < l->q_cap)
        return 0;
    size_t limit = l->cfg.max_pending;
    if (l->q_cap >= limit)
        return KR_EBUSY;
    size_t cap = l->q_cap ? l->q_cap * 2 : 1024;
    if (cap > limit)
        cap = limit;
    struct qrec *q = malloc(cap * sizeof(*q));
    if (q == NULL)
        return KR_ENOMEM;
    for (size_t i = 0; i < l->q_n; i++)
        q[i] = *q_at(l, i);
    free(l->q);
    l->q = q;
    l->q_cap = cap;
    l->q_head = 0;
    return 0;
}

static void q_push_locked(struct audit_log *l, uint8_t *data, size_t len, uint64_t now)
{
    *q_at(l, l->q_n) = (struct qrec){.data = data, .len = len, .at_ms = now};
    l->q_n++;
    l->appended++;
    if (l->q_n == SHIP_EAGER)
        pthread_cond_signal(&l->cv);
}

/* A packed AuditRecord of this node's own. */
static uint8_t *own_record(const struct audit_log *l, const char *operation, const char *message,
                           size_t *out_len)
{
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.time_ms = wall_ms();
    r.node_id = l->cfg.node_id;
    r.operation = (char *)operation;
    r.message = (char *)message;
    size_t n = keyraft__audit_record__get_packed_size(&r);
    uint8_t *buf = malloc(n);
    if (buf != NULL)
        keyraft__audit_record__pack(&r, buf);
    *out_len = n;
    return buf;
}

/* Once there is room again, the records refused while the queue was full
 * become a record of their own. */
static void overflow_notice_locked(struct audit_log *l, uint64_t now)
{
    if (l->refused_unrecorded == 0 || l->q_n >= l->cfg.max_pending)
        return;
    char msg[128];
    snprintf(msg, sizeof(msg), "%" PRIu64 " records could not be queued while the audit log "
             "was full", l->refused_unrecorded);
    size_t len = 0;
    uint8_t *rec = own_record(l, "audit_overflow", msg, &len);
    if (rec == NULL || q_reserve_locked(l) != 0) {
        free(rec);
        return; /* tried again at the next append or acknowledgement */
    }
    log_warn("%s", msg);
    q_push_locked(l, rec, len, now);
    l->refused_unrecorded = 0;
}

/* |s| cut to at most |max| bytes, not inside a UTF-8 sequence. malloc'd. */
static char *utf8_prefix(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n > max) {
        n = max;
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
            n--;
    }
    return strndup(s, n);
}

/* A record over AUDIT_MAX_RECORD_BYTES would be replaced by the FSM anyway,
 * and one over a frame could never ship: replace it here by a short one
 * that keeps who, what and the outcome. */
static uint8_t *shrink_record(const struct audit_log *l, const uint8_t *rec, size_t len,
                              size_t *out_len)
{
    Keyraft__AuditRecord *orig = keyraft__audit_record__unpack(NULL, len, rec);
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    char msg[128];
    snprintf(msg, sizeof(msg), "record of %zu bytes too large (limit %d)%s", len,
             AUDIT_MAX_RECORD_BYTES, orig ? "" : "; it does not decode");
    r.time_ms = wall_ms();
    r.node_id = l->cfg.node_id;
    r.message = msg;
    char *principal = NULL, *operation = NULL;
    uint8_t *buf = NULL;
    if (orig != NULL) {
        principal = utf8_prefix(orig->principal, OVERSIZE_FIELD_MAX);
        operation = utf8_prefix(orig->operation, OVERSIZE_FIELD_MAX);
        if (principal == NULL || operation == NULL)
            goto out;
        r.time_ms = orig->time_ms;
        r.principal = principal;
        r.operation = operation;
        r.status = orig->status;
        r.key_version = orig->key_version;
        if (strlen(orig->key_id) <= USAGE_KEY_ID_MAX)
            r.key_id = orig->key_id;
    }
    *out_len = keyraft__audit_record__get_packed_size(&r);
    buf = malloc(*out_len);
    if (buf != NULL)
        keyraft__audit_record__pack(&r, buf);
out:
    free(principal);
    free(operation);
    if (orig)
        keyraft__audit_record__free_unpacked(orig, NULL);
    return buf;
}

void audit_log_append(struct audit_log *l, const uint8_t *record, size_t len)
{
    if (l == NULL || (record == NULL && len > 0) || !l->cfg.enabled)
        return;
    uint8_t *copy;
    size_t copy_len = len;
    if (len > AUDIT_MAX_RECORD_BYTES) {
        copy = shrink_record(l, record, len, &copy_len);
    } else {
        copy = malloc(len ? len : 1);
        if (copy != NULL && len > 0)
            memcpy(copy, record, len);
    }
    uint64_t now = mono_ms();
    pthread_mutex_lock(&l->mu);
    if (l->stopping) {
        l->refused_late++;
        pthread_mutex_unlock(&l->mu);
        free(copy);
        return;
    }
    overflow_notice_locked(l, now);
    if (copy == NULL || l->q_n >= l->cfg.max_pending || q_reserve_locked(l) != 0) {
        l->overflowed++;
        l->refused_unrecorded++;
        pthread_mutex_unlock(&l->mu);
        free(copy);
        return;
    }
    q_push_locked(l, copy, copy_len, now);
    pthread_mutex_unlock(&l->mu);
}

void audit_log_usage(struct audit_log *l, const char *key_id, uint32_t version, uint64_t n)
{
    size_t kl = key_id ? strlen(key_id) : 0;
    if (l == NULL || n == 0 || kl == 0 || kl > USAGE_KEY_ID_MAX)
        return;
    uint64_t h = usage_hash(key_id, version);
    pthread_mutex_lock(&l->mu);
    struct usage_ent *e = usage_find_locked(l, key_id, version, h);
    if (e == NULL) {
        if (l->n_ents >= l->n_buckets && usage_grow_locked(l) != 0)
            goto nomem;
        e = calloc(1, sizeof(*e) + kl + 1);
        if (e == NULL)
            goto nomem;
        memcpy(e->key_id, key_id, kl + 1);
        e->version = version;
        e->hash = h;
        e->next = l->buckets[h % l->n_buckets];
        l->buckets[h % l->n_buckets] = e;
        l->n_ents++;
    }
    if (e->pending == 0)
        l->n_pending_ents++;
    e->pending = n > UINT64_MAX - e->pending ? UINT64_MAX : e->pending + n;
    pthread_mutex_unlock(&l->mu);
    return;
nomem:
    pthread_mutex_unlock(&l->mu);
    log_error("out of memory counting usage of %s v%" PRIu32 ": %" PRIu64
              " encryptions not counted", key_id, version, n);
}

uint64_t audit_log_unacked_usage(struct audit_log *l, const char *key_id, uint32_t version,
                                 uint64_t applied_boot, uint64_t applied_seq)
{
    if (l == NULL || key_id == NULL)
        return 0;
    uint64_t h = usage_hash(key_id, version), n = 0;
    pthread_mutex_lock(&l->mu);
    struct usage_ent *e = usage_find_locked(l, key_id, version, h);
    /* The batch in flight may be applied already (its reply not yet here):
     * then the store counts it, and so must not we. */
    int inflight_applied = l->inflight && applied_boot == l->boot_id &&
                           applied_seq >= l->batch_seq;
    if (e != NULL) {
        usage_prune_locked(l, e, applied_boot, applied_seq);
        n = e->pending;
        if (!inflight_applied)
            n = n > UINT64_MAX - e->inflight ? UINT64_MAX : n + e->inflight;
        for (unsigned i = 0; i < e->n_acked; i++)
            n = n > UINT64_MAX - e->acked[i].count ? UINT64_MAX : n + e->acked[i].count;
    }
    pthread_mutex_unlock(&l->mu);
    return n;
}

void audit_log_applied(struct audit_log *l, uint64_t applied_boot, uint64_t applied_seq)
{
    if (l == NULL)
        return;
    pthread_mutex_lock(&l->mu);
    for (size_t b = 0; b < l->n_buckets; b++) {
        struct usage_ent *e = l->buckets[b];
        while (e != NULL) {
            struct usage_ent *next = e->next;
            usage_prune_locked(l, e, applied_boot, applied_seq);
            if (e->pending == 0 && e->inflight == 0 && e->n_acked == 0)
                usage_remove_locked(l, e);
            e = next;
        }
    }
    pthread_mutex_unlock(&l->mu);
}

int audit_log_healthy(struct audit_log *l, char *why, size_t why_len)
{
    if (why != NULL && why_len > 0)
        why[0] = '\0';
    if (l == NULL || !l->cfg.enabled)
        return 1;
    uint64_t now = mono_ms();
    int ok = 1;
    pthread_mutex_lock(&l->mu);
    uint64_t age = l->q_n > 0 && now > q_at(l, 0)->at_ms ? now - q_at(l, 0)->at_ms : 0;
    if (l->q_n >= l->cfg.max_pending) {
        ok = 0;
        if (why != NULL && why_len > 0)
            snprintf(why, why_len, "audit log full: %zu records wait for the leader to commit "
                     "them (max_pending %u)", l->q_n, l->cfg.max_pending);
    } else if (l->q_n > 0 && age >= l->cfg.max_lag_ms) {
        ok = 0;
        if (why != NULL && why_len > 0)
            snprintf(why, why_len, "audit log behind: the oldest of %zu records has waited %"
                     PRIu64 " ms for the leader to commit it (max_lag_ms %u)", l->q_n, age,
                     l->cfg.max_lag_ms);
    }
    pthread_mutex_unlock(&l->mu);
    return ok;
}

int audit_log_fail_open_reads(const struct audit_log *l)
{
    return l == NULL || l->cfg.fail_open_reads;
}

void audit_log_get_stats(struct audit_log *l, struct audit_log_stats *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (l == NULL)
        return;
    uint64_t now = mono_ms();
    pthread_mutex_lock(&l->mu);
    out->appended = l->appended;
    out->acked = l->acked;
    out->pending = l->q_n;
    out->batches = l->batches;
    out->overflowed = l->overflowed;
    out->oldest_ms = l->q_n > 0 && now > q_at(l, 0)->at_ms ? now - q_at(l, 0)->at_ms : 0;
    out->boot_id = l->boot_id;
    out->batch_seq = l->batch_seq;
    out->inflight = l->inflight;
    pthread_mutex_unlock(&l->mu);
}

/* --- the shipper ----------------------------------------------------------------------- */

static void batch_free_locked(struct audit_log *l)
{
    free(l->batch_records);
    free(l->batch_deltas);
    free(l->batch_delta_ptrs);
    free(l->batch_ents);
    l->batch_records = NULL;
    l->batch_deltas = NULL;
    l->batch_delta_ptrs = NULL;
    l->batch_ents = NULL;
    l->batch_n_deltas = 0;
    l->inflight_records = 0;
    l->inflight = 0;
}

/* Makes the next batch from the oldest records and the pending usage: 1
 * when there is one, 0 when there is nothing to ship (or no memory yet). */
static int batch_build_locked(struct audit_log *l)
{
    size_t n = 0, bytes = 0;
    while (n < l->q_n && n < AUDIT_MAX_BATCH_RECORDS) {
        size_t len = q_at(l, n)->len;
        if (n > 0 && bytes + len > SHIP_MAX_BYTES)
            break;
        bytes += len;
        n++;
    }
    size_t nd = l->n_pending_ents < AUDIT_MAX_USAGE_DELTAS ? l->n_pending_ents
                                                           : AUDIT_MAX_USAGE_DELTAS;
    if (n == 0 && nd == 0)
        return 0;
    l->batch_records = calloc(n ? n : 1, sizeof(*l->batch_records));
    l->batch_deltas = calloc(nd ? nd : 1, sizeof(*l->batch_deltas));
    l->batch_delta_ptrs = calloc(nd ? nd : 1, sizeof(*l->batch_delta_ptrs));
    l->batch_ents = calloc(nd ? nd : 1, sizeof(*l->batch_ents));
    if (!l->batch_records || !l->batch_deltas || !l->batch_delta_ptrs || !l->batch_ents) {
        batch_free_locked(l);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        l->batch_records[i].data = q_at(l, i)->data;
        l->batch_records[i].len = q_at(l, i)->len;
    }
    size_t k = 0;
    for (size_t b = 0; b < l->n_buckets && k < nd; b++) {
        for (struct usage_ent *e = l->buckets[b]; e && k < nd; e = e->next) {
            if (e->pending == 0 || e->inflight != 0)
                continue;
            Keyraft__UsageDelta *d = &l->batch_deltas[k];
            keyraft__usage_delta__init(d);
            d->key_id = e->key_id; /* stable: an entry in flight is never freed */
            d->version = e->version;
            d->count = e->pending;
            e->inflight = e->pending;
            e->pending = 0;
            l->n_pending_ents--;
            l->batch_delta_ptrs[k] = d;
            l->batch_ents[k] = e;
            k++;
        }
    }
    l->batch_n_deltas = k;
    l->inflight_records = n;
    l->inflight = 1;
    l->batch_seq++;
    return 1;
}

/* The leader committed the batch in flight. */
static void batch_ack_locked(struct audit_log *l, uint64_t now)
{
    for (size_t i = 0; i < l->inflight_records; i++) {
        struct qrec *r = q_at(l, 0);
        free(r->data);
        l->q_head = (l->q_head + 1) % l->q_cap;
        l->q_n--;
    }
    l->acked += l->inflight_records;
    l->batches++;
    for (size_t i = 0; i < l->batch_n_deltas; i++) {
        struct usage_ent *e = l->batch_ents[i];
        if (e->n_acked == ACKED_SLOTS) {
            e->acked[1].count += e->acked[0].count;
            memmove(&e->acked[0], &e->acked[1], (ACKED_SLOTS - 1) * sizeof(e->acked[0]));
            e->n_acked--;
        }
        e->acked[e->n_acked].seq = l->batch_seq;
        e->acked[e->n_acked].count = e->inflight;
        e->n_acked++;
        e->inflight = 0;
    }
    batch_free_locked(l);
    overflow_notice_locked(l, now);
}

static int has_work_locked(const struct audit_log *l)
{
    return l->inflight || l->q_n > 0 || l->n_pending_ents > 0 || l->refused_unrecorded > 0;
}

static void wait_until_locked(struct audit_log *l, uint64_t until_ms)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(until_ms / 1000);
    ts.tv_nsec = (long)(until_ms % 1000) * 1000000L;
    pthread_cond_timedwait(&l->cv, &l->mu, &ts);
}

static void *ship_main(void *arg)
{
    struct audit_log *l = arg;
    uint64_t next_try = mono_ms() + l->cfg.flush_ms;
    unsigned backoff = 0;
    uint64_t failing_since = 0, last_warn = 0;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        uint64_t now = mono_ms();
        if (l->stopping && (!has_work_locked(l) || now >= l->stop_deadline))
            break;
        int eager = !l->inflight && l->q_n >= SHIP_EAGER && backoff == 0;
        if (now < next_try && !eager && !(l->stopping && backoff == 0)) {
            uint64_t until = next_try;
            if (l->stopping && l->stop_deadline < until)
                until = l->stop_deadline;
            wait_until_locked(l, until);
            continue;
        }
        if (!l->inflight && !batch_build_locked(l)) {
            next_try = now + l->cfg.flush_ms;
            if (l->stopping)
                break; /* nothing left that can ship */
            continue;
        }
        Keyraft__AuditSubmitRequest sub = KEYRAFT__AUDIT_SUBMIT_REQUEST__INIT;
        sub.node_id = l->cfg.node_id;
        sub.boot_id = l->boot_id;
        sub.batch_seq = l->batch_seq;
        sub.n_records = l->inflight_records;
        sub.records = l->batch_records;
        sub.n_usage = l->batch_n_deltas;
        sub.usage = l->batch_delta_ptrs;
        pthread_mutex_unlock(&l->mu);

        /* The batch's memory stays put while unlocked: only this thread
         * frees records and usage entries in flight. */
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        req.op_case = KEYRAFT__REQUEST__OP_AUDIT_SUBMIT;
        req.audit_submit = &sub;
        Keyraft__Response *resp = NULL;
        int rc = kr_call(l->client, &req, &resp);
        if (rc == 0)
            rc = resp->status;
        char detail[256];
        snprintf(detail, sizeof(detail), "%s", rc != 0 ? kr_client_last_error(l->client) : "");
        kr_response_free(resp);

        pthread_mutex_lock(&l->mu);
        now = mono_ms();
        if (rc == 0) {
            if (failing_since != 0)
                log_info("shipping to the leader again after %" PRIu64 " ms",
                         now - failing_since);
            failing_since = 0;
            last_warn = 0; /* the next failure is news */
            backoff = 0;
            batch_ack_locked(l, now);
            next_try = now + l->cfg.flush_ms;
            continue;
        }
        if (failing_since == 0)
            failing_since = now;
        if (last_warn == 0 || now - last_warn >= SHIP_WARN_EVERY_MS) {
            log_warn("batch %" PRIu64 "/%" PRIu64 " (%zu records) not acknowledged by %s: "
                     "%s%s%s; retrying",
                     l->boot_id, l->batch_seq, l->inflight_records, l->cfg.endpoint,
                     kr_strerror(rc), detail[0] ? ": " : "", detail);
            last_warn = now;
        }
        backoff = backoff == 0 ? 10 : backoff * 2;
        if (backoff > SHIP_BACKOFF_MAX_MS)
            backoff = SHIP_BACKOFF_MAX_MS;
        next_try = now + backoff;
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static void log_free(struct audit_log *l)
{
    if (l == NULL)
        return;
    kr_client_free(l->client);
    for (size_t i = 0; i < l->q_n; i++)
        free(q_at(l, i)->data);
    free(l->q);
    for (size_t i = 0; i < l->n_buckets; i++) {
        struct usage_ent *e = l->buckets[i];
        while (e) {
            struct usage_ent *next = e->next;
            free(e);
            e = next;
        }
    }
    free(l->buckets);
    batch_free_locked(l);
    if (l->sync_ready) {
        pthread_cond_destroy(&l->cv);
        pthread_mutex_destroy(&l->mu);
    }
    free(l->endpoint);
    free(l->ca_file);
    free(l->cert_file);
    free(l->key_file);
    free(l);
}

int audit_log_start(const struct audit_config *config, struct audit_log **out)
{
    if (config == NULL || out == NULL || config->endpoint == NULL || config->ca_file == NULL ||
        config->cert_file == NULL || config->key_file == NULL || config->node_id == 0 ||
        config->flush_ms == 0 || config->max_pending == 0 || config->max_lag_ms == 0) {
        log_error("audit_log_start: node id, endpoint, TLS files, flush_ms, max_pending and "
                  "max_lag_ms are needed");
        return KR_EINVAL;
    }
    struct audit_log *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return KR_ENOMEM;
    int rc = KR_ENOMEM;
    l->cfg = *config;
    l->endpoint = strdup(config->endpoint);
    l->ca_file = strdup(config->ca_file);
    l->cert_file = strdup(config->cert_file);
    l->key_file = strdup(config->key_file);
    if (!l->endpoint || !l->ca_file || !l->cert_file || !l->key_file)
        goto out;
    l->cfg.endpoint = l->endpoint;
    l->cfg.ca_file = l->ca_file;
    l->cfg.cert_file = l->cert_file;
    l->cfg.key_file = l->key_file;
    /* Distinct per start and increasing (the FSM applies a source's batches
     * only past the last (boot_id, batch_seq) it saw). */
    l->boot_id = wall_ms();

    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0) {
        rc = KR_EINTERNAL;
        goto out;
    }
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int ok = pthread_cond_init(&l->cv, &ca) == 0;
    pthread_condattr_destroy(&ca);
    if (!ok) {
        rc = KR_EINTERNAL;
        goto out;
    }
    if (pthread_mutex_init(&l->mu, NULL) != 0) {
        pthread_cond_destroy(&l->cv);
        rc = KR_EINTERNAL;
        goto out;
    }
    l->sync_ready = 1;

    kr_client_config cc = {
        .endpoints = l->endpoint,
        .ca_file = l->ca_file,
        .cert_file = l->cert_file,
        .key_file = l->key_file,
        .timeout_ms = SHIP_CALL_TIMEOUT_MS,
    };
    rc = kr_client_new(&cc, &l->client);
    if (rc != 0) {
        log_error("no client for %s with certificate %s: %s", l->endpoint, l->cert_file,
                  kr_strerror(rc));
        goto out;
    }
    rc = pthread_create(&l->thread, NULL, ship_main, l);
    if (rc != 0) {
        log_error("cannot start the shipper thread: %s", strerror(rc));
        rc = KR_EINTERNAL;
        goto out;
    }
    l->thread_started = 1;
    log_info("shipping to %s every %u ms (boot %" PRIu64 ")%s", l->endpoint,
             l->cfg.flush_ms, l->boot_id, l->cfg.enabled ? "" : "; records are not kept (disabled)");
    *out = l;
    l = NULL;
    rc = 0;
out:
    log_free(l);
    return rc;
}

void audit_log_stop(struct audit_log *l, unsigned timeout_ms)
{
    if (l == NULL)
        return;
    pthread_mutex_lock(&l->mu);
    l->stopping = 1;
    l->stop_deadline = mono_ms() + timeout_ms;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    if (l->thread_started)
        pthread_join(l->thread, NULL);
    uint64_t usage = 0;
    for (size_t i = 0; i < l->n_buckets; i++)
        for (struct usage_ent *e = l->buckets[i]; e; e = e->next)
            usage += e->pending + e->inflight;
    if (l->q_n > 0)
        log_warn("%zu records not acknowledged at shutdown", l->q_n);
    if (l->refused_unrecorded > 0)
        log_warn("%" PRIu64 " records refused while the audit log was full are not "
                 "recorded anywhere but here", l->refused_unrecorded);
    if (usage > 0)
        log_warn("%" PRIu64 " counted encryptions not acknowledged at shutdown", usage);
    if (l->refused_late > 0)
        log_warn("%" PRIu64 " records arrived after shutdown began and were not kept",
                 l->refused_late);
    log_free(l);
}
