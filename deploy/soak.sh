#!/usr/bin/env bash
# Soak under faults: a real etcd, three expert nodes (each with room for every routed expert, so the controller's
# first epoch holds replicas), one router, and a closed loop of `moectl bench` requests through a scripted
# sequence of faults. Prints, per phase, the requests completed and failed, output throughput and latency p99, the
# p99 relative to the fault-free phase, and at the end "requests lost: N" (every failed request counts).
#
#   deploy/soak.sh MODEL_DIR            (e.g. tests/fixtures/qwen35 with VOCAB=250, or a `moectl init-model` model)
#
# Phases: fault-free; SIGKILL of a node (replicas absorb it; it rejoins afterwards); SIGSTOP of a node for
# $STOP_SECS (5) seconds; etcd down for $ETCD_SECS (10) seconds. Load: $CONCURRENCY (8) streams in flight, $REQUESTS
# (48) requests per phase of $INPUT_LEN (32) prompt and $OUTPUT_LEN (32) output tokens, prompts below $VOCAB (1000).
#
# Needs release binaries (cargo build --release; or $MOE_BIN_DIR), `etcd` and python3 on PATH. Everything listens
# on free loopback ports and lives in a temporary directory removed at exit.
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR}
memory=${MEMORY_GIB:-$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1] + "/config.json")); t = c.get("text_config", c)
print(1.2 * t["num_hidden_layers"] * t["num_experts"] * 3 * t["hidden_size"] * t["moe_intermediate_size"] * 2 / 2**30)' "$model")}
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
work=$(mktemp -d)
# The links as in production: mutual TLS with certificates of a CA made for this run.
"$bin/moectl" certs init --dir "$work/certs" >/dev/null
for role in expert router; do "$bin/moectl" certs issue $role $role --dir "$work/certs" >/dev/null; done
tls() { echo --tls-cert "$work/certs/$1.pem" --tls-key "$work/certs/$1-key.pem" --tls-ca "$work/certs/ca.pem"; }
declare -A pid
cleanup() { for p in "${pid[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() { # FILE PATTERN
  for _ in $(seq 1 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

cport=$(free_port); pport=$(free_port)
start_etcd() {
  etcd --name soak --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cport" \
    --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
    --initial-advertise-peer-urls "http://127.0.0.1:$pport" --initial-cluster "soak=http://127.0.0.1:$pport" \
    >>"$work/etcd.log" 2>&1 &
  pid[etcd]=$!
  wait_line "$work/etcd.log" "ready to serve client requests"
}
start_etcd
export MOE_ETCD="127.0.0.1:$cport" MOE_CLUSTER=soak RUST_LOG=${RUST_LOG:-warn}

start_node() { # NAME
  : >"$work/node-$1.out"
  "$bin/expert-node" --model "$model" --listen 127.0.0.1:0 $(tls expert) --node-id "node-$1" --memory-gib "$memory" \
    --lease-ttl-secs 2 >"$work/node-$1.out" 2>>"$work/node-$1.log" &
  pid[$1]=$!
  wait_line "$work/node-$1.out" "listening on"
}
for n in a b c; do start_node $n; done
"$bin/router-node" --model "$model" --listen 127.0.0.1:0 $(tls router) --lease-ttl-secs 2 >"$work/router.out" 2>"$work/router.log" &
pid[router]=$!
wait_line "$work/router.out" "listening on"
url=$(sed -n 's/^listening on //p' "$work/router.out")
for _ in $(seq 1 600); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.2; done
name=$(basename "$model")
echo "== $name: 3 expert nodes with $memory GiB each (room for every expert on each), router at $url"

bench() { "$bin/moectl" bench --url "$url" --model "$name" --concurrency "${CONCURRENCY:-8}" \
  --requests "${REQUESTS:-48}" --input-len "${INPUT_LEN:-32}" --output-len "${OUTPUT_LEN:-32}" \
  --vocab "${VOCAB:-1000}" --seed "$1" --stream --json; }

lost=0
base_p99=""
printf '%-28s %9s %6s %10s %12s %9s\n' phase completed failed "out tok/s" "p99 e2el ms" "p99/base"
phase() { # NAME SEED FAULT HEAL
  bench "$2" >"$work/phase.json" &
  local b=$!
  sleep 1
  eval "$3"
  wait "$b" || true
  eval "$4"
  read -r done failed tput p99 < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["completed"], r["failed"], "%.1f" % r["output_throughput"], "%.0f" % r["p99_e2el_ms"])' "$work/phase.json")
  lost=$((lost + failed))
  [ -z "$base_p99" ] && base_p99=$p99
  printf '%-28s %9s %6s %10s %12s %9s\n' "$1" "$done" "$failed" "$tput" "$p99" \
    "$(python3 -c "print('%.2f' % ($p99 / max($base_p99, 1)))")"
}

phase "fault-free" 1 ":" ":"
phase "SIGKILL node-c (replicas)" 2 'kill -KILL ${pid[c]}' 'start_node c; sleep 3'
phase "SIGSTOP node-b ${STOP_SECS:-5} s" 3 "kill -STOP \${pid[b]}; sleep ${STOP_SECS:-5}; kill -CONT \${pid[b]}" 'sleep 3'
phase "etcd down ${ETCD_SECS:-10} s" 4 "kill -KILL \${pid[etcd]}; sleep ${ETCD_SECS:-10}; start_etcd" 'sleep 3'
phase "fault-free again" 5 ":" ":"
echo "requests lost: $lost"
