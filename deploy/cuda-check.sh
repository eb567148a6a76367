#!/usr/bin/env bash
# The CUDA backend's checks and benchmark on a GPU machine, in one call.
#
#   deploy/cuda-check.sh build   here (any machine with Rust): release binaries with --features cuda into .device/
#   deploy/cuda-check.sh run     there (a machine with an NVIDIA driver; no Rust needed): the GPU tests of moe-cuda,
#                                then `moectl bench-cuda` on a freshly written bench-preset model
#
# With the device tool: run `build` here, then `run` there carrying `.device` (about 40 MiB). Results are printed and,
# when $OUT is set, also written to $OUT/cuda-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
  cargo build --release -p moectl --features cuda
  test_bin=$(cargo test --release -p moe-cuda --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -n 1)
  mkdir -p .device
  cp target/release/moectl .device/moectl
  cp "$test_bin" .device/gpu-tests
  strip .device/moectl .device/gpu-tests 2>/dev/null || true
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
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "== GPU tests (moe-cuda)"
  MOE_FIXTURES="$PWD/tests/fixtures" .device/gpu-tests --test-threads 1 --nocapture || echo "GPU TESTS FAILED"
  echo "== bench-cuda"
  model="$work/bench"
  .device/moectl init-model --preset bench --out "$model" >/dev/null
  timeout 240 .device/moectl bench-cuda --model "$model" --with-router || echo "BENCH FAILED ($?)"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
