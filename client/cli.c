/* cli.c: the keyraft command-line client: argument parsing, one function per
 * command, human or --json output, exit 0 ok / 1 failed / 2 usage / 3 held
 * for approval. The governance commands are in cli_gov.c. */
#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "cli_json.h"
#include "client_internal.h"
#include "keyraft.h"
#include "pki.h"

#define INPUT_MAX (KR_MAX_FRAME - 4096u) /* room for the rest of the request */
#define WAIT_POLL_MS 1000

/* ---- arguments ----------------------------------------------------------------- */

const char *cli_arg(const struct args *a, const char *name)
{
    for (int i = a->n_kv - 1; i >= 0; i--) /* the last one wins */
        if (strcmp(a->kv[i].name, name) == 0)
            return a->kv[i].val != NULL ? a->kv[i].val : "";
    return NULL;
}

int cli_has(const struct args *a, const char *name)
{
    return cli_arg(a, name) != NULL;
}

static const char *cmd_name(const struct cli *cli)
{
    return cli->cmd != NULL ? cli->cmd->name : "keyraft";
}

int cli_only_opts(const struct cli *cli, const struct args *a, const char *sub,
                  const char *const *allowed)
{
    for (int i = 0; i < a->n_kv; i++) {
        int ok = 0;
        for (const char *const *n = allowed; *n != NULL && !ok; n++)
            ok = strcmp(*n, a->kv[i].name) == 0;
        if (!ok)
            return cli_usage(cli, "%s takes no --%s", sub, a->kv[i].name);
    }
    return 0;
}

int cli_usage(const struct cli *cli, const char *fmt, ...)
{
    va_list ap;

    if (cli->cmd != NULL)
        fprintf(stderr, "keyraft: %s: ", cli->cmd->name);
    else
        fprintf(stderr, "keyraft: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (cli->cmd != NULL)
        fprintf(stderr, "usage: keyraft %s\n", cli->cmd->usage);
    else
        fprintf(stderr, "try: keyraft --help\n");
    return CLI_EXIT_USAGE;
}

/* ---- errors and output ----------------------------------------------------------- */

int cli_fail(const struct cli *cli, int status, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (msg[0] == '\0')
        snprintf(msg, sizeof(msg), "%s", kr_strerror(status));
    fprintf(stderr, "keyraft: %s: %s: %s\n", cmd_name(cli), kr_status_name(status), msg);
    if (cli->json) {
        json_t *j = json_pack("{s:{s:i,s:s,s:s}}", "error", "status", status, "code",
                              kr_status_name(status), "message", msg);
        if (j != NULL) {
            json_dumpf(j, stdout, JSON_INDENT(2));
            fputc('\n', stdout);
            json_decref(j);
        }
    }
    return EXIT_FAILURE;
}

int cli_fail_call(const struct cli *cli, int status)
{
    const char *detail = cli->client != NULL ? kr_client_last_error(cli->client) : "";
    return cli_fail(cli, status, "%s", detail);
}

int cli_print_json(const struct cli *cli, json_t *j)
{
    if (j == NULL)
        return cli_fail(cli, KR_ENOMEM, "cannot build the JSON output");
    json_dumpf(j, stdout, JSON_INDENT(2));
    fputc('\n', stdout);
    json_decref(j);
    return 0;
}

static int finish_output(const struct cli *cli, int rc)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "keyraft: %s: cannot write the output: %s\n", cmd_name(cli),
                strerror(errno));
        return EXIT_FAILURE;
    }
    return rc;
}

static void write_raw(const uint8_t *data, size_t len)
{
    if (len > 0)
        fwrite(data, 1, len, stdout);
}

static void print_hex(const uint8_t *data, size_t len)
{
    for (size_t i = 0; i < len; i++)
        printf("%02x", data[i]);
    putchar('\n');
}

static void print_time(const char *label, uint64_t ms)
{
    char buf[64];

    if (ms == 0)
        return;
    cli_format_time(ms, buf, sizeof(buf));
    printf("%s: %s\n", label, buf);
}

static void print_attributes(const Keyraft__KeyAttributes *k)
{
    const Keyraft__VersionInfo *cur = NULL;

    printf("id: %s\n", k->id);
    printf("name: %s\n", k->name);
    if (k->domain[0] != '\0')
        printf("domain: %s\n", k->domain);
    printf("algorithm: %s\n", kr_alg_name(k->algorithm));
    printf("state: %s\n", kr_state_name(k->state));
    printf("version: %u\n", k->current_version);
    print_time("created", k->created_at);
    print_time("activated", k->activated_at);
    print_time("deactivated", k->deactivated_at);
    print_time("revoked", k->revoked_at);
    print_time("destroyed", k->destroyed_at);
    if (k->revoked_at != 0 || k->revoke_reason != KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED)
        printf("revoke-reason: %s\n", kr_reason_name(k->revoke_reason));
    if (k->revoke_message[0] != '\0')
        printf("revoke-message: %s\n", k->revoke_message);
    printf("exportable: %s\n", k->exportable ? "yes" : "no");
    for (size_t i = 0; i < k->n_tags; i++)
        printf("tag: %s=%s\n", k->tags[i]->key, k->tags[i]->value);
    for (size_t i = 0; i < k->n_versions; i++)
        if (k->versions[i]->version == k->current_version)
            cur = k->versions[i];
    if (cur != NULL && cur->kcv[0] != '\0')
        printf("kcv: %s\n", cur->kcv);
    if (cur != NULL && cur->public_key.len > 0) {
        char *b64 = cli_base64(cur->public_key.data, cur->public_key.len);
        if (b64 != NULL)
            printf("public-key: %s\n", b64);
        free(b64);
    }
    if (k->commit_index != 0)
        printf("commit-index: %llu\n", (unsigned long long)k->commit_index);
    const Keyraft__KeyPolicy *p = k->policy;
    uint64_t limit = p != NULL ? p->usage_limit : 0;
    if (p != NULL && p->owner_group[0] != '\0')
        printf("owner-group: %s\n", p->owner_group);
    for (size_t i = 0; p != NULL && i < p->n_grants; i++) {
        printf("allow: %s:", p->grants[i]->group);
        for (size_t j = 0; j < p->grants[i]->n_ops; j++)
            printf("%s%s", j > 0 ? "," : "", p->grants[i]->ops[j]);
        putchar('\n');
    }
    if (limit != 0)
        printf("usage-limit: %llu encryptions per version\n", (unsigned long long)limit);
    else
        printf("usage-limit: unlimited\n");
    for (size_t i = 0; i < k->n_versions; i++) {
        const Keyraft__VersionInfo *v = k->versions[i];
        char when[64], used[64];
        cli_format_time(v->created_at, when, sizeof(when));
        if (limit != 0)
            snprintf(used, sizeof(used), "%llu/%llu", (unsigned long long)v->encryptions,
                     (unsigned long long)limit);
        else
            snprintf(used, sizeof(used), "%llu", (unsigned long long)v->encryptions);
        printf("version-%u: created %s%s%s, used %s%s\n", v->version, when,
               v->kcv[0] != '\0' ? ", kcv " : "", v->kcv, used,
               v->destroyed ? ", destroyed" : "");
    }
}

/* ---- input --------------------------------------------------------------------------- */

/* Reads all of |f| into |out|, at most INPUT_MAX bytes. */
static int read_all(const struct cli *cli, FILE *f, const char *what, kr_buf *out)
{
    size_t cap = 4096, len = 0;
    uint8_t *buf = malloc(cap);

    if (buf == NULL)
        return cli_fail(cli, KR_ENOMEM, "out of memory reading %s", what);
    for (;;) {
        if (len == cap) {
            if (cap > INPUT_MAX) {
                OPENSSL_cleanse(buf, len);
                free(buf);
                return cli_fail(cli, KR_ETOOBIG, "%s exceeds %u bytes", what, INPUT_MAX);
            }
            size_t ncap = cap * 2 > INPUT_MAX + 1 ? INPUT_MAX + 1 : cap * 2;
            uint8_t *nbuf = malloc(ncap);
            if (nbuf == NULL) {
                OPENSSL_cleanse(buf, len);
                free(buf);
                return cli_fail(cli, KR_ENOMEM, "out of memory reading %s", what);
            }
            memcpy(nbuf, buf, len); /* not realloc: the old copy gets wiped */
            OPENSSL_cleanse(buf, len);
            free(buf);
            buf = nbuf;
            cap = ncap;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f)) {
        OPENSSL_cleanse(buf, len);
        free(buf);
        return cli_fail(cli, KR_EIO, "cannot read %s: %s", what, strerror(errno));
    }
    if (len > INPUT_MAX) {
        OPENSSL_cleanse(buf, len);
        free(buf);
        return cli_fail(cli, KR_ETOOBIG, "%s exceeds %u bytes", what, INPUT_MAX);
    }
    out->data = buf;
    out->len = len;
    return 0;
}

static int read_stdin(const struct cli *cli, kr_buf *out)
{
    return read_all(cli, stdin, "stdin", out);
}

static int read_file(const struct cli *cli, const char *path, kr_buf *out)
{
    FILE *f = fopen(path, "rb");
    int rc;

    if (f == NULL)
        return cli_fail(cli, KR_EINVAL, "cannot open %s: %s", path, strerror(errno));
    rc = read_all(cli, f, path, out);
    fclose(f);
    return rc;
}

/* ---- client ---------------------------------------------------------------------------- */

int cli_connect(struct cli *cli)
{
    kr_client_config cfg = {0};
    char err[512] = "";
    int rc;

    if (cli->client != NULL)
        return 0;
    if (cli->config_path != NULL ||
        !(cli->endpoint != NULL && cli->ca != NULL && cli->cert != NULL && cli->key != NULL)) {
        rc = kr__client_file_load_err(cli->config_path, &cli->file, &cfg, err, sizeof(err));
        if (rc != 0)
            return cli_fail(cli, rc, "%s", err);
    }
    if (cli->endpoint != NULL)
        cfg.endpoints = cli->endpoint;
    if (cli->ca != NULL)
        cfg.ca_file = cli->ca;
    if (cli->cert != NULL)
        cfg.cert_file = cli->cert;
    if (cli->key != NULL)
        cfg.key_file = cli->key;
    if (cfg.ca_file != NULL)
        snprintf(cli->ca_path, sizeof(cli->ca_path), "%s", cfg.ca_file);
    if (cli->timeout != NULL) {
        char *end = NULL;
        long v = strtol(cli->timeout, &end, 10);
        if (end == cli->timeout || *end != '\0' || v <= 0 || v > 24L * 3600 * 1000)
            return cli_fail(cli, KR_EINVAL, "--timeout-ms %s: want a positive number", cli->timeout);
        cfg.timeout_ms = (int)v;
    }
    rc = kr__client_new_err(&cfg, &cli->client, err, sizeof(err));
    if (rc != 0)
        return cli_fail(cli, rc, "%s", err);
    cli->cfg = cfg;
    return 0;
}

/* ---- calls, and requests held for approval ------------------------------------------------ */

uint64_t cli_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void cli_sleep_ms(uint64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000};

    while (ms > 0 && nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* The node's answer |resp| (consumed) as the caller wants it: 0 and
 * *out_resp for status 0 with the |expect|ed result, else the error printed. */
static int take_answer(struct cli *cli, Keyraft__Response *resp,
                       Keyraft__Response__ResultCase expect, Keyraft__Response **out_resp)
{
    if (resp->status != 0) {
        int status = resp->status;
        kr_response_free(resp);
        return cli_fail_call(cli, status); /* kr_call kept the node's message */
    }
    if (expect != KEYRAFT__RESPONSE__RESULT__NOT_SET && resp->result_case != expect) {
        int got = (int)resp->result_case;
        kr_response_free(resp);
        return cli_fail(cli, KR_EPROTO, "the node answered with result %d, expected %d", got,
                        (int)expect);
    }
    *out_resp = resp;
    return 0;
}

static int print_held(const struct cli *cli, const char *id, const char *message,
                      const char *hint)
{
    char text[1024];

    snprintf(text, sizeof(text),
             "once it is approved, run the same command with --approval %s%s%s", id,
             hint != NULL ? "\n" : "", hint != NULL ? hint : "");
    fflush(stdout);
    return cli_print_pending(stdout, stderr, cli->json, id, message, text);
}

/* approval_show |id|: 0 and *out (RESULT_APPROVAL), or an exit code. */
static int fetch_approval(struct cli *cli, const char *id, Keyraft__Response **out)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ApprovalRequest op = KEYRAFT__APPROVAL_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    op.id = (char *)id;
    req.op_case = KEYRAFT__REQUEST__OP_APPROVAL_SHOW;
    req.approval_show = &op;
    req.linearizable = cli->linearizable;
    rc = kr_call(cli->client, &req, &resp);
    if (rc != 0)
        return cli_fail(cli, rc, "cannot follow approval %s: %s", id,
                        kr_client_last_error(cli->client));
    return take_answer(cli, resp, KEYRAFT__RESPONSE__RESULT_APPROVAL, out);
}

/* --wait: polls approval |id| once a second until it is decided or the wait
 * runs out; once APPROVED, sends |req| again with the approval id and a fresh
 * request id (the held one was answered already). */
static int wait_for_approval(struct cli *cli, Keyraft__Request *req,
                             Keyraft__Response__ResultCase expect, const char *id,
                             const char *message, const char *hint,
                             Keyraft__Response **out_resp)
{
    uint64_t deadline = mono_ms() + cli->wait_ms;
    Keyraft__Response *resp = NULL;
    int rc;

    fprintf(stderr, "held for approval %s: %s; waiting up to %llu s\n", id, message,
            (unsigned long long)(cli->wait_ms / 1000));
    for (;;) {
        uint64_t now = mono_ms();
        if (now >= deadline)
            return print_held(cli, id, message, hint);
        cli_sleep_ms(deadline - now < WAIT_POLL_MS ? deadline - now : WAIT_POLL_MS);
        rc = fetch_approval(cli, id, &resp);
        if (rc != 0)
            return rc;
        const Keyraft__ApprovalInfo *ai = resp->approval;
        switch (ai->state) {
        case KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING:
            kr_response_free(resp);
            resp = NULL;
            continue;
        case KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED: {
            kr_response_free(resp);
            resp = NULL;
            req->approval_id = (char *)id;
            req->request_id = (char *)protobuf_c_empty_string;
            rc = kr_call(cli->client, req, &resp);
            if (rc != 0)
                return cli_fail_call(cli, rc);
            if (resp->status == KR_EPENDING) {
                rc = print_held(cli, id, resp->message, hint);
                kr_response_free(resp);
                return rc;
            }
            return take_answer(cli, resp, expect, out_resp);
        }
        case KEYRAFT__APPROVAL_STATE__APPROVAL_DONE:
            /* Ran already (by another run of the command, or the node): its
             * recorded outcome is the answer; nothing is sent twice. */
            if (ai->result_status != 0) {
                rc = cli_fail(cli, ai->result_status, "approval %s ran and failed: %s", id,
                              ai->result_message);
            } else if (cli->json) {
                rc = cli_print_approval(cli, ai);
                rc = rc == 0 ? CLI_RC_PRINTED : rc;
            } else {
                printf("approval %s ran: %s%s%s\n", id, kr_status_name(ai->result_status),
                       ai->result_message[0] != '\0' ? ": " : "", ai->result_message);
                rc = CLI_RC_PRINTED;
            }
            kr_response_free(resp);
            return rc;
        case KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED:
        case KEYRAFT__APPROVAL_STATE__APPROVAL_EXPIRED:
        default: {
            const char *state = cli_approval_state_name(ai->state);
            int status = ai->state == KEYRAFT__APPROVAL_STATE__APPROVAL_EXPIRED ? KR_ETIMEDOUT
                                                                                : KR_EPERM;
            rc = cli_fail(cli, status, "approval %s was %s", id, state);
            kr_response_free(resp);
            return rc;
        }
        }
    }
}

int cli_call_hint(struct cli *cli, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
                  const char *pending_hint, Keyraft__Response **out_resp)
{
    Keyraft__Response *resp = NULL;
    char id[256], message[1024];
    int rc = cli_connect(cli);

    if (rc != 0)
        return rc;
    req->linearizable = cli->linearizable;
    if (cli->approval_id != NULL)
        req->approval_id = (char *)cli->approval_id;
    rc = kr_call(cli->client, req, &resp);
    if (rc != 0)
        return cli_fail_call(cli, rc);
    if (resp->status != KR_EPENDING)
        return take_answer(cli, resp, expect, out_resp);
    /* Copied: |resp| goes before the wait, and the strings outlive it. */
    snprintf(id, sizeof(id), "%s", resp->approval_id);
    snprintf(message, sizeof(message), "%s",
             resp->message[0] != '\0' ? resp->message : kr_strerror(KR_EPENDING));
    kr_response_free(resp);
    if (!cli->wait || id[0] == '\0')
        return print_held(cli, id[0] != '\0' ? id : "?", message, pending_hint);
    return wait_for_approval(cli, req, expect, id, message, pending_hint, out_resp);
}

int cli_call(struct cli *cli, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
             Keyraft__Response **out_resp)
{
    return cli_call_hint(cli, req, expect, NULL, out_resp);
}

int cli_key_ref(const struct cli *cli, const struct args *a, const char *key,
                Keyraft__KeyRef *ref)
{
    const char *domain = cli_arg(a, "domain");

    if (kr__key_ref(key, ref) != 0)
        return cli_usage(cli, "bad key reference \"%s\": want an id or name:NAME", key);
    if (domain != NULL) {
        if (domain[0] == '\0')
            return cli_usage(cli, "--domain is empty");
        ref->domain = (char *)domain;
    }
    return 0;
}

/* ---- key policy options ------------------------------------------------------------------- */

void cli_policy_clear(struct cli_policy *p)
{
    for (size_t i = 0; i < p->policy.n_grants; i++)
        cli_grant_clear(&p->grants[i]);
    p->policy.n_grants = 0;
}

int cli_policy_parse(const struct cli *cli, const struct args *a, struct cli_policy *p)
{
    const char *owner = cli_arg(a, "owner-group"), *limit = cli_arg(a, "usage-limit");
    char err[256];

    keyraft__key_policy__init(&p->policy);
    p->policy.grants = p->ptrs;
    p->given = owner != NULL || limit != NULL;
    if (owner != NULL) {
        if (owner[0] == '\0')
            return cli_usage(cli, "--owner-group is empty");
        p->policy.owner_group = (char *)owner;
    }
    if (limit != NULL && cli_parse_count(limit, &p->policy.usage_limit) != 0)
        return cli_usage(cli, "bad --usage-limit \"%s\": want an integer or 2^K (0: unlimited)",
                         limit);
    for (int i = 0; i < a->n_kv; i++) {
        if (strcmp(a->kv[i].name, "allow") != 0)
            continue;
        Keyraft__GroupGrant *g = &p->grants[p->policy.n_grants];
        int rc = cli_parse_grant(a->kv[i].val, g, err, sizeof(err));
        if (rc == KR_ENOMEM)
            return cli_fail(cli, rc, "out of memory");
        if (rc != 0)
            return cli_usage(cli, "bad --allow \"%s\": %s", a->kv[i].val, err);
        p->ptrs[p->policy.n_grants++] = g;
        for (size_t j = 0; j + 1 < p->policy.n_grants; j++)
            if (strcmp(p->grants[j].group, g->group) == 0)
                return cli_usage(cli, "--allow names group \"%s\" twice: list all its "
                                 "operations in one --allow", g->group);
        p->given = 1;
    }
    return 0;
}

static int parse_tag(const struct cli *cli, const char *s, Keyraft__Tag *tag)
{
    const char *eq = strchr(s, '=');

    if (eq == NULL || eq == s)
        return cli_usage(cli, "bad --tag \"%s\": want KEY=VALUE", s);
    tag->key = strndup(s, (size_t)(eq - s));
    tag->value = (char *)(eq + 1);
    if (tag->key == NULL)
        return cli_fail(cli, KR_ENOMEM, "out of memory");
    return 0;
}

/* Tags from every --tag: two parallel arrays the caller frees with tags_free. */
struct tags {
    Keyraft__Tag items[CLI_MAX_ARGS];
    Keyraft__Tag *ptrs[CLI_MAX_ARGS];
    size_t n;
};

static void tags_free(struct tags *t)
{
    for (size_t i = 0; i < t->n; i++)
        free(t->items[i].key);
    t->n = 0;
}

static int parse_tags(const struct cli *cli, const struct args *a, struct tags *t)
{
    for (int i = 0; i < a->n_kv; i++) {
        if (strcmp(a->kv[i].name, "tag") != 0)
            continue;
        keyraft__tag__init(&t->items[t->n]);
        int rc = parse_tag(cli, a->kv[i].val, &t->items[t->n]);
        if (rc != 0)
            return rc;
        t->ptrs[t->n] = &t->items[t->n];
        t->n++;
    }
    return 0;
}

static int parse_alg(const struct cli *cli, const char *s, Keyraft__Algorithm *out)
{
    Keyraft__Algorithm alg = kr_alg_parse(s);

    if (alg == KEYRAFT__ALGORITHM__ALG_UNSPECIFIED)
        return cli_usage(cli,
                           "unknown algorithm \"%s\" (aes-128, aes-256, hmac-sha256, "
                           "hmac-sha512, rsa-2048, rsa-3072, rsa-4096, ec-p256, ec-p384, "
                           "ed25519)",
                           s);
    *out = alg;
    return 0;
}

static int parse_u32(const struct cli *cli, const char *what, const char *s, uint32_t min,
                     uint32_t max, uint32_t *out)
{
    char *end = NULL;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v < min || v > max)
        return cli_usage(cli, "bad %s \"%s\": want %u..%u", what, s, min, max);
    *out = (uint32_t)v;
    return 0;
}

int cli_print_key_result(const struct cli *cli, const Keyraft__Response *resp, int id_only)
{
    if (cli->json)
        return cli_print_json(cli, cli_json_result(resp));
    if (resp->result_case != KEYRAFT__RESPONSE__RESULT_KEY)
        return 0;
    if (id_only)
        printf("%s\n", resp->key->id);
    else
        print_attributes(resp->key);
    return 0;
}


/* ---- commands ------------------------------------------------------------------------- */

static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1; /* never prompt: encrypted keys are refused */
}

/* Import material for an asymmetric key: a PEM or DER private key in any
 * format OpenSSL reads, re-encoded as the DER PKCS#8 the node expects. */
static int to_pkcs8(const struct cli *cli, const char *path, const kr_buf *in, kr_buf *out)
{
    BIO *bio = NULL;
    EVP_PKEY *pk = NULL;
    PKCS8_PRIV_KEY_INFO *p8 = NULL;
    uint8_t *der = NULL;
    int rc = 0, n;

    bio = BIO_new_mem_buf(in->data, (int)in->len); /* in->len <= INPUT_MAX */
    if (bio == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory");
        goto out;
    }
    pk = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    if (pk == NULL) {
        const unsigned char *p = in->data;
        ERR_clear_error();
        pk = d2i_AutoPrivateKey(NULL, &p, (long)in->len);
    }
    if (pk == NULL) {
        rc = cli_fail(cli, KR_EINVAL,
                  "%s: not a PEM or DER private key (encrypted keys are not supported)", path);
        goto out;
    }
    p8 = EVP_PKEY2PKCS8(pk);
    n = p8 != NULL ? i2d_PKCS8_PRIV_KEY_INFO(p8, NULL) : -1;
    if (n <= 0) {
        rc = cli_fail(cli, KR_ECRYPTO, "%s: cannot encode the key as PKCS#8", path);
        goto out;
    }
    der = malloc((size_t)n);
    if (der == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory");
        goto out;
    }
    unsigned char *q = der;
    if (i2d_PKCS8_PRIV_KEY_INFO(p8, &q) != n) {
        OPENSSL_cleanse(der, (size_t)n);
        free(der);
        rc = cli_fail(cli, KR_ECRYPTO, "%s: cannot encode the key as PKCS#8", path);
        goto out;
    }
    out->data = der;
    out->len = (size_t)n;
out:
    ERR_clear_error();
    PKCS8_PRIV_KEY_INFO_free(p8);
    EVP_PKEY_free(pk);
    BIO_free(bio);
    return rc;
}

static int alg_is_asymmetric(Keyraft__Algorithm alg)
{
    switch (alg) {
    case KEYRAFT__ALGORITHM__RSA_2048:
    case KEYRAFT__ALGORITHM__RSA_3072:
    case KEYRAFT__ALGORITHM__RSA_4096:
    case KEYRAFT__ALGORITHM__EC_P256:
    case KEYRAFT__ALGORITHM__EC_P384:
    case KEYRAFT__ALGORITHM__ED25519:
        return 1;
    default:
        return 0;
    }
}

static int create_or_import(struct cli *cli, const struct args *a, int import)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__CreateKeyRequest create = KEYRAFT__CREATE_KEY_REQUEST__INIT;
    Keyraft__ImportKeyRequest imp = KEYRAFT__IMPORT_KEY_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    struct tags tags = {.n = 0};
    struct cli_policy pol = {.given = 0};
    kr_buf raw = {0}, material = {0};
    Keyraft__Algorithm alg = KEYRAFT__ALGORITHM__ALG_UNSPECIFIED;
    const char *name = cli_arg(a, "name"), *alg_s = cli_arg(a, "alg");
    const char *domain = cli_arg(a, "domain");
    int rc;

    if (name == NULL || name[0] == '\0')
        return cli_usage(cli, "--name is required");
    if (alg_s == NULL)
        return cli_usage(cli, "--alg is required");
    if (domain != NULL && domain[0] == '\0')
        return cli_usage(cli, "--domain is empty");
    rc = parse_alg(cli, alg_s, &alg);
    if (rc != 0)
        return rc;
    rc = cli_policy_parse(cli, a, &pol);
    if (rc != 0)
        goto out;
    rc = parse_tags(cli, a, &tags);
    if (rc != 0)
        goto out;
    if (import) {
        const char *file = cli_arg(a, "file");
        if (file == NULL) {
            rc = cli_usage(cli, "--file is required");
            goto out;
        }
        rc = read_file(cli, file, &raw);
        if (rc != 0)
            goto out;
        if (alg_is_asymmetric(alg)) {
            rc = to_pkcs8(cli, file, &raw, &material);
            if (rc != 0)
                goto out;
        } else {
            material = raw;
            raw = (kr_buf){0};
        }
        imp.name = (char *)name;
        imp.algorithm = alg;
        imp.material.data = material.data;
        imp.material.len = material.len;
        imp.n_tags = tags.n;
        imp.tags = tags.ptrs;
        imp.pre_active = cli_has(a, "pre-active");
        imp.non_exportable = cli_has(a, "non-exportable");
        if (domain != NULL)
            imp.domain = (char *)domain;
        if (pol.given)
            imp.policy = &pol.policy;
        req.op_case = KEYRAFT__REQUEST__OP_IMPORT;
        req.import = &imp;
    } else {
        create.name = (char *)name;
        create.algorithm = alg;
        create.n_tags = tags.n;
        create.tags = tags.ptrs;
        create.pre_active = cli_has(a, "pre-active");
        create.non_exportable = cli_has(a, "non-exportable");
        if (domain != NULL)
            create.domain = (char *)domain;
        if (pol.given)
            create.policy = &pol.policy;
        req.op_case = KEYRAFT__REQUEST__OP_CREATE;
        req.create = &create;
    }
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_KEY, &resp);
    if (rc == 0)
        rc = cli_print_key_result(cli, resp, 1);
out:
    kr_response_free(resp);
    kr_buf_free(&raw);
    kr_buf_free(&material);
    tags_free(&tags);
    cli_policy_clear(&pol);
    return rc;
}

static int cmd_create(struct cli *cli, const struct args *a)
{
    return create_or_import(cli, a, 0);
}

static int cmd_import(struct cli *cli, const struct args *a)
{
    return create_or_import(cli, a, 1);
}

static int cmd_get(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__GetKeyRequest op = KEYRAFT__GET_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    const char *name = cli_arg(a, "name");
    int rc;

    if ((a->n_pos == 1) == (name != NULL))
        return cli_usage(cli, "give either a key id or --name NAME");
    if (name != NULL) {
        if (name[0] == '\0')
            return cli_usage(cli, "--name is empty");
        ref.name = (char *)name;
        if ((ref.domain = (char *)cli_arg(a, "domain")) == NULL)
            ref.domain = (char *)protobuf_c_empty_string;
        else if (ref.domain[0] == '\0')
            return cli_usage(cli, "--domain is empty");
    } else if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0) {
        return rc;
    }
    op.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_GET;
    req.get = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_KEY, &resp);
    if (rc == 0)
        rc = cli_print_key_result(cli, resp, 0);
    kr_response_free(resp);
    return rc;
}

static int cmd_list(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ListKeysRequest op = KEYRAFT__LIST_KEYS_REQUEST__INIT;
    Keyraft__Tag tag = KEYRAFT__TAG__INIT;
    Keyraft__Response *resp = NULL;
    const char *s;
    int rc = 0;

    if ((s = cli_arg(a, "alg")) != NULL && (rc = parse_alg(cli, s, &op.algorithm)) != 0)
        return rc;
    if ((s = cli_arg(a, "state")) != NULL) {
        op.state = kr_state_parse(s);
        if (op.state == KEYRAFT__KEY_STATE__STATE_UNSPECIFIED)
            return cli_usage(cli,
                               "unknown state \"%s\" (pre-active, active, deactivated, "
                               "compromised, destroyed, destroyed-compromised)",
                               s);
    }
    if ((s = cli_arg(a, "tag")) != NULL) {
        if ((rc = parse_tag(cli, s, &tag)) != 0)
            return rc;
        op.tag = &tag;
    }
    if ((s = cli_arg(a, "limit")) != NULL &&
        (rc = parse_u32(cli, "--limit", s, 1, UINT32_MAX, &op.limit)) != 0)
        goto out;
    if ((s = cli_arg(a, "prefix")) != NULL)
        op.prefix = (char *)s;
    if ((s = cli_arg(a, "after")) != NULL)
        op.after = (char *)s;
    if ((s = cli_arg(a, "domain")) != NULL) {
        if (s[0] == '\0') {
            rc = cli_usage(cli, "--domain is empty");
            goto out;
        }
        op.domain = (char *)s;
    }
    req.op_case = KEYRAFT__REQUEST__OP_LIST;
    req.list = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_LIST, &resp);
    if (rc != 0)
        goto out;
    if (cli->json) {
        rc = cli_print_json(cli, cli_json_result(resp));
        goto out;
    }
    const Keyraft__ListKeysResponse *l = resp->list;
    int w_id = 2, w_name = 4, w_alg = 9, w_state = 5;
    for (size_t i = 0; i < l->n_keys; i++) {
        const Keyraft__KeyAttributes *k = l->keys[i];
        int n;
        if ((n = (int)strlen(k->id)) > w_id)
            w_id = n;
        if ((n = (int)strlen(k->name)) > w_name)
            w_name = n;
        if ((n = (int)strlen(kr_alg_name(k->algorithm))) > w_alg)
            w_alg = n;
        if ((n = (int)strlen(kr_state_name(k->state))) > w_state)
            w_state = n;
    }
    printf("%-*s  %-*s  %-*s  %-*s  %s\n", w_id, "ID", w_name, "NAME", w_alg, "ALGORITHM",
           w_state, "STATE", "VERSION");
    for (size_t i = 0; i < l->n_keys; i++) {
        const Keyraft__KeyAttributes *k = l->keys[i];
        printf("%-*s  %-*s  %-*s  %-*s  %u\n", w_id, k->id, w_name, k->name, w_alg,
               kr_alg_name(k->algorithm), w_state, kr_state_name(k->state),
               k->current_version);
    }
    if (l->next_cursor[0] != '\0')
        printf("next: %s\n", l->next_cursor);
out:
    free(tag.key != protobuf_c_empty_string ? tag.key : NULL);
    kr_response_free(resp);
    return rc;
}

static int cmd_export(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ExportKeyRequest op = KEYRAFT__EXPORT_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    const char *s = cli_arg(a, "version");
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if (s != NULL && (rc = parse_u32(cli, "--version", s, 1, UINT32_MAX, &op.version)) != 0)
        return rc;
    op.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_EXPORT;
    req.export = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_EXPORT, &resp);
    if (rc == 0) {
        if (cli->json)
            rc = cli_print_json(cli, cli_json_result(resp));
        else
            print_hex(resp->export->material.data, resp->export->material.len);
    }
    kr_response_free(resp);
    return rc;
}

static int state_change(struct cli *cli, const struct args *a, Keyraft__Request__OpCase op_case)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StateChangeRequest op = KEYRAFT__STATE_CHANGE_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    op.key = &ref;
    req.op_case = op_case;
    switch (op_case) {
    case KEYRAFT__REQUEST__OP_ACTIVATE:
        req.activate = &op;
        break;
    case KEYRAFT__REQUEST__OP_DEACTIVATE:
        req.deactivate = &op;
        break;
    case KEYRAFT__REQUEST__OP_DESTROY:
        req.destroy = &op;
        break;
    default:
        req.rotate = &op;
        break;
    }
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc == 0)
        rc = cli_print_key_result(cli, resp, 0);
    kr_response_free(resp);
    return rc;
}

static int cmd_activate(struct cli *cli, const struct args *a)
{
    return state_change(cli, a, KEYRAFT__REQUEST__OP_ACTIVATE);
}

static int cmd_deactivate(struct cli *cli, const struct args *a)
{
    return state_change(cli, a, KEYRAFT__REQUEST__OP_DEACTIVATE);
}

static int cmd_destroy(struct cli *cli, const struct args *a)
{
    return state_change(cli, a, KEYRAFT__REQUEST__OP_DESTROY);
}

static int cmd_rotate(struct cli *cli, const struct args *a)
{
    return state_change(cli, a, KEYRAFT__REQUEST__OP_ROTATE);
}

static int cmd_revoke(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RevokeKeyRequest op = KEYRAFT__REVOKE_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    const char *reason = cli_arg(a, "reason"), *message = cli_arg(a, "message");
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if (reason == NULL)
        return cli_usage(cli, "--reason is required");
    op.reason = kr_reason_parse(reason);
    if (op.reason == KEYRAFT__REVOKE_REASON__REASON_UNSPECIFIED &&
        strcmp(reason, "unspecified") != 0)
        return cli_usage(cli,
                           "unknown reason \"%s\" (unspecified, compromised, superseded, "
                           "cessation, affiliation-changed, privilege-withdrawn)",
                           reason);
    if (message != NULL)
        op.message = (char *)message;
    op.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_REVOKE;
    req.revoke = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc == 0)
        rc = cli_print_key_result(cli, resp, 0);
    kr_response_free(resp);
    return rc;
}

/* Prints a bytes result raw, or the whole result as JSON. */
static int print_bytes_result(const struct cli *cli, const Keyraft__Response *resp,
                              const ProtobufCBinaryData *bd)
{
    if (cli->json)
        return cli_print_json(cli, cli_json_result(resp));
    write_raw(bd->data, bd->len);
    return 0;
}

static const char *aad_of(const struct args *a, size_t *len)
{
    const char *aad = cli_arg(a, "aad");

    *len = aad != NULL ? strlen(aad) : 0;
    return aad;
}

static int cmd_encrypt(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__EncryptRequest op = KEYRAFT__ENCRYPT_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    kr_buf in = {0};
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if ((rc = read_stdin(cli, &in)) != 0)
        return rc;
    op.key = &ref;
    op.plaintext.data = in.data;
    op.plaintext.len = in.len;
    op.aad.data = (uint8_t *)aad_of(a, &op.aad.len);
    req.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    req.encrypt = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_ENCRYPT, &resp);
    if (rc == 0)
        rc = print_bytes_result(cli, resp, &resp->encrypt->ciphertext);
    kr_response_free(resp);
    kr_buf_free(&in);
    return rc;
}

static int cmd_decrypt(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__DecryptRequest op = KEYRAFT__DECRYPT_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    kr_buf in = {0};
    int rc;

    if ((rc = read_stdin(cli, &in)) != 0)
        return rc;
    op.ciphertext.data = in.data;
    op.ciphertext.len = in.len;
    op.aad.data = (uint8_t *)aad_of(a, &op.aad.len);
    req.op_case = KEYRAFT__REQUEST__OP_DECRYPT;
    req.decrypt = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_DECRYPT, &resp);
    if (rc == 0)
        rc = print_bytes_result(cli, resp, &resp->decrypt->plaintext);
    kr_response_free(resp);
    kr_buf_free(&in);
    return rc;
}

/* sign and mac: message on stdin, raw signature or tag on stdout. */
static int sign_or_mac(struct cli *cli, const struct args *a, int mac)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__SignRequest op = KEYRAFT__SIGN_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    kr_buf in = {0};
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if ((rc = read_stdin(cli, &in)) != 0)
        return rc;
    op.key = &ref;
    op.message.data = in.data;
    op.message.len = in.len;
    if (mac) {
        req.op_case = KEYRAFT__REQUEST__OP_MAC;
        req.mac = &op;
    } else {
        req.op_case = KEYRAFT__REQUEST__OP_SIGN;
        req.sign = &op;
    }
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_SIGN, &resp);
    if (rc == 0)
        rc = print_bytes_result(cli, resp, &resp->sign->signature);
    kr_response_free(resp);
    kr_buf_free(&in);
    return rc;
}

static int cmd_sign(struct cli *cli, const struct args *a)
{
    return sign_or_mac(cli, a, 0);
}

static int cmd_mac(struct cli *cli, const struct args *a)
{
    return sign_or_mac(cli, a, 1);
}

/* verify and verify-mac: exit 0 when valid, 1 when not. */
static int verify_common(struct cli *cli, const struct args *a, int mac)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__VerifyRequest op = KEYRAFT__VERIFY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    const char *opt = mac ? "mac" : "sig";
    const char *path = cli_arg(a, opt);
    kr_buf msg = {0}, sig = {0};
    int rc, valid;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if (path == NULL)
        return cli_usage(cli, "--%s FILE is required", opt);
    if ((rc = read_file(cli, path, &sig)) != 0)
        goto out;
    if ((rc = read_stdin(cli, &msg)) != 0)
        goto out;
    op.key = &ref;
    op.message.data = msg.data;
    op.message.len = msg.len;
    op.signature.data = sig.data;
    op.signature.len = sig.len;
    if (mac) {
        req.op_case = KEYRAFT__REQUEST__OP_VERIFY_MAC;
        req.verify_mac = &op;
    } else {
        req.op_case = KEYRAFT__REQUEST__OP_VERIFY;
        req.verify = &op;
    }
    if ((rc = cli_connect(cli)) != 0)
        goto out;
    rc = kr__call_ok(cli->client, &req, KEYRAFT__RESPONSE__RESULT_VERIFY, &resp);
    if (rc == KR_EAUTH) { /* a node may report a mismatch as a status */
        valid = 0;
    } else if (rc != 0) {
        rc = cli_fail_call(cli, rc);
        goto out;
    } else {
        valid = resp->verify->valid != 0;
    }
    if (cli->json) {
        rc = cli_print_json(cli, json_pack("{s:b}", "valid", valid));
        if (rc != 0)
            goto out;
    } else {
        printf("%s\n", valid ? "valid" : "invalid");
    }
    rc = valid ? 0 : EXIT_FAILURE;
out:
    kr_response_free(resp);
    kr_buf_free(&msg);
    kr_buf_free(&sig);
    return rc;
}

static int cmd_verify(struct cli *cli, const struct args *a)
{
    return verify_common(cli, a, 0);
}

static int cmd_verify_mac(struct cli *cli, const struct args *a)
{
    return verify_common(cli, a, 1);
}

static int cmd_datakey(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__DataKeyRequest op = KEYRAFT__DATA_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    const char *bits = cli_arg(a, "bits");
    char *pt = NULL, *wrapped = NULL;
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    op.bits = 256;
    if (bits != NULL) {
        if (strcmp(bits, "128") != 0 && strcmp(bits, "256") != 0)
            return cli_usage(cli, "--bits must be 128 or 256");
        op.bits = (uint32_t)atoi(bits);
    }
    op.key = &ref;
    op.aad.data = (uint8_t *)aad_of(a, &op.aad.len);
    req.op_case = KEYRAFT__REQUEST__OP_DATA_KEY;
    req.data_key = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_DATA_KEY, &resp);
    if (rc != 0)
        goto out;
    if (cli->json) {
        rc = cli_print_json(cli, cli_json_result(resp));
        goto out;
    }
    pt = cli_base64(resp->data_key->plaintext.data, resp->data_key->plaintext.len);
    wrapped = cli_base64(resp->data_key->wrapped.data, resp->data_key->wrapped.len);
    if (pt == NULL || wrapped == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory");
        goto out;
    }
    printf("plaintext: %s\nwrapped: %s\n", pt, wrapped);
out:
    if (pt != NULL) {
        OPENSSL_cleanse(pt, strlen(pt));
        free(pt);
    }
    free(wrapped);
    kr_response_free(resp);
    return rc;
}

static int wrap_or_unwrap(struct cli *cli, const struct args *a, int unwrap)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__WrapRequest wop = KEYRAFT__WRAP_REQUEST__INIT;
    Keyraft__UnwrapRequest uop = KEYRAFT__UNWRAP_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    kr_buf in = {0};
    int rc;

    if ((rc = cli_key_ref(cli, a, a->pos[0], &ref)) != 0)
        return rc;
    if ((rc = read_stdin(cli, &in)) != 0)
        return rc;
    if (unwrap) {
        uop.key = &ref;
        uop.wrapped.data = in.data;
        uop.wrapped.len = in.len;
        req.op_case = KEYRAFT__REQUEST__OP_UNWRAP;
        req.unwrap = &uop;
        rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_UNWRAP, &resp);
        if (rc == 0)
            rc = print_bytes_result(cli, resp, &resp->unwrap->material);
    } else {
        wop.key = &ref;
        wop.material.data = in.data;
        wop.material.len = in.len;
        req.op_case = KEYRAFT__REQUEST__OP_WRAP;
        req.wrap = &wop;
        rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_WRAP, &resp);
        if (rc == 0)
            rc = print_bytes_result(cli, resp, &resp->wrap->wrapped);
    }
    kr_response_free(resp);
    kr_buf_free(&in);
    return rc;
}

static int cmd_wrap(struct cli *cli, const struct args *a)
{
    return wrap_or_unwrap(cli, a, 0);
}

static int cmd_unwrap(struct cli *cli, const struct args *a)
{
    return wrap_or_unwrap(cli, a, 1);
}

static int cmd_random(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest op = KEYRAFT__RANDOM_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if ((rc = parse_u32(cli, "length", a->pos[0], 1, INPUT_MAX, &op.length)) != 0)
        return rc;
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_RANDOM, &resp);
    if (rc == 0) {
        if (!cli->json && cli_has(a, "hex"))
            print_hex(resp->random->data.data, resp->random->data.len);
        else
            rc = print_bytes_result(cli, resp, &resp->random->data);
    }
    kr_response_free(resp);
    return rc;
}

static int cmd_status(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StatusRequest op = KEYRAFT__STATUS_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    (void)a;
    req.op_case = KEYRAFT__REQUEST__OP_STATUS;
    req.status = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_NODE_STATUS, &resp);
    if (rc == 0) {
        json_t *j = cli_json_result(resp);
        if (cli->json) {
            rc = cli_print_json(cli, j);
        } else if (j == NULL) {
            rc = cli_fail(cli, KR_ENOMEM, "out of memory");
        } else {
            cli_print_flat(stdout, j);
            json_decref(j);
        }
    }
    kr_response_free(resp);
    return rc;
}

/* ---- cluster membership ------------------------------------------------------------------ */

static int print_cluster(const struct cli *cli, const Keyraft__ClusterListResponse *v)
{
    if (cli->json) {
        json_t *j = cli_json_message(&v->base);
        return cli_print_json(cli, j);
    }
    printf("%-6s %-22s %-22s %-8s %-8s %-7s %-10s %s\n", "ID", "CLIENT", "RAFT", "WANTED",
           "RAFT", "LEADER", "MATCH", "REACHABLE");
    for (size_t i = 0; i < v->n_nodes; i++) {
        const Keyraft__NodeInfo *n = v->nodes[i];
        const char *want = n->role == KEYRAFT__NODE_ROLE__NODE_VOTER     ? "voter"
                           : n->role == KEYRAFT__NODE_ROLE__NODE_STANDBY ? "standby"
                                                                         : "-";
        printf("%-6llu %-22s %-22s %-8s %-8s %-7s %-10llu %s\n", (unsigned long long)n->id,
               n->client_address[0] ? n->client_address : "-", n->raft_address, want,
               n->raft_role, n->leader ? "yes" : "", (unsigned long long)n->match_index,
               n->leader ? "-" : n->reachable ? "yes" : "no");
    }
    return 0;
}

static int read_join_request(const struct cli *cli, const char *path, Keyraft__JoinRequest **out)
{
    kr_buf raw = {0};
    int rc = read_file(cli, path, &raw);
    if (rc != 0)
        return rc;
    *out = keyraft__join_request__unpack(NULL, raw.len, raw.data);
    kr_buf_free(&raw);
    if (*out == NULL || (*out)->node_id == 0 || (*out)->csr_pem[0] == '\0')
        return cli_fail(cli, KR_EINVAL, "%s is not a join request (keyraftd init --join writes one)",
                    path);
    return 0;
}

static int write_bundle(const struct cli *cli, const char *path, const Keyraft__JoinBundle *b)
{
    size_t len = keyraft__join_bundle__get_packed_size(b);
    uint8_t *buf = malloc(len);
    if (buf == NULL)
        return cli_fail(cli, KR_ENOMEM, "out of memory");
    keyraft__join_bundle__pack(b, buf);
    FILE *f = fopen(path, "w");
    int ok = f != NULL && fwrite(buf, 1, len, f) == len;
    if (f != NULL && fclose(f) != 0)
        ok = 0;
    free(buf);
    if (!ok)
        return cli_fail(cli, KR_EIO, "cannot write %s: %s", path, strerror(errno));
    return 0;
}

/* `cluster add REQUEST`: the admin signs the node's certificate request with
 * the cluster CA key (which stays on the admin's side), the leader's HSM
 * wraps the MWK for the new token, and the bundle goes next to the request. */
static int cluster_add(struct cli *cli, const struct args *a, const char *request_path)
{
    Keyraft__JoinRequest *jr = NULL;
    Keyraft__Response *resp = NULL;
    char *cert = NULL;
    int rc = read_join_request(cli, request_path, &jr);
    if (rc != 0)
        return rc;
    rc = cli_connect(cli);
    if (rc != 0)
        goto out;
    char ca_key[4200], node_name[64], host[256], out_path[4200];
    const char *key_opt = cli_arg(a, "ca-key");
    if (key_opt != NULL) {
        snprintf(ca_key, sizeof(ca_key), "%s", key_opt);
    } else {
        /* Beside the CA certificate, as keyraftd init leaves it. */
        snprintf(ca_key, sizeof(ca_key), "%s", cli->ca_path);
        char *dot = strrchr(ca_key, '.');
        char *slash = strrchr(ca_key, '/');
        if (dot != NULL && (slash == NULL || dot > slash))
            snprintf(dot, sizeof(ca_key) - (size_t)(dot - ca_key), ".key");
    }
    snprintf(node_name, sizeof(node_name), "node-%llu", (unsigned long long)jr->node_id);
    snprintf(host, sizeof(host), "%s", jr->client_address);
    char *colon = strrchr(host, ':');
    if (colon != NULL)
        *colon = '\0';
    rc = pki_sign_node_csr(cli->ca_path, ca_key, jr->csr_pem, node_name, host, 825, &cert);
    if (rc != 0) {
        rc = cli_fail(cli, rc, "cannot sign %s's certificate with the CA key %s (--ca-key names "
                  "another)", node_name, ca_key);
        goto out;
    }
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ClusterAddRequest op = KEYRAFT__CLUSTER_ADD_REQUEST__INIT;
    op.node_id = jr->node_id;
    op.raft_address = jr->raft_address;
    op.client_address = jr->client_address;
    op.transport_spki = jr->transport_spki;
    op.audit_public_key = jr->audit_public_key;
    op.node_cert_pem = cert;
    op.standby = cli_has(a, "standby");
    req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_ADD;
    req.cluster_add = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_JOIN_BUNDLE, &resp);
    if (rc != 0)
        goto out;
    const char *out_opt = cli_arg(a, "out");
    if (out_opt != NULL) {
        snprintf(out_path, sizeof(out_path), "%s", out_opt);
    } else {
        snprintf(out_path, sizeof(out_path), "%s", request_path);
        char *slash = strrchr(out_path, '/');
        size_t at = slash ? (size_t)(slash + 1 - out_path) : 0;
        snprintf(out_path + at, sizeof(out_path) - at, "join-bundle");
    }
    rc = write_bundle(cli, out_path, resp->join_bundle);
    if (rc != 0)
        goto out;
    if (cli->json) {
        json_t *j = json_pack("{s:I,s:s,s:b,s:I}", "node_id", (json_int_t)jr->node_id, "bundle",
                              out_path, "standby", (int)op.standby, "commit_index",
                              (json_int_t)resp->commit_index);
        rc = cli_print_json(cli, j);
    } else {
        printf("node %llu admitted as %s; bundle written to %s\n"
               "start it with: keyraftd --data <its data dir>\n",
               (unsigned long long)jr->node_id, op.standby ? "standby" : "voter", out_path);
    }
out:
    kr_response_free(resp);
    free(cert);
    if (jr != NULL)
        keyraft__join_request__free_unpacked(jr, NULL);
    return rc;
}

static int parse_node_id(const struct cli *cli, const char *s, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 10) : 0;
    if (s == NULL || end == s || *end != '\0' || errno != 0)
        return cli_usage(cli, "want a node id, got \"%s\"", s ? s : "");
    *out = v;
    return 0;
}

static int cmd_cluster(struct cli *cli, const struct args *a)
{
    const char *sub = a->pos[0];
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ClusterListRequest list = KEYRAFT__CLUSTER_LIST_REQUEST__INIT;
    Keyraft__ClusterNodeRequest node = KEYRAFT__CLUSTER_NODE_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (strcmp(sub, "add") == 0) {
        if (a->n_pos != 2)
            return cli_usage(cli, "cluster add needs the join request file");
        return cluster_add(cli, a, a->pos[1]);
    }
    if (strcmp(sub, "list") == 0) {
        req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_LIST;
        req.cluster_list = &list;
    } else {
        if (strcmp(sub, "transfer") == 0 && a->n_pos == 1)
            node.node_id = 0;
        else if ((rc = parse_node_id(cli, a->n_pos == 2 ? a->pos[1] : NULL, &node.node_id)) != 0)
            return rc;
        if (strcmp(sub, "promote") == 0) {
            req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_PROMOTE;
            req.cluster_promote = &node;
        } else if (strcmp(sub, "demote") == 0) {
            req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_DEMOTE;
            req.cluster_demote = &node;
        } else if (strcmp(sub, "remove") == 0) {
            req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_REMOVE;
            req.cluster_remove = &node;
        } else if (strcmp(sub, "transfer") == 0) {
            req.op_case = KEYRAFT__REQUEST__OP_CLUSTER_TRANSFER;
            req.cluster_transfer = &node;
        } else {
            return cli_usage(cli, "unknown cluster command \"%s\"", sub);
        }
    }
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_CLUSTER, &resp);
    if (rc == 0)
        rc = print_cluster(cli, resp->cluster);
    kr_response_free(resp);
    return rc;
}

/* ---- command table ------------------------------------------------------------------ */

static const struct optspec opts_none[] = {{NULL, 0}};
static const struct optspec opts_keyref[] = {{"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_create[] = {
    {"name", OPT_ARG},         {"alg", OPT_ARG},           {"tag", OPT_MULTI},
    {"pre-active", OPT_FLAG},  {"non-exportable", OPT_FLAG}, {"domain", OPT_ARG},
    {"owner-group", OPT_ARG},  {"allow", OPT_MULTI},       {"usage-limit", OPT_ARG},
    {NULL, 0}};
static const struct optspec opts_import[] = {
    {"name", OPT_ARG},         {"alg", OPT_ARG},           {"file", OPT_ARG},
    {"tag", OPT_MULTI},        {"pre-active", OPT_FLAG},   {"non-exportable", OPT_FLAG},
    {"domain", OPT_ARG},       {"owner-group", OPT_ARG},   {"allow", OPT_MULTI},
    {"usage-limit", OPT_ARG},  {NULL, 0}};
static const struct optspec opts_get[] = {{"name", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_list[] = {{"alg", OPT_ARG},    {"state", OPT_ARG},
                                           {"tag", OPT_ARG},    {"prefix", OPT_ARG},
                                           {"limit", OPT_ARG},  {"after", OPT_ARG},
                                           {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_export[] = {
    {"version", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_revoke[] = {
    {"reason", OPT_ARG}, {"message", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_encrypt[] = {{"aad", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_decrypt[] = {{"aad", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_verify[] = {{"sig", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_verify_mac[] = {
    {"mac", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_datakey[] = {
    {"bits", OPT_ARG}, {"aad", OPT_ARG}, {"domain", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_random[] = {{"hex", OPT_FLAG}, {NULL, 0}};
static const struct optspec opts_cluster[] = {
    {"standby", OPT_FLAG}, {"ca-key", OPT_ARG}, {"out", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_principal[] = {
    {"roles", OPT_ARG}, {"groups", OPT_ARG}, {"domains", OPT_ARG}, {"ca-key", OPT_ARG},
    {"days", OPT_ARG},  {"out", OPT_ARG},    {"serial", OPT_ARG},  {NULL, 0}};
static const struct optspec opts_policy[] = {{"owner-group", OPT_ARG},
                                             {"allow", OPT_MULTI},
                                             {"usage-limit", OPT_ARG},
                                             {"domain", OPT_ARG},
                                             {NULL, 0}};
static const struct optspec opts_quorum[] = {
    {"approvers", OPT_ARG}, {"ttl", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_approvals[] = {{"all", OPT_FLAG}, {"reason", OPT_ARG}, {NULL, 0}};
static const struct optspec opts_audit[] = {
    {"n", OPT_ARG},         {"limit", OPT_ARG}, {"follow", OPT_FLAG}, {"seconds", OPT_ARG},
    {"principal", OPT_ARG}, {"key", OPT_ARG},   {"op", OPT_ARG},      {"since", OPT_ARG},
    {"until", OPT_ARG},     {"denied", OPT_FLAG}, {"after", OPT_ARG}, {NULL, 0}};

static const struct optspec opts_create_bulk[] = {
    {"prefix", OPT_ARG},      {"count", OPT_ARG},     {"alg", OPT_ARG},
    {"batch", OPT_ARG},       {"start", OPT_ARG},     {"domain", OPT_ARG},
    {"owner-group", OPT_ARG}, {"allow", OPT_MULTI},   {"usage-limit", OPT_ARG},
    {"out", OPT_ARG},         {NULL, 0}};
static const struct optspec opts_import_bulk[] = {
    {"file", OPT_ARG},        {"alg", OPT_ARG},       {"batch", OPT_ARG},
    {"domain", OPT_ARG},      {"owner-group", OPT_ARG}, {"allow", OPT_MULTI},
    {"usage-limit", OPT_ARG}, {"out", OPT_ARG},       {NULL, 0}};

#define POLICY_OPTS "[--domain D] [--owner-group G] [--allow G:OP[,OP...]]... [--usage-limit N]"

static const struct command commands[] = {
    {"create", cmd_create, opts_create, 0, 0,
     "create --name N --alg A [--tag k=v]... [--pre-active] [--non-exportable]\n"
     "      " POLICY_OPTS,
     "Creates a key; prints its id. --domain: the domain it lives in (default: your first). "
     "--owner-group: the group whose members use it (default: your first group); --allow "
     "G:OPS (repeatable) gives group G exactly these operations (e.g. encrypt,decrypt); "
     "--usage-limit: encryptions per version (an integer or 2^K; 0: unlimited)."},
    {"create-bulk", cli_cmd_create_bulk, opts_create_bulk, 0, 0,
     "create-bulk --prefix P --count N [--alg A] [--batch B] [--start K] [--out FILE]\n"
     "      " POLICY_OPTS,
     "Creates keys P-K .. P-(K+N-1) (K: --start, default 0; A: default aes-256), B per "
     "request (default 1000, at most 10000). Prints \"name id\" per key created (to --out, "
     "appended, or stdout); progress on stderr. A name that exists is reported and skipped: "
     "rerun (or --start) to resume. Exit 1 when any key failed."},
    {"import-bulk", cli_cmd_import_bulk, opts_import_bulk, 0, 0,
     "import-bulk --file F [--alg A] [--batch B] [--out FILE] " POLICY_OPTS,
     "Imports keys from F, one per line: \"name hexmaterial\" (raw bytes for aes/hmac, DER "
     "PKCS#8 for the others; blank lines and # comments skipped), B per request. Prints "
     "\"name id\" per key imported; existing names are skipped. Exit 1 when any key failed."},
    {"get", cmd_get, opts_get, 0, 1, "get ID|name:N|--name N [--domain D]",
     "Shows a key's attributes, its policy, and per version the encryptions counted."},
    {"list", cmd_list, opts_list, 0, 0,
     "list [--alg A] [--state S] [--tag k=v] [--prefix P] [--limit N] [--after CURSOR] "
     "[--domain D]",
     "Lists keys, a page at a time; \"next: CURSOR\" names the next page."},
    {"export", cmd_export, opts_export, 1, 1, "export ID [--version V] [--domain D]",
     "Prints a key version's material (hex; base64 with --json). May be held for quorum "
     "approval (exit 3)."},
    {"import", cmd_import, opts_import, 0, 0,
     "import --name N --alg A --file F [--tag k=v]... [--pre-active] [--non-exportable]\n"
     "      " POLICY_OPTS,
     "Imports a key: raw bytes for aes/hmac, a PEM or DER private key otherwise. Policy "
     "options as for create."},
    {"activate", cmd_activate, opts_keyref, 1, 1, "activate ID [--domain D]",
     "Activates a pre-active key."},
    {"deactivate", cmd_deactivate, opts_keyref, 1, 1, "deactivate ID [--domain D]",
     "Deactivates a key: it may still decrypt and verify."},
    {"revoke", cmd_revoke, opts_revoke, 1, 1, "revoke ID --reason R [--message M] [--domain D]",
     "Revokes a key (reasons: unspecified, compromised, superseded, cessation, "
     "affiliation-changed, privilege-withdrawn)."},
    {"destroy", cmd_destroy, opts_keyref, 1, 1, "destroy ID [--domain D]",
     "Destroys a key's material; the attributes stay. May be held for quorum approval "
     "(exit 3)."},
    {"rotate", cmd_rotate, opts_keyref, 1, 1, "rotate ID [--domain D]",
     "Makes a new version of a key."},
    {"encrypt", cmd_encrypt, opts_encrypt, 1, 1,
     "encrypt ID [--aad S] [--domain D] <plaintext >ciphertext",
     "Encrypts stdin; raw ciphertext on stdout (base64 in JSON with --json)."},
    {"decrypt", cmd_decrypt, opts_decrypt, 0, 0, "decrypt [--aad S] <ciphertext >plaintext",
     "Decrypts stdin; the ciphertext names its key."},
    {"sign", cmd_sign, opts_keyref, 1, 1, "sign ID [--domain D] <message >signature",
     "Signs stdin; raw signature on stdout."},
    {"verify", cmd_verify, opts_verify, 1, 1, "verify ID --sig FILE [--domain D] <message",
     "Prints valid or invalid; exit 0 when valid, 1 when not."},
    {"mac", cmd_mac, opts_keyref, 1, 1, "mac ID [--domain D] <message >mac",
     "MACs stdin; raw MAC on stdout."},
    {"verify-mac", cmd_verify_mac, opts_verify_mac, 1, 1,
     "verify-mac ID --mac FILE [--domain D] <message",
     "Prints valid or invalid; exit 0 when valid, 1 when not."},
    {"datakey", cmd_datakey, opts_datakey, 1, 1,
     "datakey ID [--bits 128|256] [--aad S] [--domain D]",
     "Makes a data key: its plaintext and its encryption under ID (base64)."},
    {"wrap", cmd_wrap, opts_keyref, 1, 1, "wrap ID [--domain D] <material >wrapped",
     "Wraps stdin under ID (AES-KWP)."},
    {"unwrap", cmd_unwrap, opts_keyref, 1, 1, "unwrap ID [--domain D] <wrapped >material",
     "Unwraps stdin under ID."},
    {"random", cmd_random, opts_random, 1, 1, "random N [--hex]",
     "N random bytes from the cluster, raw (or hex) on stdout."},
    {"status", cmd_status, opts_none, 0, 0, "status", "Shows the node's role and raft state."},
    {"cluster", cmd_cluster, opts_cluster, 1, 2,
     "cluster list | add REQUEST [--standby] [--ca-key F] [--out F] | promote ID | "
     "demote ID | remove ID | transfer [ID]",
     "Cluster membership (admin role). add admits a node prepared by `keyraftd init "
     "--join`: signs its certificate with the CA key, has the leader's HSM wrap the MWK for "
     "it, writes its join bundle. promote makes a voter, demote a standby (replicates and "
     "serves reads, no vote), transfer hands leadership over."},
    {"principal", cli_cmd_principal, opts_principal, 1, 2,
     "principal create NAME --roles R[,R] [--groups G[,G]] [--domains D[,D]]\n"
     "                  --ca-key CA_KEY [--days N] --out DIR\n"
     "  | principal list | principal revoke NAME [--serial HEX]",
     "Principals (admin role). create issues a client key and certificate for CN=NAME with "
     "the CA key (on this host; the CA is the global --ca, default the config's), "
     "writes DIR/NAME.pem and DIR/NAME.key (0600), registers the principal, then writes "
     "DIR/NAME.conf, a client config for it. Roles: admin, officer, user, auditor; admin "
     "stands alone. --days defaults to 365. revoke revokes one certificate (--serial) or "
     "all of them."},
    {"domain", cli_cmd_domain, opts_none, 1, 2,
     "domain create ID | domain destroy ID | domain list",
     "Domains (admin role). destroy crypto-shreds the domain key: EVERY key in the domain "
     "becomes unusable at once, for good. It may be held for quorum approval (exit 3)."},
    {"policy", cli_cmd_policy, opts_policy, 2, 2,
     "policy set KEY [--owner-group G] [--allow G:OP[,OP...]]... [--usage-limit N] "
     "[--domain D]",
     "Sets a key's policy. The policy given REPLACES the old one entirely: grants and a "
     "usage limit not repeated here are dropped. May be held for quorum approval (exit 3)."},
    {"quorum", cli_cmd_quorum, opts_quorum, 1, 3,
     "quorum set OPERATION M [--approvers ROLE] [--ttl DURATION] | quorum list",
     "M-of-N approval rules (admin role). OPERATION: export, destroy, domain_destroy, "
     "policy_change, node_admission, principal_admin. M = 0 removes the rule. --approvers: "
     "the role that may approve (default: officer for key operations, admin otherwise); "
     "--ttl: how long a request waits, like 90s, 15m, 24h (default 24h)."},
    {"approvals", cli_cmd_approvals, opts_approvals, 1, 2,
     "approvals list [--all] | approvals show ID | approvals approve ID [--reason TEXT]\n"
     "  | approvals deny ID [--reason TEXT]",
     "Requests held for quorum approval. list shows pending ones (--all: every state). "
     "Once approved, the requester runs the same command again with --approval ID."},
    {"audit", cli_cmd_audit, opts_audit, 1, 1,
     "audit tail [-n N] [--follow [--seconds S]]\n"
     "  | audit query [--principal P] [--key ID] [--op OP] [--since TIME] [--until TIME]\n"
     "                [--denied] [--limit N]\n"
     "  | audit verify | audit export [--after SEQ]",
     "The audit trail (auditor role). tail: the last N records (default 20); --follow polls "
     "for new ones every second, for --seconds S (needed unless stdout is a terminal). "
     "query: filtered records (TIME: unix ms, RFC 3339 like 2026-11-23T14:00:00Z, or "
     "relative like -15m); --limit caps the records printed (default: all). verify: checks "
     "the hash chain and checkpoint signatures; exit 1 when broken. export: JSON lines, one "
     "record each. Here --key is the key filter: give the TLS --key before the command."},
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static const char global_usage[] =
    "usage: keyraft [--config FILE] [--endpoint HOST:PORT[,...]] [--json] COMMAND ...\n"
    "exit: 0 ok, 1 failed, 2 usage, 3 held for quorum approval\n"
    "global options (also accepted after the command):\n"
    "  --config FILE        client config (default: $KEYRAFT_CONFIG,\n"
    "                       ~/.config/keyraft/client.conf, ./keyraft-data/client.conf)\n"
    "  --endpoint LIST      nodes to talk to, overriding the config\n"
    "  --ca/--cert/--key F  TLS files, overriding the config\n"
    "  --timeout-ms N       per-request timeout\n"
    "  --linearizable       reads go to the leader, after a raft barrier\n"
    "  --json               JSON output\n"
    "  --approval ID        run an operation a quorum approved (the approval's id)\n"
    "  --wait SECONDS       when held for approval, wait for the decision (polls every\n"
    "                       second) and, once approved, run it\n"
    "  --help               this text, or a command's with COMMAND --help\n"
    "commands:\n";

static void print_global_usage(FILE *out)
{
    fputs(global_usage, out);
    for (size_t i = 0; i < N_COMMANDS; i++) {
        fputs("  ", out);
        for (const char *c = commands[i].usage; *c != '\0'; c++)
            fputs(*c == '\n' ? "\n  " : (char[]){*c, '\0'}, out);
        fputc('\n', out);
    }
}

static const struct command *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    return NULL;
}

static const struct optspec *find_opt(const struct optspec *opts, const char *name,
                                      size_t name_len)
{
    for (; opts->name != NULL; opts++)
        if (strlen(opts->name) == name_len && strncmp(opts->name, name, name_len) == 0)
            return opts;
    return NULL;
}

static const struct optspec global_opts[] = {
    {"config", OPT_ARG}, {"endpoint", OPT_ARG},   {"ca", OPT_ARG},  {"cert", OPT_ARG},
    {"key", OPT_ARG},    {"timeout-ms", OPT_ARG}, {"json", OPT_FLAG}, {"help", OPT_FLAG},
    {"linearizable", OPT_FLAG}, {"approval", OPT_ARG}, {"wait", OPT_ARG}, {NULL, 0}};

static void set_global(struct cli *cli, const char *name, const char *val, int *help)
{
    if (strcmp(name, "config") == 0)
        cli->config_path = val;
    else if (strcmp(name, "endpoint") == 0)
        cli->endpoint = val;
    else if (strcmp(name, "ca") == 0)
        cli->ca = val;
    else if (strcmp(name, "cert") == 0)
        cli->cert = val;
    else if (strcmp(name, "key") == 0)
        cli->key = val;
    else if (strcmp(name, "timeout-ms") == 0)
        cli->timeout = val;
    else if (strcmp(name, "json") == 0)
        cli->json = 1;
    else if (strcmp(name, "linearizable") == 0)
        cli->linearizable = 1;
    else if (strcmp(name, "approval") == 0)
        cli->approval_id = val;
    else if (strcmp(name, "wait") == 0)
        cli->wait_arg = val;
    else
        *help = 1;
}

/* Splits argv into global options, the command, its options and its
 * positional arguments. Returns 0 or CLI_EXIT_USAGE (the error printed). */
static int parse_argv(struct cli *cli, int argc, char **argv, struct args *a, int *help)
{
    int only_pos = 0;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];

        if (!only_pos && strcmp(arg, "--") == 0) {
            only_pos = 1;
            continue;
        }
        if (!only_pos && strcmp(arg, "-h") == 0) {
            *help = 1;
            continue;
        }
        if (!only_pos && arg[0] == '-' && arg[1] != '\0') {
            const char *name = arg[1] == '-' ? arg + 2 : arg + 1;
            const char *eq = strchr(name, '=');
            size_t name_len = eq != NULL ? (size_t)(eq - name) : strlen(name);
            const struct optspec *o = NULL;
            int global = 0;
            const char *val = NULL;

            /* Single-dash options are one letter a command names (audit -n). */
            if (arg[1] != '-' && (name_len != 1 || cli->cmd == NULL ||
                                  find_opt(cli->cmd->opts, name, name_len) == NULL))
                return cli_usage(cli, "unknown option %s (options start with --)", arg);
            /* After the command its own options come first (audit query --key
             * is a filter; the TLS --key goes before the command). */
            if (cli->cmd != NULL)
                o = find_opt(cli->cmd->opts, name, name_len);
            if (o == NULL) {
                o = find_opt(global_opts, name, name_len);
                global = o != NULL;
            }
            if (o == NULL)
                return cli_usage(cli, "unknown option --%.*s", (int)name_len, name);
            if (o->kind & OPT_ARG) {
                if (eq != NULL)
                    val = eq + 1;
                else if (i + 1 < argc)
                    val = argv[++i];
                else
                    return cli_usage(cli, "--%s needs a value", o->name);
            } else if (eq != NULL) {
                return cli_usage(cli, "--%s takes no value", o->name);
            }
            if (global) {
                set_global(cli, o->name, val, help);
                continue;
            }
            if (a->n_kv == CLI_MAX_ARGS)
                return cli_usage(cli, "too many options");
            a->kv[a->n_kv].name = o->name;
            a->kv[a->n_kv].val = val;
            a->n_kv++;
            continue;
        }
        if (cli->cmd == NULL) {
            cli->cmd = find_command(arg);
            if (cli->cmd == NULL)
                return cli_usage(cli, "unknown command \"%s\"", arg);
            continue;
        }
        if (a->n_pos == cli->cmd->max_pos || a->n_pos == CLI_MAX_POS)
            return cli_usage(cli, "unexpected argument \"%s\"", arg);
        a->pos[a->n_pos++] = arg;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct cli cli = {0};
    struct args a = {0};
    int help = 0, rc;

    rc = parse_argv(&cli, argc, argv, &a, &help);
    if (rc != 0)
        return rc;
    if (help) {
        if (cli.cmd != NULL)
            printf("usage: keyraft [global options] %s\n%s\n", cli.cmd->usage, cli.cmd->help);
        else
            print_global_usage(stdout);
        return finish_output(&cli, 0);
    }
    if (cli.cmd == NULL) {
        print_global_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    if (a.n_pos < cli.cmd->min_pos)
        return cli_usage(&cli, "missing argument");
    if (cli.approval_id != NULL && cli.approval_id[0] == '\0')
        return cli_usage(&cli, "--approval is empty");
    if (cli.wait_arg != NULL) {
        if (cli_parse_duration_ms(cli.wait_arg, &cli.wait_ms) != 0 || cli.wait_ms == 0)
            return cli_usage(&cli, "bad --wait \"%s\": want seconds (or a duration like 10m)",
                             cli.wait_arg);
        cli.wait = 1;
    }
    rc = cli.cmd->run(&cli, &a);
    if (rc == CLI_RC_PRINTED)
        rc = 0;
    rc = finish_output(&cli, rc);
    kr_client_free(cli.client);
    kr_client_file_free(cli.file);
    return rc;
}
