//! End-to-end tests of workload identity over real TLS on loopback.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use ephemera_client::{pb, Client, TlsFiles};
use ephemera_pki::{Ca, LeafUse, SpiffeId};
use tonic::Code;

const WORKLOAD: &str = "spiffe://ephemera.dev/workload/demo";

fn tls_with(cluster: &DevCluster, cert: &str, key: &str) -> TlsFiles {
    TlsFiles {
        ca_pem: cluster.pki("ca.crt"),
        identity: Some((cert.to_string(), key.to_string())),
    }
}

/// A valid X.509-SVID authenticates as its SPIFFE ID; certificates of a wrong trust domain, an
/// untrusted CA, expired ones, and ones with no or two URI SANs are refused with a precise
/// status, and each refusal is in the audit chain.
#[test]
fn svids_authenticate_workloads_and_bad_certificates_are_refused_and_audited() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        put_role(&cluster.client(), "web", 300, 3600).await;
        let workload = Client::with_tls(
            &cluster.env["EPHEMERA_ADDR"],
            None,
            Some(&tls_with(
                &cluster,
                &cluster.pki("workload.crt"),
                &cluster.pki("workload.key"),
            )),
        )
        .unwrap();
        // The principal is the SPIFFE ID: the credential is bound to it.
        let cred = workload
            .issue(pb::IssueRequest {
                role: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(cred.subject, WORKLOAD);
        let claims = workload.introspect(&cred.token).await.unwrap();
        assert!(claims.active);
        assert_eq!(
            (claims.sub.as_str(), claims.client_id.as_str()),
            (WORKLOAD, WORKLOAD)
        );
        // A workload is not an administrator, and cannot issue for someone else.
        let e = workload
            .list_leases(pb::ListLeasesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
        let e = workload
            .issue(pb::IssueRequest {
                role: "web".into(),
                subject: Some("spiffe://ephemera.dev/other".into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
        // The HTTP listener accepts the same credential.
        let http = cluster.https(Some((
            &cluster.pki("workload.crt"),
            &cluster.pki("workload.key"),
        )));
        let body: serde_json::Value = http
            .post(format!("{}/oauth2/introspect", cluster.http_urls()[1]))
            .form(&[("token", cred.token.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["active"], true);
        assert_eq!(body["sub"], WORKLOAD);

        let now = SystemTime::now();
        let ours = cluster.ca();
        let elsewhere = Ca::generate("elsewhere.test", now, Duration::from_secs(3600)).unwrap();
        let rogue = Ca::generate("ephemera.dev", now, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::parse("spiffe://ephemera.dev/workload/x").unwrap();
        let hour = Duration::from_secs(3600);
        let cases = vec![
            (
                "wrong trust domain",
                elsewhere
                    .issue(
                        &SpiffeId::parse("spiffe://elsewhere.test/w").unwrap(),
                        LeafUse::Client,
                        &[],
                        &[],
                        now,
                        hour,
                    )
                    .unwrap(),
                "no trust bundle for trust domain \"elsewhere.test\"",
            ),
            (
                "untrusted CA",
                rogue
                    .issue(&id, LeafUse::Client, &[], &[], now, hour)
                    .unwrap(),
                "not signed by the trust bundle",
            ),
            (
                "expired",
                ours.issue_raw(
                    &["spiffe://ephemera.dev/workload/old"],
                    now - 2 * hour,
                    hour,
                )
                .unwrap(),
                "expired",
            ),
            (
                "no URI SAN",
                ours.issue_raw(&[], now, hour).unwrap(),
                "no SPIFFE ID",
            ),
            (
                "two URI SANs",
                ours.issue_raw(
                    &["spiffe://ephemera.dev/a", "spiffe://ephemera.dev/b"],
                    now,
                    hour,
                )
                .unwrap(),
                "2 URI SANs",
            ),
        ];
        for (what, issued, message) in &cases {
            let c = Client::with_tls(
                &cluster.apis()[0],
                None,
                Some(&tls_with(&cluster, &issued.cert_pem, &issued.key_pem)),
            )
            .unwrap();
            let e = c
                .issue(pb::IssueRequest {
                    role: "web".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(Code::Unauthenticated), "{what}: {e}");
            assert!(
                e.to_string().contains(message),
                "{what}: {e} should say {message:?}"
            );
        }
        let tail = audit_tail(&cluster.client(), 200).await;
        let denials: Vec<_> = tail
            .records
            .iter()
            .filter(|r| r.action == "auth.denied")
            .collect();
        assert_eq!(denials.len(), cases.len(), "{denials:?}");
        assert!(denials
            .iter()
            .all(|r| r.outcome == "denied" && r.reason.is_some()));
        assert!(denials
            .iter()
            .any(|r| r.target.as_deref() == Some("spiffe://elsewhere.test/w")));
        let issue = tail
            .records
            .iter()
            .find(|r| r.lease_id.as_deref() == Some(cred.lease_id.as_str()))
            .unwrap();
        assert_eq!(
            (issue.actor.as_str(), issue.auth_method.as_str()),
            (WORKLOAD, "x509_svid")
        );
        assert_eq!(issue.actor_issuer.as_deref(), Some("ephemera.dev"));
    });
}

/// A node holding a certificate for another node id cannot join and receives no Raft traffic;
/// the cluster listener refuses clients that are not cluster nodes.
#[test]
fn a_node_with_another_nodes_certificate_cannot_join() {
    let mut cluster = DevCluster::start(3, &[]);
    // A genuine node 4 process, which the cluster is asked to add as node 5.
    let (api4, http4) = cluster.start_new_node(4);
    rt().block_on(async {
        let admin = cluster.client();
        let impostor = Client::with_tls(&api4, None, Some(&cluster.anonymous_tls())).unwrap();
        let mut info = impostor
            .admin_call(pb::NodeInfoRequest {}, |mut a, r| async move {
                a.get_node_info(r).await
            })
            .await
            .unwrap();
        assert_eq!(info.id, 4);
        info.id = 5;
        let e = admin
            .admin_call(
                pb::AddNodeRequest { node: Some(info) },
                |mut a, r| async move { a.add_node(r).await },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        assert!(
            e.to_string()
                .contains("spiffe://ephemera.dev/ephemera/node/5"),
            "{e}"
        );
        let members = status(&admin).await.nodes;
        assert_eq!(members.len(), 3, "membership changed: {members:?}");
        let metrics = cluster.metrics_at(&format!("https://{http4}")).await;
        for gauge in ["ephemera_raft_term 0", "ephemera_raft_last_log_index 0"] {
            assert!(
                metrics.contains(gauge),
                "node 4 received Raft traffic:\n{metrics}"
            );
        }
    });
    // The cluster listener only takes node certificates. It serves no Admin RPC, so a caller
    // that gets through TLS is answered UNIMPLEMENTED; a refused one fails in the transport.
    let cluster_addr = cluster.config(1).cluster_addr.to_string();
    let probe = |cert: &str, key: &str| {
        let tls = tls_with(&cluster, cert, key);
        rt().block_on(async {
            Client::with_tls(&cluster_addr, None, Some(&tls))
                .unwrap()
                .admin_call(pb::NodeInfoRequest {}, |mut a, r| async move {
                    a.get_node_info(r).await
                })
                .await
                .unwrap_err()
        })
    };
    let node_dir = cluster.dir.path().join("node-2");
    let as_node = probe(
        &std::fs::read_to_string(node_dir.join("tls.crt")).unwrap(),
        &std::fs::read_to_string(node_dir.join("tls.key")).unwrap(),
    );
    assert_eq!(as_node.code(), Some(Code::Unimplemented), "{as_node}");
    let as_admin = probe(&cluster.pki("admin.crt"), &cluster.pki("admin.key"));
    assert_ne!(
        as_admin.code(),
        Some(Code::Unimplemented),
        "the cluster listener accepted a non-node certificate"
    );
}

/// The certificates `ephemera dev` issues verify with OpenSSL against the bundle and carry
/// their SPIFFE ID as a URI SAN.
#[test]
fn openssl_accepts_the_dev_certificates() {
    let cluster = DevCluster::start(1, &[]);
    let pki = cluster.dir.path().join("pki");
    for cert in [
        pki.join("workload.crt"),
        pki.join("admin.crt"),
        cluster.dir.path().join("node-1/tls.crt"),
    ] {
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(pki.join("ca.crt"))
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The keys are in a form OpenSSL (and so curl) reads.
    for key in [
        pki.join("admin.key"),
        pki.join("workload.key"),
        cluster.dir.path().join("node-1/tls.key"),
    ] {
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            key.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(pki.join("workload.crt"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("URI:{WORKLOAD}")));
}

/// A join token redeemed concurrently on two nodes yields exactly one X.509-SVID; reuse and
/// expired tokens are refused. The SVID verifies with OpenSSL against the bundle, names its
/// SPIFFE ID, authenticates its holder, and stops working once its lease is revoked.
#[test]
fn join_tokens_are_single_use_cluster_wide_and_yield_verifiable_svids() {
    let cluster = DevCluster::start(3, &[]);
    let out = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let admin = cluster.client();
        let create = |id: &str, ttl_s: u64| {
            let admin = &admin;
            let id = id.to_string();
            async move {
                admin
                    .admin_call(
                        pb::CreateJoinTokenRequest {
                            spiffe_id: id,
                            ttl_s,
                        },
                        |mut a, r| async move { a.create_join_token(r).await },
                    )
                    .await
                    .unwrap()
            }
        };
        let token = create("spiffe://ephemera.dev/ci/runner", 600).await.token;
        let redeem = |node: u64, token: String| {
            let csr = ephemera_pki::new_csr(None).unwrap();
            let client = Client::with_tls(
                &cluster.apis()[node as usize - 1],
                None,
                Some(&cluster.anonymous_tls()),
            )
            .unwrap();
            async move {
                let r = client
                    .issue_svid(pb::IssueSvidRequest {
                        csr_pem: csr.cert_pem.clone(),
                        join_token: Some(token),
                        ttl_s: None,
                    })
                    .await;
                (r, csr.key_pem)
            }
        };
        let ((a, key_a), (b, key_b)) =
            tokio::join!(redeem(1, token.clone()), redeem(3, token.clone()));
        let (svid, key) = match (a, b) {
            (Ok(s), Err(e)) => {
                assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
                (s, key_a)
            }
            (Err(e), Ok(s)) => {
                assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
                (s, key_b)
            }
            (a, b) => panic!(
                "exactly one redemption must win: {:?} / {:?}",
                a.map(|s| s.lease_id),
                b.map(|s| s.lease_id)
            ),
        };
        assert_eq!(svid.spiffe_id, "spiffe://ephemera.dev/ci/runner");
        let (reuse, _) = redeem(2, token).await;
        let reuse = reuse.unwrap_err();
        assert!(reuse.to_string().contains("already used"), "{reuse}");
        let short = create("spiffe://ephemera.dev/ci/short", 1).await;
        // Wait for the condition itself: the token's expiry has passed.
        while (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64)
            <= short.expires_at_ms
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (expired, _) = redeem(1, short.token).await;
        assert!(expired.unwrap_err().to_string().contains("expired"));

        std::fs::write(out.path().join("svid.pem"), &svid.cert_pem).unwrap();
        std::fs::write(out.path().join("bundle.pem"), &svid.bundle_pem).unwrap();
        // The SVID authenticates its holder as its SPIFFE ID...
        let holder = Client::with_tls(
            &cluster.env["EPHEMERA_ADDR"],
            None,
            Some(&tls_with(&cluster, &svid.cert_pem, &key)),
        )
        .unwrap();
        put_role(&admin, "web", 300, 3600).await;
        let cred = holder
            .issue(pb::IssueRequest {
                role: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(cred.subject, "spiffe://ephemera.dev/ci/runner");
        // ...and is a revocable lease.
        admin
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::LeaseId(svid.lease_id.clone())),
            })
            .await
            .unwrap();
        let e = holder
            .issue(pb::IssueRequest {
                role: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
        assert!(e.to_string().contains("revoked"), "{e}");
    });
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.path().join("bundle.pem"))
        .arg(out.path().join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out.path().join("svid.pem"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("URI:spiffe://ephemera.dev/ci/runner"));
}

/// SVIDs go through the one pipeline: rotating an SVID revokes the one it replaces (which then
/// no longer authenticates), and a policy that forbids the workload `issue` on the SVID role
/// refuses the rotation, on every node.
#[test]
fn svid_rotation_supersedes_the_old_svid_and_obeys_policy() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        let token = admin
            .admin_call(
                pb::CreateJoinTokenRequest {
                    spiffe_id: "spiffe://ephemera.dev/svc/rotator".into(),
                    ttl_s: 600,
                },
                |mut a, r| async move { a.create_join_token(r).await },
            )
            .await
            .unwrap()
            .token;
        let fetch = |client: Client, join_token: Option<String>| async move {
            let csr = ephemera_pki::new_csr(None).unwrap();
            client
                .issue_svid(pb::IssueSvidRequest {
                    csr_pem: csr.cert_pem.clone(),
                    join_token,
                    ttl_s: Some(600),
                })
                .await
                .map(|s| (s, csr.key_pem))
        };
        let anonymous =
            Client::with_tls(&cluster.apis()[0], None, Some(&cluster.anonymous_tls())).unwrap();
        let (first, first_key) = fetch(anonymous, Some(token)).await.unwrap();
        let holder = |node: usize, cert: &str, key: &str| {
            Client::with_tls(
                &cluster.apis()[node],
                None,
                Some(&tls_with(&cluster, cert, key)),
            )
            .unwrap()
        };
        let (second, second_key) = fetch(holder(1, &first.cert_pem, &first_key), None)
            .await
            .unwrap();
        assert_eq!(second.spiffe_id, first.spiffe_id);
        assert_ne!(second.lease_id, first.lease_id);
        let leases = all_leases(&admin).await;
        let state = |id: &str| {
            leases
                .iter()
                .find(|l| l.id == id)
                .map(|l| (l.state.clone(), l.kind.clone()))
                .unwrap()
        };
        assert_eq!(state(&first.lease_id), ("revoked".into(), "x509-svid".into()));
        assert_eq!(state(&second.lease_id), ("active".into(), "x509-svid".into()));
        let e = fetch(holder(2, &first.cert_pem, &first_key), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
        // Policy: workloads may no longer obtain SVIDs (everything else as before).
        let policy = format!(
            "{}\n@id(\"no-svids\")\nforbid (principal is Ephemera::Workload, action == Ephemera::Action::\"issue\", resource == Ephemera::Role::\"x509-svid\");\n",
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policies/dev.cedar")).unwrap()
        );
        let proposal = admin
            .admin_call(
                pb::ProposePolicyRequest {
                    text: policy,
                    comment: None,
                },
                |mut a, r| async move { a.propose_policy(r).await },
            )
            .await
            .unwrap();
        cluster
            .client_as("approver", None)
            .admin_call(
                pb::ApprovePolicyRequest {
                    proposal_id: proposal.id,
                },
                |mut a, r| async move { a.approve_policy(r).await },
            )
            .await
            .unwrap();
        for node in 0..3 {
            let e = fetch(holder(node, &second.cert_pem, &second_key), None)
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
            assert!(e.to_string().contains("no-svids"), "{e}");
        }
        // The refused rotation left the current SVID alone.
        let leases = all_leases(&admin).await;
        let current = leases.iter().find(|l| l.id == second.lease_id).unwrap();
        assert_eq!(current.state, "active");
        put_role(&admin, "web", 300, 3600).await;
        // It still authenticates, and JWTs are still allowed.
        holder(0, &second.cert_pem, &second_key)
            .issue(pb::IssueRequest {
                role: "web".into(),
                scopes: vec!["read".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

/// JWT assertions from a configured issuer authenticate workloads; a wrong audience, an
/// assertion expired beyond the leeway, an unknown kid, `alg: none`, HS256 signed with the
/// issuer's public key, and a replayed jti are refused (the replay on another node).
#[test]
fn jwt_assertions_authenticate_and_bad_ones_are_refused() {
    use base64::Engine;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::configure(dir.path(), &["repository"]);
    let public = issuer.public_key;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let cluster = DevCluster::start_in(dir, 3, &[]);
    let now = unix_now_s();
    let claims = |aud: &str, exp: u64, jti: &str| {
        serde_json::json!({"iss": "https://ci.example.test", "aud": aud, "sub": "repo:acme/app:ref:refs/heads/main",
                           "exp": exp, "iat": now, "jti": jti, "repository": "acme/app"})
    };
    let sign = |kid: &str, c: &serde_json::Value| issuer.sign(kid, c);
    let with = |node: u64, assertion: &str| {
        Client::with_tls(
            &cluster.apis()[node as usize - 1],
            Some(assertion.to_string()),
            Some(&cluster.anonymous_tls()),
        )
        .unwrap()
    };
    let none_token = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","kid":"ci-1","typ":"JWT"}"#),
        b64.encode(claims("ephemera", now + 300, "n").to_string())
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("ci-1".into());
    let hs_token = encode(
        &hs,
        &claims("ephemera", now + 300, "h"),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    rt().block_on(async {
        put_role(&cluster.client(), "deploy", 300, 3600).await;
        let valid = sign("ci-1", &claims("ephemera", now + 300, "j-1"));
        let cred = with(1, &valid)
            .issue(pb::IssueRequest {
                role: "deploy".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            cred.subject,
            "https://ci.example.test#repo:acme/app:ref:refs/heads/main"
        );
        // The same assertion again, through another node: replayed.
        let replay = with(2, &valid)
            .issue(pb::IssueRequest {
                role: "deploy".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(replay.code(), Some(Code::Unauthenticated), "{replay}");
        assert!(replay.to_string().contains("replayed"), "{replay}");
        let cases = [
            (
                "wrong audience",
                sign("ci-1", &claims("someone-else", now + 300, "j-2")),
                "wrong audience",
            ),
            (
                "expired beyond leeway",
                sign("ci-1", &claims("ephemera", now - 120, "j-3")),
                "expired",
            ),
            (
                "unknown kid",
                sign("ci-2", &claims("ephemera", now + 300, "j-4")),
                "unknown kid",
            ),
            ("alg none", none_token, "alg none"),
            (
                "HS256 with the public key",
                hs_token,
                "\"HS256\" is not allowed",
            ),
        ];
        for (what, token, message) in &cases {
            let e = with(3, token)
                .issue(pb::IssueRequest {
                    role: "deploy".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(Code::Unauthenticated), "{what}: {e}");
            assert!(
                e.to_string().contains(message),
                "{what}: {e} should say {message:?}"
            );
        }
        let tail = audit_tail(&cluster.client(), 100).await;
        let denials = tail
            .records
            .iter()
            .filter(|r| r.action == "auth.denied")
            .count();
        assert_eq!(denials, cases.len());
        assert!(tail
            .records
            .iter()
            .any(|r| r.action == "assertion.consume" && r.outcome == "denied"));
        // The principal, issuer and attributes included, is in the audit record.
        let issued = tail
            .records
            .iter()
            .find(|r| r.lease_id.as_deref() == Some(cred.lease_id.as_str()))
            .unwrap();
        assert_eq!(issued.auth_method, "jwt_assertion");
        assert_eq!(
            issued.actor_issuer.as_deref(),
            Some("https://ci.example.test")
        );
        assert_eq!(
            issued
                .actor_attributes
                .get("repository")
                .map(String::as_str),
            Some("acme/app")
        );
        // No assertion (a bearer secret) reaches the audit chain.
        let audit_text = format!("{:?}", tail.records);
        assert!(audit_text.contains("assertion.consume"));
        assert!(
            !audit_text.contains(&valid[..40]),
            "an assertion leaked into the audit chain"
        );
    });
}

/// Under a flood of refused certificates, a node records refusals in the audit chain up to a
/// rate and counts the rest: nothing is lost from the accounting, and the flood cannot become an
/// unbounded stream of Raft writes.
#[test]
fn a_flood_of_refused_certificates_is_audited_up_to_a_rate_and_counted() {
    let cluster = DevCluster::start(1, &[]);
    let rogue = Ca::generate("ephemera.dev", SystemTime::now(), Duration::from_secs(3600)).unwrap();
    let id = SpiffeId::parse("spiffe://ephemera.dev/flood").unwrap();
    let cert = rogue
        .issue(
            &id,
            LeafUse::Client,
            &[],
            &[],
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    const FLOOD: usize = 300;
    rt().block_on(async {
        let c = Client::with_tls(
            &cluster.apis()[0],
            None,
            Some(&tls_with(&cluster, &cert.cert_pem, &cert.key_pem)),
        )
        .unwrap();
        let started = std::time::Instant::now();
        for _ in 0..FLOOD {
            let e = c.introspect("x.y.z").await.unwrap_err();
            assert_eq!(e.code(), Some(Code::Unauthenticated));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let tail = cluster
            .client()
            .admin_call(
                pb::AuditTailRequest {
                    from_seq: 1,
                    limit: 1000,
                },
                |mut a, r| async move { a.audit_tail(r).await },
            )
            .await
            .unwrap();
        let recorded = tail
            .records
            .iter()
            .filter(|r| r.action == "auth.denied")
            .count();
        let metrics = cluster.metrics_at(&cluster.http_urls()[0]).await;
        let unaudited: usize = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ephemera_auth_denials_unaudited_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        println!(
            "{FLOOD} refusals in {elapsed:.2} s: {recorded} recorded, {unaudited} counted only"
        );
        assert_eq!(
            recorded + unaudited,
            FLOOD,
            "every refusal is recorded or counted"
        );
        // Burst of 100 plus 20 per second.
        assert!(
            recorded as f64 <= 100.0 + 20.0 * elapsed + 1.0,
            "{recorded} records in {elapsed:.2} s"
        );
    });
}
