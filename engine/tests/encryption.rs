//! Encryption at rest (FORMAT.md §11) through the public API.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vblk_engine::crypt::Key;
use vblk_engine::*;

const MIB: u64 = 1 << 20;

fn new_pool(dir: &Path) -> PathBuf {
    let p = dir.join("pool.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(64 * MIB), ..Default::default() }).unwrap();
    p
}

fn open_with(p: &Path, key: Option<[u8; 32]>) -> Result<Pool> {
    Pool::open(p, &PoolOptions { master_key: key.map(Key), ..Default::default() })
}

fn block(lba: u64, ver: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..16].copy_from_slice(&(ver ^ (i as u64) << 48).to_le_bytes());
    }
    b
}

/// Write `block(lba, ver)` for each lba to volume `vol` and flush.
fn write_flushed(pool: &Pool, vol: &str, lbas: std::ops::Range<u64>, ver: u64) {
    let v = pool.open_volume(vol, false).unwrap();
    let mut io = v.sync_io().unwrap();
    for lba in lbas {
        io.write_at(lba * 4096, &block(lba, ver)).unwrap();
    }
    io.flush().unwrap();
}

/// Block `lba` of volume `vol`.
fn read_block(pool: &Pool, vol: &str, lba: u64) -> Vec<u8> {
    let v = pool.open_volume(vol, true).unwrap();
    let mut b = vec![0u8; 4096];
    v.sync_io().unwrap().read_at(lba * 4096, &mut b).unwrap();
    b
}

/// Whether `needle` occurs anywhere in the pool file.
fn file_contains(p: &Path, needle: &[u8]) -> bool {
    let data = std::fs::read(p).unwrap();
    data.windows(needle.len()).any(|w| w == needle)
}

const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];

#[test]
fn encrypted_volume_round_trips_and_stores_no_plaintext() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    let marker = b"vblk-plaintext-marker-0123456789".repeat(128);
    {
        let pool = open_with(&p, Some(K1)).unwrap();
        let info = pool.create_encrypted_volume("e", 16 * MIB).unwrap();
        assert!(info.encrypted);
        assert!(!pool.create_volume("plain", MIB).unwrap().encrypted);
        let v = pool.open_volume("e", false).unwrap();
        let mut io = v.sync_io().unwrap();
        io.write_at(0, &marker).unwrap();
        for lba in 1..64u64 {
            io.write_at(lba * 4096, &block(lba, 1)).unwrap();
        }
        // Rewrites before and after a commit go to new blocks and read back.
        io.write_at(4096, &block(1, 2)).unwrap();
        io.write_at(4096, &block(1, 3)).unwrap();
        io.flush().unwrap();
        io.write_at(2 * 4096, &block(2, 4)).unwrap();
        io.flush().unwrap();
        let mut b = vec![0u8; 4096];
        io.read_at(4096, &mut b).unwrap();
        assert_eq!(b, block(1, 3));
        // Unaligned I/O is refused on an encrypted volume.
        assert!(io.write_at(512, &[0u8; 512]).is_err());
        let mut small = [0u8; 512];
        assert!(io.read_at(0, &mut small).is_err());
        // Unwritten blocks read as zeros.
        io.read_at(100 * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // Discard works on whole blocks.
        io.discard(3 * 4096, 4096).unwrap();
        io.flush().unwrap();
        io.read_at(3 * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
    assert!(!file_contains(&p, &marker[..64]), "plaintext found in the pool file");
    // Reopen with the key: everything flushed is there.
    let pool = open_with(&p, Some(K1)).unwrap();
    let v = pool.open_volume("e", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let mut b = vec![0u8; marker.len()];
    io.read_at(0, &mut b).unwrap();
    assert_eq!(b, marker);
    let mut b = vec![0u8; 4096];
    for lba in 4..64u64 {
        io.read_at(lba * 4096, &mut b).unwrap();
        assert_eq!(b, block(lba, 1), "lba {lba}");
    }
    io.read_at(2 * 4096, &mut b).unwrap();
    assert_eq!(b, block(2, 4));
    drop(io);
    drop(v);
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn wrong_or_missing_master_key() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    {
        let pool = open_with(&p, Some(K1)).unwrap();
        pool.create_encrypted_volume("e", MIB).unwrap();
        write_flushed(&pool, "e", 0..1, 1);
    }
    // A wrong key is refused at open.
    assert!(matches!(open_with(&p, Some(K2)), Err(Error::WrongKey)));
    // Without a key the pool opens locked: the volume is listed but cannot be opened, cloned
    // or read through a snapshot, and no new encrypted volume can be made.
    let pool = open_with(&p, None).unwrap();
    assert!(pool.volume_info("e").unwrap().encrypted);
    assert!(matches!(pool.open_volume("e", false), Err(Error::KeyUnavailable(_))));
    assert!(matches!(pool.open_volume("e", true), Err(Error::KeyUnavailable(_))));
    pool.snapshot_create("e", "s").unwrap();
    assert!(pool.open_snapshot("e", "s").is_err());
    assert!(pool.clone_volume("e", "s", "c").is_err());
    assert!(pool.create_encrypted_volume("e2", MIB).is_err());
    // Plaintext volumes work as usual.
    pool.create_volume("plain", MIB).unwrap();
    let v = pool.open_volume("plain", false).unwrap();
    v.sync_io().unwrap().write_at(0, &block(0, 1)).unwrap();
    drop(v);
    drop(pool);
    // A reader that does not know the feature refuses the pool.
    let sb = read_superblock(&p).unwrap();
    assert_eq!(sb.incompat & format::incompat::ENCRYPTION, format::incompat::ENCRYPTION);
}

#[test]
fn tampered_ciphertext_fails_with_an_io_error() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    let pool = open_with(&p, Some(K1)).unwrap();
    pool.create_encrypted_volume("e", MIB).unwrap();
    let v = pool.open_volume("e", false).unwrap();
    let mut io = v.sync_io().unwrap();
    io.write_at(0, &block(0, 1)).unwrap();
    io.write_at(4096, &block(1, 1)).unwrap();
    io.flush().unwrap();
    let ranges = v.allocated_ranges(0, MIB).unwrap();
    assert_eq!(ranges, vec![(0, 8192)]);
    drop(io);
    drop(v);
    drop(pool);
    // Find block 0's ciphertext: flip one bit in every data block written (two blocks).
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let data_start = 1 << 20;
    let mut flipped = 0;
    for pba in 0..64u64 {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, data_start + pba * 4096).unwrap();
        if b.iter().any(|&x| x != 0) && pba % 2 == 0 {
            b[7] ^= 0x40;
            f.write_all_at(&b, data_start + pba * 4096).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped >= 1);
    let pool = open_with(&p, Some(K1)).unwrap();
    let v = pool.open_volume("e", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let mut b = vec![0u8; 4096];
    let r0 = io.read_at(0, &mut b);
    let r1 = io.read_at(4096, &mut b);
    // Whichever block was flipped fails; nothing returns the modified plaintext.
    assert!(r0.is_err() || r1.is_err());
    if r1.is_ok() {
        assert_eq!(b, block(1, 1));
    }
}

#[test]
fn snapshots_clones_and_flatten_of_an_encrypted_volume() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    {
        let pool = open_with(&p, Some(K1)).unwrap();
        pool.create_encrypted_volume("e", MIB).unwrap();
        write_flushed(&pool, "e", 0..8, 1);
        pool.snapshot_create("e", "s1").unwrap();
        write_flushed(&pool, "e", 0..1, 2);
        let c = pool.clone_volume("e", "s1", "c").unwrap();
        assert!(c.encrypted);
        {
            let v = pool.open_volume("c", false).unwrap();
            let mut io = v.sync_io().unwrap();
            let mut b = vec![0u8; 4096];
            io.read_at(0, &mut b).unwrap();
            assert_eq!(b, block(0, 1));
            io.write_at(4096, &block(1, 9)).unwrap();
            io.flush().unwrap();
        }
        {
            let s = pool.open_snapshot("e", "s1").unwrap();
            let mut io = s.sync_io().unwrap();
            let mut b = vec![0u8; 4096];
            io.read_at(0, &mut b).unwrap();
            assert_eq!(b, block(0, 1));
        }
        pool.clone_flatten("c").unwrap();
        // The origin goes; the flattened clone keeps its own copy of the family key.
        pool.delete_volume("e", true).unwrap();
    }
    let pool = open_with(&p, Some(K1)).unwrap();
    let v = pool.open_volume("c", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let mut b = vec![0u8; 4096];
    for lba in 0..8u64 {
        io.read_at(lba * 4096, &mut b).unwrap();
        assert_eq!(b, block(lba, if lba == 1 { 9 } else { 1 }), "lba {lba}");
    }
    drop(io);
    drop(v);
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn master_key_rotation_rewraps_without_rewriting_data() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    {
        let pool = open_with(&p, Some(K1)).unwrap();
        pool.create_encrypted_volume("e", MIB).unwrap();
        write_flushed(&pool, "e", 0..1, 5);
        assert_eq!(pool.rotate_master_key(&Key(K2)).unwrap(), 2);
        // The open pool wraps new keys under the new master key from now on.
        pool.create_encrypted_volume("after", MIB).unwrap();
        write_flushed(&pool, "after", 0..1, 6);
    }
    assert!(matches!(open_with(&p, Some(K1)), Err(Error::WrongKey)));
    let pool = open_with(&p, Some(K2)).unwrap();
    assert_eq!(read_block(&pool, "e", 0), block(0, 5));
    assert_eq!(read_block(&pool, "after", 0), block(0, 6));
}

/// Overlapping writes in flight on the same blocks of an encrypted volume, with the committer
/// running every millisecond: a write that meets one in flight waits for it, rewrites of
/// uncommitted blocks redirect, and commits land in between. Every block must then read back
/// (authenticated) as one of the versions written to it, the same after a reopen, and `check`
/// must be clean.
#[test]
fn overlapping_writes_and_racing_commits() {
    use rand::{Rng, SeedableRng};
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path());
    let opts = PoolOptions { master_key: Some(Key(K1)), commit_interval: std::time::Duration::from_millis(1), ..Default::default() };
    const LBAS: u64 = 16;
    // Versions written to each lba (any may win a race; the last completed round is one of them).
    let mut last_round: Vec<Vec<Vec<u8>>> = vec![Vec::new(); LBAS as usize];
    {
        let pool = Pool::open(&p, &opts).unwrap();
        pool.create_encrypted_volume("e", LBAS * 4096).unwrap();
        let v = pool.open_volume("e", false).unwrap();
        let mut q = v.open_queue().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        for round in 1..=300u64 {
            bufs.clear();
            let n = rng.random_range(1..24);
            let mut lbas = Vec::new();
            for i in 0..n {
                let lba = rng.random_range(0..LBAS);
                lbas.push(lba);
                bufs.push(block(lba, round * 100 + i));
            }
            for (i, &lba) in lbas.iter().enumerate() {
                let b = &mut bufs[i];
                let req = Request {
                    kind: ReqKind::Write,
                    offset: lba * 4096,
                    len: 4096,
                    iov: vec![IoVec { ptr: b.as_mut_ptr(), len: 4096 }].into(),
                    tag: i as u64,
                };
                // SAFETY: `bufs` outlives the drain below and is not touched meanwhile.
                unsafe { q.submit(req) };
            }
            let mut out = Vec::new();
            q.drain(&mut out);
            assert_eq!(out.len(), lbas.len());
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            for (i, &lba) in lbas.iter().enumerate() {
                if i == 0 || !lbas[..i].contains(&lba) {
                    last_round[lba as usize].clear();
                }
                last_round[lba as usize].push(bufs[i].clone());
            }
            if round % 7 == 0 {
                // SAFETY: a flush has no buffers.
                unsafe { q.submit(Request { kind: ReqKind::Flush, offset: 0, len: 0, iov: Default::default(), tag: 999 }) };
                let mut o = Vec::new();
                q.drain(&mut o);
                assert!(o.iter().all(|c| c.result.is_ok()), "{o:?}");
            }
            // Read everything back: every written block authenticates and holds a version of
            // its last round.
            if round % 10 == 0 {
                let mut io = v.sync_io().unwrap();
                let mut b = vec![0u8; 4096];
                for lba in 0..LBAS {
                    io.read_at(lba * 4096, &mut b).unwrap();
                    let cands = &last_round[lba as usize];
                    assert!(cands.is_empty() && b.iter().all(|&x| x == 0) || cands.contains(&b), "lba {lba} round {round}");
                }
            }
        }
        drop(q);
        let mut io = v.sync_io().unwrap();
        io.flush().unwrap();
    }
    let pool = Pool::open(&p, &opts).unwrap();
    assert!(pool.check().unwrap().is_clean());
    let v = pool.open_volume("e", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let mut b = vec![0u8; 4096];
    for lba in 0..LBAS {
        io.read_at(lba * 4096, &mut b).unwrap();
        let cands = &last_round[lba as usize];
        assert!(cands.is_empty() && b.iter().all(|&x| x == 0) || cands.contains(&b), "lba {lba} after reopen");
    }
}

/// Requests far larger than usual (24 MiB each, three in flight: more than a queue's 64 MiB of
/// bounce buffers, so the third waits for room) all complete and read back.
#[test]
fn huge_requests_wait_for_bounce_buffer_room_and_complete() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pool.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(120 * MIB), preallocate: Preallocate::Off, ..Default::default() }).unwrap();
    let pool = open_with(&p, Some(K1)).unwrap();
    pool.create_encrypted_volume("e", 96 * MIB).unwrap();
    let v = pool.open_volume("e", false).unwrap();
    let mut q = v.open_queue().unwrap();
    const LEN: usize = 24 << 20;
    let mut bufs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; LEN]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let req = Request { kind: ReqKind::Write, offset: (i * LEN) as u64, len: LEN as u64, iov: vec![IoVec { ptr: b.as_mut_ptr(), len: LEN }].into(), tag: i as u64 };
        // SAFETY: `bufs` outlives the drain below.
        unsafe { q.submit(req) };
    }
    let mut out = Vec::new();
    q.drain(&mut out);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    let mut back: Vec<Vec<u8>> = (0..3).map(|_| vec![0u8; LEN]).collect();
    for (i, b) in back.iter_mut().enumerate() {
        let req = Request { kind: ReqKind::Read, offset: (i * LEN) as u64, len: LEN as u64, iov: vec![IoVec { ptr: b.as_mut_ptr(), len: LEN }].into(), tag: 10 + i as u64 };
        // SAFETY: `back` outlives the drain below.
        unsafe { q.submit(req) };
    }
    let mut out = Vec::new();
    q.drain(&mut out);
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    for (i, b) in back.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8 + 1), "request {i} read back wrong");
    }
}
