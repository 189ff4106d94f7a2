//! Leases of every kind: issue through the one pipeline, renew, revoke (with the kinds' revocation
//! artefacts), live counts and key use.

use super::*;

/// Kind-specific facts of a role or grant for its audit record.
pub(super) fn kind_details(
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
pub(super) fn resolve_signer<R: KvRead + ?Sized>(
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
        SignerKind::None => Signer {
            kid: String::new(),
            trust_domain: None,
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

/// Issues a credential of any kind: the same checks in the same order for every kind, with
/// the kind deciding only what its grant holds.
pub(super) fn issue<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    intent: &IssueIntent,
    (lease_id, renew_after_permille, kind_stamp): (&str, u16, &KindStamp),
    audit: &mut AuditRecord,
    derived: Option<&delegation::Derived>,
) -> Result<ApplyResult, StorageError> {
    audit.role = Some(intent.role.clone());
    audit.ttl_s = intent.ttl_s;
    let asked = intent.request.asked();
    audit.scopes = asked.scopes.to_vec();
    audit.audience = asked.audience.map(str::to_string);
    // A refused request's record names what was asked for (replaced by the grant's on success).
    if !asked.principals.is_empty() {
        audit
            .details
            .insert("principals".into(), asked.principals.join(","));
    }
    // An exchanged token's subject is its subject token's, whoever presents it (possession of
    // the subject token, and the policy, decide).
    let subject = match derived {
        Some(d) => d.subject.clone(),
        None => intent.subject.clone().unwrap_or_else(|| actor.id.clone()),
    };
    audit.subject = Some(subject.clone());
    audit_context(audit, &intent.context);
    if let (Some(d), Some(asked)) = (derived, &intent.subject) {
        if *asked != d.subject {
            return Ok(Err(Error::InvalidArgument(format!(
                "an exchanged token's subject is its subject token's ({})",
                d.subject
            ))));
        }
    }
    if derived.is_none() && subject != actor.id && !actor.is_admin() {
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
    let fp = match derived {
        Some(d) => fingerprint(intent, &format!("{subject}{}", d.fingerprint_part())),
        None => fingerprint(intent, &subject),
    };
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
    // A derived token never outlives the token it came from.
    let expires_at_ms = derived.map_or(now + ttl_s * 1000, |d| {
        (now + ttl_s * 1000).min(d.expires_at_ms)
    });
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
    if let crate::kind::Grant::Postgres(g) = &grant {
        if db_connection(kv, &g.connection)?.is_none() {
            return Ok(Err(Error::UnknownConnection(g.connection.clone())));
        }
    }
    // A certificate cannot be extended: its lease ends with it.
    let max_expires_at_ms = match (role.spec.renewal(), derived) {
        (Renewal::Extend, None) => now + role.max_ttl_s * 1000,
        (Renewal::Extend, Some(d)) => (now + role.max_ttl_s * 1000).min(d.expires_at_ms),
        (Renewal::Reissue { .. }, _) => expires_at_ms,
    };
    let lease = Lease {
        id: lease_id.to_string(),
        role: role.name.clone(),
        subject: subject.clone(),
        client_id: actor.id.clone(),
        purpose: intent.purpose.clone(),
        parent: derived.and_then(|d| d.delegation.parent.clone()),
        ttl_s,
        issued_at_ms: now,
        minted_at_ms: now,
        expires_at_ms,
        max_expires_at_ms,
        renew_after_ms: now + (expires_at_ms - now) * u64::from(renew_after_permille) / 1000,
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
                    now,
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
    if let Some(d) = derived {
        delegation::record(kv, lease_id, &d.delegation);
    }
    if let Some(target) = lease.grant.external_target() {
        effects::record(
            kv,
            now,
            lease_id,
            &target,
            effects::EffectAction::Create {
                valid_until_ms: expires_at_ms,
            },
        )?;
    }
    match signer_kind {
        SignerKind::JwtKey => note_key_use(kv, &key_key(&lease.kid), expires_at_ms)?,
        SignerKind::SshCa => {
            note_key_use(kv, &ssh_ca_key(&lease.kid), expires_at_ms)?;
            kv.put(META_SSH_SERIAL.to_vec(), enc(&signer.serial));
        }
        SignerKind::ClusterCa | SignerKind::None => {}
    }
    if let Some(request_id) = &intent.request_id {
        keep_until(kv, Kept::Request, now, &req_key(&actor.id, request_id));
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
    if let Some(d) = derived {
        match &d.delegation.parent {
            Some(parent) => audit.details.insert("parent".into(), parent.clone()),
            // Exchanged from an OIDC issuer's assertion: the record says so.
            None => audit
                .details
                .insert("subject_assertion".into(), d.subject.clone()),
        };
        if !d.delegation.act.is_empty() {
            audit
                .details
                .insert("act".into(), d.delegation.act.join(" "));
        }
    }
    audit
        .details
        .insert("kind".into(), lease.kind().as_str().into());
    Ok(Ok(Outcome::Lease {
        lease,
        replayed: false,
    }))
}

/// Counts a lease in or out of its role's and its holder's live-lease counts (the budgets).
pub(super) fn count_live<R: KvRead + ?Sized>(
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

/// Writes a new active lease and its indexes.
pub(super) fn insert_lease<R: KvRead + ?Sized>(
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
pub(super) fn note_key_use<R: KvRead + ?Sized>(
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

/// The refusals of a renewal that depend only on the lease, the caller and the time: a foreign
/// lease, a revoked or expired one, a kind that is re-issued rather than extended, a lease at its
/// maximum lifetime. `apply` checks them, and so does the receiving node before proposing (see
/// [`renewal_refusal`]), so that such a renewal never costs a Raft write.
pub fn renewable(lease: &Lease, actor: &Principal, now: u64) -> Result<(), Error> {
    let lease_id = lease.id.as_str();
    if lease.subject != actor.id && lease.client_id != actor.id && !actor.is_admin() {
        return Err(Error::PermissionDenied(format!(
            "lease {lease_id} belongs to another subject"
        )));
    }
    match lease.state {
        LeaseState::Revoked { .. } => return Err(Error::LeaseRevoked(lease_id.to_string())),
        LeaseState::Expired { .. } => return Err(Error::LeaseExpired(lease_id.to_string())),
        LeaseState::Active if now >= lease.expires_at_ms => {
            return Err(Error::LeaseExpired(lease_id.to_string()))
        }
        LeaseState::Active => {}
    }
    if let Renewal::Reissue { how } = crate::kind::renewal_of(lease.kind()) {
        return Err(Error::NotRenewable {
            lease: lease_id.to_string(),
            how: how.to_string(),
        });
    }
    if lease.expires_at_ms >= lease.max_expires_at_ms {
        return Err(Error::LeaseAtMaxLifetime(lease_id.to_string()));
    }
    Ok(())
}

/// Whether a renewal of `lease_id` by `actor` at `now` would be refused for a reason that
/// changes nothing (see [`renewable`]): the refusal, or `None` when `apply` must decide.
pub fn renewal_refusal(
    kv: &(impl KvRead + ?Sized),
    actor: &Principal,
    lease_id: &str,
    now: u64,
) -> Result<Option<Error>, StorageError> {
    Ok(match load_lease(kv, lease_id)? {
        None => Some(Error::LeaseNotFound(lease_id.to_string())),
        Some(lease) => renewable(&lease, actor, now).err(),
    })
}

/// Audits a refusal the receiving node decided without proposing the request (a sampled
/// record; `unrecorded` refusals on that node went without one). The record reads as the
/// refused request's own would have, and nothing else changes.
pub(super) fn record_refusal<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    refusal: &crate::command::Refusal,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit_context(audit, &refusal.context);
    if let Some(lease_id) = &refusal.lease_id {
        audit.lease_id = Some(lease_id.clone());
        if let Some(lease) = load_lease(kv, lease_id)? {
            audit.role = Some(lease.role.clone());
            audit.subject = Some(lease.subject.clone());
            audit
                .details
                .insert("kind".into(), lease.kind().as_str().into());
        }
    }
    if refusal.unrecorded > 0 {
        audit
            .details
            .insert("unrecorded_refusals".into(), refusal.unrecorded.to_string());
    }
    Ok(Err(refusal.error.clone()))
}

pub(super) fn renew<R: KvRead + ?Sized>(
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
    if let Err(e) = renewable(&lease, actor, now) {
        return Ok(Err(e));
    }
    if let Err(e) = check_quarantine(kv, [&actor.id, &lease.subject])? {
        return Ok(Err(e));
    }
    let stamp = match check_policy(kv, actor, &intent.policy, audit)? {
        Ok(stamp) => stamp,
        Err(e) => return Ok(Err(e)),
    };
    // A JWT is re-signed by the active key; a login outside the cluster has no signer.
    let kid = match lease.grant.signer() {
        SignerKind::JwtKey => match active_kid(kv)? {
            Some(kid) => Some(kid),
            None => return Ok(Err(Error::NoActiveSigningKey)),
        },
        _ => None,
    };
    let increment = intent.increment_s.unwrap_or(lease.ttl_s);
    let increment = stamp.max_ttl_s.map_or(increment, |cap| increment.min(cap));
    // Never past the cap, never shorter than what the holder already has.
    let new_exp = (now + increment * 1000)
        .min(lease.max_expires_at_ms)
        .max(lease.expires_at_ms);
    kv.delete(deadline_key(lease.expires_at_ms, lease_id));
    kv.put(deadline_key(new_exp, lease_id), Vec::new());
    if let Some(kid) = kid {
        if kid != lease.kid {
            kv.delete(ix_key(PFX_KID_IX, &lease.kid, lease_id));
            kv.put(ix_key(PFX_KID_IX, &kid, lease_id), Vec::new());
            lease.kid = kid.clone();
        }
        note_key_use(kv, &key_key(&kid), new_exp)?;
    }
    if let Some(target) = lease.grant.external_target() {
        if new_exp != lease.expires_at_ms {
            effects::record(
                kv,
                now,
                lease_id,
                &target,
                effects::EffectAction::Extend {
                    valid_until_ms: new_exp,
                },
            )?;
        }
    }
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

pub(super) fn revoke<R: KvRead + ?Sized>(
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
            Some(lease) => revoke_lease(kv, now, &lease, &state),
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
        RevokeTarget::Connection(name) => {
            if super::db::db_connection(kv, name)?.is_none() {
                return Ok(Err(Error::UnknownConnection(name.clone())));
            }
            // The logins that exist (or are being created) there; those already being dropped
            // are dead and count nothing.
            let mut count = 0;
            for id in effects::holders(kv, &crate::kind::postgres::target_of(name))? {
                count += revoke_one(kv, &id)?;
            }
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
            // Useful to a verifier until the last credential the key signed has expired.
            let useful_until = rec.max_token_expiry_ms;
            revocations::record(
                kv,
                now,
                revocations::Revoked::Key { kid: kid.clone() },
                useful_until,
            )?;
            if active == META_ACTIVE_SSH_CA {
                bump_krl_version(kv)?;
            }
            if get::<String>(kv, active)?.as_deref() == Some(kid.as_str()) {
                kv.delete(active.to_vec());
            }
            (PFX_KID_IX, kid)
        }
    };
    let mut pages = IdPages::new(ix_prefix(pfx, value));
    let mut count = 0;
    while let Some(page) = pages.next_page(&*kv)? {
        for id in page {
            count += revoke_one(kv, &id)?;
        }
    }
    Ok(Ok(Outcome::Revoked { count }))
}

/// Revokes a lease if it is active, and with it every active lease derived from it (token
/// exchange); how many it revoked.
pub(super) fn revoke_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    lease: &Lease,
    state: &LeaseState,
) -> Result<u64, StorageError> {
    if revoke_one_lease(kv, now, lease, state)? == 0 {
        return Ok(0);
    }
    // Only an access token can be exchanged, so only a JWT lease can have children: a bulk
    // revocation of other kinds does not pay an index read per lease.
    if !matches!(lease.grant, crate::kind::Grant::Jwt(_)) {
        return Ok(1);
    }
    Ok(1 + delegation::revoke_descendants(kv, now, &lease.id, state)?)
}

/// Revokes one lease if it is active: its state, deadline entry, live counts, and the
/// revocation artefacts of its kind (a revoked SSH certificate enters the KRL, a login outside
/// the cluster gets its drop effect). Returns 1 if it was active.
pub(super) fn revoke_one_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
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
    keep_dead_lease(kv, &lease);
    count_live(kv, &lease, false)?;
    if let Some((valid_before_s, serial)) = lease.grant.krl_entry() {
        kv.put(ssh_revoked_key(valid_before_s, serial), enc(&lease.kid));
        bump_krl_version(kv)?;
    }
    record_drop(kv, now, &lease)?;
    revocations::record(
        kv,
        now,
        revocations::Revoked::Lease {
            id: lease.id.clone(),
            expires_at_ms: lease.expires_at_ms,
        },
        lease.expires_at_ms,
    )?;
    Ok(1)
}

/// A dead lease's credential outside the cluster is dropped (revocation or expiry).
pub(super) fn record_drop<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    lease: &Lease,
) -> Result<(), StorageError> {
    if let Some(target) = lease.grant.external_target() {
        effects::record(kv, now, &lease.id, &target, effects::EffectAction::Drop)?;
    }
    Ok(())
}

pub(super) fn bump_krl_version<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
) -> Result<(), StorageError> {
    let v: u64 = get(kv, META_KRL_VERSION)?.unwrap_or(0);
    kv.put(META_KRL_VERSION.to_vec(), enc(&(v + 1)));
    Ok(())
}
