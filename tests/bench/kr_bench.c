/* kr_bench.c: load generator on libkeyraft: C connections, each with D
 * requests in flight (kr_send, kr_try_recv), optionally B operations per
 * frame (BatchRequest), driven by T threads (default C: one each), each
 * polling its share of the connections as an event-driven application would;
 * bounded by count and by time.
 *   kr_bench --config FILE --op create|get|encrypt|decrypt|sign|datakey
 *            [--conns C] [--threads T] [--inflight D] [--batch B]
 *            [--seconds S] [--max-ops N] [--size BYTES] [--keys K]
 * A broken connection or a refusal from a non-leader drains the pipeline
 * and sends one frame with kr_call, which fails over; then pipelining resumes.
 * Prints one key=value line: op, threads, conns, inflight, batch,
 * ops, errors, seconds, ops/s, p50/p99/p999 latency (ms, per frame: a batch's
 * latency is its whole frame's), max_gap_ms (the longest wait between two
 * acknowledged frames on one connection: spans a failover). Keys for every op
 * but create are made before the timed phase, which starts once every
 * connection is up. Exit 0, 1 on errors, 3 when the node does not serve
 * batches.
 *   kr_bench --fsync-probe DIR
 * times 200 writes of 4 KiB each followed by fdatasync in a scratch file in
 * DIR (the disk the nodes' raft logs are on) and prints their p50/p99: a
 * replicated write's floor, which moves from machine to machine and day to
 * day, so figures from different runs are read against it. */
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "keyraft.h"

#define MAX_CONNS 1024
#define MAX_INFLIGHT 1024
#define MAX_BATCH 10000
#define MAX_KEYS 1024
#define MAX_SIZE 65536
#define RID_LEN 32 /* hex characters of a sub-request's idempotency id */

enum op { OP_CREATE, OP_GET, OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_DATAKEY };
static const char *const OP_NAMES[] = {"create", "get", "encrypt", "decrypt", "sign", "datakey"};

struct shared {
    kr_client_config cfg;
    enum op op;
    int inflight, batch, n_keys;
    size_t size;
    double seconds, end;
    double timeout_s; /* the client's: a connection with no answer for it reconnects */
    long max_ops;
    long run_tag; /* makes names unique across runs */
    char (*key_ids)[64];
    kr_buf *ciphertexts; /* OP_DECRYPT: one per key */
    uint8_t payload[MAX_SIZE];
    atomic_long issued; /* operations handed out, against max_ops */
    atomic_int stop;
    atomic_int unsupported; /* the node refused batches as an unknown operation */
    pthread_mutex_t lock;   /* guards first_message, connected, go */
    pthread_cond_t start;   /* connected went up, or go was set */
    int connected;          /* threads whose connections are up */
    int go;                 /* the timed phase began: |end| is set */
    char first_message[256];
};

/* The pieces of one request; a batch has |batch| of them, a single one 1. */
struct slot_req {
    Keyraft__Request req;
    Keyraft__KeyRef ref;
    Keyraft__CreateKeyRequest create;
    Keyraft__GetKeyRequest get;
    Keyraft__EncryptRequest encrypt;
    Keyraft__DecryptRequest decrypt;
    Keyraft__SignRequest sign;
    Keyraft__DataKeyRequest datakey;
    char name[96];
    char rid[RID_LEN + 1];
};

/* One connection: its client, what it has in flight, and its figures. */
struct conn {
    struct shared *sh;
    int index;
    long seq;
    struct slot_req *parts;       /* batch (or 1) request bodies, reused */
    Keyraft__Request **part_ptrs; /* for BatchRequest.requests */
    Keyraft__Request outer;       /* the frame around a batch */
    Keyraft__BatchRequest br;
    struct {
        uint64_t id;
        double t0;
        int n_ops;
    } *pending; /* open addressing on request id % inflight; id 0: free */
    double *lat_ms;
    long n_frames, cap, ops, errors;
    int first_error;
    double max_gap_ms;
    kr_client *c;
    int outstanding; /* frames in flight */
    int rehome;      /* the next frame goes through kr_call */
    int spent;       /* the max_ops budget is spent */
    int dead;        /* could not connect: out of the run */
    int ready;       /* poll saw its socket readable */
    double last_ok, last_io;
};

/* One thread and the connections it drives. */
struct driver {
    struct shared *sh;
    struct conn *w; /* n of them */
    int n;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Up to |want| operations of the max_ops budget; 0 when it is spent. */
static int take_ops(struct shared *sh, int want)
{
    long before = atomic_fetch_add(&sh->issued, want);
    if (before >= sh->max_ops)
        return 0;
    return before + want > sh->max_ops ? (int)(sh->max_ops - before) : want;
}

static void note_error(struct conn *w, int status, const char *message)
{
    if (w->errors++ == 0)
        w->first_error = status;
    pthread_mutex_lock(&w->sh->lock);
    if (w->sh->first_message[0] == '\0')
        snprintf(w->sh->first_message, sizeof(w->sh->first_message), "%s: %s",
                 kr_status_name(status), message != NULL ? message : "");
    pthread_mutex_unlock(&w->sh->lock);
}

/* Fills |p| with one operation of the run's kind on prepared key |k|. */
static void build_op(struct conn *w, struct slot_req *p, int k, int with_rid)
{
    struct shared *sh = w->sh;
    long seq = w->seq++;
    keyraft__request__init(&p->req);
    keyraft__key_ref__init(&p->ref);
    p->ref.id = sh->key_ids != NULL ? sh->key_ids[k] : NULL;
    switch (sh->op) {
    case OP_CREATE:
        keyraft__create_key_request__init(&p->create);
        snprintf(p->name, sizeof(p->name), "bench-%lx-%d-%ld", sh->run_tag, w->index, seq);
        p->create.name = p->name;
        p->create.algorithm = KEYRAFT__ALGORITHM__AES_256;
        p->req.op_case = KEYRAFT__REQUEST__OP_CREATE;
        p->req.create = &p->create;
        if (with_rid) { /* inside a batch: kr_send names only the outer request */
            snprintf(p->rid, sizeof(p->rid), "%08lx%08x%016lx", sh->run_tag & 0xffffffffL,
                     (unsigned)w->index, (unsigned long)seq);
            p->req.request_id = p->rid;
        }
        break;
    case OP_GET:
        keyraft__get_key_request__init(&p->get);
        p->get.key = &p->ref;
        p->req.op_case = KEYRAFT__REQUEST__OP_GET;
        p->req.get = &p->get;
        break;
    case OP_ENCRYPT:
        keyraft__encrypt_request__init(&p->encrypt);
        p->encrypt.key = &p->ref;
        p->encrypt.plaintext.data = sh->payload;
        p->encrypt.plaintext.len = sh->size;
        p->req.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
        p->req.encrypt = &p->encrypt;
        break;
    case OP_DECRYPT:
        keyraft__decrypt_request__init(&p->decrypt);
        p->decrypt.ciphertext.data = sh->ciphertexts[k].data;
        p->decrypt.ciphertext.len = sh->ciphertexts[k].len;
        p->req.op_case = KEYRAFT__REQUEST__OP_DECRYPT;
        p->req.decrypt = &p->decrypt;
        break;
    case OP_SIGN:
        keyraft__sign_request__init(&p->sign);
        p->sign.key = &p->ref;
        p->sign.message.data = sh->payload;
        p->sign.message.len = sh->size;
        p->req.op_case = KEYRAFT__REQUEST__OP_SIGN;
        p->req.sign = &p->sign;
        break;
    case OP_DATAKEY:
        keyraft__data_key_request__init(&p->datakey);
        p->datakey.key = &p->ref;
        p->datakey.bits = 256;
        p->req.op_case = KEYRAFT__REQUEST__OP_DATA_KEY;
        p->req.data_key = &p->datakey;
        break;
    }
}

/* The next frame of |n| operations: a single request, or a BatchRequest of
 * |n| when the run batches. Valid until the next call. */
static Keyraft__Request *build_frame(struct conn *w, int n)
{
    struct shared *sh = w->sh;
    int k = (int)((w->index + w->seq) % sh->n_keys);
    if (sh->batch == 0) {
        build_op(w, &w->parts[0], k, 0);
        return &w->parts[0].req;
    }
    for (int i = 0; i < n; i++) {
        build_op(w, &w->parts[i], (k + i) % sh->n_keys, 1);
        w->part_ptrs[i] = &w->parts[i].req;
    }
    keyraft__request__init(&w->outer);
    keyraft__batch_request__init(&w->br);
    w->br.n_requests = (size_t)n;
    w->br.requests = w->part_ptrs;
    w->outer.op_case = KEYRAFT__REQUEST__OP_BATCH;
    w->outer.batch = &w->br;
    return &w->outer;
}

/* Counts what one answer acknowledged. Returns 1 when the answer says to
 * look for the leader (KR_ENOTLEADER, KR_EUNAVAIL). */
static int take_answer(struct conn *w, const Keyraft__Response *resp, int n_ops,
                       double t0, double t1, double *last_ok)
{
    struct shared *sh = w->sh;
    if (resp->status != 0) {
        if (sh->batch > 0 && resp->status == KR_EINVAL && resp->message != NULL &&
            strstr(resp->message, "names no operation") != NULL)
            atomic_store(&sh->unsupported, 1);
        for (int i = 0; i < n_ops; i++)
            note_error(w, resp->status, resp->message);
        return resp->status == KR_ENOTLEADER || resp->status == KR_EUNAVAIL;
    }
    long ok = 0;
    if (sh->batch > 0) {
        size_t got = resp->result_case == KEYRAFT__RESPONSE__RESULT_BATCH && resp->batch != NULL
                         ? resp->batch->n_responses
                         : 0;
        for (size_t i = 0; i < got; i++) {
            const Keyraft__Response *r = resp->batch->responses[i];
            if (r->status == 0)
                ok++;
            else
                note_error(w, r->status, r->message);
        }
        for (size_t i = got; i < (size_t)n_ops; i++)
            note_error(w, KR_EPROTO, "a batch answer is missing");
    } else {
        ok = 1;
    }
    w->ops += ok;
    if ((t1 - *last_ok) * 1000.0 > w->max_gap_ms)
        w->max_gap_ms = (t1 - *last_ok) * 1000.0;
    *last_ok = t1;
    if (w->n_frames == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 4096;
        w->lat_ms = realloc(w->lat_ms, (size_t)w->cap * sizeof(double));
        if (w->lat_ms == NULL)
            abort();
    }
    w->lat_ms[w->n_frames++] = (t1 - t0) * 1000.0;
    return 0;
}

/* Every request in flight is lost with the connection. */
static void drop_pending(struct conn *w, int depth, int rc, const char *why)
{
    for (int s = 0; s < depth; s++) {
        for (int i = 0; w->pending[s].id != 0 && i < w->pending[s].n_ops; i++)
            note_error(w, rc, why);
        w->pending[s].id = 0;
    }
}

/* Connection |w|'s client, after one untimed call: it connects, and for
 * writes follows the leader hint, so the pipelined sends go to the right
 * node. 0 or -1 (noted). */
static int conn_start(struct conn *w)
{
    struct shared *sh = w->sh;
    Keyraft__Response *resp = NULL;
    if (kr_client_new(&sh->cfg, &w->c) != 0) {
        note_error(w, KR_ECONN, "cannot make a client");
        return -1;
    }
    build_op(w, &w->parts[0], w->index % sh->n_keys, 0);
    int warm = kr_call(w->c, &w->parts[0].req, &resp);
    if (warm != 0 || resp->status != 0) {
        note_error(w, warm != 0 ? warm : resp->status, kr_client_last_error(w->c));
        kr_response_free(resp);
        kr_client_free(w->c);
        w->c = NULL;
        return -1;
    }
    kr_response_free(resp);
    return 0;
}

/* Every request in flight on |w| is lost: after a broken connection, the
 * next frame goes through kr_call, which fails over and follows leader
 * hints; pipelining resumes on the node that answered it. */
static void conn_lost(struct conn *w, int rc, const char *why)
{
    drop_pending(w, w->sh->inflight, rc, why);
    w->outstanding = 0;
    w->rehome = 1;
}

/* Sends frames until |w| has its depth in flight (or the run ends). */
static void conn_fill(struct conn *w, int live)
{
    struct shared *sh = w->sh;
    int per_frame = sh->batch > 0 ? sh->batch : 1, depth = sh->inflight;
    while (live && !w->rehome && w->outstanding < depth) {
        int n = take_ops(sh, per_frame);
        if (n == 0) {
            w->spent = 1;
            return;
        }
        double t0 = now_s();
        Keyraft__Request *req = build_frame(w, n);
        int rc = kr_send(w->c, req);
        if (rc != 0) {
            for (int i = 0; i < n; i++)
                note_error(w, rc, kr_client_last_error(w->c));
            conn_lost(w, rc, "lost with its connection");
            return;
        }
        /* Answers come in any order: probe for a free slot (one exists,
         * fewer than |depth| are in flight). */
        int s = (int)(req->id % (uint64_t)depth);
        while (w->pending[s].id != 0)
            s = (s + 1) % depth;
        w->pending[s].id = req->id;
        w->pending[s].t0 = t0;
        w->pending[s].n_ops = n;
        w->outstanding++;
        w->last_io = t0;
    }
}

/* One frame through kr_call, after a refusal or a broken connection (the
 * pipeline is empty). */
static void conn_rehome(struct conn *w)
{
    struct shared *sh = w->sh;
    Keyraft__Response *resp = NULL;
    int n = take_ops(sh, sh->batch > 0 ? sh->batch : 1);
    if (n == 0) {
        w->spent = 1;
        return;
    }
    double t0 = now_s();
    int rc = kr_call(w->c, build_frame(w, n), &resp);
    if (rc != 0) {
        for (int i = 0; i < n; i++)
            note_error(w, rc, kr_client_last_error(w->c));
        usleep(10000); /* no spin against a cluster with no leader */
        return;
    }
    w->rehome = take_answer(w, resp, n, t0, now_s(), &w->last_ok);
    w->last_io = now_s();
    kr_response_free(resp);
}

/* Takes every answer that has arrived on |w|, without waiting. */
static void conn_drain(struct conn *w)
{
    int depth = w->sh->inflight;
    while (w->outstanding > 0) {
        Keyraft__Response *resp = NULL;
        int rc = kr_try_recv(w->c, &resp);
        double t1 = now_s();
        if (rc != 0) {
            conn_lost(w, rc, kr_client_last_error(w->c));
            return;
        }
        if (resp == NULL)
            return;
        w->last_io = t1;
        int s = (int)(resp->id % (uint64_t)depth), probes = 0;
        while (w->pending[s].id != resp->id && ++probes < depth)
            s = (s + 1) % depth;
        if (w->pending[s].id != resp->id) {
            note_error(w, KR_EPROTO, "an answer to no request in flight");
        } else {
            if (take_answer(w, resp, w->pending[s].n_ops, w->pending[s].t0, t1, &w->last_ok))
                w->rehome = 1;
            w->pending[s].id = 0;
            w->outstanding--;
        }
        kr_response_free(resp);
    }
}

/* A thread drives its connections from one poll loop, as an event-driven
 * application would: each keeps its depth in flight, and a burst of answers
 * is followed by one write of the requests sent in reply. Ends once every
 * connection has drained after the run's end. A connection with no answer
 * for the client's timeout loses what it had in flight and reconnects. */
static void *run(void *arg)
{
    struct driver *d = arg;
    struct shared *sh = d->sh;
    struct pollfd *pfd = calloc((size_t)d->n, sizeof(*pfd));
    struct conn **polled = calloc((size_t)d->n, sizeof(*polled));
    for (int i = 0; i < d->n; i++) {
        if (pfd == NULL || polled == NULL) {
            note_error(&d->w[i], KR_ENOMEM, "out of memory");
            d->w[i].dead = 1;
        } else {
            d->w[i].dead = conn_start(&d->w[i]) != 0;
        }
    }
    /* The clock starts once every thread's connections are up: the run
     * measures requests, not TLS handshakes made one after another. */
    pthread_mutex_lock(&sh->lock);
    sh->connected++;
    pthread_cond_broadcast(&sh->start);
    while (!sh->go)
        pthread_cond_wait(&sh->start, &sh->lock);
    pthread_mutex_unlock(&sh->lock);
    double started = now_s();
    for (int i = 0; i < d->n; i++)
        d->w[i].last_ok = d->w[i].last_io = started;
    for (;;) {
        double now = now_s();
        int live = !atomic_load(&sh->stop) && !atomic_load(&sh->unsupported) && now < sh->end;
        int n_poll = 0, busy = 0;
        for (int i = 0; i < d->n; i++) {
            struct conn *w = &d->w[i];
            if (w->dead)
                continue;
            if (w->ready) {
                w->ready = 0;
                conn_drain(w);
            }
            if (w->outstanding > 0 && now - w->last_io > sh->timeout_s) {
                conn_lost(w, KR_ETIMEDOUT, "no answer within the client's timeout");
                kr_client_free(w->c); /* the stream is unusable: a new client reconnects */
                if (kr_client_new(&sh->cfg, &w->c) != 0) {
                    w->c = NULL;
                    w->dead = 1;
                    continue;
                }
            }
            if (w->outstanding == 0 && w->rehome && live && !w->spent)
                conn_rehome(w);
            int before = w->outstanding;
            conn_fill(w, live && !w->spent);
            if (w->outstanding > before) {
                int rc = kr_flush(w->c);
                if (rc != 0)
                    conn_lost(w, rc, kr_client_last_error(w->c));
            }
            if (w->outstanding > 0) {
                pfd[n_poll].fd = kr_client_fd(w->c);
                pfd[n_poll].events = POLLIN;
                pfd[n_poll].revents = 0;
                polled[n_poll++] = w;
            }
            if (w->outstanding > 0 || (live && !w->spent))
                busy = 1;
        }
        if (!busy)
            break;
        if (n_poll == 0)
            continue;
        if (poll(pfd, (nfds_t)n_poll, 100) < 0 && errno != EINTR) {
            for (int j = 0; j < n_poll; j++)
                conn_lost(polled[j], KR_ECONN, "poll failed");
            continue;
        }
        for (int j = 0; j < n_poll; j++)
            if (pfd[j].revents != 0)
                polled[j]->ready = 1;
    }
    for (int i = 0; i < d->n; i++) {
        kr_client_free(d->w[i].c);
        d->w[i].c = NULL;
    }
    free(pfd);
    free(polled);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Makes the run's keys (and for decrypt, one ciphertext each) untimed. */
static int prepare_keys(struct shared *sh)
{
    kr_client *setup = NULL;
    int rv = kr_client_new(&sh->cfg, &setup);
    if (rv != 0) {
        fprintf(stderr, "kr_bench: cannot make a client: %s\n", kr_status_name(rv));
        return rv;
    }
    sh->key_ids = calloc((size_t)sh->n_keys, sizeof(*sh->key_ids));
    sh->ciphertexts = calloc((size_t)sh->n_keys, sizeof(*sh->ciphertexts));
    if (sh->key_ids == NULL || sh->ciphertexts == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    Keyraft__Algorithm alg =
        sh->op == OP_SIGN ? KEYRAFT__ALGORITHM__EC_P256 : KEYRAFT__ALGORITHM__AES_256;
    for (int i = 0; i < sh->n_keys; i++) {
        char name[96];
        Keyraft__KeyAttributes *a = NULL;
        snprintf(name, sizeof(name), "bench-%s-%lx-%d", OP_NAMES[sh->op], sh->run_tag, i);
        rv = kr_create_key(setup, name, alg, NULL, 0, &a);
        if (rv != 0) {
            fprintf(stderr, "kr_bench: setup key: %s: %s\n", kr_status_name(rv),
                    kr_client_last_error(setup));
            goto out;
        }
        snprintf(sh->key_ids[i], sizeof(sh->key_ids[i]), "%s", a->id);
        kr_key_attributes_free(a);
        if (sh->op == OP_DECRYPT) {
            rv = kr_encrypt(setup, sh->key_ids[i], sh->payload, sh->size, NULL, 0,
                            &sh->ciphertexts[i]);
            if (rv != 0) {
                fprintf(stderr, "kr_bench: setup ciphertext: %s: %s\n", kr_status_name(rv),
                        kr_client_last_error(setup));
                goto out;
            }
        }
    }
out:
    kr_client_free(setup);
    return rv;
}

#define FSYNC_PROBE_WRITES 200

static int fsync_probe(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/kr_bench-fsync-XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0) {
        perror("kr_bench: fsync probe file");
        return 1;
    }
    unlink(path);
    static char block[4096];
    memset(block, 0x5a, sizeof(block));
    double ms[FSYNC_PROBE_WRITES];
    for (int i = 0; i < FSYNC_PROBE_WRITES; i++) {
        double t0 = now_s();
        if (write(fd, block, sizeof(block)) != (ssize_t)sizeof(block) || fdatasync(fd) != 0) {
            perror("kr_bench: fsync probe");
            close(fd);
            return 1;
        }
        ms[i] = (now_s() - t0) * 1000.0;
    }
    close(fd);
    qsort(ms, FSYNC_PROBE_WRITES, sizeof(double), cmp_double);
    printf("fsync_probe dir=%s writes=%d bytes=4096 p50_ms=%.3f p99_ms=%.3f\n", dir,
           FSYNC_PROBE_WRITES, ms[FSYNC_PROBE_WRITES / 2], ms[FSYNC_PROBE_WRITES * 99 / 100]);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kr_bench --config FILE --op create|get|encrypt|decrypt|sign|datakey\n"
            "                [--conns C] [--threads T] [--inflight D] [--batch B]\n"
            "                [--seconds S] [--max-ops N] [--size BYTES] [--keys K]\n"
            "       kr_bench --fsync-probe DIR\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"op", required_argument, NULL, 'o'},
        {"conns", required_argument, NULL, 'n'}, {"threads", required_argument, NULL, 't'},
        {"inflight", required_argument, NULL, 'd'}, {"batch", required_argument, NULL, 'b'},
        {"seconds", required_argument, NULL, 's'}, {"max-ops", required_argument, NULL, 'm'},
        {"size", required_argument, NULL, 'z'}, {"keys", required_argument, NULL, 'k'},
        {"fsync-probe", required_argument, NULL, 'f'}, {NULL, 0, NULL, 0}};
    static struct shared sh; /* 64 KiB of payload: not on the stack */
    const char *config = NULL, *op = "encrypt";
    int conns = 1, threads = 0, ch, rc = 1;

    sh.inflight = 1;
    sh.size = 64;
    sh.seconds = 5;
    sh.max_ops = 1000000;
    sh.n_keys = 16;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': config = optarg; break;
        case 'o': op = optarg; break;
        case 'n': conns = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': sh.inflight = atoi(optarg); break;
        case 'b': sh.batch = atoi(optarg); break;
        case 's': sh.seconds = atof(optarg); break;
        case 'm': sh.max_ops = atol(optarg); break;
        case 'z': sh.size = (size_t)atol(optarg); break;
        case 'k': sh.n_keys = atoi(optarg); break;
        case 'f': return fsync_probe(optarg);
        default: usage(); return 2;
        }
    }
    int found = 0;
    for (size_t i = 0; i < sizeof(OP_NAMES) / sizeof(OP_NAMES[0]); i++)
        if (strcmp(op, OP_NAMES[i]) == 0) {
            sh.op = (enum op)i;
            found = 1;
        }
    if (threads == 0)
        threads = conns;
    if (!found || conns < 1 || conns > MAX_CONNS || threads < 1 || threads > conns ||
        sh.inflight < 1 ||
        sh.inflight > MAX_INFLIGHT || sh.batch < 0 || sh.batch > MAX_BATCH ||
        sh.size > MAX_SIZE || sh.seconds <= 0 || sh.seconds > 3600 || sh.max_ops < 1 ||
        sh.n_keys < 1 || sh.n_keys > MAX_KEYS) {
        usage();
        fprintf(stderr, "kr_bench: conns 1..%d, threads 1..conns, inflight 1..%d, batch 0..%d, "
                        "size <= %d, seconds 0..3600, keys 1..%d\n",
                MAX_CONNS, MAX_INFLIGHT, MAX_BATCH, MAX_SIZE, MAX_KEYS);
        return 2;
    }
    kr_client_file *file = NULL;
    if (kr_client_file_load(config, &file, &sh.cfg) != 0) {
        fprintf(stderr, "kr_bench: cannot load client config %s\n", config ? config : "");
        return 1;
    }
    memset(sh.payload, 0x5a, sizeof(sh.payload));
    sh.run_tag = (long)time(NULL) << 20 ^ (long)getpid();
    pthread_mutex_init(&sh.lock, NULL);
    pthread_cond_init(&sh.start, NULL);
    sh.timeout_s = (sh.cfg.timeout_ms > 0 ? sh.cfg.timeout_ms : 30000) / 1000.0;
    struct conn *w = calloc((size_t)conns, sizeof(*w));
    struct driver *drivers = calloc((size_t)threads, sizeof(*drivers));
    pthread_t *tid = calloc((size_t)threads, sizeof(*tid));
    double *all = NULL;
    if (w == NULL || drivers == NULL || tid == NULL)
        goto out;
    if (sh.op == OP_CREATE)
        sh.n_keys = 1; /* creates name no key */
    else if (prepare_keys(&sh) != 0)
        goto out;
    int per_frame = sh.batch > 0 ? sh.batch : 1;
    for (int i = 0; i < conns; i++) {
        w[i].sh = &sh;
        w[i].index = i;
        w[i].parts = calloc((size_t)per_frame, sizeof(*w[i].parts));
        w[i].part_ptrs = calloc((size_t)per_frame, sizeof(*w[i].part_ptrs));
        w[i].pending = calloc((size_t)sh.inflight, sizeof(*w[i].pending));
        if (w[i].parts == NULL || w[i].part_ptrs == NULL || w[i].pending == NULL)
            goto out;
    }
    for (int i = 0, next = 0; i < threads; i++) {
        drivers[i].sh = &sh;
        drivers[i].w = &w[next];
        drivers[i].n = conns / threads + (i < conns % threads);
        next += drivers[i].n;
    }
    int started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, run, &drivers[started]) != 0)
            break;
    if (started < threads)
        atomic_store(&sh.stop, 1);
    pthread_mutex_lock(&sh.lock);
    while (sh.connected < started)
        pthread_cond_wait(&sh.start, &sh.lock);
    double t0 = now_s();
    sh.end = t0 + sh.seconds;
    sh.go = 1;
    pthread_cond_broadcast(&sh.start);
    pthread_mutex_unlock(&sh.lock);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    long ops = 0, errors = 0, frames = 0;
    int first_error = 0;
    double max_gap_ms = 0;
    for (int i = 0; i < conns; i++) {
        if (w[i].max_gap_ms > max_gap_ms)
            max_gap_ms = w[i].max_gap_ms;
        ops += w[i].ops;
        frames += w[i].n_frames;
        errors += w[i].errors;
        if (!first_error)
            first_error = w[i].first_error;
    }
    double elapsed = now_s() - t0;
    all = malloc((size_t)(frames ? frames : 1) * sizeof(double));
    if (all == NULL)
        goto out;
    long k = 0;
    for (int i = 0; i < conns; i++) {
        if (w[i].n_frames > 0)
            memcpy(all + k, w[i].lat_ms, (size_t)w[i].n_frames * sizeof(double));
        k += w[i].n_frames;
    }
    qsort(all, (size_t)frames, sizeof(double), cmp_double);
#define PCT(p) (frames ? all[(long)((double)(frames - 1) * (p))] : 0.0)
    int unsupported = atomic_load(&sh.unsupported);
    printf("op=%s threads=%d conns=%d inflight=%d batch=%d size=%zu ops=%ld errors=%ld "
           "seconds=%.2f ops_per_s=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
           "max_gap_ms=%.1f%s\n",
           OP_NAMES[sh.op], threads, conns, sh.inflight, sh.batch, sh.size, ops, errors, elapsed,
           (double)ops / elapsed, PCT(0.50), PCT(0.99), PCT(0.999), max_gap_ms,
           unsupported ? " unsupported=batch" : "");
    fflush(stdout);
    if (unsupported)
        fprintf(stderr, "kr_bench: the node does not serve BatchRequest yet (%s)\n",
                sh.first_message);
    else if (errors)
        fprintf(stderr, "kr_bench: %ld errors, first: %s\n", errors, sh.first_message);
    rc = unsupported ? 3 : errors ? 1 : 0;
out:
    for (int i = 0; w != NULL && i < conns; i++) {
        free(w[i].lat_ms);
        free(w[i].parts);
        free(w[i].part_ptrs);
        free(w[i].pending);
    }
    for (int i = 0; sh.ciphertexts != NULL && i < sh.n_keys; i++)
        kr_buf_free(&sh.ciphertexts[i]);
    free(sh.ciphertexts);
    free(sh.key_ids);
    free(all);
    free(w);
    free(drivers);
    free(tid);
    pthread_cond_destroy(&sh.start);
    pthread_mutex_destroy(&sh.lock);
    kr_client_file_free(file);
    return rc;
}
