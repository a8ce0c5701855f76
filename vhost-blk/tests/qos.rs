//! QoS in the device: requests over the limit wait in the virtqueue (not failed), the timer
//! resumes the queue, a live change applies to a waiting queue, and a frontend that goes away
//! (or reconnects) while requests wait is handled. libblkio as the frontend.

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use common::*;
use vblk_vhost::qos::{Limit, LimitKind, Limits, VolumeQos};
use vblk_vhost::{start_with_qos, DeviceConfig};

/// Submit `n` 4 KiB reads on queue 0 at once.
fn submit_reads(c: &mut Client, n: usize) {
    for i in 0..n {
        let p = (c.buf.addr + i * 4096) as *mut u8;
        c.qs[0].read(i as u64 * 4096, p, 4096, i, blkio::ReqFlags::empty());
    }
}

/// Wait up to `timeout` for completions on queue 0; returns how many came (all succeeded).
fn reap(c: &mut Client, max: usize, timeout: Duration) -> usize {
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..max).map(|_| MaybeUninit::uninit()).collect();
    let mut got = 0;
    let t0 = Instant::now();
    while got < max {
        let Some(mut left) = timeout.checked_sub(t0.elapsed()) else { break };
        let n = match c.qs[0].do_io(&mut comps[..max - got], 1, Some(&mut left), None) {
            Ok(n) => n,
            Err(e) if e.errno().raw_os_error() == libc::ETIME => 0,
            Err(e) => panic!("{}", be(e)),
        };
        if n == 0 {
            break;
        }
        for x in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            assert_eq!(unsafe { x.assume_init_ref() }.ret, 0, "a held-back request failed");
        }
        got += n;
    }
    got
}

#[test]
fn held_back_requests_wait_in_the_ring_and_survive_changes_and_disconnects() {
    let s = setup();
    // 10 IOPS, bucket of 2 ops.
    let limits = Limits::default().with(LimitKind::IopsTotal, Limit { rate_per_sec: 10, burst: 2, burst_secs: 0 });
    let qos = VolumeQos::new(limits).unwrap();
    let vol = s.pool.open_volume("v", false).unwrap();
    let dev = start_with_qos(vol, DeviceConfig::new(&s.socket), qos.clone()).unwrap();

    let mut c = Client::connect(&s.socket, 1).unwrap();
    submit_reads(&mut c, 32);
    // 2 at once, then one per 100 ms: about 7 in 0.5 s; the rest wait, none fails.
    let n = reap(&mut c, 32, Duration::from_millis(500));
    assert!((5..=9).contains(&n), "{n} completions in 0.5 s at 10 IOPS");
    assert!(qos.stats().throttle_events > 0);

    // Lifting the limit reaches the waiting queue within the re-check interval.
    let t0 = Instant::now();
    qos.set_limits(Limits::default()).unwrap();
    let rest = reap(&mut c, 32 - n, Duration::from_secs(5));
    assert_eq!(rest, 32 - n);
    assert!(t0.elapsed() < Duration::from_millis(200), "the change took {:?}", t0.elapsed());

    // Limit again, fill the ring, and disconnect while requests wait.
    qos.set_limits(Limits::default().with(LimitKind::IopsTotal, Limit::rate(5))).unwrap();
    submit_reads(&mut c, 32);
    let n = reap(&mut c, 32, Duration::from_millis(300));
    assert!(n < 32, "{n}");
    drop(c);
    wait_for("disconnect", || !dev.connected());

    // A new frontend is served (at the limit), and time spent waiting was counted.
    let mut c = Client::connect(&s.socket, 1).unwrap();
    qos.set_limits(Limits::default()).unwrap();
    submit_reads(&mut c, 32);
    assert_eq!(reap(&mut c, 32, Duration::from_secs(5)), 32);
    let st = qos.stats();
    assert!(st.throttled_ns > 300_000_000, "{st:?}");
    assert!(st.read_ops >= 64 && st.read_bytes == st.read_ops * 4096, "{st:?}");
    drop(c);
    dev.stop().unwrap();
}

#[test]
fn queues_of_a_device_share_its_limit() {
    let s = setup();
    let qos = VolumeQos::new(Limits::default().with(LimitKind::IopsRead, Limit::rate(200))).unwrap();
    let vol = s.pool.open_volume("v", false).unwrap();
    let dev = start_with_qos(vol, DeviceConfig { socket: s.socket.clone(), num_queues: 4, queue_size: 256, threads: 0, pin_memory: false }, qos.clone()).unwrap();
    let mut c = Client::connect(&s.socket, 4).unwrap();
    // Four queues, each keeping 8 reads in flight for 2 s: 200/s + 20 of burst in total.
    let t0 = Instant::now();
    let mut done = [0usize; 4];
    for q in 0..4 {
        for i in 0..8 {
            let p = (c.buf.addr + (q * 8 + i) * 4096) as *mut u8;
            c.qs[q].read((i * 4096) as u64, p, 4096, i, blkio::ReqFlags::empty());
        }
    }
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..8).map(|_| MaybeUninit::uninit()).collect();
    while t0.elapsed() < Duration::from_secs(2) {
        for (q, (queue, done)) in c.qs.iter_mut().zip(done.iter_mut()).enumerate() {
            let mut zero = Duration::ZERO;
            let n = queue.do_io(&mut comps, 0, Some(&mut zero), None).unwrap();
            for x in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let x = unsafe { x.assume_init_ref() };
                assert_eq!(x.ret, 0);
                let p = (c.buf.addr + (q * 8 + x.user_data) * 4096) as *mut u8;
                queue.read(0, p, 4096, x.user_data, blkio::ReqFlags::empty());
            }
            *done += n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let total: usize = done.iter().sum();
    assert!((400..=440).contains(&total), "{total} reads in 2 s over 4 queues: {done:?}");
    assert!(done.iter().all(|&d| d >= 50), "a queue was starved: {done:?}");
    // Drain what is still in flight before stopping.
    qos.set_limits(Limits::default()).unwrap();
    for q in 0..4 {
        let mut left = Duration::from_secs(5);
        let mut got = 0;
        while got < 8 {
            let n = c.qs[q].do_io(&mut comps[..8 - got], 1, Some(&mut left), None).unwrap();
            assert!(n > 0, "queue {q} did not drain");
            got += n;
        }
    }
    drop(c);
    dev.stop().unwrap();
}
