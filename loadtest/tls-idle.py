#!/usr/bin/env python3
"""Relay RSS per idle WebSocket: plain TCP (ws://) against direct TLS (wss://, TLS_CERT_FILE).

The same client code, relay binary and settings for both, so the difference is what a TLS
session costs an idle connection. For each mode and run: start the relay on a free loopback port
(a test CA and a P-256 server certificate made with the openssl CLI for TLS), read its VmRSS,
open --conns first-dialect connections (/chat?token&name&room over --rooms rooms, at most 256
connecting at once), keep reading everything each one is sent (greetings, presence), wait until
that traffic stops, read VmRSS again: (after - before) / conns. Then SIGTERM.

The heartbeat is set to 10 minutes so this client does not need to answer pings (a run takes
well under a minute); everything else is the relay's defaults plus a rate limit nobody reaches,
as roomcast-load's `idle` scenario uses.

Only loopback addresses are used; every run is bounded in connections and time.

    cargo build --release -p roomcast
    python3 loadtest/tls-idle.py --conns 15000 --rooms 100 --runs 3 --json-out FILE

Prints a table and one JSON line (also written to --json-out).
"""

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

TOKEN = "tls-idle-token"
CONNECT_IN_FLIGHT = 256
SETTLE_QUIET_S = 1.5
RUN_TIMEOUT_S = 300


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificate(directory):
    """A test CA and a server certificate for localhost/127.0.0.1 it signs (as tests/tls.rs)."""
    ca, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    csr, ext = os.path.join(directory, "cert.csr"), os.path.join(directory, "cert.ext")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=tls-idle CA")
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "1",
            "-days", "2", "-extfile", ext, "-out", cert)
    return ca, cert, key


def start_relay(binary, tls_files):
    env = {k: v for k, v in os.environ.items()
           if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(HOST="127.0.0.1", PORT="0", CHAT_TOKEN=TOKEN, RATE_LIMIT="1000000",
               RATE_WINDOW_MS="1000", HEARTBEAT_MS="600000", RUST_LOG="warn")
    if tls_files:
        env.update(TLS_CERT_FILE=tls_files[0], TLS_KEY_FILE=tls_files[1])
    relay = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    line = relay.stdout.readline()
    # roomcast listening on http[s]://127.0.0.1:PORT (max connections N, open-file limit M)
    addr = line.split("://", 1)[1].split(" ", 1)[0]
    return relay, int(addr.rsplit(":", 1)[1])


async def run_clients(port, conns, rooms, ctx):
    scheme = "https" if ctx else "http"
    origin = f"{scheme}://127.0.0.1:{port}"
    gate = asyncio.Semaphore(CONNECT_IN_FLIGHT)
    received = [0]
    failures = [0]
    writers = []

    async def drain(reader):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                received[0] += len(data)
        except (ConnectionError, ssl.SSLError):
            return

    async def one(i):
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx,
                    server_hostname="localhost" if ctx else None), 20)
                room = f"room{i % rooms}"
                writer.write((
                    f"GET /chat?token={TOKEN}&name=u{i}&room={room} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Origin: {origin}\r\n\r\n").encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                if not head.startswith(b"HTTP/1.1 101"):
                    raise RuntimeError(head[:40])
            except Exception:
                failures[0] += 1
                return
        writers.append(writer)
        asyncio.ensure_future(drain(reader))

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(conns)))
    connected_s = time.monotonic() - started
    # Presence traffic settles: nothing read for SETTLE_QUIET_S.
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < SETTLE_QUIET_S:
        await asyncio.sleep(0.25)
        if received[0] != last:
            last, quiet_since = received[0], time.monotonic()
    return writers, failures[0], connected_s, received[0]


def measure(binary, conns, rooms, tls_files, ca):
    relay, port = start_relay(binary, tls_files)
    try:
        time.sleep(0.5)
        before = rss_bytes(relay.pid)
        ctx = None
        if tls_files:
            ctx = ssl.create_default_context(cafile=ca)
        loop = asyncio.new_event_loop()
        writers, failures, connected_s, received = loop.run_until_complete(
            asyncio.wait_for(run_clients(port, conns, rooms, ctx), RUN_TIMEOUT_S))
        time.sleep(0.5)
        after = rss_bytes(relay.pid)
        opened = len(writers)
        for w in writers:
            w.transport.abort()
        loop.run_until_complete(asyncio.sleep(0.2))
        loop.close()
        return {
            "connections": opened,
            "failures": failures,
            "connect_seconds": round(connected_s, 2),
            "bytes_received": received,
            "rss_before": before,
            "rss_after": after,
            "rss_per_connection": round((after - before) / max(opened, 1)),
        }
    finally:
        relay.terminate()
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default="target/release/roomcast")
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--modes", default="plain,tls")
    p.add_argument("--json-out")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.conns > hard - 100:
        sys.exit(f"--conns {a.conns} needs more open files than this process may have ({hard})")
    report = {"scenario": "tls-idle", "conns": a.conns, "rooms": a.rooms,
              "date": time.strftime("%Y-%m-%d"), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="tls-idle-") as d:
        ca, cert, key = make_certificate(d)
        for mode in a.modes.split(","):
            runs = []
            for r in range(a.runs):
                res = measure(a.bin, a.conns, a.rooms, (cert, key) if mode == "tls" else None, ca)
                print(f"{mode} run {r + 1}: {res}", file=sys.stderr)
                runs.append(res)
            report["modes"][mode] = {
                "rss_per_connection_median": statistics.median(
                    x["rss_per_connection"] for x in runs),
                "runs": runs,
            }
    print(f"{'mode':<6} {'connections':>11} {'RSS/conn (median)':>18}  runs")
    for mode, m in report["modes"].items():
        per = [x["rss_per_connection"] for x in m["runs"]]
        print(f"{mode:<6} {m['runs'][0]['connections']:>11} {m['rss_per_connection_median']:>16} B  {per}")
    if "plain" in report["modes"] and "tls" in report["modes"]:
        report["tls_extra_per_connection"] = (report["modes"]["tls"]["rss_per_connection_median"]
                                              - report["modes"]["plain"]["rss_per_connection_median"])
        print(f"TLS costs {report['tls_extra_per_connection']} B more per idle connection")
    line = json.dumps(report)
    print(line)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
