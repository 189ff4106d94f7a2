//! CI smoke of the chaos harness: a short seeded run over real nodes with faults injected must
//! finish with no violation, and produce its outputs. It runs the PostgreSQL workload too, on a
//! real server (`tests/run.sh` installs it).

use std::process::Command;

#[test]
fn seeded_chaos_smoke_finds_no_violation() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args([
            "chaos",
            "--seed",
            "20261123",
            "--duration",
            "25s",
            "--clients",
            "4",
            "--postgres",
            "--out",
        ])
        .arg(out.path())
        .output()
        .expect("run ephemera chaos");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "chaos run failed:\n{stdout}\n{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["seed"], 20261123);
    assert_eq!(summary["violations"].as_array().unwrap().len(), 0);
    assert!(summary["operations"].as_u64().unwrap() > 100, "{summary}");
    let faults: u64 = summary["faults"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(faults >= 5, "too few faults injected: {summary}");
    let ok_issues = summary["operations_by_outcome"]["issue"]["ok"]
        .as_u64()
        .unwrap_or(0);
    assert!(ok_issues > 50, "{summary}");
    // The PostgreSQL workload ran against the real server, and its check found the database
    // as the cluster acknowledged it (no violation above).
    let pg = &summary["postgres"];
    assert!(pg["issued"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        pg["revocations_acknowledged"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let history = std::fs::read_to_string(out.path().join("history.jsonl")).unwrap();
    assert_eq!(
        history.lines().count() as u64,
        summary["operations"].as_u64().unwrap()
    );
    let svg = std::fs::read_to_string(out.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    println!("{stdout}");
}
