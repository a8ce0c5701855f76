//! The socket listener: serves one vhost-user frontend connection at a time, with a fresh
//! `VhostUserDaemon` (and backend, worker threads and engine queues) per connection, and loops
//! to accept the next one after a disconnect.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BlkBackend, DevShared, StatsCounters};
use crate::qos::VolumeQos;
use crate::{DeviceConfig, DeviceStats, Error};

/// Connection control shared by the listener thread and `Device::stop`.
#[derive(Default)]
struct ConnCtl {
    stopping: bool,
    shutdown: Option<ShutdownHandle>,
}

/// A vhost-user-blk device serving one volume on a unix socket.
pub struct Device {
    socket: PathBuf,
    dev: Arc<DevShared>,
    ctl: Arc<Mutex<ConnCtl>>,
    stop_evt: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn validate(cfg: &DeviceConfig) -> Result<(), Error> {
    if cfg.socket.as_os_str().is_empty() {
        return Err(Error::InvalidConfig("the socket path is empty".into()));
    }
    if !(1..=16).contains(&cfg.num_queues) {
        return Err(Error::InvalidConfig(format!("num_queues must be 1..=16 (got {})", cfg.num_queues)));
    }
    if cfg.threads > cfg.num_queues {
        return Err(Error::InvalidConfig(format!(
            "threads must be 1..={} (one per queue at most; got {})",
            cfg.num_queues, cfg.threads
        )));
    }
    if cfg.queue_size < 2 || !cfg.queue_size.is_power_of_two() {
        return Err(Error::InvalidConfig(format!(
            "queue_size must be a power of two between 2 and 32768 (got {})",
            cfg.queue_size
        )));
    }
    Ok(())
}

/// Bind the socket: a stale socket file (nobody listening) is removed first; a live one, or a
/// path that is not a socket, is an error. The socket is made mode 0600.
fn bind(path: &Path) -> Result<UnixListener, Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(|e| Error::Socket { path: path.to_path_buf(), source: e })?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Socket { path: path.to_path_buf(), source: e }),
    }
    let l = UnixListener::bind(path).map_err(|e| Error::Socket { path: path.to_path_buf(), source: e })?;
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(Error::Socket { path: path.to_path_buf(), source: e });
    }
    Ok(l)
}

/// Start serving `volume` on `cfg.socket`, its requests admitted by `qos`.
pub fn start(volume: vblk_engine::Volume, cfg: DeviceConfig, qos: Arc<VolumeQos>, cache: crate::CacheMode) -> Result<crate::Device, Error> {
    validate(&cfg)?;
    let name = volume.name();
    let dev = Arc::new(DevShared {
        name: name.clone(),
        read_only: volume.read_only(),
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        size_bytes: std::sync::atomic::AtomicU64::new(volume.size_bytes()),
        stats: StatsCounters::default(),
        connected: std::sync::atomic::AtomicBool::new(false),
        volume: Mutex::new(None),
        qos,
        backend_req: Mutex::new(None),
        cfg_notify: Mutex::new((false, false)),
        threads: if cfg.threads == 0 { cfg.num_queues } else { cfg.threads },
        pin_memory: cfg.pin_memory,
        blk_size: volume.logical_block_size(),
        guest_writeback: std::sync::atomic::AtomicBool::new(cache.writeback),
        on_cache_mode: cache.on_change,
    });
    let weak = Arc::downgrade(&dev);
    volume.on_resize(Box::new(move |size| {
        if let Some(d) = weak.upgrade() {
            // An attached volume only grows; concurrent grows may call back out of order.
            d.size_bytes.fetch_max(size, Ordering::AcqRel);
            // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: the frontend re-reads the configuration
            // space and interrupts the guest, which sees the new capacity. Without the channel
            // (a frontend that did not negotiate BACKEND_REQ) the guest sees it when it next
            // reads the configuration space.
            tracing::info!(volume = %d.name, size, "volume grew; notifying the frontend");
            d.config_changed();
        }
    }));
    *lock(&dev.volume) = Some(volume);

    let listener = bind(&cfg.socket)?;
    let stop_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::Io)?);
    let ctl = Arc::new(Mutex::new(ConnCtl::default()));
    let thread = {
        let (dev, ctl, stop_evt) = (dev.clone(), ctl.clone(), stop_evt.clone());
        let socket = cfg.socket.clone();
        std::thread::Builder::new()
            .name(format!("vblk-{}", short(&name, 10)))
            .spawn(move || listen(Listener::from(listener), &socket, &dev, &ctl, &stop_evt))
            .map_err(Error::Io)?
    };
    tracing::info!(volume = %name, socket = %cfg.socket.display(), queues = cfg.num_queues, "vhost-user-blk device started");
    Ok(Device { socket: cfg.socket, dev, ctl, stop_evt, thread: Some(thread) })
}

/// At most `max` bytes of `s` (Linux thread names are limited to 15 bytes).
fn short(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Wait until the listener is readable (true) or the device stops (false).
fn wait_readable(listener: &Listener, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: fds is a valid array of 2 pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %io::Error::last_os_error(), "poll on the vhost-user socket failed");
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

fn listen(mut listener: Listener, socket: &Path, dev: &Arc<DevShared>, ctl: &Mutex<ConnCtl>, stop: &EventFd) {
    loop {
        if lock(ctl).stopping || !wait_readable(&listener, stop) {
            break;
        }
        if let Err(e) = serve_one(&mut listener, dev, ctl) {
            tracing::error!(volume = %dev.name, socket = %socket.display(), error = %e, "vhost-user connection failed");
            // Do not spin on a persistent failure.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Accept one connection and serve it until it ends.
fn serve_one(listener: &mut Listener, dev: &Arc<DevShared>, ctl: &Mutex<ConnCtl>) -> Result<(), Error> {
    let mem = GuestMemoryAtomic::new(crate::backend::GuestMem::new());
    let backend = Arc::new(BlkBackend::new(dev.clone(), mem.clone())?);
    let mut daemon = VhostUserDaemon::new(format!("vblk-fe-{}", short(&dev.name, 7)), backend.clone(), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    for (t, h) in daemon.get_epoll_handlers().iter().enumerate() {
        for (local, i) in (0..).map_while(|local| backend.queue_of(t, local)).enumerate() {
            let fd = backend.completion_fd(i).ok_or_else(|| Error::Daemon(format!("no queue {i}")))?;
            // Edge-triggered: every completion signal is an event, and the engine does not read
            // the eventfd on each reap (the queue was set up for it in BlkBackend::new).
            h.register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, backend.completion_event_id(local)).map_err(Error::Io)?;
            let fd = backend.timer_fd(i).ok_or_else(|| Error::Daemon(format!("no queue {i}")))?;
            h.register_listener(fd, EventSet::IN, backend.timer_event_id(local)).map_err(Error::Io)?;
        }
    }
    daemon.start(listener).map_err(|e| Error::Daemon(e.to_string()))?;
    {
        let mut c = lock(ctl);
        if c.stopping {
            daemon.request_shutdown();
        } else {
            c.shutdown = daemon.shutdown_handle();
        }
    }
    dev.connected.store(true, Ordering::Release);
    dev.stats.connections.fetch_add(1, Ordering::Relaxed);
    tracing::info!(volume = %dev.name, "vhost-user frontend connected");
    let r = daemon.wait();
    dev.connected.store(false, Ordering::Release);
    lock(ctl).shutdown = None;
    // Dropping the daemon stops and joins its worker threads.
    drop(daemon);
    backend.disconnect();
    drop(backend);
    match r {
        Ok(()) => tracing::info!(volume = %dev.name, "vhost-user frontend disconnected"),
        Err(e) => tracing::info!(volume = %dev.name, error = %e, "vhost-user connection ended"),
    }
    Ok(())
}

impl Device {
    /// Stop serving: disconnect the frontend, drain in-flight I/O, remove the socket and drop
    /// the volume (which detaches it).
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else { return Ok(()) };
        {
            let mut c = lock(&self.ctl);
            c.stopping = true;
            if let Some(h) = c.shutdown.take() {
                h.shutdown();
            }
        }
        let _ = self.stop_evt.write(1);
        // Also wake an accept() that might be blocked (a connection that vanished between poll
        // and accept): the listener thread sees `stopping` and shuts that connection down.
        let _ = UnixStream::connect(&self.socket);
        let joined = thread.join();
        let removed = match fs::remove_file(&self.socket) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Socket { path: self.socket.clone(), source: e }),
        };
        drop(lock(&self.dev.volume).take());
        tracing::info!(volume = %self.dev.name, "vhost-user-blk device stopped");
        if joined.is_err() {
            return Err(Error::ThreadPanicked);
        }
        removed
    }

    /// The unix socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.dev.connected.load(Ordering::Acquire)
    }

    /// Request counters since start.
    pub fn stats(&self) -> DeviceStats {
        self.dev.stats.snapshot()
    }

    /// Worker threads serving the queues (`DeviceConfig::threads`, 0 resolved to one per queue).
    pub fn threads(&self) -> u16 {
        self.dev.threads
    }

    /// Whether guest memory is registered as io_uring fixed buffers (`DeviceConfig::pin_memory`).
    pub fn pin_memory(&self) -> bool {
        self.dev.pin_memory
    }

    /// The QoS that admits this device's requests (change its limits live through it).
    pub fn qos(&self) -> &Arc<VolumeQos> {
        &self.dev.qos
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "stopping the device on drop failed");
        }
    }
}
