#!/usr/bin/env bash
# Install the Debian packages vblk needs to build, test and run its demo. Idempotent: installs
# only what is missing. Needs root (apt-get).
#   build:  librocksdb-dev (RocksDB 7.8, linked instead of compiling 15 min of C++),
#           libclang-dev (bindgen for librocksdb-sys), protobuf-compiler (protoc for the gRPC API),
#           pkg-config, g++
#   guests: qemu-system-x86, busybox-static, cpio, e2fsprogs, xz-utils, zstd, fdisk,
#           ovmf, dosfstools, mtools (a UEFI guest booting from a volume)
#           (the kernel package is fetched with `apt-get download` by tests/guest/build.sh,
#           never installed on the host)
#   benches: fio, qemu-system-common (qemu-storage-daemon), qemu-utils (qemu-img; also used by
#            `vblk import` for qcow2)
set -euo pipefail
PKGS=(librocksdb-dev libclang-dev protobuf-compiler pkg-config g++ qemu-system-x86 qemu-system-common qemu-utils ovmf dosfstools mtools
      busybox-static cpio e2fsprogs xz-utils zstd fdisk fio)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v qemu-storage-daemon >/dev/null || echo "install-deps: note: qemu-storage-daemon not found (only the side-by-side bench needs it)" >&2
