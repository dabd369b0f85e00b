#!/bin/bash
# Device call 2: controls (host backend, no-DMA CUDA, background DMA) -- 4-connection nbdcopy reads, server variants taking turns.
set -uo pipefail
export XDG_RUNTIME_DIR=/tmp
source .devdebs/setup.sh
{ nvidia-smi; echo "nproc: $(nproc)"; lscpu; echo siblings:; cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list | tr '\n' ' '; echo; uname -a; nbdkit --version; nbdcopy --version; free -g; } > $OUT/machine.txt 2>&1
head -c 256M /dev/urandom > /dev/shm/piece
for i in $(seq 16); do cat /dev/shm/piece; done > /dev/shm/src; rm -f /dev/shm/piece
echo "src ready at $SECONDS s"
SET=2 taskset -c 0-15 python3 .devreads/reads.py $OUT 4G ${ROUNDS:-3} ${BUDGET:-430} $DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so /dev/shm/src ${FILTER:-} 2>&1 | tee $OUT/log.txt
tar czf $OUT/nbdkit-logs.tgz -C /tmp nlogs
rm -f /dev/shm/src
echo "total $SECONDS s"
