//! Daemon memory with many attached, partly written volumes: RSS of the real `vblk daemon` with
//! VBLK_MEM_VOLS (16) attached volumes of VBLK_MEM_VOL_GIB (10) GiB, each with
//! VBLK_MEM_GIB_PER_VOL (1) GiB written as distinct random 4 KiB blocks through a vhost-user-blk
//! client (libblkio) at QD32, every client still connected (as VMs would be).
//!
//! `cargo bench -p vblk-benches --bench daemon_memory`
//! env: VBLK_MEM_VOLS, VBLK_MEM_VOL_GIB, VBLK_MEM_GIB_PER_VOL (fractions allowed), VBLK_MEM_CACHE
//! (the daemon's --cache, default 64M), VBLK_BENCH_DIR (/var/tmp), VBLK_BENCH_SMOKE=1 (2 volumes
//! x 16 MiB; results to target/), VBLK_BIN.
//! The pool is a sparse file (--preallocate off: this measures metadata, not data placement) of
//! max(20 GiB, written + 4 GiB); if the file system has no room for the written data, the
//! amount per volume is reduced and the report says so.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vblk_benches::vhost::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BS: u64 = 4096;
const QD: usize = 32;

/// Memory figures of a process, KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    threads: u64,
}

/// How long the daemon settles before a measurement: more than its heap-trim check (every second).
const SETTLE: Duration = Duration::from_secs(6);

fn mem(pid: u32) -> Result<Mem> {
    Ok(Mem {
        rss: proc_status(pid, "VmRSS")?,
        hwm: proc_status(pid, "VmHWM")?,
        anon: proc_status(pid, "RssAnon")?,
        file: proc_status(pid, "RssFile")?,
        shmem: proc_status(pid, "RssShmem")?,
        threads: proc_status(pid, "Threads")?,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn du_bytes(p: &Path) -> u64 {
    Command::new("du")
        .args(["-sb"])
        .arg(p)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    install_stop_handler();
    if let Err(e) = real_main() {
        eprintln!("daemon_memory failed: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let smoke = smoke();
    let vols: usize = if smoke { 2 } else { env_or("VBLK_MEM_VOLS", 16) };
    let vol_gib: f64 = env_or("VBLK_MEM_VOL_GIB", 10.0);
    let gib_per_vol: f64 = if smoke { 16.0 / 1024.0 } else { env_or("VBLK_MEM_GIB_PER_VOL", 1.0) };
    let cache: String = env_or("VBLK_MEM_CACHE", "64M".to_string());
    let vol_size = ((vol_gib * GIB as f64) as u64 / MIB).max(1) * MIB;
    let mut per_vol = ((gib_per_vol * GIB as f64) as u64 / BS) * BS;
    if per_vol > vol_size {
        bail!("VBLK_MEM_GIB_PER_VOL ({gib_per_vol}) is larger than the volumes ({vol_gib} GiB)");
    }
    let base_dir = bench_dir();
    let t_start = Instant::now();
    let vblk_bin = ensure_vblk_bin()?;

    // Room for the written data plus metadata; shrink the test if the disk is short.
    let free = free_bytes(&base_dir)?;
    let slack = GIB;
    let mut shrunk = String::new();
    if free < vols as u64 * per_vol + slack {
        let fit = (free.saturating_sub(slack) / vols as u64 * 8 / 10 / BS) * BS;
        if fit < 16 * MIB {
            bail!("{} has only {:.1} GiB free: not enough for this test", base_dir.display(), free as f64 / GIB as f64);
        }
        shrunk = format!(
            "**Shrunk**: {} had {:.1} GiB free, so each volume got {} MiB written instead of {} MiB.\n\n",
            base_dir.display(),
            free as f64 / GIB as f64,
            fit / MIB,
            per_vol / MIB
        );
        eprintln!("{}", shrunk.trim());
        per_vol = fit;
    }
    let writes_per_vol = per_vol / BS;
    let pool_size = (20 * GIB).max(vols as u64 * per_vol + 4 * GIB);

    let tmp = tempfile::Builder::new().prefix("vblk-daemon-memory-").tempdir_in(&base_dir).context("creating the work directory")?;
    let dir = tmp.path().to_path_buf();
    eprintln!(
        "daemon_memory: {vols} volumes x {} MiB virtual, {} MiB ({writes_per_vol} x 4 KiB) written each, --cache {cache}, in {}{}",
        vol_size / MIB,
        per_vol / MIB,
        dir.display(),
        if smoke { " (SMOKE)" } else { "" }
    );
    let pool = dir.join("pool.img");
    run_cmd(Command::new(&vblk_bin).args(["pool", "create"]).arg(&pool).args(["--size", &pool_size.to_string(), "--preallocate", "off"]))?;

    let mut d = VblkDaemon::start(&dir, &pool, &cache, &[])?;
    let pid = d.pid();
    let m_start = mem(pid)?;
    eprintln!("after start: RSS {} MiB", mib(m_start.rss));

    let mut socks = Vec::new();
    for i in 0..vols {
        check_stop()?;
        let name = format!("v{i:02}");
        d.cli(&["vol", "create", &name, &vol_size.to_string()])?;
        let sock = dir.join(format!("{name}.sock"));
        d.cli(&["attach", &name, "--socket", sock.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "--queues", "1"])?;
        socks.push(sock);
    }
    for s in &socks {
        vblk_tests::wait_for_socket(s, Duration::from_secs(30))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let m_attached = mem(pid)?;
    eprintln!("{vols} volumes attached, no client: RSS {} MiB", mib(m_attached.rss));

    // While the clients write, sample the daemon: its RSS every 100 ms and the `pool status`
    // memory breakdown every second; keep the breakdown taken at the highest RSS seen, so the
    // report can say what the peak (VmHWM) is made of.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let api = d.api.clone();
        std::thread::spawn(move || {
            let mut best: Option<(u64, serde_json::Value)> = None;
            let mut last = Instant::now() - Duration::from_secs(1);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let rss = proc_status(pid, "VmRSS").unwrap_or(0);
                let higher = best.as_ref().is_none_or(|(r, _)| rss > *r + 1024);
                if higher && last.elapsed() >= Duration::from_millis(1000) {
                    last = Instant::now();
                    if let Ok(st) = vblk_tests::vblk_json(&api, &["pool", "status"]) {
                        let r = st["memory"]["rss_bytes"].as_u64().unwrap_or(0) / 1024;
                        if best.as_ref().is_none_or(|(b, _)| r > *b) {
                            best = Some((r, st));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            best.map(|(_, st)| st)
        })
    };
    let mut clients = Vec::new();
    let mut rates = Vec::new();
    let t_io = Instant::now();
    for (i, s) in socks.iter().enumerate() {
        check_stop()?;
        let mut c = BenchClient::connect(s, 1, QD * BS as usize)?;
        if c.capacity() != vol_size {
            bail!("volume {i}: capacity {} != {vol_size}", c.capacity());
        }
        let spec = Spec {
            write: true,
            bs: BS,
            qd: QD,
            pattern: Pattern::Distinct,
            span: vol_size,
            dur: None,
            limit: Some(writes_per_vol),
            record_latency: false,
            seed: 0xA110C + i as u64,
        };
        let out = c.run(&spec)?;
        if out.ops != writes_per_vol {
            bail!("volume {i}: {} writes done, expected {writes_per_vol}", out.ops);
        }
        c.flush()?;
        eprintln!(
            "v{i:02}: {} writes in {:.1} s ({:.0} IOPS), daemon RSS {} MiB",
            out.ops,
            out.secs,
            out.iops(),
            mib(proc_status(pid, "VmRSS")?)
        );
        rates.push(out.iops());
        clients.push(c);
    }
    let io_secs = t_io.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let status_peak = sampler.join().map_err(|_| anyhow!("the memory sampler panicked"))?;
    std::thread::sleep(SETTLE);
    let m_written = mem(pid)?;
    let status = d.json(&["pool", "status"])?;
    let used = status["used_bytes"].as_u64().unwrap_or(0);
    let expect = vols as u64 * per_vol;
    let meta_dir = dir.join("pool.img.meta");
    let meta_bytes = du_bytes(&meta_dir);
    drop(clients);
    std::thread::sleep(SETTLE);
    let m_disconnected = mem(pid)?;
    let status_disc = d.json(&["pool", "status"])?;
    d.stop()?;

    // Report.
    let mut md = String::new();
    md += &format!("# vblk daemon memory with {vols} attached volumes ({})\n\n", today());
    md += &format!(
        "`{}cargo bench -p vblk-benches --bench daemon_memory`; total run {:.0} s.\n\n",
        if smoke { "VBLK_BENCH_SMOKE=1 " } else { "" },
        t_start.elapsed().as_secs_f64()
    );
    md += &shrunk;
    md += &machine_facts(&base_dir);
    md += &format!(
        "- pool: sparse file (`--preallocate off`), {} GiB; daemon `--cache {cache}` (RocksDB block cache)\n",
        pool_size / GIB
    );
    md += &format!(
        "- {vols} volumes of {} MiB, each attached with 1 queue; {} MiB per volume written as {writes_per_vol} distinct random \
         4 KiB blocks at QD32 through libblkio (virtio-blk-vhost-user), then a flush; clients stay connected\n",
        vol_size / MIB,
        per_vol / MIB
    );
    md += &format!(
        "- writes: {:.0} IOPS median per volume, {:.1} s in all; pool used after: {} MiB (expected {} MiB); metadata directory (RocksDB) on disk: {:.1} MiB\n\n",
        vblk_benches::stats(&rates).0,
        io_secs,
        used / MIB,
        expect / MIB,
        meta_bytes as f64 / MIB as f64
    );
    md += "| daemon state | VmRSS MiB | VmHWM MiB | RssAnon MiB | RssFile MiB | RssShmem MiB | threads |\n";
    md += "|---|---|---|---|---|---|---|\n";
    for (what, m) in [
        ("right after start (API answering)".to_string(), m_start),
        (format!("{vols} volumes created and attached, no client"), m_attached),
        (format!("{vols} clients connected, {} MiB written each, 6 s after the last flush", per_vol / MIB), m_written),
        ("all clients disconnected, 6 s later".to_string(), m_disconnected),
    ] {
        md += &format!(
            "| {what} | {} | {} | {} | {} | {} | {} |\n",
            mib(m.rss),
            mib(m.hwm),
            mib(m.anon),
            mib(m.file),
            mib(m.shmem),
            m.threads
        );
    }
    md += &format!(
        "\nGrowth from start to written: {} MiB RSS ({:.1} KiB per written MiB); RssShmem counts the clients' \
         shared buffers and rings the daemon has touched.\n",
        mib(m_written.rss.saturating_sub(m_start.rss)),
        m_written.rss.saturating_sub(m_start.rss) as f64 / (expect as f64 / MIB as f64).max(1.0)
    );
    md += "\nWhere it goes (`vblk pool status --json`, field `memory`; MiB):\n\n";
    md += "| daemon state | RSS | heap in use | heap free (trimmed pages not resident) | map cache (entries) | uncommitted map | RocksDB block cache | memtables | table readers |\n";
    md += "|---|---|---|---|---|---|---|---|---|\n";
    let mut rows = Vec::new();
    if let Some(st) = &status_peak {
        rows.push(("highest RSS sampled while writing", st));
    }
    rows.push(("written, clients connected", &status));
    rows.push(("clients disconnected", &status_disc));
    for (what, st) in rows {
        let m = &st["memory"];
        let f = |k: &str| format!("{:.1}", m[k].as_u64().unwrap_or(0) as f64 / MIB as f64);
        md += &format!(
            "| {what} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |\n",
            f("rss_bytes"),
            f("heap_in_use_bytes"),
            f("heap_free_bytes"),
            f("map_cache_bytes"),
            m["map_cache_entries"].as_u64().unwrap_or(0),
            f("pending_bytes"),
            f("rocksdb_block_cache_bytes"),
            f("rocksdb_memtable_bytes"),
            f("rocksdb_table_readers_bytes")
        );
    }
    if used != expect {
        md += &format!("\n**Note**: pool used bytes {used} differ from the {expect} bytes written.\n");
    }
    println!("\n{md}");
    let out = results_path("daemon_memory", smoke)?;
    std::fs::write(&out, &md)?;
    eprintln!("wrote {}", out.display());
    tmp.close().context("removing the work directory")?;
    Ok(())
}
