//! Model-based property test: random sequences of writes, discards, flushes, multi-block reads,
//! volume grows and pool reopens, checked against a plain in-memory model after every step,
//! with `check` clean and allocated == referenced at the end of every case.

use std::collections::HashMap;

use proptest::prelude::*;
use vblk_engine::*;

const BLOCKS: u64 = 96;

#[derive(Debug, Clone)]
enum Op {
    Write { lba: u64, n: u64, ver: u8 },
    Discard { lba: u64, n: u64 },
    Read { lba: u64, n: u64 },
    Flush,
    Reopen,
    Grow,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..9u64, 1..=255u8).prop_map(|(lba, n, ver)| Op::Write { lba, n, ver }),
        2 => (0..BLOCKS, 1..20u64).prop_map(|(lba, n)| Op::Discard { lba, n }),
        3 => (0..BLOCKS, 1..16u64).prop_map(|(lba, n)| Op::Read { lba, n }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Grow),
    ]
}

fn content(lba: u64, ver: u8) -> Vec<u8> {
    let mut b = vec![ver; 4096];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.img");
        // Pool smaller than the volume's reach so that NoSpace happens too.
        create_pool(&path, &CreateOptions { size_bytes: Some((1 << 20) + 80 * 4096), ..Default::default() }).unwrap();
        let mut pool = Some(Pool::open(&path, &PoolOptions::default()).unwrap());
        pool.as_ref().unwrap().create_volume("v", BLOCKS * 4096).unwrap();
        let mut size = BLOCKS;
        let mut model: HashMap<u64, u8> = HashMap::new();
        let mut vol = Some(pool.as_ref().unwrap().open_volume("v", false).unwrap());
        let mut io = Some(vol.as_ref().unwrap().sync_io().unwrap());
        for op in ops {
            if let Op::Reopen = op {
                drop(io.take());
                drop(vol.take());
                drop(pool.take());
                pool = Some(Pool::open(&path, &PoolOptions::default()).unwrap());
                vol = Some(pool.as_ref().unwrap().open_volume("v", false).unwrap());
                io = Some(vol.as_ref().unwrap().sync_io().unwrap());
            }
            let p = pool.as_ref().unwrap();
            let s = io.as_mut().unwrap();
            match op {
                Op::Write { lba, n, ver } => {
                    let n = n.min(size.saturating_sub(lba));
                    if n == 0 { continue; }
                    let data: Vec<u8> = (lba..lba + n).flat_map(|l| content(l, ver)).collect();
                    match s.write_at(lba * 4096, &data) {
                        Ok(()) => { for l in lba..lba + n { model.insert(l, ver); } }
                        Err(Error::NoSpace) => {
                            // A failed write may have landed partly (like a disk): resync the
                            // model from what the volume now holds for those blocks.
                            let mut b = vec![0u8; 4096];
                            for l in lba..lba + n {
                                s.read_at(l * 4096, &mut b).unwrap();
                                if b.iter().all(|&x| x == 0) { model.remove(&l); }
                                else { prop_assert_eq!(&b, &content(l, ver)); model.insert(l, ver); }
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Discard { lba, n } => {
                    let n = n.min(size.saturating_sub(lba));
                    if n == 0 { continue; }
                    s.discard(lba * 4096, n * 4096).unwrap();
                    for l in lba..lba + n { model.remove(&l); }
                }
                Op::Read { lba, n } => {
                    let n = n.min(size.saturating_sub(lba));
                    if n == 0 { continue; }
                    let mut buf = vec![0u8; (n * 4096) as usize];
                    s.read_at(lba * 4096, &mut buf).unwrap();
                    for (i, l) in (lba..lba + n).enumerate() {
                        let got = &buf[i * 4096..(i + 1) * 4096];
                        match model.get(&l) {
                            Some(&v) => prop_assert_eq!(got, &content(l, v)[..], "block {}", l),
                            None => prop_assert!(got.iter().all(|&x| x == 0), "block {} should be zero", l),
                        }
                    }
                }
                Op::Flush => s.flush().unwrap(),
                Op::Grow => {
                    size += 8;
                    p.resize_volume("v", size * 4096, false).unwrap();
                }
                Op::Reopen => {}
            }
            // Space accounting follows the model exactly.
            prop_assert_eq!(p.volume_info("v").unwrap().allocated_bytes, model.len() as u64 * 4096);
        }
        let p = pool.as_ref().unwrap();
        let rep = p.check().unwrap();
        prop_assert!(rep.is_clean(), "{:?}", rep);
        prop_assert_eq!(rep.referenced_blocks, model.len() as u64);
        // Everything read back once more.
        let s = io.as_mut().unwrap();
        let mut b = vec![0u8; 4096];
        for l in 0..size {
            s.read_at(l * 4096, &mut b).unwrap();
            match model.get(&l) {
                Some(&v) => prop_assert_eq!(&b, &content(l, v)),
                None => prop_assert!(b.iter().all(|&x| x == 0)),
            }
        }
        drop(io); drop(vol);
    }
}
