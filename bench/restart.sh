#!/usr/bin/env bash
# How long an agent holds I/O across a metadata-server restart (issue 4:
# durable handles with resume keys).
#
# fio writes 4k blocks at queue depth 1 through the agent's export and logs
# the completion latency of every single write. Meanwhile the script kills
# sanvol-mds with SIGKILL N times and starts it again after DOWN_MS; after
# each start it waits until the agent logged "resumed ... unchanged". The
# pause the application saw is the slowest write around each restart.
#
# Two scenarios, because the design makes them differ by construction:
#   down 0 ms        the server is back long before the agent's lease runs
#                    out, so the agent never stops I/O: the pause is only
#                    whatever the restart costs the data path (nothing).
#   down > lease     the lease runs out while the server is away: the agent
#                    holds (queues) I/O until it resumed on the new server.
#                    Expected pause ≈ down time − lease left + reconnect
#                    backoff + resume round trip.
#
# Usage: bench/restart.sh   (env: RESTARTS=10 LEASE_MS=1000 DOWNS_MS="0 2000")
set -euo pipefail
cd "$(dirname "$0")/.."
RESTARTS=${RESTARTS:-10}
LEASE_MS=${LEASE_MS:-1000}
DOWNS_MS=${DOWNS_MS:-"0 2000"}

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR

start_nbdkit dev0 memory 1G
for k in mds admin agent; do $BIN/sanvol keygen "$D/$k.key" >/dev/null; done
$BIN/sanvol pool init --name bench --device "$(sock_uri dev0)" --server-key "$D/mds.key.pub" --admin-key "$D/admin.key.pub" >/dev/null
cat >"$D/mds.toml" <<TOML
listen = ["unix:$D/mds.sock"]
key = "$D/mds.key"
devices = ["$(sock_uri dev0)"]
lease_ms = $LEASE_MS
TOML
MDS_STARTS=0
start_mds() {
    MDS_STARTS=$((MDS_STARTS + 1))
    start_ready "mds-$MDS_STARTS" $BIN/sanvol-mds --config "$D/mds.toml"
    MDS_PID=${BENCH_PIDS[-1]}
}
start_mds
export SANVOL_MDS="unix:$D/mds.sock" SANVOL_KEY="$D/admin.key" SANVOL_SERVER_KEY="$D/mds.key.pub"
$BIN/sanvol client add "$D/agent.key.pub" --role agent --name bench-host >/dev/null
$BIN/sanvol-agent run --mds "$SANVOL_MDS" --key "$D/agent.key" --server-key "$D/mds.key.pub" \
    --control-socket "$D/agent.sock" --export-dir "$D" --state-dir "$D/agent-state" 2>"$D/agent.err" &
BENCH_PIDS+=($!)
$BIN/sanvol-agent wait-ready --control-socket "$D/agent.sock"
$BIN/sanvol volume create vol 256M >/dev/null
URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent.sock")

resumed() { grep -c "handle resumed after reconnecting: unchanged" "$D/agent.err" || true; }
now_ms() { date +%s%3N; }

results="$D/results.txt"
for down in $DOWNS_MS; do
    secs=$(( (RESTARTS * (down + LEASE_MS + 1500)) / 1000 + 5 ))
    fio --name=restart --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=1 --size=64M \
        --time_based --runtime="$secs" --randrepeat=0 --write_lat_log="$D/lat-$down" --log_avg_msec=0 \
        --output-format=json >"$D/fio-$down.json" 2>"$D/fio-$down.err" &
    FIO_PID=$!
    BENCH_PIDS+=($FIO_PID)
    fio_start=$(now_ms)
    sleep 2 # let fio connect and settle before the first restart
    windows=()
    for i in $(seq "$RESTARTS"); do
        before=$(resumed)
        t_kill=$(now_ms)
        kill -9 "$MDS_PID"
        wait "$MDS_PID" 2>/dev/null || true
        [ "$down" -gt 0 ] && sleep "$(python3 -c "print($down/1000)")"
        start_mds
        deadline=$((SECONDS + 30))
        until [ "$(resumed)" -gt "$before" ]; do
            [ $SECONDS -lt $deadline ] || { echo "the agent did not resume: $(tail -5 "$D/agent.err")" >&2; exit 1; }
            sleep 0.02
        done
        t_resumed=$(now_ms)
        windows+=("$((t_kill - fio_start)) $((t_resumed - fio_start))")
        sleep 1
        echo "down ${down} ms: restart $i done" >&2
    done
    wait "$FIO_PID"
    grep -q '"error" : 0' "$D/fio-$down.json" || { echo "fio reported an error: $(cat "$D/fio-$down.err")" >&2; exit 1; }
    printf '%s\n' "${windows[@]}" >"$D/windows-$down.txt"
    echo "$down $D/lat-${down}_clat.1.log $D/windows-$down.txt" >>"$results"
done
$BIN/sanvol-agent detach vol --control-socket "$D/agent.sock"

mkdir -p bench/results
out="bench/results/restart-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$RESTARTS" "$LEASE_MS" >"$out" <<'PY'
import sys, statistics
restarts, lease = sys.argv[2], sys.argv[3]
print(f"fio 4k randwrite QD1 through sanvol-agent, {restarts} x kill -9 + restart of sanvol-mds, lease_ms = {lease}\n")
print("| server down | pause median (ms) | pause max (ms) | normal write p50 (ms) | resume after start, median (ms) |")
print("|---:|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    down, log, wins = line.split()
    lat = []  # (ms since fio start at completion, latency ms)
    for l in open(log):
        f = [x.strip() for x in l.split(",")]
        lat.append((int(f[0]), int(f[1]) / 1e6))
    pauses, resumes = [], []
    for w in open(wins):
        t_kill, t_res = map(int, w.split())
        # Writes completing from the kill until 1 s after the resume; the
        # slowest is the pause the application saw (fio's clock starts a
        # little after ours, so the window is generous on both sides).
        inside = [ms for t, ms in lat if t_kill - 200 <= t <= t_res + 1000]
        pauses.append(max(inside) if inside else 0.0)
        resumes.append(t_res - t_kill - int(down))
    p50 = statistics.median(ms for _, ms in lat)
    print(f"| {down} ms | {statistics.median(pauses):.1f} | {max(pauses):.1f} | {p50:.3f} | {statistics.median(resumes):.0f} |")
PY
cat "$out"
echo "(saved to $out)"
