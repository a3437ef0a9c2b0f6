/* pki.c: the cluster CA and the node and client certificates it issues. */
#include "pki.h"

#define KR_LOG_MODULE "pki"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "keyraft.h"
#include "log.h"

#define PKI_FILE_MAX (64 * 1024)  /* a PEM key or certificate is a few KB */
#define PKI_NAME_MAX 64           /* ub-common-name, ub-organizational-unit-name */
#define PKI_DAYS_MAX (100 * 366)  /* keeps time arithmetic far from overflow */
#define PKI_BACKDATE_SECONDS (-5 * 60) /* tolerates clock skew between nodes */

/* Logs |what| (and |path| when not NULL) with OpenSSL's first reason and
 * empties the error queue. */
static int crypto_fail_path(const char *what, const char *path)
{
    char reason[256] = "no reason given";
    unsigned long e = ERR_get_error();
    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    ERR_clear_error();
    log_error("%s%s%s: %s", what, path != NULL ? " " : "", path != NULL ? path : "", reason);
    return KR_ECRYPTO;
}

static int crypto_fail(const char *what) { return crypto_fail_path(what, NULL); }

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Writes the contents of memory BIO |mem| to |path| with |mode|, which is set
 * before any byte is written, so a key never sits in a readable file. */
static int write_pem(const char *path, mode_t mode, BIO *mem)
{
    char *data = NULL;
    long len = BIO_get_mem_data(mem, &data);
    if (len <= 0 || data == NULL)
        return crypto_fail("empty PEM output");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0) {
        log_error("cannot create %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    int rv = 0;
    if (fchmod(fd, mode) != 0 || write_all(fd, data, (size_t)len) != 0 || fsync(fd) != 0) {
        log_error("cannot write %s: %s", path, strerror(errno));
        rv = KR_EIO;
    }
    if (close(fd) != 0 && rv == 0) {
        log_error("cannot close %s: %s", path, strerror(errno));
        rv = KR_EIO;
    }
    return rv;
}

/* Reads |path| (at most PKI_FILE_MAX bytes) into a read-only memory BIO whose
 * buffer is in OpenSSL's secure heap; free both with free_file_bio. */
static int read_file_bio(const char *path, char **out_buf, size_t *out_len, BIO **out_bio)
{
    char *buf = NULL;
    size_t len = 0;
    BIO *bio = NULL;
    int rv = KR_EIO;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_error("cannot open %s: %s", path, strerror(errno));
        goto out;
    }
    buf = OPENSSL_secure_malloc(PKI_FILE_MAX);
    if (buf == NULL) {
        rv = KR_ENOMEM;
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, PKI_FILE_MAX - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            log_error("cannot read %s: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len == PKI_FILE_MAX) {
            log_error("cannot read %s: larger than %d bytes", path, PKI_FILE_MAX);
            rv = KR_EINVAL;
            goto out;
        }
    }
    bio = BIO_new_mem_buf(buf, (int)len);
    if (bio == NULL) {
        rv = crypto_fail("memory BIO");
        goto out;
    }
    *out_buf = buf;
    *out_len = len;
    *out_bio = bio;
    buf = NULL;
    rv = 0;
out:
    if (buf != NULL)
        OPENSSL_secure_clear_free(buf, PKI_FILE_MAX);
    if (fd >= 0)
        close(fd);
    return rv;
}

static void free_file_bio(char *buf, BIO *bio)
{
    BIO_free(bio);
    if (buf != NULL)
        OPENSSL_secure_clear_free(buf, PKI_FILE_MAX);
}

/* Never prompts: an encrypted key file is an error, not a terminal read. */
static int no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

static int load_ca(const char *cert_path, const char *key_path, X509 **out_cert,
                   EVP_PKEY **out_key)
{
    char *buf = NULL;
    size_t len = 0;
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    int rv = read_file_bio(cert_path, &buf, &len, &bio);
    if (rv != 0)
        goto out;
    cert = PEM_read_bio_X509(bio, NULL, no_password, NULL);
    if (cert == NULL) {
        rv = crypto_fail_path("reading PEM CA certificate", cert_path);
        goto out;
    }
    free_file_bio(buf, bio);
    buf = NULL;
    bio = NULL;
    rv = read_file_bio(key_path, &buf, &len, &bio);
    if (rv != 0)
        goto out;
    key = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL);
    if (key == NULL) {
        rv = crypto_fail_path("reading unencrypted PEM CA key", key_path);
        goto out;
    }
    if (X509_check_ca(cert) == 0) {
        log_error("%s is not a CA certificate", cert_path);
        rv = KR_EINVAL;
        goto out;
    }
    if (X509_check_private_key(cert, key) != 1) {
        ERR_clear_error();
        log_error("CA key %s does not match CA certificate %s", key_path, cert_path);
        rv = KR_EINVAL;
        goto out;
    }
    *out_cert = cert;
    *out_key = key;
    cert = NULL;
    key = NULL;
    rv = 0;
out:
    free_file_bio(buf, bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return rv;
}

/* Writes |key| (PKCS#8 PEM, mode 0600) then |cert|; a half-written pair
 * does not stay behind. */
static int write_pair(X509 *cert, EVP_PKEY *key, const char *cert_path, const char *key_path)
{
    BIO *kbio = NULL;
    BIO *cbio = NULL;
    int rv = KR_ECRYPTO;
    kbio = BIO_new(BIO_s_secmem());
    cbio = BIO_new(BIO_s_mem());
    if (kbio == NULL || cbio == NULL) {
        rv = crypto_fail("memory BIO");
        goto out;
    }
    if (PEM_write_bio_PKCS8PrivateKey(kbio, key, NULL, NULL, 0, NULL, NULL) != 1) {
        rv = crypto_fail("encoding private key");
        goto out;
    }
    if (PEM_write_bio_X509(cbio, cert) != 1) {
        rv = crypto_fail("encoding certificate");
        goto out;
    }
    rv = write_pem(key_path, 0600, kbio);
    if (rv != 0)
        goto out;
    rv = write_pem(cert_path, 0644, cbio);
    if (rv != 0)
        unlink(key_path);
out:
    if (kbio != NULL) {
        char *data = NULL;
        long len = BIO_get_mem_data(kbio, &data);
        if (len > 0 && data != NULL)
            OPENSSL_cleanse(data, (size_t)len);
    }
    BIO_free(kbio);
    BIO_free(cbio);
    return rv;
}

/* A name component: non-empty, at most PKI_NAME_MAX bytes, no control
 * characters (they would turn up in logs and in the principal). */
static int valid_name(const char *what, const char *s, size_t len)
{
    if (len == 0 || len > PKI_NAME_MAX) {
        log_error("%s must be 1 to %d bytes", what, PKI_NAME_MAX);
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) {
            log_error("%s contains a control character", what);
            return 0;
        }
    }
    return 1;
}

/* Calls |fn| on each comma-separated entry of |list| with the surrounding
 * spaces trimmed; empty entries are skipped. */
static int for_each_item(const char *list, int (*fn)(void *arg, const char *s, size_t len),
                         void *arg)
{
    if (list == NULL)
        return 0;
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        if (end == NULL)
            end = p + strlen(p);
        const char *b = p;
        const char *e = end;
        while (b < e && (*b == ' ' || *b == '\t'))
            b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if (e > b) {
            int rv = fn(arg, b, (size_t)(e - b));
            if (rv != 0)
                return rv;
        }
        if (*end == '\0')
            return 0;
        p = end + 1;
    }
}

static int add_name_entry(X509_NAME *name, int nid, const char *s, size_t len)
{
    if (X509_NAME_add_entry_by_NID(name, nid, MBSTRING_UTF8, (const unsigned char *)s,
                                   (int)len, -1, 0) != 1)
        return crypto_fail("adding a subject name entry");
    return 0;
}

static int add_role(void *arg, const char *s, size_t len)
{
    if (!valid_name("role", s, len))
        return KR_EINVAL;
    return add_name_entry(arg, NID_organizationalUnitName, s, len);
}

static int add_ext(X509 *cert, X509V3_CTX *v3, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, v3, nid, value);
    if (ext == NULL)
        return crypto_fail("making a certificate extension");
    int ok = X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return ok == 1 ? 0 : crypto_fail("adding a certificate extension");
}

/* A certificate for |key| with subject |subject|, issued by |issuer| (NULL:
 * self-issued), a random 128-bit serial and |days| of validity from 5
 * minutes ago. Extensions are added by the caller, then signed. */
static int new_cert(EVP_PKEY *key, X509_NAME *subject, X509 *issuer, int days, X509 **out)
{
    X509 *cert = NULL;
    BIGNUM *bn = NULL;
    int rv = KR_ECRYPTO;
    cert = X509_new();
    bn = BN_new();
    if (cert == NULL || bn == NULL) {
        rv = crypto_fail("allocating a certificate");
        goto out;
    }
    if (BN_rand(bn, 128, BN_RAND_TOP_ONE, BN_RAND_BOTTOM_ANY) != 1 ||
        BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) == NULL) {
        rv = crypto_fail("making a serial number");
        goto out;
    }
    if (X509_set_version(cert, X509_VERSION_3) != 1 ||
        X509_gmtime_adj(X509_getm_notBefore(cert), PKI_BACKDATE_SECONDS) == NULL ||
        X509_time_adj_ex(X509_getm_notAfter(cert), days, 0, NULL) == NULL ||
        X509_set_subject_name(cert, subject) != 1 ||
        X509_set_issuer_name(cert, issuer != NULL ? X509_get_subject_name(issuer) : subject) != 1 ||
        X509_set_pubkey(cert, key) != 1) {
        rv = crypto_fail("filling in a certificate");
        goto out;
    }
    *out = cert;
    cert = NULL;
    rv = 0;
out:
    BN_free(bn);
    X509_free(cert);
    return rv;
}

static int check_days(int days)
{
    if (days <= 0 || days > PKI_DAYS_MAX) {
        log_error("validity of %d days is out of range 1..%d", days, PKI_DAYS_MAX);
        return KR_EINVAL;
    }
    return 0;
}

static int check_paths(const char *cert_path, const char *key_path)
{
    if (cert_path == NULL || key_path == NULL || cert_path[0] == '\0' || key_path[0] == '\0') {
        log_error("certificate and key paths are required");
        return KR_EINVAL;
    }
    return 0;
}

int pki_make_ca(const char *common_name, int days, const char *cert_path, const char *key_path)
{
    EVP_PKEY *key = NULL;
    X509_NAME *name = NULL;
    X509 *cert = NULL;
    int rv = check_paths(cert_path, key_path);
    if (rv != 0)
        goto out;
    rv = check_days(days);
    if (rv != 0)
        goto out;
    if (common_name == NULL || !valid_name("CA common name", common_name, strlen(common_name))) {
        rv = KR_EINVAL;
        goto out;
    }
    key = EVP_EC_gen("P-256");
    name = X509_NAME_new();
    if (key == NULL || name == NULL) {
        rv = crypto_fail("generating the CA key");
        goto out;
    }
    rv = add_name_entry(name, NID_commonName, common_name, strlen(common_name));
    if (rv != 0)
        goto out;
    rv = new_cert(key, name, NULL, days, &cert);
    if (rv != 0)
        goto out;
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, cert, cert, NULL, NULL, 0);
    if ((rv = add_ext(cert, &v3, NID_basic_constraints, "critical,CA:TRUE")) != 0 ||
        (rv = add_ext(cert, &v3, NID_key_usage, "critical,keyCertSign,cRLSign")) != 0 ||
        (rv = add_ext(cert, &v3, NID_subject_key_identifier, "hash")) != 0)
        goto out;
    if (X509_sign(cert, key, EVP_sha256()) <= 0) {
        rv = crypto_fail("signing the CA certificate");
        goto out;
    }
    rv = write_pair(cert, key, cert_path, key_path);
    if (rv == 0)
        log_info("made CA \"%s\" in %s", common_name, cert_path);
out:
    X509_free(cert);
    X509_NAME_free(name);
    EVP_PKEY_free(key);
    return rv;
}

/* Signs a leaf certificate for a fresh key: the caller has built |name| and
 * |san| (NULL: none); |eku| is the extendedKeyUsage value. */
/* Signs a leaf certificate for the public key |key| with the CA. */
static int sign_leaf(X509 *ca, EVP_PKEY *ca_key, EVP_PKEY *key, X509_NAME *name,
                     GENERAL_NAMES *san, const char *eku, int days, X509 **out)
{
    X509 *cert = NULL;
    int rv = new_cert(key, name, ca, days, &cert);
    if (rv != 0)
        return rv;
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, ca, cert, NULL, NULL, 0);
    if ((rv = add_ext(cert, &v3, NID_basic_constraints, "critical,CA:FALSE")) != 0 ||
        (rv = add_ext(cert, &v3, NID_key_usage, "critical,digitalSignature")) != 0 ||
        (rv = add_ext(cert, &v3, NID_ext_key_usage, eku)) != 0 ||
        (rv = add_ext(cert, &v3, NID_subject_key_identifier, "hash")) != 0 ||
        (rv = add_ext(cert, &v3, NID_authority_key_identifier, "keyid:always")) != 0)
        goto out;
    if (san != NULL && X509_add1_ext_i2d(cert, NID_subject_alt_name, san, 0, X509V3_ADD_DEFAULT) != 1) {
        rv = crypto_fail("adding subjectAltName");
        goto out;
    }
    if (X509_sign(cert, ca_key, EVP_sha256()) <= 0) {
        rv = crypto_fail("signing a certificate");
        goto out;
    }
    *out = cert;
    cert = NULL;
out:
    X509_free(cert);
    return rv;
}

static int issue_leaf(const char *ca_cert_path, const char *ca_key_path, X509_NAME *name,
                      GENERAL_NAMES *san, const char *eku, int days, const char *cert_path,
                      const char *key_path)
{
    X509 *ca = NULL;
    EVP_PKEY *ca_key = NULL;
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    int rv = load_ca(ca_cert_path, ca_key_path, &ca, &ca_key);
    if (rv != 0)
        goto out;
    key = EVP_EC_gen("P-256");
    if (key == NULL) {
        rv = crypto_fail("generating a key");
        goto out;
    }
    rv = sign_leaf(ca, ca_key, key, name, san, eku, days, &cert);
    if (rv == 0)
        rv = write_pair(cert, key, cert_path, key_path);
out:
    X509_free(cert);
    EVP_PKEY_free(key);
    EVP_PKEY_free(ca_key);
    X509_free(ca);
    return rv;
}

/* Appends an iPAddress (when |s| parses as IPv4 or IPv6) or a dNSName. */
static int add_san(void *arg, const char *s, size_t len)
{
    GENERAL_NAMES *gens = arg;
    GENERAL_NAME *gen = NULL;
    ASN1_OCTET_STRING *ip = NULL;
    ASN1_IA5STRING *dns = NULL;
    char text[256];
    int rv = KR_EINVAL;
    if (len >= sizeof(text)) {
        log_error("subjectAltName entry longer than %zu bytes", sizeof(text) - 1);
        goto out;
    }
    memcpy(text, s, len);
    text[len] = '\0';
    gen = GENERAL_NAME_new();
    if (gen == NULL) {
        rv = crypto_fail("allocating subjectAltName");
        goto out;
    }
    ip = a2i_IPADDRESS(text);
    if (ip != NULL) {
        GENERAL_NAME_set0_value(gen, GEN_IPADD, ip);
        ip = NULL;
    } else {
        ERR_clear_error();
        for (size_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)text[i];
            if (c <= 0x20 || c >= 0x7f || c == '/' || c == '\\') {
                log_error("subjectAltName \"%s\" is neither an IP address nor a DNS name",
                          text);
                goto out;
            }
        }
        dns = ASN1_IA5STRING_new();
        if (dns == NULL || ASN1_STRING_set(dns, text, (int)len) != 1) {
            rv = crypto_fail("allocating subjectAltName");
            goto out;
        }
        GENERAL_NAME_set0_value(gen, GEN_DNS, dns);
        dns = NULL;
    }
    if (sk_GENERAL_NAME_push(gens, gen) <= 0) {
        rv = crypto_fail("allocating subjectAltName");
        goto out;
    }
    gen = NULL;
    rv = 0;
out:
    ASN1_IA5STRING_free(dns);
    ASN1_OCTET_STRING_free(ip);
    GENERAL_NAME_free(gen);
    return rv;
}

/* Subject CN |node_name|; SAN 127.0.0.1, localhost and |extra_san|. */
static int node_names(X509_NAME *name, GENERAL_NAMES *san, const char *node_name,
                      const char *extra_san)
{
    int rv;
    if ((rv = add_name_entry(name, NID_commonName, node_name, strlen(node_name))) != 0 ||
        (rv = add_san(san, "127.0.0.1", 9)) != 0 || (rv = add_san(san, "localhost", 9)) != 0 ||
        (rv = for_each_item(extra_san, add_san, san)) != 0)
        return rv;
    return 0;
}

int pki_issue_node(const char *ca_cert_path, const char *ca_key_path, const char *node_name,
                   const char *extra_san, int days, const char *cert_path,
                   const char *key_path)
{
    X509_NAME *name = NULL;
    GENERAL_NAMES *san = NULL;
    int rv = check_paths(cert_path, key_path);
    if (rv != 0)
        goto out;
    rv = check_days(days);
    if (rv != 0)
        goto out;
    if (ca_cert_path == NULL || ca_key_path == NULL || node_name == NULL ||
        !valid_name("node name", node_name, strlen(node_name))) {
        rv = KR_EINVAL;
        goto out;
    }
    name = X509_NAME_new();
    san = GENERAL_NAMES_new();
    if (name == NULL || san == NULL) {
        rv = crypto_fail("allocating a node certificate");
        goto out;
    }
    if ((rv = node_names(name, san, node_name, extra_san)) != 0)
        goto out;
    rv = issue_leaf(ca_cert_path, ca_key_path, name, san, "serverAuth,clientAuth", days,
                    cert_path, key_path);
    if (rv == 0)
        log_info("issued node certificate \"%s\" in %s", node_name, cert_path);
out:
    GENERAL_NAMES_free(san);
    X509_NAME_free(name);
    return rv;
}

int pki_issue_client(const char *ca_cert_path, const char *ca_key_path, const char *principal,
                     const char *roles, int days, const char *cert_path, const char *key_path)
{
    X509_NAME *name = NULL;
    int rv = check_paths(cert_path, key_path);
    if (rv != 0)
        goto out;
    rv = check_days(days);
    if (rv != 0)
        goto out;
    if (ca_cert_path == NULL || ca_key_path == NULL || principal == NULL ||
        !valid_name("principal", principal, strlen(principal))) {
        rv = KR_EINVAL;
        goto out;
    }
    name = X509_NAME_new();
    if (name == NULL) {
        rv = crypto_fail("allocating a client certificate");
        goto out;
    }
    if ((rv = add_name_entry(name, NID_commonName, principal, strlen(principal))) != 0 ||
        (rv = for_each_item(roles, add_role, name)) != 0)
        goto out;
    rv = issue_leaf(ca_cert_path, ca_key_path, name, NULL, "clientAuth", days, cert_path,
                    key_path);
    if (rv == 0)
        log_info("issued client certificate \"%s\" in %s", principal, cert_path);
out:
    X509_NAME_free(name);
    return rv;
}

/* --- joining nodes: key and CSR on the new node, signature by the admin ---------- */

static int pem_of(BIO *mem, char **out)
{
    char *data = NULL;
    long len = BIO_get_mem_data(mem, &data);
    if (len <= 0)
        return crypto_fail("encoding PEM");
    *out = malloc((size_t)len + 1);
    if (*out == NULL)
        return KR_ENOMEM;
    memcpy(*out, data, (size_t)len);
    (*out)[len] = '\0';
    return 0;
}

int pki_make_node_csr(const char *node_name, const char *key_path, char **out_csr_pem)
{
    EVP_PKEY *key = NULL;
    X509_REQ *req = NULL;
    X509_NAME *name = NULL;
    BIO *kmem = NULL, *rmem = NULL;
    int rv = KR_EINVAL;
    if (node_name == NULL || key_path == NULL || out_csr_pem == NULL ||
        !valid_name("node name", node_name, strlen(node_name)))
        goto out;
    key = EVP_EC_gen("P-256");
    req = X509_REQ_new();
    name = X509_NAME_new();
    kmem = BIO_new(BIO_s_mem());
    rmem = BIO_new(BIO_s_mem());
    if (key == NULL || req == NULL || name == NULL || kmem == NULL || rmem == NULL) {
        rv = crypto_fail("making a node key and request");
        goto out;
    }
    if ((rv = add_name_entry(name, NID_commonName, node_name, strlen(node_name))) != 0)
        goto out;
    if (X509_REQ_set_version(req, 0) != 1 || X509_REQ_set_subject_name(req, name) != 1 ||
        X509_REQ_set_pubkey(req, key) != 1 || X509_REQ_sign(req, key, EVP_sha256()) <= 0 ||
        PEM_write_bio_X509_REQ(rmem, req) != 1 ||
        PEM_write_bio_PrivateKey(kmem, key, NULL, NULL, 0, NULL, NULL) != 1) {
        rv = crypto_fail("signing the node's certificate request");
        goto out;
    }
    if ((rv = write_pem(key_path, 0600, kmem)) != 0)
        goto out;
    rv = pem_of(rmem, out_csr_pem);
out:
    BIO_free(kmem);
    BIO_free(rmem);
    X509_NAME_free(name);
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    return rv;
}

/* 0 when the subject CN of |name| is |node_name|; KR_EINVAL (logged, |what|
 * names the object) otherwise. */
static int names_node(X509_NAME *name, const char *node_name, const char *what)
{
    char cn[PKI_NAME_MAX + 1] = "";
    int len = X509_NAME_get_text_by_NID(name, NID_commonName, cn, (int)sizeof(cn));
    if (len > 0 && (size_t)len < sizeof(cn) && strcmp(cn, node_name) == 0)
        return 0;
    ERR_clear_error();
    log_error("the %s names \"%s\", not \"%s\"", what, cn, node_name);
    return KR_EINVAL;
}

int pki_sign_node_csr(const char *ca_cert_path, const char *ca_key_path, const char *csr_pem,
                      const char *node_name, const char *extra_san, int days,
                      char **out_cert_pem)
{
    X509 *ca = NULL, *cert = NULL;
    EVP_PKEY *ca_key = NULL, *pub = NULL;
    X509_REQ *req = NULL;
    X509_NAME *name = NULL;
    GENERAL_NAMES *san = NULL;
    BIO *in = NULL, *out = NULL;
    int rv = check_days(days);
    if (rv != 0)
        goto out;
    rv = KR_EINVAL;
    if (csr_pem == NULL || node_name == NULL || out_cert_pem == NULL ||
        strlen(csr_pem) > PKI_FILE_MAX)
        goto out;
    in = BIO_new_mem_buf(csr_pem, (int)strlen(csr_pem));
    req = in ? PEM_read_bio_X509_REQ(in, NULL, NULL, NULL) : NULL;
    if (req == NULL) {
        ERR_clear_error();
        log_error("the join request holds no PEM certificate request");
        goto out;
    }
    pub = X509_REQ_get_pubkey(req);
    if (pub == NULL || X509_REQ_verify(req, pub) != 1) {
        ERR_clear_error();
        log_error("the certificate request's signature does not verify");
        rv = KR_EAUTH;
        goto out;
    }
    if (names_node(X509_REQ_get_subject_name(req), node_name, "certificate request") != 0)
        goto out;
    /* Only the public key comes from the request; names and uses are ours. */
    name = X509_NAME_new();
    san = GENERAL_NAMES_new();
    out = BIO_new(BIO_s_mem());
    if (name == NULL || san == NULL || out == NULL) {
        rv = crypto_fail("allocating a node certificate");
        goto out;
    }
    if ((rv = node_names(name, san, node_name, extra_san)) != 0 ||
        (rv = load_ca(ca_cert_path, ca_key_path, &ca, &ca_key)) != 0 ||
        (rv = sign_leaf(ca, ca_key, pub, name, san, "serverAuth,clientAuth", days, &cert)) != 0)
        goto out;
    if (PEM_write_bio_X509(out, cert) != 1) {
        rv = crypto_fail("encoding the node certificate");
        goto out;
    }
    rv = pem_of(out, out_cert_pem);
out:
    BIO_free(in);
    BIO_free(out);
    GENERAL_NAMES_free(san);
    X509_NAME_free(name);
    X509_free(cert);
    X509_free(ca);
    X509_REQ_free(req);
    EVP_PKEY_free(pub);
    EVP_PKEY_free(ca_key);
    return rv;
}

/* Verifies |cert_pem| against the CA for |purpose|; *out_cert on success.
 * KR_EAUTH when it does not verify, KR_EINVAL when malformed. |what| names
 * the certificate in logs. */
static int verify_leaf(const char *ca_cert_path, const char *cert_pem, int purpose,
                       const char *what, X509 **out_cert)
{
    char *ca_buf = NULL;
    BIO *ca_bio = NULL, *in = NULL;
    X509 *ca = NULL, *cert = NULL;
    X509_STORE *store = NULL;
    X509_STORE_CTX *ctx = NULL;
    size_t ca_len = 0;
    int rv = read_file_bio(ca_cert_path, &ca_buf, &ca_len, &ca_bio);
    if (rv != 0)
        return rv;
    rv = KR_EINVAL;
    if (cert_pem == NULL || strlen(cert_pem) > PKI_FILE_MAX)
        goto out;
    ca = PEM_read_bio_X509(ca_bio, NULL, NULL, NULL);
    in = BIO_new_mem_buf(cert_pem, (int)strlen(cert_pem));
    cert = in ? PEM_read_bio_X509(in, NULL, NULL, NULL) : NULL;
    if (ca == NULL || cert == NULL) {
        ERR_clear_error();
        log_error("%s", ca == NULL ? "cannot read the cluster CA" : "no PEM certificate given");
        goto out;
    }
    store = X509_STORE_new();
    ctx = X509_STORE_CTX_new();
    if (store == NULL || ctx == NULL || X509_STORE_add_cert(store, ca) != 1 ||
        X509_STORE_CTX_init(ctx, store, cert, NULL) != 1) {
        rv = crypto_fail("setting up certificate verification");
        goto out;
    }
    X509_STORE_CTX_set_purpose(ctx, purpose);
    if (X509_verify_cert(ctx) != 1) {
        log_error("the %s does not verify against the cluster CA: %s", what,
                  X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
        ERR_clear_error();
        rv = KR_EAUTH;
        goto out;
    }
    *out_cert = cert;
    cert = NULL;
    rv = 0;
out:
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    X509_free(cert);
    X509_free(ca);
    BIO_free(in);
    free_file_bio(ca_buf, ca_bio);
    return rv;
}

int pki_check_node_cert(const char *ca_cert_path, const char *cert_pem, const char *node_name)
{
    X509 *cert = NULL;
    if (node_name == NULL)
        return KR_EINVAL;
    int rv = verify_leaf(ca_cert_path, cert_pem, X509_PURPOSE_SSL_SERVER, "node certificate",
                         &cert);
    if (rv == 0)
        rv = names_node(X509_get_subject_name(cert), node_name, "node certificate");
    X509_free(cert);
    return rv;
}

int pki_serial_hex(const void *x509, char *out, size_t cap)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber((const X509 *)x509), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    BN_free(bn);
    if (hex == NULL || strlen(hex) + 1 > cap) {
        OPENSSL_free(hex);
        ERR_clear_error();
        return KR_EINVAL;
    }
    size_t n = strlen(hex);
    for (size_t i = 0; i <= n; i++)
        out[i] = (char)((hex[i] >= 'A' && hex[i] <= 'F') ? hex[i] - 'A' + 'a' : hex[i]);
    OPENSSL_free(hex);
    return 0;
}

int pki_check_client_cert(const char *ca_cert_path, const char *cert_pem, const char *principal,
                          char *serial, size_t serial_cap, uint64_t *not_after_ms)
{
    X509 *cert = NULL;
    if (principal == NULL)
        return KR_EINVAL;
    int rv = verify_leaf(ca_cert_path, cert_pem, X509_PURPOSE_SSL_CLIENT, "client certificate",
                         &cert);
    if (rv == 0 && X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0) == 1) {
        log_error("a node certificate cannot name a principal");
        rv = KR_EINVAL;
    }
    if (rv == 0)
        rv = names_node(X509_get_subject_name(cert), principal, "client certificate");
    if (rv == 0)
        rv = pki_serial_hex(cert, serial, serial_cap);
    if (rv == 0) {
        struct tm tm;
        if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1) {
            ERR_clear_error();
            rv = KR_EINVAL;
        } else {
            *not_after_ms = (uint64_t)timegm(&tm) * 1000u;
        }
    }
    X509_free(cert);
    return rv;
}
