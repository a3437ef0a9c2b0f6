/* test_badinput.c: a real keyraftd fed hostile and broken input on its client
 * port (raw TCP and raw TLS frames built here): it must answer what it can,
 * drop what it must, keep serving everyone else, and never die. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "harness.h"

#define IO_TIMEOUT_S 5

struct fixture {
    struct kr_node node;
    char cert[KR_PATH_MAX + 32], key[KR_PATH_MAX + 32]; /* the admin identity */
};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int group_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    if (f == NULL)
        return -1;
    if (kr_node_init(&f->node) != 0 || kr_node_start(&f->node) != 0) {
        kr_node_destroy(&f->node);
        free(f);
        return -1;
    }
    snprintf(f->cert, sizeof(f->cert), "%s/tls/app.pem", f->node.dir);
    snprintf(f->key, sizeof(f->key), "%s/tls/app.key", f->node.dir);
    *state = f;
    return 0;
}

static int group_teardown(void **state)
{
    struct fixture *f = *state;
    int rc = 0;

    if (f == NULL)
        return 0;
    if (kr_node_alive(&f->node)) {
        rc = kr_node_stop(&f->node);
        if (rc != 0) {
            fprintf(stderr, "keyraftd did not stop cleanly on SIGTERM: exit %d\n", rc);
            kr_node_dump_log(&f->node, 3000);
        }
    }
    kr_node_destroy(&f->node);
    free(f);
    return rc != 0 ? -1 : 0;
}

/* ---- raw connections (harness.h) --------------------------------------------------- */

static void status_request(Keyraft__Request *req, Keyraft__StatusRequest *st, uint64_t id)
{
    keyraft__request__init(req);
    keyraft__status_request__init(st);
    req->id = id;
    req->op_case = KEYRAFT__REQUEST__OP_STATUS;
    req->status = st;
}

/* A status round trip on |t|: 1 when a good answer with id |id| arrived. */
static int status_ok_on(struct kr_tls *t, uint64_t id)
{
    Keyraft__Request req;
    Keyraft__StatusRequest st;
    Keyraft__Response *resp;
    int ok;

    status_request(&req, &st, id);
    if (kr_tls_send_request(t, &req) != 0)
        return 0;
    resp = kr_tls_read_response(t, NULL);
    ok = resp != NULL && resp->id == id && resp->status == 0 &&
         resp->result_case == KEYRAFT__RESPONSE__RESULT_NODE_STATUS &&
         strcmp(resp->node_status->role, "leader") == 0;
    if (resp != NULL && !ok)
        print_error("status answer: id %llu status %d (%s)\n", (unsigned long long)resp->id,
                    resp->status, resp->message);
    keyraft__response__free_unpacked(resp, NULL);
    return ok;
}

/* Everyone else is still served: a fresh, well-behaved TLS client. */
static void assert_serves_others(struct fixture *f)
{
    struct kr_tls t;

    if (!kr_node_alive(&f->node)) {
        kr_node_dump_log(&f->node, 3000);
        print_error("keyraftd is dead\n");
        fail();
    }
    assert_int_equal(kr_node_alive(&f->node), 1);
    assert_int_equal(kill(f->node.pid, 0), 0);
    if (kr_tls_open_app(&f->node, &t) != 0 || !status_ok_on(&t, 4242)) {
        kr_tls_close(&t);
        print_error("a well-behaved client is not served\n");
        fail();
    }
    kr_tls_close(&t);
}

/* Waits up to |max_ms| for a well-behaved client to be served; returns the
 * time it took in ms, or -1. */
static long wait_served(struct fixture *f, long max_ms)
{
    uint64_t t0 = now_ms();

    while ((long)(now_ms() - t0) < max_ms) {
        struct kr_tls t;
        int ok = kr_tls_open_app(&f->node, &t) == 0 && status_ok_on(&t, 4343);
        kr_tls_close(&t);
        if (ok)
            return (long)(now_ms() - t0);
        if (!kr_node_alive(&f->node))
            return -1;
    }
    return -1;
}

/* ---- the cases ------------------------------------------------------------------------ */

/* (a) a frame header past the limit: one KR_ETOOBIG answer, then close. */
static void test_oversized_frame(void **state)
{
    struct fixture *f = *state;
    static const uint32_t lengths[] = {0x7fffffffu, KR_MAX_FRAME + 1u, 0xffffffffu};

    for (size_t i = 0; i < sizeof(lengths) / sizeof(lengths[0]); i++) {
        struct kr_tls t;
        uint32_t n = lengths[i];
        uint8_t hdr[8] = {(uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n,
                          1, 2, 3, 4};
        size_t flen = 0;

        assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
        assert_int_equal(kr_tls_write(&t, hdr, sizeof(hdr)), 0);
        Keyraft__Response *resp = kr_tls_read_response(&t, &flen);
        if (resp == NULL) {
            print_error("length 0x%08x: no Response before the close\n", n);
            kr_tls_close(&t);
            fail();
        }
        assert_int_equal(resp->status, KR_ETOOBIG);
        assert_true(strlen(resp->message) > 0);
        keyraft__response__free_unpacked(resp, NULL);
        assert_true(kr_tls_peer_closed(&t));
        kr_tls_close(&t);
        assert_serves_others(f);
    }
}

/* (a') the limit is exact: a frame of KR_MAX_FRAME bytes is read, and every
 * answer stays within the limit the client enforces. */
static void test_frame_at_limit(void **state)
{
    struct fixture *f = *state;
    struct kr_tls t;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__EncryptRequest er = KEYRAFT__ENCRYPT_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    struct kr_out o;
    size_t flen = 0;

    kr_cli(&f->node, NULL, 0, &o, "create", "--name", "bi-limit", "--alg", "aes-256", NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
    ref.name = "bi-limit";
    er.key = &ref;
    req.id = 9;
    req.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    req.encrypt = &er;
    er.plaintext.len = KR_MAX_FRAME - 64;
    er.plaintext.data = calloc(1, KR_MAX_FRAME);
    assert_non_null(er.plaintext.data);
    size_t packed = keyraft__request__get_packed_size(&req);
    er.plaintext.len += KR_MAX_FRAME - packed;
    assert_int_equal(keyraft__request__get_packed_size(&req), KR_MAX_FRAME);

    /* the library with the same input: a clear error, and the client (same
     * connection, whatever is left of a refused answer on it) still works */
    kr_client *c = NULL;
    kr_buf ct = {0}, rnd = {0};
    assert_int_equal(kr_node_client(&f->node, 10000, &c), 0);
    int rc = kr_encrypt(c, "name:bi-limit", er.plaintext.data, er.plaintext.len - 64, NULL, 0,
                        &ct);
    if (rc != 0 && rc != KR_ETOOBIG) {
        print_error("kr_encrypt near the limit: %s (%s), want 0 or KR_ETOOBIG\n",
                    kr_status_name(rc), kr_client_last_error(c));
        fail();
    }
    if (rc == 0)
        assert_true(ct.len <= KR_MAX_FRAME);
    kr_buf_free(&ct);
    rc = kr_random(c, 16, &rnd);
    if (rc != 0) {
        print_error("the client is unusable after an oversized answer: %s (%s)\n",
                    kr_status_name(rc), kr_client_last_error(c));
        fail();
    }
    assert_int_equal(rnd.len, 16);
    kr_buf_free(&rnd);
    kr_client_free(c);

    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    assert_int_equal(kr_tls_send_request(&t, &req), 0);
    Keyraft__Response *resp = kr_tls_read_response(&t, &flen);
    free(er.plaintext.data);
    if (flen > KR_MAX_FRAME) {
        print_error("the node answered a %zu-byte frame: over the %u-byte limit every client "
                    "enforces (status %d); a client cannot read it\n",
                    flen, KR_MAX_FRAME, resp != NULL ? resp->status : 0);
        keyraft__response__free_unpacked(resp, NULL);
        kr_tls_close(&t);
        fail();
    }
    assert_non_null(resp);
    /* a ciphertext of that plaintext cannot fit: an error status is the answer */
    assert_int_not_equal(resp->status, 0);
    keyraft__response__free_unpacked(resp, NULL);
    assert_true(status_ok_on(&t, 10));
    kr_tls_close(&t);
    assert_serves_others(f);
}

/* (b) a truncated frame: the node waits for the rest without blocking anyone,
 * and forgets the connection when it goes. */
static void test_truncated_frame(void **state)
{
    struct fixture *f = *state;
    struct kr_tls t;
    uint8_t frame[14] = {0, 0, 0, 100, 0x08, 0x01, 0x12, 0x03, 'a', 'b', 'c', 0, 0, 0};

    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    assert_int_equal(kr_tls_write(&t, frame, sizeof(frame)), 0);
    /* while it is half-sent, others are served */
    assert_serves_others(f);
    kr_tls_close(&t);
    assert_serves_others(f);

    /* the same, closing the TCP socket without a TLS close_notify */
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    assert_int_equal(kr_tls_write(&t, frame, 6), 0);
    close(t.fd);
    t.fd = -1;
    SSL_free(t.ssl);
    t.ssl = NULL;
    kr_tls_close(&t);
    assert_serves_others(f);

    /* a frame split across many tiny writes is reassembled */
    Keyraft__Request req;
    Keyraft__StatusRequest st;
    status_request(&req, &st, 77);
    size_t n = keyraft__request__get_packed_size(&req);
    uint8_t buf[64];
    assert_true(n + 4 <= sizeof(buf));
    buf[0] = 0;
    buf[1] = 0;
    buf[2] = (uint8_t)(n >> 8);
    buf[3] = (uint8_t)n;
    keyraft__request__pack(&req, buf + 4);
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    for (size_t i = 0; i < n + 4; i++)
        assert_int_equal(kr_tls_write(&t, buf + i, 1), 0);
    Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
    assert_non_null(resp);
    assert_int_equal(resp->id, 77);
    assert_int_equal(resp->status, 0);
    keyraft__response__free_unpacked(resp, NULL);
    kr_tls_close(&t);
}

/* (c) bytes that are not TLS: the connection is dropped, nobody else notices. */
static void test_plain_garbage(void **state)
{
    struct fixture *f = *state;
    static const char http[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    /* a TLS record header announcing a huge handshake record */
    static const uint8_t fake_record[] = {0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb};
    uint8_t junk[4096];
    const void *inputs[] = {http, fake_record, junk};
    size_t lens[] = {sizeof(http) - 1, sizeof(fake_record), sizeof(junk)};

    for (size_t i = 0; i < sizeof(junk); i++)
        junk[i] = (uint8_t)(i * 131 + 7);
    for (size_t i = 0; i < 3; i++) {
        int fd = kr_tcp_connect(f->node.port, IO_TIMEOUT_S);
        uint8_t b[256];
        ssize_t r;

        assert_true(send(fd, inputs[i], lens[i], MSG_NOSIGNAL) >= 0);
        if (i == 1) {
            /* the record is incomplete: the node may wait for it; others go on */
            assert_serves_others(f);
            close(fd);
            continue;
        }
        /* a TLS alert may come first; then EOF or a reset */
        do {
            r = recv(fd, b, sizeof(b), 0);
        } while (r > 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            print_error("input %zu: connection still open after %d s of garbage\n", i,
                        IO_TIMEOUT_S);
            close(fd);
            fail();
        }
        close(fd);
        assert_serves_others(f);
    }
}

/* (d) a frame that does not parse: KR_EPROTO, and the connection lives on. */
static void test_not_a_request(void **state)
{
    struct fixture *f = *state;
    struct kr_tls t;
    uint8_t ff[64];
    /* field 10 (create) as a length-delimited message claiming 200 bytes */
    static const uint8_t truncated_msg[] = {0x52, 0xc8, 0x01, 0x0a, 0x02, 'a', 'b'};
    /* a varint that never ends */
    static const uint8_t bad_varint[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                         0xff, 0xff, 0xff};
    const void *bodies[] = {ff, truncated_msg, bad_varint};
    size_t lens[] = {sizeof(ff), sizeof(truncated_msg), sizeof(bad_varint)};

    memset(ff, 0xff, sizeof(ff));
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(kr_tls_send_frame(&t, bodies[i], lens[i]), 0);
        Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
        if (resp == NULL) {
            print_error("body %zu: no Response (connection dropped?)\n", i);
            kr_tls_close(&t);
            fail();
        }
        assert_int_equal(resp->status, KR_EPROTO);
        keyraft__response__free_unpacked(resp, NULL);
        /* the SAME connection still answers */
        assert_true(status_ok_on(&t, 100 + i));
    }

    /* a Request naming no operation (also the empty frame): KR_EINVAL with the id */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.id = 555;
    assert_int_equal(kr_tls_send_request(&t, &req), 0);
    Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
    assert_non_null(resp);
    assert_int_equal(resp->id, 555);
    assert_int_equal(resp->status, KR_EINVAL);
    keyraft__response__free_unpacked(resp, NULL);
    assert_int_equal(kr_tls_send_frame(&t, NULL, 0), 0);
    resp = kr_tls_read_response(&t, NULL);
    assert_non_null(resp);
    assert_true(resp->status == KR_EINVAL || resp->status == KR_EPROTO);
    keyraft__response__free_unpacked(resp, NULL);
    assert_true(status_ok_on(&t, 200));

    /* many requests pipelined in one write: every id answered once */
    enum { N = 64 };
    int seen[N] = {0};
    size_t total = 0;
    uint8_t *burst = malloc(N * 64);
    assert_non_null(burst);
    for (int i = 0; i < N; i++) {
        Keyraft__StatusRequest st;
        Keyraft__Request r;
        status_request(&r, &st, 1000 + (uint64_t)i);
        size_t n = keyraft__request__get_packed_size(&r);
        burst[total] = 0;
        burst[total + 1] = 0;
        burst[total + 2] = (uint8_t)(n >> 8);
        burst[total + 3] = (uint8_t)n;
        keyraft__request__pack(&r, burst + total + 4);
        total += n + 4;
    }
    assert_int_equal(kr_tls_write(&t, burst, total), 0);
    free(burst);
    for (int i = 0; i < N; i++) {
        resp = kr_tls_read_response(&t, NULL);
        assert_non_null(resp);
        assert_int_equal(resp->status, 0);
        assert_true(resp->id >= 1000 && resp->id < 1000 + N);
        seen[resp->id - 1000]++;
        keyraft__response__free_unpacked(resp, NULL);
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    kr_tls_close(&t);
    assert_serves_others(f);
}

/* (d') a frame of empty requests in a batch: 2 bytes each on the wire, ~100
 * bytes each once decoded (~200 MB for one 4 MB frame). The node refuses it
 * with KR_ETOOBIG before holding more than 16 times the frame plus 4 MB (its
 * peak memory grows by less than 100 MB; the batch's own bound on its count
 * would refuse it too, but only once decoded), and the connection goes on. */
static void test_request_that_expands(void **state)
{
    struct fixture *f = *state;
    struct kr_tls t;
    Keyraft__BatchRequest br = KEYRAFT__BATCH_REQUEST__INIT;
    Keyraft__Request outer = KEYRAFT__REQUEST__INIT;
    outer.op_case = KEYRAFT__REQUEST__OP_BATCH;
    outer.batch = &br;
    uint8_t head[8];
    size_t tag_len = keyraft__request__pack(&outer, head) - 1; /* the batch's tag */
    size_t n = (KR_MAX_FRAME - 16) / 2, off = tag_len;
    uint8_t *body = malloc(KR_MAX_FRAME);
    assert_non_null(body);
    memcpy(body, head, tag_len);
    for (size_t v = 2 * n; ; v >>= 7) { /* the batch's length, a varint */
        body[off++] = (uint8_t)((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80)
            break;
    }
    for (size_t i = 0; i < n; i++) {
        body[off++] = 0x0a; /* BatchRequest.requests, length 0 */
        body[off++] = 0x00;
    }
    long peak_before = kr_peak_rss_kib(f->node.pid);
    assert_true(peak_before > 0);
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    assert_int_equal(kr_tls_send_frame(&t, body, off), 0);
    free(body);
    Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
    if (resp == NULL) {
        print_error("no Response to a request that expands (connection dropped?)\n");
        kr_tls_close(&t);
        fail();
    }
    if (resp->status != KR_ETOOBIG) {
        print_error("a 4 MB frame of %zu empty requests: status %d (%s), want KR_ETOOBIG\n", n,
                    resp->status, resp->message ? resp->message : "");
        fail();
    }
    keyraft__response__free_unpacked(resp, NULL);
    long peak_after = kr_peak_rss_kib(f->node.pid);
    if (peak_after - peak_before > 100 * 1024) {
        print_error("the node's peak memory grew by %ld MB decoding it\n",
                    (peak_after - peak_before) / 1024);
        fail();
    }
    assert_true(status_ok_on(&t, 300));
    kr_tls_close(&t);
    assert_serves_others(f);
}

/* (e) TLS without a client certificate, and TLS 1.2: refused. */
static void test_no_client_cert(void **state)
{
    struct fixture *f = *state;
    struct kr_tls t;

    int hs = kr_tls_open(&f->node, NULL, NULL, 0, &t);
    /* TLS 1.3: the client may finish its side before the server refuses */
    if (hs == 0)
        assert_false(status_ok_on(&t, 1));
    kr_tls_close(&t);
    assert_serves_others(f);

    hs = kr_tls_open(&f->node, f->cert, f->key, TLS1_2_VERSION, &t);
    if (hs == 0)
        assert_false(status_ok_on(&t, 2));
    kr_tls_close(&t);
    assert_serves_others(f);
}

/* A CA and a client certificate "CN=admin, OU=admin" signed by it, written
 * as PEM files into the scratch dir. */
static void make_foreign_identity(struct fixture *f, char *cert_path, char *key_path,
                                  size_t path_len)
{
    EVP_PKEY *ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *cl_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    X509 *ca = X509_new(), *cl = X509_new();
    X509_NAME *ca_name = X509_NAME_new(), *cl_name = X509_NAME_new();
    X509V3_CTX v3;
    BIO *bio;
    char *pem = NULL;
    long len;

    assert_non_null(ca_key);
    assert_non_null(cl_key);
    X509_NAME_add_entry_by_txt(ca_name, "CN", MBSTRING_ASC, (const unsigned char *)"keyraft cluster CA",
                               -1, -1, 0);
    X509_NAME_add_entry_by_txt(cl_name, "CN", MBSTRING_ASC, (const unsigned char *)"admin", -1, -1,
                               0);
    X509_NAME_add_entry_by_txt(cl_name, "OU", MBSTRING_ASC, (const unsigned char *)"admin", -1, -1,
                               0);
    X509_set_version(ca, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(ca), 1);
    X509_set_issuer_name(ca, ca_name);
    X509_set_subject_name(ca, ca_name);
    X509_gmtime_adj(X509_getm_notBefore(ca), -3600);
    X509_gmtime_adj(X509_getm_notAfter(ca), 86400);
    X509_set_pubkey(ca, ca_key);
    X509V3_set_ctx(&v3, ca, ca, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, NID_basic_constraints, "critical,CA:TRUE");
    X509_add_ext(ca, ext, -1);
    X509_EXTENSION_free(ext);
    assert_true(X509_sign(ca, ca_key, EVP_sha256()) > 0);

    X509_set_version(cl, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cl), 2);
    X509_set_issuer_name(cl, ca_name);
    X509_set_subject_name(cl, cl_name);
    X509_gmtime_adj(X509_getm_notBefore(cl), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cl), 86400);
    X509_set_pubkey(cl, cl_key);
    X509V3_set_ctx(&v3, ca, cl, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &v3, NID_ext_key_usage, "clientAuth");
    X509_add_ext(cl, ext, -1);
    X509_EXTENSION_free(ext);
    assert_true(X509_sign(cl, ca_key, EVP_sha256()) > 0);

    bio = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(bio, cl);
    len = BIO_get_mem_data(bio, &pem);
    assert_int_equal(kr_scratch_file(&f->node, "foreign.pem", pem, (size_t)len, cert_path,
                                     path_len),
                     0);
    BIO_free(bio);
    bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(bio, cl_key, NULL, NULL, 0, NULL, NULL);
    len = BIO_get_mem_data(bio, &pem);
    assert_int_equal(kr_scratch_file(&f->node, "foreign.key", pem, (size_t)len, key_path,
                                     path_len),
                     0);
    BIO_free(bio);
    X509_NAME_free(ca_name);
    X509_NAME_free(cl_name);
    X509_free(ca);
    X509_free(cl);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(cl_key);
}

/* (f) a client certificate from another CA, even with the admin's name. */
static void test_foreign_ca_cert(void **state)
{
    struct fixture *f = *state;
    char cert[KR_PATH_MAX], key[KR_PATH_MAX];
    struct kr_tls t;
    struct kr_out o;

    make_foreign_identity(f, cert, key, sizeof(cert));
    int hs = kr_tls_open(&f->node, cert, key, 0, &t);
    if (hs == 0 && status_ok_on(&t, 1)) {
        kr_tls_close(&t);
        print_error("a certificate from a foreign CA was accepted\n");
        fail();
    }
    kr_tls_close(&t);
    assert_serves_others(f);

    /* through the CLI, overriding cert and key: a TLS failure, exit 1 */
    kr_cli(&f->node, NULL, 0, &o, "--cert", cert, "--key", key, "status", NULL);
    KR_ASSERT_EXIT(&o, 1);
    assert_true(strstr(o.err, "KR_ETLS") != NULL || strstr(o.err, "KR_ECONN") != NULL);
    assert_int_equal(o.out_len, 0);
    kr_out_free(&o);
    assert_serves_others(f);
}

/* (g) unknown keys through the CLI. */
static void test_unknown_key(void **state)
{
    struct fixture *f = *state;
    struct kr_out o;
    static const char *const refs[] = {"0000deadbeefdeadbeefdeadbeefdead", "name:bi-nobody",
                                       "ffffffffffffffffffffffffffffffff", "../../etc/passwd",
                                       "0000DEADBEEFDEADBEEFDEADBEEFDEAD"};

    for (size_t i = 0; i < sizeof(refs) / sizeof(refs[0]); i++) {
        kr_cli(&f->node, NULL, 0, &o, "get", refs[i], NULL);
        KR_ASSERT_FAILS_WITH(&o, "KR_ENOTFOUND");
        kr_out_free(&o);
        kr_cli(&f->node, "x", 1, &o, "encrypt", refs[i], NULL);
        KR_ASSERT_FAILS_WITH(&o, "KR_ENOTFOUND");
        kr_out_free(&o);
    }
    kr_cli(&f->node, NULL, 0, &o, "--json", "export", "0000deadbeefdeadbeefdeadbeefdead", NULL);
    KR_ASSERT_EXIT(&o, 1);
    assert_non_null(strstr((const char *)o.out, "\"KR_ENOTFOUND\""));
    kr_out_free(&o);
    /* a very long name */
    char name[2048 + 6];
    memcpy(name, "name:", 5);
    memset(name + 5, 'n', 2048);
    name[2053] = 0;
    kr_cli(&f->node, NULL, 0, &o, "get", name, NULL);
    KR_ASSERT_EXIT(&o, 1);
    kr_out_free(&o);
    kr_cli(&f->node, NULL, 0, &o, "create", "--name", name + 5, "--alg", "aes-256", NULL);
    KR_ASSERT_FAILS_WITH(&o, "KR_EINVAL");
    kr_out_free(&o);
    assert_serves_others(f);
}

/* (h) 200 idle connections do not starve a normal request. */
static void test_idle_connections(void **state)
{
    struct fixture *f = *state;
    enum { N_TCP = 200, N_TLS = 20 };
    int fds[N_TCP];
    struct kr_tls tls[N_TLS];
    kr_client *c = NULL;

    for (int i = 0; i < N_TCP; i++)
        fds[i] = kr_tcp_connect(f->node.port, IO_TIMEOUT_S);
    for (int i = 0; i < N_TLS; i++)
        assert_int_equal(kr_tls_open_app(&f->node, &tls[i]), 0);

    assert_int_equal(kr_node_client(&f->node, 5000, &c), 0);
    Keyraft__Request req;
    Keyraft__StatusRequest st;
    Keyraft__Response *resp = NULL;
    status_request(&req, &st, 0);
    uint64_t t0 = now_ms();
    assert_int_equal(kr_call(c, &req, &resp), 0);
    uint64_t took = now_ms() - t0;
    assert_non_null(resp);
    assert_int_equal(resp->status, 0);
    kr_response_free(resp);
    kr_client_free(c);
    if (took > 1000) {
        print_error("status took %llu ms with %d idle connections open\n",
                    (unsigned long long)took, N_TCP + N_TLS);
        fail();
    }
    /* the CLI too (process start included) */
    struct kr_out o;
    t0 = now_ms();
    kr_cli(&f->node, NULL, 0, &o, "status", NULL);
    took = now_ms() - t0;
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
    assert_true(took < 2000);
    /* the idle TLS ones still work */
    for (int i = 0; i < N_TLS; i += 5)
        assert_true(status_ok_on(&tls[i], (uint64_t)i + 1));
    for (int i = 0; i < N_TCP; i++)
        close(fds[i]);
    for (int i = 0; i < N_TLS; i++)
        kr_tls_close(&tls[i]);
    assert_serves_others(f);
}

/* A client that sends requests and never reads the answers: the node must
 * stop reading from it (backpressure on the write side) instead of queueing
 * answers without bound; otherwise any client can exhaust its memory. */
static void test_slow_reader(void **state)
{
    struct fixture *f = *state;
    enum { N = 10000, BURST = 250 };
#if defined(__SANITIZE_ADDRESS__)
    const long limit_kib = 450 * 1024; /* ASan keeps up to 256 MiB of freed memory */
    const long stall_ms = 30000;
#else
    const long limit_kib = 250 * 1024;
    const long stall_ms = 5000;
#endif
    struct kr_tls t;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest rr = KEYRAFT__RANDOM_REQUEST__INIT;
    struct timeval tv = {.tv_sec = 1};
    uint8_t frame[32], *burst = malloc(BURST * sizeof(frame));
    size_t n, flen;
    int sent = 0;

    assert_non_null(burst);
    rr.length = 65536;
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &rr;
    req.id = 1;
    n = keyraft__request__get_packed_size(&req);
    frame[0] = frame[1] = frame[2] = 0;
    frame[3] = (uint8_t)n;
    keyraft__request__pack(&req, frame + 4);
    flen = n + 4;
    for (int i = 0; i < BURST; i++)
        memcpy(burst + (size_t)i * flen, frame, flen);

    long base = kr_rss_kib(f->node.pid), peak = base;
    assert_true(base > 0);
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    setsockopt(t.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    while (sent < N && kr_tls_write(&t, burst, BURST * flen) == 0) {
        sent += BURST;
        long rss = kr_rss_kib(f->node.pid);
        if (rss > peak)
            peak = rss;
        if (peak - base > limit_kib)
            break;
    }
    free(burst);
    /* give the node time to answer what it accepted */
    for (int i = 0; i < 30 && peak - base <= limit_kib; i++) {
        struct timespec ts = {.tv_nsec = 100 * 1000000L};
        nanosleep(&ts, NULL);
        long rss = kr_rss_kib(f->node.pid);
        if (rss > peak)
            peak = rss;
    }
    kr_tls_close(&t);
    if (peak - base > limit_kib) {
        print_error("a client that never reads grew the node from %ld to %ld KiB after %d "
                    "requests of 64 KiB answers (limit %ld KiB): no write backpressure\n",
                    base, peak, sent, limit_kib);
        fail();
    }
    /* the backlog of one client must not stall everyone else for long */
    long took = wait_served(f, 60000);
    if (took < 0 || took > stall_ms) {
        print_error("after a client left %d unread requests, others waited %ld ms\n", sent,
                    took);
        fail();
    }
}

/* A client that reads late but reads everything: answers that filled the
 * socket wait in the node and arrive whole and in order (a reply the socket
 * took in part goes on from where it stopped). */
static void test_late_reader_gets_every_answer(void **state)
{
    struct fixture *f = *state;
    enum { N = 300 };
    struct kr_tls t;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest rr = KEYRAFT__RANDOM_REQUEST__INIT;
    uint8_t frame[32];

    rr.length = 60000; /* 300 x 60 KB: far more than the socket buffers hold */
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &rr;
    assert_int_equal(kr_tls_open_app(&f->node, &t), 0);
    for (int i = 0; i < N; i++) {
        req.id = (uint64_t)i + 1;
        size_t n = keyraft__request__get_packed_size(&req);
        frame[0] = frame[1] = frame[2] = 0;
        frame[3] = (uint8_t)n;
        keyraft__request__pack(&req, frame + 4);
        assert_int_equal(kr_tls_write(&t, frame, n + 4), 0);
    }
    struct timespec pause = {.tv_nsec = 500 * 1000000L};
    nanosleep(&pause, NULL);
    for (int i = 0; i < N; i++) {
        Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
        if (resp == NULL)
            fail_msg("answer %d of %d did not arrive whole", i + 1, N);
        assert_int_equal(resp->id, (uint64_t)i + 1);
        assert_int_equal(resp->status, 0);
        assert_non_null(resp->random);
        assert_int_equal(resp->random->data.len, rr.length);
        keyraft__response__free_unpacked(resp, NULL);
    }
    kr_tls_close(&t);
    assert_serves_others(f);
}

/* (i) after everything: alive, and the CLI works. */
static void test_still_alive(void **state)
{
    struct fixture *f = *state;
    struct kr_out o;

    assert_int_equal(kr_node_alive(&f->node), 1);
    assert_int_equal(kill(f->node.pid, 0), 0);
    kr_cli(&f->node, NULL, 0, &o, "status", NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_non_null(strstr((const char *)o.out, "role: leader"));
    kr_out_free(&o);
    /* and still takes writes */
    kr_cli(&f->node, NULL, 0, &o, "create", "--name", "bi-after", "--alg", "ed25519", NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oversized_frame),  cmocka_unit_test(test_frame_at_limit),
        cmocka_unit_test(test_truncated_frame),  cmocka_unit_test(test_plain_garbage),
        cmocka_unit_test(test_not_a_request),    cmocka_unit_test(test_request_that_expands),
        cmocka_unit_test(test_no_client_cert),
        cmocka_unit_test(test_foreign_ca_cert),  cmocka_unit_test(test_unknown_key),
        cmocka_unit_test(test_idle_connections), cmocka_unit_test(test_slow_reader),
        cmocka_unit_test(test_late_reader_gets_every_answer),
        cmocka_unit_test(test_still_alive),
    };

    signal(SIGPIPE, SIG_IGN);
    if (getenv("KR_TEST_FILTER") != NULL) /* e.g. KR_TEST_FILTER=test_rotate */
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    return cmocka_run_group_tests_name("badinput", tests, group_setup, group_teardown);
}
