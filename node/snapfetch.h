/* snapfetch.h: out-of-band raft snapshots, fetching side. Copies a peer's
 * store checkpoint (snapshot.h serves it) into a local directory through
 * libkeyraft's client, authenticated with this node's own certificate.
 * Blocking; bounded by its timeouts. */
#ifndef KR_SNAPFETCH_H
#define KR_SNAPFETCH_H

#include <stddef.h>
#include <stdint.h>

#define SNAPFETCH_TIMEOUT_MS (10 * 60 * 1000) /* default for a whole fetch */
#define SNAPFETCH_CALL_TIMEOUT_MS 30000       /* default for one request */

struct snapfetch_config {
    const char *const *endpoints; /* peers' client endpoints (HOST:PORT), tried in order */
    size_t n_endpoints;
    const char *ca_file;          /* the cluster CA */
    const char *cert_file;        /* this node's certificate: peers serve nodes only */
    const char *key_file;
    int timeout_ms;      /* the whole fetch, all endpoints; 0: SNAPFETCH_TIMEOUT_MS */
    int call_timeout_ms; /* one request; 0: SNAPFETCH_CALL_TIMEOUT_MS */
};

/* What a successful fetch brought. */
struct snapfetch_result {
    char endpoint[256]; /* the peer it came from */
    uint64_t applied_index; /* as the peer announced it: check it with store_probe */
    size_t n_files;
    uint64_t bytes;
    uint64_t elapsed_ms;
};

/* Fetches a checkpoint whose applied index is at least |min_index| into
 * |dest_dir| (created, mode 0700; it must not exist: KR_EEXIST). Endpoints
 * are tried in order; one that fails, or whose checkpoint is older than
 * |min_index|, is skipped. Every file and the directory are fsynced. Fails
 * with KR_ETIMEDOUT once the overall timeout is spent (checked between
 * requests, so it may be exceeded by one call timeout), or with the last
 * endpoint's error; |dest_dir| is then removed. |out| may be NULL. */
int snapshot_fetch(const struct snapfetch_config *cfg, uint64_t min_index, const char *dest_dir,
                   struct snapfetch_result *out);

#endif
