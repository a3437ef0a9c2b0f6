/* test_store.c: the RocksDB store: persistence, atomic batches, bounded snapshot iterators, crash consistency. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"
#include "store.h"

/* The crash test runs these in a fresh process (exec of this binary): a
 * forked copy of a process that already ran RocksDB has no background
 * threads, so its flushes would never finish. */
#define CHILD_CRASH "--crash-child"
#define CHILD_TRY_OPEN "--try-open"
#define CRASH_FLUSHED_BATCHES 50
#define CRASH_TOTAL_BATCHES 80
#define CRASH_KEYS_PER_BATCH 100

struct fixture {
    char dir[64];
    char db[96];
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-store-XXXXXX");
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    snprintf(f->db, sizeof(f->db), "%s/db", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    int rc = nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return rc;
}

static struct store *open_ok(const char *path)
{
    struct store *s = NULL;
    assert_int_equal(store_open(path, &s), 0);
    assert_non_null(s);
    return s;
}

static void put_one(struct store *s, enum store_cf cf, const char *key, const char *value,
                    uint64_t index)
{
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, cf, key, strlen(key), value, strlen(value));
    assert_int_equal(store_batch_commit(s, b, index), 0);
    store_batch_free(b);
}

static void assert_value(struct store *s, enum store_cf cf, const void *key, size_t key_len,
                         const char *want)
{
    uint8_t *v = NULL;
    size_t len = 0;
    assert_int_equal(store_get(s, cf, key, key_len, &v, &len), 0);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(v, want, len);
    free(v);
}

static void assert_absent(struct store *s, enum store_cf cf, const void *key, size_t key_len)
{
    uint8_t *v = (uint8_t *)"untouched";
    size_t len = 42;
    assert_int_equal(store_get(s, cf, key, key_len, &v, &len), KR_ENOTFOUND);
    /* Out-params are written only on success. */
    assert_string_equal((const char *)v, "untouched");
    assert_int_equal(len, 42);
}

/* A family's generation moves with each commit that touches it, and only
 * then: the service's key cache is current exactly while it stands still. */
static void test_generation_per_family(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    uint64_t keys = store_cf_generation(s, STORE_CF_KEYS);
    uint64_t names = store_cf_generation(s, STORE_CF_NAMES);
    put_one(s, STORE_CF_KEYS, "k", "v1", 1);
    assert_true(store_cf_generation(s, STORE_CF_KEYS) > keys);
    assert_int_equal(store_cf_generation(s, STORE_CF_NAMES), names);
    keys = store_cf_generation(s, STORE_CF_KEYS);
    put_one(s, STORE_CF_NAMES, "n", "k", 2);
    assert_int_equal(store_cf_generation(s, STORE_CF_KEYS), keys);
    struct store_batch *b = store_batch_new();
    store_batch_delete(b, STORE_CF_KEYS, "k", 1);
    assert_int_equal(store_batch_commit(s, b, 3), 0);
    store_batch_free(b);
    assert_true(store_cf_generation(s, STORE_CF_KEYS) > keys);
    assert_int_equal(store_cf_generation(s, STORE_CF_COUNT), 0); /* no such family */
    store_close(s);
}

static void test_new_store_is_empty(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 0);
    assert_absent(s, STORE_CF_KEYS, "k", 1);
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_META, NULL, 0, NULL, 0, &it), 0);
    /* Not even the applied index is written before the first commit. */
    assert_int_equal(store_iter_valid(it), 0);
    store_iter_free(it);
    store_close(s);
    store_close(NULL);
}

static void test_reopen_keeps_data_and_applied_index(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "key-1", "record-1", 7);
    struct store_batch *b = store_batch_new();
    store_batch_put(b, STORE_CF_NAMES, "dom\0name", 8, "key-1", 5);
    assert_int_equal(store_batch_commit(s, b, 8), 0);
    store_batch_free(b);
    put_one(s, STORE_CF_KEYS, "key-1", "record-1b", 12);
    assert_int_equal(store_applied_index(s), 12);
    store_close(s);

    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 12);
    assert_value(s, STORE_CF_KEYS, "key-1", 5, "record-1b");
    assert_value(s, STORE_CF_NAMES, "dom\0name", 8, "key-1");
    /* Families are separate key spaces. */
    assert_absent(s, STORE_CF_NAMES, "key-1", 5);
    assert_absent(s, STORE_CF_ATTRS, "key-1", 5);
    put_one(s, STORE_CF_AUDIT, "a", "b", 13);
    store_close(s);

    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 13);
    assert_value(s, STORE_CF_AUDIT, "a", 1, "b");
    store_close(s);
}

static void test_batch_spans_families(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_DUE, "old", "gone soon", 1);

    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, STORE_CF_KEYS, "id", 2, "rec", 3);
    store_batch_put(b, STORE_CF_NAMES, "d\0n", 3, "id", 2);
    store_batch_put(b, STORE_CF_ATTRS, "idx", 3, "", 0);
    store_batch_delete(b, STORE_CF_DUE, "old", 3);
    store_batch_put(b, STORE_CF_META, "tmp", 3, "x", 1);
    store_batch_delete(b, STORE_CF_META, "tmp", 3); /* order within a batch holds */
    store_batch_put(b, STORE_CF_AUDIT, "a1", 2, "first", 5);
    store_batch_put(b, STORE_CF_AUDIT, "a1", 2, "second", 6);

    /* Nothing is visible before the commit. */
    assert_absent(s, STORE_CF_KEYS, "id", 2);
    assert_value(s, STORE_CF_DUE, "old", 3, "gone soon");

    assert_int_equal(store_batch_commit(s, b, 2), 0);
    store_batch_free(b);
    assert_int_equal(store_applied_index(s), 2);
    assert_value(s, STORE_CF_KEYS, "id", 2, "rec");
    assert_value(s, STORE_CF_NAMES, "d\0n", 3, "id");
    assert_value(s, STORE_CF_ATTRS, "idx", 3, "");
    assert_absent(s, STORE_CF_DUE, "old", 3);
    assert_absent(s, STORE_CF_META, "tmp", 3);
    assert_value(s, STORE_CF_AUDIT, "a1", 2, "second");

    /* An empty batch still advances the applied index. */
    b = store_batch_new();
    assert_int_equal(store_batch_commit(s, b, 3), 0);
    store_batch_free(b);
    assert_int_equal(store_applied_index(s), 3);
    store_batch_free(NULL);
    store_close(s);
}

/* store_multi_get answers each key as store_get does: rows flushed to an SST
 * and rows in the memtable, an empty value, a missing key, a key asked twice,
 * keys out of order, many keys shuffled. */
static void test_multi_get_answers_like_get(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_NAMES, "c", "3", 1);
    put_one(s, STORE_CF_NAMES, "a", "1", 2);
    put_one(s, STORE_CF_NAMES, "b", "", 3);
    put_one(s, STORE_CF_KEYS, "x", "other family", 4);
    store_close(s);
    s = open_ok(f->db); /* the rows above are in an SST now */
    put_one(s, STORE_CF_NAMES, "d", "4", 5);

    const char *names[] = {"c", "x", "a", "b", "d", "a", "zz"};
    enum { N = sizeof(names) / sizeof(names[0]) };
    const uint8_t *keys[N];
    size_t lens[N];
    for (size_t i = 0; i < N; i++) {
        keys[i] = (const uint8_t *)names[i];
        lens[i] = strlen(names[i]);
    }
    struct store_value out[N];
    assert_int_equal(store_multi_get(s, STORE_CF_NAMES, N, keys, lens, out), 0);
    for (size_t i = 0; i < N; i++) {
        uint8_t *val = NULL;
        size_t len = 0;
        int rv = store_get(s, STORE_CF_NAMES, keys[i], lens[i], &val, &len);
        if (out[i].status != rv)
            fail_msg("key %s: multi-get %d, get %d", names[i], out[i].status, rv);
        if (rv == 0) {
            assert_non_null(out[i].data);
            assert_int_equal(out[i].len, len);
            assert_memory_equal(out[i].data, val, len);
        }
        free(val);
    }
    static const int want[N] = {0, KR_ENOTFOUND, 0, 0, 0, 0, KR_ENOTFOUND};
    for (size_t i = 0; i < N; i++)
        assert_int_equal(out[i].status, want[i]);
    assert_memory_equal(out[4].data, "4", 1);
    assert_int_equal(out[3].len, 0);
    store_values_clear(out, N);
    for (size_t i = 0; i < N; i++)
        assert_null(out[i].data);

    /* Many keys in shuffled order, every third one missing and some asked
     * twice: each answer lands in its own key's slot (the keys go to RocksDB
     * sorted, the answers come back in the caller's order). */
    enum { MANY = 600 };
    static char many_names[MANY][16];
    static const uint8_t *many_keys[MANY];
    static size_t many_lens[MANY];
    static struct store_value many_out[MANY];
    struct store_batch *b = store_batch_new();
    for (unsigned i = 0; i < MANY / 2; i++) {
        char name[16], value[16];
        snprintf(name, sizeof(name), "m%u", i);
        snprintf(value, sizeof(value), "v%u", i * 7);
        if (i % 3 != 0)
            store_batch_put(b, STORE_CF_NAMES, name, strlen(name), value, strlen(value));
    }
    assert_int_equal(store_batch_commit(s, b, 6), 0);
    store_batch_free(b);
    srand(5);
    for (unsigned i = 0; i < MANY; i++) {
        snprintf(many_names[i], sizeof(many_names[i]), "m%u", (unsigned)rand() % (MANY / 2 + 20));
        many_keys[i] = (const uint8_t *)many_names[i];
        many_lens[i] = strlen(many_names[i]);
    }
    assert_int_equal(store_multi_get(s, STORE_CF_NAMES, MANY, many_keys, many_lens, many_out), 0);
    for (unsigned i = 0; i < MANY; i++) {
        unsigned k = (unsigned)atoi(many_names[i] + 1);
        if (k % 3 == 0 || k >= MANY / 2) {
            assert_int_equal(many_out[i].status, KR_ENOTFOUND);
            continue;
        }
        char want_value[16];
        snprintf(want_value, sizeof(want_value), "v%u", k * 7);
        assert_int_equal(many_out[i].status, 0);
        assert_int_equal(many_out[i].len, strlen(want_value));
        assert_memory_equal(many_out[i].data, want_value, many_out[i].len);
    }
    store_values_clear(many_out, MANY);

    assert_int_equal(store_multi_get(s, STORE_CF_NAMES, 0, NULL, NULL, NULL), 0);
    assert_int_equal(store_multi_get(s, STORE_CF_COUNT, N, keys, lens, out), KR_EINVAL);
    assert_int_equal(store_multi_get(s, STORE_CF_NAMES, N, keys, lens, NULL), KR_EINVAL);
    store_close(s);
}

/* Commit orders a batch's operations by key (store.c): writes to one key
 * must still land in the order recorded, however many other keys sort
 * between them. */
static void test_batch_last_write_wins_in_sorted_commit(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_NAMES, "k050", "before", 1);
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    char key[16], val[16];
    for (int round = 0; round < 3; round++) {
        for (int i = 99; i >= 0; i--) { /* descending: the sort reverses them */
            snprintf(key, sizeof(key), "k%03d", i);
            snprintf(val, sizeof(val), "r%d-%d", round, i);
            store_batch_put(b, STORE_CF_NAMES, key, strlen(key), val, strlen(val));
        }
        store_batch_delete(b, STORE_CF_NAMES, "k050", 4);
        store_batch_put(b, STORE_CF_KEYS, "k050", 4, val, strlen(val));
    }
    store_batch_put(b, STORE_CF_NAMES, "k007", 4, "last", 4);
    assert_int_equal(store_batch_commit(s, b, 2), 0);
    store_batch_free(b);
    assert_absent(s, STORE_CF_NAMES, "k050", 4);
    assert_value(s, STORE_CF_NAMES, "k007", 4, "last");
    assert_value(s, STORE_CF_NAMES, "k099", 4, "r2-99");
    assert_value(s, STORE_CF_NAMES, "k000", 4, "r2-0");
    assert_value(s, STORE_CF_KEYS, "k050", 4, "r2-0");
    store_close(s);
}

/* A range delete drops every key in [start, end) of its family only, and
 * goes before the batch's puts whatever the order they were recorded in
 * (store.h): a put into the range in the same batch survives. */
static void test_batch_delete_range(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    char key[16];
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "r%04d", i);
        put_one(s, STORE_CF_META, key, "old", (uint64_t)i + 1);
    }
    put_one(s, STORE_CF_NAMES, "r0500", "other family", 1001);
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, STORE_CF_META, "r0050", 5, "first", 5); /* the range's own first key */
    store_batch_put(b, STORE_CF_META, "r0100", 5, "kept", 4);
    store_batch_delete_range(b, STORE_CF_META, "r0050", 5, "r0900", 5);
    store_batch_put(b, STORE_CF_META, "r0200", 5, "new", 3);
    assert_int_equal(store_batch_commit(s, b, 1002), 0);
    store_batch_free(b);
    assert_value(s, STORE_CF_META, "r0049", 5, "old");
    assert_value(s, STORE_CF_META, "r0050", 5, "first");
    assert_absent(s, STORE_CF_META, "r0051", 5);
    assert_absent(s, STORE_CF_META, "r0899", 5);
    assert_value(s, STORE_CF_META, "r0900", 5, "old");
    assert_value(s, STORE_CF_META, "r0100", 5, "kept");
    assert_value(s, STORE_CF_META, "r0200", 5, "new");
    assert_value(s, STORE_CF_NAMES, "r0500", 5, "other family");
    size_t n = 0;
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_META, "r", 1, "s", 1, &it), 0);
    for (; store_iter_valid(it); store_iter_next(it))
        n++;
    assert_int_equal(store_iter_status(it), 0);
    store_iter_free(it);
    assert_int_equal(n, 50 + 100 + 3);
    store_close(s);
    /* It survives a reopen (store_close flushes: the WAL is off). */
    s = open_ok(f->db);
    assert_absent(s, STORE_CF_META, "r0500", 5);
    assert_value(s, STORE_CF_META, "r0200", 5, "new");
    assert_int_equal(store_applied_index(s), 1002);
    store_close(s);
}

static void test_bad_batch_writes_nothing(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "keep", "v", 4);

    struct store_batch *b = store_batch_new();
    store_batch_put(b, STORE_CF_KEYS, "new", 3, "v", 1);
    store_batch_delete(b, STORE_CF_KEYS, "keep", 4);
    store_batch_put(b, STORE_CF_COUNT, "bad", 3, "v", 1);
    assert_int_equal(store_batch_commit(s, b, 5), KR_EINVAL);
    store_batch_free(b);

    assert_int_equal(store_applied_index(s), 4);
    assert_absent(s, STORE_CF_KEYS, "new", 3);
    assert_value(s, STORE_CF_KEYS, "keep", 4, "v");
    uint8_t *v = NULL;
    size_t len = 0;
    assert_int_equal(store_get(s, STORE_CF_COUNT, "keep", 4, &v, &len), KR_EINVAL);
    store_close(s);

    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 4);
    store_close(s);
}

/* Collects the keys an iterator yields, "|"-separated, \0 shown as '0'. */
static void iter_keys(struct store *s, enum store_cf cf, const void *lo, size_t lo_len,
                      const void *hi, size_t hi_len, char *out, size_t cap)
{
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, cf, lo, lo_len, hi, hi_len, &it), 0);
    size_t n = 0;
    out[0] = '\0';
    for (; store_iter_valid(it); store_iter_next(it)) {
        size_t klen = 0, vlen = 0;
        const uint8_t *k = store_iter_key(it, &klen);
        const uint8_t *v = store_iter_value(it, &vlen);
        assert_non_null(k);
        assert_non_null(v);
        /* Every test value is the key itself. */
        assert_int_equal(vlen, klen);
        assert_memory_equal(k, v, klen);
        for (size_t i = 0; i < klen && n + 2 < cap; i++)
            out[n++] = k[i] == 0 ? '0' : (char)k[i];
        if (n + 2 < cap)
            out[n++] = '|';
        out[n] = '\0';
    }
    assert_int_equal(store_iter_status(it), 0);
    size_t len = 7;
    assert_null(store_iter_key(it, &len));
    assert_int_equal(len, 0);
    store_iter_free(it);
}

static void test_iter_bounds_binary_keys(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    static const struct {
        const char *k;
        size_t len;
    } keys[] = {
        {"\0\0", 2}, {"a", 1}, {"a\0x", 3}, {"a\0y", 3}, {"a\1", 2}, {"ab", 2}, {"b\0", 2},
    };
    struct store_batch *b = store_batch_new();
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        store_batch_put(b, STORE_CF_ATTRS, keys[i].k, keys[i].len, keys[i].k, keys[i].len);
    store_batch_put(b, STORE_CF_NAMES, "zz", 2, "zz", 2); /* other family: never seen */
    assert_int_equal(store_batch_commit(s, b, 1), 0);
    store_batch_free(b);

    char got[256];
    iter_keys(s, STORE_CF_ATTRS, NULL, 0, NULL, 0, got, sizeof(got));
    assert_string_equal(got, "00|a|a0x|a0y|a\1|ab|b0|");
    /* Prefix "a\0": [a\0, a\1). */
    iter_keys(s, STORE_CF_ATTRS, "a\0", 2, "a\1", 2, got, sizeof(got));
    assert_string_equal(got, "a0x|a0y|");
    /* Lower bound is inclusive, upper exclusive. */
    iter_keys(s, STORE_CF_ATTRS, "a", 1, "ab", 2, got, sizeof(got));
    assert_string_equal(got, "a|a0x|a0y|a\1|");
    iter_keys(s, STORE_CF_ATTRS, "a\0y", 3, NULL, 0, got, sizeof(got));
    assert_string_equal(got, "a0y|a\1|ab|b0|");
    iter_keys(s, STORE_CF_ATTRS, NULL, 0, "a", 1, got, sizeof(got));
    assert_string_equal(got, "00|");
    /* Empty ranges. */
    iter_keys(s, STORE_CF_ATTRS, "a\0z", 3, "a\1", 2, got, sizeof(got));
    assert_string_equal(got, "");
    iter_keys(s, STORE_CF_ATTRS, "c", 1, NULL, 0, got, sizeof(got));
    assert_string_equal(got, "");

    /* The bounds are copied: the caller's buffers may go away. */
    char lo[2] = {'a', '\0'}, hi[2] = {'a', '\1'};
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_ATTRS, lo, 2, hi, 2, &it), 0);
    memset(lo, 0xff, sizeof(lo));
    memset(hi, 0, sizeof(hi));
    int n = 0;
    for (; store_iter_valid(it); store_iter_next(it))
        n++;
    assert_int_equal(n, 2);
    store_iter_free(it);

    /* And everything survives a reopen from SST files. */
    assert_int_equal(store_flush(s), 0);
    store_close(s);
    s = open_ok(f->db);
    iter_keys(s, STORE_CF_ATTRS, "a\0", 2, "a\1", 2, got, sizeof(got));
    assert_string_equal(got, "a0x|a0y|");
    store_close(s);
}

static void test_iter_sees_snapshot(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "k1", "v1", 1);
    put_one(s, STORE_CF_KEYS, "k3", "v3", 2);

    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, NULL, 0, NULL, 0, &it), 0);

    struct store_batch *b = store_batch_new();
    store_batch_put(b, STORE_CF_KEYS, "k2", 2, "v2", 2);
    store_batch_put(b, STORE_CF_KEYS, "k3", 2, "changed", 7);
    store_batch_delete(b, STORE_CF_KEYS, "k1", 2);
    assert_int_equal(store_batch_commit(s, b, 3), 0);
    store_batch_free(b);

    size_t klen = 0, vlen = 0;
    assert_int_equal(store_iter_valid(it), 1);
    assert_memory_equal(store_iter_key(it, &klen), "k1", 2);
    assert_memory_equal(store_iter_value(it, &vlen), "v1", 2);
    store_iter_next(it);
    assert_int_equal(store_iter_valid(it), 1);
    assert_memory_equal(store_iter_key(it, &klen), "k3", 2);
    const uint8_t *v = store_iter_value(it, &vlen);
    assert_int_equal(vlen, 2);
    assert_memory_equal(v, "v3", 2);
    store_iter_next(it);
    assert_int_equal(store_iter_valid(it), 0);
    store_iter_next(it); /* harmless at the end */
    assert_int_equal(store_iter_valid(it), 0);
    store_iter_free(it);

    /* A new iterator sees the new state. */
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, "k2", 2, NULL, 0, &it), 0);
    assert_int_equal(store_iter_valid(it), 1);
    assert_memory_equal(store_iter_key(it, &klen), "k2", 2);
    store_iter_next(it);
    assert_int_equal(store_iter_valid(it), 1);
    v = store_iter_value(it, &vlen);
    assert_int_equal(vlen, 7);
    assert_memory_equal(v, "changed", 7);
    store_iter_next(it);
    assert_int_equal(store_iter_valid(it), 0);
    store_iter_free(it);
    assert_absent(s, STORE_CF_KEYS, "k1", 2);
    store_close(s);
}

static int spawn_self(const char *mode, const char *db)
{
    pid_t pid = fork();
    if (pid == 0) {
        execl("/proc/self/exe", "test_store", mode, db, (char *)NULL);
        _exit(127);
    }
    assert_true(pid > 0);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* Exit 0 when the open failed with KR_EIO, as a second keyraftd must. */
static int child_try_open(const char *db)
{
    struct store *s = NULL;
    int rc = store_open(db, &s);
    if (rc == 0) {
        store_close(s);
        return 1;
    }
    return rc == KR_EIO ? 0 : 2;
}

static void test_second_open_is_refused(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "k", "v", 1);

    struct store *again = NULL;
    assert_int_equal(store_open(f->db, &again), KR_EIO);
    assert_null(again);
    /* Another process is refused too. */
    assert_int_equal(spawn_self(CHILD_TRY_OPEN, f->db), 0);

    /* The holder is unaffected, and the lock goes with the close. */
    assert_value(s, STORE_CF_KEYS, "k", 1, "v");
    store_close(s);
    assert_int_equal(spawn_self(CHILD_TRY_OPEN, f->db), 1);
    s = open_ok(f->db);
    assert_value(s, STORE_CF_KEYS, "k", 1, "v");
    store_close(s);
}

static void test_open_unusable_path_fails(void **state)
{
    struct fixture *f = *state;
    char path[128];
    snprintf(path, sizeof(path), "%s/file", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fclose(fp);
    char below[160];
    snprintf(below, sizeof(below), "%s/db", path);
    struct store *s = NULL;
    assert_int_equal(store_open(below, &s), KR_EIO);
    assert_null(s);
}

#define BULK_BATCHES 100
#define BULK_PER_BATCH 1000

static void test_100k_keys_survive_reopen(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    char key[32], value[64];
    for (unsigned i = 0; i < BULK_BATCHES; i++) {
        struct store_batch *b = store_batch_new();
        assert_non_null(b);
        for (unsigned j = 0; j < BULK_PER_BATCH; j++) {
            unsigned n = i * BULK_PER_BATCH + j;
            int kl = snprintf(key, sizeof(key), "key-%08u", n);
            int vl = snprintf(value, sizeof(value), "value-%08u-padding-padding", n);
            store_batch_put(b, STORE_CF_KEYS, key, (size_t)kl, value, (size_t)vl);
        }
        assert_int_equal(store_batch_commit(s, b, i + 1), 0);
        store_batch_free(b);
    }
    store_close(s);

    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), BULK_BATCHES);
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, NULL, 0, NULL, 0, &it), 0);
    unsigned n = 0;
    for (; store_iter_valid(it); store_iter_next(it), n++) {
        size_t klen = 0;
        const uint8_t *k = store_iter_key(it, &klen);
        int want = snprintf(key, sizeof(key), "key-%08u", n);
        assert_int_equal(klen, (size_t)want);
        assert_memory_equal(k, key, klen);
    }
    assert_int_equal(store_iter_status(it), 0);
    store_iter_free(it);
    assert_int_equal(n, BULK_BATCHES * BULK_PER_BATCH);

    uint64_t est = store_estimate_count(s, STORE_CF_KEYS);
    assert_true(est >= n / 2 && est <= (uint64_t)n * 2);
    assert_true(store_estimate_count(s, STORE_CF_NAMES) < 100);
    assert_value(s, STORE_CF_KEYS, "key-00054321", 12, "value-00054321-padding-padding");
    store_close(s);
}

static void test_flush_leaves_no_checkpoint(void **state)
{
    struct fixture *f = *state;
    struct store *s = open_ok(f->db);
    assert_int_equal(store_flush(s), 0); /* nothing to flush */
    put_one(s, STORE_CF_META, "cfg", "1", 9);
    assert_int_equal(store_flush(s), 0);
    assert_int_equal(store_flush(s), 0);
    char path[160];
    snprintf(path, sizeof(path), "%s/flush-checkpoint", f->db);
    struct stat st;
    assert_int_equal(stat(path, &st), -1);
    assert_int_equal(errno, ENOENT);
    assert_value(s, STORE_CF_META, "cfg", 3, "1");
    store_close(s);
}

/* A database at |path| holding |key| = |value| at applied index |index|,
 * closed again (as a checkpoint would be handed over). */
static void make_db(const char *path, const char *key, const char *value, uint64_t index)
{
    struct store *s = open_ok(path);
    put_one(s, STORE_CF_KEYS, key, value, index);
    store_close(s);
}

static int path_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static void test_checkpoint_is_a_consistent_copy(void **state)
{
    struct fixture *f = *state;
    char cp[160], cp2[160];
    snprintf(cp, sizeof(cp), "%s/cp", f->dir);
    snprintf(cp2, sizeof(cp2), "%s/cp2", f->dir);
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "k1", "v1", 4);
    put_one(s, STORE_CF_META, "cfg", "x", 5); /* in memtables only: the checkpoint flushes */
    assert_int_equal(store_checkpoint(s, cp), 0);
    /* The target must be new. */
    assert_int_equal(store_checkpoint(s, cp), KR_EIO);
    put_one(s, STORE_CF_KEYS, "k2", "after", 6);

    uint64_t applied = 0;
    assert_int_equal(store_probe(cp, &applied), 0);
    assert_int_equal(applied, 5);
    /* The copy is a store of its own, frozen at the checkpoint. */
    struct store *c = open_ok(cp);
    assert_int_equal(store_applied_index(c), 5);
    assert_value(c, STORE_CF_KEYS, "k1", 2, "v1");
    assert_value(c, STORE_CF_META, "cfg", 3, "x");
    assert_absent(c, STORE_CF_KEYS, "k2", 2);
    store_close(c);
    /* A second one while the first exists. */
    assert_int_equal(store_checkpoint(s, cp2), 0);
    assert_int_equal(store_probe(cp2, &applied), 0);
    assert_int_equal(applied, 6);
    store_close(s);
}

static void test_probe_refuses_what_is_not_a_store(void **state)
{
    struct fixture *f = *state;
    char dir[160], path[200];
    uint64_t applied = 77;
    /* Absent, empty, junk: nothing is created, nothing reported. */
    snprintf(dir, sizeof(dir), "%s/none", f->dir);
    assert_int_equal(store_probe(dir, &applied), KR_EIO);
    assert_false(path_exists(dir));
    snprintf(dir, sizeof(dir), "%s/empty", f->dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    assert_int_equal(store_probe(dir, &applied), KR_EIO);
    snprintf(path, sizeof(path), "%s/CURRENT", dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("MANIFEST-000042\n", fp);
    fclose(fp);
    assert_int_equal(store_probe(dir, &applied), KR_EIO);
    assert_int_equal(applied, 77);

    /* A checkpoint with one SST damaged in the middle fails the checksums. */
    struct store *s = open_ok(f->db);
    char value[4096];
    uint32_t x = 12345; /* incompressible, so the SST is large */
    for (size_t i = 0; i < sizeof(value); i++) {
        x = x * 1103515245u + 12345u;
        value[i] = (char)(x >> 24);
    }
    struct store_batch *b = store_batch_new();
    for (int i = 0; i < 64; i++) {
        char key[16];
        snprintf(key, sizeof(key), "key-%03d", i);
        store_batch_put(b, STORE_CF_KEYS, key, strlen(key), value, sizeof(value));
    }
    assert_int_equal(store_batch_commit(s, b, 3), 0);
    store_batch_free(b);
    snprintf(dir, sizeof(dir), "%s/cp", f->dir);
    assert_int_equal(store_checkpoint(s, dir), 0);
    store_close(s);
    assert_int_equal(store_probe(dir, &applied), 0);
    assert_int_equal(applied, 3);
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *ent;
    int damaged = 0;
    while ((ent = readdir(d)) != NULL) {
        size_t n = strlen(ent->d_name);
        if (n < 4 || strcmp(ent->d_name + n - 4, ".sst") != 0)
            continue;
        assert_true((size_t)snprintf(path, sizeof(path), "%.100s/%.80s", dir, ent->d_name) < sizeof(path));
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        if (st.st_size < 100000)
            continue; /* the small SSTs of the other families */
        /* The checkpoint hard-links SSTs: copy before damaging, or the
         * source store would be damaged too. */
        uint8_t *data = malloc((size_t)st.st_size);
        assert_non_null(data);
        fp = fopen(path, "rb");
        assert_int_equal(fread(data, 1, (size_t)st.st_size, fp), (size_t)st.st_size);
        fclose(fp);
        assert_int_equal(unlink(path), 0);
        data[st.st_size / 3] ^= 0x5a;
        fp = fopen(path, "wb");
        assert_int_equal(fwrite(data, 1, (size_t)st.st_size, fp), (size_t)st.st_size);
        fclose(fp);
        free(data);
        damaged++;
    }
    closedir(d);
    assert_int_equal(damaged, 1);
    applied = 77;
    assert_int_equal(store_probe(dir, &applied), KR_EIO);
    assert_int_equal(applied, 77);
    /* The source store was not touched by the damage. */
    s = open_ok(f->db);
    uint8_t *v = NULL;
    size_t len = 0;
    assert_int_equal(store_get(s, STORE_CF_KEYS, "key-063", 7, &v, &len), 0);
    assert_int_equal(len, sizeof(value));
    assert_memory_equal(v, value, len);
    free(v);
    store_close(s);
}

static void test_swap_replaces_data_keeps_struct(void **state)
{
    struct fixture *f = *state;
    char other[160], incoming[160], old[160];
    snprintf(other, sizeof(other), "%s/other", f->dir);
    snprintf(incoming, sizeof(incoming), "%s/db.incoming", f->dir);
    snprintf(old, sizeof(old), "%s.old", f->db);
    make_db(other, "new-key", "new-value", 40);
    struct store *o = open_ok(other);
    struct store_batch *b = store_batch_new();
    assert_non_null(b);
    store_batch_put(b, STORE_CF_NAMES, "dom\0n", 5, "new-key", 7);
    assert_int_equal(store_batch_commit(o, b, 41), 0);
    store_batch_free(b);
    assert_int_equal(store_checkpoint(o, incoming), 0);
    store_close(o);

    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "old-key", "old-value", 3);
    struct store *const before = s;
    assert_int_equal(store_swap(s, incoming), 0);
    assert_ptr_equal(s, before);
    assert_int_equal(store_applied_index(s), 41);
    assert_value(s, STORE_CF_KEYS, "new-key", 7, "new-value");
    assert_value(s, STORE_CF_NAMES, "dom\0n", 5, "new-key");
    assert_absent(s, STORE_CF_KEYS, "old-key", 7);
    assert_false(path_exists(incoming));
    assert_false(path_exists(old));
    /* The same struct keeps working: writes, iterators, flushes. */
    put_one(s, STORE_CF_KEYS, "later", "x", 42);
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, NULL, 0, NULL, 0, &it), 0);
    int n = 0;
    for (; store_iter_valid(it); store_iter_next(it))
        n++;
    assert_int_equal(store_iter_status(it), 0);
    store_iter_free(it);
    assert_int_equal(n, 2);
    assert_int_equal(store_flush(s), 0);
    store_close(s);

    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 42);
    assert_value(s, STORE_CF_KEYS, "new-key", 7, "new-value");
    assert_value(s, STORE_CF_KEYS, "later", 5, "x");
    store_close(s);
}

struct late_flush {
    struct store *store;
    int rc;
};

static void *late_flush_main(void *arg)
{
    struct late_flush *lf = arg;
    nanosleep(&(struct timespec){.tv_nsec = 300 * 1000 * 1000}, NULL);
    lf->rc = store_preflush(lf->store);
    return NULL;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A snapshot restore swaps the store while a worker's flush, handed over
 * before, has not finished (or not started): the swap waits for it instead
 * of failing or pulling the DB from under it. */
static void test_swap_waits_for_a_held_flush(void **state)
{
    struct fixture *f = *state;
    char other[160], incoming[160];
    snprintf(other, sizeof(other), "%s/other", f->dir);
    snprintf(incoming, sizeof(incoming), "%s/db.incoming", f->dir);
    make_db(other, "new-key", "new-value", 40);
    struct store *o = open_ok(other);
    assert_int_equal(store_checkpoint(o, incoming), 0);
    store_close(o);

    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "old-key", "old-value", 3);
    /* A hold whose work never ran is released and costs the swap nothing. */
    store_preflush_hold(s);
    store_preflush_release(s);
    store_preflush_hold(s);
    struct late_flush lf = {s, -1};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, late_flush_main, &lf), 0);
    uint64_t t0 = mono_ms();
    assert_int_equal(store_swap(s, incoming), 0);
    uint64_t waited = mono_ms() - t0;
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(lf.rc, 0);
    assert_true(waited >= 250);
    assert_int_equal(store_applied_index(s), 40);
    assert_value(s, STORE_CF_KEYS, "new-key", 7, "new-value");
    assert_absent(s, STORE_CF_KEYS, "old-key", 7);
    store_close(s);
}

static void test_failed_swap_leaves_the_old_data(void **state)
{
    struct fixture *f = *state;
    char incoming[160], old[160], path[200];
    snprintf(incoming, sizeof(incoming), "%s/db.incoming", f->dir);
    snprintf(old, sizeof(old), "%s.old", f->db);
    struct store *s = open_ok(f->db);
    put_one(s, STORE_CF_KEYS, "old-key", "old-value", 9); /* unflushed: must survive */

    /* An empty directory is no database: not created on the fly. */
    assert_int_equal(mkdir(incoming, 0700), 0);
    assert_int_equal(store_swap(s, incoming), KR_EIO);
    assert_int_equal(store_applied_index(s), 9);
    assert_value(s, STORE_CF_KEYS, "old-key", 7, "old-value");
    assert_true(path_exists(incoming)); /* left where it was */
    assert_false(path_exists(old));
    /* Junk. */
    snprintf(path, sizeof(path), "%s/CURRENT", incoming);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("garbage\n", fp);
    fclose(fp);
    assert_int_equal(store_swap(s, incoming), KR_EIO);
    assert_value(s, STORE_CF_KEYS, "old-key", 7, "old-value");
    /* Not a directory at all. */
    snprintf(path, sizeof(path), "%s/missing", f->dir);
    assert_int_equal(store_swap(s, path), KR_EINVAL);

    /* An open iterator refuses the swap and changes nothing. */
    assert_int_equal(store_remove_dir(incoming), 0);
    assert_false(path_exists(incoming));
    make_db(incoming, "new-key", "new-value", 50);
    struct store_iter *it = NULL;
    assert_int_equal(store_iter_new(s, STORE_CF_KEYS, NULL, 0, NULL, 0, &it), 0);
    assert_int_equal(store_swap(s, incoming), KR_EBUSY);
    assert_true(store_iter_valid(it));
    store_iter_free(it);
    assert_int_equal(store_applied_index(s), 9);

    /* The store still works, and keeps its data across a restart. */
    put_one(s, STORE_CF_KEYS, "k2", "v2", 10);
    store_close(s);
    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 10);
    assert_value(s, STORE_CF_KEYS, "old-key", 7, "old-value");
    /* And the refused database can still go in. */
    assert_int_equal(store_swap(s, incoming), 0);
    assert_int_equal(store_applied_index(s), 50);
    store_close(s);
}

/* What a crash inside store_swap leaves is repaired by store_open. */
static void test_interrupted_swap_is_repaired(void **state)
{
    struct fixture *f = *state;
    char old[160];
    snprintf(old, sizeof(old), "%s.old", f->db);
    /* Crash between the two renames: the DB is only at .old. */
    make_db(f->db, "k", "v", 7);
    assert_int_equal(rename(f->db, old), 0);
    struct store *s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 7);
    assert_value(s, STORE_CF_KEYS, "k", 1, "v");
    assert_false(path_exists(old));
    store_close(s);
    /* Crash after the new one went in: the old one is garbage. */
    make_db(old, "stale", "x", 3);
    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), 7);
    assert_absent(s, STORE_CF_KEYS, "stale", 5);
    assert_false(path_exists(old));
    store_close(s);
}

static void crash_key(unsigned batch, unsigned j, char *key, size_t cap)
{
    snprintf(key, cap, "b%04u-k%04u", batch, j);
}

/* Commits CRASH_FLUSHED_BATCHES batches, flushes, commits more without a
 * flush, then dies without closing. */
static int child_crash(const char *db)
{
    struct store *s = NULL;
    if (store_open(db, &s) != 0)
        return 2;
    char key[32], value[512];
    memset(value, 'v', sizeof(value));
    for (unsigned i = 1; i <= CRASH_TOTAL_BATCHES; i++) {
        struct store_batch *b = store_batch_new();
        if (b == NULL)
            return 3;
        for (unsigned j = 0; j < CRASH_KEYS_PER_BATCH; j++) {
            crash_key(i, j, key, sizeof(key));
            store_batch_put(b, i % 2 ? STORE_CF_KEYS : STORE_CF_AUDIT, key, strlen(key), value,
                            sizeof(value));
        }
        store_batch_put(b, STORE_CF_META, "last", 4, &i, sizeof(i));
        if (store_batch_commit(s, b, i) != 0)
            return 4;
        store_batch_free(b);
        if (i == CRASH_FLUSHED_BATCHES && store_flush(s) != 0)
            return 5;
    }
    _exit(0);
}

static void test_crash_keeps_index_and_data_consistent(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(spawn_self(CHILD_CRASH, f->db), 0);

    struct store *s = open_ok(f->db);
    uint64_t applied = store_applied_index(s);
    assert_true(applied >= CRASH_FLUSHED_BATCHES);
    assert_true(applied <= CRASH_TOTAL_BATCHES);
    /* Everything up to the applied index is there, nothing past it: replay
     * from applied + 1 rebuilds exactly the lost state. */
    uint8_t *v = NULL;
    size_t len = 0;
    assert_int_equal(store_get(s, STORE_CF_META, "last", 4, &v, &len), 0);
    unsigned last = 0;
    assert_int_equal(len, sizeof(last));
    memcpy(&last, v, sizeof(last));
    free(v);
    assert_int_equal(last, applied);
    char key[32];
    for (unsigned i = 1; i <= CRASH_TOTAL_BATCHES; i++) {
        enum store_cf cf = i % 2 ? STORE_CF_KEYS : STORE_CF_AUDIT;
        for (unsigned j = 0; j < CRASH_KEYS_PER_BATCH; j++) {
            crash_key(i, j, key, sizeof(key));
            int rc = store_get(s, cf, key, strlen(key), &v, &len);
            if (i <= applied) {
                assert_int_equal(rc, 0);
                assert_int_equal(len, 512);
                free(v);
            } else {
                assert_int_equal(rc, KR_ENOTFOUND);
            }
        }
    }
    /* The store keeps working after the crash. */
    put_one(s, STORE_CF_KEYS, "after", "crash", applied + 1);
    store_close(s);
    s = open_ok(f->db);
    assert_int_equal(store_applied_index(s), applied + 1);
    store_close(s);
}

int main(int argc, char **argv)
{
    log_set_level(LOG_LEVEL_WARN);
    if (argc == 3 && strcmp(argv[1], CHILD_CRASH) == 0)
        return child_crash(argv[2]);
    if (argc == 3 && strcmp(argv[1], CHILD_TRY_OPEN) == 0)
        return child_try_open(argv[2]);

    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_new_store_is_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_generation_per_family, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen_keeps_data_and_applied_index, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_batch_spans_families, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multi_get_answers_like_get, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_last_write_wins_in_sorted_commit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_batch_delete_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_batch_writes_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_iter_bounds_binary_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_iter_sees_snapshot, setup, teardown),
        cmocka_unit_test_setup_teardown(test_second_open_is_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_unusable_path_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_100k_keys_survive_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flush_leaves_no_checkpoint, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_keeps_index_and_data_consistent, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_is_a_consistent_copy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_probe_refuses_what_is_not_a_store, setup, teardown),
        cmocka_unit_test_setup_teardown(test_swap_replaces_data_keeps_struct, setup, teardown),
        cmocka_unit_test_setup_teardown(test_swap_waits_for_a_held_flush, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_swap_leaves_the_old_data, setup, teardown),
        cmocka_unit_test_setup_teardown(test_interrupted_swap_is_repaired, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
