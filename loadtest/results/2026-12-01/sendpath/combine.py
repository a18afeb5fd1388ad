# Combined medians over rounds of several sets: floor (stride 1, 100) and fan-out builds.
import json, glob, re, sys, statistics as st
sets = sys.argv[1:]
rows = []  # (set, round, {floor1, floor100, base, sys, pf})
for d in sets:
    rounds = {}
    for f in glob.glob(d + '/*.json'):
        m = re.search(r'/(floor|fanout)-(\w+)-(\d+)\.json$', f)
        if not m: continue
        kind, which, i = m.groups()
        j = json.load(open(f))
        key = ('floor' + which) if kind == 'floor' else which
        v = j['floor_us_per_send'] if kind == 'floor' else j['relay_cpu_us_per_delivery']
        rounds.setdefault(i, {})[key] = v
        if kind == 'fanout':
            rounds[i][which + '_p99'] = j['latency']['p99_ms']
            rounds[i][which + '_p999'] = j['latency']['p999_ms']
            rounds[i][which + '_share'] = j['delivered_share']
    for i in sorted(rounds): rows.append((d.rstrip('/').split('/')[-1], i, rounds[i]))
med = lambda xs: round(st.median(xs), 3) if xs else None
for b in ['base', 'pf', 'sys', 'hist']:
    rs = [r for r in rows if b in r[2]]
    if not rs: continue
    cpu = [r[2][b] for r in rs]
    print(f"{b}: n={len(rs)} cpu/delivery median {med(cpu)} us  runs {cpu}")
    for fl in ['floor1', 'floor100']:
        rat = [r[2][b] / r[2][fl] for r in rs if fl in r[2]]
        if not rat: continue
        print(f"   / {fl}: median of per-round ratios {med(rat)}; ratio of medians {round(med(cpu)/med([r[2][fl] for r in rs if fl in r[2]]),3)}; {[round(x,3) for x in rat]}")
    print(f"   p99 median {med([r[2][b+'_p99'] for r in rs])} ms, p99.9 median {med([r[2][b+'_p999'] for r in rs])} ms, min share {min(r[2][b+'_share'] for r in rs)}")
for fl in ['floor1', 'floor100']:
    xs = [r[2][fl] for r in rows if fl in r[2]]
    print(f"{fl}: n={len(xs)} median {med(xs)} {xs}")
# same-round pairs: new build against base
for b, a in [('pf', 'base'), ('sys', 'base'), ('hist', 'sys')]:
    pr = [r[2][b] / r[2][a] for r in rows if b in r[2] and a in r[2]]
    if pr: print(f"{b}/{a} same round: median {med(pr)} {[round(x,3) for x in pr]}")
