#!/bin/bash
# Issue 27 on the H200: the elastic watcher against another GPU program,
# with each backend (bench/elastic-gpu), and what one server costs beside
# the VRAM it serves (host RSS and VRAM of its context and staging): the
# figure that decided one server for all slices over one per slice.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt"
P=$PWD/.devbin/libnbdkit_vramswap_plugin.so
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; }
for b in cuda vulkan; do
  # One idle server of 1 GiB, lazy: what it takes before any data.
  before=$(used)
  t0=$(date +%s.%N)
  nbdkit --unix /tmp/cost.sock --pidfile /tmp/cost.pid --threads 16 "$P" backend=$b allocation=lazy size=1G
  for _ in $(seq 600); do [ -S /tmp/cost.sock ] && break; sleep 0.05; done
  t1=$(date +%s.%N)
  nbdinfo --size 'nbd+unix:///?socket=/tmp/cost.sock' >/dev/null
  sleep 1
  pid=$(cat /tmp/cost.pid)
  echo "$b: one idle server: start $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s, RSS $(awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/"$pid"/status), VRAM $(( $(used) - before )) MiB (nvidia-smi used, before any chunk)" | tee -a "$OUT/server-cost.txt"
  kill "$pid"; sleep 2; rm -f /tmp/cost.sock
  timeout 200 bench/elastic-gpu --backend $b --vramswap .devbin/vramswap --hog .devbin/vram_hog \
    --plugin "$P" --out "$OUT" --slices 8 --slice 2G --headroom 4G --settle 5 > "$OUT/$b.txt" 2>&1
  echo "elastic-gpu $b rc=$?" | tee -a "$OUT/server-cost.txt"
  tail -40 "$OUT/$b.timeline"
done
