/* test_governance.c: governance on real keyraftd processes, driven through
 * libkeyraft with hand-built requests: the role matrix, per-key group grants
 * and domains, certificate revocation, M-of-N approvals, the audit trail
 * (denials recorded, tamper detection, one chain on every node) and
 * cluster-wide usage counters. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cluster_util.h"
#include "pki.h"
#include "store.h"

#if defined(__SANITIZE_ADDRESS__)
#define SLOW 3
#else
#define SLOW 1
#endif
/* Audit records reach the chain within ~1 s (flush, then a raft commit). */
#define AUDIT_WAIT_MS (5000 * SLOW)
/* A follower applies a committed change shortly after the leader. */
#define FOLLOWER_WAIT_MS (3000 * SLOW)
#define USAGE_WAIT_MS (5000 * SLOW)
#define POLL_MS 50
#define MAX_PEOPLE 48
#define MAX_DENIALS 128

/* ---- principals ------------------------------------------------------------------------ */

struct who {
    char name[40];
    char cert[KR_PATH_MAX + 128];
    char key[KR_PATH_MAX + 128];
    kr_client *c; /* over every endpoint */
};

/* What both kinds of fixture share: where principals come from and the
 * bootstrap identities. */
struct env {
    kr_client_config base; /* borrowed from node 1's client.conf */
    char endpoints[KC_MAX_NODES * 24];
    char ca[KR_PATH_MAX + 32], ca_key[KR_PATH_MAX + 32];
    char scratch[KR_PATH_MAX];
    kr_client *admin, *app, *auditor;
    struct who people[MAX_PEOPLE];
    size_t n_people;
};

static int env_init(struct env *e, const struct kr_node *n1, const char *endpoints)
{
    e->base = n1->ccfg;
    snprintf(e->endpoints, sizeof(e->endpoints), "%s", endpoints);
    e->base.endpoints = e->endpoints;
    snprintf(e->ca, sizeof(e->ca), "%s/tls/ca.pem", n1->dir);
    snprintf(e->ca_key, sizeof(e->ca_key), "%s/tls/ca.key", n1->dir);
    snprintf(e->scratch, sizeof(e->scratch), "%s", n1->scratch);
    const char *names[3] = {"admin", "app", "auditor"};
    kr_client **slots[3] = {&e->admin, &e->app, &e->auditor};
    for (int i = 0; i < 3; i++) {
        char cert[KR_PATH_MAX + 32], key[KR_PATH_MAX + 32];
        kr_client_config cfg = e->base;
        snprintf(cert, sizeof(cert), "%s/tls/%s.pem", n1->dir, names[i]);
        snprintf(key, sizeof(key), "%s/tls/%s.key", n1->dir, names[i]);
        cfg.cert_file = cert;
        cfg.key_file = key;
        cfg.timeout_ms = 30000;
        if (kr_client_new(&cfg, slots[i]) != 0)
            return -1;
    }
    return 0;
}

static void env_free(struct env *e)
{
    kr_client_free(e->admin);
    kr_client_free(e->app);
    kr_client_free(e->auditor);
    for (size_t i = 0; i < e->n_people; i++)
        kr_client_free(e->people[i].c);
    memset(e, 0, sizeof(*e));
}

/* A client for |w| on |endpoints| (one node, or all). */
static kr_client *who_client(const struct env *e, const struct who *w, const char *endpoints)
{
    kr_client_config cfg = e->base;
    kr_client *c = NULL;
    cfg.endpoints = endpoints;
    cfg.cert_file = w->cert;
    cfg.key_file = w->key;
    cfg.timeout_ms = 30000;
    assert_int_equal(kr_client_new(&cfg, &c), 0);
    return c;
}

static const char *op_name(Keyraft__Request__OpCase op)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&keyraft__request__descriptor, (unsigned)op);
    return f != NULL ? f->name : "?";
}

/* ---- requests ------------------------------------------------------------------------------ */

/* One request and every sub-message it may point to: declare it on the stack,
 * fill it with one q_* call, send &q.r. */
struct rq {
    Keyraft__Request r;
    Keyraft__KeyRef ref;
    Keyraft__KeyPolicy policy;
    Keyraft__GroupGrant grant[2];
    Keyraft__GroupGrant *grants[2];
    char *grant_ops[2][12];
    char grant_text[2][128];
    Keyraft__QuorumRule rule;
    char *lists[3][8];
    char list_text[3][128];
    union {
        Keyraft__CreateKeyRequest create;
        Keyraft__ImportKeyRequest import;
        Keyraft__GetKeyRequest get;
        Keyraft__ExportKeyRequest export_;
        Keyraft__ListKeysRequest list;
        Keyraft__StateChangeRequest sc;
        Keyraft__EncryptRequest enc;
        Keyraft__DecryptRequest dec;
        Keyraft__SignRequest sign;
        Keyraft__RandomRequest random;
        Keyraft__StatusRequest status;
        Keyraft__ClusterListRequest cluster_list;
        Keyraft__PrincipalCreateRequest pc;
        Keyraft__PrincipalRevokeRequest prv;
        Keyraft__PrincipalListRequest pl;
        Keyraft__DomainRequest dom;
        Keyraft__DomainListRequest dl;
        Keyraft__SetKeyPolicyRequest sp;
        Keyraft__QuorumSetRequest qs;
        Keyraft__QuorumListRequest ql;
        Keyraft__ApprovalListRequest al;
        Keyraft__ApprovalRequest ap;
        Keyraft__AuditReadRequest ar;
        Keyraft__AuditVerifyRequest av;
    } u;
};

static void q_reset(struct rq *q)
{
    memset(q, 0, sizeof(*q));
    keyraft__request__init(&q->r);
    keyraft__key_ref__init(&q->ref);
    keyraft__key_policy__init(&q->policy);
}

/* Splits |csv| into q->lists[slot]; returns the count. */
static size_t q_list(struct rq *q, int slot, const char *csv)
{
    size_t n = 0;
    char *save = NULL;
    if (csv == NULL || csv[0] == '\0')
        return 0;
    snprintf(q->list_text[slot], sizeof(q->list_text[slot]), "%s", csv);
    for (char *t = strtok_r(q->list_text[slot], ",", &save); t != NULL && n < 8;
         t = strtok_r(NULL, ",", &save))
        q->lists[slot][n++] = t;
    return n;
}

static void q_ref(struct rq *q, const char *id)
{
    q->ref.id = (char *)id;
}

/* Adds a grant {group: ops} to q->policy. */
static void q_grant(struct rq *q, const char *group, const char *ops_csv)
{
    size_t g = q->policy.n_grants;
    char *save = NULL;
    assert_true(g < 2);
    keyraft__group_grant__init(&q->grant[g]);
    q->grant[g].group = (char *)group;
    snprintf(q->grant_text[g], sizeof(q->grant_text[g]), "%s", ops_csv);
    for (char *t = strtok_r(q->grant_text[g], ",", &save); t != NULL && q->grant[g].n_ops < 12;
         t = strtok_r(NULL, ",", &save))
        q->grant_ops[g][q->grant[g].n_ops++] = t;
    q->grant[g].ops = q->grant_ops[g];
    q->grants[g] = &q->grant[g];
    q->policy.grants = q->grants;
    q->policy.n_grants = g + 1;
}

static void q_create(struct rq *q, const char *name, Keyraft__Algorithm alg, const char *domain,
                     const char *owner, uint64_t usage_limit, int pre_active)
{
    q_reset(q);
    keyraft__create_key_request__init(&q->u.create);
    q->u.create.name = (char *)name;
    q->u.create.algorithm = alg;
    q->u.create.pre_active = pre_active;
    if (domain != NULL)
        q->u.create.domain = (char *)domain;
    if (owner != NULL)
        q->policy.owner_group = (char *)owner;
    q->policy.usage_limit = usage_limit;
    q->u.create.policy = &q->policy;
    q->r.op_case = KEYRAFT__REQUEST__OP_CREATE;
    q->r.create = &q->u.create;
}

static void q_import(struct rq *q, const char *name, const uint8_t *mat, size_t len,
                     const char *owner)
{
    q_reset(q);
    keyraft__import_key_request__init(&q->u.import);
    q->u.import.name = (char *)name;
    q->u.import.algorithm = KEYRAFT__ALGORITHM__AES_256;
    q->u.import.material.data = (uint8_t *)mat;
    q->u.import.material.len = len;
    q->policy.owner_group = (char *)owner;
    q->u.import.policy = &q->policy;
    q->r.op_case = KEYRAFT__REQUEST__OP_IMPORT;
    q->r.import = &q->u.import;
}

/* Operations that take only a key: get, export, activate, deactivate,
 * destroy, rotate. */
static void q_key(struct rq *q, Keyraft__Request__OpCase op, const char *id)
{
    q_reset(q);
    q_ref(q, id);
    q->r.op_case = op;
    switch (op) {
    case KEYRAFT__REQUEST__OP_GET:
        keyraft__get_key_request__init(&q->u.get);
        q->u.get.key = &q->ref;
        q->r.get = &q->u.get;
        break;
    case KEYRAFT__REQUEST__OP_EXPORT:
        keyraft__export_key_request__init(&q->u.export_);
        q->u.export_.key = &q->ref;
        q->r.export = &q->u.export_;
        break;
    default:
        keyraft__state_change_request__init(&q->u.sc);
        q->u.sc.key = &q->ref;
        if (op == KEYRAFT__REQUEST__OP_ACTIVATE)
            q->r.activate = &q->u.sc;
        else if (op == KEYRAFT__REQUEST__OP_DEACTIVATE)
            q->r.deactivate = &q->u.sc;
        else if (op == KEYRAFT__REQUEST__OP_DESTROY)
            q->r.destroy = &q->u.sc;
        else if (op == KEYRAFT__REQUEST__OP_ROTATE)
            q->r.rotate = &q->u.sc;
        else
            fail_msg("q_key: op %d takes more than a key", (int)op);
        break;
    }
}

static void q_encrypt(struct rq *q, const char *id, const char *pt)
{
    q_reset(q);
    q_ref(q, id);
    keyraft__encrypt_request__init(&q->u.enc);
    q->u.enc.key = &q->ref;
    q->u.enc.plaintext.data = (uint8_t *)pt;
    q->u.enc.plaintext.len = strlen(pt);
    q->r.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    q->r.encrypt = &q->u.enc;
}

static void q_decrypt(struct rq *q, const ProtobufCBinaryData *ct)
{
    q_reset(q);
    keyraft__decrypt_request__init(&q->u.dec);
    q->u.dec.ciphertext = *ct;
    q->r.op_case = KEYRAFT__REQUEST__OP_DECRYPT;
    q->r.decrypt = &q->u.dec;
}

static void q_sign(struct rq *q, const char *id)
{
    q_reset(q);
    q_ref(q, id);
    keyraft__sign_request__init(&q->u.sign);
    q->u.sign.key = &q->ref;
    q->u.sign.message.data = (uint8_t *)"matrix";
    q->u.sign.message.len = 6;
    q->r.op_case = KEYRAFT__REQUEST__OP_SIGN;
    q->r.sign = &q->u.sign;
}

/* Requests without arguments, or with simple ones. */
static void q_simple(struct rq *q, Keyraft__Request__OpCase op)
{
    q_reset(q);
    q->r.op_case = op;
    switch (op) {
    case KEYRAFT__REQUEST__OP_LIST:
        keyraft__list_keys_request__init(&q->u.list);
        q->r.list = &q->u.list;
        break;
    case KEYRAFT__REQUEST__OP_RANDOM:
        keyraft__random_request__init(&q->u.random);
        q->u.random.length = 16;
        q->r.random = &q->u.random;
        break;
    case KEYRAFT__REQUEST__OP_STATUS:
        keyraft__status_request__init(&q->u.status);
        q->r.status = &q->u.status;
        break;
    case KEYRAFT__REQUEST__OP_CLUSTER_LIST:
        keyraft__cluster_list_request__init(&q->u.cluster_list);
        q->r.cluster_list = &q->u.cluster_list;
        break;
    case KEYRAFT__REQUEST__OP_PRINCIPAL_LIST:
        keyraft__principal_list_request__init(&q->u.pl);
        q->r.principal_list = &q->u.pl;
        break;
    case KEYRAFT__REQUEST__OP_DOMAIN_LIST:
        keyraft__domain_list_request__init(&q->u.dl);
        q->r.domain_list = &q->u.dl;
        break;
    case KEYRAFT__REQUEST__OP_QUORUM_LIST:
        keyraft__quorum_list_request__init(&q->u.ql);
        q->r.quorum_list = &q->u.ql;
        break;
    case KEYRAFT__REQUEST__OP_APPROVAL_LIST:
        keyraft__approval_list_request__init(&q->u.al);
        q->r.approval_list = &q->u.al;
        break;
    case KEYRAFT__REQUEST__OP_AUDIT_VERIFY:
        keyraft__audit_verify_request__init(&q->u.av);
        q->r.audit_verify = &q->u.av;
        break;
    case KEYRAFT__REQUEST__OP_AUDIT_READ:
        keyraft__audit_read_request__init(&q->u.ar);
        q->u.ar.limit = 1;
        q->u.ar.tail = 1;
        q->r.audit_read = &q->u.ar;
        break;
    default:
        fail_msg("q_simple: op %d takes arguments", (int)op);
    }
}

static void q_principal_create(struct rq *q, const char *name, const char *roles,
                               const char *groups, const char *domains, const char *pem)
{
    q_reset(q);
    keyraft__principal_create_request__init(&q->u.pc);
    q->u.pc.name = (char *)name;
    q->u.pc.n_roles = q_list(q, 0, roles);
    q->u.pc.roles = q->lists[0];
    q->u.pc.n_groups = q_list(q, 1, groups);
    q->u.pc.groups = q->lists[1];
    q->u.pc.n_domains = q_list(q, 2, domains);
    q->u.pc.domains = q->lists[2];
    q->u.pc.cert_pem = (char *)pem;
    q->r.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE;
    q->r.principal_create = &q->u.pc;
}

static void q_principal_revoke(struct rq *q, const char *name)
{
    q_reset(q);
    keyraft__principal_revoke_request__init(&q->u.prv);
    q->u.prv.name = (char *)name;
    q->r.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE;
    q->r.principal_revoke = &q->u.prv;
}

static void q_domain(struct rq *q, Keyraft__Request__OpCase op, const char *id)
{
    q_reset(q);
    keyraft__domain_request__init(&q->u.dom);
    q->u.dom.id = (char *)id;
    q->r.op_case = op;
    if (op == KEYRAFT__REQUEST__OP_DOMAIN_CREATE)
        q->r.domain_create = &q->u.dom;
    else
        q->r.domain_destroy = &q->u.dom;
}

static void q_set_policy(struct rq *q, const char *id, const char *owner)
{
    q_reset(q);
    q_ref(q, id);
    keyraft__set_key_policy_request__init(&q->u.sp);
    q->u.sp.key = &q->ref;
    q->policy.owner_group = (char *)owner;
    q->u.sp.policy = &q->policy;
    q->r.op_case = KEYRAFT__REQUEST__OP_SET_POLICY;
    q->r.set_policy = &q->u.sp;
}

static void q_quorum_set(struct rq *q, const char *operation, uint32_t required,
                         const char *role, uint64_t ttl_ms)
{
    q_reset(q);
    keyraft__quorum_rule__init(&q->rule);
    q->rule.operation = (char *)operation;
    q->rule.required = required;
    q->rule.approver_role = (char *)role;
    q->rule.ttl_ms = ttl_ms;
    keyraft__quorum_set_request__init(&q->u.qs);
    q->u.qs.rule = &q->rule;
    q->r.op_case = KEYRAFT__REQUEST__OP_QUORUM_SET;
    q->r.quorum_set = &q->u.qs;
}

/* approval_show, approval_approve, approval_deny. */
static void q_approval(struct rq *q, Keyraft__Request__OpCase op, const char *id)
{
    q_reset(q);
    keyraft__approval_request__init(&q->u.ap);
    q->u.ap.id = (char *)id;
    q->r.op_case = op;
    if (op == KEYRAFT__REQUEST__OP_APPROVAL_SHOW)
        q->r.approval_show = &q->u.ap;
    else if (op == KEYRAFT__REQUEST__OP_APPROVAL_APPROVE)
        q->r.approval_approve = &q->u.ap;
    else
        q->r.approval_deny = &q->u.ap;
}

/* ---- calls ------------------------------------------------------------------------------- */

/* Sends |req|; the node's status (the response in *out when wanted), or the
 * transport code. The message (or the local error) is copied to |msg|. */
static int send_req(kr_client *c, Keyraft__Request *req, Keyraft__Response **out, char *msg,
                    size_t msg_len)
{
    Keyraft__Response *resp = NULL;
    int rc = kr_call(c, req, &resp);
    if (out != NULL)
        *out = NULL;
    if (rc != 0) {
        if (msg != NULL)
            snprintf(msg, msg_len, "transport: %s", kr_client_last_error(c));
        return rc;
    }
    if (msg != NULL)
        snprintf(msg, msg_len, "%s", resp->message ? resp->message : "");
    rc = resp->status;
    if (out != NULL)
        *out = resp;
    else
        kr_response_free(resp);
    return rc;
}

/* Asserts the status (and that the message contains |needle|); returns the
 * response (free with kr_response_free). */
static Keyraft__Response *expect_(const char *file, int line, kr_client *c, Keyraft__Request *req,
                                  int want, const char *needle)
{
    Keyraft__Response *resp = NULL;
    char msg[1024];
    int st = send_req(c, req, &resp, msg, sizeof(msg));
    if (resp == NULL) {
        print_error("%s:%d: %s: %s (%s)\n", file, line, op_name(req->op_case), kr_status_name(st),
                    msg);
        fail();
    }
    if (st != want || (needle != NULL && strstr(msg, needle) == NULL)) {
        print_error("%s:%d: %s: status %s (\"%s\"), want %s%s%s%s\n", file, line,
                    op_name(req->op_case), kr_status_name(st), msg, kr_status_name(want),
                    needle ? " with \"" : "", needle ? needle : "", needle ? "\"" : "");
        kr_response_free(resp);
        fail();
    }
    return resp;
}
#define EXPECT(c, q, want, needle) expect_(__FILE__, __LINE__, (c), &(q)->r, (want), (needle))
#define EXPECT_DONE(c, q, want, needle) kr_response_free(EXPECT(c, q, want, needle))

/* Re-sends |q| until it answers |want| (with |needle|), up to |timeout_ms|.
 * 0, or -1 with the last answer printed. */
static int poll_until(kr_client *c, struct rq *q, int want, const char *needle,
                      unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    char msg[1024] = "";
    int st = 0;
    for (;;) {
        st = send_req(c, &q->r, NULL, msg, sizeof(msg));
        if (st == want && (needle == NULL || strstr(msg, needle) != NULL))
            return 0;
        if (kc_now_ms() >= deadline)
            break;
        kc_sleep_ms(POLL_MS);
    }
    print_error("%s: still %s (\"%s\") after %u ms, want %s\n", op_name(q->r.op_case),
                kr_status_name(st), msg, timeout_ms, kr_status_name(want));
    return -1;
}

/* Registers a principal: a certificate from the cluster CA, then
 * principal_create as admin; a client on every endpoint. */
static struct who *who_new(struct env *e, const char *name, const char *roles, const char *groups,
                           const char *domains)
{
    struct who *w;
    uint8_t *pem = NULL;
    size_t pem_len = 0;
    struct rq q;

    assert_true(e->n_people < MAX_PEOPLE);
    w = &e->people[e->n_people];
    memset(w, 0, sizeof(*w));
    snprintf(w->name, sizeof(w->name), "%s", name);
    snprintf(w->cert, sizeof(w->cert), "%s/%s.pem", e->scratch, name);
    snprintf(w->key, sizeof(w->key), "%s/%s.key", e->scratch, name);
    assert_int_equal(pki_issue_client(e->ca, e->ca_key, name, roles, 30, w->cert, w->key), 0);
    assert_int_equal(kr_read_file(w->cert, &pem, &pem_len), 0);
    q_principal_create(&q, name, roles, groups, domains, (const char *)pem);
    Keyraft__Response *resp = EXPECT(e->admin, &q, 0, NULL);
    free(pem);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_PRINCIPAL);
    assert_string_equal(resp->principal->name, name);
    kr_response_free(resp);
    w->c = who_client(e, w, e->endpoints);
    e->n_people++;
    return w;
}

/* Creates a key as |c|; its id (malloc'd). */
static char *key_new(kr_client *c, const char *name, Keyraft__Algorithm alg, const char *owner,
                     const char *grant_group, const char *grant_ops, uint64_t limit,
                     int pre_active)
{
    struct rq q;
    q_create(&q, name, alg, NULL, owner, limit, pre_active);
    if (grant_group != NULL)
        q_grant(&q, grant_group, grant_ops);
    Keyraft__Response *resp = EXPECT(c, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_KEY);
    char *id = strdup(resp->key->id);
    kr_response_free(resp);
    assert_non_null(id);
    return id;
}

/* Encrypts |pt| under |id| as |c|, expecting success; the ciphertext. */
static ProtobufCBinaryData encrypt_ok(kr_client *c, const char *id, const char *pt)
{
    struct rq q;
    q_encrypt(&q, id, pt);
    Keyraft__Response *resp = EXPECT(c, &q, 0, NULL);
    ProtobufCBinaryData ct;
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_ENCRYPT);
    ct.len = resp->encrypt->ciphertext.len;
    ct.data = malloc(ct.len);
    assert_non_null(ct.data);
    memcpy(ct.data, resp->encrypt->ciphertext.data, ct.len);
    kr_response_free(resp);
    return ct;
}

/* The committed usage count of version |version| as |c| sees it; -1 when the
 * get fails. */
static long long usage_of(kr_client *c, const char *id, uint32_t version)
{
    struct rq q;
    Keyraft__Response *resp = NULL;
    long long n = -1;
    q_key(&q, KEYRAFT__REQUEST__OP_GET, id);
    if (send_req(c, &q.r, &resp, NULL, 0) == 0 && resp->result_case == KEYRAFT__RESPONSE__RESULT_KEY)
        for (size_t i = 0; i < resp->key->n_versions; i++)
            if (resp->key->versions[i]->version == version)
                n = (long long)resp->key->versions[i]->encryptions;
    kr_response_free(resp);
    return n;
}

static int wait_usage(kr_client *c, const char *id, uint32_t version, long long want,
                      unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    long long n = -1;
    for (;;) {
        n = usage_of(c, id, version);
        if (n == want)
            return 0;
        if (kc_now_ms() >= deadline)
            break;
        kc_sleep_ms(POLL_MS);
    }
    print_error("key %s version %u: %lld encryptions after %u ms, want %lld\n", id, version, n,
                timeout_ms, want);
    return -1;
}

/* ---- audit reading ------------------------------------------------------------------------ */

/* Every record in the log as |auditor| sees it (denied_only: refusals only),
 * unpacked; *n_out records, with their seqs in seqs (may be NULL). */
static Keyraft__AuditRecord **audit_all(kr_client *auditor, int denied_only, size_t *n_out)
{
    Keyraft__AuditRecord **recs = NULL;
    size_t n = 0, cap = 0;
    uint64_t after = 0;
    for (int page = 0; page < 1000; page++) {
        struct rq q;
        q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_READ);
        q.u.ar.tail = 0;
        q.u.ar.limit = 1000;
        q.u.ar.after_seq = after;
        q.u.ar.denied_only = denied_only;
        Keyraft__Response *resp = EXPECT(auditor, &q, 0, NULL);
        assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_AUDIT);
        for (size_t i = 0; i < resp->audit->n_entries; i++) {
            const Keyraft__AuditEntry *e = resp->audit->entries[i];
            Keyraft__AuditRecord *r =
                keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
            assert_non_null(r);
            if (n == cap) {
                cap = cap ? 2 * cap : 256;
                recs = realloc(recs, cap * sizeof(*recs));
                assert_non_null(recs);
            }
            recs[n++] = r;
        }
        after = resp->audit->next_after;
        kr_response_free(resp);
        if (after == 0)
            break;
    }
    *n_out = n;
    return recs;
}

static void audit_free(Keyraft__AuditRecord **recs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        keyraft__audit_record__free_unpacked(recs[i], NULL);
    free(recs);
}

static int has_approval(const Keyraft__AuditRecord *r, const char *id)
{
    for (size_t i = 0; i < r->n_approval_ids; i++)
        if (strcmp(r->approval_ids[i], id) == 0)
            return 1;
    return 0;
}

/* The index of a record matching every given field (NULL / INT32_MIN: any),
 * or -1. */
static long audit_find(Keyraft__AuditRecord **recs, size_t n, const char *principal,
                       const char *operation, int status, const char *approval)
{
    for (size_t i = 0; i < n; i++) {
        const Keyraft__AuditRecord *r = recs[i];
        if ((principal == NULL || strcmp(r->principal, principal) == 0) &&
            (operation == NULL || strcmp(r->operation, operation) == 0) &&
            (status == INT32_MIN || r->status == status) &&
            (approval == NULL || has_approval(r, approval)))
            return (long)i;
    }
    return -1;
}

static Keyraft__Response *audit_verify(kr_client *auditor)
{
    struct rq q;
    q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_VERIFY);
    Keyraft__Response *resp = EXPECT(auditor, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_AUDIT_VERIFY);
    return resp;
}

/* ================================================================================== */
/* Single node                                                                        */
/* ================================================================================== */

struct denial {
    char principal[40];
    char op[32];
};

struct single {
    struct kr_node node;
    struct env e;
    struct denial denials[MAX_DENIALS];
    size_t n_denials;
    int matrix_ran;
    /* what the quorum test did, for its audit check */
    char export_approval[40];
    char destroy_approval[40];
    char requester[40], voter1[40], voter2[40], voter3[40];
    int quorum_ran;
};

static int single_setup(void **state)
{
    struct single *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    if (kr_node_init(&f->node) != 0 || kr_node_start(&f->node) != 0 ||
        env_init(&f->e, &f->node, f->node.ccfg.endpoints) != 0) {
        env_free(&f->e);
        kr_node_destroy(&f->node);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int single_teardown(void **state)
{
    struct single *f = *state;
    if (f == NULL)
        return 0;
    env_free(&f->e);
    int alive = kr_node_alive(&f->node);
    int rc = alive ? kr_node_stop(&f->node) : 0;
    if (rc != 0) {
        fprintf(stderr, "keyraftd did not stop cleanly on SIGTERM: exit %d\n", rc);
        kr_node_dump_log(&f->node, 3000);
    }
    kr_node_destroy(&f->node);
    free(f);
    return alive && rc != 0 ? -1 : 0;
}

static int single_alive(void **state)
{
    struct single *f = *state;
    if (kr_node_alive(&f->node))
        return 0;
    fprintf(stderr, "keyraftd died during an earlier test; its log:\n");
    kr_node_dump_log(&f->node, 3000);
    kr_node_kill9(&f->node);
    if (kr_node_start(&f->node) != 0)
        return -1;
    return -1; /* a crash is a bug: this test fails too */
}

/* ---- 1. the role matrix ------------------------------------------------------------------- */

enum { R_ADMIN = 1, R_OFFICER = 2, R_USER = 4, R_AUDITOR = 8, R_ALL = 15 };

/* Who may call what, as the governance design states it (written out here,
 * not taken from policy.c, so the test checks the code against the design). */
static const struct {
    const char *op;
    unsigned roles;
} MATRIX[] = {
    {"create", R_OFFICER},          {"get", R_OFFICER | R_USER},
    {"list", R_OFFICER | R_USER},   {"export", R_USER},
    {"encrypt", R_USER},            {"decrypt", R_USER},
    {"sign", R_USER},               {"destroy", R_OFFICER},
    {"rotate", R_OFFICER},          {"activate", R_OFFICER},
    {"principal_create", R_ADMIN},  {"principal_list", R_ADMIN | R_AUDITOR},
    {"domain_create", R_ADMIN},     {"domain_list", R_ALL},
    {"set_policy", R_ADMIN},        {"quorum_set", R_ADMIN},
    {"quorum_list", R_ALL},         {"approval_list", R_ALL},
    {"audit_read", R_AUDITOR},      {"audit_verify", R_AUDITOR},
    {"cluster_list", R_ADMIN | R_AUDITOR}, {"status", R_ALL},
    {"random", R_OFFICER | R_USER},
};

struct matrix_ctx {
    struct single *f;
    struct who *officer;
    char *k_aes, *k_ec, *k_rot, *k_pol;
    ProtobufCBinaryData ct;
    char *made[8]; /* per-row keys made for a principal */
    size_t n_made;
    uint8_t *pem;
    char name[96]; /* the row's new key, principal or domain name */
};

/* Fills |q| with a well-formed request for |op| by |who_name|, making its
 * target first where it needs a fresh one. */
static void matrix_request(struct matrix_ctx *m, struct rq *q, const char *op,
                           const char *who_name, int allowed)
{
    char *name = m->name;
    size_t name_len = sizeof(m->name);
    if (strcmp(op, "create") == 0) {
        snprintf(name, name_len, "mx-new-%s", who_name);
        q_create(q, name, KEYRAFT__ALGORITHM__AES_256, NULL, NULL, 0, 0);
    } else if (strcmp(op, "get") == 0) {
        q_key(q, KEYRAFT__REQUEST__OP_GET, m->k_aes);
    } else if (strcmp(op, "list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_LIST);
    } else if (strcmp(op, "export") == 0) {
        q_key(q, KEYRAFT__REQUEST__OP_EXPORT, m->k_aes);
    } else if (strcmp(op, "encrypt") == 0) {
        q_encrypt(q, m->k_aes, "matrix");
    } else if (strcmp(op, "decrypt") == 0) {
        q_decrypt(q, &m->ct);
    } else if (strcmp(op, "sign") == 0) {
        q_sign(q, m->k_ec);
    } else if (strcmp(op, "destroy") == 0 || strcmp(op, "activate") == 0) {
        const char *target = m->k_aes;
        if (allowed) { /* a pre-active key: both transitions are legal from there */
            snprintf(name, name_len, "mx-%s-%s", op, who_name);
            assert_true(m->n_made < 8);
            m->made[m->n_made] = key_new(m->officer->c, name, KEYRAFT__ALGORITHM__AES_256, "g1",
                                         NULL, NULL, 0, 1);
            target = m->made[m->n_made++];
        }
        q_key(q, strcmp(op, "destroy") == 0 ? KEYRAFT__REQUEST__OP_DESTROY
                                            : KEYRAFT__REQUEST__OP_ACTIVATE, target);
    } else if (strcmp(op, "rotate") == 0) {
        q_key(q, KEYRAFT__REQUEST__OP_ROTATE, m->k_rot);
    } else if (strcmp(op, "principal_create") == 0) {
        char cert[KR_PATH_MAX + 128], key[KR_PATH_MAX + 128];
        size_t len = 0;
        snprintf(name, name_len, "mx-pc-%s", who_name);
        snprintf(cert, sizeof(cert), "%s/%s.pem", m->f->e.scratch, name);
        snprintf(key, sizeof(key), "%s/%s.key", m->f->e.scratch, name);
        assert_int_equal(pki_issue_client(m->f->e.ca, m->f->e.ca_key, name, "user", 30, cert, key),
                         0);
        free(m->pem);
        m->pem = NULL;
        assert_int_equal(kr_read_file(cert, &m->pem, &len), 0);
        q_principal_create(q, name, "user", "g1", "default", (const char *)m->pem);
    } else if (strcmp(op, "principal_list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_PRINCIPAL_LIST);
    } else if (strcmp(op, "domain_create") == 0) {
        snprintf(name, name_len, "mx-dom-%s", who_name);
        q_domain(q, KEYRAFT__REQUEST__OP_DOMAIN_CREATE, name);
    } else if (strcmp(op, "domain_list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_DOMAIN_LIST);
    } else if (strcmp(op, "set_policy") == 0) {
        q_set_policy(q, m->k_pol, "g1");
    } else if (strcmp(op, "quorum_set") == 0) {
        q_quorum_set(q, "node_admission", 0, "", 0); /* removes a rule that is not there */
    } else if (strcmp(op, "quorum_list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_QUORUM_LIST);
    } else if (strcmp(op, "approval_list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_APPROVAL_LIST);
    } else if (strcmp(op, "audit_read") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_AUDIT_READ);
    } else if (strcmp(op, "audit_verify") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_AUDIT_VERIFY);
    } else if (strcmp(op, "cluster_list") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_CLUSTER_LIST);
    } else if (strcmp(op, "status") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_STATUS);
    } else if (strcmp(op, "random") == 0) {
        q_simple(q, KEYRAFT__REQUEST__OP_RANDOM);
    } else {
        fail_msg("matrix: no request for %s", op);
    }
    assert_string_equal(op_name(q->r.op_case), op);
}

static const char *const ROLE_NAMES[] = {"admin", "officer", "user", "auditor"};

static void test_role_matrix(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct matrix_ctx m = {.f = f};
    struct who *usr;
    struct {
        const char *name;
        kr_client *c;
        unsigned roles;
    } who[5];
    size_t failures = 0, want_denials = 0;

    m.officer = who_new(e, "mx-officer", "officer", "g1", "default");
    usr = who_new(e, "mx-user", "user", "g1", "default");
    /* Targets: owned by g1, usable by the bootstrap app (group apps) through grants. */
    m.k_aes = key_new(m.officer->c, "mx-aes", KEYRAFT__ALGORITHM__AES_256, "g1", "apps",
                      "get,encrypt,decrypt,export", 0, 0);
    m.k_ec = key_new(m.officer->c, "mx-ec", KEYRAFT__ALGORITHM__EC_P256, "g1", "apps", "get,sign",
                     0, 0);
    m.k_rot = key_new(m.officer->c, "mx-rot", KEYRAFT__ALGORITHM__AES_256, "g1", NULL, NULL, 0, 0);
    m.k_pol = key_new(m.officer->c, "mx-pol", KEYRAFT__ALGORITHM__AES_256, "g1", NULL, NULL, 0, 0);
    m.ct = encrypt_ok(usr->c, m.k_aes, "matrix plaintext");

    who[0].name = "admin", who[0].c = e->admin, who[0].roles = R_ADMIN;
    who[1].name = m.officer->name, who[1].c = m.officer->c, who[1].roles = R_OFFICER;
    who[2].name = usr->name, who[2].c = usr->c, who[2].roles = R_USER;
    who[3].name = "auditor", who[3].c = e->auditor, who[3].roles = R_AUDITOR;
    who[4].name = "app", who[4].c = e->app, who[4].roles = R_OFFICER | R_USER;

    for (size_t p = 0; p < 5; p++) {
        for (size_t o = 0; o < sizeof(MATRIX) / sizeof(MATRIX[0]); o++) {
            const char *op = MATRIX[o].op;
            int allowed = (MATRIX[o].roles & who[p].roles) != 0;
            struct rq q;
            want_denials += !allowed;
            char msg[1024];
            matrix_request(&m, &q, op, who[p].name, allowed);
            int st = send_req(who[p].c, &q.r, NULL, msg, sizeof(msg));
            if (allowed) {
                /* Every target was prepared: the call succeeds outright. */
                if (st != 0) {
                    print_error("matrix: %s (allowed) %s -> %s \"%s\", want KR_OK\n", who[p].name,
                                op, kr_status_name(st), msg);
                    failures++;
                }
                continue;
            }
            int named = strstr(msg, "needs") != NULL;
            for (size_t r = 0; r < 4; r++)
                if ((MATRIX[o].roles & (1u << r)) && strstr(msg, ROLE_NAMES[r]) == NULL)
                    named = 0;
            if (st != KR_EPERM || !named) {
                print_error("matrix: %s (denied) %s -> %s \"%s\", want KR_EPERM naming the "
                            "needed role\n", who[p].name, op, kr_status_name(st), msg);
                failures++;
                continue;
            }
            if (f->n_denials < MAX_DENIALS) {
                snprintf(f->denials[f->n_denials].principal, sizeof(f->denials[0].principal), "%s",
                         who[p].name);
                snprintf(f->denials[f->n_denials].op, sizeof(f->denials[0].op), "%s", op);
                f->n_denials++;
            }
        }
    }
    for (size_t i = 0; i < m.n_made; i++)
        free(m.made[i]);
    free(m.k_aes);
    free(m.k_ec);
    free(m.k_rot);
    free(m.k_pol);
    free(m.ct.data);
    free(m.pem);
    assert_int_equal(failures, 0);
    /* 5 principals x 23 operations: 60 of the 115 calls are denied by role */
    assert_int_equal(want_denials, 60);
    assert_int_equal(f->n_denials, want_denials);
    f->matrix_ran = 1;
}

/* Every denial of the matrix is in the audit trail: principal, operation,
 * KR_EPERM. */
static void test_audit_denials(void **state)
{
    struct single *f = *state;
    size_t n = 0, missing = 0;
    Keyraft__AuditRecord **recs = NULL;
    uint64_t deadline = kc_now_ms() + AUDIT_WAIT_MS;

    if (!f->matrix_ran)
        fail_msg("the role matrix did not run to its end");
    for (;;) {
        recs = audit_all(f->e.auditor, 1, &n);
        missing = 0;
        for (size_t i = 0; i < f->n_denials; i++)
            if (audit_find(recs, n, f->denials[i].principal, f->denials[i].op, KR_EPERM, NULL) < 0)
                missing++;
        for (size_t i = 0; i < n; i++)
            assert_int_not_equal(recs[i]->status, 0); /* denied_only filters */
        if (missing == 0 || kc_now_ms() >= deadline)
            break;
        audit_free(recs, n);
        kc_sleep_ms(200);
    }
    for (size_t i = 0; i < f->n_denials && missing > 0; i++)
        if (audit_find(recs, n, f->denials[i].principal, f->denials[i].op, KR_EPERM, NULL) < 0)
            print_error("no audit record of the denial: %s %s\n", f->denials[i].principal,
                        f->denials[i].op);
    audit_free(recs, n);
    assert_int_equal(missing, 0);
}

/* ---- 2. per-key policy and domains ----------------------------------------------------------- */

static void test_key_policy(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct rq q;

    struct who *off = who_new(e, "kp-officer", "officer", "g1", "default");
    struct who *u2 = who_new(e, "kp-g2", "user", "g2", "default");
    struct who *u3 = who_new(e, "kp-g3", "user", "g3", "default");
    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_CREATE, "kp-other");
    EXPECT_DONE(e->admin, &q, 0, NULL);
    struct who *uo = who_new(e, "kp-elsewhere", "user", "g2", "kp-other");
    struct who *u1 = who_new(e, "kp-g1", "user", "g1", "default");

    char *id = key_new(off->c, "kp-key", KEYRAFT__ALGORITHM__AES_256, "g1", "g2", "encrypt", 0, 0);
    ProtobufCBinaryData ct = encrypt_ok(u2->c, id, "granted");
    /* the owner group keeps every use */
    ProtobufCBinaryData ct1 = encrypt_ok(u1->c, id, "owner");
    q_decrypt(&q, &ct1);
    EXPECT_DONE(u1->c, &q, 0, NULL);

    q_decrypt(&q, &ct);
    EXPECT_DONE(u2->c, &q, KR_EPERM, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, id);
    EXPECT_DONE(u2->c, &q, KR_EPERM, NULL);
    q_encrypt(&q, id, "no grant");
    EXPECT_DONE(u3->c, &q, KR_EPERM, NULL);
    q_decrypt(&q, &ct);
    EXPECT_DONE(u3->c, &q, KR_EPERM, NULL);
    /* another domain: the key does not exist for it (no oracle) */
    q_encrypt(&q, id, "other domain");
    EXPECT_DONE(uo->c, &q, KR_ENOTFOUND, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_GET, id);
    EXPECT_DONE(uo->c, &q, KR_ENOTFOUND, NULL);
    q_decrypt(&q, &ct);
    EXPECT_DONE(uo->c, &q, KR_ENOTFOUND, NULL);
    /* the admin changes the policy: g3 gets decrypt, g2 loses encrypt */
    q_set_policy(&q, id, "g1");
    q_grant(&q, "g3", "decrypt");
    EXPECT_DONE(e->admin, &q, 0, NULL);
    q_decrypt(&q, &ct);
    Keyraft__Response *resp = EXPECT(u3->c, &q, 0, NULL);
    assert_int_equal(resp->decrypt->plaintext.len, 7);
    assert_memory_equal(resp->decrypt->plaintext.data, "granted", 7);
    kr_response_free(resp);
    q_encrypt(&q, id, "revoked grant");
    EXPECT_DONE(u2->c, &q, KR_EPERM, NULL);
    free(ct.data);
    free(ct1.data);
    free(id);
}

static void test_domains(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct rq q;

    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_CREATE, "tenant-a");
    Keyraft__Response *resp = EXPECT(e->admin, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_DOMAIN);
    assert_string_equal(resp->domain->id, "tenant-a");
    assert_false(resp->domain->destroyed);
    kr_response_free(resp);
    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_CREATE, "tenant-a");
    EXPECT_DONE(e->admin, &q, KR_EEXIST, NULL);

    struct who *ta = who_new(e, "ta-officer", "officer,user", "ta", "tenant-a");
    q_create(&q, "ta-key", KEYRAFT__ALGORITHM__AES_256, "tenant-a", NULL, 0, 0);
    resp = EXPECT(ta->c, &q, 0, NULL);
    assert_string_equal(resp->key->domain, "tenant-a");
    char *id = strdup(resp->key->id);
    kr_response_free(resp);
    /* not in the default domain: app cannot see it */
    q_key(&q, KEYRAFT__REQUEST__OP_GET, id);
    EXPECT_DONE(e->app, &q, KR_ENOTFOUND, NULL);
    /* and ta may not create in a domain it does not belong to */
    q_create(&q, "ta-key-default", KEYRAFT__ALGORITHM__AES_256, "default", NULL, 0, 0);
    EXPECT_DONE(ta->c, &q, KR_EPERM, NULL);

    ProtobufCBinaryData ct = encrypt_ok(ta->c, id, "tenant data");
    q_decrypt(&q, &ct);
    EXPECT_DONE(ta->c, &q, 0, NULL);

    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_DESTROY, "tenant-a");
    resp = EXPECT(e->admin, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_DOMAIN);
    assert_true(resp->domain->destroyed);
    kr_response_free(resp);
    q_decrypt(&q, &ct);
    EXPECT_DONE(ta->c, &q, KR_ESTATE, NULL);
    q_encrypt(&q, id, "after");
    EXPECT_DONE(ta->c, &q, KR_ESTATE, NULL);
    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_DESTROY, "tenant-a");
    EXPECT_DONE(e->admin, &q, KR_ESTATE, NULL);

    q_simple(&q, KEYRAFT__REQUEST__OP_DOMAIN_LIST);
    resp = EXPECT(e->admin, &q, 0, NULL);
    int seen_a = 0, seen_default = 0;
    for (size_t i = 0; i < resp->domains->n_domains; i++) {
        const Keyraft__DomainInfo *d = resp->domains->domains[i];
        if (strcmp(d->id, "tenant-a") == 0) {
            seen_a = 1;
            assert_true(d->destroyed);
            assert_true(d->destroyed_at >= d->created_at);
        }
        if (strcmp(d->id, "default") == 0) {
            seen_default = 1;
            assert_false(d->destroyed);
        }
    }
    kr_response_free(resp);
    assert_true(seen_a && seen_default);

    q_domain(&q, KEYRAFT__REQUEST__OP_DOMAIN_DESTROY, "default");
    EXPECT_DONE(e->admin, &q, KR_EPERM, NULL);
    /* a destroyed domain is no home for a new principal */
    uint8_t *pem = NULL;
    size_t len = 0;
    char cert[KR_PATH_MAX + 128], key[KR_PATH_MAX + 128];
    snprintf(cert, sizeof(cert), "%s/ta-late.pem", e->scratch);
    snprintf(key, sizeof(key), "%s/ta-late.key", e->scratch);
    assert_int_equal(pki_issue_client(e->ca, e->ca_key, "ta-late", "user", 30, cert, key), 0);
    assert_int_equal(kr_read_file(cert, &pem, &len), 0);
    q_principal_create(&q, "ta-late", "user", "ta", "tenant-a", (const char *)pem);
    EXPECT_DONE(e->admin, &q, KR_EINVAL, "destroyed");
    free(pem);
    free(ct.data);
    free(id);
}

/* ---- 3. revocation (single node) ------------------------------------------------------------- */

static void test_revocation(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct rq q;

    struct who *rv = who_new(e, "rv-user", "user", "g1", "default");
    q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
    EXPECT_DONE(rv->c, &q, 0, NULL); /* the connection is open now */

    q_principal_revoke(&q, "rv-user");
    Keyraft__Response *resp = EXPECT(e->admin, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_PRINCIPAL);
    assert_int_equal(resp->principal->n_certs, 1);
    assert_true(resp->principal->certs[0]->revoked);
    assert_string_equal(resp->principal->certs[0]->revoked_by, "admin");
    kr_response_free(resp);

    /* the same open connection */
    q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
    EXPECT_DONE(rv->c, &q, KR_EPERM, "revoked");
    /* and a new one */
    kr_client *c2 = who_client(e, rv, e->endpoints);
    q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
    resp = EXPECT(c2, &q, KR_EPERM, "revoked");
    kr_response_free(resp);
    kr_client_free(c2);
    /* an unknown principal */
    q_principal_revoke(&q, "no-such-principal");
    EXPECT_DONE(e->admin, &q, KR_ENOTFOUND, NULL);
}

/* ---- 6. usage counters (single node) --------------------------------------------------------- */

static void test_usage_limit(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct rq q;

    char *id = key_new(e->app, "usage-5", KEYRAFT__ALGORITHM__AES_256, "apps", NULL, NULL, 5, 0);
    for (int i = 0; i < 5; i++) {
        ProtobufCBinaryData ct = encrypt_ok(e->app, id, "counted");
        free(ct.data);
    }
    q_encrypt(&q, id, "one too many");
    EXPECT_DONE(e->app, &q, KR_ESTATE, "usage limit");
    assert_int_equal(wait_usage(e->app, id, 1, 5, 2000 * SLOW), 0);
    q_key(&q, KEYRAFT__REQUEST__OP_ROTATE, id);
    Keyraft__Response *resp = EXPECT(e->app, &q, 0, NULL);
    assert_int_equal(resp->key->current_version, 2);
    kr_response_free(resp);
    q_encrypt(&q, id, "new version");
    resp = EXPECT(e->app, &q, 0, NULL);
    assert_int_equal(resp->encrypt->version, 2);
    kr_response_free(resp);
    assert_int_equal(wait_usage(e->app, id, 2, 1, 2000 * SLOW), 0);
    assert_int_equal(usage_of(e->app, id, 1), 5);
    free(id);
}

/* ---- 4. quorum approvals --------------------------------------------------------------------- */

static Keyraft__ApprovalState approval_state(kr_client *c, const char *id)
{
    struct rq q;
    Keyraft__Response *resp = NULL;
    Keyraft__ApprovalState s = KEYRAFT__APPROVAL_STATE__APPROVAL_UNSPECIFIED;
    q_approval(&q, KEYRAFT__REQUEST__OP_APPROVAL_SHOW, id);
    if (send_req(c, &q.r, &resp, NULL, 0) == 0 &&
        resp->result_case == KEYRAFT__RESPONSE__RESULT_APPROVAL)
        s = resp->approval->state;
    kr_response_free(resp);
    return s;
}

/* Sends |q| expecting KR_EPENDING; the approval id it names. */
static void expect_pending(kr_client *c, struct rq *q, char *id, size_t cap)
{
    Keyraft__Response *resp = EXPECT(c, q, KR_EPENDING, NULL);
    assert_non_null(resp->approval_id);
    assert_true(strlen(resp->approval_id) > 0);
    snprintf(id, cap, "%s", resp->approval_id);
    kr_response_free(resp);
}

static void vote(kr_client *c, const char *id, int approve, int want, const char *needle,
                 Keyraft__ApprovalState want_state)
{
    struct rq q;
    q_approval(&q, approve ? KEYRAFT__REQUEST__OP_APPROVAL_APPROVE
                           : KEYRAFT__REQUEST__OP_APPROVAL_DENY, id);
    q.u.ap.reason = (char *)"test";
    Keyraft__Response *resp = EXPECT(c, &q, want, needle);
    if (want == 0) {
        assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_APPROVAL);
        assert_string_equal(resp->approval->id, id);
        if (resp->approval->state != want_state)
            fail_msg("approval %s is in state %d after the vote, want %d", id,
                     (int)resp->approval->state, (int)want_state);
    }
    kr_response_free(resp);
}

static void test_quorum(void **state)
{
    struct single *f = *state;
    struct env *e = &f->e;
    struct rq q;
    char a_export[40], a_destroy[40], a_denied[40], a_expired[40], a_admin[40];
    uint8_t material[32];

    struct who *o1 = who_new(e, "q-o1", "officer", "apps", "default");
    struct who *o2 = who_new(e, "q-o2", "officer", "apps", "default");
    struct who *o3 = who_new(e, "q-o3", "officer", "apps", "default");
    struct who *u1 = who_new(e, "q-u1", "user", "apps", "default");

    for (size_t i = 0; i < sizeof(material); i++)
        material[i] = (uint8_t)(0xa0 + i);
    q_import(&q, "q-known", material, sizeof(material), "apps");
    Keyraft__Response *resp = EXPECT(o1->c, &q, 0, NULL);
    char *kx = strdup(resp->key->id);
    kr_response_free(resp);

    q_quorum_set(&q, "export", 2, "officer", 0);
    resp = EXPECT(e->admin, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_QUORUM);
    kr_response_free(resp);
    q_quorum_set(&q, "destroy", 2, "officer", 0);
    EXPECT_DONE(e->admin, &q, 0, NULL);
    q_simple(&q, KEYRAFT__REQUEST__OP_QUORUM_LIST);
    resp = EXPECT(o1->c, &q, 0, NULL);
    assert_int_equal(resp->quorum->n_rules, 2);
    kr_response_free(resp);

    /* export: held, then 2 officers approve, then the requester runs it once */
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    expect_pending(u1->c, &q, a_export, sizeof(a_export));
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_export;
    resp = EXPECT(u1->c, &q, KR_EPENDING, NULL);
    assert_string_equal(resp->approval_id, a_export);
    kr_response_free(resp);
    assert_int_equal(approval_state(o1->c, a_export), KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING);
    vote(u1->c, a_export, 1, KR_EPERM, "officer", 0);
    vote(o1->c, a_export, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING);
    vote(o1->c, a_export, 1, KR_EEXIST, NULL, 0);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_export;
    EXPECT_DONE(u1->c, &q, KR_EPENDING, NULL);
    vote(o2->c, a_export, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED);
    /* only the requester may use it */
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_export;
    EXPECT_DONE(e->app, &q, KR_EPERM, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_export;
    resp = EXPECT(u1->c, &q, 0, NULL);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_EXPORT);
    assert_int_equal(resp->export->material.len, sizeof(material));
    assert_memory_equal(resp->export->material.data, material, sizeof(material));
    kr_response_free(resp);
    assert_int_equal(approval_state(o1->c, a_export), KEYRAFT__APPROVAL_STATE__APPROVAL_DONE);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_export;
    EXPECT_DONE(u1->c, &q, KR_EPERM, NULL);
    /* and without one, it is held again */
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    char again[40];
    expect_pending(u1->c, &q, again, sizeof(again));
    assert_string_not_equal(again, a_export);

    /* destroy: the requester cannot approve its own; the second approval runs it */
    char *kd = key_new(o1->c, "q-destroy", KEYRAFT__ALGORITHM__AES_256, "apps", NULL, NULL, 0, 0);
    q_key(&q, KEYRAFT__REQUEST__OP_DEACTIVATE, kd);
    EXPECT_DONE(o1->c, &q, 0, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_DESTROY, kd);
    expect_pending(o1->c, &q, a_destroy, sizeof(a_destroy));
    vote(o1->c, a_destroy, 1, KR_EPERM, "cannot approve", 0);
    vote(o2->c, a_destroy, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING);
    vote(o3->c, a_destroy, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED);
    q_key(&q, KEYRAFT__REQUEST__OP_GET, kd);
    uint64_t deadline = kc_now_ms() + FOLLOWER_WAIT_MS;
    Keyraft__KeyState kst = KEYRAFT__KEY_STATE__STATE_UNSPECIFIED;
    while (kst != KEYRAFT__KEY_STATE__DESTROYED && kc_now_ms() < deadline) {
        resp = EXPECT(o1->c, &q, 0, NULL);
        kst = resp->key->state;
        kr_response_free(resp);
        if (kst != KEYRAFT__KEY_STATE__DESTROYED)
            kc_sleep_ms(POLL_MS);
    }
    if (kst != KEYRAFT__KEY_STATE__DESTROYED) {
        kr_node_dump_log(&f->node, 2000);
        fail_msg("the approved destroy did not run: key state %s", kr_state_name(kst));
    }
    deadline = kc_now_ms() + FOLLOWER_WAIT_MS;
    while (approval_state(o2->c, a_destroy) != KEYRAFT__APPROVAL_STATE__APPROVAL_DONE &&
           kc_now_ms() < deadline)
        kc_sleep_ms(POLL_MS);
    assert_int_equal(approval_state(o2->c, a_destroy), KEYRAFT__APPROVAL_STATE__APPROVAL_DONE);
    q_key(&q, KEYRAFT__REQUEST__OP_DESTROY, kd);
    q.r.approval_id = a_destroy;
    {
        char msg[512];
        int st = send_req(o1->c, &q.r, NULL, msg, sizeof(msg));
        if (st == 0)
            fail_msg("a spent destroy approval ran again");
    }

    /* deny: one denial ends it */
    char *kd2 = key_new(o1->c, "q-denied", KEYRAFT__ALGORITHM__AES_256, "apps", NULL, NULL, 0, 0);
    q_key(&q, KEYRAFT__REQUEST__OP_DEACTIVATE, kd2);
    EXPECT_DONE(o1->c, &q, 0, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_DESTROY, kd2);
    expect_pending(o1->c, &q, a_denied, sizeof(a_denied));
    vote(o2->c, a_denied, 0, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED);
    vote(o3->c, a_denied, 1, KR_ESTATE, NULL, 0);
    q_key(&q, KEYRAFT__REQUEST__OP_DESTROY, kd2);
    q.r.approval_id = a_denied;
    EXPECT_DONE(o1->c, &q, KR_EPERM, "denied");
    q_key(&q, KEYRAFT__REQUEST__OP_GET, kd2);
    resp = EXPECT(o1->c, &q, 0, NULL);
    assert_int_equal(resp->key->state, KEYRAFT__KEY_STATE__DEACTIVATED);
    kr_response_free(resp);

    /* expiry */
    q_quorum_set(&q, "export", 2, "officer", 1500);
    EXPECT_DONE(e->admin, &q, 0, NULL);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    expect_pending(u1->c, &q, a_expired, sizeof(a_expired));
    kc_sleep_ms(2000);
    vote(o1->c, a_expired, 1, KR_ETIMEDOUT, NULL, 0);
    q_simple(&q, KEYRAFT__REQUEST__OP_APPROVAL_LIST);
    q.u.al.all = 1;
    resp = EXPECT(o1->c, &q, 0, NULL);
    int found = 0;
    for (size_t i = 0; i < resp->approvals->n_approvals; i++) {
        const Keyraft__ApprovalInfo *a = resp->approvals->approvals[i];
        if (strcmp(a->id, a_expired) == 0) {
            found = 1;
            assert_int_equal(a->state, KEYRAFT__APPROVAL_STATE__APPROVAL_EXPIRED);
            assert_string_equal(a->requester, "q-u1");
            assert_string_equal(a->operation, "export");
        }
        if (strcmp(a->id, a_export) == 0)
            assert_int_equal(a->state, KEYRAFT__APPROVAL_STATE__APPROVAL_DONE);
    }
    kr_response_free(resp);
    assert_true(found);
    q_key(&q, KEYRAFT__REQUEST__OP_EXPORT, kx);
    q.r.approval_id = a_expired;
    EXPECT_DONE(u1->c, &q, KR_ETIMEDOUT, NULL);
    /* pending-only listing leaves it out */
    q_simple(&q, KEYRAFT__REQUEST__OP_APPROVAL_LIST);
    resp = EXPECT(o1->c, &q, 0, NULL);
    for (size_t i = 0; i < resp->approvals->n_approvals; i++)
        assert_string_not_equal(resp->approvals->approvals[i]->id, a_expired);
    kr_response_free(resp);

    /* principal_admin: creating an admin needs two other admins */
    who_new(e, "q-admin2", "admin", NULL, NULL);
    who_new(e, "q-admin3", "admin", NULL, NULL);
    struct who *adm2 = &e->people[e->n_people - 2], *adm3 = &e->people[e->n_people - 1];
    q_quorum_set(&q, "principal_admin", 2, "admin", 0);
    EXPECT_DONE(e->admin, &q, 0, NULL);
    {
        uint8_t *pem = NULL;
        size_t len = 0;
        char cert[KR_PATH_MAX + 128], key[KR_PATH_MAX + 128];
        snprintf(cert, sizeof(cert), "%s/q-admin4.pem", e->scratch);
        snprintf(key, sizeof(key), "%s/q-admin4.key", e->scratch);
        assert_int_equal(pki_issue_client(e->ca, e->ca_key, "q-admin4", "admin", 30, cert, key),
                         0);
        assert_int_equal(kr_read_file(cert, &pem, &len), 0);
        q_principal_create(&q, "q-admin4", "admin", NULL, NULL, (const char *)pem);
        expect_pending(e->admin, &q, a_admin, sizeof(a_admin));
        free(pem);
    }
    /* a non-admin principal is not held */
    who_new(e, "q-plain", "user", "apps", "default");
    vote(o1->c, a_admin, 1, KR_EPERM, "admin", 0);
    vote(adm2->c, a_admin, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING);
    vote(adm3->c, a_admin, 1, 0, NULL, KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED);
    deadline = kc_now_ms() + FOLLOWER_WAIT_MS;
    found = 0;
    while (!found && kc_now_ms() < deadline) {
        q_simple(&q, KEYRAFT__REQUEST__OP_PRINCIPAL_LIST);
        resp = EXPECT(e->admin, &q, 0, NULL);
        for (size_t i = 0; i < resp->principals->n_principals; i++)
            if (strcmp(resp->principals->principals[i]->name, "q-admin4") == 0)
                found = 1;
        kr_response_free(resp);
        if (!found)
            kc_sleep_ms(POLL_MS);
    }
    assert_true(found);

    /* the rules go, so that later tests run without them */
    const char *rules[] = {"export", "destroy", "principal_admin"};
    for (size_t i = 0; i < 3; i++) {
        q_quorum_set(&q, rules[i], 0, "", 0);
        EXPECT_DONE(e->admin, &q, 0, NULL);
    }
    q_simple(&q, KEYRAFT__REQUEST__OP_QUORUM_LIST);
    resp = EXPECT(e->admin, &q, 0, NULL);
    assert_int_equal(resp->quorum->n_rules, 0);
    kr_response_free(resp);

    snprintf(f->export_approval, sizeof(f->export_approval), "%s", a_export);
    snprintf(f->destroy_approval, sizeof(f->destroy_approval), "%s", a_destroy);
    f->quorum_ran = 1;
    free(kx);
    free(kd);
    free(kd2);
}

/* The approvals in the audit trail: the held request, each vote, and the
 * approved operation, each naming the approval. */
static void test_audit_approvals(void **state)
{
    struct single *f = *state;
    size_t n = 0;
    Keyraft__AuditRecord **recs = NULL;
    uint64_t deadline = kc_now_ms() + AUDIT_WAIT_MS;
    const char *ex = f->export_approval, *de = f->destroy_approval;

    if (!f->quorum_ran)
        fail_msg("the quorum test did not run to its end");
    for (;;) {
        recs = audit_all(f->e.auditor, 0, &n);
        int complete =
            audit_find(recs, n, "q-u1", "export", KR_EPENDING, ex) >= 0 &&
            audit_find(recs, n, "q-o1", "approval_approve", 0, ex) >= 0 &&
            audit_find(recs, n, "q-o2", "approval_approve", 0, ex) >= 0 &&
            audit_find(recs, n, "q-u1", "export", 0, ex) >= 0 &&
            audit_find(recs, n, "q-o1", "destroy", KR_EPENDING, de) >= 0 &&
            audit_find(recs, n, "q-o2", "approval_approve", 0, de) >= 0 &&
            audit_find(recs, n, "q-o3", "approval_approve", 0, de) >= 0 &&
            audit_find(recs, n, "q-o1", "destroy", 0, de) >= 0;
        if (complete || kc_now_ms() >= deadline)
            break;
        audit_free(recs, n);
        kc_sleep_ms(200);
    }
    const struct {
        const char *who, *op;
        int status;
        const char *approval;
    } want[] = {
        {"q-u1", "export", KR_EPENDING, ex},  {"q-u1", "approval_approve", KR_EPERM, ex},
        {"q-o1", "approval_approve", 0, ex},  {"q-o1", "approval_approve", KR_EEXIST, ex},
        {"q-o2", "approval_approve", 0, ex},  {"q-u1", "export", 0, ex},
        {"q-o1", "destroy", KR_EPENDING, de}, {"q-o1", "approval_approve", KR_EPERM, de},
        {"q-o2", "approval_approve", 0, de},  {"q-o3", "approval_approve", 0, de},
        {"q-o1", "destroy", 0, de},
    };
    size_t missing = 0;
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        if (audit_find(recs, n, want[i].who, want[i].op, want[i].status, want[i].approval) < 0) {
            print_error("no audit record: %s %s status %s approval %s\n", want[i].who, want[i].op,
                        kr_status_name(want[i].status), want[i].approval ? want[i].approval : "(any)");
            missing++;
        }
    /* the export that ran names its key and version */
    long i = audit_find(recs, n, "q-u1", "export", 0, ex);
    if (i >= 0) {
        assert_int_equal(strlen(recs[i]->key_id), 32);
        assert_int_equal(recs[i]->key_version, 1);
    }
    audit_free(recs, n);
    assert_int_equal(missing, 0);
}

/* ================================================================================== */
/* Tamper: one node, stopped and edited offline between runs                          */
/* ================================================================================== */

/* Sets [audit] checkpoint_ms in DIR/keyraftd.conf (the config the node wrote
 * at init). */
static int set_checkpoint_ms(const struct kr_node *n, unsigned ms)
{
    char path[KR_PATH_MAX + 32];
    uint8_t *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof(path), "%s/keyraftd.conf", n->dir);
    if (kr_read_file(path, &text, &len) != 0)
        return -1;
    size_t cap = len + 64;
    char *out = malloc(cap);
    if (out == NULL) {
        free(text);
        return -1;
    }
    size_t o = 0;
    int replaced = 0;
    for (char *line = (char *)text; *line;) {
        char *nl = strchr(line, '\n');
        size_t l = nl ? (size_t)(nl - line) + 1 : strlen(line);
        if (strncmp(line, "checkpoint_ms", 13) == 0) {
            o += (size_t)snprintf(out + o, cap - o, "checkpoint_ms = %u\n", ms);
            replaced = 1;
        } else {
            memcpy(out + o, line, l);
            o += l;
        }
        line += l;
    }
    if (!replaced) {
        /* Only the audit branch's config knows the section: without it the
         * node would refuse the file. */
        fprintf(stderr, "keyraftd.conf has no [audit] checkpoint_ms: left as it is\n");
    }
    int rc = replaced ? kr_write_file(path, out, o) : 0;
    free(out);
    free(text);
    return rc;
}

struct tamper {
    struct kr_node node;
    struct env e;
};

static int tamper_setup(void **state)
{
    struct tamper *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    if (kr_node_init(&f->node) != 0 || set_checkpoint_ms(&f->node, 200) != 0 ||
        kr_node_start(&f->node) != 0 || env_init(&f->e, &f->node, f->node.ccfg.endpoints) != 0) {
        env_free(&f->e);
        kr_node_destroy(&f->node);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int tamper_teardown(void **state)
{
    struct tamper *f = *state;
    if (f == NULL)
        return 0;
    env_free(&f->e);
    int alive = kr_node_alive(&f->node);
    int rc = alive ? kr_node_stop(&f->node) : 0;
    kr_node_destroy(&f->node);
    free(f);
    return alive && rc != 0 ? -1 : 0;
}

static void seq_key(uint64_t seq, uint8_t k[8])
{
    for (int i = 0; i < 8; i++)
        k[i] = (uint8_t)(seq >> (56 - 8 * i));
}

/* Offline edits of the audit column family. */
enum edit { EDIT_BYTE, EDIT_DELETE, EDIT_SWAP, EDIT_RESTORE };

struct saved {
    uint64_t seq;
    uint8_t *v[2];
    size_t len[2];
};

static void edit_store(struct tamper *f, enum edit what, struct saved *s)
{
    char path[KR_PATH_MAX + 16];
    struct store *st = NULL;
    struct store_batch *b = store_batch_new();
    uint8_t k0[8], k1[8];

    assert_int_equal(kr_node_stop(&f->node), 0);
    snprintf(path, sizeof(path), "%s/db", f->node.dir);
    assert_int_equal(store_open(path, &st), 0);
    assert_non_null(b);
    seq_key(s->seq, k0);
    seq_key(s->seq + 1, k1);
    if (what != EDIT_RESTORE) {
        for (int i = 0; i < 2; i++)
            assert_int_equal(store_get(st, STORE_CF_AUDIT, i ? k1 : k0, 8, &s->v[i], &s->len[i]),
                             0);
    }
    switch (what) {
    case EDIT_BYTE: {
        Keyraft__AuditEntry *e = keyraft__audit_entry__unpack(NULL, s->len[0], s->v[0]);
        assert_non_null(e);
        assert_int_equal(e->seq, s->seq);
        assert_true(e->record.len > 4);
        e->record.data[e->record.len / 2] ^= 0x01; /* the stored hash stays */
        size_t len = keyraft__audit_entry__get_packed_size(e);
        uint8_t *buf = malloc(len);
        assert_non_null(buf);
        keyraft__audit_entry__pack(e, buf);
        store_batch_put(b, STORE_CF_AUDIT, k0, 8, buf, len);
        free(buf);
        keyraft__audit_entry__free_unpacked(e, NULL);
        break;
    }
    case EDIT_DELETE:
        store_batch_delete(b, STORE_CF_AUDIT, k0, 8);
        break;
    case EDIT_SWAP:
        store_batch_put(b, STORE_CF_AUDIT, k0, 8, s->v[1], s->len[1]);
        store_batch_put(b, STORE_CF_AUDIT, k1, 8, s->v[0], s->len[0]);
        break;
    case EDIT_RESTORE:
        store_batch_put(b, STORE_CF_AUDIT, k0, 8, s->v[0], s->len[0]);
        store_batch_put(b, STORE_CF_AUDIT, k1, 8, s->v[1], s->len[1]);
        break;
    }
    assert_int_equal(store_batch_commit(st, b, store_applied_index(st)), 0);
    assert_int_equal(store_flush(st), 0);
    store_batch_free(b);
    store_close(st);
    if (what == EDIT_RESTORE) {
        free(s->v[0]);
        free(s->v[1]);
        s->v[0] = s->v[1] = NULL;
    }
    assert_int_equal(kr_node_start(&f->node), 0);
}

/* Verify as the auditor on a fresh connection (the node restarted). */
static void verify_expect(struct tamper *f, int ok, uint64_t bad_seq, const char *word)
{
    kr_client *aud = NULL;
    assert_int_equal(kr_node_client_as(&f->node, "auditor", 30000, &aud), 0);
    struct rq q;
    q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_VERIFY);
    Keyraft__Response *resp = EXPECT(aud, &q, 0, NULL);
    const Keyraft__AuditVerifyResponse *v = resp->audit_verify;
    if (v->ok != ok || (!ok && (v->first_bad_seq != bad_seq || v->problem == NULL ||
                                strstr(v->problem, word) == NULL))) {
        print_error("audit verify: ok=%d first_bad_seq=%llu problem \"%s\"; want ok=%d at %llu "
                    "naming \"%s\"\n", v->ok, (unsigned long long)v->first_bad_seq,
                    v->problem ? v->problem : "", ok, (unsigned long long)bad_seq,
                    word ? word : "");
        kr_response_free(resp);
        kr_client_free(aud);
        fail();
    }
    kr_response_free(resp);
    kr_client_free(aud);
}

static void test_tamper(void **state)
{
    struct tamper *f = *state;
    struct rq q;
    Keyraft__Response *resp = NULL;

    for (int i = 0; i < 50; i++) {
        q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
        EXPECT_DONE(f->e.app, &q, 0, NULL);
    }
    /* at least 50 records and a signed checkpoint over them */
    uint64_t deadline = kc_now_ms() + AUDIT_WAIT_MS;
    for (;;) {
        resp = audit_verify(f->e.auditor);
        int ready = resp->audit_verify->ok && resp->audit_verify->records >= 50 &&
                    resp->audit_verify->checkpoints >= 1 &&
                    resp->audit_verify->last_checkpoint_seq >= 40;
        if (ready || kc_now_ms() >= deadline)
            break;
        kr_response_free(resp);
        kc_sleep_ms(100);
    }
    if (!resp->audit_verify->ok || resp->audit_verify->records < 50 ||
        resp->audit_verify->checkpoints < 1)
        fail_msg("audit before tampering: ok=%d records=%llu checkpoints=%llu problem \"%s\"",
                 resp->audit_verify->ok, (unsigned long long)resp->audit_verify->records,
                 (unsigned long long)resp->audit_verify->checkpoints,
                 resp->audit_verify->problem);
    kr_response_free(resp);
    kr_client_free(f->e.app);
    kr_client_free(f->e.auditor);
    kr_client_free(f->e.admin);
    f->e.app = f->e.auditor = f->e.admin = NULL;

    struct saved s = {.seq = 10};
    edit_store(f, EDIT_BYTE, &s);
    verify_expect(f, 0, 10, "edited");
    edit_store(f, EDIT_RESTORE, &s);
    verify_expect(f, 1, 0, NULL);

    s.seq = 20;
    edit_store(f, EDIT_DELETE, &s);
    verify_expect(f, 0, 20, "missing");
    edit_store(f, EDIT_RESTORE, &s);
    verify_expect(f, 1, 0, NULL);

    s.seq = 30;
    edit_store(f, EDIT_SWAP, &s);
    verify_expect(f, 0, 30, "reordered");
    edit_store(f, EDIT_RESTORE, &s);
    verify_expect(f, 1, 0, NULL);
}

/* ================================================================================== */
/* Three nodes                                                                        */
/* ================================================================================== */

struct trio {
    struct kc_cluster c;
    struct env e;
};

static int trio_setup(void **state)
{
    struct trio *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    if (kc_cluster_create(&f->c, 3, 0, 0) != 0) {
        free(f);
        return -1;
    }
    if (env_init(&f->e, &f->c.nodes[0].n, f->c.endpoints) != 0) {
        env_free(&f->e);
        kc_cluster_destroy(&f->c);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int trio_teardown(void **state)
{
    struct trio *f = *state;
    if (f == NULL)
        return 0;
    env_free(&f->e);
    int unclean = kc_cluster_destroy(&f->c);
    free(f);
    return unclean == 0 ? 0 : -1;
}

/* Every member running, one leader, all serving. */
static int trio_ready(void **state)
{
    struct trio *f = *state;
    for (size_t i = 0; i < f->c.n; i++) {
        struct kc_node *node = &f->c.nodes[i];
        if (node->n.pid > 0 && !kr_node_alive(&node->n)) {
            fprintf(stderr, "node %llu died during an earlier test\n",
                    (unsigned long long)node->id);
            kr_node_dump_log(&node->n, 3000);
            kr_node_kill9(&node->n);
            kc_node_start(node, 30000);
            return -1;
        }
        if (node->n.pid == 0 && kc_node_start(node, 30000) != 0)
            return -1;
    }
    if (kc_leader(&f->c, 0, 15000) < 0)
        return -1;
    for (size_t i = 0; i < f->c.n; i++)
        if (kc_wait_serving(&f->c.nodes[i], 15000) != 0)
            return -1;
    return 0;
}

static void test_cluster_revocation(void **state)
{
    struct trio *f = *state;
    struct env *e = &f->e;
    struct rq q;
    kr_client *per_node[KC_MAX_NODES] = {0};

    struct who *rv = who_new(e, "crv-user", "user", "apps", "default");
    for (size_t i = 0; i < f->c.n; i++) {
        per_node[i] = who_client(e, rv, f->c.nodes[i].endpoint);
        q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
        if (poll_until(per_node[i], &q, 0, NULL, FOLLOWER_WAIT_MS) != 0)
            fail_msg("node %zu does not know the new principal", i + 1);
    }
    q_principal_revoke(&q, "crv-user");
    EXPECT_DONE(e->admin, &q, 0, NULL);
    for (size_t i = 0; i < f->c.n; i++) {
        q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
        if (poll_until(per_node[i], &q, KR_EPERM, "revoked", FOLLOWER_WAIT_MS) != 0)
            fail_msg("node %zu still serves a revoked certificate", i + 1);
        kr_client *fresh = who_client(e, rv, f->c.nodes[i].endpoint);
        EXPECT_DONE(fresh, &q, KR_EPERM, "revoked");
        kr_client_free(fresh);
    }
    for (size_t i = 0; i < f->c.n; i++)
        kr_client_free(per_node[i]);
}

static kr_client *node_client(struct trio *f, size_t i, const char *principal)
{
    kr_client *c = NULL;
    assert_int_equal(kr_node_client_as(&f->c.nodes[i].n, principal, 10000, &c), 0);
    return c;
}

static int wait_usage_everywhere(struct trio *f, const char *id, long long want)
{
    int rc = 0;
    for (size_t i = 0; i < f->c.n; i++) {
        kr_client *c = node_client(f, i, "app");
        if (wait_usage(c, id, 1, want, USAGE_WAIT_MS) != 0) {
            print_error("(on node %zu)\n", i + 1);
            rc = -1;
        }
        kr_client_free(c);
    }
    return rc;
}

static void test_cluster_usage(void **state)
{
    struct trio *f = *state;
    struct env *e = &f->e;
    struct rq q;
    const long long n = 9;

    char *id = key_new(e->app, "cu-counted", KEYRAFT__ALGORITHM__AES_256, "apps", NULL, NULL, 0, 0);
    for (long long k = 0; k < n; k++) {
        kr_client *c = node_client(f, (size_t)k % f->c.n, "app");
        q_encrypt(&q, id, "spread");
        /* a follower may not have the key yet */
        assert_int_equal(poll_until(c, &q, 0, NULL, FOLLOWER_WAIT_MS), 0);
        kr_client_free(c);
    }
    assert_int_equal(wait_usage_everywhere(f, id, n), 0);

    /* a follower restarts, then the leader dies and comes back */
    int leader = kc_leader(&f->c, 0, 10000);
    assert_true(leader >= 0);
    size_t follower = ((size_t)leader + 1) % f->c.n;
    assert_int_equal(kr_node_stop(&f->c.nodes[follower].n), 0);
    assert_int_equal(kc_node_start(&f->c.nodes[follower], 30000), 0);
    assert_int_equal(kr_node_kill9(&f->c.nodes[leader].n), 0);
    int next = kc_leader(&f->c, 0x7u & ~(1u << leader), 15000);
    assert_true(next >= 0 && next != leader);
    assert_int_equal(kc_node_start(&f->c.nodes[leader], 30000), 0);
    assert_true(kc_leader(&f->c, 0, 15000) >= 0);
    assert_int_equal(wait_usage_everywhere(f, id, n), 0);
    /* counting goes on under the new leader */
    for (size_t i = 0; i < f->c.n; i++) {
        kr_client *c = node_client(f, i, "app");
        q_encrypt(&q, id, "after");
        assert_int_equal(poll_until(c, &q, 0, NULL, FOLLOWER_WAIT_MS), 0);
        kr_client_free(c);
    }
    assert_int_equal(wait_usage_everywhere(f, id, n + (long long)f->c.n), 0);

    /* a limit reached through one node holds on the others */
    char *lim = key_new(e->app, "cu-limited", KEYRAFT__ALGORITHM__AES_256, "apps", NULL, NULL, 4, 0);
    kr_client *a = node_client(f, 0, "app");
    for (int k = 0; k < 4; k++) {
        q_encrypt(&q, lim, "limited");
        assert_int_equal(poll_until(a, &q, 0, NULL, FOLLOWER_WAIT_MS), 0);
    }
    q_encrypt(&q, lim, "over");
    EXPECT_DONE(a, &q, KR_ESTATE, "usage limit");
    kr_client_free(a);
    for (size_t i = 1; i < f->c.n; i++) {
        kr_client *c = node_client(f, i, "app");
        assert_int_equal(wait_usage(c, lim, 1, 4, USAGE_WAIT_MS), 0);
        q_encrypt(&q, lim, "over");
        EXPECT_DONE(c, &q, KR_ESTATE, "usage limit");
        kr_client_free(c);
    }
    free(lim);
    free(id);
}

/* One hash chain: every node holds the same entry at the same seq, and the
 * heads meet once traffic pauses. */
static void test_cluster_audit_head(void **state)
{
    struct trio *f = *state;
    struct rq q;
    kr_client *aud[KC_MAX_NODES] = {0};

    for (int k = 0; k < 20; k++) {
        q_simple(&q, KEYRAFT__REQUEST__OP_RANDOM);
        kr_client *c = node_client(f, (size_t)k % f->c.n, "app");
        EXPECT_DONE(c, &q, 0, NULL);
        kr_client_free(c);
    }
    for (size_t i = 0; i < f->c.n; i++)
        aud[i] = node_client(f, i, "auditor");

    /* the head on node 1, then the same entry on every node */
    q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_READ);
    Keyraft__Response *resp = EXPECT(aud[0], &q, 0, NULL);
    assert_int_equal(resp->audit->n_entries, 1);
    uint64_t seq = resp->audit->entries[0]->seq;
    ProtobufCBinaryData h = resp->audit->entries[0]->hash;
    uint8_t hash[32];
    assert_int_equal(h.len, 32);
    memcpy(hash, h.data, 32);
    kr_response_free(resp);
    assert_true(seq >= 20);
    for (size_t i = 0; i < f->c.n; i++) {
        uint64_t deadline = kc_now_ms() + AUDIT_WAIT_MS;
        int same = 0;
        while (!same && kc_now_ms() < deadline) {
            q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_READ);
            q.u.ar.tail = 0;
            q.u.ar.after_seq = seq - 1;
            q.u.ar.limit = 1;
            resp = EXPECT(aud[i], &q, 0, NULL);
            if (resp->audit->n_entries == 1) {
                const Keyraft__AuditEntry *en = resp->audit->entries[0];
                assert_int_equal(en->seq, seq);
                assert_int_equal(en->hash.len, 32);
                if (memcmp(en->hash.data, hash, 32) != 0)
                    fail_msg("node %zu holds another record at seq %llu", i + 1,
                             (unsigned long long)seq);
                same = 1;
            }
            kr_response_free(resp);
            if (!same)
                kc_sleep_ms(POLL_MS);
        }
        if (!same)
            fail_msg("node %zu never got audit record %llu", i + 1, (unsigned long long)seq);
        resp = audit_verify(aud[i]);
        if (!resp->audit_verify->ok)
            fail_msg("node %zu: audit verify: %s at %llu", i + 1, resp->audit_verify->problem,
                     (unsigned long long)resp->audit_verify->first_bad_seq);
        kr_response_free(resp);
    }
    /* Reads are recorded too, so heads move, and a follower learns of a
     * commit with the leader's next message (a heartbeat at most ~100 ms
     * later): after a quiet pause of a few heartbeats, three back-to-back
     * reads see one head. */
    int met = 0;
    for (int attempt = 0; attempt < 20 && !met; attempt++) {
        uint64_t seqs[KC_MAX_NODES];
        uint8_t hashes[KC_MAX_NODES][32];
        kc_sleep_ms(500 * SLOW);
        for (size_t i = 0; i < f->c.n; i++) {
            q_simple(&q, KEYRAFT__REQUEST__OP_AUDIT_READ);
            resp = EXPECT(aud[i], &q, 0, NULL);
            assert_int_equal(resp->audit->n_entries, 1);
            seqs[i] = resp->audit->entries[0]->seq;
            memcpy(hashes[i], resp->audit->entries[0]->hash.data, 32);
            kr_response_free(resp);
        }
        met = 1;
        for (size_t i = 1; i < f->c.n; i++)
            if (seqs[i] != seqs[0] || memcmp(hashes[i], hashes[0], 32) != 0)
                met = 0;
    }
    for (size_t i = 0; i < f->c.n; i++)
        kr_client_free(aud[i]);
    assert_true(met);
}

int main(void)
{
    const struct CMUnitTest single[] = {
        cmocka_unit_test_setup(test_role_matrix, single_alive),
        cmocka_unit_test_setup(test_key_policy, single_alive),
        cmocka_unit_test_setup(test_domains, single_alive),
        cmocka_unit_test_setup(test_revocation, single_alive),
        cmocka_unit_test_setup(test_usage_limit, single_alive),
        cmocka_unit_test_setup(test_quorum, single_alive),
        cmocka_unit_test_setup(test_audit_denials, single_alive),
        cmocka_unit_test_setup(test_audit_approvals, single_alive),
    };
    const struct CMUnitTest tamper[] = {
        cmocka_unit_test(test_tamper),
    };
    const struct CMUnitTest trio[] = {
        cmocka_unit_test_setup(test_cluster_revocation, trio_ready),
        cmocka_unit_test_setup(test_cluster_usage, trio_ready),
        cmocka_unit_test_setup(test_cluster_audit_head, trio_ready),
    };
    int failed = 0;

    if (getenv("KR_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    failed += cmocka_run_group_tests_name("gov_single", single, single_setup, single_teardown);
    failed += cmocka_run_group_tests_name("gov_tamper", tamper, tamper_setup, tamper_teardown);
    failed += cmocka_run_group_tests_name("gov_cluster", trio, trio_setup, trio_teardown);
    return failed;
}
