//! `api_validation`: what operators and API clients type — volume names, sizes — through the
//! validation of the CLI and the engine.
//!
//! The first input byte picks a mode (modulo 3):
//! ```text
//! 0  validate_name(rest, lossily UTF-8): must agree with an independent oracle of the rule
//!    (1..=128 bytes of [A-Za-z0-9._-], not starting with '.' or '-')
//! 1  the CLI's parse_size(rest): never panics; a size it accepts prints and parses back to
//!    itself, bare digits parse as bytes, N with a unit parses as N << shift when that fits;
//!    format_size/percent of arbitrary numbers never panic
//! 2  up to 64 control operations on a real pool (one per process, in a tmpfs directory): create,
//!    resize (grow/shrink), rename, delete, info, attach (open rw/ro), detach, with names and
//!    sizes from the input, checked against a model: each call returns Ok or exactly the typed
//!    error the model predicts (InvalidName, InvalidSize, VolumeExists, NoSuchVolume, Busy), the
//!    volume list matches the model after every step, and `check` is clean at the end. Every
//!    volume the input created is deleted before the next input.
//! ```
//! Operation format: u8 op, u8 name selector (+ u8 length + bytes when >= 0xf0), u8 size class,
//! u64 size, u8 second name selector, u8 flag.

use std::collections::BTreeMap;

use vblk_engine::format::{validate_name, BLOCK_SIZE, MAX_NAME_LEN};
use vblk_engine::{Error, Volume, MAX_VOLUME_SIZE};

use crate::cursor::{Cursor, Writer};
use crate::env::{with_pool, EnvOptions};
use crate::units::{format_size, parse_size, percent};

const MODES: u8 = 3;
const MAX_OPS: usize = 64;
/// Names the fuzzer picks by index (so that creates, renames and deletes meet each other).
const NAMES: [&str; 8] = ["a", "vol-1", "x.y_z", "A", "0", "-bad", ".hidden", "vm@snap"];

fn name_oracle(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && !n.starts_with(['.', '-'])
        && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

fn size_oracle(s: u64) -> bool {
    s > 0 && s.is_multiple_of(BLOCK_SIZE) && s <= MAX_VOLUME_SIZE
}

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    match c.u8() % MODES {
        0 => {
            let s = String::from_utf8_lossy(c.rest());
            let r = validate_name(&s);
            assert_eq!(r.is_ok(), name_oracle(&s), "validate_name({s:?}) = {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, Error::InvalidName { .. }), "{e:?}");
                assert!(e.is_invalid_input());
            }
        }
        1 => sizes(c.rest()),
        _ => pool_ops(&mut c),
    }
}

fn sizes(b: &[u8]) {
    let s = String::from_utf8_lossy(b);
    if let Ok(v) = parse_size(&s) {
        assert_eq!(parse_size(&v.to_string()), Ok(v), "{s:?} -> {v}");
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
            assert_eq!(t.parse::<u64>().ok(), Some(v), "bare number {t:?}");
        }
        for (i, unit) in ["K", "M", "G", "T", "P", "E"].iter().enumerate() {
            let shift = 10 * (i as u32 + 1);
            let want = v.checked_shl(shift).filter(|x| x >> shift == v);
            assert_eq!(parse_size(&format!("{v}{unit}")).ok(), want, "{v}{unit}");
        }
    }
    let n = u64::from_le_bytes(std::array::from_fn(|i| b.get(i).copied().unwrap_or(0)));
    let f = format_size(n);
    assert!(f.ends_with('B'), "{f}");
    let _ = parse_size(&f);
    let _ = percent(n, n.rotate_left(7));
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create { name: String, size: u64 },
    Resize { name: String, size: u64, shrink: bool },
    Rename { name: String, to: String },
    Delete { name: String },
    Info { name: String },
    Attach { name: String, read_only: bool },
    Detach { index: u8 },
}

fn read_name(c: &mut Cursor) -> String {
    let sel = c.u8();
    if sel >= 0xf0 {
        String::from_utf8_lossy(c.bytes8()).into_owned()
    } else {
        NAMES[sel as usize % NAMES.len()].to_string()
    }
}

fn read_size(c: &mut Cursor) -> u64 {
    let class = c.u8();
    let v = c.u64();
    match class % 6 {
        0 => v,
        1 => (1 + v % 4096) * BLOCK_SIZE,
        2 => MAX_VOLUME_SIZE - (v % 4) * BLOCK_SIZE,
        3 => MAX_VOLUME_SIZE + (1 + v % 4) * BLOCK_SIZE,
        4 => (1 + v % 4096) * BLOCK_SIZE + 1 + v % (BLOCK_SIZE - 1),
        _ => 0,
    }
}

pub fn decode_ops(c: &mut Cursor) -> Vec<Op> {
    let mut ops = Vec::new();
    while !c.is_empty() && ops.len() < MAX_OPS {
        let kind = c.u8();
        let name = read_name(c);
        let op = match kind % 7 {
            0 => Op::Create { name, size: read_size(c) },
            1 => Op::Resize { name, size: read_size(c), shrink: c.bool() },
            2 => Op::Rename { name, to: read_name(c) },
            3 => Op::Delete { name },
            4 => Op::Info { name },
            5 => Op::Attach { name, read_only: c.bool() },
            _ => Op::Detach { index: c.u8() },
        };
        ops.push(op);
    }
    ops
}

#[derive(Debug, Default)]
struct Model {
    /// name -> size
    vols: BTreeMap<String, u64>,
}

/// Assert that `r` is the outcome the model predicts: Ok, or an error of the predicted kind.
fn expect<T>(op: &Op, r: &Result<T, Error>, want: Result<(), &'static str>) {
    let r = r.as_ref().map(|_| ());
    let got = match r {
        Ok(_) => Ok(()),
        Err(Error::InvalidName { .. }) => Err("InvalidName"),
        Err(Error::InvalidSize(_)) => Err("InvalidSize"),
        Err(Error::VolumeExists(_)) => Err("VolumeExists"),
        Err(Error::NoSuchVolume(_)) => Err("NoSuchVolume"),
        Err(Error::Busy { .. }) => Err("Busy"),
        Err(e) => panic!("{op:?}: unexpected error {e:?}"),
    };
    assert_eq!(got, want, "{op:?} returned {r:?}");
    if let Err(e) = r {
        let _ = e.to_string();
    }
}

fn pool_ops(c: &mut Cursor) {
    let ops = decode_ops(c);
    if crate::verbose() {
        eprintln!("{ops:#?}");
    }
    with_pool(&EnvOptions { data_blocks: 64, bad_blocks: false }, |env| {
        let pool = env.pool.as_ref().expect("pool is open");
        let mut m = Model::default();
        // Attached volumes: (name at attach time, handle). A rename keeps the handle valid.
        let mut attached: Vec<(u64, bool, Volume)> = Vec::new();
        let id_of = |name: &str| pool.volume_info(name).ok().map(|i| i.id);
        for op in &ops {
            match op {
                Op::Create { name, size } => {
                    let r = pool.create_volume(name, *size);
                    let want = if !name_oracle(name) {
                        Err("InvalidName")
                    } else if !size_oracle(*size) {
                        Err("InvalidSize")
                    } else if m.vols.contains_key(name) {
                        Err("VolumeExists")
                    } else {
                        Ok(())
                    };
                    expect(op, &r, want);
                    if let Ok(info) = r {
                        assert_eq!(
                            (info.name.as_str(), info.size_bytes, info.allocated_bytes),
                            (name.as_str(), *size, 0)
                        );
                        m.vols.insert(name.clone(), *size);
                    }
                }
                Op::Resize { name, size, shrink } => {
                    let r = pool.resize_volume(name, *size, *shrink);
                    let id = id_of(name);
                    let busy = attached.iter().any(|a| Some(a.0) == id);
                    let want = match m.vols.get(name) {
                        _ if !size_oracle(*size) => Err("InvalidSize"),
                        None => Err("NoSuchVolume"),
                        Some(&old) if *size < old && !shrink => Err("InvalidSize"),
                        Some(&old) if *size < old && busy => Err("Busy"),
                        Some(_) => Ok(()),
                    };
                    expect(op, &r, want);
                    if let Ok(info) = r {
                        assert_eq!(info.size_bytes, *size);
                        m.vols.insert(name.clone(), *size);
                    }
                }
                Op::Rename { name, to } => {
                    let r = pool.rename_volume(name, to);
                    let want = if !name_oracle(to) {
                        Err("InvalidName")
                    } else if !m.vols.contains_key(name) {
                        Err("NoSuchVolume")
                    } else if m.vols.contains_key(to) {
                        Err("VolumeExists")
                    } else {
                        Ok(())
                    };
                    expect(op, &r, want);
                    if r.is_ok() {
                        let size = m.vols.remove(name).expect("model has it");
                        m.vols.insert(to.clone(), size);
                    }
                }
                Op::Delete { name } => {
                    let id = id_of(name);
                    let r = pool.delete_volume(name, false);
                    let want = if !m.vols.contains_key(name) {
                        Err("NoSuchVolume")
                    } else if attached.iter().any(|a| Some(a.0) == id) {
                        Err("Busy")
                    } else {
                        Ok(())
                    };
                    expect(op, &r, want);
                    if r.is_ok() {
                        m.vols.remove(name);
                    }
                }
                Op::Info { name } => {
                    let r = pool.volume_info(name);
                    expect(op, &r, if m.vols.contains_key(name) { Ok(()) } else { Err("NoSuchVolume") });
                    if let Ok(i) = r {
                        assert_eq!(i.size_bytes, m.vols[name]);
                        assert_eq!(i.allocated_bytes, 0);
                        let rw = attached.iter().filter(|a| a.0 == i.id && !a.1).count();
                        let ro = attached.iter().filter(|a| a.0 == i.id && a.1).count() as u64;
                        assert_eq!((i.attached_rw, i.attached_ro), (rw > 0, ro), "attachment counts");
                    }
                }
                Op::Attach { name, read_only } => {
                    let id = id_of(name);
                    let r = pool.open_volume(name, *read_only);
                    let rw_busy = attached.iter().any(|a| Some(a.0) == id && !a.1);
                    let want = if !m.vols.contains_key(name) {
                        Err("NoSuchVolume")
                    } else if !read_only && rw_busy {
                        Err("Busy")
                    } else {
                        Ok(())
                    };
                    expect(op, &r, want);
                    if let Ok(v) = r {
                        assert_eq!(v.size_bytes(), m.vols[name]);
                        assert_eq!(v.read_only(), *read_only);
                        attached.push((v.id(), *read_only, v));
                    }
                }
                Op::Detach { index } => {
                    if !attached.is_empty() {
                        attached.remove(*index as usize % attached.len());
                    }
                }
            }
            let listed: BTreeMap<String, u64> =
                pool.list_volumes().into_iter().map(|i| (i.name, i.size_bytes)).collect();
            assert_eq!(listed, m.vols, "after {op:?}");
        }
        attached.clear();
        for name in m.vols.keys() {
            pool.delete_volume(name, false).unwrap_or_else(|e| panic!("deleting {name:?} at the end: {e}"));
        }
        assert!(pool.list_volumes().is_empty());
        let rep = pool.check().expect("check");
        assert!(rep.is_clean(), "{rep:?}");
    });
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = Writer::new();
    let mut out = vec![
        ("name-valid", w.u8(0).bytes(b"vm-1.disk_0").finish()),
        ("name-invalid", w.u8(0).bytes(b"-x/y@z").finish()),
        ("size-units", w.u8(1).bytes(b"1.5GiB").finish()),
        ("size-huge", w.u8(1).bytes(b"16E").finish()),
    ];
    // create a 16K, attach rw, shrink (Busy), grow, rename, second rw attach (Busy), detach,
    // shrink with --shrink, delete, create invalid name / size, delete missing.
    w.u8(2);
    w.u8(0).u8(1).u8(1).u64(3); // Create vol-1 16K
    w.u8(5).u8(1).u8(0); // Attach vol-1 rw
    w.u8(1).u8(1).u8(1).u64(1).u8(1); // Resize vol-1 8K shrink -> Busy
    w.u8(1).u8(1).u8(1).u64(15).u8(0); // Resize vol-1 64K
    w.u8(2).u8(1).u8(2); // Rename vol-1 -> x.y_z
    w.u8(5).u8(2).u8(0); // Attach x.y_z rw -> Busy
    w.u8(4).u8(2); // Info x.y_z
    w.u8(6).u8(0).u8(0); // Detach
    w.u8(1).u8(2).u8(1).u64(0).u8(1); // Resize x.y_z 4K shrink
    w.u8(3).u8(2); // Delete x.y_z
    w.u8(0).u8(5).u8(1).u64(0); // Create -bad -> InvalidName
    w.u8(0).u8(0).u8(4).u64(7); // Create a, unaligned size -> InvalidSize
    w.u8(0).u8(0xf0).bytes8(b"long.name_with-all.the_chars09").u8(2).u64(0); // Create, 64 PiB
    w.u8(3).u8(3); // Delete A -> NoSuchVolume
    out.push(("pool-lifecycle", w.finish()));
    out
}
