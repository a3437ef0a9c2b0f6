/* service.c: the key operations. Runs on the node's loop thread; slow work
 * (key generation) goes to the worker pool. */
#include "service_internal.h"

#define KR_LOG_MODULE "service"
#include <openssl/crypto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "audit.h"
#include "crypto.h"
#include "hash.h"
#include "fsm.h"
#include "hsm.h"
#include "pki.h"
#include "policy.h"
#include "keyraft.h"
#include "log.h"
#include "node.h"
#include "pbarena.h"
#include "rpc.h"
#include "secmem.h"
#include "snapshot.h"

#define NAME_MAX_LEN 256
#define TAG_MAX 64
#define TAG_KEY_MAX 128
#define TAG_VALUE_MAX 256
#define RANDOM_MAX 65536
#define REQUEST_ID_MAX 64
#define REVOKE_MESSAGE_MAX 1024
#define LIST_DEFAULT 100
#define LIST_SCAN_FACTOR 20 /* a page scans at most limit * factor + 1000 index rows */

enum blob_kind { BLOB_CIPHERTEXT = 'c', BLOB_SIGNATURE = 's', BLOB_MAC = 'm', BLOB_WRAP = 'w' };
#define BLOB_MAGIC 'K'
#define BLOB_FORMAT 1

#define MIN_INDEX_WAIT_MS 5000 /* a read waits this long for its min_index */

#define ARENA_CHUNK 1024
#define ARENA_ALIGN (sizeof(max_align_t))

/* Zeroed memory for the call's life. A calloc per allocation was ~8% of a
 * node answering batches: most calls now take one block. */
void *arena_alloc(struct call *call, size_t len)
{
    if (len > SIZE_MAX / 2)
        return NULL;
    size_t need = (len + 1 + ARENA_ALIGN - 1) & ~(ARENA_ALIGN - 1); /* +1: room for a NUL */
    struct arena_block *head = call->arena;
    if (head != NULL && head->cap - head->used >= need) {
        void *p = (uint8_t *)head->data + head->used;
        head->used += need;
        return p;
    }
    size_t cap = need > ARENA_CHUNK / 2 ? need : ARENA_CHUNK;
    struct arena_block *b = calloc(1, sizeof(*b) + cap);
    if (b == NULL)
        return NULL;
    b->cap = cap;
    b->used = need;
    if (cap == need && head != NULL) { /* a block of its own: keep carving the current one */
        b->next = head->next;
        head->next = b;
    } else {
        b->next = head;
        call->arena = b;
    }
    return b->data;
}

char *arena_strdup(struct call *call, const char *s)
{
    size_t n = strlen(s);
    char *p = arena_alloc(call, n + 1);
    if (p != NULL)
        memcpy(p, s, n + 1);
    return p;
}

static void arena_free(struct call *call)
{
    while (call->arena) {
        struct arena_block *b = call->arena;
        call->arena = b->next;
        OPENSSL_cleanse(b->data, b->used);
        free(b);
    }
}

uint64_t now_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

/* --- replies ------------------------------------------------------------------ */

static void batch_free(struct batch *b);
static void key_ref_put(struct key_ref *ref);

/* A request's memory, as service_handle's caller handed it over. */
static void request_release(Keyraft__Request *req, struct pb_arena *arena, int borrowed)
{
    if (arena != NULL)
        pb_arena_free(arena);
    else if (!borrowed)
        rpc_request_free(req);
}

void call_finish(struct call *call)
{
    call->resp.id = call->req->id;
    /* A batch that ran is on record through its requests, one record each;
     * one refused as a whole (nothing in it ran) has its own. */
    if (call->req->op_case != KEYRAFT__REQUEST__OP_BATCH || call->resp.status != 0)
        gov_audit_call(call);
    call->cb(call->ctx, &call->resp);
    gov_release(call);
    arena_free(call);
    secbuf_free(&call->material);
    key_ref_put(call->key);
    batch_free(call->batch);
    request_release(call->req, call->req_arena, call->req_borrowed);
    free(call);
}

static void leader_hint(struct call *call);

void reply_error(struct call *call, int status, const char *fmt, ...)
{
    char msg[512];
    if (call->retry_on_refusal) {
        call->retry_on_refusal = 0;
        if (reply_if_retry(call))
            return; /* a check the first attempt passed, refusing its retry */
    }
    if (status == KR_ENOTLEADER)
        leader_hint(call);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    call->resp.status = status;
    call->resp.message = arena_strdup(call, msg);
    if (call->resp.message == NULL)
        call->resp.message = (char *)"out of memory";
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT__NOT_SET;
    call_finish(call);
}

/* --- keys: lookup and presentation ---------------------------------------------- */

static void *arena_pb_alloc(void *data, size_t size) { return arena_alloc(data, size); }
static void arena_pb_free(void *data, void *ptr)
{
    (void)data;
    (void)ptr; /* the arena frees everything at the end of the call */
}

void *arena_copy_message(struct call *call, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = arena_alloc(call, len ? len : 1);
    if (buf == NULL)
        return NULL;
    protobuf_c_message_pack(m, buf);
    ProtobufCAllocator a = {arena_pb_alloc, arena_pb_free, call};
    return protobuf_c_message_unpack(m->descriptor, &a, len, buf);
}

int caller_in_domain(const struct call *call, const char *domain)
{
    if (call->who == NULL)
        return 0;
    for (size_t i = 0; i < call->who->info->n_domains; i++)
        if (strcmp(call->who->info->domains[i], domain) == 0)
            return 1;
    return 0;
}

const char *caller_domain_or(const struct call *call, const char *requested)
{
    if (requested != NULL && requested[0] != '\0')
        return requested;
    if (call->who != NULL && call->who->info->n_domains > 0)
        return call->who->info->domains[0];
    return "";
}

/* Whether the caller may run its operation on |rec|: officers manage keys of
 * their domains; users need a grant of their groups; admins only set
 * policies. Answers the call when not. */
static int key_access(struct call *call, const Keyraft__KeyRecord *rec)
{
    copy_cut(call->audit_key, sizeof(call->audit_key), rec->id);
    copy_cut(call->audit_domain, sizeof(call->audit_domain), rec->domain);
    Keyraft__Request__OpCase op = call->req->op_case;
    if (op == KEYRAFT__REQUEST__OP_SET_POLICY && (call->role_bits & POLICY_ADMIN))
        return 0;
    if (!caller_in_domain(call, rec->domain)) {
        /* The same answer as for a key that does not exist: no oracle. */
        reply_error(call, KR_ENOTFOUND, "no key with id %s", rec->id);
        return -1;
    }
    /* A loaded domain key is a live domain: destroyed ones are unloaded as
     * soon as governance changes, so the store is read only for the others. */
    gov_forget_destroyed_domains(call->svc);
    Keyraft__DomainRecord *dom = NULL;
    if (!keyring_has_domain(call->svc->deps.keyring, rec->domain) &&
        fsm_get_domain(call->svc->deps.store, rec->domain, &dom) == 0) {
        int shredded = dom->destroyed;
        keyraft__domain_record__free_unpacked(dom, NULL);
        if (shredded) {
            reply_error(call, KR_ESTATE, "key %s belonged to domain %s, which was destroyed: "
                        "its material is gone", rec->id, rec->domain);
            return -1;
        }
    }
    const char *grant = policy_grant_name(op);
    if (grant == NULL || ((call->role_bits & POLICY_OFFICER) && !policy_is_key_use(op)))
        return 0;
    const Keyraft__PrincipalInfo *p = call->who->info;
    if (policy_key_allows(rec->policy, p->groups, p->n_groups, grant))
        return 0;
    reply_error(call, KR_EPERM, "%s may not %s key %s: its policy grants that to none of the "
                "caller's groups", call->principal, grant, rec->id);
    return -1;
}

static void key_ref_put(struct key_ref *ref)
{
    if (ref == NULL || --ref->refs > 0)
        return;
    Keyraft__KeyRecord *rec = ref->rec;
    for (size_t i = 0; i < rec->n_versions; i++) /* as the store's copy is: sealed */
        OPENSSL_cleanse(rec->versions[i]->sealed.data, rec->versions[i]->sealed.len);
    keyraft__key_record__free_unpacked(rec, NULL);
    free(ref);
}

static void key_cache_drop(struct key_cache_slot *slot)
{
    key_ref_put(slot->ref);
    memset(slot, 0, sizeof(*slot));
}

/* fsm_get_key through the service's cache (the loop thread only); |*out|
 * holds a reference for the caller. A record sits in either entry of its
 * pair, so two hot keys whose hashes meet do not evict each other on every
 * request (16 keys in 4,096 direct-mapped entries collide one time in 34). */
static int cached_get_key(struct service *svc, const char *id, struct key_ref **out)
{
    struct key_cache_slot *pair =
        &svc->key_cache[(kr_hash_str(KR_HASH_INIT, id) % (KEY_CACHE_SLOTS / 2)) * 2];
    uint64_t gen = store_cf_generation(svc->deps.store, STORE_CF_KEYS);
    struct key_cache_slot *slot = NULL;
    for (int way = 0; way < 2 && slot == NULL; way++)
        if (pair[way].ref != NULL && strcmp(pair[way].id, id) == 0)
            slot = &pair[way];
    if (slot == NULL || slot->generation != gen) {
        struct key_ref *ref = calloc(1, sizeof(*ref));
        if (ref == NULL)
            return KR_ENOMEM;
        int rv = fsm_get_key(svc->deps.store, id, &ref->rec);
        if (rv != 0) {
            free(ref);
            return rv;
        }
        if (slot == NULL) /* not held: the empty entry, else the one used least lately */
            slot = pair[0].ref == NULL || (pair[1].ref != NULL && pair[0].used <= pair[1].used)
                       ? &pair[0]
                       : &pair[1];
        key_cache_drop(slot);
        copy_cut(slot->id, sizeof(slot->id), id);
        slot->generation = gen;
        slot->ref = ref;
        ref->refs = 1;
    }
    slot->used = ++svc->key_cache_clock;
    slot->ref->refs++;
    *out = slot->ref;
    return 0;
}

const Keyraft__KeyRecord *load_key(struct call *call, const Keyraft__KeyRef *ref)
{
    struct store *store = call->svc->deps.store;
    char id[FSM_KEY_ID_LEN + 1];
    if (ref == NULL || (ref->id[0] == '\0' && ref->name[0] == '\0')) {
        reply_error(call, KR_EINVAL, "a key id or name is required");
        return NULL;
    }
    int rv;
    if (ref->id[0] != '\0') {
        if (!fsm_key_id_valid(ref->id)) {
            reply_error(call, KR_ENOTFOUND, "no key with id '%.80s' (ids are 32 hex digits)",
                        ref->id);
            return NULL;
        }
        copy_cut(id, sizeof(id), ref->id);
    } else {
        if (strlen(ref->name) > NAME_MAX_LEN) {
            reply_error(call, KR_ENOTFOUND, "no key named '%.64s...' (names are at most %d "
                        "characters)", ref->name, NAME_MAX_LEN);
            return NULL;
        }
        rv = fsm_find_name(store, caller_domain_or(call, ref->domain), ref->name, id);
        if (rv == KR_ENOTFOUND) {
            reply_error(call, rv, "no key named '%.256s'", ref->name);
            return NULL;
        }
        if (rv != 0) {
            reply_error(call, rv, "name lookup failed: %s", kr_strerror(rv));
            return NULL;
        }
    }
    /* An operation run again (an export once its approval is spent) loads
     * again; the earlier loan ends. */
    key_ref_put(call->key);
    call->key = NULL;
    rv = cached_get_key(call->svc, id, &call->key);
    if (rv == KR_ENOTFOUND) {
        reply_error(call, KR_ENOTFOUND, "no key with id %s", id);
        return NULL;
    }
    if (rv != 0) {
        reply_error(call, rv, "reading key %s: %s", id, kr_strerror(rv));
        return NULL;
    }
    if (key_access(call, call->key->rec) != 0)
        return NULL;
    return call->key->rec;
}

/* |fresh|: a record not committed yet, so no encryption is counted under
 * it (no usage read). */
static Keyraft__KeyAttributes *attributes_of_record(struct call *call,
                                                    const Keyraft__KeyRecord *rec, int fresh)
{
    Keyraft__KeyAttributes *a = arena_alloc(call, sizeof(*a));
    if (a == NULL)
        return NULL;
    keyraft__key_attributes__init(a);
    a->id = arena_strdup(call, rec->id);
    a->name = arena_strdup(call, rec->name);
    a->domain = arena_strdup(call, rec->domain);
    a->revoke_message = arena_strdup(call, rec->revoke_message);
    if (!a->id || !a->name || !a->domain || !a->revoke_message)
        return NULL;
    a->algorithm = rec->algorithm;
    a->state = rec->state;
    a->current_version = rec->current_version;
    a->created_at = rec->created_at;
    a->activated_at = rec->activated_at;
    a->deactivated_at = rec->deactivated_at;
    a->revoked_at = rec->revoked_at;
    a->destroyed_at = rec->destroyed_at;
    a->revoke_reason = rec->revoke_reason;
    a->exportable = rec->exportable;
    a->commit_index = rec->updated_index;
    if (rec->policy != NULL && (a->policy = arena_copy_message(call, &rec->policy->base)) == NULL)
        return NULL;
    a->n_versions = rec->n_versions;
    a->versions = arena_alloc(call, rec->n_versions * sizeof(*a->versions));
    if (a->versions == NULL)
        return NULL;
    for (size_t i = 0; i < rec->n_versions; i++) {
        const Keyraft__KeyVersionRecord *v = rec->versions[i];
        Keyraft__VersionInfo *vi = arena_alloc(call, sizeof(*vi));
        if (vi == NULL)
            return NULL;
        keyraft__version_info__init(vi);
        vi->version = v->version;
        vi->created_at = v->created_at;
        vi->destroyed = v->destroyed;
        if (fresh ||
            audit_usage_get(call->svc->deps.store, rec->id, v->version, &vi->encryptions) != 0)
            vi->encryptions = 0;
        vi->kcv = arena_strdup(call, v->kcv);
        if (vi->kcv == NULL)
            return NULL;
        if (v->public_key.len) {
            vi->public_key.data = arena_alloc(call, v->public_key.len);
            if (vi->public_key.data == NULL)
                return NULL;
            memcpy(vi->public_key.data, v->public_key.data, v->public_key.len);
            vi->public_key.len = v->public_key.len;
        }
        a->versions[i] = vi;
    }
    a->n_tags = rec->n_tags;
    a->tags = arena_alloc(call, rec->n_tags * sizeof(*a->tags));
    if (a->tags == NULL)
        return NULL;
    for (size_t i = 0; i < rec->n_tags; i++) {
        Keyraft__Tag *t = arena_alloc(call, sizeof(*t));
        if (t == NULL)
            return NULL;
        keyraft__tag__init(t);
        t->key = arena_strdup(call, rec->tags[i]->key);
        t->value = arena_strdup(call, rec->tags[i]->value);
        if (!t->key || !t->value)
            return NULL;
        a->tags[i] = t;
    }
    return a;
}

static Keyraft__KeyAttributes *attributes_of(struct call *call, const Keyraft__KeyRecord *rec)
{
    return attributes_of_record(call, rec, 0);
}

static void reply_key(struct call *call, const Keyraft__KeyRecord *rec, uint64_t commit_index)
{
    Keyraft__KeyAttributes *a = attributes_of(call, rec);
    if (a == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_KEY;
    call->resp.key = a;
    call->resp.commit_index = commit_index;
    call_finish(call);
}

static const Keyraft__KeyVersionRecord *find_version(const Keyraft__KeyRecord *rec, uint32_t v)
{
    for (size_t i = 0; i < rec->n_versions; i++)
        if (rec->versions[i]->version == v)
            return rec->versions[i];
    return NULL;
}

/* The domain key must be loaded before sealing or unsealing. */
int ensure_domain(struct service *svc, const char *domain)
{
    gov_forget_destroyed_domains(svc);
    if (keyring_has_domain(svc->deps.keyring, domain))
        return 0;
    Keyraft__DomainRecord *dom = NULL;
    int rv = fsm_get_domain(svc->deps.store, domain, &dom);
    if (rv != 0)
        return rv;
    if (dom->destroyed) {
        keyraft__domain_record__free_unpacked(dom, NULL);
        return KR_ESTATE;
    }
    rv = keyring_load_domain(svc->deps.keyring, domain, dom->wrapped_key.data,
                             dom->wrapped_key.len);
    keyraft__domain_record__free_unpacked(dom, NULL);
    if (rv != 0)
        log_error("domain %s: cannot unwrap its key with this node's MWK: %s", domain,
                  kr_strerror(rv));
    return rv;
}

/* Opens one version's material: into |out|, or, with |use|, in place (see
 * keyring_use). Answers the call on failure. */
static int open_version(struct call *call, const Keyraft__KeyRecord *rec,
                        const Keyraft__KeyVersionRecord *v, secbuf *out, keyring_use_fn use,
                        void *use_arg)
{
    if (v->destroyed || v->sealed.len == 0) {
        reply_error(call, KR_ESTATE, "version %u of key %s is destroyed", v->version, rec->id);
        return -1;
    }
    struct keyring *keyring = call->svc->deps.keyring;
    int rv = ensure_domain(call->svc, rec->domain);
    if (rv == 0 && use != NULL)
        rv = keyring_use(keyring, rec->domain, rec->id, v->version, rec->algorithm,
                         v->sealed.data, v->sealed.len, use, use_arg);
    else if (rv == 0)
        rv = keyring_unseal(keyring, rec->domain, rec->id, v->version, rec->algorithm,
                            v->sealed.data, v->sealed.len, out);
    if (rv != 0) {
        log_error("key %s version %u: cannot unseal: %s", rec->id, v->version, kr_strerror(rv));
        reply_error(call, rv == KR_EAUTH ? KR_EINTERNAL : rv,
                    "key %s version %u cannot be opened on this node (%s)", rec->id,
                    v->version, kr_strerror(rv));
        return -1;
    }
    return 0;
}

/* Opens one version's material into |out|. Answers the call on failure. */
static int unseal_version(struct call *call, const Keyraft__KeyRecord *rec,
                          const Keyraft__KeyVersionRecord *v, secbuf *out)
{
    return open_version(call, rec, v, out, NULL, NULL);
}

/* Runs |use| on one version's material, valid only during the call, with no
 * copy when the keyring holds it. Answers the call when it cannot be opened. */
static int use_version(struct call *call, const Keyraft__KeyRecord *rec,
                       const Keyraft__KeyVersionRecord *v, keyring_use_fn use, void *use_arg)
{
    return open_version(call, rec, v, NULL, use, use_arg);
}

/* --- self-describing blobs ----------------------------------------------------- */

static size_t blob_header(uint8_t *out, enum blob_kind kind, const char *key_id, uint32_t version)
{
    size_t idlen = strlen(key_id);
    out[0] = BLOB_MAGIC;
    out[1] = BLOB_FORMAT;
    out[2] = (uint8_t)kind;
    out[3] = (uint8_t)idlen;
    memcpy(out + 4, key_id, idlen);
    uint8_t *p = out + 4 + idlen;
    p[0] = (uint8_t)(version >> 24);
    p[1] = (uint8_t)(version >> 16);
    p[2] = (uint8_t)(version >> 8);
    p[3] = (uint8_t)version;
    return 8 + idlen;
}

/* Parses a blob header; the key id is copied out. Returns the header length,
 * or 0 when |in| is not a blob of |kind|. */
static size_t blob_parse(const uint8_t *in, size_t len, enum blob_kind kind,
                         char out_id[FSM_KEY_ID_LEN + 1], uint32_t *out_version)
{
    if (len < 8 || in[0] != BLOB_MAGIC || in[1] != BLOB_FORMAT || in[2] != (uint8_t)kind ||
        in[3] != FSM_KEY_ID_LEN || len < 8u + FSM_KEY_ID_LEN)
        return 0;
    memcpy(out_id, in + 4, FSM_KEY_ID_LEN);
    out_id[FSM_KEY_ID_LEN] = '\0';
    if (!fsm_key_id_valid(out_id))
        return 0;
    const uint8_t *p = in + 4 + FSM_KEY_ID_LEN;
    *out_version = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    return 8 + FSM_KEY_ID_LEN;
}

/* An enum value this build knows (unknown numbers arrive from newer clients
 * or hostile ones). */
static int enum_known(const ProtobufCEnumDescriptor *d, int value)
{
    return protobuf_c_enum_descriptor_get_value(d, value) != NULL;
}

/* --- state checks ------------------------------------------------------------------ */

static int can_protect(Keyraft__KeyState s) { return s == KEYRAFT__KEY_STATE__ACTIVE; }

static int can_process(Keyraft__KeyState s)
{
    /* SP 800-57: deactivated and compromised keys may still process
     * (decrypt, verify) data they protected. */
    return s == KEYRAFT__KEY_STATE__ACTIVE || s == KEYRAFT__KEY_STATE__DEACTIVATED ||
           s == KEYRAFT__KEY_STATE__COMPROMISED;
}

static int check_state(struct call *call, const Keyraft__KeyRecord *rec, int ok, const char *op)
{
    if (ok)
        return 0;
    reply_error(call, KR_ESTATE, "key %s is %s: %s is not allowed in that state", rec->id,
                kr_state_name(rec->state), op);
    return -1;
}

static int check_type(struct call *call, const Keyraft__KeyRecord *rec, int ok, const char *op)
{
    if (ok)
        return 0;
    reply_error(call, KR_EKEYTYPE, "key %s is %s: %s needs a different algorithm", rec->id,
                kr_alg_name(rec->algorithm), op);
    return -1;
}

/* --- writes ---------------------------------------------------------------------------- */

static int valid_text(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return 0;
    return 1;
}

static int validate_new_key(struct call *call, const char *name, Keyraft__Algorithm alg,
                            Keyraft__Tag **tags, size_t n_tags)
{
    if (!valid_text(name, NAME_MAX_LEN)) {
        reply_error(call, KR_EINVAL, "a key name is 1..%d printable characters", NAME_MAX_LEN);
        return -1;
    }
    if (!enum_known(&keyraft__algorithm__descriptor, alg) ||
        alg == KEYRAFT__ALGORITHM__ALG_UNSPECIFIED) {
        reply_error(call, KR_EINVAL, "unknown or missing algorithm (%d)", (int)alg);
        return -1;
    }
    if (n_tags > TAG_MAX) {
        reply_error(call, KR_EINVAL, "at most %d tags", TAG_MAX);
        return -1;
    }
    for (size_t i = 0; i < n_tags; i++) {
        if (!valid_text(tags[i]->key, TAG_KEY_MAX) ||
            (tags[i]->value[0] && !valid_text(tags[i]->value, TAG_VALUE_MAX))) {
            reply_error(call, KR_EINVAL, "tag %zu: key 1..%d, value 0..%d printable characters",
                        i + 1, TAG_KEY_MAX, TAG_VALUE_MAX);
            return -1;
        }
    }
    char id[FSM_KEY_ID_LEN + 1];
    int rv = fsm_find_name(call->svc->deps.store, call->domain, name, id);
    if (rv == 0) {
        reply_error(call, KR_EEXIST, "a key named '%s' already exists (%s)", name, id);
        return -1;
    }
    return 0;
}

/* With KR_ENOTLEADER the client gets the leader's client endpoint, from the
 * registry, and goes there next. */
static void leader_hint(struct call *call)
{
    struct service *svc = call->svc;
    uint64_t leader = cluster_leader_id(svc->deps.cluster);
    Keyraft__NodeRecord *node = NULL;
    if (leader == 0 || fsm_get_node(svc->deps.store, leader, &node) != 0)
        return;
    call->resp.leader_endpoint = arena_strdup(call, node->client_address);
    if (call->resp.leader_endpoint == NULL)
        call->resp.leader_endpoint = (char *)"";
    keyraft__node_record__free_unpacked(node, NULL);
}

int require_leader(struct call *call)
{
    if (cluster_is_leader(call->svc->deps.cluster))
        return 0;
    struct cluster_status st; /* only to say who leads */
    cluster_get_status(call->svc->deps.cluster, &st);
    reply_error(call, KR_ENOTLEADER, "this node is %s; the leader is node %llu (%s)", st.role,
                (unsigned long long)st.leader_id,
                st.leader_address[0] ? st.leader_address : "unknown");
    return -1;
}

void write_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        const char *why = res->status == KR_EEXIST     ? "the name is taken"
                          : res->status == KR_ESTATE   ? "the key's state changed meanwhile"
                          : res->status == KR_ENOTLEADER ? "leadership was lost; outcome unknown, retry with the same request id"
                                                       : kr_strerror(res->status);
        reply_error(call, res->status, "%s", why);
        return;
    }
    /* A new key applied as proposed (the FSM only stamps the index): answer
     * from the proposal. A retry answered by deduplication names the first
     * attempt's key, whose record is read back like any other. */
    if (call->created != NULL && strcmp(res->key_id, call->created->id) == 0) {
        call->created->commit_index = res->index;
        call->resp.result_case = KEYRAFT__RESPONSE__RESULT_KEY;
        call->resp.key = call->created;
        call->resp.commit_index = res->index;
        call_finish(call);
        return;
    }
    Keyraft__KeyRecord *rec = NULL;
    int rv = fsm_get_key(call->svc->deps.store, res->key_id, &rec);
    if (rv != 0) {
        reply_error(call, rv, "applied, but reading key %s back failed", res->key_id);
        return;
    }
    reply_key(call, rec, res->index);
    keyraft__key_record__free_unpacked(rec, NULL);
}

/* Deduplication is per principal: another client reusing an id gets its own
 * outcome, never someone else's key. */
static void scoped_request_id(const struct call *call, char *out, size_t cap)
{
    out[0] = '\0';
    if (call->req->request_id[0] != '\0')
        snprintf(out, cap, "%s/%s", call->principal, call->req->request_id);
}

/* A retried write whose first attempt applied gets that attempt's outcome,
 * before any check that the first attempt itself would now fail (the name is
 * taken, the state moved). Returns 1 when it answered. */
int reply_if_retry_then(struct call *call, cluster_done_cb done)
{
    char request_id[REQUEST_ID_MAX + 260];
    scoped_request_id(call, request_id, sizeof(request_id));
    if (request_id[0] == '\0')
        return 0;
    struct fsm_op_result res;
    if (cluster_find_dedup(call->svc->deps.cluster, request_id, &res) != 0)
        return 0;
    call->svc->pending++; /* |done| takes it back */
    done(call, &res);
    return 1;
}

int reply_if_retry(struct call *call) { return reply_if_retry_then(call, write_done); }

/* Proposes |cmd| under the call's scoped request id; |done| answers it. */
void propose_then(struct call *call, Keyraft__Command *cmd, cluster_done_cb done)
{
    char request_id[REQUEST_ID_MAX + 260];
    scoped_request_id(call, request_id, sizeof(request_id));
    cmd->request_id = request_id;
    cmd->approval_id = call->approval_id;
    call->retry_on_refusal = 0; /* the fsm deduplicates from here */
    int rv = cluster_propose(call->svc->deps.cluster, cmd, done, call);
    if (rv != 0) {
        reply_error(call, rv, "cannot propose: %s", kr_strerror(rv));
        return;
    }
    call->svc->pending++;
}

static void propose(struct call *call, Keyraft__Command *cmd)
{
    propose_then(call, cmd, write_done);
}

/* Seals |call->material| as version |version| of a key. */
static int seal_version(struct call *call, const char *domain, uint32_t version,
                        Keyraft__KeyVersionRecord *v, char *kcv, uint8_t **pub, size_t *pub_len,
                        uint8_t **sealed, size_t *sealed_len)
{
    int rv = crypto_key_info(call->alg, call->material.data, call->material.len, kcv, pub, pub_len);
    if (rv != 0)
        return rv;
    rv = ensure_domain(call->svc, domain);
    if (rv != 0)
        return rv;
    rv = keyring_seal(call->svc->deps.keyring, domain, call->key_id, version, call->alg,
                      call->material.data, call->material.len, sealed, sealed_len);
    if (rv != 0)
        return rv;
    v->version = version;
    v->created_at = now_ms();
    v->sealed.data = *sealed;
    v->sealed.len = *sealed_len;
    v->kcv = kcv;
    v->public_key.data = *pub;
    v->public_key.len = *pub ? *pub_len : 0;
    return 0;
}

static void generate_work(uv_work_t *work)
{
    struct call *call = work->data;
    call->work_status = crypto_generate(call->alg, &call->material);
}

static void put_key_with_material(struct call *call, const char *name, Keyraft__Tag **tags,
                                  size_t n_tags, int pre_active, int non_exportable,
                                  const Keyraft__KeyPolicy *req_policy)
{
    uint8_t rnd[8];
    int rv = crypto_public_random(rnd, sizeof(rnd)); /* an id is public */
    if (rv != 0) {
        reply_error(call, rv, "random id: %s", kr_strerror(rv));
        return;
    }
    fsm_make_key_id(0, now_ms(), rnd, call->key_id);
    char kcv[17] = "";
    uint8_t *pub = NULL, *sealed = NULL;
    size_t pub_len = 0, sealed_len = 0;
    Keyraft__KeyVersionRecord v = KEYRAFT__KEY_VERSION_RECORD__INIT;
    rv = seal_version(call, call->domain, 1, &v, kcv, &pub, &pub_len, &sealed, &sealed_len);
    secbuf_free(&call->material);
    if (rv != 0) {
        free(pub);
        free(sealed);
        reply_error(call, rv, "sealing the new key failed: %s", kr_strerror(rv));
        return;
    }
    Keyraft__KeyVersionRecord *versions[1] = {&v};
    /* Tags are rebuilt from their two strings: the client's own messages may
     * carry unknown fields that protobuf-c re-encodes into bytes it cannot
     * parse back, which would poison the raft entry for every client in it. */
    Keyraft__Tag tag_store[TAG_MAX];
    Keyraft__Tag *tag_ptrs[TAG_MAX];
    for (size_t i = 0; i < n_tags; i++) {
        keyraft__tag__init(&tag_store[i]);
        tag_store[i].key = tags[i]->key;
        tag_store[i].value = tags[i]->value;
        tag_ptrs[i] = &tag_store[i];
    }
    Keyraft__KeyRecord rec = KEYRAFT__KEY_RECORD__INIT;
    rec.id = call->key_id;
    rec.name = (char *)name;
    rec.domain = call->domain;
    struct key_policy_copy policy;
    key_policy_rebuild(req_policy, &policy);
    if (policy.policy.owner_group[0] == '\0' && policy.policy.n_grants == 0 &&
        call->who != NULL && call->who->info->n_groups > 0)
        policy.policy.owner_group = call->who->info->groups[0];
    rec.policy = &policy.policy;

    rec.algorithm = call->alg;
    uint64_t now = now_ms();
    rec.state = pre_active ? KEYRAFT__KEY_STATE__PRE_ACTIVE : KEYRAFT__KEY_STATE__ACTIVE;
    rec.current_version = 1;
    rec.n_versions = 1;
    rec.versions = versions;
    rec.created_at = now;
    rec.activated_at = pre_active ? 0 : now;
    rec.n_tags = n_tags;
    rec.tags = tag_ptrs;
    rec.exportable = !non_exportable;
    /* The answer, made now while the record is at hand (NULL: read back). */
    call->created = attributes_of_record(call, &rec, 1);
    Keyraft__PutKeyCommand put = KEYRAFT__PUT_KEY_COMMAND__INIT;
    put.key = &rec;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_KEY;
    cmd.put_key = &put;
    propose(call, &cmd);
    free(pub);
    free(sealed);
}

void key_policy_rebuild(const Keyraft__KeyPolicy *in, struct key_policy_copy *out)
{
    keyraft__key_policy__init(&out->policy);
    if (in == NULL)
        return;
    out->policy.owner_group = in->owner_group;
    out->policy.usage_limit = in->usage_limit;
    out->policy.n_grants = in->n_grants < POLICY_MAX_GRANTS ? in->n_grants : POLICY_MAX_GRANTS;
    out->policy.grants = out->grant_ptrs;
    for (size_t i = 0; i < out->policy.n_grants; i++) {
        keyraft__group_grant__init(&out->grants[i]);
        out->grants[i].group = in->grants[i]->group;
        out->grants[i].ops = in->grants[i]->ops;
        out->grants[i].n_ops = in->grants[i]->n_ops;
        out->grant_ptrs[i] = &out->grants[i];
    }
}

/* Where a new key goes and who may use it: a live domain the caller belongs
 * to, and a well-formed policy with an owner (the caller's first group by
 * default). Sets call->domain. 0, or -1 when it answered. */
static int placement_check(struct call *call, const char *domain,
                           const Keyraft__KeyPolicy *policy)
{
    const char *d = caller_domain_or(call, domain);
    if (d[0] == '\0' || !caller_in_domain(call, d)) {
        reply_error(call, KR_EPERM, "%s may not create keys in domain \"%.64s\"", call->principal,
                    d[0] ? d : "(none: the principal has no domain)");
        return -1;
    }
    copy_cut(call->domain, sizeof(call->domain), d);
    copy_cut(call->audit_domain, sizeof(call->audit_domain), d);
    int rv = ensure_domain(call->svc, d);
    if (rv != 0) {
        reply_error(call, rv, "domain %s %s", d,
                    rv == KR_ESTATE      ? "was destroyed"
                    : rv == KR_ENOTFOUND ? "does not exist"
                                         : "cannot be loaded on this node");
        return -1;
    }
    char why[256];
    if (policy != NULL && policy_key_policy_check(policy, why, sizeof(why)) != 0) {
        reply_error(call, KR_EINVAL, "key policy: %s", why);
        return -1;
    }
    int has_owner = (policy != NULL && (policy->owner_group[0] != '\0' || policy->n_grants > 0)) ||
                    (call->who != NULL && call->who->info->n_groups > 0);
    if (!has_owner) {
        reply_error(call, KR_EINVAL, "the key needs an owner group: %s is in no group, so name "
                    "one (--owner-group)", call->principal);
        return -1;
    }
    return 0;
}

static void create_after_work(uv_work_t *work, int status)
{
    struct call *call = work->data;
    call->svc->pending--;
    if (status != 0 || call->work_status != 0) {
        reply_error(call, call->work_status ? call->work_status : KR_EINTERNAL,
                    "key generation failed");
        return;
    }
    if (require_leader(call) != 0)
        return;
    const Keyraft__CreateKeyRequest *r = call->req->create;
    put_key_with_material(call, r->name, r->tags, r->n_tags, r->pre_active, r->non_exportable,
                          r->policy);
}

/* A new key's retry is looked up only once a check refuses it (most often:
 * its first attempt took the name), not before every create: a first
 * attempt passes the checks, and a retry whose first attempt has not applied
 * yet is answered by the fsm. */
static void retry_on_refusal(struct call *call)
{
    call->retry_on_refusal = call->req->request_id[0] != '\0';
}

static void op_create(struct call *call)
{
    const Keyraft__CreateKeyRequest *r = call->req->create;
    if (require_leader(call) != 0)
        return;
    retry_on_refusal(call);
    if (placement_check(call, r->domain, r->policy) != 0 ||
        validate_new_key(call, r->name, r->algorithm, r->tags, r->n_tags) != 0)
        return;
    call->alg = r->algorithm;
    if (crypto_is_aes(r->algorithm) || crypto_is_hmac(r->algorithm)) {
        /* A few random bytes: cheaper here than the worker pool's two
         * thread hand-offs, and a batch's creates then reach the proposal
         * queue in the same loop iteration. */
        int rv = crypto_generate(call->alg, &call->material);
        if (rv != 0) {
            reply_error(call, rv, "key generation failed");
            return;
        }
        put_key_with_material(call, r->name, r->tags, r->n_tags, r->pre_active,
                              r->non_exportable, r->policy);
        return;
    }
    call->work.data = call;
    int rv = uv_queue_work(call->svc->deps.loop, &call->work, generate_work, create_after_work);
    if (rv != 0) {
        reply_error(call, KR_EINTERNAL, "worker pool: %s", uv_strerror(rv));
        return;
    }
    call->svc->pending++;
}

static void op_import(struct call *call)
{
    const Keyraft__ImportKeyRequest *r = call->req->import;
    if (require_leader(call) != 0)
        return;
    retry_on_refusal(call);
    if (placement_check(call, r->domain, r->policy) != 0 ||
        validate_new_key(call, r->name, r->algorithm, r->tags, r->n_tags) != 0)
        return;
    int rv = crypto_check_material(r->algorithm, r->material.data, r->material.len);
    if (rv != 0) {
        reply_error(call, KR_EINVAL, "the material is not a valid %s key",
                    kr_alg_name(r->algorithm));
        return;
    }
    call->alg = r->algorithm;
    rv = secbuf_copy(&call->material, r->material.data, r->material.len);
    /* The request's copy is wiped now: it is freed only at the end of the call. */
    OPENSSL_cleanse(r->material.data, r->material.len);
    if (rv != 0) {
        reply_error(call, rv, "out of secure memory");
        return;
    }
    put_key_with_material(call, r->name, r->tags, r->n_tags, r->pre_active, r->non_exportable,
                          r->policy);
}

static void set_state(struct call *call, const Keyraft__KeyRef *ref, Keyraft__KeyState to,
                      Keyraft__RevokeReason reason, const char *message, const char *op)
{
    if (require_leader(call) != 0 || reply_if_retry(call))
        return;
    const Keyraft__KeyRecord *rec = load_key(call, ref);
    if (rec == NULL)
        return;
    /* A compromised key stays marked compromised once destroyed. */
    if (to == KEYRAFT__KEY_STATE__DESTROYED && rec->state == KEYRAFT__KEY_STATE__COMPROMISED)
        to = KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED;
    int ok = fsm_transition_allowed(rec->state, to);
    const char *hint = "";
    if (!ok && to == KEYRAFT__KEY_STATE__DESTROYED && rec->state == KEYRAFT__KEY_STATE__ACTIVE)
        hint = "; deactivate or revoke it first";
    if (!ok) {
        reply_error(call, KR_ESTATE, "key %s is %s: cannot %s it%s", rec->id,
                    kr_state_name(rec->state), op, hint);
        return;
    }
    if (gov_quorum_gate(call, rec->id) != 0)
        return;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    Keyraft__SetStateCommand ss = KEYRAFT__SET_STATE_COMMAND__INIT;
    Keyraft__DestroyKeyCommand dk = KEYRAFT__DESTROY_KEY_COMMAND__INIT;
    if (to == KEYRAFT__KEY_STATE__DESTROYED || to == KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED) {
        dk.key_id = rec->id;
        dk.at = now_ms();
        cmd.op_case = KEYRAFT__COMMAND__OP_DESTROY_KEY;
        cmd.destroy_key = &dk;
    } else {
        ss.key_id = rec->id;
        ss.state = to;
        ss.at = now_ms();
        ss.reason = reason;
        ss.message = (char *)(message ? message : "");
        cmd.op_case = KEYRAFT__COMMAND__OP_SET_STATE;
        cmd.set_state = &ss;
    }
    propose(call, &cmd);
}

static void op_revoke(struct call *call)
{
    const Keyraft__RevokeKeyRequest *r = call->req->revoke;
    if (r->reason == KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED ||
        !enum_known(&keyraft__revoke_reason__descriptor, r->reason)) {
        reply_error(call, KR_EINVAL,
                    "a revocation reason is required: compromised, superseded, cessation, "
                    "affiliation-changed, privilege-withdrawn");
        return;
    }
    if (strlen(r->message) > REVOKE_MESSAGE_MAX) {
        reply_error(call, KR_EINVAL, "revocation message longer than %d", REVOKE_MESSAGE_MAX);
        return;
    }
    Keyraft__KeyState to = r->reason == KEYRAFT__REVOKE_REASON__KEY_COMPROMISE
                               ? KEYRAFT__KEY_STATE__COMPROMISED
                               : KEYRAFT__KEY_STATE__DEACTIVATED;
    set_state(call, r->key, to, r->reason, r->message, "revoke");
}

static void rotate_after_work(uv_work_t *work, int status)
{
    struct call *call = work->data;
    call->svc->pending--;
    if (status != 0 || call->work_status != 0) {
        reply_error(call, call->work_status ? call->work_status : KR_EINTERNAL,
                    "key generation failed");
        return;
    }
    if (require_leader(call) != 0)
        return;
    const Keyraft__KeyRecord *rec = call->key->rec; /* lent by load_key in op_rotate */
    char kcv[17] = "";
    uint8_t *pub = NULL, *sealed = NULL;
    size_t pub_len = 0, sealed_len = 0;
    Keyraft__KeyVersionRecord v = KEYRAFT__KEY_VERSION_RECORD__INIT;
    copy_cut(call->key_id, sizeof(call->key_id), rec->id);
    int rv = seal_version(call, rec->domain, rec->current_version + 1, &v, kcv, &pub, &pub_len,
                          &sealed, &sealed_len);
    secbuf_free(&call->material);
    if (rv != 0) {
        free(pub);
        free(sealed);
        reply_error(call, rv, "sealing the new version failed: %s", kr_strerror(rv));
        return;
    }
    Keyraft__AddVersionCommand av = KEYRAFT__ADD_VERSION_COMMAND__INIT;
    av.key_id = rec->id;
    av.version = &v;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_ADD_VERSION;
    cmd.add_version = &av;
    propose(call, &cmd);
    free(pub);
    free(sealed);
}

static void op_rotate(struct call *call)
{
    if (require_leader(call) != 0 || reply_if_retry(call))
        return;
    const Keyraft__KeyRecord *rec = load_key(call, call->req->rotate->key);
    if (rec == NULL)
        return;
    if (rec->state != KEYRAFT__KEY_STATE__ACTIVE && rec->state != KEYRAFT__KEY_STATE__PRE_ACTIVE) {
        reply_error(call, KR_ESTATE, "key %s is %s: only active or pre-active keys rotate",
                    rec->id, kr_state_name(rec->state));
        return;
    }
    call->alg = rec->algorithm;
    call->work.data = call;
    int rv = uv_queue_work(call->svc->deps.loop, &call->work, generate_work, rotate_after_work);
    if (rv != 0) {
        reply_error(call, KR_EINTERNAL, "worker pool: %s", uv_strerror(rv));
        return;
    }
    call->svc->pending++;
}

/* --- reads ------------------------------------------------------------------------------- */

static void op_get(struct call *call)
{
    const Keyraft__KeyRecord *rec = load_key(call, call->req->get->key);
    if (rec == NULL)
        return;
    reply_key(call, rec, 0);
}

static void op_export(struct call *call)
{
    const Keyraft__ExportKeyRequest *r = call->req->export;
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    secbuf mat = {0};
    if (!call->svc->deps.config->allow_export) {
        reply_error(call, KR_EPERM, "export is disabled on this cluster ([policy] allow_export)");
        goto out;
    }
    if (!rec->exportable) {
        reply_error(call, KR_EPERM, "key %s was created non-exportable", rec->id);
        goto out;
    }
    if (rec->state == KEYRAFT__KEY_STATE__DESTROYED ||
        rec->state == KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED) {
        reply_error(call, KR_ESTATE, "key %s is destroyed", rec->id);
        goto out;
    }
    uint32_t version = r->version ? r->version : rec->current_version;
    const Keyraft__KeyVersionRecord *v = find_version(rec, version);
    if (v == NULL) {
        reply_error(call, KR_ENOTFOUND, "key %s has no version %u", rec->id, version);
        goto out;
    }
    call->audit_version = version;
    if (gov_quorum_gate(call, rec->id) != 0)
        goto out;
    if (unseal_version(call, rec, v, &mat) != 0)
        goto out;
    Keyraft__ExportKeyResponse *er = arena_alloc(call, sizeof(*er));
    uint8_t *copy = arena_alloc(call, mat.len);
    Keyraft__KeyAttributes *a = attributes_of(call, rec);
    if (er == NULL || copy == NULL || a == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        goto out;
    }
    keyraft__export_key_response__init(er);
    memcpy(copy, mat.data, mat.len);
    er->material.data = copy;
    er->material.len = mat.len;
    er->version = version;
    er->attributes = a;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_EXPORT;
    call->resp.export = er;
    log_info("key %s version %u exported to %s", rec->id, version, call->principal);
    call_finish(call);
out:
    secbuf_free(&mat);
}

struct list_plan {
    uint8_t lower[1200];
    size_t lower_len;
    uint8_t upper[1200];
    size_t upper_len;
    enum store_cf cf;
    size_t prefix_len; /* bytes before the key id (attrs) or name (names) */
};

static int hex_decode(const char *hex, uint8_t *out, size_t cap, size_t *out_len)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > cap)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v = 0;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    *out_len = n / 2;
    return 0;
}

static void op_list(struct call *call)
{
    const Keyraft__ListKeysRequest *r = call->req->list;
    const struct config *cfg = call->svc->deps.config;
    const char *domain = caller_domain_or(call, r->domain);
    if (!caller_in_domain(call, domain)) {
        reply_error(call, KR_EPERM, "%s may not list domain \"%.64s\"", call->principal,
                    domain[0] ? domain : "(none: the principal has no domain)");
        return;
    }
    /* A user without the officer role sees only keys its groups may use. */
    int by_grant = !(call->role_bits & POLICY_OFFICER);
    struct list_plan plan = {0};
    char num[16];
    uint32_t limit = r->limit ? r->limit : LIST_DEFAULT;
    if (limit > cfg->list_max)
        limit = cfg->list_max;
    if (r->state != 0 && !enum_known(&keyraft__key_state__descriptor, r->state)) {
        reply_error(call, KR_EINVAL, "unknown state filter");
        return;
    }
    if (r->algorithm != 0 && !enum_known(&keyraft__algorithm__descriptor, r->algorithm)) {
        reply_error(call, KR_EINVAL, "unknown algorithm filter");
        return;
    }
    /* Drive the scan with the most selective index the filter offers. */
    if (r->tag != NULL && r->tag->key[0] != '\0') {
        plan.cf = STORE_CF_ATTRS;
        plan.lower_len = fsm_attr_prefix(plan.lower, sizeof(plan.lower) - 64, FSM_INDEX_TAG,
                                         domain, r->tag->key, r->tag->value);
    } else if (r->prefix[0] == '\0' && r->state != 0) {
        plan.cf = STORE_CF_ATTRS;
        snprintf(num, sizeof(num), "%d", (int)r->state);
        plan.lower_len = fsm_attr_prefix(plan.lower, sizeof(plan.lower) - 64, FSM_INDEX_STATE,
                                         domain, num, NULL);
    } else if (r->prefix[0] == '\0' && r->algorithm != 0) {
        plan.cf = STORE_CF_ATTRS;
        snprintf(num, sizeof(num), "%02d", (int)r->algorithm);
        plan.lower_len = fsm_attr_prefix(plan.lower, sizeof(plan.lower) - 64, FSM_INDEX_ALG,
                                         domain, num, NULL);
    } else {
        plan.cf = STORE_CF_NAMES;
        /* "domain\0": the empty name leaves just the separator. */
        plan.lower_len = fsm_name_key(plan.lower, sizeof(plan.lower) - 64, domain, "");
        size_t pl = strlen(r->prefix);
        if (plan.lower_len + pl > sizeof(plan.lower) - 64)
            plan.lower_len = 0;
        else {
            memcpy(plan.lower + plan.lower_len, r->prefix, pl);
            plan.prefix_len = plan.lower_len;
            plan.lower_len += pl;
        }
    }
    if (plan.lower_len == 0) {
        reply_error(call, KR_EINVAL, "filter too long");
        return;
    }
    if (plan.cf == STORE_CF_ATTRS)
        plan.prefix_len = plan.lower_len;
    /* upper bound: the prefix + 1 at its last byte that is not 0xff */
    memcpy(plan.upper, plan.lower, plan.lower_len);
    plan.upper_len = plan.lower_len;
    while (plan.upper_len > 0 && plan.upper[plan.upper_len - 1] == 0xff)
        plan.upper_len--;
    if (plan.upper_len > 0)
        plan.upper[plan.upper_len - 1]++;
    uint8_t start[1200];
    size_t start_len = plan.lower_len;
    memcpy(start, plan.lower, plan.lower_len);
    if (r->after[0] != '\0') {
        size_t clen = 0;
        if (hex_decode(r->after, start, sizeof(start) - 1, &clen) != 0 || clen < plan.lower_len ||
            memcmp(start, plan.lower, plan.lower_len) != 0) {
            reply_error(call, KR_EINVAL, "the cursor does not belong to this listing");
            return;
        }
        start[clen] = '\0'; /* strictly after the cursor */
        start_len = clen + 1;
    }
    struct store_iter *it = NULL;
    int rv = store_iter_new(call->svc->deps.store, plan.cf, start, start_len,
                            plan.upper_len ? plan.upper : NULL, plan.upper_len, &it);
    if (rv != 0) {
        reply_error(call, rv, "listing failed: %s", kr_strerror(rv));
        return;
    }
    Keyraft__ListKeysResponse *lr = arena_alloc(call, sizeof(*lr));
    Keyraft__KeyAttributes **keys = arena_alloc(call, limit * sizeof(*keys));
    if (lr == NULL || keys == NULL) {
        store_iter_free(it);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__list_keys_response__init(lr);
    lr->keys = keys;
    size_t budget = (size_t)limit * LIST_SCAN_FACTOR + 1000;
    size_t scanned = 0;
    uint8_t last[1200]; /* a copy: the iterator's view dies when it moves */
    size_t last_len = 0;
    int more = 0;
    for (; store_iter_valid(it); store_iter_next(it)) {
        if (lr->n_keys == limit || scanned == budget) {
            more = 1;
            break;
        }
        scanned++;
        size_t klen = 0, vlen = 0;
        const uint8_t *k = store_iter_key(it, &klen);
        const uint8_t *v = store_iter_value(it, &vlen);
        if (klen > sizeof(last))
            continue; /* cannot be one of our index keys */
        memcpy(last, k, klen);
        last_len = klen;
        char id[FSM_KEY_ID_LEN + 1];
        if (plan.cf == STORE_CF_NAMES) {
            if (vlen != FSM_KEY_ID_LEN)
                continue;
            memcpy(id, v, FSM_KEY_ID_LEN);
        } else {
            if (klen < FSM_KEY_ID_LEN)
                continue;
            memcpy(id, k + klen - FSM_KEY_ID_LEN, FSM_KEY_ID_LEN);
        }
        id[FSM_KEY_ID_LEN] = '\0';
        Keyraft__KeyRecord *rec = NULL;
        if (fsm_get_key(call->svc->deps.store, id, &rec) != 0)
            continue;
        int match = 1;
        if (r->algorithm && rec->algorithm != r->algorithm)
            match = 0;
        if (r->state && rec->state != r->state)
            match = 0;
        if (r->prefix[0] && strncmp(rec->name, r->prefix, strlen(r->prefix)) != 0)
            match = 0;
        if (by_grant && !policy_key_allows(rec->policy, call->who->info->groups,
                                           call->who->info->n_groups, "get"))
            match = 0;
        if (match) {
            Keyraft__KeyAttributes *a = attributes_of(call, rec);
            if (a == NULL) {
                keyraft__key_record__free_unpacked(rec, NULL);
                store_iter_free(it);
                reply_error(call, KR_ENOMEM, "out of memory");
                return;
            }
            keys[lr->n_keys++] = a;
        }
        keyraft__key_record__free_unpacked(rec, NULL);
    }
    if (more && last_len > 0) {
        char *cur = arena_alloc(call, last_len * 2 + 1);
        if (cur == NULL) {
            store_iter_free(it);
            reply_error(call, KR_ENOMEM, "out of memory");
            return;
        }
        for (size_t i = 0; i < last_len; i++)
            sprintf(cur + 2 * i, "%02x", last[i]);
        lr->next_cursor = cur;
    }
    store_iter_free(it);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_LIST;
    call->resp.list = lr;
    call_finish(call);
}

/* --- crypto operations ------------------------------------------------------------------ */

static uint8_t *with_header(struct call *call, enum blob_kind kind, const char *id,
                            uint32_t version, size_t body_cap, size_t *hdr_len)
{
    uint8_t *buf = arena_alloc(call, SERVICE_BLOB_HEADER_MAX + body_cap);
    if (buf != NULL)
        *hdr_len = blob_header(buf, kind, id, version);
    return buf;
}

/* GCM AAD = blob header | caller's AAD, so key id and version cannot be
 * swapped on a ciphertext. */
static int aad_join(struct call *call, const uint8_t *hdr, size_t hdr_len,
                    const ProtobufCBinaryData *aad, uint8_t **out, size_t *out_len)
{
    *out = arena_alloc(call, hdr_len + aad->len);
    if (*out == NULL)
        return KR_ENOMEM;
    memcpy(*out, hdr, hdr_len);
    if (aad->len)
        memcpy(*out + hdr_len, aad->data, aad->len);
    *out_len = hdr_len + aad->len;
    return 0;
}

/* A GCM seal or open run by keyring_use on the key's material. */
struct gcm_job {
    int seal;
    const uint8_t *aad, *in;
    size_t aad_len, in_len;
    uint8_t *out;
    size_t out_len;
    int rv;
};

static void gcm_job_run(void *arg, const uint8_t *key, size_t key_len)
{
    struct gcm_job *job = arg;
    job->rv = job->seal ? crypto_gcm_seal(key, key_len, job->aad, job->aad_len, job->in,
                                          job->in_len, job->out, &job->out_len)
                        : crypto_gcm_open(key, key_len, job->aad, job->aad_len, job->in,
                                          job->in_len, job->out, &job->out_len);
}

/* Encrypts |pt| under the current version of an AES key into the arena. */
static int encrypt_to(struct call *call, const Keyraft__KeyRecord *rec, const uint8_t *pt,
                      size_t pt_len, const ProtobufCBinaryData *aad, ProtobufCBinaryData *out,
                      uint32_t *out_version)
{
    if (check_type(call, rec, crypto_is_aes(rec->algorithm), "encrypt") != 0 ||
        check_state(call, rec, can_protect(rec->state), "encrypt") != 0)
        return -1;
    const Keyraft__KeyVersionRecord *v = find_version(rec, rec->current_version);
    if (v == NULL) {
        reply_error(call, KR_EINTERNAL, "key %s lacks its current version %u", rec->id,
                    rec->current_version);
        return -1;
    }
    call->audit_version = v->version;
    /* Every AES-GCM encryption counts toward the version's usage limit. */
    if (gov_usage_check(call, rec, v->version) != 0)
        return -1;
    size_t hdr_len = 0;
    uint8_t *buf = with_header(call, BLOB_CIPHERTEXT, rec->id, v->version,
                               pt_len + CRYPTO_GCM_NONCE_LEN + CRYPTO_GCM_TAG_LEN, &hdr_len);
    uint8_t *full_aad = NULL;
    struct gcm_job job = {.seal = 1, .in = pt, .in_len = pt_len};
    if (buf == NULL || aad_join(call, buf, hdr_len, aad, &full_aad, &job.aad_len) != 0) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return -1;
    }
    job.aad = full_aad;
    job.out = buf + hdr_len;
    if (use_version(call, rec, v, gcm_job_run, &job) != 0)
        return -1;
    if (job.rv != 0) {
        reply_error(call, job.rv, "encryption failed: %s", kr_strerror(job.rv));
        return -1;
    }
    out->data = buf;
    out->len = hdr_len + job.out_len;
    *out_version = v->version;
    gov_usage_count(call, rec->id, v->version);
    return 0;
}

static void op_encrypt(struct call *call)
{
    const Keyraft__EncryptRequest *r = call->req->encrypt;
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    Keyraft__EncryptResponse *er = arena_alloc(call, sizeof(*er));
    if (er == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__encrypt_response__init(er);
    if (encrypt_to(call, rec, r->plaintext.data, r->plaintext.len, &r->aad, &er->ciphertext,
                   &er->version) != 0)
        return;
    er->key_id = arena_strdup(call, rec->id);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_ENCRYPT;
    call->resp.encrypt = er;
    call_finish(call);
}

/* Resolves the key a blob names and checks it matches |ref| when given. */
static const Keyraft__KeyRecord *blob_key(struct call *call, const ProtobufCBinaryData *blob,
                                          enum blob_kind kind, const Keyraft__KeyRef *ref,
                                          const Keyraft__KeyVersionRecord **out_v,
                                          size_t *out_hdr)
{
    char id[FSM_KEY_ID_LEN + 1];
    uint32_t version = 0;
    size_t hdr = blob_parse(blob->data, blob->len, kind, id, &version);
    if (hdr == 0) {
        reply_error(call, KR_EINVAL, "not a keyraft %s (bad header)",
                    kind == BLOB_CIPHERTEXT ? "ciphertext"
                    : kind == BLOB_SIGNATURE ? "signature"
                    : kind == BLOB_MAC ? "MAC" : "wrapped key");
        return NULL;
    }
    Keyraft__KeyRef by_id = KEYRAFT__KEY_REF__INIT;
    by_id.id = id;
    const Keyraft__KeyRecord *rec = load_key(call, &by_id);
    if (rec == NULL)
        return NULL;
    if (ref != NULL && ((ref->id[0] && strcmp(ref->id, rec->id) != 0) ||
                        (!ref->id[0] && ref->name[0] && strcmp(ref->name, rec->name) != 0))) {
        reply_error(call, KR_EAUTH, "made by key %s, not by the key named in the request", id);
        return NULL;
    }
    const Keyraft__KeyVersionRecord *v = find_version(rec, version);
    if (v == NULL) {
        reply_error(call, KR_ENOTFOUND, "key %s has no version %u", id, version);
        return NULL;
    }
    *out_v = v;
    *out_hdr = hdr;
    return rec;
}

static int decrypt_blob(struct call *call, const ProtobufCBinaryData *ct,
                        const ProtobufCBinaryData *aad, const Keyraft__KeyRecord **out_rec,
                        ProtobufCBinaryData *out_pt, uint32_t *out_version)
{
    const Keyraft__KeyVersionRecord *v = NULL;
    size_t hdr = 0;
    const Keyraft__KeyRecord *rec = blob_key(call, ct, BLOB_CIPHERTEXT, NULL, &v, &hdr);
    if (rec == NULL)
        return -1;
    *out_rec = rec;
    if (check_type(call, rec, crypto_is_aes(rec->algorithm), "decrypt") != 0 ||
        check_state(call, rec, can_process(rec->state), "decrypt") != 0)
        return -1;
    if (ct->len < hdr + CRYPTO_GCM_NONCE_LEN + CRYPTO_GCM_TAG_LEN) {
        reply_error(call, KR_EINVAL, "ciphertext truncated");
        return -1;
    }
    uint8_t *pt = arena_alloc(call, ct->len - hdr), *full_aad = NULL;
    struct gcm_job job = {.seal = 0, .in = ct->data + hdr, .in_len = ct->len - hdr, .out = pt};
    if (pt == NULL || aad_join(call, ct->data, hdr, aad, &full_aad, &job.aad_len) != 0) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return -1;
    }
    job.aad = full_aad;
    if (use_version(call, rec, v, gcm_job_run, &job) != 0)
        return -1;
    int rv = job.rv;
    size_t pt_len = job.out_len;
    if (rv == KR_EAUTH) {
        reply_error(call, KR_EAUTH, "decryption failed: wrong AAD or a tampered ciphertext");
        return -1;
    }
    if (rv != 0) {
        reply_error(call, rv, "decryption failed: %s", kr_strerror(rv));
        return -1;
    }
    out_pt->data = pt;
    out_pt->len = pt_len;
    *out_version = v->version;
    return 0;
}

static void op_decrypt(struct call *call)
{
    const Keyraft__DecryptRequest *r = call->req->decrypt;
    const Keyraft__KeyRecord *rec = NULL;
    Keyraft__DecryptResponse *dr = arena_alloc(call, sizeof(*dr));
    if (dr == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__decrypt_response__init(dr);
    if (decrypt_blob(call, &r->ciphertext, &r->aad, &rec, &dr->plaintext, &dr->version) == 0) {
        dr->key_id = arena_strdup(call, rec->id);
        call->resp.result_case = KEYRAFT__RESPONSE__RESULT_DECRYPT;
        call->resp.decrypt = dr;
        call_finish(call);
    }
}

static void signer_slot_drop(struct signer_slot *slot)
{
    crypto_signer_free(slot->signer);
    memset(slot, 0, sizeof(*slot));
}

/* The parsed signing key of |v|, from the cache or unsealed and parsed now.
 * NULL: answered. The domain is checked on every call, as an unseal would. */
static crypto_signer *signer_for(struct call *call, const Keyraft__KeyRecord *rec,
                                 const Keyraft__KeyVersionRecord *v)
{
    struct service *svc = call->svc;
    if (v->destroyed || v->sealed.len == 0) {
        reply_error(call, KR_ESTATE, "version %u of key %s is destroyed", v->version, rec->id);
        return NULL;
    }
    int rv = ensure_domain(svc, rec->domain);
    if (rv != 0) {
        reply_error(call, rv, "key %s: its domain's key is not usable here (%s)", rec->id,
                    kr_strerror(rv));
        return NULL;
    }
    uint64_t h = kr_hash_u32(kr_hash_str(KR_HASH_INIT, rec->id), v->version);
    struct signer_slot *slot = &svc->signers[h % SIGNER_CACHE_SLOTS];
    /* Versions never change their material; the generation check only keeps
     * the cache from outliving any change to the record. */
    uint64_t gen = store_cf_generation(svc->deps.store, STORE_CF_KEYS);
    if (slot->signer != NULL && slot->generation == gen && slot->version == v->version &&
        strcmp(slot->id, rec->id) == 0)
        return slot->signer;
    secbuf key = {0};
    if (unseal_version(call, rec, v, &key) != 0)
        return NULL;
    crypto_signer *signer = NULL;
    rv = crypto_signer_new(rec->algorithm, key.data, key.len, &signer);
    secbuf_free(&key);
    if (rv != 0) {
        reply_error(call, rv, "sign failed: %s", kr_strerror(rv));
        return NULL;
    }
    signer_slot_drop(slot);
    copy_cut(slot->id, sizeof(slot->id), rec->id);
    slot->version = v->version;
    slot->generation = gen;
    slot->signer = signer;
    return signer;
}

static void op_sign(struct call *call, int is_mac)
{
    const Keyraft__SignRequest *r = is_mac ? call->req->mac : call->req->sign;
    const char *op = is_mac ? "mac" : "sign";
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    secbuf key = {0};
    uint8_t *sig = NULL;
    size_t sig_len = 0;
    int ok_type = is_mac ? crypto_is_hmac(rec->algorithm) : crypto_is_signing(rec->algorithm);
    if (check_type(call, rec, ok_type, op) != 0 ||
        check_state(call, rec, can_protect(rec->state), op) != 0)
        goto out;
    const Keyraft__KeyVersionRecord *v = find_version(rec, rec->current_version);
    if (v == NULL)
        goto out;
    uint8_t mac[64];
    int rv;
    if (is_mac) {
        if (unseal_version(call, rec, v, &key) != 0)
            goto out;
        rv = crypto_mac(rec->algorithm, key.data, key.len, r->message.data, r->message.len, mac,
                        &sig_len);
    } else {
        crypto_signer *signer = signer_for(call, rec, v);
        if (signer == NULL)
            goto out;
        rv = crypto_signer_sign(signer, r->message.data, r->message.len, &sig, &sig_len);
    }
    if (rv != 0) {
        reply_error(call, rv, "%s failed: %s", op, kr_strerror(rv));
        goto out;
    }
    size_t hdr = 0;
    uint8_t *blob = with_header(call, is_mac ? BLOB_MAC : BLOB_SIGNATURE, rec->id, v->version,
                                sig_len, &hdr);
    Keyraft__SignResponse *sr = arena_alloc(call, sizeof(*sr));
    if (blob == NULL || sr == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(blob + hdr, is_mac ? mac : sig, sig_len);
    keyraft__sign_response__init(sr);
    sr->signature.data = blob;
    sr->signature.len = hdr + sig_len;
    sr->key_id = arena_strdup(call, rec->id);
    sr->version = v->version;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_SIGN;
    call->resp.sign = sr;
    call_finish(call);
out:
    free(sig);
    secbuf_free(&key);
}

static void op_verify(struct call *call, int is_mac)
{
    const Keyraft__VerifyRequest *r = is_mac ? call->req->verify_mac : call->req->verify;
    const char *op = is_mac ? "verify-mac" : "verify";
    const Keyraft__KeyVersionRecord *v = NULL;
    size_t hdr = 0;
    const Keyraft__KeyRecord *rec =
        blob_key(call, &r->signature, is_mac ? BLOB_MAC : BLOB_SIGNATURE, r->key, &v, &hdr);
    if (rec == NULL)
        return;
    secbuf key = {0};
    int ok_type = is_mac ? crypto_is_hmac(rec->algorithm) : crypto_is_signing(rec->algorithm);
    if (check_type(call, rec, ok_type, op) != 0 ||
        check_state(call, rec, can_process(rec->state), op) != 0)
        goto out;
    int rv;
    const uint8_t *sig = r->signature.data + hdr;
    size_t sig_len = r->signature.len - hdr;
    if (is_mac) {
        if (unseal_version(call, rec, v, &key) != 0)
            goto out;
        rv = crypto_mac_verify(rec->algorithm, key.data, key.len, r->message.data, r->message.len,
                               sig, sig_len);
    } else {
        rv = crypto_verify_public(rec->algorithm, v->public_key.data, v->public_key.len,
                                  r->message.data, r->message.len, sig, sig_len);
    }
    if (rv != 0 && rv != KR_EAUTH) {
        reply_error(call, rv, "%s failed: %s", op, kr_strerror(rv));
        goto out;
    }
    Keyraft__VerifyResponse *vr = arena_alloc(call, sizeof(*vr));
    if (vr == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        goto out;
    }
    keyraft__verify_response__init(vr);
    vr->valid = rv == 0;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_VERIFY;
    call->resp.verify = vr;
    call_finish(call);
out:
    secbuf_free(&key);
}

static void op_data_key(struct call *call)
{
    const Keyraft__DataKeyRequest *r = call->req->data_key;
    uint32_t bits = r->bits ? r->bits : 256;
    if (bits != 128 && bits != 256) {
        reply_error(call, KR_EINVAL, "data key bits must be 128 or 256");
        return;
    }
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    Keyraft__DataKeyResponse *dr = arena_alloc(call, sizeof(*dr));
    uint8_t *pt = arena_alloc(call, bits / 8);
    if (dr == NULL || pt == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__data_key_response__init(dr);
    int rv = crypto_random(pt, bits / 8);
    if (rv != 0) {
        reply_error(call, rv, "random: %s", kr_strerror(rv));
        return;
    }
    if (encrypt_to(call, rec, pt, bits / 8, &r->aad, &dr->wrapped, &dr->version) != 0)
        return;
    dr->plaintext.data = pt;
    dr->plaintext.len = bits / 8;
    dr->key_id = arena_strdup(call, rec->id);
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_DATA_KEY;
    call->resp.data_key = dr;
    call_finish(call);
}

static void op_wrap(struct call *call)
{
    const Keyraft__WrapRequest *r = call->req->wrap;
    if (r->material.len == 0 || r->material.len > 64 * 1024) {
        reply_error(call, KR_EINVAL, "wrap takes 1..65536 bytes of key material");
        return;
    }
    const Keyraft__KeyRecord *rec = load_key(call, r->key);
    if (rec == NULL)
        return;
    secbuf key = {0};
    if (check_type(call, rec, crypto_is_aes(rec->algorithm), "wrap") != 0 ||
        check_state(call, rec, can_protect(rec->state), "wrap") != 0)
        goto out;
    const Keyraft__KeyVersionRecord *v = find_version(rec, rec->current_version);
    if (v == NULL || unseal_version(call, rec, v, &key) != 0)
        goto out;
    size_t hdr = 0, body = 0;
    uint8_t *blob = with_header(call, BLOB_WRAP, rec->id, v->version, r->material.len + 16, &hdr);
    Keyraft__WrapResponse *wr = arena_alloc(call, sizeof(*wr));
    int rv = (blob && wr) ? crypto_kwp_wrap(key.data, key.len, r->material.data, r->material.len,
                                            blob + hdr, &body)
                          : KR_ENOMEM;
    if (rv != 0) {
        reply_error(call, rv, "wrap failed: %s", kr_strerror(rv));
        goto out;
    }
    keyraft__wrap_response__init(wr);
    wr->wrapped.data = blob;
    wr->wrapped.len = hdr + body;
    wr->key_id = arena_strdup(call, rec->id);
    wr->version = v->version;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_WRAP;
    call->resp.wrap = wr;
    call_finish(call);
out:
    secbuf_free(&key);
}

static void op_unwrap(struct call *call)
{
    const Keyraft__UnwrapRequest *r = call->req->unwrap;
    const Keyraft__KeyVersionRecord *v = NULL;
    size_t hdr = 0;
    const Keyraft__KeyRecord *rec = blob_key(call, &r->wrapped, BLOB_WRAP, r->key, &v, &hdr);
    if (rec == NULL)
        return;
    secbuf key = {0};
    if (check_type(call, rec, crypto_is_aes(rec->algorithm), "unwrap") != 0 ||
        check_state(call, rec, can_process(rec->state), "unwrap") != 0)
        goto out;
    if (unseal_version(call, rec, v, &key) != 0)
        goto out;
    size_t out_len = 0;
    uint8_t *mat = arena_alloc(call, r->wrapped.len);
    Keyraft__UnwrapResponse *ur = arena_alloc(call, sizeof(*ur));
    int rv = (mat && ur) ? crypto_kwp_unwrap(key.data, key.len, r->wrapped.data + hdr,
                                             r->wrapped.len - hdr, mat, &out_len)
                         : KR_ENOMEM;
    if (rv == KR_EAUTH) {
        reply_error(call, rv, "unwrap failed: integrity check failed (tampered or wrong key)");
        goto out;
    }
    if (rv != 0) {
        reply_error(call, rv, "unwrap failed: %s", kr_strerror(rv));
        goto out;
    }
    keyraft__unwrap_response__init(ur);
    ur->material.data = mat;
    ur->material.len = out_len;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_UNWRAP;
    call->resp.unwrap = ur;
    call_finish(call);
out:
    secbuf_free(&key);
}

static void op_random(struct call *call)
{
    uint32_t n = call->req->random->length;
    if (n == 0 || n > RANDOM_MAX) {
        reply_error(call, KR_EINVAL, "random takes 1..%d bytes", RANDOM_MAX);
        return;
    }
    Keyraft__RandomResponse *rr = arena_alloc(call, sizeof(*rr));
    uint8_t *buf = arena_alloc(call, n);
    if (rr == NULL || buf == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    int rv = crypto_random(buf, n);
    if (rv != 0) {
        reply_error(call, rv, "random: %s", kr_strerror(rv));
        return;
    }
    keyraft__random_response__init(rr);
    rr->data.data = buf;
    rr->data.len = n;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_RANDOM;
    call->resp.random = rr;
    call_finish(call);
}

static void self_registered(void *arg, const struct fsm_op_result *res)
{
    struct service *svc = arg;
    svc->registry_in_progress = 0;
    if (res->status == 0)
        log_info("this node is in the node registry");
    else
        log_warn("registering this node: %s; retrying", kr_strerror(res->status));
}

static void op_status(struct call *call)
{
    struct cluster_status st;
    cluster_get_status(call->svc->deps.cluster, &st);
    Keyraft__StatusResponse *sr = arena_alloc(call, sizeof(*sr));
    if (sr == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__status_response__init(sr);
    const struct config *cfg = call->svc->deps.config;
    sr->node_id = cfg->node_id;
    sr->address = arena_strdup(call, cfg->listen);
    sr->role = arena_strdup(call, st.role);
    sr->leader_id = st.leader_id;
    sr->leader_address = arena_strdup(call, st.leader_address);
    sr->term = st.term;
    sr->commit_index = st.commit_index;
    sr->applied_index = st.applied_index;
    sr->key_count = store_estimate_count(call->svc->deps.store, STORE_CF_KEYS);
    sr->version = arena_strdup(call, KEYRAFT_VERSION);
    sr->principal = arena_strdup(call, call->principal);
    sr->uptime_ms = now_ms() - call->svc->started_ms;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_NODE_STATUS;
    call->resp.node_status = sr;
    call_finish(call);
}

/* --- cluster membership (admin role) ------------------------------------------------ */

/* Roles were checked by gov_authorize; this guards the handlers against a
 * dispatch that skipped it. */
static int require_admin(struct call *call)
{
    if (call->role_bits & POLICY_ADMIN)
        return 0;
    reply_error(call, KR_EPERM, "cluster membership needs the admin role");
    return -1;
}

static int node_role_to_cluster(Keyraft__NodeRole role)
{
    return role == KEYRAFT__NODE_ROLE__NODE_STANDBY ? CLUSTER_STANDBY : CLUSTER_VOTER;
}

/* The registry merged with the raft configuration: what an admin sees. */
static Keyraft__ClusterListResponse *cluster_view(struct call *call)
{
    struct service *svc = call->svc;
    struct fsm_nodes reg;
    if (fsm_list_nodes(svc->deps.store, &reg) != 0)
        return NULL;
    struct cluster_member members[FSM_MAX_NODES];
    size_t nm = cluster_members(svc->deps.cluster, members, FSM_MAX_NODES);
    Keyraft__ClusterListResponse *view = arena_alloc(call, sizeof(*view));
    Keyraft__NodeInfo **infos = arena_alloc(call, (reg.n + nm + 1) * sizeof(*infos));
    if (view == NULL || infos == NULL) {
        fsm_nodes_free(&reg);
        return NULL;
    }
    keyraft__cluster_list_response__init(view);
    view->leader_id = cluster_leader_id(svc->deps.cluster);
    view->commit_index = cluster_applied_index(svc->deps.cluster);
    view->nodes = infos;
    size_t n = 0;
    /* Registry nodes first (by id), then raft members the registry lacks. */
    for (size_t i = 0; i < reg.n + nm; i++) {
        const Keyraft__NodeRecord *rec = i < reg.n ? reg.nodes[i] : NULL;
        const struct cluster_member *m = NULL;
        uint64_t id = rec ? rec->id : members[i - reg.n].id;
        for (size_t j = 0; j < nm; j++)
            if (members[j].id == id)
                m = &members[j];
        if (rec == NULL) {
            int known = 0;
            for (size_t j = 0; j < reg.n; j++)
                known |= reg.nodes[j]->id == id;
            if (known)
                continue;
        }
        Keyraft__NodeInfo *info = arena_alloc(call, sizeof(*info));
        if (info == NULL)
            break;
        keyraft__node_info__init(info);
        info->id = id;
        info->raft_address = arena_strdup(call, rec ? rec->raft_address : m->address);
        info->client_address = arena_strdup(call, rec ? rec->client_address : "");
        info->role = rec ? rec->role : KEYRAFT__NODE_ROLE__NODE_ROLE_UNSPECIFIED;
        info->raft_role = (char *)cluster_role_name(m ? m->role : CLUSTER_ABSENT);
        info->leader = id == view->leader_id;
        info->match_index = m ? m->match_index : 0;
        info->reachable = m ? m->reachable : 0;
        if (info->raft_address == NULL || info->client_address == NULL)
            break;
        infos[n++] = info;
    }
    view->n_nodes = n;
    fsm_nodes_free(&reg);
    return view;
}

static void reply_cluster_view(struct call *call, uint64_t commit_index)
{
    Keyraft__ClusterListResponse *view = cluster_view(call);
    if (view == NULL) {
        reply_error(call, KR_EIO, "cannot read the node registry");
        return;
    }
    call->resp.commit_index = commit_index;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_CLUSTER;
    call->resp.cluster = view;
    call_finish(call);
}

static void op_cluster_list(struct call *call)
{
    reply_cluster_view(call, 0);
}

static void registry_done(void *arg, const struct fsm_op_result *res)
{
    struct call *call = arg;
    call->svc->pending--;
    if (res->status != 0) {
        reply_error(call, res->status, "the registry change failed: %s%s",
                    kr_strerror(res->status),
                    res->status == KR_EEXIST ? " (another node has that address)" : "");
        return;
    }
    if (call->bundle == NULL) {
        reply_cluster_view(call, res->index);
        return;
    }
    /* The bundle lists the members as the registry now has them. */
    Keyraft__ClusterListResponse *view = cluster_view(call);
    if (view != NULL) {
        call->bundle->members = view->nodes;
        call->bundle->n_members = view->n_nodes;
    }
    call->resp.commit_index = res->index;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_JOIN_BUNDLE;
    call->resp.join_bundle = call->bundle;
    call_finish(call);
}

static void propose_registry(struct call *call, Keyraft__Command *cmd)
{
    propose_then(call, cmd, registry_done);
}

static void propose_node(struct call *call, const Keyraft__NodeRecord *rec)
{
    Keyraft__PutNodeCommand put = KEYRAFT__PUT_NODE_COMMAND__INIT;
    put.node = (Keyraft__NodeRecord *)rec;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_NODE;
    cmd.put_node = &put;
    propose_registry(call, &cmd);
}

static char *read_small_file(struct call *call, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    char *buf = arena_alloc(call, 65537);
    size_t n = buf ? fread(buf, 1, 65536, f) : 0;
    fclose(f);
    if (buf == NULL || n == 0 || n == 65536)
        return NULL;
    buf[n] = '\0';
    return buf;
}

static int valid_hostport(const char *s)
{
    char host[256];
    int port = 0;
    return s[0] != '\0' && config_split_hostport(s, host, sizeof(host), &port) == 0;
}

/* Admits a node: checks its certificate, has this node's HSM wrap the MWK to
 * the new token's transport key, records the node in the registry (the
 * leader then adds it to raft), and answers with the bundle it starts from. */
static void op_cluster_add(struct call *call)
{
    const Keyraft__ClusterAddRequest *r = call->req->cluster_add;
    struct service *svc = call->svc;
    const struct config *cfg = svc->deps.config;
    if (require_admin(call) != 0 || require_leader(call) != 0)
        return;
    if (r->node_id == 0 || !valid_hostport(r->raft_address) ||
        !valid_hostport(r->client_address) || r->transport_spki.len == 0 ||
        r->transport_spki.len > 4096) {
        reply_error(call, KR_EINVAL, "a join needs a node id, raft and client HOST:PORT, and "
                    "the new token's transport key");
        return;
    }
    char name[64];
    snprintf(name, sizeof(name), "node-%llu", (unsigned long long)r->node_id);
    int rv = pki_check_node_cert(cfg->tls_ca, r->node_cert_pem, name);
    if (rv != 0) {
        reply_error(call, rv, "the node certificate is not a cluster CA certificate for %s", name);
        return;
    }
    Keyraft__NodeRecord *existing = NULL;
    if (fsm_get_node(svc->deps.store, r->node_id, &existing) == 0) {
        int same = strcmp(existing->raft_address, r->raft_address) == 0 &&
                   strcmp(existing->client_address, r->client_address) == 0;
        keyraft__node_record__free_unpacked(existing, NULL);
        struct cluster_member m[FSM_MAX_NODES];
        size_t nm = cluster_members(svc->deps.cluster, m, FSM_MAX_NODES);
        int started = 0;
        for (size_t i = 0; i < nm; i++)
            started |= m[i].id == r->node_id && m[i].match_index > 0;
        /* A retry of an admission that has not started yet gets a new bundle. */
        if (!same || started || r->node_id == cfg->node_id) {
            reply_error(call, KR_EEXIST, "node %llu is already a member: remove it first",
                        (unsigned long long)r->node_id);
            return;
        }
    }
    char pin[256], so_pin[256];
    rv = config_read_pin(cfg, pin, sizeof(pin));
    if (rv == 0)
        rv = config_read_so_pin(cfg, so_pin, sizeof(so_pin));
    if (rv != 0) {
        OPENSSL_cleanse(pin, sizeof(pin));
        reply_error(call, KR_ECONFIG, "this node cannot admit: its HSM SO PIN is not "
                    "configured ([hsm] so_pin_file or so_pin_env)");
        return;
    }
    if (gov_quorum_gate(call, NULL) != 0) {
        OPENSSL_cleanse(pin, sizeof(pin));
        OPENSSL_cleanse(so_pin, sizeof(so_pin));
        return;
    }
    uint8_t *blob = NULL, *check = NULL;
    size_t blob_len = 0, check_len = 0;
    rv = hsm_admit_wrap_mwk(svc->deps.hsm, cfg->hsm_module, cfg->hsm_token_label, so_pin, pin,
                            r->transport_spki.data, r->transport_spki.len, &blob, &blob_len);
    OPENSSL_cleanse(pin, sizeof(pin));
    OPENSSL_cleanse(so_pin, sizeof(so_pin));
    if (rv == 0)
        rv = hsm_mwk_encrypt(svc->deps.hsm, (const uint8_t *)name, strlen(name),
                             (const uint8_t *)NODE_JOIN_CHECK_TEXT, strlen(NODE_JOIN_CHECK_TEXT), &check,
                             &check_len);
    Keyraft__JoinBundle *b = arena_alloc(call, sizeof(*b));
    uint8_t *blob_copy = arena_alloc(call, blob_len + 1);
    uint8_t *check_copy = arena_alloc(call, check_len + 1);
    if (rv != 0 || b == NULL || blob_copy == NULL || check_copy == NULL) {
        free(blob);
        free(check);
        reply_error(call, rv ? rv : KR_ENOMEM, "this node's HSM could not wrap the MWK for "
                    "the new node: %s", kr_strerror(rv ? rv : KR_ENOMEM));
        return;
    }
    keyraft__join_bundle__init(b);
    memcpy(blob_copy, blob, blob_len);
    memcpy(check_copy, check, check_len);
    free(blob);
    free(check);
    b->node_id = r->node_id;
    b->ca_pem = read_small_file(call, cfg->tls_ca);
    b->node_cert_pem = arena_strdup(call, r->node_cert_pem);
    b->wrapped_mwk.data = blob_copy;
    b->wrapped_mwk.len = blob_len;
    b->check.data = check_copy;
    b->check.len = check_len;
    b->mwk_label = arena_strdup(call, cfg->hsm_mwk_label);
    if (b->ca_pem == NULL || b->node_cert_pem == NULL || b->mwk_label == NULL) {
        reply_error(call, KR_EIO, "cannot read the cluster CA certificate");
        return;
    }
    call->bundle = b;
    Keyraft__NodeRecord rec = KEYRAFT__NODE_RECORD__INIT;
    rec.id = r->node_id;
    rec.raft_address = r->raft_address;
    rec.client_address = r->client_address;
    rec.role = r->standby ? KEYRAFT__NODE_ROLE__NODE_STANDBY : KEYRAFT__NODE_ROLE__NODE_VOTER;
    rec.added_at = now_ms();
    rec.audit_public_key = r->audit_public_key;
    log_info("admitting node %llu (%s, raft %s) as %s, asked by %s",
             (unsigned long long)r->node_id, r->client_address, r->raft_address,
             r->standby ? "standby" : "voter", call->principal);
    propose_node(call, &rec);
}

/* Counts registry voters other than |except|. */
static size_t other_voters(const struct fsm_nodes *reg, uint64_t except)
{
    size_t n = 0;
    for (size_t i = 0; i < reg->n; i++)
        n += reg->nodes[i]->id != except && reg->nodes[i]->role == KEYRAFT__NODE_ROLE__NODE_VOTER;
    return n;
}

static void op_cluster_change(struct call *call, const Keyraft__ClusterNodeRequest *r,
                              Keyraft__NodeRole to, int remove)
{
    struct service *svc = call->svc;
    if (require_admin(call) != 0 || require_leader(call) != 0)
        return;
    struct fsm_nodes reg;
    if (fsm_list_nodes(svc->deps.store, &reg) != 0) {
        reply_error(call, KR_EIO, "cannot read the node registry");
        return;
    }
    const Keyraft__NodeRecord *node = NULL;
    for (size_t i = 0; i < reg.n; i++)
        if (reg.nodes[i]->id == r->node_id)
            node = reg.nodes[i];
    if (node == NULL) {
        fsm_nodes_free(&reg);
        reply_error(call, KR_ENOTFOUND, "node %llu is not a member", (unsigned long long)r->node_id);
        return;
    }
    if ((remove || to == KEYRAFT__NODE_ROLE__NODE_STANDBY) && other_voters(&reg, node->id) == 0) {
        fsm_nodes_free(&reg);
        reply_error(call, KR_ESTATE, "node %llu is the last voter: promote another node first",
                    (unsigned long long)r->node_id);
        return;
    }
    if (remove) {
        fsm_nodes_free(&reg);
        Keyraft__RemoveNodeCommand rm = KEYRAFT__REMOVE_NODE_COMMAND__INIT;
        rm.node_id = r->node_id;
        Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
        cmd.op_case = KEYRAFT__COMMAND__OP_REMOVE_NODE;
        cmd.remove_node = &rm;
        log_info("removing node %llu, asked by %s", (unsigned long long)r->node_id,
                 call->principal);
        propose_registry(call, &cmd);
        return;
    }
    Keyraft__NodeRecord rec = *node;
    rec.role = to;
    log_info("node %llu: wanted role %s, asked by %s", (unsigned long long)r->node_id,
             to == KEYRAFT__NODE_ROLE__NODE_VOTER ? "voter" : "standby", call->principal);
    propose_node(call, &rec);
    fsm_nodes_free(&reg);
}

static void op_cluster_transfer(struct call *call)
{
    if (require_admin(call) != 0 || require_leader(call) != 0)
        return;
    int rv = cluster_transfer(call->svc->deps.cluster, call->req->cluster_transfer->node_id);
    if (rv != 0) {
        reply_error(call, rv, "cannot hand leadership over: %s%s", kr_strerror(rv),
                    rv == KR_ENOTFOUND ? " (not a voter of this cluster)" : "");
        return;
    }
    reply_cluster_view(call, 0);
}

/* Leader duty: the registry holds this node, and raft follows the registry. */
static void tick_membership(struct service *svc)
{
    const struct config *cfg = svc->deps.config;
    struct fsm_nodes reg;
    if (svc->registry_in_progress || fsm_list_nodes(svc->deps.store, &reg) != 0)
        return;
    const Keyraft__NodeRecord *self = NULL;
    for (size_t i = 0; i < reg.n; i++)
        if (reg.nodes[i]->id == cfg->node_id)
            self = reg.nodes[i];
    /* Registered, or registered before it had an audit key: (re)register. */
    if (self == NULL || (self->audit_public_key.len == 0 && svc->deps.audit_spki_len > 0)) {
        Keyraft__NodeRecord rec = KEYRAFT__NODE_RECORD__INIT;
        if (self != NULL)
            rec = *self;
        rec.id = cfg->node_id;
        rec.raft_address = self ? self->raft_address : (char *)cfg->raft_address;
        rec.client_address = self ? self->client_address : (char *)cfg->listen;
        rec.role = self ? self->role : KEYRAFT__NODE_ROLE__NODE_VOTER;
        rec.added_at = self ? self->added_at : now_ms();
        rec.audit_public_key.data = (uint8_t *)svc->deps.audit_spki;
        rec.audit_public_key.len = svc->deps.audit_spki_len;
        Keyraft__PutNodeCommand put = KEYRAFT__PUT_NODE_COMMAND__INIT;
        put.node = &rec;
        Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
        cmd.op_case = KEYRAFT__COMMAND__OP_PUT_NODE;
        cmd.put_node = &put;
        if (cluster_propose(svc->deps.cluster, &cmd, self_registered, svc) == 0)
            svc->registry_in_progress = 1;
        fsm_nodes_free(&reg);
        return;
    }
    struct cluster_wanted wanted[FSM_MAX_NODES];
    for (size_t i = 0; i < reg.n; i++)
        wanted[i] = (struct cluster_wanted){reg.nodes[i]->id, reg.nodes[i]->raft_address,
                                            node_role_to_cluster(reg.nodes[i]->role)};
    cluster_reconcile(svc->deps.cluster, wanted, reg.n);
    fsm_nodes_free(&reg);
}

/* --- out-of-band snapshot transfer: node certificates only ------------------------------- */

/* 1 when the call may use the snapshot ops; otherwise it has been answered. */
static int snapshot_allowed(struct call *call)
{
    if (!call->is_node) {
        log_warn("%s: '%s' asked for a snapshot transfer without a node certificate",
                 call->address, call->principal);
        reply_error(call, KR_EPERM, "snapshot transfer is for cluster nodes");
        return 0;
    }
    if (call->svc->deps.snapshots == NULL) {
        reply_error(call, KR_EUNAVAIL, "this node does not serve snapshots");
        return 0;
    }
    return 1;
}

static void op_snapshot_open(struct call *call)
{
    if (!snapshot_allowed(call))
        return;
    struct snapshot_view v;
    int rv = snapshot_open(call->svc->deps.snapshots, uv_now(call->svc->deps.loop), &v);
    if (rv != 0) {
        reply_error(call, rv, "cannot open a checkpoint: %s", kr_strerror(rv));
        return;
    }
    log_info("%s: checkpoint %s for '%s'", call->address, v.id, call->principal);
    Keyraft__SnapshotOpenResponse *r = arena_alloc(call, sizeof(*r));
    Keyraft__SnapshotFile *files = arena_alloc(call, v.n_files * sizeof(*files));
    Keyraft__SnapshotFile **ptrs = arena_alloc(call, v.n_files * sizeof(*ptrs));
    if (r == NULL || files == NULL || ptrs == NULL) {
        snapshot_close(call->svc->deps.snapshots, v.id);
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    keyraft__snapshot_open_response__init(r);
    /* Strings borrowed from the registry: nothing touches it before
     * call_finish packs the response. */
    r->id = (char *)v.id;
    r->applied_index = v.applied_index;
    for (size_t i = 0; i < v.n_files; i++) {
        keyraft__snapshot_file__init(&files[i]);
        files[i].name = v.files[i].name;
        files[i].size = v.files[i].size;
        ptrs[i] = &files[i];
    }
    r->n_files = v.n_files;
    r->files = ptrs;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_SNAPSHOT;
    call->resp.snapshot = r;
    call_finish(call);
}

static void op_snapshot_read(struct call *call)
{
    if (!snapshot_allowed(call))
        return;
    const Keyraft__SnapshotReadRequest *q = call->req->snapshot_read;
    Keyraft__SnapshotReadResponse *r = arena_alloc(call, sizeof(*r));
    uint8_t *buf = arena_alloc(call, SNAPSHOT_CHUNK_MAX);
    if (r == NULL || buf == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory");
        return;
    }
    size_t len = 0;
    int rv = snapshot_read(call->svc->deps.snapshots, q->id, q->name, q->offset, q->length,
                           uv_now(call->svc->deps.loop), buf, &len);
    if (rv == KR_ENOTFOUND) {
        reply_error(call, rv, "no open checkpoint '%.64s' (closed or expired)", q->id);
        return;
    }
    if (rv != 0) {
        reply_error(call, rv, "checkpoint '%.64s': cannot read '%.256s' at %llu: %s", q->id,
                    q->name, (unsigned long long)q->offset,
                    rv == KR_EINVAL ? "no such file, or past its end" : kr_strerror(rv));
        return;
    }
    keyraft__snapshot_read_response__init(r);
    r->data.data = buf;
    r->data.len = len;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_SNAPSHOT_DATA;
    call->resp.snapshot_data = r;
    call_finish(call);
}

static void op_snapshot_close(struct call *call)
{
    if (!snapshot_allowed(call))
        return;
    const char *id = call->req->snapshot_close->id;
    int rv = snapshot_close(call->svc->deps.snapshots, id);
    if (rv != 0) {
        reply_error(call, rv, "no open checkpoint '%.64s' (closed or expired)", id);
        return;
    }
    call_finish(call);
}

/* --- dispatch ---------------------------------------------------------------------------- */

static void dispatch(struct call *call);

/* Answers or times out the parked reads. */
static void run_waiting(struct service *svc, int stopping)
{
    uint64_t applied = cluster_applied_index(svc->deps.cluster);
    uint64_t now = now_ms();
    struct call **pp = &svc->waiting;
    while (*pp != NULL) {
        struct call *call = *pp;
        int ready = call->req->min_index <= applied;
        if (!ready && !stopping && now < call->wait_deadline_ms) {
            pp = &call->wait_next;
            continue;
        }
        *pp = call->wait_next;
        svc->pending--;
        if (ready)
            dispatch(call);
        else
            reply_error(call, KR_EUNAVAIL,
                        "this node has applied up to %llu; the request needs %llu (waited %d ms)",
                        (unsigned long long)applied, (unsigned long long)call->req->min_index,
                        stopping ? 0 : MIN_INDEX_WAIT_MS);
    }
}

static void on_wake(uv_timer_t *t) { run_waiting(t->data, 0); }

static void on_applied(void *arg, uint64_t applied_index)
{
    struct service *svc = arg;
    (void)applied_index;
    if (svc->waiting != NULL)
        uv_timer_start(&svc->wake, on_wake, 0, 0);
}

/* Operations whose answer depends on a key's replicated state. */
static int uses_key_state(Keyraft__Request__OpCase op)
{
    switch (op) {
    case KEYRAFT__REQUEST__OP_STATUS:
    case KEYRAFT__REQUEST__OP_RANDOM:
    case KEYRAFT__REQUEST__OP_CLUSTER_LIST:
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD:
    case KEYRAFT__REQUEST__OP_CLUSTER_PROMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_DEMOTE:
    case KEYRAFT__REQUEST__OP_CLUSTER_REMOVE:
    case KEYRAFT__REQUEST__OP_CLUSTER_TRANSFER:
    case KEYRAFT__REQUEST__OP_SNAPSHOT_OPEN:
    case KEYRAFT__REQUEST__OP_SNAPSHOT_READ:
    case KEYRAFT__REQUEST__OP_SNAPSHOT_CLOSE:
    case KEYRAFT__REQUEST__OP_AUDIT_SUBMIT:
        return 0;
    default:
        return 1;
    }
}

static int audit_exempt(Keyraft__Request__OpCase op)
{
    return op == KEYRAFT__REQUEST__OP_STATUS || policy_op_roles(op) == POLICY_NODE;
}

static void barrier_passed(void *arg, int status)
{
    struct call *call = arg;
    call->svc->pending--;
    if (status != 0) {
        reply_error(call, status, "the read could not be ordered: %s", kr_strerror(status));
        return;
    }
    dispatch(call);
}

/* A call for |req|, owned from here on as service_handle says (|borrowed|:
 * a batch's inner request, which the batch's call frees). NULL when out of
 * memory: then it has been answered and |req| released. */
static struct call *call_new(struct service *svc, const struct service_caller *caller,
                             Keyraft__Request *req, struct pb_arena *arena, int borrowed,
                             service_reply_cb cb, void *ctx)
{
    struct call *call = calloc(1, sizeof(*call));
    if (call == NULL) {
        Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
        resp.id = req->id;
        resp.status = KR_ENOMEM;
        resp.message = (char *)"out of memory";
        cb(ctx, &resp);
        request_release(req, arena, borrowed);
        return NULL;
    }
    call->svc = svc;
    call->req = req;
    call->req_arena = arena;
    call->req_borrowed = borrowed;
    call->cb = cb;
    call->ctx = ctx;
    keyraft__response__init(&call->resp);
    copy_cut(call->principal, sizeof(call->principal), caller->principal);
    copy_cut(call->address, sizeof(call->address), caller->address);
    copy_cut(call->roles, sizeof(call->roles), caller->roles);
    copy_cut(call->serial, sizeof(call->serial), caller->serial);
    call->is_node = caller->is_node;
    call->internal = caller->internal;
    call->tally = caller->tally;
    return call;
}

static void handle(struct service *svc, const struct service_caller *caller,
                   Keyraft__Request *req, struct pb_arena *arena, int borrowed,
                   service_reply_cb cb, void *ctx)
{
    struct call *call = call_new(svc, caller, req, arena, borrowed, cb, ctx);
    if (call == NULL)
        return;
    /* A node behind (or new) serves status, membership and snapshots before it
     * is ready. */
    if (uses_key_state(req->op_case) && !service_ready(svc)) {
        reply_error(call, KR_EUNAVAIL, "the node is starting: no domain key loaded yet");
        return;
    }
    char why[256];
    if (uses_key_state(req->op_case) && !cluster_serving(svc->deps.cluster, why, sizeof(why))) {
        reply_error(call, KR_EUNAVAIL, "%s", why);
        return;
    }
    if (strlen(req->request_id) > REQUEST_ID_MAX) {
        reply_error(call, KR_EINVAL, "request_id longer than %d characters", REQUEST_ID_MAX);
        return;
    }
    /* Fail closed: nothing runs unrecorded. Node traffic and status are
     * exempt (the shipper itself must get through), reads only if configured. */
    if (svc->deps.audit != NULL && !audit_exempt(req->op_case) &&
        !audit_log_healthy(svc->deps.audit, why, sizeof(why)) &&
        (kr_request_is_write(req) || !audit_log_fail_open_reads(svc->deps.audit))) {
        reply_error(call, KR_EUNAVAIL, "audit records cannot be written (%s): refusing until "
                    "they can", why);
        return;
    }
    if (req->linearizable && !kr_op_is_write(req->op_case) && uses_key_state(req->op_case)) {
        /* Answered after a barrier committed: no newer write can be missed. */
        int rv = cluster_barrier(svc->deps.cluster, barrier_passed, call);
        if (rv != 0) {
            reply_error(call, rv, "a linearizable read %s", rv == KR_ENOTLEADER
                                                               ? "must go to the leader"
                                                               : "could not be ordered");
            return;
        }
        svc->pending++;
        return;
    }
    if (req->min_index > cluster_applied_index(svc->deps.cluster)) {
        /* Read-your-writes across nodes: wait, bounded, for the index. */
        call->wait_deadline_ms = now_ms() + MIN_INDEX_WAIT_MS;
        call->wait_next = svc->waiting;
        svc->waiting = call;
        svc->pending++;
        return;
    }
    dispatch(call);
}

void service_handle(struct service *svc, const struct service_caller *caller,
                    Keyraft__Request *req, struct pb_arena *arena, service_reply_cb cb,
                    void *ctx)
{
    handle(svc, caller, req, arena, 0, cb, ctx);
}

/* --- batches ------------------------------------------------------------------------------ */

/* Every request of a batch is an inner call of its own, with the batch's
 * caller: authorized, audited and answered as if sent alone. Their answers
 * are copied into the batch call's arena (an inner call's memory dies with
 * it) and sent back in order once the last one is in. Writes queued in one
 * loop iteration share a raft entry (cluster_propose). */

#define BATCH_MAX_REQUESTS 10000
#define BATCH_REPLY_OVERHEAD 64 /* the outer Response around the answers */
#define BATCH_DROPPED_MSG                                                                  \
    "handled, but its answer does not fit in the batch's reply frame: send it alone (a " \
    "write sent again with the same request_id gets its outcome)"

/* An answer is kept encoded, as the BatchResponse.responses element it will
 * be: length varint, then the Response (in the batch call's arena). The
 * reply carries the elements as the BatchResponse's unknown fields, which
 * protobuf-c writes out verbatim (field 1, length-delimited): on the wire,
 * the same bytes as a packed repeated field. Copying every answer as a
 * message and packing it again was a fifth of a node answering batches. */
struct batch_slot {
    struct call *batch;
    uint8_t *encoded; /* NULL: out of memory */
    size_t encoded_len;
    uint64_t commit_index;
};

struct batch {
    struct audit_tally *tally; /* the reads' records */
    size_t n;
    size_t outstanding; /* inner calls not answered yet, +1 while they are started */
    int counted;        /* in svc->pending */
    struct batch_slot slots[];
};

static void batch_free(struct batch *b)
{
    if (b != NULL)
        gov_audit_tally_free(b->tally);
    free(b);
}

static size_t varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

#define BATCH_RESPONSES_FIELD 1 /* BatchResponse.responses */

/* |resp| encoded as one element of BatchResponse.responses, in |call|'s
 * arena (see struct batch_slot). NULL when out of memory. */
static uint8_t *batch_encode(struct call *call, const Keyraft__Response *resp, size_t *out_len)
{
    size_t len = keyraft__response__get_packed_size(resp);
    size_t head = varint_size(len);
    uint8_t *buf = arena_alloc(call, head + len);
    if (buf == NULL)
        return NULL;
    size_t v = len;
    for (size_t i = 0; i < head; i++, v >>= 7)
        buf[i] = (uint8_t)((v & 0x7f) | (i + 1 < head ? 0x80 : 0));
    keyraft__response__pack(resp, buf + head);
    *out_len = head + len;
    return buf;
}

/* Bytes an encoded element takes in the reply: its tag (one byte), then it. */
static size_t batch_entry_size_encoded(size_t encoded_len) { return 1 + encoded_len; }

/* Bytes |resp| takes as one element of BatchResponse.responses. */
static size_t batch_entry_size(const Keyraft__Response *resp)
{
    size_t len = keyraft__response__get_packed_size(resp);
    return batch_entry_size_encoded(varint_size(len) + len);
}

/* The reply is one frame: within the configured limit and the one every
 * client enforces. */
static size_t batch_reply_cap(const struct service *svc)
{
    uint32_t cap = svc->deps.config->max_frame;
    return cap < KR_MAX_FRAME ? cap : KR_MAX_FRAME;
}

/* What an answer that does not fit is replaced with. */
static void batch_dropped(Keyraft__Response *r, uint64_t id, uint64_t commit_index)
{
    keyraft__response__init(r);
    r->id = id;
    r->status = KR_ETOOBIG;
    r->message = (char *)BATCH_DROPPED_MSG;
    r->commit_index = commit_index;
}

/* The answers in order; those past the frame limit are replaced by a
 * KR_ETOOBIG entry (room for one is kept for every later answer, so none is
 * ever missing). */
static void batch_finish(struct call *call)
{
    struct batch *b = call->batch;
    uint64_t id = call->req->id, top = 0;
    gov_audit_tally_flush(call, b->tally);
    if (b->counted)
        call->svc->pending--;
    b->counted = 0;
    Keyraft__BatchResponse *out = arena_alloc(call, sizeof(*out));
    ProtobufCMessageUnknownField *list = arena_alloc(call, (b->n ? b->n : 1) * sizeof(*list));
    if (out == NULL || list == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory assembling the answers of a batch of %zu",
                    b->n);
        return;
    }
    keyraft__batch_response__init(out);
    Keyraft__Response bound;
    batch_dropped(&bound, id, UINT64_MAX);
    size_t drop_size = batch_entry_size(&bound), cap = batch_reply_cap(call->svc);
    size_t used = BATCH_REPLY_OVERHEAD, dropped = 0;
    for (size_t i = 0; i < b->n; i++) {
        struct batch_slot *slot = &b->slots[i];
        uint8_t *enc = slot->encoded;
        size_t enc_len = slot->encoded_len;
        if (enc == NULL) {
            Keyraft__Response oom = KEYRAFT__RESPONSE__INIT;
            oom.id = id;
            oom.status = KR_ENOMEM;
            oom.message = (char *)"handled, but the node ran out of memory keeping its answer";
            enc = batch_encode(call, &oom, &enc_len);
        }
        if (enc != NULL &&
            used + batch_entry_size_encoded(enc_len) + (b->n - i - 1) * drop_size > cap) {
            Keyraft__Response d;
            batch_dropped(&d, id, slot->commit_index);
            enc = batch_encode(call, &d, &enc_len);
            dropped++;
        }
        if (enc == NULL) {
            reply_error(call, KR_ENOMEM, "out of memory assembling the answers of a batch "
                        "of %zu", b->n);
            return;
        }
        used += batch_entry_size_encoded(enc_len);
        if (slot->commit_index > top)
            top = slot->commit_index;
        list[i] = (ProtobufCMessageUnknownField){
            BATCH_RESPONSES_FIELD, PROTOBUF_C_WIRE_TYPE_LENGTH_PREFIXED, enc_len, enc};
    }
    if (dropped > 0)
        log_warn("batch of %zu from %s: %zu answers past the %zu-byte frame limit were "
                 "replaced by KR_ETOOBIG", b->n, call->principal, dropped, cap);
    out->base.n_unknown_fields = b->n;
    out->base.unknown_fields = list;
    call->resp.result_case = KEYRAFT__RESPONSE__RESULT_BATCH;
    call->resp.batch = out;
    call->resp.commit_index = top; /* the client's next reads wait for all of its writes */
    call_finish(call);
}

static void batch_slot_done(void *ctx, const Keyraft__Response *resp)
{
    struct batch_slot *slot = ctx;
    struct call *call = slot->batch;
    slot->encoded = batch_encode(call, resp, &slot->encoded_len);
    slot->commit_index = resp->commit_index;
    if (slot->encoded == NULL)
        log_error("batch from %s: out of memory keeping an answer", call->principal);
    if (--call->batch->outstanding == 0)
        batch_finish(call);
}

static void op_batch(struct call *call)
{
    struct service *svc = call->svc;
    Keyraft__BatchRequest *br = call->req->batch;
    size_t n = br != NULL ? br->n_requests : 0;
    if (n > BATCH_MAX_REQUESTS) {
        reply_error(call, KR_ETOOBIG, "a batch holds at most %d requests; this one has %zu: "
                    "split it", BATCH_MAX_REQUESTS, n);
        return;
    }
    /* Refused before anything runs when even the shortest answers (the
     * KR_ETOOBIG ones) could not all come back. */
    Keyraft__Response bound;
    batch_dropped(&bound, call->req->id, UINT64_MAX);
    size_t drop_size = batch_entry_size(&bound), cap = batch_reply_cap(svc);
    if (BATCH_REPLY_OVERHEAD + n * drop_size > cap) {
        reply_error(call, KR_ETOOBIG, "the answers to %zu requests cannot fit in the %zu-byte "
                    "reply frame: send at most %zu per batch", n, cap,
                    (cap - BATCH_REPLY_OVERHEAD) / drop_size);
        return;
    }
    /* A batch with a write goes to the leader whole: the client follows the
     * hint once instead of getting a refusal per write. */
    if (kr_request_is_write(call->req) && require_leader(call) != 0)
        return;
    struct batch *b = calloc(1, sizeof(*b) + n * sizeof(b->slots[0]));
    if (b == NULL) {
        reply_error(call, KR_ENOMEM, "out of memory for a batch of %zu requests", n);
        return;
    }
    call->batch = b;
    b->tally = gov_audit_tally_new(); /* NULL: records are written one by one */
    b->n = n;
    b->outstanding = n + 1; /* inner calls may answer before the loop ends */
    Keyraft__Request **reqs = br->requests;
    /* Inner requests in the batch's arena stay there until the batch's call
     * ends, after every inner call; unpacked with malloc, each belongs to its
     * inner call. */
    int borrowed = call->req_arena != NULL;
    br->n_requests = 0;
    struct service_caller caller = {.principal = call->principal, .roles = call->roles,
                                    .address = call->address, .serial = call->serial,
                                    .is_node = call->is_node, .internal = call->internal,
                                    .tally = b->tally};
    for (size_t i = 0; i < n; i++) {
        Keyraft__Request *sub = reqs[i];
        reqs[i] = NULL;
        b->slots[i].batch = call;
        sub->id = call->req->id;
        if (sub->op_case != KEYRAFT__REQUEST__OP_BATCH) {
            handle(svc, &caller, sub, NULL, borrowed, batch_slot_done, &b->slots[i]);
            continue;
        }
        struct call *inner =
            call_new(svc, &caller, sub, NULL, borrowed, batch_slot_done, &b->slots[i]);
        if (inner != NULL)
            reply_error(inner, KR_EINVAL, "request %zu of the batch is itself a batch: batches "
                        "do not nest", i);
    }
    if (--b->outstanding == 0) {
        batch_finish(call);
        return;
    }
    b->counted = 1;
    svc->pending++;
}

static void dispatch(struct call *call)
{
    if (gov_authorize(call) != 0)
        return;
    dispatch_op(call);
}

void dispatch_op(struct call *call)
{
    Keyraft__Request *req = call->req;
    switch (req->op_case) {
    case KEYRAFT__REQUEST__OP_CREATE: op_create(call); break;
    case KEYRAFT__REQUEST__OP_IMPORT: op_import(call); break;
    case KEYRAFT__REQUEST__OP_GET: op_get(call); break;
    case KEYRAFT__REQUEST__OP_EXPORT: op_export(call); break;
    case KEYRAFT__REQUEST__OP_LIST: op_list(call); break;
    case KEYRAFT__REQUEST__OP_ACTIVATE:
        set_state(call, req->activate->key, KEYRAFT__KEY_STATE__ACTIVE, 0, NULL, "activate");
        break;
    case KEYRAFT__REQUEST__OP_DEACTIVATE:
        set_state(call, req->deactivate->key, KEYRAFT__KEY_STATE__DEACTIVATED, 0, NULL,
                  "deactivate");
        break;
    case KEYRAFT__REQUEST__OP_REVOKE: op_revoke(call); break;
    case KEYRAFT__REQUEST__OP_DESTROY:
        set_state(call, req->destroy->key, KEYRAFT__KEY_STATE__DESTROYED, 0, NULL, "destroy");
        break;
    case KEYRAFT__REQUEST__OP_ROTATE: op_rotate(call); break;
    case KEYRAFT__REQUEST__OP_ENCRYPT: op_encrypt(call); break;
    case KEYRAFT__REQUEST__OP_DECRYPT: op_decrypt(call); break;
    case KEYRAFT__REQUEST__OP_SIGN: op_sign(call, 0); break;
    case KEYRAFT__REQUEST__OP_VERIFY: op_verify(call, 0); break;
    case KEYRAFT__REQUEST__OP_MAC: op_sign(call, 1); break;
    case KEYRAFT__REQUEST__OP_VERIFY_MAC: op_verify(call, 1); break;
    case KEYRAFT__REQUEST__OP_DATA_KEY: op_data_key(call); break;
    case KEYRAFT__REQUEST__OP_WRAP: op_wrap(call); break;
    case KEYRAFT__REQUEST__OP_UNWRAP: op_unwrap(call); break;
    case KEYRAFT__REQUEST__OP_RANDOM: op_random(call); break;
    case KEYRAFT__REQUEST__OP_STATUS: op_status(call); break;
    case KEYRAFT__REQUEST__OP_CLUSTER_LIST: op_cluster_list(call); break;
    case KEYRAFT__REQUEST__OP_CLUSTER_ADD: op_cluster_add(call); break;
    case KEYRAFT__REQUEST__OP_CLUSTER_PROMOTE:
        op_cluster_change(call, req->cluster_promote, KEYRAFT__NODE_ROLE__NODE_VOTER, 0);
        break;
    case KEYRAFT__REQUEST__OP_CLUSTER_DEMOTE:
        op_cluster_change(call, req->cluster_demote, KEYRAFT__NODE_ROLE__NODE_STANDBY, 0);
        break;
    case KEYRAFT__REQUEST__OP_CLUSTER_REMOVE:
        op_cluster_change(call, req->cluster_remove, KEYRAFT__NODE_ROLE__NODE_ROLE_UNSPECIFIED, 1);
        break;
    case KEYRAFT__REQUEST__OP_CLUSTER_TRANSFER: op_cluster_transfer(call); break;
    case KEYRAFT__REQUEST__OP_SNAPSHOT_OPEN: op_snapshot_open(call); break;
    case KEYRAFT__REQUEST__OP_SNAPSHOT_READ: op_snapshot_read(call); break;
    case KEYRAFT__REQUEST__OP_SNAPSHOT_CLOSE: op_snapshot_close(call); break;
    case KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE: op_principal_create(call); break;
    case KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE: op_principal_revoke(call); break;
    case KEYRAFT__REQUEST__OP_PRINCIPAL_LIST: op_principal_list(call); break;
    case KEYRAFT__REQUEST__OP_DOMAIN_CREATE: op_domain_create(call); break;
    case KEYRAFT__REQUEST__OP_DOMAIN_DESTROY: op_domain_destroy(call); break;
    case KEYRAFT__REQUEST__OP_DOMAIN_LIST: op_domain_list(call); break;
    case KEYRAFT__REQUEST__OP_SET_POLICY: op_set_policy(call); break;
    case KEYRAFT__REQUEST__OP_QUORUM_SET: op_quorum_set(call); break;
    case KEYRAFT__REQUEST__OP_QUORUM_LIST: op_quorum_list(call); break;
    case KEYRAFT__REQUEST__OP_APPROVAL_LIST: op_approval_list(call); break;
    case KEYRAFT__REQUEST__OP_APPROVAL_SHOW: op_approval_show(call); break;
    case KEYRAFT__REQUEST__OP_APPROVAL_APPROVE: op_approval_vote(call, 1); break;
    case KEYRAFT__REQUEST__OP_APPROVAL_DENY: op_approval_vote(call, 0); break;
    case KEYRAFT__REQUEST__OP_AUDIT_READ: op_audit_read(call); break;
    case KEYRAFT__REQUEST__OP_AUDIT_VERIFY: op_audit_verify(call); break;
    case KEYRAFT__REQUEST__OP_AUDIT_SUBMIT: op_audit_submit(call); break;
    case KEYRAFT__REQUEST__OP_BATCH: op_batch(call); break;
    default:
        reply_error(call, KR_EINVAL, "the request names no operation this node knows");
        break;
    }
}

/* --- lifecycle ---------------------------------------------------------------------------- */

int service_new(const struct service_deps *deps, struct service **out)
{
    struct service *svc = calloc(1, sizeof(*svc));
    if (svc == NULL)
        return KR_ENOMEM;
    svc->deps = *deps;
    svc->started_ms = now_ms();
    uv_timer_init(deps->loop, &svc->wake);
    svc->wake.data = svc;
    uv_timer_init(deps->loop, &svc->audit_flush);
    svc->audit_flush.data = svc;
    svc->wake_open = 1;
    /* Unsealed keys are kept only where the memory is locked. */
    keyring_cache_enable(deps->keyring, deps->config->key_cache_idle_s > 0 && secmem_locked());
    cluster_set_apply_hook(deps->cluster, on_applied, svc);
    *out = svc;
    return 0;
}

static void on_audit_flush(uv_timer_t *t) { gov_audit_coalesced_flush(t->data); }

void service_audit_flush_later(struct service *svc)
{
    if (svc->wake_open && !uv_is_active((uv_handle_t *)&svc->audit_flush))
        uv_timer_start(&svc->audit_flush, on_audit_flush, AUDIT_COALESCE_MS, 0);
    else if (!svc->wake_open)
        gov_audit_coalesced_flush(svc); /* stopping: no timer runs any more */
}

void service_stop(struct service *svc)
{
    run_waiting(svc, 1);
    gov_audit_coalesced_flush(svc);
    if (svc->wake_open) {
        svc->wake_open = 0;
        uv_close((uv_handle_t *)&svc->wake, NULL);
        uv_close((uv_handle_t *)&svc->audit_flush, NULL);
    }
}

void service_free(struct service *svc)
{
    if (svc == NULL)
        return;
    gov_free(svc);
    gov_audit_coalescer_free(svc);
    for (size_t i = 0; i < KEY_CACHE_SLOTS; i++)
        key_cache_drop(&svc->key_cache[i]);
    for (size_t i = 0; i < SIGNER_CACHE_SLOTS; i++)
        signer_slot_drop(&svc->signers[i]);
    free(svc);
}

unsigned service_pending(const struct service *svc) { return svc->pending; }

int service_ready(struct service *svc)
{
    if (svc->ready)
        return 1;
    /* Ready once the domain is committed, not merely generated here. */
    Keyraft__DomainRecord *dom = NULL;
    if (fsm_get_domain(svc->deps.store, FSM_DEFAULT_DOMAIN, &dom) != 0)
        return 0;
    keyraft__domain_record__free_unpacked(dom, NULL);
    if (gov_bootstrap_pending(svc))
        return 0; /* the first principals are not committed yet */
    svc->ready = ensure_domain(svc, FSM_DEFAULT_DOMAIN) == 0;
    return svc->ready;
}

int domain_command_new(struct service *svc, const char *id, struct domain_command *dc)
{
    memset(dc, 0, sizeof(*dc));
    int rv = keyring_create_domain(svc->deps.keyring, id, &dc->wrapped, &dc->wrapped_len);
    if (rv != 0)
        return rv;
    keyraft__domain_record__init(&dc->rec);
    dc->rec.id = (char *)id;
    dc->rec.wrapped_key.data = dc->wrapped;
    dc->rec.wrapped_key.len = dc->wrapped_len;
    dc->rec.created_at = now_ms();
    dc->rec.mwk_label = (char *)svc->deps.config->hsm_mwk_label;
    keyraft__put_domain_command__init(&dc->put);
    dc->put.domain = &dc->rec;
    keyraft__command__init(&dc->cmd);
    dc->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_DOMAIN;
    dc->cmd.put_domain = &dc->put;
    return 0;
}

void domain_command_free(struct domain_command *dc)
{
    free(dc->wrapped);
    dc->wrapped = NULL;
}

static void domain_done(void *arg, const struct fsm_op_result *res)
{
    struct service *svc = arg;
    svc->domain_in_progress = 0;
    if (res->status == 0) {
        log_info("default domain created");
        return;
    }
    /* The key made for the proposal was not committed: forget it, and load
     * whatever the cluster did commit, when it did. */
    keyring_unload_domain(svc->deps.keyring, FSM_DEFAULT_DOMAIN);
    if (res->status != KR_EEXIST)
        log_warn("creating the default domain: %s; retrying", kr_strerror(res->status));
}

/* keyring_cache_sweep's question: is this version still live, sealed as
 * cached? A destroyed version, a destroyed key or one that is gone is not. */
static int key_version_still_sealed(void *arg, const char *domain_id, const char *key_id,
                                    uint32_t version, const uint8_t *sealed, size_t sealed_len)
{
    struct service *svc = arg;
    Keyraft__KeyRecord *rec = NULL;
    if (!fsm_key_id_valid(key_id) || fsm_get_key(svc->deps.store, key_id, &rec) != 0)
        return 0;
    const Keyraft__KeyVersionRecord *v = find_version(rec, version);
    int live = v != NULL && !v->destroyed && strcmp(rec->domain, domain_id) == 0 &&
               v->sealed.len == sealed_len && memcmp(v->sealed.data, sealed, sealed_len) == 0;
    keyraft__key_record__free_unpacked(rec, NULL);
    return live;
}

void service_tick(struct service *svc)
{
    if (svc->waiting != NULL)
        run_waiting(svc, 0); /* deadlines */
    uint64_t now = now_ms();
    if (now - svc->last_key_expiry_ms >= 1000) {
        uint64_t idle_ms = (uint64_t)svc->deps.config->key_cache_idle_s * 1000u;
        keyring_cache_expire(svc->deps.keyring, idle_ms);
        svc->last_key_expiry_ms = now;
        /* After commits to the keys (a store read per cached version, once a
         * second at most): a version destroyed through any node leaves this
         * node's memory within a second. */
        uint64_t gen = store_cf_generation(svc->deps.store, STORE_CF_KEYS);
        if (gen != svc->swept_generation) {
            keyring_cache_sweep(svc->deps.keyring, key_version_still_sealed, svc);
            svc->swept_generation = gen;
        }
    }
    gov_tick_any(svc);
    if (!cluster_is_leader(svc->deps.cluster))
        return;
    tick_membership(svc);
    gov_tick(svc);
    if (svc->domain_in_progress)
        return;
    Keyraft__DomainRecord *dom = NULL;
    int rv = fsm_get_domain(svc->deps.store, FSM_DEFAULT_DOMAIN, &dom);
    if (rv == 0) {
        keyraft__domain_record__free_unpacked(dom, NULL);
        return;
    }
    if (rv != KR_ENOTFOUND)
        return;
    struct domain_command dc;
    rv = domain_command_new(svc, FSM_DEFAULT_DOMAIN, &dc);
    if (rv != 0) {
        log_error("cannot make the default domain key: %s", kr_strerror(rv));
        return;
    }
    rv = cluster_propose(svc->deps.cluster, &dc.cmd, domain_done, svc);
    domain_command_free(&dc);
    if (rv == 0)
        svc->domain_in_progress = 1;
    else
        keyring_unload_domain(svc->deps.keyring, FSM_DEFAULT_DOMAIN);
}
