//! Typed errors of the engine. Each variant carries the context an operator needs (path, key,
//! volume) and keeps its source; Display never repeats the source's text.

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a corrupt or invalid metadata record was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The superblock at byte 0 of the data file or device.
    Superblock,
    /// A RocksDB record; the key is printed in hex.
    Record(Vec<u8>),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Superblock => write!(f, "superblock"),
            Location::Record(k) => {
                write!(f, "record key 0x")?;
                for b in k {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error("metadata store ({op})")]
    Meta { op: &'static str, #[source] source: rocksdb::Error },
    #[error("{path}: not a vblk pool (bad magic)")]
    NotAPool { path: PathBuf },
    #[error("{path}: pool format version {found} is newer than this vblk supports ({supported}); upgrade vblk")]
    VersionTooNew { path: PathBuf, found: u32, supported: u32 },
    #[error("{path}: pool uses incompatible features 0x{unknown:x} unknown to this vblk; upgrade vblk")]
    IncompatibleFeatures { path: PathBuf, unknown: u64 },
    #[error("corrupt metadata at {location}: {what}")]
    Corrupt { location: Location, what: String },
    #[error("{path}: pool is in use by another process (is a vblk daemon running on it?)")]
    Locked { path: PathBuf },
    #[error("{path}: already exists (refusing to overwrite; remove it first, or pass --force)")]
    AlreadyExists { path: PathBuf },
    #[error("volume {0:?} not found")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("volume {name:?} is in use ({why})")]
    Busy { name: String, why: &'static str },
    #[error("snapshot {0:?} not found")]
    NoSuchSnapshot(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("volume {name:?} has {what}; delete them first or pass --recursive")]
    HasDependents { name: String, what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("pool is full: no free blocks")]
    NoSpace,
    #[error("encryption: {0}")]
    Crypto(String),
    #[error("the master key does not match this pool")]
    WrongKey,
    #[error("volume {0:?} is encrypted and the pool was opened without its master key (start the daemon with --master-key-file, --master-key-env or --master-key-cmd)")]
    KeyUnavailable(String),
    #[error("request out of range: offset {offset} + len {len} > volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request not aligned to the volume's block size (512 bytes; 4096 for an encrypted volume): offset {offset}, len {len}")]
    Misaligned { offset: u64, len: u64 },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("I/O error on the data device: {0}")]
    DeviceIo(#[source] std::io::Error),
    #[error("submission queue is full")]
    QueueFull,
    #[error("the pool is shutting down")]
    ShuttingDown,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
    pub(crate) fn meta(op: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
        move |source| Error::Meta { op, source }
    }
    /// True for errors caused by the caller's input (bad name, size, range) rather than by the
    /// pool or device.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidName { .. }
                | Error::InvalidSize(_)
                | Error::OutOfRange { .. }
                | Error::Misaligned { .. }
        )
    }
    /// True when the named object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NoSuchVolume(_))
    }
}
