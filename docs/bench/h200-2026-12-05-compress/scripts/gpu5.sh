#!/bin/bash
# Ready for the next GPU call (not run yet): medians of the shapes issue
# 24's goals name, which calls 1 and 3 measured once each (lz4's QD32 and
# QD1 figures differed by more than the goals' margins between them).
# Two rounds, servers taking turns, of the QD32 and QD1 groups, nbd-vram's
# own shapes and the server RSS (bench/nbd-compare --shapes): memory, cuda
# (uncompressed), lz4, zstd, vk-lz4 and nbd-vram-z, 1 GiB exports of
# bench/swap's pages (nbd-vram-z writes them at 0.2 GB/s). About 35 s a
# server a round: 420 s. Carry .devdebs, .devpeers (nbd-vram-z, liblz4)
# and .devbin/libnbdkit_vramswap_plugin.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
OUT=${OUT:-/tmp/gpu5-out}
mkdir -p "$OUT" /tmp/peers/nbd-vram-z /tmp/peers/lib
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1
cp .devpeers/nbd-vram-z/nbd-vram /tmp/peers/nbd-vram-z/
cp .devpeers/lib/liblz4.so.1 /tmp/peers/lib/
P=$PWD/.devbin/libnbdkit_vramswap_plugin.so
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 560 bench/nbd-compare --memory-plugin "$M" --plugin "$P" \
  --size 1G --seconds 2 --rounds 2 --data swap --shapes qd32,qd1,peer,rss --out "$OUT/nbd" \
  --server 'cuda=backend=cuda' --server 'lz4=backend=cuda compress=lz4 ratio=1' \
  --server 'zstd=backend=cuda compress=zstd ratio=1' --server 'vk-lz4=backend=vulkan compress=lz4 ratio=1' \
  --peer 'nbd-vram-z=bench/peers start /tmp/peers nbd-vram-z "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/nbd-compare.txt" 2>&1
echo "nbd-compare rc=$?"
tail -80 "$OUT/nbd-compare.txt"
