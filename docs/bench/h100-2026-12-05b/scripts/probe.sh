#!/bin/bash
# One call: (1) idle-copy: one 4 KiB CUDA copy after 0-100 ms idle, the
# ways of reading 4 KiB from VRAM with the least host time, and
# what 10-40 us naps really sleep at the default and a 1 us timer slack;
# (2) the sporadic-read shape of nbd-compare (4 KiB, QD1, 100 ms think
# time) for 12 s instead of 2 (about 110 samples), memory plugin, cuda,
# cuda with the server's timer slack 1 us (set before exec: inherited by
# every thread); (3) layout.sh's measure with the build from before the
# slot batching (.devbin/old.so, main 63b7b01) and after (.devbin/plugin.so,
# main a9f9696), and .devbin/gap.so: a9f9696 with a compressed read's
# slots within 32 KiB of each other (not 4 KiB) moved by one step;
# (4) 4 MiB QD1 on a fresh and a churned lz4 area (below); (6) gpu4.sh
# part 2 (compressed nbdcopy at 8 connections) with the new build.
# Run from the repository root, .devdebs and .devbin carried.
set -u
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
P=$OUT/probe; mkdir -p $P
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > $P/machine.txt 2>&1
cat $P/machine.txt
timeout 120 .devbin/idle-copy 2>&1 | tee $P/idle-copy.txt

S=/dev/shm/src; write_source $S 1073741824 swap
slack() { python3 -c 'import ctypes,os,sys; ctypes.CDLL(None).prctl(29,1000,0,0,0); os.execvp(sys.argv[1], sys.argv[1:])' "$@"; }
serve() { # name, nbdkit args...
  local name=$1; shift; rm -f /tmp/x.sock
  "$@" -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid 2>/dev/null
  await_export /tmp/x.sock /tmp/x.pid
}
U="nbd+unix:///?socket=/tmp/x.sock"
for s in memory cuda cuda-slack1us; do
  case $s in
    memory) serve $s nbdkit "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" size=1G allocator=malloc ;;
    cuda) serve $s nbdkit .devbin/plugin.so backend=cuda size=1G ;;
    cuda-slack1us) serve $s slack nbdkit .devbin/plugin.so backend=cuda size=1G ;;
  esac
  nbdcopy --connections=8 $S $U
  fio --name=sporadic --ioengine=nbd --uri=$U --size=1G --time_based --runtime=12 --ramp_time=1 \
    --rw=randread --bs=4k --iodepth=1 --thinktime=100ms --output-format=json --output=$P/sporadic-$s.json >/dev/null 2>&1
  python3 - $P/sporadic-$s.json $s <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))['jobs'][0]['read']['clat_ns']; p = j['percentile']
print(f"sporadic {sys.argv[2]:<14} n={j['N']:4d} mean {j['mean']/1e3:7.1f} p50 {p['50.000000']/1e3:7.1f} p90 {p['90.000000']/1e3:7.1f} p99 {p['99.000000']/1e3:7.1f} max {j['max']/1e3:7.1f} us")
PY
  stop_pidfile /tmp/x.pid
done 2>&1 | tee $P/sporadic.txt

gbs() { python3 -c "print(round(1.073741824/($2-$1),2))"; }
for so in old plugin gap; do for mode in one many; do
  serve x nbdkit .devbin/$so.so backend=cuda size=1G compress=lz4 ratio=1
  if [ $mode = one ]; then w=(--connections=1 --requests=1); else w=(--connections=8); fi
  a=$(date +%s.%N); nbdcopy "${w[@]}" $S $U; b=$(date +%s.%N); echo "$so $mode write $(gbs "$a" "$b") GB/s"
  for _ in 1 2; do a=$(date +%s.%N); nbdcopy --connections=8 $U null:; b=$(date +%s.%N); echo "$so $mode read8 $(gbs "$a" "$b") GB/s"; done
  stop_pidfile /tmp/x.pid
done; done 2>&1 | tee $P/layout.txt
# (5) 4 MiB QD1 writes then reads (nbd-compare's sw4m/sr4m, fio's
# 2.5:1 buffers) on a fresh lz4 area, then again after 6 s of 4 KiB random
# writes have left free slots all over the slabs: does the scatter of a
# request's slots (a copy per page) set the 0.6-0.9 GB/s?
fio4m() { fio --name=$1 --ioengine=nbd --uri=$U --size=1G --time_based --runtime=${3:-3} --ramp_time=1 \
    --rw=$2 --bs=${4:-4m} --iodepth=${5:-1} --buffer_compress_percentage=60 --buffer_compress_chunk=4096 \
    --refill_buffers --output-format=json --output=$P/$1.json >/dev/null 2>&1
  python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['$2'.replace('rand','')]; print(sys.argv[2], round(j['bw_bytes']/1e9,3), 'GB/s', round(j['iops']), 'IOPS')" $P/$1.json $1; }
{ for so in plugin gap; do
  serve x nbdkit .devbin/$so.so backend=cuda size=1G compress=lz4 ratio=1
  fio4m $so-fresh-w write; fio4m $so-fresh-r read
  fio4m $so-churn randwrite 6 4k 32
  fio4m $so-churned-w write; fio4m $so-churned-r read
  stop_pidfile /tmp/x.pid
done
serve x nbdkit .devbin/plugin.so backend=cuda size=1G
fio4m off-w write; fio4m off-r read
stop_pidfile /tmp/x.pid; } 2>&1 | tee $P/seq4m.txt
rm -f $S $S.piece
BACKENDS=cuda PARTS=2 SIZE=2G OUT=$P/gpu4 bash docs/bench/h200-2026-12-05-compress/scripts/gpu4.sh > $P/gpu4.txt 2>&1
tail -n 30 $P/gpu4.txt
tar czf $OUT/probe.tgz -C $OUT probe && rm -rf $P
