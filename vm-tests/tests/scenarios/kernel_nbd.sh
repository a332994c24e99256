# Guest side of tests/kernel_nbd.rs: a real ext4 on /dev/nbd0, backed by an NBD export on the host.
# Environment: NBD_PORT (host port), EXPORT_BYTES (export size), PATTERN_SHA256 (sha256 of the
# pattern file, computed on the host).
dev=/dev/nbd0
mnt=/mnt/vol

step "connect $SANVOL_HOST:$NBD_PORT"
nbd-client "$SANVOL_HOST" "$NBD_PORT" "$dev" -b 4096 || fail "nbd-client could not connect to $SANVOL_HOST:$NBD_PORT"
expect_eq "size of $dev" "$(blockdev --getsize64 $dev)" "$EXPORT_BYTES"

step "mkfs.ext4"
mkfs.ext4 -q -F -L sanvol-vm "$dev"

step "mount and write"
mkdir -p "$mnt"
mount -t ext4 "$dev" "$mnt"
mkdir -p "$mnt/a/b/c" /tmp/src
# A pattern the host can compute (proves the bytes, not just self-consistency) ...
i=0; while [ $i -lt 4096 ]; do echo "sanvol line $i"; i=$((i + 1)); done > "$mnt/a/pattern.txt"
expect_eq "pattern sha256 (freshly written)" "$(sha256sum < "$mnt/a/pattern.txt" | cut -d' ' -f1)" "$PATTERN_SHA256"
# ... and random data of several sizes, checksummed before it goes anywhere near the filesystem.
for spec in 1:4096 2:1048576 3:7340032 4:16777216; do
    n=${spec%%:*}; size=${spec#*:}
    head -c "$size" /dev/urandom > /tmp/src/f$n
done
head -c 3145728 /dev/urandom > /tmp/src/deep
(cd /tmp/src && sha256sum f1 f2 f3 f4 deep) > /tmp/sums
cp /tmp/src/f1 /tmp/src/f2 /tmp/src/f3 /tmp/src/f4 "$mnt/"
cp /tmp/src/deep "$mnt/a/b/c/"
rm -rf /tmp/src
sync

step "unmount, drop caches, remount"
umount "$mnt"
blockdev --flushbufs "$dev"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$dev" "$mnt"

step "verify"
expect_eq "pattern sha256 (after remount)" "$(sha256sum < "$mnt/a/pattern.txt" | cut -d' ' -f1)" "$PATTERN_SHA256"
sed 's#  deep$#  a/b/c/deep#' /tmp/sums > /tmp/sums.fs
(cd "$mnt" && sha256sum -c /tmp/sums.fs) || fail "checksums differ after remount"
umount "$mnt"

step "e2fsck -fn"
e2fsck -fn "$dev" || fail "e2fsck -fn found problems (exit $?)"

step "disconnect"
nbd-client -d "$dev"
