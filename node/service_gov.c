/* service_gov.c: governance. Identifies callers from the principal registry,
 * checks roles, holds sensitive requests for quorum approval, records every
 * request in the audit trail, counts key usage, and serves the principal,
 * domain, policy, approval and audit operations. Loop thread only. */
#include "service_internal.h"

#define KR_LOG_MODULE "gov"
#include <errno.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "audit.h"
#include "crypto.h"
#include "hash.h"
#include "hsm.h"
#include "keyraft.h"
#include "log.h"
#include "pki.h"
#include "policy.h"
#include "rpc.h"

#define APPROVAL_TTL_DEFAULT_MS (24ull * 3600 * 1000)
#define APPROVAL_TTL_MAX_MS (30ull * 24 * 3600 * 1000)
#define APPROVAL_LIST_MAX 1000
#define PRINCIPAL_LIST_MAX 10000
#define DOMAIN_LIST_MAX 10000
#define AUDIT_PAGE_MAX 1000
#define REASON_MAX 1024
#define QUORUM_MAX 16
#define BOOTSTRAP_FILE "bootstrap-principals"
#define AUDIT_RECORD_STACK 4096
#define AUDIT_FIELD_MAX 256   /* key reference, approval id, request id in a record */
#define AUDIT_MESSAGE_MAX 600 /* a reply's message (reply_error makes at most 511) */

/* --- the principal cache ------------------------------------------------------------ */

static unsigned slot_of(const char *name)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % PRINCIPAL_CACHE_SLOTS;
}

static void ref_put(struct principal_ref *r)
{
    if (r != NULL && --r->refs == 0) {
        keyraft__principal_info__free_unpacked(r->info, NULL);
        free(r);
    }
}

static void cache_flush(struct service *svc)
{
    for (size_t i = 0; i < PRINCIPAL_CACHE_SLOTS; i++) {
        ref_put(svc->principals[i]);
        svc->principals[i] = NULL;
    }
}

void gov_free(struct service *svc) { cache_flush(svc); }

/* A counted reference to |name|'s registry entry (release with ref_put). */
static int principal_lookup(struct service *svc, const char *name, struct principal_ref **out)
{
    unsigned long epoch = fsm_governance_epoch();
    if (epoch != svc->principals_epoch) {
        cache_flush(svc);
        svc->principals_epoch = epoch;
    }
    unsigned slot = slot_of(name);
    struct principal_ref *r = svc->principals[slot];
    if (r != NULL && strcmp(r->info->name, name) == 0) {
        r->refs++;
        *out = r;
        return 0;
    }
    Keyraft__PrincipalInfo *info = NULL;
    int rv = fsm_get_principal(svc->deps.store, name, &info);
    if (rv != 0)
        return rv;
    r = calloc(1, sizeof(*r));
    if (r == NULL) {
        keyraft__principal_info__free_unpacked(info, NULL);
        return KR_ENOMEM;
    }
    r->info = info;
    r->roles = policy_roles_of(info->roles, info->n_roles, NULL);
    r->refs = 2; /* the cache's and the caller's */
    ref_put(svc->principals[slot]);
    svc->principals[slot] = r;
    *out = r;
    return 0;
}

void gov_release(struct call *call)
{
    ref_put(call->who);
    call->who = NULL;
}

int gov_authorize(struct call *call)
{
    struct service *svc = call->svc;
    Keyraft__Request__OpCase op = call->req->op_case;
    unsigned need = policy_op_roles(op);
    if (need == 0 || op == KEYRAFT__REQUEST__OP_STATUS)
        return 0; /* unknown: dispatch says so; status: any CA certificate */
    if (call->is_node) {
        call->role_bits = POLICY_NODE;
    } else {
        struct principal_ref *who = NULL;
        int rv = principal_lookup(svc, call->principal, &who);
        if (rv == KR_ENOTFOUND && !service_ready(svc)) {
            reply_error(call, KR_EUNAVAIL, "this node has not caught up with the cluster's "
                        "principals yet");
            return -1;
        }
        if (rv == KR_ENOTFOUND) {
            reply_error(call, KR_EPERM, "the certificate for \"%.64s\" is not registered with "
                        "this cluster (keyraft principal create)", call->principal);
            return -1;
        }
        if (rv != 0) {
            reply_error(call, rv, "reading the principal registry: %s", kr_strerror(rv));
            return -1;
        }
        call->who = who;
        if (call->internal) {
            /* Run for an approval: the requester must still hold a valid certificate. */
            size_t valid = 0;
            for (size_t i = 0; i < who->info->n_certs; i++)
                valid += !who->info->certs[i]->revoked;
            if (valid == 0) {
                reply_error(call, KR_EPERM, "%s has no valid certificate left: the approved "
                            "request does not run", call->principal);
                return -1;
            }
        } else {
            const Keyraft__PrincipalCert *cert = NULL;
            for (size_t i = 0; i < who->info->n_certs; i++)
                if (strcmp(who->info->certs[i]->serial, call->serial) == 0)
                    cert = who->info->certs[i];
            if (cert == NULL) {
                reply_error(call, KR_EPERM, "certificate %s is not one the cluster registered "
                            "for %s", call->serial, call->principal);
                return -1;
            }
            if (cert->revoked) {
                reply_error(call, KR_EPERM, "certificate %s of %s was revoked by %s", cert->serial,
                            call->principal, cert->revoked_by);
                return -1;
            }
        }
        call->role_bits = who->roles;
    }
    if ((need & call->role_bits) == 0) {
        char have[64], want[64];
        policy_roles_text(call->role_bits, have, sizeof(have));
        policy_roles_text(need, want, sizeof(want));
        reply_error(call, KR_EPERM, "%s (roles: %s) may not %s: it needs one of the roles %s",
                    call->principal, have, policy_op_name(op), want);
        return -1;
    }
    return 0;
}

/* --- audit ------------------------------------------------------------------------------- */

/* The key a request names through a `key` KeyRef field, if any. */
static const Keyraft__KeyRef *request_key_ref(const Keyraft__Request *req)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&keyraft__request__descriptor, req->op_case);
    if (f == NULL || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return NULL;
    const ProtobufCMessage *sub =
        *(const ProtobufCMessage *const *)((const char *)req + f->offset);
    if (sub == NULL)
        return NULL;
    const ProtobufCFieldDescriptor *k =
        protobuf_c_message_descriptor_get_field_by_name(sub->descriptor, "key");
    if (k == NULL || k->type != PROTOBUF_C_TYPE_MESSAGE ||
        k->descriptor != &keyraft__key_ref__descriptor)
        return NULL;
    return *(const Keyraft__KeyRef *const *)((const char *)sub + k->offset);
}

static const char *response_key_id(const Keyraft__Response *r, uint32_t *version)
{
    switch (r->result_case) {
    case KEYRAFT__RESPONSE__RESULT_KEY: return r->key->id;
    case KEYRAFT__RESPONSE__RESULT_ENCRYPT: *version = r->encrypt->version; return r->encrypt->key_id;
    case KEYRAFT__RESPONSE__RESULT_DECRYPT: *version = r->decrypt->version; return r->decrypt->key_id;
    case KEYRAFT__RESPONSE__RESULT_SIGN: *version = r->sign->version; return r->sign->key_id;
    case KEYRAFT__RESPONSE__RESULT_DATA_KEY:
        *version = r->data_key->version;
        return r->data_key->key_id;
    case KEYRAFT__RESPONSE__RESULT_WRAP: *version = r->wrap->version; return r->wrap->key_id;
    case KEYRAFT__RESPONSE__RESULT_EXPORT:
        *version = r->export->version;
        return r->export->attributes ? r->export->attributes->id : NULL;
    default: return NULL;
    }
}

#define TALLY_MAX 16 /* distinct records per batch; past it, one each */

struct tally_entry {
    const char *operation; /* static */
    char key[AUDIT_FIELD_MAX + 1];
    uint32_t version;
    int status;
    char message[AUDIT_MESSAGE_MAX + 1]; /* the first refusal's reason */
    char domain[72];
    uint32_t count;
};

struct audit_tally {
    size_t n;
    struct tally_entry e[TALLY_MAX];
};

struct audit_tally *gov_audit_tally_new(void) { return calloc(1, sizeof(struct audit_tally)); }

void gov_audit_tally_free(struct audit_tally *tally) { free(tally); }

static void audit_write(struct service *svc, Keyraft__AuditRecord *r)
{
    uint8_t buf[AUDIT_RECORD_STACK];
    size_t len = keyraft__audit_record__get_packed_size(r);
    if (len > sizeof(buf)) {
        log_error("audit record of %zu bytes does not fit: a bound is wrong", len);
        r->message = (char *)"(record cut: too large)";
        r->key_id = r->request_id = (char *)"";
        r->n_approval_ids = 0;
        len = keyraft__audit_record__get_packed_size(r);
    }
    keyraft__audit_record__pack(r, buf);
    audit_log_append(svc->deps.audit, buf, len);
}

/* --- reads sent alone, coalesced ---------------------------------------------------------- */

/* A successful read sent alone, with no request id and no approval, joins
 * the open record of the same principal, address, operation, key, version
 * and domain; open records are written AUDIT_COALESCE_MS after the first
 * read they count (time_ms is that first read's). Serving 64-byte encrypts,
 * a record per read was a fifth of the node (packing, shipping, raft, one
 * RocksDB row each). Refusals, writes, exports and requests a client named
 * stay one record each. */
#define COALESCE_SLOTS 256

struct coalesced_read {
    const char *operation; /* static; NULL: the slot is free */
    char principal[256];
    char address[64];
    char key[AUDIT_FIELD_MAX + 1];
    char domain[72];
    uint32_t version;
    uint32_t count;
    uint64_t first_ms;
};

struct read_coalescer {
    size_t used;
    struct coalesced_read slot[COALESCE_SLOTS];
};

static void coalesced_write(struct service *svc, struct coalesced_read *c)
{
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.time_ms = c->first_ms;
    r.node_id = svc->deps.config->node_id;
    r.principal = c->principal;
    r.operation = (char *)c->operation;
    r.key_id = c->key;
    r.key_version = c->version;
    r.message = (char *)"";
    r.client_address = c->address;
    r.domain = c->domain;
    r.request_id = (char *)"";
    r.count = c->count > 1 ? c->count : 0;
    audit_write(svc, &r);
    c->operation = NULL;
    svc->coalescer->used--;
}

void gov_audit_coalesced_flush(struct service *svc)
{
    struct read_coalescer *rc = svc->coalescer;
    for (size_t i = 0; rc != NULL && rc->used > 0 && i < COALESCE_SLOTS; i++)
        if (rc->slot[i].operation != NULL)
            coalesced_write(svc, &rc->slot[i]);
}

void gov_audit_coalescer_free(struct service *svc)
{
    free(svc->coalescer);
    svc->coalescer = NULL;
}

/* 1 when |r| (of |call|) is held in an open record; 0: write it now. */
static int coalesce_add(struct call *call, const Keyraft__AuditRecord *r)
{
    struct service *svc = call->svc;
    if (svc->coalescer == NULL && (svc->coalescer = calloc(1, sizeof(*svc->coalescer))) == NULL)
        return 0;
    uint64_t h = kr_hash_str(kr_hash_str(kr_hash_str(KR_HASH_INIT, r->principal),
                                         r->client_address), r->key_id);
    h = kr_hash_u32(kr_hash_str(h, r->operation), r->key_version);
    struct coalesced_read *c = &svc->coalescer->slot[h % COALESCE_SLOTS];
    if (c->operation == r->operation && c->version == r->key_version && c->count < UINT32_MAX &&
        strcmp(c->key, r->key_id) == 0 && strcmp(c->principal, r->principal) == 0 &&
        strcmp(c->address, r->client_address) == 0 && strcmp(c->domain, r->domain) == 0) {
        c->count++;
        return 1;
    }
    if (strlen(r->principal) >= sizeof(c->principal) ||
        strlen(r->client_address) >= sizeof(c->address) || strlen(r->domain) >= sizeof(c->domain))
        return 0;
    if (c->operation != NULL)
        coalesced_write(svc, c); /* another read had the slot: its record goes now */
    c->operation = r->operation;
    copy_cut(c->principal, sizeof(c->principal), r->principal);
    copy_cut(c->address, sizeof(c->address), r->client_address);
    copy_cut(c->key, sizeof(c->key), r->key_id);
    copy_cut(c->domain, sizeof(c->domain), r->domain);
    c->version = r->key_version;
    c->count = 1;
    c->first_ms = r->time_ms;
    if (svc->coalescer->used++ == 0)
        service_audit_flush_later(svc);
    return 1;
}

/* 1 when |r| joined a tally entry. */
static int tally_add(struct audit_tally *t, const Keyraft__AuditRecord *r)
{
    for (size_t i = 0; i < t->n; i++) {
        struct tally_entry *e = &t->e[i];
        if (e->operation == r->operation && e->version == r->key_version &&
            e->status == r->status && strcmp(e->key, r->key_id) == 0 &&
            strcmp(e->domain, r->domain) == 0 && e->count < UINT32_MAX) {
            e->count++;
            return 1;
        }
    }
    if (t->n == TALLY_MAX)
        return 0;
    struct tally_entry *e = &t->e[t->n++];
    e->operation = r->operation;
    copy_cut(e->key, sizeof(e->key), r->key_id);
    e->version = r->key_version;
    e->status = r->status;
    copy_cut(e->message, sizeof(e->message), r->message);
    copy_cut(e->domain, sizeof(e->domain), r->domain);
    e->count = 1;
    return 1;
}

void gov_audit_tally_flush(struct call *batch, struct audit_tally *tally)
{
    if (tally == NULL || batch->svc->deps.audit == NULL)
        return;
    char request_b[AUDIT_FIELD_MAX + 1];
    copy_cut(request_b, sizeof(request_b), batch->req->request_id);
    for (size_t i = 0; i < tally->n; i++) {
        struct tally_entry *e = &tally->e[i];
        Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
        r.time_ms = now_ms();
        r.node_id = batch->svc->deps.config->node_id;
        r.principal = batch->principal;
        r.operation = (char *)e->operation;
        r.key_id = e->key;
        r.key_version = e->version;
        r.status = e->status;
        r.message = e->message;
        r.client_address = batch->address;
        r.domain = e->domain;
        r.request_id = request_b;
        r.count = e->count;
        audit_write(batch->svc, &r);
    }
    tally->n = 0;
}

void gov_audit_call(struct call *call)
{
    struct service *svc = call->svc;
    const Keyraft__Request *req = call->req;
    if (svc->deps.audit == NULL || req->op_case == KEYRAFT__REQUEST__OP_AUDIT_SUBMIT)
        return;
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.time_ms = now_ms();
    r.node_id = svc->deps.config->node_id;
    r.principal = call->principal;
    r.operation = (char *)policy_op_name(req->op_case);
    uint32_t version = call->audit_version;
    const char *key = call->audit_key[0] ? call->audit_key : response_key_id(&call->resp, &version);
    if (key == NULL) {
        const Keyraft__KeyRef *ref = request_key_ref(req);
        key = ref == NULL ? "" : ref->id[0] ? ref->id : ref->name;
    }
    /* Fields a client chose are cut to a bound: a record always fits. */
    char key_b[AUDIT_FIELD_MAX + 1], approval_b[AUDIT_FIELD_MAX + 1];
    char request_b[AUDIT_FIELD_MAX + 1], message_b[AUDIT_MESSAGE_MAX + 1];
    copy_cut(key_b, sizeof(key_b), key);
    r.key_id = key_b;
    r.key_version = version;
    r.status = call->resp.status;
    copy_cut(message_b, sizeof(message_b),
             call->resp.status != 0 && call->resp.message ? call->resp.message : "");
    r.message = message_b;
    r.client_address = call->address;
    char *approvals[1];
    const char *approval = call->approval_id[0] ? call->approval_id
                           : call->resp.approval_id ? call->resp.approval_id
                                                    : req->approval_id;
    /* Votes and looks name their approval in the request itself. */
    if (approval[0] == '\0' && req->op_case == KEYRAFT__REQUEST__OP_APPROVAL_APPROVE)
        approval = req->approval_approve->id;
    else if (approval[0] == '\0' && req->op_case == KEYRAFT__REQUEST__OP_APPROVAL_DENY)
        approval = req->approval_deny->id;
    else if (approval[0] == '\0' && req->op_case == KEYRAFT__REQUEST__OP_APPROVAL_SHOW)
        approval = req->approval_show->id;
    if (approval != NULL && approval[0] != '\0') {
        copy_cut(approval_b, sizeof(approval_b), approval);
        approvals[0] = approval_b;
        r.approval_ids = approvals;
        r.n_approval_ids = 1;
    }
    r.domain = call->audit_domain;
    copy_cut(request_b, sizeof(request_b), req->request_id);
    r.request_id = request_b;
    if (call->tally != NULL && r.n_approval_ids == 0 && !kr_request_is_write(req) &&
        tally_add(call->tally, &r))
        return;
    /* An export hands out a key's own material: always a record of its own. */
    if (call->tally == NULL && r.n_approval_ids == 0 && r.status == 0 &&
        req->request_id[0] == '\0' && !kr_request_is_write(req) &&
        req->op_case != KEYRAFT__REQUEST__OP_EXPORT && coalesce_add(call, &r))
        return;
    /* principal < 256, address < 64, domain < 72, operation a field name:
     * with the cut fields above, well under the buffer. */
    audit_write(svc, &r);
}

/* --- usage counters ------------------------------------------------------------------------- */

int gov_usage_check(struct call *call, const Keyraft__KeyRecord *rec, uint32_t version)
{
    if (rec->policy == NULL || rec->policy->usage_limit == 0)
        return 0;
    struct service *svc = call->svc;
    uint64_t used = 0, boot = 0, seq = 0;
    /* The FSM applies on this loop thread too: nothing is applied between
     * these reads. The recorder adds what this node served that its store
     * does not count yet, acknowledged by the leader or not. */
    int rv = audit_source_position(svc->deps.store, svc->deps.config->node_id, &boot, &seq);
    if (rv == 0)
        rv = audit_usage_get(svc->deps.store, rec->id, version, &used);
    if (rv != 0) {
        reply_error(call, rv, "reading the usage counter of key %s: %s", rec->id, kr_strerror(rv));
        return -1;
    }
    if (svc->deps.audit != NULL)
        used += audit_log_unacked_usage(svc->deps.audit, rec->id, version, boot, seq);
    if (used < rec->policy->usage_limit)
        return 0;
    reply_error(call, KR_ESTATE, "key %s version %u reached its usage limit of %" PRIu64
                " encryptions: rotate the key", rec->id, version, rec->policy->usage_limit);
    return -1;
}

void gov_usage_count(struct call *call, const char *key_id, uint32_t version)
{
    if (call->svc->deps.audit != NULL)
        audit_log_usage(call->svc->deps.audit, key_id, version, 1);
}

/* --- quorum approvals ----------------------------------------------------------------------- */

static const Keyraft__QuorumRule *find_rule(const Keyraft__GovernanceRecord *gov, const char *op)
{
    for (size_t i = 0; i < gov->n_rules; i++)
        if (strcmp(gov->rules[i]->operation, op) == 0 && gov->rules[i]->required > 0)
            return gov->rules[i];
    return NULL;
}

/* The packed operation of |req| (its oneof member), for comparing a request
 * with the one an approval holds. */
static int pack_op(const Keyraft__Request *req, uint8_t **out, size_t *len)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&keyraft__request__descriptor, req->op_case);
    if (f == NULL || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return KR_EINVAL;
    const ProtobufCMessage *sub =
        *(const ProtobufCMessage *const *)((const char *)req + f->offset);
    *len = sub ? protobuf_c_message_get_packed_size(sub) : 0;
    *out = malloc(*len ? *len : 1);
    if (*out == NULL)
        return KR_ENOMEM;
    if (sub)
        protobuf_c_message_pack(sub, *out);
    return 0;
}

static int same_operation(const Keyraft__Request *a, const Keyraft__Request *b)
{
    if (a->op_case != b->op_case)
        return 0;
    /* A node admission is signed again by `keyraft cluster add` on each run:
     * the certificate differs, what it certifies (node-<id>, checked against
     * the CA) does not. Everything that decides where the MWK goes (the
     * transport key) and what the node becomes is compared. */
    char *cert_a = NULL, *cert_b = NULL;
    if (a->op_case == KEYRAFT__REQUEST__OP_CLUSTER_ADD) {
        cert_a = a->cluster_add->node_cert_pem;
        cert_b = b->cluster_add->node_cert_pem;
        a->cluster_add->node_cert_pem = b->cluster_add->node_cert_pem = (char *)"";
    }
    uint8_t *pa = NULL, *pb = NULL;
    size_t la = 0, lb = 0;
    int same = pack_op(a, &pa, &la) == 0 && pack_op(b, &pb, &lb) == 0 && la == lb &&
               memcmp(pa, pb, la) == 0;
    if (cert_a != NULL) {
        a->cluster_add->node_cert_pem = cert_a;
        b->cluster_add->node_cert_pem = cert_b;
    }
    free(pa);
    free(pb);
    return same;
}

static void summary_of(const struct call *call, const char *key_id, char *out, size_t cap)
{
    const Keyraft__Request *req = call->req;
    switch (req->op_case) {
    case KEYRAFT__REQUEST__OP_EXPORT:
        snprintf(out, cap, "export key %s version %u", key_id ? key_id : "?",
                 req->export->version);
        break;
    case KEYRAFT__REQUEST__OP_DESTROY:
        snprintf(out, cap, "destroy key %s", key_id ? key_id : "?");
        break;
    case KEYRAFT__REQUEST__OP_DOMAIN_DESTROY:
        snprintf(out, cap, "destroy domain %.64s and every key in it", req->domain_destroy->id);
        break;
    case KEYRAFT__REQUEST__OP_SET_POLICY:
        snprintf(out, cap, "replace the policy of key %s", key_id ? key_id : "?");
        break;
    case KEYRAFT__REQUEST__OP_QUORUM_SET:
        snprintf(out, cap, "set quorum rule %.32s to %u approvals by %.16s",
                 req->quorum_set->rule ? req->quorum_set->rule->operation : "?",
                 req->quorum_set->rule ? req->quorum_set->rule->required : 0,
                 req->quorum_set->rule ? req->quorum_set->rule->approver_role : "?");
        break;
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD:
        snprintf(out, cap, "admit node %" PRIu64 " (%.64s) as a %s", req->cluster_add->node_id,
                 req->cluster_add->client_address, req->cluster_add->standby ? "standby" : "voter");
        break;
    case KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE:
        snprintf(out, cap, "create principal %.64s with the admin role",
                 req->principal_create->name);
        break;
    default:
        snprintf(out, cap, "%s", policy_op_name(req->op_case));
        break;
    }
}

static void pending_created(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        call->resp.approval_id = NULL;
        reply_error(call, res->status, "the request could not be held for approval: %s",
                    kr_strerror(res->status));
        return;
    }
    reply_error(call, KR_EPENDING, "%s", call->resp.message ? call->resp.message : "");
}

/* Holds the call's request as a new pending approval; answers KR_EPENDING. */
static void hold_for_approval(struct call *call, const char *operation,
                              const Keyraft__QuorumRule *rule, const char *key_id)
{
    if (require_leader(call) != 0)
        return;
    uint8_t rnd[8];
    char id[2 * sizeof(rnd) + 1];
    int rv = crypto_random(rnd, sizeof(rnd));
    if (rv != 0) {
        reply_error(call, rv, "no randomness for an approval id");
        return;
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(id + 2 * i, 3, "%02x", rnd[i]);
    char summary[256];
    summary_of(call, key_id, summary, sizeof(summary));
    uint64_t now = now_ms();
    Keyraft__ApprovalInfo info = KEYRAFT__APPROVAL_INFO__INIT;
    info.id = id;
    info.operation = (char *)operation;
    info.summary = summary;
    info.requester = call->principal;
    info.state = KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING;
    info.required = rule->required;
    info.approver_role = rule->approver_role;
    info.created_at = now;
    info.expires_at = now + (rule->ttl_ms ? rule->ttl_ms : APPROVAL_TTL_DEFAULT_MS);
    info.key_id = (char *)(key_id ? key_id : "");
    /* The held request, without what belongs to this one delivery. */
    Keyraft__Request held = *call->req;
    held.id = 0;
    held.request_id = (char *)"";
    held.approval_id = (char *)"";
    held.min_index = 0;
    held.linearizable = 0;
    size_t len = keyraft__request__get_packed_size(&held);
    uint8_t *packed = malloc(len ? len : 1);
    if (packed == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__request__pack(&held, packed);
    Keyraft__ApprovalRecord rec = KEYRAFT__APPROVAL_RECORD__INIT;
    rec.info = &info;
    rec.request.data = packed;
    rec.request.len = len;
    Keyraft__CreateApprovalCommand ca = KEYRAFT__CREATE_APPROVAL_COMMAND__INIT;
    ca.approval = &rec;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_CREATE_APPROVAL;
    cmd.create_approval = &ca;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s needs %u approvals by the %s role (keyraft approvals approve "
             "%s); it expires in %" PRIu64 " s", summary, rule->required, rule->approver_role, id,
             (info.expires_at - now) / 1000);
    call->resp.approval_id = arena_strdup(call, id);
    call->resp.message = arena_strdup(call, msg);
    rv = cluster_propose(call->svc->deps.cluster, &cmd, pending_created, call);
    free(packed);
    if (rv != 0) {
        call->resp.approval_id = NULL;
        reply_error(call, rv, "cannot propose: %s", kr_strerror(rv));
        return;
    }
    call->svc->pending++;
}

static void export_consumed(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        reply_error(call, res->status == KR_EPERM ? KR_EPERM : res->status,
                    "approval %s could not be used: %s", call->approval_id,
                    res->status == KR_EPERM ? "it is not approved, or was used already"
                                            : kr_strerror(res->status));
        return;
    }
    dispatch_op(call); /* the export itself, now that its approval is spent */
}

int gov_quorum_gate(struct call *call, const char *key_id)
{
    if (call->approval_id[0] != '\0')
        return 0; /* validated (and, for an export, spent) already */
    const char *operation = policy_quorum_operation(call->req);
    if (operation == NULL)
        return 0;
    struct service *svc = call->svc;
    Keyraft__GovernanceRecord *gov = NULL;
    int rv = fsm_get_governance(svc->deps.store, &gov);
    if (rv != 0) {
        reply_error(call, rv, "reading the quorum rules: %s", kr_strerror(rv));
        return 1;
    }
    const Keyraft__QuorumRule *rule = find_rule(gov, operation);
    if (rule == NULL) {
        keyraft__governance_record__free_unpacked(gov, NULL);
        return 0;
    }
    const char *id = call->req->approval_id;
    if (id[0] == '\0') {
        hold_for_approval(call, operation, rule, key_id);
        keyraft__governance_record__free_unpacked(gov, NULL);
        return 1;
    }
    keyraft__governance_record__free_unpacked(gov, NULL);
    Keyraft__ApprovalRecord *a = NULL;
    rv = fsm_get_approval(svc->deps.store, id, &a);
    if (rv != 0 || a->info == NULL) {
        if (a)
            keyraft__approval_record__free_unpacked(a, NULL);
        reply_error(call, rv == KR_ENOTFOUND || rv == 0 ? KR_ENOTFOUND : rv,
                    "no approval %.40s", id);
        return 1;
    }
    const Keyraft__ApprovalInfo *info = a->info;
    Keyraft__Request *held = keyraft__request__unpack(NULL, a->request.len, a->request.data);
    int status = 0;
    char why[512] = "";
    size_t approvals = 0;
    for (size_t i = 0; i < info->n_votes; i++)
        approvals += info->votes[i]->approve != 0;
    if (strcmp(info->operation, operation) != 0) {
        status = KR_EINVAL;
        snprintf(why, sizeof(why), "approval %s is for %s, not %s", info->id, info->operation,
                 operation);
    } else if (strcmp(info->requester, call->principal) != 0) {
        status = KR_EPERM;
        snprintf(why, sizeof(why), "approval %s was asked for by %s: only they may use it",
                 info->id, info->requester);
    } else if (held == NULL || !same_operation(held, call->req)) {
        status = KR_EINVAL;
        snprintf(why, sizeof(why), "approval %s was given for a different request (%s)", info->id,
                 info->summary);
    } else if (info->state == KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED) {
        status = KR_EPERM;
        snprintf(why, sizeof(why), "approval %s was denied", info->id);
    } else if (info->state == KEYRAFT__APPROVAL_STATE__APPROVAL_DONE) {
        status = KR_EPERM;
        snprintf(why, sizeof(why), "approval %s was used already", info->id);
    } else if (now_ms() > info->expires_at) {
        status = KR_ETIMEDOUT;
        snprintf(why, sizeof(why), "approval %s expired", info->id);
    } else if (info->state == KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING) {
        status = KR_EPENDING;
        snprintf(why, sizeof(why), "approval %s has %zu of %u approvals", info->id, approvals,
                 info->required);
        call->resp.approval_id = arena_strdup(call, info->id);
    }
    if (held != NULL)
        keyraft__request__free_unpacked(held, NULL);
    if (status == 0)
        copy_cut(call->approval_id, sizeof(call->approval_id), info->id);
    keyraft__approval_record__free_unpacked(a, NULL);
    if (status != 0) {
        reply_error(call, status, "%s", why);
        return 1;
    }
    if (kr_op_is_write(call->req->op_case))
        return 0; /* the write's own command spends the approval (fsm) */
    /* A read (export): spend the approval first, then answer. */
    if (require_leader(call) != 0)
        return 1;
    Keyraft__FinishApprovalCommand fa = KEYRAFT__FINISH_APPROVAL_COMMAND__INIT;
    fa.approval_id = call->approval_id;
    fa.at = now_ms();
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_FINISH_APPROVAL;
    cmd.finish_approval = &fa;
    rv = cluster_propose(svc->deps.cluster, &cmd, export_consumed, call);
    if (rv != 0) {
        reply_error(call, rv, "cannot propose: %s", kr_strerror(rv));
        return 1;
    }
    svc->pending++;
    return 1;
}

/* An approval as shown: a pending one past its time reads as expired. */
static Keyraft__ApprovalInfo *shown_approval(struct call *call, const Keyraft__ApprovalInfo *info)
{
    Keyraft__ApprovalInfo *copy = arena_copy_message(call, &info->base);
    if (copy != NULL && copy->state == KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING &&
        now_ms() > copy->expires_at)
        copy->state = KEYRAFT__APPROVAL_STATE__APPROVAL_EXPIRED;
    return copy;
}

void op_approval_list(struct call *call)
{
    struct fsm_list list;
    int rv = fsm_list_approvals(call->svc->deps.store, APPROVAL_LIST_MAX, &list);
    if (rv != 0) {
        reply_error(call, rv, "listing approvals: %s", kr_strerror(rv));
        return;
    }
    Keyraft__ApprovalListResponse *lr = arena_alloc(call, sizeof(*lr));
    Keyraft__ApprovalInfo **items = arena_alloc(call, (list.n + 1) * sizeof(*items));
    if (lr == NULL || items == NULL) {
        fsm_list_free(&list);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__approval_list_response__init(lr);
    lr->approvals = items;
    for (size_t i = 0; i < list.n; i++) {
        const Keyraft__ApprovalRecord *a = list.items[i];
        if (a->info == NULL)
            continue;
        Keyraft__ApprovalInfo *shown = shown_approval(call, a->info);
        if (shown == NULL) {
            fsm_list_free(&list);
            reply_error(call, KR_ENOMEM, "out of memory");
            return;
        }
        if (call->req->approval_list->all ||
            shown->state == KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING ||
            shown->state == KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED)
            items[lr->n_approvals++] = shown;
    }
    fsm_list_free(&list);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_APPROVALS;
    call->resp.approvals = lr;
    call_finish(call);
}

static void reply_approval(struct call *call, const char *id, uint64_t commit_index)
{
    Keyraft__ApprovalRecord *a = NULL;
    int rv = fsm_get_approval(call->svc->deps.store, id, &a);
    if (rv != 0 || a->info == NULL) {
        if (a)
            keyraft__approval_record__free_unpacked(a, NULL);
        reply_error(call, rv ? rv : KR_EIO, "no approval %.40s", id);
        return;
    }
    Keyraft__ApprovalInfo *shown = shown_approval(call, a->info);
    keyraft__approval_record__free_unpacked(a, NULL);
    if (shown == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_APPROVAL;
    call->resp.approval = shown;
    call->resp.commit_index = commit_index;
    call_finish(call);
}

void op_approval_show(struct call *call) { reply_approval(call, call->req->approval_show->id, 0); }

/* --- running an approved request for its requester --------------------------------------- */

struct autorun {
    char approval_id[40];
};

static void autorun_done(void *ctx, const Keyraft__Response *resp)
{
    struct autorun *ar = ctx;
    if (resp->status == 0)
        log_info("approval %s: the approved request ran", ar->approval_id);
    else
        log_warn("approval %s: the approved request failed: %s (%s); the requester may retry "
                 "it with --approval until it expires", ar->approval_id,
                 kr_status_name(resp->status), resp->message ? resp->message : "");
    free(ar);
}

/* Operations whose result goes back to the requester (key material, a join
 * bundle) wait for the requester to run them; the others run at approval. */
static int runs_at_approval(const char *operation)
{
    return strcmp(operation, "export") != 0 && strcmp(operation, "node_admission") != 0;
}

static void autorun(struct service *svc, const Keyraft__ApprovalRecord *a)
{
    struct autorun *ar = calloc(1, sizeof(*ar));
    Keyraft__Request *req = keyraft__request__unpack(NULL, a->request.len, a->request.data);
    char *id = strdup(a->info->id);
    if (ar == NULL || req == NULL || id == NULL) {
        free(ar);
        free(id);
        if (req)
            keyraft__request__free_unpacked(req, NULL);
        log_error("approval %s: out of memory; the requester may run it with --approval",
                  a->info->id);
        return;
    }
    copy_cut(ar->approval_id, sizeof(ar->approval_id), a->info->id);
    req->approval_id = id; /* freed with the request */
    char address[64];
    snprintf(address, sizeof(address), "approval %.40s", a->info->id);
    struct service_caller caller = {.principal = a->info->requester, .roles = "",
                                    .address = address, .serial = "", .is_node = 0,
                                    .internal = 1};
    service_handle(svc, &caller, req, NULL, autorun_done, ar); /* malloc'd: no arena */
}

static void vote_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    const char *id = call->approval_id[0] ? call->approval_id : "";
    if (res->status != 0) {
        const char *why = res->status == KR_EPERM      ? "a requester cannot approve their own request"
                          : res->status == KR_EEXIST   ? "this principal has voted on it already"
                          : res->status == KR_ESTATE   ? "it is no longer pending"
                          : res->status == KR_ETIMEDOUT ? "it expired"
                                                       : kr_strerror(res->status);
        reply_error(call, res->status, "vote on approval %s refused: %s", id, why);
        return;
    }
    /* call->approval_id stays for the audit record: a vote does not spend it. */
    char approval[40];
    copy_cut(approval, sizeof(approval), id);
    Keyraft__ApprovalRecord *a = NULL;
    if (fsm_get_approval(call->svc->deps.store, approval, &a) == 0 && a->info != NULL &&
        a->info->state == KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED &&
        runs_at_approval(a->info->operation))
        autorun(call->svc, a);
    if (a)
        keyraft__approval_record__free_unpacked(a, NULL);
    call->audit_key[0] = '\0';
    call->resp.approval_id = arena_strdup(call, approval);
    reply_approval(call, approval, res->index);
}

void op_approval_vote(struct call *call, int approve)
{
    const Keyraft__ApprovalRequest *r =
        approve ? call->req->approval_approve : call->req->approval_deny;
    if (strlen(r->reason) > REASON_MAX || !policy_name_valid(r->id)) {
        reply_error(call, KR_EINVAL, "an approval id and a reason of at most %d characters",
                    REASON_MAX);
        return;
    }
    Keyraft__ApprovalRecord *a = NULL;
    int rv = fsm_get_approval(call->svc->deps.store, r->id, &a);
    if (rv != 0 || a->info == NULL) {
        if (a)
            keyraft__approval_record__free_unpacked(a, NULL);
        reply_error(call, rv == 0 ? KR_EIO : rv, "no approval %.40s", r->id);
        return;
    }
    const Keyraft__ApprovalInfo *info = a->info;
    int status = 0;
    char why[512] = "";
    if (!(call->role_bits & policy_role_bit(info->approver_role))) {
        status = KR_EPERM;
        snprintf(why, sizeof(why), "approving %s needs the %s role", info->operation,
                 info->approver_role);
    } else if (strcmp(info->requester, call->principal) == 0) {
        status = KR_EPERM;
        snprintf(why, sizeof(why), "%.64s asked for approval %.40s and cannot approve or deny "
                 "it", call->principal, info->id);
    } else if (info->state != KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING) {
        status = KR_ESTATE;
        snprintf(why, sizeof(why), "approval %s is no longer pending", info->id);
    } else if (now_ms() > info->expires_at) {
        status = KR_ETIMEDOUT;
        snprintf(why, sizeof(why), "approval %s expired", info->id);
    }
    keyraft__approval_record__free_unpacked(a, NULL);
    if (status != 0) {
        reply_error(call, status, "%s", why);
        return;
    }
    if (require_leader(call) != 0)
        return;
    uint64_t now = now_ms();
    Keyraft__ApprovalVote vote = KEYRAFT__APPROVAL_VOTE__INIT;
    vote.principal = call->principal;
    vote.approve = approve;
    vote.at = now;
    vote.reason = r->reason;
    Keyraft__VoteApprovalCommand vc = KEYRAFT__VOTE_APPROVAL_COMMAND__INIT;
    vc.approval_id = r->id;
    vc.vote = &vote;
    vc.at = now;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_VOTE_APPROVAL;
    cmd.vote_approval = &vc;
    copy_cut(call->approval_id, sizeof(call->approval_id), r->id);
    rv = cluster_propose(call->svc->deps.cluster, &cmd, vote_done, call);
    if (rv != 0) {
        call->approval_id[0] = '\0';
        reply_error(call, rv, "cannot propose: %s", kr_strerror(rv));
        return;
    }
    call->svc->pending++;
}

/* --- principals ------------------------------------------------------------------------ */

static Keyraft__PrincipalInfo *principal_copy(struct call *call, const char *name)
{
    Keyraft__PrincipalInfo *p = NULL;
    if (fsm_get_principal(call->svc->deps.store, name, &p) != 0)
        return NULL;
    Keyraft__PrincipalInfo *copy = arena_copy_message(call, &p->base);
    keyraft__principal_info__free_unpacked(p, NULL);
    return copy;
}

static void principal_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    const char *name = call->req->op_case == KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE
                           ? call->req->principal_create->name
                           : call->req->principal_revoke->name;
    if (res->status != 0) {
        reply_error(call, res->status, "%s", res->status == KR_EEXIST
                    ? "the principal exists with other roles, groups or domains"
                    : res->status == KR_ETOOBIG ? "the principal has too many certificates"
                                                : kr_strerror(res->status));
        return;
    }
    Keyraft__PrincipalInfo *p = principal_copy(call, name);
    if (p == NULL) {
        reply_error(call, KR_EIO, "applied, but reading principal %s back failed", name);
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_PRINCIPAL;
    call->resp.principal = p;
    call->resp.commit_index = res->index;
    call_finish(call);
}

static int domains_exist(struct call *call, char *const *domains, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        Keyraft__DomainRecord *d = NULL;
        int rv = fsm_get_domain(call->svc->deps.store, domains[i], &d);
        int dead = rv == 0 && d->destroyed;
        if (d)
            keyraft__domain_record__free_unpacked(d, NULL);
        if (rv != 0 || dead) {
            reply_error(call, KR_EINVAL, "domain %.64s %s", domains[i],
                        dead ? "was destroyed" : "does not exist (keyraft domain create)");
            return -1;
        }
    }
    return 0;
}

void op_principal_create(struct call *call)
{
    const Keyraft__PrincipalCreateRequest *r = call->req->principal_create;
    struct service *svc = call->svc;
    if (require_leader(call) != 0 || reply_if_retry_then(call, principal_done))
        return;
    Keyraft__PrincipalInfo p = KEYRAFT__PRINCIPAL_INFO__INIT;
    p.name = r->name;
    p.roles = r->roles;
    p.n_roles = r->n_roles;
    p.groups = r->groups;
    p.n_groups = r->n_groups;
    p.domains = r->domains;
    p.n_domains = r->n_domains;
    char why[256];
    if (policy_principal_check(&p, why, sizeof(why)) != 0) {
        reply_error(call, KR_EINVAL, "%s", why);
        return;
    }
    if (domains_exist(call, r->domains, r->n_domains) != 0)
        return;
    char serial[80];
    uint64_t not_after = 0;
    int rv = pki_check_client_cert(svc->deps.config->tls_ca, r->cert_pem, r->name, serial,
                                   sizeof(serial), &not_after);
    if (rv != 0) {
        reply_error(call, rv, "the certificate is not a cluster CA client certificate for %.64s",
                    r->name);
        return;
    }
    if (gov_quorum_gate(call, NULL) != 0)
        return;
    Keyraft__PrincipalCert cert = KEYRAFT__PRINCIPAL_CERT__INIT;
    cert.serial = serial;
    cert.not_after = not_after;
    Keyraft__PrincipalCert *certs[1] = {&cert};
    p.certs = certs;
    p.n_certs = 1;
    p.created_at = now_ms();
    p.created_by = call->principal;
    Keyraft__PutPrincipalCommand put = KEYRAFT__PUT_PRINCIPAL_COMMAND__INIT;
    put.principal = &p;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_PRINCIPAL;
    cmd.put_principal = &put;
    log_info("registering principal %s (certificate %s), asked by %s", r->name, serial,
             call->principal);
    propose_then(call, &cmd, principal_done);
}

void op_principal_revoke(struct call *call)
{
    const Keyraft__PrincipalRevokeRequest *r = call->req->principal_revoke;
    if (require_leader(call) != 0 || reply_if_retry_then(call, principal_done))
        return;
    Keyraft__PrincipalInfo *old = NULL;
    int rv = fsm_get_principal(call->svc->deps.store, r->name, &old);
    if (rv != 0) {
        reply_error(call, rv, "no principal %.64s", r->name);
        return;
    }
    Keyraft__PrincipalCert store[64];
    Keyraft__PrincipalCert *certs[64];
    size_t n = 0;
    uint64_t now = now_ms();
    for (size_t i = 0; i < old->n_certs && n < 64; i++) {
        if (r->serial[0] != '\0' && strcmp(old->certs[i]->serial, r->serial) != 0)
            continue;
        keyraft__principal_cert__init(&store[n]);
        store[n].serial = old->certs[i]->serial;
        store[n].not_after = old->certs[i]->not_after;
        store[n].revoked = 1;
        store[n].revoked_at = now;
        store[n].revoked_by = call->principal;
        certs[n] = &store[n];
        n++;
    }
    if (n == 0) {
        keyraft__principal_info__free_unpacked(old, NULL);
        reply_error(call, KR_ENOTFOUND, "%s has no certificate %.80s", r->name, r->serial);
        return;
    }
    Keyraft__PrincipalInfo p = *old;
    p.certs = certs;
    p.n_certs = n;
    Keyraft__PutPrincipalCommand put = KEYRAFT__PUT_PRINCIPAL_COMMAND__INIT;
    put.principal = &p;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_PRINCIPAL;
    cmd.put_principal = &put;
    log_info("revoking %zu certificate(s) of %s, asked by %s", n, r->name, call->principal);
    propose_then(call, &cmd, principal_done);
    keyraft__principal_info__free_unpacked(old, NULL);
}

void op_principal_list(struct call *call)
{
    struct fsm_list list;
    int rv = fsm_list_principals(call->svc->deps.store, PRINCIPAL_LIST_MAX, &list);
    if (rv != 0) {
        reply_error(call, rv, "listing principals: %s", kr_strerror(rv));
        return;
    }
    Keyraft__PrincipalListResponse *lr = arena_alloc(call, sizeof(*lr));
    Keyraft__PrincipalInfo **items = arena_alloc(call, (list.n + 1) * sizeof(*items));
    if (lr == NULL || items == NULL) {
        fsm_list_free(&list);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__principal_list_response__init(lr);
    lr->principals = items;
    for (size_t i = 0; i < list.n; i++) {
        if ((items[i] = arena_copy_message(call, list.items[i])) == NULL) {
            fsm_list_free(&list);
            reply_error(call, KR_ENOMEM, "out of memory");
            return;
        }
        lr->n_principals++;
    }
    fsm_list_free(&list);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_PRINCIPALS;
    call->resp.principals = lr;
    call_finish(call);
}

/* --- domains ------------------------------------------------------------------------------ */

static Keyraft__DomainInfo *domain_info(struct call *call, const Keyraft__DomainRecord *d)
{
    Keyraft__DomainInfo *di = arena_alloc(call, sizeof(*di));
    if (di == NULL)
        return NULL;
    keyraft__domain_info__init(di);
    di->id = arena_strdup(call, d->id);
    di->created_at = d->created_at;
    di->destroyed = d->destroyed;
    di->destroyed_at = d->destroyed_at;
    return di->id ? di : NULL;
}

void gov_forget_destroyed_domains(struct service *svc)
{
    unsigned long epoch = fsm_governance_epoch();
    if (epoch == svc->domains_epoch)
        return;
    struct fsm_list list;
    if (fsm_list_domains(svc->deps.store, DOMAIN_LIST_MAX, &list) != 0)
        return; /* looked at again on the next call */
    for (size_t i = 0; i < list.n; i++) {
        const Keyraft__DomainRecord *d = list.items[i];
        if (d->destroyed && keyring_has_domain(svc->deps.keyring, d->id)) {
            keyring_unload_domain(svc->deps.keyring, d->id);
            log_info("domain %s was destroyed: its key is gone from this node", d->id);
        }
    }
    fsm_list_free(&list);
    svc->domains_epoch = epoch;
}

static void domain_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    struct service *svc = call->svc;
    svc->pending--;
    int create = call->req->op_case == KEYRAFT__REQUEST__OP_DOMAIN_CREATE;
    const char *id = create ? call->req->domain_create->id : call->req->domain_destroy->id;
    if (res->status != 0) {
        if (create)
            keyring_unload_domain(svc->deps.keyring, id); /* the key made for it was not kept */
        reply_error(call, res->status, "domain %.64s: %s", id,
                    res->status == KR_EEXIST   ? "exists already"
                    : res->status == KR_ESTATE ? "was destroyed already"
                    : res->status == KR_EPERM  ? "the default domain cannot be destroyed"
                                               : kr_strerror(res->status));
        return;
    }
    if (!create)
        gov_forget_destroyed_domains(svc);
    Keyraft__DomainRecord *d = NULL;
    int rv = fsm_get_domain(svc->deps.store, id, &d);
    Keyraft__DomainInfo *di = rv == 0 ? domain_info(call, d) : NULL;
    if (d)
        keyraft__domain_record__free_unpacked(d, NULL);
    if (di == NULL) {
        reply_error(call, rv ? rv : KR_ENOMEM, "applied, but reading domain %s back failed", id);
        return;
    }
    log_info("domain %s %s by %s", id, create ? "created" : "destroyed (crypto-shredded)",
             call->principal);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_DOMAIN;
    call->resp.domain = di;
    call->resp.commit_index = res->index;
    call_finish(call);
}

void op_domain_create(struct call *call)
{
    const char *id = call->req->domain_create->id;
    struct service *svc = call->svc;
    if (require_leader(call) != 0 || reply_if_retry_then(call, domain_done))
        return;
    if (!policy_name_valid(id)) {
        reply_error(call, KR_EINVAL, "a domain id is a name ([A-Za-z0-9._-], 1 to 64 characters)");
        return;
    }
    copy_cut(call->audit_domain, sizeof(call->audit_domain), id);
    Keyraft__DomainRecord *old = NULL;
    if (fsm_get_domain(svc->deps.store, id, &old) == 0) {
        keyraft__domain_record__free_unpacked(old, NULL);
        reply_error(call, KR_EEXIST, "domain %s exists already", id);
        return;
    }
    struct domain_command dc;
    int rv = domain_command_new(svc, id, &dc);
    if (rv != 0) {
        reply_error(call, rv, "cannot make the domain key: %s", kr_strerror(rv));
        return;
    }
    propose_then(call, &dc.cmd, domain_done);
    domain_command_free(&dc);
}

void op_domain_destroy(struct call *call)
{
    const char *id = call->req->domain_destroy->id;
    if (require_leader(call) != 0 || reply_if_retry_then(call, domain_done))
        return;
    snprintf(call->audit_domain, sizeof(call->audit_domain), "%.64s", id);
    if (strcmp(id, FSM_DEFAULT_DOMAIN) == 0) {
        reply_error(call, KR_EPERM, "the default domain cannot be destroyed");
        return;
    }
    Keyraft__DomainRecord *d = NULL;
    int rv = fsm_get_domain(call->svc->deps.store, id, &d);
    int dead = rv == 0 && d->destroyed;
    if (d)
        keyraft__domain_record__free_unpacked(d, NULL);
    if (rv != 0 || dead) {
        reply_error(call, rv ? rv : KR_ESTATE, "domain %.64s %s", id,
                    dead ? "was destroyed already" : "does not exist");
        return;
    }
    if (gov_quorum_gate(call, NULL) != 0)
        return;
    Keyraft__DestroyDomainCommand dd = KEYRAFT__DESTROY_DOMAIN_COMMAND__INIT;
    dd.domain_id = (char *)id;
    dd.at = now_ms();
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_DESTROY_DOMAIN;
    cmd.destroy_domain = &dd;
    propose_then(call, &cmd, domain_done);
}

void op_domain_list(struct call *call)
{
    struct fsm_list list;
    int rv = fsm_list_domains(call->svc->deps.store, DOMAIN_LIST_MAX, &list);
    if (rv != 0) {
        reply_error(call, rv, "listing domains: %s", kr_strerror(rv));
        return;
    }
    Keyraft__DomainListResponse *lr = arena_alloc(call, sizeof(*lr));
    Keyraft__DomainInfo **items = arena_alloc(call, (list.n + 1) * sizeof(*items));
    if (lr == NULL || items == NULL) {
        fsm_list_free(&list);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__domain_list_response__init(lr);
    lr->domains = items;
    int officer_or_user = !(call->role_bits & (POLICY_ADMIN | POLICY_AUDITOR));
    for (size_t i = 0; i < list.n; i++) {
        const Keyraft__DomainRecord *d = list.items[i];
        /* Tenants see their own domains only. */
        if (officer_or_user && !caller_in_domain(call, d->id))
            continue;
        if ((items[lr->n_domains] = domain_info(call, d)) == NULL) {
            fsm_list_free(&list);
            reply_error(call, KR_ENOMEM, "out of memory");
            return;
        }
        lr->n_domains++;
    }
    fsm_list_free(&list);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_DOMAINS;
    call->resp.domains = lr;
    call_finish(call);
}

/* --- key policy and quorum rules --------------------------------------------------------- */

void op_set_policy(struct call *call)
{
    const Keyraft__SetKeyPolicyRequest *r = call->req->set_policy;
    if (require_leader(call) != 0 || reply_if_retry(call))
        return;
    char why[256];
    if (r->policy == NULL || policy_key_policy_check(r->policy, why, sizeof(why)) != 0) {
        reply_error(call, KR_EINVAL, "key policy: %s", r->policy ? why : "missing");
        return;
    }
    if (r->policy->owner_group[0] == '\0' && r->policy->n_grants == 0) {
        reply_error(call, KR_EINVAL, "key policy: an owner group or a grant is required");
        return;
    }
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    if (gov_quorum_gate(call, rec->id) != 0)
        return;
    struct key_policy_copy policy;
    key_policy_rebuild(r->policy, &policy);
    Keyraft__SetKeyPolicyCommand sp = KEYRAFT__SET_KEY_POLICY_COMMAND__INIT;
    sp.key_id = rec->id;
    sp.policy = &policy.policy;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_SET_KEY_POLICY;
    cmd.set_key_policy = &sp;
    propose_then(call, &cmd, write_done);
}

static void reply_rules(struct call *call, uint64_t commit_index)
{
    Keyraft__GovernanceRecord *gov = NULL;
    int rv = fsm_get_governance(call->svc->deps.store, &gov);
    if (rv != 0) {
        reply_error(call, rv, "reading the quorum rules: %s", kr_strerror(rv));
        return;
    }
    Keyraft__QuorumListResponse *lr = arena_alloc(call, sizeof(*lr));
    Keyraft__QuorumRule **rules = arena_alloc(call, (gov->n_rules + 1) * sizeof(*rules));
    int ok = lr != NULL && rules != NULL;
    if (ok) {
        keyraft__quorum_list_response__init(lr);
        lr->rules = rules;
        for (size_t i = 0; ok && i < gov->n_rules; i++)
            ok = (rules[lr->n_rules++] = arena_copy_message(call, &gov->rules[i]->base)) != NULL;
    }
    keyraft__governance_record__free_unpacked(gov, NULL);
    if (!ok) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_QUORUM;
    call->resp.quorum = lr;
    call->resp.commit_index = commit_index;
    call_finish(call);
}

void op_quorum_list(struct call *call) { reply_rules(call, 0); }

static void rules_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        reply_error(call, res->status, "the quorum rule was refused: %s",
                    kr_strerror(res->status));
        return;
    }
    reply_rules(call, res->index);
}

void op_quorum_set(struct call *call)
{
    const Keyraft__QuorumRule *in = call->req->quorum_set->rule;
    if (require_leader(call) != 0 || reply_if_retry_then(call, rules_done))
        return;
    if (in == NULL || !policy_quorum_known(in->operation)) {
        reply_error(call, KR_EINVAL, "a rule names one of: export, destroy, domain_destroy, "
                    "policy_change, node_admission, principal_admin");
        return;
    }
    const char *role = in->approver_role[0] ? in->approver_role
                                            : policy_quorum_default_role(in->operation);
    if (policy_role_bit(role) == 0 || in->required > QUORUM_MAX ||
        in->ttl_ms > APPROVAL_TTL_MAX_MS) {
        reply_error(call, KR_EINVAL, "a rule needs a known approver role, at most %d approvals "
                    "and a time to live of at most 30 days", QUORUM_MAX);
        return;
    }
    if (gov_quorum_gate(call, NULL) != 0)
        return;
    Keyraft__QuorumRule rule = KEYRAFT__QUORUM_RULE__INIT;
    rule.operation = in->operation;
    rule.required = in->required;
    rule.approver_role = (char *)role;
    rule.ttl_ms = in->ttl_ms;
    Keyraft__QuorumRule *rules[1] = {&rule};
    Keyraft__GovernanceRecord gov = KEYRAFT__GOVERNANCE_RECORD__INIT;
    gov.rules = rules;
    gov.n_rules = 1;
    Keyraft__PutGovernanceCommand pg = KEYRAFT__PUT_GOVERNANCE_COMMAND__INIT;
    pg.governance = &gov;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_GOVERNANCE;
    cmd.put_governance = &pg;
    log_info("quorum rule %s: %u approvals by %s, asked by %s", rule.operation, rule.required,
             role, call->principal);
    propose_then(call, &cmd, rules_done);
}

/* --- audit operations ------------------------------------------------------------------------ */

void op_audit_read(struct call *call)
{
    Keyraft__AuditReadResponse *out = NULL;
    int rv = audit_read(call->svc->deps.store, call->req->audit_read, AUDIT_PAGE_MAX, &out);
    if (rv != 0) {
        reply_error(call, rv, "reading the audit log: %s", kr_strerror(rv));
        return;
    }
    Keyraft__AuditReadResponse *copy = arena_copy_message(call, &out->base);
    audit_read_free(out);
    if (copy == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_AUDIT;
    call->resp.audit = copy;
    call_finish(call);
}

/* The walk reads the whole log (about 1 s per million records): it runs on
 * the worker pool, reading the store from there (RocksDB is thread-safe). */
static void verify_work(uv_work_t *work)
{
    struct call *call = work->data;
    call->work_status = audit_verify(call->svc->deps.store, call->svc->deps.audit_spki,
                                     call->svc->deps.audit_spki_len, call->resp.audit_verify);
}

static void verify_after_work(uv_work_t *work, int status)
{
    struct call *call = work->data;
    call->svc->pending--;
    Keyraft__AuditVerifyResponse *v = call->resp.audit_verify;
    call->resp.audit_verify = NULL;
    int rv = status != 0 ? KR_EINTERNAL : call->work_status;
    Keyraft__AuditVerifyResponse *copy = rv == 0 ? arena_copy_message(call, &v->base) : NULL;
    audit_verify_clear(v);
    free(v);
    if (rv != 0 || copy == NULL) {
        reply_error(call, rv ? rv : KR_ENOMEM, "verifying the audit log: %s",
                    kr_strerror(rv ? rv : KR_ENOMEM));
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_AUDIT_VERIFY;
    call->resp.audit_verify = copy;
    call_finish(call);
}

void op_audit_verify(struct call *call)
{
    Keyraft__AuditVerifyResponse *v = malloc(sizeof(*v));
    if (v == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__audit_verify_response__init(v);
    call->resp.audit_verify = v; /* not answered from until the work is done */
    call->work.data = call;
    int rv = uv_queue_work(call->svc->deps.loop, &call->work, verify_work, verify_after_work);
    if (rv != 0) {
        call->resp.audit_verify = NULL;
        free(v);
        reply_error(call, KR_EINTERNAL, "worker pool: %s", uv_strerror(rv));
        return;
    }
    call->svc->pending++;
}

static void submit_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        reply_error(call, res->status, "the audit batch was refused: %s",
                    res->status == KR_ESTATE ? "its boot id is older than the last batch "
                                               "applied from this node (did its clock go back?)"
                                             : kr_strerror(res->status));
        return;
    }
    call->resp.commit_index = res->index;
    call_finish(call);
}

void op_audit_submit(struct call *call)
{
    const Keyraft__AuditSubmitRequest *r = call->req->audit_submit;
    char name[32];
    snprintf(name, sizeof(name), "node-%" PRIu64, r->node_id);
    if (strcmp(name, call->principal) != 0) {
        reply_error(call, KR_EPERM, "%s may submit audit records only as itself", call->principal);
        return;
    }
    if (r->n_records > AUDIT_MAX_BATCH_RECORDS || r->n_usage > AUDIT_MAX_USAGE_DELTAS ||
        r->boot_id == 0 || r->batch_seq == 0) {
        reply_error(call, KR_EINVAL, "an audit batch has a boot id, a batch number, at most %d "
                    "records and %d usage deltas", AUDIT_MAX_BATCH_RECORDS,
                    AUDIT_MAX_USAGE_DELTAS);
        return;
    }
    if (require_leader(call) != 0)
        return;
    /* Rebuilt from its fields, so no unknown fields ride into the raft entry. */
    Keyraft__UsageDelta *deltas = malloc((r->n_usage + 1) * sizeof(*deltas));
    Keyraft__UsageDelta **ptrs = malloc((r->n_usage + 1) * sizeof(*ptrs));
    if (deltas == NULL || ptrs == NULL) {
        free(deltas);
        free(ptrs);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    for (size_t i = 0; i < r->n_usage; i++) {
        keyraft__usage_delta__init(&deltas[i]);
        deltas[i].key_id = r->usage[i]->key_id;
        deltas[i].version = r->usage[i]->version;
        deltas[i].count = r->usage[i]->count;
        ptrs[i] = &deltas[i];
    }
    Keyraft__AuditSubmitRequest batch = KEYRAFT__AUDIT_SUBMIT_REQUEST__INIT;
    batch.node_id = r->node_id;
    batch.boot_id = r->boot_id;
    batch.batch_seq = r->batch_seq;
    batch.records = r->records;
    batch.n_records = r->n_records;
    batch.usage = ptrs;
    batch.n_usage = r->n_usage;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_AUDIT_APPEND;
    cmd.audit_append = &batch;
    int rv = cluster_propose(call->svc->deps.cluster, &cmd, submit_done, call);
    free(deltas);
    free(ptrs);
    if (rv != 0) {
        reply_error(call, rv, "cannot propose: %s", kr_strerror(rv));
        return;
    }
    call->svc->pending++;
}

/* --- leader duties ----------------------------------------------------------------------------- */

static void bootstrap_path(const struct service *svc, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", svc->deps.config->data_dir, BOOTSTRAP_FILE);
}

int gov_bootstrap_pending(struct service *svc)
{
    if (svc->bootstrap_done)
        return 0;
    char path[CONFIG_PATH_MAX + 32];
    bootstrap_path(svc, path, sizeof(path));
    if (access(path, F_OK) != 0) {
        svc->bootstrap_done = 1;
        return 0;
    }
    return 1;
}

static void bootstrap_done_cb(void *arg, const struct fsm_op_result *res)
{
    struct service *svc = arg;
    svc->bootstrap_in_progress = 0;
    if (res->status != 0 && res->status != KR_EEXIST)
        log_warn("registering the first principals: %s; retrying", kr_strerror(res->status));
}

/* The principals `keyraftd init` issued certificates for, registered once
 * through raft; the file goes when all of them are in the registry. */
static void tick_bootstrap(struct service *svc)
{
    if (svc->bootstrap_in_progress || !gov_bootstrap_pending(svc))
        return;
    char path[CONFIG_PATH_MAX + 32];
    bootstrap_path(svc, path, sizeof(path));
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return;
    uint8_t buf[65536];
    size_t n = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    Keyraft__PrincipalListResponse *list = keyraft__principal_list_response__unpack(NULL, n, buf);
    if (list == NULL) {
        log_error("%s is not a principal list: remove it, then register principals with "
                  "keyraft principal create", path);
        svc->bootstrap_done = 1;
        return;
    }
    Keyraft__PrincipalInfo *missing = NULL;
    for (size_t i = 0; i < list->n_principals && missing == NULL; i++) {
        Keyraft__PrincipalInfo *have = NULL;
        if (fsm_get_principal(svc->deps.store, list->principals[i]->name, &have) == 0)
            keyraft__principal_info__free_unpacked(have, NULL);
        else
            missing = list->principals[i];
    }
    if (missing == NULL) {
        if (unlink(path) != 0 && errno != ENOENT)
            log_warn("cannot remove %s: %s", path, strerror(errno));
        svc->bootstrap_done = 1;
        log_info("the first %zu principals are registered", list->n_principals);
    } else {
        Keyraft__PutPrincipalCommand put = KEYRAFT__PUT_PRINCIPAL_COMMAND__INIT;
        put.principal = missing;
        Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
        cmd.op_case = KEYRAFT__COMMAND__OP_PUT_PRINCIPAL;
        cmd.put_principal = &put;
        if (cluster_propose(svc->deps.cluster, &cmd, bootstrap_done_cb, svc) == 0)
            svc->bootstrap_in_progress = 1;
    }
    keyraft__principal_list_response__free_unpacked(list, NULL);
}

/* A signed checkpoint over the chain head, every checkpoint_ms while the
 * log grows. */
static void tick_checkpoint(struct service *svc)
{
    const struct config *cfg = svc->deps.config;
    if (svc->deps.audit == NULL || svc->deps.hsm == NULL || !cfg->audit_enabled)
        return;
    uint64_t now = now_ms();
    if (now - svc->last_checkpoint_ms < cfg->audit_checkpoint_ms)
        return;
    svc->last_checkpoint_ms = now;
    uint64_t seq = 0;
    uint8_t hash[AUDIT_HASH_LEN];
    if (audit_head(svc->deps.store, &seq, hash) != 0 || seq <= svc->last_checkpoint_seq + 1)
        return; /* nothing but the previous checkpoint since */
    uint8_t *rec = NULL;
    size_t len = 0;
    int rv = audit_make_checkpoint(svc->deps.store, svc->deps.hsm, cfg->node_id, now, &rec, &len);
    if (rv != 0) {
        log_warn("audit checkpoint: %s", kr_strerror(rv));
        return;
    }
    audit_log_append(svc->deps.audit, rec, len);
    free(rec);
    svc->last_checkpoint_seq = seq;
}

void gov_tick_any(struct service *svc)
{
    uint64_t boot = 0, seq = 0;
    if (svc->deps.audit != NULL &&
        audit_source_position(svc->deps.store, svc->deps.config->node_id, &boot, &seq) == 0)
        audit_log_applied(svc->deps.audit, boot, seq);
}

void gov_tick(struct service *svc)
{
    tick_bootstrap(svc);
    tick_checkpoint(svc);
}
