//! Request-time authorization: every request is decided here, on the node that received it,
//! against the policy version committed in Raft. The decision travels in the command, and
//! `apply` executes it only if that version is still the active one.
//!
//! The component is pure ([`decide_workload`], [`decide_admin`], the contexts they decide in):
//! a [`Verdict`] of allow-with-stamp or deny-with-audit-record, unit-tested below; the node's
//! methods add what needs IO (the compiled book of the active version, catching up with a role
//! or a policy, auditing the refusal).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ephemera_core::command::{IssueIntent, PolicyDenial, RequestContext};
use ephemera_core::policy::PolicyStamp;
use ephemera_core::state;
use ephemera_core::types::{AuthMethod, Lease, Principal, Role};
use ephemera_core::Error;
use ephemera_policy::{Action, AdminAction, Decision, PolicyBook, WorkloadContext};

use crate::node::Node;

/// What the receiving node knows about a request beyond the principal.
#[derive(Debug, Clone, Default)]
pub struct CallerContext {
    pub source_ip: Option<IpAddr>,
    /// Declared by the caller.
    pub environment: Option<String>,
    pub job_id: Option<String>,
}

impl CallerContext {
    pub fn from_addr(addr: Option<std::net::SocketAddr>) -> Self {
        CallerContext {
            source_ip: addr.map(|a| a.ip()),
            ..Default::default()
        }
    }

    pub fn for_audit(&self) -> RequestContext {
        RequestContext {
            source_ip: self.source_ip.map(|ip| ip.to_string()),
            environment: self.environment.clone(),
            job_id: self.job_id.clone(),
        }
    }
}

/// How long a request waits for this node to catch up with a policy version that changed while
/// it was in flight, and how many times it is decided again.
const POLICY_CATCH_UP: Duration = Duration::from_secs(2);
pub const POLICY_ATTEMPTS: usize = 3;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

fn stamp_of(d: &Decision) -> PolicyStamp {
    PolicyStamp {
        version: d.version,
        determining: d.determining.clone(),
        scopes: d.grant.scopes.as_ref().map(|s| s.iter().cloned().collect()),
        max_ttl_s: d.grant.max_ttl_s,
    }
}

/// The role a lease was issued under, or one reconstructed from the lease if the role has since
/// been deleted (its leases live on, and policy still decides over them).
fn role_of(view: &ephemera_raft::store::StateView, lease: &Lease) -> Result<Role, Error> {
    if let Some(role) = state::get_role(view, &lease.role).map_err(internal)? {
        return Ok(role);
    }
    Ok(Role {
        name: lease.role.clone(),
        spec: lease.grant.implied_spec(),
        default_ttl_s: lease.ttl_s,
        max_ttl_s: lease.max_expires_at_ms.saturating_sub(lease.issued_at_ms) / 1000,
        environment: None,
        target: None,
        revoke_on_renewal_denied: false,
        issue_rate_per_identity: None,
        issue_rate: None,
        max_live_leases_per_identity: None,
        max_live_leases: None,
    })
}

/// What the authorization component answers: allow, with the stamp the command carries to
/// `apply`, or deny, with the record the refusal is audited under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow(PolicyStamp),
    Deny(PolicyDenial),
}

/// The stamp of the break-glass credential, which policy does not bind (every use is audited).
pub fn break_glass_stamp(version: u64) -> PolicyStamp {
    PolicyStamp {
        version,
        determining: vec![PolicyStamp::BREAK_GLASS.into()],
        scopes: None,
        max_ttl_s: None,
    }
}

/// Policies that failed to evaluate (they count as not matching), for the node's log.
pub type EvaluationErrors = Vec<String>;

/// The context of an Issue on `role`: what the request asks of the role's kind (the role's
/// defaults where it asks nothing), and the caller's runtime context.
/// What the policy sees of an exchange beyond an Issue's context.
pub struct ExchangeContext<'a> {
    /// The subject token's subject: the new token's.
    pub subject: &'a str,
    /// Exchanges since a token obtained directly (1 for the first exchange).
    pub delegation_depth: u32,
    /// The new token's actors, newest first.
    pub actors: &'a [String],
}

pub fn issue_context<'a>(
    principal: &'a Principal,
    role: &'a Role,
    intent: &'a IssueIntent,
    caller: &'a CallerContext,
    now_ms: u64,
) -> WorkloadContext<'a> {
    let asked = role.spec.cedar_request(&intent.request);
    let ttl_s = intent.ttl_s.unwrap_or(role.default_ttl_s);
    let subject = intent.subject.as_deref().unwrap_or(&principal.id);
    context(asked, ttl_s, subject, caller, now_ms, false)
}

/// The context of a request for a credential the kind's view describes.
fn context<'a>(
    view: ephemera_core::kind::CedarView<'a>,
    ttl_s: u64,
    subject: &'a str,
    caller: &'a CallerContext,
    now_ms: u64,
    lease_owner: bool,
) -> WorkloadContext<'a> {
    WorkloadContext {
        ttl_s,
        scopes: view.scopes,
        principals: view.principals,
        audience: view.audience,
        source_ip: caller.source_ip,
        environment: caller.environment.as_deref().unwrap_or(""),
        job_id: caller.job_id.as_deref().unwrap_or(""),
        now_ms,
        subject,
        delegation_depth: 0,
        actors: &[],
        lease_owner,
    }
}

/// The context of a Renew, Revoke or Introspect of `lease`: what the credential carries.
pub fn lease_context<'a>(
    principal: &Principal,
    lease: &'a Lease,
    ttl_s: Option<u64>,
    caller: &'a CallerContext,
    now_ms: u64,
) -> WorkloadContext<'a> {
    let owner = lease.subject == principal.id || lease.client_id == principal.id;
    let ttl_s = ttl_s.unwrap_or(lease.ttl_s);
    context(
        lease.grant.cedar(),
        ttl_s,
        &lease.subject,
        caller,
        now_ms,
        owner,
    )
}

fn verdict(
    d: &Decision,
    action: &str,
    role: Option<&str>,
    lease_id: Option<&str>,
    caller: &CallerContext,
) -> Verdict {
    if d.allowed {
        return Verdict::Allow(stamp_of(d));
    }
    Verdict::Deny(PolicyDenial {
        action: action.to_string(),
        role: role.map(str::to_string),
        lease_id: lease_id.map(str::to_string),
        version: d.version,
        determining: d.determining.clone(),
        reason: d.describe(),
        context: caller.for_audit(),
    })
}

/// Decides a workload request on `role` (pure: the book, the request, its context).
pub fn decide_workload(
    book: &PolicyBook,
    principal: &Principal,
    action: Action,
    role: &Role,
    ctx: &WorkloadContext<'_>,
    lease_id: Option<&str>,
    caller: &CallerContext,
) -> (Verdict, EvaluationErrors) {
    if principal.auth_method == AuthMethod::BootstrapAdmin {
        return (
            Verdict::Allow(break_glass_stamp(book.version())),
            Vec::new(),
        );
    }
    let d = book.decide(principal, action, role, ctx);
    (
        verdict(&d, action.name(), Some(&role.name), lease_id, caller),
        d.errors,
    )
}

/// Decides an administrative action (pure). Only configured administrators reach policy.
pub fn decide_admin(
    book: &PolicyBook,
    principal: &Principal,
    action: AdminAction,
    caller: &CallerContext,
    now_ms: u64,
) -> Result<(Verdict, EvaluationErrors), Error> {
    if principal.auth_method == AuthMethod::BootstrapAdmin {
        return Ok((
            Verdict::Allow(break_glass_stamp(book.version())),
            Vec::new(),
        ));
    }
    if !principal.is_admin() {
        return Err(Error::PermissionDenied(format!(
            "{} is not an administrator",
            principal.id
        )));
    }
    let d = book.decide_admin(principal, action, caller.source_ip, now_ms);
    Ok((verdict(&d, action.name(), None, None, caller), d.errors))
}

impl Node {
    /// The compiled policy set of the committed active version, compiled once per version.
    pub fn policy_book(&self) -> Result<Arc<PolicyBook>, Error> {
        let version = state::policy_version(&self.view).map_err(internal)?;
        let mut cache = self.policy_cache.lock().expect("policy cache lock");
        if let Some(book) = cache.as_ref().filter(|b| b.version() == version) {
            return Ok(book.clone());
        }
        if version == 0 {
            return Err(Error::NotInitialized);
        }
        let committed = state::policy_at(&self.view, version)
            .map_err(internal)?
            .ok_or_else(|| internal(format!("policy version {version} is missing")))?;
        // Validated before it was proposed; failing here means this node's Cedar differs from
        // the proposer's (a mixed-version cluster). Fail closed: deny until it compiles.
        let book = PolicyBook::compile(&committed.text, version).map_err(|e| {
            tracing::error!(version, error = %e, "the committed policy set does not compile on this node");
            Error::Unavailable(format!(
                "policy version {version} does not compile on this node; see its log"
            ))
        })?;
        let book = Arc::new(book);
        *cache = Some(book.clone());
        Ok(book)
    }

    fn log_evaluation_errors(&self, version: u64, errors: &[String]) {
        for e in errors {
            tracing::warn!(version, error = %e, "policy evaluation error (treated as not matching)");
        }
    }

    fn break_glass_stamp(&self) -> Result<PolicyStamp, Error> {
        Ok(break_glass_stamp(
            state::policy_version(&self.view).map_err(internal)?,
        ))
    }

    /// Authorizes an administrative action. The break-glass credential is not bound by policy
    /// (its every use is audited); anyone else must be a configured administrator whom the
    /// active policy permits.
    pub async fn authorize_admin(
        &self,
        principal: &Principal,
        action: AdminAction,
        caller: &CallerContext,
    ) -> Result<(), Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            return Ok(());
        }
        let book = self.policy_book()?;
        let (verdict, errors) =
            decide_admin(&book, principal, action, caller, self.clock.now_ms())?;
        self.log_evaluation_errors(book.version(), &errors);
        match verdict {
            Verdict::Allow(_) => Ok(()),
            Verdict::Deny(denial) => {
                let reason = denial.reason.clone();
                self.audit_refusal(principal.clone(), denial, false).await;
                Err(Error::PolicyDenied(format!(
                    "{} may not {}: {reason}",
                    principal.id,
                    action.name(),
                )))
            }
        }
    }

    /// Decides an Issue: the stamp to propose with, or a refusal (audited).
    pub async fn decide_issue(
        &self,
        principal: &Principal,
        intent: &IssueIntent,
        caller: &CallerContext,
    ) -> Result<PolicyStamp, Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            return self.break_glass_stamp();
        }
        // A role created through another node may not have reached this one yet: before
        // calling it unknown, catch up to the leader's commit index.
        let read = || state::get_role(&self.view, &intent.role).map_err(internal);
        let role = match read()? {
            Some(role) => role,
            None => {
                self.read_barrier().await?;
                read()?.ok_or_else(|| Error::UnknownRole(intent.role.clone()))?
            }
        };
        let ctx = issue_context(principal, &role, intent, caller, self.clock.now_ms());
        self.decide_workload(principal, Action::Issue, &role, &ctx, None, caller)
            .await
    }

    /// Decides a token exchange on `role` (`exchange`): the context is the Issue's, with what
    /// the new token derives from.
    pub async fn decide_exchange(
        &self,
        principal: &Principal,
        role: &Role,
        intent: &IssueIntent,
        derived: &ExchangeContext<'_>,
        caller: &CallerContext,
    ) -> Result<PolicyStamp, Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            return self.break_glass_stamp();
        }
        let mut ctx = issue_context(principal, role, intent, caller, self.clock.now_ms());
        ctx.subject = derived.subject;
        ctx.delegation_depth = derived.delegation_depth;
        ctx.actors = derived.actors;
        self.decide_workload(principal, Action::Exchange, role, &ctx, None, caller)
            .await
    }

    /// Decides a Renew, a Revoke or an Introspect of an existing lease.
    pub async fn decide_on_lease(
        &self,
        principal: &Principal,
        action: Action,
        lease: &Lease,
        ttl_s: Option<u64>,
        caller: &CallerContext,
    ) -> Result<PolicyStamp, Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            return self.break_glass_stamp();
        }
        let role = role_of(&self.view, lease)?;
        let ctx = lease_context(principal, lease, ttl_s, caller, self.clock.now_ms());
        self.decide_workload(principal, action, &role, &ctx, Some(&lease.id), caller)
            .await
    }

    async fn decide_workload(
        &self,
        principal: &Principal,
        action: Action,
        role: &Role,
        ctx: &WorkloadContext<'_>,
        lease_id: Option<&String>,
        caller: &CallerContext,
    ) -> Result<PolicyStamp, Error> {
        let book = self.policy_book()?;
        let (verdict, errors) = decide_workload(
            &book,
            principal,
            action,
            role,
            ctx,
            lease_id.map(String::as_str),
            caller,
        );
        self.log_evaluation_errors(book.version(), &errors);
        let denial = match verdict {
            Verdict::Allow(stamp) => {
                self.metrics.policy_decision(true);
                return Ok(stamp);
            }
            Verdict::Deny(denial) => denial,
        };
        self.metrics.policy_decision(false);
        let mut reason = denial.reason.clone();
        // Refused renewals are always recorded (the record is what revokes the lease when its
        // role says so); other refusals share the node's audit rate limit, so a flood of
        // refused requests cannot become unbounded Raft writes.
        let always = action == Action::Renew;
        let revoked = matches!(
            self.audit_refusal(principal.clone(), denial, always).await,
            Some(ephemera_core::command::Outcome::Revoked { count }) if count > 0
        );
        if revoked {
            reason.push_str("; the lease was revoked, as its role requires");
        }
        Err(Error::PolicyDenied(reason))
    }

    /// Waits until this node has applied policy version `active` (after a request's decision
    /// raced a policy change), so that the next decision uses it.
    pub async fn catch_up_policy(&self, active: u64) {
        let deadline = tokio::time::Instant::now() + POLICY_CATCH_UP;
        while tokio::time::Instant::now() < deadline {
            if state::policy_version(&self.view).is_ok_and(|v| v >= active) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ephemera_core::kind::{jwt, ssh, Grant, KindRequest, RoleSpec};
    use ephemera_core::types::LeaseState;

    const POLICY: &str = r#"
@id("workloads-issue")
@scopes("read")
permit (principal is Ephemera::Workload, action == Ephemera::Action::"issue", resource);

@id("owners-revoke")
permit (principal is Ephemera::Workload, action == Ephemera::Action::"revoke", resource)
when { context.lease_owner };

@id("no-root")
forbid (principal, action == Ephemera::Action::"issue", resource)
when { context.principals.contains("root") };

@id("admins-read-roles")
permit (principal is Ephemera::Admin, action == Ephemera::Action::"role.read", resource);
"#;
    const NOW: u64 = 1_795_429_800_000;

    fn book() -> PolicyBook {
        PolicyBook::compile(POLICY, 3).unwrap()
    }

    fn workload() -> Principal {
        Principal::svid("spiffe://td/w".into(), "td".into(), false)
    }

    fn caller() -> CallerContext {
        CallerContext {
            source_ip: Some([10, 0, 0, 9].into()),
            environment: Some("prod".into()),
            job_id: None,
        }
    }

    fn role(name: &str, spec: RoleSpec) -> Role {
        Role {
            name: name.into(),
            spec,
            ..Role::builtin_svid()
        }
    }

    fn jwt_role() -> Role {
        role(
            "web",
            RoleSpec::Jwt(jwt::Spec {
                audience: "api".into(),
                allowed_scopes: vec!["read".into(), "write".into()],
            }),
        )
    }

    fn ssh_role() -> Role {
        role(
            "ops",
            RoleSpec::Ssh(ssh::Spec {
                cert_type: ssh::CertType::User,
                principals: vec!["alice".into(), "root".into()],
                host_domains: vec![],
                allow_subdomains: false,
                extensions: vec![],
                critical_options: vec![],
            }),
        )
    }

    fn issue(role: &Role, request: KindRequest) -> IssueIntent {
        IssueIntent {
            request_id: None,
            role: role.name.clone(),
            subject: None,
            ttl_s: None,
            purpose: None,
            request,
            join_token_hash: None,
            supersedes: None,
            context: RequestContext::default(),
            policy: None,
        }
    }

    fn ssh_request(principals: &[&str]) -> KindRequest {
        KindRequest::Ssh(ssh::Request {
            public_key: "ssh-ed25519 AAAA".into(),
            principals: principals.iter().map(|p| p.to_string()).collect(),
            extensions: None,
            critical_options: Default::default(),
        })
    }

    fn decide_issue(role: &Role, request: KindRequest) -> Verdict {
        let intent = issue(role, request);
        let c = caller();
        let who = workload();
        let ctx = issue_context(&who, role, &intent, &c, NOW);
        decide_workload(&book(), &who, Action::Issue, role, &ctx, None, &c).0
    }

    #[test]
    fn an_allowed_request_carries_its_stamp_and_a_denied_one_its_audit_record() {
        let web = jwt_role();
        let allowed = decide_issue(
            &web,
            KindRequest::Jwt(jwt::Request {
                scopes: vec!["read".into(), "write".into()],
                audience: None,
            }),
        );
        assert_eq!(
            allowed,
            Verdict::Allow(PolicyStamp {
                version: 3,
                determining: vec!["workloads-issue".into()],
                scopes: Some(vec!["read".into()]),
                max_ttl_s: None,
            })
        );
        // The SSH role's kind shows its principals: asking for none asks for all, root too.
        let ops = ssh_role();
        let Verdict::Deny(denial) = decide_issue(&ops, ssh_request(&[])) else {
            panic!("root was not forbidden");
        };
        assert_eq!(denial.action, "issue");
        assert_eq!(denial.role.as_deref(), Some("ops"));
        assert_eq!(denial.determining, ["no-root"]);
        assert_eq!(denial.version, 3);
        assert_eq!(denial.context.source_ip.as_deref(), Some("10.0.0.9"));
        assert_eq!(denial.context.environment.as_deref(), Some("prod"));
        assert!(matches!(
            decide_issue(&ops, ssh_request(&["alice"])),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn lease_decisions_see_ownership_and_break_glass_is_not_bound() {
        let web = jwt_role();
        let lease = Lease {
            id: "l_1".into(),
            role: "web".into(),
            subject: workload().id,
            client_id: workload().id,
            purpose: None,
            parent: None,
            ttl_s: 60,
            issued_at_ms: NOW,
            minted_at_ms: NOW,
            expires_at_ms: NOW + 60_000,
            max_expires_at_ms: NOW + 600_000,
            renew_after_ms: NOW + 30_000,
            kid: "k".into(),
            renewals: 0,
            state: LeaseState::Active,
            grant: Grant::Jwt(jwt::Grant {
                audience: "api".into(),
                scopes: vec!["read".into()],
            }),
        };
        let c = caller();
        let revoke = |who: &Principal| {
            let ctx = lease_context(who, &lease, None, &c, NOW);
            decide_workload(&book(), who, Action::Revoke, &web, &ctx, Some("l_1"), &c).0
        };
        assert!(matches!(revoke(&workload()), Verdict::Allow(_)));
        let stranger = Principal::svid("spiffe://td/other".into(), "td".into(), false);
        let Verdict::Deny(denial) = revoke(&stranger) else {
            panic!("a stranger revoked another's lease");
        };
        assert_eq!(denial.lease_id.as_deref(), Some("l_1"));
        assert!(
            denial.determining.is_empty(),
            "nothing permitted: {denial:?}"
        );
        assert_eq!(
            revoke(&Principal::bootstrap_admin()),
            Verdict::Allow(break_glass_stamp(3))
        );
    }

    #[test]
    fn admin_actions_are_for_administrators_whom_policy_permits() {
        let c = caller();
        let admin = Principal::svid("spiffe://td/admin/a".into(), "td".into(), true);
        let decide = |p: &Principal, a: AdminAction| decide_admin(&book(), p, a, &c, NOW);
        assert!(matches!(
            decide(&workload(), AdminAction::RoleRead),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            decide(&admin, AdminAction::RoleRead),
            Ok((Verdict::Allow(_), _))
        ));
        let Ok((Verdict::Deny(denial), _)) = decide(&admin, AdminAction::KeyRotate) else {
            panic!("an unpermitted admin action was allowed");
        };
        assert_eq!(denial.action, "key.rotate");
        assert!(matches!(
            decide(&Principal::bootstrap_admin(), AdminAction::KeyRotate),
            Ok((Verdict::Allow(_), _))
        ));
    }
}
