#!/bin/bash
# Ready for the next GPU call (not run yet): the store's own compressed
# path, no nbdkit, by threads, beside the uncompressed store and the pinned
# ceiling. nbdcopy's compressed reads stop near 2 GB/s at 1, 4 and 8
# connections; if the store alone scales past that with threads, nbdkit's
# side of the path bounds it, else the store or the backend does.
# Carry .devbin with raw_copy built here:
#   cargo bench --no-run --bench raw_copy, then copy target/release/deps/raw_copy-*
#   (the executable) to .devbin/raw_copy.
set -u
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt"
for b in cuda vulkan; do
  for c in off lz4 zstd; do
    args=(--backend "$b" --size 4G --seconds 2 --requests "256K,4M" --threads "1,4,8,16")
    [ "$c" = off ] || args+=(--compress "$c")
    timeout 120 .devbin/raw_copy "${args[@]}" > "$OUT/raw_copy-$b-$c.txt" 2>&1
    echo "raw_copy $b $c rc=$?"
    tail -9 "$OUT/raw_copy-$b-$c.txt"
  done
done
