/* server.h: the client listener: TCP on libuv, TLS 1.3 (mutual), frames, and
 * dispatch into the service. One loop; connections are independent, so one
 * bad client never disturbs another. */
#ifndef KR_SERVER_H
#define KR_SERVER_H

#include <stdint.h>
#include <uv.h>

#include "service.h"
#include "tls.h"

struct server_config {
    const char *listen;       /* HOST:PORT */
    struct tls_ctx *tls;      /* borrowed */
    struct service *service;  /* borrowed */
    uint32_t max_frame;
    uint32_t max_connections;
};

struct server;

int server_start(uv_loop_t *loop, const struct server_config *config, struct server **out);
/* Closes the listener and every connection; |cb| runs when all handles are
 * closed (then server_free). Replies still pending are dropped. */
void server_stop(struct server *server, void (*cb)(void *arg), void *arg);
void server_free(struct server *server);

unsigned server_connections(const struct server *server);

#endif
