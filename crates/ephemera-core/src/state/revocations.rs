//! The revocation log: every revocation (a lease revoked, a signing key retired early) in commit
//! order, numbered, so that a verifier that checks tokens offline can follow it from any node
//! and resume where it stopped (`WatchRevocations`).
//!
//! One entry per revoked lease or key, `rv/{seq:016x}`, written in the batch that revokes it;
//! every node applies the same log, so the numbers are the same on every node. An entry is
//! forgettable (retention, as a dead lease) once the credential it revokes has expired: a
//! verifier that missed it would refuse that credential for its expiry anyway.

use super::*;
use crate::state::retention::{keep_until, Kept};

const PFX_REVOCATION: &str = "rv/";
const META_REVOCATION_SEQ: &[u8] = b"meta/revocation_seq";

/// What was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Revoked {
    /// A lease: its credential is refused from now on; `expires_at_ms` is when it would have
    /// expired anyway.
    Lease { id: String, expires_at_ms: u64 },
    /// A signing key (JWT or SSH CA) retired early: everything it signed is refused.
    Key { kid: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// 1, 2, 3... in commit order, the same on every node.
    pub seq: u64,
    pub at_ms: u64,
    pub what: Revoked,
}

fn revocation_key(seq: u64) -> Vec<u8> {
    format!("{PFX_REVOCATION}{seq:016x}").into_bytes()
}

/// Appends a revocation (in the batch that revokes), forgettable from `useful_until_ms`.
pub(super) fn record<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    what: Revoked,
    useful_until_ms: u64,
) -> Result<(), StorageError> {
    let seq = get::<u64>(kv, META_REVOCATION_SEQ)?.unwrap_or(0) + 1;
    kv.put(META_REVOCATION_SEQ.to_vec(), enc(&seq));
    let key = revocation_key(seq);
    keep_until(kv, Kept::Revocation, useful_until_ms.max(now), &key);
    kv.put(
        key,
        enc(&Revocation {
            seq,
            at_ms: now,
            what,
        }),
    );
    Ok(())
}

/// The number of the latest revocation (0 before the first).
pub fn last_revocation_seq(kv: &(impl KvRead + ?Sized)) -> Result<u64, StorageError> {
    Ok(get::<u64>(kv, META_REVOCATION_SEQ)?.unwrap_or(0))
}

/// At most `limit` revocations numbered above `after`, in order (those forgotten by retention
/// are skipped: their credentials have expired).
pub fn revocations_after(
    kv: &(impl KvRead + ?Sized),
    after: u64,
    limit: usize,
) -> Result<Vec<Revocation>, StorageError> {
    let start = revocation_key(after.saturating_add(1));
    let end = prefix_end(PFX_REVOCATION.as_bytes());
    kv.range(&start, &end, limit)?
        .into_iter()
        .map(|(k, v)| dec(&k, &v))
        .collect()
}
