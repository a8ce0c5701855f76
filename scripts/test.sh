#!/usr/bin/env bash
# The test command (README "Tests"; CI runs exactly this). Installs missing Debian packages,
# builds everything (binaries, tests, benches, so nothing rots), runs the whole test suite
# including the QEMU guest tests (TCG where KVM is not usable; never skipped).
#   VBLK_SOAK=1 scripts/test.sh   also runs the long soak tests (hours)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --workspace --bins --tests --benches
cargo test --workspace --no-fail-fast -- --test-threads=2
