#!/usr/bin/env python3
# Medians of the flood runs in this folder: python3 medians.py [DIR]
import json, glob, statistics, sys, os
d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
rows = {}
for kind in ["ping", "continuation"]:
    for rel in ["before", "after"]:
        runs = []
        for f in sorted(glob.glob(f"{d}/{kind}-{rel}-run*.json")):
            runs.append(json.load(open(f)))
        if not runs: continue
        r = {"n": len(runs)}
        for ph in ["baseline", "attack"]:
            for q in ["p50_ms", "p99_ms", "p999_ms", "max_ms"]:
                r[f"{ph}_{q}"] = med([x[f"{ph}_latency"][q] for x in runs])
            r[f"{ph}_lost"] = med([x[f"{ph}_lost"] for x in runs])
            r[f"{ph}_cpu"] = med([x[f"{ph}_relay_cpu_cores"] for x in runs])
            r[f"{ph}_rss"] = med([x[f"{ph}_relay_rss_kb"] for x in runs])
            r[f"{ph}_rss_peak"] = med([x[f"{ph}_relay_rss_peak_kb"] for x in runs])
            r[f"{ph}_lag_p99"] = med([x[f"{ph}_send_lag"]["p99_ms"] for x in runs])
        r["rss_peak"] = med([x["relay_rss_peak_kb"] for x in runs])
        r["outcomes"] = [x["attacker_outcomes"] for x in runs]
        r["ended_after"] = [x["attacker_ended_after_ms"] for x in runs]
        r["frames"] = med([x["attack_frames_sent"] for x in runs])
        r["atk_cpu"] = med([x["attacker_client_cpu_s"] for x in runs])
        r["cf_closes"] = [x["attack_relay_control_frame_closes"] for x in runs]
        r["c1008"] = [x["attack_relay_closes_1008"] for x in runs]
        r["slowc"] = [x["attack_relay_slow_consumer_closes"] for x in runs]
        r["load"] = [x["loadavg_at_start"] for x in runs]
        r["ratio_p99"] = med([x["victim_p99_attack_over_baseline"] for x in runs])
        rows[(kind, rel)] = r
for k, r in rows.items():
    print(k)
    for kk, v in r.items():
        print("   ", kk, v)
for kind in ["ping", "continuation"]:
    b, a = rows.get((kind, "before")), rows.get((kind, "after"))
    if not (a and b): continue
    print(kind, "after/before attack p50,p99,p999:",
          [round(a[f"attack_{q}"] / b[f"attack_{q}"], 3) for q in ["p50_ms", "p99_ms", "p999_ms"]])
