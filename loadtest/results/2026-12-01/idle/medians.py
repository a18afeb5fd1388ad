#!/usr/bin/env python3
# Medians of the idle runs: python3 medians.py [DIR]   (idle/: before = 5e2ed81, after = dc0a998;
# idle-dialects/: before = 9cad32e, after = this round's main)
import json, glob, statistics, sys, os
d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
med = {}
for rel in ["before", "after"]:
    xs = []
    for f in sorted(glob.glob(f"{d}/idle-{rel}-run*.json")):
        x = json.load(open(f)); xs.append(x)
        print(f"{os.path.basename(f)[:-5]}: load {x['loadavg_at_start']}, {x['relay_bytes_per_idle_conn']:.0f} B/conn, "
              f"RSS before/all idle/after close {x['relay_rss_before_kb']:.0f}/{x['relay_rss_after_kb']:.0f}/{x['relay_rss_after_close_kb']:.0f} KiB, "
              f"connect p99 {x['connect_latency']['p99_ms']} ms, open all {x['connect_s']} s, presence {x['presence_events']}, failures {x['connect_failures']}")
    med[rel] = {k: statistics.median([x[k] for x in xs]) for k in ["relay_bytes_per_idle_conn", "relay_rss_before_kb", "relay_rss_after_kb", "relay_rss_after_close_kb"]}
    print(rel, "medians:", med[rel])
print("after/before B per idle conn:", round(med["after"]["relay_bytes_per_idle_conn"] / med["before"]["relay_bytes_per_idle_conn"], 3))
for i in [1, 2, 3]:
    try:
        a = json.load(open(f"{d}/idle-after-run{i}.json"))["relay_bytes_per_idle_conn"]
        b = json.load(open(f"{d}/idle-before-run{i}.json"))["relay_bytes_per_idle_conn"]
        print(f"  run{i} after/before: {a / b:.3f}")
    except FileNotFoundError:
        pass
