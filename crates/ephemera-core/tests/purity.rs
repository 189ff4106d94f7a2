//! The core must stay pure: no async runtime, storage engine, network or TLS stack may enter its
//! dependency tree, so that it can be unit-tested and simulated deterministically.

use std::process::Command;

#[test]
fn core_has_no_io_dependencies() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "ephemera-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.contains("ed25519-dalek"),
        "unexpected cargo tree output: {tree}"
    );
    let forbidden = [
        "tokio", "sled", "tonic", "axum", "rustls", "openraft", "hyper", "mio",
    ];
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(
            !forbidden.contains(&name),
            "ephemera-core depends on {name}"
        );
    }
}
