/* test_replication.c: the FSM under real raft logic without processes:
 * canonical/raft's fixture (in-memory I/O and network, deterministic time)
 * drives three servers, each applying entries to its own RocksDB store
 * through fsm_apply. Leader changes, a cut-off follower and client retries
 * with the same request id must leave every replica byte-identical, with
 * no key made twice. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <raft.h>
#include <raft/fixture.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"
#include "fsm.h"
#include "keyraft.h"
#include "store.h"

#define N_SERVERS 3
#define STEP_MS 10000

struct server {
    struct raft_fsm raft_fsm;
    struct fsm *fsm;
    struct store *store;
    struct raft *raft;
    char dir[64];
};

struct fx {
    struct raft_fixture fixture;
    struct server servers[N_SERVERS];
};

static uint64_t next_index(void *arg)
{
    struct server *s = arg;
    return raft_last_applied(s->raft) + 1;
}

static int apply_cb(struct raft_fsm *raft_fsm, const struct raft_buffer *buf, void **result)
{
    struct server *s = raft_fsm->data;
    struct fsm_result *res = NULL;
    if (fsm_apply(s->fsm, buf->base, buf->len, &res) != 0)
        return RAFT_IOERR;
    *result = res;
    return 0;
}

/* The snapshot threshold is set far above this test's log: raft never
 * snapshots here, and a call would be a test bug. */
static int snapshot_cb(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n)
{
    (void)fsm;
    (void)bufs;
    (void)n;
    fail_msg("unexpected snapshot");
    return RAFT_IOERR;
}

static int restore_cb(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    (void)fsm;
    (void)buf;
    fail_msg("unexpected restore");
    return RAFT_IOERR;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(raft_fixture_initialize(&f->fixture), 0);
    for (unsigned i = 0; i < N_SERVERS; i++) {
        struct server *s = &f->servers[i];
        snprintf(s->dir, sizeof(s->dir), "/tmp/kr-test-repl-XXXXXX");
        assert_non_null(mkdtemp(s->dir));
        assert_int_equal(store_open(s->dir, &s->store), 0);
        assert_int_equal(fsm_new(s->store, next_index, s, &s->fsm), 0);
        s->raft_fsm.version = 1;
        s->raft_fsm.data = s;
        s->raft_fsm.apply = apply_cb;
        s->raft_fsm.snapshot = snapshot_cb;
        s->raft_fsm.restore = restore_cb;
        assert_int_equal(raft_fixture_grow(&f->fixture, &s->raft_fsm), 0);
        s->raft = raft_fixture_get(&f->fixture, i);
        raft_set_snapshot_threshold(s->raft, 1u << 30);
    }
    struct raft_configuration conf;
    assert_int_equal(raft_fixture_configuration(&f->fixture, N_SERVERS, &conf), 0);
    assert_int_equal(raft_fixture_bootstrap(&f->fixture, &conf), 0);
    raft_configuration_close(&conf);
    assert_int_equal(raft_fixture_start(&f->fixture), 0);
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    struct fx *f = *state;
    raft_fixture_close(&f->fixture);
    for (unsigned i = 0; i < N_SERVERS; i++) {
        fsm_free(f->servers[i].fsm);
        store_close(f->servers[i].store);
        nftw(f->servers[i].dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    free(f);
    return 0;
}

/* ---- commands --------------------------------------------------------------------- */

struct put {
    Keyraft__Command cmd;
    Keyraft__PutKeyCommand put;
    Keyraft__KeyRecord rec;
    Keyraft__KeyVersionRecord ver;
    Keyraft__KeyVersionRecord *vers[1];
    char id[FSM_KEY_ID_LEN + 1];
    char name[32];
    char req[32];
    uint8_t sealed[28];
};

/* A create as the leader would propose it: a fresh id (the leader's RNG)
 * for request |req|; a retry of the same request carries a new id. */
static void make_put(struct put *p, unsigned id_seed, const char *name, const char *req)
{
    memset(p, 0, sizeof(*p));
    uint8_t rnd[14];
    for (unsigned i = 0; i < sizeof(rnd); i++)
        rnd[i] = (uint8_t)(id_seed * 7 + i);
    fsm_format_key_id(0, rnd, p->id);
    snprintf(p->name, sizeof(p->name), "%s", name);
    snprintf(p->req, sizeof(p->req), "%s", req);
    memset(p->sealed, (int)id_seed, sizeof(p->sealed));
    keyraft__key_version_record__init(&p->ver);
    p->ver.version = 1;
    p->ver.created_at = 1000 + id_seed;
    p->ver.sealed.data = p->sealed;
    p->ver.sealed.len = sizeof(p->sealed);
    p->ver.kcv = "abcdef";
    p->vers[0] = &p->ver;
    keyraft__key_record__init(&p->rec);
    p->rec.id = p->id;
    p->rec.name = p->name;
    p->rec.domain = (char *)FSM_DEFAULT_DOMAIN;
    p->rec.algorithm = KEYRAFT__ALGORITHM__AES_256;
    p->rec.state = KEYRAFT__KEY_STATE__ACTIVE;
    p->rec.current_version = 1;
    p->rec.n_versions = 1;
    p->rec.versions = p->vers;
    p->rec.created_at = 1000 + id_seed;
    keyraft__put_key_command__init(&p->put);
    p->put.key = &p->rec;
    keyraft__command__init(&p->cmd);
    p->cmd.request_id = p->req;
    p->cmd.op_case = KEYRAFT__COMMAND__OP_PUT_KEY;
    p->cmd.put_key = &p->put;
}

struct applied {
    struct raft_apply req;
    struct fx *f;
    unsigned server;
    int status;
    int done;
    struct fsm_result *result;
};

static void apply_done(struct raft_apply *req, int status, void *result)
{
    struct applied *a = req->data;
    a->status = status;
    a->done = 1;
    if (status == 0)
        a->result = fsm_take_result(a->f->servers[a->server].fsm, result);
}

/* Proposes one entry of |n| commands on the current leader and steps the
 * cluster until every connected server applied it. */
static raft_index propose(struct fx *f, Keyraft__Command **cmds, size_t n, struct applied *a)
{
    unsigned leader = raft_fixture_leader_index(&f->fixture);
    assert_true(leader < N_SERVERS);
    struct raft_buffer buf;
    uint8_t *bytes = NULL;
    assert_int_equal(command_batch_encode(cmds, n, raft_malloc, &bytes, &buf.len), 0);
    buf.base = bytes;
    memset(a, 0, sizeof(*a));
    a->f = f;
    a->server = leader;
    a->req.data = a;
    struct raft *r = raft_fixture_get(&f->fixture, leader);
    assert_int_equal(raft_apply(r, &a->req, &buf, 1, apply_done), 0);
    raft_index index = raft_last_index(r);
    assert_true(raft_fixture_step_until_applied(&f->fixture, leader, index, STEP_MS));
    assert_true(a->done);
    assert_int_equal(a->status, 0);
    assert_non_null(a->result);
    assert_int_equal(a->result->n, n);
    return index;
}

static void put_domain(struct fx *f)
{
    Keyraft__DomainRecord dom = KEYRAFT__DOMAIN_RECORD__INIT;
    uint8_t wrapped[16];
    memset(wrapped, 0xd0, sizeof(wrapped));
    dom.id = (char *)FSM_DEFAULT_DOMAIN;
    dom.wrapped_key.data = wrapped;
    dom.wrapped_key.len = sizeof(wrapped);
    Keyraft__PutDomainCommand pd = KEYRAFT__PUT_DOMAIN_COMMAND__INIT;
    pd.domain = &dom;
    Keyraft__Command cmd = KEYRAFT__COMMAND__INIT;
    cmd.op_case = KEYRAFT__COMMAND__OP_PUT_DOMAIN;
    cmd.put_domain = &pd;
    Keyraft__Command *cmds[1] = {&cmd};
    struct applied a;
    propose(f, cmds, 1, &a);
    assert_int_equal(a.result->ops[0].status, 0);
    free(a.result);
}

/* Every family of two stores holds the same rows, byte for byte. */
static void assert_same_stores(struct store *x, struct store *y)
{
    for (int cf = 0; cf < STORE_CF_COUNT; cf++) {
        struct store_iter *i1 = NULL, *i2 = NULL;
        assert_int_equal(store_iter_new(x, cf, NULL, 0, NULL, 0, &i1), 0);
        assert_int_equal(store_iter_new(y, cf, NULL, 0, NULL, 0, &i2), 0);
        while (store_iter_valid(i1) && store_iter_valid(i2)) {
            size_t k1, k2, v1, v2;
            const uint8_t *a = store_iter_key(i1, &k1), *b = store_iter_key(i2, &k2);
            assert_int_equal(k1, k2);
            assert_memory_equal(a, b, k1);
            a = store_iter_value(i1, &v1);
            b = store_iter_value(i2, &v2);
            assert_int_equal(v1, v2);
            assert_memory_equal(a, b, v1);
            store_iter_next(i1);
            store_iter_next(i2);
        }
        assert_int_equal(store_iter_valid(i1), store_iter_valid(i2));
        assert_int_equal(store_iter_status(i1), 0);
        assert_int_equal(store_iter_status(i2), 0);
        store_iter_free(i1);
        store_iter_free(i2);
    }
    assert_int_equal(store_applied_index(x), store_applied_index(y));
}

static size_t live_keys(struct store *s)
{
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, NULL, 0, NULL, 0, &it), 0);
    size_t n = 0;
    for (; store_iter_valid(it); store_iter_next(it))
        n++;
    store_iter_free(it);
    return n;
}

/* ---- tests -------------------------------------------------------------------------- */

/* Creates on one leader; the leader is deposed and a follower is cut off;
 * the new leader sees retries of earlier requests (new key ids, same
 * request ids, as a client retrying after a lost reply sends them) plus new
 * creates; the follower comes back. Every replica ends identical, each
 * request made exactly one key, and a retry answers with the first key. */
static void test_replicas_agree_across_leader_change_and_retries(void **state)
{
    struct fx *f = *state;
    raft_fixture_elect(&f->fixture, 0);
    put_domain(f);

    struct put puts[8];
    Keyraft__Command *cmds[8];
    char name[32], req[32];
    for (unsigned i = 0; i < 8; i++) {
        snprintf(name, sizeof(name), "device-%u", i);
        snprintf(req, sizeof(req), "req-%u", i);
        make_put(&puts[i], i + 1, name, req);
        cmds[i] = &puts[i].cmd;
    }
    struct applied first;
    propose(f, cmds, 8, &first);
    char first_ids[8][FSM_KEY_ID_LEN + 1];
    for (unsigned i = 0; i < 8; i++) {
        assert_int_equal(first.result->ops[i].status, 0);
        snprintf(first_ids[i], sizeof(first_ids[i]), "%s", first.result->ops[i].key_id);
    }
    free(first.result);

    /* New leader: server 1. Server 2 is cut off meanwhile. */
    raft_fixture_depose(&f->fixture);
    raft_fixture_elect(&f->fixture, 1);
    raft_fixture_disconnect(&f->fixture, 0, 2);
    raft_fixture_disconnect(&f->fixture, 1, 2);
    struct put again[6];
    for (unsigned i = 0; i < 4; i++) { /* retries of req-0, req-2, req-4, req-6 */
        snprintf(name, sizeof(name), "device-%u", 2 * i);
        snprintf(req, sizeof(req), "req-%u", 2 * i);
        make_put(&again[i], 100 + i, name, req);
        cmds[i] = &again[i].cmd;
    }
    make_put(&again[4], 200, "device-8", "req-8");
    make_put(&again[5], 201, "device-1", "req-new"); /* a new request for a taken name */
    cmds[4] = &again[4].cmd;
    cmds[5] = &again[5].cmd;
    struct applied second;
    raft_index last = propose(f, cmds, 6, &second);
    for (unsigned i = 0; i < 4; i++) {
        assert_int_equal(second.result->ops[i].status, 0);
        assert_string_equal(second.result->ops[i].key_id, first_ids[2 * i]);
    }
    assert_int_equal(second.result->ops[4].status, 0);
    assert_int_equal(second.result->ops[5].status, KR_EEXIST);
    free(second.result);

    /* Server 2 has not got it; back on the network it catches up. */
    assert_true(raft_last_applied(f->servers[2].raft) < last);
    raft_fixture_reconnect(&f->fixture, 0, 2);
    raft_fixture_reconnect(&f->fixture, 1, 2);
    assert_true(raft_fixture_step_until_applied(&f->fixture, N_SERVERS, last, STEP_MS));

    for (unsigned i = 0; i < N_SERVERS; i++)
        assert_int_equal(live_keys(f->servers[i].store), 9); /* device-0..8, once each */
    assert_same_stores(f->servers[0].store, f->servers[1].store);
    assert_same_stores(f->servers[0].store, f->servers[2].store);
    char found[FSM_KEY_ID_LEN + 1];
    for (unsigned s = 0; s < N_SERVERS; s++) {
        assert_int_equal(fsm_find_name(f->servers[s].store, FSM_DEFAULT_DOMAIN, "device-4", found),
                         0);
        assert_string_equal(found, first_ids[4]);
    }
}

/* A leader cut off from the majority loses leadership; its uncommitted
 * entry never applies anywhere; the majority's leader goes on. */
static void test_minority_leader_commits_nothing(void **state)
{
    struct fx *f = *state;
    raft_fixture_elect(&f->fixture, 0);
    put_domain(f);
    raft_fixture_disconnect(&f->fixture, 0, 1);
    raft_fixture_disconnect(&f->fixture, 0, 2);
    struct put lost, won;
    make_put(&lost, 50, "lost", "req-lost");
    Keyraft__Command *cmds[1] = {&lost.cmd};
    struct raft_buffer buf;
    uint8_t *bytes = NULL;
    assert_int_equal(command_batch_encode(cmds, 1, raft_malloc, &bytes, &buf.len), 0);
    buf.base = bytes;
    struct applied a = {.f = f, .server = 0};
    a.req.data = &a;
    assert_int_equal(raft_apply(f->servers[0].raft, &a.req, &buf, 1, apply_done), 0);
    assert_true(raft_fixture_step_until_state_is(&f->fixture, 0, RAFT_FOLLOWER, STEP_MS));
    assert_true(a.done);
    assert_int_not_equal(a.status, 0); /* outcome unknown to the client: it retries */
    assert_true(raft_fixture_step_until_has_leader(&f->fixture, STEP_MS));
    assert_int_not_equal(raft_fixture_leader_index(&f->fixture), 0);
    make_put(&won, 51, "won", "req-won");
    cmds[0] = &won.cmd;
    struct applied b;
    raft_index last = propose(f, cmds, 1, &b);
    assert_int_equal(b.result->ops[0].status, 0);
    free(b.result);
    raft_fixture_reconnect(&f->fixture, 0, 1);
    raft_fixture_reconnect(&f->fixture, 0, 2);
    assert_true(raft_fixture_step_until_applied(&f->fixture, N_SERVERS, last, STEP_MS));
    char found[FSM_KEY_ID_LEN + 1];
    for (unsigned s = 0; s < N_SERVERS; s++) {
        assert_int_equal(fsm_find_name(f->servers[s].store, FSM_DEFAULT_DOMAIN, "lost", found),
                         KR_ENOTFOUND);
        assert_int_equal(fsm_find_name(f->servers[s].store, FSM_DEFAULT_DOMAIN, "won", found), 0);
    }
    assert_same_stores(f->servers[0].store, f->servers[1].store);
    assert_same_stores(f->servers[1].store, f->servers[2].store);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_replicas_agree_across_leader_change_and_retries,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_minority_leader_commits_nothing, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
