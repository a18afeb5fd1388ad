#!/usr/bin/env bash
# Runs a whole roomcast deployment on this machine in the foreground: redis-server, N relay
# nodes sharing it (REDIS_URL) and nginx in front of them (deploy/nginx.conf), all from
# Debian's packages and this checkout. Ctrl-C stops every one of them.
#
#   deploy/local-cluster.sh            # nginx on :8080, nodes on :8081-8083, Redis on :6390
#   NODES=5 PORT=9000 deploy/local-cluster.sh
#   deploy/local-cluster.sh --redis-cluster
#       # a Redis Cluster instead: 3 masters + 3 replicas on :6390-6395 (cluster bus +10000),
#       # the nodes started with REDIS_CLUSTER_NODES. Try `kill -9` on a master's pid (printed)
#       # and watch its replica take over (docs/DEPLOY.md, "Redis Cluster").
#
# Open http://localhost:8080/?room=lobby in two tabs: they are served by different nodes
# (least_conn) and still share the room. docs/DEPLOY.md walks through a rolling restart.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_CLUSTER=0
for arg in "$@"; do
  case "$arg" in
    --redis-cluster) REDIS_CLUSTER=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "local-cluster: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

PORT=${PORT:-8080}
NODES=${NODES:-3}
REDIS_PORT=${REDIS_PORT:-6390}
BIN=${ROOMCAST_BIN:-target/release/roomcast}
TOKEN=${CHAT_TOKEN:-dev-token}

for tool in redis-server redis-cli nginx; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
    echo "local-cluster: $tool is missing: apt-get install redis-server redis-tools nginx-light" >&2
    exit 2
  }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$BIN" ] || cargo build --release --bin roomcast

dir=$(mktemp -d /tmp/roomcast-cluster.XXXXXX)
pids=()
# The processes whose exit ends the run: everything but a Redis Cluster's nodes, which may be
# killed on purpose to watch a failover.
watched=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT INT TERM

if [ "$REDIS_CLUSTER" = 1 ]; then
  # Six nodes; redis-cli makes the first three masters and the others their replicas.
  # cluster-require-full-coverage no: a shard without a master leaves the others serving.
  # cluster-replica-validity-factor 0: a replica always takes over (see docs/DEPLOY.md).
  cluster_nodes=()
  for i in 0 1 2 3 4 5; do
    p=$((REDIS_PORT + i))
    mkdir -p "$dir/redis$i"
    redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout "${CLUSTER_NODE_TIMEOUT_MS:-2000}" \
      --cluster-require-full-coverage no --cluster-replica-validity-factor 0 \
      --repl-diskless-sync-delay 0 \
      --dir "$dir/redis$i" --daemonize no >"$dir/redis$i.log" 2>&1 &
    pids+=($!)
    cluster_nodes+=("127.0.0.1:$p")
  done
  for node in "${cluster_nodes[@]}"; do
    until redis-cli -p "${node##*:}" ping >/dev/null 2>&1; do sleep 0.1; done
  done
  redis-cli --cluster create "${cluster_nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >"$dir/cluster-create.log" 2>&1 || {
    cat "$dir/cluster-create.log" >&2
    exit 1
  }
  until redis-cli -p "$REDIS_PORT" cluster info | grep -q '^cluster_state:ok'; do sleep 0.1; done
  broker_env="REDIS_CLUSTER_NODES=$(IFS=,; echo "${cluster_nodes[*]}")"
  redis_desc="Redis Cluster on $REDIS_PORT-$((REDIS_PORT + 5))"
else
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --daemonize no >"$dir/redis.log" 2>&1 &
  pids+=($!)
  watched+=($!)
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
  broker_env="REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  redis_desc="Redis on $REDIS_PORT"
fi

servers=""
origins="http://localhost:$PORT,http://127.0.0.1:$PORT"
for i in $(seq 1 "$NODES"); do
  node_port=$((PORT + i))
  env HOST=127.0.0.1 PORT="$node_port" CHAT_TOKEN="$TOKEN" \
    "$broker_env" \
    ALLOWED_ORIGINS="$origins" \
    TRUSTED_PROXIES=127.0.0.1 \
    "$BIN" 2>"$dir/node$i.log" > >(sed "s/^/node$i: /") &
  # $! is the relay itself (with a pipe it would be sed, and stopping would leave it running).
  pids+=($!)
  watched+=($!)
  servers+="        server 127.0.0.1:$node_port max_fails=1 fail_timeout=2s;\n"
done

# deploy/nginx.conf with this run's ports, in the foreground, everything under $dir.
{
  echo "daemon off;"
  echo "pid $dir/nginx.pid;"
  echo "error_log $dir/nginx-error.log;"
  sed -e "/^        server 127.0.0.1:808[0-9]/d" \
      -e "s|^        least_conn;|        least_conn;\n$servers|" \
      -e "s|^        listen 8080;|        listen 127.0.0.1:$PORT;|" \
      -e "s|/var/log/nginx/roomcast-access.log|$dir/access.log|" \
      -e "s|^http {|http {\n    access_log off;\n    client_body_temp_path $dir/body;\n    proxy_temp_path $dir/proxy;\n    fastcgi_temp_path $dir/fastcgi;\n    uwsgi_temp_path $dir/uwsgi;\n    scgi_temp_path $dir/scgi;|" \
      deploy/nginx.conf
} >"$dir/nginx.conf"
"$NGINX" -p "$dir" -c "$dir/nginx.conf" &
pids+=($!)
watched+=($!)

echo "roomcast cluster: http://localhost:$PORT (nginx) -> $NODES nodes on $((PORT + 1))-$((PORT + NODES)), $redis_desc; logs (nginx's access.log too) in $dir; Ctrl-C stops all"
if [ "$REDIS_CLUSTER" = 1 ]; then
  echo "Redis Cluster masters (kill -9 one to see a failover):"
  redis-cli -p "$REDIS_PORT" cluster nodes | awk '$3 ~ /master/ && $9 != "" { split($2, a, "@"); print "  " a[1] " slots " $9 }' |
    while read -r line; do
      p=${line#*:}; p=${p%% *}
      echo "$line pid $(redis-cli -p "$p" info server | tr -d '\r' | awk -F: '/^process_id/ {print $2}')"
    done
fi
wait -n "${watched[@]}" || true
echo "local-cluster: a process exited; stopping the rest" >&2
