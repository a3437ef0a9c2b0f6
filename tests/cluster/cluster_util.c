/* cluster_util.c: multi-node keyraft clusters for the integration tests,
 * built from the harness's single-node pieces, plus the writer history. */
#include "cluster_util.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define INIT_TIMEOUT_MS 60000
#define JOIN_READY_MS 30000
#define ROLES_READY_MS 30000
#define PROBE_TIMEOUT_MS 1000
#define STOP_WAIT_MS 10000
#define LIST_PAGE 1000
#define LIST_MAX_PAGES 100

uint64_t kc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void kc_sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- building the cluster ----------------------------------------------------------- */

/* Puts "raft_listen = 127.0.0.1:PORT" into the [node] section of the node's
 * keyraftd.conf: keyraftd binds there, its peers keep dialing raft_address. */
static int add_raft_listen(const char *dir, int port)
{
    char path[KR_PATH_MAX + 32], line[64];
    uint8_t *text = NULL;
    size_t len = 0;
    int rc = -1;

    snprintf(path, sizeof(path), "%s/keyraftd.conf", dir);
    if (kr_read_file(path, &text, &len) != 0) {
        fprintf(stderr, "cluster: cannot read %s\n", path);
        return -1;
    }
    const char *sect = strstr((const char *)text, "[node]\n");
    if (sect == NULL) {
        fprintf(stderr, "cluster: %s has no [node] section\n", path);
        goto out;
    }
    size_t at = (size_t)(sect - (const char *)text) + strlen("[node]\n");
    int ln = snprintf(line, sizeof(line), "raft_listen = 127.0.0.1:%d\n", port);
    char *out = malloc(len + (size_t)ln + 1);
    if (out == NULL)
        goto out;
    memcpy(out, text, at);
    memcpy(out + at, line, (size_t)ln);
    memcpy(out + at + ln, text + at, len - at);
    rc = kr_write_file(path, out, len + (size_t)ln);
    free(out);
out:
    free(text);
    return rc;
}

/* Ports handed out so far in one cluster: two that the kernel offers as free
 * right after each other may be the same, or one already given away. */
struct port_set {
    int used[4 * KC_MAX_NODES];
    size_t n;
};

static int port_taken(const struct port_set *ps, int port)
{
    for (size_t i = 0; i < ps->n; i++)
        if (ps->used[i] == port)
            return 1;
    return 0;
}

static void port_add(struct port_set *ps, int port)
{
    if (ps->n < sizeof(ps->used) / sizeof(ps->used[0]))
        ps->used[ps->n++] = port;
}

static int fresh_ports(struct port_set *ps, int *a, int *b)
{
    for (int attempt = 0; attempt < 20; attempt++) {
        if (kr_free_port_pair(a, b) != 0)
            return -1;
        if (!port_taken(ps, *a) && !port_taken(ps, *b)) {
            port_add(ps, *a);
            port_add(ps, *b);
            return 0;
        }
    }
    return -1;
}

/* Puts a proxy on the node's raft_address, forwarding to a new raft_listen. */
static int setup_proxy(struct kc_node *node, struct port_set *ps)
{
    int spare = 0;

    if (fresh_ports(ps, &node->raft_listen_port, &spare) != 0 ||
        add_raft_listen(node->n.dir, node->raft_listen_port) != 0 ||
        tcp_proxy_new(node->n.raft_port, node->raft_listen_port, &node->proxy) != 0) {
        fprintf(stderr, "cluster: no proxy for node %llu\n", (unsigned long long)node->id);
        return -1;
    }
    return 0;
}

static void append_endpoint(struct kc_cluster *c, const struct kc_node *node)
{
    size_t l = strlen(c->endpoints);
    snprintf(c->endpoints + l, sizeof(c->endpoints) - l, "%s%s", l ? "," : "", node->endpoint);
}

static void save_log(const char *dir, const char *name, const struct kr_out *o)
{
    char path[KR_PATH_MAX + 32];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    if (f == NULL)
        return;
    fwrite(o->out, 1, o->out_len, f);
    fwrite(o->err, 1, o->err_len, f);
    fclose(f);
}

/* `keyraftd init --join` for one new node, on its own thread: inits of
 * several nodes (HSM token, RSA transport key) run side by side. */
struct join_init {
    struct kc_node *node;
    const char *join; /* node 1's client endpoint */
    pthread_t thread;
    int started, rc;
    uint64_t ms;
};

static void *join_init_main(void *arg)
{
    struct join_init *ji = arg;
    struct kr_node *kn = &ji->node->n;
    char bin[KR_PATH_MAX + 16], id[24], listen[32], raft[32];
    struct kr_out o;
    uint64_t t0 = kc_now_ms();

    snprintf(bin, sizeof(bin), "%s/keyraftd", kr_build_dir());
    snprintf(id, sizeof(id), "%llu", (unsigned long long)ji->node->id);
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", kn->port);
    snprintf(raft, sizeof(raft), "127.0.0.1:%d", kn->raft_port);
    const char *init[] = {bin,      "init",   "--data",         kn->dir, "--node-id",
                          id,       "--listen", listen,         "--raft-address", raft,
                          "--join", ji->join, NULL};
    ji->rc = kr_run(init, &o, INIT_TIMEOUT_MS);
    save_log(kn->dir, "init.log", &o);
    if (ji->rc != 0)
        fprintf(stderr, "cluster: keyraftd init --join of node %s exited %d:\n%s%s\n", id,
                ji->rc, (const char *)o.out, o.err);
    kr_out_free(&o);
    ji->ms = kc_now_ms() - t0;
    return NULL;
}

/* Directories and ports of node i+1, then its init started on a thread. */
static int join_prepare(struct kc_cluster *c, size_t i, struct port_set *ps, struct join_init *ji)
{
    struct kc_node *node = &c->nodes[i];
    struct kr_node *kn = &node->n;

    memset(node, 0, sizeof(*node));
    node->id = i + 1;
    snprintf(kn->dir, sizeof(kn->dir), "/tmp/krtest-XXXXXX");
    snprintf(kn->scratch, sizeof(kn->scratch), "/tmp/krtest-scratch-XXXXXX");
    if (mkdtemp(kn->dir) == NULL || mkdtemp(kn->scratch) == NULL) {
        fprintf(stderr, "cluster: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    c->n = i + 1; /* from here on, destroy cleans it up */
    if (fresh_ports(ps, &kn->port, &kn->raft_port) != 0)
        return -1;
    snprintf(node->endpoint, sizeof(node->endpoint), "127.0.0.1:%d", kn->port);
    ji->node = node;
    ji->join = c->nodes[0].endpoint;
    if (pthread_create(&ji->thread, NULL, join_init_main, ji) != 0)
        return -1;
    ji->started = 1;
    return 0;
}

/* After its init: the admin's `cluster add` of node i+1, then its start. */
static int join_admit(struct kc_cluster *c, size_t i, int standby, struct port_set *ps,
                      int proxied)
{
    struct kc_node *node = &c->nodes[i];
    struct kr_node *kn = &node->n;
    char request[KR_PATH_MAX + 32];
    struct kr_out o;

    /* The admin identity node 1 made; this node's own endpoint only. */
    snprintf(kn->client_conf, sizeof(kn->client_conf), "%s", c->nodes[0].n.client_conf);
    if (kr_client_file_load(kn->client_conf, &kn->cfile, &kn->ccfg) != 0)
        return -1;
    kn->ccfg.endpoints = node->endpoint;
    if (proxied && setup_proxy(node, ps) != 0)
        return -1;
    snprintf(request, sizeof(request), "%s/join-request", kn->dir);
    const char *add[] = {"cluster", "add", request, standby ? "--standby" : NULL, NULL};
    int rc = kc_cli(c, &o, add);
    if (rc != 0) {
        fprintf(stderr, "cluster: cluster add of node %llu exited %d:\n%s%s\n",
                (unsigned long long)node->id, rc, (const char *)o.out, o.err);
        kr_out_free(&o);
        return -1;
    }
    kr_out_free(&o);
    if (kr_node_spawn(kn) != 0)
        return -1;
    append_endpoint(c, node);
    return 0;
}

int kc_cluster_create(struct kc_cluster *c, size_t n, size_t n_standby, int proxied)
{
    char want[KC_MAX_NODES + 1];
    struct kc_node *first = &c->nodes[0];
    struct join_init inits[KC_MAX_NODES];
    struct port_set ps = {.n = 0};
    int rc = 0;
    uint64_t t0 = kc_now_ms(), t_inits = 0, t_started = 0;

    memset(c, 0, sizeof(*c));
    memset(inits, 0, sizeof(inits));
    if (n == 0 || n > KC_MAX_NODES || n_standby >= n)
        return -1;
    if (kr_node_init(&first->n) != 0)
        return -1;
    c->n = 1;
    first->id = 1;
    port_add(&ps, first->n.port);
    port_add(&ps, first->n.raft_port);
    snprintf(first->endpoint, sizeof(first->endpoint), "127.0.0.1:%d", first->n.port);
    /* The joiners' inits need nothing from node 1 but its address: they
     * run while it starts. */
    for (size_t i = 1; i < n && rc == 0; i++)
        rc = join_prepare(c, i, &ps, &inits[i]);
    /* init's own first start bound raft_address directly; from now on the
     * proxy holds it. */
    if (rc == 0 && ((proxied && setup_proxy(first, &ps) != 0) || kr_node_start(&first->n) != 0))
        rc = -1;
    if (rc == 0)
        append_endpoint(c, first);
    for (size_t i = 1; i < n; i++) {
        if (inits[i].started)
            pthread_join(inits[i].thread, NULL);
        if (!inits[i].started || inits[i].rc != 0)
            rc = -1;
    }
    t_inits = kc_now_ms();
    for (size_t i = 1; i < n && rc == 0; i++)
        rc = join_admit(c, i, i >= n - n_standby, &ps, proxied);
    t_started = kc_now_ms();
    for (size_t i = 1; i < n && rc == 0; i++)
        rc = kc_wait_serving(&c->nodes[i], JOIN_READY_MS);
    if (rc != 0)
        goto fail;
    for (size_t i = 0; i < n; i++)
        want[i] = i >= n - n_standby ? 's' : 'v';
    want[n] = '\0';
    if (kc_wait_roles(c, want, ROLES_READY_MS) != 0)
        goto fail;
    fprintf(stderr, "cluster: node 1 and %zu inits in %llu ms, %zu admitted and started in %llu "
            "ms, all serving in their roles after %llu ms more\n", n - 1,
            (unsigned long long)(t_inits - t0), n - 1,
            (unsigned long long)(t_started - t_inits),
            (unsigned long long)(kc_now_ms() - t_started));
    return 0;
fail:
    fprintf(stderr, "cluster: making a %zu-node cluster failed\n", n);
    kc_dump_logs(c, 3000);
    kc_cluster_destroy(c);
    return -1;
}

int kc_cluster_destroy(struct kc_cluster *c)
{
    int unclean = 0;

    /* One SIGTERM to all at once, then each may take its time: a leader
     * hands off first (up to its hand-off deadline when its peers are
     * stopping too). A second SIGTERM only for one that hangs. */
    for (size_t i = 0; i < c->n; i++)
        if (kr_node_alive(&c->nodes[i].n))
            kill(c->nodes[i].n.pid, SIGTERM);
    for (size_t i = 0; i < c->n; i++) {
        struct kc_node *node = &c->nodes[i];
        if (node->n.pid > 0) {
            int rc = kr_node_wait_exit(&node->n, STOP_WAIT_MS);
            if (rc == -1 && node->n.pid > 0) {
                fprintf(stderr, "cluster: node %llu still runs %d ms after SIGTERM\n",
                        (unsigned long long)node->id, STOP_WAIT_MS);
                rc = kr_node_stop(&node->n);
                rc = rc == 0 ? -1 : rc;
            }
            if (rc != 0) {
                fprintf(stderr, "cluster: node %llu exited %d on SIGTERM\n",
                        (unsigned long long)node->id, rc);
                kr_node_dump_log(&node->n, 2000);
                unclean++;
            }
        }
        kr_node_destroy(&node->n);
        tcp_proxy_free(node->proxy);
        node->proxy = NULL;
    }
    c->n = 0;
    return unclean;
}

void kc_dump_logs(const struct kc_cluster *c, size_t max_per_node)
{
    for (size_t i = 0; i < c->n; i++) {
        fprintf(stderr, "==== node %llu (%s, pid %d%s) ====\n",
                (unsigned long long)c->nodes[i].id, c->nodes[i].endpoint, (int)c->nodes[i].n.pid,
                c->nodes[i].cut ? ", cut" : "");
        kr_node_dump_log(&c->nodes[i].n, max_per_node);
    }
}

int kc_cli(const struct kc_cluster *c, struct kr_out *out, const char *const *argv)
{
    const char *full[64];
    size_t k = 0;

    full[k++] = "--endpoint";
    full[k++] = c->endpoints;
    for (size_t i = 0; argv[i] != NULL && k < 63; i++)
        full[k++] = argv[i];
    full[k] = NULL;
    return kr_cli_argv(&c->nodes[0].n, NULL, 0, out, full);
}

/* ---- probing nodes ------------------------------------------------------------------ */

int kc_status(const struct kc_node *node, struct kc_status *out)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StatusRequest st = KEYRAFT__STATUS_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    kr_client *cl = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    rc = kr_node_client(&node->n, PROBE_TIMEOUT_MS, &cl);
    if (rc != 0)
        return rc;
    req.op_case = KEYRAFT__REQUEST__OP_STATUS;
    req.status = &st;
    rc = kr_call(cl, &req, &resp);
    if (rc == 0 && resp->status != 0)
        rc = resp->status;
    else if (rc == 0 && resp->result_case != KEYRAFT__RESPONSE__RESULT_NODE_STATUS)
        rc = KR_EPROTO;
    if (rc == 0) {
        const Keyraft__StatusResponse *s = resp->node_status;
        snprintf(out->role, sizeof(out->role), "%s", s->role);
        out->leader_id = s->leader_id;
        out->term = s->term;
        out->commit_index = s->commit_index;
        out->applied_index = s->applied_index;
        out->key_count = s->key_count;
    }
    kr_response_free(resp);
    kr_client_free(cl);
    return rc;
}

/* One key read on |node| only: 0 when it answered one, else its status. */
static int probe_read(const struct kc_node *node)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ListKeysRequest lr = KEYRAFT__LIST_KEYS_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    kr_client *cl = NULL;
    int rc = kr_node_client(&node->n, PROBE_TIMEOUT_MS, &cl);

    if (rc != 0)
        return rc;
    lr.limit = 1;
    req.op_case = KEYRAFT__REQUEST__OP_LIST;
    req.list = &lr;
    rc = kr_call(cl, &req, &resp);
    if (rc == 0)
        rc = resp->status;
    kr_response_free(resp);
    kr_client_free(cl);
    return rc;
}

int kc_wait_serving(struct kc_node *node, unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    int last = 0;

    while (kc_now_ms() < deadline) {
        if (!kr_node_alive(&node->n)) {
            fprintf(stderr, "cluster: node %llu exited while starting\n",
                    (unsigned long long)node->id);
            kr_node_dump_log(&node->n, 4000);
            kr_node_kill9(&node->n); /* reap */
            return -1;
        }
        last = probe_read(node);
        if (last == 0)
            return 0;
        kc_sleep_ms(50);
    }
    fprintf(stderr, "cluster: node %llu does not serve reads after %u ms (last: %s)\n",
            (unsigned long long)node->id, timeout_ms, kr_status_name(last));
    kr_node_dump_log(&node->n, 3000);
    return -1;
}

int kc_node_start(struct kc_node *node, unsigned timeout_ms)
{
    if (kr_node_spawn(&node->n) != 0)
        return -1;
    return kc_wait_serving(node, timeout_ms);
}

int kc_leader(const struct kc_cluster *c, unsigned mask, unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;

    do {
        int leader = -1, agreed = 1, n_leaders = 0;
        uint64_t ids[KC_MAX_NODES] = {0};
        for (size_t i = 0; i < c->n; i++) {
            struct kc_status st;
            /* A removed node still running hears no leader and campaigns
             * (leader id 0): it would never agree. */
            if ((mask != 0 && !(mask & (1u << i))) || c->nodes[i].cut || c->nodes[i].removed ||
                !kr_node_alive(&c->nodes[i].n))
                continue;
            if (kc_status(&c->nodes[i], &st) != 0) {
                agreed = 0;
                continue;
            }
            ids[i] = st.leader_id;
            if (strcmp(st.role, "leader") == 0) {
                leader = (int)i;
                n_leaders++;
            }
            if (st.leader_id == 0)
                agreed = 0;
        }
        if (agreed && n_leaders == 1) {
            for (size_t i = 0; i < c->n; i++)
                if (ids[i] != 0 && ids[i] != c->nodes[leader].id)
                    agreed = 0;
            if (agreed)
                return leader;
        }
        kc_sleep_ms(20);
    } while (kc_now_ms() < deadline);
    return -1;
}

int kc_client(const struct kc_cluster *c, int timeout_ms, kr_client **out)
{
    kr_client_config cfg = c->nodes[0].n.ccfg;

    cfg.endpoints = c->endpoints;
    cfg.timeout_ms = timeout_ms;
    return kr_client_new(&cfg, out);
}

int kc_client_as(const struct kc_cluster *c, const char *principal, int timeout_ms,
                 kr_client **out)
{
    char cert[KR_PATH_MAX + 32], key[KR_PATH_MAX + 32];
    kr_client_config cfg = c->nodes[0].n.ccfg;

    snprintf(cert, sizeof(cert), "%s/tls/%s.pem", c->nodes[0].n.dir, principal);
    snprintf(key, sizeof(key), "%s/tls/%s.key", c->nodes[0].n.dir, principal);
    cfg.cert_file = cert;
    cfg.key_file = key;
    cfg.endpoints = c->endpoints;
    cfg.timeout_ms = timeout_ms;
    return kr_client_new(&cfg, out);
}

int kc_cluster_list(const struct kc_cluster *c, Keyraft__Response **out)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ClusterListRequest lr = KEYRAFT__CLUSTER_LIST_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    kr_client *cl = NULL;
    int leader = kc_leader(c, 0, 5000), rc;

    if (leader < 0)
        return KR_EUNAVAIL;
    rc = kr_node_client_as(&c->nodes[leader].n, "admin", 5000, &cl);
    if (rc != 0)
        return rc;
    req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_LIST;
    req.cluster_list = &lr;
    rc = kr_call(cl, &req, &resp);
    kr_client_free(cl);
    if (rc == 0 && resp->status != 0)
        rc = resp->status;
    else if (rc == 0 && resp->result_case != KEYRAFT__RESPONSE__RESULT_CLUSTER)
        rc = KR_EPROTO;
    if (rc != 0) {
        kr_response_free(resp);
        return rc;
    }
    *out = resp;
    return 0;
}

static void print_list(const Keyraft__ClusterListResponse *v)
{
    fprintf(stderr, "cluster list (leader %llu):\n", (unsigned long long)v->leader_id);
    for (size_t i = 0; i < v->n_nodes; i++)
        fprintf(stderr, "  id %llu wanted %d raft %s leader %d match %llu reachable %d\n",
                (unsigned long long)v->nodes[i]->id, (int)v->nodes[i]->role,
                v->nodes[i]->raft_role, v->nodes[i]->leader,
                (unsigned long long)v->nodes[i]->match_index, v->nodes[i]->reachable);
}

static int roles_match(const Keyraft__ClusterListResponse *v, const char *want)
{
    size_t n = strlen(want), listed = 0;
    uint64_t leader_match = 0;
    for (size_t j = 0; j < v->n_nodes; j++)
        if (v->nodes[j]->leader)
            leader_match = v->nodes[j]->match_index;

    for (size_t i = 0; i < n; i++) {
        const Keyraft__NodeInfo *info = NULL;
        for (size_t j = 0; j < v->n_nodes; j++)
            if (v->nodes[j]->id == i + 1)
                info = v->nodes[j];
        if (want[i] == '-') {
            if (info != NULL)
                return 0;
            continue;
        }
        listed++;
        /* Up: heard from lately, or holding what the leader holds (raft
         * clears its "heard from" flags every election timeout, so a
         * healthy node can read unreachable for a moment). */
        if (info == NULL)
            return 0;
        int caught_up = leader_match > 0 && info->match_index + 16 >= leader_match;
        if (!(info->leader || info->reachable || caught_up))
            return 0;
        if (want[i] == 'v' && (strcmp(info->raft_role, "voter") != 0 ||
                               info->role != KEYRAFT__NODE_ROLE__NODE_VOTER))
            return 0;
        if (want[i] == 's' && (strcmp(info->raft_role, "standby") != 0 ||
                               info->role != KEYRAFT__NODE_ROLE__NODE_STANDBY))
            return 0;
    }
    return listed == v->n_nodes;
}

int kc_wait_roles(const struct kc_cluster *c, const char *want, unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    Keyraft__Response *last = NULL;

    do {
        Keyraft__Response *resp = NULL;
        if (kc_cluster_list(c, &resp) == 0) {
            kr_response_free(last);
            last = resp;
            if (roles_match(resp->cluster, want)) {
                kr_response_free(last);
                return 0;
            }
        }
        kc_sleep_ms(50);
    } while (kc_now_ms() < deadline);
    fprintf(stderr, "cluster: roles \"%s\" not reached in %u ms\n", want, timeout_ms);
    if (last != NULL)
        print_list(last->cluster);
    kr_response_free(last);
    return -1;
}

int kc_wait_caught_up(struct kc_cluster *c, struct kc_node *node, unsigned timeout_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    struct kc_status st;
    int leader = kc_leader(c, 0, timeout_ms);

    if (leader < 0 || kc_status(&c->nodes[leader], &st) != 0) {
        fprintf(stderr, "cluster: no leader to catch up with\n");
        return -1;
    }
    uint64_t target = st.commit_index;
    while (kc_now_ms() < deadline) {
        if (kc_status(node, &st) == 0 && st.applied_index >= target)
            return 0;
        kc_sleep_ms(20);
    }
    fprintf(stderr, "cluster: node %llu applied %llu, the leader had committed %llu\n",
            (unsigned long long)node->id, (unsigned long long)st.applied_index,
            (unsigned long long)target);
    return -1;
}

void kc_cut(struct kc_node *node, int cut)
{
    if (node->proxy == NULL) {
        fprintf(stderr, "cluster: node %llu has no proxy to cut\n", (unsigned long long)node->id);
        return;
    }
    tcp_proxy_cut(node->proxy, cut);
    node->cut = cut;
}

/* ---- writer -------------------------------------------------------------------------- */

/* One create with a caller-chosen request id, so a later call can repeat it. */
static int create_call(kr_client *cl, const char *name, const char *request_id,
                       Keyraft__Response **out)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__CreateKeyRequest cr = KEYRAFT__CREATE_KEY_REQUEST__INIT;

    cr.name = (char *)name;
    cr.algorithm = KEYRAFT__ALGORITHM__AES_256;
    req.op_case = KEYRAFT__REQUEST__OP_CREATE;
    req.create = &cr;
    req.request_id = (char *)request_id;
    return kr_call(cl, &req, out);
}

/* A node's refusal that names what was wrong with this request itself; any
 * other failure may hide an earlier attempt of the same call that applied. */
static int definitive(int status)
{
    return status == KR_EEXIST || status == KR_EINVAL || status == KR_EPERM;
}

static void record(struct kc_op *op, int rc, const Keyraft__Response *resp)
{
    op->t_end = kc_now_ms();
    if (rc != 0) {
        op->outcome = KC_UNKNOWN;
        op->status = rc;
        return;
    }
    op->status = resp->status;
    if (resp->status == 0 && resp->result_case == KEYRAFT__RESPONSE__RESULT_KEY) {
        op->outcome = KC_OK;
        snprintf(op->id, sizeof(op->id), "%s", resp->key->id);
        op->commit_index = resp->commit_index;
    } else {
        op->outcome = definitive(resp->status) ? KC_FAIL : KC_UNKNOWN;
    }
}

static void *writer_main(void *arg)
{
    struct kc_writer *w = arg;

    for (size_t i = 0; i < w->max_ops; i++) {
        if (atomic_load(&w->stop) || kc_now_ms() >= w->deadline)
            break;
        struct kc_op *op = &w->ops[i];
        Keyraft__Response *resp = NULL;
        snprintf(op->name, sizeof(op->name), "%.16s-%05zu", w->prefix, i);
        snprintf(op->request_id, sizeof(op->request_id), "%.16s-req-%05zu", w->prefix, i);
        op->t_start = kc_now_ms();
        int rc = create_call(w->client, op->name, op->request_id, &resp);
        record(op, rc, resp);
        kr_response_free(resp);
        atomic_store(&w->done, i + 1);
        if (w->pause_ms)
            kc_sleep_ms(w->pause_ms);
    }
    return NULL;
}

int kc_writer_start(struct kc_writer *w, const struct kc_cluster *c, const char *prefix,
                    size_t max_ops, unsigned max_ms, unsigned pause_ms, int timeout_ms)
{
    memset(w, 0, sizeof(*w));
    w->ops = calloc(max_ops, sizeof(*w->ops));
    if (w->ops == NULL || kc_client(c, timeout_ms, &w->client) != 0) {
        kc_writer_free(w);
        return -1;
    }
    w->max_ops = max_ops;
    w->deadline = kc_now_ms() + max_ms;
    w->pause_ms = pause_ms;
    snprintf(w->prefix, sizeof(w->prefix), "%s", prefix);
    if (pthread_create(&w->thread, NULL, writer_main, w) != 0) {
        kc_writer_free(w);
        return -1;
    }
    w->started = 1;
    return 0;
}

size_t kc_writer_stop(struct kc_writer *w)
{
    atomic_store(&w->stop, 1);
    if (w->started) {
        pthread_join(w->thread, NULL);
        w->started = 0;
    }
    return atomic_load(&w->done);
}

void kc_writer_free(struct kc_writer *w)
{
    kc_writer_stop(w);
    kr_client_free(w->client);
    w->client = NULL;
    free(w->ops);
    w->ops = NULL;
}

uint64_t kc_writer_max_gap(struct kc_writer *w, uint64_t from_ms)
{
    size_t done = atomic_load(&w->done);
    uint64_t prev = 0, gap = 0;

    /* One thread, one call at a time: acks come in t_end order. */
    for (size_t i = 0; i < done; i++) {
        const struct kc_op *op = &w->ops[i];
        if (op->outcome != KC_OK)
            continue;
        if (op->t_end >= from_ms && prev != 0 && op->t_end - prev > gap)
            gap = op->t_end - prev;
        prev = op->t_end;
    }
    return gap;
}

size_t kc_writer_acked(struct kc_writer *w)
{
    size_t done = atomic_load(&w->done), n = 0;

    for (size_t i = 0; i < done; i++)
        n += w->ops[i].outcome == KC_OK;
    return n;
}

int kc_writer_wait_ack(struct kc_writer *w, uint64_t since_ms, unsigned timeout_ms,
                       uint64_t *ack_ms)
{
    uint64_t deadline = kc_now_ms() + timeout_ms;
    size_t seen = 0;

    for (;;) {
        size_t done = atomic_load(&w->done);
        for (; seen < done; seen++) {
            const struct kc_op *op = &w->ops[seen];
            if (op->outcome == KC_OK && op->t_start >= since_ms) {
                *ack_ms = op->t_end;
                return 0;
            }
        }
        if (kc_now_ms() >= deadline || (w->started && done == w->max_ops))
            return -1;
        kc_sleep_ms(5);
    }
}

/* ---- history check ------------------------------------------------------------------- */

struct key_line {
    char *name;
    char *line; /* every compared attribute, canonical */
};

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct key_line *)a)->name, ((const struct key_line *)b)->name);
}

static char *key_line_of(const Keyraft__KeyAttributes *k)
{
    size_t cap = 256 + strlen(k->name) + k->n_versions * 48, l;
    char *s = malloc(cap);

    if (s == NULL)
        return NULL;
    l = (size_t)snprintf(s, cap, "name=%s id=%s alg=%s state=%s created=%llu current=%u versions=",
                         k->name, k->id, kr_alg_name(k->algorithm), kr_state_name(k->state),
                         (unsigned long long)k->created_at, k->current_version);
    for (size_t v = 0; v < k->n_versions && l < cap; v++)
        l += (size_t)snprintf(s + l, cap - l, "%s%u:%s", v ? "," : "", k->versions[v]->version,
                              k->versions[v]->kcv);
    return s;
}

static void free_lines(struct key_line *lines, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(lines[i].name);
        free(lines[i].line);
    }
    free(lines);
}

/* Every key named PREFIX* on |node|, read once it applied |min_index|. */
static int list_node(const struct kc_node *node, const char *prefix, uint64_t min_index,
                     struct key_line **out, size_t *out_n, char *err, size_t err_len)
{
    kr_client *cl = NULL;
    struct key_line *lines = NULL;
    size_t n = 0, cap = 0;
    char cursor[256] = "";
    int rc = kr_node_client(&node->n, 15000, &cl);

    if (rc != 0) {
        snprintf(err, err_len, "node %llu: no client: %s", (unsigned long long)node->id,
                 kr_status_name(rc));
        return -1;
    }
    for (int page = 0; page < LIST_MAX_PAGES; page++) {
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        Keyraft__ListKeysRequest lr = KEYRAFT__LIST_KEYS_REQUEST__INIT;
        Keyraft__Response *resp = NULL;
        lr.prefix = (char *)prefix;
        lr.limit = LIST_PAGE;
        lr.after = cursor;
        req.op_case = KEYRAFT__REQUEST__OP_LIST;
        req.list = &lr;
        req.min_index = min_index;
        rc = kr_call(cl, &req, &resp);
        if (rc != 0 || resp->status != 0 || resp->result_case != KEYRAFT__RESPONSE__RESULT_LIST) {
            snprintf(err, err_len, "node %llu: listing keys failed: %s: %s",
                     (unsigned long long)node->id, kr_status_name(rc != 0 ? rc : resp->status),
                     kr_client_last_error(cl));
            kr_response_free(resp);
            goto fail;
        }
        for (size_t i = 0; i < resp->list->n_keys; i++) {
            if (n == cap) {
                size_t nc = cap ? cap * 2 : 256;
                struct key_line *g = realloc(lines, nc * sizeof(*g));
                if (g == NULL) {
                    kr_response_free(resp);
                    goto fail;
                }
                lines = g;
                cap = nc;
            }
            lines[n].name = strdup(resp->list->keys[i]->name);
            lines[n].line = key_line_of(resp->list->keys[i]);
            n++;
            if (lines[n - 1].name == NULL || lines[n - 1].line == NULL) {
                kr_response_free(resp);
                goto fail;
            }
        }
        snprintf(cursor, sizeof(cursor), "%s", resp->list->next_cursor);
        kr_response_free(resp);
        if (cursor[0] == '\0') {
            kr_client_free(cl);
            qsort(lines, n, sizeof(*lines), by_name);
            *out = lines;
            *out_n = n;
            return 0;
        }
    }
    snprintf(err, err_len, "node %llu: more than %d pages of keys", (unsigned long long)node->id,
             LIST_MAX_PAGES);
fail:
    kr_client_free(cl);
    free_lines(lines, n);
    return -1;
}

static const struct key_line *find_line(const struct key_line *lines, size_t n, const char *name)
{
    struct key_line k = {.name = (char *)name};
    return bsearch(&k, lines, n, sizeof(*lines), by_name);
}

/* Re-sends every op that was not acknowledged, with its request id. */
static int resolve_unknown(const struct kc_cluster *c, struct kc_op *ops, size_t n_ops,
                           uint64_t max_index, char *err, size_t err_len)
{
    kr_client *cl = NULL;
    int rc = kc_client(c, 10000, &cl);

    if (rc != 0) {
        snprintf(err, err_len, "no client: %s", kr_status_name(rc));
        return -1;
    }
    for (size_t i = 0; i < n_ops; i++) {
        struct kc_op *op = &ops[i];
        if (op->outcome == KC_OK)
            continue;
        if (op->outcome == KC_FAIL && op->status == KR_EEXIST) {
            snprintf(err, err_len, "%s (request %s) was refused with KR_EEXIST, but no other "
                     "request used that name: an earlier attempt of the same call applied and "
                     "its retry was not deduplicated", op->name, op->request_id);
            kr_client_free(cl);
            return -1;
        }
        for (int attempt = 0; attempt < 3; attempt++) {
            Keyraft__Response *resp = NULL;
            rc = create_call(cl, op->name, op->request_id, &resp);
            int st = rc != 0 ? rc : resp->status;
            if (st == 0 && resp->result_case == KEYRAFT__RESPONSE__RESULT_KEY) {
                op->resolved = 1;
                op->was_applied = resp->commit_index <= max_index;
                op->outcome = KC_OK;
                op->status = 0;
                op->commit_index = resp->commit_index;
                snprintf(op->id, sizeof(op->id), "%s", resp->key->id);
                kr_response_free(resp);
                break;
            }
            kr_response_free(resp);
            if (definitive(st) || attempt == 2) {
                snprintf(err, err_len, "%s (request %s, first outcome %s) sent again: %s: %s%s",
                         op->name, op->request_id, kr_status_name(op->status), kr_status_name(st),
                         kr_client_last_error(cl),
                         st == KR_EEXIST ? " (the first attempt applied, but its request id "
                                           "was not deduplicated)"
                                         : "");
                kr_client_free(cl);
                return -1;
            }
            kc_sleep_ms(500);
        }
    }
    kr_client_free(cl);
    return 0;
}

/* Sends acknowledged creates again with their request ids: each must come
 * back as the same key, and create nothing. Those that were slow (they
 * likely crossed a fault and were retried) or resolved, and a spread of the
 * rest, at most about REPLAY_MAX. */
#define REPLAY_MAX 400
#define REPLAY_SLOW_MS 100

static int replay(const struct kc_cluster *c, const struct kc_op *ops, size_t n_ops,
                  size_t *replayed, char *err, size_t err_len)
{
    size_t every = n_ops / REPLAY_MAX + 1;
    kr_client *cl = NULL;
    int rc = kc_client(c, 10000, &cl);

    *replayed = 0;
    if (rc != 0) {
        snprintf(err, err_len, "no client: %s", kr_status_name(rc));
        return -1;
    }
    for (size_t i = 0; i < n_ops; i++) {
        const struct kc_op *op = &ops[i];
        if (!(op->resolved || op->t_end - op->t_start >= REPLAY_SLOW_MS || i % every == 0))
            continue;
        Keyraft__Response *resp = NULL;
        rc = create_call(cl, op->name, op->request_id, &resp);
        int st = rc != 0 ? rc : resp->status;
        if (st != 0 || resp->result_case != KEYRAFT__RESPONSE__RESULT_KEY ||
            strcmp(resp->key->id, op->id) != 0) {
            snprintf(err, err_len, "%s (request %s, acknowledged as %s) sent again: %s%s%s%s",
                     op->name, op->request_id, op->id, kr_status_name(st),
                     st != 0 ? ": " : ", another key: ",
                     st != 0 ? kr_client_last_error(cl) : resp->key->id,
                     st == KR_EEXIST ? " (the request id was not deduplicated)" : "");
            kr_response_free(resp);
            kr_client_free(cl);
            return -1;
        }
        kr_response_free(resp);
        (*replayed)++;
    }
    kr_client_free(cl);
    return 0;
}

int kc_check_history(const struct kc_cluster *c, unsigned mask, struct kc_op *ops, size_t n_ops,
                     const char *prefix, struct kc_history_stats *stats, char *err,
                     size_t err_len)
{
    struct key_line *ref = NULL;
    size_t n_ref = 0, ref_node = 0;
    uint64_t max_index = 0;
    char list_prefix[40];
    int rc = -1;

    memset(stats, 0, sizeof(*stats));
    stats->ops = n_ops;
    for (size_t i = 0; i < n_ops; i++) {
        stats->ok += ops[i].outcome == KC_OK;
        stats->fail += ops[i].outcome == KC_FAIL;
        stats->unknown += ops[i].outcome == KC_UNKNOWN;
        if (ops[i].commit_index > max_index)
            max_index = ops[i].commit_index;
        if (ops[i].t_end - ops[i].t_start >= stats->slowest_ms) {
            stats->slowest_ms = ops[i].t_end - ops[i].t_start;
            snprintf(stats->slowest_name, sizeof(stats->slowest_name), "%s", ops[i].name);
        }
    }
    if (resolve_unknown(c, ops, n_ops, max_index, err, err_len) != 0)
        return -1;
    for (size_t i = 0; i < n_ops; i++) {
        stats->unknown_applied += ops[i].resolved && ops[i].was_applied;
        if (ops[i].commit_index > max_index)
            max_index = ops[i].commit_index;
    }
    if (replay(c, ops, n_ops, &stats->replayed, err, err_len) != 0)
        return -1;
    snprintf(list_prefix, sizeof(list_prefix), "%s-", prefix);
    for (size_t i = 0; i < c->n; i++) {
        struct key_line *lines = NULL;
        size_t n = 0;
        if (mask != 0 && !(mask & (1u << i)))
            continue;
        if (list_node(&c->nodes[i], list_prefix, max_index, &lines, &n, err, err_len) != 0)
            goto out;
        int bad = 0;
        for (size_t k = 1; k < n && !bad; k++)
            if (strcmp(lines[k - 1].name, lines[k].name) == 0) {
                snprintf(err, err_len, "node %llu: the name %s maps to two keys:\n  %s\n  %s",
                         (unsigned long long)c->nodes[i].id, lines[k].name, lines[k - 1].line,
                         lines[k].line);
                bad = 1;
            }
        for (size_t k = 0; k < n_ops && !bad; k++) {
            const struct key_line *l = find_line(lines, n, ops[k].name);
            char want[120];
            snprintf(want, sizeof(want), " id=%s ", ops[k].id);
            if (l == NULL || strstr(l->line, want) == NULL) {
                snprintf(err, err_len, "node %llu: %s, acknowledged%s as key %s, %s%s",
                         (unsigned long long)c->nodes[i].id, ops[k].name,
                         ops[k].resolved ? " (on re-send)" : "", ops[k].id,
                         l ? "is another key: " : "is missing", l ? l->line : "");
                bad = 1;
            }
        }
        if (!bad && n != n_ops) {
            snprintf(err, err_len, "node %llu: %zu keys named %s*, but %zu creates were made",
                     (unsigned long long)c->nodes[i].id, n, list_prefix, n_ops);
            bad = 1;
        }
        if (!bad && ref != NULL) {
            for (size_t k = 0; k < n && !bad; k++)
                if (strcmp(ref[k].line, lines[k].line) != 0) {
                    snprintf(err, err_len, "nodes %llu and %llu differ:\n  %s\n  %s",
                             (unsigned long long)c->nodes[ref_node].id,
                             (unsigned long long)c->nodes[i].id, ref[k].line, lines[k].line);
                    bad = 1;
                }
        }
        if (bad) {
            free_lines(lines, n);
            goto out;
        }
        if (ref == NULL) {
            ref = lines;
            n_ref = n;
            ref_node = i;
        } else {
            free_lines(lines, n);
        }
    }
    rc = 0;
out:
    free_lines(ref, n_ref);
    return rc;
}
