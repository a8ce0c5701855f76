//! Replays every committed input — fuzz/regressions/<target>/* (crash reproducers, which must
//! pass once fixed) and the seeds in fuzz/corpus/<target>/seed-* — through the targets, as plain
//! tests without libFuzzer or instrumentation:
//!
//!     cargo test --manifest-path fuzz/Cargo.toml -- --test-threads=1
//!
//! (`fuzz/run-ci.sh` replays the same files with the instrumented fuzz binaries.)

use std::path::Path;

fn inputs(dir: &Path, seeds_only: bool) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| !seeds_only || p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.') && n != "README.md"))
        .collect();
    v.sort();
    v
}

#[test]
fn replay_regressions_and_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for (target, run, _) in vblk_fuzz::targets::ALL {
        for (dir, seeds_only) in
            [(root.join("regressions").join(target), false), (root.join("corpus").join(target), true)]
        {
            for f in inputs(&dir, seeds_only) {
                eprintln!("{target}: {}", f.display());
                run(&std::fs::read(&f).unwrap());
                n += 1;
            }
        }
    }
    assert!(n > 0, "no seeds found: run gen-seeds");
}

#[test]
fn seeds_on_disk_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _, seeds) in vblk_fuzz::targets::ALL {
        for (name, bytes) in seeds() {
            let p = root.join(target).join(format!("seed-{name}"));
            let on_disk = std::fs::read(&p).unwrap_or_default();
            assert!(on_disk == bytes, "{} is missing or stale: run gen-seeds (see fuzz/README.md)", p.display());
        }
    }
}
