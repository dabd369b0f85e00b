#!/bin/bash
# Issue 8: the instance directory and socket are root-only and nbdkit has no
# network listener; start --encrypt puts swap on a plain dm-crypt mapping with a
# random key over the NBD device. Pages swap out and back intact, the
# export (read over a second NBD connection, as anyone who could reach the
# socket or the VRAM would see it) holds none of the hog's plaintext, stop
# closes the mapping. The same hog on an unencrypted instance is the
# control: there the plaintext is in the export, so the check can fail.
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/lib.sh"

# How many 8-byte words of the export carry hog SEED's tag (the top 16 bits
# of every word hog.c writes are SEED ^ 0x5a5a). Random bytes match one word
# in 65536: ~200 in 96 MiB of ciphertext.
tagged_words() { # instance seed
    nbdcopy "nbd+unix:///?socket=/run/vramswap/$1/nbd.sock" - | python3 -c '
import array, sys
tag = int(sys.argv[1]) ^ 0x5a5a
n = 0
while chunk := sys.stdin.buffer.read(1 << 20):
    words = array.array("H")
    words.frombytes(chunk)
    n += words[3::4].count(tag)
print(n)' "$2"
}

# Swaps hog 41 out through INSTANCE (96 MiB in a 48 MiB cgroup: about half
# of it goes to swap), sets $tagged to how many words of the export carry
# its tag, checks the hog's pages back and stops INSTANCE ($pid, $device).
swap_count_stop() { # instance label
    cgroup crypt 48
    hogs_start crypt 96 41
    say "$1: hog written, swap used $(awk 'NR > 1 { s += $4 } END { print int(s / 1024) }' /proc/swaps) MiB"
    tagged=$(tagged_words "$1" 41)
    say "$2 export: $tagged words carry the hog's tag"
    hogs_verify
    echo max >/sys/fs/cgroup/crypt/memory.max
    vs stop "$1"
    expect_clean "$1" "$device" "$pid"
}

vs start crypt --backend vulkan --size 96M --encrypt
pid=$(server_pid crypt) device=$(nbd_device crypt)
grep -q '"crypt": "vramswap-crypt"' /run/vramswap/crypt/state.json || fail "state.json does not record the mapping"
[ -e /dev/mapper/vramswap-crypt ] || fail "no /dev/mapper/vramswap-crypt"
! grep -q "^$device " /proc/swaps || fail "swap is on $device itself, not the mapping"
vs status crypt
# Isolation: root's 0700 directory, a 0600 socket, no network listener.
[ "$(stat -c '%a %U' /run/vramswap/crypt)" = "700 root" ] || fail "instance directory: $(stat -c '%a %U' /run/vramswap/crypt)"
[ "$(stat -c '%a %U' /run/vramswap/crypt/nbd.sock)" = "600 root" ] || fail "socket: $(stat -c '%a %U' /run/vramswap/crypt/nbd.sock)"
if ss -Hltunp | grep "pid=$pid,"; then fail "nbdkit listens on a network port"; fi
say "socket 0600 in a 0700 directory, no TCP/UDP listener"
swap_count_stop crypt encrypted
[ "$tagged" -lt 10000 ] || fail "the export holds plaintext ($tagged tagged words)"
[ ! -e /dev/mapper/vramswap-crypt ] || fail "the mapping is still open"

# Control: no --encrypt, the same hog; its pattern must show in the export.
vs start plain --backend vulkan --size 96M
pid=$(server_pid plain) device=$(nbd_device plain)
swap_count_stop plain plain
[ "$tagged" -gt 100000 ] || fail "the control found no plaintext ($tagged): the check is blind"
expect_no_oom
