#!/bin/bash
# The fourth call of 2026-12-05 (H100, 16.6 s): does the layout of the
# slots bound compressed reads? The same 1 GiB of bench/swap's pages
# written to a compress=lz4 ratio=1 server (backend=cuda, nbdkit -t 16)
# one request at a time (one connection, one request in flight: each
# request's pages in neighbouring slots) or by 8 connections at once (128
# worker threads taking slots page by page, interleaved), then read twice
# by nbdcopy at 8 connections. .devbin/plugin.so: main at 63b7b01.
source .devdebs/setup.sh >/dev/null 2>&1; . bench/lib.sh; export XDG_RUNTIME_DIR=/tmp
S=/dev/shm/src; write_source $S 1073741824 swap
gbs() { python3 -c "print(round(1.073741824/($2-$1),2))"; }
for mode in one many; do
  rm -f /tmp/x.sock
  nbdkit -U /tmp/x.sock -t 16 --pidfile /tmp/x.pid .devbin/plugin.so backend=cuda size=1G compress=lz4 ratio=1 2>/dev/null
  await_export /tmp/x.sock /tmp/x.pid; U="nbd+unix:///?socket=/tmp/x.sock"
  if [ $mode = one ]; then w=(--connections=1 --requests=1); else w=(--connections=8); fi
  a=$(date +%s.%N); nbdcopy "${w[@]}" $S $U; b=$(date +%s.%N); echo "$mode write $(gbs "$a" "$b") GB/s"
  for _ in 1 2; do a=$(date +%s.%N); nbdcopy --connections=8 $U null:; b=$(date +%s.%N); echo "$mode read8 $(gbs "$a" "$b") GB/s"; done
  stop_pidfile /tmp/x.pid
done
# Output:
#   one write 0.32 GB/s
#   one read8 4.68 GB/s
#   one read8 5.37 GB/s
#   many write 1.39 GB/s
#   many read8 2.1 GB/s
#   many read8 2.03 GB/s
