/* test_audit.c: the audit chain against a real store and a real SoftHSM
 * token: apply and dedup, usage counters, readers, verify and tampering,
 * checkpoints; the recorder against an endpoint where nothing listens and
 * against a scripted TLS peer standing in for the leader. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ftw.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "command.h"
#include "fsm.h"
#include "hsm.h"
#include "keyraft.h"
#include "pki.h"
#include "store.h"

#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define TOKEN "kr-test-audit"
#define SO_PIN "so-pin-0000"
#define PIN "user-pin-1234"

static char tokdir[64];

struct fx {
    char dir[64];
    char db[96];
    struct store *store;
    uint64_t index; /* raft index of the last commit */
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tokdir, sizeof(tokdir), "/tmp/kr-test-audit-tok-XXXXXX");
    if (mkdtemp(tokdir) == NULL)
        return -1;
    char path[256];
    snprintf(path, sizeof(path), "%s/tokens", tokdir);
    if (mkdir(path, 0700) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s/softhsm2.conf", tokdir);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokdir);
    fclose(f);
    setenv("SOFTHSM2_CONF", path, 1);
    return hsm_init_token(MODULE, TOKEN, SO_PIN, PIN) == 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    return nftw(tokdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-audit-XXXXXX");
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    snprintf(f->db, sizeof(f->db), "%s/db", f->dir);
    if (store_open(f->db, &f->store) != 0) {
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    store_close(f->store);
    int rc = nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return rc;
}

static struct hsm *open_hsm(const char *mwk_label)
{
    struct hsm_config cfg = {MODULE, TOKEN, PIN, mwk_label};
    struct hsm *hsm = NULL;
    assert_int_equal(hsm_open(&cfg, &hsm), 0);
    assert_int_equal(hsm_audit_key_ensure(hsm), 0);
    return hsm;
}

static void put_u64be(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* --- records and batches ------------------------------------------------------------ */

struct rec {
    uint8_t *data;
    size_t len;
};

static struct rec make_record(const char *principal, const char *op, const char *key_id,
                              int32_t status, uint64_t time_ms)
{
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.time_ms = time_ms;
    r.node_id = 1;
    r.principal = (char *)principal;
    r.operation = (char *)op;
    r.key_id = (char *)key_id;
    r.status = status;
    struct rec out;
    out.len = keyraft__audit_record__get_packed_size(&r);
    out.data = malloc(out.len);
    assert_non_null(out.data);
    keyraft__audit_record__pack(&r, out.data);
    return out;
}

static struct rec copy_rec(const uint8_t *p, size_t len)
{
    struct rec out = {malloc(len ? len : 1), len};
    assert_non_null(out.data);
    memcpy(out.data, p, len);
    return out;
}

/* Applies one batch the way the FSM does: its own store batch, committed
 * with the next raft index. */
/* Applies a batch as the FSM would; |want| is audit_fsm_apply's result
 * (the batch commits either way, as a rejected op's position does). */
static void apply_want(struct fx *f, uint64_t node, uint64_t boot, uint64_t seq,
                       struct rec *recs, size_t n, Keyraft__UsageDelta **usage, size_t n_usage,
                       int want);

static void apply(struct fx *f, uint64_t node, uint64_t boot, uint64_t seq, struct rec *recs,
                  size_t n, Keyraft__UsageDelta **usage, size_t n_usage)
{
    apply_want(f, node, boot, seq, recs, n, usage, n_usage, 0);
}

static void apply_want(struct fx *f, uint64_t node, uint64_t boot, uint64_t seq,
                       struct rec *recs, size_t n, Keyraft__UsageDelta **usage, size_t n_usage,
                       int want)
{
    ProtobufCBinaryData *bin = calloc(n ? n : 1, sizeof(*bin));
    assert_non_null(bin);
    for (size_t i = 0; i < n; i++) {
        bin[i].data = recs[i].data;
        bin[i].len = recs[i].len;
    }
    Keyraft__AuditSubmitRequest req = KEYRAFT__AUDIT_SUBMIT_REQUEST__INIT;
    req.node_id = node;
    req.boot_id = boot;
    req.batch_seq = seq;
    req.n_records = n;
    req.records = bin;
    req.n_usage = n_usage;
    req.usage = usage;
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    int rv = audit_fsm_apply(f->store, b, &req);
    assert_int_equal(rv, want);
    if (rv != 0) { /* a refused batch writes nothing */
        store_batch_free(b);
        b = store_batch_new();
        assert_non_null(b);
    }
    assert_int_equal(store_batch_commit(f->store, b, ++f->index), 0);
    store_batch_free(b);
    free(bin);
}

static void free_recs(struct rec *recs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(recs[i].data);
}

/* |n| ordinary records in one batch. */
static void apply_plain(struct fx *f, uint64_t node, uint64_t boot, uint64_t seq, size_t n,
                        uint64_t t0)
{
    struct rec *recs = calloc(n, sizeof(*recs));
    assert_non_null(recs);
    for (size_t i = 0; i < n; i++)
        recs[i] = make_record(i % 2 ? "bob" : "alice", "encrypt", "k1", 0, t0 + i);
    apply(f, node, boot, seq, recs, n, NULL, 0);
    free_recs(recs, n);
    free(recs);
}

static Keyraft__AuditEntry *get_entry(struct fx *f, uint64_t seq)
{
    uint8_t key[8];
    put_u64be(key, seq);
    uint8_t *val = NULL;
    size_t len = 0;
    if (store_get(f->store, STORE_CF_AUDIT, key, sizeof(key), &val, &len) != 0)
        return NULL;
    Keyraft__AuditEntry *e = keyraft__audit_entry__unpack(NULL, len, val);
    free(val);
    assert_non_null(e);
    return e;
}

static void put_entry(struct fx *f, const Keyraft__AuditEntry *e, uint64_t at)
{
    size_t len = keyraft__audit_entry__get_packed_size(e);
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    keyraft__audit_entry__pack(e, buf);
    uint8_t key[8];
    put_u64be(key, at);
    struct store_batch *b = store_batch_new();
    store_batch_put(b, STORE_CF_AUDIT, key, sizeof(key), buf, len);
    assert_int_equal(store_batch_commit(f->store, b, ++f->index), 0);
    store_batch_free(b);
    free(buf);
}

static void delete_entry(struct fx *f, uint64_t seq)
{
    uint8_t key[8];
    put_u64be(key, seq);
    struct store_batch *b = store_batch_new();
    store_batch_delete(b, STORE_CF_AUDIT, key, sizeof(key));
    assert_int_equal(store_batch_commit(f->store, b, ++f->index), 0);
    store_batch_free(b);
}

static void set_head(struct fx *f, uint64_t seq, const uint8_t hash[32])
{
    Keyraft__AuditHeadRecord h = KEYRAFT__AUDIT_HEAD_RECORD__INIT;
    h.seq = seq;
    h.hash.data = (uint8_t *)hash;
    h.hash.len = 32;
    uint8_t buf[64];
    size_t len = keyraft__audit_head_record__pack(&h, buf);
    struct store_batch *b = store_batch_new();
    store_batch_put(b, STORE_CF_META, "audit_head", 10, buf, len);
    assert_int_equal(store_batch_commit(f->store, b, ++f->index), 0);
    store_batch_free(b);
}

/* The chain hash, written here independently of audit.c. */
static void ref_hash(uint64_t seq, const uint8_t prev[32], const uint8_t *rec, size_t len,
                     uint8_t out[32])
{
    uint8_t seq_be[8];
    put_u64be(seq_be, seq);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    assert_non_null(ctx);
    assert_int_equal(EVP_DigestInit_ex(ctx, EVP_sha256(), NULL), 1);
    EVP_DigestUpdate(ctx, "KRA1", 4);
    EVP_DigestUpdate(ctx, seq_be, 8);
    EVP_DigestUpdate(ctx, prev, 32);
    EVP_DigestUpdate(ctx, rec, len);
    unsigned int n = 0;
    assert_int_equal(EVP_DigestFinal_ex(ctx, out, &n), 1);
    EVP_MD_CTX_free(ctx);
}

/* Walks entries 1..head with the reference hash; returns the head hash. */
static void ref_chain(struct fx *f, uint64_t head, uint8_t out[32])
{
    uint8_t prev[32] = {0};
    for (uint64_t s = 1; s <= head; s++) {
        Keyraft__AuditEntry *e = get_entry(f, s);
        assert_non_null(e);
        assert_int_equal(e->seq, s);
        assert_int_equal(e->prev_hash.len, 32);
        assert_memory_equal(e->prev_hash.data, prev, 32);
        ref_hash(s, prev, e->record.data, e->record.len, prev);
        assert_memory_equal(e->hash.data, prev, 32);
        keyraft__audit_entry__free_unpacked(e, NULL);
    }
    memcpy(out, prev, 32);
}

static void verify(struct fx *f, const uint8_t *spki, size_t spki_len,
                   Keyraft__AuditVerifyResponse *out)
{
    assert_int_equal(audit_verify(f->store, spki, spki_len, out), 0);
}

static void expect_bad(struct fx *f, const uint8_t *spki, size_t spki_len, uint64_t seq,
                       const char *words)
{
    Keyraft__AuditVerifyResponse v;
    verify(f, spki, spki_len, &v);
    if (v.ok || v.first_bad_seq != seq || strstr(v.problem, words) == NULL)
        fail_msg("verify: ok %d, first_bad_seq %llu, problem \"%s\"; expected record %llu, "
                 "\"%s\"",
                 v.ok, (unsigned long long)v.first_bad_seq, v.problem, (unsigned long long)seq,
                 words);
    audit_verify_clear(&v);
}

static void expect_ok(struct fx *f, const uint8_t *spki, size_t spki_len, uint64_t records,
                      uint64_t checkpoints)
{
    Keyraft__AuditVerifyResponse v;
    verify(f, spki, spki_len, &v);
    if (!v.ok)
        fail_msg("verify failed at %llu: %s", (unsigned long long)v.first_bad_seq, v.problem);
    assert_int_equal(v.records, records);
    assert_int_equal(v.checkpoints, checkpoints);
    assert_int_equal(v.first_bad_seq, 0);
    audit_verify_clear(&v);
}

/* --- apply ------------------------------------------------------------------------------ */

static void test_apply_chains_and_dedups(void **state)
{
    struct fx *f = *state;
    uint64_t seq = 99;
    uint8_t hash[32], want[32];
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 0);
    uint8_t zero[32] = {0};
    assert_memory_equal(hash, zero, 32);

    struct rec a[3] = {make_record("alice", "encrypt", "k1", 0, 1000),
                       make_record("bob", "decrypt", "k2", KR_EPERM, 1001),
                       make_record("carol", "create", "", 0, 1002)};
    apply(f, 1, 100, 1, a, 3, NULL, 0);
    struct rec b[2] = {make_record("dave", "get", "k3", 0, 2000),
                       make_record("erin", "list", "", 0, 2001)};
    apply(f, 2, 50, 1, b, 2, NULL, 0);
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 5);
    ref_chain(f, 5, want);
    assert_memory_equal(hash, want, 32);
    /* Records in batch order, byte for byte. */
    struct rec *all[5] = {&a[0], &a[1], &a[2], &b[0], &b[1]};
    for (uint64_t s = 1; s <= 5; s++) {
        Keyraft__AuditEntry *e = get_entry(f, s);
        assert_int_equal(e->record.len, all[s - 1]->len);
        assert_memory_equal(e->record.data, all[s - 1]->data, e->record.len);
        keyraft__audit_entry__free_unpacked(e, NULL);
    }

    /* The same batch again, an old seq: nothing moves; an older boot (the
     * node's clock went back) is refused, not skipped unseen. */
    apply(f, 1, 100, 1, a, 3, NULL, 0);
    apply_want(f, 1, 99, 7, a, 1, NULL, 0, KR_ESTATE);
    apply(f, 2, 50, 1, b, 2, NULL, 0);
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 5);
    assert_memory_equal(hash, want, 32);
    assert_null(get_entry(f, 6));

    /* The next seq of the same boot applies; a newer boot starts at 1. */
    apply(f, 1, 100, 2, b, 1, NULL, 0);
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 6);
    apply(f, 1, 101, 1, a, 2, NULL, 0);
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 8);
    /* ... and the old boot is now past. */
    apply_want(f, 1, 100, 3, a, 1, NULL, 0, KR_ESTATE);
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 8);
    ref_chain(f, 8, want);
    assert_memory_equal(hash, want, 32);
    expect_ok(f, NULL, 0, 8, 0);
    free_recs(a, 3);
    free_recs(b, 2);
}

/* Two batches of one raft entry are two calls with two store batches. */
static void test_apply_two_batches_in_one_entry(void **state)
{
    struct fx *f = *state;
    struct rec a = make_record("alice", "encrypt", "k1", 0, 1);
    struct rec b = make_record("bob", "encrypt", "k1", 0, 2);
    ProtobufCBinaryData ba = {a.len, a.data}, bb = {b.len, b.data};
    Keyraft__AuditSubmitRequest r1 = KEYRAFT__AUDIT_SUBMIT_REQUEST__INIT;
    r1.node_id = 1;
    r1.boot_id = 1;
    r1.batch_seq = 1;
    r1.n_records = 1;
    r1.records = &ba;
    Keyraft__AuditSubmitRequest r2 = r1;
    r2.node_id = 2;
    r2.records = &bb;
    f->index++;
    struct store_batch *s1 = store_batch_new();
    assert_int_equal(audit_fsm_apply(f->store, s1, &r1), 0);
    assert_int_equal(store_batch_commit(f->store, s1, f->index - 1), 0);
    struct store_batch *s2 = store_batch_new();
    assert_int_equal(audit_fsm_apply(f->store, s2, &r2), 0);
    assert_int_equal(store_batch_commit(f->store, s2, f->index), 0);
    store_batch_free(s1);
    store_batch_free(s2);
    uint64_t seq = 0;
    uint8_t hash[32], want[32];
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 2);
    ref_chain(f, 2, want);
    assert_memory_equal(hash, want, 32);
    free(a.data);
    free(b.data);
}

static void test_apply_odd_records(void **state)
{
    struct fx *f = *state;
    /* Bytes that are not an AuditRecord are chained as they are. */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0x07, 0x01};
    struct rec recs[3];
    recs[0] = copy_rec(junk, sizeof(junk));
    /* Too large, decodable: a short record keeps who and what. */
    char *big = malloc(AUDIT_MAX_RECORD_BYTES + 100);
    memset(big, 'x', AUDIT_MAX_RECORD_BYTES + 99);
    big[AUDIT_MAX_RECORD_BYTES + 99] = '\0';
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    r.principal = "alice";
    r.operation = "encrypt";
    r.status = KR_EPERM;
    r.message = big;
    recs[1].len = keyraft__audit_record__get_packed_size(&r);
    recs[1].data = malloc(recs[1].len);
    keyraft__audit_record__pack(&r, recs[1].data);
    size_t big_len = recs[1].len;
    /* Too large with a huge principal (cut) ... */
    r.principal = big;
    r.message = "";
    recs[2].len = keyraft__audit_record__get_packed_size(&r);
    recs[2].data = malloc(recs[2].len);
    keyraft__audit_record__pack(&r, recs[2].data);
    apply(f, 1, 1, 1, recs, 3, NULL, 0);

    Keyraft__AuditEntry *e = get_entry(f, 1);
    assert_int_equal(e->record.len, sizeof(junk));
    assert_memory_equal(e->record.data, junk, sizeof(junk));
    keyraft__audit_entry__free_unpacked(e, NULL);

    e = get_entry(f, 2);
    assert_true(e->record.len < 512);
    Keyraft__AuditRecord *got = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    assert_non_null(got);
    assert_string_equal(got->principal, "alice");
    assert_string_equal(got->operation, "encrypt");
    assert_int_equal(got->status, KR_EPERM);
    char want[64];
    snprintf(want, sizeof(want), "record of %zu bytes too large", big_len);
    assert_non_null(strstr(got->message, want));
    keyraft__audit_record__free_unpacked(got, NULL);
    keyraft__audit_entry__free_unpacked(e, NULL);

    e = get_entry(f, 3);
    got = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    assert_non_null(got);
    assert_int_equal(strlen(got->principal), 256);
    keyraft__audit_record__free_unpacked(got, NULL);
    keyraft__audit_entry__free_unpacked(e, NULL);

    /* Undecodable is not tampering; readers show it only unfiltered. */
    expect_ok(f, NULL, 0, 3, 0);
    Keyraft__AuditReadRequest rq = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    Keyraft__AuditReadResponse *resp = NULL;
    assert_int_equal(audit_read(f->store, &rq, 100, &resp), 0);
    assert_int_equal(resp->n_entries, 3);
    audit_read_free(resp);
    rq.principal = "alice";
    assert_int_equal(audit_read(f->store, &rq, 100, &resp), 0);
    assert_int_equal(resp->n_entries, 1);
    assert_int_equal(resp->entries[0]->seq, 2);
    audit_read_free(resp);
    free_recs(recs, 3);
    free(big);
}

/* --- usage ----------------------------------------------------------------------------- */

static Keyraft__UsageDelta *delta(Keyraft__UsageDelta *d, const char *key, uint32_t v, uint64_t n)
{
    keyraft__usage_delta__init(d);
    d->key_id = (char *)key;
    d->version = v;
    d->count = n;
    return d;
}

static uint64_t usage(struct fx *f, const char *key, uint32_t v)
{
    uint64_t n = 12345;
    assert_int_equal(audit_usage_get(f->store, key, v, &n), 0);
    return n;
}

static void test_usage_counts(void **state)
{
    struct fx *f = *state;
    char long_id[80];
    memset(long_id, 'a', 65);
    long_id[65] = '\0';
    Keyraft__UsageDelta d[8];
    Keyraft__UsageDelta *p[8];
    for (int i = 0; i < 8; i++)
        p[i] = &d[i];
    delta(&d[0], "k1", 1, 5);
    delta(&d[1], "k2", 1, 7);
    delta(&d[2], "k1", 1, 3); /* the same version twice in a batch: summed */
    delta(&d[3], "k1", 2, 1);
    delta(&d[4], long_id, 1, 9); /* ignored */
    delta(&d[5], "", 1, 9);      /* ignored */
    apply(f, 1, 10, 1, NULL, 0, p, 6);
    assert_int_equal(usage(f, "k1", 1), 8);
    assert_int_equal(usage(f, "k2", 1), 7);
    assert_int_equal(usage(f, "k1", 2), 1);
    assert_int_equal(usage(f, "k3", 1), 0);
    long_id[64] = '\0'; /* 64 is still fine to ask about */
    assert_int_equal(usage(f, long_id, 1), 0);

    /* Across batches and nodes; a resent batch counts once. */
    delta(&d[0], "k1", 1, 10);
    apply(f, 2, 10, 1, NULL, 0, p, 1);
    apply(f, 2, 10, 1, NULL, 0, p, 1);
    apply(f, 1, 10, 2, NULL, 0, p, 1);
    assert_int_equal(usage(f, "k1", 1), 28);
    /* A batch without records leaves the chain alone. */
    uint64_t seq = 1;
    uint8_t hash[32];
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(seq, 0);

    /* Saturating. */
    delta(&d[0], "k9", 1, UINT64_MAX - 1);
    delta(&d[1], "k9", 1, 5);
    apply(f, 3, 1, 1, NULL, 0, p, 2);
    assert_int_equal(usage(f, "k9", 1), UINT64_MAX);
    apply(f, 3, 1, 2, NULL, 0, p, 1);
    assert_int_equal(usage(f, "k9", 1), UINT64_MAX);
}

/* --- read ----------------------------------------------------------------------------- */

/* 100 records: principal alice/bob alternating, ops encrypt/decrypt/get by
 * i % 3, key kN by i % 4, every 10th denied, time 1000 + i; seq = i + 1. */
static void fill_read_log(struct fx *f)
{
    static const char *const ops[] = {"encrypt", "decrypt", "get"};
    static const char *const keys[] = {"k0", "k1", "k2", "k3"};
    struct rec recs[100];
    for (int i = 0; i < 100; i++)
        recs[i] = make_record(i % 2 ? "bob" : "alice", ops[i % 3], keys[i % 4],
                              i % 10 == 0 ? KR_EPERM : 0, 1000 + (uint64_t)i);
    apply(f, 1, 1, 1, recs, 60, NULL, 0);
    apply(f, 1, 1, 2, recs + 60, 40, NULL, 0);
    free_recs(recs, 100);
}

static Keyraft__AuditReadResponse *read_ok(struct fx *f, const Keyraft__AuditReadRequest *rq,
                                           uint32_t cap)
{
    Keyraft__AuditReadResponse *resp = NULL;
    assert_int_equal(audit_read(f->store, rq, cap, &resp), 0);
    assert_non_null(resp);
    return resp;
}

static void test_read_filters(void **state)
{
    struct fx *f = *state;
    fill_read_log(f);
    Keyraft__AuditReadRequest rq = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    Keyraft__AuditReadResponse *r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 100);
    assert_int_equal(r->head_seq, 100);
    assert_int_equal(r->next_after, 0);
    for (size_t i = 0; i < 100; i++)
        assert_int_equal(r->entries[i]->seq, i + 1);
    audit_read_free(r);

    rq.principal = "bob";
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 50);
    for (size_t i = 0; i < r->n_entries; i++)
        assert_int_equal(r->entries[i]->seq % 2, 0); /* i odd -> seq even */
    audit_read_free(r);

    rq.principal = "";
    rq.denied_only = 1;
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 10);
    assert_int_equal(r->entries[3]->seq, 31);
    audit_read_free(r);

    rq.denied_only = 0;
    rq.key_id = "k2";
    rq.operation = "get";
    r = read_ok(f, &rq, 1000); /* i % 4 == 2 and i % 3 == 2: i = 2, 14, 26, ... */
    assert_int_equal(r->n_entries, 9);
    assert_int_equal(r->entries[0]->seq, 3);
    assert_int_equal(r->entries[1]->seq, 15);
    audit_read_free(r);

    rq.key_id = "";
    rq.operation = "";
    rq.since_ms = 1010;
    rq.until_ms = 1020; /* [since, until) */
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 10);
    assert_int_equal(r->entries[0]->seq, 11);
    assert_int_equal(r->entries[9]->seq, 20);
    audit_read_free(r);
}

static void test_read_paging_and_tail(void **state)
{
    struct fx *f = *state;
    fill_read_log(f);
    Keyraft__AuditReadRequest rq = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    /* Pages of 30, then the cap of 25 wins over a larger limit. */
    rq.limit = 30;
    uint64_t seen = 0, pages = 0;
    for (;;) {
        Keyraft__AuditReadResponse *r = read_ok(f, &rq, 1000);
        for (size_t i = 0; i < r->n_entries; i++)
            assert_int_equal(r->entries[i]->seq, ++seen);
        pages++;
        uint64_t next = r->next_after;
        audit_read_free(r);
        if (next == 0)
            break;
        assert_int_equal(next, seen);
        rq.after_seq = next;
        assert_true(pages < 10);
    }
    assert_int_equal(seen, 100);
    assert_int_equal(pages, 4);
    rq.after_seq = 0;
    rq.limit = 0;
    Keyraft__AuditReadResponse *r = read_ok(f, &rq, 25);
    assert_int_equal(r->n_entries, 25);
    assert_int_equal(r->next_after, 25);
    audit_read_free(r);

    /* Tail: the last |limit|, oldest first; filtered; bounded by after_seq. */
    rq.tail = 1;
    rq.limit = 5;
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 5);
    assert_int_equal(r->entries[0]->seq, 96);
    assert_int_equal(r->entries[4]->seq, 100);
    assert_int_equal(r->next_after, 0);
    audit_read_free(r);
    rq.denied_only = 1;
    rq.limit = 3;
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 3);
    assert_int_equal(r->entries[0]->seq, 71);
    assert_int_equal(r->entries[2]->seq, 91);
    audit_read_free(r);
    rq.after_seq = 80;
    rq.limit = 10;
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 2);
    assert_int_equal(r->entries[0]->seq, 81);
    audit_read_free(r);
    rq.limit = 0;
    rq.after_seq = 0;
    r = read_ok(f, &rq, 4); /* limit 0: the cap */
    assert_int_equal(r->n_entries, 4);
    assert_int_equal(r->entries[0]->seq, 61);
    audit_read_free(r);
    Keyraft__AuditReadResponse *none = NULL;
    assert_int_equal(audit_read(f->store, &rq, 0, &none), KR_EINVAL);
}

/* One request examines at most cap * 50 + 10000 entries, then hands back
 * where to continue. */
static void test_read_scan_bound(void **state)
{
    struct fx *f = *state;
    size_t filler = 10100;
    uint64_t bseq = 0;
    for (size_t done = 0; done < filler;) {
        size_t n = filler - done < 4096 ? filler - done : 4096;
        apply_plain(f, 1, 1, ++bseq, n, done);
        done += n;
    }
    struct rec needle = make_record("needle", "encrypt", "k1", 0, 5);
    apply(f, 1, 1, ++bseq, &needle, 1, NULL, 0);
    free(needle.data);

    Keyraft__AuditReadRequest rq = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    rq.principal = "needle";
    rq.limit = 1;
    Keyraft__AuditReadResponse *r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 0);
    assert_int_equal(r->next_after, 1 * 50 + 10000);
    assert_int_equal(r->head_seq, filler + 1);
    rq.after_seq = r->next_after;
    audit_read_free(r);
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 1);
    assert_int_equal(r->entries[0]->seq, filler + 1);
    assert_int_equal(r->next_after, 0);
    audit_read_free(r);

    /* The tail looks back no further than the bound either. */
    rq.after_seq = 0;
    rq.tail = 1;
    rq.principal = "alice";
    rq.limit = 1;
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 1);
    assert_int_equal(r->entries[0]->seq, filler - 1);
    audit_read_free(r);
    rq.principal = "nobody";
    r = read_ok(f, &rq, 1000);
    assert_int_equal(r->n_entries, 0);
    audit_read_free(r);
}

/* --- verify and checkpoints ------------------------------------------------------------ */

struct keys {
    struct hsm *own, *other;
    uint8_t *own_spki, *other_spki;
    size_t own_len, other_len;
};

static void keys_open(struct keys *k)
{
    k->own = open_hsm("mwk-own");
    k->other = open_hsm("mwk-other");
    assert_int_equal(hsm_audit_public_key(k->own, &k->own_spki, &k->own_len), 0);
    assert_int_equal(hsm_audit_public_key(k->other, &k->other_spki, &k->other_len), 0);
}

static void keys_close(struct keys *k)
{
    hsm_close(k->own);
    hsm_close(k->other);
    free(k->own_spki);
    free(k->other_spki);
}

/* Appends a checkpoint over the current head made with |hsm|. */
static uint64_t add_checkpoint(struct fx *f, struct hsm *hsm, uint64_t node, uint64_t bseq)
{
    uint8_t *cp = NULL;
    size_t len = 0;
    assert_int_equal(audit_make_checkpoint(f->store, hsm, node, 777, &cp, &len), 0);
    struct rec r = {cp, len};
    apply(f, 100 + node, 1, bseq, &r, 1, NULL, 0); /* a source of its own */
    free(cp);
    uint64_t seq = 0;
    uint8_t hash[32];
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    return seq;
}

/* 1..10 plain, 11 checkpoint over 10, 12..20 plain, 21 checkpoint over 20,
 * 22..25 plain. */
static void fill_with_checkpoints(struct fx *f, struct keys *k)
{
    apply_plain(f, 1, 1, 1, 10, 100);
    assert_int_equal(add_checkpoint(f, k->own, 1, 1), 11);
    apply_plain(f, 1, 1, 2, 9, 200);
    assert_int_equal(add_checkpoint(f, k->own, 1, 2), 21);
    apply_plain(f, 1, 1, 3, 4, 300);
}

static void register_node(struct fx *f, uint64_t id, const uint8_t *spki, size_t len);

static void test_checkpoint_record(void **state)
{
    struct fx *f = *state;
    struct keys k;
    keys_open(&k);
    uint8_t *cp = NULL;
    size_t len = 0;
    assert_int_equal(audit_make_checkpoint(f->store, k.own, 1, 5, &cp, &len), KR_ENOTFOUND);
    apply_plain(f, 1, 1, 1, 3, 0);
    assert_int_equal(audit_make_checkpoint(f->store, k.own, 4, 5, &cp, &len), 0);
    Keyraft__AuditRecord *r = keyraft__audit_record__unpack(NULL, len, cp);
    assert_non_null(r);
    assert_string_equal(r->operation, "audit_checkpoint");
    assert_int_equal(r->time_ms, 5);
    assert_int_equal(r->node_id, 4);
    assert_int_equal(r->status, 0);
    assert_non_null(r->checkpoint);
    assert_int_equal(r->checkpoint->seq, 3);
    assert_int_equal(r->checkpoint->node_id, 4);
    uint64_t seq = 0;
    uint8_t hash[32];
    assert_int_equal(audit_head(f->store, &seq, hash), 0);
    assert_int_equal(r->checkpoint->hash.len, 32);
    assert_memory_equal(r->checkpoint->hash.data, hash, 32);
    assert_int_equal(r->checkpoint->public_key.len, k.own_len);
    assert_memory_equal(r->checkpoint->public_key.data, k.own_spki, k.own_len);
    /* The signature is over SHA-256("keyraft-audit-checkpoint" | seq | hash). */
    uint8_t msg[24 + 8 + 32], digest[32];
    memcpy(msg, "keyraft-audit-checkpoint", 24);
    put_u64be(msg + 24, 3);
    memcpy(msg + 32, hash, 32);
    unsigned int dl = 0;
    assert_int_equal(EVP_Digest(msg, sizeof(msg), digest, &dl, EVP_sha256(), NULL), 1);
    const unsigned char *p = k.own_spki;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)k.own_len);
    assert_non_null(pkey);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    assert_int_equal(EVP_PKEY_verify_init(ctx), 1);
    assert_int_equal(EVP_PKEY_verify(ctx, r->checkpoint->signature.data,
                                     r->checkpoint->signature.len, digest, 32),
                     1);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(pkey);
    keyraft__audit_record__free_unpacked(r, NULL);
    free(cp);
    keys_close(&k);
}

static void test_verify_clean(void **state)
{
    struct fx *f = *state;
    struct keys k;
    keys_open(&k);
    expect_ok(f, k.own_spki, k.own_len, 0, 0); /* empty */
    fill_with_checkpoints(f, &k);
    Keyraft__AuditVerifyResponse v;
    verify(f, k.own_spki, k.own_len, &v);
    assert_true(v.ok);
    assert_int_equal(v.records, 25);
    assert_int_equal(v.checkpoints, 2);
    assert_int_equal(v.head_seq, 25);
    assert_int_equal(v.last_checkpoint_seq, 20);
    uint8_t want[32];
    ref_chain(f, 25, want);
    assert_int_equal(v.head_hash.len, 32);
    assert_memory_equal(v.head_hash.data, want, 32);
    assert_string_equal(v.problem, "");
    audit_verify_clear(&v);

    /* Another node's checkpoint is trusted through the node registry. */
    assert_int_equal(add_checkpoint(f, k.other, 2, 1), 26);
    expect_bad(f, k.own_spki, k.own_len, 26, "not trusted");
    register_node(f, 2, k.other_spki, k.other_len);
    expect_ok(f, k.own_spki, k.own_len, 26, 3);
    /* Without this node's own key, its checkpoints are not trusted. */
    expect_bad(f, NULL, 0, 11, "not trusted");
    keys_close(&k);
}

static void test_verify_finds_edit(void **state)
{
    struct fx *f = *state;
    apply_plain(f, 1, 1, 1, 20, 0);
    expect_ok(f, NULL, 0, 20, 0);
    Keyraft__AuditEntry *e = get_entry(f, 7);
    Keyraft__AuditRecord *r = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    char *orig = r->principal;
    r->principal = "mallory";
    uint8_t buf[256];
    size_t len = keyraft__audit_record__pack(r, buf);
    r->principal = orig;
    uint8_t *old = e->record.data;
    e->record.data = buf;
    e->record.len = len;
    put_entry(f, e, 7);
    e->record.data = old;
    keyraft__audit_record__free_unpacked(r, NULL);
    keyraft__audit_entry__free_unpacked(e, NULL);
    expect_bad(f, NULL, 0, 7, "record 7: content does not match its hash (edited)");
}

static void test_verify_finds_deletions(void **state)
{
    struct fx *f = *state;
    apply_plain(f, 1, 1, 1, 20, 0);
    delete_entry(f, 20);
    expect_bad(f, NULL, 0, 20, "missing (deleted at the end): the head says 20, the last "
                               "entry is 19");
    delete_entry(f, 7);
    expect_bad(f, NULL, 0, 7, "record 7 is missing (deleted): 6 is followed by 8");
    delete_entry(f, 1);
    expect_bad(f, NULL, 0, 1, "record 1 is missing (deleted)");
}

static void test_verify_finds_reorder_and_broken_link(void **state)
{
    struct fx *f = *state;
    apply_plain(f, 1, 1, 1, 20, 0);
    Keyraft__AuditEntry *e5 = get_entry(f, 5);
    Keyraft__AuditEntry *e6 = get_entry(f, 6);
    put_entry(f, e6, 5);
    put_entry(f, e5, 6);
    expect_bad(f, NULL, 0, 5, "position 5 holds record 6 (reordered or moved)");
    put_entry(f, e5, 5);
    put_entry(f, e6, 6);
    expect_ok(f, NULL, 0, 20, 0);

    /* Record 9 consistent in itself but hung on another predecessor. */
    Keyraft__AuditEntry *e9 = get_entry(f, 9);
    uint8_t fake_prev[32], fake_hash[32];
    memset(fake_prev, 0x5a, 32);
    ref_hash(9, fake_prev, e9->record.data, e9->record.len, fake_hash);
    uint8_t *p0 = e9->prev_hash.data, *h0 = e9->hash.data;
    e9->prev_hash.data = fake_prev;
    e9->hash.data = fake_hash;
    put_entry(f, e9, 9);
    e9->prev_hash.data = p0;
    e9->hash.data = h0;
    expect_bad(f, NULL, 0, 9, "record 9 does not chain to record 8");
    keyraft__audit_entry__free_unpacked(e5, NULL);
    keyraft__audit_entry__free_unpacked(e6, NULL);
    keyraft__audit_entry__free_unpacked(e9, NULL);
}

/* An attacker without the HSM key rewrites records 15.. and recomputes every
 * hash after them, and the head: only the checkpoint covering them tells. */
static void test_verify_finds_rewrite_after_checkpoint(void **state)
{
    struct fx *f = *state;
    struct keys k;
    keys_open(&k);
    fill_with_checkpoints(f, &k);
    uint8_t prev[32];
    Keyraft__AuditEntry *e14 = get_entry(f, 14);
    memcpy(prev, e14->hash.data, 32);
    keyraft__audit_entry__free_unpacked(e14, NULL);
    for (uint64_t s = 15; s <= 25; s++) {
        Keyraft__AuditEntry *e = get_entry(f, s);
        Keyraft__AuditRecord *r =
            keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
        assert_non_null(r);
        struct rec nr = {NULL, 0};
        if (r->checkpoint == NULL) {
            nr = make_record("mallory", "nothing-to-see", "", 0, 1);
        } else {
            nr = copy_rec(e->record.data, e->record.len); /* cannot re-sign: kept */
        }
        keyraft__audit_record__free_unpacked(r, NULL);
        uint8_t hash[32];
        ref_hash(s, prev, nr.data, nr.len, hash);
        Keyraft__AuditEntry ne = KEYRAFT__AUDIT_ENTRY__INIT;
        ne.seq = s;
        ne.prev_hash.data = prev;
        ne.prev_hash.len = 32;
        ne.hash.data = hash;
        ne.hash.len = 32;
        ne.record.data = nr.data;
        ne.record.len = nr.len;
        put_entry(f, &ne, s);
        memcpy(prev, hash, 32);
        free(nr.data);
        keyraft__audit_entry__free_unpacked(e, NULL);
    }
    set_head(f, 25, prev);
    expect_bad(f, k.own_spki, k.own_len, 11,
               "checkpoint at record 21 (node 1) covers a different hash for record 20: "
               "records 11..20 were rewritten (the previous good checkpoint, at record 11, "
               "covers up to 10)");
    keys_close(&k);
}

static void test_verify_refuses_bad_checkpoints(void **state)
{
    struct fx *f = *state;
    struct keys k;
    keys_open(&k);
    apply_plain(f, 1, 1, 1, 5, 0);
    /* Signed by a key nobody trusts. */
    assert_int_equal(add_checkpoint(f, k.other, 9, 1), 6);
    expect_bad(f, k.own_spki, k.own_len, 6, "record 6: checkpoint (node 9) is signed by a key "
                                             "that is not trusted");
    keys_close(&k);
}

static void test_verify_refuses_forged_signature(void **state)
{
    struct fx *f = *state;
    struct keys k;
    keys_open(&k);
    apply_plain(f, 1, 1, 1, 5, 0);
    uint8_t *cp = NULL;
    size_t len = 0;
    assert_int_equal(audit_make_checkpoint(f->store, k.own, 1, 5, &cp, &len), 0);
    Keyraft__AuditRecord *r = keyraft__audit_record__unpack(NULL, len, cp);
    r->checkpoint->signature.data[r->checkpoint->signature.len - 1] ^= 0x01;
    uint8_t buf[1024];
    size_t n = keyraft__audit_record__pack(r, buf);
    struct rec forged = {buf, n};
    apply(f, 1, 1, 2, &forged, 1, NULL, 0);
    expect_bad(f, k.own_spki, k.own_len, 6, "record 6: checkpoint (node 1) signature does not "
                                             "verify");
    /* A checkpoint over a hash that is not the record's, correctly signed,
     * is found as well (covers a different hash). */
    keyraft__audit_record__free_unpacked(r, NULL);
    free(cp);
    keys_close(&k);
}

/* Registers node |id| with audit key |spki| through the FSM. */
static uint64_t fx_next_index(void *arg)
{
    struct fx *f = arg;
    return ++f->index;
}

static void register_node(struct fx *f, uint64_t id, const uint8_t *spki, size_t len)
{
    struct fsm *fsm = NULL;
    assert_int_equal(fsm_new(f->store, fx_next_index, f, &fsm), 0);
    char raft[32], client[32];
    snprintf(raft, sizeof(raft), "127.0.0.1:%llu", 8000 + (unsigned long long)id);
    snprintf(client, sizeof(client), "127.0.0.1:%llu", 9000 + (unsigned long long)id);
    Keyraft__NodeRecord node = KEYRAFT__NODE_RECORD__INIT;
    node.id = id;
    node.raft_address = raft;
    node.client_address = client;
    node.role = KEYRAFT__NODE_ROLE__NODE_VOTER;
    node.audit_public_key.data = (uint8_t *)spki;
    node.audit_public_key.len = len;
    Keyraft__PutNodeCommand pn = KEYRAFT__PUT_NODE_COMMAND__INIT;
    pn.node = &node;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_NODE;
    cmd.put_node = &pn;
    Keyraft__Command *cmds[1] = {&cmd};
    uint8_t *entry = NULL;
    size_t entry_len = 0;
    assert_int_equal(command_batch_encode(cmds, 1, malloc, &entry, &entry_len), 0);
    struct fsm_result *res = NULL;
    assert_int_equal(fsm_apply(fsm, entry, entry_len, &res), 0);
    assert_non_null(res);
    assert_int_equal(res->ops[0].status, 0);
    free(entry);
    fsm_free(fsm);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Verify streams: 200k records in well under a few seconds (1M in seconds).
 * Sanitizer builds are ~50x slower: there it checks the walk only. */
#ifdef __SANITIZE_ADDRESS__
#define SPEED_RECORDS 20000
#define SPEED_MAX_MS 60000
#else
#define SPEED_RECORDS 200000
#define SPEED_MAX_MS 4000
#endif
static void test_verify_speed(void **state)
{
    struct fx *f = *state;
    size_t total = SPEED_RECORDS;
    uint64_t bseq = 0;
    for (size_t done = 0; done < total; done += 4096)
        apply_plain(f, 1, 1, ++bseq, total - done < 4096 ? total - done : 4096, done);
    uint64_t t0 = mono_ms();
    expect_ok(f, NULL, 0, total, 0);
    uint64_t ms = mono_ms() - t0;
    print_message("verify: %zu records in %llu ms\n", total, (unsigned long long)ms);
    assert_true(ms < SPEED_MAX_MS);
}

/* --- the recorder ---------------------------------------------------------------------- */

struct certs {
    char dir[64];
    char ca[128], ca_key[128], cert[128], key[128];
};

static void certs_make(struct certs *c)
{
    snprintf(c->dir, sizeof(c->dir), "/tmp/kr-test-audit-pki-XXXXXX");
    assert_non_null(mkdtemp(c->dir));
    snprintf(c->ca, sizeof(c->ca), "%s/ca.pem", c->dir);
    snprintf(c->ca_key, sizeof(c->ca_key), "%s/ca.key", c->dir);
    snprintf(c->cert, sizeof(c->cert), "%s/node.pem", c->dir);
    snprintf(c->key, sizeof(c->key), "%s/node.key", c->dir);
    assert_int_equal(pki_make_ca("test CA", 1, c->ca, c->ca_key), 0);
    assert_int_equal(pki_issue_node(c->ca, c->ca_key, "node-1", NULL, 1, c->cert, c->key), 0);
}

static void certs_remove(struct certs *c) { nftw(c->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* A port on loopback where nothing listens (bound, then closed). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t len = sizeof(a);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static struct audit_config ship_config(const struct certs *c, const char *endpoint)
{
    struct audit_config ac = {
        .node_id = 1,
        .enabled = 1,
        .flush_ms = 10,
        .max_pending = 1000,
        .max_lag_ms = 200,
        .endpoint = endpoint,
        .ca_file = c->ca,
        .cert_file = c->cert,
        .key_file = c->key,
    };
    return ac;
}

static void test_recorder_without_leader(void **state)
{
    (void)state;
    struct certs c;
    certs_make(&c);
    char ep[32];
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", free_port());
    struct audit_config ac = ship_config(&c, ep);
    struct audit_log *l = NULL;
    assert_int_equal(audit_log_start(&ac, &l), 0);
    struct rec r = make_record("alice", "encrypt", "k1", 0, 1);
    char why[256];
    for (int i = 0; i < 10; i++)
        audit_log_append(l, r.data, r.len);
    audit_log_usage(l, "k1", 1, 5);
    audit_log_usage(l, "k1", 1, 2);
    audit_log_usage(l, "k1", 2, 1);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, 0, 0), 7);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 2, 0, 0), 1);
    assert_int_equal(audit_log_unacked_usage(l, "k2", 1, 0, 0), 0);
    assert_int_equal(audit_log_healthy(l, why, sizeof(why)), 1);
    assert_string_equal(why, "");
    assert_int_equal(audit_log_fail_open_reads(l), 0);

    /* Nothing acknowledges: past max_lag_ms it is unhealthy, and says why. */
    uint64_t t0 = mono_ms();
    while (audit_log_healthy(l, why, sizeof(why)) && mono_ms() - t0 < 3000)
        usleep(10000);
    uint64_t waited = mono_ms() - t0;
    assert_true(waited >= 150 && waited < 1000);
    assert_non_null(strstr(why, "max_lag_ms 200"));
    struct audit_log_stats st;
    audit_log_get_stats(l, &st);
    assert_int_equal(st.appended, 10);
    assert_int_equal(st.pending, 10);
    assert_int_equal(st.acked, 0);
    assert_int_equal(st.overflowed, 0);
    assert_true(st.oldest_ms >= 200);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, 0, 0), 7); /* still owed */
    /* Once the store holds the batch in flight, its counts are the store's
     * (the reply may still be on its way): not counted twice. */
    assert_int_equal(st.inflight, 1);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, st.boot_id, st.batch_seq), 0);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, st.boot_id, st.batch_seq - 1), 7);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, st.boot_id - 1, st.batch_seq), 7);

    /* Full: the rest is refused and counted. */
    for (int i = 0; i < 1000; i++)
        audit_log_append(l, r.data, r.len);
    audit_log_get_stats(l, &st);
    assert_int_equal(st.pending, 1000);
    assert_int_equal(st.overflowed, 10);
    assert_int_equal(audit_log_healthy(l, why, sizeof(why)), 0);
    assert_non_null(strstr(why, "full"));

    /* Stop is bounded even though nothing can be shipped. */
    t0 = mono_ms();
    audit_log_stop(l, 100);
    assert_true(mono_ms() - t0 < 2500);
    audit_log_stop(NULL, 0);

    /* Disabled: no records kept, not counted as refused; usage still counted. */
    ac.enabled = 0;
    ac.fail_open_reads = 1;
    assert_int_equal(audit_log_start(&ac, &l), 0);
    audit_log_append(l, r.data, r.len);
    audit_log_usage(l, "k1", 1, 3);
    audit_log_get_stats(l, &st);
    assert_int_equal(st.appended, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.overflowed, 0);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, 0, 0), 3);
    assert_int_equal(audit_log_healthy(l, why, sizeof(why)), 1);
    assert_int_equal(audit_log_fail_open_reads(l), 1);
    audit_log_stop(l, 50);

    /* Bad settings and files are refused at start. */
    ac.cert_file = "/nonexistent/node.pem";
    assert_int_equal(audit_log_start(&ac, &l), KR_ECONFIG);
    ac.cert_file = c.cert;
    ac.node_id = 0;
    assert_int_equal(audit_log_start(&ac, &l), KR_EINVAL);
    free(r.data);
    certs_remove(&c);
}

/* A stand-in for the leader: a TLS peer that answers audit_submit with a
 * scripted status and keeps what it was sent. */
#define PEER_MAX_CALLS 4096
struct peer_call {
    uint64_t boot_id, batch_seq;
    size_t n_records;
    uint8_t digest[32]; /* over the records and usage, to compare resends */
    int status;
};

struct peer {
    int fd, port;
    SSL_CTX *ctx;
    pthread_t thread;
    pthread_mutex_t mu;
    int fail_next;     /* answer this many calls with KR_EIO */
    int refuse_all;    /* answer every call with KR_EUNAVAIL */
    struct peer_call calls[PEER_MAX_CALLS];
    size_t n_calls;
    /* Acknowledged content, in order. */
    size_t acked_records;
    uint64_t acked_usage;
    int saw_overflow_notice;
    char overflow_msg[160];
};

static int ssl_read_all(SSL *ssl, uint8_t *p, size_t n)
{
    while (n > 0) {
        int r = SSL_read(ssl, p, (int)n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void peer_serve(struct peer *p, SSL *ssl)
{
    for (;;) {
        uint8_t hdr[4];
        if (ssl_read_all(ssl, hdr, 4) != 0)
            return;
        uint32_t len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 |
                       hdr[3];
        uint8_t *buf = malloc(len ? len : 1);
        if (buf == NULL || ssl_read_all(ssl, buf, len) != 0) {
            free(buf);
            return;
        }
        Keyraft__Request *req = keyraft__request__unpack(NULL, len, buf);
        free(buf);
        if (req == NULL)
            return;
        Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
        resp.id = req->id;
        resp.status = KR_EINVAL;
        if (req->op_case == KEYRAFT__REQUEST__OP_AUDIT_SUBMIT) {
            const Keyraft__AuditSubmitRequest *s = req->audit_submit;
            EVP_MD_CTX *md = EVP_MD_CTX_new();
            EVP_DigestInit_ex(md, EVP_sha256(), NULL);
            for (size_t i = 0; i < s->n_records; i++)
                EVP_DigestUpdate(md, s->records[i].data, s->records[i].len);
            for (size_t i = 0; i < s->n_usage; i++) {
                EVP_DigestUpdate(md, s->usage[i]->key_id, strlen(s->usage[i]->key_id));
                EVP_DigestUpdate(md, &s->usage[i]->count, sizeof(s->usage[i]->count));
            }
            pthread_mutex_lock(&p->mu);
            struct peer_call *c = &p->calls[p->n_calls < PEER_MAX_CALLS ? p->n_calls : 0];
            c->boot_id = s->boot_id;
            c->batch_seq = s->batch_seq;
            c->n_records = s->n_records;
            EVP_DigestFinal_ex(md, c->digest, NULL);
            if (p->refuse_all) {
                resp.status = KR_EBUSY;
            } else if (p->fail_next > 0) {
                p->fail_next--;
                resp.status = KR_EIO;
            } else {
                resp.status = 0;
                p->acked_records += s->n_records;
                for (size_t i = 0; i < s->n_usage; i++)
                    p->acked_usage += s->usage[i]->count;
                for (size_t i = 0; i < s->n_records; i++) {
                    Keyraft__AuditRecord *r = keyraft__audit_record__unpack(
                        NULL, s->records[i].len, s->records[i].data);
                    if (r != NULL && strcmp(r->operation, "audit_overflow") == 0) {
                        p->saw_overflow_notice++;
                        snprintf(p->overflow_msg, sizeof(p->overflow_msg), "%s", r->message);
                    }
                    if (r)
                        keyraft__audit_record__free_unpacked(r, NULL);
                }
            }
            c->status = resp.status;
            if (p->n_calls < PEER_MAX_CALLS)
                p->n_calls++;
            pthread_mutex_unlock(&p->mu);
            EVP_MD_CTX_free(md);
        }
        keyraft__request__free_unpacked(req, NULL);
        size_t n = keyraft__response__get_packed_size(&resp);
        uint8_t out[256];
        out[0] = (uint8_t)(n >> 24);
        out[1] = (uint8_t)(n >> 16);
        out[2] = (uint8_t)(n >> 8);
        out[3] = (uint8_t)n;
        keyraft__response__pack(&resp, out + 4);
        if (SSL_write(ssl, out, (int)(n + 4)) <= 0)
            return;
    }
}

static void *peer_main(void *arg)
{
    struct peer *p = arg;
    for (;;) {
        int cfd = accept(p->fd, NULL, NULL);
        if (cfd < 0)
            return NULL; /* the listener was shut down */
        SSL *ssl = SSL_new(p->ctx);
        SSL_set_fd(ssl, cfd);
        if (SSL_accept(ssl) == 1)
            peer_serve(p, ssl);
        SSL_free(ssl);
        close(cfd);
        ERR_clear_error();
    }
}

static void peer_start(struct peer *p, const struct certs *c)
{
    memset(p, 0, sizeof(*p));
    pthread_mutex_init(&p->mu, NULL);
    p->ctx = SSL_CTX_new(TLS_server_method());
    assert_non_null(p->ctx);
    assert_int_equal(SSL_CTX_use_certificate_chain_file(p->ctx, c->cert), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey_file(p->ctx, c->key, SSL_FILETYPE_PEM), 1);
    assert_int_equal(SSL_CTX_load_verify_locations(p->ctx, c->ca, NULL), 1);
    SSL_CTX_set_verify(p->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    p->fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(p->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(p->fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t len = sizeof(a);
    assert_int_equal(getsockname(p->fd, (struct sockaddr *)&a, &len), 0);
    p->port = ntohs(a.sin_port);
    assert_int_equal(listen(p->fd, 8), 0);
    assert_int_equal(pthread_create(&p->thread, NULL, peer_main, p), 0);
}

/* Call after the recorder stopped (its connection closed). */
static void peer_stop(struct peer *p)
{
    shutdown(p->fd, SHUT_RDWR);
    pthread_join(p->thread, NULL);
    close(p->fd);
    SSL_CTX_free(p->ctx);
    pthread_mutex_destroy(&p->mu);
}

static void wait_acked(struct audit_log *l, uint64_t acked, uint64_t max_ms)
{
    struct audit_log_stats st;
    uint64_t t0 = mono_ms();
    do {
        audit_log_get_stats(l, &st);
        if (st.acked >= acked && st.pending == 0)
            return;
        usleep(5000);
    } while (mono_ms() - t0 < max_ms);
    fail_msg("acked %llu of %llu, %llu pending after %llu ms", (unsigned long long)st.acked,
             (unsigned long long)acked, (unsigned long long)st.pending,
             (unsigned long long)max_ms);
}

static void test_recorder_ships_and_retries(void **state)
{
    (void)state;
    struct certs c;
    certs_make(&c);
    struct peer *p = calloc(1, sizeof(*p));
    assert_non_null(p);
    peer_start(p, &c);
    char ep[32];
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", p->port);
    struct audit_config ac = ship_config(&c, ep);
    ac.max_lag_ms = 5000;
    ac.flush_ms = 100; /* the first batch waits for all seven appends */
    ac.max_pending = 5000;
    struct audit_log *l = NULL;
    struct rec r = make_record("alice", "encrypt", "k1", 0, 1);

    /* The first three answers fail: the same batch comes again, unchanged. */
    p->fail_next = 3;
    assert_int_equal(audit_log_start(&ac, &l), 0);
    for (int i = 0; i < 7; i++)
        audit_log_append(l, r.data, r.len);
    audit_log_usage(l, "k1", 1, 4);
    wait_acked(l, 7, 5000);
    /* Acknowledged: still counted until this node's store holds batch 1. */
    struct audit_log_stats ack_st;
    audit_log_get_stats(l, &ack_st);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, 0, 0), 4);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, ack_st.boot_id, 0), 4);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, ack_st.boot_id, 1), 0);
    audit_log_usage(l, "k1", 1, 2); /* new counts stay */
    audit_log_applied(l, ack_st.boot_id, 1);
    assert_int_equal(audit_log_unacked_usage(l, "k1", 1, 0, 0), 2);
    pthread_mutex_lock(&p->mu);
    assert_true(p->n_calls >= 4);
    for (size_t i = 1; i < 4; i++) {
        assert_int_equal(p->calls[i].boot_id, p->calls[0].boot_id);
        assert_int_equal(p->calls[i].batch_seq, 1);
        assert_int_equal(p->calls[i].n_records, 7);
        assert_memory_equal(p->calls[i].digest, p->calls[0].digest, 32);
    }
    assert_int_equal(p->calls[0].batch_seq, 1);
    assert_int_equal(p->calls[3].status, 0);
    assert_int_equal(p->acked_records, 7);
    assert_int_equal(p->acked_usage, 4);
    size_t calls_before = p->n_calls;
    pthread_mutex_unlock(&p->mu);

    /* More than one batch's worth ships in order, batch_seq counting up. */
    for (int i = 0; i < AUDIT_MAX_BATCH_RECORDS + 100; i++)
        audit_log_append(l, r.data, r.len);
    wait_acked(l, 7 + AUDIT_MAX_BATCH_RECORDS + 100, 5000);
    pthread_mutex_lock(&p->mu);
    assert_true(p->n_calls >= calls_before + 2);
    for (size_t i = calls_before; i < p->n_calls; i++) {
        assert_int_equal(p->calls[i].batch_seq, p->calls[i - 1].batch_seq + 1);
        assert_true(p->calls[i].n_records <= AUDIT_MAX_BATCH_RECORDS);
    }
    assert_int_equal(p->acked_records, 7 + AUDIT_MAX_BATCH_RECORDS + 100);
    pthread_mutex_unlock(&p->mu);
    struct audit_log_stats st;
    audit_log_get_stats(l, &st);
    assert_int_equal(st.appended, 7 + AUDIT_MAX_BATCH_RECORDS + 100);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.oldest_ms, 0);

    /* Full while the leader refuses; once it takes them, the refused count
     * arrives as a record of its own. */
    pthread_mutex_lock(&p->mu);
    p->refuse_all = 1;
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < ac.max_pending + 5; i++)
        audit_log_append(l, r.data, r.len);
    audit_log_get_stats(l, &st);
    assert_int_equal(st.overflowed, 5);
    char why[256];
    assert_int_equal(audit_log_healthy(l, why, sizeof(why)), 0);
    pthread_mutex_lock(&p->mu);
    p->refuse_all = 0;
    pthread_mutex_unlock(&p->mu);
    wait_acked(l, st.acked + ac.max_pending + 1, 5000);
    assert_int_equal(audit_log_healthy(l, why, sizeof(why)), 1);
    pthread_mutex_lock(&p->mu);
    assert_int_equal(p->saw_overflow_notice, 1);
    assert_string_equal(p->overflow_msg,
                        "5 records could not be queued while the audit log was full");
    pthread_mutex_unlock(&p->mu);

    /* Stop ships what is left at once, even with a long flush period. */
    audit_log_stop(l, 2000);
    ac.flush_ms = 10000;
    assert_int_equal(audit_log_start(&ac, &l), 0);
    audit_log_append(l, r.data, r.len);
    audit_log_append(l, r.data, r.len);
    pthread_mutex_lock(&p->mu);
    size_t before = p->acked_records;
    pthread_mutex_unlock(&p->mu);
    uint64_t t0 = mono_ms();
    audit_log_stop(l, 2000);
    assert_true(mono_ms() - t0 < 1500);
    pthread_mutex_lock(&p->mu);
    assert_int_equal(p->acked_records, before + 2);
    /* A new start is a new, larger boot id, counting from batch 1. */
    assert_true(p->calls[p->n_calls - 1].boot_id > p->calls[0].boot_id);
    assert_int_equal(p->calls[p->n_calls - 1].batch_seq, 1);
    pthread_mutex_unlock(&p->mu);
    peer_stop(p);
    free(p);
    free(r.data);
    certs_remove(&c);
}

static void test_recorder_shrinks_huge_records(void **state)
{
    (void)state;
    struct certs c;
    certs_make(&c);
    char ep[32];
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", free_port());
    struct audit_config ac = ship_config(&c, ep);
    struct audit_log *l = NULL;
    assert_int_equal(audit_log_start(&ac, &l), 0);
    /* Several MB would never fit a frame: it is queued as a short record. */
    size_t n = 5u * 1024u * 1024u;
    char *big = malloc(n + 1);
    memset(big, 'y', n);
    big[n] = '\0';
    struct rec r = make_record("alice", big, "k1", 0, 1);
    audit_log_append(l, r.data, r.len);
    struct audit_log_stats st;
    audit_log_get_stats(l, &st);
    assert_int_equal(st.pending, 1);
    assert_int_equal(st.overflowed, 0);
    audit_log_stop(l, 10);
    free(r.data);
    free(big);
    certs_remove(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_apply_chains_and_dedups, setup, teardown),
        cmocka_unit_test_setup_teardown(test_apply_two_batches_in_one_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_apply_odd_records, setup, teardown),
        cmocka_unit_test_setup_teardown(test_usage_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_filters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_paging_and_tail, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_scan_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_record, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_clean, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_finds_edit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_finds_deletions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_finds_reorder_and_broken_link, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_verify_finds_rewrite_after_checkpoint, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_verify_refuses_bad_checkpoints, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_refuses_forged_signature, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_speed, setup, teardown),
        cmocka_unit_test(test_recorder_without_leader),
        cmocka_unit_test(test_recorder_ships_and_retries),
        cmocka_unit_test(test_recorder_shrinks_huge_records),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
