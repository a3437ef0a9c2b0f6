/* policy.c: role, grant and quorum decisions (policy.h). */
#include "policy.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "keyraft.h"

#define NAME_MAX_CHARS 64
#define MAX_GROUPS 32
#define MAX_DOMAINS 32

static const struct {
    unsigned bit;
    const char *name;
} ROLES[] = {
    {POLICY_ADMIN, "admin"},
    {POLICY_OFFICER, "officer"},
    {POLICY_USER, "user"},
    {POLICY_AUDITOR, "auditor"},
};

/* Grantable operations on a key. */
static const char *const GRANTS[] = {"get",  "encrypt",    "decrypt",  "sign",
                                     "verify", "mac",      "verify_mac", "data_key",
                                     "wrap", "unwrap",     "export"};

unsigned policy_role_bit(const char *name)
{
    for (size_t i = 0; i < sizeof(ROLES) / sizeof(ROLES[0]); i++)
        if (strcmp(name, ROLES[i].name) == 0)
            return ROLES[i].bit;
    return 0;
}

unsigned policy_roles_of(char *const *names, size_t n, const char **unknown)
{
    unsigned bits = 0;
    if (unknown != NULL)
        *unknown = NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned b = policy_role_bit(names[i]);
        if (b == 0 && unknown != NULL && *unknown == NULL)
            *unknown = names[i];
        bits |= b;
    }
    return bits;
}

void policy_roles_text(unsigned roles, char *out, size_t cap)
{
    size_t used = 0;
    if (cap == 0)
        return;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof(ROLES) / sizeof(ROLES[0]); i++) {
        if (!(roles & ROLES[i].bit))
            continue;
        size_t need = strlen(ROLES[i].name) + (used ? 1 : 0);
        if (need >= cap - used)
            return; /* whole names only */
        snprintf(out + used, cap - used, "%s%s", used ? "," : "", ROLES[i].name);
        used += need;
    }
    if (roles & POLICY_NODE)
        snprintf(out + used, cap - used, "%snode", used ? "," : "");
    if (out[0] == '\0')
        snprintf(out, cap, "none");
}

unsigned policy_op_roles(Keyraft__Request__OpCase op)
{
    switch (op) {
    case KEYRAFT__REQUEST__OP_CREATE:
    case KEYRAFT__REQUEST__OP_IMPORT:
    case KEYRAFT__REQUEST__OP_ACTIVATE:
    case KEYRAFT__REQUEST__OP_DEACTIVATE:
    case KEYRAFT__REQUEST__OP_REVOKE:
    case KEYRAFT__REQUEST__OP_DESTROY:
    case KEYRAFT__REQUEST__OP_ROTATE:
        return POLICY_OFFICER;
    case KEYRAFT__REQUEST__OP_GET:
    case KEYRAFT__REQUEST__OP_LIST:
    case KEYRAFT__REQUEST__OP_RANDOM:
        return POLICY_OFFICER | POLICY_USER;
    case KEYRAFT__REQUEST__OP_EXPORT:
    case KEYRAFT__REQUEST__OP_ENCRYPT:
    case KEYRAFT__REQUEST__OP_DECRYPT:
    case KEYRAFT__REQUEST__OP_SIGN:
    case KEYRAFT__REQUEST__OP_VERIFY:
    case KEYRAFT__REQUEST__OP_MAC:
    case KEYRAFT__REQUEST__OP_VERIFY_MAC:
    case KEYRAFT__REQUEST__OP_DATA_KEY:
    case KEYRAFT__REQUEST__OP_WRAP:
    case KEYRAFT__REQUEST__OP_UNWRAP:
        return POLICY_USER;
    case KEYRAFT__REQUEST__OP_STATUS:
        return POLICY_ANY_PRINCIPAL | POLICY_NODE;
    case KEYRAFT__REQUEST__OP_CLUSTER_LIST:
    case KEYRAFT__REQUEST__OP_PRINCIPAL_LIST:
        return POLICY_ADMIN | POLICY_AUDITOR;
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD:
    case KEYRAFT__REQUEST__OP_CLUSTER_PROMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_DEMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_REMOVE:
    case KEYRAFT__REQUEST__OP_CLUSTER_TRANSFER:
    case KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE:
    case KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE:
    case KEYRAFT__REQUEST__OP_DOMAIN_CREATE:
    case KEYRAFT__REQUEST__OP_DOMAIN_DESTROY:
    case KEYRAFT__REQUEST__OP_SET_POLICY:
    case KEYRAFT__REQUEST__OP_QUORUM_SET:
        return POLICY_ADMIN;
    case KEYRAFT__REQUEST__OP_BATCH: /* each request in it is checked on its own */
    case KEYRAFT__REQUEST__OP_DOMAIN_LIST:
    case KEYRAFT__REQUEST__OP_QUORUM_LIST:
    case KEYRAFT__REQUEST__OP_APPROVAL_LIST:
    case KEYRAFT__REQUEST__OP_APPROVAL_SHOW:
    case KEYRAFT__REQUEST__OP_APPROVAL_APPROVE: /* the rule's approver role is checked too */
    case KEYRAFT__REQUEST__OP_APPROVAL_DENY:
        return POLICY_ANY_PRINCIPAL;
    case KEYRAFT__REQUEST__OP_AUDIT_READ:
    case KEYRAFT__REQUEST__OP_AUDIT_VERIFY:
        return POLICY_AUDITOR;
    case KEYRAFT__REQUEST__OP_SNAPSHOT_OPEN:
    case KEYRAFT__REQUEST__OP_SNAPSHOT_READ:
    case KEYRAFT__REQUEST__OP_SNAPSHOT_CLOSE:
    case KEYRAFT__REQUEST__OP_AUDIT_SUBMIT:
        return POLICY_NODE;
    default:
        return 0;
    }
}

const char *policy_op_name(Keyraft__Request__OpCase op)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&keyraft__request__descriptor, (unsigned)op);
    return f != NULL && f->id >= 10 ? f->name : "unknown";
}

int policy_is_key_use(Keyraft__Request__OpCase op)
{
    return policy_op_roles(op) == POLICY_USER;
}

const char *policy_grant_name(Keyraft__Request__OpCase op)
{
    switch (op) {
    case KEYRAFT__REQUEST__OP_GET: return "get";
    case KEYRAFT__REQUEST__OP_EXPORT: return "export";
    case KEYRAFT__REQUEST__OP_ENCRYPT: return "encrypt";
    case KEYRAFT__REQUEST__OP_DECRYPT: return "decrypt";
    case KEYRAFT__REQUEST__OP_SIGN: return "sign";
    case KEYRAFT__REQUEST__OP_VERIFY: return "verify";
    case KEYRAFT__REQUEST__OP_MAC: return "mac";
    case KEYRAFT__REQUEST__OP_VERIFY_MAC: return "verify_mac";
    case KEYRAFT__REQUEST__OP_DATA_KEY: return "data_key";
    case KEYRAFT__REQUEST__OP_WRAP: return "wrap";
    case KEYRAFT__REQUEST__OP_UNWRAP: return "unwrap";
    default: return NULL;
    }
}

int policy_grant_known(const char *op)
{
    for (size_t i = 0; i < sizeof(GRANTS) / sizeof(GRANTS[0]); i++)
        if (strcmp(op, GRANTS[i]) == 0)
            return 1;
    return 0;
}

static int in_list(char *const *list, size_t n, const char *s)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i], s) == 0)
            return 1;
    return 0;
}

int policy_key_allows(const Keyraft__KeyPolicy *policy, char *const *groups, size_t n_groups,
                      const char *op)
{
    if (policy == NULL || op == NULL)
        return 0;
    for (size_t g = 0; g < n_groups; g++) {
        const Keyraft__GroupGrant *grant = NULL;
        for (size_t i = 0; i < policy->n_grants; i++)
            if (strcmp(policy->grants[i]->group, groups[g]) == 0)
                grant = policy->grants[i];
        if (grant != NULL) {
            /* Attributes are visible to a group with any grant. */
            if (strcmp(op, "get") == 0 && grant->n_ops > 0)
                return 1;
            if (in_list(grant->ops, grant->n_ops, op))
                return 1;
            continue;
        }
        if (policy->owner_group[0] != '\0' && strcmp(policy->owner_group, groups[g]) == 0)
            return 1;
    }
    return 0;
}

int policy_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > NAME_MAX_CHARS)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static int names_check(char *const *names, size_t n, size_t max, const char *what, char *why,
                       size_t why_len)
{
    if (n > max) {
        snprintf(why, why_len, "at most %zu %s", max, what);
        return KR_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        if (!policy_name_valid(names[i])) {
            snprintf(why, why_len, "%s \"%.64s\" is not a name ([A-Za-z0-9._-], 1 to %d characters)",
                     what, names[i], NAME_MAX_CHARS);
            return KR_EINVAL;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(names[i], names[j]) == 0) {
                snprintf(why, why_len, "%s \"%s\" is listed twice", what, names[i]);
                return KR_EINVAL;
            }
    }
    return 0;
}

int policy_principal_check(const Keyraft__PrincipalInfo *p, char *why, size_t why_len)
{
    if (!policy_name_valid(p->name)) {
        snprintf(why, why_len, "principal name \"%.64s\" is not a name ([A-Za-z0-9._-], 1 to %d "
                               "characters)", p->name, NAME_MAX_CHARS);
        return KR_EINVAL;
    }
    if (strncasecmp(p->name, "node-", 5) == 0) {
        snprintf(why, why_len, "names starting with \"node-\" belong to cluster nodes");
        return KR_EINVAL;
    }
    if (p->n_roles == 0) {
        snprintf(why, why_len, "a principal needs at least one role (admin, officer, user, auditor)");
        return KR_EINVAL;
    }
    const char *unknown = NULL;
    unsigned roles = policy_roles_of(p->roles, p->n_roles, &unknown);
    if (unknown != NULL) {
        snprintf(why, why_len, "unknown role \"%.64s\" (roles: admin, officer, user, auditor)",
                 unknown);
        return KR_EINVAL;
    }
    if ((roles & POLICY_ADMIN) && roles != POLICY_ADMIN) {
        snprintf(why, why_len, "separation of duties: a principal with the admin role holds no "
                               "other role");
        return KR_EINVAL;
    }
    int rv = names_check(p->roles, p->n_roles, 4, "role", why, why_len);
    if (rv == 0)
        rv = names_check(p->groups, p->n_groups, MAX_GROUPS, "group", why, why_len);
    if (rv == 0)
        rv = names_check(p->domains, p->n_domains, MAX_DOMAINS, "domain", why, why_len);
    return rv;
}

int policy_key_policy_check(const Keyraft__KeyPolicy *p, char *why, size_t why_len)
{
    if (p->owner_group[0] != '\0' && !policy_name_valid(p->owner_group)) {
        snprintf(why, why_len, "owner group \"%.64s\" is not a name", p->owner_group);
        return KR_EINVAL;
    }
    if (p->n_grants > POLICY_MAX_GRANTS) {
        snprintf(why, why_len, "at most %d grants", POLICY_MAX_GRANTS);
        return KR_EINVAL;
    }
    for (size_t i = 0; i < p->n_grants; i++) {
        const Keyraft__GroupGrant *g = p->grants[i];
        if (!policy_name_valid(g->group)) {
            snprintf(why, why_len, "grant group \"%.64s\" is not a name", g->group);
            return KR_EINVAL;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(p->grants[j]->group, g->group) == 0) {
                snprintf(why, why_len, "group \"%s\" has two grants", g->group);
                return KR_EINVAL;
            }
        if (g->n_ops > sizeof(GRANTS) / sizeof(GRANTS[0])) {
            snprintf(why, why_len, "grant for \"%s\" lists too many operations", g->group);
            return KR_EINVAL;
        }
        for (size_t j = 0; j < g->n_ops; j++) {
            for (size_t k = 0; k < j; k++)
                if (strcmp(g->ops[j], g->ops[k]) == 0) {
                    snprintf(why, why_len, "grant for \"%s\" lists %.32s twice", g->group,
                             g->ops[j]);
                    return KR_EINVAL;
                }
            if (!policy_grant_known(g->ops[j])) {
                snprintf(why, why_len, "grant for \"%s\": unknown operation \"%.32s\" (get, "
                                       "encrypt, decrypt, sign, verify, mac, verify_mac, "
                                       "data_key, wrap, unwrap, export)", g->group, g->ops[j]);
                return KR_EINVAL;
            }
        }
    }
    return 0;
}

static const char *const QUORUM_OPS[] = {"export",         "destroy",        "domain_destroy",
                                         "policy_change",  "node_admission", "principal_admin"};

int policy_quorum_known(const char *name)
{
    for (size_t i = 0; i < sizeof(QUORUM_OPS) / sizeof(QUORUM_OPS[0]); i++)
        if (strcmp(name, QUORUM_OPS[i]) == 0)
            return 1;
    return 0;
}

const char *policy_quorum_default_role(const char *operation)
{
    return strcmp(operation, "export") == 0 || strcmp(operation, "destroy") == 0 ? "officer"
                                                                                : "admin";
}

const char *policy_quorum_operation(const Keyraft__Request *req)
{
    switch (req->op_case) {
    case KEYRAFT__REQUEST__OP_EXPORT: return "export";
    case KEYRAFT__REQUEST__OP_DESTROY: return "destroy";
    case KEYRAFT__REQUEST__OP_DOMAIN_DESTROY: return "domain_destroy";
    case KEYRAFT__REQUEST__OP_SET_POLICY:
    case KEYRAFT__REQUEST__OP_QUORUM_SET: return "policy_change";
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD: return "node_admission";
    case KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE: {
        const Keyraft__PrincipalCreateRequest *p = req->principal_create;
        for (size_t i = 0; p != NULL && i < p->n_roles; i++)
            if (strcmp(p->roles[i], "admin") == 0)
                return "principal_admin";
        return NULL;
    }
    default: return NULL;
    }
}
