/* test_leakscan.c: key material (and plaintext handed to the node) must
 * never reach its disk in the clear: not in RocksDB, the raft log, the token
 * directory or the logs; checked while running, after a graceful stop and
 * after kill -9. The scanner proves itself on a planted marker first. */
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

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "harness.h"

#define WINDOW 16
#define MAX_NEEDLES 256
#define MAX_FINDINGS 20

struct needle {
    char label[96];
    uint8_t *data;
    size_t len;
};

struct finding {
    char path[KR_PATH_MAX + 64];
    size_t offset;
    int needle;
};

struct scan {
    struct needle needles[MAX_NEEDLES];
    int n_needles;
    struct finding found[MAX_FINDINGS];
    int n_found;
    int files;
    size_t bytes;
};

struct fixture {
    struct kr_node node;
    struct scan scan;
};

/* nftw has no user pointer: the scan in progress. */
static struct scan *current_scan;

static void add_needle(struct scan *s, const char *label, const void *data, size_t len)
{
    struct needle *n;

    assert_true(s->n_needles < MAX_NEEDLES);
    assert_true(len >= 8);
    n = &s->needles[s->n_needles++];
    snprintf(n->label, sizeof(n->label), "%s", label);
    n->data = malloc(len);
    assert_non_null(n->data);
    memcpy(n->data, data, len);
    n->len = len;
}

static void to_hex(const uint8_t *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * len] = 0;
}

/* The whole of an encoded secret (DER), in raw, hex and base64: its first and
 * last bytes are ASN.1 structure and public key, found in any key's record,
 * so windows of it would prove nothing; its secret numbers get windows. */
static void add_encoded(struct scan *s, const char *what, const uint8_t *der, size_t len)
{
    char label[96];
    char *hex = malloc(2 * len + 1), *b64 = malloc(4 * ((len + 2) / 3) + 1);

    assert_non_null(hex);
    assert_non_null(b64);
    snprintf(label, sizeof(label), "%s (all %zu bytes)", what, len);
    add_needle(s, label, der, len);
    to_hex(der, len, hex);
    snprintf(label, sizeof(label), "%s (hex)", what);
    add_needle(s, label, hex, strlen(hex));
    EVP_EncodeBlock((unsigned char *)b64, der, (int)len);
    snprintf(label, sizeof(label), "%s (base64)", what);
    add_needle(s, label, b64, strlen(b64));
    free(hex);
    free(b64);
}

/* A secret, its first and last 16 bytes, those windows in hex, and the
 * whole in base64 (the CLI's and JSON's encodings). */
static void add_secret(struct scan *s, const char *what, const uint8_t *secret, size_t len)
{
    char label[96], hex[2 * WINDOW + 1];

    snprintf(label, sizeof(label), "%s (all %zu bytes)", what, len);
    add_needle(s, label, secret, len);
    if (len > WINDOW) {
        snprintf(label, sizeof(label), "%s (first %d bytes)", what, WINDOW);
        add_needle(s, label, secret, WINDOW);
        snprintf(label, sizeof(label), "%s (last %d bytes)", what, WINDOW);
        add_needle(s, label, secret + len - WINDOW, WINDOW);
    }
    to_hex(secret, len < WINDOW ? len : WINDOW, hex);
    snprintf(label, sizeof(label), "%s (hex of first bytes)", what);
    add_needle(s, label, hex, strlen(hex));
    to_hex(secret + (len > WINDOW ? len - WINDOW : 0), len < WINDOW ? len : WINDOW, hex);
    snprintf(label, sizeof(label), "%s (hex of last bytes)", what);
    add_needle(s, label, hex, strlen(hex));
    char *b64 = malloc(4 * ((len + 2) / 3) + 1);
    assert_non_null(b64);
    EVP_EncodeBlock((unsigned char *)b64, secret, (int)len);
    snprintf(label, sizeof(label), "%s (base64)", what);
    add_needle(s, label, b64, strlen(b64));
    free(b64);
}

static void free_needles(struct scan *s)
{
    for (int i = 0; i < s->n_needles; i++) {
        OPENSSL_cleanse(s->needles[i].data, s->needles[i].len);
        free(s->needles[i].data);
    }
    s->n_needles = 0;
}

static int scan_file(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    struct scan *s = current_scan;
    uint8_t *buf = NULL;
    size_t len = 0;

    (void)ftw;
    if (flag != FTW_F || !S_ISREG(st->st_mode))
        return 0;
    if (kr_read_file(path, &buf, &len) != 0) {
        fprintf(stderr, "leakscan: cannot read %s\n", path);
        return 0;
    }
    s->files++;
    s->bytes += len;
    for (int i = 0; i < s->n_needles; i++) {
        const struct needle *n = &s->needles[i];
        const uint8_t *p = buf;
        size_t left = len;
        while (left >= n->len) {
            const uint8_t *hit = memmem(p, left, n->data, n->len);
            if (hit == NULL)
                break;
            if (s->n_found < MAX_FINDINGS) {
                struct finding *fd = &s->found[s->n_found];
                snprintf(fd->path, sizeof(fd->path), "%s", path);
                fd->offset = (size_t)(hit - buf);
                fd->needle = i;
            }
            s->n_found++;
            left -= (size_t)(hit - p) + 1;
            p = hit + 1;
        }
    }
    OPENSSL_cleanse(buf, len);
    free(buf);
    return 0;
}

/* Scans every regular file under |dir|; returns the number of hits. */
static int scan_dir(struct scan *s, const char *dir)
{
    s->n_found = 0;
    s->files = 0;
    s->bytes = 0;
    current_scan = s;
    assert_int_equal(nftw(dir, scan_file, 32, FTW_PHYS), 0);
    current_scan = NULL;
    return s->n_found;
}

static void report(const struct scan *s, const char *when)
{
    fprintf(stderr, "leakscan %s: %d hit(s) in %d files (%zu bytes):\n", when, s->n_found,
            s->files, s->bytes);
    for (int i = 0; i < s->n_found && i < MAX_FINDINGS; i++)
        fprintf(stderr, "  %s at offset %zu: %s\n", s->found[i].path, s->found[i].offset,
                s->needles[s->found[i].needle].label);
}

static void assert_clean(struct fixture *f, const char *when)
{
    int hits = scan_dir(&f->scan, f->node.dir);

    /* a scan that read nothing proves nothing */
    assert_true(f->scan.files >= 5);
    assert_true(f->scan.bytes > 10000);
    if (hits != 0) {
        report(&f->scan, when);
        fail_msg("key material or plaintext found on disk %s", when);
    }
}

/* ---- setup: keys, their material, some use ---------------------------------------------- */

static char *cli_create(const struct kr_node *n, const char *name, const char *alg)
{
    struct kr_out o;

    kr_cli(n, NULL, 0, &o, "create", "--name", name, "--alg", alg, NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_true(kr_is_hex((const char *)o.out, 32));
    char *id = strndup((const char *)o.out, 32);
    kr_out_free(&o);
    return id;
}

static uint8_t *cli_export(const struct kr_node *n, const char *id, const char *version,
                           size_t *len)
{
    struct kr_out o;
    uint8_t *m = NULL;

    if (version != NULL)
        kr_cli(n, NULL, 0, &o, "export", id, "--version", version, NULL);
    else
        kr_cli(n, NULL, 0, &o, "export", id, NULL);
    KR_ASSERT_EXIT(&o, 0);
    assert_int_equal(kr_hex_decode((const char *)o.out, &m, len), 0);
    OPENSSL_cleanse(o.out, o.out_len);
    kr_out_free(&o);
    return m;
}

static void add_bn(struct scan *s, const char *what, EVP_PKEY *pk, const char *param, int pad)
{
    BIGNUM *bn = NULL;
    uint8_t buf[1024];

    assert_int_equal(EVP_PKEY_get_bn_param(pk, param, &bn), 1);
    int n = pad > 0 ? BN_bn2binpad(bn, buf, pad) : BN_bn2bin(bn, buf);
    assert_true(n > 0);
    add_secret(s, what, buf, (size_t)n);
    OPENSSL_cleanse(buf, sizeof(buf));
    BN_clear_free(bn);
}

/* The material of an asymmetric key, and the raw private numbers in it. */
static void add_asym(struct scan *s, const char *alg, const uint8_t *der, size_t len)
{
    const unsigned char *p = der;
    EVP_PKEY *pk = d2i_AutoPrivateKey(NULL, &p, (long)len);
    char what[64];

    assert_non_null(pk);
    snprintf(what, sizeof(what), "%s PKCS#8", alg);
    add_encoded(s, what, der, len);
    snprintf(what, sizeof(what), "%s private scalar", alg);
    if (strcmp(alg, "ed25519") == 0) {
        uint8_t raw[32];
        size_t rl = sizeof(raw);
        assert_int_equal(EVP_PKEY_get_raw_private_key(pk, raw, &rl), 1);
        add_secret(s, what, raw, rl);
        OPENSSL_cleanse(raw, sizeof(raw));
    } else if (strncmp(alg, "ec-", 3) == 0) {
        add_bn(s, what, pk, OSSL_PKEY_PARAM_PRIV_KEY, strcmp(alg, "ec-p256") == 0 ? 32 : 48);
    } else {
        add_bn(s, "rsa private exponent d", pk, OSSL_PKEY_PARAM_RSA_D, 0);
        add_bn(s, "rsa prime p", pk, OSSL_PKEY_PARAM_RSA_FACTOR1, 0);
        add_bn(s, "rsa prime q", pk, OSSL_PKEY_PARAM_RSA_FACTOR2, 0);
    }
    EVP_PKEY_free(pk);
}

static void use_keys(struct fixture *f, char **ids, const uint8_t *plain, size_t plain_len)
{
    const struct kr_node *n = &f->node;
    struct kr_out o, d;

    for (int round = 0; round < 3; round++) {
        kr_cli(n, plain, plain_len, &o, "encrypt", ids[0], "--aad", "leak", NULL);
        KR_ASSERT_EXIT(&o, 0);
        kr_cli(n, o.out, o.out_len, &d, "decrypt", "--aad", "leak", NULL);
        KR_ASSERT_EXIT(&d, 0);
        assert_int_equal(d.out_len, plain_len);
        kr_out_free(&d);
        kr_out_free(&o);
        kr_cli(n, plain, plain_len, &o, "encrypt", ids[5], NULL);
        KR_ASSERT_EXIT(&o, 0);
        kr_out_free(&o);
        kr_cli(n, plain, plain_len, &o, "mac", ids[1], NULL);
        KR_ASSERT_EXIT(&o, 0);
        kr_out_free(&o);
        for (int k = 2; k <= 4; k++) {
            kr_cli(n, plain, plain_len, &o, "sign", ids[k], NULL);
            KR_ASSERT_EXIT(&o, 0);
            kr_out_free(&o);
        }
        kr_cli(n, plain, 32, &o, "wrap", ids[0], NULL);
        KR_ASSERT_EXIT(&o, 0);
        kr_out_free(&o);
    }
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
    *state = f;
    return 0;
}

static int group_teardown(void **state)
{
    struct fixture *f = *state;

    if (f == NULL)
        return 0;
    free_needles(&f->scan);
    kr_node_destroy(&f->node);
    free(f);
    return 0;
}

/* ids: 0 aes-256, 1 hmac-sha512, 2 ec-p256, 3 ed25519, 4 rsa-2048, 5 imported aes-256 */
static char *ids[6];
static uint8_t plaintext[48];

static void test_scanner_finds_planted_secret(void **state)
{
    struct fixture *f = *state;
    struct scan *s = &f->scan;
    char path[KR_PATH_MAX + 32];
    size_t len = 0;

    /* collect the secrets first: this test also builds the needle list */
    static const char *const algs[] = {"aes-256", "hmac-sha512", "ec-p256", "ed25519",
                                       "rsa-2048"};
    for (int i = 0; i < 5; i++) {
        char name[32];
        snprintf(name, sizeof(name), "leak-%s", algs[i]);
        ids[i] = cli_create(&f->node, name, algs[i]);
        uint8_t *m = cli_export(&f->node, ids[i], NULL, &len);
        if (i < 2)
            add_secret(s, algs[i], m, len);
        else
            add_asym(s, algs[i], m, len);
        OPENSSL_cleanse(m, len);
        free(m);
    }
    /* an imported AES key with known bytes */
    uint8_t known[32];
    char kpath[KR_PATH_MAX];
    struct kr_out o;
    assert_int_equal(RAND_bytes(known, sizeof(known)), 1);
    assert_int_equal(kr_scratch_file(&f->node, "known.key", known, sizeof(known), kpath,
                                     sizeof(kpath)),
                     0);
    kr_cli(&f->node, NULL, 0, &o, "import", "--name", "leak-imported", "--alg", "aes-256",
           "--file", kpath, NULL);
    KR_ASSERT_EXIT(&o, 0);
    ids[5] = strndup((const char *)o.out, 32);
    kr_out_free(&o);
    unlink(kpath);
    add_secret(s, "imported aes-256", known, sizeof(known));
    uint8_t *m = cli_export(&f->node, ids[5], NULL, &len);
    assert_int_equal(len, sizeof(known));
    assert_memory_equal(m, known, len);
    free(m);
    /* a rotated version is material too */
    kr_cli(&f->node, NULL, 0, &o, "rotate", ids[0], NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
    m = cli_export(&f->node, ids[0], "2", &len);
    add_secret(s, "aes-256 version 2", m, len);
    free(m);
    /* a data key's plaintext must not be kept either */
    kr_json *j = NULL;
    kr_cli(&f->node, NULL, 0, &o, "--json", "datakey", ids[0], NULL);
    KR_ASSERT_EXIT(&o, 0);
    j = kr_json_parse((const char *)o.out, o.out_len);
    assert_non_null(j);
    uint8_t *dk = NULL;
    size_t dk_len = 0;
    assert_int_equal(kr_b64_decode(kr_json_str(kr_json_get(j, "plaintext")), &dk, &dk_len), 0);
    add_secret(s, "data key plaintext", dk, dk_len);
    free(dk);
    kr_json_free(j);
    kr_out_free(&o);
    /* and neither may the plaintext we send */
    assert_int_equal(RAND_bytes(plaintext, sizeof(plaintext)), 1);
    add_secret(s, "client plaintext", plaintext, sizeof(plaintext));
    use_keys(f, ids, plaintext, sizeof(plaintext));

    /* the scanner sees a planted copy, in raw and in hex, at the right spot */
    uint8_t planted[300];
    memset(planted, 'x', sizeof(planted));
    memcpy(planted + 123, known, sizeof(known));
    snprintf(path, sizeof(path), "%s/db/zz-leakscan-marker.bin", f->node.dir);
    assert_int_equal(kr_write_file(path, planted, sizeof(planted)), 0);
    int hits = scan_dir(s, f->node.dir);
    unlink(path);
    int found_at = 0;
    for (int i = 0; i < s->n_found && i < MAX_FINDINGS; i++)
        if (strcmp(s->found[i].path, path) == 0 && s->found[i].offset == 123)
            found_at = 1;
    if (!found_at) {
        report(s, "on the planted marker");
        fail_msg("the scanner did not find the planted secret at %s:123", path);
    }
    /* full, first window, last window: three needles at 123, 123, 139 */
    assert_true(hits >= 3);

    char hex_line[200];
    char khex[2 * WINDOW + 1];
    to_hex(known + sizeof(known) - WINDOW, WINDOW, khex);
    snprintf(hex_line, sizeof(hex_line), "2026-01-01 INFO something key=%s end\n", khex);
    snprintf(path, sizeof(path), "%s/zz-marker.log", f->node.dir);
    assert_int_equal(kr_write_file(path, hex_line, strlen(hex_line)), 0);
    hits = scan_dir(s, f->node.dir);
    unlink(path);
    assert_true(hits >= 1);
    /* a partial copy (the last 16 bytes only) is caught too */
    snprintf(path, sizeof(path), "%s/raft/zz-partial.bin", f->node.dir);
    assert_int_equal(kr_write_file(path, known + 16, 16), 0);
    hits = scan_dir(s, f->node.dir);
    unlink(path);
    assert_true(hits >= 1);
    OPENSSL_cleanse(known, sizeof(known));
}

static void test_no_leak_while_running(void **state)
{
    struct fixture *f = *state;

    assert_true(f->scan.n_needles > 30);
    assert_int_equal(kr_node_alive(&f->node), 1);
    assert_clean(f, "while the node runs");

    /* a crash must not write the key material out either: no core dumps */
    char path[64], line[256];
    int core_off = 0;
    snprintf(path, sizeof(path), "/proc/%d/limits", (int)f->node.pid);
    FILE *lim = fopen(path, "r");
    assert_non_null(lim);
    while (fgets(line, sizeof(line), lim) != NULL) {
        unsigned long soft = 1, hard = 1;
        if (strncmp(line, "Max core file size", 18) == 0 &&
            sscanf(line + 18, " %lu %lu", &soft, &hard) == 2)
            core_off = soft == 0 && hard == 0;
    }
    fclose(lim);
    if (!core_off)
        fail_msg("keyraftd may dump core (RLIMIT_CORE is not 0/0)");
}

static void test_no_leak_after_stop(void **state)
{
    struct fixture *f = *state;

    assert_int_equal(kr_node_stop(&f->node), 0);
    assert_clean(f, "after SIGTERM");
}

static void test_no_leak_after_kill9(void **state)
{
    struct fixture *f = *state;

    assert_int_equal(kr_node_start(&f->node), 0);
    /* load and use every key again, then die without any cleanup */
    use_keys(f, ids, plaintext, sizeof(plaintext));
    struct kr_out o;
    kr_cli(&f->node, NULL, 0, &o, "export", ids[3], NULL);
    KR_ASSERT_EXIT(&o, 0);
    kr_out_free(&o);
    assert_int_equal(kr_node_kill9(&f->node), 0);
    assert_clean(f, "after kill -9");
    for (int i = 0; i < 6; i++) {
        free(ids[i]);
        ids[i] = NULL;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scanner_finds_planted_secret),
        cmocka_unit_test(test_no_leak_while_running),
        cmocka_unit_test(test_no_leak_after_stop),
        cmocka_unit_test(test_no_leak_after_kill9),
    };

    if (getenv("KR_TEST_FILTER") != NULL) /* e.g. KR_TEST_FILTER=test_rotate */
        cmocka_set_test_filter(getenv("KR_TEST_FILTER"));
    return cmocka_run_group_tests_name("leakscan", tests, group_setup, group_teardown);
}
