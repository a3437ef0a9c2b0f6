/* config.h: the node's config file (INI, libinih) with validation that names
 * the file, line and key of every problem. */
#ifndef KR_CONFIG_H
#define KR_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#define CONFIG_PATH_MAX 4096

struct config {
    uint64_t node_id;                     /* [node] id, >= 1 */
    char data_dir[CONFIG_PATH_MAX];       /* [node] data_dir */
    char listen[256];                     /* [node] listen = HOST:PORT (clients) */
    char raft_address[256];               /* [node] raft_address = IPv4:PORT (peers) */
    char raft_listen[256];                /* [node] raft_listen: bind here instead (a proxy
                                           * or NAT in front advertises raft_address) */
    char join[256];                       /* [node] join = HOST:PORT of a member's client
                                           * endpoint: where a new node fetches its first
                                           * snapshot */
    char log_level[16];                   /* [node] log_level */
    char tls_ca[CONFIG_PATH_MAX];         /* [tls] ca */
    char tls_cert[CONFIG_PATH_MAX];       /* [tls] cert */
    char tls_key[CONFIG_PATH_MAX];        /* [tls] key */
    char hsm_module[CONFIG_PATH_MAX];     /* [hsm] module */
    char hsm_token_label[64];             /* [hsm] token_label */
    char hsm_mwk_label[64];               /* [hsm] mwk_label */
    char hsm_pin_file[CONFIG_PATH_MAX];   /* [hsm] pin_file (or pin_env) */
    char hsm_pin_env[64];                 /* [hsm] pin_env */
    char hsm_so_pin_file[CONFIG_PATH_MAX]; /* [hsm] so_pin_file (or so_pin_env): needed
                                            * to admit a node (trusting its transport key) */
    char hsm_so_pin_env[64];              /* [hsm] so_pin_env */
    char hsm_softhsm_conf[CONFIG_PATH_MAX]; /* [hsm] softhsm_conf: sets SOFTHSM2_CONF */
    int allow_export;                     /* [policy] allow_export (default true) */
    uint32_t key_cache_idle_s;            /* [policy] key_cache_idle_s: an unsealed AES/HMAC
                                           * version stays in the secure heap until unused
                                           * this long (0 to 3600, default 10; 0: never kept) */
    uint32_t max_frame;                   /* [limits] max_frame (bytes) */
    uint32_t max_connections;             /* [limits] max_connections */
    uint32_t list_max;                    /* [limits] list_max: cap on one list page */
    int audit_enabled;                    /* [audit] enabled (default true): false keeps no
                                           * records (usage counts still ship) */
    uint32_t audit_flush_ms;              /* [audit] flush_ms: ship records at least this
                                           * often (1..10000, default 20) */
    uint32_t audit_max_pending;           /* [audit] max_pending: unshipped records held
                                           * before failing closed (>= 1000, default 100000) */
    uint32_t audit_max_lag_ms;            /* [audit] max_lag_ms: age of the oldest unshipped
                                           * record before failing closed (>= 100, default 3000) */
    int audit_fail_open_reads;            /* [audit] fail_open_reads (default false): reads go
                                           * on while the audit log cannot be written */
    uint32_t audit_checkpoint_ms;         /* [audit] checkpoint_ms: how often the leader signs
                                           * the chain head (>= 100, default 10000) */
    uint32_t raft_snapshot_log_mb;        /* [raft] snapshot_log_mb: raft log written between
                                           * snapshots (1..65536, default 64); bounds the log's
                                           * disk and a restart's replay */
};

/* Fills defaults. */
void config_defaults(struct config *config);

/* Loads and validates |path|. Relative paths in it are resolved against the
 * file's directory. KR_ECONFIG with a logged reason naming file:line. */
int config_load(const char *path, struct config *config);

/* config_load without the checks that files exist: for a joining node whose
 * certificates arrive with its join bundle. */
int config_parse(const char *path, struct config *config);

/* Writes |config| as an INI file (mode 0600). */
int config_write(const struct config *config, const char *path);

/* Reads the HSM PIN from pin_file or the pin_env variable into |pin| (NUL
 * terminated, cap bytes). The caller wipes it after use. Never from argv. */
int config_read_pin(const struct config *config, char *pin, size_t cap);
/* The same for the token's SO PIN. KR_ECONFIG when none is configured. */
int config_read_so_pin(const struct config *config, char *pin, size_t cap);

/* Splits "HOST:PORT" into host and port. KR_EINVAL when malformed. */
int config_split_hostport(const char *hostport, char *host, size_t host_cap, int *port);

#endif
