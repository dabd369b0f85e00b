#!/bin/bash
# The server stops answering for longer than the kernel's default NBD
# request timeout (30 s) while a process waits for its pages, as it would
# behind a stalled GPU driver or a starved CPU (here: SIGSTOP for 45 s).
# The kernel must keep waiting: with its default, a request that takes 30 s
# gets its connection shut down ("Connection timed out, retrying"), for
# good (nbd-client does not reconnect), and once the last connection is
# gone every request fails and the pages in VRAM are lost.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

vs start --backend vulkan --size 256M
device=$(nbd_device default)
pid=$(server_pid default)
cgroup stall 96
hogs_start stall 160 61
say "$(swap_used_prio "$device" | cut -d' ' -f1) MiB in VRAM; nbdkit $pid stopped for 45 s while the hog reads them back"
kill -STOP "$pid"
touch /tmp/hogs-verify
sleep 45
kill -CONT "$pid"
say "nbdkit $pid continued"
hogs_verify
if dmesg | grep -E "nbd[0-9]+: (Connection timed out|Possible stuck request)"; then
    fail "the kernel timed out a request to the stopped server"
fi
vs stop
expect_clean default "$device" "$pid"
