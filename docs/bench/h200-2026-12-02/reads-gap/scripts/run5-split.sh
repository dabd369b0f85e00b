#!/bin/bash
# Do 4-connection reads lose to the memory plugin because our server's
# wake-ups land on the client's CPUs? Same servers, CPUs shared or split.
set -uo pipefail
export XDG_RUNTIME_DIR=/tmp
source .devdebs/setup.sh
MEM=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
head -c 256M /dev/urandom > /dev/shm/piece
for i in $(seq 16); do cat /dev/shm/piece; done > /dev/shm/src; rm -f /dev/shm/piece
S=/tmp/s.sock; P=/tmp/s.pid; URI="nbd+unix:///?socket=$S"
one() { # name servercpus clientcpus env plugin args...
  local name=$1 scpu=$2 ccpu=$3 envs=$4; shift 4
  rm -f $S $P
  env $envs taskset -c $scpu nbdkit -U $S -t 16 --pidfile $P "$@" size=4G
  for _ in $(seq 200); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
  taskset -c $ccpu nbdcopy --connections=4 /dev/shm/src "$URI"
  local line="$name srv=$scpu cli=$ccpu"
  for r in 1 2 3; do
    local t0=$(date +%s.%N)
    taskset -c $ccpu nbdcopy --connections=4 "$URI" null:
    local t1=$(date +%s.%N)
    line+=" $(python3 -c "print(f'{4294967296/($t1-$t0)/1e9:.2f}')")"
  done
  echo "$line" | tee -a $OUT/split.txt
  kill "$(cat $P)"; sleep 0.5
}
for round in 1 2 3; do
  echo "round $round" | tee -a $OUT/split.txt
  for cpus in "0-15 0-15" "4-15 0-3" "8-15 0-7"; do
    set -- $cpus
    one mem $1 $2 "X=1" $MEM allocator=malloc
    one cuda $1 $2 "X=1" .devreads/main.so backend=cuda
    one cuda-nobsync $1 $2 "VRAMSWAP_NO_BSYNC=1" .devreads/proto.so backend=cuda
  done
done
rm -f /dev/shm/src
echo "total $SECONDS s"
