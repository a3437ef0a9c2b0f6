/* keyraft.h: the public C client API of keyraft (libkeyraft). */
#ifndef KEYRAFT_H
#define KEYRAFT_H

#include <stddef.h>
#include <stdint.h>

#include "keyraft.pb-c.h" /* generated from proto/keyraft.proto: the wire protocol */

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: 0 or a negative KR_E* value. The same table travels on the
 * wire in Response.status, so a client sees exactly what the node decided. */
enum {
    KR_OK = 0,
    KR_EINVAL = -1,       /* invalid argument or request */
    KR_ENOTFOUND = -2,    /* no such key, domain or name */
    KR_EEXIST = -3,       /* the name is taken in this domain */
    KR_ESTATE = -4,       /* the key's state forbids the operation */
    KR_EKEYTYPE = -5,     /* the key's algorithm does not fit the operation */
    KR_EPERM = -6,        /* refused by policy */
    KR_EAUTH = -7,        /* integrity check failed: bad tag, signature or MAC */
    KR_ENOMEM = -8,       /* out of memory */
    KR_EIO = -9,          /* storage error */
    KR_EHSM = -10,        /* the HSM refused or failed */
    KR_ECRYPTO = -11,     /* a cryptographic primitive failed */
    KR_EPROTO = -12,      /* malformed frame or message */
    KR_ETOOBIG = -13,     /* a frame or field exceeds its limit */
    KR_ENOTLEADER = -14,  /* this node is not the leader */
    KR_EUNAVAIL = -15,    /* no quorum, shutting down, or not ready */
    KR_ETIMEDOUT = -16,   /* no answer in time */
    KR_ECONN = -17,       /* cannot connect, or the connection broke */
    KR_ETLS = -18,        /* TLS handshake or certificate failure */
    KR_ECONFIG = -19,     /* bad configuration */
    KR_EBUSY = -20,       /* overloaded: retry later */
    KR_EINTERNAL = -21,   /* a bug: please report */
    KR_EUNSUPPORTED = -22, /* not supported by this build or algorithm */
    KR_EPENDING = -23     /* held for quorum approval: Response.approval_id names it */
};

/* A static English description of a status code; never NULL. */
const char *kr_strerror(int status);

/* The symbolic name ("KR_ENOTFOUND") of a status code; never NULL. */
const char *kr_status_name(int status);

/* Algorithm and state names, as the CLI and JSON show them ("aes-256",
 * "active"). _parse returns 0 (ALG_UNSPECIFIED / STATE_UNSPECIFIED) for an
 * unknown name. */
const char *kr_alg_name(Keyraft__Algorithm alg);
Keyraft__Algorithm kr_alg_parse(const char *name);
const char *kr_state_name(Keyraft__KeyState state);
Keyraft__KeyState kr_state_parse(const char *name);
const char *kr_reason_name(Keyraft__RevokeReason reason);
Keyraft__RevokeReason kr_reason_parse(const char *name);

/* 1 for operations that change replicated state: they go through raft on the
 * leader, carry an idempotency request_id, and are deduplicated. */
int kr_op_is_write(Keyraft__Request__OpCase op);
/* kr_op_is_write for a whole request: a batch is a write when any request in
 * it is (it must reach the leader). */
int kr_request_is_write(const Keyraft__Request *req);

/* Where and how to connect. Strings are borrowed by kr_client_new. */
typedef struct kr_client_config {
    const char *endpoints; /* "HOST:PORT[,HOST:PORT...]" */
    const char *ca_file;   /* PEM CA that signed the nodes' certificates */
    const char *cert_file; /* PEM client certificate (names the principal) */
    const char *key_file;  /* PEM private key of cert_file */
    int timeout_ms;        /* per request; 0: 30000 */
} kr_client_config;

/* A loaded client config file (INI, section [client]: endpoints, ca, cert,
 * key, timeout_ms). Relative paths are resolved against the file's directory. */
typedef struct kr_client_file kr_client_file;

/* Loads |path|, or when NULL the first of $KEYRAFT_CONFIG,
 * ~/.config/keyraft/client.conf, ./keyraft-data/client.conf.
 * On success *out_file is owned by the caller and *out_cfg borrows from it. */
int kr_client_file_load(const char *path, kr_client_file **out_file,
                        kr_client_config *out_cfg);
void kr_client_file_free(kr_client_file *file);

typedef struct kr_client kr_client;

/* Makes a client; it connects lazily on the first call and follows the
 * endpoint list on connection failure. */
int kr_client_new(const kr_client_config *cfg, kr_client **out_client);
void kr_client_free(kr_client *client);

/* The last error's detail: the node's message, or a local one. Valid until
 * the next call on |client|. */
const char *kr_client_last_error(const kr_client *client);

/* The raft commit index of the last write acknowledged to this client; sent
 * as min_index on later reads (read-your-writes). */
uint64_t kr_client_last_index(const kr_client *client);

/* Sends |req| and waits for its Response. The client sets req->id and, for
 * writes without one, req->request_id. Returns 0 and *out_resp (free it with
 * kr_response_free) when a Response arrived, whatever its status; a
 * transport failure returns a negative code and no response. */
int kr_call(kr_client *client, Keyraft__Request *req, Keyraft__Response **out_resp);
void kr_response_free(Keyraft__Response *resp);

/* Pipelining: many requests in flight on one connection, answered in any
 * order. kr_send prepares |req| as kr_call does (sets req->id, a request_id
 * for a write without one, min_index for a read) and queues it for the open
 * connection, opening one to the endpoint that last answered when there is
 * none. Queued requests are written together once they reach 16 KB, by
 * kr_flush, and by kr_recv when it has no answer already received to return
 * and would wait: one TLS record and one send for many small requests.
 * kr_send does not wait for the answer, retry or fail over, so a refusal
 * (KR_ENOTLEADER) comes back as an answer's status. The writes inside a
 * batch get no request_id from kr_send (kr_call gives them one): give them
 * your own so a resent batch is deduplicated. Returns 0 once the
 * request is queued (or written), or a transport code. kr_flush writes what
 * is queued (0, or a transport code that closes the connection).
 * kr_recv waits up to the client's timeout for the next answer on that
 * connection, whichever request it answers (match resp->id with req->id),
 * and returns 0 with *out_resp (free it with kr_response_free), or a
 * transport code. After a transport failure of either call the connection
 * is closed and the outcome of every request in flight on it is unknown.
 * Read answers while sending when they may add up to megabytes (the node
 * stops reading a client that does not read), and do not call kr_call while
 * answers are outstanding: it drops answers that are not its own. */
int kr_send(kr_client *client, Keyraft__Request *req);
int kr_flush(kr_client *client);
int kr_recv(kr_client *client, Keyraft__Response **out_resp);

/* One thread driving many connections (an event loop): kr_client_fd is the
 * open connection's socket, -1 when none is open (kr_send opens one).
 * kr_try_recv is kr_recv without the wait: 0 with *out_resp set to the next
 * answer, 0 with *out_resp NULL once every answer that has arrived was
 * returned (it first writes what kr_send queued), or a transport code, which
 * closes the connection as kr_recv's do. Call it until it gives NULL, then
 * poll the socket for POLLIN: answers already read are not signalled by the
 * socket. It never waits for the node, so the application keeps its own
 * deadline for answers; like kr_flush, it may wait up to the timeout for the
 * socket to take queued requests. */
int kr_client_fd(const kr_client *client);
int kr_try_recv(kr_client *client, Keyraft__Response **out_resp);

/* A byte buffer owned by the caller. kr_buf_free wipes it before freeing. */
typedef struct kr_buf {
    uint8_t *data;
    size_t len;
} kr_buf;
void kr_buf_free(kr_buf *buf);

/* Typed calls. Each returns 0 or a KR_E* code (the node's status, or a
 * transport code), with the detail in kr_client_last_error. A key is named by
 * |key_id|, or by name when it starts with "name:". */
int kr_create_key(kr_client *c, const char *name, Keyraft__Algorithm alg,
                  const Keyraft__Tag *const *tags, size_t n_tags,
                  Keyraft__KeyAttributes **out_attrs);
int kr_get_key(kr_client *c, const char *key, Keyraft__KeyAttributes **out_attrs);
void kr_key_attributes_free(Keyraft__KeyAttributes *attrs);
int kr_encrypt(kr_client *c, const char *key, const uint8_t *pt, size_t pt_len,
               const uint8_t *aad, size_t aad_len, kr_buf *out_ciphertext);
int kr_decrypt(kr_client *c, const uint8_t *ct, size_t ct_len,
               const uint8_t *aad, size_t aad_len, kr_buf *out_plaintext);
int kr_sign(kr_client *c, const char *key, const uint8_t *msg, size_t msg_len,
            kr_buf *out_signature);
int kr_verify(kr_client *c, const char *key, const uint8_t *msg, size_t msg_len,
              const uint8_t *sig, size_t sig_len, int *out_valid);
int kr_random(kr_client *c, size_t len, kr_buf *out_bytes);

/* At most this many requests ride one batch. */
#define KR_BATCH_MAX 10000

/* Sends |n| requests (1..KR_BATCH_MAX) in one BatchRequest frame. Each is
 * handled on the node as if sent alone (its own authorization, audit record
 * and status) and *out_resp->batch->responses[i] answers reqs[i], in order.
 * The batch goes to the leader when any request in it is a write; a write
 * without a request_id gets one, the same on every retry inside this call
 * (set reqs[i]->request_id yourself to keep it across calls). Returns 0 and
 * *out_resp (free with kr_response_free) when the node answered the batch
 * with its answers; otherwise the batch's status (e.g. KR_ETOOBIG) or a
 * transport code, detail in kr_client_last_error, and no response. The
 * requests are borrowed and unchanged on return. */
int kr_batch(kr_client *c, Keyraft__Request **reqs, size_t n, Keyraft__Response **out_resp);

/* Frame limit both sides enforce (bytes of one protobuf message). */
#define KR_MAX_FRAME (4u * 1024u * 1024u)
#define KR_DEFAULT_PORT 7300

#ifdef __cplusplus
}
#endif
#endif
