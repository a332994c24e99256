# Shared helpers for the benchmark scripts (sourced, not run).
#
# Every peer is started here, with its PID recorded, and stopped by the EXIT
# trap — only processes this script started, by PID.

BENCH_PIDS=()
declare -A PID_OF=()  # name -> PID of what start_ready/start_nbdkit/start_agent started
BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sanvol-bench.XXXXXX")

bench_cleanup() {
    for pid in "${BENCH_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BENCH_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n ${BENCH_KEEP:-} ]]; then
        echo "logs kept in $BENCH_DIR" >&2
    else
        rm -rf "$BENCH_DIR"
    fi
}
trap bench_cleanup EXIT

# start_ready NAME CMD... : starts CMD in the background and waits until it
# prints its readiness line ("ready ..." from the examples, "listening on ..."
# from sanvol-mds, "serving snapshots on ..." from sanvol-backup serve).
start_ready() {
    local name=$1; shift
    local fifo="$BENCH_DIR/$name.ready"
    mkfifo "$fifo"
    "$@" >"$fifo" 2>"$BENCH_DIR/$name.err" &
    BENCH_PIDS+=($!)
    PID_OF[$name]=$!
    local line
    if ! read -r -t 30 line <"$fifo" || [[ $line != ready* && $line != listening* && $line != serving* ]]; then
        echo "$name did not become ready: $(cat "$BENCH_DIR/$name.err")" >&2
        exit 1
    fi
    # Keep draining its stdout so it never blocks on a full pipe.
    cat "$fifo" >/dev/null 2>&1 &
}

# start_nbdkit NAME ARGS... : nbdkit in the foreground on a unix socket; it
# writes its PID file only once it accepts connections, so wait for that.
start_nbdkit() {
    local name=$1; shift
    local pidfile="$BENCH_DIR/$name.pid"
    nbdkit -f -U "$BENCH_DIR/$name.sock" -P "$pidfile" "$@" 2>"$BENCH_DIR/$name.err" &
    BENCH_PIDS+=($!)
    PID_OF[$name]=$!
    local deadline=$((SECONDS + 30))
    until [ -s "$pidfile" ]; do
        [ $SECONDS -lt $deadline ] || { echo "nbdkit $name did not start: $(cat "$BENCH_DIR/$name.err")" >&2; exit 1; }
        kill -0 "${BENCH_PIDS[-1]}" 2>/dev/null || { echo "nbdkit $name exited: $(cat "$BENCH_DIR/$name.err")" >&2; exit 1; }
        sleep 0.05
    done
}

# host_facts : one line of what the figures depend on besides the code —
# CPUs, load, and how idle vCPUs wait: in a KVM guest whose idle vCPUs halt
# at once (guest_halt_poll_ns 0), every wake-up across vCPUs costs a halt
# exit, several times a QD1 request's own work (bench/README.md, "Idle
# vCPUs"). Printed under each script's tables.
host_facts() {
    local idle="" driver=/sys/devices/system/cpu/cpuidle/current_driver
    local poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
    [ -r "$driver" ] && idle=", cpuidle driver $(cat "$driver")"
    [ -r "$poll" ] && idle="$idle, guest_halt_poll_ns $(cat "$poll")"
    echo "host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)$idle, $(date -u +%FT%TZ)"
}

# show_results OUT : appends host_facts to the results file OUT, prints it
# and where it was saved (the end of every script that saves a table).
show_results() {
    { echo; host_facts; } >>"$1"
    cat "$1"
    echo "(saved to $1)"
}

sock_uri() { echo "nbd+unix:///?socket=$BENCH_DIR/$1.sock"; }

# fio_nbd URI RW BS DEPTH SIZE_MIB SECONDS : prints "iops mib_per_s"
# FIO_OFFSET_BYTES (env) starts the I/O there: runs straight on a pool device
# must stay off its label, metadata and lease areas.
fio_nbd() {
    local uri=$1 rw=$2 bs=$3 depth=$4 size=$5 secs=$6
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --offset="${FIO_OFFSET_BYTES:-0}" --size="${size}M" --time_based --runtime="$secs" --ramp_time=1 --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c "$FIO_JSON_TO_IOPS_MIB"
}

# cpu_ticks PID : user+system clock ticks of PID (all its threads) so far.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# fio_nbd_cpu PID URI RW BS DEPTH SIZE_MIB SECONDS : prints "iops mib_per_s cpu_us_per_io",
# the last being PID's CPU time (user+system, all threads) per request during the
# run. On a shared host CPU per request moves much less than IOPS, because it
# does not count time spent waiting for a core. The ramp second is included
# in the CPU, so the requests are estimated as iops * (SECONDS + 1).
fio_nbd_cpu() {
    local pid=$1; shift
    local t0 t1 r
    t0=$(cpu_ticks "$pid")
    r=$(fio_nbd "$@")
    t1=$(cpu_ticks "$pid")
    python3 -c 'import sys; iops, mib = map(float, sys.argv[1:3]); t, hz, secs = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print("%.0f %.1f %.1f" % (iops, mib, t * 1e6 / hz / max(iops * (secs + 1), 1)))' $r "$((t1 - t0))" "$(getconf CLK_TCK)" "$6"
}

# fio JSON on stdin -> "iops mib_per_s" of whichever side did I/O.
read -r -d '' FIO_JSON_TO_IOPS_MIB <<'PY' || true
import json, sys
text = sys.stdin.read()  # fio prints "fio: connected to NBD server" before the JSON
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print("%.0f %.1f" % (side["iops"], side["bw"] / 1024))
PY

# start_pool DEVICE... : a pool on the named nbdkit devices (started with
# start_nbdkit), with keys, sanvol-mds on a unix socket (plus the lines of
# $MDS_EXTRA in its mds.toml), and the admin
# environment (SANVOL_MDS, SANVOL_KEY, SANVOL_SERVER_KEY) exported.
# Needs BIN (the directory holding the release binaries).
start_pool() {
    local d=$BENCH_DIR dev uris=() init=()
    for dev in "$@"; do uris+=("\"$(sock_uri "$dev")\""); init+=(--device "$(sock_uri "$dev")"); done
    for k in mds admin; do "$BIN/sanvol" keygen "$d/$k.key" >/dev/null; done
    "$BIN/sanvol" pool init --name bench "${init[@]}" --server-key "$d/mds.key.pub" --admin-key "$d/admin.key.pub" >/dev/null
    local IFS=,
    # The pool lease's I/O timeout: the server's default unless told. 250 ms (used
    # before, for a quicker server start) lost the pool lease under the load of
    # a benchmark on the 2-core host, and the server then refused commits.
    printf 'listen = ["unix:%s/mds.sock"]\nkey = "%s/mds.key"\ndevices = [%s]\nlease_io_timeout_ms = %s\n' \
        "$d" "$d" "${uris[*]}" "${BENCH_LEASE_IO_TIMEOUT_MS:-1000}" >"$d/mds.toml"
    # More config lines from the caller (MDS_EXTRA, one per line).
    [ -z "${MDS_EXTRA:-}" ] || printf '%s\n' "$MDS_EXTRA" >>"$d/mds.toml"
    unset IFS
    start_ready mds "$BIN/sanvol-mds" --config "$d/mds.toml"
    export SANVOL_MDS="unix:$d/mds.sock" SANVOL_KEY="$d/admin.key" SANVOL_SERVER_KEY="$d/mds.key.pub"
}

# start_agent NAME [RUN-ARGS...] : a key for agent NAME, authorized, and
# `sanvol-agent run` with its control socket at $BENCH_DIR/agent-NAME.sock and
# exports in $BENCH_DIR/exports-NAME; returns once it is ready.
start_agent() {
    local name=$1 d=$BENCH_DIR; shift
    "$BIN/sanvol" keygen "$d/$name.key" >/dev/null
    "$BIN/sanvol" client add "$d/$name.key.pub" --role agent --name "bench-$name" >/dev/null
    mkdir -p "$d/exports-$name"
    "$BIN/sanvol-agent" run --mds "$SANVOL_MDS" --key "$d/$name.key" --server-key "$d/mds.key.pub" \
        --name "bench-$name" --control-socket "$d/agent-$name.sock" --export-dir "$d/exports-$name" \
        --state-dir "$d/state-$name" "$@" \
        2>"$d/agent-$name.err" &
    BENCH_PIDS+=($!)
    PID_OF[agent-$name]=$!
    "$BIN/sanvol-agent" wait-ready --control-socket "$d/agent-$name.sock"
}

# start_cached_pair WORK_MIB LOG_MIB : on the pool of start_pool, through agent
# a (started with --cache-dir), volume `vc` with a mirrored cache of LOG_MIB
# and `vw` without one (the write-through peer), WORK_MIB each, both attached
# exclusively; sets URI[mirrored] and URI[through]. Fails unless vc's cache
# is mirrored. Needs BIN.
start_cached_pair() {
    local work=$1 log=$2 state v
    for v in vc vw; do "$BIN/sanvol" volume create "$v" "${work}M" >/dev/null; done
    "$BIN/sanvol" volume cache vc --size "${log}M" >/dev/null
    declare -gA URI
    URI[mirrored]=$("$BIN/sanvol-agent" attach vc --mode exclusive --control-socket "$BENCH_DIR/agent-a.sock")
    URI[through]=$("$BIN/sanvol-agent" attach vw --mode exclusive --control-socket "$BENCH_DIR/agent-a.sock")
    state=$("$BIN/sanvol-agent" list --json --control-socket "$BENCH_DIR/agent-a.sock" |
        python3 -c 'import json, sys; print(next(v for v in json.load(sys.stdin) if v["volume"] == "vc")["cache"]["state"])')
    [ "$state" = mirrored ] || { echo "vc's cache is $state, not mirrored" >&2; exit 1; }
}
