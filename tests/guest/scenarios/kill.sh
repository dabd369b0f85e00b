#!/bin/bash
# Issue 8: the nbdkit server is killed (-9) while swap is in use. The guest
# must survive (no hang, no panic); the hog that owned the lost pages dies
# of SIGBUS when it touches them; status reports the dead server and exits
# non-zero; stop cleans up the dead instance.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

vs start --backend vulkan --size 256M
device=$(nbd_device default)
pid=$(server_pid default)
cgroup kill 128
hogs_start kill 224 41
say "$(swap_used_prio "$device" | cut -d' ' -f1) MiB in VRAM; kill -9 nbdkit $pid"
kill -9 "$pid"
sleep 1

if out=$(vramswap status 2>&1); then
    fail "status exits 0 with the server dead: $out"
fi
echo "$out"
case $out in *"nbdkit (pid $pid) is not running"*) ;; *) fail "status does not name the dead server" ;; esac

# The lost pages: reading them back is an I/O error, which the kernel
# turns into SIGBUS for the process that touches them.
touch /tmp/hogs-verify
status=0
wait "${hog_pids[0]}" || status=$?
say "the hog exited with status $status"
[ "$status" = $((128 + 7)) ] || fail "the hog did not die of SIGBUS (status $status)"

# Stop cleans up the dead instance, saying why its pages are gone.
t0=$SECONDS
say "+ vramswap stop"
out=$(vramswap stop 2>&1) || fail "stop failed: $out"
echo "$out"
say "stop took $((SECONDS - t0)) s"
case $out in *"nbdkit (pid $pid) is not running: the pages it held are lost"*) ;;
    *) fail "stop did not say the server was dead" ;;
esac
expect_clean default "$device" "$pid"

# The guest is fine: a new instance swaps as before.
vs start --backend vulkan --size 128M
cgroup again 96
hogs_start again 160 42
hogs_verify
pid=$(server_pid default) device=$(nbd_device default)
vs stop
expect_clean default "$device" "$pid"
