#!/usr/bin/env bash
# Protected-channel benchmark (issue 16): what encrypting or authenticating
# every byte of the server's channels costs, against the previous, plain
# protocol, in the same run.
#
# Three stacks, one after the other, each on one nbdkit memory device:
#   plain      the binaries of the last protocol without protected channels
#              (protocol 2: nothing after the handshake is protected)
#   integrity  this tree, SANVOL_CHANNEL_MODE=integrity (HMAC-SHA256 records)
#   encrypted  this tree, SANVOL_CHANNEL_MODE=encrypted (AES-GCM records)
# and in each:
#   fallback   fio -> agent B export -> data channel -> sanvol-mds -> device
#              (agent B's direct path is cut, as in bench/fallback.sh)
#   backup     fio -> sanvol-backup serve -> backup channel -> the backup
#              pseudo-device in sanvol-mds -> device (reading a snapshot)
# Reported: MiB/s or IOPS per mode, sanvol-mds CPU per request (where both
# ends of the server's side of each channel run), and each protected mode as
# a ratio to plain.
#
# Usage: bench/channels.sh
#   env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=1024 (device size),
#        PLAIN_BIN=DIR (binaries of the plain protocol; default: build
#        PLAIN_REV, the parent of the protocol-3 commit, once, into
#        target/bench-plain-REV)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
VOLUME_MIB=$((SIZE_MIB / 4))
WORK_MIB=$((VOLUME_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q --bins
NEW_BIN=$PWD/target/release

if [ -z "${PLAIN_BIN:-}" ]; then
    first=$(git log --format=%H --grep='^control protocol 3: protected channels' | tail -1)
    [ -n "$first" ] || { echo "cannot find the protocol-3 commit; set PLAIN_BIN or PLAIN_REV" >&2; exit 1; }
    PLAIN_REV=${PLAIN_REV:-$(git rev-parse "$first^")}
    PLAIN_TARGET=$PWD/target/bench-plain-${PLAIN_REV:0:12}
    if [ ! -x "$PLAIN_TARGET/release/sanvol-mds" ]; then
        src=$(mktemp -d /tmp/sanvol-plain-src.XXXXXX)
        git worktree add -q --detach "$src" "$PLAIN_REV"
        echo "building the plain protocol's binaries ($PLAIN_REV) into $PLAIN_TARGET" >&2
        (cd "$src" && CARGO_TARGET_DIR="$PLAIN_TARGET" cargo build --release -q --bins)
        git worktree remove --force "$src"
    fi
    PLAIN_BIN=$PLAIN_TARGET/release
fi

source bench/lib.sh
ROOT=$BENCH_DIR
results="$ROOT/results.txt"

# Stops what the previous stack started (by PID) so the next one starts clean.
stop_stack() {
    for pid in "${BENCH_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BENCH_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    BENCH_PIDS=()
}

run_mode() {
    local mode=$1
    BIN=$2
    BENCH_DIR=$ROOT/$mode
    mkdir -p "$BENCH_DIR"
    local D=$BENCH_DIR
    if [ "$mode" = plain ]; then unset SANVOL_CHANNEL_MODE; else export SANVOL_CHANNEL_MODE=$mode; fi

    start_nbdkit dev0 memory "${SIZE_MIB}M"
    start_nbdkit hop nbd socket="$D/dev0.sock"
    local hop=${PID_OF[hop]}
    start_pool dev0
    local mds=${PID_OF[mds]}
    "$BIN/sanvol" volume create vol "${VOLUME_MIB}M" >/dev/null
    start_agent a
    start_agent b --device-uri "$(sock_uri dev0)=$(sock_uri hop)"
    local uri_a uri_b
    uri_a=$("$BIN/sanvol-agent" attach vol --mode shared --control-socket "$D/agent-a.sock")
    uri_b=$("$BIN/sanvol-agent" attach vol --mode shared --control-socket "$D/agent-b.sock")
    kill -KILL "$hop"
    wait "$hop" 2>/dev/null || true
    fio_nbd "$uri_a" write 1m 8 "$WORK_MIB" 1 >/dev/null   # fill the working set (direct)
    fio_nbd "$uri_b" write 1m 8 "$WORK_MIB" 1 >/dev/null   # B fails over on its first request
    if ! "$BIN/sanvol" client list --json |
        python3 -c 'import json,sys; sys.exit(not any(c["name"] == "bench-b" and c["fallback"] for c in json.load(sys.stdin)))'; then
        echo "$mode: agent B is not on fallback" >&2
        exit 1
    fi
    for row in "1m-read-qd8 read 1m 8" "1m-write-qd8 write 1m 8" "4k-randread-qd32 randread 4k 32"; do
        read -r name rw bs depth <<<"$row"
        echo "fallback-$name $mode $(fio_nbd_cpu "$mds" "$uri_b" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
    done

    # The backup pseudo-device: a snapshot read through sanvol-backup serve.
    "$BIN/sanvol" snapshot create vol s >/dev/null
    start_ready bridge "$BIN/sanvol-backup" serve --socket "$D/snapshots.sock"
    local snap="nbd+unix:///vol@s?socket=$D/snapshots.sock"
    for row in "1m-read-qd8 read 1m 8" "4k-randread-qd32 randread 4k 32"; do
        read -r name rw bs depth <<<"$row"
        echo "backup-$name $mode $(fio_nbd_cpu "$mds" "$snap" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
    done
    for a in a b; do "$BIN/sanvol-agent" detach vol --control-socket "$D/agent-$a.sock" >/dev/null; done
    stop_stack
    echo "done: $mode" >&2
}

run_mode plain "$PLAIN_BIN"
run_mode integrity "$NEW_BIN"
run_mode encrypted "$NEW_BIN"
BENCH_DIR=$ROOT   # the EXIT trap removes everything under it

mkdir -p bench/results
out="bench/results/channels-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" "$(nproc)" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, mode, iops, mib, cpu = line.split()
    rows.setdefault(name, {})[mode] = (float(iops), float(mib), float(cpu))
print(f"fio nbd engine, unix sockets, one nbdkit memory device, {sys.argv[2]} s per row, {sys.argv[3]} cores;")
print("plain = the previous protocol (nothing protected after the handshake). sanvol-mds CPU is per request,")
print("user+system, all threads.\n")
print("| row | plain | integrity | encrypted | integrity / plain | encrypted / plain | mds CPU µs/req plain / integrity / encrypted |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    unit, col = ("IOPS", 0) if "4k" in name else ("MiB/s", 1)
    p, i, e = r["plain"], r["integrity"], r["encrypted"]
    print(f"| {name} ({unit}) | {p[col]:.0f} | {i[col]:.0f} | {e[col]:.0f} | {i[col]/p[col]:.2f} | {e[col]/p[col]:.2f} "
          f"| {p[2]:.1f} / {i[2]:.1f} / {e[2]:.1f} |")
PY
show_results "$out"
