import csv,sys,statistics as st,collections
d=collections.defaultdict(list)
for r in csv.reader(open(sys.argv[1])):
    d[(r[1],r[2])].append(float(r[3]))
mem={t:st.median(v) for (s,t),v in d.items() if s=='memory'}
print("== sequential (GB/s): median, x memory, all")
for (s,t),v in sorted(d.items()):
    m=st.median(v); print(f"{s:14} {t:4} {m:6.2f} {m/mem[t] if t in mem else 0:5.2f}x  {v}")
try: rows=list(csv.reader(open(sys.argv[2])))
except FileNotFoundError: rows=[]
k=collections.defaultdict(list)
for r in rows: k[(r[1],r[2])].append(r)
mi={t:st.median(float(r[3]) for r in v) for (s,t),v in k.items() if s=='memory'}
mp={t:st.median(float(r[4]) for r in v) for (s,t),v in k.items() if s=='memory'}
print("== 4K fio: IOPS median (x memory) | p50 us median (+memory) | max us | nbdkit cores; per round")
for (s,t),v in sorted(k.items()):
    i=st.median(float(r[3]) for r in v); p=st.median(float(r[4]) for r in v)
    print(f"{s:14} {t:6} {i:8.0f} {i/mi.get(t,i):5.2f}x  p50 {p:6.1f} ({p-mp.get(t,p):+5.1f})  max {[r[6] for r in v]}  iops {[r[3] for r in v]} cores {[r[7] for r in v]}")
