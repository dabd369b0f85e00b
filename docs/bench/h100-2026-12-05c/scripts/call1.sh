#!/bin/bash
# Call 1: pieces.c (scattered pieces from VRAM by copies, one batch copy,
# one gather kernel; quiet, then beside another process's busy kernels),
# then swap.sh. Carry .devdebs, .devswap, .devbin/pieces and
# .devbin/libnbdkit_vramswap_plugin.so.
set -u
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1
timeout 120 .devbin/pieces > "$OUT/pieces.txt" 2>&1
echo "pieces rc=$?"
cat "$OUT/pieces.txt"
bash "$(dirname "$0")/swap.sh"
