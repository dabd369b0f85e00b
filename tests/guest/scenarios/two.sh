#!/bin/bash
# Issue 9: two independent instances on the one (lavapipe) device, with
# different names and sizes, both swapping; a second start with a name in
# use is refused and changes nothing; each stops on its own.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

vs start a --backend vulkan --size 128M
vs start b --backend vulkan --size 64M --priority 50
pid_a=$(server_pid a) pid_b=$(server_pid b)
dev_a=$(nbd_device a) dev_b=$(nbd_device b)
[ "$dev_a" != "$dev_b" ] || fail "both instances on $dev_a"
[ "$pid_a" != "$pid_b" ] || fail "both instances served by nbdkit $pid_a"
say "MemAvailable after two starts: $(meminfo_mib MemAvailable) MiB"

# Same name again: one line, non-zero, and 'a' untouched.
if out=$(vramswap start a --backend vulkan --size 64M 2>&1); then
    fail "a second 'start a' succeeded"
fi
say "second start a: $out"
[ "$(echo "$out" | wc -l)" = 1 ] || fail "the refusal is not one line"
case $out in *"instance 'a' exists"*) ;; *) fail "unexpected refusal: $out" ;; esac
[ "$(server_pid a)" = "$pid_a" ] || fail "'a' changed"
vs status a b

# Equal priorities: the kernel spreads pages over both areas.
used() { swap_used_prio "$1" | cut -d' ' -f1; }
cgroup two 96
hogs_start two 160 21
say "swap used: $dev_a $(used "$dev_a") MiB, $dev_b $(used "$dev_b") MiB"
[ "$(used "$dev_a")" -gt 8 ] || fail "$dev_a is not swapping"
[ "$(used "$dev_b")" -gt 8 ] || fail "$dev_b is not swapping"

# Stopping 'a' brings its pages back into RAM (the cgroup may have it
# now: swapoff would be OOM-killed at the limit); 'b' keeps serving its
# pages, which the hog reads back, every one intact.
echo max >/sys/fs/cgroup/two/memory.max
vs stop a
expect_clean a "$dev_a" "$pid_a"
vs status b
# The hog's pages still out are in b, the one swap area left; its verify
# reads every page back. (Whether b is empty afterwards says nothing: the
# squeeze of swapoff can have put other processes' pages there.)
hog_swap=$(field_mib "/proc/${hog_pids[0]}/status" VmSwap)
read -r _ in0 < <(swapped_mib)
hogs_verify
read -r _ in1 < <(swapped_mib)
say "after stopping a: the hog had $hog_swap MiB in b; pswpin +$((in1 - in0)) MiB; b now holds $(used "$dev_b") MiB"
[ "$hog_swap" -gt 8 ] || fail "the hog had no pages in b"
[ $((in1 - in0)) -gt 8 ] || fail "b's pages did not come back"
vs stop b
expect_clean b "$dev_b" "$pid_b"
expect_no_oom
