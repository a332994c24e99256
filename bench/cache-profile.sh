#!/usr/bin/env bash
# Where a mirrored cache's 4k write goes at QD32 (issue 15's QD32 row, which
# bench/cache.sh measures but does not explain).
#
# One pool on one nbdkit memory device (behind the delay filter, 1 ms per
# write, as cache.sh's delay rows; BENCH_DELAY=0 for none), sanvol-mds holding
# the mirror, sanvol-agent serving a volume with a mirrored cache (`vc`) and one
# without (`vw`, the write-through peer). fio's nbd engine writes 4k at random,
# QD32, to each; for each run it prints IOPS and the CPU time per write of
# each process (user + system, all threads, from /proc), and for the mirrored
# run the agent's local log appends and the server's mirror appends per second
# (`perf stat` on their pwrite64 calls; skipped without perf): writes / appends
# is the mean batch, and 1 / (appends per second) the time one batch holds the
# log, since the agent appends one batch at a time. It also prints how many
# device writes the destager made per write it destaged during the mirrored
# run (`sanvol-agent list --json`: rewrites of a block absorbed and
# neighbouring blocks merged make it less than one; see the agent's
# --cache-destage-hold-ms, which this script passes on from
# SANVOL_AGENT_CACHE_DESTAGE_HOLD_MS). Last, the whole host's CPU time per
# mirrored write (/proc/stat: fio, every process and the kernel's threads),
# how idle the host was, and the IOPS that cost allows with every CPU busy:
# the ceiling of the mirrored row on this host, whatever the code's latency.
#
# Usage: bench/cache-profile.sh   (env: BENCH_SECONDS=8, BENCH_DELAY=1,
#                                  BENCH_LOG_MIB=256; TMPDIR=/dev/shm puts the
#                                  log and the mirror on tmpfs: no disk)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-8}
LOG_MIB=${BENCH_LOG_MIB:-256}
scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release

if [ "${BENCH_DELAY:-1}" = 1 ]; then
    start_nbdkit dev0 --filter=delay memory 1024M delay-write=1ms delay-read=1ms
    device="delay-write=1ms"
else
    start_nbdkit dev0 memory 1024M
    device="no delay"
fi
start_pool dev0
start_agent a --cache-dir "$BENCH_DIR/cache"
start_cached_pair 256 "$LOG_MIB"
PIDS=("${PID_OF[agent-a]}" "${PID_OF[mds]}" "${PID_OF[dev0]}")

# appends_per_sec PID : pwrite64 calls per second of PID over 4 s (perf stat).
appends_per_sec() {
    perf stat -x, -e syscalls:sys_enter_pwrite64 -p "$1" -- sleep 4 2>&1 >/dev/null |
        awk -F, '/pwrite64/ {printf "%.0f", $1 / 4}'
}

# destage_counts : "destaged_bytes destage_writes" of the mirrored volume now.
destage_counts() {
    "$BIN/sanvol-agent" list --json --control-socket "$BENCH_DIR/agent-a.sock" | python3 -c '
import json, sys
c = next(v for v in json.load(sys.stdin) if v["volume"] == "vc")["cache"]
print(c.get("destaged_bytes", 0), c.get("destage_writes", 0))'
}

# host_ticks : "busy idle" clock ticks of the whole host so far (/proc/stat:
# user, nice, system, irq, softirq, steal; idle, iowait): every process and
# the kernel's own threads (the disk's, the network's), fio included.
host_ticks() {
    awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat
}

out="$BENCH_DIR/profile.txt"
count_appends=""
command -v perf >/dev/null && [ "$SECS" -ge 7 ] && count_appends=1
for mode in mirrored through; do
    before=$(for p in "${PIDS[@]}"; do cpu_ticks "$p"; done)
    host_before=$(host_ticks)
    if [ "$mode" = mirrored ] && [ -n "$count_appends" ]; then
        # From the third second of the run, for four seconds.
        (sleep 3; appends_per_sec "${PID_OF[agent-a]}" >"$BENCH_DIR/agent-appends.txt") &
        (sleep 3; appends_per_sec "${PID_OF[mds]}" >"$BENCH_DIR/mds-appends.txt") &
    fi
    if [ "$mode" = mirrored ]; then destage_before=$(destage_counts); fi
    r=$(fio_nbd "${URI[$mode]}" randwrite 4k 32 256 "$SECS")
    after=$(for p in "${PIDS[@]}"; do cpu_ticks "$p"; done)
    host_after=$(host_ticks)
    if [ "$mode" = mirrored ]; then destage_after=$(destage_counts); fi
    echo "$mode $r $(echo $before) $(echo $after) $host_before $host_after" >>"$out"
done
agent_appends="" server_appends=""
if [ -n "$count_appends" ]; then
    # Written long before: the counts end a second before the mirrored run does.
    agent_appends=$(cat "$BENCH_DIR/agent-appends.txt" 2>/dev/null || true)
    server_appends=$(cat "$BENCH_DIR/mds-appends.txt" 2>/dev/null || true)
fi
for v in vc vw; do "$BIN/sanvol-agent" detach "$v" --control-socket "$BENCH_DIR/agent-a.sock" >/dev/null; done

mkdir -p bench/results
result="bench/results/cache-profile-$(date +%Y%m%d-%H%M%S).md"
python3 - "$out" "$SECS" "$(getconf CLK_TCK)" "$device" "${TMPDIR:-/tmp}" "$agent_appends" "$server_appends" \
    "$destage_before" "$destage_after" "${SANVOL_AGENT_CACHE_DESTAGE_HOLD_MS:-default}" "$(nproc)" >"$result" <<'PY'
import sys
out, secs, hz, device, tmp, agent_appends, server_appends, destage_before, destage_after, hold, cpus = sys.argv[1:12]
secs, hz, cpus = int(secs), int(hz), int(cpus)
print(f"fio nbd engine, 4k random writes QD32, {secs} s, one nbdkit memory device ({device}); "
      f"the mirrored cache's log and mirror under {tmp}; the agent's destage hold: {hold} ms\n")
print("| volume | IOPS | CPU µs per write: sanvol-agent | sanvol-mds | nbdkit | the three |")
print("|---|---:|---:|---:|---:|---:|")
rows, host = {}, {}
for line in open(out):
    f = line.split()
    mode, iops = f[0], float(f[1])
    before, after = list(map(int, f[3:6])), list(map(int, f[6:9]))
    busy0, idle0, busy1, idle1 = map(int, f[9:13])
    writes = max(iops * (secs + 1), 1)  # fio's ramp second included, as fio_nbd_cpu
    us = [(a - b) * 1e6 / hz / writes for a, b in zip(after, before)]
    rows[mode] = iops
    host[mode] = ((busy1 - busy0) * 1e6 / hz / writes, (idle1 - idle0) / max(busy1 - busy0 + idle1 - idle0, 1))
    print(f"| {'mirrored cache' if mode == 'mirrored' else 'write-through'} | {iops:.0f} | "
          f"{us[0]:.1f} | {us[1]:.1f} | {us[2]:.1f} | {sum(us):.1f} |")
print(f"\nmirrored / write-through: {rows['mirrored'] / max(rows['through'], 1):.2f}")
# The whole host's CPU per write (fio and the kernel included) bounds the
# mirrored row: with every CPU busy at that cost, IOPS could not pass
# cpus / cost, nor the ratio that over this run's write-through IOPS.
us, idle = host["mirrored"]
ceiling = cpus * 1e6 / max(us, 1e-9)
print(f"\nthe whole host during the mirrored run: {us:.1f} µs of CPU per write (all processes and the kernel), "
      f"{idle * 100:.0f} % idle; at that cost {cpus} CPUs all busy would serve at most {ceiling:.0f} IOPS, "
      f"{ceiling / max(rows['through'], 1):.2f}× this run's write-through row")
us, idle = host["through"]
print(f"the whole host during the write-through run: {us:.1f} µs of CPU per write, {idle * 100:.0f} % idle")
if agent_appends and server_appends:
    a, s = int(agent_appends), int(server_appends)
    print(f"\nmirrored run, seconds 3-7: the agent's log appends {a}/s ({rows['mirrored'] / max(a, 1):.1f} writes "
          f"per batch, {1e6 / max(a, 1):.0f} µs per batch), the server's mirror appends {s}/s")
(b0, w0), (b1, w1) = (map(int, destage_before.split()), map(int, destage_after.split()))
destaged = (b1 - b0) // 4096
if destaged:
    print(f"\nmirrored run: {destaged} writes destaged in {w1 - w0} device writes "
          f"({(w1 - w0) / destaged:.2f} device writes per write)")
PY
show_results "$result"
