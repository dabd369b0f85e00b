#!/bin/bash
# Call 3: the daemonized refusals with Vulkan on the GPU (test fixed), then
# the NBD-level A/B again with the order reversed (new before base), CUDA
# and Vulkan.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
T=$OUT/tests.txt; : > $T
VRAMSWAP_TEST_BACKENDS=host,vulkan VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=vulkan timeout 100 .devbin/nbd_plugin --test-threads 1 daemon bad_parameters >> $T 2>&1; echo "plugin vulkan rc=$?" >> $T
grep -E "^test |rc=|test result" $T
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 480 bench/nbd-compare --memory-plugin $M --plugin .devbin/new.so --size 4G --seconds 2 --huge 16G --rounds 2 --out $OUT/nbd \
  --server 'cuda-new=backend=cuda' --server 'cuda-base=plugin=.devbin/base.so backend=cuda' \
  --server 'vk-new=backend=vulkan' --server 'vk-base=plugin=.devbin/base.so backend=vulkan' > $OUT/nbd-compare.txt 2>&1; echo "nbd-compare rc=$?"
tail -45 $OUT/nbd-compare.txt
