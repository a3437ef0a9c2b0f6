/* cluster.h: canonical/raft on libuv: the log, proposals batched into
 * entries, status, bootstrap. Every mutation goes through cluster_propose. */
#ifndef KR_CLUSTER_H
#define KR_CLUSTER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "command.h"
#include "fsm.h"
#include "store.h"
#include "tls.h"

struct cluster_config {
    uint64_t node_id;
    const char *raft_address; /* IPv4:PORT */
    const char *raft_dir;     /* raft log and snapshots */
    unsigned snapshot_threshold; /* entries between snapshots */
    /* Peer TLS (both borrowed; NULL only for cluster_bootstrap, which never
     * talks to peers). */
    struct tls_ctx *peer_server_tls;
    struct tls_ctx *peer_client_tls;
    /* Brings the store to at least |min_index| out of band (a peer's
     * checkpoint swapped in) when a raft snapshot is past it: raft no longer
     * has the entries. Called on the loop, from cluster_start or later; 0
     * once the store is there. NULL: such a snapshot fails the restore. */
    int (*fetch_snapshot)(void *arg, uint64_t min_index);
    void *fetch_arg;
};

struct cluster;

/* Writes the first configuration (this node, sole voter) into a pristine
 * |raft_dir|. KR_EEXIST if it already holds a log. */
int cluster_bootstrap(const struct cluster_config *config);

/* Starts raft on |loop|; |store| is borrowed. */
int cluster_start(uv_loop_t *loop, const struct cluster_config *config, struct store *store,
                  struct cluster **out);
/* Stops raft; |cb| runs once everything is closed (then free with
 * cluster_free). Pending proposals complete with KR_EUNAVAIL. */
void cluster_stop(struct cluster *cluster, void (*cb)(void *arg), void *arg);
void cluster_free(struct cluster *cluster);

/* Called once per command with its outcome. |result->status| is the FSM's
 * verdict, or KR_ENOTLEADER / KR_EUNAVAIL when the outcome is unknown
 * (leadership lost: a retry with the same request id is safe). */
typedef void (*cluster_done_cb)(void *arg, const struct fsm_op_result *result);

/* Queues |command| (packed now; the caller keeps it) for the next entry.
 * Commands queued in one loop iteration ride one entry. Returns KR_ENOTLEADER
 * at once on a follower, KR_EBUSY when the queue is full. */
int cluster_propose(struct cluster *cluster, const Keyraft__Command *command,
                    cluster_done_cb cb, void *arg);

/* |hook| runs on the loop after every applied entry (the store is at
 * |applied_index|); it must not call back into raft. */
void cluster_set_apply_hook(struct cluster *cluster, void (*hook)(void *arg, uint64_t applied_index),
                            void *arg);

struct cluster_status {
    int is_leader;
    const char *role;           /* "leader", "follower", ... */
    uint64_t leader_id;
    char leader_address[64];
    uint64_t term;
    uint64_t commit_index;
    uint64_t applied_index;
};
void cluster_get_status(struct cluster *cluster, struct cluster_status *out);
int cluster_is_leader(struct cluster *cluster);
/* The index of the last entry applied to the store (cheap: per request). */
uint64_t cluster_applied_index(struct cluster *cluster);

#endif
