/* service_internal.h: what the service's files share (service.c: keys and
 * crypto, cluster membership; service_gov.c: principals, domains, policy,
 * approvals, audit). Runs on the node's loop thread only. */
#ifndef KR_SERVICE_INTERNAL_H
#define KR_SERVICE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <uv.h>

#include "crypto.h"
#include "fsm.h"
#include "record.pb-c.h"
#include "command.h"
#include "policy.h"
#include "secmem.h"
#include "service.h"

#define PRINCIPAL_CACHE_SLOTS 256

/* A registry entry as the service caches it. Calls hold a reference, so an
 * entry dropped from the cache lives until its last call ends. */
struct principal_ref {
    unsigned refs;
    unsigned roles; /* policy_role bits */
    Keyraft__PrincipalInfo *info;
};

/* A key record as the service caches it: parsed once, shared, never changed.
 * A call holds a reference, so a record dropped from the cache lives until
 * its last call ends. */
struct key_ref {
    unsigned refs;
    Keyraft__KeyRecord *rec;
};

#define KEY_CACHE_SLOTS 4096
#define SIGNER_CACHE_SLOTS 256

struct service {
    struct service_deps deps;
    struct call *waiting;      /* reads parked until applied >= their min_index */
    uv_timer_t wake;           /* runs the waiting list outside raft's apply */
    int wake_open;
    unsigned pending;
    int domain_in_progress;
    int registry_in_progress;
    int bootstrap_in_progress;
    int bootstrap_done;        /* no bootstrap principals file left to register */
    int ready;
    uint64_t started_ms;
    uint64_t last_checkpoint_ms;
    uint64_t last_checkpoint_seq;
    uint64_t last_key_expiry_ms; /* keyring_cache_expire, once a second */
    uint64_t swept_generation;   /* keys family generation at the last cache sweep */
    struct read_coalescer *coalescer; /* audit records of reads sent alone, open */
    uv_timer_t audit_flush;           /* writes them AUDIT_COALESCE_MS after the first */
    unsigned long principals_epoch; /* fsm_governance_epoch() the cache matches */
    unsigned long domains_epoch;    /* the same, for unloading destroyed domains */
    struct principal_ref *principals[PRINCIPAL_CACHE_SLOTS];
    /* Parsed key records last read, two-way by id, valid while the
     * keys family's generation is unchanged: a store read, a parse and a
     * free less per crypto request. They hold only sealed material, as the
     * store does. */
    struct key_cache_slot {
        char id[FSM_KEY_ID_LEN + 1];
        uint64_t generation;
        uint64_t used;       /* key_cache_clock at the last hit */
        struct key_ref *ref; /* the cache's own reference */
    } key_cache[KEY_CACHE_SLOTS]; /* two-way: a record sits in either of a pair */
    uint64_t key_cache_clock;
    /* Parsed signing keys by (id, version), valid while the keys family's
     * generation is unchanged; a hit still passes every state, grant and
     * domain check. At most SIGNER_CACHE_SLOTS keys are held. */
    struct signer_slot {
        char id[FSM_KEY_ID_LEN + 1];
        uint32_t version;
        uint64_t generation;
        crypto_signer *signer;
    } signers[SIGNER_CACHE_SLOTS];
};

/* --- per-call arena: every byte of a response; wiped when the call ends ---- */

/* Small allocations are carved from the newest block (ARENA_CHUNK bytes,
 * zeroed); one past half a chunk gets a block of its own. */
struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    max_align_t data[];
};

struct call {
    struct service *svc;
    struct call *wait_next;
    uint64_t wait_deadline_ms;
    Keyraft__Request *req;
    /* Where |req| lives: freed with the call when this owns it (see
     * service_handle); a batch's inner requests live in the batch's. */
    struct pb_arena *req_arena;
    int req_borrowed;
    service_reply_cb cb;
    void *ctx;
    char principal[256];
    char roles[256];
    char address[64];
    char serial[80];
    Keyraft__JoinBundle *bundle; /* cluster add: the reply, once the registry has the node */
    int is_node;
    int internal;               /* run by the node for an approval: no certificate */
    unsigned role_bits;         /* policy_role bits of the caller */
    struct principal_ref *who;  /* the caller's registry entry; NULL for nodes */
    struct arena_block *arena;
    Keyraft__Response resp;
    /* work in progress for writes */
    uv_work_t work;
    Keyraft__Algorithm alg;
    secbuf material;
    int work_status;
    int retry_on_refusal;       /* a refusal before proposing first looks for a retry's outcome */
    char key_id[FSM_KEY_ID_LEN + 1];
    struct key_ref *key;        /* the record load_key lent this call, to its end */
    Keyraft__KeyAttributes *created; /* create/import: the answer, in the arena */
    char domain[72];            /* the domain a new key goes to */
    char approval_id[40];       /* a validated approval this call consumes */
    /* what the audit record names */
    char audit_key[FSM_KEY_ID_LEN + 1];
    uint32_t audit_version;
    char audit_domain[72];
    struct batch *batch;        /* OP_BATCH: its inner calls and their answers */
    struct audit_tally *tally;  /* see service_caller.tally */
};

/* snprintf(dst, cap, "%s", src) without the format machinery (several per
 * request on the hot path); NULL copies as "". |cap| >= 1. */
static inline void copy_cut(char *dst, size_t cap, const char *src)
{
    size_t n = src != NULL ? strnlen(src, cap - 1) : 0;
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

void *arena_alloc(struct call *call, size_t len);
char *arena_strdup(struct call *call, const char *s);
/* A copy of |m| whose memory lives in the call's arena. */
void *arena_copy_message(struct call *call, const ProtobufCMessage *m);
uint64_t now_ms(void);
void call_finish(struct call *call);
void reply_error(struct call *call, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int require_leader(struct call *call);
/* Proposes |cmd| under the call's scoped request id (and its approval id);
 * |done| answers. */
void propose_then(struct call *call, Keyraft__Command *cmd, cluster_done_cb done);
/* Loads the key a KeyRef names, in a domain the caller may see, and checks
 * the caller may run the call's operation on it. NULL: answered. The record
 * is shared and lent to the call until it ends (call_finish): read it, never
 * change or free it. A second load by the same call ends the first loan. */
const Keyraft__KeyRecord *load_key(struct call *call, const Keyraft__KeyRef *ref);
int ensure_domain(struct service *svc, const char *domain);
/* 1 when the caller's registry entry lists |domain|. */
int caller_in_domain(const struct call *call, const char *domain);
/* The domain a request names, or the caller's first; "" if it has none. */
const char *caller_domain_or(const struct call *call, const char *requested);

/* A new domain's key (made by the keyring, wrapped under the MWK in the
 * HSM) and the command that records it; free with domain_command_free. */
struct domain_command {
    uint8_t *wrapped;
    size_t wrapped_len;
    Keyraft__DomainRecord rec;
    Keyraft__PutDomainCommand put;
    Keyraft__Command cmd;
};
int domain_command_new(struct service *svc, const char *id, struct domain_command *dc);
void domain_command_free(struct domain_command *dc);

/* A key policy rebuilt from its fields, so a client's unknown fields never
 * ride into a raft entry. |out| points into itself: do not copy it. */
struct key_policy_copy {
    Keyraft__KeyPolicy policy;
    Keyraft__GroupGrant grants[POLICY_MAX_GRANTS];
    Keyraft__GroupGrant *grant_ptrs[POLICY_MAX_GRANTS];
};
void key_policy_rebuild(const Keyraft__KeyPolicy *in, struct key_policy_copy *out);

/* Replies with the written key once |res| applied (cluster_done_cb). */
void write_done(void *arg, const struct fsm_op_result *res);
/* A retried write whose first attempt applied gets that outcome through
 * |done| (write_done for key writes): 1 when it answered. */
int reply_if_retry_then(struct call *call, cluster_done_cb done);
int reply_if_retry(struct call *call);
/* Runs the call's operation (authorization done). */
void dispatch_op(struct call *call);

/* service_gov.c */
/* Unloads the keys of domains destroyed since the last look (cheap unless
 * governance changed). */
void gov_forget_destroyed_domains(struct service *svc);
/* Identifies the caller from the registry and checks its roles for the
 * request's operation. 0 to go on; -1 when it answered. */
int gov_authorize(struct call *call);
/* Quorum: 0 to run the operation now (no rule, or call->approval_id holds a
 * validated approval); 1 when it answered (held for approval, or refused). */
int gov_quorum_gate(struct call *call, const char *key_id);
/* Records the finished call in the audit trail. */
void gov_audit_call(struct call *call);
/* A batch's reads make one audit record per (operation, key, version,
 * status) with a count, written when the batch ends: at 100 encrypts per
 * frame one record each outran the audit log. Writes, and reads under an
 * approval, keep a record each. */
struct audit_tally *gov_audit_tally_new(void);
/* Writes the tallied records under |batch|'s principal and request id. */
void gov_audit_tally_flush(struct call *batch, struct audit_tally *tally);
void gov_audit_tally_free(struct audit_tally *tally);
/* Open records of reads sent alone (see coalesce_add): written by
 * gov_audit_coalesced_flush, which service.c runs AUDIT_COALESCE_MS after
 * service_audit_flush_later and when the service stops. */
#define AUDIT_COALESCE_MS 10
void gov_audit_coalesced_flush(struct service *svc);
void gov_audit_coalescer_free(struct service *svc);
void service_audit_flush_later(struct service *svc);
/* Usage limit check before an encryption under |rec|'s version |version|:
 * 0 to go on, -1 when it answered. */
int gov_usage_check(struct call *call, const Keyraft__KeyRecord *rec, uint32_t version);
void gov_usage_count(struct call *call, const char *key_id, uint32_t version);
void gov_release(struct call *call);
void gov_tick(struct service *svc);     /* leader duties */
void gov_tick_any(struct service *svc); /* every node */
int gov_bootstrap_pending(struct service *svc);
void gov_free(struct service *svc);
void op_principal_create(struct call *call);
void op_principal_revoke(struct call *call);
void op_principal_list(struct call *call);
void op_domain_create(struct call *call);
void op_domain_destroy(struct call *call);
void op_domain_list(struct call *call);
void op_set_policy(struct call *call);
void op_quorum_set(struct call *call);
void op_quorum_list(struct call *call);
void op_approval_list(struct call *call);
void op_approval_show(struct call *call);
void op_approval_vote(struct call *call, int approve);
void op_audit_read(struct call *call);
void op_audit_verify(struct call *call);
void op_audit_submit(struct call *call);

#endif
