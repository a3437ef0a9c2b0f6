/* test_fsm.c: the raft state machine driven directly (no raft): schema,
 * lifecycle, deduplication, replay, determinism and crash resume. */
#include "fsm.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "keyraft.h"
#include "log.h"
#include "store.h"

#define S_PRE KEYRAFT__KEY_STATE__PRE_ACTIVE
#define S_ACT KEYRAFT__KEY_STATE__ACTIVE
#define S_DEA KEYRAFT__KEY_STATE__DEACTIVATED
#define S_CMP KEYRAFT__KEY_STATE__COMPROMISED
#define S_DES KEYRAFT__KEY_STATE__DESTROYED
#define S_DCM KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED

/* ---- entry builder: commands with all their parts in one block ------------ */

struct op {
    Keyraft__Command cmd;
    Keyraft__PutKeyCommand put_key;
    Keyraft__KeyRecord rec;
    Keyraft__KeyVersionRecord ver;
    Keyraft__KeyVersionRecord *vers[1];
    Keyraft__Tag tag;
    Keyraft__Tag *tags[1];
    Keyraft__SetStateCommand set_state;
    Keyraft__AddVersionCommand add_version;
    Keyraft__DestroyKeyCommand destroy;
    Keyraft__PutDomainCommand put_domain;
    Keyraft__DomainRecord domain;
    Keyraft__PutNodeCommand put_node;
    Keyraft__RemoveNodeCommand remove_node;
    Keyraft__NodeRecord node;
    char raft_addr[32], client_addr[32];
    char id[FSM_KEY_ID_LEN + 1];
    char name[64];
    char dom[64];
    char req[64];
    char msg[64];
    uint8_t sealed[24];
    uint8_t wrapped[16];
    /* governance commands */
    Keyraft__PutPrincipalCommand put_principal;
    Keyraft__PrincipalInfo principal;
    Keyraft__PrincipalCert certs[4];
    Keyraft__PrincipalCert *certp[4];
    char serials[4][24];
    char revokers[4][32];
    char *roles[4];
    char *groups[4];
    char words[8][32];
    size_t n_words;
    Keyraft__DestroyDomainCommand destroy_domain;
    Keyraft__SetKeyPolicyCommand set_policy;
    Keyraft__KeyPolicy policy;
    Keyraft__GroupGrant grant;
    Keyraft__GroupGrant *grants[1];
    char *grant_ops[4];
    Keyraft__PutGovernanceCommand put_gov;
    Keyraft__GovernanceRecord gov;
    Keyraft__QuorumRule rules[2];
    Keyraft__QuorumRule *rulep[2];
    char rule_words[2][2][32];
    Keyraft__CreateApprovalCommand create_approval;
    Keyraft__ApprovalRecord approval;
    Keyraft__ApprovalInfo ainfo;
    Keyraft__VoteApprovalCommand vote_cmd;
    Keyraft__ApprovalVote vote;
    Keyraft__FinishApprovalCommand finish;
    char who[64];
    char approval_id[64];     /* the approval a governance command concerns */
    char cmd_approval_id[64]; /* Command.approval_id */
};

#define ENTRY_MAX 8
struct entry {
    size_t n;
    struct op ops[ENTRY_MAX];
    Keyraft__Command *cmds[ENTRY_MAX];
};

static struct op *op_begin(struct entry *e, const char *req)
{
    assert_true(e->n < ENTRY_MAX);
    struct op *o = &e->ops[e->n];
    memset(o, 0, sizeof(*o));
    keyraft__command__init(&o->cmd);
    snprintf(o->req, sizeof(o->req), "%s", req ? req : "");
    o->cmd.request_id = o->req;
    e->cmds[e->n++] = &o->cmd;
    return o;
}

/* Dummy sealed blob: the FSM never looks inside, but it must shred it. */
static void fill_sealed(uint8_t *p, size_t n, const char *id, uint32_t version)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(id[i % FSM_KEY_ID_LEN] + version * 31 + i);
}

static void e_domain(struct entry *e, const char *req, const char *domain_id)
{
    struct op *o = op_begin(e, req);
    snprintf(o->dom, sizeof(o->dom), "%s", domain_id);
    keyraft__domain_record__init(&o->domain);
    o->domain.id = o->dom;
    memset(o->wrapped, 0xd0, sizeof(o->wrapped));
    o->domain.wrapped_key.data = o->wrapped;
    o->domain.wrapped_key.len = sizeof(o->wrapped);
    o->domain.created_at = 1000;
    o->domain.mwk_label = "keyraft-mwk";
    keyraft__put_domain_command__init(&o->put_domain);
    o->put_domain.domain = &o->domain;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_DOMAIN;
    o->cmd.put_domain = &o->put_domain;
}

static void e_put_node(struct entry *e, const char *req, uint64_t id, const char *raft_addr,
                       const char *client_addr, Keyraft__NodeRole role)
{
    struct op *o = op_begin(e, req);
    snprintf(o->raft_addr, sizeof(o->raft_addr), "%s", raft_addr);
    snprintf(o->client_addr, sizeof(o->client_addr), "%s", client_addr);
    keyraft__node_record__init(&o->node);
    o->node.id = id;
    o->node.raft_address = o->raft_addr;
    o->node.client_address = o->client_addr;
    o->node.role = role;
    keyraft__put_node_command__init(&o->put_node);
    o->put_node.node = &o->node;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_NODE;
    o->cmd.put_node = &o->put_node;
}

static void e_remove_node(struct entry *e, const char *req, uint64_t id)
{
    struct op *o = op_begin(e, req);
    keyraft__remove_node_command__init(&o->remove_node);
    o->remove_node.node_id = id;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_REMOVE_NODE;
    o->cmd.remove_node = &o->remove_node;
}

static void e_put_key(struct entry *e, const char *req, const char *id, const char *name,
                      const char *domain, Keyraft__KeyState state)
{
    struct op *o = op_begin(e, req);
    snprintf(o->id, sizeof(o->id), "%.32s", id);
    snprintf(o->name, sizeof(o->name), "%s", name);
    snprintf(o->dom, sizeof(o->dom), "%s", domain);
    keyraft__key_version_record__init(&o->ver);
    o->ver.version = 1;
    o->ver.created_at = 2000;
    fill_sealed(o->sealed, sizeof(o->sealed), id, 1);
    o->ver.sealed.data = o->sealed;
    o->ver.sealed.len = sizeof(o->sealed);
    o->ver.kcv = "abcdef";
    o->vers[0] = &o->ver;
    keyraft__tag__init(&o->tag);
    o->tag.key = "team";
    o->tag.value = "blue";
    o->tags[0] = &o->tag;
    keyraft__key_record__init(&o->rec);
    o->rec.id = o->id;
    o->rec.name = o->name;
    o->rec.domain = o->dom;
    o->rec.algorithm = KEYRAFT__ALGORITHM__AES_256;
    o->rec.state = state;
    o->rec.current_version = 1;
    o->rec.n_versions = 1;
    o->rec.versions = o->vers;
    o->rec.n_tags = 1;
    o->rec.tags = o->tags;
    o->rec.created_at = 2000;
    o->rec.activated_at = state == S_ACT ? 2000 : 0;
    o->rec.exportable = 1;
    keyraft__put_key_command__init(&o->put_key);
    o->put_key.key = &o->rec;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_KEY;
    o->cmd.put_key = &o->put_key;
}

static void e_set_state(struct entry *e, const char *req, const char *id, Keyraft__KeyState state,
                        uint64_t at, Keyraft__RevokeReason reason, const char *msg)
{
    struct op *o = op_begin(e, req);
    snprintf(o->id, sizeof(o->id), "%.32s", id);
    snprintf(o->msg, sizeof(o->msg), "%s", msg ? msg : "");
    keyraft__set_state_command__init(&o->set_state);
    o->set_state.key_id = o->id;
    o->set_state.state = state;
    o->set_state.at = at;
    o->set_state.reason = reason;
    o->set_state.message = o->msg;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_SET_STATE;
    o->cmd.set_state = &o->set_state;
}

static void e_add_version(struct entry *e, const char *req, const char *id, uint32_t version)
{
    struct op *o = op_begin(e, req);
    snprintf(o->id, sizeof(o->id), "%.32s", id);
    keyraft__key_version_record__init(&o->ver);
    o->ver.version = version;
    o->ver.created_at = 3000 + version;
    fill_sealed(o->sealed, sizeof(o->sealed), id, version);
    o->ver.sealed.data = o->sealed;
    o->ver.sealed.len = sizeof(o->sealed);
    keyraft__add_version_command__init(&o->add_version);
    o->add_version.key_id = o->id;
    o->add_version.version = &o->ver;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_ADD_VERSION;
    o->cmd.add_version = &o->add_version;
}

static void e_destroy(struct entry *e, const char *req, const char *id, uint64_t at)
{
    struct op *o = op_begin(e, req);
    snprintf(o->id, sizeof(o->id), "%.32s", id);
    keyraft__destroy_key_command__init(&o->destroy);
    o->destroy.key_id = o->id;
    o->destroy.at = at;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_DESTROY_KEY;
    o->cmd.destroy_key = &o->destroy;
}

/* ---- governance builders ----------------------------------------------------- */

/* Splits comma-separated |csv| into |out| (at most |max|), storage in |o|. */
static size_t split_words(struct op *o, const char *csv, char **out, size_t max)
{
    size_t n = 0;
    const char *s = csv != NULL ? csv : "";
    while (*s != '\0' && n < max) {
        size_t l = strcspn(s, ",");
        assert_true(o->n_words < 8);
        char *w = o->words[o->n_words++];
        snprintf(w, sizeof(o->words[0]), "%.*s", (int)l, s);
        out[n++] = w;
        s += l;
        if (*s == ',')
            s++;
    }
    return n;
}

/* Runs the command only under approval |id| (Command.approval_id). */
static void with_approval(struct op *o, const char *id)
{
    snprintf(o->cmd_approval_id, sizeof(o->cmd_approval_id), "%s", id);
    o->cmd.approval_id = o->cmd_approval_id;
}

static struct op *e_principal(struct entry *e, const char *req, const char *name,
                              const char *roles, const char *groups)
{
    struct op *o = op_begin(e, req);
    snprintf(o->name, sizeof(o->name), "%s", name);
    keyraft__principal_info__init(&o->principal);
    o->principal.name = o->name;
    o->principal.roles = o->roles;
    o->principal.n_roles = split_words(o, roles, o->roles, 4);
    o->principal.groups = o->groups;
    o->principal.n_groups = split_words(o, groups, o->groups, 4);
    o->principal.certs = o->certp;
    o->principal.created_at = 1000;
    o->principal.created_by = "root-admin";
    keyraft__put_principal_command__init(&o->put_principal);
    o->put_principal.principal = &o->principal;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_PRINCIPAL;
    o->cmd.put_principal = &o->put_principal;
    return o;
}

/* Adds a certificate to a pending e_principal; |revoked_by| NULL: not revoked. */
static void p_cert(struct op *o, const char *serial, const char *revoked_by, uint64_t revoked_at)
{
    size_t i = o->principal.n_certs++;
    assert_true(i < 4);
    Keyraft__PrincipalCert *c = &o->certs[i];
    keyraft__principal_cert__init(c);
    snprintf(o->serials[i], sizeof(o->serials[i]), "%s", serial);
    c->serial = o->serials[i];
    c->not_after = 9000000;
    if (revoked_by != NULL) {
        snprintf(o->revokers[i], sizeof(o->revokers[i]), "%s", revoked_by);
        c->revoked = 1;
        c->revoked_at = revoked_at;
        c->revoked_by = o->revokers[i];
    }
    o->certp[i] = c;
}

static void e_destroy_domain(struct entry *e, const char *req, const char *domain_id, uint64_t at)
{
    struct op *o = op_begin(e, req);
    snprintf(o->dom, sizeof(o->dom), "%s", domain_id);
    keyraft__destroy_domain_command__init(&o->destroy_domain);
    o->destroy_domain.domain_id = o->dom;
    o->destroy_domain.at = at;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_DESTROY_DOMAIN;
    o->cmd.destroy_domain = &o->destroy_domain;
}

/* A policy owned by |owner|, with one grant of |ops| (csv) to |group| when
 * |group| is not NULL. */
static void e_set_policy(struct entry *e, const char *req, const char *id, const char *owner,
                         const char *group, const char *ops)
{
    struct op *o = op_begin(e, req);
    snprintf(o->id, sizeof(o->id), "%.32s", id);
    snprintf(o->dom, sizeof(o->dom), "%s", owner);
    keyraft__key_policy__init(&o->policy);
    o->policy.owner_group = o->dom;
    o->policy.usage_limit = 77;
    if (group != NULL) {
        keyraft__group_grant__init(&o->grant);
        snprintf(o->name, sizeof(o->name), "%s", group);
        o->grant.group = o->name;
        o->grant.ops = o->grant_ops;
        o->grant.n_ops = split_words(o, ops, o->grant_ops, 4);
        o->grants[0] = &o->grant;
        o->policy.grants = o->grants;
        o->policy.n_grants = 1;
    }
    keyraft__set_key_policy_command__init(&o->set_policy);
    o->set_policy.key_id = o->id;
    o->set_policy.policy = &o->policy;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_SET_KEY_POLICY;
    o->cmd.set_key_policy = &o->set_policy;
}

static struct op *e_governance(struct entry *e, const char *req)
{
    struct op *o = op_begin(e, req);
    keyraft__governance_record__init(&o->gov);
    o->gov.rules = o->rulep;
    keyraft__put_governance_command__init(&o->put_gov);
    o->put_gov.governance = &o->gov;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_GOVERNANCE;
    o->cmd.put_governance = &o->put_gov;
    return o;
}

static void g_rule(struct op *o, const char *operation, uint32_t required, const char *role)
{
    size_t i = o->gov.n_rules++;
    assert_true(i < 2);
    Keyraft__QuorumRule *r = &o->rules[i];
    keyraft__quorum_rule__init(r);
    snprintf(o->rule_words[i][0], sizeof(o->rule_words[i][0]), "%s", operation);
    snprintf(o->rule_words[i][1], sizeof(o->rule_words[i][1]), "%s", role);
    r->operation = o->rule_words[i][0];
    r->approver_role = o->rule_words[i][1];
    r->required = required;
    r->ttl_ms = 60000;
    o->rulep[i] = r;
}

static struct op *e_create_approval(struct entry *e, const char *req, const char *id,
                                    const char *requester, uint32_t required,
                                    uint64_t expires_at)
{
    struct op *o = op_begin(e, req);
    snprintf(o->approval_id, sizeof(o->approval_id), "%s", id);
    snprintf(o->who, sizeof(o->who), "%s", requester);
    keyraft__approval_info__init(&o->ainfo);
    o->ainfo.id = o->approval_id;
    o->ainfo.operation = "destroy";
    o->ainfo.summary = "destroy a key";
    o->ainfo.requester = o->who;
    o->ainfo.state = KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING;
    o->ainfo.required = required;
    o->ainfo.approver_role = "officer";
    o->ainfo.created_at = 1000;
    o->ainfo.expires_at = expires_at;
    keyraft__approval_record__init(&o->approval);
    o->approval.info = &o->ainfo;
    keyraft__create_approval_command__init(&o->create_approval);
    o->create_approval.approval = &o->approval;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_CREATE_APPROVAL;
    o->cmd.create_approval = &o->create_approval;
    return o;
}

static void e_vote(struct entry *e, const char *req, const char *id, const char *voter,
                   int approve, uint64_t at)
{
    struct op *o = op_begin(e, req);
    snprintf(o->approval_id, sizeof(o->approval_id), "%s", id);
    snprintf(o->who, sizeof(o->who), "%s", voter);
    keyraft__approval_vote__init(&o->vote);
    o->vote.principal = o->who;
    o->vote.approve = approve;
    o->vote.at = at;
    o->vote.reason = "checked";
    keyraft__vote_approval_command__init(&o->vote_cmd);
    o->vote_cmd.approval_id = o->approval_id;
    o->vote_cmd.vote = &o->vote;
    o->vote_cmd.at = at;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_VOTE_APPROVAL;
    o->cmd.vote_approval = &o->vote_cmd;
}

static void e_finish(struct entry *e, const char *req, const char *id, int status,
                     const char *msg)
{
    struct op *o = op_begin(e, req);
    snprintf(o->approval_id, sizeof(o->approval_id), "%s", id);
    snprintf(o->msg, sizeof(o->msg), "%s", msg);
    keyraft__finish_approval_command__init(&o->finish);
    o->finish.approval_id = o->approval_id;
    o->finish.status = status;
    o->finish.message = o->msg;
    o->finish.at = 4242;
    o->cmd.op_case = KEYRAFT__COMMAND__OP_FINISH_APPROVAL;
    o->cmd.finish_approval = &o->finish;
}

/* ---- fixture --------------------------------------------------------------- */

struct fx {
    char dir[64];
    char db[96];
    struct store *store;
    struct fsm *fsm;
    uint64_t next; /* what raft_last_applied + 1 would be */
    struct entry *e;
};

static uint64_t next_index_cb(void *arg)
{
    return ((struct fx *)arg)->next;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void fx_open(struct fx *f)
{
    assert_int_equal(store_open(f->db, &f->store), 0);
    assert_int_equal(fsm_new(f->store, next_index_cb, f, &f->fsm), 0);
}

static void fx_close(struct fx *f)
{
    fsm_free(f->fsm);
    f->fsm = NULL;
    store_close(f->store);
    f->store = NULL;
}

static struct fx *fx_new(void)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-fsm-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->db, sizeof(f->db), "%s/db", f->dir);
    f->e = calloc(1, sizeof(*f->e));
    assert_non_null(f->e);
    fx_open(f);
    return f;
}

static int fx_free(struct fx *f)
{
    if (f == NULL)
        return 0;
    fx_close(f);
    int rc = nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f->e);
    free(f);
    return rc;
}

static int setup(void **state)
{
    *state = fx_new();
    return 0;
}

static int teardown(void **state)
{
    return fx_free(*state);
}

/* Encodes the pending entry as a leader whose clock reads |time_ms| (0: no
 * clock) would, applies it as raft entry |index|, and resets the builder.
 * The result stays owned by the fsm. */
static struct fsm_result *apply_entry_at(struct fx *f, uint64_t index, uint64_t time_ms)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(command_batch_encode_at(f->e->cmds, f->e->n, time_ms, malloc, &buf, &len),
                     0);
    f->next = index;
    struct fsm_result *r = NULL;
    assert_int_equal(fsm_apply(f->fsm, buf, len, &r), 0);
    free(buf);
    memset(f->e, 0, sizeof(*f->e));
    return r;
}

static struct fsm_result *apply_entry(struct fx *f, uint64_t index)
{
    return apply_entry_at(f, index, 0);
}

/* Applies the one pending command and returns its status. */
static int apply1(struct fx *f, uint64_t index)
{
    assert_int_equal(f->e->n, 1);
    struct fsm_result *r = apply_entry(f, index);
    assert_non_null(r);
    assert_int_equal(r->index, index);
    assert_int_equal(r->n, 1);
    assert_int_equal(r->ops[0].index, index);
    assert_int_equal(store_applied_index(f->store), index);
    return r->ops[0].status;
}

static void make_id(unsigned n, char out[FSM_KEY_ID_LEN + 1])
{
    uint8_t r[14];
    for (int i = 0; i < 14; i++)
        r[i] = (uint8_t)(n * 37 + (unsigned)i * 11);
    fsm_format_key_id(1, r, out);
    assert_true(fsm_key_id_valid(out));
}

static Keyraft__KeyRecord *get_key(struct fx *f, const char *id)
{
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id, &rec), 0);
    assert_non_null(rec);
    return rec;
}

static Keyraft__KeyState key_state(struct fx *f, const char *id)
{
    Keyraft__KeyRecord *rec = get_key(f, id);
    Keyraft__KeyState s = rec->state;
    keyraft__key_record__free_unpacked(rec, NULL);
    return s;
}

/* Entries in [lower, upper) of |cf| (NULL: no bound). */
static size_t count_range(struct store *s, enum store_cf cf, const char *lower,
                          const char *upper)
{
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, cf, lower, lower ? strlen(lower) : 0, upper,
                                    upper ? strlen(upper) : 0, &it),
                     0);
    size_t n = 0;
    for (; store_iter_valid(it); store_iter_next(it))
        n++;
    assert_int_equal(store_iter_status(it), 0);
    store_iter_free(it);
    return n;
}

static size_t count_family(struct store *s, enum store_cf cf)
{
    return count_range(s, cf, NULL, NULL);
}

/* Whether the attrs index lists |id| under |kind| = |v1|. */
static int indexed(struct fx *f, enum fsm_index_kind kind, const char *domain, const char *v1,
                   const char *v2, const char *id)
{
    uint8_t key[512];
    size_t n = fsm_attr_prefix(key, sizeof(key) - FSM_KEY_ID_LEN, kind, domain, v1, v2);
    assert_true(n > 0);
    memcpy(key + n, id, FSM_KEY_ID_LEN);
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(f->store, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN, &val, &len);
    free(val);
    assert_true(rv == 0 || rv == KR_ENOTFOUND);
    return rv == 0;
}

static int state_indexed(struct fx *f, const char *id, Keyraft__KeyState s)
{
    char num[8];
    snprintf(num, sizeof(num), "%d", (int)s);
    return indexed(f, FSM_INDEX_STATE, FSM_DEFAULT_DOMAIN, num, NULL, id);
}

/* Index 1: the default domain; index 2: key |id| named |name| in |state|. */
static void seed_key(struct fx *f, const char *id, const char *name, Keyraft__KeyState state)
{
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    e_put_key(f->e, NULL, id, name, FSM_DEFAULT_DOMAIN, state);
    assert_int_equal(apply1(f, 2), 0);
}

/* ---- tests ------------------------------------------------------------------ */

static void test_put_domain_then_key(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1];
    make_id(1, id);

    e_domain(f->e, "req-dom", FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    Keyraft__DomainRecord *dom = NULL;
    assert_int_equal(fsm_get_domain(f->store, FSM_DEFAULT_DOMAIN, &dom), 0);
    assert_string_equal(dom->id, FSM_DEFAULT_DOMAIN);
    assert_int_equal(dom->wrapped_key.len, 16);
    assert_string_equal(dom->mwk_label, "keyraft-mwk");
    keyraft__domain_record__free_unpacked(dom, NULL);

    e_put_key(f->e, "req-1", id, "payments", FSM_DEFAULT_DOMAIN, S_ACT);
    struct fsm_result *r = apply_entry(f, 2);
    assert_non_null(r);
    assert_int_equal(r->n, 1);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, id);
    assert_int_equal(r->ops[0].index, 2);
    assert_int_equal(store_applied_index(f->store), 2);

    Keyraft__KeyRecord *rec = get_key(f, id);
    assert_string_equal(rec->id, id);
    assert_string_equal(rec->name, "payments");
    assert_string_equal(rec->domain, FSM_DEFAULT_DOMAIN);
    assert_int_equal(rec->state, S_ACT);
    assert_int_equal(rec->algorithm, KEYRAFT__ALGORITHM__AES_256);
    assert_int_equal(rec->current_version, 1);
    assert_int_equal(rec->updated_index, 2);
    assert_int_equal(rec->n_versions, 1);
    uint8_t want[24];
    fill_sealed(want, sizeof(want), id, 1);
    assert_int_equal(rec->versions[0]->sealed.len, sizeof(want));
    assert_memory_equal(rec->versions[0]->sealed.data, want, sizeof(want));
    assert_int_equal(rec->n_tags, 1);
    keyraft__key_record__free_unpacked(rec, NULL);

    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "payments", found), 0);
    assert_string_equal(found, id);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "payment", found), KR_ENOTFOUND);
    assert_int_equal(fsm_find_name(f->store, "other", "payments", found), KR_ENOTFOUND);
    assert_true(state_indexed(f, id, S_ACT));
    assert_true(indexed(f, FSM_INDEX_ALG, FSM_DEFAULT_DOMAIN, "02", NULL, id));
    assert_true(indexed(f, FSM_INDEX_TAG, FSM_DEFAULT_DOMAIN, "team", "blue", id));

    /* Survives a restart. */
    fx_close(f);
    fx_open(f);
    assert_int_equal(store_applied_index(f->store), 2);
    assert_int_equal(key_state(f, id), S_ACT);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "payments", found), 0);
}

static void test_duplicates_rejected_and_write_nothing(void **state)
{
    struct fx *f = *state;
    char id1[FSM_KEY_ID_LEN + 1], id2[FSM_KEY_ID_LEN + 1];
    make_id(1, id1);
    make_id(2, id2);
    seed_key(f, id1, "alpha", S_ACT);
    size_t keys = count_family(f->store, STORE_CF_KEYS);
    size_t names = count_family(f->store, STORE_CF_NAMES);
    size_t attrs = count_family(f->store, STORE_CF_ATTRS);

    /* Same name, new id. */
    e_put_key(f->e, NULL, id2, "alpha", FSM_DEFAULT_DOMAIN, S_PRE);
    assert_int_equal(apply1(f, 3), KR_EEXIST);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id2, &rec), KR_ENOTFOUND);
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "alpha", found), 0);
    assert_string_equal(found, id1);

    /* Same id, new name (the leader's RNG repeated itself). */
    e_put_key(f->e, NULL, id1, "beta", FSM_DEFAULT_DOMAIN, S_PRE);
    assert_int_equal(apply1(f, 4), KR_EEXIST);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "beta", found), KR_ENOTFOUND);
    rec = get_key(f, id1);
    assert_string_equal(rec->name, "alpha");
    assert_int_equal(rec->updated_index, 2);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* Same domain twice. */
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 5), KR_EEXIST);

    assert_int_equal(count_family(f->store, STORE_CF_KEYS), keys);
    assert_int_equal(count_family(f->store, STORE_CF_NAMES), names);
    assert_int_equal(count_family(f->store, STORE_CF_ATTRS), attrs);

    /* The same name in another domain is a different key. */
    e_domain(f->e, NULL, "tenant-b");
    assert_int_equal(apply1(f, 6), 0);
    e_put_key(f->e, NULL, id2, "alpha", "tenant-b", S_PRE);
    assert_int_equal(apply1(f, 7), 0);
    assert_int_equal(fsm_find_name(f->store, "tenant-b", "alpha", found), 0);
    assert_string_equal(found, id2);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "alpha", found), 0);
    assert_string_equal(found, id1);
}

static void test_put_key_unknown_domain(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1];
    make_id(3, id);
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    e_put_key(f->e, NULL, id, "orphan", "no-such-domain", S_ACT);
    assert_int_equal(apply1(f, 2), KR_ENOTFOUND);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id, &rec), KR_ENOTFOUND);
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, "no-such-domain", "orphan", found), KR_ENOTFOUND);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 0);
}

static void test_put_key_malformed(void **state)
{
    struct fx *f = *state;
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    char id[FSM_KEY_ID_LEN + 1];
    make_id(4, id);

    char upper[FSM_KEY_ID_LEN + 1];
    snprintf(upper, sizeof(upper), "%s", id);
    upper[5] = 'A';
    e_put_key(f->e, NULL, upper, "k", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 2), KR_EINVAL);

    char shortid[FSM_KEY_ID_LEN + 1];
    snprintf(shortid, sizeof(shortid), "%.31s", id);
    e_put_key(f->e, NULL, shortid, "k", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 3), KR_EINVAL);

    e_put_key(f->e, NULL, id, "", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 4), KR_EINVAL);

    e_put_key(f->e, NULL, id, "k", FSM_DEFAULT_DOMAIN, S_ACT);
    f->e->ops[0].rec.n_versions = 0;
    assert_int_equal(apply1(f, 5), KR_EINVAL);

    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 0);
    assert_int_equal(count_family(f->store, STORE_CF_NAMES), 0);
}

static void test_set_state_valid_transitions(void **state)
{
    struct fx *f = *state;
    char a[FSM_KEY_ID_LEN + 1], b[FSM_KEY_ID_LEN + 1];
    make_id(10, a);
    make_id(11, b);
    seed_key(f, a, "key-a", S_PRE);
    e_put_key(f->e, NULL, b, "key-b", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 3), 0);
    assert_true(state_indexed(f, a, S_PRE));

    /* pre-active -> active */
    e_set_state(f->e, NULL, a, S_ACT, 5000, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 4), 0);
    Keyraft__KeyRecord *rec = get_key(f, a);
    assert_int_equal(rec->state, S_ACT);
    assert_int_equal(rec->activated_at, 5000);
    assert_int_equal(rec->updated_index, 4);
    keyraft__key_record__free_unpacked(rec, NULL);
    assert_false(state_indexed(f, a, S_PRE));
    assert_true(state_indexed(f, a, S_ACT));

    /* active -> deactivated, with a reason: also a revocation */
    e_set_state(f->e, NULL, a, S_DEA, 6000, KEYRAFT__REVOKE_REASON__SUPERSEDED, "rotated out");
    assert_int_equal(apply1(f, 5), 0);
    rec = get_key(f, a);
    assert_int_equal(rec->state, S_DEA);
    assert_int_equal(rec->deactivated_at, 6000);
    assert_int_equal(rec->revoked_at, 6000);
    assert_int_equal(rec->revoke_reason, KEYRAFT__REVOKE_REASON__SUPERSEDED);
    assert_string_equal(rec->revoke_message, "rotated out");
    assert_int_equal(rec->activated_at, 5000);
    keyraft__key_record__free_unpacked(rec, NULL);
    assert_false(state_indexed(f, a, S_ACT));
    assert_true(state_indexed(f, a, S_DEA));
    /* Still a live key: its name resolves. */
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "key-a", found), 0);

    /* active -> compromised */
    e_set_state(f->e, NULL, b, S_CMP, 7000, KEYRAFT__REVOKE_REASON__KEY_COMPROMISE, "leaked");
    assert_int_equal(apply1(f, 6), 0);
    rec = get_key(f, b);
    assert_int_equal(rec->state, S_CMP);
    assert_int_equal(rec->revoked_at, 7000);
    assert_int_equal(rec->deactivated_at, 7000);
    assert_int_equal(rec->revoke_reason, KEYRAFT__REVOKE_REASON__KEY_COMPROMISE);
    assert_string_equal(rec->revoke_message, "leaked");
    keyraft__key_record__free_unpacked(rec, NULL);
    assert_true(state_indexed(f, b, S_CMP));
    assert_false(state_indexed(f, b, S_ACT));

    /* deactivated -> compromised keeps the first deactivation time */
    e_set_state(f->e, NULL, a, S_CMP, 8000, KEYRAFT__REVOKE_REASON__KEY_COMPROMISE, NULL);
    assert_int_equal(apply1(f, 7), 0);
    rec = get_key(f, a);
    assert_int_equal(rec->state, S_CMP);
    assert_int_equal(rec->deactivated_at, 6000);
    assert_int_equal(rec->revoked_at, 8000);
    keyraft__key_record__free_unpacked(rec, NULL);
}

static void test_set_state_invalid_transitions(void **state)
{
    struct fx *f = *state;
    char a[FSM_KEY_ID_LEN + 1], d[FSM_KEY_ID_LEN + 1], p[FSM_KEY_ID_LEN + 1];
    make_id(20, a);
    make_id(21, d);
    make_id(22, p);
    seed_key(f, a, "live", S_ACT);
    e_put_key(f->e, NULL, d, "doomed", FSM_DEFAULT_DOMAIN, S_PRE);
    e_destroy(f->e, NULL, d, 100);
    e_put_key(f->e, NULL, p, "pending", FSM_DEFAULT_DOMAIN, S_PRE);
    struct fsm_result *r = apply_entry(f, 3);
    assert_non_null(r);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(r->ops[i].status, 0);
    assert_int_equal(key_state(f, d), S_DES);
    size_t attrs = count_family(f->store, STORE_CF_ATTRS);

    /* destroyed -> active */
    e_set_state(f->e, NULL, d, S_ACT, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 4), KR_ESTATE);
    assert_int_equal(key_state(f, d), S_DES);
    /* active -> destroyed (KMIP: revoke first) */
    e_set_state(f->e, NULL, a, S_DES, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 5), KR_ESTATE);
    /* active -> active */
    e_set_state(f->e, NULL, a, S_ACT, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 6), KR_ESTATE);
    /* active -> pre-active: time does not run backwards */
    e_set_state(f->e, NULL, a, S_PRE, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 7), KR_ESTATE);
    /* pre-active -> destroyed is a legal transition, but only DestroyKey does it */
    e_set_state(f->e, NULL, p, S_DES, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 8), KR_EINVAL);
    /* unknown key */
    char ghost[FSM_KEY_ID_LEN + 1];
    make_id(99, ghost);
    e_set_state(f->e, NULL, ghost, S_ACT, 200, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 9), KR_ENOTFOUND);

    Keyraft__KeyRecord *rec = get_key(f, a);
    assert_int_equal(rec->state, S_ACT);
    assert_int_equal(rec->updated_index, 2);
    assert_int_equal(rec->destroyed_at, 0);
    keyraft__key_record__free_unpacked(rec, NULL);
    rec = get_key(f, p);
    assert_int_equal(rec->state, S_PRE);
    assert_int_equal(rec->updated_index, 3);
    assert_int_equal(rec->versions[0]->sealed.len, 24);
    keyraft__key_record__free_unpacked(rec, NULL);
    /* Refused transitions leave every index as it was. */
    assert_int_equal(count_family(f->store, STORE_CF_ATTRS), attrs);
    assert_true(state_indexed(f, a, S_ACT));
    assert_true(state_indexed(f, p, S_PRE));
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "pending", found), 0);
}

static void test_destroy_shreds_every_version_and_frees_name(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1], id2[FSM_KEY_ID_LEN + 1];
    make_id(30, id);
    make_id(31, id2);
    seed_key(f, id, "shredme", S_ACT);
    e_add_version(f->e, NULL, id, 2);
    assert_int_equal(apply1(f, 3), 0);
    e_add_version(f->e, NULL, id, 3);
    assert_int_equal(apply1(f, 4), 0);
    e_set_state(f->e, NULL, id, S_DEA, 9000, KEYRAFT__REVOKE_REASON__CESSATION_OF_OPERATION, NULL);
    assert_int_equal(apply1(f, 5), 0);

    e_destroy(f->e, NULL, id, 9500);
    assert_int_equal(apply1(f, 6), 0);
    Keyraft__KeyRecord *rec = get_key(f, id);
    assert_int_equal(rec->state, S_DES);
    assert_int_equal(rec->destroyed_at, 9500);
    assert_int_equal(rec->updated_index, 6);
    assert_int_equal(rec->n_versions, 3);
    assert_int_equal(rec->current_version, 3);
    for (size_t i = 0; i < rec->n_versions; i++) {
        assert_int_equal(rec->versions[i]->version, i + 1);
        assert_int_equal(rec->versions[i]->sealed.len, 0);
        assert_true(rec->versions[i]->destroyed);
    }
    /* The tombstone keeps its metadata. */
    assert_string_equal(rec->name, "shredme");
    assert_int_equal(rec->deactivated_at, 9000);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* No trace of any sealed blob anywhere in the key record's bytes. */
    uint8_t *raw = NULL;
    size_t raw_len = 0;
    assert_int_equal(store_get(f->store, STORE_CF_KEYS, id, FSM_KEY_ID_LEN, &raw, &raw_len), 0);
    for (uint32_t v = 1; v <= 3; v++) {
        uint8_t blob[24];
        fill_sealed(blob, sizeof(blob), id, v);
        assert_null(memmem(raw, raw_len, blob, sizeof(blob)));
    }
    free(raw);

    /* Name, algorithm and tag indexes are gone; the state index has the tombstone. */
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "shredme", found), KR_ENOTFOUND);
    assert_false(indexed(f, FSM_INDEX_ALG, FSM_DEFAULT_DOMAIN, "02", NULL, id));
    assert_false(indexed(f, FSM_INDEX_TAG, FSM_DEFAULT_DOMAIN, "team", "blue", id));
    assert_false(state_indexed(f, id, S_DEA));
    assert_true(state_indexed(f, id, S_DES));

    /* The name is free again. */
    e_put_key(f->e, NULL, id2, "shredme", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 7), 0);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "shredme", found), 0);
    assert_string_equal(found, id2);
    /* The destroyed key stays destroyed and cannot grow versions. */
    e_add_version(f->e, NULL, id, 4);
    assert_int_equal(apply1(f, 8), KR_ESTATE);
    e_destroy(f->e, NULL, id, 9999);
    assert_int_equal(apply1(f, 9), KR_ESTATE);
    rec = get_key(f, id);
    assert_int_equal(rec->destroyed_at, 9500);
    keyraft__key_record__free_unpacked(rec, NULL);
}

static void test_destroy_compromised_and_refused_states(void **state)
{
    struct fx *f = *state;
    char c[FSM_KEY_ID_LEN + 1], a[FSM_KEY_ID_LEN + 1], p[FSM_KEY_ID_LEN + 1];
    make_id(40, c);
    make_id(41, a);
    make_id(42, p);
    seed_key(f, c, "burnt", S_ACT);
    e_set_state(f->e, NULL, c, S_CMP, 100, KEYRAFT__REVOKE_REASON__KEY_COMPROMISE, NULL);
    assert_int_equal(apply1(f, 3), 0);
    e_destroy(f->e, NULL, c, 200);
    assert_int_equal(apply1(f, 4), 0);
    Keyraft__KeyRecord *rec = get_key(f, c);
    assert_int_equal(rec->state, S_DCM);
    assert_int_equal(rec->versions[0]->sealed.len, 0);
    assert_true(rec->versions[0]->destroyed);
    keyraft__key_record__free_unpacked(rec, NULL);
    assert_true(state_indexed(f, c, S_DCM));
    assert_false(state_indexed(f, c, S_CMP));
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "burnt", found), KR_ENOTFOUND);

    /* An active key must be revoked before it can be destroyed. */
    e_put_key(f->e, NULL, a, "in-use", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_int_equal(apply1(f, 5), 0);
    e_destroy(f->e, NULL, a, 300);
    assert_int_equal(apply1(f, 6), KR_ESTATE);
    rec = get_key(f, a);
    assert_int_equal(rec->state, S_ACT);
    assert_int_equal(rec->versions[0]->sealed.len, 24);
    assert_false(rec->versions[0]->destroyed);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* A pre-active key may be destroyed directly. */
    e_put_key(f->e, NULL, p, "never-used", FSM_DEFAULT_DOMAIN, S_PRE);
    assert_int_equal(apply1(f, 7), 0);
    e_destroy(f->e, NULL, p, 400);
    assert_int_equal(apply1(f, 8), 0);
    assert_int_equal(key_state(f, p), S_DES);

    char ghost[FSM_KEY_ID_LEN + 1];
    make_id(98, ghost);
    e_destroy(f->e, NULL, ghost, 500);
    assert_int_equal(apply1(f, 9), KR_ENOTFOUND);
}

static void test_add_version_must_be_next(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1];
    make_id(50, id);
    seed_key(f, id, "rotating", S_ACT);

    e_add_version(f->e, NULL, id, 3); /* skips 2 */
    assert_int_equal(apply1(f, 3), KR_ESTATE);
    e_add_version(f->e, NULL, id, 1); /* already there */
    assert_int_equal(apply1(f, 4), KR_ESTATE);
    e_add_version(f->e, NULL, id, 2);
    assert_int_equal(apply1(f, 5), 0);
    /* A second rotation racing on the same base loses. */
    e_add_version(f->e, NULL, id, 2);
    assert_int_equal(apply1(f, 6), KR_ESTATE);

    Keyraft__KeyRecord *rec = get_key(f, id);
    assert_int_equal(rec->current_version, 2);
    assert_int_equal(rec->n_versions, 2);
    assert_int_equal(rec->versions[0]->version, 1);
    assert_int_equal(rec->versions[1]->version, 2);
    assert_int_equal(rec->versions[1]->created_at, 3002);
    uint8_t want[24];
    fill_sealed(want, sizeof(want), id, 2);
    assert_int_equal(rec->versions[1]->sealed.len, sizeof(want));
    assert_memory_equal(rec->versions[1]->sealed.data, want, sizeof(want));
    fill_sealed(want, sizeof(want), id, 1);
    assert_memory_equal(rec->versions[0]->sealed.data, want, sizeof(want));
    assert_int_equal(rec->updated_index, 5);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* Only usable keys rotate. */
    e_set_state(f->e, NULL, id, S_DEA, 10, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 7), 0);
    e_add_version(f->e, NULL, id, 3);
    assert_int_equal(apply1(f, 8), KR_ESTATE);
    char ghost[FSM_KEY_ID_LEN + 1];
    make_id(97, ghost);
    e_add_version(f->e, NULL, ghost, 2);
    assert_int_equal(apply1(f, 9), KR_ENOTFOUND);
    e_add_version(f->e, NULL, id, 3);
    f->e->ops[0].add_version.version = NULL;
    assert_int_equal(apply1(f, 10), KR_EINVAL);
    rec = get_key(f, id);
    assert_int_equal(rec->current_version, 2);
    keyraft__key_record__free_unpacked(rec, NULL);
}

static void test_dedup_returns_first_result(void **state)
{
    struct fx *f = *state;
    char id1[FSM_KEY_ID_LEN + 1], id2[FSM_KEY_ID_LEN + 1], id3[FSM_KEY_ID_LEN + 1];
    make_id(60, id1);
    make_id(61, id2);
    make_id(62, id3);
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);

    e_put_key(f->e, "client-req-1", id1, "once", FSM_DEFAULT_DOMAIN, S_ACT);
    struct fsm_result *r = apply_entry(f, 2);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, id1);
    assert_int_equal(r->ops[0].index, 2);

    /* The client's retry after a lost leader: the new leader drew a new id. */
    e_put_key(f->e, "client-req-1", id2, "once", FSM_DEFAULT_DOMAIN, S_ACT);
    r = apply_entry(f, 3);
    assert_non_null(r);
    assert_int_equal(r->index, 3);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, id1);
    assert_int_equal(r->ops[0].index, 2);
    assert_int_equal(store_applied_index(f->store), 3);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id2, &rec), KR_ENOTFOUND);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 1);

    /* Even with a different name, a retried id is the same request. */
    e_put_key(f->e, "client-req-1", id3, "twice", FSM_DEFAULT_DOMAIN, S_ACT);
    r = apply_entry(f, 4);
    assert_string_equal(r->ops[0].key_id, id1);
    assert_int_equal(r->ops[0].index, 2);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 1);

    /* A retry inside the same entry is deduplicated as well. */
    e_set_state(f->e, "client-req-2", id1, S_DEA, 50, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED,
                NULL);
    assert_int_equal(apply1(f, 5), 0);
    e_destroy(f->e, "client-req-3", id1, 60);
    e_destroy(f->e, "client-req-3", id1, 61); /* retried within one entry */
    r = apply_entry(f, 6);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[1].status, 0);
    assert_int_equal(r->ops[1].index, 6);
    rec = get_key(f, id1);
    assert_int_equal(rec->destroyed_at, 60);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* A rejection is remembered too, even after its cause went away. */
    e_put_key(f->e, "client-req-4", id2, "once", FSM_DEFAULT_DOMAIN, S_ACT);
    e_put_key(f->e, "client-req-5", id3, "other", "missing-domain", S_ACT);
    r = apply_entry(f, 7);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[1].status, KR_ENOTFOUND);
    e_domain(f->e, NULL, "missing-domain");
    assert_int_equal(apply1(f, 8), 0);
    e_put_key(f->e, "client-req-5", id3, "other", "missing-domain", S_ACT);
    r = apply_entry(f, 9);
    assert_int_equal(r->ops[0].status, KR_ENOTFOUND);
    assert_int_equal(r->ops[0].index, 7);
    assert_int_equal(fsm_get_key(f->store, id3, &rec), KR_ENOTFOUND);

    /* Dedup state survives a restart. */
    fx_close(f);
    fx_open(f);
    e_put_key(f->e, "client-req-4", id3, "third", FSM_DEFAULT_DOMAIN, S_ACT);
    r = apply_entry(f, 10);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, id2);
    assert_int_equal(r->ops[0].index, 7);
    assert_int_equal(fsm_get_key(f->store, id3, &rec), KR_ENOTFOUND);

    /* No request id: no deduplication. */
    e_add_version(f->e, NULL, id2, 2);
    assert_int_equal(apply1(f, 11), 0);
    e_add_version(f->e, NULL, id2, 2);
    assert_int_equal(apply1(f, 12), KR_ESTATE);
}

#define DAY_MS (24ull * 60 * 60 * 1000)

/* Creates key number |id_no| (named after it) under |req| in entry |index|
 * stamped |time_ms|; returns its outcome. */
static struct fsm_op_result create_at(struct fx *f, uint64_t index, uint64_t time_ms,
                                      const char *req, unsigned id_no)
{
    char id[FSM_KEY_ID_LEN + 1], name[32];
    make_id(id_no, id);
    snprintf(name, sizeof(name), "dd-%u", id_no);
    e_put_key(f->e, req, id, name, FSM_DEFAULT_DOMAIN, S_ACT);
    struct fsm_result *r = apply_entry_at(f, index, time_ms);
    assert_non_null(r);
    assert_int_equal(r->n, 1);
    return r->ops[0];
}

static void assert_made(const struct fsm_op_result *r, unsigned id_no)
{
    char id[FSM_KEY_ID_LEN + 1];
    make_id(id_no, id);
    assert_int_equal(r->status, 0);
    assert_string_equal(r->key_id, id);
}

/* Every deduplication record, of either layout. */
static size_t count_dedup_rows(struct store *s)
{
    return count_range(s, STORE_CF_META, "dedup", "dedux");
}

/* A retry is answered from its first attempt for at least a day by the
 * leaders' clocks (the entries' time_ms); after two, the records are gone, so
 * the store does not grow by one row per write forever. */
static void test_dedup_records_expire_by_day(void **state)
{
    struct fx *f = *state;
    struct fsm_op_result r, found;
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    /* Entries without a clock, as older nodes make them: the old layout. */
    r = create_at(f, 2, 0, "req-old", 100);
    assert_made(&r, 100);

    const uint64_t t0 = 20000 * DAY_MS + 5000;
    uint64_t idx = 3;
    r = create_at(f, idx++, t0, "req-a", 101);
    assert_made(&r, 101);
    for (unsigned e = 0; e < 5; e++) {
        for (unsigned i = 0; i < 8; i++) {
            char req[16], id[FSM_KEY_ID_LEN + 1], name[16];
            snprintf(req, sizeof(req), "bulk-%u", e * 8 + i);
            snprintf(name, sizeof(name), "bulk-%u", e * 8 + i);
            make_id(110 + e * 8 + i, id);
            e_put_key(f->e, req, id, name, FSM_DEFAULT_DOMAIN, S_ACT);
        }
        struct fsm_result *res = apply_entry_at(f, idx++, t0 + 1000);
        for (unsigned i = 0; i < 8; i++)
            assert_int_equal(res->ops[i].status, 0);
    }
    assert_int_equal(count_dedup_rows(f->store), 42);

    /* The next day, across a restart: every retry gets its first outcome,
     * the old layout's included, and adds no record. */
    fx_close(f);
    fx_open(f);
    r = create_at(f, idx++, t0 + DAY_MS, "req-old", 150);
    assert_made(&r, 100);
    r = create_at(f, idx++, t0 + DAY_MS, "req-a", 151);
    assert_made(&r, 101);
    assert_int_equal(r.index, 3);
    r = create_at(f, idx++, t0 + DAY_MS + 1, "req-b", 152);
    assert_made(&r, 152);
    assert_int_equal(fsm_find_dedup(f->fsm, "bulk-7", &found), 0);
    assert_made(&found, 117);
    assert_int_equal(count_dedup_rows(f->store), 43);

    /* Two days on: the first day's records and the old layout's are gone at
     * once, the second day's stay. A request id from the first day is now a
     * new request. */
    r = create_at(f, idx++, t0 + 2 * DAY_MS, "req-c", 153);
    assert_made(&r, 153);
    assert_int_equal(count_dedup_rows(f->store), 2);
    assert_int_equal(fsm_find_dedup(f->fsm, "bulk-7", &found), KR_ENOTFOUND);
    assert_int_equal(fsm_find_dedup(f->fsm, "req-old", &found), KR_ENOTFOUND);
    r = create_at(f, idx++, t0 + 2 * DAY_MS, "req-a", 154);
    assert_made(&r, 154);
    r = create_at(f, idx++, t0 + 2 * DAY_MS, "req-b", 155);
    assert_made(&r, 152);

    /* A clock behind (another leader's) moves nothing; its record goes to
     * the current day. */
    r = create_at(f, idx++, t0, "req-d", 156);
    assert_made(&r, 156);
    assert_int_equal(count_dedup_rows(f->store), 4);
    r = create_at(f, idx++, t0 + 3 * DAY_MS, "req-e", 157);
    assert_made(&r, 157);
    r = create_at(f, idx++, t0 + 3 * DAY_MS, "req-d", 158);
    assert_made(&r, 156);
    assert_int_equal(fsm_find_dedup(f->fsm, "req-b", &found), KR_ENOTFOUND);
    assert_int_equal(count_dedup_rows(f->store), 4);
}

static void test_replayed_entry_is_noop(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1], id2[FSM_KEY_ID_LEN + 1];
    make_id(70, id);
    make_id(71, id2);
    seed_key(f, id, "stable", S_PRE);
    uint8_t *before = NULL;
    size_t before_len = 0;
    assert_int_equal(store_get(f->store, STORE_CF_KEYS, id, FSM_KEY_ID_LEN, &before, &before_len),
                     0);

    /* Raft replays entries 1 and 2 after a restart that lost nothing. */
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_null(apply_entry(f, 1));
    e_set_state(f->e, NULL, id, S_ACT, 1, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    e_put_key(f->e, NULL, id2, "new", FSM_DEFAULT_DOMAIN, S_ACT);
    assert_null(apply_entry(f, 2));
    assert_int_equal(store_applied_index(f->store), 2);

    uint8_t *after = NULL;
    size_t after_len = 0;
    assert_int_equal(store_get(f->store, STORE_CF_KEYS, id, FSM_KEY_ID_LEN, &after, &after_len), 0);
    assert_int_equal(after_len, before_len);
    assert_memory_equal(after, before, before_len);
    free(before);
    free(after);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id2, &rec), KR_ENOTFOUND);

    /* The next new entry applies normally. */
    e_set_state(f->e, NULL, id, S_ACT, 1, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 3), 0);
}

static void test_undecodable_entry_skipped(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1];
    make_id(80, id);
    seed_key(f, id, "survivor", S_PRE);
    size_t keys = count_family(f->store, STORE_CF_KEYS);

    static const uint8_t garbage[] = {0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03};
    struct fsm_result sentinel = {0};
    struct fsm_result *r = &sentinel;
    f->next = 3;
    assert_int_equal(fsm_apply(f->fsm, garbage, sizeof(garbage), &r), 0);
    assert_null(r);
    assert_int_equal(store_applied_index(f->store), 3);

    /* A correct frame around a payload that does not parse. */
    uint8_t framed[16] = {'K', 'R', 'C', '1', 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff};
    assert_int_equal(command_entry_size(4), sizeof(framed));
    f->next = 4;
    assert_int_equal(fsm_apply(f->fsm, framed, sizeof(framed), &r), 0);
    assert_null(r);
    assert_int_equal(store_applied_index(f->store), 4);

    /* An empty entry. */
    f->next = 5;
    assert_int_equal(fsm_apply(f->fsm, garbage, 0, &r), 0);
    assert_null(r);
    assert_int_equal(store_applied_index(f->store), 5);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), keys);

    e_set_state(f->e, NULL, id, S_ACT, 1, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    assert_int_equal(apply1(f, 6), 0);
    assert_int_equal(key_state(f, id), S_ACT);
}

static void test_entry_ops_have_independent_outcomes(void **state)
{
    struct fx *f = *state;
    char a[FSM_KEY_ID_LEN + 1], b[FSM_KEY_ID_LEN + 1], c[FSM_KEY_ID_LEN + 1];
    make_id(90, a);
    make_id(91, b);
    make_id(92, c);
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    e_put_key(f->e, NULL, a, "first", FSM_DEFAULT_DOMAIN, S_PRE);
    e_put_key(f->e, NULL, b, "first", FSM_DEFAULT_DOMAIN, S_PRE); /* name taken by op 1 */
    e_set_state(f->e, NULL, a, S_ACT, 77, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    e_put_key(f->e, NULL, c, "third", FSM_DEFAULT_DOMAIN, S_PRE);
    struct fsm_result *r = apply_entry(f, 1);
    assert_non_null(r);
    assert_int_equal(r->n, 5);
    assert_int_equal(r->index, 1);
    static const int want[5] = {0, 0, KR_EEXIST, 0, 0};
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(r->ops[i].status, want[i]);
        assert_int_equal(r->ops[i].index, 1);
    }
    assert_string_equal(r->ops[1].key_id, a);
    assert_string_equal(r->ops[3].key_id, a);
    assert_string_equal(r->ops[4].key_id, c);
    assert_int_equal(store_applied_index(f->store), 1);
    assert_int_equal(key_state(f, a), S_ACT);
    assert_int_equal(key_state(f, c), S_PRE);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, b, &rec), KR_ENOTFOUND);
}

static void test_take_result(void **state)
{
    struct fx *f = *state;
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    struct fsm_result *r = apply_entry(f, 1);
    assert_non_null(r);
    assert_null(fsm_take_result(f->fsm, NULL));
    assert_null(fsm_take_result(f->fsm, f)); /* not the fsm's result */
    struct fsm_result *mine = fsm_take_result(f->fsm, r);
    assert_ptr_equal(mine, r);
    assert_null(fsm_take_result(f->fsm, r)); /* handed over once */
    /* The next apply must not free what the caller took. */
    e_domain(f->e, NULL, "second");
    struct fsm_result *r2 = apply_entry(f, 2);
    assert_non_null(r2);
    assert_int_equal(mine->index, 1);
    assert_int_equal(mine->ops[0].status, 0);
    free(mine);
}

/* Every family, entry by entry: two nodes fed the same log hold the same bytes. */
static void assert_same_family(struct store *s1, struct store *s2, enum store_cf cf)
{
    struct store_iter *i1 = NULL, *i2 = NULL;
    assert_int_equal(store_iter_new(s1, cf, NULL, 0, NULL, 0, &i1), 0);
    assert_int_equal(store_iter_new(s2, cf, NULL, 0, NULL, 0, &i2), 0);
    size_t n = 0;
    while (store_iter_valid(i1) && store_iter_valid(i2)) {
        size_t k1, k2, v1, v2;
        const uint8_t *a = store_iter_key(i1, &k1), *b = store_iter_key(i2, &k2);
        assert_int_equal(k1, k2);
        assert_memory_equal(a, b, k1);
        a = store_iter_value(i1, &v1);
        b = store_iter_value(i2, &v2);
        assert_int_equal(v1, v2);
        if (v1 > 0)
            assert_memory_equal(a, b, v1);
        store_iter_next(i1);
        store_iter_next(i2);
        n++;
    }
    assert_false(store_iter_valid(i1));
    assert_false(store_iter_valid(i2));
    assert_int_equal(store_iter_status(i1), 0);
    assert_int_equal(store_iter_status(i2), 0);
    store_iter_free(i1);
    store_iter_free(i2);
    if (cf == STORE_CF_KEYS)
        assert_true(n > 10);
}

/* A scripted log: creations, rotations, transitions, rejections, retries,
 * an undecodable entry. Returns the last index. */
static uint64_t play_log(struct fx *f)
{
    uint64_t idx = 0;
    char ids[24][FSM_KEY_ID_LEN + 1];
    for (unsigned i = 0; i < 24; i++)
        make_id(200 + i, ids[i]);
    e_domain(f->e, "d1", FSM_DEFAULT_DOMAIN);
    e_domain(f->e, "d2", "tenant");
    apply_entry(f, ++idx);
    for (unsigned i = 0; i < 24; i++) {
        char name[32], req[32];
        snprintf(name, sizeof(name), "key-%u", i % 20); /* 4 name clashes */
        snprintf(req, sizeof(req), "create-%u", i);
        e_put_key(f->e, req, ids[i], name, (i & 1) ? "tenant" : FSM_DEFAULT_DOMAIN,
                  (i % 3) ? S_ACT : S_PRE);
        if (f->e->n == 3 || i == 23)
            apply_entry(f, ++idx);
    }
    for (unsigned i = 0; i < 24; i += 2) {
        e_add_version(f->e, NULL, ids[i], 2);
        e_add_version(f->e, NULL, ids[i], 3);
        e_add_version(f->e, NULL, ids[i], 3); /* loses */
        apply_entry(f, ++idx);
    }
    uint8_t junk[24];
    memset(junk, 0x5a, sizeof(junk));
    f->next = ++idx;
    struct fsm_result *r = NULL;
    assert_int_equal(fsm_apply(f->fsm, junk, sizeof(junk), &r), 0);
    for (unsigned i = 0; i < 24; i++) {
        e_set_state(f->e, NULL, ids[i], (i % 4 == 0) ? S_CMP : S_DEA, 1000 + i,
                    KEYRAFT__REVOKE_REASON__SUPERSEDED, "m");
        e_destroy(f->e, NULL, ids[i], 2000 + i);
        if (i % 5 == 0)
            e_set_state(f->e, NULL, ids[i], S_ACT, 1, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED,
                        NULL);
        apply_entry(f, ++idx);
    }
    for (unsigned i = 0; i < 6; i++) {
        char req[32];
        snprintf(req, sizeof(req), "create-%u", i); /* retries */
        e_put_key(f->e, req, ids[23 - i], "retry", FSM_DEFAULT_DOMAIN, S_ACT);
        apply_entry(f, ++idx);
    }
    return idx;
}

static void test_determinism(void **state)
{
    (void)state;
    struct fx *f1 = fx_new(), *f2 = fx_new();
    uint64_t last1 = play_log(f1);
    uint64_t last2 = play_log(f2);
    assert_int_equal(last1, last2);
    assert_int_equal(store_applied_index(f1->store), last1);
    assert_int_equal(store_applied_index(f2->store), last2);
    /* Once from memory, once from disk after a restart of one node. */
    for (int pass = 0; pass < 2; pass++) {
        for (int cf = 0; cf < STORE_CF_COUNT; cf++)
            assert_same_family(f1->store, f2->store, (enum store_cf)cf);
        fx_close(f2);
        fx_open(f2);
    }
    assert_int_equal(fx_free(f1), 0);
    assert_int_equal(fx_free(f2), 0);
}

static void test_transition_table(void **state)
{
    (void)state;
    /* The KMIP / SP 800-57 state model: rows = from, columns = to. */
    enum { N = 7 };
    static const int allowed[N][N] = {
        /*            unsp pre act dea cmp des dcm */
        /* unsp */ {0, 0, 0, 0, 0, 0, 0},
        /* pre  */ {0, 0, 1, 1, 1, 1, 0},
        /* act  */ {0, 0, 0, 1, 1, 0, 0},
        /* dea  */ {0, 0, 0, 0, 1, 1, 0},
        /* cmp  */ {0, 0, 0, 0, 0, 0, 1},
        /* des  */ {0, 0, 0, 0, 0, 0, 1},
        /* dcm  */ {0, 0, 0, 0, 0, 0, 0},
    };
    for (int from = 0; from < N; from++)
        for (int to = 0; to < N; to++) {
            int got = fsm_transition_allowed((Keyraft__KeyState)from, (Keyraft__KeyState)to);
            if (!!got != allowed[from][to])
                fail_msg("transition %d -> %d: got %d, want %d", from, to, got,
                         allowed[from][to]);
        }
    assert_false(fsm_transition_allowed(S_PRE, (Keyraft__KeyState)42));
    assert_false(fsm_transition_allowed((Keyraft__KeyState)42, S_ACT));
    assert_false(fsm_transition_allowed((Keyraft__KeyState)-1, S_DES));
}

static void test_schema_helpers(void **state)
{
    (void)state;
    static const uint8_t r14[14] = {0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                                    0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76};
    char id[FSM_KEY_ID_LEN + 1];
    fsm_format_key_id(0xbeef, r14, id);
    assert_string_equal(id, "beef000123456789abcdeffedcba9876");
    assert_true(fsm_key_id_valid(id));
    /* a new key's id: shard, 48-bit milliseconds, 64 random bits; an id made
     * a millisecond later sorts later whatever the random bits */
    static const uint8_t ones[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    static const uint8_t zeros[8] = {0};
    char earlier[FSM_KEY_ID_LEN + 1];
    fsm_make_key_id(0x0001, 0x019afc1e2b3cULL, r14, id);
    assert_string_equal(id, "0001019afc1e2b3c000123456789abcd");
    assert_true(fsm_key_id_valid(id));
    fsm_make_key_id(0, 1764000000000ULL, ones, earlier);
    fsm_make_key_id(0, 1764000000001ULL, zeros, id);
    assert_true(strcmp(earlier, id) < 0);
    assert_false(fsm_key_id_valid(""));
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba987"));   /* 31 */
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba98765")); /* 33 */
    assert_false(fsm_key_id_valid("BEEF000123456789abcdeffedcba9876"));
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba987g"));
    /* the characters just outside 0-9 and a-f */
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba987/"));
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba987:"));
    assert_false(fsm_key_id_valid("beef000123456789abcdeffedcba987`"));
    assert_false(fsm_key_id_valid("../../000123456789abcdeffedcba98"));

    uint8_t buf[16];
    size_t n = fsm_name_key(buf, sizeof(buf), "dom", "nm");
    assert_int_equal(n, 6);
    assert_memory_equal(buf, "dom\0nm", 6);
    assert_int_equal(fsm_name_key(buf, sizeof(buf), "a-long-domain", "name"), 0);
    n = fsm_attr_prefix(buf, sizeof(buf), FSM_INDEX_TAG, "d", "k", "v");
    assert_int_equal(n, 8);
    assert_memory_equal(buf, "t\0d\0k\0v\0", 8);
    n = fsm_attr_prefix(buf, sizeof(buf), FSM_INDEX_STATE, "d", "2", NULL);
    assert_int_equal(n, 6);
    assert_memory_equal(buf, "s\0d\0" "2\0", 6);
}

/* Poisons key |id|'s record so that reading it fails like a bad disk. */
static void corrupt_record(struct fx *f, const char *id)
{
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, STORE_CF_KEYS, id, FSM_KEY_ID_LEN, "\xff\xff\xff", 3);
    assert_int_equal(store_batch_commit(f->store, b, store_applied_index(f->store)), 0);
    store_batch_free(b);
}

static void restore_record(struct fx *f, Keyraft__KeyRecord *rec)
{
    size_t len = keyraft__key_record__get_packed_size(rec);
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    keyraft__key_record__pack(rec, buf);
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, STORE_CF_KEYS, rec->id, FSM_KEY_ID_LEN, buf, len);
    assert_int_equal(store_batch_commit(f->store, b, store_applied_index(f->store)), 0);
    store_batch_free(b);
    free(buf);
}

static void test_crash_mid_entry_resumes_at_position(void **state)
{
    struct fx *f = *state;
    char x[FSM_KEY_ID_LEN + 1], a[FSM_KEY_ID_LEN + 1], b[FSM_KEY_ID_LEN + 1];
    make_id(100, x);
    make_id(101, a);
    make_id(102, b);
    seed_key(f, x, "victim", S_PRE);
    Keyraft__KeyRecord *saved = get_key(f, x);
    corrupt_record(f, x);

    /* Entry 3: op 0 lands, op 1 hits the store failure, op 2 never runs. */
    e_put_key(f->e, "req-a", a, "made-before-crash", FSM_DEFAULT_DOMAIN, S_ACT);
    e_set_state(f->e, NULL, x, S_ACT, 42, KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED, NULL);
    e_put_key(f->e, NULL, b, "made-after-crash", FSM_DEFAULT_DOMAIN, S_ACT);
    uint8_t *entry = NULL;
    size_t entry_len = 0;
    assert_int_equal(command_batch_encode(f->e->cmds, f->e->n, malloc, &entry, &entry_len), 0);
    memset(f->e, 0, sizeof(*f->e));
    f->next = 3;
    struct fsm_result *r = NULL;
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), KR_EIO);
    assert_null(r);
    /* The entry is not applied, but its first op is in the store. */
    assert_int_equal(store_applied_index(f->store), 2);
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "made-before-crash", found), 0);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "made-after-crash", found),
                     KR_ENOTFOUND);

    /* The node restarts (the disk got better), raft hands it entry 3 again. */
    restore_record(f, saved);
    keyraft__key_record__free_unpacked(saved, NULL);
    fx_close(f);
    fx_open(f);
    assert_int_equal(store_applied_index(f->store), 2);
    f->next = 3;
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), 0);
    assert_non_null(r);
    assert_int_equal(r->n, 3);
    /* Op 0 is not applied twice (that would say KR_EEXIST). */
    assert_int_equal(r->ops[0].status, KR_EUNAVAIL);
    assert_int_equal(r->ops[1].status, 0);
    assert_int_equal(r->ops[2].status, 0);
    assert_int_equal(store_applied_index(f->store), 3);
    assert_int_equal(key_state(f, x), S_ACT);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "made-before-crash", found), 0);
    assert_string_equal(found, a);
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "made-after-crash", found), 0);
    assert_string_equal(found, b);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 3);
    Keyraft__KeyRecord *rec = get_key(f, a);
    assert_int_equal(rec->updated_index, 3);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* The client's retry of op 0 learns its real outcome from dedup. */
    e_put_key(f->e, "req-a", b, "made-before-crash", FSM_DEFAULT_DOMAIN, S_ACT);
    r = apply_entry(f, 4);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, a);
    assert_int_equal(r->ops[0].index, 3);

    /* Once done, entry 3 is a replay. */
    f->next = 3;
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), 0);
    assert_null(r);
    free(entry);
}

/* A run of creates commits as one batch: the run still sees its own names,
 * ids and request ids, and a store failure inside it leaves none of them. */
static void test_create_run_sees_itself(void **state)
{
    struct fx *f = *state;
    char a[FSM_KEY_ID_LEN + 1], b[FSM_KEY_ID_LEN + 1], c[FSM_KEY_ID_LEN + 1],
        d[FSM_KEY_ID_LEN + 1], x[FSM_KEY_ID_LEN + 1];
    make_id(120, a);
    make_id(121, b);
    make_id(122, c);
    make_id(123, d);
    make_id(124, x);
    seed_key(f, x, "victim", S_PRE);
    e_domain(f->e, NULL, "other");
    e_put_key(f->e, "req-a", a, "run-a", FSM_DEFAULT_DOMAIN, S_PRE);
    e_put_key(f->e, NULL, b, "run-a", FSM_DEFAULT_DOMAIN, S_PRE);     /* name taken by op 0 */
    e_put_key(f->e, NULL, a, "run-a2", FSM_DEFAULT_DOMAIN, S_PRE);    /* id taken by op 0 */
    e_put_key(f->e, "req-a", c, "run-a3", FSM_DEFAULT_DOMAIN, S_PRE); /* retry of op 0 */
    e_put_key(f->e, NULL, c, "run-a", "other", S_PRE);                /* another domain */
    e_put_key(f->e, NULL, d, "run-d", "no-such-domain", S_PRE);
    struct fsm_result *r = apply_entry(f, 3);
    assert_non_null(r);
    assert_int_equal(r->n, 7);
    static const int want[7] = {0, 0, KR_EEXIST, KR_EEXIST, 0, 0, KR_ENOTFOUND};
    for (size_t i = 0; i < 7; i++)
        if (r->ops[i].status != want[i])
            fail_msg("op %zu: status %d, want %d", i, r->ops[i].status, want[i]);
    assert_string_equal(r->ops[4].key_id, a);
    assert_int_equal(r->ops[4].index, 3);
    assert_string_equal(r->ops[5].key_id, c);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 3); /* x, a, c */
    assert_int_equal(store_applied_index(f->store), 3);

    /* Op 1 of the next run reads a corrupt record: none of the run lands,
     * and raft's retry after the repair applies each op once. */
    Keyraft__KeyRecord *saved = get_key(f, x);
    corrupt_record(f, x);
    e_put_key(f->e, NULL, b, "run-b", FSM_DEFAULT_DOMAIN, S_PRE);
    e_put_key(f->e, NULL, x, "run-x", FSM_DEFAULT_DOMAIN, S_PRE);
    e_put_key(f->e, NULL, d, "run-d", FSM_DEFAULT_DOMAIN, S_PRE);
    uint8_t *entry = NULL;
    size_t entry_len = 0;
    assert_int_equal(command_batch_encode(f->e->cmds, f->e->n, malloc, &entry, &entry_len), 0);
    memset(f->e, 0, sizeof(*f->e));
    f->next = 4;
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), KR_EIO);
    char found[FSM_KEY_ID_LEN + 1];
    assert_int_equal(fsm_find_name(f->store, FSM_DEFAULT_DOMAIN, "run-b", found), KR_ENOTFOUND);
    assert_int_equal(store_applied_index(f->store), 3);
    restore_record(f, saved);
    keyraft__key_record__free_unpacked(saved, NULL);
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), 0);
    assert_non_null(r);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[1].status, KR_EEXIST); /* x exists */
    assert_int_equal(r->ops[2].status, 0);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 5);
    assert_int_equal(store_applied_index(f->store), 4);
    free(entry);
}

static void assert_op(const struct fsm_result *r, size_t op, int status, const char *key_id,
                      uint64_t index)
{
    if (r->ops[op].status != status)
        fail_msg("op %zu: status %d, want %d", op, r->ops[op].status, status);
    if (key_id != NULL)
        assert_string_equal(r->ops[op].key_id, key_id);
    if (index != 0)
        assert_int_equal(r->ops[op].index, index);
}

/* A run of creates reads the store ahead, in one batch per column family:
 * each op must get the answer its own reads would, whatever the run holds.
 * Retries of either day's records, names and ids taken in the store or in
 * the run, a name and a request id too long for a row, and a second run in
 * the same entry that must see what the first committed. */
static void test_create_run_reads_ahead(void **state)
{
    struct fx *f = *state;
    char id[12][FSM_KEY_ID_LEN + 1];
    for (unsigned i = 0; i < 12; i++)
        make_id(200 + i, id[i]);
    const uint64_t t0 = 20500 * DAY_MS + 7000;
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    e_put_key(f->e, "req-1", id[0], "a-name", FSM_DEFAULT_DOMAIN, S_ACT);
    e_put_key(f->e, "req-2", id[1], "b-name", FSM_DEFAULT_DOMAIN, S_ACT);
    struct fsm_result *r = apply_entry_at(f, 2, t0);
    assert_op(r, 0, 0, id[0], 2);
    assert_op(r, 1, 0, id[1], 2);
    e_put_key(f->e, NULL, id[2], "taken", FSM_DEFAULT_DOMAIN, S_ACT);
    r = apply_entry_at(f, 3, t0 + 1);
    assert_op(r, 0, 0, id[2], 3);

    /* The next day: one entry, a run of seven creates, then another op. */
    static char long_name[1100], long_req[600];
    memset(long_name, 'n', sizeof(long_name) - 1);
    memset(long_req, 'q', sizeof(long_req) - 1);
    e_put_key(f->e, "req-1", id[3], "other", FSM_DEFAULT_DOMAIN, S_ACT);  /* yesterday's retry */
    e_put_key(f->e, "req-3", id[4], "taken", FSM_DEFAULT_DOMAIN, S_ACT);  /* name in the store */
    e_put_key(f->e, "req-4", id[2], "c-again", FSM_DEFAULT_DOMAIN, S_ACT); /* id in the store */
    e_put_key(f->e, "req-5", id[5], "fresh", FSM_DEFAULT_DOMAIN, S_ACT);
    e_put_key(f->e, "req-5", id[6], "fresh2", FSM_DEFAULT_DOMAIN, S_ACT); /* retry in the run */
    e_put_key(f->e, NULL, id[6], "x", FSM_DEFAULT_DOMAIN, S_ACT);
    f->e->ops[5].rec.name = long_name; /* no name row fits it */
    e_put_key(f->e, NULL, id[7], "long-req", FSM_DEFAULT_DOMAIN, S_ACT);
    f->e->ops[6].cmd.request_id = long_req; /* no dedup row fits it: a new request */
    e_domain(f->e, NULL, "second");
    r = apply_entry_at(f, 4, t0 + DAY_MS);
    assert_int_equal(r->n, 8);
    assert_op(r, 0, 0, id[0], 2);
    assert_op(r, 1, KR_EEXIST, NULL, 0);
    assert_op(r, 2, KR_EEXIST, NULL, 0);
    assert_op(r, 3, 0, id[5], 4);
    assert_op(r, 4, 0, id[5], 4);
    assert_op(r, 5, KR_EINVAL, NULL, 0);
    assert_op(r, 6, 0, id[7], 4);
    assert_op(r, 7, 0, NULL, 0);

    /* A run after another op of the same entry sees the first run's rows. */
    e_put_key(f->e, "req-5", id[8], "y", FSM_DEFAULT_DOMAIN, S_ACT);     /* today's record */
    e_put_key(f->e, NULL, id[9], "fresh", FSM_DEFAULT_DOMAIN, S_ACT);    /* name made above */
    e_put_key(f->e, "req-2", id[10], "z", FSM_DEFAULT_DOMAIN, S_ACT);    /* yesterday's */
    e_put_key(f->e, "req-6", id[7], "w", FSM_DEFAULT_DOMAIN, S_ACT);     /* id made above */
    e_domain(f->e, NULL, "third");
    e_put_key(f->e, "req-7", id[11], "fresh", "second", S_ACT); /* domain made above */
    e_put_key(f->e, "req-8", id[10], "v", "second", S_ACT);
    r = apply_entry_at(f, 5, t0 + DAY_MS + 1);
    assert_op(r, 0, 0, id[5], 4);
    assert_op(r, 1, KR_EEXIST, NULL, 0);
    assert_op(r, 2, 0, id[1], 2);
    assert_op(r, 3, KR_EEXIST, NULL, 0);
    assert_op(r, 4, 0, NULL, 0);
    assert_op(r, 5, 0, id[11], 5);
    assert_op(r, 6, 0, id[10], 5);

    /* What landed: a, b, taken, fresh, long-req, and the two in "second". */
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 7);
    struct fsm_op_result found;
    assert_int_equal(fsm_find_dedup(f->fsm, long_req, &found), KR_ENOTFOUND);
    assert_int_equal(fsm_find_dedup(f->fsm, "req-3", &found), 0);
    assert_int_equal(found.status, KR_EEXIST);
}

static void test_retry_without_restart_resumes_too(void **state)
{
    struct fx *f = *state;
    char x[FSM_KEY_ID_LEN + 1], a[FSM_KEY_ID_LEN + 1];
    make_id(110, x);
    make_id(111, a);
    seed_key(f, x, "victim", S_PRE);
    Keyraft__KeyRecord *saved = get_key(f, x);
    corrupt_record(f, x);
    e_put_key(f->e, NULL, a, "once-only", FSM_DEFAULT_DOMAIN, S_ACT);
    e_destroy(f->e, NULL, x, 5);
    uint8_t *entry = NULL;
    size_t entry_len = 0;
    assert_int_equal(command_batch_encode(f->e->cmds, f->e->n, malloc, &entry, &entry_len), 0);
    memset(f->e, 0, sizeof(*f->e));
    f->next = 3;
    struct fsm_result *r = NULL;
    /* raft retries a failed apply() with the same entry. */
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), KR_EIO);
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), KR_EIO);
    restore_record(f, saved);
    keyraft__key_record__free_unpacked(saved, NULL);
    assert_int_equal(fsm_apply(f->fsm, entry, entry_len, &r), 0);
    assert_non_null(r);
    assert_int_equal(r->ops[0].status, KR_EUNAVAIL);
    assert_int_equal(r->ops[1].status, 0);
    assert_int_equal(key_state(f, x), S_DES);
    assert_int_equal(store_applied_index(f->store), 3);
    assert_int_equal(count_family(f->store, STORE_CF_KEYS), 2);
    free(entry);
}

/* The node registry: add, change role, address clashes, remove. */
static void test_node_registry(void **state)
{
    struct fx *f = *state;
    const Keyraft__NodeRole V = KEYRAFT__NODE_ROLE__NODE_VOTER, S = KEYRAFT__NODE_ROLE__NODE_STANDBY;
    e_put_node(f->e, "n1", 1, "127.0.0.1:7301", "127.0.0.1:7300", V);
    e_put_node(f->e, "n2", 2, "127.0.0.1:7311", "127.0.0.1:7310", V);
    e_put_node(f->e, "n3", 3, "127.0.0.1:7311", "127.0.0.1:7320", V);   /* raft addr taken */
    e_put_node(f->e, "n4", 4, "127.0.0.1:7341", "127.0.0.1:7310", V);   /* client addr taken */
    e_put_node(f->e, "n5", 5, "127.0.0.1:7351", "127.0.0.1:7350",
               KEYRAFT__NODE_ROLE__NODE_ROLE_UNSPECIFIED);                 /* no role */
    e_put_node(f->e, "n6", 0, "127.0.0.1:7361", "127.0.0.1:7360", V);   /* id 0 */
    struct fsm_result *r = apply_entry(f, 1);
    assert_non_null(r);
    assert_int_equal(r->n, 6);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[1].status, 0);
    assert_int_equal(r->ops[2].status, KR_EEXIST);
    assert_int_equal(r->ops[3].status, KR_EEXIST);
    assert_int_equal(r->ops[4].status, KR_EINVAL);
    assert_int_equal(r->ops[5].status, KR_EINVAL);

    struct fsm_nodes all;
    assert_int_equal(fsm_list_nodes(f->store, &all), 0);
    assert_int_equal(all.n, 2);
    assert_int_equal(all.nodes[0]->id, 1);
    assert_int_equal(all.nodes[1]->id, 2);
    assert_string_equal(all.nodes[1]->client_address, "127.0.0.1:7310");
    fsm_nodes_free(&all);

    /* Same node, new role: its own addresses are no clash. */
    e_put_node(f->e, "n2-standby", 2, "127.0.0.1:7311", "127.0.0.1:7310", S);
    e_remove_node(f->e, "rm1", 1);
    e_remove_node(f->e, "rm9", 9);
    r = apply_entry(f, 2);
    assert_non_null(r);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[1].status, 0);
    assert_int_equal(r->ops[2].status, KR_ENOTFOUND);
    Keyraft__NodeRecord *n2 = NULL;
    assert_int_equal(fsm_get_node(f->store, 2, &n2), 0);
    assert_int_equal(n2->role, S);
    keyraft__node_record__free_unpacked(n2, NULL);
    assert_int_equal(fsm_get_node(f->store, 1, &n2), KR_ENOTFOUND);

    /* Survives a restart. */
    fx_close(f);
    fx_open(f);
    assert_int_equal(fsm_list_nodes(f->store, &all), 0);
    assert_int_equal(all.n, 1);
    assert_int_equal(all.nodes[0]->id, 2);
    fsm_nodes_free(&all);
}

/* ---- governance ------------------------------------------------------------- */

static Keyraft__PrincipalInfo *get_principal(struct fx *f, const char *name)
{
    Keyraft__PrincipalInfo *p = NULL;
    assert_int_equal(fsm_get_principal(f->store, name, &p), 0);
    assert_non_null(p);
    return p;
}

static const Keyraft__PrincipalCert *cert_of(const Keyraft__PrincipalInfo *p, const char *serial)
{
    for (size_t i = 0; i < p->n_certs; i++)
        if (strcmp(p->certs[i]->serial, serial) == 0)
            return p->certs[i];
    fail_msg("principal %s has no certificate %s", p->name, serial);
    return NULL;
}

static Keyraft__ApprovalRecord *get_approval(struct fx *f, const char *id)
{
    Keyraft__ApprovalRecord *a = NULL;
    assert_int_equal(fsm_get_approval(f->store, id, &a), 0);
    assert_non_null(a);
    assert_non_null(a->info);
    return a;
}

static Keyraft__ApprovalState approval_state(struct fx *f, const char *id)
{
    Keyraft__ApprovalRecord *a = get_approval(f, id);
    Keyraft__ApprovalState s = a->info->state;
    keyraft__approval_record__free_unpacked(a, NULL);
    return s;
}

#define AP_PENDING KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING
#define AP_APPROVED KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED
#define AP_DONE KEYRAFT__APPROVAL_STATE__APPROVAL_DONE
#define AP_DENIED KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED

static void test_principal_create_and_merge(void **state)
{
    struct fx *f = *state;
    unsigned long epoch = fsm_governance_epoch();
    struct op *o = e_principal(f->e, "req-p1", "alice", "officer,user", "payments,hr");
    p_cert(o, "0a01", NULL, 0);
    assert_int_equal(apply1(f, 1), 0);
    assert_true(fsm_governance_epoch() > epoch);

    Keyraft__PrincipalInfo *p = get_principal(f, "alice");
    assert_string_equal(p->name, "alice");
    assert_int_equal(p->n_roles, 2);
    assert_string_equal(p->roles[0], "officer");
    assert_string_equal(p->roles[1], "user");
    assert_int_equal(p->n_groups, 2);
    assert_int_equal(p->n_certs, 1);
    assert_string_equal(p->certs[0]->serial, "0a01");
    assert_false(p->certs[0]->revoked);
    assert_string_equal(p->created_by, "root-admin");
    keyraft__principal_info__free_unpacked(p, NULL);

    /* A second certificate, roles listed in another order: merged. */
    epoch = fsm_governance_epoch();
    o = e_principal(f->e, NULL, "alice", "user,officer", "hr,payments");
    p_cert(o, "0a02", NULL, 0);
    assert_int_equal(apply1(f, 2), 0);
    assert_true(fsm_governance_epoch() > epoch);
    p = get_principal(f, "alice");
    assert_int_equal(p->n_certs, 2);
    assert_false(cert_of(p, "0a01")->revoked);
    assert_false(cert_of(p, "0a02")->revoked);
    keyraft__principal_info__free_unpacked(p, NULL);

    /* Revoking the first one. */
    o = e_principal(f->e, NULL, "alice", "officer,user", "payments,hr");
    p_cert(o, "0a01", "root-admin", 5000);
    assert_int_equal(apply1(f, 3), 0);
    p = get_principal(f, "alice");
    assert_int_equal(p->n_certs, 2);
    assert_true(cert_of(p, "0a01")->revoked);
    assert_int_equal(cert_of(p, "0a01")->revoked_at, 5000);
    assert_string_equal(cert_of(p, "0a01")->revoked_by, "root-admin");
    assert_false(cert_of(p, "0a02")->revoked);
    keyraft__principal_info__free_unpacked(p, NULL);

    /* A later put listing it unrevoked (a stale leader's view) does not
     * bring it back, nor does a second revocation rewrite who revoked it. */
    o = e_principal(f->e, NULL, "alice", "officer,user", "payments,hr");
    p_cert(o, "0a01", NULL, 0);
    p_cert(o, "0a03", NULL, 0);
    assert_int_equal(apply1(f, 4), 0);
    p = get_principal(f, "alice");
    assert_int_equal(p->n_certs, 3);
    assert_true(cert_of(p, "0a01")->revoked);
    keyraft__principal_info__free_unpacked(p, NULL);
    o = e_principal(f->e, NULL, "alice", "officer,user", "payments,hr");
    p_cert(o, "0a01", "someone-else", 6000);
    assert_int_equal(apply1(f, 5), 0);
    p = get_principal(f, "alice");
    assert_int_equal(p->n_certs, 3);
    assert_true(cert_of(p, "0a01")->revoked);
    assert_int_equal(cert_of(p, "0a01")->revoked_at, 5000);
    assert_string_equal(cert_of(p, "0a01")->revoked_by, "root-admin");
    assert_false(cert_of(p, "0a03")->revoked);
    keyraft__principal_info__free_unpacked(p, NULL);

    /* Another shape under the same name is a different principal: refused,
     * nothing changes. */
    o = e_principal(f->e, NULL, "alice", "officer", "payments,hr");
    p_cert(o, "0a04", NULL, 0);
    assert_int_equal(apply1(f, 6), KR_EEXIST);
    o = e_principal(f->e, NULL, "alice", "officer,user", "payments");
    p_cert(o, "0a04", NULL, 0);
    assert_int_equal(apply1(f, 7), KR_EEXIST);
    o = e_principal(f->e, NULL, "alice", "auditor", "payments,hr");
    p_cert(o, "0a01", NULL, 0);
    assert_int_equal(apply1(f, 8), KR_EEXIST);
    p = get_principal(f, "alice");
    assert_int_equal(p->n_roles, 2);
    assert_int_equal(p->n_groups, 2);
    assert_int_equal(p->n_certs, 3);
    assert_true(cert_of(p, "0a01")->revoked);
    keyraft__principal_info__free_unpacked(p, NULL);

    /* Invalid shapes never land. */
    o = e_principal(f->e, NULL, "bob", "admin,user", NULL);
    p_cert(o, "0b01", NULL, 0);
    assert_int_equal(apply1(f, 9), KR_EINVAL);
    o = e_principal(f->e, NULL, "node-7", "auditor", NULL);
    p_cert(o, "0b02", NULL, 0);
    assert_int_equal(apply1(f, 10), KR_EINVAL);
    o = e_principal(f->e, NULL, "carol", "", NULL);
    assert_int_equal(apply1(f, 11), KR_EINVAL);
    Keyraft__PrincipalInfo *none = NULL;
    assert_int_equal(fsm_get_principal(f->store, "bob", &none), KR_ENOTFOUND);
    assert_int_equal(fsm_get_principal(f->store, "node-7", &none), KR_ENOTFOUND);
    assert_int_equal(fsm_get_principal(f->store, "carol", &none), KR_ENOTFOUND);
    assert_int_equal(fsm_get_principal(f->store, "", &none), KR_ENOTFOUND);
    assert_null(none);

    /* The registry lists by name. */
    o = e_principal(f->e, NULL, "admin1", "admin", NULL);
    p_cert(o, "0c01", NULL, 0);
    assert_int_equal(apply1(f, 12), 0);
    /* A principal registered without a certificate gets its first by merge. */
    e_principal(f->e, NULL, "dave", "auditor", NULL);
    assert_int_equal(apply1(f, 13), 0);
    p = get_principal(f, "dave");
    assert_int_equal(p->n_certs, 0);
    keyraft__principal_info__free_unpacked(p, NULL);
    o = e_principal(f->e, NULL, "dave", "auditor", NULL);
    p_cert(o, "0d01", NULL, 0);
    assert_int_equal(apply1(f, 14), 0);
    p = get_principal(f, "dave");
    assert_int_equal(p->n_certs, 1);
    assert_string_equal(p->certs[0]->serial, "0d01");
    keyraft__principal_info__free_unpacked(p, NULL);
    struct fsm_list l;
    assert_int_equal(fsm_list_principals(f->store, 10, &l), 0);
    assert_int_equal(l.n, 3);
    assert_false(l.more);
    assert_string_equal(((Keyraft__PrincipalInfo *)l.items[0])->name, "admin1");
    assert_string_equal(((Keyraft__PrincipalInfo *)l.items[1])->name, "alice");
    assert_string_equal(((Keyraft__PrincipalInfo *)l.items[2])->name, "dave");
    fsm_list_free(&l);
    assert_int_equal(fsm_list_principals(f->store, 1, &l), 0);
    assert_int_equal(l.n, 1);
    assert_true(l.more);
    fsm_list_free(&l);
    assert_int_equal(l.n, 0);
}

static void test_governance_rules(void **state)
{
    struct fx *f = *state;
    Keyraft__GovernanceRecord *g = NULL;
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 0);
    keyraft__governance_record__free_unpacked(g, NULL);

    unsigned long epoch = fsm_governance_epoch();
    struct op *o = e_governance(f->e, NULL);
    g_rule(o, "export", 2, "officer");
    assert_int_equal(apply1(f, 1), 0);
    assert_true(fsm_governance_epoch() > epoch);
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 1);
    assert_string_equal(g->rules[0]->operation, "export");
    assert_int_equal(g->rules[0]->required, 2);
    assert_string_equal(g->rules[0]->approver_role, "officer");
    assert_int_equal(g->rules[0]->ttl_ms, 60000);
    keyraft__governance_record__free_unpacked(g, NULL);

    /* Upsert by operation: export replaced, destroy added. */
    o = e_governance(f->e, NULL);
    g_rule(o, "destroy", 3, "officer");
    g_rule(o, "export", 3, "admin");
    assert_int_equal(apply1(f, 2), 0);
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 2);
    int seen_export = 0, seen_destroy = 0;
    for (size_t i = 0; i < g->n_rules; i++) {
        if (strcmp(g->rules[i]->operation, "export") == 0) {
            seen_export++;
            assert_int_equal(g->rules[i]->required, 3);
            assert_string_equal(g->rules[i]->approver_role, "admin");
        } else if (strcmp(g->rules[i]->operation, "destroy") == 0) {
            seen_destroy++;
            assert_int_equal(g->rules[i]->required, 3);
        }
    }
    assert_int_equal(seen_export, 1);
    assert_int_equal(seen_destroy, 1);
    keyraft__governance_record__free_unpacked(g, NULL);

    /* required 0 removes the rule. */
    epoch = fsm_governance_epoch();
    o = e_governance(f->e, NULL);
    g_rule(o, "export", 0, "officer");
    assert_int_equal(apply1(f, 3), 0);
    assert_true(fsm_governance_epoch() > epoch);
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 1);
    assert_string_equal(g->rules[0]->operation, "destroy");
    keyraft__governance_record__free_unpacked(g, NULL);

    /* Malformed rules change nothing. */
    o = e_governance(f->e, NULL);
    g_rule(o, "encrypt", 2, "officer");
    assert_int_equal(apply1(f, 4), KR_EINVAL);
    o = e_governance(f->e, NULL);
    g_rule(o, "export", 2, "root");
    assert_int_equal(apply1(f, 5), KR_EINVAL);
    o = e_governance(f->e, NULL);
    g_rule(o, "export", 17, "officer");
    assert_int_equal(apply1(f, 6), KR_EINVAL);
    o = e_governance(f->e, NULL);
    g_rule(o, "export", 2, "officer");
    g_rule(o, "destroy", 0, "nobody"); /* one bad rule spoils the command */
    assert_int_equal(apply1(f, 7), KR_EINVAL);
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 1);
    assert_string_equal(g->rules[0]->operation, "destroy");
    assert_int_equal(g->rules[0]->required, 3);
    keyraft__governance_record__free_unpacked(g, NULL);

    /* Removing the last rule leaves an empty record. */
    o = e_governance(f->e, NULL);
    g_rule(o, "destroy", 0, "officer");
    assert_int_equal(apply1(f, 8), 0);
    assert_int_equal(fsm_get_governance(f->store, &g), 0);
    assert_int_equal(g->n_rules, 0);
    keyraft__governance_record__free_unpacked(g, NULL);
}

static void test_approval_votes(void **state)
{
    struct fx *f = *state;
    e_create_approval(f->e, NULL, "ap1", "alice", 2, 10000);
    assert_int_equal(apply1(f, 1), 0);
    Keyraft__ApprovalRecord *a = get_approval(f, "ap1");
    assert_int_equal(a->info->state, AP_PENDING);
    assert_string_equal(a->info->requester, "alice");
    assert_int_equal(a->info->required, 2);
    assert_int_equal(a->info->n_votes, 0);
    keyraft__approval_record__free_unpacked(a, NULL);

    /* Created once; only pending, with a quorum and a valid id. */
    e_create_approval(f->e, NULL, "ap1", "mallory", 1, 10000);
    assert_int_equal(apply1(f, 2), KR_EEXIST);
    struct op *o = e_create_approval(f->e, NULL, "ap-x", "mallory", 1, 10000);
    o->ainfo.state = AP_APPROVED;
    assert_int_equal(apply1(f, 3), KR_EINVAL);
    e_create_approval(f->e, NULL, "ap-y", "mallory", 0, 10000);
    assert_int_equal(apply1(f, 4), KR_EINVAL);
    e_create_approval(f->e, NULL, "ap z", "mallory", 1, 10000);
    assert_int_equal(apply1(f, 5), KR_EINVAL);
    Keyraft__ApprovalRecord *none = NULL;
    assert_int_equal(fsm_get_approval(f->store, "ap-x", &none), KR_ENOTFOUND);
    assert_int_equal(fsm_get_approval(f->store, "ap-y", &none), KR_ENOTFOUND);
    a = get_approval(f, "ap1");
    assert_string_equal(a->info->requester, "alice");
    keyraft__approval_record__free_unpacked(a, NULL);

    /* Nobody approves their own request, nor denies it. */
    e_vote(f->e, NULL, "ap1", "alice", 1, 2000);
    assert_int_equal(apply1(f, 6), KR_EPERM);
    e_vote(f->e, NULL, "ap1", "alice", 0, 2000);
    assert_int_equal(apply1(f, 7), KR_EPERM);
    e_vote(f->e, NULL, "ap1", "", 1, 2000);
    assert_int_equal(apply1(f, 8), KR_EINVAL);
    e_vote(f->e, NULL, "no-such", "bob", 1, 2000);
    assert_int_equal(apply1(f, 9), KR_ENOTFOUND);

    e_vote(f->e, NULL, "ap1", "bob", 1, 3000);
    assert_int_equal(apply1(f, 10), 0);
    a = get_approval(f, "ap1");
    assert_int_equal(a->info->state, AP_PENDING);
    assert_int_equal(a->info->n_votes, 1);
    assert_string_equal(a->info->votes[0]->principal, "bob");
    assert_true(a->info->votes[0]->approve);
    assert_int_equal(a->info->votes[0]->at, 3000);
    keyraft__approval_record__free_unpacked(a, NULL);

    /* One vote per principal, even a change of mind. */
    e_vote(f->e, NULL, "ap1", "bob", 1, 3100);
    assert_int_equal(apply1(f, 11), KR_EEXIST);
    e_vote(f->e, NULL, "ap1", "bob", 0, 3200);
    assert_int_equal(apply1(f, 12), KR_EEXIST);

    /* Past expires_at (the command's time): too late. At it: in time. */
    e_vote(f->e, NULL, "ap1", "carol", 1, 10001);
    assert_int_equal(apply1(f, 13), KR_ETIMEDOUT);
    assert_int_equal(approval_state(f, "ap1"), AP_PENDING);
    e_vote(f->e, NULL, "ap1", "carol", 1, 10000);
    assert_int_equal(apply1(f, 14), 0);
    a = get_approval(f, "ap1");
    assert_int_equal(a->info->state, AP_APPROVED);
    assert_int_equal(a->info->n_votes, 2);
    assert_string_equal(a->info->votes[1]->principal, "carol");
    keyraft__approval_record__free_unpacked(a, NULL);

    /* Decided: no more votes. */
    e_vote(f->e, NULL, "ap1", "dave", 1, 5000);
    assert_int_equal(apply1(f, 15), KR_ESTATE);
    e_vote(f->e, NULL, "ap1", "erin", 0, 5000);
    assert_int_equal(apply1(f, 16), KR_ESTATE);
    assert_int_equal(approval_state(f, "ap1"), AP_APPROVED);

    /* One denial decides, whatever approvals came before. */
    e_create_approval(f->e, NULL, "ap2", "alice", 3, 10000);
    assert_int_equal(apply1(f, 17), 0);
    e_vote(f->e, NULL, "ap2", "bob", 1, 4000);
    assert_int_equal(apply1(f, 18), 0);
    e_vote(f->e, NULL, "ap2", "carol", 0, 4001);
    assert_int_equal(apply1(f, 19), 0);
    a = get_approval(f, "ap2");
    assert_int_equal(a->info->state, AP_DENIED);
    assert_int_equal(a->info->n_votes, 2);
    assert_false(a->info->votes[1]->approve);
    keyraft__approval_record__free_unpacked(a, NULL);
    e_vote(f->e, NULL, "ap2", "dave", 1, 4002);
    assert_int_equal(apply1(f, 20), KR_ESTATE);
    assert_int_equal(approval_state(f, "ap2"), AP_DENIED);

    struct fsm_list l;
    assert_int_equal(fsm_list_approvals(f->store, 10, &l), 0);
    assert_int_equal(l.n, 2);
    assert_false(l.more);
    assert_string_equal(((Keyraft__ApprovalRecord *)l.items[0])->info->id, "ap1");
    assert_string_equal(((Keyraft__ApprovalRecord *)l.items[1])->info->id, "ap2");
    fsm_list_free(&l);
}

/* Votes |voters| (csv) in favour of |id|, from entry |index| on; returns the
 * next free index. */
static uint64_t approve_by(struct fx *f, const char *id, const char *voters, uint64_t index)
{
    char buf[128];
    snprintf(buf, sizeof(buf), "%s", voters);
    for (char *save = NULL, *v = strtok_r(buf, ",", &save); v != NULL;
         v = strtok_r(NULL, ",", &save)) {
        e_vote(f->e, NULL, id, v, 1, 2000);
        assert_int_equal(apply1(f, index++), 0);
    }
    return index;
}

static void test_approval_gates_command(void **state)
{
    struct fx *f = *state;
    char k1[FSM_KEY_ID_LEN + 1], k2[FSM_KEY_ID_LEN + 1], ghost[FSM_KEY_ID_LEN + 1];
    make_id(60, k1);
    make_id(61, k2);
    make_id(62, ghost);
    seed_key(f, k1, "held", S_PRE);
    e_put_key(f->e, NULL, k2, "other", FSM_DEFAULT_DOMAIN, S_PRE);
    assert_int_equal(apply1(f, 3), 0);
    e_create_approval(f->e, NULL, "ap-d", "alice", 2, 10000);
    assert_int_equal(apply1(f, 4), 0);

    /* Pending: the held destroy is refused and changes nothing. */
    e_destroy(f->e, "req-d1", k1, 500);
    with_approval(&f->e->ops[0], "ap-d");
    assert_int_equal(apply1(f, 5), KR_EPERM);
    assert_int_equal(key_state(f, k1), S_PRE);
    assert_int_equal(approval_state(f, "ap-d"), AP_PENDING);
    uint64_t next = approve_by(f, "ap-d", "bob", 6);
    e_destroy(f->e, NULL, k1, 500);
    with_approval(&f->e->ops[0], "ap-d");
    assert_int_equal(apply1(f, next++), KR_EPERM);
    assert_int_equal(key_state(f, k1), S_PRE);

    /* Finishing by hand needs an approved request too. */
    e_finish(f->e, NULL, "ap-d", 0, "ran");
    assert_int_equal(apply1(f, next++), KR_EPERM);
    assert_int_equal(approval_state(f, "ap-d"), AP_PENDING);
    e_finish(f->e, NULL, "no-such", 0, "ran");
    assert_int_equal(apply1(f, next++), KR_EPERM);

    next = approve_by(f, "ap-d", "carol", next);
    assert_int_equal(approval_state(f, "ap-d"), AP_APPROVED);

    /* An op that fails keeps the approval for a later try. */
    e_destroy(f->e, NULL, ghost, 500);
    with_approval(&f->e->ops[0], "ap-d");
    assert_int_equal(apply1(f, next++), KR_ENOTFOUND);
    assert_int_equal(approval_state(f, "ap-d"), AP_APPROVED);

    /* Approved: it runs, and the same batch uses the approval up. */
    e_destroy(f->e, "req-d2", k1, 600);
    with_approval(&f->e->ops[0], "ap-d");
    uint64_t used_at = next++;
    assert_int_equal(apply1(f, used_at), 0);
    Keyraft__KeyRecord *rec = get_key(f, k1);
    assert_int_equal(rec->state, S_DES);
    assert_int_equal(rec->destroyed_at, 600);
    assert_int_equal(rec->versions[0]->sealed.len, 0);
    keyraft__key_record__free_unpacked(rec, NULL);
    Keyraft__ApprovalRecord *a = get_approval(f, "ap-d");
    assert_int_equal(a->info->state, AP_DONE);
    assert_int_equal(a->info->result_status, 0);
    keyraft__approval_record__free_unpacked(a, NULL);

    /* Used once: a second use is refused and changes nothing. */
    e_destroy(f->e, "req-d3", k2, 700);
    with_approval(&f->e->ops[0], "ap-d");
    assert_int_equal(apply1(f, next++), KR_EPERM);
    rec = get_key(f, k2);
    assert_int_equal(rec->state, S_PRE);
    assert_int_equal(rec->versions[0]->sealed.len, 24);
    keyraft__key_record__free_unpacked(rec, NULL);
    assert_int_equal(approval_state(f, "ap-d"), AP_DONE);
    e_finish(f->e, NULL, "ap-d", 0, "again");
    assert_int_equal(apply1(f, next++), KR_EPERM);

    /* A retry of the request that used it gets its first outcome. */
    e_destroy(f->e, "req-d2", k1, 600);
    with_approval(&f->e->ops[0], "ap-d");
    struct fsm_result *r = apply_entry(f, next++);
    assert_non_null(r);
    assert_int_equal(r->ops[0].status, 0);
    assert_int_equal(r->ops[0].index, used_at);

    /* FinishApprovalCommand marks an approved request done with its outcome. */
    e_create_approval(f->e, NULL, "ap-e", "alice", 1, 10000);
    assert_int_equal(apply1(f, next++), 0);
    next = approve_by(f, "ap-e", "bob", next);
    assert_int_equal(approval_state(f, "ap-e"), AP_APPROVED);
    e_finish(f->e, NULL, "ap-e", KR_ESTATE, "key not exportable");
    assert_int_equal(apply1(f, next++), 0);
    a = get_approval(f, "ap-e");
    assert_int_equal(a->info->state, AP_DONE);
    assert_int_equal(a->info->result_status, KR_ESTATE);
    assert_string_equal(a->info->result_message, "key not exportable");
    keyraft__approval_record__free_unpacked(a, NULL);
    e_finish(f->e, NULL, "ap-e", 0, "twice");
    assert_int_equal(apply1(f, next++), KR_EPERM);

    /* A denied approval cannot be used either. */
    e_create_approval(f->e, NULL, "ap-n", "alice", 1, 10000);
    assert_int_equal(apply1(f, next++), 0);
    e_vote(f->e, NULL, "ap-n", "bob", 0, 2000);
    assert_int_equal(apply1(f, next++), 0);
    e_destroy(f->e, NULL, k2, 800);
    with_approval(&f->e->ops[0], "ap-n");
    assert_int_equal(apply1(f, next++), KR_EPERM);
    assert_int_equal(key_state(f, k2), S_PRE);
}

static void test_destroy_domain(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1], id2[FSM_KEY_ID_LEN + 1];
    make_id(70, id);
    make_id(71, id2);
    e_domain(f->e, NULL, FSM_DEFAULT_DOMAIN);
    assert_int_equal(apply1(f, 1), 0);
    e_domain(f->e, NULL, "tenant");
    assert_int_equal(apply1(f, 2), 0);
    e_put_key(f->e, NULL, id, "t-key", "tenant", S_ACT);
    assert_int_equal(apply1(f, 3), 0);

    unsigned long epoch = fsm_governance_epoch();
    e_destroy_domain(f->e, "req-dd", "tenant", 7000);
    assert_int_equal(apply1(f, 4), 0);
    assert_true(fsm_governance_epoch() > epoch);
    Keyraft__DomainRecord *dom = NULL;
    assert_int_equal(fsm_get_domain(f->store, "tenant", &dom), 0);
    assert_true(dom->destroyed);
    assert_int_equal(dom->destroyed_at, 7000);
    assert_int_equal(dom->wrapped_key.len, 0);
    assert_int_equal(dom->created_at, 1000);
    keyraft__domain_record__free_unpacked(dom, NULL);

    /* Listed, destroyed included; the default is untouched. */
    struct fsm_list l;
    assert_int_equal(fsm_list_domains(f->store, 10, &l), 0);
    assert_int_equal(l.n, 2);
    for (size_t i = 0; i < l.n; i++) {
        const Keyraft__DomainRecord *d = l.items[i];
        int tenant = strcmp(d->id, "tenant") == 0;
        assert_true(tenant || strcmp(d->id, FSM_DEFAULT_DOMAIN) == 0);
        assert_int_equal(d->destroyed, tenant);
        assert_int_equal(d->wrapped_key.len, tenant ? 0 : 16);
    }
    fsm_list_free(&l);

    /* Once only; never the default; never an unknown one. */
    e_destroy_domain(f->e, NULL, "tenant", 7100);
    assert_int_equal(apply1(f, 5), KR_ESTATE);
    e_destroy_domain(f->e, NULL, FSM_DEFAULT_DOMAIN, 7100);
    assert_int_equal(apply1(f, 6), KR_EPERM);
    e_destroy_domain(f->e, NULL, "nowhere", 7100);
    assert_int_equal(apply1(f, 7), KR_ENOTFOUND);
    assert_int_equal(fsm_get_domain(f->store, FSM_DEFAULT_DOMAIN, &dom), 0);
    assert_false(dom->destroyed);
    assert_int_equal(dom->wrapped_key.len, 16);
    keyraft__domain_record__free_unpacked(dom, NULL);
    assert_int_equal(fsm_get_domain(f->store, "tenant", &dom), 0);
    assert_int_equal(dom->destroyed_at, 7000);
    keyraft__domain_record__free_unpacked(dom, NULL);

    /* Shredded: no new keys, and the domain cannot be made again. */
    e_put_key(f->e, NULL, id2, "t-key-2", "tenant", S_ACT);
    assert_int_equal(apply1(f, 8), KR_ESTATE);
    Keyraft__KeyRecord *rec = NULL;
    assert_int_equal(fsm_get_key(f->store, id2, &rec), KR_ENOTFOUND);
    e_domain(f->e, NULL, "tenant");
    assert_int_equal(apply1(f, 9), KR_EEXIST);
    assert_int_equal(fsm_get_domain(f->store, "tenant", &dom), 0);
    assert_true(dom->destroyed);
    assert_int_equal(dom->wrapped_key.len, 0);
    keyraft__domain_record__free_unpacked(dom, NULL);
}

static void test_set_key_policy(void **state)
{
    struct fx *f = *state;
    char id[FSM_KEY_ID_LEN + 1], ghost[FSM_KEY_ID_LEN + 1];
    make_id(80, id);
    make_id(81, ghost);
    seed_key(f, id, "guarded", S_PRE);

    e_set_policy(f->e, "req-pol", id, "payments", "readers", "decrypt,verify");
    struct fsm_result *r = apply_entry(f, 3);
    assert_non_null(r);
    assert_int_equal(r->ops[0].status, 0);
    assert_string_equal(r->ops[0].key_id, id);
    Keyraft__KeyRecord *rec = get_key(f, id);
    assert_non_null(rec->policy);
    assert_string_equal(rec->policy->owner_group, "payments");
    assert_int_equal(rec->policy->usage_limit, 77);
    assert_int_equal(rec->policy->n_grants, 1);
    assert_string_equal(rec->policy->grants[0]->group, "readers");
    assert_int_equal(rec->policy->grants[0]->n_ops, 2);
    assert_string_equal(rec->policy->grants[0]->ops[1], "verify");
    assert_int_equal(rec->updated_index, 3);
    /* The rest of the record is untouched. */
    assert_string_equal(rec->name, "guarded");
    assert_int_equal(rec->state, S_PRE);
    assert_int_equal(rec->versions[0]->sealed.len, 24);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* A new policy replaces the old one whole. */
    e_set_policy(f->e, NULL, id, "ops", NULL, NULL);
    assert_int_equal(apply1(f, 4), 0);
    rec = get_key(f, id);
    assert_string_equal(rec->policy->owner_group, "ops");
    assert_int_equal(rec->policy->n_grants, 0);
    keyraft__key_record__free_unpacked(rec, NULL);

    /* Malformed policies change nothing. */
    e_set_policy(f->e, NULL, id, "payments", "readers", "decrypt,delete");
    assert_int_equal(apply1(f, 5), KR_EINVAL);
    e_set_policy(f->e, NULL, id, "bad owner", NULL, NULL);
    assert_int_equal(apply1(f, 6), KR_EINVAL);
    e_set_policy(f->e, NULL, id, "payments", "bad/group", "decrypt");
    assert_int_equal(apply1(f, 7), KR_EINVAL);
    rec = get_key(f, id);
    assert_string_equal(rec->policy->owner_group, "ops");
    assert_int_equal(rec->updated_index, 4);
    keyraft__key_record__free_unpacked(rec, NULL);

    e_set_policy(f->e, NULL, ghost, "payments", NULL, NULL);
    assert_int_equal(apply1(f, 8), KR_ENOTFOUND);

    /* A destroyed key keeps the policy it died with. */
    e_destroy(f->e, NULL, id, 900);
    assert_int_equal(apply1(f, 9), 0);
    e_set_policy(f->e, NULL, id, "payments", NULL, NULL);
    assert_int_equal(apply1(f, 10), KR_ESTATE);
    rec = get_key(f, id);
    assert_int_equal(rec->state, S_DES);
    assert_string_equal(rec->policy->owner_group, "ops");
    keyraft__key_record__free_unpacked(rec, NULL);
}

int main(void)
{
    /* Skipped entries and store failures are logged as errors on purpose. */
    log_set_level(LOG_LEVEL_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_domain_then_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_duplicates_rejected_and_write_nothing, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_put_key_unknown_domain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_put_key_malformed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_state_valid_transitions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_state_invalid_transitions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_shreds_every_version_and_frees_name, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_destroy_compromised_and_refused_states, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_add_version_must_be_next, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dedup_returns_first_result, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dedup_records_expire_by_day, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replayed_entry_is_noop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_undecodable_entry_skipped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_entry_ops_have_independent_outcomes, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_take_result, setup, teardown),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_transition_table),
        cmocka_unit_test(test_schema_helpers),
        cmocka_unit_test_setup_teardown(test_crash_mid_entry_resumes_at_position, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_retry_without_restart_resumes_too, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_run_sees_itself, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_run_reads_ahead, setup, teardown),
        cmocka_unit_test_setup_teardown(test_node_registry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_principal_create_and_merge, setup, teardown),
        cmocka_unit_test_setup_teardown(test_governance_rules, setup, teardown),
        cmocka_unit_test_setup_teardown(test_approval_votes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_approval_gates_command, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_domain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_key_policy, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
