/* store.c: the RocksDB column-family store under the FSM, WAL off, applied index in every batch. */
#include "store.h"

#define KR_LOG_MODULE "store"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <rocksdb/c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
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
#define STORE_MEMTABLE_BLOOM_RATIO 0.02 /* of the write buffer (64 MB): 1.3 MB a memtable */
#define STORE_MAX_OPEN_FILES 512
#define STORE_SWAP_FLUSH_WAIT_MS 60000u
/* Directory inside the DB dir that store_flush's checkpoint goes through. */
#define STORE_FLUSH_DIR "flush-checkpoint"
#define STORE_PREFLUSH_DIR "preflush-checkpoint"
/* Where store_swap parks the replaced DB dir (next to it) until the new one is open. */
#define STORE_OLD_SUFFIX ".old"

struct store {
    rocksdb_t *db;
    rocksdb_column_family_handle_t *cf[STORE_NUM_HANDLES];
    rocksdb_readoptions_t *read_opts;
    rocksdb_writeoptions_t *write_opts;
    char *path;
    char *flush_dir;
    uint64_t applied; /* accessed with __atomic: read from any thread */
    uint64_t generation[STORE_CF_COUNT]; /* __atomic: see store_cf_generation */
    unsigned n_iters;    /* open iterators (__atomic): store_swap refuses while any */
    unsigned n_preflush; /* held preflushes (__atomic): store_swap waits for them */
};

static void store_bump_all(struct store *store)
{
    for (int cf = 0; cf < STORE_CF_COUNT; cf++)
        __atomic_add_fetch(&store->generation[cf], 1, __ATOMIC_RELEASE);
}

enum batch_op_kind { BATCH_OP_PUT, BATCH_OP_DELETE, BATCH_OP_DELETE_RANGE };

struct batch_op {
    enum batch_op_kind kind;
    enum store_cf cf;
    size_t key_off, key_len;     /* a range's first key */
    size_t value_off, value_len; /* a range's end (excluded) */
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
    struct store *store;
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

static int store_remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if ((flag == FTW_DP ? rmdir(path) : unlink(path)) != 0) {
        log_error("remove %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int store_remove_dir(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT)
            return 0;
        log_error("remove %s: %s", path, strerror(errno));
        return KR_EIO;
    }
    /* Depth first, never following links; stops at the first failure (logged). */
    if (nftw(path, store_remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        return KR_EIO;
    return 0;
}

/* fsync of the directory holding |path|, so renames in it are durable. */
static int store_sync_parent(const char *path)
{
    char *copy = strdup(path);
    if (copy == NULL)
        return KR_ENOMEM;
    char *slash = strrchr(copy, '/');
    const char *parent = ".";
    if (slash == copy)
        parent = "/";
    else if (slash != NULL) {
        *slash = '\0';
        parent = copy;
    }
    int rc = KR_EIO;
    int fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0)
        log_error("sync directory %s: %s", parent, strerror(errno));
    else
        rc = 0;
    if (fd >= 0)
        close(fd);
    free(copy);
    return rc;
}

/* Shared by every family (RocksDB copies what it keeps). */
static rocksdb_options_t *store_make_options(int compression, int create)
{
    rocksdb_options_t *opts = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(opts, create);
    rocksdb_options_set_create_missing_column_families(opts, create);
    /* With the WAL off, only an atomic flush keeps the applied index in the
     * meta family consistent with the data in the others. */
    rocksdb_options_set_atomic_flush(opts, 1);
    rocksdb_options_set_max_open_files(opts, STORE_MAX_OPEN_FILES);
    rocksdb_options_set_max_background_jobs(opts, 4);
    rocksdb_options_set_level_compaction_dynamic_level_bytes(opts, 1);
    rocksdb_options_set_keep_log_file_num(opts, 5);
    rocksdb_options_set_max_log_file_size(opts, 16u << 20);
    rocksdb_options_set_compression(opts, compression);
    /* A bloom filter over each memtable's whole keys: a create looks up
     * names, request ids and key ids that mostly do not exist yet, and each
     * such miss walked the memtable's skiplist (28% of a leader loading keys
     * went to memtable lookups). The whole key is the "prefix" (noop
     * transform); iterators therefore ask for total order (store_iter_new). */
    rocksdb_options_set_prefix_extractor(opts, rocksdb_slicetransform_create_noop());
    rocksdb_options_set_memtable_prefix_bloom_size_ratio(opts, STORE_MEMTABLE_BLOOM_RATIO);

    rocksdb_cache_t *cache = rocksdb_cache_create_lru(STORE_BLOCK_CACHE_BYTES);
    rocksdb_block_based_table_options_t *table = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(table, cache);
    /* The table options take ownership of the filter policy. */
    rocksdb_block_based_options_set_filter_policy(
        table, rocksdb_filterpolicy_create_bloom_full(STORE_BLOOM_BITS));
    /* Filters and indexes live in each open table reader, not in the block
     * cache: a create's lookups are mostly misses answered by filters, and
     * through the cache each probe took a shard lock and a hash lookup, and a
     * filter larger than a shard was re-read at every probe. Held this way
     * they cost memory once per open SST: ~10 bits a row of filter plus the
     * index, ~40 MB a node at 10M keys. Past STORE_MAX_OPEN_FILES tables (about
     * 30 GB of SSTs) readers are evicted and a reopened one reads its filter
     * and index whole again. */
    rocksdb_block_based_options_set_cache_index_and_filter_blocks(table, 0);
    rocksdb_options_set_block_based_table_factory(opts, table);
    rocksdb_block_based_options_destroy(table);
    rocksdb_cache_destroy(cache); /* the table factory holds its own reference */
    return opts;
}

/* CREATE makes what is missing (store_open); EXISTING and READ_ONLY need a
 * complete database with every family (a swapped-in or probed copy). */
enum store_open_mode { STORE_OPEN_CREATE, STORE_OPEN_EXISTING, STORE_OPEN_READ_ONLY };

static rocksdb_t *store_open_db(const char *path, int compression, enum store_open_mode mode,
                                rocksdb_column_family_handle_t **handles, char **err)
{
    rocksdb_options_t *opts = store_make_options(compression, mode == STORE_OPEN_CREATE);
    const rocksdb_options_t *cf_opts[STORE_NUM_HANDLES];
    for (int i = 0; i < STORE_NUM_HANDLES; i++)
        cf_opts[i] = opts;
    rocksdb_t *db;
    if (mode == STORE_OPEN_READ_ONLY)
        db = rocksdb_open_for_read_only_column_families(opts, path, STORE_NUM_HANDLES,
                                                        store_cf_names, cf_opts, handles, 0, err);
    else
        db = rocksdb_open_column_families(opts, path, STORE_NUM_HANDLES, store_cf_names, cf_opts,
                                          handles, err);
    rocksdb_options_destroy(opts);
    return db;
}

/* Destroys the family handles, then closes (Debian's RocksDB asserts that
 * order). Accepts a partly opened pair. */
static void store_close_db(rocksdb_t **db, rocksdb_column_family_handle_t **handles)
{
    for (int i = 0; i < STORE_NUM_HANDLES; i++) {
        if (handles[i] != NULL)
            rocksdb_column_family_handle_destroy(handles[i]);
        handles[i] = NULL;
    }
    if (*db != NULL)
        rocksdb_close(*db);
    *db = NULL;
}

/* The applied index recorded in |db| (0 when none was ever written). */
static int store_read_applied(rocksdb_t *db, rocksdb_column_family_handle_t *meta,
                              const rocksdb_readoptions_t *read_opts, const char *path,
                              uint64_t *out)
{
    int rc = KR_EIO;
    char *err = NULL;
    rocksdb_pinnableslice_t *applied = rocksdb_get_pinned_cf(
        db, read_opts, meta, store_applied_key, sizeof(store_applied_key), &err);
    if (err != NULL) {
        log_error("open %s: read applied index: %s", path, err);
        goto out;
    }
    uint64_t v = 0;
    if (applied != NULL) {
        size_t len = 0;
        const char *p = rocksdb_pinnableslice_value(applied, &len);
        if (len != 8) {
            log_error("open %s: applied index record is %zu bytes, expected 8", path, len);
            goto out;
        }
        v = store_get_be64((const uint8_t *)p);
    }
    *out = v;
    rc = 0;
out:
    rocksdb_pinnableslice_destroy(applied);
    rocksdb_free(err);
    return rc;
}

/* Opens store->path into store->db and store->cf and loads the applied
 * index. On failure both are left NULL. */
static int store_attach(struct store *store, enum store_open_mode mode)
{
    const char *path = store->path;
    char *err = NULL;
    int rc = KR_EIO;
    store->db = store_open_db(path, rocksdb_lz4_compression, mode, store->cf, &err);
    if (err != NULL && strstr(err, "Compression type") != NULL) {
        log_warn("open %s: lz4 unavailable (%s), storing uncompressed", path, err);
        rocksdb_free(err);
        err = NULL;
        store->db = store_open_db(path, rocksdb_no_compression, mode, store->cf, &err);
    }
    if (err != NULL) {
        if (strstr(err, "lock") != NULL || strstr(err, "LOCK") != NULL)
            log_error("open %s: %s (already in use by another keyraftd?)", path, err);
        else
            log_error("open %s: %s", path, err);
        goto out;
    }
    /* A checkpoint left by a crash inside store_flush only pins old files. */
    rc = store_remove_dir(store->flush_dir);
    char *preflush = NULL;
    if (rc == 0 && asprintf(&preflush, "%s/%s", path, STORE_PREFLUSH_DIR) < 0)
        rc = KR_ENOMEM;
    if (rc == 0)
        rc = store_remove_dir(preflush);
    free(preflush);
    if (rc != 0)
        goto out;
    uint64_t applied = 0;
    rc = store_read_applied(store->db, store_handle(store, STORE_CF_META), store->read_opts, path,
                            &applied);
    if (rc != 0)
        goto out;
    __atomic_store_n(&store->applied, applied, __ATOMIC_RELEASE);
out:
    store_bump_all(store); /* new data, or none: caches start over */
    rocksdb_free(err);
    if (rc != 0)
        store_close_db(&store->db, store->cf); /* nothing written: no flush needed */
    return rc;
}

/* Finishes a store_swap that a crash interrupted: with the DB dir missing,
 * the parked old one goes back (the new one never got in place); with both
 * present, the swap had completed and the old one is garbage. */
static int store_recover_swap(const char *path)
{
    char *old = NULL;
    if (asprintf(&old, "%s%s", path, STORE_OLD_SUFFIX) < 0)
        return KR_ENOMEM;
    int rc = 0;
    struct stat st;
    if (lstat(old, &st) != 0)
        goto out; /* no swap was under way */
    if (lstat(path, &st) != 0 && errno == ENOENT) {
        log_warn("open %s: an interrupted swap left it at %s; moving it back", path, old);
        if (rename(old, path) != 0) {
            log_error("open %s: move back %s: %s", path, old, strerror(errno));
            rc = KR_EIO;
            goto out;
        }
        rc = store_sync_parent(path);
    } else {
        log_warn("open %s: removing %s left by an interrupted swap", path, old);
        rc = store_remove_dir(old);
    }
out:
    free(old);
    return rc;
}

int store_open(const char *path, struct store **out)
{
    int rc = KR_ENOMEM;
    struct store *store = calloc(1, sizeof(*store));
    if (store == NULL)
        goto out;
    store->path = strdup(path);
    if (store->path == NULL || asprintf(&store->flush_dir, "%s/%s", path, STORE_FLUSH_DIR) < 0) {
        store->flush_dir = NULL;
        goto out;
    }
    store->read_opts = rocksdb_readoptions_create();
    store->write_opts = rocksdb_writeoptions_create();
    /* Durability comes from the raft log: entries past the applied index are
     * replayed after a crash. */
    rocksdb_writeoptions_disable_WAL(store->write_opts, 1);
    rc = store_recover_swap(path);
    if (rc != 0)
        goto out;
    rc = store_attach(store, STORE_OPEN_CREATE);
    if (rc != 0)
        goto out;
    log_info("opened %s at applied index %" PRIu64, path, store->applied);
    *out = store;
    store = NULL;
out:
    if (store != NULL) {
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

/* 0 while the store holds an open DB; KR_EIO (logged) after a swap that
 * could not reopen anything. */
static int store_check_open(const struct store *store, const char *what)
{
    if (store->db != NULL)
        return 0;
    log_error("%s %s: the store is closed (a database swap failed)", what, store->path);
    return KR_EIO;
}

void store_close(struct store *store)
{
    if (store == NULL)
        return;
    /* The WAL is off, so memtables are the only copy of recent commits:
     * flush every family (atomically) so a clean shutdown loses nothing and
     * the next start replays no entries. RocksDB's own shutdown flush would
     * do the same, but this way a failure is logged with context. */
    if (store->db != NULL && store_flush(store) != 0)
        log_error("close %s: final flush failed, entries past the last flush will be replayed",
                  store->path);
    store_close_db(&store->db, store->cf);
    rocksdb_readoptions_destroy(store->read_opts);
    rocksdb_writeoptions_destroy(store->write_opts);
    free(store->flush_dir);
    free(store->path);
    free(store);
}

uint64_t store_cf_generation(const struct store *store, enum store_cf cf)
{
    return (unsigned)cf < STORE_CF_COUNT ? __atomic_load_n(&store->generation[cf], __ATOMIC_ACQUIRE)
                                         : 0;
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
    int rc = store_check_open(store, "get");
    if (rc != 0)
        return rc;
    rc = KR_EIO;
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

struct key_list {
    const uint8_t *const *keys;
    const size_t *lens;
};

/* Bytewise order, the order of every family here (RocksDB's default
 * comparator); ties by position, so the sort is deterministic. */
static int key_index_cmp(const void *pa, const void *pb, void *arg)
{
    const struct key_list *kl = arg;
    size_t a = *(const size_t *)pa, b = *(const size_t *)pb;
    size_t la = kl->lens[a], lb = kl->lens[b];
    int c = la && lb ? memcmp(kl->keys[a], kl->keys[b], la < lb ? la : lb) : 0;
    if (c == 0 && la != lb)
        c = la < lb ? -1 : 1;
    return c != 0 ? c : (a > b) - (a < b);
}

int store_multi_get(struct store *store, enum store_cf cf, size_t n, const uint8_t *const *keys,
                    const size_t *key_lens, struct store_value *out)
{
    if (!store_cf_valid(cf) || (n > 0 && (keys == NULL || key_lens == NULL || out == NULL)))
        return KR_EINVAL;
    int rc = store_check_open(store, "multi-get");
    if (rc != 0 || n == 0)
        return rc;
    /* RocksDB sorts unsorted keys itself, through its comparator's virtual
     * calls (7% of a follower's apply in a bulk load, a third of the
     * multi-get); keys handed over in order skip that. */
    rocksdb_pinnableslice_t **slices = calloc(n, sizeof(*slices));
    char **errs = calloc(n, sizeof(*errs));
    size_t *order = reallocarray(NULL, n, sizeof(*order));
    const char **sorted_keys = reallocarray(NULL, n, sizeof(*sorted_keys));
    size_t *sorted_lens = reallocarray(NULL, n, sizeof(*sorted_lens));
    if (slices == NULL || errs == NULL || order == NULL || sorted_keys == NULL ||
        sorted_lens == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    struct key_list kl = {keys, key_lens};
    qsort_r(order, n, sizeof(*order), key_index_cmp, &kl);
    for (size_t i = 0; i < n; i++) {
        sorted_keys[i] = (const char *)keys[order[i]];
        sorted_lens[i] = key_lens[order[i]];
    }
    rocksdb_batched_multi_get_cf(store->db, store->read_opts, store_handle(store, cf), n,
                                 sorted_keys, sorted_lens, slices, errs, true);
    for (size_t i = 0; i < n; i++) {
        struct store_value *v = &out[order[i]];
        *v = (struct store_value){.status = KR_ENOTFOUND};
        if (errs[i] != NULL) {
            log_error("multi-get %s: %s", store_cf_name(cf), errs[i]);
            v->status = KR_EIO;
        } else if (slices[i] != NULL) {
            size_t len = 0;
            const char *data = rocksdb_pinnableslice_value(slices[i], &len);
            v->data = malloc(len > 0 ? len : 1);
            v->status = v->data != NULL ? 0 : KR_ENOMEM;
            if (v->data != NULL && len > 0)
                memcpy(v->data, data, len);
            v->len = v->data != NULL ? len : 0;
        }
        rocksdb_pinnableslice_destroy(slices[i]);
        rocksdb_free(errs[i]);
    }
out:
    free(slices);
    free(errs);
    free(order);
    free(sorted_keys);
    free(sorted_lens);
    return rc;
}

void store_values_clear(struct store_value *values, size_t n)
{
    for (size_t i = 0; values != NULL && i < n; i++) {
        free(values[i].data);
        values[i] = (struct store_value){.status = KR_ENOTFOUND};
    }
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

void store_batch_delete_range(struct store_batch *batch, enum store_cf cf, const void *start,
                              size_t start_len, const void *end, size_t end_len)
{
    store_batch_add(batch, BATCH_OP_DELETE_RANGE, cf, start, start_len, end, end_len);
}

static int batch_op_cmp(const void *pa, const void *pb, void *arg)
{
    const struct store_batch *batch = arg;
    const struct batch_op *a = &batch->ops[*(const size_t *)pa];
    const struct batch_op *b = &batch->ops[*(const size_t *)pb];
    int a_range = a->kind == BATCH_OP_DELETE_RANGE, b_range = b->kind == BATCH_OP_DELETE_RANGE;
    if (a_range != b_range)
        return a_range ? -1 : 1; /* ranges first (store_batch_delete_range) */
    if (!a_range) {
        if (a->cf != b->cf)
            return a->cf < b->cf ? -1 : 1;
        size_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
        int c = n > 0 ? memcmp(batch->data + a->key_off, batch->data + b->key_off, n) : 0;
        if (c != 0)
            return c;
        if (a->key_len != b->key_len)
            return a->key_len < b->key_len ? -1 : 1;
    }
    /* Ranges, and writes of the same key: the order recorded, so the last
     * write still wins. */
    size_t ia = *(const size_t *)pa, ib = *(const size_t *)pb;
    return (ia > ib) - (ia < ib);
}

/* The batch's operations in (family, key) order, ties in recorded order;
 * NULL for none or out of memory. A memtable skiplist insert starts from
 * where the previous one ended: keys in order find their place in a few
 * steps, while scattered ones (names, request ids, keys from before ids
 * were time-ordered) walk the whole height, a cache miss per level (memtable
 * inserts were a third of a loaded cluster's CPU). The ops are one atomic
 * batch, so their order is free. */
static size_t *batch_sorted_order(struct store_batch *batch)
{
    if (batch->n_ops == 0)
        return NULL;
    size_t *order = reallocarray(NULL, batch->n_ops, sizeof(*order));
    if (order == NULL)
        return NULL;
    for (size_t i = 0; i < batch->n_ops; i++)
        order[i] = i;
    qsort_r(order, batch->n_ops, sizeof(*order), batch_op_cmp, batch);
    return order;
}

int store_batch_commit(struct store *store, struct store_batch *batch, uint64_t applied_index)
{
    if (batch->err != 0) {
        log_error("commit at index %" PRIu64 ": batch is incomplete (%s)", applied_index,
                  batch->err == KR_EINVAL ? "bad column family" : "out of memory");
        return batch->err;
    }
    int rc = store_check_open(store, "commit");
    if (rc != 0)
        return rc;
    size_t *order = batch_sorted_order(batch);
    if (order == NULL && batch->n_ops > 0) {
        log_error("commit at index %" PRIu64 ": out of memory ordering %zu operations",
                  applied_index, batch->n_ops);
        return KR_ENOMEM;
    }
    rc = KR_EIO;
    char *err = NULL;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    for (size_t i = 0; i < batch->n_ops; i++) {
        const struct batch_op *op = &batch->ops[order[i]];
        const char *key = (const char *)batch->data + op->key_off;
        if (op->kind == BATCH_OP_PUT)
            rocksdb_writebatch_put_cf(wb, store_handle(store, op->cf), key, op->key_len,
                                      (const char *)batch->data + op->value_off, op->value_len);
        else if (op->kind == BATCH_OP_DELETE)
            rocksdb_writebatch_delete_cf(wb, store_handle(store, op->cf), key, op->key_len);
        else
            rocksdb_writebatch_delete_range_cf(wb, store_handle(store, op->cf), key, op->key_len,
                                               (const char *)batch->data + op->value_off,
                                               op->value_len);
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
    unsigned touched = 0;
    for (size_t i = 0; i < batch->n_ops; i++)
        touched |= 1u << batch->ops[i].cf;
    for (int cf = 0; cf < STORE_CF_COUNT; cf++)
        if (touched & (1u << cf))
            __atomic_add_fetch(&store->generation[cf], 1, __ATOMIC_RELEASE);
    rc = 0;
out:
    rocksdb_free(err);
    rocksdb_writebatch_destroy(wb);
    free(order);
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

/* Makes a checkpoint of the open DB in |dir| (absent). log_size_for_flush =
 * 0 makes RocksDB flush every family first, atomically (atomic_flush), and
 * wait: the checkpoint holds everything committed, with its applied index.
 * SST files are hard links, so |dir| must be on the DB's filesystem. */
static int store_make_checkpoint(struct store *store, const char *dir, const char *what)
{
    int rc = KR_EIO;
    char *err = NULL;
    rocksdb_checkpoint_t *cp = rocksdb_checkpoint_object_create(store->db, &err);
    if (err != NULL) {
        log_error("%s %s: checkpoint object: %s", what, store->path, err);
        goto out;
    }
    rocksdb_checkpoint_create(cp, dir, 0, &err);
    if (err != NULL) {
        log_error("%s %s: checkpoint into %s: %s", what, store->path, dir, err);
        goto out;
    }
    rc = 0;
out:
    if (cp != NULL)
        rocksdb_checkpoint_object_destroy(cp);
    rocksdb_free(err);
    return rc;
}

/* RocksDB 7.8's C API has no multi-family flush, and a per-family flush with
 * atomic_flush flushes only that family, which could persist data without
 * its applied index. A checkpoint flushes all families atomically and waits;
 * the checkpoint itself (hard links in the DB dir) is then removed. */
/* Flushes every family through a scratch checkpoint in |dir| (removed after). */
static int store_flush_through(struct store *store, const char *dir)
{
    int rc = store_remove_dir(dir);
    if (rc == 0)
        rc = store_make_checkpoint(store, dir, "flush");
    if (rc == 0)
        rc = store_remove_dir(dir);
    return rc;
}

int store_flush(struct store *store)
{
    int rc = store_check_open(store, "flush");
    if (rc != 0)
        return rc;
    int dirty = store_has_unflushed(store);
    if (dirty <= 0)
        return dirty;
    return store_flush_through(store, store->flush_dir);
}

void store_preflush_hold(struct store *store)
{
    __atomic_add_fetch(&store->n_preflush, 1, __ATOMIC_ACQ_REL);
}

void store_preflush_release(struct store *store)
{
    __atomic_sub_fetch(&store->n_preflush, 1, __ATOMIC_ACQ_REL);
}

int store_preflush(struct store *store)
{
    int rc = store_check_open(store, "flush");
    char *dir = NULL;
    if (rc == 0 && asprintf(&dir, "%s/%s", store->path, STORE_PREFLUSH_DIR) < 0)
        rc = KR_ENOMEM;
    if (rc != 0) {
        store_preflush_release(store);
        return rc;
    }
    rc = store_flush_through(store, dir);
    free(dir);
    store_preflush_release(store);
    return rc;
}

int store_checkpoint(struct store *store, const char *dir)
{
    int rc = store_check_open(store, "checkpoint");
    if (rc != 0)
        return rc;
    return store_make_checkpoint(store, dir, "checkpoint");
}

int store_probe(const char *dir, uint64_t *out_applied)
{
    rocksdb_column_family_handle_t *cf[STORE_NUM_HANDLES] = {NULL};
    rocksdb_readoptions_t *read_opts = NULL;
    char *err = NULL;
    int rc = KR_EIO;
    /* Compression only matters for writing; read-only never writes data. */
    rocksdb_t *db = store_open_db(dir, rocksdb_no_compression, STORE_OPEN_READ_ONLY, cf, &err);
    if (err != NULL) {
        log_error("probe %s: %s", dir, err);
        goto out;
    }
    read_opts = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(read_opts, 1);
    rocksdb_readoptions_set_total_order_seek(read_opts, 1); /* see the prefix extractor */
    rocksdb_readoptions_set_fill_cache(read_opts, 0);
    uint64_t applied = 0;
    rc = store_read_applied(db, cf[(int)STORE_CF_META + 1], read_opts, dir, &applied);
    if (rc != 0)
        goto out;
    /* Open checked that every file the MANIFEST names is there with its
     * size; reading every entry checks every block's checksum, so a copy
     * damaged in transfer is refused here rather than found later. */
    for (int i = 0; i < STORE_NUM_HANDLES; i++) {
        rocksdb_iterator_t *it = rocksdb_create_iterator_cf(db, read_opts, cf[i]);
        for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it))
            ;
        rocksdb_iter_get_error(it, &err);
        rocksdb_iter_destroy(it);
        if (err != NULL) {
            log_error("probe %s: reading family %s: %s", dir, store_cf_names[i], err);
            rc = KR_EIO;
            goto out;
        }
    }
    *out_applied = applied;
out:
    if (read_opts != NULL)
        rocksdb_readoptions_destroy(read_opts);
    store_close_db(&db, cf);
    rocksdb_free(err);
    return rc;
}

int store_swap(struct store *store, const char *new_db_dir)
{
    char *old = NULL;
    int rc = store_check_open(store, "swap");
    if (rc != 0)
        return rc;
    /* A snapshot's flush on a worker ends on its own (seconds at most):
     * wait for it rather than fail the restore. */
    uint64_t waited_ms = 0;
    while (__atomic_load_n(&store->n_preflush, __ATOMIC_ACQUIRE) != 0 &&
           waited_ms < STORE_SWAP_FLUSH_WAIT_MS) {
        nanosleep(&(struct timespec){.tv_nsec = 5 * 1000 * 1000}, NULL);
        waited_ms += 5;
    }
    if (waited_ms > 0)
        log_info("swap %s: waited %" PRIu64 " ms for a flush to end", store->path, waited_ms);
    unsigned iters = __atomic_load_n(&store->n_iters, __ATOMIC_ACQUIRE);
    unsigned flushes = __atomic_load_n(&store->n_preflush, __ATOMIC_ACQUIRE);
    if (iters != 0 || flushes != 0) {
        log_error("swap %s: %u iterators and %u flushes still open", store->path, iters,
                  flushes);
        return KR_EBUSY;
    }
    struct stat st;
    if (stat(new_db_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        log_error("swap %s: %s is not a directory", store->path, new_db_dir);
        return KR_EINVAL;
    }
    if (asprintf(&old, "%s%s", store->path, STORE_OLD_SUFFIX) < 0)
        return KR_ENOMEM;
    /* A stale one would make rename fail, or be mistaken for ours by store_open. */
    rc = store_remove_dir(old);
    if (rc != 0)
        goto out;
    /* The old DB must be complete on disk: it is what a failure restores. */
    rc = store_flush(store);
    if (rc != 0)
        goto out;
    uint64_t old_applied = store_applied_index(store);
    store_close_db(&store->db, store->cf);
    if (rename(store->path, old) != 0) {
        log_error("swap %s: move it to %s: %s", store->path, old, strerror(errno));
        rc = KR_EIO;
        goto reopen_old;
    }
    if (rename(new_db_dir, store->path) != 0) {
        log_error("swap %s: move %s in place: %s", store->path, new_db_dir, strerror(errno));
        rc = KR_EIO;
        goto put_back_old;
    }
    if (store_sync_parent(store->path) != 0 || store_attach(store, STORE_OPEN_EXISTING) != 0) {
        rc = KR_EIO;
        log_error("swap %s: the new database does not open; putting the old one back",
                  store->path);
        if (rename(store->path, new_db_dir) != 0) {
            log_error("swap %s: move the new database back to %s: %s; removing it",
                      store->path, new_db_dir, strerror(errno));
            /* With both present, store_open would keep the new one. */
            if (store_remove_dir(store->path) != 0)
                goto out;
        }
        goto put_back_old;
    }
    log_info("swapped %s: applied index %" PRIu64 " -> %" PRIu64, store->path, old_applied,
             store_applied_index(store));
    /* The swap is done: failing to clean up only costs space (store_open
     * retries the removal). */
    if (store_remove_dir(old) != 0)
        log_warn("swap %s: could not remove %s", store->path, old);
    rc = 0;
    goto out;

put_back_old:
    if (rename(old, store->path) != 0) {
        log_error("swap %s: move %s back: %s", store->path, old, strerror(errno));
        goto out; /* store_open puts it back */
    }
    store_sync_parent(store->path);
reopen_old:
    if (store_attach(store, STORE_OPEN_EXISTING) != 0)
        log_error("swap %s: the old database does not reopen either: the store is closed",
                  store->path);
out:
    free(old);
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
    int rc = store_check_open(store, "iterate");
    if (rc != 0)
        return rc;
    rc = KR_ENOMEM;
    struct store_iter *iter = calloc(1, sizeof(*iter));
    if (iter == NULL)
        goto out;
    iter->store = store;
    __atomic_add_fetch(&store->n_iters, 1, __ATOMIC_ACQ_REL);
    iter->db = store->db;
    if (lower != NULL && (iter->lower = store_dup_bytes(lower, lower_len)) == NULL)
        goto out;
    if (upper != NULL && (iter->upper = store_dup_bytes(upper, upper_len)) == NULL)
        goto out;
    iter->opts = rocksdb_readoptions_create();
    /* Keys in order across "prefixes": the extractor is there for the
     * memtable's point-lookup bloom only. */
    rocksdb_readoptions_set_total_order_seek(iter->opts, 1);
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
    __atomic_sub_fetch(&iter->store->n_iters, 1, __ATOMIC_ACQ_REL);
    free(iter);
}

uint64_t store_estimate_count(struct store *store, enum store_cf cf)
{
    uint64_t n = 0;
    if (!store_cf_valid(cf) || store->db == NULL)
        return 0;
    if (rocksdb_property_int_cf(store->db, store_handle(store, cf), "rocksdb.estimate-num-keys",
                                &n) != 0) {
        log_warn("estimate count of %s unavailable", store_cf_name(cf));
        return 0;
    }
    return n;
}
