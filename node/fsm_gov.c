/* fsm_gov.c: the governance part of the state machine: principals, domain
 * destruction, key policies, quorum rules and approvals, and the audit
 * chain's entry point. Deterministic like the rest of the FSM: times come in
 * the commands, stamped by the leader. */
#include "fsm_internal.h"

#define KR_LOG_MODULE "fsm"
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit.h"
#include "keyraft.h"
#include "log.h"
#include "policy.h"

#define PRINCIPAL_PREFIX "principal\0"
#define APPROVAL_PREFIX "approval\0"
static const char GOVERNANCE_KEY[] = "governance";
#define MAX_CERTS_PER_PRINCIPAL 64
#define MAX_RULES 32

static atomic_ulong governance_epoch = 1;

unsigned long fsm_governance_epoch(void) { return atomic_load(&governance_epoch); }
void fsm_governance_bump(void) { atomic_fetch_add(&governance_epoch, 1); }

static size_t prefixed_key(uint8_t *buf, size_t cap, const char *prefix, size_t plen,
                           const char *name)
{
    size_t l = strlen(name);
    if (plen + l > cap || l == 0)
        return 0;
    memcpy(buf, prefix, plen);
    memcpy(buf + plen, name, l);
    return plen + l;
}

int fsm__meta_put(struct store_batch *b, const void *key, size_t klen, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return KR_ENOMEM;
    protobuf_c_message_pack(m, buf);
    store_batch_put(b, STORE_CF_META, key, klen, buf, len);
    free(buf);
    return 0;
}

static int meta_get(struct store *store, const void *key, size_t klen,
                    const ProtobufCMessageDescriptor *d, ProtobufCMessage **out)
{
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, key, klen, &val, &len);
    if (rv != 0)
        return rv;
    *out = protobuf_c_message_unpack(d, NULL, len, val);
    free(val);
    return *out != NULL ? 0 : KR_EIO;
}

static int meta_scan(struct store *store, const char *prefix, size_t plen,
                     const ProtobufCMessageDescriptor *d, size_t max, struct fsm_list *out)
{
    memset(out, 0, sizeof(*out));
    uint8_t upper[64];
    memcpy(upper, prefix, plen);
    upper[plen - 1] = 1; /* prefixes end in NUL: the next byte bounds them */
    struct store_iter *it = NULL;
    int rv = store_iter_new(store, STORE_CF_META, prefix, plen, upper, plen, &it);
    if (rv != 0)
        return rv;
    for (; store_iter_valid(it) && out->n < max; store_iter_next(it)) {
        size_t len = 0;
        const uint8_t *val = store_iter_value(it, &len);
        ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, val);
        if (m == NULL) {
            rv = KR_EIO;
            break;
        }
        void **items = realloc(out->items, (out->n + 1) * sizeof(*items));
        if (items == NULL) {
            protobuf_c_message_free_unpacked(m, NULL);
            rv = KR_ENOMEM;
            break;
        }
        out->items = items;
        out->items[out->n++] = m;
    }
    if (rv == 0)
        rv = store_iter_status(it);
    out->more = rv == 0 && store_iter_valid(it);
    store_iter_free(it);
    if (rv != 0)
        fsm_list_free(out);
    return rv;
}

void fsm_list_free(struct fsm_list *list)
{
    for (size_t i = 0; i < list->n; i++)
        protobuf_c_message_free_unpacked(list->items[i], NULL);
    free(list->items);
    memset(list, 0, sizeof(*list));
}

/* --- principals: meta "principal\0" + name -> PrincipalInfo ------------------------ */

int fsm_get_principal(struct store *store, const char *name, Keyraft__PrincipalInfo **out)
{
    uint8_t key[128];
    size_t klen = prefixed_key(key, sizeof(key), PRINCIPAL_PREFIX, sizeof(PRINCIPAL_PREFIX) - 1,
                               name);
    if (klen == 0)
        return KR_ENOTFOUND;
    return meta_get(store, key, klen, &keyraft__principal_info__descriptor,
                    (ProtobufCMessage **)out);
}

int fsm_list_principals(struct store *store, size_t max, struct fsm_list *out)
{
    return meta_scan(store, PRINCIPAL_PREFIX, sizeof(PRINCIPAL_PREFIX) - 1,
                     &keyraft__principal_info__descriptor, max, out);
}

static int same_names(char *const *a, size_t na, char *const *b, size_t nb)
{
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++) {
        size_t j = 0;
        while (j < nb && strcmp(a[i], b[j]) != 0)
            j++;
        if (j == nb)
            return 0;
    }
    return 1;
}

/* Creates a principal, or merges certificates into an existing one with the
 * same roles, groups and domains: unknown serials are added, revocations
 * are kept (a revoked serial never comes back). Merging here rather than on
 * the leader keeps two concurrent changes from losing one another. */
int fsm__apply_put_principal(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__PutPrincipalCommand *cmd)
{
    (void)fsm;
    const Keyraft__PrincipalInfo *p = cmd->principal;
    char why[256];
    if (p == NULL || policy_principal_check(p, why, sizeof(why)) != 0)
        return KR_EINVAL;
    Keyraft__PrincipalInfo *old = NULL;
    int rv = fsm_get_principal(fsm__store(fsm), p->name, &old);
    if (rv != 0 && rv != KR_ENOTFOUND)
        return rv;
    uint8_t key[128];
    size_t klen = prefixed_key(key, sizeof(key), PRINCIPAL_PREFIX, sizeof(PRINCIPAL_PREFIX) - 1,
                               p->name);
    if (klen == 0) {
        keyraft__principal_info__free_unpacked(old, NULL);
        return KR_EINVAL;
    }
    if (old == NULL) {
        if (p->n_certs > MAX_CERTS_PER_PRINCIPAL)
            return KR_ETOOBIG;
        rv = fsm__meta_put(b, key, klen, &p->base);
        fsm_governance_bump();
        return rv;
    }
    if (old->n_certs > MAX_CERTS_PER_PRINCIPAL) {
        keyraft__principal_info__free_unpacked(old, NULL);
        return KR_ETOOBIG;
    }
    if (!same_names(old->roles, old->n_roles, p->roles, p->n_roles) ||
        !same_names(old->groups, old->n_groups, p->groups, p->n_groups) ||
        !same_names(old->domains, old->n_domains, p->domains, p->n_domains)) {
        keyraft__principal_info__free_unpacked(old, NULL);
        return KR_EEXIST;
    }
    /* Merge into a copy whose cert array we own. Revocations borrow the
     * command's strings: old's own are put back before it is freed. */
    char *saved_by[MAX_CERTS_PER_PRINCIPAL];
    for (size_t j = 0; j < old->n_certs; j++)
        saved_by[j] = old->certs[j]->revoked_by;
    size_t n = old->n_certs;
    Keyraft__PrincipalCert **certs = calloc(n + p->n_certs + 1, sizeof(*certs));
    if (certs == NULL) {
        keyraft__principal_info__free_unpacked(old, NULL);
        return KR_ENOMEM;
    }
    if (n > 0) /* old->certs may be NULL when there are none */
        memcpy(certs, old->certs, n * sizeof(*certs));
    for (size_t i = 0; i < p->n_certs; i++) {
        Keyraft__PrincipalCert *c = p->certs[i];
        size_t j = 0;
        while (j < n && strcmp(certs[j]->serial, c->serial) != 0)
            j++;
        if (j == n) {
            certs[n++] = c;
        } else if (c->revoked && !certs[j]->revoked) {
            certs[j]->revoked = 1;
            certs[j]->revoked_at = c->revoked_at;
            certs[j]->revoked_by = c->revoked_by;
        }
    }
    Keyraft__PrincipalInfo merged = *old;
    merged.certs = certs;
    merged.n_certs = n;
    rv = n > MAX_CERTS_PER_PRINCIPAL ? KR_ETOOBIG : fsm__meta_put(b, key, klen, &merged.base);
    for (size_t j = 0; j < old->n_certs; j++)
        old->certs[j]->revoked_by = saved_by[j];
    free(certs);
    keyraft__principal_info__free_unpacked(old, NULL);
    fsm_governance_bump();
    return rv;
}

/* --- domains -------------------------------------------------------------------------------- */

int fsm_list_domains(struct store *store, size_t max, struct fsm_list *out)
{
    return meta_scan(store, FSM_DOMAIN_PREFIX, sizeof(FSM_DOMAIN_PREFIX) - 1,
                     &keyraft__domain_record__descriptor, max, out);
}

/* Crypto-shredding: the wrapped domain key leaves the store, so no node can
 * unwrap any key of the domain again. */
int fsm__apply_destroy_domain(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__DestroyDomainCommand *cmd)
{
    if (strcmp(cmd->domain_id, FSM_DEFAULT_DOMAIN) == 0)
        return KR_EPERM;
    Keyraft__DomainRecord *dom = NULL;
    int rv = fsm_get_domain(fsm__store(fsm), cmd->domain_id, &dom);
    if (rv != 0)
        return rv;
    if (dom->destroyed) {
        keyraft__domain_record__free_unpacked(dom, NULL);
        return KR_ESTATE;
    }
    uint8_t key[300];
    size_t klen = fsm__domain_key(key, sizeof(key), cmd->domain_id);
    dom->destroyed = 1;
    dom->destroyed_at = cmd->at;
    free(dom->wrapped_key.data);
    dom->wrapped_key.data = NULL;
    dom->wrapped_key.len = 0;
    rv = klen == 0 ? KR_EINVAL : fsm__meta_put(b, key, klen, &dom->base);
    keyraft__domain_record__free_unpacked(dom, NULL);
    fsm_governance_bump();
    return rv;
}

/* --- key policy ----------------------------------------------------------------------------- */

int fsm__apply_set_key_policy(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__SetKeyPolicyCommand *cmd, uint64_t index,
                              struct fsm_op_result *res)
{
    char why[256];
    if (cmd->policy == NULL || policy_key_policy_check(cmd->policy, why, sizeof(why)) != 0)
        return KR_EINVAL;
    snprintf(res->key_id, sizeof(res->key_id), "%s", cmd->key_id);
    Keyraft__KeyRecord *rec = NULL;
    int rv = fsm_get_key(fsm__store(fsm), cmd->key_id, &rec);
    if (rv != 0)
        return rv;
    if (rec->state == KEYRAFT__KEY_STATE__DESTROYED ||
        rec->state == KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED) {
        keyraft__key_record__free_unpacked(rec, NULL);
        return KR_ESTATE;
    }
    Keyraft__KeyPolicy *old = rec->policy;
    rec->policy = cmd->policy;
    rv = fsm__put_key_record(b, rec, index);
    rec->policy = old;
    keyraft__key_record__free_unpacked(rec, NULL);
    return rv;
}

/* --- quorum rules: meta "governance" -> GovernanceRecord ----------------------------------- */

int fsm_get_governance(struct store *store, Keyraft__GovernanceRecord **out)
{
    int rv = meta_get(store, GOVERNANCE_KEY, sizeof(GOVERNANCE_KEY) - 1,
                      &keyraft__governance_record__descriptor, (ProtobufCMessage **)out);
    if (rv != KR_ENOTFOUND)
        return rv;
    *out = calloc(1, sizeof(**out));
    if (*out == NULL)
        return KR_ENOMEM;
    keyraft__governance_record__init(*out);
    return 0;
}

/* Upserts each rule by operation; required 0 removes it. */
int fsm__apply_put_governance(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__PutGovernanceCommand *cmd)
{
    if (cmd->governance == NULL)
        return KR_EINVAL;
    for (size_t i = 0; i < cmd->governance->n_rules; i++) {
        const Keyraft__QuorumRule *r = cmd->governance->rules[i];
        if (!policy_quorum_known(r->operation) || policy_role_bit(r->approver_role) == 0 ||
            r->required > 16)
            return KR_EINVAL;
    }
    Keyraft__GovernanceRecord *gov = NULL;
    int rv = fsm_get_governance(fsm__store(fsm), &gov);
    if (rv != 0)
        return rv;
    Keyraft__QuorumRule *rules[MAX_RULES];
    size_t n = 0;
    for (size_t i = 0; i < gov->n_rules && n < MAX_RULES; i++)
        rules[n++] = gov->rules[i];
    for (size_t i = 0; i < cmd->governance->n_rules; i++) {
        Keyraft__QuorumRule *r = cmd->governance->rules[i];
        size_t j = 0;
        while (j < n && strcmp(rules[j]->operation, r->operation) != 0)
            j++;
        if (j < n) {
            memmove(&rules[j], &rules[j + 1], (n - j - 1) * sizeof(rules[0]));
            n--;
        }
        if (r->required > 0 && n < MAX_RULES)
            rules[n++] = r;
    }
    Keyraft__GovernanceRecord next = *gov;
    next.rules = rules;
    next.n_rules = n;
    rv = fsm__meta_put(b, GOVERNANCE_KEY, sizeof(GOVERNANCE_KEY) - 1, &next.base);
    keyraft__governance_record__free_unpacked(gov, NULL);
    fsm_governance_bump();
    return rv;
}

/* --- approvals: meta "approval\0" + id -> ApprovalRecord ----------------------------------- */

int fsm_get_approval(struct store *store, const char *id, Keyraft__ApprovalRecord **out)
{
    uint8_t key[128];
    size_t klen = prefixed_key(key, sizeof(key), APPROVAL_PREFIX, sizeof(APPROVAL_PREFIX) - 1, id);
    if (klen == 0)
        return KR_ENOTFOUND;
    return meta_get(store, key, klen, &keyraft__approval_record__descriptor,
                    (ProtobufCMessage **)out);
}

int fsm_list_approvals(struct store *store, size_t max, struct fsm_list *out)
{
    return meta_scan(store, APPROVAL_PREFIX, sizeof(APPROVAL_PREFIX) - 1,
                     &keyraft__approval_record__descriptor, max, out);
}

static int put_approval(struct store_batch *b, const Keyraft__ApprovalRecord *a)
{
    uint8_t key[128];
    size_t klen = prefixed_key(key, sizeof(key), APPROVAL_PREFIX, sizeof(APPROVAL_PREFIX) - 1,
                               a->info->id);
    if (klen == 0)
        return KR_EINVAL;
    return fsm__meta_put(b, key, klen, &a->base);
}

int fsm__apply_create_approval(struct fsm *fsm, struct store_batch *b,
                               const Keyraft__CreateApprovalCommand *cmd)
{
    const Keyraft__ApprovalRecord *a = cmd->approval;
    if (a == NULL || a->info == NULL || !policy_name_valid(a->info->id) ||
        a->info->required == 0 || a->info->state != KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING)
        return KR_EINVAL;
    Keyraft__ApprovalRecord *old = NULL;
    int rv = fsm_get_approval(fsm__store(fsm), a->info->id, &old);
    if (rv == 0) {
        keyraft__approval_record__free_unpacked(old, NULL);
        return KR_EEXIST;
    }
    if (rv != KR_ENOTFOUND)
        return rv;
    return put_approval(b, a);
}

int fsm__apply_vote_approval(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__VoteApprovalCommand *cmd)
{
    const Keyraft__ApprovalVote *v = cmd->vote;
    if (v == NULL || v->principal[0] == '\0')
        return KR_EINVAL;
    Keyraft__ApprovalRecord *a = NULL;
    int rv = fsm_get_approval(fsm__store(fsm), cmd->approval_id, &a);
    if (rv != 0)
        return rv;
    Keyraft__ApprovalInfo *info = a->info;
    if (info == NULL)
        rv = KR_EIO;
    else if (info->state != KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING)
        rv = KR_ESTATE;
    else if (cmd->at > info->expires_at)
        rv = KR_ETIMEDOUT;
    else if (strcmp(v->principal, info->requester) == 0)
        rv = KR_EPERM; /* nobody approves their own request */
    for (size_t i = 0; rv == 0 && i < info->n_votes; i++)
        if (strcmp(info->votes[i]->principal, v->principal) == 0)
            rv = KR_EEXIST; /* one vote per principal */
    if (rv != 0) {
        keyraft__approval_record__free_unpacked(a, NULL);
        return rv;
    }
    Keyraft__ApprovalVote **votes = calloc(info->n_votes + 1, sizeof(*votes));
    if (votes == NULL) {
        keyraft__approval_record__free_unpacked(a, NULL);
        return KR_ENOMEM;
    }
    if (info->n_votes > 0) /* info->votes is NULL before the first vote */
        memcpy(votes, info->votes, info->n_votes * sizeof(*votes));
    votes[info->n_votes] = (Keyraft__ApprovalVote *)v;
    size_t approvals = 0;
    for (size_t i = 0; i <= info->n_votes; i++)
        approvals += votes[i]->approve != 0;
    Keyraft__ApprovalVote **saved = info->votes;
    size_t saved_n = info->n_votes;
    Keyraft__ApprovalState saved_state = info->state;
    info->votes = votes;
    info->n_votes = saved_n + 1;
    if (!v->approve)
        info->state = KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED;
    else if (approvals >= info->required)
        info->state = KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED;
    rv = put_approval(b, a);
    info->votes = saved;
    info->n_votes = saved_n;
    info->state = saved_state;
    free(votes);
    keyraft__approval_record__free_unpacked(a, NULL);
    return rv;
}

/* Marks an APPROVED request DONE with its outcome. KR_EPERM when it is not
 * approved (or was used already): an approval runs its request once. */
int fsm__finish_approval(struct fsm *fsm, struct store_batch *b, const char *id, int status,
                         const char *message)
{
    Keyraft__ApprovalRecord *a = NULL;
    int rv = fsm_get_approval(fsm__store(fsm), id, &a);
    if (rv != 0)
        return rv == KR_ENOTFOUND ? KR_EPERM : rv;
    if (a->info == NULL || a->info->state != KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED) {
        keyraft__approval_record__free_unpacked(a, NULL);
        return KR_EPERM;
    }
    char *saved_msg = a->info->result_message;
    a->info->state = KEYRAFT__APPROVAL_STATE__APPROVAL_DONE;
    a->info->result_status = status;
    a->info->result_message = (char *)(message ? message : "");
    rv = put_approval(b, a);
    a->info->result_message = saved_msg;
    keyraft__approval_record__free_unpacked(a, NULL);
    return rv;
}

int fsm__apply_finish_approval(struct fsm *fsm, struct store_batch *b,
                               const Keyraft__FinishApprovalCommand *cmd)
{
    return fsm__finish_approval(fsm, b, cmd->approval_id, cmd->status, cmd->message);
}

int fsm__apply_audit(struct fsm *fsm, struct store_batch *b, const Keyraft__AuditSubmitRequest *cmd)
{
    if (cmd->node_id == 0 || cmd->n_records > AUDIT_MAX_BATCH_RECORDS ||
        cmd->n_usage > AUDIT_MAX_USAGE_DELTAS)
        return KR_EINVAL;
    return audit_fsm_apply(fsm__store(fsm), b, cmd);
}
