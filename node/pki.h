/* pki.h: the cluster's certificates. keyraftd init makes a CA (EC P-256),
 * node certificates and client certificates with OpenSSL; all PEM files. */
#ifndef KR_PKI_H
#define KR_PKI_H

#include <stddef.h>
#include <stdint.h>

/* Makes a self-signed CA: |key_path| (mode 0600) and |cert_path|. */
int pki_make_ca(const char *common_name, int days, const char *cert_path, const char *key_path);

/* Issues a node certificate (serverAuth + clientAuth, for peers) signed by the
 * CA, with SAN IP 127.0.0.1 and DNS localhost plus |extra_san| (a
 * comma-separated list of IPs or names; may be NULL). */
int pki_issue_node(const char *ca_cert_path, const char *ca_key_path, const char *node_name,
                   const char *extra_san, int days, const char *cert_path,
                   const char *key_path);

/* Issues a client certificate (clientAuth) whose subject CN is |principal|
 * and whose OU entries are |roles| (comma-separated, may be NULL). */
int pki_issue_client(const char *ca_cert_path, const char *ca_key_path, const char *principal,
                     const char *roles, int days, const char *cert_path, const char *key_path);

/* A new node's TLS key (P-256, written to |key_path| mode 0600; it never
 * leaves the node) and a PEM certificate request for CN |node_name|
 * (*out_csr_pem malloc'd). */
int pki_make_node_csr(const char *node_name, const char *key_path, char **out_csr_pem);
/* The admin's side: checks the request's signature and that it names
 * |node_name|, then issues a node certificate for its public key (names and
 * uses are set here, never copied from the request). */
int pki_sign_node_csr(const char *ca_cert_path, const char *ca_key_path, const char *csr_pem,
                      const char *node_name, const char *extra_san, int days,
                      char **out_cert_pem);
/* 0 when |cert_pem| chains to the CA, may serve TLS, and names |node_name|;
 * KR_EAUTH when it does not verify, KR_EINVAL when malformed or misnamed. */
int pki_check_node_cert(const char *ca_cert_path, const char *cert_pem, const char *node_name);

/* 0 when |cert_pem| chains to the CA as a client certificate (not a node's)
 * naming |principal|; its serial (lowercase hex) and expiry are returned.
 * KR_EAUTH when it does not verify, KR_EINVAL when malformed or misnamed. */
int pki_check_client_cert(const char *ca_cert_path, const char *cert_pem, const char *principal,
                          char *serial, size_t serial_cap, uint64_t *not_after_ms);

/* The serial number of an X509 * as lowercase hex without leading zeros. */
int pki_serial_hex(const void *x509, char *out, size_t cap);

#endif
