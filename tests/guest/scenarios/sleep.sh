#!/bin/bash
# Issue 12: what vramswap-suspend.service and vramswap-resume.service run,
# with swap in use: suspend brings every page back to RAM and stops the
# instance, resume starts it again, and the kernel swaps to it again.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

vs start --backend vulkan --size 256M --priority 40
device=$(nbd_device default)
pid=$(server_pid default)
cgroup sleep 128
hogs_start sleep 224 31
out=$(($(cat /sys/fs/cgroup/sleep/memory.swap.current) >> 20))
say "before suspend: $out MiB swapped out"
[ "$out" -gt 64 ] || fail "only $out MiB swapped out"

# Suspend needs RAM for every page: let the cgroup have it.
echo max >/sys/fs/cgroup/sleep/memory.max
t0=$SECONDS
vs suspend
say "suspend took $((SECONDS - t0)) s"
[ "$(cat /sys/fs/cgroup/sleep/memory.swap.current)" = 0 ] || fail "pages are still swapped out"
expect_clean default "$device" "$pid"
[ -f /run/vramswap/resume.json ] || fail "suspend left no resume.json"

t0=$SECONDS
vs resume
say "resume took $((SECONDS - t0)) s"
[ ! -e /run/vramswap/resume.json ] || fail "resume left resume.json"
vs status default
read -r _ priority < <(swap_used_prio "$(nbd_device default)")
[ "$priority" = 40 ] || fail "resumed with priority $priority, not its 40"

# Squeeze the cgroup again (`cgroup` returns once it is within the
# limit): its pages go to the resumed area, and come back intact.
read -r out0 in0 < <(swapped_mib)
cgroup sleep 128
hogs_verify
read -r out1 in1 < <(swapped_mib)
say "after resume: pswpout +$((out1 - out0)) MiB, pswpin +$((in1 - in0)) MiB"
[ $((out1 - out0)) -ge 64 ] || fail "the resumed area took only $((out1 - out0)) MiB"
[ $((in1 - in0)) -ge 64 ] || fail "only $((in1 - in0)) MiB came back from the resumed area"
pid=$(server_pid default) device=$(nbd_device default)
vs stop
expect_clean default "$device" "$pid"
expect_no_oom
