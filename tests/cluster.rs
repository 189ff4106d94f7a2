//! End-to-end acceptance tests of the cluster core over real `ephemera` processes on loopback.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ephemera_client::{pb, Client, ClientError};
use tonic::Code;

fn code(e: &ClientError) -> Code {
    e.code()
        .unwrap_or_else(|| panic!("expected a status, got {e}"))
}

/// A token issued through a follower verifies with a standard JWT library against the JWKS of
/// another node; after a revoke through node 2, introspection on every node says inactive at once.
#[test]
fn follower_issued_token_verifies_and_revocation_is_seen_by_every_node() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let any = cluster.client();
        put_role(&any, "web", 300, 3600).await;
        let st = status(&any).await;
        let follower = st
            .nodes
            .iter()
            .find(|n| n.role == "follower")
            .expect("a follower")
            .id;
        let other = (1..=3).find(|n| *n != follower).unwrap();

        let cred = cluster
            .node_client(follower)
            .issue(issue_req("web"))
            .await
            .unwrap();
        assert!(cred.lease_id.starts_with("l_"));

        // Verify with jsonwebtoken against the JWKS of another node.
        let rp = RelyingParty::of(&cluster, other as usize).await;
        let c = rp.verify(&cred.token, "api.example").expect("JWT verifies");
        assert_eq!(c["sub"], "spiffe://example.org/ns/ci/sa/runner");
        assert_eq!(c["jti"], cred.lease_id.as_str());
        assert_eq!(c["scope"], "read write");
        assert_eq!(c["client_id"], "spiffe://ephemera.dev/admin");
        assert!(c["nbf"].as_u64().unwrap() < c["iat"].as_u64().unwrap());
        assert_eq!(c["exp"].as_u64().unwrap(), cred.expires_at_ms / 1000);
        // A tampered token does not verify.
        let mut forged = cred.token.clone();
        forged.replace_range(forged.len() - 4.., "AAAA");
        assert!(rp.verify(&forged, "api.example").is_err());

        for n in 1..=3 {
            assert!(
                cluster
                    .node_client(n)
                    .introspect(&cred.token)
                    .await
                    .unwrap()
                    .active,
                "node {n} before revoke"
            );
        }
        let revoked = cluster
            .node_client(2)
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::LeaseId(cred.lease_id.clone())),
            })
            .await
            .unwrap();
        assert_eq!(revoked.revoked, 1);
        // No sleep: the revoke was acknowledged, so every node must already answer inactive.
        for n in 1..=3 {
            let r = cluster
                .node_client(n)
                .introspect(&cred.token)
                .await
                .unwrap();
            assert!(!r.active, "node {n} reports a revoked token active");
            let http = cluster
                .https(None)
                .post(format!(
                    "{}/oauth2/introspect",
                    cluster.http_urls()[n as usize - 1]
                ))
                .bearer_auth(cluster.token())
                .form(&[("token", cred.token.as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(http.status(), 200);
            let body: serde_json::Value = http.json().await.unwrap();
            assert_eq!(
                body,
                serde_json::json!({"active": false}),
                "node {n} over HTTP"
            );
        }
        // Introspection over HTTP requires the credential.
        let unauth = cluster
            .https(None)
            .post(format!("{}/oauth2/introspect", cluster.http_urls()[0]))
            .form(&[("token", cred.token.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(unauth.status(), 401);
    });
    // The audit chain verifies through the CLI, and records the revoke.
    let v = cluster.cli_json(&["audit", "verify"]);
    assert_eq!(v["verified"], true);
    let out = cluster.cli(&["audit", "tail", "-n", "50", "--output", "json"]);
    let tail = String::from_utf8(out.stdout).unwrap();
    assert!(tail.contains("\"action\":\"lease.revoke\""));
    assert!(
        !tail.contains(&cluster.token()),
        "the admin credential leaked into the audit chain"
    );
}

/// Idempotent issue, renewal cap, refusals after revoke and expiry, and bad input that changes
/// nothing, all through the public API.
#[test]
fn issue_renew_and_bad_input_over_the_api() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let c = cluster.client();
        put_role(&c, "ci", 2, 4).await;
        put_role(&c, "web", 60, 3600).await;

        // The same request id through two different nodes: one lease.
        let mut req = issue_req("web");
        req.request_id = Some("job-42-attempt".into());
        let a = cluster.node_client(1).issue(req.clone()).await.unwrap();
        let b = cluster.node_client(3).issue(req.clone()).await.unwrap();
        assert_eq!(a.lease_id, b.lease_id);
        assert!(!a.replayed && b.replayed);
        req.ttl_s = Some(30);
        let conflict = c.issue(req).await.unwrap_err();
        assert_eq!(code(&conflict), Code::AlreadyExists, "{conflict}");

        // Renewal is capped at issue + max TTL.
        let l = c.issue(issue_req("ci")).await.unwrap();
        let r = c
            .renew(pb::RenewRequest {
                lease_id: l.lease_id.clone(),
                increment_s: Some(3600),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.expires_at_ms, l.max_expires_at_ms);
        assert_eq!(l.max_expires_at_ms, l.issued_at_ms + 4000);
        let at_cap = c
            .renew(pb::RenewRequest {
                lease_id: l.lease_id.clone(),
                increment_s: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(code(&at_cap), Code::FailedPrecondition);
        assert!(at_cap.to_string().contains("maximum lifetime"), "{at_cap}");

        // Revoked: renewal refused precisely.
        let v = c.issue(issue_req("web")).await.unwrap();
        c.revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::LeaseId(v.lease_id.clone())),
        })
        .await
        .unwrap();
        let e = c
            .renew(pb::RenewRequest {
                lease_id: v.lease_id.clone(),
                increment_s: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::FailedPrecondition);
        assert!(e.to_string().contains("revoked"), "{e}");

        // Expired: wait for the deadline to pass (a time condition), then renewal is refused.
        let x = c
            .issue(pb::IssueRequest {
                ttl_s: Some(1),
                ..issue_req("ci")
            })
            .await
            .unwrap();
        while std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            <= x.expires_at_ms
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = c
            .renew(pb::RenewRequest {
                lease_id: x.lease_id.clone(),
                increment_s: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::FailedPrecondition);
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(!c.introspect(&x.token).await.unwrap().active);
        // The leader's expiry worker marks it expired from the deadline index.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let expired = c
                .list_leases(pb::ListLeasesRequest {
                    state: Some("expired".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            if expired.leases.iter().any(|l| l.id == x.lease_id) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lease {} was never marked expired",
                x.lease_id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Bad input: precise errors, and nothing changes.
        let before = all_leases(&cluster.node_client(1)).await;
        let roles_before = c
            .admin_call(pb::ListRolesRequest {}, |mut a, r| async move {
                a.list_roles(r).await
            })
            .await
            .unwrap();
        let cases: Vec<(pb::IssueRequest, Code, &str)> = vec![
            (issue_req("ghost"), Code::NotFound, "unknown role"),
            (
                pb::IssueRequest {
                    ttl_s: Some(7200),
                    ..issue_req("web")
                },
                Code::InvalidArgument,
                "exceeds the maximum TTL",
            ),
            (
                pb::IssueRequest {
                    scopes: vec!["admin".into()],
                    ..issue_req("web")
                },
                Code::PermissionDenied,
                "none of the requested scopes (admin)",
            ),
            (
                pb::IssueRequest {
                    audience: Some("evil".into()),
                    ..issue_req("web")
                },
                Code::InvalidArgument,
                "audience",
            ),
            (
                pb::IssueRequest {
                    role: "bad role!".into(),
                    ..issue_req("web")
                },
                Code::InvalidArgument,
                "role name",
            ),
        ];
        for (req, want, text) in cases {
            let e = c.issue(req).await.unwrap_err();
            assert_eq!(code(&e), want, "{e}");
            assert!(e.to_string().contains(text), "{e} should mention {text}");
        }
        let oversized = c
            .issue(pb::IssueRequest {
                purpose: Some("x".repeat(100_000)),
                ..issue_req("web")
            })
            .await
            .unwrap_err();
        assert!(
            matches!(code(&oversized), Code::OutOfRange | Code::ResourceExhausted),
            "{oversized}"
        );
        let malformed = c.introspect("not.a.jwt!").await.unwrap_err();
        assert_eq!(code(&malformed), Code::InvalidArgument);
        assert!(
            malformed.to_string().contains("malformed token"),
            "{malformed}"
        );
        for token in [None, Some("eph_admin_wrong".to_string())] {
            let anon = Client::with_tls(
                &cluster.env["EPHEMERA_ADDR"],
                token,
                Some(&cluster.anonymous_tls()),
            )
            .unwrap();
            let e = anon.issue(issue_req("web")).await.unwrap_err();
            assert_eq!(code(&e), Code::Unauthenticated, "{e}");
            let e = anon
                .renew(pb::RenewRequest {
                    lease_id: a.lease_id.clone(),
                    increment_s: None,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(code(&e), Code::Unauthenticated, "{e}");
        }
        let e = c
            .revoke(pb::RevokeRequest { target: None })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::InvalidArgument);
        let e = c
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::LeaseId("l_doesnotexist".into())),
            })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::NotFound);
        assert_eq!(all_leases(&cluster.node_client(1)).await, before);
        let roles_after = c
            .admin_call(pb::ListRolesRequest {}, |mut a, r| async move {
                a.list_roles(r).await
            })
            .await
            .unwrap();
        assert_eq!(roles_after, roles_before);
    });
    // The CLI reports errors on stderr with a non-zero exit.
    let out = cluster.cli(&["issue", "--role", "web", "--ttl", "2h"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the maximum TTL"));
    let json = cluster.cli_json(&["issue", "--role", "web", "--ttl", "5m"]);
    for field in ["lease_id", "token", "expires_at", "renew_after"] {
        assert!(
            json.get(field).is_some(),
            "issue --output json lacks {field}"
        );
    }
}

/// Revoking by role over 10,000 leases is one committed log entry and one call.
#[test]
fn revoke_by_role_over_ten_thousand_leases_is_one_entry() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let c = Arc::new(cluster.client());
        put_role(&c, "batch", 3600, 7200).await;
        put_role(&c, "keep", 3600, 7200).await;
        let kept = c.issue(issue_req("keep")).await.unwrap();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..(10_000 / 64 + 1) {
                    // The per-identity issuance limit (1000/s) is not what this test is about:
                    // a refusal says when to retry, and the test does.
                    loop {
                        match c.issue(issue_req("batch")).await {
                            Ok(_) => break,
                            Err(ClientError::Status(s)) if s.code() == Code::ResourceExhausted => {
                                tokio::time::sleep(Duration::from_millis(5)).await
                            }
                            Err(e) => panic!("issue failed: {e}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let issued = 64 * (10_000 / 64 + 1);
        println!("issued {issued} leases in {:?}", started.elapsed());
        let node1 = cluster.node_client(1);
        let before = converged(
            &[
                cluster.node_client(1),
                cluster.node_client(2),
                cluster.node_client(3),
            ],
            Duration::from_secs(30),
        )
        .await;
        let started = Instant::now();
        let r = node1
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::Role("batch".into())),
            })
            .await
            .unwrap();
        println!(
            "revoked {} leases in one call in {:?}",
            r.revoked,
            started.elapsed()
        );
        assert_eq!(r.revoked, issued as u64);
        let after = digest(&node1).await;
        assert_eq!(
            after.applied_index,
            before[0].applied_index + 1,
            "revoke-by-role must be one log entry"
        );
        let active = node1
            .list_leases(pb::ListLeasesRequest {
                state: Some("active".into()),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            active
                .leases
                .iter()
                .map(|l| l.id.clone())
                .collect::<Vec<_>>(),
            vec![kept.lease_id]
        );
    });
}

/// `kill -9` of the leader under a stream of issues: every acknowledged issue survives on every
/// node, writes resume, the restarted node catches up, and all digests and audit heads agree.
#[test]
fn leader_crash_under_load_loses_no_acknowledged_issue() {
    let mut cluster = DevCluster::start(3, &[]);
    let rt = rt();
    let (acked, leader, failover) = rt.block_on(async {
        let c = cluster.client();
        put_role(&c, "web", 600, 3600).await;
        let leader = status(&c).await.leader_id;
        let acked = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..8 {
            let (acked, stop) = (acked.clone(), stop.clone());
            let client = cluster.client().with_timeout(Duration::from_secs(5));
            workers.push(tokio::spawn(async move {
                let mut errors = 0;
                while !stop.load(Ordering::Relaxed) {
                    match client.issue(issue_req("web")).await {
                        Ok(cred) => acked.lock().unwrap().push((Instant::now(), cred.lease_id)),
                        Err(_) => errors += 1,
                    }
                }
                errors
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed_at = Instant::now();
        cluster.kill9(leader);
        tokio::time::sleep(Duration::from_millis(3000)).await;
        stop.store(true, Ordering::Relaxed);
        let mut errors = 0;
        for w in workers {
            errors += w.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        let before = acked.iter().filter(|(t, _)| *t < killed_at).count();
        let failover = acked.iter().map(|(t, _)| *t).find(|t| *t > killed_at).map(|t| t - killed_at);
        println!(
            "acknowledged {} issues ({before} before the kill), {errors} errors; first success after kill -9 of leader {leader}: {failover:?}",
            acked.len()
        );
        assert!(before > 0, "no issue was acknowledged before the crash");
        assert!(failover.is_some(), "writes did not resume after the leader crashed");
        (acked.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), leader, failover)
    });
    println!("failover (kill -9 to first acknowledged write): {failover:?}");
    cluster.restart(leader);
    rt.block_on(async {
        let clients: Vec<Client> = (1..=3).map(|n| cluster.node_client(n)).collect();
        // Writes through every node, including the restarted one.
        for c in &clients {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match c.issue(issue_req("web")).await {
                    Ok(_) => break,
                    Err(e) => {
                        assert!(
                            Instant::now() < deadline,
                            "writes through a node did not resume: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        let digests = converged(&clients, Duration::from_secs(30)).await;
        assert!(digests
            .windows(2)
            .all(|w| w[0].audit_head_hash == w[1].audit_head_hash));
        let acked: HashSet<String> = acked.into_iter().collect();
        for (i, c) in clients.iter().enumerate() {
            let held: HashSet<String> = all_leases(c)
                .await
                .into_iter()
                .filter(|l| l.state == "active")
                .map(|l| l.id)
                .collect();
            let missing: Vec<_> = acked.difference(&held).collect();
            assert!(
                missing.is_empty(),
                "node {} lost acknowledged leases: {missing:?}",
                i + 1
            );
        }
    });
    let v = cluster.cli_json(&["audit", "verify"]);
    assert_eq!(v["verified"], true);
    // The CLI fails over past a dead endpoint.
    cluster.kill9(leader);
    let out = cluster.cli(&["keys", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node added after the log was compacted catches up by snapshot; `cluster remove` takes it out.
#[test]
fn node_added_after_compaction_catches_up_by_snapshot() {
    let mut cluster = DevCluster::start(3, &["--snapshot-logs", "20"]);
    let (api4, _) = cluster.start_new_node(4);
    rt().block_on(async {
        let c = cluster.client();
        put_role(&c, "web", 600, 3600).await;
        let mut ids = Vec::new();
        for _ in 0..60 {
            ids.push(c.issue(issue_req("web")).await.unwrap().lease_id);
        }
        leader_log_compacted(&cluster, &c).await;

        let joined = cluster.cli_json(&["cluster", "join", "--node", &api4]);
        let nodes = joined["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 4);
        let n4 = nodes.iter().find(|n| n["id"] == 4).unwrap();
        let http4 = format!("https://{}", n4["http_addr"].as_str().unwrap());
        let c4 = Client::with_tls(&api4, None, Some(&cluster.admin_tls())).unwrap();
        let clients = vec![
            cluster.node_client(1),
            cluster.node_client(2),
            cluster.node_client(3),
            c4,
        ];
        converged(&clients, Duration::from_secs(30)).await;
        let metrics4 = cluster.metrics_at(&http4).await;
        assert!(
            metric(&metrics4, "ephemera_raft_snapshot_index") > 0,
            "node 4 did not install a snapshot"
        );
        let held: HashSet<String> = all_leases(&clients[3])
            .await
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert!(ids.iter().all(|id| held.contains(id)));

        let status = cluster.cli_json(&["cluster", "status"]);
        let roles: Vec<&str> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles.iter().filter(|r| **r == "leader").count(),
            1,
            "{status}"
        );
        assert!(status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["applied_index"].as_u64().unwrap() > 0));

        let removed = cluster.cli_json(&["cluster", "remove", "4"]);
        assert_eq!(removed["nodes"].as_array().unwrap().len(), 3, "{removed}");
    });
}

/// A client that first reaches a follower learns the leader from its answer and sends its
/// later writes there: the follower forwards only the first, and the leader serves the rest.
/// Reads stay where they were sent.
#[test]
fn writes_go_to_the_leader_the_nodes_name() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let any = cluster.client();
        put_role(&any, "web", 300, 3600).await;
        let leader = status(&any).await.leader_id;
        let follower = (1..=3).find(|n| *n != leader).unwrap();
        let apis = cluster.apis();
        let mut order = vec![apis[follower as usize - 1].clone()];
        order.extend(
            (1..=3u64)
                .filter(|n| *n != follower)
                .map(|n| apis[n as usize - 1].clone()),
        );
        let client = Client::with_tls(&order.join(","), None, Some(&cluster.admin_tls()))
            .unwrap()
            .with_timeout(Duration::from_secs(10));
        let counters = |node: u64| {
            let url = cluster.http_urls()[node as usize - 1].clone();
            let cluster = &cluster;
            async move {
                let text = cluster.metrics_at(&url).await;
                [
                    "ephemera_credentials_issued_total",
                    "ephemera_forwarded_total",
                    "ephemera_revoke_requests_total",
                    "ephemera_introspections_total",
                ]
                .map(|name| metric(&text, name))
            }
        };
        let (f0, l0) = (counters(follower).await, counters(leader).await);

        let mut creds = Vec::new();
        for _ in 0..5 {
            creds.push(client.issue(issue_req("web")).await.unwrap());
        }
        client
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::LeaseId(
                    creds[0].lease_id.clone(),
                )),
            })
            .await
            .unwrap();
        assert!(!client.introspect(&creds[0].token).await.unwrap().active);

        let (f1, l1) = (counters(follower).await, counters(leader).await);
        let delta = |a: [u64; 4], b: [u64; 4]| [0, 1, 2, 3].map(|i| b[i] - a[i]);
        let (f, l) = (delta(f0, f1), delta(l0, l1));
        assert_eq!(f[0], 1, "the follower served only the first issue: {f:?}");
        assert_eq!(f[1], 1, "and forwarded it: {f:?}");
        assert_eq!(l[0], 4, "the leader served the other four: {l:?}");
        assert_eq!((f[2], l[2]), (0, 1), "the revoke went to the leader");
        assert_eq!((f[3], l[3]), (1, 0), "the read stayed on the follower");
    });
}

/// Group commit puts many commands in one log entry, and openraft's snapshot policy counts
/// entries: the node also snapshots (and so purges the log) after `--snapshot-logs` commands,
/// or a busy cluster's log would grow without bound.
#[test]
fn the_log_is_compacted_by_commands_when_entries_carry_many() {
    let cluster = DevCluster::start(3, &["--snapshot-logs", "300"]);
    rt().block_on(async {
        let c = Arc::new(cluster.client());
        put_role(&c, "web", 600, 3600).await;
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let c = c.clone();
            clients.spawn(async move {
                for _ in 0..10 {
                    c.issue(issue_req("web")).await.unwrap();
                }
            });
        }
        while let Some(done) = clients.join_next().await {
            done.unwrap();
        }
        // Fewer entries than the threshold, so only the count of commands can have triggered
        // the compaction.
        let metrics = leader_log_compacted(&cluster, &c).await;
        let entries = metric(&metrics, "ephemera_leader_entries_total");
        let commands = metric(&metrics, "ephemera_leader_commands_total");
        assert!(
            commands >= 1000 && entries < 250,
            "1,000 concurrent issuances share entries: {commands} commands in {entries}"
        );
    });
}

/// Waits until the leader has snapshotted and purged its log (both run in the background once
/// a threshold is passed); the leader's metrics then.
async fn leader_log_compacted(cluster: &DevCluster, c: &Client) -> String {
    let leader = status(c).await.leader_id;
    let http = &cluster.http_urls()[leader as usize - 1];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = cluster.metrics_at(http).await;
        if metric(&metrics, "ephemera_raft_purged_index") > 0 {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the leader's log was not compacted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// No signing key appears in the clear anywhere in any node's directory (log, state, snapshots),
/// in raw, hex or base64 form.
#[test]
fn no_private_key_in_the_clear_in_any_data_directory() {
    let mut cluster = DevCluster::start(3, &["--snapshot-logs", "10"]);
    rt().block_on(async {
        let c = cluster.client();
        put_role(&c, "web", 600, 3600).await;
        for _ in 0..3 {
            c.admin_call(pb::RotateKeyRequest::default(), |mut a, r| async move {
                a.rotate_key(r).await
            })
            .await
            .unwrap();
            for _ in 0..10 {
                c.issue(issue_req("web")).await.unwrap();
            }
        }
    });
    cluster.stop();
    let dir = cluster.dir.path().to_path_buf();
    let kek = ephemera_core::crypto::Kek::parse(&std::fs::read_to_string(dir.join("kek")).unwrap())
        .unwrap();
    let (_log, sm) = ephemera_raft::store::open(&dir.join("node-1/data")).unwrap();
    let keys = ephemera_core::state::list_keys(&sm.view()).unwrap();
    assert_eq!(keys.len(), 4);
    drop(sm);
    drop(_log);

    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    assert!(
        files.iter().any(|(p, _)| p.ends_with("snapshot.bin")),
        "no snapshot was written"
    );
    use base64::Engine;
    for k in &keys {
        let seed =
            ephemera_core::crypto::unseal_private_key(&kek, &k.kid, &k.sealed_private_key).unwrap();
        let forms: Vec<Vec<u8>> = vec![
            seed.to_vec(),
            hex::encode(&seed[..]).into_bytes(),
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(&seed[..])
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&seed[..])
                .into_bytes(),
        ];
        for (path, bytes) in &files {
            for form in &forms {
                assert!(
                    !bytes.windows(form.len()).any(|w| w == form.as_slice()),
                    "private key {} in the clear in {}",
                    k.kid,
                    path.display()
                );
            }
        }
        // The search itself works: the public key is stored in the clear.
        assert!(files
            .iter()
            .any(|(_, b)| b.windows(32).any(|w| w == k.public_key)));
    }
}

/// The method table fails closed: a gRPC method or an HTTP route without a row is refused by
/// the gate before any handler runs, and a row's authentication holds for every caller.
#[test]
fn a_method_without_a_row_in_the_method_table_is_refused() {
    let cluster = DevCluster::start(1, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        let e = admin
            .call(|ch| async move {
                let mut grpc = tonic::client::Grpc::new(ch);
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                grpc.unary::<_, pb::Credential, _>(
                    tonic::Request::new(pb::IssueRequest::default()),
                    "/ephemera.v1.Issuer/IssueEverything".parse().unwrap(),
                    tonic::codec::ProstCodec::default(),
                )
                .await
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::Unimplemented), "{e}");
        assert!(e.to_string().contains("no row in the method table"), "{e}");
        // An admin method refuses a workload at the gate, whatever the handler would do.
        let e = cluster
            .client_as("workload", None)
            .admin_call(pb::ListRolesRequest {}, |mut a, r| async move {
                a.list_roles(r).await
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
        // HTTP: an unknown route, and a known path with a method it has no row for.
        let http = cluster.https(None);
        let url = &cluster.http_urls()[0];
        for (method, path) in [
            (reqwest::Method::GET, "/v1/secrets"),
            (reqwest::Method::GET, "/oauth2/introspect"),
            (reqwest::Method::DELETE, "/v1/ssh/krl"),
        ] {
            let r = http
                .request(method.clone(), format!("{url}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                reqwest::StatusCode::NOT_FOUND,
                "{method} {path}"
            );
            let body = r.text().await.unwrap();
            assert!(body.contains("no row in the method table"), "{body}");
        }
        // The public rows need no credential.
        let r = http
            .get(format!("{url}/v1/ssh/ca.pub"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    });
}
