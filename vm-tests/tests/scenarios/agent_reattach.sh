# Scenario 2 (tests/sanvol_kernel.rs): kill -9 the agent while a writer runs in the mounted ext4, start
# it again, everything with default settings (the server's lease 10 s and durable time 30 s, the
# agent's kernel timeouts). The new agent takes its handle back from its state file (a resume, not a
# re-open that would wait 40 s for the dead agent's handle), finds /dev/nbd0 carrying the volume's
# backend identifier and gives it new sockets. The writer sees a pause, no I/O error; every file
# verifies; fsck is clean. Environment: MDS_PORT.
mnt=/mnt/vol
trap agent_log EXIT
AGENT_ARGS=""

step "start the agent, attach --kernel, mkfs, mount"
start_agent $AGENT_ARGS
dev=$(sanvol-agent attach vol --kernel) || fail "attach --kernel failed"
mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
mount -t ext4 "$dev" "$mnt"
mkdir -p "$mnt/w"

step "writer runs"
# Each file: random data checksummed before it is written, then written and synced (so its I/O
# reaches the device while the agent is dead). Any failed command ends the writer with status 1.
(
    set -e
    i=0
    while [ $i -lt 48 ]; do
        head -c 262144 /dev/urandom > /tmp/w.$i
        sum=$(sha256sum < /tmp/w.$i | cut -d' ' -f1)
        cp /tmp/w.$i "$mnt/w/$i"
        sync "$mnt/w/$i" 2>/dev/null || sync
        echo "$sum  $i" >> /tmp/wsums
        rm /tmp/w.$i
        [ $i -eq 8 ] && echo > /tmp/writer-going
        i=$((i + 1))
    done
) > /tmp/writer.log 2>&1 &
WRITER=$!
n=0
while [ ! -e /tmp/writer-going ]; do
    n=$((n + 1)); [ $n -le 600 ] || fail "the writer did not get going"
    kill -0 $WRITER 2>/dev/null || fail "the writer died early: $(cat /tmp/writer.log)"
    sleep 0.1
done

step "kill -9 the agent"
handle=$(sanvol-agent list --json | sed -n 's/.*"handle": *\([0-9]*\).*/\1/p' | head -n1)
touch /tmp/killed
kill -9 "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
echo "agent killed at $(stat -c %y /tmp/killed) (handle $handle)"

step "start the agent again"
# Started at once, without `wait-ready`, and watched at a slow pace: the guest has one emulated CPU,
# and polling processes would take it from the agent whose restart is measured. The time is the
# agent's own log stamp of the moment /dev/nbd0 has its new socket, minus the kill's (both the
# guest's wall clock).
launch_agent $AGENT_ARGS
n=0
until grep -q "took back volume vol (handle $handle): /dev/nbd0" "$AGENT_LOG"; do
    n=$((n + 1)); [ $n -le 300 ] || fail "the new agent did not take /dev/nbd0 back: $(tail -n 20 "$AGENT_LOG")"
    kill -0 "$AGENT_PID" 2>/dev/null || fail "the new agent exited: $(tail -n 20 "$AGENT_LOG")"
    sleep 0.2
done
served_line=$(grep "took back volume vol (handle $handle): /dev/nbd0" "$AGENT_LOG" | tail -n 1)
echo "reattached: $served_line"
# Not by waiting out the dead agent's handle (lease + durable time, 40 s): well inside the lease.
resume_ms=$(awk -v a="$(seconds_of_day "$(stat -c %y /tmp/killed)")" -v b="$(seconds_of_day "$served_line")" \
    'BEGIN { d = b - a; if (d < 0) d += 86400; printf "%d", d * 1000 }')
echo "RESUMED-AFTER-MS $resume_ms"
[ "$resume_ms" -lt 10000 ] || fail "the new agent took $resume_ms ms: it waited for its old handle"
sanvol-agent list | grep -q "kernel device /dev/nbd0" || fail "not listed: $(sanvol-agent list)"

step "writer finishes without an error"
wait $WRITER || fail "the writer saw an error: $(tail -n 5 /tmp/writer.log)"
expect_eq "files written" "$(wc -l < /tmp/wsums)" 48

step "verify after remount, fsck"
umount "$mnt"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$dev" "$mnt"
(cd "$mnt/w" && sha256sum -c -s /tmp/wsums) || fail "checksums differ"
umount "$mnt"
e2fsck -fn "$dev" || fail "e2fsck found problems"
dmesg | grep -i "nbd0" | tail -n 8 || true
sanvol-agent detach vol
trap - EXIT
