#!/usr/bin/env python3
"""Medians of the storm runs in this directory, per MAX_HANDSHAKES_PER_SECOND setting:
   python3 summary.py   (files storm-hsN-runK.json, written by roomcast-load storm --json-out)"""
import glob, json, re, statistics
by = {}
for f in sorted(glob.glob("storm-hs*-run*.json")):
    hs = int(re.search(r"storm-hs(\d+)-run", f).group(1))
    by.setdefault(hs, []).append(json.load(open(f)))
def med(xs): return statistics.median(xs)
print("| MAX_HANDSHAKES_PER_SECOND per node | runs | all back (s) | attempts | others p50 / p99 before (ms) | others p50 / p99 / max during (ms) | delivered during |")
print("|---|---|---|---|---|---|---|")
for hs in sorted(by, key=lambda h: (h == 0, -h)):
    rs = by[hs]
    g = lambda k, s: [r[k][s] for r in rs]
    each = ", ".join("%.2f" % r["storm_all_back_s"] for r in rs)
    print(f"| {hs if hs else 'off'} | {len(rs)} | {med([r['storm_all_back_s'] for r in rs]):.2f} ({each}) "
          f"| {med([r['storm_attempts'] for r in rs]):.0f} "
          f"| {med(g('baseline_latency','p50_ms')):.2f} / {med(g('baseline_latency','p99_ms')):.1f} "
          f"| {med(g('storm_latency','p50_ms')):.1f} / {med(g('storm_latency','p99_ms')):.0f} / {med(g('storm_latency','max_ms')):.0f} "
          f"| {min(r['storm_delivered_share'] for r in rs):.3f} (lowest) |")
