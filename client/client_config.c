/* client_config.c: the client config file (INI, section [client]) and the
 * default places to look for it. */
#include "keyraft.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ini.h>

#include "client_internal.h"

#define TIMEOUT_MAX_MS (24 * 3600 * 1000)

struct kr_client_file {
    char *dir; /* relative paths in the file are resolved against this */
    char *endpoints;
    char *ca;
    char *cert;
    char *key;
    int timeout_ms;
};

struct parse_ctx {
    kr_client_file *file;
    char err[256];
};

static void ctx_err(struct parse_ctx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void ctx_err(struct parse_ctx *ctx, const char *fmt, ...)
{
    va_list ap;

    if (ctx->err[0] != '\0')
        return; /* keep the first error */
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof(ctx->err), fmt, ap);
    va_end(ap);
}

/* Absolute paths stay; relative ones are joined to the file's directory. */
static char *resolve_path(const char *dir, const char *value)
{
    char *out = NULL;

    if (value[0] == '/')
        return strdup(value);
    if (asprintf(&out, "%s/%s", dir, value) < 0)
        return NULL;
    return out;
}

static int set_string(struct parse_ctx *ctx, char **slot, char *value, const char *name)
{
    if (value == NULL) {
        ctx_err(ctx, "out of memory reading %s", name);
        return 0;
    }
    free(*slot);
    *slot = value;
    return 1;
}

static int on_setting(void *user, const char *section, const char *name, const char *value)
{
    struct parse_ctx *ctx = user;
    kr_client_file *f = ctx->file;

    if (strcmp(section, "client") != 0)
        return 1; /* other sections belong to other readers */
    if (value[0] == '\0') {
        ctx_err(ctx, "[client] %s is empty", name);
        return 0;
    }
    if (strcmp(name, "endpoints") == 0)
        return set_string(ctx, &f->endpoints, strdup(value), name);
    if (strcmp(name, "ca") == 0)
        return set_string(ctx, &f->ca, resolve_path(f->dir, value), name);
    if (strcmp(name, "cert") == 0)
        return set_string(ctx, &f->cert, resolve_path(f->dir, value), name);
    if (strcmp(name, "key") == 0)
        return set_string(ctx, &f->key, resolve_path(f->dir, value), name);
    if (strcmp(name, "timeout_ms") == 0) {
        char *end = NULL;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (errno != 0 || end == value || *end != '\0' || v <= 0 || v > TIMEOUT_MAX_MS) {
            ctx_err(ctx, "[client] timeout_ms \"%s\": want 1..%d", value, TIMEOUT_MAX_MS);
            return 0;
        }
        f->timeout_ms = (int)v;
        return 1;
    }
    ctx_err(ctx, "[client] unknown setting \"%s\"", name);
    return 0;
}

void kr_client_file_free(kr_client_file *file)
{
    if (file == NULL)
        return;
    free(file->dir);
    free(file->endpoints);
    free(file->ca);
    free(file->cert);
    free(file->key);
    free(file);
}

/* The file to load when the caller names none: $KEYRAFT_CONFIG when set,
 * else the first that exists of ~/.config/keyraft/client.conf and
 * ./keyraft-data/client.conf. */
static int default_path(char **out_path, char *err, size_t err_len)
{
    const char *env = getenv("KEYRAFT_CONFIG");
    const char *home = getenv("HOME");
    char *p = NULL;

    if (env != NULL && env[0] != '\0') {
        p = strdup(env);
        goto done;
    }
    if (home != NULL && home[0] != '\0') {
        if (asprintf(&p, "%s/.config/keyraft/client.conf", home) < 0)
            return KR_ENOMEM;
        if (access(p, F_OK) == 0)
            goto done;
        free(p);
        p = NULL;
    }
    if (access("keyraft-data/client.conf", F_OK) == 0) {
        p = strdup("keyraft-data/client.conf");
        goto done;
    }
    if (err != NULL)
        snprintf(err, err_len,
                 "no client config: set KEYRAFT_CONFIG, or create "
                 "~/.config/keyraft/client.conf or ./keyraft-data/client.conf");
    return KR_ECONFIG;
done:
    if (p == NULL)
        return KR_ENOMEM;
    *out_path = p;
    return 0;
}

int kr__client_file_load_err(const char *path, kr_client_file **out_file,
                             kr_client_config *out_cfg, char *err, size_t err_len)
{
    struct parse_ctx ctx = {0};
    kr_client_file *f = NULL;
    char *chosen = NULL;
    int rc, line;

    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (out_file == NULL || out_cfg == NULL)
        return KR_EINVAL;
    if (path == NULL) {
        rc = default_path(&chosen, err, err_len);
        if (rc != 0)
            return rc;
        path = chosen;
    }
    f = calloc(1, sizeof(*f));
    if (f == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        f->dir = strdup(".");
    else if (slash == path)
        f->dir = strdup("/");
    else
        f->dir = strndup(path, (size_t)(slash - path));
    if (f->dir == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    ctx.file = f;
    line = ini_parse(path, on_setting, &ctx);
    if (line < 0) {
        if (err != NULL)
            snprintf(err, err_len, "%s: %s", path,
                     line == -1 ? "cannot open (missing or unreadable)" : "out of memory");
        rc = line == -1 ? KR_ECONFIG : KR_ENOMEM;
        goto out;
    }
    if (line > 0) {
        if (err != NULL)
            snprintf(err, err_len, "%s:%d: %s", path, line,
                     ctx.err[0] != '\0' ? ctx.err : "syntax error");
        rc = KR_ECONFIG;
        goto out;
    }
    const char *missing = f->endpoints == NULL ? "endpoints"
                          : f->ca == NULL      ? "ca"
                          : f->cert == NULL    ? "cert"
                          : f->key == NULL     ? "key"
                                               : NULL;
    if (missing != NULL) {
        if (err != NULL)
            snprintf(err, err_len, "%s: [client] %s is missing", path, missing);
        rc = KR_ECONFIG;
        goto out;
    }
    out_cfg->endpoints = f->endpoints;
    out_cfg->ca_file = f->ca;
    out_cfg->cert_file = f->cert;
    out_cfg->key_file = f->key;
    out_cfg->timeout_ms = f->timeout_ms;
    *out_file = f;
    f = NULL;
    rc = 0;
out:
    kr_client_file_free(f);
    free(chosen);
    return rc;
}

int kr_client_file_load(const char *path, kr_client_file **out_file, kr_client_config *out_cfg)
{
    return kr__client_file_load_err(path, out_file, out_cfg, NULL, 0);
}
