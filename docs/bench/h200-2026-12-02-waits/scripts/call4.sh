#!/bin/bash
# A/B of the bounded-nap wait (new.so) against 46a6fd0 (main.so), then the
# conformance suites and a few plugin tests on both backends with the change.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT/call4; mkdir -p $O/logs
{ nvidia-smi -L; nproc; uname -r; } > $O/machine.txt 2>&1
M="$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc"
export SERVERS="memory||$M
cuda-old||.devbin/main.so backend=cuda
cuda-new||.devbin/new.so backend=cuda
vulkan-old||.devbin/main.so backend=vulkan
vulkan-new||.devbin/new.so backend=vulkan
memory2||$M
cuda-new2||.devbin/new.so backend=cuda
cuda-old2||.devbin/main.so backend=cuda
vulkan-new2||.devbin/new.so backend=vulkan
vulkan-old2||.devbin/main.so backend=vulkan"
timeout 330 .devperf/small2.sh $O/logs 4 > $O/nbd.txt 2>&1
echo "== conformance" > $O/tests.txt
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 90 .devbin/store_conformance >> $O/tests.txt 2>&1; echo "rc=$?" >> $O/tests.txt
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance >> $O/tests.txt 2>&1; echo "rc=$?" >> $O/tests.txt
for b in cuda vulkan; do
  VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 60 .devbin/nbd_plugin fio_verifies_crc32c nbdcopy_round_trips >> $O/tests.txt 2>&1; echo "plugin $b rc=$?" >> $O/tests.txt
done
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs
echo done
