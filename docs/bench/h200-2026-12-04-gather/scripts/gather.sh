#!/bin/bash
# Issue 23, part 4: small reads gathered into shared batches, A/B on one
# GPU. Run on the GPU machine from the repository root with .devdebs and
# .devbin carried (.devbin/old.so: main before the change; .devbin/new.so
# and .devbin/small_reads: the change, whose VRAMSWAP_EXP_GATHER=N sets the
# batches in flight, 0 = no gathering; an experiment build only).
#   1. store level (benches/small_reads, no nbdkit): 4 KiB store reads at
#      1, 4, 16, 64 threads, CUDA and Vulkan with mapped=off, gathering off
#      and with 2, 4, 8 batches in flight;
#   2. NBD level: fio 4 KiB randread QD1, QD32, 4 jobs x QD32, 16 jobs x QD8
#      against nbdkit -t 16 (Unix socket), every server taking its turn at
#      each shape before the next shape.
# Writes $OUT/store.txt, $OUT/nbd.csv and $OUT/nbd.txt.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
. bench/lib.sh
OUT=${OUT:-/tmp/gather-out}
SIZE=${SIZE:-2G}
SECONDS_PER=${SECONDS_PER:-3}
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

# STORE: "BACKEND:GATHER[:ENV=VALUE]..." words; SERVERS: "NAME:ENV=VALUE|-:SO:KEYS"
# words (KEYS comma-separated). Defaults: the first run's.
STORE=${STORE-cuda:0 cuda:2 cuda:4 cuda:8 vulkan:0 vulkan:2 vulkan:4 vulkan:8}
SERVERS=${SERVERS-cuda-old:-:.devbin/old.so:backend=cuda cuda-g0:VRAMSWAP_EXP_GATHER=0:.devbin/new.so:backend=cuda cuda-g4:VRAMSWAP_EXP_GATHER=4:.devbin/new.so:backend=cuda cuda-g8:VRAMSWAP_EXP_GATHER=8:.devbin/new.so:backend=cuda vkdma-old:-:.devbin/old.so:backend=vulkan,mapped=off vkdma-g4:VRAMSWAP_EXP_GATHER=4:.devbin/new.so:backend=vulkan,mapped=off}
for cfg in $STORE; do
    IFS=: read -r b g extra <<<"$cfg"
    echo "== $b mapped=off gather=$g $extra" | tee -a "$OUT/store.txt"
    # shellcheck disable=SC2086
    env VRAMSWAP_EXP_GATHER="$g" ${extra//:/ } timeout 60 .devbin/small_reads --backend "$b" \
        --mapped off --size 1G --seconds 2 --threads 1,4,16,64 --raw "" 2>&1 | tee -a "$OUT/store.txt"
done

servers=()
for s in $SERVERS; do
    IFS=: read -r name envs so keys <<<"$s"
    [ "$so" = memory ] && so=$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so
    servers+=("$name $envs $so ${keys//,/ }")
done
for s in "${servers[@]}"; do
    read -r name envs so keys <<<"$s"
    [ "$envs" = - ] && envs=VRAMSWAP_EXP_NONE=1
    envs=${envs//,/ }
    rm -f "$work/$name.sock"
    # shellcheck disable=SC2086
    env $envs nbdkit -U "$work/$name.sock" -t 16 --pidfile "$work/$name.pid" "$so" $keys \
        size="$SIZE" 2>"$OUT/$name.log" || { echo "$name: nbdkit failed"; cat "$OUT/$name.log"; exit 1; }
    await_export "$work/$name.sock" "$work/$name.pid" || exit 1
    pids+=("$(cat "$work/$name.pid")")
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$work/$name.sock" --rw=write \
        --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null || exit 1
done
csv=$OUT/nbd.csv
echo "server,shape,iops,p50_us,p99_us,p99.9_us,max_ms,server_cores,server_us_per_io,busy_cores" >"$csv"
shapes=("qd1 --iodepth=1" "qd32 --iodepth=32" "4x32 --iodepth=32 --numjobs=4"
        "16x8 --iodepth=8 --numjobs=16 --startdelay=0-200ms")
round=0
for sh in "${shapes[@]}"; do
    read -r shape args <<<"$sh"
    n=${#servers[@]}
    for k in $(seq 0 $((n - 1))); do
        read -r name _ <<<"${servers[$(((k + round) % n))]}"
        pid=$(cat "$work/$name.pid")
        # Server CPU (utime + stime, ticks) and the machine's busy ticks.
        cpu0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        busy0=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat)
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        fio --name="$shape" --ioengine=nbd --uri="nbd+unix:///?socket=$work/$name.sock" \
            --rw=randread --bs=4k --size="$SIZE" --time_based --runtime="$SECONDS_PER" \
            --ramp_time=1 --group_reporting --output-format=json --output="$work/r.json" $args \
            || { echo "$name,$shape,failed" >>"$csv"; continue; }
        t1=$(date +%s.%N)
        cpu1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        busy1=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat)
        python3 - "$work/r.json" "$name" "$shape" "$((cpu1 - cpu0))" "$((busy1 - busy0))" \
            "$t0" "$t1" "$(getconf CLK_TCK)" >>"$csv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))['jobs'][0]['read']
p = j['clat_ns']['percentile']
ticks, busy, t0, t1, hz = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8])
wall = t1 - t0
cores = ticks / hz / wall
per_io = ticks / hz * 1e6 / max(j['iops'] * wall, 1)
print(f"{sys.argv[2]},{sys.argv[3]},{round(j['iops'])},{p['50.000000']/1e3:.1f},"
      f"{p['99.000000']/1e3:.1f},{p['99.900000']/1e3:.1f},{j['clat_ns']['max']/1e6:.2f},"
      f"{cores:.2f},{per_io:.1f},{busy / hz / wall:.2f}")
PY
    done
    round=$((round + 1))
done
sort -t, -k2,2 -k1,1 "$csv" | python3 -c "import csv,sys; [print('  '.join(f'{c:>10}' for c in r)) for r in csv.reader(sys.stdin)]" | tee "$OUT/nbd.txt"
