#!/bin/bash
# Call 1: Vulkan vs CUDA small-request breakdown; queue families; NBD small shapes.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT/call1; mkdir -p $O
{ nvidia-smi -L; nproc; uname -r; } > $O/machine.txt 2>&1
R=".devbin/raw_exp --size 1G --requests 4K,64K,256K --threads 1,4,16 --seconds 1.5"
RAWEXP=1 $R --backend cuda > $O/raw-cuda.txt 2>&1
RAWEXP=1 $R --backend vulkan > $O/raw-vulkan.txt 2>&1
for f in 0 2; do RAWEXP=1 VRAMSWAP_EXP_FAMILY=$f timeout 100 $R --backend vulkan > $O/raw-vulkan-f$f.txt 2>&1; done
export SERVERS="memory||$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc
cuda||.devbin/main.so backend=cuda
vulkan||.devbin/main.so backend=vulkan
vk-f0|VRAMSWAP_EXP_FAMILY=0|.devbin/exp.so backend=vulkan
vk-f2|VRAMSWAP_EXP_FAMILY=2|.devbin/exp.so backend=vulkan
cuda2||.devbin/main.so backend=cuda
vulkan2||.devbin/main.so backend=vulkan"
timeout 280 .devperf/small.sh $O/nbd 4 > $O/nbd.txt 2>&1
echo done
