/* test_config.c: node config loading, validation, writing, PIN sources and
 * HOST:PORT parsing. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"

#define PIN_VAR "KR_TEST_CONFIG_PIN"

/* A node directory: etc/ holds the config and, relative to it, the TLS files,
 * a stand-in PKCS#11 module and a PIN file. */
struct fx {
    char dir[64];
    char real[PATH_MAX]; /* dir with symlinks resolved (/tmp may be one) */
    char etc[PATH_MAX];
    char conf[PATH_MAX];
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void mkdir_in(const struct fx *f, const char *rel)
{
    char p[PATH_MAX + 64];
    snprintf(p, sizeof(p), "%s/%s", f->dir, rel);
    assert_int_equal(mkdir(p, 0700), 0);
}

static void file_in(const struct fx *f, const char *rel, const char *text)
{
    char p[PATH_MAX + 64];
    snprintf(p, sizeof(p), "%s/%s", f->dir, rel);
    write_file(p, text);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-config-XXXXXX");
    if (mkdtemp(f->dir) == NULL || realpath(f->dir, f->real) == NULL) {
        free(f);
        return -1;
    }
    int n = snprintf(f->etc, sizeof(f->etc), "%s/etc", f->real);
    if (n < 0 || (size_t)n >= sizeof(f->etc)) {
        free(f);
        return -1;
    }
    snprintf(f->conf, sizeof(f->conf), "%s/etc/keyraft.conf", f->dir);
    mkdir_in(f, "etc");
    mkdir_in(f, "etc/certs");
    mkdir_in(f, "etc/lib");
    file_in(f, "etc/certs/ca.pem", "ca\n");
    file_in(f, "etc/certs/node.pem", "cert\n");
    file_in(f, "etc/certs/node.key", "key\n");
    file_in(f, "etc/lib/pkcs11.so", "module\n");
    file_in(f, "etc/pin.txt", "4321\n");
    unsetenv(PIN_VAR);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    unsetenv(PIN_VAR);
    int rc = nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return rc;
}

/* Every setting, paths relative to the file. */
static const char FULL[] = "# test node\n"
                           "[node]\n"
                           "id = 3\n"
                           "data_dir = data\n"
                           "listen = 0.0.0.0:7400\n"
                           "raft_address = 10.0.0.3:7401\n"
                           "log_level = debug\n"
                           "\n"
                           "[tls]\n"
                           "ca = certs/ca.pem\n"
                           "cert = certs/node.pem\n"
                           "key = ./certs/node.key\n"
                           "\n"
                           "[hsm]\n"
                           "module = lib/pkcs11.so\n"
                           "token_label = keyraft-token\n"
                           "mwk_label = mwk-2024\n"
                           "pin_file = pin.txt\n"
                           "pin_env = " PIN_VAR "\n"
                           "softhsm_conf = softhsm2.conf\n"
                           "\n"
                           "[policy]\n"
                           "allow_export = no\n"
                           "key_cache_idle_s = 0\n"
                           "\n"
                           "[limits]\n"
                           "max_frame = 1048576\n"
                           "max_connections = 250\n"
                           "list_max = 500\n"
                           "\n"
                           "[raft]\n"
                           "snapshot_log_mb = 8\n"
                           "\n"
                           "[audit]\n"
                           "enabled = false\n"
                           "flush_ms = 50\n"
                           "max_pending = 5000\n"
                           "max_lag_ms = 700\n"
                           "fail_open_reads = yes\n"
                           "checkpoint_ms = 2500\n";

/* The least a node needs. */
static const char MINIMAL[] = "[node]\n"
                              "data_dir = /var/lib/keyraft\n"
                              "[tls]\n"
                              "ca = certs/ca.pem\n"
                              "cert = certs/node.pem\n"
                              "key = certs/node.key\n"
                              "[hsm]\n"
                              "module = lib/pkcs11.so\n"
                              "token_label = tok\n";

static int load_text(struct fx *f, const char *text, struct config *c)
{
    write_file(f->conf, text);
    return config_load(f->conf, c);
}

/* Loads MINIMAL followed by one more line in |section|. */
static int load_with(struct fx *f, const char *section, const char *line)
{
    char text[sizeof(MINIMAL) + 512];
    snprintf(text, sizeof(text), "%s[%s]\n%s\n", MINIMAL, section, line);
    struct config c;
    return load_text(f, text, &c);
}

static void expect_path(const struct fx *f, const char *got, const char *rel)
{
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "%s/%s", f->etc, rel);
    assert_string_equal(got, want);
}

static void check_full(const struct fx *f, const struct config *c)
{
    assert_int_equal(c->node_id, 3);
    expect_path(f, c->data_dir, "data");
    assert_string_equal(c->listen, "0.0.0.0:7400");
    assert_string_equal(c->raft_address, "10.0.0.3:7401");
    assert_string_equal(c->log_level, "debug");
    expect_path(f, c->tls_ca, "certs/ca.pem");
    expect_path(f, c->tls_cert, "certs/node.pem");
    expect_path(f, c->tls_key, "./certs/node.key");
    expect_path(f, c->hsm_module, "lib/pkcs11.so");
    assert_string_equal(c->hsm_token_label, "keyraft-token");
    assert_string_equal(c->hsm_mwk_label, "mwk-2024");
    expect_path(f, c->hsm_pin_file, "pin.txt");
    assert_string_equal(c->hsm_pin_env, PIN_VAR);
    expect_path(f, c->hsm_softhsm_conf, "softhsm2.conf");
    assert_int_equal(c->allow_export, 0);
    assert_int_equal(c->key_cache_idle_s, 0);
    assert_int_equal(c->max_frame, 1048576);
    assert_int_equal(c->max_connections, 250);
    assert_int_equal(c->list_max, 500);
    assert_int_equal(c->audit_enabled, 0);
    assert_int_equal(c->audit_flush_ms, 50);
    assert_int_equal(c->audit_max_pending, 5000);
    assert_int_equal(c->audit_max_lag_ms, 700);
    assert_int_equal(c->audit_fail_open_reads, 1);
    assert_int_equal(c->audit_checkpoint_ms, 2500);
    assert_int_equal(c->raft_snapshot_log_mb, 8);
}

static void test_load_full_file(void **state)
{
    struct fx *f = *state;
    struct config c;
    assert_int_equal(load_text(f, FULL, &c), 0);
    check_full(f, &c);
}

/* Relative paths follow the file, not the working directory. */
static void test_relative_paths_resolve_against_file_dir(void **state)
{
    struct fx *f = *state;
    write_file(f->conf, FULL);
    char cwd[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(f->dir), 0);
    struct config c;
    int rv = config_load("etc/keyraft.conf", &c);
    assert_int_equal(chdir("etc/certs"), 0);
    struct config c2;
    int rv2 = config_load("../keyraft.conf", &c2);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rv, 0);
    assert_int_equal(rv2, 0);
    check_full(f, &c);
    check_full(f, &c2);
    assert_true(c.data_dir[0] == '/');

    /* Absolute paths stay as written. */
    assert_int_equal(load_text(f, MINIMAL, &c), 0);
    assert_string_equal(c.data_dir, "/var/lib/keyraft");
}

static void test_defaults(void **state)
{
    struct fx *f = *state;
    struct config c;
    assert_int_equal(load_text(f, MINIMAL, &c), 0);
    assert_int_equal(c.node_id, 1);
    assert_string_equal(c.listen, "127.0.0.1:7300");
    assert_string_equal(c.raft_address, "127.0.0.1:7301");
    assert_string_equal(c.log_level, "info");
    assert_string_equal(c.hsm_mwk_label, "keyraft-mwk");
    assert_string_equal(c.hsm_pin_env, "KEYRAFT_HSM_PIN");
    assert_string_equal(c.hsm_pin_file, "");
    assert_string_equal(c.hsm_softhsm_conf, "");
    assert_int_equal(c.allow_export, 1);
    assert_int_equal(c.key_cache_idle_s, 10);
    assert_int_equal(c.max_frame, KR_MAX_FRAME);
    assert_int_equal(c.max_connections, 4096);
    assert_int_equal(c.list_max, 1000);
    assert_int_equal(c.audit_enabled, 1);
    assert_int_equal(c.audit_flush_ms, 20);
    assert_int_equal(c.audit_max_pending, 100000);
    assert_int_equal(c.audit_max_lag_ms, 3000);
    assert_int_equal(c.audit_fail_open_reads, 0);
    assert_int_equal(c.audit_checkpoint_ms, 10000);
    assert_int_equal(c.raft_snapshot_log_mb, 64);

    struct config d;
    config_defaults(&d);
    assert_string_equal(d.hsm_module, "/usr/lib/softhsm/libsofthsm2.so");
    assert_int_equal(d.max_frame, KR_MAX_FRAME);
}

static void test_unknown_setting_refused(void **state)
{
    struct fx *f = *state;
    assert_int_equal(load_with(f, "node", "idd = 2"), KR_ECONFIG);
    assert_int_equal(load_with(f, "nodes", "id = 2"), KR_ECONFIG);
    assert_int_equal(load_with(f, "tls", "ciphers = ALL"), KR_ECONFIG);
    /* Keys are not matched across sections. */
    assert_int_equal(load_with(f, "limits", "id = 2"), KR_ECONFIG);
    assert_int_equal(load_with(f, "node", "id = 2"), 0);
}

static void test_bad_values_refused(void **state)
{
    struct fx *f = *state;
    static const char *const bad[][2] = {
        {"node", "id = 0"},
        {"node", "id = -1"},
        {"node", "id = three"},
        {"node", "id = 3x"},
        {"node", "id = 18446744073709551616"},
        {"node", "listen = 127.0.0.1:0"},
        {"node", "listen = 127.0.0.1"},
        {"node", "listen = :7300"},
        {"node", "raft_address = 10.0.0.1:65536"},
        {"node", "raft_address = 10.0.0.1:http"},
        {"node", "log_level = chatty"},
        {"node", "data_dir ="},
        {"limits", "max_frame = 1023"},
        {"limits", "max_frame = 0"},
        {"limits", "max_frame = 67108865"},
        {"limits", "max_connections = 0"},
        {"limits", "list_max = 100001"},
        {"policy", "allow_export = maybe"},
        {"hsm", "token_label = a-token-label-of-33-characters-xx"},
        {"hsm", "token_label ="},
        {"audit", "enabled = sometimes"},
        {"audit", "flush_ms = 0"},
        {"audit", "flush_ms = 10001"},
        {"audit", "max_pending = 999"},
        {"audit", "max_lag_ms = 99"},
        {"audit", "max_lag_ms = -5"},
        {"audit", "fail_open_reads = 2"},
        {"audit", "checkpoint_ms = 99"},
        {"audit", "checkpoint_ms = 10s"},
        {"audit", "flush = 20"},
        {"raft", "snapshot_log_mb = 0"},
        {"policy", "key_cache_idle_s = 3601"},
        {"raft", "snapshot_log_mb = 65537"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (load_with(f, bad[i][0], bad[i][1]) != KR_ECONFIG)
            fail_msg("[%s] %s was accepted", bad[i][0], bad[i][1]);

    /* The edges themselves are fine. */
    static const char *const good[][2] = {
        {"node", "id = 18446744073709551615"},
        {"limits", "max_frame = 1024"},
        {"limits", "max_frame = 67108864"},
        {"hsm", "token_label = a-token-label-of-32-characters-x"},
        {"node", "listen = localhost:65535"},
        {"policy", "allow_export = true"},
        {"audit", "flush_ms = 1"},
        {"audit", "flush_ms = 10000"},
        {"audit", "max_pending = 1000"},
        {"audit", "max_lag_ms = 100"},
        {"audit", "checkpoint_ms = 100"},
        {"audit", "enabled = no"},
        {"audit", "fail_open_reads = false"},
        {"raft", "snapshot_log_mb = 1"},
        {"raft", "snapshot_log_mb = 65536"},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (load_with(f, good[i][0], good[i][1]) != 0)
            fail_msg("[%s] %s was refused", good[i][0], good[i][1]);
}

static void test_missing_required_refused(void **state)
{
    struct fx *f = *state;
    /* Files that do not exist. */
    assert_int_equal(load_with(f, "tls", "ca = certs/missing-ca.pem"), KR_ECONFIG);
    assert_int_equal(load_with(f, "tls", "cert = /nonexistent/node.pem"), KR_ECONFIG);
    assert_int_equal(load_with(f, "hsm", "module = lib/missing.so"), KR_ECONFIG);
    /* Settings that are not there at all. */
    struct config c;
    assert_int_equal(load_text(f,
                               "[node]\ndata_dir = /d\n[tls]\ncert = certs/node.pem\n"
                               "key = certs/node.key\n[hsm]\nmodule = lib/pkcs11.so\n"
                               "token_label = t\n",
                               &c),
                     KR_ECONFIG);
    assert_int_equal(load_text(f,
                               "[tls]\nca = certs/ca.pem\ncert = certs/node.pem\n"
                               "key = certs/node.key\n[hsm]\nmodule = lib/pkcs11.so\n"
                               "token_label = t\n",
                               &c),
                     KR_ECONFIG);
    assert_int_equal(load_text(f,
                               "[node]\ndata_dir = /d\n[tls]\nca = certs/ca.pem\n"
                               "cert = certs/node.pem\nkey = certs/node.key\n"
                               "[hsm]\nmodule = lib/pkcs11.so\n",
                               &c),
                     KR_ECONFIG);
    /* No way to get a PIN. */
    assert_int_equal(load_with(f, "hsm", "pin_env ="), KR_ECONFIG);
}

static void test_unreadable_or_malformed_file(void **state)
{
    struct fx *f = *state;
    struct config c;
    char missing[PATH_MAX + 32];
    snprintf(missing, sizeof(missing), "%s/nope.conf", f->etc);
    assert_int_equal(config_load(missing, &c), KR_ECONFIG);
    char text[sizeof(MINIMAL) + 64];
    snprintf(text, sizeof(text), "%sthis line has no equals sign\n", MINIMAL);
    assert_int_equal(load_text(f, text, &c), KR_ECONFIG);
    snprintf(text, sizeof(text), "[node\n%s", MINIMAL);
    assert_int_equal(load_text(f, text, &c), KR_ECONFIG);
}

static void assert_same_config(const struct config *a, const struct config *b)
{
    assert_int_equal(a->node_id, b->node_id);
    assert_string_equal(a->data_dir, b->data_dir);
    assert_string_equal(a->listen, b->listen);
    assert_string_equal(a->raft_address, b->raft_address);
    assert_string_equal(a->log_level, b->log_level);
    assert_string_equal(a->tls_ca, b->tls_ca);
    assert_string_equal(a->tls_cert, b->tls_cert);
    assert_string_equal(a->tls_key, b->tls_key);
    assert_string_equal(a->hsm_module, b->hsm_module);
    assert_string_equal(a->hsm_token_label, b->hsm_token_label);
    assert_string_equal(a->hsm_mwk_label, b->hsm_mwk_label);
    assert_string_equal(a->hsm_pin_file, b->hsm_pin_file);
    assert_string_equal(a->hsm_pin_env, b->hsm_pin_env);
    assert_string_equal(a->hsm_softhsm_conf, b->hsm_softhsm_conf);
    assert_int_equal(a->allow_export, b->allow_export);
    assert_int_equal(a->max_frame, b->max_frame);
    assert_int_equal(a->max_connections, b->max_connections);
    assert_int_equal(a->list_max, b->list_max);
    assert_int_equal(a->audit_enabled, b->audit_enabled);
    assert_int_equal(a->audit_flush_ms, b->audit_flush_ms);
    assert_int_equal(a->audit_max_pending, b->audit_max_pending);
    assert_int_equal(a->audit_max_lag_ms, b->audit_max_lag_ms);
    assert_int_equal(a->audit_fail_open_reads, b->audit_fail_open_reads);
    assert_int_equal(a->audit_checkpoint_ms, b->audit_checkpoint_ms);
    assert_int_equal(a->raft_snapshot_log_mb, b->raft_snapshot_log_mb);
}

static void test_write_then_load_round_trip(void **state)
{
    struct fx *f = *state;
    struct config a;
    assert_int_equal(load_text(f, FULL, &a), 0);
    /* Written elsewhere: the (absolute) paths must still point at the files. */
    mkdir_in(f, "other");
    char out[PATH_MAX + 32];
    snprintf(out, sizeof(out), "%s/other/written.conf", f->dir);
    assert_int_equal(config_write(&a, out), 0);
    struct stat st;
    assert_int_equal(stat(out, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    struct config b;
    assert_int_equal(config_load(out, &b), 0);
    assert_same_config(&a, &b);

    /* Defaults and the other boolean value survive as well. */
    assert_int_equal(load_text(f, MINIMAL, &a), 0);
    assert_int_equal(config_write(&a, out), 0);
    assert_int_equal(config_load(out, &b), 0);
    assert_same_config(&a, &b);
    assert_int_equal(b.allow_export, 1);
    assert_int_equal(b.audit_enabled, 1);
    assert_int_equal(b.audit_fail_open_reads, 0);

    /* A directory that does not exist. */
    snprintf(out, sizeof(out), "%s/no/such/dir.conf", f->dir);
    assert_int_equal(config_write(&a, out), KR_EIO);
}

static void test_read_pin_from_file(void **state)
{
    struct fx *f = *state;
    struct config c;
    assert_int_equal(load_text(f, FULL, &c), 0);
    char pin[64];
    setenv(PIN_VAR, "from-env", 1); /* the file wins when both are set */
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), 0);
    assert_string_equal(pin, "4321");

    file_in(f, "etc/pin.txt", "s3cr3t-PIN\r\n");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), 0);
    assert_string_equal(pin, "s3cr3t-PIN");
    file_in(f, "etc/pin.txt", "no-newline");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), 0);
    assert_string_equal(pin, "no-newline");
    /* Only the first line is the PIN. */
    file_in(f, "etc/pin.txt", "first\nsecond\n");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), 0);
    assert_string_equal(pin, "first");

    file_in(f, "etc/pin.txt", "");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG);
    char missing[PATH_MAX + 32];
    snprintf(missing, sizeof(missing), "%s/gone.txt", f->etc);
    int n = snprintf(c.hsm_pin_file, sizeof(c.hsm_pin_file), "%s", missing);
    assert_true(n > 0 && (size_t)n < sizeof(c.hsm_pin_file));
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG);
}

/* A PIN that cannot be read whole must not be handed to the HSM: a wrong PIN
 * counts towards the token's lockout. */
static void test_read_pin_refuses_empty_or_truncated(void **state)
{
    struct fx *f = *state;
    struct config c;
    assert_int_equal(load_text(f, FULL, &c), 0);
    char pin[8];
    file_in(f, "etc/pin.txt", "\n");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG);
    file_in(f, "etc/pin.txt", "123456789\n");
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG);
    /* The environment path already refuses a PIN that does not fit. */
    c.hsm_pin_file[0] = '\0';
    setenv(PIN_VAR, "123456789", 1);
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG);
}

static void test_read_pin_from_env(void **state)
{
    struct fx *f = *state;
    struct config c;
    char text[sizeof(MINIMAL) + 64];
    snprintf(text, sizeof(text), "%spin_env = " PIN_VAR "\n", MINIMAL);
    assert_int_equal(load_text(f, text, &c), 0);
    assert_string_equal(c.hsm_pin_file, "");
    char pin[32];
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG); /* unset */
    setenv(PIN_VAR, "", 1);
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), KR_ECONFIG); /* empty */
    setenv(PIN_VAR, "987654", 1);
    assert_int_equal(config_read_pin(&c, pin, sizeof(pin)), 0);
    assert_string_equal(pin, "987654");
    assert_int_equal(config_read_pin(&c, pin, 7), 0);
    assert_string_equal(pin, "987654");
    assert_int_equal(config_read_pin(&c, pin, 6), KR_ECONFIG); /* no room for the NUL */
}

static void test_split_hostport(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        const char *host;
        int port;
    } ok[] = {
        {"127.0.0.1:7300", "127.0.0.1", 7300},
        {"localhost:1", "localhost", 1},
        {"node-3.example.com:65535", "node-3.example.com", 65535},
        {"0.0.0.0:443", "0.0.0.0", 443},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char host[64];
        int port = -1;
        assert_int_equal(config_split_hostport(ok[i].in, host, sizeof(host), &port), 0);
        assert_string_equal(host, ok[i].host);
        assert_int_equal(port, ok[i].port);
    }
    static const char *const bad[] = {
        "127.0.0.1", ":7300", "host:", "host:0", "host:65536", "host:-1",
        "host:80x", "host:99999999999999999999", "", ":",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char host[64] = "untouched";
        int port = -7;
        if (config_split_hostport(bad[i], host, sizeof(host), &port) != KR_EINVAL)
            fail_msg("'%s' was accepted", bad[i]);
        assert_string_equal(host, "untouched");
        assert_int_equal(port, -7);
    }
    /* The host must fit with its NUL. */
    char small[5];
    int port = 0;
    assert_int_equal(config_split_hostport("abcde:80", small, sizeof(small), &port), KR_EINVAL);
    assert_int_equal(config_split_hostport("abcd:80", small, sizeof(small), &port), 0);
    assert_string_equal(small, "abcd");
    assert_int_equal(port, 80);
}

int main(void)
{
    /* Rejections are logged on purpose. */
    log_set_level(LOG_LEVEL_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_load_full_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relative_paths_resolve_against_file_dir, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_setting_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_values_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_required_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreadable_or_malformed_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_then_load_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_pin_from_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_pin_refuses_empty_or_truncated, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_read_pin_from_env, setup, teardown),
        cmocka_unit_test(test_split_hostport),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
