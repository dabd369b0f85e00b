#!/bin/bash
# Issue 23's goal shapes, medians of two rounds with the servers taking
# turns, in one call: the memory plugin, the default backend (cuda), Vulkan
# (mapped writes, gathered DMA reads), nbd-vram and nbdkit's vram plugin,
# 4 GiB exports, bench/nbd-compare --shapes qd32,qd1,peer,rss (the 4 KiB
# QD32 and QD1 shapes, nbd-vram's own, the RSS). The sequential groups
# (seq, seq1m) and the lazy-export RSS (huge) are left to a later call: the
# whole suite of five servers does not fit one ten-minute call twice.
# Carry .devdebs, .devpeers (nbd-vram's tarball, nbdkit 1.48.1 and
# ocl-icd debs) and .devbin/libnbdkit_vramswap_plugin.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
OUT=${OUT:-/tmp/speed-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1
bench/peers build .devpeers /tmp/peers 2>&1 | tee "$OUT/peers-build.txt"
P=$PWD/.devbin/libnbdkit_vramswap_plugin.so
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout "${LIMIT:-540}" bench/nbd-compare --memory-plugin "$M" --plugin "$P" \
  --size "${SIZE:-4G}" --seconds 2 --rounds 2 --shapes qd32,qd1,peer,rss --out "$OUT/nbd" \
  --server 'cuda=backend=cuda' --server 'vulkan=backend=vulkan' \
  --peer 'nbd-vram=bench/peers start /tmp/peers nbd-vram "$SOCK" "$SIZE" "$PIDFILE"' \
  --peer 'nbdkit-vram=bench/peers start /tmp/peers nbdkit-vram "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/nbd-compare.txt" 2>&1
echo "nbd-compare rc=$?"
sed -n '/^test /,$p' "$OUT/nbd-compare.txt" | head -120
