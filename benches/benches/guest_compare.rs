//! The same servers as `vhost_compare`'s (b) and (e), seen from inside a QEMU guest running fio:
//!
//! - (b) qemu-storage-daemon exporting a raw file over vhost-user-blk;
//! - (e) vblk: a fully written volume (filled with `vblk import` of that raw file; pool created
//!   with `--preallocate full`).
//!
//! For every repeat, each server in turn (b e b e ...) is started fresh, the test guest
//! (tests/guest, `tests/src/guest.rs`: KVM where it really works, else TCG) boots with the
//! export as `/dev/vda` (one `vhost-user-blk-pci` device, one queue) and runs the `fio-bench`
//! scenario of `tests/guest/init`: 4 KiB randread QD1 (IOPS, mean and p99 completion latency),
//! 4 KiB randread QD32 and 4 KiB randwrite QD32 (IOPS), VBLK_BENCH_SECS each, O_DIRECT, over the
//! whole disk. Reported: medians with min-max, the ratio (e)/(b), and next to it the (e)/(b)
//! ratio of the newest host-side `vhost_compare` result in benches/results/ (or
//! VBLK_BENCH_HOST_RESULT) and whether the two point the same way. Diagnostics: virtio
//! interrupts per I/O in the guest, and the server's CPU and context switches per guest I/O and
//! thread count (sampled on the host when the guest prints VBLK-FIO-DONE, still connected).
//!
//! Under TCG the guest's CPU is emulated, which caps its IOPS far below what either server can
//! do: only the direction of the differences and the latency ordering mean anything.
//!
//! `cargo bench -p vblk-benches --bench guest_compare`
//! env: VBLK_BENCH_SECS per fio job (5), VBLK_BENCH_REPEATS (2), VBLK_BENCH_MIB disk size (512),
//! VBLK_BENCH_DIR (/var/tmp), VBLK_BENCH_PREALLOC pool --preallocate (full), VBLK_BENCH_CACHE vblk
//! --cache (64M), VBLK_BENCH_HOST_RESULT (a vhost_compare results file to compare directions
//! with), VBLK_BENCH_SMOKE=1 (2 s jobs, 1 repeat, 64 MiB; results to target/ instead of
//! benches/results/), VBLK_BIN, and the guest harness's VBLK_GUEST_DIR, VBLK_QEMU,
//! VBLK_GUEST_VERBOSE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vblk_benches::stats;
use vblk_benches::vhost::*;
use vblk_tests::guest::{self, DiskSpec, GuestRun};

const MIB: u64 = 1 << 20;
/// Queues each server exports and the guest's device uses (fio runs one job: one queue).
const QUEUES: u32 = 1;
/// Guest RAM (the fio initramfs unpacks to about 80 MiB of tmpfs).
const GUEST_MEM_MIB: u32 = 768;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Server {
    QsdRaw,
    Vblk,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::QsdRaw => "(b) qsd, raw file",
            Server::Vblk => "(e) vblk, volume (written)",
        }
    }
}

/// What the guest measures: the `VBLK-INFO` key, a title, whether higher is better, and where
/// `vhost_compare`'s results file has the matching (e)/(b) ratio.
struct Metric {
    key: &'static str,
    title: &'static str,
    higher_better: bool,
    host: HostRef,
}

#[derive(Clone, Copy)]
enum HostRef {
    /// "vs (b)" column of the throughput table row with this workload title.
    Rate(&'static str),
    /// "vs (b)" of the mean (false) or p99 (true) in the "4K randread QD1 latency" table.
    Qd1Lat(bool),
}

const METRICS: &[Metric] = &[
    Metric { key: "fio.rr4k-qd1.iops", title: "4K randread QD1, IOPS", higher_better: true, host: HostRef::Rate("4K randread QD1 (IOPS)") },
    Metric { key: "fio.rr4k-qd1.clat_mean_us", title: "4K randread QD1, mean clat µs", higher_better: false, host: HostRef::Qd1Lat(false) },
    Metric { key: "fio.rr4k-qd1.clat_p99_us", title: "4K randread QD1, p99 clat µs", higher_better: false, host: HostRef::Qd1Lat(true) },
    Metric { key: "fio.rr4k-qd1.lat_mean_us", title: "4K randread QD1, mean total lat µs", higher_better: false, host: HostRef::Qd1Lat(false) },
    Metric {
        key: "fio.rr4k-qd32.iops",
        title: "4K randread QD32, IOPS",
        higher_better: true,
        host: HostRef::Rate("4K randread QD32, 1 queue (IOPS)"),
    },
    Metric {
        key: "fio.rw4k-qd32.iops",
        title: "4K randwrite QD32, IOPS",
        higher_better: true,
        host: HostRef::Rate("4K randwrite QD32, 1 queue (IOPS)"),
    },
];

/// Diagnostics: per guest run, figures that may explain a difference (not compared with the host).
const DIAG: &[(&str, &str)] = &[
    ("fio.rr4k-qd1.irq_per_io", "guest: virtio interrupts per I/O, randread QD1"),
    ("fio.rr4k-qd32.irq_per_io", "guest: virtio interrupts per I/O, randread QD32"),
    ("fio.rw4k-qd32.irq_per_io", "guest: virtio interrupts per I/O, randwrite QD32"),
    ("server.cpu_us_per_io", "server: CPU µs per guest I/O (boot to end of fio)"),
    ("server.ctxsw_per_io", "server: context switches per guest I/O (boot to end of fio)"),
    ("server.threads", "server: threads"),
];

/// The server process's use of the host while one guest ran.
struct ServerUse {
    cpu_s: f64,
    ctxsw: u64,
    threads: u64,
}

/// Voluntary + involuntary context switches of every live thread of `pid`.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let mut n = 0;
    for t in tasks.flatten() {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else { continue };
        for line in st.lines() {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:").or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:")) {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}

/// Run the guest (`f`, which calls its argument when the guest's fio jobs are over) and measure
/// server `pid` from before QEMU starts to that moment. Threads the server starts for the
/// connection count from zero; none ends before the sample (the guest is still connected).
fn measured<T>(pid: u32, f: impl FnOnce(Box<dyn FnOnce() + '_>) -> Result<T>) -> Result<(T, ServerUse)> {
    let (c0, x0) = (proc_cpu_seconds(pid)?, ctx_switches(pid));
    let sample = std::cell::Cell::new(None);
    let out = f(Box::new(|| sample.set(Some((proc_cpu_seconds(pid).unwrap_or(f64::NAN), ctx_switches(pid), proc_status(pid, "Threads").unwrap_or(0))))))?;
    let (c1, x1, threads) = sample.get().ok_or_else(|| anyhow!("the guest printed no VBLK-FIO-DONE"))?;
    Ok((out, ServerUse { cpu_s: c1 - c0, ctxsw: x1.saturating_sub(x0), threads }))
}

/// One guest run.
struct Run {
    rep: usize,
    server: Server,
    /// METRICS and DIAG values by key.
    values: HashMap<&'static str, f64>,
    engine: String,
    boot_secs: Option<f64>,
    wall: Duration,
}

struct Bench {
    dir: PathBuf,
    raw: PathBuf,
    pool: PathBuf,
    aio: String,
    cache: String,
    secs: u64,
}

impl Bench {
    /// Boot the guest on `sock` and run `fio-bench`; `at_done` runs when the guest prints
    /// VBLK-FIO-DONE (its fio jobs are over, it is still connected).
    fn guest(&self, sock: &Path, at_done: Box<dyn FnOnce() + '_>) -> Result<guest::GuestOutput> {
        let mut run = GuestRun::new("fio-bench", vec![DiskSpec { socket: sock.to_path_buf(), num_queues: QUEUES, reconnect: false }])
            .with_arg(self.secs.to_string());
        run.mem_mib = GUEST_MEM_MIB;
        // Boot (a few seconds under TCG) + the engine probe + three jobs, with a wide margin.
        run.timeout = Duration::from_secs(240 + 6 * self.secs);
        let out = guest::run_guest_with_hook(&run, Some(("VBLK-FIO-DONE", at_done)))?;
        out.ensure_passed()?;
        Ok(out)
    }

    fn run(&self, server: Server) -> Result<(guest::GuestOutput, ServerUse)> {
        check_stop()?;
        let sock = self.dir.join("dev.sock");
        match server {
            Server::QsdRaw => {
                let mut q = Qsd::start(&self.raw, "raw", &self.aio, &sock, QUEUES as usize, &self.dir.join("qsd.log"))?;
                let out = measured(q.pid(), |h| self.guest(&q.sock, h));
                q.stop()?;
                out
            }
            Server::Vblk => {
                let attach = format!("--attach=full:{}:{QUEUES}", sock.display());
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[attach])?;
                vblk_tests::wait_for_socket(&sock, Duration::from_secs(30))?;
                let out = measured(d.pid(), |h| self.guest(&sock, h));
                d.stop()?;
                out
            }
        }
    }
}

fn tool_exists(prog: &str) -> bool {
    Command::new(prog).arg("--version").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok()
}

/// The median (of an even count: the mean of the middle two; `stats` would take the upper one,
/// which with the default 2 repeats is the maximum).
fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

fn fmt_val(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x < 1.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.1}")
    }
}

fn med_range(v: &[f64]) -> (String, String) {
    if v.is_empty() {
        return ("–".into(), "–".into());
    }
    let (_, lo, hi) = stats(v);
    let m = median(v).unwrap_or(f64::NAN);
    (fmt_val(m), if v.len() > 1 { format!("{}–{}", fmt_val(lo), fmt_val(hi)) } else { "–".into() })
}

/// +1 if (e) is better than (b) by more than 5%, -1 if worse by more than 5%, 0 in between.
fn direction(ratio: f64, higher_better: bool) -> i32 {
    let r = if higher_better { ratio } else { 1.0 / ratio };
    if r > 1.05 {
        1
    } else if r < 1.0 / 1.05 {
        -1
    } else {
        0
    }
}

fn dir_word(d: i32) -> &'static str {
    match d {
        1 => "(e) better",
        -1 => "(e) worse",
        _ => "within 5%",
    }
}

// ---------------------------------------------------------------------------------------------
// The host-side reference: (e)/(b) ratios from a vhost_compare results file

struct HostRatios {
    file: PathBuf,
    /// Throughput table: workload title -> (e)'s "vs (b)".
    rate: HashMap<String, f64>,
    /// QD1 latency table: (e)'s mean and p99 "vs (b)".
    qd1_mean: Option<f64>,
    qd1_p99: Option<f64>,
}

impl HostRatios {
    fn get(&self, h: HostRef) -> Option<f64> {
        match h {
            HostRef::Rate(t) => self.rate.get(t).copied(),
            HostRef::Qd1Lat(false) => self.qd1_mean,
            HostRef::Qd1Lat(true) => self.qd1_p99,
        }
    }
}

fn parse_ratio(s: &str) -> Option<f64> {
    s.trim().trim_end_matches('×').parse().ok()
}

/// Reads the (e)-vs-(b) ratios out of a vhost_compare results file (the tables it writes).
fn parse_host(file: &Path) -> Option<HostRatios> {
    let text = std::fs::read_to_string(file).ok()?;
    let e = Server::Vblk.label();
    let mut h = HostRatios { file: file.to_path_buf(), rate: HashMap::new(), qd1_mean: None, qd1_p99: None };
    let mut section = "";
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("## ") {
            section = if t.starts_with("Throughput") {
                "rate"
            } else if t.starts_with("4K randread QD1 latency") {
                "qd1"
            } else {
                ""
            };
            continue;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        match section {
            "rate" if cells.len() >= 5 && cells[1] == e => {
                if let Some(r) = parse_ratio(cells[4]) {
                    h.rate.insert(cells[0].to_string(), r);
                }
            }
            "qd1" if cells.len() >= 9 && cells[0] == e => {
                h.qd1_mean = parse_ratio(cells[4]);
                h.qd1_p99 = parse_ratio(cells[8]);
            }
            _ => {}
        }
    }
    // Only a file with every row this comparison uses.
    METRICS.iter().all(|m| h.get(m.host).is_some()).then_some(h)
}

/// VBLK_BENCH_HOST_RESULT, else the newest benches/results/*vhost_compare*.md that has all the rows.
fn host_ratios() -> Option<HostRatios> {
    if let Ok(p) = std::env::var("VBLK_BENCH_HOST_RESULT") {
        let h = parse_host(Path::new(&p));
        if h.is_none() {
            eprintln!("VBLK_BENCH_HOST_RESULT={p}: not a vhost_compare result with the QD1/QD32 rows of (b) and (e)");
        }
        return h;
    }
    let dir = workspace_root().join("benches").join("results");
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("vhost_compare") && n.ends_with(".md")))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files.iter().find_map(|(_, p)| parse_host(p))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    install_stop_handler();
    if let Err(e) = real_main() {
        eprintln!("guest_compare failed: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let smoke = smoke();
    let secs: u64 = if smoke { 2 } else { env_or("VBLK_BENCH_SECS", 5) };
    let repeats: usize = if smoke { 1 } else { env_or("VBLK_BENCH_REPEATS", 2) };
    let mib: u64 = if smoke { 64 } else { env_or("VBLK_BENCH_MIB", 512) };
    let size = mib.max(16) * MIB;
    let prealloc: String = env_or("VBLK_BENCH_PREALLOC", "full".to_string());
    let cache: String = env_or("VBLK_BENCH_CACHE", "64M".to_string());
    let base_dir = bench_dir();
    let t_start = Instant::now();

    for t in ["fio", "qemu-storage-daemon", guest::qemu_binary().as_str()] {
        if !tool_exists(t) {
            bail!("{t} is not installed");
        }
    }
    let vblk_bin = ensure_vblk_bin()?;
    let art = guest::guest_artifacts().context("building the test guest (tests/guest/build.sh)")?;
    if !art.dir.join("initramfs-fio.cpio.gz").is_file() {
        bail!("{} has no initramfs-fio.cpio.gz (build.sh packs the host's fio into it)", art.dir.display());
    }
    let accel = guest::accel_args();
    let accel_name = if accel.get(1).is_some_and(|a| a.starts_with("kvm")) { "KVM" } else { "TCG" };

    // Space: raw file + pool (the volume + slack).
    let pool_size = size + 256 * MIB;
    let need = size + pool_size + 256 * MIB;
    let free = free_bytes(&base_dir)?;
    if free < need {
        bail!("{} has {} MiB free, this run needs {} MiB: lower VBLK_BENCH_MIB or set VBLK_BENCH_DIR", base_dir.display(), free / MIB, need / MIB);
    }
    let tmp = tempfile::Builder::new().prefix("vblk-guest-compare-").tempdir_in(&base_dir).context("creating the work directory")?;
    let dir = tmp.path().to_path_buf();
    eprintln!(
        "guest_compare: {secs} s fio jobs x {repeats} repeats, {mib} MiB disk, {accel_name}, in {}{}",
        dir.display(),
        if smoke { " (SMOKE)" } else { "" }
    );

    let raw = dir.join("disk.raw");
    let t0 = Instant::now();
    fill_raw(&raw, size)?;
    eprintln!("wrote {mib} MiB raw file in {:.1} s", t0.elapsed().as_secs_f64());
    let aio = probe_qsd_aio(&raw, &dir);

    let pool = dir.join("pool.img");
    let t0 = Instant::now();
    run_cmd(Command::new(&vblk_bin).args(["pool", "create"]).arg(&pool).args(["--size", &pool_size.to_string(), "--preallocate", &prealloc]))?;
    eprintln!("created {} MiB pool (--preallocate {prealloc}) in {:.1} s", pool_size / MIB, t0.elapsed().as_secs_f64());
    {
        let t0 = Instant::now();
        let mut d = VblkDaemon::start(&dir, &pool, &cache, &[])?;
        d.cli(&["import", raw.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "full"])?;
        let info = d.json(&["vol", "info", "full"])?;
        let alloc = info["allocated_bytes"].as_u64().unwrap_or(0);
        if alloc != size {
            bail!("volume 'full' has {alloc} bytes allocated after import, expected {size}: {info}");
        }
        d.stop()?;
        eprintln!("imported into vblk volume 'full' in {:.1} s", t0.elapsed().as_secs_f64());
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };

    let bench = Bench { dir: dir.clone(), raw, pool, aio, cache: cache.clone(), secs };
    let servers = [Server::QsdRaw, Server::Vblk];
    let mut runs: Vec<Run> = Vec::new();
    for rep in 1..=repeats {
        for &s in &servers {
            let t0 = Instant::now();
            let (out, used) = bench.run(s).with_context(|| format!("repeat {rep}, {}", s.label()))?;
            let num = |key: &str| -> Result<f64> {
                let v = out.info(key).ok_or_else(|| anyhow!("the guest printed no {key}: {}", out.console_tail(20)))?;
                v.parse().map_err(|_| anyhow!("{key} = {v:?} is not a number: {}", out.console_tail(20)))
            };
            let mut values = HashMap::new();
            for k in METRICS.iter().map(|m| m.key).chain(DIAG.iter().map(|d| d.0).filter(|k| k.starts_with("fio."))) {
                values.insert(k, num(k)?);
            }
            let ios = num("fio.ios")?.max(1.0);
            values.insert("server.cpu_us_per_io", used.cpu_s * 1e6 / ios);
            values.insert("server.ctxsw_per_io", used.ctxsw as f64 / ios);
            values.insert("server.threads", used.threads as f64);
            let r = Run {
                rep,
                server: s,
                values,
                engine: out.info("fio.engine").unwrap_or("?").to_string(),
                boot_secs: out.boot_secs,
                wall: t0.elapsed(),
            };
            eprintln!(
                "[{rep}/{repeats}] {:<28} QD1 {:.0} IOPS, clat mean {:.1} µs, p99 {:.0} µs | QD32 read {:.0} IOPS, write {:.0} IOPS | server {:.1} µs CPU, {:.2} ctxsw per I/O ({}, {:.1} s)",
                s.label(),
                r.values["fio.rr4k-qd1.iops"],
                r.values["fio.rr4k-qd1.clat_mean_us"],
                r.values["fio.rr4k-qd1.clat_p99_us"],
                r.values["fio.rr4k-qd32.iops"],
                r.values["fio.rw4k-qd32.iops"],
                r.values["server.cpu_us_per_io"],
                r.values["server.ctxsw_per_io"],
                r.engine,
                r.wall.as_secs_f64()
            );
            runs.push(r);
        }
    }

    // Report.
    let col = |s: Server, key: &str| -> Vec<f64> { runs.iter().filter(|r| r.server == s).filter_map(|r| r.values.get(key).copied()).collect() };
    let host = host_ratios();
    let engines: Vec<String> = {
        let mut v: Vec<String> = runs.iter().map(|r| r.engine.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let kver = std::fs::read_to_string(art.dir.join("kernel-version")).unwrap_or_default();
    let mut md = String::new();
    md += &format!("# Guest fio on vhost-user-blk: qemu-storage-daemon vs vblk ({})\n\n", today());
    md += &format!(
        "`{}cargo bench -p vblk-benches --bench guest_compare`: {secs} s per fio job, {repeats} repeat(s), \
         one guest boot per server per repeat, interleaved (b e b e ...); total run {:.0} s.\n\n",
        if smoke { "VBLK_BENCH_SMOKE=1 " } else { "" },
        t_start.elapsed().as_secs_f64()
    );
    if accel_name == "TCG" {
        md += "**The guest ran under TCG (no usable KVM here): its CPU is emulated, which caps the guest's IOPS far \
               below what either server can do and adds tens of µs to every request. Only the direction of the \
               differences between (b) and (e), and the latency ordering, are meaningful; the absolute figures are \
               not comparable with the host-side `vhost_compare`.**\n\n";
    }
    md += &machine_facts(&base_dir);
    md += &format!("- qemu: {}\n", first_line(&guest::qemu_binary(), &["--version"]));
    md += &format!(
        "- guest: `{}`, {} vCPUs, {GUEST_MEM_MIB} MiB (memfd, shared), Debian cloud kernel {}, busybox initramfs + fio (same fio binary as the host's); \
         one `vhost-user-blk-pci` device with {QUEUES} queue\n",
        accel.join(" "),
        guest::guest_cpus(&GuestRun::new("fio-bench", vec![DiskSpec { socket: PathBuf::new(), num_queues: QUEUES, reconnect: false }])),
        kver.trim()
    );
    md += &format!(
        "- disk: {mib} MiB, every block written beforehand (the same data as `vhost_compare`'s raw file); \
         fio in the guest (`tests/guest/init`, scenario `fio-bench`): `--filename=/dev/vda --bs=4k --direct=1 \
         --ioengine={} --norandommap --time_based --runtime={secs}`, default seed, one job; randread QD1, randread QD32, \
         randwrite QD32 in that order (the randwrite overwrites the disk in place)\n",
        engines.join("/")
    );
    md += &format!(
        "- (b) `qemu-storage-daemon --blockdev driver=file,...,cache.direct=on,aio={} --export type=vhost-user-blk,...,num-queues={QUEUES}`\n",
        bench.aio
    );
    md += &format!(
        "- (e) `vblk daemon --cache {cache}`, pool created with `--preallocate {prealloc}`, volume filled by `vblk import` \
         of the raw file, attached with {QUEUES} queue\n"
    );
    md += "- clat: fio's completion latency (submission done to completion), as in fio's terse v3 output: mean to 0.1 µs, \
           p99 in whole µs; total lat: submission + completion\n";
    match &host {
        Some(h) => {
            md += &format!(
                "- host-side (e)/(b): from `{}` (libblkio client on the host; its QD1 latencies are submission to completion, \
                 its IOPS are with 2 exported queues, one used)\n",
                h.file.strip_prefix(workspace_root()).unwrap_or(&h.file).display()
            )
        }
        None => md += "- host-side (e)/(b): no vhost_compare result with the (b) and (e) QD1/QD32 rows found in benches/results/\n",
    }

    md += "\n## Medians over repeats (min–max; of an even number of repeats, the mean of the middle two)\n\n";
    md += "| metric | (b) qsd raw | min–max | (e) vblk | min–max | (e)/(b) | guest says | host-side (e)/(b) | host says | same direction |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|\n";
    let mut disagree = Vec::new();
    for m in METRICS {
        let (bv, ev) = (col(Server::QsdRaw, m.key), col(Server::Vblk, m.key));
        let (bm, bmm) = med_range(&bv);
        let (em, emm) = med_range(&ev);
        let ratio = match (median(&ev), median(&bv)) {
            (Some(e), Some(b)) if b > 0.0 => Some(e / b),
            _ => None,
        };
        // With repeats, a difference whose min–max ranges overlap is not a direction.
        let overlap = bv.len() > 1 && ev.len() > 1 && {
            let ((_, blo, bhi), (_, elo, ehi)) = (stats(&bv), stats(&ev));
            blo.max(elo) <= bhi.min(ehi)
        };
        let gdir = ratio.map(|r| direction(r, m.higher_better));
        let gword = match gdir {
            Some(d) if d != 0 && overlap => "ranges overlap",
            Some(d) => dir_word(d),
            None => "–",
        };
        let gdir = gdir.map(|d| if overlap { 0 } else { d });
        let hr = host.as_ref().and_then(|h| h.get(m.host));
        let hdir = hr.map(|r| direction(r, m.higher_better));
        let same = match (gdir, hdir) {
            (Some(g), Some(h)) if g == h => "yes",
            (Some(g), Some(h)) if g == 0 || h == 0 => "≈ (one shows no clear difference)",
            (Some(_), Some(_)) => {
                disagree.push(m.title);
                "**no**"
            }
            _ => "–",
        };
        let fr = |r: Option<f64>| r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into());
        md += &format!(
            "| {}{} | {bm} | {bmm} | {em} | {emm} | {} | {} | {} | {} | {same} |\n",
            m.title,
            if m.higher_better { " (higher is better)" } else { " (lower is better)" },
            fr(ratio),
            gword,
            fr(hr),
            hdir.map(dir_word).unwrap_or("–"),
        );
    }
    md += "\nThe host-side column for the total-latency row is the same host figure as for the mean clat row. \
           \"(e) better/worse\" means by more than 5% (and, in the guest, with the min–max ranges of (b) and (e) apart); \
           \"ranges overlap\": more than 5% apart in the medians but not in every repeat.\n";
    if !disagree.is_empty() {
        md += &format!("\nGuest and host disagree in direction on: {}.\n", disagree.join("; "));
    }

    md += "\n## Diagnostics (median, min–max)\n\n";
    md += "| figure | (b) qsd raw | min–max | (e) vblk | min–max | (e)/(b) |\n|---|---|---|---|---|---|\n";
    for (k, title) in DIAG {
        let (bv, ev) = (col(Server::QsdRaw, k), col(Server::Vblk, k));
        let (bm, bmm) = med_range(&bv);
        let (em, emm) = med_range(&ev);
        let ratio = match (median(&ev), median(&bv)) {
            (Some(e), Some(b)) if b > 0.0 => format!("{:.2}×", e / b),
            _ => "–".into(),
        };
        md += &format!("| {title} | {bm} | {bmm} | {em} | {emm} | {ratio} |\n");
    }
    md += "\nServer figures: utime+stime (/proc/PID/stat, 10 ms ticks) and voluntary + involuntary context switches of \
           the server's threads (/proc/PID/task/*/status) from just before QEMU starts until the guest prints VBLK-FIO-DONE \
           after its last fio job (boot and the engine probe included), divided by the I/Os of the three fio jobs; \
           threads: the server's threads at that moment.\n";
    md += "\n## Every run\n\n| repeat | server | QD1 IOPS | QD1 mean clat µs | QD1 p99 clat µs | QD1 mean lat µs | QD32 read IOPS | QD32 write IOPS | engine | guest /init at s | run s |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &runs {
        let v = |k: &str| r.values.get(k).map(|x| fmt_val(*x)).unwrap_or_else(|| "–".into());
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
            r.rep,
            r.server.label(),
            v("fio.rr4k-qd1.iops"),
            v("fio.rr4k-qd1.clat_mean_us"),
            v("fio.rr4k-qd1.clat_p99_us"),
            v("fio.rr4k-qd1.lat_mean_us"),
            v("fio.rr4k-qd32.iops"),
            v("fio.rw4k-qd32.iops"),
            r.engine,
            r.boot_secs.map(|b| format!("{b:.2}")).unwrap_or_else(|| "–".into()),
            r.wall.as_secs_f64()
        );
    }
    println!("\n{md}");
    let out = results_path("guest_compare", smoke)?;
    std::fs::write(&out, &md)?;
    eprintln!("wrote {}", out.display());
    drop(bench);
    tmp.close().context("removing the work directory")?;
    Ok(())
}
