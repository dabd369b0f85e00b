#!/bin/bash
# Call 4: did the batched copies cost call 2's and call 3's QD1 reads 2-3 us
# (single-copy batches take the same path but for one check), or the
# 8-connection lz4 writes (uploads of neighbouring slots, batched)? Four
# rounds taking turns: base.so (main 06134fd), batch.so (the change),
# down.so (the change with uploads never batched: an experiment). Each: an
# lz4 area written by nbdcopy --connections=8 and read back, 4 KiB QD1
# random reads of it, then an uncompressed area's 4 KiB QD1 reads.
# Carry .devdebs and .devbin/{base,batch,down}.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
S=/dev/shm/src; write_source $S 1073741824 swap
serve() { rm -f /tmp/x.sock; nbdkit "$@" -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid 2>/dev/null; await_export /tmp/x.sock /tmp/x.pid; }
U="nbd+unix:///?socket=/tmp/x.sock"
gbs() { python3 -c "print(round(1.073741824/($2-$1),2))"; }
qd1() {
  fio --name=q --ioengine=nbd --uri=$U --size=1G --time_based --runtime=3 --ramp_time=1 --rw=randread \
    --bs=4k --iodepth=1 --output-format=json --output=/tmp/q.json >/dev/null 2>&1
  python3 -c "
import json; j=json.load(open('/tmp/q.json'))['jobs'][0]['read']; p=j['clat_ns']['percentile']
print('$1 qd1 p50', round(p['50.000000']/1e3,1), 'p99', round(p['99.000000']/1e3,1), 'us', round(j['iops']), 'IOPS')"; }
for round in 1 2 3 4; do for so in base batch down; do
  n="$so r$round"
  serve .devbin/$so.so backend=cuda size=1G compress=lz4 ratio=1
  a=$(date +%s.%N); nbdcopy --connections=8 $S $U; b=$(date +%s.%N); echo "$n lz4 write8 $(gbs "$a" "$b") GB/s"
  a=$(date +%s.%N); nbdcopy --connections=8 $U null:; b=$(date +%s.%N); echo "$n lz4 read8 $(gbs "$a" "$b") GB/s"
  qd1 "$n lz4"
  stop_pidfile /tmp/x.pid
  serve .devbin/$so.so backend=cuda size=1G
  nbdcopy --connections=8 $S $U
  qd1 "$n off"
  stop_pidfile /tmp/x.pid
done; done 2>&1 | tee "$OUT/call4.txt"
rm -f $S $S.piece
