#!/usr/bin/env bash
# dev-cluster.sh start|stop|status [N]: an N-node keyraft cluster on 127.0.0.1
# (default 3), each node with its own SoftHSM token, certificates and data dir
# under ${KEYRAFT_CLUSTER_DIR:-./keyraft-cluster}. Node 1 bootstraps; every other
# node joins the way an operator's would: `keyraftd init --join`, then
# `keyraft cluster add` (the MWK goes HSM to HSM), then start.
# Ports: node i serves clients on BASE+10*(i-1) and raft on that +1
# (BASE=${KEYRAFT_BASE_PORT:-7400}).
# Environment: KEYRAFT_BUILD (a build dir with keyraftd and keyraft; built
# here when unset), KEYRAFT_STANDBY (ids to admit as standbys, e.g. "4 5").
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
cmd="${1:-}"
n="${2:-3}"
dir="${KEYRAFT_CLUSTER_DIR:-$root/keyraft-cluster}"
base="${KEYRAFT_BASE_PORT:-7400}"
standby=" ${KEYRAFT_STANDBY:-} "

usage() { echo "usage: $0 start|stop|status [N]" >&2; exit 2; }

build_tools() {
  if [ -n "${KEYRAFT_BUILD:-}" ]; then
    bin="$KEYRAFT_BUILD"
    return
  fi
  scripts/setup.sh
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build build -j"$(nproc)" --target keyraftd keyraft-cli >/dev/null
  bin="$root/build"
}

# Running and not a zombie waiting to be reaped (kill -0 succeeds on those).
alive() {
  local pid="$1" state
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

client_port() { echo $((base + 10 * ($1 - 1))); }
raft_port() { echo $((base + 10 * ($1 - 1) + 1)); }

endpoints() {
  local list="" i
  for i in $(seq 1 "$1"); do list="$list${list:+,}127.0.0.1:$(client_port "$i")"; done
  echo "$list"
}

# Waits until node $1 answers status (up to 60 s).
wait_up() {
  local i="$1" t
  for t in $(seq 1 600); do
    if "$bin/keyraft" --config "$dir/client.conf" --endpoint "127.0.0.1:$(client_port "$i")" \
      status >/dev/null 2>&1; then
      return 0
    fi
    if ! alive "$(cat "$dir/node$i.pid")"; then
      echo "node $i exited; its log: $dir/node$i.log" >&2
      tail -20 "$dir/node$i.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "node $i did not come up in 60 s; its log: $dir/node$i.log" >&2
  return 1
}

# Waits until the leader has node $1 in raft with the role the registry
# wants for it (the promotion follows its catch-up), up to 60 s.
wait_member() {
  local i="$1" row
  for _ in $(seq 1 600); do
    row=$("$bin/keyraft" --config "$dir/admin.conf" cluster list 2>/dev/null |
          awk -v i="$i" '$1 == i {print $4, $5}')
    set -- $row
    if [ -n "${1:-}" ] && [ "${1:-}" = "${2:-}" ]; then return 0; fi
    sleep 0.1
  done
  echo "node $i did not become a member in 60 s; its log: $dir/node$i.log" >&2
  return 1
}

start_node() {
  local i="$1"
  setsid "$bin/keyraftd" --data "$dir/node$i" >>"$dir/node$i.log" 2>&1 </dev/null &
  echo $! >"$dir/node$i.pid"
}

cmd_start() {
  build_tools
  mkdir -p "$dir"
  local i
  if [ ! -f "$dir/node1/keyraftd.conf" ]; then
    "$bin/keyraftd" init --data "$dir/node1" --node-id 1 \
      --listen "127.0.0.1:$(client_port 1)" --raft-address "127.0.0.1:$(raft_port 1)" \
      >>"$dir/node1.log" 2>&1
  fi
  # Client configs for the whole cluster, one per identity node 1's init
  # made: client.conf is "app" (officer and user), admin.conf and auditor.conf.
  local who conf
  for who in app admin auditor; do
    conf="$dir/$who.conf"
    [ "$who" = app ] && conf="$dir/client.conf"
    cat >"$conf" <<CONF
[client]
endpoints = $(endpoints "$n")
ca = node1/tls/ca.pem
cert = node1/tls/$who.pem
key = node1/tls/$who.key
timeout_ms = 30000
CONF
  done
  for i in $(seq 1 "$n"); do
    if [ -f "$dir/node$i.pid" ] && alive "$(cat "$dir/node$i.pid")"; then
      continue
    fi
    if [ "$i" -gt 1 ] && [ ! -f "$dir/node$i/keyraftd.conf" ]; then
      "$bin/keyraftd" init --data "$dir/node$i" --node-id "$i" \
        --listen "127.0.0.1:$(client_port "$i")" --raft-address "127.0.0.1:$(raft_port "$i")" \
        --join "127.0.0.1:$(client_port 1)" >>"$dir/node$i.log" 2>&1
      local role=""
      case "$standby" in *" $i "*) role="--standby" ;; esac
      "$bin/keyraft" --config "$dir/admin.conf" cluster add "$dir/node$i/join-request" \
        $role >/dev/null
    fi
    start_node "$i"
    wait_up "$i"
    [ "$i" -gt 1 ] && wait_member "$i"
  done
  echo "keyraft cluster of $n nodes up in $dir"
  echo "  KEYRAFT_CONFIG=$dir/admin.conf $bin/keyraft cluster list"
  echo "  KEYRAFT_CONFIG=$dir/client.conf $bin/keyraft create --name demo --alg aes-256"
}

cmd_stop() {
  local f pid stopped=0
  for f in "$dir"/node*.pid; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
    rm -f "$f"
  done
  echo "stopped $stopped node(s)"
}

cmd_status() {
  bin="${KEYRAFT_BUILD:-$root/build}"
  local f i
  for f in "$dir"/node*.pid; do
    [ -f "$f" ] || continue
    i="${f##*/node}"; i="${i%.pid}"
    if alive "$(cat "$f")"; then echo "node $i: running (pid $(cat "$f"))"
    else echo "node $i: not running"; fi
  done
  "$bin/keyraft" --config "$dir/admin.conf" cluster list
}

case "$cmd" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) usage ;;
esac
