#!/bin/bash
# Issue 27: an elastic area of 4 slices, its free VRAM read from a file
# that the scenario keeps as a GPU would.
# Pages go out into every slice; lowering the budget takes the slices
# offline one at a time, emptiest first, each swapped off and its VRAM
# given back, with every page intact; raising it brings them back, and
# they take pages again; a swapoff the kernel refuses for lack of memory
# leaves its slice online, says why, and loses nothing.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

# The budget file plays the GPU: what other programs leave free (BASE,
# set by the scenario) plus the 48 MiB of each slice given back, updated
# five times a second.
# OOM kills so far (the scenario zip, before this one, fills its VRAM
# on purpose): this one must add none.
ooms() { dmesg | grep -c 'Killed process' || true; }
oom0=$(ooms)
budget=/run/elastic-budget
echo $((4 << 30)) >/run/elastic-base
echo $((4 << 30)) >"$budget"
# 4 slices of 48 MiB (under lavapipe the "VRAM" is the guest's own RAM).
vs start el --backend vulkan --size 192M --elastic --slices 4 --headroom 512M \
    --settle 3 --budget-file "$budget"
device=$(nbd_device el)
pid=$(server_pid el)

# The /dev/dm-N of slice I.
slice_dev() {
    local d
    for d in /sys/block/dm-*; do
        if [ "$(cat "$d/dm/name")" = "vramswap-el-s$1" ]; then
            echo "/dev/${d##*/}"
            return
        fi
    done
    fail "no mapping vramswap-el-s$1"
}
# MiB swapped out to slice I, or "off".
slice_used() {
    awk -v d="$(slice_dev "$1")" '$1 == d { print int($4 / 1024); on = 1 } END { if (!on) print "off" }' /proc/swaps
}
slices() { echo "$(slice_used 0) $(slice_used 1) $(slice_used 2) $(slice_used 3)"; }
# The slice the watcher must take first: the online one holding least (of
# equals, the later, which has the lower priority).
emptiest() {
    local i kib best='' least=''
    for i in 0 1 2 3; do
        kib=$(awk -v d="$(slice_dev "$i")" '$1 == d { print $4 }' /proc/swaps)
        [ -n "$kib" ] || continue
        if [ -z "$least" ] || [ "$kib" -le "$least" ]; then
            least=$kib best=$i
        fi
    done
    echo "$best"
}
# Slices online: the guest's device-mapper swap areas are the slices.
online() { awk '$1 ~ /^\/dev\/dm-/ { n++ } END { print n + 0 }' /proc/swaps; }
# wait_online N: until N slices are online (60 s at most).
wait_online() {
    local i
    for i in $(seq 120); do
        [ "$(online)" = "$1" ] && return 0
        sleep 0.5
    done
    fail "after 60 s $(online) slices are online, not $1 ($(slices))"
}
# The VRAM the server holds, in MiB, as its status file (rewritten every
# 2 s) last said.
held_mib() {
    sleep 2.5
    sed -n 's/.*"vram_held":\([0-9]*\).*/\1/p' /run/vramswap/el/server.json | awk '{ print int($1 / 1048576) }'
}

[ "$(online)" = 4 ] || fail "not every slice is on: $(slices)"
for i in 0 1 2 3; do
    prio=$(awk -v d="$(slice_dev "$i")" '$1 == d { print $5 }' /proc/swaps)
    [ "$prio" = $((50 - i)) ] || fail "slice $i has priority $prio"
done
vs status el

# Pages into all four: the kernel fills the highest priority first.
cgroup el 24
hogs_start el 200 41
say "slices (MiB used): $(slices); the server holds $(held_mib) MiB"
for i in 0 1 2 3; do
    [ "$(slice_used "$i")" -gt 0 ] || fail "slice $i holds no pages: $(slices)"
done
# Each yield is a swapoff, which charges the pages back to the hog's
# cgroup, at its 24 MiB limit: the watcher lifts that limit for the
# swapoff and puts it back after, memory.high first, so that no process is
# OOM-killed; while the pages have nowhere to go, memory.max stays lifted.
limit=$((24 << 20))
limits() { echo "max $(cat /sys/fs/cgroup/el/memory.max), high $(cat /sys/fs/cgroup/el/memory.high)"; }

# From here the budget follows the slices, twice a second, with one awk
# (the slices are the guest's only device-mapper swap areas): under TCG a
# busier loop starves the guest.
base() { echo $(($1 << 20)) >/run/elastic-base; }
# A pause that starts no process (read of a FIFO no one writes): under
# strict overcommit below, a fork or exec may fail for want of memory.
mkfifo /run/elastic-never
exec 9<>/run/elastic-never
pause() { read -r -t "$1" -u 9 || true; }
touch /run/elastic-sim
trap 'rm -f /run/elastic-sim' EXIT
while [ -e /run/elastic-sim ]; do
    # A step that cannot fork is skipped, not fatal.
    { awk -v base="$(cat /run/elastic-base)" '$1 ~ /^\/dev\/dm-/ { on++ }
        END { printf "%d\n", base + (4 - on) * 48 * 1048576 }' /proc/swaps >"$budget.new" &&
        mv "$budget.new" "$budget"; } || true
    pause 0.5
done &
sim=$!

# Other programs take more, one slice's worth at a time: with K slices
# given back, 536 - 48 K + 48 K MiB is free, over the 512 MiB headroom and
# under headroom plus a slice, so exactly K go, and stay gone.
for k in 1 2 3 4; do
    next=$(emptiest)
    before=$(slices)
    base $((536 - 48 * k))
    wait_online $((4 - k))
    sleep 3
    [ "$(online)" = $((4 - k)) ] || fail "more than $k slices went: $(slices)"
    [ "$(slice_used "$next")" = off ] || fail "slice $next, the emptiest of $before, did not go: $(slices)"
    say "$((536 - 48 * k)) MiB left by others: slice $next (the emptiest of $before) offline: $(slices)"
done
alive "${hog_pids[0]}" || fail "the hog died in the swapoffs"
say "the hog's cgroup: $(limits)"
[ "$(cat /sys/fs/cgroup/el/memory.high)" = "$limit" ] || fail "memory.high is not at the limit: $(limits)"
[ -f /run/vramswap/cgroup-limits.json ] || fail "no record of the lifted limit"
held=$(held_mib)
say "every slice offline; the server holds $held MiB"
[ "$held" -le 4 ] || fail "the server still holds $held MiB of VRAM"
vs status el

# The others are done: the slices come back, highest priority first, a
# settle apart.
base 4096
wait_online 1
[ "$(slice_used 0)" != off ] || fail "slice 0 did not come back first: $(slices)"
wait_online 4
say "the others are done: every slice online again ($(slices))"
# With swap again, the watcher puts the limit back: the pages go out.
for _ in $(seq 120); do
    [ "$(cat /sys/fs/cgroup/el/memory.max)" = "$limit" ] && break
    sleep 0.5
done
[ "$(cat /sys/fs/cgroup/el/memory.max)" = "$limit" ] || fail "the limit was not put back: $(limits)"
[ ! -e /run/vramswap/cgroup-limits.json ] || fail "the record of limits is left"
alive "${hog_pids[0]}" || fail "the hog died when its limit came back"
used0=$(slice_used 0)
say "pages out again: $(slices)"
[ "$used0" -gt 8 ] || fail "the slices took no pages again: $(slices)"

# No memory for a swapoff: with strict overcommit and a limit below what
# is committed plus a slice, the kernel refuses swapoff (ENOMEM).
committed=$(awk '$1 == "Committed_AS:" { print $2 }' /proc/meminfo)
swap=$(awk '$1 == "SwapTotal:" { print $2 }' /proc/meminfo)
# Until the limit is lifted again this shell starts no process (a CI run's
# `sleep` failed to map libc here, 2026-12-05): builtins only.
echo $((committed - swap + 32768)) >/proc/sys/vm/overcommit_kbytes
echo 2 >/proc/sys/vm/overcommit_memory
base 488
echo $((488 << 20)) >"$budget"
for _ in {1..60}; do
    record=
    read -r -d '' record </run/vramswap/el/elastic.json || true
    [[ $record == *'"last_failure": {'* ]] && break
    pause 0.5
done
echo 0 >/proc/sys/vm/overcommit_memory
base 4096
failure=$(grep -A3 '"last_failure": {' /run/vramswap/el/elastic.json | sed -n 's/ *"reason": "\(.*\)",*$/\1/p')
say "refused swapoff: $failure"
case $failure in *"stays online"*) ;; *) fail "no failure recorded: $(cat /run/vramswap/el/elastic.json)" ;; esac
[ "$(online)" = 4 ] || fail "a slice went offline although its swapoff failed: $(slices)"

rm /run/elastic-sim
wait "$sim"
# The hog reads its pages back with its limit off, not through a 24 MiB
# window (stop would lift the limit itself: the sleep scenario shows it).
echo max >/sys/fs/cgroup/el/memory.max
hogs_verify
vs stop el
expect_clean el "$device" "$pid"
! dmsetup ls | grep -q vramswap-el || fail "slice mappings are left: $(dmsetup ls)"
! pgrep -f "vramswap elastic el" >/dev/null || fail "the watcher still runs"
[ "$(ooms)" = "$oom0" ] || fail "the OOM killer ran: $(dmesg | grep 'Killed process' | tail -1)"
