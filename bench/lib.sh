# What the bench scripts share: starting and stopping NBD servers on Unix
# sockets. Sourced by bench/nbd-compare and bench/swap.
# shellcheck shell=bash

# await_export SOCKET PIDFILE: waits up to 120 s until PIDFILE names the
# server and it answers nbdinfo on SOCKET; fails (nbdinfo saying why) if
# it never does.
await_export() {
    local sock=$1 pidfile=$2
    for _ in $(seq 1200); do
        [ -s "$pidfile" ] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null
}

# stop_pidfile PIDFILE: SIGTERM to the server it names, then waits until
# the process is gone.
stop_pidfile() {
    local pid
    pid=$(cat "$1")
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
