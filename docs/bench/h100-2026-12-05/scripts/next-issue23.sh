#!/bin/bash
# Issue 23's "one run of bench/nbd-compare --rounds 2" with
# nbd-vram and nbdkit's vram plugin as peers, the default backend (cuda)
# and Vulkan, 4 GiB exports, every shape (SHAPES=all) or the goal shapes
# that fit one call (SHAPES=qd32,qd1,peer,rss, about 9 minutes; run so on
# an H100 on 2026-12-05: docs/bench/h100-2026-12-05b/speed/). The whole
# suite of five servers twice takes longer than one ten-minute call, so the
# run goes on in the background of the warm machine across calls:
#   call 1:  bash next-issue23.sh start   (starts it, follows it ~560 s)
#   call 2+: bash next-issue23.sh follow  (follows it ~560 s more)
# Each call returns what is there so far, /tmp/speed as $OUT/speed.tgz.
# Each call must follow the last within the machine's idle release (30 s),
# or the machine, and the run, are gone. Carry .devdebs, .devpeers
# (nbd-vram's tarball, nbdkit 1.48.1 and ocl-icd debs) and
# .devbin/libnbdkit_vramswap_plugin.so.
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
run=/tmp/speed
follow() {
  local until=$((SECONDS + ${FOLLOW:-560}))
  while [ ! -e $run/done ] && [ $SECONDS -lt $until ]; do sleep 5; done
  # What has been measured so far comes back each call (one file: the
  # device tool returns at most eight), so a machine lost mid-run still
  # leaves the rounds done.
  mkdir -p "${OUT:-/tmp/out}"
  tar czf "${OUT:-/tmp/out}/speed.tgz" -C "$(dirname $run)" "$(basename $run)"
  if [ -e $run/done ]; then
    echo "nbd-compare ended: $(cat $run/done)"
    sed -n '/^test /,$p' $run/nbd-compare.txt | head -150
  else
    echo "still running:"; tail -n 3 $run/nbd-compare.txt
  fi
}
case ${1:-} in
  start)
    mkdir -p $run
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
      grep -m1 'model name' /proc/cpuinfo; nproc; } > $run/machine.txt 2>&1
    bench/peers build .devpeers /tmp/peers 2>&1 | tee $run/peers-build.txt
    setsid nohup bash -c '
      bench/nbd-compare --memory-plugin "$DEVDEBS_NBDKIT_PLUGINS/nbdkit-memory-plugin.so" \
        --plugin "$PWD/.devbin/libnbdkit_vramswap_plugin.so" --size "${SIZE:-4G}" --seconds 2 \
        --rounds 2 --shapes "${SHAPES:-all}" --out '$run'/nbd \
        --server "cuda=backend=cuda" --server "vulkan=backend=vulkan" \
        --peer "nbd-vram=bench/peers start /tmp/peers nbd-vram \"\$SOCK\" \"\$SIZE\" \"\$PIDFILE\"" \
        --peer "nbdkit-vram=bench/peers start /tmp/peers nbdkit-vram \"\$SOCK\" \"\$SIZE\" \"\$PIDFILE\"" \
        > '$run'/nbd-compare.txt 2>&1
      echo "rc=$?" > '$run'/done' > /dev/null 2>&1 < /dev/null &
    follow ;;
  follow) follow ;;
  *) echo "usage: $0 start|follow" >&2; exit 2 ;;
esac
