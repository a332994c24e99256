# Scenario 3 (tests/sanvol_kernel.rs): the guest's direct path to one device runs through a proxy on
# the host, which the test cuts while the ext4 is mounted; the MDS still reaches that device, so the
# agent sends its I/O through the server. The filesystem keeps working and verifies afterwards.
# Environment: MDS_PORT, GO_PORT, DEVICE_URIS (the agent's --device-uri arguments).
mnt=/mnt/vol
trap agent_log EXIT
wait_host() { nc "$SANVOL_HOST" "$GO_PORT" </dev/null >/dev/null || fail "waiting for the host failed"; }

step "start the agent (direct paths via the host), attach --kernel, write"
start_agent
dev=$(sanvol-agent attach vol --kernel) || fail "attach --kernel failed"
mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
mount -t ext4 "$dev" "$mnt"
mkdir -p "$mnt/a" "$mnt/b"
i=0
while [ $i -lt 12 ]; do
    head -c 524288 /dev/urandom > /tmp/f; echo "$(sha256sum < /tmp/f | cut -d' ' -f1)  a/$i" >> /tmp/sums
    cp /tmp/f "$mnt/a/$i"; i=$((i + 1))
done
sync

step "the host cuts the direct path to one device"
grep -E "connected to device|fallback|DEVICE" "$AGENT_LOG" | cut -c1-220 || true
echo "DEVICE_URIS=$DEVICE_URIS"
echo READY-TO-CUT
wait_host

step "write while cut (through the metadata server)"
i=0
while [ $i -lt 12 ]; do
    head -c 524288 /dev/urandom > /tmp/f; echo "$(sha256sum < /tmp/f | cut -d' ' -f1)  b/$i" >> /tmp/sums
    cp /tmp/f "$mnt/b/$i"; i=$((i + 1))
done
sync
echo 3 > /proc/sys/vm/drop_caches
(cd "$mnt" && sha256sum -c -s /tmp/sums) || fail "checksums differ while cut"
echo CUT-WRITES-DONE
wait_host

step "remount, verify, fsck (still cut)"
umount "$mnt"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$dev" "$mnt"
(cd "$mnt" && sha256sum -c -s /tmp/sums) || fail "checksums differ after remount"
umount "$mnt"
e2fsck -fn "$dev" || fail "e2fsck found problems"
sanvol-agent detach vol
trap - EXIT
