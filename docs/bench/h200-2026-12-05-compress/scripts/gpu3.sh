#!/bin/bash
# Call 3: the same tests and comparison as call 1 after spans.rs (a batch's
# neighbouring slots moved by one step) and compact.rs, with zstd and with
# lz4 on the Vulkan backend (mapped writes: CPU stores into BAR-mapped
# VRAM): one round, 1 GiB exports (nbd-vram-z's sequential writes, 0.07
# GB/s, made call 1's two rounds of 4 GiB outlast the call). Tests first,
# with the carried plugin.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt"
mkdir -p /tmp/peers/nbd-vram-z /tmp/peers/lib
cp .devpeers/nbd-vram-z/nbd-vram /tmp/peers/nbd-vram-z/
cp .devpeers/lib/liblz4.so.1 /tmp/peers/lib/
P=$PWD/.devbin/libnbdkit_vramswap_plugin.so
T=$OUT/tests.txt; : > "$T"
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 100 .devbin/store_conformance --test-threads 2 compress compact pages_that_change >> "$T" 2>&1
echo "store_conformance compress rc=$?" >> "$T"
for b in cuda vulkan; do
  VRAMSWAP_TEST_PLUGIN=$P VRAMSWAP_TEST_PLUGIN_ARGS="backend=$b compress=lz4 ratio=1" timeout 60 .devbin/nbd_plugin \
    --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> "$T" 2>&1
  echo "plugin $b compress=lz4 rc=$?" >> "$T"
done
grep -E "rc=|test result" "$T"
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 480 bench/nbd-compare --memory-plugin "$M" --plugin "$P" \
  --size 1G --seconds 2 --huge 16G --rounds 1 --data swap --out "$OUT/nbd" \
  --server 'cuda=backend=cuda' --server 'lz4=backend=cuda compress=lz4 ratio=1' \
  --server 'zstd=backend=cuda compress=zstd ratio=1' --server 'vk-lz4=backend=vulkan compress=lz4 ratio=1' \
  --peer 'nbd-vram-z=bench/peers start /tmp/peers nbd-vram-z "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/nbd-compare.txt" 2>&1
echo "nbd-compare rc=$?"
tail -80 "$OUT/nbd-compare.txt"
