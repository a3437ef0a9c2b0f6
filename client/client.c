/* client.c: the libkeyraft connection: endpoints, TLS 1.3 over blocking-style
 * I/O with poll() deadlines, framing, request ids, failover and retries. */
#include "keyraft.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "client_internal.h"
#include "public_random.h"

#define DEFAULT_TIMEOUT_MS 30000
#define CONNECT_TIMEOUT_MAX_MS 5000 /* one endpoint may not eat the whole call */
#define RETRY_PASSES 3
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 250 /* an election takes 1-2 s: retry often enough to see its end */
/* A request id is 6 bytes of wall-clock milliseconds then 16 random bytes,
 * in hex: the node files its outcome under the id, and ids made in time order
 * are filed next to each other (random ones cost the store a cache miss per
 * level of its index). The random part alone keeps ids from colliding. */
#define REQUEST_ID_TIME_BYTES 6
#define REQUEST_ID_RANDOM_BYTES 16
#define REQUEST_ID_BYTES (REQUEST_ID_TIME_BYTES + REQUEST_ID_RANDOM_BYTES)
#define MAX_ENDPOINTS 64 /* configured plus learned from leader hints */

struct endpoint {
    char *host;
    char *port;
};

/* A client is used by one thread at a time. */
struct kr_client {
    struct endpoint *eps;
    size_t n_eps;
    size_t cur;      /* endpoint to try first: the last one that worked */
    SSL_CTX *ctx;
    BIO_METHOD *bio_meth;
    int fd;          /* -1: not connected */
    SSL *ssl;
    size_t conn_ep;  /* endpoint of the open connection */
    int timeout_ms;
    uint64_t next_id;
    uint64_t last_index;
    /* Frames kr_send queued: written together (one TLS record, one send) at
     * KR_SEND_CORK bytes, by kr_recv or kr_flush. Wiped after each write. */
    uint8_t *out;
    size_t out_len, out_cap;
    struct kr__readahead in; /* answers received, not yet returned */
    char err[512];
};

#define KR_READ_CHUNK 16384 /* one TLS record's plaintext at most */

#define KR_SEND_CORK 16384

/* ---- errors ---------------------------------------------------------------- */

void kr__client_set_error(kr_client *c, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
}

static void set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t err_len, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* The oldest queued OpenSSL reason, for messages; clears the queue. */
static const char *ossl_reason(char *buf, size_t len)
{
    unsigned long e = ERR_get_error();

    if (e == 0)
        snprintf(buf, len, "no OpenSSL detail");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
    return buf;
}

const char *kr_client_last_error(const kr_client *client)
{
    return client != NULL ? client->err : "no client";
}

uint64_t kr_client_last_index(const kr_client *client)
{
    return client != NULL ? client->last_index : 0;
}

/* ---- time ------------------------------------------------------------------ */

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};

    while (ms > 0 && nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Waits for |events| on |fd| until |deadline|: 0, KR_ETIMEDOUT or KR_ECONN. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return KR_ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
        if (n > 0)
            return 0; /* errors and hangups surface on the next read or write */
        if (n == 0)
            continue;
        if (errno != EINTR)
            return KR_ECONN;
    }
}

/* ---- a socket BIO that never raises SIGPIPE --------------------------------- */

static int bio_fd(BIO *b)
{
    return (int)(intptr_t)BIO_get_data(b);
}

static int bio_sock_write(BIO *b, const char *buf, int len)
{
    BIO_clear_retry_flags(b);
    ssize_t n = send(bio_fd(b), buf, (size_t)len, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            BIO_set_retry_write(b);
        return -1;
    }
    return (int)n;
}

static int bio_sock_read(BIO *b, char *buf, int len)
{
    BIO_clear_retry_flags(b);
    ssize_t n = recv(bio_fd(b), buf, (size_t)len, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            BIO_set_retry_read(b);
        return -1;
    }
    return (int)n;
}

static long bio_sock_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b;
    (void)num;
    (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_sock_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static BIO_METHOD *bio_sock_method_new(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "keyraft socket");

    if (m == NULL)
        return NULL;
    if (BIO_meth_set_write(m, bio_sock_write) != 1 || BIO_meth_set_read(m, bio_sock_read) != 1 ||
        BIO_meth_set_ctrl(m, bio_sock_ctrl) != 1 || BIO_meth_set_create(m, bio_sock_create) != 1) {
        BIO_meth_free(m);
        return NULL;
    }
    return m;
}

/* ---- endpoints ---------------------------------------------------------------- */

static void endpoints_free(struct endpoint *eps, size_t n)
{
    for (size_t i = 0; eps != NULL && i < n; i++) {
        free(eps[i].host);
        free(eps[i].port);
    }
    free(eps);
}

/* Parses one "HOST:PORT", "[V6]:PORT", "HOST" or bare IPv6 address. */
static int endpoint_parse(const char *s, size_t len, struct endpoint *out)
{
    const char *host = s;
    size_t host_len = len;
    const char *port = NULL;
    size_t port_len = 0;
    char defport[16];

    if (len == 0)
        return KR_EINVAL;
    if (s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (close == NULL)
            return KR_EINVAL;
        host = s + 1;
        host_len = (size_t)(close - host);
        const char *rest = close + 1;
        size_t rest_len = len - (size_t)(rest - s);
        if (rest_len > 0) {
            if (rest[0] != ':' || rest_len < 2)
                return KR_EINVAL;
            port = rest + 1;
            port_len = rest_len - 1;
        }
    } else {
        const char *colon = memchr(s, ':', len);
        size_t colons = 0;
        for (size_t i = 0; i < len; i++)
            colons += s[i] == ':';
        if (colons == 1) { /* HOST:PORT; more colons: a bare IPv6 address */
            host_len = (size_t)(colon - s);
            port = colon + 1;
            port_len = len - host_len - 1;
        }
    }
    if (host_len == 0)
        return KR_EINVAL;
    if (port == NULL) {
        snprintf(defport, sizeof(defport), "%u", (unsigned)KR_DEFAULT_PORT);
        port = defport;
        port_len = strlen(defport);
    }
    if (port_len == 0 || port_len > 5 || strspn(port, "0123456789") < port_len)
        return KR_EINVAL;
    out->host = strndup(host, host_len);
    out->port = strndup(port, port_len);
    if (out->host == NULL || out->port == NULL) {
        free(out->host);
        free(out->port);
        return KR_ENOMEM;
    }
    return 0;
}

static int endpoints_parse(const char *list, struct endpoint **out_eps, size_t *out_n,
                           char *err, size_t err_len)
{
    struct endpoint *eps = NULL;
    size_t n = 0, cap = 0;
    const char *p = list;
    int rc = 0;

    while (*p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        const char *s = p;
        size_t slen = len;
        while (slen > 0 && (*s == ' ' || *s == '\t')) {
            s++;
            slen--;
        }
        while (slen > 0 && (s[slen - 1] == ' ' || s[slen - 1] == '\t'))
            slen--;
        if (slen > 0) {
            if (n == cap) {
                size_t ncap = cap == 0 ? 4 : cap * 2;
                struct endpoint *neps = realloc(eps, ncap * sizeof(*eps));
                if (neps == NULL) {
                    rc = KR_ENOMEM;
                    goto out;
                }
                eps = neps;
                cap = ncap;
            }
            rc = endpoint_parse(s, slen, &eps[n]);
            if (rc != 0) {
                set_err(err, err_len, "bad endpoint \"%.*s\": want HOST:PORT", (int)slen, s);
                goto out;
            }
            n++;
        }
        p = end != NULL ? end + 1 : p + len;
    }
    if (n == 0) {
        set_err(err, err_len, "no endpoints given");
        rc = KR_ECONFIG;
        goto out;
    }
    *out_eps = eps;
    *out_n = n;
    eps = NULL;
out:
    endpoints_free(eps, n);
    return rc == KR_EINVAL ? KR_ECONFIG : rc;
}

/* ---- client --------------------------------------------------------------------- */

static SSL_CTX *tls_ctx_new(const kr_client_config *cfg, char *err, size_t err_len)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char why[256];

    if (ctx == NULL) {
        set_err(err, err_len, "SSL_CTX_new: %s", ossl_reason(why, sizeof(why)));
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* Frames carry their own length, so a missing close_notify cannot
     * truncate a message unnoticed; treat a bare EOF as a closed connection. */
    /* OpenSSL wipes decrypted records once read: answers may carry key material. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_CLEANSE_PLAINTEXT);
    if (SSL_CTX_load_verify_locations(ctx, cfg->ca_file, NULL) != 1) {
        set_err(err, err_len, "CA file %s: %s", cfg->ca_file, ossl_reason(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->cert_file) != 1) {
        set_err(err, err_len, "certificate file %s: %s", cfg->cert_file,
                ossl_reason(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->key_file, SSL_FILETYPE_PEM) != 1) {
        set_err(err, err_len, "key file %s: %s", cfg->key_file, ossl_reason(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        set_err(err, err_len, "key file %s does not match certificate %s", cfg->key_file,
                cfg->cert_file);
        ERR_clear_error();
        goto fail;
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

int kr__client_new_err(const kr_client_config *cfg, kr_client **out_client, char *err,
                       size_t err_len)
{
    kr_client *c = NULL;
    int rc;

    set_err(err, err_len, "%s", "");
    if (cfg == NULL || out_client == NULL) {
        set_err(err, err_len, "no configuration");
        return KR_EINVAL;
    }
    if (cfg->endpoints == NULL || cfg->ca_file == NULL || cfg->cert_file == NULL ||
        cfg->key_file == NULL) {
        set_err(err, err_len, "configuration needs endpoints, ca, cert and key");
        return KR_ECONFIG;
    }
    if (cfg->timeout_ms < 0) {
        set_err(err, err_len, "timeout_ms %d is negative", cfg->timeout_ms);
        return KR_ECONFIG;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return KR_ENOMEM;
    c->fd = -1;
    c->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : DEFAULT_TIMEOUT_MS;
    rc = endpoints_parse(cfg->endpoints, &c->eps, &c->n_eps, err, err_len);
    if (rc != 0)
        goto out;
    c->ctx = tls_ctx_new(cfg, err, err_len);
    if (c->ctx == NULL) {
        rc = KR_ECONFIG;
        goto out;
    }
    c->bio_meth = bio_sock_method_new();
    if (c->bio_meth == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    *out_client = c;
    c = NULL;
out:
    kr_client_free(c);
    return rc;
}

int kr_client_new(const kr_client_config *cfg, kr_client **out_client)
{
    return kr__client_new_err(cfg, out_client, NULL, 0);
}

static void out_discard(kr_client *c)
{
    if (c->out != NULL)
        OPENSSL_cleanse(c->out, c->out_len);
    c->out_len = 0;
}

static void conn_close(kr_client *c)
{
    out_discard(c);
    /* What was read ahead belonged to this connection; a buffer grown for
     * a large answer is freed rather than kept for the next one. */
    kr__readahead_drop(&c->in, 4 * KR_READ_CHUNK);
    if (c->ssl != NULL) {
        /* Best effort close_notify: the socket is non-blocking, never waits. */
        ERR_set_mark();
        SSL_shutdown(c->ssl);
        ERR_pop_to_mark();
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

void kr_client_free(kr_client *client)
{
    if (client == NULL)
        return;
    conn_close(client);
    if (client->out != NULL) {
        OPENSSL_cleanse(client->out, client->out_cap);
        free(client->out);
    }
    kr__readahead_drop(&client->in, 0);
    SSL_CTX_free(client->ctx);
    BIO_meth_free(client->bio_meth);
    endpoints_free(client->eps, client->n_eps);
    free(client);
}

/* ---- connecting --------------------------------------------------------------------- */

/* TCP connect to one resolved address before |deadline|. */
static int tcp_connect_addr(const struct addrinfo *ai, int64_t deadline, int *out_fd)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
    int rc, soerr = 0;
    socklen_t len = sizeof(soerr);

    if (fd < 0)
        return -errno;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
            rc = -errno;
            goto fail;
        }
        rc = wait_fd(fd, POLLOUT, deadline);
        if (rc == KR_ETIMEDOUT) {
            rc = -ETIMEDOUT;
            goto fail;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) {
            rc = -errno;
            goto fail;
        }
        if (soerr != 0) {
            rc = -soerr;
            goto fail;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    *out_fd = fd;
    return 0;
fail:
    close(fd);
    return rc;
}

static int tcp_connect(kr_client *c, const struct endpoint *ep, int64_t deadline, int *out_fd)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int gai, rc = KR_ECONN, err = ECONNREFUSED;

    gai = getaddrinfo(ep->host, ep->port, &hints, &res);
    if (gai != 0) {
        kr__client_set_error(c, "resolve %s:%s: %s", ep->host, ep->port, gai_strerror(gai));
        return KR_ECONN;
    }
    for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        int r = tcp_connect_addr(ai, deadline, out_fd);
        if (r == 0) {
            rc = 0;
            goto out;
        }
        err = -r;
        if (err == ETIMEDOUT)
            break;
    }
    if (err == ETIMEDOUT) {
        kr__client_set_error(c, "connect %s:%s: timed out", ep->host, ep->port);
        rc = KR_ETIMEDOUT;
    } else {
        kr__client_set_error(c, "connect %s:%s: %s", ep->host, ep->port, strerror(err));
        rc = KR_ECONN;
    }
out:
    freeaddrinfo(res);
    return rc;
}

/* Maps a failed SSL_* call to a status, with the reason in the last error.
 * Returns 1 when the call should be retried after waiting (*events set). */
static int ssl_result(kr_client *c, int ret, const char *what, short *events, int *out_rc)
{
    int e = SSL_get_error(c->ssl, ret);
    const struct endpoint *ep = &c->eps[c->conn_ep];
    char why[256];

    switch (e) {
    case SSL_ERROR_WANT_READ:
        *events = POLLIN;
        return 1;
    case SSL_ERROR_WANT_WRITE:
        *events = POLLOUT;
        return 1;
    case SSL_ERROR_ZERO_RETURN:
        kr__client_set_error(c, "%s %s:%s: connection closed by the node", what, ep->host,
                             ep->port);
        *out_rc = KR_ECONN;
        break;
    case SSL_ERROR_SYSCALL:
        kr__client_set_error(c, "%s %s:%s: %s", what, ep->host, ep->port,
                             errno != 0 ? strerror(errno) : "connection closed");
        ERR_clear_error();
        *out_rc = KR_ECONN;
        break;
    default: {
        unsigned long pe = ERR_peek_error();
        if (ERR_GET_LIB(pe) == ERR_LIB_SSL &&
            ERR_GET_REASON(pe) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            kr__client_set_error(c, "%s %s:%s: connection closed by the node", what, ep->host,
                                 ep->port);
            ERR_clear_error();
            *out_rc = KR_ECONN;
            break;
        }
        long vr = SSL_get_verify_result(c->ssl);
        if (vr != X509_V_OK) {
            kr__client_set_error(c, "%s %s:%s: certificate verification failed: %s", what,
                                 ep->host, ep->port, X509_verify_cert_error_string(vr));
            ERR_clear_error();
        } else {
            kr__client_set_error(c, "%s %s:%s: %s", what, ep->host, ep->port,
                                 ossl_reason(why, sizeof(why)));
        }
        *out_rc = KR_ETLS;
        break;
    }
    }
    return 0;
}

static int tls_connect(kr_client *c, const struct endpoint *ep, int64_t deadline)
{
    unsigned char ipbuf[sizeof(struct in6_addr)];
    BIO *bio = NULL;
    int rc = 0;

    ERR_clear_error();
    c->ssl = SSL_new(c->ctx);
    bio = BIO_new(c->bio_meth);
    if (c->ssl == NULL || bio == NULL) {
        BIO_free(bio);
        kr__client_set_error(c, "out of memory for TLS");
        return KR_ENOMEM;
    }
    BIO_set_data(bio, (void *)(intptr_t)c->fd);
    SSL_set_bio(c->ssl, bio, bio); /* the SSL owns the BIO now */
    if (inet_pton(AF_INET, ep->host, ipbuf) == 1 || inet_pton(AF_INET6, ep->host, ipbuf) == 1) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), ep->host) != 1)
            rc = KR_ETLS;
    } else {
        SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (SSL_set1_host(c->ssl, ep->host) != 1 ||
            SSL_set_tlsext_host_name(c->ssl, ep->host) != 1)
            rc = KR_ETLS;
    }
    if (rc != 0) {
        kr__client_set_error(c, "cannot set the expected host name %s", ep->host);
        ERR_clear_error();
        return rc;
    }
    for (;;) {
        short events = 0;
        int ret = SSL_connect(c->ssl);
        if (ret == 1)
            return 0;
        if (!ssl_result(c, ret, "TLS handshake with", &events, &rc))
            return rc;
        rc = wait_fd(c->fd, events, deadline);
        if (rc != 0) {
            kr__client_set_error(c, "TLS handshake with %s:%s: %s", ep->host, ep->port,
                                 rc == KR_ETIMEDOUT ? "timed out" : "poll failed");
            return rc;
        }
    }
}

/* Opens a connection to endpoint |idx|, TCP then TLS, before |deadline|. */
static int conn_open(kr_client *c, size_t idx, int64_t deadline)
{
    const struct endpoint *ep = &c->eps[idx];
    int rc;

    conn_close(c);
    c->conn_ep = idx;
    rc = tcp_connect(c, ep, deadline, &c->fd);
    if (rc != 0)
        return rc;
    rc = tls_connect(c, ep, deadline);
    if (rc != 0)
        conn_close(c);
    return rc;
}

/* ---- I/O ------------------------------------------------------------------------------ */

static int conn_write(kr_client *c, const uint8_t *buf, size_t len, int64_t deadline)
{
    int rc = 0;

    while (len > 0) {
        short events = 0;
        int chunk = len > INT32_MAX ? INT32_MAX : (int)len;
        ERR_clear_error();
        int ret = SSL_write(c->ssl, buf, chunk);
        if (ret > 0) {
            buf += ret;
            len -= (size_t)ret;
            continue;
        }
        if (!ssl_result(c, ret, "send to", &events, &rc))
            return rc;
        rc = wait_fd(c->fd, events, deadline);
        if (rc != 0) {
            kr__client_set_error(c, "send to %s:%s: %s", c->eps[c->conn_ep].host,
                                 c->eps[c->conn_ep].port,
                                 rc == KR_ETIMEDOUT ? "timed out" : "poll failed");
            return rc;
        }
    }
    return 0;
}

static int out_flush(kr_client *c, int64_t deadline)
{
    if (c->out_len == 0)
        return 0;
    int rc = conn_write(c, c->out, c->out_len, deadline);
    out_discard(c); /* may hold plaintext or key material */
    return rc;
}

/* Room for |want| bytes after the |len| in use in *buf (capacity *cap,
 * doubling from |first|): a larger buffer gets the bytes in use and the old
 * one is wiped before it is freed. Returns 0 or -1 (out of memory). */
static int wiped_reserve(uint8_t **buf, size_t len, size_t *cap, size_t want, size_t first)
{
    if (*cap - len >= want)
        return 0;
    size_t grown = *cap ? *cap : first;
    while (grown - len < want)
        grown *= 2;
    uint8_t *nb = malloc(grown);
    if (nb == NULL)
        return -1;
    if (*buf != NULL) {
        memcpy(nb, *buf, len);
        OPENSSL_cleanse(*buf, *cap);
        free(*buf);
    }
    *buf = nb;
    *cap = grown;
    return 0;
}

/* Frames |req| into the send queue; |cork| leaves it there until the queue
 * reaches KR_SEND_CORK bytes (kr_send), else everything queued is written. */
static int send_request(kr_client *c, const Keyraft__Request *req, int64_t deadline, int cork)
{
    size_t len = keyraft__request__get_packed_size(req);

    if (len > KR_MAX_FRAME) {
        kr__client_set_error(c, "request of %zu bytes exceeds the %u byte frame limit", len,
                             KR_MAX_FRAME);
        return KR_ETOOBIG;
    }
    if (wiped_reserve(&c->out, c->out_len, &c->out_cap, len + 4, KR_SEND_CORK * 2) != 0) {
        kr__client_set_error(c, "out of memory for a %zu byte request", len);
        return KR_ENOMEM;
    }
    uint8_t *buf = c->out + c->out_len;
    buf[0] = (uint8_t)(len >> 24);
    buf[1] = (uint8_t)(len >> 16);
    buf[2] = (uint8_t)(len >> 8);
    buf[3] = (uint8_t)len;
    keyraft__request__pack(req, buf + 4);
    c->out_len += len + 4;
    if (cork && c->out_len < KR_SEND_CORK)
        return 0;
    return out_flush(c, deadline);
}

int kr__readahead_room(struct kr__readahead *ra, size_t want, uint8_t **at, size_t *room)
{
    size_t unread = ra->len - ra->start;
    if (ra->start > 0) {
        memmove(ra->buf, ra->buf + ra->start, unread);
        OPENSSL_cleanse(ra->buf + unread, ra->len - unread);
        ra->start = 0;
        ra->len = unread;
    }
    if (wiped_reserve(&ra->buf, ra->len, &ra->cap, want, KR_READ_CHUNK) != 0)
        return KR_ENOMEM;
    *at = ra->buf + ra->len;
    *room = ra->cap - ra->len;
    return 0;
}

int kr__readahead_next(struct kr__readahead *ra, uint32_t max_frame, Keyraft__Response **out,
                       size_t *missing, uint32_t *frame_len)
{
    size_t avail = ra->len - ra->start;
    *frame_len = 0;
    if (avail < 4) {
        *missing = 4 - avail;
        return 0;
    }
    uint8_t *p = ra->buf + ra->start;
    uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    *frame_len = len;
    if (len > max_frame)
        return KR_ETOOBIG;
    if (avail - 4 < len) {
        *missing = len - (avail - 4);
        return 0;
    }
    Keyraft__Response *resp = keyraft__response__unpack(NULL, len, p + 4);
    OPENSSL_cleanse(p, 4 + (size_t)len);
    ra->start += 4 + (size_t)len;
    if (ra->start == ra->len)
        ra->start = ra->len = 0;
    if (resp == NULL)
        return KR_EPROTO;
    *out = resp;
    return 1;
}

void kr__readahead_drop(struct kr__readahead *ra, size_t keep)
{
    if (ra->buf != NULL)
        OPENSSL_cleanse(ra->buf, ra->len);
    ra->start = ra->len = 0;
    if (ra->cap > keep) {
        free(ra->buf);
        ra->buf = NULL;
        ra->cap = 0;
    }
}

/* The next answer. Answers already read ahead are returned without a
 * syscall; frames queued by kr_send are written only when the client would
 * otherwise wait for the node, so a burst of answers is followed by one
 * write carrying the requests made in reply to all of them. Without |wait|,
 * returns 0 with *out_resp NULL once the socket has nothing more to read
 * (the queued frames written first). */
static int recv_response(kr_client *c, int64_t deadline, int wait, Keyraft__Response **out_resp)
{
    for (;;) {
        size_t missing = 0;
        uint32_t len = 0;
        int rc = kr__readahead_next(&c->in, KR_MAX_FRAME, out_resp, &missing, &len);
        if (rc == 1)
            return 0;
        if (rc == KR_ETOOBIG) {
            kr__client_set_error(c, "%s:%s sent a %u byte frame, over the %u byte limit",
                                 c->eps[c->conn_ep].host, c->eps[c->conn_ep].port, len,
                                 KR_MAX_FRAME);
            return rc;
        }
        if (rc == KR_EPROTO) {
            kr__client_set_error(c, "%s:%s sent a malformed response of %u bytes",
                                 c->eps[c->conn_ep].host, c->eps[c->conn_ep].port, len);
            return rc;
        }
        uint8_t *at = NULL;
        size_t room = 0;
        if (kr__readahead_room(&c->in, missing > KR_READ_CHUNK ? missing : KR_READ_CHUNK, &at,
                               &room) != 0) {
            kr__client_set_error(c, "out of memory for a %u byte answer", len);
            return KR_ENOMEM;
        }
        short events = 0;
        ERR_clear_error();
        int ret = SSL_read(c->ssl, at, room > INT32_MAX ? INT32_MAX : (int)room);
        if (ret > 0) {
            c->in.len += (size_t)ret;
            continue;
        }
        if (!ssl_result(c, ret, "receive from", &events, &rc))
            return rc;
        if (events == POLLIN && c->out_len > 0) {
            rc = out_flush(c, deadline); /* about to wait: send what kr_send queued */
            if (rc != 0)
                return rc;
            continue;
        }
        if (events == POLLIN && !wait) {
            *out_resp = NULL;
            return 0;
        }
        rc = wait_fd(c->fd, events, deadline);
        if (rc != 0) {
            kr__client_set_error(c, "no answer from %s:%s in %d ms", c->eps[c->conn_ep].host,
                                 c->eps[c->conn_ep].port, c->timeout_ms);
            return rc;
        }
    }
}

/* ---- calls ------------------------------------------------------------------------------ */

/* The index of the endpoint a KR_ENOTLEADER answer named, learning it when the
 * list lacks it (a node added since the config was written). -1 when there is
 * no usable hint. */
static long leader_endpoint_index(kr_client *c, const char *hint)
{
    struct endpoint ep;
    if (hint == NULL || hint[0] == '\0' || endpoint_parse(hint, strlen(hint), &ep) != 0)
        return -1;
    for (size_t i = 0; i < c->n_eps; i++) {
        if (strcmp(c->eps[i].host, ep.host) == 0 && strcmp(c->eps[i].port, ep.port) == 0) {
            free(ep.host);
            free(ep.port);
            return (long)i;
        }
    }
    struct endpoint *grown = c->n_eps < MAX_ENDPOINTS
                                 ? realloc(c->eps, (c->n_eps + 1) * sizeof(*grown))
                                 : NULL;
    if (grown == NULL) {
        free(ep.host);
        free(ep.port);
        return -1;
    }
    c->eps = grown;
    c->eps[c->n_eps] = ep;
    return (long)c->n_eps++;
}

enum phase { PHASE_CONNECT, PHASE_REQUEST };

/* One try on endpoint |idx|: reuses an open connection to it, else connects.
 * *phase tells where a failure happened. */
static int call_once(kr_client *c, size_t idx, const Keyraft__Request *req, int64_t deadline,
                     Keyraft__Response **out_resp, enum phase *phase)
{
    int rc;

    *phase = PHASE_CONNECT;
    if (c->fd < 0 || c->conn_ep != idx) {
        int64_t cap = now_ms() + CONNECT_TIMEOUT_MAX_MS;
        rc = conn_open(c, idx, deadline < cap ? deadline : cap);
        if (rc != 0)
            return rc;
    }
    *phase = PHASE_REQUEST;
    rc = send_request(c, req, deadline, 0);
    if (rc != 0)
        return rc;
    for (;;) {
        Keyraft__Response *resp = NULL;
        rc = recv_response(c, deadline, 1, &resp);
        if (rc != 0)
            return rc;
        if (resp->id == req->id) {
            *out_resp = resp;
            return 0;
        }
        /* A late answer to an earlier, abandoned request. */
        kr_response_free(resp);
    }
}

static int new_request_id(kr_client *c, char out[2 * REQUEST_ID_BYTES + 1])
{
    uint8_t raw[REQUEST_ID_BYTES];
    struct timespec now = {0}; /* unread clock: a zero time prefix, still unique */
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t ms = (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
    for (size_t i = 0; i < REQUEST_ID_TIME_BYTES; i++)
        raw[i] = (uint8_t)(ms >> (8 * (REQUEST_ID_TIME_BYTES - 1 - i)));
    /* Public bytes from a pool: a RAND_bytes call and 22 snprintf calls were
     * 15% of a client's CPU per create. */
    if (kr__public_random(raw + REQUEST_ID_TIME_BYTES, REQUEST_ID_RANDOM_BYTES) != 0) {
        kr__client_set_error(c, "no randomness for a request id");
        return KR_ECRYPTO;
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof(raw); i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 0xf];
    }
    out[2 * sizeof(raw)] = '\0';
    return 0;
}

/* The request ids kr_call gave the writes of a batch, and what they replaced. */
struct batch_ids {
    char (*ids)[2 * REQUEST_ID_BYTES + 1];
    char **saved;
    unsigned char *swapped;
    size_t n;
};

/* Gives every write of |req| (a batch) that has no request_id one, kept for
 * every retry of this call, so the node deduplicates each. */
static int batch_ids_assign(kr_client *c, Keyraft__Request *req, struct batch_ids *b)
{
    size_t n = req->batch != NULL ? req->batch->n_requests : 0;

    memset(b, 0, sizeof(*b));
    if (n == 0)
        return 0;
    b->ids = malloc(n * sizeof(*b->ids));
    b->saved = calloc(n, sizeof(*b->saved));
    b->swapped = calloc(n, 1);
    if (b->ids == NULL || b->saved == NULL || b->swapped == NULL) {
        free(b->ids);
        free(b->saved);
        free(b->swapped);
        memset(b, 0, sizeof(*b));
        kr__client_set_error(c, "out of memory for the request ids of a batch of %zu", n);
        return KR_ENOMEM;
    }
    b->n = n;
    for (size_t i = 0; i < n; i++) {
        Keyraft__Request *r = req->batch->requests[i];
        if (r == NULL || !kr_op_is_write(r->op_case) ||
            (r->request_id != NULL && r->request_id[0] != '\0'))
            continue;
        int rc = new_request_id(c, b->ids[i]);
        if (rc != 0)
            return rc; /* batch_ids_restore undoes the ones given */
        b->saved[i] = r->request_id;
        b->swapped[i] = 1;
        r->request_id = b->ids[i];
    }
    return 0;
}

static void batch_ids_restore(Keyraft__Request *req, struct batch_ids *b)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->swapped[i])
            req->batch->requests[i]->request_id = b->saved[i];
    free(b->ids);
    free(b->saved);
    free(b->swapped);
    memset(b, 0, sizeof(*b));
}

/* What kr_call and kr_send add to |req| before it leaves: a fresh id; for a
 * write without one, an idempotency request_id written to |request_id| and
 * pointed to by req->request_id (the caller's pointer saved in *saved, to be
 * put back with request_restore); for a read, min_index (read-your-writes). */
static int request_prepare(kr_client *c, Keyraft__Request *req,
                           char request_id[2 * REQUEST_ID_BYTES + 1], char **saved)
{
    *saved = NULL;
    if (req->op_case == KEYRAFT__REQUEST__OP__NOT_SET) {
        kr__client_set_error(c, "request names no operation");
        return KR_EINVAL;
    }
    c->err[0] = '\0';
    req->id = ++c->next_id;
    if (req->op_case == KEYRAFT__REQUEST__OP_BATCH) {
        /* Its writes carry their own ids (kr_call gives them); the batch
         * waits for this client's last write before any request in it runs. */
        if (req->min_index < c->last_index)
            req->min_index = c->last_index;
    } else if (kr_op_is_write(req->op_case)) {
        if (req->request_id == NULL || req->request_id[0] == '\0') {
            int rc = new_request_id(c, request_id);
            if (rc != 0)
                return rc;
            *saved = req->request_id;
            req->request_id = request_id;
        }
    } else if (req->op_case != KEYRAFT__REQUEST__OP_STATUS &&
               req->op_case != KEYRAFT__REQUEST__OP_RANDOM && req->min_index < c->last_index) {
        req->min_index = c->last_index;
    }
    return 0;
}

static void request_restore(Keyraft__Request *req, char *saved, const char *generated)
{
    if (req->request_id == generated)
        req->request_id = saved;
}

/* Takes in what an answer tells the client: the commit index it has seen
 * and, for a refusal, the node's detail as the last error. */
static void response_note(kr_client *c, const Keyraft__Response *resp)
{
    if (resp->commit_index > c->last_index)
        c->last_index = resp->commit_index;
    if (resp->status != 0)
        kr__client_set_error(c, "%s", resp->message != NULL && resp->message[0] != '\0'
                                          ? resp->message
                                          : kr_strerror(resp->status));
    else
        c->err[0] = '\0';
}

int kr_call(kr_client *client, Keyraft__Request *req, Keyraft__Response **out_resp)
{
    kr_client *c = client;
    char request_id[2 * REQUEST_ID_BYTES + 1];
    char *saved_request_id = NULL;
    Keyraft__Response *resp = NULL;
    Keyraft__Response *held = NULL; /* the last ENOTLEADER/EUNAVAIL answer */
    int64_t deadline, backoff = BACKOFF_MIN_MS;
    size_t attempts, idx;
    int rc = KR_ECONN;

    if (c == NULL || req == NULL || out_resp == NULL)
        return KR_EINVAL;
    /* The request_ids are kept for every retry of this call, so the node
     * deduplicates; the caller's pointers come back before returning. */
    struct batch_ids batch_ids = {0};
    if (req->op_case == KEYRAFT__REQUEST__OP_BATCH) {
        rc = batch_ids_assign(c, req, &batch_ids);
        if (rc != 0) {
            batch_ids_restore(req, &batch_ids);
            return rc;
        }
    }
    rc = request_prepare(c, req, request_id, &saved_request_id);
    if (rc != 0) {
        batch_ids_restore(req, &batch_ids);
        return rc;
    }
    rc = KR_ECONN;

    deadline = now_ms() + c->timeout_ms;
    attempts = RETRY_PASSES * c->n_eps;
    idx = c->cur;
    for (size_t attempt = 0; attempt < attempts; attempt++) {
        enum phase phase;
        int reused;

        if (attempt > 0) {
            idx = (idx + 1) % c->n_eps;
            if (attempt >= c->n_eps) { /* after the first pass: back off */
                int64_t left = deadline - now_ms();
                sleep_ms(backoff < left ? backoff : left);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            }
        }
        if (now_ms() >= deadline) {
            rc = KR_ETIMEDOUT;
            break;
        }
        reused = c->fd >= 0 && c->conn_ep == idx;
        rc = call_once(c, idx, req, deadline, &resp, &phase);
        if (rc == KR_ECONN && reused && phase == PHASE_REQUEST) {
            /* The node closed an idle connection: one fresh try, not counted. */
            conn_close(c);
            rc = call_once(c, idx, req, deadline, &resp, &phase);
        }
        if (rc == 0) {
            kr_response_free(held);
            held = NULL;
            if ((resp->status == KR_ENOTLEADER || resp->status == KR_EUNAVAIL) &&
                attempt + 1 < attempts && now_ms() < deadline) {
                long leader = resp->status == KR_ENOTLEADER
                                  ? leader_endpoint_index(c, resp->leader_endpoint)
                                  : -1;
                held = resp;
                resp = NULL;
                conn_close(c);
                if (leader >= 0 && (size_t)leader != idx) {
                    /* Straight to the leader: the loop steps idx forward. */
                    if (attempts < RETRY_PASSES * MAX_ENDPOINTS)
                        attempts++; /* the hop to the leader is not a failed try */
                    idx = ((size_t)leader + c->n_eps - 1) % c->n_eps;
                }
                continue;
            }
            break;
        }
        conn_close(c);
        if (rc == KR_ECONN || rc == KR_ETLS || (rc == KR_ETIMEDOUT && phase == PHASE_CONNECT))
            continue;
        /* A request-phase timeout or a protocol error: no retry, and this
         * outcome, not an earlier node's refusal, is the answer. */
        kr_response_free(held);
        held = NULL;
        break;
    }
    request_restore(req, saved_request_id, request_id);
    batch_ids_restore(req, &batch_ids);
    if (resp == NULL && held == NULL)
        return rc != 0 ? rc : KR_EINTERNAL;
    if (resp == NULL) { /* no node took the request: report what one said */
        resp = held;
        held = NULL;
    } else {
        c->cur = idx;
    }
    response_note(c, resp);
    *out_resp = resp;
    return 0;
}

/* ---- pipelining ------------------------------------------------------------------------- */

int kr_send(kr_client *client, Keyraft__Request *req)
{
    kr_client *c = client;
    char request_id[2 * REQUEST_ID_BYTES + 1];
    char *saved_request_id = NULL;
    int64_t deadline;
    int rc;

    if (c == NULL || req == NULL)
        return KR_EINVAL;
    rc = request_prepare(c, req, request_id, &saved_request_id);
    if (rc != 0)
        return rc;
    deadline = now_ms() + c->timeout_ms;
    if (c->fd < 0) {
        int64_t cap = now_ms() + CONNECT_TIMEOUT_MAX_MS;
        rc = conn_open(c, c->cur, deadline < cap ? deadline : cap);
        if (rc != 0)
            goto out;
    }
    rc = send_request(c, req, deadline, 1);
    if (rc != 0)
        conn_close(c); /* a frame may be cut: the stream is unusable */
out:
    request_restore(req, saved_request_id, request_id);
    return rc;
}

int kr_flush(kr_client *client)
{
    if (client == NULL)
        return KR_EINVAL;
    if (client->fd < 0)
        return client->out_len == 0 ? 0 : KR_ECONN;
    int rc = out_flush(client, now_ms() + client->timeout_ms);
    if (rc != 0)
        conn_close(client);
    return rc;
}

/* kr_recv and kr_try_recv: the next answer, waiting for it or not. */
static int recv_next(kr_client *c, int wait, Keyraft__Response **out_resp)
{
    Keyraft__Response *resp = NULL;

    if (c->fd < 0) {
        kr__client_set_error(c, "no open connection: nothing sent with kr_send is in flight");
        return KR_ECONN;
    }
    int rc = recv_response(c, now_ms() + c->timeout_ms, wait, &resp); /* flushes first */
    if (rc != 0) {
        conn_close(c); /* what was in flight on it is lost */
        return rc;
    }
    if (resp != NULL)
        response_note(c, resp);
    *out_resp = resp;
    return 0;
}

int kr_recv(kr_client *client, Keyraft__Response **out_resp)
{
    if (client == NULL || out_resp == NULL)
        return KR_EINVAL;
    return recv_next(client, 1, out_resp);
}

int kr_try_recv(kr_client *client, Keyraft__Response **out_resp)
{
    if (client == NULL || out_resp == NULL)
        return KR_EINVAL;
    *out_resp = NULL;
    return recv_next(client, 0, out_resp);
}

int kr_client_fd(const kr_client *client)
{
    return client != NULL ? client->fd : -1;
}

int kr__call_ok(kr_client *c, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
                Keyraft__Response **out_resp)
{
    Keyraft__Response *resp = NULL;
    int rc = kr_call(c, req, &resp);

    if (rc != 0)
        return rc;
    if (resp->status != 0) {
        rc = resp->status;
        kr_response_free(resp);
        return rc;
    }
    if (expect != KEYRAFT__RESPONSE__RESULT__NOT_SET && resp->result_case != expect) {
        kr__client_set_error(c, "the node answered with result %d, expected %d",
                             (int)resp->result_case, (int)expect);
        kr_response_free(resp);
        return KR_EPROTO;
    }
    *out_resp = resp;
    return 0;
}

/* ---- freeing ------------------------------------------------------------------------------ */

static int field_present(const ProtobufCMessage *msg, const ProtobufCFieldDescriptor *f)
{
    if (!(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
        return 1;
    const uint32_t *oneof_case = (const uint32_t *)((const char *)msg + f->quantifier_offset);
    return *oneof_case == f->id;
}

void kr__message_wipe(ProtobufCMessage *msg)
{
    if (msg == NULL)
        return;
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        char *member = (char *)msg + f->offset;
        if (!field_present(msg, f))
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(size_t *)((char *)msg + f->quantifier_offset);
            if (f->type == PROTOBUF_C_TYPE_BYTES) {
                ProtobufCBinaryData *arr = *(ProtobufCBinaryData **)member;
                for (size_t j = 0; arr != NULL && j < n; j++)
                    if (arr[j].data != NULL)
                        OPENSSL_cleanse(arr[j].data, arr[j].len);
            } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                ProtobufCMessage **arr = *(ProtobufCMessage ***)member;
                for (size_t j = 0; arr != NULL && j < n; j++)
                    kr__message_wipe(arr[j]);
            }
        } else if (f->type == PROTOBUF_C_TYPE_BYTES) {
            ProtobufCBinaryData *bd = (ProtobufCBinaryData *)member;
            if (bd->data != NULL && bd->len > 0)
                OPENSSL_cleanse(bd->data, bd->len);
        } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            kr__message_wipe(*(ProtobufCMessage **)member);
        }
    }
}

void kr_response_free(Keyraft__Response *resp)
{
    if (resp == NULL)
        return;
    kr__message_wipe(&resp->base);
    keyraft__response__free_unpacked(resp, NULL);
}

void kr_buf_free(kr_buf *buf)
{
    if (buf == NULL)
        return;
    if (buf->data != NULL) {
        OPENSSL_cleanse(buf->data, buf->len);
        free(buf->data);
    }
    buf->data = NULL;
    buf->len = 0;
}
