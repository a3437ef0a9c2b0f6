/* cluster_util.h: keyraft clusters of real keyraftd processes for tests.
 * Node 1 bootstraps; every other node joins the way an operator's does
 * (init --join, cluster add, start), each with its own SoftHSM token and
 * data dir. Optionally each node's inbound raft traffic goes through an
 * in-process proxy that a test can cut. Also: a bounded writer thread that
 * records a history of creates, and the check of that history on every node. */
#ifndef KR_TEST_CLUSTER_UTIL_H
#define KR_TEST_CLUSTER_UTIL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "harness.h"
#include "tcp_proxy.h"

#define KC_MAX_NODES 5

struct kc_node {
    struct kr_node n;     /* dir, ports, pid; client_conf is node 1's admin config,
                           * and n.ccfg talks to this node only */
    uint64_t id;
    char endpoint[32];    /* client endpoint, "127.0.0.1:PORT" */
    int raft_listen_port; /* where keyraftd binds raft behind its proxy; 0: no proxy */
    struct tcp_proxy *proxy;
    int cut;              /* its proxy is cut */
    int removed;          /* left the membership for good: not restarted or asked who leads */
};

struct kc_cluster {
    size_t n;
    struct kc_node nodes[KC_MAX_NODES];
    char endpoints[KC_MAX_NODES * 24]; /* every node's client endpoint, comma separated */
};

/* Makes and starts |n| nodes; the last |n_standby| join with --standby, the
 * others as voters. With |proxied|, raft traffic to each node goes through a
 * tcp_proxy. Returns once every node serves key operations and the leader's
 * cluster list shows each with its wanted raft role. 0, or -1 with the
 * reason printed (and what was made destroyed). */
int kc_cluster_create(struct kc_cluster *c, size_t n, size_t n_standby, int proxied);

/* Stops every node (SIGTERM, SIGKILL after 10 s), the proxies, and removes
 * the directories (unless $KR_KEEP_TEST_DIRS). Returns the number of nodes
 * that did not exit 0 on SIGTERM. */
int kc_cluster_destroy(struct kc_cluster *c);

/* Prints the tail of every node's log to stderr. */
void kc_dump_logs(const struct kc_cluster *c, size_t max_per_node);

/* Starts a stopped member and waits up to |timeout_ms| until it serves key
 * operations. 0 or -1. */
int kc_node_start(struct kc_node *node, unsigned timeout_ms);

/* Waits up to |timeout_ms| until |node| answers a key read (it is ready and
 * within reach of a leader). 0 or -1. */
int kc_wait_serving(struct kc_node *node, unsigned timeout_ms);

struct kc_status {
    char role[16];
    uint64_t leader_id, term, commit_index, applied_index, key_count;
};

/* One status request to |node| (1 s timeout). 0 or a KR_E* code. */
int kc_status(const struct kc_node *node, struct kc_status *out);

/* Index of the leader that every running, uncut member in |mask| (bit i:
 * nodes[i]; 0: all) agrees on, waiting up to |timeout_ms|; -1 when none. */
int kc_leader(const struct kc_cluster *c, unsigned mask, unsigned timeout_ms);

/* A client over every node's endpoint. */
int kc_client(const struct kc_cluster *c, int timeout_ms, kr_client **out);
/* The same as another principal node 1's init made (admin, app, auditor). */
int kc_client_as(const struct kc_cluster *c, const char *principal, int timeout_ms,
                 kr_client **out);

/* The cluster list through the leader (library call): 0 and *out (free with
 * kr_response_free; (*out)->cluster set), or a KR_E* code. */
int kc_cluster_list(const struct kc_cluster *c, Keyraft__Response **out);

/* Waits until the leader's cluster list shows node id i+1 with raft role
 * |want|[i]: 'v' voter, 's' standby, '-' not listed; each listed member
 * reachable. 0, or -1 after |timeout_ms| (the last list printed). */
int kc_wait_roles(const struct kc_cluster *c, const char *want, unsigned timeout_ms);

/* Waits until |node| has applied what the leader had committed when the
 * call began. 0 or -1. */
int kc_wait_caught_up(struct kc_cluster *c, struct kc_node *node, unsigned timeout_ms);

/* Cuts (1) or heals (0) all raft traffic into |node| (proxied clusters). */
void kc_cut(struct kc_node *node, int cut);

/* Runs `keyraft --config <node 1's client.conf> --endpoint <every node>`
 * with |argv| (NULL-terminated). Returns out->status. */
int kc_cli(const struct kc_cluster *c, struct kr_out *out, const char *const *argv);

/* ---- history: a writer thread creating keys, and its check ----------------- */

enum kc_outcome { KC_PENDING, KC_OK, KC_FAIL, KC_UNKNOWN };

struct kc_op {
    char name[48];
    char request_id[64]; /* the idempotency id, the same on every retry */
    uint64_t t_start, t_end; /* monotonic ms */
    enum kc_outcome outcome;
    int status;          /* 0, the node's KR_E* status, or a transport code */
    char id[80];         /* the key id, once acknowledged */
    uint64_t commit_index;
    int resolved;        /* the outcome came from re-sending after the run */
    int was_applied;     /* resolved: the first run had applied it already */
};

struct kc_writer {
    kr_client *client;
    struct kc_op *ops;
    size_t max_ops;
    uint64_t deadline;   /* monotonic ms */
    unsigned pause_ms;
    char prefix[24];
    pthread_t thread;
    int started;
    atomic_int stop;
    atomic_size_t done;  /* ops[0..done) are final */
};

/* Starts a thread creating AES-256 keys named PREFIX-NNNNN through a client
 * over every endpoint (|timeout_ms| a call), at most |max_ops| of them and
 * for at most |max_ms|, |pause_ms| between calls. 0 or -1. */
int kc_writer_start(struct kc_writer *w, const struct kc_cluster *c, const char *prefix,
                    size_t max_ops, unsigned max_ms, unsigned pause_ms, int timeout_ms);

/* Asks the thread to stop and joins it. Returns the number of ops made. */
size_t kc_writer_stop(struct kc_writer *w);

/* Frees what the writer holds (after kc_writer_stop). */
void kc_writer_free(struct kc_writer *w);

/* The longest time without an acknowledged create from the last ack before
 * |from_ms| until the last ack so far: the write pause a user saw. */
uint64_t kc_writer_max_gap(struct kc_writer *w, uint64_t from_ms);

/* Creates acknowledged so far. */
size_t kc_writer_acked(struct kc_writer *w);

/* Waits up to |timeout_ms| for an op started at or after |since_ms| to be
 * acknowledged; its ack time in *ack_ms. 0 or -1. */
int kc_writer_wait_ack(struct kc_writer *w, uint64_t since_ms, unsigned timeout_ms,
                       uint64_t *ack_ms);

/* Counts of the ops' outcomes. */
struct kc_history_stats {
    size_t ops, ok, fail, unknown, unknown_applied;
    size_t replayed;        /* acknowledged creates sent again, deduplicated */
    uint64_t slowest_ms;    /* the longest call of the run */
    char slowest_name[48];  /* its key name */
};

/* The check of a finished history, against every node in |mask| (0: all):
 * each op whose outcome was not acknowledged is sent again with the same
 * request id, so that it gets the first attempt's outcome if that applied,
 * and applies now if not; none may answer "name taken" (that would be a lost
 * deduplication). Acknowledged creates (the slow ones, which likely crossed
 * the fault, and a spread of the rest) are sent again too: each must come
 * back as the same key. Then, on each node (read with min_index at the highest
 * commit index seen): the keys named PREFIX-* are exactly one per op, each
 * with the id its op was acknowledged with, and every node holds identical
 * attributes (id, name, algorithm, state, created_at, current version, each
 * version's number and kcv). 0, or -1 with the first difference in |err|. */
int kc_check_history(const struct kc_cluster *c, unsigned mask, struct kc_op *ops, size_t n_ops,
                     const char *prefix, struct kc_history_stats *stats, char *err,
                     size_t err_len);

/* Monotonic milliseconds and a sleep, for tests. */
uint64_t kc_now_ms(void);
void kc_sleep_ms(unsigned ms);

#endif
