/* store.c: the RocksDB column-family store under the FSM, WAL off, applied index in every batch. */
#include "store.h"

#define KR_LOG_MODULE "store"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <rocksdb/c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"

/* Index 0 is RocksDB's mandatory "default" family, opened and never used. */
#define STORE_NUM_HANDLES (STORE_CF_COUNT + 1)
static const char *const store_cf_names[STORE_NUM_HANDLES] = {
    "default", "keys", "names", "attrs", "due", "audit", "meta",
};

/* Lives in the meta family; the leading \0 keeps it apart from printable keys. */
static const char store_applied_key[] = {'\0', 'a', 'p', 'p', 'l', 'i', 'e', 'd'};

#define STORE_BLOCK_CACHE_BYTES (64u << 20)
#define STORE_BLOOM_BITS 10.0
#define STORE_MAX_OPEN_FILES 512
/* Directory inside the DB dir that store_flush's checkpoint goes through. */
#define STORE_FLUSH_DIR "flush-checkpoint"

struct store {
    rocksdb_t *db;
    rocksdb_column_family_handle_t *cf[STORE_NUM_HANDLES];
    rocksdb_readoptions_t *read_opts;
    rocksdb_writeoptions_t *write_opts;
    char *path;
    char *flush_dir;
    uint64_t applied; /* accessed with __atomic: read from any thread */
};

enum batch_op_kind { BATCH_OP_PUT, BATCH_OP_DELETE };

struct batch_op {
    enum batch_op_kind kind;
    enum store_cf cf;
    size_t key_off, key_len;
    size_t value_off, value_len;
};

/* Operations are recorded here and turned into a RocksDB WriteBatch at
 * commit: a batch is made without a store, and RocksDB needs the column
 * family handles of an open DB. */
struct store_batch {
    struct batch_op *ops;
    size_t n_ops, cap_ops;
    uint8_t *data;
    size_t len, cap;
    int err; /* first failure while recording, reported by commit */
};

struct store_iter {
    rocksdb_t *db;
    const rocksdb_snapshot_t *snapshot;
    rocksdb_readoptions_t *opts; /* holds the bound slices the iterator points at */
    rocksdb_iterator_t *it;
    char *lower; /* bound buffers: must outlive it */
    char *upper;
    int err;
};

static rocksdb_column_family_handle_t *store_handle(const struct store *store, enum store_cf cf)
{
    return store->cf[(int)cf + 1];
}

static int store_cf_valid(enum store_cf cf) { return (int)cf >= 0 && cf < STORE_CF_COUNT; }

static const char *store_cf_name(enum store_cf cf)
{
    return store_cf_valid(cf) ? store_cf_names[(int)cf + 1] : "?";
}

static void store_put_be64(uint8_t out[8], uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t store_get_be64(const uint8_t in[8])
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | in[i];
    return v;
}

/* Removes a directory holding only files (a checkpoint). Absent is fine. */
static int store_remove_flat_dir(const char *path)
{
    int rc = KR_EIO;
    DIR *dir = opendir(path);
    if (dir == NULL) {
        if (errno == ENOENT)
            return 0;
        log_error("open %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    struct dirent *ent;
    errno = 0;
    while ((ent = readdir(dir)) != NULL) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0)
            continue;
        if (unlinkat(dirfd(dir), ent->d_name, 0) != 0) {
            log_error("remove %s/%s: %s", path, ent->d_name, strerror(errno));
            goto out;
        }
        errno = 0;
    }
    if (errno != 0) {
        log_error("read dir %s: %s", path, strerror(errno));
        goto out;
    }
    if (rmdir(path) != 0) {
        log_error("remove %s: %s", path, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    closedir(dir);
    return rc;
}

/* Shared by every family (RocksDB copies what it keeps). */
static rocksdb_options_t *store_make_options(int compression)
{
    rocksdb_options_t *opts = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(opts, 1);
    rocksdb_options_set_create_missing_column_families(opts, 1);
    /* With the WAL off, only an atomic flush keeps the applied index in the
     * meta family consistent with the data in the others. */
    rocksdb_options_set_atomic_flush(opts, 1);
    rocksdb_options_set_max_open_files(opts, STORE_MAX_OPEN_FILES);
    rocksdb_options_set_max_background_jobs(opts, 4);
    rocksdb_options_set_level_compaction_dynamic_level_bytes(opts, 1);
    rocksdb_options_set_keep_log_file_num(opts, 5);
    rocksdb_options_set_max_log_file_size(opts, 16u << 20);
    rocksdb_options_set_compression(opts, compression);

    rocksdb_cache_t *cache = rocksdb_cache_create_lru(STORE_BLOCK_CACHE_BYTES);
    rocksdb_block_based_table_options_t *table = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(table, cache);
    /* The table options take ownership of the filter policy. */
    rocksdb_block_based_options_set_filter_policy(
        table, rocksdb_filterpolicy_create_bloom_full(STORE_BLOOM_BITS));
    rocksdb_block_based_options_set_cache_index_and_filter_blocks(table, 1);
    rocksdb_options_set_block_based_table_factory(opts, table);
    rocksdb_block_based_options_destroy(table);
    rocksdb_cache_destroy(cache); /* the table factory holds its own reference */
    return opts;
}

static rocksdb_t *store_open_db(const char *path, int compression,
                                rocksdb_column_family_handle_t **handles, char **err)
{
    rocksdb_options_t *opts = store_make_options(compression);
    const rocksdb_options_t *cf_opts[STORE_NUM_HANDLES];
    for (int i = 0; i < STORE_NUM_HANDLES; i++)
        cf_opts[i] = opts;
    rocksdb_t *db = rocksdb_open_column_families(opts, path, STORE_NUM_HANDLES, store_cf_names,
                                                 cf_opts, handles, err);
    rocksdb_options_destroy(opts);
    return db;
}

int store_open(const char *path, struct store **out)
{
    int rc = KR_ENOMEM;
    char *err = NULL;
    rocksdb_pinnableslice_t *applied = NULL;
    struct store *store = calloc(1, sizeof(*store));
    if (store == NULL)
        goto out;
    store->path = strdup(path);
    if (store->path == NULL || asprintf(&store->flush_dir, "%s/%s", path, STORE_FLUSH_DIR) < 0) {
        store->flush_dir = NULL;
        goto out;
    }

    store->db = store_open_db(path, rocksdb_lz4_compression, store->cf, &err);
    if (err != NULL && strstr(err, "Compression type") != NULL) {
        log_warn("open %s: lz4 unavailable (%s), storing uncompressed", path, err);
        rocksdb_free(err);
        err = NULL;
        store->db = store_open_db(path, rocksdb_no_compression, store->cf, &err);
    }
    if (err != NULL) {
        if (strstr(err, "lock") != NULL || strstr(err, "LOCK") != NULL)
            log_error("open %s: %s (already in use by another keyraftd?)", path, err);
        else
            log_error("open %s: %s", path, err);
        rc = KR_EIO;
        goto out;
    }
    store->read_opts = rocksdb_readoptions_create();
    store->write_opts = rocksdb_writeoptions_create();
    /* Durability comes from the raft log: entries past the applied index are
     * replayed after a crash. */
    rocksdb_writeoptions_disable_WAL(store->write_opts, 1);

    /* A checkpoint left by a crash inside store_flush only pins old files. */
    rc = store_remove_flat_dir(store->flush_dir);
    if (rc != 0)
        goto out;

    applied = rocksdb_get_pinned_cf(store->db, store->read_opts, store_handle(store, STORE_CF_META),
                                    store_applied_key, sizeof(store_applied_key), &err);
    if (err != NULL) {
        log_error("open %s: read applied index: %s", path, err);
        rc = KR_EIO;
        goto out;
    }
    if (applied != NULL) {
        size_t len = 0;
        const char *v = rocksdb_pinnableslice_value(applied, &len);
        if (len != 8) {
            log_error("open %s: applied index record is %zu bytes, expected 8", path, len);
            rc = KR_EIO;
            goto out;
        }
        store->applied = store_get_be64((const uint8_t *)v);
    }
    log_info("opened %s at applied index %" PRIu64, path, store->applied);
    *out = store;
    store = NULL;
    rc = 0;
out:
    rocksdb_pinnableslice_destroy(applied);
    rocksdb_free(err);
    if (store != NULL) {
        /* Nothing was written: no flush needed before closing. */
        for (int i = 0; i < STORE_NUM_HANDLES; i++)
            if (store->cf[i] != NULL)
                rocksdb_column_family_handle_destroy(store->cf[i]);
        if (store->db != NULL)
            rocksdb_close(store->db);
        if (store->read_opts != NULL)
            rocksdb_readoptions_destroy(store->read_opts);
        if (store->write_opts != NULL)
            rocksdb_writeoptions_destroy(store->write_opts);
        free(store->flush_dir);
        free(store->path);
        free(store);
    }
    return rc;
}

void store_close(struct store *store)
{
    if (store == NULL)
        return;
    /* The WAL is off, so memtables are the only copy of recent commits:
     * flush every family (atomically) so a clean shutdown loses nothing and
     * the next start replays no entries. RocksDB's own shutdown flush would
     * do the same, but this way a failure is logged with context. */
    if (store_flush(store) != 0)
        log_error("close %s: final flush failed, entries past the last flush will be replayed",
                  store->path);
    /* Debian's RocksDB asserts that every handle is gone before close. */
    for (int i = 0; i < STORE_NUM_HANDLES; i++)
        rocksdb_column_family_handle_destroy(store->cf[i]);
    rocksdb_close(store->db);
    rocksdb_readoptions_destroy(store->read_opts);
    rocksdb_writeoptions_destroy(store->write_opts);
    free(store->flush_dir);
    free(store->path);
    free(store);
}

uint64_t store_applied_index(const struct store *store)
{
    return __atomic_load_n(&store->applied, __ATOMIC_ACQUIRE);
}

int store_get(struct store *store, enum store_cf cf, const void *key, size_t key_len,
              uint8_t **out_value, size_t *out_len)
{
    if (!store_cf_valid(cf))
        return KR_EINVAL;
    int rc = KR_EIO;
    char *err = NULL;
    rocksdb_pinnableslice_t *slice = rocksdb_get_pinned_cf(
        store->db, store->read_opts, store_handle(store, cf), key, key_len, &err);
    if (err != NULL) {
        log_error("get %s: %s", store_cf_name(cf), err);
        goto out;
    }
    if (slice == NULL) {
        rc = KR_ENOTFOUND;
        goto out;
    }
    size_t len = 0;
    const char *v = rocksdb_pinnableslice_value(slice, &len);
    uint8_t *copy = malloc(len > 0 ? len : 1); /* non-NULL even for an empty value */
    if (copy == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    if (len > 0)
        memcpy(copy, v, len);
    *out_value = copy;
    *out_len = len;
    rc = 0;
out:
    rocksdb_pinnableslice_destroy(slice);
    rocksdb_free(err);
    return rc;
}

struct store_batch *store_batch_new(void) { return calloc(1, sizeof(struct store_batch)); }

void store_batch_free(struct store_batch *batch)
{
    if (batch == NULL)
        return;
    free(batch->ops);
    free(batch->data);
    free(batch);
}

/* Appends |len| bytes to the batch arena; returns their offset or SIZE_MAX. */
static size_t store_batch_append(struct store_batch *batch, const void *p, size_t len)
{
    if (len > SIZE_MAX / 2 - batch->len)
        return SIZE_MAX;
    if (batch->len + len > batch->cap) {
        size_t cap = batch->cap > 0 ? batch->cap : 256;
        while (cap < batch->len + len)
            cap *= 2;
        uint8_t *data = realloc(batch->data, cap);
        if (data == NULL)
            return SIZE_MAX;
        batch->data = data;
        batch->cap = cap;
    }
    size_t off = batch->len;
    if (len > 0)
        memcpy(batch->data + off, p, len);
    batch->len += len;
    return off;
}

static void store_batch_add(struct store_batch *batch, enum batch_op_kind kind, enum store_cf cf,
                            const void *key, size_t key_len, const void *value, size_t value_len)
{
    if (batch->err != 0)
        return;
    if (!store_cf_valid(cf)) {
        log_error("batch: column family %d out of range", (int)cf);
        batch->err = KR_EINVAL;
        return;
    }
    if (batch->n_ops == batch->cap_ops) {
        size_t cap = batch->cap_ops > 0 ? batch->cap_ops * 2 : 16;
        struct batch_op *ops = reallocarray(batch->ops, cap, sizeof(*ops));
        if (ops == NULL) {
            batch->err = KR_ENOMEM;
            return;
        }
        batch->ops = ops;
        batch->cap_ops = cap;
    }
    struct batch_op op = {.kind = kind, .cf = cf, .key_len = key_len, .value_len = value_len};
    op.key_off = store_batch_append(batch, key, key_len);
    op.value_off = op.key_off == SIZE_MAX ? SIZE_MAX : store_batch_append(batch, value, value_len);
    if (op.value_off == SIZE_MAX) {
        batch->err = KR_ENOMEM;
        return;
    }
    batch->ops[batch->n_ops++] = op;
}

void store_batch_put(struct store_batch *batch, enum store_cf cf, const void *key,
                     size_t key_len, const void *value, size_t value_len)
{
    store_batch_add(batch, BATCH_OP_PUT, cf, key, key_len, value, value_len);
}

void store_batch_delete(struct store_batch *batch, enum store_cf cf, const void *key,
                        size_t key_len)
{
    store_batch_add(batch, BATCH_OP_DELETE, cf, key, key_len, NULL, 0);
}

int store_batch_commit(struct store *store, struct store_batch *batch, uint64_t applied_index)
{
    if (batch->err != 0) {
        log_error("commit at index %" PRIu64 ": batch is incomplete (%s)", applied_index,
                  batch->err == KR_EINVAL ? "bad column family" : "out of memory");
        return batch->err;
    }
    int rc = KR_EIO;
    char *err = NULL;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    for (size_t i = 0; i < batch->n_ops; i++) {
        const struct batch_op *op = &batch->ops[i];
        const char *key = (const char *)batch->data + op->key_off;
        if (op->kind == BATCH_OP_PUT)
            rocksdb_writebatch_put_cf(wb, store_handle(store, op->cf), key, op->key_len,
                                      (const char *)batch->data + op->value_off, op->value_len);
        else
            rocksdb_writebatch_delete_cf(wb, store_handle(store, op->cf), key, op->key_len);
    }
    uint8_t idx[8];
    store_put_be64(idx, applied_index);
    rocksdb_writebatch_put_cf(wb, store_handle(store, STORE_CF_META), store_applied_key,
                              sizeof(store_applied_key), (const char *)idx, sizeof(idx));
    rocksdb_write(store->db, store->write_opts, wb, &err);
    if (err != NULL) {
        log_error("commit %zu operations at index %" PRIu64 ": %s", batch->n_ops, applied_index,
                  err);
        goto out;
    }
    __atomic_store_n(&store->applied, applied_index, __ATOMIC_RELEASE);
    rc = 0;
out:
    rocksdb_free(err);
    rocksdb_writebatch_destroy(wb);
    return rc;
}

/* 1 when some family holds entries not yet in an SST, 0 when none, <0 on error. */
static int store_has_unflushed(struct store *store)
{
    static const char *const props[] = {"rocksdb.num-entries-active-mem-table",
                                        "rocksdb.num-entries-imm-mem-tables"};
    for (int i = 0; i < STORE_NUM_HANDLES; i++) {
        for (size_t p = 0; p < sizeof(props) / sizeof(props[0]); p++) {
            uint64_t n = 0;
            if (rocksdb_property_int_cf(store->db, store->cf[i], props[p], &n) != 0) {
                log_error("flush %s: property %s of %s unavailable", store->path, props[p],
                          store_cf_names[i]);
                return KR_EIO;
            }
            if (n > 0)
                return 1;
        }
    }
    return 0;
}

/* RocksDB 7.8's C API has no multi-family flush, and a per-family flush with
 * atomic_flush flushes only that family, which could persist data without
 * its applied index. A checkpoint with log_size_for_flush = 0 flushes all
 * families atomically and waits; the checkpoint itself (hard links in the DB
 * dir) is then removed. */
int store_flush(struct store *store)
{
    int dirty = store_has_unflushed(store);
    if (dirty <= 0)
        return dirty;
    int rc = store_remove_flat_dir(store->flush_dir);
    if (rc != 0)
        return rc;
    rc = KR_EIO;
    char *err = NULL;
    rocksdb_checkpoint_t *cp = rocksdb_checkpoint_object_create(store->db, &err);
    if (err != NULL) {
        log_error("flush %s: checkpoint object: %s", store->path, err);
        goto out;
    }
    rocksdb_checkpoint_create(cp, store->flush_dir, 0, &err);
    if (err != NULL) {
        log_error("flush %s: checkpoint: %s", store->path, err);
        goto out;
    }
    rc = store_remove_flat_dir(store->flush_dir);
out:
    if (cp != NULL)
        rocksdb_checkpoint_object_destroy(cp);
    rocksdb_free(err);
    return rc;
}

static char *store_dup_bytes(const void *p, size_t len)
{
    char *copy = malloc(len > 0 ? len : 1);
    if (copy != NULL && len > 0)
        memcpy(copy, p, len);
    return copy;
}

int store_iter_new(struct store *store, enum store_cf cf, const void *lower, size_t lower_len,
                   const void *upper, size_t upper_len, struct store_iter **out)
{
    if (!store_cf_valid(cf))
        return KR_EINVAL;
    int rc = KR_ENOMEM;
    struct store_iter *iter = calloc(1, sizeof(*iter));
    if (iter == NULL)
        goto out;
    iter->db = store->db;
    if (lower != NULL && (iter->lower = store_dup_bytes(lower, lower_len)) == NULL)
        goto out;
    if (upper != NULL && (iter->upper = store_dup_bytes(upper, upper_len)) == NULL)
        goto out;
    iter->opts = rocksdb_readoptions_create();
    iter->snapshot = rocksdb_create_snapshot(store->db);
    rocksdb_readoptions_set_snapshot(iter->opts, iter->snapshot);
    if (iter->lower != NULL)
        rocksdb_readoptions_set_iterate_lower_bound(iter->opts, iter->lower, lower_len);
    if (iter->upper != NULL)
        rocksdb_readoptions_set_iterate_upper_bound(iter->opts, iter->upper, upper_len);
    iter->it = rocksdb_create_iterator_cf(store->db, iter->opts, store_handle(store, cf));
    if (iter->lower != NULL)
        rocksdb_iter_seek(iter->it, iter->lower, lower_len);
    else
        rocksdb_iter_seek_to_first(iter->it);
    char *err = NULL;
    rocksdb_iter_get_error(iter->it, &err);
    if (err != NULL) {
        log_error("iterate %s: seek: %s", store_cf_name(cf), err);
        rocksdb_free(err);
        rc = KR_EIO;
        goto out;
    }
    *out = iter;
    iter = NULL;
    rc = 0;
out:
    store_iter_free(iter);
    return rc;
}

int store_iter_valid(const struct store_iter *iter)
{
    return iter->err == 0 && rocksdb_iter_valid(iter->it) ? 1 : 0;
}

void store_iter_next(struct store_iter *iter)
{
    if (!store_iter_valid(iter))
        return;
    rocksdb_iter_next(iter->it);
    char *err = NULL;
    rocksdb_iter_get_error(iter->it, &err);
    if (err != NULL) {
        log_error("iterate: next: %s", err);
        rocksdb_free(err);
        iter->err = KR_EIO;
    }
}

int store_iter_status(const struct store_iter *iter) { return iter->err; }

const uint8_t *store_iter_key(const struct store_iter *iter, size_t *len)
{
    *len = 0;
    if (!store_iter_valid(iter))
        return NULL;
    return (const uint8_t *)rocksdb_iter_key(iter->it, len);
}

const uint8_t *store_iter_value(const struct store_iter *iter, size_t *len)
{
    *len = 0;
    if (!store_iter_valid(iter))
        return NULL;
    return (const uint8_t *)rocksdb_iter_value(iter->it, len);
}

void store_iter_free(struct store_iter *iter)
{
    if (iter == NULL)
        return;
    /* The iterator points into opts and the bound buffers: it goes first. */
    if (iter->it != NULL)
        rocksdb_iter_destroy(iter->it);
    if (iter->snapshot != NULL)
        rocksdb_release_snapshot(iter->db, iter->snapshot);
    if (iter->opts != NULL)
        rocksdb_readoptions_destroy(iter->opts);
    free(iter->lower);
    free(iter->upper);
    free(iter);
}

uint64_t store_estimate_count(struct store *store, enum store_cf cf)
{
    uint64_t n = 0;
    if (!store_cf_valid(cf))
        return 0;
    if (rocksdb_property_int_cf(store->db, store_handle(store, cf), "rocksdb.estimate-num-keys",
                                &n) != 0) {
        log_warn("estimate count of %s unavailable", store_cf_name(cf));
        return 0;
    }
    return n;
}
