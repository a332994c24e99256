#!/usr/bin/env bash
# Where the 4 KiB QD1 rows go (bench/README.md, "Polling before blocking"):
# fio's nbd engine at queue depth 1 against blockio's server on two
# connection threads, the same with polling (`--poll-us`), and
# `nbdkit memory`, with the server and fio on the same CPU, on different
# CPUs, and where the scheduler puts them. Needs two CPUs.
#
# Usage: bench/placement.sh   (env: BENCH_SECONDS=3 per cell, BENCH_POLL_US=200)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-3}

scripts/install-deps.sh >/dev/null
cargo build --release -q -p blockio --example nbd_serve
source bench/lib.sh

start_ready threads target/release/examples/nbd_serve --unix "$BENCH_DIR/threads.sock" --memory 1024M \
    --connection-threads 2
start_ready polling target/release/examples/nbd_serve --unix "$BENCH_DIR/polling.sock" --memory 1024M \
    --connection-threads 2 --poll-us "${BENCH_POLL_US:-200}"
start_nbdkit nbdkit memory 1024M
for s in threads polling nbdkit; do
    fio_nbd "$(sock_uri $s)" write 1m 8 1024 1 >/dev/null
done

echo "| placement (server / fio) | rw | blockio threads IOPS | blockio polling IOPS | nbdkit IOPS |"
echo "|---|---|---:|---:|---:|"
for rw in randwrite randread; do
    for placement in same split free; do
        line="| $placement | $rw"
        for s in threads polling nbdkit; do
            # Every thread of the server (connection threads inherit it).
            case $placement in
                same) taskset -a -p -c 0 "${PID_OF[$s]}" >/dev/null; pin=(taskset -c 0) ;;
                split) taskset -a -p -c 0 "${PID_OF[$s]}" >/dev/null; pin=(taskset -c 1) ;;
                free) taskset -a -p -c 0,1 "${PID_OF[$s]}" >/dev/null; pin=() ;;
            esac
            iops=$("${pin[@]}" fio --name=q --ioengine=nbd --uri="$(sock_uri $s)" --rw="$rw" --bs=4k --iodepth=1 \
                --size=1024M --time_based --runtime="$SECS" --ramp_time=1 --output-format=json 2>/dev/null |
                python3 -c "$FIO_JSON_TO_IOPS_MIB" | cut -d' ' -f1)
            line="$line | $iops"
        done
        echo "$line |"
    done
done
echo; host_facts
