/* peer.h: raft's peer transport over mutual TLS 1.3 (a struct
 * raft_uv_transport). Both ends present node certificates from the cluster
 * CA; a connection claiming raft id N must come from the certificate
 * "node-N". raft reads and writes one end of a local socketpair; this module
 * pumps the other end through TLS. */
#ifndef KR_PEER_H
#define KR_PEER_H

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "tls.h"

/* The process must ignore SIGPIPE: raft may write into its end of a tunnel
 * that this module just closed (a refused peer learns of it after TLS 1.3
 * counted the handshake done).
 * Fills |t| with the TLS transport. The contexts are borrowed and must
 * outlive it: |server_ctx| from tls_server_ctx_new, |client_ctx| from
 * tls_client_ctx_new with the node's own certificate. */
int peer_transport_init(struct raft_uv_transport *t, uv_loop_t *loop, struct tls_ctx *server_ctx,
                        struct tls_ctx *client_ctx);
/* Binds the peer listener to |listen_address| (IPv4:PORT) instead of the
 * node's raft address, which stays what peers are told to dial (a proxy or
 * NAT in front). NULL or "": the raft address. Call before raft starts. */
void peer_transport_set_listen(struct raft_uv_transport *t, const char *listen_address);
/* Frees what peer_transport_init allocated; call after raft closed it. */
void peer_transport_cleanup(struct raft_uv_transport *t);

/* The certificate CN a node with raft id |id| must present. */
void peer_node_name(unsigned long long id, char *out, size_t cap);

#endif
