#!/bin/bash
# Call 2: the daemonized start on the GPU (both backends), then NBD-level A/B
# of main before (base.so, 3a84d8b) and after the split (new.so), CUDA.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
T=$OUT/tests.txt; : > $T
for b in cuda vulkan; do
  VRAMSWAP_TEST_BACKENDS=host,$b VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 150 .devbin/nbd_plugin --test-threads 1 daemon bad_parameters fio_verifies_crc32c nbdcopy_round_trips >> $T 2>&1; echo "plugin $b rc=$?" >> $T
done
grep -E "^test |rc=|test result" $T
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 420 bench/nbd-compare --memory-plugin $M --plugin .devbin/new.so --size 4G --seconds 2 --huge 16G --rounds 2 --out $OUT/nbd \
  --server 'cuda-base=plugin=.devbin/base.so backend=cuda' --server 'cuda-new=backend=cuda' > $OUT/nbd-compare.txt 2>&1; echo "nbd-compare rc=$?"
tail -60 $OUT/nbd-compare.txt
