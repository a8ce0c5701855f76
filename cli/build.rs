fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/vblk.proto");
    tonic_prost_build::configure()
        // `--json` output prints the API messages as they are.
        .type_attribute(".vblk.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/vblk.proto"], &["proto"])?;
    Ok(())
}
