#!/bin/bash
# Call 3 (186 s): issue 24's shapes again, one round, with main a9f9696
# (the slot batching in): lz4 (CUDA), vk-lz4, cuda uncompressed, the
# memory plugin and nbd-vram-z (c0deJedi 2b959d8, VRAM_COMPRESS=1), 1 GiB.
# The command as run, one line there; carry .devbin, .devdebs, .devpeers.
source .devdebs/setup.sh >/dev/null 2>&1; export XDG_RUNTIME_DIR=/tmp
mkdir -p /tmp/peers/nbd-vram-z /tmp/peers/lib "$OUT/z"
cp .devpeers/nbd-vram-z/nbd-vram /tmp/peers/nbd-vram-z/; cp .devpeers/lib/liblz4.so.1 /tmp/peers/lib/
timeout 330 bench/nbd-compare --memory-plugin "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" \
  --plugin "$PWD/.devbin/plugin.so" --size 1G --seconds 2 --rounds 1 --data swap --shapes qd32,qd1,peer \
  --out "$OUT/z/nbd" --server 'lz4=backend=cuda compress=lz4 ratio=1' \
  --server 'vk-lz4=backend=vulkan compress=lz4 ratio=1' --server 'cuda=backend=cuda' \
  --peer 'nbd-vram-z=bench/peers start /tmp/peers nbd-vram-z "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/z/nbd-compare.txt" 2>&1
echo rc=$?
