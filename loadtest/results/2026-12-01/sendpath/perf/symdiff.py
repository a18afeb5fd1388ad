import sys
def load(f):
    d={}
    for l in open(f):
        n,s=l.rstrip('\n').split('\t',1)
        d[s.strip()]=d.get(s.strip(),0)+int(n)
    return d
a=load(sys.argv[1]); b=load(sys.argv[2])
print('A total',sum(a.values()),'B total',sum(b.values()))
keys=set(a)|set(b)
diff=sorted(keys,key=lambda k:-(b.get(k,0)-a.get(k,0)))
for k in diff[:40]: print(f"{b.get(k,0)-a.get(k,0):5d} {a.get(k,0):5d} {b.get(k,0):5d} {k}")
print('...')
for k in diff[-12:]: print(f"{b.get(k,0)-a.get(k,0):5d} {a.get(k,0):5d} {b.get(k,0):5d} {k}")
uk=lambda d:(sum(v for k,v in d.items() if k.startswith('[k]')),sum(v for k,v in d.items() if not k.startswith('[k]')))
print('kernel/user A',uk(a),'B',uk(b))
