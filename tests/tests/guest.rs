//! End-to-end tests with a real Linux guest (QEMU, KVM where it really works, TCG otherwise)
//! on vblk volumes served over vhost-user-blk by the real daemon.

use std::time::{Duration, Instant};

use vblk_tests::guest::{run_guest, run_guest_pass, DiskSpec, GuestRun};
use vblk_tests::*;

const MIB: u64 = 1 << 20;

fn used_bytes(d: &Daemon) -> u64 {
    d.json(&["pool", "status"]).unwrap()["used_bytes"].as_u64().unwrap()
}

/// A new pool of `pool_size` in a temporary directory, a daemon on it, and a volume `vol` of
/// `size` attached on `<dir>/vda.sock`.
fn attached_volume(pool_size: &str, vol: &str, size: &str) -> (tempfile::TempDir, Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), pool_size).unwrap();
    let sock = dir.path().join("vda.sock");
    let d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    d.cli(&["vol", "create", vol, size]).unwrap();
    d.cli(&["attach", vol, "--socket", sock.to_str().unwrap()]).unwrap();
    (dir, d, sock)
}

/// Wait for background commits to settle the pool's used bytes to `want`.
fn wait_used(d: &Daemon, want: impl Fn(u64) -> bool) -> u64 {
    let t0 = Instant::now();
    loop {
        let u = used_bytes(d);
        if want(u) || t0.elapsed() > Duration::from_secs(10) {
            return u;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_pattern_survives_daemon_kill9_and_discard_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "512M").unwrap();
    let sock = dir.path().join("vda.sock");
    let attach = format!("--attach=disk0:{}", sock.display());
    let mut d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    d.cli(&["vol", "create", "disk0", "1G"]).unwrap();
    d.cli(&["attach", "disk0", "--socket", sock.to_str().unwrap(), "--queues", "2"]).unwrap();
    let mut disk = DiskSpec::new(&sock);
    disk.num_queues = 2;

    // The guest writes 64 MiB of pattern with O_DIRECT and fsync (FLUSH), then powers off.
    let out = run_guest_pass(&GuestRun::new("write-pattern", vec![disk.clone()]).with_arg("seedA")).unwrap();
    let written_sum = out.sum("vda").map(str::to_string);
    assert!(used_bytes(&d) >= 64 * MIB, "thin volume allocated what the guest wrote");

    // kill -9 the daemon, start it again, boot the guest again: the pattern is intact.
    d.kill9();
    let d2 = Daemon::start(dir.path(), &pool, std::slice::from_ref(&attach)).unwrap();
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let out = run_guest_pass(&GuestRun::new("verify-pattern", vec![DiskSpec::new(&sock)]).with_arg("seedA")).unwrap();
    if let (Some(a), Some(b)) = (written_sum.as_deref(), out.sum("vda")) {
        assert_eq!(a, b);
    }
    // The check can fail: a different seed does not verify.
    let wrong = run_guest(&GuestRun::new("verify-pattern", vec![DiskSpec::new(&sock)]).with_arg("seedB")).unwrap();
    assert!(!wrong.passed, "verify-pattern must fail for the wrong seed");

    // Discard in the guest gives space back to the pool.
    let before = used_bytes(&d2);
    run_guest_pass(&GuestRun::new("discard", vec![DiskSpec::new(&sock)])).unwrap();
    // The scenario wrote 34 MiB over the start (already allocated) and discarded 32 MiB.
    let after = wait_used(&d2, |u| u + 32 * MIB <= before);
    assert!(after + 32 * MIB <= before, "pool used {before} -> {after}: discard did not free 32 MiB");
    let check = d2.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
}

/// UEFI firmware boots from a volume: OVMF's shell loads the kernel (about 14 MiB) and the
/// initramfs from a FAT file system on it, then the guest runs. OVMF's virtio-blk driver
/// negotiates neither SIZE_MAX nor SEG_MAX and reads a file in transfers of many MiB, one
/// descriptor each; the device used to refuse those (segment over size_max), and the firmware
/// then could not load anything from the volume. A corrupted read would not boot either: the
/// kernel is decompressed and the initramfs gunzipped, both checked.
#[test]
fn guest_uefi_firmware_boots_from_a_volume() {
    use vblk_tests::guest::uefi_boot_image;
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "512M").unwrap();
    let sock = dir.path().join("vda.sock");
    let d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    let mut run = GuestRun::new("info", vec![DiskSpec::new(&sock)]);
    run.uefi = true;
    // Boot takes about 20 s under TCG; a firmware that cannot load the kernel waits at its shell.
    run.timeout = Duration::from_secs(180);
    let img = dir.path().join("esp.img");
    uefi_boot_image(&run, &img, 48).unwrap();
    d.cli(&["import", img.to_str().unwrap(), "esp"]).unwrap();
    d.cli(&["attach", "esp", "--socket", sock.to_str().unwrap()]).unwrap();
    let out = run_guest(&run).unwrap_or_else(|e| panic!("{e:#}"));
    out.ensure_passed().unwrap_or_else(|e| panic!("{e:#}\n{}", out.console_tail(30)));
    // The guest's disk is the volume the firmware booted from.
    assert_eq!(out.info("vda.serial"), Some("esp"), "{}", out.console_tail(30));
    assert_eq!(out.info("vda.size"), Some("98304"), "48 MiB in sectors: {}", out.console_tail(30));
}

#[test]
fn guest_mkfs_ext4_files_and_fsck_clean() {
    let (_dir, d, sock) = attached_volume("512M", "fsdisk", "2G");
    run_guest_pass(&GuestRun::new("mkfs-fsck", vec![DiskSpec::new(&sock)])).unwrap();
    let check = d.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
}

#[test]
fn guest_sees_virtio_blk_features() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "64M").unwrap();
    let sock = dir.path().join("vda.sock");
    let rosock = dir.path().join("vdb.sock");
    let d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    // Thin: a 100 GiB volume on a 64 MiB pool.
    d.cli(&["vol", "create", "big-volume-name-0123456789", "100G"]).unwrap();
    d.cli(&["vol", "create", "ro", "1G"]).unwrap();
    d.cli(&["attach", "big-volume-name-0123456789", "--socket", sock.to_str().unwrap(), "--queues", "2"]).unwrap();
    d.cli(&["attach", "ro", "--socket", rosock.to_str().unwrap(), "--read-only"]).unwrap();
    let mut disk = DiskSpec::new(&sock);
    disk.num_queues = 2;
    let out = run_guest_pass(&GuestRun::new("info", vec![disk, DiskSpec::new(&rosock)])).unwrap();
    assert_eq!(out.info("vda.size"), Some((100u64 << 30 >> 9).to_string().as_str()));
    assert_eq!(out.info("vda.logical_block_size"), Some("512"));
    assert_eq!(out.info("vda.physical_block_size"), Some("4096"));
    assert_eq!(out.info("vda.minimum_io_size"), Some("4096"));
    // GET_ID: the serial is the volume name, cut to virtio's 20 bytes.
    assert_eq!(out.info("vda.serial"), Some("big-volume-name-0123"));
    assert_eq!(out.info("vda.mq"), Some("2"));
    assert_eq!(out.info("vda.ro"), Some("0"));
    assert_ne!(out.info("vda.discard_max_bytes"), Some("0"));
    assert_ne!(out.info("vda.write_zeroes_max_bytes"), Some("0"));
    assert_eq!(out.info("vda.write_cache"), Some("write back"));
    assert_eq!(out.info("vdb.ro"), Some("1"));
}

/// QEMU reconnects to a restarted daemon (`reconnect=1`): the guest keeps running across a
/// `kill -9` of the daemon that lands while fio has 16 writes in flight; none is lost (the new
/// daemon resubmits what the inflight area says was in flight), fio's crc32c verification of
/// every block passes, the data written before is intact and new writes work through the new
/// daemon.
#[test]
fn guest_survives_daemon_restart_with_reconnect() {
    use vblk_tests::guest::run_guest_with_hook;
    let (dir, mut d, sock) = attached_volume("256M", "rc", "64M");
    let pool = d.pool.clone();
    let attach = format!("--attach=rc:{}", sock.display());
    let mut disk = DiskSpec::new(&sock);
    disk.reconnect = true;
    let d2 = std::cell::RefCell::new(None);
    let restart = || {
        d.kill9();
        *d2.borrow_mut() = Some(Daemon::start(dir.path(), &pool, std::slice::from_ref(&attach)).unwrap());
    };
    let out = run_guest_with_hook(&GuestRun::new("reconnect", vec![disk]).with_arg("12"), Some(("VBLK-READY", Box::new(restart))))
        .unwrap();
    out.ensure_passed().unwrap();
    let d2 = d2.into_inner().expect("the daemon was restarted under the guest");
    let dev = d2.json(&["devices"]).unwrap();
    assert!(dev.to_string().contains("rc"), "{dev}");
}

/// A volume grown online while a guest runs on it: the daemon sends
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, QEMU re-reads the configuration space and interrupts
/// the guest, which sees the new capacity within seconds (not at its next boot) and can write
/// and read its new last MiB.
#[test]
fn guest_sees_volume_grown_online() {
    use vblk_tests::guest::run_guest_with_hook;
    let (dir, d, sock) = attached_volume("256M", "g", "64M");
    let grow = || {
        d.cli(&["vol", "resize", "g", "96M"]).unwrap();
    };
    let out = run_guest_with_hook(&GuestRun::new("grow", vec![DiskSpec::new(&sock)]).with_arg("20"), Some(("VBLK-READY", Box::new(grow)))).unwrap();
    if out.ensure_passed().is_err() {
        let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
        panic!("{}\ndaemon log:\n{log}", out.console_tail(20));
    }
    assert_eq!(out.info("size.before"), Some("131072"), "64 MiB in sectors");
    assert_eq!(out.info("size.after"), Some("196608"), "96 MiB in sectors");
}

/// Live migration of a VM with a vblk disk (QEMU refuses to migrate one whose vhost-user device
/// lacks VHOST_F_LOG_ALL). QEMU migrates the running guest to a file; once all of guest memory
/// has been copied once, the guest reads its disk through the page cache: the device writes
/// those pages by DMA from io_uring, behind QEMU's back, so they reach the destination only
/// through the dirty-page log the device keeps. Then the source is paused while the guest
/// keeps reading (requests in flight), the migration completes, and a new QEMU takes the
/// guest up from the file on the same vhost-user socket. The guest (told by the volume
/// growing) checks its cached copy against the pattern, then the disk itself, then writes on
/// the new QEMU.
#[test]
fn guest_live_migration_keeps_what_the_device_wrote() {
    use vblk_tests::guest::{run_guest_migrating, Migration};
    let (dir, d, sock) = attached_volume("256M", "mig", "64M");
    let mut disk = DiskSpec::new(&sock);
    // The new QEMU connects when the old one has gone (one frontend per socket at a time).
    disk.reconnect = true;
    let mut run = GuestRun::new("migrate", vec![disk]).with_mib(16);
    run.mem_mib = 256;
    // Debian's kernel zeroes every page it allocates (init_on_alloc): the CPU would dirty each
    // page-cache page just before the device fills it, and QEMU would send it again for that.
    // Without it, the device's writes are all that change those pages.
    run.kernel_args = "init_on_alloc=0".into();
    let grow = |to: &'static str| {
        let d = &d;
        move || {
            d.cli(&["vol", "resize", "mig", to]).unwrap();
        }
    };
    let m = Migration {
        ready: "VBLK-READY",
        bandwidth: 64 << 20,
        first_pass_done: Box::new(grow("72M")),
        done: "VBLK-FILLED",
        resumed: Box::new(grow("80M")),
        // VBLK_MIGRATE_LIVE=1 (the soak, scripts/test.sh): the migration converges with the
        // guest running and reading, so that QEMU stops it with requests in flight. One run in
        // 36 of that ended in a guest kernel crash (slab corruption) after the migration,
        // cause not found yet (README "Limits worth knowing"); pausing first, 17 of 17 passed.
        pause_first: !std::env::var("VBLK_MIGRATE_LIVE").is_ok_and(|v| v == "1"),
    };
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let (out, status) = run_guest_migrating(&run, m).unwrap_or_else(|e| panic!("{e:#}\ndaemon log:\n{}", daemon_log()));
    if out.ensure_passed().is_err() {
        panic!("{}\nmigration: {status}\ndaemon log:\n{}", out.console_tail(30), daemon_log());
    }
    let grew: i64 = out.info("cache.grew.kb").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(grew >= 12 * 1024, "the region read during the migration was not in the page cache (it grew by {grew} kB)");
    assert!(status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 3, "the migration made several passes: {status}");
}

/// QoS seen from a real guest running fio (4 KiB randread, QD32, libaio, O_DIRECT): a volume
/// limited to 2000 IOPS measures within ±5% of 2000 over 10 s, a limit changed live takes
/// effect, and an unlimited volume on the same daemon runs faster than the limited one.
#[test]
fn guest_fio_sees_qos_limits() {
    use vblk_tests::guest::run_guest_with_hook;
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "512M").unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    // Small burst (the default is 100 ms worth of the rate), so the 10 s figure is the rate.
    d.cli(&["vol", "create", "limited", "256M", "--iops-total", "2000"]).unwrap();
    d.cli(&["vol", "create", "free", "256M"]).unwrap();
    d.cli(&["attach", "limited", "--socket", sa.to_str().unwrap()]).unwrap();
    d.cli(&["attach", "free", "--socket", sb.to_str().unwrap()]).unwrap();
    let change = || {
        d.cli(&["qos", "set", "limited", "--iops-total", "1000"]).unwrap();
    };
    let mut run = GuestRun::new("fio-qos", vec![DiskSpec::new(&sa), DiskSpec::new(&sb)]).with_arg("10");
    run.mem_mib = 768;
    let out = run_guest_with_hook(&run, Some(("VBLK-READY", Box::new(change)))).unwrap();
    out.ensure_passed().unwrap();
    let iops = |k: &str| -> f64 { out.info(k).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {k}: {}", out.console_tail(30))) };
    let (a, b, c) = (iops("fio.vda1"), iops("fio.vda2"), iops("fio.vdb"));
    eprintln!("guest fio: limited {a} IOPS, after the live change {b}, unlimited neighbour {c}");
    assert!((a - 2000.0).abs() <= 100.0, "limited volume: {a} IOPS, want 2000 ±5%");
    assert!((b - 1000.0).abs() <= 50.0, "after the live change: {b} IOPS, want 1000 ±5%");
    assert!(c > 1.2 * a, "the unlimited volume ({c} IOPS) should outrun the limited one ({a})");
}

/// The pool's used bytes once the blocks waiting in reclaim are gone (`pending_free_bytes` 0;
/// `used_bytes` counts them until then).
fn settled_used(d: &Daemon) -> u64 {
    let t0 = Instant::now();
    loop {
        let s = d.json(&["pool", "status"]).unwrap();
        if s["pending_free_bytes"].as_u64() == Some(0) || t0.elapsed() > Duration::from_secs(10) {
            return s["used_bytes"].as_u64().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Snapshots, a clone and a rollback seen by a real guest, and the space a snapshot delete
/// frees. The guest writes pattern A (vm@a), then B over the same range (vm@b); a clone of vm@a
/// booted next to vm shows A while vm shows B; vm rolled back to vm@a shows A again. Then vm@b
/// has no dependents and its B blocks are referenced by nothing else: `snap list` reports them
/// as exclusive, and deleting it lowers the pool's used bytes by exactly that.
#[test]
fn guest_snapshot_clone_rollback_and_delete_frees_exclusive_space() {
    const N: u32 = 4; // MiB of pattern per write
    let n = u64::from(N) * MIB;
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "256M").unwrap();
    let (vm_sock, vmc_sock) = (dir.path().join("vm.sock"), dir.path().join("vmc.sock"));
    let (vm_s, vmc_s) = (vm_sock.to_str().unwrap(), vmc_sock.to_str().unwrap());
    let d = Daemon::start(dir.path(), &pool, &[]).unwrap();
    d.cli(&["vol", "create", "vm", "64M"]).unwrap();
    d.cli(&["attach", "vm", "--socket", vm_s]).unwrap();
    let guest = |scenario: &str, disks: &[&std::path::Path], arg: &str| {
        let disks = disks.iter().map(DiskSpec::new).collect();
        run_guest_pass(&GuestRun::new(scenario, disks).with_arg(arg).with_mib(N)).unwrap()
    };
    let snap = |name: &str| -> serde_json::Value {
        let list = d.json(&["snap", "list", "vm"]).unwrap();
        list.as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_else(|| panic!("no vm@{name} in {list}"))
    };

    // Pattern A, snapshot a; pattern B over the same range, snapshot b.
    let out = guest("write-pattern", &[&vm_sock], "snapA");
    let sum_a = out.sum("vda").expect("write-pattern prints VBLK-SUM vda").to_string();
    d.cli(&["snap", "create", "vm@a"]).unwrap();
    let out = guest("write-pattern", &[&vm_sock], "snapB");
    let sum_b = out.sum("vda").expect("write-pattern prints VBLK-SUM vda").to_string();
    assert_ne!(sum_a, sum_b);
    d.cli(&["snap", "create", "vm@b"]).unwrap();
    assert_eq!(settled_used(&d), 2 * n, "A (kept for vm@a) + B (the head)");

    // A clone of vm@a next to vm, in one guest: vda (vm) holds B, vdb (vmc) holds A.
    d.cli(&["clone", "vm@a", "vmc"]).unwrap();
    d.cli(&["attach", "vmc", "--socket", vmc_s]).unwrap();
    let out = guest("verify-two", &[&vm_sock, &vmc_sock], "snapB,snapA");
    assert_eq!(out.sum("vda"), Some(sum_b.as_str()));
    assert_eq!(out.sum("vdb"), Some(sum_a.as_str()));

    // Rollback is refused while attached; detached it works, and the guest reads A again.
    let err = d.cli(&["snap", "rollback", "vm@a"]).expect_err("rollback of an attached volume must be refused");
    assert!(err.to_string().contains("attached"), "{err}");
    d.cli(&["detach", "vm"]).unwrap();
    d.cli(&["snap", "rollback", "vm@a"]).unwrap();
    d.cli(&["attach", "vm", "--socket", vm_s]).unwrap();
    let out = guest("verify-pattern", &[&vm_sock], "snapA");
    assert_eq!(out.sum("vda"), Some(sum_a.as_str()));

    // The clone was only read: deleting it frees nothing. vm@a is still vm's origin.
    assert_eq!(snap("a")["clones"], serde_json::json!(["vmc"]));
    d.cli(&["detach", "vmc"]).unwrap();
    d.cli(&["vol", "delete", "vmc"]).unwrap();
    assert_eq!(settled_used(&d), 2 * n, "deleting the never-written clone vmc");
    assert_eq!(snap("a")["exclusive_bytes"].as_u64(), Some(0), "vm@a has a dependent (vm's rolled-back head)");

    // vm@b: no clone, not the rollback target; only it references the B blocks.
    let b = snap("b");
    assert_eq!(b["clones"], serde_json::json!([]));
    assert_eq!(b["referenced_bytes"].as_u64(), Some(n), "{b}");
    let excl = b["exclusive_bytes"].as_u64().unwrap();
    assert!(excl > 0, "vm@b should hold B exclusively: {b}");
    assert_eq!(excl, n, "vm@b's exclusive bytes are the {N} MiB of B: {b}");
    let before = settled_used(&d);
    let snap_before = d.json(&["pool", "status"]).unwrap()["snapshot_bytes"].as_u64().unwrap();
    d.cli(&["snap", "delete", "vm@b"]).unwrap();
    let after = {
        wait_used(&d, |u| u + excl <= before);
        settled_used(&d)
    };
    let snap_after = d.json(&["pool", "status"]).unwrap()["snapshot_bytes"].as_u64().unwrap();
    eprintln!("snap delete vm@b: exclusive {excl}, pool used {before} -> {after}, snapshot bytes {snap_before} -> {snap_after}");
    assert_eq!(after, before - excl, "pool used must fall by vm@b's exclusive bytes");
    assert_eq!(snap_after, snap_before - excl, "snapshot bytes must fall by vm@b's exclusive bytes");
    let names: Vec<_> = d.json(&["snap", "list", "vm"]).unwrap().as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, [serde_json::json!("a")]);

    let check = d.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
}

/// An encrypted volume in a real guest: Linux sees 4096-byte logical blocks, makes an ext4
/// file system on it, writes files and fsck finds it clean; the pool file holds none of the
/// plaintext (checked by the pool's own `check` and the blkio test) and `check` is clean.
#[test]
fn guest_mkfs_ext4_on_an_encrypted_volume() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(dir.path(), "512M").unwrap();
    let key = dir.path().join("master.key");
    std::fs::write(&key, [0x3cu8; 32]).unwrap();
    let sock = dir.path().join("vda.sock");
    let d = Daemon::start(dir.path(), &pool, &[format!("--master-key-file={}", key.display())]).unwrap();
    d.cli(&["vol", "create", "secret", "2G", "--encrypt"]).unwrap();
    d.cli(&["attach", "secret", "--socket", sock.to_str().unwrap()]).unwrap();
    let out = run_guest_pass(&GuestRun::new("info", vec![DiskSpec::new(&sock)])).unwrap();
    assert_eq!(out.info("vda.logical_block_size"), Some("4096"));
    assert_eq!(out.info("vda.physical_block_size"), Some("4096"));
    run_guest_pass(&GuestRun::new("mkfs-fsck", vec![DiskSpec::new(&sock)])).unwrap();
    let check = d.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
    let info = d.json(&["vol", "info", "secret"]).unwrap();
    assert_eq!(info["encrypted"], serde_json::Value::Bool(true));
    assert!(info["allocated_bytes"].as_u64().unwrap_or(0) > 0, "{info}");
}
