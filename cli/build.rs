fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/vblk.proto");
    tonic_prost_build::configure().compile_protos(&["proto/vblk.proto"], &["proto"])?;
    Ok(())
}
