//! vhost-user-blk device for vblk volumes.
//!
//! [`start`] binds a unix socket and serves a vblk [`Volume`](vblk_engine::Volume) to one
//! vhost-user frontend (QEMU, cloud-hypervisor, libblkio, ...) at a time, accepting the next
//! connection after a disconnect. The data path follows the design notes: one worker thread per
//! virtqueue (vhost-user-backend's `&self` [`VhostUserBackend`](vhost_user_backend::VhostUserBackend)
//! with per-queue locks), each with its own engine queue (io_uring) whose completion eventfd sits
//! in the worker's epoll loop; requests go to the engine straight from guest memory and the
//! worker never blocks on I/O.
//!
//! Modules: [`config`] (features and configuration space), [`request`] (the pure request
//! parser, [`parse_request`]), [`qos`] (per-volume and group IOPS / bandwidth limits, enforced
//! with a timerfd per queue), `backend` (the vhost-user backend) and `device` (socket,
//! connection loop, [`Device`]).
//!
//! Requests in flight when the daemon dies are run again by the next one
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, [`inflight`]); live migration is supported with a
//! dirty-page log in shared memory (VHOST_F_LOG_ALL + LOG_SHMFD: the device marks every guest
//! page it writes). A volume that grows while attached is announced with
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG when the frontend negotiated BACKEND_REQ (QEMU does).
//! vhost and vhost-user-backend are patched copies in `third_party/` (see its README).
//!
//! Known gaps: a memory region added while a log is active (memory hot-plug during a
//! migration, which QEMU refuses) is not logged; marking stays on after a cancelled migration
//! (harmless).

pub mod config;
mod backend;
mod device;
pub mod inflight;
pub mod qos;
pub mod request;

use std::path::PathBuf;

pub use device::Device;
pub use request::{parse_descriptors, parse_request, BlkOp, ParsedRequest, RequestError, RequestLimits};

/// How to serve a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Unix socket path to listen on.
    pub socket: PathBuf,
    /// Number of virtqueues (1..=16), one worker thread each.
    pub num_queues: u16,
    /// Maximum virtqueue size (a power of two; default 256). Also the per-queue bound on
    /// requests in flight.
    pub queue_size: u16,
    /// Worker threads serving the queues (1..=num_queues; queue q is served by thread
    /// q % threads). 0 means one per queue.
    pub threads: u16,
    /// Register the guest's memory with each queue's io_uring as fixed buffers: requests skip
    /// pinning and unpinning their pages (less CPU per I/O), but all of the guest's RAM is
    /// pinned (made resident, never swapped or reclaimed) while the frontend is connected.
    pub pin_memory: bool,
}

impl DeviceConfig {
    /// Default queue size.
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;

    /// One queue of the default size on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> DeviceConfig {
        DeviceConfig { socket: socket.into(), num_queues: 1, queue_size: Self::DEFAULT_QUEUE_SIZE, threads: 0, pin_memory: false }
    }
}

/// Request counters of a device (since [`start`], across connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Requests completed (any type, success or failure).
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    /// Bytes of successful reads / writes.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests completed with a status other than OK (refused or failed).
    pub errors: u64,
    /// Frontend connections accepted.
    pub connections: u64,
}

/// Errors starting or stopping a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid device configuration: {0}")]
    InvalidConfig(String),
    #[error("socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {} is in use: another process is listening on it", .0.display())]
    SocketInUse(PathBuf),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error(transparent)]
    Engine(#[from] vblk_engine::Error),
    #[error("vhost-user: {0}")]
    Daemon(String),
    #[error(transparent)]
    Io(std::io::Error),
    #[error("the device's listener thread panicked")]
    ThreadPanicked,
}

/// Start serving `volume` on `cfg.socket` (see the crate docs), without QoS limits. The socket
/// is bound (a stale socket file is replaced, mode 0600) before this returns, so a frontend
/// may connect at once.
pub fn start(volume: vblk_engine::Volume, cfg: DeviceConfig) -> Result<Device, Error> {
    device::start(volume, cfg, qos::VolumeQos::unlimited(), CacheMode::default())
}

/// [`start`], with requests admitted by `qos` (the volume's limits and group, changeable live
/// while the device runs; see [`qos`]).
pub fn start_with_qos(volume: vblk_engine::Volume, cfg: DeviceConfig, qos: std::sync::Arc<qos::VolumeQos>) -> Result<Device, Error> {
    device::start(volume, cfg, qos, CacheMode::default())
}

/// The cache mode a guest chose (virtio `CONFIG_WCE`), kept by whoever records attachments: the
/// frontend (QEMU) shows the guest the configuration it read once, also across a restart of the
/// daemon, so a device started again for the same VM must start in the guest's mode.
pub struct CacheMode {
    /// The mode to start in: write-back (true, a new device's) or write-through.
    pub writeback: bool,
    /// Called (on a vhost-user thread) when the driver changes the mode, with the new one.
    pub on_change: Option<Box<dyn Fn(bool) + Send + Sync>>,
}

impl Default for CacheMode {
    fn default() -> CacheMode {
        CacheMode { writeback: true, on_change: None }
    }
}

/// [`start_with_qos`], starting in the cache mode `cache` says and telling it of changes.
pub fn start_with(
    volume: vblk_engine::Volume,
    cfg: DeviceConfig,
    qos: std::sync::Arc<qos::VolumeQos>,
    cache: CacheMode,
) -> Result<Device, Error> {
    device::start(volume, cfg, qos, cache)
}
