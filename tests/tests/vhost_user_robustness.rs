//! vhost-user protocol robustness against the real daemon: a raw client (a plain UnixStream and
//! hand-written vhost-user messages: `u32 request, u32 flags (version 1), u32 size`, payload,
//! file descriptors as SCM_RIGHTS) sends malformed and out-of-order messages to one volume's
//! socket. After every abuse: the daemon process is alive and answers its API; the abused socket
//! takes a new, proper connection (libblkio) that does real I/O; and the other volume of the same
//! daemon — served on its own socket to a client that stays connected the whole time — keeps
//! reading back what it wrote.
//!
//! Layouts and request codes: vhost 0.18, `src/vhost_user/message.rs`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vblk_tests::*;

// Frontend request codes (vhost_user::message::FrontendReq).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const RESET_DEVICE: u32 = 34;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const GET_SHMEM_CONFIG: u32 = 44;

/// Header flags: version 1; REPLY = 0x4, NEED_REPLY = 0x8.
const V1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
/// vhost-user MAX_MSG_SIZE (payload bytes).
const MAX_MSG: usize = 0x1000;
/// Bit 8 of a SET_VRING_KICK/CALL/ERR payload: no fd attached.
const NOFD: u64 = 0x100;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const MIB: u64 = 1 << 20;

/// A request code and its payload.
type Msg = (u32, Vec<u8>);

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

fn u64p(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// SET_MEM_TABLE payload: `u32 num_regions, u32 padding`, then per region
/// `u64 guest_phys_addr, u64 memory_size, u64 user_addr, u64 mmap_offset`.
fn mem_table(num_regions: u32, regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = num_regions.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, uaddr, off) in regions {
        for v in [gpa, size, uaddr, off] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

fn memfd(len: u64) -> OwnedFd {
    memfd_with(len, 0)
}

fn memfd_with(len: u64, flags: libc::c_uint) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; we check the result.
    let fd = unsafe { libc::memfd_create(c"vblk-robustness".as_ptr(), libc::MFD_CLOEXEC | flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd() has no memory effects; we check the result.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fd is a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A raw vhost-user frontend connection.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    /// Send bytes with `fds` attached (SCM_RIGHTS). Errors (the daemon hung up) are returned,
    /// not fatal: a robust backend may close the connection at any point of an abuse.
    fn send_fds(&mut self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        if fds.is_empty() {
            return self.s.write_all(bytes);
        }
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `space` bytes, enough for one cmsg with fds.len() fds;
        // CMSG_FIRSTHDR/CMSG_DATA stay within it.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
            libc::sendmsg(self.s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (n as usize) < bytes.len() {
            self.s.write_all(&bytes[n as usize..])?;
        }
        Ok(())
    }

    /// A message whose size field says `size`, whatever the payload really is.
    fn msg_sized(&mut self, request: u32, flags: u32, size: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut b = header(request, flags, size);
        b.extend_from_slice(payload);
        self.send_fds(&b, fds)
    }

    fn msg(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        self.msg_sized(request, V1, payload.len() as u32, payload, fds)
    }

    /// Read one reply: (request, flags, payload). None if the daemon closed the connection.
    fn reply(&mut self) -> Option<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 12];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("no reply within 10 s: the daemon hangs on this connection")
            }
            Err(_) => return None,
        }
        let req = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        assert!(size <= MAX_MSG, "reply of {size} bytes");
        let mut p = vec![0u8; size];
        self.s.read_exact(&mut p).ok()?;
        Some((req, flags, p))
    }

    /// GET_FEATURES round trip: the connection is still being served.
    fn features(&mut self) -> Option<u64> {
        self.msg(GET_FEATURES, &[], &[]).ok()?;
        let (req, flags, p) = self.reply()?;
        assert_eq!((req, flags & 0x7), (GET_FEATURES, 0x5), "reply header");
        Some(u64::from_le_bytes(p[..8].try_into().ok()?))
    }

    /// End an abusive connection: read whatever the daemon still sends (replies, error acks)
    /// until it closes its end or has been quiet for a second — a backend may drop a connection
    /// after a protocol error or answer and carry on; both are fine — then close ours.
    fn finish(self) {
        let _ = self.s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut s = &self.s;
        let mut b = [0u8; 4096];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 {
                break;
            }
        }
    }
}

struct Env {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    /// The abused volume's socket.
    sock_a: PathBuf,
    /// The other volume: one client connected for the whole test.
    other: BlkClient,
    round: u64,
    /// Connections made to the abused socket (raw and proper).
    conns: u64,
}

/// Run `f` on another thread and fail if it takes longer than `secs` (a hung daemon must fail
/// the test, not hang it).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {secs} s"),
    }
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pool = Daemon::create_pool(dir.path(), "128M").unwrap();
        let daemon = Daemon::start(dir.path(), &pool, &[]).unwrap();
        daemon.cli(&["vol", "create", "a", "16M"]).unwrap();
        daemon.cli(&["vol", "create", "b", "16M"]).unwrap();
        let sock_a = dir.path().join("a.sock");
        let sock_b = dir.path().join("b.sock");
        daemon.cli(&["attach", "a", "--socket", sock_a.to_str().unwrap()]).unwrap();
        daemon.cli(&["attach", "b", "--socket", sock_b.to_str().unwrap()]).unwrap();
        wait_for_socket(&sock_a, Duration::from_secs(10)).unwrap();
        wait_for_socket(&sock_b, Duration::from_secs(10)).unwrap();
        let other = BlkClient::connect(&sock_b, 4 * 4096).unwrap();
        let mut env = Env { _dir: dir, daemon, sock_a, other, round: 0, conns: 0 };
        env.check("setup");
        env
    }

    /// The daemon process exists and is not a zombie.
    fn alive(&self) -> bool {
        let Some(pid) = self.daemon.pid() else { return false };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // "pid (comm) S ...": the state follows the last ')'.
            Ok(s) => s.rsplit_once(')').map(|(_, r)| !r.trim_start().starts_with('Z')).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// After an abuse: daemon alive and answering, abused socket serves a proper client, the
    /// other volume's client keeps working.
    fn check(&mut self, after: &str) {
        self.round += 1;
        let round = self.round;
        if !self.alive() {
            let status = self.daemon.stop();
            panic!("after {after}: the daemon died ({status:?}):\n{}", self.daemon.log_tail());
        }
        self.daemon
            .cli(&["vol", "list"])
            .unwrap_or_else(|e| panic!("after {after}: API: {e}\n{}", self.daemon.log_tail()));
        // A fresh, proper connection to the abused socket: write, flush, read back.
        let sock = self.sock_a.clone();
        let r = within(60, &format!("connecting to the abused socket after {after}"), move || -> anyhow::Result<()> {
            let mut c = BlkClient::connect(&sock, 4096)?;
            anyhow::ensure!(c.capacity()? == 16 * MIB, "capacity");
            let lba = round % 4096;
            c.write_data(lba * 4096, &pattern_block(lba, round))?;
            c.flush()?;
            anyhow::ensure!(c.read_data(lba * 4096, 4096)? == pattern_block(lba, round), "read back");
            Ok(())
        });
        if let Err(e) = r {
            panic!(
                "after {after}: the abused socket does not serve a proper client: {e:#}\n{}",
                self.daemon.log_tail()
            );
        }
        self.conns += 1;
        self.other_io(after);
    }

    /// Real I/O on the other volume through the client that stays connected.
    fn other_io(&mut self, when: &str) {
        self.round += 1;
        let lba = 100 + self.round % 64;
        let data = pattern_block(lba, self.round);
        let r = self.other.write_data(lba * 4096, &data).and_then(|()| self.other.read_data(lba * 4096, 4096));
        match r {
            Ok(back) => assert!(back == data, "{when}: the other volume read back wrong data"),
            Err(e) => panic!("{when}: the other volume failed: {e:#}\n{}", self.daemon.log_tail()),
        }
    }

    fn raw(&mut self) -> Raw {
        self.conns += 1;
        Raw::connect(&self.sock_a)
    }

    /// An owned, featured connection (SET_OWNER, SET_FEATURES = all offered bits but
    /// PROTOCOL_FEATURES, so the rings start enabled).
    fn owned(&mut self) -> Raw {
        let mut r = self.raw();
        let f = r.features().expect("GET_FEATURES");
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        r.msg(SET_OWNER, &[], &[]).unwrap();
        r.msg(SET_FEATURES, &u64p(f & !(1 << 30)), &[]).unwrap();
        r
    }
}

#[test]
fn malformed_vhost_user_messages_do_not_hurt_the_daemon_or_other_volumes() {
    let mut env = Env::new();

    // --- Sizes that lie. -------------------------------------------------------------------
    // Size field larger than the payload, then the connection closes mid-message.
    let mut r = env.raw();
    let _ = r.msg_sized(GET_FEATURES, V1, 8, &[], &[]);
    drop(r);
    env.check("a size field larger than the payload");
    // Size field smaller than the payload: SET_FEATURES with 4 of its 8 bytes; the rest is
    // read as the next header.
    let mut r = env.raw();
    let _ = r.msg_sized(SET_FEATURES, V1, 4, &u64p(VIRTIO_F_VERSION_1), &[]);
    r.finish();
    env.check("a size field smaller than the payload");
    // Huge size field (beyond MAX_MSG_SIZE, and u32::MAX).
    for size in [MAX_MSG as u32 + 1, 0x10_0000, u32::MAX] {
        let mut r = env.raw();
        let _ = r.msg_sized(SET_MEM_TABLE, V1, size, &[0u8; 64], &[]);
        r.finish();
        env.check(&format!("a size field of {size:#x}"));
    }
    // A full MAX_MSG_SIZE payload on a request that takes none.
    let mut r = env.raw();
    let _ = r.msg(GET_FEATURES, &vec![0xa5; MAX_MSG], &[]);
    r.finish();
    env.check("a 4 KiB payload on GET_FEATURES");
    // Payload of the wrong size for its request.
    for (req, len) in
        [(SET_VRING_NUM, 4usize), (SET_VRING_ADDR, 8), (SET_FEATURES, 16), (SET_VRING_KICK, 4), (SET_CONFIG, 3)]
    {
        let mut r = env.raw();
        let _ = r.msg(req, &vec![0u8; len], &[]);
        r.finish();
        env.check(&format!("request {req} with a {len}-byte payload"));
    }

    // --- Unknown codes, bad flags. -----------------------------------------------------------
    for req in [0u32, 45, 100, 0x7fff_ffff, u32::MAX] {
        let mut r = env.raw();
        let _ = r.msg(req, &[], &[]);
        r.finish();
        env.check(&format!("unknown request code {req}"));
    }
    for flags in [0u32, 0x2, 0x3, 0x4 | V1, 0x100 | V1, u32::MAX] {
        let mut r = env.raw();
        let _ = r.msg_sized(GET_FEATURES, flags, 0, &[], &[]);
        r.finish();
        env.check(&format!("header flags {flags:#x}"));
    }
    // Requests for features that were never negotiated or are not offered.
    for (req, payload) in [
        (GET_INFLIGHT_FD, vec![0u8; 24]),
        (SET_LOG_BASE, vec![0u8; 16]),
        (ADD_MEM_REG, vec![0u8; 40]),
        (REM_MEM_REG, vec![0u8; 40]),
        (GET_SHMEM_CONFIG, vec![]),
        (RESET_DEVICE, vec![]),
        (GET_CONFIG, vec![0u8; 12]),
    ] {
        let mut r = env.raw();
        let _ = r.msg(req, &payload, &[]);
        r.finish();
        env.check(&format!("request {req} without its protocol feature"));
    }
    // --- The inflight area (INFLIGHT_SHMFD) with bad sizes, offsets and files. -----------------
    // Payload: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16, 4 bytes padding.
    let inflight = |size: u64, off: u64, nq: u16, qs: u16| -> Vec<u8> {
        [&size.to_le_bytes()[..], &off.to_le_bytes(), &nq.to_le_bytes(), &qs.to_le_bytes(), &[0u8; 4]].concat()
    };
    let small = memfd(4096);
    let cases: Vec<(&str, u32, Vec<u8>, Vec<RawFd>)> = vec![
        ("GET_INFLIGHT_FD for 65535 queues of 32768", GET_INFLIGHT_FD, inflight(0, 0, u16::MAX, 32768), vec![]),
        ("GET_INFLIGHT_FD for no queue", GET_INFLIGHT_FD, inflight(0, 0, 0, 256), vec![]),
        ("GET_INFLIGHT_FD for empty queues", GET_INFLIGHT_FD, inflight(0, 0, 1, 0), vec![]),
        ("SET_INFLIGHT_FD larger than its file", SET_INFLIGHT_FD, inflight(MIB, 0, 1, 256), vec![small.as_raw_fd()]),
        ("SET_INFLIGHT_FD past the end of its file", SET_INFLIGHT_FD, inflight(4096, 1 << 30, 1, 16), vec![small.as_raw_fd()]),
        ("SET_INFLIGHT_FD at an unaligned offset", SET_INFLIGHT_FD, inflight(4096, 100, 1, 16), vec![small.as_raw_fd()]),
        ("SET_INFLIGHT_FD of u64::MAX bytes", SET_INFLIGHT_FD, inflight(u64::MAX, 0, 1, 16), vec![small.as_raw_fd()]),
        ("SET_INFLIGHT_FD too small for its queues", SET_INFLIGHT_FD, inflight(64, 0, 1, 256), vec![small.as_raw_fd()]),
        ("SET_INFLIGHT_FD without its fd", SET_INFLIGHT_FD, inflight(4096, 0, 1, 16), vec![]),
    ];
    for (what, req, payload, fds) in cases {
        let mut r = env.raw();
        let f = r.features().expect("GET_FEATURES");
        r.msg(SET_OWNER, &[], &[]).unwrap();
        r.msg(SET_FEATURES, &u64p(f), &[]).unwrap();
        r.msg(GET_PROTOCOL_FEATURES, &[], &[]).unwrap();
        let (_, _, p) = r.reply().expect("GET_PROTOCOL_FEATURES reply");
        let proto = u64::from_le_bytes(p[..8].try_into().unwrap());
        assert_ne!(proto & (1 << 12), 0, "INFLIGHT_SHMFD offered");
        r.msg(SET_PROTOCOL_FEATURES, &u64p(1 << 12), &[]).unwrap();
        let _ = r.msg(req, &payload, &fds);
        r.finish();
        env.check(what);
    }

    // Fds attached to a request that takes none.
    let efd = eventfd();
    let mut r = env.raw();
    let _ = r.msg(GET_FEATURES, &[], &[efd.as_raw_fd()]);
    r.finish();
    env.check("an fd attached to GET_FEATURES");

    // --- SET_MEM_TABLE with bad regions. -----------------------------------------------------
    let fd = memfd(MIB);
    let ok_region = (0u64, MIB, 0x7f00_0000_0000u64, 0u64);
    let cases: Vec<(&str, Vec<u8>, Vec<RawFd>)> = vec![
        ("0 regions", mem_table(0, &[]), vec![]),
        (
            "33 regions (more than the 32 fds a message may carry)",
            mem_table(33, &vec![ok_region; 33]),
            vec![fd.as_raw_fd()],
        ),
        ("a region without its fd", mem_table(1, &[ok_region]), vec![]),
        ("num_regions larger than the regions sent", mem_table(4, &[ok_region]), vec![fd.as_raw_fd()]),
        ("more fds than regions", mem_table(1, &[ok_region]), vec![fd.as_raw_fd(), fd.as_raw_fd(), fd.as_raw_fd()]),
        ("a zero-size region", mem_table(1, &[(0, 0, 0x7f00_0000_0000, 0)]), vec![fd.as_raw_fd()]),
        (
            "a region whose end overflows",
            mem_table(1, &[(u64::MAX - 4095, MIB, 0x7f00_0000_0000, 0)]),
            vec![fd.as_raw_fd()],
        ),
        ("a region of 2^63 bytes", mem_table(1, &[(0, 1 << 63, 0x1000, 0)]), vec![fd.as_raw_fd()]),
        (
            "an mmap offset past the fd's end",
            mem_table(1, &[(0, MIB, 0x7f00_0000_0000, 1 << 40)]),
            vec![fd.as_raw_fd()],
        ),
        (
            "a non-zero padding field",
            {
                let mut p = mem_table(1, &[ok_region]);
                p[4] = 1;
                p
            },
            vec![fd.as_raw_fd()],
        ),
        (
            "overlapping regions",
            mem_table(2, &[ok_region, (MIB / 2, MIB, 0x7f10_0000_0000, 0)]),
            vec![fd.as_raw_fd(), fd.as_raw_fd()],
        ),
        (
            "regions with overlapping user addresses",
            mem_table(2, &[ok_region, (4 * MIB, MIB, 0x7f00_0000_0000, 0)]),
            vec![fd.as_raw_fd(), fd.as_raw_fd()],
        ),
    ];
    for (what, payload, fds) in cases {
        let mut r = env.owned();
        let _ = r.msg(SET_MEM_TABLE, &payload, &fds);
        // Some of these are accepted (the backend may map them); either way, end the connection
        // the way a frontend that gives up would, and check the daemon.
        r.finish();
        env.check(&format!("SET_MEM_TABLE with {what}"));
    }

    // --- Bad queue indexes and sizes (the device has 1 queue of at most 256). --------------
    for index in [1u32, 2, 255, 256, 0x8000, u32::MAX] {
        for (req, payload) in [
            (SET_VRING_NUM, vring_state(index, 128)),
            (SET_VRING_ADDR, vring_addr(index, 0x7f00_0000_0000, 0x7f00_0000_2000, 0x7f00_0000_1000)),
            (SET_VRING_BASE, vring_state(index, 0)),
            (GET_VRING_BASE, vring_state(index, 0)),
            (SET_VRING_ENABLE, vring_state(index, 1)),
        ] {
            let mut r = env.owned();
            let _ = r.msg(req, &payload, &[]);
            r.finish();
            env.check(&format!("request {req} on queue {index}"));
        }
    }
    for num in [0u32, 257, 0x8000, u32::MAX] {
        let mut r = env.owned();
        let _ = r.msg(SET_VRING_NUM, &vring_state(0, num), &[]);
        r.finish();
        env.check(&format!("SET_VRING_NUM of {num} descriptors"));
    }
    // Kick/call/err fds: index in bits 0..8, bit 8 = no fd.
    for req in [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR] {
        for (value, with_fd) in
            [(1u64, true), (0xff, true), (0x1ff, false), (u64::MAX, false), (0, false), (NOFD, true)]
        {
            let efd = eventfd();
            let fds: Vec<RawFd> = if with_fd { vec![efd.as_raw_fd()] } else { vec![] };
            let mut r = env.owned();
            let _ = r.msg(req, &u64p(value), &fds);
            drop(r);
            env.check(&format!("request {req} with value {value:#x} (fd: {with_fd})"));
        }
    }

    // --- Out of order: before SET_OWNER / SET_FEATURES, twice, after RESET_OWNER. -----------
    let sequences: Vec<(&str, Vec<Msg>)> = vec![
        (
            "ring setup before SET_OWNER",
            vec![
                (SET_VRING_NUM, vring_state(0, 256)),
                (SET_VRING_ADDR, vring_addr(0, 0x7f00_0000_0000, 0x7f00_0000_2000, 0x7f00_0000_1000)),
                (SET_VRING_BASE, vring_state(0, 0)),
                (SET_VRING_CALL, u64p(NOFD)),
                (SET_VRING_KICK, u64p(NOFD)),
                (SET_VRING_ENABLE, vring_state(0, 1)),
            ],
        ),
        (
            "config access before SET_FEATURES",
            vec![
                (GET_CONFIG, {
                    let mut p = vec![0u8; 12 + 96];
                    p[4] = 96;
                    p
                }),
                (SET_CONFIG, {
                    let mut p = vec![0u8; 13];
                    p[0] = 32;
                    p[4] = 1;
                    p[12] = 1;
                    p
                }),
                (GET_QUEUE_NUM, vec![]),
                (GET_MAX_MEM_SLOTS, vec![]),
            ],
        ),
        ("SET_FEATURES with every bit set", vec![(SET_OWNER, vec![]), (SET_FEATURES, u64p(u64::MAX))]),
        (
            "SET_PROTOCOL_FEATURES with every bit set",
            vec![(GET_PROTOCOL_FEATURES, vec![]), (SET_PROTOCOL_FEATURES, u64p(u64::MAX))],
        ),
        ("SET_OWNER twice", vec![(SET_OWNER, vec![]), (SET_OWNER, vec![])]),
        (
            "RESET_OWNER, then ring setup",
            vec![
                (SET_OWNER, vec![]),
                (RESET_OWNER, vec![]),
                (SET_VRING_NUM, vring_state(0, 256)),
                (GET_VRING_BASE, vring_state(0, 0)),
            ],
        ),
        (
            "SET_VRING_KICK with an fd before any memory table",
            vec![(SET_OWNER, vec![]), (SET_VRING_NUM, vring_state(0, 64))],
        ),
    ];
    for (what, msgs) in sequences {
        let mut r = env.raw();
        let efd = eventfd();
        for (req, payload) in &msgs {
            if r.msg(*req, payload, &[]).is_err() {
                break;
            }
        }
        if what.starts_with("SET_VRING_KICK") {
            let _ = r.msg(SET_VRING_KICK, &u64p(0), &[efd.as_raw_fd()]);
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd: a kick.
            unsafe { libc::write(efd.as_raw_fd(), [1u64].as_ptr().cast(), 8) };
            std::thread::sleep(Duration::from_millis(100));
        }
        r.finish();
        env.check(what);
    }

    // --- GET_VRING_BASE on a ring that was never started: answered, not hung. ---------------
    let mut r = env.owned();
    r.msg(GET_VRING_BASE, &vring_state(0, 0), &[]).unwrap();
    let (req, _, p) = r.reply().expect("GET_VRING_BASE answered");
    assert_eq!(req, GET_VRING_BASE);
    assert_eq!(p.len(), 8);
    assert_eq!(u32::from_le_bytes(p[0..4].try_into().unwrap()), 0, "queue index");
    // The connection is still served afterwards.
    assert!(r.features().is_some(), "connection dropped after GET_VRING_BASE");
    drop(r);
    env.check("GET_VRING_BASE on a never-started ring");
    // And with NEED_REPLY on a request that fails (no REPLY_ACK negotiated): no hang.
    let mut r = env.owned();
    let _ = r.msg_sized(SET_VRING_NUM, V1 | NEED_REPLY, 8, &vring_state(7, 1), &[]);
    r.finish();
    env.check("NEED_REPLY on a failing request without REPLY_ACK");

    // --- Disconnects mid-message. ------------------------------------------------------------
    for cut in [1usize, 6, 11, 12, 13, 20] {
        let mut msg = header(SET_MEM_TABLE, V1, 40);
        msg.extend_from_slice(&mem_table(1, &[ok_region]));
        let mut r = env.raw();
        let _ = r.send_fds(&msg[..cut], &[]);
        if cut == 6 {
            // While this connection sits half-written, the other volume must not notice.
            env.other_io("while a half header sits on the abused socket");
        }
        drop(r);
        env.check(&format!("a disconnect after {cut} bytes of a message"));
    }
    let r = env.raw();
    drop(r);
    env.check("a connection closed without a byte");
    // A disconnect in the middle of a set-up ring with requests in flight is the normal
    // reconnect case (tests/tests/vhost_user.rs); here: abandon an owned, featured connection.
    let r = env.owned();
    drop(r);
    env.check("an abandoned owned connection");

    // Every abusive connection really reached the device (it was accepted and served).
    let devs = env.daemon.json(&["devices"]).unwrap();
    let a = devs.as_array().and_then(|v| v.iter().find(|d| d["volume"] == "a")).cloned().unwrap_or_default();
    let served = a["stats"]["connections"].as_u64().unwrap_or_else(|| panic!("no connection count in {devs}"));
    assert!(served >= env.conns, "the device served {served} connections, the test made {}", env.conns);
    let log = env.daemon.log_tail();
    assert!(!log.contains("panicked"), "the daemon logged a panic:\n{log}");
}

/// Queue 0's rings in the second half of the 1 MiB region at `uaddr`, then a kick, and half a
/// second for the daemon to act on it (replies and errors ignored: the caller checks the daemon).
fn ring_in_second_half_and_kick(r: &mut Raw, uaddr: u64) {
    let _ = r.msg(SET_VRING_NUM, &vring_state(0, 256), &[]);
    let _ = r.msg(SET_VRING_ADDR, &vring_addr(0, uaddr + 0x80000, uaddr + 0x90000, uaddr + 0x88000), &[]);
    let _ = r.msg(SET_VRING_BASE, &vring_state(0, 0), &[]);
    let (kick, call) = (eventfd(), eventfd());
    let _ = r.msg(SET_VRING_CALL, &u64p(0), &[call.as_raw_fd()]);
    let _ = r.msg(SET_VRING_KICK, &u64p(0), &[kick.as_raw_fd()]);
    // SAFETY: writes 8 bytes from a valid u64 to our eventfd: a kick.
    unsafe { libc::write(kick.as_raw_fd(), [1u64].as_ptr().cast(), 8) };
    std::thread::sleep(Duration::from_millis(500));
}

/// A memory table whose region is larger than the fd behind it, and a vring placed in the part
/// past the fd's end. vm-memory 0.18 maps such a region without checking the fd's size, and the
/// first access past the end — `SET_VRING_ADDR` reads the used index — was a SIGBUS that killed
/// the whole daemon, every volume with it; the backend now refuses the table
/// (`BlkBackend::update_memory`).
#[test]
fn memory_region_larger_than_its_fd_does_not_kill_the_daemon() {
    let mut env = Env::new();
    let fd = memfd(4096);
    let uaddr = 0x7f00_0000_0000u64;
    let mut r = env.owned();
    let _ = r.msg(SET_MEM_TABLE, &mem_table(1, &[(0, MIB, uaddr, 0)]), &[fd.as_raw_fd()]);
    ring_in_second_half_and_kick(&mut r, uaddr);
    drop(r);
    env.check("a memory region larger than its fd");
}

/// A frontend that shrinks a memory region's file once the daemon has mapped it: the daemon
/// seals the memfd against shrinking when it takes the table, so the truncation fails instead
/// of turning the daemon's next access to the ring (a kick) into a SIGBUS that would kill
/// every volume.
#[test]
fn memory_region_file_cannot_shrink_under_the_daemon() {
    let mut env = Env::new();
    let fd = memfd_with(MIB, libc::MFD_ALLOW_SEALING);
    let uaddr = 0x7f00_0000_0000u64;
    let mut r = env.owned();
    r.msg(SET_MEM_TABLE, &mem_table(1, &[(0, MIB, uaddr, 0)]), &[fd.as_raw_fd()]).unwrap();
    // Messages are handled in order: once GET_FEATURES is answered, the table was taken.
    assert!(r.features().is_some(), "the daemon dropped the connection after a valid memory table");
    // SAFETY: fcntl F_GET_SEALS on our own fd.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(seals >= 0 && seals & libc::F_SEAL_SHRINK != 0, "the region's memfd is not sealed against shrinking: seals {seals:#x}");
    // SAFETY: ftruncate on our own fd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) };
    let err = std::io::Error::last_os_error();
    assert_eq!(rc, -1, "a mapped region's memfd shrank under the daemon");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // The rings in the region's last half, past the size the truncation asked for.
    ring_in_second_half_and_kick(&mut r, uaddr);
    drop(r);
    env.check("a frontend trying to shrink a mapped memory region's file");
}
