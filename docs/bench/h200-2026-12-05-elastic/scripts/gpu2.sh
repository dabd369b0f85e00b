#!/bin/bash
# Issue 27 on the H200, call 2: call 1 again with the watcher's lines
# timed as they come, and each server's cost measured on an idle GPU
# (call 1's Vulkan figure read nvidia-smi while the CUDA run's memory was
# still being freed).
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt"
P=$PWD/.devbin/libnbdkit_vramswap_plugin.so
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; }
for b in vulkan cuda; do
  # One idle server of 1 GiB, lazy: what it takes before any data.
  sleep 5
  before=$(used)
  t0=$(date +%s.%N)
  nbdkit --unix /tmp/cost.sock --pidfile /tmp/cost.pid --threads 16 "$P" backend=$b allocation=lazy size=1G
  for _ in $(seq 600); do [ -S /tmp/cost.sock ] && break; sleep 0.05; done
  nbdinfo --size 'nbd+unix:///?socket=/tmp/cost.sock' >/dev/null
  t1=$(date +%s.%N)
  sleep 1
  pid=$(cat /tmp/cost.pid)
  echo "$b: one idle server: start to first answer $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s, RSS $(awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/"$pid"/status), VRAM $(( $(used) - before )) MiB (nvidia-smi used, before any chunk)" | tee -a "$OUT/server-cost.txt"
  kill "$pid"; sleep 3; rm -f /tmp/cost.sock
  echo "$b: after the server exited: $(( $(used) - before )) MiB over the start" | tee -a "$OUT/server-cost.txt"
  timeout 200 bench/elastic-gpu --backend $b --vramswap .devbin/vramswap --hog .devbin/vram_hog \
    --plugin "$P" --out "$OUT" --slices 8 --slice 2G --headroom 4G --settle 5 > /dev/null 2> "$OUT/$b.err"
  echo "elastic-gpu $b rc=$?" | tee -a "$OUT/server-cost.txt"
  tail -40 "$OUT/$b.timeline"
done
