/* tls.c: TLS 1.3 with mutual authentication over memory BIOs (OpenSSL 3). */
#include "tls.h"

#define KR_LOG_MODULE "tls"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "keyraft.h"
#include "log.h"
#include "pki.h"

#define TLS_KEY_FILE_MAX (64 * 1024) /* a PEM private key is a few KB */
#define TLS_ERROR_MAX 512

struct tls_ctx {
    SSL_CTX *ssl_ctx;
};

struct tls_conn {
    SSL *ssl;
    BIO *rbio; /* ciphertext from the peer; owned by ssl */
    BIO *wbio; /* ciphertext for the peer; owned by ssl */
    int done;
    int failed;
    char *peer_name;  /* verified peer CN, set when the handshake completes */
    char *peer_roles; /* its OU entries, comma-joined */
    char peer_serial[80]; /* its serial number, lowercase hex */
    int peer_is_node; /* the peer's certificate may serve (serverAuth): a node */
    char error[TLS_ERROR_MAX];
};

/* Appends OpenSSL's queued reasons to |buf| after its first |start| bytes
 * ("; "-separated) and empties the queue. */
static void append_ossl_errors(char *buf, size_t cap, size_t start)
{
    unsigned long e;
    while ((e = ERR_get_error()) != 0) {
        size_t used = strlen(buf);
        if (cap - used < 3)
            break;
        if (used > start) {
            memcpy(buf + used, "; ", 3);
            used += 2;
        }
        ERR_error_string_n(e, buf + used, cap - used);
    }
    ERR_clear_error();
}

/* Logs a context setup failure, naming |path|, with OpenSSL's reasons. */
static int ctx_fail(const char *what, const char *path)
{
    char reason[TLS_ERROR_MAX] = "";
    append_ossl_errors(reason, sizeof(reason), 0);
    log_error("%s%s%s: %s", what, path != NULL ? " " : "", path != NULL ? path : "",
              reason[0] != '\0' ? reason : "no reason given");
    return KR_ETLS;
}

/* Distinguishes a file that cannot be read (KR_EIO, with errno's reason)
 * from one OpenSSL cannot parse (KR_ETLS) before handing the path over. */
static int check_readable(const char *what, const char *path)
{
    if (path == NULL || path[0] == '\0') {
        log_error("%s: no file given", what);
        return KR_EINVAL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_error("%s %s: %s", what, path, strerror(errno));
        return KR_EIO;
    }
    close(fd);
    return 0;
}

/* Never prompts: an encrypted key file is an error, not a terminal read. */
static int no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

/* Loads the private key through a buffer in OpenSSL's secure heap, so the
 * PEM text never sits in stdio buffers on the ordinary heap. */
static int use_key_file(SSL_CTX *ssl_ctx, const char *path)
{
    char *buf = NULL;
    size_t len = 0;
    BIO *bio = NULL;
    EVP_PKEY *key = NULL;
    int rv = KR_EIO;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_error("loading private key %s: %s", path, strerror(errno));
        goto out;
    }
    buf = OPENSSL_secure_malloc(TLS_KEY_FILE_MAX);
    if (buf == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, TLS_KEY_FILE_MAX - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            log_error("loading private key %s: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len == TLS_KEY_FILE_MAX) {
            log_error("loading private key %s: larger than %d bytes", path, TLS_KEY_FILE_MAX);
            rv = KR_ETLS;
            goto out;
        }
    }
    bio = BIO_new_mem_buf(buf, (int)len);
    if (bio == NULL) {
        rv = ctx_fail("loading private key", path);
        goto out;
    }
    key = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL);
    if (key == NULL) {
        rv = ctx_fail("loading private key (unencrypted PEM expected)", path);
        goto out;
    }
    if (SSL_CTX_use_PrivateKey(ssl_ctx, key) != 1) {
        rv = ctx_fail("using private key", path);
        goto out;
    }
    if (SSL_CTX_check_private_key(ssl_ctx) != 1) {
        rv = ctx_fail("private key does not match the certificate:", path);
        goto out;
    }
    rv = 0;
out:
    EVP_PKEY_free(key);
    BIO_free(bio);
    if (buf != NULL)
        OPENSSL_secure_clear_free(buf, TLS_KEY_FILE_MAX);
    if (fd >= 0)
        close(fd);
    return rv;
}

static int load_cert_and_key(SSL_CTX *ssl_ctx, const char *cert_file, const char *key_file)
{
    int rv = check_readable("loading certificate", cert_file);
    if (rv != 0)
        return rv;
    if (key_file == NULL || key_file[0] == '\0') {
        log_error("certificate %s given without its private key", cert_file);
        return KR_EINVAL;
    }
    if (SSL_CTX_use_certificate_chain_file(ssl_ctx, cert_file) != 1)
        return ctx_fail("loading certificate", cert_file);
    return use_key_file(ssl_ctx, key_file);
}

static int ctx_new(int is_server, const char *ca_file, const char *cert_file,
                   const char *key_file, struct tls_ctx **out)
{
    struct tls_ctx *ctx = NULL;
    SSL_CTX *ssl_ctx = NULL;
    int rv = check_readable("loading CA", ca_file);
    if (rv != 0)
        goto out;
    ERR_clear_error();
    ssl_ctx = SSL_CTX_new(is_server ? TLS_server_method() : TLS_client_method());
    if (ssl_ctx == NULL) {
        rv = ctx_fail("making a TLS context", NULL);
        goto out;
    }
    if (SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ssl_ctx, TLS1_3_VERSION) != 1) {
        rv = ctx_fail("restricting to TLS 1.3", NULL);
        goto out;
    }
    /* OpenSSL wipes decrypted records once they are read: requests and
     * answers may carry key material (imports, exports, data keys). */
    SSL_CTX_set_options(ssl_ctx, SSL_OP_CLEANSE_PLAINTEXT);
    if (SSL_CTX_load_verify_locations(ssl_ctx, ca_file, NULL) != 1) {
        rv = ctx_fail("loading CA", ca_file);
        goto out;
    }
    if (is_server) {
        rv = load_cert_and_key(ssl_ctx, cert_file, key_file);
        if (rv != 0)
            goto out;
        /* Tell clients which CA to pick a certificate for. */
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca_file);
        if (names == NULL) {
            rv = ctx_fail("reading CA names from", ca_file);
            goto out;
        }
        SSL_CTX_set_client_CA_list(ssl_ctx, names);
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
        /* No resumption: every connection proves its client certificate. */
        SSL_CTX_set_options(ssl_ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_session_cache_mode(ssl_ctx, SSL_SESS_CACHE_OFF);
        if (SSL_CTX_set_num_tickets(ssl_ctx, 0) != 1) {
            rv = ctx_fail("disabling session tickets", NULL);
            goto out;
        }
    } else {
        if (cert_file != NULL) {
            rv = load_cert_and_key(ssl_ctx, cert_file, key_file);
            if (rv != 0)
                goto out;
        }
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, NULL);
    }
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    ctx->ssl_ctx = ssl_ctx;
    ssl_ctx = NULL;
    *out = ctx;
    rv = 0;
out:
    SSL_CTX_free(ssl_ctx);
    return rv;
}

int tls_server_ctx_new(const char *ca_file, const char *cert_file, const char *key_file,
                       struct tls_ctx **out)
{
    return ctx_new(1, ca_file, cert_file, key_file, out);
}

int tls_client_ctx_new(const char *ca_file, const char *cert_file, const char *key_file,
                       struct tls_ctx **out)
{
    return ctx_new(0, ca_file, cert_file, key_file, out);
}

void tls_ctx_free(struct tls_ctx *ctx)
{
    if (ctx == NULL)
        return;
    SSL_CTX_free(ctx->ssl_ctx);
    free(ctx);
}

/* Marks |conn| failed and records why: |what|, OpenSSL's queued reasons and,
 * when certificate verification failed, the verifier's reason. */
static int conn_fail(struct tls_conn *conn, const char *what)
{
    conn->failed = 1;
    snprintf(conn->error, sizeof(conn->error), "%s: ", what);
    size_t prefix = strlen(conn->error);
    append_ossl_errors(conn->error, sizeof(conn->error), prefix);
    long verify = SSL_get_verify_result(conn->ssl);
    if (verify != X509_V_OK) {
        size_t used = strlen(conn->error);
        snprintf(conn->error + used, sizeof(conn->error) - used, "%s(peer certificate: %s)",
                 used > prefix ? " " : "", X509_verify_cert_error_string(verify));
    } else if (strlen(conn->error) == prefix) {
        size_t used = strlen(conn->error);
        snprintf(conn->error + used, sizeof(conn->error) - used, "no reason given");
    }
    return KR_ETLS;
}

/* The UTF-8 text of a name entry; NULL when it is not valid text or holds a
 * NUL (a name that would compare differently than it reads). */
static char *entry_text(const X509_NAME_ENTRY *entry)
{
    unsigned char *utf8 = NULL;
    int len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(entry));
    if (len < 0)
        return NULL;
    if (memchr(utf8, '\0', (size_t)len) != NULL) {
        OPENSSL_free(utf8);
        return NULL;
    }
    char *s = strdup((const char *)utf8);
    OPENSSL_free(utf8);
    return s;
}

/* Caches the verified peer's CN and OU entries once the handshake is done. */
static int capture_peer(struct tls_conn *conn)
{
    char *name = NULL;
    char *roles = NULL;
    int rv = KR_ETLS;
    X509 *peer = SSL_get0_peer_certificate(conn->ssl);
    if (peer == NULL || SSL_get_verify_result(conn->ssl) != X509_V_OK) {
        snprintf(conn->error, sizeof(conn->error), "handshake: no verified peer certificate");
        goto out;
    }
    const X509_NAME *subject = X509_get_subject_name(peer);
    int idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (idx < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0) {
        snprintf(conn->error, sizeof(conn->error),
                 "handshake: peer certificate needs exactly one subject CN");
        goto out;
    }
    name = entry_text(X509_NAME_get_entry(subject, idx));
    if (name == NULL) {
        snprintf(conn->error, sizeof(conn->error), "handshake: peer certificate CN is not text");
        goto out;
    }
    roles = strdup("");
    if (roles == NULL)
        goto out_nomem;
    for (idx = -1; (idx = X509_NAME_get_index_by_NID(subject, NID_organizationalUnitName,
                                                     idx)) >= 0;) {
        char *role = entry_text(X509_NAME_get_entry(subject, idx));
        if (role == NULL) {
            snprintf(conn->error, sizeof(conn->error),
                     "handshake: peer certificate OU is not text");
            goto out;
        }
        size_t have = strlen(roles);
        size_t add = strlen(role);
        char *joined = realloc(roles, have + (have > 0) + add + 1);
        if (joined == NULL) {
            free(role);
            goto out_nomem;
        }
        roles = joined;
        if (have > 0)
            roles[have++] = ',';
        memcpy(roles + have, role, add + 1);
        free(role);
    }
    if (pki_serial_hex(peer, conn->peer_serial, sizeof(conn->peer_serial)) != 0) {
        snprintf(conn->error, sizeof(conn->error), "handshake: peer certificate serial unreadable");
        goto out;
    }
    conn->peer_name = name;
    conn->peer_roles = roles;
    conn->peer_is_node = X509_check_purpose(peer, X509_PURPOSE_SSL_SERVER, 0) == 1;
    name = NULL;
    roles = NULL;
    rv = 0;
    goto out;
out_nomem:
    snprintf(conn->error, sizeof(conn->error), "handshake: out of memory");
out:
    if (rv != 0)
        conn->failed = 1;
    free(name);
    free(roles);
    return rv;
}

/* Runs the handshake as far as the buffered input allows. */
static int drive_handshake(struct tls_conn *conn)
{
    if (conn->done)
        return 0;
    ERR_clear_error();
    int r = SSL_do_handshake(conn->ssl);
    if (r == 1) {
        if (capture_peer(conn) != 0)
            return KR_ETLS;
        conn->done = 1;
        return 0;
    }
    int err = SSL_get_error(conn->ssl, r);
    if (err == SSL_ERROR_WANT_READ)
        return 0;
    return conn_fail(conn, "handshake");
}

int tls_conn_new(struct tls_ctx *ctx, int is_server, struct tls_conn **out)
{
    struct tls_conn *conn = NULL;
    BIO *rbio = NULL;
    BIO *wbio = NULL;
    int rv = KR_ENOMEM;
    if (ctx == NULL) {
        rv = KR_EINVAL;
        goto out;
    }
    conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        goto out;
    ERR_clear_error();
    conn->ssl = SSL_new(ctx->ssl_ctx);
    rbio = BIO_new(BIO_s_mem());
    wbio = BIO_new(BIO_s_mem());
    if (conn->ssl == NULL || rbio == NULL || wbio == NULL) {
        ERR_clear_error();
        goto out;
    }
    /* An empty input BIO means "wait for more", not end of stream. */
    BIO_set_mem_eof_return(rbio, -1);
    BIO_set_mem_eof_return(wbio, -1);
    SSL_set_bio(conn->ssl, rbio, wbio);
    conn->rbio = rbio;
    conn->wbio = wbio;
    rbio = NULL;
    wbio = NULL;
    if (is_server) {
        SSL_set_accept_state(conn->ssl);
    } else {
        SSL_set_connect_state(conn->ssl);
        /* Queues the ClientHello, so the caller has something to send. */
        rv = drive_handshake(conn);
        if (rv != 0) {
            log_error("%s", conn->error);
            goto out;
        }
    }
    *out = conn;
    conn = NULL;
    rv = 0;
out:
    BIO_free(rbio);
    BIO_free(wbio);
    tls_conn_free(conn);
    return rv;
}

void tls_conn_free(struct tls_conn *conn)
{
    if (conn == NULL)
        return;
    SSL_free(conn->ssl);
    free(conn->peer_name);
    free(conn->peer_roles);
    free(conn);
}

int tls_conn_feed(struct tls_conn *conn, const uint8_t *in, size_t len)
{
    if (conn->failed)
        return KR_ETLS;
    while (len > 0) {
        int chunk = len > INT_MAX ? INT_MAX : (int)len;
        int n = BIO_write(conn->rbio, in, chunk);
        if (n <= 0)
            return conn_fail(conn, "buffering input");
        in += n;
        len -= (size_t)n;
    }
    return drive_handshake(conn);
}

int tls_conn_read(struct tls_conn *conn, uint8_t *buf, size_t cap)
{
    if (conn->failed)
        return KR_ETLS;
    if (!conn->done || cap == 0)
        return 0;
    if (cap > INT_MAX)
        cap = INT_MAX;
    size_t n = 0;
    ERR_clear_error();
    int r = SSL_read_ex(conn->ssl, buf, cap, &n);
    if (r == 1)
        return (int)n;
    switch (SSL_get_error(conn->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        snprintf(conn->error, sizeof(conn->error), "read: peer closed the connection");
        return KR_ECONN;
    default:
        return conn_fail(conn, "read");
    }
}

int tls_conn_write(struct tls_conn *conn, const uint8_t *data, size_t len)
{
    if (conn->failed)
        return KR_ETLS;
    if (!conn->done) {
        snprintf(conn->error, sizeof(conn->error), "write: handshake not done");
        return KR_ETLS;
    }
    ERR_clear_error();
    while (len > 0) {
        size_t n = 0;
        /* Memory BIOs never block, so a write either takes the bytes or fails. */
        if (SSL_write_ex(conn->ssl, data, len, &n) != 1 || n == 0)
            return conn_fail(conn, "write");
        data += n;
        len -= n;
    }
    return 0;
}

size_t tls_conn_pending(const struct tls_conn *conn)
{
    return BIO_ctrl_pending(conn->wbio);
}

size_t tls_conn_take_output(struct tls_conn *conn, uint8_t *buf, size_t cap)
{
    if (cap == 0 || BIO_ctrl_pending(conn->wbio) == 0)
        return 0;
    int n = BIO_read(conn->wbio, buf, cap > INT_MAX ? INT_MAX : (int)cap);
    return n > 0 ? (size_t)n : 0;
}

int tls_conn_handshake_done(const struct tls_conn *conn)
{
    return conn->done;
}

const char *tls_conn_peer_name(const struct tls_conn *conn)
{
    return conn->peer_name;
}

int tls_conn_peer_is_node(const struct tls_conn *conn)
{
    return conn->peer_name != NULL && conn->peer_is_node;
}

const char *tls_conn_peer_serial(const struct tls_conn *conn)
{
    return conn->peer_name != NULL ? conn->peer_serial : "";
}

const char *tls_conn_peer_roles(const struct tls_conn *conn)
{
    return conn->peer_roles != NULL ? conn->peer_roles : "";
}

const char *tls_conn_error(const struct tls_conn *conn)
{
    return conn->error;
}
