//! A closed-loop load over vhost-user-blk for profiling a server by hand:
//! `cargo run --release -p vblk-benches --example blkload -- SOCKET read|write BS QD SECS [SPAN_MIB]`
//! (e.g. run `perf record -p <server pid>` meanwhile). Prints IOPS and mean/p99 latency.

use std::path::Path;
use std::time::Duration;

use vblk_benches::vhost::{BenchClient, Pattern, Spec};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        anyhow::bail!("usage: blkload SOCKET read|write BS QD SECS [SPAN_MIB]");
    }
    let bs: u64 = a[3].parse()?;
    let qd: usize = a[4].parse()?;
    let secs: u64 = a[5].parse()?;
    let span: u64 = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(256) << 20;
    let mut c = BenchClient::connect(Path::new(&a[1]), 1, bs as usize * qd)?;
    let spec = Spec {
        write: a[2] == "write",
        bs,
        qd,
        pattern: Pattern::Random,
        span,
        dur: Some(Duration::from_secs(secs)),
        limit: None,
        record_latency: true,
        seed: 1,
    };
    let mut out = c.run(&spec)?;
    print!("{:.0} IOPS ({} ops in {:.2} s)", out.iops(), out.ops, out.secs);
    match out.latency_us() {
        Some((mean, p99)) => println!(", latency mean {mean:.1} µs, p99 {p99:.1} µs"),
        None => println!(),
    }
    Ok(())
}
