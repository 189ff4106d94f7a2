//! `harness large-state`: a 3-node Ephemera cluster holding a million live leases. Reports the
//! fill rate, disk and memory per node, the time for a killed and restarted node to serve
//! again, and the time for a new node to join and serve (it catches up by installing a
//! snapshot, the log behind the last one having been purged).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client};
use serde_json::{json, Value};

use crate::cluster::{disk_usage, memory_of, EphemeraCluster};
use crate::Flags;

const MIB: f64 = 1024.0 * 1024.0;

pub async fn run(flags: &Flags) -> Result<()> {
    let leases = flags.number("leases", 1_000_000)?;
    let concurrency = flags.number("concurrency", 64)?.to_string();
    let dir = PathBuf::from(flags.value("dir").unwrap_or("target/bench/large-state"));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    eprintln!(
        "harness: starting a 3-node Ephemera cluster in {}",
        dir.display()
    );
    let mut eph = EphemeraCluster::start(&dir, 3).await?;
    // Leases live 6 hours: all of them are still live when the figures are taken.
    eph.cli(
        "admin",
        &[
            "role",
            "put",
            "bench",
            "--audience",
            "bench",
            "--scopes",
            "read",
            "--ttl",
            "6h",
            "--max-ttl",
            "12h",
        ],
    )?;
    let tls = eph.workload_tls()?;
    let probe = Client::with_tls(&eph.api.join(","), None, Some(&tls))?
        .issue(pb::IssueRequest {
            role: "bench".into(),
            ttl_s: Some(6 * 3600),
            ..Default::default()
        })
        .await
        .context("issuing the probe lease")?;

    eprintln!("harness: issuing {leases} leases");
    let count = leases.to_string();
    let fill_started = Instant::now();
    let fill: Value = serde_json::from_str(&eph.cli(
        "workload",
        &[
            "--output",
            "json",
            "bench",
            "--workload",
            "issue",
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--warmup",
            "0s",
            "--ttl-s",
            "21600",
        ],
    )?)?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    let issued = fill["operations"]["issue"]["ok"].as_u64().unwrap_or(0);
    let fill_errors = &fill["operations"]["issue"]["errors"];
    eprintln!("harness: issued {issued} in {fill_s:.0} s; errors {fill_errors}");

    // Every node has applied everything before the figures are taken.
    wait_converged(&eph, Duration::from_secs(300)).await?;
    let mut nodes = Vec::new();
    for (i, pid) in eph.pids().iter().enumerate() {
        let (rss, peak) = memory_of(*pid).unwrap_or((0, 0));
        let disk = disk_usage(&eph.node_dir(i as u64 + 1).join("data"));
        nodes.push(json!({"node": i + 1, "disk_mib": disk as f64 / MIB,
                          "rss_mib": rss as f64 / MIB, "peak_rss_mib": peak as f64 / MIB}));
    }

    eprintln!(
        "harness: disk and memory per node: {}",
        Value::Array(nodes.clone())
    );

    // A follower killed with -9 and started again, until it answers an introspection itself.
    let leader = eph.leader().await?;
    let restarted_id = (1..=3u64).find(|id| *id != leader).expect("a follower");
    // Returns once the process is gone and its storage lock is free.
    eph.kill9(restarted_id)?;
    let restart_at = Instant::now();
    eph.restart(restarted_id)?;
    let restart_serving = serving(
        &eph.api[(restarted_id - 1) as usize],
        &tls,
        &probe.token,
        restart_at,
    )
    .await?;
    eprintln!(
        "harness: node {restarted_id} serves {:.0} ms after its restart",
        restart_serving.as_secs_f64() * 1000.0
    );

    // A fourth node joins: it must install the leader's snapshot (1M leases) to catch up.
    let new_api = eph.start_new_node(4)?;
    wait_reachable(&new_api, &tls).await?;
    let join_at = Instant::now();
    eph.cli("admin", &["cluster", "join", "--node", &new_api])?;
    let joined = join_at.elapsed();
    let new_serving = serving(&new_api, &tls, &probe.token, join_at).await?;
    let new_disk = disk_usage(&eph.node_dir(4).join("data"));
    let new_mem = memory_of(eph.pids()[3]).unwrap_or((0, 0));
    let installed_snapshot = std::fs::read_to_string(eph.node_dir(4).join("node.log"))
        .map(|log| log.contains("snapshot"))
        .unwrap_or(false);
    eph.stop();

    let report = json!({
        "leases": issued,
        "fill_s": fill_s,
        "fill_per_s": issued as f64 / fill_s.max(1e-9),
        "fill_errors": fill_errors,
        "nodes": nodes,
        "restarted_node": restarted_id,
        "restart_to_serving_ms": restart_serving.as_secs_f64() * 1000.0,
        "new_node_join_ms": joined.as_secs_f64() * 1000.0,
        "new_node_serving_ms": new_serving.as_secs_f64() * 1000.0,
        "new_node_disk_mib": new_disk as f64 / MIB,
        "new_node_rss_mib": new_mem.0 as f64 / MIB,
        "new_node_log_mentions_snapshot": installed_snapshot,
    });
    let mut text = format!(
        "Large state: {issued} live leases on 3 Ephemera nodes, issued in {fill_s:.0} s ({:.0}/s, {concurrency} clients).\n\n\
         | node | disk MiB | RSS MiB | peak RSS MiB |\n|---:|---:|---:|---:|\n",
        issued as f64 / fill_s.max(1e-9)
    );
    for n in &nodes {
        text.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |\n",
            n["node"],
            n["disk_mib"].as_f64().unwrap_or(0.0),
            n["rss_mib"].as_f64().unwrap_or(0.0),
            n["peak_rss_mib"].as_f64().unwrap_or(0.0)
        ));
    }
    text.push_str(&format!(
        "\nNode {restarted_id} (a follower), killed with -9 and restarted: serving {:.0} ms after it was started.\n\
         A new node 4: `cluster join` returned after {:.0} ms; serving (snapshot installed) {:.0} ms after the join began; {:.0} MiB on disk, {:.0} MiB RSS.\n",
        restart_serving.as_secs_f64() * 1000.0,
        joined.as_secs_f64() * 1000.0,
        new_serving.as_secs_f64() * 1000.0,
        new_disk as f64 / MIB,
        new_mem.0 as f64 / MIB,
    ));
    println!("{text}");
    std::fs::write(dir.join("report.md"), &text)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// Until every node reports the same applied index.
async fn wait_converged(eph: &EphemeraCluster, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = eph.status().await {
            let applied: Vec<u64> = s.nodes.iter().map(|n| n.applied_index).collect();
            if !applied.is_empty() && applied.iter().all(|a| *a == applied[0]) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the nodes did not converge");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_reachable(addr: &str, tls: &ephemera_client::TlsFiles) -> Result<()> {
    let client = Client::with_tls(addr, None, Some(tls))?.with_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // Any answer (even "not part of a cluster") means the node listens.
        match client.introspect("x").await {
            Err(ephemera_client::ClientError::AllUnreachable { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => return Ok(()),
        }
    }
    bail!("node at {addr} did not start")
}

/// From `since` until the node at `addr` (alone, no failover) reports `token` active.
async fn serving(
    addr: &str,
    tls: &ephemera_client::TlsFiles,
    token: &str,
    since: Instant,
) -> Result<Duration> {
    let client = Client::with_tls(addr, None, Some(tls))?.with_timeout(Duration::from_millis(500));
    let deadline = since + Duration::from_secs(600);
    loop {
        if let Ok(r) = client.introspect(token).await {
            if r.active {
                return Ok(since.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("node at {addr} did not serve within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
