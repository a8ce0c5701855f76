//! Attachments that outlive the daemon process: `attachments.json` in the pool's metadata
//! directory (beside `qos.json`; `pool create --force` removes it with the metadata).
//!
//! `vblk attach` records the device (volume id, socket, queues, queue size, threads, pinning,
//! read-only) once it serves; `vblk detach` removes it. A daemon that starts again, after a
//! crash, `kill -9`, a SIGTERM or a reboot, attaches every recorded volume again before it
//! serves the API, so a QEMU with `reconnect=1` reconnects by itself and nobody has to remember
//! which socket each VM used. Entries are keyed by volume id (it survives renames); an entry
//! whose volume no longer exists is dropped, one that cannot be attached now (an encrypted
//! volume without the master key, a socket directory gone) is kept and logged. Written like
//! `qos.json`: a temporary file, fsynced, renamed, directory fsynced. A file naming another pool
//! is ignored; a file that does not parse stops the daemon with a message naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tonic::Status;
use tracing::warn;

use crate::pool_file::{self, PoolFile};

/// File name inside the metadata directory.
pub const FILE_NAME: &str = "attachments.json";
const FORMAT_VERSION: u32 = 1;

/// One recorded attachment (the arguments of `vblk attach`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The volume's name when it was attached (for people reading the file; the id decides).
    pub name: String,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub threads: u16,
    pub pin_memory: bool,
    pub read_only: bool,
    /// The cache mode the guest chose (virtio `CONFIG_WCE`): write-back until it writes one.
    /// QEMU keeps showing the guest the mode it last set, also across a daemon restart, so the
    /// device must come back in it.
    #[serde(default = "write_back")]
    pub writeback: bool,
}

fn write_back() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
struct AttachmentsFile {
    version: u32,
    pool_uuid: String,
    /// By volume id (decimal).
    attachments: BTreeMap<String, Entry>,
}

impl PoolFile for AttachmentsFile {
    const VERSION: u32 = FORMAT_VERSION;
    const WHAT: &'static str = "attachments";
    const HINT: &'static str = "fix or remove the file; it lists the volumes to attach at start";
    fn version(&self) -> u32 {
        self.version
    }
    fn pool_uuid(&self) -> &str {
        &self.pool_uuid
    }
}

pub struct AttachmentRegistry {
    path: PathBuf,
    pool_uuid: String,
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl AttachmentRegistry {
    /// Load `META_DIR/attachments.json` (if any) of pool `pool_uuid`: the entries to attach
    /// again, by volume id.
    pub fn load(meta_dir: &Path, pool_uuid: &str) -> anyhow::Result<AttachmentRegistry> {
        let path = meta_dir.join(FILE_NAME);
        let reg = AttachmentRegistry { path: path.clone(), pool_uuid: pool_uuid.to_string(), entries: Mutex::new(BTreeMap::new()) };
        let Some(f) = pool_file::read::<AttachmentsFile>(&path, pool_uuid)? else { return Ok(reg) };
        let mut entries = BTreeMap::new();
        for (key, e) in f.attachments {
            match key.parse::<u64>() {
                Ok(id) if e.socket.is_absolute() && e.num_queues > 0 => {
                    entries.insert(id, e);
                }
                _ => warn!(file = %path.display(), key, entry = ?e, "bad attachment entry skipped"),
            }
        }
        *reg.entries.lock().unwrap_or_else(|p| p.into_inner()) = entries;
        Ok(reg)
    }

    /// The recorded attachments, by volume id.
    pub fn entries(&self) -> BTreeMap<u64, Entry> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Volume `id`'s recorded attachment.
    pub fn get(&self, id: u64) -> Option<Entry> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Record (or replace) volume `id`'s attachment. It takes the socket from any other record:
    /// one that could not be attached again at a start must not take it back from this one at
    /// the next.
    pub fn put(&self, id: u64, e: Entry) -> Result<(), Status> {
        self.change(|m| {
            let before = m.len();
            m.retain(|k, x| *k == id || x.socket != e.socket);
            m.insert(id, e.clone()).as_ref() != Some(&e) || m.len() != before
        })
    }

    /// Record the cache mode the guest of volume `id`'s attachment chose.
    pub fn set_writeback(&self, id: u64, writeback: bool) -> Result<(), Status> {
        self.change(|m| match m.get_mut(&id) {
            Some(e) if e.writeback != writeback => {
                e.writeback = writeback;
                true
            }
            _ => false,
        })
    }

    /// Forget volume `id`'s attachment.
    pub fn remove(&self, id: u64) -> Result<(), Status> {
        self.change(|m| m.remove(&id).is_some())
    }

    /// Apply `f` to the entries and write the file if it changed anything. On a failed write
    /// the entries stay as they were.
    fn change(&self, f: impl FnOnce(&mut BTreeMap<u64, Entry>) -> bool) -> Result<(), Status> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = entries.clone();
        if !f(&mut next) {
            return Ok(());
        }
        let file = AttachmentsFile {
            version: FORMAT_VERSION,
            pool_uuid: self.pool_uuid.clone(),
            attachments: next.iter().map(|(id, e)| (id.to_string(), e.clone())).collect(),
        };
        pool_file::write(&self.path, &file)?;
        *entries = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, sock: &str) -> Entry {
        Entry { name: name.into(), socket: sock.into(), num_queues: 2, queue_size: 256, threads: 0, pin_memory: false, read_only: false, writeback: true }
    }

    #[test]
    fn entries_persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let r = AttachmentRegistry::load(dir.path(), "u1").unwrap();
        assert!(r.entries().is_empty());
        r.put(3, entry("a", "/run/a.sock")).unwrap();
        r.put(7, entry("b", "/run/b.sock")).unwrap();
        r.remove(3).unwrap();
        r.set_writeback(7, false).unwrap();
        let again = AttachmentRegistry::load(dir.path(), "u1").unwrap();
        assert_eq!(again.entries(), BTreeMap::from([(7, Entry { writeback: false, ..entry("b", "/run/b.sock") })]));
        // A new record of a socket takes it from another volume's.
        again.put(9, entry("c", "/run/b.sock")).unwrap();
        assert_eq!(again.entries(), BTreeMap::from([(9, entry("c", "/run/b.sock"))]));
        assert!(!dir.path().join("attachments.json.tmp").exists());
        // Another pool's file is ignored; a damaged one is an error naming the file.
        assert!(AttachmentRegistry::load(dir.path(), "u2").unwrap().entries().is_empty());
        std::fs::write(dir.path().join(FILE_NAME), "{").unwrap();
        let e = AttachmentRegistry::load(dir.path(), "u1").err().unwrap().to_string();
        assert!(e.contains(FILE_NAME), "{e}");
    }
}
