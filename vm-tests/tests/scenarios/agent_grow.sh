# Scenario 4 (tests/sanvol_kernel.rs): the host grows the volume while its ext4 is mounted in the guest;
# the agent tells the kernel the new size (NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES) and an online
# resize2fs grows the filesystem. Environment: MDS_PORT, VOL_BYTES, GROWN_BYTES.
mnt=/mnt/vol
trap agent_log EXIT

step "start the agent and attach --kernel"
start_agent
dev=$(sanvol-agent attach vol --kernel) || fail "attach --kernel failed"
expect_eq "size before" "$(blockdev --getsize64 $dev)" "$VOL_BYTES"
mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
mount -t ext4 "$dev" "$mnt"
head -c 4194304 /dev/urandom > "$mnt/before"
sum=$(sha256sum < "$mnt/before")

step "grow on the host"
echo READY-TO-GROW
# The agent checks the volume's size once a second and reconfigures the device; the kernel
# announces the change ("detected capacity change"). Bounded wait.
i=0
while [ "$(blockdev --getsize64 $dev)" != "$GROWN_BYTES" ]; do
    i=$((i + 1))
    [ $i -le 120 ] || fail "the kernel still sees $(blockdev --getsize64 $dev) bytes, expected $GROWN_BYTES"
    sleep 0.5
done

step "resize2fs while mounted"
resize2fs "$dev"
blocks=$(df -k "$mnt" | tail -n 1 | awk '{print $2}')
[ "$blocks" -gt $((VOL_BYTES / 1024)) ] || fail "filesystem did not grow: $blocks KiB"
head -c 4194304 /dev/urandom > "$mnt/after"
expect_eq "old file" "$(sha256sum < "$mnt/before")" "$sum"
umount "$mnt"
e2fsck -fn "$dev" || fail "e2fsck found problems"
sanvol-agent detach vol
trap - EXIT
