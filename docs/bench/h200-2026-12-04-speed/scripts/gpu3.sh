#!/bin/bash
# Call 3 (and 4): how much VRAM each backend holds with an automatic size,
# mapped and not; 4 MiB QD1 reads, cuda vs branch "direct"; then the final
# comparison, started in its own session so that call 4 can collect it:
# nbd-compare --rounds 2 with cuda (the default: cuMemAlloc), cuda
# mapped=on, vulkan (mapped=auto), nbd-vram and nbdkit's vram plugin.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
. bench/lib.sh
export XDG_RUNTIME_DIR=/tmp
START=$(date +%s)
T=$OUT/tests.txt; : > $T
VRAMSWAP_TEST_BACKENDS=vulkan timeout 60 .devbin/store_conformance --test-threads 4 >> $T 2>&1; echo "store vulkan mapped=off,auto rc=$?" >> $T
grep -E "^test .*FAIL|rc=|test result|panicked" $T
C=$OUT/capacity.txt; : > $C
cap() { # NAME ARGS...: start eager, time it, size, stop
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
    echo "$name: ready after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s, size $(nbdinfo --size "nbd+unix:///?socket=$s") bytes, $(grep VmRSS /proc/$pid/status)" >> $C
    kill $pid; wait $pid
  else echo "$name: did not start after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" >> $C; kill $pid 2>/dev/null; wait $pid 2>/dev/null; fi
  grep -h "available\|mappable\|error" $OUT/cap-$name.log | grep -v "oom_score_adj\|IO_FLUSHER" | tail -3 | sed "s/^/  $name: /" >> $C
  sleep 1
}
cap cuda-auto backend=cuda
cap vulkan-off backend=vulkan mapped=off
cap vulkan-auto backend=vulkan
cap vulkan-auto-60G backend=vulkan size=60G
cap vulkan-auto-100G backend=vulkan size=100G
cat $C
# 4 MiB QD1 reads: cuda (main) vs cuda-direct, both up, alternating.
w=/tmp/ab; mkdir -p $w; A=$OUT/direct-4m.csv; echo "round,build,gbps" > $A
for b in new direct; do
  nbdkit -U $w/$b.sock -t 16 --pidfile $w/$b.pid .devbin/$b.so backend=cuda size=4G
  await_export $w/$b.sock $w/$b.pid || echo "$b did not start"
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=write --bs=1M --size=4G --iodepth=8 >/dev/null
done
for round in 1 2 3; do for b in new direct; do
  fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=read --bs=4M --iodepth=1 --size=4G \
    --time_based --runtime=3 --output-format=json --output=$w/j.json >/dev/null
  python3 -c "import json; j=json.load(open('$w/j.json'))['jobs'][0]; print('$round,$b,%.2f' % (j['read']['bw_bytes']/1e9))" >> $A
done; done
for b in new direct; do stop_pidfile $w/$b.pid; done
cat $A
# The final comparison, in a session of its own (call 4 collects it).
F=/tmp/final; rm -rf $F; mkdir -p $F
bench/peers build .devpeers /tmp/peers > $F/peers-build.txt 2>&1
M=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
setsid bash -c "bench/nbd-compare --memory-plugin $M --plugin .devbin/new.so --size 4G --seconds 2 --rounds 2 --out $F/nbd \
  --server 'cuda=backend=cuda' --server 'cuda-mapped=backend=cuda mapped=on' --server 'vulkan=backend=vulkan' \
  --peer 'nbd-vram=bench/peers start /tmp/peers nbd-vram \"\$SOCK\" \"\$SIZE\" \"\$PIDFILE\"' \
  --peer 'nbdkit-vram=bench/peers start /tmp/peers nbdkit-vram \"\$SOCK\" \"\$SIZE\" \"\$PIDFILE\"' \
  > $F/nbd-compare.txt 2>&1; touch $F/done" < /dev/null > /dev/null 2>&1 &
while [ ! -e $F/done ] && [ $(( $(date +%s) - START )) -lt 570 ]; do sleep 5; done
cp -r $F $OUT/final
echo "final: $( [ -e $F/done ] && echo done || echo running) after $(( $(date +%s) - START )) s"
tail -5 $F/nbd-compare.txt
