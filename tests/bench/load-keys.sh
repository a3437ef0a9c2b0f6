#!/usr/bin/env bash
# The large load of issue 5: a 3-node cluster on 127.0.0.1 (scripts/dev-cluster.sh)
# is loaded with KEYS aes-256 keys by CONNS parallel `keyraft create-bulk`
# processes (BATCH keys per request, disjoint --start ranges), then reports one
# line per figure: load time and keys/s, disk and RSS (VmHWM, VmRSS) per node,
# a follower's restart time (stop, start, until its applied index reaches the
# leader's commit index at restart time), the raft snapshot size and the
# checkpoint size when a node fetched one, and list / get-by-name latency at
# that size (median of 20 CLI runs each, next to `status` as the CLI's own
# start-and-handshake cost). Stops the cluster at the end.
#   tests/bench/load-keys.sh [BUILD_DIR]
#   env: KEYS=10000000 BATCH=1000 CONNS=2 KEEP=1 (keep the data dir)
# Not run by CI: 10M keys take a long time and several GB of disk per node.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
keys=${KEYS:-10000000}
batch=${BATCH:-1000}
conns=${CONNS:-2}
dir=$(mktemp -d /tmp/krbench-load-XXXXXX)
base=$((10000 + RANDOM % 20000)) # below the ephemeral ports (32768-)
export KEYRAFT_BUILD="$build" KEYRAFT_CLUSTER_DIR="$dir/c" KEYRAFT_BASE_PORT="$base"
dc() { "$root/scripts/dev-cluster.sh" "$@" >/dev/null; }
cleanup() {
  dc stop 3 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "data kept in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
k() { "$build/keyraft" --config "$dir/c/client.conf" "$@"; }
port() { echo $((base + 10 * ($1 - 1))); }
status_field() { # node i, field
  k --endpoint "127.0.0.1:$(port "$1")" --json status 2>/dev/null |
    sed -nE "s/.*\"$2\": *\"?([0-9]+).*/\\1/p" | head -1
}
pid_of() { cat "$dir/c/node$1.pid"; }
now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.0f", (b - a) * 1000}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

dc start 3
sleep 2 # the last voter's promotion settles

# ---- load ----------------------------------------------------------------------------
per=$(( (keys + conns - 1) / conns ))
t0=$(now)
pids=()
for c in $(seq 0 $((conns - 1))); do
  start=$((c * per))
  count=$per
  [ $((start + count)) -gt "$keys" ] && count=$((keys - start))
  [ "$count" -le 0 ] && continue
  k --timeout-ms 120000 create-bulk --prefix load --count "$count" --start "$start" \
    --batch "$batch" --out /dev/null 2>"$dir/bulk$c.log" &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
t1=$(now)
created=$(cat "$dir"/bulk*.log | sed -nE 's/.*created ([0-9]+), existed ([0-9]+), failed ([0-9]+).*/\1/p' |
          awk '{s += $1} END {print s + 0}')
bad=$(cat "$dir"/bulk*.log | sed -nE 's/.*failed ([0-9]+) in.*/\1/p' | awk '{s += $1} END {print s + 0}')
if [ "$failed" -ne 0 ]; then
  echo "a create-bulk process failed; its log:" >&2
  tail -5 "$dir"/bulk*.log >&2
fi
awk -v n="$created" -v a="$t0" -v b="$t1" -v c="$conns" -v bs="$batch" -v f="$bad" 'BEGIN {
  printf "load: %d keys created (%d failed) in %.1f s by %d create-bulk processes, batch %d\n", n, f, b - a, c, bs
  printf "load rate: %.0f keys/s\n", n / (b - a) }'

leader=$(status_field 1 leader_id)
for i in 1 2 3; do
  echo "node $i disk: $(du -sb "$dir/c/node$i" | cut -f1) bytes (db $(du -sb "$dir/c/node$i/db" | cut -f1), raft $(du -sb "$dir/c/node$i/raft" | cut -f1))"
done
for i in 1 2 3; do
  awk -v i="$i" '/VmHWM/ {h = $2} /VmRSS/ {r = $2} END {printf "node %s RSS: VmHWM %.0f MB, VmRSS %.0f MB\n", i, h / 1024, r / 1024}' \
    "/proc/$(pid_of "$i")/status"
done

# ---- latency at this size ------------------------------------------------------------
lat() { # command... -> median ms of 20 runs
  local xs=() t
  for _ in $(seq 1 20); do
    t=$(now)
    "$@" >/dev/null
    xs+=("$(ms_since "$t")")
  done
  printf '%s\n' "${xs[@]}" | median
}
lp=127.0.0.1:$(port "$leader")
echo "status latency (CLI start + TLS + request): median $(lat k --endpoint "$lp" status) ms"
echo "list (first page of 100) latency: median $(lat k --endpoint "$lp" list --limit 100) ms"
echo "list --prefix load-9 (100) latency: median $(lat k --endpoint "$lp" list --prefix load-9 --limit 100) ms"
echo "get by name latency: median $(lat k --endpoint "$lp" get name:load-$((keys / 2))) ms"

# ---- a follower's restart --------------------------------------------------------------
f=1
[ "$f" = "$leader" ] && f=2
kill -TERM "$(pid_of "$f")"
for _ in $(seq 1 600); do kill -0 "$(pid_of "$f")" 2>/dev/null || break; sleep 0.1; done
target=$(status_field "$leader" commit_index)
t=$(now)
dc start 3 # restarts node $f only
up=""
for _ in $(seq 1 36000); do
  a=$(status_field "$f" applied_index || true)
  [ -z "$up" ] && [ -n "$a" ] && up=$(ms_since "$t")
  if [ -n "$a" ] && [ "$a" -ge "$target" ]; then break; fi
  sleep 0.05
done
echo "follower $f restart: serving after ${up:-?} ms, applied index $a >= leader commit $target after $(ms_since "$t") ms"
echo "follower $f RSS after restart: $(awk '/VmRSS/ {printf "%.0f MB", $2 / 1024}' "/proc/$(pid_of "$f")/status")"

# ---- snapshots ---------------------------------------------------------------------------
for i in 1 2 3; do
  snaps=$(find "$dir/c/node$i/raft" -maxdepth 1 -name 'snapshot-*' -printf '%s\n' 2>/dev/null |
          awk '{s += $1; n++} END {printf "%d files, %d bytes", n, s}')
  echo "node $i raft snapshot files: $snaps"
done
fetched=$(grep -h "store fetched from" "$dir"/c/node*.log || true)
if [ -n "$fetched" ]; then
  echo "checkpoint fetched: $fetched"
else
  echo "checkpoint fetched: none (no node fell behind the leader's log)"
fi
