//! End-to-end tests of policy as code: request-time Cedar decisions over real processes,
//! downscoping, renewal re-evaluation, and separation of duties for policy changes.

mod common;

use std::time::SystemTime;

use common::*;
use ephemera_client::{pb, Client, ClientError};
use tonic::Code;

const WORKLOAD: &str = "spiffe://ephemera.dev/workload/demo";

fn code(e: &ClientError) -> Option<Code> {
    e.code()
}

async fn put(c: &Client, role: pb::Role) {
    c.admin_call(
        pb::PutRoleRequest { role: Some(role) },
        |mut a, r| async move { a.put_role(r).await },
    )
    .await
    .expect("put role");
}

fn role(name: &str, revoke_on_renewal_denied: bool) -> pb::Role {
    pb::Role {
        name: name.into(),
        kind: "jwt".into(),
        audience: "api.example".into(),
        allowed_scopes: vec!["read".into(), "write".into(), "deploy".into()],
        default_ttl_s: 600,
        max_ttl_s: 3600,
        revoke_on_renewal_denied,
        ..Default::default()
    }
}

async fn pending(c: &Client) -> Vec<pb::PolicyProposal> {
    c.admin_call(
        pb::ListPolicyProposalsRequest {
            include_closed: false,
        },
        |mut a, r| async move { a.list_policy_proposals(r).await },
    )
    .await
    .expect("list proposals")
    .proposals
}

fn issue(role: &str, environment: Option<&str>, job_id: Option<&str>) -> pb::IssueRequest {
    pb::IssueRequest {
        role: role.into(),
        scopes: vec!["read".into(), "write".into(), "deploy".into()],
        ttl_s: Some(600),
        environment: environment.map(String::from),
        job_id: job_id.map(String::from),
        ..Default::default()
    }
}

async fn renew(c: &Client, lease_id: &str) -> Result<pb::Credential, ClientError> {
    c.renew(pb::RenewRequest {
        lease_id: lease_id.into(),
        ..Default::default()
    })
    .await
}

async fn lease_state(c: &Client, id: &str) -> String {
    all_leases(c)
        .await
        .into_iter()
        .find(|l| l.id == id)
        .map(|l| l.state)
        .expect("lease listed")
}

const V2: &str = r#"
@id("admins")
permit (principal is Ephemera::Admin, action, resource);

// The demo workload deploys from production, on loopback: read and deploy, two minutes.
@id("deploy-from-prod")
@max_ttl_s("120")
@scopes("read deploy")
permit (
  principal == Ephemera::Workload::"spiffe://ephemera.dev/workload/demo",
  action in [Ephemera::Action::"issue", Ephemera::Action::"renew"],
  resource == Ephemera::Role::"deploy"
)
when { context.environment == "prod" && context.source_ip.isLoopback() };

// The web role only from the office network.
@id("web-from-office")
permit (principal is Ephemera::Workload, action, resource == Ephemera::Role::"web")
when { context.source_ip.isInRange(ip("10.0.0.0/8")) };

@id("no-night-runs")
forbid (principal, action == Ephemera::Action::"issue", resource)
when { context.job_id == "night-run" };
"#;

/// A change proposed by one administrator and approved by itself does not take effect; approved
/// by a second administrator it does, on every node. Decisions then follow the new policy by
/// principal and context (environment, source address, job id), narrow scopes and TTL, and
/// renewals are decided again: refused, and revoked where the role says so.
#[test]
fn policy_changes_need_a_second_admin_and_are_enforced_on_every_node() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let admin = cluster.client_as("admin", None);
        let approver = cluster.client_as("approver", None);
        let workload = cluster.client_as("workload", None);
        put(&admin, role("deploy", true)).await;
        put(&admin, role("web", false)).await;
        // Under dev's version 1 the workload may obtain anything.
        let deploy_lease = workload.issue(issue("deploy", None, None)).await.unwrap();
        let web_lease = workload.issue(issue("web", None, None)).await.unwrap();
        assert_eq!(deploy_lease.scopes, vec!["deploy", "read", "write"]);
        let v1 = active_policy(&admin).await;
        assert_eq!(v1.version, 1);

        // An invalid policy set is refused with the validator's message; nothing changes.
        let invalid = "@id(\"x\")\npermit (principal, action, resource)\nwhen { principal.colour == \"red\" };";
        let e = propose(&admin, invalid).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = propose(&admin, "permit (principal, action, resource").await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(pending(&admin).await.is_empty());
        assert_eq!(active_policy(&admin).await.sha256, v1.sha256);

        // Proposed and self-approved: refused, and version 1 stays in force everywhere.
        let p = propose(&admin, V2).await.unwrap();
        assert_eq!((p.status.as_str(), p.base_version), ("pending", 1));
        let e = approve(&admin, &p.id).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        assert!(e.to_string().contains("cannot approve"), "{e}");
        for n in 1..=3 {
            let c = cluster.client_as("admin", Some(n));
            assert_eq!(active_policy(&c).await.version, 1, "node {n}");
        }
        workload.issue(issue("web", None, None)).await.unwrap();
        // A workload is no administrator: it cannot approve either.
        let e = approve(&workload, &p.id).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");

        // Approved by a second administrator: version 2, on every node.
        let activated = approve(&approver, &p.id).await.unwrap();
        assert_eq!(
            (activated.status.as_str(), activated.activated_version),
            ("activated", 2)
        );
        assert_eq!(activated.approvals, vec!["spiffe://ephemera.dev/approver"]);
        for n in 1..=3 {
            let c = cluster.client_as("admin", Some(n));
            let v = active_policy(&c).await;
            assert_eq!((v.version, v.sha256.as_str()), (2, p.sha256.as_str()));
            assert_eq!(v.approvers, vec!["spiffe://ephemera.dev/approver"]);
            // Through this node: allowed in prod, narrowed and capped.
            let w = cluster.client_as("workload", Some(n));
            let cred = w.issue(issue("deploy", Some("prod"), None)).await.unwrap();
            assert_eq!(cred.scopes, vec!["deploy", "read"], "node {n}");
            assert_eq!(cred.expires_at_ms - cred.issued_at_ms, 120_000, "node {n}");
            // Denied without the environment, by source address, and by a forbid.
            let e = w.issue(issue("deploy", None, None)).await.unwrap_err();
            assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
            assert!(
                e.to_string().contains("no policy of version 2 permits"),
                "{e}"
            );
            let e = w.issue(issue("web", Some("prod"), None)).await.unwrap_err();
            assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
            let e = w
                .issue(issue("deploy", Some("prod"), Some("night-run")))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("no-night-runs"), "{e}");
        }

        // Renewals are decided again under version 2. The web lease is refused and left to
        // expire; the deploy role revokes a lease whose renewal policy refuses.
        let e = renew(&workload, &web_lease.lease_id).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        let e = renew(&workload, &deploy_lease.lease_id).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        assert!(e.to_string().contains("revoked"), "{e}");
        for n in 1..=3 {
            let c = cluster.client_as("admin", Some(n));
            assert_eq!(lease_state(&c, &web_lease.lease_id).await, "active");
            assert_eq!(lease_state(&c, &deploy_lease.lease_id).await, "revoked");
        }

        // The audit chain says who decided what, under which policy.
        let tail = audit_tail(&admin, 1000).await;
        let issued = tail
            .records
            .iter()
            .rfind(|r| r.action == "lease.issue" && r.outcome == "ok")
            .unwrap();
        assert_eq!(issued.policy_version, Some(2));
        assert_eq!(issued.policy_ids, vec!["deploy-from-prod"]);
        assert_eq!(issued.context.get("environment").map(String::as_str), Some("prod"));
        assert_eq!(issued.context.get("source_ip").map(String::as_str), Some("127.0.0.1"));
        let approvals: Vec<(&str, &str)> = tail
            .records
            .iter()
            .filter(|r| r.action == "policy.approve")
            .map(|r| (r.actor.as_str(), r.outcome.as_str()))
            .collect();
        assert!(approvals.contains(&("spiffe://ephemera.dev/admin", "denied")));
        assert!(approvals.contains(&("spiffe://ephemera.dev/approver", "ok")));
        let forbidden = tail
            .records
            .iter()
            .find(|r| r.action == "policy.denied" && r.policy_ids == ["no-night-runs"])
            .expect("the forbid is audited");
        assert_eq!(forbidden.actor, WORKLOAD);
        let revoked = tail
            .records
            .iter()
            .find(|r| r.action == "policy.denied" && r.count == Some(1))
            .expect("the revoking refusal is audited");
        assert_eq!(revoked.lease_id.as_deref(), Some(deploy_lease.lease_id.as_str()));
    });
}

/// A workload authenticated by a JWT assertion keeps its lease only while its attributes
/// match: the same subject presenting a different `ref` cannot renew.
#[test]
fn renewal_is_refused_when_the_workloads_attributes_change() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::configure(dir.path(), &["repository", "ref"]);
    let cluster = DevCluster::start_in(dir, 3, &[]);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let assertion = |git_ref: &str, jti: &str| {
        let claims = serde_json::json!({"iss": TestIssuer::ISSUER, "aud": "ephemera",
            "sub": "repo:acme/app", "exp": now + 300, "iat": now, "jti": jti,
            "repository": "acme/app", "ref": git_ref});
        issuer.sign("ci-1", &claims)
    };
    let as_job = |git_ref: &str, jti: &str| {
        Client::with_tls(
            &cluster.env["EPHEMERA_ADDR"],
            Some(assertion(git_ref, jti)),
            Some(&cluster.anonymous_tls()),
        )
        .unwrap()
    };
    let policy = r#"
        @id("admins")
        permit (principal is Ephemera::Admin, action, resource);

        @id("ci-main-deploys")
        permit (
          principal is Ephemera::Workload,
          action in [Ephemera::Action::"issue", Ephemera::Action::"renew"],
          resource == Ephemera::Role::"deploy"
        )
        when {
          principal.issuer == "https://ci.example.test" &&
          principal.hasTag("repository") && principal.getTag("repository") == "acme/app" &&
          principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main"
        };
    "#;
    rt().block_on(async {
        let admin = cluster.client_as("admin", None);
        put(&admin, role("deploy", false)).await;
        let p = propose(&admin, policy).await.unwrap();
        approve(&cluster.client_as("approver", None), &p.id)
            .await
            .unwrap();

        let e = as_job("refs/heads/feature", "a-0")
            .issue(issue("deploy", None, None))
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        let cred = as_job("refs/heads/main", "a-1")
            .issue(issue("deploy", None, None))
            .await
            .unwrap();
        renew(&as_job("refs/heads/main", "a-2"), &cred.lease_id)
            .await
            .unwrap();
        // Same subject, another ref: its context no longer matches.
        let e = renew(&as_job("refs/heads/feature", "a-3"), &cred.lease_id)
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
        assert!(
            e.to_string().contains("no policy of version 2 permits"),
            "{e}"
        );
        // The role does not ask for revocation: the lease stays active until it expires.
        assert_eq!(lease_state(&admin, &cred.lease_id).await, "active");
        renew(&as_job("refs/heads/main", "a-4"), &cred.lease_id)
            .await
            .unwrap();
    });
}

/// The operator's workflow through the CLI: validate, propose, review the diff, approve as a
/// second administrator, read the history. The shipped `deploy/policies/admins.cedar` is the
/// change. An administrator's identity cannot be minted through the cluster (that would let one
/// administrator become two).
#[test]
fn the_policy_cli_validates_proposes_diffs_and_approves() {
    let cluster = DevCluster::start(1, &[]);
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/policies/admins.cedar"
    );
    let v = cluster.cli_json(&["policy", "validate", file]);
    assert_eq!(v["valid"], true);
    assert!(v["policies"]
        .as_array()
        .unwrap()
        .contains(&"admins-from-ops-network".into()));
    let bad = cluster.dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "@id(\"a\") @max_ttl(\"60\") permit (principal, action, resource);",
    )
    .unwrap();
    let out = cluster.cli(&["policy", "validate", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown annotation @max_ttl"));

    let p = cluster.cli_json(&["policy", "propose", file, "--comment", "narrow admins"]);
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(p["status"], "pending");
    assert_eq!(p["comment"], "narrow admins");
    let d = cluster.cli_json(&["policy", "diff", &id]);
    assert!(d["added"]
        .as_array()
        .unwrap()
        .contains(&"admins-from-ops-network".into()));
    assert!(d["removed"]
        .as_array()
        .unwrap()
        .contains(&"dev-admins".into()));
    assert!(d["unified"]
        .as_str()
        .unwrap()
        .contains("+@id(\"admins-issue\")"));
    let listed = cluster.cli_json(&["policy", "list"]);
    assert_eq!(listed[0]["id"], id.as_str());

    let out = cluster.cli(&["policy", "approve", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot approve"));
    let out = cluster.cli_as("approver", &["policy", "approve", &id, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let history = cluster.cli_json(&["policy", "history"]);
    let versions = history.as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1]["active"], true);
    assert_eq!(versions[1]["proposal_id"], id.as_str());
    let shown = cluster.cli(&["policy", "show"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("admins-from-ops-network"));
    let d = cluster.cli_json(&["policy", "diff", "--from", "1", "--to", "2"]);
    assert!(d["changed"].as_array().unwrap().is_empty());
    assert!(!d["added"].as_array().unwrap().is_empty());

    let out = cluster.cli(&[
        "jointoken",
        "create",
        "--spiffe-id",
        "spiffe://ephemera.dev/approver",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("administrator identity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
