//! The daemon's QoS settings: each volume's limits and group, the groups' limits, their
//! buckets (`vblk_vhost::qos`), and their persistence.
//!
//! Settings live in `qos.json` inside the pool's metadata directory (beside RocksDB's files,
//! which RocksDB ignores; `pool create --force` removes it with the metadata), so they survive a
//! daemon restart without touching the engine's format. Volumes are keyed by id, which
//! survives renames and is never reused. Every change is written to `qos.json.tmp`, fsynced,
//! renamed over `qos.json` and the directory fsynced, before it is applied; a failed write
//! changes nothing. A file naming another pool (its uuid) is ignored with a warning; a file
//! that does not parse stops the daemon (guests must not silently lose their limits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tonic::Status;
use tracing::{info, warn};
use vblk_vhost::qos::{Limit, LimitKind, Limits, QosGroup, VolumeQos};

use crate::pool_file::{self, PoolFile};
use crate::proto;

/// File name inside the metadata directory.
pub const FILE_NAME: &str = "qos.json";
const FORMAT_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// API messages

fn limit_msg(l: Limit) -> proto::QosLimit {
    proto::QosLimit { rate: l.rate_per_sec, burst: l.burst, burst_secs: l.burst_secs }
}

pub fn limits_msg(l: &Limits) -> proto::QosLimits {
    let g = |k| l.get(k).map(limit_msg);
    proto::QosLimits {
        iops_total: g(LimitKind::IopsTotal),
        iops_read: g(LimitKind::IopsRead),
        iops_write: g(LimitKind::IopsWrite),
        bps_total: g(LimitKind::BpsTotal),
        bps_read: g(LimitKind::BpsRead),
        bps_write: g(LimitKind::BpsWrite),
        iops_size: l.iops_size,
    }
}

/// The limits of an API message (the inverse of [`limits_msg`]).
#[cfg(test)]
pub fn limits_of_msg(m: &proto::QosLimits) -> Limits {
    let mut l = Limits::default();
    l.iops_size = m.iops_size;
    for (k, v) in [
        (LimitKind::IopsTotal, &m.iops_total),
        (LimitKind::IopsRead, &m.iops_read),
        (LimitKind::IopsWrite, &m.iops_write),
        (LimitKind::BpsTotal, &m.bps_total),
        (LimitKind::BpsRead, &m.bps_read),
        (LimitKind::BpsWrite, &m.bps_write),
    ] {
        l.set(k, v.map(|v| Limit { rate_per_sec: v.rate, burst: v.burst, burst_secs: v.burst_secs }));
    }
    l
}

/// Apply a change (clear, then each limit mentioned, then iops-size) to `cur`; validated.
pub fn apply_change(cur: Limits, ch: &proto::QosChange) -> Result<Limits, Status> {
    let mut l = if ch.clear { Limits::default() } else { cur };
    for c in &ch.limits {
        let kind = LimitKind::from_name(&c.kind).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown limit {:?} (one of iops-total, iops-read, iops-write, bps-total, bps-read, bps-write)",
                c.kind
            ))
        })?;
        let new = match (c.rate, l.get(kind)) {
            (Some(0), _) => {
                if c.burst.is_some_and(|b| b > 0) || c.burst_secs.is_some_and(|s| s > 0) {
                    return Err(Status::invalid_argument(format!("{kind}: a burst needs a rate (0 removes the limit)")));
                }
                None
            }
            (Some(rate), old) => {
                let old = old.unwrap_or(Limit::rate(rate));
                Some(Limit { rate_per_sec: rate, burst: c.burst.unwrap_or(old.burst), burst_secs: c.burst_secs.unwrap_or(old.burst_secs) })
            }
            (None, Some(old)) => {
                let burst = c.burst.unwrap_or(old.burst);
                // Removing the burst removes its length too.
                let burst_secs = if burst == 0 { 0 } else { c.burst_secs.unwrap_or(old.burst_secs) };
                Some(Limit { burst, burst_secs, ..old })
            }
            (None, None) if c.burst.is_some() || c.burst_secs.is_some() => {
                return Err(Status::invalid_argument(format!("{kind}: no {kind} limit is set; give its rate (--{kind}) with the burst")));
            }
            (None, None) => None,
        };
        l.set(kind, new);
    }
    if let Some(s) = ch.iops_size {
        l.iops_size = s;
    }
    l.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(l)
}

pub fn stats_msg(q: &VolumeQos) -> proto::QosStats {
    let s = q.stats();
    proto::QosStats {
        read_ops: s.read_ops,
        write_ops: s.write_ops,
        read_bytes: s.read_bytes,
        write_bytes: s.write_bytes,
        throttled_ns: s.throttled_ns,
        throttle_events: s.throttle_events,
    }
}

/// Group names follow the volume name rules.
fn validate_group_name(name: &str) -> Result<(), Status> {
    vblk_engine::format::validate_name(name).map_err(|e| Status::invalid_argument(format!("QoS group: {e}")))
}

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LimitFile {
    rate: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    burst: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    burst_secs: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LimitsFile {
    /// By kind name ("iops-total", ...).
    #[serde(default)]
    limits: BTreeMap<String, LimitFile>,
    #[serde(default, skip_serializing_if = "is_zero")]
    iops_size: u64,
}

impl LimitsFile {
    fn of(l: &Limits) -> LimitsFile {
        LimitsFile {
            limits: l
                .iter()
                .map(|(k, v)| (k.name().to_string(), LimitFile { rate: v.rate_per_sec, burst: v.burst, burst_secs: v.burst_secs }))
                .collect(),
            iops_size: l.iops_size,
        }
    }

    fn limits(&self, what: &str) -> anyhow::Result<Limits> {
        let mut l = Limits::default();
        l.iops_size = self.iops_size;
        for (name, v) in &self.limits {
            let k = LimitKind::from_name(name).ok_or_else(|| anyhow::anyhow!("{what}: unknown limit {name:?}"))?;
            l.set(k, Some(Limit { rate_per_sec: v.rate, burst: v.burst, burst_secs: v.burst_secs }));
        }
        l.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(l)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeFile {
    /// The name when last changed (informational: volumes are keyed by id).
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(flatten)]
    limits: LimitsFile,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct QosFile {
    version: u32,
    pool_uuid: String,
    #[serde(default)]
    groups: BTreeMap<String, LimitsFile>,
    /// By volume id (decimal).
    #[serde(default)]
    volumes: BTreeMap<String, VolumeFile>,
}

impl PoolFile for QosFile {
    const VERSION: u32 = FORMAT_VERSION;
    const WHAT: &'static str = "QoS settings";
    const HINT: &'static str = "fix or remove the file; it holds the volumes' QoS limits";
    fn version(&self) -> u32 {
        self.version
    }
    fn pool_uuid(&self) -> &str {
        &self.pool_uuid
    }
}

// ---------------------------------------------------------------------------------------------
// The registry

struct VolEntry {
    name: String,
    qos: Arc<VolumeQos>,
    group: Option<String>,
}

/// Whether a volume with these settings has anything to persist.
fn has_settings(group: &Option<String>, l: &Limits) -> bool {
    group.is_some() || !l.is_unlimited() || l.iops_size != 0
}

#[derive(Default)]
struct Inner {
    volumes: BTreeMap<u64, VolEntry>,
    groups: BTreeMap<String, Arc<QosGroup>>,
}

/// What `qos set` does to a volume's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    Keep,
    Join(String),
    Leave,
}

/// Every volume's and group's QoS in this daemon.
pub struct QosRegistry {
    path: PathBuf,
    pool_uuid: String,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl QosRegistry {
    /// Load `META_DIR/qos.json` (if any) for the pool `pool_uuid` whose volumes (id, name) are
    /// `volumes`; settings of volumes that no longer exist are dropped.
    pub fn load(meta_dir: &Path, pool_uuid: &str, volumes: &[(u64, String)]) -> anyhow::Result<QosRegistry> {
        let path = meta_dir.join(FILE_NAME);
        let reg = QosRegistry { path: path.clone(), pool_uuid: pool_uuid.to_string(), inner: Mutex::new(Inner::default()) };
        let Some(f) = pool_file::read::<QosFile>(&path, pool_uuid)? else { return Ok(reg) };
        let mut inner = Inner::default();
        for (name, l) in &f.groups {
            validate_group_name(name).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
            let g = QosGroup::new(l.limits(&format!("{}: group {name}", path.display()))?)?;
            inner.groups.insert(name.clone(), g);
        }
        let names: BTreeMap<u64, &String> = volumes.iter().map(|(id, n)| (*id, n)).collect();
        for (id, v) in &f.volumes {
            let what = format!("{}: volume {id} ({})", path.display(), v.name);
            let id: u64 = id.parse().map_err(|_| anyhow::anyhow!("{what}: not a volume id"))?;
            let Some(name) = names.get(&id) else {
                warn!(volume = %v.name, id, "QoS settings of a volume that no longer exists dropped");
                continue;
            };
            let qos = VolumeQos::new(v.limits.limits(&what)?)?;
            if let Some(g) = &v.group {
                let grp = inner.groups.get(g).ok_or_else(|| anyhow::anyhow!("{what}: no group {g:?}"))?;
                qos.set_group(Some(grp.clone()));
            }
            inner.volumes.insert(id, VolEntry { name: (*name).clone(), qos, group: v.group.clone() });
        }
        info!(file = %path.display(), volumes = inner.volumes.len(), groups = inner.groups.len(), "QoS settings loaded");
        *lock(&reg.inner) = inner;
        Ok(reg)
    }

    /// The file as it would be with `inner`'s settings.
    fn snapshot(&self, inner: &Inner) -> QosFile {
        QosFile {
            version: FORMAT_VERSION,
            pool_uuid: self.pool_uuid.clone(),
            groups: inner.groups.iter().map(|(n, g)| (n.clone(), LimitsFile::of(&g.limits()))).collect(),
            volumes: inner
                .volumes
                .iter()
                .filter(|(_, v)| has_settings(&v.group, &v.qos.limits()))
                .map(|(id, v)| {
                    (id.to_string(), VolumeFile { name: v.name.clone(), group: v.group.clone(), limits: LimitsFile::of(&v.qos.limits()) })
                })
                .collect(),
        }
    }

    fn save(&self, f: &QosFile) -> Result<(), Status> {
        pool_file::write(&self.path, f)
    }

    /// The QoS of volume `id` (created unlimited on first use).
    pub fn volume(&self, id: u64, name: &str) -> Arc<VolumeQos> {
        let mut inner = lock(&self.inner);
        inner.volumes.entry(id).or_insert_with(|| VolEntry { name: name.to_string(), qos: VolumeQos::unlimited(), group: None }).qos.clone()
    }

    /// Change volume `id`'s limits and group: validated, persisted, then applied live.
    pub fn set(&self, id: u64, name: &str, change: &proto::QosChange, group: &GroupChange) -> Result<(), Status> {
        let mut inner = lock(&self.inner);
        let cur = inner.volumes.get(&id).map(|v| (v.qos.limits(), v.group.clone())).unwrap_or_default();
        let limits = apply_change(cur.0, change)?;
        let new_group = match group {
            GroupChange::Keep => cur.1.clone(),
            GroupChange::Leave => None,
            GroupChange::Join(g) => {
                validate_group_name(g)?;
                if !inner.groups.contains_key(g) {
                    return Err(Status::not_found(format!("no QoS group {g:?} (create it with `vblk qos group create {g}`)")));
                }
                Some(g.clone())
            }
        };
        let group_arc = new_group.as_ref().and_then(|g| inner.groups.get(g).cloned());
        // Persist the new state first: a failed write changes nothing.
        let mut file = self.snapshot(&inner);
        let entry = VolumeFile { name: name.to_string(), group: new_group.clone(), limits: LimitsFile::of(&limits) };
        if has_settings(&entry.group, &limits) {
            file.volumes.insert(id.to_string(), entry);
        } else {
            file.volumes.remove(&id.to_string());
        }
        self.save(&file)?;
        let e = inner.volumes.entry(id).or_insert_with(|| VolEntry { name: name.to_string(), qos: VolumeQos::unlimited(), group: None });
        e.name = name.to_string();
        e.qos.set_limits(limits).map_err(|e| Status::invalid_argument(e.to_string()))?;
        e.qos.set_group(group_arc);
        e.group = new_group;
        info!(volume = name, id, limits = ?limits, group = ?e.group, "QoS set");
        Ok(())
    }

    /// The API view of volume `id`'s QoS.
    pub fn info(&self, id: u64, name: &str) -> proto::QosInfo {
        let inner = lock(&self.inner);
        let Some(v) = inner.volumes.get(&id) else {
            return proto::QosInfo {
                volume: name.to_string(),
                volume_id: id,
                limits: Some(limits_msg(&Limits::default())),
                stats: Some(proto::QosStats::default()),
                ..Default::default()
            };
        };
        let group_limits = v.group.as_ref().and_then(|g| inner.groups.get(g)).map(|g| limits_msg(&g.limits()));
        proto::QosInfo {
            volume: name.to_string(),
            volume_id: id,
            limits: Some(limits_msg(&v.qos.limits())),
            group: v.group.clone().unwrap_or_default(),
            group_limits,
            stats: Some(stats_msg(&v.qos)),
        }
    }

    /// Volume `id` was deleted: forget its settings.
    pub fn forget(&self, id: u64) -> Result<(), Status> {
        let mut inner = lock(&self.inner);
        let Some(e) = inner.volumes.remove(&id) else { return Ok(()) };
        if has_settings(&e.group, &e.qos.limits()) {
            let file = self.snapshot(&inner);
            self.save(&file)?;
        }
        Ok(())
    }

    /// Volume `id` was renamed (the file shows names for people).
    pub fn renamed(&self, id: u64, new_name: &str) {
        let mut inner = lock(&self.inner);
        let Some(e) = inner.volumes.get_mut(&id) else { return };
        e.name = new_name.to_string();
        if has_settings(&e.group, &e.qos.limits()) {
            let file = self.snapshot(&inner);
            if let Err(e) = self.save(&file) {
                warn!("QoS settings: {}", e.message());
            }
        }
    }

    fn group_msg(inner: &Inner, name: &str, g: &QosGroup) -> proto::QosGroup {
        proto::QosGroup {
            name: name.to_string(),
            limits: Some(limits_msg(&g.limits())),
            volumes: inner.volumes.values().filter(|v| v.group.as_deref() == Some(name)).map(|v| v.name.clone()).collect(),
        }
    }

    pub fn group_create(&self, name: &str, change: &proto::QosChange) -> Result<proto::QosGroup, Status> {
        validate_group_name(name)?;
        let mut inner = lock(&self.inner);
        if inner.groups.contains_key(name) {
            return Err(Status::already_exists(format!("QoS group {name:?} exists")));
        }
        let limits = apply_change(Limits::default(), change)?;
        let mut file = self.snapshot(&inner);
        file.groups.insert(name.to_string(), LimitsFile::of(&limits));
        self.save(&file)?;
        let g = QosGroup::new(limits).map_err(|e| Status::invalid_argument(e.to_string()))?;
        inner.groups.insert(name.to_string(), g.clone());
        info!(group = name, limits = ?limits, "QoS group created");
        Ok(Self::group_msg(&inner, name, &g))
    }

    pub fn group_set(&self, name: &str, change: &proto::QosChange) -> Result<proto::QosGroup, Status> {
        let inner = lock(&self.inner);
        let g = inner.groups.get(name).cloned().ok_or_else(|| Status::not_found(format!("no QoS group {name:?}")))?;
        let limits = apply_change(g.limits(), change)?;
        let mut file = self.snapshot(&inner);
        file.groups.insert(name.to_string(), LimitsFile::of(&limits));
        self.save(&file)?;
        g.set_limits(limits).map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(group = name, limits = ?limits, "QoS group set");
        Ok(Self::group_msg(&inner, name, &g))
    }

    /// Delete a group nobody uses.
    pub fn group_delete(&self, name: &str) -> Result<(), Status> {
        let mut inner = lock(&self.inner);
        if !inner.groups.contains_key(name) {
            return Err(Status::not_found(format!("no QoS group {name:?}")));
        }
        let members: Vec<&str> = inner.volumes.values().filter(|v| v.group.as_deref() == Some(name)).map(|v| v.name.as_str()).collect();
        if !members.is_empty() {
            return Err(Status::failed_precondition(format!(
                "QoS group {name:?} is used by volume(s) {}; move them out first (`vblk qos set VOL --no-group`)",
                members.join(", ")
            )));
        }
        let mut file = self.snapshot(&inner);
        file.groups.remove(name);
        self.save(&file)?;
        inner.groups.remove(name);
        info!(group = name, "QoS group deleted");
        Ok(())
    }

    pub fn groups(&self) -> Vec<proto::QosGroup> {
        let inner = lock(&self.inner);
        inner.groups.iter().map(|(n, g)| Self::group_msg(&inner, n, g)).collect()
    }

    /// The group a volume would join exists (checked before creating a volume).
    pub fn group_exists(&self, name: &str) -> bool {
        lock(&self.inner).groups.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(items: &[crate::cli_args::LimitOptions]) -> proto::QosChange {
        proto::QosChange {
            clear: false,
            limits: items
                .iter()
                .map(|&(k, rate, burst, burst_secs)| proto::QosLimitChange { kind: k.into(), rate, burst, burst_secs })
                .collect(),
            iops_size: None,
        }
    }

    #[test]
    fn changes_merge_into_the_limits() {
        let l = apply_change(Limits::default(), &change(&[("iops-total", Some(2000), Some(10_000), Some(5))])).unwrap();
        assert_eq!(l.get(LimitKind::IopsTotal), Some(Limit { rate_per_sec: 2000, burst: 10_000, burst_secs: 5 }));
        // A new rate keeps the burst; other limits are untouched; 0 removes.
        let l2 = apply_change(l, &change(&[("iops-total", Some(3000), None, None), ("bps-read", Some(1 << 20), None, None)])).unwrap();
        assert_eq!(l2.get(LimitKind::IopsTotal), Some(Limit { rate_per_sec: 3000, burst: 10_000, burst_secs: 5 }));
        assert_eq!(l2.get(LimitKind::BpsRead), Some(Limit::rate(1 << 20)));
        let l3 = apply_change(l2, &change(&[("iops-total", Some(0), None, None)])).unwrap();
        assert_eq!(l3.get(LimitKind::IopsTotal), None);
        // Removing the burst removes its length.
        let l4 = apply_change(l, &change(&[("iops-total", None, Some(0), None)])).unwrap();
        assert_eq!(l4.get(LimitKind::IopsTotal), Some(Limit::rate(2000)));
        // Clear first.
        let mut c = change(&[("bps-write", Some(100), None, None)]);
        c.clear = true;
        c.iops_size = Some(4096);
        let l5 = apply_change(l2, &c).unwrap();
        assert_eq!(l5.iter().count(), 1);
        assert_eq!(l5.iops_size, 4096);
        // Errors.
        assert!(apply_change(Limits::default(), &change(&[("iops-totl", Some(1), None, None)])).is_err());
        assert!(apply_change(Limits::default(), &change(&[("iops-read", None, Some(10), None)])).is_err());
        assert!(apply_change(Limits::default(), &change(&[("iops-read", Some(0), Some(10), None)])).is_err());
        assert!(apply_change(Limits::default(), &change(&[("iops-read", Some(10), None, Some(3))])).is_err());
        assert_eq!(limits_of_msg(&limits_msg(&l5)), l5);
    }

    #[test]
    fn settings_persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let vols = vec![(1u64, "a".to_string()), (2, "b".to_string())];
        let r = QosRegistry::load(dir.path(), "uuid-1", &vols).unwrap();
        r.group_create("tenant", &change(&[("iops-total", Some(5000), None, None)])).unwrap();
        r.set(1, "a", &change(&[("bps-total", Some(10 << 20), Some(1 << 20), Some(2))]), &GroupChange::Join("tenant".into())).unwrap();
        r.set(2, "b", &change(&[("iops-read", Some(100), None, None)]), &GroupChange::Keep).unwrap();
        let qa = r.volume(1, "a");
        assert!(qa.is_active() && qa.group().is_some());
        assert!(r.group_delete("tenant").is_err(), "a group in use cannot be deleted");
        assert!(r.set(2, "b", &proto::QosChange::default(), &GroupChange::Join("nope".into())).is_err());
        drop(r);

        // Volume 2 is gone after the restart; volume 1 keeps its limits and group.
        let r = QosRegistry::load(dir.path(), "uuid-1", &vols[..1]).unwrap();
        let i = r.info(1, "a");
        assert_eq!(i.group, "tenant");
        assert_eq!(
            limits_of_msg(i.limits.as_ref().unwrap()).get(LimitKind::BpsTotal),
            Some(Limit { rate_per_sec: 10 << 20, burst: 1 << 20, burst_secs: 2 })
        );
        assert_eq!(limits_of_msg(i.group_limits.as_ref().unwrap()).get(LimitKind::IopsTotal), Some(Limit::rate(5000)));
        assert_eq!(r.groups()[0].volumes, vec!["a".to_string()]);
        assert!(r.volume(1, "a").is_active());
        assert!(!r.volume(2, "b").is_active());
        // Leaving the group and clearing the limits drops the volume from the file.
        let c = proto::QosChange { clear: true, ..Default::default() };
        r.set(1, "a", &c, &GroupChange::Leave).unwrap();
        assert!(!r.volume(1, "a").is_active());
        r.group_delete("tenant").unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        let f: QosFile = serde_json::from_str(&text).unwrap();
        assert!(f.volumes.is_empty() && f.groups.is_empty(), "{text}");
        assert!(!dir.path().join("qos.json.tmp").exists());

        // Another pool's file is ignored; a broken one is an error.
        let r = QosRegistry::load(dir.path(), "uuid-2", &vols).unwrap();
        assert!(r.groups().is_empty());
        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        assert!(QosRegistry::load(dir.path(), "uuid-1", &vols).is_err());
    }
}
