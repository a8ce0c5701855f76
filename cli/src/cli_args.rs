//! Command-line syntax (clap). Everything here is parsing and help text; `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::units::size_arg;

pub const DEFAULT_API_SOCKET: &str = "/run/vblk/vblk.sock";

#[derive(Debug, Parser)]
#[command(
    name = "vblk",
    version,
    about = "Thin-provisioned block volumes served to VMs over vhost-user-blk",
    long_about = "Thin-provisioned block volumes served to VMs over vhost-user-blk.\n\n\
                  `vblk pool create` formats a pool (offline). `vblk daemon` opens the pool and serves \
                  a control API on a unix socket; every other command talks to that daemon through \
                  --api-socket.",
    after_help = "Examples:\n  \
                  vblk pool create /var/lib/vblk/pool.img --size 100G\n  \
                  vblk daemon --pool /var/lib/vblk/pool.img &\n  \
                  vblk vol create vm1 20G\n  \
                  vblk import debian.qcow2 vm1\n  \
                  vblk attach vm1 --socket /run/vblk/vm1.sock --queues 2\n  \
                  vblk vol list"
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "VBLK_API_SOCKET", default_value = DEFAULT_API_SOCKET, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// Print machine-readable JSON instead of tables (list, info, status, check, attach, ...).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a pool (offline) or show the running pool's usage.
    #[command(subcommand)]
    Pool(PoolCmd),

    /// Open a pool and serve the control API and vhost-user-blk devices.
    #[command(
        long_about = "Open a pool and serve the control API and vhost-user-blk devices.\n\n\
                      Takes an exclusive lock on the pool: a second daemon on the same pool fails. \
                      The API socket is created with mode 0600; a stale socket left by a dead daemon \
                      is replaced. SIGTERM or SIGINT detaches every device, commits the pool, removes \
                      the API socket and exits 0. Logs go to stderr; RUST_LOG (e.g. \
                      RUST_LOG=vblk=debug) overrides --log-level.",
        after_help = "Examples:\n  \
                      vblk daemon --pool /var/lib/vblk/pool.img\n  \
                      vblk daemon --pool /dev/nvme1n1 --meta-dir /var/lib/vblk/nvme1.meta --cache 256M\n  \
                      vblk daemon --pool pool.img --socket /tmp/vblk.sock --attach vm1:/tmp/vm1.sock:2\n  \
                      VBLK_API_SOCKET=/tmp/vblk.sock vblk vol list"
    )]
    Daemon(DaemonArgs),

    /// Create, list, inspect, resize, rename and delete volumes.
    #[command(subcommand, visible_alias = "volume")]
    Vol(VolCmd),

    /// Snapshots of volumes: create, list, delete, roll back.
    #[command(subcommand, visible_alias = "snapshot", long_about = SNAP_ABOUT)]
    Snap(SnapCmd),

    /// Create a writable volume from a snapshot (a clone), or flatten a clone.
    #[command(
        name = "clone",
        long_about = CLONE_ABOUT,
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        after_help = "`vblk clone VOL@SNAP NEWVOL` is short for `vblk clone create VOL@SNAP NEWVOL`.\n\n\
                      Examples:\n  \
                      vblk snap create golden@v1\n  \
                      vblk clone golden@v1 vm1\n  \
                      vblk clone golden@v1 vm2 --json\n  \
                      vblk clone flatten vm1"
    )]
    CloneVol(CloneArgs),

    /// Show the byte ranges that changed between two snapshots, or a snapshot and the live volume.
    #[command(
        long_about = "Show the byte ranges of a volume that changed between two of its snapshots, \
                      or between a snapshot and the live volume when the second argument is \
                      omitted (the order of the two does not matter).\n\n\
                      The ranges come from the block map's history, without reading data, so they \
                      are a superset of the bytes that really differ: a block written again with \
                      the same data, or discarded, counts as changed. Ranges are whole 4 KiB \
                      blocks, merged, in order. Both snapshots must be of the same volume and on \
                      the same line of its history (a rollback in between starts a new one).",
        after_help = "Examples:\n  \
                      vblk diff vm1@monday vm1@tuesday\n  \
                      vblk diff vm1@monday                 # changes since monday\n  \
                      vblk diff vm1@monday --json          # {\"ranges\":[{\"offset\":..,\"length\":..}],\"changed_bytes\":..}"
    )]
    Diff(DiffArgs),

    /// Expose a volume to a VM as a vhost-user-blk socket.
    #[command(
        long_about = "Expose a volume to a VM as a vhost-user-blk socket.\n\n\
                      The daemon creates the socket and waits for a vhost-user front end such as QEMU \
                      to connect. A volume has at most one attachment (read-write, or read-only \
                      with --read-only, which shows the guest a read-only disk). The attachment is \
                      recorded in the pool's metadata directory: a daemon that starts again attaches \
                      it again by itself (QEMU with reconnect=1 reconnects); `vblk detach` forgets it. \
                      Attaching the same volume at the same socket with the same settings again is a \
                      no-op.",
        after_help = "Examples:\n  \
                      vblk attach vm1 --socket /run/vblk/vm1.sock --queues 4\n\n\
                      Then, in QEMU (guest RAM must be shared):\n  \
                      -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem \\\n  \
                      -chardev socket,id=c0,path=/run/vblk/vm1.sock \\\n  \
                      -device vhost-user-blk-pci,chardev=c0,num-queues=4"
    )]
    Attach(AttachArgs),

    /// Stop a vhost-user-blk device (by volume or socket) and remove its socket.
    #[command(
        long_about = "Stop a vhost-user-blk device (by volume or socket) and remove its socket.\n\n\
                      Refused while a VM is connected to the device (as SPDK refuses to delete a \
                      controller with a live connection): stop the VM or unplug the disk first \
                      (QEMU: device_del), or use --force. A VM that just exited may still count \
                      as connected for a moment; detach waits up to 2 s for it to go.",
        after_help = "Examples:\n  vblk detach vm1\n  vblk detach --socket /run/vblk/vm1.sock\n  vblk detach vm1 --force"
    )]
    Detach(DetachArgs),

    /// List the vhost-user-blk devices the daemon serves, with their request counters.
    #[command(visible_alias = "dev", after_help = "Examples:\n  vblk devices\n  vblk devices --json")]
    Devices,

    /// Limit a volume's (or a group of volumes') IOPS and bandwidth, live.
    #[command(subcommand)]
    Qos(QosCmd),

    /// Verify the pool's metadata: checksums, block map vs allocation, leaks.
    #[command(
        long_about = "Verify the pool's metadata: record checksums and fields, block map vs \
                      allocation (blocks referenced twice, out of range, leaked).\n\n\
                      By default asks the running daemon (I/O pauses while it scans). With --pool, \
                      opens the pool directly, which fails while a daemon holds it. Prints each \
                      problem; exits 1 if the pool is not clean.",
        after_help = "Examples:\n  vblk check\n  vblk check --pool /var/lib/vblk/pool.img --json"
    )]
    Check(CheckArgs),

    /// Copy a disk image (raw, or qcow2 etc. through qemu-img) into a volume.
    #[command(
        long_about = "Copy a disk image into a volume.\n\n\
                      The daemon reads FILE itself (the path is resolved here and must be readable on \
                      the daemon's host). Raw images are copied sparsely: holes and all-zero 4 KiB \
                      blocks are not written and take no space. qcow2, vmdk, vhdx and vdi images are \
                      detected by their magic and converted with `qemu-img convert -O raw` into a \
                      temporary sparse file in --tmp-dir first; that needs qemu-img on the daemon's \
                      PATH (`apt install qemu-utils`).\n\n\
                      If VOL does not exist it is created, with the image's size rounded up to 4096 \
                      bytes unless --create-size says otherwise. If it exists it must be at least as \
                      large as the image and not attached; its first image-size bytes are replaced \
                      (zero ranges discarded), the rest is left as it was. The volume is flushed at \
                      the end.",
        after_help = "Examples:\n  \
                      vblk import disk.raw vm1\n  \
                      vblk import debian-12.qcow2 vm2 --create-size 20G\n  \
                      vblk import disk.img vm3 --format raw"
    )]
    Import(ImportArgs),

    /// Copy a volume or a snapshot into a new sparse raw file.
    #[command(
        long_about = "Copy a volume (VOL) or a snapshot (VOL@SNAP) into a new raw file, sparsely: \
                      all-zero 4 KiB blocks become holes.\n\n\
                      The daemon writes FILE itself (mode 0600; the path is resolved here). Refuses to \
                      overwrite an existing file unless --force, and refuses a volume attached \
                      read-write (its contents would change during the copy). A snapshot never \
                      changes, so it can be exported while its volume runs; it cannot be deleted \
                      during the export.",
        after_help = "Examples:\n  vblk export vm1 /var/backups/vm1.raw\n  \
                      vblk snap create vm1@nightly && vblk export vm1@nightly /var/backups/vm1-nightly.raw\n  \
                      qemu-img convert -O qcow2 /var/backups/vm1.raw vm1.qcow2"
    )]
    Export(ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Format a pool on a file or block device (offline; no daemon needed).
    #[command(
        long_about = "Format a pool on a file or block device (offline; no daemon needed).\n\n\
                      A pool file is created with --size. On a block device the pool spans \
                      the device (or --size of it) and --meta-dir is required. The metadata (a RocksDB \
                      directory) goes to --meta-dir, by default PATH.meta beside a pool file. A pool \
                      file's space is reserved with fallocate unless --preallocate says otherwise.",
        after_help = "Examples:\n  \
                      vblk pool create /var/lib/vblk/pool.img --size 100G\n  \
                      vblk pool create /srv/test.img --size 1T --preallocate off\n  \
                      vblk pool create /dev/nvme1n1 --meta-dir /var/lib/vblk/nvme1.meta\n\n\
                      Sizes take a binary unit: K, M, G, T, P (1K = 1024), optionally followed by iB or B; \
                      a bare number is bytes."
    )]
    Create(PoolCreateArgs),

    /// Show the pool's physical usage and each volume's allocation.
    #[command(
        long_about = "Show the pool's physical usage (total, used, free, freed but not yet reusable) \
                      and the bytes each volume has allocated.",
        after_help = "Examples:\n  vblk pool status\n  vblk pool status --json"
    )]
    Status,

    /// Replace the master key of encrypted volumes (offline; stop the daemon first).
    #[command(
        long_about = "Replace the pool's master key (offline; the daemon must be stopped). Every \
                      volume's data key is unwrapped with the current master key and wrapped again \
                      with the new one, in one synced metadata batch; no data is rewritten. Start the \
                      daemon with the new key afterwards. The current key is given with the usual \
                      --master-key-file / --master-key-env / --master-key-cmd options, the new one with \
                      --new-key-file.",
        after_help = "Examples:\n  \
                      head -c 32 /dev/urandom > /etc/vblk/master.key.new\n  \
                      vblk pool rekey /var/lib/vblk/pool.img --master-key-file /etc/vblk/master.key \\\n      \
                      --new-key-file /etc/vblk/master.key.new"
    )]
    Rekey(PoolRekeyArgs),
}

#[derive(Debug, Args)]
pub struct PoolRekeyArgs {
    /// Pool file or block device.
    pub path: PathBuf,
    /// Metadata directory [default: PATH.meta].
    #[arg(long, value_name = "DIR")]
    pub meta_dir: Option<PathBuf>,
    #[command(flatten)]
    pub master_key: MasterKeyArgs,
    /// The new master key (32 raw bytes or 64 hex digits).
    #[arg(long, value_name = "PATH")]
    pub new_key_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    /// Pool file (created if missing) or block device.
    pub path: PathBuf,
    /// Size of the pool (required for a file; default for a device: all of it).
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub size: Option<u64>,
    /// Metadata directory [default: PATH.meta].
    #[arg(long, value_name = "DIR")]
    pub meta_dir: Option<PathBuf>,
    /// Overwrite an existing pool and its metadata (destroys every volume in it).
    #[arg(long)]
    pub force: bool,
    /// Host allocation of a pool file: off (sparse), falloc (reserve with fallocate), full
    /// (write zeros; slow to create, fastest first writes).
    #[arg(long, value_enum, default_value_t = Preallocate::Falloc, value_name = "MODE")]
    pub preallocate: Preallocate,
}

/// `--preallocate` of `pool create` (see `vblk_engine::Preallocate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preallocate {
    Off,
    Falloc,
    Full,
}

impl From<Preallocate> for vblk_engine::Preallocate {
    fn from(p: Preallocate) -> Self {
        match p {
            Preallocate::Off => vblk_engine::Preallocate::Off,
            Preallocate::Falloc => vblk_engine::Preallocate::Falloc,
            Preallocate::Full => vblk_engine::Preallocate::Full,
        }
    }
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Pool file or block device.
    #[arg(long, value_name = "PATH")]
    pub pool: PathBuf,
    /// API socket to serve [default: --api-socket, i.e. $VBLK_API_SOCKET or /run/vblk/vblk.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Metadata directory [default: POOL.meta].
    #[arg(long, value_name = "DIR")]
    pub meta_dir: Option<PathBuf>,
    /// Metadata cache, with a unit: half is RocksDB's (its write buffer, at most a quarter of
    /// that half, and its block cache), half an in-memory cache of block-map entries that spares
    /// most requests a RocksDB lookup. The daemon's resident memory stays under 64 MiB plus this
    /// (measured with 16 busy volumes: under 128 MiB at the default).
    #[arg(long, value_parser = size_arg, default_value = "64M", value_name = "SIZE")]
    pub cache: u64,
    /// Attach VOL at startup: VOL:SOCKET[:QUEUES] (repeatable).
    #[arg(long, value_name = "VOL:SOCKET[:QUEUES]", value_parser = parse_attach_spec)]
    pub attach: Vec<AttachSpec>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
    #[command(flatten)]
    pub master_key: MasterKeyArgs,
}

/// Where the pool's master key comes from (32 bytes: raw, or 64 hex digits). Without one the
/// pool opens locked: encrypted volumes are listed but cannot be attached, read or cloned.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(multiple = false)]
pub struct MasterKeyArgs {
    /// Read the master key from this file (32 raw bytes or 64 hex digits; keep it mode 0600).
    #[arg(long, value_name = "PATH", help_heading = "Encryption")]
    pub master_key_file: Option<PathBuf>,
    /// Read the master key (64 hex digits) from this environment variable.
    #[arg(long, value_name = "VAR", help_heading = "Encryption")]
    pub master_key_env: Option<String>,
    /// Run this command (with `sh -c`) and read the master key from its output, e.g. a KMS
    /// client such as `vault kv get -field=key secret/vblk`.
    #[arg(long, value_name = "COMMAND", help_heading = "Encryption")]
    pub master_key_cmd: Option<String>,
}

/// One `--attach` of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub volume: String,
    pub socket: PathBuf,
    pub queues: u16,
}

/// `VOL:SOCKET[:QUEUES]`. Volume names cannot contain ':'; a trailing `:N` is the queue count.
pub fn parse_attach_spec(s: &str) -> Result<AttachSpec, String> {
    let (vol, rest) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected VOL:SOCKET[:QUEUES]"))?;
    let (socket, queues) = match rest.rsplit_once(':') {
        Some((sock, q)) if !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u16 = q.parse().map_err(|_| format!("{s:?}: bad queue count {q:?}"))?;
            (sock, n)
        }
        _ => (rest, 1),
    };
    if vol.is_empty() || socket.is_empty() {
        return Err(format!("{s:?}: expected VOL:SOCKET[:QUEUES]"));
    }
    if queues == 0 {
        return Err(format!("{s:?}: the queue count must be at least 1"));
    }
    Ok(AttachSpec { volume: vol.into(), socket: socket.into(), queues })
}

// `Create` carries the QoS options; the command is parsed once, its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VolCmd {
    /// Create a thin volume (allocates nothing until written; may exceed the pool).
    #[command(after_help = "Names: letters, digits, '.', '_' and '-', at most 128 bytes, not starting with '.' or '-'.\n\
                            Sizes take a unit: K, M, G, T, P (binary), a bare number is bytes; a multiple of 4096.\n\n\
                            QoS limits may be given here or changed later with `vblk qos set` (see `vblk qos --help`).\n\n\
                            Examples:\n  vblk vol create vm1 20G\n  vblk vol create scratch 1T\n  \
                            vblk vol create db1 100G --iops-total 5000 --bps-total 200M --qos-group tenant-a")]
    Create {
        /// Volume name.
        name: String,
        /// Virtual size, e.g. 20G.
        #[arg(value_parser = size_arg)]
        size: u64,
        #[command(flatten)]
        qos: QosLimitArgs,
        /// Put the volume in this QoS group (see `vblk qos group`).
        #[arg(long, value_name = "GROUP", help_heading = "QoS")]
        qos_group: Option<String>,
        /// Encrypt the volume's data at rest (AES-256-GCM under a new data key wrapped by the
        /// pool's master key; the daemon must have been started with --master-key-*). The
        /// guest sees 4096-byte logical blocks.
        #[arg(long)]
        encrypt: bool,
    },
    /// List volumes: size, allocated bytes, attachment.
    #[command(visible_alias = "ls", after_help = "Examples:\n  vblk vol list\n  vblk vol list --json")]
    List,
    /// Show one volume's details.
    #[command(after_help = "Examples:\n  vblk vol info vm1\n  vblk vol info vm1 --json")]
    Info {
        /// Volume name.
        name: String,
    },
    /// Change a volume's size (growing works while attached; the guest sees the new size).
    #[command(
        long_about = "Change a volume's size. Growing works while the volume is attached: the device \
                      reports the new capacity and sends the front end a config-change message, so \
                      QEMU interrupts the guest, which sees the new size at once (a front end without \
                      the backend channel sees it when it next reads the configuration). Shrinking \
                      discards the data past the new end, needs \
                      --shrink and a detached volume.",
        after_help = "SIZE is absolute (30G), or relative: +10G grows by, -10G shrinks by.\n\
                      Units: K, M, G, T, P (binary); a bare number is bytes; the result must be a multiple of 4096.\n\n\
                      Examples:\n  vblk vol resize vm1 30G\n  vblk vol resize vm1 +10G\n  vblk vol resize vm1 10G --shrink"
    )]
    Resize {
        /// Volume name.
        name: String,
        /// New size: absolute (30G), +SIZE to grow by, -SIZE to shrink by.
        #[arg(value_parser = parse_resize, allow_hyphen_values = true)]
        size: ResizeTo,
        /// Allow shrinking (destroys data past the new end).
        #[arg(long)]
        shrink: bool,
    },
    /// Rename a volume (its data and attachments stay).
    #[command(after_help = "Examples:\n  vblk vol rename vm1 vm1-old")]
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
    /// Delete a detached volume and free its space (does not ask).
    #[command(
        visible_alias = "rm",
        long_about = "Delete a detached volume and free its space (does not ask).\n\n\
                      A volume with snapshots or clones is refused unless --recursive, which deletes \
                      its clones (and theirs, recursively) and its snapshots too. A clone that was \
                      flattened no longer depends on the volume and is kept.",
        after_help = "Attached volumes are refused: detach them first (with --recursive, its clones too).\n\n\
                      Examples:\n  vblk vol delete vm1\n  vblk vol delete golden --recursive"
    )]
    Delete {
        /// Volume name.
        name: String,
        /// Also delete the volume's clones and snapshots.
        #[arg(long, short = 'r')]
        recursive: bool,
    },
}

const SNAP_ABOUT: &str = "Snapshots of volumes: create, list, delete, roll back.\n\n\
    A snapshot is a read-only point in a volume's history, named VOL@SNAP. Taking one copies \
    nothing and is allowed while a guest writes: it holds exactly the requests completed before \
    it (like a power cut at that moment, so the guest's file systems recover as after a crash). \
    Afterwards, blocks the volume overwrites or discards are kept for the snapshot, so snapshots \
    cost space as the volume changes: `vblk snap list` shows what each one would free \
    (EXCLUSIVE), `vblk pool status` what they hold together. `vblk clone` makes a writable \
    volume of a snapshot, `vblk diff` lists the ranges changed between two of them.";

/// `VOL@SNAP` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapSpec {
    pub volume: String,
    pub snapshot: String,
}

impl std::fmt::Display for SnapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// `VOL@SNAP` (split by the engine's own rule; the names are checked by the daemon).
pub fn parse_snap_spec(s: &str) -> Result<SnapSpec, String> {
    let (volume, snapshot) =
        vblk_engine::parse_snap_spec(s).map_err(|_| format!("{s:?}: expected VOL@SNAP, a volume and a snapshot name, e.g. vm1@before-upgrade"))?;
    Ok(SnapSpec { volume: volume.into(), snapshot: snapshot.into() })
}

#[derive(Debug, Subcommand)]
pub enum SnapCmd {
    /// Take a snapshot of a volume (instant; allowed while attached).
    #[command(
        long_about = "Take a snapshot of a volume, named VOL@SNAP.\n\n\
                      Instant whatever the volume's size, and allowed while a guest writes: new \
                      writes wait while those in flight finish and are committed, so the snapshot \
                      holds exactly the requests completed before it (crash-consistent; freeze the \
                      guest's file systems first for more). Snapshot names follow the volume name \
                      rules and are unique per volume.",
        after_help = "Examples:\n  vblk snap create vm1@before-upgrade\n  vblk snap create vm1@$(date +%F) --json"
    )]
    Create {
        /// Volume and new snapshot name.
        #[arg(value_name = "VOL@SNAP", value_parser = parse_snap_spec)]
        snapshot: SnapSpec,
    },
    /// List snapshots (of one volume or all): creation time, space, clones.
    #[command(
        visible_alias = "ls",
        long_about = "List snapshots, of VOL or of every volume, oldest first.\n\n\
                      SIZE is the volume's virtual size when the snapshot was taken, REFERENCED the \
                      data the volume held then, EXCLUSIVE what deleting the snapshot would free \
                      now (blocks no other snapshot or volume uses), CLONES the volumes cloned from \
                      it. --json prints every field, bytes as integers and the creation time as \
                      created_ns (nanoseconds since the Unix epoch).",
        after_help = "Examples:\n  vblk snap list\n  vblk snap list vm1\n  vblk snap list vm1 --json"
    )]
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
    },
    /// Delete a snapshot and free the space only it holds.
    #[command(
        visible_alias = "rm",
        long_about = "Delete a snapshot and free the blocks only it holds (time proportional to \
                      those; the volume may stay attached).\n\n\
                      A snapshot that clones were made from disappears from the list at once but \
                      keeps its blocks until the last of those clones is deleted or flattened \
                      (`vblk clone flatten`).",
        after_help = "Examples:\n  vblk snap delete vm1@before-upgrade"
    )]
    Delete {
        /// The snapshot.
        #[arg(value_name = "VOL@SNAP", value_parser = parse_snap_spec)]
        snapshot: SnapSpec,
    },
    /// Make a detached volume read again what it held when the snapshot was taken.
    #[command(
        long_about = "Make a volume read again exactly what it held when the snapshot was taken \
                      (its size too). What was written since the volume's newest snapshot is \
                      discarded; the snapshot itself and any later snapshots stay, so you can roll \
                      forward again to a later one. Instant whatever the volume's size.\n\n\
                      Refused while the volume is attached (the guest would see its disk change \
                      under it): detach it, roll back, attach it again.",
        after_help = "Examples:\n  vblk detach vm1\n  vblk snap rollback vm1@before-upgrade\n  vblk attach vm1 --socket /run/vblk/vm1.sock"
    )]
    Rollback {
        /// The snapshot to go back to.
        #[arg(value_name = "VOL@SNAP", value_parser = parse_snap_spec)]
        snapshot: SnapSpec,
    },
}

const CLONE_ABOUT: &str = "Create a writable volume from a snapshot (a clone), or flatten a clone.\n\n\
    A clone is instant and takes no space at first: its unwritten blocks read the snapshot's \
    data, its writes go to its own blocks. While clones depend on a snapshot, deleting the \
    snapshot hides it but keeps its blocks, and deleting the origin volume needs --recursive \
    (which deletes the clones too). `vblk clone flatten` copies into a clone every block it still \
    reads from the snapshot and cuts the link, after which the clone is an independent volume.";

/// `vblk clone`: the short form (VOL@SNAP NEWVOL) or a subcommand.
#[derive(Debug, Args)]
pub struct CloneArgs {
    #[command(subcommand)]
    pub cmd: Option<CloneCmd>,
    /// The snapshot to clone.
    #[arg(value_name = "VOL@SNAP", value_parser = parse_snap_spec, required = true)]
    pub snapshot: Option<SnapSpec>,
    /// Name of the new volume.
    #[arg(value_name = "NEWVOL", required = true)]
    pub new_name: Option<String>,
}

impl CloneArgs {
    /// The command meant: the short form is `create`.
    pub fn into_cmd(self) -> CloneCmd {
        match (self.cmd, self.snapshot, self.new_name) {
            (Some(c), _, _) => c,
            (None, Some(snapshot), Some(new_name)) => CloneCmd::Create { snapshot, new_name },
            // clap requires both positionals when no subcommand is given.
            (None, _, _) => unreachable!("clone without a subcommand or VOL@SNAP NEWVOL"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CloneCmd {
    /// Create a writable volume NEWVOL from snapshot VOL@SNAP (instant, copies nothing).
    #[command(
        long_about = CLONE_ABOUT,
        after_help = "Examples:\n  vblk clone create golden@v1 vm1\n  vblk clone golden@v1 vm1      # the same"
    )]
    Create {
        /// The snapshot to clone.
        #[arg(value_name = "VOL@SNAP", value_parser = parse_snap_spec)]
        snapshot: SnapSpec,
        /// Name of the new volume.
        #[arg(value_name = "NEWVOL")]
        new_name: String,
    },
    /// Make a detached clone independent of its origin snapshot (copies the blocks it shares).
    #[command(
        long_about = "Make a clone independent of the snapshot it was made from: copy into it every \
                      block it still reads from the snapshot, then cut the link. Takes time and space \
                      in proportion to the data the clone shares. Afterwards the origin snapshot can \
                      be deleted (and its volume deleted without --recursive) without affecting the \
                      clone. Refused while the clone is attached.",
        after_help = "Examples:\n  vblk clone flatten vm1\n  vblk snap delete golden@v1"
    )]
    Flatten {
        /// The clone.
        volume: String,
    },
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// A snapshot.
    #[arg(value_name = "VOL@SNAP1", value_parser = parse_snap_spec)]
    pub from: SnapSpec,
    /// Another snapshot of the same volume [default: the live volume].
    #[arg(value_name = "VOL@SNAP2", value_parser = parse_snap_spec)]
    pub to: Option<SnapSpec>,
}

/// Target of `vol resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    Absolute(u64),
    GrowBy(u64),
    ShrinkBy(u64),
}

pub fn parse_resize(s: &str) -> Result<ResizeTo, String> {
    let s = s.trim();
    if let Some(r) = s.strip_prefix('+') {
        Ok(ResizeTo::GrowBy(size_arg(r)?))
    } else if let Some(r) = s.strip_prefix('-') {
        Ok(ResizeTo::ShrinkBy(size_arg(r)?))
    } else {
        Ok(ResizeTo::Absolute(size_arg(s)?))
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Volume name.
    pub volume: String,
    /// vhost-user socket to create (the front end connects to it).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Number of virtqueues (one worker thread each, unless --threads says fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16), value_name = "N")]
    pub queues: u16,
    /// Worker threads serving the queues, 1..=QUEUES [default: one per queue]. Queue q is
    /// served by thread q mod N. Fewer threads than queues trade parallelism for CPU: on a
    /// small host, one thread for 2 queues measured 4.5 instead of 4.9 us of daemon CPU per 4K
    /// write at QD32 (README, benchmarks).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16), value_name = "N")]
    pub threads: Option<u16>,
    /// Largest virtqueue size offered to the front end (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size, value_name = "N")]
    pub queue_size: u16,
    /// Show the guest a read-only disk.
    #[arg(long)]
    pub read_only: bool,
    /// Register the guest's memory with io_uring as fixed buffers, so that requests skip
    /// pinning their pages one by one (less daemon CPU per I/O). All of the guest's RAM is then
    /// pinned (resident, never swapped, not given back by a balloon) while the VM is connected:
    /// for hosts that back guests with preallocated or huge-page memory anyway.
    #[arg(long)]
    pub pin_memory: bool,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("{s:?} is not a number between 2 and 32768"))?;
    if n < 2 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 2 and 32768"));
    }
    Ok(n)
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["volume", "socket"])))]
pub struct DetachArgs {
    /// Volume name.
    pub volume: Option<String>,
    /// Or: the device's socket path.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Detach even while a VM is connected. Its disk stops answering: the guest's I/O to it
    /// hangs or fails. Without --force, a device with a connected VM is refused (stop the VM, or
    /// unplug the disk from it, first).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check this pool directly instead of asking the daemon (fails while a daemon holds it).
    #[arg(long, value_name = "PATH")]
    pub pool: Option<PathBuf>,
    /// Metadata directory, with --pool [default: POOL.meta].
    #[arg(long, value_name = "DIR", requires = "pool")]
    pub meta_dir: Option<PathBuf>,
}

/// `--create-size` of import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateSize {
    Auto,
    Bytes(u64),
}

fn parse_create_size(s: &str) -> Result<CreateSize, String> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(CreateSize::Auto)
    } else {
        size_arg(s).map(CreateSize::Bytes)
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Source image (raw file or block device, or qcow2/vmdk/vhdx/vdi with qemu-img).
    pub file: PathBuf,
    /// Target volume (created if missing).
    pub volume: String,
    /// Size of the volume if it is created: "auto" (the image size rounded up to 4096) or a size.
    #[arg(long, default_value = "auto", value_parser = parse_create_size, value_name = "auto|SIZE")]
    pub create_size: CreateSize,
    /// Image format: auto (detect qcow2/vmdk/vhdx/vdi, else raw), raw, or any qemu-img format.
    #[arg(long, default_value = "auto", value_name = "FORMAT")]
    pub format: String,
    /// Directory for the temporary raw file of a qemu-img conversion [default: $TMPDIR or /var/tmp].
    #[arg(long, value_name = "DIR")]
    pub tmp_dir: Option<PathBuf>,
    /// Pace the writes into the pool to SIZE per second, e.g. 100M (guest QoS limits do not
    /// apply to imports) [default: unpaced].
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub rate: Option<u64>,
    /// Create the volume encrypted at rest (see `vblk vol create --encrypt`); refused if the
    /// volume exists and is not.
    #[arg(long)]
    pub encrypt: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Source volume, or VOL@SNAP for a snapshot.
    pub volume: String,
    /// Raw file to create.
    pub file: PathBuf,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// Pace the reads from the pool to SIZE per second, e.g. 100M [default: unpaced].
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub rate: Option<u64>,
}

const QOS_ABOUT: &str = "Limit a volume's (or a group of volumes') IOPS and bandwidth, live.\n\n\
    Each limit is a token bucket: --iops-read 2000 lets the guest read 2000 requests per second, \
    with a bucket of --iops-read-burst requests (default: 100 ms worth) that may go at once \
    above that rate. With --iops-read-burst-secs S the burst is spread over S seconds instead \
    (at most rate + burst / S per second); without it the burst goes as fast as the disk. \
    Requests over the limit wait in the virtqueue (the guest sees latency, never errors). \
    iops-* count requests (with --iops-size, a larger request counts as size / iops-size \
    requests), bps-* count bytes per second (units K, M, G: binary). read and write limit one \
    direction, total both; DISCARD and WRITE_ZEROES count as writes of no data; FLUSH is never \
    limited. A value of 0 removes a limit.\n\n\
    A volume may also be in a group (--group): the group's limits apply to all its volumes \
    together, on top of each volume's own. Changes apply to a running guest within 50 ms and \
    are kept in the pool's metadata directory (qos.json), so they survive a daemon restart.";

#[derive(Debug, Subcommand)]
#[command(about = "Limit a volume's (or a group of volumes') IOPS and bandwidth, live", long_about = QOS_ABOUT)]
pub enum QosCmd {
    /// Change a volume's QoS limits or group (live).
    #[command(
        long_about = QOS_ABOUT,
        after_help = "Limits not named keep their value; --clear removes them all first.\n\n\
                      Examples:\n  \
                      vblk qos set vm1 --iops-total 2000\n  \
                      vblk qos set vm1 --iops-total 2000 --iops-total-burst 20000 --iops-total-burst-secs 10\n  \
                      vblk qos set vm1 --bps-read 100M --bps-write 50M --iops-size 64K\n  \
                      vblk qos set vm1 --iops-total 0          # remove that limit\n  \
                      vblk qos set vm1 --clear                 # remove all limits\n  \
                      vblk qos set vm1 --group tenant-a\n  \
                      vblk qos set vm1 --no-group"
    )]
    Set {
        /// Volume name.
        volume: String,
        #[command(flatten)]
        limits: QosLimitArgs,
        /// Remove every limit of the volume before applying the ones given.
        #[arg(long, help_heading = "QoS")]
        clear: bool,
        /// Move the volume into this group.
        #[arg(long, value_name = "GROUP", conflicts_with = "no_group", help_heading = "QoS")]
        group: Option<String>,
        /// Take the volume out of its group.
        #[arg(long, help_heading = "QoS")]
        no_group: bool,
    },
    /// Show a volume's limits, group and QoS counters.
    #[command(after_help = "Examples:\n  vblk qos show vm1\n  vblk qos show vm1 --json")]
    Show {
        /// Volume name.
        volume: String,
    },
    /// Groups of volumes sharing one set of limits.
    #[command(subcommand)]
    Group(QosGroupCmd),
}

#[derive(Debug, Subcommand)]
pub enum QosGroupCmd {
    /// Create a group (with its limits).
    #[command(after_help = "Group names follow the volume name rules.\n\n\
                            Examples:\n  vblk qos group create tenant-a --iops-total 10000 --bps-total 500M\n  \
                            vblk qos set vm1 --group tenant-a")]
    Create {
        /// Group name.
        name: String,
        #[command(flatten)]
        limits: QosLimitArgs,
    },
    /// Change a group's limits (live, for all its volumes).
    #[command(after_help = "Examples:\n  vblk qos group set tenant-a --iops-total 20000\n  vblk qos group set tenant-a --clear --bps-total 1G")]
    Set {
        /// Group name.
        name: String,
        #[command(flatten)]
        limits: QosLimitArgs,
        /// Remove every limit of the group before applying the ones given.
        #[arg(long, help_heading = "QoS")]
        clear: bool,
    },
    /// Delete a group no volume is in.
    #[command(visible_alias = "rm", after_help = "Examples:\n  vblk qos set vm1 --no-group\n  vblk qos group delete tenant-a")]
    Delete {
        /// Group name.
        name: String,
    },
    /// List the groups, their limits and volumes.
    #[command(visible_alias = "ls", after_help = "Examples:\n  vblk qos group list\n  vblk qos group list --json")]
    List,
}

/// A non-negative whole number (IOPS, burst sizes, seconds).
fn count_arg(s: &str) -> Result<u64, String> {
    s.trim().replace('_', "").parse().map_err(|_| format!("{s:?} is not a whole number"))
}

/// The options of one limit kind: (name such as "iops-total", rate, burst, burst seconds).
pub type LimitOptions = (&'static str, Option<u64>, Option<u64>, Option<u64>);

/// The QoS limit options (see [`QOS_ABOUT`]). `None` = not given (keep).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "QoS limits (0 removes a limit)")]
pub struct QosLimitArgs {
    /// Requests per second, reads and writes together.
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_total: Option<u64>,
    /// Requests that may go at once above --iops-total.
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_total_burst: Option<u64>,
    /// Spread the --iops-total-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub iops_total_burst_secs: Option<u64>,
    /// Read requests per second.
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_read: Option<u64>,
    /// Read requests that may go at once above --iops-read.
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_read_burst: Option<u64>,
    /// Spread the --iops-read-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub iops_read_burst_secs: Option<u64>,
    /// Write requests per second (DISCARD and WRITE_ZEROES included).
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_write: Option<u64>,
    /// Write requests that may go at once above --iops-write.
    #[arg(long, value_parser = count_arg, value_name = "N")]
    pub iops_write_burst: Option<u64>,
    /// Spread the --iops-write-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub iops_write_burst_secs: Option<u64>,
    /// Bytes per second, read and written together (e.g. 200M).
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_total: Option<u64>,
    /// Bytes that may go at once above --bps-total.
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_total_burst: Option<u64>,
    /// Spread the --bps-total-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub bps_total_burst_secs: Option<u64>,
    /// Bytes read per second.
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_read: Option<u64>,
    /// Bytes that may be read at once above --bps-read.
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_read_burst: Option<u64>,
    /// Spread the --bps-read-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub bps_read_burst_secs: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_write: Option<u64>,
    /// Bytes that may be written at once above --bps-write.
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub bps_write_burst: Option<u64>,
    /// Spread the --bps-write-burst over this many seconds.
    #[arg(long, value_parser = count_arg, value_name = "SECS")]
    pub bps_write_burst_secs: Option<u64>,
    /// Requests larger than SIZE count as size / SIZE requests in the iops limits (0: each counts as one).
    #[arg(long, value_parser = size_arg, value_name = "SIZE")]
    pub iops_size: Option<u64>,
}

impl QosLimitArgs {
    /// Per limit kind.
    pub fn by_kind(&self) -> [LimitOptions; 6] {
        [
            ("iops-total", self.iops_total, self.iops_total_burst, self.iops_total_burst_secs),
            ("iops-read", self.iops_read, self.iops_read_burst, self.iops_read_burst_secs),
            ("iops-write", self.iops_write, self.iops_write_burst, self.iops_write_burst_secs),
            ("bps-total", self.bps_total, self.bps_total_burst, self.bps_total_burst_secs),
            ("bps-read", self.bps_read, self.bps_read_burst, self.bps_read_burst_secs),
            ("bps-write", self.bps_write, self.bps_write_burst, self.bps_write_burst_secs),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn attach_spec() {
        assert_eq!(
            parse_attach_spec("vm1:/run/vm1.sock:4"),
            Ok(AttachSpec { volume: "vm1".into(), socket: "/run/vm1.sock".into(), queues: 4 })
        );
        assert_eq!(
            parse_attach_spec("vm1:/run/a:b.sock"),
            Ok(AttachSpec { volume: "vm1".into(), socket: "/run/a:b.sock".into(), queues: 1 })
        );
        assert!(parse_attach_spec("vm1").is_err());
        assert!(parse_attach_spec("vm1:/s:0").is_err());
        assert!(parse_attach_spec(":/s").is_err());
    }

    #[test]
    fn resize_forms() {
        assert_eq!(parse_resize("30G"), Ok(ResizeTo::Absolute(30 << 30)));
        assert_eq!(parse_resize("+1G"), Ok(ResizeTo::GrowBy(1 << 30)));
        assert_eq!(parse_resize("-4K"), Ok(ResizeTo::ShrinkBy(4096)));
        assert!(parse_resize("+x").is_err());
    }

    #[test]
    fn qos_options() {
        let c = Cli::try_parse_from([
            "vblk", "qos", "set", "vm1", "--iops-total", "2_000", "--iops-total-burst", "20000", "--bps-read", "100M", "--no-group",
        ])
        .unwrap();
        let Command::Qos(QosCmd::Set { volume, limits, clear, group, no_group }) = c.command else { panic!() };
        assert_eq!(volume, "vm1");
        assert_eq!((limits.iops_total, limits.iops_total_burst, limits.bps_read), (Some(2000), Some(20000), Some(100 << 20)));
        assert_eq!(limits.by_kind()[0], ("iops-total", Some(2000), Some(20000), None));
        assert!(!clear && group.is_none() && no_group);
        assert!(Cli::try_parse_from(["vblk", "qos", "set", "vm1", "--group", "g", "--no-group"]).is_err());
        assert!(Cli::try_parse_from(["vblk", "qos", "set", "vm1", "--iops-read", "many"]).is_err());
        let c = Cli::try_parse_from(["vblk", "vol", "create", "v", "1G", "--iops-write", "10", "--qos-group", "t"]).unwrap();
        let Command::Vol(VolCmd::Create { qos, qos_group, .. }) = c.command else { panic!() };
        assert_eq!((qos.iops_write, qos_group.as_deref()), (Some(10), Some("t")));
        let c = Cli::try_parse_from(["vblk", "import", "f", "v", "--rate", "50M"]).unwrap();
        let Command::Import(a) = c.command else { panic!() };
        assert_eq!(a.rate, Some(50 << 20));
    }

    #[test]
    fn snapshot_commands() {
        let c = Cli::try_parse_from(["vblk", "snap", "create", "vm1@s1"]).unwrap();
        let Command::Snap(SnapCmd::Create { snapshot }) = c.command else { panic!() };
        assert_eq!(snapshot, SnapSpec { volume: "vm1".into(), snapshot: "s1".into() });
        assert_eq!(snapshot.to_string(), "vm1@s1");
        for bad in ["vm1", "@s", "vm1@", ""] {
            let e = Cli::try_parse_from(["vblk", "snap", "create", bad]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
        let c = Cli::try_parse_from(["vblk", "snapshot", "ls"]).unwrap();
        assert!(matches!(c.command, Command::Snap(SnapCmd::List { volume: None })));
        let c = Cli::try_parse_from(["vblk", "vol", "rm", "v", "--recursive"]).unwrap();
        assert!(matches!(c.command, Command::Vol(VolCmd::Delete { recursive: true, .. })));
        let c = Cli::try_parse_from(["vblk", "diff", "v@a"]).unwrap();
        let Command::Diff(d) = c.command else { panic!() };
        assert_eq!((d.from.snapshot.as_str(), d.to), ("a", None));
    }

    #[test]
    fn clone_short_and_subcommand_forms() {
        let create = |args: &[&str]| {
            let c = Cli::try_parse_from(args).unwrap();
            let Command::CloneVol(a) = c.command else { panic!() };
            a.into_cmd()
        };
        let want = |s: &str, n: &str| match create(&["vblk", "clone", "create", s, n]) {
            CloneCmd::Create { snapshot, new_name } => (snapshot.to_string(), new_name),
            CloneCmd::Flatten { .. } => panic!(),
        };
        assert_eq!(want("g@v1", "vm1"), ("g@v1".into(), "vm1".into()));
        let CloneCmd::Create { snapshot, new_name } = create(&["vblk", "clone", "g@v1", "vm1"]) else { panic!() };
        assert_eq!((snapshot.to_string(), new_name.as_str()), ("g@v1".into(), "vm1"));
        // A snapshot spec always has '@', so it never reads as a subcommand name.
        let CloneCmd::Create { snapshot, .. } = create(&["vblk", "clone", "flatten@x", "vm1"]) else { panic!() };
        assert_eq!(snapshot.volume, "flatten");
        let CloneCmd::Flatten { volume } = create(&["vblk", "clone", "flatten", "vm1"]) else { panic!() };
        assert_eq!(volume, "vm1");
        for bad in [&["vblk", "clone"][..], &["vblk", "clone", "g@v1"], &["vblk", "clone", "g", "vm1"], &["vblk", "clone", "flatten"]] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn global_options_anywhere() {
        let c = Cli::try_parse_from(["vblk", "vol", "list", "--json", "--api-socket", "/tmp/x.sock"]).unwrap();
        assert!(c.json);
        assert_eq!(c.api_socket, PathBuf::from("/tmp/x.sock"));
        let c = Cli::try_parse_from(["vblk", "daemon", "--pool", "p", "--socket", "/tmp/d.sock", "--attach=v:/s:2"]).unwrap();
        let Command::Daemon(d) = c.command else { panic!() };
        assert_eq!(d.socket, Some(PathBuf::from("/tmp/d.sock")));
        assert_eq!(d.attach[0].queues, 2);
    }
}
