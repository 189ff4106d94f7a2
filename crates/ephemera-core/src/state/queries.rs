//! Reads of the state the node serves: roles, leases, keys, policy, audit, the KRL, the digest.

use super::*;

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

pub(super) fn scan_values<T: DeserializeOwned>(
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
    /// One of [`super::effects::LEASE_STATES`], as operators see them (a PostgreSQL login's
    /// lease is `revoking` while its drop is retried, for instance).
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
            if filter.role.as_ref().is_some_and(|r| *r != lease.role) {
                continue;
            }
            if let Some(wanted) = &filter.state {
                if *wanted != super::effects::lease_status(kv, &lease)?.state {
                    continue;
                }
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

pub fn active_audit_key(kv: &(impl KvRead + ?Sized)) -> Result<Option<String>, StorageError> {
    get(kv, META_ACTIVE_AUDIT_KEY)
}

pub fn get_audit_key(
    kv: &(impl KvRead + ?Sized),
    kid: &str,
) -> Result<Option<SigningKeyRecord>, StorageError> {
    get(kv, &audit_key_record(kid))
}

/// Every audit key (their public halves verify checkpoints), in key id order.
pub fn list_audit_keys(kv: &(impl KvRead + ?Sized)) -> Result<Vec<SigningKeyRecord>, StorageError> {
    scan_values(kv, PFX_AUDIT_KEY.as_bytes(), usize::MAX)
}

/// The newest `limit` audit checkpoints, newest first.
pub fn audit_checkpoints(
    kv: &(impl KvRead + ?Sized),
    limit: usize,
) -> Result<Vec<crate::audit::AuditCheckpoint>, StorageError> {
    let mut all: Vec<crate::audit::AuditCheckpoint> =
        scan_values(kv, PFX_AUDIT_CHECKPOINT.as_bytes(), usize::MAX)?;
    all.reverse();
    all.truncate(limit);
    Ok(all)
}
