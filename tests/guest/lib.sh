# What guest scenarios share. Sourced by tests/guest/scenarios/*.sh, which
# run inside the guest under `bash` with `set -euo pipefail`: any command
# that fails fails the scenario.
# shellcheck shell=bash

set -euo pipefail

# One line of the scenario's log; also the watchdog's heartbeat.
say() {
    echo "[$(basename "$0" .sh)] $*"
    [ ! -e /tmp/heartbeat ] || touch /tmp/heartbeat
}

# watch_server PID SECONDS: if no line is said for SECONDS, `hog
# --watchdog` (its memory locked) logs every task's state and kernel stack
# (sysrq t), the blocked tasks, and where PID's threads wait (PID 0: no
# process of its own). unwatch ends it. A report is evidence, not a
# verdict: a slow step under TCG trips it too; a real hang fails the
# scenario by its time limit.
watchdog_pid=
watch_server() {
    touch /tmp/heartbeat
    hog --watchdog "$1" "$2" /tmp/heartbeat &
    watchdog_pid=$!
}
unwatch() {
    rm -f /tmp/heartbeat
    [ -z "$watchdog_pid" ] || wait "$watchdog_pid" ||
        say "the watchdog reported a step slower than its limit (above)"
    watchdog_pid=
}

fail() {
    echo "[$(basename "$0" .sh)] FAIL: $*" >&2
    exit 1
}

# Runs the CLI, showing the command; fails the scenario if it fails.
vs() {
    say "+ vramswap $*"
    vramswap "$@"
}

# A counter from /proc/vmstat.
vmstat() { awk -v k="$1" '$1 == k { print $2 }' /proc/vmstat; }

# Used MiB and priority of swap area DEVICE: "USED PRIORITY".
swap_used_prio() { awk -v d="$1" '$1 == d { print int($4 / 1024), $5 }' /proc/swaps; }

# FILE KEY: a "KEY: N kB" field of FILE (/proc/meminfo, /proc/PID/status),
# in MiB.
field_mib() { awk -v k="$2:" '$1 == k { print int($2 / 1024) }' "$1"; }

# A field of /proc/meminfo, in MiB.
meminfo_mib() { field_mib /proc/meminfo "$1"; }

# "OUT IN": MiB swapped out and in so far (pswpout, pswpin: 4 KiB pages).
swapped_mib() { echo $(($(vmstat pswpout) / 256)) $(($(vmstat pswpin) / 256)); }

# The nbdkit serving instance NAME (its pid), or nothing.
server_pid() {
    local state=/run/vramswap/$1/state.json
    [ -f "$state" ] && sed -n 's/^ *"pid": \([0-9]*\),$/\1/p' "$state"
}

# Creates memory cgroup NAME, or sets an existing one's limit, to MIB of
# RAM (swap unlimited): what its processes use beyond that must go to
# swap, while the guest as a whole is not short of memory. Returns once
# the cgroup is within the limit: a signal reaching this shell while it
# writes memory.max (SIGCHLD from a process substitution just read) ends
# the kernel's reclaim early, and the write still succeeds with the
# cgroup above its new limit and nothing left to push it down (CI,
# 2026-12-02: nothing swapped; shown in a guest: 168 MiB left under a
# 64 MiB limit after a SIGCHLD 0.3 s into the write). So it writes again.
cgroup() {
    local dir=/sys/fs/cgroup/$1 max=$(($2 << 20)) current
    mkdir -p "$dir"
    for _ in 1 2 3 4 5; do
        echo "$max" >"$dir/memory.max"
        current=$(cat "$dir/memory.current")
        [ "$current" -le "$max" ] && return 0
    done
    fail "cgroup $1 stayed at $((current >> 20)) MiB over its $2 MiB limit"
}

# The nbd device of instance NAME.
nbd_device() { sed -n 's/^ *"nbd_device": "\(.*\)",$/\1/p' "/run/vramswap/$1/state.json"; }

# Hogs (tests/guest/hog.c) started by hogs_start, by pid.
hog_pids=()

# hogs_start CGROUP MIB SEED...: one hog of MIB per seed, in memory
# cgroup CGROUP ("" for none), each writing its pattern and then holding
# until hogs_verify. Returns once every hog has written all its pages.
# hog_argv0=NAME (in the call's environment) runs them under that argv[0];
# hog_compressible=1 gives them pages that lz4 packs about 3:1.
hogs_start() {
    local group=$1 mib=$2 seed pid
    shift 2
    rm -f /tmp/hogs-verify
    hog_pids=()
    for seed in "$@"; do
        bash -c '[ -z "$0" ] || echo $$ >"/sys/fs/cgroup/$0/cgroup.procs"; exec -a "$1" "${@:2}"' \
            "$group" "${hog_argv0:-hog}" hog --hold /tmp/hogs-verify \
            ${hog_compressible:+--compressible} "$mib" "$seed" \
            >"/tmp/hog-$seed.out" &
        hog_pids+=($!)
    done
    for seed in "$@"; do
        until grep -qs written "/tmp/hog-$seed.out"; do
            for pid in "${hog_pids[@]}"; do
                alive "$pid" || { cat /tmp/hog-*.out; fail "hog $pid died while writing"; }
            done
            sleep 0.5
        done
    done
}

# Lets the hogs read back and check every page; fails unless each one
# found all its pages intact.
hogs_verify() {
    local pid failed=0
    touch /tmp/hogs-verify
    for pid in "${hog_pids[@]}"; do
        wait "$pid" || failed=1
    done
    grep -h corrupt /tmp/hog-*.out
    rm -f /tmp/hog-*.out
    [ "$failed" = 0 ] || fail "a hog found corrupt pages or died"
}

# Whether process PID runs (a zombie, exited but not yet reaped by the
# guest's busybox init, does not).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $stat != *") Z "* ]]
}

# Fails unless instance NAME on DEVICE left nothing behind: no directory,
# no server, no swap area, the NBD device detached.
expect_clean() {
    local name=$1 device=$2 pid=$3
    [ ! -e "/run/vramswap/$name" ] || fail "/run/vramswap/$name is still there"
    ! alive "$pid" || fail "nbdkit $pid still runs"
    ! grep -q "^$device " /proc/swaps || fail "$device is still a swap area"
    [ ! -e "/sys/block/${device#/dev/}/pid" ] || fail "$device is still attached"
    [ "$(cat "/sys/block/${device#/dev/}/size")" = 0 ] || fail "$device still has a size"
    say "$name left nothing behind"
}

# Fails if the kernel's OOM killer ran.
expect_no_oom() {
    if dmesg | grep -E 'Out of memory|oom-kill|Killed process'; then
        fail "the OOM killer ran"
    fi
}
