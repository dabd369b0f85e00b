# What the bench scripts share: starting and stopping NBD servers on Unix
# sockets. Sourced by bench/nbd-compare and bench/swap, which keep their
# servers' sockets and pidfiles in $work and every server's pid in pids.
# shellcheck shell=bash

# await_export SOCKET PIDFILE: waits up to 120 s until PIDFILE names the
# server and it answers nbdinfo on SOCKET; fails (nbdinfo saying why) if
# it never does.
await_export() {
    local sock=$1 pidfile=$2
    for _ in $(seq 1200); do
        [ -s "$pidfile" ] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null
}

# stop_pidfile PIDFILE: SIGTERM to the server it names, then waits until
# the process is gone.
stop_pidfile() {
    local pid
    pid=$(cat "$1")
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

# start_peer NAME COMMAND SIZE THREADS LOGFILE: runs the bash COMMAND, which
# starts another project's server in the background (bench/peers start
# does), with SOCK=$work/NAME.sock, PIDFILE=$work/NAME.pid, SIZE, THREADS
# and LOGFILE in its environment; waits for the export. Fails, saying why,
# rather than exits, so a run goes on without a peer that will not start.
# shellcheck disable=SC2154 # $work is the sourcing script's
start_peer() {
    local name=$1 command=$2 sock=$work/$1.sock pidfile=$work/$1.pid
    local me up=1
    me=$(basename "$0")
    rm -f "$sock" "$pidfile"
    if ! SOCK=$sock PIDFILE=$pidfile SIZE=$3 THREADS=$4 LOGFILE=$5 \
        bash -c "$command" </dev/null >&2; then
        echo "$me: peer $name: its command failed; skipped" >&2
        return 1
    fi
    await_export "$sock" "$pidfile" || up=
    [ -s "$pidfile" ] && pids+=("$(cat "$pidfile")")
    if [ -z "$up" ]; then
        echo "$me: peer $name did not start; skipped" >&2
        [ ! -s "$pidfile" ] || stop_peer "$name"
        return 1
    fi
}

# stop_peer NAME: SIGTERM to the peer started as NAME, and a wait until it
# is gone (SIGKILL after 30 s).
# shellcheck disable=SC2154 # $work is the sourcing script's
stop_peer() {
    local pid
    pid=$(cat "$work/$1.pid")
    kill "$pid" 2>/dev/null || return 0
    # A peer is not necessarily our child; a zombie left for another
    # reaper counts as gone. nbd-vram defers exit while a client is attached.
    for _ in $(seq 300); do
        [ "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null || echo Z)" = Z ] && return 0
        sleep 0.1
    done
    echo "$(basename "$0"): peer $1 ignored SIGTERM for 30 s; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

# write_source FILE BYTES KIND: FILE of BYTES bytes for write tests to
# read (put it in /dev/shm: in memory): random bytes (KIND random), or
# (KIND swap) 64 MiB of bench/swap-guest/swaphog.c's pages (RANDOM_PCT 25:
# every word names its page and index, a quarter of them hashed) repeated.
write_source() {
    local file=$1 bytes=$2 kind=$3 piece=$1.piece
    if [ "$kind" = swap ]; then
        python3 - "$piece" <<'PY'
import struct, sys
M = (1 << 64) - 1
def mix(x):
    x = (x + 0x9e3779b97f4a7c15) & M
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M
    return x ^ (x >> 31)
with open(sys.argv[1], "wb") as out:
    for page in range(16384):
        tags = [(page << 9) ^ i ^ 0x5a5a000000000000 for i in range(512)]
        out.write(struct.pack("<512Q", *(t if i < 384 else mix(t) for i, t in enumerate(tags))))
PY
    else
        head -c $((256 << 20)) /dev/urandom >"$piece"
    fi
    : >"$file"
    while [ "$(stat -c %s "$file")" -lt "$bytes" ]; do cat "$piece" >>"$file"; done
    truncate -s "$bytes" "$file"
    rm -f "$piece"
}
