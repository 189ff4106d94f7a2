//! A seconds-long smoke of `ephemera bench` (benchmarks are not tests: this only proves the tool
//! works end to end and reports what it measured).

mod common;

use common::*;

#[test]
fn the_load_generator_runs_a_bounded_mix_and_reports_it() {
    let cluster = DevCluster::start(1, &[]);
    rt().block_on(async { put_role(&cluster.client(), "bench", 600, 3600).await });
    let report = cluster.dir.path().join("report.json");
    let out = cluster.cli_json(&[
        "bench",
        "--workload",
        "issue=40,renew=20,revoke=10,introspect=20,introspect-http=10",
        "--concurrency",
        "4",
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--pool",
        "200",
        "--report",
        report.to_str().unwrap(),
        "--http",
        &cluster.env["EPHEMERA_HTTP"],
    ]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(saved, out);
    assert_eq!(out["mode"], "closed");
    for op in ["issue", "renew", "revoke", "introspect", "introspect-http"] {
        let o = &out["operations"][op];
        assert!(o["ok"].as_u64().unwrap() > 0, "{op}: {o}");
        assert!(o["p50_ms"].as_f64().unwrap() > 0.0, "{op}: {o}");
        assert!(o["p99_ms"].as_f64().unwrap() >= o["p50_ms"].as_f64().unwrap());
        assert!(o["errors"].as_object().unwrap().is_empty(), "{op}: {o}");
    }

    // Open loop, bounded by count.
    let out = cluster.cli_json(&[
        "bench",
        "--workload",
        "issue",
        "--rate",
        "100",
        "--count",
        "50",
        "--warmup",
        "0s",
    ]);
    assert_eq!(out["mode"], "open");
    assert_eq!(out["operations"]["issue"]["ok"], 50);

    // A benchmark must be bounded, and stays on loopback unless told otherwise.
    let unbounded = cluster.cli(&["bench", "--workload", "issue"]);
    assert!(!unbounded.status.success());
    assert!(String::from_utf8_lossy(&unbounded.stderr).contains("must be bounded"));
    let remote = std::process::Command::new(BIN)
        .args(["bench", "--count", "1", "--addr", "10.1.2.3:7000"])
        .env("EPHEMERA_CA", &cluster.env["EPHEMERA_CA"])
        .output()
        .unwrap();
    assert!(!remote.status.success());
    assert!(String::from_utf8_lossy(&remote.stderr).contains("--allow-remote"));
}
