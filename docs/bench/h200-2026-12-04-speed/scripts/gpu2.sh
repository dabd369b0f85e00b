#!/bin/bash
# Call 2: main after merging mapped writes, mapped small reads and CUDA's
# Vulkan-exported chunks (mapped=on only). Tests with mapped=on on both
# backends; how much VRAM each backend can hold mapped (eager, automatic
# size), CUDA with the default and the raised fd limit; then one
# nbd-compare round: cuda (cuMemAlloc), cuda mapped=on, vulkan (mapped
# auto), and branch "direct" (reads by DMA into nbdkit's buffers) on cuda.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
. bench/lib.sh
export XDG_RUNTIME_DIR=/tmp
T=$OUT/tests.txt; : > $T
for b in vulkan cuda; do
  VRAMSWAP_TEST_BACKENDS=$b VRAMSWAP_TEST_MAPPED=on timeout 60 .devbin/store_conformance --test-threads 4 >> $T 2>&1; echo "store $b mapped=on rc=$?" >> $T
done
VRAMSWAP_TEST_BACKENDS=cuda,vulkan VRAMSWAP_TEST_MAPPED=on timeout 40 .devbin/backend_conformance >> $T 2>&1; echo "backend cuda,vulkan mapped=on rc=$?" >> $T
grep -E "^test .*FAIL|rc=|test result|panicked" $T
C=$OUT/capacity.txt; : > $C
echo "ulimit -n soft $(ulimit -Sn) hard $(ulimit -Hn)" >> $C
cap() { # NAME ARGS...: start eager with an automatic size, time it, size, stop
  local name=$1; shift
  local s=/tmp/cap.sock p=/tmp/cap.pid t0=$(date +%s.%N) ok=
  rm -f $s $p
  nbdkit -f -U $s --pidfile $p .devbin/new.so "$@" >> $OUT/cap-$name.log 2>&1 &
  local pid=$!
  for _ in $(seq 1800); do
    kill -0 $pid 2>/dev/null || break
    [ -s $p ] && nbdinfo --size "nbd+unix:///?socket=$s" >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.1
  done
  if [ -n "$ok" ]; then
    echo "$name: ready after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s, size $(nbdinfo --size "nbd+unix:///?socket=$s") bytes, rss $(grep VmRSS /proc/$pid/status)" >> $C
    kill $pid; wait $pid
  else echo "$name: did not start after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s: $(tail -3 $OUT/cap-$name.log | tr '\n' ' ')" >> $C; kill $pid 2>/dev/null; wait $pid 2>/dev/null; fi
  sleep 1
}
cap vulkan-mapped backend=vulkan mapped=on
cap cuda-mapped backend=cuda mapped=on
(ulimit -n $(ulimit -Hn); cap cuda-mapped-nofile backend=cuda mapped=on)
cat $C
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
timeout 330 bench/nbd-compare --memory-plugin $M --plugin .devbin/new.so --size 4G --seconds 2 --rounds 1 --out $OUT/nbd \
  --server 'cuda=backend=cuda' --server 'cuda-mapped=backend=cuda mapped=on' --server 'vulkan=backend=vulkan' \
  --server 'cuda-direct=plugin=.devbin/direct.so backend=cuda' > $OUT/nbd-compare.txt 2>&1; echo "nbd-compare rc=$?"
sed -n '/^test /,$p' $OUT/nbd-compare.txt | grep -v "vs-cuda\|vs-nbd" | head -60
