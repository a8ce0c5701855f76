#!/usr/bin/env bash
# The test command (README "Tests"; CI runs exactly this). Installs missing Debian packages,
# builds everything (binaries, tests, benches, so nothing rots), runs the whole test suite
# including the QEMU guest tests (TCG where KVM is not usable; never skipped).
#   VBLK_SOAK=1 scripts/test.sh   also runs the soak: the engine's model-based property test with
#                                 20 000 cases (VBLK_SOAK_CASES) and the kill -9 crash test in a
#                                 loop (VBLK_SOAK_ROUNDS, default 50), and live migrations of
#                                 a guest that switch over while it reads (VBLK_SOAK_MIGRATIONS,
#                                 default 20); about an hour
#   VBLK_FUZZ=1 scripts/test.sh   also builds the fuzz targets and fuzzes each for $FUZZ_SECS s
#                                 (fuzz/run-ci.sh, default 60; needs cargo-fuzz, see fuzz/README.md)
#   VBLK_BENCH_SMOKE=1 scripts/test.sh  also runs one short repeat of the side-by-side macro
#                                 benchmark (1 s cells, 256 MiB; about 90 s) so that it cannot rot
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --workspace --bins --tests --benches
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
if [ "${VBLK_FUZZ:-0}" = 1 ]; then bash fuzz/run-ci.sh; fi
if [ "${VBLK_BENCH_SMOKE:-0}" = 1 ]; then
    VBLK_BENCH_SMOKE=1 cargo bench -p vblk-benches --bench vhost_compare
fi
if [ "${VBLK_SOAK:-0}" = 1 ]; then
    VBLK_SOAK_CASES=${VBLK_SOAK_CASES:-20000} cargo test --release -p vblk-engine --test model
    VBLK_SOAK_CASES=${VBLK_SOAK_CASES:-20000} cargo test --release -p vblk-engine --test snap_model
    for i in $(seq "${VBLK_SOAK_ROUNDS:-50}"); do
        VBLK_KILL9_SEED=$i cargo test --release -p vblk-engine --test engine kill9 -- --test-threads=1
    done
    # Live migrations that switch over with the guest running and reading (README "Limits").
    for i in $(seq "${VBLK_SOAK_MIGRATIONS:-20}"); do
        VBLK_MIGRATE_LIVE=1 cargo test -p vblk-tests --test guest guest_live_migration
    done
fi
# One summary line for humans and CI: the totals of every test binary above.
awk '/^test result:/ {p += $4; f += $6; i += $8} END {printf "%d passed, %d failed, %d skipped\n", p, f, i}' "$LOG"
