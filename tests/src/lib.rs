//! Test support for vblk's end-to-end tests: run the real `vblk` binary (daemon and CLI),
//! talk to its vhost-user-blk sockets with a real client (libblkio's virtio-blk-vhost-user
//! driver through the `blkio` crate), and boot QEMU guests ([`guest`]).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod guest;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The workspace's target directory (where `vblk` was built).
pub fn target_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("target"))
}

/// Path of the `vblk` binary built next to the running test (same profile).
pub fn vblk_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("VBLK_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow!("odd test exe path"))?;
    let bin = profile_dir.join("vblk");
    if !bin.exists() {
        bail!("{} not found: build it first (`cargo build --workspace --bins`, the README's test command does)", bin.display());
    }
    Ok(bin)
}

/// Run the CLI with `args` against the daemon at `api`; returns stdout, fails with stderr.
pub fn vblk(api: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(vblk_bin()?)
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .context("running vblk")?;
    if !out.status.success() {
        bail!("vblk {:?} failed: {}", args, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run the CLI with `args` and parse its `--json` output.
pub fn vblk_json(api: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let s = vblk(api, &a)?;
    serde_json::from_str(&s).with_context(|| format!("parsing JSON from vblk {args:?}: {s}"))
}

/// A test workspace: a pool file and a running daemon.
pub struct Daemon {
    pub dir: PathBuf,
    pub pool: PathBuf,
    pub api: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Create a pool of `pool_size` bytes in `dir` (offline, with the CLI).
    pub fn create_pool(dir: &Path, pool_size: &str) -> Result<PathBuf> {
        let pool = dir.join("pool.img");
        let out = Command::new(vblk_bin()?)
            .args(["pool", "create"])
            .arg(&pool)
            .args(["--size", pool_size])
            .output()?;
        if !out.status.success() {
            bail!("pool create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(pool)
    }

    /// Start `vblk daemon` on `pool` with `extra` arguments (e.g. `--attach VOL:SOCK`), and
    /// wait until its API answers.
    pub fn start(dir: &Path, pool: &Path, extra: &[String]) -> Result<Daemon> {
        let api = dir.join("api.sock");
        let log = dir.join("daemon.log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(vblk_bin()?)
            .arg("daemon")
            .arg("--pool")
            .arg(pool)
            .arg("--socket")
            .arg(&api)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("spawning vblk daemon")?;
        let mut d = Daemon { dir: dir.into(), pool: pool.into(), api, child: Some(child), log };
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if self.api.exists() && vblk(&self.api, &["vol", "list"]).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("daemon exited with {st}: {}", self.log_tail());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("daemon did not become ready: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let n = s.len().saturating_sub(4000);
        s[s.floor_char_boundary(n)..].to_string()
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        vblk(&self.api, args)
    }

    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        vblk_json(&self.api, args)
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and return its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                bail!("daemon ignored SIGTERM for 30 s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait until a unix socket path exists.
pub fn wait_for_socket(p: &Path, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !p.exists() {
        if t0.elapsed() > timeout {
            bail!("{} did not appear", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A vhost-user-blk client on one queue, through libblkio (the `blkio` crate), with one
/// shared-memory buffer region.
pub struct BlkClient {
    // Field order: queue before blkio before nothing else (blkio frees regions last).
    q: blkio::Blkioq,
    buf: blkio::MemoryRegion,
    buf_len: usize,
    blkio: blkio::Blkio,
}

fn be(e: blkio::Error) -> anyhow::Error {
    anyhow!("blkio: {} (errno {:?})", e.message(), e.errno())
}

impl BlkClient {
    /// Connect to the vhost-user-blk socket `path` with a buffer of `buf_len` bytes.
    pub fn connect(path: &Path, buf_len: usize) -> Result<BlkClient> {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(be)?;
        b.set_str("path", path.to_str().ok_or_else(|| anyhow!("non-UTF-8 socket path"))?).map_err(be)?;
        b.connect().map_err(be)?;
        b.set_i32("num-queues", 1).map_err(be)?;
        let mut out = b.start().map_err(be)?;
        let q = out.queues.pop().ok_or_else(|| anyhow!("no queue"))?;
        let buf_len = buf_len.next_multiple_of(4096);
        let buf = b.alloc_mem_region(buf_len).map_err(be)?;
        b.map_mem_region(&buf).map_err(be)?;
        Ok(BlkClient { q, buf, buf_len, blkio: b })
    }

    pub fn capacity(&self) -> Result<u64> {
        self.blkio.get_u64("capacity").map_err(be)
    }

    pub fn prop_i32(&self, name: &str) -> Result<i32> {
        self.blkio.get_i32(name).map_err(be)
    }

    pub fn prop_u64(&self, name: &str) -> Result<u64> {
        self.blkio.get_u64(name).map_err(be)
    }

    /// The shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of buf_len bytes owned by self.blkio, and &mut
        // self gives exclusive access (no request is in flight between calls).
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, self.buf_len) }
    }

    fn wait(&mut self, n: usize) -> Result<Vec<(usize, i32)>> {
        let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..n).map(|_| std::mem::MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut timeout = Duration::from_secs(30);
            let k = self.q.do_io(&mut comps[..n - got.len()], 1, Some(&mut timeout), None).map_err(be)?;
            if k == 0 {
                bail!("request timed out");
            }
            for c in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let c = unsafe { c.assume_init_ref() };
                got.push((c.user_data, c.ret));
            }
        }
        Ok(got)
    }

    fn one(&mut self) -> Result<()> {
        let r = self.wait(1)?;
        if r[0].1 < 0 {
            bail!("request failed: errno {}", -r[0].1);
        }
        Ok(())
    }

    /// Write `len` bytes from the start of the buffer at `off`.
    pub fn write(&mut self, off: u64, len: usize) -> Result<()> {
        let p = self.buf.addr as *const u8;
        self.q.write(off, p, len, 0, blkio::ReqFlags::empty());
        self.one()
    }

    /// Read `len` bytes at `off` into the start of the buffer.
    pub fn read(&mut self, off: u64, len: usize) -> Result<()> {
        let p = self.buf.addr as *mut u8;
        self.q.read(off, p, len, 0, blkio::ReqFlags::empty());
        self.one()
    }

    pub fn write_data(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.buf()[..data.len()].copy_from_slice(data);
        self.write(off, data.len())
    }

    pub fn read_data(&mut self, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read(off, len)?;
        Ok(self.buf()[..len].to_vec())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.q.flush(0, blkio::ReqFlags::empty());
        self.one()
    }

    pub fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.q.discard(off, len, 0, blkio::ReqFlags::empty());
        self.one()
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.q.write_zeroes(off, len, 0, blkio::ReqFlags::empty());
        self.one()
    }

    /// Submit `n` writes of 4 KiB at `offs` (buffer slots i*4096) at once and wait for all
    /// (queue depth n).
    pub fn write_batch(&mut self, offs: &[u64]) -> Result<()> {
        for (i, &o) in offs.iter().enumerate() {
            let p = (self.buf.addr + i * 4096) as *const u8;
            self.q.write(o, p, 4096, i, blkio::ReqFlags::empty());
        }
        for (i, r) in self.wait(offs.len())? {
            if r < 0 {
                bail!("write {i} failed: errno {}", -r);
            }
        }
        Ok(())
    }

    /// A request that should fail: returns the negative errno the device reported.
    pub fn read_expect_err(&mut self, off: u64, len: usize) -> Result<i32> {
        let p = self.buf.addr as *mut u8;
        self.q.read(off, p, len, 0, blkio::ReqFlags::empty());
        Ok(self.wait(1)?[0].1)
    }
}

/// A closed loop for [`run_load`]: `qd` requests of `bs` bytes kept in flight on each of
/// `queues` queues, at random `bs`-aligned offsets below `span`, for `dur`.
#[derive(Debug, Clone)]
pub struct Load {
    pub queues: usize,
    pub qd: usize,
    pub bs: usize,
    pub write: bool,
    pub span: u64,
    pub dur: Duration,
    pub seed: u64,
}

impl Load {
    /// 4 KiB random reads at QD32 on one queue over the first 64 MiB.
    pub fn randread_qd32(dur: Duration) -> Load {
        Load { queues: 1, qd: 32, bs: 4096, write: false, span: 64 << 20, dur, seed: 1 }
    }
}

/// The completions of a [`run_load`] run, counted per millisecond since `start`.
#[derive(Debug, Clone)]
pub struct Trace {
    /// When the first requests were submitted.
    pub start: Instant,
    /// Completions in each millisecond since `start`.
    pub per_ms: Vec<u64>,
}

impl Trace {
    /// Completions between `a` and `b` after the start.
    pub fn ops_between(&self, a: Duration, b: Duration) -> u64 {
        let (a, b) = (a.as_millis() as usize, (b.as_millis() as usize).min(self.per_ms.len()));
        self.per_ms.get(a..b).map(|s| s.iter().sum()).unwrap_or(0)
    }

    /// Completions per second between `a` and `b` after the start.
    pub fn rate(&self, a: Duration, b: Duration) -> f64 {
        self.ops_between(a, b) as f64 / b.saturating_sub(a).as_secs_f64().max(1e-9)
    }

    pub fn total(&self) -> u64 {
        self.per_ms.iter().sum()
    }

    /// How long the run took.
    pub fn len(&self) -> Duration {
        Duration::from_millis(self.per_ms.len() as u64)
    }

    /// The time since the start of an instant of the run.
    pub fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }
}

/// Drive a vhost-user-blk device at `sock` with `load` (one thread per queue, its own libblkio
/// connection) and count the completions per millisecond.
pub fn run_load(sock: &Path, load: &Load) -> Result<Trace> {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(be)?;
    b.set_str("path", sock.to_str().ok_or_else(|| anyhow!("non-UTF-8 socket path"))?).map_err(be)?;
    b.connect().map_err(be)?;
    b.set_i32("num-queues", load.queues as i32).map_err(be)?;
    let mut out = b.start().map_err(be)?;
    let per_queue = (load.qd * load.bs).next_multiple_of(4096);
    let region = b.alloc_mem_region(per_queue * load.queues).map_err(be)?;
    b.map_mem_region(&region).map_err(be)?;
    let blocks = load.span / load.bs as u64;
    if blocks == 0 {
        bail!("span {} is smaller than one request", load.span);
    }
    let start = Instant::now();
    let slots = load.dur.as_millis() as usize + 1;
    let base = region.addr;
    let traces: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = out
            .queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let load = load.clone();
                s.spawn(move || -> Result<Vec<u64>> {
                    let buf = base + qi * per_queue;
                    let mut per_ms = vec![0u64; slots];
                    let mut x = load.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (qi as u64 + 1) | 1;
                    let mut next_off = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % blocks) * load.bs as u64
                    };
                    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
                        let p = buf + slot * load.bs;
                        if load.write {
                            q.write(off, p as *const u8, load.bs, slot, blkio::ReqFlags::empty());
                        } else {
                            q.read(off, p as *mut u8, load.bs, slot, blkio::ReqFlags::empty());
                        }
                    };
                    for slot in 0..load.qd {
                        submit(q, slot, next_off());
                    }
                    let mut inflight = load.qd;
                    let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> =
                        (0..load.qd).map(|_| std::mem::MaybeUninit::uninit()).collect();
                    while inflight > 0 {
                        let mut timeout = Duration::from_secs(30);
                        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).map_err(be)?;
                        if n == 0 {
                            bail!("queue {qi}: no completion in 30 s");
                        }
                        let now = start.elapsed();
                        let more = now < load.dur;
                        for c in &comps[..n] {
                            // SAFETY: do_io initialised the first n completions.
                            let c = unsafe { c.assume_init_ref() };
                            if c.ret < 0 {
                                bail!("queue {qi}: request failed: errno {}", -c.ret);
                            }
                            inflight -= 1;
                            if more {
                                per_ms[(now.as_millis() as usize).min(slots - 1)] += 1;
                                submit(q, c.user_data, next_off());
                                inflight += 1;
                            }
                        }
                    }
                    Ok(per_ms)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("load thread panicked")))).collect()
    });
    let mut per_ms = vec![0u64; slots];
    for t in traces {
        for (a, b) in per_ms.iter_mut().zip(t?) {
            *a += b;
        }
    }
    // The queues go before the instance that owns the region (dropped at the end).
    drop(out);
    Ok(Trace { start, per_ms })
}

/// Deterministic content of a 4 KiB block: its lba and a version.
pub fn pattern_block(lba: u64, ver: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..16].copy_from_slice(&(ver.rotate_left(17) ^ i as u64).to_le_bytes());
    }
    b
}
