//! `snapshot_model`: the stateful snapshot target. Arbitrary sequences of writes, discards and
//! write-zeroes at 512-byte granularity, flushes, snapshots, clones, rollbacks, snapshot and
//! volume deletes, flattens, diffs, reopens and **crashes** — `Crash { after }` reopens the pool
//! with a fault that fails its `after`-th next metadata write, so any step of any operation can
//! be where the pool stops — run through `engine/tests/common/snap_model_core.rs`, the same model
//! as the `snap_model` property test: after every step every volume and snapshot reads exactly
//! as the in-memory model says and `Pool::check` is clean; after a crash the pool is reopened and
//! every operation must have happened entirely or not at all, with unflushed blocks reading as
//! flushed or latest. A failed property panics with the operation list.
//!
//! Each input makes its own small pool (tempfile, in `$VBLK_FUZZ_TMPDIR` when set).
//!
//! Input format: u8 flags (bit 0: a 12-entry block-map cache, so that eviction and the
//! lookups behind it run; bit 1: every volume encrypted (FORMAT.md §11), data ops rounded out
//! to whole 4 KiB blocks), then up to [`MAX_OPS`] ops: u8 kind (mod 15) and its fields (see
//! `decode`).

#[path = "../../../engine/tests/common/snap_model_core.rs"]
#[allow(dead_code)]
mod model;

use model::{run_case, Op, BLOCKS};

use crate::cursor::{Cursor, Writer};

pub const MAX_OPS: usize = 24;

/// (tiny cache, encrypted, operations).
pub fn decode(data: &[u8]) -> (bool, bool, Vec<Op>) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let (tiny, encrypted) = (flags & 1 == 1, flags & 2 == 2);
    let sectors = BLOCKS * 8;
    let mut ops = Vec::new();
    while !c.is_empty() && ops.len() < MAX_OPS {
        ops.push(match c.u8() % 15 {
            0..=2 => Op::Write { vol: c.u8() as usize, sector: c.u16() as u64 % sectors, n: c.u8() as u64 % 48 + 1, ver: c.u8() | 1 },
            3 => Op::Discard { vol: c.u8() as usize, sector: c.u16() as u64 % sectors, n: c.u8() as u64 % 100 + 1 },
            4 => Op::WriteZeroes { vol: c.u8() as usize, sector: c.u16() as u64 % sectors, n: c.u8() as u64 % 40 + 1 },
            5 => Op::Flush,
            6 => Op::Snap { vol: c.u8() as usize },
            7 => Op::Clone { snap: c.u8() as usize },
            8 => Op::Rollback { snap: c.u8() as usize },
            9 => Op::DeleteSnap { snap: c.u8() as usize },
            10 => Op::DeleteVol { vol: c.u8() as usize, recursive: c.u8() & 1 == 1 },
            11 => Op::Flatten { vol: c.u8() as usize },
            12 => Op::Reopen,
            13 => Op::Crash { after: c.u8() as u64 % 6 },
            _ => Op::Diff { snap: c.u8() as usize, to_live: c.u8() & 1 == 1 },
        });
    }
    (tiny, encrypted, ops)
}

pub fn encode(tiny: bool, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(tiny as u8);
    for op in ops {
        match op.clone() {
            Op::Write { vol, sector, n, ver } => w.u8(0).u8(vol as u8).u16(sector as u16).u8((n - 1) as u8).u8(ver),
            Op::Discard { vol, sector, n } => w.u8(3).u8(vol as u8).u16(sector as u16).u8((n - 1) as u8),
            Op::WriteZeroes { vol, sector, n } => w.u8(4).u8(vol as u8).u16(sector as u16).u8((n - 1) as u8),
            Op::Flush => w.u8(5),
            Op::Snap { vol } => w.u8(6).u8(vol as u8),
            Op::Clone { snap } => w.u8(7).u8(snap as u8),
            Op::Rollback { snap } => w.u8(8).u8(snap as u8),
            Op::DeleteSnap { snap } => w.u8(9).u8(snap as u8),
            Op::DeleteVol { vol, recursive } => w.u8(10).u8(vol as u8).u8(recursive as u8),
            Op::Flatten { vol } => w.u8(11).u8(vol as u8),
            Op::Reopen => w.u8(12),
            Op::Crash { after } => w.u8(13).u8(after as u8),
            Op::Diff { snap, to_live } => w.u8(14).u8(snap as u8).u8(to_live as u8),
        };
    }
    w.finish()
}

pub fn run(data: &[u8]) {
    static TMP: std::sync::Once = std::sync::Once::new();
    TMP.call_once(|| {
        if let Ok(d) = std::env::var("VBLK_FUZZ_TMPDIR") {
            std::env::set_var("TMPDIR", d);
        }
    });
    let (tiny, encrypted, ops) = decode(data);
    if let Err(e) = run_case(ops.clone(), tiny, encrypted) {
        panic!("snapshot model violated: {e}\ntiny cache: {tiny}, encrypted: {encrypted}\nops: {ops:#?}");
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let w = |vol, sector, n, ver| Op::Write { vol, sector, n, ver };
    vec![
        (
            "snapshot-clone-rollback",
            encode(
                false,
                &[
                    w(0, 0, 64, 1),
                    Op::Snap { vol: 0 },
                    w(0, 8, 8, 3),
                    w(0, 17, 3, 5),
                    Op::Discard { vol: 0, sector: 24, n: 16 },
                    Op::Clone { snap: 0 },
                    w(1, 0, 9, 7),
                    Op::Snap { vol: 0 },
                    Op::Diff { snap: 0, to_live: true },
                    Op::DeleteSnap { snap: 0 },
                    Op::Rollback { snap: 0 },
                    Op::Flatten { vol: 0 },
                    Op::DeleteVol { vol: 0, recursive: true },
                ],
            ),
        ),
        (
            "crash-during-delete",
            encode(
                true,
                &[w(0, 0, 48, 1), Op::Snap { vol: 0 }, w(0, 0, 48, 3), Op::Snap { vol: 0 }, Op::Crash { after: 1 }, Op::DeleteSnap { snap: 0 }, Op::Reopen],
            ),
        ),
        (
            "crash-during-rollback",
            encode(false, &[w(0, 40, 24, 1), Op::Snap { vol: 0 }, w(0, 40, 8, 9), Op::Crash { after: 1 }, Op::Rollback { snap: 0 }, Op::Flush]),
        ),
        (
            // The case the encrypted property test found: a flattened block reusing a freed
            // one whose seal was still cached.
            "encrypted-clone-flatten-after-delete",
            {
                let mut e = encode(
                    false,
                    &[
                        w(0, 0, 16, 1),
                        Op::DeleteVol { vol: 0, recursive: false },
                        w(0, 0, 8, 1),
                        Op::Snap { vol: 0 },
                        Op::Clone { snap: 0 },
                        Op::Flatten { vol: 0 },
                    ],
                );
                e[0] |= 2;
                e
            },
        ),
    ]
}
