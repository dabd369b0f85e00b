#!/bin/bash
# Call 1: mapped writes on the H200. Correctness (store conformance with
# Vulkan mapped=on; the plugin's real-client tests with backend=vulkan
# mapped=on), then one nbd-compare round: memory, cuda (DMA), vulkan with
# mapped writes, vulkan without, and nbd-vram (bench/peers).
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
nvidia-smi -q | grep -A3 -i "bar1 memory" > $OUT/bar1.txt
T=$OUT/tests.txt; : > $T
VRAMSWAP_TEST_BACKENDS=vulkan VRAMSWAP_TEST_MAPPED=on timeout 100 .devbin/store_conformance --test-threads 4 >> $T 2>&1; echo "store vulkan mapped=on rc=$?" >> $T
VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS="backend=vulkan" timeout 60 .devbin/nbd_plugin --test-threads 2 fio_verifies_crc32c nbdcopy_round_trips qemu_io writes_on_one >> $T 2>&1; echo "plugin vulkan (mapped=auto; qemu_io: on and off) rc=$?" >> $T
grep -E "^test |rc=|test result|panicked" $T
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
bench/peers build .devpeers /tmp/peers
timeout 400 bench/nbd-compare --memory-plugin $M --plugin .devbin/new.so --size 4G --seconds 2 --rounds 1 --out $OUT/nbd \
  --server 'cuda=backend=cuda' --server 'vk-mapped=backend=vulkan mapped=on' --server 'vk-dma=backend=vulkan mapped=off' \
  --peer 'nbd-vram=bench/peers start /tmp/peers nbd-vram "$SOCK" "$SIZE" "$PIDFILE"' > $OUT/nbd-compare.txt 2>&1; echo "nbd-compare rc=$?"
tail -120 $OUT/nbd-compare.txt
