//! End-to-end: a pool in a tempdir, a device on a socket, and libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate) as a real vhost-user-blk frontend.

mod common;

use std::mem::MaybeUninit;
use std::time::Duration;

use common::*;
use vblk_vhost::{start, DeviceConfig, Error};

#[test]
fn write_flush_read_back() {
    let s = setup();
    let dev = device(&s, 1);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert!(dev.connected());
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), VOL_SIZE);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 512);

    let data = pattern(1, 64 << 10);
    c.buf()[..data.len()].copy_from_slice(&data);
    assert_eq!(c.write(0, 1 << 20, 0, data.len()), 0);
    assert_eq!(c.flush(0), 0);
    c.buf()[..data.len()].fill(0);
    assert_eq!(c.read(0, 1 << 20, 0, data.len()), 0);
    assert_eq!(&c.buf()[..data.len()], &data[..]);

    // Sector-granular I/O: 512 bytes into an unwritten block and into a written one.
    let sect = pattern(7, 512);
    c.buf()[..512].copy_from_slice(&sect);
    assert_eq!(c.write(0, (2 << 20) + 1536, 0, 512), 0);
    assert_eq!(c.write(0, (1 << 20) + 1536, 0, 512), 0);
    c.buf()[..8192].fill(0xee);
    assert_eq!(c.read(0, 2 << 20, 0, 4096), 0);
    assert!(c.buf()[..1536].iter().all(|&b| b == 0) && c.buf()[2048..4096].iter().all(|&b| b == 0));
    assert_eq!(&c.buf()[1536..2048], &sect[..]);
    assert_eq!(c.read(0, (1 << 20) + 1024, 0, 1536), 0);
    assert_eq!(&c.buf()[..512], &data[1024..1536]);
    assert_eq!(&c.buf()[512..1024], &sect[..]);
    assert_eq!(&c.buf()[1024..1536], &data[2048..2560]);

    // An unwritten range reads as zeros; the last block of the volume is readable.
    c.buf()[..4096].fill(0xaa);
    assert_eq!(c.read(0, VOL_SIZE - 4096, 0, 4096), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0));

    // Discard and write-zeroes read back as zeros.
    c.qs[0].discard(1 << 20, 8192, 0, blkio::ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    c.qs[0].write_zeroes((1 << 20) + 16384, 4096, 0, blkio::ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(c.read(0, 1 << 20, 0, 32768), 0);
    assert!(c.buf()[..8192].iter().all(|&b| b == 0));
    assert_eq!(&c.buf()[8192..16384], &data[8192..16384]);
    assert!(c.buf()[16384..20480].iter().all(|&b| b == 0));
    assert_eq!(&c.buf()[20480..32768], &data[20480..32768]);

    // Past the end: the device answers IOERR, which libblkio reports as a negative errno.
    assert!(c.read(0, VOL_SIZE, 0, 4096) < 0);

    let st = dev.stats();
    assert!(st.writes >= 1 && st.reads >= 3 && st.flushes >= 1, "{st:?}");
    assert_eq!(st.discards, 1);
    assert_eq!(st.write_zeroes, 1);
    assert!(st.bytes_written >= data.len() as u64);
    assert!(st.errors >= 1);
    drop(c);
    dev.stop().unwrap();
    assert!(!s.socket.exists());
    // The volume was detached: it can be attached read-write again.
    drop(s.pool.open_volume("v", false).unwrap());
}

/// 4 queues served by one worker thread each (the default), by one thread for all, and by 3
/// threads (thread 0 serves queues 0 and 3); and with the client's memory registered as
/// io_uring fixed buffers (`pin_memory`).
#[test]
fn queue_depth_and_multiqueue() {
    let s = setup();
    for (threads, pin) in [(0u16, false), (1, false), (3, false), (2, true)] {
        queue_depth_and_multiqueue_with(&s, threads, pin);
    }
}

/// Pages pinned in this process (VmPin of /proc/self/status), in KiB.
fn pinned_kib() -> u64 {
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    st.lines().find_map(|l| l.strip_prefix("VmPin:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn queue_depth_and_multiqueue_with(s: &Setup, threads: u16, pin_memory: bool) {
    let vol = s.pool.open_volume("v", false).unwrap();
    let pinned_before = pinned_kib();
    let dev = start(vol, DeviceConfig { socket: s.socket.clone(), num_queues: 4, queue_size: 256, threads, pin_memory }).unwrap();
    let mut c = Client::connect(&s.socket, 4).unwrap();
    assert_eq!(c.qs.len(), 4);
    let seed = u64::from(threads) * 1000;
    // 32 writes in flight per queue, 4 queues; each 4 KiB block gets its own pattern.
    for q in 0..4 {
        for i in 0..32usize {
            let slot = q * 32 + i;
            let blk = pattern(seed + slot as u64, 4096);
            c.buf()[slot * 4096..(slot + 1) * 4096].copy_from_slice(&blk);
        }
    }
    for q in 0..4 {
        for i in 0..32usize {
            let slot = q * 32 + i;
            let p = (c.buf.addr + slot * 4096) as *const u8;
            c.qs[q].write(slot as u64 * 4096, p, 4096, slot, blkio::ReqFlags::empty());
        }
    }
    for q in 0..4 {
        let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..32).map(|_| MaybeUninit::uninit()).collect();
        let mut got = 0;
        while got < 32 {
            let mut timeout = Duration::from_secs(30);
            let n = c.qs[q].do_io(&mut comps[..32 - got], 1, Some(&mut timeout), None).unwrap();
            assert!(n > 0, "timed out");
            for cm in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                assert_eq!(unsafe { cm.assume_init_ref() }.ret, 0);
            }
            got += n;
        }
    }
    assert_eq!(c.flush(2), 0);
    if pin_memory {
        // Every queue that ran registered the client's memory (its 512 KiB buffer at least).
        let pinned = pinned_kib() - pinned_before;
        assert!(pinned >= 4 * 512, "pinned {pinned} KiB");
    } else {
        assert_eq!(pinned_kib(), pinned_before);
    }
    c.buf()[..128 * 4096].fill(0);
    assert_eq!(c.read(3, 0, 0, 128 * 4096), 0);
    for slot in 0..128usize {
        assert_eq!(&c.buf()[slot * 4096..(slot + 1) * 4096], &pattern(seed + slot as u64, 4096)[..], "threads {threads}, pin {pin_memory}: block {slot}");
    }
    drop(c);
    dev.stop().unwrap();
}

#[test]
fn reconnect_and_stop() {
    let s = setup();
    let dev = device(&s, 2);
    let data = pattern(9, 8192);
    {
        let mut c = Client::connect(&s.socket, 2).unwrap();
        c.buf()[..8192].copy_from_slice(&data);
        // The first request of a connection, on a second queue: it once failed with "guest
        // memory not mapped" when the queue thread had loaded the memory map before the
        // frontend's ADD_MEM_REG (fixed in process_avail).
        assert_eq!(c.write(1, 40960, 0, 8192), 0);
        assert_eq!(c.flush(1), 0);
    }
    wait_for("disconnect", || !dev.connected());
    for _ in 0..3 {
        let mut c = Client::connect(&s.socket, 2).unwrap();
        assert!(dev.connected());
        assert_eq!(c.read(0, 40960, 0, 8192), 0);
        assert_eq!(&c.buf()[..8192], &data[..]);
        drop(c);
        wait_for("disconnect", || !dev.connected());
    }
    assert_eq!(dev.stats().connections, 4);

    // Stop while a frontend is connected.
    let c = Client::connect(&s.socket, 1).unwrap();
    assert!(dev.connected());
    dev.stop().unwrap();
    assert!(!s.socket.exists());
    drop(c);
}

#[test]
fn socket_handling() {
    let s = setup();
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&s.socket).unwrap());
    assert!(s.socket.exists());
    let dev = device(&s, 1);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&s.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not.
    let vol = s.pool.open_volume("v", true).unwrap();
    let cfg = DeviceConfig::new(&s.socket);
    assert!(matches!(start(vol, cfg), Err(Error::SocketInUse(_))));
    dev.stop().unwrap();
    // Neither is a regular file, nor a bad configuration.
    std::fs::write(&s.socket, b"x").unwrap();
    let vol = s.pool.open_volume("v", true).unwrap();
    assert!(matches!(start(vol, DeviceConfig::new(&s.socket)), Err(Error::NotASocket(_))));
    std::fs::remove_file(&s.socket).unwrap();
    for (q, size, threads) in [(0u16, 256u16, 0u16), (17, 256, 0), (1, 100, 0), (1, 0, 0), (2, 256, 3)] {
        let vol = s.pool.open_volume("v", true).unwrap();
        let cfg = DeviceConfig { socket: s.socket.clone(), num_queues: q, queue_size: size, threads, pin_memory: false };
        assert!(matches!(start(vol, cfg), Err(Error::InvalidConfig(_))), "{q} {size}");
    }
}

#[test]
fn read_only_volume() {
    let s = setup();
    {
        let mut io = s.pool.open_volume("v", false).unwrap().sync_io().unwrap();
        io.write_at(8192, &pattern(3, 4096)).unwrap();
        io.flush().unwrap();
    }
    let vol = s.pool.open_volume("v", true).unwrap();
    let dev = start(vol, DeviceConfig::new(&s.socket)).unwrap();
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.socket.to_str().unwrap()).unwrap();
    b.set_bool("read-only", true).unwrap();
    b.connect().unwrap();
    let out = b.start().unwrap();
    let buf = b.alloc_mem_region(4096).unwrap();
    b.map_mem_region(&buf).unwrap();
    let mut c = Client { qs: out.queues, buf, blkio: b };
    assert_eq!(c.read(0, 8192, 0, 4096), 0);
    assert_eq!(&c.buf()[..4096], &pattern(3, 4096)[..]);
    drop(c);
    dev.stop().unwrap();
}
