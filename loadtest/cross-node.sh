#!/usr/bin/env bash
# Cross-node fan-out, side by side with one node, at the same rate (issue: "the Redis broker
# behind nginx", figures). Everything on loopback, every run bounded in time.
#
#   loadtest/cross-node.sh [ROOMS MEMBERS RATE DURATION_MS]     (default 100 100 200 20000)
#
# Runs twice, each time behind the same nginx (deploy/nginx.conf's settings, least_conn):
#   1. one node alone (in memory), 2. three nodes sharing a redis-server.
# The load harness connects every member through nginx, so with three nodes the members of a
# room, and a room's publisher, land on different nodes: a delivery crosses Redis. It reports
# latency and loss (roomcast-load fanout); this script adds the CPU of every relay node, of
# Redis and of nginx over the run, read from /proc, and prints one JSON line per setup.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOMS=${1:-100}
MEMBERS=${2:-100}
RATE=${3:-200}
DURATION=${4:-20000}
BIN=${ROOMCAST_BIN:-target/release/roomcast}
LOAD=${ROOMCAST_LOAD:-target/release/roomcast-load}
[ -x "$BIN" ] && [ -x "$LOAD" ] || { cargo build --release -p roomcast --bin roomcast && cargo build --release -p roomcast-load; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
TICKS=$(getconf CLK_TCK)

dir=$(mktemp -d /tmp/roomcast-xnode.XXXXXX)
pids=()
cleanup() { [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap 'cleanup; rm -rf "$dir"' EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# nginx: the master and its workers.
nginx_ticks() { local t=0 p; for p in "$1" $(pgrep -P "$1"); do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() {
  local label=$1 nodes=$2
  pids=()
  local redis_port node_ports=() servers="" redis_pid=""
  local nginx_port; nginx_port=$(free_port)
  local env_redis=()
  if [ "$nodes" -gt 1 ]; then
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$dir" --daemonize no >"$dir/redis-$label.log" 2>&1 &
    redis_pid=$!; pids+=("$redis_pid")
    until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
    env_redis=(REDIS_URL="redis://127.0.0.1:$redis_port")
  fi
  local node_pids=()
  for i in $(seq 1 "$nodes"); do
    local p; p=$(free_port)
    env HOST=127.0.0.1 PORT="$p" CHAT_TOKEN=load ALLOWED_ORIGINS="http://127.0.0.1:$nginx_port" \
      RATE_LIMIT=1000000 RATE_WINDOW_MS=1000 PUBLISH_RATE_PER_ADDRESS=0 TRUSTED_PROXIES=127.0.0.1 \
      "${env_redis[@]}" "$BIN" >"$dir/node$i-$label.out" 2>"$dir/node$i-$label.log" &
    node_pids+=($!); pids+=($!)
    servers+="        server 127.0.0.1:$p;\n"
    until curl -sf "http://127.0.0.1:$p/readyz" >/dev/null; do sleep 0.1; done
  done
  {
    echo "daemon off; worker_processes 2; pid $dir/nginx-$label.pid; error_log $dir/nginx-$label.err;"
    echo "events { worker_connections 30000; }"
    echo "http { access_log off; client_body_temp_path $dir/b; proxy_temp_path $dir/p;"
    echo " fastcgi_temp_path $dir/f; uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;"
    echo " map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }"
    printf " upstream roomcast { least_conn;\n$servers }\n"
    echo " server { listen 127.0.0.1:$nginx_port; location / { proxy_pass http://roomcast;"
    echo "  proxy_http_version 1.1; proxy_set_header Upgrade \$http_upgrade;"
    echo "  proxy_set_header Connection \$connection_upgrade; proxy_read_timeout 75s;"
    echo "  proxy_buffering off; } } }"
  } >"$dir/nginx-$label.conf"
  ulimit -n "$(ulimit -Hn)"
  "$NGINX" -p "$dir" -c "$dir/nginx-$label.conf" &
  local nginx_pid=$!; pids+=("$nginx_pid")
  sleep 0.5
  local before=() b_redis=0 b_nginx
  for p in "${node_pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
  [ -n "$redis_pid" ] && b_redis=$(cpu_ticks "$redis_pid")
  b_nginx=$(nginx_ticks "$(cat "$dir/nginx-$label.pid")")
  "$LOAD" --url "ws://127.0.0.1:$nginx_port/chat" --token load --pid "${node_pids[0]}" \
    --json-out "$dir/$label.json" fanout --rooms "$ROOMS" --members "$MEMBERS" --rate "$RATE" \
    --duration-ms "$DURATION" >"$dir/$label.txt" 2>&1 || true
  local relay_ticks=0 i=0
  for p in "${node_pids[@]}"; do relay_ticks=$((relay_ticks + $(cpu_ticks "$p") - before[i])); i=$((i + 1)); done
  local redis_ticks=0
  [ -n "$redis_pid" ] && redis_ticks=$(( $(cpu_ticks "$redis_pid") - b_redis ))
  local nginx_used=$(( $(nginx_ticks "$(cat "$dir/nginx-$label.pid")") - b_nginx ))
  python3 - "$dir/$label.json" "$label" "$nodes" "$relay_ticks" "$redis_ticks" "$nginx_used" "$TICKS" <<'PY'
import json, sys
path, label, nodes, relay, redis, nginx, hz = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception as e:
    print(json.dumps({"setup": label, "error": f"no result: {e}"})); sys.exit()
hz = float(hz)
delivered = r.get("deliveries") or 0
def per(t):
    return round(float(t) / hz * 1e6 / delivered, 2) if delivered else None
lat = r.get("latency", {})
out = {"setup": label, "nodes": int(nodes), "deliveries": delivered,
       "deliveries_per_s": r.get("deliveries_per_s"),
       "latency_p50_ms": lat.get("p50_ms"), "latency_p99_ms": lat.get("p99_ms"),
       "latency_p999_ms": lat.get("p999_ms"),
       "lost": r.get("lost"), "duplicates": r.get("duplicates"), "gaps": r.get("gaps"),
       "reordered": r.get("reordered"), "loadavg_at_start": r.get("loadavg_at_start"),
       "relays_cpu_us_per_delivery": per(relay), "redis_cpu_us_per_delivery": per(redis),
       "nginx_cpu_us_per_delivery": per(nginx),
       "redis_cpu_ms_per_1000_publishes":
           round(float(redis) / hz * 1e3 / r["sent"] * 1000, 2) if r.get("sent") else None}
print(json.dumps(out))
PY
  cleanup
}

run one-node 1
run three-nodes 3
echo "raw harness output: $dir (removed on exit; copy it first if you need it)" >&2
