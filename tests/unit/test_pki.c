/* test_pki.c: the CA, node and client certificates keyraftd init makes. */
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
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "keyraft.h"
#include "pki.h"

struct fixture {
    char dir[64];
    char ca_cert[128], ca_key[128];
    char node_cert[128], node_key[128];
    char client_cert[128], client_key[128];
};

static void join(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    assert_true(n > 0 && (size_t)n < cap);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-pki-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    join(f->ca_cert, sizeof(f->ca_cert), f->dir, "ca.crt");
    join(f->ca_key, sizeof(f->ca_key), f->dir, "ca.key");
    join(f->node_cert, sizeof(f->node_cert), f->dir, "node.crt");
    join(f->node_key, sizeof(f->node_key), f->dir, "node.key");
    join(f->client_cert, sizeof(f->client_cert), f->dir, "client.crt");
    join(f->client_key, sizeof(f->client_key), f->dir, "client.key");
    assert_int_equal(pki_make_ca("keyraft test CA", 30, f->ca_cert, f->ca_key), 0);
    assert_int_equal(pki_issue_node(f->ca_cert, f->ca_key, "node-1", "10.0.0.7, kr1.example.com,::1",
                                    30, f->node_cert, f->node_key),
                     0);
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, "alice", "admin, auditor", 30,
                                      f->client_cert, f->client_key),
                     0);
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static X509 *load_cert(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    X509 *cert = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(cert);
    return cert;
}

static EVP_PKEY *load_key(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    EVP_PKEY *key = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(key);
    return key;
}

/* X509_verify_cert of |leaf| against |ca| for |purpose|: 1 verified, 0 not. */
static int verifies(X509 *ca, X509 *leaf, int purpose)
{
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    assert_non_null(store);
    assert_non_null(ctx);
    assert_int_equal(X509_STORE_add_cert(store, ca), 1);
    assert_int_equal(X509_STORE_CTX_init(ctx, store, leaf, NULL), 1);
    assert_int_equal(X509_STORE_CTX_set_purpose(ctx, purpose), 1);
    int ok = X509_verify_cert(ctx);
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    ERR_clear_error();
    return ok == 1;
}

static void subject_entries(X509 *cert, int nid, char *out, size_t cap)
{
    const X509_NAME *name = X509_get_subject_name(cert);
    out[0] = '\0';
    for (int i = -1; (i = X509_NAME_get_index_by_NID(name, nid, i)) >= 0;) {
        const ASN1_STRING *s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
        size_t used = strlen(out);
        snprintf(out + used, cap - used, "%s%.*s", used ? "|" : "", ASN1_STRING_length(s),
                 (const char *)ASN1_STRING_get0_data(s));
    }
}

static void assert_file_mode(const char *path, mode_t mode)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, mode);
}

static void assert_pkcs8_pem(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char line[64] = "";
    assert_non_null(fgets(line, sizeof(line), fp));
    fclose(fp);
    assert_string_equal(line, "-----BEGIN PRIVATE KEY-----\n");
}

static void test_ca_is_a_self_signed_p256_ca(void **state)
{
    struct fixture *f = *state;
    X509 *ca = load_cert(f->ca_cert);
    EVP_PKEY *key = load_key(f->ca_key);
    char cn[128];
    subject_entries(ca, NID_commonName, cn, sizeof(cn));
    assert_string_equal(cn, "keyraft test CA");
    assert_true(X509_check_ca(ca) >= 1);
    assert_true(X509_get_extension_flags(ca) & EXFLAG_CA);
    assert_true(X509_get_key_usage(ca) & KU_KEY_CERT_SIGN);
    assert_true(X509_get_key_usage(ca) & KU_CRL_SIGN);
    assert_non_null(X509_get0_subject_key_id(ca));
    int crit = -1;
    BASIC_CONSTRAINTS *bc = X509_get_ext_d2i(ca, NID_basic_constraints, &crit, NULL);
    assert_non_null(bc);
    assert_int_equal(crit, 1);
    BASIC_CONSTRAINTS_free(bc);
    assert_int_equal(X509_check_private_key(ca, key), 1);
    assert_true(EVP_PKEY_is_a(key, "EC"));
    char curve[32] = "";
    assert_int_equal(EVP_PKEY_get_utf8_string_param(key, "group", curve, sizeof(curve), NULL), 1);
    assert_string_equal(curve, "prime256v1");
    assert_int_equal(X509_get_signature_nid(ca), NID_ecdsa_with_SHA256);
    assert_true(verifies(ca, ca, X509_PURPOSE_ANY));
    assert_file_mode(f->ca_key, 0600);
    assert_pkcs8_pem(f->ca_key);
    EVP_PKEY_free(key);
    X509_free(ca);
}

static void test_validity_is_backdated_five_minutes(void **state)
{
    struct fixture *f = *state;
    X509 *node = load_cert(f->node_cert);
    time_t now = time(NULL);
    time_t lo = now - 6 * 60, hi = now - 4 * 60;
    assert_int_equal(X509_cmp_time(X509_get0_notBefore(node), &lo), 1);
    assert_int_equal(X509_cmp_time(X509_get0_notBefore(node), &hi), -1);
    time_t end_lo = now + 29 * 86400, end_hi = now + 31 * 86400;
    assert_int_equal(X509_cmp_time(X509_get0_notAfter(node), &end_lo), 1);
    assert_int_equal(X509_cmp_time(X509_get0_notAfter(node), &end_hi), -1);
    X509_free(node);
}

static int has_san(GENERAL_NAMES *gens, int type, const char *want, size_t want_len)
{
    for (int i = 0; i < sk_GENERAL_NAME_num(gens); i++) {
        int t = -1;
        ASN1_STRING *s = GENERAL_NAME_get0_value(sk_GENERAL_NAME_value(gens, i), &t);
        if (t == type && (size_t)ASN1_STRING_length(s) == want_len &&
            memcmp(ASN1_STRING_get0_data(s), want, want_len) == 0)
            return 1;
    }
    return 0;
}

static void test_node_cert(void **state)
{
    struct fixture *f = *state;
    X509 *ca = load_cert(f->ca_cert);
    X509 *node = load_cert(f->node_cert);
    EVP_PKEY *key = load_key(f->node_key);
    char cn[128];
    subject_entries(node, NID_commonName, cn, sizeof(cn));
    assert_string_equal(cn, "node-1");
    assert_true(verifies(ca, node, X509_PURPOSE_SSL_SERVER));
    assert_true(verifies(ca, node, X509_PURPOSE_SSL_CLIENT));
    uint32_t xku = X509_get_extended_key_usage(node);
    assert_true(xku & XKU_SSL_SERVER);
    assert_true(xku & XKU_SSL_CLIENT);
    assert_int_equal(X509_check_ca(node), 0);
    assert_non_null(X509_get0_authority_key_id(node));
    assert_int_equal(ASN1_OCTET_STRING_cmp(X509_get0_authority_key_id(node),
                                           X509_get0_subject_key_id(ca)),
                     0);
    GENERAL_NAMES *gens = X509_get_ext_d2i(node, NID_subject_alt_name, NULL, NULL);
    assert_non_null(gens);
    assert_int_equal(sk_GENERAL_NAME_num(gens), 5);
    assert_true(has_san(gens, GEN_IPADD, "\x7f\x00\x00\x01", 4));
    assert_true(has_san(gens, GEN_DNS, "localhost", 9));
    assert_true(has_san(gens, GEN_IPADD, "\x0a\x00\x00\x07", 4));
    assert_true(has_san(gens, GEN_DNS, "kr1.example.com", 15));
    assert_true(has_san(gens, GEN_IPADD, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01", 16));
    GENERAL_NAMES_free(gens);
    assert_int_equal(X509_check_host(node, "kr1.example.com", 0, 0, NULL), 1);
    assert_int_equal(X509_check_ip_asc(node, "127.0.0.1", 0), 1);
    assert_int_equal(X509_check_private_key(node, key), 1);
    assert_file_mode(f->node_key, 0600);
    assert_pkcs8_pem(f->node_key);
    EVP_PKEY_free(key);
    X509_free(node);
    X509_free(ca);
}

static void test_client_cert(void **state)
{
    struct fixture *f = *state;
    X509 *ca = load_cert(f->ca_cert);
    X509 *client = load_cert(f->client_cert);
    EVP_PKEY *key = load_key(f->client_key);
    char buf[256];
    subject_entries(client, NID_commonName, buf, sizeof(buf));
    assert_string_equal(buf, "alice");
    subject_entries(client, NID_organizationalUnitName, buf, sizeof(buf));
    assert_string_equal(buf, "admin|auditor");
    /* one RDN per role, not a multi-valued RDN */
    const X509_NAME *name = X509_get_subject_name(client);
    assert_int_equal(X509_NAME_entry_count(name), 3);
    assert_int_not_equal(X509_NAME_ENTRY_set(X509_NAME_get_entry(name, 1)),
                         X509_NAME_ENTRY_set(X509_NAME_get_entry(name, 2)));
    assert_true(verifies(ca, client, X509_PURPOSE_SSL_CLIENT));
    /* a client certificate cannot pose as a server */
    assert_false(verifies(ca, client, X509_PURPOSE_SSL_SERVER));
    uint32_t xku = X509_get_extended_key_usage(client);
    assert_true(xku & XKU_SSL_CLIENT);
    assert_false(xku & XKU_SSL_SERVER);
    assert_null(X509_get_ext_d2i(client, NID_subject_alt_name, NULL, NULL));
    assert_int_equal(X509_check_private_key(client, key), 1);
    assert_file_mode(f->client_key, 0600);
    assert_file_mode(f->client_cert, 0644);
    EVP_PKEY_free(key);
    X509_free(client);
    X509_free(ca);
}

static void test_client_without_roles(void **state)
{
    struct fixture *f = *state;
    char cert[128], key[128], buf[64];
    join(cert, sizeof(cert), f->dir, "bob.crt");
    join(key, sizeof(key), f->dir, "bob.key");
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, "bob", NULL, 1, cert, key), 0);
    X509 *client = load_cert(cert);
    subject_entries(client, NID_organizationalUnitName, buf, sizeof(buf));
    assert_string_equal(buf, "");
    assert_int_equal(X509_NAME_entry_count(X509_get_subject_name(client)), 1);
    X509_free(client);
}

static void test_other_ca_does_not_verify(void **state)
{
    struct fixture *f = *state;
    char cert[128], key[128];
    join(cert, sizeof(cert), f->dir, "other-ca.crt");
    join(key, sizeof(key), f->dir, "other-ca.key");
    assert_int_equal(pki_make_ca("other CA", 30, cert, key), 0);
    X509 *other = load_cert(cert);
    X509 *node = load_cert(f->node_cert);
    X509 *client = load_cert(f->client_cert);
    assert_false(verifies(other, node, X509_PURPOSE_SSL_SERVER));
    assert_false(verifies(other, client, X509_PURPOSE_SSL_CLIENT));
    X509_free(client);
    X509_free(node);
    X509_free(other);
}

static void test_serials_are_random_128_bit(void **state)
{
    struct fixture *f = *state;
    char cert[128], key[128];
    join(cert, sizeof(cert), f->dir, "again.crt");
    join(key, sizeof(key), f->dir, "again.key");
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, "alice", "admin", 1, cert, key), 0);
    X509 *a = load_cert(f->client_cert);
    X509 *b = load_cert(cert);
    assert_int_not_equal(ASN1_INTEGER_cmp(X509_get0_serialNumber(a), X509_get0_serialNumber(b)),
                         0);
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(a), NULL);
    assert_non_null(bn);
    assert_int_equal(BN_num_bits(bn), 128);
    assert_false(BN_is_negative(bn));
    BN_free(bn);
    X509_free(b);
    X509_free(a);
}

static void test_rewriting_a_key_tightens_its_mode(void **state)
{
    struct fixture *f = *state;
    char cert[128], key[128];
    join(cert, sizeof(cert), f->dir, "loose.crt");
    join(key, sizeof(key), f->dir, "loose.key");
    FILE *fp = fopen(key, "w");
    assert_non_null(fp);
    fputs("old contents that are much longer than nothing at all\n", fp);
    fclose(fp);
    assert_int_equal(chmod(key, 0644), 0);
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, "carol", NULL, 1, cert, key), 0);
    assert_file_mode(key, 0600);
    assert_pkcs8_pem(key);
    EVP_PKEY *k = load_key(key);
    X509 *c = load_cert(cert);
    assert_int_equal(X509_check_private_key(c, k), 1);
    X509_free(c);
    EVP_PKEY_free(k);
}

static void test_errors(void **state)
{
    struct fixture *f = *state;
    char cert[128], key[128], missing[128], other_cert[128], other_key[128];
    join(cert, sizeof(cert), f->dir, "err.crt");
    join(key, sizeof(key), f->dir, "err.key");
    join(missing, sizeof(missing), f->dir, "missing.key");
    join(other_cert, sizeof(other_cert), f->dir, "o.crt");
    join(other_key, sizeof(other_key), f->dir, "o.key");
    /* missing CA key: a file error */
    assert_int_equal(pki_issue_client(f->ca_cert, missing, "x", NULL, 1, cert, key), KR_EIO);
    /* unwritable destination */
    assert_int_equal(pki_make_ca("ca", 1, "/nonexistent-dir/ca.crt", "/nonexistent-dir/ca.key"),
                     KR_EIO);
    /* a CA key that is not the CA certificate's */
    assert_int_equal(pki_make_ca("o", 1, other_cert, other_key), 0);
    assert_int_not_equal(pki_issue_node(f->ca_cert, other_key, "n", NULL, 1, cert, key), 0);
    /* a leaf certificate is not a CA */
    assert_int_not_equal(
        pki_issue_client(f->client_cert, f->client_key, "x", NULL, 1, cert, key), 0);
    /* a certificate where a key belongs */
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_cert, "x", NULL, 1, cert, key),
                     KR_ECRYPTO);
    assert_int_equal(pki_make_ca("ca", 0, cert, key), KR_EINVAL);
    assert_int_equal(pki_make_ca("", 1, cert, key), KR_EINVAL);
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, "x", "ok,bad\nrole", 1, cert, key),
                     KR_EINVAL);
    assert_int_equal(pki_issue_node(f->ca_cert, f->ca_key, "n", "bad name", 1, cert, key),
                     KR_EINVAL);
    char longname[80];
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    assert_int_equal(pki_issue_client(f->ca_cert, f->ca_key, longname, NULL, 1, cert, key),
                     KR_EINVAL);
    /* none of the failures left a key behind */
    assert_int_not_equal(access(key, F_OK), 0);
}

/* The join path: CSR on the new node, signature by the admin, check by the
 * leader. Names and uses come from the signer, not the request. */
static void test_join_csr_sign_and_check(void **state)
{
    struct fixture *f = *state;
    char key[160], other_ca[160], other_key[160];
    join(key, sizeof(key), f->dir, "joiner.key");
    join(other_ca, sizeof(other_ca), f->dir, "other.crt");
    join(other_key, sizeof(other_key), f->dir, "other.key");
    char *csr = NULL, *cert = NULL, *bad = NULL;
    assert_int_equal(pki_make_node_csr("node-4", key, &csr), 0);
    struct stat st;
    assert_int_equal(stat(key, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(pki_sign_node_csr(f->ca_cert, f->ca_key, csr, "node-5", NULL, 30, &bad),
                     KR_EINVAL);
    assert_null(bad);
    assert_int_equal(pki_sign_node_csr(f->ca_cert, f->ca_key, "junk", "node-4", NULL, 30, &bad),
                     KR_EINVAL);
    /* A request whose signature no longer matches its content. */
    char *tampered = strdup(csr);
    char *mid = tampered + strlen(tampered) / 2;
    *mid = *mid == 'A' ? 'B' : 'A';
    int trv = pki_sign_node_csr(f->ca_cert, f->ca_key, tampered, "node-4", NULL, 30, &bad);
    assert_true(trv == KR_EAUTH || trv == KR_EINVAL);
    assert_null(bad);
    free(tampered);
    assert_int_equal(pki_sign_node_csr(f->ca_cert, f->ca_key, csr, "node-4", "10.1.2.3", 30, &cert),
                     0);
    assert_int_equal(pki_check_node_cert(f->ca_cert, cert, "node-4"), 0);
    assert_int_equal(pki_check_node_cert(f->ca_cert, cert, "node-1"), KR_EINVAL);
    assert_int_equal(pki_make_ca("other CA", 30, other_ca, other_key), 0);
    assert_int_equal(pki_check_node_cert(other_ca, cert, "node-4"), KR_EAUTH);
    assert_int_equal(pki_check_node_cert(f->ca_cert, "junk", "node-4"), KR_EINVAL);
    /* A client certificate cannot pass as a node. */
    FILE *cf = fopen(f->client_cert, "r");
    assert_non_null(cf);
    char client_pem[8192];
    size_t n = fread(client_pem, 1, sizeof(client_pem) - 1, cf);
    fclose(cf);
    client_pem[n] = '\0';
    assert_int_not_equal(pki_check_node_cert(f->ca_cert, client_pem, "alice"), 0);
    /* The issued certificate carries the node's key and our names. */
    BIO *b = BIO_new_mem_buf(cert, -1);
    X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
    assert_non_null(x);
    FILE *kf = fopen(key, "r");
    assert_non_null(kf);
    EVP_PKEY *pk = PEM_read_PrivateKey(kf, NULL, NULL, NULL);
    fclose(kf);
    assert_non_null(pk);
    assert_int_equal(X509_check_private_key(x, pk), 1);
    assert_int_equal(X509_check_ip_asc(x, "10.1.2.3", 0), 1);
    assert_int_equal(X509_check_ip_asc(x, "127.0.0.1", 0), 1);
    EVP_PKEY_free(pk);
    X509_free(x);
    BIO_free(b);
    free(csr);
    free(cert);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ca_is_a_self_signed_p256_ca, setup, teardown),
        cmocka_unit_test_setup_teardown(test_validity_is_backdated_five_minutes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_node_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_without_roles, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_ca_does_not_verify, setup, teardown),
        cmocka_unit_test_setup_teardown(test_serials_are_random_128_bit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rewriting_a_key_tightens_its_mode, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_join_csr_sign_and_check, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
