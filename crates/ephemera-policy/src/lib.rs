//! Request-time authorization with Cedar. Pure: no clock, no IO. The node hands in the
//! authenticated principal, the role asked for and the request's runtime context; this crate
//! answers allow or deny, which policies determined it, and what the permitting policies grant.
//!
//! Policies carry two annotations besides `@id` that narrow what a permit grants:
//! `@max_ttl_s("600")` caps the TTL and `@scopes("read deploy")` bounds the scopes. When several
//! permits match, the grant is their union (each permit is a grant on its own), and a permit
//! without the annotation leaves that dimension to the role.

mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid,
    Policy, PolicyId, PolicySet, Request, ResourceConstraint, RestrictedExpression, ValidationMode,
    Validator,
};
use ephemera_core::types::{AuthMethod, Principal, Role};
use miette::Diagnostic;
use sha2::{Digest, Sha256};

pub use schema::{schema, SCHEMA_TEXT};

/// The policy set a freshly initialised cluster starts with (version 1): configured
/// administrators may administer and issue; workloads get nothing until a policy says so.
pub const DEFAULT_POLICY: &str = r#"// Version 1 of every cluster. Replace it with `ephemera policy propose FILE`.
@id("admins-administer")
@description("Configured administrators (tls.admin_ids) may administer the cluster.")
permit (principal is Ephemera::Admin, action, resource);
"#;

/// Annotations a policy may carry; anything else is refused, so a misspelt cap cannot silently
/// grant more than meant.
const KNOWN_ANNOTATIONS: &[&str] = &["id", "description", "max_ttl_s", "scopes"];
/// An upper bound on a policy set's source, so one proposal cannot bloat the replicated state.
pub use ephemera_core::policy::MAX_POLICY_TEXT_LEN;
const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a valid policy set: parse errors, schema violations, bad annotations.
    /// The message lists every problem with its line and column.
    #[error("invalid policy set:\n{0}")]
    Invalid(String),
}

/// A workload-facing action (resource: a role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Issue,
    Renew,
    Revoke,
    Introspect,
    Exchange,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Issue,
        Action::Renew,
        Action::Revoke,
        Action::Introspect,
        Action::Exchange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Issue => "issue",
            Action::Renew => "renew",
            Action::Revoke => "revoke",
            Action::Introspect => "introspect",
            Action::Exchange => "exchange",
        }
    }
}

/// An administrative action (resource: the cluster); every one is in `Action::"admin"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    RoleWrite,
    RoleRead,
    KeyRotate,
    KeyRead,
    PolicyPropose,
    PolicyApprove,
    PolicyReject,
    PolicyRead,
    ClusterManage,
    ClusterRead,
    AuditRead,
    LeaseList,
    LeaseRevokeBulk,
    JoinTokenCreate,
    SvidIssueFor,
    QuarantineRead,
    QuarantineRelease,
    DbWrite,
    DbRead,
    LeaseAbandon,
}

impl AdminAction {
    pub const ALL: [AdminAction; 20] = [
        AdminAction::RoleWrite,
        AdminAction::RoleRead,
        AdminAction::KeyRotate,
        AdminAction::KeyRead,
        AdminAction::PolicyPropose,
        AdminAction::PolicyApprove,
        AdminAction::PolicyReject,
        AdminAction::PolicyRead,
        AdminAction::ClusterManage,
        AdminAction::ClusterRead,
        AdminAction::AuditRead,
        AdminAction::LeaseList,
        AdminAction::LeaseRevokeBulk,
        AdminAction::JoinTokenCreate,
        AdminAction::SvidIssueFor,
        AdminAction::QuarantineRead,
        AdminAction::QuarantineRelease,
        AdminAction::DbWrite,
        AdminAction::DbRead,
        AdminAction::LeaseAbandon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AdminAction::RoleWrite => "role.write",
            AdminAction::RoleRead => "role.read",
            AdminAction::KeyRotate => "key.rotate",
            AdminAction::KeyRead => "key.read",
            AdminAction::PolicyPropose => "policy.propose",
            AdminAction::PolicyApprove => "policy.approve",
            AdminAction::PolicyReject => "policy.reject",
            AdminAction::PolicyRead => "policy.read",
            AdminAction::ClusterManage => "cluster.manage",
            AdminAction::ClusterRead => "cluster.read",
            AdminAction::AuditRead => "audit.read",
            AdminAction::LeaseList => "lease.list",
            AdminAction::LeaseRevokeBulk => "lease.revoke_bulk",
            AdminAction::JoinTokenCreate => "jointoken.create",
            AdminAction::SvidIssueFor => "svid.issue_for",
            AdminAction::QuarantineRead => "quarantine.read",
            AdminAction::QuarantineRelease => "quarantine.release",
            AdminAction::DbWrite => "db.write",
            AdminAction::DbRead => "db.read",
            AdminAction::LeaseAbandon => "lease.abandon",
        }
    }
}

/// The runtime context of a workload request, as the receiving node saw it.
#[derive(Debug, Clone)]
pub struct WorkloadContext<'a> {
    pub ttl_s: u64,
    pub scopes: &'a [String],
    /// SSH principals asked for (issue) or carried (renew, revoke, introspect).
    pub principals: &'a [String],
    pub audience: &'a str,
    /// `None` when the transport has no address (policies on `source_ip` then do not match).
    pub source_ip: Option<IpAddr>,
    pub environment: &'a str,
    pub job_id: &'a str,
    /// The receiving node's clock, Unix milliseconds.
    pub now_ms: u64,
    /// Whom the credential is for (see the schema's `subject`).
    pub subject: &'a str,
    pub delegation_depth: u32,
    /// Who acts in an exchanged token's chain (RFC 8693 `act`): the new actor and every earlier
    /// one; empty for a credential obtained directly.
    pub actors: &'a [String],
    pub lease_owner: bool,
}

/// What the matching permits allow beyond the role's own limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// `None`: the policies do not bound the scopes (the role does).
    pub scopes: Option<BTreeSet<String>>,
    /// `None`: the policies do not cap the TTL (the role does).
    pub max_ttl_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy set version that decided.
    pub version: u64,
    /// `@id`s of the policies that determined the decision: the matching permits of an allow,
    /// the matching forbids of a deny; empty for a deny because nothing permitted.
    pub determining: Vec<String>,
    pub grant: Grant,
    /// Policies that failed to evaluate (they count as not matching), for the node's log.
    pub errors: Vec<String>,
}

impl Decision {
    /// A one-line reason for a caller or an audit record.
    pub fn describe(&self) -> String {
        if self.allowed {
            format!(
                "permitted by policy version {} ({})",
                self.version,
                self.determining.join(", ")
            )
        } else if self.determining.is_empty() {
            format!("no policy of version {} permits this request", self.version)
        } else {
            format!(
                "forbidden by policy version {} ({})",
                self.version,
                self.determining.join(", ")
            )
        }
    }
}

/// The group every administrative action belongs to (`action in Ephemera::Action::"admin"`).
const ADMIN_GROUP: &str = "admin";

/// A validated policy set, ready to decide. Build it once per committed version.
///
/// Cedar evaluates every policy of the set it is given. Most policies name one role and a few
/// actions in their scope, so the book keeps, per (action, role), the slice of policies whose
/// scope can match it; a decision evaluates only that slice (the answer is the same, because a
/// policy whose scope cannot match never contributes).
pub struct PolicyBook {
    version: u64,
    set: PolicySet,
    grants: HashMap<PolicyId, Grant>,
    ids: Vec<String>,
    authorizer: Authorizer,
    /// (action, Some(role)) for roles some policy names; (action, None) for every other role.
    slices: HashMap<(&'static str, Option<String>), PolicySet>,
}

fn all_action_names() -> impl Iterator<Item = &'static str> {
    Action::ALL
        .iter()
        .map(|a| a.name())
        .chain(AdminAction::ALL.iter().map(|a| a.name()))
}

fn is_admin_action(name: &str) -> bool {
    AdminAction::ALL.iter().any(|a| a.name() == name)
}

/// Whether a policy's action scope can match `action`.
fn scope_has_action(policy: &Policy, action: &str) -> bool {
    let matches = |uid: &EntityUid| {
        let id = uid.id().unescaped();
        id == action || (id == ADMIN_GROUP && is_admin_action(action))
    };
    match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => matches(&uid),
        ActionConstraint::In(uids) => uids.iter().any(matches),
    }
}

/// The role a policy's resource scope names exactly, if it does.
fn scope_role(policy: &Policy) -> Option<String> {
    match policy.resource_constraint() {
        ResourceConstraint::Eq(uid) if uid.type_name().basename() == "Role" => {
            Some(uid.id().unescaped().to_string())
        }
        _ => None,
    }
}

fn build_slices(set: &PolicySet) -> HashMap<(&'static str, Option<String>), PolicySet> {
    let scoped: Vec<(&Policy, Option<String>)> =
        set.policies().map(|p| (p, scope_role(p))).collect();
    let roles: BTreeSet<String> = scoped.iter().filter_map(|(_, r)| r.clone()).collect();
    let mut slices = HashMap::new();
    for action in all_action_names() {
        let for_role = |role: Option<&String>| {
            let mut slice = PolicySet::new();
            for (policy, scope) in &scoped {
                let role_matches = scope.is_none() || scope.as_ref() == role;
                if role_matches && scope_has_action(policy, action) {
                    slice
                        .add((*policy).clone())
                        .expect("ids are unique within the set");
                }
            }
            slice
        };
        slices.insert((action, None), for_role(None));
        for role in &roles {
            slices.insert((action, Some(role.clone())), for_role(Some(role)));
        }
    }
    slices
}

impl std::fmt::Debug for PolicyBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBook")
            .field("version", &self.version)
            .field("policies", &self.ids)
            .finish()
    }
}

/// SHA-256 of a policy set's source text, hex: what proposals, approvals and audit records name.
pub fn policy_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// One line per diagnostic: `line L, column C: message (help)`.
fn describe_diagnostic(text: &str, d: &dyn Diagnostic, out: &mut String) {
    let at = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| line_col(text, l.offset()));
    if let Some((line, col)) = at {
        let _ = write!(out, "  line {line}, column {col}: ");
    } else {
        out.push_str("  ");
    }
    let _ = write!(out, "{d}");
    if let Some(help) = d.help() {
        let _ = write!(out, " (help: {help})");
    }
    out.push('\n');
}

/// The parser names policies `policy0`, `policy1`, ... in the order of the source.
fn source_position(policy: &Policy) -> usize {
    policy
        .id()
        .to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn parse_ttl(v: &str) -> Option<u64> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && *n <= ephemera_core::command::MAX_TTL_S)
}

fn check_annotations(policy: &Policy, id: &str, problems: &mut String) -> Grant {
    let mut grant = Grant::default();
    let at = |problems: &mut String, msg: String| {
        let _ = writeln!(problems, "  policy {id:?}: {msg}");
    };
    for (key, value) in policy.annotations() {
        if !KNOWN_ANNOTATIONS.contains(&key) {
            at(
                problems,
                format!(
                    "unknown annotation @{key} (known: {})",
                    KNOWN_ANNOTATIONS
                        .iter()
                        .map(|k| format!("@{k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        }
        let is_permit = policy.effect() == cedar_policy::Effect::Permit;
        match key {
            "max_ttl_s" => match parse_ttl(value) {
                Some(_) if !is_permit => at(
                    problems,
                    "@max_ttl_s belongs on a permit (a forbid grants nothing)".into(),
                ),
                Some(n) => grant.max_ttl_s = Some(n),
                None => at(
                    problems,
                    format!(
                        "@max_ttl_s({value:?}) must be a whole number of seconds, 1 to ten years"
                    ),
                ),
            },
            "scopes" => {
                let scopes: BTreeSet<String> =
                    value.split_whitespace().map(str::to_string).collect();
                if !is_permit {
                    at(
                        problems,
                        "@scopes belongs on a permit (a forbid grants nothing)".into(),
                    );
                } else if let Some(bad) = scopes
                    .iter()
                    .find(|s| ephemera_core::command::validate_scope(s).is_err())
                {
                    at(problems, format!("@scopes: {bad:?} is not a valid scope"));
                } else {
                    grant.scopes = Some(scopes);
                }
            }
            _ => {}
        }
    }
    grant
}

impl PolicyBook {
    /// Parses and validates a policy set against the schema (strict mode). Every policy needs a
    /// unique `@id`, which is what decisions and audit records name.
    pub fn compile(text: &str, version: u64) -> Result<Self, PolicyError> {
        if text.len() > MAX_POLICY_TEXT_LEN {
            return Err(PolicyError::Invalid(format!(
                "  the policy set is {} bytes; the limit is {MAX_POLICY_TEXT_LEN}\n",
                text.len()
            )));
        }
        let parsed = PolicySet::from_str(text).map_err(|errs| {
            let mut out = String::new();
            for e in errs.iter() {
                describe_diagnostic(text, e, &mut out);
            }
            PolicyError::Invalid(out)
        })?;
        let mut problems = String::new();
        if parsed.templates().next().is_some() {
            problems.push_str("  templates (?principal, ?resource) are not supported\n");
        }
        let mut set = PolicySet::new();
        let mut grants = HashMap::new();
        let mut ids = Vec::new();
        // Keep the file's order, so errors and `policy show` read top to bottom.
        let mut policies: Vec<&Policy> = parsed.policies().collect();
        policies.sort_by_key(|p| source_position(p));
        for policy in policies {
            let Some(id) = policy.annotation("id") else {
                let _ = writeln!(
                    problems,
                    "  policy number {} in the file: every policy needs an @id(\"...\") annotation",
                    source_position(policy) + 1
                );
                continue;
            };
            let id = id.to_string();
            if id.is_empty()
                || id.len() > MAX_ID_LEN
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
            {
                let _ = writeln!(
                    problems,
                    "  policy {id:?}: an @id is 1 to {MAX_ID_LEN} characters of [A-Za-z0-9-_.:/]"
                );
                continue;
            }
            if ids.contains(&id) {
                let _ = writeln!(problems, "  policy {id:?}: duplicate @id");
                continue;
            }
            let grant = check_annotations(policy, &id, &mut problems);
            let pid = PolicyId::new(&id);
            if let Err(e) = set.add(policy.new_id(pid.clone())) {
                let _ = writeln!(problems, "  policy {id:?}: {e}");
                continue;
            }
            grants.insert(pid, grant);
            ids.push(id);
        }
        let validation = Validator::new(schema().clone()).validate(&set, ValidationMode::Strict);
        for e in validation.validation_errors() {
            describe_diagnostic(text, e, &mut problems);
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid(problems));
        }
        let slices = build_slices(&set);
        Ok(PolicyBook {
            version,
            set,
            grants,
            ids,
            authorizer: Authorizer::new(),
            slices,
        })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The `@id`s of the set, in source order.
    pub fn policy_ids(&self) -> &[String] {
        &self.ids
    }

    /// Decides a workload-facing request on `role`.
    pub fn decide(
        &self,
        principal: &Principal,
        action: Action,
        role: &Role,
        ctx: &WorkloadContext<'_>,
    ) -> Decision {
        let context = workload_context(ctx);
        let resource = role_entity(role);
        self.evaluate(
            principal,
            action.name(),
            Some(&role.name),
            resource,
            &context,
        )
    }

    /// Decides an administrative request.
    pub fn decide_admin(
        &self,
        principal: &Principal,
        action: AdminAction,
        source_ip: Option<IpAddr>,
        now_ms: u64,
    ) -> Decision {
        let context = [("source_ip", ip(source_ip)), ("time", time(now_ms))];
        let resource = Entity::with_uid(uid("Cluster", "cluster"));
        self.evaluate(principal, action.name(), None, resource, &context)
    }

    fn evaluate(
        &self,
        principal: &Principal,
        action: &'static str,
        role: Option<&String>,
        resource: Entity,
        context: &[(&'static str, RestrictedExpression)],
    ) -> Decision {
        let deny = |why: String| Decision {
            allowed: false,
            version: self.version,
            determining: Vec::new(),
            grant: Grant::default(),
            errors: vec![why],
        };
        // Built-in principals (the system, the break-glass credential) have no type in the
        // schema; policy never decides for them.
        let Some(principal_entity) = principal_entity(principal) else {
            return deny(format!("{} is not subject to policy", principal.id));
        };
        let (principal_uid, resource_uid) = (principal_entity.uid(), resource.uid());
        let context = match Context::from_pairs(
            context
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<Vec<_>>(),
        ) {
            Ok(c) => c,
            Err(e) => return deny(format!("context: {e}")),
        };
        // The entities and the context are built by this crate to the schema's shape (a test
        // checks them against it), and every policy was validated against it: checking each
        // request against the schema again would only cost time.
        let action_uid = uid("Action", action);
        let request = match Request::new(
            principal_uid,
            action_uid.clone(),
            resource_uid,
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return deny(format!("request: {e}")),
        };
        let mut entities = vec![principal_entity, resource];
        if is_admin_action(action) {
            let group = uid("Action", ADMIN_GROUP);
            entities.push(Entity::new_no_attrs(action_uid, [group.clone()].into()));
            entities.push(Entity::new_no_attrs(group, Default::default()));
        }
        let entities = match Entities::from_entities(entities, None) {
            Ok(e) => e,
            Err(e) => return deny(format!("entities: {e}")),
        };
        let slice = self
            .slices
            .get(&(action, role.cloned()))
            .or_else(|| self.slices.get(&(action, None)))
            .unwrap_or(&self.set);
        let response = self.authorizer.is_authorized(&request, slice, &entities);
        let determining: Vec<&PolicyId> = {
            let mut ids: Vec<&PolicyId> = response.diagnostics().reason().collect();
            ids.sort_by_key(|id| id.to_string());
            ids
        };
        let errors = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        let allowed = response.decision() == CedarDecision::Allow;
        let grant = if allowed {
            union_of_grants(determining.iter().map(|id| self.grants.get(*id)))
        } else {
            Grant::default()
        };
        Decision {
            allowed,
            version: self.version,
            determining: determining.iter().map(|id| id.to_string()).collect(),
            grant,
            errors,
        }
    }
}

/// Each matching permit is a grant; the request gets the widest of them. One permit without a
/// bound leaves that dimension unbounded by policy.
fn union_of_grants<'a>(grants: impl Iterator<Item = Option<&'a Grant>>) -> Grant {
    let mut scopes: Option<BTreeSet<String>> = Some(BTreeSet::new());
    let mut max_ttl_s: Option<u64> = Some(0);
    for g in grants {
        let g = g.cloned().unwrap_or_default();
        scopes = match (scopes, g.scopes) {
            (Some(mut acc), Some(s)) => {
                acc.extend(s);
                Some(acc)
            }
            _ => None,
        };
        max_ttl_s = match (max_ttl_s, g.max_ttl_s) {
            (Some(acc), Some(t)) => Some(acc.max(t)),
            _ => None,
        };
    }
    Grant { scopes, max_ttl_s }
}

/// The `WorkloadContext` record of the schema.
fn workload_context(ctx: &WorkloadContext<'_>) -> [(&'static str, RestrictedExpression); 12] {
    [
        ("ttl_s", long(ctx.ttl_s)),
        ("scopes", string_set(ctx.scopes)),
        ("principals", string_set(ctx.principals)),
        ("audience", string(ctx.audience)),
        ("source_ip", ip(ctx.source_ip)),
        ("environment", string(ctx.environment)),
        ("job_id", string(ctx.job_id)),
        ("time", time(ctx.now_ms)),
        ("subject", string(ctx.subject)),
        ("delegation_depth", long(u64::from(ctx.delegation_depth))),
        ("actors", string_set(ctx.actors)),
        (
            "lease_owner",
            RestrictedExpression::new_bool(ctx.lease_owner),
        ),
    ]
}

fn uid(kind: &'static str, id: &str) -> EntityUid {
    // Parsing a type name runs Cedar's grammar; on the request path that was a measurable
    // share of each decision, so each name is parsed once per thread.
    thread_local! {
        static TYPE_NAMES: std::cell::RefCell<HashMap<&'static str, cedar_policy::EntityTypeName>> =
            std::cell::RefCell::new(HashMap::new());
    }
    let type_name = TYPE_NAMES.with(|names| {
        names
            .borrow_mut()
            .entry(kind)
            .or_insert_with(|| {
                cedar_policy::EntityTypeName::from_str(&format!("Ephemera::{kind}"))
                    .expect("entity type names are static")
            })
            .clone()
    });
    EntityUid::from_type_name_and_id(type_name, cedar_policy::EntityId::new(id))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

fn long(n: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX))
}

fn ip(addr: Option<IpAddr>) -> RestrictedExpression {
    // An unknown address is the unspecified one, which no operator's range should contain.
    let addr = addr.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    // `new_ip` parses the extension's name on every call; callers come from few addresses.
    thread_local! {
        static ADDRESSES: std::cell::RefCell<HashMap<IpAddr, RestrictedExpression>> =
            std::cell::RefCell::new(HashMap::new());
    }
    ADDRESSES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(e) = cache.get(&addr) {
            return e.clone();
        }
        if cache.len() >= 4096 {
            cache.clear();
        }
        let e = RestrictedExpression::new_ip(addr.to_string());
        cache.insert(addr, e.clone());
        e
    })
}

/// The fields of `Ephemera::Time` from a Unix time in milliseconds (UTC, no leap seconds).
pub fn time_fields(now_ms: u64) -> (u64, u64, u64, u64) {
    let unix_s = now_ms / 1000;
    let days = unix_s / 86_400;
    let secs_of_day = unix_s % 86_400;
    // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
    let weekday = (days + 3) % 7;
    (unix_s, secs_of_day / 3600, secs_of_day % 3600 / 60, weekday)
}

fn time(now_ms: u64) -> RestrictedExpression {
    let (unix_s, hour, minute, weekday) = time_fields(now_ms);
    RestrictedExpression::new_record([
        ("unix_s".to_string(), long(unix_s)),
        ("hour".to_string(), long(hour)),
        ("minute".to_string(), long(minute)),
        ("weekday".to_string(), long(weekday)),
    ])
    .expect("record keys are unique")
}

fn principal_entity(p: &Principal) -> Option<Entity> {
    let kind = match p.auth_method {
        AuthMethod::BootstrapAdmin | AuthMethod::System => return None,
        _ if p.is_admin() => "Admin",
        AuthMethod::X509Svid | AuthMethod::JwtAssertion | AuthMethod::JoinToken => "Workload",
    };
    let attrs = [
        ("id".to_string(), string(&p.id)),
        ("auth_method".to_string(), string(p.auth_method.as_str())),
        (
            "issuer".to_string(),
            string(p.issuer.as_deref().unwrap_or("")),
        ),
    ];
    let tags: BTreeMap<String, RestrictedExpression> = if kind == "Workload" {
        p.attributes
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect()
    } else {
        BTreeMap::new()
    };
    Some(
        Entity::new_with_tags(uid(kind, &p.id), attrs, [], tags)
            .expect("string attributes always evaluate"),
    )
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

fn role_entity(role: &Role) -> Entity {
    // What the role's kind exposes; empty where a kind has nothing of the sort.
    let view = role.spec.cedar();
    let attrs = [
        ("kind".to_string(), string(role.kind().as_str())),
        ("audience".to_string(), string(view.audience)),
        ("scopes".to_string(), string_set(view.scopes)),
        ("principals".to_string(), string_set(view.principals)),
        ("default_ttl_s".to_string(), long(role.default_ttl_s)),
        ("max_ttl_s".to_string(), long(role.max_ttl_s)),
        (
            "environment".to_string(),
            string(role.environment.as_deref().unwrap_or("")),
        ),
        (
            "target".to_string(),
            string(role.target.as_deref().unwrap_or("")),
        ),
    ];
    Entity::new_with_tags(uid("Role", &role.name), attrs, [], [])
        .expect("role attributes always evaluate")
}

/// How two policy sets differ, policy by policy (by `@id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Compares two valid policy sets by `@id` and by each policy's normalised text.
pub fn diff(old: &PolicyBook, new: &PolicyBook) -> PolicyDiff {
    let text = |b: &PolicyBook, id: &str| {
        b.set
            .policy(&PolicyId::new(id))
            .map(|p| p.to_string())
            .unwrap_or_default()
    };
    let mut d = PolicyDiff::default();
    for id in &new.ids {
        if !old.ids.contains(id) {
            d.added.push(id.clone());
        } else if text(old, id) != text(new, id) {
            d.changed.push(id.clone());
        }
    }
    for id in &old.ids {
        if !new.ids.contains(id) {
            d.removed.push(id.clone());
        }
    }
    d
}

impl PolicyBook {
    /// One policy's normalised source, for `policy diff`.
    pub fn policy_text(&self, id: &str) -> Option<String> {
        self.set.policy(&PolicyId::new(id)).map(|p| p.to_string())
    }
}

#[cfg(test)]
mod tests;
