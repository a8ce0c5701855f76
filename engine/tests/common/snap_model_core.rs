//! The snapshot model (shared by engine/tests/snap_model.rs and the fuzz target
//! `snapshot_model`): operations, the in-memory model, the crash reconciliation and `run_case`.

use std::collections::BTreeMap;

use proptest::prelude::{prop_assert, prop_assert_eq, TestCaseError};
use vblk_engine::*;

pub const BLOCKS: u64 = 24;
pub const SECT: u64 = 512;
const MAX_VOLS: usize = 4;

#[derive(Debug, Clone)]
pub enum Op {
    Write { vol: usize, sector: u64, n: u64, ver: u8 },
    Discard { vol: usize, sector: u64, n: u64 },
    WriteZeroes { vol: usize, sector: u64, n: u64 },
    Flush,
    Snap { vol: usize },
    Clone { snap: usize },
    Rollback { snap: usize },
    DeleteSnap { snap: usize },
    DeleteVol { vol: usize, recursive: bool },
    Flatten { vol: usize },
    Reopen,
    Crash { after: u64 },
    Diff { snap: usize, to_live: bool },
}

fn sector_data(sector: u64, ver: u8) -> Vec<u8> {
    let mut b = vec![ver; SECT as usize];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b
}

#[derive(Clone, Debug)]
struct MVol {
    image: Vec<u8>,
    /// Content as of the last commit (what a crash must keep).
    flushed: Vec<u8>,
    /// Snapshot (volume, name) this volume was cloned from, if still linked.
    origin: Option<(String, String)>,
}

#[derive(Default)]
struct Model {
    vols: BTreeMap<String, MVol>,
    /// (volume, snapshot) -> image
    snaps: BTreeMap<(String, String), Vec<u8>>,
    /// Snapshots deleted while clones depended on them: (volume, name) they had.
    hidden_origins: Vec<(String, String)>,
    next: u64,
}

impl Model {
    fn flush_all(&mut self) {
        for v in self.vols.values_mut() {
            v.flushed = v.image.clone();
        }
    }
    fn vol_name(&self, i: usize) -> Option<String> {
        self.vols.keys().nth(i % self.vols.len().max(1)).cloned()
    }
    fn snap_key(&self, i: usize) -> Option<(String, String)> {
        if self.snaps.is_empty() {
            return None;
        }
        self.snaps.keys().nth(i % self.snaps.len()).cloned()
    }
    /// Volumes cloned (directly) from a snapshot of `vol` (visible or hidden).
    fn clones_of(&self, vol: &str) -> Vec<String> {
        self.vols.iter().filter(|(n, v)| *n != vol && v.origin.as_ref().is_some_and(|o| o.0 == vol)).map(|(n, _)| n.clone()).collect()
    }
}

struct Harness {
    path: std::path::PathBuf,
    pool: Option<Pool>,
    /// Metadata cache size: tiny (a few entries) exercises eviction and the lookups behind it.
    cache_bytes: usize,
    /// Encrypted volumes (FORMAT.md §11): the pool opens with this master key.
    encrypted: bool,
}

impl Harness {
    fn p(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }
    fn create(&self, name: &str) -> Result<VolumeInfo> {
        if self.encrypted {
            self.p().create_encrypted_volume(name, BLOCKS * 4096)
        } else {
            self.p().create_volume(name, BLOCKS * 4096)
        }
    }
    fn reopen(&mut self, fault: Option<u64>) {
        drop(self.pool.take());
        let opts = PoolOptions {
            fail_meta_after: fault,
            commit_interval: std::time::Duration::from_secs(3600),
            cache_bytes: self.cache_bytes,
            // Small write-ahead logs: each reopen preallocates one (1.1x this).
            memtable_bytes: 256 << 10,
            master_key: self.encrypted.then(|| vblk_engine::crypt::Key([0x37; 32])),
            ..Default::default()
        };
        self.pool = Some(Pool::open(&self.path, &opts).unwrap());
    }
    fn read_vol(&self, name: &str) -> Vec<u8> {
        let v = self.p().open_volume(name, true).unwrap();
        let mut io = v.sync_io().unwrap();
        let mut buf = vec![0u8; v.size_bytes() as usize];
        for (i, c) in buf.chunks_mut(SyncIo::MAX_IO).enumerate() {
            io.read_at((i * SyncIo::MAX_IO) as u64, c).unwrap();
        }
        buf
    }
    fn read_snap(&self, vol: &str, snap: &str) -> Vec<u8> {
        let v = self.p().open_snapshot(vol, snap).unwrap();
        let mut io = v.sync_io().unwrap();
        let mut buf = vec![0u8; v.size_bytes() as usize];
        for (i, c) in buf.chunks_mut(SyncIo::MAX_IO).enumerate() {
            io.read_at((i * SyncIo::MAX_IO) as u64, c).unwrap();
        }
        buf
    }
    fn with_io<R>(&self, name: &str, f: impl FnOnce(&mut SyncIo) -> Result<R>) -> Result<R> {
        let v = self.p().open_volume(name, false)?;
        let mut io = v.sync_io()?;
        f(&mut io)
    }
}

fn clamp(size: u64, sector: u64, n: u64) -> (u64, u64) {
    let off = (sector * SECT).min(size);
    (off, (n * SECT).min(size - off))
}

/// After a failed step: reopen cleanly and make the model agree with what survived, checking
/// that it is allowed.
fn reconcile(h: &mut Harness, m: &mut Model, alt: &BTreeMap<String, Vec<u8>>) -> Result<(), TestCaseError> {
    h.reopen(None);
    let rep = h.p().check().unwrap();
    prop_assert!(rep.is_clean(), "after crash recovery: {:?}", rep);
    let vols: Vec<String> = h.p().list_volumes().into_iter().map(|v| v.name).collect();
    let snaps: Vec<(String, String)> = h.p().snapshot_list(None).unwrap().into_iter().map(|s| (s.volume, s.name)).collect();
    // Volumes: an interrupted delete may have removed some; an interrupted clone may have
    // made one (whose content is its snapshot's, given in `alt`).
    m.vols.retain(|n, _| vols.contains(n));
    for n in &vols {
        if !m.vols.contains_key(n) {
            let img = alt.get(n).cloned();
            prop_assert!(img.is_some(), "volume {} appeared after a crash", n);
            let img = img.unwrap();
            m.vols.insert(n.clone(), MVol { image: img.clone(), flushed: img, origin: None });
        }
    }
    let old_snaps = std::mem::take(&mut m.snaps);
    for (k, img) in old_snaps {
        if snaps.contains(&k) {
            m.snaps.insert(k, img);
        }
    }
    for k in &snaps {
        if !m.snaps.contains_key(k) {
            // A snapshot whose create was interrupted after its record: the volume's content
            // at that point, which is the flushed content (creation commits first).
            let v = m.vols.get(&k.0);
            prop_assert!(v.is_some(), "snapshot {:?} of a missing volume", k);
            let img = v.unwrap().flushed.clone();
            m.snaps.insert(k.clone(), img);
        }
    }
    // Contents: per block, flushed or latest (or, for a rolled-back volume, its target).
    let names: Vec<String> = m.vols.keys().cloned().collect();
    for n in names {
        let got = h.read_vol(&n);
        let v = m.vols.get_mut(&n).unwrap();
        let a = alt.get(&n);
        if got.len() != v.image.len() {
            prop_assert!(a.is_some_and(|a| a.len() == got.len()), "volume {} size {} unexpected", n, got.len());
        }
        for (i, blk) in got.chunks(4096).enumerate() {
            let r = i * 4096..(i * 4096 + blk.len());
            let ok = v.image.get(r.clone()) == Some(blk)
                || v.flushed.get(r.clone()) == Some(blk)
                || a.and_then(|a| a.get(r.clone())) == Some(blk);
            prop_assert!(ok, "volume {} block {} after crash is neither flushed, latest nor rollback target", n, i);
        }
        v.image = got.clone();
        v.flushed = got;
    }
    for ((vol, s), img) in m.snaps.iter() {
        let got = h.read_snap(vol, s);
        prop_assert!(&got == img, "snapshot {}@{} changed across a crash", vol, s);
    }
    // Clone links (an interrupted rollback, clone or flatten may or may not have made one).
    for info in h.p().list_volumes() {
        if let Some(v) = m.vols.get_mut(&info.name) {
            v.origin = info.origin.as_deref().and_then(|o| o.split_once('@')).map(|(a, b)| (a.to_string(), b.to_string()));
        }
    }
    Ok(())
}

/// Where the small pools of the cases live: `VBLK_MODEL_TMPDIR`, else /dev/shm (RAM: the fsyncs
/// of a pool per case on a disk dominate the run), else the temp dir.
fn case_dir() -> tempfile::TempDir {
    if let Some(d) = std::env::var_os("VBLK_MODEL_TMPDIR") {
        return tempfile::tempdir_in(d).unwrap();
    }
    // The pool's data file is opened with O_DIRECT, which tmpfs supports from Linux 6.6.
    let direct_ok = |d: &tempfile::TempDir| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create(true).custom_flags(libc::O_DIRECT).open(d.path().join("probe")).is_ok()
    };
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) if direct_ok(&d) => d,
        _ => tempfile::tempdir().unwrap(),
    }
}

/// An encrypted volume takes whole 4 KiB blocks only: round a data op out to them.
fn block_aligned(op: Op) -> Op {
    let al = |sector: u64, n: u64| (sector & !7, ((sector + n).div_ceil(8) * 8) - (sector & !7));
    match op {
        Op::Write { vol, sector, n, ver } => {
            let (sector, n) = al(sector, n);
            Op::Write { vol, sector, n, ver }
        }
        Op::Discard { vol, sector, n } => {
            let (sector, n) = al(sector, n);
            Op::Discard { vol, sector, n }
        }
        Op::WriteZeroes { vol, sector, n } => {
            let (sector, n) = al(sector, n);
            Op::WriteZeroes { vol, sector, n }
        }
        o => o,
    }
}

/// Run one case; `encrypted`: every volume is encrypted and data ops are block-aligned.
pub fn run_case(ops: Vec<Op>, tiny_cache: bool, encrypted: bool) -> Result<(), TestCaseError> {
    let ops: Vec<Op> = if encrypted { ops.into_iter().map(block_aligned).collect() } else { ops };
    let d = case_dir();
    let path = d.path().join("p.img");
    // Sparse: allocating the file on tmpfs was 10% of the fuzz target's time per input.
    let create = CreateOptions { size_bytes: Some((1 << 20) + 600 * 4096), preallocate: Preallocate::Off, ..Default::default() };
    create_pool(&path, &create).unwrap();
    let mut h = Harness { path, pool: None, cache_bytes: if tiny_cache { 2 * 40 * 12 } else { 64 << 20 }, encrypted };
    h.reopen(None);
    let mut m = Model::default();
    h.create("v0").unwrap();
    m.vols.insert("v0".into(), MVol { image: vec![0; (BLOCKS * 4096) as usize], flushed: vec![0; (BLOCKS * 4096) as usize], origin: None });
    for op in ops {
        if m.vols.is_empty() {
            let zero = vec![0u8; (BLOCKS * 4096) as usize];
            if h.create("v0").is_err() {
                // The injected fault hit the create: it happened or not.
                let alt = BTreeMap::from([("v0".to_string(), zero)]);
                reconcile(&mut h, &mut m, &alt)?;
                if m.vols.is_empty() {
                    continue;
                }
            } else {
                m.vols.insert("v0".into(), MVol { image: zero.clone(), flushed: zero, origin: None });
            }
        }
        // Alternative contents a crash in this step may legitimately leave.
        let mut alt: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let r: Result<()> = match op.clone() {
            Op::Write { vol, sector, n, ver } => {
                let name = m.vol_name(vol).unwrap();
                let mv = m.vols.get_mut(&name).unwrap();
                let (off, len) = clamp(mv.image.len() as u64, sector, n);
                if len == 0 {
                    continue;
                }
                let data: Vec<u8> = (off / SECT..(off + len) / SECT).flat_map(|x| sector_data(x, ver)).collect();
                let r = h.with_io(&name, |io| io.write_at(off, &data));
                if r.is_ok() {
                    mv.image[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                r
            }
            Op::Discard { vol, sector, n } => {
                let name = m.vol_name(vol).unwrap();
                let mv = m.vols.get_mut(&name).unwrap();
                let (off, len) = clamp(mv.image.len() as u64, sector, n);
                if len == 0 {
                    continue;
                }
                let r = h.with_io(&name, |io| io.discard(off, len));
                if r.is_ok() {
                    for b in off.div_ceil(4096)..(off + len) / 4096 {
                        mv.image[(b * 4096) as usize..((b + 1) * 4096) as usize].fill(0);
                    }
                }
                r
            }
            Op::WriteZeroes { vol, sector, n } => {
                let name = m.vol_name(vol).unwrap();
                let mv = m.vols.get_mut(&name).unwrap();
                let (off, len) = clamp(mv.image.len() as u64, sector, n);
                if len == 0 {
                    continue;
                }
                let r = h.with_io(&name, |io| io.write_zeroes(off, len));
                if r.is_ok() {
                    mv.image[off as usize..(off + len) as usize].fill(0);
                }
                r
            }
            Op::Flush => {
                let r = h.p().sync();
                if r.is_ok() {
                    m.flush_all();
                }
                r
            }
            Op::Snap { vol } => {
                let name = m.vol_name(vol).unwrap();
                m.next += 1;
                let sn = format!("s{}", m.next);
                let r = h.p().snapshot_create(&name, &sn).map(|_| ());
                if r.is_ok() {
                    m.flush_all();
                    let img = m.vols[&name].image.clone();
                    m.snaps.insert((name, sn), img);
                }
                r
            }
            Op::Clone { snap } => {
                let Some((v, s)) = m.snap_key(snap) else { continue };
                if m.vols.len() >= MAX_VOLS {
                    continue;
                }
                m.next += 1;
                let c = format!("c{}", m.next);
                alt.insert(c.clone(), m.snaps[&(v.clone(), s.clone())].clone());
                let r = h.p().clone_volume(&v, &s, &c).map(|_| ());
                if r.is_ok() {
                    let img = m.snaps[&(v.clone(), s.clone())].clone();
                    m.vols.insert(c, MVol { image: img.clone(), flushed: img, origin: Some((v, s)) });
                }
                r
            }
            Op::Rollback { snap } => {
                let Some((v, s)) = m.snap_key(snap) else { continue };
                let img = m.snaps[&(v.clone(), s.clone())].clone();
                alt.insert(v.clone(), img.clone());
                let r = h.p().snapshot_rollback(&v, &s).map(|_| ());
                if r.is_ok() {
                    m.flush_all();
                    let mv = m.vols.get_mut(&v).unwrap();
                    mv.image = img.clone();
                    mv.flushed = img;
                    // The rolled-back head reads the snapshot: it depends on it like a clone.
                    mv.origin = Some((v.clone(), s.clone()));
                }
                r
            }
            Op::DeleteSnap { snap } => {
                let Some((v, s)) = m.snap_key(snap) else { continue };
                let dependents = m.vols.values().any(|x| x.origin.as_ref() == Some(&(v.clone(), s.clone())));
                let before = h.p().snapshot_list(Some(&v)).unwrap();
                let excl = before.iter().find(|x| x.name == s).map(|x| x.exclusive_bytes).unwrap_or(0);
                let used0 = h.p().status().used_bytes;
                let r = h.p().snapshot_delete(&v, &s);
                if r.is_ok() {
                    m.snaps.remove(&(v.clone(), s.clone()));
                    if dependents {
                        m.hidden_origins.push((v.clone(), s.clone()));
                    }
                    let used1 = h.p().status().used_bytes;
                    prop_assert_eq!(used0 - used1, excl, "deleting {}@{} freed a different amount than its exclusive bytes", v, s);
                }
                r
            }
            Op::DeleteVol { vol, recursive } => {
                let name = m.vol_name(vol).unwrap();
                let has_snaps = m.snaps.keys().any(|k| k.0 == name);
                let clones = m.clones_of(&name);
                let r = h.p().delete_volume(&name, recursive);
                if !recursive && (has_snaps || !clones.is_empty()) {
                    prop_assert!(matches!(r, Err(Error::HasDependents { .. })), "delete of {} with dependents: {:?}", name, r);
                    continue;
                }
                if r.is_ok() {
                    // Recursive: clones (and theirs) and snapshots go too.
                    let mut gone = vec![name.clone()];
                    let mut i = 0;
                    while i < gone.len() {
                        let g = gone[i].clone();
                        for c in m.clones_of(&g) {
                            if !gone.contains(&c) {
                                gone.push(c);
                            }
                        }
                        i += 1;
                    }
                    for g in &gone {
                        m.vols.remove(g);
                        m.snaps.retain(|k, _| &k.0 != g);
                    }
                    m.flush_all();
                }
                r
            }
            Op::Flatten { vol } => {
                let name = m.vol_name(vol).unwrap();
                let is_clone = m.vols[&name].origin.is_some();
                let r = h.p().clone_flatten(&name).map(|_| ());
                if !is_clone {
                    // Only a clone can be flattened (a rolled-back volume counts as one too).
                    if r.is_ok() {
                        m.flush_all();
                    }
                    continue;
                }
                if r.is_ok() {
                    m.flush_all();
                    m.vols.get_mut(&name).unwrap().origin = None;
                }
                r
            }
            Op::Diff { snap, to_live } => {
                let Some((v, s)) = m.snap_key(snap) else { continue };
                // Against the live volume, or the volume's newest other snapshot.
                let other = if to_live { None } else { m.snaps.keys().rfind(|k| k.0 == v && k.1 != s).cloned() };
                let (img_b, to) = match &other {
                    Some(k) => (m.snaps[k].clone(), Some(k.1.clone())),
                    None => (m.vols[&v].image.clone(), None),
                };
                let img_a = &m.snaps[&(v.clone(), s.clone())];
                match h.p().diff(&v, &s, to.as_deref()) {
                    Ok(ranges) => {
                        // Every block that differs must be reported (a superset is allowed).
                        for (i, (x, y)) in img_a.chunks(4096).zip(img_b.chunks(4096)).enumerate() {
                            if x != y {
                                let off = i as u64 * 4096;
                                prop_assert!(
                                    ranges.iter().any(|r| r.offset <= off && off < r.offset + r.len),
                                    "diff {}@{} -> {:?} misses block {}", v, s, to, i
                                );
                            }
                        }
                    }
                    // Points of different branches (rolled back in between) are refused.
                    Err(Error::Invalid(_)) => {}
                    Err(e) => prop_assert!(false, "diff failed: {}", e),
                }
                Ok(())
            }
            Op::Reopen => {
                h.reopen(None);
                m.flush_all();
                Ok(())
            }
            Op::Crash { after } => {
                h.reopen(Some(after));
                m.flush_all();
                Ok(())
            }
        };
        if let Err(e) = r {
            // The only legitimate failure here is the injected one.
            prop_assert!(
                matches!(e, Error::DeviceIo(_) | Error::Meta { .. }),
                "step {:?} failed: {}", op, e
            );
            reconcile(&mut h, &mut m, &alt)?;
            continue;
        }
        let rep = match h.p().check() {
            Ok(r) => r,
            Err(_) => {
                // The injected fault hit the commit that check makes first.
                reconcile(&mut h, &mut m, &alt)?;
                continue;
            }
        };
        prop_assert!(rep.is_clean(), "after {:?}: {:?}", op, rep);
        m.flush_all();
        for (n, v) in m.vols.iter() {
            let got = h.read_vol(n);
            if got != v.image {
                let i = got.iter().zip(&v.image).position(|(a, b)| a != b).unwrap_or(0);
                prop_assert!(false, "after {:?}: volume {} differs at byte {} (block {})", op, n, i, i / 4096);
            }
        }
        for ((v, s), img) in m.snaps.iter() {
            let got = h.read_snap(v, s);
            prop_assert!(&got == img, "after {:?}: snapshot {}@{} differs", op, v, s);
        }
    }
    Ok(())
}

