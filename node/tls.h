/* tls.h: TLS 1.3 with mutual authentication, as a memory-BIO engine that
 * knows no sockets: the server feeds it bytes read from a libuv stream and
 * sends what it produces. */
#ifndef KR_TLS_H
#define KR_TLS_H

#include <stddef.h>
#include <stdint.h>

struct tls_ctx;
struct tls_conn;

/* Server context: TLS 1.3 only, a client certificate signed by |ca_file| is
 * required. Errors name the file that failed to load. */
int tls_server_ctx_new(const char *ca_file, const char *cert_file, const char *key_file,
                       struct tls_ctx **out);
/* Client context for peers and tests: TLS 1.3, verifies the server against
 * |ca_file|, presents |cert_file| when non-NULL. */
int tls_client_ctx_new(const char *ca_file, const char *cert_file, const char *key_file,
                       struct tls_ctx **out);
void tls_ctx_free(struct tls_ctx *ctx); /* accepts NULL */

int tls_conn_new(struct tls_ctx *ctx, int is_server, struct tls_conn **out);
void tls_conn_free(struct tls_conn *conn); /* accepts NULL */

/* Feeds ciphertext received from the peer and drives the handshake.
 * Returns 0, or KR_ETLS when the handshake or a record failed (a reason is
 * in tls_conn_error; the caller sends pending output, then closes). */
int tls_conn_feed(struct tls_conn *conn, const uint8_t *in, size_t len);
/* Decrypted application bytes: returns the count read (0: none available
 * yet), or KR_ETLS / KR_ECONN (peer closed). */
int tls_conn_read(struct tls_conn *conn, uint8_t *buf, size_t cap);
/* Encrypts |len| application bytes (all of them, or KR_ETLS). Valid only
 * once the handshake is done. */
int tls_conn_write(struct tls_conn *conn, const uint8_t *data, size_t len);
/* Ciphertext waiting to be sent: copies up to |cap| bytes, returns count. */
size_t tls_conn_pending(const struct tls_conn *conn);
size_t tls_conn_take_output(struct tls_conn *conn, uint8_t *buf, size_t cap);

int tls_conn_handshake_done(const struct tls_conn *conn);
/* The verified peer certificate's subject CN (the principal), or NULL before
 * the handshake. Borrowed, valid for the life of the connection. */
const char *tls_conn_peer_name(const struct tls_conn *conn);
/* The peer certificate's OU entries, comma-joined ("" if none). */
const char *tls_conn_peer_roles(const struct tls_conn *conn);
/* The peer certificate's serial number, lowercase hex ("" before the handshake). */
const char *tls_conn_peer_serial(const struct tls_conn *conn);
/* 1 when the verified peer certificate is a node's (it carries serverAuth,
 * which the CA gives node certificates only): peers must be nodes. */
int tls_conn_peer_is_node(const struct tls_conn *conn);
/* The last error's reason (OpenSSL's, with context), "" if none. */
const char *tls_conn_error(const struct tls_conn *conn);

#endif
