/* test_snapshot_registry.c: the serving side of snapshot transfer without a
 * node: checkpoints, their listing, chunked reads, name checks, the open
 * limit, idle expiry on a given clock, cleanup. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"
#include "snapshot.h"
#include "store.h"

#define BIG_VALUES 600 /* x 4 KiB incompressible: one SST over the 1 MiB chunk */

struct fixture {
    char dir[64];
    char db[96];
    char snaps[96];
    struct store *store;
    struct snapshot_registry *reg;
    uint8_t *buf;
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void fill(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (uint8_t)(seed >> 24);
    }
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/kr-test-snapreg-XXXXXX");
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    snprintf(f->db, sizeof(f->db), "%s/db", f->dir);
    snprintf(f->snaps, sizeof(f->snaps), "%s/snapshots", f->dir);
    /* Left by an earlier run: removed by snapshot_registry_new. */
    char junk[160];
    snprintf(junk, sizeof(junk), "%s/0123", f->snaps);
    if (mkdir(f->snaps, 0700) != 0 || mkdir(junk, 0700) != 0)
        return -1;
    snprintf(junk, sizeof(junk), "%s/0123/000001.sst", f->snaps);
    FILE *fp = fopen(junk, "w");
    if (fp == NULL)
        return -1;
    fclose(fp);
    f->buf = malloc(SNAPSHOT_CHUNK_MAX);
    if (f->buf == NULL || store_open(f->db, &f->store) != 0 ||
        snapshot_registry_new(f->dir, f->store, &f->reg) != 0)
        return -1;
    struct store_batch *b = store_batch_new();
    uint8_t value[4096];
    for (int i = 0; i < BIG_VALUES; i++) {
        char key[16];
        snprintf(key, sizeof(key), "key-%04d", i);
        fill(value, sizeof(value), (uint32_t)i + 1);
        store_batch_put(b, STORE_CF_KEYS, key, strlen(key), value, sizeof(value));
    }
    int rc = store_batch_commit(f->store, b, 17);
    store_batch_free(b);
    *state = f;
    return rc;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    snapshot_registry_free(f->reg);
    store_close(f->store);
    int rc = nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f->buf);
    free(f);
    return rc;
}

static int entries_in(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL)
        if (strcmp(ent->d_name, ".") != 0 && strcmp(ent->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

/* The whole file |name| of checkpoint |v|, through snapshot_read. */
static uint8_t *read_whole(struct fixture *f, const struct snapshot_view *v,
                           const struct snapshot_file *file, unsigned *out_calls)
{
    uint8_t *all = malloc(file->size + 1);
    assert_non_null(all);
    uint64_t off = 0;
    unsigned calls = 0;
    for (;;) {
        size_t len = 99;
        assert_int_equal(snapshot_read(f->reg, v->id, file->name, off, 0, 1000, f->buf, &len), 0);
        calls++;
        assert_true(len <= SNAPSHOT_CHUNK_MAX);
        if (len == 0)
            break;
        memcpy(all + off, f->buf, len);
        off += len;
        assert_true(off <= file->size);
    }
    assert_int_equal(off, file->size);
    *out_calls = calls;
    return all;
}

static void test_name_rules(void **state)
{
    (void)state;
    assert_true(snapshot_name_valid("CURRENT"));
    assert_true(snapshot_name_valid("000012.sst"));
    assert_true(snapshot_name_valid("MANIFEST-000005"));
    assert_true(snapshot_name_valid(".hidden"));
    static const char *const bad[] = {"", ".", "..", "../x", "a/b", "/etc/passwd", "x..y", "a/"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (snapshot_name_valid(bad[i]))
            fail_msg("'%s' accepted", bad[i]);
    char longname[SNAPSHOT_NAME_MAX + 2];
    memset(longname, 'a', sizeof(longname));
    longname[SNAPSHOT_NAME_MAX] = '\0';
    assert_true(snapshot_name_valid(longname));
    longname[SNAPSHOT_NAME_MAX] = 'a';
    longname[SNAPSHOT_NAME_MAX + 1] = '\0';
    assert_false(snapshot_name_valid(longname));
}

static void test_open_lists_and_reads_the_checkpoint(void **state)
{
    struct fixture *f = *state;
    /* The leftovers of an earlier run are gone. */
    assert_int_equal(entries_in(f->snaps), 0);
    struct snapshot_view v;
    assert_int_equal(snapshot_open(f->reg, 1000, &v), 0);
    assert_int_equal(strlen(v.id), SNAPSHOT_ID_LEN);
    assert_int_equal(v.applied_index, 17);
    assert_int_equal(snapshot_open_count(f->reg), 1);
    assert_int_equal(entries_in(f->snaps), 1);
    char dir[200];
    snprintf(dir, sizeof(dir), "%s/%s", f->snaps, v.id);
    assert_int_equal(entries_in(dir), (int)v.n_files);

    /* Sorted, sizes as on disk, totals add up; the checkpoint opens as a
     * store at the same index. */
    uint64_t total = 0;
    const struct snapshot_file *big = NULL;
    for (size_t i = 0; i < v.n_files; i++) {
        if (i > 0)
            assert_true(strcmp(v.files[i - 1].name, v.files[i].name) < 0);
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", dir, v.files[i].name);
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal((uint64_t)st.st_size, v.files[i].size);
        total += v.files[i].size;
        if (big == NULL || v.files[i].size > big->size)
            big = &v.files[i];
    }
    assert_int_equal(total, v.total_bytes);
    assert_true(big->size > SNAPSHOT_CHUNK_MAX);

    /* Reads in chunks of at most 1 MiB give the file's bytes. */
    unsigned calls = 0;
    uint8_t *got = read_whole(f, &v, big, &calls);
    assert_true(calls >= 3); /* >1 MiB: two chunks and the end */
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, big->name);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    uint8_t *disk = malloc(big->size);
    assert_int_equal(fread(disk, 1, big->size, fp), big->size);
    fclose(fp);
    assert_memory_equal(got, disk, big->size);
    free(got);
    free(disk);
    /* A length is honoured, and capped. */
    size_t len = 0;
    assert_int_equal(snapshot_read(f->reg, v.id, big->name, 3, 7, 1000, f->buf, &len), 0);
    assert_int_equal(len, 7);
    assert_int_equal(
        snapshot_read(f->reg, v.id, big->name, 0, 5u * SNAPSHOT_CHUNK_MAX, 1000, f->buf, &len),
        0);
    assert_int_equal(len, SNAPSHOT_CHUNK_MAX);

    struct snapshot_view copy = v;
    uint64_t applied = 0;
    assert_int_equal(store_probe(dir, &applied), 0);
    assert_int_equal(applied, 17);
    assert_int_equal(snapshot_close(f->reg, copy.id), 0);
    assert_int_equal(entries_in(f->snaps), 0);
    assert_int_equal(snapshot_open_count(f->reg), 0);
}

static void test_bad_requests(void **state)
{
    struct fixture *f = *state;
    struct snapshot_view v;
    assert_int_equal(snapshot_open(f->reg, 1000, &v), 0);
    char id[SNAPSHOT_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", v.id);
    const struct snapshot_file *file = &v.files[0];
    size_t len = 12345;
    static const char *const bad[] = {"../x", "a/b", "no-such-file", "..", "", "../db/CURRENT"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(snapshot_read(f->reg, id, bad[i], 0, 10, 1000, f->buf, &len), KR_EINVAL);
    /* A file that exists next to the checkpoint, but is not in it. */
    assert_int_equal(snapshot_read(f->reg, id, "LOCK", 0, 10, 1000, f->buf, &len), KR_EINVAL);
    assert_int_equal(
        snapshot_read(f->reg, id, file->name, file->size + 1, 10, 1000, f->buf, &len), KR_EINVAL);
    assert_int_equal(snapshot_read(f->reg, id, file->name, UINT64_MAX, 10, 1000, f->buf, &len),
                     KR_EINVAL);
    assert_int_equal(len, 12345); /* untouched on failure */
    assert_int_equal(snapshot_read(f->reg, id, file->name, file->size, 10, 1000, f->buf, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(snapshot_read(f->reg, "ffff", file->name, 0, 10, 1000, f->buf, &len),
                     KR_ENOTFOUND);
    assert_int_equal(snapshot_read(f->reg, "", file->name, 0, 10, 1000, f->buf, &len),
                     KR_ENOTFOUND);
    assert_int_equal(snapshot_close(f->reg, "ffff"), KR_ENOTFOUND);

    /* Two at most. */
    struct snapshot_view v2, v3;
    assert_int_equal(snapshot_open(f->reg, 1000, &v2), 0);
    assert_string_not_equal(v2.id, id);
    assert_int_equal(snapshot_open(f->reg, 1000, &v3), KR_EBUSY);
    assert_int_equal(entries_in(f->snaps), 2);
    assert_int_equal(snapshot_close(f->reg, id), 0);
    assert_int_equal(snapshot_close(f->reg, id), KR_ENOTFOUND);
    assert_int_equal(snapshot_read(f->reg, id, "CURRENT", 0, 10, 1000, f->buf, &len),
                     KR_ENOTFOUND);
    assert_int_equal(snapshot_open(f->reg, 1000, &v3), 0);
    assert_int_equal(entries_in(f->snaps), 2);
    /* Freeing the registry (node stop) removes whatever is open. */
    snapshot_registry_free(f->reg);
    f->reg = NULL;
    assert_int_equal(entries_in(f->snaps), 0);
}

static void test_idle_checkpoints_expire(void **state)
{
    struct fixture *f = *state;
    struct snapshot_view a, b;
    assert_int_equal(snapshot_open(f->reg, 1000, &a), 0);
    char id_a[SNAPSHOT_ID_LEN + 1], name[SNAPSHOT_NAME_MAX + 1];
    snprintf(id_a, sizeof(id_a), "%s", a.id);
    snprintf(name, sizeof(name), "%s", a.files[0].name);
    assert_int_equal(snapshot_open(f->reg, 2000, &b), 0);
    char id_b[SNAPSHOT_ID_LEN + 1];
    snprintf(id_b, sizeof(id_b), "%s", b.id);

    snapshot_tick(f->reg, 1000 + SNAPSHOT_IDLE_MS - 1);
    assert_int_equal(snapshot_open_count(f->reg), 2);
    /* A read keeps a checkpoint alive. */
    size_t len = 0;
    assert_int_equal(snapshot_read(f->reg, id_a, name, 0, 1, 1000 + SNAPSHOT_IDLE_MS - 1, f->buf,
                                   &len),
                     0);
    snapshot_tick(f->reg, 2000 + SNAPSHOT_IDLE_MS);
    assert_int_equal(snapshot_open_count(f->reg), 1);
    assert_int_equal(snapshot_read(f->reg, id_b, name, 0, 1, 2000 + SNAPSHOT_IDLE_MS, f->buf,
                                   &len),
                     KR_ENOTFOUND);
    assert_int_equal(entries_in(f->snaps), 1);
    snapshot_tick(f->reg, 1000 + 2 * SNAPSHOT_IDLE_MS - 1);
    assert_int_equal(snapshot_open_count(f->reg), 0);
    assert_int_equal(entries_in(f->snaps), 0);
    assert_int_equal(snapshot_close(f->reg, id_a), KR_ENOTFOUND);
}

int main(void)
{
    log_set_level(LOG_LEVEL_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_name_rules),
        cmocka_unit_test_setup_teardown(test_open_lists_and_reads_the_checkpoint, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bad_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_checkpoints_expire, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
