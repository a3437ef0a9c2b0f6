/* test_node.c: every operation of a real single keyraftd node, through the
 * keyraft CLI and through libkeyraft, checked against OpenSSL where the
 * result is a standard object (ciphertext, signature, MAC, wrapped key);
 * then durability across kill -9 and SIGTERM restarts. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "cluster_util.h"
#include "harness.h"

#define ID_LEN 32
#define BLOB_HDR (8 + ID_LEN) /* 'K', 1, kind, 32, id, u32 BE version */
#define GCM_NONCE 12
#define GCM_TAG 16

struct fixture {
    struct kr_node node;
    kr_client *c;
};

static struct fixture *fx(void **state)
{
    return *state;
}

/* ---- group setup ---------------------------------------------------------------- */

static int group_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    if (f == NULL)
        return -1;
    if (kr_node_init(&f->node) != 0 || kr_node_start(&f->node) != 0 ||
        kr_node_client(&f->node, 30000, &f->c) != 0) {
        kr_node_destroy(&f->node);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

/* Before each test: the node must still be running. A node that died in an
 * earlier test is reported here (with its log) and restarted, so one crash
 * shows up once instead of failing every later test for an unclear reason. */
static int node_alive_setup(void **state)
{
    struct fixture *f = *state;

    if (kr_node_alive(&f->node))
        return 0;
    fprintf(stderr, "keyraftd died during an earlier test; its log:\n");
    kr_node_dump_log(&f->node, 3000);
    kr_node_kill9(&f->node); /* reap */
    kr_client_free(f->c);
    f->c = NULL;
    if (kr_node_start(&f->node) != 0 || kr_node_client(&f->node, 30000, &f->c) != 0)
        return -1;
    return -1; /* still fail this test: the crash is a bug */
}

static int group_teardown(void **state)
{
    struct fixture *f = *state;

    if (f == NULL)
        return 0;
    kr_client_free(f->c);
    int alive = kr_node_alive(&f->node);
    int rc = alive ? kr_node_stop(&f->node) : 0;
    if (rc != 0) {
        fprintf(stderr, "keyraftd did not stop cleanly on SIGTERM: exit %d\n", rc);
        kr_node_dump_log(&f->node, 3000);
    }
    kr_node_destroy(&f->node);
    free(f);
    return alive && rc != 0 ? -1 : 0;
}

/* ---- CLI helpers ------------------------------------------------------------------------ */

#define MAXA 40

static int collect(const char **argv, const char *first, va_list ap)
{
    int n = 0;

    for (const char *a = first; a != NULL && n < MAXA - 2; a = va_arg(ap, const char *))
        argv[n++] = a;
    argv[n] = NULL;
    return n;
}

static void show_cmd(const char *const *argv)
{
    fprintf(stderr, "  command: keyraft");
    for (int i = 0; argv[i] != NULL; i++)
        fprintf(stderr, " %s", argv[i]);
    fprintf(stderr, "\n");
}

/* Runs the CLI, asserts exit |want|; the output stays in |o|. */
static void run_expect(const struct kr_node *n, const void *in, size_t in_len, struct kr_out *o,
                       int want, const char *arg, ...) __attribute__((sentinel));
static void run_expect(const struct kr_node *n, const void *in, size_t in_len, struct kr_out *o,
                       int want, const char *arg, ...)
{
    const char *argv[MAXA];
    va_list ap;

    va_start(ap, arg);
    collect(argv, arg, ap);
    va_end(ap);
    kr_cli_argv(n, in, in_len, o, argv);
    if (o->status != want) {
        show_cmd(argv);
        print_error("keyraft exited %d, want %d\nstdout: %.*s\nstderr: %s\n", o->status, want,
                    (int)(o->out_len > 1500 ? 1500 : o->out_len), (const char *)o->out, o->err);
        fail();
    }
}

/* Runs the CLI, asserts exit 1 with |code| on stderr in the documented shape
 * "keyraft: CMD: KR_E...: message", and nothing on stdout. */
static void run_fails(const struct kr_node *n, const void *in, size_t in_len, const char *code,
                      const char *arg, ...) __attribute__((sentinel));
static void run_fails(const struct kr_node *n, const void *in, size_t in_len, const char *code,
                      const char *arg, ...)
{
    const char *argv[MAXA];
    char prefix[128];
    struct kr_out o;
    va_list ap;

    va_start(ap, arg);
    collect(argv, arg, ap);
    va_end(ap);
    kr_cli_argv(n, in, in_len, &o, argv);
    snprintf(prefix, sizeof(prefix), "keyraft: %s: %s: ", argv[0], code);
    if (o.status != 1 || strstr(o.err, prefix) == NULL || o.out_len != 0) {
        show_cmd(argv);
        print_error("want exit 1 and \"%s...\" on stderr, no stdout; got exit %d\n"
                    "stdout: %.*s\nstderr: %s\n",
                    prefix, o.status, (int)(o.out_len > 500 ? 500 : o.out_len),
                    (const char *)o.out, o.err);
        kr_out_free(&o);
        fail();
    }
    kr_out_free(&o);
}

/* Runs the CLI with --json, asserts exit 0, returns the parsed document. */
static kr_json *run_json(const struct kr_node *n, const void *in, size_t in_len,
                         const char *arg, ...) __attribute__((sentinel));
static kr_json *run_json(const struct kr_node *n, const void *in, size_t in_len,
                         const char *arg, ...)
{
    const char *argv[MAXA];
    struct kr_out o;
    va_list ap;
    int k;

    va_start(ap, arg);
    k = collect(argv, arg, ap);
    va_end(ap);
    argv[k] = "--json";
    argv[k + 1] = NULL;
    kr_cli_argv(n, in, in_len, &o, argv);
    if (o.status != 0) {
        show_cmd(argv);
        print_error("exit %d\nstdout: %s\nstderr: %s\n", o.status, (const char *)o.out, o.err);
        kr_out_free(&o);
        fail();
    }
    kr_json *j = kr_json_parse((const char *)o.out, o.out_len);
    if (j == NULL) {
        show_cmd(argv);
        print_error("not JSON: %s\n", (const char *)o.out);
        kr_out_free(&o);
        fail();
    }
    kr_out_free(&o);
    return j;
}

/* Creates a key through the CLI; asserts the output is exactly a 32-hex id. */
static char *create_cli(const struct kr_node *n, const char *name, const char *alg,
                        const char *extra1, const char *extra2)
{
    const char *argv[] = {"create", "--name", name, "--alg", alg, extra1, extra2, NULL};
    struct kr_out o;

    kr_cli_argv(n, NULL, 0, &o, argv);
    if (o.status != 0 || o.out_len != ID_LEN + 1 || !kr_is_hex((const char *)o.out, ID_LEN)) {
        show_cmd(argv);
        print_error("create: exit %d, stdout '%s' (want a 32-hex id and a newline), stderr %s\n",
                    o.status, (const char *)o.out, o.err);
        kr_out_free(&o);
        fail();
    }
    char *id = strndup((const char *)o.out, ID_LEN);
    kr_out_free(&o);
    assert_non_null(id);
    return id;
}

static const char *jstr(const kr_json *j, const char *path)
{
    const char *s = kr_json_str(kr_json_path(j, path));
    if (s == NULL) {
        print_error("JSON has no string at '%s'\n", path);
        fail();
    }
    return s != NULL ? s : ""; /* fail() does not return; the compiler cannot know */
}

static long long jint(const kr_json *j, const char *path)
{
    const kr_json *v = kr_json_path(j, path);
    if (v == NULL || v->type != KR_JSON_NUM) {
        print_error("JSON has no number at '%s'\n", path);
        fail();
    }
    return kr_json_int(v, 0);
}

static int jbool(const kr_json *j, const char *path)
{
    const kr_json *v = kr_json_path(j, path);
    if (v == NULL || v->type != KR_JSON_BOOL) {
        print_error("JSON has no boolean at '%s'\n", path);
        fail();
    }
    return v->boolean;
}

static uint8_t *jb64(const kr_json *j, const char *path, size_t *len)
{
    uint8_t *b = NULL;
    if (kr_b64_decode(jstr(j, path), &b, len) != 0) {
        print_error("JSON '%s' is not base64\n", path);
        fail();
    }
    return b;
}

/* The key's state as `get --json` shows it (malloc'd). */
static char *state_of(const struct kr_node *n, const char *id)
{
    kr_json *j = run_json(n, NULL, 0, "get", id, NULL);
    char *s = strdup(jstr(j, "state"));
    kr_json_free(j);
    return s;
}

static void assert_state(const struct kr_node *n, const char *id, const char *want)
{
    char *s = state_of(n, id);
    if (strcmp(s, want) != 0) {
        print_error("key %s is '%s', want '%s'\n", id, s, want);
        free(s);
        fail();
    }
    free(s);
}

/* Exports through the CLI (hex in human mode); *len bytes, malloc'd. */
static uint8_t *export_cli(const struct kr_node *n, const char *id, size_t *len)
{
    struct kr_out o;
    uint8_t *m = NULL;

    run_expect(n, NULL, 0, &o, 0, "export", id, NULL);
    if (kr_hex_decode((const char *)o.out, &m, len) != 0 || *len == 0) {
        print_error("export did not print hex: %s\n", (const char *)o.out);
        kr_out_free(&o);
        fail();
    }
    kr_out_free(&o);
    return m;
}

/* Checks a self-describing blob header; returns the version it names. */
static uint32_t check_blob(const uint8_t *b, size_t len, char kind, const char *id)
{
    if (len < BLOB_HDR || b[0] != 'K' || b[1] != 1 || b[2] != (uint8_t)kind || b[3] != ID_LEN ||
        memcmp(b + 4, id, ID_LEN) != 0) {
        print_error("not a '%c' blob of key %s (len %zu, starts %02x %02x %02x %02x)\n", kind,
                    id, len, len > 0 ? b[0] : 0, len > 1 ? b[1] : 0, len > 2 ? b[2] : 0,
                    len > 3 ? b[3] : 0);
        fail();
    }
    return (uint32_t)b[4 + ID_LEN] << 24 | (uint32_t)b[5 + ID_LEN] << 16 |
           (uint32_t)b[6 + ID_LEN] << 8 | b[7 + ID_LEN];
}

/* AES-GCM open of a keyraft ciphertext with OpenSSL alone: nonce | ct | tag,
 * AAD = header | caller AAD. Returns 0 and the plaintext in |pt| (cap ct). */
static int ossl_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *blob, size_t len,
                         const uint8_t *aad, size_t aad_len, uint8_t *pt, size_t *pt_len)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    uint8_t *full = malloc(BLOB_HDR + aad_len + 1);
    const uint8_t *nonce = blob + BLOB_HDR, *ct = nonce + GCM_NONCE;
    size_t ct_len = len - BLOB_HDR - GCM_NONCE - GCM_TAG;
    int n = 0, fin = 0, ok;

    memcpy(full, blob, BLOB_HDR);
    if (aad_len > 0)
        memcpy(full + BLOB_HDR, aad, aad_len);
    ok = ctx != NULL &&
         EVP_DecryptInit_ex2(ctx, key_len == 16 ? EVP_aes_128_gcm() : EVP_aes_256_gcm(), key,
                             nonce, NULL) == 1 &&
         EVP_DecryptUpdate(ctx, NULL, &n, full, (int)(BLOB_HDR + aad_len)) == 1 &&
         (ct_len == 0 || EVP_DecryptUpdate(ctx, pt, &n, ct, (int)ct_len) == 1) &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, GCM_TAG, (void *)(ct + ct_len)) == 1 &&
         EVP_DecryptFinal_ex(ctx, pt + (ct_len == 0 ? 0 : n), &fin) == 1;
    EVP_CIPHER_CTX_free(ctx);
    free(full);
    if (!ok)
        return -1;
    *pt_len = ct_len;
    return 0;
}

/* Verifies a raw signature with OpenSSL using the documented parameters:
 * ECDSA DER (SHA-256 for P-256, SHA-384 for P-384), RSA-PSS SHA-256 with
 * MGF1-SHA-256 and a 32-byte salt, pure Ed25519. */
static int ossl_verify(EVP_PKEY *pk, const char *alg, const uint8_t *msg, size_t msg_len,
                       const uint8_t *sig, size_t sig_len)
{
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    const char *md = strcmp(alg, "ed25519") == 0   ? NULL
                     : strcmp(alg, "ec-p384") == 0 ? "SHA384"
                                                   : "SHA256";
    int ok = m != NULL && EVP_DigestVerifyInit_ex(m, &pctx, md, NULL, NULL, pk, NULL) == 1;

    if (ok && strncmp(alg, "rsa", 3) == 0)
        ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) > 0 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", NULL) > 0;
    ok = ok && EVP_DigestVerify(m, sig, sig_len, msg, msg_len) == 1;
    EVP_MD_CTX_free(m);
    return ok;
}

/* The public key of the current version in a `get --json` document. */
static EVP_PKEY *public_key_in(const kr_json *j)
{
    long long cur = jint(j, "current_version");
    const kr_json *vs = kr_json_get(j, "versions");
    EVP_PKEY *pk = NULL;

    for (size_t i = 0; i < kr_json_len(vs); i++) {
        if (kr_json_int(kr_json_get(kr_json_at(vs, i), "version"), -1) != cur)
            continue;
        size_t len = 0;
        uint8_t *der = NULL;
        assert_int_equal(kr_b64_decode(kr_json_str(kr_json_get(kr_json_at(vs, i), "public_key")),
                                       &der, &len),
                         0);
        const unsigned char *p = der;
        pk = d2i_PUBKEY(NULL, &p, (long)len);
        free(der);
    }
    assert_non_null(pk);
    return pk;
}

/* The public key of a key's current version, from `get --json`. */
static EVP_PKEY *public_key_of(const struct kr_node *n, const char *id)
{
    kr_json *j = run_json(n, NULL, 0, "get", id, NULL);
    EVP_PKEY *pk = public_key_in(j);

    kr_json_free(j);
    return pk;
}

/* Library call with a hand-built request; asserts the node's status. */
static Keyraft__Response *lib_call(kr_client *c, Keyraft__Request *req, int want_status)
{
    Keyraft__Response *resp = NULL;
    int rc = kr_call(c, req, &resp);

    if (rc != 0) {
        print_error("kr_call: transport %s: %s\n", kr_status_name(rc), kr_client_last_error(c));
        fail();
    }
    if (resp->status != want_status) {
        print_error("kr_call op %d: status %s (%s), want %s\n", (int)req->op_case,
                    kr_status_name(resp->status), resp->message, kr_status_name(want_status));
        kr_response_free(resp);
        fail();
    }
    return resp;
}

static EVP_PKEY *gen_pkey(const char *alg)
{
    EVP_PKEY *pk = NULL;

    if (strcmp(alg, "ec-p256") == 0)
        pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    else if (strcmp(alg, "ec-p384") == 0)
        pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    else if (strcmp(alg, "ed25519") == 0)
        pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    else if (strcmp(alg, "rsa-2048") == 0)
        pk = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    assert_non_null(pk);
    return pk;
}

/* DER PKCS#8 of |pk| as OpenSSL encodes it. */
static uint8_t *pkcs8_der(EVP_PKEY *pk, size_t *len)
{
    PKCS8_PRIV_KEY_INFO *p8 = EVP_PKEY2PKCS8(pk);
    uint8_t *der = NULL;
    int n;

    assert_non_null(p8);
    n = i2d_PKCS8_PRIV_KEY_INFO(p8, &der);
    PKCS8_PRIV_KEY_INFO_free(p8);
    assert_true(n > 0);
    *len = (size_t)n;
    return der;
}

/* ---- create / get ------------------------------------------------------------------- */

static const char *const all_algs[] = {"aes-128",  "aes-256",  "hmac-sha256", "hmac-sha512",
                                       "rsa-2048", "rsa-3072", "rsa-4096",    "ec-p256",
                                       "ec-p384",  "ed25519"};
#define N_ALGS (sizeof(all_algs) / sizeof(all_algs[0]))

static int is_asym(const char *alg)
{
    return strncmp(alg, "rsa", 3) == 0 || strncmp(alg, "ec-", 3) == 0 ||
           strcmp(alg, "ed25519") == 0;
}

/* Checks the SPKI is the algorithm's: type, RSA size or EC curve. */
static void check_public_key(EVP_PKEY *pk, const char *alg)
{
    char group[64] = "";
    size_t glen = 0;

    if (strncmp(alg, "rsa-", 4) == 0) {
        assert_true(EVP_PKEY_is_a(pk, "RSA"));
        assert_int_equal(EVP_PKEY_get_bits(pk), atoi(alg + 4));
    } else if (strncmp(alg, "ec-", 3) == 0) {
        assert_true(EVP_PKEY_is_a(pk, "EC"));
        assert_int_equal(EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                                        sizeof(group), &glen),
                         1);
        assert_string_equal(group, strcmp(alg, "ec-p256") == 0 ? "prime256v1" : "secp384r1");
    } else {
        assert_true(EVP_PKEY_is_a(pk, "ED25519"));
    }
}

/* `keyraftd init` runs its node until the first writes are applied and stops
 * it at once: it must exit cleanly every time. raft 0.15 reported the log's
 * close twice when a segment writer finished closing last, and init then
 * crashed about once in 15 runs (cluster.c: io_closed_once). */
static void test_init_exits_cleanly(void **state)
{
    (void)state;
    unsigned before = kr_node_init_crashes();
    for (int i = 0; i < 20; i++) {
        struct kr_node n;
        assert_int_equal(kr_node_init(&n), 0);
        kr_node_destroy(&n);
    }
    assert_int_equal(kr_node_init_crashes(), before);
}

static void test_create_all_algorithms(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    char name[64];

    for (size_t i = 0; i < N_ALGS; i++) {
        const char *alg = all_algs[i];
        snprintf(name, sizeof(name), "all-%s", alg);
        char *id = create_cli(n, name, alg, "--tag", "team=pay");
        kr_json *j = run_json(n, NULL, 0, "get", id, NULL);

        assert_string_equal(jstr(j, "id"), id);
        assert_string_equal(jstr(j, "name"), name);
        assert_string_equal(jstr(j, "algorithm"), alg);
        assert_string_equal(jstr(j, "state"), "active");
        assert_int_equal(jint(j, "current_version"), 1);
        assert_int_equal(kr_json_len(kr_json_get(j, "versions")), 1);
        assert_int_equal(jint(j, "versions.0.version"), 1);
        assert_false(jbool(j, "versions.0.destroyed"));
        assert_true(jbool(j, "exportable"));
        assert_true(jint(j, "created_at") > 1600000000000LL);
        assert_true(jint(j, "activated_at") >= jint(j, "created_at"));
        assert_int_equal(jint(j, "destroyed_at"), 0);
        assert_int_equal(kr_json_len(kr_json_get(j, "tags")), 1);
        assert_string_equal(jstr(j, "tags.0.key"), "team");
        assert_string_equal(jstr(j, "tags.0.value"), "pay");
        assert_true(strlen(jstr(j, "versions.0.kcv")) > 0);
        if (is_asym(alg)) {
            EVP_PKEY *pk = public_key_in(j);
            check_public_key(pk, alg);
            EVP_PKEY_free(pk);
        } else {
            assert_string_equal(jstr(j, "versions.0.public_key"), "");
        }

        /* The material matches the algorithm and the advertised KCV. */
        size_t mlen = 0;
        uint8_t *m = export_cli(n, id, &mlen);
        if (strcmp(alg, "aes-128") == 0 || strcmp(alg, "aes-256") == 0) {
            static const uint8_t zero[16];
            uint8_t ecb[32];
            int outl = 0;
            char kcv[7];
            assert_int_equal(mlen, strcmp(alg, "aes-128") == 0 ? 16 : 32);
            EVP_CIPHER_CTX *cx = EVP_CIPHER_CTX_new();
            assert_int_equal(EVP_EncryptInit_ex2(cx, mlen == 16 ? EVP_aes_128_ecb()
                                                                : EVP_aes_256_ecb(),
                                                 m, NULL, NULL),
                             1);
            EVP_CIPHER_CTX_set_padding(cx, 0);
            assert_int_equal(EVP_EncryptUpdate(cx, ecb, &outl, zero, 16), 1);
            EVP_CIPHER_CTX_free(cx);
            snprintf(kcv, sizeof(kcv), "%02x%02x%02x", ecb[0], ecb[1], ecb[2]);
            assert_string_equal(jstr(j, "versions.0.kcv"), kcv);
        } else if (strncmp(alg, "hmac", 4) == 0) {
            assert_true(mlen >= 32);
        } else {
            const unsigned char *p = m;
            EVP_PKEY *priv = d2i_AutoPrivateKey(NULL, &p, (long)mlen);
            assert_non_null(priv);
            EVP_PKEY *pub = public_key_in(j);
            assert_int_equal(EVP_PKEY_eq(priv, pub), 1);
            EVP_PKEY_free(pub);
            EVP_PKEY_free(priv);
        }
        OPENSSL_cleanse(m, mlen);
        free(m);

        /* by --name and by name:NAME, the same key */
        kr_json *j2 = run_json(n, NULL, 0, "get", "--name", name, NULL);
        assert_string_equal(jstr(j2, "id"), id);
        kr_json_free(j2);
        char ref[80];
        snprintf(ref, sizeof(ref), "name:%s", name);
        struct kr_out o;
        run_expect(n, NULL, 0, &o, 0, "get", ref, NULL);
        char line[80];
        snprintf(line, sizeof(line), "id: %s\n", id);
        assert_non_null(strstr((const char *)o.out, line));
        snprintf(line, sizeof(line), "algorithm: %s\n", alg);
        assert_non_null(strstr((const char *)o.out, line));
        assert_non_null(strstr((const char *)o.out, "state: active\n"));
        assert_non_null(strstr((const char *)o.out, "tag: team=pay\n"));
        kr_out_free(&o);

        /* the library sees the same attributes */
        Keyraft__KeyAttributes *a = NULL;
        assert_int_equal(kr_get_key(f->c, id, &a), 0);
        assert_string_equal(a->id, id);
        assert_int_equal(a->algorithm, kr_alg_parse(alg));
        assert_int_equal(a->state, KEYRAFT__KEY_STATE__ACTIVE);
        kr_key_attributes_free(a);
        kr_json_free(j);
        free(id);
    }
}

static void test_create_duplicate_and_tags(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    const char *argv[] = {"create", "--name", "dup-1", "--alg", "aes-256",
                          "--tag", "a=1", "--tag", "b=two words", NULL};
    struct kr_out o;

    kr_cli_argv(n, NULL, 0, &o, argv);
    KR_ASSERT_EXIT(&o, 0);
    char *id = strndup((const char *)o.out, ID_LEN);
    kr_out_free(&o);

    run_fails(n, NULL, 0, "KR_EEXIST", "create", "--name", "dup-1", "--alg", "aes-256", NULL);
    /* same name, other algorithm: still taken */
    run_fails(n, NULL, 0, "KR_EEXIST", "create", "--name", "dup-1", "--alg", "ed25519", NULL);

    /* --json error object */
    kr_cli(n, NULL, 0, &o, "--json", "create", "--name", "dup-1", "--alg", "aes-256", NULL);
    KR_ASSERT_EXIT(&o, 1);
    kr_json *e = kr_json_parse((const char *)o.out, o.out_len);
    assert_non_null(e);
    assert_string_equal(jstr(e, "error.code"), "KR_EEXIST");
    assert_int_equal(jint(e, "error.status"), KR_EEXIST);
    assert_true(strlen(jstr(e, "error.message")) > 0);
    kr_json_free(e);
    kr_out_free(&o);

    /* both tags, in order, values kept verbatim */
    kr_json *j = run_json(n, NULL, 0, "get", id, NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "tags")), 2);
    assert_string_equal(jstr(j, "tags.0.key"), "a");
    assert_string_equal(jstr(j, "tags.0.value"), "1");
    assert_string_equal(jstr(j, "tags.1.key"), "b");
    assert_string_equal(jstr(j, "tags.1.value"), "two words");
    kr_json_free(j);

    /* the library: a duplicate is KR_EEXIST, a new name works with tags */
    Keyraft__KeyAttributes *a = NULL;
    assert_int_equal(kr_create_key(f->c, "dup-1", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &a),
                     KR_EEXIST);
    Keyraft__Tag t = KEYRAFT__TAG__INIT;
    t.key = "env";
    t.value = "prod";
    const Keyraft__Tag *tags[] = {&t};
    assert_int_equal(kr_create_key(f->c, "dup-2", KEYRAFT__ALGORITHM__EC_P256, tags, 1, &a), 0);
    assert_int_equal(strlen(a->id), ID_LEN);
    assert_int_equal(a->n_tags, 1);
    assert_string_equal(a->tags[0]->key, "env");
    assert_string_equal(a->tags[0]->value, "prod");
    assert_int_equal(a->state, KEYRAFT__KEY_STATE__ACTIVE);
    kr_key_attributes_free(a);

    /* usage errors exit 2 */
    run_expect(n, NULL, 0, &o, 2, "create", "--name", "x", NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "create", "--name", "x", "--alg", "des", NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "create", "--name", "x", "--alg", "aes-256", "--tag", "novalue",
               NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "frobnicate", NULL);
    kr_out_free(&o);
    free(id);
}

/* ---- list ---------------------------------------------------------------------------- */

/* Names of the keys of a --json list (a fresh array of strdup'd names). */
static int list_has(const kr_json *j, const char *name)
{
    const kr_json *keys = kr_json_get(j, "keys");
    for (size_t i = 0; i < kr_json_len(keys); i++)
        if (strcmp(kr_json_str(kr_json_get(kr_json_at(keys, i), "name")), name) == 0)
            return 1;
    return 0;
}

static uint64_t wall_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

/* The creation time in a key id: hex digits 4-15, after the shard. */
static uint64_t id_ms(const char *id)
{
    char stamp[13];
    snprintf(stamp, sizeof(stamp), "%.12s", id + 4);
    return strtoull(stamp, NULL, 16);
}

static void test_list_filters(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    uint64_t before = wall_ms();
    char *a = create_cli(n, "lf-a", "aes-256", "--tag", "lfgrp=x");
    char *b = create_cli(n, "lf-b", "hmac-sha256", "--tag", "lfgrp=y");
    char *c = create_cli(n, "lf-c", "ec-p256", "--tag", "lfgrp=x");
    uint64_t after = wall_ms();
    struct kr_out o;
    kr_json *j;

    run_expect(n, NULL, 0, &o, 0, "deactivate", c, NULL);
    kr_out_free(&o);

    j = run_json(n, NULL, 0, "list", "--prefix", "lf-", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 3);
    assert_true(list_has(j, "lf-a") && list_has(j, "lf-b") && list_has(j, "lf-c"));
    assert_string_equal(jstr(j, "next_cursor"), "");
    kr_json_free(j);

    j = run_json(n, NULL, 0, "list", "--prefix", "lf-", "--alg", "ec-p256", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    assert_string_equal(jstr(j, "keys.0.id"), c);
    kr_json_free(j);

    j = run_json(n, NULL, 0, "list", "--prefix", "lf-", "--state", "deactivated", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    assert_string_equal(jstr(j, "keys.0.name"), "lf-c");
    kr_json_free(j);

    j = run_json(n, NULL, 0, "list", "--tag", "lfgrp=x", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 2);
    /* an id carries the millisecond its key was made (node and test share
     * the clock), so an index lists keys in the order they were made */
    assert_true(before <= id_ms(a) && id_ms(a) <= id_ms(b) && id_ms(b) <= id_ms(c) &&
                id_ms(c) <= after);
    assert_string_equal(jstr(j, "keys.0.name"), "lf-a");
    assert_string_equal(jstr(j, "keys.1.name"), "lf-c");
    kr_json_free(j);

    j = run_json(n, NULL, 0, "list", "--tag", "lfgrp=y", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    assert_string_equal(jstr(j, "keys.0.id"), b);
    kr_json_free(j);

    /* filters combine: tag and algorithm, tag and state */
    j = run_json(n, NULL, 0, "list", "--tag", "lfgrp=x", "--alg", "aes-256", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    assert_string_equal(jstr(j, "keys.0.id"), a);
    kr_json_free(j);
    j = run_json(n, NULL, 0, "list", "--tag", "lfgrp=x", "--state", "active", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    assert_string_equal(jstr(j, "keys.0.id"), a);
    kr_json_free(j);

    /* without a prefix: every key listed by algorithm / state really has it */
    j = run_json(n, NULL, 0, "list", "--alg", "hmac-sha256", "--limit", "1000", NULL);
    assert_true(list_has(j, "lf-b"));
    for (size_t i = 0; i < kr_json_len(kr_json_get(j, "keys")); i++)
        assert_string_equal(
            kr_json_str(kr_json_get(kr_json_at(kr_json_get(j, "keys"), i), "algorithm")),
            "hmac-sha256");
    kr_json_free(j);
    j = run_json(n, NULL, 0, "list", "--state", "deactivated", "--limit", "1000", NULL);
    assert_true(list_has(j, "lf-c"));
    for (size_t i = 0; i < kr_json_len(kr_json_get(j, "keys")); i++)
        assert_string_equal(
            kr_json_str(kr_json_get(kr_json_at(kr_json_get(j, "keys"), i), "state")),
            "deactivated");
    kr_json_free(j);

    /* a prefix that matches nothing */
    j = run_json(n, NULL, 0, "list", "--prefix", "lf-zzz", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 0);
    kr_json_free(j);

    /* human table */
    run_expect(n, NULL, 0, &o, 0, "list", "--prefix", "lf-", NULL);
    assert_non_null(strstr((const char *)o.out, "ID"));
    assert_non_null(strstr((const char *)o.out, "ALGORITHM"));
    assert_non_null(strstr((const char *)o.out, a));
    assert_non_null(strstr((const char *)o.out, "deactivated"));
    kr_out_free(&o);

    /* bad filters are usage errors */
    run_expect(n, NULL, 0, &o, 2, "list", "--state", "sleepy", NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "list", "--limit", "0", NULL);
    kr_out_free(&o);

    /* library, hand-built: the same filter; an unknown state or algorithm
     * value on the wire is refused rather than silently matching nothing */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ListKeysRequest lr = KEYRAFT__LIST_KEYS_REQUEST__INIT;
    Keyraft__Tag tag = KEYRAFT__TAG__INIT;
    tag.key = "lfgrp";
    tag.value = "x";
    lr.tag = &tag;
    req.op_case = KEYRAFT__REQUEST__OP_LIST;
    req.list = &lr;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_LIST);
    assert_int_equal(resp->list->n_keys, 2);
    kr_response_free(resp);

    Keyraft__ListKeysRequest bad = KEYRAFT__LIST_KEYS_REQUEST__INIT;
    bad.state = (Keyraft__KeyState)99;
    req.list = &bad;
    resp = lib_call(f->c, &req, KR_EINVAL);
    kr_response_free(resp);
    Keyraft__ListKeysRequest bad2 = KEYRAFT__LIST_KEYS_REQUEST__INIT;
    bad2.algorithm = (Keyraft__Algorithm)77;
    req.list = &bad2;
    resp = lib_call(f->c, &req, KR_EINVAL);
    kr_response_free(resp);
    free(a);
    free(b);
    free(c);
}

/* Pages through `list --prefix P --limit L`, counting each name in |seen|. */
static int page_all(const struct kr_node *n, const char *prefix, const char *limit, int *seen,
                    int nseen, int *pages, char *first_cursor, size_t fc_len)
{
    char cursor[512] = "";
    int total = 0;

    *pages = 0;
    for (;;) {
        kr_json *j = cursor[0] == '\0'
                         ? run_json(n, NULL, 0, "list", "--prefix", prefix, "--limit", limit, NULL)
                         : run_json(n, NULL, 0, "list", "--prefix", prefix, "--limit", limit,
                                    "--after", cursor, NULL);
        const kr_json *keys = kr_json_get(j, "keys");
        (*pages)++;
        assert_true(kr_json_len(keys) <= (size_t)atoi(limit));
        for (size_t i = 0; i < kr_json_len(keys); i++) {
            const char *nm = kr_json_str(kr_json_get(kr_json_at(keys, i), "name"));
            int k = atoi(nm + strlen(prefix));
            assert_true(k >= 0 && k < nseen);
            seen[k]++;
            total++;
        }
        const char *next = jstr(j, "next_cursor");
        if (*pages == 1 && first_cursor != NULL)
            snprintf(first_cursor, fc_len, "%s", next);
        if (next[0] == '\0') {
            kr_json_free(j);
            break;
        }
        assert_true(strlen(next) < sizeof(cursor));
        snprintf(cursor, sizeof(cursor), "%s", next);
        kr_json_free(j);
        assert_true(*pages < 20);
    }
    return total;
}

/* Pages through a listing with the library; counts the "pg-NN" keys seen in
 * |seen|; returns the number of keys over all pages. */
static int lib_page_all(kr_client *c, const char *prefix, Keyraft__Algorithm alg, uint32_t limit,
                        int *seen, int *pages)
{
    char cursor[512] = "";
    int total = 0;

    *pages = 0;
    for (;;) {
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        Keyraft__ListKeysRequest lr = KEYRAFT__LIST_KEYS_REQUEST__INIT;
        lr.prefix = (char *)prefix;
        lr.algorithm = alg;
        lr.limit = limit;
        lr.after = cursor;
        req.op_case = KEYRAFT__REQUEST__OP_LIST;
        req.list = &lr;
        Keyraft__Response *resp = lib_call(c, &req, 0);
        (*pages)++;
        assert_true(resp->list->n_keys <= limit);
        for (size_t i = 0; i < resp->list->n_keys; i++) {
            const char *nm = resp->list->keys[i]->name;
            if (strncmp(nm, "pg-", 3) == 0)
                seen[atoi(nm + 3)]++;
            total++;
        }
        snprintf(cursor, sizeof(cursor), "%s", resp->list->next_cursor);
        kr_response_free(resp);
        if (cursor[0] == '\0' || *pages > 200)
            break;
    }
    assert_true(cursor[0] == '\0');
    return total;
}

static void test_list_pagination(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    int seen[25] = {0}, pages = 0;
    char name[32], first[512];

    for (int i = 0; i < 25; i++) {
        Keyraft__KeyAttributes *a = NULL;
        snprintf(name, sizeof(name), "pg-%02d", i);
        assert_int_equal(kr_create_key(f->c, name, KEYRAFT__ALGORITHM__AES_128, NULL, 0, &a), 0);
        kr_key_attributes_free(a);
    }
    /* a neighbour sorting right after the prefix must not leak in */
    Keyraft__KeyAttributes *a = NULL;
    assert_int_equal(kr_create_key(f->c, "ph-00", KEYRAFT__ALGORITHM__AES_128, NULL, 0, &a), 0);
    kr_key_attributes_free(a);

    int total = page_all(n, "pg-", "10", seen, 25, &pages, first, sizeof(first));
    if (total != 25) {
        char missing[200] = "";
        for (int i = 0; i < 25; i++)
            if (seen[i] != 1)
                snprintf(missing + strlen(missing), sizeof(missing) - strlen(missing),
                         " pg-%02d(x%d)", i, seen[i]);
        print_error("--limit 10: %d of 25 keys over %d pages; wrong:%s\n", total, pages, missing);
    }
    assert_int_equal(total, 25);
    assert_int_equal(pages, 3);
    for (int i = 0; i < 25; i++)
        assert_int_equal(seen[i], 1);
    assert_true(first[0] != '\0');

    /* human mode names the cursor; the cursor from it gives the same page */
    struct kr_out o;
    run_expect(n, NULL, 0, &o, 0, "list", "--prefix", "pg-", "--limit", "10", NULL);
    char want[600];
    snprintf(want, sizeof(want), "next: %s\n", first);
    assert_non_null(strstr((const char *)o.out, want));
    assert_non_null(strstr((const char *)o.out, "pg-09"));
    assert_null(strstr((const char *)o.out, "pg-10"));
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "list", "--prefix", "pg-", "--limit", "10", "--after", first,
               NULL);
    assert_non_null(strstr((const char *)o.out, "pg-10"));
    assert_non_null(strstr((const char *)o.out, "pg-19"));
    assert_null(strstr((const char *)o.out, "pg-09"));
    assert_null(strstr((const char *)o.out, "pg-20"));
    kr_out_free(&o);

    /* other page sizes (through the library: the CLI's paging is covered
     * above): every key exactly once, and the walk ends */
    static const uint32_t limits[] = {1, 5, 7, 24, 25, 26, 1000};
    for (size_t l = 0; l < sizeof(limits) / sizeof(limits[0]); l++) {
        memset(seen, 0, sizeof(seen));
        total = lib_page_all(f->c, "pg-", KEYRAFT__ALGORITHM__ALG_UNSPECIFIED, limits[l], seen,
                             &pages);
        if (total != 25)
            print_error("limit %u: %d keys over %d pages\n", limits[l], total, pages);
        assert_int_equal(total, 25);
        for (int i = 0; i < 25; i++)
            assert_int_equal(seen[i], 1);
    }

    /* a walk by algorithm, over the index, also sees each key once and ends */
    memset(seen, 0, sizeof(seen));
    total = lib_page_all(f->c, "", KEYRAFT__ALGORITHM__AES_128, 4, seen, &pages);
    assert_true(total >= 26);
    for (int i = 0; i < 25; i++)
        assert_int_equal(seen[i], 1);

    /* a cursor from another listing is refused, not misapplied */
    run_fails(n, NULL, 0, "KR_EINVAL", "list", "--prefix", "lf-", "--after", first, NULL);
    run_fails(n, NULL, 0, "KR_EINVAL", "list", "--prefix", "pg-", "--after", "zz-not-hex", NULL);
}

/* ---- export / import ------------------------------------------------------------------ */

static void test_export(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    char *a256 = create_cli(n, "ex-a256", "aes-256", NULL, NULL);
    char *a128 = create_cli(n, "ex-a128", "aes-128", NULL, NULL);
    char *ne = create_cli(n, "ex-ne", "aes-256", "--non-exportable", NULL);
    size_t len = 0;

    uint8_t *m = export_cli(n, a256, &len);
    assert_int_equal(len, 32);
    /* --json: base64 material, the version, the attributes */
    kr_json *j = run_json(n, NULL, 0, "export", a256, NULL);
    size_t jlen = 0;
    uint8_t *jm = jb64(j, "material", &jlen);
    assert_int_equal(jlen, 32);
    assert_memory_equal(jm, m, 32);
    assert_int_equal(jint(j, "version"), 1);
    assert_string_equal(jstr(j, "attributes.id"), a256);
    kr_json_free(j);
    free(jm);
    free(m);

    m = export_cli(n, a128, &len);
    assert_int_equal(len, 16);
    free(m);
    /* by name, and --version 1 is the current one */
    m = export_cli(n, "name:ex-a128", &len);
    assert_int_equal(len, 16);
    free(m);
    struct kr_out o;
    run_expect(n, NULL, 0, &o, 0, "export", a128, "--version", "1", NULL);
    assert_int_equal(o.out_len, 33);
    kr_out_free(&o);
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "export", a128, "--version", "7", NULL);

    /* non-exportable: refused by policy, and the attribute says so */
    run_fails(n, NULL, 0, "KR_EPERM", "export", ne, NULL);
    j = run_json(n, NULL, 0, "get", ne, NULL);
    assert_false(jbool(j, "exportable"));
    kr_json_free(j);
    /* non-exportable still encrypts */
    run_expect(n, "x", 1, &o, 0, "encrypt", ne, NULL);
    kr_out_free(&o);

    /* library, hand-built */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ExportKeyRequest er = KEYRAFT__EXPORT_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.id = a128;
    er.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_EXPORT;
    req.export = &er;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->export->material.len, 16);
    assert_int_equal(resp->export->version, 1);
    kr_response_free(resp);
    ref.id = ne;
    resp = lib_call(f->c, &req, KR_EPERM);
    kr_response_free(resp);
    free(a256);
    free(a128);
    free(ne);
}

static void import_symmetric(struct fixture *f, const char *alg, size_t klen)
{
    const struct kr_node *n = &f->node;
    uint8_t key[64], mac_local[64];
    char path[KR_PATH_MAX], name[64];
    size_t len = 0, mac_len = 0;
    struct kr_out o;

    assert_int_equal(RAND_bytes(key, (int)klen), 1);
    snprintf(name, sizeof(name), "imp-%s", alg);
    assert_int_equal(kr_scratch_file(&f->node, name, key, klen, path, sizeof(path)), 0);
    run_expect(n, NULL, 0, &o, 0, "import", "--name", name, "--alg", alg, "--file", path, NULL);
    assert_true(kr_is_hex((const char *)o.out, ID_LEN));
    char *id = strndup((const char *)o.out, ID_LEN);
    kr_out_free(&o);

    uint8_t *m = export_cli(n, id, &len);
    assert_int_equal(len, klen);
    assert_memory_equal(m, key, klen);
    free(m);

    const char *msg = "imported key, known bytes";
    if (strncmp(alg, "aes", 3) == 0) {
        /* the node's ciphertext opens with OpenSSL and the known key */
        uint8_t pt[64];
        size_t pt_len = 0;
        run_expect(n, msg, strlen(msg), &o, 0, "encrypt", id, "--aad", "ctx", NULL);
        assert_int_equal(check_blob(o.out, o.out_len, 'c', id), 1);
        assert_int_equal(o.out_len, BLOB_HDR + GCM_NONCE + strlen(msg) + GCM_TAG);
        assert_int_equal(ossl_gcm_open(key, klen, o.out, o.out_len, (const uint8_t *)"ctx", 3,
                                       pt, &pt_len),
                         0);
        assert_int_equal(pt_len, strlen(msg));
        assert_memory_equal(pt, msg, pt_len);
        kr_out_free(&o);
    } else {
        /* the node's MAC is HMAC with the known key */
        const char *md = strcmp(alg, "hmac-sha256") == 0 ? "SHA256" : "SHA512";
        run_expect(n, msg, strlen(msg), &o, 0, "mac", id, NULL);
        assert_int_equal(check_blob(o.out, o.out_len, 'm', id), 1);
        assert_non_null(EVP_Q_mac(NULL, "HMAC", NULL, md, NULL, key, klen,
                                  (const uint8_t *)msg, strlen(msg), mac_local,
                                  sizeof(mac_local), &mac_len));
        assert_int_equal(o.out_len - BLOB_HDR, mac_len);
        assert_memory_equal(o.out + BLOB_HDR, mac_local, mac_len);
        kr_out_free(&o);
    }
    OPENSSL_cleanse(key, sizeof(key));
    free(id);
}

static void import_asymmetric(struct fixture *f, const char *alg, int traditional)
{
    const struct kr_node *n = &f->node;
    EVP_PKEY *pk = gen_pkey(alg);
    char path[KR_PATH_MAX], name[64];
    BIO *bio = BIO_new(BIO_s_mem());
    char *pem = NULL;
    struct kr_out o;
    size_t len = 0, want_len = 0;

    assert_int_equal(traditional ? PEM_write_bio_PrivateKey_traditional(bio, pk, NULL, NULL, 0,
                                                                        NULL, NULL)
                                 : PEM_write_bio_PrivateKey(bio, pk, NULL, NULL, 0, NULL, NULL),
                     1);
    long pem_len = BIO_get_mem_data(bio, &pem);
    snprintf(name, sizeof(name), "imp-%s", alg);
    assert_int_equal(kr_scratch_file(&f->node, name, pem, (size_t)pem_len, path, sizeof(path)), 0);
    BIO_free(bio);

    run_expect(n, NULL, 0, &o, 0, "import", "--name", name, "--alg", alg, "--file", path, NULL);
    char *id = strndup((const char *)o.out, ID_LEN);
    kr_out_free(&o);

    /* export gives the DER PKCS#8 of the imported key */
    uint8_t *m = export_cli(n, id, &len);
    uint8_t *want = pkcs8_der(pk, &want_len);
    const unsigned char *p = m;
    EVP_PKEY *back = d2i_AutoPrivateKey(NULL, &p, (long)len);
    assert_non_null(back);
    assert_int_equal(EVP_PKEY_eq(back, pk), 1);
    if (len != want_len || memcmp(m, want, len) != 0) {
        print_error("%s: export is not the DER PKCS#8 of the imported key (%zu vs %zu bytes)\n",
                    alg, len, want_len);
        fail();
    }
    EVP_PKEY_free(back);
    OPENSSL_free(want);
    free(m);

    /* the advertised public key is ours */
    EVP_PKEY *pub = public_key_of(n, id);
    assert_int_equal(EVP_PKEY_eq(pub, pk), 1);
    EVP_PKEY_free(pub);

    /* a signature by the node verifies with OpenSSL and our key */
    const char *msg = "signed by an imported key";
    run_expect(n, msg, strlen(msg), &o, 0, "sign", id, NULL);
    assert_int_equal(check_blob(o.out, o.out_len, 's', id), 1);
    if (!ossl_verify(pk, alg, (const uint8_t *)msg, strlen(msg), o.out + BLOB_HDR,
                     o.out_len - BLOB_HDR)) {
        print_error("%s: OpenSSL rejects the node's raw signature\n", alg);
        fail();
    }
    kr_out_free(&o);

    /* and a signature we make verifies on the node, wrapped in a blob */
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    const char *md = strcmp(alg, "ed25519") == 0   ? NULL
                     : strcmp(alg, "ec-p384") == 0 ? "SHA384"
                                                   : "SHA256";
    uint8_t sig[BLOB_HDR + 1024];
    size_t sig_len = sizeof(sig) - BLOB_HDR;
    assert_int_equal(EVP_DigestSignInit_ex(mctx, &pctx, md, NULL, NULL, pk, NULL), 1);
    if (strncmp(alg, "rsa", 3) == 0) {
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING);
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32);
        EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, "SHA256", NULL);
    }
    assert_int_equal(EVP_DigestSign(mctx, sig + BLOB_HDR, &sig_len, (const uint8_t *)msg,
                                    strlen(msg)),
                     1);
    EVP_MD_CTX_free(mctx);
    sig[0] = 'K';
    sig[1] = 1;
    sig[2] = 's';
    sig[3] = ID_LEN;
    memcpy(sig + 4, id, ID_LEN);
    sig[4 + ID_LEN] = sig[5 + ID_LEN] = sig[6 + ID_LEN] = 0;
    sig[7 + ID_LEN] = 1;
    assert_int_equal(kr_scratch_file(&f->node, "ext.sig", sig, BLOB_HDR + sig_len, path,
                                     sizeof(path)),
                     0);
    run_expect(n, msg, strlen(msg), &o, 0, "verify", id, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "valid\n");
    kr_out_free(&o);

    EVP_PKEY_free(pk);
    free(id);
}

static void test_import(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    char path[KR_PATH_MAX];
    uint8_t junk[31];

    import_symmetric(f, "aes-256", 32);
    import_symmetric(f, "aes-128", 16);
    import_symmetric(f, "hmac-sha256", 32);
    import_symmetric(f, "hmac-sha512", 64);
    import_asymmetric(f, "ec-p256", 1); /* "BEGIN EC PRIVATE KEY" */
    import_asymmetric(f, "ec-p384", 0);
    import_asymmetric(f, "ed25519", 0);
    import_asymmetric(f, "rsa-2048", 1); /* "BEGIN RSA PRIVATE KEY" */

    /* wrong sizes and mismatched algorithms are refused */
    RAND_bytes(junk, sizeof(junk));
    assert_int_equal(kr_scratch_file(&f->node, "junk31", junk, sizeof(junk), path, sizeof(path)),
                     0);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "imp-bad1", "--alg", "aes-256",
              "--file", path, NULL);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "imp-bad2", "--alg", "ec-p256",
              "--file", path, NULL);
    EVP_PKEY *pk = gen_pkey("ec-p256");
    BIO *bio = BIO_new(BIO_s_mem());
    char *pem = NULL;
    PEM_write_bio_PrivateKey(bio, pk, NULL, NULL, 0, NULL, NULL);
    long pem_len = BIO_get_mem_data(bio, &pem);
    assert_int_equal(kr_scratch_file(&f->node, "p256.pem", pem, (size_t)pem_len, path,
                                     sizeof(path)),
                     0);
    BIO_free(bio);
    EVP_PKEY_free(pk);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "imp-bad3", "--alg", "ec-p384",
              "--file", path, NULL);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "imp-bad4", "--alg", "rsa-2048",
              "--file", path, NULL);
    /* a refused import leaves no key behind */
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "get", "name:imp-bad3", NULL);
    /* the name of an import is unique like any other */
    run_fails(n, NULL, 0, "KR_EEXIST", "import", "--name", "imp-ec-p256", "--alg", "ec-p256",
              "--file", path, NULL);

    /* library, hand-built import of raw AES material */
    uint8_t key[32];
    RAND_bytes(key, sizeof(key));
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ImportKeyRequest ir = KEYRAFT__IMPORT_KEY_REQUEST__INIT;
    ir.name = "imp-lib";
    ir.algorithm = KEYRAFT__ALGORITHM__AES_256;
    ir.material.data = key;
    ir.material.len = sizeof(key);
    ir.non_exportable = 1;
    req.op_case = KEYRAFT__REQUEST__OP_IMPORT;
    req.import = &ir;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_KEY);
    char *id = strdup(resp->key->id);
    assert_false(resp->key->exportable);
    kr_response_free(resp);
    /* it encrypts with the imported bytes even though it cannot be exported */
    kr_buf ct = {0};
    uint8_t pt[16];
    size_t pt_len = 0;
    assert_int_equal(kr_encrypt(f->c, id, (const uint8_t *)"0123456789abcdef", 16, NULL, 0, &ct),
                     0);
    assert_int_equal(ossl_gcm_open(key, 32, ct.data, ct.len, NULL, 0, pt, &pt_len), 0);
    assert_memory_equal(pt, "0123456789abcdef", 16);
    kr_buf_free(&ct);
    run_fails(n, NULL, 0, "KR_EPERM", "export", id, NULL);
    free(id);
}

/* ---- lifecycle ---------------------------------------------------------------------- */

static void test_lifecycle(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out o, ct_old;
    const char *msg = "lifecycle plaintext";

    char *id = create_cli(n, "lc-1", "aes-256", "--pre-active", NULL);
    assert_state(n, id, "pre-active");
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "encrypt", id, NULL);
    kr_json *j = run_json(n, NULL, 0, "get", id, NULL);
    assert_int_equal(jint(j, "activated_at"), 0);
    kr_json_free(j);

    run_expect(n, NULL, 0, &o, 0, "activate", id, NULL);
    assert_non_null(strstr((const char *)o.out, "state: active\n"));
    kr_out_free(&o);
    assert_state(n, id, "active");
    run_expect(n, msg, strlen(msg), &ct_old, 0, "encrypt", id, NULL);
    /* activating twice is a state error, not a silent success */
    run_fails(n, NULL, 0, "KR_ESTATE", "activate", id, NULL);

    /* destroy refuses an active key */
    run_fails(n, NULL, 0, "KR_ESTATE", "destroy", id, NULL);
    assert_state(n, id, "active");

    run_expect(n, NULL, 0, &o, 0, "deactivate", id, NULL);
    assert_non_null(strstr((const char *)o.out, "state: deactivated\n"));
    kr_out_free(&o);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "encrypt", id, NULL);
    run_expect(n, ct_old.out, ct_old.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, strlen(msg));
    assert_memory_equal(o.out, msg, o.out_len);
    kr_out_free(&o);
    j = run_json(n, NULL, 0, "get", id, NULL);
    assert_true(jint(j, "deactivated_at") >= jint(j, "activated_at"));
    kr_json_free(j);
    /* a deactivated key cannot be reactivated */
    run_fails(n, NULL, 0, "KR_ESTATE", "activate", id, NULL);

    /* destroy: a tombstone that keeps its attributes */
    run_expect(n, NULL, 0, &o, 0, "destroy", id, NULL);
    kr_out_free(&o);
    assert_state(n, id, "destroyed");
    j = run_json(n, NULL, 0, "get", id, NULL);
    assert_string_equal(jstr(j, "name"), "lc-1");
    assert_true(jint(j, "destroyed_at") > 0);
    assert_true(jbool(j, "versions.0.destroyed"));
    kr_json_free(j);
    run_fails(n, NULL, 0, "KR_ESTATE", "export", id, NULL);
    run_fails(n, ct_old.out, ct_old.out_len, "KR_ESTATE", "decrypt", NULL);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "encrypt", id, NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "rotate", id, NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "activate", id, NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "destroy", id, NULL);
    j = run_json(n, NULL, 0, "list", "--prefix", "lc-", "--state", "destroyed", NULL);
    kr_json_free(j);

    /* the name is free again; the tombstone stays reachable by id */
    char *id2 = create_cli(n, "lc-1", "aes-256", NULL, NULL);
    assert_string_not_equal(id, id2);
    j = run_json(n, NULL, 0, "get", "name:lc-1", NULL);
    assert_string_equal(jstr(j, "id"), id2);
    assert_string_equal(jstr(j, "state"), "active");
    kr_json_free(j);
    assert_state(n, id, "destroyed");
    /* the old ciphertext names the old key: still refused */
    run_fails(n, ct_old.out, ct_old.out_len, "KR_ESTATE", "decrypt", NULL);
    kr_out_free(&ct_old);

    /* revoke: reason required; compromised; message kept */
    run_expect(n, NULL, 0, &o, 2, "revoke", id2, NULL);
    assert_non_null(strstr(o.err, "--reason"));
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "revoke", id2, "--reason", "bored", NULL);
    kr_out_free(&o);
    assert_state(n, id2, "active");
    /* (a revocation message is covered by its own group: test_revoke_message) */
    run_expect(n, NULL, 0, &o, 0, "revoke", id2, "--reason", "compromised", NULL);
    kr_out_free(&o);
    j = run_json(n, NULL, 0, "get", id2, NULL);
    assert_string_equal(jstr(j, "state"), "compromised");
    assert_string_equal(jstr(j, "revoke_reason"), "compromised");
    assert_true(jint(j, "revoked_at") > 0);
    kr_json_free(j);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "encrypt", id2, NULL);
    /* destroying a compromised key keeps the compromise on record */
    run_expect(n, NULL, 0, &o, 0, "destroy", id2, NULL);
    kr_out_free(&o);
    assert_state(n, id2, "destroyed-compromised");

    /* revoke with another reason deactivates */
    char *id3 = create_cli(n, "lc-3", "ec-p256", NULL, NULL);
    run_expect(n, NULL, 0, &o, 0, "revoke", id3, "--reason", "superseded", NULL);
    kr_out_free(&o);
    j = run_json(n, NULL, 0, "get", id3, NULL);
    assert_string_equal(jstr(j, "state"), "deactivated");
    assert_string_equal(jstr(j, "revoke_reason"), "superseded");
    kr_json_free(j);
    run_fails(n, "m", 1, "KR_ESTATE", "sign", id3, NULL);

    /* library, hand-built: pre-active → activate → deactivate → destroy;
     * revoke without a reason is KR_EINVAL on the wire */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__CreateKeyRequest cr = KEYRAFT__CREATE_KEY_REQUEST__INIT;
    cr.name = "lc-lib";
    cr.algorithm = KEYRAFT__ALGORITHM__HMAC_SHA256;
    cr.pre_active = 1;
    req.op_case = KEYRAFT__REQUEST__OP_CREATE;
    req.create = &cr;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->key->state, KEYRAFT__KEY_STATE__PRE_ACTIVE);
    char *lid = strdup(resp->key->id);
    kr_response_free(resp);

    Keyraft__StateChangeRequest sc = KEYRAFT__STATE_CHANGE_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.id = lid;
    sc.key = &ref;
    Keyraft__Request r2 = KEYRAFT__REQUEST__INIT;
    r2.op_case = KEYRAFT__REQUEST__OP_ACTIVATE;
    r2.activate = &sc;
    resp = lib_call(f->c, &r2, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_KEY);
    assert_int_equal(resp->key->state, KEYRAFT__KEY_STATE__ACTIVE);
    kr_response_free(resp);

    Keyraft__RevokeKeyRequest rr = KEYRAFT__REVOKE_KEY_REQUEST__INIT;
    rr.key = &ref;
    Keyraft__Request r3 = KEYRAFT__REQUEST__INIT;
    r3.op_case = KEYRAFT__REQUEST__OP_REVOKE;
    r3.revoke = &rr;
    resp = lib_call(f->c, &r3, KR_EINVAL);
    kr_response_free(resp);

    Keyraft__Request r4 = KEYRAFT__REQUEST__INIT;
    r4.op_case = KEYRAFT__REQUEST__OP_DEACTIVATE;
    r4.deactivate = &sc;
    resp = lib_call(f->c, &r4, 0);
    assert_int_equal(resp->key->state, KEYRAFT__KEY_STATE__DEACTIVATED);
    kr_response_free(resp);
    Keyraft__Request r5 = KEYRAFT__REQUEST__INIT;
    r5.op_case = KEYRAFT__REQUEST__OP_DESTROY;
    r5.destroy = &sc;
    resp = lib_call(f->c, &r5, 0);
    assert_int_equal(resp->key->state, KEYRAFT__KEY_STATE__DESTROYED);
    kr_response_free(resp);
    /* name-addressed state change on an unknown name */
    ref.id = "";
    ref.name = "lc-no-such";
    resp = lib_call(f->c, &r2, KR_ENOTFOUND);
    kr_response_free(resp);

    free(lid);
    free(id);
    free(id2);
    free(id3);
}

/* ---- rotate ------------------------------------------------------------------------------ */

static void test_rotate(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out ct1, ct2, o;
    const char *m1 = "before rotation", *m2 = "after rotation";

    char *id = create_cli(n, "rot-1", "aes-256", NULL, NULL);
    run_expect(n, m1, strlen(m1), &ct1, 0, "encrypt", id, NULL);
    size_t k1_len = 0;
    uint8_t *k1 = export_cli(n, id, &k1_len);

    run_expect(n, NULL, 0, &o, 0, "rotate", id, NULL);
    assert_non_null(strstr((const char *)o.out, "version: 2\n"));
    kr_out_free(&o);
    run_expect(n, m2, strlen(m2), &ct2, 0, "encrypt", id, NULL);

    /* ciphertexts name their version */
    assert_int_equal(check_blob(ct1.out, ct1.out_len, 'c', id), 1);
    assert_int_equal(check_blob(ct2.out, ct2.out_len, 'c', id), 2);
    kr_json *j = run_json(n, m2, strlen(m2), "encrypt", id, NULL);
    assert_int_equal(jint(j, "version"), 2);
    assert_string_equal(jstr(j, "key_id"), id);
    kr_json_free(j);

    run_expect(n, ct1.out, ct1.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, strlen(m1));
    assert_memory_equal(o.out, m1, o.out_len);
    kr_out_free(&o);
    run_expect(n, ct2.out, ct2.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, strlen(m2));
    assert_memory_equal(o.out, m2, o.out_len);
    kr_out_free(&o);
    j = run_json(n, ct1.out, ct1.out_len, "decrypt", NULL);
    assert_int_equal(jint(j, "version"), 1);
    kr_json_free(j);

    /* both versions listed; export per version; the new one differs */
    j = run_json(n, NULL, 0, "get", id, NULL);
    assert_int_equal(jint(j, "current_version"), 2);
    assert_int_equal(kr_json_len(kr_json_get(j, "versions")), 2);
    assert_int_equal(jint(j, "versions.0.version"), 1);
    assert_int_equal(jint(j, "versions.1.version"), 2);
    assert_string_not_equal(jstr(j, "versions.0.kcv"), jstr(j, "versions.1.kcv"));
    kr_json_free(j);
    size_t k2_len = 0;
    uint8_t *k2 = export_cli(n, id, &k2_len);
    assert_int_equal(k2_len, 32);
    assert_memory_not_equal(k1, k2, 32);
    run_expect(n, NULL, 0, &o, 0, "export", id, "--version", "1", NULL);
    uint8_t *k1b = NULL;
    size_t k1b_len = 0;
    assert_int_equal(kr_hex_decode((const char *)o.out, &k1b, &k1b_len), 0);
    assert_int_equal(k1b_len, 32);
    assert_memory_equal(k1b, k1, 32);
    kr_out_free(&o);
    /* the v2 ciphertext opens under the v2 key, not the v1 key */
    uint8_t pt[64];
    size_t pt_len = 0;
    assert_int_equal(ossl_gcm_open(k2, 32, ct2.out, ct2.out_len, NULL, 0, pt, &pt_len), 0);
    assert_int_not_equal(ossl_gcm_open(k1, 32, ct2.out, ct2.out_len, NULL, 0, pt, &pt_len), 0);
    free(k1);
    free(k1b);
    free(k2);

    /* swapping the version in a header is detected (it is in the AAD) */
    ct2.out[BLOB_HDR - 1] = 1;
    run_fails(n, ct2.out, ct2.out_len, "KR_EAUTH", "decrypt", NULL);
    kr_out_free(&ct1);
    kr_out_free(&ct2);

    /* rotation of a signing key: old signatures still verify */
    char *sid = create_cli(n, "rot-sig", "ed25519", NULL, NULL);
    const char *msg = "rotate me";
    char path[KR_PATH_MAX];
    run_expect(n, msg, strlen(msg), &o, 0, "sign", sid, NULL);
    assert_int_equal(kr_scratch_file(&f->node, "rot.sig", o.out, o.out_len, path, sizeof(path)),
                     0);
    kr_out_free(&o);
    /* library, hand-built rotate */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StateChangeRequest sc = KEYRAFT__STATE_CHANGE_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.name = "rot-sig";
    sc.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_ROTATE;
    req.rotate = &sc;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->key->current_version, 2);
    assert_int_equal(resp->key->n_versions, 2);
    kr_response_free(resp);
    run_expect(n, msg, strlen(msg), &o, 0, "verify", sid, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "valid\n");
    kr_out_free(&o);
    run_expect(n, msg, strlen(msg), &o, 0, "sign", sid, NULL);
    assert_int_equal(check_blob(o.out, o.out_len, 's', sid), 2);
    kr_out_free(&o);

    /* library encrypt after rotate uses v2 */
    kr_buf ct = {0}, back = {0};
    assert_int_equal(kr_encrypt(f->c, "name:rot-1", (const uint8_t *)"lib", 3, NULL, 0, &ct), 0);
    assert_int_equal(check_blob(ct.data, ct.len, 'c', id), 2);
    assert_int_equal(kr_decrypt(f->c, ct.data, ct.len, NULL, 0, &back), 0);
    assert_int_equal(back.len, 3);
    assert_memory_equal(back.data, "lib", 3);
    kr_buf_free(&ct);
    kr_buf_free(&back);
    free(id);
    free(sid);
}

/* ---- encrypt / decrypt ------------------------------------------------------------------ */

static void test_encrypt_decrypt(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out ct, o;
    const char *msg = "card 4111";

    char *id = create_cli(n, "enc-1", "aes-256", NULL, NULL);
    run_expect(n, msg, strlen(msg), &ct, 0, "encrypt", id, "--aad", "order-17", NULL);
    assert_int_equal(check_blob(ct.out, ct.out_len, 'c', id), 1);
    assert_int_equal(ct.out_len, BLOB_HDR + GCM_NONCE + strlen(msg) + GCM_TAG);

    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", "--aad", "order-17", NULL);
    assert_int_equal(o.out_len, strlen(msg));
    assert_memory_equal(o.out, msg, o.out_len);
    kr_out_free(&o);

    run_fails(n, ct.out, ct.out_len, "KR_EAUTH", "decrypt", "--aad", "order-18", NULL);
    run_fails(n, ct.out, ct.out_len, "KR_EAUTH", "decrypt", NULL);

    /* every single-bit flip after the header is caught (library: fast) */
    for (size_t pos = BLOB_HDR; pos < ct.out_len; pos++) {
        kr_buf bad = {0};
        ct.out[pos] ^= (uint8_t)(1u << (pos % 8));
        int rc = kr_decrypt(f->c, ct.out, ct.out_len, (const uint8_t *)"order-17", 8, &bad);
        if (rc != KR_EAUTH)
            print_error("flip at byte %zu: %s, want KR_EAUTH\n", pos, kr_status_name(rc));
        assert_int_equal(rc, KR_EAUTH);
        assert_null(bad.data);
        ct.out[pos] ^= (uint8_t)(1u << (pos % 8));
    }
    ct.out[BLOB_HDR + 3] ^= 0x10;
    run_fails(n, ct.out, ct.out_len, "KR_EAUTH", "decrypt", "--aad", "order-17", NULL);
    ct.out[BLOB_HDR + 3] ^= 0x10;
    ct.out[ct.out_len - 1] ^= 0x80;
    run_fails(n, ct.out, ct.out_len, "KR_EAUTH", "decrypt", "--aad", "order-17", NULL);
    ct.out[ct.out_len - 1] ^= 0x80;
    /* truncations never decrypt */
    run_fails(n, ct.out, ct.out_len - 1, "KR_EAUTH", "decrypt", "--aad", "order-17", NULL);
    struct kr_out t;
    run_expect(n, ct.out, BLOB_HDR + 5, &t, 1, "decrypt", "--aad", "order-17", NULL);
    assert_int_equal(t.out_len, 0);
    kr_out_free(&t);
    run_expect(n, ct.out, 10, &t, 1, "decrypt", NULL);
    assert_int_equal(t.out_len, 0);
    kr_out_free(&t);
    /* a header naming another (valid) key does not open */
    char *other = create_cli(n, "enc-2", "aes-256", NULL, NULL);
    memcpy(ct.out + 4, other, ID_LEN);
    run_fails(n, ct.out, ct.out_len, "KR_EAUTH", "decrypt", "--aad", "order-17", NULL);
    memcpy(ct.out + 4, id, ID_LEN);
    /* intact again: decrypts */
    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", "--aad", "order-17", NULL);
    kr_out_free(&o);

    /* the node's ciphertext is standard AES-256-GCM under the exported key */
    size_t klen = 0;
    uint8_t *key = export_cli(n, id, &klen);
    uint8_t pt[64];
    size_t pt_len = 0;
    assert_int_equal(ossl_gcm_open(key, klen, ct.out, ct.out_len, (const uint8_t *)"order-17", 8,
                                   pt, &pt_len),
                     0);
    assert_memory_equal(pt, msg, strlen(msg));
    free(key);
    kr_out_free(&ct);

    /* two encryptions of the same plaintext differ (fresh nonce) */
    struct kr_out c1, c2;
    run_expect(n, msg, strlen(msg), &c1, 0, "encrypt", id, NULL);
    run_expect(n, msg, strlen(msg), &c2, 0, "encrypt", id, NULL);
    assert_int_equal(c1.out_len, c2.out_len);
    assert_memory_not_equal(c1.out + BLOB_HDR, c2.out + BLOB_HDR, GCM_NONCE);
    kr_out_free(&c1);
    kr_out_free(&c2);

    /* 1 MB round trip */
    size_t big_len = 1024 * 1024;
    uint8_t *big = malloc(big_len);
    assert_non_null(big);
    RAND_bytes(big, (int)big_len);
    run_expect(n, big, big_len, &ct, 0, "encrypt", "name:enc-1", NULL);
    assert_int_equal(ct.out_len, BLOB_HDR + GCM_NONCE + big_len + GCM_TAG);
    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, big_len);
    assert_memory_equal(o.out, big, big_len);
    kr_out_free(&o);
    kr_out_free(&ct);

    /* the library: 1 MB with AAD, and a wrong AAD */
    kr_buf lct = {0}, lpt = {0};
    assert_int_equal(kr_encrypt(f->c, id, big, big_len, (const uint8_t *)"a", 1, &lct), 0);
    assert_int_equal(kr_decrypt(f->c, lct.data, lct.len, (const uint8_t *)"a", 1, &lpt), 0);
    assert_int_equal(lpt.len, big_len);
    assert_memory_equal(lpt.data, big, big_len);
    kr_buf_free(&lpt);
    assert_int_equal(kr_decrypt(f->c, lct.data, lct.len, (const uint8_t *)"b", 1, &lpt), KR_EAUTH);
    assert_null(lpt.data);
    kr_buf_free(&lct);
    free(big);

    /* empty plaintext round trip */
    run_expect(n, NULL, 0, &ct, 0, "encrypt", id, NULL);
    assert_int_equal(ct.out_len, BLOB_HDR + GCM_NONCE + GCM_TAG);
    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, 0);
    kr_out_free(&o);
    kr_out_free(&ct);
    assert_int_equal(kr_encrypt(f->c, id, NULL, 0, NULL, 0, &lct), 0);
    assert_int_equal(kr_decrypt(f->c, lct.data, lct.len, NULL, 0, &lpt), 0);
    assert_int_equal(lpt.len, 0);
    kr_buf_free(&lct);
    kr_buf_free(&lpt);

    /* an input over the frame limit is refused locally, not sent */
    size_t huge_len = KR_MAX_FRAME;
    uint8_t *huge = calloc(1, huge_len);
    assert_non_null(huge);
    run_fails(n, huge, huge_len, "KR_ETOOBIG", "encrypt", id, NULL);
    free(huge);

    /* --json encrypt carries key id and version; decrypt gives plaintext b64 */
    kr_json *j = run_json(n, "json", 4, "encrypt", id, NULL);
    size_t jl = 0;
    uint8_t *jct = jb64(j, "ciphertext", &jl);
    kr_json_free(j);
    j = run_json(n, jct, jl, "decrypt", NULL);
    size_t pl = 0;
    uint8_t *jpt = jb64(j, "plaintext", &pl);
    assert_int_equal(pl, 4);
    assert_memory_equal(jpt, "json", 4);
    assert_string_equal(jstr(j, "key_id"), id);
    kr_json_free(j);
    free(jct);
    free(jpt);

    /* garbage is not a ciphertext */
    run_fails(n, "hello, world, this is not a ciphertext at all......", 52, "KR_EINVAL",
              "decrypt", NULL);
    /* wrong key types */
    char *h = create_cli(n, "enc-hmac", "hmac-sha256", NULL, NULL);
    run_fails(n, msg, strlen(msg), "KR_EKEYTYPE", "encrypt", h, NULL);
    char *e = create_cli(n, "enc-ec", "ec-p256", NULL, NULL);
    run_fails(n, msg, strlen(msg), "KR_EKEYTYPE", "encrypt", e, NULL);
    /* unknown key */
    run_fails(n, msg, strlen(msg), "KR_ENOTFOUND", "encrypt", "name:enc-no-such", NULL);
    assert_int_equal(kr_encrypt(f->c, "00000000000000000000000000000000", (const uint8_t *)"x", 1,
                                NULL, 0, &lct),
                     KR_ENOTFOUND);
    free(h);
    free(e);
    free(other);
    free(id);
}

/* ---- sign / verify / mac ---------------------------------------------------------------- */

static void sign_verify_one(struct fixture *f, const char *alg)
{
    const struct kr_node *n = &f->node;
    char name[64], path[KR_PATH_MAX], bad_path[KR_PATH_MAX];
    const char *msg = "the message to sign";
    const char *msg2 = "the message to sigN";
    struct kr_out sig, o;

    snprintf(name, sizeof(name), "sv-%s", alg);
    char *id = create_cli(n, name, alg, NULL, NULL);
    run_expect(n, msg, strlen(msg), &sig, 0, "sign", id, NULL);
    assert_int_equal(check_blob(sig.out, sig.out_len, 's', id), 1);
    assert_int_equal(kr_scratch_file(&f->node, name, sig.out, sig.out_len, path, sizeof(path)), 0);

    /* the raw signature verifies with OpenSSL and the advertised key */
    EVP_PKEY *pub = public_key_of(n, id);
    if (!ossl_verify(pub, alg, (const uint8_t *)msg, strlen(msg), sig.out + BLOB_HDR,
                     sig.out_len - BLOB_HDR)) {
        print_error("%s: OpenSSL rejects the node's signature\n", alg);
        fail();
    }
    EVP_PKEY_free(pub);

    run_expect(n, msg, strlen(msg), &o, 0, "verify", id, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "valid\n");
    kr_out_free(&o);
    run_expect(n, msg2, strlen(msg2), &o, 1, "verify", id, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "invalid\n");
    kr_out_free(&o);
    kr_json *j = run_json(n, msg, strlen(msg), "verify", id, "--sig", path, NULL);
    assert_true(jbool(j, "valid"));
    kr_json_free(j);

    /* a flipped signature byte: invalid */
    sig.out[sig.out_len - 5] ^= 0x10;
    assert_int_equal(kr_scratch_file(&f->node, "bad.sig", sig.out, sig.out_len, bad_path,
                                     sizeof(bad_path)),
                     0);
    run_expect(n, msg, strlen(msg), &o, 1, "verify", id, "--sig", bad_path, NULL);
    assert_string_equal((const char *)o.out, "invalid\n");
    kr_out_free(&o);
    sig.out[sig.out_len - 5] ^= 0x10;

    /* the library */
    kr_buf ls = {0};
    int valid = -1;
    assert_int_equal(kr_sign(f->c, id, (const uint8_t *)msg, strlen(msg), &ls), 0);
    assert_int_equal(check_blob(ls.data, ls.len, 's', id), 1);
    assert_int_equal(kr_verify(f->c, id, (const uint8_t *)msg, strlen(msg), ls.data, ls.len,
                               &valid),
                     0);
    assert_int_equal(valid, 1);
    valid = -1;
    assert_int_equal(kr_verify(f->c, id, (const uint8_t *)msg2, strlen(msg2), ls.data, ls.len,
                               &valid),
                     0);
    assert_int_equal(valid, 0);
    /* the CLI's signature verifies through the library too */
    valid = -1;
    assert_int_equal(kr_verify(f->c, id, (const uint8_t *)msg, strlen(msg), sig.out, sig.out_len,
                               &valid),
                     0);
    assert_int_equal(valid, 1);
    kr_buf_free(&ls);
    kr_out_free(&sig);
    free(id);
}

static void test_sign_verify(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out o;
    char path[KR_PATH_MAX];

    sign_verify_one(f, "rsa-2048");
    sign_verify_one(f, "ec-p256");
    sign_verify_one(f, "ec-p384");
    sign_verify_one(f, "ed25519");

    /* a signature by one key does not verify under another */
    char *k2 = create_cli(n, "sv-other", "ec-p256", NULL, NULL);
    run_expect(n, "m", 1, &o, 0, "sign", "name:sv-ec-p256", NULL);
    assert_int_equal(kr_scratch_file(&f->node, "x.sig", o.out, o.out_len, path, sizeof(path)), 0);
    kr_out_free(&o);
    run_expect(n, "m", 1, &o, 1, "verify", k2, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "invalid\n");
    kr_out_free(&o);

    /* The node keeps parsed signing keys: a rotation signs with version 2
     * at once, and a deactivated key signs no more. */
    char *rk = create_cli(n, "sv-rotating", "ec-p256", NULL, NULL);
    kr_buf rs = {0};
    assert_int_equal(kr_sign(f->c, rk, (const uint8_t *)"m", 1, &rs), 0);
    assert_int_equal(check_blob(rs.data, rs.len, 's', rk), 1);
    kr_buf_free(&rs);
    run_expect(n, NULL, 0, &o, 0, "rotate", rk, NULL);
    kr_out_free(&o);
    assert_int_equal(kr_sign(f->c, rk, (const uint8_t *)"m", 1, &rs), 0);
    assert_int_equal(check_blob(rs.data, rs.len, 's', rk), 2);
    int rvalid = -1;
    assert_int_equal(kr_verify(f->c, rk, (const uint8_t *)"m", 1, rs.data, rs.len, &rvalid), 0);
    assert_int_equal(rvalid, 1);
    kr_buf_free(&rs);
    run_expect(n, NULL, 0, &o, 0, "deactivate", rk, NULL);
    kr_out_free(&o);
    assert_int_equal(kr_sign(f->c, rk, (const uint8_t *)"m", 1, &rs), KR_ESTATE);
    free(rk);

    /* wrong key types */
    char *a = create_cli(n, "sv-aes", "aes-256", NULL, NULL);
    run_fails(n, "m", 1, "KR_EKEYTYPE", "sign", a, NULL);
    run_fails(n, "m", 1, "KR_EKEYTYPE", "sign", "name:all-hmac-sha256", NULL);
    kr_buf ls = {0};
    assert_int_equal(kr_sign(f->c, a, (const uint8_t *)"m", 1, &ls), KR_EKEYTYPE);
    assert_non_null(strstr(kr_client_last_error(f->c), a));
    /* verify without --sig is a usage error */
    run_expect(n, "m", 1, &o, 2, "verify", k2, NULL);
    kr_out_free(&o);
    free(a);
    free(k2);
}

static void test_mac(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    static const char *const algs[] = {"hmac-sha256", "hmac-sha512"};
    const char *msg = "mac this";
    char path[KR_PATH_MAX], name[64];
    struct kr_out mac, o;

    for (size_t i = 0; i < 2; i++) {
        snprintf(name, sizeof(name), "mac-%s", algs[i]);
        char *id = create_cli(n, name, algs[i], NULL, NULL);
        run_expect(n, msg, strlen(msg), &mac, 0, "mac", id, NULL);
        assert_int_equal(check_blob(mac.out, mac.out_len, 'm', id), 1);
        assert_int_equal(mac.out_len - BLOB_HDR, i == 0 ? 32 : 64);
        /* HMAC under the exported key */
        size_t klen = 0, ml = 0;
        uint8_t *key = export_cli(n, id, &klen), local[64];
        assert_non_null(EVP_Q_mac(NULL, "HMAC", NULL, i == 0 ? "SHA256" : "SHA512", NULL, key,
                                  klen, (const uint8_t *)msg, strlen(msg), local, sizeof(local),
                                  &ml));
        assert_memory_equal(mac.out + BLOB_HDR, local, ml);
        free(key);

        assert_int_equal(kr_scratch_file(&f->node, name, mac.out, mac.out_len, path,
                                         sizeof(path)),
                         0);
        run_expect(n, msg, strlen(msg), &o, 0, "verify-mac", id, "--mac", path, NULL);
        assert_string_equal((const char *)o.out, "valid\n");
        kr_out_free(&o);
        run_expect(n, "mac thiS", 8, &o, 1, "verify-mac", id, "--mac", path, NULL);
        assert_string_equal((const char *)o.out, "invalid\n");
        kr_out_free(&o);
        mac.out[mac.out_len - 1] ^= 1;
        assert_int_equal(kr_scratch_file(&f->node, name, mac.out, mac.out_len, path,
                                         sizeof(path)),
                         0);
        run_expect(n, msg, strlen(msg), &o, 1, "verify-mac", id, "--mac", path, NULL);
        assert_string_equal((const char *)o.out, "invalid\n");
        kr_out_free(&o);
        mac.out[mac.out_len - 1] ^= 1;

        /* library, hand-built mac and verify_mac */
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        Keyraft__SignRequest sr = KEYRAFT__SIGN_REQUEST__INIT;
        Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
        ref.id = id;
        sr.key = &ref;
        sr.message.data = (uint8_t *)msg;
        sr.message.len = strlen(msg);
        req.op_case = KEYRAFT__REQUEST__OP_MAC;
        req.mac = &sr;
        Keyraft__Response *resp = lib_call(f->c, &req, 0);
        assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_SIGN);
        assert_int_equal(resp->sign->signature.len, mac.out_len);
        assert_memory_equal(resp->sign->signature.data, mac.out, mac.out_len); /* deterministic */
        kr_response_free(resp);
        Keyraft__VerifyRequest vr = KEYRAFT__VERIFY_REQUEST__INIT;
        vr.key = &ref;
        vr.message = sr.message;
        vr.signature.data = mac.out;
        vr.signature.len = mac.out_len;
        Keyraft__Request r2 = KEYRAFT__REQUEST__INIT;
        r2.op_case = KEYRAFT__REQUEST__OP_VERIFY_MAC;
        r2.verify_mac = &vr;
        resp = lib_call(f->c, &r2, 0);
        assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_VERIFY);
        assert_true(resp->verify->valid);
        kr_response_free(resp);

        /* a MAC key does not sign, a signing key does not MAC */
        run_fails(n, msg, strlen(msg), "KR_EKEYTYPE", "sign", id, NULL);
        kr_out_free(&mac);
        free(id);
    }
    run_fails(n, msg, strlen(msg), "KR_EKEYTYPE", "mac", "name:all-aes-256", NULL);
    run_fails(n, msg, strlen(msg), "KR_EKEYTYPE", "mac", "name:all-ed25519", NULL);
}

/* ---- datakey / wrap ---------------------------------------------------------------------- */

static void test_datakey(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out o, d;
    char *id = create_cli(n, "dk-1", "aes-256", NULL, NULL);
    static const char *const bits[] = {NULL, "256", "128"};

    for (size_t i = 0; i < 3; i++) {
        size_t want = i == 2 ? 16 : 32;
        if (bits[i] == NULL)
            run_expect(n, NULL, 0, &o, 0, "datakey", id, NULL);
        else
            run_expect(n, NULL, 0, &o, 0, "datakey", id, "--bits", bits[i], NULL);
        char *pt_line = strstr((char *)o.out, "plaintext: ");
        char *wr_line = strstr((char *)o.out, "wrapped: ");
        assert_non_null(pt_line);
        assert_non_null(wr_line);
        *strchr(pt_line, '\n') = 0;
        *strchr(wr_line, '\n') = 0;
        uint8_t *pt = NULL, *wr = NULL;
        size_t pt_len = 0, wr_len = 0;
        assert_int_equal(kr_b64_decode(pt_line + 11, &pt, &pt_len), 0);
        assert_int_equal(kr_b64_decode(wr_line + 9, &wr, &wr_len), 0);
        assert_int_equal(pt_len, want);
        assert_int_equal(check_blob(wr, wr_len, 'c', id), 1);
        run_expect(n, wr, wr_len, &d, 0, "decrypt", NULL);
        assert_int_equal(d.out_len, want);
        assert_memory_equal(d.out, pt, want);
        kr_out_free(&d);
        kr_out_free(&o);
        free(pt);
        free(wr);
    }

    /* with --aad the wrapped form needs it; --json */
    kr_json *j = run_json(n, NULL, 0, "datakey", id, "--aad", "tenant-9", NULL);
    size_t pl = 0, wl = 0;
    uint8_t *pt = jb64(j, "plaintext", &pl), *wr = jb64(j, "wrapped", &wl);
    assert_int_equal(pl, 32);
    assert_string_equal(jstr(j, "key_id"), id);
    assert_int_equal(jint(j, "version"), 1);
    kr_json_free(j);
    run_fails(n, wr, wl, "KR_EAUTH", "decrypt", NULL);
    run_expect(n, wr, wl, &d, 0, "decrypt", "--aad", "tenant-9", NULL);
    assert_int_equal(d.out_len, 32);
    assert_memory_equal(d.out, pt, 32);
    kr_out_free(&d);
    free(pt);
    free(wr);

    /* two data keys differ */
    kr_json *a = run_json(n, NULL, 0, "datakey", id, NULL);
    kr_json *b = run_json(n, NULL, 0, "datakey", id, NULL);
    assert_string_not_equal(jstr(a, "plaintext"), jstr(b, "plaintext"));
    kr_json_free(a);
    kr_json_free(b);

    run_expect(n, NULL, 0, &o, 2, "datakey", id, "--bits", "64", NULL);
    kr_out_free(&o);

    /* library, hand-built */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__DataKeyRequest dr = KEYRAFT__DATA_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.id = id;
    dr.key = &ref;
    dr.bits = 128;
    req.op_case = KEYRAFT__REQUEST__OP_DATA_KEY;
    req.data_key = &dr;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->data_key->plaintext.len, 16);
    kr_buf back = {0};
    assert_int_equal(kr_decrypt(f->c, resp->data_key->wrapped.data, resp->data_key->wrapped.len,
                                NULL, 0, &back),
                     0);
    assert_int_equal(back.len, 16);
    assert_memory_equal(back.data, resp->data_key->plaintext.data, 16);
    kr_buf_free(&back);
    kr_response_free(resp);
    dr.bits = 100;
    resp = lib_call(f->c, &req, KR_EINVAL);
    kr_response_free(resp);
    /* an HMAC key makes no data keys */
    ref.id = "";
    ref.name = "all-hmac-sha512";
    dr.bits = 256;
    resp = lib_call(f->c, &req, KR_EKEYTYPE);
    kr_response_free(resp);
    free(id);
}

static void test_wrap_unwrap(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out w, o;
    uint8_t material[40];
    char *id = create_cli(n, "wr-1", "aes-256", NULL, NULL);

    RAND_bytes(material, sizeof(material));
    run_expect(n, material, sizeof(material), &w, 0, "wrap", id, NULL);
    assert_int_equal(check_blob(w.out, w.out_len, 'w', id), 1);

    /* RFC 5649 under the exported key, checked with OpenSSL */
    size_t klen = 0;
    uint8_t *key = export_cli(n, id, &klen);
    EVP_CIPHER_CTX *cx = EVP_CIPHER_CTX_new();
    uint8_t out[128];
    int ol = 0, fl = 0;
    assert_int_equal(EVP_DecryptInit_ex2(cx, EVP_aes_256_wrap_pad(), key, NULL, NULL), 1);
    assert_int_equal(EVP_DecryptUpdate(cx, out, &ol, w.out + BLOB_HDR,
                                       (int)(w.out_len - BLOB_HDR)),
                     1);
    assert_int_equal(EVP_DecryptFinal_ex(cx, out + ol, &fl), 1);
    EVP_CIPHER_CTX_free(cx);
    assert_int_equal(ol + fl, sizeof(material));
    assert_memory_equal(out, material, sizeof(material));
    free(key);

    run_expect(n, w.out, w.out_len, &o, 0, "unwrap", id, NULL);
    assert_int_equal(o.out_len, sizeof(material));
    assert_memory_equal(o.out, material, sizeof(material));
    kr_out_free(&o);

    /* tampered: KR_EAUTH, and no material on stdout */
    w.out[w.out_len - 3] ^= 0x04;
    run_fails(n, w.out, w.out_len, "KR_EAUTH", "unwrap", id, NULL);
    w.out[w.out_len - 3] ^= 0x04;
    /* unwrap under a key other than the one named in the blob */
    char *other = create_cli(n, "wr-2", "aes-256", NULL, NULL);
    run_fails(n, w.out, w.out_len, "KR_EAUTH", "unwrap", other, NULL);
    /* wrong key types and empty input */
    char *e = create_cli(n, "wr-ec", "ec-p384", NULL, NULL);
    run_fails(n, material, sizeof(material), "KR_EKEYTYPE", "wrap", e, NULL);
    run_fails(n, NULL, 0, "KR_EINVAL", "wrap", id, NULL);

    /* library, hand-built wrap and unwrap */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__WrapRequest wr = KEYRAFT__WRAP_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.name = "wr-1";
    wr.key = &ref;
    wr.material.data = material;
    wr.material.len = 17; /* not a multiple of 8: the padding case */
    req.op_case = KEYRAFT__REQUEST__OP_WRAP;
    req.wrap = &wr;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_string_equal(resp->wrap->key_id, id);
    Keyraft__UnwrapRequest ur = KEYRAFT__UNWRAP_REQUEST__INIT;
    ur.key = &ref;
    ur.wrapped = resp->wrap->wrapped;
    Keyraft__Request r2 = KEYRAFT__REQUEST__INIT;
    r2.op_case = KEYRAFT__REQUEST__OP_UNWRAP;
    r2.unwrap = &ur;
    Keyraft__Response *resp2 = lib_call(f->c, &r2, 0);
    assert_int_equal(resp2->unwrap->material.len, 17);
    assert_memory_equal(resp2->unwrap->material.data, material, 17);
    kr_response_free(resp2);
    kr_response_free(resp);
    kr_out_free(&w);
    free(other);
    free(e);
    free(id);
}

/* ---- random / status / not found ----------------------------------------------------------- */

static void test_random_status(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out a, b, o;

    run_expect(n, NULL, 0, &a, 0, "random", "32", NULL);
    run_expect(n, NULL, 0, &b, 0, "random", "32", NULL);
    assert_int_equal(a.out_len, 32);
    assert_int_equal(b.out_len, 32);
    assert_memory_not_equal(a.out, b.out, 32);
    kr_out_free(&a);
    kr_out_free(&b);
    run_expect(n, NULL, 0, &o, 0, "random", "16", "--hex", NULL);
    assert_int_equal(o.out_len, 33);
    assert_true(kr_is_hex((const char *)o.out, 32));
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "random", "65536", NULL);
    assert_int_equal(o.out_len, 65536);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "random", "0", NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 2, "random", "-5", NULL);
    kr_out_free(&o);

    kr_buf r1 = {0}, r2 = {0};
    assert_int_equal(kr_random(f->c, 32, &r1), 0);
    assert_int_equal(kr_random(f->c, 32, &r2), 0);
    assert_int_equal(r1.len, 32);
    assert_memory_not_equal(r1.data, r2.data, 32);
    kr_buf_free(&r1);
    kr_buf_free(&r2);

    run_expect(n, NULL, 0, &o, 0, "status", NULL);
    assert_non_null(strstr((const char *)o.out, "role: leader\n"));
    kr_out_free(&o);
    kr_json *j = run_json(n, NULL, 0, "status", NULL);
    assert_string_equal(jstr(j, "role"), "leader");
    assert_string_equal(jstr(j, "principal"), "app");
    assert_int_equal(jint(j, "node_id"), 1);
    assert_true(jint(j, "key_count") > 0);
    assert_true(jint(j, "commit_index") >= jint(j, "applied_index") - 0);
    kr_json_free(j);

    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StatusRequest sr = KEYRAFT__STATUS_REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_STATUS;
    req.status = &sr;
    Keyraft__Response *resp = lib_call(f->c, &req, 0);
    assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_NODE_STATUS);
    assert_string_equal(resp->node_status->role, "leader");
    assert_int_equal(resp->node_status->leader_id, 1);
    kr_response_free(resp);

    /* unknown keys, by id and by name, through CLI and library */
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "get", "0000ffffffffffffffffffffffffffff", NULL);
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "get", "--name", "no-such-key", NULL);
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "get", "not-an-id", NULL);
    Keyraft__KeyAttributes *attrs = NULL;
    assert_int_equal(kr_get_key(f->c, "name:no-such-key", &attrs), KR_ENOTFOUND);
    assert_null(attrs);
    /* a request naming no operation is refused by the library before it is
     * sent (test_badinput sends one raw to check the node's side) */
    Keyraft__Request empty = KEYRAFT__REQUEST__INIT;
    resp = NULL;
    assert_int_equal(kr_call(f->c, &empty, &resp), KR_EINVAL);
    assert_null(resp);
}

/* ---- what each state allows (SP 800-57: deactivated/compromised still process) -------- */

static void test_state_matrix(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    struct kr_out o, ct, sig, wr;
    char path[KR_PATH_MAX];
    const char *msg = "matrix";

    /* pre-active: nothing protects, but rotate is allowed and keeps the state */
    char *pa = create_cli(n, "sm-pre", "aes-256", "--pre-active", NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "datakey", pa, NULL);
    run_fails(n, "k", 1, "KR_ESTATE", "wrap", pa, NULL);
    run_expect(n, NULL, 0, &o, 0, "rotate", pa, NULL);
    kr_out_free(&o);
    kr_json *j = run_json(n, NULL, 0, "get", pa, NULL);
    assert_string_equal(jstr(j, "state"), "pre-active");
    assert_int_equal(jint(j, "current_version"), 2);
    kr_json_free(j);
    char *pe = create_cli(n, "sm-pre-ec", "ec-p256", "--pre-active", NULL);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "sign", pe, NULL);

    /* deactivated: verify, decrypt, unwrap yes; sign, encrypt, wrap no */
    char *ek = create_cli(n, "sm-ec", "ec-p256", NULL, NULL);
    char *ak = create_cli(n, "sm-aes", "aes-256", NULL, NULL);
    run_expect(n, msg, strlen(msg), &sig, 0, "sign", ek, NULL);
    run_expect(n, msg, strlen(msg), &ct, 0, "encrypt", ak, NULL);
    run_expect(n, "0123456789abcdef", 16, &wr, 0, "wrap", ak, NULL);
    assert_int_equal(kr_scratch_file(&f->node, "sm.sig", sig.out, sig.out_len, path, sizeof(path)),
                     0);
    run_expect(n, NULL, 0, &o, 0, "deactivate", ek, NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "deactivate", ak, NULL);
    kr_out_free(&o);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "sign", ek, NULL);
    run_expect(n, msg, strlen(msg), &o, 0, "verify", ek, "--sig", path, NULL);
    assert_string_equal((const char *)o.out, "valid\n");
    kr_out_free(&o);
    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", NULL);
    kr_out_free(&o);
    run_expect(n, wr.out, wr.out_len, &o, 0, "unwrap", ak, NULL);
    assert_int_equal(o.out_len, 16);
    kr_out_free(&o);
    run_fails(n, "k", 1, "KR_ESTATE", "wrap", ak, NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "rotate", ak, NULL);

    /* compromised: still processes, never protects */
    run_expect(n, NULL, 0, &o, 0, "revoke", ak, "--reason", "compromised", NULL);
    kr_out_free(&o);
    run_expect(n, ct.out, ct.out_len, &o, 0, "decrypt", NULL);
    assert_int_equal(o.out_len, strlen(msg));
    kr_out_free(&o);
    run_fails(n, NULL, 0, "KR_ESTATE", "datakey", ak, NULL);

    /* destroyed: nothing, not even verify */
    run_expect(n, NULL, 0, &o, 0, "destroy", ek, NULL);
    kr_out_free(&o);
    run_fails(n, msg, strlen(msg), "KR_ESTATE", "verify", ek, "--sig", path, NULL);
    run_expect(n, NULL, 0, &o, 0, "destroy", ak, NULL);
    kr_out_free(&o);
    run_fails(n, wr.out, wr.out_len, "KR_ESTATE", "unwrap", ak, NULL);
    assert_state(n, ak, "destroyed-compromised");
    /* tombstones cannot be revoked back to life */
    run_fails(n, NULL, 0, "KR_ESTATE", "revoke", ek, "--reason", "compromised", NULL);
    run_fails(n, NULL, 0, "KR_ESTATE", "deactivate", ek, NULL);

    /* an imported key rotates to generated material; version 1 stays the import */
    uint8_t known[32];
    RAND_bytes(known, sizeof(known));
    assert_int_equal(kr_scratch_file(&f->node, "sm.key", known, 32, path, sizeof(path)), 0);
    run_expect(n, NULL, 0, &o, 0, "import", "--name", "sm-imp", "--alg", "aes-256", "--file",
               path, NULL);
    char *ik = strndup((const char *)o.out, ID_LEN);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "rotate", ik, NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "export", ik, "--version", "1", NULL);
    uint8_t *v1 = NULL;
    size_t v1_len = 0;
    assert_int_equal(kr_hex_decode((const char *)o.out, &v1, &v1_len), 0);
    assert_int_equal(v1_len, 32);
    assert_memory_equal(v1, known, 32);
    free(v1);
    kr_out_free(&o);
    size_t v2_len = 0;
    uint8_t *v2 = export_cli(n, ik, &v2_len);
    assert_memory_not_equal(v2, known, 32);
    free(v2);
    /* HMAC key sizes: 16..128 bytes */
    uint8_t hk[129];
    RAND_bytes(hk, sizeof(hk));
    assert_int_equal(kr_scratch_file(&f->node, "hk15", hk, 15, path, sizeof(path)), 0);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "sm-h15", "--alg", "hmac-sha256",
              "--file", path, NULL);
    assert_int_equal(kr_scratch_file(&f->node, "hk129", hk, 129, path, sizeof(path)), 0);
    run_fails(n, NULL, 0, "KR_EINVAL", "import", "--name", "sm-h129", "--alg", "hmac-sha512",
              "--file", path, NULL);
    assert_int_equal(kr_scratch_file(&f->node, "hk16", hk, 16, path, sizeof(path)), 0);
    run_expect(n, NULL, 0, &o, 0, "import", "--name", "sm-h16", "--alg", "hmac-sha256", "--file",
               path, NULL);
    kr_out_free(&o);
    /* get with both an id and --name is a usage error */
    run_expect(n, NULL, 0, &o, 2, "get", ik, "--name", "sm-imp", NULL);
    kr_out_free(&o);

    kr_out_free(&ct);
    kr_out_free(&sig);
    kr_out_free(&wr);
    free(ik);
    free(pa);
    free(pe);
    free(ek);
    free(ak);
}

/* The library follows its endpoint list past a dead node. */
static void test_client_failover(void **state)
{
    struct fixture *f = fx(state);
    kr_client_config cfg = f->node.ccfg;
    kr_client *c = NULL;
    kr_buf r = {0};
    char eps[128];
    struct kr_out o;

    /* port 1 on loopback: connection refused */
    snprintf(eps, sizeof(eps), "127.0.0.1:1,127.0.0.1:%d", f->node.port);
    cfg.endpoints = eps;
    cfg.timeout_ms = 5000;
    assert_int_equal(kr_client_new(&cfg, &c), 0);
    assert_int_equal(kr_random(c, 8, &r), 0);
    assert_int_equal(r.len, 8);
    kr_buf_free(&r);
    kr_client_free(c);
    /* the CLI, with --endpoint overriding the config */
    run_expect(&f->node, NULL, 0, &o, 0, "--endpoint", eps, "status", NULL);
    assert_non_null(strstr((const char *)o.out, "role: leader"));
    kr_out_free(&o);
    /* only dead endpoints: KR_ECONN, promptly */
    kr_cli(&f->node, NULL, 0, &o, "--endpoint", "127.0.0.1:1", "status", NULL);
    KR_ASSERT_FAILS_WITH(&o, "KR_ECONN");
    kr_out_free(&o);
}

/* ---- protocol semantics: idempotency, read-your-writes, limits ------------------------- */

static Keyraft__Response *create_with_rid(kr_client *c, const char *name, const char *rid,
                                          int want)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__CreateKeyRequest cr = KEYRAFT__CREATE_KEY_REQUEST__INIT;

    cr.name = (char *)name;
    cr.algorithm = KEYRAFT__ALGORITHM__AES_256;
    req.request_id = (char *)rid;
    req.op_case = KEYRAFT__REQUEST__OP_CREATE;
    req.create = &cr;
    return lib_call(c, &req, want);
}

/* A retried create (same request id, e.g. after a lost answer) answers with
 * the key the first attempt made: the client cannot tell a duplicate name
 * from its own earlier success otherwise. */
static void test_retry_create(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    char rid[64];

    snprintf(rid, sizeof(rid), "retry-%ld", (long)time(NULL));
    Keyraft__Response *r1 = create_with_rid(f->c, "ps-retry", rid, 0);
    assert_true(r1->commit_index > 0);
    Keyraft__Response *r2 = NULL;
    kr_json *j = run_json(n, NULL, 0, "list", "--prefix", "ps-retry", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    kr_json_free(j);
    r2 = create_with_rid(f->c, "ps-retry", rid, 0);
    assert_string_equal(r1->key->id, r2->key->id);
    kr_response_free(r2);
    /* Another request for the name is refused, its retry too; the first
     * request's retries still get their key (the node looks for a retry's
     * outcome once a check refuses it). */
    char other[64];
    snprintf(other, sizeof(other), "other-%ld", (long)time(NULL));
    for (int i = 0; i < 2; i++) {
        r2 = create_with_rid(f->c, "ps-retry", other, KR_EEXIST);
        assert_non_null(strstr(r2->message, "already exists"));
        kr_response_free(r2);
        r2 = create_with_rid(f->c, "ps-retry", rid, 0);
        assert_string_equal(r1->key->id, r2->key->id);
        kr_response_free(r2);
    }
    kr_response_free(r1);
    j = run_json(n, NULL, 0, "list", "--prefix", "ps-retry", NULL);
    assert_int_equal(kr_json_len(kr_json_get(j, "keys")), 1);
    kr_json_free(j);

    /* A retried import likewise answers with the first attempt's key. */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ImportKeyRequest im = KEYRAFT__IMPORT_KEY_REQUEST__INIT;
    uint8_t material[32];
    memset(material, 0x42, sizeof(material));
    char irid[64];
    snprintf(irid, sizeof(irid), "import-%ld", (long)time(NULL));
    im.name = (char *)"ps-retry-import";
    im.algorithm = KEYRAFT__ALGORITHM__AES_256;
    im.material.data = material;
    im.material.len = sizeof(material);
    req.request_id = irid;
    req.op_case = KEYRAFT__REQUEST__OP_IMPORT;
    req.import = &im;
    Keyraft__Response *i1 = lib_call(f->c, &req, 0);
    im.material.data = material; /* the client may have wiped its copy */
    memset(material, 0x42, sizeof(material));
    Keyraft__Response *i2 = lib_call(f->c, &req, 0);
    assert_string_equal(i1->key->id, i2->key->id);
    kr_response_free(i1);
    kr_response_free(i2);
}

static void test_protocol_semantics(void **state)
{
    struct fixture *f = fx(state);
    const struct kr_node *n = &f->node;
    char rid[64];
    Keyraft__KeyAttributes *made = NULL;

    assert_int_equal(kr_create_key(f->c, "ps-rot", KEYRAFT__ALGORITHM__AES_256, NULL, 0, &made),
                     0);

    /* a retried rotate rotates once */
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StateChangeRequest sc = KEYRAFT__STATE_CHANGE_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    ref.id = made->id;
    sc.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_ROTATE;
    req.rotate = &sc;
    snprintf(rid, sizeof(rid), "rot-%ld", (long)time(NULL));
    req.request_id = rid;
    Keyraft__Response *a = lib_call(f->c, &req, 0);
    Keyraft__Response *b = lib_call(f->c, &req, 0);
    assert_int_equal(a->key->current_version, 2);
    assert_int_equal(b->key->current_version, 2);
    kr_response_free(a);
    kr_response_free(b);
    Keyraft__KeyAttributes *attrs = NULL;
    assert_int_equal(kr_get_key(f->c, made->id, &attrs), 0);
    assert_int_equal(attrs->current_version, 2);
    assert_int_equal(attrs->n_versions, 2);
    kr_key_attributes_free(attrs);
    kr_key_attributes_free(made);

    /* the client remembers the index of its last write */
    uint64_t before = kr_client_last_index(f->c);
    assert_int_equal(kr_create_key(f->c, "ps-index", KEYRAFT__ALGORITHM__AES_128, NULL, 0, &attrs),
                     0);
    assert_true(kr_client_last_index(f->c) > before);
    assert_int_equal(attrs->commit_index, kr_client_last_index(f->c));
    kr_key_attributes_free(attrs);

    /* a read needing an index the node has not reached: refused once the
     * node's bounded wait (5 s) is over, saying why. One attempt (kr_send):
     * kr_call would ask again until its own deadline. */
    Keyraft__Request g = KEYRAFT__REQUEST__INIT;
    Keyraft__GetKeyRequest gr = KEYRAFT__GET_KEY_REQUEST__INIT;
    Keyraft__KeyRef gref = KEYRAFT__KEY_REF__INIT;
    gref.name = "ps-index";
    gr.key = &gref;
    g.op_case = KEYRAFT__REQUEST__OP_GET;
    g.get = &gr;
    g.min_index = 1000000000ULL;
    Keyraft__Response *resp = NULL;
    uint64_t asked_ms = kc_now_ms();
    assert_int_equal(kr_send(f->c, &g), 0);
    assert_int_equal(kr_recv(f->c, &resp), 0);
    uint64_t waited_ms = kc_now_ms() - asked_ms;
    assert_int_equal(resp->status, KR_EUNAVAIL);
    assert_non_null(resp->message);
    assert_non_null(strstr(resp->message, "the request needs 1000000000"));
    if (waited_ms < 4500 || waited_ms > 10000)
        fail_msg("refused after %llu ms, want the node's 5 s wait", (unsigned long long)waited_ms);
    kr_response_free(resp);

    /* limits: 64 tags fit, 65 do not; names up to 256 printable characters */
    Keyraft__Tag tag_items[65];
    const Keyraft__Tag *tags[65];
    char keys[65][8];
    for (int i = 0; i < 65; i++) {
        keyraft__tag__init(&tag_items[i]);
        snprintf(keys[i], sizeof(keys[i]), "t%d", i);
        tag_items[i].key = keys[i];
        tag_items[i].value = i == 0 ? "" : "v";
        tags[i] = &tag_items[i];
    }
    assert_int_equal(kr_create_key(f->c, "ps-tags64", KEYRAFT__ALGORITHM__AES_128, tags, 64,
                                   &attrs),
                     0);
    assert_int_equal(attrs->n_tags, 64);
    assert_string_equal(attrs->tags[0]->value, "");
    kr_key_attributes_free(attrs);
    attrs = NULL;
    assert_int_equal(kr_create_key(f->c, "ps-tags65", KEYRAFT__ALGORITHM__AES_128, tags, 65,
                                   &attrs),
                     KR_EINVAL);
    char longname[300];
    memset(longname, 'L', sizeof(longname));
    longname[256] = 0;
    assert_int_equal(kr_create_key(f->c, longname, KEYRAFT__ALGORITHM__AES_128, NULL, 0, &attrs),
                     0);
    kr_key_attributes_free(attrs);
    longname[256] = 'L';
    longname[257] = 0;
    assert_int_equal(kr_create_key(f->c, longname, KEYRAFT__ALGORITHM__AES_128, NULL, 0, &attrs),
                     KR_EINVAL);
    assert_int_equal(kr_create_key(f->c, "bad\nname", KEYRAFT__ALGORITHM__AES_128, NULL, 0, &attrs),
                     KR_EINVAL);
    assert_int_equal(kr_create_key(f->c, "ps-noalg", KEYRAFT__ALGORITHM__ALG_UNSPECIFIED, NULL, 0,
                                   &attrs),
                     KR_EINVAL);
    assert_int_equal(kr_create_key(f->c, "ps-badalg", (Keyraft__Algorithm)42, NULL, 0, &attrs),
                     KR_EINVAL);
    run_fails(n, NULL, 0, "KR_ENOTFOUND", "get", "name:ps-tags65", NULL);
}

/* ---- durability --------------------------------------------------------------------------- */

/* `get --json` of each id, concatenated: the exact bytes to compare. */
static char *snapshot(const struct kr_node *n, char ids[][ID_LEN + 1], int count)
{
    size_t cap = 4096, len = 0;
    char *all = malloc(cap);

    assert_non_null(all);
    all[0] = 0;
    for (int i = 0; i < count; i++) {
        struct kr_out o;
        run_expect(n, NULL, 0, &o, 0, "get", ids[i], "--json", NULL);
        while (len + o.out_len + 1 > cap) {
            cap *= 2;
            all = realloc(all, cap);
            assert_non_null(all);
        }
        memcpy(all + len, o.out, o.out_len + 1);
        len += o.out_len;
        kr_out_free(&o);
    }
    return all;
}

/* `list --prefix P --json` in one page: the exact bytes to compare. */
static char *list_snapshot(const struct kr_node *n, const char *prefix)
{
    struct kr_out o;

    run_expect(n, NULL, 0, &o, 0, "list", "--prefix", prefix, "--limit", "1000", "--json", NULL);
    char *s = strdup((const char *)o.out);
    assert_non_null(s);
    assert_non_null(strstr(s, "\"next_cursor\": \"\""));
    kr_out_free(&o);
    return s;
}

static void assert_same_snapshot(const char *before, const char *after, const char *when)
{
    if (strcmp(before, after) != 0) {
        size_t i = 0;
        while (before[i] != 0 && before[i] == after[i])
            i++;
        size_t from = i > 200 ? i - 200 : 0;
        print_error("%s: get --json differs at byte %zu\nbefore: ...%.400s\nafter:  ...%.400s\n",
                    when, i, before + from, after + from);
        fail();
    }
}

static int count_prefix(const struct kr_node *n, const char *prefix, int *dups)
{
    kr_json *j = run_json(n, NULL, 0, "list", "--prefix", prefix, "--limit", "1000", NULL);
    const kr_json *keys = kr_json_get(j, "keys");
    size_t k = kr_json_len(keys);

    *dups = 0;
    for (size_t a = 0; a < k; a++)
        for (size_t b = a + 1; b < k; b++) {
            const kr_json *x = kr_json_at(keys, a), *y = kr_json_at(keys, b);
            if (strcmp(kr_json_str(kr_json_get(x, "name")), kr_json_str(kr_json_get(y, "name"))) ==
                    0 ||
                strcmp(kr_json_str(kr_json_get(x, "id")), kr_json_str(kr_json_get(y, "id"))) == 0)
                (*dups)++;
        }
    assert_string_equal(jstr(j, "next_cursor"), "");
    kr_json_free(j);
    return (int)k;
}

/* The attributes as bytes, without the usage counters (which grow with use). */
static uint8_t *pack_attrs(Keyraft__KeyAttributes *a, size_t *len)
{
    for (size_t i = 0; i < a->n_versions; i++)
        a->versions[i]->encryptions = 0;
    *len = keyraft__key_attributes__get_packed_size(a);
    uint8_t *b = malloc(*len + 1);
    assert_non_null(b);
    keyraft__key_attributes__pack(a, b);
    return b;
}

static void test_durability_kill9(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    char ids[40][ID_LEN + 1], name[32];
    Keyraft__KeyAttributes *created[30];
    static const Keyraft__Algorithm algs[] = {KEYRAFT__ALGORITHM__AES_256,
                                              KEYRAFT__ALGORITHM__EC_P256,
                                              KEYRAFT__ALGORITHM__HMAC_SHA256,
                                              KEYRAFT__ALGORITHM__ED25519};
    const char *msg = "survives kill -9";
    kr_buf ct = {0};

    for (int i = 0; i < 30; i++) {
        snprintf(name, sizeof(name), "dur-%02d", i);
        created[i] = NULL;
        int rc = kr_create_key(f->c, name, algs[i % 4], NULL, 0, &created[i]);
        if (rc != 0)
            print_error("create %s: %s %s\n", name, kr_status_name(rc), kr_client_last_error(f->c));
        assert_int_equal(rc, 0);
        snprintf(ids[i], sizeof(ids[i]), "%s", created[i]->id);
        if (i == 0)
            assert_int_equal(kr_encrypt(f->c, ids[0], (const uint8_t *)msg, strlen(msg), NULL, 0,
                                        &ct),
                             0);
    }
    /* the 30th create was acknowledged: kill at once */
    assert_int_equal(kr_node_kill9(n), 0);
    kr_client_free(f->c);
    f->c = NULL;
    assert_int_equal(kr_node_start(n), 0);
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);

    /* every acknowledged key is there, with the attributes the create returned */
    for (int i = 0; i < 30; i++) {
        Keyraft__KeyAttributes *got = NULL;
        int rc = kr_get_key(f->c, ids[i], &got);
        if (rc != 0)
            print_error("key %d (%s) lost after kill -9: %s %s\n", i, ids[i], kr_status_name(rc),
                        kr_client_last_error(f->c));
        assert_int_equal(rc, 0);
        size_t la = 0, lb = 0;
        uint8_t *pa = pack_attrs(created[i], &la), *pb = pack_attrs(got, &lb);
        if (la != lb || memcmp(pa, pb, la) != 0) {
            print_error("key %s: attributes after kill -9 differ from the create reply "
                        "(commit_index %llu vs %llu, state %d vs %d, versions %zu vs %zu)\n",
                        ids[i], (unsigned long long)created[i]->commit_index,
                        (unsigned long long)got->commit_index, created[i]->state, got->state,
                        created[i]->n_versions, got->n_versions);
            fail();
        }
        free(pa);
        free(pb);
        kr_key_attributes_free(got);
        kr_key_attributes_free(created[i]);
    }
    /* and usable: the domain key came back */
    kr_buf pt = {0};
    assert_int_equal(kr_decrypt(f->c, ct.data, ct.len, NULL, 0, &pt), 0);
    assert_int_equal(pt.len, strlen(msg));
    assert_memory_equal(pt.data, msg, pt.len);
    kr_buf_free(&pt);

    /* a graceful stop: the whole listing (every attribute of every key, as
     * `list --json` prints it) is identical afterwards */
    char *before = list_snapshot(n, "dur-");
    kr_client_free(f->c);
    f->c = NULL;
    int rc = kr_node_stop(n);
    if (rc != 0) {
        kr_node_dump_log(n, 3000);
        print_error("SIGTERM stop exited %d, want 0\n", rc);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(kr_node_start(n), 0);
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
    char *after = list_snapshot(n, "dur-");
    assert_same_snapshot(before, after, "after SIGTERM + start");
    free(after);

    /* more writes, snapshot, kill -9 right away: identical afterwards */
    for (int i = 30; i < 40; i++) {
        Keyraft__KeyAttributes *a = NULL;
        snprintf(name, sizeof(name), "dur-%02d", i);
        assert_int_equal(kr_create_key(f->c, name, KEYRAFT__ALGORITHM__AES_128, NULL, 0, &a), 0);
        snprintf(ids[i], sizeof(ids[i]), "%s", a->id);
        kr_key_attributes_free(a);
    }
    struct kr_out o;
    run_expect(n, NULL, 0, &o, 0, "rotate", ids[0], NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "deactivate", ids[1], NULL);
    kr_out_free(&o);
    free(before);
    before = snapshot(n, ids, 40);
    assert_int_equal(kr_node_kill9(n), 0);
    assert_int_equal(kr_node_start(n), 0);
    after = snapshot(n, ids, 40);
    assert_same_snapshot(before, after, "after kill -9 + start");
    free(after);
    free(before);
    int dups = 0;
    assert_int_equal(count_prefix(n, "dur-", &dups), 40);
    assert_int_equal(dups, 0);

    /* the old ciphertext still decrypts; the rotated key uses v2 */
    kr_client_free(f->c);
    f->c = NULL;
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
    assert_int_equal(kr_decrypt(f->c, ct.data, ct.len, NULL, 0, &pt), 0);
    kr_buf_free(&pt);
    kr_buf_free(&ct);
    assert_int_equal(kr_encrypt(f->c, ids[0], (const uint8_t *)"x", 1, NULL, 0, &ct), 0);
    assert_int_equal(check_blob(ct.data, ct.len, 'c', ids[0]), 2);
    kr_buf_free(&ct);
}

/* Sends |count| creates "PREFIX-NNN" pipelined on one connection (ids
 * 1..count); nothing is read. */
static void send_creates(struct kr_tls *t, const char *prefix, int count)
{
    for (int i = 0; i < count; i++) {
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        Keyraft__CreateKeyRequest cr = KEYRAFT__CREATE_KEY_REQUEST__INIT;
        char name[64], rid[80];
        snprintf(name, sizeof(name), "%s-%03d", prefix, i);
        snprintf(rid, sizeof(rid), "%s-rid-%d", prefix, i);
        cr.name = name;
        cr.algorithm = KEYRAFT__ALGORITHM__AES_128;
        req.id = (uint64_t)i + 1;
        req.request_id = rid;
        req.op_case = KEYRAFT__REQUEST__OP_CREATE;
        req.create = &cr;
        assert_int_equal(kr_tls_send_request(t, &req), 0);
    }
}

/* Every key in |acked| (ids, "" for none) is readable with its name. */
static void assert_acked_present(struct fixture *f, char acked[][ID_LEN + 1], int count,
                                 const char *prefix)
{
    int n_acked = 0, dups = 0;

    for (int i = 0; i < count; i++) {
        if (acked[i][0] == '\0')
            continue;
        n_acked++;
        Keyraft__KeyAttributes *a = NULL;
        int rc = kr_get_key(f->c, acked[i], &a);
        if (rc != 0) {
            print_error("%s-%03d (%s) was acknowledged, and is gone after the restart: %s\n",
                        prefix, i, acked[i], kr_status_name(rc));
            fail();
        }
        char name[64];
        snprintf(name, sizeof(name), "%s-%03d", prefix, i);
        assert_string_equal(a->name, name);
        kr_key_attributes_free(a);
    }
    char pfx[64];
    snprintf(pfx, sizeof(pfx), "%s-", prefix);
    int listed = count_prefix(&f->node, pfx, &dups);
    assert_int_equal(dups, 0);
    assert_true(listed >= n_acked && listed <= count);
}

/* Many writes in flight on one connection, kill -9 right after some were
 * acknowledged: every acknowledged one survives (batched commits must not
 * acknowledge before the entry is durable). */
static void test_pipelined_kill9(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    enum { COUNT = 300, WAIT_FOR = 150 };
    static char acked[COUNT][ID_LEN + 1];
    struct kr_tls t;
    int got = 0;

    memset(acked, 0, sizeof(acked));
    assert_int_equal(kr_tls_open_app(n, &t), 0);
    send_creates(&t, "pipe", COUNT);
    while (got < WAIT_FOR) {
        Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
        assert_non_null(resp);
        assert_true(resp->id >= 1 && resp->id <= COUNT);
        if (resp->status == 0) {
            assert_int_equal(resp->result_case, KEYRAFT__RESPONSE__RESULT_KEY);
            snprintf(acked[resp->id - 1], ID_LEN + 1, "%s", resp->key->id);
        } else {
            print_error("pipelined create %llu: %s (%s)\n", (unsigned long long)resp->id,
                        kr_status_name(resp->status), resp->message);
        }
        got++;
        keyraft__response__free_unpacked(resp, NULL);
    }
    assert_int_equal(kr_node_kill9(n), 0);
    kr_tls_close(&t);
    assert_int_equal(kr_node_start(n), 0);
    kr_client_free(f->c);
    f->c = NULL;
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
    assert_acked_present(f, acked, COUNT, "pipe");
}

/* SIGTERM with writes in flight: every request gets an answer or the
 * connection closes, the node exits 0 within the stop timeout, and whatever
 * it acknowledged is there after the restart. */
static void test_sigterm_in_flight(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    enum { COUNT = 200 };
    static char acked[COUNT][ID_LEN + 1];
    struct kr_tls t;
    int answers = 0, refused = 0;

    memset(acked, 0, sizeof(acked));
    assert_int_equal(kr_tls_open_app(n, &t), 0);
    send_creates(&t, "term", COUNT);
    Keyraft__Response *resp = kr_tls_read_response(&t, NULL);
    assert_non_null(resp);
    keyraft__response__free_unpacked(resp, NULL);
    kill(n->pid, SIGTERM);
    /* the first answer was read before the signal */
    answers = 1;
    while ((resp = kr_tls_read_response(&t, NULL)) != NULL) {
        assert_true(resp->id >= 1 && resp->id <= COUNT);
        if (resp->status == 0)
            snprintf(acked[resp->id - 1], ID_LEN + 1, "%s", resp->key->id);
        else
            refused++;
        answers++;
        keyraft__response__free_unpacked(resp, NULL);
    }
    kr_tls_close(&t);
    int rc = kr_node_stop(n); /* signals again (harmless), waits, reaps */
    if (rc != 0) {
        kr_node_dump_log(n, 3000);
        print_error("SIGTERM with %d writes in flight: exit %d, want 0\n", COUNT, rc);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(kr_node_start(n), 0);
    kr_client_free(f->c);
    f->c = NULL;
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
    assert_acked_present(f, acked, COUNT, "term");
    fprintf(stderr, "  sigterm with %d creates in flight: %d answered (%d refused)\n", COUNT,
            answers, refused);
}

static void test_restart_loop(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    char name[32];
    int total = 0, dups = 0;

    for (int round = 0; round < 3; round++) {
        if (f->c == NULL)
            assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
        for (int i = 0; i < 7; i++) {
            Keyraft__KeyAttributes *a = NULL;
            snprintf(name, sizeof(name), "loop-%d-%d", round, i);
            int rc = kr_create_key(f->c, name, i % 2 ? KEYRAFT__ALGORITHM__ED25519
                                                     : KEYRAFT__ALGORITHM__AES_256,
                                   NULL, 0, &a);
            if (rc != 0)
                print_error("round %d create %s: %s %s\n", round, name, kr_status_name(rc),
                            kr_client_last_error(f->c));
            assert_int_equal(rc, 0);
            kr_key_attributes_free(a);
            total++;
        }
        /* the client keeps its connection across the kill: it must reconnect */
        assert_int_equal(kr_node_kill9(n), 0);
        assert_int_equal(kr_node_start(n), 0);
        int got = count_prefix(n, "loop-", &dups);
        if (got != total)
            print_error("round %d: %d keys listed, %d created\n", round, got, total);
        assert_int_equal(got, total);
        assert_int_equal(dups, 0);
        /* a duplicate create after restart is still refused (names index intact) */
        run_fails(n, NULL, 0, "KR_EEXIST", "create", "--name", name, "--alg", "aes-256", NULL);
    }
    /* the long-lived client reconnects after the node came back */
    Keyraft__KeyAttributes *a = NULL;
    assert_int_equal(kr_get_key(f->c, "name:loop-2-6", &a), 0);
    assert_int_equal(a->algorithm, KEYRAFT__ALGORITHM__AES_256);
    kr_key_attributes_free(a);
    /* the final graceful stop is checked by the group teardown */
}

/* A revocation message is stored, shown, and survives a restart. Its own
 * node: a crash here cannot take the other groups down with it. */
static void test_revoke_message(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    struct kr_out o;

    char *id = create_cli(n, "rm-1", "aes-256", NULL, NULL);
    kr_cli(n, NULL, 0, &o, "revoke", id, "--reason", "compromised", "--message", "laptop stolen",
           NULL);
    if (o.status != 0 || !kr_node_alive(n)) {
        print_error("revoke --message: exit %d, node %s\nstderr: %s\n", o.status,
                    kr_node_alive(n) ? "alive" : "DEAD", o.err);
        kr_node_dump_log(n, 1500);
        kr_out_free(&o);
        /* and the command is in the raft log: does the node start again? */
        kr_node_kill9(n);
        if (kr_node_start(n) != 0)
            print_error("the node no longer starts: replaying the revoke crashes it again\n");
        fail();
    }
    kr_out_free(&o);
    kr_json *j = run_json(n, NULL, 0, "get", id, NULL);
    assert_string_equal(jstr(j, "state"), "compromised");
    assert_string_equal(jstr(j, "revoke_message"), "laptop stolen");
    kr_json_free(j);
    /* deactivate-type revocation with a message, then a second message */
    char *id2 = create_cli(n, "rm-2", "ed25519", NULL, NULL);
    run_expect(n, NULL, 0, &o, 0, "revoke", id2, "--reason", "superseded", "--message", "v2 out",
               NULL);
    kr_out_free(&o);
    run_expect(n, NULL, 0, &o, 0, "revoke", id2, "--reason", "compromised", "--message",
               "leaked too", NULL);
    kr_out_free(&o);
    assert_int_equal(kr_node_stop(n), 0);
    assert_int_equal(kr_node_start(n), 0);
    j = run_json(n, NULL, 0, "get", id2, NULL);
    assert_string_equal(jstr(j, "state"), "compromised");
    assert_string_equal(jstr(j, "revoke_message"), "leaked too");
    kr_json_free(j);
    run_expect(n, NULL, 0, &o, 0, "get", id, NULL);
    assert_non_null(strstr((const char *)o.out, "revoke-message: laptop stolen\n"));
    kr_out_free(&o);
    free(id);
    free(id2);
}

/* ---- audit: fail closed ---------------------------------------------------------------- */

/* Replaces the [audit] section (the last one `keyraftd init` writes) of the
 * node's config with |section|. */
static void set_audit_config(const struct kr_node *n, const char *section)
{
    char path[KR_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/keyraftd.conf", n->dir);
    FILE *fp = fopen(path, "r+");
    assert_non_null(fp);
    static char text[65536];
    size_t len = fread(text, 1, sizeof(text) - 1, fp);
    text[len] = '\0';
    char *at = strstr(text, "[audit]");
    assert_non_null(at);
    *at = '\0';
    assert_int_equal(fseek(fp, 0, SEEK_SET), 0);
    assert_true(fputs(text, fp) >= 0 && fputs(section, fp) >= 0);
    assert_int_equal(ftruncate(fileno(fp), ftell(fp)), 0);
    assert_int_equal(fclose(fp), 0);
}

static int encrypt_status(struct fixture *f, const char *id)
{
    kr_buf ct = {0};
    int rc = kr_encrypt(f->c, id, (const uint8_t *)"x", 1, NULL, 0, &ct);
    kr_buf_free(&ct);
    return rc;
}

/* A write probe: 0 when the node took it (the key exists then), else its code. */
static int probe_write(struct fixture *f, int *counter)
{
    char name[48];
    snprintf(name, sizeof(name), "fc-probe-%d", (*counter)++);
    Keyraft__KeyAttributes *a = NULL;
    int rc = kr_create_key(f->c, name, KEYRAFT__ALGORITHM__AES_256, NULL, 0, &a);
    kr_key_attributes_free(a);
    return rc;
}

/* Polls |probe_write| every 20 ms until its result is (want == 0) or is not
 * (want != 0) success, up to |ms|. Returns the last result. */
static int wait_write(struct fixture *f, int *counter, int want_ok, unsigned ms)
{
    uint64_t deadline = kc_now_ms() + ms;
    int rc;
    while (((rc = probe_write(f, counter)) == 0) != want_ok && kc_now_ms() < deadline)
        kc_sleep_ms(20);
    return rc;
}

/* Records that cannot be shipped stop the node. The recorder is made to ship
 * only every 2 s but to fail closed once a record waits 100 ms: right after a
 * batch is shipped a request runs, 300 ms later the next is refused and says
 * why (reads too, unless fail_open_reads), and once the next batch is
 * committed requests run again. */
static void test_audit_fail_closed(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    char *id = create_cli(n, "fc-1", "aes-256", NULL, NULL);
    int counter = 0;

    for (int open_reads = 1; open_reads >= 0; open_reads--) {
        char section[256];
        snprintf(section, sizeof(section),
                 "[audit]\nenabled = true\nflush_ms = 2000\nmax_pending = 100000\n"
                 "max_lag_ms = 100\nfail_open_reads = %s\ncheckpoint_ms = 10000\n",
                 open_reads ? "true" : "false");
        kr_client_free(f->c);
        f->c = NULL;
        assert_int_equal(kr_node_stop(n), 0);
        set_audit_config(n, section);
        assert_int_equal(kr_node_start(n), 0);
        assert_int_equal(kr_node_client(n, 2000, &f->c), 0);

        /* Find the start of a shipping period: refused, then served again. */
        assert_int_equal(wait_write(f, &counter, 0, 10000), KR_EUNAVAIL);
        assert_int_equal(wait_write(f, &counter, 1, 10000), 0);
        kc_sleep_ms(300); /* that write's record is now older than max_lag_ms */

        int rc = probe_write(f, &counter);
        assert_int_equal(rc, KR_EUNAVAIL);
        assert_non_null(strstr(kr_client_last_error(f->c), "audit records cannot be written"));
        rc = encrypt_status(f, id);
        if (open_reads) {
            assert_int_equal(rc, 0);
        } else {
            assert_int_equal(rc, KR_EUNAVAIL);
            assert_non_null(strstr(kr_client_last_error(f->c), "audit records cannot be written"));
        }
        /* status still answers: an operator can see the node */
        char role[32];
        assert_int_equal(kr_node_status_role(n, role, sizeof(role)), 0);

        /* The batch ships; the node serves again. */
        assert_int_equal(wait_write(f, &counter, 1, 10000), 0);
    }
    /* and the refusals are on record (read back with the usual settings: an
     * auditor's query is a read, refused like any other in the narrow window) */
    kr_client_free(f->c);
    f->c = NULL;
    assert_int_equal(kr_node_stop(n), 0);
    set_audit_config(n, "[audit]\nenabled = true\n");
    assert_int_equal(kr_node_start(n), 0);
    assert_int_equal(kr_node_client(n, 30000, &f->c), 0);
    struct kr_out o;
    const char *q[] = {"audit", "query", "--op", "create", "--denied", NULL};
    kr_cli_argv(n, NULL, 0, &o, q);
    assert_int_equal(o.status, 0);
    assert_non_null(strstr((const char *)o.out, "KR_EUNAVAIL"));
    assert_non_null(strstr((const char *)o.out, "audit records cannot be written"));
    kr_out_free(&o);
    free(id);
}

/* Client-chosen fields of any length reach the audit record cut to a bound:
 * the node neither crashes nor drops the record. */
static void test_audit_long_fields(void **state)
{
    struct fixture *f = fx(state);
    struct kr_node *n = &f->node;
    size_t len = 200000;
    char *ref = malloc(len + 6);
    assert_non_null(ref);
    memcpy(ref, "name:", 5);
    memset(ref + 5, 'q', len);
    ref[len + 5] = '\0';
    kr_buf ct = {0};
    int rc = kr_encrypt(f->c, ref, (const uint8_t *)"x", 1, NULL, 0, &ct);
    kr_buf_free(&ct);
    free(ref);
    if (rc != KR_ENOTFOUND)
        print_error("encrypt with a 200 KB name: %s %s\n", kr_status_name(rc),
                    kr_client_last_error(f->c));
    assert_int_equal(rc, KR_ENOTFOUND);
    assert_true(kr_node_alive(n));
    /* the refusal is on record, with the name cut to 256 characters */
    char want[260];
    memset(want, 'q', 256);
    want[256] = '\0';
    struct kr_out o = {0};
    const char *q[] = {"audit", "query", "--op", "encrypt", "--denied", NULL};
    uint64_t deadline = kc_now_ms() + 5000;
    for (;;) {
        kr_cli_argv(n, NULL, 0, &o, q);
        if ((o.status == 0 && strstr((const char *)o.out, want) != NULL) ||
            kc_now_ms() >= deadline)
            break;
        kr_out_free(&o);
        kc_sleep_ms(100);
    }
    assert_int_equal(o.status, 0);
    const char *at = strstr((const char *)o.out, want);
    assert_non_null(at);
    assert_true(at[256] != 'q');
    kr_out_free(&o);
}

int main(void)
{
    const struct CMUnitTest ops[] = {
        cmocka_unit_test(test_init_exits_cleanly),
        cmocka_unit_test_setup(test_create_all_algorithms, node_alive_setup),
        cmocka_unit_test_setup(test_create_duplicate_and_tags, node_alive_setup),
        cmocka_unit_test_setup(test_list_filters, node_alive_setup),
        cmocka_unit_test_setup(test_list_pagination, node_alive_setup),
        cmocka_unit_test_setup(test_export, node_alive_setup),
        cmocka_unit_test_setup(test_import, node_alive_setup),
        cmocka_unit_test_setup(test_lifecycle, node_alive_setup),
        cmocka_unit_test_setup(test_rotate, node_alive_setup),
        cmocka_unit_test_setup(test_encrypt_decrypt, node_alive_setup),
        cmocka_unit_test_setup(test_sign_verify, node_alive_setup),
        cmocka_unit_test_setup(test_mac, node_alive_setup),
        cmocka_unit_test_setup(test_datakey, node_alive_setup),
        cmocka_unit_test_setup(test_wrap_unwrap, node_alive_setup),
        cmocka_unit_test_setup(test_random_status, node_alive_setup),
        cmocka_unit_test_setup(test_state_matrix, node_alive_setup),
        cmocka_unit_test_setup(test_client_failover, node_alive_setup),
        cmocka_unit_test_setup(test_protocol_semantics, node_alive_setup),
        cmocka_unit_test_setup(test_retry_create, node_alive_setup),
    };
    const struct CMUnitTest durability[] = {
        cmocka_unit_test_setup(test_durability_kill9, node_alive_setup),
        cmocka_unit_test_setup(test_restart_loop, node_alive_setup),
        cmocka_unit_test_setup(test_pipelined_kill9, node_alive_setup),
        cmocka_unit_test_setup(test_sigterm_in_flight, node_alive_setup),
    };
    const struct CMUnitTest revoke[] = {
        cmocka_unit_test(test_revoke_message),
    };
    const struct CMUnitTest audit[] = {
        cmocka_unit_test(test_audit_long_fields),
        cmocka_unit_test(test_audit_fail_closed),
    };
    int failed = 0;

    if (getenv("KR_TEST_FILTER") != NULL) /* e.g. KR_TEST_FILTER=test_rotate */
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    failed += cmocka_run_group_tests_name("node_ops", ops, group_setup, group_teardown);
    failed += cmocka_run_group_tests_name("node_revoke_message", revoke, group_setup,
                                          group_teardown);
    failed += cmocka_run_group_tests_name("node_audit", audit, group_setup, group_teardown);
    failed += cmocka_run_group_tests_name("node_durability", durability, group_setup,
                                          group_teardown);
    return failed;
}
