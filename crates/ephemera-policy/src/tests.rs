use std::collections::BTreeMap;
use std::net::IpAddr;

use ephemera_core::types::{AuthMethod, Principal, Role};

use super::*;

const GH: &str = "https://token.actions.githubusercontent.com";
const CI: &str = include_str!("../../../deploy/policies/ci-jobs.cedar");
const SERVICES: &str = include_str!("../../../deploy/policies/services.cedar");
const AGENTS: &str = include_str!("../../../deploy/policies/ai-agents.cedar");
const ADMINS: &str = include_str!("../../../deploy/policies/admins.cedar");

/// 2026-11-23 (a Monday) 10:30 UTC.
const MONDAY_1030_MS: u64 = 1_795_429_800_000;
/// 2026-11-28 (a Saturday) 10:30 UTC.
const SATURDAY_1030_MS: u64 = MONDAY_1030_MS + 5 * 86_400_000;

fn role(name: &str, scopes: &[&str], env: Option<&str>) -> Role {
    Role {
        name: name.into(),
        spec: ephemera_core::kind::RoleSpec::Jwt(ephemera_core::kind::jwt::Spec {
            audience: "https://api.test".into(),
            allowed_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }),
        default_ttl_s: 900,
        max_ttl_s: 3600,
        environment: env.map(str::to_string),
        target: None,
        revoke_on_renewal_denied: false,
        issue_rate_per_identity: None,
        issue_rate: None,
        max_live_leases_per_identity: None,
        max_live_leases: None,
    }
}

fn github(repo: &str, git_ref: &str, env: Option<&str>) -> Principal {
    let mut attributes = BTreeMap::from([
        ("repository".to_string(), repo.to_string()),
        ("ref".to_string(), git_ref.to_string()),
    ]);
    if let Some(env) = env {
        attributes.insert("environment".into(), env.into());
    }
    Principal {
        id: format!("repo:{repo}:ref:{git_ref}"),
        auth_method: AuthMethod::JwtAssertion,
        issuer: Some(GH.into()),
        attributes,
        admin: false,
        presented: Default::default(),
    }
}

fn svid(id: &str) -> Principal {
    Principal::svid(id.into(), "acme.internal".into(), false)
}

fn admin(id: &str) -> Principal {
    Principal::svid(id.into(), "acme.internal".into(), true)
}

fn ctx<'a>(scopes: &'a [String], now_ms: u64, ip: &str) -> WorkloadContext<'a> {
    WorkloadContext {
        ttl_s: 900,
        scopes,
        principals: &[],
        audience: "https://api.test",
        source_ip: Some(ip.parse::<IpAddr>().unwrap()),
        environment: "",
        job_id: "",
        now_ms,
        subject: "spiffe://acme.internal/ns/web/sa/api",
        delegation_depth: 0,
        actors: &[],
        lease_owner: false,
    }
}

fn book(text: &str) -> PolicyBook {
    PolicyBook::compile(text, 7).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_examples_and_default_validate() {
    for text in [CI, SERVICES, AGENTS, ADMINS, DEFAULT_POLICY] {
        book(text);
    }
    let all = format!("{CI}\n{SERVICES}\n{AGENTS}\n{ADMINS}");
    assert!(book(&all).policy_ids().len() >= 14);
}

#[test]
fn deny_by_default_and_for_unknown_principals() {
    let b = book(CI);
    let scopes = vec![];
    let d = b.decide(
        &svid("spiffe://acme.internal/ns/prod/sa/web"),
        Action::Issue,
        &role("ci-build", &["artifacts:read"], None),
        &ctx(&scopes, MONDAY_1030_MS, "10.0.0.1"),
    );
    assert!(!d.allowed);
    assert!(d.determining.is_empty());
    assert_eq!(d.version, 7);
    assert!(d.describe().contains("no policy of version 7"));
    // Built-in principals never get a decision in their favour.
    let d = book(DEFAULT_POLICY).decide_admin(
        &Principal::system(),
        AdminAction::RoleWrite,
        None,
        MONDAY_1030_MS,
    );
    assert!(!d.allowed);
}

#[test]
fn allow_and_deny_by_principal_attribute() {
    let b = book(CI);
    let build = role("ci-build", &["artifacts:read", "artifacts:write"], None);
    let scopes = vec!["artifacts:read".to_string()];
    let c = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    let ok = b.decide(
        &github("acme/api", "refs/heads/feature", None),
        Action::Issue,
        &build,
        &c,
    );
    assert!(ok.allowed, "{ok:?}");
    assert_eq!(ok.determining, vec!["ci-api-build"]);
    let other_repo = b.decide(
        &github("acme/web", "refs/heads/main", None),
        Action::Issue,
        &build,
        &c,
    );
    assert!(!other_repo.allowed);
    // The same claims from another issuer are not the same workload.
    let mut forged = github("acme/api", "refs/heads/main", None);
    forged.issuer = Some("https://evil.test".into());
    assert!(!b.decide(&forged, Action::Issue, &build, &c).allowed);
    // Deploying to staging needs main.
    let deploy = role("ci-deploy", &["deploy:staging", "artifacts:read"], None);
    let feature = github("acme/api", "refs/heads/feature", None);
    assert!(!b.decide(&feature, Action::Issue, &deploy, &c).allowed);
    let main = github("acme/api", "refs/heads/main", None);
    assert!(b.decide(&main, Action::Issue, &deploy, &c).allowed);
}

#[test]
fn allow_and_deny_by_time_window_and_environment() {
    let b = book(CI);
    let deploy = role("ci-deploy", &["deploy:production", "artifacts:read"], None);
    let scopes = vec![];
    let release = github("acme/api", "refs/tags/v1.4.0", Some("production"));
    let monday = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    let d = b.decide(&release, Action::Issue, &deploy, &monday);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.determining, vec!["ci-api-deploy-production"]);
    let saturday = ctx(&scopes, SATURDAY_1030_MS, "10.0.0.1");
    assert!(
        !b.decide(&release, Action::Issue, &deploy, &saturday)
            .allowed
    );
    let night = ctx(&scopes, MONDAY_1030_MS + 12 * 3_600_000, "10.0.0.1");
    assert!(!b.decide(&release, Action::Issue, &deploy, &night).allowed);
    // Without the protected environment claim, a tag alone does not deploy to production.
    let unprotected = github("acme/api", "refs/tags/v1.4.0", Some("staging"));
    assert!(
        !b.decide(&unprotected, Action::Issue, &deploy, &monday)
            .allowed
    );
    // The caller-declared environment in the context, against the role's label.
    let env_policy = r#"
        @id("prod-callers-only")
        permit (principal is Ephemera::Workload, action == Ephemera::Action::"issue", resource)
        when { context.environment == resource.environment };
    "#;
    let b = book(env_policy);
    let web = role("web", &[], Some("prod"));
    let mut c = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    c.environment = "prod";
    assert!(
        b.decide(&svid("spiffe://a/b"), Action::Issue, &web, &c)
            .allowed
    );
    c.environment = "dev";
    assert!(
        !b.decide(&svid("spiffe://a/b"), Action::Issue, &web, &c)
            .allowed
    );
}

#[test]
fn allow_and_deny_by_source_address_and_forbid_wins() {
    let b = book(SERVICES);
    let payments = role(
        "payments-api",
        &["payments:read", "payments:write"],
        Some("prod"),
    );
    let scopes = vec![];
    let checkout = svid("spiffe://acme.internal/ns/prod/sa/checkout");
    let inside = b.decide(
        &checkout,
        Action::Issue,
        &payments,
        &ctx(&scopes, MONDAY_1030_MS, "10.20.3.4"),
    );
    assert!(inside.allowed);
    let outside = b.decide(
        &checkout,
        Action::Issue,
        &payments,
        &ctx(&scopes, MONDAY_1030_MS, "192.168.1.1"),
    );
    assert!(!outside.allowed);
    // IPv4-mapped IPv6 addresses match IPv4 ranges.
    let mapped = b.decide(
        &checkout,
        Action::Issue,
        &payments,
        &ctx(&scopes, MONDAY_1030_MS, "::ffff:10.20.3.4"),
    );
    assert!(mapped.allowed);
    // A permit elsewhere does not beat a forbid.
    let widened = format!(
        "{SERVICES}\n@id(\"everyone\") permit (principal, action == Ephemera::Action::\"issue\", resource);"
    );
    let b = book(&widened);
    let staging = svid("spiffe://acme.internal/ns/staging/sa/checkout");
    let d = b.decide(
        &staging,
        Action::Issue,
        &payments,
        &ctx(&scopes, MONDAY_1030_MS, "10.20.3.4"),
    );
    assert!(!d.allowed);
    assert_eq!(d.determining, vec!["svc-no-staging-in-prod"]);
    assert!(d.describe().contains("forbidden"));
}

#[test]
fn grants_narrow_scopes_and_cap_ttl() {
    let b = book(AGENTS);
    let tools = role(
        "agent-tools",
        &["tickets:read", "tickets:comment", "docs:read"],
        Some("agents"),
    );
    let mut agent = Principal {
        id: "agent-7".into(),
        auth_method: AuthMethod::JwtAssertion,
        issuer: Some("https://orchestrator.acme.internal".into()),
        attributes: BTreeMap::from([("task_id".to_string(), "task-42".to_string())]),
        admin: false,
        presented: Default::default(),
    };
    let scopes = vec![];
    let mut c = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    c.job_id = "task-42";
    let d = b.decide(&agent, Action::Issue, &tools, &c);
    assert!(d.allowed);
    assert_eq!(
        d.grant,
        Grant {
            scopes: Some(["docs:read", "tickets:read"].map(String::from).into()),
            max_ttl_s: Some(300),
        }
    );
    // Another permit widens the grant: the union of both.
    agent
        .attributes
        .insert("tools".into(), "search,comment".into());
    let d = b.decide(&agent, Action::Issue, &tools, &c);
    assert_eq!(d.determining, vec!["agent-comment", "agent-per-task"]);
    assert_eq!(d.grant.scopes.as_ref().unwrap().len(), 3);
    // The agent must name the task its token was minted for.
    c.job_id = "task-43";
    assert!(!b.decide(&agent, Action::Issue, &tools, &c).allowed);
    c.job_id = "task-42";
    c.delegation_depth = 1;
    assert!(!b.decide(&agent, Action::Issue, &tools, &c).allowed);
    // A permit without annotations leaves both dimensions to the role.
    let open = book(
        "@id(\"open\") permit (principal, action == Ephemera::Action::\"issue\", resource);\n\
         @id(\"narrow\") @max_ttl_s(\"60\") permit (principal, action == Ephemera::Action::\"issue\", resource);",
    );
    c.delegation_depth = 0;
    let d = open.decide(&agent, Action::Issue, &tools, &c);
    assert_eq!(d.grant, Grant::default());
}

#[test]
fn an_exchange_is_decided_on_its_depth_its_actors_and_its_subject() {
    let b = book(
        "@id(\"exchange\") permit (principal, action == Ephemera::Action::\"exchange\", resource)\n\
         when { context.delegation_depth <= 2 };\n\
         @id(\"no-untrusted-agent\") forbid (principal, action == Ephemera::Action::\"exchange\", resource)\n\
         when { context.actors.contains(\"spiffe://acme.internal/agent/untrusted\") };\n\
         @id(\"only-our-users\") forbid (principal, action == Ephemera::Action::\"exchange\", resource)\n\
         unless { context.subject like \"https://idp.acme.internal#*\" };",
    );
    let tools = role("tools", &[], None);
    let caller = svid("spiffe://acme.internal/tool");
    let scopes: [String; 0] = [];
    let mut c = ctx(&scopes, 0, "10.0.0.1");
    c.subject = "https://idp.acme.internal#alice";
    let trusted = ["spiffe://acme.internal/agent/trusted".to_string()];
    let untrusted = ["spiffe://acme.internal/agent/untrusted".to_string()];
    c.delegation_depth = 1;
    c.actors = &trusted;
    assert!(b.decide(&caller, Action::Exchange, &tools, &c).allowed);
    c.actors = &untrusted;
    let d = b.decide(&caller, Action::Exchange, &tools, &c);
    assert!(!d.allowed);
    assert_eq!(d.determining, ["no-untrusted-agent"]);
    c.actors = &trusted;
    c.subject = "https://idp.elsewhere.example#alice";
    let d = b.decide(&caller, Action::Exchange, &tools, &c);
    assert_eq!(d.determining, ["only-our-users"]);
    c.subject = "https://idp.acme.internal#alice";
    c.delegation_depth = 3;
    assert!(!b.decide(&caller, Action::Exchange, &tools, &c).allowed);
    // Issuing is another action: the exchange permit does not allow it.
    c.delegation_depth = 0;
    assert!(!b.decide(&caller, Action::Issue, &tools, &c).allowed);
}

#[test]
fn context_constrains_requested_ttl_and_scopes() {
    let b = book(
        r#"
        @id("short-read-only")
        permit (principal, action == Ephemera::Action::"issue", resource)
        when { context.ttl_s <= 600 && ["read"].containsAll(context.scopes) };
    "#,
    );
    let r = role("api", &["read", "write"], None);
    let p = svid("spiffe://a/w");
    let read = vec!["read".to_string()];
    let write = vec!["read".to_string(), "write".to_string()];
    let mut c = ctx(&read, MONDAY_1030_MS, "10.0.0.1");
    c.ttl_s = 600;
    assert!(b.decide(&p, Action::Issue, &r, &c).allowed);
    c.ttl_s = 601;
    assert!(!b.decide(&p, Action::Issue, &r, &c).allowed);
    let mut c = ctx(&write, MONDAY_1030_MS, "10.0.0.1");
    c.ttl_s = 60;
    assert!(!b.decide(&p, Action::Issue, &r, &c).allowed);
}

#[test]
fn renewal_refused_after_attribute_change_and_after_policy_change() {
    let v1 = book(CI);
    let deploy = role("ci-deploy", &["deploy:staging", "artifacts:read"], None);
    let scopes = vec!["deploy:staging".to_string()];
    let mut c = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    c.lease_owner = true;
    let main = github("acme/api", "refs/heads/main", None);
    assert!(v1.decide(&main, Action::Renew, &deploy, &c).allowed);
    // Same subject, re-authenticated with a token whose ref changed.
    let mut moved = main.clone();
    moved
        .attributes
        .insert("ref".into(), "refs/heads/hack".into());
    assert!(!v1.decide(&moved, Action::Renew, &deploy, &c).allowed);
    // The policy no longer lets main deploy to staging.
    let v2_text = CI.replace("refs/heads/main", "refs/heads/release");
    let v2 = PolicyBook::compile(&v2_text, 8).unwrap();
    let d = v2.decide(&main, Action::Renew, &deploy, &c);
    assert!(!d.allowed);
    assert_eq!(d.version, 8);
    assert_eq!(
        diff(&v1, &v2),
        PolicyDiff {
            changed: vec!["ci-api-deploy-staging".into()],
            ..Default::default()
        }
    );
}

#[test]
fn admin_actions() {
    let b = book(ADMINS);
    let a = admin("spiffe://acme.internal/admin/alice");
    let ops = Some("10.1.2.3".parse().unwrap());
    let cafe = Some("203.0.113.9".parse().unwrap());
    assert!(
        b.decide_admin(&a, AdminAction::RoleWrite, ops, MONDAY_1030_MS)
            .allowed
    );
    let d = b.decide_admin(&a, AdminAction::RoleWrite, cafe, MONDAY_1030_MS);
    assert!(!d.allowed);
    assert_eq!(d.determining, vec!["admins-from-ops-network"]);
    assert!(
        b.decide_admin(&a, AdminAction::AuditRead, cafe, MONDAY_1030_MS)
            .allowed
    );
    // A workload is never an admin, whatever it asks.
    let w = svid("spiffe://acme.internal/ns/prod/sa/web");
    assert!(
        !b.decide_admin(&w, AdminAction::AuditRead, ops, MONDAY_1030_MS)
            .allowed
    );
}

#[test]
fn invalid_sets_are_refused_with_the_validators_message() {
    let cases: &[(&str, &str)] = &[
        ("permit (principal, action, resource", "line 1"),
        (
            "@id(\"x\") permit (principal, action, resource) when { principal.colour == \"red\" };",
            "colour",
        ),
        (
            "@id(\"x\") permit (principal, action == Ephemera::Action::\"fly\", resource);",
            "fly",
        ),
        ("permit (principal, action, resource);", "@id"),
        (
            "@id(\"a\") permit (principal, action, resource);\n@id(\"a\") forbid (principal, action, resource);",
            "duplicate",
        ),
        (
            "@id(\"a\") @max_ttl(\"60\") permit (principal, action, resource);",
            "unknown annotation @max_ttl",
        ),
        (
            "@id(\"a\") @max_ttl_s(\"soon\") permit (principal, action, resource);",
            "whole number",
        ),
        (
            "@id(\"a\") @scopes(\"read\") forbid (principal, action, resource);",
            "belongs on a permit",
        ),
        (
            // Strict validation: an optional tag read without `hasTag`.
            "@id(\"a\") permit (principal is Ephemera::Workload, action, resource) when { principal.getTag(\"repo\") == \"x\" };",
            "a",
        ),
        (
            "@id(\"a\") permit (principal == ?principal, action, resource);",
            "template",
        ),
    ];
    for (text, needle) in cases {
        match PolicyBook::compile(text, 1) {
            Ok(_) => panic!("accepted invalid policy set: {text}"),
            Err(PolicyError::Invalid(msg)) => {
                assert!(
                    msg.contains(needle),
                    "message for {text:?} lacks {needle:?}: {msg}"
                )
            }
        }
    }
    let huge = "x".repeat(MAX_POLICY_TEXT_LEN + 1);
    assert!(PolicyBook::compile(&huge, 1).is_err());
}

#[test]
fn time_fields_are_utc_calendar_fields() {
    assert_eq!(time_fields(0), (0, 0, 0, 3));
    let (_, hour, minute, weekday) = time_fields(MONDAY_1030_MS);
    assert_eq!((hour, minute, weekday), (10, 30, 0));
    assert_eq!(time_fields(SATURDAY_1030_MS).3, 5);
}

#[test]
fn policy_hash_is_stable() {
    assert_eq!(policy_hash("abc").len(), 64);
    assert_ne!(policy_hash("a"), policy_hash("b"));
}

/// Decisions skip per-request schema checks; this is what makes that safe: the entities and
/// contexts this crate builds conform to the schema, for every kind of principal and action.
#[test]
fn built_entities_and_contexts_conform_to_the_schema() {
    let scopes = vec!["read".to_string()];
    let c = ctx(&scopes, MONDAY_1030_MS, "10.0.0.1");
    let r = role("web", &["read"], Some("prod"));
    for p in [
        github("acme/api", "refs/heads/main", Some("production")),
        svid("spiffe://acme.internal/ns/prod/sa/web"),
        admin("spiffe://acme.internal/admin/alice"),
    ] {
        let entity = principal_entity(&p).unwrap();
        // Every kind's role entity conforms.
        for r in [r.clone(), ssh_role(&["alice"]), Role::builtin_svid()] {
            Entities::from_entities([entity.clone(), role_entity(&r)], Some(schema()))
                .unwrap_or_else(|e| panic!("{p:?}, {}: {e}", r.name));
        }
        for action in Action::ALL {
            let context = Context::from_pairs(
                workload_context(&c)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v)),
            )
            .unwrap();
            Request::new(
                entity.uid(),
                uid("Action", action.name()),
                uid("Role", "web"),
                context,
                Some(schema()),
            )
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        }
        if p.is_admin() {
            for action in AdminAction::ALL {
                let context = Context::from_pairs(
                    [("source_ip", ip(None)), ("time", time(MONDAY_1030_MS))]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v)),
                )
                .unwrap();
                Request::new(
                    entity.uid(),
                    uid("Action", action.name()),
                    uid("Cluster", "cluster"),
                    context,
                    Some(schema()),
                )
                .unwrap_or_else(|e| panic!("{action:?}: {e}"));
            }
        }
    }
    assert!(principal_entity(&Principal::system()).is_none());
    assert!(principal_entity(&Principal::bootstrap_admin()).is_none());
}

fn ssh_role(principals: &[&str]) -> Role {
    Role {
        spec: ephemera_core::kind::RoleSpec::Ssh(ephemera_core::kind::ssh::Spec {
            cert_type: ephemera_core::kind::ssh::CertType::User,
            principals: principals.iter().map(|s| s.to_string()).collect(),
            host_domains: vec![],
            allow_subdomains: false,
            extensions: vec![],
            critical_options: vec![],
        }),
        ..role("ops", &[], None)
    }
}

/// Policies see an SSH role's kind and principals, and the principals a request asks for.
#[test]
fn ssh_requests_are_decided_on_their_principals() {
    let b = book(
        r#"
@id("ssh-users")
permit (principal is Ephemera::Workload, action == Ephemera::Action::"issue", resource)
when { resource.kind == "ssh-user" };

@id("no-root")
forbid (principal, action == Ephemera::Action::"issue", resource)
when { context.principals.contains("root") };
"#,
    );
    let r = ssh_role(&["alice", "root"]);
    let p = svid("spiffe://acme.internal/ns/prod/sa/web");
    let decide = |principals: &[String]| {
        let c = WorkloadContext {
            principals,
            ..ctx(&[], MONDAY_1030_MS, "10.0.0.1")
        };
        b.decide(&p, Action::Issue, &r, &c)
    };
    let d = decide(&["alice".to_string()]);
    assert!(d.allowed, "{d:?}");
    let d = decide(&["alice".to_string(), "root".to_string()]);
    assert!(!d.allowed);
    assert_eq!(d.determining, ["no-root"]);
    // A JWT role is not an SSH role.
    let c = ctx(&[], MONDAY_1030_MS, "10.0.0.1");
    assert!(
        !b.decide(&p, Action::Issue, &role("web", &["read"], None), &c)
            .allowed
    );
}
