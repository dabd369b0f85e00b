#!/bin/bash
# Issue 25: upgrading the package while swap is in use loses no page. The
# guest's root is the host's, read-only, so the package goes into an
# overlay of it (a tmpfs over the host's /), and the package's commands
# run chrooted there: dpkg -i, an area started by the installed vramswap
# with the installed plugin, hogs with pages out to it, then dpkg -i of the
# same package over itself (prerm upgrade, every file replaced, postinst
# configure): the server serves on, the same process, every page intact.
# Last dpkg -r with the area up: prerm stops it, swapoff first.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

debs=("$GUEST_RUN"/deb/vramswap_*.deb)
[ -f "${debs[0]}" ] || fail "no package in $GUEST_RUN/deb (run-guest builds it for this scenario)"
root=/tmp/upgrade-root
mkdir -p /tmp/upgrade-upper /tmp/upgrade-work "$root"
mount -t overlay overlay -o lowerdir=/,upperdir=/tmp/upgrade-upper,workdir=/tmp/upgrade-work "$root"
for dir in proc sys dev dev/pts run; do
    mount --bind "/$dir" "$root/$dir"
done
cp "${debs[0]}" "$root/root/vramswap.deb"
packaged() {
    say "+ (installed) $*"
    chroot "$root" env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
# /proc/swaps names an area by its path as its reader sees it: from here,
# one swapped on in the chroot is under $root.
chroot_swaps() { chroot "$root" cat /proc/swaps; }
cleanup() {
    umount "$root"/{dev/pts,dev,proc,sys,run} "$root" 2>/dev/null || true
}
trap cleanup EXIT

# --no-triggers: man-db's trigger would index every man page of the host.
packaged dpkg --no-triggers -i /root/vramswap.deb
packaged vramswap start --backend vulkan --size 256M
device=$(nbd_device default)
pid=$(server_pid default)
plugin=$(tr '\0' '\n' <"/proc/$pid/cmdline" | grep 'nbdkit-vramswap-plugin.so$') ||
    fail "the server does not run the packaged plugin: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
say "the server runs $plugin"
cgroup upgrade 128
hogs_start upgrade 224 61
used=$(chroot_swaps | awk -v d="$device" '$1 == d { print int($4 / 1024) }')
[ "${used:-0}" -gt 32 ] || fail "only ${used:-0} MiB swapped out"
say "$used MiB in VRAM; dpkg -i of the same package over itself"
inode=$(stat -c %i "$root$plugin")
packaged dpkg --no-triggers -i /root/vramswap.deb
[ "$(stat -c %i "$root$plugin")" != "$inode" ] || fail "dpkg did not replace the plugin"
alive "$pid" || fail "the upgrade ended the server"
[ "$(server_pid default)" = "$pid" ] || fail "the upgrade restarted the server"
chroot_swaps | grep -q "^$device " || fail "the upgrade turned the swap area off"
packaged vramswap status default
hogs_verify
say "every page came back after the upgrade"

# Removal with the area up: prerm stops it (swapoff first), or fails.
# The hog's cgroup gets room for its pages first (a stop's swapoff charges
# them back to it, as suspend's does).
hogs_start upgrade 160 62
echo max >/sys/fs/cgroup/upgrade/memory.max
packaged dpkg --no-triggers -r vramswap
expect_clean default "$device" "$pid"
hogs_verify
say "every page came back when the package was removed"
expect_no_oom
