/* store.h: RocksDB. Column families, batched writes that record the raft
 * applied index atomically, point reads and bounded iterators. Knows nothing
 * of keys' meaning: the schema lives in fsm.h. */
#ifndef KR_STORE_H
#define KR_STORE_H

#include <stddef.h>
#include <stdint.h>

enum store_cf {
    STORE_CF_KEYS,   /* key id -> KeyRecord */
    STORE_CF_NAMES,  /* domain \0 name -> key id */
    STORE_CF_ATTRS,  /* secondary indexes for list/locate -> empty */
    STORE_CF_DUE,    /* time -> key id, scheduled transitions */
    STORE_CF_AUDIT,  /* audit records */
    STORE_CF_META,   /* domains, dedup, applied index, config */
    STORE_CF_COUNT
};

struct store;
struct store_batch;

/* Opens or creates the database at |path| with every column family. The WAL is
 * off: durability comes from the raft log, and the applied index is written
 * in the same atomic batch as the data (atomic_flush across families), so a
 * restart replays exactly the entries past store_applied_index(). */
int store_open(const char *path, struct store **out);
/* Destroys the column family handles, then closes. Accepts NULL. */
void store_close(struct store *store);

/* The raft index of the last applied batch (0 for a new store). */
uint64_t store_applied_index(const struct store *store);

/* Moves whenever a committed batch touched |cf|, and when store_swap replaced
 * the data: a cache of the family's values is current while it is unchanged.
 * Any thread. */
uint64_t store_cf_generation(const struct store *store, enum store_cf cf);

/* Point read. On success *out_value is malloc'd (free()). KR_ENOTFOUND when
 * absent, KR_EIO with the RocksDB error logged. */
int store_get(struct store *store, enum store_cf cf, const void *key, size_t key_len,
              uint8_t **out_value, size_t *out_len);

/* One answer of store_multi_get: status 0 with a malloc'd copy of the value
 * in data (non-NULL even when empty), KR_ENOTFOUND, KR_EIO (logged) or
 * KR_ENOMEM. */
struct store_value {
    int status;
    uint8_t *data;
    size_t len;
};

/* Point reads of |n| keys of one column family in one call (RocksDB's
 * batched MultiGet: it probes memtables and filters for the whole batch,
 * which answers a missing key 3-4x cheaper than store_get). out[i] answers
 * keys[i] exactly as store_get would. Returns 0 when every out[i] is set,
 * else KR_EINVAL, KR_ENOMEM or the closed-store error (no out[i] to free).
 * Free the answers with store_values_clear. */
int store_multi_get(struct store *store, enum store_cf cf, size_t n, const uint8_t *const *keys,
                    const size_t *key_lens, struct store_value *out);
void store_values_clear(struct store_value *values, size_t n);

struct store_batch *store_batch_new(void);
void store_batch_free(struct store_batch *batch); /* accepts NULL */
void store_batch_put(struct store_batch *batch, enum store_cf cf, const void *key,
                     size_t key_len, const void *value, size_t value_len);
void store_batch_delete(struct store_batch *batch, enum store_cf cf, const void *key,
                        size_t key_len);
/* Deletes every key in [start, end) of |cf|, one range tombstone whatever
 * their number. It applies before every put and delete of the same batch,
 * whatever order they were recorded in: a put into the range survives. */
void store_batch_delete_range(struct store_batch *batch, enum store_cf cf, const void *start,
                              size_t start_len, const void *end, size_t end_len);
/* Writes the batch and |applied_index| atomically. The batch stays owned by
 * the caller. */
int store_batch_commit(struct store *store, struct store_batch *batch, uint64_t applied_index);

/* Makes everything committed so far durable (flushes memtables of all
 * families, waits), on the owner's thread: at close and before a swap. */
int store_flush(struct store *store);

/* store_flush from any thread, through its own scratch checkpoint, while the
 * owner's thread goes on committing: a worker runs it for each raft snapshot
 * (on the loop, a flush held it 120 ms to over a second). One at a time. The
 * owner's thread calls
 * store_preflush_hold before handing the work over; store_preflush ends the
 * hold, store_preflush_release ends one whose work never ran. store_swap waits
 * for held preflushes to end. */
void store_preflush_hold(struct store *store);
void store_preflush_release(struct store *store);
int store_preflush(struct store *store);

/* Forward iteration over [lower, upper) of a family; lower and upper may each
 * be NULL (no bound). The iterator sees a consistent snapshot. */
struct store_iter;
int store_iter_new(struct store *store, enum store_cf cf, const void *lower, size_t lower_len,
                   const void *upper, size_t upper_len, struct store_iter **out);
/* 1 while positioned on an entry, 0 at the end (or after a read error). */
int store_iter_valid(const struct store_iter *iter);
void store_iter_next(struct store_iter *iter);
/* 0, or KR_EIO (logged) when a read error ended the iteration early: check it
 * once store_iter_valid() is 0, before trusting the scan as complete. */
int store_iter_status(const struct store_iter *iter);
/* Borrowed views, valid until the next move. */
const uint8_t *store_iter_key(const struct store_iter *iter, size_t *len);
const uint8_t *store_iter_value(const struct store_iter *iter, size_t *len);
/* Accepts NULL. Every iterator must be freed before store_close and
 * store_swap. */
void store_iter_free(struct store_iter *iter);

/* --- whole-database copies: out-of-band raft snapshots ------------------------- */

/* Writes a self-contained copy of the database into |dir|, which must not
 * exist and must be on the store's filesystem (SST files are hard-linked).
 * Memtables are flushed first, so the copy holds every commit so far and its
 * applied index. Open it with store_open or check it with store_probe. */
int store_checkpoint(struct store *store, const char *dir);

/* Opens the database in |dir| read-only (every column family must be there),
 * reads every entry with checksums verified, and reports its applied index:
 * the check a fetched checkpoint passes before store_swap. KR_EIO (logged)
 * when it is not a complete, undamaged store. Reads the whole database. */
int store_probe(const char *dir, uint64_t *out_applied);

/* Replaces the store's database with the one in |new_db_dir| (renamed into
 * place: same filesystem), keeping |store| valid for its callers. The current
 * one is flushed, closed and parked at <path>.old, the new one renamed to
 * <path> and opened, then <path>.old is removed.
 * Contract: every iterator of |store| is freed before the call (KR_EBUSY
 * otherwise) and no other thread uses the store during it.
 * On failure the old database is put back and reopened, and |new_db_dir| is
 * left where it was. If even the old one cannot be reopened, the store stays
 * closed: every call fails with KR_EIO until store_close. A crash in the
 * middle is repaired by the next store_open: before the new database is in
 * place the old one comes back, after it the new one stays (check it with
 * store_probe before the swap). */
int store_swap(struct store *store, const char *new_db_dir);

/* Removes |path| and everything under it, never following symlinks. Absent
 * is fine. For database and checkpoint directories. */
int store_remove_dir(const char *path);

/* Approximate number of keys in a family (RocksDB estimate). */
uint64_t store_estimate_count(struct store *store, enum store_cf cf);

#endif
