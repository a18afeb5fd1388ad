#!/usr/bin/env python3
"""Medians of issue 14's runs here (KIND-RELAY-runN.json): python3 summary.py"""
import glob, json, os, re, statistics
here = os.path.dirname(os.path.abspath(__file__))
med = statistics.median
def load(pat):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(here, pat)))]
def show(label, rs, f, fmt="{:.2f}"):
    if not rs:
        return
    v = [f(r) for r in rs]
    print(f"| {label} | " + ", ".join(fmt.format(x) for x in v) + f" | **{fmt.format(med(v))}** |")
print("| figure | runs | median |\n|---|---|---|")
for relay in ("roomcast", "node"):
    rs = load(f"idle-{relay}-run*.json")
    show(f"{relay}: RSS per idle connection at 15,000 (B)", rs, lambda r: r["relay_bytes_per_idle_conn"], "{:,.0f}")
    show(f"{relay}: idle CPU over 30 s, 15,000 connections (% of one core)", rs, lambda r: 100 * r["idle_relay_cpu_s"] / r["idle_s"])
floor = load("floor-run*.json")
show("floor: sender CPU per send, 10,000 sockets (us)", floor, lambda r: r["floor_us_per_send"])
for kind in ("roomcast-default", "roomcast-w1", "node"):
    rs = load(f"fanout-{kind}-run*.json")
    show(f"100k/s {kind}: relay CPU per delivery (us)", rs, lambda r: r["relay_cpu_us_per_delivery"])
    show(f"100k/s {kind}: p99 (ms)", rs, lambda r: r["latency"]["p99_ms"], "{:,.0f}")
    show(f"100k/s {kind}: p99.9 (ms)", rs, lambda r: r["latency"]["p999_ms"], "{:,.0f}")
    show(f"100k/s {kind}: delivered share", rs, lambda r: r["delivered_share"], "{:.3f}")
for relay in ("roomcast", "node"):
    rs = load(f"churn-{relay}-run*.json")
    show(f"churn {relay}: RSS end / steady", rs, lambda r: r["rss_end_over_reference"])
