#!/usr/bin/env bash
# The CUDA backend's checks and benchmark on a GPU machine, in one call.
#
#   deploy/cuda-check.sh build   here (any machine with Rust): release binaries with --features cuda into .device/
#   deploy/cuda-check.sh run     there (a machine with an NVIDIA driver; no Rust needed): the GPU tests of moe-cuda;
#                                an expert node on the GPU serving `moectl generate`, and a router with its experts
#                                on the GPU answering a completion, both next to the CPU; then `moectl bench-cuda` on
#                                a freshly written bench-preset model
#
# With the device tool: run `build` here, then `run` there carrying `.device` (about 40 MiB). Results are printed and,
# when $OUT is set, also written to $OUT/cuda-check.log. MOE_CHECK_DEVICE=cpu runs the same steps on the CPU (a dry
# run of this script on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
  cargo build --release -p moectl -p expert-node -p router-node --features cuda
  test_bin=$(cargo test --release -p moe-cuda --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -n 1)
  mkdir -p .device
  for bin in moectl expert-node router-node; do cp "target/release/$bin" ".device/$bin"; done
  cp "$test_bin" .device/gpu-tests
  strip .device/* 2>/dev/null || true
  du -sh .device/*
  ;;
run)
  log="${OUT:-$(mktemp -d)}/cuda-check.log"
  exec > >(tee "$log") 2>&1
  # cudarc looks for unversioned or .so.12 names; CUDA 13 wheels ship only versioned ones: link them under the
  # names it tries (the driver and the 12.x ABI of these calls are compatible).
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  libs="$work/lib"
  mkdir -p "$libs"
  for lib in libcublas libcublasLt libnvrtc libnvrtc-builtins libnccl; do
    if ! ldconfig -p | grep -q "$lib.so "; then
      found=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib.so.*" -print 2>/dev/null | sort | tail -n 1)
      if [ -n "$found" ]; then
        ln -sf "$found" "$libs/$lib.so"
        ln -sf "$found" "$libs/$(basename "$found")"
      fi
    fi
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "== GPU tests (moe-cuda)"
  MOE_FIXTURES="$PWD/tests/fixtures" .device/gpu-tests --test-threads 1 --nocapture || echo "GPU TESTS FAILED"
  dev="${MOE_CHECK_DEVICE:-cuda:0}"
  fixture="$PWD/tests/fixtures/qwen35"
  echo "== moectl generate (greedy, 24 tokens, top-4 log-probs with the prompt's) next to the CPU"
  .device/expert-node --model "$fixture" --listen 127.0.0.1:0 --device "$dev" >"$work/node.out" 2>"$work/node.err" &
  node=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/node.out" && break; sleep 0.2; done
  addr=$(sed -n 's/^listening on //p' "$work/node.out")
  gen=(generate --model "$fixture" --prompt-ids 5,17,33,2,90,41,8 --max-tokens 24 --temperature 0 --json --logprobs 4 --echo)
  .device/moectl "${gen[@]}" >"$work/cpu.json"
  compare() {
    python3 - "$work/cpu.json" "$1" "$2" <<'PY'
import json, sys
cpu, other = (json.load(open(p)) for p in sys.argv[1:3])
worst = max(abs(a[1] - b[1]) for pa, pb in zip(cpu["logprobs"], other["logprobs"]) for a, b in zip(pa, pb) if a[0] == b[0])
print(f"{sys.argv[3]}: tokens equal to the CPU's: {cpu['output_ids'] == other['output_ids']}; worst log-prob difference {worst:.2e}")
PY
  }
  run_case() {
    local name=$1
    shift
    if .device/moectl "${gen[@]}" "$@" >"$work/case.json" 2>"$work/case.err"; then
      compare "$work/case.json" "$name"
    else
      echo "$name: FAILED"; tail -3 "$work/case.err"
    fi
  }
  [ -n "$addr" ] || { echo "the expert node did not start:"; tail -5 "$work/node.err"; }
  run_case "experts on an expert node ($dev)" --experts-at "$addr"
  run_case "everything in moectl on $dev" --device "$dev"
  run_case "layers on $dev, experts on the expert node" --device "$dev" --experts-at "$addr"
  kill "$node" 2>/dev/null || true
  echo "== router-node on $dev answering a completion"
  .device/router-node --model "$fixture" --port 0 --device "$dev" >"$work/router.out" 2>"$work/router.err" &
  router=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/router.out" && break; sleep 0.2; done
  url=$(sed -n 's/^listening on //p' "$work/router.out")
  python3 - "$url" <<'PY' || { echo "ROUTER ON GPU FAILED"; tail -5 "$work/router.err"; }
import json, sys, urllib.request
body = json.dumps({"model": "qwen35", "prompt": "hello there", "max_tokens": 16, "temperature": 0}).encode()
req = urllib.request.Request(sys.argv[1] + "/v1/completions", body, {"content-type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
print("completion:", repr(out["choices"][0]["text"]), out["usage"])
PY
  kill "$router" 2>/dev/null || true
  echo "== bench-cuda"
  model="$work/bench"
  .device/moectl init-model --preset bench --out "$model" >/dev/null
  timeout 240 .device/moectl bench-cuda --model "$model" || echo "BENCH FAILED ($?)"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
