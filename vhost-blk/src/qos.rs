//! Per-volume QoS: token buckets for IOPS and bytes per second (read, write, total), with
//! bursts, shared by a volume's queues and by the volumes of a group, changed live.
//!
//! # Behavior
//!
//! - **Limits.** A [`Limits`] holds up to six [`Limit`]s, one per [`LimitKind`]: `iops-total`,
//!   `iops-read`, `iops-write`, `bps-total`, `bps-read`, `bps-write` (bytes per second). Each
//!   is a bucket of `burst` units (ops or bytes; by default `rate / 10`, i.e. 100 ms worth)
//!   that drains at `rate` units per second; a request is admitted when its cost fits in every
//!   bucket that applies to it, and then fills them. So over **any** window of `W` seconds a
//!   bucket admits at most `rate × W + burst` units (exactly: no rounding in the admission
//!   test, see the property tests below). With `burst_secs`, a second bucket limits the peak:
//!   the burst is then spread over `burst_secs` seconds (at most `rate + burst / burst_secs`
//!   units/s); without it the burst is served as fast as the device goes.
//! - **What counts.** Reads are reads; writes, discards and write-zeroes are writes. A read or
//!   write costs one op and its data bytes; with `iops_size` (QEMU's `iops-size`) a larger
//!   request costs `bytes / iops_size` ops. Discard and write-zeroes cost one op and no bytes
//!   (they move no data). Flush, GET_ID and malformed requests are never held back.
//! - **Oversized requests.** A request whose cost exceeds a bucket's size is admitted when that
//!   bucket is empty (so it is delayed, never refused); the bound above becomes
//!   `rate × W + max(burst, largest request)`.
//! - **Sharing.** A [`VolumeQos`] belongs to one volume; all its queues share it (a mutex per
//!   volume, taken once per request only while the volume has limits or a group: an unlimited
//!   volume pays one atomic load). A volume may also belong to one [`QosGroup`], whose buckets
//!   all its members' queues share; a request must fit both the volume's own limits and the
//!   group's. Locks are always taken volume first, then group.
//! - **Fairness.** Requesters (queues) a limiter turns away line up, first come first served:
//!   each must leave room for the costs of those ahead of it, and leaves the line when
//!   admitted (or [`RESERVATION_GRACE`] after a re-check it missed, e.g. a disconnected
//!   queue). Without that, a queue that keeps the bucket topped up with small requests would
//!   starve one waiting for room for a large request, and a volume that retries first would
//!   starve the other volumes of its group.
//! - **Waiting.** [`VolumeQos::admit`] never blocks: it answers [`Admission::Wait`] with how
//!   long to wait before asking again; the device leaves the request in its virtqueue and arms
//!   a timerfd in the queue's event loop for that long. The wait is at least
//!   [`MIN_RECHECK`] (less only if the bucket holds less than 4 ms worth), so a throttled
//!   queue wakes at most ~1000 times per second while the bucket's headroom keeps the long-run
//!   rate exact; and at most [`MAX_RECHECK`], so a live change of limits or group applies
//!   within that even to a queue already waiting.
//! - **Live changes.** [`VolumeQos::set_limits`] / [`QosGroup::set_limits`] keep the fill of
//!   a bucket whose kind stays limited (capped at the new size), so a change neither hands out
//!   a fresh burst nor forgets debt; a newly limited kind starts empty.
//! - **Metrics.** [`QosStats`]: requests and bytes admitted per direction, and the time queues
//!   spent waiting for QoS (summed over queues) and how often they started to.
//!
//! # Limitations
//!
//! - Fairness between more than two contenders is first-come at each timer expiry, not
//!   round-robin (QEMU throttle groups round-robin between member disks).
//! - Time spent waiting is queue time: `throttled_ns` of a 4-queue device can grow at 4 s/s.
//! - The arithmetic is exact in nano-units; rates are whole units per second and burst lengths
//!   whole seconds (as in QEMU).
//! - Limits apply to guest I/O through the device only; import/export pace themselves with a
//!   [`Pacer`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// One unit (an op or a byte) in the buckets' fixed-point scale: leaking `rate` units per
/// second for `dt` nanoseconds is exactly `rate × dt` nano-units.
const NANO: u128 = 1_000_000_000;

/// Shortest wait handed out when the buckets hold at least 4 ms of their rate (see the module
/// docs): bounds timer wake-ups to about 1000 per second per queue.
pub const MIN_RECHECK: Duration = Duration::from_millis(1);
/// Longest wait handed out: a waiting queue re-checks at least this often, so that limit and
/// group changes apply to it within this time.
pub const MAX_RECHECK: Duration = Duration::from_millis(50);
/// How long a place in a limiter's line outlives its holder's next expected re-check.
pub const RESERVATION_GRACE: Duration = Duration::from_millis(100);

/// Largest rate, in units per second (1 PiB/s; also keeps JSON numbers exact).
pub const MAX_RATE: u64 = 1 << 50;
/// Largest burst, in units.
pub const MAX_BURST: u64 = 1 << 53;
/// Longest burst length, in seconds (one day).
pub const MAX_BURST_SECS: u64 = 86_400;
/// Largest `iops_size`, in bytes.
pub const MAX_IOPS_SIZE: u64 = 1 << 30;

/// Which requests a limit counts, and whether in ops or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitKind {
    IopsTotal,
    IopsRead,
    IopsWrite,
    BpsTotal,
    BpsRead,
    BpsWrite,
}

impl LimitKind {
    pub const ALL: [LimitKind; 6] =
        [LimitKind::IopsTotal, LimitKind::IopsRead, LimitKind::IopsWrite, LimitKind::BpsTotal, LimitKind::BpsRead, LimitKind::BpsWrite];

    /// The name used by the CLI and the persisted settings ("iops-total", ...).
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::IopsTotal => "iops-total",
            LimitKind::IopsRead => "iops-read",
            LimitKind::IopsWrite => "iops-write",
            LimitKind::BpsTotal => "bps-total",
            LimitKind::BpsRead => "bps-read",
            LimitKind::BpsWrite => "bps-write",
        }
    }

    pub fn from_name(s: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Counts bytes (else ops).
    pub fn is_bytes(self) -> bool {
        matches!(self, LimitKind::BpsTotal | LimitKind::BpsRead | LimitKind::BpsWrite)
    }

    fn applies_to(self, dir: Dir) -> bool {
        match self {
            LimitKind::IopsTotal | LimitKind::BpsTotal => true,
            LimitKind::IopsRead | LimitKind::BpsRead => dir == Dir::Read,
            LimitKind::IopsWrite | LimitKind::BpsWrite => dir == Dir::Write,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One limit: a bucket of `burst` units draining at `rate_per_sec` units per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Sustained rate, units (ops or bytes) per second; at least 1.
    pub rate_per_sec: u64,
    /// Bucket size in units: what may be done at once beyond the sustained rate. 0 = the
    /// default, `rate_per_sec / 10` (100 ms worth).
    pub burst: u64,
    /// Spread the burst over this many seconds (peak `rate + burst / burst_secs` units/s).
    /// 0 = no peak limit: the burst goes as fast as the device. Needs `burst`.
    pub burst_secs: u64,
}

impl Limit {
    /// A limit of `rate_per_sec` with the default burst.
    pub fn rate(rate_per_sec: u64) -> Limit {
        Limit { rate_per_sec, burst: 0, burst_secs: 0 }
    }

    fn validate(&self, kind: LimitKind) -> Result<(), QosError> {
        let too_large = |what: &'static str, value: u64, max: u64| QosError::TooLarge { kind, what, value, max };
        if self.rate_per_sec == 0 {
            return Err(QosError::ZeroRate { kind });
        }
        if self.rate_per_sec > MAX_RATE {
            return Err(too_large("rate", self.rate_per_sec, MAX_RATE));
        }
        if self.burst > MAX_BURST {
            return Err(too_large("burst", self.burst, MAX_BURST));
        }
        if self.burst_secs > MAX_BURST_SECS {
            return Err(too_large("burst length (s)", self.burst_secs, MAX_BURST_SECS));
        }
        if self.burst_secs > 0 && self.burst == 0 {
            return Err(QosError::BurstSecsWithoutBurst { kind });
        }
        Ok(())
    }
}

/// A set of limits; any may be unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    limits: [Option<Limit>; 6],
    /// Requests larger than this many bytes count as `bytes / iops_size` ops in the IOPS
    /// limits (QEMU's `iops-size`). 0 = every request is one op.
    pub iops_size: u64,
}

impl Limits {
    pub fn get(&self, kind: LimitKind) -> Option<Limit> {
        self.limits[kind.index()]
    }

    pub fn set(&mut self, kind: LimitKind, limit: Option<Limit>) {
        self.limits[kind.index()] = limit;
    }

    /// Builder form of [`Limits::set`].
    pub fn with(mut self, kind: LimitKind, limit: Limit) -> Limits {
        self.set(kind, Some(limit));
        self
    }

    /// The limits that are set.
    pub fn iter(&self) -> impl Iterator<Item = (LimitKind, Limit)> + '_ {
        LimitKind::ALL.into_iter().filter_map(|k| self.get(k).map(|l| (k, l)))
    }

    /// No limit is set (`iops_size` alone limits nothing).
    pub fn is_unlimited(&self) -> bool {
        self.limits.iter().all(Option::is_none)
    }

    pub fn validate(&self) -> Result<(), QosError> {
        for (k, l) in self.iter() {
            l.validate(k)?;
        }
        if self.iops_size > MAX_IOPS_SIZE {
            return Err(QosError::TooLarge { kind: LimitKind::IopsTotal, what: "iops-size", value: self.iops_size, max: MAX_IOPS_SIZE });
        }
        Ok(())
    }
}

/// Invalid QoS settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QosError {
    #[error("{kind}: the rate must be at least 1 (leave the limit unset for no limit)")]
    ZeroRate { kind: LimitKind },
    #[error("{kind}: {what} {value} exceeds the maximum {max}")]
    TooLarge { kind: LimitKind, what: &'static str, value: u64, max: u64 },
    #[error("{kind}: a burst length needs a burst size")]
    BurstSecsWithoutBurst { kind: LimitKind },
}

/// The direction of a guest request, for the read and write limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    Read,
    Write,
}

/// What QoS sees of a request: its direction and data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    pub dir: Dir,
    pub bytes: u64,
}

/// The answer of [`VolumeQos::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (the cost is accounted).
    Go,
    /// Not now: ask again after this long (between [`MIN_RECHECK`]-ish and [`MAX_RECHECK`]).
    Wait(Duration),
}

/// Nanoseconds on the monotonic clock since the first call in this process (the clock
/// timerfds use).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let e = *EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A process-unique id for a requester (a queue), for its place in line (see the module docs).
pub fn new_requester_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Bucket arithmetic (pure: time comes in as nanoseconds)

/// A leaky bucket in nano-units, draining at `num / den` units per second (= nano-units per
/// nanosecond), exactly: the remainder of each leak is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    num: u128,
    den: u128,
    /// Size, nano-units.
    cap: u128,
    /// Fill, nano-units.
    level: u128,
    /// Leak carried over (`< den`), in nano-units × den.
    rem: u128,
}

impl Level {
    fn new(num: u128, den: u128, cap: u128) -> Level {
        debug_assert!(num > 0 && den > 0);
        Level { num, den, cap, level: 0, rem: 0 }
    }

    fn leak(&mut self, dt_ns: u64) {
        if self.level == 0 {
            self.rem = 0;
            return;
        }
        let total = self.num.saturating_mul(u128::from(dt_ns)).saturating_add(self.rem);
        let (q, r) = (total / self.den, total % self.den);
        if q >= self.level {
            self.level = 0;
            self.rem = 0;
        } else {
            self.level -= q;
            self.rem = r;
        }
    }

    /// `cost` fits with `reserved` held back for waiters ahead; an oversized cost fits an
    /// empty bucket when nobody is ahead.
    fn fits(&self, cost: u128, reserved: u128) -> bool {
        self.level + cost + reserved <= self.cap || (reserved == 0 && self.level == 0)
    }

    /// Nanoseconds until [`Level::fits`] holds (0 = now).
    fn wait_ns(&self, cost: u128, reserved: u128) -> u64 {
        if self.fits(cost, reserved) {
            return 0;
        }
        let target = self.cap.saturating_sub(cost + reserved);
        let excess = self.level.saturating_sub(target).max(1);
        // Leaking t ns removes floor((num × t + rem) / den): enough once num × t + rem >= excess × den.
        let need = (excess * self.den).saturating_sub(self.rem);
        u64::try_from(need.div_ceil(self.num)).unwrap_or(u64::MAX).max(1)
    }

    /// Nanoseconds the bucket takes to drain when full.
    fn span_ns(&self) -> u64 {
        u64::try_from((self.cap * self.den).div_ceil(self.num)).unwrap_or(u64::MAX)
    }
}

/// The buckets of one limit: the main one and, with `burst_secs`, the peak one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    main: Level,
    peak: Option<Level>,
}

impl Bucket {
    fn new(l: &Limit) -> Bucket {
        let rate = u128::from(l.rate_per_sec);
        let cap = if l.burst == 0 { rate * NANO / 10 } else { u128::from(l.burst) * NANO };
        let peak = (l.burst_secs > 0).then(|| {
            // Peak rate rate + burst / secs = (rate × secs + burst) / secs; 100 ms of it as slack.
            let secs = u128::from(l.burst_secs);
            let num = rate * secs + u128::from(l.burst);
            Level::new(num, secs, num * NANO / 10 / secs)
        });
        Bucket { main: Level::new(rate, 1, cap), peak }
    }

    /// This bucket for a new limit, keeping the fill of the old one (capped at the new size).
    fn carried_from(l: &Limit, old: &Bucket) -> Bucket {
        let mut b = Bucket::new(l);
        b.main.level = old.main.level.min(b.main.cap);
        if let (Some(p), Some(op)) = (b.peak.as_mut(), old.peak.as_ref()) {
            p.level = op.level.min(p.cap);
        }
        b
    }

    fn leak(&mut self, dt_ns: u64) {
        self.main.leak(dt_ns);
        if let Some(p) = self.peak.as_mut() {
            p.leak(dt_ns);
        }
    }

    fn wait_ns(&self, cost: u128, reserved: u128) -> u64 {
        let w = self.main.wait_ns(cost, reserved);
        match &self.peak {
            Some(p) => w.max(p.wait_ns(cost, reserved)),
            None => w,
        }
    }

    fn add(&mut self, cost: u128) {
        self.main.level += cost;
        if let Some(p) = self.peak.as_mut() {
            p.level += cost;
        }
    }

    /// Shortest time worth sleeping for this bucket: a quarter of its span, at most MIN_RECHECK.
    fn granularity_ns(&self) -> u64 {
        let span = match &self.peak {
            Some(p) => self.main.span_ns().min(p.span_ns()),
            None => self.main.span_ns(),
        };
        (span / 4).clamp(1, MIN_RECHECK.as_nanos() as u64)
    }
}

/// A requester turned away, whose cost those behind it leave room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    id: u64,
    costs: [u128; 6],
    expires_ns: u64,
}

/// Most waiters a limiter remembers (queues of all the volumes sharing it); later ones compete
/// without a place in line.
const MAX_WAITERS: usize = 256;

/// The state of one set of limits (a volume's own, or a group's).
#[derive(Debug, Clone)]
struct Limiter {
    limits: Limits,
    buckets: [Option<Bucket>; 6],
    last_ns: u64,
    /// Requesters turned away, first come first: each must leave room for those ahead of it.
    waiters: VecDeque<Waiter>,
    /// Smallest useful wait over the buckets, ns.
    granularity_ns: u64,
}

impl Limiter {
    /// Empty buckets (so the time they were last leaked does not matter: 0).
    fn new(limits: Limits) -> Limiter {
        let mut l = Limiter { limits: Limits::default(), buckets: [None; 6], last_ns: 0, waiters: VecDeque::new(), granularity_ns: 0 };
        l.set_limits(limits, 0);
        l
    }

    fn set_limits(&mut self, limits: Limits, now_ns: u64) {
        self.leak(now_ns);
        for k in LimitKind::ALL {
            let i = k.index();
            self.buckets[i] = match (limits.get(k), &self.buckets[i]) {
                (Some(l), Some(old)) => Some(Bucket::carried_from(&l, old)),
                (Some(l), None) => Some(Bucket::new(&l)),
                (None, _) => None,
            };
        }
        self.limits = limits;
        self.waiters.clear();
        self.granularity_ns = self.buckets.iter().flatten().map(Bucket::granularity_ns).min().unwrap_or(MIN_RECHECK.as_nanos() as u64);
    }

    fn leak(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        if dt == 0 {
            return;
        }
        self.last_ns = now_ns;
        for b in self.buckets.iter_mut().flatten() {
            b.leak(dt);
        }
    }

    /// What `io` costs in each bucket (0 where there is none or it does not apply).
    fn costs(&self, io: Io) -> [u128; 6] {
        let mut c = [0u128; 6];
        for k in LimitKind::ALL {
            if self.buckets[k.index()].is_none() || !k.applies_to(io.dir) {
                continue;
            }
            c[k.index()] = if k.is_bytes() {
                u128::from(io.bytes) * NANO
            } else if self.limits.iops_size > 0 && io.bytes > self.limits.iops_size {
                (u128::from(io.bytes) * NANO).div_ceil(u128::from(self.limits.iops_size))
            } else {
                NANO
            };
        }
        c
    }

    /// Nanoseconds until `costs` fit (0 = now) for requester `id`, leaving room for the
    /// waiters ahead of it; when they do not fit, `id` gets (or keeps) its place in line.
    fn check(&mut self, id: u64, costs: &[u128; 6], now_ns: u64) -> u64 {
        self.waiters.retain(|w| w.expires_ns > now_ns);
        let pos = self.waiters.iter().position(|w| w.id == id);
        let mut reserved = [0u128; 6];
        for w in self.waiters.iter().take(pos.unwrap_or(self.waiters.len())) {
            for (r, c) in reserved.iter_mut().zip(&w.costs) {
                *r += c;
            }
        }
        let mut wait = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            if let Some(b) = b {
                // Others' places in line only matter in the buckets this request needs too.
                if costs[i] > 0 {
                    wait = wait.max(b.wait_ns(costs[i], reserved[i]));
                }
            }
        }
        if wait > 0 {
            let next_check = wait.clamp(1, MAX_RECHECK.as_nanos() as u64);
            let expires_ns = now_ns.saturating_add(next_check).saturating_add(RESERVATION_GRACE.as_nanos() as u64);
            let me = Waiter { id, costs: *costs, expires_ns };
            match pos {
                Some(p) => self.waiters[p] = me,
                None if self.waiters.len() < MAX_WAITERS => self.waiters.push_back(me),
                None => {}
            }
        }
        wait
    }

    fn commit(&mut self, id: u64, costs: &[u128; 6]) {
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if let Some(b) = b {
                if costs[i] > 0 {
                    b.add(costs[i]);
                }
            }
        }
        if let Some(p) = self.waiters.iter().position(|w| w.id == id) {
            self.waiters.remove(p);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent (plain arithmetic): keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long to wait before re-asking, from the exact wait and the buckets' granularity.
fn recheck_after(wait_ns: u64, granularity_ns: u64) -> Duration {
    Duration::from_nanos(wait_ns.max(granularity_ns).min(MAX_RECHECK.as_nanos() as u64))
}

// ---------------------------------------------------------------------------------------------
// Groups and volumes

/// Limits shared by several volumes (e.g. one tenant's disks). The daemon names groups; this
/// is only their buckets.
#[derive(Debug)]
pub struct QosGroup {
    state: Mutex<Limiter>,
}

impl QosGroup {
    pub fn new(limits: Limits) -> Result<Arc<QosGroup>, QosError> {
        limits.validate()?;
        Ok(Arc::new(QosGroup { state: Mutex::new(Limiter::new(limits)) }))
    }

    /// Change the limits live (see the module docs).
    pub fn set_limits(&self, limits: Limits) -> Result<(), QosError> {
        limits.validate()?;
        lock(&self.state).set_limits(limits, now_ns());
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        lock(&self.state).limits
    }
}

/// Counters of a [`VolumeQos`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosStats {
    /// Requests and data bytes admitted, by direction (discard and write-zeroes are writes).
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Time queues spent waiting for QoS, summed over queues.
    pub throttled_ns: u64,
    /// Times a queue started waiting.
    pub throttle_events: u64,
}

#[derive(Debug, Default)]
struct StatCounters {
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    throttled_ns: AtomicU64,
    throttle_events: AtomicU64,
}

/// Counts a queue gathers locally and adds to its volume's counters once per batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalCounts {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

impl LocalCounts {
    pub fn add(&mut self, io: Io) {
        match io.dir {
            Dir::Read => {
                self.read_ops += 1;
                self.read_bytes += io.bytes;
            }
            Dir::Write => {
                self.write_ops += 1;
                self.write_bytes += io.bytes;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == LocalCounts::default()
    }
}

struct VolState {
    own: Limiter,
    group: Option<Arc<QosGroup>>,
}

/// The QoS of one volume: its own limits, its group, its counters. Shared by every queue of
/// the volume's device (and kept by the daemon across attachments).
pub struct VolumeQos {
    state: Mutex<VolState>,
    /// Own limits set or in a group: requests must be admitted. Read without the lock.
    active: AtomicBool,
    stats: StatCounters,
}

impl std::fmt::Debug for VolumeQos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeQos").field("limits", &self.limits()).field("grouped", &self.group().is_some()).finish()
    }
}

impl VolumeQos {
    pub fn new(limits: Limits) -> Result<Arc<VolumeQos>, QosError> {
        limits.validate()?;
        let q = VolumeQos {
            active: AtomicBool::new(!limits.is_unlimited()),
            state: Mutex::new(VolState { own: Limiter::new(limits), group: None }),
            stats: StatCounters::default(),
        };
        Ok(Arc::new(q))
    }

    /// No limits, no group.
    pub fn unlimited() -> Arc<VolumeQos> {
        Arc::new(VolumeQos {
            active: AtomicBool::new(false),
            state: Mutex::new(VolState { own: Limiter::new(Limits::default()), group: None }),
            stats: StatCounters::default(),
        })
    }

    fn update_active(&self, st: &VolState) {
        self.active.store(!st.own.limits.is_unlimited() || st.group.is_some(), Ordering::Release);
    }

    /// Change the volume's own limits live.
    pub fn set_limits(&self, limits: Limits) -> Result<(), QosError> {
        self.set_limits_with(limits, now_ns)
    }

    /// [`VolumeQos::set_limits`] at a given time (tests, with [`VolumeQos::admit_at`]).
    pub fn set_limits_at(&self, limits: Limits, now_ns: u64) -> Result<(), QosError> {
        self.set_limits_with(limits, || now_ns)
    }

    fn set_limits_with(&self, limits: Limits, clock: impl FnOnce() -> u64) -> Result<(), QosError> {
        limits.validate()?;
        let mut st = lock(&self.state);
        st.own.set_limits(limits, clock());
        self.update_active(&st);
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        lock(&self.state).own.limits
    }

    /// Join a group (replacing any other) or leave it (`None`).
    pub fn set_group(&self, group: Option<Arc<QosGroup>>) {
        let mut st = lock(&self.state);
        st.group = group;
        self.update_active(&st);
    }

    pub fn group(&self) -> Option<Arc<QosGroup>> {
        lock(&self.state).group.clone()
    }

    /// Requests must go through [`VolumeQos::admit`] (else they may skip it).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// May `requester` (a queue, see [`new_requester_id`]) start `io` now? On [`Admission::Go`]
    /// its cost is accounted. Never blocks beyond the two short locks.
    pub fn admit(&self, requester: u64, io: Io) -> Admission {
        self.admit_with(requester, io, now_ns)
    }

    /// [`VolumeQos::admit`] at a given time (tests, simulations): `now_ns` must not go back.
    pub fn admit_at(&self, requester: u64, io: Io, now_ns: u64) -> Admission {
        self.admit_with(requester, io, || now_ns)
    }

    fn admit_with(&self, requester: u64, io: Io, clock: impl FnOnce() -> u64) -> Admission {
        let mut st = lock(&self.state);
        let VolState { own, group } = &mut *st;
        let mut g = group.as_ref().map(|g| lock(&g.state));
        // Read the clock under the locks so that it never goes back for a limiter.
        let now = clock();
        own.leak(now);
        let own_costs = own.costs(io);
        let own_wait = own.check(requester, &own_costs, now);
        let mut gran = own.granularity_ns;
        let mut wait = own_wait;
        let mut group_costs = [0u128; 6];
        if let Some(g) = g.as_mut() {
            g.leak(now);
            group_costs = g.costs(io);
            wait = wait.max(g.check(requester, &group_costs, now));
            gran = gran.min(g.granularity_ns);
        }
        if wait > 0 {
            return Admission::Wait(recheck_after(wait, gran));
        }
        own.commit(requester, &own_costs);
        if let Some(g) = g.as_mut() {
            g.commit(requester, &group_costs);
        }
        Admission::Go
    }

    /// Add a queue's batch of admitted requests to the counters.
    pub fn record(&self, c: &LocalCounts) {
        let add = |a: &AtomicU64, v: u64| {
            if v > 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&self.stats.read_ops, c.read_ops);
        add(&self.stats.write_ops, c.write_ops);
        add(&self.stats.read_bytes, c.read_bytes);
        add(&self.stats.write_bytes, c.write_bytes);
    }

    /// A queue started waiting.
    pub fn record_throttle_start(&self) {
        self.stats.throttle_events.fetch_add(1, Ordering::Relaxed);
    }

    /// A queue waited `ns`.
    pub fn record_throttled(&self, ns: u64) {
        self.stats.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn stats(&self) -> QosStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QosStats {
            read_ops: g(&self.stats.read_ops),
            write_ops: g(&self.stats.write_ops),
            read_bytes: g(&self.stats.read_bytes),
            write_bytes: g(&self.stats.write_bytes),
            throttled_ns: g(&self.stats.throttled_ns),
            throttle_events: g(&self.stats.throttle_events),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pacing for internal work

/// Paces a blocking copier (import, export) to `bytes_per_sec`: account first, then sleep for
/// what [`Pacer::take`] returns. Over any window the copier moves at most
/// `rate × W + 100 ms of rate + one chunk`.
#[derive(Debug, Clone)]
pub struct Pacer {
    level: Level,
    last_ns: u64,
}

impl Pacer {
    /// `None` for a rate of 0 (unpaced).
    pub fn new(bytes_per_sec: u64) -> Option<Pacer> {
        Self::new_at(bytes_per_sec, now_ns())
    }

    pub fn new_at(bytes_per_sec: u64, now_ns: u64) -> Option<Pacer> {
        if bytes_per_sec == 0 {
            return None;
        }
        let rate = u128::from(bytes_per_sec.min(MAX_RATE));
        Some(Pacer { level: Level::new(rate, 1, rate * NANO / 10), last_ns: now_ns })
    }

    /// Account `bytes`; returns how long to sleep before moving more.
    pub fn take(&mut self, bytes: u64) -> Duration {
        self.take_at(bytes, now_ns())
    }

    pub fn take_at(&mut self, bytes: u64, now_ns: u64) -> Duration {
        self.level.leak(now_ns.saturating_sub(self.last_ns));
        self.last_ns = self.last_ns.max(now_ns);
        self.level.level += u128::from(bytes) * NANO;
        if self.level.level <= self.level.cap {
            return Duration::ZERO;
        }
        let excess = self.level.level - self.level.cap;
        Duration::from_nanos(u64::try_from(excess.div_ceil(self.level.num)).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn read(bytes: u64) -> Io {
        Io { dir: Dir::Read, bytes }
    }

    fn write(bytes: u64) -> Io {
        Io { dir: Dir::Write, bytes }
    }

    /// Run a closed-loop requester against `q` for `dur_ns` of fake time: it asks, and on
    /// Wait sleeps exactly the answer. Returns the admission times.
    fn saturate(q: &VolumeQos, io: Io, start_ns: u64, dur_ns: u64) -> Vec<u64> {
        let mut t = start_ns;
        let mut out = Vec::new();
        while t < start_ns + dur_ns {
            match q.admit_at(7, io, t) {
                Admission::Go => out.push(t),
                Admission::Wait(d) => t += d.as_nanos() as u64,
            }
        }
        out
    }

    #[test]
    fn unlimited_is_inactive_and_admits() {
        let q = VolumeQos::unlimited();
        assert!(!q.is_active());
        for i in 0..1000 {
            assert_eq!(q.admit_at(1, read(4096), i), Admission::Go);
        }
    }

    #[test]
    fn default_burst_is_100ms_then_the_rate() {
        let q = VolumeQos::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(2000))).unwrap();
        assert!(q.is_active());
        // 200 ops at once (100 ms worth), then one per 0.5 ms.
        let at0: Vec<u64> = saturate(&q, read(4096), 0, 1).into_iter().collect();
        assert_eq!(at0.len(), 200);
        let all = saturate(&q, read(4096), 1, 10 * SEC);
        let n = all.len() as f64 + 200.0;
        // 10 s at 2000/s + 200 burst, to within the recheck granularity.
        assert!((n - 20_200.0).abs() <= 3.0, "{n}");
    }

    #[test]
    fn waits_are_clamped_to_the_recheck_window() {
        let q = VolumeQos::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(1))).unwrap();
        // Bucket of 0.1 op: the first op fits the empty bucket (oversized), the next waits ~1 s.
        assert_eq!(q.admit_at(1, read(0), 0), Admission::Go);
        assert_eq!(q.admit_at(1, read(0), 1), Admission::Wait(MAX_RECHECK));
        assert_eq!(q.admit_at(1, read(0), SEC - 1), Admission::Wait(Duration::from_nanos(MIN_RECHECK.as_nanos() as u64)));
        assert_eq!(q.admit_at(1, read(0), SEC), Admission::Go);
    }

    #[test]
    fn read_write_and_total_limits_apply_by_direction() {
        let l = Limits::default().with(LimitKind::IopsRead, Limit::rate(100)).with(LimitKind::BpsWrite, Limit::rate(1 << 20));
        let q = VolumeQos::new(l).unwrap();
        // Reads: 10 ops of burst. Writes: 100 KiB of burst, not limited in ops.
        let r = (0..50).filter(|_| q.admit_at(1, read(1 << 20), 0) == Admission::Go).count();
        assert_eq!(r, 10);
        let w = (0..50).filter(|_| q.admit_at(2, write(4096), 0) == Admission::Go).count();
        assert_eq!(w, 25);
    }

    #[test]
    fn iops_size_counts_large_requests_as_several_ops() {
        let mut l = Limits::default().with(LimitKind::IopsTotal, Limit { rate_per_sec: 100, burst: 16, burst_secs: 0 });
        l.iops_size = 4096;
        let q = VolumeQos::new(l).unwrap();
        // 16 ops of burst: two 32 KiB requests (8 ops each) fit, a third does not.
        assert_eq!(q.admit_at(1, read(32768), 0), Admission::Go);
        assert_eq!(q.admit_at(1, read(32768), 0), Admission::Go);
        assert!(matches!(q.admit_at(1, read(32768), 0), Admission::Wait(_)));
        // Small requests count as one op, not less.
        let q = VolumeQos::new(l).unwrap();
        assert_eq!((0..20).filter(|_| q.admit_at(1, read(512), 0) == Admission::Go).count(), 16);
    }

    #[test]
    fn burst_secs_spreads_the_burst() {
        // 1000/s sustained, 3000 ops of burst over 3 s: peak 2000/s.
        let l = Limits::default().with(LimitKind::IopsTotal, Limit { rate_per_sec: 1000, burst: 3000, burst_secs: 3 });
        let q = VolumeQos::new(l).unwrap();
        let t = saturate(&q, read(0), 0, 6 * SEC);
        let in_window = |a: u64, b: u64| t.iter().filter(|&&x| x >= a && x < b).count() as f64;
        // First 3 s at the peak (plus its 100 ms of slack), then the sustained rate.
        assert!((in_window(0, SEC) - 2200.0).abs() < 5.0, "{}", in_window(0, SEC));
        assert!((in_window(SEC, 2 * SEC) - 2000.0).abs() < 5.0, "{}", in_window(SEC, 2 * SEC));
        assert!((in_window(4 * SEC, 5 * SEC) - 1000.0).abs() < 5.0, "{}", in_window(4 * SEC, 5 * SEC));
        // Without burst_secs the whole burst goes at once.
        let l = Limits::default().with(LimitKind::IopsTotal, Limit { rate_per_sec: 1000, burst: 3000, burst_secs: 0 });
        let q = VolumeQos::new(l).unwrap();
        assert_eq!(saturate(&q, read(0), 0, 1).len(), 3000);
    }

    #[test]
    fn group_limits_are_shared_and_both_apply() {
        let g = QosGroup::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(1000))).unwrap();
        let a = VolumeQos::unlimited();
        let b = VolumeQos::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(300))).unwrap();
        a.set_group(Some(g.clone()));
        b.set_group(Some(g.clone()));
        assert!(a.is_active());
        // Alternate a and b for 10 s of fake time, each asking whenever its own timer fires.
        let (mut ta, mut tb, mut na, mut nb) = (0u64, 0u64, 0u64, 0u64);
        while ta.min(tb) < 10 * SEC {
            if ta <= tb {
                match a.admit_at(1, read(0), ta) {
                    Admission::Go => na += 1,
                    Admission::Wait(d) => ta += d.as_nanos() as u64,
                }
            } else {
                match b.admit_at(2, read(0), tb) {
                    Admission::Go => nb += 1,
                    Admission::Wait(d) => tb += d.as_nanos() as u64,
                }
            }
        }
        // b is held to 300/s by its own limit; together they get the group's 1000/s.
        let (na, nb) = (na as f64, nb as f64);
        assert!((nb - 3030.0).abs() < 40.0, "b {nb}");
        assert!((na + nb - 10_100.0).abs() < 40.0, "a {na} + b {nb}");
        // Leaving the group lifts its limit.
        a.set_group(None);
        assert!(!a.is_active());
    }

    #[test]
    fn a_large_request_is_not_starved_by_small_ones() {
        // 1 MiB/s, bucket 100 KiB: one queue wants 64 KiB, another floods 4 KiB requests.
        let q = VolumeQos::new(Limits::default().with(LimitKind::BpsTotal, Limit::rate(1 << 20))).unwrap();
        let (mut t_big, mut t_small) = (0u64, 0u64);
        let mut big_done = None;
        while t_big.min(t_small) < 2 * SEC && big_done.is_none() {
            if t_small <= t_big {
                match q.admit_at(2, read(4096), t_small) {
                    Admission::Go => {}
                    Admission::Wait(d) => t_small += d.as_nanos() as u64,
                }
            } else {
                match q.admit_at(1, read(65536), t_big) {
                    Admission::Go => big_done = Some(t_big),
                    Admission::Wait(d) => t_big += d.as_nanos() as u64,
                }
            }
        }
        // Without the line the small requests keep the bucket full forever.
        let t = big_done.expect("the 64 KiB request never went");
        assert!(t < 200 * MS, "{t}");
    }

    #[test]
    fn group_members_take_turns_and_a_vanished_waiter_expires() {
        let g = QosGroup::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(1000))).unwrap();
        let vols: Vec<Arc<VolumeQos>> = (0..3).map(|_| VolumeQos::unlimited()).collect();
        for v in &vols {
            v.set_group(Some(g.clone()));
        }
        // Three saturating volumes; volume 0 always retries first when times tie.
        let mut t = [0u64; 3];
        let mut n = [0u64; 3];
        while t.iter().min().copied().unwrap_or(0) < 5 * SEC {
            let i = (0..3).min_by_key(|&i| (t[i], i)).unwrap_or(0);
            match vols[i].admit_at(i as u64 + 10, read(0), t[i]) {
                Admission::Go => n[i] += 1,
                Admission::Wait(d) => t[i] += d.as_nanos() as u64,
            }
        }
        // Equal shares of 5 s × 1000/s; volume 0 also had the 100-op bucket to itself at t = 0.
        assert!((n.iter().sum::<u64>() as f64 - 5100.0).abs() < 5.0, "{n:?}");
        for (i, &k) in n.iter().enumerate() {
            let share = 5000.0 / 3.0 + if i == 0 { 100.0 } else { 0.0 };
            assert!((k as f64 - share).abs() < 10.0, "volume {i}: {k} of {n:?}");
        }
        // A waiter that never comes back (a disconnected queue) stops holding others up.
        let v = VolumeQos::new(Limits::default().with(LimitKind::BpsTotal, Limit::rate(1 << 20))).unwrap();
        assert_eq!(v.admit_at(1, read(100 << 10), 0), Admission::Go);
        assert!(matches!(v.admit_at(99, read(64 << 10), 1), Admission::Wait(_)));
        // Room for 4 KiB but not beside the 64 KiB waiter ahead...
        let t1 = 10 * MS;
        assert!(matches!(v.admit_at(2, read(4096), t1), Admission::Wait(_)));
        // ...until its place expires.
        let t2 = t1 + (MAX_RECHECK + RESERVATION_GRACE).as_nanos() as u64;
        assert_eq!(v.admit_at(2, read(4096), t2), Admission::Go);
    }

    #[test]
    fn changing_limits_keeps_the_fill() {
        let q = VolumeQos::new(Limits::default().with(LimitKind::IopsTotal, Limit::rate(1000))).unwrap();
        assert_eq!(saturate(&q, read(0), 0, 1).len(), 100);
        // Raising the limit does not hand out a fresh bucket: 100 used of a 500 bucket.
        q.set_limits_at(Limits::default().with(LimitKind::IopsTotal, Limit::rate(5000)), 0).unwrap();
        let n = (0..1000).filter(|_| q.admit_at(1, read(0), 1) == Admission::Go).count();
        assert!((399..=400).contains(&n), "{n}");
        // Removing the limit deactivates the volume.
        q.set_limits_at(Limits::default(), 1).unwrap();
        assert!(!q.is_active());
    }

    #[test]
    fn validation() {
        let bad = |l: Limit| Limits::default().with(LimitKind::BpsRead, l).validate();
        assert_eq!(bad(Limit::rate(0)), Err(QosError::ZeroRate { kind: LimitKind::BpsRead }));
        assert!(matches!(bad(Limit::rate(MAX_RATE + 1)), Err(QosError::TooLarge { .. })));
        assert!(matches!(bad(Limit { rate_per_sec: 1, burst: 0, burst_secs: 2 }), Err(QosError::BurstSecsWithoutBurst { .. })));
        assert!(bad(Limit { rate_per_sec: MAX_RATE, burst: MAX_BURST, burst_secs: MAX_BURST_SECS }).is_ok());
        assert!(VolumeQos::new(Limits::default().with(LimitKind::IopsRead, Limit::rate(0))).is_err());
        for k in LimitKind::ALL {
            assert_eq!(LimitKind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn pacer_holds_the_rate() {
        let mut p = Pacer::new_at(10 << 20, 0).unwrap();
        let mut t = 0u64;
        let mut moved = 0u64;
        while t < 10 * SEC {
            let d = p.take_at(1 << 20, t);
            moved += 1 << 20;
            t += d.as_nanos() as u64;
        }
        let rate = moved as f64 / (t as f64 / SEC as f64);
        assert!((rate / (10 << 20) as f64 - 1.0).abs() < 0.02, "{rate}");
        assert!(Pacer::new(0).is_none());
    }

    /// Arbitrary limits for the property tests: small rates and bursts so that windows see
    /// many admissions.
    fn arb_limit() -> impl Strategy<Value = Limit> {
        (1u64..5_000, prop_oneof![Just(0u64), 1u64..10_000], 0u64..4).prop_map(|(rate, burst, secs)| Limit {
            rate_per_sec: rate,
            burst,
            burst_secs: if burst == 0 { 0 } else { secs },
        })
    }

    fn bucket_units(l: &Limit) -> f64 {
        if l.burst == 0 {
            l.rate_per_sec as f64 / 10.0
        } else {
            l.burst as f64
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Over any window [a, b] of a random schedule of requests (random gaps, sizes,
        /// directions, two requesters), the ops an IOPS limit admitted are at most
        /// rate × (b - a) + burst (+ one op when the bucket is smaller than one op), and the
        /// bytes a bandwidth limit admitted at most rate × (b - a) + max(burst, one request).
        #[test]
        fn admitted_never_exceeds_rate_times_window_plus_burst(
            iops in arb_limit(),
            bps in arb_limit().prop_map(|l| Limit { rate_per_sec: l.rate_per_sec * 4096, burst: l.burst * 4096, ..l }),
            reqs in proptest::collection::vec((0u64..5 * MS, 1u64..=16, any::<bool>(), any::<bool>()), 1..400),
        ) {
            let limits = Limits::default().with(LimitKind::IopsTotal, iops).with(LimitKind::BpsWrite, bps);
            let q = VolumeQos::new(limits).unwrap();
            let mut t = 0u64;
            // (time, ops, write bytes) of each admission.
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            let mut max_write = 0u64;
            for (gap, blocks, is_write, second) in reqs {
                t += gap;
                let io = Io { dir: if is_write { Dir::Write } else { Dir::Read }, bytes: blocks * 4096 };
                if q.admit_at(if second { 2 } else { 1 }, io, t) == Admission::Go {
                    admitted.push((t, if is_write { io.bytes } else { 0 }));
                    if is_write { max_write = max_write.max(io.bytes); }
                }
            }
            for i in 0..admitted.len() {
                let (mut ops, mut bytes) = (0f64, 0f64);
                for &(tj, wb) in &admitted[i..] {
                    ops += 1.0;
                    bytes += wb as f64;
                    let w = (tj - admitted[i].0) as f64 / SEC as f64;
                    let ops_bound = iops.rate_per_sec as f64 * w + bucket_units(&iops).max(1.0);
                    prop_assert!(ops <= ops_bound + 1e-6, "ops {ops} > {ops_bound} over {w} s");
                    if let Some(peak_secs) = (iops.burst_secs > 0).then_some(iops.burst_secs) {
                        let peak = iops.rate_per_sec as f64 + iops.burst as f64 / peak_secs as f64;
                        let peak_bound = peak * w + (peak / 10.0).max(1.0);
                        prop_assert!(ops <= peak_bound + 1e-6, "ops {ops} > peak {peak_bound} over {w} s");
                    }
                    let bytes_bound = bps.rate_per_sec as f64 * w + bucket_units(&bps).max(max_write as f64);
                    prop_assert!(bytes <= bytes_bound + 1e-3, "bytes {bytes} > {bytes_bound} over {w} s");
                }
            }
        }

        /// A saturating requester gets the rate: over a long window, admitted ops are at least
        /// rate × W (the bucket never loses tokens while the requester waits), and at most
        /// rate × W + burst.
        #[test]
        fn a_saturating_requester_gets_the_rate(l in arb_limit(), secs in 1u64..5) {
            let q = VolumeQos::new(Limits::default().with(LimitKind::IopsTotal, l)).unwrap();
            let n = saturate(&q, read(0), 0, secs * SEC).len() as f64;
            let want = l.rate_per_sec as f64 * secs as f64;
            prop_assert!(n >= want - 1.0, "{n} < {want}");
            prop_assert!(n <= want + bucket_units(&l).max(1.0) + 1.0, "{n} > {want} + burst");
        }

        /// Waits never exceed MAX_RECHECK and are never zero.
        #[test]
        fn waits_are_bounded(l in arb_limit(), gaps in proptest::collection::vec(0u64..MS, 1..200)) {
            let q = VolumeQos::new(Limits::default().with(LimitKind::BpsTotal, l)).unwrap();
            let mut t = 0;
            for g in gaps {
                t += g;
                if let Admission::Wait(d) = q.admit_at(1, read(8192), t) {
                    prop_assert!(d > Duration::ZERO && d <= MAX_RECHECK, "{d:?}");
                }
            }
        }
    }
}
