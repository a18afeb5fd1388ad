#!/usr/bin/env python3
"""Medians of the `cluster` runs here (cluster-100k-runN.json) and of the cross-node fan-out
runs in ../cluster-fanout (fanout-nN-REDIS-runK.json): python3 summary.py
A later set of `cluster` runs kept in a folder of its own (runN.json or cluster-100k-runN.json):
python3 summary.py FOLDER (the fan-out table is printed without a folder only)."""
import glob, json, os, re, statistics, sys

here = os.path.dirname(os.path.abspath(__file__))
runs_dir = os.path.join(here, sys.argv[1]) if len(sys.argv) > 1 else here
med = statistics.median

runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(runs_dir, "cluster-100k-run*.json"))
                                          + glob.glob(os.path.join(runs_dir, "run*.json")))]
if runs:
    def row(label, f, fmt="{:,.0f}"):
        vals = [f(r) for r in runs]
        print(f"| {label} | " + " | ".join(fmt.format(v) for v in vals) + f" | **{fmt.format(med(vals))}** |")
    print("| figure | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | median |")
    print("|---|" + "---|" * (len(runs) + 1))
    row("connections joined", lambda r: r["connections_ok"])
    row("relay RSS per idle connection, summed over 6 nodes (B)", lambda r: r["relay_bytes_per_idle_conn"])
    row("relay RSS, all nodes (MiB)", lambda r: r["relay_rss_after_kb"] / 1024, "{:,.1f}")
    row("Redis used_memory, 6 servers (MiB)", lambda r: r["redis_used_memory_bytes"] / 2**20, "{:,.1f}")
    row("Redis RSS, 6 servers (MiB)", lambda r: r["redis_rss_kb"] / 1024, "{:,.1f}")
    row("time to open all (s)", lambda r: r["connect_s"], "{:,.1f}")
    row("connect -> history p50 (ms)", lambda r: r["connect_latency"]["p50_ms"], "{:,.1f}")
    row("connect -> history p99 (ms)", lambda r: r["connect_latency"]["p99_ms"], "{:,.0f}")
    row("idle CPU of all nodes over 30 s (% of one core)", lambda r: 100 * r["idle_relay_core_share"], "{:,.1f}")
    row("idle CPU of Redis over 30 s (% of one core)", lambda r: 100 * r["idle_redis_core_share"], "{:,.1f}")
    row("broadcast: deliveries", lambda r: r["broadcast_deliveries"])
    row("broadcast: first send -> last delivery (ms)", lambda r: r["broadcast_all_ms"], "{:,.0f}")
    row("broadcast: p50 per delivery (ms)", lambda r: r["broadcast_latency"]["p50_ms"], "{:,.0f}")

fan = {}
for f in [] if runs_dir != here else sorted(glob.glob(os.path.join(here, "..", "cluster-fanout", "fanout-n*-run*.json"))):
    m = re.search(r"fanout-n(\d+)-(\w+)-run(\d+)", f)
    fan.setdefault((int(m.group(1)), m.group(2)), []).append(json.load(open(f)))
if fan:
    print()
    print("| setup | runs | p50 / p99 / p99.9 (ms) | relay CPU per delivery, all nodes (us) | Redis CPU (cores) | lost, duplicates, gaps |")
    print("|---|---|---|---|---|---|")
    for key in sorted(fan):
        rs = fan[key]
        lat = lambda q: med(r["latency"][q] for r in rs)
        cpu = [r["relay_cpu_us_per_delivery"] for r in rs]
        redis = [r.get("redis_cpu_cores") for r in rs if r.get("redis_cpu_cores") is not None]
        bad = sum(r["lost"] + r["duplicates"] + r["gaps"] for r in rs)
        print(f"| {key[0]} node(s), redis {key[1]} | {len(rs)} | {lat('p50_ms'):.2f} / {lat('p99_ms'):.2f} / {lat('p999_ms'):.1f} "
              f"| {med(cpu):.2f} ({', '.join('%.2f' % c for c in cpu)}) | {('%.2f' % med(redis)) if redis else '-'} | {bad} |")
