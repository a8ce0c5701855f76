//! The JSON files the daemon keeps beside RocksDB's in the pool's metadata directory
//! (`qos.json`, `attachments.json`): each carries a format version and its pool's uuid, and is
//! written atomically (a temporary file, fsynced, renamed, the directory fsynced).

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::Status;
use tracing::warn;

/// The contents of one such file.
pub(crate) trait PoolFile: Serialize + DeserializeOwned {
    /// The format version this daemon reads and writes.
    const VERSION: u32;
    /// What the file holds, for messages ("QoS settings").
    const WHAT: &'static str;
    /// Appended to a parse error: what to do about a damaged file.
    const HINT: &'static str;
    fn version(&self) -> u32;
    fn pool_uuid(&self) -> &str;
}

/// Read `path`: `None` when it does not exist, or when it names another pool than `pool_uuid`
/// (logged and ignored). A file that does not parse or has another version is an error naming it.
pub(crate) fn read<F: PoolFile>(path: &Path, pool_uuid: &str) -> anyhow::Result<Option<F>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    };
    let f: F = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e} ({})", path.display(), F::HINT))?;
    if f.version() != F::VERSION {
        anyhow::bail!("{}: version {} is not supported (this daemon reads version {})", path.display(), f.version(), F::VERSION);
    }
    if f.pool_uuid() != pool_uuid {
        warn!(file = %path.display(), file_pool = %f.pool_uuid(), pool = %pool_uuid, "{} of another pool ignored", F::WHAT);
        return Ok(None);
    }
    Ok(Some(f))
}

/// Write `f` to `path` atomically.
pub(crate) fn write<F: PoolFile>(path: &Path, f: &F) -> Result<(), Status> {
    let mut text = serde_json::to_string_pretty(f).map_err(|e| Status::internal(format!("encoding the {}: {e}", F::WHAT)))?;
    text.push('\n');
    write_atomic(path, text.as_bytes()).map_err(|e| Status::internal(format!("writing {}: {e}", path.display())))
}

/// Write `data` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
