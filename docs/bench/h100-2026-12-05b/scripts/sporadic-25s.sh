#!/bin/bash
# Call 4 (63 s): nbd-compare's sporadic reads (4 KiB, QD1, 100 ms think
# time) for 25 s (259 samples, not ~20), lz4 and uncompressed, CUDA,
# 1 GiB of bench/swap's pages. The command as run, one line there.
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
S=/dev/shm/s; write_source $S 1073741824 swap; U="nbd+unix:///?socket=/tmp/x.sock"
for s in lz4 cuda; do
  k="backend=cuda size=1G"; [ $s = lz4 ] && k="$k compress=lz4 ratio=1"
  rm -f /tmp/x.sock; nbdkit -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid .devbin/plugin.so $k 2>/dev/null
  await_export /tmp/x.sock /tmp/x.pid; nbdcopy --connections=8 $S $U
  fio --name=sp --ioengine=nbd --uri=$U --size=1G --time_based --runtime=25 --ramp_time=1 --rw=randread \
    --bs=4k --iodepth=1 --thinktime=100ms --output-format=json --output=$OUT/sp-$s.json >/dev/null 2>&1
  stop_pidfile /tmp/x.pid
done
