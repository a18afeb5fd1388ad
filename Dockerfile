# syntax=docker/dockerfile:1
#
# roomcast: the relay and its smoke client in a small Debian image that runs as a non-root user.
#
#   docker build --build-arg ROOMCAST_COMMIT="$(git rev-parse --short=12 HEAD)" -t roomcast .
#   docker run -d --name roomcast -p 8080:8080 --ulimit nofile=65536:65536 --stop-timeout 15 \
#     -e CHAT_TOKEN="$(openssl rand -hex 32)" -e ALLOWED_ORIGINS=https://chat.example.com \
#     -e SERVE_PAGE=false -e LOG_FORMAT=json roomcast
#
# - CHAT_TOKEN is required to serve other machines: with the development token the relay
#   listens on 127.0.0.1 inside the container (unreachable from outside), and HOST=0.0.0.0 with
#   it is refused at start. With CHAT_TOKEN set, HOST defaults to 0.0.0.0.
# - --stop-timeout 15: a stop takes up to LAME_DUCK_MS + SHUTDOWN_DRAIN_MS (10 s by default),
#   more than docker's default 10 s before SIGKILL (docs/DEPLOY.md, "Rolling restarts").
# - --ulimit nofile: one connection is one open file; the relay raises its soft limit to the
#   hard limit and caps connections at that minus 100.
# - The health check asks /readyz on the public port: 503 while shutting down or while the
#   Redis broker is down.
#
# docs/DEPLOY.md says which checks of this file could be run where it was written.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The commit for roomcast_build_info and --version (there is no .git in the build context).
ARG ROOMCAST_COMMIT=unknown
ENV ROOMCAST_COMMIT=${ROOMCAST_COMMIT}
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin roomcast --bin roomcast-smoke \
 && install -D -m 0755 target/release/roomcast target/release/roomcast-smoke -t /out/

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: the smoke client's wss:// checks trust the system's roots. Not pinned: it
# must follow Debian's security updates of the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin roomcast
COPY --from=build /out/roomcast /out/roomcast-smoke /usr/local/bin/
USER 10001:10001
ENV PORT=8080
# Freed memory goes back at once (docs/BENCHMARKS.md, "Churn and the allocator's purge delay").
ENV MIMALLOC_PURGE_DELAY=0
EXPOSE 8080
STOPSIGNAL SIGTERM
# A shell for ${PORT}; any failure is "unhealthy" (1), as docker expects.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/bin/sh", "-c", "roomcast-smoke --readyz --timeout-ms 2000 \"http://127.0.0.1:${PORT}\" || exit 1"]
ENTRYPOINT ["/usr/local/bin/roomcast"]
