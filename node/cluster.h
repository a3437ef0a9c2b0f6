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
    unsigned snapshot_threshold; /* entries between snapshots (0: 8192) */
    uint64_t snapshot_log_bytes; /* raft log bytes between snapshots (0: 64 MiB): large
                                  * entries (bulk creates) snapshot sooner, so the log
                                  * and a restart's replay stay bounded */
    /* Peer TLS (both borrowed; NULL only for cluster_bootstrap, which never
     * talks to peers). */
    struct tls_ctx *peer_server_tls;
    struct tls_ctx *peer_client_tls;
    const char *raft_listen;  /* bind address when not raft_address (may be NULL) */
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
/* fsm_find_dedup on this node's state machine. */
int cluster_find_dedup(struct cluster *cluster, const char *request_id,
                       struct fsm_op_result *result);
int cluster_is_leader(struct cluster *cluster);
/* The index of the last entry applied to the store (cheap: per request). */
uint64_t cluster_applied_index(struct cluster *cluster);

/* --- membership ------------------------------------------------------------------ */

enum cluster_role {
    CLUSTER_ABSENT = -1,
    CLUSTER_STANDBY = 0, /* RAFT_STANDBY: replicates, no vote */
    CLUSTER_VOTER = 1,   /* RAFT_VOTER */
    CLUSTER_SPARE = 2    /* RAFT_SPARE: in the configuration, not replicated yet */
};
const char *cluster_role_name(int role);

struct cluster_member {
    uint64_t id;
    char address[64];
    int role;             /* enum cluster_role */
    uint64_t match_index; /* the leader's view; 0 on a follower */
    int reachable;        /* the leader heard from it within an election timeout */
};
/* The raft configuration as this node knows it; returns the count (<= cap). */
size_t cluster_members(struct cluster *cluster, struct cluster_member *out, size_t cap);

/* What the registry wants: the leader moves the raft configuration toward it
 * one change at a time (raft allows no more), called from a periodic tick:
 * add as spare, spare to standby (replication starts), standby to voter
 * once caught up, voter to standby, remove. The leader hands leadership
 * over before changing its own role. Returns 1 when it started a change. */
struct cluster_wanted {
    uint64_t id;
    const char *address;
    int role; /* CLUSTER_VOTER or CLUSTER_STANDBY */
};
int cluster_reconcile(struct cluster *cluster, const struct cluster_wanted *wanted, size_t n);

/* Asks raft to hand leadership to |id| (0: the most up-to-date voter). */
int cluster_transfer(struct cluster *cluster, uint64_t id);

/* 1 when this node may serve key operations: it leads (raft steps a leader
 * down after an election timeout without a majority), or it follows a leader
 * it heard from within the election timeout. Otherwise 0 and |why| says so:
 * a node cut off stops serving revoked or destroyed keys as usable. */
int cluster_serving(struct cluster *cluster, char *why, size_t cap);
unsigned cluster_election_timeout_ms(const struct cluster *cluster);
uint64_t cluster_leader_id(struct cluster *cluster);
uint64_t cluster_node_id(const struct cluster *cluster);

/* Linearizable reads: |cb| runs once a raft barrier issued after this call
 * committed on this leader (status 0), or with KR_ENOTLEADER / KR_EUNAVAIL.
 * Reads waiting at the same time share one barrier. */
typedef void (*cluster_barrier_cb)(void *arg, int status);
int cluster_barrier(struct cluster *cluster, cluster_barrier_cb cb, void *arg);

#endif
