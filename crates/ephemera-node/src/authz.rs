//! Request-time authorization: every request is decided here, on the node that received it,
//! against the policy version committed in Raft. The decision travels in the command, and
//! `apply` executes it only if that version is still the active one.

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

    fn log_evaluation_errors(&self, d: &Decision) {
        for e in &d.errors {
            tracing::warn!(version = d.version, error = %e, "policy evaluation error (treated as not matching)");
        }
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
        if !principal.is_admin() {
            return Err(Error::PermissionDenied(format!(
                "{} is not an administrator",
                principal.id
            )));
        }
        let book = self.policy_book()?;
        let d = book.decide_admin(principal, action, caller.source_ip, self.clock.now_ms());
        self.log_evaluation_errors(&d);
        if d.allowed {
            return Ok(());
        }
        self.refuse(principal, action.name(), None, None, &d, caller)
            .await;
        Err(Error::PolicyDenied(format!(
            "{} may not {}: {}",
            principal.id,
            action.name(),
            d.describe()
        )))
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
        let asked = role.spec.cedar_request(&intent.request);
        let ctx = WorkloadContext {
            ttl_s: intent.ttl_s.unwrap_or(role.default_ttl_s),
            scopes: asked.scopes,
            principals: asked.principals,
            audience: asked.audience,
            source_ip: caller.source_ip,
            environment: caller.environment.as_deref().unwrap_or(""),
            job_id: caller.job_id.as_deref().unwrap_or(""),
            now_ms: self.clock.now_ms(),
            delegation_depth: 0,
            lease_owner: false,
        };
        self.decide_workload(principal, Action::Issue, &role, &ctx, None, caller)
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
        let carried = lease.grant.cedar();
        let ctx = WorkloadContext {
            ttl_s: ttl_s.unwrap_or(lease.ttl_s),
            scopes: carried.scopes,
            principals: carried.principals,
            audience: carried.audience,
            source_ip: caller.source_ip,
            environment: caller.environment.as_deref().unwrap_or(""),
            job_id: caller.job_id.as_deref().unwrap_or(""),
            now_ms: self.clock.now_ms(),
            delegation_depth: 0,
            lease_owner: lease.subject == principal.id || lease.client_id == principal.id,
        };
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
        let d = book.decide(principal, action, role, ctx);
        self.log_evaluation_errors(&d);
        if d.allowed {
            self.metrics.policy_decision(true);
            return Ok(stamp_of(&d));
        }
        self.metrics.policy_decision(false);
        let revoked = self
            .refuse(
                principal,
                action.name(),
                Some(&role.name),
                lease_id,
                &d,
                caller,
            )
            .await;
        let mut reason = d.describe();
        if revoked {
            reason.push_str("; the lease was revoked, as its role requires");
        }
        Err(Error::PolicyDenied(reason))
    }

    fn break_glass_stamp(&self) -> Result<PolicyStamp, Error> {
        Ok(PolicyStamp {
            version: state::policy_version(&self.view).map_err(internal)?,
            determining: vec![PolicyStamp::BREAK_GLASS.into()],
            scopes: None,
            max_ttl_s: None,
        })
    }

    /// Audits a policy refusal. Refused renewals are always recorded (the record is what revokes
    /// the lease when its role says so); other refusals share the node's audit rate limit, so a
    /// flood of refused requests cannot become unbounded Raft writes. Returns whether the lease
    /// was revoked.
    async fn refuse(
        &self,
        principal: &Principal,
        action: &str,
        role: Option<&String>,
        lease_id: Option<&String>,
        d: &Decision,
        caller: &CallerContext,
    ) -> bool {
        let denial = PolicyDenial {
            action: action.to_string(),
            role: role.cloned(),
            lease_id: lease_id.cloned(),
            version: d.version,
            determining: d.determining.clone(),
            reason: d.describe(),
            context: caller.for_audit(),
        };
        let always = action == Action::Renew.name();
        matches!(
            self.audit_refusal(principal.clone(), denial, always).await,
            Some(ephemera_core::command::Outcome::Revoked { count }) if count > 0
        )
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
