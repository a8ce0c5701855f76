//! Side-by-side macro benchmark from the host, through a real vhost-user-blk client (libblkio's
//! "virtio-blk-vhost-user" driver, the `blkio` crate):
//!
//! - (a) fio, io_uring, O_DIRECT, on a raw file: the device limit;
//! - (b) qemu-storage-daemon exporting that raw file over vhost-user-blk;
//!
//!   the "raw file" of (a) and (b) is, by default, the byte range of the vblk pool file that holds
//!   (e)'s blocks (qsd's raw driver with offset/size; fio --offset/--size), so that they write the
//!   same physical blocks as (e): on this disk 4K random-write IOPS differ up to 1.8x between
//!   2 GiB windows of one file. VBLK_BENCH_RAW=file uses a separate raw file instead.
//! - (c) qemu-storage-daemon exporting a fully written qcow2 (and, for allocating writes, a fresh one);
//! - (d) qemu-storage-daemon exporting a new qcow2 overlay on (c) (copy-on-write writes);
//! - (e) vblk: a fully written thin volume (filled with `vblk import` of the raw file);
//! - (f) vblk: a second copy of that volume, written right after a snapshot of it (copy-on-write
//!   writes; its own copy, so that the relocation of its blocks never changes (e)'s layout);
//! - (g) vblk: a freshly created volume, for allocating writes;
//! - (h) (e) with a QoS IOPS limit it never reaches (the cost of the accounting), and (i) (e)
//!   limited to 20k IOPS (the limit holds), on the randread QD32 workload;
//! - (j) (e) attached with `--threads 1` (both queues on one worker thread, as qsd serves
//!   them), on the 2-queue randwrite workload;
//! - (k) (e) attached with `--pin-memory` (the client's memory registered as io_uring fixed
//!   buffers), on the 4K randread QD32 row;
//! - (l) vblk: an encrypted volume (`vol create --encrypt`, AES-256-GCM, filled by `vblk import`
//!   of the raw file), on every 1-queue row: the cost of encryption at rest.
//!
//! Every server is started fresh for every cell on the same directory, and the cells are
//! interleaved: for each repeat, for each workload, a b c e ... Reported: IOPS (MiB/s for
//! 128 KiB), QD1 mean and p99 latency, and server CPU per I/O (utime+stime of the server process
//! from /proc/PID/stat from the cell's start until the server is idle again, so that work a cell
//! leaves behind (RocksDB compactions) is charged to it), as medians with min-max and as ratios to (b) and (a).
//!
//! `cargo bench -p vblk-benches --bench vhost_compare`
//! env: VBLK_BENCH_SECS per cell (10), VBLK_BENCH_REPEATS (3), VBLK_BENCH_DIR (/var/tmp),
//! VBLK_BENCH_GIB working set (2; fractions allowed), VBLK_BENCH_FRESH_GIB size of the fresh
//! volume / qcow2 for allocating writes (2 x the working set; a cell ends early when it has written
//! every block), VBLK_BENCH_PREALLOC pool --preallocate (full), VBLK_BENCH_CACHE vblk --cache
//! (64M), VBLK_BENCH_WORKLOADS (comma-separated row keys, e.g. aw4k-qd32,cw4k-qd32), VBLK_BENCH_SERVERS
//! (comma-separated row letters, e.g. b,e,e2), VBLK_BENCH_RAW (pool: (a)/(b) on (e)'s blocks, the
//! default; file: on their own raw file), VBLK_BENCH_ALT_BIN (a second vblk binary, row (e2):
//! (e) served by it, for an A/B comparison of two builds in one interleaved run), VBLK_BENCH_PERF=DIR
//! (`perf record -g` of every server cell into DIR; VBLK_BENCH_PERF_ARGS replaces `-g`, e.g.
//! `--call-graph dwarf,16384 -F 2000` for Rust frames without frame pointers), VBLK_BENCH_SMOKE=1 (1 s cells, 1 repeat, 256 MiB; results to target/ instead of
//! benches/results/), VBLK_BIN (use this vblk binary instead of building target/release/vblk).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vblk_benches::vhost::*;
use vblk_benches::{process_cpu_seconds, stats};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Queues every server exports (clients use 1 or 2 of them).
const EXPORT_QUEUES: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Server {
    Fio,
    QsdRaw,
    QsdQcow2,
    Vblk,
    VblkFresh,
    QsdQcow2Fresh,
    QsdQcow2Overlay,
    VblkSnap,
    /// (e) with a QoS IOPS limit far above what the disk does: the cost of the accounting.
    VblkQosHigh,
    /// (e) limited to [`QOS_LIMIT_IOPS`]: the limit holds.
    VblkQosLimited,
    /// (e) attached with `--threads 1`: both queues on one worker thread (as qsd serves them).
    VblkOneThread,
    /// (e) attached with `--pin-memory`: the client's memory as io_uring fixed buffers.
    VblkPinned,
    /// An encrypted copy of (e).
    VblkEncrypted,
    /// (e) served by another vblk binary (`VBLK_BENCH_ALT_BIN`): an A/B comparison of two
    /// builds in one interleaved run.
    VblkAlt,
    /// qsd's null-co driver: no I/O, the vhost-user-blk round trip alone.
    QsdNull,
    /// A vblk volume never written: reads are zeros without device I/O.
    VblkUnwritten,
}

/// The QoS limit of row (i), requests per second.
const QOS_LIMIT_IOPS: u64 = 20_000;

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Fio => "(a) fio, raw file",
            Server::QsdRaw => "(b) qsd, raw file",
            Server::QsdQcow2 => "(c) qsd, qcow2 (written)",
            Server::Vblk => "(e) vblk, volume (written)",
            Server::VblkFresh => "(g) vblk, fresh volume",
            Server::QsdQcow2Fresh => "(c) qsd, fresh qcow2",
            Server::QsdQcow2Overlay => "(d) qsd, qcow2 overlay on (c)",
            Server::VblkSnap => "(f) vblk, volume + snapshot",
            Server::VblkQosHigh => "(h) vblk, (e) + QoS limit 10M IOPS (not reached)",
            Server::VblkQosLimited => "(i) vblk, (e) + QoS limit 20k IOPS",
            Server::VblkOneThread => "(j) vblk, (e) with --threads 1",
            Server::VblkPinned => "(k) vblk, (e) with --pin-memory",
            Server::VblkEncrypted => "(l) vblk, encrypted volume (written)",
            Server::VblkAlt => "(e2) vblk, (e) run by VBLK_BENCH_ALT_BIN",
            Server::QsdNull => "(m) qsd, null-co driver (no I/O)",
            Server::VblkUnwritten => "(n) vblk, unwritten volume (no device I/O)",
        }
    }
}

struct Workload {
    key: &'static str,
    title: &'static str,
    write: bool,
    bs: u64,
    qd: usize,
    queues: usize,
    pattern: Pattern,
    latency: bool,
    servers: Vec<Server>,
    /// Ratios are to (b) and (a) in this workload.
    base: &'static str,
}

impl Workload {
    fn mibps(&self) -> bool {
        self.bs >= 64 * KIB
    }
    fn unit(&self) -> &'static str {
        if self.mibps() {
            "MiB/s"
        } else {
            "IOPS"
        }
    }
}

fn workloads(qcow2: bool) -> Vec<Workload> {
    use Server::*;
    let mut all = vec![Fio, QsdRaw, Vblk, VblkEncrypted];
    let mut fresh = vec![VblkFresh];
    let mut cow = vec![VblkSnap];
    if qcow2 {
        all.insert(2, QsdQcow2);
        fresh.push(QsdQcow2Fresh);
        cow.insert(0, QsdQcow2Overlay);
    }
    let w = |key, title, write, bs, qd, queues, pattern, latency| Workload {
        key,
        title,
        write,
        bs,
        qd,
        queues,
        pattern,
        latency,
        servers: all.clone(),
        base: key,
    };
    vec![
        Workload {
            servers: all.iter().copied().chain([VblkPinned]).collect(),
            ..w("rr4k-qd32", "4K randread QD32, 1 queue", false, 4 * KIB, 32, 1, Pattern::Random, false)
        },
        w("rw4k-qd32", "4K randwrite QD32, 1 queue", true, 4 * KIB, 32, 1, Pattern::Random, false),
        Workload {
            servers: all.iter().copied().chain([VblkOneThread]).collect(),
            ..w("rw4k-qd32x2", "4K randwrite QD32 x 2 queues", true, 4 * KIB, 32, 2, Pattern::Random, false)
        },
        Workload {
            servers: all.iter().copied().chain([QsdNull, VblkUnwritten]).collect(),
            ..w("rr4k-qd1", "4K randread QD1", false, 4 * KIB, 1, 1, Pattern::Random, true)
        },
        w("sr128k-qd8", "128K seq read QD8", false, 128 * KIB, 8, 1, Pattern::Sequential, false),
        w("sw128k-qd8", "128K seq write QD8", true, 128 * KIB, 8, 1, Pattern::Sequential, false),
        Workload {
            key: "aw4k-qd32",
            title: "4K allocating randwrite QD32, 1 queue",
            write: true,
            bs: 4 * KIB,
            qd: 32,
            queues: 1,
            pattern: Pattern::Distinct,
            latency: false,
            servers: fresh,
            base: "rw4k-qd32",
        },
        Workload {
            key: "qr4k-qd32",
            title: "4K randread QD32 with QoS limits",
            write: false,
            bs: 4 * KIB,
            qd: 32,
            queues: 1,
            pattern: Pattern::Random,
            latency: false,
            servers: vec![Vblk, VblkQosHigh, VblkQosLimited],
            base: "rr4k-qd32",
        },
        Workload {
            key: "cw4k-qd32",
            title: "4K randwrite QD32 after a snapshot (CoW)",
            write: true,
            bs: 4 * KIB,
            qd: 32,
            queues: 1,
            pattern: Pattern::Random,
            latency: false,
            servers: cow,
            base: "rw4k-qd32",
        },
    ]
}

/// One cell's figures.
#[derive(Clone, Debug, Default)]
struct Cell {
    /// IOPS, or MiB/s for large blocks.
    rate: f64,
    iops: f64,
    /// Server CPU per I/O, µs (none for fio: it has no server).
    server_us: Option<f64>,
    /// Client + server CPU per I/O, µs (fio: fio's own CPU, i.e. its whole I/O path).
    total_us: Option<f64>,
    /// QD1: mean and p99 latency, µs.
    lat: Option<(f64, f64)>,
    note: String,
}

struct Bench {
    dir: PathBuf,
    /// What (a) and (b) read and write: the byte range of the pool file that holds (e)'s blocks
    /// (VBLK_BENCH_RAW=pool, the default) or the raw file (VBLK_BENCH_RAW=file).
    raw_target: RawTarget,
    qcow2: Option<PathBuf>,
    pool: PathBuf,
    span: u64,
    fresh_size: u64,
    dur: Duration,
    aio: String,
    cache: String,
    /// VBLK_BENCH_ALT_BIN: the binary of row (e2).
    alt_bin: Option<PathBuf>,
}

/// The file (a) and (b) use, and the window of it they see (offset, size).
struct RawTarget {
    path: PathBuf,
    window: Option<(u64, u64)>,
}

/// Whether bytes `[off, off + len)` of `pool` equal the first `len` bytes of `raw`.
fn same_bytes(pool: &Path, off: u64, raw: &Path, len: u64) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut p = std::fs::File::open(pool).with_context(|| format!("opening {}", pool.display()))?;
    let mut r = std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    p.seek(SeekFrom::Start(off))?;
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut done = 0u64;
    while done < len {
        check_stop()?;
        let n = (len - done).min(MIB) as usize;
        p.read_exact(&mut a[..n])?;
        r.read_exact(&mut b[..n])?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

/// Removes a file when dropped.
struct RmOnDrop(PathBuf);
impl Drop for RmOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Bench {
    fn run_cell(&self, w: &Workload, server: Server, seed: u64) -> Result<Cell> {
        check_stop()?;
        let sock = self.dir.join("dev.sock");
        match server {
            Server::Fio => self.fio_cell(w, seed),
            Server::QsdRaw | Server::QsdQcow2 => {
                let (img, fmt, window) = if server == Server::QsdRaw {
                    (&self.raw_target.path, "raw", self.raw_target.window)
                } else {
                    (self.qcow2.as_ref().ok_or_else(|| anyhow!("no qcow2"))?, "qcow2", None)
                };
                let mut q = Qsd::start_window(img, fmt, window, &self.aio, &sock, EXPORT_QUEUES, &self.dir.join("qsd.log"))?;
                let c = self.blkio_cell(&q.sock, q.pid(), w, self.span, seed)?;
                q.stop()?;
                Ok(c)
            }
            Server::QsdQcow2Fresh => {
                let img = self.dir.join("fresh.qcow2");
                let _rm = RmOnDrop(img.clone());
                run_cmd(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg(self.fresh_size.to_string()))?;
                let mut q = Qsd::start(&img, "qcow2", &self.aio, &sock, EXPORT_QUEUES, &self.dir.join("qsd.log"))?;
                let c = self.blkio_cell(&q.sock, q.pid(), w, self.fresh_size, seed)?;
                q.stop()?;
                Ok(c)
            }
            Server::QsdQcow2Overlay => {
                let base = self.qcow2.as_ref().ok_or_else(|| anyhow!("no qcow2"))?;
                let img = self.dir.join("overlay.qcow2");
                let _rm = RmOnDrop(img.clone());
                run_cmd(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(base).arg(&img))?;
                let mut q = Qsd::start(&img, "qcow2", &self.aio, &sock, EXPORT_QUEUES, &self.dir.join("qsd.log"))?;
                let c = self.blkio_cell(&q.sock, q.pid(), w, self.span, seed)?;
                q.stop()?;
                Ok(c)
            }
            Server::VblkSnap => {
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[])?;
                d.cli(&["snap", "create", "cow@s"])?;
                let c = self.attached_cell(&d, "cow", &[], &sock, w, self.span, seed)?;
                d.cli(&["snap", "delete", "cow@s"])?;
                d.stop()?;
                Ok(c)
            }
            Server::Vblk | Server::VblkAlt => {
                let attach = format!("--attach=full:{}:{EXPORT_QUEUES}", sock.display());
                let mut d = match (server, &self.alt_bin) {
                    (Server::VblkAlt, Some(bin)) => VblkDaemon::start_bin(bin, &self.dir, &self.pool, &self.cache, &[attach])?,
                    _ => VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[attach])?,
                };
                vblk_tests::wait_for_socket(&sock, Duration::from_secs(30))?;
                let c = self.blkio_cell(&sock, d.pid(), w, self.span, seed)?;
                d.stop()?;
                Ok(c)
            }
            Server::VblkOneThread | Server::VblkPinned => {
                let extra: &[&str] = if server == Server::VblkPinned { &["--pin-memory"] } else { &["--threads", "1"] };
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[])?;
                let c = self.attached_cell(&d, "full", extra, &sock, w, self.span, seed)?;
                d.stop()?;
                Ok(c)
            }
            Server::VblkQosHigh | Server::VblkQosLimited => {
                let attach = format!("--attach=full:{}:{EXPORT_QUEUES}", sock.display());
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[attach])?;
                vblk_tests::wait_for_socket(&sock, Duration::from_secs(30))?;
                let limit = if server == Server::VblkQosHigh { 10_000_000 } else { QOS_LIMIT_IOPS };
                d.cli(&["qos", "set", "full", "--iops-total", &limit.to_string()])?;
                let c = self.blkio_cell(&sock, d.pid(), w, self.span, seed);
                // The limits are kept in the pool's qos.json: remove them for the other cells.
                d.cli(&["qos", "set", "full", "--iops-total", "0"])?;
                d.stop()?;
                c
            }
            Server::VblkEncrypted => {
                let key = format!("--master-key-file={}", self.dir.join("master.key").display());
                let attach = format!("--attach=enc:{}:{EXPORT_QUEUES}", sock.display());
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[key, attach])?;
                vblk_tests::wait_for_socket(&sock, Duration::from_secs(30))?;
                let c = self.blkio_cell(&sock, d.pid(), w, self.span, seed)?;
                d.stop()?;
                Ok(c)
            }
            Server::QsdNull => {
                let mut q = Qsd::start_null(self.span, &sock, EXPORT_QUEUES, &self.dir.join("qsd.log"))?;
                let c = self.blkio_cell(&q.sock, q.pid(), w, self.span, seed)?;
                q.stop()?;
                Ok(c)
            }
            Server::VblkUnwritten => {
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[])?;
                let c = self.attached_cell(&d, "empty", &[], &sock, w, self.span, seed)?;
                d.stop()?;
                Ok(c)
            }
            Server::VblkFresh => {
                let mut d = VblkDaemon::start(&self.dir, &self.pool, &self.cache, &[])?;
                let _ = d.cli(&["vol", "delete", "fresh"]);
                d.cli(&["vol", "create", "fresh", &self.fresh_size.to_string()])?;
                let c = self.attached_cell(&d, "fresh", &[], &sock, w, self.fresh_size, seed)?;
                d.cli(&["vol", "delete", "fresh"])?;
                d.stop()?;
                Ok(c)
            }
        }
    }

    /// Attach volume `vol` of daemon `d` at `sock` (`EXPORT_QUEUES` queues, `extra` attach
    /// options), run the cell over it, detach.
    #[allow(clippy::too_many_arguments)]
    fn attached_cell(&self, d: &VblkDaemon, vol: &str, extra: &[&str], sock: &Path, w: &Workload, span: u64, seed: u64) -> Result<Cell> {
        let s = sock.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
        let queues = EXPORT_QUEUES.to_string();
        let mut args = vec!["attach", vol, "--socket", s, "--queues", &queues];
        args.extend_from_slice(extra);
        d.cli(&args)?;
        vblk_tests::wait_for_socket(sock, Duration::from_secs(30))?;
        let c = self.blkio_cell(sock, d.pid(), w, span, seed)?;
        d.cli(&["detach", vol])?;
        Ok(c)
    }

    fn blkio_cell(&self, sock: &Path, pid: u32, w: &Workload, span: u64, seed: u64) -> Result<Cell> {
        // A server started on a pool that earlier servers wrote may begin with their leftovers
        // (vblk: compacting the RocksDB files the last one flushed as it stopped). A daemon that
        // runs for days has long done that work; start the cell once the server is idle. The
        // wait is not counted (and is shown in the note).
        let warm = wait_idle(pid, Duration::from_secs(60))?;
        let mut client = BenchClient::connect(sock, w.queues, w.qd * w.bs as usize)?;
        let spec = Spec {
            write: w.write,
            bs: w.bs,
            qd: w.qd,
            pattern: w.pattern,
            span,
            dur: Some(self.dur),
            limit: None,
            record_latency: w.latency,
            seed,
        };
        // VBLK_BENCH_PERF=DIR: record the server with `perf record -g` during the cell (for
        // profiling; the CPU figures then include perf's overhead).
        let perf = match std::env::var_os("VBLK_BENCH_PERF") {
            Some(dir) => {
                let out = Path::new(&dir).join(format!("{}-{pid}.perf.data", w.key));
                Some(
                    Command::new("perf")
                        .arg("record")
                        .args(std::env::var("VBLK_BENCH_PERF_ARGS").as_deref().unwrap_or("-g").split_whitespace())
                        .args(["-q", "-p", &pid.to_string(), "-o"])
                        .arg(&out)
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .context("starting perf record")?,
                )
            }
            None => None,
        };
        let (s0, c0, t0) = (proc_cpu_seconds(pid)?, process_cpu_seconds(), proc_threads_cpu(pid));
        let mut out = client.run(&spec)?;
        let c1 = process_cpu_seconds();
        // The server may go on working for this cell's requests after the last completion
        // (vblk: the RocksDB flushes and compactions its writes caused). That is charged to
        // this cell, not left to the next server started on the pool: wait until the server
        // is idle (at most one clock tick of CPU in 250 ms), for at most 60 s.
        let settled = wait_idle(pid, Duration::from_secs(60))?.0;
        let (s1, t1) = (proc_cpu_seconds(pid)?, proc_threads_cpu(pid));
        if let Some(mut p) = perf {
            // SAFETY: kill(2) on our own child's pid; SIGINT makes perf write its file and exit.
            unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
            let _ = p.wait();
        }
        drop(client);
        let ops = out.ops.max(1) as f64;
        let iops = out.iops();
        let rate = if w.mibps() { iops * w.bs as f64 / MIB as f64 } else { iops };
        let mut notes = Vec::new();
        if out.exhausted {
            notes.push(format!("wrote every block of the fresh device in {:.1} s", out.secs));
        }
        if settled > 0.3 {
            notes.push(format!("busy {settled:.1} s after the last completion (counted)"));
        }
        if warm.0 > 0.3 {
            notes.push(format!("busy {:.1} s at start ({:.2} s of CPU, not counted)", warm.0, warm.1));
        }
        // Where the server's CPU went, by thread name (µs per I/O, threads with at least 0.1).
        let threads: Vec<String> = t1
            .iter()
            .map(|(n, c)| (n, (c - t0.iter().find(|(m, _)| m == n).map_or(0.0, |x| x.1)) * 1e6 / ops))
            .filter(|(_, us)| *us >= 0.1)
            .map(|(n, us)| format!("{n} {us:.1}"))
            .collect();
        if !threads.is_empty() {
            notes.push(format!("threads µs/IO: {}", threads.join(", ")));
        }
        let note = notes.join("; ");
        Ok(Cell {
            rate,
            iops,
            server_us: Some((s1 - s0) * 1e6 / ops),
            total_us: Some((s1 - s0 + c1 - c0) * 1e6 / ops),
            lat: out.latency_us(),
            note,
        })
    }

    fn fio_cell(&self, w: &Workload, seed: u64) -> Result<Cell> {
        let rw = match (w.pattern, w.write) {
            (Pattern::Random, false) => "randread",
            (Pattern::Random, true) => "randwrite",
            (Pattern::Sequential, false) => "read",
            (Pattern::Sequential, true) => "write",
            (Pattern::Distinct, _) => bail!("fio has no allocating-write cell"),
        };
        let mut cmd = Command::new("fio");
        cmd.arg("--name=x")
            .arg(format!("--filename={}", self.raw_target.path.display()))
            .arg(format!("--offset={}", self.raw_target.window.map_or(0, |w| w.0)))
            .args(["--ioengine=io_uring", "--direct=1"])
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={}k", w.bs / KIB))
            .arg(format!("--iodepth={}", w.qd))
            .arg(format!("--numjobs={}", w.queues))
            .arg("--group_reporting")
            .arg(format!("--size={}", self.span))
            .arg(format!("--runtime={}", self.dur.as_secs().max(1)))
            .args(["--time_based", "--norandommap", "--lat_percentiles=1"])
            .arg(format!("--randseed={seed}"))
            .arg("--output-format=json");
        let c0 = children_cpu_seconds();
        let out = run_cmd(&mut cmd)?;
        let c1 = children_cpu_seconds();
        let j: serde_json::Value = serde_json::from_str(&out[out.find('{').ok_or_else(|| anyhow!("no JSON from fio: {out}"))?..])
            .context("parsing fio's JSON")?;
        let job = &j["jobs"][0];
        let side = &job[if w.write { "write" } else { "read" }];
        let iops = side["iops"].as_f64().ok_or_else(|| anyhow!("no iops in fio output"))?;
        let ios = side["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
        let bw = side["bw_bytes"].as_f64().unwrap_or(0.0);
        let lat = if w.latency {
            let mean = side["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0;
            let p99 = side["lat_ns"]["percentile"]["99.000000"]
                .as_f64()
                .or_else(|| side["clat_ns"]["percentile"]["99.000000"].as_f64())
                .unwrap_or(0.0)
                / 1000.0;
            Some((mean, p99))
        } else {
            None
        };
        Ok(Cell {
            rate: if w.mibps() { bw / MIB as f64 } else { iops },
            iops,
            server_us: None,
            total_us: Some((c1 - c0) * 1e6 / ios),
            lat,
            note: String::new(),
        })
    }
}


/// Wait until process `pid` is idle (at most one clock tick of CPU in 250 ms), for at most
/// `max`; returns (seconds waited, CPU seconds it used meanwhile).
fn wait_idle(pid: u32, max: Duration) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let tick = 1.0 / clk_tck();
    let first = proc_cpu_seconds(pid)?;
    let mut prev = first;
    while t0.elapsed() < max {
        check_stop()?;
        std::thread::sleep(Duration::from_millis(250));
        let now = proc_cpu_seconds(pid)?;
        if now - prev <= tick * 1.5 {
            return Ok((t0.elapsed().as_secs_f64(), now - first));
        }
        prev = now;
    }
    Ok((t0.elapsed().as_secs_f64(), proc_cpu_seconds(pid)? - first))
}

fn tool_exists(prog: &str) -> bool {
    Command::new(prog).arg("--version").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok()
}

fn fmt_rate(x: f64, mib: bool) -> String {
    if mib {
        format!("{x:.0}")
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
        _ => "–".into(),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| stats(v).0)
}

fn med_range(v: &[f64], f: impl Fn(f64) -> String) -> (String, String) {
    if v.is_empty() {
        return ("–".into(), "–".into());
    }
    let (m, lo, hi) = stats(v);
    (f(m), if v.len() > 1 { format!("{}–{}", f(lo), f(hi)) } else { "–".into() })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    install_stop_handler();
    if let Err(e) = real_main() {
        eprintln!("vhost_compare failed: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let smoke = smoke();
    let secs: u64 = if smoke { 1 } else { env_or("VBLK_BENCH_SECS", 10) };
    let repeats: usize = if smoke { 1 } else { env_or("VBLK_BENCH_REPEATS", 3) };
    let gib: f64 = if smoke { 0.25 } else { env_or("VBLK_BENCH_GIB", 2.0) };
    let span = ((gib * GIB as f64) as u64 / MIB).max(16) * MIB;
    let fresh_gib: f64 = env_or("VBLK_BENCH_FRESH_GIB", 2.0 * span as f64 / GIB as f64);
    let fresh_size = ((fresh_gib * GIB as f64) as u64 / MIB).max(16) * MIB;
    let prealloc: String = env_or("VBLK_BENCH_PREALLOC", "full".to_string());
    let cache: String = env_or("VBLK_BENCH_CACHE", "64M".to_string());
    let alt_bin: Option<PathBuf> = std::env::var_os("VBLK_BENCH_ALT_BIN").map(PathBuf::from);
    let base_dir = bench_dir();
    let t_start = Instant::now();

    for t in ["fio", "qemu-storage-daemon"] {
        if !tool_exists(t) {
            bail!("{t} is not installed");
        }
    }
    let have_qemu_img = tool_exists("qemu-img");
    let vblk_bin = ensure_vblk_bin()?;

    // Space: raw + written qcow2 + pool (written volume + fresh volume + slack) + fresh qcow2.
    // full + cow (its own copy, so that (f)'s copy-on-write never relocates (e)'s blocks) +
    // the fresh volume or cow's copied blocks.
    let pool_size = 3 * span + fresh_size + 256 * MIB;
    let need = span + if have_qemu_img { span + fresh_size } else { 0 } + pool_size + 512 * MIB;
    let free = free_bytes(&base_dir)?;
    if free < need {
        bail!(
            "{} has {:.1} GiB free, this run needs {:.1} GiB: lower VBLK_BENCH_GIB / VBLK_BENCH_FRESH_GIB or set VBLK_BENCH_DIR",
            base_dir.display(),
            free as f64 / GIB as f64,
            need as f64 / GIB as f64
        );
    }
    let tmp = tempfile::Builder::new().prefix("vblk-vhost-compare-").tempdir_in(&base_dir).context("creating the work directory")?;
    let dir = tmp.path().to_path_buf();
    eprintln!(
        "vhost_compare: {secs} s cells x {repeats} repeats, working set {} MiB, fresh device {} MiB, in {}{}",
        span / MIB,
        fresh_size / MIB,
        dir.display(),
        if smoke { " (SMOKE)" } else { "" }
    );

    // (a)/(b): the raw file.
    let raw = dir.join("disk.raw");
    let t0 = Instant::now();
    fill_raw(&raw, span)?;
    eprintln!("wrote {} MiB raw file in {:.1} s", span / MIB, t0.elapsed().as_secs_f64());
    let aio = probe_qsd_aio(&raw, &dir);

    // (c): qcow2 converted from the written raw file: every cluster allocated.
    let qcow2 = if have_qemu_img {
        let q = dir.join("disk.qcow2");
        let t0 = Instant::now();
        run_cmd(Command::new("qemu-img").args(["convert", "-t", "none", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&q))?;
        eprintln!("converted to qcow2 in {:.1} s", t0.elapsed().as_secs_f64());
        Some(q)
    } else {
        eprintln!("qemu-img not found: no qcow2 rows");
        None
    };

    let raw_mode = std::env::var("VBLK_BENCH_RAW").unwrap_or_else(|_| "pool".into());
    if raw_mode != "pool" && raw_mode != "file" {
        bail!("VBLK_BENCH_RAW={raw_mode}: expected pool or file");
    }
    // (e)/(g): the vblk pool, the written volume by import of the raw file.
    let pool = dir.join("pool.img");
    let full_at_start: bool;
    let full_check_secs: f64;
    let t0 = Instant::now();
    run_cmd(
        Command::new(&vblk_bin)
            .args(["pool", "create"])
            .arg(&pool)
            .args(["--size", &pool_size.to_string(), "--preallocate", &prealloc]),
    )?;
    eprintln!("created {} MiB pool (--preallocate {prealloc}) in {:.1} s", pool_size / MIB, t0.elapsed().as_secs_f64());
    {
        let t0 = Instant::now();
        // (l)'s master key.
        let key = dir.join("master.key");
        std::fs::write(&key, "6b".repeat(32)).context("writing the bench master key")?;
        let key_arg = format!("--master-key-file={}", key.display());
        let mut d = VblkDaemon::start(&dir, &pool, &cache, &[key_arg])?;
        d.cli(&["import", raw.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "full"])?;
        // Checked before any other volume has blocks (the others are imports of the same file):
        // a match can only be 'full's.
        let tc = Instant::now();
        full_at_start = raw_mode == "pool" && same_bytes(&pool, vblk_engine::format::DATA_START, &raw, span)?;
        full_check_secs = tc.elapsed().as_secs_f64();
        d.cli(&["import", raw.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "cow"])?;
        d.cli(&["vol", "create", "enc", &span.to_string(), "--encrypt"])?;
        // (n): never written.
        d.cli(&["vol", "create", "empty", &span.to_string()])?;
        d.cli(&["import", raw.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, "enc"])?;
        let info = d.json(&["vol", "info", "full"])?;
        let alloc = info["allocated_bytes"].as_u64().unwrap_or(0);
        if alloc != span {
            bail!("volume 'full' has {alloc} bytes allocated after import, expected {span}: {info}");
        }
        d.stop()?;
        eprintln!("imported into vblk volume 'full' in {:.1} s", t0.elapsed().as_secs_f64());
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };

    // (a)/(b) on the very blocks (e) uses. This disk's 4K random-write speed depends on where the
    // blocks are (40k-77k IOPS across 2 GiB windows of one file, stable over minutes), so two
    // servers on two files compare their files' placement as much as the servers. `vblk import`
    // into a new pool lays 'full' out at pba 0.. in order (the next-fit allocator), which was
    // checked byte for byte right after that import; the window is the raw image (b) exports,
    // through qsd's raw driver with offset/size, and fio's --offset/--size.
    let raw_target = if raw_mode == "file" {
        RawTarget { path: raw.clone(), window: None }
    } else {
        let off = vblk_engine::format::DATA_START;
        if !full_at_start {
            bail!(
                "volume 'full' is not laid out at the start of the pool's data area, so (a)/(b) cannot use its blocks: run with VBLK_BENCH_RAW=file"
            );
        }
        eprintln!("(a)/(b) use the pool file's bytes {off}..{} ('full's blocks; checked in {full_check_secs:.1} s)", off + span);
        RawTarget { path: pool.clone(), window: Some((off, span)) }
    };
    let bench = Bench { dir: dir.clone(), raw_target, qcow2, pool, span, fresh_size, dur: Duration::from_secs(secs), aio, cache: cache.clone(), alt_bin };
    let mut wls = workloads(bench.qcow2.is_some());
    // VBLK_BENCH_ALT_BIN: row (e2) wherever (e) runs.
    if bench.alt_bin.is_some() {
        for w in &mut wls {
            if let Some(i) = w.servers.iter().position(|&s| s == Server::Vblk) {
                w.servers.insert(i + 1, Server::VblkAlt);
            }
        }
    }
    // VBLK_BENCH_SERVERS=b,e,e2 runs only those servers (by the letter of their row).
    if let Ok(only) = std::env::var("VBLK_BENCH_SERVERS") {
        let keys: Vec<String> = only.split(',').map(|k| format!("({})", k.trim())).collect();
        for w in &mut wls {
            w.servers.retain(|s| keys.iter().any(|k| s.label().starts_with(k.as_str())));
        }
        wls.retain(|w| !w.servers.is_empty());
    }
    // VBLK_BENCH_WORKLOADS=aw4k-qd32,cw4k-qd32 runs only those rows (for profiling).
    if let Ok(only) = std::env::var("VBLK_BENCH_WORKLOADS") {
        let keys: Vec<&str> = only.split(',').collect();
        wls.retain(|w| keys.contains(&w.key));
    }
    // The machine's wake-up cost, which bounds QD1 latency over any client/server transport.
    let wake = (wake_round_trip_us(20_000, false)?, wake_round_trip_us(20_000, true)?);
    eprintln!("eventfd ping-pong between two threads: {:.1} µs round trip, {:.1} µs on one CPU", wake.0, wake.1);
    let mut res: HashMap<(&str, Server), Vec<Cell>> = HashMap::new();
    let mut log: Vec<(usize, &str, Server, Cell)> = Vec::new();
    for rep in 0..repeats {
        for (wi, w) in wls.iter().enumerate() {
            let seed = 0x5EED_0000 + (rep as u64) * 1000 + wi as u64;
            for &s in &w.servers {
                let c = bench.run_cell(w, s, seed).with_context(|| format!("cell {} / {}", w.title, s.label()))?;
                let mut line = format!(
                    "[{}/{repeats}] {:<40} {:<28} {:>9} {}",
                    rep + 1,
                    w.title,
                    s.label(),
                    fmt_rate(c.rate, w.mibps()),
                    w.unit()
                );
                if let Some(u) = c.server_us {
                    line += &format!(", server {u:.1} µs/IO");
                }
                if let Some((m, p)) = c.lat {
                    line += &format!(", mean {m:.1} µs, p99 {p:.1} µs");
                }
                if !c.note.is_empty() {
                    line += &format!(" ({})", c.note);
                }
                eprintln!("{line}");
                res.entry((w.key, s)).or_default().push(c.clone());
                log.push((rep + 1, w.title, s, c));
            }
        }
    }

    // Report.
    let col = |k: &str, s: Server, f: &dyn Fn(&Cell) -> Option<f64>| -> Vec<f64> {
        res.get(&(k, s)).map(|v| v.iter().filter_map(f).collect()).unwrap_or_default()
    };
    let rate = |c: &Cell| Some(c.rate);
    let srv = |c: &Cell| c.server_us;
    let tot = |c: &Cell| c.total_us;
    let mean = |c: &Cell| c.lat.map(|l| l.0);
    let p99 = |c: &Cell| c.lat.map(|l| l.1);
    let mut md = String::new();
    md += &format!("# vhost-user-blk side by side: fio, qemu-storage-daemon, vblk ({})\n\n", today());
    md += &format!(
        "`{}cargo bench -p vblk-benches --bench vhost_compare`: {secs} s per cell, {repeats} repeat(s), \
         cells interleaved (per repeat: each workload on every server in turn); total run {:.0} s.\n\n",
        {
            // The environment that shaped the run, as it would be typed.
            let mut e = String::new();
            for k in ["VBLK_BENCH_SMOKE", "VBLK_BENCH_GIB", "VBLK_BENCH_SECS", "VBLK_BENCH_REPEATS", "VBLK_BENCH_WORKLOADS", "VBLK_BENCH_SERVERS", "VBLK_BENCH_RAW"] {
                if let Ok(v) = std::env::var(k) {
                    e += &format!("{k}={v} ");
                }
            }
            if std::env::var_os("VBLK_BENCH_ALT_BIN").is_some() {
                e += "VBLK_BENCH_ALT_BIN=... ";
            }
            e
        },
        t_start.elapsed().as_secs_f64()
    );
    md += &machine_facts(&base_dir);
    let raw_where = if bench.raw_target.window.is_some() {
        "the pool file's byte range that holds (e)'s blocks (VBLK_BENCH_RAW=pool: the 'raw file' of (a) and (b) is that range, \
         so the three write the same physical blocks; `vblk import` laid 'full' out there, checked byte for byte right after that import)"
    } else {
        "the raw file (VBLK_BENCH_RAW=file: its own blocks, not (e)'s)"
    };
    md += &format!(
        "- working set {} MiB (every block written beforehand; random offsets uniform over it, xorshift; \
         sequential cells wrap at its end); fresh device for allocating writes {} MiB\n",
        span / MIB,
        fresh_size / MIB
    );
    md += &format!(
        "- (a) `fio --ioengine=io_uring --direct=1 --offset={} --size={} --numjobs=QUEUES --iodepth=QD --time_based --norandommap --lat_percentiles=1` on {}\n",
        bench.raw_target.window.map_or(0, |w| w.0),
        span,
        raw_where
    );
    md += &format!(
        "- (b)/(c) `qemu-storage-daemon --blockdev driver=file,...,cache.direct=on,aio={} [--blockdev driver=raw,offset=,size= for (b) | driver=qcow2,... for (c)] --export type=vhost-user-blk,...,num-queues={EXPORT_QUEUES}`; \
         the written qcow2 is `qemu-img convert -O qcow2` of the raw file (64 KiB clusters, all allocated); the fresh one `qemu-img create -f qcow2`\n",
        bench.aio
    );
    md += &format!(
        "- (e)/(g) `vblk daemon --cache {cache}`, pool created with `--preallocate {prealloc}`, attached with {EXPORT_QUEUES} queues; \
         (e) filled by `vblk import` of the raw file; (g) `vblk vol create` before and `vol delete` after each cell; \
         (f) a second imported copy, `vblk snap create` before and `snap delete` after each cell; \
         (l) `vblk vol create --encrypt` (AES-256-GCM, RustCrypto aes-gcm) filled by `vblk import`, daemon with `--master-key-file`\n"
    );
    md += "- (d) `qemu-img create -f qcow2 -b (c) -F qcow2` before each cell (64 KiB clusters: the first write to a cluster \
           copies it, later writes to it are in place); (f) copies on write at 4 KiB, so with a short cell (d) has \
           copied most of its clusters early and then writes in place\n";
    md += "- (m) `qemu-storage-daemon --blockdev driver=null-co,read-zeroes=on` and (n) a vblk volume never written (reads are zeros, \
           no device I/O), on the QD1 row: the vhost-user-blk round trip without the disk\n";
    md += &format!(
        "- wake-up cost on this machine: an eventfd ping-pong between two threads that sleep in read(2) takes {:.1} µs per round trip \
         ({:.1} µs with both threads on one CPU); a QD1 request over vhost-user-blk from a client that sleeps until its completion \
         pays at least this on top of the device, fio on the raw file does not (it sleeps once, in io_uring_enter)\n",
        wake.0, wake.1
    );
    md += "- client: libblkio virtio-blk-vhost-user (blkio crate 0.5), one thread per queue, QD requests kept in flight per queue, \
           blocking completion waits (no polling); each server process is started for its cell and stopped after it\n";
    md += "- server CPU: utime+stime of the server process (all threads) from /proc/PID/stat from the cell's start until the server \
           is idle again after its last completion (deferred work such as vblk's RocksDB flushes and compactions is charged to the \
           cell whose writes caused it, not to the next server started on the pool), per I/O; each cell starts once its server \
           is idle (a vblk daemon may first compact the RocksDB files the previous one flushed as it stopped: not counted, the \
           note says how long); \
           total CPU: server + this client process (for fio: fio's own CPU, i.e. its whole I/O path); clock-tick resolution 10 ms\n\n";

    md += "## Throughput and CPU per I/O (median, min–max over repeats)\n\n";
    md += "| workload | server | median | min–max | vs (b) qsd raw | vs (a) fio | server CPU µs/IO | min–max | CPU vs (b) | total CPU µs/IO |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|\n";
    for w in &wls {
        let qsd = median(&col(w.base, Server::QsdRaw, &rate));
        let fio = median(&col(w.base, Server::Fio, &rate));
        let qsd_cpu = median(&col(w.base, Server::QsdRaw, &srv));
        for &s in &w.servers {
            let r = col(w.key, s, &rate);
            let (m, mm) = med_range(&r, |x| fmt_rate(x, w.mibps()));
            let cpu = col(w.key, s, &srv);
            let (cm, cmm) = med_range(&cpu, |x| format!("{x:.1}"));
            let (tm, _) = med_range(&col(w.key, s, &tot), |x| format!("{x:.1}"));
            md += &format!(
                "| {} ({}) | {} | {m} | {mm} | {} | {} | {cm} | {cmm} | {} | {tm} |\n",
                w.title,
                w.unit(),
                s.label(),
                ratio(median(&r), qsd),
                ratio(median(&r), fio),
                ratio(median(&cpu), qsd_cpu)
            );
        }
    }
    md += "\nThe allocating-write rows are compared with the randwrite QD32 (1 queue) figures of (b) and (a), which overwrite written blocks.\n";
    for w in wls.iter().filter(|w| w.latency) {
        md += &format!("\n## {} latency (µs, submission to completion; median of repeats, min–max)\n\n", w.title);
        md += "| server | IOPS | mean | min–max | vs (b) | vs (a) | p99 | min–max | vs (b) | vs (a) |\n";
        md += "|---|---|---|---|---|---|---|---|---|---|\n";
        let qm = median(&col(w.key, Server::QsdRaw, &mean));
        let fm = median(&col(w.key, Server::Fio, &mean));
        let qp = median(&col(w.key, Server::QsdRaw, &p99));
        let fp = median(&col(w.key, Server::Fio, &p99));
        for &s in &w.servers {
            let (r, _) = med_range(&col(w.key, s, &rate), |x| fmt_rate(x, false));
            let mv = col(w.key, s, &mean);
            let pv = col(w.key, s, &p99);
            let (mm, mmm) = med_range(&mv, |x| format!("{x:.1}"));
            let (pm, pmm) = med_range(&pv, |x| format!("{x:.1}"));
            md += &format!(
                "| {} | {r} | {mm} | {mmm} | {} | {} | {pm} | {pmm} | {} | {} |\n",
                s.label(),
                ratio(median(&mv), qm),
                ratio(median(&mv), fm),
                ratio(median(&pv), qp),
                ratio(median(&pv), fp)
            );
        }
        md += "\n(fio: lat_ns, i.e. submission to completion, p99 from --lat_percentiles.)\n";
    }
    md += "\n## Every cell\n\n| repeat | workload | server | figure | IOPS | server CPU µs/IO | total CPU µs/IO | mean µs | p99 µs | note |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|\n";
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    for (rep, title, s, c) in &log {
        let w = wls.iter().find(|w| w.title == *title).ok_or_else(|| anyhow!("workload"))?;
        md += &format!(
            "| {rep} | {title} | {} | {} {} | {:.0} | {} | {} | {} | {} | {} |\n",
            s.label(),
            fmt_rate(c.rate, w.mibps()),
            w.unit(),
            c.iops,
            opt(c.server_us),
            opt(c.total_us),
            opt(c.lat.map(|l| l.0)),
            opt(c.lat.map(|l| l.1)),
            c.note
        );
    }
    println!("\n{md}");
    let out = results_path("vhost_compare", smoke)?;
    std::fs::write(&out, &md)?;
    eprintln!("wrote {}", out.display());
    drop(bench);
    tmp.close().context("removing the work directory")?;
    Ok(())
}
