//! Writes the seed corpus: `fuzz/corpus/<target>/seed-<name>` for every target's `seeds()`.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --features seeds --bin gen-seeds
//!
//! Seeds are named `seed-*` (kept in git, see fuzz/.gitignore); what libFuzzer adds to a corpus
//! directory while fuzzing (SHA-1 names) is not.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (target, _, seeds) in vblk_fuzz::targets::ALL {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) {
                std::fs::remove_file(p)?;
            }
        }
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(format!("seed-{name}")), &bytes)?;
            total += bytes.len();
        }
        println!("{}: {} seeds", dir.display(), seeds().len());
    }
    println!("{total} bytes in all");
    Ok(())
}
