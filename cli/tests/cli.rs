//! End-to-end tests of the `vblk` binary: a real pool in a temporary directory, a real daemon on
//! a temporary API socket, and the CLI talking to it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vblk");
const MIB: u64 = 1 << 20;

/// Run `vblk ARGS` against `api` and return its output.
fn vblk(api: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .env_remove("VBLK_API_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run vblk")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run and require success; returns stdout.
fn ok(api: &Path, args: &[&str]) -> String {
    let o = vblk(api, args);
    assert!(o.status.success(), "vblk {args:?} failed ({}):\n{}{}", o.status, text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// Run and require exit code 1 with `vblk: error: ...`; returns stderr.
fn fails(api: &Path, args: &[&str]) -> String {
    let o = vblk(api, args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "vblk {args:?}: expected exit 1, got {}:\n{}{err}", o.status, text(&o.stdout));
    assert!(err.starts_with("vblk: error: "), "vblk {args:?}: {err}");
    err
}

fn json(api: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ok(api, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vblk {args:?}: not JSON ({e}): {out}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A daemon in the background; killed on drop if a test failed before stopping it.
struct Daemon {
    child: Option<Child>,
    api: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, pool: &Path, api: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with_path(dir, pool, api, extra, &std::env::var("PATH").unwrap_or_default())
    }

    /// With `PATH` set for the daemon (which looks up qemu-img).
    fn start_with_path(dir: &Path, pool: &Path, api: &Path, extra: &[&str], path_env: &str) -> Daemon {
        let log = dir.join(format!("daemon-{}.log", api.file_name().unwrap().to_string_lossy()));
        let child = Command::new(BIN)
            .args(["daemon", "--pool"])
            .arg(pool)
            .arg("--socket")
            .arg(api)
            .args(extra)
            .env("PATH", path_env)
            .env("RUST_LOG", "vblk=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn daemon");
        let mut d = Daemon { child: Some(child), api: api.into(), log };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({st}):\n{}", self.log_text());
            }
            if self.api.exists() && vblk(&self.api, &["vol", "list"]).status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "daemon not ready after 20 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit code.
    fn terminate(mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit within 30 s of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn create_pool(dir: &Path, size: &str) -> PathBuf {
    let pool = dir.join("pool.img");
    let out = ok(Path::new("/nonexistent"), &["pool", "create", pool.to_str().unwrap(), "--size", size]);
    assert!(out.contains("created pool"), "{out}");
    pool
}

/// A deterministic, never-zero byte for `pos` of the test image.
fn pattern(pos: u64) -> u8 {
    ((pos.wrapping_mul(2_654_435_761) >> 13) % 251) as u8 + 1
}

/// A sparse image: `size` bytes with data at `extents` (offset, len), the rest holes, plus a
/// range of explicitly written zeros (`zeros`), which import must skip too.
fn make_image(path: &Path, size: u64, extents: &[(u64, u64)], zeros: (u64, u64)) {
    let f = OpenOptions::new().create(true).truncate(true).write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    for &(off, len) in extents {
        let buf: Vec<u8> = (off..off + len).map(pattern).collect();
        f.write_all_at(&buf, off).unwrap();
    }
    f.write_all_at(&vec![0u8; zeros.1 as usize], zeros.0).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn daemon_lifecycle_volumes_import_export_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "256M");
    // Creating over an existing pool is refused.
    let err = fails(Path::new("/nonexistent"), &["pool", "create", pool.to_str().unwrap(), "--size", "256M"]);
    assert!(err.contains("already exists"), "{err}");

    let api = d.join("api.sock");
    let daemon = Daemon::start(d, &pool, &api, &[]);
    let mode = std::fs::symlink_metadata(&api).unwrap();
    assert!(mode.file_type().is_socket());
    assert_eq!(mode.permissions().mode() & 0o777, 0o600, "API socket mode");

    // Volumes.
    assert!(ok(&api, &["vol", "create", "vm1", "10G"]).contains("10.0 GiB"));
    ok(&api, &["vol", "create", "scratch", "1T"]);
    let err = fails(&api, &["vol", "create", "vm1", "1G"]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails(&api, &["vol", "create", "odd", "1000"]);
    assert!(err.contains("multiple of 4096"), "{err}");
    let o = vblk(&api, &["vol", "create", "odd", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("unknown unit"), "{}", text(&o.stderr));

    let list = json(&api, &["vol", "list"]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["scratch", "vm1"]);
    let human = ok(&api, &["vol", "list"]);
    assert!(human.starts_with("NAME"), "{human}");
    assert!(human.contains("1.0 TiB"), "{human}");

    let info = json(&api, &["vol", "info", "vm1"]);
    assert_eq!(u(&info, "size_bytes"), 10 << 30);
    assert_eq!(u(&info, "allocated_bytes"), 0);
    assert!(ok(&api, &["vol", "info", "vm1"]).contains("10.0 GiB (10737418240 bytes)"));
    let err = fails(&api, &["vol", "info", "nope"]);
    assert!(err.contains("not found"), "{err}");

    let v = json(&api, &["vol", "resize", "vm1", "12G"]);
    assert_eq!(u(&v, "size_bytes"), 12 << 30);
    let v = json(&api, &["vol", "resize", "vm1", "+1G"]);
    assert_eq!(u(&v, "size_bytes"), 13 << 30);
    let err = fails(&api, &["vol", "resize", "vm1", "1G"]);
    assert!(err.contains("--shrink"), "{err}");
    let v = json(&api, &["vol", "resize", "vm1", "-3G", "--shrink"]);
    assert_eq!(u(&v, "size_bytes"), 10 << 30);

    ok(&api, &["vol", "rename", "vm1", "vm1-renamed"]);
    fails(&api, &["vol", "info", "vm1"]);
    assert_eq!(json(&api, &["vol", "info", "vm1-renamed"])["name"], "vm1-renamed");

    // Import a sparse image with a known pattern, export it, compare.
    let size = 32 * MIB + 1000; // not a multiple of 4096: the volume rounds up
    let extents = [(0, 8192), (5 * MIB + 4096, 3 * MIB + 12288), (20 * MIB, 4096), (32 * MIB - 4096, 5096)];
    let src = d.join("src.raw");
    make_image(&src, size, &extents, (12 * MIB, 2 * MIB));
    let data_blocks: u64 = 2 + (3 * MIB + 12288) / 4096 + 1 + 2; // the last extent spans two blocks
    let r = json(&api, &["import", src.to_str().unwrap(), "img"]);
    assert_eq!(r["done"], true);
    assert_eq!(r["created"], true);
    assert_eq!(u(&r, "written_bytes"), data_blocks * 4096, "{r}");
    let vol_size = 32 * MIB + 4096;
    assert_eq!(u(&r["volume"], "size_bytes"), vol_size);
    let info = json(&api, &["vol", "info", "img"]);
    assert_eq!(u(&info, "allocated_bytes"), data_blocks * 4096, "holes and zero blocks take no space");

    let out = d.join("out.raw");
    let r = json(&api, &["export", "img", out.to_str().unwrap()]);
    assert_eq!(u(&r, "total_bytes"), vol_size);
    let exported = std::fs::read(&out).unwrap();
    let original = std::fs::read(&src).unwrap();
    assert_eq!(exported.len() as u64, vol_size);
    assert!(exported[..original.len()] == original[..], "exported bytes differ from the image");
    assert!(exported[original.len()..].iter().all(|&b| b == 0));
    let m = std::fs::metadata(&out).unwrap();
    assert!(m.blocks() * 512 < 6 * MIB, "export is not sparse: {} bytes allocated for {}", m.blocks() * 512, m.len());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let err = fails(&api, &["export", "img", out.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    ok(&api, &["export", "img", out.to_str().unwrap(), "--force"]);

    // Re-import into an existing, larger volume holding other data: it must read back as the image.
    ok(&api, &["vol", "create", "big", "64M"]);
    let junk = d.join("junk.raw");
    make_image(&junk, 64 * MIB, &[(0, 64 * MIB)], (0, 0));
    ok(&api, &["import", junk.to_str().unwrap(), "big"]);
    let r = json(&api, &["import", src.to_str().unwrap(), "big"]);
    assert_eq!(r["created"], false);
    let out2 = d.join("out2.raw");
    ok(&api, &["export", "big", out2.to_str().unwrap()]);
    let e2 = std::fs::read(&out2).unwrap();
    assert!(e2[..original.len()] == original[..], "re-import did not replace the old data");
    assert!(e2[original.len()..vol_size as usize].iter().all(|&b| b == 0));
    // Past the image, the old data is left as it was.
    assert_eq!(e2[vol_size as usize], pattern(vol_size));
    // A volume smaller than the image is refused.
    ok(&api, &["vol", "create", "tiny", "1M"]);
    let err = fails(&api, &["import", src.to_str().unwrap(), "tiny"]);
    assert!(err.contains("smaller than the image"), "{err}");
    let err = fails(&api, &["import", d.join("missing.raw").to_str().unwrap(), "x"]);
    assert!(err.contains("missing.raw"), "{err}");
    // A failed import leaves no volume behind.
    let err = fails(&api, &["import", src.to_str().unwrap(), "small-new", "--create-size", "4K"]);
    assert!(err.contains("smaller than the image"), "{err}");
    fails(&api, &["vol", "info", "small-new"]);

    // Pool status numbers.
    let s = json(&api, &["pool", "status"]);
    let (total, used, free) = (u(&s, "total_bytes"), u(&s, "used_bytes"), u(&s, "free_bytes"));
    assert_eq!(total, used + free);
    assert!(total > 250 * MIB && total <= 256 * MIB, "{total}");
    let vols = s["volumes"].as_array().unwrap();
    let alloc_sum: u64 = vols.iter().map(|v| u(v, "allocated_bytes")).sum();
    let img = vols.iter().find(|v| v["name"] == "img").unwrap();
    assert_eq!(u(img, "allocated_bytes"), data_blocks * 4096);
    assert!(used >= alloc_sum, "used {used} < allocated {alloc_sum}");
    assert!(used <= alloc_sum + u(&s, "pending_free_bytes"), "used {used} > allocated {alloc_sum} + pending free");
    let human = ok(&api, &["pool", "status"]);
    assert!(human.contains("pending free:"), "{human}");
    // Where the daemon's memory goes: its RSS, the configured cache, a map cache that holds
    // the imported volume's entries within its half of the budget.
    let m = &s["memory"];
    assert!(u(m, "rss_bytes") > MIB, "{m}");
    assert_eq!(u(m, "cache_budget_bytes"), 64 * MIB, "{m}");
    assert!(u(m, "map_cache_entries") >= data_blocks, "{m}");
    assert!(u(m, "map_cache_bytes") > 0 && u(m, "map_cache_bytes") <= 32 * MIB, "{m}");
    assert!(human.contains("daemon memory:") && human.contains("RocksDB:"), "{human}");

    // Check, through the daemon; offline check is refused while the daemon holds the pool.
    let c = json(&api, &["check"]);
    assert_eq!(c["clean"], true, "{c}");
    assert_eq!(c["errors"].as_array().unwrap().len(), 0);
    let err = fails(&api, &["check", "--pool", pool.to_str().unwrap()]);
    assert!(err.contains("in use"), "{err}");

    // A second daemon on the same pool fails clearly and leaves the first one's socket alone.
    let api2 = d.join("api2.sock");
    let o = Command::new(BIN)
        .args(["daemon", "--pool"])
        .arg(&pool)
        .arg("--api-socket")
        .arg(&api2)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("vblk: error: ") && err.contains("in use by another process"), "{err}");
    assert!(!api2.exists());
    // Nor may another pool's daemon steal a live API socket.
    let pool2 = d.join("pool2.img");
    ok(&api, &["pool", "create", pool2.to_str().unwrap(), "--size", "16M"]);
    let o = Command::new(BIN).args(["daemon", "--pool"]).arg(&pool2).arg("--api-socket").arg(&api).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("is in use"), "{}", text(&o.stderr));
    ok(&api, &["vol", "list"]);

    // Delete.
    assert!(ok(&api, &["vol", "delete", "scratch"]).contains("deleted"));
    let err = fails(&api, &["vol", "delete", "scratch"]);
    assert!(err.contains("not found"), "{err}");
    ok(&api, &["vol", "rm", "big"]);

    // SIGTERM: exit 0, socket removed, pool released and consistent.
    let log = daemon.log.clone();
    assert_eq!(daemon.terminate(), Some(0), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(!api.exists(), "API socket left behind");
    let err = fails(&api, &["vol", "list"]);
    assert!(err.contains("cannot reach the vblk daemon"), "{err}");
    let c = json(&api, &["check", "--pool", pool.to_str().unwrap()]);
    assert_eq!(c["clean"], true, "{c}");

    // Everything survived the restart.
    let daemon = Daemon::start(d, &pool, &api, &[]);
    let names: Vec<String> =
        json(&api, &["vol", "list"]).as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["img", "tiny", "vm1-renamed"]);
    assert_eq!(u(&json(&api, &["vol", "info", "img"]), "allocated_bytes"), data_blocks * 4096);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn stale_api_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "16M");
    let api = d.join("api.sock");
    // A socket file nobody listens on, as a killed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(&api).unwrap());
    assert!(api.exists());
    let daemon = Daemon::start(d, &pool, &api, &[]);
    ok(&api, &["vol", "list"]);
    assert_eq!(daemon.terminate(), Some(0));
    // A regular file in its place is not touched.
    std::fs::write(&api, b"keep me").unwrap();
    let o = Command::new(BIN).args(["daemon", "--pool"]).arg(&pool).arg("--api-socket").arg(&api).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("not a socket"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&api).unwrap(), b"keep me");
}

#[test]
fn errors_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("none.sock");
    let err = fails(&api, &["vol", "list"]);
    assert!(err.contains("cannot reach the vblk daemon") && err.contains("none.sock"), "{err}");
    // The environment variable names the socket too.
    let o = Command::new(BIN).args(["pool", "status"]).env("VBLK_API_SOCKET", &api).output().unwrap();
    assert!(text(&o.stderr).contains("none.sock"), "{}", text(&o.stderr));
    let err = fails(&api, &["check", "--pool", dir.path().join("nopool").to_str().unwrap()]);
    assert!(err.contains("nopool"), "{err}");
    let o = vblk(&api, &["pool", "create", "x", "--size", "1.5.5G"]);
    assert_eq!(o.status.code(), Some(2));
    // Every command has help with examples.
    for cmd in [
        &["pool", "create"][..],
        &["pool", "status"],
        &["daemon"],
        &["vol", "create"],
        &["vol", "list"],
        &["vol", "resize"],
        &["attach"],
        &["detach"],
        &["devices"],
        &["check"],
        &["import"],
        &["export"],
        &["vol", "delete"],
        &["snap", "create"],
        &["snap", "list"],
        &["snap", "delete"],
        &["snap", "rollback"],
        &["clone"],
        &["clone", "create"],
        &["clone", "flatten"],
        &["diff"],
    ] {
        let mut a = cmd.to_vec();
        a.push("--help");
        let out = ok(&api, &a);
        assert!(out.contains("Example"), "vblk {cmd:?} --help has no examples:\n{out}");
    }
}

#[test]
fn attach_and_detach_manage_device_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "64M");
    let api = d.join("api.sock");
    // Volumes exist before the daemon starts with --attach: create them through a first daemon.
    let daemon = Daemon::start(d, &pool, &api, &[]);
    ok(&api, &["vol", "create", "vm1", "16M"]);
    ok(&api, &["vol", "create", "vm2", "16M"]);
    ok(&api, &["vol", "create", "ro", "16M"]);
    assert_eq!(daemon.terminate(), Some(0));

    let boot_sock = d.join("vm2.sock");
    let spec = format!("vm2:{}:2", boot_sock.display());
    let daemon = Daemon::start(d, &pool, &api, &["--attach", &spec]);
    assert!(std::fs::symlink_metadata(&boot_sock).unwrap().file_type().is_socket(), "--attach socket missing");
    let v = json(&api, &["vol", "info", "vm2"]);
    assert_eq!(v["attached_rw"], true);
    assert_eq!(u(&v["attachment"], "num_queues"), 2);

    let sock = d.join("vm1.sock");
    let a = json(&api, &["attach", "vm1", "--socket", sock.to_str().unwrap(), "--queues", "2"]);
    assert_eq!(a["socket"], sock.to_str().unwrap());
    assert_eq!(a["read_only"], false);
    assert_eq!(u(&a, "threads"), 2, "one worker thread per queue by default");
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let human = ok(&api, &["vol", "list"]);
    assert!(human.contains(&format!("rw {}", sock.display())), "{human}");
    assert!(ok(&api, &["vol", "info", "vm1"]).contains("waiting for a front end"));
    let devs = json(&api, &["devices"]);
    let devs = devs.as_array().unwrap();
    assert_eq!(devs.len(), 2, "{devs:?}");
    let dev1 = devs.iter().find(|a| a["volume"] == "vm1").unwrap();
    assert_eq!(dev1["connected"], false);
    assert_eq!(u(&dev1["stats"], "requests"), 0);
    let human = ok(&api, &["devices"]);
    assert!(human.starts_with("VOLUME") && human.contains(sock.to_str().unwrap()), "{human}");

    // An attached volume cannot be attached again, deleted, shrunk, imported into or exported.
    let err = fails(&api, &["attach", "vm1", "--socket", d.join("other.sock").to_str().unwrap()]);
    assert!(err.contains("already attached"), "{err}");
    let err = fails(&api, &["attach", "ro", "--socket", sock.to_str().unwrap()]);
    assert!(err.contains("already used"), "{err}");
    let err = fails(&api, &["vol", "delete", "vm1"]);
    assert!(err.contains("in use"), "{err}");
    let err = fails(&api, &["vol", "resize", "vm1", "8M", "--shrink"]);
    assert!(err.contains("detach"), "{err}");
    let img = d.join("img.raw");
    make_image(&img, MIB, &[(0, 4096)], (0, 0));
    let err = fails(&api, &["import", img.to_str().unwrap(), "vm1"]);
    assert!(err.contains("in use") || err.contains("attached"), "{err}");
    let err = fails(&api, &["export", "vm1", d.join("x.raw").to_str().unwrap()]);
    assert!(err.contains("attached read-write"), "{err}");
    assert!(!d.join("x.raw").exists());
    // Growing is fine while attached.
    assert_eq!(u(&json(&api, &["vol", "resize", "vm1", "+4M"]), "size_bytes"), 20 * MIB);

    // Read-only attachment: exportable, not importable.
    let ro_sock = d.join("ro.sock");
    let err = fails(&api, &["attach", "ro", "--socket", ro_sock.to_str().unwrap(), "--queues", "2", "--threads", "3"]);
    assert!(err.contains("threads must be 1..=2"), "{err}");
    assert!(!ro_sock.exists());
    let a = json(&api, &["attach", "ro", "--socket", ro_sock.to_str().unwrap(), "--read-only", "--queues", "2", "--threads", "1", "--pin-memory"]);
    assert_eq!(a["read_only"], true);
    assert_eq!(u(&a, "threads"), 1);
    assert_eq!(a["pin_memory"], true);
    let devs = json(&api, &["devices"]);
    assert!(devs.to_string().contains("\"pin_memory\":true"), "{devs}");
    ok(&api, &["export", "ro", d.join("ro.raw").to_str().unwrap()]);
    let err = fails(&api, &["import", img.to_str().unwrap(), "ro"]);
    assert!(err.contains("attached read-only"), "{err}");
    let o = vblk(&api, &["attach", "vm1", "--socket", d.join("q.sock").to_str().unwrap(), "--queues", "17"]);
    assert_eq!(o.status.code(), Some(2), "clap refuses it");
    assert!(text(&o.stderr).contains("1..=16"), "{}", text(&o.stderr));

    // Detach by volume and by socket: the sockets go away.
    let r = json(&api, &["detach", "vm1"]);
    assert_eq!(r["volume"], "vm1");
    assert!(!sock.exists(), "detach left the socket behind");
    ok(&api, &["detach", "--socket", ro_sock.to_str().unwrap()]);
    assert!(!ro_sock.exists());
    let err = fails(&api, &["detach", "vm1"]);
    assert!(err.contains("not attached"), "{err}");
    ok(&api, &["vol", "delete", "vm1"]);

    // Shutdown detaches what is left (vm2) and removes its socket.
    assert_eq!(daemon.terminate(), Some(0));
    assert!(!boot_sock.exists(), "shutdown left a device socket behind");
    assert!(!api.exists());
}

#[test]
fn import_qcow2_through_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "64M");
    let api = d.join("api.sock");
    let raw = d.join("src.raw");
    let size = 8 * MIB;
    make_image(&raw, size, &[(4096, 8192), (3 * MIB, 100_000)], (5 * MIB, MIB));
    let qcow = d.join("src.qcow2");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .expect("qemu-img is needed by this test and by `vblk import` of qcow2 (scripts/install-deps.sh installs qemu-utils)");
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Without qemu-img on the daemon's PATH: a clear error, and no volume left behind.
    let daemon = Daemon::start_with_path(d, &pool, &api, &[], "/nonexistent");
    let err = fails(&api, &["import", qcow.to_str().unwrap(), "q"]);
    assert!(err.contains("qcow2") && err.contains("qemu-img"), "{err}");
    fails(&api, &["vol", "info", "q"]);
    assert_eq!(daemon.terminate(), Some(0));

    let daemon = Daemon::start(d, &pool, &api, &[]);
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let r = json(&api, &["import", qcow.to_str().unwrap(), "q", "--tmp-dir", tmp.to_str().unwrap()]);
    assert_eq!(r["created"], true);
    assert!(r["note"].as_str().unwrap().contains("qcow2"), "{r}");
    assert_eq!(u(&r["volume"], "size_bytes"), size);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "temporary raw file left behind");
    let out = d.join("out.raw");
    ok(&api, &["export", "q", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap(), "qcow2 import differs from the raw image");
    // --format raw takes the file as it is (here: the qcow2 container itself).
    let r = json(&api, &["import", qcow.to_str().unwrap(), "as-raw", "--format", "raw"]);
    assert_eq!(u(&r["volume"], "size_bytes"), std::fs::metadata(&qcow).unwrap().len().div_ceil(4096) * 4096);
    // An image that refers to other files is refused, so an image from a tenant cannot copy a
    // file of the host into a volume: a backing file, a qcow2 external data file.
    let secret = d.join("secret.txt");
    std::fs::write(&secret, b"SECRET-HOST-DATA").unwrap();
    let backed = d.join("backed.qcow2");
    let datafile = d.join("datafile.qcow2");
    for (img, opts) in [(&backed, format!("backing_file={},backing_fmt=raw", secret.display())), (&datafile, format!("data_file={},data_file_raw=on", secret.display()))] {
        let o = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &opts]).arg(img).arg("1M").output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let err = fails(&api, &["import", img.to_str().unwrap(), "leak"]);
        assert!(err.contains("refers to other files") && err.contains("secret.txt"), "{err}");
        fails(&api, &["vol", "info", "leak"]);
    }
    assert_eq!(daemon.terminate(), Some(0));
}

/// Names in a JSON array of objects.
fn names(v: &Value, key: &str) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x[key].as_str().unwrap().to_string()).collect()
}

#[test]
fn snapshots_clones_rollback_diff() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "64M");
    let api = d.join("api.sock");
    let daemon = Daemon::start(d, &pool, &api, &[]);
    ok(&api, &["vol", "create", "vm1", "16M"]);
    assert!(ok(&api, &["snap", "list"]).contains("no snapshots"));

    // Create and list.
    let s1 = json(&api, &["snap", "create", "vm1@s1"]);
    assert_eq!((s1["volume"].as_str(), s1["name"].as_str()), (Some("vm1"), Some("s1")), "{s1}");
    assert_eq!(u(&s1, "size_bytes"), 16 * MIB);
    assert!(ok(&api, &["snap", "create", "vm1@s2"]).contains("vm1@s2"));
    let list = json(&api, &["snap", "list"]);
    assert_eq!(names(&list, "name"), ["s1", "s2"]);
    let first = &list[0];
    for key in ["created_ns", "size_bytes", "referenced_bytes", "exclusive_bytes", "generation"] {
        assert!(first[key].is_u64(), "{key} missing or not an integer in {first}");
    }
    assert_eq!(u(first, "created_ns"), u(&s1, "created_ns"));
    assert_eq!((u(first, "referenced_bytes"), u(first, "exclusive_bytes")), (0, 0), "{first}");
    assert_eq!(first["clones"].as_array().map(Vec::len), Some(0), "{first}");
    assert!(u(&list[1], "generation") > u(first, "generation"), "{list}");
    assert_eq!(names(&json(&api, &["snap", "list", "vm1"]), "name"), ["s1", "s2"]);
    let human = ok(&api, &["snap", "ls"]);
    assert!(human.starts_with("VOLUME  SNAPSHOT  CREATED"), "{human}");
    assert!(human.contains("REFERENCED  EXCLUSIVE  CLONES") && human.contains("16.0 MiB"), "{human}");

    // Refusals.
    let err = fails(&api, &["snap", "create", "vm1@s1"]);
    assert!(err.contains("already exists") && err.contains("vm1@s1"), "{err}");
    let err = fails(&api, &["snap", "create", "novol@x"]);
    assert!(err.contains("not found") && err.contains("novol"), "{err}");
    let err = fails(&api, &["snap", "list", "novol"]);
    assert!(err.contains("not found"), "{err}");
    let err = fails(&api, &["snap", "delete", "vm1@nope"]);
    assert!(err.contains("not found") && err.contains("vm1@nope"), "{err}");
    let o = vblk(&api, &["snap", "create", "vm1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("VOL@SNAP"), "{}", text(&o.stderr));

    // Diff of an unwritten volume: nothing changed, between snapshots or up to now.
    let df = json(&api, &["diff", "vm1@s1", "vm1@s2"]);
    assert_eq!(df["ranges"].as_array().map(Vec::len), Some(0), "{df}");
    assert_eq!(u(&df, "changed_bytes"), 0);
    let df = json(&api, &["diff", "vm1@s1"]);
    assert_eq!(u(&df, "changed_bytes"), 0, "{df}");
    assert!(ok(&api, &["diff", "vm1@s1", "vm1@s2"]).contains("no changes"));
    let err = fails(&api, &["diff", "vm1@s1", "other@s2"]);
    assert!(err.contains("different volumes"), "{err}");

    // Clones, in both forms; they show in vol list and in their snapshot's CLONES.
    let c1 = json(&api, &["clone", "vm1@s1", "c1"]);
    assert_eq!((c1["name"].as_str(), u(&c1, "size_bytes")), (Some("c1"), 16 * MIB), "{c1}");
    assert!(ok(&api, &["clone", "create", "vm1@s2", "c2"]).contains("clone of vm1@s2"));
    assert_eq!(names(&json(&api, &["vol", "list"]), "name"), ["c1", "c2", "vm1"]);
    let list = json(&api, &["snap", "list", "vm1"]);
    assert_eq!(list[0]["clones"], serde_json::json!(["c1"]), "{list}");
    assert_eq!(list[1]["clones"], serde_json::json!(["c2"]), "{list}");
    let err = fails(&api, &["clone", "vm1@s1", "c1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails(&api, &["clone", "vm1@nope", "c3"]);
    assert!(err.contains("not found"), "{err}");
    // Flatten: c2 becomes independent; a plain volume is not a clone.
    assert_eq!(json(&api, &["clone", "flatten", "c2"])["name"], "c2");
    let err = fails(&api, &["clone", "flatten", "vm1"]);
    assert!(err.contains("not a clone"), "{err}");

    // Data through import: diff finds exactly the written blocks, rollback goes back and forth.
    ok(&api, &["vol", "create", "data", "4M"]);
    ok(&api, &["snap", "create", "data@empty"]);
    let img = d.join("img.raw");
    make_image(&img, 2 * MIB, &[(0, 8192), (MIB, 4096)], (0, 0));
    ok(&api, &["import", img.to_str().unwrap(), "data"]);
    ok(&api, &["snap", "create", "data@full"]);
    let df = json(&api, &["diff", "data@empty", "data@full"]);
    assert_eq!(df["ranges"], serde_json::json!([{"offset": 0, "length": 8192}, {"offset": MIB, "length": 4096}]), "{df}");
    assert_eq!(u(&df, "changed_bytes"), 12288);
    assert_eq!(json(&api, &["diff", "data@full", "data@empty"])["ranges"], df["ranges"], "order does not matter");
    assert_eq!(u(&json(&api, &["diff", "data@empty"]), "changed_bytes"), 12288);
    let human = ok(&api, &["diff", "data@empty", "data@full"]);
    assert!(human.starts_with(" OFFSET  LENGTH") && human.contains("1048576") && human.contains("12288 bytes"), "{human}");
    let full = json(&api, &["snap", "list", "data"]);
    assert_eq!(u(&full[1], "referenced_bytes"), 12288, "{full}");

    let image = std::fs::read(&img).unwrap();
    let export = |name: &str| {
        let out = d.join(format!("{name}.raw"));
        ok(&api, &["export", "data", out.to_str().unwrap(), "--force"]);
        std::fs::read(&out).unwrap()
    };
    let v = json(&api, &["snap", "rollback", "data@empty"]);
    assert_eq!((v["name"].as_str(), u(&v, "size_bytes")), (Some("data"), 4 * MIB), "{v}");
    assert!(export("empty").iter().all(|&b| b == 0), "rollback to an empty snapshot left data");
    assert!(ok(&api, &["snap", "rollback", "data@full"]).contains("rolled back volume data to snapshot data@full"));
    let e = export("full");
    assert!(e[..image.len()] == image[..], "rollback to data@full does not read the image");
    assert_eq!(names(&json(&api, &["snap", "list", "data"]), "name"), ["empty", "full"], "rollback keeps the snapshots");

    // Attached: snapshots are allowed, rollback is refused; a snapshot exports while the volume
    // is attached read-write (it cannot change).
    let sock = d.join("data.sock");
    ok(&api, &["attach", "data", "--socket", sock.to_str().unwrap()]);
    ok(&api, &["snap", "create", "data@attached"]);
    let snap_out = d.join("snap.raw");
    ok(&api, &["export", "data@full", snap_out.to_str().unwrap()]);
    assert!(std::fs::read(&snap_out).unwrap()[..image.len()] == image[..], "export of data@full");
    let err = fails(&api, &["export", "data", d.join("x.raw").to_str().unwrap()]);
    assert!(err.contains("attached read-write"), "{err}");
    let err = fails(&api, &["snap", "rollback", "data@empty"]);
    assert!(err.contains("attached") && err.contains("detach"), "{err}");
    ok(&api, &["detach", "data"]);

    // Snapshot delete.
    assert!(ok(&api, &["snap", "delete", "data@attached"]).contains("deleted snapshot data@attached"));
    assert_eq!(json(&api, &["snap", "rm", "data@empty"])["deleted"], "data@empty");
    assert_eq!(names(&json(&api, &["snap", "list", "data"]), "name"), ["full"]);

    // Pool status shows what snapshots hold.
    let st = json(&api, &["pool", "status"]);
    assert!(st["snapshot_bytes"].is_u64(), "{st}");
    assert!(u(&st, "snapshot_bytes") <= u(&st, "used_bytes"), "{st}");
    assert!(ok(&api, &["pool", "status"]).contains("snapshots:"));

    // Deleting a volume with snapshots and clones needs --recursive, which takes the clones too
    // (not c2: flattened, it no longer depends on vm1).
    let err = fails(&api, &["vol", "delete", "vm1"]);
    assert!(err.contains("--recursive") && err.contains("c1"), "{err}");
    assert_eq!(names(&json(&api, &["vol", "list"]), "name"), ["c1", "c2", "data", "vm1"]);
    let out = ok(&api, &["vol", "delete", "vm1", "--recursive"]);
    assert_eq!(out.trim(), "deleted volume vm1 and its clone(s) c1", "says every volume it deleted");
    assert_eq!(names(&json(&api, &["vol", "list"]), "name"), ["c2", "data"]);
    assert_eq!(names(&json(&api, &["snap", "list"]), "volume"), ["data"]);
    let c = json(&api, &["check"]);
    assert_eq!(c["clean"], true, "{c}");

    // Snapshots survive a restart.
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(names(&json(&api, &["snap", "list"]), "name"), ["full"]);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Encryption from the operator's side: `vol create --encrypt` with a key from a file, a
/// command or the environment; `vol info` says so; a daemon without the key lists the volume
/// but cannot attach it; a daemon with a wrong key does not start; `pool rekey` re-wraps the
/// keys offline and the daemon then starts with the new key only.
#[test]
fn encrypted_volumes_keys_and_rekey() {
    let d = tempfile::tempdir().unwrap();
    let pool = create_pool(d.path(), "64M");
    let k1 = d.path().join("k1");
    let k2 = d.path().join("k2");
    std::fs::write(&k1, "11".repeat(32)).unwrap();
    std::fs::write(&k2, [0x22u8; 32]).unwrap();
    let api = d.path().join("api.sock");
    let k1_arg = format!("--master-key-file={}", k1.display());
    let dm = Daemon::start(d.path(), &pool, &api, &[&k1_arg]);
    let out = ok(&api, &["vol", "create", "sec", "16M", "--encrypt"]);
    assert!(out.contains("created encrypted volume sec"), "{out}");
    ok(&api, &["vol", "create", "plain", "16M"]);
    assert_eq!(json(&api, &["vol", "info", "sec"])["encrypted"], Value::Bool(true));
    assert_eq!(json(&api, &["vol", "info", "plain"])["encrypted"], Value::Bool(false));
    assert!(ok(&api, &["vol", "info", "sec"]).contains("encrypted"));
    // Import into a new encrypted volume (an image whose size is not a multiple of 4096) and
    // export it back: the same bytes, and none of them in the pool file.
    let src = d.path().join("src.raw");
    let img: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&src, &img).unwrap();
    ok(&api, &["import", src.to_str().unwrap(), "imp", "--encrypt"]);
    assert_eq!(json(&api, &["vol", "info", "imp"])["encrypted"], Value::Bool(true));
    let back = d.path().join("back.raw");
    ok(&api, &["export", "imp", back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(&got[..img.len()], &img[..]);
    assert!(got[img.len()..].iter().all(|&b| b == 0));
    let raw = std::fs::read(&pool).unwrap();
    assert!(!raw.windows(64).any(|w| w == &img[4096..4160]), "plaintext of the import in the pool file");
    // An existing plaintext volume is not silently imported into as if encrypted.
    assert!(fails(&api, &["import", src.to_str().unwrap(), "plain", "--encrypt"]).contains("not encrypted"));
    assert_eq!(dm.terminate(), Some(0));

    // No key: locked; the volume is listed, attaching it fails with a clear message.
    let dm = Daemon::start(d.path(), &pool, &api, &[]);
    assert_eq!(json(&api, &["vol", "info", "sec"])["encrypted"], Value::Bool(true));
    let sock = d.path().join("sec.sock");
    let err = fails(&api, &["attach", "sec", "--socket", sock.to_str().unwrap()]);
    assert!(err.contains("master key"), "{err}");
    assert!(fails(&api, &["vol", "create", "sec2", "16M", "--encrypt"]).contains("master key"));
    assert_eq!(dm.terminate(), Some(0));

    // A key from a command works too; a wrong key stops the daemon at startup.
    let cmd = format!("--master-key-cmd=printf '%s' {}", "11".repeat(32));
    let dm = Daemon::start(d.path(), &pool, &api, &[&cmd]);
    ok(&api, &["attach", "sec", "--socket", sock.to_str().unwrap()]);
    ok(&api, &["detach", "sec"]);
    assert_eq!(dm.terminate(), Some(0));
    let k2_arg = format!("--master-key-file={}", k2.display());
    let st = Command::new(BIN).args(["daemon", "--pool"]).arg(&pool).arg("--socket").arg(&api).arg(&k2_arg).output().unwrap();
    assert!(!st.status.success());
    assert!(text(&st.stderr).contains("master key does not match"), "{}", text(&st.stderr));

    // Rekey offline: k1 -> k2. Then k1 is refused and k2 works.
    let fake_api = Path::new("/nonexistent");
    let err = fails(fake_api, &["pool", "rekey", pool.to_str().unwrap(), &k2_arg, "--new-key-file", k1.to_str().unwrap()]);
    assert!(err.contains("master key does not match"), "{err}");
    let out = ok(fake_api, &["pool", "rekey", pool.to_str().unwrap(), &k1_arg, "--new-key-file", k2.to_str().unwrap()]);
    assert!(out.contains("re-wrapped 3 key record(s)"), "{out}");
    let st = Command::new(BIN).args(["daemon", "--pool"]).arg(&pool).arg("--socket").arg(&api).arg(&k1_arg).output().unwrap();
    assert!(!st.status.success());
    let dm = Daemon::start(d.path(), &pool, &api, &[&k2_arg]);
    ok(&api, &["attach", "sec", "--socket", sock.to_str().unwrap()]);
    ok(&api, &["detach", "sec"]);
    assert_eq!(dm.terminate(), Some(0));
}

/// Output that cannot be written is an error message and an exit status, never a panic: a full
/// stdout exits 1 with `vblk: error:`, a closed pipe exits 141 (as a command SIGPIPE killed).
/// `-` is not taken for a file named "-".
#[test]
fn unwritable_output_and_dash_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "64M");
    let api = d.join("api.sock");
    let daemon = Daemon::start(d, &pool, &api, &[]);
    for i in 0..200 {
        ok(&api, &["vol", "create", &format!("volume-with-a-long-name-{i:04}"), "1M"]);
    }
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(BIN).arg("--api-socket").arg(&api).args(["vol", "list"]).stdout(full).stderr(Stdio::piped()).output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("vblk: error: writing to standard output") && !err.contains("panicked"), "{err}");
    // A pipe whose reader has gone (`vblk vol list | head` after head exits).
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let o = Command::new(BIN).arg("--api-socket").arg(&api).args(["vol", "list"]).stdout(w).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "");
    let err = fails(&api, &["import", "-", "x"]);
    assert!(err.contains("standard input"), "{err}");
    let err = fails(&api, &["export", "volume-with-a-long-name-0000", "-"]);
    assert!(err.contains("standard output"), "{err}");
    assert!(!Path::new("-").exists() && !d.join("-").exists());
    assert_eq!(daemon.terminate(), Some(0));
}

/// Attachments outlive the daemon process: a restarted daemon (after SIGTERM or kill -9)
/// attaches every volume that was attached again, at the same socket with the same settings, so
/// QEMU with `reconnect=1` reconnects by itself. `detach` forgets one; attaching the same again
/// is a no-op; `--attach` decides over the recorded settings.
#[test]
fn attachments_survive_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = create_pool(d, "64M");
    let api = d.join("api.sock");
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    let daemon = Daemon::start(d, &pool, &api, &[]);
    ok(&api, &["vol", "create", "a", "4M"]);
    ok(&api, &["vol", "create", "b", "4M"]);
    ok(&api, &["attach", "a", "--socket", sa.to_str().unwrap(), "--queues", "2"]);
    ok(&api, &["attach", "b", "--socket", sb.to_str().unwrap(), "--read-only"]);
    assert_eq!(daemon.terminate(), Some(0));
    assert!(!sa.exists(), "a stopped daemon removes its sockets");

    let summary = |api: &Path| -> Vec<(String, String, u64, bool)> {
        let v = json(api, &["devices"]);
        let mut out: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["volume"].as_str().unwrap().to_string(), a["socket"].as_str().unwrap().to_string(), u(a, "num_queues"), a["read_only"] == true))
            .collect();
        out.sort();
        out
    };
    let want = vec![
        ("a".to_string(), sa.display().to_string(), 2, false),
        ("b".to_string(), sb.display().to_string(), 1, true),
    ];
    let mut daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(summary(&api), want, "after SIGTERM and a restart");
    assert!(std::fs::symlink_metadata(&sa).unwrap().file_type().is_socket());
    // The same attach again (a script written for daemons that forget) succeeds; another fails.
    ok(&api, &["attach", "a", "--socket", sa.to_str().unwrap(), "--queues", "2"]);
    let err = fails(&api, &["attach", "a", "--socket", d.join("other.sock").to_str().unwrap()]);
    assert!(err.contains("already attached"), "{err}");
    // detach forgets b; a rename keeps a's attachment (by volume id).
    ok(&api, &["detach", "b"]);
    ok(&api, &["vol", "rename", "a", "a2"]);
    // kill -9: nothing is cleaned up, the record stays.
    daemon.child.as_mut().unwrap().kill().unwrap();
    daemon.child.as_mut().unwrap().wait().unwrap();
    drop(daemon);
    let daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(summary(&api), vec![("a2".to_string(), sa.display().to_string(), 2, false)], "after kill -9");
    assert_eq!(daemon.terminate(), Some(0));
    // --attach wins over the record.
    let sc = d.join("c.sock");
    let spec = format!("a2:{}:3", sc.display());
    let daemon = Daemon::start(d, &pool, &api, &["--attach", &spec]);
    assert_eq!(summary(&api), vec![("a2".to_string(), sc.display().to_string(), 3, false)]);
    assert!(!sa.exists());
    ok(&api, &["detach", "a2"]);
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(summary(&api), vec![]);
    // A restored attachment no VM has connected to gives way to an explicit attach of its
    // socket (scripts written for daemons that forget their attachments keep working).
    ok(&api, &["attach", "a2", "--socket", sa.to_str().unwrap()]);
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(summary(&api), vec![("a2".to_string(), sa.display().to_string(), 1, false)]);
    ok(&api, &["attach", "b", "--socket", sa.to_str().unwrap()]);
    assert_eq!(summary(&api), vec![("b".to_string(), sa.display().to_string(), 1, false)]);
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = Daemon::start(d, &pool, &api, &[]);
    assert_eq!(summary(&api), vec![("b".to_string(), sa.display().to_string(), 1, false)], "a2's record went with its socket");
    // An attachment the operator made is not replaced.
    ok(&api, &["attach", "b", "--socket", sa.to_str().unwrap()]);
    let err = fails(&api, &["attach", "a2", "--socket", sa.to_str().unwrap()]);
    assert!(err.contains("already used"), "{err}");
    assert_eq!(daemon.terminate(), Some(0));
}
