//! Shared by the blkio tests: a pool in a tempdir, a device, and a libblkio client.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vblk_engine::{create_pool, CreateOptions, Pool, PoolOptions};
use vblk_vhost::{start, Device, DeviceConfig};

pub const VOL_SIZE: u64 = 64 << 20;

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub pool: Pool,
    pub socket: PathBuf,
}

/// Log warnings (and RUST_LOG) to the test's captured output, so a failure shows its cause.
pub fn init_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub fn setup() -> Setup {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    create_pool(&path, &CreateOptions { size_bytes: Some(256 << 20), ..Default::default() }).unwrap();
    let pool = Pool::open(&path, &PoolOptions::default()).unwrap();
    pool.create_volume("v", VOL_SIZE).unwrap();
    let socket = dir.path().join("v.sock");
    Setup { _dir: dir, pool, socket }
}

pub fn device(s: &Setup, num_queues: u16) -> Device {
    let vol = s.pool.open_volume("v", false).unwrap();
    start(vol, DeviceConfig { socket: s.socket.clone(), num_queues, queue_size: 256, threads: 0, pin_memory: false }).unwrap()
}

/// A libblkio client with one shared buffer.
pub struct Client {
    // Drop order: queues, then the region, then the Blkio instance.
    pub qs: Vec<blkio::Blkioq>,
    pub buf: blkio::MemoryRegion,
    pub blkio: blkio::Blkio,
}

pub const BUF_LEN: usize = 1 << 20;

pub fn be(e: blkio::Error) -> String {
    format!("blkio: {} (errno {:?})", e.message(), e.errno())
}

impl Client {
    pub fn connect(path: &Path, queues: i32) -> Result<Client, String> {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(be)?;
        b.set_str("path", path.to_str().unwrap()).map_err(be)?;
        b.connect().map_err(be)?;
        b.set_i32("num-queues", queues).map_err(be)?;
        let out = b.start().map_err(be)?;
        let buf = b.alloc_mem_region(BUF_LEN).map_err(be)?;
        b.map_mem_region(&buf).map_err(be)?;
        Ok(Client { qs: out.queues, buf, blkio: b })
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of BUF_LEN bytes owned by self.blkio; &mut self
        // means no request is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, BUF_LEN) }
    }

    /// Wait for one completion on queue `q`: the request's return value.
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = self.qs[q].do_io(&mut c, 1, Some(&mut timeout), None).unwrap();
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised the first n completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    pub fn write(&mut self, q: usize, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.buf.addr + buf_off) as *const u8;
        self.qs[q].write(off, p, len, 0, blkio::ReqFlags::empty());
        self.wait(q)
    }

    pub fn read(&mut self, q: usize, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.buf.addr + buf_off) as *mut u8;
        self.qs[q].read(off, p, len, 0, blkio::ReqFlags::empty());
        self.wait(q)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.qs[q].flush(0, blkio::ReqFlags::empty());
        self.wait(q)
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) % 251) as u8).collect()
}

pub fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}


/// Threads of this process named `name`.
pub fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| t.as_ref().ok().and_then(|t| std::fs::read_to_string(t.path().join("comm")).ok()).is_some_and(|c| c.trim() == name))
        .count()
}
