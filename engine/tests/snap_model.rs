//! Model-based property test of snapshots, clones, rollback, flatten and deletes, with crashes.
//!
//! Random sequences of write / discard / write-zeroes / read / flush / snapshot / clone /
//! rollback / snapshot delete / volume delete / flatten / reopen run against the engine and a
//! plain in-memory model (one byte image per volume and per snapshot). After every step every
//! volume and snapshot (through a temporary clone) reads back exactly as the model says, and
//! `check` finds no corruption and no leak (allocated == referenced).
//!
//! Crashes: `Crash { after }` reopens the pool with a fault that fails the metadata write after
//! `after` more successful ones — the pool stops at that point as if the process died there
//! (so every step of snapshot create/delete, rollback, clone, flatten and volume delete is a
//! crash point for some `after`). When a later step fails, the test reopens the pool cleanly
//! (which resumes interrupted deletes) and reconciles: every operation must have happened
//! entirely or not at all, flushed data must be exact, and each unflushed block must read as
//! its flushed or its latest content.

#[path = "common/snap_model_core.rs"]
mod snap_model_core;

use proptest::prelude::*;
use snap_model_core::*;

fn op() -> impl Strategy<Value = Op> {
    let s = BLOCKS * 8;
    prop_oneof![
        4 => (0..8usize, 0..s, 1..40u64, 1..=255u8).prop_map(|(vol, sector, n, ver)| Op::Write { vol, sector: sector & !7, n: (n + 7) & !7, ver }),
        2 => (0..8usize, 0..s, 1..12u64, 1..=255u8).prop_map(|(vol, sector, n, ver)| Op::Write { vol, sector, n, ver }),
        1 => (0..8usize, 0..s, 1..100u64).prop_map(|(vol, sector, n)| Op::Discard { vol, sector, n }),
        1 => (0..8usize, 0..s, 1..30u64).prop_map(|(vol, sector, n)| Op::WriteZeroes { vol, sector, n }),
        1 => Just(Op::Flush),
        3 => (0..8usize).prop_map(|vol| Op::Snap { vol }),
        1 => (0..16usize).prop_map(|snap| Op::Clone { snap }),
        1 => (0..16usize).prop_map(|snap| Op::Rollback { snap }),
        2 => (0..16usize).prop_map(|snap| Op::DeleteSnap { snap }),
        1 => (0..8usize, any::<bool>()).prop_map(|(vol, recursive)| Op::DeleteVol { vol, recursive }),
        1 => (0..8usize).prop_map(|vol| Op::Flatten { vol }),
        1 => Just(Op::Reopen),
        1 => (0..6u64).prop_map(|after| Op::Crash { after }),
        1 => (0..16usize, any::<bool>()).prop_map(|(snap, to_live)| Op::Diff { snap, to_live }),
    ]
}

proptest! {
    // VBLK_SOAK_CASES=N runs N cases (scripts/test.sh with VBLK_SOAK=1 runs many more).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VBLK_SOAK_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]
    #[test]
    fn snapshots_match_model(ops in proptest::collection::vec(op(), 1..30), tiny_cache in any::<bool>()) {
        run_case(ops, tiny_cache, false)?;
    }

    /// The same with encrypted volumes: seals through snapshots, clones, rollback, flatten,
    /// deletes and crashes at every metadata write.
    #[test]
    fn encrypted_snapshots_match_model(ops in proptest::collection::vec(op(), 1..30), tiny_cache in any::<bool>()) {
        run_case(ops, tiny_cache, true)?;
    }
}

/// A fixed scenario that exercises each operation once, so a regression shows up by name.
#[test]
fn snapshot_scenario() {
    let ops = vec![
        Op::Write { vol: 0, sector: 0, n: 64, ver: 1 },
        Op::Snap { vol: 0 },
        Op::Write { vol: 0, sector: 8, n: 8, ver: 2 },
        Op::Write { vol: 0, sector: 17, n: 3, ver: 3 },
        Op::Discard { vol: 0, sector: 24, n: 16 },
        Op::Clone { snap: 0 },
        Op::Write { vol: 1, sector: 0, n: 9, ver: 4 },
        Op::Snap { vol: 0 },
        Op::DeleteSnap { snap: 0 },
        Op::Rollback { snap: 0 },
        Op::Reopen,
        Op::Flatten { vol: 0 },
        Op::DeleteVol { vol: 0, recursive: false },
        Op::DeleteVol { vol: 0, recursive: true },
    ];
    run_case(ops.clone(), false, false).unwrap();
    run_case(ops.clone(), true, false).unwrap();
    run_case(ops, false, true).unwrap();
}
