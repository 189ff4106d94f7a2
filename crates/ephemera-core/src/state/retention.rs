//! Retention: what the state forgets, and when. Dead leases, idempotency records, consumed
//! assertion ids, join tokens and policy proposals would otherwise be kept forever. Each is
//! entered, when it is written or dies, in a retention index ordered by the time from which it
//! is of no further use: `ix/ret/{kind}/{t_ms:016x}/{key}`. The leader proposes a `Compact`
//! command when the head of an index is older than the retention (the durations travel in the
//! command, so every node removes the same keys), and `apply` removes at most `limit` entries
//! per command, oldest first. The audit chain is not compacted here: it keeps every record.
//!
//! The times are chosen so that forgetting never changes an answer: a lease is forgettable
//! only once its credential has expired (an SVID or SSH certificate of a revoked lease is
//! refused by its lease record until then), an assertion id and a join token only once they
//! have expired (they are refused for that alone afterwards).

use super::*;
use crate::command::Retention;

const PFX_RETAIN: &str = "ix/ret/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    Lease,
    Request,
    JoinToken,
    Assertion,
    Proposal,
    /// An entry of the revocation log (kept as long as a dead lease).
    Revocation,
}

impl Kept {
    const ALL: [Kept; 6] = [
        Kept::Lease,
        Kept::Request,
        Kept::JoinToken,
        Kept::Assertion,
        Kept::Proposal,
        Kept::Revocation,
    ];

    fn tag(self) -> &'static str {
        match self {
            Kept::Lease => "lease/",
            Kept::Request => "req/",
            Kept::JoinToken => "jt/",
            Kept::Assertion => "aj/",
            Kept::Proposal => "pp/",
            Kept::Revocation => "rv/",
        }
    }

    fn retention_ms(self, r: &Retention) -> u64 {
        let s = match self {
            Kept::Lease | Kept::Revocation => r.dead_lease_s,
            Kept::Request => r.request_s,
            Kept::JoinToken => r.join_token_s,
            Kept::Assertion => r.assertion_s,
            Kept::Proposal => r.proposal_s,
        };
        s.saturating_mul(1000)
    }

    fn prefix(self) -> Vec<u8> {
        format!("{PFX_RETAIN}{}", self.tag()).into_bytes()
    }

    /// Entries of this kind forgettable before `now` (exclusive end of the range).
    fn cutoff(self, now: u64, r: &Retention) -> Vec<u8> {
        let t = now.saturating_sub(self.retention_ms(r));
        format!("{PFX_RETAIN}{}{t:016x}", self.tag()).into_bytes()
    }
}

/// Enters `key` in the retention index of `kind`, forgettable from `t_ms` plus the retention.
pub(super) fn keep_until<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    kind: Kept,
    t_ms: u64,
    key: &[u8],
) {
    let mut k = format!("{PFX_RETAIN}{}{t_ms:016x}/", kind.tag()).into_bytes();
    k.extend_from_slice(key);
    kv.put(k, Vec::new());
}

/// A dead lease is forgettable once its credential has expired too.
pub(super) fn keep_dead_lease<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, lease: &Lease) {
    let died_at = match &lease.state {
        LeaseState::Revoked { at_ms, .. } | LeaseState::Expired { at_ms } => *at_ms,
        LeaseState::Active => return,
    };
    keep_until(
        kv,
        Kept::Lease,
        died_at.max(lease.expires_at_ms),
        &lease_key(&lease.id),
    );
}

/// Whether anything is due for compaction at `now` (the leader's check; reads index heads).
pub fn compaction_due(
    kv: &(impl KvRead + ?Sized),
    now: u64,
    retention: &Retention,
) -> Result<bool, StorageError> {
    for kind in Kept::ALL {
        if !kv
            .range(&kind.prefix(), &kind.cutoff(now, retention), 1)?
            .is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes up to `limit` forgettable entries, oldest first within each kind.
pub(super) fn compact<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    retention: &Retention,
    limit: u32,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    let mut left = limit as usize;
    let mut removed = 0u64;
    let mut counts = std::collections::BTreeMap::new();
    for kind in Kept::ALL {
        if left == 0 {
            break;
        }
        let prefix = kind.prefix();
        let due = kv.range(&prefix, &kind.cutoff(now, retention), left)?;
        left -= due.len();
        for (index_key, _) in due {
            // `{t:016x}/` then the key it keeps.
            let target = index_key
                .get(prefix.len() + 17..)
                .ok_or_else(|| StorageError("corrupt retention index key".into()))?
                .to_vec();
            kv.delete(index_key);
            if kind == Kept::Lease {
                forget_lease(kv, now, &target)?;
            } else {
                kv.delete(target);
            }
            removed += 1;
            *counts
                .entry(kind.tag().trim_end_matches('/'))
                .or_insert(0u64) += 1;
        }
    }
    for (tag, n) in counts {
        audit
            .details
            .insert(format!("removed_{tag}"), n.to_string());
    }
    Ok(Ok(Outcome::Compacted { count: removed }))
}

/// Removes a dead lease and every index entry that names it.
fn forget_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    key: &[u8],
) -> Result<(), StorageError> {
    let id = std::str::from_utf8(&key[PFX_LEASE.len()..])
        .map_err(|_| StorageError("corrupt lease key in the retention index".into()))?;
    let Some(lease) = load_lease(kv, id)? else {
        return Ok(());
    };
    // Only the dead are forgotten (an index entry naming a live lease would be a bug
    // upstream; the lease is kept, and only the entry goes).
    if lease.state == LeaseState::Active {
        return Ok(());
    }
    // A login outside the cluster that is still being dropped keeps its lease (the executor
    // needs the grant, and operators the history) for another retention period.
    if lease.grant.external_target().is_some() {
        if effects::effects_of_lease(kv, id)?
            .iter()
            .any(|e| e.status == effects::EffectStatus::Pending)
        {
            keep_until(kv, Kept::Lease, now, key);
            return Ok(());
        }
        effects::forget_lease(kv, id)?;
    }
    delegation::forget(kv, id)?;
    kv.delete(key.to_vec());
    kv.delete(deadline_key(lease.expires_at_ms, id));
    kv.delete(ix_key(PFX_SUBJECT, &lease.subject, id));
    kv.delete(ix_key(PFX_ROLE_IX, &lease.role, id));
    if !lease.kid.is_empty() {
        kv.delete(ix_key(PFX_KID_IX, &lease.kid, id));
    }
    Ok(())
}
