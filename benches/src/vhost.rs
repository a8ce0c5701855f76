//! Pieces shared by the vhost-user macro benchmarks (`vhost_compare`, `daemon_memory`): a
//! closed-loop QD-N client over libblkio's "virtio-blk-vhost-user" driver, guards for the server
//! processes (qemu-storage-daemon, the `vblk` daemon), /proc readers, and the machine facts a
//! results file starts with.
//!
//! Every child process is spawned with `PR_SET_PDEATHSIG = SIGKILL` (so a benchmark that is
//! killed leaves no server behind) and is stopped by its guard's `Drop` (SIGTERM, then SIGKILL).

use std::io::Read;
use std::mem::MaybeUninit;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::Rng;

// ---------------------------------------------------------------------------------------------
// Interruption

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Turn SIGINT/SIGTERM into a flag ([`stopped`]) so that the benchmark unwinds through its
/// guards (which stop the servers and delete the files) instead of dying on the spot.
pub fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

/// True once SIGINT or SIGTERM arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fail with "interrupted" once SIGINT or SIGTERM arrived.
pub fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Environment

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("{name}={s:?} does not parse")),
        Err(_) => default,
    }
}

pub fn smoke() -> bool {
    std::env::var("VBLK_BENCH_SMOKE").is_ok_and(|s| !s.is_empty() && s != "0")
}

/// VBLK_BENCH_DIR, default /var/tmp.
pub fn bench_dir() -> PathBuf {
    std::env::var("VBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/var/tmp"))
}

/// The workspace root (see `vblk_tests::guest::workspace_root`).
pub fn workspace_root() -> PathBuf {
    vblk_tests::guest::workspace_root()
}

/// Bytes available to an unprivileged user on the file system holding `dir` (statvfs).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: c is a valid NUL-terminated path and st points to writable memory for one statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
    }
    // SAFETY: statvfs succeeded and filled st.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The `vblk` binary to benchmark. VBLK_BIN wins; otherwise, under `cargo bench` (CARGO is set),
/// `cargo build --release -p vblk --bin vblk` first so that the binary next to this benchmark
/// (target/release/vblk) is current; then [`vblk_tests::vblk_bin`].
pub fn ensure_vblk_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("VBLK_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(cargo) = std::env::var("CARGO") {
        eprintln!("building the vblk binary: cargo build --release -p vblk --bin vblk");
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "vblk", "--bin", "vblk"])
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .status()
            .context("running cargo build for the vblk binary")?;
        if !st.success() {
            match vblk_tests::vblk_bin() {
                Ok(p) => eprintln!("WARNING: cargo build of vblk failed ({st}); using the existing {}", p.display()),
                Err(e) => bail!("cargo build of vblk failed ({st}) and there is no binary: {e}"),
            }
        }
    }
    vblk_tests::vblk_bin()
}

/// Write `size` bytes of non-zero, non-repeating data to `path` (every 4 KiB block different: it
/// starts with its block number and `vblkbnch`) and sync. The same data as `vhost_compare`'s raw
/// file.
pub fn fill_raw(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const MIB: u64 = 1 << 20;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let mut off = 0u64;
    while off < size {
        check_stop()?;
        let n = (size - off).min(MIB) as usize;
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        for (i, b) in buf.chunks_mut(4096).enumerate() {
            b[..8].copy_from_slice(&((off / 4096) + i as u64).to_le_bytes());
            b[8..16].copy_from_slice(b"vblkbnch");
        }
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc

/// Clock ticks per second of /proc/PID/stat times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of process `pid` (all its threads, live and exited), in seconds.
pub fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_cpu_seconds(&s).map(|(_, cpu)| cpu).ok_or_else(|| anyhow!("odd /proc/{pid}/stat: {s}"))
}

/// The command name and the CPU seconds (utime + stime) of a /proc `stat` line (of a process
/// or of one of its threads).
fn stat_cpu_seconds(s: &str) -> Option<(&str, f64)> {
    // Fields after the command name, which is in parentheses and may contain anything.
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // f starts at field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some((s.get(open + 1..close)?, (ticks(14)? + ticks(15)?) as f64 / clk_tck()))
}

/// CPU seconds (user + system) of each thread of process `pid` so far, summed by thread name
/// (`comm`; RocksDB's and the daemon's threads are named), sorted by name. Threads that ended
/// are not counted.
pub fn proc_threads_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by: std::collections::BTreeMap<String, f64> = Default::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    for t in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let Some((comm, cpu)) = stat_cpu_seconds(&s) else { continue };
        *by.entry(comm.to_string()).or_default() += cpu;
    }
    by.into_iter().collect()
}

/// CPU time (user + system) of this process's children that have been waited for, in seconds.
pub fn children_cpu_seconds() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into valid memory.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: initialised by getrusage above.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A "Key:  N kB" line of /proc/PID/status, in KiB (or a plain number, e.g. Threads).
pub fn proc_status(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let n = v.split_whitespace().next().ok_or_else(|| anyhow!("empty {key}"))?;
            return Ok(n.parse()?);
        }
    }
    bail!("{key} not in /proc/{pid}/status")
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Spawn `cmd` with stdin/stdout on /dev/null, stderr appended to `log`, and SIGKILL on our death.
pub fn spawn_guarded(mut cmd: Command, log: &Path) -> Result<Child> {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().with_context(|| format!("spawning {:?}", cmd.get_program()))
}

/// Last `n` bytes of a log file.
pub fn log_tail(log: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(n);
    let start = (start..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    s[start..].to_string()
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
fn terminate(c: &mut Child, grace: Duration) -> Result<std::process::ExitStatus> {
    if let Some(st) = c.try_wait()? {
        return Ok(st);
    }
    // SAFETY: kill(2) on the pid of our own unreaped child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Some(st) = c.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let st = c.wait()?;
    bail!("pid {} ignored SIGTERM for {grace:?}; killed ({st})", c.id())
}

/// Wait until `p` exists, failing early if `child` exits.
fn wait_socket(p: &Path, child: &mut Child, log: &Path, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while !p.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited with {st}: {}", log_tail(log, 3000));
        }
        // Generous: a daemon may finish an interrupted sweep or replay RocksDB's log at open.
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{what}: {} did not appear in 120 s: {}", p.display(), log_tail(log, 3000));
        }
        check_stop()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A running qemu-storage-daemon exporting one image over vhost-user-blk.
pub struct Qsd {
    child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Qsd {
    /// The command line: `format` "raw" or "qcow2", `aio` "io_uring" or "native"; with
    /// `window` = (offset, size), only that range of a raw image (the `raw` driver's
    /// `offset`/`size` options).
    pub fn args(image: &Path, format: &str, window: Option<(u64, u64)>, aio: &str, sock: &Path, queues: usize) -> Vec<String> {
        let file = format!("driver=file,node-name=file0,filename={},cache.direct=on,aio={aio}", image.display());
        let mut a = vec!["--blockdev".to_string(), file];
        let node = if let (Some((offset, size)), "raw") = (window, format) {
            a.push("--blockdev".into());
            a.push(format!("driver=raw,node-name=fmt0,file=file0,offset={offset},size={size}"));
            "fmt0"
        } else if format == "raw" {
            "file0"
        } else {
            a.push("--blockdev".into());
            a.push(format!("driver={format},node-name=fmt0,file=file0"));
            "fmt0"
        };
        a.push("--export".into());
        a.push(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ));
        a
    }

    pub fn start(image: &Path, format: &str, aio: &str, sock: &Path, queues: usize, log: &Path) -> Result<Qsd> {
        Self::start_window(image, format, None, aio, sock, queues, log)
    }

    /// qemu-storage-daemon exporting its `null-co` driver (`size` bytes, reads return zeros,
    /// no I/O at all): the cost of the vhost-user-blk transport alone.
    pub fn start_null(size: u64, sock: &Path, queues: usize, log: &Path) -> Result<Qsd> {
        Self::spawn(
            vec![
                "--blockdev".into(),
                format!("driver=null-co,node-name=null0,size={size},read-zeroes=on"),
                "--export".into(),
                format!("type=vhost-user-blk,id=e0,node-name=null0,addr.type=unix,addr.path={},writable=on,num-queues={queues}", sock.display()),
            ],
            sock,
            log,
        )
    }

    /// [`Qsd::start`] with [`Qsd::args`]'s window.
    pub fn start_window(
        image: &Path,
        format: &str,
        window: Option<(u64, u64)>,
        aio: &str,
        sock: &Path,
        queues: usize,
        log: &Path,
    ) -> Result<Qsd> {
        Self::spawn(Self::args(image, format, window, aio, sock, queues), sock, log)
    }

    /// Start qemu-storage-daemon with `args` and wait for its export socket `sock`.
    fn spawn(args: Vec<String>, sock: &Path, log: &Path) -> Result<Qsd> {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(args);
        let mut child = spawn_guarded(cmd, log)?;
        wait_socket(sock, &mut child, log, "qemu-storage-daemon")?;
        Ok(Qsd { child: Some(child), sock: sock.into(), log: log.into() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10))?;
        }
        let _ = std::fs::remove_file(&self.sock);
        Ok(())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping qemu-storage-daemon: {e:#}");
        }
    }
}

/// Which `aio=` this QEMU accepts for a file node: "io_uring" if a test export starts, else
/// "native".
pub fn probe_qsd_aio(image: &Path, dir: &Path) -> String {
    let sock = dir.join("probe.sock");
    let log = dir.join("qsd-probe.log");
    match Qsd::start(image, "raw", "io_uring", &sock, 1, &log) {
        Ok(mut q) => {
            let _ = q.stop();
            "io_uring".into()
        }
        Err(e) => {
            eprintln!("qemu-storage-daemon refused aio=io_uring ({e:#}); using aio=native");
            "native".into()
        }
    }
}

/// A running `vblk daemon` (the real binary), stopped with SIGTERM on drop.
pub struct VblkDaemon {
    child: Option<Child>,
    pub api: PathBuf,
    pub log: PathBuf,
}

impl VblkDaemon {
    /// `vblk daemon --pool POOL --socket DIR/api.sock --cache CACHE EXTRA...`; waits until the
    /// API answers.
    pub fn start(dir: &Path, pool: &Path, cache: &str, extra: &[String]) -> Result<VblkDaemon> {
        Self::start_bin(&vblk_tests::vblk_bin()?, dir, pool, cache, extra)
    }

    /// [`start`](Self::start) with the daemon run by `bin` (the CLI calls still use
    /// [`vblk_tests::vblk_bin`]).
    pub fn start_bin(bin: &Path, dir: &Path, pool: &Path, cache: &str, extra: &[String]) -> Result<VblkDaemon> {
        let api = dir.join("api.sock");
        let log = dir.join("vblk-daemon.log");
        let _ = std::fs::remove_file(&api);
        let mut cmd = Command::new(bin);
        cmd.arg("daemon").arg("--pool").arg(pool).arg("--socket").arg(&api).args(["--cache", cache]).args(extra);
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let mut child = spawn_guarded(cmd, &log)?;
        wait_socket(&api, &mut child, &log, "vblk daemon")?;
        let d = VblkDaemon { child: Some(child), api, log };
        let t0 = Instant::now();
        while vblk_tests::vblk(&d.api, &["vol", "list"]).is_err() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("vblk daemon API did not answer: {}", log_tail(&d.log, 3000));
            }
            check_stop()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        vblk_tests::vblk(&self.api, args).map_err(|e| anyhow!("{e:#}; daemon log: {}", log_tail(&self.log, 1500)))
    }

    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        vblk_tests::vblk_json(&self.api, args)
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let st = terminate(&mut c, Duration::from_secs(30))?;
            if !st.success() {
                bail!("vblk daemon exited with {st}: {}", log_tail(&self.log, 2000));
            }
        }
        Ok(())
    }
}

impl Drop for VblkDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping the vblk daemon: {e:#}");
        }
    }
}

/// Run a command to completion; fail with its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First line of a command's stdout, or "?" (for version strings).
pub fn first_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("?").trim().to_string())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Offsets

/// A pseudo-random permutation of `0..n` (cycle-walking a bijective mix over the next power of
/// two): every index comes out once, in scattered order.
pub struct Perm {
    n: u64,
    mask: u64,
    shift: u32,
    seed: u64,
    i: u64,
}

impl Perm {
    pub fn new(n: u64, seed: u64) -> Perm {
        let bits = n.max(2).next_power_of_two().trailing_zeros();
        let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        Perm { n, mask, shift: (bits / 2).max(1), seed: seed & mask, i: 0 }
    }

    fn mix(&self, x: u64) -> u64 {
        let m = self.mask;
        let mut x = (x ^ self.seed) & m;
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & m;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9) & m;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB) & m;
        x ^ (x >> self.shift)
    }

    /// The next element of the walk, skipping values >= n. `None` once the walk over
    /// the power-of-two range is exhausted.
    fn next_from(&mut self) -> Option<u64> {
        while self.i <= self.mask {
            let v = self.mix(self.i);
            self.i += 1;
            if v < self.n {
                return Some(v);
            }
        }
        None
    }
}

impl Iterator for Perm {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        self.next_from()
    }
}

// ---------------------------------------------------------------------------------------------
// The blkio client

fn be(e: blkio::Error) -> anyhow::Error {
    anyhow!("blkio: {} (errno {:?})", e.message(), e.errno())
}

/// Where a queue's requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random `bs`-aligned offsets over the span (xorshift).
    Random,
    /// Sequential, each queue from its own starting point, wrapping at the end of the span.
    Sequential,
    /// Every `bs` block of the span at most once, scattered (a permutation, split between the
    /// queues): allocating writes on a fresh thin volume. The run ends early when it runs out.
    Distinct,
}

/// One closed-loop run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub write: bool,
    pub bs: u64,
    /// Requests kept in flight per queue.
    pub qd: usize,
    pub pattern: Pattern,
    /// Offsets are in `0..span` (bytes).
    pub span: u64,
    /// Stop after this long (the requests in flight then complete).
    pub dur: Option<Duration>,
    /// Stop after this many requests per queue.
    pub limit: Option<u64>,
    /// Keep every request's latency.
    pub record_latency: bool,
    pub seed: u64,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RunOut {
    pub ops: u64,
    pub secs: f64,
    /// Submission-to-completion latencies, ns (only with `record_latency`).
    pub lat_ns: Vec<u32>,
    /// The Distinct pattern ran out of blocks before the time was up.
    pub exhausted: bool,
}

impl RunOut {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    /// (mean, p99) latency in µs.
    pub fn latency_us(&mut self) -> Option<(f64, f64)> {
        if self.lat_ns.is_empty() {
            return None;
        }
        self.lat_ns.sort_unstable();
        let mean = self.lat_ns.iter().map(|&x| x as f64).sum::<f64>() / self.lat_ns.len() as f64;
        let i = ((self.lat_ns.len() as f64 * 0.99).ceil() as usize).clamp(1, self.lat_ns.len()) - 1;
        Some((mean / 1000.0, self.lat_ns[i] as f64 / 1000.0))
    }
}

/// A vhost-user-blk client with `n` queues, each with its own slice of one shared buffer.
pub struct BenchClient {
    // Queues before the Blkio that owns the memory (drop order).
    queues: Vec<blkio::Blkioq>,
    region: blkio::MemoryRegion,
    per_queue: usize,
    capacity: u64,
    blkio: blkio::Blkio,
}

impl BenchClient {
    /// Connect to `sock` with `nq` queues and `per_queue_bytes` of buffer for each.
    /// A refused connection is retried for up to 10 s: a server's socket file appears at bind(2),
    /// a moment before it listens.
    pub fn connect(sock: &Path, nq: usize, per_queue_bytes: usize) -> Result<BenchClient> {
        let path = sock.to_str().ok_or_else(|| anyhow!("non-UTF-8 socket path"))?;
        let t0 = Instant::now();
        let mut b = loop {
            let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(be)?;
            b.set_str("path", path).map_err(be)?;
            match b.connect() {
                Ok(()) => break b,
                Err(e) if e.errno().raw_os_error() == libc::ECONNREFUSED && t0.elapsed() < Duration::from_secs(10) => {
                    check_stop()?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(be(e)).with_context(|| format!("connecting to {}", sock.display())),
            }
        };
        b.set_i32("num-queues", nq as i32).map_err(be).context("num-queues")?;
        let out = b.start().map_err(be).context("starting the blkio instance")?;
        let queues = out.queues;
        if queues.len() != nq {
            bail!("asked for {nq} queues, got {}", queues.len());
        }
        let capacity = b.get_u64("capacity").map_err(be)?;
        let align = (b.get_u64("mem-region-alignment").map_err(be)? as usize).max(4096);
        let per_queue = per_queue_bytes.next_multiple_of(align);
        let region = b.alloc_mem_region(per_queue * nq).map_err(be)?;
        b.map_mem_region(&region).map_err(be)?;
        // Non-zero, varied content for writes.
        // SAFETY: the region is a live mapping of per_queue * nq bytes owned by b, and no
        // request is in flight yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, per_queue * nq) };
        let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
        for c in buf.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Ok(BenchClient { queues, region, per_queue, capacity, blkio: b })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn prop_u64(&self, name: &str) -> Result<u64> {
        self.blkio.get_u64(name).map_err(be)
    }

    /// Run `spec` on every queue at once (one thread per queue).
    pub fn run(&mut self, spec: &Spec) -> Result<RunOut> {
        let nq = self.queues.len();
        if spec.bs as usize * spec.qd > self.per_queue {
            bail!("buffer too small for QD{} x {} bytes", spec.qd, spec.bs);
        }
        if spec.span > self.capacity || spec.span < spec.bs {
            bail!("span {} does not fit the device ({} bytes)", spec.span, self.capacity);
        }
        let base = self.region.addr;
        let per_queue = self.per_queue;
        let outs: Vec<Result<RunOut>> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .map(|(qi, q)| s.spawn(move || drive(q, base + qi * per_queue, spec, qi, nq)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client thread panicked")))).collect()
        });
        let mut total = RunOut::default();
        for o in outs {
            let o = o?;
            total.ops += o.ops;
            total.secs = total.secs.max(o.secs);
            total.exhausted |= o.exhausted;
            total.lat_ns.extend(o.lat_ns);
        }
        Ok(total)
    }

    /// A flush on queue 0, waited for.
    pub fn flush(&mut self) -> Result<()> {
        let q = &mut self.queues[0];
        q.flush(0, blkio::ReqFlags::empty());
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let mut timeout = Duration::from_secs(60);
        let n = q.do_io(&mut c, 1, Some(&mut timeout), None).map_err(be)?;
        if n != 1 {
            bail!("flush timed out");
        }
        // SAFETY: do_io filled the first n = 1 completions.
        let c = unsafe { c[0].assume_init_ref() };
        if c.ret < 0 {
            bail!("flush failed: errno {}", -c.ret);
        }
        Ok(())
    }
}

/// The closed loop on one queue: keep `qd` requests in flight until the time or the count is up.
fn drive(q: &mut blkio::Blkioq, buf: usize, spec: &Spec, qi: usize, nq: usize) -> Result<RunOut> {
    let bs = spec.bs;
    let blocks = spec.span / bs;
    let mut rng = Rng((spec.seed ^ (qi as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
    let mut seq = (blocks * qi as u64 / nq as u64) * bs;
    // Distinct: this queue takes every nq-th element of one shared permutation.
    let mut perm = Perm::new(blocks, spec.seed);
    for _ in 0..qi {
        perm.next();
    }
    let mut issued = 0u64;
    let mut exhausted = false;
    let mut next_off = |exhausted: &mut bool| -> Option<u64> {
        if spec.limit.is_some_and(|l| issued >= l) {
            return None;
        }
        let off = match spec.pattern {
            Pattern::Random => (rng.next() % blocks) * bs,
            Pattern::Sequential => {
                let o = seq;
                seq += bs;
                if seq + bs > blocks * bs {
                    seq = 0;
                }
                o
            }
            Pattern::Distinct => {
                let Some(b) = perm.next() else {
                    *exhausted = true;
                    return None;
                };
                for _ in 1..nq {
                    perm.next();
                }
                b * bs
            }
        };
        issued += 1;
        Some(off)
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let p = buf + slot * bs as usize;
        if spec.write {
            q.write(off, p as *const u8, bs as usize, slot, blkio::ReqFlags::empty());
        } else {
            q.read(off, p as *mut u8, bs as usize, slot, blkio::ReqFlags::empty());
        }
    };
    let t0 = Instant::now();
    let deadline = spec.dur.map(|d| t0 + d);
    let mut t_sub = vec![t0; spec.qd];
    let mut lat = if spec.record_latency { Vec::with_capacity(1 << 16) } else { Vec::new() };
    let mut inflight = 0usize;
    for slot in 0..spec.qd {
        if let Some(off) = next_off(&mut exhausted) {
            submit(q, slot, off);
            t_sub[slot] = Instant::now();
            inflight += 1;
        }
    }
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..spec.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut ops = 0u64;
    let mut last = t0;
    while inflight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).map_err(be)?;
        if n == 0 {
            bail!("queue {qi}: no completion in 30 s ({inflight} requests in flight)");
        }
        let now = Instant::now();
        let over = deadline.is_some_and(|d| now >= d) || stopped();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret < 0 {
                bail!("queue {qi}: request failed: errno {}", -c.ret);
            }
            let slot = c.user_data;
            if spec.record_latency {
                lat.push(now.duration_since(t_sub[slot]).as_nanos().min(u32::MAX as u128) as u32);
            }
            ops += 1;
            inflight -= 1;
            if !over {
                if let Some(off) = next_off(&mut exhausted) {
                    submit(q, slot, off);
                    t_sub[slot] = now;
                    inflight += 1;
                }
            }
        }
        last = now;
    }
    Ok(RunOut { ops, secs: last.duration_since(t0).as_secs_f64(), lat_ns: lat, exhausted })
}

// ---------------------------------------------------------------------------------------------
// Reporting

/// Today's date (UTC), YYYY-MM-DD, from the system clock.
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (secs / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Mean round trip, µs, of an eventfd ping-pong between two threads (`rounds` times): each
/// side blocks in read(2) until the other writes. With `one_cpu` both threads are pinned to
/// the CPU this one runs on. The floor of any request/response between two sleeping threads,
/// such as a vhost-user-blk client that waits for its completion and a server that waits for
/// the kick; on a VM whose idle vCPUs halt it is dominated by waking a halted vCPU.
pub fn wake_round_trip_us(rounds: u32, one_cpu: bool) -> Result<f64> {
    // SAFETY: eventfd(2) with valid flags; results checked.
    let (a, b) = unsafe { (libc::eventfd(0, libc::EFD_CLOEXEC), libc::eventfd(0, libc::EFD_CLOEXEC)) };
    if a < 0 || b < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
    let pin = move || {
        if one_cpu {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET within its size.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
    };
    let read = |fd: i32| {
        let mut v: u64 = 0;
        // SAFETY: an 8-byte read into a valid u64 from our own eventfd.
        unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    };
    let write = |fd: i32| {
        let v: u64 = 1;
        // SAFETY: an 8-byte write of a valid u64 to our own eventfd.
        unsafe { libc::write(fd, &v as *const u64 as *const libc::c_void, 8) };
    };
    let secs = std::thread::scope(|s| {
        s.spawn(move || {
            pin();
            for _ in 0..rounds {
                read(a);
                write(b);
            }
        });
        // This thread's own mask is restored afterwards.
        // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
        let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above, our own thread.
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) };
        pin();
        let t0 = Instant::now();
        for _ in 0..rounds {
            write(a);
            read(b);
        }
        let secs = t0.elapsed().as_secs_f64();
        // SAFETY: restores the mask read above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &saved) };
        secs
    });
    // SAFETY: closing our own fds once.
    unsafe {
        libc::close(a);
        libc::close(b);
    }
    Ok(secs * 1e6 / f64::from(rounds))
}

/// Markdown bullet list of the machine, the disk under `dir` and the tool versions.
pub fn machine_facts(dir: &Path) -> String {
    let mut s = String::new();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let mem = proc_meminfo_gib();
    let d = dir.to_string_lossy().to_string();
    let fm = first_line("findmnt", &["-no", "SOURCE,FSTYPE,OPTIONS", "-T", &d]);
    let df = Command::new("df")
        .args(["-h", "--output=source,fstype,size,used,avail", &d])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().nth(1).unwrap_or("?").split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    let squash = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let fm = squash(fm);
    let source = fm.split_whitespace().next().unwrap_or("").to_string();
    let dev = if source.starts_with("/dev/") {
        let d = first_line("lsblk", &["-dno", "NAME,TYPE,SIZE,ROTA", &source]);
        let model = first_line("lsblk", &["-dno", "MODEL", &source]);
        format!("{} (name, type, size, rotational), model: {}", squash(d), if model.is_empty() { "?".into() } else { model })
    } else {
        "-".into()
    };
    let ws = workspace_root();
    let ws = ws.to_string_lossy();
    let rev = first_line("git", &["-C", &ws, "rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", &ws, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    s += &format!("- machine: {nproc} CPUs ({cpu}), {mem:.1} GiB RAM, kernel {}\n", kernel.trim());
    s += &format!("- bench dir: `{d}` on `{fm}`; df: `{df}`; device: `{dev}`\n");
    s += &format!("- qemu-storage-daemon: {}\n", first_line("qemu-storage-daemon", &["--version"]));
    s += &format!("- fio: {}\n", first_line("fio", &["--version"]));
    s += &format!("- vblk: git {rev}{}\n", if dirty { " (with uncommitted changes)" } else { "" });
    s += &format!("- rustc: {}\n", first_line("rustc", &["--version"]));
    s
}

fn proc_meminfo_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

/// Where a results file goes: benches/results/DATE-NAME.md (a new -2, -3 ... suffix rather than
/// overwriting), or in smoke mode TARGET/NAME-smoke-latest.md (not committed).
pub fn results_path(name: &str, smoke: bool) -> Result<PathBuf> {
    if smoke {
        let t = vblk_tests::target_dir();
        std::fs::create_dir_all(&t)?;
        return Ok(t.join(format!("{name}-smoke-latest.md")));
    }
    let dir = workspace_root().join("benches").join("results");
    std::fs::create_dir_all(&dir)?;
    let date = today();
    let mut p = dir.join(format!("{date}-{name}.md"));
    let mut k = 2;
    while p.exists() {
        p = dir.join(format!("{date}-{name}-{k}.md"));
        k += 1;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_is_a_permutation() {
        for n in [1u64, 2, 3, 7, 8, 1000, 4097] {
            let mut v: Vec<u64> = Perm::new(n, 12345).collect();
            assert_eq!(v.len() as u64, n);
            v.sort();
            v.dedup();
            assert_eq!(v.len() as u64, n);
        }
    }
}
