#!/usr/bin/env python3
"""100,000 deliveries/s (fanout --rooms 100 --members 100 --rate 1000 --duration-ms 20000),
default workers, the build before the direct write (base-N) and with it (direct-N), and the
floor at 10,000 sockets (floor-N), three rounds run one after the other: python3 summary.py"""
import json, os, statistics

here = os.path.dirname(os.path.abspath(__file__))
load = lambda n: json.load(open(os.path.join(here, n + ".json")))
med = statistics.median
rounds = [1, 2, 3]
floor = [load(f"floor-{r}")["floor_us_per_send"] for r in rounds]
print("| build | relay CPU per delivery (us), runs | median | ratio to the floor, per run | median ratio | p50 / p99 / p99.9 (ms), median | writes per frame |")
print("|---|---|---|---|---|---|---|")
for v in ["base", "direct"]:
    rs = [load(f"{v}-{r}") for r in rounds]
    cpu = [r["relay_cpu_us_per_delivery"] for r in rs]
    ratios = [c / f for c, f in zip(cpu, floor)]
    lat = lambda q: med(r["latency"][q] for r in rs)
    print(f"| {v} | {', '.join(f'{c:.2f}' for c in cpu)} | **{med(cpu):.2f}** | {', '.join(f'{x:.2f}' for x in ratios)} | **{med(ratios):.2f}** | {lat('p50_ms'):.2f} / {lat('p99_ms'):.2f} / {lat('p999_ms'):.2f} | {med(r['relay_writes_per_frame'] for r in rs):.3f} |")
print(f"| floor | {', '.join(f'{f:.2f}' for f in floor)} | **{med(floor):.2f}** | | | | |")
