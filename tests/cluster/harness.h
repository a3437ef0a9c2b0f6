/* harness.h: real keyraftd processes for integration tests: data dirs, free
 * ports, start/stop/kill -9, the keyraft CLI run as a child, a client on the
 * node's client.conf, and small helpers (files, hex, a tiny JSON reader). */
#ifndef KR_TEST_HARNESS_H
#define KR_TEST_HARNESS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/ssl.h>

#include "keyraft.h"

#define KR_PATH_MAX 512

/* One single-voter node. |dir| is keyraftd's --data directory; |scratch| is a
 * separate directory for the test's own files (signatures, import material)
 * so that nothing the test writes can be mistaken for what the node wrote. */
struct kr_node {
    char dir[KR_PATH_MAX];
    char scratch[KR_PATH_MAX];
    char client_conf[KR_PATH_MAX];
    int port, raft_port;
    pid_t pid; /* 0 when not running */
    kr_client_file *cfile; /* client.conf, loaded once: clients borrow from it */
    kr_client_config ccfg;
};

/* What a CLI run produced. |out| and |err| are NUL-terminated (the NUL is not
 * counted in the length) so text output can be used as a string. */
struct kr_out {
    uint8_t *out;
    size_t out_len;
    char *err;
    size_t err_len;
    int status; /* exit code; 128+N when killed by signal N; -1 on timeout */
};

/* Path of a binary in $KR_BUILD_DIR (default: the current directory). */
const char *kr_build_dir(void);

/* Makes a data directory under /tmp with two free loopback ports and runs
 * `keyraftd init` there (output in DIR/init.log). Retries with new ports when
 * init fails. 0 or -1 (the reason printed). */
int kr_node_init(struct kr_node *node);
/* How many `keyraftd init` runs of kr_node_init died by a signal or hung
 * (each was retried, so only this count shows it). */
unsigned kr_node_init_crashes(void);

/* Starts keyraftd --data DIR (output appended to DIR/node.log) and waits up
 * to 20 s until it answers a status request as leader. 0 or -1. */
int kr_node_start(struct kr_node *node);

/* Starts keyraftd --data DIR (output appended to DIR/node.log) and returns
 * at once, the process tracked like kr_node_start's: for nodes that are not
 * to lead (joining members), whose readiness the caller checks itself. */
int kr_node_spawn(struct kr_node *node);

/* SIGTERM, then waits up to 10 s (SIGKILL after). Returns the exit code of
 * the process (0 on a clean stop), 128+N when a signal N ended it, or -1
 * when it was not running. */
int kr_node_stop(struct kr_node *node);

/* Waits up to |timeout_ms| for the process to exit by itself (after a
 * signal the caller sent), sending nothing: a second SIGTERM may mean "stop
 * now" to keyraftd. Returns the exit code as kr_node_stop does, or -1 when it
 * was not running or is still running (pid kept). */
int kr_node_wait_exit(struct kr_node *node, unsigned timeout_ms);

/* SIGKILL and reap. 0, or -1 when it was not running. */
int kr_node_kill9(struct kr_node *node);

/* kr_node_stop then kr_node_start. Returns the start result. */
int kr_node_restart(struct kr_node *node);

/* Stops the node and removes both directories, unless $KR_KEEP_TEST_DIRS
 * is set. Accepts a node that was never started. */
void kr_node_destroy(struct kr_node *node);

/* 1 when the node's process exists and has not exited. */
int kr_node_alive(const struct kr_node *node);

/* Number of raft snapshot files (snapshot-*) in DIR/raft. */
int kr_node_raft_snapshots(const struct kr_node *node);

/* Prints the last |max| bytes of DIR/node.log to stderr (for diagnosis). */
void kr_node_dump_log(const struct kr_node *node, size_t max);

/* Runs `keyraft --config DIR/client.conf ARG...` (NULL-terminated), feeding
 * |stdin_data| on its stdin, capturing stdout and stderr; killed after 30 s.
 * Returns out->status. Free |out| with kr_out_free. */
int kr_cli(const struct kr_node *node, const void *stdin_data, size_t stdin_len,
           struct kr_out *out, const char *arg, ...) __attribute__((sentinel));
/* kr_cli picks the identity `keyraftd init` made for the command's duty:
 * admin.conf for cluster, principal, domain, policy and quorum commands,
 * auditor.conf for audit, client.conf (principal "app": officer and user in
 * group "apps") otherwise. kr_cli_as names the principal itself. */
int kr_cli_as_argv(const struct kr_node *node, const char *principal, const void *stdin_data,
                   size_t stdin_len, struct kr_out *out, const char *const *argv);
/* The client config `keyraftd init` wrote for |principal| next to |client_conf|. */
int kr_conf_of(const char *client_conf, const char *principal, char *out, size_t cap);
int kr_cli_argv(const struct kr_node *node, const void *stdin_data, size_t stdin_len,
                struct kr_out *out, const char *const *argv);
void kr_out_free(struct kr_out *out);

/* Runs |argv| (argv[0] a path; NULL-terminated) with no stdin, capturing
 * like kr_cli, killed after |timeout_ms|. Returns out->status. */
int kr_run(const char *const *argv, struct kr_out *out, int timeout_ms);

/* Two distinct loopback ports that were free a moment ago. 0 or -1. */
int kr_free_port_pair(int *a, int *b);

/* A client on the node's client.conf (timeout |timeout_ms|, 0: default).
 * Free with kr_node_client_free. */
int kr_node_client(const struct kr_node *node, int timeout_ms, kr_client **out_client);
void kr_node_client_free(kr_client *client);
/* The same with another principal `keyraftd init` made (admin, app, auditor). */
int kr_node_client_as(const struct kr_node *node, const char *principal, int timeout_ms,
                      kr_client **out_client);

/* One status request; 0 and the role copied into |role| when it answered. */
int kr_node_status_role(const struct kr_node *node, char *role, size_t role_len);

/* ---- raw connections, for tests that speak the wire protocol themselves -------- */

/* A TCP connection to 127.0.0.1:|port| with |timeout_s| send/receive
 * timeouts; the fd, or -1. */
int kr_tcp_connect(int port, int timeout_s);

/* A TLS client connection. */
struct kr_tls {
    int fd;
    SSL_CTX *ctx;
    SSL *ssl;
};

/* Opens a TLS 1.3 connection to the node (5 s I/O timeouts), trusting its
 * CA and presenting |cert|/|key| (PEM files; NULL: no client certificate).
 * |max_version| 0, or e.g. TLS1_2_VERSION to offer only TLS 1.2. Returns 0
 * when the handshake completed on the client side, -1 when it failed, and
 * KR_ECONFIG when the files do not load; |t| is to be closed either way. */
int kr_tls_open(const struct kr_node *node, const char *cert, const char *key, int max_version,
                struct kr_tls *t);
/* The same with the admin identity made by `keyraftd init`. */
int kr_tls_open_app(const struct kr_node *node, struct kr_tls *t);
void kr_tls_close(struct kr_tls *t);
/* Writes / reads exactly |len| bytes: 0, or -1 (EOF, error, timeout). */
int kr_tls_write(struct kr_tls *t, const void *data, size_t len);
int kr_tls_read(struct kr_tls *t, void *data, size_t len);
/* One frame: 4-byte big-endian length, then |payload|. */
int kr_tls_send_frame(struct kr_tls *t, const void *payload, size_t len);
int kr_tls_send_request(struct kr_tls *t, const Keyraft__Request *req);
/* Reads one Response frame (free with keyraft__response__free_unpacked).
 * NULL on EOF, timeout or a frame that does not parse; |frame_len| (may be
 * NULL) gets the length the node declared, 0 when none arrived. */
Keyraft__Response *kr_tls_read_response(struct kr_tls *t, size_t *frame_len);
/* 1 when the peer has closed the connection (a read fails before the
 * timeout), 0 when the read timed out or returned data. */
int kr_tls_peer_closed(struct kr_tls *t);

/* Resident memory of a process in KiB (VmRSS), or -1. */
long kr_rss_kib(pid_t pid);
/* The most resident memory the process has had, in KiB (VmHWM), or -1. */
long kr_peak_rss_kib(pid_t pid);

/* ---- files and bytes ---------------------------------------------------------- */

/* Writes |len| bytes to the node's scratch dir as |name|, the full path into
 * |path|. 0 or -1. */
int kr_scratch_file(const struct kr_node *node, const char *name, const void *data,
                    size_t len, char *path, size_t path_len);
int kr_write_file(const char *path, const void *data, size_t len);
/* Reads a whole file; *out is malloc'd and NUL-terminated. 0 or -1. */
int kr_read_file(const char *path, uint8_t **out, size_t *out_len);
/* Removes a directory tree. */
void kr_rm_rf(const char *path);

/* Decodes hex (whitespace at the end ignored); *out malloc'd. 0 or -1. */
int kr_hex_decode(const char *hex, uint8_t **out, size_t *out_len);
/* Decodes base64 (standard alphabet, padding); *out malloc'd. 0 or -1. */
int kr_b64_decode(const char *b64, uint8_t **out, size_t *out_len);
/* 1 when |s| (up to whitespace) is exactly |n| lowercase hex digits. */
int kr_is_hex(const char *s, size_t n);
/* Copies |s| without trailing whitespace into a new string. */
char *kr_chomp_dup(const char *s, size_t len);

/* ---- a small JSON reader, enough for the CLI's --json output ------------------ */

enum kr_json_type { KR_JSON_NULL, KR_JSON_BOOL, KR_JSON_NUM, KR_JSON_STR, KR_JSON_ARR, KR_JSON_OBJ };

typedef struct kr_json {
    enum kr_json_type type;
    char *key;  /* member name inside an object */
    char *str;  /* string value, or the number's text */
    double num;
    int boolean;
    struct kr_json **items; /* array elements or object members */
    size_t n_items;
} kr_json;

/* Parses one JSON document (trailing whitespace allowed); NULL on error. */
kr_json *kr_json_parse(const char *text, size_t len);
void kr_json_free(kr_json *j);
/* Member |key| of an object; NULL when missing or not an object. */
const kr_json *kr_json_get(const kr_json *j, const char *key);
/* Element |i| of an array; NULL when out of range. */
const kr_json *kr_json_at(const kr_json *j, size_t i);
size_t kr_json_len(const kr_json *j);
/* String value, or NULL when |j| is not a string. */
const char *kr_json_str(const kr_json *j);
/* Integer value of a number; |dflt| when |j| is not a number. */
long long kr_json_int(const kr_json *j, long long dflt);
/* Walks "a.b.0.c" (numbers index arrays); NULL when a step is missing. */
const kr_json *kr_json_path(const kr_json *j, const char *path);

/* ---- cmocka helpers (the test includes cmocka.h first) ------------------------ */

/* Fails the test, showing the command's output, unless it exited |want|. */
#define KR_ASSERT_EXIT(o, want)                                                          \
    do {                                                                                 \
        if ((o)->status != (want)) {                                                     \
            print_error("%s:%d: keyraft exited %d, want %d\nstdout: %.*s\nstderr: %s\n", \
                        __FILE__, __LINE__, (o)->status, (want),                         \
                        (int)((o)->out_len > 2000 ? 2000 : (o)->out_len),                \
                        (const char *)(o)->out, (o)->err);                               \
            fail();                                                                      \
        }                                                                                \
    } while (0)

/* Fails unless the command exited 1 and stderr names |code| ("KR_EAUTH"). */
#define KR_ASSERT_FAILS_WITH(o, code)                                                    \
    do {                                                                                 \
        KR_ASSERT_EXIT((o), 1);                                                          \
        if (strstr((o)->err, (code)) == NULL) {                                          \
            print_error("%s:%d: stderr does not name %s: %s\n", __FILE__, __LINE__,      \
                        (code), (o)->err);                                               \
            fail();                                                                      \
        }                                                                                \
    } while (0)

#endif
