//! QoS end to end: the real daemon, limits set with the CLI (at `vol create`, live with
//! `vblk qos set`, through groups), measured from the host by a libblkio client keeping 4 KiB
//! random reads in flight at QD32 (tests/src/lib.rs `run_load`).
//!
//! The tests measure rates, so they run one at a time (`SERIAL`) rather than share the CPUs.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vblk_tests::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const S: fn(f64) -> Duration = Duration::from_secs_f64;

/// A daemon with a 256 MiB pool and, for each `(name, create args, queues)`, a 64 MiB volume
/// attached at DIR/NAME.sock.
fn setup(vols: &[(&str, &[&str], u16)]) -> (tempfile::TempDir, Daemon, Vec<PathBuf>) {
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    let mut socks = Vec::new();
    for (name, args, queues) in vols {
        let mut a = vec!["vol", "create", name, "64M"];
        a.extend_from_slice(args);
        daemon.cli(&a).unwrap();
        let sock = d.path().join(format!("{name}.sock"));
        let q = queues.to_string();
        daemon.cli(&["attach", name, "--socket", sock.to_str().unwrap(), "--queues", &q]).unwrap();
        wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
        socks.push(sock);
    }
    (d, daemon, socks)
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got / want - 1.0).abs() <= tol
}

#[test]
fn iops_limit_is_accurate_at_qd32() {
    let _s = serial();
    let (_d, daemon, socks) = setup(&[("v", &["--iops-total", "2000"], 1)]);
    let t = run_load(&socks[0], &Load::randread_qd32(S(5.0))).unwrap();
    let overall = t.total() as f64 / t.len().as_secs_f64();
    let steady = t.rate(S(0.5), t.len());
    eprintln!("2000 IOPS limit: {overall:.0} IOPS over {:?} (burst included), {steady:.0} IOPS after 0.5 s", t.len());
    assert!(within(overall, 2000.0, 0.05), "{overall:.0} IOPS over the whole run");
    assert!(within(steady, 2000.0, 0.05), "{steady:.0} IOPS after the first 0.5 s");

    // The counters: every completed read was admitted (plus the last ones in flight), and the
    // queue spent most of the run waiting.
    let q = daemon.json(&["qos", "show", "v"]).unwrap();
    let st = &q["stats"];
    let reads = st["read_ops"].as_u64().unwrap();
    assert!(reads >= t.total() && reads <= t.total() + 32, "{q}");
    assert_eq!(st["read_bytes"].as_u64().unwrap(), reads * 4096, "{q}");
    assert!(st["throttled_ns"].as_u64().unwrap() > 3_000_000_000, "{q}");
    assert!(st["throttle_events"].as_u64().unwrap() > 0, "{q}");
    assert_eq!(q["limits"]["iops_total"]["rate"], 2000, "{q}");
    // ... and `devices --json` carries them too.
    let devs = daemon.json(&["devices"]).unwrap();
    assert_eq!(devs[0]["qos"]["stats"]["read_ops"].as_u64().unwrap(), reads, "{devs}");
}

#[test]
fn bandwidth_limit_with_large_requests() {
    let _s = serial();
    let (_d, _daemon, socks) = setup(&[("v", &["--bps-read", "20M"], 1)]);
    let load = Load { bs: 64 << 10, qd: 8, ..Load::randread_qd32(S(4.0)) };
    let t = run_load(&socks[0], &load).unwrap();
    let mib_s = t.rate(S(0.5), t.len()) * 64.0 / 1024.0;
    eprintln!("20 MiB/s limit, 64 KiB reads at QD8: {mib_s:.2} MiB/s after 0.5 s");
    assert!(within(mib_s, 20.0, 0.05), "{mib_s:.2} MiB/s");
}

#[test]
fn burst_is_served_at_full_speed_then_settles() {
    let _s = serial();
    let (_d, daemon, socks) = setup(&[
        ("free", &[], 1),
        ("burst", &["--iops-total", "2000", "--iops-total-burst", "3000"], 1),
        ("spread", &["--iops-total", "2000", "--iops-total-burst", "4000", "--iops-total-burst-secs", "2"], 1),
    ]);
    let full = run_load(&socks[0], &Load::randread_qd32(S(1.0))).unwrap();
    let full = full.total() as f64 / full.len().as_secs_f64();

    // The whole bucket at the device's speed, then the limit.
    let t = run_load(&socks[1], &Load::randread_qd32(S(4.0))).unwrap();
    let mut done = 0;
    let burst_ms = t.per_ms.iter().position(|&n| {
        done += n;
        done >= 3000
    });
    let burst_ms = burst_ms.expect("the burst was not served") as f64 + 1.0;
    let burst_rate = 3000.0 / (burst_ms / 1000.0);
    let after = t.rate(S(2.0), t.len());
    eprintln!("unlimited {full:.0} IOPS; burst of 3000 in {burst_ms} ms ({burst_rate:.0} IOPS), then {after:.0} IOPS");
    assert!(burst_rate >= 0.5 * full && burst_rate > 5.0 * 2000.0, "burst at {burst_rate:.0} IOPS, unlimited {full:.0}");
    assert!(within(after, 2000.0, 0.05), "{after:.0} IOPS after the burst");

    // With a burst length the burst is spread: 2000 + 4000 / 2 s = 4000 IOPS for 2 s.
    let t = run_load(&socks[2], &Load::randread_qd32(S(4.5))).unwrap();
    let peak = t.rate(S(0.2), S(1.8));
    let after = t.rate(S(2.5), t.len());
    eprintln!("burst 4000 over 2 s: {peak:.0} IOPS during the burst, {after:.0} after");
    assert!(within(peak, 4000.0, 0.05), "{peak:.0} IOPS during the burst");
    assert!(within(after, 2000.0, 0.05), "{after:.0} IOPS after the burst");
    drop(daemon);
}

#[test]
fn live_change_applies_within_100ms() {
    let _s = serial();
    let (_d, daemon, socks) = setup(&[("v", &["--iops-total", "2000"], 1)]);
    let (t, changes) = std::thread::scope(|s| {
        let began = Instant::now();
        let h = s.spawn(|| run_load(&socks[0], &Load::randread_qd32(S(4.5))).unwrap());
        let mut changes = Vec::new();
        for (at, rate) in [(1.5, 500.0), (2.8, 4000.0)] {
            std::thread::sleep((began + S(at)).saturating_duration_since(Instant::now()));
            let t0 = Instant::now();
            daemon.cli(&["qos", "set", "v", "--iops-total", &format!("{rate}")]).unwrap();
            changes.push((t0, Instant::now(), rate));
        }
        (h.join().unwrap(), changes)
    });
    let before = t.rate(S(0.5), t.at(changes[0].0));
    assert!(within(before, 2000.0, 0.05), "{before:.0} IOPS before the change");
    for (i, &(t0, t1, want)) in changes.iter().enumerate() {
        let (a, b) = (t.at(t1) + S(0.1), t.at(t1) + S(1.1));
        let end = changes.get(i + 1).map(|c| t.at(c.0)).unwrap_or(t.len());
        let b = b.min(end);
        let got = t.rate(a, b);
        eprintln!("set {want} IOPS (the CLI took {:?}): {got:.0} IOPS from 100 ms after it returned for {:?}", t1 - t0, b - a);
        assert!(b - a >= S(0.9), "window too short: {:?}", b - a);
        assert!(within(got, want, 0.05), "{got:.0} IOPS after setting {want}");
        // When did it take effect? The end of the first 20 ms window after the CLI started
        // whose rate is on the new side of the midpoint between the old and the new limit.
        let old = if i == 0 { 2000.0 } else { changes[i - 1].2 };
        let mid = (old + want) / 2.0;
        let from = t.at(t0);
        let win = Duration::from_millis(20);
        let effect = (0..1000u64)
            .map(|ms| from + Duration::from_millis(ms))
            .find(|&w| {
                let r = t.rate(w, w + win);
                if want > old {
                    r > mid
                } else {
                    r < mid
                }
            })
            .map(|w| w + win - from);
        eprintln!("  {old} -> {want} IOPS took effect {effect:?} after the CLI started");
        assert!(effect.is_some_and(|e| e <= S(0.1)), "{effect:?}");
    }
}

#[test]
fn unlimited_neighbour_keeps_its_speed() {
    let _s = serial();
    let (_d, _daemon, socks) = setup(&[("limited", &["--iops-total", "2000"], 1), ("free", &[], 1)]);
    let alone = run_load(&socks[1], &Load::randread_qd32(S(2.0))).unwrap();
    let alone = alone.total() as f64 / alone.len().as_secs_f64();
    let (lim, free) = std::thread::scope(|s| {
        let a = s.spawn(|| run_load(&socks[0], &Load::randread_qd32(S(3.0))).unwrap());
        let b = s.spawn(|| run_load(&socks[1], &Load::randread_qd32(S(3.0))).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let lim = lim.rate(S(0.5), lim.len());
    let free = free.rate(S(0.5), free.len());
    eprintln!("unlimited volume: {alone:.0} IOPS alone, {free:.0} IOPS beside a volume held to {lim:.0} IOPS");
    assert!(within(lim, 2000.0, 0.05), "{lim:.0}");
    // Two CPUs: the limited volume's client and queue thread take a little of them.
    assert!(free >= 0.75 * alone, "the unlimited volume slowed from {alone:.0} to {free:.0} IOPS");
}

#[test]
fn multi_queue_and_group_share_their_buckets() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    daemon.cli(&["qos", "group", "create", "tenant", "--iops-total", "3000"]).unwrap();
    let mut socks = Vec::new();
    for (name, extra) in [("mq", vec!["--iops-total", "2000"]), ("a", vec!["--qos-group", "tenant"]), ("b", vec!["--qos-group", "tenant"])]
    {
        let mut args = vec!["vol", "create", name, "64M"];
        args.extend(extra);
        daemon.cli(&args).unwrap();
        let sock = d.path().join(format!("{name}.sock"));
        daemon.cli(&["attach", name, "--socket", sock.to_str().unwrap(), "--queues", "2"]).unwrap();
        wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
        socks.push(sock);
    }
    // Two queues of one volume share its 2000 IOPS.
    let t = run_load(&socks[0], &Load { queues: 2, ..Load::randread_qd32(S(3.0)) }).unwrap();
    let mq = t.rate(S(0.5), t.len());
    eprintln!("2 queues x QD32 under one 2000 IOPS limit: {mq:.0} IOPS");
    assert!(within(mq, 2000.0, 0.05), "{mq:.0}");

    // Two volumes (two queues each) share their group's 3000 IOPS, about evenly.
    let (ta, tb) = std::thread::scope(|s| {
        let a = s.spawn(|| run_load(&socks[1], &Load { queues: 2, ..Load::randread_qd32(S(3.5)) }).unwrap());
        let b = s.spawn(|| run_load(&socks[2], &Load { queues: 2, ..Load::randread_qd32(S(3.5)) }).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let (ra, rb) = (ta.rate(S(0.5), S(3.0)), tb.rate(S(0.5), S(3.0)));
    eprintln!("group of 3000 IOPS: a {ra:.0} + b {rb:.0} = {:.0} IOPS", ra + rb);
    assert!(within(ra + rb, 3000.0, 0.05), "{ra:.0} + {rb:.0}");
    assert!(within(ra, 1500.0, 0.15) && within(rb, 1500.0, 0.15), "a {ra:.0}, b {rb:.0}");
    let g = daemon.json(&["qos", "group", "list"]).unwrap();
    assert_eq!(g[0]["volumes"], serde_json::json!(["a", "b"]), "{g}");
}

#[test]
fn limits_survive_a_daemon_restart() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let mut daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    daemon.cli(&["qos", "group", "create", "tenant", "--bps-total", "100M"]).unwrap();
    daemon.cli(&["vol", "create", "v", "64M", "--iops-read", "1000", "--iops-read-burst", "5000", "--iops-read-burst-secs", "5"]).unwrap();
    daemon.cli(&["qos", "set", "v", "--group", "tenant", "--iops-size", "64K"]).unwrap();
    daemon.cli(&["vol", "rename", "v", "w"]).unwrap();
    let before = daemon.json(&["qos", "show", "w"]).unwrap();
    assert!(daemon.stop().unwrap().success());
    let sock = d.path().join("w.sock");
    let daemon = Daemon::start(d.path(), &pool, &[format!("--attach=w:{}", sock.display())]).unwrap();
    let after = daemon.json(&["qos", "show", "w"]).unwrap();
    assert_eq!(after["limits"], before["limits"], "{after}");
    assert_eq!(after["group"], "tenant");
    assert_eq!(after["group_limits"]["bps_total"]["rate"], 100 << 20, "{after}");
    assert_eq!(after["limits"]["iops_read"]["burst_secs"], 5, "{after}");
    // Still enforced on the device attached at startup: 1000/s + its 5000 burst over 5 s
    // (peak 2000/s) in the first second.
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let t = run_load(&sock, &Load::randread_qd32(S(1.0))).unwrap();
    let r = t.rate(S(0.2), t.len());
    assert!(within(r, 2000.0, 0.05), "{r:.0} IOPS");
    // Deleting the volume forgets its settings; the group can then go.
    daemon.cli(&["detach", "w"]).unwrap();
    assert!(daemon.cli(&["qos", "group", "delete", "tenant"]).is_err());
    daemon.cli(&["vol", "delete", "w"]).unwrap();
    daemon.cli(&["qos", "group", "delete", "tenant"]).unwrap();
    assert!(daemon.cli(&["qos", "show", "w"]).is_err());
}

#[test]
fn export_rate_paces_the_copy() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    daemon.cli(&["vol", "create", "v", "32M", "--iops-total", "10"]).unwrap();
    // Export reads only allocated data (holes are skipped), so fill the volume first.
    let src = d.path().join("src.raw");
    std::fs::write(&src, vec![0xabu8; 32 << 20]).unwrap();
    daemon.cli(&["import", src.to_str().unwrap(), "v"]).unwrap();
    let out = d.path().join("v.raw");
    let t0 = Instant::now();
    daemon.cli(&["export", "v", out.to_str().unwrap(), "--rate", "16M"]).unwrap();
    let took = t0.elapsed();
    // 32 MiB at 16 MiB/s after 1.6 MiB of headroom: ~1.9 s (guest limits do not apply).
    eprintln!("export of 32 MiB at --rate 16M took {took:?}");
    assert!(took >= S(1.7) && took <= S(4.0), "{took:?}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    daemon.cli(&["vol", "delete", "v"]).unwrap();
    daemon.cli(&["vol", "create", "v", "32M"]).unwrap();
    let sparse = d.path().join("sparse.raw");
    std::fs::File::create(&sparse).unwrap().set_len(32 << 20).unwrap();
    let out = sparse;
    let t0 = Instant::now();
    daemon.cli(&["import", out.to_str().unwrap(), "v", "--rate", "1M"]).unwrap();
    // A sparse image writes nothing: nothing to pace.
    assert!(t0.elapsed() < S(2.0), "{:?}", t0.elapsed());
}

#[test]
fn qos_commands_refuse_bad_settings() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "64M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    let err = |args: &[&str]| daemon.cli(args).unwrap_err().to_string();
    // Invalid settings at create leave no volume behind.
    assert!(err(&["vol", "create", "v", "16M", "--iops-read-burst-secs", "3"]).contains("iops-read"));
    assert!(err(&["vol", "create", "v", "16M", "--qos-group", "nope"]).contains("no QoS group"));
    assert!(daemon.cli(&["vol", "info", "v"]).is_err());
    daemon.cli(&["vol", "create", "v", "16M"]).unwrap();
    assert!(err(&["qos", "set", "v", "--iops-write-burst", "10"]).contains("no iops-write limit"));
    assert!(err(&["qos", "set", "v", "--bps-total", "0", "--bps-total-burst", "1M"]).contains("needs a rate"));
    assert!(err(&["qos", "set", "nope", "--iops-total", "1"]).contains("nope"));
    assert!(err(&["qos", "group", "create", "-bad"]).contains("group"));
    daemon.cli(&["qos", "group", "create", "g", "--iops-total", "100"]).unwrap();
    assert!(err(&["qos", "group", "create", "g"]).contains("exists"));
    assert!(err(&["qos", "group", "set", "h", "--iops-total", "1"]).contains("no QoS group"));
    // Nothing was changed by the refused commands.
    let q = daemon.json(&["qos", "show", "v"]).unwrap();
    assert_eq!(q["group"], "", "{q}");
    assert!(q["limits"]["iops_write"].is_null(), "{q}");
    let human = daemon.cli(&["qos", "show", "v"]).unwrap();
    assert!(human.contains("limits:") && human.contains("unlimited"), "{human}");
    let s = daemon
        .cli(&["qos", "set", "v", "--iops-total", "2000", "--iops-total-burst", "20000", "--iops-total-burst-secs", "10", "--group", "g"])
        .unwrap();
    assert!(s.contains("iops-total 2000/s (burst 20000 over 10 s); group g (iops-total 100/s)"), "{s}");
    let l = daemon.cli(&["qos", "group", "list"]).unwrap();
    assert!(l.contains("g ") && l.contains("iops-total 100/s") && l.contains("v"), "{l}");
}
