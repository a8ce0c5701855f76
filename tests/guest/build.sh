#!/bin/bash
# needs: apt dpkg busybox-static cpio e2fsprogs gzip libc-bin xz-utils zstd findutils coreutils
#
# Build the vblk test guest: a Debian cloud kernel plus a tiny busybox
# initramfs whose /init (tests/guest/init) runs one test scenario against
# virtio-blk disks and powers off.
#
#   tests/guest/build.sh OUTDIR
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. Idempotent: does
# nothing when both exist and are newer than this script and ./init.
# The kernel is fetched with `apt-get download` (never installed on the host)
# and cached in OUTDIR/deb/. Set VBLK_KERNEL_DEB=/path/to/linux-image-*.deb to
# use a given package instead (e.g. offline).
#
# Runtime (not needed to build): qemu-system-x86 (and qemu-system-common for
# qemu-storage-daemon in smoke-qsd.sh).
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
INIT="$HERE/init"
SELF="$HERE/build.sh"
[ -f "$INIT" ] || die "missing $INIT"

# ---- up to date? ----------------------------------------------------------
FIO=$(command -v fio || true)
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] \
   && [ "$OUT/vmlinuz" -nt "$SELF" ] && [ "$OUT/vmlinuz" -nt "$INIT" ] \
   && [ "$OUT/initramfs.cpio.gz" -nt "$SELF" ] && [ "$OUT/initramfs.cpio.gz" -nt "$INIT" ] \
   && { [ -z "$FIO" ] || [ "$OUT/initramfs-fio.cpio.gz" -nt "$OUT/initramfs.cpio.gz" ]; }; then
    log "up to date: $OUT"
    exit 0
fi

# ---- host tools ------------------------------------------------------------
need_cmd() { # need_cmd CMD PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: apt-get install $2"
}
need_cmd dpkg-deb dpkg
need_cmd gzip gzip
need_cmd ldd libc-bin
need_cmd find findutils

BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked (package 'busybox'?): apt-get install busybox-static"
fi

MKE2FS=$(command -v mke2fs || true); [ -n "$MKE2FS" ] || MKE2FS=/sbin/mke2fs
E2FSCK=$(command -v e2fsck || true); [ -n "$E2FSCK" ] || E2FSCK=/sbin/e2fsck
[ -x "$MKE2FS" ] && [ -x "$E2FSCK" ] || die "mke2fs/e2fsck not found: apt-get install e2fsprogs"

# cpio: GNU cpio if installed, else busybox's applet (which can also write newc).
if command -v cpio >/dev/null 2>&1; then
    CPIO=(cpio --quiet -o -H newc)
else
    log "note: 'cpio' not installed (apt-get install cpio); using busybox cpio"
    CPIO=("$BUSYBOX" cpio -o -H newc)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vblk-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---- kernel package --------------------------------------------------------
find_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

DEB=${VBLK_KERNEL_DEB:-}
if [ -z "$DEB" ]; then
    need_cmd apt-get apt
    need_cmd apt-cache apt
    PKG=$(find_kernel_pkg)
    if [ -z "$PKG" ]; then
        log "apt-cache does not know linux-image-cloud-amd64; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        PKG=$(find_kernel_pkg)
        [ -n "$PKG" ] || die "cannot resolve linux-image-cloud-amd64 with apt-cache depends"
    fi
    mkdir -p "$OUT/deb"
    DEB=$(ls -1 "$OUT/deb/${PKG}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$DEB" ]; then
        log "downloading $PKG"
        dl() { (cd "$WORK" && apt-get download -q "$PKG" >&2 2>"$WORK/apt.err"); }
        if ! dl; then
            log "apt-get download failed; running apt-get update and retrying"
            apt-get update -qq >&2 || die "apt-get update failed"
            dl || { cat "$WORK/apt.err" >&2; die "apt-get download $PKG failed"; }
        fi
        rm -f "$OUT/deb/"*.deb
        mv "$WORK/${PKG}_"*.deb "$OUT/deb/"
        DEB=$(ls -1 "$OUT/deb/${PKG}_"*.deb | head -n1)
    else
        log "using cached $DEB"
    fi
fi
[ -f "$DEB" ] || die "kernel package $DEB not found"

log "extracting $(basename "$DEB")"
dpkg-deb -x "$DEB" "$WORK/k"
VMLINUZ=$(ls -1 "$WORK"/k/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $DEB"
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=
for d in "$WORK/k/lib/modules/$KVER" "$WORK/k/usr/lib/modules/$KVER"; do
    [ -d "$d" ] && MODDIR=$d && break
done
[ -n "$MODDIR" ] || die "no modules directory for $KVER in $DEB"

# ---- initramfs tree ----------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,root,lib/modules/vblk,usr/bin,usr/sbin}
chmod 1777 "$R/tmp"

# Modules: the roots we need, plus their depends= (read from .modinfo),
# written in load order (dependencies first) to lib/modules/vblk/order.
ROOT_MODULES="virtio_pci virtio_blk"
declare -A DONE=()
ORDER=()
module_file() { # module name -> path (accepts - or _ spelling)
    local n=$1 alt=${1//_/-} f
    f=$(find "$MODDIR" \( -name "$n.ko" -o -name "$n.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n1)
    [ -n "$f" ] || die "module $n not found in $DEB (is it built in? check boot/config-$KVER)"
    echo "$f"
}
add_module() {
    local name=$1 src dst deps d
    [ -n "${DONE[$name]:-}" ] && return 0
    DONE[$name]=1
    src=$(module_file "$name")
    dst="$R/lib/modules/vblk/$name.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) need_cmd xz xz-utils; xz -dc "$src" >"$dst" ;;
        *.ko.zst) need_cmd zstd zstd; zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
    deps=$(tr '\0' '\n' <"$dst" | grep -a '^depends=' | head -n1 | cut -d= -f2 || true)
    for d in ${deps//,/ }; do add_module "${d//-/_}"; done
    ORDER+=("$name")
}
for m in $ROOT_MODULES; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/vblk/order"
log "modules: ${ORDER[*]}"

# busybox + applet links
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"
done

# e2fsprogs and the shared libraries they need (same paths as on the host)
copy_with_libs() { # copy_with_libs BINARY DEST
    cp -L "$1" "$R/$2"
    ldd "$1" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}' | while read -r lib; do
        mkdir -p "$R$(dirname "$lib")"
        [ -e "$R$lib" ] || cp -L "$lib" "$R$lib"
    done
}
copy_with_libs "$MKE2FS" sbin/mke2fs
copy_with_libs "$E2FSCK" sbin/e2fsck
ln -sf mke2fs "$R/sbin/mkfs.ext4"
ln -sf e2fsck "$R/sbin/fsck.ext4"
# busybox links for mke2fs must not shadow the real one
rm -f "$R/bin/mke2fs" "$R/bin/mkfs.ext2"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"
ln -sf /proc/mounts "$R/etc/mtab"
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
echo "root:x:0:" >"$R/etc/group"
echo "$KVER" >"$R/etc/vblk-kernel"

cp "$INIT" "$R/init"
chmod 755 "$R/init"
# A console node lets the kernel give /init a stdout before devtmpfs is
# mounted (init re-opens /dev/console anyway, so failure here is harmless).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true

# ---- pack ------------------------------------------------------------------------
(cd "$R" && find . | LC_ALL=C sort | "${CPIO[@]}") | gzip -6 >"$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
# fio (for the QoS guest test) with its ~60 shared libraries (~80 MiB) goes into a second
# archive; OUTDIR/initramfs-fio.cpio.gz is both archives concatenated (the kernel unpacks
# concatenated cpio archives), so the guests that don't need fio stay small and fast to boot.
if [ -n "$FIO" ]; then
    F="$WORK/fioroot"
    mkdir -p "$F/usr/bin"
    R_SAVE=$R; R=$F
    copy_with_libs "$FIO" usr/bin/fio
    R=$R_SAVE
    (cd "$F" && find . | LC_ALL=C sort | "${CPIO[@]}") | gzip -1 >"$WORK/fio.cpio.gz"
    cat "$WORK/initramfs.cpio.gz" "$WORK/fio.cpio.gz" >"$WORK/initramfs-fio.cpio.gz"
else
    log "fio not installed: no initramfs-fio.cpio.gz (apt-get install fio)"
fi
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
[ -n "$FIO" ] && mv -f "$WORK/initramfs-fio.cpio.gz" "$OUT/initramfs-fio.cpio.gz"
echo "$KVER" >"$OUT/kernel-version"
log "built $OUT/vmlinuz ($KVER) and $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB)"
