#!/usr/bin/env bash
# How long an application's writes pause when the pool moves from one
# metadata server to another (issue 13: one active server per pool).
#
# Two sanvol-mds (host ids 1 and 2) share a pool on three nbdkit memory
# devices; one agent knows both addresses. fio writes 4k blocks at queue
# depth 1 through the agent's export and logs every write's latency. Then:
#   handoff   `sanvol mds handoff` HANDOFFS times (back and forth): the
#             active server stops taking changes, writes the lease over to
#             the standby, redirects the agent; the agent resumes there.
#   takeover  kill -9 of the active server TAKEOVERS times: the standby
#             waits for the dead server's lease record to stay unchanged for
#             5 T, acquires (4 T wait), loads the metadata and serves; the
#             agent resumes there. The killed server is started again as the
#             new standby.
# The pause the application saw is the slowest write completing around each
# event. Defaults are the shipped defaults (lease I/O timeout T = 1000 ms,
# agent lease 10 s); the goals are handoff median < 1 s and takeover
# < agent lease + 2 s.
#
# Usage: bench/failover.sh   (env: HANDOFFS=10 TAKEOVERS=3 IO_TIMEOUT_MS=1000 LEASE_MS=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
HANDOFFS=${HANDOFFS:-10}
TAKEOVERS=${TAKEOVERS:-3}
IO_TIMEOUT_MS=${IO_TIMEOUT_MS:-1000}
LEASE_MS=${LEASE_MS:-10000}

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

devices=()
for i in 0 1 2; do
    start_nbdkit "dev$i" memory 1G
    devices+=("$(sock_uri "dev$i")")
done
for k in mds admin agent; do $BIN/sanvol keygen "$D/$k.key" >/dev/null; done
init=()
for d in "${devices[@]}"; do init+=(--device "$d"); done
$BIN/sanvol pool init --name bench "${init[@]}" --server-key "$D/mds.key.pub" --admin-key "$D/admin.key.pub" >/dev/null
list=$(printf '"%s", ' "${devices[@]}")
for h in 1 2; do
    cat >"$D/mds-$h.toml" <<TOML
listen = ["unix:$D/mds-$h.sock"]
key = "$D/mds.key"
devices = [${list%, }]
lease_ms = $LEASE_MS
lease_io_timeout_ms = $IO_TIMEOUT_MS
host_id = $h
name = "mds-$h"
TOML
done
declare -A MDS_PID=()
STARTS=0
start_mds() { # HOST
    STARTS=$((STARTS + 1))
    start_ready "mds-$1-$STARTS" $BIN/sanvol-mds --config "$D/mds-$1.toml"
    MDS_PID[$1]=${BENCH_PIDS[-1]}
}
start_mds 1
start_mds 2
ADDRS="unix:$D/mds-1.sock,unix:$D/mds-2.sock"
export SANVOL_MDS=$ADDRS SANVOL_KEY="$D/admin.key" SANVOL_SERVER_KEY="$D/mds.key.pub"
# The first server to acquire the lease serves; wait for one.
active() { # prints the host id of the active server
    $BIN/sanvol pool status --json 2>/dev/null |
        python3 -c 'import json,sys; s=json.load(sys.stdin)["servers"]; a=[x["host_id"] for x in s if x["role"] == "active"]; sys.exit(1) if len(a) != 1 else print(a[0])'
}
deadline=$((SECONDS + 60))
until active >/dev/null; do [ $SECONDS -lt $deadline ] || { echo "no server became active" >&2; exit 1; }; sleep 0.1; done
standing_by() { # HOST: the active server lists HOST as standing by
    $BIN/sanvol pool status --json 2>/dev/null |
        python3 -c 'import json,sys; s=json.load(sys.stdin)["servers"]; sys.exit(0 if any(x["host_id"] == int(sys.argv[1]) and x["role"] == "standing by" for x in s) else 1)' "$1"
}

$BIN/sanvol client add "$D/agent.key.pub" --role agent --name bench-host >/dev/null
$BIN/sanvol-agent run --mds "$ADDRS" --key "$D/agent.key" --server-key "$D/mds.key.pub" \
    --control-socket "$D/agent.sock" --export-dir "$D" 2>"$D/agent.err" &
BENCH_PIDS+=($!)
$BIN/sanvol-agent wait-ready --control-socket "$D/agent.sock"
$BIN/sanvol volume create vol 256M >/dev/null
URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent.sock")

resumed() { grep -c "handle resumed after reconnecting: unchanged" "$D/agent.err" || true; }
now_ms() { date +%s%3N; }
wait_resumed() { # COUNT_BEFORE
    local deadline=$((SECONDS + 60))
    until [ "$(resumed)" -gt "$1" ]; do
        [ $SECONDS -lt $deadline ] || { echo "the agent did not resume: $(tail -5 "$D/agent.err")" >&2; exit 1; }
        sleep 0.02
    done
}

# pick_pair: sets from (the active server's host id) and to (the other one),
# once the active server lists the other as standing by.
pick_pair() {
    from=$(active)
    to=$((3 - from))
    local deadline=$((SECONDS + 30))
    until standing_by "$to"; do [ $SECONDS -lt $deadline ] || { echo "mds-$to not standing by" >&2; exit 1; }; sleep 0.05; done
}

results="$D/results.txt"
run_fio() { # NAME SECONDS
    fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=1 --size=64M \
        --time_based --runtime="$2" --randrepeat=0 --write_lat_log="$D/lat-$1" --log_avg_msec=0 \
        --output-format=json >"$D/fio-$1.json" 2>"$D/fio-$1.err" &
    FIO_PID=$!
    BENCH_PIDS+=($FIO_PID)
    FIO_START=$(now_ms)
    sleep 2 # let fio connect and settle before the first event
}
finish_fio() { # NAME
    wait "$FIO_PID"
    grep -q '"error" : 0' "$D/fio-$1.json" || { echo "fio reported an error: $(cat "$D/fio-$1.err")" >&2; exit 1; }
    printf '%s\n' "${windows[@]}" >"$D/windows-$1.txt"
    echo "$1 $D/lat-${1}_clat.1.log $D/windows-$1.txt" >>"$results"
}

# Handoffs, back and forth.
run_fio handoff $((HANDOFFS * 4 + 10))
windows=()
for i in $(seq "$HANDOFFS"); do
    pick_pair
    before=$(resumed)
    t0=$(now_ms)
    $BIN/sanvol mds handoff >/dev/null
    wait_resumed "$before"
    windows+=("$((t0 - FIO_START)) $(($(now_ms) - FIO_START))")
    echo "handoff $i: mds-$from -> mds-$to" >&2
    sleep 1
done
finish_fio handoff

# Takeovers after kill -9.
per=$(( (5 + 4 + 3) * IO_TIMEOUT_MS / 1000 + LEASE_MS / 1000 + 8 ))
run_fio takeover $((TAKEOVERS * per + 10))
windows=()
for i in $(seq "$TAKEOVERS"); do
    pick_pair
    before=$(resumed)
    t0=$(now_ms)
    kill -9 "${MDS_PID[$from]}"
    wait "${MDS_PID[$from]}" 2>/dev/null || true
    wait_resumed "$before"
    windows+=("$((t0 - FIO_START)) $(($(now_ms) - FIO_START))")
    echo "takeover $i: mds-$from killed, mds-$to serves" >&2
    start_mds "$from"
    sleep 1
done
finish_fio takeover
$BIN/sanvol-agent detach vol --control-socket "$D/agent.sock"

mkdir -p bench/results
out="bench/results/failover-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$IO_TIMEOUT_MS" "$LEASE_MS" >"$out" <<'PY'
import sys, statistics
t, lease = int(sys.argv[2]), int(sys.argv[3])
print(f"fio 4k randwrite QD1 through sanvol-agent; lease I/O timeout T = {t} ms, agent lease = {lease} ms\n")
print("| event | count | pause median (ms) | pause max (ms) | normal write p50 (ms) | resumed after the event, median (ms) | goal |")
print("|---|---:|---:|---:|---:|---:|---|")
goals = {"handoff": "median < 1000 ms", "takeover": f"< lease + 2 s = {lease + 2000} ms"}
for line in open(sys.argv[1]):
    name, log, wins = line.split()
    lat = []  # (ms since fio start at completion, latency ms)
    for l in open(log):
        f = [x.strip() for x in l.split(",")]
        lat.append((int(f[0]), int(f[1]) / 1e6))
    pauses, resumes = [], []
    for w in open(wins):
        t0, t1 = map(int, w.split())
        inside = [ms for at, ms in lat if t0 - 200 <= at <= t1 + 1000]
        pauses.append(max(inside) if inside else 0.0)
        resumes.append(t1 - t0)
    p50 = statistics.median(ms for _, ms in lat)
    print(f"| {name} | {len(pauses)} | {statistics.median(pauses):.1f} | {max(pauses):.1f} | {p50:.3f} | "
          f"{statistics.median(resumes):.0f} | {goals[name]} |")
PY
show_results "$out"
