/* fsm.c: the raft state machine. Each command of an entry, or each run of
 * consecutive creates, commits in its own RocksDB batch together with the fsm
 * position (index, op number), so a crash between two commits of one entry
 * resumes exactly where it stopped. */
#include "fsm_internal.h"

#define KR_LOG_MODULE "fsm"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "pbarena.h"
#include "keyraft.h"
#include "log.h"

/* Deduplication records are kept by day: a record lives in the window of
 * the entry that made it, and is found from that window and the next one.
 * Moving to window w drops every window before w - 1 with one range
 * tombstone, so a record lives one to two windows by the leaders' clocks.
 * Rows: DEDUP_PREFIX | window (u64 BE) | scoped request id. Rows of the old
 * layout (DEDUP_LEGACY_PREFIX | request id: older nodes kept them
 * forever, and this one writes them while no entry has carried a clock)
 * count as the first window that had a clock. */
#define DEDUP_WINDOW_MS (24ull * 60 * 60 * 1000)
#define DEDUP_PREFIX "dedupw"
#define DEDUP_LEGACY_PREFIX "dedup\0"
#define DEDUP_LEGACY_END "dedup\1"
/* Scoped request ids are at most 64 + principal (255) + 1 characters
 * (service.c): every row fits. */
#define DEDUP_KEY_MAX 512
/* Value: the current window, then the old layout's window (u64 BE each). */
static const char DEDUP_WINDOW_KEY[] = "\0dedup_window";

struct dedup_window {
    uint64_t current; /* 0: no entry has carried a clock */
    uint64_t legacy;  /* the window old-layout rows count as; 0: there are none
                         (while current is 0, they are being written) */
};

struct fsm {
    struct store *store;
    uint64_t (*next_index)(void *arg);
    void *arg;
    struct fsm_result *last_result;
    /* Position of the last applied op: ops [0, pos_op) of pos_index are done. */
    uint64_t pos_index;
    uint32_t pos_op;
    struct dedup_window dedup;
    struct pb_arena *decode_arena; /* the entry being applied; reset before the next */
};

/* A create's command takes ~700 bytes decoded; entries of a few grow it. */
#define FSM_DECODE_ARENA_BYTES (64u * 1024u)

static const char FSM_POS_KEY[] = "\0fsm_pos";
#define DOMAIN_PREFIX FSM_DOMAIN_PREFIX

static void put_u64be(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_u64be(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static int read_dedup_window(struct store *store, struct dedup_window *out)
{
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, DEDUP_WINDOW_KEY, sizeof(DEDUP_WINDOW_KEY) - 1, &val,
                       &len);
    if (rv == KR_ENOTFOUND) {
        *out = (struct dedup_window){0};
        return 0;
    }
    if (rv != 0)
        return rv;
    if (len != 16) {
        free(val);
        return KR_EIO;
    }
    *out = (struct dedup_window){.current = get_u64be(val), .legacy = get_u64be(val + 8)};
    free(val);
    return 0;
}

int fsm_new(struct store *store, uint64_t (*next_index)(void *arg), void *arg, struct fsm **out)
{
    struct fsm *fsm = calloc(1, sizeof(*fsm));
    if (fsm == NULL)
        return KR_ENOMEM;
    fsm->store = store;
    fsm->next_index = next_index;
    fsm->arg = arg;
    /* Entries are bounded by the leader (COMMAND_BATCH_MAX_BYTES) and agreed
     * on by the cluster: their decoded size is not bounded again here. */
    fsm->decode_arena = pb_arena_new(FSM_DECODE_ARENA_BYTES, 0);
    if (fsm->decode_arena == NULL) {
        free(fsm);
        return KR_ENOMEM;
    }
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, FSM_POS_KEY, sizeof(FSM_POS_KEY) - 1, &val, &len);
    if (rv == 0 && len == 12) {
        fsm->pos_index = get_u64be(val);
        fsm->pos_op = (uint32_t)((uint32_t)val[8] << 24 | (uint32_t)val[9] << 16 |
                                 (uint32_t)val[10] << 8 | val[11]);
    } else if (rv != 0 && rv != KR_ENOTFOUND) {
        fsm_free(fsm);
        return rv;
    }
    free(val);
    rv = read_dedup_window(store, &fsm->dedup);
    if (rv != 0) {
        fsm_free(fsm);
        return rv;
    }
    *out = fsm;
    return 0;
}

void fsm_free(struct fsm *fsm)
{
    if (fsm == NULL)
        return;
    free(fsm->last_result);
    pb_arena_free(fsm->decode_arena);
    free(fsm);
}

struct store *fsm__store(struct fsm *fsm) { return fsm->store; }

struct fsm_result *fsm_take_result(struct fsm *fsm, void *result)
{
    if (result == NULL || result != fsm->last_result)
        return NULL;
    fsm->last_result = NULL;
    return result;
}

/* --- schema ---------------------------------------------------------------- */

static size_t join_parts(uint8_t *buf, size_t cap, const char *const *parts, size_t n)
{
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(parts[i]);
        if (off + l + 1 > cap)
            return 0;
        memcpy(buf + off, parts[i], l);
        off += l;
        buf[off++] = '\0';
    }
    return off;
}

size_t fsm_name_key(uint8_t *buf, size_t cap, const char *domain, const char *name)
{
    const char *parts[] = {domain, name};
    size_t n = join_parts(buf, cap, parts, 2);
    return n == 0 ? 0 : n - 1; /* no trailing NUL: names sort as themselves */
}

size_t fsm_attr_prefix(uint8_t *buf, size_t cap, enum fsm_index_kind kind, const char *domain,
                       const char *v1, const char *v2)
{
    char k[2] = {(char)kind, 0};
    const char *parts[] = {k, domain, v1, v2};
    return join_parts(buf, cap, parts, v2 ? 4 : 3);
}

static const char HEX[] = "0123456789abcdef";

void fsm_format_key_id(uint16_t shard, const uint8_t bytes14[14], char out[FSM_KEY_ID_LEN + 1])
{
    out[0] = HEX[(shard >> 12) & 15];
    out[1] = HEX[(shard >> 8) & 15];
    out[2] = HEX[(shard >> 4) & 15];
    out[3] = HEX[shard & 15];
    for (int i = 0; i < 14; i++) {
        out[4 + 2 * i] = HEX[bytes14[i] >> 4];
        out[5 + 2 * i] = HEX[bytes14[i] & 15];
    }
    out[FSM_KEY_ID_LEN] = '\0';
}

void fsm_make_key_id(uint16_t shard, uint64_t time_ms, const uint8_t random8[8],
                     char out[FSM_KEY_ID_LEN + 1])
{
    uint8_t bytes[14];
    for (int i = 0; i < 6; i++)
        bytes[i] = (uint8_t)(time_ms >> (40 - 8 * i));
    memcpy(bytes + 6, random8, 8);
    fsm_format_key_id(shard, bytes, out);
}

int fsm_key_id_valid(const char *id)
{
    /* Checked on every request naming a key: no strchr per character. */
    size_t i = 0;
    for (; id[i] != '\0'; i++)
        if (i >= FSM_KEY_ID_LEN ||
            !((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f')))
            return 0;
    return i == FSM_KEY_ID_LEN;
}

static int parse_key_record(const char *key_id, const uint8_t *val, size_t len,
                            Keyraft__KeyRecord **out)
{
    Keyraft__KeyRecord *rec = keyraft__key_record__unpack(NULL, len, val);
    if (rec == NULL) {
        log_error("key record %s does not parse: store corrupted?", key_id);
        return KR_EIO;
    }
    *out = rec;
    return 0;
}

int fsm_get_key(struct store *store, const char *key_id, Keyraft__KeyRecord **out)
{
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_KEYS, key_id, strlen(key_id), &val, &len);
    if (rv != 0)
        return rv;
    rv = parse_key_record(key_id, val, len, out);
    free(val);
    return rv;
}

int fsm_find_name(struct store *store, const char *domain, const char *name,
                  char out_id[FSM_KEY_ID_LEN + 1])
{
    uint8_t key[1024];
    size_t klen = fsm_name_key(key, sizeof(key), domain, name);
    if (klen == 0)
        return KR_EINVAL;
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_NAMES, key, klen, &val, &len);
    if (rv != 0)
        return rv;
    if (len != FSM_KEY_ID_LEN) { /* a name row holds a key id */
        free(val);
        return KR_EIO;
    }
    memcpy(out_id, val, FSM_KEY_ID_LEN);
    out_id[FSM_KEY_ID_LEN] = '\0';
    free(val);
    return 0;
}

size_t fsm__domain_key(uint8_t *buf, size_t cap, const char *domain_id)
{
    size_t l = strlen(domain_id);
    if (sizeof(DOMAIN_PREFIX) - 1 + l > cap)
        return 0;
    memcpy(buf, DOMAIN_PREFIX, sizeof(DOMAIN_PREFIX) - 1);
    memcpy(buf + sizeof(DOMAIN_PREFIX) - 1, domain_id, l);
    return sizeof(DOMAIN_PREFIX) - 1 + l;
}

int fsm_get_domain(struct store *store, const char *domain_id, Keyraft__DomainRecord **out)
{
    uint8_t key[300];
    size_t klen = fsm__domain_key(key, sizeof(key), domain_id);
    if (klen == 0)
        return KR_EINVAL;
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, key, klen, &val, &len);
    if (rv != 0)
        return rv;
    Keyraft__DomainRecord *rec = keyraft__domain_record__unpack(NULL, len, val);
    free(val);
    if (rec == NULL)
        return KR_EIO;
    *out = rec;
    return 0;
}

int fsm_transition_allowed(Keyraft__KeyState from, Keyraft__KeyState to)
{
    switch (to) {
    case KEYRAFT__KEY_STATE__ACTIVE:
        return from == KEYRAFT__KEY_STATE__PRE_ACTIVE;
    case KEYRAFT__KEY_STATE__DEACTIVATED:
        return from == KEYRAFT__KEY_STATE__ACTIVE || from == KEYRAFT__KEY_STATE__PRE_ACTIVE;
    case KEYRAFT__KEY_STATE__COMPROMISED:
        return from == KEYRAFT__KEY_STATE__PRE_ACTIVE || from == KEYRAFT__KEY_STATE__ACTIVE ||
               from == KEYRAFT__KEY_STATE__DEACTIVATED;
    case KEYRAFT__KEY_STATE__DESTROYED:
        return from == KEYRAFT__KEY_STATE__PRE_ACTIVE || from == KEYRAFT__KEY_STATE__DEACTIVATED;
    case KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED:
        return from == KEYRAFT__KEY_STATE__COMPROMISED || from == KEYRAFT__KEY_STATE__DESTROYED;
    default:
        return 0;
    }
}

/* --- apply ------------------------------------------------------------------ */

static void index_put(struct store_batch *b, const Keyraft__KeyRecord *rec, int add)
{
    uint8_t key[1200];
    char num[16];
    size_t n;
    /* Destroyed keys leave the name, algorithm and tag indexes; the state index
     * keeps them findable as tombstones. */
    int live = rec->state != KEYRAFT__KEY_STATE__DESTROYED &&
               rec->state != KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED;
    if (live) {
        n = fsm_name_key(key, sizeof(key), rec->domain, rec->name);
        if (n > 0) {
            if (add)
                store_batch_put(b, STORE_CF_NAMES, key, n, rec->id, strlen(rec->id));
            else
                store_batch_delete(b, STORE_CF_NAMES, key, n);
        }
        snprintf(num, sizeof(num), "%02d", (int)rec->algorithm);
        n = fsm_attr_prefix(key, sizeof(key) - FSM_KEY_ID_LEN, FSM_INDEX_ALG, rec->domain, num, NULL);
        if (n > 0) {
            memcpy(key + n, rec->id, FSM_KEY_ID_LEN);
            if (add)
                store_batch_put(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN, "", 0);
            else
                store_batch_delete(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN);
        }
        for (size_t i = 0; i < rec->n_tags; i++) {
            n = fsm_attr_prefix(key, sizeof(key) - FSM_KEY_ID_LEN, FSM_INDEX_TAG, rec->domain,
                                rec->tags[i]->key, rec->tags[i]->value);
            if (n == 0)
                continue;
            memcpy(key + n, rec->id, FSM_KEY_ID_LEN);
            if (add)
                store_batch_put(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN, "", 0);
            else
                store_batch_delete(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN);
        }
    }
    snprintf(num, sizeof(num), "%d", (int)rec->state);
    n = fsm_attr_prefix(key, sizeof(key) - FSM_KEY_ID_LEN, FSM_INDEX_STATE, rec->domain, num, NULL);
    if (n > 0) {
        memcpy(key + n, rec->id, FSM_KEY_ID_LEN);
        if (add)
            store_batch_put(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN, "", 0);
        else
            store_batch_delete(b, STORE_CF_ATTRS, key, n + FSM_KEY_ID_LEN);
    }
}

int fsm__put_key_record(struct store_batch *b, Keyraft__KeyRecord *rec, uint64_t index)
{
    rec->updated_index = index;
    size_t len = keyraft__key_record__get_packed_size(rec);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return KR_ENOMEM;
    keyraft__key_record__pack(rec, buf);
    store_batch_put(b, STORE_CF_KEYS, rec->id, strlen(rec->id), buf, len);
    free(buf);
    return 0;
}

/* Consecutive creates of one entry commit as one RocksDB batch: a bulk
 * entry of 1,000 creates was 1,000 writes and 4,000 reads, 60% of a leader's
 * CPU. Store reads do not see the uncommitted batch, so the group remembers
 * the names, ids and request ids it wrote, and the last domain it found live
 * (no op that changes a domain joins a group). */
struct group_slot {
    uint64_t hash; /* 0: empty */
    const char *a, *b;
    uint32_t op;
    char kind; /* 'N' (domain, name), 'I' key id, 'R' request id */
};

/* The store reads of a run of creates (consecutive ops that join one group),
 * made before its first op in one multi-get per column family. Every op of a
 * run reads the store as it was before the run, since the group commits at
 * the run's end, so each answer read ahead is the one the op's own read would
 * get. A 1,000-key entry made 4,000 point reads, a quarter of a follower's
 * CPU in a bulk load. Slot statuses are store_multi_get's, and KR_EINVAL for
 * a row key that does not fit (the lookup's own answer then). */
struct run_reads {
    uint32_t first, end; /* ops [first, end): the run, read ahead or not */
    int ready;           /* 0: each op reads for itself */
    size_t n_windows;    /* dedup slots per op, in dedup_windows order */
    struct store_value *dedup, *name, *id;
};

struct put_group {
    struct store_batch *b;
    uint32_t n_ops;   /* ops in the group */
    uint32_t next_op; /* the op after the group's last */
    struct group_slot *slots;
    size_t cap, used; /* cap: 0 or a power of two */
    const char *live_domain;
    struct run_reads reads;
};

/* The run's reads when |op| is in a run read ahead, else NULL. */
static const struct run_reads *reads_for(const struct put_group *g, uint32_t op)
{
    if (g == NULL || !g->reads.ready || op < g->reads.first || op >= g->reads.end)
        return NULL;
    return &g->reads;
}

static uint64_t group_hash(char kind, const char *a, const char *b)
{
    uint64_t h = kr_hash_bytes(KR_HASH_INIT, &kind, 1);
    h = kr_hash_bytes(kr_hash_str(h, a), "\xff", 1); /* separates a|b from a shifted split */
    h = kr_hash_str(h, b);
    return h ? h : 1; /* 0 marks an empty slot */
}

static const struct group_slot *group_find(const struct put_group *g, char kind, const char *a,
                                           const char *b)
{
    if (g == NULL || g->used == 0)
        return NULL;
    uint64_t h = group_hash(kind, a, b);
    for (size_t i = h & (g->cap - 1);; i = (i + 1) & (g->cap - 1)) {
        const struct group_slot *s = &g->slots[i];
        if (s->hash == 0)
            return NULL;
        if (s->hash == h && s->kind == kind && strcmp(s->a, a) == 0 && strcmp(s->b, b) == 0)
            return s;
    }
}

static void group_insert(struct group_slot *slots, size_t cap, const struct group_slot *in)
{
    size_t i = in->hash & (cap - 1);
    while (slots[i].hash != 0)
        i = (i + 1) & (cap - 1);
    slots[i] = *in;
}

/* |a| and |b| must live as long as the group (they point into the entry). */
static int group_add(struct put_group *g, char kind, const char *a, const char *b, uint32_t op)
{
    if ((g->used + 1) * 2 > g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 1024;
        struct group_slot *slots = calloc(cap, sizeof(*slots));
        if (slots == NULL)
            return KR_ENOMEM;
        for (size_t i = 0; i < g->cap; i++)
            if (g->slots[i].hash != 0)
                group_insert(slots, cap, &g->slots[i]);
        free(g->slots);
        g->slots = slots;
        g->cap = cap;
    }
    struct group_slot s = {group_hash(kind, a, b), a, b, op, kind};
    group_insert(g->slots, g->cap, &s);
    g->used++;
    return 0;
}

/* |g| is NULL outside a group. */
static int apply_put_key(struct fsm *fsm, struct put_group *g, struct store_batch *b,
                         const Keyraft__PutKeyCommand *cmd, uint64_t index, uint32_t op_no,
                         struct fsm_op_result *res)
{
    Keyraft__KeyRecord *rec = cmd->key;
    if (rec == NULL || !fsm_key_id_valid(rec->id) || rec->name[0] == '\0' ||
        rec->domain[0] == '\0' || rec->n_versions == 0)
        return KR_EINVAL;
    snprintf(res->key_id, sizeof(res->key_id), "%s", rec->id);
    int rv;
    if (g == NULL || g->live_domain == NULL || strcmp(g->live_domain, rec->domain) != 0) {
        Keyraft__DomainRecord *dom = NULL;
        rv = fsm_get_domain(fsm->store, rec->domain, &dom);
        if (rv != 0)
            return rv == KR_ENOTFOUND ? KR_ENOTFOUND : rv;
        int shredded = dom->destroyed;
        keyraft__domain_record__free_unpacked(dom, NULL);
        if (shredded)
            return KR_ESTATE;
        if (g != NULL)
            g->live_domain = rec->domain;
    }
    if (group_find(g, 'N', rec->domain, rec->name) != NULL)
        return KR_EEXIST;
    const struct run_reads *ra = reads_for(g, op_no);
    if (ra != NULL) {
        const struct store_value *v = &ra->name[op_no - ra->first];
        rv = v->status == 0 && v->len != FSM_KEY_ID_LEN ? KR_EIO : v->status;
    } else {
        char existing[FSM_KEY_ID_LEN + 1];
        rv = fsm_find_name(fsm->store, rec->domain, rec->name, existing);
    }
    if (rv == 0)
        return KR_EEXIST;
    if (rv != KR_ENOTFOUND)
        return rv;
    if (group_find(g, 'I', rec->id, "") != NULL)
        return KR_EEXIST; /* id collision: the leader's RNG repeated itself */
    Keyraft__KeyRecord *old = NULL;
    if (ra != NULL) {
        const struct store_value *v = &ra->id[op_no - ra->first];
        rv = v->status == 0 ? parse_key_record(rec->id, v->data, v->len, &old) : v->status;
    } else {
        rv = fsm_get_key(fsm->store, rec->id, &old);
    }
    if (rv == 0) {
        keyraft__key_record__free_unpacked(old, NULL);
        return KR_EEXIST;
    }
    if (rv != KR_ENOTFOUND)
        return rv;
    rv = fsm__put_key_record(b, rec, index);
    if (rv != 0)
        return rv;
    index_put(b, rec, 1);
    if (g != NULL && (group_add(g, 'N', rec->domain, rec->name, op_no) != 0 ||
                      group_add(g, 'I', rec->id, "", op_no) != 0))
        return KR_ENOMEM;
    return 0;
}

static int apply_set_state(struct fsm *fsm, struct store_batch *b,
                           const Keyraft__SetStateCommand *cmd, uint64_t index,
                           struct fsm_op_result *res)
{
    snprintf(res->key_id, sizeof(res->key_id), "%s", cmd->key_id);
    Keyraft__KeyRecord *rec = NULL;
    int rv = fsm_get_key(fsm->store, cmd->key_id, &rec);
    if (rv != 0)
        return rv;
    if (!fsm_transition_allowed(rec->state, cmd->state)) {
        rv = KR_ESTATE;
        goto out;
    }
    index_put(b, rec, 0);
    rec->state = cmd->state;
    switch (cmd->state) {
    case KEYRAFT__KEY_STATE__ACTIVE:
        rec->activated_at = cmd->at;
        break;
    case KEYRAFT__KEY_STATE__DEACTIVATED:
        rec->deactivated_at = cmd->at;
        if (cmd->reason != KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED) {
            rec->revoked_at = cmd->at;
            rec->revoke_reason = cmd->reason;
        }
        break;
    case KEYRAFT__KEY_STATE__COMPROMISED:
        rec->revoked_at = cmd->at;
        rec->revoke_reason = cmd->reason;
        if (rec->deactivated_at == 0)
            rec->deactivated_at = cmd->at;
        break;
    default:
        rv = KR_EINVAL; /* destruction goes through DestroyKeyCommand */
        goto out;
    }
    if (cmd->state != KEYRAFT__KEY_STATE__ACTIVE && cmd->message[0] != '\0') {
        /* An unset string is protobuf-c's static empty string: not ours to free. */
        if (rec->revoke_message != protobuf_c_empty_string)
            free(rec->revoke_message);
        rec->revoke_message = strdup(cmd->message);
        if (rec->revoke_message == NULL) {
            rv = KR_ENOMEM;
            goto out;
        }
    }
    rv = fsm__put_key_record(b, rec, index);
    if (rv == 0)
        index_put(b, rec, 1);
out:
    keyraft__key_record__free_unpacked(rec, NULL);
    return rv;
}

static int key_usable_for_versions(Keyraft__KeyState s)
{
    return s == KEYRAFT__KEY_STATE__ACTIVE || s == KEYRAFT__KEY_STATE__PRE_ACTIVE;
}

static int apply_add_version(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__AddVersionCommand *cmd, uint64_t index,
                             struct fsm_op_result *res)
{
    snprintf(res->key_id, sizeof(res->key_id), "%s", cmd->key_id);
    if (cmd->version == NULL)
        return KR_EINVAL;
    Keyraft__KeyRecord *rec = NULL;
    int rv = fsm_get_key(fsm->store, cmd->key_id, &rec);
    if (rv != 0)
        return rv;
    if (!key_usable_for_versions(rec->state)) {
        rv = KR_ESTATE;
        goto out;
    }
    if (cmd->version->version != rec->current_version + 1) {
        rv = KR_ESTATE; /* a concurrent rotation won: the client may retry */
        goto out;
    }
    Keyraft__KeyVersionRecord **versions =
        realloc(rec->versions, (rec->n_versions + 1) * sizeof(*versions));
    if (versions == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    rec->versions = versions;
    /* Borrow the command's version for packing; detached before the free. */
    rec->versions[rec->n_versions++] = cmd->version;
    rec->current_version = cmd->version->version;
    rv = fsm__put_key_record(b, rec, index);
    rec->n_versions--;
out:
    keyraft__key_record__free_unpacked(rec, NULL);
    return rv;
}

static int apply_destroy(struct fsm *fsm, struct store_batch *b,
                         const Keyraft__DestroyKeyCommand *cmd, uint64_t index,
                         struct fsm_op_result *res)
{
    snprintf(res->key_id, sizeof(res->key_id), "%s", cmd->key_id);
    Keyraft__KeyRecord *rec = NULL;
    int rv = fsm_get_key(fsm->store, cmd->key_id, &rec);
    if (rv != 0)
        return rv;
    Keyraft__KeyState to = rec->state == KEYRAFT__KEY_STATE__COMPROMISED
                               ? KEYRAFT__KEY_STATE__DESTROYED_COMPROMISED
                               : KEYRAFT__KEY_STATE__DESTROYED;
    if (!fsm_transition_allowed(rec->state, to)) {
        rv = KR_ESTATE;
        goto out;
    }
    index_put(b, rec, 0);
    rec->state = to;
    rec->destroyed_at = cmd->at;
    /* Crypto-shred: the sealed material goes; metadata stays as a tombstone. */
    for (size_t i = 0; i < rec->n_versions; i++) {
        Keyraft__KeyVersionRecord *v = rec->versions[i];
        free(v->sealed.data);
        v->sealed.data = NULL;
        v->sealed.len = 0;
        v->destroyed = 1;
    }
    rv = fsm__put_key_record(b, rec, index);
    if (rv == 0)
        index_put(b, rec, 1);
out:
    keyraft__key_record__free_unpacked(rec, NULL);
    return rv;
}

static int apply_put_domain(struct fsm *fsm, struct store_batch *b,
                            const Keyraft__PutDomainCommand *cmd)
{
    const Keyraft__DomainRecord *dom = cmd->domain;
    if (dom == NULL || dom->id[0] == '\0' || dom->wrapped_key.len == 0)
        return KR_EINVAL;
    Keyraft__DomainRecord *old = NULL;
    int rv = fsm_get_domain(fsm->store, dom->id, &old);
    if (rv == 0) {
        keyraft__domain_record__free_unpacked(old, NULL);
        return KR_EEXIST;
    }
    if (rv != KR_ENOTFOUND)
        return rv;
    uint8_t key[300];
    size_t klen = fsm__domain_key(key, sizeof(key), dom->id);
    if (klen == 0)
        return KR_EINVAL;
    size_t len = keyraft__domain_record__get_packed_size(dom);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return KR_ENOMEM;
    keyraft__domain_record__pack(dom, buf);
    store_batch_put(b, STORE_CF_META, key, klen, buf, len);
    free(buf);
    fsm_governance_bump();
    return 0;
}

/* --- node registry: meta "node\0" + u64be id -> NodeRecord --------------------- */

#define NODE_PREFIX "node\0"
#define NODE_KEY_LEN (sizeof(NODE_PREFIX) - 1 + 8)
/* Removed nodes' last records: their audit keys still vouch for old checkpoints. */
#define RETIRED_PREFIX "node_retired\0"
#define RETIRED_KEY_LEN (sizeof(RETIRED_PREFIX) - 1 + 8)

static void node_key(uint8_t out[NODE_KEY_LEN], uint64_t id)
{
    memcpy(out, NODE_PREFIX, sizeof(NODE_PREFIX) - 1);
    put_u64be(out + sizeof(NODE_PREFIX) - 1, id);
}

static void retired_key(uint8_t out[RETIRED_KEY_LEN], uint64_t id)
{
    memcpy(out, RETIRED_PREFIX, sizeof(RETIRED_PREFIX) - 1);
    put_u64be(out + sizeof(RETIRED_PREFIX) - 1, id);
}

int fsm_get_node(struct store *store, uint64_t id, Keyraft__NodeRecord **out)
{
    uint8_t key[NODE_KEY_LEN];
    node_key(key, id);
    uint8_t *val = NULL;
    size_t len = 0;
    int rv = store_get(store, STORE_CF_META, key, sizeof(key), &val, &len);
    if (rv != 0)
        return rv;
    *out = keyraft__node_record__unpack(NULL, len, val);
    free(val);
    return *out != NULL ? 0 : KR_EIO;
}

static int list_nodes_under(struct store *store, const char *prefix, size_t plen,
                            struct fsm_nodes *out)
{
    memset(out, 0, sizeof(*out));
    uint8_t lower[32], upper[32];
    memcpy(lower, prefix, plen);
    memset(lower + plen, 0, 8);
    memcpy(upper, prefix, plen);
    memset(upper + plen, 0xff, 8);
    struct store_iter *it = NULL;
    int rv = store_iter_new(store, STORE_CF_META, lower, plen + 8, upper, plen + 8, &it);
    if (rv != 0)
        return rv;
    for (; store_iter_valid(it) && out->n < FSM_MAX_NODES; store_iter_next(it)) {
        size_t len = 0;
        const uint8_t *val = store_iter_value(it, &len);
        Keyraft__NodeRecord *rec = keyraft__node_record__unpack(NULL, len, val);
        if (rec == NULL) {
            rv = KR_EIO;
            break;
        }
        out->nodes[out->n++] = rec;
    }
    if (rv == 0)
        rv = store_iter_status(it);
    store_iter_free(it);
    if (rv != 0)
        fsm_nodes_free(out);
    return rv;
}

int fsm_list_nodes(struct store *store, struct fsm_nodes *out)
{
    return list_nodes_under(store, NODE_PREFIX, sizeof(NODE_PREFIX) - 1, out);
}

int fsm_list_retired_nodes(struct store *store, struct fsm_nodes *out)
{
    return list_nodes_under(store, RETIRED_PREFIX, sizeof(RETIRED_PREFIX) - 1, out);
}

void fsm_nodes_free(struct fsm_nodes *nodes)
{
    for (size_t i = 0; i < nodes->n; i++)
        keyraft__node_record__free_unpacked(nodes->nodes[i], NULL);
    nodes->n = 0;
}

static int valid_role(Keyraft__NodeRole role)
{
    return role == KEYRAFT__NODE_ROLE__NODE_VOTER || role == KEYRAFT__NODE_ROLE__NODE_STANDBY;
}

static int apply_put_node(struct fsm *fsm, struct store_batch *b, const Keyraft__PutNodeCommand *cmd)
{
    const Keyraft__NodeRecord *node = cmd->node;
    if (node == NULL || node->id == 0 || node->raft_address[0] == '\0' ||
        node->client_address[0] == '\0' || !valid_role(node->role))
        return KR_EINVAL;
    struct fsm_nodes all;
    int rv = fsm_list_nodes(fsm->store, &all);
    if (rv != 0)
        return rv;
    int clash = 0, is_new = 1;
    for (size_t i = 0; i < all.n; i++) {
        if (all.nodes[i]->id == node->id) {
            is_new = 0;
            continue;
        }
        if (strcmp(all.nodes[i]->raft_address, node->raft_address) == 0 ||
            strcmp(all.nodes[i]->client_address, node->client_address) == 0)
            clash = 1;
    }
    size_t count = all.n;
    fsm_nodes_free(&all);
    if (clash)
        return KR_EEXIST; /* another node already has that address */
    if (is_new && count >= FSM_MAX_NODES)
        return KR_ETOOBIG;
    uint8_t key[NODE_KEY_LEN];
    node_key(key, node->id);
    size_t len = keyraft__node_record__get_packed_size(node);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return KR_ENOMEM;
    keyraft__node_record__pack(node, buf);
    store_batch_put(b, STORE_CF_META, key, sizeof(key), buf, len);
    free(buf);
    return 0;
}

static int apply_remove_node(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__RemoveNodeCommand *cmd)
{
    Keyraft__NodeRecord *old = NULL;
    int rv = fsm_get_node(fsm->store, cmd->node_id, &old);
    if (rv != 0)
        return rv;
    if (old->audit_public_key.len > 0) {
        uint8_t rkey[RETIRED_KEY_LEN];
        retired_key(rkey, cmd->node_id);
        rv = fsm__meta_put(b, rkey, sizeof(rkey), &old->base);
    }
    keyraft__node_record__free_unpacked(old, NULL);
    if (rv != 0)
        return rv;
    uint8_t key[NODE_KEY_LEN];
    node_key(key, cmd->node_id);
    store_batch_delete(b, STORE_CF_META, key, sizeof(key));
    return 0;
}

#define DEDUP_WINDOW_PREFIX_LEN (sizeof(DEDUP_PREFIX) - 1 + 8)

/* The start of every row of day |window|: also the bounds of a range. */
static void dedup_window_prefix(uint8_t out[DEDUP_WINDOW_PREFIX_LEN], uint64_t window)
{
    memcpy(out, DEDUP_PREFIX, sizeof(DEDUP_PREFIX) - 1);
    put_u64be(out + sizeof(DEDUP_PREFIX) - 1, window);
}

/* A record's row in window |window| (0: the old layout). Returns its
 * length, 0 when it does not fit. */
static size_t dedup_key(uint8_t *buf, size_t cap, uint64_t window, const char *request_id)
{
    size_t l = strlen(request_id);
    size_t head = window == 0 ? sizeof(DEDUP_LEGACY_PREFIX) - 1 : DEDUP_WINDOW_PREFIX_LEN;
    if (head + l > cap)
        return 0;
    if (window == 0)
        memcpy(buf, DEDUP_LEGACY_PREFIX, head);
    else
        dedup_window_prefix(buf, window);
    memcpy(buf + head, request_id, l);
    return head + l;
}

/* The windows a retry's record may be in, in the order they are looked in:
 * the current one, the one before, then the old layout. */
static size_t dedup_windows(const struct fsm *fsm, uint64_t windows[3])
{
    const struct dedup_window *w = &fsm->dedup;
    size_t n = 0;
    if (w->current > 0)
        windows[n++] = w->current;
    if (w->current > 1)
        windows[n++] = w->current - 1;
    if (w->legacy != 0 || w->current == 0)
        windows[n++] = 0;
    return n;
}

/* A stored record's outcome into |res|: 0, or KR_EIO when it does not parse. */
static int dedup_answer(const uint8_t *val, size_t len, struct fsm_op_result *res)
{
    Keyraft__DedupRecord *d = keyraft__dedup_record__unpack(NULL, len, val);
    if (d == NULL)
        return KR_EIO;
    res->status = d->status;
    snprintf(res->key_id, sizeof(res->key_id), "%s", d->key_id);
    res->index = d->index;
    keyraft__dedup_record__free_unpacked(d, NULL);
    return 0;
}

/* A retried request gets the first attempt's outcome. */
int fsm_find_dedup(struct fsm *fsm, const char *request_id, struct fsm_op_result *res)
{
    uint64_t windows[3];
    size_t n = dedup_windows(fsm, windows);
    for (size_t i = 0; i < n; i++) {
        uint8_t key[DEDUP_KEY_MAX];
        size_t klen = dedup_key(key, sizeof(key), windows[i], request_id);
        if (klen == 0)
            return KR_ENOTFOUND;
        uint8_t *val = NULL;
        size_t len = 0;
        int rv = store_get(fsm->store, STORE_CF_META, key, klen, &val, &len);
        if (rv == KR_ENOTFOUND)
            continue;
        if (rv != 0)
            return rv;
        rv = dedup_answer(val, len, res);
        free(val);
        return rv;
    }
    return KR_ENOTFOUND;
}

static void dedup_record(struct fsm *fsm, struct store_batch *b, const char *request_id,
                         const struct fsm_op_result *res)
{
    uint8_t key[DEDUP_KEY_MAX];
    size_t klen = dedup_key(key, sizeof(key), fsm->dedup.current, request_id);
    if (klen == 0)
        return;
    Keyraft__DedupRecord d = KEYRAFT__DEDUP_RECORD__INIT;
    d.status = res->status;
    d.key_id = (char *)res->key_id;
    d.index = res->index;
    uint8_t buf[128];
    size_t len = keyraft__dedup_record__get_packed_size(&d);
    if (len > sizeof(buf))
        return;
    keyraft__dedup_record__pack(&d, buf);
    store_batch_put(b, STORE_CF_META, key, klen, buf, len);
}

/* Whether the store holds rows of the old layout (the same answer on every
 * replica: they hold the same rows). */
static int legacy_rows_exist(struct store *store, int *out)
{
    struct store_iter *it = NULL;
    int rv = store_iter_new(store, STORE_CF_META, DEDUP_LEGACY_PREFIX,
                            sizeof(DEDUP_LEGACY_PREFIX) - 1, DEDUP_LEGACY_END,
                            sizeof(DEDUP_LEGACY_END) - 1, &it);
    if (rv != 0)
        return rv;
    *out = store_iter_valid(it);
    rv = store_iter_status(it);
    store_iter_free(it);
    return rv;
}

/* Moves the dedup window to the clock of entry |index|, before its first op,
 * in a commit of its own (a replay finds the window already moved). A clock
 * behind the window, or none, moves nothing: records then go to the current
 * window. */
static int dedup_advance(struct fsm *fsm, uint64_t time_ms, uint64_t index)
{
    uint64_t to = time_ms / DEDUP_WINDOW_MS;
    if (to <= fsm->dedup.current)
        return 0;
    struct dedup_window next = {.current = to, .legacy = fsm->dedup.legacy};
    if (fsm->dedup.current == 0) {
        int exist = 0;
        int rv = legacy_rows_exist(fsm->store, &exist);
        if (rv != 0)
            return rv;
        next.legacy = exist ? to : 0;
    }
    struct store_batch *b = store_batch_new();
    if (b == NULL)
        return KR_ENOMEM;
    if (fsm->dedup.current != 0) {
        uint8_t first[DEDUP_WINDOW_PREFIX_LEN], end[DEDUP_WINDOW_PREFIX_LEN];
        dedup_window_prefix(first, 0);
        dedup_window_prefix(end, to - 1);
        store_batch_delete_range(b, STORE_CF_META, first, sizeof(first), end, sizeof(end));
        if (next.legacy != 0 && next.legacy < to - 1) {
            store_batch_delete_range(b, STORE_CF_META, DEDUP_LEGACY_PREFIX,
                                     sizeof(DEDUP_LEGACY_PREFIX) - 1, DEDUP_LEGACY_END,
                                     sizeof(DEDUP_LEGACY_END) - 1);
            next.legacy = 0;
        }
    }
    uint8_t val[16];
    put_u64be(val, next.current);
    put_u64be(val + 8, next.legacy);
    store_batch_put(b, STORE_CF_META, DEDUP_WINDOW_KEY, sizeof(DEDUP_WINDOW_KEY) - 1, val,
                    sizeof(val));
    int rv = store_batch_commit(fsm->store, b, index - 1);
    store_batch_free(b);
    if (rv == 0)
        fsm->dedup = next;
    return rv;
}

/* Commits |b| with the fsm position: ops [0, next) of entry |index| are done.
 * The store's applied index moves only when the entry's last op lands. */
static int commit_through(struct fsm *fsm, struct store_batch *b, uint64_t index, uint32_t next,
                          uint32_t n_ops)
{
    uint8_t pos[12];
    put_u64be(pos, index);
    pos[8] = (uint8_t)(next >> 24);
    pos[9] = (uint8_t)(next >> 16);
    pos[10] = (uint8_t)(next >> 8);
    pos[11] = (uint8_t)next;
    store_batch_put(b, STORE_CF_META, FSM_POS_KEY, sizeof(FSM_POS_KEY) - 1, pos, sizeof(pos));
    int rv = store_batch_commit(fsm->store, b, next == n_ops ? index : index - 1);
    if (rv != 0)
        return rv;
    fsm->pos_index = index;
    fsm->pos_op = next;
    return 0;
}

static int apply_one(struct fsm *fsm, const Keyraft__Command *cmd, uint64_t index,
                     uint32_t op_no, uint32_t n_ops, struct fsm_op_result *res)
{
    res->index = index;
    int duplicate = 0;
    if (cmd->request_id[0] != '\0') {
        int rv = fsm_find_dedup(fsm, cmd->request_id, res);
        if (rv == 0)
            duplicate = 1;
        else if (rv != KR_ENOTFOUND)
            return rv;
    }
    struct store_batch *b = store_batch_new();
    if (b == NULL)
        return KR_ENOMEM;
    int st = 0;
    if (duplicate)
        goto commit; /* only the position moves */
    switch (cmd->op_case) {
    case KEYRAFT__COMMAND__OP_PUT_KEY:
        st = apply_put_key(fsm, NULL, b, cmd->put_key, index, op_no, res);
        break;
    case KEYRAFT__COMMAND__OP_SET_STATE:
        st = apply_set_state(fsm, b, cmd->set_state, index, res);
        break;
    case KEYRAFT__COMMAND__OP_ADD_VERSION:
        st = apply_add_version(fsm, b, cmd->add_version, index, res);
        break;
    case KEYRAFT__COMMAND__OP_DESTROY_KEY:
        st = apply_destroy(fsm, b, cmd->destroy_key, index, res);
        break;
    case KEYRAFT__COMMAND__OP_PUT_DOMAIN:
        st = apply_put_domain(fsm, b, cmd->put_domain);
        break;
    case KEYRAFT__COMMAND__OP_PUT_NODE:
        st = apply_put_node(fsm, b, cmd->put_node);
        break;
    case KEYRAFT__COMMAND__OP_REMOVE_NODE:
        st = apply_remove_node(fsm, b, cmd->remove_node);
        break;
    case KEYRAFT__COMMAND__OP_AUDIT_APPEND:
        st = fsm__apply_audit(fsm, b, cmd->audit_append);
        break;
    case KEYRAFT__COMMAND__OP_PUT_PRINCIPAL:
        st = fsm__apply_put_principal(fsm, b, cmd->put_principal);
        break;
    case KEYRAFT__COMMAND__OP_DESTROY_DOMAIN:
        st = fsm__apply_destroy_domain(fsm, b, cmd->destroy_domain);
        break;
    case KEYRAFT__COMMAND__OP_SET_KEY_POLICY:
        st = fsm__apply_set_key_policy(fsm, b, cmd->set_key_policy, index, res);
        break;
    case KEYRAFT__COMMAND__OP_PUT_GOVERNANCE:
        st = fsm__apply_put_governance(fsm, b, cmd->put_governance);
        break;
    case KEYRAFT__COMMAND__OP_CREATE_APPROVAL:
        st = fsm__apply_create_approval(fsm, b, cmd->create_approval);
        break;
    case KEYRAFT__COMMAND__OP_VOTE_APPROVAL:
        st = fsm__apply_vote_approval(fsm, b, cmd->vote_approval);
        break;
    case KEYRAFT__COMMAND__OP_FINISH_APPROVAL:
        st = fsm__apply_finish_approval(fsm, b, cmd->finish_approval);
        break;
    default:
        st = KR_EPROTO;
        break;
    }
    /* An approved op consumes its approval in the same batch, so it runs
     * once; an approval that is not (or no longer) approved refuses it. */
    if (st == 0 && cmd->approval_id[0] != '\0')
        st = fsm__finish_approval(fsm, b, cmd->approval_id, 0, "");
    if (st == KR_EIO || st == KR_ENOMEM) {
        store_batch_free(b);
        return st; /* local failure: raft retries the entry */
    }
    if (st != 0) {
        /* A rejected op writes nothing but its outcome. */
        store_batch_free(b);
        b = store_batch_new();
        if (b == NULL)
            return KR_ENOMEM;
    }
    res->status = st;
    if (cmd->request_id[0] != '\0')
        dedup_record(fsm, b, cmd->request_id, res);
commit:;
    int rv = commit_through(fsm, b, index, op_no + 1, n_ops);
    store_batch_free(b);
    return rv;
}

static int joins_group(const Keyraft__Command *cmd)
{
    return cmd->op_case == KEYRAFT__COMMAND__OP_PUT_KEY && cmd->approval_id[0] == '\0';
}

static void run_reads_clear(struct run_reads *ra)
{
    size_t n = ra->ready ? ra->end - ra->first : 0;
    store_values_clear(ra->dedup, n * ra->n_windows);
    store_values_clear(ra->name, n);
    store_values_clear(ra->id, n);
    free(ra->dedup);
    free(ra->name);
    free(ra->id);
    *ra = (struct run_reads){0};
}

/* Row keys of one column family to read, each with the slot its answer goes
 * to; the keys are packed in one buffer. */
struct read_set {
    uint8_t *buf;
    size_t used, cap;
    size_t *offs, *lens;
    struct store_value **slots;
    size_t n;
};

static int read_set_init(struct read_set *rs, size_t max_keys)
{
    *rs = (struct read_set){0};
    rs->offs = malloc((max_keys ? max_keys : 1) * sizeof(*rs->offs));
    rs->lens = malloc((max_keys ? max_keys : 1) * sizeof(*rs->lens));
    rs->slots = malloc((max_keys ? max_keys : 1) * sizeof(*rs->slots));
    return rs->offs && rs->lens && rs->slots ? 0 : KR_ENOMEM;
}

static void read_set_free(struct read_set *rs)
{
    free(rs->buf);
    free(rs->offs);
    free(rs->lens);
    free(rs->slots);
}

/* The caller sized the set for every key it adds. */
static int read_set_add(struct read_set *rs, const void *key, size_t len,
                        struct store_value *slot)
{
    if (rs->used + len > rs->cap) {
        size_t cap = rs->cap ? rs->cap : 4096;
        while (cap < rs->used + len)
            cap *= 2;
        uint8_t *buf = realloc(rs->buf, cap);
        if (buf == NULL)
            return KR_ENOMEM;
        rs->buf = buf;
        rs->cap = cap;
    }
    memcpy(rs->buf + rs->used, key, len);
    rs->offs[rs->n] = rs->used;
    rs->lens[rs->n] = len;
    rs->slots[rs->n] = slot;
    rs->used += len;
    rs->n++;
    return 0;
}

static int read_set_run(struct store *store, enum store_cf cf, struct read_set *rs)
{
    if (rs->n == 0)
        return 0;
    const uint8_t **keys = malloc(rs->n * sizeof(*keys));
    struct store_value *out = malloc(rs->n * sizeof(*out));
    int rv = keys && out ? 0 : KR_ENOMEM;
    for (size_t i = 0; rv == 0 && i < rs->n; i++)
        keys[i] = rs->buf + rs->offs[i];
    if (rv == 0)
        rv = store_multi_get(store, cf, rs->n, keys, rs->lens, out);
    for (size_t i = 0; rv == 0 && i < rs->n; i++)
        *rs->slots[i] = out[i]; /* the slot takes the copy */
    free(keys);
    free(out);
    return rv;
}

/* Reads ahead for the run of creates that starts at op |first|. Any failure
 * leaves the run to read op by op, which meets the same failure itself. */
static void run_read_ahead(struct fsm *fsm, struct run_reads *ra,
                           const Keyraft__CommandBatch *batch, uint32_t first)
{
    run_reads_clear(ra);
    uint32_t end = first;
    while (end < batch->n_commands && joins_group(batch->commands[end]))
        end++;
    ra->first = first;
    ra->end = end;
    size_t n = end - first;
    if (n < 2)
        return; /* one create: nothing to share */
    uint64_t windows[3];
    ra->n_windows = dedup_windows(fsm, windows);
    ra->dedup = calloc(n * ra->n_windows, sizeof(*ra->dedup));
    ra->name = calloc(n, sizeof(*ra->name));
    ra->id = calloc(n, sizeof(*ra->id));
    struct read_set dedup, names, ids; /* each initialized before any goto */
    int rv_dedup = read_set_init(&dedup, n * ra->n_windows);
    int rv_names = read_set_init(&names, n);
    int rv_ids = read_set_init(&ids, n);
    int rv = 0;
    if (rv_dedup || rv_names || rv_ids || !ra->dedup || !ra->name || !ra->id) {
        rv = KR_ENOMEM;
        goto out;
    }
    ra->ready = 1; /* from here every slot is cleared by run_reads_clear */
    for (size_t i = 0; i < n * ra->n_windows; i++)
        ra->dedup[i].status = KR_EINVAL;
    for (size_t i = 0; i < n; i++)
        ra->name[i].status = ra->id[i].status = KR_EINVAL;
    for (size_t i = 0; i < n && rv == 0; i++) {
        const Keyraft__Command *cmd = batch->commands[first + i];
        for (size_t w = 0; w < ra->n_windows && cmd->request_id[0] != '\0' && rv == 0; w++) {
            uint8_t key[DEDUP_KEY_MAX];
            size_t klen = dedup_key(key, sizeof(key), windows[w], cmd->request_id);
            if (klen == 0)
                break; /* the slot keeps KR_EINVAL: not found, as fsm_find_dedup says */
            rv = read_set_add(&dedup, key, klen, &ra->dedup[i * ra->n_windows + w]);
        }
        const Keyraft__KeyRecord *rec = cmd->put_key->key;
        if (rec == NULL || rv != 0)
            continue; /* apply_put_key refuses it before reading */
        uint8_t key[1024];
        size_t klen = fsm_name_key(key, sizeof(key), rec->domain, rec->name);
        if (klen > 0) /* else KR_EINVAL, fsm_find_name's answer */
            rv = read_set_add(&names, key, klen, &ra->name[i]);
        if (rv == 0)
            rv = read_set_add(&ids, rec->id, strlen(rec->id), &ra->id[i]);
    }
    if (rv == 0)
        rv = read_set_run(fsm->store, STORE_CF_META, &dedup);
    if (rv == 0)
        rv = read_set_run(fsm->store, STORE_CF_NAMES, &names);
    if (rv == 0)
        rv = read_set_run(fsm->store, STORE_CF_KEYS, &ids);
out:
    read_set_free(&dedup);
    read_set_free(&names);
    read_set_free(&ids);
    if (rv != 0 || !ra->ready) {
        run_reads_clear(ra);
        ra->first = first; /* the run stays marked: its ops read one by one */
        ra->end = end;
    }
}

/* A retry's outcome from the run's reads: fsm_find_dedup's answer. */
static int dedup_from_reads(const struct run_reads *ra, uint32_t op, struct fsm_op_result *res)
{
    const struct store_value *v = &ra->dedup[(size_t)(op - ra->first) * ra->n_windows];
    for (size_t w = 0; w < ra->n_windows; w++) {
        if (v[w].status == KR_EINVAL)
            return KR_ENOTFOUND; /* no row of this window fits the id */
        if (v[w].status == KR_ENOTFOUND)
            continue;
        if (v[w].status != 0)
            return v[w].status;
        return dedup_answer(v[w].data, v[w].len, res);
    }
    return KR_ENOTFOUND;
}

/* A create joins the current group: only its outcome is known until the
 * group commits. */
static int group_put_key(struct fsm *fsm, struct put_group *g, const Keyraft__Command *cmd,
                         uint64_t index, uint32_t op_no, struct fsm_result *result)
{
    struct fsm_op_result *res = &result->ops[op_no];
    res->index = index;
    if (g->b == NULL && (g->b = store_batch_new()) == NULL)
        return KR_ENOMEM;
    if (cmd->request_id[0] != '\0') {
        const struct group_slot *same = group_find(g, 'R', cmd->request_id, "");
        if (same != NULL) {
            *res = result->ops[same->op]; /* a retry inside the same entry */
            goto done;
        }
        const struct run_reads *ra = reads_for(g, op_no);
        int rv = ra != NULL ? dedup_from_reads(ra, op_no, res)
                            : fsm_find_dedup(fsm, cmd->request_id, res);
        if (rv == 0)
            goto done;
        if (rv != KR_ENOTFOUND)
            return rv;
    }
    int st = apply_put_key(fsm, g, g->b, cmd->put_key, index, op_no, res);
    if (st == KR_EIO || st == KR_ENOMEM)
        return st; /* local failure: raft retries the entry */
    res->status = st; /* a refused create wrote nothing */
    if (cmd->request_id[0] != '\0') {
        dedup_record(fsm, g->b, cmd->request_id, res);
        if (group_add(g, 'R', cmd->request_id, "", op_no) != 0)
            return KR_ENOMEM;
    }
done:
    g->n_ops++;
    g->next_op = op_no + 1;
    return 0;
}

static int group_commit(struct fsm *fsm, struct put_group *g, uint64_t index, uint32_t n_ops)
{
    if (g->n_ops == 0)
        return 0;
    int rv = commit_through(fsm, g->b, index, g->next_op, n_ops);
    store_batch_free(g->b);
    g->b = NULL;
    g->n_ops = 0;
    g->used = 0;
    if (g->slots != NULL)
        memset(g->slots, 0, g->cap * sizeof(*g->slots));
    g->live_domain = NULL;
    return rv;
}

int fsm_apply(struct fsm *fsm, const uint8_t *buf, size_t len, struct fsm_result **out_result)
{
    uint64_t index = fsm->next_index(fsm->arg);
    *out_result = NULL;
    if (index <= store_applied_index(fsm->store))
        return 0; /* replay of an entry the store already holds */
    /* The previous entry's commands go: nothing applied keeps a pointer
     * into them (results hold copies). */
    pb_arena_reset(fsm->decode_arena);
    Keyraft__CommandBatch *batch = NULL;
    int rv = command_entry_decode_in(fsm->decode_arena, buf, len, &batch);
    if (rv == KR_ENOMEM) {
        /* This node's shortage, not the entry's fault: raft applies it again. */
        log_error("entry %llu: out of memory decoding %zu bytes", (unsigned long long)index, len);
        return rv;
    }
    if (rv != 0) {
        /* Every node rejects the same bytes the same way: skip it, loudly. */
        log_error("entry %llu: undecodable command batch (%zu bytes): %s",
                  (unsigned long long)index, len, kr_strerror(rv));
        struct store_batch *b = store_batch_new();
        if (b == NULL)
            return KR_ENOMEM;
        rv = store_batch_commit(fsm->store, b, index);
        store_batch_free(b);
        return rv;
    }
    rv = dedup_advance(fsm, batch->time_ms, index);
    if (rv != 0) {
        log_error("entry %llu: moving the dedup window failed: %s", (unsigned long long)index,
                  kr_strerror(rv));
        return rv;
    }
    size_t n = batch->n_commands;
    struct fsm_result *result = calloc(1, sizeof(*result) + n * sizeof(result->ops[0]));
    if (result == NULL)
        return KR_ENOMEM;
    result->index = index;
    result->n = n;
    uint32_t first = (fsm->pos_index == index) ? fsm->pos_op : 0;
    struct put_group group = {0};
    for (uint32_t i = 0; i < n && rv == 0; i++) {
        const Keyraft__Command *cmd = batch->commands[i];
        if (i < first) {
            result->ops[i].status = KR_EUNAVAIL; /* applied before a crash; outcome lost */
            continue;
        }
        if (joins_group(cmd)) {
            if (i >= group.reads.end)
                run_read_ahead(fsm, &group.reads, batch, i);
            rv = group_put_key(fsm, &group, cmd, index, i, result);
        } else {
            rv = group_commit(fsm, &group, index, (uint32_t)n);
            if (rv == 0)
                rv = apply_one(fsm, cmd, index, i, (uint32_t)n, &result->ops[i]);
        }
        if (rv != 0)
            log_error("entry %llu op %u (%s): store failed: %s", (unsigned long long)index, i,
                      command_op_name(cmd), kr_strerror(rv));
    }
    if (rv == 0 && (rv = group_commit(fsm, &group, index, (uint32_t)n)) != 0)
        log_error("entry %llu: store failed: %s", (unsigned long long)index, kr_strerror(rv));
    store_batch_free(group.b);
    free(group.slots);
    run_reads_clear(&group.reads);
    if (rv != 0) {
        free(result);
        return rv;
    }
    free(fsm->last_result);
    fsm->last_result = result;
    *out_result = result;
    return 0;
}
