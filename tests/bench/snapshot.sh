#!/usr/bin/env bash
# Snapshot and catch-up figures: a 3-node cluster on 127.0.0.1 is loaded with
# KEYS aes-256 keys while node 3 is down (so the others compact their logs
# past it), then node 3 restarts and must catch up from a snapshot fetched out
# of band; then a brand-new node 4 joins and does the same. Prints the load
# rate, the checkpoint size on disk, catch-up times, and peak RSS (VmHWM) of
# every node.
#   tests/bench/snapshot.sh [BUILD_DIR]     (env: KEYS=1000000 THREADS=16)
# Not run by CI: at 1M keys it takes several minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
keys=${KEYS:-1000000}
threads=${THREADS:-16}
dir=$(mktemp -d /tmp/krbench-snap-XXXXXX)
base=$((10000 + RANDOM % 20000)) # below the ephemeral ports (32768-)
export KEYRAFT_BUILD="$build" KEYRAFT_CLUSTER_DIR="$dir/c" KEYRAFT_BASE_PORT="$base"
dc() { "$root/scripts/dev-cluster.sh" "$@" >/dev/null; }
cleanup() { dc stop 4 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
k() { "$build/keyraft" --config "$dir/c/client.conf" "$@"; }
applied() { # node i's applied index
  k --endpoint "127.0.0.1:$((base + 10 * ($1 - 1)))" --json status 2>/dev/null |
    sed -nE 's/.*"applied_index": *"?([0-9]+).*/\1/p' | head -1
}
hwm_mb() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$(cat "$dir/c/node$1.pid")/status"; }
now() { date +%s.%N; }

dc start 3
sleep 2
kill -TERM "$(cat "$dir/c/node3.pid")"
while kill -0 "$(cat "$dir/c/node3.pid")" 2>/dev/null; do sleep 0.1; done

t0=$(now)
line=$("$build/kr_bench" --config "$dir/c/client.conf" --op create --conns "$threads" \
       --seconds 600 --max-ops "$keys")
t1=$(now)
echo "load: $line"
awk -v n="$keys" -v a="$t0" -v b="$t1" 'BEGIN {printf "load: %d keys in %.1f s = %.0f keys/s (2 of 3 nodes up)\n", n, b - a, n / (b - a)}'
target=$(applied 1)
echo "leader applied index: $target; node 1 raft dir: $(du -sh "$dir/c/node1/raft" | cut -f1), db: $(du -sh "$dir/c/node1/db" | cut -f1)"
echo "node 1 snapshots on disk: $(ls "$dir/c/node1/raft" | grep -c '^snapshot-.*meta$' || true)"

catch_up() { # node i: start (or already started) -> applied >= target
  local i=$1 t_start=$2 a
  for _ in $(seq 1 6000); do
    a=$(applied "$i" || true)
    if [ -n "$a" ] && [ "$a" -ge "$target" ]; then
      awk -v a="$t_start" -v b="$(now)" -v i="$i" 'BEGIN {printf "node %s caught up in %.2f s\n", i, b - a}'
      return 0
    fi
    sleep 0.1
  done
  echo "node $i did not catch up in 600 s" >&2
  return 1
}

t=$(now)
dc start 3 # restarts node 3 only
catch_up 3 "$t"
grep -h "snapshot" "$dir/c/node3.log" | tail -3

t=$(now)
dc start 4 # a brand-new node: init --join, cluster add, start
catch_up 4 "$t"
grep -h "snapshot" "$dir/c/node4.log" | tail -3
echo "node 4 db after catch-up: $(du -sh "$dir/c/node4/db" | cut -f1)"
for i in 1 2 3 4; do echo "node $i peak RSS (VmHWM): $(hwm_mb "$i") MB"; done
