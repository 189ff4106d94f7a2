//! The pure crates must stay pure: no async runtime, storage engine, network or TLS stack may
//! enter their dependency trees, so that they can be unit-tested and simulated deterministically.

use std::process::Command;

fn assert_pure(package: &str, expected_dependency: &str) {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
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
        tree.contains(expected_dependency),
        "unexpected cargo tree output for {package}: {tree}"
    );
    let forbidden = [
        "tokio",
        "sled",
        "tonic",
        "axum",
        "rustls",
        "openraft",
        "hyper",
        "mio",
        "tokio-postgres",
    ];
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(!forbidden.contains(&name), "{package} depends on {name}");
    }
}

#[test]
fn core_has_no_io_dependencies() {
    assert_pure("ephemera-core", "ed25519-dalek");
}

#[test]
fn policy_has_no_io_dependencies() {
    assert_pure("ephemera-policy", "cedar-policy");
}
