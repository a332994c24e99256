#!/usr/bin/env bash
# The cost of fencing (issue 14), as users see it: fio through sanvol-agent
# on a pool whose device is served by sanvol-target (the agent's per-handle
# connections present capabilities; every request is checked against its
# connection's capability and its holder's generation) vs fio through
# sanvol-agent on a pool whose device is `nbdkit file`. Each pool has one
# device over its own sparse file of the same size on the same filesystem,
# its own sanvol-mds and its own agent; both run at once and every row runs
# on both, back to back (the order alternates from row to row).
#
# The device-only cost is printed beside it: fio's nbd engine straight to
# each device (sanvol-target with the server's capability from
# `target-server`'s `examples/mint_capability`), at the offset where the
# volume's data starts, so the same device addresses are reached.
#
# Usage: bench/target.sh   (env: BENCH_SECONDS=5 per row, BENCH_SIZE_MIB=1024 per device, BENCH_ROWS=all,
#                           BENCH_TARGET_ARGS="--connection-threads 0": more sanvol-target options)
# Prints a markdown table with the ratios; also saved under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-5}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
VOLUME_MIB=$((SIZE_MIB / 2))
WORK_MIB=$((VOLUME_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
cargo build --release -q -p target-server --example mint_capability
BIN=target/release
source bench/lib.sh
D=$BENCH_DIR

# start_bench_pool P DEVICE_URI [INIT-ARGS...] : keys, `pool init`, sanvol-mds
# and an authorized agent for pool P, all under $D/P.
start_bench_pool() {
    local p=$1 uri=$2; shift 2
    local d=$D/$p
    "$BIN/sanvol" pool init --name "bench-$p" --device "$uri" --server-key "$d/mds.key.pub" \
        --admin-key "$d/admin.key.pub" "$@" >/dev/null
    printf 'listen = ["unix:%s/mds.sock"]\nkey = "%s/mds.key"\ndevices = ["%s"]\nlease_io_timeout_ms = %s\n' \
        "$d" "$d" "$uri" "${BENCH_LEASE_IO_TIMEOUT_MS:-1000}" >"$d/mds.toml"
    start_ready "mds-$p" "$BIN/sanvol-mds" --config "$d/mds.toml"
    "$BIN/sanvol" keygen "$d/agent.key" >/dev/null
    admin "$p" client add "$d/agent.key.pub" --role agent --name "bench-$p" >/dev/null
    "$BIN/sanvol-agent" run --mds "unix:$d/mds.sock" --key "$d/agent.key" --server-key "$d/mds.key.pub" \
        --name "bench-$p" --control-socket "$d/agent.sock" --export-dir "$d/exports" --state-dir "$d/state" \
        2>"$D/agent-$p.err" &
    BENCH_PIDS+=($!)
    PID_OF[agent-$p]=$!
    "$BIN/sanvol-agent" wait-ready --control-socket "$d/agent.sock"
}

# admin P ARGS... : the admin CLI of pool P.
admin() {
    local d=$D/$1; shift
    SANVOL_MDS="unix:$d/mds.sock" SANVOL_KEY="$d/admin.key" SANVOL_SERVER_KEY="$d/mds.key.pub" "$BIN/sanvol" "$@"
}

for p in target nbdkit; do
    mkdir -p "$D/$p/exports"
    for k in mds admin; do "$BIN/sanvol" keygen "$D/$p/$k.key" >/dev/null; done
    truncate -s "${SIZE_MIB}M" "$D/$p/disk.img"
done
# BENCH_TARGET_ARGS: more sanvol-target options, e.g. "--connection-threads 0" (its async path).
# shellcheck disable=SC2086
start_ready dev-target "$BIN/sanvol-target" ${BENCH_TARGET_ARGS:-} --device "$D/target/disk.img" --unix "$D/dev-target.sock" \
    --server-key "$D/target/mds.key.pub" --state-dir "$D/target/target-state" --log warn
start_nbdkit dev-nbdkit file "$D/nbdkit/disk.img"
start_bench_pool target "$(sock_uri dev-target)" --server-signing-key "$D/target/mds.key"
start_bench_pool nbdkit "$(sock_uri dev-nbdkit)"

declare -A URI OFFSET HOP
for p in target nbdkit; do
    admin "$p" volume create vol "${VOLUME_MIB}M" >/dev/null
    URI[agent-$p]=$("$BIN/sanvol-agent" attach vol --control-socket "$D/$p/agent.sock")
    OFFSET[agent-$p]=0
    HOP[agent-$p]=${PID_OF[agent-$p]}
    OFFSET[device-$p]=$(admin "$p" volume show vol --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["description"]["extents"][0]["legs"][0]["offset"])')
    HOP[device-$p]=${PID_OF[dev-$p]}
done
URI[device-target]=$("$BIN/examples/mint_capability" "$D/dev-target.sock" "$D/target/mds.key")
URI[device-nbdkit]=$(sock_uri dev-nbdkit)

ROWS=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1m 8"
    "1m-write-qd8 write 1m 8"
)
# BENCH_ROWS="NAME ..." runs only those rows, with all their peers (to re-run a noisy row).
if [ -n "${BENCH_ROWS:-}" ]; then
    mapfile -t ROWS < <(for r in "${ROWS[@]}"; do [[ " $BENCH_ROWS " == *" ${r%% *} "* ]] && echo "$r"; done)
fi

# Fill the volumes' working sets once, so reads move real data.
for p in target nbdkit; do
    fio_nbd "${URI[agent-$p]}" write 1m 8 "$WORK_MIB" 1 >/dev/null
done

results="$D/results.txt"
order=(target nbdkit)
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    for path in agent device; do
        for p in "${order[@]}"; do
            r=$(FIO_OFFSET_BYTES=${OFFSET[$path-$p]} fio_nbd_cpu "${HOP[$path-$p]}" "${URI[$path-$p]}" \
                "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")
            echo "$name $path-$p $r" >>"$results"
        done
    done
    order=("${order[1]}" "${order[0]}")
    echo "done: $name" >&2
done

mkdir -p bench/results
out="bench/results/target-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, who, iops, mib, cpu = line.split()
    rows.setdefault(name, {})[who] = (float(iops), float(mib), cpu)
print(f"fio nbd engine, unix sockets, one sparse-file device per pool, {sys.argv[2]} s per row, "
      f"{sys.argv[3]} cores, load average at the end {sys.argv[4]}\n")
print("| row | agent on sanvol-target IOPS | agent on nbdkit file IOPS | ratio | MiB/s (target / nbdkit) "
      "| device only: sanvol-target / nbdkit file IOPS | ratio | CPU µs/request agent (target / nbdkit) "
      "| CPU µs/request device (target / nbdkit) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    at, an, dt, dn = r["agent-target"], r["agent-nbdkit"], r["device-target"], r["device-nbdkit"]
    print(f"| {name} | {at[0]:.0f} | {an[0]:.0f} | {at[0]/an[0]:.2f} | {at[1]:.1f} / {an[1]:.1f} "
          f"| {dt[0]:.0f} / {dn[0]:.0f} | {dt[0]/dn[0]:.2f} | {at[2]} / {an[2]} | {dt[2]} / {dn[2]} |")
PY
show_results "$out"
for p in target nbdkit; do
    "$BIN/sanvol-agent" detach vol --control-socket "$D/$p/agent.sock" || echo "warning: detaching on $p failed" >&2
done
