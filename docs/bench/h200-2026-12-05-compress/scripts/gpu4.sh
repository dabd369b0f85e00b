#!/bin/bash
# Ready for the next GPU call (not run yet): what holds compressed
# sequential transfers near 2 GB/s. nbdcopy's compressed reads stopped at
# 1.9-2.3 GB/s and writes at 1.4-2.2 for 1, 4 and 8 connections, lz4 and
# zstd alike, where uncompressed reads reached 8-11 GB/s.
#   1. the store alone (raw_copy --compress, no nbdkit) by threads,
#      uncompressed, lz4 and zstd on each backend: if it passes 2 GB/s
#      well before 16 threads, the store is not what bounds nbdcopy;
#   2. the server under nbdcopy --connections=8 (reads, then writes):
#      the cores nbdkit uses, the machine's busy cores, and how many of
#      nbdkit's threads were busy for more than half the copy. Many cores
#      busy: the work per page bounds it; few cores and most threads idle:
#      something serialises them (a lock, a queue, the client).
# Run from the repository root with .devdebs and .devbin carried: .devbin/
# raw_copy (cargo bench --no-run --bench raw_copy, the executable from
# target/release/deps) and .devbin/plugin.so (the release plugin).
# BACKENDS, SIZE, OUT and PARTS (default "1 2") can be set (e.g.
# BACKENDS=vulkan SIZE=512M OUT=/tmp/o on lavapipe, to try the script).
set -u
source .devdebs/setup.sh >/dev/null 2>&1
export XDG_RUNTIME_DIR=/tmp
. bench/lib.sh
BACKENDS=${BACKENDS:-cuda vulkan}
SIZE=${SIZE:-4G}
OUT=${OUT:-/tmp/gpu4-out}
PARTS=${PARTS:-1 2}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uname -r
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1

# 1. The store alone.
[[ " $PARTS " == *" 1 "* ]] && for b in $BACKENDS; do
  for c in off lz4 zstd; do
    args=(--backend "$b" --size "$SIZE" --seconds 2 --requests "256K,4M" --threads "1,4,8,16")
    [ "$c" = off ] || args+=(--compress "$c")
    timeout 120 .devbin/raw_copy "${args[@]}" > "$OUT/raw_copy-$b-$c.txt" 2>&1
    echo "raw_copy $b $c rc=$?"
    tail -9 "$OUT/raw_copy-$b-$c.txt"
  done
done

# 2. The server under 8-connection copies.
[[ " $PARTS " == *" 2 "* ]] || exit 0
work=$(mktemp -d)
src=/dev/shm/gpu4-src
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$work" "$src"
}
trap cleanup EXIT
bytes=$(numfmt --from=iec "$SIZE")
write_source "$src" "$bytes" swap
# probe NAME DIRECTION: one nbdcopy at 8 connections, with the CPU it took.
# nbdkit's worker threads live as long as their connection, so they are
# read every 0.1 s while the copy runs: each thread's CPU from when it was
# first seen to when it was last seen, over that time.
probe() {
  python3 - "$1" "$2" "$(cat "$work/$1.pid")" "nbd+unix:///?socket=$work/$1.sock" "$src" "$bytes" <<'PY'
import glob, os, subprocess, sys, time
name, d, pid, uri, src, size = sys.argv[1:7]
hz = os.sysconf("SC_CLK_TCK")
def ticks(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
def busy():
    f = open("/proc/stat").readline().split()
    return sum(int(f[i]) for i in (1, 2, 3, 6, 7))
seen = {}
def sample():
    now = time.monotonic()
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            t = ticks(task + "/stat")
        except (OSError, IndexError):
            continue
        first = seen.setdefault(task, [now, t, now, t])
        first[2:] = [now, t]
c0, b0, t0 = ticks(f"/proc/{pid}/stat"), busy(), time.monotonic()
cmd = ["nbdcopy", "--connections=8"] + ([uri, "null:"] if d == "read" else [src, uri])
copy = subprocess.Popen(cmd)
while copy.poll() is None:
    sample()
    time.sleep(0.1)
t1, c1, b1 = time.monotonic(), ticks(f"/proc/{pid}/stat"), busy()
secs = t1 - t0
used = sorted(((v[3] - v[1]) / hz / (v[2] - v[0]) for v in seen.values() if v[2] - v[0] >= 0.2),
              reverse=True)
print(f"{name},{d},{int(size) / secs / 1e9:.2f},{(c1 - c0) / hz / secs:.2f},"
      f"{(b1 - b0) / hz / secs:.2f},{sum(u > 0.5 for u in used)},{len(used)},"
      + " ".join(f"{u:.2f}" for u in used[:8]))
PY
}
echo "server,direction,GB/s,nbdkit_cores,busy_cores,threads_over_half,threads_seen_0.2s,busiest_threads_cores" \
  > "$OUT/cpu.csv"
for b in $BACKENDS; do
  for c in off lz4 zstd; do
    name=$b-$c
    keys=(backend="$b" size="$SIZE")
    [ "$c" = off ] || keys+=(compress="$c" ratio=1)
    rm -f "$work/$name.sock"
    nbdkit -U "$work/$name.sock" -t 16 --pidfile "$work/$name.pid" .devbin/plugin.so \
      "${keys[@]}" 2> "$OUT/$name.log" \
      || { echo "$name: nbdkit failed"; tail -3 "$OUT/$name.log"; continue; }
    await_export "$work/$name.sock" "$work/$name.pid" || continue
    pids+=("$(cat "$work/$name.pid")")
    nbdcopy --connections=8 "$src" "nbd+unix:///?socket=$work/$name.sock"
    for dir in read write read; do probe "$name" "$dir" | tee -a "$OUT/cpu.csv"; done
    stop_pidfile "$work/$name.pid"
  done
done
