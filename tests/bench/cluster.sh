#!/usr/bin/env bash
# Cluster figures on 127.0.0.1: replicated create (aes-256) per second on a
# 3-node cluster (fsync'd raft on every node) at 1 and 16 connections, next to
# a single node measured in the same run (the baseline), and failover time:
# leader killed -9 -> the next create acknowledged, measured by kr_bench's
# own clock around one write loop. Median of RUNS runs each.
#   tests/bench/cluster.sh [BUILD_DIR]    (env: RUNS=5 SECONDS_EACH=3 FAILOVERS=5)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
runs=${RUNS:-5}
secs=${SECONDS_EACH:-3}
failovers=${FAILOVERS:-5}
dir=$(mktemp -d /tmp/krbench-cluster-XXXXXX)
base=$((10000 + RANDOM % 20000)) # below the ephemeral ports (32768-)
cluster() { KEYRAFT_BUILD="$build" KEYRAFT_CLUSTER_DIR="$dir/$1" KEYRAFT_BASE_PORT="$2" \
            "$root/scripts/dev-cluster.sh" "$3" "$4" >/dev/null; }
cleanup() {
  cluster one $base stop 1 2>/dev/null || true
  cluster three $((base + 100)) stop 3 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*$1=([0-9.]+).*/\\1/"; }

cluster one $base start 1
cluster three $((base + 100)) start 3
sleep 2 # let the new voters finish their promotion
echo "keyraft on $(nproc) cores shared by client and nodes; median of $runs x ${secs}s"
for t in 1 16; do
  for c in one three; do
    ops=(); p99=()
    for _ in $(seq 1 "$runs"); do
      line=$("$build/kr_bench" --config "$dir/$c/client.conf" --op create --conns $t \
             --seconds "$secs" --max-ops 2000000)
      ops+=("$(field ops_per_s <<<"$line")"); p99+=("$(field p99_ms <<<"$line")")
    done
    m=$(printf '%s\n' "${ops[@]}" | median)
    [ "$c" = one ] && one=$m
    printf 'create %-5s nodes threads=%-3s ops/s=%-8s p99_ms=%-7s (runs: %s)\n' \
      "$c" "$t" "$m" "$(printf '%s\n' "${p99[@]}" | median)" "${ops[*]}"
  done
  awk -v a="$m" -v b="$one" 'BEGIN {printf "  ratio 3 nodes / 1 node: %.2f\n", a / b}'
done

# Failover: a writer runs while the leader is killed; kr_bench reports the
# longest gap between two acknowledged creates, which spans the election.
gaps=()
for i in $(seq 1 "$failovers"); do
  leader=$("$build/keyraft" --config "$dir/three/client.conf" --json status |
           sed -nE 's/.*"leader_id": *"?([0-9]+).*/\1/p' | head -1)
  "$build/kr_bench" --config "$dir/three/client.conf" --op create --conns 1 \
    --seconds 8 --max-ops 2000000 > "$dir/fo.out" &
  bench=$!
  sleep 2
  kill -9 "$(cat "$dir/three/node$leader.pid")"
  wait "$bench" || true
  gaps+=("$(field max_gap_ms < "$dir/fo.out")")
  cluster three $((base + 100)) start 3 # restarts the killed node
  sleep 2
done
printf 'failover (leader kill -9 -> next acknowledged create): median %s ms (runs: %s)\n' \
  "$(printf '%s\n' "${gaps[@]}" | median)" "${gaps[*]}"
