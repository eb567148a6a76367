#!/usr/bin/env bash
# Skewed-load rebalance benchmark: a real etcd, three expert nodes (memory for 1.5 copies of the experts in all),
# one router; random prompts (token ids below $VOCAB, 1000 by default). Prints the node load
# max/mean and decode throughput before and after `moectl placement rebalance`, and the time to the new epoch.
#
#   deploy/bench-rebalance.sh MODEL_DIR [NODE_MEMORY_GIB]
#
# With INITIAL=contiguous, the "before" placement is the naive one operators write by hand (each node a contiguous
# range of every layer's experts), applied with `moectl placement apply`; by default it is the controller's initial
# placement (experts dealt round-robin).
#
# NODE_MEMORY_GIB defaults to half of the model's routed experts per node. `moectl init-model --router-skew 2`
# writes a model whose gating sends about half of the tokens to a tenth of the experts.
#
# Needs release binaries (cargo build --release; or $MOE_BIN_DIR) and `etcd` on PATH. Everything listens on free loopback ports and
# lives in a temporary directory removed at exit.
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR [NODE_MEMORY_GIB]}
memory=${2:-$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1] + "/config.json")); t = c.get("text_config", c)
print(t["num_hidden_layers"] * t["num_experts"] * 3 * t["hidden_size"] * t["moe_intermediate_size"] * 2 / 2**31)' "$model")}
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
work=$(mktemp -d)
# The links as in production: mutual TLS with certificates of a CA made for this run.
"$bin/moectl" certs init --dir "$work/certs" >/dev/null
for role in expert router; do "$bin/moectl" certs issue $role $role --dir "$work/certs" >/dev/null; done
tls() { echo --tls-cert "$work/certs/$1.pem" --tls-key "$work/certs/$1-key.pem" --tls-ca "$work/certs/ca.pem"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() { # FILE PATTERN
  for _ in $(seq 1 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

cport=$(free_port); pport=$(free_port)
etcd --name bench --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cport" \
  --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
  --initial-advertise-peer-urls "http://127.0.0.1:$pport" --initial-cluster "bench=http://127.0.0.1:$pport" \
  >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_line "$work/etcd.log" "ready to serve client requests"
ETCD="127.0.0.1:$cport"
export MOE_ETCD=$ETCD MOE_CLUSTER=bench

for n in a b c; do
  "$bin/expert-node" --model "$model" --listen 127.0.0.1:0 $(tls expert) --node-id "node-$n" --memory-gib "$memory" \
    >"$work/node-$n.out" 2>"$work/node-$n.log" &
  pids+=($!)
done
for n in a b c; do wait_line "$work/node-$n.out" "listening on"; done
"$bin/router-node" --model "$model" --listen 127.0.0.1:0 $(tls router) >"$work/router.out" 2>"$work/router.log" &
pids+=($!)
wait_line "$work/router.out" "listening on"
url=$(sed -n 's/^listening on //p' "$work/router.out")
for _ in $(seq 1 600); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.5; done
name=$(basename "$model")

bench() { "$bin/moectl" bench --url "$url" --model "$name" --concurrency 4 --requests 16 --input-len 32 \
  --output-len 32 --vocab "${VOCAB:-1000}" --seed "$1" --json; }
report() { "$bin/moectl" placement show --json | python3 -c '
import json, sys
v = json.load(sys.stdin); p = v["placement"]
counts = [sum(len(r[i]) for r in p["hosted"]) for i in range(len(p["nodes"]))]
print("epoch %d (%s): expected node load max/mean per layer %.3f (summed over layers %.3f), busiest 10%% of experts get %.0f%% of tokens, experts per node %s"
      % (p["epoch"], p["reason"], v["layer_imbalance"], v["imbalance"], 100 * v["hot_share"], counts))'; }
tput() { python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f" % r["output_throughput"])'; }

echo "== $(basename "$model"): 3 expert nodes with $memory GiB each"
totals() { "$bin/moectl" placement show --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["served_layer_totals"]))'; }
# Node load measured by the nodes themselves over one phase: (token, expert) pairs each node computed per layer.
measured() { python3 -c '
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {n: [x - y for x, y in zip(b[n], a.get(n, [0] * len(b[n])))] for n in b}
layers = len(next(iter(d.values())))
per_layer = [[d[n][l] for n in d] for l in range(layers)]
w = sum(max(r) / (sum(r) / len(r)) * sum(r) for r in per_layer if sum(r)) / sum(sum(r) for r in per_layer)
tot = [sum(v) for v in d.values()]
print("measured on the nodes: max/mean per layer %.3f (summed over layers %.3f), pairs per node %s"
      % (w, max(tot) / (sum(tot) / len(tot)), dict(zip(d, tot))))' "$1" "$2"; }

echo "== warm-up (the routers measure per-expert load over 5 s windows)"
bench 1 >/dev/null
sleep 6
if [ "${INITIAL:-}" = contiguous ]; then
  experts=$("$bin/moectl" placement show --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["model"]["num_experts"])')
  "$bin/moectl" placement plan --json | python3 -c '
import json, sys
p = json.load(sys.stdin); e = int(sys.argv[1]); n = len(p["nodes"])
p["hosted"] = [[list(range(e * i // n, e * (i + 1) // n)) for i in range(n)] for _ in p["hosted"]]
print(json.dumps(p))' "$experts" >"$work/contiguous.json"
  echo "== apply the contiguous placement"
  "$bin/moectl" placement apply "$work/contiguous.json"
fi
# One measured phase: the placement, the load the nodes computed during a bench run, and its decode throughput.
phase() { # NAME SEED
  "$bin/moectl" placement show
  local t; t=$(totals)
  local tok; tok=$(bench "$2" | tput)
  sleep 6
  report
  measured "$t" "$(totals)"
  echo "decode throughput $1: $tok tok/s"
}

phase before 2
echo "== rebalance"
"$bin/moectl" placement rebalance
sleep 1
phase after 3
