#!/bin/bash
# CUDA nap schedules (var.so: VAR_FIRST/VAR_CAP in us) against 46a6fd0
# (main.so); the instrumented build (exp.so) on Vulkan for where its stalls are.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT/call5; mkdir -p $O/logs
M="$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc"
export SERVERS="memory||$M
cuda-old||.devbin/main.so backend=cuda
cuda-10-200|VAR_FIRST=10 VAR_CAP=200|.devbin/var.so backend=cuda
cuda-10-50|VAR_FIRST=10 VAR_CAP=50|.devbin/var.so backend=cuda
cuda-5-20|VAR_FIRST=5 VAR_CAP=20|.devbin/var.so backend=cuda
vulkan-x||.devbin/exp.so backend=vulkan
cuda-10-50b|VAR_FIRST=10 VAR_CAP=50|.devbin/var.so backend=cuda
cuda-5-20b|VAR_FIRST=5 VAR_CAP=20|.devbin/var.so backend=cuda
cuda-oldb||.devbin/main.so backend=cuda"
timeout 280 .devperf/small2.sh $O/logs 3 > $O/nbd.txt 2>&1
grep -h '^EXP' $O/logs/*.log | grep -v 'EXP reset\|EXP family\|EXPMAX reset' > $O/nbd-exp.txt
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs
echo done
