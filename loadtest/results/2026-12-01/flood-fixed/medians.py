#!/usr/bin/env python3
# Medians of the flood-fixed runs: python3 medians.py [DIR]
# before = relay at 5e2ed81, after = relay at dc0a998 (main with 0f8b438)
import json, glob, statistics, sys, os
d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def r3(x):
    return None if x is None else round(x, 3)
rows = {}
print("per run: load | baseline p50/p99/p99.9 | attack p50/p99/p99.9 | relay CPU attack | RSS peak | outcomes | ended after ms | frames | attacker CPU | lost b/a")
for kind in ["ping", "continuation", "pong"]:
    for rel in ["before", "after"]:
        runs = []
        for f in sorted(glob.glob(f"{d}/{kind}-{rel}-run*.json")):
            x = json.load(open(f)); runs.append(x)
            b, a = x["baseline_latency"], x["attack_latency"]
            print(f"  {os.path.basename(f)[:-5]} | {x['loadavg_at_start']} | {b['p50_ms']} / {b['p99_ms']} / {b['p999_ms']} | "
                  f"{a['p50_ms']} / {a['p99_ms']} / {a['p999_ms']} | {x['attack_relay_cpu_cores']} | {x['relay_rss_peak_kb']} | "
                  f"{x['attacker_outcomes']} | {x['attacker_ended_after_ms']} | {x['attack_frames_sent']} | {x['attacker_client_cpu_s']} | "
                  f"{x['baseline_lost']}/{x['attack_lost']}")
        if not runs: continue
        r = {"n": len(runs)}
        for ph in ["baseline", "attack"]:
            for q in ["p50_ms", "p99_ms", "p999_ms", "max_ms"]:
                r[f"{ph}_{q}"] = med([x[f"{ph}_latency"][q] for x in runs])
            r[f"{ph}_lost"] = med([x[f"{ph}_lost"] for x in runs])
            r[f"{ph}_cpu"] = med([x[f"{ph}_relay_cpu_cores"] for x in runs])
            r[f"{ph}_rss"] = med([x[f"{ph}_relay_rss_kb"] for x in runs])
        r["rss_peak"] = med([x["relay_rss_peak_kb"] for x in runs])
        r["frames"] = med([x["attack_frames_sent"] for x in runs])
        r["atk_cpu"] = med([x["attacker_client_cpu_s"] for x in runs])
        r["cf_closes"] = [x["attack_relay_control_frame_closes"] for x in runs]
        r["c1008"] = [x["attack_relay_closes_1008"] for x in runs]
        r["load"] = [x["loadavg_at_start"] for x in runs]
        rows[(kind, rel)] = r
print()
for k, r in rows.items():
    print(k)
    for kk, v in r.items():
        print("   ", kk, v)
for kind in ["ping", "continuation", "pong"]:
    b, a = rows.get((kind, "before")), rows.get((kind, "after"))
    if not (a and b): continue
    print(kind, "after/before attack p50,p99,p999,cpu,rss_peak:",
          [r3(a[k] / b[k]) if b[k] else None for k in ["attack_p50_ms", "attack_p99_ms", "attack_p999_ms", "attack_cpu", "rss_peak"]])
