/* node.c: start and stop order: config, HSM, keyring, store, raft, service,
 * TLS, listener; then the reverse. */
#include "node.h"

#define KR_LOG_MODULE "node"
#include <inttypes.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cluster.h"
#include "config.h"
#include "hsm.h"
#include "keyraft.h"
#include "keyring.h"
#include "log.h"
#include "secmem.h"
#include "server.h"
#include "service.h"
#include "snapfetch.h"
#include "snapshot.h"
#include "store.h"
#include "tls.h"

#define SECURE_HEAP_SIZE (4u * 1024u * 1024u)
#define TICK_MS 100

struct node {
    uv_loop_t loop;
    struct config config;
    struct hsm *hsm;
    struct keyring *keyring;
    struct store *store;
    struct snapshot_registry *snapshots;
    struct cluster *cluster;
    struct service *service;
    struct tls_ctx *tls;
    struct tls_ctx *peer_client_tls;
    struct server *server;
    uv_timer_t ticker;
    uv_signal_t sigint, sigterm;
    int until_ready;
    int stopping;
    int was_ready;
    int exit_status;
};

static void node_closed_all(void *arg)
{
    struct node *n = arg;
    if (n->service)
        service_stop(n->service);
    uv_close((uv_handle_t *)&n->ticker, NULL);
    uv_close((uv_handle_t *)&n->sigint, NULL);
    uv_close((uv_handle_t *)&n->sigterm, NULL);
}

static void cluster_stopped(void *arg) { node_closed_all(arg); }

static void server_stopped(void *arg)
{
    struct node *n = arg;
    cluster_stop(n->cluster, cluster_stopped, n);
}

static void node_stop(struct node *n)
{
    if (n->stopping)
        return;
    n->stopping = 1;
    log_info("stopping");
    if (n->server)
        server_stop(n->server, server_stopped, n);
    else
        server_stopped(n);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct node *n = h->data;
    log_info("signal %d received", signum);
    node_stop(n);
}

static void on_tick(uv_timer_t *t)
{
    struct node *n = t->data;
    if (n->stopping)
        return;
    snapshot_tick(n->snapshots, uv_now(&n->loop));
    service_tick(n->service);
    if (!n->was_ready && service_ready(n->service)) {
        n->was_ready = 1;
        log_info("ready: default domain key loaded");
        if (n->until_ready)
            node_stop(n);
    }
}

static int open_hsm(struct node *n)
{
    const struct config *c = &n->config;
    if (c->hsm_softhsm_conf[0] != '\0')
        setenv("SOFTHSM2_CONF", c->hsm_softhsm_conf, 1);
    char pin[256];
    int rv = config_read_pin(c, pin, sizeof(pin));
    if (rv != 0)
        return rv;
    struct hsm_config hc = {
        .module_path = c->hsm_module,
        .token_label = c->hsm_token_label,
        .pin = pin,
        .mwk_label = c->hsm_mwk_label,
    };
    rv = hsm_open(&hc, &n->hsm);
    OPENSSL_cleanse(pin, sizeof(pin));
    if (rv != 0) {
        log_error("cannot open the HSM token '%s' through %s: %s", c->hsm_token_label,
                  c->hsm_module, kr_strerror(rv));
        return rv;
    }
    rv = hsm_find_mwk(n->hsm);
    if (rv != 0) {
        log_error("the HSM token '%s' holds no master wrap key labelled '%s'",
                  c->hsm_token_label, c->hsm_mwk_label);
        return rv;
    }
    return 0;
}

/* Appends |ep| to |eps| unless it is empty or already there. */
static void add_endpoint(const char **eps, size_t *n, size_t cap, const char *ep)
{
    if (ep == NULL || ep[0] == '\0' || *n == cap)
        return;
    for (size_t i = 0; i < *n; i++)
        if (strcmp(eps[i], ep) == 0)
            return;
    eps[(*n)++] = ep;
}

/* The cluster's fetch hook: copies a peer's checkpoint into DATA_DIR/db.incoming,
 * checks it, and swaps it in as the store. Peers in order: the raft leader
 * (its client address from the node registry), the other registered nodes,
 * then [node] join (a new node has an empty registry). Runs on the loop,
 * possibly inside cluster_start (n->cluster not set yet: no leader known). */
static int node_fetch_snapshot(void *arg, uint64_t min_index)
{
    struct node *n = arg;
    const char *eps[FSM_MAX_NODES + 1];
    size_t n_eps = 0;
    struct fsm_nodes nodes;
    uint64_t leader = 0;
    if (n->cluster != NULL) {
        struct cluster_status st;
        cluster_get_status(n->cluster, &st);
        leader = st.leader_id;
    }
    int rv = fsm_list_nodes(n->store, &nodes);
    if (rv != 0) {
        log_warn("snapshot fetch: node registry unreadable (%s); trying [node] join only",
                 kr_strerror(rv));
        nodes.n = 0;
    }
    for (size_t i = 0; i < nodes.n; i++)
        if (leader != 0 && nodes.nodes[i]->id == leader && leader != n->config.node_id)
            add_endpoint(eps, &n_eps, FSM_MAX_NODES + 1, nodes.nodes[i]->client_address);
    for (size_t i = 0; i < nodes.n; i++)
        if (nodes.nodes[i]->id != n->config.node_id)
            add_endpoint(eps, &n_eps, FSM_MAX_NODES + 1, nodes.nodes[i]->client_address);
    add_endpoint(eps, &n_eps, FSM_MAX_NODES + 1, n->config.join);

    char incoming[CONFIG_PATH_MAX + 16];
    snprintf(incoming, sizeof(incoming), "%s/db.incoming", n->config.data_dir);
    struct snapfetch_result res;
    memset(&res, 0, sizeof(res));
    rv = store_remove_dir(incoming); /* left by a fetch that crashed */
    if (rv == 0) {
        struct snapfetch_config fc = {
            .endpoints = eps,
            .n_endpoints = n_eps,
            .ca_file = n->config.tls_ca,
            .cert_file = n->config.tls_cert,
            .key_file = n->config.tls_key,
        };
        rv = snapshot_fetch(&fc, min_index, incoming, &res);
    }
    fsm_nodes_free(&nodes); /* eps borrowed from it */
    if (rv != 0)
        return rv;
    uint64_t got = 0;
    rv = store_probe(incoming, &got);
    if (rv == 0 && got < min_index) {
        log_error("snapshot fetch: the copy from %s is at index %" PRIu64 ", %" PRIu64
                  " is needed",
                  res.endpoint, got, min_index);
        rv = KR_EPROTO;
    }
    /* Restore runs between applies and every request finishes within its
     * loop callback: no store iterator is open here. */
    if (rv == 0)
        rv = store_swap(n->store, incoming);
    if (rv != 0) {
        store_remove_dir(incoming);
        return rv;
    }
    log_info("store fetched from %s: index %" PRIu64 ", %zu files, %" PRIu64
             " bytes in %" PRIu64 " ms",
             res.endpoint, got, res.n_files, res.bytes, res.elapsed_ms);
    return 0;
}

int node_run(const char *config_path, int until_ready)
{
    struct node *n = calloc(1, sizeof(*n));
    if (n == NULL)
        return KR_ENOMEM;
    int rv = config_load(config_path, &n->config);
    if (rv != 0)
        goto out_free;
    log_set_level((enum log_level)log_level_parse(n->config.log_level));
    n->until_ready = until_ready;
    if (secmem_init(SECURE_HEAP_SIZE) != 0)
        log_warn("secure heap unavailable (RLIMIT_MEMLOCK?): key material uses the normal heap");
    if (secmem_harden_process() != 0)
        log_warn("could not disable core dumps");
    signal(SIGPIPE, SIG_IGN);
    if ((rv = open_hsm(n)) != 0)
        goto out_free;
    if ((rv = keyring_new(n->hsm, &n->keyring)) != 0)
        goto out_hsm;
    char path[CONFIG_PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/db", n->config.data_dir);
    if ((rv = store_open(path, &n->store)) != 0)
        goto out_keyring;
    if ((rv = snapshot_registry_new(n->config.data_dir, n->store, &n->snapshots)) != 0) {
        log_error("cannot set up snapshot serving in %s: %s", n->config.data_dir,
                  kr_strerror(rv));
        goto out_store;
    }
    if ((rv = tls_server_ctx_new(n->config.tls_ca, n->config.tls_cert, n->config.tls_key,
                                 &n->tls)) != 0) {
        log_error("TLS setup failed: %s", kr_strerror(rv));
        goto out_store;
    }
    if ((rv = tls_client_ctx_new(n->config.tls_ca, n->config.tls_cert, n->config.tls_key,
                                 &n->peer_client_tls)) != 0) {
        log_error("peer TLS setup failed: %s", kr_strerror(rv));
        goto out_tls;
    }
    if (uv_loop_init(&n->loop) != 0) {
        rv = KR_EINTERNAL;
        goto out_tls;
    }
    char raft_dir[CONFIG_PATH_MAX + 16];
    snprintf(raft_dir, sizeof(raft_dir), "%s/raft", n->config.data_dir);
    struct cluster_config cc = {
        .node_id = n->config.node_id,
        .raft_address = n->config.raft_address,
        .raft_dir = raft_dir,
        .peer_server_tls = n->tls,
        .peer_client_tls = n->peer_client_tls,
        .fetch_snapshot = node_fetch_snapshot,
        .fetch_arg = n,
    };
    rv = cluster_start(&n->loop, &cc, n->store, &n->cluster);
    int cluster_rv = rv;
    struct service_deps deps = {
        .loop = &n->loop,
        .store = n->store,
        .cluster = n->cluster,
        .keyring = n->keyring,
        .config = &n->config,
        .snapshots = n->snapshots,
    };
    if (rv == 0)
        rv = service_new(&deps, &n->service);
    uv_timer_init(&n->loop, &n->ticker);
    n->ticker.data = n;
    uv_signal_init(&n->loop, &n->sigint);
    uv_signal_init(&n->loop, &n->sigterm);
    n->sigint.data = n->sigterm.data = n;
    if (rv == 0 && !until_ready) {
        struct server_config sc = {
            .listen = n->config.listen,
            .tls = n->tls,
            .service = n->service,
            .max_frame = n->config.max_frame,
            .max_connections = n->config.max_connections,
        };
        rv = server_start(&n->loop, &sc, &n->server);
    }
    if (rv != 0) {
        n->exit_status = rv;
        if (n->cluster != NULL && cluster_rv == 0) {
            node_stop(n);
        } else {
            if (n->cluster)
                cluster_stop(n->cluster, cluster_stopped, n);
            else
                node_closed_all(n);
        }
    } else {
        uv_timer_start(&n->ticker, on_tick, 0, TICK_MS);
        uv_signal_start(&n->sigint, on_signal, SIGINT);
        uv_signal_start(&n->sigterm, on_signal, SIGTERM);
    }
    uv_run(&n->loop, UV_RUN_DEFAULT);
    if (rv == 0)
        rv = n->exit_status;
    server_free(n->server);
    service_free(n->service);
    cluster_free(n->cluster);
    if (uv_loop_close(&n->loop) != 0)
        log_warn("event loop closed with handles still open");
    log_info("stopped");
out_tls:
    tls_ctx_free(n->peer_client_tls);
    tls_ctx_free(n->tls);
out_store:
    snapshot_registry_free(n->snapshots);
    store_close(n->store);
out_keyring:
    keyring_free(n->keyring);
out_hsm:
    hsm_close(n->hsm);
out_free:
    free(n);
    return rv;
}
