//! Fixtures shared by the micro-benchmarks (and checked by their tests, so a benchmark never
//! measures a request that silently errors out).

pub mod policy_fixture {
    use std::collections::BTreeMap;

    use ephemera_core::types::{AuthMethod, Principal, Role};

    pub const GITHUB: &str = "https://token.actions.githubusercontent.com";

    /// A policy set shaped like a real deployment: per-repository CI policies (build, deploy to
    /// staging from main, deploy to production from tags in office hours), service-to-service
    /// permits by SPIFFE ID with network conditions, per-task AI agents, guard-rail forbids and
    /// the administrators' grant, plus the shipped examples.
    pub fn realistic_policy_set(repositories: usize, services: usize) -> String {
        let mut text = String::new();
        for r in 0..repositories {
            text.push_str(&format!(
                r#"
@id("ci-{r}-build") @max_ttl_s("600") @scopes("artifacts:read artifacts:write")
permit (principal is Ephemera::Workload, action in [Ephemera::Action::"issue", Ephemera::Action::"renew"], resource == Ephemera::Role::"ci-build")
when {{ principal.issuer == "{GITHUB}" && principal.hasTag("repository") && principal.getTag("repository") == "acme/repo-{r}" }};
"#
            ));
            if r % 2 == 0 {
                text.push_str(&format!(
                    r#"
@id("ci-{r}-deploy") @max_ttl_s("600") @scopes("deploy:staging")
permit (principal is Ephemera::Workload, action in [Ephemera::Action::"issue", Ephemera::Action::"renew"], resource == Ephemera::Role::"ci-deploy")
when {{ principal.issuer == "{GITHUB}" && principal.hasTag("repository") && principal.getTag("repository") == "acme/repo-{r}" &&
        principal.hasTag("ref") && (principal.getTag("ref") == "refs/heads/main" || principal.getTag("ref") like "refs/tags/v*") &&
        context.time.weekday < 5 && context.time.hour >= 7 && context.time.hour < 19 }};
"#
                ));
            }
        }
        for s in 0..services {
            text.push_str(&format!(
                r#"
@id("svc-{s}") @max_ttl_s("900")
permit (principal == Ephemera::Workload::"spiffe://acme.internal/ns/prod/sa/svc-{s}", action in [Ephemera::Action::"issue", Ephemera::Action::"renew"], resource == Ephemera::Role::"api-{s}")
when {{ principal.auth_method == "x509_svid" && context.source_ip.isInRange(ip("10.20.0.0/16")) }};
"#
            ));
        }
        text.push_str(
            r#"
@id("agent-per-task") @max_ttl_s("300") @scopes("tickets:read docs:read")
permit (principal is Ephemera::Workload, action == Ephemera::Action::"issue", resource == Ephemera::Role::"agent-tools")
when { principal.issuer == "https://orchestrator.acme.internal" && principal.hasTag("task_id") && context.job_id == principal.getTag("task_id") && context.delegation_depth == 0 };

@id("no-staging-in-prod")
forbid (principal is Ephemera::Workload, action, resource)
when { principal.id like "spiffe://acme.internal/ns/staging/*" && resource.environment == "prod" };

@id("no-long-ttl")
forbid (principal is Ephemera::Workload, action == Ephemera::Action::"issue", resource)
when { context.ttl_s > 86400 };

@id("revoke-own")
permit (principal is Ephemera::Workload, action == Ephemera::Action::"revoke", resource)
when { context.lease_owner };

@id("admins")
permit (principal is Ephemera::Admin, action, resource);
"#,
        );
        text
    }

    /// A CI job of the last repository, deploying from main.
    pub fn ci_job(repository: usize) -> Principal {
        Principal {
            id: format!("repo:acme/repo-{repository}:ref:refs/heads/main"),
            auth_method: AuthMethod::JwtAssertion,
            issuer: Some(GITHUB.into()),
            attributes: BTreeMap::from([
                ("repository".to_string(), format!("acme/repo-{repository}")),
                ("ref".to_string(), "refs/heads/main".to_string()),
                ("run_id".to_string(), "123456".to_string()),
            ]),
            admin: false,
            presented: Default::default(),
        }
    }

    /// A deploy request's context: from the service network, Monday 2026-11-23 10:30 UTC.
    pub fn deploy_context(scopes: &[String]) -> ephemera_policy::WorkloadContext<'_> {
        ephemera_policy::WorkloadContext {
            ttl_s: 600,
            scopes,
            principals: &[],
            audience: "https://deploy.acme.internal",
            source_ip: Some([10, 20, 1, 2].into()),
            environment: "",
            job_id: "",
            now_ms: 1_795_429_800_000,
            subject: "repo:acme/repo-0:ref:refs/heads/main",
            delegation_depth: 0,
            actors: &[],
            lease_owner: false,
        }
    }

    pub fn deploy_role() -> Role {
        Role {
            name: "ci-deploy".into(),
            spec: ephemera_core::kind::RoleSpec::Jwt(ephemera_core::kind::jwt::Spec {
                audience: "https://deploy.acme.internal".into(),
                allowed_scopes: vec!["deploy:staging".into(), "deploy:production".into()],
            }),
            default_ttl_s: 600,
            max_ttl_s: 3600,
            environment: Some("prod".into()),
            target: None,
            revoke_on_renewal_denied: false,
            issue_rate_per_identity: None,
            issue_rate: None,
            max_live_leases_per_identity: None,
            max_live_leases: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::policy_fixture::*;
    use ephemera_policy::{Action, PolicyBook};

    /// The benchmarked requests decide the way the benchmark says, without evaluation errors.
    #[test]
    fn the_benchmarked_policy_set_is_large_valid_and_decides() {
        let book = PolicyBook::compile(&realistic_policy_set(40, 20), 1).unwrap();
        assert!(book.policy_ids().len() >= 50, "{}", book.policy_ids().len());
        let scopes = vec!["deploy:staging".to_string()];
        let ctx = deploy_context(&scopes);
        let allowed = book.decide(&ci_job(38), Action::Issue, &deploy_role(), &ctx);
        assert!(allowed.allowed && allowed.errors.is_empty(), "{allowed:?}");
        assert_eq!(allowed.determining, vec!["ci-38-deploy"]);
        let denied = book.decide(&ci_job(39), Action::Issue, &deploy_role(), &ctx);
        assert!(!denied.allowed && denied.errors.is_empty(), "{denied:?}");
    }
}
