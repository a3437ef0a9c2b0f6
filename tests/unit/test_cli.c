/* test_cli.c: the keyraft CLI's offline helpers (durations, times, counts,
 * group grants, lists, roles and names, the audit and "held for approval"
 * output formats), and the keyraft binary's approval flow (exit 3, --wait,
 * --approval) against a scripted fake node. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "cli_util.h"

/* ---- durations ------------------------------------------------------------------------ */

static uint64_t dur(const char *s)
{
    uint64_t v = 12345;
    assert_int_equal(cli_parse_duration_ms(s, &v), 0);
    return v;
}

static void dur_bad(const char *s)
{
    uint64_t v = 777;
    assert_int_equal(cli_parse_duration_ms(s, &v), KR_EINVAL);
    assert_int_equal(v, 777); /* untouched on failure */
}

static void test_duration(void **state)
{
    (void)state;
    assert_int_equal(dur("90s"), 90000);
    assert_int_equal(dur("15m"), 15 * 60000);
    assert_int_equal(dur("24h"), 24 * 3600000ull);
    assert_int_equal(dur("7d"), 7 * 86400000ull);
    assert_int_equal(dur("500ms"), 500);
    assert_int_equal(dur("1h30m"), 5400000);
    assert_int_equal(dur("1m1ms"), 60001);
    assert_int_equal(dur("10"), 10000); /* bare: seconds */
    assert_int_equal(dur("0"), 0);
    assert_int_equal(dur("0s"), 0);
    dur_bad("");
    dur_bad("5x");
    dur_bad("s");
    dur_bad("1h30");
    dur_bad("-5s");
    dur_bad("5 s");
    dur_bad("1.5h");
    dur_bad("99999999999999999999s");  /* the number overflows */
    dur_bad("18446744073709551615s");  /* the product overflows */
    dur_bad("18446744073709551s616ms"); /* the sum overflows */
    assert_int_equal(dur("18446744073709551s615ms"), UINT64_MAX);
    assert_int_equal(cli_parse_duration_ms(NULL, &(uint64_t){0}), KR_EINVAL);
}

/* ---- times ------------------------------------------------------------------------------ */

#define NOW 1795442400000ull /* 2026-11-23T14:00:00Z */

static uint64_t tm_ok(const char *s)
{
    uint64_t v = 1;
    assert_int_equal(cli_parse_time_ms(s, NOW, &v), 0);
    return v;
}

static void tm_bad(const char *s, uint64_t now)
{
    uint64_t v = 777;
    assert_int_equal(cli_parse_time_ms(s, now, &v), KR_EINVAL);
    assert_int_equal(v, 777);
}

static void test_time(void **state)
{
    (void)state;
    assert_int_equal(tm_ok("1700000000123"), 1700000000123ull);
    assert_int_equal(tm_ok("0"), 0);
    assert_int_equal(tm_ok("2026-11-23T14:00:00Z"), NOW);
    assert_int_equal(tm_ok("2026-11-23t14:00:00z"), NOW);
    assert_int_equal(tm_ok("2026-11-23 14:00:00Z"), NOW);
    assert_int_equal(tm_ok("2026-11-23T14:00:01.234Z"), NOW + 1234);
    assert_int_equal(tm_ok("2026-11-23T14:00:00.5Z"), NOW + 500);
    assert_int_equal(tm_ok("2026-11-23T14:00:00.123999Z"), NOW + 123);
    assert_int_equal(tm_ok("2026-11-23T16:00:00+02:00"), NOW);
    assert_int_equal(tm_ok("2026-11-23T13:30:00-00:30"), NOW);
    assert_int_equal(tm_ok("2026-11-23"), NOW - 14 * 3600000ull);
    assert_int_equal(tm_ok("2024-02-29"), 1709164800000ull); /* a leap day */
    assert_int_equal(tm_ok("1970-01-01T00:00:00Z"), 0);
    assert_int_equal(tm_ok("now"), NOW);
    assert_int_equal(tm_ok("-15m"), NOW - 15 * 60000);
    assert_int_equal(tm_ok("-2h"), NOW - 2 * 3600000);
    assert_int_equal(tm_ok("+1h"), NOW + 3600000);
    assert_int_equal(tm_ok("-90"), NOW - 90000);
    tm_bad("", NOW);
    tm_bad("yesterday", NOW);
    tm_bad("2026-11-23T14:00:00", NOW);      /* RFC 3339 needs an offset */
    tm_bad("2026-11-23T14:00Z", NOW);        /* and seconds */
    tm_bad("2026-02-30", NOW);
    tm_bad("2023-02-29", NOW);               /* not a leap year */
    tm_bad("2026-13-01", NOW);
    tm_bad("2026-11-23T24:00:00Z", NOW);
    tm_bad("2026-11-23T14:60:00Z", NOW);
    tm_bad("2026-11-23T14:00:00.Z", NOW);
    tm_bad("2026-11-23T14:00:00+2:00", NOW);
    tm_bad("2026-11-23T14:00:00Zjunk", NOW);
    tm_bad("26-11-23", NOW);
    tm_bad("1969-12-31T23:59:59Z", NOW);     /* before the epoch */
    tm_bad("-15x", NOW);
    tm_bad("-", NOW);
    tm_bad("-2h", 1000);                     /* before the epoch */
    tm_bad("12ab", NOW);
}

/* ---- counts ------------------------------------------------------------------------------ */

static void test_count(void **state)
{
    uint64_t v = 0;

    (void)state;
    assert_int_equal(cli_parse_count("2^32", &v), 0);
    assert_int_equal(v, 4294967296ull);
    assert_int_equal(cli_parse_count("4294967296", &v), 0);
    assert_int_equal(v, 4294967296ull);
    assert_int_equal(cli_parse_count("2^0", &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(cli_parse_count("2^63", &v), 0);
    assert_int_equal(v, 1ull << 63);
    assert_int_equal(cli_parse_count("0", &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(cli_parse_count("18446744073709551615", &v), 0);
    assert_int_equal(v, UINT64_MAX);
    v = 9;
    assert_int_equal(cli_parse_count("2^64", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("2^", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("2^32x", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("-1", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("1e6", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count(" 5", &v), KR_EINVAL);
    assert_int_equal(cli_parse_count("18446744073709551616", &v), KR_EINVAL);
    assert_int_equal(v, 9);
}

/* ---- grants, lists, roles, names ---------------------------------------------------------- */

static void grant_bad(const char *s)
{
    Keyraft__GroupGrant g;
    char err[128] = "";

    assert_int_equal(cli_parse_grant(s, &g, err, sizeof(err)), KR_EINVAL);
    assert_true(err[0] != '\0');
    assert_int_equal(g.n_ops, 0);
    cli_grant_clear(&g); /* safe after a failure */
}

static void test_grant(void **state)
{
    Keyraft__GroupGrant g;
    char err[128] = "";

    (void)state;
    assert_int_equal(cli_parse_grant("team-a:encrypt,decrypt", &g, err, sizeof(err)), 0);
    assert_string_equal(g.group, "team-a");
    assert_int_equal(g.n_ops, 2);
    assert_string_equal(g.ops[0], "encrypt");
    assert_string_equal(g.ops[1], "decrypt");
    /* It packs as the GroupGrant the node reads. */
    uint8_t buf[128];
    size_t len = keyraft__group_grant__pack(&g, buf);
    Keyraft__GroupGrant *back = keyraft__group_grant__unpack(NULL, len, buf);
    assert_non_null(back);
    assert_string_equal(back->group, "team-a");
    assert_int_equal(back->n_ops, 2);
    assert_string_equal(back->ops[1], "decrypt");
    keyraft__group_grant__free_unpacked(back, NULL);
    cli_grant_clear(&g);
    assert_int_equal(g.n_ops, 0);

    assert_int_equal(cli_parse_grant("ops:export", &g, err, sizeof(err)), 0);
    assert_string_equal(g.group, "ops");
    assert_int_equal(g.n_ops, 1);
    assert_string_equal(g.ops[0], "export");
    cli_grant_clear(&g);

    grant_bad("team");
    grant_bad(":encrypt");
    grant_bad("team:");
    grant_bad("team:encrypt,,decrypt");
    grant_bad("team:encrypt,");
    grant_bad("team:encrypt decrypt");
    grant_bad("te am:encrypt");
    grant_bad("a,b:encrypt");
    grant_bad("team:enc$rypt");
    grant_bad("team:a:b");
}

static void test_list_roles_names(void **state)
{
    char **items = NULL, err[128];
    size_t n = 0;

    (void)state;
    assert_int_equal(cli_split_list("officer,user,auditor", &items, &n), 0);
    assert_int_equal(n, 3);
    assert_string_equal(items[2], "auditor");
    assert_int_equal(cli_check_roles(items, n, err, sizeof(err)), 0);
    cli_list_free(items, n);
    assert_int_equal(cli_split_list("a,,b", &items, &n), KR_EINVAL);
    assert_int_equal(cli_split_list("", &items, &n), KR_EINVAL);
    assert_int_equal(cli_split_list("a, b", &items, &n), KR_EINVAL);

    char *admin[] = {"admin"}, *admin_user[] = {"user", "admin"}, *twice[] = {"user", "user"};
    char *root[] = {"root"};
    assert_int_equal(cli_check_roles(admin, 1, err, sizeof(err)), 0);
    assert_int_equal(cli_check_roles(admin_user, 2, err, sizeof(err)), KR_EINVAL);
    assert_non_null(strstr(err, "admin may not be combined"));
    assert_int_equal(cli_check_roles(twice, 2, err, sizeof(err)), KR_EINVAL);
    assert_int_equal(cli_check_roles(root, 1, err, sizeof(err)), KR_EINVAL);
    assert_non_null(strstr(err, "root"));
    assert_int_equal(cli_check_roles(NULL, 0, err, sizeof(err)), KR_EINVAL);

    assert_true(cli_valid_principal("alice"));
    assert_true(cli_valid_principal("svc.payments@eu-1"));
    assert_false(cli_valid_principal(""));
    assert_false(cli_valid_principal(".hidden"));
    assert_false(cli_valid_principal("-opt"));
    assert_false(cli_valid_principal("../etc"));
    assert_false(cli_valid_principal("a b"));
    assert_false(cli_valid_principal("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")); /* 65 */

    assert_true(cli_valid_quorum_op("domain_destroy"));
    assert_true(cli_valid_quorum_op("principal_admin"));
    assert_false(cli_valid_quorum_op("encrypt"));
    assert_false(cli_valid_quorum_op(NULL));
}

/* ---- formats ------------------------------------------------------------------------------ */

static void test_format(void **state)
{
    char buf[64];

    (void)state;
    cli_format_time(0, buf, sizeof(buf));
    assert_string_equal(buf, "1970-01-01T00:00:00.000Z");
    cli_format_time(1700000000123ull, buf, sizeof(buf));
    assert_string_equal(buf, "2023-11-14T22:13:20.123Z");
    /* What the parser reads back. */
    uint64_t back = 0;
    assert_int_equal(cli_parse_time_ms(buf, 0, &back), 0);
    assert_int_equal(back, 1700000000123ull);

    cli_format_duration(90000, buf, sizeof(buf));
    assert_string_equal(buf, "1m30s");
    cli_format_duration(86400000ull + 2 * 3600000ull + 5000, buf, sizeof(buf));
    assert_string_equal(buf, "1d2h");
    cli_format_duration(45000, buf, sizeof(buf));
    assert_string_equal(buf, "45s");
    cli_format_duration(3600000, buf, sizeof(buf));
    assert_string_equal(buf, "1h");
    cli_format_duration(999, buf, sizeof(buf));
    assert_string_equal(buf, "0s");

    char *hex = cli_hex((const uint8_t *)"\x00\xab\xff", 3);
    assert_string_equal(hex, "00abff");
    free(hex);

    assert_string_equal(cli_approval_state_name(KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED),
                        "denied");
    assert_string_equal(cli_approval_state_name(KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED),
                        "approved");
}

/* ---- audit output --------------------------------------------------------------------------- */

/* A packed record in |e| (e->record.data malloc'd). */
static void make_entry(Keyraft__AuditEntry *e, const Keyraft__AuditRecord *r, uint8_t *hash,
                       uint8_t *prev)
{
    keyraft__audit_entry__init(e);
    e->seq = 7;
    e->hash.data = hash;
    e->hash.len = 4;
    e->prev_hash.data = prev;
    e->prev_hash.len = 2;
    e->record.len = keyraft__audit_record__get_packed_size(r);
    e->record.data = malloc(e->record.len + 1);
    assert_non_null(e->record.data);
    keyraft__audit_record__pack(r, e->record.data);
}

static void test_audit_json(void **state)
{
    Keyraft__AuditRecord r = KEYRAFT__AUDIT_RECORD__INIT;
    Keyraft__AuditCheckpoint cp = KEYRAFT__AUDIT_CHECKPOINT__INIT;
    Keyraft__AuditEntry e;
    uint8_t hash[4] = {0xde, 0xad, 0xbe, 0xef}, prev[2] = {0x00, 0x01}, sig[2] = {0x30, 0x45};
    char *ids[] = {"ap1", "ap2"};

    (void)state;
    r.time_ms = 1700000000123ull;
    r.node_id = 2;
    r.principal = "alice";
    r.operation = "export";
    r.key_id = "k1";
    r.key_version = 3;
    r.status = KR_EPERM;
    r.message = "no grant";
    r.client_address = "10.0.0.5:4242";
    r.n_approval_ids = 2;
    r.approval_ids = ids;
    r.domain = "payments";
    r.request_id = "r-1";
    make_entry(&e, &r, hash, prev);

    json_t *j = cli_audit_entry_json(&e);
    assert_non_null(j);
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(
        s, "{\"approval_ids\":[\"ap1\",\"ap2\"],\"client\":\"10.0.0.5:4242\",\"count\":1,\"domain\":"
           "\"payments\",\"hash\":\"deadbeef\",\"key_id\":\"k1\",\"message\":\"no grant\","
           "\"node\":2,\"operation\":\"export\",\"prev_hash\":\"0001\",\"principal\":\"alice\","
           "\"request_id\":\"r-1\",\"seq\":7,\"status\":\"KR_EPERM\",\"time\":"
           "\"2023-11-14T22:13:20.123Z\",\"version\":3}");
    free(s);
    json_decref(j);

    char line[512];
    cli_audit_entry_line(&e, line, sizeof(line));
    assert_string_equal(line, "7 2023-11-14T22:13:20.123Z 2 alice export k1:3 KR_EPERM "
                              "\"no grant\" approvals=ap1,ap2");
    /* A short buffer truncates, never overflows. */
    char small[12];
    cli_audit_entry_line(&e, small, sizeof(small));
    assert_string_equal(small, "7 2023-11-1");
    free(e.record.data);

    /* A batch's tallied reads say how many requests the record stands for. */
    r.count = 100;
    r.n_approval_ids = 0;
    make_entry(&e, &r, hash, prev);
    cli_audit_entry_line(&e, line, sizeof(line));
    assert_string_equal(line, "7 2023-11-14T22:13:20.123Z 2 alice export k1:3 KR_EPERM "
                              "\"no grant\" x100");
    j = cli_audit_entry_json(&e);
    s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_non_null(strstr(s, "\"count\":100,"));
    free(s);
    json_decref(j);
    free(e.record.data);

    /* A checkpoint record, empty strings as they come. */
    Keyraft__AuditRecord c = KEYRAFT__AUDIT_RECORD__INIT;
    c.time_ms = 1000;
    c.node_id = 1;
    c.operation = "audit_checkpoint";
    cp.seq = 6;
    cp.hash.data = prev;
    cp.hash.len = 2;
    cp.node_id = 1;
    cp.signature.data = sig;
    cp.signature.len = 2;
    c.checkpoint = &cp;
    make_entry(&e, &c, hash, prev);
    j = cli_audit_entry_json(&e);
    assert_non_null(j);
    s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(
        s, "{\"approval_ids\":[],\"checkpoint\":{\"hash\":\"0001\",\"node\":1,\"seq\":6,"
           "\"signature\":\"3045\"},\"client\":\"\",\"count\":1,\"domain\":\"\",\"hash\":\"deadbeef\","
           "\"key_id\":\"\",\"message\":\"\",\"node\":1,\"operation\":\"audit_checkpoint\","
           "\"prev_hash\":\"0001\",\"principal\":\"\",\"request_id\":\"\",\"seq\":7,\"status\":"
           "\"KR_OK\",\"time\":\"1970-01-01T00:00:01.000Z\",\"version\":0}");
    free(s);
    json_decref(j);
    cli_audit_entry_line(&e, line, sizeof(line));
    assert_string_equal(line, "7 1970-01-01T00:00:01.000Z 1 - audit_checkpoint - KR_OK");
    free(e.record.data);

    /* A record that does not decode is kept as raw hex. */
    uint8_t junk[3] = {0x0a, 0x05, 0x01}; /* a length past the end */
    keyraft__audit_entry__init(&e);
    e.seq = 9;
    e.record.data = junk;
    e.record.len = sizeof(junk);
    j = cli_audit_entry_json(&e);
    assert_non_null(j);
    s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(s, "{\"hash\":\"\",\"prev_hash\":\"\",\"raw\":\"0a0501\",\"seq\":9}");
    free(s);
    json_decref(j);
    cli_audit_entry_line(&e, line, sizeof(line));
    assert_string_equal(line, "9 (undecodable record of 3 bytes)");

    /* A message with a newline stays on one line. */
    Keyraft__AuditRecord m = KEYRAFT__AUDIT_RECORD__INIT;
    m.principal = "bob smith";
    m.operation = "get";
    m.message = "two\nlines";
    make_entry(&e, &m, hash, prev);
    cli_audit_entry_line(&e, line, sizeof(line));
    assert_null(strchr(line, '\n'));
    assert_non_null(strstr(line, " bob_smith get - KR_OK \"two lines\""));
    free(e.record.data);
}

/* ---- held for approval -------------------------------------------------------------------------- */

static void test_pending_output(void **state)
{
    char *out_s = NULL, *err_s = NULL;
    size_t out_n = 0, err_n = 0;
    FILE *out, *err;

    (void)state;
    out = open_memstream(&out_s, &out_n);
    err = open_memstream(&err_s, &err_n);
    assert_int_equal(cli_print_pending(out, err, 0, "ab12", "export needs 2 approvals", NULL),
                     CLI_EXIT_PENDING);
    fclose(out);
    fclose(err);
    assert_string_equal(out_s, "");
    assert_string_equal(err_s, "held for approval ab12: export needs 2 approvals\n");
    free(out_s);
    free(err_s);

    out = open_memstream(&out_s, &out_n);
    err = open_memstream(&err_s, &err_n);
    assert_int_equal(cli_print_pending(out, err, 1, "ab12", "", "run it again"),
                     CLI_EXIT_PENDING);
    fclose(out);
    fclose(err);
    assert_string_equal(err_s, "held for approval ab12: held for quorum approval\nrun it again\n");
    json_error_t jerr;
    json_t *j = json_loads(out_s, 0, &jerr);
    assert_non_null(j);
    assert_true(json_is_true(json_object_get(j, "pending")));
    assert_string_equal(json_string_value(json_object_get(j, "approval_id")), "ab12");
    assert_string_equal(json_string_value(json_object_get(j, "message")),
                        "held for quorum approval");
    assert_int_equal(json_object_size(j), 3);
    json_decref(j);
    free(out_s);
    free(err_s);
}

/* ---- the keyraft binary against a scripted fake node ------------------------------------- */

struct pki {
    char dir[64], ca[96], cert[96], key[96], conf[96], out[96], err[96];
    EVP_PKEY *ca_key, *srv_key;
    X509 *ca_cert, *srv_cert;
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

/* A certificate for |key| named |cn|, signed by the CA (self-signed when
 * |issuer| is NULL). */
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

/* What the fake does with a held request's approval, step by step. */
enum script {
    S_PENDING,       /* every request: KR_EPENDING ap-1 */
    S_APPROVE,       /* export: held; show: pending, then approved; export with ap-1: runs */
    S_DENY,          /* export: held; show: denied */
    S_DONE,          /* export: held; show: done with KR_OK */
    S_NEVER,         /* export: held; show: pending forever */
    S_ANSWER,        /* everything answered with a key */
};

#define FAKE_MAX 16

struct fake {
    int lfd, port;
    SSL_CTX *ctx;
    enum script script;
    pthread_t thread;
    pthread_mutex_t mu;
    int stop;
    int n;                                   /* requests seen */
    int shows;                               /* approval_show requests seen */
    Keyraft__Request__OpCase op[FAKE_MAX];   /* in order */
    char approval_id[FAKE_MAX][32];
    char request_id[FAKE_MAX][64];
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

static void fake_answer(struct fake *f, const Keyraft__Request *req, Keyraft__Response *resp,
                        Keyraft__ApprovalInfo *ai, Keyraft__ExportKeyResponse *ex,
                        Keyraft__KeyAttributes *key)
{
    static uint8_t material[2] = {0x01, 0x02};

    resp->id = req->id;
    key->id = (char *)"k1";
    ai->id = (char *)"ap-1";
    ai->operation = (char *)"export";
    ai->required = 2;
    if (f->script == S_ANSWER) {
        resp->result_case = KEYRAFT__RESPONSE__RESULT_KEY;
        resp->key = key;
        return;
    }
    if (req->op_case == KEYRAFT__REQUEST__OP_APPROVAL_SHOW) {
        f->shows++;
        ai->state = KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING;
        if (f->script == S_APPROVE && f->shows >= 2)
            ai->state = KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED;
        else if (f->script == S_DENY)
            ai->state = KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED;
        else if (f->script == S_DONE)
            ai->state = KEYRAFT__APPROVAL_STATE__APPROVAL_DONE;
        resp->result_case = KEYRAFT__RESPONSE__RESULT_APPROVAL;
        resp->approval = ai;
        return;
    }
    if (f->script == S_APPROVE && strcmp(req->approval_id, "ap-1") == 0) {
        ex->material.data = material;
        ex->material.len = sizeof(material);
        ex->version = 1;
        resp->result_case = KEYRAFT__RESPONSE__RESULT_EXPORT;
        resp->export = ex;
        return;
    }
    resp->status = KR_EPENDING;
    resp->message = (char *)"export needs 2 approvals";
    resp->approval_id = (char *)"ap-1";
}

static void fake_serve(struct fake *f, int fd)
{
    struct timeval tv = {.tv_sec = 5};
    SSL *ssl = SSL_new(f->ctx);
    uint8_t hdr[4], *body = NULL, frame[2048];

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
        Keyraft__Response resp = KEYRAFT__RESPONSE__INIT;
        Keyraft__ApprovalInfo ai = KEYRAFT__APPROVAL_INFO__INIT;
        Keyraft__ExportKeyResponse ex = KEYRAFT__EXPORT_KEY_RESPONSE__INIT;
        Keyraft__KeyAttributes key = KEYRAFT__KEY_ATTRIBUTES__INIT;
        pthread_mutex_lock(&f->mu);
        if (f->n < FAKE_MAX) {
            f->op[f->n] = req->op_case;
            snprintf(f->approval_id[f->n], sizeof(f->approval_id[0]), "%s", req->approval_id);
            snprintf(f->request_id[f->n], sizeof(f->request_id[0]), "%s", req->request_id);
        }
        f->n++;
        fake_answer(f, req, &resp, &ai, &ex, &key);
        pthread_mutex_unlock(&f->mu);
        size_t rlen = keyraft__response__get_packed_size(&resp);
        int ok = rlen + 4 <= sizeof(frame);
        if (ok) {
            frame[0] = (uint8_t)(rlen >> 24);
            frame[1] = (uint8_t)(rlen >> 16);
            frame[2] = (uint8_t)(rlen >> 8);
            frame[3] = (uint8_t)rlen;
            keyraft__response__pack(&resp, frame + 4);
            ok = SSL_write(ssl, frame, (int)(rlen + 4)) == (int)(rlen + 4);
        }
        keyraft__request__free_unpacked(req, NULL);
        if (!ok)
            break;
    }
    SSL_shutdown(ssl);
out:
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

static void fake_start(struct fake *f, enum script script)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    FILE *conf;

    memset(f, 0, sizeof(*f));
    f->script = script;
    pthread_mutex_init(&f->mu, NULL);
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(f->lfd >= 0);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(f->lfd, 8), 0);
    assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&sa, &len), 0);
    f->port = ntohs(sa.sin_port);
    f->ctx = SSL_CTX_new(TLS_server_method());
    assert_non_null(f->ctx);
    assert_int_equal(SSL_CTX_use_certificate(f->ctx, P.srv_cert), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey(f->ctx, P.srv_key), 1);
    conf = fopen(P.conf, "w");
    assert_non_null(conf);
    fprintf(conf, "[client]\nendpoints = 127.0.0.1:%d\nca = %s\ncert = %s\nkey = %s\n"
            "timeout_ms = 5000\n", f->port, P.ca, P.cert, P.key);
    fclose(conf);
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

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf = calloc(1, 65536);

    assert_non_null(f);
    assert_non_null(buf);
    size_t n = fread(buf, 1, 65535, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Runs the keyraft binary with --config and |argv| (NULL-terminated), stdout
 * and stderr to files; returns its exit code. Bounded: killed after 30 s. */
static int run_cli(const char *const *argv)
{
    const char *dir = getenv("KR_BUILD_DIR");
    char bin[512];
    const char *args[32];
    int n = 0, status = 0;

    snprintf(bin, sizeof(bin), "%s/keyraft", dir);
    args[n++] = bin;
    args[n++] = "--config";
    args[n++] = P.conf;
    for (; *argv != NULL && n < 31; argv++)
        args[n++] = *argv;
    args[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int out = open(P.out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int err = open(P.err, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int in = open("/dev/null", O_RDONLY);
        if (out < 0 || err < 0 || in < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0 ||
            dup2(in, 0) < 0)
            _exit(127);
        execv(bin, (char *const *)args);
        _exit(127);
    }
    for (int waited = 0;; waited += 20) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        assert_true(r >= 0);
        if (r == pid)
            break;
        if (waited > 30000) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("keyraft did not finish in 30 s");
        }
        usleep(20000);
    }
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

static int fake_setup(void **state)
{
    EVP_PKEY *cli_key = NULL;
    X509 *cli_cert = NULL;
    int rc = -1;

    (void)state;
    if (getenv("KR_BUILD_DIR") == NULL)
        return 0; /* the tests skip: they need the built keyraft binary */
    strcpy(P.dir, "/tmp/test_cli.XXXXXX");
    if (mkdtemp(P.dir) == NULL)
        return -1;
    snprintf(P.ca, sizeof(P.ca), "%s/ca.pem", P.dir);
    snprintf(P.cert, sizeof(P.cert), "%s/client.pem", P.dir);
    snprintf(P.key, sizeof(P.key), "%s/client.key", P.dir);
    snprintf(P.conf, sizeof(P.conf), "%s/client.conf", P.dir);
    snprintf(P.out, sizeof(P.out), "%s/stdout", P.dir);
    snprintf(P.err, sizeof(P.err), "%s/stderr", P.dir);
    P.ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    P.srv_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    cli_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (P.ca_key == NULL || P.srv_key == NULL || cli_key == NULL)
        goto out;
    P.ca_cert = make_cert(P.ca_key, "test CA", NULL, NULL, NULL);
    if (P.ca_cert == NULL)
        goto out;
    P.srv_cert = make_cert(P.srv_key, "node-1", P.ca_cert, P.ca_key, "IP:127.0.0.1");
    cli_cert = make_cert(cli_key, "alice", P.ca_cert, P.ca_key, NULL);
    if (P.srv_cert == NULL || cli_cert == NULL)
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

static int fake_teardown(void **state)
{
    (void)state;
    if (P.dir[0] == '\0')
        return 0;
    unlink(P.ca);
    unlink(P.cert);
    unlink(P.key);
    unlink(P.conf);
    unlink(P.out);
    unlink(P.err);
    rmdir(P.dir);
    X509_free(P.ca_cert);
    X509_free(P.srv_cert);
    EVP_PKEY_free(P.ca_key);
    EVP_PKEY_free(P.srv_key);
    return 0;
}

#define NEED_BINARY()                                                                          \
    do {                                                                                       \
        if (P.dir[0] == '\0')                                                                  \
            skip();                                                                            \
    } while (0)

static void test_held_exits_3(void **state)
{
    struct fake f;
    char *out, *err;

    (void)state;
    NEED_BINARY();
    fake_start(&f, S_PENDING);
    assert_int_equal(run_cli((const char *[]){"--json", "export", "k1", NULL}), 3);
    out = slurp(P.out);
    err = slurp(P.err);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    assert_non_null(j);
    assert_true(json_is_true(json_object_get(j, "pending")));
    assert_string_equal(json_string_value(json_object_get(j, "approval_id")), "ap-1");
    assert_string_equal(json_string_value(json_object_get(j, "message")),
                        "export needs 2 approvals");
    json_decref(j);
    assert_non_null(strstr(err, "held for approval ap-1: export needs 2 approvals\n"));
    assert_non_null(strstr(err, "--approval ap-1"));
    free(out);
    free(err);
    /* Human output: nothing on stdout. */
    assert_int_equal(run_cli((const char *[]){"destroy", "k1", NULL}), 3);
    out = slurp(P.out);
    assert_string_equal(out, "");
    free(out);
    fake_stop(&f);
    assert_int_equal(f.n, 2);
    assert_int_equal(f.op[0], KEYRAFT__REQUEST__OP_EXPORT);
    assert_string_equal(f.approval_id[0], "");
}

static void test_wait_then_approved_resends(void **state)
{
    struct fake f;
    char *out;

    (void)state;
    NEED_BINARY();
    fake_start(&f, S_APPROVE);
    assert_int_equal(run_cli((const char *[]){"--wait", "20", "export", "k1", NULL}), 0);
    out = slurp(P.out);
    assert_string_equal(out, "0102\n"); /* the re-sent export's result */
    free(out);
    fake_stop(&f);
    assert_int_equal(f.n, 4);
    assert_int_equal(f.op[0], KEYRAFT__REQUEST__OP_EXPORT);
    assert_string_equal(f.approval_id[0], "");
    assert_int_equal(f.op[1], KEYRAFT__REQUEST__OP_APPROVAL_SHOW);
    assert_int_equal(f.op[2], KEYRAFT__REQUEST__OP_APPROVAL_SHOW);
    assert_string_equal(f.approval_id[2], ""); /* polls carry no approval */
    assert_int_equal(f.op[3], KEYRAFT__REQUEST__OP_EXPORT);
    assert_string_equal(f.approval_id[3], "ap-1");
}

static void test_wait_denied_done_and_timeout(void **state)
{
    struct fake f;
    char *out, *err;

    (void)state;
    NEED_BINARY();
    fake_start(&f, S_DENY);
    assert_int_equal(run_cli((const char *[]){"--wait", "20", "export", "k1", NULL}), 1);
    err = slurp(P.err);
    assert_non_null(strstr(err, "approval ap-1 was denied"));
    free(err);
    fake_stop(&f);
    assert_int_equal(f.n, 2); /* nothing sent again */

    fake_start(&f, S_DONE);
    assert_int_equal(run_cli((const char *[]){"--wait", "20", "export", "k1", NULL}), 0);
    out = slurp(P.out);
    assert_non_null(strstr(out, "approval ap-1 ran: KR_OK"));
    free(out);
    fake_stop(&f);
    assert_int_equal(f.n, 2);

    fake_start(&f, S_NEVER);
    assert_int_equal(run_cli((const char *[]){"--wait", "2", "export", "k1", NULL}), 3);
    err = slurp(P.err);
    assert_non_null(strstr(err, "held for approval ap-1: export needs 2 approvals\n"));
    free(err);
    fake_stop(&f);
    assert_true(f.n >= 2 && f.n <= 4); /* about one poll a second */
}

static void test_approval_option_is_sent(void **state)
{
    struct fake f;
    char *out;

    (void)state;
    NEED_BINARY();
    fake_start(&f, S_ANSWER);
    assert_int_equal(run_cli((const char *[]){"--approval", "ab12", "destroy", "k1", NULL}), 0);
    out = slurp(P.out);
    assert_non_null(strstr(out, "id: k1"));
    free(out);
    assert_int_equal(run_cli((const char *[]){"create", "--name", "n", "--alg", "aes-256",
                                              "--domain", "pay", "--owner-group", "ops",
                                              "--allow", "audit:decrypt", "--usage-limit",
                                              "2^32", NULL}),
                     0);
    fake_stop(&f);
    assert_int_equal(f.n, 2);
    assert_int_equal(f.op[0], KEYRAFT__REQUEST__OP_DESTROY);
    assert_string_equal(f.approval_id[0], "ab12");
    assert_true(strlen(f.request_id[0]) == 44); /* a write: it carries a request id */
    assert_string_equal(f.approval_id[1], "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_duration),
        cmocka_unit_test(test_time),
        cmocka_unit_test(test_count),
        cmocka_unit_test(test_grant),
        cmocka_unit_test(test_list_roles_names),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_audit_json),
        cmocka_unit_test(test_pending_output),
    };
    const struct CMUnitTest binary_tests[] = {
        cmocka_unit_test(test_held_exits_3),
        cmocka_unit_test(test_wait_then_approved_resends),
        cmocka_unit_test(test_wait_denied_done_and_timeout),
        cmocka_unit_test(test_approval_option_is_sent),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    failed += cmocka_run_group_tests(binary_tests, fake_setup, fake_teardown);
    return failed;
}
