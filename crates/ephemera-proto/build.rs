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
    // Every public method's path, for the method table's test: a method added to the proto
    // without a row in the table fails it.
    let mut paths = Vec::new();
    for file in fds.file.iter().filter(|f| f.package() == "ephemera.v1") {
        for service in &file.service {
            for method in &service.method {
                paths.push(format!(
                    "    \"/{}.{}/{}\",\n",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("public_methods.rs");
    std::fs::write(
        out,
        format!(
            "pub const PUBLIC_METHODS: &[&str] = &[\n{}];\n",
            paths.concat()
        ),
    )?;
    tonic_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
