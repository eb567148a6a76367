#!/usr/bin/env bash
# A hardware profile for `moectl plan`, measured on this machine: `moectl bench-model` (the roofline figures and
# each stage's time at the decode batches and prompt lengths given), `moectl bench-dataplane` (the expert link's
# round trip and codec rate), and serving runs of `moectl up` with 2 expert nodes measured by `moectl bench`, then
# `moectl plan calibrate` over all of them.
#
#   deploy/plan-calibrate.sh MODEL_DIR NAME OUT.json
#
# $BATCHES (decode batches, default 1,8,32,64), $PROMPTS (prefill lengths, default 128,512: give the lengths the
# cluster will see), $SERVING (space-separated CONCURRENCY:REQUESTS, default "2:8 8:24 16:48"), $INPUT_LEN (128),
# $OUTPUT_LEN (64), $COST (the machine's $/hour, default 0). Keep the serving runs out of plan-validate.sh's
# configurations. Needs release binaries (or $MOE_BIN_DIR). Servers listen on free loopback ports; everything lives in
# a temporary directory removed at exit ($KEEP: a directory to copy the reports into). Takes 10 to 15 minutes on the
# bench preset.
set -euo pipefail
model=$(cd "${1:?usage: $0 MODEL_DIR NAME OUT.json}" && pwd)
profile_name=${2:?usage: $0 MODEL_DIR NAME OUT.json}
out=${3:?usage: $0 MODEL_DIR NAME OUT.json}
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
read -r -a serving <<<"${SERVING:-2:8 8:24 16:48}"
input_len=${INPUT_LEN:-128}
output_len=${OUTPUT_LEN:-64}
name=$(basename "$model")
work=$(mktemp -d)
server=""
# shellcheck source=deploy/serve-lib.sh
. "$(dirname "$0")/serve-lib.sh"

echo "== bench-model: decode batches ${BATCHES:-1,8,32,64}, prompts ${PROMPTS:-128,512}"
"$bin/moectl" bench-model --model "$model" --batch "${BATCHES:-1,8,32,64}" --prompt-len "${PROMPTS:-128,512}" \
  --rounds 3 --json >"$work/bench-model.json"
echo "== bench-dataplane: the expert link"
"$bin/moectl" bench-dataplane --model "$model" --batch 1 --rounds 1 --decode-steps 2 --skip-decode --json \
  >"$work/dataplane.json"
runs=()
for run in "${serving[@]}"; do
  IFS=: read -r conc requests <<<"$run"
  port=$(free_port)
  url="http://127.0.0.1:$port"
  echo "== serving: 2 expert nodes, concurrency $conc, $requests requests"
  "$bin/moectl" up --model "$model" --port "$port" --expert-nodes 2 >"$work/up-$conc.log" 2>&1 &
  server=$!
  wait_ready "$url" "$work/up-$conc.log"
  "$bin/moectl" bench --url "$url" --model "$name" --requests 2 --input-len "$input_len" --output-len 4 >/dev/null
  "$bin/moectl" bench --url "$url" --model "$name" --concurrency "$conc" --requests "$requests" \
    --input-len "$input_len" --output-len "$output_len" --seed 11 --stream --json >"$work/serve-$conc.json"
  stop
  runs+=(--serving "$work/serve-$conc.json:2:1:$input_len:$output_len")
done
"$bin/moectl" plan calibrate --bench-model "$work/bench-model.json" --dataplane "$work/dataplane.json" \
  --model "$model" --name "$profile_name" --cost-per-hour "${COST:-0}" "${runs[@]}" --out "$out"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/*.json "$KEEP"/; fi
echo "wrote $out"
