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

# Second set, the final build (with the partial-write fix), beside Node, one round after another:
# final-N (default workers), final1w-N (WORKER_THREADS=1), node-N, floorb-N, hot-N (hot room,
# fanout --rooms 1 --members 1000 --publishers 10 --rate 200 --duration-ms 20000, one worker).
floor = [load(f"floorb-{r}")["floor_us_per_send"] for r in rounds]
print()
print("| relay | relay CPU per delivery (us), runs | median | ratio to the floor, per run | median ratio | p50 / p99 / p99.9 (ms), median | delivered |")
print("|---|---|---|---|---|---|---|")
for v, label in [("final", "roomcast, default workers"), ("final1w", "roomcast, WORKER_THREADS=1"), ("node", "Node ws")]:
    rs = [load(f"{v}-{r}") for r in rounds]
    cpu = [r["relay_cpu_us_per_delivery"] for r in rs]
    ratios = [c / f for c, f in zip(cpu, floor)]
    lat = lambda q: med(r["latency"][q] for r in rs)
    deliv = med(r.get("delivered_ratio", r.get("delivery_ratio", float("nan"))) for r in rs)
    print(f"| {label} | {', '.join(f'{c:.2f}' for c in cpu)} | **{med(cpu):.2f}** | {', '.join(f'{x:.2f}' for x in ratios)} | **{med(ratios):.2f}** | {lat('p50_ms'):.2f} / {lat('p99_ms'):.2f} / {lat('p999_ms'):.2f} | {deliv} |")
print(f"| floor | {', '.join(f'{f:.2f}' for f in floor)} | **{med(floor):.2f}** | | | | |")
hot = [load(f"hot-{r}") for r in rounds]
w = [h["relay_writes_per_frame"] for h in hot]
print()
print(f"hot room, writes per delivered frame: {', '.join(f'{x:.3f}' for x in w)} (median {med(w):.3f}); "
      f"p50/p99 {med(h['latency']['p50_ms'] for h in hot):.1f} / {med(h['latency']['p99_ms'] for h in hot):.1f} ms")
