#!/usr/bin/env bash
# The planner against the cluster it plans: for each configuration, `moectl up` on this machine is measured with
# `moectl bench --stream --json`, and `moectl plan --one-machine` predicts the same layout and load from a hardware
# profile; each prediction is printed beside its measurement with the error.
#
#   deploy/plan-validate.sh MODEL_DIR PROFILE.json
#
# PROFILE.json comes from `moectl plan calibrate` on this machine (the README's "Capacity planning" section). Keep the
# serving runs it was calibrated on out of $CONFIGS, or the table measures the fit rather than the prediction.
# $CONFIGS: space-separated EXPERT_NODES:MICRO_BATCHES:CONCURRENCY:REQUESTS (0 expert nodes: the experts in the
# router's process), default "0:1:8:24 1:1:8:24 2:1:1:6 2:1:32:96 2:2:32:96 4:1:16:48". $INPUT_LEN (128),
# $OUTPUT_LEN (64). Needs release binaries (cargo build --release -p moectl -p expert-node; or $MOE_BIN_DIR). Servers listen on free
# loopback ports; everything lives in a temporary directory removed at exit. Not part of the tests: it takes 10 to
# 20 minutes on the bench preset. $KEEP: a directory to copy the measured and predicted JSON files into.
set -euo pipefail
model=$(cd "${1:?usage: $0 MODEL_DIR PROFILE.json}" && pwd)
profile=$(realpath "${2:?usage: $0 MODEL_DIR PROFILE.json}")
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
read -r -a configs <<<"${CONFIGS:-0:1:8:24 1:1:8:24 2:1:1:6 2:1:32:96 2:2:32:96 4:1:16:48}"
input_len=${INPUT_LEN:-128}
output_len=${OUTPUT_LEN:-64}
name=$(basename "$model")
work=$(mktemp -d)
server=""
# shellcheck source=deploy/serve-lib.sh
. "$(dirname "$0")/serve-lib.sh"

for cfg in "${configs[@]}"; do
  IFS=: read -r nodes micro conc requests <<<"$cfg"
  port=$(free_port)
  url="http://127.0.0.1:$port"
  echo "== $nodes expert nodes, $micro micro-batches, concurrency $conc, $requests requests"
  "$bin/moectl" up --model "$model" --port "$port" --expert-nodes "$nodes" --micro-batches "$micro" \
    >"$work/up-$cfg.log" 2>&1 &
  server=$!
  wait_ready "$url" "$work/up-$cfg.log"
  # One short request first, so that the measured run sees no first-touch page faults.
  "$bin/moectl" bench --url "$url" --model "$name" --requests 2 --input-len "$input_len" --output-len 4 >/dev/null
  "$bin/moectl" bench --url "$url" --model "$name" --concurrency "$conc" --requests "$requests" \
    --input-len "$input_len" --output-len "$output_len" --seed 7 --stream --json >"$work/measured-$cfg.json"
  stop
  "$bin/moectl" plan --model "$model" --hardware "$profile" --one-machine --expert-nodes "$nodes" \
    --micro-batches "$micro" --replicas 0 \
    --traffic "concurrency=$conc,prompt=$input_len,output=$output_len,requests=$requests" \
    --json >"$work/predicted-$cfg.json"
done

python3 - "$work" "$(basename "$profile")" "${configs[@]}" <<'PY'
import json, pathlib, sys
work, profile, configs = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print(f"profile {profile}; each cell: predicted / measured (error)")
print("| expert nodes | micro-batches | C | output tok/s | TPOT mean ms | TPOT p90 ms | TTFT mean ms | TTFT p90 ms |")
print("|---|---|---|---|---|---|---|---|")
worst = {"throughput": 0.0, "tpot": 0.0, "ttft": 0.0}
def cell(p, m, kind):
    err = (p - m) / m if m > 0 else float("inf")
    worst[kind] = max(worst[kind], abs(err))
    return f"{p:.1f} / {m:.1f} ({err * 100:+.0f} %)"
for cfg in configs:
    nodes, micro, conc, _ = cfg.split(":")
    m = json.loads((work / f"measured-{cfg}.json").read_text())
    if m["failed"]:
        print(f"{cfg}: {m['failed']} requests failed", file=sys.stderr)
    (o,) = json.loads((work / f"predicted-{cfg}.json").read_text())["candidates"]
    print(f"| {nodes} | {micro} | {conc} | {cell(o['output_tokens_per_s'], m['output_throughput'], 'throughput')} | "
          f"{cell(o['tpot_s']['mean'] * 1e3, m['mean_tpot_ms'], 'tpot')} | "
          f"{cell(o['tpot_s']['p90'] * 1e3, m['p90_tpot_ms'], 'tpot')} | "
          f"{cell(o['ttft_s']['mean'] * 1e3, m['mean_ttft_ms'], 'ttft')} | "
          f"{cell(o['ttft_s']['p90'] * 1e3, m['p90_ttft_ms'], 'ttft')} |")
print(f"worst error: throughput {worst['throughput'] * 100:.0f} %, TPOT {worst['tpot'] * 100:.0f} %, "
      f"TTFT {worst['ttft'] * 100:.0f} % (targets 15 %, 15 %, 25 %)")
PY
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/*.json "$KEEP"/; fi
