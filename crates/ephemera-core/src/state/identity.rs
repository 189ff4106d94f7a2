//! Identity state: join tokens, quarantines and the guardrail events that set them.

use super::*;

/// Consumes a join token in the log's order: of two concurrent redemptions exactly one wins.
pub(super) fn consume_join_token<R: KvRead + ?Sized>(
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
pub(super) fn check_quarantine<R: KvRead + ?Sized>(
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
pub(super) fn guard_event<R: KvRead + ?Sized>(
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
