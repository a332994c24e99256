# Scenario 5 (tests/sanvol_kernel.rs), issue 18: a volume attached with `attach --kernel --persist`
# comes back on the same /dev/nbdX after a clean stop (SIGTERM) and a start with the same config
# file, with its data; `detach --persist` removes the entry. Environment: MDS_PORT, VOL_BYTES.
trap agent_log EXIT
config=/etc/sanvol/agent.toml
size=4194304

step "start the agent with a config file"
printf '# the guest agent\nnbd_timeout_secs = 30\n' > "$config"
start_agent --config "$config"

step "attach --kernel --nbd-device /dev/nbd2 --persist"
dev=$(sanvol-agent attach vol --kernel --nbd-device /dev/nbd2 --persist) || fail "attach --persist failed"
expect_eq "device" "$dev" /dev/nbd2
grep -q 'nbd_device = "/dev/nbd2"' "$config" || fail "the entry lacks the device: $(cat "$config")"
grep -q '^# the guest agent' "$config" || fail "the config file lost its comment: $(cat "$config")"

step "write through $dev"
head -c "$size" /dev/urandom > /tmp/data
sum=$(sha256sum < /tmp/data)
dd if=/tmp/data of="$dev" bs=1048576 conv=fsync 2>/dev/null || fail "writing $dev failed"

step "clean stop (SIGTERM: flush and detach)"
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || fail "the agent did not exit cleanly after SIGTERM"

step "start again with the same config"
start_agent --config "$config"
sanvol-agent list | grep -q "kernel device /dev/nbd2" || fail "not back on /dev/nbd2: $(sanvol-agent list)"
expect_eq "size of $dev" "$(blockdev --getsize64 "$dev")" "$VOL_BYTES"
grep -q "persisted volume attached" "$AGENT_LOG" || fail "the log does not say the persisted volume was attached"
echo 3 > /proc/sys/vm/drop_caches
expect_eq "data read back from $dev" "$(head -c "$size" "$dev" | sha256sum)" "$sum"

step "detach --persist"
sanvol-agent detach vol --persist || fail "detach --persist failed"
if grep -q 'name = "vol"' "$config"; then fail "still persisted: $(cat "$config")"; fi
expect_eq "size of $dev after detach" "$(cat /sys/block/nbd2/size)" 0
kill "$AGENT_PID"
wait "$AGENT_PID" || true
trap - EXIT
