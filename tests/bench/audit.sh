#!/usr/bin/env bash
# The cost of the audit trail on throughput: encrypt (64 B) per second on one
# node with [audit] enabled = true and = false, alternating on the same node
# and data, at 1 and 16 connections; median of RUNS runs of SECONDS each per
# setting, and the on/off ratio. Starts its own node in a temp dir on
# 127.0.0.1 and stops it by pid.
#   tests/bench/audit.sh [BUILD_DIR]    (env: RUNS=5 SECONDS_EACH=3)
set -euo pipefail
build=$(cd "${1:-$(dirname "$0")/../../build}" && pwd)
runs=${RUNS:-5}
secs=${SECONDS_EACH:-3}
dir=$(mktemp -d /tmp/krbench-XXXXXX)
port=$((10000 + RANDOM % 20000)) # below the ephemeral ports (32768-)
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
cleanup() { stop; rm -rf "$dir"; }
trap cleanup EXIT
"$build/keyraftd" init --data "$dir/node" --listen 127.0.0.1:$port \
  --raft-address 127.0.0.1:$((port + 1)) > "$dir/init.log" 2>&1
conf="$dir/node/keyraftd.conf"

# Starts the node with [audit] enabled = $1 and waits until it answers.
start() {
  sed -i '/^\[audit\]/,$d' "$conf"
  printf '[audit]\nenabled = %s\n' "$1" >> "$conf"
  "$build/keyraftd" --data "$dir/node" >> "$dir/node.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    "$build/keyraft" --config "$dir/node/client.conf" status > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the node did not start; see $dir/node.log" >&2
  exit 1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*$1=([0-9.]+).*/\\1/"; }

echo "keyraft audit cost, one node, $(nproc) cores shared by client and node; median of $runs x ${secs}s"
for t in 1 16; do
  declare -A ops=() p99=()
  for _ in $(seq 1 "$runs"); do
    for mode in true false; do
      start "$mode"
      line=$("$build/kr_bench" --config "$dir/node/client.conf" --op encrypt --conns $t \
             --seconds "$secs" --max-ops 2000000)
      stop
      ops[$mode]+="$(field ops_per_s <<<"$line") "
      p99[$mode]+="$(field p99_ms <<<"$line") "
    done
  done
  on=$(tr ' ' '\n' <<<"${ops[true]}" | grep . | median)
  off=$(tr ' ' '\n' <<<"${ops[false]}" | grep . | median)
  printf 'encrypt threads=%-3s audit=on  ops/s=%-8s p99_ms=%-6s (runs: %s)\n' "$t" "$on" \
    "$(tr ' ' '\n' <<<"${p99[true]}" | grep . | median)" "${ops[true]}"
  printf 'encrypt threads=%-3s audit=off ops/s=%-8s p99_ms=%-6s (runs: %s)\n' "$t" "$off" \
    "$(tr ' ' '\n' <<<"${p99[false]}" | grep . | median)" "${ops[false]}"
  awk -v a="$on" -v b="$off" -v t="$t" 'BEGIN {printf "encrypt threads=%-3s on/off ratio=%.3f\n", t, a / b}'
  unset ops p99
done
start true
echo "audit chain head after the runs: $("$build/keyraft" --config "$dir/node/auditor.conf" \
  audit tail -n 1 2>&1 | cut -c1-120)"
stop
