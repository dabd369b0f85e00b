#!/bin/bash
# Call 4: QD1 4 KiB latency only, base vs new (CUDA), both servers up at
# once, fio runs alternating ABAB..., 6 rounds of 4 s each per shape.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
. bench/lib.sh
export XDG_RUNTIME_DIR=/tmp
w=/tmp/ab; mkdir -p $w
for b in base new; do
  nbdkit -U $w/$b.sock -t 16 --pidfile $w/$b.pid .devbin/$b.so backend=cuda size=4G
  await_export $w/$b.sock $w/$b.pid || { echo "$b did not start"; exit 1; }
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=write --bs=1M --size=4G --iodepth=8 >/dev/null
done
C=$OUT/qd1.csv; echo "round,build,rw,p50,p99,p999,iops" > $C
for round in 1 2 3 4 5 6; do
  order="base new"; [ $((round % 2)) = 0 ] && order="new base"
  for rw in randwrite randread; do for b in $order; do
    fio --name=q --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=$rw --bs=4k --iodepth=1 --size=4G \
      --time_based --runtime=4 --ramp_time=1 --output-format=json --output=$w/j.json >/dev/null
    python3 -c "
import json; j=json.load(open('$w/j.json'))['jobs'][0]; r=j['${rw#rand}']; p=r['clat_ns']['percentile']
print('$round,$b,$rw,%.1f,%.1f,%.1f,%d' % (p['50.000000']/1e3, p['99.000000']/1e3, p['99.900000']/1e3, r['iops']))" >> $C
  done; done
done
for b in base new; do stop_pidfile $w/$b.pid; done
python3 - $C <<'PY'
import csv,sys,statistics as s
rows=list(csv.DictReader(open(sys.argv[1])))
for rw in ('randwrite','randread'):
  for b in ('base','new'):
    r=[x for x in rows if x['rw']==rw and x['build']==b]
    print(rw,b,' '.join('%s=%.1f' % (k, s.median(float(x[k]) for x in r)) for k in ('p50','p99','p999','iops')))
PY
