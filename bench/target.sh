#!/usr/bin/env bash
# The cost of fencing at the device (issue 14): fio's nbd engine (libnbd)
# against sanvol-target (every request checked against the connection's
# capability and its holder's generation) vs `nbdkit file`, each serving its
# own sparse file of the same size on the same filesystem, unix sockets,
# same matrix, same run.
#
# Usage: bench/target.sh   (env: BENCH_SECONDS=10 per row, BENCH_SIZE_MIB=1024, BENCH_ROWS=all)
# Prints a markdown table with the ratios; also saved under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
WORK_MIB=$((SIZE_MIB / 2))

scripts/install-deps.sh >/dev/null
cargo build --release -q -p target-server --bin sanvol-target --example mint_capability
cargo build --release -q -p metadata-server --bin sanvol
BIN=target/release
source bench/lib.sh

"$BIN/sanvol" keygen "$BENCH_DIR/mds.key" >/dev/null
truncate -s "${SIZE_MIB}M" "$BENCH_DIR/target.img" "$BENCH_DIR/nbdkit.img"
start_ready target "$BIN/sanvol-target" --device "$BENCH_DIR/target.img" --unix "$BENCH_DIR/target.sock" \
    --server-key "$BENCH_DIR/mds.key.pub" --state-dir "$BENCH_DIR/target-state" --log warn
start_nbdkit nbdkit file "$BENCH_DIR/nbdkit.img"
TARGET_URI=$("$BIN/examples/mint_capability" "$BENCH_DIR/target.sock" "$BENCH_DIR/mds.key")

ROWS=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1m 8"
    "1m-write-qd8 write 1m 8"
)
if [ -n "${BENCH_ROWS:-}" ]; then
    mapfile -t ROWS < <(for r in "${ROWS[@]}"; do [[ " $BENCH_ROWS " == *" ${r%% *} "* ]] && echo "$r"; done)
fi

uri_of() { case $1 in target) echo "$TARGET_URI" ;; nbdkit) sock_uri nbdkit ;; esac; }

# Fill the working set once on both so reads move real data.
for s in target nbdkit; do
    fio_nbd "$(uri_of $s)" write 1m 8 "$WORK_MIB" 1 >/dev/null
done

results="$BENCH_DIR/results.txt"
for row in "${ROWS[@]}"; do
    read -r name rw bs depth <<<"$row"
    for s in target nbdkit; do
        echo "$name $s $(fio_nbd_cpu "${PID_OF[$s]}" "$(uri_of $s)" "$rw" "$bs" "$depth" "$WORK_MIB" "$SECS")" >>"$results"
    done
    echo "done: $name" >&2
done

mkdir -p bench/results
out="bench/results/target-$(date +%Y%m%d-%H%M%S).md"
python3 - "$results" "$SECS" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, who, iops, mib, cpu = line.split()
    rows.setdefault(name, {})[who] = (float(iops), float(mib), cpu)
print(f"fio nbd engine, unix socket, sparse files on the same filesystem, {sys.argv[2]} s per row\n")
print("| row | sanvol-target IOPS | nbdkit file IOPS | sanvol-target MiB/s | ratio | CPU µs/request: sanvol-target / nbdkit |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    t, n = r["target"], r["nbdkit"]
    print(f"| {name} | {t[0]:.0f} | {n[0]:.0f} | {t[1]:.1f} | {t[0]/n[0]:.2f} | {t[2]} / {n[2]} |")
PY
cat "$out"
echo "(saved to $out)"
