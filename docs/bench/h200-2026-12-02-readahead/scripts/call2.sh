#!/bin/bash
# Call 2: read-ahead v1 (call 1's build) vs v2 (no shared counters on a hit,
# depth 2 or 4) vs off, with nbdcopy's own CPU; the test suites one test at a
# time; then bench/nbd-compare of the v2 defaults.
# Call 3 ran this with SERVERS=("memory||$M" "cuda||$P backend=cuda"
# "cuda-off||$P backend=cuda readahead=0" "vulkan||$P backend=vulkan"
# "vulkan-off||$P backend=vulkan readahead=0") (the build of the commit:
# 32 windows, four ahead), nbd-compare under `timeout 240`, and main's
# (17492fa) store_conformance as a control had the new one failed.
# VRAMSWAP_EXP_DEPTH was a throwaway knob of call 2's v2 build (windows
# filled ahead), not in the commit.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT; mkdir -p $O/logs
P=.devbin/libnbdkit_vramswap_plugin.so
M="$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so allocator=malloc"
head -c 256M /dev/urandom > /dev/shm/piece
for i in $(seq 16); do cat /dev/shm/piece; done > /dev/shm/src; rm /dev/shm/piece
serve() { # name env args...
    local name=$1 envs=$2; shift 2
    SOCK=/tmp/b-$name.sock; rm -f $SOCK
    env $envs nbdkit -f -v -D nbdkit.backend.datapath=0 -U $SOCK -t 16 "$@" size=4G 2>>$O/logs/$name.log &
    PID=$!
    for _ in $(seq 300); do [ -S $SOCK ] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && break; sleep 0.05; done
    URI="nbd+unix:///?socket=$SOCK"
}
SERVERS=("memory||$M" "cuda-v1||.devbin/v1.so backend=cuda" "cuda-v2||$P backend=cuda" "cuda-v2d4|VRAMSWAP_EXP_DEPTH=4|$P backend=cuda readahead=32" "vulkan-v2||$P backend=vulkan" "cuda-off||$P backend=cuda readahead=0")
for round in 1 2 3; do
    order=("${SERVERS[@]}")
    if [ $((round % 2)) = 0 ]; then order=(); for ((i=${#SERVERS[@]}-1;i>=0;i--)); do order+=("${SERVERS[i]}"); done; fi
    for s in "${order[@]}"; do
        IFS='|' read -r name envs args <<<"$s"
        serve "$name" "$envs" $args
        nbdcopy --connections=4 /dev/shm/src "$URI" 2>>$O/logs/$name.log
        for c in 4 4 4 1 8; do python3 .devbin/cp.py $name $round $c "$URI" $PID 4294967296; done >> $O/seq.csv 2>>$O/logs/$name.log
        kill $PID; wait $PID 2>/dev/null
        grep -h "read-ahead:" $O/logs/$name.log | tail -1 | sed "s/^/$round,$name,/" >> $O/readahead.txt
    done
done
python3 - $O/seq.csv <<'PY' | tee $O/summary.txt
import csv,sys,statistics as st,collections
d=collections.defaultdict(list); x=collections.defaultdict(list)
for r in csv.reader(open(sys.argv[1])):
    d[(r[1],r[2])].append(float(r[3])); x[(r[1],r[2])].append(r[5:])
mem={t:st.median(v) for (s,t),v in d.items() if s=='memory'}
for (s,t),v in sorted(d.items()):
    m=st.median(v); print(f"{s:10} {t:4} median {m:6.2f} GB/s  {m/mem[t]:.2f}x memory  all={v}  last={x[(s,t)][-1]}")
PY
echo "== tests" > $O/tests.txt
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 150 .devbin/store_conformance --test-threads 1 >> $O/tests.txt 2>&1; echo "store_conformance rc=$?" >> $O/tests.txt
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance --test-threads 1 >> $O/tests.txt 2>&1; echo "backend_conformance rc=$?" >> $O/tests.txt
for b in cuda vulkan; do
  VRAMSWAP_TEST_PLUGIN=$P VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 90 .devbin/nbd_plugin --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> $O/tests.txt 2>&1; echo "plugin $b rc=$?" >> $O/tests.txt
done
timeout 330 bench/nbd-compare --size 4G --seconds 3 --rounds 2 --plugin $P \
    --memory-plugin $DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so \
    --server cuda=backend=cuda --server vulkan=backend=vulkan --out $O/nbd > $O/nbd-compare.txt 2>&1
