#!/usr/bin/env bash
# Runs a whole roomcast deployment on this machine in the foreground: redis-server, N relay
# nodes sharing it (REDIS_URL) and nginx in front of them (deploy/nginx.conf), all from
# Debian's packages and this checkout. Ctrl-C stops every one of them.
#
#   deploy/local-cluster.sh            # nginx on :8080, nodes on :8081-8083, Redis on :6390
#   NODES=5 PORT=9000 deploy/local-cluster.sh
#
# Open http://localhost:8080/?room=lobby in two tabs: they are served by different nodes
# (least_conn) and still share the room. docs/DEPLOY.md walks through a rolling restart.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8080}
NODES=${NODES:-3}
REDIS_PORT=${REDIS_PORT:-6390}
BIN=${ROOMCAST_BIN:-target/release/roomcast}
TOKEN=${CHAT_TOKEN:-dev-token}

for tool in redis-server nginx; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
    echo "local-cluster: $tool is missing: apt-get install redis-server nginx-light" >&2
    exit 2
  }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$BIN" ] || cargo build --release --bin roomcast

dir=$(mktemp -d /tmp/roomcast-cluster.XXXXXX)
pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$dir" --daemonize no >"$dir/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done

servers=""
origins="http://localhost:$PORT,http://127.0.0.1:$PORT"
for i in $(seq 1 "$NODES"); do
  node_port=$((PORT + i))
  HOST=127.0.0.1 PORT=$node_port CHAT_TOKEN=$TOKEN \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    ALLOWED_ORIGINS="$origins" \
    TRUSTED_PROXIES=127.0.0.1 \
    "$BIN" 2>"$dir/node$i.log" | sed "s/^/node$i: /" &
  pids+=($!)
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

echo "roomcast cluster: http://localhost:$PORT (nginx) -> $NODES nodes on $((PORT + 1))-$((PORT + NODES)), Redis on $REDIS_PORT; logs (nginx's access.log too) in $dir; Ctrl-C stops all"
wait -n "${pids[@]}" || true
echo "local-cluster: a process exited; stopping the rest" >&2
