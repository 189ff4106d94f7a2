//! End-to-end tests of the guardrails: cluster-wide rate limits, lease budgets, renewal timing,
//! anomaly quarantine and clock skew, over real node processes on loopback.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use ephemera_client::{pb, Client, ClientError, TlsFiles};
use ephemera_pki::{LeafUse, SpiffeId};
use tonic::Code;

/// A client presenting a fresh workload SVID for `spiffe://ephemera.dev/workload/<name>`,
/// talking to `addr` (one node, or all).
fn workload(cluster: &DevCluster, name: &str, addr: &str) -> Client {
    let issued = cluster
        .ca()
        .issue(
            &SpiffeId::parse(&format!("spiffe://ephemera.dev/workload/{name}")).unwrap(),
            LeafUse::Client,
            &[],
            &[],
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let tls = TlsFiles {
        ca_pem: cluster.pki("ca.crt"),
        identity: Some((issued.cert_pem, issued.key_pem)),
    };
    Client::with_tls(addr, None, Some(&tls))
        .unwrap()
        .with_timeout(Duration::from_secs(10))
}

async fn put(c: &Client, role: pb::Role) {
    c.admin_call(
        pb::PutRoleRequest { role: Some(role) },
        |mut a, r| async move { a.put_role(r).await },
    )
    .await
    .expect("put role");
}

fn role(name: &str) -> pb::Role {
    pb::Role {
        name: name.into(),
        kind: "jwt".into(),
        audience: "api.example".into(),
        allowed_scopes: vec!["read".into()],
        default_ttl_s: 600,
        max_ttl_s: 3600,
        ..Default::default()
    }
}

fn issue(role: &str) -> pb::IssueRequest {
    pb::IssueRequest {
        role: role.into(),
        scopes: vec!["read".into()],
        ..Default::default()
    }
}

fn code(e: &ClientError) -> Option<Code> {
    e.code()
}

/// One identity spreading its requests over all three nodes gets no more than the role's
/// per-identity rate plus one burst, cluster-wide; another identity issuing at the same time is
/// not starved by it. Refusals are RESOURCE_EXHAUSTED with a retry-after hint.
#[test]
fn a_per_identity_limit_holds_cluster_wide_and_isolates_identities() {
    const RATE: u64 = 5;
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put(
            &admin,
            pb::Role {
                issue_rate_per_identity: Some(RATE as u32),
                ..role("limited")
            },
        )
        .await;
        let flooders: Vec<Arc<Client>> = cluster
            .apis()
            .iter()
            .map(|a| Arc::new(workload(&cluster, "flooder", a)))
            .collect();
        let polite = workload(&cluster, "polite", &cluster.env["EPHEMERA_ADDR"]);
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let run_for = Duration::from_secs(3);
        let mut tasks = Vec::new();
        for (i, c) in flooders.into_iter().enumerate() {
            for _ in 0..3 {
                let (c, accepted, refused) = (c.clone(), accepted.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    while start.elapsed() < run_for {
                        match c.issue(issue("limited")).await {
                            Ok(_) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                assert_eq!(code(&e), Some(Code::ResourceExhausted), "node {i}: {e}");
                                assert!(e.retry_after().is_some(), "{e}");
                                assert!(e.to_string().contains("per identity"), "{e}");
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
        // The other identity issues at 2/s, under its own limit, all the while.
        let mut polite_ok = 0;
        while start.elapsed() < run_for {
            polite.issue(issue("limited")).await.expect("not starved");
            polite_ok += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let accepted = accepted.load(Ordering::Relaxed);
        let refused = refused.load(Ordering::Relaxed);
        let ceiling = (RATE as f64 * elapsed).ceil() as u64 + RATE;
        println!(
            "flooder: {accepted} accepted, {refused} refused in {elapsed:.2}s (ceiling {ceiling}); polite: {polite_ok} accepted"
        );
        assert!(refused > 0);
        assert!(accepted >= RATE, "{accepted}");
        assert!(accepted <= ceiling, "{accepted} > {ceiling}");
        assert!(polite_ok >= 5);
        let limited = all_leases(&admin)
            .await
            .into_iter()
            .filter(|l| l.role == "limited" && l.subject.ends_with("/flooder"))
            .count() as u64;
        assert_eq!(limited, accepted);
    });
}

/// An identity that re-issues instead of renewing reaches its budget: the (N+1)th live lease is
/// refused precisely and nothing is issued; once one lease is revoked it may issue again.
#[test]
fn the_lease_budget_refuses_the_next_live_lease() {
    let cluster = DevCluster::start(1, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put(
            &admin,
            pb::Role {
                max_live_leases_per_identity: Some(3),
                ..role("budgeted")
            },
        )
        .await;
        let w = workload(&cluster, "reissuer", &cluster.env["EPHEMERA_ADDR"]);
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(w.issue(issue("budgeted")).await.unwrap().lease_id);
        }
        let e = w.issue(issue("budgeted")).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::ResourceExhausted), "{e}");
        assert!(
            e.to_string()
                .contains("already holds 3 live leases of role \"budgeted\""),
            "{e}"
        );
        assert_eq!(all_leases(&admin).await.len(), 3);
        // Another identity has a budget of its own.
        workload(&cluster, "other", &cluster.env["EPHEMERA_ADDR"])
            .issue(issue("budgeted"))
            .await
            .unwrap();
        w.revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::LeaseId(leases[0].clone())),
        })
        .await
        .unwrap();
        w.issue(issue("budgeted")).await.unwrap();
    });
}

/// 1,000 credentials issued with one TTL carry `renew_after` values spread over 50-70% of it,
/// and the client library renews when due, not before.
#[test]
fn renew_after_is_spread_over_the_jitter_window_and_honoured() {
    let cluster = DevCluster::start(1, &[]);
    rt().block_on(async {
        let admin = Arc::new(cluster.client());
        put(&admin, role("fleet")).await;
        let ttl_ms = 1_000_000u64;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let c = admin.clone();
            tasks.push(tokio::spawn(async move {
                let mut fractions = Vec::new();
                for _ in 0..125 {
                    let cred = c
                        .issue(pb::IssueRequest {
                            ttl_s: Some(ttl_ms / 1000),
                            subject: Some("spiffe://ephemera.dev/workload/fleet".into()),
                            ..issue("fleet")
                        })
                        .await
                        .unwrap();
                    fractions
                        .push((cred.renew_after_ms - cred.issued_at_ms) as f64 / ttl_ms as f64);
                }
                fractions
            }));
        }
        let mut fractions = Vec::new();
        for t in tasks {
            fractions.extend(t.await.unwrap());
        }
        assert_eq!(fractions.len(), 1000);
        assert!(
            fractions.iter().all(|f| (0.5..=0.7).contains(f)),
            "out of window"
        );
        // Ten equal bins across the window: each holds a fair share (100 expected).
        let mut bins = [0u32; 10];
        for f in &fractions {
            bins[(((f - 0.5) / 0.02) as usize).min(9)] += 1;
        }
        println!("renew_after bins over 50-70%: {bins:?}");
        assert!(bins.iter().all(|b| *b >= 50), "{bins:?}");

        // The client waits for renew_after before renewing.
        let cred = admin
            .issue(pb::IssueRequest {
                ttl_s: Some(4),
                subject: Some("spiffe://ephemera.dev/workload/fleet".into()),
                ..issue("fleet")
            })
            .await
            .unwrap();
        let renewed = admin.renew_when_due(&cred, 3).await.unwrap();
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now_ms >= cred.renew_after_ms);
        assert!(renewed.expires_at_ms > cred.expires_at_ms);
    });
}

/// An identity whose issuance jumps far above its own habit is flagged, quarantined through
/// Raft (refused on every node) until an administrator releases it.
#[test]
fn an_issuance_spike_quarantines_the_identity_until_released() {
    let dir = tempfile::tempdir().unwrap();
    // Half-second buckets so the baseline forms in seconds, not minutes.
    std::fs::write(
        dir.path().join("node.toml"),
        "[guard]\nquarantine_on = [\"rate_spike\"]\n[guard.anomaly]\nbucket_ms = 500\n\
         warmup_buckets = 4\nrate_z = 4.0\nrate_ratio = 10.0\nmin_burst = 20\n\
         [guard.storm]\nmin_storm_rate_per_s = 100000.0\n",
    )
    .unwrap();
    let cluster = DevCluster::start_in(dir, 3, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put(&admin, role("jobs")).await;
        let w = workload(&cluster, "spiky", &cluster.env["EPHEMERA_ADDR"]);
        // Habit: about one issuance per bucket for three seconds.
        for _ in 0..6 {
            w.issue(issue("jobs")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Then as fast as it can: within a bucket, twenty times the habit and more. The
        // quarantine is written on the leader's next tick; until then issuance goes on.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut burst = 0;
        let e = loop {
            match w.issue(issue("jobs")).await {
                Err(e) => break e,
                Ok(_) => {
                    burst += 1;
                    assert!(Instant::now() < deadline, "never quarantined after {burst}");
                }
            }
        };
        println!("quarantined after a burst of {burst}");
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        assert!(e.to_string().contains("is quarantined"), "{e}");
        // Refused through every node; other identities are unaffected.
        for api in cluster.apis() {
            let e = workload(&cluster, "spiky", &api)
                .issue(issue("jobs"))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("is quarantined"), "{e}");
        }
        workload(&cluster, "calm", &cluster.env["EPHEMERA_ADDR"])
            .issue(issue("jobs"))
            .await
            .unwrap();
        // Nor does it get an X.509-SVID: every kind goes through the same checks.
        let csr = ephemera_pki::new_csr(None).unwrap();
        let e = w
            .issue_svid(pb::IssueSvidRequest {
                csr_pem: csr.cert_pem,
                join_token: None,
                ttl_s: None,
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is quarantined"), "{e}");
        // The leader refuses at once; the quarantine itself is committed on its next tick.
        let deadline = Instant::now() + Duration::from_secs(5);
        let list = loop {
            let list = cluster.cli_json(&["quarantine", "list"]);
            if !list.as_array().unwrap().is_empty() {
                break list;
            }
            assert!(
                Instant::now() < deadline,
                "the quarantine was never committed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let row = &list.as_array().unwrap()[0];
        assert_eq!(row["identity"], "spiffe://ephemera.dev/workload/spiky");
        assert_eq!(row["reason"], "rate_spike");
        let tail = audit_tail(&admin, 1000).await;
        assert!(tail
            .records
            .iter()
            .any(|r| r.action == "guard.event" && r.target.as_deref() == Some("rate_spike")));
        // The leader counted it.
        let mut counted = false;
        for url in cluster.http_urls() {
            let text = cluster.metrics_at(&url).await;
            counted |= text.contains("ephemera_anomalies_total{kind=\"rate_spike\"} 1");
        }
        assert!(counted, "no node counted the anomaly");
        // Released by an administrator, it issues again.
        let out = cluster.cli(&[
            "quarantine",
            "release",
            "spiffe://ephemera.dev/workload/spiky",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        w.issue(issue("jobs")).await.unwrap();
    });
}

/// A node whose clock is off the leader's by more than the bound stops issuing, says why, and
/// reports not ready; the others carry on.
#[test]
fn a_node_with_a_skewed_clock_stops_issuing_and_says_why() {
    let mut cluster = DevCluster::start(3, &[]);
    cluster.kill9(3);
    cluster.update_config(3, |c| c.test_clock_offset_ms = 5000);
    cluster.restart(3);
    let http3 = cluster.http_urls()[2].clone();
    rt().block_on(async {
        let admin = cluster.client();
        put(&admin, role("skew")).await;
        let via3 = workload(&cluster, "w", &cluster.apis()[2]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let e = loop {
            match via3.issue(issue("skew")).await {
                Err(e) if e.to_string().contains("clock") => break e,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "node 3 kept issuing: {other:?}; log: {}",
                        std::fs::read_to_string(cluster.dir.path().join("node-3/node.log"))
                            .unwrap_or_default()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        // UNAVAILABLE: "not executed here, try another node", which the client does.
        assert!(
            e.to_string()
                .contains("ms off the leader's (bound 1000 ms)"),
            "{e}"
        );
        let apis = cluster.apis();
        workload(&cluster, "w", &format!("{},{}", apis[2], apis[0]))
            .issue(issue("skew"))
            .await
            .expect("the client fails over past the skewed node");
        let ready = cluster
            .https(None)
            .get(format!("{http3}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status().as_u16(), 503);
        assert!(ready.text().await.unwrap().contains("clock"));
        let status = cluster.cli_json(&["cluster", "status"]);
        let node3 = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == 3)
            .unwrap()
            .clone();
        assert_eq!(node3["clock_skewed"], true, "{status}");
        assert!(
            node3["clock_offset_ms"].as_i64().unwrap() > 4000,
            "{status}"
        );
        // The other nodes issue as before.
        workload(&cluster, "w", &cluster.apis()[0])
            .issue(issue("skew"))
            .await
            .unwrap();
    });
}

/// A synthetic renewal storm (premature renewals at more than ten times the baseline) is
/// detected by the leader; during it, premature renewals are deferred with a retry-after while a
/// renewal close to expiry still succeeds; `cluster status` shows it; it ends when the rate
/// returns to baseline, and both edges are in the audit chain.
#[test]
fn a_renewal_storm_is_mitigated_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("node.toml"),
        "[guard.storm]\nbucket_ms = 500\nwarmup_buckets = 4\nmin_storm_rate_per_s = 20.0\n",
    )
    .unwrap();
    let cluster = DevCluster::start_in(dir, 3, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put(&admin, role("fleet")).await;
        let w = Arc::new(workload(&cluster, "fleet", &cluster.env["EPHEMERA_ADDR"]));
        let mut leases = Vec::new();
        for _ in 0..20 {
            leases.push(w.issue(issue("fleet")).await.unwrap().lease_id);
        }
        let renew = |w: Arc<Client>, id: String| async move {
            w.renew(pb::RenewRequest {
                lease_id: id,
                ..Default::default()
            })
            .await
        };
        // Baseline: four renewals a second for three seconds.
        for i in 0..12 {
            renew(w.clone(), leases[i % leases.len()].clone())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let near_expiry = w
            .issue(pb::IssueRequest {
                ttl_s: Some(2),
                ..issue("fleet")
            })
            .await
            .unwrap();
        // The storm: eight clients renewing as fast as they can for three seconds.
        let start = Instant::now();
        let deferred = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (w, leases, deferred) = (w.clone(), leases.clone(), deferred.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while start.elapsed() < Duration::from_secs(3) {
                    if let Err(e) = renew(w.clone(), leases[i % leases.len()].clone()).await {
                        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                        assert!(e.to_string().contains("renewal deferred"), "{e}");
                        assert!(e.retry_after().unwrap() > Duration::from_secs(60));
                        deferred.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 8;
                }
            }));
        }
        // Mid-storm: the status says so, and a lease close to expiry still renews.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let status = cluster.cli_json(&["cluster", "status"]);
        assert_eq!(status["renewal_storm"], true, "{status}");
        let left_ms = near_expiry.expires_at_ms as i64
            - SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
        assert!(
            left_ms < 600,
            "{left_ms} ms left: not close enough to expiry"
        );
        renew(w.clone(), near_expiry.lease_id.clone())
            .await
            .expect("a renewal near expiry goes first");
        for t in tasks {
            t.await.unwrap();
        }
        assert!(deferred.load(Ordering::Relaxed) > 100);
        // Back to the baseline: mitigation ends within a few buckets.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        loop {
            let _ = renew(w.clone(), leases[i % leases.len()].clone()).await;
            i += 1;
            let status = cluster.cli_json(&["cluster", "status"]);
            if status["renewal_storm"] == false {
                break;
            }
            assert!(Instant::now() < deadline, "the storm never ended: {status}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Premature renewals go through again.
        renew(w.clone(), leases[0].clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tail = audit_tail(&admin, 1000).await;
        let edges: Vec<&str> = tail
            .records
            .iter()
            .filter(|r| r.action == "guard.event")
            .filter_map(|r| r.target.as_deref())
            .filter(|t| t.starts_with("storm_"))
            .collect();
        assert_eq!(edges, vec!["storm_started", "storm_ended"]);
    });
}

/// A node sheds one identity's flood at its door: beyond the per-identity ingress rate the
/// requests are refused before any policy work, with a retry-after hint, and sampled into the
/// audit chain; another identity on the same node is served.
#[test]
fn a_node_sheds_an_identitys_flood_at_ingress() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("node.toml"),
        "[guard]\ningress_per_identity_per_s = 5\n",
    )
    .unwrap();
    let cluster = DevCluster::start_in(dir, 1, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put(&admin, role("door")).await;
        let w = workload(&cluster, "noisy", &cluster.env["EPHEMERA_ADDR"]);
        let mut refused = None;
        for _ in 0..20 {
            if let Err(e) = w.issue(issue("door")).await {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("the flood was not shed");
        assert_eq!(code(&e), Some(Code::ResourceExhausted), "{e}");
        assert!(
            e.to_string().contains("from one identity to this node"),
            "{e}"
        );
        assert!(e.retry_after().is_some());
        workload(&cluster, "quiet", &cluster.env["EPHEMERA_ADDR"])
            .issue(issue("door"))
            .await
            .unwrap();
        let tail = audit_tail(&admin, 1000).await;
        assert!(tail.records.iter().any(|r| r.action == "guard.event"
            && r.target.as_deref() == Some("refused")
            && r.subject.as_deref() == Some("spiffe://ephemera.dev/workload/noisy")));
    });
}
