#!/bin/bash
# Issue 24's bench/swap on the GPU machine (h200-2026-12-05-compress's
# gpu2.sh, which never got a machine, with uncompressed cuda and vulkan-lz4
# beside): real kernel swap in a TCG guest (no KVM there), vramswap areas
# uncompressed, lz4 and zstd (ratio 1) beside zram with the same
# algorithms, every page checked. Carry .devdebs, .devswap (bench/swap-pack)
# and .devbin/libnbdkit_vramswap_plugin.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1
timeout 440 bench/swap --carried .devswap --plugin .devbin/libnbdkit_vramswap_plugin.so \
  --memory-plugin "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" \
  --cases cuda-lz4,zram-lz4,cuda-zstd,zram-zstd,cuda,vulkan-lz4 --out "$OUT/swap" > "$OUT/swap-run.txt" 2>&1
echo "swap rc=$?"
tail -30 "$OUT/swap-run.txt"
cat "$OUT/swap/swap.txt" 2>/dev/null
