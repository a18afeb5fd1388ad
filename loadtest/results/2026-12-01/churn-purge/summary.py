#!/usr/bin/env python3
"""Churn (churn --rooms 20 --members 50 --wave-conns 5000 --waves 20 --rate 200) with mimalloc's
default purge delay (base-N), with MIMALLOC_PURGE_DELAY=0 in the relay's environment (pd0-N),
and with the option set from main instead (in-process-N, not kept); and 100,000 deliveries/s
(fanout --rooms 100 --members 100 --rate 1000 --duration-ms 20000) with and without it
(fanout-base-N, fanout-pd0-N): python3 summary.py"""
import glob, json, os, statistics

here = os.path.dirname(os.path.abspath(__file__))
med = statistics.median
def runs(prefix):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(here, prefix + "-[0-9].json")))]
print("| relay | RSS end / steady (runs) | median | steady RSS (KiB) | end RSS (KiB) | relay CPU during waves (s) |")
print("|---|---|---|---|---|---|")
for p, label in [("base", "default purge delay (1 s)"), ("pd0", "MIMALLOC_PURGE_DELAY=0"), ("in-process", "purge delay set in main")]:
    rs = runs(p)
    r = [x["rss_end_over_reference"] for x in rs]
    print(f"| {label} | {', '.join(f'{v:.3f}' for v in r)} | **{med(r):.3f}** | {med(x['relay_rss_reference_kb'] for x in rs):,.0f} | {med(x['relay_rss_end_kb'] for x in rs):,.0f} | {med(x['relay_cpu_s'] for x in rs):.1f} |")
print()
for p in ["fanout-base", "fanout-pd0"]:
    rs = runs(p)
    print(p, "relay CPU per delivery (us):", ", ".join(f"{x['relay_cpu_us_per_delivery']:.2f}" for x in rs))
