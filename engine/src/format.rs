//! On-disk formats, exactly as `format-spec/FORMAT.md` describes them. Every integer is
//! little-endian except RocksDB key components, which are big-endian so that keys sort in
//! numeric order. Offsets and sizes are constants asserted at compile time; the spec quotes them.

use crate::error::{Error, Location, Result};

/// Size of one data block and of the superblock.
pub const BLOCK_SIZE: u64 = 4096;
/// log2(BLOCK_SIZE)
pub const BLOCK_SHIFT: u32 = 12;
/// Data blocks start at this byte offset of the data file/device (the first MiB is reserved
/// for the superblock and future headers).
pub const DATA_START: u64 = 1 << 20;

/// Format version written by this code.
pub const FORMAT_VERSION: u32 = 2;
/// "VBLKPOOL"
pub const SB_MAGIC: [u8; 8] = *b"VBLKPOOL";

/// Incompatible feature bits (FORMAT.md §2).
pub mod incompat {
    /// Encrypted volumes may exist (revision 2.1, FORMAT.md §11).
    pub const ENCRYPTION: u64 = 1 << 0;
}
/// Incompatible features known to this version.
pub const INCOMPAT_KNOWN: u64 = incompat::ENCRYPTION;
/// Compatible features known to this version (none are defined in version 1).
pub const COMPAT_KNOWN: u64 = 0;
/// Autoclear features known to this version (none are defined in version 1).
pub const AUTOCLEAR_KNOWN: u64 = 0;

/// Superblock field offsets (bytes from the start of the data file/device).
pub mod sb {
    pub const MAGIC: usize = 0; // [u8; 8]
    pub const VERSION: usize = 8; // u32
    pub const HEADER_SIZE: usize = 12; // u32, = SIZE
    pub const INCOMPAT: usize = 16; // u64
    pub const COMPAT: usize = 24; // u64
    pub const AUTOCLEAR: usize = 32; // u64
    pub const UUID: usize = 40; // [u8; 16]
    pub const BLOCK_SIZE: usize = 56; // u32
    pub const RESERVED0: usize = 60; // u32, zero
    pub const DATA_START: usize = 64; // u64
    pub const TOTAL_BLOCKS: usize = 72; // u64
    pub const CREATED_NS: usize = 80; // u64, unix time in ns
    pub const END_OF_FIELDS: usize = 88; // bytes 88..4092 are zero
    pub const CRC: usize = 4092; // u32, crc32c of bytes 0..4092
    pub const SIZE: usize = 4096;
}
const _: () = assert!(sb::CRC + 4 == sb::SIZE);
const _: () = assert!(sb::SIZE as u64 == BLOCK_SIZE);
const _: () = assert!(sb::END_OF_FIELDS <= sb::CRC);
const _: () = assert!(DATA_START % BLOCK_SIZE == 0 && DATA_START >= sb::SIZE as u64);

fn get_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn get_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The pool superblock (block 0 of the data file or device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub incompat: u64,
    pub compat: u64,
    pub autoclear: u64,
    pub uuid: [u8; 16],
    pub block_size: u32,
    pub data_start: u64,
    pub total_blocks: u64,
    pub created_ns: u64,
}

/// Why a superblock was refused (turned into an [`Error`] with the path by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SbError {
    BadMagic,
    BadChecksum { stored: u32, computed: u32 },
    TooNew(u32),
    Incompat(u64),
    Invalid(&'static str),
}

impl Superblock {
    pub fn encode(&self) -> [u8; sb::SIZE] {
        let mut b = [0u8; sb::SIZE];
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, sb::VERSION, self.version);
        put_u32(&mut b, sb::HEADER_SIZE, sb::SIZE as u32);
        put_u64(&mut b, sb::INCOMPAT, self.incompat);
        put_u64(&mut b, sb::COMPAT, self.compat);
        put_u64(&mut b, sb::AUTOCLEAR, self.autoclear);
        b[sb::UUID..sb::UUID + 16].copy_from_slice(&self.uuid);
        put_u32(&mut b, sb::BLOCK_SIZE, self.block_size);
        put_u64(&mut b, sb::DATA_START, self.data_start);
        put_u64(&mut b, sb::TOTAL_BLOCKS, self.total_blocks);
        put_u64(&mut b, sb::CREATED_NS, self.created_ns);
        let crc = crc32c::crc32c(&b[..sb::CRC]);
        put_u32(&mut b, sb::CRC, crc);
        b
    }

    /// Decode and validate. Never panics on any input.
    pub fn decode(b: &[u8]) -> std::result::Result<Superblock, SbError> {
        if b.len() < sb::SIZE {
            return Err(SbError::Invalid("short superblock"));
        }
        if b[sb::MAGIC..sb::MAGIC + 8] != SB_MAGIC {
            return Err(SbError::BadMagic);
        }
        // Magic, version and the checksum position are frozen for all versions: the version is
        // checked before the checksum so that a newer layout is reported as "too new".
        let version = get_u32(b, sb::VERSION);
        if version > FORMAT_VERSION {
            return Err(SbError::TooNew(version));
        }
        let stored = get_u32(b, sb::CRC);
        let computed = crc32c::crc32c(&b[..sb::CRC]);
        if stored != computed {
            return Err(SbError::BadChecksum { stored, computed });
        }
        let s = Superblock {
            version: get_u32(b, sb::VERSION),
            incompat: get_u64(b, sb::INCOMPAT),
            compat: get_u64(b, sb::COMPAT),
            autoclear: get_u64(b, sb::AUTOCLEAR),
            uuid: b[sb::UUID..sb::UUID + 16].try_into().map_err(|_| SbError::Invalid("uuid"))?,
            block_size: get_u32(b, sb::BLOCK_SIZE),
            data_start: get_u64(b, sb::DATA_START),
            total_blocks: get_u64(b, sb::TOTAL_BLOCKS),
            created_ns: get_u64(b, sb::CREATED_NS),
        };
        if s.version == 0 {
            return Err(SbError::Invalid("version 0"));
        }
        if s.incompat & !INCOMPAT_KNOWN != 0 {
            return Err(SbError::Incompat(s.incompat & !INCOMPAT_KNOWN));
        }
        if get_u32(b, sb::HEADER_SIZE) as usize != sb::SIZE {
            return Err(SbError::Invalid("header size"));
        }
        if s.block_size as u64 != BLOCK_SIZE {
            return Err(SbError::Invalid("block size is not 4096"));
        }
        if s.data_start != DATA_START {
            return Err(SbError::Invalid("data start is not 1 MiB"));
        }
        if s.total_blocks == 0 || s.total_blocks > (u64::MAX - DATA_START) >> BLOCK_SHIFT {
            return Err(SbError::Invalid("total blocks"));
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// RocksDB keys. The first byte is the record type.

/// Key type bytes.
pub mod key {
    /// The pool record: `[0x01] "pool"`.
    pub const POOL: u8 = 0x01;
    /// A volume record: `[0x02] id:u64be`.
    pub const VOLUME: u8 = 0x02;
    /// A name index entry: `[0x03] name bytes`.
    pub const NAME: u8 = 0x03;
    /// A head block map entry: `[0x04] branch:u64be lba:u64be`.
    pub const MAP: u8 = 0x04;
    /// A branch record: `[0x05] branch:u64be` (version 2).
    pub const BRANCH: u8 = 0x05;
    /// A snapshot record: `[0x06] branch:u64be gen:u64be` (version 2).
    pub const SNAP: u8 = 0x06;
    /// A dead-list entry: `[0x07] branch:u64be kill:u64be birth:u64be lba:u64be` (version 2).
    pub const DEAD: u8 = 0x07;
    /// A birth index entry: `[0x08] branch:u64be birth:u64be lba:u64be` (version 2).
    pub const BIRTH: u8 = 0x08;
    /// A history map entry: `[0x09] branch:u64be lba:u64be !birth:u64be` (version 2).
    pub const HIST: u8 = 0x09;
    /// A wrapped key: `[0x0A] id:u64be`; id 0 is the master-key check (revision 2.1).
    pub const KEY: u8 = 0x0A;
    /// The nonce reservation: `[0x0B] "nonce"` (revision 2.1).
    pub const NONCE: u8 = 0x0B;
    /// The seal (nonce, tag) of an encrypted data block: `[0x0C] pba:u64be` (revision 2.1).
    pub const SEAL: u8 = 0x0C;
}

fn key_of(t: u8, parts: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * parts.len());
    k.push(t);
    for p in parts {
        k.extend_from_slice(&p.to_be_bytes());
    }
    k
}

fn parse_key<const N: usize>(t: u8, k: &[u8]) -> Option<[u64; N]> {
    if k.len() != 1 + 8 * N || k[0] != t {
        return None;
    }
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u64::from_be_bytes(k[1 + 8 * i..9 + 8 * i].try_into().ok()?);
    }
    Some(out)
}

pub fn branch_key(id: u64) -> Vec<u8> {
    key_of(key::BRANCH, &[id])
}
pub fn parse_branch_key(k: &[u8]) -> Option<u64> {
    parse_key::<1>(key::BRANCH, k).map(|a| a[0])
}
pub fn snap_key(branch: u64, gen: u64) -> Vec<u8> {
    key_of(key::SNAP, &[branch, gen])
}
pub fn parse_snap_key(k: &[u8]) -> Option<(u64, u64)> {
    parse_key::<2>(key::SNAP, k).map(|a| (a[0], a[1]))
}
pub fn dead_key(branch: u64, kill: u64, birth: u64, lba: u64) -> Vec<u8> {
    key_of(key::DEAD, &[branch, kill, birth, lba])
}
/// (branch, kill, birth, lba)
pub fn parse_dead_key(k: &[u8]) -> Option<(u64, u64, u64, u64)> {
    parse_key::<4>(key::DEAD, k).map(|a| (a[0], a[1], a[2], a[3]))
}
pub fn birth_key(branch: u64, birth: u64, lba: u64) -> Vec<u8> {
    key_of(key::BIRTH, &[branch, birth, lba])
}
/// (branch, birth, lba)
pub fn parse_birth_key(k: &[u8]) -> Option<(u64, u64, u64)> {
    parse_key::<3>(key::BIRTH, k).map(|a| (a[0], a[1], a[2]))
}
/// History keys sort newest first within one lba: the birth is stored inverted.
pub fn hist_key(branch: u64, lba: u64, birth: u64) -> Vec<u8> {
    key_of(key::HIST, &[branch, lba, !birth])
}
/// (branch, lba, birth)
pub fn parse_hist_key(k: &[u8]) -> Option<(u64, u64, u64)> {
    parse_key::<3>(key::HIST, k).map(|a| (a[0], a[1], !a[2]))
}

pub fn key_key(id: u64) -> Vec<u8> {
    key_of(key::KEY, &[id])
}
pub fn parse_key_key(k: &[u8]) -> Option<u64> {
    parse_key::<1>(key::KEY, k).map(|a| a[0])
}
/// The nonce reservation record's key.
pub const NONCE_KEY: &[u8] = b"\x0Bnonce";
pub fn seal_key(pba: u64) -> Vec<u8> {
    key_of(key::SEAL, &[pba])
}
pub fn parse_seal_key(k: &[u8]) -> Option<u64> {
    parse_key::<1>(key::SEAL, k).map(|a| a[0])
}

/// Births below this are not in the birth index (see FORMAT.md §8): generation 1 is every
/// branch's first, and nothing ever needs to find "entries born after generation 0".
pub const FIRST_INDEXED_BIRTH: u64 = 2;

/// A branch record (`branch_key(id)`): one line of history of block maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRecord {
    pub id: u64,
    /// Current generation: the birth of new entries. Advances when a snapshot is taken.
    pub gen: u64,
    /// Origin (branch, snapshot generation) for clones and rolled-back heads; (0, 0) = none.
    pub origin_branch: u64,
    pub origin_gen: u64,
    /// Volume whose head this branch is; 0 = none (only snapshots live here).
    pub head_volume: u64,
    pub created_ns: u64,
}

pub mod branch_rec {
    pub const ID: usize = 0;
    pub const GEN: usize = 8;
    pub const ORIGIN_BRANCH: usize = 16;
    pub const ORIGIN_GEN: usize = 24;
    pub const HEAD_VOLUME: usize = 32;
    pub const CREATED_NS: usize = 40;
    pub const SIZE: usize = 48;
}

impl BranchRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; branch_rec::SIZE];
        put_u64(&mut v, branch_rec::ID, self.id);
        put_u64(&mut v, branch_rec::GEN, self.gen);
        put_u64(&mut v, branch_rec::ORIGIN_BRANCH, self.origin_branch);
        put_u64(&mut v, branch_rec::ORIGIN_GEN, self.origin_gen);
        put_u64(&mut v, branch_rec::HEAD_VOLUME, self.head_volume);
        put_u64(&mut v, branch_rec::CREATED_NS, self.created_ns);
        seal(&branch_key(self.id), v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<BranchRecord> {
        let b = unseal(key, v)?;
        if b.len() != branch_rec::SIZE {
            return Err(corrupt(key, "branch record length"));
        }
        let r = BranchRecord {
            id: get_u64(b, branch_rec::ID),
            gen: get_u64(b, branch_rec::GEN),
            origin_branch: get_u64(b, branch_rec::ORIGIN_BRANCH),
            origin_gen: get_u64(b, branch_rec::ORIGIN_GEN),
            head_volume: get_u64(b, branch_rec::HEAD_VOLUME),
            created_ns: get_u64(b, branch_rec::CREATED_NS),
        };
        if parse_branch_key(key) != Some(r.id) || r.id == 0 {
            return Err(corrupt(key, "branch id does not match its key"));
        }
        if r.gen == 0 || (r.origin_branch == 0) != (r.origin_gen == 0) || r.origin_branch == r.id {
            return Err(corrupt(key, "branch generation or origin invalid"));
        }
        Ok(r)
    }
    pub fn origin(&self) -> Option<(u64, u64)> {
        (self.origin_branch != 0).then_some((self.origin_branch, self.origin_gen))
    }
}

pub mod snap_flags {
    /// Deleted by the operator but still the origin of a clone or rolled-back head: not
    /// listed, its name is free, its blocks stay until nothing depends on it.
    pub const HIDDEN: u64 = 1 << 0;
    /// Being deleted (its exclusive blocks are being freed in several batches); resumed at
    /// open. Not a reference any more.
    pub const DELETING: u64 = 1 << 1;
    pub const KNOWN: u64 = HIDDEN | DELETING;
}

/// A snapshot record (`snap_key(branch, gen)`): the branch's state as of generation `gen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapRecord {
    pub branch: u64,
    pub gen: u64,
    /// Volume that owns it (whose `VOL@NAME` it is).
    pub volume: u64,
    pub created_ns: u64,
    pub size_bytes: u64,
    /// Data blocks the volume's own branch mapped when it was taken.
    pub referenced_blocks: u64,
    pub flags: u64,
    pub name: String,
}

pub mod snap_rec {
    pub const BRANCH: usize = 0;
    pub const GEN: usize = 8;
    pub const VOLUME: usize = 16;
    pub const CREATED_NS: usize = 24;
    pub const SIZE_BYTES: usize = 32;
    pub const REFERENCED: usize = 40;
    pub const FLAGS: usize = 48;
    pub const NAME_LEN: usize = 56; // u16
    pub const RESERVED: usize = 58; // u16
    pub const NAME: usize = 60;
    pub const FIXED: usize = 60;
}

impl SnapRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; snap_rec::FIXED];
        put_u64(&mut v, snap_rec::BRANCH, self.branch);
        put_u64(&mut v, snap_rec::GEN, self.gen);
        put_u64(&mut v, snap_rec::VOLUME, self.volume);
        put_u64(&mut v, snap_rec::CREATED_NS, self.created_ns);
        put_u64(&mut v, snap_rec::SIZE_BYTES, self.size_bytes);
        put_u64(&mut v, snap_rec::REFERENCED, self.referenced_blocks);
        put_u64(&mut v, snap_rec::FLAGS, self.flags);
        put_u16(&mut v, snap_rec::NAME_LEN, self.name.len() as u16);
        v.extend_from_slice(self.name.as_bytes());
        seal(&snap_key(self.branch, self.gen), v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<SnapRecord> {
        let b = unseal(key, v)?;
        if b.len() < snap_rec::FIXED {
            return Err(corrupt(key, "snapshot record too short"));
        }
        let n = get_u16(b, snap_rec::NAME_LEN) as usize;
        if b.len() != snap_rec::FIXED + n || n == 0 || n > MAX_NAME_LEN || get_u16(b, snap_rec::RESERVED) != 0 {
            return Err(corrupt(key, "snapshot record name length"));
        }
        let name = std::str::from_utf8(&b[snap_rec::NAME..]).map_err(|_| corrupt(key, "snapshot name is not UTF-8"))?.to_string();
        if validate_name(&name).is_err() {
            return Err(corrupt(key, "snapshot name breaks the naming rules"));
        }
        let r = SnapRecord {
            branch: get_u64(b, snap_rec::BRANCH),
            gen: get_u64(b, snap_rec::GEN),
            volume: get_u64(b, snap_rec::VOLUME),
            created_ns: get_u64(b, snap_rec::CREATED_NS),
            size_bytes: get_u64(b, snap_rec::SIZE_BYTES),
            referenced_blocks: get_u64(b, snap_rec::REFERENCED),
            flags: get_u64(b, snap_rec::FLAGS),
            name,
        };
        if parse_snap_key(key) != Some((r.branch, r.gen)) || r.gen == 0 {
            return Err(corrupt(key, "snapshot branch/generation do not match its key"));
        }
        if r.flags & !snap_flags::KNOWN != 0 {
            return Err(corrupt(key, "unknown snapshot flags"));
        }
        if r.size_bytes % BLOCK_SIZE != 0 || r.size_bytes == 0 || r.size_bytes > MAX_VOLUME_SIZE {
            return Err(corrupt(key, "snapshot size invalid"));
        }
        Ok(r)
    }
}

/// A history entry (`hist_key`): a map entry that a newer one replaced (or a discard
/// removed) while a snapshot still needed it. `kill` is the generation that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistEntry {
    pub entry: MapEntry,
    pub kill: u64,
}

pub const HIST_SIZE: usize = map_ent::SIZE + 8;

impl HistEntry {
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        let mut v = self.entry.body();
        v.extend_from_slice(&self.kill.to_le_bytes());
        seal(key, v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<HistEntry> {
        let b = unseal(key, v)?;
        if b.len() != HIST_SIZE {
            return Err(corrupt(key, "history entry length"));
        }
        let entry = MapEntry::from_body(key, &b[..map_ent::SIZE])?;
        let kill = get_u64(b, map_ent::SIZE);
        if parse_hist_key(key).map(|k| k.2) != Some(entry.birth_gen) || kill <= entry.birth_gen {
            return Err(corrupt(key, "history entry birth/kill inconsistent with its key"));
        }
        Ok(HistEntry { entry, kill })
    }
}

/// Dead-list value: the killed entry's pba and flags (so it can be freed without a lookup).
pub fn encode_dead_value(key: &[u8], pba: u64, flags: u32) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    put_u64(&mut v, 0, pba);
    put_u32(&mut v, 8, flags);
    seal(key, v)
}
pub fn decode_dead_value(key: &[u8], v: &[u8]) -> Result<(u64, u32)> {
    let b = unseal(key, v)?;
    if b.len() != 12 {
        return Err(corrupt(key, "dead-list value length"));
    }
    Ok((get_u64(b, 0), get_u32(b, 8)))
}
/// Birth index value: empty body, only the checksum.
pub fn encode_birth_value(key: &[u8]) -> Vec<u8> {
    seal(key, Vec::new())
}
pub fn decode_birth_value(key: &[u8], v: &[u8]) -> Result<()> {
    let b = unseal(key, v)?;
    if !b.is_empty() {
        return Err(corrupt(key, "birth index value length"));
    }
    Ok(())
}

pub const POOL_KEY: &[u8] = b"\x01pool";

pub fn volume_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = key::VOLUME;
    k[1..9].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn name_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(key::NAME);
    k.extend_from_slice(name.as_bytes());
    k
}

pub const MAP_KEY_LEN: usize = 17;

pub fn map_key(layer: u64, lba: u64) -> [u8; MAP_KEY_LEN] {
    let mut k = [0u8; MAP_KEY_LEN];
    k[0] = key::MAP;
    k[1..9].copy_from_slice(&layer.to_be_bytes());
    k[9..17].copy_from_slice(&lba.to_be_bytes());
    k
}

/// Split a map key into (layer, lba).
pub fn parse_map_key(k: &[u8]) -> Option<(u64, u64)> {
    if k.len() != MAP_KEY_LEN || k[0] != key::MAP {
        return None;
    }
    let layer = u64::from_be_bytes(k[1..9].try_into().ok()?);
    let lba = u64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((layer, lba))
}

/// Every value ends with crc32c(key || value-without-crc), so a value stored under the wrong key
/// is detected as well as a damaged one.
fn seal(key: &[u8], mut v: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), &v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn unseal<'a>(key: &[u8], v: &'a [u8]) -> Result<&'a [u8]> {
    if v.len() < 4 {
        return Err(corrupt(key, "value shorter than its checksum"));
    }
    let (body, c) = v.split_at(v.len() - 4);
    let stored = get_u32(c, 0);
    let computed = crc32c::crc32c_append(crc32c::crc32c(key), body);
    if stored != computed {
        return Err(corrupt(key, &format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})")));
    }
    Ok(body)
}

fn corrupt(key: &[u8], what: &str) -> Error {
    Error::Corrupt { location: Location::Record(key.to_vec()), what: what.to_string() }
}

/// The pool record (`POOL_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRecord {
    pub uuid: [u8; 16],
    /// Next id for a volume or layer; ids are never reused.
    pub next_id: u64,
    /// Current generation (birth time stamped on new map entries).
    pub generation: u64,
}

pub mod pool_rec {
    pub const UUID: usize = 0; // [u8;16]
    pub const NEXT_ID: usize = 16; // u64
    pub const GENERATION: usize = 24; // u64
    pub const SIZE: usize = 32; // + 4 bytes crc
}

impl PoolRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; pool_rec::SIZE];
        v[pool_rec::UUID..pool_rec::UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut v, pool_rec::NEXT_ID, self.next_id);
        put_u64(&mut v, pool_rec::GENERATION, self.generation);
        seal(POOL_KEY, v)
    }
    pub fn decode(v: &[u8]) -> Result<PoolRecord> {
        let b = unseal(POOL_KEY, v)?;
        if b.len() != pool_rec::SIZE {
            return Err(corrupt(POOL_KEY, "pool record has the wrong length"));
        }
        Ok(PoolRecord {
            uuid: b[0..16].try_into().map_err(|_| corrupt(POOL_KEY, "uuid"))?,
            next_id: get_u64(b, pool_rec::NEXT_ID),
            generation: get_u64(b, pool_rec::GENERATION),
        })
    }
}

/// Longest volume name in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A volume record (`volume_key(id)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub size_bytes: u64,
    pub created_ns: u64,
    /// Bit flags, see [`vol_flags`].
    pub flags: u64,
    /// Branch that holds this volume's head block map (= id until the first rollback).
    pub layer: u64,
    /// Reserved, zero (a clone's origin is in its branch record).
    pub origin_layer: u64,
    /// Reserved, zero.
    pub origin_gen: u64,
    pub name: String,
}

pub mod vol_flags {
    /// Reserved for snapshots (a read-only layer); never set.
    pub const SNAPSHOT: u64 = 1 << 0;
    /// The volume's data is encrypted (revision 2.1, FORMAT.md §11).
    pub const ENCRYPTED: u64 = 1 << 1;
    /// Flags valid in this version.
    pub const KNOWN: u64 = ENCRYPTED;
}

/// Largest volume size (64 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 56;

pub mod vol_rec {
    pub const ID: usize = 0; // u64
    pub const SIZE_BYTES: usize = 8; // u64
    pub const CREATED_NS: usize = 16; // u64
    pub const FLAGS: usize = 24; // u64
    pub const LAYER: usize = 32; // u64
    pub const ORIGIN_LAYER: usize = 40; // u64
    pub const ORIGIN_GEN: usize = 48; // u64
    pub const NAME_LEN: usize = 56; // u16
    pub const RESERVED: usize = 58; // u16 zero
    pub const NAME: usize = 60; // name bytes (UTF-8), then 4 bytes crc
    pub const FIXED: usize = 60;
}

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; vol_rec::FIXED];
        put_u64(&mut v, vol_rec::ID, self.id);
        put_u64(&mut v, vol_rec::SIZE_BYTES, self.size_bytes);
        put_u64(&mut v, vol_rec::CREATED_NS, self.created_ns);
        put_u64(&mut v, vol_rec::FLAGS, self.flags);
        put_u64(&mut v, vol_rec::LAYER, self.layer);
        put_u64(&mut v, vol_rec::ORIGIN_LAYER, self.origin_layer);
        put_u64(&mut v, vol_rec::ORIGIN_GEN, self.origin_gen);
        put_u16(&mut v, vol_rec::NAME_LEN, self.name.len() as u16);
        v.extend_from_slice(self.name.as_bytes());
        seal(&volume_key(self.id), v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<VolumeRecord> {
        let b = unseal(key, v)?;
        if b.len() < vol_rec::FIXED {
            return Err(corrupt(key, "volume record too short"));
        }
        let n = get_u16(b, vol_rec::NAME_LEN) as usize;
        if b.len() != vol_rec::FIXED + n || n == 0 || n > MAX_NAME_LEN {
            return Err(corrupt(key, "volume record name length"));
        }
        let name = std::str::from_utf8(&b[vol_rec::NAME..])
            .map_err(|_| corrupt(key, "volume name is not UTF-8"))?
            .to_string();
        if validate_name(&name).is_err() {
            return Err(corrupt(key, "volume name breaks the naming rules"));
        }
        let r = VolumeRecord {
            id: get_u64(b, vol_rec::ID),
            size_bytes: get_u64(b, vol_rec::SIZE_BYTES),
            created_ns: get_u64(b, vol_rec::CREATED_NS),
            flags: get_u64(b, vol_rec::FLAGS),
            layer: get_u64(b, vol_rec::LAYER),
            origin_layer: get_u64(b, vol_rec::ORIGIN_LAYER),
            origin_gen: get_u64(b, vol_rec::ORIGIN_GEN),
            name,
        };
        if key != volume_key(r.id) {
            return Err(corrupt(key, "volume id does not match its key"));
        }
        if r.size_bytes % BLOCK_SIZE != 0 || r.size_bytes == 0 || r.size_bytes > MAX_VOLUME_SIZE {
            return Err(corrupt(key, "volume size is zero, not a multiple of 4096 or over 64 PiB"));
        }
        if r.flags & !vol_flags::KNOWN != 0 {
            return Err(corrupt(key, "unknown volume flags"));
        }
        if r.layer == 0 || r.origin_layer != 0 || r.origin_gen != 0 || get_u16(b, vol_rec::RESERVED) != 0 {
            return Err(corrupt(key, "volume layer is 0 or reserved fields are set"));
        }
        Ok(r)
    }
}

/// Name index value: the volume id.
pub fn encode_name_value(name: &str, id: u64) -> Vec<u8> {
    seal(&name_key(name), id.to_le_bytes().to_vec())
}
pub fn decode_name_value(key: &[u8], v: &[u8]) -> Result<u64> {
    let b = unseal(key, v)?;
    if b.len() != 8 {
        return Err(corrupt(key, "name index value length"));
    }
    Ok(get_u64(b, 0))
}

/// One block map entry: logical block -> physical block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Physical block number (data byte offset = DATA_START + pba * 4096).
    pub pba: u64,
    /// Generation in which this mapping was created (its birth time).
    pub birth_gen: u64,
    /// See [`map_flags`].
    pub flags: u32,
    /// AES-GCM nonce (zero unless ENCRYPTED).
    pub nonce: [u8; 12],
    /// AES-GCM tag (zero unless ENCRYPTED).
    pub tag: [u8; 16],
}

pub mod map_flags {
    /// Reserved: the block is AES-256-GCM encrypted (nonce and tag valid). Never set in v2.
    pub const ENCRYPTED: u32 = 1 << 0;
    /// Version 2: the block reads as zeros and hides the origin's block (clones, rolled-back
    /// heads); `pba` is 0 and unused.
    pub const TOMBSTONE: u32 = 1 << 1;
    pub const KNOWN: u32 = TOMBSTONE;
}

pub mod map_ent {
    pub const PBA: usize = 0; // u64
    pub const BIRTH_GEN: usize = 8; // u64
    pub const FLAGS: usize = 16; // u32
    pub const NONCE: usize = 20; // [u8;12]
    pub const TAG: usize = 32; // [u8;16]
    pub const SIZE: usize = 48; // + 4 bytes crc = 52 bytes stored
    pub const STORED: usize = SIZE + 4;
}
const _: () = assert!(map_ent::TAG + 16 == map_ent::SIZE);
const _: () = assert!(map_ent::FLAGS + 4 == map_ent::NONCE && map_ent::BIRTH_GEN + 8 == map_ent::FLAGS);
const _: () = assert!(1u64 << BLOCK_SHIFT == BLOCK_SIZE);
const _: () = assert!(MAP_KEY_LEN == 1 + 8 + 8);
const _: () = assert!(map_ent::NONCE + 12 == map_ent::TAG);
const _: () = assert!(vol_rec::NAME == vol_rec::FIXED && vol_rec::RESERVED + 2 == vol_rec::NAME);
const _: () = assert!(branch_rec::CREATED_NS + 8 == branch_rec::SIZE);
const _: () = assert!(snap_rec::NAME == snap_rec::FIXED && snap_rec::RESERVED + 2 == snap_rec::NAME && snap_rec::FLAGS + 8 == snap_rec::NAME_LEN);
const _: () = assert!(HIST_SIZE == 56);
const _: () = assert!(pool_rec::GENERATION + 8 == pool_rec::SIZE);

impl MapEntry {
    pub fn new(pba: u64, birth_gen: u64) -> MapEntry {
        MapEntry { pba, birth_gen, flags: 0, nonce: [0; 12], tag: [0; 16] }
    }
    pub fn tombstone(birth_gen: u64) -> MapEntry {
        MapEntry { pba: 0, birth_gen, flags: map_flags::TOMBSTONE, nonce: [0; 12], tag: [0; 16] }
    }
    pub fn is_tombstone(&self) -> bool {
        self.flags & map_flags::TOMBSTONE != 0
    }
    fn body(&self) -> Vec<u8> {
        let mut v = vec![0u8; map_ent::SIZE];
        put_u64(&mut v, map_ent::PBA, self.pba);
        put_u64(&mut v, map_ent::BIRTH_GEN, self.birth_gen);
        put_u32(&mut v, map_ent::FLAGS, self.flags);
        v[map_ent::NONCE..map_ent::NONCE + 12].copy_from_slice(&self.nonce);
        v[map_ent::TAG..map_ent::TAG + 16].copy_from_slice(&self.tag);
        v
    }
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        seal(key, self.body())
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<MapEntry> {
        let b = unseal(key, v)?;
        if b.len() != map_ent::SIZE {
            return Err(corrupt(key, "map entry length"));
        }
        Self::from_body(key, b)
    }
    fn from_body(key: &[u8], b: &[u8]) -> Result<MapEntry> {
        let e = MapEntry {
            pba: get_u64(b, map_ent::PBA),
            birth_gen: get_u64(b, map_ent::BIRTH_GEN),
            flags: get_u32(b, map_ent::FLAGS),
            nonce: b[map_ent::NONCE..map_ent::NONCE + 12].try_into().map_err(|_| corrupt(key, "nonce"))?,
            tag: b[map_ent::TAG..map_ent::TAG + 16].try_into().map_err(|_| corrupt(key, "tag"))?,
        };
        if e.flags & !map_flags::KNOWN != 0 {
            return Err(corrupt(key, "unknown map entry flags"));
        }
        if e.is_tombstone() && e.pba != 0 {
            return Err(corrupt(key, "tombstone with a physical block"));
        }
        Ok(e)
    }
}

/// Validate a volume name: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
/// (`@` is reserved for `VOL@SNAP` and `/` for future namespaces.)
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why| Err(Error::InvalidName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 bytes");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if !name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')) {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A wrapped key record (`key_key(id)`, FORMAT.md §11.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub family: u64,
    pub nonce: [u8; 12],
    pub wrapped: [u8; 32],
    pub tag: [u8; 16],
}

pub mod key_rec {
    pub const FAMILY: usize = 0;
    pub const NONCE: usize = 8;
    pub const WRAPPED: usize = 20;
    pub const TAG: usize = 52;
    pub const RESERVED: usize = 68;
    pub const SIZE: usize = 72;
}
const _: () = assert!(key_rec::NONCE == key_rec::FAMILY + 8 && key_rec::WRAPPED == key_rec::NONCE + 12);
const _: () = assert!(key_rec::TAG == key_rec::WRAPPED + 32 && key_rec::RESERVED == key_rec::TAG + 16);
const _: () = assert!(key_rec::SIZE == key_rec::RESERVED + 4);

impl KeyRecord {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let mut v = vec![0u8; key_rec::SIZE];
        put_u64(&mut v, key_rec::FAMILY, self.family);
        v[key_rec::NONCE..key_rec::WRAPPED].copy_from_slice(&self.nonce);
        v[key_rec::WRAPPED..key_rec::TAG].copy_from_slice(&self.wrapped);
        v[key_rec::TAG..key_rec::RESERVED].copy_from_slice(&self.tag);
        seal(&key_key(id), v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<KeyRecord> {
        let b = unseal(key, v)?;
        if b.len() != key_rec::SIZE {
            return Err(corrupt(key, "key record length"));
        }
        let Some(id) = parse_key_key(key) else { return Err(corrupt(key, "key record key")) };
        let r = KeyRecord {
            family: get_u64(b, key_rec::FAMILY),
            nonce: b[key_rec::NONCE..key_rec::WRAPPED].try_into().map_err(|_| corrupt(key, "key record"))?,
            wrapped: b[key_rec::WRAPPED..key_rec::TAG].try_into().map_err(|_| corrupt(key, "key record"))?,
            tag: b[key_rec::TAG..key_rec::RESERVED].try_into().map_err(|_| corrupt(key, "key record"))?,
        };
        if get_u32(b, key_rec::RESERVED) != 0 || (id == 0) != (r.family == 0) {
            return Err(corrupt(key, "key record family or reserved field invalid"));
        }
        Ok(r)
    }
}

/// The nonce reservation (`NONCE_KEY`, FORMAT.md §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceRecord {
    pub salt: u32,
    /// Counter values below this may have been used.
    pub limit: u64,
}

pub mod nonce_rec {
    pub const SALT: usize = 0;
    pub const RESERVED: usize = 4;
    pub const LIMIT: usize = 8;
    pub const SIZE: usize = 16;
}
const _: () = assert!(nonce_rec::LIMIT + 8 == nonce_rec::SIZE && nonce_rec::RESERVED + 4 == nonce_rec::LIMIT);

/// Counter values reserved by one synced write of the nonce record.
pub const NONCE_CHUNK: u64 = 1 << 20;

impl NonceRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; nonce_rec::SIZE];
        v[nonce_rec::SALT..nonce_rec::RESERVED].copy_from_slice(&self.salt.to_le_bytes());
        put_u64(&mut v, nonce_rec::LIMIT, self.limit);
        seal(NONCE_KEY, v)
    }
    pub fn decode(v: &[u8]) -> Result<NonceRecord> {
        let b = unseal(NONCE_KEY, v)?;
        if b.len() != nonce_rec::SIZE || get_u32(b, nonce_rec::RESERVED) != 0 {
            return Err(corrupt(NONCE_KEY, "nonce record length or reserved field"));
        }
        Ok(NonceRecord { salt: get_u32(b, nonce_rec::SALT), limit: get_u64(b, nonce_rec::LIMIT) })
    }
}

/// The seal of an encrypted data block (`seal_key(pba)`, FORMAT.md §11.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub nonce: [u8; 12],
    pub tag: [u8; 16],
}

pub mod seal_rec {
    pub const NONCE: usize = 0;
    pub const TAG: usize = 12;
    pub const RESERVED: usize = 28;
    pub const SIZE: usize = 32;
}
const _: () = assert!(seal_rec::TAG == seal_rec::NONCE + 12 && seal_rec::RESERVED == seal_rec::TAG + 16);
const _: () = assert!(seal_rec::SIZE == seal_rec::RESERVED + 4);

impl Seal {
    pub fn encode(&self, pba: u64) -> Vec<u8> {
        let mut v = vec![0u8; seal_rec::SIZE];
        v[seal_rec::NONCE..seal_rec::TAG].copy_from_slice(&self.nonce);
        v[seal_rec::TAG..seal_rec::RESERVED].copy_from_slice(&self.tag);
        seal(&seal_key(pba), v)
    }
    pub fn decode(key: &[u8], v: &[u8]) -> Result<Seal> {
        let b = unseal(key, v)?;
        if b.len() != seal_rec::SIZE || get_u32(b, seal_rec::RESERVED) != 0 || parse_seal_key(key).is_none() {
            return Err(corrupt(key, "seal record length, key or reserved field"));
        }
        Ok(Seal {
            nonce: b[seal_rec::NONCE..seal_rec::TAG].try_into().map_err(|_| corrupt(key, "seal record"))?,
            tag: b[seal_rec::TAG..seal_rec::RESERVED].try_into().map_err(|_| corrupt(key, "seal record"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_sb() -> Superblock {
        Superblock {
            version: 1,
            incompat: 0,
            compat: 0,
            autoclear: 0,
            uuid: [7; 16],
            block_size: 4096,
            data_start: DATA_START,
            total_blocks: 1000,
            created_ns: 42,
        }
    }

    #[test]
    fn superblock_roundtrip_and_layout() {
        let s = sample_sb();
        let b = s.encode();
        assert_eq!(&b[0..8], b"VBLKPOOL");
        assert_eq!(get_u64(&b, 72), 1000);
        assert_eq!(Superblock::decode(&b).unwrap(), s);
    }

    #[test]
    fn superblock_rejects_corruption_and_new_versions() {
        let s = sample_sb();
        let mut b = s.encode();
        b[100] ^= 1;
        assert!(matches!(Superblock::decode(&b), Err(SbError::BadChecksum { .. })));
        let mut s2 = s.clone();
        s2.version = FORMAT_VERSION + 1;
        assert_eq!(Superblock::decode(&s2.encode()), Err(SbError::TooNew(FORMAT_VERSION + 1)));
        let mut s3 = s.clone();
        s3.incompat = 1 << 5;
        assert_eq!(Superblock::decode(&s3.encode()), Err(SbError::Incompat(1 << 5)));
        let mut s4 = s;
        s4.compat = 1 << 9; // unknown compatible features are fine
        assert!(Superblock::decode(&s4.encode()).is_ok());
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SbError::BadMagic));
    }

    #[test]
    fn records_roundtrip_and_bind_to_key() {
        let k = map_key(3, 99);
        let e = MapEntry::new(1234, 5);
        let v = e.encode(&k);
        assert_eq!(v.len(), map_ent::STORED);
        assert_eq!(MapEntry::decode(&k, &v).unwrap(), e);
        // Same value under another key: detected.
        assert!(MapEntry::decode(&map_key(3, 100), &v).is_err());
        let r = VolumeRecord {
            id: 9,
            size_bytes: 1 << 30,
            created_ns: 1,
            flags: 0,
            layer: 9,
            origin_layer: 0,
            origin_gen: 0,
            name: "vm-1.disk_0".into(),
        };
        let v = r.encode();
        assert_eq!(VolumeRecord::decode(&volume_key(9), &v).unwrap(), r);
        assert!(VolumeRecord::decode(&volume_key(8), &v).is_err());
        assert_eq!(parse_map_key(&k), Some((3, 99)));
    }

    #[test]
    fn v2_records_roundtrip() {
        let b = BranchRecord { id: 4, gen: 7, origin_branch: 2, origin_gen: 3, head_volume: 9, created_ns: 5 };
        assert_eq!(BranchRecord::decode(&branch_key(4), &b.encode()).unwrap(), b);
        assert!(BranchRecord::decode(&branch_key(5), &b.encode()).is_err());
        let s = SnapRecord { branch: 4, gen: 6, volume: 9, created_ns: 1, size_bytes: 1 << 20, referenced_blocks: 3, flags: 0, name: "s1".into() };
        assert_eq!(SnapRecord::decode(&snap_key(4, 6), &s.encode()).unwrap(), s);
        assert!(SnapRecord::decode(&snap_key(4, 7), &s.encode()).is_err());
        let k = hist_key(4, 10, 3);
        let h = HistEntry { entry: MapEntry::new(77, 3), kill: 5 };
        assert_eq!(HistEntry::decode(&k, &h.encode(&k)).unwrap(), h);
        assert_eq!(parse_hist_key(&k), Some((4, 10, 3)));
        // Newer births sort first within one lba.
        assert!(hist_key(4, 10, 5) < hist_key(4, 10, 3) && hist_key(4, 10, 3) < hist_key(4, 11, 9));
        let t = MapEntry::tombstone(4);
        let mk = map_key(4, 1);
        assert!(MapEntry::decode(&mk, &t.encode(&mk)).unwrap().is_tombstone());
        assert_eq!(parse_dead_key(&dead_key(1, 2, 3, 4)), Some((1, 2, 3, 4)));
        assert_eq!(parse_birth_key(&birth_key(1, 2, 3)), Some((1, 2, 3)));
    }

    #[test]
    fn names() {
        assert!(validate_name("vm-1.disk_0").is_ok());
        for bad in ["", "a@b", "-x", ".x", "a/b", "é", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&data);
            let _ = MapEntry::decode(&map_key(1, 2), &data);
            let _ = VolumeRecord::decode(&volume_key(1), &data);
            let _ = PoolRecord::decode(&data);
            let _ = BranchRecord::decode(&branch_key(1), &data);
            let _ = SnapRecord::decode(&snap_key(1, 2), &data);
            let _ = HistEntry::decode(&hist_key(1, 2, 3), &data);
            let _ = decode_dead_value(&dead_key(1, 2, 3, 4), &data);
            let _ = decode_birth_value(&birth_key(1, 2, 3), &data);
        }
    }
}
