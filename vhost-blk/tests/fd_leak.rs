//! Reconnections must not leak file descriptors (eventfds, epolls, io_urings, sockets). Alone
//! in its own test binary so no other test opens or closes descriptors meanwhile.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn reconnections_do_not_leak_file_descriptors() {
    let s = setup();
    let dev = device(&s, 4);
    let cycle = || {
        let mut c = Client::connect(&s.socket, 4).unwrap();
        assert!(dev.connected());
        assert_eq!(c.read(3, 0, 0, 4096), 0);
        drop(c);
        wait_for("disconnect", || !dev.connected());
        // Let the listener finish tearing the connection down.
        std::thread::sleep(Duration::from_millis(200));
    };
    cycle();
    let fds = open_fds();
    for _ in 0..5 {
        cycle();
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked across reconnections");
    assert_eq!(dev.stats().connections, 6);
    dev.stop().unwrap();
}
