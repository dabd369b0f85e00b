#!/bin/bash
# Direct reads (issue 23 part 3): conformance on CUDA and Vulkan, then an
# A/B of the plugin before (base) and after (new): 4 MiB QD1 sequential
# reads (fio) and 1-connection nbdcopy reads of the whole export, both
# servers up at once, taking turns ABBA over 4 rounds. About 100 s after the
# tests.
#
# Carried (.devbin/, release, stripped):
#   base.so               plugin at main 0ee13b1 (before direct reads):
#                         git worktree add /tmp/b 0ee13b1 && cd /tmp/b &&
#                         cargo build --release --locked -p nbdkit-vramswap-plugin
#                         && cp target/release/libnbdkit_vramswap_plugin.so base.so
#   new.so                the same at branch `direct`
#   store_conformance     cargo test --release --locked --features vramswap/fault-injection
#   backend_conformance     --no-run --test store_conformance --test backend_conformance
#                         (branch `direct`; copy the binaries from target/release/deps)
#   nbd_plugin            the same build, --test nbd_plugin (real-client tests)
# .devdebs/: nbdkit, libnbd (nbdcopy), fio; source .devdebs/setup.sh.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
. bench/lib.sh
export XDG_RUNTIME_DIR=/tmp
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/machine.txt; uname -r >> $OUT/machine.txt

T=$OUT/tests.txt; : > $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 200 .devbin/store_conformance >> $T 2>&1; echo "store_conformance rc=$?" >> $T
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 60 .devbin/backend_conformance >> $T 2>&1; echo "backend_conformance rc=$?" >> $T
for b in cuda vulkan; do
  VRAMSWAP_TEST_PLUGIN=.devbin/new.so VRAMSWAP_TEST_PLUGIN_ARGS=backend=$b timeout 90 .devbin/nbd_plugin --test-threads 1 fio_verifies_crc32c nbdcopy_round_trips >> $T 2>&1; echo "plugin $b rc=$?" >> $T
done
grep -E "rc=|test result" $T

w=/tmp/ab; mkdir -p $w
for b in base new; do
  nbdkit -U $w/$b.sock -t 16 --pidfile $w/$b.pid .devbin/$b.so backend=cuda size=4G
  await_export $w/$b.sock $w/$b.pid || { echo "$b did not start"; exit 1; }
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=write --bs=1M --size=4G --iodepth=8 >/dev/null
done
C=$OUT/ab.csv; echo "round,build,test,p50_us,p99_us,gbps" > $C
for round in 1 2 3 4; do
  order="base new"; [ $((round % 2)) = 0 ] && order="new base"
  for b in $order; do
    fio --name=q --ioengine=nbd --uri="nbd+unix:///?socket=$w/$b.sock" --rw=read --bs=4M --iodepth=1 --size=4G \
      --time_based --runtime=5 --ramp_time=1 --output-format=json --output=$w/j.json >/dev/null
    python3 -c "
import json; r=json.load(open('$w/j.json'))['jobs'][0]['read']; p=r['clat_ns']['percentile']
print('$round,$b,seqread-4m-qd1,%.1f,%.1f,%.2f' % (p['50.000000']/1e3, p['99.000000']/1e3, r['bw_bytes']/1e9))" >> $C
    s=$(date +%s.%N)
    nbdcopy --connections=1 "nbd+unix:///?socket=$w/$b.sock" null: || echo "nbdcopy $b rc=$?"
    e=$(date +%s.%N)
    python3 -c "print('$round,$b,nbdcopy-1conn,,,%.2f' % (4*2**30/($e-$s)/1e9))" >> $C
  done
done
for b in base new; do stop_pidfile $w/$b.pid; done
cat $C
python3 - $C <<'PY'
import csv,sys,statistics as s
rows=list(csv.DictReader(open(sys.argv[1])))
for t in ('seqread-4m-qd1','nbdcopy-1conn'):
  for b in ('base','new'):
    r=[x for x in rows if x['test']==t and x['build']==b]
    print(t,b,'GB/s median=%.2f' % s.median(float(x['gbps']) for x in r),
          ('p50 median=%.0f us' % s.median(float(x['p50_us']) for x in r)) if r[0]['p50_us'] else '')
PY
