//! Protocol-level tests with the `vhost` crate's frontend and a hand-driven split virtqueue in
//! shared memory: GET_CONFIG / SET_CONFIG, GET_ID, status bytes and used lengths, malformed
//! chains, and GET_VRING_BASE draining in-flight requests.

use std::fs::File;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::threads_named;
use vblk_engine::{create_pool, CreateOptions, Pool, PoolOptions};
use vblk_vhost::{Device, DeviceConfig};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

type Mem = GuestMemoryMmap<()>;

thread_local! {
    /// The inflight area of the last `connect_full` with one (the frontend keeps it).
    static INFLIGHT_FILE: RefCell<Option<File>> = const { RefCell::new(None) };
}

const MEM_SIZE: usize = 32 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const VOL_SIZE: u64 = 64 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    _pool: Pool,
    dev: Option<Device>,
    socket: PathBuf,
}

fn fixture() -> Fixture {
    fixture_with(QSIZE)
}

fn fixture_with(queue_size: u16) -> Fixture {
    fixture_cached(queue_size, vblk_vhost::CacheMode::default())
}

/// A fixture whose device starts in the cache mode `cache` gives (and reports changes to it).
fn fixture_cached(queue_size: u16, cache: vblk_vhost::CacheMode) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    create_pool(&path, &CreateOptions { size_bytes: Some(256 << 20), ..Default::default() }).unwrap();
    let pool = Pool::open(&path, &PoolOptions::default()).unwrap();
    pool.create_volume("vol-frontend", VOL_SIZE).unwrap();
    let socket = dir.path().join("s.sock");
    let vol = pool.open_volume("vol-frontend", false).unwrap();
    let cfg = DeviceConfig { socket: socket.clone(), num_queues: 1, queue_size, threads: 0, pin_memory: false };
    let dev = vblk_vhost::start_with(vol, cfg, vblk_vhost::qos::VolumeQos::unlimited(), cache).unwrap();
    Fixture { _dir: dir, _pool: pool, dev: Some(dev), socket }
}

impl Fixture {
    /// Wait (up to 10 s) until the device sees its frontend gone.
    fn wait_disconnected(&self) {
        let t0 = Instant::now();
        while self.dev.as_ref().unwrap().connected() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the frontend is still connected after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A memfd of `len` bytes (shared memory to hand to the backend).
fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Guest memory shared with the backend through a memfd.
fn guest_memory() -> Mem {
    let file = memfd(c"vblk-test", MEM_SIZE as u64);
    GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))]).unwrap()
}

/// A minimal split-virtqueue driver.
struct Driver {
    mem: Mem,
    fe: Frontend,
    kick: EventFd,
    _call: EventFd,
    qsize: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn connect(f: &Fixture) -> Driver {
        Driver::connect_with(f, QSIZE)
    }

    fn connect_with(f: &Fixture, qsize: u16) -> Driver {
        Driver::connect_full(f, qsize, guest_memory(), 0, None, |_| {})
    }

    /// Connect with guest memory `mem` (its ring may hold chains already), ring base `base`,
    /// and, with `inflight`, the inflight area: `Some(None)` asks the backend for a new one,
    /// `Some(Some(file))` hands it this one. `prepare` runs on the area before it is handed
    /// over (the test playing the earlier backend).
    fn connect_full(
        f: &Fixture,
        qsize: u16,
        mem: Mem,
        base: u16,
        inflight: Option<Option<File>>,
        prepare: impl FnOnce(&File),
    ) -> Driver {
        Driver::connect_acking(f, qsize, mem, base, inflight, prepare, u64::MAX)
    }

    /// [`connect_full`](Self::connect_full), acknowledging only the offered features in `ack`.
    fn connect_acking(
        f: &Fixture,
        qsize: u16,
        mem: Mem,
        base: u16,
        inflight: Option<Option<File>>,
        prepare: impl FnOnce(&File),
        ack: u64,
    ) -> Driver {
        let mut fe = Frontend::connect(&f.socket, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        fe.set_features(features & ack).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(proto).unwrap();
        // REPLY_ACK: make the backend's refusals visible as errors.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(fe.get_queue_num().unwrap(), 1);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()]).unwrap();
        if let Some(area) = inflight {
            assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
            let want = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: qsize };
            let (info, file) = match area {
                Some(file) => (VhostUserInflight { mmap_size: file.metadata().unwrap().len(), ..want }, file),
                None => fe.get_inflight_fd(&want).unwrap(),
            };
            assert_eq!(info.mmap_size, vblk_vhost::inflight::queue_region_size(qsize) as u64);
            prepare(&file);
            fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
            INFLIGHT_FILE.with(|c| *c.borrow_mut() = Some(file));
        }
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        fe.set_vring_num(0, qsize).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: qsize,
                queue_size: qsize,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, base.into()).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        let avail_idx = u16::from_le(mem.read_obj(GuestAddress(AVAIL + 2)).unwrap());
        Driver { mem, fe, kick, _call: call, qsize, next_desc: avail_idx % qsize, avail_idx, used_seen: base }
    }

    /// Post an existing chain again (a misbehaving driver re-offering a head in flight).
    fn repost(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.qsize);
        self.mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        fence(Ordering::SeqCst);
    }

    /// Add a chain of (guest address, length, device-writable) and return its head.
    fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        ring_add(&self.mem, self.qsize, &mut self.next_desc, &mut self.avail_idx, descs)
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    /// Wait for `n` more used entries: (head, used len).
    fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let t0 = Instant::now();
        while self.used_idx().wrapping_sub(self.used_seen) < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting for {n} completions");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let e = USED + 4 + 8 * u64::from(self.used_seen % self.qsize);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        write_header(&self.mem, at, t, sector);
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn config(&mut self) -> Vec<u8> {
        let buf = [0u8; 96];
        let (_, data) = self.fe.get_config(0, 96, VhostUserConfigFlags::WRITABLE, &buf).unwrap();
        data
    }
}

/// Write a request header at `at`.
fn write_header(mem: &Mem, at: u64, t: u32, sector: u64) {
    mem.write_obj(t.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

/// Put a chain of (guest address, length, device-writable) into the split ring in `mem` at
/// descriptors from `next_desc`, publish it at `avail_idx`; returns its head.
fn ring_add(mem: &Mem, qsize: u16, next_desc: &mut u16, avail_idx: &mut u16, descs: &[(u64, u32, bool)]) -> u16 {
    let head = *next_desc;
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let idx = (*next_desc + i as u16) % qsize;
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let next = (idx + 1) % qsize;
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let a = GuestAddress(DESC + 16 * u64::from(idx));
        mem.write_obj(addr.to_le(), a).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(a.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(a.0 + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(a.0 + 14)).unwrap();
    }
    *next_desc = (*next_desc + descs.len() as u16) % qsize;
    let slot = u64::from(*avail_idx % qsize);
    mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
    fence(Ordering::SeqCst);
    *avail_idx = avail_idx.wrapping_add(1);
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    fence(Ordering::SeqCst);
    head
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x1f_0000;

#[test]
fn config_space() {
    let f = fixture();
    let mut d = Driver::connect(&f);
    let c = d.config();
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), VOL_SIZE / 512);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512, "logical block");
    assert_eq!(c[24], 3, "physical block = 512 << 3");
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), u32::from(QSIZE) - 2);
    assert_eq!(c[32], 1, "writeback by default with FLUSH");
    // Only the writeback byte is writable.
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    assert_eq!(d.config()[32], 0);
    // Writes elsewhere are ignored (an error would make the vhost crate drop the connection).
    let before = d.config();
    d.fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8]).unwrap();
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[7]).unwrap();
    assert_eq!(d.config(), before);
    // An out-of-bounds read is refused, not a crash; the device keeps serving.
    let buf = [0u8; 16];
    assert!(d.fe.get_config(0x1000 - 8, 16, VhostUserConfigFlags::WRITABLE, &buf).is_err());
    assert_eq!(d.config()[32], 0);
}

/// The cache mode the guest chose stays when the frontend reconnects, renegotiates or resets
/// the device: QEMU shows the guest the configuration space it read once, so a device that went
/// back to write-back would lose writes a guest that still sees write-through never flushes.
#[test]
fn cache_mode_outlives_reconnects_renegotiation_and_resets() {
    let f = fixture();
    {
        let mut d = Driver::connect(&f);
        assert_eq!(d.config()[32], 1, "write-back by default");
        d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
        assert_eq!(d.config()[32], 0);
    }
    f.wait_disconnected();
    // A new connection, read before and after the features are set (QEMU reads it at realize,
    // before any SET_FEATURES).
    let mut fe = Frontend::connect(&f.socket, 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    let buf = [0u8; 96];
    assert_eq!(fe.get_config(0, 96, VhostUserConfigFlags::WRITABLE, &buf).unwrap().1[32], 0, "fresh connection");
    drop(fe);
    f.wait_disconnected();
    let mut d = Driver::connect(&f);
    assert_eq!(d.config()[32], 0, "after a reconnect");
    // Renegotiation with another feature set (firmware, then the OS driver).
    let features = d.fe.get_features().unwrap();
    d.fe.set_features(features & !(1 << VIRTIO_RING_F_EVENT_IDX)).unwrap();
    assert_eq!(d.config()[32], 0, "after renegotiation");
    // Without FLUSH the device is write-through whatever was chosen; the choice comes back
    // with FLUSH.
    d.fe.set_features(features & !(1 << VIRTIO_BLK_F_FLUSH) & !(1 << VIRTIO_BLK_F_CONFIG_WCE)).unwrap();
    assert_eq!(d.config()[32], 0);
    d.fe.set_features(features).unwrap();
    assert_eq!(d.config()[32], 0);
    // A device reset (guest reboot).
    d.fe.reset_device().unwrap();
    assert_eq!(d.config()[32], 0, "after a device reset");
    d.fe.set_features(features).unwrap();
    assert_eq!(d.config()[32], 0);
    // The guest switches back to write-back: that stays too.
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    drop(d);
    f.wait_disconnected();
    let mut d = Driver::connect(&f);
    assert_eq!(d.config()[32], 1, "write-back chosen again");
}

/// A device started again for a VM whose guest chose write-through (the daemon recorded it)
/// starts in write-through, and tells its owner when the guest changes the mode.
#[test]
fn cache_mode_given_at_start_and_reported_on_change() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
    let s2 = seen.clone();
    let cache = vblk_vhost::CacheMode { writeback: false, on_change: Some(Box::new(move |wb| s2.lock().unwrap().push(wb))) };
    let f = fixture_cached(QSIZE, cache);
    let mut d = Driver::connect(&f);
    assert_eq!(d.config()[32], 0, "starts in the recorded write-through");
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    assert!(seen.lock().unwrap().is_empty(), "no change, no report");
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![true, false]);
}

/// `size_max` and `seg_max` bind only a driver that negotiated them (virtio 1.2 §5.2.3). OVMF
/// acknowledges neither and reads a kernel or an initrd as one descriptor of many MiB.
#[test]
fn size_max_and_seg_max_bind_only_a_driver_that_negotiated_them() {
    let f = fixture();
    let ack = !((1u64 << VIRTIO_BLK_F_SIZE_MAX) | (1u64 << VIRTIO_BLK_F_SEG_MAX));
    let seg = 4u32 << 20; // 4 MiB: over size_max (1 MiB)
    let (src, dst) = (0x40_0000u64, 0x80_0000u64);
    {
        let mut d = Driver::connect_acking(&f, QSIZE, guest_memory(), 0, None, |_| {}, ack);
        let pattern: Vec<u8> = (0..seg).map(|i| (i / 512 % 251) as u8 ^ (i % 7) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(src)).unwrap();
        // One 4 MiB write, then one 4 MiB read of it.
        d.header(HDR, VIRTIO_BLK_T_OUT, 2048);
        d.add(&[(HDR, 16, false), (src, seg, false), (STATUS, 1, true)]);
        d.kick();
        assert_eq!(d.wait_used(1)[0].1, 1);
        assert_eq!(d.status(STATUS), VIRTIO_BLK_S_OK as u8);
        d.header(HDR, VIRTIO_BLK_T_IN, 2048);
        d.add(&[(HDR, 16, false), (dst, seg, true), (STATUS, 1, true)]);
        d.kick();
        assert_eq!(d.wait_used(1)[0].1, seg + 1);
        assert_eq!(d.status(STATUS), VIRTIO_BLK_S_OK as u8);
        let mut back = vec![0u8; seg as usize];
        d.mem.read_slice(&mut back, GuestAddress(dst)).unwrap();
        assert!(back == pattern, "read back what was written");
    }
    f.wait_disconnected();
    // A driver that negotiated SIZE_MAX is held to it.
    let mut d = Driver::connect(&f);
    d.header(HDR, VIRTIO_BLK_T_IN, 2048);
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add(&[(HDR, 16, false), (dst, seg, true), (STATUS, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert_eq!(d.status(STATUS), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn requests_status_and_used_len() {
    let f = fixture();
    let mut d = Driver::connect(&f);

    // GET_ID: the volume name, NUL padded; used len = 20 + status.
    d.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let h = d.add(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(u32::from(h), 21)]);
    assert_eq!(d.status(STATUS), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"vol-frontend");
    assert!(id[12..].iter().all(|&b| b == 0));

    // Write 8 KiB (writethrough mode: the device flushes before completing), read it back.
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    d.header(HDR, VIRTIO_BLK_T_OUT, 64);
    let h = d.add(&[(HDR, 16, false), (DATA, 4096, false), (DATA + 4096, 4096, false), (STATUS, 1, true)]);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(u32::from(h), 1)]);
    assert_eq!(d.status(STATUS), 0);
    d.mem.write_slice(&[0u8; 8192], GuestAddress(DATA + 0x10_0000)).unwrap();
    d.header(HDR, VIRTIO_BLK_T_IN, 64);
    let h = d.add(&[(HDR, 16, false), (DATA + 0x10_0000, 8192, true), (STATUS, 1, true)]);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(u32::from(h), 8193)]);
    assert_eq!(d.status(STATUS), 0);
    let mut back = vec![0u8; 8192];
    d.mem.read_slice(&mut back, GuestAddress(DATA + 0x10_0000)).unwrap();
    assert_eq!(back, data);

    // A read into a buffer that is not 512-aligned goes through a bounce buffer.
    d.header(HDR, VIRTIO_BLK_T_IN, 64);
    let odd = DATA + 0x18_0003;
    let h = d.add(&[(HDR, 16, false), (odd, 4096, true), (STATUS, 1, true)]);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(u32::from(h), 4097)]);
    assert_eq!(d.status(STATUS), 0);
    let mut back = vec![0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(odd)).unwrap();
    assert_eq!(back, data[..4096]);

    // Several chains in one kick, each with its own status byte: unknown type (UNSUPP),
    // out of range (IOERR), flush (OK), a 4 KiB write at sector 3 (OK: sector granular).
    let st = |i: u64| STATUS + 0x100 * i;
    let hd = |i: u64| HDR + 0x100 * i;
    d.header(hd(0), 0x77, 0);
    d.header(hd(1), VIRTIO_BLK_T_IN, VOL_SIZE / 512);
    d.header(hd(2), VIRTIO_BLK_T_FLUSH, 0);
    d.header(hd(3), VIRTIO_BLK_T_OUT, 3);
    for i in 0..4 {
        d.mem.write_obj(0xeeu8, GuestAddress(st(i))).unwrap();
    }
    let heads = [
        d.add(&[(hd(0), 16, false), (st(0), 1, true)]),
        d.add(&[(hd(1), 16, false), (DATA, 4096, true), (st(1), 1, true)]),
        d.add(&[(hd(2), 16, false), (st(2), 1, true)]),
        d.add(&[(hd(3), 16, false), (DATA, 4096, false), (st(3), 1, true)]),
    ];
    d.kick();
    let mut used = d.wait_used(4);
    used.sort();
    let mut want = vec![(u32::from(heads[0]), 1), (u32::from(heads[1]), 4097), (u32::from(heads[2]), 1), (u32::from(heads[3]), 1)];
    want.sort();
    assert_eq!(used, want);
    assert_eq!(d.status(st(0)), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(d.status(st(1)), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(d.status(st(2)), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.status(st(3)), VIRTIO_BLK_S_OK as u8);

    // No device-writable status: returned with used len 0, nothing written.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    let h = d.add(&[(HDR, 16, false), (DATA, 4096, false)]);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(u32::from(h), 0)]);

    let s = f.dev.as_ref().unwrap().stats();
    assert_eq!(s.get_ids, 1);
    assert!(s.errors >= 3, "{s:?}");
    drop(d);
}

#[test]
fn get_vring_base_drains_in_flight_requests() {
    let f = fixture();
    let mut d = Driver::connect(&f);
    // 64 writes of 1 MiB (the whole volume) from one guest buffer: long enough to still be in
    // flight when the ring is stopped.
    let n = 64u16;
    for i in 0..u64::from(n) {
        let hdr = HDR + 0x100 * i;
        d.header(hdr, VIRTIO_BLK_T_OUT, i * 2048);
        d.add(&[(hdr, 16, false), (DATA, 1 << 20, false), (STATUS + i, 1, true)]);
    }
    d.kick();
    // Wait until the device has taken every chain (it publishes avail_event when it re-enables
    // notifications), then stop the ring: when GET_VRING_BASE returns, all must be completed.
    let t0 = Instant::now();
    while d.mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).unwrap() != n {
        assert!(t0.elapsed() < Duration::from_secs(10), "the device did not take the requests");
        std::hint::spin_loop();
    }
    let in_flight_before = n - d.used_idx();
    let base = d.fe.get_vring_base(0).unwrap();
    assert_eq!(base, u32::from(n));
    assert_eq!(d.used_idx(), n, "requests taken but not completed at GET_VRING_BASE");
    eprintln!("GET_VRING_BASE drained {in_flight_before} in-flight requests");
    let got = d.wait_used(n);
    assert!(got.iter().all(|&(_, len)| len == 1));
    for i in 0..u64::from(n) {
        assert_eq!(d.status(STATUS + i), 0, "request {i}");
    }
    // Restart the ring where it stopped and serve one more request.
    d.fe.set_vring_base(0, base as u16).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    d.fe.set_vring_call(0, &call).unwrap();
    d.fe.set_vring_kick(0, &kick).unwrap();
    d.kick = kick;
    d._call = call;
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[(HDR, 16, false), (STATUS, 1, true)]);
    d.kick();
    assert_eq!(d.wait_used(1)[0].1, 1);
}

#[test]
fn disconnect_completes_in_flight_and_reconnect_works() {
    let mut f = fixture();
    {
        let mut d = Driver::connect(&f);
        for i in 0..32u64 {
            let hdr = HDR + 0x100 * i;
            d.header(hdr, VIRTIO_BLK_T_OUT, i * 128);
            d.add(&[(hdr, 16, false), (DATA + i * 0x1_0000, 0x1_0000, false), (STATUS + i, 1, true)]);
        }
        d.kick();
        let mem = d.mem.clone();
        drop(d.fe);
        // The device drains what it took and completes it on the (still mapped) used ring.
        f.wait_disconnected();
        std::thread::sleep(Duration::from_millis(100));
        // With EVENT_IDX the device publishes how far it took the avail ring in avail_event
        // (after the used ring's entries): everything it took must have been completed.
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let taken: u16 = mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).unwrap();
        assert_eq!(used, taken);
        for i in 0..u64::from(used) {
            let st: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(st, 0);
        }
    }
    let mut d = Driver::connect(&f);
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[(HDR, 16, false), (STATUS, 1, true)]);
    d.kick();
    d.wait_used(1);
    drop(d);
    f.dev.take().unwrap().stop().unwrap();
}

#[test]
fn in_flight_requests_are_bounded_by_the_queue_size() {
    // A 4-entry queue and a misbehaving driver that re-offers the same head while it is still
    // in flight (keeping the avail ring itself well-formed): without a bound the device would
    // take 4 more chains per kick. It takes at most queue_size chains and resumes from
    // completions.
    let f = fixture_with(4);
    let mut d = Driver::connect_with(&f, 4);
    d.header(HDR, VIRTIO_BLK_T_OUT, 0);
    let h = d.add(&[(HDR, 16, false), (DATA, 1 << 20, false), (STATUS, 1, true)]);
    for _ in 0..3 {
        d.repost(h);
    }
    d.kick();
    let avail_event = |d: &Driver| d.mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * 4)).unwrap();
    for _ in 0..8 {
        // Wait until the device has taken everything offered (it publishes avail_event when it
        // re-enables notifications), then offer 4 more.
        let t0 = Instant::now();
        while avail_event(&d) != d.avail_idx {
            assert!(t0.elapsed() < Duration::from_secs(10), "the device stalled");
            std::thread::yield_now();
        }
        for _ in 0..4 {
            d.repost(h);
        }
        d.kick();
    }
    let got = d.wait_used(36);
    assert!(got.iter().all(|&(id, len)| id == u32::from(h) && len == 1));
    assert_eq!(d.status(STATUS), 0);
    assert_eq!(f.dev.as_ref().unwrap().stats().writes, 36);
}

/// A frontend that takes the backend channel and never answers on it: the first grow's
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG waits for its acknowledgement; later grows do not
/// start a thread each, the waiting one sends one more message once the frontend answers.
#[test]
fn a_frontend_that_never_acknowledges_config_changes_holds_one_thread() {
    let f = fixture();
    let mut d = Driver::connect(&f);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    d.fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    assert_eq!(threads_named("vblk-cfgchg"), 0);
    for i in 1..=5u64 {
        f._pool.resize_volume("vol-frontend", VOL_SIZE + (i << 20), false).unwrap();
    }
    // The configuration space has the newest size at once.
    let cfg = d.config();
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), (VOL_SIZE + (5 << 20)) / 512);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(threads_named("vblk-cfgchg"), 1, "one notification thread, however many grows");
    // The message that is waiting for its answer is there to read.
    let mut hdr = [0u8; 12];
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Read::read_exact(&mut &ours, &mut hdr).unwrap();
    assert_eq!(u32::from_le_bytes(hdr[..4].try_into().unwrap()), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    // The frontend goes away: the thread ends (its pending notification fails at once).
    drop(ours);
    let t0 = Instant::now();
    while threads_named("vblk-cfgchg") > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the notification thread did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Large buffers that are not O_DIRECT-aligned go through a bounce buffer that the queue keeps
/// for the next one: data written and read back through it is intact whatever size came
/// before, and a read of unwritten blocks through a reused buffer returns zeros, not the
/// buffer's earlier contents.
#[test]
fn large_unaligned_buffers_through_a_reused_bounce_buffer() {
    let f = fixture();
    let mut d = Driver::connect(&f);
    let (src, dst) = (0x40_0001u64, 0x80_0003u64);
    let read_back = |d: &mut Driver, sector: u64, len: usize| -> Vec<u8> {
        d.mem.write_slice(&vec![0xa5u8; len], GuestAddress(dst)).unwrap();
        d.header(HDR, VIRTIO_BLK_T_IN, sector);
        let h = d.add(&[(HDR, 16, false), (dst, len as u32, true), (STATUS, 1, true)]);
        d.kick();
        assert_eq!(d.wait_used(1), vec![(u32::from(h), len as u32 + 1)]);
        assert_eq!(d.status(STATUS), 0);
        let mut back = vec![0u8; len];
        d.mem.read_slice(&mut back, GuestAddress(dst)).unwrap();
        back
    };
    for (round, len) in [(0u64, 512usize << 10), (1, 300 << 10), (2, 768 << 10), (3, 256 << 10)] {
        let data: Vec<u8> = (0..len).map(|i| ((i as u64 * 2654435761) >> (8 + round)) as u8).collect();
        d.mem.write_slice(&data, GuestAddress(src)).unwrap();
        let sector = 8 + round * 2048;
        d.header(HDR, VIRTIO_BLK_T_OUT, sector);
        let h = d.add(&[(HDR, 16, false), (src, len as u32, false), (STATUS, 1, true)]);
        d.kick();
        assert_eq!(d.wait_used(1), vec![(u32::from(h), 1)]);
        assert_eq!(d.status(STATUS), 0);
        assert!(read_back(&mut d, sector, len) == data, "round {round}: the data read back differs");
        // Never written: zeros, through the buffer that just held this round's data.
        assert!(read_back(&mut d, 60_000, 300 << 10).iter().all(|&b| b == 0), "round {round}: a hole did not read as zeros");
    }
}

/// Requests whose unaligned buffers need more bounce buffers at once than a queue takes (60 × 2
/// MiB against a 64 MiB budget) wait in the ring and start as earlier ones complete: every one
/// completes, and the data is right.
#[test]
fn bounce_buffers_beyond_the_queue_budget_wait_their_turn() {
    let f = fixture();
    let mut d = Driver::connect(&f);
    let src = 0x40_0001u64; // unaligned: every request needs a bounce buffer
    let seg = 1u32 << 20;
    let data: Vec<u8> = (0..2 * seg as usize).map(|i| ((i as u64 * 2654435761) >> 11) as u8).collect();
    d.mem.write_slice(&data, GuestAddress(src)).unwrap();
    let n = 60u64;
    let mut heads = Vec::new();
    for i in 0..n {
        let hdr = HDR + 0x100 * i;
        // 30 distinct 2 MiB ranges of the 64 MiB volume, each written twice.
        d.header(hdr, VIRTIO_BLK_T_OUT, (i % 30) * 4096);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        heads.push(d.add(&[(hdr, 16, false), (src, seg, false), (src + u64::from(seg), seg, false), (STATUS + i, 1, true)]));
    }
    d.kick();
    let mut done = d.wait_used(n as u16);
    done.sort();
    let mut want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 1)).collect();
    want.sort();
    assert_eq!(done, want);
    for i in 0..n {
        assert_eq!(d.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "request {i}");
    }
    for r in [0u64, 17, 29] {
        let dst = 0x80_0000u64;
        d.header(HDR, VIRTIO_BLK_T_IN, r * 4096);
        d.add(&[(HDR, 16, false), (dst, seg, true), (dst + u64::from(seg), seg, true), (STATUS, 1, true)]);
        d.kick();
        d.wait_used(1);
        let mut back = vec![0u8; 2 * seg as usize];
        d.mem.read_slice(&mut back, GuestAddress(dst)).unwrap();
        assert!(back == data, "range {r} read back differs");
    }
}

/// Write a little-endian integer at `off` of the inflight area file.
fn poke(f: &File, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    f.write_all_at(bytes, off).unwrap();
}

/// INFLIGHT_SHMFD: a backend started on an inflight area that an earlier backend left with
/// requests in flight runs exactly those again, oldest first and without a kick, continues
/// the ring after them, and does not run a request that had completed.
#[test]
fn inflight_area_resubmits_what_an_earlier_backend_left_in_flight() {
    let mut f = fixture();
    // First connection: the backend creates the area; the driver does one write through it.
    let mut d = Driver::connect_full(&f, QSIZE, guest_memory(), 0, Some(None), |_| {});
    let area = INFLIGHT_FILE.with(|c| c.borrow_mut().take()).expect("an inflight area");
    d.header(HDR, VIRTIO_BLK_T_OUT, 64);
    d.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    d.add(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(d.next_desc, 3);
    d.kick();
    assert_eq!(d.wait_used(1), vec![(0, 1)]);
    let mem = d.mem.clone();
    drop(d);
    f.wait_disconnected();

    // The ring as the backend of a second connection left it when it died: three more writes
    // taken (avail index 4); the middle one completed and is on the used ring (used index 2),
    // but the backend died before clearing it in the area.
    let (mut next_desc, mut avail_idx) = (3u16, 1u16);
    let mut heads = Vec::new();
    for (i, fill) in [(1u64, 0xa1u8), (2, 0xb2), (3, 0xc3)] {
        write_header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_OUT, 8 * i);
        mem.write_slice(&[fill; 512], GuestAddress(DATA + 0x1000 * i)).unwrap();
        let chain = [(HDR + 0x100 * i, 16, false), (DATA + 0x1000 * i, 512, false), (STATUS + i, 1, true)];
        heads.push(ring_add(&mem, QSIZE, &mut next_desc, &mut avail_idx, &chain));
    }
    mem.write_obj(u32::from(heads[1]).to_le(), GuestAddress(USED + 4 + 8)).unwrap();
    mem.write_obj(1u32.to_le(), GuestAddress(USED + 4 + 8 + 4)).unwrap();
    mem.write_obj(2u16.to_le(), GuestAddress(USED + 2)).unwrap();
    let prepare = |a: &File| {
        // Region header: version 1, desc_num, last_batch_head = heads[1], used_idx 1 (stale).
        poke(a, 8, &1u16.to_le_bytes());
        poke(a, 10, &QSIZE.to_le_bytes());
        poke(a, 12, &heads[1].to_le_bytes());
        poke(a, 14, &1u16.to_le_bytes());
        // All three marked in flight, taken in the order heads[2], heads[0], heads[1].
        for (&h, counter) in heads.iter().zip([6u64, 7, 5]) {
            let at = 16 + 16 * u64::from(h);
            poke(a, at, &[1]);
            poke(a, at + 8, &counter.to_le_bytes());
        }
    };
    // QEMU restarts the ring at the used index (the dead backend cannot tell it the avail one).
    let mut d = Driver::connect_full(&f, QSIZE, mem.clone(), 2, Some(Some(area)), prepare);
    // No kick: the backend resubmits on start (oldest first; they may complete in any order).
    let mut done = d.wait_used(2);
    done.sort_unstable();
    assert_eq!(done, vec![(u32::from(heads[0]), 1), (u32::from(heads[2]), 1)]);
    assert_eq!((d.status(STATUS + 1), d.status(STATUS + 3)), (0, 0));
    // The ring goes on after the taken chains; read back what each write left.
    let read = |d: &mut Driver, sector: u64| -> Vec<u8> {
        d.header(HDR + 0x800, VIRTIO_BLK_T_IN, sector);
        d.add(&[(HDR + 0x800, 16, false), (DATA + 0x10_0000, 512, true), (STATUS + 0x80, 1, true)]);
        d.kick();
        d.wait_used(1);
        assert_eq!(d.status(STATUS + 0x80), 0);
        let mut b = vec![0u8; 512];
        d.mem.read_slice(&mut b, GuestAddress(DATA + 0x10_0000)).unwrap();
        b
    };
    assert_eq!(read(&mut d, 64), vec![0x11; 512], "the first connection's write");
    assert_eq!(read(&mut d, 8), vec![0xa1; 512], "resubmitted");
    assert_eq!(read(&mut d, 16), vec![0; 512], "completed before the restart: not run again");
    assert_eq!(read(&mut d, 24), vec![0xc3; 512], "resubmitted");
    drop(d);
    f.dev.take().unwrap().stop().unwrap();
}

/// Live migration (vhost-user "Migration"): the device offers VHOST_F_LOG_ALL and LOG_SHMFD,
/// and once the frontend has handed over a dirty-page log (SET_LOG_BASE), every guest page the
/// device writes is marked in it: the buffers of reads the engine fills straight from the disk
/// (io_uring, behind vm-memory's back), a bounce buffer's copy, the status byte and the used
/// ring. Pages the device only reads are not marked.
#[test]
fn dirty_page_log_for_live_migration() {
    use vhost::VhostUserDirtyLogRegion;
    const VHOST_F_LOG_ALL: u64 = 1 << vblk_vhost::config::VHOST_F_LOG_ALL;
    let mut f = fixture();
    let mut d = Driver::connect(&f);
    let features = d.fe.get_features().unwrap();
    assert_ne!(features & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL offered (QEMU will not migrate without it)");
    assert!(d.fe.get_protocol_features().unwrap().contains(VhostUserProtocolFeatures::LOG_SHMFD));

    // Data to read back, written before logging starts.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    d.header(HDR, VIRTIO_BLK_T_OUT, 0);
    d.add(&[(HDR, 16, false), (DATA, 8192, false), (STATUS, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert_eq!(d.status(STATUS), 0);

    // The log: one bit per 4 KiB page of guest memory, in a memfd shared with the backend.
    let log_len = (MEM_SIZE / 4096 / 8) as u64;
    let log = memfd(c"vblk-test-log", log_len);
    d.fe.set_log_base(0, Some(VhostUserDirtyLogRegion { mmap_size: log_len, mmap_offset: 0, mmap_handle: log.as_raw_fd() }))
        .unwrap();
    // The guest chose write-through; the frontend switching logging on (a migration starts)
    // and off (cancelled) must not change that.
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    d.fe.set_features(features | VHOST_F_LOG_ALL).unwrap();
    assert_eq!(d.config()[32], 0, "still write-through after LOG_ALL was switched on");
    d.fe.set_features(features & !VHOST_F_LOG_ALL).unwrap();
    d.fe.set_features(features | VHOST_F_LOG_ALL).unwrap();
    assert_eq!(d.config()[32], 0, "still write-through after LOG_ALL was switched off and on");
    let dirty = |addr: u64| -> bool {
        use std::os::unix::fs::FileExt;
        let page = addr / 4096;
        let mut b = [0u8; 1];
        log.read_exact_at(&mut b, page / 8).unwrap();
        b[0] & (1 << (page % 8)) != 0
    };
    let clear = || {
        use std::os::unix::fs::FileExt;
        log.write_all_at(&vec![0u8; log_len as usize], 0).unwrap();
    };
    clear();

    // A read into page-aligned buffers: the engine's io_uring writes them directly.
    let (dst, st) = (DATA + 0x10_0000, STATUS + 0x2000);
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.add(&[(HDR, 16, false), (dst, 4096, true), (dst + 0x4000, 4096, true), (st, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert_eq!(d.status(st), 0);
    let mut back = vec![0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(dst + 0x4000)).unwrap();
    assert_eq!(back, data[4096..], "the read itself worked");
    assert!(dirty(dst) && dirty(dst + 0x4000), "pages the engine read into are marked");
    assert!(!dirty(dst + 0x1000) && !dirty(dst + 0x3000), "pages between them are not");
    assert!(dirty(st), "the status byte's page is marked");
    assert!(dirty(USED), "the used ring is marked");
    assert!(!dirty(HDR), "the header is only read by the device");
    assert!(!dirty(DATA), "nor is the source of the earlier write");

    // A write: only the status byte and the used ring change in guest memory.
    clear();
    d.header(HDR, VIRTIO_BLK_T_OUT, 64);
    d.add(&[(HDR, 16, false), (DATA, 4096, false), (st, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert!(!dirty(DATA) && dirty(st) && dirty(USED));

    // A read through a bounce buffer (a buffer not 512-byte aligned), spanning two pages.
    clear();
    let odd = DATA + 0x20_0e03;
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.add(&[(HDR, 16, false), (odd, 4096, true), (st, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert_eq!(d.status(st), 0);
    assert!(dirty(odd) && dirty(odd + 4095), "both pages of the bounce copy are marked");

    // GET_ID writes the id through vm-memory.
    clear();
    d.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.add(&[(HDR, 16, false), (DATA + 0x40_0000, 20, true), (st, 1, true)]);
    d.kick();
    d.wait_used(1);
    assert!(dirty(DATA + 0x40_0000));
    drop(d);
    f.dev.take().unwrap().stop().unwrap();
}
