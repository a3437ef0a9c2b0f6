/* service.h: the operations. Each request: validate, check the key's state
 * and type, then either read the store and compute in place, or build a
 * command and propose it through the cluster, replying once it applied. */
#ifndef KR_SERVICE_H
#define KR_SERVICE_H

#include <stdint.h>
#include <uv.h>

#include "cluster.h"
#include "config.h"
#include "keyraft.pb-c.h"
#include "keyring.h"
#include "store.h"

struct snapshot_registry;
struct audit_log;
struct pb_arena;

struct service_deps {
    uv_loop_t *loop;
    struct store *store;
    struct cluster *cluster;
    struct keyring *keyring;
    struct hsm *hsm;             /* for admitting nodes (the MWK copy) */
    const struct config *config;
    struct snapshot_registry *snapshots; /* NULL: snapshot transfer refused */
    struct audit_log *audit;     /* the recorder (audit.h); NULL: nothing recorded */
    const uint8_t *audit_spki;   /* this node's HSM audit key (DER SPKI) */
    size_t audit_spki_len;
};

struct service;

int service_new(const struct service_deps *deps, struct service **out);
/* Call after every pending request replied (the loop drained). */
void service_free(struct service *service);

/* Who sent a request (from the verified client certificate). */
struct service_caller {
    const char *principal;
    const char *roles;
    const char *address;
    const char *serial; /* the certificate's serial number, hex */
    int is_node; /* the certificate is a node's (tls_conn_peer_is_node) */
    int internal; /* the node runs it for an approval: the principal is trusted */
    struct audit_tally *tally; /* a batch's inner call: its read's record is counted
                                * there, one record per key and outcome */
};

/* Called exactly once per request. |resp| and everything it points to is
 * owned by the service and valid only during the call (secrets in it are
 * wiped right after): serialise it, do not keep it. */
typedef void (*service_reply_cb)(void *ctx, const Keyraft__Response *resp);

/* Handles |req|, taking ownership of it: with |arena|, |req| lives in it
 * (rpc_decode_request) and the arena is freed when the call ends; without,
 * |req| was unpacked with malloc and is freed with rpc_request_free. |caller|
 * is copied. The reply may come before this returns, or later from the loop. */
void service_handle(struct service *service, const struct service_caller *caller,
                    Keyraft__Request *req, struct pb_arena *arena, service_reply_cb cb,
                    void *ctx);

/* Releases every request still waiting for an applied index (they get
 * KR_EUNAVAIL) and closes the service's handles; call before the loop's
 * last run. */
void service_stop(struct service *service);

/* Periodic leader duties (called from a loop timer): makes the default
 * domain once this node leads a cluster that has none. */
void service_tick(struct service *service);

/* 1 once the default domain's key is loaded and requests can be served. */
int service_ready(struct service *service);

/* Number of requests waiting for raft or the worker pool. */
unsigned service_pending(const struct service *service);

/* Self-describing blob header used by ciphertexts, signatures, MACs and
 * wrapped keys: 'K', format, kind, id length, id, u32 BE version. */
#define SERVICE_BLOB_HEADER_MAX (4 + 64 + 4)

#endif
