//! `engine_model`: the stateful target. Sequences of writes, reads, discards, write-zeroes,
//! flushes, online grows, pool reopens and invalid requests, at 512-byte granularity, through
//! `Volume::sync_io()` (the device's data path: io_uring, `O_DIRECT`, deferred-commit block map)
//! against a byte image of the volume, with space accounting checked after every step and
//! `Pool::check` clean at the end of every input (like `engine/tests/model.rs`, but with
//! failures).
//!
//! The pool is created once per process (see [`crate::env`]) with [`DATA_BLOCKS`] data blocks;
//! each input creates a fresh volume of 1..=256 blocks — up to 4/3 of the pool, so a full pool
//! (NoSpace) is reachable — and deletes it at the end. Where the process may use a private
//! mount namespace, writes into every 16th physical block fail in the kernel (ENOSPC from the
//! data file system), so failed writes happen anywhere, not only on a full pool.
//!
//! **What the model allows on a failed write or write-zeroes** (NoSpace, or an I/O error when
//! faults are injected): each sector of the range holds its old or its new content (checked by
//! reading the range back, which must succeed; the model then adopts what it read — "resync");
//! blocks that were mapped stay mapped; blocks that were not may hold a dead allocation until
//! the next commit (counted as `transient`); edge blocks of a failed write-zeroes may or may not
//! have been mapped by their own (successful) edge write (`maybe`); the whole blocks inside a
//! write-zeroes are unmapped regardless (that happens before its edge writes). Space accounting
//! is then checked as bounds: mapped ≤ allocated ≤ mapped + maybe + transient, exact again after
//! a flush for everything but `maybe`.
//!
//! **Encrypted volumes** (FORMAT.md §11): when `v` is odd the volume is encrypted. Then reads,
//! writes and write-zeroes not aligned to 4096 bytes must fail and change nothing, and
//! overwrites of mapped blocks need a new block (they may fail on a full pool or a bad block
//! like first writes do); everything else is checked the same way.
//!
//! Input format: u8 volume blocks (1 + v; v odd: encrypted), then up to [`MAX_OPS`] ops: u8
//! kind (mod 16) and its fields (see [`Op`] and `decode`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use vblk_engine::{Error, SyncIo, Volume};

use crate::cursor::{Cursor, Writer};
use crate::env::{with_pool, EnvOptions, PoolEnv};

/// Data blocks of the fuzzing pool.
pub const DATA_BLOCKS: u64 = 192;
pub const MAX_OPS: usize = 48;
const SECT: u64 = 512;
const BS: u64 = 4096;
const MIB: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `sector` wraps at the volume size + 64 sectors: requests past the end happen.
    Write {
        sector: u32,
        sectors: u16,
        ver: u8,
    },
    Read {
        sector: u32,
        sectors: u16,
    },
    Discard {
        sector: u32,
        sectors: u32,
    },
    WriteZeroes {
        sector: u32,
        sectors: u32,
    },
    Flush,
    Grow {
        blocks: u8,
    },
    Reopen,
    Invalid {
        kind: u8,
        a: u64,
        b: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub vol_blocks: u8,
    pub ops: Vec<Op>,
}

impl Input {
    pub fn decode(data: &[u8]) -> Input {
        let mut c = Cursor::new(data);
        let vol_blocks = c.u8();
        let mut ops = Vec::new();
        while !c.is_empty() && ops.len() < MAX_OPS {
            // Weights out of 16; a reopen (RocksDB close and open) is the rarest.
            ops.push(match c.u8() % 16 {
                0..=4 => Op::Write { sector: c.u32(), sectors: c.u16(), ver: c.u8() },
                5..=7 => Op::Read { sector: c.u32(), sectors: c.u16() },
                8 => Op::Discard { sector: c.u32(), sectors: c.u32() },
                9 | 10 => Op::WriteZeroes { sector: c.u32(), sectors: c.u32() },
                11 => Op::Flush,
                12 => Op::Grow { blocks: c.u8() },
                13 | 14 => Op::Invalid { kind: c.u8(), a: c.u64(), b: c.u32() },
                _ => Op::Reopen,
            });
        }
        Input { vol_blocks, ops }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.vol_blocks);
        for op in &self.ops {
            match *op {
                Op::Write { sector, sectors, ver } => w.u8(0).u32(sector).u16(sectors).u8(ver),
                Op::Read { sector, sectors } => w.u8(5).u32(sector).u16(sectors),
                Op::Discard { sector, sectors } => w.u8(8).u32(sector).u32(sectors),
                Op::WriteZeroes { sector, sectors } => w.u8(9).u32(sector).u32(sectors),
                Op::Flush => w.u8(11),
                Op::Grow { blocks } => w.u8(12).u8(blocks),
                Op::Invalid { kind, a, b } => w.u8(13).u8(kind).u64(a).u32(b),
                Op::Reopen => w.u8(15),
            };
        }
        w.finish()
    }
}

fn sector_data(sector: u64, ver: u8) -> Vec<u8> {
    let mut b = vec![ver.max(1); SECT as usize];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b
}

struct Model {
    image: Vec<u8>,
    /// Blocks certainly mapped.
    mapped: BTreeSet<u64>,
    /// Blocks that may or may not be mapped (edge blocks of a failed write-zeroes).
    maybe: BTreeSet<u64>,
    /// Dead allocations of failed writes, dropped at the next commit.
    transient: u64,
}

impl Model {
    fn size(&self) -> u64 {
        self.image.len() as u64
    }
    fn map(&mut self, b: u64) {
        self.maybe.remove(&b);
        self.mapped.insert(b);
    }
    fn unmap(&mut self, b: u64) {
        self.maybe.remove(&b);
        self.mapped.remove(&b);
    }
    fn bounds(&self) -> (u64, u64) {
        let lo = self.mapped.len() as u64;
        (lo * BS, (lo + self.maybe.len() as u64 + self.transient) * BS)
    }
}

/// The per-input state: model, volume, I/O handle.
struct Run<'a> {
    env: &'a mut PoolEnv,
    name: String,
    m: Model,
    vol: Option<Volume>,
    io: Option<SyncIo>,
    step: usize,
    reopened: bool,
    /// The volume is encrypted: whole 4 KiB blocks only, every write redirects.
    encrypted: bool,
}

fn kind_of(e: &Error) -> &'static str {
    match e {
        Error::NoSpace => "NoSpace",
        Error::OutOfRange { .. } => "OutOfRange",
        Error::InvalidSize(_) => "InvalidSize",
        Error::DeviceIo(_) => "DeviceIo",
        Error::Busy { .. } => "Busy",
        _ => "other",
    }
}

impl Run<'_> {
    fn io(&mut self) -> &mut SyncIo {
        self.io.as_mut().expect("volume is open")
    }

    fn ctx(&self, op: &Op) -> String {
        format!("step {} {op:?} (volume {} bytes)", self.step, self.m.size())
    }

    /// A write or write-zeroes failed: allowed errors only.
    fn allowed_failure(&self, op: &Op, e: &Error) {
        if crate::verbose() {
            eprintln!("{}: failed with {e:?} (allowed; resync)", self.ctx(op));
        }
        let ok = matches!(e, Error::NoSpace) || (self.env.faults && matches!(e, Error::DeviceIo(_)));
        assert!(ok, "{}: failed with {e:?}", self.ctx(op));
    }

    /// After a failed write of `new` (None: zeros) over [off, off+len): each sector holds the
    /// old or the new content; adopt what the engine has.
    fn resync(&mut self, op: &Op, off: u64, len: u64, new: Option<&[u8]>) {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MIB as u64);
            let mut buf = vec![0u8; n as usize];
            let at = off + done;
            self.io().read_at(at, &mut buf).unwrap_or_else(|e| panic!("resync read at {at}: {e}"));
            for (i, got) in buf.chunks(SECT as usize).enumerate() {
                let s = (at + i as u64 * SECT) as usize;
                let old = &self.m.image[s..s + SECT as usize];
                let r = (s as u64 - off) as usize;
                let zeros = [0u8; SECT as usize];
                let want_new = new.map(|d| &d[r..r + SECT as usize]).unwrap_or(&zeros);
                assert!(
                    got == old || got == want_new,
                    "{}: sector at {s} is neither old nor new after a failed write",
                    self.ctx(op)
                );
            }
            self.m.image[at as usize..(at + n) as usize].copy_from_slice(&buf);
            done += n;
        }
    }

    fn check_alloc(&self, op: &Op) {
        let a = self.env.pool().volume_info(&self.name).expect("volume info").allocated_bytes;
        let (lo, hi) = self.m.bounds();
        assert!(
            lo <= a && a <= hi,
            "{}: allocated {a} bytes, model says {lo}..={hi} (mapped {}, maybe {}, transient {})",
            self.ctx(op),
            self.m.mapped.len(),
            self.m.maybe.len(),
            self.m.transient
        );
    }

    /// `sector`/`sectors` to a byte range, and whether it lies within the volume.
    fn range(&self, sector: u32, sectors: u64) -> (u64, u64, bool) {
        let size_sectors = self.m.size() / SECT;
        let off = u64::from(sector) % (size_sectors + 64) * SECT;
        let len = sectors * SECT;
        (off, len, off + len <= self.m.size())
    }

    /// An encrypted volume refuses I/O that is not block-aligned, without changing anything.
    fn unaligned_refused<T: std::fmt::Debug>(&self, op: &Op, off: u64, len: u64, r: &Result<T, Error>) -> bool {
        if !self.encrypted || len == 0 || (off % BS == 0 && len % BS == 0) {
            return false;
        }
        assert!(matches!(r, Err(Error::Misaligned { .. })), "{}: unaligned I/O on an encrypted volume gave {r:?}", self.ctx(op));
        true
    }

    fn out_of_range<T: std::fmt::Debug>(&self, op: &Op, r: Result<T, Error>) {
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{}: expected OutOfRange, got {r:?}", self.ctx(op));
    }

    /// Refused: out of range, or (in range) misaligned.
    fn refused<T: std::fmt::Debug>(&self, op: &Op, r: Result<T, Error>) {
        assert!(
            matches!(r, Err(Error::OutOfRange { .. } | Error::Misaligned { .. })),
            "{}: expected OutOfRange or Misaligned, got {r:?}",
            self.ctx(op)
        );
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { sector, sectors, ver } => {
                let (off, len, ok) = self.range(sector, u64::from(sectors) % 2049);
                let mut data = Vec::with_capacity(len as usize);
                for s in off / SECT..(off + len) / SECT {
                    data.extend_from_slice(&sector_data(s, ver));
                }
                let r = self.io().write_at(off, &data);
                if !ok {
                    return self.out_of_range(op, r);
                }
                if self.unaligned_refused(op, off, len, &r) {
                    return;
                }
                if len == 0 {
                    return r.unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                }
                // Overwriting blocks that are certainly mapped needs no allocation and writes
                // only pages that took writes before: it must work even on a full pool (unless
                // encrypted: encrypted writes always go to a new block).
                let overwrite =
                    !self.encrypted && (off / BS..(off + len).div_ceil(BS)).all(|b| self.m.mapped.contains(&b));
                if overwrite {
                    if let Err(e) = &r {
                        panic!("{}: overwrite of mapped blocks failed: {e:?}", self.ctx(op));
                    }
                }
                match r {
                    Ok(()) => {
                        self.m.image[off as usize..(off + len) as usize].copy_from_slice(&data);
                        for b in off / BS..(off + len).div_ceil(BS) {
                            self.m.map(b);
                        }
                    }
                    Err(e) => {
                        self.allowed_failure(op, &e);
                        let unmapped =
                            (off / BS..(off + len).div_ceil(BS)).filter(|b| !self.m.mapped.contains(b)).count();
                        self.m.transient += unmapped as u64;
                        self.resync(op, off, len, Some(&data));
                    }
                }
            }
            Op::Read { sector, sectors } => {
                let (off, len, ok) = self.range(sector, u64::from(sectors) % 2049);
                let mut buf = vec![0u8; len as usize];
                let r = self.io().read_at(off, &mut buf);
                if !ok {
                    return self.out_of_range(op, r);
                }
                if self.unaligned_refused(op, off, len, &r) {
                    return;
                }
                r.unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                let want = &self.m.image[off as usize..(off + len) as usize];
                if buf != want {
                    let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!("{}: first difference at volume offset {}", self.ctx(op), off + i as u64);
                }
            }
            Op::Discard { sector, sectors } => {
                let size_sectors = self.m.size() / SECT;
                let (off, len, ok) = self.range(sector, u64::from(sectors) % (size_sectors + 65));
                let r = self.io().discard(off, len);
                if !ok {
                    return self.out_of_range(op, r);
                }
                r.unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                // Only whole blocks inside the range are unmapped (and read as zeros).
                for b in off.div_ceil(BS)..(off + len) / BS {
                    self.m.unmap(b);
                    self.m.image[(b * BS) as usize..((b + 1) * BS) as usize].fill(0);
                }
            }
            Op::WriteZeroes { sector, sectors } => {
                let size_sectors = self.m.size() / SECT;
                let (off, len, ok) = self.range(sector, u64::from(sectors) % (size_sectors + 65));
                let r = self.io().write_zeroes(off, len);
                if !ok {
                    return self.out_of_range(op, r);
                }
                if self.unaligned_refused(op, off, len, &r) {
                    return;
                }
                if len == 0 {
                    return r.unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                }
                let (first, last) = (off.div_ceil(BS), (off + len) / BS);
                // Whole blocks inside are unmapped first, whatever happens to the edges.
                for b in first..last {
                    self.m.unmap(b);
                    self.m.image[(b * BS) as usize..((b + 1) * BS) as usize].fill(0);
                }
                let edges: Vec<u64> =
                    (off / BS..(off + len).div_ceil(BS)).filter(|b| *b < first || *b >= last).collect();
                if edges.iter().all(|b| self.m.mapped.contains(b)) {
                    if let Err(e) = &r {
                        panic!("{}: write-zeroes needing no allocation failed: {e:?}", self.ctx(op));
                    }
                }
                match r {
                    Ok(()) => {
                        self.m.image[off as usize..(off + len) as usize].fill(0);
                        for b in edges {
                            self.m.map(b);
                        }
                    }
                    Err(e) => {
                        self.allowed_failure(op, &e);
                        for b in edges {
                            if !self.m.mapped.contains(&b) {
                                self.m.maybe.insert(b);
                                self.m.transient += 1;
                            }
                        }
                        self.resync(op, off, len, None);
                    }
                }
            }
            Op::Flush => {
                self.io().flush().unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                self.m.transient = 0;
            }
            Op::Grow { blocks } => {
                let size = self.m.size() + (1 + u64::from(blocks) % 64) * BS;
                let info = self
                    .env
                    .pool()
                    .resize_volume(&self.name, size, false)
                    .unwrap_or_else(|e| panic!("{}: {e}", self.ctx(op)));
                assert_eq!(info.size_bytes, size);
                self.m.image.resize(size as usize, 0);
                assert_eq!(self.io().size_bytes(), size, "the open queue sees the new size");
            }
            Op::Reopen if self.reopened => self.step(&Op::Flush),
            Op::Reopen => {
                // At most one per input: closing and opening RocksDB costs as much as
                // hundreds of other steps.
                self.reopened = true;
                drop(self.io.take());
                drop(self.vol.take());
                self.env.reopen();
                self.open();
                // Closing the pool committed everything.
                self.m.transient = 0;
            }
            Op::Invalid { kind, a, b } => self.invalid(op, kind, a, b),
        }
    }

    /// Requests the engine must refuse without changing anything.
    fn invalid(&mut self, op: &Op, kind: u8, a: u64, b: u32) {
        let size = self.m.size();
        let odd = 1 + u64::from(b) % (SECT - 1); // 1..=511
        match kind % 8 {
            0 => {
                let off = a % size / SECT * SECT + odd;
                let r = self.io().write_at(off, &[0x5a; 512]);
                self.refused(op, r)
            }
            1 => {
                let off = a % size / SECT * SECT;
                let mut buf = vec![0u8; odd as usize + (b as usize % 4) * 512];
                let r = self.io().read_at(off, &mut buf);
                self.refused(op, r)
            }
            2 => {
                let mut big = vec![0u8; MIB + 512];
                let r = if b.is_multiple_of(2) { self.io().read_at(0, &mut big) } else { self.io().write_at(0, &big) };
                assert!(matches!(r, Err(Error::InvalidSize(_))), "{}: {r:?}", self.ctx(op));
            }
            3 => {
                let off = u64::MAX - a % (1 << 20) / SECT * SECT - (SECT - 1);
                let r = if b.is_multiple_of(2) {
                    self.io().discard(off, 1 << 20)
                } else {
                    self.io().write_zeroes(off, 1 << 20)
                };
                self.out_of_range(op, r)
            }
            4 => {
                // Zero-length requests: fine at or below the end, refused past it.
                let off = (a % (size / SECT + 2)) * SECT;
                let r = match b % 4 {
                    0 => self.io().read_at(off, &mut []),
                    1 => self.io().write_at(off, &[]),
                    2 => self.io().discard(off, 0),
                    _ => self.io().write_zeroes(off, 0),
                };
                if off <= size {
                    r.unwrap_or_else(|e| panic!("{}: zero-length at {off}: {e}", self.ctx(op)));
                } else {
                    self.out_of_range(op, r)
                }
            }
            5 => {
                let r = self.io().read_at(size, &mut [0u8; 512]);
                self.out_of_range(op, r)
            }
            6 => {
                // Shrinking an attached volume: refused (Busy), or InvalidSize below 4 KiB.
                let new = size.saturating_sub((1 + a % 4) * BS);
                let r = self.env.pool().resize_volume(&self.name, new, true);
                let want = if new == 0 { "InvalidSize" } else { "Busy" };
                assert_eq!(r.as_ref().err().map(kind_of), Some(want), "{}: {r:?}", self.ctx(op));
            }
            _ => {
                let off = a % size / SECT * SECT + odd;
                let r =
                    if b.is_multiple_of(2) { self.io().discard(off, 4096) } else { self.io().write_zeroes(off, 4096) };
                self.refused(op, r)
            }
        }
    }

    fn open(&mut self) {
        let vol = self.env.pool().open_volume(&self.name, false).expect("open volume");
        self.io = Some(vol.sync_io().expect("sync io"));
        self.vol = Some(vol);
    }

    /// End of input: flush, compare the whole volume, check the pool, delete the volume.
    fn finish(mut self) {
        let op = Op::Flush;
        self.step(&op);
        self.check_alloc(&op);
        let size = self.m.size();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(MIB as u64);
            let mut buf = vec![0u8; n as usize];
            self.io().read_at(off, &mut buf).expect("final read");
            if buf[..] != self.m.image[off as usize..(off + n) as usize] {
                let i = buf.iter().zip(&self.m.image[off as usize..]).position(|(a, b)| a != b).unwrap_or(0);
                panic!("final image differs at volume offset {}", off + i as u64);
            }
            off += n;
        }
        let rep = self.env.pool().check().expect("check");
        assert!(rep.is_clean(), "check: {rep:?}");
        let (lo, hi) = self.m.bounds();
        assert!(
            lo / BS <= rep.referenced_blocks && rep.referenced_blocks <= hi / BS,
            "check references {} blocks, model {lo}..={hi} bytes",
            rep.referenced_blocks
        );
        drop(self.io.take());
        drop(self.vol.take());
        self.env.pool().delete_volume(&self.name, false).expect("delete volume");
        let rep = self.env.pool().check().expect("check");
        assert!(rep.is_clean(), "check after delete: {rep:?}");
        assert_eq!(rep.referenced_blocks, 0, "blocks still referenced after the only volume was deleted");
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn run(data: &[u8]) {
    let inp = Input::decode(data);
    if crate::verbose() {
        eprintln!("{inp:#?}");
    }
    with_pool(&EnvOptions { data_blocks: DATA_BLOCKS, bad_blocks: true }, |env| {
        let blocks = 1 + u64::from(inp.vol_blocks);
        let encrypted = inp.vol_blocks % 2 == 1;
        let name = format!("m{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        if encrypted {
            env.pool().create_encrypted_volume(&name, blocks * BS).expect("create encrypted volume");
        } else {
            env.pool().create_volume(&name, blocks * BS).expect("create volume");
        }
        let mut r = Run {
            env,
            name,
            m: Model {
                image: vec![0; (blocks * BS) as usize],
                mapped: BTreeSet::new(),
                maybe: BTreeSet::new(),
                transient: 0,
            },
            vol: None,
            io: None,
            step: 0,
            reopened: false,
            encrypted,
        };
        r.open();
        for (i, op) in inp.ops.iter().enumerate() {
            r.step = i;
            r.step(op);
            r.check_alloc(op);
        }
        r.finish();
    });
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let w = |sector: u32, sectors: u16, ver: u8| Op::Write { sector, sectors, ver };
    let inputs = vec![
        (
            "write-read-discard",
            Input {
                vol_blocks: 31,
                ops: vec![
                    w(0, 8, 1),
                    w(9, 3, 2),
                    Op::Read { sector: 0, sectors: 16 },
                    Op::Discard { sector: 1, sectors: 20 },
                    Op::Flush,
                    Op::Read { sector: 0, sectors: 24 },
                ],
            },
        ),
        (
            "write-zeroes-partial",
            Input {
                vol_blocks: 15,
                ops: vec![w(0, 64, 3), Op::WriteZeroes { sector: 3, sectors: 20 }, Op::Read { sector: 0, sectors: 64 }],
            },
        ),
        // A volume larger than the pool, written until it is full, then freed and rewritten.
        (
            "fill-pool",
            Input {
                vol_blocks: 255,
                ops: vec![
                    w(0, 2048, 4),
                    w(2048, 2048, 5),
                    Op::Discard { sector: 0, sectors: 1024 },
                    Op::Flush,
                    w(0, 512, 6),
                    Op::Read { sector: 0, sectors: 2048 },
                ],
            },
        ),
        (
            "grow-reopen",
            Input {
                vol_blocks: 3,
                ops: vec![
                    w(0, 32, 7),
                    Op::Grow { blocks: 3 },
                    w(32, 40, 8),
                    Op::Reopen,
                    Op::Read { sector: 0, sectors: 64 },
                ],
            },
        ),
        (
            "invalid",
            Input {
                vol_blocks: 7,
                ops: (0..8u8).map(|k| Op::Invalid { kind: k, a: 12345, b: 77 }).chain([w(60, 8, 9)]).collect(),
            },
        ),
    ];
    inputs.into_iter().map(|(n, i)| (n, i.encode())).collect()
}
