//! Snapshot costs through the engine API (issue 3's figures).
//!
//! `cargo bench -p vblk-benches --bench snapshots`
//! env: VBLK_BENCH_GIB (size of the "full" volume, default 4), VBLK_BENCH_SECS (per IOPS run,
//! default 5), VBLK_BENCH_REPEATS (default 3), VBLK_BENCH_DIR (pool location, default /tmp).
//!
//! 1. snapshot create latency (p50/p99 of 200) on an empty and on a fully written volume;
//! 2. snapshot delete time against its exclusive data (1k / 10k / 100k overwritten blocks) and
//!    against volume size (same exclusive data, empty vs full volume);
//! 3. 4 KiB random read IOPS at QD32 with 0, 10 and 100 snapshots (with overwrites between
//!    them), and on a clone at chain depth 10;
//! 4. 4 KiB random write IOPS at QD32 right after a snapshot (copy-on-write) vs without;
//! 5. metadata bytes per written GiB, without and with a snapshot's copy-on-write history.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vblk_benches::{engine_qd32, stats};
use vblk_engine::*;

const BS: usize = 4096;


/// 4 KiB random requests of `kind` at QD32 over `span` blocks for `dur`: IOPS.
fn qd32(vol: &Volume, span: u64, kind: ReqKind, dur: Duration) -> f64 {
    engine_qd32(&mut vol.open_queue().unwrap(), span, kind, dur, None)
}

fn fill(vol: &Volume, bytes: u64, byte: u8) {
    let mut io = vol.sync_io().unwrap();
    let chunk = vec![byte; 1 << 20];
    for i in 0..bytes >> 20 {
        io.write_at(i << 20, &chunk).unwrap();
    }
    io.flush().unwrap();
}

/// Overwrite `n` distinct random blocks within `span` (4 KiB each), then flush.
fn overwrite_random(vol: &Volume, span: u64, n: u64, seed: u64) {
    let mut io = vol.sync_io().unwrap();
    let b = vec![0x5au8; BS];
    // A multiplicative walk visits distinct blocks when span is a power of two.
    let mut x = seed % span;
    for _ in 0..n.min(span) {
        io.write_at(x * BS as u64, &b).unwrap();
        x = (x * 5 + 1) % span;
    }
    io.flush().unwrap();
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()).unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("VBLK_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let repeats: usize = std::env::var("VBLK_BENCH_REPEATS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let gib: u64 = std::env::var("VBLK_BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let dur = Duration::from_secs(secs);
    let dir = std::env::var("VBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let path = dir.join("vblk-bench-snap.pool");
    let meta = default_meta_dir(&path);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&meta);
    let prealloc = match std::env::var("VBLK_BENCH_PREALLOC").as_deref() { Ok("full") => Preallocate::Full, Ok("off") => Preallocate::Off, _ => Preallocate::Falloc };
    create_pool(&path, &CreateOptions { size_bytes: Some((3 * gib + 2) << 30), preallocate: prealloc, ..Default::default() }).unwrap();
    let pool = Pool::open(&path, &PoolOptions { cache_bytes: 256 << 20, ..Default::default() }).unwrap();
    let size = gib << 30;
    let span = size / BS as u64;
    pool.create_volume("empty", size).unwrap();
    pool.create_volume("full", size).unwrap();
    let full = pool.open_volume("full", false).unwrap();
    eprintln!("filling {gib} GiB ...");
    let meta0 = dir_bytes(&meta);
    fill(&full, size, 0xa5);
    pool.sync().unwrap();
    let meta_plain = dir_bytes(&meta).saturating_sub(meta0);

    // VBLK_BENCH_PARTS=3,4 runs only those parts (for profiling).
    let parts: Option<Vec<u32>> = std::env::var("VBLK_BENCH_PARTS").ok().map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect());
    let on = |i: u32| parts.as_ref().is_none_or(|p| p.contains(&i));
    // 1. Create latency.
    if on(1) {
    println!("\n## snapshot create ({gib} GiB volume)\n\n| volume | p50 | p99 | max |\n|---|---|---|---|");
    for name in ["empty", "full"] {
        let mut t = Vec::new();
        for i in 0..200 {
            let t0 = Instant::now();
            pool.snapshot_create(name, &format!("c{i}")).unwrap();
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        let (p50, p99, max) = (percentile(&mut t, 0.5), percentile(&mut t, 0.99), percentile(&mut t, 1.0));
        println!("| {name} | {p50:.0} us | {p99:.0} us | {max:.0} us |");
        let t0 = Instant::now();
        for i in 0..200 {
            pool.snapshot_delete(name, &format!("c{i}")).unwrap();
        }
        eprintln!("deleting 200 snapshots with no exclusive data of {name}: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    }

    }
    // 2. Delete time vs exclusive data, and vs volume size.
    let small_size = 64u64 << 20;
    pool.create_volume("small", small_size).unwrap();
    let small = pool.open_volume("small", false).unwrap();
    if on(2) {
    println!("\n## snapshot delete vs exclusive data\n\n| volume | exclusive blocks | delete time | per block |\n|---|---|---|---|");
    fill(&small, small_size, 0x11);
    for (name, vol, vspan, n) in
        [("full", &full, span, 1_000u64), ("full", &full, span, 10_000), ("full", &full, span, 100_000), ("small", &small, small_size / 4096, 10_000)]
    {
        pool.snapshot_create(name, "d").unwrap();
        overwrite_random(vol, vspan, n, 7);
        let ex = pool.snapshot_list(Some(name)).unwrap().iter().find(|s| s.name == "d").map(|s| s.exclusive_bytes / 4096).unwrap_or(0);
        let t0 = Instant::now();
        pool.snapshot_delete(name, "d").unwrap();
        let el = t0.elapsed().as_secs_f64();
        println!("| {name} ({} MiB) | {ex} | {:.1} ms | {:.2} us |", if name == "small" { small_size >> 20 } else { size >> 20 }, el * 1e3, el * 1e6 / ex.max(1) as f64);
    }

    }
    // 3. Read IOPS vs snapshot count, and on a deep clone.
    if on(3) {
    let mut reads: Vec<(String, Vec<f64>)> = Vec::new();
    let mut depth = 0;
    for want in [0usize, 10, 100] {
        while depth < want {
            pool.snapshot_create("full", &format!("r{depth}")).unwrap();
            overwrite_random(&full, span, span / 200, depth as u64 + 11);
            depth += 1;
        }
        let mut v = Vec::new();
        for _ in 0..repeats {
            v.push(qd32(&full, span, ReqKind::Read, dur));
        }
        reads.push((format!("volume with {want} snapshots"), v));
    }
    // A clone of a clone ... 10 deep, reading data inherited from the first volume.
    let mut parent = ("full".to_string(), "r99".to_string());
    for i in 0..10 {
        let name = format!("cl{i}");
        pool.clone_volume(&parent.0, &parent.1, &name).unwrap();
        pool.snapshot_create(&name, "s").unwrap();
        parent = (name, "s".into());
    }
    let deep = pool.open_volume("cl9", false).unwrap();
    let mut v = Vec::new();
    for _ in 0..repeats {
        v.push(qd32(&deep, span, ReqKind::Read, dur));
    }
    reads.push(("clone at chain depth 10".into(), v));
    drop(deep);
    println!("\n## 4 KiB random read, QD32\n\n| case | IOPS median | min-max | vs 0 snapshots |\n|---|---|---|---|");
    let base = stats(&reads[0].1).0;
    for (n, v) in &reads {
        let (m, lo, hi) = stats(v);
        println!("| {n} | {m:.0} | {lo:.0}-{hi:.0} | {:.2}x |", m / base);
    }

    }
    // 4. Random writes right after a snapshot vs without (interleaved).
    if on(4) {
    pool.create_volume("w", size).unwrap();
    let w = pool.open_volume("w", false).unwrap();
    fill(&w, size, 0x33);
    pool.create_volume("fresh", size).unwrap();
    let fresh = pool.open_volume("fresh", false).unwrap();
    let (mut plain, mut cow, mut alloc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..repeats {
        plain.push(qd32(&w, span, ReqKind::Write, dur));
        pool.snapshot_create("w", &format!("w{i}")).unwrap();
        cow.push(qd32(&w, span, ReqKind::Write, dur));
        pool.sync().unwrap();
        pool.snapshot_delete("w", &format!("w{i}")).unwrap();
        alloc.push(qd32(&fresh, span, ReqKind::Write, dur));
        let mut io = fresh.sync_io().unwrap();
        io.discard(0, size).unwrap();
        io.flush().unwrap();
    }
    let (pm, plo, phi) = stats(&plain);
    let (cm, clo, chi) = stats(&cow);
    println!("\n## 4 KiB random write, QD32 ({secs} s after the snapshot)\n\n| case | IOPS median | min-max | ratio |\n|---|---|---|---|");
    println!("| overwrite, no snapshot | {pm:.0} | {plo:.0}-{phi:.0} | 1.00x |");
    println!("| right after a snapshot (copy-on-write) | {cm:.0} | {clo:.0}-{chi:.0} | {:.2}x |", cm / pm);
    let (am, alo, ahi) = stats(&alloc);
    println!("| fresh volume (allocating, no snapshot) | {am:.0} | {alo:.0}-{ahi:.0} | {:.2}x |", am / pm);

    }
    // 5. Metadata per written GiB.
    if on(5) {
    pool.create_volume("m", 1 << 30).unwrap();
    let mv = pool.open_volume("m", false).unwrap();
    fill(&mv, 1 << 30, 1);
    pool.snapshot_create("m", "s").unwrap();
    let before = dir_bytes(&meta);
    fill(&mv, 1 << 30, 2);
    pool.sync().unwrap();
    let cow_meta = dir_bytes(&meta).saturating_sub(before);
    println!("\n## metadata per written GiB (RocksDB directory growth, before compaction)\n");
    println!("- {gib} GiB written to a new volume: {:.1} MiB per GiB", meta_plain as f64 / gib as f64 / (1 << 20) as f64);
    println!("- 1 GiB overwritten after a snapshot (new entry + history + dead list + birth index per block): {:.1} MiB", cow_meta as f64 / (1 << 20) as f64);

    }
    drop(small);
    drop(full);
    drop(pool);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&meta);
}
