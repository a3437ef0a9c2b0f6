/* status.c: status code names and descriptions, and the algorithm, state and
 * revocation reason names the CLI and JSON show. */
#include "keyraft.h"

#include <stddef.h>
#include <string.h>

struct status_entry {
    int code;
    const char *name;
    const char *text;
};

static const struct status_entry status_table[] = {
    {KR_OK, "KR_OK", "success"},
    {KR_EINVAL, "KR_EINVAL", "invalid argument or request"},
    {KR_ENOTFOUND, "KR_ENOTFOUND", "no such key, domain or name"},
    {KR_EEXIST, "KR_EEXIST", "the name is taken in this domain"},
    {KR_ESTATE, "KR_ESTATE", "the key's state forbids the operation"},
    {KR_EKEYTYPE, "KR_EKEYTYPE", "the key's algorithm does not fit the operation"},
    {KR_EPERM, "KR_EPERM", "refused by policy"},
    {KR_EAUTH, "KR_EAUTH", "integrity check failed: bad tag, signature or MAC"},
    {KR_ENOMEM, "KR_ENOMEM", "out of memory"},
    {KR_EIO, "KR_EIO", "storage error"},
    {KR_EHSM, "KR_EHSM", "the HSM refused or failed"},
    {KR_ECRYPTO, "KR_ECRYPTO", "a cryptographic primitive failed"},
    {KR_EPROTO, "KR_EPROTO", "malformed frame or message"},
    {KR_ETOOBIG, "KR_ETOOBIG", "a frame or field exceeds its limit"},
    {KR_ENOTLEADER, "KR_ENOTLEADER", "this node is not the leader"},
    {KR_EUNAVAIL, "KR_EUNAVAIL", "no quorum, shutting down, or not ready"},
    {KR_ETIMEDOUT, "KR_ETIMEDOUT", "no answer in time"},
    {KR_ECONN, "KR_ECONN", "cannot connect, or the connection broke"},
    {KR_ETLS, "KR_ETLS", "TLS handshake or certificate failure"},
    {KR_ECONFIG, "KR_ECONFIG", "bad configuration"},
    {KR_EBUSY, "KR_EBUSY", "overloaded: retry later"},
    {KR_EINTERNAL, "KR_EINTERNAL", "internal error (a bug: please report)"},
    {KR_EUNSUPPORTED, "KR_EUNSUPPORTED", "not supported by this build or algorithm"},
    {KR_EPENDING, "KR_EPENDING", "held for quorum approval"},
};

static const struct status_entry *status_find(int status)
{
    for (size_t i = 0; i < sizeof(status_table) / sizeof(status_table[0]); i++) {
        if (status_table[i].code == status)
            return &status_table[i];
    }
    return NULL;
}

const char *kr_strerror(int status)
{
    const struct status_entry *e = status_find(status);
    return e != NULL ? e->text : "unknown error";
}

const char *kr_status_name(int status)
{
    const struct status_entry *e = status_find(status);
    return e != NULL ? e->name : "KR_EUNKNOWN";
}

/* Index = enum value; entry 0 is the UNSPECIFIED value of each enum. */
static const char *const alg_names[] = {
    "unspecified", "aes-128",  "aes-256", "hmac-sha256", "hmac-sha512", "rsa-2048",
    "rsa-3072",    "rsa-4096", "ec-p256", "ec-p384",     "ed25519",
};

static const char *const state_names[] = {
    "unspecified", "pre-active", "active",   "deactivated",
    "compromised", "destroyed",  "destroyed-compromised",
};

static const char *const reason_names[] = {
    "unspecified",         "compromised",        "superseded", "cessation",
    "affiliation-changed", "privilege-withdrawn",
};

#define NAMES_LEN(a) (sizeof(a) / sizeof((a)[0]))

static const char *name_of(const char *const *names, size_t n, int value)
{
    if (value < 0 || (size_t)value >= n)
        return "unknown";
    return names[value];
}

/* Returns the index of |name| in |names|, or 0 (UNSPECIFIED) when unknown. */
static int parse_name(const char *const *names, size_t n, const char *name)
{
    if (name == NULL)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if (strcmp(names[i], name) == 0)
            return (int)i;
    }
    return 0;
}

const char *kr_alg_name(Keyraft__Algorithm alg)
{
    return name_of(alg_names, NAMES_LEN(alg_names), (int)alg);
}

Keyraft__Algorithm kr_alg_parse(const char *name)
{
    return (Keyraft__Algorithm)parse_name(alg_names, NAMES_LEN(alg_names), name);
}

const char *kr_state_name(Keyraft__KeyState state)
{
    return name_of(state_names, NAMES_LEN(state_names), (int)state);
}

Keyraft__KeyState kr_state_parse(const char *name)
{
    return (Keyraft__KeyState)parse_name(state_names, NAMES_LEN(state_names), name);
}

const char *kr_reason_name(Keyraft__RevokeReason reason)
{
    return name_of(reason_names, NAMES_LEN(reason_names), (int)reason);
}

Keyraft__RevokeReason kr_reason_parse(const char *name)
{
    return (Keyraft__RevokeReason)parse_name(reason_names, NAMES_LEN(reason_names), name);
}

int kr_op_is_write(Keyraft__Request__OpCase op)
{
    switch (op) {
    case KEYRAFT__REQUEST__OP_CREATE:
    case KEYRAFT__REQUEST__OP_IMPORT:
    case KEYRAFT__REQUEST__OP_ACTIVATE:
    case KEYRAFT__REQUEST__OP_DEACTIVATE:
    case KEYRAFT__REQUEST__OP_REVOKE:
    case KEYRAFT__REQUEST__OP_DESTROY:
    case KEYRAFT__REQUEST__OP_ROTATE:
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD:
    case KEYRAFT__REQUEST__OP_CLUSTER_PROMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_DEMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_REMOVE:
    case KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE:
    case KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE:
    case KEYRAFT__REQUEST__OP_DOMAIN_CREATE:
    case KEYRAFT__REQUEST__OP_DOMAIN_DESTROY:
    case KEYRAFT__REQUEST__OP_SET_POLICY:
    case KEYRAFT__REQUEST__OP_QUORUM_SET:
    case KEYRAFT__REQUEST__OP_APPROVAL_APPROVE:
    case KEYRAFT__REQUEST__OP_APPROVAL_DENY:
    case KEYRAFT__REQUEST__OP_AUDIT_SUBMIT:
        return 1;
    default:
        return 0;
    }
}

int kr_request_is_write(const Keyraft__Request *req)
{
    if (req == NULL)
        return 0;
    if (req->op_case != KEYRAFT__REQUEST__OP_BATCH)
        return kr_op_is_write(req->op_case);
    for (size_t i = 0; req->batch != NULL && i < req->batch->n_requests; i++)
        if (req->batch->requests[i] != NULL && kr_op_is_write(req->batch->requests[i]->op_case))
            return 1;
    return 0;
}
