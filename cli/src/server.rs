//! `vblk daemon`: the pool, the attached devices, and the gRPC service over a unix socket.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Code, Request, Response, Status};
use tracing::{error, info, warn};
use vblk_engine::{Pool, PoolOptions, SnapshotInfo, VolumeInfo};

use crate::attach;
use crate::cli_args::{AttachSpec, DaemonArgs};
use crate::proto;
use crate::proto::vblk_server::{Vblk, VblkServer};
use crate::attachments::{AttachmentRegistry, Entry as AttachEntry};
use crate::qos::{GroupChange, QosRegistry};
use crate::transfer;

/// `Display` of an error and of each of its sources, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// The gRPC code for an engine error.
pub fn code_of(e: &vblk_engine::Error) -> Code {
    use vblk_engine::Error as E;
    match e {
        e if e.is_not_found() => Code::NotFound,
        E::NoSuchSnapshot(_) => Code::NotFound,
        E::VolumeExists(_) | E::AlreadyExists { .. } | E::SnapshotExists(_) => Code::AlreadyExists,
        e if e.is_invalid_input() => Code::InvalidArgument,
        E::Invalid(_) => Code::InvalidArgument,
        E::Busy { .. } | E::ReadOnly | E::Locked { .. } | E::HasDependents { .. } => Code::FailedPrecondition,
        E::NoSpace => Code::ResourceExhausted,
        E::ShuttingDown => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// An engine error as a gRPC status whose message is the whole cause chain.
pub fn engine_status(e: vblk_engine::Error) -> Status {
    Status::new(code_of(&e), error_chain(&e))
}

/// Run blocking engine work off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("worker task failed: {e}")))?
}

/// One vhost-user-blk device served by this daemon.
struct Attached {
    volume_id: u64,
    /// As recorded in `attachments.json` (socket, queues, settings it was attached with).
    entry: AttachEntry,
    /// Made again from `attachments.json` at this start: until a frontend connects to it, an
    /// explicit attach of its volume or its socket replaces it (scripts written for daemons
    /// that forget their attachments keep working).
    restored: bool,
    device: attach::Device,
}

/// Everything the daemon owns. The pool is dropped (and so committed) with the last reference.
pub struct DaemonState {
    pool: Pool,
    /// Attached devices by volume id (ids survive renames).
    devices: Mutex<BTreeMap<u64, Attached>>,
    /// Set on SIGTERM/SIGINT: running imports and exports stop.
    shutting_down: AtomicBool,
    /// Volumes' and groups' QoS (persisted in the metadata directory).
    qos: QosRegistry,
    /// The attachments a restarted daemon makes again (persisted in the metadata directory).
    attachments: Arc<AttachmentRegistry>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DaemonState {
    pub fn new(pool: Pool, qos: QosRegistry, attachments: AttachmentRegistry) -> DaemonState {
        DaemonState { pool, devices: Mutex::new(BTreeMap::new()), shutting_down: AtomicBool::new(false), qos, attachments: Arc::new(attachments) }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    fn attachment_of(&self, a: &Attached, name: &str) -> proto::Attachment {
        proto::Attachment {
            threads: a.device.threads().into(),
            pin_memory: a.device.pin_memory(),
            connected: a.device.connected(),
            stats: Some(a.device.stats()),
            qos: Some(self.qos.info(a.volume_id, name)),
            ..recorded_attachment(&a.entry, a.volume_id, name)
        }
    }

    /// The API view of a volume, with this daemon's attachment if any.
    pub fn volume_msg(&self, v: VolumeInfo) -> proto::Volume {
        let attachment = lock(&self.devices).get(&v.id).map(|a| self.attachment_of(a, &v.name));
        proto::Volume {
            id: v.id,
            name: v.name,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            created_ns: v.created_ns,
            attached_rw: v.attached_rw,
            attached_ro: v.attached_ro,
            attachment,
            encrypted: v.encrypted,
        }
    }

    /// Attach `volume` at `socket` (blocking).
    /// `threads` 0 = one worker thread per queue.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        volume: &str,
        socket: &Path,
        num_queues: u16,
        queue_size: u16,
        threads: u16,
        pin_memory: bool,
        read_only: bool,
        restored: bool,
    ) -> Result<proto::Attachment, Status> {
        if !socket.is_absolute() {
            return Err(Status::invalid_argument(format!("socket path {} must be absolute", socket.display())));
        }
        if self.is_shutting_down() {
            return Err(Status::unavailable("the daemon is shutting down"));
        }
        let mut devs = lock(&self.devices);
        let info = self.pool.volume_info(volume).map_err(engine_status)?;
        // The guest's cache mode as recorded (a restart, `--attach`), else write-back.
        let writeback = self.attachments.get(info.id).is_none_or(|e| e.writeback);
        let entry = AttachEntry { name: info.name.clone(), socket: socket.into(), num_queues, queue_size, threads, pin_memory, read_only, writeback };
        // A restored attachment no frontend has connected to gives way to this one.
        let yields = |a: &Attached| a.restored && !a.device.connected();
        let mut replace = Vec::new();
        if let Some(a) = devs.get_mut(&info.id) {
            // The same attachment again (a script that re-attaches after a daemon restart, which
            // already attached it from attachments.json): nothing to do, but it is now the
            // operator's, not a restored one that gives way.
            if (AttachEntry { name: info.name.clone(), writeback, ..a.entry.clone() }) == entry {
                a.restored &= restored;
                return Ok(self.attachment_of(a, &info.name));
            }
            if !yields(a) {
                return Err(Status::already_exists(format!("volume {volume:?} is already attached at {}", a.entry.socket.display())));
            }
            replace.push(info.id);
        }
        if let Some((&other, a)) = devs.iter().find(|(id, a)| a.entry.socket == socket && **id != info.id) {
            if !yields(a) {
                return Err(Status::already_exists(format!("socket {} is already used by another attached volume", socket.display())));
            }
            replace.push(other);
        }
        for id in replace {
            if let Some(a) = devs.remove(&id) {
                info!(volume_id = id, socket = %a.entry.socket.display(), "restored attachment replaced by a new attach");
                if let Err(e) = a.device.stop() {
                    warn!(socket = %a.entry.socket.display(), "stopping the replaced device: {e}");
                }
                remove_socket_if_present(&a.entry.socket);
                if id != info.id {
                    self.attachments.remove(id)?;
                }
            }
        }
        let vol = self.pool.open_volume(volume, read_only).map_err(engine_status)?;
        let reg = self.attachments.clone();
        let (id, name) = (info.id, info.name.clone());
        let record_cache_mode = Box::new(move |wb| {
            if let Err(e) = reg.set_writeback(id, wb) {
                warn!(volume = %name, writeback = wb, "recording the guest's cache mode: {}", e.message());
            }
        });
        let device = attach::start(vol, &entry, self.qos.volume(info.id, &info.name), record_cache_mode)?;
        if let Err(e) = self.attachments.put(info.id, entry.clone()) {
            let _ = device.stop();
            remove_socket_if_present(socket);
            return Err(e);
        }
        info!(volume, socket = %socket.display(), num_queues, read_only, "attached");
        let a = Attached { volume_id: info.id, entry, restored, device };
        let msg = self.attachment_of(&a, &info.name);
        devs.insert(info.id, a);
        Ok(msg)
    }

    /// Detach by volume name or socket path (blocking). Refused while a frontend is connected,
    /// unless `force`; a frontend that is going away gets [`DETACH_GRACE`] to finish.
    pub fn detach(&self, volume: &str, socket: &str, force: bool) -> Result<proto::Attachment, Status> {
        let t0 = std::time::Instant::now();
        let a = loop {
            let mut devs = lock(&self.devices);
            let id = if !volume.is_empty() {
                let info = self.pool.volume_info(volume).map_err(engine_status)?;
                if !devs.contains_key(&info.id) {
                    // Recorded but not attached (it failed at this start, e.g. an encrypted
                    // volume without the master key): forget the record.
                    if let Some(e) = self.attachments.get(info.id) {
                        self.attachments.remove(info.id)?;
                        info!(volume, socket = %e.socket.display(), "recorded attachment forgotten (it was not attached)");
                        return Ok(recorded_attachment(&e, info.id, &info.name));
                    }
                    return Err(Status::failed_precondition(format!("volume {volume:?} is not attached")));
                }
                info.id
            } else if !socket.is_empty() {
                let p = Path::new(socket);
                devs.iter()
                    .find(|(_, a)| a.entry.socket == p)
                    .map(|(id, _)| *id)
                    .ok_or_else(|| Status::not_found(format!("no device is attached at {socket}")))?
            } else {
                return Err(Status::invalid_argument("name a volume or a socket to detach"));
            };
            let a = devs.get(&id).ok_or_else(|| Status::internal("device vanished"))?;
            if !force && a.device.connected() {
                if t0.elapsed() < DETACH_GRACE {
                    drop(devs);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                return Err(Status::failed_precondition(format!(
                    "volume {:?} is in use: a VM is connected to {}; stop the VM or unplug the disk first, or detach --force",
                    self.name_of(id),
                    a.entry.socket.display()
                )));
            }
            // Forgotten first: a daemon restarting after a failed write attaches it again
            // rather than dropping a device that may still be in use.
            self.attachments.remove(id)?;
            break devs.remove(&id).ok_or_else(|| Status::internal("device vanished"))?;
        };
        let name = self.name_of(a.volume_id);
        let mut msg = self.attachment_of(&a, &name);
        msg.connected = false;
        let socket = a.entry.socket.clone();
        a.device.stop().map_err(|e| Status::internal(format!("stopping the device at {}: {e}", socket.display())))?;
        remove_socket_if_present(&socket);
        info!(volume = %name, socket = %socket.display(), "detached");
        Ok(msg)
    }

    /// Create a volume with optional QoS settings (checked before the volume is created).
    fn create_volume(&self, r: &proto::CreateVolumeRequest) -> Result<VolumeInfo, Status> {
        let change = r.qos.clone().unwrap_or_default();
        crate::qos::apply_change(vblk_vhost::qos::Limits::default(), &change)?;
        let group = if r.qos_group.is_empty() {
            GroupChange::Keep
        } else if self.qos.group_exists(&r.qos_group) {
            GroupChange::Join(r.qos_group.clone())
        } else {
            return Err(Status::not_found(format!("no QoS group {:?}", r.qos_group)));
        };
        let v = if r.encrypted {
            self.pool.create_encrypted_volume(&r.name, r.size_bytes)
        } else {
            self.pool.create_volume(&r.name, r.size_bytes)
        }
        .map_err(engine_status)?;
        if !change.limits.is_empty() || change.iops_size.is_some() || group != GroupChange::Keep {
            if let Err(e) = self.qos.set(v.id, &v.name, &change, &group) {
                // Leave no volume without the limits it was asked for.
                if let Err(d) = self.pool.delete_volume(&r.name, false) {
                    warn!(volume = %r.name, "removing the volume whose QoS could not be set: {d}");
                }
                return Err(e);
            }
        }
        Ok(v)
    }

    /// The QoS view of a volume, by name.
    fn qos_info(&self, volume: &str) -> Result<proto::QosInfo, Status> {
        let v = self.pool.volume_info(volume).map_err(engine_status)?;
        Ok(self.qos.info(v.id, &v.name))
    }

    fn name_of(&self, id: u64) -> String {
        self.pool.list_volumes().into_iter().find(|v| v.id == id).map(|v| v.name).unwrap_or_default()
    }

    pub fn attachments(&self) -> Vec<proto::Attachment> {
        let names: BTreeMap<u64, String> = self.pool.list_volumes().into_iter().map(|v| (v.id, v.name)).collect();
        let devs = lock(&self.devices);
        devs.values().map(|a| self.attachment_of(a, names.get(&a.volume_id).map(String::as_str).unwrap_or(""))).collect()
    }

    /// Stop every device (shutdown).
    fn detach_all(&self) {
        let devs = std::mem::take(&mut *lock(&self.devices));
        for (_, a) in devs {
            let socket = a.entry.socket.clone();
            match a.device.stop() {
                Ok(()) => info!(socket = %socket.display(), "device stopped"),
                Err(e) => error!(socket = %socket.display(), "stopping device: {e}"),
            }
            remove_socket_if_present(&socket);
        }
    }
}

/// The API view of a recorded attachment (no device: not connected, no counters).
fn recorded_attachment(e: &AttachEntry, volume_id: u64, name: &str) -> proto::Attachment {
    proto::Attachment {
        volume: name.to_string(),
        volume_id,
        socket: e.socket.display().to_string(),
        num_queues: e.num_queues.into(),
        queue_size: e.queue_size.into(),
        read_only: e.read_only,
        ..Default::default()
    }
}

fn remove_socket_if_present(p: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if m.file_type().is_socket() {
            if let Err(e) = std::fs::remove_file(p) {
                warn!("removing {}: {e}", p.display());
            }
        }
    }
}

/// Make `path` free for a new listening socket: nothing there, or a socket nobody listens on
/// (left by a dead process), which is removed. A live socket or any other file is refused.
pub fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !m.file_type().is_socket() {
        bail!("{} exists and is not a socket; refusing to replace it", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("{} is in use: another process is listening on it", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("probing socket {}", path.display())),
    }
}

/// Bind a unix listener with mode 0600 (no window with wider permissions).
fn bind_private(path: &Path) -> anyhow::Result<UnixListener> {
    // SAFETY: umask only changes this process's file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let r = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = r.with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// The gRPC service.
pub struct Service {
    st: Arc<DaemonState>,
}

type ProgressStream = ReceiverStream<Result<proto::TransferProgress, Status>>;

#[tonic::async_trait]
impl Vblk for Service {
    async fn create_volume(&self, req: Request<proto::CreateVolumeRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let v = st.create_volume(&r)?;
            info!(volume = %r.name, size = r.size_bytes, "volume created");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn list_volumes(&self, _req: Request<proto::ListVolumesRequest>) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let st = self.st.clone();
        let volumes = blocking(move || Ok(st.pool.list_volumes().into_iter().map(|v| st.volume_msg(v)).collect())).await?;
        Ok(Response::new(proto::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<proto::GetVolumeRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || Ok(st.volume_msg(st.pool.volume_info(&r.name).map_err(engine_status)?))).await?;
        Ok(Response::new(v))
    }

    async fn resize_volume(&self, req: Request<proto::ResizeVolumeRequest>) -> Result<Response<proto::Volume>, Status> {
        use proto::resize_volume_request::Size;
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let cur = st.pool.volume_info(&r.name).map_err(engine_status)?.size_bytes;
            let new = match r.size {
                Some(Size::SizeBytes(n)) => n,
                Some(Size::GrowByBytes(n)) => cur
                    .checked_add(n)
                    .ok_or_else(|| Status::invalid_argument(format!("{cur} + {n} bytes overflows")))?,
                Some(Size::ShrinkByBytes(n)) => cur.checked_sub(n).filter(|&s| s > 0).ok_or_else(|| {
                    Status::invalid_argument(format!("cannot shrink a {cur}-byte volume by {n} bytes"))
                })?,
                None => return Err(Status::invalid_argument("no size given")),
            };
            let v = st.pool.resize_volume(&r.name, new, r.allow_shrink).map_err(engine_status)?;
            info!(volume = %r.name, from = cur, to = new, "volume resized");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn rename_volume(&self, req: Request<proto::RenameVolumeRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let v = st.pool.rename_volume(&r.name, &r.new_name).map_err(engine_status)?;
            st.qos.renamed(v.id, &v.name);
            info!(volume = %r.name, new_name = %r.new_name, "volume renamed");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn delete_volume(&self, req: Request<proto::DeleteVolumeRequest>) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let deleted = blocking(move || {
            // A recursive delete removes clones too: forget the QoS of every volume that went.
            let mut deleted = Vec::new();
            let before = st.pool.list_volumes();
            let res = st.pool.delete_volume(&r.name, r.recursive);
            // Even on failure: a recursive delete may have removed some clones before stopping.
            let after: std::collections::BTreeSet<u64> = st.pool.list_volumes().into_iter().map(|v| v.id).collect();
            for v in before.into_iter().filter(|v| !after.contains(&v.id)) {
                info!(volume = %v.name, recursive = r.recursive, "volume deleted");
                if let Err(e) = st.qos.forget(v.id) {
                    // The volume is gone; its stale entry is dropped at the next daemon start.
                    warn!(volume = %v.name, "forgetting its QoS settings: {}", e.message());
                }
                deleted.push(v.name);
            }
            res.map_err(engine_status)?;
            // The named volume first, then its clones.
            deleted.sort_by_key(|n| *n != r.name);
            Ok(deleted)
        })
        .await?;
        Ok(Response::new(proto::DeleteVolumeResponse { deleted }))
    }

    async fn pool_status(&self, _req: Request<proto::PoolStatusRequest>) -> Result<Response<proto::PoolStatusResponse>, Status> {
        let st = self.st.clone();
        let s = blocking(move || {
            let s = st.pool.status();
            Ok(proto::PoolStatusResponse {
                path: s.path.display().to_string(),
                meta_dir: s.meta_dir.display().to_string(),
                uuid: s.uuid,
                format_version: s.version,
                total_bytes: s.total_bytes,
                used_bytes: s.used_bytes,
                free_bytes: s.free_bytes,
                pending_free_bytes: s.pending_free_bytes,
                volumes: s.volumes.into_iter().map(|v| st.volume_msg(v)).collect(),
                snapshot_bytes: s.snapshot_bytes,
                memory: Some(memory_msg(&st.pool.memory())),
            })
        })
        .await?;
        Ok(Response::new(s))
    }

    async fn check(&self, _req: Request<proto::CheckRequest>) -> Result<Response<proto::CheckResponse>, Status> {
        let st = self.st.clone();
        let rep = blocking(move || st.pool.check().map_err(engine_status)).await?;
        if !rep.is_clean() {
            warn!(errors = rep.errors.len(), leaked_blocks = rep.leaked_blocks, "check found problems");
        }
        Ok(Response::new(check_msg(&rep)))
    }

    async fn attach(&self, req: Request<proto::AttachRequest>) -> Result<Response<proto::Attachment>, Status> {
        let r = req.into_inner();
        let queues = u16::try_from(r.num_queues).map_err(|_| Status::invalid_argument("too many queues"))?;
        let qsize = u16::try_from(r.queue_size).map_err(|_| Status::invalid_argument("queue size too large"))?;
        let threads = u16::try_from(r.threads).map_err(|_| Status::invalid_argument("too many threads"))?;
        let st = self.st.clone();
        let a = blocking(move || st.attach(&r.volume, Path::new(&r.socket), queues.max(1), if qsize == 0 { attach::DEFAULT_QUEUE_SIZE } else { qsize }, threads, r.pin_memory, r.read_only, false)).await?;
        Ok(Response::new(a))
    }

    async fn detach(&self, req: Request<proto::DetachRequest>) -> Result<Response<proto::Attachment>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let a = blocking(move || st.detach(&r.volume, &r.socket, r.force)).await?;
        Ok(Response::new(a))
    }

    async fn list_attachments(&self, _req: Request<proto::ListAttachmentsRequest>) -> Result<Response<proto::ListAttachmentsResponse>, Status> {
        let st = self.st.clone();
        let attachments = blocking(move || Ok(st.attachments())).await?;
        Ok(Response::new(proto::ListAttachmentsResponse { attachments }))
    }

    type ImportStream = ProgressStream;

    async fn import(&self, req: Request<proto::ImportRequest>) -> Result<Response<Self::ImportStream>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.transfer(move |st, p| transfer::import(st, &r, p))))
    }

    type ExportStream = ProgressStream;

    async fn export(&self, req: Request<proto::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.transfer(move |st, p| transfer::export(st, &r, p))))
    }

    async fn qos_set(&self, req: Request<proto::QosSetRequest>) -> Result<Response<proto::QosInfo>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let i = blocking(move || {
            let v = st.pool.volume_info(&r.volume).map_err(engine_status)?;
            let group = match (r.group.is_empty(), r.leave_group) {
                (true, false) => GroupChange::Keep,
                (true, true) => GroupChange::Leave,
                (false, false) => GroupChange::Join(r.group.clone()),
                (false, true) => return Err(Status::invalid_argument("join a group or leave it, not both")),
            };
            st.qos.set(v.id, &v.name, &r.change.unwrap_or_default(), &group)?;
            Ok(st.qos.info(v.id, &v.name))
        })
        .await?;
        Ok(Response::new(i))
    }

    async fn qos_show(&self, req: Request<proto::QosShowRequest>) -> Result<Response<proto::QosInfo>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        Ok(Response::new(blocking(move || st.qos_info(&r.volume)).await?))
    }

    async fn qos_group_create(&self, req: Request<proto::QosGroupCreateRequest>) -> Result<Response<proto::QosGroup>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        Ok(Response::new(blocking(move || st.qos.group_create(&r.name, &r.limits.unwrap_or_default())).await?))
    }

    async fn qos_group_set(&self, req: Request<proto::QosGroupSetRequest>) -> Result<Response<proto::QosGroup>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        Ok(Response::new(blocking(move || st.qos.group_set(&r.name, &r.change.unwrap_or_default())).await?))
    }

    async fn qos_group_delete(&self, req: Request<proto::QosGroupDeleteRequest>) -> Result<Response<proto::QosGroupDeleteResponse>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        blocking(move || st.qos.group_delete(&r.name)).await?;
        Ok(Response::new(proto::QosGroupDeleteResponse {}))
    }

    async fn qos_group_list(&self, _req: Request<proto::QosGroupListRequest>) -> Result<Response<proto::QosGroupListResponse>, Status> {
        let st = self.st.clone();
        let groups = blocking(move || Ok(st.qos.groups())).await?;
        Ok(Response::new(proto::QosGroupListResponse { groups }))
    }

    async fn snapshot_create(&self, req: Request<proto::SnapshotCreateRequest>) -> Result<Response<proto::Snapshot>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let s = blocking(move || {
            let s = st.pool.snapshot_create(&r.volume, &r.name).map_err(engine_status)?;
            info!(volume = %r.volume, snapshot = %r.name, generation = s.generation, "snapshot created");
            Ok(snapshot_msg(s))
        })
        .await?;
        Ok(Response::new(s))
    }

    async fn snapshot_list(&self, req: Request<proto::SnapshotListRequest>) -> Result<Response<proto::SnapshotListResponse>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let snapshots = blocking(move || {
            let vol = Some(r.volume.as_str()).filter(|v| !v.is_empty());
            Ok(st.pool.snapshot_list(vol).map_err(engine_status)?.into_iter().map(snapshot_msg).collect())
        })
        .await?;
        Ok(Response::new(proto::SnapshotListResponse { snapshots }))
    }

    async fn snapshot_delete(&self, req: Request<proto::SnapshotDeleteRequest>) -> Result<Response<proto::SnapshotDeleteResponse>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        blocking(move || {
            st.pool.snapshot_delete(&r.volume, &r.name).map_err(engine_status)?;
            info!(volume = %r.volume, snapshot = %r.name, "snapshot deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(proto::SnapshotDeleteResponse {}))
    }

    async fn snapshot_rollback(&self, req: Request<proto::SnapshotRollbackRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let v = st.pool.snapshot_rollback(&r.volume, &r.name).map_err(engine_status)?;
            info!(volume = %r.volume, snapshot = %r.name, "volume rolled back");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn clone_volume(&self, req: Request<proto::CloneVolumeRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let v = st.pool.clone_volume(&r.volume, &r.snapshot, &r.new_name).map_err(engine_status)?;
            info!(volume = %r.new_name, origin = %format!("{}@{}", r.volume, r.snapshot), "clone created");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn clone_flatten(&self, req: Request<proto::CloneFlattenRequest>) -> Result<Response<proto::Volume>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let v = blocking(move || {
            let v = st.pool.clone_flatten(&r.volume).map_err(engine_status)?;
            info!(volume = %r.volume, allocated = v.allocated_bytes, "clone flattened");
            Ok(st.volume_msg(v))
        })
        .await?;
        Ok(Response::new(v))
    }

    async fn diff(&self, req: Request<proto::DiffRequest>) -> Result<Response<proto::DiffResponse>, Status> {
        let r = req.into_inner();
        let st = self.st.clone();
        let d = blocking(move || {
            let to = Some(r.to_snapshot.as_str()).filter(|t| !t.is_empty());
            let ranges = st.pool.diff(&r.volume, &r.from_snapshot, to).map_err(engine_status)?;
            Ok(diff_msg(&ranges))
        })
        .await?;
        Ok(Response::new(d))
    }
}

fn snapshot_msg(s: SnapshotInfo) -> proto::Snapshot {
    proto::Snapshot {
        volume: s.volume,
        name: s.name,
        created_ns: s.created_ns,
        size_bytes: s.size_bytes,
        referenced_bytes: s.referenced_bytes,
        exclusive_bytes: s.exclusive_bytes,
        clones: s.clones,
        generation: s.generation,
    }
}

fn diff_msg(ranges: &[vblk_engine::DiffRange]) -> proto::DiffResponse {
    proto::DiffResponse {
        changed_bytes: ranges.iter().map(|r| r.len).sum(),
        ranges: ranges.iter().map(|r| proto::DiffRange { offset: r.offset, length: r.len }).collect(),
    }
}

impl Service {
    /// Run a copy on a blocking thread, streaming its progress and then its result.
    fn transfer<F>(&self, f: F) -> ProgressStream
    where
        F: FnOnce(&DaemonState, &mut transfer::Progress) -> Result<proto::TransferProgress, Status> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        let st = self.st.clone();
        tokio::task::spawn_blocking(move || {
            let mut p = transfer::Progress::new(tx.clone(), st.clone());
            let last = f(&st, &mut p);
            if let Err(e) = &last {
                warn!("transfer failed: {}", e.message());
            }
            let _ = tx.blocking_send(last);
        });
        ReceiverStream::new(rx)
    }
}

pub fn check_msg(rep: &vblk_engine::CheckReport) -> proto::CheckResponse {
    proto::CheckResponse {
        clean: rep.is_clean(),
        records: rep.records,
        map_entries: rep.map_entries,
        referenced_blocks: rep.referenced_blocks,
        allocated_blocks: rep.allocated_blocks,
        leaked_blocks: rep.leaked_blocks,
        errors: rep.errors.clone(),
    }
}

/// `vblk daemon`: returns when a signal asked it to stop and everything is shut down.
pub async fn run(args: DaemonArgs, api_socket: PathBuf) -> anyhow::Result<()> {
    // Installed first: a SIGTERM during startup is then acted on as soon as the API serves.
    let signals = Signals::install()?;
    // Absolute paths, so that status shows where the pool really is.
    let pool_path = std::path::absolute(&args.pool).with_context(|| format!("resolving {}", args.pool.display()))?;
    let meta_dir = match &args.meta_dir {
        Some(d) => Some(std::path::absolute(d).with_context(|| format!("resolving {}", d.display()))?),
        None => None,
    };
    let master_key = crate::keys::master_key(&args.master_key)?;
    let opts = PoolOptions { meta_dir, cache_bytes: usize::try_from(args.cache).unwrap_or(usize::MAX), master_key, ..Default::default() };
    let shown = pool_path.clone();
    info!(pool = %shown.display(), "opening the pool");
    // The pool lock decides first whether another daemon is alive.
    let pool = tokio::task::spawn_blocking(move || Pool::open(&pool_path, &opts))
        .await
        .context("opening the pool")?
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let uuid = vblk_engine::uuid_string(&pool.superblock().uuid);
    info!(pool = %shown.display(), uuid = %uuid, "pool opened");
    let meta_dir = pool.status().meta_dir;
    let vols: Vec<(u64, String)> = pool.list_volumes().into_iter().map(|v| (v.id, v.name)).collect();
    let qos = match QosRegistry::load(&meta_dir, &uuid, &vols) {
        Ok(q) => q,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || drop(pool)).await;
            return Err(e.context("loading the QoS settings"));
        }
    };
    let attachments = match AttachmentRegistry::load(&meta_dir, &uuid) {
        Ok(a) => a,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || drop(pool)).await;
            return Err(e.context("loading the attachments"));
        }
    };
    let st = Arc::new(DaemonState::new(pool, qos, attachments));

    let listener = match prepare_api_socket(&api_socket) {
        Ok(l) => l,
        Err(e) => {
            shutdown_state(st).await;
            return Err(e);
        }
    };
    restore_attachments(&st, &args.attach).await;
    for spec in &args.attach {
        if let Err(e) = attach_at_startup(&st, spec).await {
            st.detach_all();
            remove_socket_if_present(&api_socket);
            shutdown_state(st).await;
            return Err(e);
        }
    }

    info!(socket = %api_socket.display(), "serving the API");
    let trim = tokio::spawn(trim_heap_periodically());
    let svc = VblkServer::new(Service { st: st.clone() });
    let stop_st = st.clone();
    let signal = async move {
        signals.wait().await;
        stop_st.shutting_down.store(true, Ordering::Release);
    };
    let served = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
        .await;
    if let Err(e) = &served {
        error!("API server: {e}");
    }
    trim.abort();
    st.shutting_down.store(true, Ordering::Release);
    st.detach_all();
    remove_socket_if_present(&api_socket);
    shutdown_state(st).await;
    info!("stopped");
    served.context("serving the API")
}

fn prepare_api_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clear_stale_socket(path).context("the API socket")?;
    bind_private(path)
}

/// Attach again what `attachments.json` recorded (see [`crate::attachments`]). Entries of
/// volumes that no longer exist are dropped; one that fails now is kept for the next start and
/// logged, and the daemon serves the others.
async fn restore_attachments(st: &Arc<DaemonState>, attach: &[AttachSpec]) {
    let entries = st.attachments.entries();
    if entries.is_empty() {
        return;
    }
    let names: BTreeMap<u64, String> = st.pool.list_volumes().into_iter().map(|v| (v.id, v.name)).collect();
    let mut restored = 0;
    for (id, e) in entries {
        let Some(name) = names.get(&id).cloned() else {
            warn!(volume = %e.name, id, socket = %e.socket.display(), "recorded attachment of a volume that no longer exists dropped");
            if let Err(s) = st.attachments.remove(id) {
                warn!("{}", s.message());
            }
            continue;
        };
        // `daemon --attach` of this volume decides instead (attached right after).
        if attach.iter().any(|s| s.volume == name) {
            continue;
        }
        let st2 = st.clone();
        let e2 = e.clone();
        let r = blocking(move || {
            st2.attach(&name, &e2.socket, e2.num_queues, e2.queue_size, e2.threads, e2.pin_memory, e2.read_only, true)
        })
        .await;
        match r {
            Ok(_) => restored += 1,
            Err(s) => warn!(volume = %e.name, id, socket = %e.socket.display(), "cannot attach the recorded attachment again (kept for the next start): {}", s.message()),
        }
    }
    info!(restored, "attachments of the previous run attached again");
}

async fn attach_at_startup(st: &Arc<DaemonState>, spec: &AttachSpec) -> anyhow::Result<()> {
    let socket = std::path::absolute(&spec.socket).with_context(|| format!("resolving {}", spec.socket.display()))?;
    let st2 = st.clone();
    let vol = spec.volume.clone();
    let q = spec.queues;
    // A recorded attachment of this volume was not restored (`restore_attachments`): this one
    // replaces it, in the guest's recorded cache mode.
    blocking(move || st2.attach(&vol, &socket, q, attach::DEFAULT_QUEUE_SIZE, 0, false, false, false))
        .await
        .map_err(|s| anyhow::anyhow!("--attach {}: {}", spec.volume, s.message()))?;
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP, ignored: a daemon started from a shell (`vblk daemon ... &`) must not die,
    /// uncleanly, when that terminal goes away; there is no configuration to reload.
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn wait(mut self) {
        let which = loop {
            tokio::select! {
                _ = self.term.recv() => break "SIGTERM",
                _ = self.int.recv() => break "SIGINT",
                _ = self.hup.recv() => info!("SIGHUP ignored (nothing to reload); stop the daemon with SIGTERM"),
            }
        };
        info!("{which}: shutting down");
    }
}

/// Wait for every user of the state (transfers finishing after cancellation) to let go, then
/// drop it: the pool commits and releases its lock.
async fn shutdown_state(st: Arc<DaemonState>) {
    st.shutting_down.store(true, Ordering::Release);
    let start = Instant::now();
    let mut st = st;
    loop {
        match Arc::try_unwrap(st) {
            Ok(inner) => {
                let _ = tokio::task::spawn_blocking(move || drop(inner)).await;
                return;
            }
            Err(back) => st = back,
        }
        if start.elapsed() > Duration::from_secs(30) {
            warn!("requests still running after 30 s; exiting without waiting for them");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vblk_engine::Error as E;

    #[test]
    fn engine_errors_map_to_grpc_codes() {
        let cases: Vec<(E, Code)> = vec![
            (E::NoSuchVolume("a".into()), Code::NotFound),
            (E::VolumeExists("a".into()), Code::AlreadyExists),
            (E::NoSuchSnapshot("a@s".into()), Code::NotFound),
            (E::SnapshotExists("a@s".into()), Code::AlreadyExists),
            (E::HasDependents { name: "a".into(), what: "1 snapshot(s)".into() }, Code::FailedPrecondition),
            (E::Invalid("not a clone".into()), Code::InvalidArgument),
            (E::AlreadyExists { path: "/x".into() }, Code::AlreadyExists),
            (E::InvalidName { name: "-a".into(), why: "bad" }, Code::InvalidArgument),
            (E::InvalidSize("1".into()), Code::InvalidArgument),
            (E::OutOfRange { offset: 0, len: 1, size: 0 }, Code::InvalidArgument),
            (E::Misaligned { offset: 1, len: 1 }, Code::InvalidArgument),
            (E::Busy { name: "a".into(), why: "attached" }, Code::FailedPrecondition),
            (E::ReadOnly, Code::FailedPrecondition),
            (E::NoSpace, Code::ResourceExhausted),
            (E::ShuttingDown, Code::Unavailable),
            (E::QueueFull, Code::Internal),
            (E::DeviceIo(std::io::Error::other("boom")), Code::Internal),
            (E::Corrupt { location: vblk_engine::error::Location::Superblock, what: "x".into() }, Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = engine_status(e);
            assert_eq!(s.code(), code, "{text}");
            assert!(s.message().starts_with(&text), "{:?} vs {text}", s.message());
        }
    }

    #[test]
    fn status_message_carries_the_source() {
        let e = E::Io {
            op: "open",
            path: "/p".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let s = engine_status(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().starts_with("open /p: "), "{}", s.message());
        assert!(s.message().contains("No such file"), "{}", s.message());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        clear_stale_socket(&p).unwrap();
        {
            let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
            let e = clear_stale_socket(&p).unwrap_err();
            assert!(format!("{e:#}").contains("in use"), "{e:#}");
        }
        // The listener is gone; the file stays behind.
        assert!(p.exists());
        clear_stale_socket(&p).unwrap();
        assert!(!p.exists());
        std::fs::write(&p, b"x").unwrap();
        let e = clear_stale_socket(&p).unwrap_err();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
    }
}

/// The engine's memory figures plus the process's (RSS from /proc/self/statm, the allocator's
/// from mallinfo2).
fn memory_msg(m: &vblk_engine::MemoryStats) -> proto::MemoryStats {
    let rss_bytes = resident_bytes().unwrap_or(0);
    // SAFETY: mallinfo2 only reads the allocator's statistics; no pointers are involved.
    let mi = unsafe { libc::mallinfo2() };
    proto::MemoryStats {
        cache_budget_bytes: m.cache_budget_bytes,
        map_cache_entries: m.map_cache_entries,
        map_cache_bytes: m.map_cache_bytes,
        pending_entries: m.pending_entries,
        pending_bytes: m.pending_bytes,
        rocksdb_memtable_bytes: m.rocksdb_memtable_bytes,
        rocksdb_block_cache_bytes: m.rocksdb_block_cache_bytes,
        rocksdb_table_readers_bytes: m.rocksdb_table_readers_bytes,
        rss_bytes,
        heap_in_use_bytes: (mi.uordblks + mi.hblkhd) as u64,
        heap_free_bytes: mi.fordblks as u64,
    }
}

/// Growth of the resident set since the last trim (or its lowest point since) that makes the
/// daemon hand free heap memory back to the system.
/// How long a detach waits for a frontend that is going away (a VM that just exited) before it
/// refuses to pull the device from under a connected one.
const DETACH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

const TRIM_AFTER_GROWTH: u64 = 8 << 20;

/// Seconds the resident set must stay within a MiB, after it moved, for the settling trim.
const TRIM_WHEN_SETTLED_SECS: u32 = 3;

/// The process's resident set in bytes (/proc/self/statm: no allocator locks taken).
fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// Give free heap memory back to the system when the resident set has grown, and once more
/// when it has settled after a change. The RocksDB block cache and the map tables churn many
/// small blocks; glibc keeps the pages of freed ones (measured: 45 MiB free but resident next
/// to 83 MiB in use, `daemon_memory` bench) until `malloc_trim` releases every free page inside
/// its heaps. The second rule catches what a burst of writes leaves behind: its compactions and
/// commits free their buffers after the growth that triggered the last trim (measured: 53 MiB
/// free and resident 6 s after the writes, RSS 141 MiB; 121 MiB with the rule). Checked every
/// second from the resident set alone: `mallinfo2` and `malloc_trim` take the allocator's arena
/// locks, which the I/O threads need, so they run only when there is something to gain.
async fn trim_heap_periodically() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The lowest resident set since the last trim.
    let mut low = u64::MAX;
    // The previous reading, the seconds since it last moved by a MiB or more, and whether it
    // moved since the last trim.
    let (mut last, mut quiet, mut moved) = (0u64, 0u32, false);
    loop {
        tick.tick().await;
        let Some(rss) = resident_bytes() else { continue };
        low = low.min(rss);
        if rss.abs_diff(last) >= 1 << 20 {
            (moved, quiet) = (true, 0);
        } else {
            quiet += 1;
        }
        last = rss;
        let grown = rss >= low + TRIM_AFTER_GROWTH;
        let settled = moved && quiet >= TRIM_WHEN_SETTLED_SECS;
        if !grown && !settled {
            continue;
        }
        let Ok(after) = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            // SAFETY: malloc_trim only adjusts the allocator's own state.
            unsafe { libc::malloc_trim(0) };
            let after = resident_bytes().unwrap_or(rss);
            tracing::debug!(rss_before = rss, rss_after = after, ms = t.elapsed().as_secs_f64() * 1e3, grown, settled, "heap trimmed");
            after
        })
        .await
        else {
            continue;
        };
        (low, last, moved) = (after, after, false);
    }
}
