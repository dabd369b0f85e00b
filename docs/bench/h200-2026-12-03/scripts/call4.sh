#!/bin/bash
set -u
export SERVERS='memory|d||MEM allocator=malloc
cuda|d||.devbin/main.so backend=cuda
cuda-thp|d||.devbin/thp.so backend=cuda
vulkan|d||.devbin/main.so backend=vulkan
vk-thp|d||.devbin/thp.so backend=vulkan'
SHAPES="rr1" CPS="4 4 4" ROUNDS=2 SECS=3 timeout 150 bash .devbin/call2.sh 2>&1 | tail -16
source .devdebs/setup.sh >/dev/null 2>&1
T=$OUT/tests.txt
echo "== tests (thp.so build)" > $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/store_conformance --test-threads 1 >> $T 2>&1; echo "store_conformance rc=$?" >> $T
for b in vulkan cuda; do
  VRAMSWAP_TEST_PLUGIN=.devbin/thp.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 40 .devbin/nbd_plugin --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> $T 2>&1; echo "plugin $b rc=$?" >> $T
done
grep -E "rc=|test result" $T
