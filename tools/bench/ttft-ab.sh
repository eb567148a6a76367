#!/usr/bin/env bash
# Time to first token of short random prompts, one request at a time: two router-node builds side by side, and the
# second without its prefix cache, alternating over rounds (the ratios are what to read on a shared machine).
#
#   tools/bench/ttft-ab.sh BEFORE/router-node AFTER/router-node MODEL_DIR [ROUNDS]
#
# $INPUT_LEN (128), $REQUESTS (6), $OUTPUT_LEN (16). moectl comes from $MOE_BIN_DIR or target/release. Each router
# listens on a free loopback port and is stopped after its run.
set -euo pipefail
before=$(realpath "${1:?usage: $0 BEFORE AFTER MODEL_DIR [ROUNDS]}")
after=$(realpath "${2:?usage: $0 BEFORE AFTER MODEL_DIR [ROUNDS]}")
model=$(cd "${3:?usage: $0 BEFORE AFTER MODEL_DIR [ROUNDS]}" && pwd)
rounds=${4:-3}
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}"
work=$(mktemp -d)
server=""
# shellcheck source=deploy/serve-lib.sh
. "$(dirname "$0")/../../deploy/serve-lib.sh"
name=$(basename "$model")
for round in $(seq 1 "$rounds"); do
  for which in before after no-cache; do
    case $which in
      before) router=$before; flags=() ;;
      after) router=$after; flags=() ;;
      no-cache) router=$after; flags=(--no-prefix-caching) ;;
    esac
    port=$(free_port)
    url="http://127.0.0.1:$port"
    "$router" --model "$model" --port "$port" "${flags[@]}" >"$work/router.log" 2>&1 &
    server=$!
    wait_ready "$url" "$work/router.log"
    "$bin/moectl" bench --url "$url" --model "$name" --requests 2 --input-len "${INPUT_LEN:-128}" --output-len 4 \
      >/dev/null 2>&1
    "$bin/moectl" bench --url "$url" --model "$name" --concurrency 1 --requests "${REQUESTS:-6}" \
      --input-len "${INPUT_LEN:-128}" --output-len "${OUTPUT_LEN:-16}" --seed 7 --stream --json 2>/dev/null \
      >"$work/run.json"
    python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print(f'round {sys.argv[2]} {sys.argv[3]:>8}: TTFT mean {m[\"mean_ttft_ms\"]:.0f} ms, median {m[\"median_ttft_ms\"]:.0f} ms, TPOT {m[\"mean_tpot_ms\"]:.1f} ms')" \
      "$work/run.json" "$round" "$which"
    stop
  done
done
