#!/bin/bash
# Call 3, ready (not run yet): where CUDA's 16 jobs x QD8 time goes (issue
# 23, part 5). The server's CPU time per request and the machine's busy
# cores beside the memory plugin's, for main's wait policy and four
# variants of it: every thread may poll (POLLERS=16), one may (POLLERS=1),
# a first nap of 50 us instead of 10 (NAP_US=50), a spin of 20 us instead
# of 100 (SPIN_US=20). .devbin/wait.so is main with experiment-wait.patch
# (environment knobs of backend/wait.rs's WaitPolicy::new; experiment
# only, not in main):
#   git worktree add /tmp/wt HEAD && cd /tmp/wt &&
#   git apply docs/bench/h200-2026-12-04-gather/experiment-wait.patch &&
#   cargo build --release -p nbdkit-vramswap-plugin
# and its target/release/libnbdkit_vramswap_plugin.so copied there. Runs
# scripts/gather.sh's NBD level only (STORE empty): 4 KiB randread QD1,
# QD32, 4 jobs x QD32, 16 jobs x QD8, servers taking turns shape by shape,
# 2 GiB each, 3 s after a 1 s ramp: about 6 servers x 4 shapes x 5 s plus
# fills, under 3 minutes. BACKEND (default cuda) and SO can be set to try
# it elsewhere.
set -u
B=${BACKEND:-cuda}
SO=${SO:-.devbin/wait.so}
export STORE=""
export SERVERS="mem:-:memory:allocator=malloc $B-main:-:$SO:backend=$B
  $B-p16:VRAMSWAP_EXP_POLLERS=16:$SO:backend=$B $B-p1:VRAMSWAP_EXP_POLLERS=1:$SO:backend=$B
  $B-nap50:VRAMSWAP_EXP_NAP_US=50:$SO:backend=$B $B-spin20:VRAMSWAP_EXP_SPIN_US=20:$SO:backend=$B"
exec bash "$(dirname "$0")/gather.sh"
