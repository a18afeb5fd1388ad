#!/usr/bin/env python3
"""Medians of the hot-room runs here (hot-SETUP-runN.json): python3 summary.py"""
import glob, json, os, re, statistics
here = os.path.dirname(os.path.abspath(__file__))
by = {}
for f in sorted(glob.glob(os.path.join(here, "hot-*-run*.json"))):
    by.setdefault(re.search(r"hot-(\w+)-run", f).group(1), []).append(json.load(open(f)))
med = statistics.median
print("| setup | runs | writes per delivered frame (runs) | relay CPU per delivery (us) | client CPU per delivery (us) | p50 / p99 / p99.9 (ms) | delivered |")
print("|---|---|---|---|---|---|---|")
for k, rs in by.items():
    w = [r["relay_writes_per_frame"] for r in rs if r.get("relay_writes_per_frame") is not None]
    ws = f"{med(w):.3f} ({', '.join('%.3f' % x for x in w)})" if w else "n/a"
    lat = lambda q: med(r["latency"][q] for r in rs)
    print(f"| {k} | {len(rs)} | {ws} | {med(r['relay_cpu_us_per_delivery'] for r in rs):.2f} | {med(r['client_cpu_us_per_delivery'] for r in rs):.2f} "
          f"| {lat('p50_ms'):.1f} / {lat('p99_ms'):.1f} / {lat('p999_ms'):.1f} | {min(r['delivered_share'] for r in rs):.2f} (lowest) |")
