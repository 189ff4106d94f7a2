//! RFC 8693 token exchange over real node processes: narrowing, the nested actor chain, the
//! depth limit, RFC errors, and cascading revocation seen by every node.

mod common;

use common::*;
use ephemera_client::pb;
use serde_json::Value;

const WORKLOAD: &str = "spiffe://ephemera.dev/workload/demo";
/// The user a chain acts for, and its two actors: dev's admin identity plays the agent and its
/// workload identity the tool (an actor token must be its presenter's own).
const USER: &str = "spiffe://example.org/user";
const AGENT: &str = "spiffe://ephemera.dev/admin";
const TOOL: &str = WORKLOAD;
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// Posts an exchange to `node` (1-based) as dev's workload: (HTTP status, body).
async fn exchange(cluster: &DevCluster, node: usize, form: &[(&str, &str)]) -> (u16, Value) {
    exchange_as(cluster, "workload", node, form).await
}

/// Posts an exchange to `node` as one of dev's identities.
async fn exchange_as(
    cluster: &DevCluster,
    who: &str,
    node: usize,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let http = cluster.https(Some((
        &cluster.pki(&format!("{who}.crt")),
        &cluster.pki(&format!("{who}.key")),
    )));
    let resp = http
        .post(format!("{}/oauth2/token", cluster.http_urls()[node - 1]))
        .form(form)
        .send()
        .await
        .expect("the token endpoint answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

/// The form of an exchange of `subject` for the `tools.example` audience.
fn form<'a>(subject: &'a str, scope: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("grant_type", GRANT),
        ("subject_token", subject),
        ("subject_token_type", ACCESS_TOKEN),
        ("audience", "tools.example"),
        ("scope", scope),
    ]
}

fn with_actor<'a>(
    mut f: Vec<(&'static str, &'a str)>,
    actor: &'a str,
) -> Vec<(&'static str, &'a str)> {
    f.push(("actor_token", actor));
    f.push(("actor_token_type", ACCESS_TOKEN));
    f
}

/// As [`refused`], and the description says why.
fn refused_for(got: (u16, Value), error: &str, why: &str) {
    assert!(
        got.1["error_description"]
            .as_str()
            .is_some_and(|d| d.contains(why)),
        "{why}: {}",
        got.1
    );
    refused(got, error, why);
}

fn refused(got: (u16, Value), error: &str, what: &str) {
    assert_eq!(got.0, 400, "{what}: {}", got.1);
    assert_eq!(got.1["error"], error, "{what}: {}", got.1);
    assert!(got.1["error_description"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
}

#[test]
fn exchanged_tokens_narrow_nest_act_and_die_with_their_subject_token() {
    let cluster = DevCluster::start(3, &[]);
    rt().block_on(async {
        let admin = cluster.client();
        put_role(&admin, "web", 300, 3600).await;
        let mut tools = role("tools", 300, 3600);
        tools.role.as_mut().unwrap().audience = "tools.example".into();
        admin
            .admin_call(tools, |mut a, r| async move { a.put_role(r).await })
            .await
            .unwrap();
        // The subject token: the user's; actor tokens: the agent's and the tool's own.
        let subject = admin
            .issue(pb::IssueRequest {
                subject: Some(USER.into()),
                ..issue_req("web")
            })
            .await
            .unwrap();
        let own = pb::IssueRequest {
            role: "web".into(),
            ..Default::default()
        };
        let agent = admin.issue(own.clone()).await.unwrap().token;
        let tool = cluster
            .client_as("workload", None)
            .issue(own)
            .await
            .unwrap()
            .token;
        // Someone else's token is no actor token of the caller's.
        refused(
            exchange(
                &cluster,
                1,
                &with_actor(form(&subject.token, "read"), &agent),
            )
            .await,
            "invalid_grant",
            "an actor token of another identity",
        );

        // One hop, through node 2, by the agent: sub is the user, act the agent, the scope
        // narrower.
        let (status, one) = exchange_as(
            &cluster,
            "admin",
            2,
            &with_actor(form(&subject.token, "read"), &agent),
        )
        .await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one["issued_token_type"], ACCESS_TOKEN);
        assert_eq!(one["token_type"], "Bearer");
        assert_eq!(one["scope"], "read");
        let first = one["access_token"].as_str().unwrap().to_string();

        // It verifies with a standard JWT library against another node's JWKS.
        let rp = RelyingParty::of(&cluster, 3).await;
        let meta = &rp.metadata;
        assert!(meta["token_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/oauth2/token"));
        assert_eq!(meta["grant_types_supported"][0], GRANT);
        let verify = |token: &str| {
            rp.verify(token, "tools.example")
                .expect("the exchanged token verifies")
        };
        let subject_exp = subject.expires_at_ms / 1000;
        let c = verify(&first);
        assert_eq!(c["sub"], USER);
        assert_eq!(c["act"], serde_json::json!({"sub": AGENT}));
        assert_eq!(c["scope"], "read");
        assert!(c["exp"].as_u64().unwrap() <= subject_exp);

        // A second hop nests the first actor inside the new one.
        let (status, two) = exchange(&cluster, 3, &with_actor(form(&first, "read"), &tool)).await;
        assert_eq!(status, 200, "{two}");
        let second = two["access_token"].as_str().unwrap().to_string();
        assert_eq!(
            verify(&second)["act"],
            serde_json::json!({"sub": TOOL, "act": {"sub": AGENT}})
        );

        // Introspection returns `act` exactly as the token carries it, and the parent lease.
        let first_jti = verify(&first)["jti"].as_str().unwrap().to_string();
        let introspected: Value = cluster
            .https(Some((
                &cluster.pki("workload.crt"),
                &cluster.pki("workload.key"),
            )))
            .post(format!("{}/oauth2/introspect", cluster.http_urls()[0]))
            .form(&[("token", second.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(introspected["active"], true);
        assert_eq!(introspected["act"], verify(&second)["act"]);
        assert_eq!(introspected["parent_lease_id"], first_jti.as_str());
        let over_grpc = cluster.node_client(2).introspect(&second).await.unwrap();
        assert_eq!(over_grpc.act, [TOOL, AGENT]);
        assert_eq!(over_grpc.parent_lease_id, first_jti);

        // Refusals, each with its RFC code, and none leaves a lease behind.
        let leases_before = all_leases(&admin).await.len();
        let edited = |edit: fn(&mut Vec<(&'static str, &str)>)| {
            let mut f = form(&first, "read");
            edit(&mut f);
            f
        };
        let huge = "x".repeat(64 * 1024);
        let refusals = [
            ("a wider scope", form(&first, "read write"), "invalid_scope"),
            (
                "an unknown audience",
                edited(|f| f[3] = ("audience", "nowhere.example")),
                "invalid_target",
            ),
            (
                "no subject_token_type",
                edited(|f| {
                    f.remove(2);
                }),
                "invalid_request",
            ),
            (
                "another grant type",
                edited(|f| f[0] = ("grant_type", "client_credentials")),
                "unsupported_grant_type",
            ),
            (
                "an actor token without its type",
                edited(|f| f.push(("actor_token", "a.b.c"))),
                "invalid_request",
            ),
            (
                "a token type not issued here",
                edited(|f| {
                    f.push((
                        "requested_token_type",
                        "urn:ietf:params:oauth:token-type:refresh_token",
                    ))
                }),
                "invalid_request",
            ),
            (
                "a malformed subject token",
                form("not.a.token", "read"),
                "invalid_grant",
            ),
            // Refused before anything is parsed.
            ("an oversized body", form(&huge, "read"), "invalid_request"),
        ];
        for (what, bad, code) in refusals {
            refused(exchange(&cluster, 1, &bad).await, code, what);
        }
        assert_eq!(all_leases(&admin).await.len(), leases_before);

        // The gRPC equivalent: the same exchange, and the same refusal with its RFC code.
        let grpc = cluster.client_as("workload", Some(1));
        let ask = |scope: &str| pb::ExchangeRequest {
            subject_token: first.clone(),
            subject_token_type: ACCESS_TOKEN.into(),
            audience: Some("tools.example".into()),
            scope: Some(scope.into()),
            ..Default::default()
        };
        let over_grpc = grpc.exchange(ask("read")).await.unwrap();
        assert_eq!(over_grpc.scope, "read");
        assert_eq!(
            verify(&over_grpc.access_token)["act"],
            serde_json::json!({"sub": AGENT})
        );
        let wider = grpc.exchange(ask("read write")).await.unwrap_err();
        assert_eq!(wider.code(), Some(tonic::Code::InvalidArgument), "{wider}");
        assert!(wider.to_string().contains("invalid_scope"), "{wider}");

        // Depth: five exchanges from the subject token are allowed, the sixth is not.
        let mut token = second.clone();
        let mut chain = vec![
            subject.token.clone(),
            first.clone(),
            second.clone(),
            over_grpc.access_token.clone(),
        ];
        for _ in 3..=5 {
            let (status, next) = exchange(&cluster, 1, &form(&token, "read")).await;
            assert_eq!(status, 200, "{next}");
            token = next["access_token"].as_str().unwrap().to_string();
            chain.push(token.clone());
        }
        let (_, sixth) = exchange(&cluster, 1, &form(&token, "read")).await;
        assert_eq!(sixth["error"], "invalid_grant", "{sixth}");
        assert!(sixth["error_description"]
            .as_str()
            .unwrap()
            .contains("at most 5"));

        // A subscriber on node 3 follows the revocations from here on.
        let mut watch = cluster.node_client(3).watch_revocations(0).await.unwrap();
        // Revoking the subject token's lease makes the whole chain inactive on every node at
        // the acknowledgement.
        admin
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::LeaseId(
                    subject.lease_id.clone(),
                )),
            })
            .await
            .unwrap();
        for node in 1..=3 {
            let c = cluster.node_client(node);
            for t in [&subject.token, &first, &second, &token] {
                assert!(!c.introspect(t).await.unwrap().active, "node {node}");
            }
        }
        refused(
            exchange(&cluster, 2, &form(&first, "read")).await,
            "invalid_grant",
            "revoked subject",
        );
        // The subscriber received every lease of the chain, in one run of sequence numbers.
        let expected: std::collections::BTreeSet<String> = chain
            .iter()
            .map(|t| ephemera_core::token::parse(t).unwrap().claims.jti)
            .collect();
        let mut got = std::collections::BTreeSet::new();
        let mut seqs = Vec::new();
        async fn next(watch: &mut tonic::Streaming<pb::RevocationEvent>) -> pb::RevocationEvent {
            tokio::time::timeout(std::time::Duration::from_secs(30), watch.message())
                .await
                .expect("an event arrives")
                .unwrap()
                .expect("the stream stays open")
        }
        while got.len() < expected.len() {
            let e = next(&mut watch).await;
            if e.heartbeat {
                continue;
            }
            seqs.push(e.seq);
            got.insert(e.lease_id);
        }
        assert_eq!(got, expected);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // Then a heartbeat vouches for them: node 3 confirmed it had applied everything.
        let beat = loop {
            let e = next(&mut watch).await;
            if e.heartbeat {
                break e;
            }
        };
        assert_eq!(beat.seq, *seqs.last().unwrap());
        assert!(beat.lease_id.is_empty() && beat.at_ms > 0);
    });
}

/// An OIDC issuer's identity assertion as the subject token: the new token is for the
/// assertion's subject, acted for by the agent `may_act` names, narrowed to its scope claim, no
/// longer-lived than it, and the assertion serves once, cluster-wide.
#[test]
fn an_oidc_assertion_is_exchanged_once_for_its_subject_as_may_act_allows() {
    const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::configure(dir.path(), &[]);
    let cluster = DevCluster::start_in(dir, 3, &[]);
    let now = unix_now_s();
    let assertion = |jti: &str, may_act: &str| {
        issuer.sign(
            "ci-1",
            &serde_json::json!({"iss": TestIssuer::ISSUER, "aud": "ephemera", "sub": "alice",
                "exp": now + 120, "iat": now, "jti": jti, "scope": "read",
                "may_act": {"sub": may_act}}),
        )
    };
    rt().block_on(async {
        let admin = cluster.client();
        put_role(&admin, "web", 300, 3600).await;
        let mut tools = role("tools", 300, 3600);
        tools.role.as_mut().unwrap().audience = "tools.example".into();
        admin
            .admin_call(tools, |mut a, r| async move { a.put_role(r).await })
            .await
            .unwrap();
        let agent = admin
            .issue(pb::IssueRequest {
                role: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .token;
        let by_agent = |node: usize, subject: String, scope: &'static str| {
            let agent = agent.clone();
            let cluster = &cluster;
            async move {
                let mut f = with_actor(form(&subject, scope), &agent);
                f[2] = ("subject_token_type", ID_TOKEN);
                exchange_as(cluster, "admin", node, &f).await
            }
        };
        let leases_before = all_leases(&admin).await.len();
        // Refused, and none uses its assertion up: wider than its scope claim, an actor
        // may_act does not name, and a token of this cluster presented as an id_token.
        refused_for(
            by_agent(1, assertion("a1", AGENT), "read write").await,
            "invalid_scope",
            "write",
        );
        refused_for(
            by_agent(1, assertion("a2", TOOL), "read").await,
            "invalid_grant",
            "may_act does not name",
        );
        refused_for(
            by_agent(1, agent.clone(), "read").await,
            "invalid_request",
            "not urn:ietf:params:oauth:token-type:id_token",
        );
        assert_eq!(all_leases(&admin).await.len(), leases_before);

        let (status, got) = by_agent(1, assertion("a1", AGENT), "read").await;
        assert_eq!(status, 200, "{got}");
        let token = got["access_token"].as_str().unwrap().to_string();
        let c = RelyingParty::of(&cluster, 2)
            .await
            .verify(&token, "tools.example")
            .expect("the exchanged token verifies");
        assert_eq!(c["sub"], format!("{}#alice", TestIssuer::ISSUER));
        assert_eq!(c["act"], serde_json::json!({"sub": AGENT}));
        assert_eq!(c["scope"], "read");
        assert!(c["exp"].as_u64().unwrap() <= now + 120);
        // It has no parent lease (the assertion lives outside the cluster).
        let seen = cluster.node_client(3).introspect(&token).await.unwrap();
        assert!(seen.active);
        assert_eq!(seen.act, [AGENT]);
        assert_eq!(seen.parent_lease_id, "");
        // The same assertion again, on another node, is a replay.
        refused_for(
            by_agent(2, assertion("a1", AGENT), "read").await,
            "invalid_grant",
            "already used",
        );
    });
}

/// Waits until `path` exists (a child's signal that it got there), within a deadline.
fn wait_for(path: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `ephemera exec`: the child gets a live credential, its exit code is the wrapper's, SIGTERM
/// reaches it, a long run sees its credential renewed, and every lease is revoked at the end.
#[test]
fn exec_binds_a_credential_to_the_life_of_a_command() {
    let cluster = DevCluster::start(3, &[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rt().block_on(async {
        let admin = cluster.client();
        put_role(&admin, "web", 300, 3600).await;
        put_role(&admin, "brief", 2, 60).await;
    });
    // The child does not inherit the wrapper's own credentials; it checks the one it was given
    // with the CLI, under an identity of its own.
    let script = format!(
        "[ -z \"$EPHEMERA_CERT$EPHEMERA_KEY$EPHEMERA_TOKEN\" ] || exit 9; \
         printf %s \"$EPHEMERA_CREDENTIAL\" > {d}/token; printf %s \"$EPHEMERA_LEASE_ID\" > \
         {d}/lease; EPHEMERA_CERT={cert} EPHEMERA_KEY={key} {bin} introspect \
         \"$EPHEMERA_CREDENTIAL\" --output json > {d}/seen.json; exit 7",
        d = d.display(),
        cert = cluster.pki_path("workload.crt").display(),
        key = cluster.pki_path("workload.key").display(),
        bin = BIN
    );
    let out = cluster.cli_as(
        "workload",
        &["exec", "--role", "web", "--", "sh", "-c", &script],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(&read(&d.join("seen.json"))).unwrap();
    assert_eq!(
        seen["active"], true,
        "the child's credential was active during the run"
    );
    assert_eq!(seen["sub"], WORKLOAD);
    let token = read(&d.join("token"));
    rt().block_on(async {
        for node in 1..=3 {
            let r = cluster.node_client(node).introspect(&token).await.unwrap();
            assert!(!r.active, "revoked at exit, seen by node {node}");
        }
    });

    // SIGTERM to the wrapper reaches the child, whose exit code the wrapper returns.
    let script = format!(
        "trap 'echo term > {d}/term; exit 3' TERM; printf %s \"$EPHEMERA_CREDENTIAL\" > \
         {d}/token2; echo > {d}/ready; while true; do sleep 0.1; done",
        d = d.display()
    );
    let mut wrapper = cluster
        .cli_command(
            "workload",
            &[
                "exec", "--role", "web", "--grace", "20s", "--", "sh", "-c", &script,
            ],
        )
        .spawn()
        .unwrap();
    wait_for(&d.join("ready"), "the child started");
    // SAFETY: kill(2) on the wrapper we started and have not reaped.
    unsafe { libc::kill(wrapper.id() as i32, libc::SIGTERM) };
    let status = wrapper.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    assert_eq!(read(&d.join("term")).trim(), "term");
    let token2 = read(&d.join("token2"));
    rt().block_on(async {
        assert!(!cluster.client().introspect(&token2).await.unwrap().active);
    });

    // A child that outlives renew_after sees its credential renewed (the file is rewritten).
    let file = d.join("cred");
    let script = format!(
        "cp {f} {d}/first; i=0; while cmp -s {f} {d}/first && [ $i -lt 300 ]; do sleep 0.1; \
         i=$((i+1)); done; cp {f} {d}/second",
        f = file.display(),
        d = d.display()
    );
    let out = cluster.cli_as(
        "workload",
        &[
            "exec",
            "--role",
            "brief",
            "--file",
            file.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, second) = (read(&d.join("first")), read(&d.join("second")));
    assert_ne!(
        first, second,
        "the credential was renewed while the child ran"
    );
    let exp = |t: &str| ephemera_core::token::parse(t).unwrap().claims.exp;
    assert!(
        exp(&second) >= exp(&first),
        "a renewal never moves the expiry back"
    );
    assert!(!file.exists(), "the credential file is removed at exit");

    // Several credentials: each in its variable, active while the child runs, all revoked at
    // the end.
    let script = format!(
        "printf %s \"$EPHEMERA_CREDENTIAL\" > {d}/web; printf %s \"$BRIEF\" > {d}/brief; \
         printf %s \"$BRIEF_LEASE_ID\" > {d}/brief_lease; EPHEMERA_CERT={cert} \
         EPHEMERA_KEY={key} {bin} introspect \"$BRIEF\" --output json > {d}/brief.json",
        d = d.display(),
        cert = cluster.pki_path("workload.crt").display(),
        key = cluster.pki_path("workload.key").display(),
        bin = BIN
    );
    let out = cluster.cli_as(
        "workload",
        &[
            "exec",
            "--role",
            "web",
            "--with",
            "brief=BRIEF",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(&read(&d.join("brief.json"))).unwrap();
    assert_eq!(seen["active"], true);
    assert_eq!(seen["jti"], read(&d.join("brief_lease")).as_str());
    let (web, brief) = (read(&d.join("web")), read(&d.join("brief")));
    rt().block_on(async {
        for t in [&web, &brief] {
            assert!(!cluster.client().introspect(t).await.unwrap().active);
        }
    });

    // A credential that cannot be issued: the child never starts, and those issued before it
    // are revoked.
    let active = || {
        rt().block_on(async {
            all_leases(&cluster.client())
                .await
                .into_iter()
                .filter(|l| l.state == "active")
                .count()
        })
    };
    // Every lease of the runs above was revoked at their exits.
    assert_eq!(active(), 0);
    let out = cluster.cli_as(
        "workload",
        &[
            "exec",
            "--role",
            "web",
            "--with",
            "brief",
            "--with",
            "no-such-role",
            "--",
            "sh",
            "-c",
            &format!("touch {}/ran", d.display()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-role"), "{stderr}");
    assert!(!d.join("ran").exists(), "the child did not start");
    assert_eq!(active(), 0, "the leases issued first were revoked");

    // The client's guard: released, or dropped, the lease is revoked.
    rt().block_on(async {
        let c = std::sync::Arc::new(cluster.client_as("workload", None));
        let ask = || pb::IssueRequest {
            role: "web".into(),
            ..Default::default()
        };
        let (released, guard) = c.issue_guarded(ask()).await.unwrap();
        assert!(c.introspect(&released.token).await.unwrap().active);
        guard.release().await.unwrap();
        assert!(!c.introspect(&released.token).await.unwrap().active);
        let (dropped, guard) = c.issue_guarded(ask()).await.unwrap();
        drop(guard);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while c.introspect(&dropped.token).await.unwrap().active {
            assert!(
                std::time::Instant::now() < deadline,
                "a dropped guard revokes"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });

    // The CLI follows the revocation log: the first exec's lease was the first revocation.
    let lines = cluster.cli_as(
        "workload",
        &["watch", "revocations", "--from", "0", "--limit", "1"],
    );
    assert!(
        lines.status.success(),
        "{}",
        String::from_utf8_lossy(&lines.stderr)
    );
    let first: Value = serde_json::from_slice(&lines.stdout).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["lease_id"], read(&d.join("lease")).as_str());
}
