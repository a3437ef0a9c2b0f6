/* test_bulk.c: batches on a real keyraftd (each request answered in order
 * with its own authorization and audit record, nesting refused, the count
 * and the reply frame bounded, creates sharing raft entries) and the bulk
 * commands of the CLI (create-bulk resumable, import-bulk round trip). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <openssl/rand.h>

#include "harness.h"

struct fixture {
    struct kr_node node;
    kr_client *app;     /* officer + user, group apps */
    kr_client *auditor;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A small raft log budget, so that bulk creates (500 KB entries) take raft
 * snapshots well before raft's 8192-entry threshold. */
static int small_snapshot_budget(struct kr_node *node)
{
    char path[KR_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%.400s/keyraftd.conf", node->dir);
    FILE *conf = fopen(path, "a");
    if (conf == NULL)
        return -1;
    int rv = fputs("\n[raft]\nsnapshot_log_mb = 1\n", conf) < 0;
    return fclose(conf) != 0 || rv ? -1 : 0;
}

static int group_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    Keyraft__KeyAttributes *a = NULL;

    if (f == NULL)
        return -1;
    if (kr_node_init(&f->node) != 0 || small_snapshot_budget(&f->node) != 0 ||
        kr_node_start(&f->node) != 0 ||
        kr_node_client(&f->node, 60000, &f->app) != 0 ||
        kr_node_client_as(&f->node, "auditor", 30000, &f->auditor) != 0 ||
        kr_create_key(f->app, "bulk-base", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &a) != 0) {
        kr_node_client_free(f->app);
        kr_node_client_free(f->auditor);
        kr_node_destroy(&f->node);
        free(f);
        return -1;
    }
    kr_key_attributes_free(a);
    *state = f;
    return 0;
}

static int group_teardown(void **state)
{
    struct fixture *f = *state;
    int rc = 0;

    if (f == NULL)
        return 0;
    kr_node_client_free(f->app);
    kr_node_client_free(f->auditor);
    if (kr_node_alive(&f->node)) {
        rc = kr_node_stop(&f->node);
        if (rc != 0) {
            fprintf(stderr, "keyraftd did not stop cleanly on SIGTERM: exit %d\n", rc);
            kr_node_dump_log(&f->node, 3000);
        }
    }
    kr_node_destroy(&f->node);
    free(f);
    return rc != 0 ? -1 : 0;
}

/* ---- building requests --------------------------------------------------------------- */

/* Requests and everything they point to, freed together. */
struct reqs {
    Keyraft__Request **v;
    size_t n;
};

static Keyraft__Request *new_req(struct reqs *r)
{
    Keyraft__Request *req = calloc(1, sizeof(*req));
    assert_non_null(req);
    keyraft__request__init(req);
    r->v = realloc(r->v, (r->n + 1) * sizeof(*r->v));
    assert_non_null(r->v);
    r->v[r->n++] = req;
    return req;
}

static Keyraft__KeyRef *ref_name(const char *name)
{
    Keyraft__KeyRef *ref = calloc(1, sizeof(*ref));
    assert_non_null(ref);
    keyraft__key_ref__init(ref);
    ref->name = strdup(name);
    return ref;
}

static void add_create(struct reqs *r, const char *name)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__CreateKeyRequest *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    keyraft__create_key_request__init(c);
    c->name = strdup(name);
    c->algorithm = KEYRAFT__ALGORITHM__AES_256;
    req->op_case = KEYRAFT__REQUEST__OP_CREATE;
    req->create = c;
}

static void add_get(struct reqs *r, const char *name)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__GetKeyRequest *g = calloc(1, sizeof(*g));
    assert_non_null(g);
    keyraft__get_key_request__init(g);
    g->key = ref_name(name);
    req->op_case = KEYRAFT__REQUEST__OP_GET;
    req->get = g;
}

static void add_encrypt(struct reqs *r, const char *name, const char *pt)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__EncryptRequest *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    keyraft__encrypt_request__init(e);
    e->key = ref_name(name);
    e->plaintext.data = (uint8_t *)strdup(pt);
    e->plaintext.len = strlen(pt);
    req->op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    req->encrypt = e;
}

static void add_audit_read(struct reqs *r)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__AuditReadRequest *a = calloc(1, sizeof(*a));
    assert_non_null(a);
    keyraft__audit_read_request__init(a);
    req->op_case = KEYRAFT__REQUEST__OP_AUDIT_READ;
    req->audit_read = a;
}

static void add_status(struct reqs *r)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__StatusRequest *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    keyraft__status_request__init(s);
    req->op_case = KEYRAFT__REQUEST__OP_STATUS;
    req->status = s;
}

static void add_random(struct reqs *r, uint32_t len)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__RandomRequest *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    keyraft__random_request__init(s);
    s->length = len;
    req->op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req->random = s;
}

/* A batch holding |inner| (taken: freed with |r|). */
static void add_batch(struct reqs *r, struct reqs *inner)
{
    Keyraft__Request *req = new_req(r);
    Keyraft__BatchRequest *b = calloc(1, sizeof(*b));
    assert_non_null(b);
    keyraft__batch_request__init(b);
    b->requests = inner->v;
    b->n_requests = inner->n;
    inner->v = NULL;
    inner->n = 0;
    req->op_case = KEYRAFT__REQUEST__OP_BATCH;
    req->batch = b;
}

static void reqs_free(struct reqs *r)
{
    /* Built with malloc, as protobuf-c's default allocator would. */
    for (size_t i = 0; i < r->n; i++)
        keyraft__request__free_unpacked(r->v[i], NULL);
    free(r->v);
    r->v = NULL;
    r->n = 0;
}

/* ---- audit -------------------------------------------------------------------------- */

/* The seq of app's newest record (0: none). */
static uint64_t app_last_seq(kr_client *auditor)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__AuditReadRequest ar = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    ar.tail = 1;
    ar.limit = 1;
    ar.principal = (char *)"app";
    req.op_case = KEYRAFT__REQUEST__OP_AUDIT_READ;
    req.audit_read = &ar;
    assert_int_equal(kr_call(auditor, &req, &resp), 0);
    assert_int_equal(resp->status, 0);
    uint64_t seq = resp->audit->n_entries > 0 ? resp->audit->entries[0]->seq : 0;
    kr_response_free(resp);
    return seq;
}

/* Where app's new records will start, once the records of its earlier
 * calls stopped arriving (nodes ship them every 20 ms): its newest record
 * unchanged for 300 ms, waiting up to 20 s. (The auditor's own reads are
 * records too: only app's are watched.) */
static uint64_t audit_head(kr_client *auditor)
{
    uint64_t head = app_last_seq(auditor), since = mono_ms(), deadline = since + 20000;
    while (mono_ms() < deadline) {
        usleep(50 * 1000);
        uint64_t h = app_last_seq(auditor);
        if (h != head) {
            head = h;
            since = mono_ms();
        } else if (mono_ms() - since >= 300) {
            break;
        }
    }
    return head;
}

struct audit_seen {
    char op[32];
    char key[64];
    int status;
    uint32_t count; /* requests the record stands for */
};

/* The records of |principal| after |after|, waiting up to 10 s until there
 * are at least |want|, then 300 ms more for any that should not be there.
 * Returns how many (at most |cap| kept). */
static size_t audit_after(kr_client *auditor, uint64_t after, const char *principal, size_t want,
                          struct audit_seen *out, size_t cap)
{
    uint64_t deadline = mono_ms() + 10000, settle = 0;
    size_t n = 0;
    for (;;) {
        n = 0;
        uint64_t from = after;
        for (int page = 0; page < 100; page++) {
            Keyraft__Request req = KEYRAFT__REQUEST__INIT;
            Keyraft__AuditReadRequest ar = KEYRAFT__AUDIT_READ_REQUEST__INIT;
            Keyraft__Response *resp = NULL;
            ar.after_seq = from;
            ar.limit = 1000;
            ar.principal = (char *)principal;
            req.op_case = KEYRAFT__REQUEST__OP_AUDIT_READ;
            req.audit_read = &ar;
            assert_int_equal(kr_call(auditor, &req, &resp), 0);
            assert_int_equal(resp->status, 0);
            for (size_t i = 0; i < resp->audit->n_entries; i++) {
                const Keyraft__AuditEntry *e = resp->audit->entries[i];
                Keyraft__AuditRecord *r =
                    keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
                assert_non_null(r);
                if (n < cap) {
                    snprintf(out[n].op, sizeof(out[n].op), "%s", r->operation);
                    snprintf(out[n].key, sizeof(out[n].key), "%s", r->key_id);
                    out[n].status = r->status;
                    out[n].count = r->count > 1 ? r->count : 1;
                }
                n++;
                keyraft__audit_record__free_unpacked(r, NULL);
            }
            from = resp->audit->next_after;
            kr_response_free(resp);
            if (from == 0)
                break;
        }
        uint64_t now = mono_ms();
        if (n >= want && settle == 0)
            settle = now + 300;
        if ((settle != 0 && now >= settle) || now >= deadline)
            return n;
        usleep(50 * 1000);
    }
}

static size_t count_op(const struct audit_seen *s, size_t n, const char *op, int status)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(s[i].op, op) == 0 && s[i].status == status)
            c += s[i].count;
    return c;
}

/* ---- batches --------------------------------------------------------------------------- */

/* Mixed operations: each answered in order with its own status, and each on
 * record once; the batch itself adds no record. */
static void test_mixed_batch(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    Keyraft__Response *resp = NULL;
    kr_buf pt = {0};

    uint64_t head = audit_head(f->auditor);
    add_create(&r, "mixed-new");
    add_get(&r, "bulk-base");
    add_encrypt(&r, "bulk-base", "hello batch");
    add_audit_read(&r); /* app is no auditor */
    add_get(&r, "no-such-key");
    add_create(&r, "bulk-base"); /* the name is taken */
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    assert_int_equal(resp->status, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_BATCH);
    Keyraft__Response **a = resp->batch->responses;
    assert_int_equal(resp->batch->n_responses, 6);
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(a[i]->id, resp->id);

    assert_int_equal(a[0]->status, 0);
    assert_int_equal(a[0]->result_case, KEYRAFT__RESPONSE__RESULT_KEY);
    assert_string_equal(a[0]->key->name, "mixed-new");
    assert_true(a[0]->commit_index > 0);
    assert_int_equal(resp->commit_index, a[0]->commit_index); /* the batch's highest */
    assert_int_equal(a[1]->status, 0);
    assert_string_equal(a[1]->key->name, "bulk-base");
    assert_int_equal(a[2]->status, 0);
    assert_int_equal(a[2]->result_case, KEYRAFT__RESPONSE__RESULT_ENCRYPT);
    assert_int_equal(a[3]->status, KR_EPERM);
    assert_non_null(strstr(a[3]->message, "auditor"));
    assert_int_equal(a[4]->status, KR_ENOTFOUND);
    assert_int_equal(a[5]->status, KR_EEXIST);

    /* The ciphertext is a real one, and the new key is there. */
    assert_int_equal(kr_decrypt(f->app, a[2]->encrypt->ciphertext.data,
                                a[2]->encrypt->ciphertext.len, NULL, 0, &pt), 0);
    assert_int_equal(pt.len, strlen("hello batch"));
    assert_memory_equal(pt.data, "hello batch", pt.len);
    kr_buf_free(&pt);
    Keyraft__KeyAttributes *k = NULL;
    assert_int_equal(kr_get_key(f->app, "name:mixed-new", &k), 0);
    assert_string_equal(k->id, a[0]->key->id);
    kr_key_attributes_free(k);
    /* The caller's requests are as they were (ids given for the call only). */
    assert_string_equal(r.v[0]->request_id, "");
    kr_response_free(resp);
    reqs_free(&r);

    /* One record per request of the batch (6), and the two checks above. */
    struct audit_seen seen[64];
    size_t n = audit_after(f->auditor, head, "app", 8, seen, 64);
    assert_int_equal(n, 8);
    assert_int_equal(count_op(seen, n, "create", 0), 1);
    assert_int_equal(count_op(seen, n, "create", KR_EEXIST), 1);
    assert_int_equal(count_op(seen, n, "get", 0), 2); /* one here, one from kr_get_key */
    assert_int_equal(count_op(seen, n, "get", KR_ENOTFOUND), 1);
    assert_int_equal(count_op(seen, n, "encrypt", 0), 1);
    assert_int_equal(count_op(seen, n, "audit_read", KR_EPERM), 1);
    assert_int_equal(count_op(seen, n, "decrypt", 0), 1);
    assert_int_equal(count_op(seen, n, "batch", 0), 0);
}

/* A batch's reads of one key with one outcome are one audit record with a
 * count; its writes keep a record each, and usage counts every encrypt. */
static void test_batch_reads_tallied(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    Keyraft__Response *resp = NULL;
    Keyraft__KeyAttributes *k = NULL;

    assert_int_equal(kr_get_key(f->app, "name:bulk-base", &k), 0);
    uint64_t used_before = k->versions[0]->encryptions;
    kr_key_attributes_free(k);
    uint64_t head = audit_head(f->auditor);
    for (int i = 0; i < 100; i++)
        add_encrypt(&r, "bulk-base", "tally me");
    for (int i = 0; i < 3; i++)
        add_get(&r, "no-such-key");
    add_create(&r, "tally-a");
    add_create(&r, "tally-b");
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    assert_int_equal(resp->batch->n_responses, 105);
    for (size_t i = 0; i < 100; i++)
        assert_int_equal(resp->batch->responses[i]->status, 0);
    for (size_t i = 100; i < 103; i++)
        assert_int_equal(resp->batch->responses[i]->status, KR_ENOTFOUND);
    kr_response_free(resp);
    reqs_free(&r);

    struct audit_seen seen[16];
    size_t n = audit_after(f->auditor, head, "app", 4, seen, 16);
    assert_int_equal(n, 4);
    assert_int_equal(count_op(seen, n, "encrypt", 0), 100);
    assert_int_equal(count_op(seen, n, "get", KR_ENOTFOUND), 3);
    assert_int_equal(count_op(seen, n, "create", 0), 2);
    for (size_t i = 0; i < n; i++)
        if (strcmp(seen[i].op, "create") == 0)
            assert_int_equal(seen[i].count, 1);
        else if (strcmp(seen[i].op, "encrypt") == 0)
            assert_int_equal(seen[i].count, 100);

    uint64_t used = used_before, deadline = mono_ms() + 10000;
    while (used < used_before + 100 && mono_ms() < deadline) {
        usleep(50 * 1000);
        assert_int_equal(kr_get_key(f->app, "name:bulk-base", &k), 0);
        used = k->versions[0]->encryptions;
        kr_key_attributes_free(k);
    }
    assert_int_equal(used, used_before + 100);
}

/* Reads sent alone on one connection within a few ms, same key and outcome,
 * are one audit record with a count; a read naming a request_id and every
 * refusal keep a record each. */
static void test_lone_reads_coalesced(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    uint64_t head = audit_head(f->auditor);
    for (int i = 0; i < 40; i++)
        add_encrypt(&r, "bulk-base", "lone read");
    for (int i = 0; i < 2; i++) {
        add_encrypt(&r, "bulk-base", "named read");
        r.v[r.n - 1]->request_id = strdup(i == 0 ? "named-read-1" : "named-read-2");
        add_get(&r, "no-such-key");
    }
    for (size_t i = 0; i < r.n; i++)
        assert_int_equal(kr_send(f->app, r.v[i]), 0);
    assert_int_equal(kr_flush(f->app), 0);
    for (size_t i = 0; i < r.n; i++) {
        Keyraft__Response *resp = NULL;
        assert_int_equal(kr_recv(f->app, &resp), 0);
        assert_int_equal(resp->status, resp->result_case == KEYRAFT__RESPONSE__RESULT_ENCRYPT
                                           ? 0 : KR_ENOTFOUND);
        kr_response_free(resp);
    }
    reqs_free(&r);

    struct audit_seen seen[64];
    size_t n = audit_after(f->auditor, head, "app", 5, seen, 64);
    assert_true(n <= 64);
    assert_int_equal(count_op(seen, n, "encrypt", 0), 42);
    assert_int_equal(count_op(seen, n, "get", KR_ENOTFOUND), 2);
    size_t encrypt_records = 0, singles = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(seen[i].op, "get") == 0)
            assert_int_equal(seen[i].count, 1);
        if (strcmp(seen[i].op, "encrypt") == 0) {
            encrypt_records++;
            singles += seen[i].count == 1;
        }
    }
    /* The 40 lone reads arrive in one or two loop passes: a window (10 ms)
     * may split them, but they are not a record each. */
    assert_true(singles >= 2);
    assert_true(encrypt_records <= 2 + 4);
}

static void test_nested_batch_refused(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0}, inner = {0};
    Keyraft__Response *resp = NULL;

    uint64_t head = audit_head(f->auditor);
    add_get(&r, "bulk-base");
    add_get(&inner, "bulk-base");
    add_batch(&r, &inner);
    add_get(&r, "bulk-base");
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    assert_int_equal(resp->batch->n_responses, 3);
    assert_int_equal(resp->batch->responses[0]->status, 0);
    assert_int_equal(resp->batch->responses[1]->status, KR_EINVAL);
    assert_non_null(strstr(resp->batch->responses[1]->message, "nest"));
    assert_int_equal(resp->batch->responses[2]->status, 0);
    kr_response_free(resp);
    reqs_free(&r);

    struct audit_seen seen[16];
    size_t n = audit_after(f->auditor, head, "app", 2, seen, 16);
    assert_int_equal(n, 2); /* the two gets of one key are one record */
    assert_int_equal(count_op(seen, n, "get", 0), 2);
    assert_int_equal(count_op(seen, n, "batch", KR_EINVAL), 1);
}

/* 10,000 requests are served; 10,001 are refused whole, before any runs,
 * and that refusal is on record. */
static void test_batch_count_limit(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    Keyraft__Response *resp = NULL;

    for (int i = 0; i < KR_BATCH_MAX; i++)
        add_status(&r);
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    assert_int_equal(resp->batch->n_responses, KR_BATCH_MAX);
    for (size_t i = 0; i < resp->batch->n_responses; i++) {
        assert_int_equal(resp->batch->responses[i]->status, 0);
        assert_int_equal(resp->batch->responses[i]->result_case,
                         KEYRAFT__RESPONSE__RESULT_NODE_STATUS);
    }
    kr_response_free(resp);
    resp = NULL;

    add_status(&r);
    /* The library refuses to send it... */
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), KR_EINVAL);
    assert_null(resp);
    /* ...and the node refuses it when sent anyway. */
    uint64_t head = audit_head(f->auditor);
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__BatchRequest br = KEYRAFT__BATCH_REQUEST__INIT;
    br.requests = r.v;
    br.n_requests = r.n;
    req.op_case = KEYRAFT__REQUEST__OP_BATCH;
    req.batch = &br;
    assert_int_equal(kr_call(f->app, &req, &resp), 0);
    assert_int_equal(resp->status, KR_ETOOBIG);
    assert_non_null(strstr(resp->message, "10000"));
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT__NOT_SET);
    kr_response_free(resp);
    reqs_free(&r);
    struct audit_seen seen[8];
    size_t n = audit_after(f->auditor, head, "app", 1, seen, 8);
    assert_int_equal(n, 1);
    assert_int_equal(count_op(seen, n, "batch", KR_ETOOBIG), 1);
}

/* Answers past the reply frame are KR_ETOOBIG entries in their place:
 * every request is answered, the ones that fit first. */
static void test_batch_reply_frame(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    Keyraft__Response *resp = NULL;

    for (int i = 0; i < 100; i++)
        add_random(&r, 65536);
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    assert_int_equal(resp->batch->n_responses, 100);
    size_t ok = 0, big = 0;
    for (size_t i = 0; i < 100; i++) {
        const Keyraft__Response *a = resp->batch->responses[i];
        if (a->status == 0) {
            assert_int_equal(big, 0); /* in order: no answer after a dropped one fits */
            assert_int_equal(a->random->data.len, 65536);
            ok++;
        } else {
            assert_int_equal(a->status, KR_ETOOBIG);
            assert_non_null(strstr(a->message, "does not fit"));
            big++;
        }
    }
    /* 4 MiB of frame holds 63 answers of 64 KiB and the rest's refusals. */
    assert_true(ok >= 60 && ok <= 63);
    assert_int_equal(ok + big, 100);
    kr_response_free(resp);
    reqs_free(&r);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* 1,000 creates in one batch ride a handful of raft entries (the ones the
 * answers name), not one each. */
static void test_creates_share_entries(void **state)
{
    struct fixture *f = *state;
    struct reqs r = {0};
    Keyraft__Response *resp = NULL;
    uint64_t idx[1000];
    char name[64];

    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof(name), "entries-%d", i);
        add_create(&r, name);
    }
    uint64_t t0 = mono_ms();
    assert_int_equal(kr_batch(f->app, r.v, r.n, &resp), 0);
    uint64_t ms = mono_ms() - t0;
    assert_int_equal(resp->batch->n_responses, 1000);
    for (size_t i = 0; i < 1000; i++) {
        assert_int_equal(resp->batch->responses[i]->status, 0);
        assert_string_equal(resp->batch->responses[i]->key->name, r.v[i]->create->name);
        idx[i] = resp->batch->responses[i]->commit_index;
    }
    qsort(idx, 1000, sizeof(idx[0]), cmp_u64);
    size_t entries = 1;
    for (size_t i = 1; i < 1000; i++)
        entries += idx[i] != idx[i - 1];
    print_message("1000 creates in one batch: %zu raft entries (indexes %llu..%llu), %llu ms\n",
                  entries, (unsigned long long)idx[0], (unsigned long long)idx[999],
                  (unsigned long long)ms);
    assert_true(entries <= 4);
    assert_int_equal(resp->commit_index, idx[999]);
    kr_response_free(resp);
    reqs_free(&r);
}

/* ---- the CLI ------------------------------------------------------------------------------- */

static uint64_t key_count(struct fixture *f)
{
    struct kr_out o;
    kr_cli(&f->node, NULL, 0, &o, "--json", "status", NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_json *j = kr_json_parse((const char *)o.out, o.out_len);
    assert_non_null(j);
    long long n = kr_json_int(kr_json_get(j, "key_count"), -1);
    kr_json_free(j);
    kr_out_free(&o);
    assert_true(n >= 0);
    return (uint64_t)n;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void test_create_bulk_cli(void **state)
{
    struct fixture *f = *state;
    struct kr_out o;
    char out_path[KR_PATH_MAX + 32];
    uint8_t *text = NULL;
    size_t len = 0;

    snprintf(out_path, sizeof(out_path), "%s/dev-keys.txt", f->node.scratch);
    uint64_t before = key_count(f);
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", "dev", "--count", "5000",
           "--out", out_path, NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_non_null(strstr(o.err, "created 5000, existed 0, failed 0"));
    assert_non_null(strstr(o.err, "100%")); /* progress, one line a tenth off a terminal */
    kr_out_free(&o);
    assert_int_equal(key_count(f), before + 5000);
    /* 5 entries of ~500 KB passed the 1 MB log budget: a snapshot was taken,
     * and the node restarts from it with every key. */
    for (int i = 0; i < 100 && kr_node_raft_snapshots(&f->node) == 0; i++)
        usleep(50 * 1000);
    assert_true(kr_node_raft_snapshots(&f->node) > 0);
    assert_int_equal(kr_node_restart(&f->node), 0);
    assert_int_equal(key_count(f), before + 5000);
    assert_int_equal(kr_read_file(out_path, &text, &len), 0);
    assert_int_equal(count_lines((const char *)text), 5000);
    assert_non_null(strstr((const char *)text, "dev-0 "));
    assert_non_null(strstr((const char *)text, "\ndev-4999 "));

    /* A sample is there, under the ids the output names. */
    const char *sample[] = {"dev-0", "dev-1234", "dev-4999"};
    for (size_t i = 0; i < 3; i++) {
        char ref[64], line[96];
        snprintf(ref, sizeof(ref), "name:%s", sample[i]);
        Keyraft__KeyAttributes *k = NULL;
        assert_int_equal(kr_get_key(f->app, ref, &k), 0);
        assert_int_equal(k->algorithm, KEYRAFT__ALGORITHM__AES_256);
        snprintf(line, sizeof(line), "%s %s\n", sample[i], k->id);
        assert_non_null(strstr((const char *)text, line));
        kr_key_attributes_free(k);
    }
    free(text);
    kr_cli(&f->node, NULL, 0, &o, "--json", "list", "--prefix", "dev-", "--limit", "50", NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_json *j = kr_json_parse((const char *)o.out, o.out_len);
    assert_non_null(j);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 50);
    kr_json_free(j);
    kr_out_free(&o);

    /* The same again: every name exists, none is made, and that is no failure. */
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", "dev", "--count", "5000", NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_non_null(strstr(o.err, "created 0, existed 5000, failed 0"));
    assert_int_equal(o.out_len, 0);
    kr_out_free(&o);
    assert_int_equal(key_count(f), before + 5000);

    /* Resumed past the end: the overlap is skipped, the rest made. */
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", "dev", "--count", "10", "--start",
           "4995", "--batch", "3", NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_non_null(strstr(o.err, "created 5, existed 5, failed 0"));
    assert_non_null(strstr((const char *)o.out, "dev-5004 "));
    kr_out_free(&o);
    assert_int_equal(key_count(f), before + 5005);

    /* A failure for every key (no such domain) exits 1 with the summary. */
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", "nodomain", "--count", "3",
           "--domain", "no-such-domain", NULL);
    KR_ASSERT_EXIT(&o, 1);
    assert_non_null(strstr(o.err, "created 0, existed 0, failed 3"));
    assert_non_null(strstr(o.err, "KR_EPERM"));
    kr_out_free(&o);
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", "x", "--count", "1", "--batch",
           "10001", NULL);
    KR_ASSERT_EXIT(&o, 2);
    kr_out_free(&o);
}

/* Times |phrase| appears in the node's log past its first |from| bytes. */
static int log_count(const struct kr_node *node, const char *phrase, size_t from)
{
    char path[KR_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%.400s/node.log", node->dir);
    uint8_t *text = NULL;
    size_t len = 0;
    assert_int_equal(kr_read_file(path, &text, &len), 0);
    int n = 0;
    if (from < len)
        for (const char *p = (const char *)text + from; (p = strstr(p, phrase)) != NULL; p++)
            n++;
    free(text);
    return n;
}

/* The node log's length now: log_count from here sees only what follows. */
static size_t log_end(const struct kr_node *node)
{
    char path[KR_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%.400s/node.log", node->dir);
    uint8_t *text = NULL;
    size_t len = 0;
    assert_int_equal(kr_read_file(path, &text, &len), 0);
    free(text);
    return len;
}

/* The highest index among the raft snapshots the node wrote (raft_uv names
 * them snapshot-TERM-INDEX-TIME), 0 for none. */
static unsigned long long newest_snapshot(const struct kr_node *node)
{
    char path[KR_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%.400s/raft", node->dir);
    DIR *d = opendir(path);
    assert_non_null(d);
    unsigned long long best = 0, term, index, when;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (sscanf(e->d_name, "snapshot-%llu-%llu-%llu", &term, &index, &when) == 3 &&
            strstr(e->d_name, ".meta") == NULL && index > best)
            best = index;
    closedir(d);
    return best;
}

/* Restarts the node with each snapshot flush held while |hold| exists
 * (keyraftd's test hook), or without the hook when |hold| is NULL. |mark|
 * (may be NULL) gets the log's end between the stop and the start. */
static void restart_holding(struct fixture *f, const char *hold, size_t *mark)
{
    kr_node_stop(&f->node);
    if (mark != NULL)
        *mark = log_end(&f->node);
    if (hold != NULL)
        setenv("KEYRAFT_TEST_SNAPSHOT_HOLD_FILE", hold, 1);
    int rv = kr_node_start(&f->node);
    unsetenv("KEYRAFT_TEST_SNAPSHOT_HOLD_FILE");
    assert_int_equal(rv, 0);
}

/* 17 entries of 1,000 keys: past the 16-entry floor of the 1 MB budget, so
 * a snapshot starts during the load. */
static void load_past_a_snapshot(struct fixture *f, const char *prefix)
{
    struct kr_out o;
    kr_cli(&f->node, NULL, 0, &o, "create-bulk", "--prefix", prefix, "--count", "17000", NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
}

static const char SNAP_STARTED[] = "flushing the store on a worker";
static const char SNAP_FLUSHED[] = "the store flush took";

/* Snapshots started past |from| in the log and not flushed yet: held by the
 * hook, as raft takes one at a time. (One started at a restart, before the
 * hold file existed, may end during the load: counted this way it does not
 * matter.) */
static int snapshots_pending(const struct kr_node *node, size_t from)
{
    return log_count(node, SNAP_STARTED, from) - log_count(node, SNAP_FLUSHED, from);
}

/* A raft snapshot's store flush runs on a worker while the node goes on
 * (cluster.c). A stop that lands meanwhile waits for it (closing the store
 * under the worker would crash or lose the flush), then exits cleanly. */
static void test_stop_during_snapshot(void **state)
{
    struct fixture *f = *state;
    char hold[KR_PATH_MAX + 32];
    snprintf(hold, sizeof(hold), "%.400s/snapshot-hold", f->node.scratch);
    size_t mark = 0;
    restart_holding(f, hold, &mark);
    assert_int_equal(kr_write_file(hold, "", 0), 0);
    uint64_t keys = key_count(f);

    load_past_a_snapshot(f, "stop");
    assert_int_equal(snapshots_pending(&f->node, mark), 1); /* held */
    size_t stop_mark = log_end(&f->node);
    assert_int_equal(kill(f->node.pid, SIGTERM), 0);
    usleep(500 * 1000);
    assert_true(kr_node_alive(&f->node)); /* waiting for the flush */
    assert_int_equal(log_count(&f->node, "stopping once the snapshot's store flush ends", stop_mark),
                     1);
    assert_int_equal(unlink(hold), 0);
    int rc = kr_node_wait_exit(&f->node, 20000);
    if (rc != 0)
        kr_node_dump_log(&f->node, 4000);
    assert_int_equal(rc, 0);
    assert_int_equal(snapshots_pending(&f->node, mark), 0); /* ended before the exit */

    restart_holding(f, NULL, NULL);
    assert_int_equal(key_count(f), keys + 17000);
}

/* The manifest is written only once the store is durable at its index: a
 * node killed during the flush (the log not yet compacted) or right after
 * the manifest (entries past it are in the log) restarts with every key. */
static void test_kill_around_snapshot(void **state)
{
    struct fixture *f = *state;
    char hold[KR_PATH_MAX + 32];
    snprintf(hold, sizeof(hold), "%.400s/snapshot-hold", f->node.scratch);
    uint64_t keys = key_count(f);

    size_t mark = 0;
    restart_holding(f, hold, &mark);
    assert_int_equal(kr_write_file(hold, "", 0), 0);
    load_past_a_snapshot(f, "killa");
    assert_int_equal(snapshots_pending(&f->node, mark), 1);
    assert_int_equal(kr_node_kill9(&f->node), 0); /* during the held flush */
    assert_int_equal(unlink(hold), 0);
    restart_holding(f, NULL, NULL);
    assert_int_equal(key_count(f), keys + 17000);

    unsigned long long before = newest_snapshot(&f->node);
    load_past_a_snapshot(f, "killb");
    for (int i = 0; i < 200 && newest_snapshot(&f->node) <= before; i++)
        usleep(50 * 1000);
    assert_true(newest_snapshot(&f->node) > before); /* the manifest is on disk */
    assert_int_equal(kr_node_kill9(&f->node), 0);
    assert_int_equal(kr_node_start(&f->node), 0);
    assert_int_equal(key_count(f), keys + 34000);
}

static char *hex_of(const uint8_t *d, size_t n)
{
    char *s = malloc(2 * n + 1);
    assert_non_null(s);
    for (size_t i = 0; i < n; i++)
        snprintf(s + 2 * i, 3, "%02x", d[i]);
    return s;
}

static void test_import_bulk_cli(void **state)
{
    struct fixture *f = *state;
    uint8_t m[3][32];
    char *hex[3], path[KR_PATH_MAX + 32], file[1024];
    struct kr_out o;

    for (int i = 0; i < 3; i++) {
        assert_int_equal(RAND_bytes(m[i], 32), 1);
        hex[i] = hex_of(m[i], 32);
    }
    snprintf(file, sizeof(file), "# devices\nimp-0 %s\n\n  imp-1\t%s  \nimp-2 %s\n", hex[0],
             hex[1], hex[2]);
    assert_int_equal(kr_scratch_file(&f->node, "import.txt", file, strlen(file), path,
                                     sizeof(path)), 0);
    kr_cli(&f->node, NULL, 0, &o, "import-bulk", "--file", path, "--batch", "2", NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_non_null(strstr(o.err, "created 3, existed 0, failed 0"));
    assert_int_equal(count_lines((const char *)o.out), 3);
    for (int i = 0; i < 3; i++) { /* material never echoed */
        assert_null(strstr(o.err, hex[i]));
        assert_null(strstr((const char *)o.out, hex[i]));
    }
    kr_out_free(&o);

    /* Exported by the app principal (its group owns the keys): the same bytes. */
    for (int i = 0; i < 3; i++) {
        char ref[32];
        snprintf(ref, sizeof(ref), "name:imp-%d", i);
        kr_cli(&f->node, NULL, 0, &o, "export", ref, NULL);
        KR_ASSERT_EXIT(&o, 0);
        uint8_t *got = NULL;
        size_t got_len = 0;
        assert_int_equal(kr_hex_decode((const char *)o.out, &got, &got_len), 0);
        assert_int_equal(got_len, 32);
        assert_memory_equal(got, m[i], 32);
        free(got);
        kr_out_free(&o);
    }

    /* Again: all exist. A malformed line fails alone, without showing its bytes. */
    snprintf(file, sizeof(file), "imp-0 %s\nimp-bad %.31s\nimp-3 %s\n", hex[0], hex[1], hex[2]);
    assert_int_equal(kr_scratch_file(&f->node, "import2.txt", file, strlen(file), path,
                                     sizeof(path)), 0);
    kr_cli(&f->node, NULL, 0, &o, "import-bulk", "--file", path, NULL);
    KR_ASSERT_EXIT(&o, 1);
    assert_non_null(strstr(o.err, "created 1, existed 1, failed 1"));
    assert_non_null(strstr(o.err, "line 2"));
    char part[16];
    snprintf(part, sizeof(part), "%.12s", hex[1]);
    assert_null(strstr(o.err, part));
    kr_out_free(&o);
    for (int i = 0; i < 3; i++)
        free(hex[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_batch),
        cmocka_unit_test(test_nested_batch_refused),
        cmocka_unit_test(test_batch_reads_tallied),
        cmocka_unit_test(test_lone_reads_coalesced),
        cmocka_unit_test(test_batch_count_limit),
        cmocka_unit_test(test_batch_reply_frame),
        cmocka_unit_test(test_creates_share_entries),
        cmocka_unit_test(test_create_bulk_cli),
        cmocka_unit_test(test_import_bulk_cli),
        cmocka_unit_test(test_stop_during_snapshot),
        cmocka_unit_test(test_kill_around_snapshot),
    };

    signal(SIGPIPE, SIG_IGN);
    if (getenv("KR_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    return cmocka_run_group_tests_name("bulk", tests, group_setup, group_teardown);
}
