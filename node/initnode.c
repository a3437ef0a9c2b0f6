/* initnode.c: `keyraftd init`: everything a new node needs, made in its data
 * directory: HSM token and MWK, certificates, configs, the raft log and the
 * first domain key. */
#include "node.h"

#define KR_LOG_MODULE "init"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cluster.h"
#include "config.h"
#include "crypto.h"
#include "hsm.h"
#include "keyraft.h"
#include "log.h"
#include "pki.h"
#include "record.pb-c.h"

#define CERT_DAYS 825
#define CA_DAYS 3650

static int write_secret_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (fd < 0) {
        log_error("cannot create %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    size_t n = strlen(text);
    int rv = (write(fd, text, n) == (ssize_t)n && fsync(fd) == 0) ? 0 : KR_EIO;
    close(fd);
    return rv;
}

static int write_text_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        log_error("cannot create %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    int rv = fputs(text, f) >= 0 ? 0 : KR_EIO;
    if (fclose(f) != 0)
        rv = KR_EIO;
    return rv;
}

/* The first principals, one per duty (an admin holds no other role). */
static const struct bootstrap_principal {
    const char *name;
    const char *roles;  /* as the certificate's OU shows them */
    const char *role1, *role2; /* role2 NULL: one role */
    const char *group;  /* NULL: none */
    const char *domain; /* NULL: none */
} BOOTSTRAP[] = {
    {"admin", "admin", "admin", NULL, NULL, NULL},
    {"app", "officer,user", "officer", "user", "apps", "default"},
    {"auditor", "auditor", "auditor", NULL, NULL, NULL},
};

/* Issues DIR/tls/<name>.pem for each bootstrap principal, a client config for
 * each (client.conf is app's), and DIR/bootstrap-principals: the registry
 * entries the first start commits through raft. */
static int make_principals(const char *dir, const char *ca, const char *ca_key,
                           const char *listen)
{
    enum { N = sizeof(BOOTSTRAP) / sizeof(BOOTSTRAP[0]) };
    Keyraft__PrincipalInfo infos[N];
    Keyraft__PrincipalInfo *ptrs[N];
    Keyraft__PrincipalCert certs[N];
    Keyraft__PrincipalCert *cert_ptrs[N];
    char serials[N][80];
    char *roles[N][2];
    char *groups[N][1];
    char *domains[N][1];
    char cert[PATH_MAX + 64], key[PATH_MAX + 64], conf[PATH_MAX + 64], text[2 * PATH_MAX];
    int rv = 0;
    for (size_t i = 0; i < N && rv == 0; i++) {
        const struct bootstrap_principal *b = &BOOTSTRAP[i];
        snprintf(cert, sizeof(cert), "%s/tls/%s.pem", dir, b->name);
        snprintf(key, sizeof(key), "%s/tls/%s.key", dir, b->name);
        if ((rv = pki_issue_client(ca, ca_key, b->name, b->roles, CERT_DAYS, cert, key)) != 0)
            break;
        char *pem = NULL;
        FILE *f = fopen(cert, "r");
        if (f != NULL) {
            pem = calloc(1, 65536);
            if (pem != NULL && fread(pem, 1, 65535, f) == 0) {
                free(pem);
                pem = NULL;
            }
            fclose(f);
        }
        uint64_t not_after = 0;
        rv = pem ? pki_check_client_cert(ca, pem, b->name, serials[i], sizeof(serials[i]),
                                          &not_after)
                 : KR_EIO;
        free(pem);
        if (rv != 0)
            break;
        keyraft__principal_cert__init(&certs[i]);
        certs[i].serial = serials[i];
        certs[i].not_after = not_after;
        cert_ptrs[i] = &certs[i];
        keyraft__principal_info__init(&infos[i]);
        infos[i].name = (char *)b->name;
        roles[i][0] = (char *)b->role1;
        roles[i][1] = (char *)b->role2;
        infos[i].roles = roles[i];
        infos[i].n_roles = b->role2 != NULL ? 2 : 1;
        groups[i][0] = (char *)b->group;
        infos[i].groups = groups[i];
        infos[i].n_groups = b->group != NULL;
        domains[i][0] = (char *)b->domain;
        infos[i].domains = domains[i];
        infos[i].n_domains = b->domain != NULL;
        infos[i].certs = &cert_ptrs[i];
        infos[i].n_certs = 1;
        infos[i].created_by = (char *)"keyraftd init";
        ptrs[i] = &infos[i];
        snprintf(conf, sizeof(conf), "%s/%s.conf", dir,
                 strcmp(b->name, "app") == 0 ? "client" : b->name);
        snprintf(text, sizeof(text),
                 "# keyraft CLI / libkeyraft client configuration (principal %s: %s)\n"
                 "[client]\nendpoints = %s\nca = tls/ca.pem\ncert = tls/%s.pem\n"
                 "key = tls/%s.key\ntimeout_ms = 30000\n",
                 b->name, b->roles, listen, b->name, b->name);
        rv = write_text_file(conf, text);
    }
    if (rv != 0)
        return rv;
    Keyraft__PrincipalListResponse list = KEYRAFT__PRINCIPAL_LIST_RESPONSE__INIT;
    list.principals = ptrs;
    list.n_principals = N;
    size_t len = keyraft__principal_list_response__get_packed_size(&list);
    uint8_t buf[8192];
    if (len > sizeof(buf))
        return KR_EINTERNAL;
    keyraft__principal_list_response__pack(&list, buf);
    snprintf(conf, sizeof(conf), "%s/bootstrap-principals", dir);
    FILE *f = fopen(conf, "wb");
    if (f == NULL) {
        log_error("cannot create %s: %s", conf, strerror(errno));
        return KR_EIO;
    }
    rv = fwrite(buf, 1, len, f) == len ? 0 : KR_EIO;
    if (fclose(f) != 0)
        rv = KR_EIO;
    return rv;
}

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (d == NULL)
        return 0;
    int empty = 1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            empty = 0;
    closedir(d);
    return empty;
}

static int random_pin(char *out, size_t hex_len)
{
    uint8_t raw[32];
    if (hex_len / 2 > sizeof(raw) || crypto_random(raw, hex_len / 2) != 0)
        return KR_ECRYPTO;
    for (size_t i = 0; i < hex_len / 2; i++)
        snprintf(out + 2 * i, 3, "%02x", raw[i]);
    OPENSSL_cleanse(raw, sizeof(raw));
    return 0;
}

/* Formats into a fixed buffer; a path too long for it fails the init. */
#define PATHF(buf, ...)                                                   \
    do {                                                                  \
        int n_ = snprintf(buf, sizeof(buf), __VA_ARGS__);                 \
        if (n_ < 0 || (size_t)n_ >= sizeof(buf)) {                        \
            log_error("path too long under %s", dir);                     \
            rv = KR_EINVAL;                                               \
            goto out;                                                     \
        }                                                                 \
    } while (0)

/* `init --join`: this token makes the transport key the MWK will come
 * under, the node makes its TLS key and a request, and the admin gets one
 * file to admit it with. Nothing secret leaves the node. */
static int prepare_join(const struct node_init_options *o, struct config *c, const char *dir,
                        struct hsm *hsm)
{
    char p[PATH_MAX + 64];
    uint8_t *spki = NULL, *audit_spki = NULL;
    size_t spki_len = 0, audit_spki_len = 0;
    char *csr = NULL;
    uint8_t *packed = NULL;
    int rv = 0;
    char host[256];
    int port = 0;
    if (config_split_hostport(o->join, host, sizeof(host), &port) != 0) {
        log_error("--join takes the HOST:PORT of a member's client endpoint");
        return KR_EINVAL;
    }
    PATHF(c->join, "%s", o->join);
    rv = hsm_make_transport_key(hsm, NODE_TRANSPORT_KEY_LABEL, &spki, &spki_len);
    if (rv != 0) {
        log_error("the token cannot make its transport key: %s", kr_strerror(rv));
        goto out;
    }
    /* The admitting cluster trusts this node's audit checkpoints by this key. */
    rv = hsm_audit_key_ensure(hsm);
    if (rv == 0)
        rv = hsm_audit_public_key(hsm, &audit_spki, &audit_spki_len);
    if (rv != 0) {
        log_error("the token cannot make its audit signing key: %s", kr_strerror(rv));
        goto out;
    }
    PATHF(p, "%s/tls", dir);
    if (mkdir(p, 0700) != 0 && errno != EEXIST) {
        rv = KR_EIO;
        goto out;
    }
    char node_name[64];
    snprintf(node_name, sizeof(node_name), "node-%llu", (unsigned long long)c->node_id);
    PATHF(c->tls_key, "%s/tls/node.key", dir);
    PATHF(c->tls_cert, "%s/tls/node.pem", dir);
    PATHF(c->tls_ca, "%s/tls/ca.pem", dir);
    if ((rv = pki_make_node_csr(node_name, c->tls_key, &csr)) != 0)
        goto out;
    Keyraft__JoinRequest jr = KEYRAFT__JOIN_REQUEST__INIT;
    jr.node_id = c->node_id;
    jr.raft_address = c->raft_address;
    jr.client_address = c->listen;
    jr.transport_spki.data = spki;
    jr.transport_spki.len = spki_len;
    jr.csr_pem = csr;
    jr.join = c->join;
    jr.audit_public_key.data = audit_spki;
    jr.audit_public_key.len = audit_spki_len;
    size_t len = keyraft__join_request__get_packed_size(&jr);
    packed = malloc(len);
    if (packed == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    keyraft__join_request__pack(&jr, packed);
    PATHF(p, "%s/%s", dir, NODE_JOIN_REQUEST);
    FILE *f = fopen(p, "wx");
    if (f == NULL || fwrite(packed, 1, len, f) != len) {
        if (f)
            fclose(f);
        log_error("cannot write %s", p);
        rv = KR_EIO;
        goto out;
    }
    if (fclose(f) != 0) {
        rv = KR_EIO;
        goto out;
    }
    PATHF(p, "%s/keyraftd.conf", dir);
    if ((rv = config_write(c, p)) != 0)
        goto out;
    log_info("node %llu prepared to join %s: request in %s/%s",
             (unsigned long long)c->node_id, c->join, dir, NODE_JOIN_REQUEST);
out:
    free(spki);
    free(audit_spki);
    free(csr);
    free(packed);
    return rv;
}

int node_init(const struct node_init_options *o)
{
    char dir[PATH_MAX], p[PATH_MAX + 64], p2[PATH_MAX + 64], p3[PATH_MAX + 64];
    char pin[65] = "", so_pin[65] = "";
    int rv = 0;
    if (mkdir(o->data_dir, 0700) != 0 && errno != EEXIST) {
        log_error("cannot create %s: %s", o->data_dir, strerror(errno));
        return KR_EIO;
    }
    if (realpath(o->data_dir, dir) == NULL) {
        log_error("%s: %s", o->data_dir, strerror(errno));
        return KR_EIO;
    }
    PATHF(p, "%s/keyraftd.conf", dir);
    if (access(p, F_OK) == 0) {
        log_error("%s already holds a node (%s exists)", dir, p);
        return KR_EEXIST;
    }
    if (!dir_is_empty(dir)) {
        log_error("%s is not empty: init needs an empty or new directory (a failed init "
                  "leaves one behind: remove it and retry)", dir);
        return KR_EEXIST;
    }
    struct config c;
    config_defaults(&c);
    c.node_id = o->node_id ? o->node_id : 1;
    PATHF(c.data_dir, "%s", dir);
    if (o->listen)
        PATHF(c.listen, "%s", o->listen);
    if (o->raft_address)
        PATHF(c.raft_address, "%s", o->raft_address);
    if (o->hsm_module)
        PATHF(c.hsm_module, "%s", o->hsm_module);
    PATHF(c.hsm_token_label, "keyraft-node-%llu",
             (unsigned long long)c.node_id);
    char host[256];
    int port;
    if (config_split_hostport(c.listen, host, sizeof(host), &port) != 0 ||
        config_split_hostport(c.raft_address, host, sizeof(host), &port) != 0) {
        log_error("--listen and --raft-address take HOST:PORT");
        return KR_EINVAL;
    }

    /* HSM: a SoftHSM token store inside the data dir, unless another module. */
    int softhsm = strstr(c.hsm_module, "softhsm") != NULL;
    if (softhsm) {
        PATHF(p, "%s/tokens", dir);
        if (mkdir(p, 0700) != 0 && errno != EEXIST)
            return KR_EIO;
        PATHF(p2, "%s/softhsm2.conf", dir);
        char text[PATH_MAX + 128];
        PATHF(text,
                 "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", p);
        if ((rv = write_text_file(p2, text)) != 0)
            return rv;
        PATHF(c.hsm_softhsm_conf, "%s", p2);
        setenv("SOFTHSM2_CONF", p2, 1);
    }
    const char *env_pin = getenv("KEYRAFT_HSM_PIN");
    if (env_pin != NULL && env_pin[0] != '\0') {
        /* The operator keeps the PIN: nothing of it is written here. */
        snprintf(pin, sizeof(pin), "%s", env_pin);
        PATHF(c.hsm_pin_env, "KEYRAFT_HSM_PIN");
    } else {
        if ((rv = random_pin(pin, 32)) != 0)
            goto out;
        PATHF(p, "%s/hsm.pin", dir);
        if ((rv = write_secret_file(p, pin)) != 0)
            goto out;
        PATHF(c.hsm_pin_file, "%s", p);
        c.hsm_pin_env[0] = '\0';
    }
    const char *env_so = getenv("KEYRAFT_HSM_SO_PIN");
    if (env_so != NULL && env_so[0] != '\0') {
        snprintf(so_pin, sizeof(so_pin), "%s", env_so);
        PATHF(c.hsm_so_pin_env, "KEYRAFT_HSM_SO_PIN");
    } else {
        if ((rv = random_pin(so_pin, 32)) != 0)
            goto out;
        PATHF(p, "%s/hsm-so.pin", dir);
        if ((rv = write_secret_file(p, so_pin)) != 0)
            goto out;
        PATHF(c.hsm_so_pin_file, "%s", p);
    }
    rv = hsm_init_token(c.hsm_module, c.hsm_token_label, so_pin, pin);
    if (rv != 0) {
        log_error("cannot initialise HSM token '%s': %s", c.hsm_token_label, kr_strerror(rv));
        goto out;
    }
    struct hsm_config hc = {c.hsm_module, c.hsm_token_label, pin, c.hsm_mwk_label};
    struct hsm *hsm = NULL;
    if ((rv = hsm_open(&hc, &hsm)) != 0)
        goto out;
    if (o->join != NULL) {
        rv = prepare_join(o, &c, dir, hsm);
        hsm_close(hsm);
        goto out;
    }
    rv = hsm_generate_mwk(hsm);
    hsm_close(hsm);
    if (rv != 0) {
        log_error("cannot generate the master wrap key: %s", kr_strerror(rv));
        goto out;
    }
    log_info("HSM token '%s' ready, master wrap key '%s' generated inside it",
             c.hsm_token_label, c.hsm_mwk_label);

    /* Certificates. */
    PATHF(p, "%s/tls", dir);
    if (mkdir(p, 0700) != 0 && errno != EEXIST) {
        rv = KR_EIO;
        goto out;
    }
    PATHF(p, "%s/tls/ca.pem", dir);
    PATHF(p2, "%s/tls/ca.key", dir);
    if ((rv = pki_make_ca("keyraft cluster CA", CA_DAYS, p, p2)) != 0)
        goto out;
    char node_name[64];
    snprintf(node_name, sizeof(node_name), "node-%llu", (unsigned long long)c.node_id);
    config_split_hostport(c.listen, host, sizeof(host), &port);
    PATHF(p3, "%s/tls/node.pem", dir);
    char keypath[PATH_MAX + 64];
    PATHF(keypath, "%s/tls/node.key", dir);
    if ((rv = pki_issue_node(p, p2, node_name, host, CERT_DAYS, p3, keypath)) != 0)
        goto out;
    PATHF(c.tls_ca, "%s", p);
    PATHF(c.tls_cert, "%s", p3);
    PATHF(c.tls_key, "%s", keypath);
    if ((rv = make_principals(dir, p, p2, c.listen)) != 0)
        goto out;

    /* Configs. The node config gets its final name only once the first start
     * succeeded, so a half-made directory is never taken for a node. */
    PATHF(p, "%s/keyraftd.conf.init", dir);
    if ((rv = config_write(&c, p)) != 0)
        goto out;
    /* Raft: this node as the sole voter, then the first domain key through it. */
    char raft_dir[PATH_MAX + 16];
    PATHF(raft_dir, "%s/raft", dir);
    struct cluster_config cc = {.node_id = c.node_id, .raft_address = c.raft_address,
                                .raft_dir = raft_dir};
    if ((rv = cluster_bootstrap(&cc)) != 0) {
        log_error("raft bootstrap failed: %s", kr_strerror(rv));
        goto out;
    }
    OPENSSL_cleanse(pin, sizeof(pin));
    OPENSSL_cleanse(so_pin, sizeof(so_pin));
    PATHF(p, "%s/keyraftd.conf.init", dir);
    rv = node_run(p, 1);
    if (rv != 0) {
        log_error("first start failed: %s", kr_strerror(rv));
        goto out;
    }
    PATHF(p2, "%s/keyraftd.conf", dir);
    if (rename(p, p2) != 0) {
        log_error("cannot rename %s: %s", p, strerror(errno));
        rv = KR_EIO;
    }
out:
    OPENSSL_cleanse(pin, sizeof(pin));
    OPENSSL_cleanse(so_pin, sizeof(so_pin));
    if (rv != 0)
        log_error("init of %s failed; remove the directory before trying again", dir);
    return rv;
}
