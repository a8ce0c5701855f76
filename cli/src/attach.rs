//! The only module that touches the device crate: start and stop a vhost-user-blk device.

use std::sync::Arc;

use tonic::{Code, Status};
use vblk_engine::Volume;

use crate::attachments::Entry as AttachEntry;
use crate::server::{code_of, error_chain};

/// Largest virtqueue size offered when the caller does not say.
pub const DEFAULT_QUEUE_SIZE: u16 = vblk_vhost::DeviceConfig::DEFAULT_QUEUE_SIZE;

/// A running vhost-user-blk device.
pub struct Device(vblk_vhost::Device);

/// The gRPC code for a device error.
fn code(e: &vblk_vhost::Error) -> Code {
    use vblk_vhost::Error as E;
    match e {
        E::InvalidConfig(_) => Code::InvalidArgument,
        E::SocketInUse(_) | E::NotASocket(_) => Code::AlreadyExists,
        E::Socket { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        E::Socket { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
        E::Engine(e) => code_of(e),
        _ => Code::Internal,
    }
}

/// Serve `volume` (opened read-only or read-write by the caller) as the attachment `a` says
/// (socket, queues, threads, pinning, the guest's cache mode), its requests admitted by `qos`;
/// `on_cache_mode` is told when the guest changes its cache mode.
pub fn start(
    volume: Volume,
    a: &AttachEntry,
    qos: Arc<vblk_vhost::qos::VolumeQos>,
    on_cache_mode: Box<dyn Fn(bool) + Send + Sync>,
) -> Result<Device, Status> {
    let cfg = vblk_vhost::DeviceConfig {
        socket: a.socket.clone(),
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        threads: a.threads,
        pin_memory: a.pin_memory,
    };
    let cache = vblk_vhost::CacheMode { writeback: a.writeback, on_change: Some(on_cache_mode) };
    vblk_vhost::start_with(volume, cfg, qos, cache).map(Device).map_err(|e| Status::new(code(&e), error_chain(&e)))
}

impl Device {
    /// Stop serving: disconnects the front end, drains I/O, removes the socket, detaches.
    pub fn stop(self) -> Result<(), String> {
        self.0.stop().map_err(|e| error_chain(&e))
    }

    /// Worker threads serving the queues.
    pub fn threads(&self) -> u16 {
        self.0.threads()
    }

    /// Guest memory registered as io_uring fixed buffers.
    pub fn pin_memory(&self) -> bool {
        self.0.pin_memory()
    }

    /// A front end is connected.
    pub fn connected(&self) -> bool {
        self.0.connected()
    }

    /// Request counters since start.
    pub fn stats(&self) -> crate::proto::DeviceStats {
        let s = self.0.stats();
        crate::proto::DeviceStats {
            requests: s.requests,
            reads: s.reads,
            writes: s.writes,
            flushes: s.flushes,
            discards: s.discards,
            write_zeroes: s.write_zeroes,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            errors: s.errors,
            connections: s.connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vblk_vhost::Error as E;

    #[test]
    fn device_errors_map_to_grpc_codes() {
        assert_eq!(code(&E::InvalidConfig("x".into())), Code::InvalidArgument);
        assert_eq!(code(&E::SocketInUse("/s".into())), Code::AlreadyExists);
        assert_eq!(code(&E::NotASocket("/s".into())), Code::AlreadyExists);
        let nf = E::Socket { path: "/no/dir/s".into(), source: std::io::Error::from_raw_os_error(libc::ENOENT) };
        assert_eq!(code(&nf), Code::NotFound);
        assert!(error_chain(&nf).contains("/no/dir/s"), "{}", error_chain(&nf));
        assert_eq!(code(&E::Engine(vblk_engine::Error::Busy { name: "v".into(), why: "x" })), Code::FailedPrecondition);
        assert_eq!(code(&E::ThreadPanicked), Code::Internal);
    }
}
