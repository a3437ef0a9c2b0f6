/* policy.h: who may do what. Pure decisions, no I/O: roles per operation,
 * per-key group grants, principal shapes, and which requests need a quorum.
 *
 * Roles (separation of duties): admin runs the cluster, principals, domains
 * and policy, and never touches key material or crypto; officer runs key
 * lifecycle; user runs crypto on keys its groups may use; auditor reads the
 * audit trail. A principal holding admin holds no other role, so no single
 * principal both manages policy and uses keys. */
#ifndef KR_POLICY_H
#define KR_POLICY_H

#include <stddef.h>

#include "keyraft.pb-c.h"

enum policy_role {
    POLICY_ADMIN = 1u << 0,
    POLICY_OFFICER = 1u << 1,
    POLICY_USER = 1u << 2,
    POLICY_AUDITOR = 1u << 3,
    POLICY_NODE = 1u << 4, /* a cluster node's certificate */
};
#define POLICY_MAX_GRANTS 32 /* grants in one key policy */
#define POLICY_ANY_PRINCIPAL (POLICY_ADMIN | POLICY_OFFICER | POLICY_USER | POLICY_AUDITOR)

/* A role's bit from its name; 0 for an unknown name. */
unsigned policy_role_bit(const char *name);

/* The roles bits of a list of names; *unknown (may be NULL) gets the first
 * unknown name, or NULL. */
unsigned policy_roles_of(char *const *names, size_t n, const char **unknown);

/* Comma-joined role names of |roles| into |out|. */
void policy_roles_text(unsigned roles, char *out, size_t cap);

/* The roles any one of which may call |op| (POLICY_NODE for node-only
 * operations); 0 for an unknown operation. */
unsigned policy_op_roles(Keyraft__Request__OpCase op);

/* The operation's name as audit records and grants spell it ("encrypt"). */
const char *policy_op_name(Keyraft__Request__OpCase op);

/* 1 for operations on a key's material a user runs under a group grant. */
int policy_is_key_use(Keyraft__Request__OpCase op);

/* The grant name covering |op| for policy_key_allows ("encrypt", "export",
 * "get", ...); NULL for operations not governed by key grants. */
const char *policy_grant_name(Keyraft__Request__OpCase op);

/* Whether one of |groups| may run grant |op| on a key with |policy|: a group
 * with an explicit grant gets exactly its listed operations; the owner group,
 * without one, gets every use (export still needs an exportable key, and
 * the quorum rule when one is set). NULL policy: nobody. */
int policy_key_allows(const Keyraft__KeyPolicy *policy, char *const *groups, size_t n_groups,
                      const char *op);

/* 1 when |op| is a grantable operation name. */
int policy_grant_known(const char *op);

/* Checks a principal's shape; 0, or KR_EINVAL with the reason in |why|:
 * at least one role, known roles only, admin alone, names and groups
 * [A-Za-z0-9._-]{1,64}, at most 32 groups and 32 domains. */
int policy_principal_check(const Keyraft__PrincipalInfo *p, char *why, size_t why_len);

/* Checks a key policy: owner group and grant groups well-formed, known
 * operations, at most 32 grants. */
int policy_key_policy_check(const Keyraft__KeyPolicy *p, char *why, size_t why_len);

/* The quorum rule name a request falls under ("export", "destroy",
 * "domain_destroy", "policy_change", "node_admission", "principal_admin"),
 * or NULL when no rule can apply. */
const char *policy_quorum_operation(const Keyraft__Request *req);

/* 1 when |name| is a rule policy_quorum_operation can return. */
int policy_quorum_known(const char *name);

/* The default approver role of a rule: officer for key operations, admin
 * otherwise. */
const char *policy_quorum_default_role(const char *operation);

/* 1 when |s| is a well-formed name ([A-Za-z0-9._-]{1,64}). */
int policy_name_valid(const char *s);

#endif
