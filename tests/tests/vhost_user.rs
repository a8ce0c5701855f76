//! vhost-user-blk path from the host: the real `vblk` daemon, a real vhost-user-blk client
//! (libblkio through the `blkio` crate). No guest needed.

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use vblk_tests::*;

const MIB: u64 = 1 << 20;

fn setup(vol_size: &str) -> (tempfile::TempDir, Daemon, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    daemon.cli(&["vol", "create", "v", vol_size]).unwrap();
    let sock = d.path().join("v.sock");
    daemon.cli(&["attach", "v", "--socket", sock.to_str().unwrap()]).unwrap();
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    (d, daemon, sock)
}

#[test]
fn random_writes_read_back_and_config() {
    let (_d, daemon, sock) = setup("64M");
    let mut c = BlkClient::connect(&sock, 32 * 4096).unwrap();
    assert_eq!(c.capacity().unwrap(), 64 * MIB);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut model: HashMap<u64, u64> = HashMap::new();
    for round in 1..=20u64 {
        // 32 random 4 KiB writes in flight at once.
        let mut lbas: Vec<u64> = (0..32).map(|_| rng.random_range(0..(64 * MIB / 4096))).collect();
        lbas.sort();
        lbas.dedup();
        for (i, &l) in lbas.iter().enumerate() {
            let b = pattern_block(l, round);
            c.buf()[i * 4096..(i + 1) * 4096].copy_from_slice(&b);
            model.insert(l, round);
        }
        let offs: Vec<u64> = lbas.iter().map(|l| l * 4096).collect();
        c.write_batch(&offs).unwrap();
    }
    c.flush().unwrap();
    for (&l, &ver) in &model {
        assert_eq!(c.read_data(l * 4096, 4096).unwrap(), pattern_block(l, ver), "block {l}");
    }
    // Unwritten blocks read as zeros; a multi-block read spans holes and data.
    let l = (0..).find(|l| !model.contains_key(l) && model.contains_key(&(l + 1))).unwrap();
    let two = c.read_data(l * 4096, 8192).unwrap();
    assert!(two[..4096].iter().all(|&b| b == 0));
    assert_eq!(&two[4096..], &pattern_block(l + 1, model[&(l + 1)])[..]);
    // Out of range fails with an error, the device keeps working.
    assert!(c.read_expect_err(64 * MIB, 4096).unwrap() < 0);
    assert_eq!(c.read_data(l * 4096 + 4096, 4096).unwrap(), pattern_block(l + 1, model[&(l + 1)]));
    let info = daemon.json(&["vol", "info", "v"]).unwrap();
    assert_eq!(info["allocated_bytes"].as_u64().unwrap(), model.len() as u64 * 4096, "{info}");
}

#[test]
fn flushed_writes_survive_kill9_of_the_daemon() {
    let (d, mut daemon, sock) = setup("32M");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut flushed: HashMap<u64, u64> = HashMap::new();
    {
        let mut c = BlkClient::connect(&sock, 32 * 4096).unwrap();
        for round in 1..=10u64 {
            let mut batch = HashMap::new();
            for _ in 0..32 {
                batch.insert(rng.random_range(0..(32 * MIB / 4096)), round);
            }
            let lbas: Vec<u64> = batch.keys().copied().collect();
            for (i, &l) in lbas.iter().enumerate() {
                c.buf()[i * 4096..(i + 1) * 4096].copy_from_slice(&pattern_block(l, round));
            }
            c.write_batch(&lbas.iter().map(|l| l * 4096).collect::<Vec<_>>()).unwrap();
            c.flush().unwrap();
            flushed.extend(batch);
        }
        // Unflushed writes, then kill -9 while the client is still connected.
        for (i, l) in (0..16u64).enumerate() {
            c.buf()[i * 4096..(i + 1) * 4096].copy_from_slice(&pattern_block(l, 999));
        }
        c.write_batch(&(0..16u64).map(|l| l * 4096).collect::<Vec<_>>()).unwrap();
        daemon.kill9();
    }
    let pool = daemon.pool.clone();
    let sock2 = d.path().join("v2.sock");
    let daemon2 = Daemon::start(d.path(), &pool, &[format!("--attach=v:{}", sock2.display())]).unwrap();
    wait_for_socket(&sock2, Duration::from_secs(10)).unwrap();
    let mut c = BlkClient::connect(&sock2, 4096).unwrap();
    for (&l, &ver) in &flushed {
        let got = c.read_data(l * 4096, 4096).unwrap();
        if l < 16 {
            assert!(got == pattern_block(l, ver) || got == pattern_block(l, 999), "block {l}");
        } else {
            assert_eq!(got, pattern_block(l, ver), "block {l} lost its flushed content");
        }
    }
    let check = daemon2.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
}

#[test]
fn discard_and_write_zeroes_free_space() {
    let (_d, daemon, sock) = setup("64M");
    let mut c = BlkClient::connect(&sock, MIB as usize).unwrap();
    for b in c.buf().iter_mut() {
        *b = 0x5a;
    }
    for i in 0..8 {
        c.write(i * MIB, MIB as usize).unwrap();
    }
    c.flush().unwrap();
    let used = |d: &Daemon| d.json(&["pool", "status"]).unwrap()["used_bytes"].as_u64().unwrap();
    assert_eq!(used(&daemon), 8 * MIB);
    c.discard(0, 2 * MIB).unwrap();
    c.write_zeroes(4 * MIB, 2 * MIB).unwrap();
    c.flush().unwrap();
    // Freed space becomes visible once the commit is durable.
    let t0 = std::time::Instant::now();
    while used(&daemon) != 4 * MIB && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(used(&daemon), 4 * MIB);
    for (off, zero) in [(0, true), (MIB, true), (2 * MIB, false), (4 * MIB, true), (5 * MIB, true), (7 * MIB, false)] {
        let data = c.read_data(off, MIB as usize).unwrap();
        assert_eq!(data.iter().all(|&b| b == 0), zero, "MiB at {off}");
        if !zero {
            assert!(data.iter().all(|&b| b == 0x5a));
        }
    }
    let st = daemon.json(&["pool", "status"]).unwrap();
    assert_eq!(st["volumes"][0]["allocated_bytes"].as_u64().unwrap(), 4 * MIB, "{st}");
}

/// Snapshots taken through the API while a vhost-user-blk client keeps random writes in flight
/// on two queues: each one completes quickly (the freeze drains the queues' requests through the
/// device's worker threads), the writes keep going around them, and deleting the snapshots
/// afterwards leaves exactly the volume's own blocks allocated.
#[test]
fn snapshots_while_writing_through_vhost_user() {
    let d = tempfile::tempdir().unwrap();
    // Each snapshot may keep a copy of the whole written span: 9 x 16 MiB fit.
    let pool = Daemon::create_pool(d.path(), "512M").unwrap();
    let daemon = Daemon::start(d.path(), &pool, &[]).unwrap();
    daemon.cli(&["vol", "create", "v", "64M"]).unwrap();
    let sock = d.path().join("v.sock");
    daemon.cli(&["attach", "v", "--socket", sock.to_str().unwrap(), "--queues", "2"]).unwrap();
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let load = Load { queues: 2, qd: 32, bs: 4096, write: true, span: 16 * MIB, dur: Duration::from_secs(4), seed: 7 };
    let mut took = Vec::new();
    let trace = std::thread::scope(|s| {
        let h = s.spawn(|| run_load(&sock, &load));
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..8 {
            let t0 = std::time::Instant::now();
            daemon.cli(&["snap", "create", &format!("v@s{i}")]).unwrap();
            took.push(t0.elapsed());
            std::thread::sleep(Duration::from_millis(250));
        }
        match h.join().unwrap() {
            Ok(t) => t,
            Err(e) => panic!("the writer failed: {e:#}; daemon log: {}", daemon.log_tail()),
        }
    });
    assert!(trace.total() > 1000, "the writer made progress: {} writes", trace.total());
    for (i, t) in took.iter().enumerate() {
        assert!(*t < Duration::from_secs(2), "snapshot s{i} took {t:?} under load");
    }
    let snaps = daemon.json(&["snap", "list", "v"]).unwrap();
    assert_eq!(snaps.as_array().map(|a| a.len()), Some(8), "{snaps}");
    let c = daemon.json(&["check"]).unwrap();
    assert_eq!(c["clean"], true, "{c}");
    // Deletes while the writes go on (commits and dead-list sweeps interleave).
    let load2 = Load { seed: 8, dur: Duration::from_secs(3), ..load.clone() };
    std::thread::scope(|s| {
        let h = s.spawn(|| run_load(&sock, &load2));
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..4 {
            daemon.cli(&["snap", "delete", &format!("v@s{i}")]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Err(e) = h.join().unwrap() {
            panic!("the writer failed: {e:#}; daemon log: {}", daemon.log_tail());
        }
    });
    let c = daemon.json(&["check"]).unwrap();
    assert_eq!(c["clean"], true, "{c}");
    for i in 4..8 {
        daemon.cli(&["snap", "delete", &format!("v@s{i}")]).unwrap();
    }
    let st = daemon.json(&["pool", "status"]).unwrap();
    let info = daemon.json(&["vol", "info", "v"]).unwrap();
    let (used, pending, own) = (st["used_bytes"].as_u64().unwrap(), st["pending_free_bytes"].as_u64().unwrap(), info["allocated_bytes"].as_u64().unwrap());
    assert_eq!(used - pending, own, "after deleting every snapshot only the volume's blocks remain: {st} {info}");
    let c = daemon.json(&["check"]).unwrap();
    assert_eq!(c["clean"], true, "{c}");
}

/// An encrypted volume over vhost-user-blk: 4096-byte logical blocks, random writes read back,
/// flushed data survives kill -9, the pool file holds no plaintext, and a daemon without the
/// master key cannot serve it.
#[test]
fn encrypted_volume_over_vhost_user() {
    let d = tempfile::tempdir().unwrap();
    let pool = Daemon::create_pool(d.path(), "256M").unwrap();
    let key = d.path().join("master.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let key_arg = format!("--master-key-file={}", key.display());
    let mut daemon = Daemon::start(d.path(), &pool, std::slice::from_ref(&key_arg)).unwrap();
    daemon.cli(&["vol", "create", "e", "32M", "--encrypt"]).unwrap();
    assert_eq!(daemon.json(&["vol", "info", "e"]).unwrap()["encrypted"], serde_json::Value::Bool(true));
    let sock = d.path().join("e.sock");
    daemon.cli(&["attach", "e", "--socket", sock.to_str().unwrap()]).unwrap();
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut model: HashMap<u64, u64> = HashMap::new();
    {
        let mut c = BlkClient::connect(&sock, 32 * 4096).unwrap();
        assert_eq!(c.prop_i32("request-alignment").unwrap(), 4096);
        for round in 1..=8u64 {
            let mut lbas: Vec<u64> = (0..32).map(|_| rng.random_range(0..(32 * MIB / 4096))).collect();
            lbas.sort();
            lbas.dedup();
            for (i, &l) in lbas.iter().enumerate() {
                c.buf()[i * 4096..(i + 1) * 4096].copy_from_slice(&pattern_block(l, round));
                model.insert(l, round);
            }
            c.write_batch(&lbas.iter().map(|l| l * 4096).collect::<Vec<_>>()).unwrap();
        }
        c.flush().unwrap();
        for (&l, &ver) in &model {
            assert_eq!(c.read_data(l * 4096, 4096).unwrap(), pattern_block(l, ver), "block {l}");
        }
        daemon.kill9();
    }
    // No plaintext block in the pool file.
    let raw = std::fs::read(&pool).unwrap();
    let (&l0, &v0) = model.iter().next().unwrap();
    let needle = &pattern_block(l0, v0)[..256];
    assert!(!raw.windows(needle.len()).any(|w| w == needle), "plaintext of block {l0} found in the pool file");
    drop(raw);
    // Without the key the volume cannot be attached; with it, everything flushed is there.
    let locked = Daemon::start(d.path(), &pool, &[]).unwrap();
    let s2 = d.path().join("e2.sock");
    assert!(locked.cli(&["attach", "e", "--socket", s2.to_str().unwrap()]).is_err());
    drop(locked);
    let daemon2 = Daemon::start(d.path(), &pool, &[key_arg, format!("--attach=e:{}", s2.display())]).unwrap();
    wait_for_socket(&s2, Duration::from_secs(10)).unwrap();
    let mut c = BlkClient::connect(&s2, 4096).unwrap();
    for (&l, &ver) in &model {
        assert_eq!(c.read_data(l * 4096, 4096).unwrap(), pattern_block(l, ver), "block {l} after kill -9");
    }
    drop(c);
    let check = daemon2.json(&["check"]).unwrap();
    assert_eq!(check["clean"], serde_json::Value::Bool(true), "{check}");
}

/// `vblk detach` refuses to pull a device from under a connected VM (its I/O would hang), as
/// SPDK refuses to delete a controller with a live connection; `--force` does it anyway. Once
/// the client has gone, a plain detach works (it waits out a disconnect in progress).
#[test]
fn detach_is_refused_while_a_frontend_is_connected() {
    let (_d, daemon, sock) = setup("16M");
    let mut c = BlkClient::connect(&sock, 4096).unwrap();
    c.write_data(0, &[7u8; 4096]).unwrap();
    let err = daemon.cli(&["detach", "v"]).expect_err("detach with a connected client must be refused").to_string();
    assert!(err.contains("in use") && err.contains("--force"), "{err}");
    let err = daemon.cli(&["detach", "--socket", sock.to_str().unwrap()]).expect_err("also by socket").to_string();
    assert!(err.contains("in use"), "{err}");
    // Still attached and serving.
    assert_eq!(daemon.json(&["devices"]).unwrap()[0]["connected"], true);
    assert_eq!(c.read_data(0, 4096).unwrap(), vec![7u8; 4096]);
    drop(c);
    // Right after the client went away: detach waits for the disconnect instead of refusing.
    daemon.cli(&["detach", "v"]).unwrap();
    assert!(!sock.exists(), "the socket is removed");
    // --force detaches a device with a client connected.
    daemon.cli(&["attach", "v", "--socket", sock.to_str().unwrap()]).unwrap();
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let mut c = BlkClient::connect(&sock, 4096).unwrap();
    assert_eq!(c.read_data(0, 4096).unwrap(), vec![7u8; 4096]);
    daemon.cli(&["detach", "v", "--force"]).unwrap();
    assert_eq!(daemon.json(&["devices"]).unwrap().as_array().map(|a| a.len()), Some(0));
}
