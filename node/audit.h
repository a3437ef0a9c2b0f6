/* audit.h: the audit trail. Every request a node serves, allowed or denied,
 * becomes an AuditRecord buffered on that node (the recorder), shipped in
 * batches to the leader (audit_submit, node certificates only), committed
 * through raft and appended by the FSM to a SHA-256 hash chain in the audit
 * column family. The leader signs the chain head with its HSM audit key from
 * time to time (a checkpoint record, chained like any other). The same batches
 * carry per-key-version usage counts (encryptions), so the counters are
 * cluster-wide and survive restarts and leader changes.
 *
 * Store layout (the FSM writes it; the readers here and in service.c read it):
 *   audit CF:  seq (u64 BE) -> AuditEntry {seq, prev_hash, hash, record}
 *   meta CF:   "audit_head"                     -> AuditHeadRecord
 *              "audit_src\0" node_id (u64 BE)   -> AuditSourceRecord
 *              "usage\0" key_id "\0" version (u32 BE) -> count (u64 BE)
 * hash(seq) = SHA-256("KRA1" | seq as u64 BE | hash(seq-1) | record bytes),
 * hash(0) = 32 zero bytes. */
#ifndef KR_AUDIT_H
#define KR_AUDIT_H

#include <stddef.h>
#include <stdint.h>

#include "keyraft.pb-c.h"
#include "store.h"

#define AUDIT_HASH_LEN 32
#define AUDIT_MAX_BATCH_RECORDS 4096  /* one audit_submit; the node refuses more */
#define AUDIT_MAX_RECORD_BYTES 8192   /* one packed record */
#define AUDIT_MAX_USAGE_DELTAS 65536  /* one audit_submit */

struct hsm;

/* --- FSM side: deterministic (no clock, RNG or HSM) ------------------------------- */

/* Applies one batch into |b|: skipped (returns 0, writes nothing) when
 * (boot_id, batch_seq) is not past the last batch applied from that node;
 * otherwise each record is appended at head+1 with its chain hash, usage
 * deltas are added to the counters, and the source's position and the head
 * move. Records over AUDIT_MAX_RECORD_BYTES are appended as a short record
 * saying so (never dropped). Returns 0, KR_ESTATE for a boot_id older than
 * the node's last (its clock went back: refused, not skipped unseen), or
 * KR_EIO / KR_ENOMEM (raft retries). */
int audit_fsm_apply(struct store *store, struct store_batch *b,
                    const Keyraft__AuditSubmitRequest *batch);

/* The last batch applied from |node_id|: (0, 0) when none. */
int audit_source_position(struct store *store, uint64_t node_id, uint64_t *boot_id,
                          uint64_t *batch_seq);

/* The committed usage count of a key version (0 when none). */
int audit_usage_get(struct store *store, const char *key_id, uint32_t version, uint64_t *out);

/* The chain head: seq 0 and a zero hash for an empty log. */
int audit_head(struct store *store, uint64_t *seq, uint8_t hash[AUDIT_HASH_LEN]);

/* --- readers --------------------------------------------------------------------- */

/* Entries matching |req| in seq order (or the last |limit| with req->tail),
 * at most |cap| (the node's page cap). *out is malloc'd; free with
 * audit_read_free. */
int audit_read(struct store *store, const Keyraft__AuditReadRequest *req, uint32_t cap,
               Keyraft__AuditReadResponse **out);
void audit_read_free(Keyraft__AuditReadResponse *resp);

/* Walks the whole chain: contiguous seqs from 1, each entry at its own seq,
 * prev_hash linking, each hash recomputed, the head record matching the last
 * entry, and every checkpoint's signature (by a trusted key) and the hash it
 * covers. Trusted keys: |own_spki| (this node's HSM audit key) and every
 * node's audit_public_key in the node registry. Fills |out| (strings
 * malloc'd: free with audit_verify_clear); on the first problem, ok = 0,
 * first_bad_seq names the record and |problem| says what is wrong there in
 * words an operator can act on. Returns 0 when the walk ran (whatever it
 * found), or KR_EIO. */
int audit_verify(struct store *store, const uint8_t *own_spki, size_t own_spki_len,
                 Keyraft__AuditVerifyResponse *out);
void audit_verify_clear(Keyraft__AuditVerifyResponse *out);

/* A checkpoint record over the current head, signed by |hsm|'s audit key:
 * packed AuditRecord (operation "audit_checkpoint") in *out (malloc'd).
 * KR_ENOTFOUND when the log is empty. */
int audit_make_checkpoint(struct store *store, struct hsm *hsm, uint64_t node_id,
                          uint64_t now_ms, uint8_t **out, size_t *out_len);

/* --- node side: the recorder and its shipper thread ----------------------------------- */

struct audit_config {
    uint64_t node_id;
    int enabled;             /* 0: records are not kept (usage still ships) */
    unsigned flush_ms;       /* ship at least this often */
    unsigned max_pending;    /* records held unshipped before failing closed */
    unsigned max_lag_ms;     /* oldest unacknowledged record age before failing closed */
    int fail_open_reads;     /* reads go on while audit cannot be written */
    const char *endpoint;    /* this node's own client endpoint: a follower answers
                              * with the leader's address, which the client follows */
    const char *ca_file;     /* the cluster CA and this node's certificate */
    const char *cert_file;
    const char *key_file;
};

struct audit_log;

/* Starts the shipper thread. */
int audit_log_start(const struct audit_config *config, struct audit_log **out);

/* Stops: ships what it can within |timeout_ms|, then joins the thread and
 * frees. Logs how many records were not acknowledged. Accepts NULL. */
void audit_log_stop(struct audit_log *log, unsigned timeout_ms);

/* Queues a packed AuditRecord (copied). Thread-safe; never blocks on I/O.
 * When the queue is full the record is counted, and the count is itself
 * recorded once space returns: nothing is lost silently. */
void audit_log_append(struct audit_log *log, const uint8_t *record, size_t len);

/* Adds |n| encryptions of a key version to the next batch. Thread-safe. */
void audit_log_usage(struct audit_log *log, const char *key_id, uint32_t version, uint64_t n);

/* Encryptions counted here and not in this node's store yet: not yet
 * shipped, in flight, or committed by the leader but not yet applied here.
 * |applied_boot| and |applied_seq| are this node's batch position in its
 * store (audit_source_position), read on the loop thread that applies. */
uint64_t audit_log_unacked_usage(struct audit_log *log, const char *key_id, uint32_t version,
                                 uint64_t applied_boot, uint64_t applied_seq);

/* This node's batch position in its store (audit_source_position): counts
 * the store now holds are forgotten here. Call it from time to time (the
 * node's tick) so that keys no longer used leave the recorder's memory. */
void audit_log_applied(struct audit_log *log, uint64_t applied_boot, uint64_t applied_seq);

/* 1 when records are being shipped: the queue is under max_pending and its
 * oldest record is younger than max_lag_ms. 0 with the reason in |why|. */
int audit_log_healthy(struct audit_log *log, char *why, size_t why_len);

/* Whether reads may run while unhealthy (config fail_open_reads). */
int audit_log_fail_open_reads(const struct audit_log *log);

/* Figures for status and tests. */
struct audit_log_stats {
    uint64_t appended;       /* records queued since start */
    uint64_t acked;          /* records the leader committed */
    uint64_t pending;        /* queued, not yet acknowledged */
    uint64_t batches;        /* batches acknowledged */
    uint64_t overflowed;     /* records refused because the queue was full */
    uint64_t oldest_ms;      /* age of the oldest unacknowledged record */
    uint64_t boot_id;        /* this run's boot id */
    uint64_t batch_seq;      /* the last batch built (the one in flight when inflight) */
    int inflight;            /* a batch is being shipped */
};
void audit_log_get_stats(struct audit_log *log, struct audit_log_stats *out);

#endif
