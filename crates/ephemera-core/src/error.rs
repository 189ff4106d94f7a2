//! Errors of the domain logic. Every error says precisely what was wrong and never carries
//! secret material; the node maps [`ErrorCode`] to gRPC status codes and HTTP statuses in one place.

use serde::{Deserialize, Serialize};

/// Coarse class of an error, used by the transport layers to choose a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    Unavailable,
    /// The request may or may not have taken effect (the reply was lost or came too late).
    OutcomeUnknown,
    /// A rate limit, a budget or storm mitigation refused the request; retry later.
    ResourceExhausted,
    Internal,
    /// The method or route does not exist (or has no row in the method table).
    Unimplemented,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    #[error("audience {requested:?} is not allowed by role {role:?} (allowed: {allowed:?})")]
    AudienceNotAllowed {
        requested: String,
        role: String,
        allowed: String,
    },
    #[error("requested TTL {requested_s}s exceeds the maximum TTL {max_s}s of role {role:?}")]
    TtlAboveCap {
        requested_s: u64,
        max_s: u64,
        role: String,
    },
    #[error("lease {0:?} not found")]
    LeaseNotFound(String),
    #[error("lease {0:?} has been revoked and cannot be renewed")]
    LeaseRevoked(String),
    #[error("lease {0:?} has expired and cannot be renewed; issue a new credential")]
    LeaseExpired(String),
    #[error("lease {0:?} has reached its maximum lifetime and cannot be extended; issue a new credential")]
    LeaseAtMaxLifetime(String),
    #[error("request id {0:?} was already used for a different request")]
    RequestIdConflict(String),
    #[error("signing key {0:?} not found")]
    KeyNotFound(String),
    #[error("no active signing key; the leader creates one shortly, retry")]
    NoActiveSigningKey,
    #[error("the cluster is already initialised")]
    AlreadyInitialized,
    #[error("the cluster is not initialised; run `ephemera cluster init`")]
    NotInitialized,
    #[error("authentication required: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request certainly did not take effect; retrying is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("outcome unknown: {0}; check, or retry with the same request id")]
    OutcomeUnknown(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("denied by policy: {0}")]
    PolicyDenied(String),
    #[error("the policy changed from version {decided} to {active} while the request was in flight; retry")]
    PolicyChanged { decided: u64, active: u64 },
    #[error("none of the requested scopes ({requested}) is granted for role {role:?}")]
    NoScopeGranted { requested: String, role: String },
    #[error("policy proposal {0:?} not found")]
    ProposalNotFound(String),
    #[error("policy proposal {id:?} is {state}, not pending")]
    ProposalNotPending { id: String, state: String },
    #[error("policy proposal {0:?} has expired; propose it again")]
    ProposalExpired(String),
    #[error("{approver} proposed {id:?} and cannot approve it; another administrator must")]
    SelfApproval { id: String, approver: String },
    #[error("the break-glass credential cannot approve {0:?}: approvals count toward separation of duties and must come from administrators' own identities")]
    BreakGlassApproval(String),
    #[error(
        "{approver} has already approved {id:?}; it needs approvals from distinct administrators"
    )]
    AlreadyApproved { id: String, approver: String },
    #[error("policy proposal {id:?} replaces version {base}, but version {active} is now active; propose it again against the current policy")]
    ProposalStale { id: String, base: u64, active: u64 },
    #[error("rate limit: {limit}; retry in {retry_after_ms} ms")]
    RateLimited { limit: String, retry_after_ms: u64 },
    #[error("lease budget: {holder} already holds {live} live leases of role {role:?}, the maximum; renew or revoke one instead of issuing another")]
    BudgetExceeded {
        holder: String,
        role: String,
        live: u64,
    },
    #[error("renewal deferred during a renewal storm: this lease is not due until its renew_after; retry in {retry_after_ms} ms")]
    RenewalDeferred { retry_after_ms: u64 },
    #[error(
        "{0} is quarantined; an administrator must release it (`ephemera quarantine release`)"
    )]
    Quarantined(String),
    #[error("this node's clock is {offset_ms} ms off the leader's (bound {bound_ms} ms); it does not issue until that is fixed")]
    ClockSkew { offset_ms: i64, bound_ms: u64 },
    #[error("role {role:?} issues {role_kind} credentials, but the request is for {requested}")]
    KindMismatch {
        role: String,
        role_kind: String,
        requested: String,
    },
    #[error("lease {lease:?} cannot be renewed: {how}")]
    NotRenewable { lease: String, how: String },
    #[error("{0} has no row in the method table; refused")]
    UnknownMethod(String),
    #[error("no external effect {seq}")]
    EffectNotFound { seq: u64 },
    /// An outcome for an attempt the effect does not await (a duplicate, or a deposed
    /// leader's late report): it settles nothing.
    #[error("external effect {seq} is {state}; an outcome for attempt {attempt} settles nothing")]
    EffectNotAwaiting {
        seq: u64,
        state: String,
        attempt: u32,
    },
    #[error("unknown database connection {0:?}")]
    UnknownConnection(String),
    /// A connection still has logins (live, or still being dropped) on its database.
    #[error(
        "database connection {name:?} still has {leases} lease(s) whose logins exist or are \
         being dropped; revoke them and wait, or delete with --force (abandons them)"
    )]
    ConnectionInUse { name: String, leases: u64 },
    #[error("lease {0} has no external effect left to abandon")]
    NothingToAbandon(String),
    /// A root rotation step that does not fit the connection's rotation state.
    #[error("root rotation of {name:?}: {why}")]
    RootRotation { name: String, why: String },
    /// RFC 8693 `invalid_grant`: the subject token cannot be exchanged (its lease is revoked,
    /// expired, unknown, or not an access token).
    #[error("the subject token cannot be exchanged: {0}")]
    SubjectTokenRefused(String),
    /// RFC 8693 `invalid_scope`: an exchange may only narrow.
    #[error("scope {scope:?} is not among the subject token's scopes")]
    ScopeNotInSubjectToken { scope: String },
    #[error("the delegation chain would be {depth} exchanges deep; at most {max} are allowed")]
    DelegationTooDeep { depth: u32, max: u32 },
    #[error("{what} {value:?} is not allowed by role {role:?} (allowed: {allowed})")]
    NotAllowedByRole {
        /// `principal`, `extension`, `critical option`, `host name`.
        what: String,
        value: String,
        role: String,
        allowed: String,
    },
}

impl Error {
    /// When the caller may retry, for a `retry-after` hint.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Error::RateLimited { retry_after_ms, .. }
            | Error::RenewalDeferred { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        use Error::*;
        match self {
            InvalidArgument(_)
            | AudienceNotAllowed { .. }
            | TtlAboveCap { .. }
            | KindMismatch { .. } => ErrorCode::InvalidArgument,
            NotRenewable { .. } => ErrorCode::FailedPrecondition,
            UnknownMethod(_) => ErrorCode::Unimplemented,
            NotAllowedByRole { .. } => ErrorCode::PermissionDenied,
            UnknownRole(_) | LeaseNotFound(_) | KeyNotFound(_) => ErrorCode::NotFound,
            AlreadyInitialized | RequestIdConflict(_) => ErrorCode::AlreadyExists,
            LeaseRevoked(_)
            | LeaseExpired(_)
            | LeaseAtMaxLifetime(_)
            | NoActiveSigningKey
            | NotInitialized => ErrorCode::FailedPrecondition,
            Unauthenticated(_) => ErrorCode::Unauthenticated,
            PermissionDenied(_) => ErrorCode::PermissionDenied,
            Unavailable(_) => ErrorCode::Unavailable,
            OutcomeUnknown(_) => ErrorCode::OutcomeUnknown,
            Internal(_) => ErrorCode::Internal,
            PolicyDenied(_)
            | NoScopeGranted { .. }
            | SelfApproval { .. }
            | BreakGlassApproval(_) => ErrorCode::PermissionDenied,
            ProposalNotFound(_) | EffectNotFound { .. } => ErrorCode::NotFound,
            EffectNotAwaiting { .. } => ErrorCode::FailedPrecondition,
            UnknownConnection(_) => ErrorCode::NotFound,
            ConnectionInUse { .. } | NothingToAbandon(_) | RootRotation { .. } => {
                ErrorCode::FailedPrecondition
            }
            SubjectTokenRefused(_) => ErrorCode::PermissionDenied,
            ScopeNotInSubjectToken { .. } => ErrorCode::InvalidArgument,
            DelegationTooDeep { .. } => ErrorCode::PermissionDenied,
            RateLimited { .. } | BudgetExceeded { .. } | RenewalDeferred { .. } => {
                ErrorCode::ResourceExhausted
            }
            Quarantined(_) => ErrorCode::PermissionDenied,
            ClockSkew { .. } => ErrorCode::Unavailable,
            AlreadyApproved { .. } => ErrorCode::AlreadyExists,
            PolicyChanged { .. }
            | ProposalNotPending { .. }
            | ProposalExpired(_)
            | ProposalStale { .. } => ErrorCode::FailedPrecondition,
        }
    }

    /// Short machine-readable name, used in audit records and metrics.
    pub fn kind(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidArgument(_) => "invalid_argument",
            UnknownRole(_) => "unknown_role",
            AudienceNotAllowed { .. } => "audience_not_allowed",
            TtlAboveCap { .. } => "ttl_above_cap",
            LeaseNotFound(_) => "lease_not_found",
            LeaseRevoked(_) => "lease_revoked",
            LeaseExpired(_) => "lease_expired",
            LeaseAtMaxLifetime(_) => "lease_at_max_lifetime",
            RequestIdConflict(_) => "request_id_conflict",
            KeyNotFound(_) => "key_not_found",
            NoActiveSigningKey => "no_active_signing_key",
            AlreadyInitialized => "already_initialized",
            NotInitialized => "not_initialized",
            Unauthenticated(_) => "unauthenticated",
            PermissionDenied(_) => "permission_denied",
            Unavailable(_) => "unavailable",
            OutcomeUnknown(_) => "outcome_unknown",
            Internal(_) => "internal",
            PolicyDenied(_) => "policy_denied",
            PolicyChanged { .. } => "policy_changed",
            NoScopeGranted { .. } => "no_scope_granted",
            ProposalNotFound(_) => "proposal_not_found",
            ProposalNotPending { .. } => "proposal_not_pending",
            ProposalExpired(_) => "proposal_expired",
            SelfApproval { .. } => "self_approval",
            BreakGlassApproval(_) => "break_glass_approval",
            AlreadyApproved { .. } => "already_approved",
            ProposalStale { .. } => "proposal_stale",
            RateLimited { .. } => "rate_limited",
            BudgetExceeded { .. } => "budget_exceeded",
            RenewalDeferred { .. } => "renewal_deferred",
            Quarantined(_) => "quarantined",
            ClockSkew { .. } => "clock_skew",
            KindMismatch { .. } => "kind_mismatch",
            NotRenewable { .. } => "not_renewable",
            UnknownMethod(_) => "unknown_method",
            EffectNotFound { .. } => "effect_not_found",
            EffectNotAwaiting { .. } => "effect_not_awaiting",
            UnknownConnection(_) => "unknown_connection",
            ConnectionInUse { .. } => "connection_in_use",
            NothingToAbandon(_) => "nothing_to_abandon",
            RootRotation { .. } => "root_rotation",
            NotAllowedByRole { .. } => "not_allowed_by_role",
            SubjectTokenRefused(_) => "subject_token_refused",
            ScopeNotInSubjectToken { .. } => "scope_not_in_subject_token",
            DelegationTooDeep { .. } => "delegation_too_deep",
        }
    }
}

impl Error {
    /// The error as the audit chain records it: its kind and its structured fields (names,
    /// ids, numbers), never its prose. A reworded message in a newer release must not change
    /// the hash of a record that an older node computes for the same entry (a rolling upgrade
    /// would fork the audit head). Errors whose only content is prose record their kind alone;
    /// the caller received the full message.
    pub fn audit_fields(&self) -> std::collections::BTreeMap<String, String> {
        use Error::*;
        let pairs: Vec<(&str, String)> = match self {
            UnknownRole(r) => vec![("role", r.clone())],
            AudienceNotAllowed {
                requested,
                role,
                allowed,
            } => vec![
                ("requested", requested.clone()),
                ("role", role.clone()),
                ("allowed", allowed.clone()),
            ],
            TtlAboveCap {
                requested_s,
                max_s,
                role,
            } => vec![
                ("requested_s", requested_s.to_string()),
                ("max_s", max_s.to_string()),
                ("role", role.clone()),
            ],
            LeaseNotFound(l) | LeaseRevoked(l) | LeaseExpired(l) | LeaseAtMaxLifetime(l) => {
                vec![("lease", l.clone())]
            }
            NotRenewable { lease, .. } => vec![("lease", lease.clone())],
            RequestIdConflict(r) => vec![("request_id", r.clone())],
            KeyNotFound(k) => vec![("kid", k.clone())],
            PolicyChanged { decided, active } => vec![
                ("decided", decided.to_string()),
                ("active", active.to_string()),
            ],
            NoScopeGranted { requested, role } => {
                vec![("requested", requested.clone()), ("role", role.clone())]
            }
            ProposalNotFound(id) | ProposalExpired(id) | BreakGlassApproval(id) => {
                vec![("proposal", id.clone())]
            }
            ProposalNotPending { id, state } => {
                vec![("proposal", id.clone()), ("state", state.clone())]
            }
            SelfApproval { id, approver } | AlreadyApproved { id, approver } => {
                vec![("proposal", id.clone()), ("approver", approver.clone())]
            }
            ProposalStale { id, base, active } => vec![
                ("proposal", id.clone()),
                ("base", base.to_string()),
                ("active", active.to_string()),
            ],
            RateLimited { retry_after_ms, .. } | RenewalDeferred { retry_after_ms } => {
                vec![("retry_after_ms", retry_after_ms.to_string())]
            }
            BudgetExceeded { holder, role, live } => vec![
                ("holder", holder.clone()),
                ("role", role.clone()),
                ("live", live.to_string()),
            ],
            Quarantined(id) => vec![("identity", id.clone())],
            UnknownConnection(name) => vec![("connection", name.clone())],
            ConnectionInUse { name, leases } => {
                vec![("connection", name.clone()), ("leases", leases.to_string())]
            }
            NothingToAbandon(l) => vec![("lease", l.clone())],
            RootRotation { name, why } => {
                vec![("connection", name.clone()), ("why", why.clone())]
            }
            EffectNotFound { seq } => vec![("effect", seq.to_string())],
            EffectNotAwaiting {
                seq,
                state,
                attempt,
            } => vec![
                ("effect", seq.to_string()),
                ("state", state.clone()),
                ("attempt", attempt.to_string()),
            ],
            ClockSkew {
                offset_ms,
                bound_ms,
            } => vec![
                ("offset_ms", offset_ms.to_string()),
                ("bound_ms", bound_ms.to_string()),
            ],
            KindMismatch {
                role,
                role_kind,
                requested,
            } => vec![
                ("role", role.clone()),
                ("role_kind", role_kind.clone()),
                ("requested", requested.clone()),
            ],
            NotAllowedByRole {
                what,
                value,
                role,
                allowed,
            } => vec![
                ("what", what.clone()),
                ("value", value.clone()),
                ("role", role.clone()),
                ("allowed", allowed.clone()),
            ],
            UnknownMethod(m) => vec![("method", m.clone())],
            ScopeNotInSubjectToken { scope } => vec![("scope", scope.clone())],
            DelegationTooDeep { depth, max } => {
                vec![("depth", depth.to_string()), ("max", max.to_string())]
            }
            SubjectTokenRefused(_) => vec![],
            InvalidArgument(_) | Unauthenticated(_) | PermissionDenied(_) | Unavailable(_)
            | OutcomeUnknown(_) | Internal(_) | PolicyDenied(_) | NoActiveSigningKey
            | AlreadyInitialized | NotInitialized => vec![],
        };
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// Failure of the storage underneath [`crate::kv::KvRead`]. Fatal to the Raft core.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage error: {0}")]
pub struct StorageError(pub String);
