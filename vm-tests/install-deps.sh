#!/usr/bin/env bash
# Installs what vm-tests needs on a Debian bookworm machine. Idempotent; needs root (or sudo).
#   qemu-system-x86: the VM (software emulation; no KVM needed)
#   busybox-static: the guest's userland; nbd-client, e2fsprogs: copied into the guest
#   xz-utils: unpacks the kernel image so QEMU can boot it directly (PVH), which is ~2x faster under TCG
#
# Why this is not just a line in scripts/install-deps.sh: the machines come with a newer, backported
# qemu-utils (10.x) than bookworm's qemu-system-x86 (7.2), and qemu-utils >= 8 "Breaks" qemu-system-common
# < 8. `apt-get install qemu-system-x86` alone therefore removes qemu-utils (qemu-img, qemu-nbd, which
# other tests use). Installing both from bookworm in one command keeps a matching pair: it downgrades
# qemu-utils to 7.2, which every qemu-nbd/qemu-img use in this project works with.
set -euo pipefail
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in busybox-static nbd-client e2fsprogs xz-utils; do installed "$p" || missing+=("$p"); done
if ! installed qemu-system-x86 || ! installed qemu-utils; then
    missing+=(qemu-system-x86 qemu-utils/bookworm)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "vm-tests: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}"
fi
