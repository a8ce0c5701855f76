//! Engine API vs raw io_uring, 4 KiB random I/O at QD32 on the same pool file.
//!
//! `cargo bench -p vblk-benches --bench engine_qd32` (env: VBLK_BENCH_SECS per run, default 5;
//! VBLK_BENCH_REPEATS, default 3; VBLK_BENCH_DIR for the pool file, default the target dir;
//! VBLK_BENCH_GIB working-set size, default 1).
//! Rows are interleaved A B C ... A B C ...; medians and min-max are printed.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use vblk_benches::{engine_qd32, run_for, stats, Aligned, Rng};
use vblk_engine::*;

const QD: usize = 32;
const BS: usize = 4096;


/// Raw io_uring O_DIRECT at QD32 over `blocks` blocks starting at 1 MiB (the pool's data area).
fn raw(path: &PathBuf, blocks: u64, write: bool, dur: Duration) -> f64 {
    let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let mut ring = IoUring::new(64).unwrap();
    let mut buf = Aligned::new(QD * BS);
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let submit_one = |ring: &mut IoUring, slot: usize, rng: &mut Rng, buf: &mut Aligned| {
        let off = (1 << 20) + (rng.next() % blocks) * BS as u64;
        let p = buf.ptr(slot);
        let e = if write {
            opcode::Write::new(types::Fd(f.as_raw_fd()), p, BS as u32).offset(off).build()
        } else {
            opcode::Read::new(types::Fd(f.as_raw_fd()), p, BS as u32).offset(off).build()
        };
        // SAFETY: the buffer slot stays alive and unused until its completion is reaped.
        unsafe { ring.submission().push(&e.user_data(slot as u64)).unwrap() };
    };
    for s in 0..QD {
        submit_one(&mut ring, s, &mut rng, &mut buf);
    }
    run_for(dur, || {
        ring.submit_and_wait(1).unwrap();
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in &done {
            assert_eq!(*res, BS as i32);
            submit_one(&mut ring, *slot as usize, &mut rng, &mut buf);
        }
        done.len() as u64
    })
}

fn main() {
    let secs: u64 = std::env::var("VBLK_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let repeats: usize = std::env::var("VBLK_BENCH_REPEATS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let gib: u64 = std::env::var("VBLK_BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dur = Duration::from_secs(secs);
    let dir = std::env::var("VBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let path = dir.join("vblk-bench-engine.pool");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(default_meta_dir(&path));
    let span = gib << 18; // blocks
    create_pool(&path, &CreateOptions { size_bytes: Some((gib * 3 + 1) << 30), ..Default::default() }).unwrap();
    let pool = Pool::open(&path, &PoolOptions::default()).unwrap();
    pool.create_volume("full", gib << 30).unwrap();
    pool.create_volume("fresh", 2 * gib << 30).unwrap();
    let full = pool.open_volume("full", false).unwrap();
    {
        eprintln!("filling {gib} GiB ...");
        let mut io = full.sync_io().unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..(gib << 10) {
            io.write_at(i << 20, &chunk).unwrap();
        }
        io.flush().unwrap();
    }
    // The "full" volume's blocks were allocated in order, so raw offsets over the same span hit
    // the same physical area.
    let mut q = full.open_queue().unwrap();
    let fresh_vol = pool.open_volume("fresh", false).unwrap();
    let mut fq = fresh_vol.open_queue().unwrap();
    let mut fresh_next = 0u64;
    let names = ["raw randread", "vblk randread", "raw randwrite", "vblk overwrite", "vblk allocating write"];
    let mut res: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // VBLK_BENCH_ONLY=1,3 runs only those rows (for profiling).
    let only: Option<Vec<usize>> = std::env::var("VBLK_BENCH_ONLY").ok().map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect());
    let on = |i: usize| only.as_ref().is_none_or(|o| o.contains(&i));
    for rep in 0..repeats {
        if on(0) { res[0].push(raw(&path, span, false, dur)); }
        if on(1) { res[1].push(engine_qd32(&mut q, span, ReqKind::Read, dur, None)); }
        if on(2) { res[2].push(raw(&path, span, true, dur)); }
        if on(3) { res[3].push(engine_qd32(&mut q, span, ReqKind::Write, dur, None)); }
        if !on(4) { eprintln!("repeat {} done", rep + 1); continue; }
        if fresh_next > 0 {
            fresh_next = 0;
            let mut io = fresh_vol.sync_io().unwrap();
            io.discard(0, 2 * gib << 30).unwrap();
            io.flush().unwrap();
        }
        res[4].push(engine_qd32(&mut fq, span, ReqKind::Write, dur, Some(&mut fresh_next)));
        eprintln!("repeat {} done", rep + 1);
    }
    println!("\n| 4 KiB QD32, {secs} s x {repeats} | IOPS median | min-max | vs raw |");
    println!("|---|---|---|---|");
    for (i, n) in names.iter().enumerate() {
        if res[i].is_empty() { continue; }
        let (m, lo, hi) = stats(&res[i]);
        let base_of = |j: usize| if res[j].is_empty() { f64::NAN } else { stats(&res[j]).0 };
        let base = if i == 1 { base_of(0) } else if i >= 3 { base_of(2) } else { m };
        println!("| {n} | {m:.0} | {lo:.0}-{hi:.0} | {:.2}x |", m / base);
    }
    drop(q);
    drop(fq);
    drop(full);
    drop(fresh_vol);
    drop(pool);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(default_meta_dir(&path));
}
