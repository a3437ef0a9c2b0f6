/* test_client.c: libkeyraft without a real node: status and name tables,
 * the config file, connection failures and timeouts, and a fake TLS node
 * that answers with an oversized frame, a wrong certificate, or a refusal
 * that makes the client fail over. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "keyraft.h"

/* ---- a throwaway PKI ---------------------------------------------------------------- */

struct pki {
    char dir[64];
    char ca[96], cert[96], key[96]; /* client side files */
    EVP_PKEY *ca_key, *srv_key;
    X509 *ca_cert, *srv_cert, *wrong_cert; /* wrong_cert: SAN names another host */
};

static struct pki P;

static int add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509_EXTENSION *ext;

    X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    if (ext == NULL)
        return -1;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok == 1 ? 0 : -1;
}

/* A certificate for |key| named |cn|, signed by the CA (or self-signed when
 * |issuer| is NULL); |san| NULL for none. */
static X509 *make_cert(EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *issuer_key,
                       const char *san)
{
    static long serial = 1;
    X509 *x = X509_new();
    int ok = x != NULL;

    ok = ok && X509_set_version(x, 2) == 1;
    ok = ok && ASN1_INTEGER_set(X509_get_serialNumber(x), serial++) == 1;
    ok = ok && X509_gmtime_adj(X509_getm_notBefore(x), -60) != NULL;
    ok = ok && X509_gmtime_adj(X509_getm_notAfter(x), 3600) != NULL;
    ok = ok && X509_set_pubkey(x, key) == 1;
    ok = ok && X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC,
                                            (const unsigned char *)cn, -1, -1, 0) == 1;
    ok = ok && X509_set_issuer_name(x, X509_get_subject_name(issuer != NULL ? issuer : x));
    if (issuer == NULL) {
        ok = ok && add_ext(x, x, NID_basic_constraints, "critical,CA:TRUE") == 0;
        ok = ok && add_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign") == 0;
    } else {
        ok = ok && add_ext(x, issuer, NID_basic_constraints, "CA:FALSE") == 0;
        ok = ok && add_ext(x, issuer, NID_ext_key_usage, "serverAuth,clientAuth") == 0;
    }
    if (san != NULL)
        ok = ok && add_ext(x, issuer != NULL ? issuer : x, NID_subject_alt_name, san) == 0;
    ok = ok && X509_sign(x, issuer_key != NULL ? issuer_key : key, EVP_sha256()) > 0;
    if (!ok) {
        X509_free(x);
        return NULL;
    }
    return x;
}

static int write_pem(const char *path, X509 *cert, EVP_PKEY *key)
{
    FILE *f = fopen(path, "w");
    int ok = f != NULL;

    ok = ok && (cert == NULL || PEM_write_X509(f, cert) == 1);
    ok = ok && (key == NULL || PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) == 1);
    if (f != NULL)
        fclose(f);
    return ok ? 0 : -1;
}

static int group_setup(void **state)
{
    EVP_PKEY *cli_key = NULL;
    X509 *cli_cert = NULL;
    int rc = -1;

    (void)state;
    strcpy(P.dir, "/tmp/test_client.XXXXXX");
    if (mkdtemp(P.dir) == NULL)
        return -1;
    snprintf(P.ca, sizeof(P.ca), "%s/ca.pem", P.dir);
    snprintf(P.cert, sizeof(P.cert), "%s/client.pem", P.dir);
    snprintf(P.key, sizeof(P.key), "%s/client.key", P.dir);
    P.ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    P.srv_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    cli_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (P.ca_key == NULL || P.srv_key == NULL || cli_key == NULL)
        goto out;
    P.ca_cert = make_cert(P.ca_key, "test CA", NULL, NULL, NULL);
    if (P.ca_cert == NULL)
        goto out;
    P.srv_cert = make_cert(P.srv_key, "node1", P.ca_cert, P.ca_key, "IP:127.0.0.1,DNS:localhost");
    P.wrong_cert = make_cert(P.srv_key, "node2", P.ca_cert, P.ca_key, "DNS:other.example");
    cli_cert = make_cert(cli_key, "alice", P.ca_cert, P.ca_key, NULL);
    if (P.srv_cert == NULL || P.wrong_cert == NULL || cli_cert == NULL)
        goto out;
    if (write_pem(P.ca, P.ca_cert, NULL) != 0 || write_pem(P.cert, cli_cert, NULL) != 0 ||
        write_pem(P.key, NULL, cli_key) != 0)
        goto out;
    rc = 0;
out:
    X509_free(cli_cert);
    EVP_PKEY_free(cli_key);
    return rc;
}

static int group_teardown(void **state)
{
    (void)state;
    unlink(P.ca);
    unlink(P.cert);
    unlink(P.key);
    rmdir(P.dir);
    X509_free(P.ca_cert);
    X509_free(P.srv_cert);
    X509_free(P.wrong_cert);
    EVP_PKEY_free(P.ca_key);
    EVP_PKEY_free(P.srv_key);
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The clock request ids are stamped with. */
static uint64_t wall_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

/* A listening socket on 127.0.0.1 with a kernel-chosen port. */
static int listen_any(int *out_port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 8), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    *out_port = ntohs(sa.sin_port);
    return fd;
}

static kr_client *new_client(const char *endpoints, int timeout_ms)
{
    kr_client_config cfg = {.endpoints = endpoints, .ca_file = P.ca, .cert_file = P.cert,
                            .key_file = P.key, .timeout_ms = timeout_ms};
    kr_client *c = NULL;

    assert_int_equal(kr_client_new(&cfg, &c), 0);
    assert_non_null(c);
    return c;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* ---- a fake node ------------------------------------------------------------------------ */

enum fake_mode {
    FAKE_ANSWER,     /* status 0 and a plausible result */
    FAKE_NOTLEADER,  /* KR_ENOTLEADER to everything */
    FAKE_HUGE_FRAME, /* a length prefix of 0xFFFFFFFF */
};

#define FAKE_MAX_REQS 8

struct fake {
    int lfd, port;
    SSL_CTX *ctx;
    enum fake_mode mode;
    uint64_t commit_index;
    char hint[64]; /* FAKE_NOTLEADER: the leader endpoint it names, if any */
    pthread_t thread;
    pthread_mutex_t mu;
    int stop;
    int n_reqs; /* what it received, in order */
    char request_id[FAKE_MAX_REQS][64];
    uint64_t min_index[FAKE_MAX_REQS];
    uint64_t id[FAKE_MAX_REQS];
    int hold; /* > 1: answer only once this many are in, newest first */
    int answered; /* held requests answered (written to the socket) */
    int coalesce; /* held answers go out in one write: several frames a
                     record, frames across records */
    char inner_id[FAKE_MAX_REQS][3][64]; /* a batch: its first requests' ids */
};

static int ssl_read_all(SSL *ssl, uint8_t *buf, size_t len)
{
    while (len > 0) {
        int n = SSL_read(ssl, buf, (int)len);
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Appends the answer to |req|, framed, to *out (grown; *len bytes used). */
static int fake_encode(struct fake *f, const Keyraft__Request *req, uint8_t **out, size_t *len)
{
    Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
    Keyraft__BatchResponse batch = KEYRAFT__BATCH_RESPONSE__INIT;
    Keyraft__Response inner[3], *inner_ptrs[3];
    Keyraft__KeyAttributes key = KEYRAFT__KEY_ATTRIBUTES__INIT;
    Keyraft__RandomResponse rnd = KEYRAFT__RANDOM_RESPONSE__INIT;
    uint8_t data[64];

    resp.id = req->id;
    if (f->mode != FAKE_NOTLEADER && req->op_case == KEYRAFT__REQUEST__OP_BATCH) {
        /* Every request answered with a key (at most 3 here). */
        key.id = (char *)"k-b";
        key.name = (char *)"batched";
        batch.n_responses = req->batch->n_requests < 3 ? req->batch->n_requests : 3;
        for (size_t i = 0; i < batch.n_responses; i++) {
            keyraft__response__init(&inner[i]);
            inner[i].id = req->id;
            inner[i].result_case = KEYRAFT__RESPONSE__RESULT_KEY;
            inner[i].key = &key;
            inner_ptrs[i] = &inner[i];
        }
        batch.responses = inner_ptrs;
        resp.commit_index = f->commit_index;
        resp.result_case = KEYRAFT__RESPONSE__RESULT_BATCH;
        resp.batch = &batch;
    } else if (f->mode == FAKE_NOTLEADER) {
        resp.status = KR_ENOTLEADER;
        resp.message = (char *)"not the leader";
        resp.leader_endpoint = f->hint;
    } else if (req->op_case == KEYRAFT__REQUEST__OP_RANDOM) {
        memset(data, 0xab, sizeof(data));
        rnd.data.data = data;
        rnd.data.len = req->random->length < sizeof(data) ? req->random->length : sizeof(data);
        resp.result_case = KEYRAFT__RESPONSE__RESULT_RANDOM;
        resp.random = &rnd;
    } else {
        key.id = (char *)"k-1";
        key.name = req->op_case == KEYRAFT__REQUEST__OP_CREATE ? req->create->name
                                                                : (char *)"from-get";
        key.algorithm = KEYRAFT__ALGORITHM__AES_256;
        key.state = KEYRAFT__KEY_STATE__ACTIVE;
        resp.commit_index = f->commit_index;
        resp.result_case = KEYRAFT__RESPONSE__RESULT_KEY;
        resp.key = &key;
    }
    size_t n = keyraft__response__get_packed_size(&resp);
    uint8_t *grown = realloc(*out, *len + n + 4);
    if (grown == NULL)
        return -1;
    *out = grown;
    uint8_t *frame = grown + *len;
    frame[0] = (uint8_t)(n >> 24);
    frame[1] = (uint8_t)(n >> 16);
    frame[2] = (uint8_t)(n >> 8);
    frame[3] = (uint8_t)n;
    keyraft__response__pack(&resp, frame + 4);
    *len += n + 4;
    return 0;
}

static int fake_write(SSL *ssl, const uint8_t *buf, size_t len)
{
    return SSL_write(ssl, buf, (int)len) == (int)len ? 0 : -1;
}

static int fake_reply(struct fake *f, SSL *ssl, const Keyraft__Request *req)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = fake_encode(f, req, &buf, &len);
    if (rc == 0)
        rc = fake_write(ssl, buf, len);
    free(buf);
    return rc;
}

/* Serves one connection until the client goes away. */
static void fake_serve(struct fake *f, int fd)
{
    struct timeval tv = {.tv_sec = 5};
    SSL *ssl = SSL_new(f->ctx);
    uint8_t hdr[4], *body = NULL;
    Keyraft__Request *held[FAKE_MAX_REQS];
    int n_held = 0;

    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1 || SSL_accept(ssl) != 1)
        goto out;
    while (ssl_read_all(ssl, hdr, 4) == 0) {
        uint32_t len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | hdr[2] << 8 | hdr[3];
        if (len > 65536 || (body = malloc(len > 0 ? len : 1)) == NULL)
            break;
        if (ssl_read_all(ssl, body, len) != 0)
            break;
        Keyraft__Request *req = keyraft__request__unpack(NULL, len, body);
        free(body);
        body = NULL;
        if (req == NULL)
            break;
        pthread_mutex_lock(&f->mu);
        if (f->n_reqs < FAKE_MAX_REQS) {
            snprintf(f->request_id[f->n_reqs], sizeof(f->request_id[0]), "%s", req->request_id);
            f->min_index[f->n_reqs] = req->min_index;
            f->id[f->n_reqs] = req->id;
            for (size_t i = 0; req->op_case == KEYRAFT__REQUEST__OP_BATCH && i < 3 &&
                               i < req->batch->n_requests; i++)
                snprintf(f->inner_id[f->n_reqs][i], sizeof(f->inner_id[0][0]), "%s",
                         req->batch->requests[i]->request_id);
        }
        f->n_reqs++;
        pthread_mutex_unlock(&f->mu);
        int rc = 0;
        if (f->hold > 1 && f->hold <= FAKE_MAX_REQS) {
            held[n_held++] = req;
            if (n_held < f->hold)
                continue;
            uint8_t *all = NULL;
            size_t all_len = 0;
            int n_answers = n_held;
            while (n_held > 0) {
                Keyraft__Request *r = held[--n_held];
                if (rc == 0)
                    rc = f->coalesce ? fake_encode(f, r, &all, &all_len) : fake_reply(f, ssl, r);
                keyraft__request__free_unpacked(r, NULL);
                pthread_mutex_lock(&f->mu);
                f->answered += rc == 0 && !f->coalesce;
                pthread_mutex_unlock(&f->mu);
            }
            if (rc == 0 && f->coalesce) {
                rc = fake_write(ssl, all, all_len);
                pthread_mutex_lock(&f->mu);
                f->answered += rc == 0 ? n_answers : 0;
                pthread_mutex_unlock(&f->mu);
            }
            free(all);
            if (rc != 0)
                break;
            continue;
        }
        if (f->mode == FAKE_HUGE_FRAME) {
            static const uint8_t huge[4] = {0xff, 0xff, 0xff, 0xff};
            rc = SSL_write(ssl, huge, 4) == 4 ? 0 : -1;
        } else {
            rc = fake_reply(f, ssl, req);
        }
        keyraft__request__free_unpacked(req, NULL);
        if (rc != 0)
            break;
    }
    SSL_shutdown(ssl);
out:
    while (n_held > 0)
        keyraft__request__free_unpacked(held[--n_held], NULL);
    free(body);
    SSL_free(ssl);
    close(fd);
}

static void *fake_main(void *arg)
{
    struct fake *f = arg;

    for (;;) {
        struct pollfd p = {.fd = f->lfd, .events = POLLIN};
        pthread_mutex_lock(&f->mu);
        int stop = f->stop;
        pthread_mutex_unlock(&f->mu);
        if (stop)
            break;
        if (poll(&p, 1, 20) != 1)
            continue;
        int fd = accept(f->lfd, NULL, NULL);
        if (fd >= 0)
            fake_serve(f, fd);
    }
    return NULL;
}

static void fake_start(struct fake *f, enum fake_mode mode, X509 *cert, uint64_t commit_index)
{
    memset(f, 0, sizeof(*f));
    f->mode = mode;
    f->commit_index = commit_index;
    pthread_mutex_init(&f->mu, NULL);
    f->lfd = listen_any(&f->port);
    f->ctx = SSL_CTX_new(TLS_server_method());
    assert_non_null(f->ctx);
    assert_int_equal(SSL_CTX_use_certificate(f->ctx, cert), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey(f->ctx, P.srv_key), 1);
    assert_int_equal(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

static void fake_stop(struct fake *f)
{
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->thread, NULL);
    close(f->lfd);
    SSL_CTX_free(f->ctx);
    pthread_mutex_destroy(&f->mu);
}

static int fake_count(struct fake *f)
{
    pthread_mutex_lock(&f->mu);
    int n = f->n_reqs;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* ---- tests: names ------------------------------------------------------------------------ */

static void test_status_names(void **state)
{
    (void)state;
    for (int s = KR_EUNSUPPORTED; s <= KR_OK; s++) {
        const char *name = kr_status_name(s);
        assert_true(strncmp(name, "KR_", 3) == 0);
        assert_string_not_equal(name, "KR_EUNKNOWN");
        assert_string_not_equal(kr_strerror(s), "unknown error");
        for (int t = KR_EUNSUPPORTED; t < s; t++)
            assert_string_not_equal(name, kr_status_name(t));
    }
    assert_string_equal(kr_status_name(KR_ENOTFOUND), "KR_ENOTFOUND");
    assert_string_equal(kr_status_name(KR_ETOOBIG), "KR_ETOOBIG");
    assert_string_equal(kr_status_name(KR_EUNSUPPORTED), "KR_EUNSUPPORTED");
    assert_string_equal(kr_strerror(KR_ENOTLEADER), "this node is not the leader");
    assert_true(kr_op_is_write(KEYRAFT__REQUEST__OP_CREATE));
    assert_true(kr_op_is_write(KEYRAFT__REQUEST__OP_CLUSTER_ADD));
    assert_false(kr_op_is_write(KEYRAFT__REQUEST__OP_GET));
    assert_false(kr_op_is_write(KEYRAFT__REQUEST__OP_CLUSTER_TRANSFER));
    assert_string_equal(kr_strerror(-999), "unknown error");
    assert_string_equal(kr_strerror(7), "unknown error");
    assert_non_null(kr_status_name(-999));
}

static void test_alg_state_reason_names(void **state)
{
    static const char *const algs[] = {"aes-128",  "aes-256",  "hmac-sha256", "hmac-sha512",
                                       "rsa-2048", "rsa-3072", "rsa-4096",    "ec-p256",
                                       "ec-p384",  "ed25519"};
    static const char *const states[] = {"pre-active",  "active",    "deactivated",
                                         "compromised", "destroyed", "destroyed-compromised"};
    static const char *const reasons[] = {"compromised", "superseded", "cessation",
                                          "affiliation-changed", "privilege-withdrawn"};
    (void)state;
    for (int i = 0; i < 10; i++) {
        assert_int_equal(kr_alg_parse(algs[i]), i + 1);
        assert_string_equal(kr_alg_name((Keyraft__Algorithm)(i + 1)), algs[i]);
    }
    for (int i = 0; i < 6; i++) {
        assert_int_equal(kr_state_parse(states[i]), i + 1);
        assert_string_equal(kr_state_name((Keyraft__KeyState)(i + 1)), states[i]);
    }
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kr_reason_parse(reasons[i]), i + 1);
        assert_string_equal(kr_reason_name((Keyraft__RevokeReason)(i + 1)), reasons[i]);
    }
    assert_int_equal(kr_alg_parse("AES-256"), KEYRAFT__ALGORITHM__ALG_UNSPECIFIED);
    assert_int_equal(kr_alg_parse("des"), KEYRAFT__ALGORITHM__ALG_UNSPECIFIED);
    assert_int_equal(kr_alg_parse(NULL), KEYRAFT__ALGORITHM__ALG_UNSPECIFIED);
    assert_int_equal(kr_state_parse("enabled"), KEYRAFT__KEY_STATE__STATE_UNSPECIFIED);
    assert_int_equal(kr_reason_parse("bored"), KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED);
    assert_non_null(kr_alg_name((Keyraft__Algorithm)99));
    assert_non_null(kr_state_name((Keyraft__KeyState)-1));
}

/* ---- tests: config file --------------------------------------------------------------------- */

static void test_config_file(void **state)
{
    char dir[] = "/tmp/test_client_cfg.XXXXXX", sub[128], path[160], want[200];
    kr_client_file *file = NULL;
    kr_client_config cfg = {0};

    (void)state;
    assert_non_null(mkdtemp(dir));
    snprintf(sub, sizeof(sub), "%s/etc", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(path, sizeof(path), "%s/client.conf", sub);
    write_file(path, "# keyraft client\n[client]\nendpoints = 10.0.0.1:7300,10.0.0.2:7300\n"
                     "ca = tls/ca.pem\ncert = ./tls/me.pem\nkey = /abs/me.key\n"
                     "timeout_ms = 1500\n[other]\nignored = yes\n");
    assert_int_equal(kr_client_file_load(path, &file, &cfg), 0);
    assert_string_equal(cfg.endpoints, "10.0.0.1:7300,10.0.0.2:7300");
    snprintf(want, sizeof(want), "%s/tls/ca.pem", sub);
    assert_string_equal(cfg.ca_file, want);
    snprintf(want, sizeof(want), "%s/./tls/me.pem", sub);
    assert_string_equal(cfg.cert_file, want);
    assert_string_equal(cfg.key_file, "/abs/me.key");
    assert_int_equal(cfg.timeout_ms, 1500);
    kr_client_file_free(file);

    /* $KEYRAFT_CONFIG is the first place looked at without a path. */
    file = NULL;
    memset(&cfg, 0, sizeof(cfg));
    setenv("KEYRAFT_CONFIG", path, 1);
    assert_int_equal(kr_client_file_load(NULL, &file, &cfg), 0);
    assert_int_equal(cfg.timeout_ms, 1500);
    kr_client_file_free(file);
    unsetenv("KEYRAFT_CONFIG");

    /* A missing field, a bad value, an unknown setting, a missing file. */
    static const char *const bad[] = {
        "[client]\nendpoints = a:1\nca = ca.pem\ncert = c.pem\n",
        "[client]\nendpoints = a:1\nca = ca.pem\ncert = c.pem\nkey = k\ntimeout_ms = soon\n",
        "[client]\nendpoints = a:1\nca = ca.pem\ncert = c.pem\nkey = k\ntimeuot_ms = 5\n",
        "[node]\nendpoints = a:1\nca = ca.pem\ncert = c.pem\nkey = k\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        file = (kr_client_file *)&cfg; /* must stay untouched on failure */
        write_file(path, bad[i]);
        assert_int_equal(kr_client_file_load(path, &file, &cfg), KR_ECONFIG);
        assert_ptr_equal(file, (kr_client_file *)&cfg);
    }
    unlink(path);
    assert_int_equal(kr_client_file_load(path, &file, &cfg), KR_ECONFIG);
    setenv("KEYRAFT_CONFIG", path, 1);
    assert_int_equal(kr_client_file_load(NULL, &file, &cfg), KR_ECONFIG);
    unsetenv("KEYRAFT_CONFIG");
    assert_int_equal(rmdir(sub), 0);
    assert_int_equal(rmdir(dir), 0);
}

static void test_client_new_rejects_bad_config(void **state)
{
    kr_client_config cfg = {.endpoints = "127.0.0.1:7300", .ca_file = P.ca,
                            .cert_file = P.cert, .key_file = P.key};
    kr_client *c = NULL;

    (void)state;
    cfg.key_file = "/nonexistent/key.pem";
    assert_int_equal(kr_client_new(&cfg, &c), KR_ECONFIG);
    cfg.key_file = P.ca; /* a certificate is not a key */
    assert_int_equal(kr_client_new(&cfg, &c), KR_ECONFIG);
    cfg.key_file = P.key;
    cfg.endpoints = " , ";
    assert_int_equal(kr_client_new(&cfg, &c), KR_ECONFIG);
    cfg.endpoints = "host:notaport";
    assert_int_equal(kr_client_new(&cfg, &c), KR_ECONFIG);
    assert_null(c);
    cfg.endpoints = "[::1]:7300, localhost ,127.0.0.1:1";
    assert_int_equal(kr_client_new(&cfg, &c), 0);
    kr_client_free(c);
    kr_client_free(NULL);
    kr_response_free(NULL);
    kr_buf_free(NULL);
}

/* ---- tests: connections ----------------------------------------------------------------- */

static void test_closed_port_is_econn_fast(void **state)
{
    char ep[64];
    kr_buf out = {0};
    int port, fd = listen_any(&port);

    (void)state;
    close(fd); /* nothing listens there now */
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", port);
    kr_client *c = new_client(ep, 10000);
    int64_t t0 = now_ms();
    assert_int_equal(kr_random(c, 8, &out), KR_ECONN);
    assert_true(now_ms() - t0 < 3000);
    assert_non_null(strstr(kr_client_last_error(c), "refused"));
    assert_null(out.data);
    kr_client_free(c);
}

static void test_silent_listener_times_out(void **state)
{
    char ep[64];
    kr_buf out = {0};
    int port, fd = listen_any(&port); /* accepts TCP, never speaks TLS */

    (void)state;
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", port);
    kr_client *c = new_client(ep, 300);
    int64_t t0 = now_ms();
    assert_int_equal(kr_random(c, 8, &out), KR_ETIMEDOUT);
    int64_t took = now_ms() - t0;
    assert_true(took >= 250);
    assert_true(took < 1500);
    kr_client_free(c);
    close(fd);
}

static void test_oversized_frame_is_etoobig(void **state)
{
    struct fake f;
    char ep[64];
    kr_buf out = {0};

    (void)state;
    fake_start(&f, FAKE_HUGE_FRAME, P.srv_cert, 0);
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 5000);
    assert_int_equal(kr_random(c, 8, &out), KR_ETOOBIG);
    assert_null(out.data);
    assert_non_null(strstr(kr_client_last_error(c), "limit"));
    kr_client_free(c);
    fake_stop(&f);
    assert_int_equal(f.n_reqs, 1); /* a protocol error is not retried */
}

static void test_wrong_server_name_is_etls(void **state)
{
    struct fake f;
    char ep[64];
    kr_buf out = {0};

    (void)state;
    fake_start(&f, FAKE_ANSWER, P.wrong_cert, 0); /* CA-signed, but for other.example */
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 5000);
    assert_int_equal(kr_random(c, 8, &out), KR_ETLS);
    assert_non_null(strstr(kr_client_last_error(c), "verification"));
    kr_client_free(c);
    fake_stop(&f);
    assert_int_equal(f.n_reqs, 0); /* nothing was sent to an unverified node */
}

static void test_failover_keeps_request_id(void **state)
{
    struct fake follower, leader;
    char eps[128];
    Keyraft__KeyAttributes *attrs = NULL;
    kr_buf out = {0};

    (void)state;
    fake_start(&follower, FAKE_NOTLEADER, P.srv_cert, 0);
    fake_start(&leader, FAKE_ANSWER, P.srv_cert, 42);
    snprintf(eps, sizeof(eps), "127.0.0.1:%d,localhost:%d", follower.port, leader.port);
    kr_client *c = new_client(eps, 5000);

    assert_int_equal(kr_create_key(c, "db-key", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &attrs), 0);
    assert_string_equal(attrs->name, "db-key");
    kr_key_attributes_free(attrs);
    attrs = NULL;
    assert_int_equal(fake_count(&follower), 1);
    assert_int_equal(fake_count(&leader), 1);
    assert_int_equal(strlen(follower.request_id[0]), 44);
    assert_string_equal(follower.request_id[0], leader.request_id[0]);
    assert_int_equal(kr_client_last_index(c), 42);

    /* The next read goes straight to the node that answered, and asks it to
     * be at least as fresh as the write it acknowledged. */
    assert_int_equal(kr_get_key(c, "name:db-key", &attrs), 0);
    kr_key_attributes_free(attrs);
    assert_int_equal(fake_count(&follower), 1);
    assert_int_equal(fake_count(&leader), 2);
    assert_int_equal(leader.min_index[1], 42);
    assert_string_equal(leader.request_id[1], ""); /* reads carry no idempotency id */

    assert_int_equal(kr_random(c, 16, &out), 0);
    assert_int_equal(out.len, 16);
    assert_int_equal(out.data[0], 0xab);
    kr_buf_free(&out);
    assert_null(out.data);

    /* A node that only ever refuses: the caller sees its answer. */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest rr = KEYRAFT__RANDOM_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    char only[64];
    snprintf(only, sizeof(only), "127.0.0.1:%d", follower.port);
    kr_client *c2 = new_client(only, 5000);
    rr.length = 4;
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &rr;
    assert_int_equal(kr_call(c2, &req, &resp), 0);
    assert_int_equal(resp->status, KR_ENOTLEADER);
    assert_string_equal(kr_client_last_error(c2), "not the leader");
    kr_response_free(resp);
    assert_int_equal(kr_random(c2, 4, &out), KR_ENOTLEADER);
    kr_client_free(c2);

    kr_client_free(c);
    fake_stop(&follower);
    fake_stop(&leader);
}

/* A refusal that names the leader sends the client straight there, past
 * other endpoints, and teaches it an endpoint its list did not have. */
static void test_leader_hint_is_followed(void **state)
{
    struct fake follower, other, leader;
    Keyraft__KeyAttributes *attrs = NULL;
    char eps[128];

    (void)state;
    fake_start(&leader, FAKE_ANSWER, P.srv_cert, 7);
    fake_start(&other, FAKE_NOTLEADER, P.srv_cert, 0);
    fake_start(&follower, FAKE_NOTLEADER, P.srv_cert, 0);
    snprintf(follower.hint, sizeof(follower.hint), "127.0.0.1:%d", leader.port);
    snprintf(eps, sizeof(eps), "127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d", follower.port,
             other.port, leader.port);
    kr_client *c = new_client(eps, 5000);
    assert_int_equal(kr_create_key(c, "hinted", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &attrs), 0);
    kr_key_attributes_free(attrs);
    assert_int_equal(fake_count(&follower), 1);
    assert_int_equal(fake_count(&other), 0); /* skipped: the hint named the leader */
    assert_int_equal(fake_count(&leader), 1);
    assert_string_equal(follower.request_id[0], leader.request_id[0]);
    kr_client_free(c);

    /* Only the follower configured: the hinted leader is learnt. */
    snprintf(eps, sizeof(eps), "127.0.0.1:%d", follower.port);
    c = new_client(eps, 5000);
    attrs = NULL;
    assert_int_equal(kr_create_key(c, "learnt", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &attrs), 0);
    assert_string_equal(attrs->name, "learnt");
    kr_key_attributes_free(attrs);
    assert_int_equal(fake_count(&leader), 2);
    assert_int_equal(kr_client_last_index(c), 7);
    kr_client_free(c);
    fake_stop(&follower);
    fake_stop(&other);
    fake_stop(&leader);
}

static void create_request(Keyraft__Request *req, Keyraft__CreateKeyRequest *create,
                           char *name)
{
    keyraft__request__init(req);
    keyraft__create_key_request__init(create);
    create->name = name;
    create->algorithm = KEYRAFT__ALGORITHM__AES_256;
    req->op_case = KEYRAFT__REQUEST__OP_CREATE;
    req->create = create;
}

/* Several requests in flight on one connection: the fake answers only once
 * all four are in, newest first, so kr_call could not have done it; answers
 * are matched by id, writes carry their own idempotency id and a read after
 * them asks for the write's commit index. */

static void test_pipelined_send_recv(void **state)
{
    enum { N = 4 };
    struct fake f;
    char ep[64], name[N][16];
    Keyraft__Request req[N];
    Keyraft__CreateKeyRequest create[N];
    Keyraft__Response *resp = NULL;

    (void)state;
    fake_start(&f, FAKE_ANSWER, P.srv_cert, 42);
    f.hold = N;
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 5000);
    uint64_t made_after = wall_ms();
    for (int i = 0; i < N; i++) {
        snprintf(name[i], sizeof(name[i]), "k%d", i);
        create_request(&req[i], &create[i], name[i]);
        assert_int_equal(kr_send(c, &req[i]), 0);
        assert_true(req[i].id > (i > 0 ? req[i - 1].id : 0));
        assert_string_equal(req[i].request_id, ""); /* the generated id was the client's own */
    }
    uint64_t made_before = wall_ms();
    /* Small requests wait in the client's queue (one write for all of them)
     * until kr_flush or kr_recv. */
    usleep(50 * 1000);
    assert_int_equal(fake_count(&f), 0);
    assert_int_equal(kr_flush(c), 0);
    for (int i = 0; i < 500 && fake_count(&f) < N; i++)
        usleep(10 * 1000);
    assert_int_equal(fake_count(&f), N);
    for (int i = N - 1; i >= 0; i--) {
        assert_int_equal(kr_recv(c, &resp), 0);
        assert_int_equal(resp->id, req[i].id);
        assert_int_equal(resp->status, 0);
        assert_string_equal(resp->key->name, name[i]);
        kr_response_free(resp);
        resp = NULL;
    }
    assert_int_equal(fake_count(&f), N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(f.id[i], req[i].id);
        assert_int_equal(strlen(f.request_id[i]), 44);
        assert_int_equal(strspn(f.request_id[i], "0123456789abcdef"), 44);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(f.request_id[i], f.request_id[j]);
        /* it starts with the time it was made: the node files ids in order */
        char stamp[13];
        snprintf(stamp, sizeof(stamp), "%.12s", f.request_id[i]);
        uint64_t made = strtoull(stamp, NULL, 16);
        assert_true(made >= made_after && made <= made_before);
    }
    assert_int_equal(kr_client_last_index(c), 42);

    /* Reads in flight together ask for the writes' commit index. */
    Keyraft__GetKeyRequest get[N];
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.id = (char *)"k-1";
    for (int i = 0; i < N; i++) {
        keyraft__request__init(&req[i]);
        keyraft__get_key_request__init(&get[i]);
        get[i].key = &ref;
        req[i].op_case = KEYRAFT__REQUEST__OP_GET;
        req[i].get = &get[i];
        assert_int_equal(kr_send(c, &req[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(kr_recv(c, &resp), 0);
        assert_int_equal(resp->id, req[N - 1 - i].id);
        kr_response_free(resp);
        resp = NULL;
    }
    for (int i = N; i < 2 * N; i++) {
        assert_int_equal(f.min_index[i], 42);
        assert_string_equal(f.request_id[i], "");
    }

    /* kr_call still works on the same client afterwards. */
    f.hold = 0;
    kr_buf out = {0};
    assert_int_equal(kr_random(c, 8, &out), 0);
    kr_buf_free(&out);
    kr_client_free(c);
    fake_stop(&f);
}

/* kr_recv returns answers already received without writing: a request
 * queued meanwhile goes out only when kr_recv would wait. So a client
 * answering each reply with a new request sends one write per burst of
 * replies, not one per reply. */
static void test_recv_writes_only_before_waiting(void **state)
{
    enum { N = 4 };
    struct fake f;
    char ep[64], name[N + 1][16];
    Keyraft__Request req[N + 1];
    Keyraft__CreateKeyRequest create[N + 1];
    Keyraft__Response *resp = NULL;

    (void)state;
    fake_start(&f, FAKE_ANSWER, P.srv_cert, 7);
    f.hold = N;
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 5000);
    for (int i = 0; i < N; i++) {
        snprintf(name[i], sizeof(name[i]), "r%d", i);
        create_request(&req[i], &create[i], name[i]);
        assert_int_equal(kr_send(c, &req[i]), 0);
    }
    assert_int_equal(kr_flush(c), 0);
    /* All N answers are in the client's socket (loopback delivers in write). */
    for (int i = 0; i < 500; i++) {
        pthread_mutex_lock(&f.mu);
        int done = f.answered == N;
        pthread_mutex_unlock(&f.mu);
        if (done)
            break;
        usleep(10 * 1000);
    }
    pthread_mutex_lock(&f.mu);
    assert_int_equal(f.answered, N);
    f.hold = 0; /* from now on answer at once */
    pthread_mutex_unlock(&f.mu);

    assert_int_equal(kr_recv(c, &resp), 0);
    kr_response_free(resp);
    snprintf(name[N], sizeof(name[N]), "r%d", N);
    create_request(&req[N], &create[N], name[N]);
    assert_int_equal(kr_send(c, &req[N]), 0); /* queued */
    for (int i = 1; i < N; i++) {
        assert_int_equal(kr_recv(c, &resp), 0);
        assert_int_not_equal(resp->id, req[N].id);
        kr_response_free(resp);
    }
    usleep(50 * 1000);
    assert_int_equal(fake_count(&f), N); /* the queued request is still here */

    /* Nothing left to return: kr_recv writes it, then waits for its answer. */
    assert_int_equal(kr_recv(c, &resp), 0);
    assert_int_equal(resp->id, req[N].id);
    assert_string_equal(resp->key->name, name[N]);
    kr_response_free(resp);
    assert_int_equal(fake_count(&f), N + 1);
    kr_client_free(c);
    fake_stop(&f);
}

/* Answers that arrive together, several in one TLS record and one larger
 * than a record (so split across records), come back whole and in order. */
static void test_recv_coalesced_answers(void **state)
{
    enum { N = 4, LONG = 20000 };
    struct fake f;
    char ep[64], *name[N];
    Keyraft__Request req[N];
    Keyraft__CreateKeyRequest create[N];

    (void)state;
    fake_start(&f, FAKE_ANSWER, P.srv_cert, 9);
    f.hold = N;
    f.coalesce = 1;
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 5000);
    for (int i = 0; i < N; i++) {
        size_t len = i == 2 ? LONG : 8;
        name[i] = malloc(len + 1);
        assert_non_null(name[i]);
        memset(name[i], 'a' + i, len);
        name[i][len] = '\0';
        create_request(&req[i], &create[i], name[i]);
        assert_int_equal(kr_send(c, &req[i]), 0);
    }
    for (int i = N - 1; i >= 0; i--) { /* the fake answers newest first */
        Keyraft__Response *resp = NULL;
        assert_int_equal(kr_recv(c, &resp), 0);
        assert_int_equal(resp->id, req[i].id);
        assert_string_equal(resp->key->name, name[i]);
        kr_response_free(resp);
    }
    for (int i = 0; i < N; i++)
        free(name[i]);
    kr_client_free(c);
    fake_stop(&f);
}

/* The pipelined calls fail cleanly: nothing to receive without a connection,
 * a receive with nothing in flight times out, a dead endpoint is KR_ECONN,
 * a request with no operation never leaves. */
static void test_pipelined_failures(void **state)
{
    struct fake f;
    char ep[64];
    Keyraft__Response *resp = NULL;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest rr = KEYRAFT__RANDOM_REQUEST__INIT;
    int port;

    (void)state;
    fake_start(&f, FAKE_ANSWER, P.srv_cert, 0);
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f.port);
    kr_client *c = new_client(ep, 300);
    assert_int_equal(kr_recv(c, &resp), KR_ECONN);
    assert_non_null(strstr(kr_client_last_error(c), "in flight"));
    assert_int_equal(kr_send(c, &req), KR_EINVAL);
    assert_int_equal(fake_count(&f), 0);
    rr.length = 4;
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &rr;
    assert_int_equal(kr_send(c, &req), 0);
    assert_int_equal(kr_recv(c, &resp), 0);
    assert_int_equal(resp->id, req.id);
    kr_response_free(resp);
    resp = NULL;
    int64_t t0 = now_ms();
    assert_int_equal(kr_recv(c, &resp), KR_ETIMEDOUT);
    assert_true(now_ms() - t0 >= 250);
    assert_null(resp);
    assert_int_equal(kr_recv(c, &resp), KR_ECONN); /* the timeout closed the connection */
    kr_client_free(c);
    fake_stop(&f);

    int fd = listen_any(&port);
    close(fd); /* nobody listens there now */
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", port);
    c = new_client(ep, 1000);
    assert_int_equal(kr_send(c, &req), KR_ECONN);
    kr_client_free(c);
}

/* One thread drives two connections from one poll loop: kr_try_recv never
 * waits (nothing has arrived: NULL, after writing what kr_send queued), each
 * client takes exactly its own answers once its socket polls readable, and a
 * transport failure closes the connection (fd -1). */
static void test_try_recv_from_one_poll_loop(void **state)
{
    enum { N = 3, CLIENTS = 2 };
    struct fake f[CLIENTS];
    kr_client *c[CLIENTS];
    char ep[64], name[CLIENTS][N][16];
    Keyraft__Request req[CLIENTS][N];
    Keyraft__CreateKeyRequest create[CLIENTS][N];
    Keyraft__Response *resp = NULL;

    (void)state;
    for (int k = 0; k < CLIENTS; k++) {
        fake_start(&f[k], FAKE_ANSWER, P.srv_cert, 5);
        f[k].hold = N; /* answers once all N are in, newest first */
        snprintf(ep, sizeof(ep), "127.0.0.1:%d", f[k].port);
        c[k] = new_client(ep, 5000);
        assert_int_equal(kr_client_fd(c[k]), -1);
        assert_int_equal(kr_try_recv(c[k], &resp), KR_ECONN);
        assert_null(resp);
        for (int i = 0; i < N; i++)
            snprintf(name[k][i], sizeof(name[k][i]), "p%d-%d", k, i);
    }
    assert_int_equal(kr_client_fd(NULL), -1);
    assert_int_equal(kr_try_recv(NULL, &resp), KR_EINVAL);

    /* N-1 requests each: held, so nothing comes back, and nothing waits. */
    struct pollfd pfd[CLIENTS];
    for (int k = 0; k < CLIENTS; k++) {
        for (int i = 0; i < N - 1; i++) {
            create_request(&req[k][i], &create[k][i], name[k][i]);
            assert_int_equal(kr_send(c[k], &req[k][i]), 0);
        }
        int64_t t0 = now_ms();
        assert_int_equal(kr_try_recv(c[k], &resp), 0);
        assert_null(resp);
        assert_true(now_ms() - t0 < 1000); /* the client's timeout is 5 s */
        pfd[k].fd = kr_client_fd(c[k]);
        pfd[k].events = POLLIN;
        assert_true(pfd[k].fd >= 0);
    }
    for (int k = 0; k < CLIENTS; k++) { /* kr_try_recv wrote the queued requests */
        for (int i = 0; i < 500 && fake_count(&f[k]) < N - 1; i++)
            usleep(10 * 1000);
        assert_int_equal(fake_count(&f[k]), N - 1);
    }
    /* The socket may turn readable without an answer (TLS session tickets):
     * kr_try_recv then takes what came and still returns none. */
    for (int64_t until = now_ms() + 200; now_ms() < until;) {
        if (poll(pfd, CLIENTS, 50) <= 0)
            continue;
        for (int k = 0; k < CLIENTS; k++) {
            if (pfd[k].revents == 0)
                continue;
            assert_int_equal(kr_try_recv(c[k], &resp), 0);
            assert_null(resp);
        }
    }

    /* The last request each: every answer arrives, read from the loop. */
    for (int k = 0; k < CLIENTS; k++) {
        create_request(&req[k][N - 1], &create[k][N - 1], name[k][N - 1]);
        assert_int_equal(kr_send(c[k], &req[k][N - 1]), 0);
        assert_int_equal(kr_flush(c[k]), 0);
    }
    int got[CLIENTS] = {0};
    int64_t deadline = now_ms() + 5000;
    while ((got[0] < N || got[1] < N) && now_ms() < deadline) {
        if (poll(pfd, CLIENTS, 100) <= 0)
            continue;
        for (int k = 0; k < CLIENTS; k++) {
            if (pfd[k].revents == 0)
                continue;
            while (kr_try_recv(c[k], &resp) == 0 && resp != NULL) {
                assert_true(got[k] < N);
                int i = N - 1 - got[k]++; /* newest first */
                assert_int_equal(resp->id, req[k][i].id);
                assert_string_equal(resp->key->name, name[k][i]);
                kr_response_free(resp);
                resp = NULL;
            }
        }
    }
    assert_int_equal(got[0], N);
    assert_int_equal(got[1], N);
    assert_int_equal(kr_client_last_index(c[0]), 5);
    for (int k = 0; k < CLIENTS; k++) {
        assert_int_equal(kr_try_recv(c[k], &resp), 0); /* all taken */
        assert_null(resp);
        kr_client_free(c[k]);
        fake_stop(&f[k]);
    }

    /* A frame over the limit: the code, and the connection is closed. */
    fake_start(&f[0], FAKE_HUGE_FRAME, P.srv_cert, 0);
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", f[0].port);
    c[0] = new_client(ep, 5000);
    Keyraft__Request rq = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest rr = KEYRAFT__RANDOM_REQUEST__INIT;
    rr.length = 4;
    rq.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    rq.random = &rr;
    assert_int_equal(kr_send(c[0], &rq), 0);
    assert_int_equal(kr_flush(c[0]), 0);
    pfd[0].fd = kr_client_fd(c[0]);
    int rc = 0;
    for (int64_t until = now_ms() + 5000; rc == 0 && now_ms() < until;) {
        if (poll(pfd, 1, 100) == 1) {
            rc = kr_try_recv(c[0], &resp);
            assert_null(resp);
        }
    }
    assert_int_equal(rc, KR_ETOOBIG);
    assert_int_equal(kr_client_fd(c[0]), -1);
    kr_client_free(c[0]);
    fake_stop(&f[0]);
}

/* A batch with writes follows the leader like a write; each write in it
 * gets its own request id, the same on the resend, and reads none. */
static void test_batch_ids_and_routing(void **state)
{
    struct fake follower, leader;
    char eps[128];
    Keyraft__Request r[3], *reqs[3];
    Keyraft__CreateKeyRequest c0 = KEYRAFT__CREATE_KEY_REQUEST__INIT;
    Keyraft__CreateKeyRequest c2 = KEYRAFT__CREATE_KEY_REQUEST__INIT;
    Keyraft__GetKeyRequest g1 = KEYRAFT__GET_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;

    (void)state;
    for (int i = 0; i < 3; i++) {
        keyraft__request__init(&r[i]);
        reqs[i] = &r[i];
    }
    c0.name = (char *)"a";
    c2.name = (char *)"b";
    ref.name = (char *)"a";
    g1.key = &ref;
    r[0].op_case = KEYRAFT__REQUEST__OP_CREATE;
    r[0].create = &c0;
    r[1].op_case = KEYRAFT__REQUEST__OP_GET;
    r[1].get = &g1;
    r[2].op_case = KEYRAFT__REQUEST__OP_CREATE;
    r[2].create = &c2;
    r[2].request_id = (char *)"mine";

    Keyraft__BatchRequest br = KEYRAFT__BATCH_REQUEST__INIT;
    Keyraft__Request outer = KEYRAFT__REQUEST__INIT;
    br.requests = reqs;
    br.n_requests = 2;
    outer.op_case = KEYRAFT__REQUEST__OP_BATCH;
    outer.batch = &br;
    br.requests = &reqs[1]; /* the get alone */
    br.n_requests = 1;
    assert_int_equal(kr_request_is_write(&outer), 0);
    br.requests = reqs;
    br.n_requests = 3;
    assert_int_equal(kr_request_is_write(&outer), 1);
    assert_int_equal(kr_request_is_write(&r[1]), 0);

    fake_start(&follower, FAKE_NOTLEADER, P.srv_cert, 0);
    fake_start(&leader, FAKE_ANSWER, P.srv_cert, 9);
    snprintf(follower.hint, sizeof(follower.hint), "127.0.0.1:%d", leader.port);
    snprintf(eps, sizeof(eps), "127.0.0.1:%d", follower.port);
    kr_client *c = new_client(eps, 5000);

    assert_int_equal(kr_batch(c, reqs, 0, &resp), KR_EINVAL);
    assert_int_equal(kr_batch(c, reqs, KR_BATCH_MAX + 1, &resp), KR_EINVAL);
    assert_int_equal(fake_count(&follower), 0);

    assert_int_equal(kr_batch(c, reqs, 3, &resp), 0);
    assert_int_equal(resp->batch->n_responses, 3);
    assert_string_equal(resp->batch->responses[2]->key->name, "batched");
    kr_response_free(resp);
    assert_int_equal(fake_count(&follower), 1);
    assert_int_equal(fake_count(&leader), 1);
    assert_int_equal(strlen(follower.inner_id[0][0]), 44);
    assert_string_equal(follower.inner_id[0][0], leader.inner_id[0][0]);
    assert_string_equal(leader.inner_id[0][1], "");
    assert_string_equal(leader.inner_id[0][2], "mine");
    assert_string_equal(leader.request_id[0], ""); /* the batch itself needs none */
    /* The caller's requests are as they were; the batch's index is learnt. */
    assert_string_equal(r[0].request_id, "");
    assert_string_equal(r[2].request_id, "mine");
    assert_int_equal(kr_client_last_index(c), 9);

    /* A second batch: fresh ids, and it waits for the first one's writes. */
    assert_int_equal(kr_batch(c, reqs, 3, &resp), 0);
    kr_response_free(resp);
    assert_int_equal(fake_count(&leader), 2);
    assert_string_not_equal(leader.inner_id[1][0], leader.inner_id[0][0]);
    assert_int_equal(leader.min_index[1], 9);

    kr_client_free(c);
    fake_stop(&follower);
    fake_stop(&leader);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_alg_state_reason_names),
        cmocka_unit_test(test_config_file),
        cmocka_unit_test(test_client_new_rejects_bad_config),
        cmocka_unit_test(test_closed_port_is_econn_fast),
        cmocka_unit_test(test_silent_listener_times_out),
        cmocka_unit_test(test_oversized_frame_is_etoobig),
        cmocka_unit_test(test_wrong_server_name_is_etls),
        cmocka_unit_test(test_failover_keeps_request_id),
        cmocka_unit_test(test_leader_hint_is_followed),
        cmocka_unit_test(test_pipelined_send_recv),
        cmocka_unit_test(test_recv_writes_only_before_waiting),
        cmocka_unit_test(test_recv_coalesced_answers),
        cmocka_unit_test(test_pipelined_failures),
        cmocka_unit_test(test_try_recv_from_one_poll_loop),
        cmocka_unit_test(test_batch_ids_and_routing),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
