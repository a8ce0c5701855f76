//! Import and export, run by the daemon on a blocking thread through `Volume::sync_io()`.
//!
//! Import copies a raw image sparsely: it asks the file system where the data is
//! (SEEK_DATA/SEEK_HOLE), reads only that, and writes only the 4 KiB blocks that are not all
//! zeros. Into an existing volume the skipped ranges are discarded instead, so the volume reads
//! back exactly as the image. Other formats go through `qemu-img convert -O raw` first.
//! Export writes a new raw file, seeking over all-zero blocks so they stay holes.
//!
//! Guest QoS limits do not apply here; `rate_bytes_per_sec` paces the pool I/O of a copy
//! instead (bytes written by an import, read by an export), sleeping on this blocking thread.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};
use vblk_engine::{SyncIo, BLOCK_SIZE};
use vblk_vhost::qos::Pacer;

use crate::proto::{ImportRequest, ExportRequest, TransferProgress};
use crate::server::{engine_status, DaemonState};

const CHUNK: usize = SyncIo::MAX_IO;
/// Largest single discard (keeps each engine request bounded).
const DISCARD_MAX: u64 = 1 << 30;
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Progress reporting to the client, and cancellation: the copy stops when the client goes away
/// or the daemon shuts down.
pub struct Progress {
    tx: mpsc::Sender<Result<TransferProgress, Status>>,
    st: Arc<DaemonState>,
    last_sent: Instant,
    cur: TransferProgress,
    /// Paces the copy's pool I/O (`rate_bytes_per_sec`), if asked to.
    pacer: Option<Pacer>,
}

impl Progress {
    pub fn new(tx: mpsc::Sender<Result<TransferProgress, Status>>, st: Arc<DaemonState>) -> Progress {
        Progress { tx, st, last_sent: Instant::now(), cur: TransferProgress::default(), pacer: None }
    }

    fn check(&self) -> Result<(), Status> {
        if self.tx.is_closed() {
            return Err(Status::cancelled("the client went away"));
        }
        if self.st.is_shutting_down() {
            return Err(Status::unavailable("the daemon is shutting down"));
        }
        Ok(())
    }

    fn send(&mut self) {
        // Intermediate messages may be dropped when the client is slow; the last one is not.
        let _ = self.tx.try_send(Ok(self.cur.clone()));
        self.last_sent = Instant::now();
    }

    fn phase(&mut self, phase: &str, note: impl Into<String>) -> Result<(), Status> {
        self.check()?;
        self.cur.phase = phase.into();
        self.cur.note = note.into();
        self.send();
        Ok(())
    }

    fn update(&mut self, done_bytes: u64, written_bytes: u64) -> Result<(), Status> {
        self.cur.done_bytes = done_bytes;
        self.cur.written_bytes = written_bytes;
        if self.last_sent.elapsed() >= PROGRESS_EVERY {
            self.check()?;
            self.send();
        }
        Ok(())
    }

    /// Poll for cancellation without sending anything.
    fn poll(&self) -> Result<(), Status> {
        self.check()
    }

    /// Account `bytes` of pool I/O with the pacer and sleep as long as it says (in slices, so
    /// that cancellation is still noticed).
    fn pace(&mut self, bytes: u64) -> Result<(), Status> {
        let Some(p) = self.pacer.as_mut() else { return Ok(()) };
        let mut left = p.take(bytes);
        while !left.is_zero() {
            let d = left.min(Duration::from_millis(100));
            std::thread::sleep(d);
            left -= d;
            self.check()?;
        }
        Ok(())
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Status {
    move |e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => tonic::Code::NotFound,
            std::io::ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            std::io::ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            _ => tonic::Code::Internal,
        };
        Status::new(code, format!("{what}: {e}"))
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size pieces vectorises; the early exit is per piece.
    b.chunks(256).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Image formats recognised by their magic, with qemu-img's name for them.
pub fn detect_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"QFI\xfb") {
        let version = head.get(4..8).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])).unwrap_or(0);
        return Some(if version == 1 { "qcow" } else { "qcow2" });
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return Some("vmdk");
    }
    if head.starts_with(b"vhdxfile") {
        return Some("vhdx");
    }
    if head.starts_with(b"conectix") {
        return Some("vpc");
    }
    if head.starts_with(b"QED\0") {
        return Some("qed");
    }
    if head.get(0x40..0x44) == Some(&0xbeda107fu32.to_le_bytes()) {
        return Some("vdi");
    }
    None
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("removing temporary file {}: {e}", self.0.display());
            }
        }
    }
}

/// How long `qemu-img info` may take before an import gives up.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);

/// Wait for a qemu-img `child` to exit, polling `p` for cancellation and, with `limit`, for a
/// deadline; either kills it. `what` names the run in errors.
fn wait_qemu_img(child: &mut std::process::Child, p: &mut Progress, limit: Option<Duration>, what: &str) -> Result<std::process::ExitStatus, Status> {
    let deadline = limit.map(|l| (Instant::now() + l, l));
    loop {
        let stop = p.poll().err().or_else(|| {
            deadline
                .filter(|(at, _)| Instant::now() > *at)
                .map(|(_, l)| Status::deadline_exceeded(format!("{what} took over {} s", l.as_secs())))
        });
        if let Some(e) = stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        match child.try_wait() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(Status::internal(format!("waiting for {what}: {e}"))),
        }
    }
}

/// Read all of `r` (a child's pipe) on a thread of its own.
fn read_on_thread<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// The error for qemu-img that could not be started.
fn qemu_img_error(e: std::io::Error, src: &Path, format: &str) -> Status {
    if e.kind() == std::io::ErrorKind::NotFound {
        Status::failed_precondition(format!(
            "{} is a {format} image; importing it needs qemu-img, which is not on the daemon's PATH \
             (install qemu-utils, or convert it to raw first)",
            src.display()
        ))
    } else {
        Status::internal(format!("running qemu-img: {e}"))
    }
}

/// Refuse an image that refers to other files: a backing file (qcow2, qed, vmdk), an external
/// data file (qcow2 `data-file`), or extents in other files (a vmdk descriptor). qemu-img would
/// read them with the daemon's privileges, so an image handed in by a tenant could copy any
/// file of the host into a volume. Checked with `qemu-img info`, which opens no backing file.
fn refuse_external_files(src: &Path, format: &str, p: &mut Progress) -> Result<(), Status> {
    let mut child = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(src)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| qemu_img_error(e, src, format))?;
    // Read on threads (a big vmdk's extent list may not fit a pipe); wait with a deadline and
    // for cancellation: an extent that is a FIFO or a hung mount would hold `info` for ever.
    let out_t = read_on_thread(child.stdout.take());
    let err_t = read_on_thread(child.stderr.take());
    let status = wait_qemu_img(&mut child, p, Some(INFO_TIMEOUT), &format!("qemu-img info of {}", src.display()))?;
    let out = std::process::Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() };
    if !out.status.success() {
        return Err(Status::invalid_argument(format!(
            "qemu-img info -f {format} of {} failed ({}): {}",
            src.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Status::internal(format!("qemu-img info printed no JSON ({e})")))?;
    let refs = external_files(&info, src);
    if refs.is_empty() {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{} is a {format} image that refers to other files ({}); vblk imports self-contained images only \
         (the daemon would read those files with its own privileges): make a standalone copy first, \
         e.g. `qemu-img convert -O {format} IMAGE standalone.img`, and import that",
        src.display(),
        refs.join(", ")
    )))
}

/// Other files `qemu-img info` JSON says an image uses: its backing file, a qcow2 data file,
/// and any `filename` (vmdk extents) other than the image itself.
fn external_files(info: &serde_json::Value, src: &Path) -> Vec<String> {
    fn walk(v: &serde_json::Value, src: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x.as_str()) {
                        ("backing-filename" | "full-backing-filename" | "data-file", Some(s)) => {
                            out.push(format!("{k} {s}"));
                        }
                        ("filename", Some(s)) if s != src => out.push(format!("file {s}")),
                        _ => walk(x, src, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, src, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(info, &src.display().to_string(), &mut out);
    out.sort();
    out.dedup();
    out
}

/// `qemu-img convert -O raw json:{"driver":FORMAT,"backing":null,...SRC} TMP` (the output is
/// sparse). Polls for cancellation.
fn convert(src: &Path, format: &str, tmp_dir: &Path, p: &mut Progress) -> Result<TempFile, Status> {
    refuse_external_files(src, format, p)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = TempFile(tmp_dir.join(format!(".vblk-import-{}-{nanos}.raw", std::process::id())));
    p.phase("converting", format!("converting {format} to raw with qemu-img (temporary file in {})", tmp_dir.display()))?;
    // The source as QEMU's `json:` options with `"backing": null`: even an image rewritten to
    // name a backing file after `refuse_external_files` looked at it converts without it.
    let spec = serde_json::json!({ "driver": format, "backing": null, "file": { "driver": "file", "filename": src } });
    let mut child = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(format!("json:{spec}"))
        .arg(&tmp.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| qemu_img_error(e, src, format))?;
    let status = wait_qemu_img(&mut child, p, None, &format!("qemu-img convert of {}", src.display()))?;
    if !status.success() {
        let mut msg = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut msg);
        }
        return Err(Status::invalid_argument(format!(
            "qemu-img convert of {} ({format}) failed ({status}): {}",
            src.display(),
            msg.trim()
        )));
    }
    Ok(tmp)
}

/// The next data extent at or after `pos`: `(start, end)`, or `(size, size)` when only holes are
/// left. Without SEEK_DATA support everything is data.
fn next_data(f: &File, pos: u64, size: u64) -> (u64, u64) {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; it only moves the file offset (we use pread).
    let ds = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if ds < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => (size, size),
            _ => (pos, size),
        };
    }
    let ds = (ds as u64).min(size);
    // SAFETY: as above.
    let de = unsafe { libc::lseek(fd, ds as libc::off_t, libc::SEEK_HOLE) };
    let de = if de < 0 { size } else { (de as u64).min(size) };
    (ds, de.max(ds))
}

/// Fill `buf` from `f` at `off`; bytes past the end of the file read as zeros.
fn read_full(f: &File, off: u64, buf: &mut [u8], path: &Path) -> Result<(), Status> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(format!("reading {} at {}", path.display(), off + done as u64))(e)),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Writes non-zero blocks; zero ranges are skipped (new volume) or discarded (existing one).
struct Writer {
    io: SyncIo,
    discard_zeros: bool,
    pending_discard: Option<(u64, u64)>,
    written: u64,
}

impl Writer {
    fn zero(&mut self, off: u64, len: u64) -> Result<(), Status> {
        if !self.discard_zeros || len == 0 {
            return Ok(());
        }
        match &mut self.pending_discard {
            Some((s, l)) if *s + *l == off && *l + len <= DISCARD_MAX => *l += len,
            _ => {
                self.flush_discard()?;
                self.pending_discard = Some((off, len));
            }
        }
        Ok(())
    }

    fn flush_discard(&mut self) -> Result<(), Status> {
        if let Some((mut s, mut l)) = self.pending_discard.take() {
            while l > 0 {
                let n = l.min(DISCARD_MAX);
                self.io.discard(s, n).map_err(engine_status)?;
                s += n;
                l -= n;
            }
        }
        Ok(())
    }

    /// Write the non-zero 4 KiB blocks of `buf` (block-aligned, at most 1 MiB) at `off`.
    fn write_sparse(&mut self, off: u64, buf: &[u8]) -> Result<(), Status> {
        let bs = BLOCK_SIZE as usize;
        let mut i = 0;
        while i < buf.len() {
            let zero = is_zero(&buf[i..i + bs]);
            let mut j = i + bs;
            while j < buf.len() && is_zero(&buf[j..j + bs]) == zero {
                j += bs;
            }
            if zero {
                self.zero(off + i as u64, (j - i) as u64)?;
            } else {
                self.flush_discard()?;
                self.io.write_at(off + i as u64, &buf[i..j]).map_err(engine_status)?;
                self.written += (j - i) as u64;
            }
            i = j;
        }
        Ok(())
    }
}

pub fn import(st: &DaemonState, req: &ImportRequest, p: &mut Progress) -> Result<TransferProgress, Status> {
    let src = PathBuf::from(&req.path);
    if !src.is_absolute() {
        return Err(Status::invalid_argument(format!("{}: the image path must be absolute", req.path)));
    }
    let mut f = File::open(&src).map_err(io_err(format!("opening {}", src.display())))?;
    let meta = f.metadata().map_err(io_err(format!("stat {}", src.display())))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(Status::invalid_argument(format!("{} is not a regular file or block device", src.display())));
    }
    let format = match req.format.as_str() {
        "" | "auto" => {
            let mut head = vec![0u8; 512];
            let n = read_prefix(&mut f, &mut head).map_err(io_err(format!("reading {}", src.display())))?;
            detect_format(&head[..n]).map(str::to_string)
        }
        "raw" => None,
        other => Some(other.to_string()),
    };
    let mut note = String::new();
    let _tmp;
    let (f, path) = match &format {
        None => (f, src.clone()),
        Some(fmt) => {
            drop(f);
            let tmp_dir = if req.tmp_dir.is_empty() { PathBuf::from("/var/tmp") } else { PathBuf::from(&req.tmp_dir) };
            let t = convert(&src, fmt, &tmp_dir, p)?;
            note = format!("converted from {fmt} with qemu-img");
            let f = File::open(&t.0).map_err(io_err(format!("opening {}", t.0.display())))?;
            let path = t.0.clone();
            _tmp = t;
            (f, path)
        }
    };
    let size = file_size(&f).map_err(io_err(format!("size of {}", path.display())))?;
    if size == 0 {
        return Err(Status::invalid_argument(format!("{} is empty", src.display())));
    }
    let image_bytes = round_up(size);

    let pool = st.pool();
    let created = match pool.volume_info(&req.volume) {
        Ok(v) => {
            if req.encrypted && !v.encrypted {
                return Err(Status::failed_precondition(format!(
                    "volume {:?} exists and is not encrypted; import into a new volume to encrypt it",
                    req.volume
                )));
            }
            if v.size_bytes < image_bytes {
                return Err(Status::invalid_argument(format!(
                    "volume {:?} is {} bytes, smaller than the image ({image_bytes} bytes); resize it first or import into a new volume",
                    req.volume, v.size_bytes
                )));
            }
            false
        }
        Err(e) if e.is_not_found() => {
            let want = if req.create_size_bytes == 0 { image_bytes } else { req.create_size_bytes };
            if want < image_bytes {
                return Err(Status::invalid_argument(format!(
                    "--create-size {want} is smaller than the image ({image_bytes} bytes)"
                )));
            }
            if req.encrypted {
                pool.create_encrypted_volume(&req.volume, want).map_err(engine_status)?;
            } else {
                pool.create_volume(&req.volume, want).map_err(engine_status)?;
            }
            info!(volume = %req.volume, size = want, encrypted = req.encrypted, "volume created for import");
            true
        }
        Err(e) => return Err(engine_status(e)),
    };
    let r = copy_in(st, req, &f, &path, size, created, p);
    if r.is_err() && created {
        // Leave no half-imported volume behind.
        if let Err(e) = pool.delete_volume(&req.volume, false) {
            warn!(volume = %req.volume, "removing the volume of a failed import: {e}");
        }
    }
    let written = r?;
    let v = pool.volume_info(&req.volume).map_err(engine_status)?;
    info!(volume = %req.volume, source = %src.display(), image_bytes = size, written, "import done");
    Ok(TransferProgress {
        phase: "done".into(),
        done_bytes: size,
        total_bytes: size,
        written_bytes: written,
        done: true,
        volume: Some(st.volume_msg(v)),
        note,
        created,
    })
}

fn read_prefix(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn file_size(f: &File) -> std::io::Result<u64> {
    let m = f.metadata()?;
    if m.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        let mut f = f;
        return f.seek(SeekFrom::End(0));
    }
    Ok(m.len())
}

fn copy_in(st: &DaemonState, req: &ImportRequest, f: &File, path: &Path, size: u64, created: bool, p: &mut Progress) -> Result<u64, Status> {
    let pool = st.pool();
    let vol = pool.open_volume(&req.volume, false).map_err(engine_status)?;
    let info = pool.volume_info(&req.volume).map_err(engine_status)?;
    if info.attached_ro > 0 {
        return Err(Status::failed_precondition(format!(
            "volume {:?} is attached read-only; detach it before importing into it",
            req.volume
        )));
    }
    let io = vol.sync_io().map_err(engine_status)?;
    let mut w = Writer { io, discard_zeros: !created, pending_discard: None, written: 0 };
    p.pacer = Pacer::new(req.rate_bytes_per_sec);
    p.cur.total_bytes = size;
    p.phase("copying", "")?;
    let end = round_up(size);
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < end {
        let (ds, de) = next_data(f, pos, size);
        let ds = (ds / BLOCK_SIZE * BLOCK_SIZE).max(pos);
        let mut de = round_up(de).min(end);
        if de <= ds {
            // Nothing sensible from SEEK_HOLE: treat one chunk as data rather than loop.
            de = (ds + CHUNK as u64).min(end);
        }
        w.zero(pos, ds - pos)?;
        let mut off = ds;
        while off < de {
            let n = ((de - off) as usize).min(CHUNK);
            read_full(f, off, &mut buf[..n], path)?;
            let before = w.written;
            w.write_sparse(off, &buf[..n])?;
            p.pace(w.written - before)?;
            off += n as u64;
            p.update(off.min(size), w.written)?;
        }
        pos = de;
        p.update(pos.min(size), w.written)?;
    }
    w.flush_discard()?;
    p.phase("flushing", "")?;
    w.io.flush().map_err(engine_status)?;
    Ok(w.written)
}

pub fn export(st: &DaemonState, req: &ExportRequest, p: &mut Progress) -> Result<TransferProgress, Status> {
    let dst = PathBuf::from(&req.path);
    if !dst.is_absolute() {
        return Err(Status::invalid_argument(format!("{}: the file path must be absolute", req.path)));
    }
    let pool = st.pool();
    let refuse_rw = |v: &vblk_engine::VolumeInfo| {
        if v.attached_rw {
            Err(Status::failed_precondition(format!(
                "volume {:?} is attached read-write (its contents would change during the copy); detach it first",
                req.volume
            )))
        } else {
            Ok(())
        }
    };
    // VOL@SNAP exports a snapshot (immutable: no attachment matters).
    let snap = if req.volume.contains('@') { Some(vblk_engine::parse_snap_spec(&req.volume).map_err(engine_status)?) } else { None };
    let vol_name = snap.map(|s| s.0).unwrap_or(&req.volume);
    if snap.is_none() {
        refuse_rw(&pool.volume_info(&req.volume).map_err(engine_status)?)?;
    }
    match std::fs::symlink_metadata(&dst) {
        Ok(_) if !req.force => {
            return Err(Status::already_exists(format!("{} already exists (use --force to overwrite it)", dst.display())));
        }
        Ok(m) if !m.is_file() => {
            return Err(Status::invalid_argument(format!("{} is not a regular file; export writes raw files only", dst.display())));
        }
        _ => {}
    }
    let vol = match snap {
        Some((v, s)) => pool.open_snapshot(v, s).map_err(engine_status)?,
        None => {
            let vol = pool.open_volume(&req.volume, true).map_err(engine_status)?;
            refuse_rw(&pool.volume_info(&req.volume).map_err(engine_status)?)?;
            vol
        }
    };
    let mut oo = OpenOptions::new();
    oo.write(true).mode(0o600);
    if req.force {
        oo.create(true).truncate(true);
    } else {
        oo.create_new(true);
    }
    let f = oo.open(&dst).map_err(io_err(format!("creating {}", dst.display())))?;
    p.pacer = Pacer::new(req.rate_bytes_per_sec);
    let r = copy_out(&vol, &f, &dst, p);
    if r.is_err() {
        drop(f);
        let _ = std::fs::remove_file(&dst);
    }
    let (size, written) = r?;
    drop(vol);
    let v = pool.volume_info(vol_name).map_err(engine_status)?;
    info!(volume = %req.volume, file = %dst.display(), size, written, "export done");
    Ok(TransferProgress {
        phase: "done".into(),
        done_bytes: size,
        total_bytes: size,
        written_bytes: written,
        done: true,
        volume: Some(st.volume_msg(v)),
        note: String::new(),
        created: false,
    })
}

fn copy_out(vol: &vblk_engine::Volume, f: &File, dst: &Path, p: &mut Progress) -> Result<(u64, u64), Status> {
    let mut io = vol.sync_io().map_err(engine_status)?;
    let size = io.size_bytes();
    p.cur.total_bytes = size;
    p.phase("copying", "")?;
    let bs = BLOCK_SIZE as usize;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut off = 0u64;
    // Only allocated ranges are read: holes of a thin volume stay holes without being read
    // (a mostly empty 1 TiB volume exports in a moment). The map is asked 1 GiB at a time.
    const WINDOW: u64 = 1 << 30;
    let mut ranges: std::collections::VecDeque<(u64, u64)> = Default::default();
    let mut scanned = 0u64;
    while off < size {
        if ranges.is_empty() {
            while ranges.is_empty() && scanned < size {
                let len = WINDOW.min(size - scanned);
                ranges.extend(vol.allocated_ranges(scanned, len).map_err(engine_status)?);
                scanned += len;
                if ranges.is_empty() {
                    // Nothing allocated in this window: it is all hole.
                    p.update(scanned, written)?;
                }
            }
            match ranges.front() {
                None => break,
                Some(&(s, _)) => off = off.max(s),
            }
        }
        let Some(&(rs, rl)) = ranges.front() else { break };
        if off >= rs + rl {
            ranges.pop_front();
            continue;
        }
        let n = ((rs + rl - off) as usize).min(CHUNK);
        io.read_at(off, &mut buf[..n]).map_err(engine_status)?;
        p.pace(n as u64)?;
        let mut i = 0;
        while i < n {
            let zero = is_zero(&buf[i..i + bs]);
            let mut j = i + bs;
            while j < n && is_zero(&buf[j..j + bs]) == zero {
                j += bs;
            }
            if !zero {
                f.write_all_at(&buf[i..j], off + i as u64)
                    .map_err(io_err(format!("writing {} at {}", dst.display(), off + i as u64)))?;
                written += (j - i) as u64;
            }
            i = j;
        }
        off += n as u64;
        p.update(off, written)?;
    }
    p.update(size, written)?;
    p.phase("flushing", "")?;
    f.set_len(size).map_err(io_err(format!("setting the length of {}", dst.display())))?;
    f.sync_all().map_err(io_err(format!("fsync {}", dst.display())))?;
    Ok((size, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_image_formats() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        q.resize(512, 0);
        assert_eq!(detect_format(&q), Some("qcow2"));
        q[7] = 1;
        assert_eq!(detect_format(&q), Some("qcow"));
        assert_eq!(detect_format(b"KDMV...."), Some("vmdk"));
        assert_eq!(detect_format(b"vhdxfile...."), Some("vhdx"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(detect_format(&vdi), Some("vdi"));
        assert_eq!(detect_format(&[0u8; 512]), None);
        assert_eq!(detect_format(b""), None);
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4096 + 3];
        assert!(is_zero(&b[1..]));
        b[4000] = 1;
        assert!(!is_zero(&b[1..]));
        assert!(!is_zero(&b));
    }

    #[test]
    fn data_extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let mb = 1u64 << 20;
        f.set_len(8 * mb).unwrap();
        f.write_all_at(&[1u8; 4096], 3 * mb).unwrap();
        let (ds, de) = next_data(&f, 0, 8 * mb);
        // File systems without SEEK_DATA report everything as data; the rest must find the extent.
        if (ds, de) != (0, 8 * mb) {
            assert!(ds <= 3 * mb && de >= 3 * mb + 4096 && de < 8 * mb, "{ds} {de}");
            assert_eq!(next_data(&f, de, 8 * mb), (8 * mb, 8 * mb));
        }
    }
}
