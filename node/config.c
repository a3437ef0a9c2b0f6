/* config.c: node config file loading, validation and writing. */
#include "config.h"

#define KR_LOG_MODULE "config"
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <openssl/crypto.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"

void config_defaults(struct config *config)
{
    memset(config, 0, sizeof(*config));
    config->node_id = 1;
    snprintf(config->listen, sizeof(config->listen), "127.0.0.1:%d", KR_DEFAULT_PORT);
    snprintf(config->raft_address, sizeof(config->raft_address), "127.0.0.1:%d",
             KR_DEFAULT_PORT + 1);
    snprintf(config->log_level, sizeof(config->log_level), "info");
    snprintf(config->hsm_module, sizeof(config->hsm_module), "/usr/lib/softhsm/libsofthsm2.so");
    snprintf(config->hsm_mwk_label, sizeof(config->hsm_mwk_label), "keyraft-mwk");
    snprintf(config->hsm_pin_env, sizeof(config->hsm_pin_env), "KEYRAFT_HSM_PIN");
    config->allow_export = 1;
    config->key_cache_idle_s = 10;
    config->max_frame = KR_MAX_FRAME;
    config->max_connections = 4096;
    config->list_max = 1000;
    config->audit_enabled = 1;
    config->audit_flush_ms = 20;
    config->audit_max_pending = 100000;
    config->audit_max_lag_ms = 3000;
    config->audit_fail_open_reads = 0;
    config->audit_checkpoint_ms = 10000;
    config->raft_snapshot_log_mb = 64;
}

struct load_ctx {
    struct config *config;
    const char *path;
    char dir[CONFIG_PATH_MAX];
    int failed;
};

static int set_string(char *dst, size_t cap, const char *value)
{
    size_t n = strlen(value);
    if (n >= cap)
        return -1;
    memcpy(dst, value, n + 1);
    return 0;
}

/* Paths in the file are relative to the file's own directory. */
static int set_path(const struct load_ctx *ctx, char *dst, size_t cap, const char *value)
{
    if (value[0] == '/' || value[0] == '\0')
        return set_string(dst, cap, value);
    int n = snprintf(dst, cap, "%s/%s", ctx->dir, value);
    return (n < 0 || (size_t)n >= cap) ? -1 : 0;
}

static int parse_u64(const char *value, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || value[0] == '-' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static int parse_bool(const char *value, int *out)
{
    if (!strcmp(value, "true") || !strcmp(value, "yes") || !strcmp(value, "1")) {
        *out = 1;
        return 0;
    }
    if (!strcmp(value, "false") || !strcmp(value, "no") || !strcmp(value, "0")) {
        *out = 0;
        return 0;
    }
    return -1;
}

/* What a numeric or boolean setting accepts, for the error message. */
static const char *range_hint(const char *section, const char *name)
{
    static const char *const hints[][3] = {
        {"audit", "enabled", " (true or false)"},
        {"audit", "flush_ms", " (1 to 10000)"},
        {"audit", "max_pending", " (1000 to 100000000)"},
        {"audit", "max_lag_ms", " (100 to 3600000)"},
        {"audit", "fail_open_reads", " (true or false)"},
        {"audit", "checkpoint_ms", " (100 to 86400000)"},
        {"raft", "snapshot_log_mb", " (1 to 65536)"},
        {"policy", "key_cache_idle_s", " (0 to 3600)"},
    };
    for (size_t i = 0; i < sizeof(hints) / sizeof(hints[0]); i++)
        if (strcmp(section, hints[i][0]) == 0 && strcmp(name, hints[i][1]) == 0)
            return hints[i][2];
    return "";
}

#define MATCH(s, n) (strcmp(section, s) == 0 && strcmp(name, n) == 0)

/* Debian's libinih is built without line numbers: problems name the key. */
static int on_entry(void *user, const char *section, const char *name, const char *value)
{
    struct load_ctx *ctx = user;
    struct config *c = ctx->config;
    uint64_t u = 0;
    int rv = 0;
    if (MATCH("node", "id")) {
        rv = parse_u64(value, 1, UINT64_MAX, &u);
        c->node_id = u;
    } else if (MATCH("node", "data_dir")) {
        rv = set_path(ctx, c->data_dir, sizeof(c->data_dir), value);
    } else if (MATCH("node", "listen")) {
        rv = set_string(c->listen, sizeof(c->listen), value);
    } else if (MATCH("node", "raft_address")) {
        rv = set_string(c->raft_address, sizeof(c->raft_address), value);
    } else if (MATCH("node", "raft_listen")) {
        rv = set_string(c->raft_listen, sizeof(c->raft_listen), value);
    } else if (MATCH("node", "join")) {
        rv = set_string(c->join, sizeof(c->join), value);
    } else if (MATCH("node", "log_level")) {
        rv = log_level_parse(value) < 0 ? -1 : set_string(c->log_level, sizeof(c->log_level), value);
    } else if (MATCH("tls", "ca")) {
        rv = set_path(ctx, c->tls_ca, sizeof(c->tls_ca), value);
    } else if (MATCH("tls", "cert")) {
        rv = set_path(ctx, c->tls_cert, sizeof(c->tls_cert), value);
    } else if (MATCH("tls", "key")) {
        rv = set_path(ctx, c->tls_key, sizeof(c->tls_key), value);
    } else if (MATCH("hsm", "module")) {
        rv = set_path(ctx, c->hsm_module, sizeof(c->hsm_module), value);
    } else if (MATCH("hsm", "token_label")) {
        rv = set_string(c->hsm_token_label, 33, value); /* PKCS#11 labels are 32 bytes */
    } else if (MATCH("hsm", "mwk_label")) {
        rv = set_string(c->hsm_mwk_label, sizeof(c->hsm_mwk_label), value);
    } else if (MATCH("hsm", "pin_file")) {
        rv = set_path(ctx, c->hsm_pin_file, sizeof(c->hsm_pin_file), value);
    } else if (MATCH("hsm", "pin_env")) {
        rv = set_string(c->hsm_pin_env, sizeof(c->hsm_pin_env), value);
    } else if (MATCH("hsm", "so_pin_file")) {
        rv = set_path(ctx, c->hsm_so_pin_file, sizeof(c->hsm_so_pin_file), value);
    } else if (MATCH("hsm", "so_pin_env")) {
        rv = set_string(c->hsm_so_pin_env, sizeof(c->hsm_so_pin_env), value);
    } else if (MATCH("hsm", "softhsm_conf")) {
        rv = set_path(ctx, c->hsm_softhsm_conf, sizeof(c->hsm_softhsm_conf), value);
    } else if (MATCH("policy", "allow_export")) {
        rv = parse_bool(value, &c->allow_export);
    } else if (MATCH("policy", "key_cache_idle_s")) {
        rv = parse_u64(value, 0, 3600, &u);
        c->key_cache_idle_s = (uint32_t)u;
    } else if (MATCH("limits", "max_frame")) {
        rv = parse_u64(value, 1024, 64u * 1024 * 1024, &u);
        c->max_frame = (uint32_t)u;
    } else if (MATCH("limits", "max_connections")) {
        rv = parse_u64(value, 1, 1000000, &u);
        c->max_connections = (uint32_t)u;
    } else if (MATCH("limits", "list_max")) {
        rv = parse_u64(value, 1, 100000, &u);
        c->list_max = (uint32_t)u;
    } else if (MATCH("audit", "enabled")) {
        rv = parse_bool(value, &c->audit_enabled);
    } else if (MATCH("audit", "flush_ms")) {
        rv = parse_u64(value, 1, 10000, &u);
        c->audit_flush_ms = (uint32_t)u;
    } else if (MATCH("audit", "max_pending")) {
        rv = parse_u64(value, 1000, 100000000, &u);
        c->audit_max_pending = (uint32_t)u;
    } else if (MATCH("audit", "max_lag_ms")) {
        rv = parse_u64(value, 100, 3600000, &u);
        c->audit_max_lag_ms = (uint32_t)u;
    } else if (MATCH("audit", "fail_open_reads")) {
        rv = parse_bool(value, &c->audit_fail_open_reads);
    } else if (MATCH("audit", "checkpoint_ms")) {
        rv = parse_u64(value, 100, 86400000, &u);
        c->audit_checkpoint_ms = (uint32_t)u;
    } else if (MATCH("raft", "snapshot_log_mb")) {
        rv = parse_u64(value, 1, 65536, &u);
        c->raft_snapshot_log_mb = (uint32_t)u;
    } else {
        log_error("%s: unknown setting [%s] %s", ctx->path, section, name);
        ctx->failed = 1;
        return 1; /* keep parsing: report every problem at once */
    }
    if (rv != 0) {
        log_error("%s: bad value for [%s] %s: '%s'%s", ctx->path, section, name, value,
                  range_hint(section, name));
        ctx->failed = 1;
    }
    return 1;
}

int config_split_hostport(const char *hostport, char *host, size_t host_cap, int *port)
{
    const char *colon = strrchr(hostport, ':');
    if (colon == NULL || colon == hostport || (size_t)(colon - hostport) >= host_cap)
        return KR_EINVAL;
    uint64_t p = 0;
    if (parse_u64(colon + 1, 1, 65535, &p) != 0)
        return KR_EINVAL;
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    *port = (int)p;
    return 0;
}

static int check_file(const char *path, const char *what)
{
    if (path[0] == '\0') {
        log_error("%s is not set", what);
        return -1;
    }
    if (access(path, R_OK) != 0) {
        log_error("%s: cannot read %s: %s", what, path, strerror(errno));
        return -1;
    }
    return 0;
}

static int load(const char *path, struct config *config, int check_files);

int config_load(const char *path, struct config *config) { return load(path, config, 1); }

int config_parse(const char *path, struct config *config) { return load(path, config, 0); }

static int load(const char *path, struct config *config, int check_files)
{
    struct load_ctx ctx = {.config = config, .path = path};
    char tmp[CONFIG_PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s", path) >= (int)sizeof(tmp))
        return KR_ECONFIG;
    char *real = realpath(tmp, NULL);
    snprintf(ctx.dir, sizeof(ctx.dir), "%s", dirname(real ? real : tmp));
    free(real);
    config_defaults(config);
    int rv = ini_parse(path, on_entry, &ctx);
    if (rv < 0) {
        log_error("cannot open config file %s: %s", path, strerror(errno));
        return KR_ECONFIG;
    }
    if (rv > 0) {
        log_error("%s:%d: syntax error", path, rv); /* ini_parse returns the line */
        return KR_ECONFIG;
    }
    if (ctx.failed)
        return KR_ECONFIG;
    char host[256];
    int port = 0;
    int bad = 0;
    if (config->data_dir[0] == '\0') {
        log_error("%s: [node] data_dir is not set", path);
        bad = 1;
    }
    if (config_split_hostport(config->listen, host, sizeof(host), &port) != 0) {
        log_error("%s: [node] listen must be HOST:PORT, got '%s'", path, config->listen);
        bad = 1;
    }
    if (config_split_hostport(config->raft_address, host, sizeof(host), &port) != 0) {
        log_error("%s: [node] raft_address must be IPv4:PORT, got '%s'", path,
                  config->raft_address);
        bad = 1;
    }
    if (config->raft_listen[0] != '\0' &&
        config_split_hostport(config->raft_listen, host, sizeof(host), &port) != 0) {
        log_error("%s: [node] raft_listen must be IPv4:PORT, got '%s'", path, config->raft_listen);
        bad = 1;
    }
    if (config->join[0] != '\0' && config_split_hostport(config->join, host, sizeof(host), &port) != 0) {
        log_error("%s: [node] join must be HOST:PORT, got '%s'", path, config->join);
        bad = 1;
    }
    if (check_files)
        bad |= check_file(config->tls_ca, "[tls] ca") | check_file(config->tls_cert, "[tls] cert") |
               check_file(config->tls_key, "[tls] key") |
               check_file(config->hsm_module, "[hsm] module");
    if (config->hsm_token_label[0] == '\0') {
        log_error("%s: [hsm] token_label is not set", path);
        bad = 1;
    }
    if (config->hsm_pin_file[0] == '\0' && config->hsm_pin_env[0] == '\0') {
        log_error("%s: set [hsm] pin_file or pin_env", path);
        bad = 1;
    }
    return bad ? KR_ECONFIG : 0;
}

int config_write(const struct config *c, const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        log_error("cannot write %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    FILE *f = fdopen(fd, "w");
    if (f == NULL) {
        close(fd);
        return KR_EIO;
    }
    fprintf(f,
            "# keyraftd node configuration\n"
            "[node]\nid = %llu\ndata_dir = %s\nlisten = %s\nraft_address = %s\nlog_level = %s\n"
            "%s%s%s%s%s%s\n"
            "[tls]\nca = %s\ncert = %s\nkey = %s\n\n"
            "[hsm]\nmodule = %s\ntoken_label = %s\nmwk_label = %s\n",
            (unsigned long long)c->node_id, c->data_dir, c->listen, c->raft_address,
            c->log_level, c->raft_listen[0] ? "raft_listen = " : "", c->raft_listen,
            c->raft_listen[0] ? "\n" : "", c->join[0] ? "join = " : "", c->join,
            c->join[0] ? "\n" : "", c->tls_ca, c->tls_cert, c->tls_key, c->hsm_module,
            c->hsm_token_label, c->hsm_mwk_label);
    if (c->hsm_pin_file[0])
        fprintf(f, "pin_file = %s\n", c->hsm_pin_file);
    if (c->hsm_pin_env[0])
        fprintf(f, "pin_env = %s\n", c->hsm_pin_env);
    if (c->hsm_so_pin_file[0])
        fprintf(f, "so_pin_file = %s\n", c->hsm_so_pin_file);
    if (c->hsm_so_pin_env[0])
        fprintf(f, "so_pin_env = %s\n", c->hsm_so_pin_env);
    if (c->hsm_softhsm_conf[0])
        fprintf(f, "softhsm_conf = %s\n", c->hsm_softhsm_conf);
    fprintf(f, "\n[policy]\nallow_export = %s\nkey_cache_idle_s = %u\n\n[limits]\nmax_frame = %u\n"
            "max_connections = %u\nlist_max = %u\n",
            c->allow_export ? "true" : "false", c->key_cache_idle_s, c->max_frame,
            c->max_connections, c->list_max);
    fprintf(f, "\n[raft]\nsnapshot_log_mb = %u\n", c->raft_snapshot_log_mb);
    fprintf(f,
            "\n[audit]\nenabled = %s\nflush_ms = %u\nmax_pending = %u\nmax_lag_ms = %u\n"
            "fail_open_reads = %s\ncheckpoint_ms = %u\n",
            c->audit_enabled ? "true" : "false", c->audit_flush_ms, c->audit_max_pending,
            c->audit_max_lag_ms, c->audit_fail_open_reads ? "true" : "false",
            c->audit_checkpoint_ms);
    int rv = (fflush(f) == 0 && fsync(fd) == 0) ? 0 : KR_EIO;
    fclose(f);
    return rv;
}

/* One PIN from |file| or, when that is empty, the variable |env|. */
static int read_pin(const char *what, const char *file, const char *env, char *pin, size_t cap)
{
    if (file[0] != '\0') {
        int fd = open(file, O_RDONLY);
        if (fd < 0) {
            log_error("cannot read %s file %s: %s", what, file, strerror(errno));
            return KR_ECONFIG;
        }
        ssize_t n = read(fd, pin, cap);
        close(fd);
        if (n >= (ssize_t)cap) {
            OPENSSL_cleanse(pin, cap);
            log_error("%s file %s holds more than %zu bytes", what, file, cap - 1);
            return KR_ECONFIG;
        }
        if (n > 0) {
            pin[n] = '\0';
            pin[strcspn(pin, "\r\n")] = '\0';
        }
        if (n <= 0 || pin[0] == '\0') {
            log_error("%s file %s is empty", what, file);
            return KR_ECONFIG;
        }
        return 0;
    }
    if (env[0] == '\0') {
        log_error("no %s configured", what);
        return KR_ECONFIG;
    }
    const char *v = getenv(env);
    if (v == NULL || v[0] == '\0') {
        log_error("%s: environment variable %s is not set", what, env);
        return KR_ECONFIG;
    }
    if (strlen(v) >= cap)
        return KR_ECONFIG;
    memcpy(pin, v, strlen(v) + 1);
    return 0;
}

int config_read_pin(const struct config *c, char *pin, size_t cap)
{
    return read_pin("HSM PIN", c->hsm_pin_file, c->hsm_pin_env, pin, cap);
}

int config_read_so_pin(const struct config *c, char *pin, size_t cap)
{
    return read_pin("HSM SO PIN ([hsm] so_pin_file or so_pin_env)", c->hsm_so_pin_file,
                    c->hsm_so_pin_env, pin, cap);
}
