/* test_snapshot.c: out-of-band snapshot transfer against a real keyraftd:
 * snapshot_fetch with the node's own certificate brings a checkpoint that
 * opens as a store with the node's applied index and keys; only node
 * certificates may open one; names, offsets and ids are checked; a closed
 * checkpoint is gone from the node's disk. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

/* Node internals, linked from kr_core: the fetcher and the store it fills. */
#include "fsm.h"
#include "log.h"
#include "snapfetch.h"
#include "snapshot.h"
#include "store.h"

#define N_KEYS 25

struct fixture {
    struct kr_node node;
    kr_client *admin;
    kr_client *as_node; /* presents the node's own certificate */
    char ca[KR_PATH_MAX], cert[KR_PATH_MAX], key[KR_PATH_MAX];
    char endpoint[64];
    struct kr_node twin; /* test_restart_behind_snapshot_fetches_store's peer */
};

static int group_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    log_set_level(LOG_LEVEL_WARN);
    if (kr_node_init(&f->node) != 0 || kr_node_start(&f->node) != 0 ||
        kr_node_client(&f->node, 30000, &f->admin) != 0)
        goto fail;
    snprintf(f->ca, sizeof(f->ca), "%.400s/tls/ca.pem", f->node.dir);
    snprintf(f->cert, sizeof(f->cert), "%.400s/tls/node.pem", f->node.dir);
    snprintf(f->key, sizeof(f->key), "%.400s/tls/node.key", f->node.dir);
    snprintf(f->endpoint, sizeof(f->endpoint), "127.0.0.1:%d", f->node.port);
    kr_client_config cc = {
        .endpoints = f->endpoint,
        .ca_file = f->ca,
        .cert_file = f->cert,
        .key_file = f->key,
        .timeout_ms = 30000,
    };
    if (kr_client_new(&cc, &f->as_node) != 0)
        goto fail;
    *state = f;
    return 0;
fail:
    kr_client_free(f->admin);
    kr_node_destroy(&f->node);
    free(f);
    return -1;
}

static int group_teardown(void **state)
{
    struct fixture *f = *state;
    if (f == NULL)
        return 0;
    kr_client_free(f->admin);
    kr_client_free(f->as_node);
    int alive = kr_node_alive(&f->node);
    int rc = alive ? kr_node_stop(&f->node) : 0;
    if (rc != 0) {
        fprintf(stderr, "keyraftd did not stop cleanly on SIGTERM: exit %d\n", rc);
        kr_node_dump_log(&f->node, 3000);
    }
    kr_node_destroy(&f->node);
    if (f->twin.dir[0] != '\0')
        kr_node_destroy(&f->twin);
    free(f);
    return alive && rc != 0 ? -1 : 0;
}

/* ---- helpers ------------------------------------------------------------------------ */

static uint64_t node_applied_index(kr_client *c)
{
    Keyraft__StatusRequest sr = KEYRAFT__STATUS_REQUEST__INIT;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_STATUS;
    req.status = &sr;
    Keyraft__Response *resp = NULL;
    assert_int_equal(kr_call(c, &req, &resp), 0);
    assert_int_equal(resp->status, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_NODE_STATUS);
    uint64_t idx = resp->node_status->applied_index;
    kr_response_free(resp);
    return idx;
}

/* Sends a snapshot op; returns the response (status checked by the caller). */
static Keyraft__Response *snap_open(kr_client *c)
{
    Keyraft__SnapshotOpenRequest o = KEYRAFT__SNAPSHOT_OPEN_REQUEST__INIT;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_OPEN;
    req.snapshot_open = &o;
    Keyraft__Response *resp = NULL;
    assert_int_equal(kr_call(c, &req, &resp), 0);
    return resp;
}

static Keyraft__Response *snap_read(kr_client *c, const char *id, const char *name,
                                    uint64_t offset, uint32_t length)
{
    Keyraft__SnapshotReadRequest r = KEYRAFT__SNAPSHOT_READ_REQUEST__INIT;
    r.id = (char *)id;
    r.name = (char *)name;
    r.offset = offset;
    r.length = length;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_READ;
    req.snapshot_read = &r;
    Keyraft__Response *resp = NULL;
    assert_int_equal(kr_call(c, &req, &resp), 0);
    return resp;
}

static int snap_close(kr_client *c, const char *id)
{
    Keyraft__SnapshotCloseRequest r = KEYRAFT__SNAPSHOT_CLOSE_REQUEST__INIT;
    r.id = (char *)id;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_CLOSE;
    req.snapshot_close = &r;
    Keyraft__Response *resp = NULL;
    assert_int_equal(kr_call(c, &req, &resp), 0);
    int st = resp->status;
    kr_response_free(resp);
    return st;
}

/* Number of entries in the node's DATA_DIR/snapshots (-1: no such dir). */
static int checkpoints_on_disk(const struct fixture *f)
{
    char path[KR_PATH_MAX + 16];
    snprintf(path, sizeof(path), "%.400s/snapshots", f->node.dir);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL)
        if (strcmp(ent->d_name, ".") != 0 && strcmp(ent->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static int path_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

static struct snapfetch_config fetch_config(const struct fixture *f, const char *const *eps,
                                            size_t n)
{
    struct snapfetch_config fc = {
        .endpoints = eps,
        .n_endpoints = n,
        .ca_file = f->ca,
        .cert_file = f->cert,
        .key_file = f->key,
        .timeout_ms = 120000,
        .call_timeout_ms = 20000,
    };
    return fc;
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_fetch_brings_the_store(void **state)
{
    struct fixture *f = *state;
    char ids[N_KEYS][40];
    for (int i = 0; i < N_KEYS; i++) {
        char name[32];
        snprintf(name, sizeof(name), "snap-key-%02d", i);
        Keyraft__KeyAttributes *a = NULL;
        assert_int_equal(kr_create_key(f->admin, name,
                                       i % 2 ? KEYRAFT__ALGORITHM__AES_256
                                             : KEYRAFT__ALGORITHM__HMAC_SHA256,
                                       NULL, 0, &a),
                         0);
        snprintf(ids[i], sizeof(ids[i]), "%s", a->id);
        kr_key_attributes_free(a);
    }
    uint64_t applied = node_applied_index(f->admin);
    assert_true(applied >= N_KEYS);

    char dest[KR_PATH_MAX + 16];
    snprintf(dest, sizeof(dest), "%.400s/fetched", f->node.scratch);
    /* An unreachable endpoint first (nothing listens on port 1): skipped. */
    const char *eps[] = {"127.0.0.1:1", f->endpoint};
    struct snapfetch_config fc = fetch_config(f, eps, 2);
    struct snapfetch_result res;
    memset(&res, 0, sizeof(res));
    assert_int_equal(snapshot_fetch(&fc, applied, dest, &res), 0);
    assert_string_equal(res.endpoint, f->endpoint);
    assert_true(res.applied_index >= applied);
    assert_true(res.n_files >= 3); /* CURRENT, MANIFEST, OPTIONS, SSTs */
    assert_true(res.bytes > 0);
    /* The node dropped the checkpoint once the fetch closed it. */
    assert_int_equal(checkpoints_on_disk(f), 0);

    /* The copy is a complete store at the node's index, with the keys. */
    uint64_t got = 0;
    assert_int_equal(store_probe(dest, &got), 0);
    assert_int_equal(got, res.applied_index);
    struct store *s = NULL;
    assert_int_equal(store_open(dest, &s), 0);
    assert_int_equal(store_applied_index(s), res.applied_index);
    for (int i = 0; i < N_KEYS; i++) {
        char name[32], id[FSM_KEY_ID_LEN + 1];
        snprintf(name, sizeof(name), "snap-key-%02d", i);
        assert_int_equal(fsm_find_name(s, FSM_DEFAULT_DOMAIN, name, id), 0);
        assert_string_equal(id, ids[i]);
        Keyraft__KeyRecord *rec = NULL;
        assert_int_equal(fsm_get_key(s, id, &rec), 0);
        assert_string_equal(rec->name, name);
        keyraft__key_record__free_unpacked(rec, NULL);
    }
    Keyraft__DomainRecord *dom = NULL;
    assert_int_equal(fsm_get_domain(s, FSM_DEFAULT_DOMAIN, &dom), 0);
    keyraft__domain_record__free_unpacked(dom, NULL);
    store_close(s);

    /* The destination must be new. */
    assert_int_equal(snapshot_fetch(&fc, applied, dest, NULL), KR_EEXIST);
    assert_int_equal(store_remove_dir(dest), 0);

    /* A peer behind the index asked for is skipped; nothing is left. */
    assert_int_equal(snapshot_fetch(&fc, applied + 1000000, dest, NULL), KR_EUNAVAIL);
    assert_false(path_exists(dest));
    assert_int_equal(checkpoints_on_disk(f), 0);

    /* The admin identity is no node: refused by the node, nothing written. */
    char admin_cert[KR_PATH_MAX + 16], admin_key[KR_PATH_MAX + 16];
    snprintf(admin_cert, sizeof(admin_cert), "%.400s/tls/admin.pem", f->node.dir);
    snprintf(admin_key, sizeof(admin_key), "%.400s/tls/admin.key", f->node.dir);
    fc.cert_file = admin_cert;
    fc.key_file = admin_key;
    assert_int_equal(snapshot_fetch(&fc, 0, dest, NULL), KR_EPERM);
    assert_false(path_exists(dest));
    /* No endpoint at all. */
    fc.n_endpoints = 0;
    assert_int_equal(snapshot_fetch(&fc, 0, dest, NULL), KR_EUNAVAIL);
}

static void test_admin_is_refused(void **state)
{
    struct fixture *f = *state;
    Keyraft__Response *resp = snap_open(f->admin);
    assert_int_equal(resp->status, KR_EPERM);
    assert_non_null(strstr(resp->message, "may not snapshot_open: it needs one of the roles node"));
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT__NOT_SET);
    kr_response_free(resp);
    assert_int_equal(checkpoints_on_disk(f), 0);

    /* Reads and closes too, even with a live checkpoint's id. */
    resp = snap_open(f->as_node);
    assert_int_equal(resp->status, 0);
    char id[80];
    snprintf(id, sizeof(id), "%s", resp->snapshot->id);
    char name[300];
    snprintf(name, sizeof(name), "%s", resp->snapshot->files[0]->name);
    kr_response_free(resp);
    resp = snap_read(f->admin, id, name, 0, 16);
    assert_int_equal(resp->status, KR_EPERM);
    assert_int_equal(resp->snapshot_data, NULL);
    kr_response_free(resp);
    assert_int_equal(snap_close(f->admin, id), KR_EPERM);
    assert_int_equal(checkpoints_on_disk(f), 1);
    assert_int_equal(snap_close(f->as_node, id), 0);
    assert_int_equal(checkpoints_on_disk(f), 0);
}

static void test_names_offsets_ids(void **state)
{
    struct fixture *f = *state;
    Keyraft__Response *open = snap_open(f->as_node);
    assert_int_equal(open->status, 0);
    assert_int_equal(open->result_case, KEYRAFT__RESPONSE__RESULT_SNAPSHOT);
    const Keyraft__SnapshotOpenResponse *o = open->snapshot;
    assert_int_equal(strlen(o->id), SNAPSHOT_ID_LEN);
    assert_true(o->applied_index >= 1);
    assert_true(o->n_files >= 3);
    assert_int_equal(checkpoints_on_disk(f), 1);

    /* The checkpoint is on the node's disk, and reads return its bytes. */
    char dir[KR_PATH_MAX + 64];
    snprintf(dir, sizeof(dir), "%.400s/snapshots/%s", f->node.dir, o->id);
    assert_true(path_exists(dir));
    const Keyraft__SnapshotFile *big = o->files[0];
    int have_current = 0;
    for (size_t i = 0; i < o->n_files; i++) {
        if (o->files[i]->size > big->size)
            big = o->files[i];
        if (strcmp(o->files[i]->name, "CURRENT") == 0)
            have_current = 1;
    }
    assert_true(have_current);
    assert_true(big->size > 64);
    char path[KR_PATH_MAX + 400];
    snprintf(path, sizeof(path), "%s/%s", dir, big->name);
    uint8_t *local = NULL;
    size_t local_len = 0;
    assert_int_equal(kr_read_file(path, &local, &local_len), 0);
    assert_int_equal(local_len, big->size);
    Keyraft__Response *r = snap_read(f->as_node, o->id, big->name, 10, 50);
    assert_int_equal(r->status, 0);
    assert_int_equal(r->snapshot_data->data.len, 50);
    assert_memory_equal(r->snapshot_data->data.data, local + 10, 50);
    kr_response_free(r);
    /* Near the end: what is left; at the end: nothing; past it: refused. */
    r = snap_read(f->as_node, o->id, big->name, big->size - 5, 100);
    assert_int_equal(r->status, 0);
    assert_int_equal(r->snapshot_data->data.len, 5);
    assert_memory_equal(r->snapshot_data->data.data, local + big->size - 5, 5);
    kr_response_free(r);
    r = snap_read(f->as_node, o->id, big->name, big->size, 100);
    assert_int_equal(r->status, 0);
    assert_int_equal(r->snapshot_data->data.len, 0);
    kr_response_free(r);
    r = snap_read(f->as_node, o->id, big->name, big->size + 1, 100);
    assert_int_equal(r->status, KR_EINVAL);
    kr_response_free(r);
    free(local);

    /* Names that are not a file of this checkpoint. */
    static const char *const bad[] = {"../x", "a/b", "no-such-file", "..", ".", "",
                                      "/etc/passwd", "../../db/CURRENT"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = snap_read(f->as_node, o->id, bad[i], 0, 10);
        if (r->status != KR_EINVAL)
            fail_msg("name '%s': status %d, want KR_EINVAL", bad[i], r->status);
        kr_response_free(r);
    }
    /* Ids that are not open. */
    r = snap_read(f->as_node, "0123456789abcdef0123456789abcdef", "CURRENT", 0, 10);
    assert_int_equal(r->status, KR_ENOTFOUND);
    kr_response_free(r);
    r = snap_read(f->as_node, "", "CURRENT", 0, 10);
    assert_int_equal(r->status, KR_ENOTFOUND);
    kr_response_free(r);
    assert_int_equal(snap_close(f->as_node, "nope"), KR_ENOTFOUND);

    /* At most two open at once. */
    Keyraft__Response *second = snap_open(f->as_node);
    assert_int_equal(second->status, 0);
    assert_string_not_equal(second->snapshot->id, o->id);
    Keyraft__Response *third = snap_open(f->as_node);
    assert_int_equal(third->status, KR_EBUSY);
    kr_response_free(third);
    assert_int_equal(checkpoints_on_disk(f), 2);
    assert_int_equal(snap_close(f->as_node, second->snapshot->id), 0);
    kr_response_free(second);

    /* Closed: gone from the disk, and from the protocol. */
    char id[80];
    snprintf(id, sizeof(id), "%s", o->id);
    assert_int_equal(snap_close(f->as_node, id), 0);
    assert_false(path_exists(dir));
    assert_int_equal(checkpoints_on_disk(f), 0);
    r = snap_read(f->as_node, id, "CURRENT", 0, 10);
    assert_int_equal(r->status, KR_ENOTFOUND);
    kr_response_free(r);
    assert_int_equal(snap_close(f->as_node, id), KR_ENOTFOUND);
    kr_response_free(open);
}

/* A checkpoint left open is removed when the node stops, and a restarted
 * node starts with none. */
static void test_stop_removes_checkpoints(void **state)
{
    struct fixture *f = *state;
    Keyraft__Response *open = snap_open(f->as_node);
    assert_int_equal(open->status, 0);
    kr_response_free(open);
    assert_int_equal(checkpoints_on_disk(f), 1);
    assert_int_equal(kr_node_stop(&f->node), 0);
    assert_int_equal(checkpoints_on_disk(f), 0);
    assert_int_equal(kr_node_start(&f->node), 0);
    assert_int_equal(checkpoints_on_disk(f), 0);
}

/* ---- a node restarting behind its raft snapshot -------------------------------------- */

#define BULK_KEYS 8300 /* past raft's 8192-entry snapshot threshold */

/* Replaces every |from| in file |path| by |to|. */
static void edit_file(const char *path, const char *from, const char *to)
{
    uint8_t *text = NULL;
    size_t len = 0;
    assert_int_equal(kr_read_file(path, &text, &len), 0);
    size_t from_len = strlen(from), to_len = strlen(to), n = 0;
    for (const char *p = (const char *)text; (p = strstr(p, from)) != NULL; p += from_len)
        n++;
    assert_true(n > 0);
    char *out = malloc(len + n * to_len + 1);
    assert_non_null(out);
    char *w = out;
    const char *r = (const char *)text, *hit;
    while ((hit = strstr(r, from)) != NULL) {
        memcpy(w, r, (size_t)(hit - r));
        w += hit - r;
        memcpy(w, to, to_len);
        w += to_len;
        r = hit + from_len;
    }
    size_t rest = strlen(r);
    memcpy(w, r, rest);
    w += rest;
    assert_int_equal(kr_write_file(path, out, (size_t)(w - out)), 0);
    free(out);
    free(text);
}

static int free_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
    socklen_t sl = sizeof(sa);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* A copy of the stopped node |from| in a new directory, serving on new
 * ports: a peer holding the same data, with the same certificates. */
static void make_twin(const struct kr_node *from, struct kr_node *twin)
{
    char cmd[3 * KR_PATH_MAX], path[KR_PATH_MAX + 32], a[128], b[128];
    memset(twin, 0, sizeof(*twin));
    snprintf(twin->dir, sizeof(twin->dir), "/tmp/krtest-XXXXXX");
    assert_non_null(mkdtemp(twin->dir));
    snprintf(twin->scratch, sizeof(twin->scratch), "/tmp/krtest-scratch-XXXXXX");
    assert_non_null(mkdtemp(twin->scratch));
    snprintf(cmd, sizeof(cmd), "cp -a '%s/.' '%s/'", from->dir, twin->dir);
    assert_int_equal(system(cmd), 0);
    snprintf(path, sizeof(path), "%s/node.log", twin->dir);
    assert_int_equal(kr_write_file(path, "", 0), 0);
    twin->port = free_port();
    twin->raft_port = free_port();
    snprintf(path, sizeof(path), "%s/keyraftd.conf", twin->dir);
    edit_file(path, from->dir, twin->dir);
    snprintf(a, sizeof(a), "listen = 127.0.0.1:%d\n", from->port);
    snprintf(b, sizeof(b), "listen = 127.0.0.1:%d\n", twin->port);
    edit_file(path, a, b);
    snprintf(a, sizeof(a), "raft_address = 127.0.0.1:%d\n", from->raft_port);
    snprintf(b, sizeof(b), "raft_address = 127.0.0.1:%d\n", twin->raft_port);
    edit_file(path, a, b);
    snprintf(path, sizeof(path), "%s/softhsm2.conf", twin->dir);
    edit_file(path, from->dir, twin->dir);
    snprintf(twin->client_conf, sizeof(twin->client_conf), "%.400s/client.conf", twin->dir);
    snprintf(a, sizeof(a), "endpoints = 127.0.0.1:%d\n", from->port);
    snprintf(b, sizeof(b), "endpoints = 127.0.0.1:%d\n", twin->port);
    edit_file(twin->client_conf, a, b);
    assert_int_equal(kr_client_file_load(twin->client_conf, &twin->cfile, &twin->ccfg), 0);
}

/* The node's store goes back to an old copy while its raft log holds a
 * snapshot far past it: at start, restore finds the store behind, fetches
 * a peer's store through [node] join, swaps it in, and the node serves
 * everything, including the keys made after the old copy. */
static void test_restart_behind_snapshot_fetches_store(void **state)
{
    struct fixture *f = *state;
    char old_db[KR_PATH_MAX + 16];
    snprintf(old_db, sizeof(old_db), "%.400s/old-db", f->node.scratch);
    const char *eps[] = {f->endpoint};
    struct snapfetch_config fc = fetch_config(f, eps, 1);
    struct snapfetch_result res;
    memset(&res, 0, sizeof(res));
    assert_int_equal(snapshot_fetch(&fc, 0, old_db, &res), 0);
    uint64_t old_index = res.applied_index;

    char last_name[32] = "", last_id[40] = "";
    for (int i = 0; i < BULK_KEYS; i++) {
        snprintf(last_name, sizeof(last_name), "bulk-%05d", i);
        Keyraft__KeyAttributes *a = NULL;
        int rc = kr_create_key(f->admin, last_name, KEYRAFT__ALGORITHM__HMAC_SHA256, NULL, 0, &a);
        if (rc != 0)
            fail_msg("create %s: %s", last_name, kr_client_last_error(f->admin));
        snprintf(last_id, sizeof(last_id), "%s", a->id);
        kr_key_attributes_free(a);
    }
    uint64_t applied = node_applied_index(f->admin);
    assert_true(applied > old_index + 8192);
    for (int i = 0; i < 300 && !kr_node_raft_snapshots(&f->node); i++)
        usleep(100 * 1000);
    assert_true(kr_node_raft_snapshots(&f->node));
    assert_int_equal(kr_node_stop(&f->node), 0);

    struct kr_node *twin = &f->twin;
    make_twin(&f->node, twin);
    assert_int_equal(kr_node_start(twin), 0);

    /* The node: old store, join pointing at the twin. */
    char path[KR_PATH_MAX + 32], join[128];
    snprintf(path, sizeof(path), "%.400s/db", f->node.dir);
    kr_rm_rf(path);
    assert_int_equal(rename(old_db, path), 0);
    snprintf(path, sizeof(path), "%.400s/keyraftd.conf", f->node.dir);
    snprintf(join, sizeof(join), "[node]\njoin = 127.0.0.1:%d\n", twin->port);
    edit_file(path, "[node]\n", join);
    assert_int_equal(kr_node_start(&f->node), 0);

    uint8_t *log = NULL;
    size_t log_len = 0;
    snprintf(path, sizeof(path), "%.400s/node.log", f->node.dir);
    assert_int_equal(kr_read_file(path, &log, &log_len), 0);
    char want[128];
    snprintf(want, sizeof(want), "store fetched from 127.0.0.1:%d", twin->port);
    if (strstr((const char *)log, want) == NULL) {
        kr_node_dump_log(&f->node, 3000);
        fail_msg("the node log does not say '%s'", want);
    }
    free(log);
    assert_true(node_applied_index(f->admin) >= applied);
    Keyraft__KeyAttributes *a = NULL;
    char ref[48];
    snprintf(ref, sizeof(ref), "name:%s", last_name);
    assert_int_equal(kr_get_key(f->admin, ref, &a), 0);
    assert_string_equal(a->id, last_id);
    kr_key_attributes_free(a);
    a = NULL;
    assert_int_equal(kr_get_key(f->admin, "name:bulk-00000", &a), 0);
    kr_key_attributes_free(a);
    /* The swap left nothing behind. */
    snprintf(path, sizeof(path), "%.400s/db.incoming", f->node.dir);
    assert_false(path_exists(path));
    snprintf(path, sizeof(path), "%.400s/db.old", f->node.dir);
    assert_false(path_exists(path));
    /* And the node keeps working: a write, then a clean restart. */
    a = NULL;
    assert_int_equal(kr_create_key(f->admin, "after-fetch", KEYRAFT__ALGORITHM__AES_256, NULL, 0,
                                   &a),
                     0);
    kr_key_attributes_free(a);
    assert_int_equal(kr_node_restart(&f->node), 0);
    a = NULL;
    assert_int_equal(kr_get_key(f->admin, "name:after-fetch", &a), 0);
    kr_key_attributes_free(a);
    kr_node_destroy(twin);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fetch_brings_the_store),
        cmocka_unit_test(test_admin_is_refused),
        cmocka_unit_test(test_names_offsets_ids),
        cmocka_unit_test(test_stop_removes_checkpoints),
        cmocka_unit_test(test_restart_behind_snapshot_fetches_store),
    };
    if (getenv("KR_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    return cmocka_run_group_tests_name("snapshot", tests, group_setup, group_teardown);
}
