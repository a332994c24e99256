# Scenario 2 (tests/sanvol_kernel.rs): kill -9 the agent while a writer runs in the mounted ext4, start
# it again; the new agent finds /dev/nbd0 by its backend identifier, re-opens the volume and gives the
# device new sockets. The writer sees a pause, no I/O error; every file verifies; fsck is clean.
# Environment: MDS_PORT.
mnt=/mnt/vol
trap agent_log EXIT
# A short request timeout moves requests that were in flight on the dead agent's socket to the new
# one quickly; the dead-connection timeout (the reattach window) is well above the lease (2 s).
AGENT_ARGS="--nbd-timeout-secs 5 --nbd-dead-conn-timeout-secs 90"

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
kill -9 "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
echo "agent killed at $(cut -d' ' -f1 /proc/uptime)"

step "start the agent again"
start_agent $AGENT_ARGS
n=0
until sanvol-agent list | grep -q "kernel device /dev/nbd0"; do
    n=$((n + 1)); [ $n -le 300 ] || fail "the new agent did not reattach /dev/nbd0: $(sanvol-agent list)"
    sleep 0.2
done
echo "reattached at $(cut -d' ' -f1 /proc/uptime)"

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
