#!/bin/bash
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT/call2; mkdir -p $O/logs
R=".devbin/raw_exp --size 1G --requests 4K,64K,256K --threads 1,4,16 --seconds 1.5"
export SERVERS="memory||$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc
cuda-x||.devbin/exp.so backend=cuda
vulkan-x||.devbin/exp.so backend=vulkan
vk-1q|VRAMSWAP_EXP_QUEUES=1|.devbin/exp.so backend=vulkan
cuda||.devbin/main.so backend=cuda
memory2||$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc
cuda-x2||.devbin/exp.so backend=cuda
vulkan-x2||.devbin/exp.so backend=vulkan"
timeout 330 .devperf/small2.sh $O/logs 4 > $O/nbd.txt 2>&1
grep -h '^EXP' $O/logs/*.log | grep -v 'EXP reset\|EXP family' > $O/nbd-exp.txt
RAWEXP=1 VRAMSWAP_EXP_QUEUES=1 timeout 80 $R --backend vulkan > $O/raw-vulkan-1q.txt 2>&1
RAWEXP=1 timeout 80 $R --backend cuda > $O/raw-cuda.txt 2>&1
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs
echo done
