#!/bin/bash
# Not run (no machine was lent): why nbd-compare's 4-connection read is lower than call 3's A/B:
# its sequence (write 1, read 1, write 4, read 4), daemonized, vs -f -v.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT
P=.devbin/libnbdkit_vramswap_plugin.so
M="$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc"
head -c 256M /dev/urandom > /dev/shm/piece
for i in $(seq 16); do cat /dev/shm/piece; done > /dev/shm/src; rm /dev/shm/piece
t() { local a b; a=$(date +%s.%N); "$@" 2>/dev/null; b=$(date +%s.%N); python3 -c "print(f'{4294967296/($b-$a)/1e9:.2f}')"; }
for round in 1 2; do
  for s in "memory|d|$M" "cuda|d|$P backend=cuda" "cuda-off|d|$P backend=cuda readahead=0" "cuda-fv|f|$P backend=cuda"; do
    IFS='|' read -r name mode args <<<"$s"
    sock=/tmp/c4.sock; rm -f $sock /tmp/c4.pid
    if [ $mode = d ]; then nbdkit -U $sock -t 16 --pidfile /tmp/c4.pid $args size=4G; else nbdkit -f -v -D nbdkit.backend.datapath=0 -U $sock -t 16 $args size=4G 2>/tmp/c4-$name.log & echo $! > /tmp/c4.pid; fi
    for _ in $(seq 300); do [ -S $sock ] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && break; sleep 0.05; done
    u="nbd+unix:///?socket=$sock"
    w1=$(t nbdcopy --connections=1 /dev/shm/src $u); r1=$(t nbdcopy --connections=1 $u null:)
    w4=$(t nbdcopy --connections=4 /dev/shm/src $u); r4=$(t nbdcopy --connections=4 $u null:)
    r4b=$(t nbdcopy --connections=4 $u null:); r4c=$(t nbdcopy --connections=4 $u null:)
    echo "$round $name w1=$w1 r1=$r1 w4=$w4 r4=$r4 r4b=$r4b r4c=$r4c" | tee -a $O/seq.txt
    kill $(cat /tmp/c4.pid); sleep 0.5
  done
done
