#!/bin/bash
# Call 2: a run of a batch's copies in one cuMemcpyBatchAsync (CUDA lane).
# (1) Tests on the real driver with the new build's test binaries:
# backend_conformance (cuda, vulkan: its new test of steps taking effect in
# order and scattered pieces landing in place), store_conformance's
# compressed, compaction and model tests on cuda, the plugin's fio verify
# and nbdcopy round trips (cuda, uncompressed and compress=lz4).
# (2) A/B, two rounds taking turns: .devbin/base.so (main 06134fd) and
# .devbin/batch.so (the change), 1 GiB areas of bench/swap's pages:
# 4 MiB QD1 writes and reads on a fresh lz4 area and after 6 s of 4 KiB
# random writes (slots all over the slabs), 8-connection nbdcopy writes and
# reads (lz4), the same 4 MiB and nbdcopy shapes uncompressed, and 4 KiB
# QD1 and QD32 random reads (single-copy batches: should not move).
# Carry .devdebs and .devbin (base.so, batch.so, the three test binaries).
set -u
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine2.txt" 2>&1
T=$OUT/tests.txt; : > "$T"
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance --test-threads 2 >> "$T" 2>&1
echo "backend_conformance rc=$?" >> "$T"
VRAMSWAP_TEST_BACKENDS=cuda timeout 120 .devbin/store_conformance --test-threads 4 compress compact \
  pages_ randomized_multi_thread_model >> "$T" 2>&1
echo "store_conformance rc=$?" >> "$T"
for args in "backend=cuda" "backend=cuda compress=lz4 ratio=1"; do
  VRAMSWAP_TEST_PLUGIN=$PWD/.devbin/batch.so VRAMSWAP_TEST_PLUGIN_ARGS="$args" timeout 90 .devbin/nbd_plugin \
    --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> "$T" 2>&1
  echo "nbd_plugin $args rc=$?" >> "$T"
done
grep -E "rc=|test result" "$T"

P=$OUT/ab; mkdir -p "$P"
S=/dev/shm/src; write_source $S 1073741824 swap
serve() { rm -f /tmp/x.sock; nbdkit "$@" -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid 2>/dev/null; await_export /tmp/x.sock /tmp/x.pid; }
U="nbd+unix:///?socket=/tmp/x.sock"
gbs() { python3 -c "print(round(1.073741824/($2-$1),2))"; }
fio1() { # name rw runtime bs iodepth
  fio --name=$1 --ioengine=nbd --uri=$U --size=1G --time_based --runtime=$3 --ramp_time=1 \
    --rw=$2 --bs=$4 --iodepth=$5 --buffer_compress_percentage=60 --buffer_compress_chunk=4096 \
    --refill_buffers --output-format=json --output=$P/$1.json >/dev/null 2>&1
  python3 -c "
import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['$2'.replace('rand','')]
p=j['clat_ns']['percentile']
print(sys.argv[2], round(j['bw_bytes']/1e9,3), 'GB/s', round(j['iops']), 'IOPS p50', round(p['50.000000']/1e3,1), 'us')" $P/$1.json $1; }
for round in 1 2; do for so in base batch; do
  n=$so-r$round
  serve .devbin/$so.so backend=cuda size=1G compress=lz4 ratio=1
  a=$(date +%s.%N); nbdcopy --connections=8 $S $U; b=$(date +%s.%N); echo "$n lz4 nbdcopy8-write $(gbs "$a" "$b") GB/s"
  for k in 1 2; do a=$(date +%s.%N); nbdcopy --connections=8 $U null:; b=$(date +%s.%N); echo "$n lz4 nbdcopy8-read$k $(gbs "$a" "$b") GB/s"; done
  fio1 $n-lz4-fresh-w write 3 4m 1; fio1 $n-lz4-fresh-r read 3 4m 1
  fio1 $n-lz4-churn randwrite 6 4k 32
  fio1 $n-lz4-churned-w write 3 4m 1; fio1 $n-lz4-churned-r read 3 4m 1
  stop_pidfile /tmp/x.pid
  serve .devbin/$so.so backend=cuda size=1G
  a=$(date +%s.%N); nbdcopy --connections=8 $S $U; b=$(date +%s.%N); echo "$n off nbdcopy8-write $(gbs "$a" "$b") GB/s"
  a=$(date +%s.%N); nbdcopy --connections=8 $U null:; b=$(date +%s.%N); echo "$n off nbdcopy8-read $(gbs "$a" "$b") GB/s"
  fio1 $n-off-w write 3 4m 1; fio1 $n-off-r read 3 4m 1
  fio1 $n-off-qd1 randread 3 4k 1; fio1 $n-off-qd32 randread 3 4k 32
  stop_pidfile /tmp/x.pid
done; done 2>&1 | tee $P/ab.txt
rm -f $S $S.piece
cd "$OUT" && tar czf ab.tgz ab && rm -rf ab
