/* snapshot.h: out-of-band raft snapshots, serving side. A peer whose store is
 * behind a raft snapshot asks for a RocksDB checkpoint of this node's store
 * (snapshot_open), copies its files in chunks (snapshot_read) and releases it
 * (snapshot_close). Runs on the node's loop; not thread safe. */
#ifndef KR_SNAPSHOT_H
#define KR_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

#define SNAPSHOT_MAX_OPEN 2                /* checkpoints open at once */
#define SNAPSHOT_IDLE_MS (5u * 60u * 1000u) /* an unused checkpoint expires after this */
#define SNAPSHOT_CHUNK_MAX (1u << 20)      /* bytes one read returns at most */
#define SNAPSHOT_MAX_FILES 65536           /* keeps the open response under the frame cap */
#define SNAPSHOT_ID_LEN 32                 /* hex */
#define SNAPSHOT_NAME_MAX 255

struct snapshot_registry;

struct snapshot_file {
    char *name;
    uint64_t size;
};

/* What snapshot_open made. Borrowed from the registry: valid until the next
 * call on it. */
struct snapshot_view {
    const char *id;
    uint64_t applied_index;
    const struct snapshot_file *files; /* sorted by name */
    size_t n_files;
    uint64_t total_bytes;
};

/* Checkpoints live in |data_dir|/snapshots (made if missing); whatever a
 * previous run left there is removed. |store| is borrowed. */
int snapshot_registry_new(const char *data_dir, struct store *store,
                          struct snapshot_registry **out);
/* Removes every open checkpoint. Accepts NULL. */
void snapshot_registry_free(struct snapshot_registry *reg);

/* Makes a checkpoint of the store (flushing it first) and lists its regular
 * files. |now_ms| is a monotonic clock (uv_now). KR_EBUSY when
 * SNAPSHOT_MAX_OPEN are already open. */
int snapshot_open(struct snapshot_registry *reg, uint64_t now_ms, struct snapshot_view *out);

/* Copies up to |length| bytes (0 or more than SNAPSHOT_CHUNK_MAX: that cap)
 * of file |name| of checkpoint |id| from |offset| into |buf| (room for
 * SNAPSHOT_CHUNK_MAX bytes); *out_len is 0 at the end of the file.
 * KR_ENOTFOUND: no such checkpoint (closed or expired). KR_EINVAL: a name
 * that is not a plain file name or not in the checkpoint, or an offset past
 * the end. */
int snapshot_read(struct snapshot_registry *reg, const char *id, const char *name,
                  uint64_t offset, size_t length, uint64_t now_ms, uint8_t *buf,
                  size_t *out_len);

/* Removes checkpoint |id|. KR_ENOTFOUND when there is none. */
int snapshot_close(struct snapshot_registry *reg, const char *id);

/* Removes checkpoints idle for SNAPSHOT_IDLE_MS (call periodically). */
void snapshot_tick(struct snapshot_registry *reg, uint64_t now_ms);

/* Number of open checkpoints. */
size_t snapshot_open_count(const struct snapshot_registry *reg);

/* 1 when |name| may name a checkpoint file: 1..SNAPSHOT_NAME_MAX bytes, no
 * '/', no "..", not ".". Both the serving and the fetching side check it:
 * the fetcher writes files under these names. */
int snapshot_name_valid(const char *name);

#endif
