//! What the CLI prints: aligned tables and key/value blocks for people, JSON for programs.

use serde::Serialize;

use crate::proto;
use crate::units::{format_size, percent};

/// Print `v` as pretty JSON on stdout.
pub fn json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// An aligned table: a header line, then rows; columns separated by two spaces; no trailing blanks.
pub fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            let last = i + 1 == n;
            match headers[i].1 {
                Align::Left => {
                    s.push_str(c);
                    if !last {
                        s.push_str(&" ".repeat(pad));
                    }
                }
                Align::Right => {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            if !last {
                s.push_str("  ");
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.iter().map(|(h, _)| *h).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Key/value lines with the values aligned (`qemu-img info` style).
pub fn kv(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "2026-11-26 18:04:05 UTC" from nanoseconds since the epoch.
pub fn format_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// "2026-11-26 19:04:05 CET": local time (TZ, else /etc/localtime) from nanoseconds since the
/// epoch, with the zone's abbreviation; UTC ([`format_time`]) if the conversion fails.
pub fn format_local_time(ns: u64) -> String {
    let Ok(secs) = libc::time_t::try_from(ns / 1_000_000_000) else { return format_time(ns) };
    // SAFETY: `libc::tm` is plain old data (integers and a pointer), for which all zeros is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to locals that outlive the call; localtime_r (unlike localtime)
    // writes only into `tm`.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return format_time(ns);
    }
    let zone = if tm.tm_zone.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null tm_zone points to a NUL-terminated zone abbreviation that libc
        // keeps alive (its tzname storage); we copy it at once.
        unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }.to_string_lossy().into_owned()
    };
    let s = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {zone}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    );
    s.trim_end().to_string()
}

fn attachment_short(v: &proto::Volume) -> String {
    match &v.attachment {
        Some(a) => format!("{} {}", if a.read_only { "ro" } else { "rw" }, a.socket),
        None if v.attached_rw => "rw (in use)".into(),
        None if v.attached_ro > 0 => "ro (in use)".into(),
        None => "-".into(),
    }
}

pub fn volumes_table(vols: &[proto::Volume]) -> String {
    if vols.is_empty() {
        return "no volumes".into();
    }
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                percent(v.allocated_bytes, v.size_bytes),
                attachment_short(v),
            ]
        })
        .collect();
    table(
        &[("NAME", Align::Left), ("SIZE", Align::Right), ("ALLOCATED", Align::Right), ("USE", Align::Right), ("ATTACHED", Align::Left)],
        &rows,
    )
}

fn bytes_exact(n: u64) -> String {
    format!("{} ({n} bytes)", format_size(n))
}

fn bytes_exact_and(n: u64, extra: &str) -> String {
    format!("{} ({n} bytes, {extra})", format_size(n))
}

pub fn volume_details(v: &proto::Volume) -> String {
    let mut p = vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("virtual size", bytes_exact(v.size_bytes)),
        ("allocated", bytes_exact_and(v.allocated_bytes, &format!("{} of the virtual size", percent(v.allocated_bytes, v.size_bytes)))),
        ("created", format_time(v.created_ns)),
        ("encrypted", if v.encrypted { "yes (AES-256-GCM, 4096-byte logical blocks)".into() } else { "no".into() }),
    ];
    let state = match &v.attachment {
        Some(a) => format!(
            "{} at {} ({} queue{}, {})",
            if a.read_only { "read-only" } else { "read-write" },
            a.socket,
            a.num_queues,
            if a.num_queues == 1 { "" } else { "s" },
            if a.connected { "front end connected" } else { "waiting for a front end" }
        ),
        None if v.attached_rw => "open read-write (import or another user)".into(),
        None if v.attached_ro > 0 => format!("open read-only by {} user(s)", v.attached_ro),
        None => "no".into(),
    };
    p.push(("attached", state));
    kv(&p)
}

pub fn pool_status(s: &proto::PoolStatusResponse) -> String {
    let provisioned: u64 = s.volumes.iter().map(|v| v.size_bytes).sum();
    let mut out = kv(&[
        ("pool", s.path.clone()),
        ("metadata", s.meta_dir.clone()),
        ("uuid", s.uuid.clone()),
        ("format version", s.format_version.to_string()),
        ("total", bytes_exact(s.total_bytes)),
        ("used", bytes_exact_and(s.used_bytes, &percent(s.used_bytes, s.total_bytes))),
        ("free", bytes_exact(s.free_bytes)),
        ("pending free", bytes_exact(s.pending_free_bytes)),
        ("snapshots", bytes_exact_and(s.snapshot_bytes, "held only by snapshots")),
        (
            "volumes",
            format!("{} ({} provisioned, {} of the pool)", s.volumes.len(), format_size(provisioned), percent(provisioned, s.total_bytes)),
        ),
    ]);
    if let Some(m) = &s.memory {
        out.push_str("\n\n");
        out.push_str(&kv(&[
            ("daemon memory", format!("{} resident", format_size(m.rss_bytes))),
            ("map cache", format!("{} ({} entries)", format_size(m.map_cache_bytes), m.map_cache_entries)),
            (
                "RocksDB",
                format!(
                    "block cache {}, memtables {}, table readers {}",
                    format_size(m.rocksdb_block_cache_bytes),
                    format_size(m.rocksdb_memtable_bytes),
                    format_size(m.rocksdb_table_readers_bytes)
                ),
            ),
            ("cache budget", format_size(m.cache_budget_bytes)),
            ("uncommitted", format!("{} ({} entries)", format_size(m.pending_bytes), m.pending_entries)),
            ("heap", format!("{} in use, {} free", format_size(m.heap_in_use_bytes), format_size(m.heap_free_bytes))),
        ]));
    }
    if !s.volumes.is_empty() {
        let rows: Vec<Vec<String>> = s
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    format_size(v.size_bytes),
                    format_size(v.allocated_bytes),
                    percent(v.allocated_bytes, s.total_bytes),
                ]
            })
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(
            &[("VOLUME", Align::Left), ("SIZE", Align::Right), ("ALLOCATED", Align::Right), ("OF POOL", Align::Right)],
            &rows,
        ));
    }
    out
}

/// `VOL@SNAP`.
pub fn snap_name(s: &proto::Snapshot) -> String {
    format!("{}@{}", s.volume, s.name)
}

pub fn snapshots_table(snaps: &[proto::Snapshot]) -> String {
    if snaps.is_empty() {
        return "no snapshots".into();
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.volume.clone(),
                s.name.clone(),
                format_local_time(s.created_ns),
                format_size(s.size_bytes),
                format_size(s.referenced_bytes),
                format_size(s.exclusive_bytes),
                if s.clones.is_empty() { "-".into() } else { s.clones.join(",") },
            ]
        })
        .collect();
    table(
        &[
            ("VOLUME", Align::Left),
            ("SNAPSHOT", Align::Left),
            ("CREATED", Align::Left),
            ("SIZE", Align::Right),
            ("REFERENCED", Align::Right),
            ("EXCLUSIVE", Align::Right),
            ("CLONES", Align::Left),
        ],
        &rows,
    )
}

/// One snapshot in a few lines (`snap create`).
pub fn snapshot_details(s: &proto::Snapshot) -> String {
    kv(&[
        ("snapshot", snap_name(s)),
        ("created", format_local_time(s.created_ns)),
        ("size", bytes_exact(s.size_bytes)),
        ("referenced", bytes_exact(s.referenced_bytes)),
        ("exclusive", bytes_exact(s.exclusive_bytes)),
        ("clones", if s.clones.is_empty() { "-".into() } else { s.clones.join(", ") }),
    ])
}

/// Changed ranges (bytes) and a total line.
pub fn diff_table(d: &proto::DiffResponse) -> String {
    let n = d.ranges.len();
    let total = format!("total: {n} range{}, {} changed", if n == 1 { "" } else { "s" }, bytes_exact(d.changed_bytes));
    if d.ranges.is_empty() {
        return format!("no changes\n{total}");
    }
    let rows: Vec<Vec<String>> = d.ranges.iter().map(|r| vec![r.offset.to_string(), r.length.to_string()]).collect();
    format!("{}\n{total}", table(&[("OFFSET", Align::Right), ("LENGTH", Align::Right)], &rows))
}

pub fn check_report(c: &proto::CheckResponse) -> String {
    let mut out = String::new();
    for e in &c.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    if c.leaked_blocks > 0 {
        out.push_str(&format!(
            "leak: {} blocks ({}) are marked used but referenced by nothing\n",
            c.leaked_blocks,
            format_size(c.leaked_blocks * 4096)
        ));
    }
    out.push_str(&kv(&[
        ("records", c.records.to_string()),
        ("map entries", c.map_entries.to_string()),
        ("referenced blocks", c.referenced_blocks.to_string()),
        ("allocated blocks", c.allocated_blocks.to_string()),
        ("leaked blocks", c.leaked_blocks.to_string()),
    ]));
    out.push('\n');
    if c.clean {
        out.push_str("pool is clean");
    } else {
        out.push_str(&format!("pool is NOT clean: {} error(s), {} leaked block(s)", c.errors.len(), c.leaked_blocks));
    }
    out
}

pub fn devices_table(devs: &[proto::Attachment]) -> String {
    if devs.is_empty() {
        return "no devices".into();
    }
    let rows: Vec<Vec<String>> = devs
        .iter()
        .map(|a| {
            let s = a.stats.unwrap_or_default();
            vec![
                a.volume.clone(),
                if a.read_only { "ro".into() } else { "rw".into() },
                a.num_queues.to_string(),
                if a.connected { "yes".into() } else { "no".into() },
                s.reads.to_string(),
                s.writes.to_string(),
                format_size(s.bytes_read),
                format_size(s.bytes_written),
                s.errors.to_string(),
                a.socket.clone(),
            ]
        })
        .collect();
    table(
        &[
            ("VOLUME", Align::Left),
            ("MODE", Align::Left),
            ("QUEUES", Align::Right),
            ("CONNECTED", Align::Left),
            ("READS", Align::Right),
            ("WRITES", Align::Right),
            ("READ", Align::Right),
            ("WRITTEN", Align::Right),
            ("ERRORS", Align::Right),
            ("SOCKET", Align::Left),
        ],
        &rows,
    )
}

pub fn attachment(a: &proto::Attachment) -> String {
    format!(
        "attached {} {} at {} ({} queue{}, queue size {}{}{})",
        a.volume,
        if a.read_only { "read-only" } else { "read-write" },
        a.socket,
        a.num_queues,
        if a.num_queues == 1 { "" } else { "s" },
        a.queue_size,
        if a.threads != 0 && a.threads != a.num_queues { format!(", {} worker thread{}", a.threads, if a.threads == 1 { "" } else { "s" }) } else { String::new() },
        if a.pin_memory { ", guest memory pinned" } else { "" }
    )
}

/// QoS limits in one line: "iops-total 2000/s (burst 20000 over 10 s), bps-read 100.0 MiB/s".
pub fn limits_text(l: Option<&proto::QosLimits>) -> String {
    let Some(l) = l else { return "unlimited".into() };
    let mut parts = Vec::new();
    for (name, v, bytes) in [
        ("iops-total", &l.iops_total, false),
        ("iops-read", &l.iops_read, false),
        ("iops-write", &l.iops_write, false),
        ("bps-total", &l.bps_total, true),
        ("bps-read", &l.bps_read, true),
        ("bps-write", &l.bps_write, true),
    ] {
        let Some(v) = v else { continue };
        let amount = |n: u64| if bytes { format_size(n) } else { n.to_string() };
        let mut p = format!("{name} {}/s", amount(v.rate));
        if v.burst > 0 {
            p.push_str(&format!(" (burst {}", amount(v.burst)));
            if v.burst_secs > 0 {
                p.push_str(&format!(" over {} s", v.burst_secs));
            }
            p.push(')');
        }
        parts.push(p);
    }
    if parts.is_empty() {
        return "unlimited".into();
    }
    if l.iops_size > 0 {
        parts.push(format!("iops-size {}", format_size(l.iops_size)));
    }
    parts.join(", ")
}

/// A volume's QoS in one line: its limits and group.
pub fn qos_summary(q: &proto::QosInfo) -> String {
    let mut s = limits_text(q.limits.as_ref());
    if !q.group.is_empty() {
        s.push_str(&format!("; group {} ({})", q.group, limits_text(q.group_limits.as_ref())));
    }
    s
}

/// Seconds with millisecond precision from nanoseconds.
fn secs(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

pub fn qos_details(q: &proto::QosInfo) -> String {
    let st = q.stats.unwrap_or_default();
    let group = if q.group.is_empty() { "-".into() } else { format!("{}: {}", q.group, limits_text(q.group_limits.as_ref())) };
    kv(&[
        ("volume", format!("{} (id {})", q.volume, q.volume_id)),
        ("limits", limits_text(q.limits.as_ref())),
        ("group", group),
        ("reads", format!("{} ({})", st.read_ops, format_size(st.read_bytes))),
        ("writes", format!("{} ({})", st.write_ops, format_size(st.write_bytes))),
        ("throttled", format!("{} in {} wait(s)", secs(st.throttled_ns), st.throttle_events)),
    ])
}

pub fn qos_groups_table(groups: &[proto::QosGroup]) -> String {
    if groups.is_empty() {
        return "no QoS groups".into();
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| vec![g.name.clone(), limits_text(g.limits.as_ref()), if g.volumes.is_empty() { "-".into() } else { g.volumes.join(",") }])
        .collect();
    table(&[("GROUP", Align::Left), ("LIMITS", Align::Left), ("VOLUMES", Align::Left)], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_limits_read_well() {
        assert_eq!(limits_text(None), "unlimited");
        assert_eq!(limits_text(Some(&proto::QosLimits::default())), "unlimited");
        let l = proto::QosLimits {
            iops_total: Some(proto::QosLimit { rate: 2000, burst: 20000, burst_secs: 10 }),
            bps_read: Some(proto::QosLimit { rate: 100 << 20, burst: 0, burst_secs: 0 }),
            iops_size: 65536,
            ..Default::default()
        };
        assert_eq!(limits_text(Some(&l)), "iops-total 2000/s (burst 20000 over 10 s), bps-read 100.0 MiB/s, iops-size 64.0 KiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &[("NAME", Align::Left), ("SIZE", Align::Right), ("X", Align::Left)],
            &[vec!["a".into(), "10.0 GiB".into(), "-".into()], vec!["long-name".into(), "4.0 KiB".into(), "rw".into()]],
        );
        assert_eq!(t, "NAME           SIZE  X\na          10.0 GiB  -\nlong-name   4.0 KiB  rw");
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400_000_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_795_716_245_000_000_000), "2026-11-26 18:04:05 UTC");
    }

    #[test]
    fn local_times_look_like_utc_ones() {
        let t = format_local_time(1_795_716_245_000_000_000);
        assert!(t.starts_with("2026-11-2"), "{t}");
        assert_eq!(t.as_bytes()[10], b' ', "{t}");
        assert_eq!(&t[13..14], ":", "{t}");
    }

    #[test]
    fn diffs_read_well() {
        let d = proto::DiffResponse {
            ranges: vec![proto::DiffRange { offset: 0, length: 8192 }, proto::DiffRange { offset: 1 << 20, length: 4096 }],
            changed_bytes: 12288,
        };
        assert_eq!(diff_table(&d), " OFFSET  LENGTH\n      0    8192\n1048576    4096\ntotal: 2 ranges, 12.0 KiB (12288 bytes) changed");
        assert_eq!(diff_table(&proto::DiffResponse::default()), "no changes\ntotal: 0 ranges, 0 B (0 bytes) changed");
    }

    #[test]
    fn key_values() {
        assert_eq!(kv(&[("a", "1".into()), ("long", "2".into())]), "a:    1\nlong: 2");
    }
}
