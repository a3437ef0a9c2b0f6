/* test_peer.c: real canonical/raft nodes in one process and on one loop,
 * talking to each other only through the mutual-TLS peer transport. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "peer.h"
#include "pki.h"
#include "tls.h"

#define N_NODES 3
#define N_ENTRIES 20
/* Under ASan every node runs a few times slower: raft's timers and our
 * bounds grow together, so a slow heartbeat is not taken for a dead leader. */
#if defined(__SANITIZE_ADDRESS__)
#define SLOW 3
#else
#define SLOW 1
#endif
#define ELECTION_MS (500 * SLOW)
#define HEARTBEAT_MS (50 * SLOW)
#define RETRY_MS 200
#define PATH_CAP 192
#define MAX_RAW 8
#define N_TLSPEERS 5

/* --- certificates, made once for the whole group ---------------------------- */

struct identity {
    char cert[PATH_CAP], key[PATH_CAP];
};

static struct {
    char dir[64];
    char ca[PATH_CAP], ca_key[PATH_CAP];
    char ca2[PATH_CAP], ca2_key[PATH_CAP];
    struct identity node[N_NODES + 1]; /* node-1 .. node-3 from the cluster CA */
    struct identity foreign3;          /* "node-3", but from another CA */
    struct identity node9;             /* "node-9" from the cluster CA */
    struct identity client3;           /* client certificate "node-3", cluster CA */
} P;

static void join(char *out, const char *dir, const char *name)
{
    int n = snprintf(out, PATH_CAP, "%s/%s", dir, name);
    assert_true(n > 0 && n < PATH_CAP);
}

static void issue_node(const char *ca, const char *ca_key, const char *cn, const char *file,
                       struct identity *out)
{
    char name[64];
    snprintf(name, sizeof(name), "%s.crt", file);
    join(out->cert, P.dir, name);
    snprintf(name, sizeof(name), "%s.key", file);
    join(out->key, P.dir, name);
    assert_int_equal(pki_issue_node(ca, ca_key, cn, NULL, 1, out->cert, out->key), 0);
}

static int group_setup(void **state)
{
    (void)state;
    /* keyraftd ignores SIGPIPE (node.c); the transport relies on it when raft
     * writes to a tunnel the peer already closed. */
    signal(SIGPIPE, SIG_IGN);
    snprintf(P.dir, sizeof(P.dir), "/tmp/kr-test-peer-XXXXXX");
    assert_non_null(mkdtemp(P.dir));
    join(P.ca, P.dir, "ca.crt");
    join(P.ca_key, P.dir, "ca.key");
    join(P.ca2, P.dir, "ca2.crt");
    join(P.ca2_key, P.dir, "ca2.key");
    assert_int_equal(pki_make_ca("cluster CA", 1, P.ca, P.ca_key), 0);
    assert_int_equal(pki_make_ca("other CA", 1, P.ca2, P.ca2_key), 0);
    for (int i = 1; i <= N_NODES; i++) {
        char cn[32];
        peer_node_name((unsigned long long)i, cn, sizeof(cn));
        issue_node(P.ca, P.ca_key, cn, cn, &P.node[i]);
    }
    issue_node(P.ca2, P.ca2_key, "node-3", "foreign-node-3", &P.foreign3);
    issue_node(P.ca, P.ca_key, "node-9", "node-9", &P.node9);
    join(P.client3.cert, P.dir, "client-node-3.crt");
    join(P.client3.key, P.dir, "client-node-3.key");
    assert_int_equal(pki_issue_client(P.ca, P.ca_key, "node-3", NULL, 1, P.client3.cert,
                                      P.client3.key),
                     0);
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_teardown(void **state)
{
    (void)state;
    nftw(P.dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* --- one raft node ------------------------------------------------------------- */

struct cluster;

struct node {
    struct cluster *cl;
    raft_id id;
    char address[32];
    char dir[PATH_CAP];
    struct tls_ctx *server_tls, *client_tls;
    struct raft_uv_transport transport;
    struct raft_io io;
    struct raft_fsm fsm;
    struct raft raft;
    int have_transport, have_io, have_raft, closing, closed;
    uint64_t applied[N_ENTRIES]; /* sequence numbers, in apply order */
    unsigned n_applied;
    unsigned n_bad; /* entries that are not what the leader proposed */
};

/* A test-owned TCP handle: a silent listener's accepted socket or a raw client. */
struct raw {
    struct cluster *cl;
    uv_tcp_t tcp;
    uv_connect_t connect;
    int open, connected, eof;
};

/* A hand-driven TLS client speaking the transport's preamble (test 6). */
enum script { SEND_BAD_MAGIC, SEND_NO_ADDRESS, SEND_WRONG_ID, SEND_SPLIT, SEND_JOINED };

struct tlspeer {
    uv_tcp_t tcp;
    uv_connect_t connect;
    struct tls_conn *tls;
    enum script script;
    int open, handshaken, failed, eof;
};

struct cluster {
    uv_loop_t loop;
    uv_timer_t pulse; /* wakes uv_run(UV_RUN_ONCE) so deadlines are checked */
    struct node nodes[N_NODES];
    int ports[N_NODES];
    unsigned healthy; /* bit i: nodes[i] is expected to take part */
    struct node *leader;
    struct raft_apply reqs[N_ENTRIES];
    unsigned n_apply_cb, n_apply_ok;
    unsigned target; /* entries every healthy node must have applied */
    /* test 5: a listener that accepts and never speaks, and raw clients */
    struct raw silent;
    struct raw accepted[MAX_RAW];
    unsigned n_accepted;
    struct raw clients[2];
    struct tlspeer tlspeers[N_TLSPEERS];
    char dir[PATH_CAP];
    char log_path[PATH_CAP];
    int saved_stderr;
    int shut_down;
    int passed;
};

/* Entry |i| (0-based) carries sequence number i + 1 in its first 8 bytes and a
 * pattern after it; every fifth one is ~160 KB so it spans many TLS records. */
static size_t entry_len(unsigned i) { return 8 * (1 + (i % 5 == 4 ? 20000 : i)); }

static uint8_t entry_byte(uint64_t seq, size_t k) { return (uint8_t)(seq * 31 + k); }

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    struct node *n = fsm->data;
    *result = NULL;
    uint64_t seq = 0;
    if (buf->len < 8 || n->n_applied == N_ENTRIES) {
        n->n_bad++;
        return 0;
    }
    memcpy(&seq, buf->base, 8);
    const uint8_t *p = buf->base;
    int ok = seq >= 1 && seq <= N_ENTRIES && buf->len == entry_len((unsigned)seq - 1);
    for (size_t k = 8; ok && k < buf->len; k++)
        ok = p[k] == entry_byte(seq, k);
    if (!ok)
        n->n_bad++;
    n->applied[n->n_applied++] = seq;
    return 0;
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct node *n = fsm->data;
    struct raft_buffer *b = raft_malloc(sizeof(*b));
    if (b == NULL)
        return RAFT_NOMEM;
    b->len = 8 * (1 + (size_t)n->n_applied);
    b->base = raft_malloc(b->len);
    if (b->base == NULL) {
        raft_free(b);
        return RAFT_NOMEM;
    }
    uint64_t count = n->n_applied;
    memcpy(b->base, &count, 8);
    memcpy((uint8_t *)b->base + 8, n->applied, 8 * (size_t)n->n_applied);
    *bufs = b;
    *n_bufs = 1;
    return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    struct node *n = fsm->data;
    uint64_t count = 0;
    if (buf->len < 8)
        return RAFT_MALFORMED;
    memcpy(&count, buf->base, 8);
    if (count > N_ENTRIES || buf->len != 8 * (1 + count))
        return RAFT_MALFORMED;
    memcpy(n->applied, (uint8_t *)buf->base + 8, 8 * count);
    n->n_applied = (unsigned)count;
    raft_free(buf->base);
    return 0;
}

static int free_ports(int *ports, int n)
{
    int fds[N_NODES + 1];
    int rv = 0;
    for (int i = 0; i < n; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(a);
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof(a)) != 0 ||
            getsockname(fds[i], (struct sockaddr *)&a, &len) != 0)
            rv = -1;
        ports[i] = ntohs(a.sin_port);
    }
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return rv;
}

/* Sets up node |i| (raft id i + 1) with its TLS identity; does not start it. */
static void node_init(struct cluster *cl, int i, const char *ca, const struct identity *who)
{
    struct node *n = &cl->nodes[i];
    n->cl = cl;
    n->id = (raft_id)i + 1;
    snprintf(n->address, sizeof(n->address), "127.0.0.1:%d", cl->ports[i]);
    char name[16];
    snprintf(name, sizeof(name), "n%d", i + 1);
    join(n->dir, cl->dir, name);
    if (mkdir(n->dir, 0700) != 0)
        assert_int_equal(errno, EEXIST); /* a restart reuses its raft log */
    assert_int_equal(tls_server_ctx_new(ca, who->cert, who->key, &n->server_tls), 0);
    assert_int_equal(tls_client_ctx_new(ca, who->cert, who->key, &n->client_tls), 0);
    assert_int_equal(peer_transport_init(&n->transport, &cl->loop, n->server_tls, n->client_tls),
                     0);
    n->have_transport = 1;
    assert_int_equal(raft_uv_init(&n->io, &cl->loop, n->dir, &n->transport), 0);
    n->have_io = 1;
    raft_uv_set_connect_retry_delay(&n->io, RETRY_MS);
    n->fsm.version = 1;
    n->fsm.data = n;
    n->fsm.apply = fsm_apply;
    n->fsm.snapshot = fsm_snapshot;
    n->fsm.restore = fsm_restore;
    int rv = raft_init(&n->raft, &n->io, &n->fsm, n->id, n->address);
    if (rv != 0)
        fail_msg("raft_init node %d: %s (%s)", i + 1, raft_strerror(rv), n->io.errmsg);
    n->have_raft = 1;
    n->raft.data = n;
    /* Pre-vote stays off (keyraftd turns it on) so that a refused node keeps
     * campaigning, i.e. keeps dialling its peers with rising terms. */
    raft_set_election_timeout(&n->raft, ELECTION_MS);
    raft_set_heartbeat_timeout(&n->raft, HEARTBEAT_MS);
}

/* Every node gets the same 3-voter configuration. */
static void node_bootstrap(struct cluster *cl, int i)
{
    struct raft_configuration conf;
    raft_configuration_init(&conf);
    for (int k = 0; k < N_NODES; k++) {
        char address[32];
        snprintf(address, sizeof(address), "127.0.0.1:%d", cl->ports[k]);
        assert_int_equal(raft_configuration_add(&conf, (raft_id)k + 1, address, RAFT_VOTER), 0);
    }
    int rv = raft_bootstrap(&cl->nodes[i].raft, &conf);
    raft_configuration_close(&conf);
    assert_int_equal(rv, 0);
}

static void node_start(struct cluster *cl, int i)
{
    int rv = raft_start(&cl->nodes[i].raft);
    if (rv != 0)
        fail_msg("raft_start node %d: %s", i + 1, raft_errmsg(&cl->nodes[i].raft));
}

static void node_bootstrap_start(struct cluster *cl, int i)
{
    node_bootstrap(cl, i);
    node_start(cl, i);
}

/* --- driving the loop --------------------------------------------------------- */

typedef int (*cond_fn)(struct cluster *cl);

static void on_pulse(uv_timer_t *t) { (void)t; }

/* Runs the loop until |cond| holds or |ms| pass; returns whether it holds. */
static int run_until(struct cluster *cl, cond_fn cond, unsigned ms)
{
    uint64_t deadline = uv_hrtime() + (uint64_t)ms * 1000000u;
    while (cond == NULL || !cond(cl)) {
        if (uv_hrtime() >= deadline)
            return 0;
        uv_run(&cl->loop, UV_RUN_ONCE);
    }
    return 1;
}

static void run_for(struct cluster *cl, unsigned ms) { run_until(cl, NULL, ms); }

/* A leader that every healthy node follows. */
static int have_leader(struct cluster *cl)
{
    cl->leader = NULL;
    for (int i = 0; i < N_NODES; i++) {
        struct node *n = &cl->nodes[i];
        if ((cl->healthy & (1u << i)) && raft_state(&n->raft) == RAFT_LEADER)
            cl->leader = n;
    }
    if (cl->leader == NULL)
        return 0;
    for (int i = 0; i < N_NODES; i++) {
        raft_id id = 0;
        const char *address = NULL;
        if (!(cl->healthy & (1u << i)))
            continue;
        raft_leader(&cl->nodes[i].raft, &id, &address);
        if (id != cl->leader->id)
            return 0;
    }
    return 1;
}

static int healthy_applied_all(struct cluster *cl)
{
    for (int i = 0; i < N_NODES; i++)
        if ((cl->healthy & (1u << i)) && cl->nodes[i].n_applied < cl->target)
            return 0;
    return cl->n_apply_cb == cl->target;
}

static void apply_done(struct raft_apply *req, int status, void *result)
{
    struct cluster *cl = req->data;
    (void)result;
    cl->n_apply_cb++;
    if (status == 0)
        cl->n_apply_ok++;
}

/* Proposes entries [first, first + count) on the leader, one raft_apply each. */
static void apply_entries(struct cluster *cl, unsigned first, unsigned count)
{
    assert_true(first + count <= N_ENTRIES);
    cl->target = first + count;
    for (unsigned i = first; i < first + count; i++) {
        struct raft_buffer buf = {.len = entry_len(i)};
        buf.base = raft_malloc(buf.len);
        assert_non_null(buf.base);
        uint64_t seq = i + 1;
        memcpy(buf.base, &seq, 8);
        for (size_t k = 8; k < buf.len; k++)
            ((uint8_t *)buf.base)[k] = entry_byte(seq, k);
        cl->reqs[i].data = cl;
        int rv = raft_apply(&cl->leader->raft, &cl->reqs[i], &buf, 1, apply_done);
        if (rv != 0) {
            raft_free(buf.base);
            fail_msg("raft_apply %u: %s", i, raft_strerror(rv));
        }
    }
}

static void assert_applied_in_order(const struct node *n, unsigned count)
{
    assert_int_equal(n->n_bad, 0);
    assert_int_equal(n->n_applied, count);
    for (unsigned i = 0; i < count; i++)
        assert_int_equal(n->applied[i], i + 1);
}

/* --- shutting down --------------------------------------------------------------- */

static void raft_closed(struct raft *r)
{
    struct node *n = r->data;
    raft_uv_close(&n->io);
    peer_transport_cleanup(&n->transport);
    n->closed = 1;
}

static int all_closed(struct cluster *cl)
{
    for (int i = 0; i < N_NODES; i++)
        if (cl->nodes[i].closing && !cl->nodes[i].closed)
            return 0;
    return 1;
}

static void raw_closed(uv_handle_t *h)
{
    struct raw *r = h->data;
    r->open = 0;
}

static void raw_close(struct raw *r)
{
    if (r->open && !uv_is_closing((uv_handle_t *)&r->tcp))
        uv_close((uv_handle_t *)&r->tcp, raw_closed);
}

static void tlspeer_closed(uv_handle_t *h)
{
    struct tlspeer *tp = h->data;
    tls_conn_free(tp->tls);
    tp->tls = NULL;
    tp->open = 0;
}

static void print_handle(uv_handle_t *h, void *arg)
{
    (void)arg;
    fprintf(stderr, "leaked handle: %s%s\n", uv_handle_type_name(uv_handle_get_type(h)),
            uv_is_closing(h) ? " (closing)" : "");
}

/* Closes every node and test handle; returns uv_loop_close's result. */
static int cluster_shutdown(struct cluster *cl)
{
    cl->shut_down = 1;
    for (int i = 0; i < N_NODES; i++) {
        struct node *n = &cl->nodes[i];
        if (n->have_raft && !n->closing) {
            n->closing = 1;
            raft_close(&n->raft, raft_closed);
        } else if (!n->have_raft) {
            if (n->have_io)
                raft_uv_close(&n->io);
            if (n->have_transport)
                peer_transport_cleanup(&n->transport);
        }
    }
    int closed = run_until(cl, all_closed, 10000);
    raw_close(&cl->silent);
    for (unsigned i = 0; i < cl->n_accepted; i++)
        raw_close(&cl->accepted[i]);
    for (int i = 0; i < 2; i++)
        raw_close(&cl->clients[i]);
    for (int i = 0; i < N_TLSPEERS; i++)
        if (cl->tlspeers[i].open && !uv_is_closing((uv_handle_t *)&cl->tlspeers[i].tcp))
            uv_close((uv_handle_t *)&cl->tlspeers[i].tcp, tlspeer_closed);
    uv_close((uv_handle_t *)&cl->pulse, NULL);
    uint64_t deadline = uv_hrtime() + 5000000000u;
    while (uv_loop_alive(&cl->loop) && uv_hrtime() < deadline) {
        uv_run(&cl->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    int rv = uv_loop_close(&cl->loop);
    if (rv != 0)
        uv_walk(&cl->loop, print_handle, NULL);
    for (int i = 0; i < N_NODES && closed; i++) {
        tls_ctx_free(cl->nodes[i].server_tls);
        tls_ctx_free(cl->nodes[i].client_tls);
        cl->nodes[i].server_tls = cl->nodes[i].client_tls = NULL;
    }
    if (!closed)
        return -1;
    return rv;
}

/* --- log capture: the transport reports refusals on stderr --------------------- */

static char *log_text(const struct cluster *cl)
{
    FILE *f = fopen(cl->log_path, "r");
    assert_non_null(f);
    size_t cap = 1 << 16, len = 0;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t n;
    while ((n = fread(s + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) {
            cap *= 2;
            s = realloc(s, cap);
            assert_non_null(s);
        }
    }
    s[len] = '\0';
    fclose(f);
    return s;
}

static int log_count(const struct cluster *cl, const char *needle)
{
    char *s = log_text(cl);
    int count = 0;
    for (const char *p = s; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        count++;
    free(s);
    return count;
}

static int setup(void **state)
{
    struct cluster *cl = calloc(1, sizeof(*cl));
    assert_non_null(cl);
    snprintf(cl->dir, sizeof(cl->dir), "/tmp/kr-test-peer-run-XXXXXX");
    assert_non_null(mkdtemp(cl->dir));
    join(cl->log_path, cl->dir, "stderr.log");
    assert_int_equal(free_ports(cl->ports, N_NODES), 0);
    assert_int_equal(uv_loop_init(&cl->loop), 0);
    assert_int_equal(uv_timer_init(&cl->loop, &cl->pulse), 0);
    assert_int_equal(uv_timer_start(&cl->pulse, on_pulse, 10, 10), 0);
    fflush(stderr);
    cl->saved_stderr = dup(STDERR_FILENO);
    int fd = open(cl->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
    assert_true(cl->saved_stderr >= 0 && fd >= 0);
    assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
    close(fd);
    *state = cl;
    return 0;
}

/* Restores stderr; on failure (or KR_TEST_VERBOSE) shows what was logged. */
static int teardown(void **state)
{
    struct cluster *cl = *state;
    int rv = 0;
    if (!cl->shut_down)
        rv = cluster_shutdown(cl);
    fflush(stderr);
    dup2(cl->saved_stderr, STDERR_FILENO);
    close(cl->saved_stderr);
    if (!cl->passed || getenv("KR_TEST_VERBOSE") != NULL) {
        char *s = log_text(cl);
        fprintf(stderr, "---- log of the test ----\n%s---- end of log ----\n", s);
        free(s);
    }
    nftw(cl->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    /* A loop that did not close still has handles pointing into |cl|. */
    if (rv == 0)
        free(cl);
    return rv == 0 ? 0 : -1;
}

/* Shared by tests 2-4: node 3 has a bad identity, nodes 1 and 2 commit on
 * their own, node 3 never hears from them nor disturbs them. */
static void run_with_refused_node3(struct cluster *cl, const char *ca3, const struct identity *id3)
{
    node_init(cl, 0, P.ca, &P.node[1]);
    node_init(cl, 1, P.ca, &P.node[2]);
    node_init(cl, 2, ca3, id3);
    for (int i = 0; i < N_NODES; i++)
        node_bootstrap_start(cl, i);
    cl->healthy = 0x3;
    assert_true(run_until(cl, have_leader, 10000 * SLOW));
    struct node *leader = cl->leader;
    raft_term term = leader->raft.current_term;
    apply_entries(cl, 0, N_ENTRIES);
    assert_true(run_until(cl, healthy_applied_all, 10000 * SLOW));
    assert_int_equal(cl->n_apply_ok, N_ENTRIES);
    assert_applied_in_order(&cl->nodes[0], N_ENTRIES);
    assert_applied_in_order(&cl->nodes[1], N_ENTRIES);
    /* Several reconnect rounds and node 3 elections later: */
    run_for(cl, 2500 * SLOW);
    struct node *n3 = &cl->nodes[2];
    assert_int_equal(n3->n_applied, 0);
    assert_int_equal(n3->n_bad, 0);
    raft_id known = 0;
    const char *address = NULL;
    raft_leader(&n3->raft, &known, &address);
    assert_int_equal(known, 0);          /* no AppendEntries ever reached it */
    assert_true(n3->raft.current_term > term); /* it kept campaigning ... */
    /* ... without disturbing the leader. */
    assert_int_equal(raft_state(&leader->raft), RAFT_LEADER);
    assert_int_equal(leader->raft.current_term, term);
}

/* --- tests ----------------------------------------------------------------------- */

/* 1. Three nodes elect a leader and replicate 20 entries in the same order. */
static void test_three_nodes_replicate(void **state)
{
    struct cluster *cl = *state;
    for (int i = 0; i < N_NODES; i++)
        node_init(cl, i, P.ca, &P.node[i + 1]);
    for (int i = 0; i < N_NODES; i++)
        node_bootstrap_start(cl, i);
    cl->healthy = 0x7;
    assert_true(run_until(cl, have_leader, 10000 * SLOW));
    apply_entries(cl, 0, N_ENTRIES);
    assert_true(run_until(cl, healthy_applied_all, 10000 * SLOW));
    assert_int_equal(cl->n_apply_ok, N_ENTRIES);
    for (int i = 0; i < N_NODES; i++)
        assert_applied_in_order(&cl->nodes[i], N_ENTRIES);
    assert_int_equal(log_count(cl, "refused"), 0);
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

/* 2. A node-3 certificate from another CA is refused by nodes 1 and 2. */
static void test_foreign_ca_refused(void **state)
{
    struct cluster *cl = *state;
    run_with_refused_node3(cl, P.ca, &P.foreign3);
    assert_true(log_count(cl, "TLS refused") > 0);
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

/* 3. A valid node certificate "node-9" cannot speak as raft id 3. */
static void test_identity_binding(void **state)
{
    struct cluster *cl = *state;
    run_with_refused_node3(cl, P.ca, &P.node9);
    /* nodes 1/2 accepting from it, and nodes 1/2 dialling it */
    assert_true(log_count(cl, "peer certificate 'node-9' claims raft id 3: refused") > 0);
    assert_true(log_count(cl, "expected certificate 'node-3', got 'node-9': refused") > 0);
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

/* 4. A client certificate named like a node ("node-3", clientAuth only) is
 * not a node. */
static void test_client_certificate_refused(void **state)
{
    struct cluster *cl = *state;
    run_with_refused_node3(cl, P.ca, &P.client3);
    assert_true(log_count(cl, "non-node certificate 'node-3': refused") > 0);
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

static void raw_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char scratch[4096];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(scratch, sizeof(scratch));
}

static void raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct raw *r = s->data;
    (void)buf;
    if (nread < 0)
        r->eof = 1;
}

static void silent_connection(uv_stream_t *listener, int status)
{
    struct raw *srv = listener->data;
    struct cluster *cl = srv->cl;
    if (status != 0 || cl->n_accepted == MAX_RAW)
        return;
    struct raw *r = &cl->accepted[cl->n_accepted++];
    r->cl = cl;
    uv_tcp_init(&cl->loop, &r->tcp);
    r->tcp.data = r;
    r->open = 1;
    if (uv_accept(listener, (uv_stream_t *)&r->tcp) == 0)
        uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
}

/* A listener that accepts and never says a word. */
static void silent_listen(struct cluster *cl, int port)
{
    struct sockaddr_in a;
    assert_int_equal(uv_ip4_addr("127.0.0.1", port, &a), 0);
    cl->silent.cl = cl;
    assert_int_equal(uv_tcp_init(&cl->loop, &cl->silent.tcp), 0);
    cl->silent.tcp.data = &cl->silent;
    cl->silent.open = 1;
    assert_int_equal(uv_tcp_bind(&cl->silent.tcp, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&cl->silent.tcp, 16, silent_connection), 0);
}

static void raw_connected(uv_connect_t *req, int status)
{
    struct raw *r = req->data;
    if (status == 0) {
        r->connected = 1;
        uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
    }
}

static void raw_connect(struct cluster *cl, struct raw *r, int port)
{
    struct sockaddr_in a;
    assert_int_equal(uv_ip4_addr("127.0.0.1", port, &a), 0);
    r->cl = cl;
    assert_int_equal(uv_tcp_init(&cl->loop, &r->tcp), 0);
    r->tcp.data = r;
    r->open = 1;
    r->connect.data = r;
    assert_int_equal(uv_tcp_connect(&r->connect, &r->tcp, (struct sockaddr *)&a, raw_connected),
                     0);
}

static int two_silent_dials_and_idle_client_dropped(struct cluster *cl)
{
    return cl->n_accepted >= 2 && cl->clients[0].eof;
}

static int client2_connected(struct cluster *cl) { return cl->clients[1].connected; }

static int peers_see_eof(struct cluster *cl)
{
    return cl->clients[1].eof && cl->n_accepted >= 2 && cl->accepted[cl->n_accepted - 1].eof;
}

/* 5. Handshakes that never finish time out (both directions) and raft
 * redials; closing raft while handshakes are pending cancels them, drops the
 * peers' sockets and leaves no handle on the loop. */
static void test_close_with_pending_handshakes(void **state)
{
    struct cluster *cl = *state;
    /* Node 2's address is a listener that accepts and never answers; nothing
     * listens on node 3's. */
    silent_listen(cl, cl->ports[1]);

    node_init(cl, 0, P.ca, &P.node[1]);
    node_bootstrap_start(cl, 0);
    raw_connect(cl, &cl->clients[0], cl->ports[0]); /* connects, never speaks TLS */
    assert_true(run_until(cl, two_silent_dials_and_idle_client_dropped, 9000));
    assert_true(cl->accepted[0].eof); /* the first dial was given up ... */
    assert_true(log_count(cl, "no TLS handshake within") >= 2); /* ... by the timer */

    raw_connect(cl, &cl->clients[1], cl->ports[0]);
    assert_true(run_until(cl, client2_connected, 2000));
    run_for(cl, 100);
    assert_false(cl->clients[1].eof);
    assert_false(cl->accepted[cl->n_accepted - 1].eof);

    /* Close with one inbound and one outbound handshake in flight: both are
     * cancelled at once, not left to the 5 s handshake timer. */
    cl->nodes[0].closing = 1;
    raft_close(&cl->nodes[0].raft, raft_closed);
    assert_true(run_until(cl, all_closed, 1000));
    assert_true(run_until(cl, peers_see_eof, 1000));
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

/* --- a hand-driven TLS peer, to speak the transport's preamble directly ------ */


struct raw_write {
    uv_write_t req;
    uint8_t data[];
};

static void raw_write_done(uv_write_t *req, int status)
{
    (void)status;
    free(req);
}

static void tlspeer_flush(struct tlspeer *tp)
{
    size_t n;
    while ((n = tls_conn_pending(tp->tls)) > 0) {
        struct raw_write *w = malloc(sizeof(*w) + n);
        assert_non_null(w);
        n = tls_conn_take_output(tp->tls, w->data, n);
        uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)n);
        if (uv_write(&w->req, (uv_stream_t *)&tp->tcp, &buf, 1, raw_write_done) != 0)
            free(w);
    }
}

/* "KRP1" | u64 BE raft id | u16 BE address length | address */
static size_t make_preamble(uint8_t *out, uint64_t id, const char *address, size_t alen)
{
    memcpy(out, "KRP1", 4);
    for (int i = 0; i < 8; i++)
        out[4 + i] = (uint8_t)(id >> (56 - 8 * i));
    out[12] = (uint8_t)(alen >> 8);
    out[13] = (uint8_t)alen;
    memcpy(out + 14, address, strlen(address));
    return 14 + strlen(address);
}

static void tlspeer_send(struct tlspeer *tp, const uint8_t *data, size_t len)
{
    assert_int_equal(tls_conn_write(tp->tls, data, len), 0);
    tlspeer_flush(tp);
}

static void tlspeer_run_script(struct tlspeer *tp)
{
    uint8_t pre[64 + 16];
    const char *self = "127.0.0.1:9";
    size_t n;
    switch (tp->script) {
    case SEND_BAD_MAGIC:
        n = make_preamble(pre, 2, self, strlen(self));
        pre[0] = 'X';
        tlspeer_send(tp, pre, n);
        break;
    case SEND_NO_ADDRESS:
        n = make_preamble(pre, 2, "", 0);
        tlspeer_send(tp, pre, n);
        break;
    case SEND_WRONG_ID: /* a node-2 certificate claiming raft id 3 */
        n = make_preamble(pre, 3, self, strlen(self));
        tlspeer_send(tp, pre, n);
        break;
    case SEND_SPLIT: /* one TLS record per preamble byte */
        n = make_preamble(pre, 2, self, strlen(self));
        for (size_t i = 0; i < n; i++)
            assert_int_equal(tls_conn_write(tp->tls, pre + i, 1), 0);
        tlspeer_flush(tp);
        break;
    case SEND_JOINED: /* preamble and a raft message in one record */
        n = make_preamble(pre, 2, self, strlen(self));
        memset(pre + n, 0, 16); /* raft refuses a zero-length message */
        tlspeer_send(tp, pre, n + 16);
        break;
    }
}

static void tlspeer_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct tlspeer *tp = s->data;
    if (nread < 0) {
        tp->eof = 1;
        return;
    }
    if (nread == 0)
        return;
    if (tls_conn_feed(tp->tls, (const uint8_t *)buf->base, (size_t)nread) != 0) {
        tp->failed = 1;
        return;
    }
    tlspeer_flush(tp);
    if (!tp->handshaken && tls_conn_handshake_done(tp->tls)) {
        tp->handshaken = 1;
        tlspeer_run_script(tp);
    }
}

static void tlspeer_connected(uv_connect_t *req, int status)
{
    struct tlspeer *tp = req->data;
    if (status != 0) {
        tp->failed = 1;
        return;
    }
    uv_read_start((uv_stream_t *)&tp->tcp, raw_alloc, tlspeer_read);
    tlspeer_flush(tp); /* the ClientHello */
}

static void tlspeer_start(struct cluster *cl, struct tlspeer *tp, struct tls_ctx *ctx, int port,
                          enum script script)
{
    struct sockaddr_in a;
    assert_int_equal(uv_ip4_addr("127.0.0.1", port, &a), 0);
    tp->script = script;
    assert_int_equal(tls_conn_new(ctx, 0, &tp->tls), 0);
    assert_int_equal(uv_tcp_init(&cl->loop, &tp->tcp), 0);
    tp->tcp.data = tp;
    tp->open = 1;
    tp->connect.data = tp;
    assert_int_equal(
        uv_tcp_connect(&tp->connect, &tp->tcp, (struct sockaddr *)&a, tlspeer_connected), 0);
}


static int refused_ones_dropped(struct cluster *cl)
{
    for (int i = 0; i < N_TLSPEERS; i++)
        if (cl->tlspeers[i].script != SEND_SPLIT && !cl->tlspeers[i].eof)
            return 0;
    return 1;
}

static int split_one_dropped(struct cluster *cl)
{
    for (int i = 0; i < N_TLSPEERS; i++)
        if (cl->tlspeers[i].script == SEND_SPLIT && !cl->tlspeers[i].eof)
            return 0;
    return 1;
}

/* 6. The preamble: a node certificate must name itself and send a well-formed
 * preamble; one that arrives a byte per record still works, and raft bytes
 * right behind the preamble (same record) reach raft. */
static void test_preamble(void **state)
{
    struct cluster *cl = *state;
    struct tlspeer *tp = cl->tlspeers;
    struct tls_ctx *ctx2 = NULL;
    node_init(cl, 0, P.ca, &P.node[1]);
    node_bootstrap_start(cl, 0);
    assert_int_equal(tls_client_ctx_new(P.ca, P.node[2].cert, P.node[2].key, &ctx2), 0);
    const enum script scripts[N_TLSPEERS] = {SEND_BAD_MAGIC, SEND_NO_ADDRESS, SEND_WRONG_ID,
                                             SEND_SPLIT, SEND_JOINED};
    for (int i = 0; i < N_TLSPEERS; i++)
        tlspeer_start(cl, &tp[i], ctx2, cl->ports[0], scripts[i]);
    assert_true(run_until(cl, refused_ones_dropped, 3000));
    run_for(cl, 300);
    struct tlspeer *split = &tp[3];
    assert_true(split->handshaken);
    assert_false(split->eof); /* accepted: raft now holds the stream */
    for (int i = 0; i < N_TLSPEERS; i++)
        assert_true(tp[i].handshaken && !tp[i].failed);
    assert_true(log_count(cl, "bad preamble") >= 2);
    assert_true(log_count(cl, "peer certificate 'node-2' claims raft id 3: refused") >= 1);
    /* A zero-length raft message: raft drops the stream, the tunnel follows. */
    uint8_t zero[16] = {0};
    tlspeer_send(split, zero, sizeof(zero));
    assert_true(run_until(cl, split_one_dropped, 3000));
    assert_int_equal(cluster_shutdown(cl), 0);
    for (int i = 0; i < N_TLSPEERS; i++)
        assert_null(tp[i].tls);
    tls_ctx_free(ctx2);
    cl->passed = 1;
}

/* 7. A port already taken: raft_start fails and the node still closes
 * cleanly, as does a node that was bootstrapped and never started (what
 * "keyraftd init" does). */
static void test_listen_address_in_use(void **state)
{
    struct cluster *cl = *state;
    silent_listen(cl, cl->ports[0]);
    node_init(cl, 0, P.ca, &P.node[1]);
    node_bootstrap(cl, 0);
    assert_int_equal(raft_start(&cl->nodes[0].raft), RAFT_IOERR);
    node_init(cl, 1, P.ca, &P.node[2]);
    node_bootstrap(cl, 1);
    assert_int_equal(cluster_shutdown(cl), 0);
    assert_true(cl->nodes[0].closed && cl->nodes[1].closed);
    cl->passed = 1;
}

static void node_stop(struct cluster *cl, int i)
{
    struct node *n = &cl->nodes[i];
    n->closing = 1;
    raft_close(&n->raft, raft_closed);
    assert_true(run_until(cl, all_closed, 5000));
    tls_ctx_free(n->server_tls);
    tls_ctx_free(n->client_tls);
    n->server_tls = n->client_tls = NULL;
    n->have_transport = n->have_io = n->have_raft = n->closing = n->closed = 0;
    n->n_applied = 0; /* raft replays the log into a fresh FSM */
}

/* 8. A follower that restarts reconnects through new tunnels and catches up
 * on what was committed while it was away. */
static void test_follower_restart(void **state)
{
    struct cluster *cl = *state;
    for (int i = 0; i < N_NODES; i++)
        node_init(cl, i, P.ca, &P.node[i + 1]);
    for (int i = 0; i < N_NODES; i++)
        node_bootstrap_start(cl, i);
    cl->healthy = 0x7;
    assert_true(run_until(cl, have_leader, 10000 * SLOW));
    apply_entries(cl, 0, N_ENTRIES / 2);
    assert_true(run_until(cl, healthy_applied_all, 10000 * SLOW));
    int f = cl->leader == &cl->nodes[0] ? 1 : 0;
    node_stop(cl, f);
    cl->healthy &= ~(1u << f);
    apply_entries(cl, N_ENTRIES / 2, N_ENTRIES / 2);
    assert_true(run_until(cl, healthy_applied_all, 10000 * SLOW));
    run_for(cl, 3 * RETRY_MS); /* the leader keeps dialling the dead port */
    node_init(cl, f, P.ca, &P.node[f + 1]);
    node_start(cl, f);
    cl->healthy = 0x7;
    assert_true(run_until(cl, healthy_applied_all, 10000 * SLOW));
    assert_int_equal(cl->n_apply_ok, N_ENTRIES);
    for (int i = 0; i < N_NODES; i++)
        assert_applied_in_order(&cl->nodes[i], N_ENTRIES);
    assert_int_equal(log_count(cl, "refused"), 0);
    assert_int_equal(cluster_shutdown(cl), 0);
    cl->passed = 1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_three_nodes_replicate, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreign_ca_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identity_binding, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_certificate_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_with_pending_handshakes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_preamble, setup, teardown),
        cmocka_unit_test_setup_teardown(test_listen_address_in_use, setup, teardown),
        cmocka_unit_test_setup_teardown(test_follower_restart, setup, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
