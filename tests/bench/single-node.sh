#!/usr/bin/env bash
# First figures on one node: create (aes-256) and encrypt (64 B) per second,
# at 1 and 16 connections, median of RUNS runs of SECONDS each. Starts its own
# node in a temp dir on 127.0.0.1 and stops it by pid.
#   tests/bench/single-node.sh [BUILD_DIR]    (env: RUNS=5 SECONDS_EACH=3)
set -euo pipefail
build=$(cd "${1:-$(dirname "$0")/../../build}" && pwd)
runs=${RUNS:-5}
secs=${SECONDS_EACH:-3}
dir=$(mktemp -d /tmp/krbench-XXXXXX)
port=$((10000 + RANDOM % 20000)) # below the ephemeral ports (32768-)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
"$build/keyraftd" init --data "$dir/node" --listen 127.0.0.1:$port \
  --raft-address 127.0.0.1:$((port + 1)) > "$dir/init.log" 2>&1
"$build/keyraftd" --data "$dir/node" > "$dir/node.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  "$build/keyraft" --config "$dir/node/client.conf" status > /dev/null 2>&1 && break
  sleep 0.1
done
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "keyraft single node, $(nproc) cores shared by client and node; median of $runs x ${secs}s"
for op in create encrypt; do
  for t in 1 16; do
    ops=(); p99=()
    for _ in $(seq 1 "$runs"); do
      line=$("$build/kr_bench" --config "$dir/node/client.conf" --op $op --conns $t \
             --seconds "$secs" --max-ops 2000000)
      ops+=("$(sed -E 's/.*ops_per_s=([0-9.]+).*/\1/' <<<"$line")")
      p99+=("$(sed -E 's/.*p99_ms=([0-9.]+).*/\1/' <<<"$line")")
    done
    printf '%-8s threads=%-3s ops/s=%-8s p99_ms=%s   (runs: %s)\n' "$op" "$t" \
      "$(printf '%s\n' "${ops[@]}" | median)" "$(printf '%s\n' "${p99[@]}" | median)" "${ops[*]}"
  done
done
