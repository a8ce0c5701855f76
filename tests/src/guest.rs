//! Guest side of the end-to-end tests: boots a small Linux guest under QEMU
//! with one `vhost-user-blk-pci` device per [`DiskSpec`] and runs one test
//! scenario inside it (see `tests/guest/init` and `tests/guest/README.md`).
//!
//! The guest is a Debian cloud kernel plus a busybox initramfs, built (once,
//! cached) by `tests/guest/build.sh`. The guest reports on its serial console
//! with marker lines that [`GuestOutput::parse`] understands:
//!
//! ```text
//! VBLK-BOOT <uptime when /init started>
//! VBLK-INFO <key> <value>
//! VBLK-SUM <name> <sha256>
//! VBLK-RESULT: PASS <scenario>
//! VBLK-RESULT: FAIL <scenario> <reason>
//! ```
//!
//! Environment:
//! - `VBLK_GUEST_DIR`: artifact cache (default `<target dir>/guest`).
//! - `VBLK_QEMU`: QEMU binary (default `qemu-system-x86_64` from `PATH`).
//! - `VBLK_GUEST_JOBS`: how many guests may run at once across all test
//!   processes (default: number of CPUs). The wait for a slot is not counted
//!   in [`GuestRun::timeout`].
//! - `VBLK_GUEST_VERBOSE=1`: copy the guest console to stderr while it runs.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Kernel and initramfs of the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// `vmlinuz`
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`
    pub initrd: PathBuf,
    /// The cache directory both live in.
    pub dir: PathBuf,
}

/// One vhost-user-blk disk of the guest. The first disk is `/dev/vda`, the
/// second `/dev/vdb`, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The backend's vhost-user unix socket (it must already listen).
    pub socket: PathBuf,
    /// `num-queues` of the `vhost-user-blk-pci` device.
    pub num_queues: u32,
    /// Add `reconnect=1` to the socket chardev, so QEMU reconnects after the
    /// backend restarts.
    pub reconnect: bool,
}

impl DiskSpec {
    /// One queue, no reconnect.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DiskSpec { socket: socket.into(), num_queues: 1, reconnect: false }
    }
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRun {
    /// Disks in order: `/dev/vda`, `/dev/vdb`, ...
    pub disks: Vec<DiskSpec>,
    /// `write-pattern`, `verify-pattern`, `verify-two`, `mkfs-fsck`, `discard`,
    /// `read-two` or `info` (see tests/guest/README.md).
    pub scenario: String,
    /// `vblk.arg=`: the seed for the pattern scenarios (`[A-Za-z0-9._-]`, at
    /// most 64 characters), `SEED_VDA,SEED_VDB` for `verify-two`, the MiB
    /// count for `read-two`.
    pub arg: Option<String>,
    /// `vblk.mib=`: size of the pattern region in MiB (the guest's default,
    /// 64, when `None`).
    pub mib: Option<u32>,
    /// Wall-clock limit for QEMU (boot + scenario); QEMU is killed after it.
    pub timeout: Duration,
    /// Guest RAM in MiB (shared memfd memory, as vhost-user needs).
    pub mem_mib: u32,
    /// More kernel command line parameters (space-separated).
    pub kernel_args: String,
    /// Boot through UEFI firmware (OVMF) from the first disk instead of QEMU's `-kernel`: the
    /// disk must hold the image [`uefi_boot_image`] builds (the firmware's shell runs its
    /// `startup.nsh`, which starts the kernel and initramfs from that disk).
    pub uefi: bool,
}

impl GuestRun {
    /// A run with defaults: no argument, 64 MiB pattern, 300 s timeout, 512 MiB RAM.
    pub fn new(scenario: &str, disks: Vec<DiskSpec>) -> Self {
        GuestRun {
            disks,
            scenario: scenario.to_string(),
            arg: None,
            mib: None,
            timeout: Duration::from_secs(300),
            mem_mib: 512,
            kernel_args: String::new(),
            uefi: false,
        }
    }

    /// Sets [`GuestRun::mib`].
    pub fn with_mib(mut self, mib: u32) -> Self {
        self.mib = Some(mib);
        self
    }

    /// Sets [`GuestRun::arg`].
    pub fn with_arg(mut self, arg: impl Into<String>) -> Self {
        self.arg = Some(arg.into());
        self
    }
}

/// Scenarios that run fio in the guest: those named fio*, and `reconnect` (writes in flight
/// across the daemon's restart).
fn needs_fio(scenario: &str) -> bool {
    scenario.starts_with("fio") || scenario == "reconnect"
}

impl Default for GuestRun {
    fn default() -> Self {
        GuestRun::new("info", Vec::new())
    }
}

/// The `VBLK-RESULT` line of a guest run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResult {
    pub passed: bool,
    /// The scenario named on the result line.
    pub scenario: String,
    /// Why it failed (empty for PASS).
    pub reason: String,
}

/// What a guest run printed, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestOutput {
    /// The whole serial console.
    pub console: String,
    /// True if the guest printed `VBLK-RESULT: PASS <scenario>` for the
    /// scenario that was asked for and no `VBLK-RESULT: FAIL`.
    pub passed: bool,
    /// `VBLK-SUM <name> <sum>` lines as (name, sum), in order.
    pub sums: Vec<(String, String)>,
    /// `VBLK-INFO <key> <value>` lines as (key, value), in order.
    pub info: Vec<(String, String)>,
    /// The (last) `VBLK-RESULT` line, if any.
    pub result: Option<GuestResult>,
    /// Guest uptime in seconds when /init started (`VBLK-BOOT`).
    pub boot_secs: Option<f64>,
    /// Wall-clock time QEMU ran (zero when only parsed).
    pub elapsed: Duration,
    /// What QEMU wrote to stderr.
    pub qemu_stderr: String,
}

impl GuestOutput {
    /// Parses a console transcript for a run of `scenario`. Markers are
    /// found anywhere in a line (a kernel message may precede them).
    pub fn parse(console: &str, scenario: &str) -> GuestOutput {
        let mut sums = Vec::new();
        let mut info = Vec::new();
        let mut result: Option<GuestResult> = None;
        let mut any_fail = false;
        let mut boot_secs = None;
        for raw in console.lines() {
            let line = raw.trim_end_matches('\r');
            if let Some(rest) = after(line, "VBLK-RESULT: ") {
                let mut it = rest.splitn(3, ' ');
                let verdict = it.next().unwrap_or("");
                let scen = it.next().unwrap_or("").trim().to_string();
                let reason = it.next().unwrap_or("").trim().to_string();
                let passed = match verdict {
                    "PASS" => true,
                    "FAIL" => false,
                    _ => continue,
                };
                any_fail |= !passed;
                result = Some(GuestResult { passed, scenario: scen, reason });
            } else if let Some(rest) = after(line, "VBLK-SUM ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(sum)) = (it.next(), it.next()) {
                    sums.push((name.to_string(), sum.to_string()));
                }
            } else if let Some(rest) = after(line, "VBLK-INFO ") {
                let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
                if !k.is_empty() {
                    info.push((k.to_string(), v.trim().to_string()));
                }
            } else if let Some(rest) = after(line, "VBLK-BOOT ") {
                boot_secs = rest.trim().parse().ok();
            }
        }
        let passed = !any_fail && result.as_ref().is_some_and(|r| r.passed && r.scenario == scenario);
        GuestOutput {
            console: console.to_string(),
            passed,
            sums,
            info,
            result,
            boot_secs,
            elapsed: Duration::ZERO,
            qemu_stderr: String::new(),
        }
    }

    /// The last `VBLK-SUM` with this name.
    pub fn sum(&self, name: &str) -> Option<&str> {
        self.sums.iter().rev().find(|(n, _)| n == name).map(|(_, s)| s.as_str())
    }

    /// The last `VBLK-INFO` with this key.
    pub fn info(&self, key: &str) -> Option<&str> {
        self.info.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The failure reason, if the guest reported FAIL.
    pub fn fail_reason(&self) -> Option<&str> {
        self.result.as_ref().filter(|r| !r.passed).map(|r| r.reason.as_str())
    }

    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail_lines(&self.console, lines)
    }

    /// Ok if the run passed, else an error with the reason and console tail.
    pub fn ensure_passed(&self) -> Result<()> {
        if self.passed {
            return Ok(());
        }
        let why = match &self.result {
            Some(r) if !r.passed => format!("guest scenario {} FAILED: {}", r.scenario, r.reason),
            Some(r) => format!("guest reported PASS for {:?}, not the scenario asked for", r.scenario),
            None => "guest printed no VBLK-RESULT".to_string(),
        };
        bail!("{why}\n--- console tail ---\n{}", self.console_tail(40))
    }
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// artifacts

/// The workspace root: the parent of cargo's run-time `CARGO_MANIFEST_DIR` (set for whichever
/// workspace member runs, tests or benches; each is a directory of the root), else of the
/// directory this crate was compiled in. A test binary reused from a shared target directory
/// (`CARGO_TARGET_DIR` caches across checkouts, as in CI) may have been compiled in another
/// checkout, which can be gone.
pub fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_MANIFEST_DIR")
        .and_then(|d| Path::new(&d).parent().map(Path::to_path_buf))
        .filter(|root| root.join("tests").join("guest").join("build.sh").is_file())
        .unwrap_or_else(|| compiled.parent().unwrap_or(compiled).to_path_buf())
}

/// `tests/guest` in the source tree.
pub fn guest_src_dir() -> PathBuf {
    workspace_root().join("tests").join("guest")
}

/// The artifact cache directory: `$VBLK_GUEST_DIR`, else
/// `$CARGO_TARGET_DIR/guest`, else `<workspace>/target/guest`.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VBLK_GUEST_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| root.join(d)) // join keeps an absolute path as is
        .unwrap_or_else(|| root.join("target"));
    target.join("guest")
}

/// An exclusive `flock` on a file, released when dropped (the fd closes).
struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock is held, or with `wait == false` returns
    /// `Ok(None)` when another holder has it.
    fn acquire(path: &Path, wait: bool) -> Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
        loop {
            // SAFETY: flock() only takes a file descriptor, which `file` owns
            // and keeps open for the duration of the call; no memory is shared.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !wait => return Ok(None),
                _ => return Err(err).with_context(|| format!("flock {}", path.display())),
            }
        }
    }
}

static ARTIFACTS: Mutex<Option<GuestArtifacts>> = Mutex::new(None);

/// Builds the guest kernel + initramfs if needed (`tests/guest/build.sh`,
/// which downloads the Debian cloud kernel package on first use) and returns
/// their paths. Safe to call from parallel tests and processes: the build is
/// serialized by a lock file in the cache directory.
pub fn guest_artifacts() -> Result<GuestArtifacts> {
    let mut cached = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = cached.as_ref() {
        return Ok(a.clone());
    }
    let dir = guest_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = guest_src_dir().join("build.sh");
    let out = {
        let _lock = FileLock::acquire(&dir.join(".build.lock"), true)?;
        Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?
    };
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{}{}",
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = GuestArtifacts { kernel: dir.join("vmlinuz"), initrd: dir.join("initramfs.cpio.gz"), dir };
    for p in [&a.kernel, &a.initrd] {
        if !p.is_file() {
            bail!("build.sh succeeded but {} is missing", p.display());
        }
    }
    *cached = Some(a.clone());
    Ok(a)
}

// ---------------------------------------------------------------------------
// QEMU command line

/// `-accel kvm -cpu host` only where KVM really works: `/dev/kvm` exists,
/// it is not a PVM device (`/sys/module/kvm_pvm`), and kvm_intel or kvm_amd
/// is loaded. Otherwise TCG: `-accel tcg,thread=multi -cpu max`.
pub fn accel_args() -> Vec<String> {
    let e = |p: &str| Path::new(p).exists();
    let kvm = e("/dev/kvm") && !e("/sys/module/kvm_pvm") && (e("/sys/module/kvm_intel") || e("/sys/module/kvm_amd"));
    let v: &[&str] = if kvm { &["-accel", "kvm", "-cpu", "host"] } else { &["-accel", "tcg,thread=multi", "-cpu", "max"] };
    v.iter().map(|s| s.to_string()).collect()
}

/// The QEMU binary: `$VBLK_QEMU` or `qemu-system-x86_64`.
pub fn qemu_binary() -> String {
    std::env::var("VBLK_QEMU").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "qemu-system-x86_64".to_string())
}

/// Guest vCPUs for a run: enough for every queue to get its own blk-mq
/// hardware context (virtio-blk uses at most one queue per CPU), 2..=4.
pub fn guest_cpus(run: &GuestRun) -> u32 {
    run.disks.iter().map(|d| d.num_queues).max().unwrap_or(1).clamp(2, 4)
}

/// The kernel command line for a run.
pub fn kernel_cmdline(run: &GuestRun) -> String {
    let mut s = format!("console=ttyS0 quiet panic=-1 vblk.scenario={}", run.scenario);
    if let Some(a) = &run.arg {
        s.push_str(" vblk.arg=");
        s.push_str(a);
    }
    if let Some(m) = run.mib {
        s.push_str(&format!(" vblk.mib={m}"));
    }
    if !run.kernel_args.is_empty() {
        s.push(' ');
        s.push_str(&run.kernel_args);
    }
    s
}

/// The full QEMU argv, `argv[0]` (the binary, see [`qemu_binary`]) included.
/// The serial console goes to stdout (`-serial stdio`), QEMU exits when the
/// guest powers off, panics or reboots.
pub fn qemu_args(run: &GuestRun, art: &GuestArtifacts) -> Vec<String> {
    let mut v: Vec<String> = vec![qemu_binary()];
    let mut push = |xs: &[&str]| v.extend(xs.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]);
    v.extend(accel_args());
    let mem = run.mem_mib;
    v.extend([
        "-smp".to_string(),
        guest_cpus(run).to_string(),
        "-m".to_string(),
        format!("{mem}M"),
        "-object".to_string(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-numa".to_string(),
        "node,memdev=mem".to_string(),
    ]);
    if run.uefi {
        // The variables store is written by the firmware: `snapshot=on` keeps the writes in a
        // temporary overlay, so the system's copy stays pristine.
        v.extend([
            "-machine".to_string(),
            "q35".to_string(),
            "-drive".to_string(),
            format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
            "-drive".to_string(),
            format!("if=pflash,format=raw,snapshot=on,file={OVMF_VARS}"),
        ]);
    } else {
        v.extend([
            "-kernel".to_string(),
            art.kernel.display().to_string(),
            "-initrd".to_string(),
            initrd_of(run, art).display().to_string(),
            "-append".to_string(),
            kernel_cmdline(run),
        ]);
    }
    for (i, d) in run.disks.iter().enumerate() {
        let reconnect = if d.reconnect { ",reconnect=1" } else { "" };
        v.push("-chardev".to_string());
        // QEMU option values escape a comma by doubling it
        v.push(format!("socket,id=vblk{i},path={}{reconnect}", d.socket.display().to_string().replace(',', ",,")));
        v.push("-device".to_string());
        v.push(format!("vhost-user-blk-pci,chardev=vblk{i},num-queues={}", d.num_queues.max(1)));
    }
    v
}

/// The initramfs a run boots: scenarios that run fio boot the one that also carries it (see
/// build.sh).
fn initrd_of(run: &GuestRun, art: &GuestArtifacts) -> PathBuf {
    if needs_fio(&run.scenario) {
        art.dir.join("initramfs-fio.cpio.gz")
    } else {
        art.initrd.clone()
    }
}

/// OVMF, Debian's `ovmf` package: the firmware code and the variables store template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Build at `out` a disk image of `mib` MiB that UEFI firmware boots the test guest from: a
/// FAT32 file system (no partition table, as on a USB stick) with the kernel as
/// `vmlinuz.efi` (its EFI stub), the initramfs as `initrd.gz`, and a `startup.nsh` that starts
/// the kernel with the run's command line. OVMF finds no boot loader on the disk, starts its
/// built-in shell, and the shell runs `startup.nsh` after a 5 s countdown. OVMF loads both
/// files through the firmware's own virtio-blk driver, which negotiates neither `SIZE_MAX` nor
/// `SEG_MAX` and reads each file in transfers of many MiB. Needs `mkfs.vfat` (dosfstools) and
/// `mcopy` (mtools).
pub fn uefi_boot_image(run: &GuestRun, out: &Path, mib: u32) -> Result<()> {
    let art = guest_artifacts()?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(u64::from(mib) << 20)?;
    drop(f);
    let sh = |cmd: &mut Command, what: &str| -> Result<()> {
        let o = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what} (apt-get install dosfstools mtools)"))?;
        if !o.status.success() {
            bail!("{what} failed ({}): {}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    sh(Command::new("mkfs.vfat").args(["-F", "32", "-n", "VBLKESP"]).arg(out), "mkfs.vfat")?;
    let nsh = out.with_extension("nsh");
    std::fs::write(&nsh, format!("fs0:\\vmlinuz.efi initrd=\\initrd.gz {}\r\n", kernel_cmdline(run)))?;
    for (src, name) in [(art.kernel.clone(), "vmlinuz.efi"), (initrd_of(run, &art), "initrd.gz"), (nsh.clone(), "startup.nsh")] {
        sh(Command::new("mcopy").arg("-i").arg(out).arg(&src).arg(format!("::/{name}")), "mcopy")?;
    }
    let _ = std::fs::remove_file(&nsh);
    Ok(())
}

/// `argv` as one line for a POSIX shell (for READMEs, demos and logs).
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn validate(run: &GuestRun) -> Result<()> {
    let word_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() && c != '"');
    if !word_ok(&run.scenario) {
        bail!("bad scenario name {:?}", run.scenario);
    }
    if let Some(a) = &run.arg {
        if !word_ok(a) {
            bail!("vblk.arg must be one word of printable ASCII: {a:?}");
        }
    }
    if run.disks.is_empty() {
        bail!("GuestRun has no disks");
    }
    if run.disks.len() > 8 {
        bail!("at most 8 disks");
    }
    if run.mib == Some(0) {
        bail!("mib must be at least 1 (a 0 MiB pattern region would verify nothing)");
    }
    if run.uefi && !Path::new(OVMF_CODE).is_file() {
        bail!("{OVMF_CODE} is missing: apt-get install ovmf");
    }
    if run.mem_mib < 128 {
        bail!("mem_mib {} is too small (>= 128, 512 recommended)", run.mem_mib);
    }
    for d in &run.disks {
        if !d.reconnect && !d.socket.exists() {
            bail!("vhost-user socket {} does not exist (is the backend running?)", d.socket.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// running

/// How many guests may run at once (`VBLK_GUEST_JOBS`, default CPU count).
fn guest_jobs() -> usize {
    std::env::var("VBLK_GUEST_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Takes one of the `guest_jobs()` slots (lock files in the cache dir).
fn guest_slot(dir: &Path) -> Result<FileLock> {
    let n = guest_jobs();
    loop {
        for i in 0..n {
            if let Some(l) = FileLock::acquire(&dir.join(format!(".slot-{i}.lock")), false)? {
                return Ok(l);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills QEMU if the caller bails out or panics while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn pump(mut from: impl Read + Send + 'static, to: Arc<Mutex<Vec<u8>>>, echo: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if echo {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    to.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

/// Boots the guest, runs `run.scenario` and returns what it printed.
///
/// Returns `Ok` with `passed == false` when the guest reported FAIL (use
/// [`GuestOutput::ensure_passed`] to turn that into an error). Returns an
/// error, with the console tail and QEMU's stderr, when QEMU cannot start,
/// the timeout expires (QEMU is killed), or the guest printed no result.
pub fn run_guest(run: &GuestRun) -> Result<GuestOutput> {
    run_guest_with_hook(run, None)
}

/// [`run_guest`], calling `hook` (once, on the test thread, while the guest keeps running) as
/// soon as the console shows the line `marker` — e.g. to restart the backend under the guest.
pub fn run_guest_with_hook(run: &GuestRun, mut hook: Option<(&str, Box<dyn FnOnce() + '_>)>) -> Result<GuestOutput> {
    validate(run)?;
    let art = guest_artifacts()?;
    let _slot = guest_slot(&art.dir)?;
    let argv = qemu_args(run, &art);
    let echo = std::env::var("VBLK_GUEST_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0");
    let start = Instant::now();
    let mut qemu = Running::spawn(&argv, echo)?;
    let status: ExitStatus = loop {
        if let Some(st) = qemu.exited()? {
            break st;
        }
        if hook.as_ref().is_some_and(|(m, _)| qemu.console().lines().any(|l| l.trim_end() == *m)) {
            if let Some((_, f)) = hook.take() {
                f();
            }
        }
        if start.elapsed() >= run.timeout {
            let _ = qemu.child.0.kill();
            let _ = qemu.child.0.wait();
            for r in qemu.readers.drain(..) {
                let _ = r.join();
            }
            bail!(
                "guest scenario {} timed out after {:?}; qemu killed\ncommand: {}\n--- qemu stderr ---\n{}\n--- console tail ---\n{}",
                run.scenario,
                run.timeout,
                shell_words(&argv),
                qemu.stderr().trim_end(),
                tail_lines(&qemu.console(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    for r in qemu.readers.drain(..) {
        let _ = r.join();
    }
    let elapsed = start.elapsed();
    let mut out = GuestOutput::parse(&qemu.console(), &run.scenario);
    out.elapsed = elapsed;
    out.qemu_stderr = qemu.stderr();
    if out.result.is_none() {
        bail!(
            "guest scenario {} printed no VBLK-RESULT (qemu {status} after {elapsed:.1?})\ncommand: {}\n--- qemu stderr ---\n{}\n--- console tail ---\n{}",
            run.scenario,
            shell_words(&argv),
            out.qemu_stderr.trim_end(),
            out.console_tail(40)
        );
    }
    Ok(out)
}

/// A QEMU process with its console and stderr collected.
struct Running {
    child: KillOnDrop,
    console: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    fn spawn(argv: &[String], echo: bool) -> Result<Running> {
        let mut child = KillOnDrop(
            Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {} (apt-get install qemu-system-x86)", argv[0]))?,
        );
        let console = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            pump(child.0.stdout.take().expect("stdout is piped"), console.clone(), echo),
            pump(child.0.stderr.take().expect("stderr is piped"), stderr.clone(), echo),
        ];
        Ok(Running { child, console, stderr, readers })
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child.0.try_wait().context("waiting for qemu")
    }

    /// Wait for exit (killing QEMU at `deadline`), then for the console readers.
    fn finish(mut self, deadline: Instant) -> Result<(ExitStatus, String, String)> {
        let status = loop {
            if let Some(st) = self.exited()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.0.kill();
                bail!("qemu timed out\n--- qemu stderr ---\n{}\n--- console tail ---\n{}", self.stderr().trim_end(), tail_lines(&self.console(), 40));
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok((status, self.console(), self.stderr()))
    }
}

/// A QMP client (QEMU's JSON monitor) on a unix socket.
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connect (retrying while QEMU creates the socket) and leave capabilities negotiation.
    pub fn connect(path: &Path, within: Duration) -> Result<Qmp> {
        let t0 = Instant::now();
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < within => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e).with_context(|| format!("connecting to QMP at {}", path.display())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp { reader: std::io::BufReader::new(stream.try_clone()?), writer: stream };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut l = String::new();
        if self.reader.read_line(&mut l).context("reading from QMP")? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&l).with_context(|| format!("QMP sent {l:?}"))
    }

    /// Run a command; its `return` value, or its `error` as an error. Events are skipped.
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").context("writing to QMP")?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
        }
    }
}

/// How [`run_guest_migrating`] migrates the guest.
pub struct Migration<'a> {
    /// The guest prints this line when it is ready: the migration starts.
    pub ready: &'a str,
    /// Migration bandwidth, bytes/s.
    pub bandwidth: u64,
    /// Runs once the migration has copied all of guest memory once (the first pass) and goes
    /// on copying what changes, with the guest running.
    pub first_pass_done: Box<dyn FnOnce() + 'a>,
    /// The guest prints this line when what it does during the migration is done: the
    /// migration may converge now (the guest keeps running until QEMU pauses it for the last
    /// pass).
    pub done: &'a str,
    /// Runs once the destination runs the guest.
    pub resumed: Box<dyn FnOnce() + 'a>,
    /// Pause the guest (QMP `stop`) before letting the migration converge, and resume it on
    /// the destination; otherwise the migration converges with the guest running.
    pub pause_first: bool,
}

/// [`run_guest`] with a live migration in the middle. When the console shows `m.ready`, the
/// running QEMU starts migrating the guest to a file; after the first pass, with a bandwidth
/// and downtime limit too small to ever converge: the migration keeps copying dirtied pages
/// while the guest runs, for as long as the test wants. After the first pass over guest
/// memory, `m.first_pass_done` runs; when the console shows `m.done`, the limits are raised and
/// the migration converges (QEMU pauses the guest for the last pass) and the source quits. A
/// new QEMU with the same devices takes the guest up from the file (`-incoming`), connecting
/// to the same vhost-user sockets, and runs it; then `m.resumed` runs. The output is the first
/// console followed by the second. Also returns the final `query-migrate` status.
pub fn run_guest_migrating(run: &GuestRun, m: Migration<'_>) -> Result<(GuestOutput, serde_json::Value)> {
    validate(run)?;
    let art = guest_artifacts()?;
    let _slot = guest_slot(&art.dir)?;
    let echo = std::env::var("VBLK_GUEST_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0");
    let work = tempfile::Builder::new().prefix("vblk-migrate-").tempdir().context("temp dir")?;
    let state = work.path().join("state");
    let argv = qemu_args(run, &art);
    let with = |extra: &[String]| -> Vec<String> { argv.iter().chain(extra).cloned().collect() };
    let (qmp_a, qmp_b) = (work.path().join("qmp-a"), work.path().join("qmp-b"));
    let qmp_arg = |p: &Path| vec!["-qmp".to_string(), format!("unix:{},server=on,wait=off", p.display())];
    let start = Instant::now();
    let deadline = start + run.timeout;
    let context = |what: &str, r: &Running| {
        format!(
            "{what} ({} scenario)\ncommand: {}\n--- qemu stderr ---\n{}\n--- console tail ---\n{}",
            run.scenario,
            shell_words(&argv),
            r.stderr().trim_end(),
            tail_lines(&r.console(), 40)
        )
    };
    let wait_line = |r: &mut Running, line: &str| -> Result<()> {
        loop {
            if r.exited()?.is_some() {
                bail!("{}", context(&format!("QEMU ended before the guest printed {line}"), r));
            }
            if r.console().lines().any(|l| l.trim_end() == line) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{}", context(&format!("timed out waiting for {line}"), r));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    };
    let status_of = |v: &serde_json::Value| v.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();

    // The source.
    let mut a = Running::spawn(&with(&qmp_arg(&qmp_a)), echo)?;
    let mut q = Qmp::connect(&qmp_a, Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:#}\n{}", context("no QMP", &a)))?;
    wait_line(&mut a, m.ready)?;
    q.execute("migrate-set-parameters", serde_json::json!({ "max-bandwidth": m.bandwidth, "downtime-limit": 1 }))?;
    q.execute("migrate", serde_json::json!({ "uri": format!("exec:cat > {}", state.display()) }))?;
    // Near the end of the first pass, slow down: at 4 MiB/s and a 1 ms downtime limit the
    // migration never converges while the guest dirties a few pages now and then, so it goes
    // on copying what changes until the test pauses the guest.
    let mut slowed = false;
    loop {
        let st = q.execute("query-migrate", serde_json::json!({}))?;
        let ram = &st["ram"];
        match status_of(&st).as_str() {
            "active" if slowed && ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 => break,
            "active" if !slowed && ram["remaining"].as_u64().is_some_and(|r| r < 48 << 20) => {
                q.execute("migrate-set-parameters", serde_json::json!({ "max-bandwidth": 4 << 20 }))?;
                slowed = true;
            }
            "active" | "setup" => {}
            _ => bail!("{}", context(&format!("the migration is not running its passes: {st}"), &a)),
        }
        if Instant::now() >= deadline {
            bail!("{}", context(&format!("the first pass did not end: {st}"), &a));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (m.first_pass_done)();
    wait_line(&mut a, m.done)?;
    let st = q.execute("query-migrate", serde_json::json!({}))?;
    if status_of(&st) != "active" {
        bail!("{}", context(&format!("the migration ended while the guest ran: {st}"), &a));
    }
    if m.pause_first {
        q.execute("stop", serde_json::json!({}))?;
    }
    // Converge now (with the guest running, QEMU stops it for the last pass itself).
    q.execute("migrate-set-parameters", serde_json::json!({ "max-bandwidth": m.bandwidth, "downtime-limit": 300 }))?;
    let status = loop {
        let st = q.execute("query-migrate", serde_json::json!({}))?;
        match status_of(&st).as_str() {
            "completed" => break st,
            "failed" | "cancelled" => bail!("{}", context(&format!("migration failed: {st}"), &a)),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("{}", context(&format!("migration did not complete: {st}"), &a));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    q.execute("quit", serde_json::json!({})).ok();
    drop(q);
    let (_, console_a, stderr_a) = a.finish(deadline)?;

    // The destination: the same machine, started from the migration stream.
    let mut extra = qmp_arg(&qmp_b);
    extra.extend(["-incoming".to_string(), format!("exec:cat {}", state.display())]);
    let mut b = Running::spawn(&with(&extra), echo)?;
    let mut q = Qmp::connect(&qmp_b, Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:#}\n{}", context("no QMP", &b)))?;
    loop {
        if b.exited()?.is_some() {
            bail!("{}", context("the destination QEMU ended before the guest ran", &b));
        }
        let st = q.execute("query-status", serde_json::json!({}))?;
        if status_of(&st) == "running" {
            break;
        }
        // A source paused before the migration ended leaves the destination paused.
        if status_of(&st) == "paused" {
            q.execute("cont", serde_json::json!({}))?;
        }
        if Instant::now() >= deadline {
            bail!("{}", context(&format!("the destination did not load the state: {st}"), &b));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(q);
    (m.resumed)();
    let (status_b, console_b, stderr_b) = b.finish(deadline)?;
    let console = format!("{console_a}{console_b}");
    let mut out = GuestOutput::parse(&console, &run.scenario);
    out.elapsed = start.elapsed();
    out.qemu_stderr = format!("{stderr_a}{stderr_b}");
    if out.result.is_none() {
        bail!(
            "guest scenario {} printed no VBLK-RESULT after the migration (destination qemu {status_b})\n--- qemu stderr ---\n{}\n--- console tail ---\n{}",
            run.scenario,
            out.qemu_stderr.trim_end(),
            out.console_tail(40)
        );
    }
    Ok((out, status))
}

/// [`run_guest`], then [`GuestOutput::ensure_passed`].
pub fn run_guest_pass(run: &GuestRun) -> Result<GuestOutput> {
    let out = run_guest(run)?;
    out.ensure_passed()?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// the data pattern of write-pattern / verify-pattern

/// Bytes per pattern unit (one 512-byte sector).
pub const PATTERN_SECTOR: usize = 512;

/// True if `seed` is accepted by the pattern scenarios.
pub fn valid_seed(seed: &str) -> bool {
    !seed.is_empty() && seed.len() <= 64 && seed.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The pattern the guest writes with `write-pattern` (seed `seed`) for
/// sectors `first_sector..first_sector + sectors` of the disk: each 512-byte
/// sector N is `VBLK-PATTERN seed=<seed> sector=<N as %010d>` padded with
/// `.` to 511 bytes, then `\n`. Lets host-side code check what a guest wrote
/// or prepare data a guest will verify.
///
/// # Panics
/// If `seed` is not [`valid_seed`].
pub fn pattern(seed: &str, first_sector: u64, sectors: u64) -> Vec<u8> {
    assert!(valid_seed(seed), "invalid pattern seed {seed:?}");
    let mut v = Vec::with_capacity(sectors as usize * PATTERN_SECTOR);
    for s in first_sector..first_sector + sectors {
        let start = v.len();
        write!(v, "VBLK-PATTERN seed={seed} sector={s:010}").expect("write to Vec");
        v.resize(start + PATTERN_SECTOR - 1, b'.');
        v.push(b'\n');
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real console of `write-pattern` against qemu-storage-daemon.
    const PASS_CONSOLE: &str = "VBLK-BOOT 1.80\r\n\
VBLK-INFO disks 1\r\n\
VBLK-INFO ready 2.08\r\n\
VBLK-INFO timing gen=2.12-3.91 write=3.91-4.18 readback=4.18-6.12\r\n\
VBLK-SUM vda 5d4a2c0f4a0b343aeb054f9f7aee9d78d45a81f24d0e2c903ca96e458bb2fcf6\r\n\
VBLK-RESULT: PASS write-pattern\r\n\
[    6.418360] reboot: Power down\r\n";

    const FAIL_CONSOLE: &str = "VBLK-BOOT 1.73\n\
VBLK-INFO disks 1\n\
VBLK-RESULT: FAIL verify-pattern pattern seed=s2: mismatch at MiB 0 (byte 19, sector 0): found 'VBLK-PATTERN seed=s1 sector=0000000000....'\n\
[    6.117123] reboot: Power down\n";

    #[test]
    fn parses_pass() {
        let o = GuestOutput::parse(PASS_CONSOLE, "write-pattern");
        assert!(o.passed);
        assert_eq!(
            o.result,
            Some(GuestResult { passed: true, scenario: "write-pattern".into(), reason: String::new() })
        );
        assert_eq!(
            o.sums,
            vec![("vda".to_string(), "5d4a2c0f4a0b343aeb054f9f7aee9d78d45a81f24d0e2c903ca96e458bb2fcf6".to_string())]
        );
        assert_eq!(o.sum("vda"), Some("5d4a2c0f4a0b343aeb054f9f7aee9d78d45a81f24d0e2c903ca96e458bb2fcf6"));
        assert_eq!(o.sum("vdb"), None);
        assert_eq!(o.info("disks"), Some("1"));
        assert_eq!(o.info("timing"), Some("gen=2.12-3.91 write=3.91-4.18 readback=4.18-6.12"));
        assert_eq!(o.info.len(), 3);
        assert_eq!(o.boot_secs, Some(1.80));
        assert_eq!(o.fail_reason(), None);
        assert!(o.ensure_passed().is_ok());
    }

    #[test]
    fn pass_for_another_scenario_is_not_a_pass() {
        let o = GuestOutput::parse(PASS_CONSOLE, "verify-pattern");
        assert!(!o.passed);
        assert!(o.result.is_some());
        assert!(o.ensure_passed().is_err());
    }

    #[test]
    fn parses_fail_with_reason() {
        let o = GuestOutput::parse(FAIL_CONSOLE, "verify-pattern");
        assert!(!o.passed);
        let r = o.result.clone().unwrap();
        assert!(!r.passed);
        assert_eq!(r.scenario, "verify-pattern");
        assert_eq!(
            r.reason,
            "pattern seed=s2: mismatch at MiB 0 (byte 19, sector 0): found 'VBLK-PATTERN seed=s1 sector=0000000000....'"
        );
        assert_eq!(o.fail_reason(), Some(r.reason.as_str()));
        let err = o.ensure_passed().unwrap_err().to_string();
        assert!(err.contains("FAILED: pattern seed=s2: mismatch at MiB 0"), "{err}");
        assert!(err.contains("reboot: Power down"), "{err}");
    }

    #[test]
    fn no_result_line() {
        let o = GuestOutput::parse("[    0.1] Kernel panic - not syncing: VFS\nVBLK-BOOT x\n", "info");
        assert!(!o.passed);
        assert_eq!(o.result, None);
        assert_eq!(o.boot_secs, None);
        assert!(o.ensure_passed().unwrap_err().to_string().contains("no VBLK-RESULT"));
    }

    #[test]
    fn markers_after_kernel_noise_and_fail_wins() {
        let c = "[  3.1] virtio_blk virtio0: [vda] 524288 512-byte logical blocks VBLK-SUM vdb abc\n\
                 VBLK-INFO vda.write_cache write back\n\
                 VBLK-RESULT: FAIL read-two no /dev/vdb\n\
                 VBLK-RESULT: PASS read-two\n\
                 VBLK-RESULT: MAYBE read-two\n";
        let o = GuestOutput::parse(c, "read-two");
        assert_eq!(o.sum("vdb"), Some("abc"));
        assert_eq!(o.info("vda.write_cache"), Some("write back"));
        // a FAIL anywhere fails the run even if a PASS follows
        assert!(!o.passed);
        assert_eq!(o.result.as_ref().map(|r| r.passed), Some(true));
    }

    fn fake_art() -> GuestArtifacts {
        GuestArtifacts { kernel: "/k/vmlinuz".into(), initrd: "/k/initrd.gz".into(), dir: "/k".into() }
    }

    #[test]
    fn qemu_command_line() {
        let mut run = GuestRun::new(
            "read-two",
            vec![
                DiskSpec { socket: "/s/a.sock".into(), num_queues: 4, reconnect: true },
                DiskSpec::new("/s/b,c.sock"),
            ],
        )
        .with_arg("8");
        run.mem_mib = 256;
        let a = qemu_args(&run, &fake_art());
        assert_eq!(a[0], qemu_binary());
        let has = |pair: [&str; 2]| a.windows(2).any(|w| w[0] == pair[0] && w[1] == pair[1]);
        assert!(has(["-kernel", "/k/vmlinuz"]));
        assert!(has(["-initrd", "/k/initrd.gz"]));
        assert!(has(["-append", "console=ttyS0 quiet panic=-1 vblk.scenario=read-two vblk.arg=8"]));
        assert!(kernel_cmdline(&run.clone().with_mib(4)).ends_with(" vblk.arg=8 vblk.mib=4"));
        assert!(has(["-m", "256M"]));
        assert!(has(["-smp", "4"]));
        assert!(has(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"]));
        assert!(has(["-numa", "node,memdev=mem"]));
        assert!(has(["-chardev", "socket,id=vblk0,path=/s/a.sock,reconnect=1"]));
        assert!(has(["-device", "vhost-user-blk-pci,chardev=vblk0,num-queues=4"]));
        assert!(has(["-chardev", "socket,id=vblk1,path=/s/b,,c.sock"]));
        assert!(has(["-device", "vhost-user-blk-pci,chardev=vblk1,num-queues=1"]));
        assert!(a.iter().any(|x| x == "-no-reboot"));
        assert!(a.iter().any(|x| x == "-accel"));
        // vda's device comes before vdb's
        let pos = |s: &str| a.iter().position(|x| x.contains(s)).unwrap();
        assert!(pos("chardev=vblk0") < pos("chardev=vblk1"));
        let line = shell_words(&a);
        assert!(line.contains("-append 'console=ttyS0 quiet panic=-1 vblk.scenario=read-two vblk.arg=8'"), "{line}");
    }

    #[test]
    fn cpus_and_accel() {
        let mut run = GuestRun::new("info", vec![DiskSpec::new("/x")]);
        assert_eq!(guest_cpus(&run), 2);
        run.disks[0].num_queues = 3;
        assert_eq!(guest_cpus(&run), 3);
        run.disks[0].num_queues = 16;
        assert_eq!(guest_cpus(&run), 4);
        let acc = accel_args();
        assert_eq!(acc.len(), 4);
        assert_eq!(acc[0], "-accel");
        assert!(acc[1] == "kvm" || acc[1] == "tcg,thread=multi", "{acc:?}");
        if Path::new("/sys/module/kvm_pvm").exists() || !Path::new("/dev/kvm").exists() {
            assert_eq!(acc, ["-accel", "tcg,thread=multi", "-cpu", "max"]);
        }
    }

    #[test]
    fn validation() {
        let mut run = GuestRun::new("info", vec![DiskSpec { socket: "/x".into(), num_queues: 1, reconnect: true }]);
        assert!(validate(&run).is_ok());
        run.arg = Some("two words".into());
        assert!(validate(&run).is_err());
        run.arg = None;
        run.scenario = String::new();
        assert!(validate(&run).is_err());
        run.scenario = "info".into();
        run.disks[0].reconnect = false;
        run.disks[0].socket = "/nonexistent/vblk.sock".into();
        assert!(validate(&run).unwrap_err().to_string().contains("does not exist"));
        run.disks[0].reconnect = true;
        run.mib = Some(0);
        assert!(validate(&run).is_err());
        run.mib = Some(4);
        assert!(validate(&run).is_ok());
        run.disks.clear();
        assert!(validate(&run).is_err());
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *t = c;
        }
        !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
    }

    #[test]
    fn pattern_matches_the_guest_generator() {
        let p = pattern("s1", 0, 2);
        assert_eq!(p.len(), 1024);
        let head = b"VBLK-PATTERN seed=s1 sector=0000000000.";
        assert_eq!(&p[..head.len()], head);
        assert_eq!(p[511], b'\n');
        assert!(p[38..511].iter().all(|&b| b == b'.'));
        assert_eq!(&p[512..512 + 38], b"VBLK-PATTERN seed=s1 sector=0000000001");
        // CRC32s of the guest's (busybox awk) output for seed s1, computed on
        // the host: MiB 37 and the whole 64 MiB
        assert_eq!(crc32(&pattern("s1", 37 * 2048, 2048)), 0xcf15_9554);
        assert_eq!(crc32(&pattern("s1", 0, 64 * 2048)), 0x9771_b2b0);
        // ranges compose, and seeds change every sector
        assert_eq!(pattern("ab", 0, 16)[8 * 512..], pattern("ab", 8, 8)[..]);
        let (a, b) = (pattern("a", 0, 64), pattern("b", 0, 64));
        assert!(a.chunks(512).zip(b.chunks(512)).all(|(x, y)| x != y));
    }

    #[test]
    fn seeds() {
        assert!(valid_seed("s1"));
        assert!(valid_seed("a.b_c-D9"));
        assert!(!valid_seed(""));
        assert!(!valid_seed("a b"));
        assert!(!valid_seed("a/b"));
        assert!(!valid_seed(&"x".repeat(65)));
    }

    #[test]
    fn guest_dir_default_is_under_target() {
        if std::env::var_os("VBLK_GUEST_DIR").is_none() && std::env::var_os("CARGO_TARGET_DIR").is_none() {
            assert_eq!(guest_dir(), workspace_root().join("target").join("guest"));
        }
        assert!(guest_src_dir().join("build.sh").is_file());
        assert!(guest_src_dir().join("init").is_file());
    }
}
