#!/bin/bash
# Issue 25: a server that swap depends on survives the signals that used
# to end it with pages out. SIGTERM to nbdkit while the kernel is
# connected: the server holds it back, every page comes back intact, the
# log and status say so, and vramswap stop still ends it. Then a
# shutdown's final kill (SIGTERM, then SIGKILL, to every process not
# marked as a root storage daemon): the server is spared, and the swapoff
# after it brings every page of a hog that was spared too back intact.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

# parent PID: sets parent_pid to PID's parent (empty once it is gone).
parent() {
    local key value
    parent_pid=
    while read -r key value; do
        [ "$key" != PPid: ] || parent_pid=$value
    done <"/proc/$1/status" 2>/dev/null
}

# Processes this scenario runs under (its shell, timeout, the harness):
# a shutdown kills them too, but here they carry the test.
ancestors=" $$ "
parent $$
while [ -n "$parent_pid" ] && [ "$parent_pid" -gt 0 ]; do
    ancestors+="$parent_pid "
    parent "$parent_pid"
done

# final_kill SIGNAL: systemd-shutdown's final kill (its killall.c), in
# this guest: SIGNAL to every process with a command line (not a kernel
# thread) that this scenario started or init adopted (the daemonized
# nbdkit), except those whose argv[0] starts with '@'. Shell builtins
# only, so that it starts no process of its own to kill.
final_kill() {
    local sig=$1 dir pid cmd p ours
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $ancestors != *" $pid "* ]] || continue
        cmd=
        IFS= read -r -d '' cmd <"$dir/cmdline" 2>/dev/null || true
        [ -n "$cmd" ] || continue
        parent "$pid"
        p=$parent_pid ours=
        [ "$p" != 1 ] || ours=1
        while [ -z "$ours" ] && [ -n "$p" ] && [ "$p" -gt 1 ]; do
            [ "$p" != $$ ] || ours=1
            parent "$p"
            p=$parent_pid
        done
        [ -n "$ours" ] || continue
        if [ "${cmd:0:1}" = @ ]; then
            say "final kill ($sig): spared $pid, $cmd"
            continue
        fi
        kill "-$sig" "$pid" 2>/dev/null || true
    done
}

vs start --backend vulkan --size 256M
device=$(nbd_device default)
pid=$(server_pid default)
argv0=$(tr '\0' ' ' <"/proc/$pid/cmdline")
[ "${argv0:0:1}" = @ ] || fail "the server is not marked as a storage daemon: $argv0"
cgroup term 128
hogs_start term 224 51
say "$(swap_used_prio "$device" | cut -d' ' -f1) MiB in VRAM; kill -TERM nbdkit $pid"
kill -TERM "$pid"
sleep 2
alive "$pid" || fail "SIGTERM ended the server with pages out"
grep 'SIGTERM postponed' /run/vramswap/default/nbdkit.log ||
    fail "the server's log does not say it held SIGTERM back"
if out=$(vramswap status 2>&1); then
    fail "status exits 0 with a quit held back: $out"
fi
echo "$out"
case $out in *"nbdkit got SIGTERM and holds it back"*) ;; *) fail "status does not say so" ;; esac
hogs_verify
say "every page came back after SIGTERM"
vs stop
expect_clean default "$device" "$pid"

vs start --backend vulkan --size 256M
device=$(nbd_device default)
pid=$(server_pid default)
cgroup final 128
# One hog as plain as any program, one marked as a storage daemon: the
# final kill ends the first and spares the second, whose pages the
# swapoff must then bring back.
hogs_start final 160 52
plain=${hog_pids[0]}
hog_argv0=@hog hogs_start final 160 53
say "$(swap_used_prio "$device" | cut -d' ' -f1) MiB in VRAM; the final kill"
final_kill TERM
sleep 2
final_kill KILL
sleep 1
! alive "$plain" || fail "the final kill spared an unmarked hog"
alive "$pid" || fail "the final kill ended the server"
# The spared hog's pages come back charged to its cgroup, whose limit
# (set here to push them out) has no room for them: lifted first. A
# swapoff that a cgroup's limit turns into an OOM kill is suspend's
# problem, a part of issue 25 of its own.
echo max >/sys/fs/cgroup/final/memory.max
say "+ swapoff $device, as systemd-shutdown does next"
timeout 300 swapoff "$device" || fail "swapoff after the final kill failed"
hogs_verify
say "every page of the spared hog came back after the final kill"
vs stop
expect_clean default "$device" "$pid"
expect_no_oom
