//! Engine integration tests through the public API (the same data path the device uses).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use vblk_engine::*;

const MIB: u64 = 1 << 20;

fn new_pool(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("pool.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(size), ..Default::default() }).unwrap();
    p
}

fn open(p: &Path) -> Pool {
    Pool::open(p, &PoolOptions::default()).unwrap()
}

fn block(lba: u64, ver: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..16].copy_from_slice(&(ver ^ (i as u64) << 48).to_le_bytes());
    }
    b
}

#[test]
fn write_read_persist_and_thin() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    {
        let pool = open(&p);
        // Thin: a volume much larger than the pool.
        pool.create_volume("big", 1 << 40).unwrap();
        let v = pool.open_volume("big", false).unwrap();
        let mut io = v.sync_io().unwrap();
        let mut buf = vec![0xffu8; 8192];
        io.read_at(1 << 39, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "unwritten range reads as zeros");
        assert_eq!(pool.status().used_bytes, 0, "reading allocates nothing");
        io.write_at(1 << 39, &block(7, 1)).unwrap();
        io.write_at(4096 * 3, &[block(3, 1), block(4, 1)].concat()).unwrap();
        io.flush().unwrap();
        assert_eq!(pool.volume_info("big").unwrap().allocated_bytes, 3 * 4096);
    }
    let pool = open(&p);
    let v = pool.open_volume("big", true).unwrap();
    let mut io = v.sync_io().unwrap();
    let mut buf = vec![0u8; 4096];
    io.read_at(1 << 39, &mut buf).unwrap();
    assert_eq!(buf, block(7, 1));
    let mut buf = vec![0u8; 3 * 4096];
    io.read_at(4096 * 2, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert_eq!(&buf[4096..], &[block(3, 1), block(4, 1)].concat()[..]);
    // Read-only volumes refuse writes.
    assert!(io.write_at(0, &block(0, 0)).is_err());
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.referenced_blocks, 3);
}

#[test]
fn discard_frees_space_and_reads_zero() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    pool.create_volume("v", 32 * MIB).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let data = vec![0xabu8; MIB as usize];
    for i in 0..4 {
        io.write_at(i * MIB, &data).unwrap();
    }
    io.flush().unwrap();
    assert_eq!(pool.status().used_bytes, 4 * MIB);
    io.discard(MIB, 2 * MIB).unwrap();
    io.flush().unwrap();
    pool.sync().unwrap();
    let st = pool.status();
    assert_eq!(st.used_bytes, 2 * MIB, "{st:?}");
    assert_eq!(pool.volume_info("v").unwrap().allocated_bytes, 2 * MIB);
    let mut buf = vec![1u8; MIB as usize];
    io.read_at(2 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    io.read_at(3 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn full_pool_fails_writes_and_keeps_data() {
    let d = tempfile::tempdir().unwrap();
    // 1 MiB header + 64 KiB..: 2 MiB file = 256 data blocks.
    let p = new_pool(d.path(), 2 * MIB);
    let pool = open(&p);
    pool.create_volume("v", 16 * MIB).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let total = pool.status().total_bytes / 4096;
    let mut written = 0;
    let mut err = None;
    for lba in 0..total + 10 {
        match io.write_at(lba * 4096, &block(lba, 9)) {
            Ok(()) => written += 1,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(written, total);
    assert!(matches!(err, Some(Error::NoSpace)), "{err:?}");
    io.flush().unwrap();
    // Overwrites of allocated blocks still work on a full pool.
    io.write_at(0, &block(0, 10)).unwrap();
    let mut buf = vec![0u8; 4096];
    for lba in 1..total {
        io.read_at(lba * 4096, &mut buf).unwrap();
        assert_eq!(buf, block(lba, 9));
    }
    io.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, block(0, 10));
    // Freeing space makes writes work again.
    io.discard(0, 8 * 4096).unwrap();
    io.flush().unwrap();
    io.write_at(total * 4096, &block(total, 1)).unwrap();
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn volume_lifecycle_and_validation() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    assert!(pool.create_volume("bad@name", MIB).is_err());
    assert!(pool.create_volume("v", 1000).is_err(), "not a multiple of 4096");
    assert!(pool.create_volume("v", 0).is_err());
    pool.create_volume("v", 8 * MIB).unwrap();
    assert!(matches!(pool.create_volume("v", MIB), Err(Error::VolumeExists(_))));
    {
        let v = pool.open_volume("v", false).unwrap();
        let mut io = v.sync_io().unwrap();
        for i in 0..8 {
            io.write_at(i * MIB, &vec![i as u8 + 1; MIB as usize]).unwrap();
        }
        // Out of range is refused.
        assert!(io.write_at(8 * MIB, &[0u8; 4096]).is_err());
        assert!(matches!(pool.open_volume("v", false), Err(Error::Busy { .. })));
        assert!(matches!(pool.delete_volume("v", false), Err(Error::Busy { .. })));
        // Grow online.
        pool.resize_volume("v", 16 * MIB, false).unwrap();
        assert_eq!(io.size_bytes(), 16 * MIB);
        io.write_at(12 * MIB, &[7u8; 4096]).unwrap();
        assert!(matches!(pool.resize_volume("v", 4 * MIB, true), Err(Error::Busy { .. })));
    }
    assert!(pool.resize_volume("v", 4 * MIB, false).is_err(), "shrink needs --shrink");
    pool.resize_volume("v", 4 * MIB, true).unwrap();
    assert_eq!(pool.status().used_bytes, 4 * MIB, "the tail was freed");
    pool.rename_volume("v", "w").unwrap();
    assert!(pool.volume_info("v").is_err());
    assert_eq!(pool.volume_info("w").unwrap().size_bytes, 4 * MIB);
    drop(pool);
    let pool = open(&p);
    assert_eq!(pool.volume_info("w").unwrap().allocated_bytes, 4 * MIB);
    pool.delete_volume("w", false).unwrap();
    pool.sync().unwrap();
    assert_eq!(pool.status().used_bytes, 0);
    assert!(pool.list_volumes().is_empty());
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn pool_refuses_second_opener_bad_versions_and_features() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 16 * MIB);
    let pool = open(&p);
    assert!(matches!(Pool::open(&p, &PoolOptions::default()), Err(Error::Locked { .. })));
    drop(pool);
    assert!(matches!(create_pool(&p, &CreateOptions { size_bytes: Some(16 * MIB), ..Default::default() }), Err(Error::AlreadyExists { .. })));
    // Patch the superblock: newer version, then an unknown incompatible feature.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let patch = |sb: &mut Vec<u8>, off: usize, val: &[u8]| {
        sb[off..off + val.len()].copy_from_slice(val);
        let crc = crc32c_of(&sb[..4092]);
        sb[4092..].copy_from_slice(&crc.to_le_bytes());
    };
    let mut s2 = sb.clone();
    patch(&mut s2, 8, &3u32.to_le_bytes());
    f.write_all_at(&s2, 0).unwrap();
    let e = Pool::open(&p, &PoolOptions::default()).err().unwrap();
    assert!(matches!(e, Error::VersionTooNew { found: 3, .. }), "{e}");
    assert!(e.to_string().contains("newer"));
    let mut s3 = sb.clone();
    patch(&mut s3, 16, &(1u64 << 40).to_le_bytes());
    f.write_all_at(&s3, 0).unwrap();
    assert!(matches!(Pool::open(&p, &PoolOptions::default()), Err(Error::IncompatibleFeatures { .. })));
    // A damaged primary (a torn rewrite) is recovered from the backup copy at byte 4096 and
    // rewritten; with both damaged the pool is refused as corrupt.
    let mut s4 = sb.clone();
    s4[200] ^= 0xff;
    f.write_all_at(&s4, 0).unwrap();
    drop(Pool::open(&p, &PoolOptions::default()).expect("recovered from the backup superblock"));
    let mut now = vec![0u8; 4096];
    f.read_exact_at(&mut now, 0).unwrap();
    assert_eq!(now, sb, "primary rewritten from the backup");
    f.write_all_at(&s4, 0).unwrap();
    f.write_all_at(&s4, 4096).unwrap();
    assert!(matches!(Pool::open(&p, &PoolOptions::default()), Err(Error::Corrupt { .. })));
    f.write_all_at(&sb, 0).unwrap();
    assert!(Pool::open(&p, &PoolOptions::default()).is_ok());
}

/// A version-1 pool (no branch records, superblock version 1) opens, is upgraded to version 2
/// with its data intact, and can take snapshots.
#[test]
fn version_1_pool_is_upgraded() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(16 * MIB), ..Default::default() }).unwrap();
    {
        let pool = Pool::open(&p, &PoolOptions::default()).unwrap();
        pool.create_volume("v", MIB).unwrap();
        let vol = pool.open_volume("v", false).unwrap();
        let mut io = vol.sync_io().unwrap();
        io.write_at(8192, &vec![7u8; 4096]).unwrap();
        io.flush().unwrap();
    }
    // Make it look like version 1: drop the branch records, patch the superblock version.
    {
        let db = rocksdb::DB::open_default(default_meta_dir(&p)).unwrap();
        let keys: Vec<Vec<u8>> = db.iterator(rocksdb::IteratorMode::Start).filter_map(|kv| kv.ok()).map(|(k, _)| k.to_vec()).filter(|k| k[0] == 0x05).collect();
        assert_eq!(keys.len(), 1);
        for k in keys {
            db.delete(k).unwrap();
        }
    }
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c_of(&sb[..4092]);
    sb[4092..].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&sb, 0).unwrap();
    let pool = Pool::open(&p, &PoolOptions::default()).unwrap();
    assert_eq!(pool.superblock().version, 2);
    assert!(pool.check().unwrap().is_clean());
    pool.snapshot_create("v", "s").unwrap();
    let vol = pool.open_volume("v", false).unwrap();
    let mut io = vol.sync_io().unwrap();
    let mut b = vec![0u8; 4096];
    io.read_at(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    io.write_at(8192, &vec![9u8; 4096]).unwrap();
    drop(io);
    drop(vol);
    let snap = pool.open_snapshot("v", "s").unwrap();
    let mut io = snap.sync_io().unwrap();
    io.read_at(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7), "snapshot keeps the old data");
    drop(io);
    drop(snap);
    assert!(pool.check().unwrap().is_clean());
    drop(pool);
    let mut sb2 = vec![0u8; 4096];
    f.read_exact_at(&mut sb2, 0).unwrap();
    assert_eq!(u32::from_le_bytes(sb2[8..12].try_into().unwrap()), 2, "superblock rewritten as version 2");
}

fn crc32c_of(b: &[u8]) -> u32 {
    // Same algorithm as the engine (Castagnoli); computed bitwise so the test is independent.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

// ---- kill -9 durability -------------------------------------------------------------------
//
// A child process writes rounds of random blocks (content = (lba, round)) and discards, then
// flushes and appends the round to a journal (fsync'd). The parent kills it with SIGKILL at a
// random moment, reopens the pool and checks: every block holds the version of the last
// journaled round that touched it, or a version from a later (unjournaled) round; never
// anything else. Then `check` must be clean.

const CRASH_BLOCKS: u64 = 2048;

fn crash_child(dir: &Path, seed: u64) {
    let p = dir.join("pool.img");
    let pool = open(&p);
    let v = pool.open_volume("v", false).unwrap();
    let mut io = v.sync_io().unwrap();
    let salt: u64 = std::env::var("VBLK_CRASH_RNG").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (salt << 32));
    let mut journal = std::fs::OpenOptions::new().append(true).create(true).open(dir.join(format!("journal-{seed}"))).unwrap();
    // Round numbers are unique across children, so a block's content names its round.
    for round in seed * 1_000_000 + 1.. {
        use std::io::Write;
        let mut ops = Vec::new();
        for _ in 0..rng.random_range(1..40) {
            let lba = rng.random_range(0..CRASH_BLOCKS);
            if rng.random_ratio(1, 8) {
                ops.push(('d', lba, rng.random_range(1..16).min(CRASH_BLOCKS - lba)));
            } else {
                ops.push(('w', lba, rng.random_range(1..8).min(CRASH_BLOCKS - lba)));
            }
        }
        // Intent first (a killed process's file writes survive), then the I/O, then "ok".
        let line: String = ops.iter().map(|(k, l, n)| format!(" {k}{l}:{n}")).collect();
        writeln!(journal, "{round}{line}").unwrap();
        for &(k, lba, n) in &ops {
            if k == 'd' {
                io.discard(lba * 4096, n * 4096).unwrap();
            } else {
                let data: Vec<u8> = (lba..lba + n).flat_map(|l| block(l, round)).collect();
                io.write_at(lba * 4096, &data).unwrap();
            }
        }
        io.flush().unwrap();
        writeln!(journal, "ok").unwrap();
    }
}

#[test]
fn crash_child_entry() {
    if let (Ok(dir), Ok(seed)) = (std::env::var("VBLK_CRASH_DIR"), std::env::var("VBLK_CRASH_SEED")) {
        crash_child(Path::new(&dir), seed.parse().unwrap());
    }
}

#[test]
fn kill9_keeps_every_flushed_write() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    open(&p).create_volume("v", CRASH_BLOCKS * 4096).unwrap();
    // VBLK_KILL9_SEED varies the kill times and the children's operations (the soak loop).
    let base: u64 = std::env::var("VBLK_KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0ffee ^ base);
    // The state the pool must hold: the round number whose content each block has (0 = zeros).
    let mut expect = vec![0u64; CRASH_BLOCKS as usize];
    for iter in 1..7u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child_entry", "--nocapture", "--test-threads=1"])
            .env("VBLK_CRASH_DIR", d.path())
            .env("VBLK_CRASH_SEED", iter.to_string())
            .env("VBLK_CRASH_RNG", base.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        // Replay the journal into the expected state.
        let journal = std::fs::read_to_string(d.path().join(format!("journal-{iter}"))).unwrap_or_default();
        let mut last_round = iter * 1_000_000;
        // Per block, what the unflushed round may have left: new content and/or zeros.
        let mut maybe: std::collections::HashMap<u64, (bool, bool)> = Default::default();
        let lines: Vec<&str> = journal.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if *line == "ok" {
                continue;
            }
            let flushed = lines.get(i + 1) == Some(&"ok");
            let mut it = line.split(' ');
            let round: u64 = it.next().unwrap().parse().unwrap();
            for op in it {
                let (kind, rest) = op.split_at(1);
                let (l, n) = rest.split_once(':').unwrap();
                let (l, n): (u64, u64) = (l.parse().unwrap(), n.parse().unwrap());
                for x in l..l + n {
                    if flushed {
                        expect[x as usize] = if kind == "w" { round } else { 0 };
                    } else {
                        let m = maybe.entry(x).or_default();
                        if kind == "w" { m.0 = true } else { m.1 = true }
                    }
                }
            }
            if flushed {
                last_round = round;
            }
        }
        let pool = open(&p);
        let v = pool.open_volume("v", true).unwrap();
        let mut io = v.sync_io().unwrap();
        let mut buf = vec![0u8; 4096];
        for lba in 0..CRASH_BLOCKS {
            io.read_at(lba * 4096, &mut buf).unwrap();
            let want = expect[lba as usize];
            let zero = buf.iter().all(|&b| b == 0);
            let ok_flushed = if want == 0 { zero } else { buf == block(lba, want) };
            let (may_write, may_zero) = maybe.get(&lba).copied().unwrap_or((false, false));
            let later = may_write && buf == block(lba, last_round + 1);
            assert!(
                ok_flushed || (may_zero && zero) || later,
                "iteration {iter}: block {lba} lost its flushed version {want} (last flushed round {last_round})"
            );
            // What survived of the unflushed round is the state later rounds build on.
            if !ok_flushed {
                expect[lba as usize] = if later { last_round + 1 } else { 0 };
            }
        }
        let rep = pool.check().unwrap();
        assert!(rep.is_clean(), "iteration {iter}: {rep:?}");
        assert!(last_round > iter * 1_000_000, "the child made progress");
    }
}

/// Concurrent 512-byte writes to different sectors of the same never-written block, all in
/// flight at once on one queue and across two queues: the first write of a partial block is
/// padded with zeros, so the others must wait for it rather than be overwritten by its padding.
#[test]
fn concurrent_sector_writes_to_a_new_block() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    pool.create_volume("v", MIB).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    // Two queues (as two virtqueues would be), interleaving sectors of blocks 0..16.
    // O_DIRECT needs 512-byte aligned buffers: carve them from one 4096-aligned allocation.
    let mut raw = vec![0u8; 16 * 4096 + 4096];
    let base = raw.as_ptr().align_offset(4096);
    let arena = &mut raw[base..base + 16 * 4096];
    for (s, b) in arena.chunks_mut(512).enumerate() {
        b.fill((s % 251 + 1) as u8);
    }
    let mut qs = [v.open_queue().unwrap(), v.open_queue().unwrap()];
    for (s, b) in arena.chunks_mut(512).enumerate() {
        let q = &mut qs[s % 2];
        // SAFETY: the buffers live until every request is drained below.
        unsafe {
            q.submit(Request {
                kind: ReqKind::Write,
                offset: s as u64 * 512,
                len: 512,
                iov: vec![IoVec { ptr: b.as_mut_ptr(), len: 512 }].into(),
                tag: s as u64,
            })
        };
    }
    let mut out = Vec::new();
    for q in qs.iter_mut() {
        q.drain(&mut out);
    }
    assert_eq!(out.len(), 16 * 8);
    assert!(out.iter().all(|c| c.result == Ok(512)), "{out:?}");
    let mut io = v.sync_io().unwrap();
    let mut got = vec![0u8; 16 * 4096];
    io.read_at(0, &mut got).unwrap();
    for s in 0..16 * 8 {
        assert!(got[s * 512..(s + 1) * 512].iter().all(|&x| x == (s % 251 + 1) as u8), "sector {s}");
    }
    assert_eq!(pool.volume_info("v").unwrap().allocated_bytes, 16 * 4096);
    // A 512-byte read in the middle of a block, and a write-zeroes of one sector.
    let mut one = vec![0u8; 512];
    io.read_at(3 * 512, &mut one).unwrap();
    assert!(one.iter().all(|&x| x == 4));
    io.write_zeroes(5 * 512, 512).unwrap();
    io.read_at(5 * 512, &mut one).unwrap();
    assert!(one.iter().all(|&x| x == 0));
    io.read_at(6 * 512, &mut one).unwrap();
    assert!(one.iter().all(|&x| x == 7));
}

#[test]
fn sector_write_in_the_middle_of_a_new_block() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    pool.create_volume("v", 4 * MIB).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut io = v.sync_io().unwrap();
    io.write_at(2 * MIB + 1536, &[0x77u8; 512]).unwrap();
    let mut b = vec![0xeeu8; 4096];
    io.read_at(2 * MIB, &mut b).unwrap();
    assert!(b[..1536].iter().all(|&x| x == 0));
    assert!(b[1536..2048].iter().all(|&x| x == 0x77));
    assert!(b[2048..].iter().all(|&x| x == 0));
}

#[test]
fn allocated_ranges_follow_writes_and_discards() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    pool.create_volume("v", 1 << 40).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut io = v.sync_io().unwrap();
    io.write_at(0, &vec![1u8; 8192]).unwrap();
    io.write_at(1 << 30, &vec![2u8; 4096]).unwrap();
    io.flush().unwrap();
    io.write_at((1 << 30) + 4096, &vec![3u8; 4096]).unwrap(); // pending, not committed yet
    io.discard(4096, 4096).unwrap();
    assert_eq!(v.allocated_ranges(0, 1 << 40).unwrap(), vec![(0, 4096), (1 << 30, 8192)]);
    assert_eq!(v.allocated_ranges(2048, 4096).unwrap(), vec![(2048, 2048)]);
    pool.sync().unwrap();
    assert_eq!(v.allocated_ranges(0, 1 << 40).unwrap(), vec![(0, 4096), (1 << 30, 8192)]);
}

/// 1000 snapshots of one volume with writes between them: every snapshot keeps its content,
/// deleting every other one frees exactly what `snapshot_list` called exclusive, and the pool
/// checks clean.
#[test]
fn a_thousand_snapshots() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(64 * MIB), ..Default::default() }).unwrap();
    let pool = Pool::open(&p, &PoolOptions::default()).unwrap();
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.open_volume("v", false).unwrap();
    let mut io = vol.sync_io().unwrap();
    const N: u64 = 1000;
    for i in 0..N {
        // Block i % 256 gets the snapshot number: snapshot i sees it there.
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(&i.to_le_bytes());
        io.write_at((i % 256) * 4096, &b).unwrap();
        pool.snapshot_create("v", &format!("s{i}")).unwrap();
    }
    drop(io);
    drop(vol);
    let list = pool.snapshot_list(Some("v")).unwrap();
    assert_eq!(list.len(), N as usize);
    for i in (0..N).step_by(97) {
        let s = pool.open_snapshot("v", &format!("s{i}")).unwrap();
        let mut sio = s.sync_io().unwrap();
        let mut b = vec![0u8; 4096];
        sio.read_at((i % 256) * 4096, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), i, "snapshot s{i}");
    }
    for i in (0..N).step_by(2) {
        if i % 50 == 0 {
            let ex = pool.snapshot_list(Some("v")).unwrap().into_iter().find(|s| s.name == format!("s{i}")).unwrap().exclusive_bytes;
            let before = pool.status().used_bytes;
            pool.snapshot_delete("v", &format!("s{i}")).unwrap();
            assert_eq!(before - pool.status().used_bytes, ex, "s{i}");
        } else {
            pool.snapshot_delete("v", &format!("s{i}")).unwrap();
        }
    }
    assert_eq!(pool.snapshot_list(Some("v")).unwrap().len(), (N / 2) as usize);
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

/// Snapshots taken while a writer keeps QD16 random writes in flight: each snapshot holds every
/// write completed before `snapshot_create` was called, nothing submitted after it returned,
/// and every block is one whole write (never torn).
#[test]
fn snapshots_under_concurrent_writes_are_exact() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;
    const BLOCKS: u64 = 256;
    const QD: usize = 16;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(64 * MIB), ..Default::default() }).unwrap();
    let pool = Pool::open(&p, &PoolOptions::default()).unwrap();
    pool.create_volume("v", BLOCKS * 4096).unwrap();
    let vol = pool.open_volume("v", false).unwrap();
    // (seq, block, submitted, completed) of every write; seq 0 = never written.
    let log: Mutex<Vec<(u64, u64, Instant, Instant)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut snaps: Vec<(String, Instant, Instant)> = Vec::new();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut q = vol.open_queue().unwrap();
            let mut bufs: Vec<Vec<u8>> = (0..QD).map(|_| vec![0u8; 8192]).collect();
            let mut slot_state: Vec<Option<(u64, u64, Instant)>> = vec![None; QD];
            let mut busy = std::collections::HashSet::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            let mut seq = 0u64;
            let mut out = Vec::new();
            loop {
                let stopping = stop.load(Ordering::Acquire);
                for s in 0..QD {
                    if slot_state[s].is_some() || stopping {
                        continue;
                    }
                    let b = loop {
                        let b = rng.random_range(0..BLOCKS);
                        if !busy.contains(&b) {
                            break b;
                        }
                    };
                    seq += 1;
                    let off = bufs[s].as_ptr().align_offset(4096);
                    let buf = &mut bufs[s][off..off + 4096];
                    for (i, c) in buf.chunks_mut(16).enumerate() {
                        c[..8].copy_from_slice(&seq.to_le_bytes());
                        c[8..16].copy_from_slice(&(b ^ i as u64).to_le_bytes());
                    }
                    busy.insert(b);
                    slot_state[s] = Some((seq, b, Instant::now()));
                    let iov = vec![IoVec { ptr: buf.as_mut_ptr(), len: 4096 }].into();
                    // SAFETY: the buffer lives in `bufs` until the completion is reaped below.
                    unsafe { q.submit(Request { kind: ReqKind::Write, offset: b * 4096, len: 4096, iov, tag: s as u64 }) };
                }
                if stopping && slot_state.iter().all(|x| x.is_none()) {
                    break;
                }
                q.wait_event(10);
                out.clear();
                q.reap(&mut out);
                let now = Instant::now();
                for c in &out {
                    assert!(c.result.is_ok(), "{c:?}");
                    let (sq, b, t) = slot_state[c.tag as usize].take().unwrap();
                    busy.remove(&b);
                    log.lock().unwrap().push((sq, b, t, now));
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        for i in 0..20 {
            let t0 = Instant::now();
            pool.snapshot_create("v", &format!("s{i}")).unwrap();
            let t1 = Instant::now();
            snaps.push((format!("s{i}"), t0, t1));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.store(true, Ordering::Release);
    });
    let log = log.into_inner().unwrap();
    assert!(log.len() > 500, "the writer made progress ({} writes)", log.len());
    let by_seq: std::collections::HashMap<u64, (u64, Instant, Instant)> = log.iter().map(|&(s, b, t, c)| (s, (b, t, c))).collect();
    for (name, t0, t1) in &snaps {
        let sv = pool.open_snapshot("v", name).unwrap();
        let mut io = sv.sync_io().unwrap();
        let mut img = vec![0u8; (BLOCKS * 4096) as usize];
        io.read_at(0, &mut img).unwrap();
        for b in 0..BLOCKS {
            let blk = &img[(b * 4096) as usize..((b + 1) * 4096) as usize];
            let seq = u64::from_le_bytes(blk[..8].try_into().unwrap());
            // Whole: every 16-byte cell carries the same write.
            for (i, c) in blk.chunks(16).enumerate() {
                if seq == 0 {
                    assert!(c.iter().all(|&x| x == 0), "{name} block {b}: torn (zeros and data)");
                } else {
                    assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), seq, "{name} block {b}: torn");
                    assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), b ^ i as u64, "{name} block {b}: wrong block");
                }
            }
            if seq != 0 {
                let (wb, sub, _) = by_seq[&seq];
                assert_eq!(wb, b);
                assert!(sub < *t1, "{name} block {b}: holds write {seq} submitted after the snapshot returned");
            }
            // The newest write to this block completed before the snapshot was asked for.
            let must = log.iter().filter(|&&(_, wb, _, c)| wb == b && c < *t0).map(|&(s, ..)| s).max().unwrap_or(0);
            assert!(seq >= must, "{name} block {b}: has write {seq}, but write {must} completed before the snapshot");
        }
    }
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

/// `delete_volume(recursive)` deletes nothing while a clone that would go is attached.
#[test]
fn recursive_delete_refuses_attached_clones_before_deleting_anything() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.img");
    create_pool(&p, &CreateOptions { size_bytes: Some(16 * MIB), ..Default::default() }).unwrap();
    let pool = Pool::open(&p, &PoolOptions::default()).unwrap();
    pool.create_volume("v", MIB).unwrap();
    pool.snapshot_create("v", "s").unwrap();
    pool.clone_volume("v", "s", "c1").unwrap();
    pool.clone_volume("v", "s", "c2").unwrap();
    pool.snapshot_create("c2", "t").unwrap();
    pool.clone_volume("c2", "t", "c3").unwrap();
    assert!(matches!(pool.delete_volume("v", false), Err(Error::HasDependents { .. })));
    let attached = pool.open_volume("c3", false).unwrap();
    assert!(matches!(pool.delete_volume("v", true), Err(Error::Busy { .. })));
    let names: Vec<String> = pool.list_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["c1", "c2", "c3", "v"]);
    assert_eq!(pool.snapshot_list(None).unwrap().len(), 2);
    drop(attached);
    pool.delete_volume("v", true).unwrap();
    assert!(pool.list_volumes().is_empty());
    assert!(pool.snapshot_list(None).unwrap().is_empty());
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.allocated_blocks, 0);
}

/// Guest memory registered as io_uring fixed buffers: a request whose single buffer lies
/// inside a registered range goes through READ_FIXED / WRITE_FIXED, anything else through
/// readv / writev, and both give the same data.
#[test]
fn fixed_buffers_carry_the_same_data() {
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 64 * MIB);
    let pool = open(&p);
    pool.create_volume("v", MIB).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut raw = vec![0u8; 32 * 4096 + 4096];
    let base = raw.as_ptr().align_offset(4096);
    let arena = &mut raw[base..base + 32 * 4096];
    for (b, chunk) in arena.chunks_mut(4096).enumerate().take(16) {
        chunk.fill(b as u8 + 1);
    }
    let mut q = v.open_queue().unwrap();
    // Register the first 16 blocks of the arena only.
    // SAFETY: `raw` outlives the queue's use of the range (unregistered below, before drop).
    unsafe { q.register_buffers(&[(arena.as_mut_ptr(), 16 * 4096)]) }.unwrap();
    let ptr = arena.as_mut_ptr();
    let submit = |q: &mut Queue, kind, lba: u64, iov: Vec<IoVec>, tag| {
        let len = iov.iter().map(|v| v.len).sum::<usize>() as u64;
        // SAFETY: the arena lives until every request is drained.
        unsafe { q.submit(Request { kind, offset: lba * 4096, len, iov: iov.into(), tag }) };
    };
    let at = |b: usize, n: usize| IoVec { ptr: ptr.wrapping_add(b * 4096), len: n * 4096 };
    // Blocks 0..8 written from registered memory (fixed), 8..16 from two iovecs (readv path).
    for b in 0..8 {
        submit(&mut q, ReqKind::Write, b as u64, vec![at(b, 1)], b as u64);
    }
    submit(&mut q, ReqKind::Write, 8, vec![at(8, 4), at(12, 4)], 8);
    let mut out = Vec::new();
    q.drain(&mut out);
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert_eq!(q.fixed_submissions(), 8);
    // Read all 16 back: into registered memory (fixed, one 64 KiB part) and into the
    // unregistered half (readv).
    submit(&mut q, ReqKind::Read, 0, vec![at(0, 16)], 20);
    out.clear();
    q.drain(&mut out);
    assert!(out.iter().all(|c| c.result == Ok(16 * 4096)), "{out:?}");
    submit(&mut q, ReqKind::Read, 0, vec![at(16, 16)], 21);
    out.clear();
    q.drain(&mut out);
    assert!(out.iter().all(|c| c.result == Ok(16 * 4096)), "{out:?}");
    assert!(q.fixed_submissions() > 8, "the read into registered memory used a fixed buffer");
    let n = q.fixed_submissions();
    let (first, second) = arena.split_at(16 * 4096);
    assert_eq!(first, second, "fixed and plain reads agree");
    for (b, chunk) in first.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|&x| x == b as u8 + 1), "block {b}");
    }
    // A buffer straddling the end of the registered range goes the plain way.
    submit(&mut q, ReqKind::Read, 0, vec![at(15, 2)], 22);
    out.clear();
    q.drain(&mut out);
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert_eq!(q.fixed_submissions(), n);
    q.unregister_buffers();
    submit(&mut q, ReqKind::Read, 0, vec![at(0, 1)], 23);
    out.clear();
    q.drain(&mut out);
    assert_eq!(q.fixed_submissions(), n, "nothing registered any more");
}

/// A read over blocks that are not adjacent on the device takes one io_uring operation per
/// block, and a guest may send reads of up to seg_max x size_max (about 1 GiB, 262 144 blocks).
/// The operation's part number once had 16 bits of its user_data: part 65 536 was counted for
/// the request in the next slot, which then finished with its read still in flight, while the
/// big one never finished; and more completions than the CQ ring holds were never seen. Here
/// two 512 MiB reads over every other block (65 540 operations each) and a small read are
/// submitted together: the queue holds the second big read and the small one back (65 536
/// operations in flight at most once one request is), and all three complete with the right data.
#[test]
fn reads_of_more_than_65536_separate_blocks() {
    const N: usize = 65_540; // written blocks: every odd lba below 2N
    let d = tempfile::tempdir().unwrap();
    let p = new_pool(d.path(), 300 * MIB);
    let pool = open(&p);
    pool.create_volume("v", (2 * N as u64) * 4096).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let mut q = v.open_queue().unwrap();
    let aligned = |len: usize| -> Vec<u8> { vec![0u8; len + 4096] };
    let mut wraw = aligned(N * 4096);
    let wbase = wraw.as_ptr().align_offset(4096);
    let src = &mut wraw[wbase..wbase + N * 4096];
    for (i, b) in src.chunks_mut(4096).enumerate() {
        b.copy_from_slice(&block(2 * i as u64 + 1, 7));
    }
    let mut out = Vec::new();
    for (i, b) in src.chunks_mut(4096).enumerate() {
        let lba = 2 * i as u64 + 1;
        // SAFETY: `src` outlives the drain below and is not touched meanwhile.
        unsafe {
            q.submit(Request { kind: ReqKind::Write, offset: lba * 4096, len: 4096, iov: vec![IoVec { ptr: b.as_mut_ptr(), len: 4096 }].into(), tag: i as u64 })
        };
        if i % 256 == 255 {
            q.drain(&mut out);
        }
    }
    q.drain(&mut out);
    assert_eq!(out.len(), N);
    assert!(out.iter().all(|c| c.result == Ok(4096)), "a write failed");
    let len = 2 * N * 4096;
    let mut bufs: Vec<Vec<u8>> = (0..2).map(|_| aligned(len)).collect();
    let mut small = aligned(4096);
    let sbase = small.as_ptr().align_offset(4096);
    let mut ptrs = Vec::new();
    for b in bufs.iter_mut() {
        let base = b.as_ptr().align_offset(4096);
        b[base..base + len].fill(0xee);
        ptrs.push((base, b[base..].as_mut_ptr()));
    }
    // SAFETY: `bufs` and `small` outlive the wait below and are not touched meanwhile.
    unsafe {
        for (t, &(_, ptr)) in ptrs.iter().enumerate() {
            q.submit(Request { kind: ReqKind::Read, offset: 0, len: len as u64, iov: vec![IoVec { ptr, len }].into(), tag: 1 + t as u64 });
        }
        q.submit(Request { kind: ReqKind::Read, offset: 4096, len: 4096, iov: vec![IoVec { ptr: small[sbase..].as_mut_ptr(), len: 4096 }].into(), tag: 3 });
    }
    assert_eq!(q.ops_in_flight(), N, "the second big read and the small one are held back");
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "completions after 120 s: {done:?}");
        q.reap(&mut done);
        assert!(q.ops_in_flight() <= N, "{} operations in flight", q.ops_in_flight());
        q.wait_event(10);
    }
    done.sort_by_key(|c| c.tag);
    let want: Vec<Completion> =
        vec![Completion { tag: 1, result: Ok(len as u32) }, Completion { tag: 2, result: Ok(len as u32) }, Completion { tag: 3, result: Ok(4096) }];
    assert_eq!(done, want);
    assert_eq!(q.ops_in_flight(), 0);
    assert!(small[sbase..sbase + 4096] == block(1, 7), "the small read");
    for (b, &(base, _)) in bufs.iter().zip(&ptrs) {
        for (lba, b) in b[base..base + len].chunks(4096).enumerate() {
            if lba % 2 == 1 {
                assert!(b == block(lba as u64, 7), "block {lba}");
            } else {
                assert!(b.iter().all(|&x| x == 0), "unwritten block {lba} is not zeros");
            }
        }
    }
}
