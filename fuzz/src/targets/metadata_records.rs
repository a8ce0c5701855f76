//! `metadata_records`: the on-disk decoders of `vblk_engine::format` (superblock, pool record,
//! volume record, name index value, block map entry and key; version 2: branch, snapshot, history,
//! dead-list and birth-index records).
//!
//! The first input byte picks a mode (modulo the number of modes):
//! ```text
//! 0  Superblock::decode(rest)
//! 1  superblock with a correct checksum: rest padded/truncated to 4096 bytes, magic forced
//!    when rest[0] is even, crc32c recomputed — so the fuzzer gets past the checksum to the
//!    field checks
//! 2  MapEntry::decode(key, value)         key: u8 kind (even: map_key(u64 layer, u64 lba),
//! 3  ... value sealed with a correct crc       odd: u8 length + raw bytes), value = rest
//! 4  VolumeRecord::decode(key, value)     key: even: volume_key(u64 id), odd: raw
//! 5  ... value sealed
//! 6  PoolRecord::decode(value)
//! 7  ... value sealed
//! 8  decode_name_value(key, value)        key: even: name_key(u8 length + bytes), odd: raw
//! 9  ... value sealed
//! 10 parse_map_key(rest)
//! 11 round trip: rest is `arbitrary` data for a [`Mirror`] record, made valid, encoded, decoded
//!    (must be identical), then one bit of the stored value (or of its key) flipped: refused
//! 12 BranchRecord::decode(key, value)     (version 2) key: even: branch_key(u64), odd: raw
//! 13 ... value sealed
//! 14 SnapRecord::decode(key, value)       key: even: snap_key(u64, u64), odd: raw
//! 15 ... value sealed
//! 16 HistEntry::decode(key, value)        key: even: hist_key(u64, u64, u64), odd: raw
//! 17 ... value sealed
//! 18 decode_dead_value(key, value)        key: even: dead_key(4 x u64), odd: raw
//! 19 ... value sealed
//! 20 decode_birth_value(key, value)       key: even: birth_key(3 x u64), odd: raw
//! 21 ... value sealed
//! ```
//! Properties: decoders never panic; a record decoder that fails returns `Error::Corrupt` located
//! at the record's key; whatever a decoder accepts satisfies the format's rules (FORMAT.md §2–3)
//! and re-encodes to exactly the bytes it was decoded from (the superblock: up to its unchecked
//! reserved bytes); any valid record round-trips; any single-bit flip of an encoded record or of
//! its key is detected.

use arbitrary::{Arbitrary, Unstructured};
use vblk_engine::error::Location;
use vblk_engine::format::{
    self, decode_name_value, encode_name_value, map_key, name_key, parse_map_key, sb, volume_key, MapEntry, PoolRecord,
    SbError, Superblock, VolumeRecord, BLOCK_SIZE, DATA_START, FORMAT_VERSION, MAX_NAME_LEN, MAX_VOLUME_SIZE, POOL_KEY,
};
use vblk_engine::Error;

use crate::cursor::{Cursor, Writer};

const MODES: u8 = 22;

/// crc32c(key || body) appended: what `format::seal` does (private there).
pub fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), body);
    let mut v = body.to_vec();
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn read_key(c: &mut Cursor, typed: impl FnOnce(&mut Cursor) -> Vec<u8>) -> Vec<u8> {
    if c.u8() & 1 == 0 {
        typed(c)
    } else {
        c.bytes8().to_vec()
    }
}

/// A record decoder's error must be `Corrupt` at the record's key.
fn assert_corrupt_at(e: &Error, key: &[u8]) {
    match e {
        Error::Corrupt { location: Location::Record(k), what } => {
            assert_eq!(k.as_slice(), key, "error located at the wrong key: {what}");
        }
        other => panic!("record decoder returned {other:?}, not Corrupt"),
    }
}

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let mode = c.u8() % MODES;
    if crate::verbose() {
        eprintln!("mode {mode}, {} bytes", data.len());
    }
    match mode {
        0 => superblock(c.rest()),
        1 => {
            let rest = c.rest();
            let mut b = vec![0u8; sb::SIZE];
            let n = rest.len().min(sb::SIZE);
            b[..n].copy_from_slice(&rest[..n]);
            if rest.first().is_some_and(|x| x % 2 == 0) {
                b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&format::SB_MAGIC);
            }
            let crc = crc32c::crc32c(&b[..sb::CRC]);
            b[sb::CRC..].copy_from_slice(&crc.to_le_bytes());
            superblock(&b);
        }
        2 | 3 => {
            let key = read_key(&mut c, |c| map_key(c.u64(), c.u64()).to_vec());
            let body = c.rest();
            let v = if mode == 3 { seal(&key, body) } else { body.to_vec() };
            match MapEntry::decode(&key, &v) {
                Ok(e) => {
                    assert_eq!(e.flags & !format::map_flags::KNOWN, 0, "unknown map flags accepted");
                    assert_eq!(e.encode(&key), v, "map entry is not canonical");
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
            let _ = parse_map_key(&key);
        }
        4 | 5 => {
            let key = read_key(&mut c, |c| volume_key(c.u64()).to_vec());
            let body = c.rest();
            let v = if mode == 5 { seal(&key, body) } else { body.to_vec() };
            match VolumeRecord::decode(&key, &v) {
                Ok(r) => {
                    assert_eq!(key, volume_key(r.id), "volume record accepted under another key");
                    assert!(
                        r.size_bytes > 0 && r.size_bytes % BLOCK_SIZE == 0 && r.size_bytes <= MAX_VOLUME_SIZE,
                        "size {}",
                        r.size_bytes
                    );
                    assert!((1..=MAX_NAME_LEN).contains(&r.name.len()), "name length {}", r.name.len());
                    assert_eq!(r.flags & !format::vol_flags::KNOWN, 0);
                    // Version 2: the layer is the head branch (any non-zero id); origins stay reserved.
                    assert!(r.layer != 0, "volume record with layer 0 accepted");
                    assert_eq!((r.origin_layer, r.origin_gen), (0, 0), "reserved origin fields accepted");
                    assert_eq!(r.encode(), v, "volume record is not canonical");
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        6 | 7 => {
            let body = c.rest();
            let v = if mode == 7 { seal(POOL_KEY, body) } else { body.to_vec() };
            match PoolRecord::decode(&v) {
                Ok(r) => assert_eq!(r.encode(), v, "pool record is not canonical"),
                Err(e) => assert_corrupt_at(&e, POOL_KEY),
            }
        }
        8 | 9 => {
            let key = read_key(&mut c, |c| {
                let n = c.bytes8();
                let mut k = vec![format::key::NAME];
                k.extend_from_slice(n);
                k
            });
            let body = c.rest();
            let v = if mode == 9 { seal(&key, body) } else { body.to_vec() };
            match decode_name_value(&key, &v) {
                Ok(id) => {
                    assert_eq!(v, seal(&key, &id.to_le_bytes()), "name value is not canonical");
                    if let Some(name) = key.strip_prefix(&[format::key::NAME]).and_then(|n| std::str::from_utf8(n).ok())
                    {
                        assert_eq!(encode_name_value(name, id), v);
                    }
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        10 => {
            let k = c.rest();
            match parse_map_key(k) {
                Some((layer, lba)) => assert_eq!(map_key(layer, lba).as_slice(), k),
                None => assert!(k.len() != format::MAP_KEY_LEN || k[0] != format::key::MAP),
            }
        }
        11 => round_trip(c.rest()),
        12 | 13 => {
            let key = read_key(&mut c, |c| format::branch_key(c.u64()));
            let v = if mode == 13 { seal(&key, c.rest()) } else { c.rest().to_vec() };
            match format::BranchRecord::decode(&key, &v) {
                Ok(r) => {
                    assert_eq!(key, format::branch_key(r.id), "branch record accepted under another key");
                    assert!(r.id != 0 && r.gen != 0 && r.origin_branch != r.id);
                    assert_eq!(r.origin_branch == 0, r.origin_gen == 0, "half an origin accepted");
                    assert_eq!(r.encode(), v, "branch record is not canonical");
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        14 | 15 => {
            let key = read_key(&mut c, |c| format::snap_key(c.u64(), c.u64()));
            let v = if mode == 15 { seal(&key, c.rest()) } else { c.rest().to_vec() };
            match format::SnapRecord::decode(&key, &v) {
                Ok(r) => {
                    assert_eq!(key, format::snap_key(r.branch, r.gen), "snapshot record accepted under another key");
                    assert!(r.gen != 0 && r.flags & !format::snap_flags::KNOWN == 0);
                    assert!(r.size_bytes > 0 && r.size_bytes % BLOCK_SIZE == 0 && r.size_bytes <= MAX_VOLUME_SIZE);
                    assert!(format::validate_name(&r.name).is_ok(), "{:?}", r.name);
                    assert_eq!(r.encode(), v, "snapshot record is not canonical");
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        16 | 17 => {
            let key = read_key(&mut c, |c| format::hist_key(c.u64(), c.u64(), c.u64()));
            let v = if mode == 17 { seal(&key, c.rest()) } else { c.rest().to_vec() };
            match format::HistEntry::decode(&key, &v) {
                Ok(h) => {
                    assert_eq!(format::parse_hist_key(&key).map(|k| k.2), Some(h.entry.birth_gen), "birth differs from the key's");
                    assert!(h.kill > h.entry.birth_gen, "killed before it was born");
                    assert_eq!(h.entry.flags & !format::map_flags::KNOWN, 0);
                    assert!(!h.entry.is_tombstone() || h.entry.pba == 0, "tombstone with a block");
                    assert_eq!(h.encode(&key), v, "history entry is not canonical");
                }
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        18 | 19 => {
            let key = read_key(&mut c, |c| format::dead_key(c.u64(), c.u64(), c.u64(), c.u64()));
            let v = if mode == 19 { seal(&key, c.rest()) } else { c.rest().to_vec() };
            match format::decode_dead_value(&key, &v) {
                Ok((pba, flags)) => assert_eq!(format::encode_dead_value(&key, pba, flags), v, "dead-list value is not canonical"),
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
        _ => {
            let key = read_key(&mut c, |c| format::birth_key(c.u64(), c.u64(), c.u64()));
            let v = if mode == 21 { seal(&key, c.rest()) } else { c.rest().to_vec() };
            match format::decode_birth_value(&key, &v) {
                Ok(()) => assert_eq!(format::encode_birth_value(&key), v, "birth index value is not canonical"),
                Err(e) => assert_corrupt_at(&e, &key),
            }
        }
    }
}

fn superblock(b: &[u8]) {
    match Superblock::decode(b) {
        Ok(s) => {
            assert!(b.len() >= sb::SIZE);
            assert!(s.version >= 1 && s.version <= FORMAT_VERSION, "version {}", s.version);
            assert_eq!(s.incompat & !format::INCOMPAT_KNOWN, 0, "unknown incompatible features accepted");
            assert_eq!(u64::from(s.block_size), BLOCK_SIZE);
            assert_eq!(s.data_start, DATA_START);
            assert!(s.total_blocks > 0 && s.total_blocks <= (u64::MAX - DATA_START) >> format::BLOCK_SHIFT);
            // Canonical up to the bytes a version-1 reader does not check (FORMAT.md §2):
            // RESERVED0 and 88..4092 (which the checksum covers).
            let enc = s.encode();
            let mut want = b[..sb::SIZE].to_vec();
            want[sb::RESERVED0..sb::RESERVED0 + 4].fill(0);
            want[sb::END_OF_FIELDS..sb::CRC].fill(0);
            let crc = crc32c::crc32c(&want[..sb::CRC]);
            want[sb::CRC..].copy_from_slice(&crc.to_le_bytes());
            assert!(enc[..] == want[..], "superblock does not re-encode to its own fields");
            assert_eq!(Superblock::decode(&enc), Ok(s));
        }
        Err(SbError::Invalid(why)) => assert!(!why.is_empty()),
        Err(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Round trip of valid records generated by `arbitrary`.

/// Fuzz-side mirrors of the format's records: any value is mapped into the valid domain by
/// [`Mirror::valid`].
#[derive(Debug, Clone, Arbitrary)]
pub enum Mirror {
    Superblock { version: u32, compat: u64, autoclear: u64, uuid: [u8; 16], total_blocks: u64, created_ns: u64 },
    Pool { uuid: [u8; 16], next_id: u64, generation: u64 },
    Volume { id: u64, size_blocks: u64, created_ns: u64, name: Vec<u8> },
    Name { name: Vec<u8>, id: u64 },
    Map { layer: u64, lba: u64, pba: u64, birth_gen: u64, nonce: [u8; 12], tag: [u8; 16] },
}

/// Decodes `(key, value)` and re-encodes what it decoded (None on refusal).
type Redecode = Box<dyn Fn(&[u8], &[u8]) -> Option<Vec<u8>>>;

/// A valid record: its key (empty when the record is not bound to one), its encoding, and its
/// decoder.
struct Encoded {
    key: Vec<u8>,
    value: Vec<u8>,
    decode: Redecode,
}

/// Map arbitrary bytes onto the volume-name alphabet, never starting with '.' or '-'.
fn valid_name(raw: &[u8]) -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
    let mut s: String = raw.iter().take(MAX_NAME_LEN).map(|&b| ALPHA[b as usize % ALPHA.len()] as char).collect();
    if s.is_empty() || s.starts_with(['.', '-']) {
        s.replace_range(0..s.len().min(1), "v");
    }
    s
}

impl Mirror {
    fn valid(&self) -> Encoded {
        match self.clone() {
            Mirror::Superblock { version, compat, autoclear, uuid, total_blocks, created_ns } => {
                let s = Superblock {
                    version: version.clamp(1, FORMAT_VERSION),
                    incompat: 0,
                    compat,
                    autoclear,
                    uuid,
                    block_size: BLOCK_SIZE as u32,
                    data_start: DATA_START,
                    total_blocks: 1 + total_blocks % ((u64::MAX - DATA_START) >> format::BLOCK_SHIFT),
                    created_ns,
                };
                let value = s.encode().to_vec();
                assert_eq!(Superblock::decode(&value).as_ref(), Ok(&s), "superblock round trip");
                Encoded {
                    key: Vec::new(),
                    value,
                    decode: Box::new(|_, v| Superblock::decode(v).ok().map(|s| s.encode().to_vec())),
                }
            }
            Mirror::Pool { uuid, next_id, generation } => {
                let r = PoolRecord { uuid, next_id, generation };
                let value = r.encode();
                assert_eq!(PoolRecord::decode(&value).ok().as_ref(), Some(&r), "pool record round trip");
                // The key is the constant POOL_KEY (not stored with the record): nothing to flip.
                Encoded {
                    key: Vec::new(),
                    value,
                    decode: Box::new(|_, v| PoolRecord::decode(v).ok().map(|r| r.encode())),
                }
            }
            Mirror::Volume { id, size_blocks, created_ns, name } => {
                let r = VolumeRecord {
                    id,
                    size_bytes: (1 + size_blocks % (MAX_VOLUME_SIZE / BLOCK_SIZE)) * BLOCK_SIZE,
                    created_ns,
                    flags: 0,
                    // Version 2: the head branch; never 0 (ids start at 1).
                    layer: id.max(1),
                    origin_layer: 0,
                    origin_gen: 0,
                    name: valid_name(&name),
                };
                assert!(format::validate_name(&r.name).is_ok(), "{:?}", r.name);
                let key = volume_key(id).to_vec();
                let value = r.encode();
                assert_eq!(VolumeRecord::decode(&key, &value).ok().as_ref(), Some(&r), "volume record round trip");
                Encoded { key, value, decode: Box::new(|k, v| VolumeRecord::decode(k, v).ok().map(|r| r.encode())) }
            }
            Mirror::Name { name, id } => {
                let name = valid_name(&name);
                let key = name_key(&name);
                let value = encode_name_value(&name, id);
                assert_eq!(decode_name_value(&key, &value).ok(), Some(id), "name value round trip");
                Encoded {
                    key,
                    value,
                    decode: Box::new(|k, v| decode_name_value(k, v).ok().map(|id| seal(k, &id.to_le_bytes()))),
                }
            }
            Mirror::Map { layer, lba, pba, birth_gen, nonce, tag } => {
                let e = MapEntry { pba, birth_gen, flags: 0, nonce, tag };
                let key = map_key(layer, lba).to_vec();
                let value = e.encode(&key);
                assert_eq!(value.len(), format::map_ent::STORED);
                assert_eq!(MapEntry::decode(&key, &value).ok(), Some(e), "map entry round trip");
                assert_eq!(parse_map_key(&key), Some((layer, lba)));
                Encoded { key, value, decode: Box::new(|k, v| MapEntry::decode(k, v).ok().map(|e| e.encode(k))) }
            }
        }
    }
}

fn round_trip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(m) = Mirror::arbitrary(&mut u) else { return };
    let flip: u32 = u.arbitrary().unwrap_or(0);
    let in_key: bool = u.arbitrary().unwrap_or(false);
    if crate::verbose() {
        eprintln!("{m:#?} flip bit {flip} in key: {in_key}");
    }
    let enc = m.valid();
    assert_eq!(
        (enc.decode)(&enc.key, &enc.value).as_deref(),
        Some(&enc.value[..]),
        "decode(encode(x)) re-encodes to x"
    );
    // A single flipped bit anywhere in the stored value, or in the key it is bound to, must be
    // refused (crc32c detects every 1-bit error; the superblock's is over bytes 0..4092 and
    // magic/version are checked first, which refuse as well).
    let (mut key, mut value) = (enc.key.clone(), enc.value.clone());
    let target = if in_key && !key.is_empty() { &mut key } else { &mut value };
    let bit = flip as usize % (target.len() * 8);
    target[bit / 8] ^= 1 << (bit % 8);
    assert_eq!(
        (enc.decode)(&key, &value),
        None,
        "bit {bit} flipped (in key: {}) was not detected",
        in_key && !enc.key.is_empty()
    );
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let sbk = Superblock {
        version: 1,
        incompat: 0,
        compat: 0,
        autoclear: 0,
        uuid: [7; 16],
        block_size: 4096,
        data_start: DATA_START,
        total_blocks: 1000,
        created_ns: 42,
    };
    let mut out = Vec::new();
    let mut w = Writer::new();
    out.push(("superblock", w.u8(0).bytes(&sbk.encode()).finish()));
    // Mode 1 keeps only the fields that matter: the first 88 bytes (crc recomputed).
    out.push(("superblock-fields", w.u8(1).bytes(&sbk.encode()[..sb::END_OF_FIELDS]).finish()));
    let k = map_key(3, 99);
    let e = MapEntry::new(1234, 5);
    out.push(("map-entry", w.u8(2).u8(0).u64(3).u64(99).bytes(&e.encode(&k)).finish()));
    out.push(("map-entry-sealed", w.u8(3).u8(0).u64(3).u64(99).bytes(&e.encode(&k)[..format::map_ent::SIZE]).finish()));
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
    let rv = r.encode();
    out.push(("volume", w.u8(4).u8(0).u64(9).bytes(&rv).finish()));
    out.push(("volume-sealed", w.u8(5).u8(0).u64(9).bytes(&rv[..rv.len() - 4]).finish()));
    let p = PoolRecord { uuid: [7; 16], next_id: 10, generation: 1 };
    out.push(("pool", w.u8(6).bytes(&p.encode()).finish()));
    out.push(("pool-sealed", w.u8(7).bytes(&p.encode()[..format::pool_rec::SIZE]).finish()));
    out.push(("name", w.u8(8).u8(0).bytes8(b"vm-1.disk_0").bytes(&encode_name_value("vm-1.disk_0", 9)).finish()));
    out.push(("name-sealed", w.u8(9).u8(0).bytes8(b"vm-1").bytes(&9u64.to_le_bytes()).finish()));
    out.push(("map-key", w.u8(10).bytes(&k).finish()));
    // Round-trip mode: `arbitrary` picks the enum variant from the first u32 (index =
    // u32 * variants >> 32), the fields from what follows.
    for (name, v) in [
        ("roundtrip-sb", 0u64),
        ("roundtrip-pool", 1),
        ("roundtrip-volume", 2),
        ("roundtrip-name", 3),
        ("roundtrip-map", 4),
    ] {
        let pick = ((v << 32) / 5 + 1) as u32;
        let mut b = vec![11u8];
        b.extend_from_slice(&pick.to_le_bytes());
        b.extend((0..96u8).map(|i| i.wrapping_mul(37).wrapping_add(v as u8) | 1));
        out.push((name, b));
    }
    // Version 2 records: one valid value each (bodies for the sealed modes).
    let br = format::BranchRecord { id: 4, gen: 7, origin_branch: 2, origin_gen: 3, head_volume: 9, created_ns: 5 };
    let bv = br.encode();
    out.push(("branch-sealed", w.u8(13).u8(0).u64(4).bytes(&bv[..bv.len() - 4]).finish()));
    let sr = format::SnapRecord { branch: 4, gen: 6, volume: 9, created_ns: 1, size_bytes: 1 << 20, referenced_blocks: 3, flags: 0, name: "s1".into() };
    let sv = sr.encode();
    out.push(("snapshot-sealed", w.u8(15).u8(0).u64(4).u64(6).bytes(&sv[..sv.len() - 4]).finish()));
    let hk = format::hist_key(4, 10, 3);
    let hv = format::HistEntry { entry: MapEntry::new(77, 3), kill: 5 }.encode(&hk);
    out.push(("history-sealed", w.u8(17).u8(0).u64(4).u64(10).u64(3).bytes(&hv[..hv.len() - 4]).finish()));
    let dk = format::dead_key(4, 5, 3, 10);
    let dv = format::encode_dead_value(&dk, 77, 0);
    out.push(("dead-sealed", w.u8(19).u8(0).u64(4).u64(5).u64(3).u64(10).bytes(&dv[..dv.len() - 4]).finish()));
    out.push(("birth-sealed", w.u8(21).u8(0).u64(4).u64(3).u64(10).finish()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_hit_the_accepting_paths() {
        for (name, b) in seeds() {
            run(&b);
            let mut c = Cursor::new(&b);
            match c.u8() {
                0 => assert!(Superblock::decode(c.rest()).is_ok(), "{name}"),
                11 => {
                    let m = Mirror::arbitrary(&mut Unstructured::new(c.rest())).unwrap();
                    let want = match name {
                        "roundtrip-sb" => "Superblock",
                        "roundtrip-pool" => "Pool",
                        "roundtrip-volume" => "Volume",
                        "roundtrip-name" => "Name",
                        _ => "Map",
                    };
                    assert!(format!("{m:?}").starts_with(want), "{name}: {m:?}");
                }
                4 => {
                    c.u8();
                    let id = c.u64();
                    assert!(VolumeRecord::decode(&volume_key(id), c.rest()).is_ok(), "{name}");
                }
                _ => {}
            }
        }
    }
}
