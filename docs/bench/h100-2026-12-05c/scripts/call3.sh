#!/bin/bash
# Call 3: issue 24's whole nbd-compare suite once more with the batched
# copies (.devbin/batch.so), one round, 1 GiB of bench/swap's pages:
# cuda uncompressed, lz4, zstd, vk-lz4 (Vulkan, BAR-mapped writes), the
# memory plugin and nbd-vram-z (c0deJedi 2b959d8, VRAM_COMPRESS=1). The
# sequential shapes (nbdcopy at 1/4/8 connections, 1 MiB x 4 jobs x QD16)
# were last taken before the slot batching (h200-2026-12-05-compress call 3).
# Carry .devdebs, .devpeers, .devbin/base.so, .devbin/batch.so and
# .devbin/backend_conformance.
set -u
source .devdebs/setup.sh >/dev/null 2>&1; export XDG_RUNTIME_DIR=/tmp
# First: backend_conformance, which ran out of its 60 s in call 2 with no
# line printed: the new test alone, then every test one at a time, each
# backend's start printed; and 4 KiB QD1 reads (single-copy batches) of
# base.so and batch.so taking turns three times (call 2's 2-3 us gap?).
T=$OUT/tests3.txt
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 40 .devbin/backend_conformance a_batchs --nocapture > "$T" 2>&1
echo "backend_conformance a_batchs rc=$?" >> "$T"
VRAMSWAP_TEST_BACKENDS=cuda,vulkan timeout 40 .devbin/backend_conformance --test-threads 1 --nocapture >> "$T" 2>&1
echo "backend_conformance all rc=$?" >> "$T"
grep -E "^---|^test |rc=" "$T"
. bench/lib.sh
serve() { rm -f /tmp/x.sock; nbdkit "$@" -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid 2>/dev/null; await_export /tmp/x.sock /tmp/x.pid; }
U="nbd+unix:///?socket=/tmp/x.sock"
S=/dev/shm/src; write_source $S 1073741824 swap
for round in 1 2 3; do for so in base batch; do
  serve .devbin/$so.so backend=cuda size=1G
  nbdcopy --connections=8 $S $U
  fio --name=q --ioengine=nbd --uri=$U --size=1G --time_based --runtime=3 --ramp_time=1 --rw=randread \
    --bs=4k --iodepth=1 --output-format=json --output=/tmp/q.json >/dev/null 2>&1
  python3 -c "
import json; j=json.load(open('/tmp/q.json'))['jobs'][0]['read']; p=j['clat_ns']['percentile']
print('$so r$round qd1 p50', round(p['50.000000']/1e3,1), 'p99', round(p['99.000000']/1e3,1), 'us', round(j['iops']), 'IOPS')"
  stop_pidfile /tmp/x.pid
done; done 2>&1 | tee "$OUT/qd1-ab.txt"
rm -f $S $S.piece
mkdir -p /tmp/peers/nbd-vram-z /tmp/peers/lib
cp .devpeers/nbd-vram-z/nbd-vram /tmp/peers/nbd-vram-z/; cp .devpeers/lib/liblz4.so.1 /tmp/peers/lib/
timeout 430 bench/nbd-compare --memory-plugin "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" \
  --plugin "$PWD/.devbin/batch.so" --size 1G --seconds 2 --huge 16G --rounds 1 --data swap --out "$OUT/suite" \
  --server 'cuda=backend=cuda' --server 'lz4=backend=cuda compress=lz4 ratio=1' \
  --server 'zstd=backend=cuda compress=zstd ratio=1' --server 'vk-lz4=backend=vulkan compress=lz4 ratio=1' \
  --peer 'nbd-vram-z=bench/peers start /tmp/peers nbd-vram-z "$SOCK" "$SIZE" "$PIDFILE"' \
  > "$OUT/suite.txt" 2>&1
echo "nbd-compare rc=$?"
tail -60 "$OUT/suite.txt"
cd "$OUT" && tar czf suite.tgz suite suite.txt && rm -rf suite
