#!/usr/bin/env python3
"""Side-by-side costs of the serving features, printed as ratios (never as pass/fail):

* the prefix cache: TTFT of requests that share a system prompt, against a router started with
  --no-prefix-caching, each round with a new system prompt (so its first request is a miss);
* structured output: the same load with and without a JSON schema on every request, at each concurrency given.

Both routers run from the same build on the same machine and are measured in alternation, round by round.

    cargo build --release -p router-node -p moectl
    moectl init-model --preset bench --out M
    python3 tools/bench/serving_features.py --model M [--rounds 2]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "tags"],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    def __init__(self, binary, model, extra, log_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"router-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--model", model, "--listen", f"127.0.0.1:{self.port}", *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"router exited early; see {self.log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/readyz", timeout=2)
                return
            except OSError:
                time.sleep(1)
        sys.exit("router did not become ready within 600 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(moectl, url, model_name, *flags):
    out = subprocess.run(
        [moectl, "bench", "--url", url, "--model", model_name, "--json", "--vocab", "30000", *map(str, flags)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--schema-concurrency", default="1,8,32")
    ap.add_argument("--target-dir", default="target/release")
    args = ap.parse_args()
    router_bin = os.path.join(args.target_dir, "router-node")
    moectl = os.path.join(args.target_dir, "moectl")
    name = os.path.basename(os.path.normpath(args.model))
    logs = tempfile.mkdtemp(prefix="bench-features-")
    cached = Router(router_bin, args.model, [], logs)
    plain = Router(router_bin, args.model, ["--no-prefix-caching"], logs)
    print(f"routers up (logs in {logs}); {args.rounds} rounds")
    try:
        print(
            f"\nTTFT, {args.requests} requests one at a time, each {args.prefix_len} shared + {args.suffix_len} own"
            " prompt tokens, 4 output tokens (ms)"
        )
        print(f"{'round':>5} {'cached mean':>12} {'p50':>8} {'uncached mean':>14} {'p50':>8} {'hit rate':>9} {'mean ratio':>11}")
        for r in range(args.rounds):
            flags = ["--prefix-len", args.prefix_len, "--input-len", args.suffix_len, "--output-len", 4,
                     "--requests", args.requests, "--concurrency", 1, "--stream", "--seed", 1000 + r]
            a = bench(moectl, cached.url, name, *flags)
            b = bench(moectl, plain.url, name, *flags)
            print(f"{r + 1:>5} {a['mean_ttft_ms']:>12.0f} {a['median_ttft_ms']:>8.0f} {b['mean_ttft_ms']:>14.0f}"
                  f" {b['median_ttft_ms']:>8.0f} {a.get('prefix_cache_hit_rate', 0):>9.3f}"
                  f" {a['mean_ttft_ms'] / b['mean_ttft_ms']:>11.3f}")

        print("\nstructured output: random 128-token prompts, up to 64 output tokens, with / without a JSON schema")
        print(f"{'round':>5} {'C':>3} {'out tok/s':>10} {'plain':>8} {'ratio':>6} {'TPOT ms':>8} {'plain':>8} {'ratio':>6} {'mean out':>9}")
        schema = json.dumps(SCHEMA)
        for r in range(args.rounds):
            for c in map(int, args.schema_concurrency.split(",")):
                n = 4 if c == 1 else max(c, 16)
                flags = ["--input-len", 128, "--output-len", 64, "--requests", n, "--concurrency", c, "--stream",
                         "--seed", 2000 + r]
                a = bench(moectl, plain.url, name, *flags, "--json-schema", schema)
                b = bench(moectl, plain.url, name, *flags)
                print(f"{r + 1:>5} {c:>3} {a['output_throughput']:>10.2f} {b['output_throughput']:>8.2f}"
                      f" {a['output_throughput'] / b['output_throughput']:>6.3f} {a['mean_tpot_ms']:>8.1f}"
                      f" {b['mean_tpot_ms']:>8.1f} {b['mean_tpot_ms'] / a['mean_tpot_ms']:>6.3f}"
                      f" {a['total_output_tokens'] / a['completed']:>9.1f}")
    finally:
        cached.stop()
        plain.stop()


if __name__ == "__main__":
    main()
