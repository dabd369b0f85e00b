#!/bin/bash
# Small random reads at the NBD level, old plugin against new, on Vulkan and
# CUDA: fio 4 KiB randread QD1, QD32, 4 jobs x QD32 and 16 jobs x QD8
# against nbdkit -t 16 on a Unix socket, every server taking its turn at
# each shape before the next shape starts (a shared machine drifts). About
# 130 s. Run on the GPU machine from the repository root, with .devdebs and
# .devbin carried:
#
#   OLD=.devbin/base.so NEW=.devbin/small.so \
#     bash docs/bench/h200-2026-12-04-speed/scripts/small.sh
#
# (From /work/main, whose tree the device tool sends, the two builds lie in
# .devbin/small/: OLD=.devbin/small/base.so NEW=.devbin/small/small.so,
# carry .devdebs and .devbin/small.)
# base.so: main at 0ee13b1 (mapped chunks, reads by DMA); small.so: branch
# small (reads of up to 8 KiB through the mapping where chunks are mapped:
# Vulkan with mapped=auto on resizable BAR; CUDA is unchanged). Writes
# $OUT/small-nbd.csv (server,shape,IOPS,p50 us,p99 us,p99.9 us,max ms) and
# $OUT/small-nbd.txt. BACKENDS (default "vulkan cuda"), SIZE (2G) and
# SECONDS_PER (3, after a 1 s ramp) change the run.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
. bench/lib.sh
OLD=${OLD:-.devbin/base.so}
NEW=${NEW:-.devbin/small.so}
OUT=${OUT:-/tmp/small-out}
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
BACKENDS=${BACKENDS:-vulkan cuda}
servers=()
for b in $BACKENDS; do
    servers+=("$b-old $OLD backend=$b" "$b-new $NEW backend=$b")
done
for s in "${servers[@]}"; do
    read -r name so keys <<<"$s"
    rm -f "$work/$name.sock"
    nbdkit -U "$work/$name.sock" -t 16 --pidfile "$work/$name.pid" "$so" $keys size="$SIZE" \
        2>"$OUT/$name.log" || { echo "$name: nbdkit failed"; cat "$OUT/$name.log"; exit 1; }
    await_export "$work/$name.sock" "$work/$name.pid" || exit 1
    pids+=("$(cat "$work/$name.pid")")
    # Every block holds data: reads must reach VRAM.
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$work/$name.sock" --rw=write \
        --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null || exit 1
done
csv=$OUT/small-nbd.csv
echo "server,shape,iops,p50_us,p99_us,p99.9_us,max_ms" >"$csv"
shapes=("qd1 --iodepth=1" "qd32 --iodepth=32" "4x32 --iodepth=32 --numjobs=4"
        "16x8 --iodepth=8 --numjobs=16 --startdelay=0-200ms")
round=0
for sh in "${shapes[@]}"; do
    read -r shape args <<<"$sh"
    # Rotate who goes first, shape by shape.
    n=${#servers[@]}
    for k in $(seq 0 $((n - 1))); do
        read -r name _ <<<"${servers[$(((k + round) % n))]}"
        # shellcheck disable=SC2086
        fio --name="$shape" --ioengine=nbd --uri="nbd+unix:///?socket=$work/$name.sock" \
            --rw=randread --bs=4k --size="$SIZE" --time_based --runtime="$SECONDS_PER" \
            --ramp_time=1 --group_reporting --output-format=json --output="$work/r.json" $args \
            || { echo "$name,$shape,failed" >>"$csv"; continue; }
        python3 - "$work/r.json" "$name" "$shape" >>"$csv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))['jobs'][0]['read']
p = j['clat_ns']['percentile']
print(f"{sys.argv[2]},{sys.argv[3]},{round(j['iops'])},{p['50.000000']/1e3:.1f},"
      f"{p['99.000000']/1e3:.1f},{p['99.900000']/1e3:.1f},{j['clat_ns']['max']/1e6:.2f}")
PY
    done
    round=$((round + 1))
done
python3 -c "import csv,sys; [print('  '.join(f'{c:>10}' for c in r)) for r in csv.reader(open(sys.argv[1]))]" "$csv" | tee "$OUT/small-nbd.txt"
