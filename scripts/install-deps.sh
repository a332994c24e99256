#!/usr/bin/env bash
# Installs the system packages sanvol's build, tests and benchmarks use.
# Idempotent; needs root (or sudo) and Debian/Ubuntu's apt.
#   nbdkit, qemu-utils (qemu-nbd, qemu-img, qemu-io), nbd-server, libnbd-bin
#   (nbdinfo, nbdcopy): real NBD peers for the interop tests and benchmarks
#   fio: workload generator with an NBD engine and crc32c verification
#   jq: scripts/test-lanes.sh reads cargo's list of test binaries with it
#   libblkid-dev, libclang-dev, pkg-config: the blkid crate's bindings
#   busybox-static, nbd-client, e2fsprogs, xz-utils: the VM tests' guest userland
#   openssl: test certificates for NBD over TLS (nbdkit, qemu-nbd, our own)
#   systemd, man-db: systemd-analyze verify of contrib/systemd (it checks the
#   units' Documentation= man pages with man)
#   qemu-system-x86 (with a matching qemu-utils): the VM tests, via
#   vm-tests/install-deps.sh, which explains why it needs its own command
set -euo pipefail
packages=(nbdkit qemu-utils nbd-server libnbd-bin fio jq libblkid-dev libclang-dev pkg-config busybox-static nbd-client e2fsprogs xz-utils openssl systemd man-db)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
# Before any test runs: it may replace qemu-utils with the matching version.
"$(dirname "$0")/../vm-tests/install-deps.sh"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
