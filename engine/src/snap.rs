//! Snapshots, clones, rollback, flatten and diff (format version 2, FORMAT.md §8).
//!
//! A *branch* is one line of history of a block map: its head entries (`0x04`) are what its
//! head volume reads, and entries that a newer write or a discard replaced while a snapshot
//! still needed them live on as *history* (`0x09`), listed by the generation that killed them
//! in the *dead list* (`0x07`). A snapshot is a (branch, generation) pin: taking one is a
//! single record plus advancing the branch's generation. An entry born at `b` and killed at
//! `k` is referenced by pin `p` iff `b <= p < k`; that rule alone decides what deleting a
//! snapshot frees (ZFS dead lists). Clones and rolled-back heads are new branches whose
//! unwritten blocks show their origin (branch, generation).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{ReadOptions, WriteBatch};

use crate::error::{Error, Result};
use crate::format::*;
use crate::pool::{lock, now_ns, AlignedBuf, Pool, Shared};
use crate::volume::{VolumeState, UNMAPPED};

/// Keys per metadata batch when a snapshot, branch or volume is deleted.
const CHUNK: usize = 1 << 16;

/// Branches and snapshots, in memory (loaded at open; changed under the control lock).
#[derive(Default)]
pub(crate) struct Catalog {
    pub branches: HashMap<u64, BranchRecord>,
    pub snaps: BTreeMap<(u64, u64), SnapRecord>,
}

impl Catalog {
    /// Generations pinned on branch `b` (snapshots that are not being deleted), ascending.
    pub fn pins(&self, b: u64) -> Vec<u64> {
        self.snaps.range((b, 0)..=(b, u64::MAX)).filter(|(_, s)| s.flags & snap_flags::DELETING == 0).map(|(k, _)| k.1).collect()
    }
    pub fn latest_pin(&self, b: u64) -> u64 {
        self.pins(b).last().copied().unwrap_or(0)
    }
    /// Branches whose origin is (b, g).
    pub fn dependents(&self, b: u64, g: u64) -> Vec<u64> {
        self.branches.values().filter(|r| r.origin() == Some((b, g))).map(|r| r.id).collect()
    }
    /// Branch `b` has no head and no snapshot record but (generation) `except`: once `except`
    /// is gone too, `gc_branch` deletes it.
    pub fn branch_collectable(&self, b: u64, except: Option<u64>) -> bool {
        self.branches.get(&b).is_some_and(|r| r.head_volume == 0) && self.snaps.range((b, 0)..=(b, u64::MAX)).all(|(k, _)| Some(k.1) == except)
    }
    /// Snapshot (b, g) is hidden (deleted while it had dependents) and no branch but `except`
    /// depends on it: once `except` is gone, `release_origin` removes it.
    pub fn hidden_released(&self, b: u64, g: u64, except: Option<u64>) -> bool {
        self.snaps.get(&(b, g)).is_some_and(|s| s.flags & snap_flags::HIDDEN != 0) && self.dependents(b, g).iter().all(|&d| Some(d) == except)
    }
    /// Ancestors of branch `b`, nearest first.
    pub fn chain(&self, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur = self.branches.get(&b).and_then(|r| r.origin());
        while let Some((ob, og)) = cur {
            if out.len() > 100_000 || out.iter().any(|&(x, _)| x == ob) {
                break; // a cycle would be corruption; never loop forever
            }
            out.push((ob, og));
            cur = self.branches.get(&ob).and_then(|r| r.origin());
        }
        out
    }
    /// The visible snapshot `name` of volume `vol`.
    pub fn find(&self, vol: u64, name: &str) -> Option<&SnapRecord> {
        self.snaps.values().find(|s| s.volume == vol && s.name == name && s.flags & (snap_flags::HIDDEN | snap_flags::DELETING) == 0)
    }
    pub fn visible_of(&self, vol: u64) -> Vec<SnapRecord> {
        self.snaps
            .values()
            .filter(|s| s.volume == vol && s.flags & (snap_flags::HIDDEN | snap_flags::DELETING) == 0)
            .cloned()
            .collect()
    }
}

/// A snapshot as `snap list` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub created_ns: u64,
    pub size_bytes: u64,
    /// Data the volume's own branch mapped when the snapshot was taken.
    pub referenced_bytes: u64,
    /// What deleting it would free now (blocks nothing else references).
    pub exclusive_bytes: u64,
    /// Clones made from it.
    pub clones: Vec<String>,
    pub generation: u64,
}

/// Changed ranges between two points of a volume's history.
#[derive(Debug, Clone)]
pub struct DiffRange {
    pub offset: u64,
    pub len: u64,
}

/// Split `VOL@SNAP`.
pub fn parse_snap_spec(spec: &str) -> Result<(&str, &str)> {
    match spec.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v, s)),
        _ => Err(Error::InvalidName { name: spec.into(), why: "expected VOLUME@SNAPSHOT" }),
    }
}

/// What `free_scan` found: keys to delete and blocks to free.
#[derive(Default)]
struct Sweep {
    deletes: Vec<Vec<u8>>,
    frees: Vec<u64>,
    data_blocks: u64,
}

impl Shared {
    pub(crate) fn vol_by_id(&self, id: u64) -> Option<Arc<VolumeState>> {
        self.vols.read().ok().and_then(|v| v.values().find(|x| x.id == id).cloned())
    }

    /// Visit dead-list entries of branch `b` with kill in `kills` and birth in
    /// `births` (both inclusive ranges), up to `limit`. `f(kill, birth, lba, pba, flags)`.
    fn dead_scan(
        &self,
        b: u64,
        kills: (u64, u64),
        births: (u64, u64),
        limit: usize,
        f: &mut dyn FnMut(u64, u64, u64, u64, u32),
    ) -> Result<usize> {
        let mut n = 0;
        if kills.0 > kills.1 || births.0 > births.1 {
            return Ok(0);
        }
        // One seek per kill generation: within it, births are sorted, so only the wanted
        // births are read (cost proportional to what is found, not to the dead list).
        let mut x = kills.0;
        loop {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(dead_key(b, x, births.1.saturating_add(1), 0));
            let mut it = self.db.raw_iterator_opt(ro);
            it.seek(dead_key(b, x, births.0, 0));
            while it.valid() && n < limit {
                let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
                let Some((kb, kill, birth, lba)) = parse_dead_key(k) else { break };
                if kb != b || kill != x || birth > births.1 {
                    break;
                }
                let (pba, flags) = decode_dead_value(k, v)?;
                f(kill, birth, lba, pba, flags);
                n += 1;
                it.next();
            }
            it.status().map_err(Error::meta("iterate dead list"))?;
            if n >= limit || x >= kills.1 {
                break;
            }
            x += 1;
        }
        Ok(n)
    }

    /// Visit birth-index entries of branch `b` with birth in `births` (inclusive).
    fn birth_scan(&self, b: u64, births: (u64, u64), limit: usize, f: &mut dyn FnMut(u64, u64)) -> Result<usize> {
        if births.0 > births.1 {
            return Ok(0);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(if births.1 < u64::MAX { birth_key(b, births.1 + 1, 0) } else { birth_key(b.saturating_add(1), 0, 0) });
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(birth_key(b, births.0, 0));
        let mut n = 0;
        while it.valid() && n < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
            let Some((kb, birth, lba)) = parse_birth_key(k) else { break };
            if kb != b {
                break;
            }
            decode_birth_value(k, v)?;
            f(birth, lba);
            n += 1;
            it.next();
        }
        it.status().map_err(Error::meta("iterate birth index"))?;
        Ok(n)
    }

    /// Up to `limit` keys with prefix `[t] b:u64be`.
    fn prefix_keys(&self, t: u8, b: u64, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut lo = vec![t];
        lo.extend_from_slice(&b.to_be_bytes());
        let mut hi = vec![t];
        hi.extend_from_slice(&b.saturating_add(1).to_be_bytes());
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(hi);
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(&lo);
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status().map_err(Error::meta("iterate branch"))?;
        Ok(out)
    }

    /// What removing pin `g` of branch `b` frees, in chunks of at most `limit` keys. Reads the
    /// neighbouring pins, the branch's generation and whether it has a head from the catalog
    /// (pin `g` itself is not counted when it is marked DELETING).
    fn pin_sweep(&self, b: u64, g: u64, limit: usize) -> Result<Sweep> {
        let (prev, next, gen, headless) = {
            let cat = lock(&self.cat);
            let pins = cat.pins(b);
            let br = cat.branches.get(&b);
            (
                pins.iter().copied().filter(|&p| p < g).max(),
                pins.iter().copied().find(|&p| p > g),
                br.map(|r| r.gen).unwrap_or(g + 1),
                br.map(|r| r.head_volume == 0).unwrap_or(true),
            )
        };
        let mut sw = Sweep::default();
        let hi = next.unwrap_or(gen);
        // Births this pin is the first to see (0 = copies made by flatten, seen by all).
        let lo = prev.map(|p| p + 1).unwrap_or(0);
        let total = self.sb.total_blocks;
        // History entries born after the previous pin, killed after this one and not later
        // than the next: only this pin saw them.
        self.dead_scan(b, (g + 1, hi), (lo, g), limit, &mut |kill, birth, lba, pba, flags| {
            sw.deletes.push(dead_key(b, kill, birth, lba));
            sw.deletes.push(hist_key(b, lba, birth));
            if flags & map_flags::TOMBSTONE == 0 && pba < total {
                sw.frees.push(pba);
                sw.data_blocks += 1;
            }
        })?;
        // The last pin of a branch without a head: head entries born since the previous pin.
        if next.is_none() && headless && sw.deletes.len() < limit {
            let room = limit - sw.deletes.len();
            let mut found: Vec<(u64, u64, Option<u64>)> = Vec::new();
            if lo < FIRST_INDEXED_BIRTH {
                // Births 0 and 1 are not indexed: scan the branch's head entries.
                for c in self.branch_entries(b, 0, u64::MAX, usize::MAX)? {
                    if c.entry.birth_gen >= lo && c.entry.birth_gen <= g && found.len() < room {
                        found.push((c.entry.birth_gen, c.lba, Some(self.data_of(&c.entry).unwrap_or(u64::MAX))));
                    }
                }
            } else {
                self.birth_scan(b, (lo, g), room, &mut |birth, lba| found.push((birth, lba, None)))?;
            }
            for (birth, lba, known) in found {
                self.sweep_head_entry(&mut sw, b, birth, lba, known)?;
            }
        }
        Ok(sw)
    }

    /// Add to `sw` the removal of branch `b`'s head entry at `lba` if it was born at `birth`
    /// (and of its birth-index key): `known` is its block when already read (`u64::MAX` for a
    /// tombstone), `None` to look the entry up.
    fn sweep_head_entry(&self, sw: &mut Sweep, b: u64, birth: u64, lba: u64, known: Option<u64>) -> Result<()> {
        if birth >= FIRST_INDEXED_BIRTH {
            sw.deletes.push(birth_key(b, birth, lba));
        }
        let k = map_key(b, lba);
        let pba = match known {
            Some(p) => Some(p),
            None => match self.db.get_pinned(k).map_err(Error::meta("get"))? {
                Some(v) => {
                    let e = MapEntry::decode(&k, &v)?;
                    (e.birth_gen == birth).then(|| self.data_of(&e).unwrap_or(u64::MAX))
                }
                None => None,
            },
        };
        if let Some(p) = pba {
            sw.deletes.push(k.to_vec());
            if p != u64::MAX {
                sw.frees.push(p);
                sw.data_blocks += 1;
            }
        }
        Ok(())
    }

    /// Apply a sweep: delete its keys durably, then let its blocks be reused.
    fn apply_sweep(&self, sw: Sweep, extra: Option<WriteBatch>) -> Result<()> {
        let mut b = extra.unwrap_or_default();
        for k in &sw.deletes {
            b.delete(k);
        }
        {
            let _m = lock(&self.meta);
            self.write_meta(b)?;
        }
        let mut out = Vec::new();
        lock(&self.reclaim).retire(sw.frees, &mut out);
        self.release_blocks(out);
        Ok(())
    }
}

impl Pool {
    fn find_snap(&self, vol: &VolumeState, snap: &str) -> Result<SnapRecord> {
        lock(&self.shared.cat)
            .find(vol.id, snap)
            .cloned()
            .ok_or_else(|| Error::NoSuchSnapshot(format!("{}@{snap}", vol.name())))
    }

    fn put_branch(&self, b: &mut WriteBatch, r: &BranchRecord) {
        b.put(branch_key(r.id), r.encode());
    }

    /// Take a snapshot `name` of volume `vol`. Allowed while a guest writes: new writes,
    /// discards and write-zeroes wait while the requests in flight finish and everything
    /// completed so far is committed, so the snapshot holds exactly the requests completed
    /// before it. Its cost does not depend on the volume's size.
    pub fn snapshot_create(&self, vol: &str, name: &str) -> Result<SnapshotInfo> {
        validate_name(name)?;
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(vol)?;
        if lock(&self.shared.cat).find(v.id, name).is_some() {
            return Err(Error::SnapshotExists(format!("{vol}@{name}")));
        }
        {
            let _p = v.lock_pending();
            v.frozen.store(true, Ordering::Release);
        }
        let r = self.snapshot_frozen(&v, name);
        let waiters = {
            let mut p = v.lock_pending();
            v.frozen.store(false, Ordering::Release);
            std::mem::take(&mut p.waiters)
        };
        for w in waiters {
            w.complete(Vec::new());
        }
        let rec = r?;
        Ok(self.snap_info(&rec, 0))
    }

    fn snapshot_frozen(&self, v: &VolumeState, name: &str) -> Result<SnapRecord> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while v.mutations.load(Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                return Err(Error::Busy { name: v.name(), why: "writes in flight did not finish within 60 s" });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut tries = 0;
        let _m = loop {
            let has_pending = {
                let p = v.lock_pending();
                !p.map.is_empty() || !p.frees.is_empty()
            };
            if has_pending {
                self.sync()?;
            }
            let m = lock(&self.shared.meta);
            let p = v.lock_pending();
            if p.map.is_empty() {
                drop(p);
                break m;
            }
            tries += 1;
            if tries > 5 {
                return Err(Error::Busy { name: v.name(), why: "uncommitted changes remain" });
            }
        };
        let b = v.branch();
        let g = v.gen.load(Ordering::Acquire);
        let mut cat = lock(&self.shared.cat);
        let mut br = cat.branches.get(&b).cloned().ok_or_else(|| Error::Busy { name: v.name(), why: "branch record missing" })?;
        let rec = SnapRecord {
            branch: b,
            gen: g,
            volume: v.id,
            created_ns: now_ns(),
            size_bytes: v.size(),
            referenced_blocks: v.mapped_blocks.load(Ordering::Relaxed),
            flags: 0,
            name: name.into(),
        };
        br.gen = g + 1;
        let mut batch = WriteBatch::default();
        batch.put(snap_key(b, g), rec.encode());
        self.put_branch(&mut batch, &br);
        self.shared.write_meta(batch)?;
        cat.branches.insert(b, br);
        cat.snaps.insert((b, g), rec.clone());
        v.gen.store(g + 1, Ordering::Release);
        v.latest_pin.store(g, Ordering::Release);
        Ok(rec)
    }

    fn snap_info(&self, s: &SnapRecord, exclusive: u64) -> SnapshotInfo {
        let cat = lock(&self.shared.cat);
        let clones = cat
            .dependents(s.branch, s.gen)
            .into_iter()
            .filter_map(|d| cat.branches.get(&d).map(|r| r.head_volume))
            .filter(|&h| h != 0 && h != s.volume)
            .filter_map(|h| self.shared.vol_by_id(h).map(|v| v.name()))
            .collect();
        SnapshotInfo {
            volume: self.shared.vol_by_id(s.volume).map(|v| v.name()).unwrap_or_default(),
            name: s.name.clone(),
            created_ns: s.created_ns,
            size_bytes: s.size_bytes,
            referenced_bytes: s.referenced_blocks * BLOCK_SIZE,
            exclusive_bytes: exclusive * BLOCK_SIZE,
            clones,
            generation: s.gen,
        }
    }

    /// Blocks that deleting snapshot (b, g) would free now: its own, and those of the hidden
    /// snapshots the delete releases in turn. Removing the last snapshot of a branch without a
    /// head deletes the branch (`gc_branch`), and its origin, if that is a hidden snapshot (one
    /// deleted while it had dependents) with no other dependent, is removed with it, and so
    /// on up the chain. (Found by the snapshot_model fuzz target: a volume rolled back to s1,
    /// snapshotted as s2, s1 deleted (hidden), rolled back to s2 and flattened; deleting s2
    /// then freed s1's block too, while s2 reported 0 exclusive bytes.)
    fn exclusive_blocks(&self, b: u64, g: u64) -> Result<u64> {
        let sh = &self.shared;
        let mut total = sh.pin_sweep(b, g, usize::MAX)?.data_blocks;
        let (mut b, mut g) = (b, g);
        for _ in 0..100_000 {
            let next = {
                let cat = lock(&sh.cat);
                if !cat.branch_collectable(b, Some(g)) {
                    break;
                }
                match cat.branches.get(&b).and_then(|r| r.origin()) {
                    Some((ob, og)) if cat.hidden_released(ob, og, Some(b)) => (ob, og),
                    _ => break,
                }
            };
            total += sh.pin_sweep(next.0, next.1, usize::MAX)?.data_blocks;
            (b, g) = next;
        }
        Ok(total)
    }

    /// Snapshots of `vol` (or of every volume), oldest first.
    pub fn snapshot_list(&self, vol: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let _c = self.control();
        let recs: Vec<SnapRecord> = {
            let cat = lock(&self.shared.cat);
            match vol {
                Some(n) => cat.visible_of(self.get(n)?.id),
                None => cat.snaps.values().filter(|s| s.flags & (snap_flags::HIDDEN | snap_flags::DELETING) == 0).cloned().collect(),
            }
        };
        let mut out = Vec::new();
        for r in recs {
            // With dependents (clones, a rolled-back head) a delete only hides it: frees nothing.
            let deps = !lock(&self.shared.cat).dependents(r.branch, r.gen).is_empty();
            let ex = if deps { 0 } else { self.exclusive_blocks(r.branch, r.gen)? };
            out.push(self.snap_info(&r, ex));
        }
        out.sort_by_key(|s| (s.volume.clone(), s.created_ns, s.generation));
        Ok(out)
    }

    /// Delete snapshot `snap` of `vol`, freeing the blocks nothing else references (time
    /// proportional to those). A snapshot that clones depend on disappears from the list but
    /// keeps its blocks until the last of them is deleted or flattened.
    pub fn snapshot_delete(&self, vol: &str, snap: &str) -> Result<()> {
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(vol)?;
        let s = self.find_snap(&v, snap)?;
        self.delete_snap_locked(&s)
    }

    fn delete_snap_locked(&self, s: &SnapRecord) -> Result<()> {
        if lock(&self.shared.snap_readers).get(&(s.branch, s.gen)).copied().unwrap_or(0) > 0 {
            return Err(Error::Busy { name: s.name.clone(), why: "snapshot is open for reading (an export?)" });
        }
        let deps = lock(&self.shared.cat).dependents(s.branch, s.gen);
        if !deps.is_empty() {
            let mut r = s.clone();
            r.flags |= snap_flags::HIDDEN;
            let mut b = WriteBatch::default();
            b.put(snap_key(r.branch, r.gen), r.encode());
            self.shared.write_meta(b)?;
            lock(&self.shared.cat).snaps.insert((r.branch, r.gen), r);
            return Ok(());
        }
        self.remove_pin(s.branch, s.gen)
    }

    /// Remove pin (b, g): mark it DELETING (it stops being a reference), free what only it
    /// referenced in chunks, then drop its record. Resumed at open after a crash.
    pub(crate) fn remove_pin(&self, b: u64, g: u64) -> Result<()> {
        let sh = &self.shared;
        {
            let _m = lock(&sh.meta);
            let mut cat = lock(&sh.cat);
            let Some(mut r) = cat.snaps.get(&(b, g)).cloned() else { return Ok(()) };
            if r.flags & snap_flags::DELETING == 0 {
                r.flags |= snap_flags::DELETING;
                let mut batch = WriteBatch::default();
                batch.put(snap_key(b, g), r.encode());
                sh.write_meta(batch)?;
                cat.snaps.insert((b, g), r);
            }
            let latest = cat.latest_pin(b);
            if let Some(h) = cat.branches.get(&b).map(|r| r.head_volume).filter(|&h| h != 0) {
                if let Some(v) = sh.vol_by_id(h) {
                    v.latest_pin.store(latest, Ordering::Release);
                }
            }
        }
        loop {
            let sw = sh.pin_sweep(b, g, CHUNK)?;
            if sw.deletes.is_empty() {
                break;
            }
            let more = sw.deletes.len() >= CHUNK;
            sh.apply_sweep(sw, None)?;
            if !more {
                break;
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete(snap_key(b, g));
        {
            let _m = lock(&sh.meta);
            sh.write_meta(batch)?;
            lock(&sh.cat).snaps.remove(&(b, g));
        }
        self.gc_branch(b)
    }

    /// A branch with neither a head nor pins is deleted; then its origin may go too.
    fn gc_branch(&self, b: u64) -> Result<()> {
        let origin = {
            let cat = lock(&self.shared.cat);
            if !cat.branch_collectable(b, None) {
                return Ok(());
            }
            cat.branches.get(&b).and_then(|r| r.origin())
        };
        self.delete_branch(b)?;
        if let Some((ob, og)) = origin {
            self.release_origin(ob, og)?;
        }
        Ok(())
    }

    /// A snapshot that lost a dependent: delete it if it was hidden and nothing else depends.
    fn release_origin(&self, ob: u64, og: u64) -> Result<()> {
        let rec = {
            let cat = lock(&self.shared.cat);
            if cat.hidden_released(ob, og, None) {
                cat.snaps.get(&(ob, og)).cloned()
            } else {
                None
            }
        };
        match rec {
            Some(s) => self.remove_pin(s.branch, s.gen),
            None => Ok(()),
        }
    }

    /// Delete every record of branch `b` and free its blocks (chunked; the branch record
    /// goes last, so a crash leaves a branch that the next open deletes again).
    fn delete_branch(&self, b: u64) -> Result<()> {
        let sh = &self.shared;
        let total = sh.sb.total_blocks;
        for t in [key::MAP, key::HIST, key::DEAD, key::BIRTH] {
            loop {
                let kv = sh.prefix_keys(t, b, CHUNK)?;
                if kv.is_empty() {
                    break;
                }
                let mut sw = Sweep::default();
                for (k, v) in &kv {
                    let pba = match t {
                        key::MAP => MapEntry::decode(k, v).ok().and_then(|e| sh.data_of(&e)),
                        key::HIST => HistEntry::decode(k, v).ok().and_then(|h| sh.data_of(&h.entry)),
                        _ => None,
                    };
                    if let Some(p) = pba.filter(|&p| p < total) {
                        sw.frees.push(p);
                    }
                    sw.deletes.push(k.clone());
                }
                let more = kv.len() >= CHUNK;
                sh.apply_sweep(sw, None)?;
                if !more {
                    break;
                }
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete(branch_key(b));
        let _m = lock(&sh.meta);
        sh.write_meta(batch)?;
        lock(&sh.cat).branches.remove(&b);
        Ok(())
    }

    /// Branch `b` lost its head volume (rollback, volume delete): free head entries born
    /// after its newest pin (no snapshot sees them), or the whole branch if it has no pins.
    pub(crate) fn drop_head(&self, b: u64) -> Result<()> {
        let latest = lock(&self.shared.cat).latest_pin(b);
        if latest == 0 {
            return self.gc_branch(b);
        }
        let sh = &self.shared;
        loop {
            let mut found = Vec::new();
            sh.birth_scan(b, (latest + 1, u64::MAX), CHUNK, &mut |birth, lba| found.push((birth, lba)))?;
            if found.is_empty() {
                break;
            }
            let mut sw = Sweep::default();
            for &(birth, lba) in &found {
                sh.sweep_head_entry(&mut sw, b, birth, lba, None)?;
            }
            let more = found.len() >= CHUNK;
            sh.apply_sweep(sw, None)?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// Make the volume state follow its (new) head branch.
    fn adopt_branch(&self, v: &VolumeState, b: u64, mapped: u64, empty: bool) {
        let cat = lock(&self.shared.cat);
        v.layer.store(b, Ordering::Release);
        v.gen.store(cat.branches.get(&b).map(|r| r.gen).unwrap_or(1), Ordering::Release);
        v.latest_pin.store(cat.latest_pin(b), Ordering::Release);
        let has_origin = match v.chain.write() {
            Ok(mut c) => {
                *c = cat.chain(b);
                !c.is_empty()
            }
            Err(_) => true,
        };
        v.mapped_blocks.store(mapped, Ordering::Relaxed);
        let mut p = v.lock_pending();
        p.cache_clear(&self.shared.cache);
        p.cache_gen += 1;
        p.has_origin = has_origin;
        // A new, empty branch (clone, rollback): the empty cache holds all of it.
        p.complete = empty;
    }

    pub(crate) fn origin_name(&self, v: &VolumeState) -> Option<String> {
        let (b, g) = *v.chain.read().ok()?.first()?;
        let cat = lock(&self.shared.cat);
        let s = cat.snaps.get(&(b, g))?;
        let vol = self.shared.vol_by_id(s.volume).map(|x| x.name()).unwrap_or_else(|| format!("(deleted volume {})", s.volume));
        Some(format!("{vol}@{}", s.name))
    }

    /// Open snapshot `snap` of `vol` for reading (export, verification). The snapshot cannot
    /// be deleted while it is open.
    pub fn open_snapshot(&self, vol: &str, snap: &str) -> Result<crate::Volume> {
        let _c = self.control();
        let v = self.get(vol)?;
        let s = self.find_snap(&v, snap)?;
        if v.encrypted.load(Ordering::Relaxed) && v.crypt.get().is_none() {
            return Err(Error::KeyUnavailable(vol.into()));
        }
        // A view with an empty own branch (0 is never a branch id) whose origin chain starts
        // at the snapshot: every read falls through to it.
        let view = Arc::new(VolumeState::new(v.id, 0, format!("{vol}@{snap}"), s.size_bytes, s.created_ns));
        view.encrypted.store(v.encrypted.load(Ordering::Relaxed), Ordering::Relaxed);
        if let Some(c) = v.crypt.get() {
            let _ = view.crypt.set(c.clone());
        }
        let mut chain = vec![(s.branch, s.gen)];
        chain.extend(lock(&self.shared.cat).chain(s.branch));
        if let Ok(mut c) = view.chain.write() {
            *c = chain;
        }
        view.lock_pending().has_origin = true;
        view.readers.fetch_add(1, Ordering::AcqRel);
        *lock(&self.shared.snap_readers).entry((s.branch, s.gen)).or_insert(0) += 1;
        Ok(crate::Volume::snapshot_view(self.shared.clone(), view, (s.branch, s.gen)))
    }

    /// Clone snapshot `snap` of `vol` as a new writable volume `new_name` (O(1): nothing is
    /// copied; unwritten blocks read the snapshot's data).
    pub fn clone_volume(&self, vol: &str, snap: &str, new_name: &str) -> Result<crate::VolumeInfo> {
        validate_name(new_name)?;
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(vol)?;
        let s = self.find_snap(&v, snap)?;
        if self.get(new_name).is_ok() {
            return Err(Error::VolumeExists(new_name.into()));
        }
        let mut rec = lock(&self.shared.record).clone();
        let id = rec.next_id;
        rec.next_id += 1;
        let br = BranchRecord { id, gen: 1, origin_branch: s.branch, origin_gen: s.gen, head_volume: id, created_ns: now_ns() };
        let nv = Arc::new(VolumeState::new(id, id, new_name.into(), s.size_bytes, now_ns()));
        let mut b = WriteBatch::default();
        if v.encrypted.load(Ordering::Relaxed) {
            // The clone joins the family: the same data key, wrapped under its own id.
            let c = v.crypt.get().cloned().ok_or_else(|| Error::KeyUnavailable(vol.into()))?;
            let dek = c.dek.as_ref().ok_or_else(|| Error::KeyUnavailable(vol.into()))?;
            b.put(key_key(id), self.shared.wrap_for(id, c.family, dek)?);
            nv.encrypted.store(true, Ordering::Relaxed);
            let _ = nv.crypt.set(c);
        }
        b.put(POOL_KEY, rec.encode());
        self.write_record(&mut b, &nv, new_name);
        b.put(name_key(new_name), encode_name_value(new_name, id));
        self.put_branch(&mut b, &br);
        {
            let _m = lock(&self.shared.meta);
            self.shared.write_meta(b)?;
            lock(&self.shared.cat).branches.insert(id, br);
        }
        *lock(&self.shared.record) = rec;
        self.adopt_branch(&nv, id, 0, true);
        if let Ok(mut vols) = self.shared.vols.write() {
            vols.insert(new_name.into(), nv.clone());
        }
        Ok(self.info_of(&nv))
    }

    /// Roll `vol` back to snapshot `snap`: its head becomes a new branch whose unwritten
    /// blocks show the snapshot (O(1) in the volume's size; what was written since the newest
    /// snapshot is freed). Later snapshots stay. Refused while attached.
    pub fn snapshot_rollback(&self, vol: &str, snap: &str) -> Result<crate::VolumeInfo> {
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(vol)?;
        if v.writers.load(Ordering::Acquire) > 0 || v.readers.load(Ordering::Acquire) > 0 {
            return Err(Error::Busy { name: vol.into(), why: "attached; detach it before rolling back (the guest would see its disk change under it)" });
        }
        let s = self.find_snap(&v, snap)?;
        self.sync()?;
        let old = v.branch();
        let mut rec = lock(&self.shared.record).clone();
        let id = rec.next_id;
        rec.next_id += 1;
        let br = BranchRecord { id, gen: 1, origin_branch: s.branch, origin_gen: s.gen, head_volume: v.id, created_ns: now_ns() };
        let mut oldbr = lock(&self.shared.cat).branches.get(&old).cloned().ok_or_else(|| Error::Busy { name: vol.into(), why: "branch record missing" })?;
        oldbr.head_volume = 0;
        let mut b = WriteBatch::default();
        b.put(POOL_KEY, rec.encode());
        self.put_branch(&mut b, &br);
        self.put_branch(&mut b, &oldbr);
        v.size_bytes.store(s.size_bytes, Ordering::Release);
        v.layer.store(id, Ordering::Release);
        self.write_record(&mut b, &v, &v.name());
        {
            let _m = lock(&self.shared.meta);
            if let Err(e) = self.shared.write_meta(b) {
                v.layer.store(old, Ordering::Release);
                return Err(e);
            }
            let mut cat = lock(&self.shared.cat);
            cat.branches.insert(id, br);
            cat.branches.insert(old, oldbr);
        }
        *lock(&self.shared.record) = rec;
        self.adopt_branch(&v, id, 0, true);
        self.drop_head(old)?;
        Ok(self.info_of(&v))
    }

    /// Copy into clone `vol` every block it still reads from its origin, then cut the link:
    /// afterwards the origin snapshot can be deleted without keeping blocks for it. O(data the
    /// clone inherits). Refused while attached.
    pub fn clone_flatten(&self, vol: &str) -> Result<crate::VolumeInfo> {
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(vol)?;
        if v.writers.load(Ordering::Acquire) > 0 || v.readers.load(Ordering::Acquire) > 0 {
            return Err(Error::Busy { name: vol.into(), why: "attached; detach it before flattening" });
        }
        let chain = v.chain();
        if chain.is_empty() {
            return Err(Error::Invalid(format!("volume {vol:?} is not a clone (nothing to flatten)")));
        }
        self.sync()?;
        let sh = &self.shared;
        let b = v.branch();
        let end = v.size() / BLOCK_SIZE;
        let own: HashMap<u64, u64> = sh.committed_range(&v, 0, end)?.into_iter().map(|c| (c.lba, c.entry.birth_gen)).collect();
        let pins = lock(&sh.cat).pins(b);
        // (lba, source block, None = becomes a head entry | Some(k) = history killed at k)
        let mut todo: Vec<(u64, u64, Option<u64>)> = Vec::new();
        for l in sh.chain_candidates(&chain, 0, end)? {
            let Some(p) = sh.chain_view(&chain, l)? else { continue };
            // The clone's own oldest entry here: views older than it fall through to the
            // origin, so they need the copy (as history killed by that entry).
            let mut oldest = own.get(&l).copied();
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(hist_key(b, l + 1, u64::MAX));
            let mut it = sh.db.raw_iterator_opt(ro);
            it.seek(hist_key(b, l, u64::MAX));
            while it.valid() {
                if let Some((_, _, birth)) = it.key().and_then(parse_hist_key) {
                    oldest = Some(oldest.map_or(birth, |o| o.min(birth)));
                }
                it.next();
            }
            it.status().map_err(Error::meta("iterate history"))?;
            match oldest {
                None => todo.push((l, p, None)),
                Some(k) if pins.iter().any(|&g| g < k) => todo.push((l, p, Some(k))),
                Some(_) => {}
            }
        }
        let mut buf = AlignedBuf::new(BLOCK_SIZE as usize);
        let mut copied = 0u64;
        let encrypted = v.encrypted.load(Ordering::Relaxed);
        for chunk in todo.chunks(4096) {
            let mut batch = WriteBatch::default();
            let mut new_blocks = Vec::new();
            let mut new_seals = Vec::new();
            for &(l, src, kill) in chunk {
                let Some(dst) = lock(&sh.alloc).alloc_one(None) else {
                    for p in new_blocks {
                        lock(&sh.alloc).release(p);
                    }
                    return Err(Error::NoSpace);
                };
                new_blocks.push(dst);
                use std::os::unix::fs::FileExt;
                let r = sh
                    .data
                    .read_exact_at(buf.as_mut_slice(), sh.data_offset(src))
                    .and_then(|_| sh.data.write_all_at(buf.as_slice(), sh.data_offset(dst)));
                if let Err(e) = r {
                    for p in new_blocks {
                        lock(&sh.alloc).release(p);
                    }
                    return Err(Error::DeviceIo(e));
                }
                if encrypted {
                    // The ciphertext moved, the lba and family did not: same seal (FORMAT.md §11.3).
                    match sh.committed_seal(src) {
                        Ok(Some(s)) => {
                            batch.put(seal_key(dst), s.encode(dst));
                            new_seals.push((dst, s));
                        }
                        Ok(None) | Err(_) => {
                            for p in new_blocks {
                                lock(&sh.alloc).release(p);
                            }
                            return Err(Error::Corrupt {
                                location: crate::error::Location::Record(seal_key(src)),
                                what: format!("no readable seal for block {src} of encrypted volume {vol:?}"),
                            });
                        }
                    }
                }
                // Birth 0: every snapshot of the clone saw this data (through the origin).
                match kill {
                    None => {
                        sh.note_head(b);
                        let k = map_key(b, l);
                        batch.put(k, MapEntry::new(dst, 0).encode(&k));
                    }
                    Some(kill) => {
                        sh.note_history(b);
                        let hk = hist_key(b, l, 0);
                        batch.put(&hk, HistEntry { entry: MapEntry::new(dst, 0), kill }.encode(&hk));
                        let dk = dead_key(b, kill, 0, l);
                        batch.put(&dk, encode_dead_value(&dk, dst, 0));
                    }
                }
            }
            sh.data.sync_data().map_err(Error::DeviceIo)?;
            let _m = lock(&sh.meta);
            sh.write_meta(batch)?;
            // The seal cache may still hold the seal of a block's earlier life.
            for (dst, s) in new_seals {
                sh.cache_seal(dst, s);
            }
            copied += chunk.iter().filter(|x| x.2.is_none()).count() as u64;
        }
        let mut br = lock(&sh.cat).branches.get(&b).cloned().ok_or_else(|| Error::Busy { name: vol.into(), why: "branch record missing" })?;
        let origin = br.origin();
        br.origin_branch = 0;
        br.origin_gen = 0;
        let mut batch = WriteBatch::default();
        self.put_branch(&mut batch, &br);
        {
            let _m = lock(&sh.meta);
            sh.write_meta(batch)?;
            lock(&sh.cat).branches.insert(b, br);
        }
        let mapped = v.mapped_blocks.load(Ordering::Relaxed) + copied;
        self.adopt_branch(&v, b, mapped, false);
        // Clones of this clone read through it: their chains end here now, and blocks they
        // cached from further up may be freed once the origin goes.
        let others: Vec<Arc<VolumeState>> = sh.vols.read().map(|x| x.values().cloned().collect()).unwrap_or_default();
        for o in others {
            if o.chain().iter().any(|&(x, _)| x == b) {
                let chain = lock(&sh.cat).chain(o.branch());
                let has_origin = !chain.is_empty();
                if let Ok(mut c) = o.chain.write() {
                    *c = chain;
                }
                let mut p = o.lock_pending();
                p.cache_clear(&sh.cache);
                p.cache_gen += 1;
                p.has_origin = has_origin;
            }
        }
        if let Some((ob, og)) = origin {
            self.release_origin(ob, og)?;
        }
        Ok(self.info_of(&v))
    }

    /// Block ranges that may differ between snapshot `from` of `vol` and snapshot `to` (or
    /// the live volume): found from birth and kill generations, without reading data.
    pub fn diff(&self, vol: &str, from: &str, to: Option<&str>) -> Result<Vec<DiffRange>> {
        let v = self.get(vol)?;
        if to.is_none() {
            self.sync()?;
        }
        let _c = self.control();
        let a = self.find_snap(&v, from)?;
        let sh = &self.shared;
        let mut lbas = Vec::new();
        let (bb, gb) = match to {
            Some(t) => {
                let s = self.find_snap(&v, t)?;
                (s.branch, s.gen)
            }
            None => {
                // The live volume: if it was rolled back (or is a clone), walk its branches up
                // to the snapshot's: everything those branches hold may differ, then compare
                // the snapshot with the point they branched from.
                let mut b = v.branch();
                let mut g = u64::MAX;
                let chain = v.chain();
                let mut i = 0;
                while b != a.branch {
                    for t in [key::MAP, key::HIST] {
                        for (k, _) in sh.prefix_keys(t, b, usize::MAX)? {
                            if let Some(l) = parse_map_key(&k).map(|x| x.1).or_else(|| parse_hist_key(&k).map(|x| x.1)) {
                                lbas.push(l);
                            }
                        }
                    }
                    let Some(&(ob, og)) = chain.get(i) else {
                        return Err(Error::Invalid(format!(
                            "{vol}@{from} is not an ancestor of the live volume; diff needs two points of one history"
                        )));
                    };
                    b = ob;
                    g = og;
                    i += 1;
                }
                (b, g)
            }
        };
        if a.branch != bb {
            return Err(Error::Invalid(format!(
                "{vol}@{from} and {vol}@{} are on different branches (the volume was rolled back in between); diff needs two points of one history",
                to.unwrap_or("?")
            )));
        }
        let gen = lock(&sh.cat).branches.get(&bb).map(|r| r.gen).unwrap_or(1);
        let (lo, hi) = (a.gen.min(gb), a.gen.max(gb).min(gen));
        // Head entries born in (lo, hi].
        sh.birth_scan(bb, (lo + 1, hi), usize::MAX, &mut |_, l| lbas.push(l))?;
        // Entries killed in (lo, hi] changed; entries killed later but born in (lo, hi] too.
        sh.dead_scan(bb, (lo + 1, hi), (0, u64::MAX - 1), usize::MAX, &mut |_, _, l, _, _| lbas.push(l))?;
        if hi < gen {
            sh.dead_scan(bb, (hi + 1, gen), (lo + 1, hi), usize::MAX, &mut |_, _, l, _, _| lbas.push(l))?;
        }
        lbas.sort_unstable();
        lbas.dedup();
        let mut out: Vec<DiffRange> = Vec::new();
        for l in lbas {
            match out.last_mut() {
                Some(r) if r.offset + r.len == l * BLOCK_SIZE => r.len += BLOCK_SIZE,
                _ => out.push(DiffRange { offset: l * BLOCK_SIZE, len: BLOCK_SIZE }),
            }
        }
        Ok(out)
    }

    /// Finish what a crash interrupted: snapshots being deleted, branches that lost their
    /// head. Called at open.
    pub(crate) fn resume(&self) -> Result<()> {
        let _c = self.control();
        let deleting: Vec<(u64, u64)> =
            lock(&self.shared.cat).snaps.iter().filter(|(_, s)| s.flags & snap_flags::DELETING != 0).map(|(k, _)| *k).collect();
        for (b, g) in deleting {
            tracing::info!(branch = b, gen = g, "resuming an interrupted snapshot delete");
            self.remove_pin(b, g)?;
        }
        let headless: Vec<u64> = lock(&self.shared.cat).branches.values().filter(|r| r.head_volume == 0).map(|r| r.id).collect();
        for b in headless {
            self.drop_head(b)?;
        }
        // Snapshots whose volume is gone (a volume delete interrupted between its steps).
        let orphans: Vec<SnapRecord> = {
            let cat = lock(&self.shared.cat);
            cat.snaps.values().filter(|s| s.flags & snap_flags::HIDDEN == 0 && self.shared.vol_by_id(s.volume).is_none()).cloned().collect()
        };
        for s in orphans {
            self.delete_snap_locked(&s)?;
        }
        // Hidden snapshots whose dependents are gone.
        let hidden: Vec<(u64, u64)> =
            lock(&self.shared.cat).snaps.iter().filter(|(_, s)| s.flags & snap_flags::HIDDEN != 0).map(|(k, _)| *k).collect();
        for (b, g) in hidden {
            self.release_origin(b, g)?;
        }
        Ok(())
    }

    /// Volume ids whose branches descend from a snapshot of `vol` (its clones), excluding
    /// `vol` itself.
    pub(crate) fn clones_of(&self, vol: &VolumeState) -> Vec<u64> {
        let cat = lock(&self.shared.cat);
        let mut out = Vec::new();
        for s in cat.snaps.values().filter(|s| s.volume == vol.id) {
            for d in cat.dependents(s.branch, s.gen) {
                if let Some(r) = cat.branches.get(&d) {
                    if r.head_volume != 0 && r.head_volume != vol.id {
                        out.push(r.head_volume);
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Delete a volume (see `delete_volume`); control lock held.
    pub(crate) fn delete_volume_locked(&self, name: &str, recursive: bool) -> Result<()> {
        let v = self.get(name)?;
        if v.writers.load(Ordering::Acquire) > 0 || v.readers.load(Ordering::Acquire) > 0 {
            return Err(Error::Busy { name: name.into(), why: "attached; detach it first" });
        }
        let snaps = lock(&self.shared.cat).visible_of(v.id);
        let clones = self.clones_of(&v);
        if (!snaps.is_empty() || !clones.is_empty()) && !recursive {
            let clone_names: Vec<String> = clones.iter().filter_map(|&c| self.shared.vol_by_id(c)).map(|c| c.name()).collect();
            return Err(Error::HasDependents {
                name: name.into(),
                what: format!(
                    "{} snapshot(s){}",
                    snaps.len(),
                    if clone_names.is_empty() { String::new() } else { format!(" and clone(s) {}", clone_names.join(", ")) }
                ),
            });
        }
        // Nothing is deleted unless every volume that would go is detached.
        let mut all = clones.clone();
        let mut i = 0;
        while i < all.len() {
            if let Some(cv) = self.shared.vol_by_id(all[i]) {
                for c in self.clones_of(&cv) {
                    if !all.contains(&c) {
                        all.push(c);
                    }
                }
                if cv.writers.load(Ordering::Acquire) > 0 || cv.readers.load(Ordering::Acquire) > 0 {
                    return Err(Error::Busy { name: cv.name(), why: "attached (a clone that --recursive would delete); detach it first" });
                }
            }
            i += 1;
        }
        for c in clones {
            if let Some(cv) = self.shared.vol_by_id(c) {
                self.delete_volume_locked(&cv.name(), true)?;
            }
        }
        // Snapshots first (a crash after this leaves the volume without them, a state the
        // operator can see and finish); the ones its own head depends on (after a rollback) are
        // hidden and go when the head does.
        for s in &snaps {
            self.delete_snap_locked(s)?;
        }
        // Pending changes reach the map first, so the sweep below sees every block.
        self.sync()?;
        let b = v.branch();
        let mut br = lock(&self.shared.cat).branches.get(&b).cloned();
        let mut batch = WriteBatch::default();
        batch.delete(volume_key(v.id));
        // An encrypted volume's copy of its family key; the last one gone destroys the key.
        batch.delete(key_key(v.id));
        batch.delete(name_key(name));
        if let Some(r) = br.as_mut() {
            r.head_volume = 0;
            self.put_branch(&mut batch, r);
        }
        {
            let _m = lock(&self.shared.meta);
            self.shared.write_meta(batch)?;
            v.deleted.store(true, Ordering::Release);
            if let Some(r) = br {
                lock(&self.shared.cat).branches.insert(b, r);
            }
            let mut p = v.lock_pending();
            p.cache_clear(&self.shared.cache);
            let frees: Vec<u64> = std::mem::take(&mut p.frees);
            let mut pend = Vec::new();
            for (_, e) in p.map.drain() {
                if e.state != crate::volume::PState::Removed && e.pba != UNMAPPED {
                    pend.push(e.pba);
                }
            }
            drop(p);
            let mut out = Vec::new();
            let mut all = frees;
            all.extend(pend);
            lock(&self.shared.reclaim).retire(all, &mut out);
            self.shared.release_blocks(out);
        }
        if v.encrypted.load(Ordering::Relaxed) {
            // Push the deleted key record out of the metadata files (memtable, write-ahead log
            // and SST files) now rather than at some later compaction: with the master key, an
            // old copy would still decrypt the volume's blocks (FORMAT.md §11.1).
            let k = key_key(v.id);
            let end = key_key(v.id + 1);
            self.shared.db.compact_range(Some(&k[..]), Some(&end[..]));
        }
        if let Ok(mut vols) = self.shared.vols.write() {
            vols.remove(name);
        }
        self.drop_head(b)
    }
}
