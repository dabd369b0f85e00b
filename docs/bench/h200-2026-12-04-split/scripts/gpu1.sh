#!/bin/bash
# Call 1: tests of the split build on both backends, then raw_copy A/B.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/machine.txt; uname -r >> $OUT/machine.txt
T=$OUT/tests.txt; : > $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 200 .devbin/store_conformance --test-threads 1 >> $T 2>&1; echo "store_conformance rc=$?" >> $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance --test-threads 1 >> $T 2>&1; echo "backend_conformance rc=$?" >> $T
for b in vulkan cuda; do
  VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 90 .devbin/nbd_plugin --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> $T 2>&1; echo "plugin $b rc=$?" >> $T
done
grep -E "rc=|test result" $T
R=$OUT/raw.csv; : > $R
for round in 1 2; do for b in cuda vulkan; do for build in base new; do
  echo "== $build $b round $round" >> $OUT/raw.txt
  timeout 60 .devbin/raw_copy-$build --backend $b --size 2G --seconds 1 --threads 1,16 --csv /tmp/r.csv >> $OUT/raw.txt 2>&1 || echo "raw $build $b rc=$?"
  sed "s/^/$build,$b,$round,/" /tmp/r.csv >> $R
done; done; done
cat $R
