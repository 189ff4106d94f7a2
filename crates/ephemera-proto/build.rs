// Compiles proto/ with protox (pure Rust), so building needs no `protoc` binary.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let fds = protox::compile(
        [
            "ephemera/v1/ephemera.proto",
            "ephemera/internal/v1/cluster.proto",
        ],
        [root],
    )?;
    tonic_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
