//! vblk fuzz targets. Each target's logic lives here, as `targets::NAME(data)`, so that the
//! libFuzzer binaries in `fuzz_targets/` are one line each, and `tests/replay.rs` (plain
//! `cargo test`, no sanitizer flags) and `src/bin/gen-seeds.rs` share the input formats.
//!
//! Input formats are explicit little-endian byte layouts read with [`cursor::Cursor`] (reads past
//! the end yield zeros), not `arbitrary`'s, so that seeds can be written by [`cursor::Writer`]
//! and stay valid across `arbitrary` releases. `arbitrary` is used where the fuzzer should
//! produce whole well-typed values (the round-trip mirrors in `metadata_records`).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cursor;
pub mod env;
pub mod targets;

/// The CLI's size parser, compiled from the CLI's own source file (the `vblk` crate is a binary
/// crate with no library to depend on). `cli/src/units.rs` has no `crate::` imports; if it ever
/// needs some, give the CLI a library target instead.
#[allow(dead_code)]
#[path = "../../cli/src/units.rs"]
pub mod units;

/// When `VBLK_FUZZ_VERBOSE` is set, targets print the decoded input (`{:#?}`) before running it:
/// the starting point for turning a crash into a unit test in the crate that owns the bug.
pub fn verbose() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var_os("VBLK_FUZZ_VERBOSE").is_some())
}
