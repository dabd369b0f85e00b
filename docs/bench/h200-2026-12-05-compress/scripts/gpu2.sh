#!/bin/bash
# Call 2: real kernel swap in a TCG guest on the H200 machine (no KVM there):
# compressed vramswap areas (CUDA, lz4 and zstd, ratio 1) beside zram with
# the same algorithms, every page checked; the packed-ratio / vram-ratio
# rows against zram-ratio / zram-total-ratio.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
timeout 560 bench/swap --carried .devswap --plugin .devbin/libnbdkit_vramswap_plugin.so \
  --memory-plugin "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" \
  --cases cuda-lz4,zram-lz4,cuda-zstd,zram-zstd --out "$OUT/swap" > "$OUT/swap-run.txt" 2>&1
echo "swap rc=$?"
tail -40 "$OUT/swap-run.txt"
cat "$OUT/swap/swap.txt" 2>/dev/null
