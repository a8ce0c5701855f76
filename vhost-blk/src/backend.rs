//! The vhost-user backend: one worker thread per virtqueue, each with its own engine
//! [`Queue`](vblk_engine::Queue) whose completion eventfd is a listener in that worker's epoll
//! loop. Guest requests are parsed, submitted straight from guest memory, and completed from
//! the eventfd handler; the worker never blocks on I/O (only the stop/reset/disconnect paths
//! drain).
//!
//! QoS ([`crate::qos`]): each request is admitted by the volume's [`VolumeQos`] before it is
//! started. One that must wait is put back on the avail ring (the queue steps its next-avail
//! index back) and the queue stops taking chains; a timerfd per queue, registered in the same
//! epoll loop as the completion eventfd, is armed for the wait the limiter named, and its
//! expiry resumes the queue. No thread sleeps and nothing polls.

use std::alloc::Layout;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smallvec::SmallVec;
use vblk_engine::{Completion, IoVec, IoVecs, ReqKind, Request, Volume};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::config::{self, BlkConfig};
use crate::inflight::{InflightArea, InflightQueue};
use crate::qos::{self, Admission, Dir, Io, LocalCounts, VolumeQos};
use crate::request::{self, BlkOp, GuestSeg, ParsedRequest, Segs, RequestLimits, STATUS_IOERR, STATUS_OK};
use crate::DeviceStats;

/// Guest memory with a dirty-page log (vhost-user `LOG_SHMFD`): once the frontend has handed
/// over a log (`SET_LOG_BASE`, live migration), every write through vm-memory (used ring, status
/// bytes, copies out of bounce buffers) marks its pages; writes the device makes behind
/// vm-memory's back (io_uring reads straight into guest buffers) are marked by
/// [`BlkBackend::on_completion`].
pub(crate) type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
pub(crate) type Gm = GuestMemoryAtomic<GuestMem>;
pub(crate) type Vring = VringRwLock<Gm>;
type MemGuard = GuestMemoryLoadGuard<GuestMem>;

/// Buffers must be aligned to this (address and length) for the engine's O_DIRECT I/O;
/// anything else goes through a bounce buffer.
const DIO_ALIGN: usize = 512;
/// Alignment of bounce buffers.
const BOUNCE_ALIGN: usize = 4096;

/// Device state that outlives connections.
pub(crate) struct DevShared {
    pub name: String,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Volume size in bytes (updated when the volume grows).
    pub size_bytes: AtomicU64,
    pub stats: StatsCounters,
    pub connected: AtomicBool,
    /// The volume: taken (dropped, which detaches it) by `Device::stop`.
    pub volume: Mutex<Option<Volume>>,
    /// The volume's QoS, shared by all queues (and owned by the daemon across attachments).
    pub qos: Arc<VolumeQos>,
    /// The connected frontend's backend request channel (BACKEND_REQ negotiated), for
    /// telling it that the configuration changed (the volume grew).
    pub backend_req: Mutex<Option<vhost::vhost_user::Backend>>,
    /// Config-change notification thread state: (a thread is sending, another grow came
    /// meanwhile). At most one thread per device, however often the volume grows.
    pub cfg_notify: Mutex<(bool, bool)>,
    /// Worker threads per connection (at most one per queue).
    pub threads: u16,
    /// Register guest memory as io_uring fixed buffers (`DeviceConfig::pin_memory`).
    pub pin_memory: bool,
    /// The logical block size advertised (`Volume::logical_block_size`).
    pub blk_size: u32,
    /// The cache mode the driver last chose through the configuration space (`CONFIG_WCE`;
    /// true, write-back, until one does). It outlives connections and device resets: QEMU's
    /// vhost-user-blk reads the configuration space once and from then on shows the guest its
    /// own copy, with the last value written, also after it reconnects to a restarted daemon
    /// process's device or the guest reboots. A device that went back to write-back there
    /// would lose writes a guest that still sees write-through never flushes.
    pub guest_writeback: AtomicBool,
    /// Told of every change of `guest_writeback` (the daemon records it with the attachment).
    pub on_cache_mode: Option<Box<dyn Fn(bool) + Send + Sync>>,
}

impl DevShared {
    /// The volume grew: tell the frontend from a thread of its own (the frontend acknowledges
    /// the message, and one that does not answer (stopped, hung) must not hang the resize that
    /// called us). While a notification is in flight, further grows only mark that another
    /// is due; the same thread sends it, so a silent frontend holds one thread, not one per
    /// resize.
    pub fn config_changed(self: &Arc<Self>) {
        {
            let mut st = lock(&self.cfg_notify);
            if st.0 {
                st.1 = true;
                return;
            }
            *st = (true, false);
        }
        let d = self.clone();
        let spawned = std::thread::Builder::new().name("vblk-cfgchg".into()).spawn(move || loop {
            if d.notify_config_change() {
                tracing::debug!(volume = %d.name, "frontend notified of the new size");
            }
            let mut st = lock(&d.cfg_notify);
            if !st.1 {
                st.0 = false;
                return;
            }
            st.1 = false;
        });
        if let Err(e) = spawned {
            *lock(&self.cfg_notify) = (false, false);
            tracing::warn!(error = %e, "cannot start the config-change notification thread");
        }
    }

    /// Tell the connected frontend that the configuration space changed, if it gave us a
    /// channel for that. Returns whether a notification was sent.
    pub fn notify_config_change(&self) -> bool {
        let Some(b) = lock(&self.backend_req).clone() else { return false };
        match b.send_config_change() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "config-change notification failed");
                false
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct StatsCounters {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_ids: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    pub connections: AtomicU64,
}

impl StatsCounters {
    pub fn snapshot(&self) -> DeviceStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceStats {
            requests: g(&self.requests),
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            get_ids: g(&self.get_ids),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            connections: g(&self.connections),
        }
    }

    fn record(&self, kind: Kind, bytes: u64, ok: bool) {
        let add = |a: &AtomicU64, v: u64| {
            a.fetch_add(v, Ordering::Relaxed);
        };
        add(&self.requests, 1);
        if !ok {
            add(&self.errors, 1);
        }
        match kind {
            Kind::Read => {
                add(&self.reads, 1);
                if ok {
                    add(&self.bytes_read, bytes);
                }
            }
            Kind::Write => {
                add(&self.writes, 1);
                if ok {
                    add(&self.bytes_written, bytes);
                }
            }
            Kind::Flush => add(&self.flushes, 1),
            Kind::Discard => add(&self.discards, 1),
            Kind::WriteZeroes => add(&self.write_zeroes, 1),
            Kind::GetId => add(&self.get_ids, 1),
            Kind::Invalid => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    Invalid,
}

/// An engine queue that may move between threads.
struct EngineQueue(vblk_engine::Queue);

// SAFETY: `vblk_engine::Queue` is !Send only because it stores raw iovec pointers of in-flight
// requests. Those point into guest memory (kept mapped by the in-flight chain's memory guard)
// or into bounce buffers owned by the chain, not into thread-local data; its io_uring is set
// up without SINGLE_ISSUER / DEFER_TASKRUN, so it may be entered from any thread. Every access
// goes through the `Mutex<QueueWorker>` that owns it, so it is never used concurrently.
unsafe impl Send for EngineQueue {}

/// A 4096-aligned heap buffer for requests whose guest buffers are not O_DIRECT-aligned.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), BOUNCE_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(p).map(|ptr| AlignedBuf { ptr, layout })
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialised (zeroed) allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: AlignedBuf uniquely owns its heap allocation (like a Box<[u8]>).
unsafe impl Send for AlignedBuf {}

/// A bounce buffer and the guest segments it stands for.
struct Bounce {
    buf: AlignedBuf,
    len: usize,
    segs: Segs,
    /// The request's bytes, counted in the queue's `bounce_bytes` while it is in flight.
    bytes: usize,
}

/// A descriptor chain being served.
struct Chain {
    head: u16,
    status_addr: Option<GuestAddress>,
    used_len: u32,
    kind: Kind,
    bytes: u64,
    /// Engine requests not yet completed.
    parts: u32,
    /// First engine error.
    err: Option<i32>,
    /// Writethrough mode: issue a flush once the data parts succeeded.
    flush_after: bool,
    /// Read bounce buffer to copy back on completion (write bounces only need to live).
    bounce: Option<Box<Bounce>>,
    /// Keeps the guest memory this chain's buffers point into mapped until it completes.
    mem: MemGuard,
    /// Guest buffers the engine writes into directly (a read without a bounce buffer): marked
    /// dirty in the migration log when the chain completes.
    dma: Segs,
}

// Chains are moved into and out of their slot: at most 128 bytes, x86-64 moves them inline
// instead of calling memcpy (1.9% of the daemon's CPU for 4 KiB reads when chain, parsed
// request and engine request were 192, 152 and 80 bytes).
const _: () = assert!(std::mem::size_of::<Chain>() <= 128);

/// A one-shot CLOCK_MONOTONIC timerfd (non-blocking: an expiry read after a re-arm must not
/// block the queue thread) that resumes a queue held back by QoS.
struct QosTimer {
    fd: OwnedFd,
}

impl QosTimer {
    fn new() -> io::Result<QosTimer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(QosTimer { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Expire once after `after` (0 disarms).
    fn set(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: after.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_nsec: after.subsec_nanos().into(),
            },
        };
        // SAFETY: spec is a valid itimerspec for the duration of the call; old_value may be null.
        let r = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consume an expiry, if any (so the level-triggered epoll stops reporting it).
    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into n; the fd is non-blocking (EAGAIN when not expired).
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Per-virtqueue state, owned by that queue's worker thread (and by the control thread during
/// stop/reset).
struct QueueWorker {
    index: u16,
    engine: EngineQueue,
    /// The vring, captured from the first event (the stop hook does not get it).
    vring: Option<Vring>,
    slots: Vec<Option<Chain>>,
    free: Vec<usize>,
    inflight: usize,
    /// Chains in flight at most (the queue size).
    limit: usize,
    /// Stopped taking new chains because `limit` was reached; resumed on completions.
    throttled: bool,
    comps: Vec<Completion>,
    /// This queue's id towards the QoS limiters (its place in their lines).
    qos_id: u64,
    /// Resumes the queue after a QoS wait.
    timer: QosTimer,
    /// Held back by QoS: the timer is armed and only its expiry resumes the queue.
    qos_waiting: bool,
    /// When the current QoS wait started (qos::now_ns), for the throttled-time counter.
    qos_since: Option<u64>,
    /// Requests admitted since the counters were last published.
    qos_counts: LocalCounts,
    /// This queue's region of the inflight area (INFLIGHT_SHMFD), once the queue started.
    track: Option<InflightQueue>,
    /// The ring was started on the inflight area (or found none); cleared when it stops.
    tracked: bool,
    /// Heads an earlier backend left in flight, run before new chains (oldest first).
    resubmit: std::collections::VecDeque<u16>,
    /// With `pin_memory`: the guest memory map registered with the engine queue's ring as
    /// fixed buffers, held so that its mappings stay in place while registered (a range
    /// unmapped and mapped again would otherwise meet a stale registration).
    pinned: Option<MemGuard>,
    /// Registering failed (logged once); the queue runs without fixed buffers.
    pin_failed: bool,
    /// A large bounce buffer kept for the next request that needs one (see `bounce_buf`).
    spare: Option<AlignedBuf>,
    /// Bytes of the bounce buffers of the chains in flight (see [`BOUNCE_BUDGET`]).
    bounce_bytes: usize,
}

/// Bounce buffers a queue has in flight before it holds further requests that need one back
/// (in the avail ring, until completions free some). One request alone always goes, so a queue
/// holds at most this plus one request (`seg_max × size_max`). Without it a guest sending
/// unaligned buffers could make the daemon allocate queue size × `seg_max × size_max` bytes.
const BOUNCE_BUDGET: usize = 64 << 20;

/// Bounce buffers from this size up are kept for reuse, one per queue: the heap hands out
/// blocks of 256 KiB and more as fresh mappings (`M_MMAP_THRESHOLD` in the daemon), so every
/// such request cost an mmap, page faults on every page and a munmap.
const SPARE_MIN: usize = 256 << 10;
/// ... up to this size (a queue keeps at most this much resident for it).
const SPARE_MAX: usize = 4 << 20;

impl QueueWorker {
    /// A bounce buffer of at least `len` bytes (its first `len` bytes are the request's; a
    /// reused buffer holds an earlier request's data of this queue, which the request
    /// overwrites before anything reads it: a read is copied back only when the engine filled
    /// all of it, a write's data is copied in from the guest first).
    fn bounce_buf(&mut self, len: usize) -> Option<AlignedBuf> {
        if len >= SPARE_MIN {
            if let Some(b) = self.spare.take_if(|b| b.as_slice().len() >= len) {
                return Some(b);
            }
        }
        AlignedBuf::new(len)
    }

    /// Keep a finished request's bounce buffer for reuse if it is in the kept size range and
    /// larger than the one kept.
    fn recycle(&mut self, b: AlignedBuf) {
        let n = b.as_slice().len();
        if (SPARE_MIN..=SPARE_MAX).contains(&n) && self.spare.as_ref().is_none_or(|s| s.as_slice().len() < n) {
            self.spare = Some(b);
        }
    }

    /// The ring stopped: its inflight region is taken up again when it starts.
    fn stop_tracking(&mut self) {
        self.track = None;
        self.tracked = false;
        self.resubmit.clear();
    }

    fn alloc(&mut self, c: Chain) -> usize {
        self.inflight += 1;
        if let Some(b) = &c.bounce {
            self.bounce_bytes += b.bytes;
        }
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(c);
                i
            }
            None => {
                self.slots.push(Some(c));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, slot: usize) -> Option<Chain> {
        let c = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.inflight -= 1;
        if let Some(b) = &c.bounce {
            self.bounce_bytes -= b.bytes;
        }
        Some(c)
    }
}

/// What to do with chains completed while draining.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DrainMode {
    /// Put them on the used ring and notify (stop, disconnect).
    Post,
    /// Forget them (device reset: the rings are being reinitialised).
    Discard,
}

/// The vhost-user backend of one connection.
pub(crate) struct BlkBackend {
    dev: Arc<DevShared>,
    mem: Gm,
    queues: Vec<Mutex<QueueWorker>>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    /// Exit eventfds handed to vhost-user-backend (see `exit_event`), closed on drop.
    exit_fds: Mutex<Vec<RawFd>>,
    /// The frontend's inflight area (GET/SET_INFLIGHT_FD), if it uses one.
    inflight: Mutex<Option<Arc<InflightArea>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another holder cannot leave the queue state inconsistent enough to matter
    // more than stopping the device would: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlkBackend {
    /// A backend for one connection, with one engine queue per virtqueue.
    pub fn new(dev: Arc<DevShared>, mem: Gm) -> Result<BlkBackend, crate::Error> {
        let mut queues = Vec::new();
        {
            let vol = lock(&dev.volume);
            let Some(vol) = vol.as_ref() else {
                return Err(vblk_engine::Error::NoSuchVolume(dev.name.clone()).into());
            };
            for i in 0..dev.num_queues {
                queues.push(Mutex::new(QueueWorker {
                    index: i,
                    engine: EngineQueue({
                        let mut e = vol.open_queue()?;
                        // device.rs registers the completion fd edge-triggered.
                        e.set_edge_triggered();
                        e
                    }),
                    vring: None,
                    slots: Vec::new(),
                    free: Vec::new(),
                    inflight: 0,
                    limit: usize::from(dev.queue_size),
                    throttled: false,
                    comps: Vec::new(),
                    qos_id: qos::new_requester_id(),
                    timer: QosTimer::new().map_err(crate::Error::Io)?,
                    qos_waiting: false,
                    qos_since: None,
                    qos_counts: LocalCounts::default(),
                    track: None,
                    tracked: false,
                    resubmit: Default::default(),
                    pinned: None,
                    pin_failed: false,
                    spare: None,
                    bounce_bytes: 0,
                }));
            }
        }
        let writeback = AtomicBool::new(dev.guest_writeback.load(Ordering::Relaxed));
        Ok(BlkBackend {
            dev,
            mem,
            queues,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            writeback,
            exit_fds: Mutex::new(Vec::new()),
            inflight: Mutex::new(None),
        })
    }

    /// Worker threads serving this connection's queues: queue `q` is served by thread
    /// `q % threads` (each queue by one thread; a thread may serve several).
    pub fn threads(&self) -> u16 {
        self.dev.threads.clamp(1, self.dev.num_queues.max(1))
    }

    /// The queue that is the `local`-th one of worker `thread`, if any.
    pub fn queue_of(&self, thread: usize, local: usize) -> Option<usize> {
        let q = thread + local * usize::from(self.threads());
        (q < usize::from(self.dev.num_queues)).then_some(q)
    }

    /// Event id of the completion eventfd of a worker's `local`-th queue in its epoll loop
    /// (ids up to num_queues are vhost-user-backend's: kicks by local index, then its own).
    pub fn completion_event_id(&self, local: usize) -> u64 {
        u64::from(self.dev.num_queues) + 1 + 2 * local as u64
    }

    /// The engine completion eventfd of queue `i`.
    pub fn completion_fd(&self, i: usize) -> Option<RawFd> {
        self.queues.get(i).map(|q| lock(q).engine.0.event_fd())
    }

    /// Event id of the QoS timerfd of a worker's `local`-th queue.
    pub fn timer_event_id(&self, local: usize) -> u64 {
        u64::from(self.dev.num_queues) + 2 + 2 * local as u64
    }

    /// The QoS timerfd of queue `i`.
    pub fn timer_fd(&self, i: usize) -> Option<RawFd> {
        self.queues.get(i).map(|q| lock(q).timer.fd.as_raw_fd())
    }

    pub fn config(&self) -> BlkConfig {
        BlkConfig::new(
            self.dev.size_bytes.load(Ordering::Acquire),
            self.dev.num_queues,
            self.dev.queue_size,
            self.writeback.load(Ordering::Relaxed),
        )
        .with_blk_size(self.dev.blk_size)
    }

    /// After the connection ended (workers gone): finish every in-flight request, completing it
    /// on its used ring (best effort: the ring memory is still mapped, and a frontend that
    /// reconnects reads the used index back).
    pub fn disconnect(&self) {
        lock(&self.dev.backend_req).take();
        for q in &self.queues {
            self.drain(&mut lock(q), DrainMode::Post);
        }
    }

    fn limits(&self, q: &QueueWorker) -> RequestLimits {
        RequestLimits::new(q.engine.0.size_bytes(), self.dev.read_only, self.dev.queue_size)
            .negotiated(self.acked_features.load(Ordering::Relaxed))
    }

    /// Take available chains (kick), until the ring is empty, `limit` chains are in flight, or
    /// QoS holds the next one back.
    fn process_avail(&self, q: &mut QueueWorker, vring: &Vring) {
        if q.qos_waiting {
            // Only the timer resumes a queue QoS holds back (a kick may still slip in).
            return;
        }
        q.throttled = false;
        let limits = self.limits(q);
        // Checked once per pass: a volume without limits or group pays nothing more.
        let qos = Some(&*self.dev.qos).filter(|q| q.is_active());
        let mut qos_wait = None;
        let mut vr = vring.get_mut();
        if !vr.get_queue().ready() {
            return;
        }
        // Loaded with the vring held, after the ring setup it may depend on.
        let mut mem = self.mem.memory();
        self.pin(q, &mem);
        let mut added = false;
        loop {
            if let Err(e) = vr.disable_notification() {
                tracing::warn!(queue = q.index, error = %e, "disable_notification failed");
            }
            // One io_uring_enter per few requests of this pass, not one per request.
            q.engine.0.plug();
            // Chains an earlier backend left in flight go first (admitted by QoS then).
            while let Some(head) = q.resubmit.pop_front() {
                if q.inflight >= q.limit {
                    q.resubmit.push_front(head);
                    q.throttled = true;
                    break;
                }
                let queue = vr.get_queue();
                let descs = request::chain_at(&*mem, GuestAddress(queue.desc_table()), queue.size(), head);
                let parsed = request::parse_descriptors(&*mem, head, descs, &limits);
                added |= self.start(q, &mut vr, &mem, parsed);
            }
            // One parsed request is held back while the next one is parsed: its map-cache
            // entry is prefetched first, so the lookup's memory latency overlaps with this
            // one's submission instead of stalling the thread (see `Queue::prefetch`).
            let mut held: Option<request::ParsedRequest> = None;
            loop {
                if q.inflight + usize::from(held.is_some()) >= q.limit {
                    q.throttled = true;
                    break;
                }
                let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    if let Some(p) = held.take() {
                        added |= self.start(q, &mut vr, &mem, p);
                    }
                    // With a map older than the ring's memory the avail index is unreadable;
                    // enable_notification (on the current map) would then see chains and come
                    // back here forever. Retry once with the current map.
                    if self.refresh_mem(&mut mem) {
                        self.pin(q, &mem);
                        continue;
                    }
                    break;
                };
                // The frontend may have added a memory region (ADD_MEM_REG, acknowledged) and
                // then published this chain after `mem` was loaded: this thread can be preempted
                // between the load and the pop. A chain seen in the ring was published after
                // every region it may use, so a map loaded now has them all. If the map changed,
                // step back over the chain and take it again with the new map (a chain parsed
                // with the old one would fail with "guest memory not mapped"). A held request
                // was parsed with the old map and starts with it.
                if !self.mem_current(&mem) {
                    if let Some(p) = held.take() {
                        added |= self.start(q, &mut vr, &mem, p);
                    }
                    self.refresh_mem(&mut mem);
                    self.pin(q, &mem);
                    drop(chain);
                    let queue = vr.get_queue_mut();
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    continue;
                }
                let parsed = request::parse_request(chain, &limits);
                // A request that needs a bounce buffer beyond the queue's budget waits in the
                // ring like one QoS holds back (before QoS counts it); completions resume.
                if let Ok(BlkOp::Read { buf, .. } | BlkOp::Write { buf, .. }) = &parsed.op {
                    let n = buf.len as usize;
                    if q.bounce_bytes > 0 && q.bounce_bytes + n > BOUNCE_BUDGET && needs_bounce(&buf.iov) {
                        let queue = vr.get_queue_mut();
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        q.throttled = true;
                        break;
                    }
                }
                if let Some(io) = qos_io(&parsed) {
                    if let Some(Admission::Wait(d)) = qos.map(|qos| qos.admit(q.qos_id, io)) {
                        // Leave the chain in the ring: step back over it (it was the last one
                        // popped, and nothing was written for it), and stop taking chains.
                        let queue = vr.get_queue_mut();
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        qos_wait = Some(d);
                        break;
                    }
                    q.qos_counts.add(io);
                }
                if let Ok(BlkOp::Read { offset, .. } | BlkOp::Write { offset, .. }) = &parsed.op {
                    q.engine.0.prefetch(*offset);
                }
                if let Some(p) = held.replace(parsed) {
                    added |= self.start(q, &mut vr, &mem, p);
                }
            }
            if let Some(p) = held.take() {
                added |= self.start(q, &mut vr, &mem, p);
            }
            q.engine.0.unplug();
            if q.throttled || qos_wait.is_some() {
                // Notifications stay disabled: completions or the QoS timer resume the queue.
                break;
            }
            match vr.enable_notification() {
                Ok(true) => continue, // more chains arrived meanwhile
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(queue = q.index, error = %e, "enable_notification failed");
                    break;
                }
            }
        }
        if added {
            self.notify(q.index, &mut vr);
        }
        drop(vr);
        if !q.qos_counts.is_empty() {
            self.dev.qos.record(&q.qos_counts);
            q.qos_counts = LocalCounts::default();
        }
        match qos_wait {
            Some(d) => self.qos_wait(q, d),
            None => self.qos_resumed(q),
        }
    }

    /// The queue runs (its first event since it started): take up its region of the inflight
    /// area, and with it the chains an earlier backend left in flight (see [`crate::inflight`]).
    fn start_tracking(&self, q: &mut QueueWorker, vring: &Vring) {
        let Some(area) = lock(&self.inflight).clone() else {
            q.tracked = true;
            return;
        };
        let mut vr = vring.get_mut();
        if !vr.get_queue().ready() {
            return;
        }
        q.tracked = true;
        let Some(mut t) = area.queue(q.index) else { return };
        let mem = self.mem.memory();
        let used = match vr.get_queue().used_idx(&*mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                tracing::warn!(queue = q.index, error = %e, "cannot read the used index: no inflight tracking");
                return;
            }
        };
        if let Some(r) = t.start(vr.get_queue().size(), used) {
            if !r.resubmit.is_empty() {
                tracing::info!(volume = %self.dev.name, queue = q.index, requests = r.resubmit.len(), "resubmitting requests in flight when the previous backend ended");
            }
            vr.get_queue_mut().set_next_avail(r.next_avail);
            q.resubmit = r.resubmit.into();
        }
        q.track = Some(t);
    }

    /// An inflight area (GET/SET_INFLIGHT_FD) must be for at most this device's queues, of at
    /// most its queue size.
    fn check_inflight_shape(&self, i: &VhostUserInflight) -> io::Result<()> {
        if i.num_queues > self.dev.num_queues || i.queue_size > self.dev.queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "inflight area for {} queues of {} (device: {} queues of at most {})",
                    i.num_queues, i.queue_size, self.dev.num_queues, self.dev.queue_size
                ),
            ));
        }
        Ok(())
    }

    /// With `pin_memory`, make `mem` the memory registered with the queue's ring as fixed
    /// buffers (once per memory map; requests parsed with `mem` are submitted after this).
    fn pin(&self, q: &mut QueueWorker, mem: &MemGuard) {
        if !self.dev.pin_memory || q.pin_failed || q.pinned.as_ref().is_some_and(|p| std::ptr::eq::<GuestMem>(&**p, &**mem)) {
            return;
        }
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ranges: Vec<(*mut u8, usize)> = mem.iter().map(|r| (r.as_ptr(), r.len() as usize)).collect();
        let t0 = std::time::Instant::now();
        // SAFETY: the ranges are the mappings of `mem`, which `q.pinned` holds (so they stay
        // mapped at these addresses) until the next registration replaces this one or the
        // queue is dropped (closing its ring).
        match unsafe { q.engine.0.register_buffers(&ranges) } {
            Ok(()) => {
                let bytes: usize = ranges.iter().map(|r| r.1).sum();
                tracing::debug!(queue = q.index, bytes, ms = t0.elapsed().as_millis() as u64, "guest memory registered as fixed buffers");
                q.pinned = Some(mem.clone());
            }
            Err(e) => {
                tracing::warn!(volume = %self.dev.name, queue = q.index, error = %e, "cannot register guest memory as fixed buffers; going on without");
                q.pin_failed = true;
                q.pinned = None;
            }
        }
    }

    /// Whether `mem` is the current guest memory map.
    fn mem_current(&self, mem: &MemGuard) -> bool {
        std::ptr::eq::<GuestMem>(&*self.mem.memory(), &**mem)
    }

    /// Replace `mem` with the current guest memory map if the frontend changed it since `mem`
    /// was loaded; returns whether it did.
    fn refresh_mem(&self, mem: &mut MemGuard) -> bool {
        if self.mem_current(mem) {
            return false;
        }
        *mem = self.mem.memory();
        true
    }

    /// QoS holds the queue back for `d`: arm its timer.
    fn qos_wait(&self, q: &mut QueueWorker, d: Duration) {
        if let Err(e) = q.timer.set(d.max(Duration::from_nanos(1))) {
            // Cannot happen with a valid timerfd and duration; without the timer nothing would
            // resume the queue, so stop enforcing rather than stall the guest.
            tracing::error!(queue = q.index, error = %e, "cannot arm the QoS timer; QoS not enforced on this queue");
            return;
        }
        q.qos_waiting = true;
        if q.qos_since.is_none() {
            q.qos_since = Some(qos::now_ns());
            self.dev.qos.record_throttle_start();
        }
    }

    /// The queue is no longer held back by QoS: count the time it was.
    fn qos_resumed(&self, q: &mut QueueWorker) {
        if let Some(since) = q.qos_since.take() {
            self.dev.qos.record_throttled(qos::now_ns().saturating_sub(since));
        }
    }

    /// The QoS timer expired: take chains again.
    fn process_timer(&self, q: &mut QueueWorker, vring: &Vring) {
        q.timer.clear();
        q.qos_waiting = false;
        self.process_avail(q, vring);
    }

    /// Start serving a parsed chain; returns true if it completed at once (used ring updated).
    fn start(
        &self,
        q: &mut QueueWorker,
        vr: &mut VringState<Gm>,
        mem: &MemGuard,
        p: request::ParsedRequest,
    ) -> bool {
        // From here on the chain is this backend's until it is on the used ring.
        if let Some(t) = &mut q.track {
            t.taken(p.head);
        }
        let mut chain = Chain {
            head: p.head,
            status_addr: p.status_addr,
            used_len: p.writable_len,
            kind: Kind::Invalid,
            bytes: 0,
            parts: 0,
            err: None,
            flush_after: false,
            bounce: None,
            mem: mem.clone(),
            dma: Segs::new(),
        };
        let op = match p.op {
            Ok(op) => op,
            Err(e) => {
                tracing::debug!(queue = q.index, head = p.head, req_type = ?p.req_type, error = %e, "request refused");
                self.finish(q, vr, chain, e.status());
                return true;
            }
        };
        let writethrough = !self.writeback.load(Ordering::Relaxed);
        // One engine request, except for DISCARD / WRITE_ZEROES with several ranges.
        let mut reqs: SmallVec<[Request; 1]> = SmallVec::new();
        match op {
            BlkOp::Read { offset, buf } => {
                chain.kind = Kind::Read;
                chain.bytes = buf.len;
                if buf.len > 0 {
                    let iov = if needs_bounce(&buf.iov) {
                        let Some(mut b) = q.bounce_buf(buf.len as usize) else {
                            self.finish(q, vr, chain, STATUS_IOERR);
                            return true;
                        };
                        let iov = smallvec::smallvec![IoVec { ptr: b.as_mut_ptr(), len: buf.len as usize }];
                        chain.bounce = Some(Box::new(Bounce { buf: b, len: buf.len as usize, segs: buf.segs, bytes: buf.len as usize }));
                        iov
                    } else {
                        chain.dma = buf.segs;
                        buf.iov
                    };
                    reqs.push(Request { kind: ReqKind::Read, offset, len: buf.len, iov, tag: 0 });
                }
            }
            BlkOp::Write { offset, buf } => {
                chain.kind = Kind::Write;
                chain.bytes = buf.len;
                chain.flush_after = writethrough;
                if buf.len > 0 {
                    let iov = if needs_bounce(&buf.iov) {
                        let Some(mut b) = q.bounce_buf(buf.len as usize) else {
                            self.finish(q, vr, chain, STATUS_IOERR);
                            return true;
                        };
                        let n = buf.len as usize;
                        if request::read_stream(&**mem, &buf.segs, 0, &mut b.as_mut_slice()[..n]).is_err() {
                            self.finish(q, vr, chain, STATUS_IOERR);
                            return true;
                        }
                        let iov = smallvec::smallvec![IoVec { ptr: b.as_mut_ptr(), len: n }];
                        // Kept alive until completion (the engine reads from it).
                        chain.bounce = Some(Box::new(Bounce { buf: b, len: 0, segs: Segs::new(), bytes: n }));
                        iov
                    } else {
                        buf.iov
                    };
                    reqs.push(Request { kind: ReqKind::Write, offset, len: buf.len, iov, tag: 0 });
                }
            }
            BlkOp::Flush => {
                chain.kind = Kind::Flush;
                reqs.push(Request { kind: ReqKind::Flush, offset: 0, len: 0, iov: IoVecs::new(), tag: 0 });
            }
            BlkOp::GetId { segs } => {
                chain.kind = Kind::GetId;
                let id = request::device_id(&self.dev.name);
                let status = match request::write_stream(&**mem, &segs, &id) {
                    Ok(_) => STATUS_OK,
                    Err(_) => STATUS_IOERR,
                };
                self.finish(q, vr, chain, status);
                return true;
            }
            BlkOp::Discard(ranges) | BlkOp::WriteZeroes(ranges) if ranges.is_empty() => {
                // Nothing to do (zero-length or sub-block discard).
                self.finish(q, vr, chain, STATUS_OK);
                return true;
            }
            BlkOp::Discard(ranges) => {
                chain.kind = Kind::Discard;
                for r in ranges {
                    reqs.push(Request { kind: ReqKind::Discard, offset: r.offset, len: r.len, iov: IoVecs::new(), tag: 0 });
                }
            }
            BlkOp::WriteZeroes(ranges) => {
                chain.kind = Kind::WriteZeroes;
                chain.flush_after = writethrough;
                for r in ranges {
                    reqs.push(Request {
                        kind: ReqKind::WriteZeroes,
                        offset: r.offset,
                        len: r.len,
                        iov: IoVecs::new(),
                        tag: 0,
                    });
                }
            }
        }
        if reqs.is_empty() {
            // A zero-length read or write.
            self.finish(q, vr, chain, STATUS_OK);
            return true;
        }
        chain.parts = reqs.len() as u32;
        let slot = q.alloc(chain);
        for mut r in reqs {
            r.tag = slot as u64;
            // SAFETY: every iovec points either into guest memory resolved against `mem`, which
            // the chain (in q.slots[slot]) keeps mapped, or into the chain's bounce buffer; the
            // chain is released only after all its parts' completions have been reaped.
            unsafe { q.engine.0.submit(r) };
        }
        false
    }

    /// Engine completions are ready (eventfd): complete finished chains, then take more
    /// chains if the queue was throttled.
    fn process_completions(&self, q: &mut QueueWorker, vring: &Vring) {
        let mut comps = std::mem::take(&mut q.comps);
        q.engine.0.reap(&mut comps);
        if !comps.is_empty() {
            let mut vr = vring.get_mut();
            let mut added = false;
            for c in comps.drain(..) {
                added |= self.on_completion(q, Some(&mut vr), c);
            }
            if added {
                self.notify(q.index, &mut vr);
            }
        }
        q.comps = comps;
        if q.throttled && q.inflight < q.limit {
            self.process_avail(q, vring);
        }
    }

    /// Account one engine completion; returns true if its chain was put on the used ring.
    fn on_completion(&self, q: &mut QueueWorker, vr: Option<&mut VringState<Gm>>, c: Completion) -> bool {
        let slot = c.tag as usize;
        let Some(Some(chain)) = q.slots.get_mut(slot) else {
            tracing::warn!(queue = q.index, tag = c.tag, "completion for no request");
            return false;
        };
        if let Err(errno) = c.result {
            chain.err.get_or_insert(errno);
        }
        chain.parts = chain.parts.saturating_sub(1);
        if chain.parts > 0 {
            return false;
        }
        if chain.flush_after && chain.err.is_none() {
            // Writethrough: the data is written; make it durable before completing.
            chain.flush_after = false;
            chain.parts = 1;
            let r = Request { kind: ReqKind::Flush, offset: 0, len: 0, iov: IoVecs::new(), tag: c.tag };
            // SAFETY: a flush carries no buffers.
            unsafe { q.engine.0.submit(r) };
            return false;
        }
        let Some(mut chain) = q.release(slot) else { return false };
        // Whatever the outcome, the device may have written into the guest's buffers: a live
        // migration must send those pages again (a no-op until the frontend sets up a log).
        mark_dirty(&chain.mem, &chain.dma);
        let mut status = STATUS_OK;
        let bounce = chain.bounce.take();
        if let Some(errno) = chain.err {
            tracing::debug!(queue = q.index, head = chain.head, errno, kind = ?chain.kind, "request failed");
            status = STATUS_IOERR;
        } else if let Some(b) = &bounce {
            if b.len > 0 && request::write_stream(&*chain.mem, &b.segs, &b.buf.as_slice()[..b.len]).is_err() {
                status = STATUS_IOERR;
            }
        }
        if let Some(b) = bounce {
            q.recycle(b.buf);
        }
        match vr {
            Some(vr) => {
                self.finish(q, vr, chain, status);
                true
            }
            None => {
                self.dev.stats.record(chain.kind, chain.bytes, status == STATUS_OK);
                false
            }
        }
    }

    /// Write the status byte and put the chain on the used ring.
    fn finish(&self, q: &QueueWorker, vr: &mut VringState<Gm>, chain: Chain, status: u8) {
        let (queue, track) = (q.index, q.track.as_ref());
        self.dev.stats.record(chain.kind, chain.bytes, status == STATUS_OK);
        let used_len = match chain.status_addr {
            // One region lookup (vm-memory's `write_obj` on guest memory walks its region
            // iterator, ~1% of the CPU of a 4 KiB read).
            Some(a) => match vm_memory::GuestMemoryBackend::get_slice(&*chain.mem, a, 1)
                .and_then(|b| vm_memory::Bytes::write_obj(&b, status, 0).map_err(vm_memory::GuestMemoryError::from))
            {
                Ok(()) => chain.used_len,
                Err(e) => {
                    tracing::debug!(queue, head = chain.head, error = %e, "cannot write the status byte");
                    0
                }
            },
            None => 0,
        };
        if let Some(t) = track {
            t.before_used(chain.head);
        }
        match vr.add_used(chain.head, used_len) {
            Ok(()) => {
                if let Some(t) = track {
                    t.after_used(chain.head, vr.get_queue().next_used());
                }
            }
            Err(e) => tracing::warn!(queue, head = chain.head, error = %e, "cannot add to the used ring"),
        }
    }

    fn notify(&self, queue: u16, vr: &mut VringState<Gm>) {
        let needed = vr.needs_notification().unwrap_or(true);
        if needed {
            if let Err(e) = vr.signal_used_queue() {
                tracing::warn!(queue, error = %e, "cannot signal the used queue");
            }
        }
    }

    /// Wait for all in-flight requests of a queue (blocking) and complete them.
    fn drain(&self, q: &mut QueueWorker, mode: DrainMode) {
        let vring = if mode == DrainMode::Post { q.vring.clone() } else { None };
        let mut comps = std::mem::take(&mut q.comps);
        loop {
            q.engine.0.drain(&mut comps);
            if comps.is_empty() {
                break;
            }
            let mut guard = vring.as_ref().map(|v| v.get_mut());
            let mut added = false;
            for c in comps.drain(..) {
                added |= self.on_completion(q, guard.as_deref_mut(), c);
            }
            if added {
                if let Some(vr) = guard.as_deref_mut() {
                    self.notify(q.index, vr);
                }
            }
            // Writethrough flushes may have been submitted: drain again.
        }
        q.comps = comps;
        // A QoS wait ends with the ring processing: the chains it held back are still in the
        // avail ring, for whoever processes it next.
        if let Err(e) = q.timer.set(Duration::ZERO) {
            tracing::warn!(queue = q.index, error = %e, "cannot disarm the QoS timer");
        }
        q.timer.clear();
        q.qos_waiting = false;
        self.qos_resumed(q);
        // Anything still tracked has no engine request left (cannot happen): drop it.
        if q.inflight > 0 {
            tracing::warn!(queue = q.index, chains = q.inflight, "chains left after drain");
            for s in 0..q.slots.len() {
                q.release(s);
            }
        }
        q.throttled = false;
    }
}

/// What QoS counts of a request: reads and writes by their data, discard and write-zeroes as
/// writes of no data; flush, GET_ID, no-op discards and refused requests are not limited.
fn qos_io(p: &ParsedRequest) -> Option<Io> {
    match &p.op {
        Ok(BlkOp::Read { buf, .. }) => Some(Io { dir: Dir::Read, bytes: buf.len }),
        Ok(BlkOp::Write { buf, .. }) => Some(Io { dir: Dir::Write, bytes: buf.len }),
        Ok(BlkOp::Discard(r) | BlkOp::WriteZeroes(r)) if !r.is_empty() => Some(Io { dir: Dir::Write, bytes: 0 }),
        _ => None,
    }
}

/// Mark guest segments dirty in the migration log, if the frontend set one up (`SET_LOG_BASE`;
/// the bitmap of each region is empty otherwise and marking does nothing).
fn mark_dirty(mem: &GuestMem, segs: &[GuestSeg]) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    for s in segs {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Every file-backed region must lie within its file, and keep doing so: each file is sealed
/// against shrinking first where it can be (see `update_memory`). Returns how many regions are
/// in files that could not be sealed.
fn check_regions_backed(mem: &GuestMem) -> Result<usize, String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut unsealed = 0;
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            return Err(format!("region at guest address {:#x} has no file", r.start_addr().0));
        };
        // Sealed before the size is read: the size checked is then the size for good.
        if crate::inflight::seal_against_shrinking(fo.file()).is_err() {
            unsealed += 1;
        }
        let size = fo.file().metadata().map_err(|e| format!("fstat of a region's fd: {e}"))?.len();
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|e| e > size) {
            return Err(format!(
                "region at guest address {:#x}: offset {} + size {} is past the end of its file ({} bytes)",
                r.start_addr().0,
                fo.start(),
                r.len(),
                size
            ));
        }
    }
    Ok(unsealed)
}

/// vhost-user-backend's queue masks: worker `t` serves the queues `q` with `q % threads == t`
/// (in ascending order, which is the local index its events carry).
fn thread_masks(num_queues: u16, threads: u16) -> Vec<u64> {
    let t = threads.clamp(1, num_queues.max(1));
    (0..t).map(|thread| (0..num_queues).filter(|q| q % t == thread).fold(0u64, |m, q| m | 1 << q)).collect()
}

fn needs_bounce(iov: &[IoVec]) -> bool {
    iov.iter().any(|v| !(v.ptr as usize).is_multiple_of(DIO_ALIGN) || !v.len.is_multiple_of(DIO_ALIGN))
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // The engine queues drain themselves on drop, before the chains (and the guest memory
        // they keep mapped) go: QueueWorker declares `engine` before `slots`.
        let fds = std::mem::take(&mut *lock(&self.exit_fds));
        for fd in fds {
            // SAFETY: vhost-user-backend 0.24 (pinned to =0.24.0 in Cargo.toml) registers the
            // exit consumer we hand out in its epoll with `into_raw_fd()` and never closes it;
            // the backend is dropped only after every VringEpollHandler holding a clone of it
            // (and so the epoll using the fd) is gone. We are the only closer.
            unsafe { libc::close(fd) };
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.queue_size)
    }

    fn features(&self) -> u64 {
        config::device_features(self.dev.read_only)
    }

    fn acked_features(&self, features: u64) {
        let prev = self.acked_features.swap(features, Ordering::AcqRel);
        // The frontend also sets features on a running device: QEMU toggles VHOST_F_LOG_ALL
        // when a live migration starts and when it is cancelled. That is no renegotiation: the
        // cache mode the guest chose (CONFIG_WCE) stays. 0 = the first negotiation of this
        // connection or since a reset.
        let log_all = 1u64 << config::VHOST_F_LOG_ALL;
        if prev != 0 && prev & !log_all == features & !log_all {
            tracing::debug!(volume = %self.dev.name, log_all = features & log_all != 0, "dirty-page logging switched");
            return;
        }
        // Without FLUSH the device is write-through (virtio 1.2 §5.2.5.2); with CONFIG_WCE too
        // it is in the mode the driver last chose (see `DevShared::guest_writeback`).
        let writeback = features & (1 << VIRTIO_BLK_F_FLUSH) != 0
            && (features & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 || self.dev.guest_writeback.load(Ordering::Relaxed));
        self.writeback.store(writeback, Ordering::Relaxed);
        tracing::debug!(volume = %self.dev.name, features = format_args!("{features:#x}"), writeback, "features acked");
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        // The frontend's channel for our requests: used to announce a grown volume.
        *lock(&self.dev.backend_req) = Some(backend);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // Live migration: the frontend's dirty-page log in shared memory (SET_LOG_BASE);
            // see `GuestMem`.
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn get_inflight_fd(&self, i: &VhostUserInflight) -> io::Result<(VhostUserInflight, std::fs::File)> {
        self.check_inflight_shape(i)?;
        let (area, file) = InflightArea::create(i.num_queues, i.queue_size)?;
        let out = VhostUserInflight { mmap_size: area.bytes() as u64, mmap_offset: 0, num_queues: i.num_queues, queue_size: i.queue_size };
        *lock(&self.inflight) = Some(Arc::new(area));
        tracing::debug!(volume = %self.dev.name, queues = i.num_queues, size = i.queue_size, "inflight area created");
        Ok((out, file))
    }

    fn set_inflight_fd(&self, i: &VhostUserInflight, file: std::fs::File) -> io::Result<()> {
        self.check_inflight_shape(i)?;
        // Only between rings: chains a running ring has in flight are not in a new area, and
        // starting on it would take them again.
        if self.queues.iter().any(|q| lock(q).tracked) {
            tracing::warn!(volume = %self.dev.name, "inflight area refused: a ring is running");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "SET_INFLIGHT_FD while a ring is running"));
        }
        let area = InflightArea::open(file, i.mmap_offset, i.mmap_size, i.num_queues, i.queue_size).inspect_err(|e| {
            tracing::warn!(volume = %self.dev.name, error = %e, "inflight area refused");
        })?;
        *lock(&self.inflight) = Some(Arc::new(area));
        tracing::debug!(volume = %self.dev.name, queues = i.num_queues, size = i.queue_size, "inflight area set");
        Ok(())
    }

    fn reset_device(&self) {
        tracing::debug!(volume = %self.dev.name, "device reset");
        // The frontend drops its inflight area on a reset and asks for a new one. Taken first,
        // so that no worker takes it up again meanwhile.
        lock(&self.inflight).take();
        for q in &self.queues {
            let mut q = lock(q);
            self.drain(&mut q, DrainMode::Discard);
            // The discarded chains were never completed: leave no trace of them in the area.
            if let Some(t) = q.track.as_mut() {
                t.discard();
            }
            q.stop_tracking();
        }
        // The guest's cache mode stays (see `DevShared::guest_writeback`).
        self.writeback.store(self.dev.guest_writeback.load(Ordering::Relaxed), Ordering::Relaxed);
        self.acked_features.store(0, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        // virtio-queue applies it to each vring (the handler calls set_queue_event_idx).
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.config().to_bytes(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let features = self.acked_features.load(Ordering::Relaxed);
        let wce = features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match config::parse_config_write(offset, buf, wce) {
            Ok(v) => {
                tracing::debug!(volume = %self.dev.name, writeback = v, "cache mode set");
                if self.dev.guest_writeback.swap(v == 1, Ordering::Relaxed) != (v == 1) {
                    if let Some(f) = &self.dev.on_cache_mode {
                        f(v == 1);
                    }
                }
                self.writeback.store(v == 1 && features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
                Ok(())
            }
            // Ignored, not refused: an error here makes the vhost crate drop the connection.
            Err(e) => {
                tracing::warn!(volume = %self.dev.name, offset, len = buf.len(), error = %e, "configuration write ignored");
                Ok(())
            }
        }
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the handler just updated; in-flight chains
        // keep the previous mapping alive through their own guard.
        //
        // vm-memory maps a region without checking that its file is large enough: a frontend
        // could describe a region larger than its memfd, and the first access past the file's
        // end (the handler reads the used index on SET_VRING_ADDR) would be a SIGBUS that kills
        // the daemon with every volume. Check every region against its file; on a bad table,
        // swap in an empty memory map (every later guest access then fails cleanly) and refuse.
        // A file that shrank later would do the same: each file is sealed against shrinking
        // (F_SEAL_SHRINK; QEMU's memory-backend-memfd seals its memfds so by default) where it
        // takes seals.
        match check_regions_backed(&mem.memory()) {
            Err(why) => {
                mem.lock().map_err(|_| io::Error::other("guest memory lock poisoned"))?.replace(GuestMem::new());
                tracing::warn!(volume = %self.dev.name, "refused a guest memory table: {why}");
                return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
            }
            Ok(0) => {}
            Ok(n) => tracing::info!(
                volume = %self.dev.name,
                regions = n,
                "guest memory regions in files that cannot be sealed against shrinking (files opened by path, memfds without MFD_ALLOW_SEALING): a frontend that truncated one would crash the daemon"
            ),
        }
        tracing::debug!(volume = %self.dev.name, "guest memory table updated");
        // Queues with pinned memory register the new map now, not at their next request: an
        // idle queue would otherwise keep the old map (memory the frontend may have unplugged)
        // mapped and pinned.
        if self.dev.pin_memory {
            let now = self.mem.memory();
            for q in &self.queues {
                let mut q = lock(q);
                if q.pinned.is_some() {
                    self.pin(&mut q, &now);
                }
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.dev.num_queues, self.threads())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((c, n)) => {
                lock(&self.exit_fds).push(c.as_raw_fd());
                Some((c, n))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create an exit eventfd");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the vring is no longer processed; wait for what it has in flight so
        // the frontend sees every request completed before it reads the ring base.
        if let Some(q) = self.queues.get(queue_index as usize) {
            let mut q = lock(q);
            if q.inflight > 0 {
                tracing::debug!(queue = queue_index, inflight = q.inflight, "draining for vring stop");
            }
            self.drain(&mut q, DrainMode::Post);
            q.stop_tracking();
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, _evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        // Kicks come as the local index of the thread's vring; our own events (completion,
        // QoS timer) as num_queues + 1 + 2 * local (+ 1 for the timer).
        enum Ev {
            Kick,
            Completion,
            Timer,
        }
        let (n, ev) = (u64::from(self.dev.num_queues), u64::from(device_event));
        let (local, what) = match ev {
            e if e < n => (e as usize, Ev::Kick),
            e if e > n => (((e - n - 1) / 2) as usize, if (e - n - 1) % 2 == 0 { Ev::Completion } else { Ev::Timer }),
            _ => return Ok(()),
        };
        let (Some(qm), Some(vring)) = (self.queue_of(thread_id, local).and_then(|i| self.queues.get(i)), vrings.get(local)) else {
            return Ok(());
        };
        let mut q = lock(qm);
        if q.vring.is_none() {
            q.vring = Some(vring.clone());
        }
        if !q.tracked {
            self.start_tracking(&mut q, vring);
        }
        match what {
            Ev::Kick => self.process_avail(&mut q, vring),
            Ev::Completion => self.process_completions(&mut q, vring),
            Ev::Timer => self.process_timer(&mut q, vring),
        }
        // Never return an error: it would end the worker thread.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_spread_over_worker_threads() {
        assert_eq!(thread_masks(4, 4), vec![0b0001, 0b0010, 0b0100, 0b1000]);
        assert_eq!(thread_masks(4, 1), vec![0b1111]);
        assert_eq!(thread_masks(4, 3), vec![0b1001, 0b0010, 0b0100]);
        assert_eq!(thread_masks(16, 2), vec![0x5555, 0xaaaa]);
        assert_eq!(thread_masks(2, 0), vec![0b11], "at least one thread");
        assert_eq!(thread_masks(2, 5), vec![0b01, 0b10], "at most one per queue");
    }

    #[test]
    fn bounce_detection() {
        let mut b = AlignedBuf::new(8192).unwrap();
        let p = b.as_mut_ptr();
        assert_eq!(p as usize % BOUNCE_ALIGN, 0);
        assert!(!needs_bounce(&[IoVec { ptr: p, len: 4096 }, IoVec { ptr: p.wrapping_add(4096), len: 512 }]));
        assert!(needs_bounce(&[IoVec { ptr: p.wrapping_add(1), len: 4096 }]));
        assert!(needs_bounce(&[IoVec { ptr: p, len: 100 }]));
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
