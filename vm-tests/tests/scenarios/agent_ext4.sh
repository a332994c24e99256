# Scenario 1 (tests/sanvol_kernel.rs): the agent attaches a pool volume as /dev/nbd0; a real ext4 on it
# survives unmount + drop caches + remount with every checksum intact, and fsck is clean.
# Environment: MDS_PORT, VOL_BYTES.
mnt=/mnt/vol
trap agent_log EXIT

step "start the agent"
start_agent

step "attach --kernel"
dev=$(sanvol-agent attach vol --kernel) || fail "sanvol-agent attach vol --kernel failed"
expect_eq "device" "$dev" /dev/nbd0
expect_eq "size of $dev" "$(blockdev --getsize64 $dev)" "$VOL_BYTES"
case "$(cat /sys/block/nbd0/backend)" in
    sanvol:*:exclusive:*:vol) ;;
    *) fail "backend identifier: $(cat /sys/block/nbd0/backend)" ;;
esac
sanvol-agent list | grep -q "kernel device /dev/nbd0" || fail "list does not show /dev/nbd0: $(sanvol-agent list)"
# A second kernel attach of the same volume is refused.
if sanvol-agent attach vol --kernel 2>/tmp/err; then fail "a second attach succeeded"; fi

step "mkfs.ext4"
mkfs.ext4 -q -F -L sanvol-agent "$dev"

step "mount and write"
mkdir -p "$mnt" /tmp/src
mount -t ext4 "$dev" "$mnt"
for spec in 1:4096 2:1048576 3:5242880 4:9437184; do
    n=${spec%%:*}; size=${spec#*:}
    head -c "$size" /dev/urandom > /tmp/src/f$n
done
(cd /tmp/src && sha256sum f1 f2 f3 f4) > /tmp/sums
mkdir -p "$mnt/d"
cp /tmp/src/f1 /tmp/src/f2 /tmp/src/f3 /tmp/src/f4 "$mnt/d/"
rm -rf /tmp/src

step "unmount, drop caches, remount, verify"
umount "$mnt"
sync
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$dev" "$mnt"
(cd "$mnt/d" && sha256sum -c /tmp/sums) || fail "checksums differ after remount"
umount "$mnt"

step "e2fsck -fn"
e2fsck -fn "$dev" || fail "e2fsck found problems"

step "detach"
sanvol-agent detach vol || fail "detach failed"
expect_eq "size of $dev after detach" "$(cat /sys/block/nbd0/size)" 0
sanvol-agent list | grep -q "no volumes attached" || fail "still listed: $(sanvol-agent list)"
kill "$AGENT_PID"
wait "$AGENT_PID" || true
trap - EXIT
