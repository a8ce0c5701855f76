//! Operator commands: each one is a gRPC call to the daemon over its unix socket.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use crate::cli_args::{
    AttachArgs, CloneArgs, CloneCmd, CreateSize, DetachArgs, DiffArgs, ExportArgs, ImportArgs, PoolCmd, QosCmd, QosGroupCmd,
    QosLimitArgs, ResizeTo, SnapCmd, VolCmd,
};
use crate::output;
use crate::proto;
use crate::proto::vblk_client::VblkClient;
use crate::units::format_size;

type Client = VblkClient<Channel>;

/// A gRPC status as an operator-facing error (its message; the code only when there is none).
pub fn rpc_error(s: Status) -> anyhow::Error {
    if s.message().is_empty() {
        anyhow!("the daemon answered {:?}", s.code())
    } else {
        anyhow!("{}", s.message())
    }
}

pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let hint = || {
        format!(
            "cannot reach the vblk daemon at {} (is `vblk daemon` running? see --api-socket / VBLK_API_SOCKET)",
            socket.display()
        )
    };
    // Probe first: a plain connect gives the clearest error (no such file, refused, permission).
    drop(UnixStream::connect(socket).await.with_context(hint)?);
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://vblk.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(hint)?;
    Ok(VblkClient::new(channel).max_decoding_message_size(64 << 20))
}

pub async fn pool(socket: &Path, cmd: PoolCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        PoolCmd::Create(_) | PoolCmd::Rekey(_) => unreachable!("runs offline"),
        PoolCmd::Status => {
            let mut c = connect(socket).await?;
            let s = c.pool_status(proto::PoolStatusRequest {}).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&s)?;
            } else {
                println!("{}", output::pool_status(&s));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn vol(socket: &Path, cmd: VolCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let show = |v: &proto::Volume, human: String| -> anyhow::Result<()> {
        if json {
            output::json(v)
        } else {
            println!("{human}");
            Ok(())
        }
    };
    match cmd {
        VolCmd::Create { name, size, qos, qos_group, encrypt } => {
            let change = qos_change(&qos, false);
            let limited = !change.limits.is_empty() || change.iops_size.is_some() || qos_group.is_some();
            let req = proto::CreateVolumeRequest {
                name,
                size_bytes: size,
                qos: Some(change),
                qos_group: qos_group.unwrap_or_default(),
                encrypted: encrypt,
            };
            let v = c.create_volume(req).await.map_err(rpc_error)?.into_inner();
            let mut msg = format!("created {}volume {} ({})", if v.encrypted { "encrypted " } else { "" }, v.name, format_size(v.size_bytes));
            if limited {
                let q = c.qos_show(proto::QosShowRequest { volume: v.name.clone() }).await.map_err(rpc_error)?.into_inner();
                msg.push_str(&format!("\nqos: {}", output::qos_summary(&q)));
            }
            show(&v, msg)?;
        }
        VolCmd::List => {
            let l = c.list_volumes(proto::ListVolumesRequest {}).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&l.volumes)?;
            } else {
                println!("{}", output::volumes_table(&l.volumes));
            }
        }
        VolCmd::Info { name } => {
            let v = c.get_volume(proto::GetVolumeRequest { name }).await.map_err(rpc_error)?.into_inner();
            show(&v, output::volume_details(&v))?;
        }
        VolCmd::Resize { name, size, shrink } => {
            use proto::resize_volume_request::Size;
            let size = match size {
                ResizeTo::Absolute(n) => Size::SizeBytes(n),
                ResizeTo::GrowBy(n) => Size::GrowByBytes(n),
                ResizeTo::ShrinkBy(n) => Size::ShrinkByBytes(n),
            };
            let v = c
                .resize_volume(proto::ResizeVolumeRequest { name, size: Some(size), allow_shrink: shrink })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show(&v, format!("resized volume {} to {}", v.name, format_size(v.size_bytes)))?;
        }
        VolCmd::Rename { old, new } => {
            let v = c.rename_volume(proto::RenameVolumeRequest { name: old.clone(), new_name: new }).await.map_err(rpc_error)?.into_inner();
            show(&v, format!("renamed volume {old} to {}", v.name))?;
        }
        VolCmd::Delete { name, recursive } => {
            let r = c.delete_volume(proto::DeleteVolumeRequest { name: name.clone(), recursive }).await.map_err(rpc_error)?.into_inner();
            let clones: Vec<&String> = r.deleted.iter().filter(|n| **n != name).collect();
            if json {
                output::json(&serde_json::json!({ "deleted": name, "deleted_clones": clones }))?;
            } else if clones.is_empty() {
                println!("deleted volume {name}");
            } else {
                let list: Vec<&str> = clones.iter().map(|s| s.as_str()).collect();
                println!("deleted volume {name} and its clone(s) {}", list.join(", "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn snap(socket: &Path, cmd: SnapCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    match cmd {
        SnapCmd::Create { snapshot } => {
            let req = proto::SnapshotCreateRequest { volume: snapshot.volume, name: snapshot.snapshot };
            let s = c.snapshot_create(req).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&s)?;
            } else {
                println!("created snapshot {}\n{}", output::snap_name(&s), output::snapshot_details(&s));
            }
        }
        SnapCmd::List { volume } => {
            let l = c
                .snapshot_list(proto::SnapshotListRequest { volume: volume.unwrap_or_default() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                output::json(&l.snapshots)?;
            } else {
                println!("{}", output::snapshots_table(&l.snapshots));
            }
        }
        SnapCmd::Delete { snapshot } => {
            let req = proto::SnapshotDeleteRequest { volume: snapshot.volume.clone(), name: snapshot.snapshot.clone() };
            c.snapshot_delete(req).await.map_err(rpc_error)?;
            if json {
                output::json(&serde_json::json!({ "deleted": snapshot.to_string() }))?;
            } else {
                println!("deleted snapshot {snapshot}");
            }
        }
        SnapCmd::Rollback { snapshot } => {
            let req = proto::SnapshotRollbackRequest { volume: snapshot.volume.clone(), name: snapshot.snapshot.clone() };
            let v = c.snapshot_rollback(req).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&v)?;
            } else {
                println!("rolled back volume {} to snapshot {snapshot}\n{}", v.name, output::volume_details(&v));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn clone(socket: &Path, a: CloneArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let (v, human) = match a.into_cmd() {
        CloneCmd::Create { snapshot, new_name } => {
            let req = proto::CloneVolumeRequest { volume: snapshot.volume.clone(), snapshot: snapshot.snapshot.clone(), new_name };
            let v = c.clone_volume(req).await.map_err(rpc_error)?.into_inner();
            let msg = format!("created volume {} ({}) as a clone of {snapshot}", v.name, format_size(v.size_bytes));
            (v, msg)
        }
        CloneCmd::Flatten { volume } => {
            let v = c.clone_flatten(proto::CloneFlattenRequest { volume }).await.map_err(rpc_error)?.into_inner();
            let msg = format!(
                "flattened volume {}: it no longer depends on its origin snapshot ({} allocated)",
                v.name,
                format_size(v.allocated_bytes)
            );
            (v, msg)
        }
    };
    if json {
        output::json(&v)?;
    } else {
        println!("{human}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn diff(socket: &Path, a: DiffArgs, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(to) = &a.to {
        if to.volume != a.from.volume {
            return Err(anyhow!(
                "{} and {to} are snapshots of different volumes; diff compares two snapshots of one volume \
                 (or, with one argument, a snapshot and the live volume)",
                a.from
            ));
        }
    }
    let req = proto::DiffRequest {
        volume: a.from.volume.clone(),
        from_snapshot: a.from.snapshot.clone(),
        to_snapshot: a.to.map(|t| t.snapshot).unwrap_or_default(),
    };
    let mut c = connect(socket).await?;
    let d = c.diff(req).await.map_err(rpc_error)?.into_inner();
    if json {
        output::json(&d)?;
    } else {
        println!("{}", output::diff_table(&d));
    }
    Ok(ExitCode::SUCCESS)
}

/// Absolute form of a path typed by the operator (the daemon has another working directory).
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

pub async fn attach(socket: &Path, a: AttachArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let req = proto::AttachRequest {
        volume: a.volume,
        socket: absolute(&a.socket)?.display().to_string(),
        num_queues: a.queues.into(),
        queue_size: a.queue_size.into(),
        read_only: a.read_only,
        threads: a.threads.map(u32::from).unwrap_or(0),
        pin_memory: a.pin_memory,
    };
    let r = c.attach(req).await.map_err(rpc_error)?.into_inner();
    if json {
        output::json(&r)?;
    } else {
        println!("{}", output::attachment(&r));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn detach(socket: &Path, a: DetachArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let sock = match &a.socket {
        Some(s) => absolute(s)?.display().to_string(),
        None => String::new(),
    };
    let r = c
        .detach(proto::DetachRequest { volume: a.volume.unwrap_or_default(), socket: sock, force: a.force })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if json {
        output::json(&r)?;
    } else {
        println!("detached {} from {}", r.volume, r.socket);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn devices(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let r = c.list_attachments(proto::ListAttachmentsRequest {}).await.map_err(rpc_error)?.into_inner();
    if json {
        output::json(&r.attachments)?;
    } else {
        println!("{}", output::devices_table(&r.attachments));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_check(r: &proto::CheckResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(r)?;
    } else {
        println!("{}", output::check_report(r));
    }
    Ok(if r.clean { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub async fn check(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    let r = c.check(proto::CheckRequest {}).await.map_err(rpc_error)?.into_inner();
    print_check(&r, json)
}

pub async fn import(socket: &Path, a: ImportArgs, json: bool) -> anyhow::Result<ExitCode> {
    if a.file == Path::new("-") {
        anyhow::bail!("importing from standard input is not supported: the daemon reads the image from a file (give its path)");
    }
    let file = absolute(&a.file)?;
    std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?;
    let tmp_dir = match a.tmp_dir {
        Some(d) => d,
        None => std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into()),
    };
    let req = proto::ImportRequest {
        path: file.display().to_string(),
        volume: a.volume.clone(),
        create_size_bytes: match a.create_size {
            CreateSize::Auto => 0,
            CreateSize::Bytes(n) => n,
        },
        format: a.format,
        tmp_dir: absolute(&tmp_dir)?.display().to_string(),
        rate_bytes_per_sec: a.rate.unwrap_or(0),
        encrypted: a.encrypt,
    };
    let mut c = connect(socket).await?;
    let stream = c.import(req).await.map_err(rpc_error)?.into_inner();
    let last = follow(stream, json, "importing").await.with_context(|| format!("importing {} into {}", file.display(), a.volume))?;
    if json {
        output::json(&last)?;
    } else {
        let size = last.volume.as_ref().map(|v| v.size_bytes).unwrap_or(0);
        let mut s = format!(
            "imported {} into volume {}: {} image, {} written",
            file.display(),
            a.volume,
            format_size(last.total_bytes),
            format_size(last.written_bytes)
        );
        if last.created {
            s.push_str(&format!(" (created the volume, {})", format_size(size)));
        }
        if !last.note.is_empty() {
            s.push_str(&format!("; {}", last.note));
        }
        println!("{s}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn export(socket: &Path, a: ExportArgs, json: bool) -> anyhow::Result<ExitCode> {
    if a.file == Path::new("-") {
        anyhow::bail!("exporting to standard output is not supported: the daemon writes a sparse file (give its path)");
    }
    let file = absolute(&a.file)?;
    let req = proto::ExportRequest {
        volume: a.volume.clone(),
        path: file.display().to_string(),
        force: a.force,
        rate_bytes_per_sec: a.rate.unwrap_or(0),
    };
    let mut c = connect(socket).await?;
    let stream = c.export(req).await.map_err(rpc_error)?.into_inner();
    let last = follow(stream, json, "exporting").await.with_context(|| format!("exporting {} to {}", a.volume, file.display()))?;
    if json {
        output::json(&last)?;
    } else {
        let mut s = format!("exported volume {} to {}: {}", a.volume, file.display(), format_size(last.total_bytes));
        if last.written_bytes < last.total_bytes {
            s.push_str(&format!(", {} of data, the rest left as holes", format_size(last.written_bytes)));
        }
        println!("{s}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The API change for QoS options (`clear` first).
fn qos_change(a: &QosLimitArgs, clear: bool) -> proto::QosChange {
    proto::QosChange {
        clear,
        limits: a
            .by_kind()
            .into_iter()
            .filter(|(_, r, b, s)| r.is_some() || b.is_some() || s.is_some())
            .map(|(kind, rate, burst, burst_secs)| proto::QosLimitChange { kind: kind.into(), rate, burst, burst_secs })
            .collect(),
        iops_size: a.iops_size,
    }
}

pub async fn qos(socket: &Path, cmd: QosCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(socket).await?;
    match cmd {
        QosCmd::Set { volume, limits, clear, group, no_group } => {
            let req = proto::QosSetRequest {
                volume,
                change: Some(qos_change(&limits, clear)),
                group: group.unwrap_or_default(),
                leave_group: no_group,
            };
            let i = c.qos_set(req).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&i)?;
            } else {
                println!("{}: {}", i.volume, output::qos_summary(&i));
            }
        }
        QosCmd::Show { volume } => {
            let i = c.qos_show(proto::QosShowRequest { volume }).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&i)?;
            } else {
                println!("{}", output::qos_details(&i));
            }
        }
        QosCmd::Group(QosGroupCmd::Create { name, limits }) => {
            let g = c
                .qos_group_create(proto::QosGroupCreateRequest { name, limits: Some(qos_change(&limits, false)) })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                output::json(&g)?;
            } else {
                println!("created QoS group {}: {}", g.name, output::limits_text(g.limits.as_ref()));
            }
        }
        QosCmd::Group(QosGroupCmd::Set { name, limits, clear }) => {
            let g = c
                .qos_group_set(proto::QosGroupSetRequest { name, change: Some(qos_change(&limits, clear)) })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                output::json(&g)?;
            } else {
                println!("QoS group {}: {}", g.name, output::limits_text(g.limits.as_ref()));
            }
        }
        QosCmd::Group(QosGroupCmd::Delete { name }) => {
            c.qos_group_delete(proto::QosGroupDeleteRequest { name: name.clone() }).await.map_err(rpc_error)?;
            if json {
                output::json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted QoS group {name}");
            }
        }
        QosCmd::Group(QosGroupCmd::List) => {
            let l = c.qos_group_list(proto::QosGroupListRequest {}).await.map_err(rpc_error)?.into_inner();
            if json {
                output::json(&l.groups)?;
            } else {
                println!("{}", output::qos_groups_table(&l.groups));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Show a transfer's progress until its last message.
async fn follow(mut stream: tonic::Streaming<proto::TransferProgress>, json: bool, verb: &str) -> anyhow::Result<proto::TransferProgress> {
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    } else {
        let b = ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        b
    };
    let copying = ProgressStyle::with_template(
        "{msg:10} [{bar:40.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "));
    let mut phase = String::new();
    let result = loop {
        match stream.message().await {
            Ok(Some(m)) if m.done => break Ok(m),
            Ok(Some(m)) => {
                if m.phase != phase {
                    phase = m.phase.clone();
                    if phase == "copying" {
                        if let Ok(s) = &copying {
                            bar.set_style(s.clone());
                        }
                        bar.set_length(m.total_bytes);
                        bar.reset_eta();
                        bar.set_message(verb.to_string());
                    } else if !m.note.is_empty() {
                        bar.set_message(m.note.clone());
                    } else {
                        bar.set_message(phase.clone());
                    }
                }
                bar.set_position(m.done_bytes);
            }
            Ok(None) => break Err(anyhow!("the daemon closed the stream before the transfer finished")),
            Err(s) => break Err(rpc_error(s)),
        }
    };
    bar.finish_and_clear();
    result
}
