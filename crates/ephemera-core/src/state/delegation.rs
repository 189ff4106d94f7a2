//! Derived credentials (RFC 8693 token exchange): a token exchanged from a subject token the
//! cluster issued is a child lease of that token's lease, narrowed, and revoked with it.
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
use crate::command::ExchangeIntent;
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
    pub parent: String,
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

/// What `issue` needs to know of an exchange: the parent, and the child's chain.
pub(super) struct Derived<'a> {
    pub parent: &'a Lease,
    pub delegation: Delegation,
}

impl Derived<'_> {
    /// Part of the idempotency fingerprint: the same request id for another parent or actor is
    /// another request.
    pub fn fingerprint_part(&self) -> String {
        format!(
            "\0exchange\0{}\0{}",
            self.parent.id,
            self.delegation.act.join("\0")
        )
    }
}

/// Records a new derived lease's delegation and parent index (in `issue`'s batch).
pub(super) fn record<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, child: &str, d: &Delegation) {
    kv.put(ix_key(PFX_PARENT_IX, &d.parent, child), Vec::new());
    kv.put(delegation_key(child), enc(d));
}

/// Forgets a dead lease's delegation (retention, with the lease).
pub(super) fn forget<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease_id: &str,
) -> Result<(), StorageError> {
    if let Some(d) = delegation(kv, lease_id)? {
        kv.delete(ix_key(PFX_PARENT_IX, &d.parent, lease_id));
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

/// `Op::Exchange`: a narrowed token from a subject token's lease, as its child.
pub(super) fn exchange<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    x: &ExchangeIntent,
    stamp: (&str, u16, &KindStamp),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit
        .details
        .insert("parent".into(), x.parent_lease.clone());
    let refused = |why: String| Ok(Err(Error::SubjectTokenRefused(why)));
    let Some(parent) = load_lease(kv, &x.parent_lease)? else {
        return refused(format!("its lease {} does not exist", x.parent_lease));
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
    let KindRequest::Jwt(request) = &x.issue.request else {
        return Ok(Err(Error::InvalidArgument(
            "an exchange issues an access token".into(),
        )));
    };
    if let Some(s) = request
        .scopes
        .iter()
        .find(|s| !parent_grant.scopes.contains(s))
    {
        return Ok(Err(Error::ScopeNotInSubjectToken { scope: s.clone() }));
    }
    let before = delegation(kv, &parent.id)?;
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
        parent: &parent,
        delegation: Delegation {
            parent: parent.id.clone(),
            act,
            hops,
        },
    };
    issue(kv, actor, now, &x.issue, stamp, audit, Some(&derived))
}
