//! QoS accuracy and cost: how close a volume held to an IOPS or bandwidth limit comes to it,
//! measured from the host through vhost-user-blk (libblkio, closed loop), for limits from 500
//! to 50 000 IOPS (4 KiB random reads, QD32) and 10 to 500 MiB/s (64 KiB random reads, QD16);
//! and the `vblk daemon`'s CPU time per I/O (utime + stime from /proc/PID/stat) without limits
//! (at QD32, and at QD1 where every request costs a wake-up), with a limit that is active but
//! never reached (the admission cost on the hot path), and with a limit that throttles (timer
//! wake-ups, each admitting a batch).
//!
//! `cargo bench -p vblk-benches --bench qos_accuracy`
//! env: VBLK_QOS_SECS (10: measured seconds per point, after a 1 s warm-up that spends the
//! initial burst), VBLK_BENCH_DIR (/var/tmp), VBLK_BENCH_SMOKE=1 (two limits of each kind,
//! 1.5 s each; results to target/), VBLK_BIN.
//!
//! The reads go to unwritten blocks, which the engine answers without disk I/O: this measures
//! the QoS mechanism, not the disk, and keeps even 50 000 IOPS and 500 MiB/s below the
//! device's own speed (the unlimited figures are in the report, so a limit above them would
//! show). Target: every point within ±5% of its limit.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use vblk_benches::vhost::*;

const MIB: u64 = 1 << 20;
const VOL: &str = "v";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    install_stop_handler();
    if let Err(e) = real_main() {
        eprintln!("qos_accuracy failed: {e:#}");
        std::process::exit(1);
    }
}

/// One closed-loop workload.
#[derive(Clone, Copy)]
struct Work {
    bs: u64,
    qd: usize,
}

const IOPS_WORK: Work = Work { bs: 4096, qd: 32 };
const BPS_WORK: Work = Work { bs: 64 << 10, qd: 16 };

struct Point {
    ops: u64,
    secs: f64,
    cpu_secs: f64,
}

impl Point {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn cpu_us_per_io(&self) -> f64 {
        self.cpu_secs * 1e6 / self.ops.max(1) as f64
    }
}

struct Bench {
    daemon: VblkDaemon,
    client: BenchClient,
    warm: Duration,
    secs: Duration,
}

impl Bench {
    /// Warm up (spends the bucket's initial burst), then measure `secs`.
    fn run(&mut self, w: Work) -> Result<Point> {
        check_stop()?;
        let spec = |dur| Spec {
            write: false,
            bs: w.bs,
            qd: w.qd,
            pattern: Pattern::Random,
            span: 256 * MIB,
            dur: Some(dur),
            limit: None,
            record_latency: false,
            seed: 0x9005,
        };
        self.client.run(&spec(self.warm))?;
        let pid = self.daemon.pid();
        let c0 = proc_cpu_seconds(pid)?;
        let out = self.client.run(&spec(self.secs))?;
        let c1 = proc_cpu_seconds(pid)?;
        Ok(Point { ops: out.ops, secs: out.secs, cpu_secs: c1 - c0 })
    }

    fn set(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["qos", "set", VOL, "--clear"];
        a.extend_from_slice(args);
        self.daemon.cli(&a).map(|_| ())
    }
}

fn real_main() -> Result<()> {
    let smoke = smoke();
    let secs: f64 = if smoke { 1.5 } else { env_or("VBLK_QOS_SECS", 10.0) };
    let warm = if smoke { 0.3 } else { 1.0 };
    let iops_limits: Vec<u64> = if smoke { vec![500, 50_000] } else { vec![500, 1000, 2000, 5000, 10_000, 20_000, 50_000] };
    let mib_limits: Vec<u64> = if smoke { vec![10, 500] } else { vec![10, 25, 50, 100, 200, 500] };
    let t_start = Instant::now();
    let vblk_bin = ensure_vblk_bin()?;
    let base_dir = bench_dir();
    let tmp = tempfile::Builder::new().prefix("vblk-qos-accuracy-").tempdir_in(&base_dir).context("creating the work directory")?;
    let dir = tmp.path().to_path_buf();
    eprintln!("qos_accuracy: {secs} s per point, in {}{}", dir.display(), if smoke { " (SMOKE)" } else { "" });
    let pool = dir.join("pool.img");
    run_cmd(Command::new(&vblk_bin).args(["pool", "create"]).arg(&pool).args(["--size", "2G", "--preallocate", "off"]))?;
    let daemon = VblkDaemon::start(&dir, &pool, "64M", &[])?;
    daemon.cli(&["vol", "create", VOL, "1G"])?;
    let sock = dir.join("v.sock");
    daemon.cli(&["attach", VOL, "--socket", sock.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "--queues", "1"])?;
    vblk_tests::wait_for_socket(&sock, Duration::from_secs(30))?;
    let client = BenchClient::connect(&sock, 1, BPS_WORK.qd * BPS_WORK.bs as usize)?;
    let mut b = Bench { daemon, client, warm: Duration::from_secs_f64(warm), secs: Duration::from_secs_f64(secs) };

    // Ceilings and CPU cost.
    let free_iops = b.run(IOPS_WORK)?;
    let free_qd1 = b.run(Work { bs: 4096, qd: 1 })?;
    let free_bps = b.run(BPS_WORK)?;
    let free_mib = free_bps.iops() * BPS_WORK.bs as f64 / MIB as f64;
    eprintln!("unlimited: {:.0} IOPS (4 KiB QD32), {free_mib:.0} MiB/s (64 KiB QD16)", free_iops.iops());
    b.set(&["--iops-total", "100000000"])?;
    let idle_limit = b.run(IOPS_WORK)?;
    b.set(&["--iops-total", "20000"])?;
    let throttled = b.run(IOPS_WORK)?;
    eprintln!(
        "CPU per I/O: {:.2} µs unlimited, {:.2} µs with a limit not reached, {:.2} µs throttled to 20000 IOPS",
        free_iops.cpu_us_per_io(),
        idle_limit.cpu_us_per_io(),
        throttled.cpu_us_per_io()
    );

    let mut rows = Vec::new();
    for &l in &iops_limits {
        b.set(&["--iops-total", &l.to_string()])?;
        let p = b.run(IOPS_WORK)?;
        let err = p.iops() / l as f64 - 1.0;
        eprintln!("iops-total {l}: {:.1} IOPS ({:+.2}%)", p.iops(), err * 100.0);
        rows.push((format!("iops-total {l}"), l as f64, p.iops(), "IOPS", err, p.cpu_us_per_io()));
    }
    for &m in &mib_limits {
        b.set(&["--bps-total", &format!("{m}M")])?;
        let p = b.run(BPS_WORK)?;
        let got = p.iops() * BPS_WORK.bs as f64 / MIB as f64;
        let err = got / m as f64 - 1.0;
        eprintln!("bps-total {m} MiB/s: {got:.2} MiB/s ({:+.2}%)", err * 100.0);
        rows.push((format!("bps-total {m}M"), m as f64, got, "MiB/s", err, p.cpu_us_per_io()));
    }
    b.set(&[])?;
    let qos = b.daemon.json(&["qos", "show", VOL])?;
    drop(b.client);
    b.daemon.stop()?;

    // Report.
    let ok = rows.iter().filter(|r| r.4.abs() <= 0.05).count();
    let mut md = String::new();
    md += &format!("# vblk QoS accuracy ({})\n\n", today());
    md += &format!(
        "`{}cargo bench -p vblk-benches --bench qos_accuracy`; {secs} s measured per point after a {warm} s warm-up; \
         total run {:.0} s.\n\n",
        if smoke { "VBLK_BENCH_SMOKE=1 " } else { "" },
        t_start.elapsed().as_secs_f64()
    );
    md += &machine_facts(&base_dir);
    md += &format!(
        "\nOne volume, one queue, `vblk qos set v --clear --LIMIT N` between points; random reads of unwritten blocks \
         (no disk I/O) from the host through libblkio, closed loop. Unlimited: {:.0} IOPS (4 KiB, QD32), {free_mib:.0} MiB/s \
         (64 KiB, QD16).\n\n",
        free_iops.iops()
    );
    md += &format!("**{ok} of {} points within ±5%.**\n\n", rows.len());
    md += "| limit | measured | error | within ±5% | daemon CPU per I/O |\n|---|---:|---:|:-:|---:|\n";
    for (name, _, got, unit, err, cpu) in &rows {
        md += &format!(
            "| {name} | {got:.1} {unit} | {:+.2}% | {} | {cpu:.2} µs |\n",
            err * 100.0,
            if err.abs() <= 0.05 { "yes" } else { "**no**" }
        );
    }
    md += "\nDaemon CPU per I/O (4 KiB random reads, QD32; utime + stime of the daemon over the measured seconds / I/Os):\n\n";
    md += "| volume | IOPS | daemon CPU per I/O |\n|---|---:|---:|\n";
    for (name, p) in [
        ("no limits (QoS inactive: one atomic load per pass)", &free_iops),
        ("no limits, QD1 (one request per wake-up, for comparison)", &free_qd1),
        ("`--iops-total 100000000` (admitted by the limiter, never waits)", &idle_limit),
        ("`--iops-total 20000` (throttled: timerfd wake-ups)", &throttled),
    ] {
        md += &format!("| {name} | {:.0} | {:.2} µs |\n", p.iops(), p.cpu_us_per_io());
    }
    md += &format!("\nQoS counters at the end (`vblk qos show v --json`): `{}`\n", qos["stats"]);
    let path = results_path("qos-accuracy", smoke)?;
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    eprintln!("results written to {}", path.display());
    Ok(())
}
