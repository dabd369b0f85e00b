#!/bin/bash
# Call 5: calls 2-4 put batch.so after base.so in every round, and 4 KiB
# QD1 reads drifted up 2-5 us over each call; here batch.so goes first:
# six rounds of uncompressed 4 KiB QD1 random reads (3 s), batch then base.
# Carry .devdebs and .devbin/{base,batch}.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
S=/dev/shm/src; write_source $S 1073741824 swap
serve() { rm -f /tmp/x.sock; nbdkit "$@" -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid 2>/dev/null; await_export /tmp/x.sock /tmp/x.pid; }
U="nbd+unix:///?socket=/tmp/x.sock"
for round in 1 2 3 4 5 6; do for so in batch base; do
  serve .devbin/$so.so backend=cuda size=1G
  nbdcopy --connections=8 $S $U
  fio --name=q --ioengine=nbd --uri=$U --size=1G --time_based --runtime=3 --ramp_time=1 --rw=randread \
    --bs=4k --iodepth=1 --output-format=json --output=/tmp/q.json >/dev/null 2>&1
  python3 -c "
import json; j=json.load(open('/tmp/q.json'))['jobs'][0]['read']; p=j['clat_ns']['percentile']
print('$so r$round off qd1 p50', round(p['50.000000']/1e3,1), 'p99', round(p['99.000000']/1e3,1), 'us', round(j['iops']), 'IOPS')"
  stop_pidfile /tmp/x.pid
done; done 2>&1 | tee "$OUT/call5.txt"
rm -f $S $S.piece
