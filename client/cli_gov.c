/* cli_gov.c: the keyraft CLI's governance commands: principals, domains, key
 * policy, quorum rules, approvals and the audit trail. */
#include "cli.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "cli_json.h"
#include "client_internal.h"
#include "pki.h"

#define CERT_FILE_MAX (64 * 1024)
#define DEFAULT_CERT_DAYS 365
#define MAX_CERT_DAYS 36500
#define AUDIT_TAIL_DEFAULT 20
#define AUDIT_FOLLOW_POLL_MS 1000
#define AUDIT_PAGE_MAX 1000u
#define QUORUM_MAX 255

static int usage_sub(const struct cli *cli, const char *group, const char *sub)
{
    return cli_usage(cli, "unknown %s command \"%s\"", group, sub);
}

/* An identifier given on the command line (domain id, group): non-empty,
 * no spaces, commas or control characters. */
static int valid_ident(const char *s)
{
    if (s == NULL || *s == '\0' || strlen(s) > 256)
        return 0;
    for (; *s != '\0'; s++)
        if ((unsigned char)*s <= ' ' || *s == ',' || *s == 0x7f)
            return 0;
    return 1;
}

static void print_list(const char *label, char *const *items, size_t n)
{
    printf("%s: ", label);
    if (n == 0)
        printf("-");
    for (size_t i = 0; i < n; i++)
        printf("%s%s", i > 0 ? "," : "", items[i]);
    putchar('\n');
}

static void print_when(const char *label, uint64_t ms)
{
    char buf[48];

    if (ms == 0)
        return;
    cli_format_time(ms, buf, sizeof(buf));
    printf("%s: %s\n", label, buf);
}

/* ---- principals --------------------------------------------------------------------------- */

static void print_principal(const Keyraft__PrincipalInfo *p)
{
    char when[48];

    printf("name: %s\n", p->name);
    print_list("roles", p->roles, p->n_roles);
    print_list("groups", p->groups, p->n_groups);
    print_list("domains", p->domains, p->n_domains);
    print_when("created", p->created_at);
    if (p->created_by[0] != '\0')
        printf("created-by: %s\n", p->created_by);
    for (size_t i = 0; i < p->n_certs; i++) {
        const Keyraft__PrincipalCert *c = p->certs[i];
        cli_format_time(c->not_after, when, sizeof(when));
        printf("certificate: %s, valid until %s", c->serial, when);
        if (c->revoked) {
            cli_format_time(c->revoked_at, when, sizeof(when));
            printf(", revoked %s%s%s", when, c->revoked_by[0] != '\0' ? " by " : "",
                   c->revoked_by);
        }
        putchar('\n');
    }
}

static int print_principal_result(const struct cli *cli, const Keyraft__Response *resp,
                                  const char *done)
{
    if (cli->json)
        return cli_print_json(cli, cli_json_result(resp));
    if (resp->result_case == KEYRAFT__RESPONSE__RESULT_PRINCIPAL)
        print_principal(resp->principal);
    else
        printf("%s\n", done);
    return 0;
}

/* Reads a PEM file (at most CERT_FILE_MAX bytes) as a string; free() it. */
static int read_pem(const struct cli *cli, const char *path, char **out)
{
    FILE *f = fopen(path, "r");
    char *buf = NULL;
    size_t n;

    if (f == NULL)
        return cli_fail(cli, KR_EIO, "cannot open %s: %s", path, strerror(errno));
    buf = malloc(CERT_FILE_MAX + 1);
    if (buf == NULL) {
        fclose(f);
        return cli_fail(cli, KR_ENOMEM, "out of memory");
    }
    n = fread(buf, 1, CERT_FILE_MAX + 1, f);
    if (ferror(f) || n == 0 || n > CERT_FILE_MAX) {
        fclose(f);
        free(buf);
        return cli_fail(cli, KR_EIO, "cannot read %s (empty, unreadable or over %d bytes)",
                        path, CERT_FILE_MAX);
    }
    fclose(f);
    buf[n] = '\0';
    *out = buf;
    return 0;
}

/* A certificate and key left by an earlier run (held for approval): reused
 * only when the certificate names |name| and the key is its own. */
static int check_existing(const struct cli *cli, const char *name, const char *cert_path,
                          const char *key_path)
{
    FILE *cf = fopen(cert_path, "r"), *kf = fopen(key_path, "r");
    X509 *x = cf != NULL ? PEM_read_X509(cf, NULL, NULL, NULL) : NULL;
    EVP_PKEY *k = kf != NULL ? PEM_read_PrivateKey(kf, NULL, NULL, NULL) : NULL;
    char cn[256] = "";
    int rc = 0;

    if (x != NULL)
        X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
    if (x == NULL || k == NULL || X509_check_private_key(x, k) != 1 || strcmp(cn, name) != 0)
        rc = cli_fail(cli, KR_EEXIST,
                      "%s or %s exists and is not a matching certificate and key for %s: "
                      "remove them or choose another --out",
                      cert_path, key_path, name);
    ERR_clear_error();
    X509_free(x);
    EVP_PKEY_free(k);
    if (cf != NULL)
        fclose(cf);
    if (kf != NULL)
        fclose(kf);
    return rc;
}

/* The client config for the new principal: the same endpoints (and
 * timeout) as the one in use, absolute paths to the CA and the new files. */
static int write_client_conf(const struct cli *cli, const char *path, const char *cert_path,
                             const char *key_path)
{
    char ca[PATH_MAX], cert[PATH_MAX], key[PATH_MAX];
    int fd, ok;
    FILE *f;

    if (realpath(cli->ca_path, ca) == NULL || realpath(cert_path, cert) == NULL ||
        realpath(key_path, key) == NULL)
        return cli_fail(cli, KR_EIO, "cannot resolve the CA or certificate paths: %s",
                        strerror(errno));
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 || (f = fdopen(fd, "w")) == NULL) {
        if (fd >= 0)
            close(fd);
        return cli_fail(cli, KR_EIO, "cannot write %s: %s", path, strerror(errno));
    }
    fprintf(f, "[client]\nendpoints = %s\nca = %s\ncert = %s\nkey = %s\n",
            cli->cfg.endpoints != NULL ? cli->cfg.endpoints : "", ca, cert, key);
    if (cli->cfg.timeout_ms > 0)
        fprintf(f, "timeout_ms = %d\n", cli->cfg.timeout_ms);
    ok = !ferror(f);
    if (fclose(f) != 0)
        ok = 0;
    if (!ok)
        return cli_fail(cli, KR_EIO, "cannot write %s: %s", path, strerror(errno));
    return 0;
}

/* Splits an optional comma list option; 0 or an exit code. */
static int list_opt(const struct cli *cli, const struct args *a, const char *opt, char ***items,
                    size_t *n)
{
    const char *v = cli_arg(a, opt);
    int rc;

    *items = NULL;
    *n = 0;
    if (v == NULL)
        return 0;
    rc = cli_split_list(v, items, n);
    if (rc == KR_ENOMEM)
        return cli_fail(cli, rc, "out of memory");
    if (rc != 0)
        return cli_usage(cli, "bad --%s \"%s\": want a comma-separated list without spaces",
                         opt, v);
    return 0;
}

static int principal_create(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {"roles", "groups", "domains", "ca-key",
                                          "days",  "out",    NULL};
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__PrincipalCreateRequest op = KEYRAFT__PRINCIPAL_CREATE_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *name = a->n_pos == 2 ? a->pos[1] : NULL;
    const char *roles_s = cli_arg(a, "roles"), *ca_key = cli_arg(a, "ca-key");
    const char *dir = cli_arg(a, "out"), *days_s = cli_arg(a, "days");
    char **roles = NULL, **groups = NULL, **domains = NULL, *cert_pem = NULL;
    size_t n_roles = 0, n_groups = 0, n_domains = 0;
    char cert_path[PATH_MAX], key_path[PATH_MAX], conf_path[PATH_MAX], err[256], hint[PATH_MAX + 160];
    uint64_t days = DEFAULT_CERT_DAYS;
    struct stat st;
    int rc, issued = 0;

    if ((rc = cli_only_opts(cli, a, "principal create", allowed)) != 0)
        return rc;
    if (name == NULL)
        return cli_usage(cli, "principal create needs a NAME");
    if (!cli_valid_principal(name))
        return cli_usage(cli, "bad principal name \"%s\": 1 to 64 of A-Z a-z 0-9 . _ @ -, "
                         "not starting with . or -", name);
    if (roles_s == NULL)
        return cli_usage(cli, "--roles is required");
    if (ca_key == NULL)
        return cli_usage(cli, "--ca-key is required (the cluster CA's private key)");
    if (dir == NULL || dir[0] == '\0')
        return cli_usage(cli, "--out DIR is required");
    if (days_s != NULL &&
        (cli_parse_count(days_s, &days) != 0 || days < 1 || days > MAX_CERT_DAYS))
        return cli_usage(cli, "bad --days \"%s\": want 1..%d", days_s, MAX_CERT_DAYS);
    if ((rc = list_opt(cli, a, "roles", &roles, &n_roles)) != 0 ||
        (rc = list_opt(cli, a, "groups", &groups, &n_groups)) != 0 ||
        (rc = list_opt(cli, a, "domains", &domains, &n_domains)) != 0)
        goto out;
    if (cli_check_roles(roles, n_roles, err, sizeof(err)) != 0) {
        rc = cli_usage(cli, "bad --roles \"%s\": %s", roles_s, err);
        goto out;
    }
    if (snprintf(cert_path, sizeof(cert_path), "%s/%s.pem", dir, name) >= (int)sizeof(cert_path) ||
        snprintf(key_path, sizeof(key_path), "%s/%s.key", dir, name) >= (int)sizeof(key_path) ||
        snprintf(conf_path, sizeof(conf_path), "%s/%s.conf", dir, name) >= (int)sizeof(conf_path)) {
        rc = cli_usage(cli, "--out path too long");
        goto out;
    }
    if ((rc = cli_connect(cli)) != 0)
        goto out;
    if (cli->ca_path[0] == '\0') {
        rc = cli_fail(cli, KR_ECONFIG, "no CA certificate: give --ca or a config with ca");
        goto out;
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        rc = cli_fail(cli, KR_EIO, "cannot make %s: %s", dir, strerror(errno));
        goto out;
    }
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        rc = cli_fail(cli, KR_EIO, "%s is not a directory", dir);
        goto out;
    }
    if (access(cert_path, F_OK) == 0 || access(key_path, F_OK) == 0) {
        /* Left by a run held for approval: the approved request names this
         * certificate, so it is sent again, not a new one. */
        if ((rc = check_existing(cli, name, cert_path, key_path)) != 0)
            goto out;
        fprintf(stderr, "keyraft: principal create: using the existing %s and %s\n", cert_path,
                key_path);
    } else {
        rc = pki_issue_client(cli->ca_path, ca_key, name, roles_s, (int)days, cert_path,
                              key_path);
        if (rc != 0) {
            rc = cli_fail(cli, rc, "cannot issue a certificate for %s with the CA %s and key %s",
                          name, cli->ca_path, ca_key);
            goto out;
        }
        issued = 1;
    }
    if ((rc = read_pem(cli, cert_path, &cert_pem)) != 0)
        goto out;
    op.name = (char *)name;
    op.roles = roles;
    op.n_roles = n_roles;
    op.groups = groups;
    op.n_groups = n_groups;
    op.domains = domains;
    op.n_domains = n_domains;
    op.cert_pem = cert_pem;
    req.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_CREATE;
    req.principal_create = &op;
    snprintf(hint, sizeof(hint),
             "the certificate in %s is not usable until the request is approved; the files "
             "stay, and the same command reuses them",
             dir);
    rc = cli_call_hint(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, hint, &resp);
    if (rc != 0) {
        if (rc == CLI_EXIT_FAILED && issued)
            fprintf(stderr, "keyraft: principal create: %s and %s stay; the same command "
                    "sends them again\n", cert_path, key_path);
        goto out;
    }
    if ((rc = write_client_conf(cli, conf_path, cert_path, key_path)) != 0)
        goto out;
    if (cli->json) {
        json_t *j = resp->result_case == KEYRAFT__RESPONSE__RESULT_PRINCIPAL
                        ? cli_json_message(&resp->principal->base)
                        : json_object();
        json_t *files = json_pack("{s:s,s:s,s:s}", "cert", cert_path, "key", key_path, "config",
                                  conf_path);
        if (j != NULL && (files == NULL || json_object_set_new(j, "files", files) != 0)) {
            json_decref(j);
            j = NULL;
        }
        rc = cli_print_json(cli, j);
    } else {
        if (resp->result_case == KEYRAFT__RESPONSE__RESULT_PRINCIPAL)
            print_principal(resp->principal);
        printf("files: %s %s %s\n", cert_path, key_path, conf_path);
    }
out:
    kr_response_free(resp);
    free(cert_pem);
    cli_list_free(roles, n_roles);
    cli_list_free(groups, n_groups);
    cli_list_free(domains, n_domains);
    return rc;
}

static int principal_list(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {NULL};
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__PrincipalListRequest op = KEYRAFT__PRINCIPAL_LIST_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    uint64_t now = cli_now_ms();
    int rc;

    if ((rc = cli_only_opts(cli, a, "principal list", allowed)) != 0)
        return rc;
    if (a->n_pos != 1)
        return cli_usage(cli, "principal list takes no argument");
    req.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_LIST;
    req.principal_list = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_PRINCIPALS, &resp);
    if (rc != 0)
        return rc;
    if (cli->json) {
        rc = cli_print_json(cli, cli_json_result(resp));
        kr_response_free(resp);
        return rc;
    }
    printf("%-24s %-20s %-24s %-24s %5s %7s\n", "NAME", "ROLES", "GROUPS", "DOMAINS", "VALID",
           "REVOKED");
    for (size_t i = 0; i < resp->principals->n_principals; i++) {
        const Keyraft__PrincipalInfo *p = resp->principals->principals[i];
        char cols[3][256];
        char *const *lists[3] = {p->roles, p->groups, p->domains};
        size_t ns[3] = {p->n_roles, p->n_groups, p->n_domains};
        unsigned valid = 0, revoked = 0;
        for (int c = 0; c < 3; c++) {
            size_t pos = 0;
            snprintf(cols[c], sizeof(cols[c]), "-");
            for (size_t k = 0; k < ns[c] && pos < sizeof(cols[c]); k++) {
                int w = snprintf(cols[c] + pos, sizeof(cols[c]) - pos, "%s%s", k ? "," : "",
                                 lists[c][k]);
                pos += w > 0 ? (size_t)w : 0;
            }
        }
        for (size_t k = 0; k < p->n_certs; k++) {
            if (p->certs[k]->revoked)
                revoked++;
            else if (p->certs[k]->not_after == 0 || p->certs[k]->not_after > now)
                valid++;
        }
        printf("%-24s %-20s %-24s %-24s %5u %7u\n", p->name, cols[0], cols[1], cols[2], valid,
               revoked);
    }
    kr_response_free(resp);
    return 0;
}

static int principal_revoke(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {"serial", NULL};
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__PrincipalRevokeRequest op = KEYRAFT__PRINCIPAL_REVOKE_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *serial = cli_arg(a, "serial");
    int rc;

    if ((rc = cli_only_opts(cli, a, "principal revoke", allowed)) != 0)
        return rc;
    if (a->n_pos != 2)
        return cli_usage(cli, "principal revoke needs a NAME");
    if (!cli_valid_principal(a->pos[1]))
        return cli_usage(cli, "bad principal name \"%s\"", a->pos[1]);
    if (serial != NULL) {
        if (serial[0] == '\0')
            return cli_usage(cli, "--serial is empty");
        for (const char *c = serial; *c != '\0'; c++)
            if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f') ||
                  (*c >= 'A' && *c <= 'F')))
                return cli_usage(cli, "bad --serial \"%s\": want hex", serial);
        op.serial = (char *)serial;
    }
    op.name = (char *)a->pos[1];
    req.op_case = KEYRAFT__REQUEST__OP_PRINCIPAL_REVOKE;
    req.principal_revoke = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc == 0)
        rc = print_principal_result(cli, resp, "revoked");
    kr_response_free(resp);
    return rc;
}

int cli_cmd_principal(struct cli *cli, const struct args *a)
{
    const char *sub = a->pos[0];

    if (strcmp(sub, "create") == 0)
        return principal_create(cli, a);
    if (strcmp(sub, "list") == 0)
        return principal_list(cli, a);
    if (strcmp(sub, "revoke") == 0)
        return principal_revoke(cli, a);
    return usage_sub(cli, "principal", sub);
}

/* ---- domains -------------------------------------------------------------------------------- */

static void print_domain(const Keyraft__DomainInfo *d)
{
    printf("id: %s\n", d->id);
    print_when("created", d->created_at);
    printf("state: %s\n", d->destroyed ? "destroyed" : "active");
    print_when("destroyed", d->destroyed_at);
}

int cli_cmd_domain(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__DomainRequest op = KEYRAFT__DOMAIN_REQUEST__INIT;
    Keyraft__DomainListRequest list = KEYRAFT__DOMAIN_LIST_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *sub = a->pos[0];
    int rc;

    if (strcmp(sub, "list") == 0) {
        if (a->n_pos != 1)
            return cli_usage(cli, "domain list takes no argument");
        req.op_case = KEYRAFT__REQUEST__OP_DOMAIN_LIST;
        req.domain_list = &list;
        rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_DOMAINS, &resp);
        if (rc != 0)
            return rc;
        if (cli->json) {
            rc = cli_print_json(cli, cli_json_result(resp));
        } else {
            printf("%-32s %-25s %s\n", "ID", "CREATED", "STATE");
            for (size_t i = 0; i < resp->domains->n_domains; i++) {
                const Keyraft__DomainInfo *d = resp->domains->domains[i];
                char created[48], destroyed[48];
                cli_format_time(d->created_at, created, sizeof(created));
                cli_format_time(d->destroyed_at, destroyed, sizeof(destroyed));
                printf("%-32s %-25s %s%s\n", d->id, created,
                       d->destroyed ? "destroyed " : "active", d->destroyed ? destroyed : "");
            }
        }
        kr_response_free(resp);
        return rc;
    }
    if (strcmp(sub, "create") != 0 && strcmp(sub, "destroy") != 0)
        return usage_sub(cli, "domain", sub);
    if (a->n_pos != 2)
        return cli_usage(cli, "domain %s needs an ID", sub);
    if (!valid_ident(a->pos[1]))
        return cli_usage(cli, "bad domain id \"%s\": no spaces, commas or control characters",
                         a->pos[1]);
    op.id = (char *)a->pos[1];
    if (strcmp(sub, "create") == 0) {
        req.op_case = KEYRAFT__REQUEST__OP_DOMAIN_CREATE;
        req.domain_create = &op;
    } else {
        req.op_case = KEYRAFT__REQUEST__OP_DOMAIN_DESTROY;
        req.domain_destroy = &op;
    }
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc != 0)
        return rc;
    if (cli->json)
        rc = cli_print_json(cli, cli_json_result(resp));
    else if (resp->result_case == KEYRAFT__RESPONSE__RESULT_DOMAIN)
        print_domain(resp->domain);
    else
        printf("domain %s %s\n", op.id, strcmp(sub, "create") == 0 ? "created" : "destroyed");
    kr_response_free(resp);
    return rc;
}

/* ---- key policy ------------------------------------------------------------------------------ */

int cli_cmd_policy(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__SetKeyPolicyRequest op = KEYRAFT__SET_KEY_POLICY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    struct cli_policy pol = {.given = 0};
    int rc;

    if (strcmp(a->pos[0], "set") != 0)
        return usage_sub(cli, "policy", a->pos[0]);
    if ((rc = cli_key_ref(cli, a, a->pos[1], &ref)) != 0)
        return rc;
    if ((rc = cli_policy_parse(cli, a, &pol)) != 0)
        goto out;
    if (!pol.given) {
        rc = cli_usage(cli, "give the whole new policy: --owner-group, --allow and/or "
                       "--usage-limit (it replaces the old one)");
        goto out;
    }
    op.key = &ref;
    op.policy = &pol.policy;
    req.op_case = KEYRAFT__REQUEST__OP_SET_POLICY;
    req.set_policy = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc != 0)
        goto out;
    if (cli->json || resp->result_case == KEYRAFT__RESPONSE__RESULT_KEY)
        rc = cli_print_key_result(cli, resp, 0);
    else
        printf("policy set\n");
out:
    kr_response_free(resp);
    cli_policy_clear(&pol);
    return rc;
}

/* ---- quorum rules ------------------------------------------------------------------------------ */

static int print_quorum(const struct cli *cli, const Keyraft__Response *resp)
{
    if (cli->json)
        return cli_print_json(cli, cli_json_result(resp));
    if (resp->result_case != KEYRAFT__RESPONSE__RESULT_QUORUM)
        return 0;
    printf("%-16s %8s %-10s %s\n", "OPERATION", "REQUIRED", "APPROVERS", "TTL");
    for (size_t i = 0; i < resp->quorum->n_rules; i++) {
        const Keyraft__QuorumRule *r = resp->quorum->rules[i];
        char ttl[32];
        if (r->ttl_ms != 0)
            cli_format_duration(r->ttl_ms, ttl, sizeof(ttl));
        else
            snprintf(ttl, sizeof(ttl), "24h (default)");
        printf("%-16s %8u %-10s %s\n", r->operation, r->required,
               r->approver_role[0] != '\0' ? r->approver_role : "(default)", ttl);
    }
    return 0;
}

int cli_cmd_quorum(struct cli *cli, const struct args *a)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__QuorumSetRequest set = KEYRAFT__QUORUM_SET_REQUEST__INIT;
    Keyraft__QuorumRule rule = KEYRAFT__QUORUM_RULE__INIT;
    Keyraft__QuorumListRequest list = KEYRAFT__QUORUM_LIST_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *sub = a->pos[0];
    int rc;

    if (strcmp(sub, "list") == 0) {
        static const char *const allowed[] = {NULL};
        if ((rc = cli_only_opts(cli, a, "quorum list", allowed)) != 0)
            return rc;
        if (a->n_pos != 1)
            return cli_usage(cli, "quorum list takes no argument");
        req.op_case = KEYRAFT__REQUEST__OP_QUORUM_LIST;
        req.quorum_list = &list;
        rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_QUORUM, &resp);
    } else if (strcmp(sub, "set") == 0) {
        const char *approvers = cli_arg(a, "approvers"), *ttl = cli_arg(a, "ttl");
        uint64_t m;
        if (a->n_pos != 3)
            return cli_usage(cli, "quorum set needs OPERATION and M");
        if (!cli_valid_quorum_op(a->pos[1]))
            return cli_usage(cli, "unknown operation \"%s\" (%s)", a->pos[1], cli_quorum_ops);
        if (cli_parse_count(a->pos[2], &m) != 0 || m > QUORUM_MAX)
            return cli_usage(cli, "bad M \"%s\": want 0..%d (0 removes the rule)", a->pos[2],
                             QUORUM_MAX);
        if (approvers != NULL) {
            char *one[1] = {(char *)approvers}, err[128];
            if (cli_check_roles(one, 1, err, sizeof(err)) != 0)
                return cli_usage(cli, "bad --approvers: %s", err);
            rule.approver_role = (char *)approvers;
        }
        if (ttl != NULL && (cli_parse_duration_ms(ttl, &rule.ttl_ms) != 0 || rule.ttl_ms == 0))
            return cli_usage(cli, "bad --ttl \"%s\": want a duration like 90s, 15m, 24h", ttl);
        rule.operation = (char *)a->pos[1];
        rule.required = (uint32_t)m;
        set.rule = &rule;
        req.op_case = KEYRAFT__REQUEST__OP_QUORUM_SET;
        req.quorum_set = &set;
        rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
        if (rc == 0 && !cli->json && resp->result_case != KEYRAFT__RESPONSE__RESULT_QUORUM) {
            if (m == 0)
                printf("quorum rule for %s removed\n", rule.operation);
            else
                printf("%s now needs %u approvals\n", rule.operation, rule.required);
        }
    } else {
        return usage_sub(cli, "quorum", sub);
    }
    if (rc == 0)
        rc = print_quorum(cli, resp);
    kr_response_free(resp);
    return rc;
}

/* ---- approvals --------------------------------------------------------------------------------- */

static unsigned approvals_count(const Keyraft__ApprovalInfo *ai)
{
    unsigned n = 0;

    for (size_t i = 0; i < ai->n_votes; i++)
        n += ai->votes[i]->approve ? 1 : 0;
    return n;
}

static void expires_in(const Keyraft__ApprovalInfo *ai, uint64_t now, char *buf, size_t len)
{
    if (ai->state != KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING &&
        ai->state != KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED)
        snprintf(buf, len, "-");
    else if (ai->expires_at <= now)
        snprintf(buf, len, "expired");
    else
        cli_format_duration(ai->expires_at - now, buf, len);
}

int cli_print_approval(const struct cli *cli, const Keyraft__ApprovalInfo *ai)
{
    char left[32];

    if (cli->json)
        return cli_print_json(cli, cli_json_message(&ai->base));
    printf("id: %s\n", ai->id);
    printf("operation: %s\n", ai->operation);
    printf("summary: %s\n", ai->summary);
    printf("requester: %s\n", ai->requester);
    if (ai->key_id[0] != '\0')
        printf("key: %s\n", ai->key_id);
    printf("state: %s\n", cli_approval_state_name(ai->state));
    printf("approvals: %u/%u (approver role: %s)\n", approvals_count(ai), ai->required,
           ai->approver_role[0] != '\0' ? ai->approver_role : "default");
    print_when("created", ai->created_at);
    print_when("expires", ai->expires_at);
    expires_in(ai, cli_now_ms(), left, sizeof(left));
    if (strcmp(left, "-") != 0)
        printf("expires-in: %s\n", left);
    for (size_t i = 0; i < ai->n_votes; i++) {
        const Keyraft__ApprovalVote *v = ai->votes[i];
        char when[48];
        cli_format_time(v->at, when, sizeof(when));
        printf("vote: %s %s at %s%s%s\n", v->principal, v->approve ? "approved" : "denied", when,
               v->reason[0] != '\0' ? ": " : "", v->reason);
    }
    if (ai->state == KEYRAFT__APPROVAL_STATE__APPROVAL_DONE)
        printf("result: %s%s%s\n", kr_status_name(ai->result_status),
               ai->result_message[0] != '\0' ? ": " : "", ai->result_message);
    return 0;
}

static int approvals_list(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {"all", NULL};
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ApprovalListRequest op = KEYRAFT__APPROVAL_LIST_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    uint64_t now = cli_now_ms();
    int rc;

    if ((rc = cli_only_opts(cli, a, "approvals list", allowed)) != 0)
        return rc;
    if (a->n_pos != 1)
        return cli_usage(cli, "approvals list takes no argument");
    op.all = cli_has(a, "all");
    req.op_case = KEYRAFT__REQUEST__OP_APPROVAL_LIST;
    req.approval_list = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_APPROVALS, &resp);
    if (rc != 0)
        return rc;
    if (cli->json) {
        rc = cli_print_json(cli, cli_json_result(resp));
        kr_response_free(resp);
        return rc;
    }
    printf("%-20s %-16s %-20s %-9s %-9s %s\n", "ID", "OPERATION", "REQUESTER", "STATE",
           "APPROVALS", "EXPIRES IN");
    for (size_t i = 0; i < resp->approvals->n_approvals; i++) {
        const Keyraft__ApprovalInfo *ai = resp->approvals->approvals[i];
        char count[24], left[32];
        snprintf(count, sizeof(count), "%u/%u", approvals_count(ai), ai->required);
        expires_in(ai, now, left, sizeof(left));
        printf("%-20s %-16s %-20s %-9s %-9s %s\n", ai->id, ai->operation, ai->requester,
               cli_approval_state_name(ai->state), count, left);
    }
    kr_response_free(resp);
    return 0;
}

int cli_cmd_approvals(struct cli *cli, const struct args *a)
{
    static const char *const show_opts[] = {NULL};
    static const char *const vote_opts[] = {"reason", NULL};
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__ApprovalRequest op = KEYRAFT__APPROVAL_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *sub = a->pos[0], *reason = cli_arg(a, "reason");
    int rc;

    if (strcmp(sub, "list") == 0)
        return approvals_list(cli, a);
    if (strcmp(sub, "show") == 0) {
        rc = cli_only_opts(cli, a, "approvals show", show_opts);
        req.op_case = KEYRAFT__REQUEST__OP_APPROVAL_SHOW;
        req.approval_show = &op;
    } else if (strcmp(sub, "approve") == 0) {
        rc = cli_only_opts(cli, a, "approvals approve", vote_opts);
        req.op_case = KEYRAFT__REQUEST__OP_APPROVAL_APPROVE;
        req.approval_approve = &op;
    } else if (strcmp(sub, "deny") == 0) {
        rc = cli_only_opts(cli, a, "approvals deny", vote_opts);
        req.op_case = KEYRAFT__REQUEST__OP_APPROVAL_DENY;
        req.approval_deny = &op;
    } else {
        return usage_sub(cli, "approvals", sub);
    }
    if (rc != 0)
        return rc;
    if (a->n_pos != 2 || !valid_ident(a->pos[1]))
        return cli_usage(cli, "approvals %s needs an approval ID", sub);
    op.id = (char *)a->pos[1];
    if (reason != NULL)
        op.reason = (char *)reason;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT__NOT_SET, &resp);
    if (rc != 0)
        return rc;
    if (resp->result_case == KEYRAFT__RESPONSE__RESULT_APPROVAL)
        rc = cli_print_approval(cli, resp->approval);
    else if (cli->json)
        rc = cli_print_json(cli, cli_json_result(resp));
    else
        printf("%s %s\n", strcmp(sub, "deny") == 0 ? "denied" : "approved", op.id);
    kr_response_free(resp);
    return rc;
}

/* ---- audit --------------------------------------------------------------------------------------- */

static int audit_read(struct cli *cli, Keyraft__AuditReadRequest *op, Keyraft__Response **resp)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;

    req.op_case = KEYRAFT__REQUEST__OP_AUDIT_READ;
    req.audit_read = op;
    return cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_AUDIT, resp);
}

/* One entry on stdout: a JSON line (export, or --json), else the human line. */
static int print_entry(const struct cli *cli, const Keyraft__AuditEntry *e, int json_lines)
{
    if (json_lines) {
        json_t *j = cli_audit_entry_json(e);
        char *s = j != NULL ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (s == NULL)
            return cli_fail(cli, KR_ENOMEM, "cannot build the JSON output");
        puts(s);
        free(s);
        return 0;
    }
    char line[4096];
    cli_audit_entry_line(e, line, sizeof(line));
    puts(line);
    return 0;
}

static int parse_limit(const struct cli *cli, const char *opt, const char *s, uint32_t *out)
{
    uint64_t v;

    if (cli_parse_count(s, &v) != 0 || v == 0 || v > UINT32_MAX)
        return cli_usage(cli, "bad %s \"%s\": want a positive count", opt, s);
    *out = (uint32_t)v;
    return 0;
}

/* Pages through the log from |op->after_seq| (next_after), printing every
 * entry, at most |max| (0: no limit). *last gets the highest seq seen. */
static int audit_pages(struct cli *cli, Keyraft__AuditReadRequest *op, uint64_t max,
                       int json_lines, uint64_t *last)
{
    uint64_t printed = 0;

    for (;;) {
        Keyraft__Response *resp = NULL;
        uint64_t left = max != 0 ? max - printed : AUDIT_PAGE_MAX;
        op->limit = (uint32_t)(left < AUDIT_PAGE_MAX ? left : AUDIT_PAGE_MAX);
        int rc = audit_read(cli, op, &resp);
        if (rc != 0)
            return rc;
        const Keyraft__AuditReadResponse *r = resp->audit;
        for (size_t i = 0; i < r->n_entries && (max == 0 || printed < max); i++) {
            if ((rc = print_entry(cli, r->entries[i], json_lines)) != 0) {
                kr_response_free(resp);
                return rc;
            }
            printed++;
            if (last != NULL && r->entries[i]->seq > *last)
                *last = r->entries[i]->seq;
        }
        uint64_t next = r->next_after;
        kr_response_free(resp);
        fflush(stdout);
        /* The cursor must move on, or a confused node would loop us forever. */
        if (next == 0 || next <= op->after_seq || (max != 0 && printed >= max))
            return 0;
        op->after_seq = next;
    }
}

static int audit_tail(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {"n", "limit", "follow", "seconds", NULL};
    Keyraft__AuditReadRequest op = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    const char *n_s = cli_arg(a, "n") != NULL ? cli_arg(a, "n") : cli_arg(a, "limit");
    const char *secs = cli_arg(a, "seconds");
    int follow = cli_has(a, "follow"), rc;
    uint64_t last = 0, follow_ms = 0;

    if ((rc = cli_only_opts(cli, a, "audit tail", allowed)) != 0)
        return rc;
    op.limit = AUDIT_TAIL_DEFAULT;
    if (n_s != NULL && (rc = parse_limit(cli, "-n", n_s, &op.limit)) != 0)
        return rc;
    if (secs != NULL && !follow)
        return cli_usage(cli, "--seconds goes with --follow");
    if (secs != NULL && (cli_parse_duration_ms(secs, &follow_ms) != 0 || follow_ms == 0))
        return cli_usage(cli, "bad --seconds \"%s\"", secs);
    if (follow && secs == NULL && !isatty(STDOUT_FILENO))
        return cli_usage(cli, "--follow without a terminal on stdout needs --seconds S");
    op.tail = 1;
    rc = audit_read(cli, &op, &resp);
    if (rc != 0)
        return rc;
    for (size_t i = 0; i < resp->audit->n_entries; i++) {
        if ((rc = print_entry(cli, resp->audit->entries[i], cli->json)) != 0)
            break;
        if (resp->audit->entries[i]->seq > last)
            last = resp->audit->entries[i]->seq;
    }
    if (resp->audit->head_seq > last)
        last = resp->audit->head_seq;
    kr_response_free(resp);
    fflush(stdout);
    if (rc != 0 || !follow)
        return rc;
    /* Bounded by --seconds; without it (a terminal) until interrupted. */
    uint64_t start = cli_now_ms();
    for (;;) {
        uint64_t now = cli_now_ms();
        if (follow_ms != 0 && now - start >= follow_ms)
            return 0;
        uint64_t nap = AUDIT_FOLLOW_POLL_MS;
        if (follow_ms != 0 && follow_ms - (now - start) < nap)
            nap = follow_ms - (now - start);
        cli_sleep_ms(nap);
        Keyraft__AuditReadRequest more = KEYRAFT__AUDIT_READ_REQUEST__INIT;
        more.after_seq = last;
        if ((rc = audit_pages(cli, &more, 0, cli->json, &last)) != 0)
            return rc;
    }
}

static int audit_query(struct cli *cli, const struct args *a)
{
    static const char *const allowed[] = {"principal", "key",   "op",    "since",
                                          "until",     "denied", "limit", NULL};
    Keyraft__AuditReadRequest op = KEYRAFT__AUDIT_READ_REQUEST__INIT;
    const char *s;
    uint32_t limit = 0;
    uint64_t now = cli_now_ms();
    int rc;

    if ((rc = cli_only_opts(cli, a, "audit query", allowed)) != 0)
        return rc;
    if ((s = cli_arg(a, "principal")) != NULL)
        op.principal = (char *)s;
    if ((s = cli_arg(a, "key")) != NULL)
        op.key_id = (char *)s;
    if ((s = cli_arg(a, "op")) != NULL)
        op.operation = (char *)s;
    if ((s = cli_arg(a, "since")) != NULL && cli_parse_time_ms(s, now, &op.since_ms) != 0)
        return cli_usage(cli, "bad --since \"%s\": want unix ms, RFC 3339 "
                         "(2026-11-23T14:00:00Z) or relative (-15m)", s);
    if ((s = cli_arg(a, "until")) != NULL && cli_parse_time_ms(s, now, &op.until_ms) != 0)
        return cli_usage(cli, "bad --until \"%s\": want unix ms, RFC 3339 "
                         "(2026-11-23T14:00:00Z) or relative (-15m)", s);
    if (op.since_ms != 0 && op.until_ms != 0 && op.until_ms < op.since_ms)
        return cli_usage(cli, "--until is before --since");
    if ((s = cli_arg(a, "limit")) != NULL && (rc = parse_limit(cli, "--limit", s, &limit)) != 0)
        return rc;
    op.denied_only = cli_has(a, "denied");
    return audit_pages(cli, &op, limit, cli->json, NULL);
}

static int audit_verify(struct cli *cli)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__AuditVerifyRequest op = KEYRAFT__AUDIT_VERIFY_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    char *head = NULL;
    int rc;

    req.op_case = KEYRAFT__REQUEST__OP_AUDIT_VERIFY;
    req.audit_verify = &op;
    rc = cli_call(cli, &req, KEYRAFT__RESPONSE__RESULT_AUDIT_VERIFY, &resp);
    if (rc != 0)
        return rc;
    const Keyraft__AuditVerifyResponse *v = resp->audit_verify;
    head = cli_hex(v->head_hash.data, v->head_hash.len);
    if (head == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory");
        goto out;
    }
    if (cli->json) {
        json_t *j = json_pack("{s:b,s:I,s:I,s:I,s:s,s:I,s:s,s:I}", "ok", (int)v->ok, "records",
                              (json_int_t)v->records, "checkpoints", (json_int_t)v->checkpoints,
                              "first_bad_seq", (json_int_t)v->first_bad_seq, "problem",
                              v->problem, "head_seq", (json_int_t)v->head_seq, "head_hash",
                              head, "last_checkpoint_seq", (json_int_t)v->last_checkpoint_seq);
        rc = cli_print_json(cli, j);
    } else if (v->ok) {
        printf("OK: %llu records, %llu checkpoints (last at seq %llu), head seq %llu, "
               "head hash %s\n",
               (unsigned long long)v->records, (unsigned long long)v->checkpoints,
               (unsigned long long)v->last_checkpoint_seq, (unsigned long long)v->head_seq,
               head);
    } else {
        printf("FAILED at record %llu: %s\n", (unsigned long long)v->first_bad_seq, v->problem);
    }
    if (rc == 0 && !v->ok)
        rc = CLI_EXIT_FAILED;
out:
    free(head);
    kr_response_free(resp);
    return rc;
}

int cli_cmd_audit(struct cli *cli, const struct args *a)
{
    static const char *const none[] = {NULL};
    static const char *const export_opts[] = {"after", NULL};
    const char *sub = a->pos[0];
    int rc;

    if (strcmp(sub, "tail") == 0)
        return audit_tail(cli, a);
    if (strcmp(sub, "query") == 0)
        return audit_query(cli, a);
    if (strcmp(sub, "verify") == 0) {
        if ((rc = cli_only_opts(cli, a, "audit verify", none)) != 0)
            return rc;
        return audit_verify(cli);
    }
    if (strcmp(sub, "export") == 0) {
        Keyraft__AuditReadRequest op = KEYRAFT__AUDIT_READ_REQUEST__INIT;
        const char *after = cli_arg(a, "after");
        if ((rc = cli_only_opts(cli, a, "audit export", export_opts)) != 0)
            return rc;
        if (after != NULL && cli_parse_count(after, &op.after_seq) != 0)
            return cli_usage(cli, "bad --after \"%s\": want a record seq", after);
        return audit_pages(cli, &op, 0, 1, NULL);
    }
    return usage_sub(cli, "audit", sub);
}
