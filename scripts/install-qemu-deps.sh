#!/usr/bin/env bash
# Installs what the real-QEMU tests need (QEMU for x86-64, static busybox, cpio, kmod), once.
# Idempotent and fast when everything is present; as non-root it only says what is missing.
# Called by scripts/test. See ../shared/notes/qemu-guests.md for why these packages.
set -euo pipefail

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# The guest needs a *static* busybox: the initramfs carries no libc.
if [ ! -x /bin/busybox ] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null \
        | grep -q "install ok installed"; then
    missing+=(busybox-static)
fi
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
command -v depmod >/dev/null 2>&1 || [ -x /sbin/depmod ] || missing+=(kmod)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-qemu-deps: missing packages: ${missing[*]}" >&2
    echo "install-qemu-deps: run as root: apt-get install -y --no-install-recommends" \
        "qemu-system-x86 busybox-static cpio kmod" >&2
    exit 1
fi

echo "install-qemu-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static cpio kmod >&2
