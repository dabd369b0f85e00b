#!/bin/bash
set -u
export SERVERS='memory|d||MEM allocator=malloc
vulkan|d||.devbin/main.so backend=vulkan
vk-fair|d||.devbin/fair.so backend=vulkan'
PERF="vk-fair vulkan" PERFG=-g PERFLINES=300 PERFSHAPES="rr4x32" SHAPES="rr1 rr32 rw32 rr4x32" CPS="4 4" ROUNDS=${ROUNDS:-2} SECS=3 timeout ${ABT:-300} bash .devbin/call2.sh 2>&1 | tail -20
source .devdebs/setup.sh >/dev/null 2>&1
T=$OUT/tests.txt
echo "== tests (fair.so build)" > $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 150 .devbin/store_conformance --test-threads 1 >> $T 2>&1; echo "store_conformance rc=$?" >> $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance --test-threads 1 >> $T 2>&1; echo "backend_conformance rc=$?" >> $T
for b in vulkan cuda; do
  VRAMSWAP_TEST_PLUGIN=.devbin/fair.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 90 .devbin/nbd_plugin --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> $T 2>&1; echo "plugin $b rc=$?" >> $T
done
grep -E "rc=|test result" $T
