#!/usr/bin/env bash
# Build every fuzz target, replay the committed crash reproducers (fuzz/regressions/<target>/*),
# then fuzz each target for $FUZZ_SECS seconds (default 60) starting from its seeds. Exits 1 if
# any target crashed (every target still runs); crash inputs are saved to
# fuzz/artifacts/<target>/ and the log tells how to reproduce them (fuzz/README.md).
#
#   FUZZ_SECS=30 fuzz/run-ci.sh              # scripts/test.sh runs this when VBLK_FUZZ=1
#   FUZZ_TARGETS="engine_model" fuzz/run-ci.sh
#
# Environment:
#   FUZZ_SECS          seconds per target (default 60)
#   FUZZ_TARGETS       targets to run (default: all of fuzz_targets/)
#   FUZZ_CORPUS_DIR    keep each target's growing corpus in $FUZZ_CORPUS_DIR/<target> between
#                      runs (default: a temporary directory; the committed seeds are read-only)
#   CARGO_TARGET_DIR   if set, fuzz builds go to $CARGO_TARGET_DIR/fuzz (else fuzz/target)
#   VBLK_FUZZ_FAULTS=0 no injected write failures in engine_model (see fuzz/README.md)
set -euo pipefail
cd "$(dirname "$0")"

FUZZ_SECS=${FUZZ_SECS:-60}
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz/run-ci.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 1
fi
target_dir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
target_dir=${target_dir:-$PWD/target}
fuzz=(--sanitizer none --target-dir "$target_dir")

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vblk-fuzz-ci.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
# The pools of the engine targets live here when no private tmpfs can be mounted (see
# fuzz/src/env.rs); removed with the scratch directory even if a target aborts.
export VBLK_FUZZ_TMPDIR=$scratch

t0=$(date +%s)
cargo fuzz build "${fuzz[@]}"
echo "fuzz/run-ci.sh: built the fuzz targets in $(( $(date +%s) - t0 )) s"

targets=${FUZZ_TARGETS:-$(cd fuzz_targets && for f in *.rs; do echo "${f%.rs}"; done)}
failed=()
for t in $targets; do
    # 1. Crash reproducers that were fixed must stay fixed: each file is run once.
    shopt -s nullglob
    repro=(regressions/"$t"/*)
    shopt -u nullglob
    if ((${#repro[@]})); then
        echo "== $t: replaying ${#repro[@]} regression input(s)"
        if ! cargo fuzz run "${fuzz[@]}" "$t" "${repro[@]}" -- -runs=1; then
            failed+=("$t (regression replay)")
            continue
        fi
    fi
    # 2. Fuzz from the seeds; new inputs go to a writable corpus outside the checkout.
    corpus=${FUZZ_CORPUS_DIR:+$FUZZ_CORPUS_DIR/$t}
    corpus=${corpus:-$scratch/corpus/$t}
    mkdir -p "$corpus"
    echo "== $t: fuzzing for $FUZZ_SECS s (corpus $corpus)"
    set +e
    cargo fuzz run "${fuzz[@]}" "$t" "$corpus" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECS" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee "$scratch/$t.log" |
        grep --line-buffered -E "INITED|DONE|average_exec_per_sec|panicked|ERROR|SUMMARY|Test unit written|vblk-fuzz:"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" != 0 ]; then
        echo "== $t: CRASHED (exit $rc); last lines of its log:"
        tail -60 "$scratch/$t.log"
        failed+=("$t")
    fi
done

echo "fuzz/run-ci.sh: done in $(( $(date +%s) - t0 )) s"
if ((${#failed[@]})); then
    echo "fuzz/run-ci.sh: CRASHED: ${failed[*]}" >&2
    echo "  reproduce: cd fuzz && cargo fuzz run --sanitizer none TARGET artifacts/TARGET/crash-..." >&2
    echo "  then follow fuzz/README.md (\"From a crash to a regression test\")" >&2
    exit 1
fi
