# Shared by the deploy/ benchmark scripts: free loopback ports, waiting for a server, stopping it, and cleaning up.
# The sourcing script sets $work (a temporary directory) and $server (the running server's pid, or empty).
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # URL LOG
  for _ in $(seq 1 1200); do
    curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$server" 2>/dev/null || { echo "the server exited:" >&2; tail -30 "$2" >&2; exit 1; }
    sleep 0.5
  done
  echo "not ready after 10 minutes" >&2; tail -30 "$2" >&2; exit 1
}
stop() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; }
