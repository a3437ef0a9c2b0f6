/* server.c: TCP listener, TLS connections and request framing on libuv. */
#include "server.h"

#define KR_LOG_MODULE "server"
#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "keyraft.h"
#include "log.h"
#include "pbarena.h"
#include "rpc.h"

#define HANDSHAKE_TIMEOUT_MS 10000
#define MAX_IN_FLIGHT_PER_CONN 1024 /* stop reading above this, resume at half */
/* A client that does not read its replies stops being read, so its replies
 * cannot pile up in the node: pause above HIGH bytes queued, resume below LOW. */
#define WRITE_QUEUE_HIGH (8u * 1024u * 1024u)
#define WRITE_QUEUE_LOW (1u * 1024u * 1024u)
#define READ_CHUNK 65536

struct conn;

struct server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_check_t flusher;  /* after each poll: one TLS write and one send per connection */
    struct conn *dirty;  /* connections with replies buffered, linked by next_dirty */
    struct server_config config;
    struct conn *conns; /* doubly linked */
    unsigned n_conns;
    int stopping;
    unsigned closing_handles;
    void (*stop_cb)(void *arg);
    void *stop_arg;
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    struct server *server;
    struct conn *prev, *next;
    struct tls_conn *tls;
    struct rpc_reader reader;
    char address[64];
    /* Replies encoded since the last flush: one SSL_write and one send per
     * loop pass instead of one each per reply (the write() calls were 42% of
     * a node's time serving 64-byte encrypts). Cleansed after each flush. */
    uint8_t *out;
    size_t out_len, out_cap;
    struct conn *next_dirty;
    int is_dirty;
    unsigned refs;          /* 1 for the connection + 1 per request in flight */
    unsigned in_flight;
    int closing;
    int reading;
    int dispatching; /* inside dispatch_frames: replies may come synchronously */
    int handles_open;
};

struct write_req {
    uv_write_t req;
    struct conn *conn;
    size_t len;
    uint8_t data[];
};

static void conn_unref(struct conn *c)
{
    if (--c->refs > 0)
        return;
    tls_conn_free(c->tls);
    rpc_reader_cleanup(&c->reader);
    if (c->out != NULL) {
        OPENSSL_cleanse(c->out, c->out_cap);
        free(c->out);
    }
    free(c);
}

static void server_maybe_done(struct server *s)
{
    if (s->stopping && s->closing_handles == 0 && s->stop_cb) {
        void (*cb)(void *) = s->stop_cb;
        s->stop_cb = NULL;
        cb(s->stop_arg);
    }
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    struct server *s = c->server;
    if (--c->handles_open == 0) {
        s->closing_handles--;
        conn_unref(c);
        server_maybe_done(s);
    }
}

static void conn_flush_replies(struct conn *c);

static void conn_close(struct conn *c)
{
    if (c->closing)
        return;
    conn_flush_replies(c); /* a last answer (why we close) goes out first */
    if (c->closing)
        return; /* the flush failed and closed it */
    c->closing = 1;
    struct server *s = c->server;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_conns--;
    s->closing_handles++;
    c->handles_open = 2;
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
}

static void conn_resume(struct conn *c);

static void write_done(uv_write_t *req, int status)
{
    struct write_req *w = (struct write_req *)req;
    OPENSSL_cleanse(w->data, w->len);
    if (status != 0 && !w->conn->closing)
        conn_close(w->conn);
    else
        conn_resume(w->conn);
    conn_unref(w->conn);
    free(w);
}

/* Reply bytes held for the client: gathered this pass plus queued in libuv. */
static size_t conn_backlog(struct conn *c)
{
    return c->out_len + uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

static int conn_blocked(struct conn *c)
{
    return c->in_flight >= MAX_IN_FLIGHT_PER_CONN || conn_backlog(c) > WRITE_QUEUE_HIGH;
}

/* Sends whatever ciphertext TLS produced. */
static void conn_flush(struct conn *c)
{
    while (!c->closing && tls_conn_pending(c->tls) > 0) {
        size_t n = tls_conn_pending(c->tls);
        struct write_req *w = malloc(sizeof(*w) + n);
        if (w == NULL) {
            conn_close(c);
            return;
        }
        w->len = tls_conn_take_output(c->tls, w->data, n);
        w->conn = c;
        /* Straight to the socket when nothing waits before it: a uv_write,
         * even one that completes at once, costs an epoll_ctl when libuv's
         * write queue drains (libuv 1.44), one per reply. */
        uv_buf_t direct = uv_buf_init((char *)w->data, (unsigned)w->len);
        int sent = uv_try_write((uv_stream_t *)&c->tcp, &direct, 1);
        if (sent < 0 && sent != UV_EAGAIN) {
            OPENSSL_cleanse(w->data, w->len);
            free(w);
            conn_close(c);
            return;
        }
        if (sent > 0 && (size_t)sent == w->len) {
            OPENSSL_cleanse(w->data, w->len);
            free(w);
            continue;
        }
        size_t done = sent > 0 ? (size_t)sent : 0;
        uv_buf_t buf = uv_buf_init((char *)w->data + done, (unsigned)(w->len - done));
        c->refs++;
        if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, write_done) != 0) {
            c->refs--;
            free(w);
            conn_close(c);
            return;
        }
    }
}

/* Room for |len| more bytes in the reply buffer; queues the connection for
 * the next flush (this loop pass). Returns where they go, or NULL. */
static uint8_t *conn_reserve(struct conn *c, size_t len)
{
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 16384;
        while (cap < c->out_len + len)
            cap *= 2;
        uint8_t *out = malloc(cap);
        if (out == NULL)
            return NULL;
        if (c->out != NULL) {
            memcpy(out, c->out, c->out_len);
            OPENSSL_cleanse(c->out, c->out_cap);
            free(c->out);
        }
        c->out = out;
        c->out_cap = cap;
    }
    if (!c->is_dirty) {
        struct server *s = c->server;
        c->is_dirty = 1;
        c->refs++; /* the dirty list holds it until the flush */
        c->next_dirty = s->dirty;
        s->dirty = c;
    }
    uint8_t *at = c->out + c->out_len;
    c->out_len += len;
    return at;
}

/* Encrypts what conn_buffer gathered and hands it to the socket. */
static void conn_flush_replies(struct conn *c)
{
    if (c->closing || c->out_len == 0)
        return;
    int rv = tls_conn_write(c->tls, c->out, c->out_len);
    OPENSSL_cleanse(c->out, c->out_len);
    c->out_len = 0;
    if (rv != 0) {
        conn_close(c);
        return;
    }
    conn_flush(c);
}

static void on_check_flush(uv_check_t *h)
{
    struct server *s = h->data;
    while (s->dirty != NULL) {
        struct conn *c = s->dirty;
        s->dirty = c->next_dirty;
        c->next_dirty = NULL;
        c->is_dirty = 0;
        conn_flush_replies(c);
        conn_unref(c);
    }
}

/* Encodes the reply straight into the connection's buffer. */
static void conn_send_response(struct conn *c, const Keyraft__Response *resp)
{
    Keyraft__Response err = KEYRAFT__RESPONSE__INIT;
    size_t len = rpc_response_frame_size(resp);
    if (len - 4 > KR_MAX_FRAME) {
        /* Every client refuses frames over KR_MAX_FRAME: say so instead. */
        err.id = resp->id;
        err.status = KR_ETOOBIG;
        err.message = (char *)"the reply would exceed the frame limit: send less data per request";
        resp = &err;
        len = rpc_response_frame_size(resp);
    }
    uint8_t *at = conn_reserve(c, len);
    if (at == NULL) {
        conn_close(c);
        return;
    }
    rpc_encode_response_into(resp, len, at);
}

static void send_error(struct conn *c, uint64_t id, int status, const char *msg)
{
    Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
    resp.id = id;
    resp.status = status;
    resp.message = (char *)msg;
    conn_send_response(c, &resp);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    buf->base = malloc(READ_CHUNK);
    buf->len = buf->base ? READ_CHUNK : 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void dispatch_frames(struct conn *c);

/* Once replies drained: first the frames already buffered, then the socket. */
static void conn_resume(struct conn *c)
{
    if (c->closing || c->reading || c->dispatching || c->in_flight > MAX_IN_FLIGHT_PER_CONN / 2 ||
        conn_backlog(c) > WRITE_QUEUE_LOW)
        return;
    dispatch_frames(c);
    if (!c->closing && !c->reading && !conn_blocked(c) &&
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = 1;
}

static void on_reply(void *ctx, const Keyraft__Response *resp)
{
    struct conn *c = ctx;
    c->in_flight--;
    if (!c->closing) {
        conn_send_response(c, resp);
        conn_resume(c);
    }
    conn_unref(c);
}

static void dispatch_frames(struct conn *c)
{
    const uint8_t *payload = NULL;
    size_t len = 0;
    int rv = 0;
    c->dispatching = 1;
    while (!c->closing && !conn_blocked(c) &&
           (rv = rpc_reader_next(&c->reader, &payload, &len)) == 1) {
        Keyraft__Request *req = NULL;
        struct pb_arena *arena = NULL;
        int drv = rpc_decode_request(payload, len, &req, &arena);
        if (drv == KR_ENOMEM) {
            send_error(c, 0, KR_ENOMEM, "out of memory decoding the request");
            continue;
        }
        if (drv == KR_ETOOBIG) {
            send_error(c, 0, KR_ETOOBIG, "the request decodes to more than 16 times its size "
                       "plus 4 MB: it holds too many fields");
            continue;
        }
        if (drv != 0) {
            /* The frame boundary is intact: answer and keep the connection. */
            send_error(c, 0, KR_EPROTO, "malformed request: the frame does not parse as a Request");
            continue;
        }
        struct service_caller caller = {
            .principal = tls_conn_peer_name(c->tls),
            .roles = tls_conn_peer_roles(c->tls),
            .serial = tls_conn_peer_serial(c->tls),
            .address = c->address,
            .is_node = tls_conn_peer_is_node(c->tls),
        };
        c->refs++;
        c->in_flight++;
        service_handle(c->server->config.service, &caller, req, arena, on_reply, c);
    }
    c->dispatching = 0;
    if (!c->closing && rv == KR_ETOOBIG) {
        char msg[128];
        snprintf(msg, sizeof(msg), "frame larger than the %u-byte limit; closing",
                 c->server->config.max_frame);
        log_warn("%s: %s", c->address, msg);
        send_error(c, 0, KR_ETOOBIG, msg);
        conn_close(c);
        return;
    }
    if (!c->closing && conn_blocked(c) && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = stream->data;
    if (nread < 0) {
        free(buf->base);
        conn_close(c);
        return;
    }
    if (nread == 0 || c->closing) {
        free(buf->base);
        return;
    }
    int had_handshake = tls_conn_handshake_done(c->tls);
    int rv = tls_conn_feed(c->tls, (uint8_t *)buf->base, (size_t)nread);
    free(buf->base);
    if (rv != 0) {
        log_warn("%s: TLS refused: %s", c->address, tls_conn_error(c->tls));
        conn_flush(c); /* deliver the alert */
        conn_close(c);
        return;
    }
    conn_flush(c);
    if (!tls_conn_handshake_done(c->tls))
        return;
    if (!had_handshake) {
        uv_timer_stop(&c->timer);
        log_debug("%s: authenticated as '%s'", c->address, tls_conn_peer_name(c->tls));
    }
    /* Wiped up to the most any read filled: a read brings a few hundred
     * bytes when many small requests are in flight, and wiping all 64 KB
     * after each was 8-13% of a loop serving them. */
    uint8_t plain[READ_CHUNK];
    size_t filled = 0;
    for (;;) {
        int n = tls_conn_read(c->tls, plain, sizeof(plain));
        if (n == 0)
            break;
        if (n < 0) {
            conn_flush(c);
            conn_close(c);
            OPENSSL_cleanse(plain, filled);
            return;
        }
        if ((size_t)n > filled)
            filled = (size_t)n;
        if (rpc_reader_feed(&c->reader, plain, (size_t)n) != 0) {
            conn_close(c);
            break;
        }
        dispatch_frames(c);
        if (c->closing)
            break;
    }
    OPENSSL_cleanse(plain, filled);
    conn_flush(c);
}

static void on_handshake_timeout(uv_timer_t *t)
{
    struct conn *c = t->data;
    log_warn("%s: no TLS handshake within %d ms; closing", c->address, HANDSHAKE_TIMEOUT_MS);
    conn_close(c);
}

static void on_connection(uv_stream_t *listener, int status)
{
    struct server *s = listener->data;
    if (status != 0 || s->stopping)
        return;
    struct conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->server = s;
    c->refs = 1;
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    uv_timer_init(s->loop, &c->timer);
    c->timer.data = c;
    rpc_reader_init(&c->reader, s->config.max_frame);
    /* Linked first so that conn_close can unlink on every path below. */
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    char host[48] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
            port = ntohs(in->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
            port = ntohs(in6->sin6_port);
        }
    }
    snprintf(c->address, sizeof(c->address), "%s:%d", host, port);
    if (s->n_conns > s->config.max_connections) {
        log_warn("%s: refused: %u connections is the limit", c->address,
                 s->config.max_connections);
        conn_close(c);
        return;
    }
    if (tls_conn_new(s->config.tls, 1, &c->tls) != 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_timer_start(&c->timer, on_handshake_timeout, HANDSHAKE_TIMEOUT_MS, 0);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        conn_close(c);
        return;
    }
    c->reading = 1;
}

static void listener_closed(uv_handle_t *h);

int server_start(uv_loop_t *loop, const struct server_config *config, struct server **out)
{
    char host[256];
    int port = 0;
    if (config_split_hostport(config->listen, host, sizeof(host), &port) != 0) {
        log_error("listen address '%s' is not HOST:PORT", config->listen);
        return KR_ECONFIG;
    }
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
        log_error("listen address '%s': host must be an IP address", config->listen);
        return KR_ECONFIG;
    }
    struct server *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return KR_ENOMEM;
    s->loop = loop;
    s->config = *config;
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    uv_check_init(loop, &s->flusher);
    s->flusher.data = s;
    uv_check_start(&s->flusher, on_check_flush);
    int rv = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&s->listener, 1024, on_connection);
    if (rv != 0) {
        log_error("cannot listen on %s: %s", config->listen, uv_strerror(rv));
        s->stopping = 1;
        s->closing_handles = 2;
        uv_close((uv_handle_t *)&s->listener, listener_closed);
        uv_close((uv_handle_t *)&s->flusher, listener_closed);
        *out = s; /* freed by the caller after the loop closes the handle */
        return KR_EUNAVAIL;
    }
    log_info("serving clients on %s (TLS 1.3, client certificates required)", config->listen);
    *out = s;
    return 0;
}

static void listener_closed(uv_handle_t *h)
{
    struct server *s = h->data;
    s->closing_handles--;
    server_maybe_done(s);
}

void server_stop(struct server *s, void (*cb)(void *arg), void *arg)
{
    s->stop_cb = cb;
    s->stop_arg = arg;
    if (s->stopping) {
        server_maybe_done(s);
        return;
    }
    s->stopping = 1;
    s->closing_handles += 2;
    uv_close((uv_handle_t *)&s->listener, listener_closed);
    on_check_flush(&s->flusher); /* answers already made still go out */
    uv_close((uv_handle_t *)&s->flusher, listener_closed);
    while (s->conns)
        conn_close(s->conns);
}

void server_free(struct server *s) { free(s); }

unsigned server_connections(const struct server *s) { return s->n_conns; }
