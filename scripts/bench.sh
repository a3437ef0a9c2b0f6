#!/usr/bin/env bash
# bench.sh: the standard benchmark set of issue 5, with its etcd baseline, on
# 127.0.0.1. keyraft on 1 node and on a 3-node cluster (fsync'd raft):
# create (aes-256), get (attributes), encrypt 64 B, decrypt 64 B, sign
# (ec-p256), data key, at concurrency 1, 16 and 256, plus batches of 100
# operations per frame; then a 3-node etcd (Debian's etcd-server, default
# settings: fsync on) with 256-byte values: put, and get (range). Prints one
# line per figure (the median of RUNS runs of SECONDS_EACH seconds, each field
# on its own), then the keyraft/etcd ratios and the issue's targets; the
# create/put ratio targets read paired runs (paired_creates below).
#   scripts/bench.sh            env: RUNS=3 SECONDS_EACH=5 (SECONDS=N also works)
#                               BUILD=DIR (default ./build, built here if needed)
#                               OPS="create get ..." CONCS="1 16 256" NODES="1 3"
#                               BATCH_OPS="encrypt create" PIPE_OPS="encrypt decrypt"
#                               (each may be empty; PIPE_OPS run at c=64 = 1x64)
#                               ETCD=0 (skip the baseline), KEEP=1 (keep the logs)
# Concurrency c is C connections x D requests in flight each: keyraft c=1 is
# 1x1, c=16 is 16x1 and c=256 is 16x16 (the protocol pipelines; 256 blocking
# threads on 2 cores would measure the scheduler); etcd's JSON gateway speaks
# HTTP/1.1, one request in flight per connection, so its c=256 is 256
# connections. Both clients drive all their connections from one thread
# polling them, as an event-driven application would (kr_bench --threads 1,
# etcd_bench's default), so neither pays for a thread per connection on the
# two cores the nodes share. Each system runs alone, the other stopped, but in
# the paired runs of the ratio targets (paired_creates).
env_seconds=$SECONDS # bash counts SECONDS up from a value given in the environment
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
runs=${RUNS:-3}
secs=${SECONDS_EACH:-}
if [ -z "$secs" ]; then
  if [ "$env_seconds" -gt 0 ]; then secs=$env_seconds; else secs=5; fi
fi
ops=${OPS-create get encrypt decrypt sign datakey}
concs=${CONCS-1 16 256}
nodes_list=${NODES-1 3}
batch_ops=${BATCH_OPS-encrypt create}
pipe_ops=${PIPE_OPS-encrypt decrypt}
run_etcd=${ETCD:-1}
run_timeout=$((secs + 90)) # a run drains what is in flight; a stuck one is cut

if [ -n "${BUILD:-}" ]; then
  build=$(cd "$BUILD" && pwd)
else
  build=$root/build
  if [ ! -x "$build/keyraftd" ] || [ ! -x "$build/keyraft" ] || [ ! -x "$build/kr_bench" ] ||
     { [ "$run_etcd" = 1 ] && [ ! -x "$build/etcd_bench" ]; }; then
    scripts/setup.sh >&2
    cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    targets="keyraftd keyraft-cli kr_bench"
    [ "$run_etcd" = 1 ] && targets="$targets etcd_bench"
    cmake --build build -j"$(nproc)" --target $targets >&2
  fi
fi
if [ "$run_etcd" = 1 ] && ! command -v etcd >/dev/null; then
  echo "bench: etcd not found: run scripts/setup.sh (etcd-server), or ETCD=0" >&2
  exit 1
fi

dir=$(mktemp -d /tmp/krbench-XXXXXX)
etcd_pids=()

listening() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
# A base port with BASE..BASE+299 free (1 node at +0, 3 nodes at +100, etcd at
# +200), below the ephemeral range: the outgoing connections of a run (256 to
# etcd, the raft peers') take their local ports from that range, and a node
# restarted on such a port fails to listen.
pick_base() {
  local b p busy low slots
  low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  slots=$(( (low - 10000 - 300) / 100 ))
  [ "$slots" -ge 1 ] || slots=1
  for _ in $(seq 1 50); do
    b=$((10000 + (RANDOM % slots) * 100))
    busy=0
    for p in $b $((b + 1)) $(seq $((b + 100)) $((b + 121))) $(seq $((b + 200)) $((b + 205))); do
      if listening "$p"; then busy=1; break; fi
    done
    [ "$busy" = 0 ] && { echo "$b"; return 0; }
  done
  echo "bench: no free port range found" >&2
  return 1
}
base=$(pick_base)

kr_cluster() { # kr_cluster NAME BASE start|stop N
  KEYRAFT_BUILD="$build" KEYRAFT_CLUSTER_DIR="$dir/$1" KEYRAFT_BASE_PORT="$2" \
    "$root/scripts/dev-cluster.sh" "$3" "$4" >>"$dir/dev-cluster.log" 2>&1
}

stop_pid() { # TERM, up to 10 s, then KILL; only the pid given
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

etcd_stop() {
  local pid
  for pid in "${etcd_pids[@]}"; do stop_pid "$pid"; done
  for pid in "${etcd_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  etcd_pids=()
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  kr_cluster one "$base" stop 1 2>/dev/null || true
  kr_cluster three $((base + 100)) stop 3 2>/dev/null || true
  etcd_stop
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "bench: logs kept in $dir" >&2
  else
    rm -rf "$dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

etcd_client_port() { echo $((base + 200 + 2 * ($1 - 1))); }
etcd_peer_port() { echo $((base + 201 + 2 * ($1 - 1))); }

# A 3-node etcd on 127.0.0.1 with the shipped defaults (fsync on); sets
# etcd_leader to the leader's client URL. Not in a subshell: it records pids.
etcd_leader=""
etcd_start() {
  local i initial="" eps="" leader=""
  mkdir -p "$dir/etcd"
  for i in 1 2 3; do
    initial="$initial${initial:+,}e$i=http://127.0.0.1:$(etcd_peer_port $i)"
    eps="$eps${eps:+,}http://127.0.0.1:$(etcd_client_port $i)"
  done
  for i in 1 2 3; do
    setsid etcd --name "e$i" --data-dir "$dir/etcd/e$i" \
      --listen-client-urls "http://127.0.0.1:$(etcd_client_port $i)" \
      --advertise-client-urls "http://127.0.0.1:$(etcd_client_port $i)" \
      --listen-peer-urls "http://127.0.0.1:$(etcd_peer_port $i)" \
      --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_peer_port $i)" \
      --initial-cluster "$initial" --initial-cluster-state new \
      --initial-cluster-token "krbench-$$" >"$dir/etcd/e$i.log" 2>&1 </dev/null &
    etcd_pids+=($!)
  done
  for _ in $(seq 1 600); do
    leader=$(ETCDCTL_API=3 etcdctl --endpoints="$eps" endpoint status -w simple 2>/dev/null |
             awk -F', ' '$5 == "true" {print $1}' | head -1)
    if [ -n "$leader" ] &&
       ETCDCTL_API=3 etcdctl --endpoints="$eps" endpoint health >/dev/null 2>&1; then
      etcd_leader=$leader
      return 0
    fi
    sleep 0.1
  done
  echo "bench: etcd did not come up in 60 s; logs in $dir/etcd" >&2
  return 1
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print 0}'; }
field() { sed -nE "s/(^|.* )$1=([^ ]+).*/\\2/p" | head -1; }

# Shape of concurrency c for keyraft: "CONNS INFLIGHT".
kr_shape() {
  case "$1" in
    1) echo "1 1" ;;
    16) echo "16 1" ;;
    256) echo "16 16" ;;
    *) if [ "$1" -le 16 ]; then echo "$1 1"; else echo "16 $(( ($1 + 15) / 16 ))"; fi ;;
  esac
}

# figure SYSTEM NODES OP CONC BATCH CMD...: RUNS runs of CMD, one line of medians.
declare -A result_ops result_p99
figure() {
  local sys=$1 nodes=$2 op=$3 conc=$4 batch=$5
  shift 5
  local i line rc out=() errs=0 unsupported=""
  for i in $(seq 1 "$runs"); do
    rc=0
    line=$(timeout "$run_timeout" "$@" 2>>"$dir/bench-stderr.log") || rc=$?
    echo "$sys nodes=$nodes run=$i $line rc=$rc" >>"$dir/runs.log"
    if [ "$rc" = 3 ]; then unsupported=1; break; fi
    if [ -z "$line" ]; then
      echo "$sys nodes=$nodes op=$op conc=$conc: run $i failed (rc=$rc); see $dir/bench-stderr.log" >&2
      continue
    fi
    out+=("$line")
    errs=$((errs + $(field errors <<<"$line")))
  done
  local tag="$sys nodes=$nodes op=$op conc=$conc"
  [ "$batch" -gt 0 ] && tag="$tag batch=$batch"
  if [ -n "$unsupported" ]; then
    echo "$tag unsupported: the node does not serve BatchRequest yet ($(tail -1 "$dir/bench-stderr.log" | sed 's/^[^(]*(//; s/)$//'))"
    return 0
  fi
  if [ ${#out[@]} -eq 0 ]; then
    echo "$tag failed: no run completed (see $dir/bench-stderr.log)"
    return 0
  fi
  local m_ops m_p50 m_p99 m_p999 shape all
  m_ops=$(for l in "${out[@]}"; do field ops_per_s <<<"$l"; done | median)
  m_p50=$(for l in "${out[@]}"; do field p50_ms <<<"$l"; done | median)
  m_p99=$(for l in "${out[@]}"; do field p99_ms <<<"$l"; done | median)
  m_p999=$(for l in "${out[@]}"; do field p999_ms <<<"$l"; done | median)
  all=$(for l in "${out[@]}"; do field ops_per_s <<<"$l"; done | paste -sd, -)
  shape="threads=$(field threads <<<"${out[0]}") conns=$(field conns <<<"${out[0]}") inflight=$(field inflight <<<"${out[0]}")"
  echo "$tag ops_per_s=$m_ops p50_ms=$m_p50 p99_ms=$m_p99 p999_ms=$m_p999 $shape errors=$errs runs=$all"
  result_ops["$sys/$nodes/$op/$conc/$batch"]=$m_ops
  result_p99["$sys/$nodes/$op/$conc/$batch"]=$m_p99
}

kr_figures() { # kr_figures NODES CONFIG
  local nodes=$1 conf=$2 op c shape
  for op in $ops; do
    for c in $concs; do
      read -r conns depth <<<"$(kr_shape "$c")"
      figure keyraft "$nodes" "$op" "$c" 0 "$build/kr_bench" --config "$conf" --op "$op" \
        --conns "$conns" --threads 1 --inflight "$depth" --seconds "$secs" --max-ops 100000000
    done
  done
  # One connection pipelining 64 requests (c=64 is 1x64): the client's
  # thread and the node's loop each get a core.
  for op in $pipe_ops; do
    figure keyraft "$nodes" "$op" 64 0 "$build/kr_bench" --config "$conf" --op "$op" \
      --conns 1 --inflight 64 --seconds "$secs" --max-ops 100000000
  done
  # Batches: 16 frames of 100 operations in flight (16 connections x 1).
  for op in $batch_ops; do
    figure keyraft "$nodes" "$op" 16 100 "$build/kr_bench" --config "$conf" --op "$op" \
      --conns 16 --threads 1 --inflight 1 --batch 100 --seconds "$secs" --max-ops 1000000000
  done
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# The create/put ratio from paired runs: with etcd and the 3-node keyraft both
# up (the idle one costs ~1% of a core), each keyraft run is followed at once
# by the etcd run it is divided by, and the target reads the median of those
# RUNS ratios. This machine drifts within minutes (fdatasync's p50 doubled in
# an hour here), and the figures above measure the two systems minutes apart.
declare -A pair_ratio
paired_creates() {
  [[ " $nodes_list " == *" 3 "* ]] && [[ " $ops " == *" create "* ]] || return 0
  local b=$((base + 100)) c i conns depth kl el k e ratios kr er
  if ! kr_cluster three "$b" start 3; then
    echo "bench: the 3-node keyraft did not restart for the paired runs" >&2
    return 0
  fi
  sleep 2
  for c in $concs; do
    read -r conns depth <<<"$(kr_shape "$c")"
    ratios="" kr="" er=""
    for i in $(seq 1 "$runs"); do
      kl=$(timeout "$run_timeout" "$build/kr_bench" --config "$dir/three/client.conf" --op create \
        --conns "$conns" --threads 1 --inflight "$depth" --seconds "$secs" \
        --max-ops 100000000 2>>"$dir/bench-stderr.log") || true
      el=$(timeout "$run_timeout" "$build/etcd_bench" --endpoint "$etcd_leader" --op put \
        --conns "$c" --seconds "$secs" --max-ops 100000000 --size 256 \
        2>>"$dir/bench-stderr.log") || true
      echo "paired keyraft run=$i $kl" >>"$dir/runs.log"
      echo "paired etcd run=$i $el" >>"$dir/runs.log"
      k=$(field ops_per_s <<<"$kl"); e=$(field ops_per_s <<<"$el")
      [ -n "$k" ] && [ -n "$e" ] || continue
      kr="$kr${kr:+,}$k" er="$er${er:+,}$e"
      ratios="$ratios $(awk -v k="$k" -v e="$e" 'BEGIN {printf "%.2f", (e > 0 ? k / e : 0)}')"
    done
    [ -n "$ratios" ] || continue
    pair_ratio[$c]=$(tr ' ' '\n' <<<"$ratios" | grep . | median)
    echo "paired keyraft/etcd nodes=3 op=create/put conc=$c ratio=${pair_ratio[$c]}" \
      "ratios=$(echo $ratios | tr ' ' ,) keyraft_runs=$kr etcd_runs=$er"
  done
  kr_cluster three "$b" stop 3
}

echo "# keyraft $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') bench on $(nproc) cores shared by clients and servers; $(uname -r)"
echo "# median of $runs runs x ${secs}s per figure; load average at start: $(loadavg)"
echo "# keyraft c: 1=1x1, 16=16x1, 256=16x16, 64=1x64 (connections x in flight); etcd c = connections (HTTP/1.1)"
# A replicated write waits for fdatasyncs: their time on this disk today is
# the floor under c=1, and what figures from other days are read against.
fsync_line() { "$build/kr_bench" --fsync-probe "$dir" | sed 's/^fsync_probe /# disk: fdatasync of 4 KiB: /'; }
fsync_line

for n in $nodes_list; do
  if [ "$n" = 1 ]; then name=one; b=$base; else name=three; b=$((base + 100)); fi
  if ! kr_cluster "$name" "$b" start "$n"; then
    echo "bench: the $n-node keyraft did not start; $dir/dev-cluster.log says:" >&2
    tail -5 "$dir/dev-cluster.log" >&2
    exit 1
  fi
  [ "$n" -gt 1 ] && sleep 2 # the last voter's promotion settles
  kr_figures "$n" "$dir/$name/client.conf"
  kr_cluster "$name" "$b" stop "$n"
done

if [ "$run_etcd" = 1 ]; then
  etcd_start
  leader=$etcd_leader
  etcd_v=$(etcd --version 2>/dev/null | awk '/etcd Version/ {print $3}')
  echo "# etcd $etcd_v, 3 nodes, leader $leader; requests go to the leader"
  for c in $concs; do
    figure etcd 3 put "$c" 0 "$build/etcd_bench" --endpoint "$leader" --op put --conns "$c" \
      --seconds "$secs" --max-ops 100000000 --size 256
  done
  for c in $concs; do
    figure etcd 3 get "$c" 0 "$build/etcd_bench" --endpoint "$leader" --op get --conns "$c" \
      --seconds "$secs" --max-ops 100000000 --size 256 --serializable
  done
  for c in $concs; do
    figure etcd 3 get_linearizable "$c" 0 "$build/etcd_bench" --endpoint "$leader" --op get \
      --conns "$c" --seconds "$secs" --max-ops 100000000 --size 256
  done
  paired_creates
  etcd_stop

  # keyraft's get is served from the node's state (after min_index), like
  # etcd's serializable range: those two are compared.
  for c in $concs; do
    for pair in "create put" "get get"; do
      read -r kop eop <<<"$pair"
      for n in 3 1; do
        k=${result_ops["keyraft/$n/$kop/$c/0"]:-}
        e=${result_ops["etcd/3/$eop/$c/0"]:-}
        [ -n "$k" ] && [ -n "$e" ] || continue
        awk -v k="$k" -v e="$e" -v c="$c" -v n="$n" -v ko="$kop" -v eo="$eop" 'BEGIN {
          printf "ratio keyraft/etcd keyraft_nodes=%s etcd_nodes=3 op=%s/%s conc=%s ops_per_s_ratio=%.2f\n",
                 n, ko, eo, c, (e > 0 ? k / e : 0) }'
      done
    done
  done
fi

# The issue's targets, where this run measured what they need.
target() { echo "target $1: $2 -> $3"; }
for c in $concs; do
  r=${pair_ratio[$c]:-}
  if [ -n "$r" ]; then
    target "replicated create >= 3x etcd put/s at c=$c" "${r}x (median of paired runs)" \
      "$(awk -v r="$r" 'BEGIN {print (r >= 3 ? "met" : "missed")}')"
  fi
done
p=${result_p99["keyraft/3/create/16/0"]:-}
[ -n "$p" ] && target "replicated create p99 < 10 ms at c=16" "$p ms" \
  "$(awk -v p="$p" 'BEGIN {print (p < 10 ? "met" : "missed")}')"
for c in $concs 64; do
  k=${result_ops["keyraft/1/encrypt/$c/0"]:-}; p=${result_p99["keyraft/1/encrypt/$c/0"]:-}
  [ -n "$k" ] && target "encrypt 1 node >= 100000/s with p99 < 2 ms at c=$c" "$k/s p99 $p ms" \
    "$(awk -v k="$k" -v p="$p" 'BEGIN {print (k >= 100000 && p < 2 ? "met" : "missed")}')"
done
k=${result_ops["keyraft/1/encrypt/16/100"]:-}
if [ -n "$k" ]; then
  target "batched encrypt 1 node >= 1000000/s" "$k/s" \
    "$(awk -v k="$k" 'BEGIN {print (k >= 1000000 ? "met" : "missed")}')"
elif [[ " $nodes_list " == *" 1 "* ]] && [[ " $batch_ops " == *" encrypt "* ]]; then
  target "batched encrypt 1 node >= 1000000/s" "not measured (batches not served)" "open"
fi
fsync_line
echo "# load average at end: $(loadavg)"
