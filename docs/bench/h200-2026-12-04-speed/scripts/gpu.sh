#!/bin/bash
# branch small: small reads through the mapping vs DMA, store and raw.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
B=.devbin/small
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r; nproc; grep -m1 "model name" /proc/cpuinfo; } > $OUT/machine.txt
cat $OUT/machine.txt
for cfg in "vulkan on" "vulkan off" "cuda auto"; do
  set -- $cfg
  echo "== backend $1 mapped=$2" | tee -a $OUT/small-reads.txt
  timeout 50 $B/small_reads --backend $1 --mapped $2 --size 1G --seconds 1 --threads 1,4,16 --raw 4K,16K,64K >> $OUT/small-reads.txt 2>&1; echo "rc=$?" >> $OUT/small-reads.txt
done
cat $OUT/small-reads.txt
T=$OUT/tests.txt
VRAMSWAP_TEST_BACKENDS=vulkan VRAMSWAP_TEST_MAPPED=on timeout 75 $B/store_conformance --test-threads 2 > $T 2>&1; echo "store_conformance vulkan mapped=on rc=$?" >> $T
grep -E "^test |rc=|test result|panicked" $T
