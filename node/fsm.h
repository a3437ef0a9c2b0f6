/* fsm.h: the raft state machine and the store schema. Deterministic: no
 * clock of its own (an entry carries its leader's), no RNG, no HSM; only the
 * store. Every node applying the same entries reaches the same state. */
#ifndef KR_FSM_H
#define KR_FSM_H

#include <stddef.h>
#include <stdint.h>

#include "command.h"
#include "record.pb-c.h"
#include "store.h"

#define FSM_KEY_ID_LEN 32 /* 4 hex shard + 12 hex creation ms + 16 hex random */
#define FSM_DEFAULT_DOMAIN "default"

/* Outcome of one command of an applied entry. */
struct fsm_op_result {
    int status;                       /* 0 or KR_E* */
    char key_id[FSM_KEY_ID_LEN + 1];  /* the key concerned, if any */
    uint64_t index;                   /* raft index that applied it (or the
                                         original one for a deduplicated retry) */
};

struct fsm_result {
    uint64_t index;
    size_t n;
    struct fsm_op_result ops[];
};

struct fsm;

/* |next_index| returns the index of the entry about to be applied
 * (raft_last_applied + 1); canonical/raft does not pass it to apply(). */
int fsm_new(struct store *store, uint64_t (*next_index)(void *arg), void *arg,
            struct fsm **out);
void fsm_free(struct fsm *fsm);

/* Applies one raft entry. Returns 0 unless the store failed (then raft
 * retries the entry). Business errors are per-op results. *out_result (may
 * be NULL: a replayed entry) is owned by the fsm until the next apply; take
 * it with fsm_take_result to keep it. */
int fsm_apply(struct fsm *fsm, const uint8_t *buf, size_t len, struct fsm_result **out_result);
/* Hands |result| over to the caller (free()) if it is the fsm's current one. */
struct fsm_result *fsm_take_result(struct fsm *fsm, void *result);

/* --- schema, shared with the readers in service.c --------------------------- */

/* Loads a key record. KR_ENOTFOUND if absent. Free with
 * keyraft__key_record__free_unpacked. */
int fsm_get_key(struct store *store, const char *key_id, Keyraft__KeyRecord **out);
/* Resolves a live (non-destroyed) key name in a domain to its id. */
int fsm_find_name(struct store *store, const char *domain, const char *name,
                  char out_id[FSM_KEY_ID_LEN + 1]);
/* The recorded outcome of a request id already applied; KR_ENOTFOUND if none
 * (or dropped: records are kept one to two days, fsm.c). The fsm's thread. */
int fsm_find_dedup(struct fsm *fsm, const char *request_id, struct fsm_op_result *res);
int fsm_get_domain(struct store *store, const char *domain_id, Keyraft__DomainRecord **out);

/* The node registry: raft id -> addresses and wanted role, replicated. */
#define FSM_MAX_NODES 64
struct fsm_nodes {
    Keyraft__NodeRecord *nodes[FSM_MAX_NODES]; /* by id, ascending */
    size_t n;
};
int fsm_get_node(struct store *store, uint64_t id, Keyraft__NodeRecord **out);
int fsm_list_nodes(struct store *store, struct fsm_nodes *out);
/* The last records of removed nodes that had audit keys (for audit verify). */
int fsm_list_retired_nodes(struct store *store, struct fsm_nodes *out);
void fsm_nodes_free(struct fsm_nodes *nodes);

/* Builds index keys (returns length; |buf| holds at least 4 + the parts). */
size_t fsm_name_key(uint8_t *buf, size_t cap, const char *domain, const char *name);
enum fsm_index_kind { FSM_INDEX_ALG = 'a', FSM_INDEX_STATE = 's', FSM_INDEX_TAG = 't' };
/* attrs index key prefix: kind \0 domain \0 value... \0 (then the key id). */
size_t fsm_attr_prefix(uint8_t *buf, size_t cap, enum fsm_index_kind kind, const char *domain,
                       const char *v1, const char *v2);

/* A key id for shard |shard| from 14 bytes, written as hex. */
void fsm_format_key_id(uint16_t shard, const uint8_t bytes14[14], char out[FSM_KEY_ID_LEN + 1]);
/* A new key's id: shard, the serving leader's wall-clock milliseconds (48
 * bits), then 8 random bytes. Ids made later sort later, so a key's rows land
 * next to the last key's in every ordered index (the store's inserts stay in
 * cache, and its compactions rewrite less); 64 random bits keep ids made in
 * the same millisecond apart (the fsm refuses a repeat). The price: the id is
 * in every ciphertext, signature and wrapped blob the key makes, so whoever
 * holds one learns when the key was made and can tell keys made together.
 * Ids are names, never secrets: authorization does not rest on them. */
void fsm_make_key_id(uint16_t shard, uint64_t time_ms, const uint8_t random8[8],
                     char out[FSM_KEY_ID_LEN + 1]);
int fsm_key_id_valid(const char *id);

/* Lifecycle: whether |from| may move to |to| (KMIP / SP 800-57). */
int fsm_transition_allowed(Keyraft__KeyState from, Keyraft__KeyState to);

/* --- governance (fsm_gov.c) ------------------------------------------------------ */

/* Grows whenever principals, domains or quorum rules change on any FSM of
 * this process, or a snapshot replaced the store: caches of them compare it. */
unsigned long fsm_governance_epoch(void);
void fsm_governance_bump(void);

/* Messages read by a prefix scan; free with fsm_list_free. |more| is set
 * when |max| cut the list short. */
struct fsm_list {
    void **items;
    size_t n;
    int more;
};
void fsm_list_free(struct fsm_list *list);

/* Free with keyraft__principal_info__free_unpacked. */
int fsm_get_principal(struct store *store, const char *name, Keyraft__PrincipalInfo **out);
int fsm_list_principals(struct store *store, size_t max, struct fsm_list *out);
/* DomainRecords, destroyed ones included. */
int fsm_list_domains(struct store *store, size_t max, struct fsm_list *out);
/* The quorum rules (an empty record when none were set). */
int fsm_get_governance(struct store *store, Keyraft__GovernanceRecord **out);
int fsm_get_approval(struct store *store, const char *id, Keyraft__ApprovalRecord **out);
int fsm_list_approvals(struct store *store, size_t max, struct fsm_list *out);

#endif
