#!/bin/bash
# usage: SERVERS="name|env|plugin args" small2.sh OUTDIR SECONDS
# fio nbd 4K random reads: QD1, QD32, 4 jobs x QD32; nbdkit CPU; exp reports.
set -uo pipefail
out=$1; secs=$2
mkdir -p "$out"
size=${SIZE:-4G}
report() { # label ; asks an exp plugin for its counters (waits up to 1 s)
    rm -f /tmp/exp-reported; echo "$1" > /tmp/exp-report
    for _ in $(seq 20); do [ -e /tmp/exp-reported ] && break; sleep 0.05; done
    rm -f /tmp/exp-report
}
run_one() { # name env plugin-and-args
    local name=$1 envs=$2 rest=$3 sock=/tmp/s-$1.sock
    rm -f "$sock"
    env $envs nbdkit -f -U "$sock" -t 16 $rest size=$size 2>"$out/$name.log" &
    local pid=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.1; done
    local uri="nbd+unix:///?socket=$sock"
    nbdcopy --connections=4 /dev/shm/fill "$uri" 2>>"$out/$name.log"
    local best=999
    for _ in 1 2 3; do
        local a b
        a=$(date +%s.%N); nbdcopy --connections=4 "$uri" null: 2>>"$out/$name.log"; b=$(date +%s.%N)
        best=$(python3 -c "print(min($best, $b - $a))")
    done
    python3 -c "print(f'{\"$name\":>12}     cp4: {$(nbdinfo --size "$uri")/$best/1e9:6.2f} GB/s (nbdcopy 4 conn read, best of 3)')"
    for shape in rr1 rr32 rr4x32 rw32; do
        local rw=randread
        case $shape in
            rr1) extra=(--iodepth=1);;
            rr32) extra=(--iodepth=32);;
            rw32) extra=(--iodepth=32); rw=randwrite;;
            rr4x32) extra=(--iodepth=32 --numjobs=4);;
        esac
        report reset
        local t0 c0 t1 c1
        c0=$(awk '{print $14+$15}' /proc/$pid/stat)
        t0=$(date +%s.%N)
        fio --name=$shape --ioengine=nbd --uri="$uri" --size=$size --time_based --runtime=$secs --ramp_time=1 \
            --rw=$rw --bs=4k --group_reporting "${extra[@]}" --output-format=json >"$out/$name-$shape.json" 2>>"$out/$name.log"
        t1=$(date +%s.%N)
        c1=$(awk '{print $14+$15}' /proc/$pid/stat)
        report "$name $shape"
        python3 - "$out/$name-$shape.json" "$name" "$shape" "$c0" "$c1" "$t0" "$t1" <<'PY'
import json,sys
t=open(sys.argv[1]).read(); t=t[t.index('{'):]
job=json.loads(t)['jobs'][0]; j=job['read'] if job['read']['iops']>0 else job['write']
c=(float(sys.argv[5])-float(sys.argv[4]))/100/(float(sys.argv[7])-float(sys.argv[6]))
p=j['clat_ns']['percentile']
print(f"{sys.argv[2]:>12} {sys.argv[3]:>7}: {j['iops']:9.0f} IOPS  p50 {p['50.000000']/1000:7.1f} p99 {p['99.000000']/1000:8.1f} max {j['clat_ns']['max']/1000:9.1f} us  nbdkit {c:5.2f} cores", flush=True)
PY
    done
    kill "$pid"; wait "$pid" 2>/dev/null
}
[ -f /dev/shm/fill ] || head -c 4G /dev/urandom > /dev/shm/fill
while IFS='|' read -r name envs rest; do
    [ -n "$name" ] || continue
    run_one "$name" "$envs" "$rest"
done <<<"$SERVERS"
