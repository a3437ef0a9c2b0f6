/* pki.h: the cluster's certificates. keyraftd init makes a CA (EC P-256),
 * node certificates and client certificates with OpenSSL; all PEM files. */
#ifndef KR_PKI_H
#define KR_PKI_H

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

#endif
