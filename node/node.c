/* node.c: start and stop order: config, HSM, keyring, store, raft, service,
 * TLS, listener; then the reverse. */
#include "node.h"

#define KR_LOG_MODULE "node"
#include <inttypes.h>
#include <openssl/crypto.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "audit.h"
#include "cluster.h"
#include "config.h"
#include "hsm.h"
#include "keyraft.h"
#include "keyring.h"
#include "log.h"
#include "record.pb-c.h"
#include "secmem.h"
#include "server.h"
#include "service.h"
#include "snapfetch.h"
#include "snapshot.h"
#include "store.h"
#include "tls.h"

#define SECURE_HEAP_SIZE (4u * 1024u * 1024u)
#define TICK_MS 100
#define HANDOFF_MAX_MS 3000 /* a stopping leader waits this long for a successor */
#define AUDIT_STOP_MS 2000  /* the last audit batches get this long to be committed */

struct node {
    uv_loop_t loop;
    struct config config;
    struct hsm *hsm;
    uint8_t *audit_spki; /* this node's HSM audit key (DER SPKI) */
    size_t audit_spki_len;
    struct audit_log *audit;
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
    int handing_off;
    uint64_t handoff_deadline;
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
    /* Closing the handles restored the default action: a second signal now
     * would kill the node before its store and HSM session are closed. */
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
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

/* A leader that is asked to stop hands leadership over first, so writes
 * pause for one transfer instead of an election timeout. */
static void node_shutdown(struct node *n)
{
    if (n->stopping || n->handing_off)
        return;
    struct cluster_member m[64];
    size_t nm = n->cluster ? cluster_members(n->cluster, m, 64) : 0;
    size_t voters = 0;
    for (size_t i = 0; i < nm; i++)
        voters += m[i].role == CLUSTER_VOTER;
    if (n->cluster && cluster_is_leader(n->cluster) && voters > 1 &&
        cluster_transfer(n->cluster, 0) == 0) {
        n->handing_off = 1;
        n->handoff_deadline = uv_now(&n->loop) + HANDOFF_MAX_MS;
        log_info("stopping: handing leadership over first");
        return; /* on_tick stops once it is done or the deadline passed */
    }
    node_stop(n);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct node *n = h->data;
    log_info("signal %d received", signum);
    if (n->handing_off)
        node_stop(n); /* a second signal: stop now */
    else
        node_shutdown(n);
}

static void on_tick(uv_timer_t *t)
{
    struct node *n = t->data;
    if (n->stopping)
        return;
    if (n->handing_off) {
        if (!cluster_is_leader(n->cluster) || uv_now(&n->loop) >= n->handoff_deadline)
            node_stop(n);
        return;
    }
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

/* "own,member,member...": this node's client endpoint, then the other
 * registered members' (malloc'd). */
static char *audit_endpoint_list(struct node *n)
{
    struct fsm_nodes reg = {0};
    size_t cap = strlen(n->config.listen) + 1;
    if (fsm_list_nodes(n->store, &reg) != 0)
        reg.n = 0; /* the own endpoint alone still works while this node serves */
    for (size_t i = 0; i < reg.n; i++)
        cap += strlen(reg.nodes[i]->client_address) + 1;
    char *list = malloc(cap);
    if (list != NULL) {
        snprintf(list, cap, "%s", n->config.listen);
        for (size_t i = 0; i < reg.n; i++)
            if (reg.nodes[i]->id != n->config.node_id &&
                reg.nodes[i]->client_address[0] != '\0') {
                strcat(list, ",");
                strcat(list, reg.nodes[i]->client_address);
            }
    }
    fsm_nodes_free(&reg);
    return list;
}

/* This node's audit signing key, made in the token on first start; its SPKI
 * is what other nodes and auditors trust this node's checkpoints by. */
static int open_audit_key(struct node *n)
{
    int rv = hsm_audit_key_ensure(n->hsm);
    if (rv == 0)
        rv = hsm_audit_public_key(n->hsm, &n->audit_spki, &n->audit_spki_len);
    if (rv != 0)
        log_error("the HSM token '%s' has no usable audit signing key: %s",
                  n->config.hsm_token_label, kr_strerror(rv));
    return rv;
}

static int write_file(const char *path, const void *data, size_t len, mode_t mode)
{
    char tmp[CONFIG_PATH_MAX + 16];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode);
    if (fd < 0) {
        log_error("cannot write %s: %s", tmp, strerror(errno));
        return KR_EIO;
    }
    int ok = write(fd, data, len) == (ssize_t)len && fsync(fd) == 0;
    close(fd);
    if (!ok || rename(tmp, path) != 0) {
        log_error("cannot write %s", path);
        unlink(tmp);
        return KR_EIO;
    }
    return 0;
}

static int read_whole(const char *path, uint8_t **out, size_t *out_len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return KR_ENOTFOUND;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0 || st.st_size > 1024 * 1024) {
        close(fd);
        return KR_EINVAL;
    }
    uint8_t *buf = malloc((size_t)st.st_size);
    if (buf == NULL || read(fd, buf, (size_t)st.st_size) != st.st_size) {
        free(buf);
        close(fd);
        return KR_EIO;
    }
    close(fd);
    *out = buf;
    *out_len = (size_t)st.st_size;
    return 0;
}

/* The second half of a join: the bundle an admin's `keyraft cluster add`
 * wrote. The MWK goes into this node's token wrapped (unwrapped inside it),
 * and is proven by decrypting what the admitting member's HSM encrypted. */
static int finish_join(const char *config_path, const char *bundle_path)
{
    struct config c;
    int rv = config_parse(config_path, &c);
    if (rv != 0)
        return rv;
    uint8_t *raw = NULL;
    size_t raw_len = 0;
    if ((rv = read_whole(bundle_path, &raw, &raw_len)) != 0) {
        log_error("cannot read the join bundle %s", bundle_path);
        return rv;
    }
    Keyraft__JoinBundle *b = keyraft__join_bundle__unpack(NULL, raw_len, raw);
    free(raw);
    if (b == NULL || b->node_id != c.node_id || b->ca_pem[0] == '\0' ||
        b->node_cert_pem[0] == '\0') {
        log_error("%s is not a join bundle for node %llu", bundle_path,
                  (unsigned long long)c.node_id);
        if (b)
            keyraft__join_bundle__free_unpacked(b, NULL);
        return KR_EINVAL;
    }
    if (c.hsm_softhsm_conf[0] != '\0')
        setenv("SOFTHSM2_CONF", c.hsm_softhsm_conf, 1);
    char pin[256];
    struct hsm *hsm = NULL;
    rv = config_read_pin(&c, pin, sizeof(pin));
    if (rv == 0) {
        struct hsm_config hc = {c.hsm_module, c.hsm_token_label, pin, c.hsm_mwk_label};
        rv = hsm_open(&hc, &hsm);
    }
    OPENSSL_cleanse(pin, sizeof(pin));
    if (rv == 0 && hsm_find_mwk(hsm) == KR_ENOTFOUND) {
        rv = hsm_unwrap_mwk(hsm, NODE_TRANSPORT_KEY_LABEL, b->wrapped_mwk.data, b->wrapped_mwk.len);
        if (rv != 0)
            log_error("the join bundle's MWK does not open with this token's transport key: %s",
                      kr_strerror(rv));
    }
    if (rv == 0)
        rv = hsm_find_mwk(hsm);
    if (rv == 0) {
        char name[64];
        snprintf(name, sizeof(name), "node-%llu", (unsigned long long)c.node_id);
        uint8_t back[64];
        size_t back_len = 0;
        rv = b->check.len > HSM_GCM_IV_LEN + HSM_GCM_TAG_LEN &&
                     b->check.len - HSM_GCM_IV_LEN - HSM_GCM_TAG_LEN <= sizeof(back)
                 ? hsm_mwk_decrypt(hsm, (const uint8_t *)name, strlen(name), b->check.data,
                                   b->check.len, back, &back_len)
                 : KR_EINVAL;
        if (rv != 0 || back_len != strlen(NODE_JOIN_CHECK_TEXT) ||
            memcmp(back, NODE_JOIN_CHECK_TEXT, back_len) != 0) {
            log_error("the copied MWK does not decrypt the member's check value: this "
                      "token's MWK is not the cluster's");
            rv = KR_EAUTH;
        } else {
            log_info("MWK copied HSM to HSM and verified: this token decrypts what the "
                     "admitting member's HSM encrypted");
        }
    }
    hsm_close(hsm);
    if (rv == 0)
        rv = write_file(c.tls_ca, b->ca_pem, strlen(b->ca_pem), 0644);
    if (rv == 0)
        rv = write_file(c.tls_cert, b->node_cert_pem, strlen(b->node_cert_pem), 0644);
    if (rv == 0) {
        char done[CONFIG_PATH_MAX + 64];
        snprintf(done, sizeof(done), "%s.applied", bundle_path);
        if (rename(bundle_path, done) != 0)
            rv = KR_EIO;
        log_info("joined: node %llu has its certificate and MWK; raft catches it up",
                 (unsigned long long)c.node_id);
    }
    keyraft__join_bundle__free_unpacked(b, NULL);
    return rv;
}

/* A node made by `init --join` waits for its bundle. */
static int complete_join_if_needed(const char *config_path)
{
    char tmp[CONFIG_PATH_MAX], bundle[CONFIG_PATH_MAX + 32], request[CONFIG_PATH_MAX + 32];
    snprintf(tmp, sizeof(tmp), "%s", config_path);
    const char *dir = dirname(tmp);
    snprintf(bundle, sizeof(bundle), "%s/%s", dir, NODE_JOIN_BUNDLE);
    snprintf(request, sizeof(request), "%s/%s", dir, NODE_JOIN_REQUEST);
    if (access(bundle, F_OK) == 0)
        return finish_join(config_path, bundle);
    char applied[CONFIG_PATH_MAX + 48];
    snprintf(applied, sizeof(applied), "%s.applied", bundle);
    if (access(request, F_OK) == 0 && access(applied, F_OK) != 0) {
        log_error("this node waits to be admitted: an admin runs `keyraft cluster add %s`, "
                  "which writes %s; then start the node again", request, bundle);
        return KR_EUNAVAIL;
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
    if (n->cluster != NULL)
        leader = cluster_leader_id(n->cluster);
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
     * loop callback: no store iterator is open here; a snapshot's flush on a
     * worker may be running, and store_swap waits for it. */
    if (rv == 0)
        rv = store_swap(n->store, incoming);
    if (rv != 0) {
        store_remove_dir(incoming);
        return rv;
    }
    /* Principals, revocations and domains may all differ in the new store:
     * the service's caches of them start over. */
    fsm_governance_bump();
    log_info("store fetched from %s: index %" PRIu64 ", %zu files, %" PRIu64
             " bytes in %" PRIu64 " ms",
             res.endpoint, got, res.n_files, res.bytes, res.elapsed_ms);
    return 0;
}

int node_run(const char *config_path, int until_ready)
{
    int rv = complete_join_if_needed(config_path);
    if (rv != 0)
        return rv;
    struct node *n = calloc(1, sizeof(*n));
    if (n == NULL)
        return KR_ENOMEM;
    rv = config_load(config_path, &n->config);
    if (rv != 0)
        goto out_free;
    log_set_level((enum log_level)log_level_parse(n->config.log_level));
    n->until_ready = until_ready;
    if (secmem_init(SECURE_HEAP_SIZE) != 0)
        log_warn("secure heap unavailable (RLIMIT_MEMLOCK?): key material uses the normal heap "
                 "and no unsealed key is kept between requests");
    if (secmem_harden_process() != 0)
        log_warn("could not disable core dumps");
    signal(SIGPIPE, SIG_IGN);
    if ((rv = open_hsm(n)) != 0)
        goto out_hsm;
    if ((rv = open_audit_key(n)) != 0)
        goto out_hsm;
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
    /* The recorder ships to this node's own endpoint first (a follower is
     * pointed at the leader), then to the members it knows, so the last
     * batches still find the leader once this node's server has stopped.
     * It must run before the first request. */
    char *audit_endpoints = audit_endpoint_list(n);
    if (audit_endpoints == NULL) {
        rv = KR_ENOMEM;
        goto out_tls;
    }
    struct audit_config ac = {
        .node_id = n->config.node_id,
        .enabled = n->config.audit_enabled,
        .flush_ms = n->config.audit_flush_ms,
        .max_pending = n->config.audit_max_pending,
        .max_lag_ms = n->config.audit_max_lag_ms,
        .fail_open_reads = n->config.audit_fail_open_reads,
        .endpoint = audit_endpoints,
        .ca_file = n->config.tls_ca,
        .cert_file = n->config.tls_cert,
        .key_file = n->config.tls_key,
    };
    rv = audit_log_start(&ac, &n->audit);
    free(audit_endpoints);
    if (rv != 0) {
        log_error("cannot start the audit recorder: %s", kr_strerror(rv));
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
        .snapshot_log_bytes = (uint64_t)n->config.raft_snapshot_log_mb * 1024 * 1024,
        .peer_server_tls = n->tls,
        .peer_client_tls = n->peer_client_tls,
        .raft_listen = n->config.raft_listen[0] ? n->config.raft_listen : NULL,
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
        .hsm = n->hsm,
        .config = &n->config,
        .snapshots = n->snapshots,
        .audit = n->audit,
        .audit_spki = n->audit_spki,
        .audit_spki_len = n->audit_spki_len,
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
    /* The server stopped accepting: nothing appends any more. What is
     * still queued gets a bounded chance to reach the leader. */
    audit_log_stop(n->audit, AUDIT_STOP_MS);
    n->audit = NULL;
    tls_ctx_free(n->peer_client_tls);
    tls_ctx_free(n->tls);
out_store:
    snapshot_registry_free(n->snapshots);
    store_close(n->store);
out_keyring:
    keyring_free(n->keyring);
out_hsm:
    free(n->audit_spki);
    hsm_close(n->hsm);
out_free:
    free(n);
    return rv;
}
