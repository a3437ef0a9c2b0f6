/* test_tls.c: mutual TLS 1.3 between two in-memory connections. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "keyraft.h"
#include "tls.h"

/* test_tls links kr_tls alone, so the certificates come from pki.c compiled
 * into this test. */
#include "pki.h"

struct paths {
    char dir[64];
    char ca[128], ca_key[128];
    char node[128], node_key[128];
    char alice[128], alice_key[128];
    char ca2[128], ca2_key[128];
    char node2[128], node2_key[128];
    char mallory[128], mallory_key[128];
};

static struct paths P;

static void join(char *out, const char *name)
{
    int n = snprintf(out, 128, "%s/%s", P.dir, name);
    assert_true(n > 0 && n < 128);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(P.dir, sizeof(P.dir), "/tmp/kr-test-tls-XXXXXX");
    assert_non_null(mkdtemp(P.dir));
    join(P.ca, "ca.crt");
    join(P.ca_key, "ca.key");
    join(P.node, "node.crt");
    join(P.node_key, "node.key");
    join(P.alice, "alice.crt");
    join(P.alice_key, "alice.key");
    join(P.ca2, "ca2.crt");
    join(P.ca2_key, "ca2.key");
    join(P.node2, "node2.crt");
    join(P.node2_key, "node2.key");
    join(P.mallory, "mallory.crt");
    join(P.mallory_key, "mallory.key");
    assert_int_equal(pki_make_ca("test CA", 1, P.ca, P.ca_key), 0);
    assert_int_equal(pki_issue_node(P.ca, P.ca_key, "node-1", NULL, 1, P.node, P.node_key), 0);
    assert_int_equal(
        pki_issue_client(P.ca, P.ca_key, "alice", "admin,auditor", 1, P.alice, P.alice_key), 0);
    assert_int_equal(pki_make_ca("other CA", 1, P.ca2, P.ca2_key), 0);
    assert_int_equal(pki_issue_node(P.ca2, P.ca2_key, "node-x", NULL, 1, P.node2, P.node2_key),
                     0);
    assert_int_equal(
        pki_issue_client(P.ca2, P.ca2_key, "alice", "admin", 1, P.mallory, P.mallory_key), 0);
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_teardown(void **state)
{
    (void)state;
    nftw(P.dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* Moves all pending output of |from| into |to|; keeps |to|'s first error. */
static int move(struct tls_conn *from, struct tls_conn *to, int *rc)
{
    uint8_t buf[4096];
    size_t n;
    int moved = 0;
    while ((n = tls_conn_take_output(from, buf, sizeof(buf))) > 0) {
        moved = 1;
        int r = tls_conn_feed(to, buf, n);
        if (*rc == 0)
            *rc = r;
    }
    return moved;
}

/* Exchanges bytes until neither side has anything to send. */
static void pump(struct tls_conn *client, struct tls_conn *server, int *client_rc,
                 int *server_rc)
{
    *client_rc = 0;
    *server_rc = 0;
    for (int i = 0; i < 64; i++) {
        int moved = move(client, server, server_rc);
        moved |= move(server, client, client_rc);
        if (!moved)
            return;
    }
    fail_msg("handshake did not settle");
}

struct pair {
    struct tls_ctx *sctx, *cctx;
    struct tls_conn *server, *client;
    int server_rc, client_rc;
};

static void pair_open(struct pair *p, const char *server_ca, const char *server_cert,
                      const char *server_key, const char *client_ca, const char *client_cert,
                      const char *client_key)
{
    memset(p, 0, sizeof(*p));
    assert_int_equal(tls_server_ctx_new(server_ca, server_cert, server_key, &p->sctx), 0);
    assert_int_equal(tls_client_ctx_new(client_ca, client_cert, client_key, &p->cctx), 0);
    assert_int_equal(tls_conn_new(p->sctx, 1, &p->server), 0);
    assert_int_equal(tls_conn_new(p->cctx, 0, &p->client), 0);
    assert_true(tls_conn_pending(p->client) > 0); /* the ClientHello */
    pump(p->client, p->server, &p->client_rc, &p->server_rc);
}

static void pair_close(struct pair *p)
{
    tls_conn_free(p->client);
    tls_conn_free(p->server);
    tls_ctx_free(p->cctx);
    tls_ctx_free(p->sctx);
}

static void test_handshake_names_the_peer(void **state)
{
    (void)state;
    struct pair p;
    pair_open(&p, P.ca, P.node, P.node_key, P.ca, P.alice, P.alice_key);
    assert_int_equal(p.server_rc, 0);
    assert_int_equal(p.client_rc, 0);
    assert_true(tls_conn_handshake_done(p.server));
    assert_true(tls_conn_handshake_done(p.client));
    assert_string_equal(tls_conn_peer_name(p.server), "alice");
    assert_string_equal(tls_conn_peer_roles(p.server), "admin,auditor");
    assert_string_equal(tls_conn_peer_name(p.client), "node-1");
    assert_string_equal(tls_conn_peer_roles(p.client), "");
    assert_string_equal(tls_conn_error(p.server), "");
    pair_close(&p);
}

static void test_no_identity_before_handshake(void **state)
{
    (void)state;
    struct tls_ctx *sctx = NULL;
    struct tls_conn *server = NULL;
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, P.node_key, &sctx), 0);
    assert_int_equal(tls_conn_new(sctx, 1, &server), 0);
    assert_false(tls_conn_handshake_done(server));
    assert_null(tls_conn_peer_name(server));
    assert_int_equal(tls_conn_pending(server), 0);
    uint8_t buf[16];
    assert_int_equal(tls_conn_read(server, buf, sizeof(buf)), 0);
    assert_int_equal(tls_conn_write(server, (const uint8_t *)"x", 1), KR_ETLS);
    tls_conn_free(server);
    tls_ctx_free(sctx);
    tls_conn_free(NULL);
    tls_ctx_free(NULL);
}

/* Reads exactly |len| bytes from |conn| in chunks of at most |chunk|. */
static void read_exactly(struct tls_conn *conn, uint8_t *out, size_t len, size_t chunk)
{
    size_t got = 0;
    while (got < len) {
        size_t want = len - got < chunk ? len - got : chunk;
        int n = tls_conn_read(conn, out + got, want);
        assert_true(n > 0);
        got += (size_t)n;
    }
}

static void test_app_data_both_ways(void **state)
{
    (void)state;
    struct pair p;
    pair_open(&p, P.ca, P.node, P.node_key, P.ca, P.alice, P.alice_key);
    assert_true(tls_conn_handshake_done(p.client));
    uint8_t buf[64];

    assert_int_equal(tls_conn_write(p.client, (const uint8_t *)"ping", 4), 0);
    pump(p.client, p.server, &p.client_rc, &p.server_rc);
    assert_int_equal(tls_conn_read(p.server, buf, sizeof(buf)), 4);
    assert_memory_equal(buf, "ping", 4);
    assert_int_equal(tls_conn_read(p.server, buf, sizeof(buf)), 0);

    assert_int_equal(tls_conn_write(p.server, (const uint8_t *)"pong!", 5), 0);
    pump(p.client, p.server, &p.client_rc, &p.server_rc);
    assert_int_equal(tls_conn_read(p.client, buf, sizeof(buf)), 5);
    assert_memory_equal(buf, "pong!", 5);

    /* 1 MB in one write, carried in small pieces, read back in chunks */
    size_t big = 1024 * 1024;
    uint8_t *data = malloc(big);
    uint8_t *back = malloc(big);
    assert_non_null(data);
    assert_non_null(back);
    assert_int_equal(RAND_bytes(data, (int)big), 1);
    assert_int_equal(tls_conn_write(p.client, data, big), 0);
    assert_true(tls_conn_pending(p.client) > big);
    uint8_t piece[1000];
    size_t n;
    while ((n = tls_conn_take_output(p.client, piece, sizeof(piece))) > 0)
        assert_int_equal(tls_conn_feed(p.server, piece, n), 0);
    read_exactly(p.server, back, big, 16384);
    assert_memory_equal(back, data, big);
    assert_int_equal(tls_conn_read(p.server, buf, sizeof(buf)), 0);

    /* and back the other way */
    assert_int_equal(tls_conn_write(p.server, data, big), 0);
    pump(p.client, p.server, &p.client_rc, &p.server_rc);
    memset(back, 0, big);
    read_exactly(p.client, back, big, 7000);
    assert_memory_equal(back, data, big);
    free(back);
    free(data);
    pair_close(&p);
}

static void test_client_without_certificate_is_refused(void **state)
{
    (void)state;
    struct pair p;
    pair_open(&p, P.ca, P.node, P.node_key, P.ca, NULL, NULL);
    assert_int_equal(p.server_rc, KR_ETLS);
    assert_false(tls_conn_handshake_done(p.server));
    assert_null(tls_conn_peer_name(p.server));
    assert_non_null(strstr(tls_conn_error(p.server), "certificate"));
    /* the client learns it from the server's alert */
    uint8_t buf[16];
    assert_int_equal(tls_conn_read(p.client, buf, sizeof(buf)), KR_ETLS);
    assert_non_null(strstr(tls_conn_error(p.client), "certificate"));
    /* a failed connection stays failed */
    assert_int_equal(tls_conn_feed(p.server, (const uint8_t *)"x", 1), KR_ETLS);
    assert_int_equal(tls_conn_read(p.server, buf, sizeof(buf)), KR_ETLS);
    pair_close(&p);
}

static void test_client_from_another_ca_is_refused(void **state)
{
    (void)state;
    struct pair p;
    pair_open(&p, P.ca, P.node, P.node_key, P.ca, P.mallory, P.mallory_key);
    assert_int_equal(p.server_rc, KR_ETLS);
    assert_false(tls_conn_handshake_done(p.server));
    assert_null(tls_conn_peer_name(p.server));
    assert_non_null(strstr(tls_conn_error(p.server), "certificate"));
    pair_close(&p);
}

static void test_server_from_another_ca_is_refused(void **state)
{
    (void)state;
    struct pair p;
    pair_open(&p, P.ca2, P.node2, P.node2_key, P.ca, P.alice, P.alice_key);
    assert_int_equal(p.client_rc, KR_ETLS);
    assert_false(tls_conn_handshake_done(p.client));
    assert_null(tls_conn_peer_name(p.client));
    assert_non_null(strstr(tls_conn_error(p.client), "certificate"));
    assert_false(tls_conn_handshake_done(p.server));
    pair_close(&p);
}

static void test_client_certificate_cannot_serve(void **state)
{
    (void)state;
    struct pair p;
    /* alice's certificate is clientAuth only */
    pair_open(&p, P.ca, P.alice, P.alice_key, P.ca, P.alice, P.alice_key);
    assert_int_equal(p.client_rc, KR_ETLS);
    assert_false(tls_conn_handshake_done(p.client));
    assert_non_null(strstr(tls_conn_error(p.client), "certificate"));
    pair_close(&p);
}

static void test_garbage_is_refused(void **state)
{
    (void)state;
    struct tls_ctx *sctx = NULL;
    struct tls_ctx *cctx = NULL;
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, P.node_key, &sctx), 0);
    assert_int_equal(tls_client_ctx_new(P.ca, P.alice, P.alice_key, &cctx), 0);

    static const char http[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    struct tls_conn *conn = NULL;
    assert_int_equal(tls_conn_new(sctx, 1, &conn), 0);
    assert_int_equal(tls_conn_feed(conn, (const uint8_t *)http, sizeof(http) - 1), KR_ETLS);
    assert_string_not_equal(tls_conn_error(conn), "");
    assert_false(tls_conn_handshake_done(conn));
    tls_conn_free(conn);

    uint8_t noise[4096];
    for (int round = 0; round < 32; round++) {
        for (int side = 0; side < 2; side++) {
            conn = NULL;
            assert_int_equal(tls_conn_new(side ? sctx : cctx, side, &conn), 0);
            /* A random record header may announce up to 64 KB before the
             * length check can refuse it: keep feeding until refused. */
            int rv = 0;
            for (int k = 0; k < 32 && rv == 0; k++) {
                assert_int_equal(RAND_bytes(noise, sizeof(noise)), 1);
                rv = tls_conn_feed(conn, noise, sizeof(noise));
            }
            assert_int_equal(rv, KR_ETLS);
            assert_false(tls_conn_handshake_done(conn));
            tls_conn_free(conn);
        }
    }
    tls_ctx_free(cctx);
    tls_ctx_free(sctx);
}

/* A client built on OpenSSL directly, for what tls.c refuses to produce. */
struct raw {
    SSL_CTX *ctx;
    SSL *ssl;
    BIO *rbio, *wbio;
};

static void raw_open(struct raw *r, int max_version)
{
    r->ctx = SSL_CTX_new(TLS_client_method());
    assert_non_null(r->ctx);
    assert_int_equal(SSL_CTX_set_min_proto_version(r->ctx, TLS1_2_VERSION), 1);
    assert_int_equal(SSL_CTX_set_max_proto_version(r->ctx, max_version), 1);
    assert_int_equal(SSL_CTX_use_certificate_chain_file(r->ctx, P.alice), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey_file(r->ctx, P.alice_key, SSL_FILETYPE_PEM), 1);
    r->ssl = SSL_new(r->ctx);
    r->rbio = BIO_new(BIO_s_mem());
    r->wbio = BIO_new(BIO_s_mem());
    assert_non_null(r->ssl);
    assert_non_null(r->rbio);
    assert_non_null(r->wbio);
    BIO_set_mem_eof_return(r->rbio, -1);
    SSL_set_bio(r->ssl, r->rbio, r->wbio);
    SSL_set_connect_state(r->ssl);
}

static void raw_close(struct raw *r)
{
    SSL_free(r->ssl);
    SSL_CTX_free(r->ctx);
    ERR_clear_error();
}

/* Runs the raw client's handshake against |server|; returns the server's
 * first feed error and the raw side's SSL_do_handshake result. */
static int raw_pump(struct raw *r, struct tls_conn *server, int *raw_result)
{
    int server_rc = 0;
    uint8_t buf[4096];
    for (int i = 0; i < 64; i++) {
        *raw_result = SSL_do_handshake(r->ssl);
        int moved = 0;
        int n;
        while ((n = BIO_read(r->wbio, buf, sizeof(buf))) > 0) {
            moved = 1;
            int rv = tls_conn_feed(server, buf, (size_t)n);
            if (server_rc == 0)
                server_rc = rv;
        }
        size_t m;
        while ((m = tls_conn_take_output(server, buf, sizeof(buf))) > 0) {
            moved = 1;
            assert_int_equal(BIO_write(r->rbio, buf, (int)m), (int)m);
        }
        if (!moved)
            break;
    }
    return server_rc;
}

static void test_tls12_client_is_refused(void **state)
{
    (void)state;
    struct tls_ctx *sctx = NULL;
    struct tls_conn *server = NULL;
    struct raw r;
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, P.node_key, &sctx), 0);
    assert_int_equal(tls_conn_new(sctx, 1, &server), 0);
    raw_open(&r, TLS1_2_VERSION);
    int raw_result = 0;
    assert_int_equal(raw_pump(&r, server, &raw_result), KR_ETLS);
    assert_int_not_equal(raw_result, 1);
    assert_false(tls_conn_handshake_done(server));
    assert_non_null(strstr(tls_conn_error(server), "protocol"));
    raw_close(&r);
    tls_conn_free(server);
    tls_ctx_free(sctx);
}

static void test_peer_close_is_reported(void **state)
{
    (void)state;
    struct tls_ctx *sctx = NULL;
    struct tls_conn *server = NULL;
    struct raw r;
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, P.node_key, &sctx), 0);
    assert_int_equal(tls_conn_new(sctx, 1, &server), 0);
    raw_open(&r, TLS1_3_VERSION);
    int raw_result = 0;
    assert_int_equal(raw_pump(&r, server, &raw_result), 0);
    assert_int_equal(raw_result, 1);
    assert_true(tls_conn_handshake_done(server));
    assert_string_equal(tls_conn_peer_name(server), "alice");
    size_t written = 0;
    assert_int_equal(SSL_write_ex(r.ssl, "bye", 3, &written), 1);
    assert_int_equal(SSL_shutdown(r.ssl), 0);
    uint8_t buf[4096];
    int n;
    while ((n = BIO_read(r.wbio, buf, sizeof(buf))) > 0)
        assert_int_equal(tls_conn_feed(server, buf, (size_t)n), 0);
    assert_int_equal(tls_conn_read(server, buf, sizeof(buf)), 3);
    assert_memory_equal(buf, "bye", 3);
    assert_int_equal(tls_conn_read(server, buf, sizeof(buf)), KR_ECONN);
    raw_close(&r);
    tls_conn_free(server);
    tls_ctx_free(sctx);
}

static void test_context_errors(void **state)
{
    (void)state;
    struct tls_ctx *ctx = NULL;
    char missing[128];
    join(missing, "missing.pem");
    assert_int_equal(tls_server_ctx_new(missing, P.node, P.node_key, &ctx), KR_EIO);
    assert_int_equal(tls_server_ctx_new(P.ca, missing, P.node_key, &ctx), KR_EIO);
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, missing, &ctx), KR_EIO);
    assert_int_equal(tls_client_ctx_new(missing, NULL, NULL, &ctx), KR_EIO);
    /* a key that is not the certificate's */
    assert_int_equal(tls_server_ctx_new(P.ca, P.node, P.alice_key, &ctx), KR_ETLS);
    /* a key file where the certificate belongs, and the reverse */
    assert_int_equal(tls_server_ctx_new(P.ca, P.node_key, P.node_key, &ctx), KR_ETLS);
    assert_int_equal(tls_client_ctx_new(P.ca, P.alice, P.alice, &ctx), KR_ETLS);
    assert_int_equal(tls_client_ctx_new(P.alice_key, NULL, NULL, &ctx), KR_ETLS);
    assert_null(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshake_names_the_peer),
        cmocka_unit_test(test_no_identity_before_handshake),
        cmocka_unit_test(test_app_data_both_ways),
        cmocka_unit_test(test_client_without_certificate_is_refused),
        cmocka_unit_test(test_client_from_another_ca_is_refused),
        cmocka_unit_test(test_server_from_another_ca_is_refused),
        cmocka_unit_test(test_client_certificate_cannot_serve),
        cmocka_unit_test(test_garbage_is_refused),
        cmocka_unit_test(test_tls12_client_is_refused),
        cmocka_unit_test(test_peer_close_is_reported),
        cmocka_unit_test(test_context_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
