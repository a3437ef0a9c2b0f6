/* peer.c: raft peer connections tunnelled through mutual TLS. */
#include "peer.h"

#define KR_LOG_MODULE "peer"
#include <errno.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "config.h"
#include "keyraft.h"
#include "log.h"

#define PEER_HANDSHAKE_TIMEOUT_MS 5000
#define PEER_READ_CHUNK 65536
#define PREAMBLE_MAGIC "KRP1"
#define PREAMBLE_FIXED (4 + 8 + 2)
#define PREAMBLE_ADDR_MAX 255

enum tunnel_state { TUNNEL_TLS, TUNNEL_PREAMBLE, TUNNEL_OPEN, TUNNEL_CLOSING };

struct peer_transport;

struct tunnel {
    struct peer_transport *pt;
    struct tunnel *prev, *next;
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    uv_timer_t timer;
    uv_pipe_t inner; /* our end of the socketpair; raft holds the other */
    int inner_open;
    unsigned handles_open;
    struct tls_conn *tls;
    enum tunnel_state state;
    int outbound;
    /* outbound: the request raft is waiting on, until it is answered */
    struct raft_uv_connect *req;
    raft_id peer_id;
    char peer_address[PREAMBLE_ADDR_MAX + 1];
    uint8_t preamble[PREAMBLE_FIXED + PREAMBLE_ADDR_MAX];
    size_t preamble_len;
};

struct peer_transport {
    uv_loop_t *loop;
    struct tls_ctx *server_ctx, *client_ctx;
    raft_id id;
    char address[64];
    char listen_address[64]; /* bind here when set (a proxy advertises |address|) */
    uv_tcp_t listener;
    int listening;
    raft_uv_accept_cb accept_cb;
    struct tunnel *tunnels;
    int closing;
    unsigned handles_open; /* listener + tunnels' handles */
    raft_uv_transport_close_cb close_cb;
    struct raft_uv_transport *t;
};

void peer_node_name(unsigned long long id, char *out, size_t cap)
{
    snprintf(out, cap, "node-%llu", id);
}

/* --- tunnel lifetime ---------------------------------------------------------- */

static void transport_maybe_closed(struct peer_transport *pt)
{
    if (pt->closing && pt->handles_open == 0 && pt->close_cb != NULL) {
        raft_uv_transport_close_cb cb = pt->close_cb;
        pt->close_cb = NULL;
        cb(pt->t);
    }
}

static void tunnel_handle_closed(uv_handle_t *h)
{
    struct tunnel *tn = h->data;
    struct peer_transport *pt = tn->pt;
    pt->handles_open--;
    if (--tn->handles_open > 0)
        return;
    tls_conn_free(tn->tls);
    free(tn);
    transport_maybe_closed(pt);
}

/* Closes everything of a tunnel; answers a pending connect with |status|. */
static void tunnel_close(struct tunnel *tn, int status)
{
    if (tn->state == TUNNEL_CLOSING)
        return;
    struct peer_transport *pt = tn->pt;
    tn->state = TUNNEL_CLOSING;
    if (tn->prev)
        tn->prev->next = tn->next;
    else
        pt->tunnels = tn->next;
    if (tn->next)
        tn->next->prev = tn->prev;
    if (tn->req != NULL) {
        struct raft_uv_connect *req = tn->req;
        tn->req = NULL;
        req->cb(req, NULL, status);
    }
    uv_close((uv_handle_t *)&tn->timer, tunnel_handle_closed);
    uv_close((uv_handle_t *)&tn->tcp, tunnel_handle_closed);
    if (tn->inner_open)
        uv_close((uv_handle_t *)&tn->inner, tunnel_handle_closed);
}

struct tunnel_write {
    uv_write_t req;
    struct tunnel *tn;
    size_t len;
    uint8_t data[];
};

static void tunnel_write_done(uv_write_t *req, int status)
{
    struct tunnel_write *w = (struct tunnel_write *)req;
    OPENSSL_cleanse(w->data, w->len);
    if (status != 0 && status != UV_ECANCELED)
        tunnel_close(w->tn, RAFT_NOCONNECTION);
    free(w);
}

/* Straight to the socket when nothing waits before it (see the server's
 * conn_flush: a uv_write costs an epoll_ctl once its queue drains); only what
 * the socket did not take is copied and queued. */
static int stream_write(struct tunnel *tn, uv_stream_t *s, const uint8_t *data, size_t len)
{
    uv_buf_t direct = uv_buf_init((char *)data, (unsigned)len);
    int sent = uv_try_write(s, &direct, 1);
    if (sent < 0 && sent != UV_EAGAIN)
        return -1;
    size_t done = sent > 0 ? (size_t)sent : 0;
    if (done == len)
        return 0;
    data += done;
    len -= done;
    struct tunnel_write *w = malloc(sizeof(*w) + len);
    if (w == NULL)
        return -1;
    memcpy(w->data, data, len);
    w->len = len;
    w->tn = tn;
    uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)len);
    if (uv_write(&w->req, s, &buf, 1, tunnel_write_done) != 0) {
        free(w);
        return -1;
    }
    return 0;
}

/* Sends what TLS produced to the peer. */
static int tunnel_flush(struct tunnel *tn)
{
    while (tls_conn_pending(tn->tls) > 0) {
        uint8_t buf[16384];
        size_t n = tls_conn_take_output(tn->tls, buf, sizeof(buf));
        if (stream_write(tn, (uv_stream_t *)&tn->tcp, buf, n) != 0)
            return -1;
    }
    return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    buf->base = malloc(PEER_READ_CHUNK);
    buf->len = buf->base ? PEER_READ_CHUNK : 0;
}

/* raft wrote to its end: encrypt towards the peer. */
static void on_inner_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct tunnel *tn = s->data;
    if (nread < 0) {
        free(buf->base);
        tunnel_close(tn, RAFT_NOCONNECTION); /* raft closed its end */
        return;
    }
    if (nread > 0 && tn->state == TUNNEL_OPEN) {
        if (tls_conn_write(tn->tls, (uint8_t *)buf->base, (size_t)nread) != 0 ||
            tunnel_flush(tn) != 0)
            tunnel_close(tn, RAFT_NOCONNECTION);
    }
    free(buf->base);
}

/* Makes the socketpair; returns raft's end (raft_malloc'd: raft frees it). */
static uv_stream_t *tunnel_open_inner(struct tunnel *tn)
{
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        log_error("socketpair: %s", strerror(errno));
        return NULL;
    }
    uv_pipe_t *outer = raft_malloc(sizeof(*outer));
    if (outer == NULL) {
        close(fds[0]);
        close(fds[1]);
        return NULL;
    }
    uv_pipe_init(tn->pt->loop, &tn->inner, 0);
    tn->inner.data = tn;
    tn->inner_open = 1;
    tn->handles_open++;
    tn->pt->handles_open++;
    uv_pipe_init(tn->pt->loop, outer, 0);
    /* Each fd belongs to its handle once opened: uv_close closes it then. */
    int inner_ok = uv_pipe_open(&tn->inner, fds[0]) == 0;
    if (!inner_ok)
        close(fds[0]);
    int outer_ok = uv_pipe_open(outer, fds[1]) == 0;
    if (!outer_ok)
        close(fds[1]);
    if (!inner_ok || !outer_ok ||
        uv_read_start((uv_stream_t *)&tn->inner, on_alloc, on_inner_read) != 0) {
        uv_close((uv_handle_t *)outer, (uv_close_cb)raft_free);
        return NULL; /* the caller closes the tunnel, and with it the inner end */
    }
    return (uv_stream_t *)outer;
}

/* Inbound: "KRP1" | u64 BE id | u16 BE address length | address. Returns the
 * bytes consumed from |data| (preamble complete when state becomes OPEN). */
static size_t take_preamble(struct tunnel *tn, const uint8_t *data, size_t len)
{
    size_t used = 0;
    while (used < len && tn->state == TUNNEL_PREAMBLE) {
        size_t need = PREAMBLE_FIXED;
        if (tn->preamble_len >= PREAMBLE_FIXED)
            need += (size_t)tn->preamble[12] << 8 | tn->preamble[13];
        size_t take = need - tn->preamble_len;
        if (take > len - used)
            take = len - used;
        memcpy(tn->preamble + tn->preamble_len, data + used, take);
        tn->preamble_len += take;
        used += take;
        if (tn->preamble_len == PREAMBLE_FIXED) {
            size_t alen = (size_t)tn->preamble[12] << 8 | tn->preamble[13];
            if (memcmp(tn->preamble, PREAMBLE_MAGIC, 4) != 0 || alen == 0 ||
                alen > PREAMBLE_ADDR_MAX) {
                log_warn("peer %s: bad preamble", tls_conn_peer_name(tn->tls));
                tunnel_close(tn, RAFT_NOCONNECTION);
                return len;
            }
            continue;
        }
        if (tn->preamble_len < PREAMBLE_FIXED || tn->preamble_len < need)
            continue;
        raft_id id = 0;
        for (int i = 0; i < 8; i++)
            id = id << 8 | tn->preamble[4 + i];
        size_t alen = need - PREAMBLE_FIXED;
        memcpy(tn->peer_address, tn->preamble + PREAMBLE_FIXED, alen);
        tn->peer_address[alen] = '\0';
        char expect[64];
        peer_node_name(id, expect, sizeof(expect));
        if (strcmp(expect, tls_conn_peer_name(tn->tls)) != 0) {
            log_warn("peer certificate '%s' claims raft id %llu: refused",
                     tls_conn_peer_name(tn->tls), (unsigned long long)id);
            tunnel_close(tn, RAFT_NOCONNECTION);
            return len;
        }
        uv_stream_t *raft_end = tunnel_open_inner(tn);
        if (raft_end == NULL) {
            tunnel_close(tn, RAFT_NOCONNECTION);
            return len;
        }
        tn->peer_id = id;
        tn->state = TUNNEL_OPEN;
        uv_timer_stop(&tn->timer);
        tn->pt->accept_cb(tn->pt->t, id, tn->peer_address, raft_end);
    }
    return used;
}

static void on_timeout(uv_timer_t *t);

static void handshake_done(struct tunnel *tn)
{
    uv_timer_stop(&tn->timer);
    if (!tn->outbound) /* the preamble has the same deadline */
        uv_timer_start(&tn->timer, on_timeout, PEER_HANDSHAKE_TIMEOUT_MS, 0);
    if (!tls_conn_peer_is_node(tn->tls)) {
        log_warn("peer %s: a non-node certificate '%s': refused", tn->peer_address,
                 tls_conn_peer_name(tn->tls));
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    if (!tn->outbound) {
        tn->state = TUNNEL_PREAMBLE;
        return;
    }
    char expect[64];
    peer_node_name(tn->peer_id, expect, sizeof(expect));
    if (strcmp(expect, tls_conn_peer_name(tn->tls)) != 0) {
        log_warn("%s: expected certificate '%s', got '%s': refused", tn->peer_address, expect,
                 tls_conn_peer_name(tn->tls));
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    struct peer_transport *pt = tn->pt;
    uint8_t pre[PREAMBLE_FIXED + PREAMBLE_ADDR_MAX];
    size_t alen = strlen(pt->address);
    memcpy(pre, PREAMBLE_MAGIC, 4);
    for (int i = 0; i < 8; i++)
        pre[4 + i] = (uint8_t)(pt->id >> (56 - 8 * i));
    pre[12] = (uint8_t)(alen >> 8);
    pre[13] = (uint8_t)alen;
    memcpy(pre + PREAMBLE_FIXED, pt->address, alen);
    uv_stream_t *raft_end = NULL;
    if (tls_conn_write(tn->tls, pre, PREAMBLE_FIXED + alen) != 0 || tunnel_flush(tn) != 0 ||
        (raft_end = tunnel_open_inner(tn)) == NULL) {
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    tn->state = TUNNEL_OPEN;
    struct raft_uv_connect *req = tn->req;
    tn->req = NULL;
    req->cb(req, raft_end, 0);
}

/* Bytes from the peer: TLS records in, raft bytes (or the preamble) out. */
static void on_tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct tunnel *tn = s->data;
    if (nread < 0) {
        free(buf->base);
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    if (nread == 0 || tn->state == TUNNEL_CLOSING) {
        free(buf->base);
        return;
    }
    int rv = tls_conn_feed(tn->tls, (uint8_t *)buf->base, (size_t)nread);
    free(buf->base);
    if (rv != 0) {
        log_warn("peer %s: TLS refused: %s", tn->peer_address, tls_conn_error(tn->tls));
        tunnel_flush(tn);
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    if (tunnel_flush(tn) != 0) {
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    if (tn->state == TUNNEL_TLS) {
        if (!tls_conn_handshake_done(tn->tls))
            return;
        handshake_done(tn);
    }
    uint8_t plain[PEER_READ_CHUNK];
    size_t filled = 0; /* wiped up to the most any read filled, not all 64 KB */
    while (tn->state == TUNNEL_PREAMBLE || tn->state == TUNNEL_OPEN) {
        int n = tls_conn_read(tn->tls, plain, sizeof(plain));
        if (n == 0)
            break;
        if (n < 0) {
            tunnel_close(tn, RAFT_NOCONNECTION);
            break;
        }
        if ((size_t)n > filled)
            filled = (size_t)n;
        size_t off = 0;
        if (tn->state == TUNNEL_PREAMBLE)
            off = take_preamble(tn, plain, (size_t)n);
        if (tn->state == TUNNEL_OPEN && off < (size_t)n &&
            stream_write(tn, (uv_stream_t *)&tn->inner, plain + off, (size_t)n - off) != 0)
            tunnel_close(tn, RAFT_NOCONNECTION);
    }
    OPENSSL_cleanse(plain, filled);
}

static void on_timeout(uv_timer_t *t)
{
    struct tunnel *tn = t->data;
    log_warn("peer %s: no %s within %d ms", tn->peer_address,
             tn->state == TUNNEL_PREAMBLE ? "preamble" : "TLS handshake",
             PEER_HANDSHAKE_TIMEOUT_MS);
    tunnel_close(tn, RAFT_NOCONNECTION);
}

static struct tunnel *tunnel_new(struct peer_transport *pt, int outbound)
{
    struct tunnel *tn = calloc(1, sizeof(*tn));
    if (tn == NULL)
        return NULL;
    if (tls_conn_new(outbound ? pt->client_ctx : pt->server_ctx, !outbound, &tn->tls) != 0) {
        free(tn);
        return NULL;
    }
    tn->pt = pt;
    tn->outbound = outbound;
    uv_tcp_init(pt->loop, &tn->tcp);
    uv_timer_init(pt->loop, &tn->timer);
    tn->tcp.data = tn->timer.data = tn;
    tn->handles_open = 2;
    pt->handles_open += 2;
    tn->next = pt->tunnels;
    if (pt->tunnels)
        pt->tunnels->prev = tn;
    pt->tunnels = tn;
    uv_timer_start(&tn->timer, on_timeout, PEER_HANDSHAKE_TIMEOUT_MS, 0);
    return tn;
}

/* --- raft_uv_transport -------------------------------------------------------------- */

static int transport_init(struct raft_uv_transport *t, raft_id id, const char *address)
{
    struct peer_transport *pt = t->impl;
    pt->id = id;
    snprintf(pt->address, sizeof(pt->address), "%s", address);
    return 0;
}

static void on_peer_connection(uv_stream_t *listener, int status)
{
    struct peer_transport *pt = listener->data;
    if (status != 0 || pt->closing)
        return;
    struct tunnel *tn = tunnel_new(pt, 0);
    if (tn == NULL) {
        /* Accept and drop: an unaccepted connection stalls the listener. */
        uv_tcp_t *drop = malloc(sizeof(*drop));
        if (drop != NULL) {
            uv_tcp_init(pt->loop, drop);
            uv_accept(listener, (uv_stream_t *)drop);
            uv_close((uv_handle_t *)drop, (uv_close_cb)free);
        }
        return;
    }
    if (uv_accept(listener, (uv_stream_t *)&tn->tcp) != 0 ||
        uv_read_start((uv_stream_t *)&tn->tcp, on_alloc, on_tcp_read) != 0) {
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    char host[64] = "?";
    if (uv_tcp_getpeername(&tn->tcp, (struct sockaddr *)&ss, &sl) == 0 &&
        ss.ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        uv_ip4_name(in, host, sizeof(host));
        snprintf(tn->peer_address, sizeof(tn->peer_address), "%s:%d (inbound)", host,
                 ntohs(in->sin_port));
    } else {
        snprintf(tn->peer_address, sizeof(tn->peer_address), "? (inbound)");
    }
}

static int transport_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    struct peer_transport *pt = t->impl;
    char host[64];
    int port = 0;
    struct sockaddr_in addr;
    const char *bind_to = pt->listen_address[0] ? pt->listen_address : pt->address;
    if (config_split_hostport(bind_to, host, sizeof(host), &port) != 0 ||
        uv_ip4_addr(host, port, &addr) != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "raft address '%s' is not IPv4:PORT", bind_to);
        log_error("%s", t->errmsg); /* raft 0.15 does not show t->errmsg */
        return RAFT_INVALID;
    }
    pt->accept_cb = cb;
    uv_tcp_init(pt->loop, &pt->listener);
    pt->listener.data = pt;
    pt->listening = 1;
    pt->handles_open++;
    int rv = uv_tcp_bind(&pt->listener, (struct sockaddr *)&addr, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&pt->listener, 128, on_peer_connection);
    if (rv != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "listen on %s: %s", bind_to, uv_strerror(rv));
        log_error("raft peers: %s", t->errmsg);
        return RAFT_IOERR;
    }
    log_info("raft peers on %s%s%s (mutual TLS, node certificates only)", bind_to,
             bind_to != pt->address ? ", advertised as " : "",
             bind_to != pt->address ? pt->address : "");
    return 0;
}

static void on_tcp_connect(uv_connect_t *c, int status)
{
    struct tunnel *tn = c->data;
    if (tn->state == TUNNEL_CLOSING)
        return;
    if (status != 0) {
        tunnel_close(tn, RAFT_NOCONNECTION);
        return;
    }
    uv_tcp_nodelay(&tn->tcp, 1);
    if (uv_read_start((uv_stream_t *)&tn->tcp, on_alloc, on_tcp_read) != 0 ||
        tunnel_flush(tn) != 0) /* the ClientHello */
        tunnel_close(tn, RAFT_NOCONNECTION);
}

static int transport_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                             const char *address, raft_uv_connect_cb cb)
{
    struct peer_transport *pt = t->impl;
    char host[64];
    int port = 0;
    struct sockaddr_in addr;
    if (pt->closing)
        return RAFT_CANCELED;
    if (config_split_hostport(address, host, sizeof(host), &port) != 0 ||
        uv_ip4_addr(host, port, &addr) != 0)
        return RAFT_NOCONNECTION;
    struct tunnel *tn = tunnel_new(pt, 1);
    if (tn == NULL)
        return RAFT_NOMEM;
    req->cb = cb;
    tn->req = req;
    tn->peer_id = id;
    snprintf(tn->peer_address, sizeof(tn->peer_address), "%s", address);
    tn->connect_req.data = tn;
    if (uv_tcp_connect(&tn->connect_req, &tn->tcp, (struct sockaddr *)&addr, on_tcp_connect) != 0) {
        tn->req = NULL; /* raft sees the error return, not a callback */
        tunnel_close(tn, RAFT_NOCONNECTION);
        return RAFT_NOCONNECTION;
    }
    return 0;
}

static void listener_closed(uv_handle_t *h)
{
    struct peer_transport *pt = h->data;
    pt->handles_open--;
    transport_maybe_closed(pt);
}

static void transport_close(struct raft_uv_transport *t, raft_uv_transport_close_cb cb)
{
    struct peer_transport *pt = t->impl;
    pt->closing = 1;
    pt->close_cb = cb;
    if (pt->listening) {
        pt->listening = 0;
        uv_close((uv_handle_t *)&pt->listener, listener_closed);
    }
    while (pt->tunnels)
        tunnel_close(pt->tunnels, RAFT_CANCELED);
    transport_maybe_closed(pt);
}

int peer_transport_init(struct raft_uv_transport *t, uv_loop_t *loop, struct tls_ctx *server_ctx,
                        struct tls_ctx *client_ctx)
{
    struct peer_transport *pt = calloc(1, sizeof(*pt));
    if (pt == NULL)
        return KR_ENOMEM;
    pt->loop = loop;
    pt->server_ctx = server_ctx;
    pt->client_ctx = client_ctx;
    pt->t = t;
    memset(t, 0, sizeof(*t));
    t->impl = pt;
    t->init = transport_init;
    t->listen = transport_listen;
    t->connect = transport_connect;
    t->close = transport_close;
    return 0;
}

void peer_transport_cleanup(struct raft_uv_transport *t)
{
    free(t->impl);
    t->impl = NULL;
}

void peer_transport_set_listen(struct raft_uv_transport *t, const char *listen_address)
{
    struct peer_transport *pt = t->impl;
    snprintf(pt->listen_address, sizeof(pt->listen_address), "%s",
             listen_address ? listen_address : "");
}
