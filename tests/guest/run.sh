#!/bin/bash
# Run one guest scenario against vhost-user-blk sockets, by hand.
#
#   tests/guest/run.sh [options] SCENARIO SOCKET [SOCKET...]
#     -a ARG      scenario argument (vblk.arg=, e.g. the pattern seed)
#     -q N        virtqueues per disk (num-queues=, default 1)
#     -c CPUS     guest vCPUs (default: max(2, min(N, 4)))
#     -m MIB      guest RAM in MiB (default 512)
#     -t SECS     timeout (default 300)
#     -r          reconnect=1 on the socket chardevs
#     -o DIR      artifact dir (default $VBLK_GUEST_DIR or <repo>/target/guest)
#     -x ARGS     extra kernel command line words (e.g. "vblk.mib=16")
#
# The first SOCKET is /dev/vda in the guest, the second /dev/vdb, ...
# SCENARIO "shell" gives an interactive busybox shell on this terminal.
# Prints the serial console; exit 0 on VBLK-RESULT: PASS, 1 on FAIL,
# 2 when the guest gave no result (boot failure, timeout, QEMU error).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

ARG= QUEUES=1 CPUS= MEM=512 TIMEOUT=300 RECONNECT= EXTRA=
OUT=${VBLK_GUEST_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/guest}
while getopts "a:q:c:m:t:ro:x:" o; do
    case $o in
        a) ARG=$OPTARG ;; q) QUEUES=$OPTARG ;; c) CPUS=$OPTARG ;; m) MEM=$OPTARG ;;
        t) TIMEOUT=$OPTARG ;; r) RECONNECT=,reconnect=1 ;; o) OUT=$OPTARG ;;
        x) EXTRA=$OPTARG ;;
        *) sed -n '2,17p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || { sed -n '2,17p' "$0"; exit 2; }
SCENARIO=$1; shift
if [ -z "$CPUS" ]; then CPUS=$QUEUES; [ "$CPUS" -gt 4 ] && CPUS=4; [ "$CPUS" -lt 2 ] && CPUS=2; fi

bash "$HERE/build.sh" "$OUT" >/dev/null || exit 2

# KVM only where it really works (a PVM /dev/kvm cannot boot this kernel).
if [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ] && { [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; }; then
    ACCEL=(-accel kvm -cpu host)
else
    ACCEL=(-accel tcg,thread=multi -cpu max)
fi

APPEND="console=ttyS0 quiet panic=-1 vblk.scenario=$SCENARIO"
[ -n "$ARG" ] && APPEND="$APPEND vblk.arg=$ARG"
[ -n "$EXTRA" ] && APPEND="$APPEND $EXTRA"

ARGS=(-nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot
      "${ACCEL[@]}" -smp "$CPUS" -m "${MEM}M"
      -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem
      -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.cpio.gz" -append "$APPEND")
i=0
for s in "$@"; do
    ARGS+=(-chardev "socket,id=vblk$i,path=$s$RECONNECT"
           -device "vhost-user-blk-pci,chardev=vblk$i,num-queues=$QUEUES")
    i=$((i + 1))
done

if [ "$SCENARIO" = shell ]; then
    # interactive: the terminal is the guest console (Ctrl-A X quits QEMU)
    I=()
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        case "${ARGS[$i]}" in
            -monitor) i=$((i + 1)) ;;
            stdio) I+=(mon:stdio) ;;
            *) I+=("${ARGS[$i]}") ;;
        esac
    done
    ARGS=("${I[@]}")
    exec qemu-system-x86_64 "${ARGS[@]}"
fi

[ -n "${VBLK_GUEST_VERBOSE:-}" ] && echo "run.sh: qemu-system-x86_64 ${ARGS[*]}" >&2
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 "${ARGS[@]}" </dev/null | tee "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "run.sh: timeout after ${TIMEOUT}s" >&2
if grep -q "VBLK-RESULT: PASS $SCENARIO" "$LOG"; then exit 0; fi
if grep -q "VBLK-RESULT: FAIL" "$LOG"; then exit 1; fi
echo "run.sh: no VBLK-RESULT from the guest (qemu exit $rc)" >&2
exit 2
