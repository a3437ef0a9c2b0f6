/* test_snapshot_pace.c: where each node of a cluster takes its raft snapshots
 * (cluster_snapshot_threshold). A snapshot flushes the node's store; nodes
 * that flush together slow every commit at once, so each node keeps to its
 * own offset in the interval. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>

#include "cluster.h"

/* A single node snapshots at multiples of the interval, wherever the last
 * snapshot landed (raft checks after a batch of entries, so it overshoots). */
static void test_single_node_keeps_multiples(void **state)
{
    (void)state;
    assert_int_equal(cluster_snapshot_threshold(0, 8192, 0, 1), 8192);
    assert_int_equal(cluster_snapshot_threshold(8192, 8192, 0, 1), 8192);
    assert_int_equal(cluster_snapshot_threshold(8200, 8192, 0, 1), 8184); /* back on 16384 */
    /* far past a multiple: never sooner than half an interval */
    assert_int_equal(cluster_snapshot_threshold(8192 + 5000, 8192, 0, 1), 8192 * 3 - 13192);
    /* an interval under raft's useful minimum is taken as 16 */
    assert_int_equal(cluster_snapshot_threshold(0, 1, 0, 1), 16);
    /* a slot out of range is slot 0 of 1, not a division by zero */
    assert_int_equal(cluster_snapshot_threshold(0, 1024, 0, 0), 1024);
    assert_int_equal(cluster_snapshot_threshold(0, 1024, 5, 3), 1024);
}

/* Three nodes from a fresh log: slot k's first snapshot lands at k/3 of the
 * interval, past half an interval; an interval that is not a power of two is
 * taken as the one below it. */
static void test_three_slots_first_snapshot(void **state)
{
    (void)state;
    assert_int_equal(cluster_snapshot_threshold(0, 1024, 0, 3), 1024);
    assert_int_equal(cluster_snapshot_threshold(0, 1024, 1, 3), 1365);
    assert_int_equal(cluster_snapshot_threshold(0, 1024, 2, 3), 682);
    assert_int_equal(cluster_snapshot_threshold(0, 2047, 2, 3), 682);
    for (uint64_t base = 0; base < 5000; base += 37)
        for (unsigned slot = 0; slot < 3; slot++) {
            unsigned t = cluster_snapshot_threshold(base, 1100, slot, 3);
            assert_true(t >= 512 && t < 1536);
            assert_int_equal((base + t) % 1024, 1024 * slot / 3);
        }
}

/* Distance from |x| to the nearest of |n| indexes in |v|. */
static uint64_t nearest(const uint64_t *v, size_t n, uint64_t x)
{
    uint64_t best = UINT64_MAX;
    for (size_t i = 0; i < n; i++) {
        uint64_t d = v[i] > x ? v[i] - x : x - v[i];
        if (d < best)
            best = d;
    }
    return best;
}

/* Three nodes apply the same log, each in batches of its own (1 to 8
 * entries, as raft hands them over), and snapshot when raft would: once the
 * entries past the last snapshot reach the threshold, checked after each
 * batch. The interval each asks for wanders by +-7% (it follows the mean
 * entry size). From the second snapshot on, no two nodes snapshot within a
 * sixth of the interval of each other (with one slot for all they snapshot at
 * the same indexes), and each keeps one interval between its snapshots. */
#define NODES 3
#define INTERVAL 600u /* wandering from 560 to 640: 512 */
#define LOG_LEN 60000u
static void test_nodes_snapshot_apart(void **state)
{
    (void)state;
    static uint64_t snaps[NODES][LOG_LEN / 256 + 2];
    size_t n_snaps[NODES] = {0};
    srand(7);
    for (unsigned node = 0; node < NODES; node++) {
        uint64_t applied = 0, last = 0;
        while (applied < LOG_LEN) {
            applied += 1 + (unsigned)rand() % 8;
            unsigned asked = INTERVAL - 40 + (unsigned)rand() % 81;
            if (applied - last >= cluster_snapshot_threshold(last, asked, node, NODES)) {
                last = applied;
                snaps[node][n_snaps[node]++] = applied;
            }
        }
        size_t n = n_snaps[node];
        assert_in_range(n, LOG_LEN / 512 - 2, LOG_LEN / 512 + 1);
        for (size_t i = 2; i < n; i++)
            assert_in_range(snaps[node][i] - snaps[node][i - 1], 512 - 8, 512 + 8);
    }
    for (unsigned a = 0; a < NODES; a++)
        for (unsigned b = 0; b < NODES; b++)
            for (size_t i = 1; a != b && i < n_snaps[a]; i++)
                assert_true(nearest(snaps[b], n_snaps[b], snaps[a][i]) >= 512 / 6);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_node_keeps_multiples),
        cmocka_unit_test(test_three_slots_first_snapshot),
        cmocka_unit_test(test_nodes_snapshot_apart),
    };
    return cmocka_run_group_tests_name("snapshot_pace", tests, NULL, NULL);
}
