#!/usr/bin/env bash
# Runs every test that `cargo test --workspace` runs, several test binaries
# at a time (TEST_LANES, default 3), the slowest first.
#
# Why: most of the suite's time is the process tests waiting on real
# servers (lease expiry, fio runs, VM boots), one binary after the other.
# Run by `cargo test --workspace` they took 26 of CI's 30 minutes on a
# 2-core host while the CPU sat half idle; in three lanes they take 9-10
# (560 s on 2026-12-06, each binary at most a fifth slower than alone; the
# whole fresh-clone CI 16m53s). Each binary still runs its own
# tests with libtest's default threads, exactly as cargo would run it: from
# its package's directory, with CARGO_MANIFEST_DIR set. Tests never share
# ports, directories or processes (each takes port 0 and its own temporary
# directory), so binaries may run side by side as their tests already do.
#
# A binary's output is printed whole when it ends (lines of two binaries
# never mix), then a table of every binary's time and result. Exits non-zero
# if any binary failed. TEST_LANES=1 runs them one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
lanes="${TEST_LANES:-3}"
command -v jq >/dev/null || { echo "test-lanes: jq not found (scripts/install-deps.sh installs it)" >&2; exit 1; }

# The binaries that took longest in CI, started first so that no long one
# starts last (longest-first keeps the lanes even). A binary not named here
# runs after them; a stale name only costs balance.
slowest_first=(cache admin snapshots availability sanvol_kernel handles fallback kernel_nbd stack recovery seeds
    restart target secure_channels new_space operations locks intent server_concurrent_proptest tls_devices)

work="$(mktemp -d /tmp/sanvol-test-lanes.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# One line per test binary: executable, package directory, a label
# (package folder/target (kind)), target name.
cargo test --workspace --no-run --message-format=json |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
           | [.executable, (.manifest_path | sub("/Cargo.toml$"; "")), "\(.manifest_path | sub("/Cargo.toml$"; "") | sub(".*/"; ""))/\(.target.name) (\(.target.kind | join(",")))", .target.name]
           | @tsv' >"$work/all"
[ -s "$work/all" ] || { echo "test-lanes: cargo listed no test binaries" >&2; exit 1; }
: >"$work/queue"
for name in "${slowest_first[@]}"; do
    awk -F'\t' -v n="$name" '$4 == n' "$work/all" >>"$work/queue"
done
awk -F'\t' 'NR == FNR { first[$1] = 1; next } !($1 in first)' "$work/queue" "$work/all" >>"$work/queue"
total=$(wc -l <"$work/queue")
echo "test-lanes: $total test binaries and the doc tests in $lanes lanes"

declare -A label_of log_of started_at
failed=()
running=0
summary="$work/summary"
: >"$summary"

start() { # label log command...
    local label="$1" log="$2"
    shift 2
    "$@" >"$log" 2>&1 &
    label_of[$!]="$label"
    log_of[$!]="$log"
    started_at[$!]=$SECONDS
    running=$((running + 1))
}

reap() {
    local pid="" rc=0
    wait -n -p pid || rc=$?
    [ -n "$pid" ] || return 0
    local label="${label_of[$pid]}" secs=$((SECONDS - started_at[$pid]))
    echo
    echo "==== $label: exit $rc after ${secs} s ===="
    cat "${log_of[$pid]}"
    printf '%6d s  exit %-3d %s\n' "$secs" "$rc" "$label" >>"$summary"
    [ "$rc" = 0 ] || failed+=("$label")
    unset "label_of[$pid]" "log_of[$pid]" "started_at[$pid]"
    running=$((running - 1))
}

run_binary() { # executable package-dir
    cd "$2" && CARGO_MANIFEST_DIR="$2" exec "$1"
}

i=0
while IFS=$'\t' read -r exe dir label _; do
    while [ "$running" -ge "$lanes" ]; do reap; done
    i=$((i + 1))
    start "$label" "$work/$i.log" run_binary "$exe" "$dir"
done <"$work/queue"
while [ "$running" -ge "$lanes" ]; do reap; done
start "doc tests (cargo test --workspace --doc)" "$work/doc.log" cargo test --workspace --doc
while [ "$running" -gt 0 ]; do reap; done

echo
echo "---- test binaries by time (test-lanes.sh, $lanes lanes, ${SECONDS} s in all) ----"
sort -rn "$summary"
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-lanes: failed: ${failed[*]}" >&2
    exit 1
fi
