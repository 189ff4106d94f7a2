//! Derived credentials (RFC 8693 token exchange): a token exchanged from a subject token the
//! cluster issued is a child lease of that token's lease, narrowed, and revoked with it. A token
//! exchanged from an OIDC issuer's assertion is narrowed to it the same way (subject, expiry,
//! scopes when it has them) but has no parent: the assertion lives outside the cluster.
//!
//! The problem: a delegated token is only as trustworthy as the chain it came from. If revoking
//! a CI job's token left the tokens it exchanged for its tools alive, revocation would stop at
//! the first hop; if a re-exchange could drop or rewrite the actor chain (keycloak#52691),
//! nobody could tell who acted.
//!
//! The mechanism:
//! - `apply` checks, at the entry that creates the child, what the receiving node checked when
//!   it verified the subject token: the parent lease is an access token and active *now* (a
//!   revocation committed first wins), the child's scopes are a subset of the parent's, its
//!   expiry and cap are no later than the parent's expiry, and the chain is no deeper than
//!   allowed. The child's subject is the parent's.
//! - The child's [`Delegation`] keeps the actor chain, newest actor first: this hop's actor (if
//!   one was presented) followed by the parent's whole chain, so a chain can only grow, and a
//!   token that carries `act` never yields one without it.
//! - `ix/parent/{parent}\0{child}` indexes children; revoking a lease revokes its descendants in
//!   the same entry, however many ([`revoke_descendants`]).
//!
//! The invariant: no active lease has a parent that is not active (a parent is revoked with its
//! descendants, and a child expires no later than its parent).

use super::*;
use crate::command::{ExchangeIntent, ExchangeSubject};
use crate::kind::{Grant, KindRequest};

/// `ix/parent/{parent}\0{child}`.
const PFX_PARENT_IX: &str = "ix/parent/";
/// `dg/{lease_id}` → [`Delegation`].
const PFX_DELEGATION: &str = "dg/";
/// The deepest chain `apply` accepts, whatever a node's configuration says: hops of exchange
/// from a token the cluster issued (with or without an actor), so that cascades and chains stay
/// bounded.
pub const MAX_DELEGATION_DEPTH: u32 = 16;
/// The most bytes of actor identities one chain may carry (its tokens must stay well under
/// `token::MAX_TOKEN_LEN` once base64-encoded with the rest of the claims).
pub const MAX_ACT_BYTES: usize = 2048;

/// How a derived lease came to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The subject token's lease; `None` for a token exchanged from an OIDC assertion.
    pub parent: Option<String>,
    /// The actors, newest first (`act.sub`, then `act.act.sub`, ...).
    pub act: Vec<String>,
    /// Exchanges between the original token and this one (1 for a direct child).
    pub hops: u32,
}

fn delegation_key(lease_id: &str) -> Vec<u8> {
    format!("{PFX_DELEGATION}{lease_id}").into_bytes()
}

/// The delegation of a derived lease; `None` for a lease issued directly.
pub fn delegation(
    kv: &(impl KvRead + ?Sized),
    lease_id: &str,
) -> Result<Option<Delegation>, StorageError> {
    get(kv, &delegation_key(lease_id))
}

/// The direct children of `lease_id`, in id order.
pub fn children(kv: &(impl KvRead + ?Sized), lease_id: &str) -> Result<Vec<String>, StorageError> {
    ids_under(kv, PFX_PARENT_IX, lease_id)
}

/// What `issue` needs to know of an exchange: whom the new token is for, how long it may live
/// at most, and its chain (with its parent, if any).
pub(super) struct Derived {
    pub subject: String,
    /// The subject token's expiry: the new token's expiry and cap are no later.
    pub expires_at_ms: u64,
    pub delegation: Delegation,
}

impl Derived {
    /// Part of the idempotency fingerprint: the same request id for another subject token or
    /// actor is another request.
    pub fn fingerprint_part(&self) -> String {
        format!(
            "\0exchange\0{}\0{}\0{}",
            self.delegation.parent.as_deref().unwrap_or(""),
            self.expires_at_ms,
            self.delegation.act.join("\0")
        )
    }
}

/// Records a new derived lease's delegation and parent index (in `issue`'s batch).
pub(super) fn record<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, child: &str, d: &Delegation) {
    if let Some(parent) = &d.parent {
        kv.put(ix_key(PFX_PARENT_IX, parent, child), Vec::new());
    }
    kv.put(delegation_key(child), enc(d));
}

/// Forgets a dead lease's delegation (retention, with the lease).
pub(super) fn forget<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease_id: &str,
) -> Result<(), StorageError> {
    if let Some(d) = delegation(kv, lease_id)? {
        if let Some(parent) = &d.parent {
            kv.delete(ix_key(PFX_PARENT_IX, parent, lease_id));
        }
        kv.delete(delegation_key(lease_id));
    }
    Ok(())
}

/// Revokes every active descendant of `lease_id` (which was just revoked) with `state`; how
/// many. A dead descendant's own descendants are dead already (revoked with it, or expired no
/// later than it), so the walk stops there.
pub(super) fn revoke_descendants<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    lease_id: &str,
    state: &LeaseState,
) -> Result<u64, StorageError> {
    let mut count = 0;
    let mut todo = vec![lease_id.to_string()];
    while let Some(id) = todo.pop() {
        for child in children(kv, &id)? {
            let Some(lease) = load_lease(kv, &child)? else {
                continue;
            };
            if revoke_one_lease(kv, now, &lease, state)? == 1 {
                count += 1;
                todo.push(child);
            }
        }
    }
    Ok(count)
}

/// What an exchange derives from: the subject token's subject, expiry, scopes (when it bounds
/// them) and earlier delegation, or the reason it is refused.
struct Source {
    subject: String,
    expires_at_ms: u64,
    scopes: Option<Vec<String>>,
    parent: Option<String>,
    before: Option<Delegation>,
}

fn source<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    subject: &ExchangeSubject,
) -> Result<Result<Source, Error>, StorageError> {
    let refused = |why: String| Ok(Err(Error::SubjectTokenRefused(why)));
    match subject {
        ExchangeSubject::Lease(id) => {
            let Some(parent) = load_lease(kv, id)? else {
                return refused(format!("its lease {id} does not exist"));
            };
            if !parent.is_active_at(now) {
                let state = match parent.state {
                    LeaseState::Active => "expired",
                    ref s => s.name(),
                };
                return refused(format!("its lease {} is {state}", parent.id));
            }
            let Grant::Jwt(parent_grant) = &parent.grant else {
                return refused(format!("lease {} is not an access token", parent.id));
            };
            Ok(Ok(Source {
                scopes: Some(parent_grant.scopes.clone()),
                before: delegation(kv, &parent.id)?,
                subject: parent.subject,
                expires_at_ms: parent.expires_at_ms,
                parent: Some(parent.id),
            }))
        }
        // Verified by the receiving node; only its expiry, and a replay, can have happened since.
        ExchangeSubject::Assertion(a) if a.expires_at_ms <= now => refused("it has expired".into()),
        ExchangeSubject::Assertion(a) => {
            if let Some(jti) = &a.jti {
                // Discarded with the rest of the entry's writes if the exchange is refused.
                if !consume_assertion(kv, now, &a.issuer, jti, a.replay_until_ms)? {
                    return refused("it was already used (its jti was consumed)".into());
                }
            }
            Ok(Ok(Source {
                subject: a.subject.clone(),
                expires_at_ms: a.expires_at_ms,
                scopes: a.scopes.clone(),
                parent: None,
                before: None,
            }))
        }
    }
}

/// `Op::Exchange`: a narrowed token from a subject token, as its lease's child when it has one.
pub(super) fn exchange<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    x: &ExchangeIntent,
    stamp: (&str, u16, &KindStamp),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    match &x.subject {
        ExchangeSubject::Lease(id) => audit.details.insert("parent".into(), id.clone()),
        ExchangeSubject::Assertion(a) => audit
            .details
            .insert("subject_assertion".into(), a.subject.clone()),
    };
    let src = match source(kv, now, &x.subject)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let KindRequest::Jwt(request) = &x.issue.request else {
        return Ok(Err(Error::InvalidArgument(
            "an exchange issues an access token".into(),
        )));
    };
    if let Some(bound) = &src.scopes {
        if let Some(s) = request.scopes.iter().find(|s| !bound.contains(s)) {
            return Ok(Err(Error::ScopeNotInSubjectToken { scope: s.clone() }));
        }
    }
    let before = src.before;
    let mut act: Vec<String> = x.actor.iter().cloned().collect();
    act.extend(before.as_ref().map(|d| d.act.clone()).unwrap_or_default());
    let hops = before.map_or(1, |d| d.hops + 1);
    // The chain travels in every token of it: bounded, so a token stays under the size the
    // cluster itself parses (`token::MAX_TOKEN_LEN`).
    if act.iter().map(|a| a.len() + 16).sum::<usize>() > MAX_ACT_BYTES {
        return Ok(Err(Error::InvalidArgument(format!(
            "the actor chain would exceed {MAX_ACT_BYTES} bytes"
        ))));
    }
    // Each exchange adds at most one actor, so the hops bound the chain too.
    let max = x.max_depth.min(MAX_DELEGATION_DEPTH);
    if hops > max {
        return Ok(Err(Error::DelegationTooDeep { depth: hops, max }));
    }
    if !act.is_empty() {
        audit.details.insert("act".into(), act.join(" "));
    }
    let derived = Derived {
        subject: src.subject,
        expires_at_ms: src.expires_at_ms,
        delegation: Delegation {
            parent: src.parent,
            act,
            hops,
        },
    };
    issue(kv, actor, now, &x.issue, stamp, audit, Some(&derived))
}
