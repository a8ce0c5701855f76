//! A pool created once per fuzzing process (creating a pool and opening RocksDB per input would
//! cost far more than running the input), optionally with injected data-device write failures.
//!
//! **Fault injection** (`EnvOptions::bad_blocks`): when the process may create a private mount
//! namespace (root, or CAP_SYS_ADMIN; `VBLK_FUZZ_FAULTS=0` turns it off), the pool's data file
//! lives on a tmpfs of its own that is exactly full: every data block except the "bad" ones
//! (`pba % BAD_EVERY == BAD_AT`) is pre-allocated, so a write into a bad block fails in the
//! kernel with ENOSPC — through io_uring, into the engine's error paths, as a failing disk
//! would. The pool file is sparse (`Preallocate::Off`); the metadata (RocksDB) is on another
//! tmpfs that never fills. Both mounts exist only in the fuzzing process's namespace and vanish
//! with it, even when it aborts on a crash. Without the namespace the pool lives in a plain
//! directory (`$VBLK_FUZZ_TMPDIR`, else /dev/shm, else the temp dir) and nothing is injected.
//!
//! The pool is closed cleanly at process exit (an `atexit` hook), before RocksDB's own static
//! destructors run.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vblk_engine::format::{BLOCK_SIZE, DATA_START};
use vblk_engine::{create_pool, CreateOptions, Pool, PoolOptions, Preallocate};

/// Data blocks with `pba % BAD_EVERY == BAD_AT` fail writes when faults are injected.
pub const BAD_EVERY: u64 = 16;
pub const BAD_AT: u64 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvOptions {
    /// Data blocks of the pool (a small pool makes NoSpace reachable).
    pub data_blocks: u64,
    /// Try to inject write failures into some data blocks (see the module docs).
    pub bad_blocks: bool,
}

pub struct PoolEnv {
    pub pool: Option<Pool>,
    pub path: PathBuf,
    pub meta: PathBuf,
    /// Whether writes to bad blocks really fail.
    pub faults: bool,
    /// Inputs run on this pool.
    runs: u64,
    /// Mount points to detach on drop (innermost first).
    mounts: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl PoolEnv {
    pub fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool is open")
    }

    /// Close and reopen the pool (everything completed is committed on close).
    pub fn reopen(&mut self) {
        drop(self.pool.take());
        self.pool = Some(open(&self.path, &self.meta));
    }

    pub fn is_bad(&self, pba: u64) -> bool {
        self.faults && pba % BAD_EVERY == BAD_AT
    }
}

impl Drop for PoolEnv {
    fn drop(&mut self) {
        drop(self.pool.take());
        for m in &self.mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path; no memory effects.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn open(path: &Path, meta: &Path) -> Pool {
    // A small memtable: each reopen preallocates a write-ahead log of 1.1x its size, which on
    // tmpfs zero-fills RAM (8 MiB memtables: 45% of engine_model's time).
    let opts = PoolOptions {
        meta_dir: Some(meta.to_path_buf()),
        cache_bytes: 8 << 20,
        memtable_bytes: 256 << 10,
        // Encrypted volumes of `engine_model` (odd volume sizes).
        master_key: Some(vblk_engine::crypt::Key([0x6b; 32])),
        ..PoolOptions::default()
    };
    Pool::open(path, &opts).unwrap_or_else(|e| panic!("opening the fuzz pool {}: {e}", path.display()))
}

fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VBLK_FUZZ_TMPDIR") {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.into();
    }
    std::env::temp_dir()
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn mount_tmpfs(at: &Path, opts: &str) -> std::io::Result<()> {
    let (src, fs, data) = (c"tmpfs", c"tmpfs", CString::new(opts).expect("no NUL"));
    let target = cstr(at);
    // SAFETY: mount(2) with valid NUL-terminated strings; no memory effects on our side.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, data.as_ptr().cast()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enter a private mount namespace (this thread and the threads it creates from now on).
fn private_mount_namespace() -> std::io::Result<()> {
    // Only the main thread: unshare affects the calling thread alone, and the pool's threads
    // (committer, RocksDB) must see the mounts; libFuzzer runs inputs on the main thread.
    // SAFETY: getpid/gettid have no memory effects.
    if unsafe { libc::getpid() != libc::gettid() } {
        return Err(std::io::Error::other("not on the main thread"));
    }
    // SAFETY: unshare(CLONE_NEWNS) has no memory effects.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Do not propagate our mounts back to the parent namespace.
    // SAFETY: mount(2) with valid NUL-terminated strings and null fs type/data.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pre-allocate every good data block, then shrink the data tmpfs to what is allocated.
fn inject_bad_blocks(pool_file: &Path, mount: &Path, data_blocks: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(pool_file)?;
    let zero = vec![0u8; BLOCK_SIZE as usize];
    for pba in (0..data_blocks).filter(|p| p % BAD_EVERY != BAD_AT) {
        f.write_all_at(&zero, DATA_START + pba * BLOCK_SIZE)?;
    }
    f.sync_all()?;
    let mut st: libc::statvfs = unsafe_zeroed_statvfs();
    let m = cstr(mount);
    // SAFETY: statvfs fills the struct we pass, valid for the call.
    if unsafe { libc::statvfs(m.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
    let data = CString::new(format!("size={used}")).expect("no NUL");
    // SAFETY: mount(2) remount with valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(c"tmpfs".as_ptr(), m.as_ptr(), c"tmpfs".as_ptr(), libc::MS_REMOUNT, data.as_ptr().cast())
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Check: a bad block refuses a write, a good one takes it.
    let bad = DATA_START + BAD_AT * BLOCK_SIZE;
    match f.write_all_at(&zero, bad) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        other => return Err(std::io::Error::other(format!("bad block accepted a write: {other:?}"))),
    }
    f.write_all_at(&zero, DATA_START)?;
    Ok(())
}

fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

fn create(opts: &EnvOptions) -> PoolEnv {
    let dir = tempfile::Builder::new().prefix("vblk-fuzz-").tempdir_in(base_dir()).expect("temp dir");
    let mut mounts = Vec::new();
    let mut faults = false;
    let want_faults = opts.bad_blocks && std::env::var("VBLK_FUZZ_FAULTS").map(|v| v != "0").unwrap_or(true);
    let data_dir = dir.path().join("data");
    if want_faults {
        match private_mount_namespace().and_then(|()| mount_tmpfs(dir.path(), "size=512m,mode=0700")) {
            Ok(()) => {
                mounts.push(dir.path().to_path_buf());
                std::fs::create_dir(&data_dir).expect("data dir");
                match mount_tmpfs(&data_dir, "size=64m,mode=0700") {
                    Ok(()) => {
                        mounts.insert(0, data_dir.clone());
                        faults = true;
                    }
                    Err(e) => eprintln!("vblk-fuzz: no fault injection (mount data tmpfs: {e})"),
                }
            }
            Err(e) => eprintln!("vblk-fuzz: no fault injection (private mount namespace: {e})"),
        }
    }
    if !data_dir.exists() {
        std::fs::create_dir(&data_dir).expect("data dir");
    }
    let path = data_dir.join("pool.img");
    let meta = dir.path().join("meta");
    let size = DATA_START + opts.data_blocks * BLOCK_SIZE;
    create_pool(
        &path,
        &CreateOptions {
            size_bytes: Some(size),
            meta_dir: Some(meta.clone()),
            force: false,
            preallocate: Preallocate::Off,
        },
    )
    .unwrap_or_else(|e| panic!("creating the fuzz pool: {e}"));
    if faults {
        if let Err(e) = inject_bad_blocks(&path, &data_dir, opts.data_blocks) {
            panic!("injecting bad blocks: {e}");
        }
        eprintln!(
            "vblk-fuzz: pool {} with {} data blocks; writes to blocks {} mod {} fail with ENOSPC",
            path.display(),
            opts.data_blocks,
            BAD_AT,
            BAD_EVERY
        );
    }
    let pool = open(&path, &meta);
    PoolEnv { pool: Some(pool), path, meta, faults, runs: 0, mounts, _dir: dir }
}

/// Pools of this process, one per set of options (each fuzz binary uses one; the replay tests
/// run several targets in one process).
static ENVS: Mutex<Vec<(EnvOptions, PoolEnv)>> = Mutex::new(Vec::new());

extern "C" fn close_at_exit() {
    // try_lock: exit() from inside an input (a panic hook, say) must not deadlock.
    if let Ok(mut g) = ENVS.try_lock() {
        g.clear();
    }
}

/// Run `f` with this process's pool for `opts`, creating it on first use.
pub fn with_pool<R>(opts: &EnvOptions, f: impl FnOnce(&mut PoolEnv) -> R) -> R {
    let mut g = ENVS.lock().unwrap_or_else(|e| e.into_inner());
    let i = match g.iter().position(|(o, _)| o == opts) {
        Some(i) => i,
        None => {
            let env = create(opts);
            if g.is_empty() {
                // Registered after RocksDB has been used, so that the function-local statics it
                // initialised on first use (registered with __cxa_atexit then) are destroyed
                // after this hook has closed the pool, not before: closing a DB after its
                // logger's statics are gone crashes.
                // SAFETY: registers a plain extern "C" fn; atexit has no other memory effects.
                unsafe { libc::atexit(close_at_exit) };
            }
            g.push((*opts, env));
            g.len() - 1
        }
    };
    let env = &mut g[i].1;
    // Every input deletes what it created; the tombstones pile up in the memtable of this
    // long-lived pool, and `check` (run by every input) steps over all of them: measured 88%
    // of api_validation's time and falling exec/s. Compact them away now and then.
    env.runs += 1;
    if env.runs.is_multiple_of(COMPACT_EVERY) {
        if let Some(p) = &env.pool {
            let _ = p.compact_metadata();
        }
    }
    f(env)
}

/// Inputs between two compactions of a shared pool's metadata.
const COMPACT_EVERY: u64 = 256;
