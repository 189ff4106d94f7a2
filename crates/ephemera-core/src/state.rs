//! The replicated state machine: deterministic `apply` of stamped commands over a key-value view,
//! and the read queries the node serves from it.
//!
//! Key layout (all in one ordered keyspace so that one atomic batch commits a whole command):
//! `meta/*` cluster metadata, `role/{name}`, `lease/{id}`, `key/{kid}`,
//! `ix/dl/{deadline:016x}/{id}` deadline index of active leases (expiry reads only the due head),
//! `ix/sub/{subject}\0{id}`, `ix/role/{role}\0{id}`, `ix/kid/{kid}\0{id}` secondary indexes,
//! `req/{client}\0{request_id}` idempotency records, `audit/r/{seq:016x}` the audit chain,
//! `pol/v/{version:016x}` committed policy set versions, `pol/p/{id}` policy proposals.

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
    "aj/", "audit/", "cnt/", "ix/", "jt/", "key/", "lease/", "meta/", "pol/", "quar/", "req/",
    "role/", "sshca/",
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
            if let Outcome::Revoked { count } | Outcome::Expired { count } = outcome {
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

fn action_name(op: &Op) -> &'static str {
    match op {
        Op::Bootstrap { .. } => "cluster.init",
        Op::PutRole(_) => "role.put",
        Op::DeleteRole { .. } => "role.delete",
        Op::Issue { .. } => "lease.issue",
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
            let own_lease = match target {
                RevokeTarget::Lease(id) => load_lease(kv, id)?
                    .is_some_and(|l| l.subject == actor.id || l.client_id == actor.id),
                _ => false,
            };
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
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(&key_key(kid))?.is_some() {
                return Ok(Err(Error::Internal(format!(
                    "signing key {kid} already exists"
                ))));
            }
            if let Some(prev) = active_kid(kv)? {
                if let Some(mut rec) = get::<SigningKeyRecord>(kv, &key_key(&prev))? {
                    rec.state = KeyState::Retiring { since_ms: now };
                    kv.put(key_key(&prev), enc(&rec));
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
            kv.put(key_key(kid), enc(&rec));
            kv.put(META_ACTIVE_KID.to_vec(), enc(kid));
            Ok(Ok(Outcome::KeyAdded { kid: kid.clone() }))
        }
        Op::AddSshCaKey {
            kid,
            public_key,
            sealed_private_key,
        } => {
            audit.target = Some(format!("ssh-ca:{kid}"));
            if let Err(e) = require_admin(actor) {
                return Ok(Err(e));
            }
            if kv.get(&ssh_ca_key(kid))?.is_some() {
                return Ok(Err(Error::Internal(format!(
                    "SSH CA key {kid} already exists"
                ))));
            }
            if let Some(prev) = active_ssh_ca(kv)? {
                if let Some(mut rec) = get::<SigningKeyRecord>(kv, &ssh_ca_key(&prev))? {
                    rec.state = KeyState::Retiring { since_ms: now };
                    kv.put(ssh_ca_key(&prev), enc(&rec));
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
            kv.put(ssh_ca_key(kid), enc(&rec));
            kv.put(META_ACTIVE_SSH_CA.to_vec(), enc(kid));
            Ok(Ok(Outcome::KeyAdded { kid: kid.clone() }))
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
                        count_live(kv, &lease, false)?;
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
            kv.put(key, enc(&token));
            Ok(Ok(Outcome::Done))
        }
        Op::ConsumeAssertion {
            issuer,
            jti,
            expires_at_ms,
        } => {
            audit.target = Some(format!("issuer:{issuer}"));
            let mut h = Sha256::new();
            h.update(issuer.as_bytes());
            h.update([0]);
            h.update(jti.as_bytes());
            let key = format!("{PFX_ASSERTION}{}", hex::encode(h.finalize())).into_bytes();
            if let Some(until) = get::<u64>(kv, &key)? {
                if now <= until {
                    return Ok(Err(Error::Unauthenticated(
                        "assertion replayed (its jti was already used)".into(),
                    )));
                }
            }
            kv.put(key, enc(expires_at_ms));
            Ok(Ok(Outcome::Done))
        }
    }
}

/// Kind-specific facts of a role or grant for its audit record.
fn kind_details(
    kind: CredentialKind,
    principals: &[String],
) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    m.insert("kind".to_string(), kind.as_str().to_string());
    if !principals.is_empty() {
        m.insert("principals".to_string(), principals.join(","));
    }
    m
}

/// The key that will sign a credential of `signer`'s kind, from the replicated state.
fn resolve_signer<R: KvRead + ?Sized>(
    kv: &Overlay<'_, R>,
    signer: SignerKind,
) -> Result<Result<Signer, Error>, StorageError> {
    Ok(Ok(match signer {
        SignerKind::JwtKey => {
            let Some(kid) = active_kid(kv)? else {
                return Ok(Err(Error::NoActiveSigningKey));
            };
            Signer {
                kid,
                trust_domain: None,
                serial: 0,
            }
        }
        SignerKind::ClusterCa => Signer {
            kid: String::new(),
            trust_domain: get::<ClusterCa>(kv, META_CA)?.map(|ca| ca.trust_domain),
            serial: 0,
        },
        SignerKind::SshCa => {
            let Some(kid) = active_ssh_ca(kv)? else {
                return Ok(Err(Error::Unavailable(
                    "the cluster has no SSH CA yet; the leader creates one shortly, retry".into(),
                )));
            };
            let last: u64 = get(kv, META_SSH_SERIAL)?.unwrap_or(0);
            Signer {
                kid,
                trust_domain: None,
                serial: last + 1,
            }
        }
    }))
}

/// Consumes a join token in the log's order: of two concurrent redemptions exactly one wins.
fn consume_join_token<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    hash: &[u8],
    subject: &str,
) -> Result<Result<(), Error>, StorageError> {
    let key = join_token_key(hash);
    let Some(mut token) = get::<JoinToken>(kv, &key)? else {
        return Ok(Err(Error::Unauthenticated("unknown join token".into())));
    };
    if token.used_at_ms.is_some() {
        return Ok(Err(Error::Unauthenticated(
            "join token already used".into(),
        )));
    }
    if now >= token.expires_at_ms {
        return Ok(Err(Error::Unauthenticated("join token expired".into())));
    }
    if token.spiffe_id != subject {
        return Ok(Err(Error::PermissionDenied(format!(
            "this join token is for {}",
            token.spiffe_id
        ))));
    }
    token.used_at_ms = Some(now);
    kv.put(key, enc(&token));
    Ok(Ok(()))
}

/// Issues a credential of any kind: the same checks in the same order for every kind, with
/// the kind deciding only what its grant holds.
fn issue<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    intent: &IssueIntent,
    (lease_id, renew_after_permille, kind_stamp): (&str, u16, &KindStamp),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.role = Some(intent.role.clone());
    audit.ttl_s = intent.ttl_s;
    let asked = intent.request.asked();
    audit.scopes = asked.scopes.to_vec();
    audit.audience = asked.audience.map(str::to_string);
    let subject = intent.subject.clone().unwrap_or_else(|| actor.id.clone());
    audit.subject = Some(subject.clone());
    audit_context(audit, &intent.context);
    if subject != actor.id && !actor.is_admin() {
        return Ok(Err(Error::PermissionDenied(
            "only an administrator may issue on behalf of another subject".into(),
        )));
    }
    let stamp = match check_policy(kv, actor, &intent.policy, audit)? {
        Ok(stamp) => stamp,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = check_quarantine(kv, [&actor.id, &subject])? {
        return Ok(Err(e));
    }
    let fp = fingerprint(intent, &subject);
    if let Some(request_id) = &intent.request_id {
        if let Some(prior) = get::<RequestRecord>(kv, &req_key(&actor.id, request_id))? {
            if prior.fingerprint != fp {
                return Ok(Err(Error::RequestIdConflict(request_id.clone())));
            }
            let lease = load_lease(kv, &prior.lease_id)?.ok_or_else(|| {
                StorageError(format!(
                    "request record points at missing lease {}",
                    prior.lease_id
                ))
            })?;
            audit.lease_id = Some(lease.id.clone());
            audit.reason = Some("idempotent replay".into());
            return Ok(Ok(Outcome::Lease {
                lease,
                replayed: true,
            }));
        }
    }
    let Some(role) = load_role(kv, &intent.role)? else {
        return Ok(Err(Error::UnknownRole(intent.role.clone())));
    };
    // A join token authenticates a workload that has no identity yet, for its first SVID only.
    match (
        &intent.join_token_hash,
        actor.auth_method == AuthMethod::JoinToken,
    ) {
        (Some(_), _) if role.kind() != CredentialKind::X509Svid => {
            return Ok(Err(Error::InvalidArgument(
                "a join token is redeemed only for an X.509-SVID".into(),
            )))
        }
        (Some(hash), true) => {
            if let Err(e) = consume_join_token(kv, now, hash, &subject)? {
                return Ok(Err(e));
            }
        }
        (None, false) => {}
        _ => {
            return Ok(Err(Error::Unauthenticated(
                "a join token and the join-token principal go together".into(),
            )))
        }
    }
    for (holder, max) in [
        (Some(subject.as_str()), role.max_live_leases_per_identity),
        (None, role.max_live_leases),
    ] {
        let Some(max) = max else { continue };
        let live = live_leases(kv, &role.name, holder)?;
        if live >= max {
            return Ok(Err(Error::BudgetExceeded {
                holder: holder.unwrap_or("the role").to_string(),
                role: role.name.clone(),
                live,
            }));
        }
    }
    let requested_ttl_s = intent.ttl_s.unwrap_or(role.default_ttl_s);
    if requested_ttl_s > role.max_ttl_s {
        return Ok(Err(Error::TtlAboveCap {
            requested_s: requested_ttl_s,
            max_s: role.max_ttl_s,
            role: role.name.clone(),
        }));
    }
    let ttl_s = stamp
        .max_ttl_s
        .map_or(requested_ttl_s, |cap| requested_ttl_s.min(cap));
    let signer_kind = role.spec.signer();
    let signer = match resolve_signer(kv, signer_kind)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    if kv.get(&lease_key(lease_id))?.is_some() {
        return Ok(Err(Error::Internal(format!(
            "lease id {lease_id} collides"
        ))));
    }
    let expires_at_ms = now + ttl_s * 1000;
    let grant = match role.spec.grant(
        &intent.request,
        &GrantContext {
            lease_id,
            role: &role.name,
            subject: &subject,
            now_ms: now,
            expires_at_ms,
            policy: stamp,
            signer: &signer,
            stamp: kind_stamp,
        },
    ) {
        Ok(g) => g,
        Err(e) => return Ok(Err(e)),
    };
    // A certificate cannot be extended: its lease ends with it.
    let max_expires_at_ms = match role.spec.renewal() {
        Renewal::Extend => now + role.max_ttl_s * 1000,
        Renewal::Reissue { .. } => expires_at_ms,
    };
    let lease = Lease {
        id: lease_id.to_string(),
        role: role.name.clone(),
        subject: subject.clone(),
        client_id: actor.id.clone(),
        purpose: intent.purpose.clone(),
        parent: None,
        ttl_s,
        issued_at_ms: now,
        minted_at_ms: now,
        expires_at_ms,
        max_expires_at_ms,
        renew_after_ms: now + ttl_s * u64::from(renew_after_permille),
        kid: signer.kid.clone(),
        renewals: 0,
        state: LeaseState::Active,
        grant,
    };
    if let Some(old) = &intent.supersedes {
        match load_lease(kv, old)? {
            Some(o) if o.subject == subject && o.role == role.name => {
                revoke_lease(
                    kv,
                    &o,
                    &LeaseState::Revoked {
                        at_ms: now,
                        by: actor.id.clone(),
                    },
                )?;
                audit.target = Some(format!("supersedes:{old}"));
            }
            _ => {
                return Ok(Err(Error::PermissionDenied(format!(
                    "lease {old} is not a lease of {subject} under role {}",
                    role.name
                ))))
            }
        }
    }
    insert_lease(kv, &lease)?;
    match signer_kind {
        SignerKind::JwtKey => note_key_use(kv, &key_key(&lease.kid), expires_at_ms)?,
        SignerKind::SshCa => {
            note_key_use(kv, &ssh_ca_key(&lease.kid), expires_at_ms)?;
            kv.put(META_SSH_SERIAL.to_vec(), enc(&signer.serial));
        }
        SignerKind::ClusterCa => {}
    }
    if let Some(request_id) = &intent.request_id {
        kv.put(
            req_key(&actor.id, request_id),
            enc(&RequestRecord {
                lease_id: lease_id.to_string(),
                fingerprint: fp,
            }),
        );
    }
    audit.lease_id = Some(lease.id.clone());
    audit.ttl_s = Some(ttl_s);
    audit.scopes = lease.scopes().to_vec();
    audit.audience = Some(lease.audience().to_string()).filter(|a| !a.is_empty());
    audit.details = lease.grant.audit();
    audit
        .details
        .insert("kind".into(), lease.kind().as_str().into());
    Ok(Ok(Outcome::Lease {
        lease,
        replayed: false,
    }))
}

/// Counts a lease in or out of its role's and its holder's live-lease counts (the budgets).
fn count_live<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease: &Lease,
    live: bool,
) -> Result<(), StorageError> {
    for key in [
        live_count_key(&lease.role, None),
        live_count_key(&lease.role, Some(&lease.subject)),
    ] {
        let n: u64 = get(kv, &key)?.unwrap_or(0);
        let n = if live { n + 1 } else { n.saturating_sub(1) };
        if n == 0 {
            kv.delete(key);
        } else {
            kv.put(key, enc(&n));
        }
    }
    Ok(())
}

/// Live leases of `role`, of one holder or in all.
pub fn live_leases(
    kv: &(impl KvRead + ?Sized),
    role: &str,
    holder: Option<&str>,
) -> Result<u64, StorageError> {
    Ok(get(kv, &live_count_key(role, holder))?.unwrap_or(0))
}

pub fn quarantine(
    kv: &(impl KvRead + ?Sized),
    identity: &str,
) -> Result<Option<crate::types::Quarantine>, StorageError> {
    get(kv, &quarantine_key(identity))
}

pub fn quarantines(
    kv: &(impl KvRead + ?Sized),
) -> Result<Vec<crate::types::Quarantine>, StorageError> {
    scan_values(kv, PFX_QUARANTINE.as_bytes(), usize::MAX)
}

/// Refuses a quarantined caller or subject.
fn check_quarantine<R: KvRead + ?Sized>(
    kv: &Overlay<'_, R>,
    identities: [&str; 2],
) -> Result<Result<(), Error>, StorageError> {
    for id in identities {
        if kv.get(&quarantine_key(id))?.is_some() {
            return Ok(Err(Error::Quarantined(id.to_string())));
        }
    }
    Ok(Ok(()))
}

/// Records a detector's event; quarantines (and revokes) when it says so.
fn guard_event<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    event: &crate::command::GuardEvent,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(event.kind.clone());
    audit.subject = event.identity.clone();
    audit.reason = Some(event.detail.clone());
    if actor.auth_method != crate::types::AuthMethod::System {
        return Ok(Err(Error::PermissionDenied(
            "guard events come from the leader's detectors only".into(),
        )));
    }
    let Some(identity) = event.identity.as_ref().filter(|_| event.quarantine) else {
        return Ok(Ok(Outcome::Done));
    };
    if kv.get(&quarantine_key(identity))?.is_some() {
        return Ok(Ok(Outcome::Done));
    }
    let revoked = if event.revoke_leases {
        match revoke(kv, actor, now, &RevokeTarget::Subject(identity.clone()))? {
            Ok(Outcome::Revoked { count }) => count,
            _ => 0,
        }
    } else {
        0
    };
    kv.put(
        quarantine_key(identity),
        enc(&crate::types::Quarantine {
            identity: identity.clone(),
            since_ms: now,
            reason: event.kind.clone(),
            detail: event.detail.clone(),
            revoked,
        }),
    );
    Ok(Ok(Outcome::Revoked { count: revoked }))
}

/// Writes a new active lease and its indexes.
fn insert_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease: &Lease,
) -> Result<(), StorageError> {
    count_live(kv, lease, true)?;
    let id = &lease.id;
    store_lease(kv, lease);
    kv.put(deadline_key(lease.expires_at_ms, id), Vec::new());
    kv.put(ix_key(PFX_SUBJECT, &lease.subject, id), Vec::new());
    kv.put(ix_key(PFX_ROLE_IX, &lease.role, id), Vec::new());
    if !lease.kid.is_empty() {
        kv.put(ix_key(PFX_KID_IX, &lease.kid, id), Vec::new());
    }
    Ok(())
}

/// Records that the key stored at `key` signed something valid until `exp_ms` (it stays
/// published until then).
fn note_key_use<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    key: &[u8],
    exp_ms: u64,
) -> Result<(), StorageError> {
    if let Some(mut rec) = get::<SigningKeyRecord>(kv, key)? {
        if exp_ms > rec.max_token_expiry_ms {
            rec.max_token_expiry_ms = exp_ms;
            kv.put(key.to_vec(), enc(&rec));
        }
    }
    Ok(())
}

fn renew<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    intent: &RenewIntent,
    renew_after_permille: u16,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    let lease_id = intent.lease_id.as_str();
    audit.lease_id = Some(lease_id.to_string());
    audit_context(audit, &intent.context);
    let Some(mut lease) = load_lease(kv, lease_id)? else {
        return Ok(Err(Error::LeaseNotFound(lease_id.to_string())));
    };
    audit.role = Some(lease.role.clone());
    audit.subject = Some(lease.subject.clone());
    audit.scopes = lease.scopes().to_vec();
    audit.audience = Some(lease.audience().to_string()).filter(|a| !a.is_empty());
    audit.details = lease.grant.audit();
    audit
        .details
        .insert("kind".into(), lease.kind().as_str().into());
    if lease.subject != actor.id && lease.client_id != actor.id && !actor.is_admin() {
        return Ok(Err(Error::PermissionDenied(format!(
            "lease {lease_id} belongs to another subject"
        ))));
    }
    match lease.state {
        LeaseState::Revoked { .. } => return Ok(Err(Error::LeaseRevoked(lease_id.to_string()))),
        LeaseState::Expired { .. } => return Ok(Err(Error::LeaseExpired(lease_id.to_string()))),
        LeaseState::Active if now >= lease.expires_at_ms => {
            return Ok(Err(Error::LeaseExpired(lease_id.to_string())))
        }
        LeaseState::Active => {}
    }
    if let Renewal::Reissue { how } = crate::kind::renewal_of(lease.kind()) {
        return Ok(Err(Error::NotRenewable {
            lease: lease_id.to_string(),
            how: how.to_string(),
        }));
    }
    if lease.expires_at_ms >= lease.max_expires_at_ms {
        return Ok(Err(Error::LeaseAtMaxLifetime(lease_id.to_string())));
    }
    if let Err(e) = check_quarantine(kv, [&actor.id, &lease.subject])? {
        return Ok(Err(e));
    }
    let stamp = match check_policy(kv, actor, &intent.policy, audit)? {
        Ok(stamp) => stamp,
        Err(e) => return Ok(Err(e)),
    };
    let Some(kid) = active_kid(kv)? else {
        return Ok(Err(Error::NoActiveSigningKey));
    };
    let increment = intent.increment_s.unwrap_or(lease.ttl_s);
    let increment = stamp.max_ttl_s.map_or(increment, |cap| increment.min(cap));
    // Never past the cap, never shorter than what the holder already has.
    let new_exp = (now + increment * 1000)
        .min(lease.max_expires_at_ms)
        .max(lease.expires_at_ms);
    kv.delete(deadline_key(lease.expires_at_ms, lease_id));
    kv.put(deadline_key(new_exp, lease_id), Vec::new());
    if kid != lease.kid {
        kv.delete(ix_key(PFX_KID_IX, &lease.kid, lease_id));
        kv.put(ix_key(PFX_KID_IX, &kid, lease_id), Vec::new());
        lease.kid = kid.clone();
    }
    note_key_use(kv, &key_key(&kid), new_exp)?;
    lease.minted_at_ms = now;
    lease.expires_at_ms = new_exp;
    lease.renew_after_ms = now + (new_exp - now) * u64::from(renew_after_permille) / 1000;
    lease.renewals += 1;
    store_lease(kv, &lease);
    audit.ttl_s = Some((new_exp - now) / 1000);
    Ok(Ok(Outcome::Lease {
        lease,
        replayed: false,
    }))
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

fn text_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn activate_policy<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, v: &PolicyVersion) {
    kv.put(policy_version_key(v.version), enc(v));
    kv.put(META_POLICY_VERSION.to_vec(), enc(&v.version));
}

/// Policy changes need an administrator's own identity: the system principal never proposes
/// or approves.
fn require_policy_admin(actor: &Principal) -> Result<(), Error> {
    require_admin(actor)?;
    if actor.auth_method == crate::types::AuthMethod::System {
        return Err(Error::PermissionDenied(
            "the system principal cannot change policy".into(),
        ));
    }
    Ok(())
}

fn propose_policy<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    proposal_id: &str,
    text: &str,
    comment: &Option<String>,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    let sha256 = text_hash(text);
    audit.target = Some(format!("policy-proposal:{proposal_id} sha256:{sha256}"));
    if let Err(e) = require_policy_admin(actor) {
        return Ok(Err(e));
    }
    if kv.get(&proposal_key(proposal_id))?.is_some() {
        return Ok(Err(Error::Internal(format!(
            "proposal id {proposal_id} collides"
        ))));
    }
    let governance: PolicyGovernance = get(kv, META_POLICY_GOVERNANCE)?.unwrap_or_default();
    let mut proposal = PolicyProposal {
        id: proposal_id.to_string(),
        text: text.to_string(),
        sha256,
        base_version: policy_version(kv)?,
        proposer: actor.id.clone(),
        comment: comment.clone(),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(governance.proposal_ttl_s.saturating_mul(1000)),
        approvals: Vec::new(),
        state: ProposalState::Pending,
    };
    if governance.approvals_required == 0 {
        activate_proposal(kv, &mut proposal, now, audit);
    }
    kv.put(proposal_key(proposal_id), enc(&proposal));
    Ok(Ok(Outcome::Proposal(proposal)))
}

fn activate_proposal<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    proposal: &mut PolicyProposal,
    now: u64,
    audit: &mut AuditRecord,
) {
    let version = proposal.base_version + 1;
    activate_policy(
        kv,
        &PolicyVersion {
            version,
            text: proposal.text.clone(),
            sha256: proposal.sha256.clone(),
            activated_at_ms: now,
            proposal_id: Some(proposal.id.clone()),
            proposer: proposal.proposer.clone(),
            approvers: proposal.approvals.clone(),
        },
    );
    proposal.state = ProposalState::Activated {
        version,
        at_ms: now,
    };
    audit.policy_version = Some(version);
}

fn approve_policy<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    proposal_id: &str,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("policy-proposal:{proposal_id}"));
    if let Err(e) = require_policy_admin(actor) {
        return Ok(Err(e));
    }
    let Some(mut proposal) = get::<PolicyProposal>(kv, &proposal_key(proposal_id))? else {
        return Ok(Err(Error::ProposalNotFound(proposal_id.to_string())));
    };
    audit.target = Some(format!(
        "policy-proposal:{proposal_id} sha256:{}",
        proposal.sha256
    ));
    match proposal.status(now) {
        "pending" => {}
        "expired" => return Ok(Err(Error::ProposalExpired(proposal.id))),
        state => {
            return Ok(Err(Error::ProposalNotPending {
                id: proposal.id.clone(),
                state: state.into(),
            }))
        }
    }
    if proposal.proposer == actor.id {
        return Ok(Err(Error::SelfApproval {
            id: proposal.id,
            approver: actor.id.clone(),
        }));
    }
    if proposal.approvals.contains(&actor.id) {
        return Ok(Err(Error::AlreadyApproved {
            id: proposal.id,
            approver: actor.id.clone(),
        }));
    }
    // A proposal replaces the whole set it was written against; activating it over a newer
    // version would silently undo that version's changes.
    let active = policy_version(kv)?;
    if proposal.base_version != active {
        return Ok(Err(Error::ProposalStale {
            id: proposal.id,
            base: proposal.base_version,
            active,
        }));
    }
    proposal.approvals.push(actor.id.clone());
    let governance: PolicyGovernance = get(kv, META_POLICY_GOVERNANCE)?.unwrap_or_default();
    if proposal.approvals.len() >= governance.approvals_required as usize {
        activate_proposal(kv, &mut proposal, now, audit);
    }
    kv.put(proposal_key(proposal_id), enc(&proposal));
    Ok(Ok(Outcome::Proposal(proposal)))
}

/// Audits a request that policy refused. A refused renewal revokes the lease when its role
/// says so, provided the refusal was decided under the active policy version.
fn policy_denied<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    denial: &PolicyDenial,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.outcome = "denied".into();
    audit.reason = Some(format!("policy_denied: {}", denial.reason));
    audit.role = denial.role.clone();
    audit.lease_id = denial.lease_id.clone();
    audit.policy_version = Some(denial.version);
    audit.policy_ids = denial.determining.clone();
    audit.target = Some(format!("action:{}", denial.action));
    audit_context(audit, &denial.context);
    let (Some(lease_id), "renew") = (&denial.lease_id, denial.action.as_str()) else {
        return Ok(Ok(Outcome::Done));
    };
    let Some(lease) = load_lease(kv, lease_id)? else {
        return Ok(Ok(Outcome::Done));
    };
    audit.subject = Some(lease.subject.clone());
    let owner = lease.subject == actor.id || lease.client_id == actor.id;
    let revoke_wanted = load_role(kv, &lease.role)?.is_some_and(|r| r.revoke_on_renewal_denied);
    if owner
        && revoke_wanted
        && lease.state == LeaseState::Active
        && denial.version == policy_version(kv)?
    {
        return revoke(kv, actor, now, &RevokeTarget::Lease(lease_id.clone()));
    }
    Ok(Ok(Outcome::Done))
}

fn revoke<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    target: &RevokeTarget,
) -> Result<ApplyResult, StorageError> {
    let state = LeaseState::Revoked {
        at_ms: now,
        by: actor.id.clone(),
    };
    let revoke_one = |kv: &mut Overlay<'_, R>, id: &str| -> Result<u64, StorageError> {
        match load_lease(kv, id)? {
            Some(lease) => revoke_lease(kv, &lease, &state),
            None => Ok(0),
        }
    };
    let (pfx, value) = match target {
        RevokeTarget::Lease(id) => {
            if kv.get(&lease_key(id))?.is_none() {
                return Ok(Err(Error::LeaseNotFound(id.clone())));
            }
            // Revoking an inactive lease is a no-op that succeeds: revocation is idempotent.
            let count = revoke_one(kv, id)?;
            return Ok(Ok(Outcome::Revoked { count }));
        }
        RevokeTarget::Subject(s) => (PFX_SUBJECT, s),
        RevokeTarget::Role(r) => (PFX_ROLE_IX, r),
        RevokeTarget::Key(kid) => {
            // A JWT signing key or an SSH CA key: either leaves publication, and everything it
            // signed is revoked.
            let (key, active) = if kv.get(&key_key(kid))?.is_some() {
                (key_key(kid), META_ACTIVE_KID)
            } else {
                (ssh_ca_key(kid), META_ACTIVE_SSH_CA)
            };
            let Some(mut rec) = get::<SigningKeyRecord>(kv, &key)? else {
                return Ok(Err(Error::KeyNotFound(kid.clone())));
            };
            rec.state = KeyState::Revoked { at_ms: now };
            kv.put(key, enc(&rec));
            if active == META_ACTIVE_SSH_CA {
                bump_krl_version(kv)?;
            }
            if get::<String>(kv, active)?.as_deref() == Some(kid.as_str()) {
                kv.delete(active.to_vec());
            }
            (PFX_KID_IX, kid)
        }
    };
    let prefix = ix_prefix(pfx, value);
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    let mut count = 0;
    loop {
        let page = kv.range(&start, &end, SCAN_PAGE)?;
        let Some((last, _)) = page.last() else { break };
        start = last.clone();
        start.push(0);
        for (k, _) in &page {
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            count += revoke_one(kv, &id)?;
        }
        if page.len() < SCAN_PAGE {
            break;
        }
    }
    Ok(Ok(Outcome::Revoked { count }))
}

/// Revokes one lease if it is active: its state, deadline entry, live counts, and the
/// revocation artefacts of its kind (a revoked SSH certificate enters the KRL). Returns 1 if it
/// was active.
fn revoke_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease: &Lease,
    state: &LeaseState,
) -> Result<u64, StorageError> {
    if lease.state != LeaseState::Active {
        return Ok(0);
    }
    let mut lease = lease.clone();
    kv.delete(deadline_key(lease.expires_at_ms, &lease.id));
    lease.state = state.clone();
    store_lease(kv, &lease);
    count_live(kv, &lease, false)?;
    if let Some((valid_before_s, serial)) = lease.grant.krl_entry() {
        kv.put(ssh_revoked_key(valid_before_s, serial), enc(&lease.kid));
        bump_krl_version(kv)?;
    }
    Ok(1)
}

fn bump_krl_version<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>) -> Result<(), StorageError> {
    let v: u64 = get(kv, META_KRL_VERSION)?.unwrap_or(0);
    kv.put(META_KRL_VERSION.to_vec(), enc(&(v + 1)));
    Ok(())
}

// ------------------------------------------------------------------------------------------
// queries
// ------------------------------------------------------------------------------------------

pub fn last_time(kv: &(impl KvRead + ?Sized)) -> Result<u64, StorageError> {
    Ok(get(kv, META_TIME)?.unwrap_or(0))
}

pub fn admin_credential_hash(kv: &(impl KvRead + ?Sized)) -> Result<Option<Vec<u8>>, StorageError> {
    kv.get(META_ADMIN_HASH)
}

pub fn issuer(kv: &(impl KvRead + ?Sized)) -> Result<Option<String>, StorageError> {
    get(kv, META_ISSUER)
}

/// The join token stored under `hash`, if any (a local pre-check; `apply` decides).
pub fn join_token(
    kv: &(impl KvRead + ?Sized),
    hash: &[u8],
) -> Result<Option<JoinToken>, StorageError> {
    get(kv, &join_token_key(hash))
}

pub fn cluster_ca(kv: &(impl KvRead + ?Sized)) -> Result<Option<ClusterCa>, StorageError> {
    get(kv, META_CA)
}

pub fn active_kid(kv: &(impl KvRead + ?Sized)) -> Result<Option<String>, StorageError> {
    get(kv, META_ACTIVE_KID)
}

/// The active policy set version (0 before `cluster init`).
pub fn policy_version(kv: &(impl KvRead + ?Sized)) -> Result<u64, StorageError> {
    Ok(get(kv, META_POLICY_VERSION)?.unwrap_or(0))
}

pub fn policy_at(
    kv: &(impl KvRead + ?Sized),
    version: u64,
) -> Result<Option<PolicyVersion>, StorageError> {
    get(kv, &policy_version_key(version))
}

/// Every committed version, oldest first.
pub fn policy_history(kv: &(impl KvRead + ?Sized)) -> Result<Vec<PolicyVersion>, StorageError> {
    scan_values(kv, PFX_POLICY_VERSION.as_bytes(), usize::MAX)
}

pub fn policy_proposal(
    kv: &(impl KvRead + ?Sized),
    id: &str,
) -> Result<Option<PolicyProposal>, StorageError> {
    get(kv, &proposal_key(id))
}

pub fn policy_proposals(kv: &(impl KvRead + ?Sized)) -> Result<Vec<PolicyProposal>, StorageError> {
    scan_values(kv, PFX_PROPOSAL.as_bytes(), usize::MAX)
}

pub fn policy_governance(kv: &(impl KvRead + ?Sized)) -> Result<PolicyGovernance, StorageError> {
    Ok(get(kv, META_POLICY_GOVERNANCE)?.unwrap_or_default())
}

/// A role by name (the built-in SVID role when `x509-svid` is not defined).
pub fn get_role(kv: &(impl KvRead + ?Sized), name: &str) -> Result<Option<Role>, StorageError> {
    load_role(kv, name)
}

/// Every defined role, by name.
pub fn list_roles(kv: &(impl KvRead + ?Sized)) -> Result<Vec<Role>, StorageError> {
    let pfx = PFX_ROLE.as_bytes();
    kv.range(pfx, &prefix_end(pfx), usize::MAX)?
        .into_iter()
        .map(|(k, v)| crate::legacy::decode(&k, &v, crate::legacy::role_from_v1))
        .collect()
}

pub fn get_lease(kv: &(impl KvRead + ?Sized), id: &str) -> Result<Option<Lease>, StorageError> {
    load_lease(kv, id)
}

pub fn active_ssh_ca(kv: &(impl KvRead + ?Sized)) -> Result<Option<String>, StorageError> {
    get(kv, META_ACTIVE_SSH_CA)
}

pub fn get_ssh_ca(
    kv: &(impl KvRead + ?Sized),
    kid: &str,
) -> Result<Option<SigningKeyRecord>, StorageError> {
    get(kv, &ssh_ca_key(kid))
}

/// Every SSH CA key, oldest id order.
pub fn list_ssh_cas(kv: &(impl KvRead + ?Sized)) -> Result<Vec<SigningKeyRecord>, StorageError> {
    scan_values(kv, PFX_SSH_CA.as_bytes(), usize::MAX)
}

/// The SSH CA keys `sshd` should trust now (active, or retiring with certificates still
/// valid), by the state's own clock: the same answer on every node at the same index.
pub fn published_ssh_cas(
    kv: &(impl KvRead + ?Sized),
) -> Result<Vec<SigningKeyRecord>, StorageError> {
    let now = last_time(kv)?;
    Ok(list_ssh_cas(kv)?
        .into_iter()
        .filter(|k| k.is_published_at(now, KEY_PUBLISH_GRACE_MS))
        .collect())
}

/// The content of the OpenSSH KRL at this state: a pure function of the replicated state, so
/// every node serves the same bytes at the same applied index. `krl_version` counts the changes
/// of its content; the date is the state's clock. Revoked certificates leave it when the
/// leader's expiry round passes their `valid_before`; the certificates of a revoked CA key are
/// left out, since the CA key itself is listed.
pub fn ssh_krl(kv: &(impl KvRead + ?Sized)) -> Result<crate::kind::krl::Krl, StorageError> {
    let now = last_time(kv)?;
    let cas = list_ssh_cas(kv)?;
    let blob_of = |kid: &str| {
        cas.iter()
            .find(|k| k.kid == kid)
            .map(|k| crate::kind::ssh::ed25519_public_blob(&k.public_key))
    };
    let mut by_ca: std::collections::BTreeMap<Vec<u8>, Vec<u64>> = Default::default();
    let end = prefix_end(PFX_SSH_REVOKED.as_bytes());
    let mut from = PFX_SSH_REVOKED.as_bytes().to_vec();
    loop {
        let page = kv.range(&from, &end, SCAN_PAGE)?;
        for (k, v) in &page {
            let kid: String = dec(k, v)?;
            let serial = std::str::from_utf8(&k[k.len() - 16..])
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| StorageError("corrupt KRL index key".into()))?;
            if let Some(blob) = blob_of(&kid) {
                by_ca.entry(blob).or_default().push(serial);
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == SCAN_PAGE => {
                from = k.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    let revoked_cas: Vec<Vec<u8>> = cas
        .iter()
        .filter(|k| matches!(k.state, KeyState::Revoked { .. }))
        .map(|k| crate::kind::ssh::ed25519_public_blob(&k.public_key))
        .collect();
    for blob in &revoked_cas {
        by_ca.remove(blob);
    }
    Ok(crate::kind::krl::Krl {
        version: get(kv, META_KRL_VERSION)?.unwrap_or(0),
        generated_s: now / 1000,
        certificates: by_ca
            .into_iter()
            .map(|(ca, mut serials)| {
                serials.sort_unstable();
                serials.dedup();
                (ca, serials)
            })
            .collect(),
        revoked_keys: revoked_cas,
    })
}

pub fn get_key(
    kv: &(impl KvRead + ?Sized),
    kid: &str,
) -> Result<Option<SigningKeyRecord>, StorageError> {
    get(kv, &key_key(kid))
}

pub fn list_keys(kv: &(impl KvRead + ?Sized)) -> Result<Vec<SigningKeyRecord>, StorageError> {
    scan_values(kv, PFX_KEY.as_bytes(), usize::MAX)
}

fn scan_values<T: DeserializeOwned>(
    kv: &(impl KvRead + ?Sized),
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<T>, StorageError> {
    kv.range(prefix, &prefix_end(prefix), limit)?
        .into_iter()
        .map(|(k, v)| dec(&k, &v))
        .collect()
}

/// The earliest deadline the leader's expiry round must act on: an active lease's, or a
/// revoked SSH certificate's `valid_before` (it then leaves the KRL).
pub fn next_deadline(kv: &(impl KvRead + ?Sized)) -> Result<Option<u64>, StorageError> {
    let head = |pfx: &str| -> Result<Option<u64>, StorageError> {
        let first = kv.range(pfx.as_bytes(), &prefix_end(pfx.as_bytes()), 1)?;
        Ok(first.first().and_then(|(k, _)| {
            let hex = std::str::from_utf8(k.get(pfx.len()..pfx.len() + 16)?).ok()?;
            u64::from_str_radix(hex, 16).ok()
        }))
    };
    let leases = head(PFX_DEADLINE)?;
    // A certificate is dead from its valid_before second on; the round after that second
    // removes it.
    let krl = head(PFX_SSH_REVOKED)?.map(|s| s.saturating_add(1).saturating_mul(1000));
    Ok(match (leases, krl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    pub subject: Option<String>,
    pub role: Option<String>,
    /// `active`, `revoked` or `expired`.
    pub state: Option<String>,
}

/// One page of leases in lease-id order. `after` is the previous page's last id. Returns the
/// page and the token of the next page, if there may be more.
pub fn list_leases(
    kv: &(impl KvRead + ?Sized),
    filter: &LeaseFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Lease>, Option<String>), StorageError> {
    let limit = limit.clamp(1, 1000);
    let prefix = match (&filter.subject, &filter.role) {
        (Some(s), _) => ix_prefix(PFX_SUBJECT, s),
        (None, Some(r)) => ix_prefix(PFX_ROLE_IX, r),
        (None, None) => PFX_LEASE.as_bytes().to_vec(),
    };
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    if let Some(a) = after {
        start.extend_from_slice(a.as_bytes());
        start.push(0);
    }
    let mut out = Vec::new();
    // Bounded work per call: a selective filter returns a short page and a token to continue.
    let mut budget = 50 * limit;
    loop {
        let page = kv.range(&start, &end, limit.min(budget))?;
        let Some((last, _)) = page.last() else {
            return Ok((out, None));
        };
        start = last.clone();
        start.push(0);
        let page_len = page.len();
        budget = budget.saturating_sub(page_len);
        for (k, _) in page {
            let id = std::str::from_utf8(&k[prefix.len()..]).unwrap_or_default();
            let Some(lease) = get_lease(kv, id)? else {
                continue;
            };
            if filter.role.as_ref().is_some_and(|r| *r != lease.role)
                || filter
                    .state
                    .as_ref()
                    .is_some_and(|s| s != lease.state.name())
            {
                continue;
            }
            out.push(lease);
            if out.len() == limit {
                return Ok((out, Some(id.to_string())));
            }
        }
        if page_len < limit {
            return Ok((out, None));
        }
        if budget == 0 {
            let token = String::from_utf8_lossy(&start[prefix.len()..start.len() - 1]).into_owned();
            return Ok((out, Some(token)));
        }
    }
}

/// `(sequence number, hash)` of the newest audit record.
pub fn audit_head(kv: &(impl KvRead + ?Sized)) -> Result<(u64, String), StorageError> {
    let head: Option<AuditHead> = get(kv, META_AUDIT_HEAD)?;
    Ok(head.map_or((0, GENESIS_HASH.to_string()), |h| (h.seq, h.hash)))
}

/// Audit records with `seq >= from_seq`, oldest first.
pub fn audit_records(
    kv: &(impl KvRead + ?Sized),
    from_seq: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StorageError> {
    kv.range(
        &audit_key(from_seq.max(1)),
        &prefix_end(PFX_AUDIT.as_bytes()),
        limit,
    )?
    .into_iter()
    .map(|(k, v)| {
        serde_json::from_slice(&v).map_err(|e| {
            StorageError(format!(
                "corrupt audit record {}: {e}",
                String::from_utf8_lossy(&k)
            ))
        })
    })
    .collect()
}

/// SHA-256 over every domain key and value, in key order. Equal on nodes that applied the same log.
pub fn state_digest(kv: &(impl KvRead + ?Sized)) -> Result<String, StorageError> {
    let mut h = Sha256::new();
    for pfx in STATE_PREFIXES {
        let end = prefix_end(pfx.as_bytes());
        let mut start = pfx.as_bytes().to_vec();
        loop {
            let page = kv.range(&start, &end, 10_000)?;
            for (k, v) in &page {
                h.update((k.len() as u64).to_le_bytes());
                h.update(k);
                h.update((v.len() as u64).to_le_bytes());
                h.update(v);
            }
            match page.last() {
                Some((k, _)) if page.len() == 10_000 => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}
