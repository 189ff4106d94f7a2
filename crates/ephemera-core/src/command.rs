//! Commands. A client's [`Proposal`] carries no time, ids or key material; the leader stamps it
//! into a [`Command`] before proposing, so that `apply` is a pure function of the log.

use serde::{Deserialize, Serialize};

use crate::crypto::{kid_for, seal_private_key, Kek, NONCE_LEN};
use crate::error::Error;
use crate::kind::{KindRequest, KindStamp};
use crate::policy::{PolicyGovernance, PolicyStamp, MAX_COMMENT_LEN, MAX_POLICY_TEXT_LEN};
use crate::types::{Lease, Principal, Role};

/// Injected randomness (the leader's RNG in production, a seeded one in tests).
pub trait Entropy {
    fn fill(&mut self, buf: &mut [u8]);
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueIntent {
    /// Client-chosen idempotency key: a retried Issue with the same id returns the same lease.
    pub request_id: Option<String>,
    pub role: String,
    /// Identity the credential is bound to; only an admin may name one other than itself.
    pub subject: Option<String>,
    pub ttl_s: Option<u64>,
    pub purpose: Option<String>,
    /// What the caller asks of the role's kind (scopes, a public key, principals...).
    pub request: KindRequest,
    /// The one-time join token the caller authenticated with (its hash); `apply` consumes it,
    /// so of two concurrent redemptions exactly one wins.
    pub join_token_hash: Option<Vec<u8>>,
    /// A lease of the same subject and role this one replaces (a rotated certificate); it is
    /// revoked in the same entry.
    pub supersedes: Option<String>,
    pub context: RequestContext,
    /// The receiving node's policy decision; `apply` refuses an Issue without one.
    pub policy: Option<PolicyStamp>,
}

/// An RFC 8693 token exchange: an access token derived from a subject token (see
/// `state::delegation`). The receiving node has verified the subject token and the actor
/// token, and decided the policy (`exchange`); `apply` checks again, at commit, what can change
/// in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeIntent {
    /// The new token, as an Issue of a JWT role; its subject is the subject token's.
    pub issue: IssueIntent,
    /// What the subject token was.
    pub subject: ExchangeSubject,
    /// This hop's actor (`act.sub`), the actor token's subject, when one was presented.
    pub actor: Option<String>,
    /// The deepest chain the receiving node allows (its configuration); `apply` also holds
    /// `state::MAX_DELEGATION_DEPTH`.
    pub max_depth: u32,
}

/// The subject token of an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeSubject {
    /// An access token this cluster issued: its lease (the token's `jti`) becomes the new
    /// token's parent, and `apply` reads its subject, scopes and expiry from the state.
    Lease(String),
    /// An assertion of a configured OIDC issuer (an `id_token` or another JWT), verified by the
    /// receiving node, which stamps what it proved: it lives outside the cluster, so nothing
    /// can revoke it here, and the new token has no parent.
    Assertion(SubjectAssertion),
}

/// What the receiving node verified of an OIDC subject token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectAssertion {
    /// The principal it names, `{issuer}#{sub}` as for assertion callers.
    pub subject: String,
    /// Its `exp`: the new token expires no later.
    pub expires_at_ms: u64,
    /// Its `scope` claim, when it has one: the new token's scopes are a subset. An identity
    /// assertion without one bounds nothing beyond the role and the policy.
    pub scopes: Option<Vec<String>>,
    /// Its issuer, and its `jti` when that issuer refuses replays: consumed in the entry that
    /// issues the new token, so a replayed assertion is refused on every node, and a refused
    /// exchange does not use it up.
    pub issuer: String,
    pub jti: Option<String>,
    /// How long the `jti` stays consumed (the assertion's expiry plus the issuer's leeway).
    pub replay_until_ms: u64,
}

/// The runtime context a request was decided in, kept in its audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The caller's address as the receiving node saw it.
    pub source_ip: Option<String>,
    /// Declared by the caller.
    pub environment: Option<String>,
    pub job_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewIntent {
    pub lease_id: String,
    pub increment_s: Option<u64>,
    pub context: RequestContext,
    pub policy: Option<PolicyStamp>,
}

/// A request refused by the node that received it, without a Raft write of its own, for a
/// reason that changes nothing (a renewal of a revoked lease, say): recorded under the node's
/// refusal sampling, so that a loop of such requests cannot grow the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub action: RefusedAction,
    pub lease_id: Option<String>,
    pub error: Error,
    /// Refusals on that node that went unrecorded (rate limit) since its previous record.
    pub unrecorded: u64,
    pub context: RequestContext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusedAction {
    Renew,
}

impl RefusedAction {
    /// The audit action of the refused request.
    pub fn audit_action(self) -> &'static str {
        match self {
            RefusedAction::Renew => "lease.renew",
        }
    }
}

/// What a leader's guardrail detector saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardEvent {
    /// `storm_started`, `storm_ended`, or an anomaly kind (`rate_spike`, ...).
    pub kind: String,
    pub identity: Option<String>,
    pub detail: String,
    /// Stop the identity: no issuance or renewal until an administrator releases it.
    pub quarantine: bool,
    /// With `quarantine`, also revoke every live lease of the identity.
    pub revoke_leases: bool,
}

/// A request policy refused, for the audit chain. When the refused request is a renewal and
/// the lease's role says so, `apply` also revokes the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDenial {
    pub action: String,
    pub role: Option<String>,
    pub lease_id: Option<String>,
    pub version: u64,
    /// The forbids that matched; empty when nothing permitted.
    pub determining: Vec<String>,
    pub reason: String,
    pub context: RequestContext,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeTarget {
    Lease(String),
    Subject(String),
    Role(String),
    /// Key compromise: the key leaves the JWKS and every lease it signed is revoked.
    Key(String),
    /// Every login on a database connection (new variants go last: the log holds them by
    /// position).
    Connection(String),
}

impl RevokeTarget {
    pub fn describe(&self) -> String {
        match self {
            RevokeTarget::Lease(id) => format!("lease:{id}"),
            RevokeTarget::Subject(s) => format!("subject:{s}"),
            RevokeTarget::Role(r) => format!("role:{r}"),
            RevokeTarget::Key(k) => format!("key:{k}"),
            RevokeTarget::Connection(c) => format!("db:{c}"),
        }
    }
}

/// What a caller asks for, before the leader stamps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    Bootstrap {
        admin_credential_hash: Vec<u8>,
        issuer: String,
        /// Policy version 1 (validated by the node that received `cluster init`).
        policy_text: String,
        governance: PolicyGovernance,
    },
    PutRole(Role),
    DeleteRole {
        name: String,
    },
    Issue(IssueIntent),
    Renew(RenewIntent),
    Revoke(RevokeTarget),
    /// Propose a new policy set (validated by the receiving node); it takes effect after
    /// approval by other administrators.
    ProposePolicy {
        text: String,
        comment: Option<String>,
    },
    ApprovePolicy {
        proposal_id: String,
    },
    RejectPolicy {
        proposal_id: String,
        reason: String,
    },
    PolicyDenied(PolicyDenial),
    /// A guardrail event from the leader's detectors (a storm, an anomaly), optionally
    /// quarantining the identity.
    GuardEvent(GuardEvent),
    ReleaseQuarantine {
        identity: String,
    },
    /// Audit a refusal decided before proposing (see [`Refusal`]).
    RecordRefusal(Refusal),
    /// Make a fresh audit key active (it signs audit checkpoints); the leader generates it.
    RotateAuditKey,
    /// Replace the break-glass credential's hash; an empty hash disables break-glass.
    SetBreakGlass {
        credential_hash: Vec<u8>,
    },
    /// Make a fresh signing key active; the leader generates it.
    RotateKey,
    /// Make a fresh SSH CA key active; the leader generates it. The previous one stays
    /// published until the last certificate it signed has expired.
    RotateSshCa,
    /// Make an imported SSH CA key active (sealed under the KEK by the node that received it).
    ImportSshCa {
        kid: String,
        public_key: [u8; 32],
        sealed_private_key: Vec<u8>,
    },
    /// Audit an access that changes no state (break-glass reads).
    RecordAccess {
        action: String,
        target: String,
    },
    /// Audit a refused authentication: what was presented and why it was refused.
    RecordDenial {
        presented: String,
        reason: String,
    },
    /// Install the cluster CA (its key sealed under the KEK by the node that received it).
    SetClusterCa {
        trust_domain: String,
        cert_pem: String,
        sealed_seed: Vec<u8>,
    },
    /// Create a one-time join token for a SPIFFE ID; only its hash is ever stored.
    CreateJoinToken {
        token_hash: Vec<u8>,
        spiffe_id: String,
        ttl_s: u64,
    },
    /// Record a JWT assertion's `jti` as used until `expires_at_ms` (replay refusal).
    ConsumeAssertion {
        issuer: String,
        jti: String,
        expires_at_ms: u64,
    },
    /// Create or replace a database connection (its password sealed by the receiving node).
    PutDbConnection(crate::state::DbConnection),
    DeleteDbConnection {
        name: String,
        /// Revoke the leases whose logins are on it and abandon their effects.
        force: bool,
    },
    /// Stop retrying a lease's external effects (an administrator cleaned up by hand).
    AbandonLease {
        lease_id: String,
        reason: String,
    },
    /// A root rotation's first step: the connection's new admin password, sealed, recorded as
    /// pending before the database is told (refused while another rotation is unfinished).
    StageRootPassword {
        name: String,
        sealed_password: Vec<u8>,
    },
    /// A root rotation's last step: the pending password (named by its sealed bytes, so a
    /// stale report changes nothing) becomes the connection's password, or is discarded when
    /// the database still takes the old one.
    SettleRootPassword {
        name: String,
        pending: Vec<u8>,
        promote: bool,
    },
    Exchange(ExchangeIntent),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub actor: Principal,
    pub intent: Intent,
}

/// A stamped operation, as it travels in the Raft log. One value per command, decoded and
/// applied once; boxing the issue variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Bootstrap {
        admin_credential_hash: Vec<u8>,
        issuer: String,
        policy_text: String,
        governance: PolicyGovernance,
    },
    PutRole(Role),
    DeleteRole {
        name: String,
    },
    Issue {
        intent: IssueIntent,
        lease_id: String,
        /// Where in the TTL `renew_after` falls, in thousandths (leader-chosen jitter).
        renew_after_permille: u16,
        /// The kind's randomness (an SSH certificate's nonce).
        kind_stamp: KindStamp,
    },
    Renew {
        intent: RenewIntent,
        renew_after_permille: u16,
    },
    Revoke(RevokeTarget),
    ProposePolicy {
        proposal_id: String,
        text: String,
        comment: Option<String>,
    },
    ApprovePolicy {
        proposal_id: String,
    },
    RejectPolicy {
        proposal_id: String,
        reason: String,
    },
    PolicyDenied(PolicyDenial),
    GuardEvent(GuardEvent),
    ReleaseQuarantine {
        identity: String,
    },
    AddSigningKey {
        kid: String,
        public_key: [u8; 32],
        sealed_private_key: Vec<u8>,
    },
    AddSshCaKey {
        kid: String,
        public_key: [u8; 32],
        sealed_private_key: Vec<u8>,
    },
    /// Marks active leases whose deadline is at or before `up_to_ms` expired, at most `limit`.
    Expire {
        up_to_ms: u64,
        limit: u32,
    },
    RecordAccess {
        action: String,
        target: String,
    },
    RecordDenial {
        presented: String,
        reason: String,
    },
    SetClusterCa {
        trust_domain: String,
        cert_pem: String,
        sealed_seed: Vec<u8>,
    },
    CreateJoinToken {
        token_hash: Vec<u8>,
        spiffe_id: String,
        ttl_s: u64,
    },
    ConsumeAssertion {
        issuer: String,
        jti: String,
        expires_at_ms: u64,
    },
    // New variants go last: the log holds variants by position.
    SetBreakGlass {
        credential_hash: Vec<u8>,
    },
    RecordRefusal(Refusal),
    /// Forget what retention allows (see `state::retention`); the leader proposes it.
    Compact {
        retention: Retention,
        limit: u32,
    },
    AddAuditKey {
        kid: String,
        public_key: [u8; 32],
        sealed_private_key: Vec<u8>,
    },
    /// The leader's signature of an applied audit head (see [`crate::audit::AuditCheckpoint`]).
    AuditCheckpoint {
        seq: u64,
        hash: String,
        kid: String,
        signature: Vec<u8>,
    },
    /// A member node's renewed certificate, which the leader signs with the cluster CA once
    /// this is committed (see `state::node_certs`). The leader proposes it for a node whose
    /// membership it checked, with the host names of the certificate that node presented.
    IssueNodeCertificate(crate::state::NodeCertificate),
    /// The leader's report of one attempt at an external effect (see `state::effects`):
    /// `error` is `None` on success; `retry_at_ms` is the stamped, jittered time of the next
    /// attempt after a failure.
    SettleEffect {
        seq: u64,
        attempt: u32,
        error: Option<String>,
        retry_at_ms: u64,
    },
    PutDbConnection(crate::state::DbConnection),
    DeleteDbConnection {
        name: String,
        force: bool,
    },
    AbandonLease {
        lease_id: String,
        reason: String,
    },
    StageRootPassword {
        name: String,
        sealed_password: Vec<u8>,
    },
    SettleRootPassword {
        name: String,
        pending: Vec<u8>,
        promote: bool,
    },
    /// A token exchange, stamped like an Issue.
    Exchange {
        intent: ExchangeIntent,
        lease_id: String,
        renew_after_permille: u16,
    },
    /// Commands the leader stamped one by one and wrote as one log entry (group commit; see
    /// the node's `group_commit`). `apply` applies them in order, each exactly as it would be
    /// applied alone (its own time, its own audit record, its own result), so a batch leaves
    /// the state that the same commands in consecutive entries would. The batch itself writes
    /// nothing of its own. Batches never nest.
    Batch(Vec<Command>),
}

/// The most commands one batch entry carries.
pub const MAX_BATCH: usize = 128;

/// How long the state keeps what is of no further use, in seconds after the time it stopped
/// being useful: a dead lease after its credential expired, an idempotency record after it was
/// written, a join token or a consumed assertion id after it expired, a policy proposal after
/// its expiry. `[retention]` in the node configuration; the leader's values travel in each
/// `Compact` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub dead_lease_s: u64,
    pub request_s: u64,
    pub join_token_s: u64,
    pub assertion_s: u64,
    pub proposal_s: u64,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Retention {
            dead_lease_s: 7 * DAY,
            request_s: 7 * DAY,
            join_token_s: 7 * DAY,
            assertion_s: DAY,
            proposal_s: 30 * DAY,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Leader-stamped time in Unix milliseconds. `apply` never goes backwards: it uses
    /// `max(now_ms, last applied time)`.
    pub now_ms: u64,
    pub actor: Principal,
    pub op: Op,
}

// One value per request, moved once; boxing the lease would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Role(Role),
    /// `replayed` is true when an idempotent retry returned an existing lease.
    Lease {
        lease: Lease,
        replayed: bool,
    },
    Revoked {
        count: u64,
    },
    Expired {
        count: u64,
    },
    KeyAdded {
        kid: String,
    },
    Proposal(crate::policy::PolicyProposal),
    Compacted {
        count: u64,
    },
    /// The results of a batch's commands, in its order.
    Batch(Vec<ApplyResult>),
}

/// The state machine's answer to one command, identical on every node.
pub type ApplyResult = Result<Outcome, Error>;

/// Range of the renewal point inside a credential's lifetime, in thousandths of the TTL.
pub const RENEW_AFTER_PERMILLE_MIN: u16 = 500;
pub const RENEW_AFTER_PERMILLE_MAX: u16 = 700;

fn random_permille(entropy: &mut dyn Entropy) -> u16 {
    let mut b = [0u8; 2];
    entropy.fill(&mut b);
    let span = RENEW_AFTER_PERMILLE_MAX - RENEW_AFTER_PERMILLE_MIN + 1;
    RENEW_AFTER_PERMILLE_MIN + u16::from_le_bytes(b) % span
}

/// A new lease id: 128 random bits.
pub fn new_lease_id(entropy: &mut dyn Entropy) -> String {
    let mut b = [0u8; 16];
    entropy.fill(&mut b);
    format!("l_{}", hex::encode(b))
}

/// A new policy proposal id: 64 random bits.
pub fn new_proposal_id(entropy: &mut dyn Entropy) -> String {
    let mut b = [0u8; 8];
    entropy.fill(&mut b);
    format!("pp_{}", hex::encode(b))
}

/// A fresh Ed25519 key, sealed under the KEK: `(kid, public key, sealed seed)`.
fn new_sealed_key(kek: &Kek, entropy: &mut dyn Entropy) -> (String, [u8; 32], Vec<u8>) {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    entropy.fill(&mut seed[..]);
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let public_key = signing.verifying_key().to_bytes();
    let kid = kid_for(&public_key);
    let mut nonce = [0u8; NONCE_LEN];
    entropy.fill(&mut nonce);
    let sealed_private_key = seal_private_key(kek, &kid, &seed, nonce);
    (kid, public_key, sealed_private_key)
}

/// Builds the operation that adds a freshly generated signing key, sealed under the KEK.
pub fn new_signing_key_op(kek: &Kek, entropy: &mut dyn Entropy) -> Op {
    let (kid, public_key, sealed_private_key) = new_sealed_key(kek, entropy);
    Op::AddSigningKey {
        kid,
        public_key,
        sealed_private_key,
    }
}

/// Stamps a proposal on the leader: time, ids, jitter and key material are chosen here.
/// Cuts `text` to at most `max` bytes at a character boundary, marking the cut.
pub fn truncate_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub(3);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str("...");
}

/// Fits the free text of a record-only intent (a refusal's reason, what was presented, a
/// detector's detail) within the log's limits: an audit record is truncated, never dropped.
pub fn fit_audit_text(intent: &mut Intent) {
    match intent {
        Intent::RecordDenial { presented, reason } => {
            truncate_text(presented, MAX_SUBJECT_LEN);
            truncate_text(reason, MAX_PURPOSE_LEN);
        }
        Intent::GuardEvent(e) => {
            truncate_text(&mut e.detail, MAX_PURPOSE_LEN);
            if let Some(id) = &mut e.identity {
                truncate_text(id, MAX_SUBJECT_LEN);
            }
        }
        Intent::PolicyDenied(d) => {
            truncate_text(&mut d.reason, MAX_PURPOSE_LEN);
            d.determining.truncate(MAX_SCOPES);
        }
        _ => {}
    }
}

pub fn stamp(proposal: Proposal, now_ms: u64, entropy: &mut dyn Entropy, kek: &Kek) -> Command {
    let op = match proposal.intent {
        Intent::Bootstrap {
            admin_credential_hash,
            issuer,
            policy_text,
            governance,
        } => Op::Bootstrap {
            admin_credential_hash,
            issuer,
            policy_text,
            governance,
        },
        Intent::PutRole(role) => Op::PutRole(role),
        Intent::DeleteRole { name } => Op::DeleteRole { name },
        Intent::Issue(intent) => Op::Issue {
            lease_id: new_lease_id(entropy),
            renew_after_permille: random_permille(entropy),
            kind_stamp: intent.request.stamp(entropy),
            intent,
        },
        Intent::Renew(intent) => Op::Renew {
            intent,
            renew_after_permille: random_permille(entropy),
        },
        Intent::Exchange(intent) => Op::Exchange {
            lease_id: new_lease_id(entropy),
            renew_after_permille: random_permille(entropy),
            intent,
        },
        Intent::Revoke(target) => Op::Revoke(target),
        Intent::ProposePolicy { text, comment } => Op::ProposePolicy {
            proposal_id: new_proposal_id(entropy),
            text,
            comment,
        },
        Intent::ApprovePolicy { proposal_id } => Op::ApprovePolicy { proposal_id },
        Intent::RejectPolicy {
            proposal_id,
            reason,
        } => Op::RejectPolicy {
            proposal_id,
            reason,
        },
        Intent::PolicyDenied(d) => Op::PolicyDenied(d),
        Intent::GuardEvent(e) => Op::GuardEvent(e),
        Intent::ReleaseQuarantine { identity } => Op::ReleaseQuarantine { identity },
        Intent::SetBreakGlass { credential_hash } => Op::SetBreakGlass { credential_hash },
        Intent::RecordRefusal(r) => Op::RecordRefusal(r),
        Intent::PutDbConnection(c) => Op::PutDbConnection(c),
        Intent::DeleteDbConnection { name, force } => Op::DeleteDbConnection { name, force },
        Intent::AbandonLease { lease_id, reason } => Op::AbandonLease { lease_id, reason },
        Intent::StageRootPassword {
            name,
            sealed_password,
        } => Op::StageRootPassword {
            name,
            sealed_password,
        },
        Intent::SettleRootPassword {
            name,
            pending,
            promote,
        } => Op::SettleRootPassword {
            name,
            pending,
            promote,
        },
        Intent::RotateAuditKey => {
            let (kid, public_key, sealed_private_key) = new_sealed_key(kek, entropy);
            Op::AddAuditKey {
                kid,
                public_key,
                sealed_private_key,
            }
        }
        Intent::RotateKey => new_signing_key_op(kek, entropy),
        Intent::ImportSshCa {
            kid,
            public_key,
            sealed_private_key,
        } => Op::AddSshCaKey {
            kid,
            public_key,
            sealed_private_key,
        },
        Intent::RotateSshCa => {
            let (kid, public_key, sealed_private_key) = new_sealed_key(kek, entropy);
            Op::AddSshCaKey {
                kid,
                public_key,
                sealed_private_key,
            }
        }
        Intent::RecordAccess { action, target } => Op::RecordAccess { action, target },
        Intent::RecordDenial { presented, reason } => Op::RecordDenial { presented, reason },
        Intent::SetClusterCa {
            trust_domain,
            cert_pem,
            sealed_seed,
        } => Op::SetClusterCa {
            trust_domain,
            cert_pem,
            sealed_seed,
        },
        Intent::CreateJoinToken {
            token_hash,
            spiffe_id,
            ttl_s,
        } => Op::CreateJoinToken {
            token_hash,
            spiffe_id,
            ttl_s,
        },
        Intent::ConsumeAssertion {
            issuer,
            jti,
            expires_at_ms,
        } => Op::ConsumeAssertion {
            issuer,
            jti,
            expires_at_ms,
        },
    };
    Command {
        now_ms,
        actor: proposal.actor,
        op,
    }
}

// ---- stateless validation, shared by the receiving node (before proposing) and `apply` ----

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_SUBJECT_LEN: usize = 512;
pub use crate::kind::jwt::{validate_scope, MAX_AUDIENCE_LEN, MAX_SCOPES, MAX_SCOPE_LEN};
pub const MAX_PURPOSE_LEN: usize = 512;
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Ten years: anything longer is certainly a mistake.
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

pub fn validate_name(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(format!(
            "{what} {s:?} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

use crate::kind::validate_text;

fn validate_ttl(what: &str, ttl_s: u64) -> Result<(), Error> {
    if ttl_s == 0 || ttl_s > MAX_TTL_S {
        return Err(invalid(format!(
            "{what} must be between 1s and {MAX_TTL_S}s"
        )));
    }
    Ok(())
}

/// A SPIFFE ID's shape (full verification lives with the certificate code).
pub fn validate_spiffe_id(id: &str) -> Result<(), Error> {
    let ok = id.len() <= 2048
        && id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(td, path)| !td.is_empty() && !path.is_empty())
        && !id.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{id:?} is not a SPIFFE ID (spiffe://trust-domain/path)"
        )))
    }
}

/// Node identities are minted only by the operator's CA tooling, never through the API: an
/// SVID for `/ephemera/node/<id>` would pass the cluster listener.
pub fn refuse_node_identity(id: &str) -> Result<(), Error> {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, p)| p);
    if path.is_some_and(|p| p == "ephemera" || p.starts_with("ephemera/")) {
        return Err(invalid(format!(
            "{id} is in the reserved /ephemera/ namespace of cluster nodes"
        )));
    }
    Ok(())
}

pub fn validate_lease_id(id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "lease id must be 1 to 64 characters of [A-Za-z0-9_-]".into(),
        ));
    }
    Ok(())
}

pub fn validate_role(role: &Role) -> Result<(), Error> {
    validate_name("role name", &role.name)?;
    role.spec.validate()?;
    let svid = role.kind() == crate::kind::CredentialKind::X509Svid;
    if (role.name == crate::types::SVID_ROLE) != svid {
        return Err(invalid(format!(
            "the role {:?} is the X.509-SVID role, and only it issues X.509-SVIDs",
            crate::types::SVID_ROLE
        )));
    }
    if svid && role.max_ttl_s > crate::types::SVID_MAX_TTL_S {
        return Err(invalid(format!(
            "an X.509-SVID lives at most {}s",
            crate::types::SVID_MAX_TTL_S
        )));
    }
    for (what, label) in [("environment", &role.environment), ("target", &role.target)] {
        if let Some(label) = label {
            validate_text(what, label, MAX_AUDIENCE_LEN, false)?;
        }
    }
    validate_ttl("default TTL", role.default_ttl_s)?;
    validate_ttl("max TTL", role.max_ttl_s)?;
    if role.default_ttl_s > role.max_ttl_s {
        return Err(invalid(format!(
            "default TTL {}s exceeds max TTL {}s",
            role.default_ttl_s, role.max_ttl_s
        )));
    }
    Ok(())
}

pub fn validate_intent(intent: &Intent) -> Result<(), Error> {
    match intent {
        Intent::Bootstrap {
            admin_credential_hash,
            issuer,
            policy_text,
            governance,
        } => {
            if admin_credential_hash.len() != 32 {
                return Err(invalid("admin credential hash must be 32 bytes".into()));
            }
            validate_policy_text(policy_text)?;
            validate_governance(governance)?;
            validate_text("issuer", issuer, MAX_AUDIENCE_LEN, false)
        }
        Intent::PutRole(role) => validate_role(role),
        Intent::DeleteRole { name } => validate_name("role name", name),
        Intent::Issue(i) => validate_issue(i),
        Intent::Exchange(x) => {
            validate_issue(&x.issue)?;
            match &x.subject {
                ExchangeSubject::Lease(id) => validate_lease_id(id)?,
                ExchangeSubject::Assertion(a) => {
                    validate_text("subject", &a.subject, MAX_SUBJECT_LEN, false)?;
                    validate_text("issuer", &a.issuer, MAX_SUBJECT_LEN, false)?;
                    if let Some(jti) = &a.jti {
                        validate_text("jti", jti, MAX_SUBJECT_LEN, false)?;
                    }
                    if let Some(scopes) = &a.scopes {
                        crate::kind::jwt::validate_scopes(scopes)?;
                    }
                }
            }
            if let Some(a) = &x.actor {
                validate_text("actor", a, MAX_SUBJECT_LEN, false)?;
            }
            if x.max_depth == 0 || x.max_depth > crate::state::MAX_DELEGATION_DEPTH {
                return Err(invalid(format!(
                    "the delegation depth limit must be 1 to {}",
                    crate::state::MAX_DELEGATION_DEPTH
                )));
            }
            Ok(())
        }
        Intent::Renew(r) => {
            validate_lease_id(&r.lease_id)?;
            if let Some(t) = r.increment_s {
                validate_ttl("increment", t)?;
            }
            validate_context(&r.context)
        }
        Intent::ProposePolicy { text, comment } => {
            validate_policy_text(text)?;
            if let Some(c) = comment {
                validate_text("comment", c, MAX_COMMENT_LEN, true)?;
            }
            Ok(())
        }
        Intent::ApprovePolicy { proposal_id } => validate_name("proposal id", proposal_id),
        Intent::RejectPolicy {
            proposal_id,
            reason,
        } => {
            validate_name("proposal id", proposal_id)?;
            validate_text("reason", reason, MAX_COMMENT_LEN, true)
        }
        Intent::GuardEvent(e) => {
            validate_name("guard event kind", &e.kind)?;
            if let Some(id) = &e.identity {
                validate_text("identity", id, MAX_SUBJECT_LEN, false)?;
            }
            if e.detail.len() > MAX_PURPOSE_LEN {
                return Err(invalid("guard event detail too long".into()));
            }
            Ok(())
        }
        Intent::ReleaseQuarantine { identity } => {
            validate_text("identity", identity, MAX_SUBJECT_LEN, false)
        }
        Intent::PolicyDenied(d) => {
            validate_text("action", &d.action, MAX_NAME_LEN, false)?;
            if d.reason.len() > MAX_PURPOSE_LEN || d.determining.len() > MAX_SCOPES {
                return Err(invalid("policy denial record too long".into()));
            }
            validate_context(&d.context)
        }
        Intent::Revoke(target) => match target {
            RevokeTarget::Lease(id) => validate_lease_id(id),
            RevokeTarget::Subject(s) => validate_text("subject", s, MAX_SUBJECT_LEN, false),
            RevokeTarget::Role(r) => validate_name("role name", r),
            RevokeTarget::Connection(c) => validate_name("connection name", c),
            RevokeTarget::Key(k) => validate_name("key id", k),
        },
        Intent::RotateKey | Intent::RotateSshCa | Intent::RotateAuditKey => Ok(()),
        Intent::RecordRefusal(r) => {
            if let Some(id) = &r.lease_id {
                validate_text("lease id", id, MAX_NAME_LEN, false)?;
            }
            // Only the refusals a node decides on its own, each with bounded fields.
            let bounded = |s: &str| s.len() <= MAX_NAME_LEN * 2;
            let known = match &r.error {
                Error::LeaseNotFound(id)
                | Error::LeaseRevoked(id)
                | Error::LeaseExpired(id)
                | Error::LeaseAtMaxLifetime(id) => bounded(id),
                Error::NotRenewable { lease, how } => {
                    bounded(lease) && how.len() <= MAX_PURPOSE_LEN
                }
                Error::PermissionDenied(m) => m.len() <= MAX_PURPOSE_LEN,
                _ => false,
            };
            if !known {
                return Err(invalid(format!(
                    "a node does not record a {} refusal on its own",
                    r.error.kind()
                )));
            }
            Ok(())
        }
        Intent::PutDbConnection(c) => crate::state::validate_db_connection(c),
        Intent::DeleteDbConnection { name, .. } => validate_name("connection name", name),
        Intent::AbandonLease { lease_id, reason } => {
            validate_lease_id(lease_id)?;
            validate_text("the reason", reason, MAX_PURPOSE_LEN, true)
        }
        Intent::StageRootPassword {
            name,
            sealed_password: sealed,
        }
        | Intent::SettleRootPassword {
            name,
            pending: sealed,
            ..
        } => {
            validate_name("connection name", name)?;
            crate::state::validate_sealed_password(sealed)
        }
        Intent::SetBreakGlass { credential_hash } => match credential_hash.len() {
            0 | 32 => Ok(()),
            _ => Err(invalid(
                "a break-glass credential hash is 32 bytes (or empty, to disable)".into(),
            )),
        },
        Intent::ImportSshCa {
            kid,
            public_key,
            sealed_private_key,
        } => {
            if *kid != kid_for(public_key) || sealed_private_key.len() > 128 {
                return Err(invalid(
                    "the SSH CA key's id or sealed key is malformed".into(),
                ));
            }
            Ok(())
        }
        Intent::RecordAccess { action, target } => {
            validate_text("action", action, MAX_NAME_LEN, false)?;
            if !target.is_empty() {
                validate_text("target", target, MAX_SUBJECT_LEN, true)?;
            }
            Ok(())
        }
        Intent::RecordDenial { presented, reason } => {
            if presented.len() > MAX_SUBJECT_LEN || reason.len() > MAX_PURPOSE_LEN {
                return Err(invalid("denial record too long".into()));
            }
            Ok(())
        }
        Intent::SetClusterCa {
            trust_domain,
            cert_pem,
            sealed_seed,
        } => {
            validate_text("trust domain", trust_domain, MAX_NAME_LEN, false)?;
            // A sealed Ed25519 seed or ECDSA P-256 PKCS#8 document (about 200 bytes sealed).
            if cert_pem.is_empty() || cert_pem.len() > 16 * 1024 || sealed_seed.len() > 512 {
                return Err(invalid(
                    "CA certificate or sealed key has an invalid size".into(),
                ));
            }
            Ok(())
        }
        Intent::CreateJoinToken {
            token_hash,
            spiffe_id,
            ttl_s,
        } => {
            if token_hash.len() != 32 {
                return Err(invalid("join token hash must be 32 bytes".into()));
            }
            validate_spiffe_id(spiffe_id)?;
            refuse_node_identity(spiffe_id)?;
            if *ttl_s == 0 || *ttl_s > crate::types::JOIN_TOKEN_MAX_TTL_S {
                return Err(invalid(format!(
                    "join token TTL must be between 1s and {}s",
                    crate::types::JOIN_TOKEN_MAX_TTL_S
                )));
            }
            Ok(())
        }
        Intent::ConsumeAssertion { issuer, jti, .. } => {
            validate_text("issuer", issuer, MAX_SUBJECT_LEN, false)?;
            validate_text("jti", jti, MAX_SUBJECT_LEN, false)
        }
    }
}

/// What every Issue (direct or by exchange) must satisfy before it is proposed.
fn validate_issue(i: &IssueIntent) -> Result<(), Error> {
    validate_name("role name", &i.role)?;
    if let Some(r) = &i.request_id {
        if r.is_empty()
            || r.len() > MAX_REQUEST_ID_LEN
            || !r
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(invalid(format!(
                "request id must be 1 to {MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:-]"
            )));
        }
    }
    if let Some(s) = &i.subject {
        validate_text("subject", s, MAX_SUBJECT_LEN, false)?;
    }
    if let Some(t) = i.ttl_s {
        validate_ttl("TTL", t)?;
    }
    i.request.validate()?;
    if i.join_token_hash.as_ref().is_some_and(|h| h.len() != 32) {
        return Err(invalid("join token hash must be 32 bytes".into()));
    }
    if let Some(l) = &i.supersedes {
        validate_lease_id(l)?;
    }
    if let Some(p) = &i.purpose {
        validate_text("purpose", p, MAX_PURPOSE_LEN, true)?;
    }
    validate_context(&i.context)
}

fn validate_policy_text(text: &str) -> Result<(), Error> {
    if text.len() > MAX_POLICY_TEXT_LEN {
        return Err(invalid(format!(
            "a policy set is at most {MAX_POLICY_TEXT_LEN} bytes"
        )));
    }
    Ok(())
}

pub fn validate_governance(g: &PolicyGovernance) -> Result<(), Error> {
    if g.approvals_required > crate::policy::MAX_APPROVALS_REQUIRED {
        return Err(invalid(format!(
            "policy approvals must be between 0 and {}",
            crate::policy::MAX_APPROVALS_REQUIRED
        )));
    }
    if g.proposal_ttl_s == 0 || g.proposal_ttl_s > crate::policy::MAX_PROPOSAL_TTL_S {
        return Err(invalid(format!(
            "a proposal's lifetime must be between 1s and {}s",
            crate::policy::MAX_PROPOSAL_TTL_S
        )));
    }
    Ok(())
}

fn validate_context(c: &RequestContext) -> Result<(), Error> {
    for (what, v) in [
        ("source address", &c.source_ip),
        ("environment", &c.environment),
        ("job id", &c.job_id),
    ] {
        if let Some(v) = v {
            validate_text(what, v, MAX_NAME_LEN * 2, false)?;
        }
    }
    Ok(())
}

/// The intent an op was stamped from, for re-validating inside `apply`.
pub fn intent_of(op: &Op) -> Option<Intent> {
    Some(match op {
        Op::Bootstrap {
            admin_credential_hash,
            issuer,
            policy_text,
            governance,
        } => Intent::Bootstrap {
            admin_credential_hash: admin_credential_hash.clone(),
            issuer: issuer.clone(),
            policy_text: policy_text.clone(),
            governance: *governance,
        },
        Op::PutRole(r) => Intent::PutRole(r.clone()),
        Op::DeleteRole { name } => Intent::DeleteRole { name: name.clone() },
        Op::Issue { intent, .. } => Intent::Issue(intent.clone()),
        Op::Exchange { intent, .. } => Intent::Exchange(intent.clone()),
        Op::Renew { intent, .. } => Intent::Renew(intent.clone()),
        Op::Revoke(t) => Intent::Revoke(t.clone()),
        Op::ProposePolicy { text, comment, .. } => Intent::ProposePolicy {
            text: text.clone(),
            comment: comment.clone(),
        },
        Op::ApprovePolicy { proposal_id } => Intent::ApprovePolicy {
            proposal_id: proposal_id.clone(),
        },
        Op::RejectPolicy {
            proposal_id,
            reason,
        } => Intent::RejectPolicy {
            proposal_id: proposal_id.clone(),
            reason: reason.clone(),
        },
        Op::PolicyDenied(d) => Intent::PolicyDenied(d.clone()),
        Op::GuardEvent(e) => Intent::GuardEvent(e.clone()),
        Op::ReleaseQuarantine { identity } => Intent::ReleaseQuarantine {
            identity: identity.clone(),
        },
        Op::RecordAccess { action, target } => Intent::RecordAccess {
            action: action.clone(),
            target: target.clone(),
        },
        Op::RecordDenial { presented, reason } => Intent::RecordDenial {
            presented: presented.clone(),
            reason: reason.clone(),
        },
        Op::SetClusterCa {
            trust_domain,
            cert_pem,
            sealed_seed,
        } => Intent::SetClusterCa {
            trust_domain: trust_domain.clone(),
            cert_pem: cert_pem.clone(),
            sealed_seed: sealed_seed.clone(),
        },
        Op::CreateJoinToken {
            token_hash,
            spiffe_id,
            ttl_s,
        } => Intent::CreateJoinToken {
            token_hash: token_hash.clone(),
            spiffe_id: spiffe_id.clone(),
            ttl_s: *ttl_s,
        },
        Op::ConsumeAssertion {
            issuer,
            jti,
            expires_at_ms,
        } => Intent::ConsumeAssertion {
            issuer: issuer.clone(),
            jti: jti.clone(),
            expires_at_ms: *expires_at_ms,
        },
        Op::RecordRefusal(r) => Intent::RecordRefusal(r.clone()),
        Op::PutDbConnection(c) => Intent::PutDbConnection(c.clone()),
        Op::DeleteDbConnection { name, force } => Intent::DeleteDbConnection {
            name: name.clone(),
            force: *force,
        },
        Op::AbandonLease { lease_id, reason } => Intent::AbandonLease {
            lease_id: lease_id.clone(),
            reason: reason.clone(),
        },
        Op::StageRootPassword {
            name,
            sealed_password,
        } => Intent::StageRootPassword {
            name: name.clone(),
            sealed_password: sealed_password.clone(),
        },
        Op::SettleRootPassword {
            name,
            pending,
            promote,
        } => Intent::SettleRootPassword {
            name: name.clone(),
            pending: pending.clone(),
            promote: *promote,
        },
        Op::SetBreakGlass { credential_hash } => Intent::SetBreakGlass {
            credential_hash: credential_hash.clone(),
        },
        Op::AddSigningKey { .. }
        | Op::AddSshCaKey { .. }
        | Op::Expire { .. }
        | Op::Compact { .. }
        | Op::AddAuditKey { .. }
        | Op::AuditCheckpoint { .. }
        | Op::IssueNodeCertificate(_)
        | Op::SettleEffect { .. }
        | Op::Batch(_) => return None,
    })
}
