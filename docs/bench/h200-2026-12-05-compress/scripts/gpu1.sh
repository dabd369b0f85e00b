#!/bin/bash
# Call 1: compressed stores on the H200: the compressed model tests and the
# plugin's fio verify / nbdcopy tests with compress=lz4 on both backends,
# then bench/nbd-compare --data swap, two rounds: memory plugin, cuda
# (uncompressed), lz4 (cuda, compress=lz4), nbd-vram-z (nbd-vram's
# compressed mode, lz4), every compressed export with VRAM for all of it
# (ratio 1) so that no write meets a full store.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt"
# The peer, compiled on the Debian 12 machine (not from this repository),
# and Debian's liblz4.so.1 for it.
mkdir -p /tmp/peers/nbd-vram-z /tmp/peers/lib
cp .devpeers/nbd-vram-z/nbd-vram /tmp/peers/nbd-vram-z/
cp .devpeers/lib/liblz4.so.1 /tmp/peers/lib/
T=$OUT/tests.txt; : > "$T"
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 150 .devbin/store_conformance --test-threads 2 compress >> "$T" 2>&1
echo "store_conformance compress rc=$?" >> "$T"
for b in cuda vulkan; do
  VRAMSWAP_TEST_PLUGIN_ARGS="backend=$b compress=lz4 ratio=1" timeout 90 .devbin/nbd_plugin --test-threads 1 \
    fio_verifies_crc32c nbdcopy_round_trips >> "$T" 2>&1
  echo "plugin $b compress=lz4 rc=$?" >> "$T"
done
grep -E "rc=|test result" "$T"
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 470 bench/nbd-compare --memory-plugin "$M" --plugin .devbin/libnbdkit_vramswap_plugin.so \
  --size 4G --seconds 2 --huge 16G --rounds 2 --data swap --out "$OUT/nbd" \
  --server 'cuda=backend=cuda' --server 'lz4=backend=cuda compress=lz4 ratio=1' \
  --peer 'nbd-vram-z=bench/peers start /tmp/peers nbd-vram-z "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/nbd-compare.txt" 2>&1
echo "nbd-compare rc=$?"
tail -70 "$OUT/nbd-compare.txt"
