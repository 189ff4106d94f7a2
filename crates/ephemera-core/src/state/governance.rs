//! Policy governance: versions, proposals, approvals by distinct administrators, and the audit
//! of refusals (which may revoke a lease whose renewal policy refused).

use super::*;

pub(super) fn text_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

pub(super) fn activate_policy<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, v: &PolicyVersion) {
    kv.put(policy_version_key(v.version), enc(v));
    kv.put(META_POLICY_VERSION.to_vec(), enc(&v.version));
}

/// Policy changes need an administrator's own identity: the system principal never proposes
/// or approves.
pub(super) fn require_policy_admin(actor: &Principal) -> Result<(), Error> {
    require_admin(actor)?;
    if actor.auth_method == crate::types::AuthMethod::System {
        return Err(Error::PermissionDenied(
            "the system principal cannot change policy".into(),
        ));
    }
    Ok(())
}

pub(super) fn propose_policy<R: KvRead + ?Sized>(
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
    keep_until(
        kv,
        Kept::Proposal,
        proposal.expires_at_ms,
        &proposal_key(proposal_id),
    );
    kv.put(proposal_key(proposal_id), enc(&proposal));
    Ok(Ok(Outcome::Proposal(proposal)))
}

pub(super) fn activate_proposal<R: KvRead + ?Sized>(
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

pub(super) fn approve_policy<R: KvRead + ?Sized>(
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
    if actor.auth_method == crate::types::AuthMethod::BootstrapAdmin {
        return Ok(Err(Error::BreakGlassApproval(proposal.id)));
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
    if proposal.approvals.len() >= proposal.approvals_needed(&governance) as usize {
        activate_proposal(kv, &mut proposal, now, audit);
    }
    kv.put(proposal_key(proposal_id), enc(&proposal));
    Ok(Ok(Outcome::Proposal(proposal)))
}

/// Audits a request that policy refused. A refused renewal revokes the lease when its role
/// says so, provided the refusal was decided under the active policy version.
pub(super) fn policy_denied<R: KvRead + ?Sized>(
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
