#!/bin/bash
# usage: ROUNDS=2 SECS=3 call.sh  with SERVERS lines "name|mode|env|plugin args" (mode d = daemon, f = -f -v)
set -uo pipefail
source .devdebs/setup.sh >/dev/null 2>&1
O=$OUT; mkdir -p $O/logs
R=${ROUNDS:-2}; S=${SECS:-3}
{ nproc; uname -r; nvidia-smi -L; date -u; } > $O/machine.txt 2>&1
head -c 256M /dev/urandom > /dev/shm/piece
for i in $(seq 16); do cat /dev/shm/piece; done > /dev/shm/src; rm /dev/shm/piece
serve() { # name mode envs args...
    local name=$1 mode=$2 envs=$3; shift 3
    SOCK=/tmp/b-$name.sock; rm -f $SOCK /tmp/b.pid
    if [ "$mode" = f ]; then
        env $envs nbdkit -f -v -D nbdkit.backend.datapath=0 -U $SOCK -t 16 "$@" size=4G 2>>$O/logs/$name.log & echo $! > /tmp/b.pid
    else
        env $envs nbdkit -U $SOCK -t 16 --pidfile /tmp/b.pid "$@" size=4G 2>>$O/logs/$name.log
    fi
    for _ in $(seq 600); do [ -s /tmp/b.pid ] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && break; sleep 0.05; done
    PID=$(cat /tmp/b.pid); URI="nbd+unix:///?socket=$SOCK"
}
fiox() { # round name shape rw extra...
    local rnd=$1 name=$2 shape=$3 rw=$4; shift 4
    local c0 c1 t0 t1
    c0=$(awk '{print $14+$15}' /proc/$PID/stat); t0=$(date +%s.%N)
    fio --name=$shape --ioengine=nbd --uri="$URI" --size=4G --time_based --runtime=$S --ramp_time=1 \
        --rw=$rw --bs=4k --group_reporting "$@" --output-format=json > /tmp/f.json 2>>$O/logs/$name.log
    t1=$(date +%s.%N); c1=$(awk '{print $14+$15}' /proc/$PID/stat)
    python3 - /tmp/f.json $rnd $name $shape $c0 $c1 $t0 $t1 <<'PY' >> $O/small.csv
import json,sys
t=open(sys.argv[1]).read(); t=t[t.index('{'):]
job=json.loads(t)['jobs'][0]; j=job['read'] if job['read']['iops']>0 else job['write']
c=(float(sys.argv[6])-float(sys.argv[5]))/100/(float(sys.argv[8])-float(sys.argv[7]))
p=j['clat_ns']['percentile']
print(f"{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{j['iops']:.0f},{p['50.000000']/1000:.1f},{p['99.000000']/1000:.1f},{j['clat_ns']['max']/1000:.0f},{c:.2f}")
PY
}
mapfile -t LIST < <(printf '%s\n' "$SERVERS" | grep -v '^$')
for round in $(seq $R); do
    order=("${LIST[@]}")
    if [ $((round % 2)) = 0 ]; then order=(); for ((i=${#LIST[@]}-1;i>=0;i--)); do order+=("${LIST[i]}"); done; fi
    for s in "${order[@]}"; do
        IFS='|' read -r name mode envs args <<<"$s"
        args=${args//MEM/$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so}
        serve "$name" "$mode" "$envs" $args
        [ $round = 1 ] && echo "$name: $(cat /proc/$PID/timerslack_ns)" >> $O/slack.txt
        a=$(date +%s.%N); nbdcopy --connections=4 /dev/shm/src "$URI" 2>>$O/logs/$name.log; b=$(date +%s.%N)
        echo "$round,$name,w4,$(python3 -c "print(f'{4294967296/($b-$a)/1e9:.2f}')")" >> $O/seq.csv
        for c in 4 4 4; do python3 .devbin/cp.py $name $round $c "$URI" $PID 4294967296; done >> $O/seq.csv 2>>$O/logs/$name.log
        if [ "${SMALL:-1}" = 1 ]; then
            fiox $round $name rr1 randread --iodepth=1
            fiox $round $name rr32 randread --iodepth=32
            fiox $round $name rw32 randwrite --iodepth=32
            fiox $round $name rr4x32 randread --iodepth=32 --numjobs=4
        fi
        [ $round = 1 ] && echo "$name: $(cat /proc/$PID/timerslack_ns)" >> $O/slack.txt
        kill $PID; while kill -0 $PID 2>/dev/null; do sleep 0.05; done
        echo "round $round $name done $(date +%T)" >&2
    done
done
python3 .devbin/summ.py $O/seq.csv $O/small.csv | tee $O/summary.txt
