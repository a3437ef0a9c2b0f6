/* cluster.c: canonical/raft setup and proposal batching. Runs on the loop
 * given to cluster_start; not thread safe. */
#include "cluster.h"

#define KR_LOG_MODULE "cluster"
#include <raft.h>
#include <raft/uv.h>
#include <stdio.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"
#include "peer.h"

#define CLUSTER_MAX_IN_FLIGHT 64   /* entries; each holds many commands */
#define CLUSTER_MAX_QUEUED 65536   /* commands waiting for an entry */
#define SNAPSHOT_MAGIC 0x4b52534e41500001ull /* "KRSNAP" v1 */

struct waiter {
    cluster_done_cb cb;
    void *arg;
};

struct pending {
    uint8_t *bytes; /* packed Command */
    size_t len;
    struct waiter waiter;
};

struct proposal {
    struct raft_apply req;
    struct cluster *cluster;
    size_t n;
    struct waiter waiters[];
};

struct barrier_waiter {
    cluster_barrier_cb cb;
    void *arg;
};

struct barrier_round {
    struct raft_barrier req;
    struct cluster *cluster;
    size_t n;
    struct barrier_waiter waiters[];
};

struct cluster {
    uv_loop_t *loop;
    uint64_t node_id;
    struct raft_change change;   /* one membership change at a time */
    int changing;
    struct raft_transfer transfer;
    int transferring;
    struct barrier_waiter *barrier_queue;
    size_t barrier_queued, barrier_cap;
    int barrier_in_flight;
    struct raft raft;
    struct raft_io io;
    struct raft_uv_transport transport;
    struct raft_fsm raft_fsm;
    struct fsm *fsm;
    struct store *store;
    uv_prepare_t flusher;
    struct pending *queue;
    size_t queued;
    size_t queue_cap;
    unsigned in_flight;
    int stopping;
    void (*stop_cb)(void *arg);
    void *stop_arg;
    char address[64];
    int tls_transport;
    void (*apply_hook)(void *arg, uint64_t applied_index);
    void *apply_hook_arg;
    int (*fetch_snapshot)(void *arg, uint64_t min_index);
    void *fetch_arg;
    unsigned snapshot_entries;   /* most entries between snapshots */
    uint64_t snapshot_log_bytes; /* log bytes between snapshots */
    uint64_t entry_bytes_avg;    /* running mean of applied entry sizes */
    unsigned applied_since_snapshot;
    /* A raft snapshot in progress (fsm_snapshot_cb to fsm_snapshot_finalize_cb):
     * its store flush runs on a worker, then raft writes the manifest. */
    int snapshot_taking;
    unsigned snapshot_entries_at;  /* entries the snapshot covers, for its log line */
    /* Written by the worker, read by finalize (after the work, on the loop). */
    int snapshot_flush_ran;
    int snapshot_flush_rv;
    uint64_t snapshot_flush_ms;
    char *snapshot_hold_file; /* test hook (SNAPSHOT_HOLD_ENV); NULL: none */
    int flusher_closed;
    int raft_closed; /* raft_close's callback ran: raft_uv may be freed once the loop is dry */
    /* raft_uv's close, wrapped so raft's callback runs once (io_close_once) */
    void (*io_close_orig)(struct raft_io *io, raft_io_close_cb cb);
    raft_io_close_cb io_close_cb;
    int io_closed;
    int io_closing; /* raft_close began: io_snapshot_put refuses */
    int (*io_snapshot_put_orig)(struct raft_io *io, unsigned trailing,
                                struct raft_io_snapshot_put *req,
                                const struct raft_snapshot *snapshot,
                                raft_io_snapshot_put_cb cb);
};

/* --- FSM adapter --------------------------------------------------------------- */

static uint64_t next_index(void *arg)
{
    struct cluster *c = arg;
    return raft_last_applied(&c->raft) + 1;
}

/* raft 0.15 counts entries only: with 500 KB bulk entries its 8192-entry
 * threshold would let 4 GB of log pile up before a snapshot, all replayed at
 * restart. The threshold follows the mean entry size so that about
 * snapshot_log_bytes of log separate snapshots, and the trailing entries kept
 * for lagging followers are half of that.
 * Every node keeps to the same thresholds (counted from its last snapshot):
 * raft 0.15 crashes a follower that compacted its log below entries the
 * leader still resends ("No log entries found at index 1", then a NULL read
 * in libraft). With each node at its own offset in the interval, a node
 * restarted under load compacted ahead of the leader while catching up and
 * crashed that way, or stopped serving and freed memory twice on its way out. */
#define SNAPSHOT_MIN_ENTRIES 16u
#define SNAPSHOT_MAX_TRAILING 1024u
/* For tests only: while the file this names exists (at most 60 s), each
 * snapshot's flush waits, so a test can stop or kill the node inside one. */
#define SNAPSHOT_HOLD_ENV "KEYRAFT_TEST_SNAPSHOT_HOLD_FILE"
#define SNAPSHOT_HOLD_MAX_MS 60000u

static void snapshot_pace(struct cluster *c, size_t entry_len)
{
    uint64_t len = entry_len ? entry_len : 1;
    c->entry_bytes_avg = c->entry_bytes_avg == 0 ? len : (c->entry_bytes_avg * 15 + len) / 16;
    uint64_t by_bytes = c->snapshot_log_bytes / (c->entry_bytes_avg ? c->entry_bytes_avg : 1);
    unsigned threshold = (unsigned)(by_bytes < c->snapshot_entries ? by_bytes : c->snapshot_entries);
    if (threshold < SNAPSHOT_MIN_ENTRIES)
        threshold = SNAPSHOT_MIN_ENTRIES;
    unsigned trailing = threshold / 2 < SNAPSHOT_MAX_TRAILING ? threshold / 2 : SNAPSHOT_MAX_TRAILING;
    if (trailing < SNAPSHOT_MIN_ENTRIES)
        trailing = SNAPSHOT_MIN_ENTRIES;
    raft_set_snapshot_threshold(&c->raft, threshold);
    raft_set_snapshot_trailing(&c->raft, trailing);
    c->applied_since_snapshot++;
}

static int fsm_apply_cb(struct raft_fsm *raft_fsm, const struct raft_buffer *buf, void **result)
{
    struct cluster *c = raft_fsm->data;
    struct fsm_result *res = NULL;
    int rv = fsm_apply(c->fsm, buf->base, buf->len, &res);
    if (rv != 0)
        return RAFT_IOERR; /* raft retries this entry */
    *result = res;
    snapshot_pace(c, buf->len);
    if (c->apply_hook)
        c->apply_hook(c->apply_hook_arg, raft_last_applied(&c->raft) + 1);
    return 0;
}

void cluster_set_apply_hook(struct cluster *c, void (*hook)(void *arg, uint64_t applied_index),
                            void *arg)
{
    c->apply_hook = hook;
    c->apply_hook_arg = arg;
}

/* The raft snapshot is a manifest: the store's data at or past its index is
 * made durable before raft writes the manifest and compacts its log, so
 * compacting never loses an applied entry. raft asks for the manifest on the
 * loop (fsm_snapshot_cb), has a worker run the flush (fsm_snapshot_async_cb;
 * entries go on applying meanwhile: the store only moves past the index),
 * then writes the manifest and calls fsm_snapshot_finalize_cb. A flush on the
 * loop held it 120-270 ms per snapshot, a stall every client saw. */
static int fsm_snapshot_cb(struct raft_fsm *raft_fsm, struct raft_buffer *bufs[], unsigned *n)
{
    struct cluster *c = raft_fsm->data;
    struct raft_buffer *b = raft_malloc(sizeof(*b));
    if (b == NULL)
        return RAFT_NOMEM;
    b->len = 16;
    b->base = raft_malloc(b->len);
    if (b->base == NULL) {
        raft_free(b);
        return RAFT_NOMEM;
    }
    uint8_t *p = b->base;
    uint64_t fields[2] = {SNAPSHOT_MAGIC, store_applied_index(c->store)};
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < 8; i++)
            p[f * 8 + i] = (uint8_t)(fields[f] >> (56 - 8 * i));
    *bufs = b;
    *n = 1;
    /* A store swap (a restore) waits for the flush handed to the worker. */
    store_preflush_hold(c->store);
    c->snapshot_taking = 1;
    c->snapshot_flush_ran = 0;
    c->snapshot_entries_at = c->applied_since_snapshot;
    log_info("snapshot at %u entries (index %llu): flushing the store on a worker",
             c->snapshot_entries_at, (unsigned long long)fields[1]);
    return 0;
}

/* On a worker thread: the store is written by the loop meanwhile. */
static int fsm_snapshot_async_cb(struct raft_fsm *raft_fsm, struct raft_buffer *bufs[],
                                 unsigned *n)
{
    (void)bufs;
    (void)n;
    struct cluster *c = raft_fsm->data;
    for (unsigned ms = 0; c->snapshot_hold_file != NULL && ms < SNAPSHOT_HOLD_MAX_MS &&
                          access(c->snapshot_hold_file, F_OK) == 0;
         ms += 10)
        uv_sleep(10);
    uint64_t t0 = uv_hrtime();
    c->snapshot_flush_ran = 1;
    c->snapshot_flush_rv = store_preflush(c->store); /* ends the hold */
    c->snapshot_flush_ms = (uv_hrtime() - t0) / 1000000;
    return c->snapshot_flush_rv == 0 ? 0 : RAFT_IOERR; /* raft then keeps its log */
}

/* On the loop, once raft is done with the manifest, whatever the outcome. */
static int fsm_snapshot_finalize_cb(struct raft_fsm *raft_fsm, struct raft_buffer *bufs[],
                                    unsigned *n)
{
    struct cluster *c = raft_fsm->data;
    if (!c->snapshot_taking) {
        log_error("snapshot finalized twice: ignored");
        return 0;
    }
    if (!c->snapshot_flush_ran) {
        store_preflush_release(c->store);
    } else if (c->snapshot_flush_rv != 0) {
        log_error("snapshot at %u entries: store flush failed: %s (the log is kept)",
                  c->snapshot_entries_at, kr_strerror(c->snapshot_flush_rv));
    } else {
        log_info("snapshot at %u entries: the store flush took %llu ms (on a worker)",
                 c->snapshot_entries_at, (unsigned long long)c->snapshot_flush_ms);
        c->applied_since_snapshot -= c->snapshot_entries_at; /* applied meanwhile stay */
    }
    if (*bufs != NULL) {
        for (unsigned i = 0; i < *n; i++)
            raft_free((*bufs)[i].base);
        raft_free(*bufs);
    }
    *bufs = NULL;
    *n = 0;
    c->snapshot_taking = 0;
    return 0;
}

static int fsm_restore_cb(struct raft_fsm *raft_fsm, struct raft_buffer *buf)
{
    struct cluster *c = raft_fsm->data;
    const uint8_t *p = buf->base;
    uint64_t fields[2] = {0, 0};
    int rv = 0;
    if (buf->len != 16) {
        rv = RAFT_MALFORMED;
        goto out;
    }
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < 8; i++)
            fields[f] = (fields[f] << 8) | p[f * 8 + i];
    if (fields[0] != SNAPSHOT_MAGIC) {
        rv = RAFT_MALFORMED;
        goto out;
    }
    uint64_t applied = store_applied_index(c->store);
    if (applied >= fields[1])
        goto out; /* the store holds it all: entries up to |applied| replay as no-ops */
    /* The log before this index is gone and the store does not hold it: copy
     * a peer's store. This blocks the loop for the whole fetch; accepted, as
     * a node this far behind has nothing correct to serve meanwhile. */
    log_warn("snapshot at index %llu is past the store (applied %llu): fetching the store "
             "from a peer", (unsigned long long)fields[1], (unsigned long long)applied);
    int frv = KR_EUNAVAIL;
    if (c->fetch_snapshot != NULL)
        frv = c->fetch_snapshot(c->fetch_arg, fields[1]);
    if (frv == 0 && store_applied_index(c->store) < fields[1])
        frv = KR_EINTERNAL; /* the hook's contract */
    if (frv == 0) {
        /* The fsm caches its position inside an entry; it belongs to the old
         * store. Raft holds no fsm result here (restore runs between applies). */
        struct fsm *fsm = NULL;
        frv = fsm_new(c->store, next_index, c, &fsm);
        if (frv == 0) {
            fsm_free(c->fsm);
            c->fsm = fsm;
        }
    }
    if (frv != 0) {
        log_error("snapshot at index %llu is past the store (applied %llu) and no peer's "
                  "store could be fetched (%s): the data directory is incomplete; restore it "
                  "from a peer or a backup",
                  (unsigned long long)fields[1],
                  (unsigned long long)store_applied_index(c->store), kr_strerror(frv));
        rv = RAFT_CORRUPT;
        goto out;
    }
    log_info("snapshot at index %llu restored: the store is at %llu",
             (unsigned long long)fields[1], (unsigned long long)store_applied_index(c->store));
out:
    /* raft 0.15 frees the buffer itself when restore fails: only a
     * successful restore takes it (freeing it on failure was a double free). */
    if (rv == 0)
        raft_free(buf->base);
    return rv;
}

/* --- proposals ----------------------------------------------------------------- */

static void finish_waiters(struct waiter *w, size_t n, const struct fsm_result *res, int status)
{
    for (size_t i = 0; i < n; i++) {
        struct fsm_op_result r = {.status = status};
        if (res != NULL && i < res->n)
            r = res->ops[i];
        w[i].cb(w[i].arg, &r);
    }
}

static void apply_done(struct raft_apply *req, int status, void *result)
{
    struct proposal *p = req->data;
    struct cluster *c = p->cluster;
    c->in_flight--;
    struct fsm_result *res = fsm_take_result(c->fsm, result);
    if (status != 0) {
        int st = status == RAFT_LEADERSHIPLOST || status == RAFT_NOTLEADER ? KR_ENOTLEADER
                                                                           : KR_EUNAVAIL;
        log_warn("entry %llu: %s", (unsigned long long)req->index, raft_strerror(status));
        finish_waiters(p->waiters, p->n, NULL, st);
    } else if (res == NULL) {
        finish_waiters(p->waiters, p->n, NULL, KR_EUNAVAIL);
    } else {
        finish_waiters(p->waiters, p->n, res, 0);
    }
    free(res);
    free(p);
}

/* 0 (no clock: the entry moves no window) if the clock cannot be read. */
static uint64_t wall_clock_ms(void)
{
    struct timespec ts = {0};
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || ts.tv_sec < 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Packs queued commands into one entry stamped with this leader's clock. */
static void flush_one_entry(struct cluster *c)
{
    size_t n = 0, cost = 0;
    while (n < c->queued && n < COMMAND_BATCH_MAX_OPS) {
        size_t add = command_packed_cost(c->queue[n].len);
        if (n > 0 && cost + add > COMMAND_BATCH_MAX_BYTES)
            break;
        cost += add;
        n++;
    }
    uint64_t time_ms = wall_clock_ms();
    struct proposal *p = malloc(sizeof(*p) + n * sizeof(p->waiters[0]));
    size_t entry_len = command_entry_len(cost, time_ms);
    uint8_t *buf = raft_malloc(entry_len);
    if (p == NULL || buf == NULL) {
        free(p);
        raft_free(buf);
        return; /* retried on the next loop iteration */
    }
    struct command_entry_writer w;
    command_entry_begin(&w, buf, cost, time_ms);
    for (size_t i = 0; i < n; i++) {
        command_entry_add(&w, c->queue[i].bytes, c->queue[i].len);
        p->waiters[i] = c->queue[i].waiter;
    }
    command_entry_end(&w);
    p->n = n;
    p->cluster = c;
    p->req.data = p;
    struct raft_buffer rb = {.base = buf, .len = entry_len};
    int rv = raft_apply(&c->raft, &p->req, &rb, 1, apply_done);
    for (size_t i = 0; i < n; i++)
        free(c->queue[i].bytes);
    memmove(c->queue, c->queue + n, (c->queued - n) * sizeof(c->queue[0]));
    c->queued -= n;
    if (rv != 0) {
        raft_free(buf);
        int st = rv == RAFT_NOTLEADER || rv == RAFT_LEADERSHIPLOST ? KR_ENOTLEADER : KR_EUNAVAIL;
        finish_waiters(p->waiters, n, NULL, st);
        free(p);
        return;
    }
    c->in_flight++;
}

static void finish_barrier_waiters(struct barrier_waiter *w, size_t n, int status)
{
    for (size_t i = 0; i < n; i++)
        w[i].cb(w[i].arg, status);
}

static void barrier_done(struct raft_barrier *req, int status)
{
    struct barrier_round *round = req->data;
    struct cluster *c = round->cluster;
    c->barrier_in_flight = 0;
    int st = status == 0                                                      ? 0
             : status == RAFT_LEADERSHIPLOST || status == RAFT_NOTLEADER ? KR_ENOTLEADER
                                                                          : KR_EUNAVAIL;
    finish_barrier_waiters(round->waiters, round->n, st);
    free(round);
}

/* One barrier for every read queued since the last one went out. */
static void flush_barrier(struct cluster *c)
{
    size_t n = c->barrier_queued;
    struct barrier_round *round = malloc(sizeof(*round) + n * sizeof(round->waiters[0]));
    if (round == NULL)
        return; /* retried on the next loop iteration */
    memcpy(round->waiters, c->barrier_queue, n * sizeof(round->waiters[0]));
    round->n = n;
    round->cluster = c;
    round->req.data = round;
    c->barrier_queued = 0;
    int rv = raft_barrier(&c->raft, &round->req, barrier_done);
    if (rv != 0) {
        finish_barrier_waiters(round->waiters, n,
                               rv == RAFT_NOTLEADER ? KR_ENOTLEADER : KR_EUNAVAIL);
        free(round);
        return;
    }
    c->barrier_in_flight = 1;
}

static void flusher_cb(uv_prepare_t *handle)
{
    struct cluster *c = handle->data;
    while (c->queued > 0 && c->in_flight < CLUSTER_MAX_IN_FLIGHT && !c->stopping)
        flush_one_entry(c);
    if (c->barrier_queued > 0 && !c->barrier_in_flight && !c->stopping)
        flush_barrier(c);
}

int cluster_barrier(struct cluster *c, cluster_barrier_cb cb, void *arg)
{
    if (c->stopping)
        return KR_EUNAVAIL;
    if (raft_state(&c->raft) != RAFT_LEADER)
        return KR_ENOTLEADER;
    if (c->barrier_queued == c->barrier_cap) {
        size_t cap = c->barrier_cap ? c->barrier_cap * 2 : 64;
        if (cap > CLUSTER_MAX_QUEUED)
            return KR_EBUSY;
        struct barrier_waiter *q = realloc(c->barrier_queue, cap * sizeof(*q));
        if (q == NULL)
            return KR_ENOMEM;
        c->barrier_queue = q;
        c->barrier_cap = cap;
    }
    c->barrier_queue[c->barrier_queued++] = (struct barrier_waiter){cb, arg};
    return 0;
}

int cluster_propose(struct cluster *c, const Keyraft__Command *command, cluster_done_cb cb,
                    void *arg)
{
    if (c->stopping)
        return KR_EUNAVAIL;
    if (raft_state(&c->raft) != RAFT_LEADER)
        return KR_ENOTLEADER;
    if (c->queued >= CLUSTER_MAX_QUEUED)
        return KR_EBUSY;
    size_t len = keyraft__command__get_packed_size(command);
    if (len > COMMAND_BATCH_MAX_BYTES - 16)
        return KR_ETOOBIG;
    if (c->queued == c->queue_cap) {
        size_t cap = c->queue_cap ? c->queue_cap * 2 : 256;
        struct pending *q = realloc(c->queue, cap * sizeof(*q));
        if (q == NULL)
            return KR_ENOMEM;
        c->queue = q;
        c->queue_cap = cap;
    }
    uint8_t *bytes = malloc(len ? len : 1);
    if (bytes == NULL)
        return KR_ENOMEM;
    keyraft__command__pack(command, bytes);
    c->queue[c->queued++] = (struct pending){bytes, len, {cb, arg}};
    return 0;
}

/* --- lifecycle ------------------------------------------------------------------ */

static int make_dir(const char *dir)
{
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        log_error("cannot create %s: %s", dir, strerror(errno));
        return KR_EIO;
    }
    return 0;
}

/* The transport's memory goes once raft_uv closed it. */
static void transport_release(struct cluster *c)
{
    if (c->tls_transport)
        peer_transport_cleanup(&c->transport);
    else
        raft_uv_tcp_close(&c->transport);
}

/* raft 0.15's raft_uv can report "closed" twice: a segment writer that
 * finishes closing after the rest calls the close callback again
 * (cowsql/raft#45), and raft's own callback then frees its memory twice.
 * `keyraftd init`, which stops right after its first writes, aborted so about
 * once in 15 runs. raft's callback is passed on once; raft_uv's memory is
 * freed only after the loop ran dry (cluster_free, cluster_bootstrap). */
static struct cluster *cluster_of_io(struct raft_io *io)
{
    return (struct cluster *)((char *)io - offsetof(struct cluster, io));
}

static void io_closed_once(struct raft_io *io)
{
    struct cluster *c = cluster_of_io(io);
    if (c->io_closed)
        return;
    c->io_closed = 1;
    c->io_close_cb(io);
}

static void io_close_once(struct raft_io *io, raft_io_close_cb cb)
{
    struct cluster *c = cluster_of_io(io);
    c->io_closing = 1;
    c->io_close_cb = cb;
    c->io_close_orig(io, io_closed_once);
}

/* raft 0.15 writes a snapshot once its flush on the worker ends, even when
 * raft_close began meanwhile, and raft_uv asserts it is not closing then
 * (Debian's build has asserts off and writes it). Refused instead: raft
 * finalizes the snapshot unwritten and keeps its log; the store is flushed
 * at close anyway. */
static int io_snapshot_put(struct raft_io *io, unsigned trailing,
                           struct raft_io_snapshot_put *req, const struct raft_snapshot *snapshot,
                           raft_io_snapshot_put_cb cb)
{
    struct cluster *c = cluster_of_io(io);
    if (c->io_closing && trailing != 0)
        return RAFT_CANCELED;
    return c->io_snapshot_put_orig(io, trailing, req, snapshot, cb);
}

static int io_setup(struct cluster *c, uv_loop_t *loop, const struct cluster_config *config)
{
    int rv = make_dir(config->raft_dir);
    if (rv != 0)
        return rv;
    c->tls_transport = config->peer_server_tls != NULL;
    if (c->tls_transport) {
        rv = peer_transport_init(&c->transport, loop, config->peer_server_tls,
                                 config->peer_client_tls);
        if (rv == 0)
            peer_transport_set_listen(&c->transport, config->raft_listen);
    } else
        rv = raft_uv_tcp_init(&c->transport, loop);
    if (rv != 0) {
        log_error("raft transport: cannot set up");
        return KR_EUNAVAIL;
    }
    rv = raft_uv_init(&c->io, loop, config->raft_dir, &c->transport);
    if (rv != 0) {
        log_error("raft log in %s: %s", config->raft_dir, c->io.errmsg);
        transport_release(c);
        return KR_EIO;
    }
    c->io_close_orig = c->io.close;
    c->io.close = io_close_once;
    c->io_snapshot_put_orig = c->io.snapshot_put;
    c->io.snapshot_put = io_snapshot_put;
    snprintf(c->address, sizeof(c->address), "%s", config->raft_address);
    /* raft_uv implements async_work but reports version 1, and raft refuses
     * async snapshots below 2 (STACK-NOTES). */
    if (c->io.async_work == NULL) {
        log_error("raft log in %s: this libraft cannot run work off the loop (no async_work)",
                  config->raft_dir);
        raft_uv_close(&c->io);
        transport_release(c);
        return KR_EUNAVAIL;
    }
    c->io.version = 2;
    c->raft_fsm.version = 3;
    c->raft_fsm.data = c;
    c->raft_fsm.apply = fsm_apply_cb;
    c->raft_fsm.snapshot = fsm_snapshot_cb;
    c->raft_fsm.restore = fsm_restore_cb;
    c->raft_fsm.snapshot_finalize = fsm_snapshot_finalize_cb;
    c->raft_fsm.snapshot_async = fsm_snapshot_async_cb;
    rv = raft_init(&c->raft, &c->io, &c->raft_fsm, config->node_id, c->address);
    if (rv != 0) {
        log_error("raft init: %s", raft_strerror(rv));
        raft_uv_close(&c->io);
        transport_release(c);
        return KR_EUNAVAIL;
    }
    return 0;
}

/* raft_uv's memory is freed (raft_uv_close) only once the loop has run dry,
 * never from raft_close's callback: raft 0.15 can still run a segment
 * writer's close callback on that memory after it (see io_closed_once).
 * Freed there, `keyraftd init` crashed in libraft about once in 25 runs. */
static void bootstrap_closed(struct raft *r)
{
    struct cluster *c = r->data;
    c->raft_closed = 1;
}

int cluster_bootstrap(const struct cluster_config *config)
{
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0)
        return KR_EINTERNAL;
    struct cluster *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        uv_loop_close(&loop);
        return KR_ENOMEM;
    }
    int rv = io_setup(c, &loop, config);
    if (rv != 0)
        goto out;
    c->raft.data = c;
    struct raft_configuration conf;
    raft_configuration_init(&conf);
    int rrv = raft_configuration_add(&conf, config->node_id, config->raft_address, RAFT_VOTER);
    if (rrv == 0)
        rrv = raft_bootstrap(&c->raft, &conf);
    raft_configuration_close(&conf);
    if (rrv == RAFT_CANTBOOTSTRAP)
        rv = KR_EEXIST;
    else if (rrv != 0) {
        log_error("raft bootstrap: %s", raft_errmsg(&c->raft));
        rv = KR_EIO;
    }
    raft_close(&c->raft, bootstrap_closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (c->raft_closed)
        raft_uv_close(&c->io);
    transport_release(c);
out:
    uv_loop_close(&loop);
    free(c);
    return rv;
}

int cluster_start(uv_loop_t *loop, const struct cluster_config *config, struct store *store,
                  struct cluster **out)
{
    struct cluster *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return KR_ENOMEM;
    c->loop = loop;
    c->store = store;
    c->node_id = config->node_id;
    c->fetch_snapshot = config->fetch_snapshot;
    c->fetch_arg = config->fetch_arg;
    int rv = fsm_new(store, next_index, c, &c->fsm);
    if (rv != 0) {
        free(c);
        return rv;
    }
    rv = io_setup(c, loop, config);
    if (rv != 0) {
        fsm_free(c->fsm);
        free(c);
        return rv;
    }
    c->raft.data = c;
    c->snapshot_entries = config->snapshot_threshold ? config->snapshot_threshold : 8192;
    c->snapshot_log_bytes = config->snapshot_log_bytes ? config->snapshot_log_bytes
                                                       : 64u * 1024 * 1024;
    raft_set_snapshot_threshold(&c->raft, c->snapshot_entries);
    raft_set_snapshot_trailing(&c->raft, SNAPSHOT_MAX_TRAILING);
    raft_set_pre_vote(&c->raft, true);
    const char *hold = getenv(SNAPSHOT_HOLD_ENV);
    if (hold != NULL && hold[0] != '\0') {
        c->snapshot_hold_file = strdup(hold);
        log_warn("%s=%s: snapshot flushes wait while that file exists (a test hook)",
                 SNAPSHOT_HOLD_ENV, hold);
    }
    uv_prepare_init(loop, &c->flusher);
    c->flusher.data = c;
    uv_prepare_start(&c->flusher, flusher_cb);
    rv = raft_start(&c->raft);
    if (rv != 0) {
        const char *why = raft_errmsg(&c->raft);
        log_error("raft start on %s: %s%s", c->address, why && why[0] ? why : raft_strerror(rv),
                  rv == RAFT_IOERR ? " (is the raft address in use by another process?)" : "");
        c->stopping = 1;
        /* Caller runs the loop through cluster_stop to release handles. */
        *out = c;
        return KR_EUNAVAIL;
    }
    log_info("raft started: node %llu at %s, applied index %llu",
             (unsigned long long)config->node_id, c->address,
             (unsigned long long)store_applied_index(store));
    *out = c;
    return 0;
}

/* Stopped once raft and the handles are closed. */
static void stop_done_maybe(struct cluster *c)
{
    if (!c->flusher_closed || c->stop_cb == NULL)
        return;
    void (*cb)(void *) = c->stop_cb;
    c->stop_cb = NULL;
    cb(c->stop_arg);
}

static void flusher_closed(uv_handle_t *handle)
{
    struct cluster *c = handle->data;
    c->flusher_closed = 1;
    stop_done_maybe(c);
}

static void raft_closed(struct raft *r)
{
    struct cluster *c = r->data;
    c->raft_closed = 1; /* once: io_closed_once */
    uv_close((uv_handle_t *)&c->flusher, flusher_closed);
}

void cluster_stop(struct cluster *c, void (*cb)(void *arg), void *arg)
{
    c->stopping = 1;
    c->stop_cb = cb;
    c->stop_arg = arg;
    for (size_t i = 0; i < c->queued; i++) {
        struct fsm_op_result r = {.status = KR_EUNAVAIL};
        free(c->queue[i].bytes);
        c->queue[i].waiter.cb(c->queue[i].waiter.arg, &r);
    }
    c->queued = 0;
    finish_barrier_waiters(c->barrier_queue, c->barrier_queued, KR_EUNAVAIL);
    c->barrier_queued = 0;
    /* raft_uv's close waits for a snapshot's flush on the worker: the store
     * outlives it. */
    if (c->snapshot_taking)
        log_info("stopping once the snapshot's store flush ends");
    raft_close(&c->raft, raft_closed);
}

void cluster_free(struct cluster *c)
{
    if (c == NULL)
        return;
    /* After the loop ran dry (see bootstrap_closed); if raft never closed,
     * its memory is left rather than freed under live handles. */
    if (c->raft_closed)
        raft_uv_close(&c->io);
    else
        log_error("cluster freed before raft closed: leaving its memory");
    transport_release(c);
    fsm_free(c->fsm);
    free(c->queue);
    free(c->barrier_queue);
    free(c->snapshot_hold_file);
    free(c);
}

static const char *role_name(int state)
{
    switch (state) {
    case RAFT_LEADER: return "leader";
    case RAFT_FOLLOWER: return "follower";
    case RAFT_CANDIDATE: return "candidate";
    default: return "unavailable";
    }
}

void cluster_get_status(struct cluster *c, struct cluster_status *out)
{
    memset(out, 0, sizeof(*out));
    int st = raft_state(&c->raft);
    out->is_leader = st == RAFT_LEADER;
    out->role = role_name(st);
    raft_id id = 0;
    const char *addr = NULL;
    raft_leader(&c->raft, &id, &addr);
    out->leader_id = id;
    snprintf(out->leader_address, sizeof(out->leader_address), "%s", addr ? addr : "");
    out->term = c->raft.current_term;
    out->commit_index = c->raft.commit_index;
    out->applied_index = raft_last_applied(&c->raft);
}

int cluster_find_dedup(struct cluster *c, const char *request_id, struct fsm_op_result *result)
{
    return fsm_find_dedup(c->fsm, request_id, result);
}

int cluster_is_leader(struct cluster *c) { return raft_state(&c->raft) == RAFT_LEADER; }

uint64_t cluster_applied_index(struct cluster *c) { return raft_last_applied(&c->raft); }

/* --- membership ------------------------------------------------------------------ */

const char *cluster_role_name(int role)
{
    switch (role) {
    case CLUSTER_VOTER: return "voter";
    case CLUSTER_STANDBY: return "standby";
    case CLUSTER_SPARE: return "spare";
    default: return "absent";
    }
}

uint64_t cluster_node_id(const struct cluster *c) { return c->node_id; }

uint64_t cluster_leader_id(struct cluster *c)
{
    raft_id id = 0;
    const char *addr = NULL;
    raft_leader(&c->raft, &id, &addr);
    return id;
}

unsigned cluster_election_timeout_ms(const struct cluster *c) { return c->raft.election_timeout; }

size_t cluster_members(struct cluster *c, struct cluster_member *out, size_t cap)
{
    const struct raft_configuration *conf = &c->raft.configuration;
    int leader = raft_state(&c->raft) == RAFT_LEADER;
    size_t n = 0;
    for (unsigned i = 0; i < conf->n && n < cap; i++, n++) {
        const struct raft_server *srv = &conf->servers[i];
        memset(&out[n], 0, sizeof(out[n]));
        out[n].id = srv->id;
        snprintf(out[n].address, sizeof(out[n].address), "%s", srv->address);
        out[n].role = srv->role;
        if (leader && c->raft.leader_state.progress != NULL) {
            const struct raft_progress *p = &c->raft.leader_state.progress[i];
            out[n].match_index = srv->id == c->node_id ? c->raft.last_stored : p->match_index;
            out[n].reachable = srv->id == c->node_id || p->recent_recv;
        }
    }
    return n;
}

static void change_done(struct raft_change *req, int status)
{
    struct cluster *c = req->data;
    c->changing = 0;
    if (status != 0)
        log_warn("membership change: %s", raft_strerror(status));
    else
        log_info("membership change committed");
}

static void transfer_done(struct raft_transfer *req)
{
    struct cluster *c = req->data;
    c->transferring = 0;
    log_info("leadership transfer finished: this node is %s",
             raft_state(&c->raft) == RAFT_LEADER ? "still the leader" : "no longer the leader");
}

int cluster_transfer(struct cluster *c, uint64_t id)
{
    if (c->stopping)
        return KR_EUNAVAIL;
    if (raft_state(&c->raft) != RAFT_LEADER)
        return KR_ENOTLEADER;
    if (c->transferring)
        return KR_EBUSY;
    c->transfer.data = c;
    int rv = raft_transfer(&c->raft, &c->transfer, id, transfer_done);
    if (rv != 0) {
        log_warn("leadership transfer to %llu: %s", (unsigned long long)id, raft_strerror(rv));
        return rv == RAFT_NOTFOUND || rv == RAFT_BADID ? KR_ENOTFOUND : KR_EINVAL;
    }
    c->transferring = 1;
    log_info("handing leadership to %s%llu", id ? "node " : "the best voter", (unsigned long long)id);
    return 0;
}

static const struct raft_server *config_find(const struct raft_configuration *conf, uint64_t id)
{
    for (unsigned i = 0; i < conf->n; i++)
        if (conf->servers[i].id == id)
            return &conf->servers[i];
    return NULL;
}

static const struct cluster_wanted *wanted_find(const struct cluster_wanted *w, size_t n,
                                                uint64_t id)
{
    for (size_t i = 0; i < n; i++)
        if (w[i].id == id)
            return &w[i];
    return NULL;
}

/* A replica close enough to the leader's log to vote without stalling commits. */
#define CATCH_UP_SLACK 256

static int start_change(struct cluster *c, const char *what, uint64_t id, int rv)
{
    if (rv != 0) {
        log_warn("membership: %s node %llu: %s", what, (unsigned long long)id, raft_strerror(rv));
        return 0;
    }
    c->changing = 1;
    log_info("membership: %s node %llu", what, (unsigned long long)id);
    return 1;
}

int cluster_reconcile(struct cluster *c, const struct cluster_wanted *wanted, size_t n)
{
    if (c->stopping || c->changing || c->transferring || raft_state(&c->raft) != RAFT_LEADER ||
        c->raft.leader_state.change != NULL || c->raft.leader_state.promotee_id != 0)
        return 0;
    /* Without the leader in the registry, nothing is known about the others yet. */
    if (wanted_find(wanted, n, c->node_id) == NULL)
        return 0;
    const struct raft_configuration *conf = &c->raft.configuration;
    c->change.data = c;
    for (size_t i = 0; i < n; i++) {
        const struct raft_server *srv = config_find(conf, wanted[i].id);
        if (srv == NULL)
            return start_change(c, "adding (spare)", wanted[i].id,
                                raft_add(&c->raft, &c->change, wanted[i].id, wanted[i].address,
                                         change_done));
    }
    for (unsigned i = 0; i < conf->n; i++) {
        const struct raft_server *srv = &conf->servers[i];
        const struct cluster_wanted *w = wanted_find(wanted, n, srv->id);
        int want = w ? w->role : CLUSTER_ABSENT;
        if (srv->role == want)
            continue;
        if (srv->id == c->node_id) {
            /* The leader never changes its own role: it hands over first. */
            cluster_transfer(c, 0);
            return 1;
        }
        uint64_t sid = srv->id;
        if (want == CLUSTER_ABSENT)
            return start_change(c, "removing", sid,
                                raft_remove(&c->raft, &c->change, sid, change_done));
        if (srv->role == CLUSTER_SPARE || want == CLUSTER_STANDBY)
            return start_change(c, "assigning standby to", sid,
                                raft_assign(&c->raft, &c->change, sid, RAFT_STANDBY,
                                            change_done));
        /* standby -> voter: only once it holds nearly the whole log, so the
         * promotion's catch-up rounds are short and other changes not held up. */
        const struct raft_progress *p = &c->raft.leader_state.progress[i];
        if (p->recent_recv && p->match_index + CATCH_UP_SLACK >= c->raft.last_stored)
            return start_change(c, "promoting to voter", sid,
                                raft_assign(&c->raft, &c->change, sid, RAFT_VOTER,
                                            change_done));
    }
    return 0;
}

int cluster_serving(struct cluster *c, char *why, size_t cap)
{
    int st = raft_state(&c->raft);
    if (st == RAFT_LEADER)
        return 1;
    raft_id leader = 0;
    const char *addr = NULL;
    raft_leader(&c->raft, &leader, &addr);
    raft_time now = c->io.time(&c->io);
    raft_time since = now - c->raft.election_timer_start;
    if (st == RAFT_FOLLOWER && leader != 0 && since < c->raft.election_timeout)
        return 1;
    if (leader == 0)
        snprintf(why, cap, "this node (%s) knows no leader: cut off from the cluster or an "
                 "election is running; it serves no key operations until it hears from a leader",
                 role_name(st));
    else
        snprintf(why, cap, "this node has not heard from the leader (node %llu) for %llu ms, "
                 "more than the election timeout (%u ms): it serves no key operations until "
                 "it does", (unsigned long long)leader, (unsigned long long)since,
                 c->raft.election_timeout);
    return 0;
}
