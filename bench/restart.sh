#!/usr/bin/env bash
# How long I/O through sanvol-agent pauses when a process of the stack is
# killed with SIGKILL and started again (issue 4: durable handles; issue 19:
# an agent restart resumes at once).
#
# Part 1, the agent (the server's default lease 10 s and durable time 30 s):
# fio writes 4k blocks at queue depth 1 through QEMU's NBD client with
# reconnect-delay (qemu-nbd --image-opts driver=nbd,...,reconnect-delay=120,
# a VM's view of the agent's socket export), logging every write's
# completion latency, while the script kills sanvol-agent and starts it
# again at once, RESTARTS times. Two measures per restart:
#   served again   kill -> the new agent logged that it serves the volume
#                  again (took the handle back by resume, export bound)
#   fio pause      the slowest write around the restart, as the application
#                  saw it; QEMU's NBD client retries a refused reconnect
#                  once a second, which sets a floor of ~1 s for it
# Against two peers in the same run:
#   no state file  the same kill, the new agent started with an empty state
#                  directory (the behaviour before issue 19): it can only
#                  re-open the volume, which the server refuses until the
#                  dead agent's handle ran out (lease + durable time)
#   nbdkit         the same fio through the same QEMU client, but it is the
#                  NBD server behind QEMU (nbdkit file) that is killed and
#                  started again at once: the pause QEMU's reconnect alone costs
#
# Part 2, the metadata server (lease LEASE_MS): the script kills sanvol-mds
# RESTARTS times per scenario and starts it again after DOWN_MS; after each
# start it waits until the agent logged "resumed ... unchanged". The pause
# the application saw is the slowest write around each restart.
#   down 0 ms        the server is back long before the agent's lease runs
#                    out, so the agent never stops I/O.
#   down > lease     the lease runs out while the server is away: the agent
#                    holds (queues) I/O until it resumed on the new server.
#
# Usage: bench/restart.sh   (env: RESTARTS=10 BASELINE_RESTARTS=1 LEASE_MS=1000 DOWNS_MS="0 2000")
set -euo pipefail
cd "$(dirname "$0")/.."
RESTARTS=${RESTARTS:-10}
BASELINE_RESTARTS=${BASELINE_RESTARTS:-1}
LEASE_MS=${LEASE_MS:-1000}
DOWNS_MS=${DOWNS_MS:-"0 2000"}

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
source bench/lib.sh
BIN=target/release
D=$BENCH_DIR
now_ms() { date +%s%3N; }

start_nbdkit dev0 memory 1G
for k in mds admin agent; do $BIN/sanvol keygen "$D/$k.key" >/dev/null; done
$BIN/sanvol pool init --name bench --device "$(sock_uri dev0)" --server-key "$D/mds.key.pub" --admin-key "$D/admin.key.pub" >/dev/null
# mds_config [LEASE_MS]: the server's config; without an argument its defaults.
mds_config() {
    {
        echo "listen = [\"unix:$D/mds.sock\"]"
        echo "key = \"$D/mds.key\""
        echo "devices = [\"$(sock_uri dev0)\"]"
        [ -z "${1:-}" ] || echo "lease_ms = $1"
    } >"$D/mds.toml"
}
MDS_STARTS=0
start_mds() {
    MDS_STARTS=$((MDS_STARTS + 1))
    start_ready "mds-$MDS_STARTS" $BIN/sanvol-mds --config "$D/mds.toml"
    MDS_PID=${BENCH_PIDS[-1]}
}
mds_config
start_mds
export SANVOL_MDS="unix:$D/mds.sock" SANVOL_KEY="$D/admin.key" SANVOL_SERVER_KEY="$D/mds.key.pub"
$BIN/sanvol client add "$D/agent.key.pub" --role agent --name bench-host >/dev/null
AGENT_STARTS=0
# start_agent STATE_DIR: sanvol-agent in the background, its log in $D/agent-N.err.
start_agent() {
    AGENT_STARTS=$((AGENT_STARTS + 1))
    AGENT_LOG="$D/agent-$AGENT_STARTS.err"
    $BIN/sanvol-agent run --mds "$SANVOL_MDS" --key "$D/agent.key" --server-key "$D/mds.key.pub" \
        --control-socket "$D/agent.sock" --export-dir "$D" --state-dir "$1" 2>"$AGENT_LOG" &
    AGENT_PID=$!
    BENCH_PIDS+=($AGENT_PID)
}
start_agent "$D/agent-state"
$BIN/sanvol-agent wait-ready --control-socket "$D/agent.sock"
$BIN/sanvol volume create vol 256M >/dev/null
URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent.sock")

# The wall-clock time (ms) of the first line of log $1 matching $2, once there.
log_time_ms() {
    local deadline=$((SECONDS + 120)) line
    until line=$(grep -m1 "$2" "$1"); do
        [ $SECONDS -lt $deadline ] || { echo "never logged '$2': $(tail -5 "$1")" >&2; exit 1; }
        sleep 0.01
    done
    python3 -c 'import sys, datetime; t = sys.argv[1].split()[0].rstrip("Z")[:26]
print(int(datetime.datetime.fromisoformat(t).replace(tzinfo=datetime.timezone.utc).timestamp() * 1000))' "$line"
}

# fio_start NAME URI SECONDS: fio 4k random writes at QD1 with a latency log.
fio_start() {
    fio --name=restart --ioengine=nbd --uri="$2" --rw=randwrite --bs=4k --iodepth=1 --size=64M \
        --time_based --runtime="$3" --randrepeat=0 --write_lat_log="$D/lat-$1" --log_avg_msec=0 \
        --output-format=json >"$D/fio-$1.json" 2>"$D/fio-$1.err" &
    FIO_PID=$!
    BENCH_PIDS+=($FIO_PID)
    FIO_START=$(now_ms)
}
fio_done() {
    wait "$FIO_PID"
    grep -q '"error" : 0' "$D/fio-$1.json" || { echo "fio ($1) reported an error: $(cat "$D/fio-$1.err")" >&2; exit 1; }
}
# qemu_front NAME TARGET_SOCKET EXPORT: qemu-nbd re-exporting TARGET through QEMU's NBD client.
qemu_front() {
    qemu-nbd --persistent -k "$D/$1.sock" --shared=8 --image-opts \
        "driver=nbd,server.type=unix,server.path=$2,export=$3,reconnect-delay=120" 2>"$D/$1.err" &
    BENCH_PIDS+=($!)
    local deadline=$((SECONDS + 30))
    until [ -S "$D/$1.sock" ]; do
        [ $SECONDS -lt $deadline ] || { echo "qemu-nbd $1 did not start: $(cat "$D/$1.err")" >&2; exit 1; }
        sleep 0.05
    done
}

results="$D/results.txt"
: >"$results"
qemu_front qemu-agent "$D/vol.sock" vol
FRONT="nbd+unix:///?socket=$D/qemu-agent.sock"

# --- Part 1a: the agent without its state file (the old behaviour).
secs=$((BASELINE_RESTARTS * 50 + 5))
fio_start agent-nostate "$FRONT" "$secs"
sleep 2
windows=()
for i in $(seq "$BASELINE_RESTARTS"); do
    t_kill=$(now_ms)
    kill -9 "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
    start_agent "$D/agent-state-empty-$i"
    $BIN/sanvol-agent wait-ready --control-socket "$D/agent.sock"
    until $BIN/sanvol-agent attach vol --control-socket "$D/agent.sock" >/dev/null 2>"$D/attach.err"; do
        grep -q "reserved for it until" "$D/attach.err" || { echo "attach failed: $(cat "$D/attach.err")" >&2; exit 1; }
        sleep 0.2
    done
    t_served=$(log_time_ms "$AGENT_LOG" "volume attached")
    windows+=("$((t_kill - FIO_START)) $((t_served - FIO_START)) $((t_served - t_kill))")
    echo "agent restart without state $i: served again after $((t_served - t_kill)) ms" >&2
done
printf '%s\n' "${windows[@]}" >"$D/windows-agent-nostate.txt"
# The agent from here on keeps its state in the last directory.
STATE="$D/agent-state-empty-$BASELINE_RESTARTS"
fio_done agent-nostate
echo "agent-nostate $D/lat-agent-nostate_clat.1.log $D/windows-agent-nostate.txt" >>"$results"

# --- Part 1b: the agent with its state file.
secs=$((RESTARTS * 2 + 5))
fio_start agent "$FRONT" "$secs"
sleep 2
windows=()
for i in $(seq "$RESTARTS"); do
    t_kill=$(now_ms)
    kill -9 "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
    start_agent "$STATE"
    t_served=$(log_time_ms "$AGENT_LOG" "took back volume vol")
    windows+=("$((t_kill - FIO_START)) $((t_served - FIO_START)) $((t_served - t_kill))")
    echo "agent restart $i: served again after $((t_served - t_kill)) ms" >&2
    sleep 1.5
done
printf '%s\n' "${windows[@]}" >"$D/windows-agent.txt"
fio_done agent
echo "agent $D/lat-agent_clat.1.log $D/windows-agent.txt" >>"$results"

# --- Part 1c, the peer: QEMU's NBD client when nbdkit behind it restarts at once.
truncate -s 256M "$D/peer.img"
start_peer() {
    nbdkit -f -U "$D/peer.sock" -P "$D/peer.pid" file "$D/peer.img" 2>>"$D/peer.err" &
    PEER_PID=$!
    BENCH_PIDS+=($PEER_PID)
    local deadline=$((SECONDS + 30))
    until [ -s "$D/peer.pid" ]; do
        [ $SECONDS -lt $deadline ] || { echo "nbdkit did not start: $(cat "$D/peer.err")" >&2; exit 1; }
        sleep 0.005
    done
}
start_peer
qemu_front qemu-peer "$D/peer.sock" ""
fio_start nbdkit "nbd+unix:///?socket=$D/qemu-peer.sock" "$((RESTARTS * 2 + 5))"
sleep 2
windows=()
for i in $(seq "$RESTARTS"); do
    t_kill=$(now_ms)
    kill -9 "$PEER_PID"; wait "$PEER_PID" 2>/dev/null || true
    rm -f "$D/peer.pid" "$D/peer.sock"
    start_peer
    t_served=$(now_ms)
    windows+=("$((t_kill - FIO_START)) $((t_served - FIO_START)) $((t_served - t_kill))")
    sleep 1.5
done
printf '%s\n' "${windows[@]}" >"$D/windows-nbdkit.txt"
fio_done nbdkit
echo "nbdkit $D/lat-nbdkit_clat.1.log $D/windows-nbdkit.txt" >>"$results"

# --- Part 2: the metadata server, with a short lease.
$BIN/sanvol-agent detach vol --control-socket "$D/agent.sock"
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
kill -9 "$MDS_PID"; wait "$MDS_PID" 2>/dev/null || true
mds_config "$LEASE_MS"
# A server started after kill -9 of the pool's active one (itself) acquires
# the pool lease once the dead holder's record stayed unchanged for 5 T and
# its own write stood for 4 T (T = lease_io_timeout_ms, default 1000 ms).
MDS_TAKEOVER_MS=9000
start_mds
start_agent "$STATE"
$BIN/sanvol-agent wait-ready --control-socket "$D/agent.sock"
URI=$($BIN/sanvol-agent attach vol --control-socket "$D/agent.sock")
resumed() { grep -c "handle resumed after reconnecting: unchanged" "$AGENT_LOG" || true; }
for down in $DOWNS_MS; do
    # fio runs through every restart: each costs the outage, the new server's
    # wait for the dead one's pool lease (MDS_TAKEOVER_MS), the agent's lease
    # at most, the resume and the second between restarts.
    fio_start "mds-$down" "$URI" $(( (RESTARTS * (down + MDS_TAKEOVER_MS + LEASE_MS + 2500)) / 1000 + 5 ))
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
            [ $SECONDS -lt $deadline ] || { echo "the agent did not resume: $(tail -5 "$AGENT_LOG")" >&2; exit 1; }
            sleep 0.02
        done
        t_resumed=$(now_ms)
        windows+=("$((t_kill - FIO_START)) $((t_resumed - FIO_START)) $((t_resumed - t_kill - down))")
        sleep 1
        echo "mds down ${down} ms: restart $i done" >&2
    done
    fio_done "mds-$down"
    printf '%s\n' "${windows[@]}" >"$D/windows-mds-$down.txt"
    echo "mds-$down $D/lat-mds-${down}_clat.1.log $D/windows-mds-$down.txt" >>"$results"
done
$BIN/sanvol-agent detach vol --control-socket "$D/agent.sock"

mkdir -p bench/results
out="bench/results/restart-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$RESTARTS" "$BASELINE_RESTARTS" "$LEASE_MS" >"$out" <<'PY'
import sys, statistics
restarts, baseline, lease = sys.argv[2], sys.argv[3], sys.argv[4]
what = {
    "agent-nostate": f"sanvol-agent, no state file (re-attach once the old handle ran out), {baseline}x, default lease",
    "agent": f"sanvol-agent, state file (resume), {restarts}x, default lease",
    "nbdkit": f"peer: nbdkit behind the same QEMU client, {restarts}x",
}
print("fio 4k randwrite QD1; kill -9 and start again. 'served' = kill -> serving again (agent: its log;"
      " mds: the agent resumed, minus the time the server was down); 'pause' = the slowest write around it\n")
print("| restart | served median (ms) | pause median (ms) | pause max (ms) | normal write p50 (ms) |")
print("|---|---:|---:|---:|---:|")
rows = {}
for line in open(sys.argv[1]):
    name, log, wins = line.split()
    lat = []  # (ms since fio start at completion, latency ms)
    for l in open(log):
        f = [x.strip() for x in l.split(",")]
        lat.append((int(f[0]), int(f[1]) / 1e6))
    pauses, served = [], []
    for w in open(wins):
        t_kill, t_back, s = map(int, w.split())
        # Writes in flight at some point between the kill and the moment it
        # was served again (fio's clock starts a little after ours: generous).
        inside = [ms for t, ms in lat if t >= t_kill - 200 and t - ms <= t_back + 200]
        pauses.append(max(inside) if inside else 0.0)
        served.append(s)
    p50 = statistics.median(ms for _, ms in lat)
    label = what.get(name) or f"sanvol-mds down {name.split('-')[1]} ms, lease {lease} ms, {restarts}x"
    rows[name] = (statistics.median(served), statistics.median(pauses))
    print(f"| {label} | {statistics.median(served):.0f} | {statistics.median(pauses):.1f} | {max(pauses):.1f} | {p50:.3f} |")
if "agent" in rows and "agent-nostate" in rows and "nbdkit" in rows:
    a, n, k = rows["agent"], rows["agent-nostate"], rows["nbdkit"]
    print(f"\nagent restart, state file vs none: served {n[0] / max(a[0], 1):.0f}x sooner, pause {n[1] / max(a[1], 1):.1f}x shorter;"
          f" pause vs the nbdkit peer behind the same QEMU client: {a[1] / max(k[1], 1):.2f}x")
PY
show_results "$out"
