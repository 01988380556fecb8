#!/usr/bin/env bash
# Installs what the real-QEMU tests need (QEMU for x86-64, static busybox, cpio, kmod), and
# what the libvirt world's tests need (libvirtd with its QEMU driver, virsh, and libvirt-python
# in the project's .venv, built against libvirt-dev), once.
# Idempotent and fast when everything is present; as non-root it only says what is missing.
# Called by scripts/test. See ../shared/notes/qemu-guests.md for why these packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_py="$root/.venv/bin/python"

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# The guest needs a *static* busybox: the initramfs carries no libc.
if [ ! -x /bin/busybox ] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null \
        | grep -q "install ok installed"; then
    missing+=(busybox-static)
fi
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
command -v depmod >/dev/null 2>&1 || [ -x /sbin/depmod ] || missing+=(kmod)
# libvirt (notes: "libvirt on these machines"; libvirt-dev and pkg-config build libvirt-python)
command -v libvirtd >/dev/null 2>&1 || missing+=(libvirt-daemon)
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] \
    || missing+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null 2>&1 || missing+=(libvirt-clients)
pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev pkg-config)
# libvirt-python has no wheels on PyPI: building it needs a C compiler and Python's headers
if [ -x "$venv_py" ] && ! "$venv_py" -c "import libvirt" 2>/dev/null; then
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    [ -e "$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
        || missing+=(python3-dev)
fi

if [ ${#missing[@]} -ne 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-qemu-deps: missing packages: ${missing[*]}" >&2
        echo "install-qemu-deps: run as root: apt-get install -y --no-install-recommends" \
            "${missing[*]}" >&2
        exit 1
    fi
    echo "install-qemu-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# libvirt-python in the project's virtualenv (the [libvirt] extra), once libvirt-dev is there
if [ -x "$venv_py" ] && ! "$venv_py" -c "import libvirt" 2>/dev/null; then
    if pkg-config --exists libvirt 2>/dev/null; then
        echo "install-qemu-deps: installing libvirt-python into $root/.venv" >&2
        "$venv_py" -m pip install --quiet --disable-pip-version-check "libvirt-python>=9.0" >&2
    else
        echo "install-qemu-deps: libvirt-python needs libvirt-dev and pkg-config" >&2
    fi
fi
