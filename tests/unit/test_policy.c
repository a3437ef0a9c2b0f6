/* test_policy.c: role, grant, principal-shape and quorum decisions (policy.h),
 * checked against the intended separation-of-duties design written out here. */
#include "policy.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"

#define A POLICY_ADMIN
#define O POLICY_OFFICER
#define U POLICY_USER
#define AU POLICY_AUDITOR
#define N POLICY_NODE
#define ALL POLICY_ANY_PRINCIPAL

/* The design, one row per Request op: who may call it. Written by hand from
 * the role model, not copied from policy.c, so a drift in either shows. */
static const struct {
    const char *op;
    unsigned roles;
} EXPECTED[] = {
    /* key lifecycle: officer; attributes and randomness: officer and user */
    {"create", O},
    {"import", O},
    {"get", O | U},
    {"export", U},
    {"list", O | U},
    {"activate", O},
    {"deactivate", O},
    {"revoke", O},
    {"destroy", O},
    {"rotate", O},
    /* crypto on key material: user only */
    {"encrypt", U},
    {"decrypt", U},
    {"sign", U},
    {"verify", U},
    {"mac", U},
    {"verify_mac", U},
    {"data_key", U},
    {"wrap", U},
    {"unwrap", U},
    {"random", O | U},
    {"status", ALL | N},
    /* cluster: admin; listing also auditor */
    {"cluster_list", A | AU},
    {"cluster_add", A},
    {"cluster_promote", A},
    {"cluster_demote", A},
    {"cluster_remove", A},
    {"cluster_transfer", A},
    /* node to node */
    {"snapshot_open", N},
    {"snapshot_read", N},
    {"snapshot_close", N},
    /* governance: admin */
    {"principal_create", A},
    {"principal_revoke", A},
    {"principal_list", A | AU},
    {"domain_create", A},
    {"domain_destroy", A},
    {"domain_list", ALL},
    {"set_policy", A},
    {"quorum_set", A},
    {"quorum_list", ALL},
    {"approval_list", ALL},
    {"approval_show", ALL},
    {"approval_approve", ALL},
    {"approval_deny", ALL},
    /* audit */
    {"audit_read", AU},
    {"audit_verify", AU},
    {"audit_submit", N},
    /* a batch: each request in it is checked on its own */
    {"batch", ALL},
};
#define N_EXPECTED (sizeof(EXPECTED) / sizeof(EXPECTED[0]))

/* Ops on key material or crypto: never admin or auditor. */
static const char *const KEY_MATERIAL_OPS[] = {"export", "encrypt",  "decrypt",    "sign",
                                               "verify", "mac",      "verify_mac", "data_key",
                                               "wrap",   "unwrap"};
/* Governance ops: never officer or user. */
static const char *const GOVERNANCE_OPS[] = {"principal_create", "principal_revoke",
                                             "quorum_set",       "set_policy",
                                             "domain_create",    "domain_destroy"};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* The Request op case of a field name (oneof cases are the field numbers). */
static Keyraft__Request__OpCase op_of(const char *name)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(&keyraft__request__descriptor, name);
    assert_non_null(f);
    assert_true(f->id >= 10);
    return (Keyraft__Request__OpCase)f->id;
}

static const char *role_text(unsigned roles, char *buf, size_t cap)
{
    policy_roles_text(roles, buf, cap);
    return buf;
}

/* ---- roles per operation ------------------------------------------------------------------ */

static void test_op_roles_matrix(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *d = &keyraft__request__descriptor;
    size_t n_ops = 0;
    int mismatches = 0;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->id < 10)
            continue;
        n_ops++;
        size_t row = 0;
        while (row < N_EXPECTED && strcmp(EXPECTED[row].op, f->name) != 0)
            row++;
        if (row == N_EXPECTED) {
            /* A new op must be classified here before it ships. */
            print_error("op %s (%u) is missing from the expected role table\n", f->name, f->id);
            mismatches++;
            continue;
        }
        unsigned got = policy_op_roles((Keyraft__Request__OpCase)f->id);
        if (got != EXPECTED[row].roles) {
            char g[96], w[96];
            print_error("op %s: roles %s, expected %s\n", f->name, role_text(got, g, sizeof(g)),
                        role_text(EXPECTED[row].roles, w, sizeof(w)));
            mismatches++;
        }
    }
    assert_int_equal(mismatches, 0);
    /* Every row of the table names a real op. */
    assert_int_equal(n_ops, N_EXPECTED);
    for (size_t r = 0; r < N_EXPECTED; r++)
        (void)op_of(EXPECTED[r].op);
}

static void test_op_roles_unknown(void **state)
{
    (void)state;
    assert_int_equal(policy_op_roles(KEYRAFT__REQUEST__OP__NOT_SET), 0);
    assert_int_equal(policy_op_roles((Keyraft__Request__OpCase)1), 0); /* the id field */
    assert_int_equal(policy_op_roles((Keyraft__Request__OpCase)9), 0);
    assert_int_equal(policy_op_roles((Keyraft__Request__OpCase)9999), 0);
}

static void test_separation_of_duties(void **state)
{
    (void)state;
    for (size_t i = 0; i < COUNT(KEY_MATERIAL_OPS); i++) {
        unsigned r = policy_op_roles(op_of(KEY_MATERIAL_OPS[i]));
        if ((r & (POLICY_ADMIN | POLICY_AUDITOR)) != 0)
            fail_msg("key material op %s allowed to admin or auditor", KEY_MATERIAL_OPS[i]);
        assert_true((r & POLICY_USER) != 0);
        /* ... and such an op is a "key use", governed by the key's grants. */
        assert_true(policy_is_key_use(op_of(KEY_MATERIAL_OPS[i])));
        assert_non_null(policy_grant_name(op_of(KEY_MATERIAL_OPS[i])));
    }
    for (size_t i = 0; i < COUNT(GOVERNANCE_OPS); i++) {
        unsigned r = policy_op_roles(op_of(GOVERNANCE_OPS[i]));
        if ((r & (POLICY_OFFICER | POLICY_USER)) != 0)
            fail_msg("governance op %s allowed to officer or user", GOVERNANCE_OPS[i]);
        assert_int_equal(r, POLICY_ADMIN);
    }
    /* Across every op: admin never shares an op with key use, and no op
     * open to admin is open to user (except those open to every principal). */
    const ProtobufCMessageDescriptor *d = &keyraft__request__descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        if (d->fields[i].id < 10)
            continue;
        Keyraft__Request__OpCase op = (Keyraft__Request__OpCase)d->fields[i].id;
        unsigned r = policy_op_roles(op);
        if ((r & POLICY_ANY_PRINCIPAL) == POLICY_ANY_PRINCIPAL)
            continue;
        if ((r & POLICY_ADMIN) && (r & (POLICY_USER | POLICY_OFFICER)))
            fail_msg("op %s is shared by admin and officer/user", d->fields[i].name);
        if (policy_grant_name(op) != NULL && (r & (POLICY_ADMIN | POLICY_AUDITOR)))
            fail_msg("key op %s is open to admin or auditor", d->fields[i].name);
    }
}

static void test_key_use_and_grant_names(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *d = &keyraft__request__descriptor;
    size_t key_uses = 0, grants = 0;
    for (unsigned i = 0; i < d->n_fields; i++) {
        if (d->fields[i].id < 10)
            continue;
        Keyraft__Request__OpCase op = (Keyraft__Request__OpCase)d->fields[i].id;
        int material = 0;
        for (size_t k = 0; k < COUNT(KEY_MATERIAL_OPS); k++)
            material |= strcmp(KEY_MATERIAL_OPS[k], d->fields[i].name) == 0;
        assert_int_equal(policy_is_key_use(op), material);
        key_uses += (size_t)policy_is_key_use(op);
        const char *g = policy_grant_name(op);
        if (material || op == KEYRAFT__REQUEST__OP_GET) {
            /* Grants are spelled as the ops are. */
            assert_non_null(g);
            assert_string_equal(g, d->fields[i].name);
            assert_true(policy_grant_known(g));
            grants++;
        } else if (g != NULL) {
            fail_msg("op %s has grant name %s", d->fields[i].name, g);
        }
    }
    assert_int_equal(key_uses, COUNT(KEY_MATERIAL_OPS));
    assert_int_equal(grants, COUNT(KEY_MATERIAL_OPS) + 1);
    assert_false(policy_grant_known("destroy"));
    assert_false(policy_grant_known("rotate"));
    assert_false(policy_grant_known(""));
    assert_false(policy_grant_known("Encrypt"));
}

static void test_op_name(void **state)
{
    (void)state;
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_ENCRYPT), "encrypt");
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_VERIFY_MAC), "verify_mac");
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_DATA_KEY), "data_key");
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_CREATE), "create");
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_APPROVAL_APPROVE),
                        "approval_approve");
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP_AUDIT_SUBMIT), "audit_submit");
    /* Not ops: the header fields and unknown numbers. */
    assert_string_equal(policy_op_name(KEYRAFT__REQUEST__OP__NOT_SET), "unknown");
    assert_string_equal(policy_op_name((Keyraft__Request__OpCase)1), "unknown");
    assert_string_equal(policy_op_name((Keyraft__Request__OpCase)5), "unknown");
    assert_string_equal(policy_op_name((Keyraft__Request__OpCase)9999), "unknown");
    for (size_t r = 0; r < N_EXPECTED; r++)
        assert_string_equal(policy_op_name(op_of(EXPECTED[r].op)), EXPECTED[r].op);
}

/* ---- role names ----------------------------------------------------------------------------- */

static void test_role_names(void **state)
{
    (void)state;
    assert_int_equal(policy_role_bit("admin"), POLICY_ADMIN);
    assert_int_equal(policy_role_bit("officer"), POLICY_OFFICER);
    assert_int_equal(policy_role_bit("user"), POLICY_USER);
    assert_int_equal(policy_role_bit("auditor"), POLICY_AUDITOR);
    /* "node" is what a node certificate is, never a role to grant. */
    assert_int_equal(policy_role_bit("node"), 0);
    assert_int_equal(policy_role_bit("Admin"), 0);
    assert_int_equal(policy_role_bit(""), 0);

    char *names[] = {"user", "root", "auditor", "sudo"};
    const char *unknown = "sentinel";
    assert_int_equal(policy_roles_of(names, 4, &unknown), POLICY_USER | POLICY_AUDITOR);
    assert_string_equal(unknown, "root");
    assert_int_equal(policy_roles_of(names, 1, &unknown), POLICY_USER);
    assert_null(unknown);
    assert_int_equal(policy_roles_of(names, 4, NULL), POLICY_USER | POLICY_AUDITOR);
    assert_int_equal(policy_roles_of(NULL, 0, &unknown), 0);
    assert_null(unknown);
}

static void test_roles_text(void **state)
{
    (void)state;
    char buf[96];
    assert_string_equal(role_text(0, buf, sizeof(buf)), "none");
    assert_string_equal(role_text(POLICY_ADMIN, buf, sizeof(buf)), "admin");
    assert_string_equal(role_text(POLICY_OFFICER | POLICY_USER, buf, sizeof(buf)), "officer,user");
    assert_string_equal(role_text(POLICY_NODE, buf, sizeof(buf)), "node");
    assert_string_equal(role_text(POLICY_ANY_PRINCIPAL | POLICY_NODE, buf, sizeof(buf)),
                        "admin,officer,user,auditor,node");
    assert_string_equal(role_text(POLICY_AUDITOR | POLICY_NODE, buf, sizeof(buf)), "auditor,node");
    /* Short buffers stay terminated and within bounds. */
    memset(buf, 'x', sizeof(buf));
    policy_roles_text(POLICY_OFFICER | POLICY_USER, buf, 8);
    assert_string_equal(buf, "officer");
    assert_int_equal(buf[8], 'x');
    memset(buf, 'x', sizeof(buf));
    policy_roles_text(POLICY_ANY_PRINCIPAL | POLICY_NODE, buf, 3);
    assert_true(strlen(buf) < 3);
    assert_int_equal(buf[3], 'x');
    memset(buf, 'x', sizeof(buf));
    policy_roles_text(0, buf, 1);
    assert_int_equal(buf[0], '\0');
    assert_int_equal(buf[1], 'x');
    policy_roles_text(POLICY_ADMIN, buf, 0); /* writes nothing */
    assert_int_equal(buf[0], '\0');
}

/* ---- key grants ----------------------------------------------------------------------------- */

/* A KeyPolicy with up to 4 grants, all storage inside. */
struct kp {
    Keyraft__KeyPolicy p;
    Keyraft__GroupGrant g[40];
    Keyraft__GroupGrant *gp[40];
    char group[40][80];
    char *ops[40][16];
};

static void kp_init(struct kp *k, const char *owner)
{
    memset(k, 0, sizeof(*k));
    keyraft__key_policy__init(&k->p);
    k->p.owner_group = (char *)owner;
    k->p.grants = k->gp;
}

/* Adds a grant of the NULL-terminated |ops| to |group|. */
static void kp_grant(struct kp *k, const char *group, const char *const *ops)
{
    size_t i = k->p.n_grants++;
    assert_true(i < 40);
    keyraft__group_grant__init(&k->g[i]);
    snprintf(k->group[i], sizeof(k->group[i]), "%s", group);
    k->g[i].group = k->group[i];
    size_t n = 0;
    while (ops != NULL && ops[n] != NULL) {
        assert_true(n < 16);
        k->ops[i][n] = (char *)ops[n];
        n++;
    }
    k->g[i].ops = k->ops[i];
    k->g[i].n_ops = n;
    k->gp[i] = &k->g[i];
}

static const char *const ALL_GRANTS[] = {"get",  "encrypt", "decrypt",    "sign",
                                         "verify", "mac",   "verify_mac", "data_key",
                                         "wrap", "unwrap",  "export"};

static int allows(const struct kp *k, const char *g1, const char *g2, const char *op)
{
    char *groups[2] = {(char *)g1, (char *)g2};
    return policy_key_allows(&k->p, groups, g2 != NULL ? 2 : 1, op);
}

static void test_key_allows_owner_defaults(void **state)
{
    (void)state;
    struct kp *k = calloc(1, sizeof(*k));
    assert_non_null(k);
    kp_init(k, "payments");
    for (size_t i = 0; i < COUNT(ALL_GRANTS); i++) {
        assert_true(policy_grant_known(ALL_GRANTS[i]));
        /* The owner group gets every use, export included. */
        assert_int_equal(allows(k, "payments", NULL, ALL_GRANTS[i]), 1);
        assert_int_equal(allows(k, "other", "payments", ALL_GRANTS[i]), 1);
        /* Anyone else gets nothing. */
        assert_int_equal(allows(k, "other", NULL, ALL_GRANTS[i]), 0);
        assert_int_equal(allows(k, "Payments", "payments2", ALL_GRANTS[i]), 0);
    }
    /* No groups at all, or a NULL policy, or no op: nobody. */
    char *none[1] = {NULL};
    assert_int_equal(policy_key_allows(&k->p, none, 0, "encrypt"), 0);
    char *g[1] = {"payments"};
    assert_int_equal(policy_key_allows(NULL, g, 1, "encrypt"), 0);
    assert_int_equal(policy_key_allows(&k->p, g, 1, NULL), 0);

    /* An empty owner group is nobody's, even a caller with an empty group. */
    kp_init(k, "");
    char *empty[1] = {""};
    assert_int_equal(policy_key_allows(&k->p, empty, 1, "encrypt"), 0);
    assert_int_equal(policy_key_allows(&k->p, empty, 1, "get"), 0);
    free(k);
}

static void test_key_allows_grants(void **state)
{
    (void)state;
    struct kp *k = calloc(1, sizeof(*k));
    assert_non_null(k);
    kp_init(k, "payments");
    static const char *const ENC[] = {"encrypt", NULL};
    static const char *const DEC[] = {"decrypt", "verify", NULL};
    kp_grant(k, "payments", ENC); /* replaces the owner's defaults */
    kp_grant(k, "readers", DEC);
    kp_grant(k, "nobody", NULL);  /* a grant with no ops: nothing at all */

    /* The owner group now has exactly its grant (plus get). */
    assert_int_equal(allows(k, "payments", NULL, "encrypt"), 1);
    assert_int_equal(allows(k, "payments", NULL, "get"), 1);
    assert_int_equal(allows(k, "payments", NULL, "decrypt"), 0);
    assert_int_equal(allows(k, "payments", NULL, "export"), 0);
    assert_int_equal(allows(k, "payments", NULL, "sign"), 0);

    /* A granted group: its ops and get, nothing more. */
    assert_int_equal(allows(k, "readers", NULL, "decrypt"), 1);
    assert_int_equal(allows(k, "readers", NULL, "verify"), 1);
    assert_int_equal(allows(k, "readers", NULL, "get"), 1);
    assert_int_equal(allows(k, "readers", NULL, "encrypt"), 0);
    assert_int_equal(allows(k, "readers", NULL, "export"), 0);

    /* An empty grant takes away even get. */
    for (size_t i = 0; i < COUNT(ALL_GRANTS); i++)
        assert_int_equal(allows(k, "nobody", NULL, ALL_GRANTS[i]), 0);

    /* Several groups: any one allowing is enough. */
    assert_int_equal(allows(k, "nobody", "readers", "decrypt"), 1);
    assert_int_equal(allows(k, "payments", "readers", "decrypt"), 1);
    assert_int_equal(allows(k, "payments", "readers", "encrypt"), 1);
    assert_int_equal(allows(k, "payments", "readers", "export"), 0);
    assert_int_equal(allows(k, "stranger", "outsider", "get"), 0);

    /* A grant to a non-owner group without the owner having one keeps the
     * owner's defaults. */
    kp_init(k, "payments");
    kp_grant(k, "readers", DEC);
    assert_int_equal(allows(k, "payments", NULL, "export"), 1);
    assert_int_equal(allows(k, "payments", NULL, "sign"), 1);
    assert_int_equal(allows(k, "readers", NULL, "sign"), 0);
    assert_int_equal(allows(k, "readers", NULL, "get"), 1);

    /* No owner at all: only grants count. */
    kp_init(k, "");
    kp_grant(k, "readers", DEC);
    assert_int_equal(allows(k, "readers", NULL, "decrypt"), 1);
    assert_int_equal(allows(k, "payments", NULL, "decrypt"), 0);
    free(k);
}

/* ---- principal shapes ------------------------------------------------------------------------ */

struct pr {
    Keyraft__PrincipalInfo p;
    char *roles[8];
    char *groups[40];
    char *domains[40];
    char names[80][70];
};

static void pr_init(struct pr *x, const char *name, const char *roles)
{
    memset(x, 0, sizeof(*x));
    keyraft__principal_info__init(&x->p);
    x->p.name = (char *)name;
    x->p.roles = x->roles;
    x->p.groups = x->groups;
    x->p.domains = x->domains;
    /* |roles|: comma separated */
    static char buf[8][32];
    size_t n = 0;
    const char *s = roles;
    while (s != NULL && *s != '\0' && n < 8) {
        size_t l = strcspn(s, ",");
        snprintf(buf[n], sizeof(buf[n]), "%.*s", (int)l, s);
        x->roles[n] = buf[n];
        n++;
        s += l;
        if (*s == ',')
            s++;
    }
    x->p.n_roles = n;
}

static int pcheck(struct pr *x, const char *why_has)
{
    char why[256] = "";
    int rv = policy_principal_check(&x->p, why, sizeof(why));
    if (rv != 0) {
        assert_int_equal(rv, KR_EINVAL);
        assert_true(why[0] != '\0');
        if (why_has != NULL && strstr(why, why_has) == NULL)
            fail_msg("reason \"%s\" lacks \"%s\"", why, why_has);
    }
    return rv;
}

static void test_principal_check(void **state)
{
    (void)state;
    struct pr *x = calloc(1, sizeof(*x));
    assert_non_null(x);

    pr_init(x, "alice", "officer,user");
    x->groups[0] = "payments";
    x->groups[1] = "hr";
    x->p.n_groups = 2;
    x->domains[0] = "default";
    x->p.n_domains = 1;
    assert_int_equal(pcheck(x, NULL), 0);

    pr_init(x, "root-admin", "admin");
    assert_int_equal(pcheck(x, NULL), 0);
    pr_init(x, "aud.1_x-Y", "auditor");
    assert_int_equal(pcheck(x, NULL), 0);
    pr_init(x, "all", "officer,user,auditor");
    assert_int_equal(pcheck(x, NULL), 0);

    /* Separation of duties: admin holds no other role. */
    static const char *const WITH_ADMIN[] = {"admin,officer", "officer,admin", "admin,user",
                                             "admin,auditor", "user,auditor,admin"};
    for (size_t i = 0; i < COUNT(WITH_ADMIN); i++) {
        pr_init(x, "bob", WITH_ADMIN[i]);
        assert_int_equal(pcheck(x, "separation"), KR_EINVAL);
    }

    /* Roles: at least one, all known. */
    pr_init(x, "bob", "");
    assert_int_equal(pcheck(x, "at least one role"), KR_EINVAL);
    pr_init(x, "bob", "user,root");
    assert_int_equal(pcheck(x, "unknown role \"root\""), KR_EINVAL);
    pr_init(x, "bob", "node");
    assert_int_equal(pcheck(x, "unknown role"), KR_EINVAL);
    pr_init(x, "bob", "user,user");
    assert_int_equal(pcheck(x, "twice"), KR_EINVAL);
    pr_init(x, "bob", "admin,admin");
    assert_int_equal(pcheck(x, NULL), KR_EINVAL);

    /* Names. */
    char longname[70];
    memset(longname, 'n', 64);
    longname[64] = '\0';
    pr_init(x, longname, "user");
    assert_int_equal(pcheck(x, NULL), 0);
    longname[64] = 'n';
    longname[65] = '\0';
    pr_init(x, longname, "user");
    assert_int_equal(pcheck(x, "not a name"), KR_EINVAL);
    static const char *const BAD[] = {"", "a b", "a/b", "CN=x", "é", "a\nb", "a,b", "a*"};
    for (size_t i = 0; i < COUNT(BAD); i++) {
        pr_init(x, BAD[i], "user");
        assert_int_equal(pcheck(x, "not a name"), KR_EINVAL);
    }
    /* Cluster node identities are not principals. */
    pr_init(x, "node-1", "admin");
    assert_int_equal(pcheck(x, "node-"), KR_EINVAL);
    pr_init(x, "node-", "user");
    assert_int_equal(pcheck(x, "node-"), KR_EINVAL);
    pr_init(x, "nodes", "user");
    assert_int_equal(pcheck(x, NULL), 0);

    /* Groups: well-formed, distinct, at most 32. */
    pr_init(x, "carol", "user");
    x->groups[0] = "g1";
    x->groups[1] = "g2";
    x->groups[2] = "g1";
    x->p.n_groups = 3;
    assert_int_equal(pcheck(x, "twice"), KR_EINVAL);
    x->groups[2] = "bad group";
    assert_int_equal(pcheck(x, "not a name"), KR_EINVAL);
    x->groups[2] = "";
    assert_int_equal(pcheck(x, "not a name"), KR_EINVAL);
    pr_init(x, "carol", "user");
    for (size_t i = 0; i < 33; i++) {
        snprintf(x->names[i], sizeof(x->names[i]), "group%zu", i);
        x->groups[i] = x->names[i];
    }
    x->p.n_groups = 32;
    assert_int_equal(pcheck(x, NULL), 0);
    x->p.n_groups = 33;
    assert_int_equal(pcheck(x, "at most 32"), KR_EINVAL);

    /* Domains likewise. */
    pr_init(x, "carol", "officer");
    for (size_t i = 0; i < 33; i++) {
        snprintf(x->names[40 + i], sizeof(x->names[40 + i]), "dom%zu", i);
        x->domains[i] = x->names[40 + i];
    }
    x->p.n_domains = 32;
    assert_int_equal(pcheck(x, NULL), 0);
    x->p.n_domains = 33;
    assert_int_equal(pcheck(x, "at most 32"), KR_EINVAL);
    x->p.n_domains = 2;
    x->domains[1] = "dom0";
    assert_int_equal(pcheck(x, "twice"), KR_EINVAL);
    x->domains[1] = "d/1";
    assert_int_equal(pcheck(x, "not a name"), KR_EINVAL);
    free(x);
}

/* ---- key policy shapes ---------------------------------------------------------------------- */

static int kcheck(struct kp *k, const char *why_has)
{
    char why[256] = "";
    int rv = policy_key_policy_check(&k->p, why, sizeof(why));
    if (rv != 0) {
        assert_int_equal(rv, KR_EINVAL);
        if (why_has != NULL && strstr(why, why_has) == NULL)
            fail_msg("reason \"%s\" lacks \"%s\"", why, why_has);
    }
    return rv;
}

static void test_key_policy_check(void **state)
{
    (void)state;
    struct kp *k = calloc(1, sizeof(*k));
    assert_non_null(k);
    static const char *const OK[] = {"encrypt", "decrypt", NULL};
    static const char *const ALLG[] = {"get",  "encrypt", "decrypt",    "sign",
                                       "verify", "mac",   "verify_mac", "data_key",
                                       "wrap", "unwrap",  "export",     NULL};

    kp_init(k, "");
    assert_int_equal(kcheck(k, NULL), 0); /* empty policy */
    kp_init(k, "payments");
    kp_grant(k, "readers", OK);
    kp_grant(k, "payments", ALLG);
    kp_grant(k, "empty", NULL);
    assert_int_equal(kcheck(k, NULL), 0);

    /* Unknown operation (lifecycle ops are not grants). */
    static const char *const BADOPS[][2] = {{"delete", NULL}, {"destroy", NULL},
                                            {"Encrypt", NULL}, {"", NULL}};
    for (size_t i = 0; i < COUNT(BADOPS); i++) {
        kp_init(k, "payments");
        kp_grant(k, "readers", OK);
        kp_grant(k, "writers", BADOPS[i]);
        assert_int_equal(kcheck(k, "unknown operation"), KR_EINVAL);
    }

    /* Two grants for one group. */
    kp_init(k, "payments");
    kp_grant(k, "readers", OK);
    kp_grant(k, "writers", OK);
    kp_grant(k, "readers", OK);
    assert_int_equal(kcheck(k, "two grants"), KR_EINVAL);

    /* Malformed group names. */
    kp_init(k, "payments");
    kp_grant(k, "read ers", OK);
    assert_int_equal(kcheck(k, "not a name"), KR_EINVAL);
    kp_init(k, "payments");
    kp_grant(k, "", OK);
    assert_int_equal(kcheck(k, "not a name"), KR_EINVAL);
    kp_init(k, "pay/ments");
    assert_int_equal(kcheck(k, "owner group"), KR_EINVAL);

    /* At most 32 grants; at most the known ops per grant. */
    kp_init(k, "payments");
    char names[33][16];
    for (int i = 0; i < 33; i++) {
        snprintf(names[i], sizeof(names[i]), "g%d", i);
        kp_grant(k, names[i], OK);
    }
    assert_int_equal(kcheck(k, "at most 32"), KR_EINVAL);
    k->p.n_grants = 32;
    assert_int_equal(kcheck(k, NULL), 0);
    static const char *const TOO_MANY[] = {"get",  "encrypt", "decrypt",    "sign",
                                           "verify", "mac",   "verify_mac", "data_key",
                                           "wrap", "unwrap",  "export",     "get", NULL};
    kp_init(k, "payments");
    kp_grant(k, "readers", TOO_MANY);
    assert_int_equal(kcheck(k, NULL), KR_EINVAL);
    free(k);
}

/* ---- quorum rules --------------------------------------------------------------------------- */

static const char *quorum_of(Keyraft__Request__OpCase op)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = op;
    return policy_quorum_operation(&req);
}

static void test_quorum_operation(void **state)
{
    (void)state;
    static const struct {
        Keyraft__Request__OpCase op;
        const char *rule;
    } RULES[] = {
        {KEYRAFT__REQUEST__OP_EXPORT, "export"},
        {KEYRAFT__REQUEST__OP_DESTROY, "destroy"},
        {KEYRAFT__REQUEST__OP_DOMAIN_DESTROY, "domain_destroy"},
        {KEYRAFT__REQUEST__OP_SET_POLICY, "policy_change"},
        {KEYRAFT__REQUEST__OP_QUORUM_SET, "policy_change"},
        {KEYRAFT__REQUEST__OP_CLUSTER_ADD, "node_admission"},
    };
    for (size_t i = 0; i < COUNT(RULES); i++) {
        const char *got = quorum_of(RULES[i].op);
        assert_non_null(got);
        assert_string_equal(got, RULES[i].rule);
        assert_true(policy_quorum_known(got));
    }
    /* Every other op (principal_create aside, below) falls under no rule. */
    const ProtobufCMessageDescriptor *d = &keyraft__request__descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        Keyraft__Request__OpCase op = (Keyraft__Request__OpCase)d->fields[i].id;
        if (d->fields[i].id < 10 || op == KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE)
            continue;
        int listed = 0;
        for (size_t r = 0; r < COUNT(RULES); r++)
            listed |= RULES[r].op == op;
        if (!listed && quorum_of(op) != NULL)
            fail_msg("op %s falls under quorum rule %s", d->fields[i].name, quorum_of(op));
    }
    assert_null(quorum_of(KEYRAFT__REQUEST__OP_ENCRYPT));
    assert_null(quorum_of(KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE));

    /* principal_create: a rule only when it creates an admin. */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__PrincipalCreateRequest pc = KEYRAFT__PRINCIPAL_CREATE_REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE;
    assert_null(policy_quorum_operation(&req)); /* no body */
    req.principal_create = &pc;
    assert_null(policy_quorum_operation(&req)); /* no roles */
    char *user[] = {"officer", "user"};
    pc.roles = user;
    pc.n_roles = 2;
    assert_null(policy_quorum_operation(&req));
    char *admin[] = {"admin"};
    pc.roles = admin;
    pc.n_roles = 1;
    assert_non_null(policy_quorum_operation(&req));
    assert_string_equal(policy_quorum_operation(&req), "principal_admin");
    char *mixed[] = {"user", "admin"};
    pc.roles = mixed;
    pc.n_roles = 2;
    assert_non_null(policy_quorum_operation(&req));
    assert_string_equal(policy_quorum_operation(&req), "principal_admin");
}

static void test_quorum_names_and_default_roles(void **state)
{
    (void)state;
    static const char *const KNOWN[] = {"export",         "destroy",        "domain_destroy",
                                        "policy_change",  "node_admission", "principal_admin"};
    for (size_t i = 0; i < COUNT(KNOWN); i++)
        assert_true(policy_quorum_known(KNOWN[i]));
    assert_false(policy_quorum_known("encrypt"));
    assert_false(policy_quorum_known("set_policy"));
    assert_false(policy_quorum_known(""));
    assert_false(policy_quorum_known("Export"));

    /* Key operations: officers approve; the rest: admins. */
    assert_string_equal(policy_quorum_default_role("export"), "officer");
    assert_string_equal(policy_quorum_default_role("destroy"), "officer");
    assert_string_equal(policy_quorum_default_role("domain_destroy"), "admin");
    assert_string_equal(policy_quorum_default_role("policy_change"), "admin");
    assert_string_equal(policy_quorum_default_role("node_admission"), "admin");
    assert_string_equal(policy_quorum_default_role("principal_admin"), "admin");
    for (size_t i = 0; i < COUNT(KNOWN); i++)
        assert_true(policy_role_bit(policy_quorum_default_role(KNOWN[i])) != 0);
}

static void test_name_valid(void **state)
{
    (void)state;
    assert_true(policy_name_valid("a"));
    assert_true(policy_name_valid("A.b_c-9"));
    char s[70];
    memset(s, 'z', sizeof(s));
    s[64] = '\0';
    assert_true(policy_name_valid(s));
    s[64] = 'z';
    s[65] = '\0';
    assert_false(policy_name_valid(s));
    assert_false(policy_name_valid(""));
    assert_false(policy_name_valid(" a"));
    assert_false(policy_name_valid("a\tb"));
    assert_false(policy_name_valid("a:b"));
    assert_false(policy_name_valid("a@b"));
    assert_false(policy_name_valid("\xc3\xa9"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_roles_matrix),
        cmocka_unit_test(test_op_roles_unknown),
        cmocka_unit_test(test_separation_of_duties),
        cmocka_unit_test(test_key_use_and_grant_names),
        cmocka_unit_test(test_op_name),
        cmocka_unit_test(test_role_names),
        cmocka_unit_test(test_roles_text),
        cmocka_unit_test(test_key_allows_owner_defaults),
        cmocka_unit_test(test_key_allows_grants),
        cmocka_unit_test(test_principal_check),
        cmocka_unit_test(test_key_policy_check),
        cmocka_unit_test(test_quorum_operation),
        cmocka_unit_test(test_quorum_names_and_default_roles),
        cmocka_unit_test(test_name_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
