#!/bin/bash
# Self-test of the guest harness against qemu-storage-daemon (not vblk):
# every scenario must PASS against a known-good vhost-user-blk backend, and
# the pattern check must FAIL for a wrong seed and for a misplaced MiB.
#
#   tests/guest/smoke-qsd.sh [OUTDIR]
#
# needs: qemu-system-x86 qemu-system-common (qemu-storage-daemon) + build.sh's
# Exit 0 when every check behaved as expected.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-${VBLK_GUEST_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/guest}}
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing: apt-get install qemu-system-common" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: apt-get install qemu-system-x86" >&2; exit 2; }

# O_DIRECT needs a real filesystem (not tmpfs): use /var/tmp
W=$(mktemp -d /var/tmp/vblk-smoke.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

elapsed() { awk -v a="$1" -v b="${2:-$(date +%s.%N)}" 'BEGIN {printf "%.1f", b - a}'; }
t=$(date +%s.%N)
bash "$HERE/build.sh" "$OUT" || exit 2
echo "build.sh: $(elapsed "$t") s"

start_qsd() { # start_qsd NAME SIZE -> $W/NAME.raw exported at $W/NAME.sock
    local name=$1
    [ -f "$W/$name.raw" ] || truncate -s "$2" "$W/$name.raw"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$W/$name.raw,cache.direct=on,discard=unmap" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$W/$name.sock,writable=on,num-queues=2" \
        >"$W/$name.qsd.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$W/$name.sock" ] && return 0; sleep 0.05; done
    echo "qemu-storage-daemon for $name did not start:" >&2; cat "$W/$name.qsd.log" >&2; exit 2
}

PASSED=0 FAILED=0
LAST=
# check EXPECT(pass|fail) GREP-FOR-OR-EMPTY -- run.sh args...
check() {
    local expect=$1 want=$2; shift 3
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$HERE/run.sh" -o "$OUT" "$@" >"$W/console" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    LAST=$(cat "$W/console")
    local ok=1
    case "$expect:$rc" in pass:0|fail:1) ;; *) ok=0 ;; esac
    if [ -n "$want" ] && ! grep -q -- "$want" "$W/console"; then ok=0; fi
    local boot desc
    desc=$*; desc=${desc//$W\//}
    boot=$(awk '/VBLK-BOOT/ {print $2}' "$W/console")
    if [ $ok = 1 ]; then
        PASSED=$((PASSED + 1))
        printf 'ok    %-50s %5.1f s (init at %s s)\n' "$desc -> $expect" "$(elapsed "$t0" "$t1")" "$boot"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL  %-50s rc=%s\n' "$desc -> expected $expect${want:+ with '$want'}" "$rc"
        sed 's/^/      | /' "$W/console"
    fi
}

start_qsd a 256M
A=$W/a.sock

check pass "VBLK-INFO vda.mq 2" -- -q 2 info "$A"
check pass "" -- -a s1 write-pattern "$A"
# the host sees exactly the pattern the guest reported
sum=$(head -c 64M "$W/a.raw" | sha256sum | cut -d' ' -f1)
if grep -q "VBLK-SUM vda $sum" <<<"$LAST"; then
    PASSED=$((PASSED + 1)); echo "ok    host sha256 of raw file == guest VBLK-SUM"
else
    FAILED=$((FAILED + 1)); echo "FAIL  host sha256 $sum not in guest output"
fi
check pass "" -- -a s1 verify-pattern "$A"
check fail "seed=s2: mismatch at MiB 0" -- -a s2 verify-pattern "$A"
# a misplaced MiB (MiB 36's data also written at MiB 37) must be detected
dd if="$W/a.raw" of="$W/a.raw" bs=1M skip=36 seek=37 count=1 conv=notrunc status=none
check fail "mismatch at MiB 37 " -- -a s1 verify-pattern "$A"
# restore, then a misplaced 4 KiB block (block 100's data also at block 101)
check pass "" -- -a s1 write-pattern "$A"
dd if="$W/a.raw" of="$W/a.raw" bs=4096 skip=100 seek=101 count=1 conv=notrunc status=none
check fail "mismatch at MiB 0 (byte 413733, sector 808)" -- -a s1 verify-pattern "$A"
check pass "VBLK-INFO fs-files" -- mkfs-fsck "$A"
check pass "" -- discard "$A"
# two disks: b is a copy of a, c differs
check pass "" -- -a s3 write-pattern "$A"
cp "$W/a.raw" "$W/b.raw"
start_qsd b 256M
check pass "" -- read-two "$A" "$W/b.sock"
va=$(awk '/VBLK-SUM vda/ {print $3}' <<<"$LAST"); vb=$(awk '/VBLK-SUM vdb/ {print $3}' <<<"$LAST")
if [ -n "$va" ] && [ "$va" = "$vb" ]; then
    PASSED=$((PASSED + 1)); echo "ok    read-two: identical disks have equal sums"
else
    FAILED=$((FAILED + 1)); echo "FAIL  read-two: vda=$va vdb=$vb"
fi
check pass "VBLK-INFO vdb.size" -- -r -q 2 info "$A" "$W/b.sock"

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
