//! The replicated state machine: deterministic `apply` of stamped commands over a key-value view,
//! and the read queries the node serves from it.
//!
//! Key layout (all in one ordered keyspace so that one atomic batch commits a whole command):
//! `meta/*` cluster metadata, `role/{name}`, `lease/{id}`, `key/{kid}`,
//! `ix/dl/{deadline:016x}/{id}` deadline index of active leases (expiry reads only the due head),
//! `ix/sub/{subject}\0{id}`, `ix/role/{role}\0{id}`, `ix/kid/{kid}\0{id}` secondary indexes,
//! `req/{client}\0{request_id}` idempotency records, `audit/r/{seq:016x}` the audit chain,
//! `pol/v/{version:016x}` committed policy set versions, `pol/p/{id}` policy proposals,
//! `fx/*` external effects and their indexes (see [`effects`]).

mod db;
mod delegation;
pub mod effects;
mod governance;
mod identity;
mod leases;
mod node_certs;
mod queries;
mod retention;
mod revocations;

pub use db::{
    db_connection, db_connections, password_aad, validate_db_connection, validate_sealed_password,
    DbConnection, SslMode, MAX_SEALED_PASSWORD, ROTATION_IN_FLIGHT_MS,
};
pub use delegation::{children, delegation, Delegation, MAX_DELEGATION_DEPTH};
use governance::*;
use identity::*;
pub use identity::{quarantine, quarantines};
use leases::*;
pub use leases::{live_leases, renewable, renewal_refusal};
pub use node_certs::{node_certificate, NodeCertificate, MAX_NODE_HOST_NAMES};
pub use queries::*;
pub use retention::compaction_due;
use retention::{keep_dead_lease, keep_until, Kept};
pub use revocations::{last_revocation_seq, revocations_after, Revocation, Revoked};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditRecord, GENESIS_HASH};
use crate::command::{
    intent_of, validate_intent, ApplyResult, Command, IssueIntent, Op, Outcome, PolicyDenial,
    RenewIntent, RequestContext, RevokeTarget,
};
use crate::error::{Error, StorageError};
use crate::kind::{CredentialKind, GrantContext, KindStamp, Renewal, Signer, SignerKind};
use crate::kv::{prefix_end, KvRead, Overlay};
use crate::policy::{PolicyGovernance, PolicyProposal, PolicyStamp, PolicyVersion, ProposalState};
use crate::types::{
    AuthMethod, ClusterCa, JoinToken, KeyState, Lease, LeaseState, Principal, Role,
    SigningKeyRecord, SVID_ROLE,
};

const META_TIME: &[u8] = b"meta/time";
const META_ADMIN_HASH: &[u8] = b"meta/admin_hash";
const META_ISSUER: &[u8] = b"meta/issuer";
const META_ACTIVE_KID: &[u8] = b"meta/active_kid";
const META_AUDIT_HEAD: &[u8] = b"meta/audit_head";
const META_CA: &[u8] = b"meta/ca";
const META_ACTIVE_SSH_CA: &[u8] = b"meta/active_ssh_ca";
/// The last SSH certificate serial handed out (serials start at 1).
const META_SSH_SERIAL: &[u8] = b"meta/ssh_serial";
/// Bumped by every change of what the KRL says (`krl_version`).
const META_KRL_VERSION: &[u8] = b"meta/krl_version";
const META_ACTIVE_AUDIT_KEY: &[u8] = b"meta/active_audit_key";
const META_POLICY_VERSION: &[u8] = b"meta/policy_version";
const META_POLICY_GOVERNANCE: &[u8] = b"meta/policy_governance";
const PFX_POLICY_VERSION: &str = "pol/v/";
const PFX_PROPOSAL: &str = "pol/p/";
const PFX_LIVE_COUNT: &str = "cnt/";
const PFX_QUARANTINE: &str = "quar/";
const PFX_JOIN_TOKEN: &str = "jt/";
const PFX_ASSERTION: &str = "aj/";
const PFX_ROLE: &str = "role/";
const PFX_LEASE: &str = "lease/";
const PFX_KEY: &str = "key/";
const PFX_SSH_CA: &str = "sshca/";
const PFX_AUDIT_KEY: &str = "akey/";
const PFX_NODE_CERT: &str = "ncert/";
/// Signed audit checkpoints: `audit/cp/{seq:016x}`.
const PFX_AUDIT_CHECKPOINT: &str = "audit/cp/";
/// Revoked SSH certificates not yet past `valid_before`: `ix/sshrev/{valid_before_s:016x}/
/// {serial:016x}` → the CA key id. The KRL is built from it.
const PFX_SSH_REVOKED: &str = "ix/sshrev/";
const PFX_DEADLINE: &str = "ix/dl/";
const PFX_SUBJECT: &str = "ix/sub/";
const PFX_ROLE_IX: &str = "ix/role/";
const PFX_KID_IX: &str = "ix/kid/";
const PFX_REQ: &str = "req/";
const PFX_AUDIT: &str = "audit/r/";

/// Every key the domain state owns starts with one of these; the Raft layer keeps its own
/// bookkeeping outside them.
pub const STATE_PREFIXES: &[&str] = &[
    "aj/", "akey/", "audit/", "cnt/", "db/", "dg/", "fx/", "ix/", "jt/", "key/", "lease/", "meta/",
    "ncert/", "pol/", "quar/", "req/", "role/", "rv/", "sshca/",
];

/// How far past its latest token's expiry a retiring key stays in the JWKS (verifier clock skew).
pub const KEY_PUBLISH_GRACE_MS: u64 = 60_000;

/// Leases touched by a bulk revocation are processed in pages of this size.
const SCAN_PAGE: usize = 4096;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("state values serialise")
}

fn dec<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StorageError> {
    bincode::deserialize(bytes).map_err(|e| {
        StorageError(format!(
            "corrupt value at {}: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

fn get<T: DeserializeOwned>(
    kv: &(impl KvRead + ?Sized),
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    match kv.get(key)? {
        Some(b) => Ok(Some(dec(key, &b)?)),
        None => Ok(None),
    }
}

/// Leases and roles are stored in the versioned layout (see [`crate::legacy`]).
fn load_lease(kv: &(impl KvRead + ?Sized), id: &str) -> Result<Option<Lease>, StorageError> {
    let key = lease_key(id);
    match kv.get(&key)? {
        Some(b) => crate::legacy::decode(&key, &b, crate::legacy::lease_from_v1).map(Some),
        None => Ok(None),
    }
}

fn store_lease<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, lease: &Lease) {
    kv.put(lease_key(&lease.id), crate::legacy::encode(lease));
}

fn load_role(kv: &(impl KvRead + ?Sized), name: &str) -> Result<Option<Role>, StorageError> {
    let key = role_key(name);
    match kv.get(&key)? {
        Some(b) => crate::legacy::decode(&key, &b, crate::legacy::role_from_v1).map(Some),
        // The SVID role exists in every cluster, defined or not.
        None if name == SVID_ROLE => Ok(Some(Role::builtin_svid())),
        None => Ok(None),
    }
}

fn lease_key(id: &str) -> Vec<u8> {
    format!("{PFX_LEASE}{id}").into_bytes()
}
fn role_key(name: &str) -> Vec<u8> {
    format!("{PFX_ROLE}{name}").into_bytes()
}
fn key_key(kid: &str) -> Vec<u8> {
    format!("{PFX_KEY}{kid}").into_bytes()
}
fn ssh_ca_key(kid: &str) -> Vec<u8> {
    format!("{PFX_SSH_CA}{kid}").into_bytes()
}
fn ssh_revoked_key(valid_before_s: u64, serial: u64) -> Vec<u8> {
    format!("{PFX_SSH_REVOKED}{valid_before_s:016x}/{serial:016x}").into_bytes()
}
fn deadline_key(deadline_ms: u64, id: &str) -> Vec<u8> {
    format!("{PFX_DEADLINE}{deadline_ms:016x}/{id}").into_bytes()
}
fn ix_prefix(pfx: &str, value: &str) -> Vec<u8> {
    let mut k = format!("{pfx}{value}").into_bytes();
    k.push(0);
    k
}

/// The ids an index holds under one value (`ix_prefix`), read a page of [`SCAN_PAGE`] at a
/// time so that a large index is never held whole by a caller that does not need it whole.
struct IdPages {
    prefix: Vec<u8>,
    end: Vec<u8>,
    next: Option<Vec<u8>>,
}

impl IdPages {
    fn new(prefix: Vec<u8>) -> Self {
        IdPages {
            end: prefix_end(&prefix),
            next: Some(prefix.clone()),
            prefix,
        }
    }

    /// The next page of ids in id order, or `None` once the index is exhausted. Each page is
    /// read afresh, so a caller may change the state between pages (entries it deletes behind
    /// the cursor are not seen again).
    fn next_page(
        &mut self,
        kv: &(impl KvRead + ?Sized),
    ) -> Result<Option<Vec<String>>, StorageError> {
        let Some(start) = self.next.take() else {
            return Ok(None);
        };
        let page = kv.range(&start, &self.end, SCAN_PAGE)?;
        if page.len() == SCAN_PAGE {
            let mut after = page[page.len() - 1].0.clone();
            after.push(0);
            self.next = Some(after);
        }
        if page.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            page.iter()
                .map(|(k, _)| String::from_utf8_lossy(&k[self.prefix.len()..]).into_owned())
                .collect(),
        ))
    }
}

/// Every id an index holds under one value, in id order.
fn ids_under(
    kv: &(impl KvRead + ?Sized),
    pfx: &str,
    value: &str,
) -> Result<Vec<String>, StorageError> {
    let mut pages = IdPages::new(ix_prefix(pfx, value));
    let mut out = Vec::new();
    while let Some(page) = pages.next_page(kv)? {
        out.extend(page);
    }
    Ok(out)
}

fn ix_key(pfx: &str, value: &str, id: &str) -> Vec<u8> {
    let mut k = ix_prefix(pfx, value);
    k.extend_from_slice(id.as_bytes());
    k
}
fn req_key(client: &str, request_id: &str) -> Vec<u8> {
    ix_key(PFX_REQ, client, request_id)
}
fn join_token_key(hash: &[u8]) -> Vec<u8> {
    format!("{PFX_JOIN_TOKEN}{}", hex::encode(hash)).into_bytes()
}
fn policy_version_key(version: u64) -> Vec<u8> {
    format!("{PFX_POLICY_VERSION}{version:016x}").into_bytes()
}
fn proposal_key(id: &str) -> Vec<u8> {
    format!("{PFX_PROPOSAL}{id}").into_bytes()
}
/// Live leases of a role (`holder` None) or of one holder within a role.
fn live_count_key(role: &str, holder: Option<&str>) -> Vec<u8> {
    match holder {
        None => format!("{PFX_LIVE_COUNT}role/{role}").into_bytes(),
        Some(h) => format!("{PFX_LIVE_COUNT}holder/{role}\0{h}").into_bytes(),
    }
}
fn quarantine_key(identity: &str) -> Vec<u8> {
    format!("{PFX_QUARANTINE}{identity}").into_bytes()
}
fn audit_key(seq: u64) -> Vec<u8> {
    format!("{PFX_AUDIT}{seq:016x}").into_bytes()
}
fn audit_key_record(kid: &str) -> Vec<u8> {
    format!("{PFX_AUDIT_KEY}{kid}").into_bytes()
}
fn audit_checkpoint_key(seq: u64) -> Vec<u8> {
    format!("{PFX_AUDIT_CHECKPOINT}{seq:016x}").into_bytes()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct AuditHead {
    seq: u64,
    hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestRecord {
    lease_id: String,
    fingerprint: [u8; 32],
}

fn fingerprint(i: &IssueIntent, subject: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(enc(&(
        &i.role,
        subject,
        i.ttl_s,
        &i.request,
        &i.purpose,
        &i.supersedes,
    )));
    h.finalize().into()
}

// ------------------------------------------------------------------------------------------
// apply
// ------------------------------------------------------------------------------------------

/// Applies one stamped command. Domain errors are outcomes (committed, audited, identical on every
/// node) and leave lease and role state untouched; only a storage failure is an `Err`.
pub fn apply<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    cmd: &Command,
) -> Result<ApplyResult, StorageError> {
    if let Op::Batch(cmds) = &cmd.op {
        return apply_batch(kv, cmds);
    }
    let last: u64 = get(kv, META_TIME)?.unwrap_or(0);
    let now = cmd.now_ms.max(last);
    kv.put(META_TIME.to_vec(), enc(&now));

    let mut audit = AuditRecord {
        time_ms: now,
        actor: cmd.actor.id.clone(),
        auth_method: cmd.actor.auth_method.as_str().to_string(),
        actor_issuer: cmd.actor.issuer.clone(),
        actor_attributes: cmd.actor.attributes.clone(),
        action: action_name(&cmd.op).to_string(),
        ..Default::default()
    };

    // Run the op against a nested overlay, so a denial discards its partial writes.
    let (result, writes) = {
        let mut inner = Overlay::new(&*kv);
        let result = apply_op(&mut inner, cmd, now, &mut audit)?;
        (result, inner.into_writes())
    };
    match &result {
        Ok(outcome) => {
            for (k, v) in writes {
                match v {
                    Some(v) => kv.put(k, v),
                    None => kv.delete(k),
                }
            }
            // An op that records a refusal (a policy denial) marks its record itself.
            if audit.outcome.is_empty() {
                audit.outcome = "ok".into();
            }
            if let Outcome::Revoked { count }
            | Outcome::Expired { count }
            | Outcome::Compacted { count } = outcome
            {
                audit.count = Some(*count);
            }
        }
        Err(e) => {
            // The kind and structured fields, never apply's prose (see `Error::audit_fields`).
            audit.outcome = "denied".into();
            audit.reason = Some(e.kind().to_string());
            audit.error_fields.extend(e.audit_fields());
        }
    }
    append_audit(kv, audit)?;
    Ok(result)
}

/// A batch: each command in order, as if each were its own entry. Only the leader builds
/// batches, from commands it stamped; one that breaks the rules (nested, oversized) is refused
/// whole before anything is applied, so a bad entry changes nothing.
fn apply_batch<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    cmds: &[Command],
) -> Result<ApplyResult, StorageError> {
    if cmds.len() > crate::command::MAX_BATCH || cmds.iter().any(|c| matches!(c.op, Op::Batch(_))) {
        return Ok(Err(Error::InvalidArgument(format!(
            "a batch holds at most {} commands and no batch",
            crate::command::MAX_BATCH
        ))));
    }
    let mut results = Vec::with_capacity(cmds.len());
    for c in cmds {
        results.push(apply(kv, c)?);
    }
    Ok(Ok(Outcome::Batch(results)))
}

fn action_name(op: &Op) -> &'static str {
    match op {
        Op::Bootstrap { .. } => "cluster.init",
        Op::PutRole(_) => "role.put",
        Op::DeleteRole { .. } => "role.delete",
        Op::Issue { .. } => "lease.issue",
        Op::Exchange { .. } => "lease.exchange",
        Op::Renew { .. } => "lease.renew",
        Op::Revoke(_) => "lease.revoke",
        Op::AddSigningKey { .. } => "key.add",
        Op::AddSshCaKey { .. } => "sshca.add",
        Op::Expire { .. } => "lease.expire",
        Op::RecordAccess { .. } => "access",
        Op::RecordDenial { .. } => "auth.denied",
        Op::SetClusterCa { .. } => "ca.set",
        Op::CreateJoinToken { .. } => "jointoken.create",
        Op::ConsumeAssertion { .. } => "assertion.consume",
        Op::ProposePolicy { .. } => "policy.propose",
        Op::ApprovePolicy { .. } => "policy.approve",
        Op::RejectPolicy { .. } => "policy.reject",
        Op::PolicyDenied(_) => "policy.denied",
        Op::GuardEvent(_) => "guard.event",
        Op::ReleaseQuarantine { .. } => "quarantine.release",
        Op::RecordRefusal(r) => r.action.audit_action(),
        Op::SetBreakGlass { credential_hash } if credential_hash.is_empty() => "breakglass.disable",
        Op::SetBreakGlass { .. } => "breakglass.rotate",
        Op::Compact { .. } => "state.compact",
        Op::AddAuditKey { .. } => "auditkey.add",
        Op::AuditCheckpoint { .. } => "audit.checkpoint",
        Op::IssueNodeCertificate(_) => "nodecert.issue",
        Op::PutDbConnection(_) => "db.connection.put",
        Op::DeleteDbConnection { .. } => "db.connection.delete",
        Op::AbandonLease { .. } => "lease.abandon",
        Op::StageRootPassword { .. } => "db.connection.rotate_root.stage",
        Op::SettleRootPassword { .. } => "db.connection.rotate_root.settle",
        Op::SettleEffect { .. } => "effect.settle",
        // Never recorded: its commands are, each under its own action.
        Op::Batch(_) => "batch",
    }
}

fn append_audit<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    mut rec: AuditRecord,
) -> Result<(), StorageError> {
    let head: AuditHead = get(kv, META_AUDIT_HEAD)?.unwrap_or(AuditHead {
        seq: 0,
        hash: GENESIS_HASH.into(),
    });
    rec.seq = head.seq + 1;
    rec.prev_hash = head.hash;
    rec.hash = rec.compute_hash();
    kv.put(
        audit_key(rec.seq),
        serde_json::to_vec(&rec).expect("audit record serialises"),
    );
    kv.put(
        META_AUDIT_HEAD.to_vec(),
        enc(&AuditHead {
            seq: rec.seq,
            hash: rec.hash,
        }),
    );
    Ok(())
}

/// A replicated store of signing keys: where its records live and which one is active.
pub(super) struct KeyStore {
    pub(super) record: fn(&str) -> Vec<u8>,
    pub(super) active: &'static [u8],
    pub(super) what: &'static str,
}

pub(super) const JWT_KEYS: KeyStore = KeyStore {
    record: key_key,
    active: META_ACTIVE_KID,
    what: "signing key",
};
pub(super) const AUDIT_KEYS: KeyStore = KeyStore {
    record: audit_key_record,
    active: META_ACTIVE_AUDIT_KEY,
    what: "audit key",
};
pub(super) const SSH_CA_KEYS: KeyStore = KeyStore {
    record: ssh_ca_key,
    active: META_ACTIVE_SSH_CA,
    what: "SSH CA key",
};

/// Makes a new key active in `store`; the previous one retires (it stays published until what
/// it signed has expired).
fn add_key<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    store: KeyStore,
    (kid, public_key, sealed_private_key): (&String, &[u8; 32], &Vec<u8>),
) -> Result<ApplyResult, StorageError> {
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    if kv.get(&(store.record)(kid))?.is_some() {
        return Ok(Err(Error::Internal(format!(
            "{} {kid} already exists",
            store.what
        ))));
    }
    if let Some(prev) = get::<String>(kv, store.active)? {
        if let Some(mut rec) = get::<SigningKeyRecord>(kv, &(store.record)(&prev))? {
            rec.state = KeyState::Retiring { since_ms: now };
            kv.put((store.record)(&prev), enc(&rec));
        }
    }
    let rec = SigningKeyRecord {
        kid: kid.clone(),
        public_key: *public_key,
        sealed_private_key: sealed_private_key.clone(),
        created_at_ms: now,
        state: KeyState::Active,
        max_token_expiry_ms: 0,
    };
    kv.put((store.record)(kid), enc(&rec));
    kv.put(store.active.to_vec(), enc(kid));
    Ok(Ok(Outcome::KeyAdded { kid: kid.clone() }))
}

fn require_admin(actor: &Principal) -> Result<(), Error> {
    if actor.is_admin() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "{} is not an administrator",
            actor.id
        )))
    }
}

fn apply_op<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    cmd: &Command,
    now: u64,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    if let Some(intent) = intent_of(&cmd.op) {
        if let Err(e) = validate_intent(&intent) {
            return Ok(Err(e));
        }
    }
    let actor = &cmd.actor;
    match &cmd.op {
        Op::Bootstrap {
            admin_credential_hash,
            issuer,
            policy_text,
            governance,
        } => {
            if kv.get(META_ADMIN_HASH)?.is_some() {
                return Ok(Err(Error::AlreadyInitialized));
            }
            kv.put(META_ADMIN_HASH.to_vec(), admin_credential_hash.clone());
            kv.put(META_ISSUER.to_vec(), enc(issuer));
            kv.put(META_POLICY_GOVERNANCE.to_vec(), enc(governance));
            let first = PolicyVersion {
                version: 1,
                text: policy_text.clone(),
                sha256: text_hash(policy_text),
                activated_at_ms: now,
                proposal_id: None,
                proposer: actor.id.clone(),
                approvers: Vec::new(),
            };
            audit.target = Some(format!("issuer:{issuer} policy:{}", first.sha256));
            audit.policy_version = Some(1);
            activate_policy(kv, &first);
            Ok(Ok(Outcome::Done))
        }
        Op::PutRole(role) => {
            audit.role = Some(role.name.clone());
            audit.ttl_s = Some(role.max_ttl_s);
            let view = role.spec.cedar();
            audit.scopes = view.scopes.to_vec();
            audit.audience = Some(view.audience.to_string()).filter(|a| !a.is_empty());
            audit.details = kind_details(role.kind(), view.principals);
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if let crate::kind::RoleSpec::Postgres(spec) = &role.spec {
                if db_connection(kv, &spec.connection)?.is_none() {
                    return Ok(Err(Error::UnknownConnection(spec.connection.clone())));
                }
            }
            let mut role = role.clone();
            role.spec.normalise();
            kv.put(role_key(&role.name), crate::legacy::encode(&role));
            Ok(Ok(Outcome::Role(role)))
        }
        Op::DeleteRole { name } => {
            audit.role = Some(name.clone());
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(&role_key(name))?.is_none() {
                return Ok(Err(Error::UnknownRole(name.clone())));
            }
            // Leases of a deleted role live on until they expire or are revoked.
            kv.delete(role_key(name));
            Ok(Ok(Outcome::Done))
        }
        Op::Issue {
            intent,
            lease_id,
            renew_after_permille,
            kind_stamp,
        } => issue(
            kv,
            actor,
            now,
            intent,
            (lease_id, *renew_after_permille, kind_stamp),
            audit,
            None,
        ),
        Op::Exchange {
            intent,
            lease_id,
            renew_after_permille,
        } => delegation::exchange(
            kv,
            actor,
            now,
            intent,
            (lease_id, *renew_after_permille, &KindStamp::None),
            audit,
        ),
        Op::Renew {
            intent,
            renew_after_permille,
        } => renew(kv, actor, now, intent, *renew_after_permille, audit),
        Op::ProposePolicy {
            proposal_id,
            text,
            comment,
        } => propose_policy(kv, actor, now, proposal_id, text, comment, audit),
        Op::ApprovePolicy { proposal_id } => approve_policy(kv, actor, now, proposal_id, audit),
        Op::RejectPolicy {
            proposal_id,
            reason,
        } => {
            audit.target = Some(format!("policy-proposal:{proposal_id}"));
            if let Err(e) = require_policy_admin(actor) {
                return Ok(Err(e));
            }
            let Some(mut p) = get::<PolicyProposal>(kv, &proposal_key(proposal_id))? else {
                return Ok(Err(Error::ProposalNotFound(proposal_id.clone())));
            };
            if p.status(now) != "pending" {
                return Ok(Err(Error::ProposalNotPending {
                    id: p.id.clone(),
                    state: p.status(now).into(),
                }));
            }
            audit.reason = Some(reason.clone());
            p.state = ProposalState::Rejected {
                by: actor.id.clone(),
                at_ms: now,
                reason: reason.clone(),
            };
            kv.put(proposal_key(proposal_id), enc(&p));
            Ok(Ok(Outcome::Proposal(p)))
        }
        Op::PolicyDenied(denial) => policy_denied(kv, actor, now, denial, audit),
        Op::GuardEvent(event) => guard_event(kv, actor, now, event, audit),
        Op::RecordRefusal(refusal) => record_refusal(kv, refusal, audit),
        Op::Compact { retention, limit } => retention::compact(kv, now, retention, *limit, audit),
        Op::AddAuditKey {
            kid,
            public_key,
            sealed_private_key,
        } => {
            audit.target = Some(format!("audit-key:{kid}"));
            add_key(
                kv,
                actor,
                now,
                AUDIT_KEYS,
                (kid, public_key, sealed_private_key),
            )
        }
        Op::AuditCheckpoint {
            seq,
            hash,
            kid,
            signature,
        } => audit_checkpoint(kv, actor, now, (*seq, hash, kid, signature), audit),
        Op::IssueNodeCertificate(cert) => node_certs::issue(kv, actor, now, cert, audit),
        Op::PutDbConnection(c) => db::put(kv, actor, now, c, audit),
        Op::DeleteDbConnection { name, force } => db::delete(kv, actor, now, (name, *force), audit),
        Op::StageRootPassword {
            name,
            sealed_password,
        } => db::stage_root(kv, actor, now, (name, sealed_password), audit),
        Op::SettleRootPassword {
            name,
            pending,
            promote,
        } => db::settle_root(kv, actor, now, (name, pending, *promote), audit),
        Op::AbandonLease { lease_id, reason } => {
            db::abandon_lease(kv, actor, now, (lease_id, reason), audit)
        }
        Op::SettleEffect {
            seq,
            attempt,
            error,
            retry_at_ms,
        } => effects::settle_op(
            kv,
            actor,
            now,
            (*seq, *attempt, error.as_deref(), *retry_at_ms),
            audit,
        ),
        // `apply` takes batches apart before they get here.
        Op::Batch(_) => Ok(Err(Error::InvalidArgument(
            "a batch cannot be applied as one command".into(),
        ))),
        Op::SetBreakGlass { credential_hash } => {
            // The hash is not recorded: the audit record says who rotated or disabled it.
            audit.target = Some("break-glass credential".into());
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(META_ADMIN_HASH)?.is_none() {
                return Ok(Err(Error::NotInitialized));
            }
            kv.put(META_ADMIN_HASH.to_vec(), credential_hash.clone());
            Ok(Ok(Outcome::Done))
        }
        Op::ReleaseQuarantine { identity } => {
            audit.subject = Some(identity.clone());
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(&quarantine_key(identity))?.is_none() {
                return Ok(Err(Error::InvalidArgument(format!(
                    "{identity} is not quarantined"
                ))));
            }
            kv.delete(quarantine_key(identity));
            Ok(Ok(Outcome::Done))
        }
        Op::Revoke(target) => {
            audit.target = Some(target.describe());
            if let RevokeTarget::Lease(id) = target {
                audit.lease_id = Some(id.clone());
            }
            // A workload may revoke its own leases (e.g. when its job ends); everything else,
            // bulk revocation included, is an administrator's.
            let lease = match target {
                RevokeTarget::Lease(id) => load_lease(kv, id)?,
                _ => None,
            };
            if let Some(l) = &lease {
                // What was revoked, in the kind's terms (an SSH certificate's serial).
                audit.subject = Some(l.subject.clone());
                audit.role = Some(l.role.clone());
                audit.details = l.grant.audit();
                audit
                    .details
                    .insert("kind".into(), l.kind().as_str().into());
            }
            let own_lease = lease
                .as_ref()
                .is_some_and(|l| l.subject == actor.id || l.client_id == actor.id);
            if !own_lease {
                if let Err(e) = require_admin(actor) {
                    return Ok(Err(e));
                }
            }
            revoke(kv, actor, now, target)
        }
        Op::AddSigningKey {
            kid,
            public_key,
            sealed_private_key,
        } => {
            audit.target = Some(format!("key:{kid}"));
            add_key(
                kv,
                actor,
                now,
                JWT_KEYS,
                (kid, public_key, sealed_private_key),
            )
        }
        Op::AddSshCaKey {
            kid,
            public_key,
            sealed_private_key,
        } => {
            audit.target = Some(format!("ssh-ca:{kid}"));
            add_key(
                kv,
                actor,
                now,
                SSH_CA_KEYS,
                (kid, public_key, sealed_private_key),
            )
        }
        Op::Expire { up_to_ms, limit } => {
            let up_to = (*up_to_ms).min(now);
            let due = kv.range(
                PFX_DEADLINE.as_bytes(),
                deadline_key(up_to.saturating_add(1), "").as_slice(),
                *limit as usize,
            )?;
            let mut count = 0;
            for (k, _) in due {
                kv.delete(k.clone());
                let id = std::str::from_utf8(&k[PFX_DEADLINE.len() + 17..])
                    .map_err(|_| StorageError("corrupt deadline index key".into()))?
                    .to_string();
                if let Some(mut lease) = load_lease(kv, &id)? {
                    if lease.state == LeaseState::Active {
                        lease.state = LeaseState::Expired {
                            at_ms: lease.expires_at_ms,
                        };
                        store_lease(kv, &lease);
                        keep_dead_lease(kv, &lease);
                        count_live(kv, &lease, false)?;
                        record_drop(kv, now, &lease)?;
                        count += 1;
                    }
                }
            }
            // Revoked certificates past `valid_before` leave the KRL.
            let gone = kv.range(
                PFX_SSH_REVOKED.as_bytes(),
                ssh_revoked_key(up_to / 1000, 0).as_slice(),
                *limit as usize,
            )?;
            if !gone.is_empty() {
                bump_krl_version(kv)?;
            }
            for (k, _) in gone {
                kv.delete(k);
            }
            audit.target = Some(format!("deadline<={up_to}"));
            Ok(Ok(Outcome::Expired { count }))
        }
        Op::RecordAccess { action, target } => {
            audit.target = Some(format!("{action} {target}").trim().to_string());
            Ok(Ok(Outcome::Done))
        }
        Op::RecordDenial { presented, reason } => {
            // Recorded as a denial; nothing else changes. The reason came in the command (the
            // receiving node's words), so it is the log's, not this release's.
            audit.target = Some(presented.clone());
            audit.error_fields.insert("reason".into(), reason.clone());
            Ok(Err(Error::Unauthenticated(reason.clone())))
        }
        Op::SetClusterCa {
            trust_domain,
            cert_pem,
            sealed_seed,
        } => {
            audit.target = Some(format!("trust_domain:{trust_domain}"));
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(META_CA)?.is_some() {
                return Ok(Err(Error::InvalidArgument(
                    "the cluster CA is already set".into(),
                )));
            }
            let ca = ClusterCa {
                trust_domain: trust_domain.clone(),
                cert_pem: cert_pem.clone(),
                sealed_seed: sealed_seed.clone(),
            };
            kv.put(META_CA.to_vec(), enc(&ca));
            Ok(Ok(Outcome::Done))
        }
        Op::CreateJoinToken {
            token_hash,
            spiffe_id,
            ttl_s,
        } => {
            audit.subject = Some(spiffe_id.clone());
            audit.ttl_s = Some(*ttl_s);
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            let key = join_token_key(token_hash);
            if kv.get(&key)?.is_some() {
                return Ok(Err(Error::Internal("join token collision".into())));
            }
            let token = JoinToken {
                spiffe_id: spiffe_id.clone(),
                expires_at_ms: now + ttl_s * 1000,
                created_by: actor.id.clone(),
                used_at_ms: None,
            };
            keep_until(kv, Kept::JoinToken, token.expires_at_ms, &key);
            kv.put(key, enc(&token));
            Ok(Ok(Outcome::Done))
        }
        Op::ConsumeAssertion {
            issuer,
            jti,
            expires_at_ms,
        } => {
            audit.target = Some(format!("issuer:{issuer}"));
            if !consume_assertion(kv, now, issuer, jti, *expires_at_ms)? {
                return Ok(Err(Error::Unauthenticated(
                    "assertion replayed (its jti was already used)".into(),
                )));
            }
            Ok(Ok(Outcome::Done))
        }
    }
}

/// Marks an OIDC assertion's `jti` used until `expires_at_ms`; false if it was already used
/// within its lifetime (a replay).
fn consume_assertion<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    issuer: &str,
    jti: &str,
    expires_at_ms: u64,
) -> Result<bool, StorageError> {
    let mut h = Sha256::new();
    h.update(issuer.as_bytes());
    h.update([0]);
    h.update(jti.as_bytes());
    let key = format!("{PFX_ASSERTION}{}", hex::encode(h.finalize())).into_bytes();
    if let Some(until) = get::<u64>(kv, &key)? {
        if now <= until {
            return Ok(false);
        }
    }
    // A replay within the lifetime enters a second index entry; both go, harmlessly.
    keep_until(kv, Kept::Assertion, expires_at_ms, &key);
    kv.put(key, enc(&expires_at_ms));
    Ok(true)
}

/// Stores a checkpoint once `apply` has checked it: the leader's own, signed by an audit key of
/// this cluster, of a record this chain holds with that hash.
fn audit_checkpoint<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (seq, hash, kid, signature): (u64, &String, &String, &Vec<u8>),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("audit:{seq} key:{kid}"));
    if actor.auth_method != AuthMethod::System {
        return Ok(Err(Error::PermissionDenied(
            "only the leader signs audit checkpoints".into(),
        )));
    }
    let Some(key) = get::<SigningKeyRecord>(kv, &audit_key_record(kid))? else {
        return Ok(Err(Error::KeyNotFound(kid.clone())));
    };
    let held = kv
        .get(&audit_key(seq))?
        .map(|v| serde_json::from_slice::<AuditRecord>(&v))
        .transpose()
        .map_err(|e| StorageError(format!("corrupt audit record {seq}: {e}")))?;
    if held.map(|r| r.hash) != Some(hash.clone()) {
        return Ok(Err(Error::InvalidArgument(format!(
            "audit checkpoint {seq} does not match this chain"
        ))));
    }
    if !crate::audit::verify_checkpoint(&key.public_key, seq, hash, signature) {
        return Ok(Err(Error::InvalidArgument(format!(
            "audit checkpoint {seq}: the signature does not verify"
        ))));
    }
    let cp = crate::audit::AuditCheckpoint {
        seq,
        hash: hash.clone(),
        kid: kid.clone(),
        signature: signature.clone(),
        signed_at_ms: now,
    };
    kv.put(audit_checkpoint_key(seq), enc(&cp));
    Ok(Ok(Outcome::Done))
}

fn audit_context(audit: &mut AuditRecord, c: &RequestContext) {
    for (key, value) in [
        ("source_ip", &c.source_ip),
        ("environment", &c.environment),
        ("job_id", &c.job_id),
    ] {
        if let Some(v) = value {
            audit.context.insert(key.to_string(), v.clone());
        }
    }
}

/// A request is executed only under the policy version it was decided by; otherwise the node
/// decides again. Only the break-glass credential goes without a policy decision.
fn check_policy<'a, R: KvRead + ?Sized>(
    kv: &Overlay<'_, R>,
    actor: &Principal,
    stamp: &'a Option<PolicyStamp>,
    audit: &mut AuditRecord,
) -> Result<Result<&'a PolicyStamp, Error>, StorageError> {
    let Some(stamp) = stamp else {
        return Ok(Err(Error::PolicyDenied(
            "the request carries no policy decision".into(),
        )));
    };
    audit.policy_version = Some(stamp.version);
    audit.policy_ids = stamp.determining.clone();
    let break_glass = stamp
        .determining
        .iter()
        .any(|id| id == PolicyStamp::BREAK_GLASS);
    if break_glass != (actor.auth_method == crate::types::AuthMethod::BootstrapAdmin) {
        return Ok(Err(Error::PolicyDenied(
            "only the break-glass credential is not bound by policy".into(),
        )));
    }
    let active = policy_version(kv)?;
    if stamp.version != active {
        return Ok(Err(Error::PolicyChanged {
            decided: stamp.version,
            active,
        }));
    }
    Ok(Ok(stamp))
}
