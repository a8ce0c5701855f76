#!/usr/bin/env bash
# vblk demo (README "Quick start"): build vblk, create a pool file, start the daemon, create a
# thin volume, serve it over vhost-user-blk and boot a small Linux guest on it. The guest
# partitions the disk, makes ext4, writes files, fscks them and powers off; then the demo shows
# the pool's usage and stops the daemon.
#
#   scripts/demo.sh [POOL_FILE]      default: ./vblk-demo/pool.img (4 GiB, created if missing)
#   VBLK_DEMO_SCENARIO=shell scripts/demo.sh   boots to an interactive guest shell instead
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
POOL=${1:-$ROOT/vblk-demo/pool.img}
WORK=$(dirname "$POOL")
SCENARIO=${VBLK_DEMO_SCENARIO:-mkfs-fsck}
mkdir -p "$WORK"

bash scripts/install-deps.sh
echo "== building vblk"
cargo build --bins
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VBLK=$TARGET/debug/vblk
API=$WORK/api.sock
SOCK=$WORK/demo.sock
export VBLK_API_SOCKET=$API

if [ ! -e "$POOL" ]; then
    echo "== creating a 4 GiB pool at $POOL"
    "$VBLK" pool create "$POOL" --size 4G
fi

echo "== starting the daemon (log: $WORK/daemon.log)"
"$VBLK" daemon --pool "$POOL" --socket "$API" >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
cleanup() { kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do "$VBLK" vol list >/dev/null 2>&1 && break; sleep 0.1; done

"$VBLK" vol info demo >/dev/null 2>&1 || "$VBLK" vol create demo 10G
"$VBLK" vol list
"$VBLK" attach demo --socket "$SOCK" --queues 2
"$VBLK" pool status

echo "== booting a guest on volume 'demo' (scenario: $SCENARIO; QEMU command line below)"
rc=0
if [ "$SCENARIO" = shell ]; then
    bash tests/guest/run.sh -q 2 shell "$SOCK" || rc=$?
else
    VBLK_GUEST_VERBOSE=1 bash tests/guest/run.sh -q 2 -t 600 "$SCENARIO" "$SOCK" || rc=$?
fi

echo "== after the guest"
"$VBLK" pool status
"$VBLK" check
"$VBLK" detach demo
exit "$rc"
