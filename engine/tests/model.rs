//! Model-based property test: random sequences of writes, discards and write-zeroes at 512-byte
//! granularity, multi-block reads, flushes, volume grows and pool reopens, checked against a
//! plain byte image of the volume after every step, with exact space accounting and `check`
//! clean (allocated == referenced) at the end of every case. The same for an encrypted volume
//! (FORMAT.md §11): requests not aligned to 4096 bytes must fail and change nothing, every write
//! redirects (rewrites before a commit included), and everything reads back after reopens.

use std::collections::BTreeSet;

use proptest::prelude::*;
use vblk_engine::*;

const BLOCKS: u64 = 64;
const SECT: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, n: u64, ver: u8 },
    Discard { sector: u64, n: u64 },
    WriteZeroes { sector: u64, n: u64 },
    Read { sector: u64, n: u64 },
    Flush,
    Reopen,
    Grow,
}

fn op() -> impl Strategy<Value = Op> {
    let s = BLOCKS * 8;
    prop_oneof![
        3 => (0..s, 1..72u64, 1..=255u8).prop_map(|(sector, n, ver)| Op::Write { sector: sector & !7, n: (n + 7) & !7, ver }),
        3 => (0..s, 1..20u64, 1..=255u8).prop_map(|(sector, n, ver)| Op::Write { sector, n, ver }),
        1 => (0..s, 1..160u64).prop_map(|(sector, n)| Op::Discard { sector, n }),
        1 => (0..s, 1..40u64).prop_map(|(sector, n)| Op::WriteZeroes { sector, n }),
        3 => (0..s, 1..80u64).prop_map(|(sector, n)| Op::Read { sector, n }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Grow),
    ]
}

fn sector_data(sector: u64, ver: u8) -> Vec<u8> {
    let mut b = vec![ver; SECT as usize];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b
}

struct Model {
    image: Vec<u8>,
    mapped: BTreeSet<u64>,
}

proptest! {
    // VBLK_SOAK_CASES=N runs N cases (scripts/test.sh with VBLK_SOAK=1 runs 20 000).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VBLK_SOAK_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, false)?;
    }

    #[test]
    fn encrypted_engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, true)?;
    }
}

fn run(ops: Vec<Op>, encrypted: bool) -> Result<(), TestCaseError> {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.img");
        // Encrypted writes redirect, so blocks rewritten since the last commit are held twice.
        let blocks = if encrypted { 1000 } else { 200 };
        create_pool(&path, &CreateOptions { size_bytes: Some((1 << 20) + blocks * 4096), ..Default::default() }).unwrap();
        let opts = PoolOptions { master_key: encrypted.then(|| vblk_engine::crypt::Key([0x42; 32])), ..Default::default() };
        let mut pool = Some(Pool::open(&path, &opts).unwrap());
        if encrypted {
            pool.as_ref().unwrap().create_encrypted_volume("v", BLOCKS * 4096).unwrap();
        } else {
            pool.as_ref().unwrap().create_volume("v", BLOCKS * 4096).unwrap();
        }
        let mut size = BLOCKS * 4096;
        let mut m = Model { image: vec![0; size as usize], mapped: BTreeSet::new() };
        let mut vol = Some(pool.as_ref().unwrap().open_volume("v", false).unwrap());
        let mut io = Some(vol.as_ref().unwrap().sync_io().unwrap());
        for op in ops {
            if let Op::Reopen = op {
                drop(io.take());
                drop(vol.take());
                drop(pool.take());
                pool = Some(Pool::open(&path, &opts).unwrap());
                vol = Some(pool.as_ref().unwrap().open_volume("v", false).unwrap());
                io = Some(vol.as_ref().unwrap().sync_io().unwrap());
            }
            let p = pool.as_ref().unwrap();
            let s = io.as_mut().unwrap();
            let clamp = |sector: u64, n: u64| -> (u64, u64) {
                let off = (sector * SECT).min(size);
                (off, (n * SECT).min(size - off).min(1 << 20))
            };
            let aligned = |off: u64, len: u64| off.is_multiple_of(4096) && len.is_multiple_of(4096);
            match op {
                Op::Write { sector, n, ver } => {
                    let (off, len) = clamp(sector, n);
                    if len == 0 { continue; }
                    if encrypted && !aligned(off, len) {
                        prop_assert!(s.write_at(off, &vec![1u8; len as usize]).is_err(), "unaligned write accepted");
                        continue;
                    }
                    let data: Vec<u8> = (off / SECT..(off + len) / SECT).flat_map(|x| sector_data(x, ver)).collect();
                    s.write_at(off, &data).unwrap();
                    m.image[off as usize..(off + len) as usize].copy_from_slice(&data);
                    for b in off / 4096..(off + len).div_ceil(4096) { m.mapped.insert(b); }
                }
                Op::Discard { sector, n } => {
                    let (off, len) = clamp(sector, n);
                    if len == 0 { continue; }
                    s.discard(off, len).unwrap();
                    // Only whole blocks inside the range are unmapped (and read as zeros).
                    for b in off.div_ceil(4096)..(off + len) / 4096 {
                        m.mapped.remove(&b);
                        m.image[(b * 4096) as usize..((b + 1) * 4096) as usize].fill(0);
                    }
                }
                Op::WriteZeroes { sector, n } => {
                    let (off, len) = clamp(sector, n);
                    if len == 0 { continue; }
                    if encrypted && !aligned(off, len) {
                        prop_assert!(s.write_zeroes(off, len).is_err(), "unaligned write-zeroes accepted");
                        continue;
                    }
                    s.write_zeroes(off, len).unwrap();
                    m.image[off as usize..(off + len) as usize].fill(0);
                    let (first, last) = (off.div_ceil(4096), (off + len) / 4096);
                    for b in off / 4096..(off + len).div_ceil(4096) {
                        if b >= first && b < last { m.mapped.remove(&b); } else { m.mapped.insert(b); }
                    }
                }
                Op::Read { sector, n } => {
                    let (off, len) = clamp(sector, n);
                    if len == 0 { continue; }
                    let mut buf = vec![0u8; len as usize];
                    if encrypted && !aligned(off, len) {
                        prop_assert!(s.read_at(off, &mut buf).is_err(), "unaligned read accepted");
                        continue;
                    }
                    s.read_at(off, &mut buf).unwrap();
                    let want = &m.image[off as usize..(off + len) as usize];
                    if buf != want {
                        let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                        prop_assert!(false, "read at {} len {}: first difference at byte {} (volume offset {})", off, len, i, off + i as u64);
                    }
                }
                Op::Flush => s.flush().unwrap(),
                Op::Grow => {
                    size += 8 * 4096;
                    p.resize_volume("v", size, false).unwrap();
                    m.image.resize(size as usize, 0);
                }
                Op::Reopen => {}
            }
            prop_assert_eq!(p.volume_info("v").unwrap().allocated_bytes, m.mapped.len() as u64 * 4096);
        }
        let p = pool.as_ref().unwrap();
        let rep = p.check().unwrap();
        prop_assert!(rep.is_clean(), "{:?}", rep);
        prop_assert_eq!(rep.referenced_blocks, m.mapped.len() as u64);
        let s = io.as_mut().unwrap();
        let mut buf = vec![0u8; size as usize];
        for (i, c) in buf.chunks_mut(1 << 20).enumerate() {
            s.read_at(i as u64 * (1 << 20), c).unwrap();
        }
        prop_assert!(buf == m.image, "final image differs");
        drop(io); drop(vol);
        Ok(())
}
