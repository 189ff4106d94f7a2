//! External effects: what must happen outside the cluster because a lease changed (create a
//! database role, extend its validity, drop it), kept as replicated state so that none is
//! ever forgotten.
//!
//! The problem: the cluster can revoke a lease in one Raft entry, but the credential lives on
//! in the database until someone drops the role there, and that someone may crash, lose its
//! leadership or find the database down. Vault's answer (a few tries, then the revocation is
//! dropped while the login still works) is the failure we must not have.
//!
//! The mechanism: the entry that changes the lease also records its effect, in the same batch
//! (`record`). The leader's executor reads the due effects (`due`, page by page), runs each with a deadline
//! and idempotently (dropping a role that does not exist is success), and commits the outcome
//! back through Raft (`Op::SettleEffect`, stamped with the next attempt's jittered time). A new
//! leader reads the same state and carries on where the old one stopped. Effects are indexed
//! by target (one database connection), so the executor serves targets independently and one
//! database that is down never holds back another.
//!
//! States of one effect:
//!
//! ```text
//!   pending ──settled ok──────────────────────────▶ done
//!      │  ╲──settled with an error──▶ pending (attempts + 1, last error, next attempt later;
//!      │                                        "failed" once attempts ≥ FAILED_AFTER_ATTEMPTS,
//!      │                                        and still retried at the longest interval)
//!      ├──a later effect of its lease makes it moot──▶ superseded (by that effect)
//!      └──an administrator abandons it (audited)─────▶ abandoned (by whom, why)
//! ```
//!
//! A drop supersedes the lease's pending create and extend effects (the drop removes whatever
//! they did or would do); a newer extend supersedes an older one (only the latest validity
//! matters). Settled effects stay as the lease's history, and go with the lease when retention
//! forgets it; a lease whose effects are still pending is never forgotten.
//!
//! The invariants: the executor runs only the oldest pending effect of each lease (a create
//! before its drop), and an outcome settles only the attempt it reports (`attempt` must be the
//! next one), so an outcome from a deposed leader or a duplicate delivery changes nothing.

use super::*;

const PFX_EFFECT: &str = "fx/e/";
/// Pending effects by target: `fx/due/{target}\0{seq:016x}`.
const PFX_EFFECT_DUE: &str = "fx/due/";
/// Every effect of a lease: `fx/lease/{lease_id}\0{seq:016x}`.
const PFX_EFFECT_LEASE: &str = "fx/lease/";
/// Leases whose credential exists, or may exist, at a target: `fx/live/{target}\0{lease_id}`,
/// from the lease's create effect until its drop is done or its effects are abandoned.
const PFX_EFFECT_LIVE: &str = "fx/live/";
const META_EFFECT_SEQ: &[u8] = b"meta/effect_seq";

/// After this many failed attempts an effect is reported as failed (it is still retried).
pub const FAILED_AFTER_ATTEMPTS: u32 = 5;
/// An effect's last error is kept to this many bytes (the executor never puts secrets in it).
pub const MAX_EFFECT_ERROR_LEN: usize = 512;
pub const MAX_TARGET_LEN: usize = 128;

/// A target name: 1 to [`MAX_TARGET_LEN`] bytes of letters, digits and `-_./:`.
pub fn valid_target(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TARGET_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
}
/// Retry delays grow from the first to the longest, doubling per attempt.
pub const RETRY_FIRST_MS: u64 = 500;
pub const RETRY_LONGEST_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EffectAction {
    /// Create the credential outside, valid until the lease's expiry.
    Create { valid_until_ms: u64 },
    /// Move its validity (a renewal).
    Extend { valid_until_ms: u64 },
    /// Remove it (revocation or expiry). Idempotent: already gone is success.
    Drop,
}

impl EffectAction {
    pub fn name(&self) -> &'static str {
        match self {
            EffectAction::Create { .. } => "create",
            EffectAction::Extend { .. } => "extend",
            EffectAction::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EffectStatus {
    Pending,
    Done {
        at_ms: u64,
    },
    Superseded {
        by_seq: u64,
    },
    Abandoned {
        at_ms: u64,
        by: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// Unique, in commit order.
    pub seq: u64,
    pub lease_id: String,
    /// Where it happens (e.g. `postgres/orders`); the executor's unit of independence.
    pub target: String,
    pub action: EffectAction,
    pub status: EffectStatus,
    /// Attempts that failed so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Not to be tried before this time (the jittered backoff after a failure).
    pub not_before_ms: u64,
    pub created_ms: u64,
}

impl Effect {
    /// The state as operators see it: pending, failed (pending after many failures), done,
    /// superseded or abandoned.
    pub fn state_name(&self) -> &'static str {
        match self.status {
            EffectStatus::Pending if self.attempts >= FAILED_AFTER_ATTEMPTS => "failed",
            EffectStatus::Pending => "pending",
            EffectStatus::Done { .. } => "done",
            EffectStatus::Superseded { .. } => "superseded",
            EffectStatus::Abandoned { .. } => "abandoned",
        }
    }
}

/// What settling an effect did, for the lease logic (e.g. a done create makes the lease active).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Done(Effect),
    WillRetry(Effect),
}

/// The delay before retry number `attempts + 1`, given the leader's jitter (0..=1000 thousandths,
/// stamped into the command): doubling from [`RETRY_FIRST_MS`] up to [`RETRY_LONGEST_MS`], then
/// scaled into 50–100% of that so that a fleet of failing effects does not retry in step.
pub fn retry_delay_ms(attempts: u32, jitter_permille: u16) -> u64 {
    let full = RETRY_FIRST_MS
        .saturating_mul(1u64 << attempts.min(20))
        .min(RETRY_LONGEST_MS);
    let jitter = u64::from(jitter_permille.min(1000));
    full / 2 + full * jitter / 2000
}

fn effect_key(seq: u64) -> Vec<u8> {
    format!("{PFX_EFFECT}{seq:016x}").into_bytes()
}
fn due_key(target: &str, seq: u64) -> Vec<u8> {
    ix_key(PFX_EFFECT_DUE, target, &format!("{seq:016x}"))
}
fn lease_effect_key(lease_id: &str, seq: u64) -> Vec<u8> {
    ix_key(PFX_EFFECT_LEASE, lease_id, &format!("{seq:016x}"))
}

pub fn effect(kv: &(impl KvRead + ?Sized), seq: u64) -> Result<Option<Effect>, StorageError> {
    get(kv, &effect_key(seq))
}

fn store<R: KvRead + ?Sized>(kv: &mut Overlay<'_, R>, e: &Effect) {
    kv.put(effect_key(e.seq), enc(e));
}

/// Every effect of a lease, oldest first.
pub fn effects_of_lease(
    kv: &(impl KvRead + ?Sized),
    lease_id: &str,
) -> Result<Vec<Effect>, StorageError> {
    let pfx = ix_prefix(PFX_EFFECT_LEASE, lease_id);
    let mut out = Vec::new();
    // A lease has a handful of effects (create, renewals, drop), bounded by its renewals.
    for (k, _) in kv.range(&pfx, &prefix_end(&pfx), usize::MAX)? {
        if let Some(e) = effect(kv, seq_of(&k, pfx.len())?)? {
            out.push(e);
        }
    }
    Ok(out)
}

fn seq_of(key: &[u8], skip: usize) -> Result<u64, StorageError> {
    std::str::from_utf8(&key[skip..])
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| StorageError(format!("corrupt effect index key {key:?}")))
}

/// Records `action` for `lease_id` at `target`, superseding what it makes moot; its seq.
/// Called inside `apply`, in the overlay of the entry that changes the lease.
pub fn record<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    lease_id: &str,
    target: &str,
    action: EffectAction,
) -> Result<u64, StorageError> {
    let seq = get::<u64>(kv, META_EFFECT_SEQ)?.unwrap_or(0) + 1;
    kv.put(META_EFFECT_SEQ.to_vec(), enc(&seq));
    for mut older in effects_of_lease(kv, lease_id)? {
        // A drop makes the lease's creates and extends moot; a newer extend an older one.
        let moot = matches!(
            (&action, &older.action),
            (
                EffectAction::Drop,
                EffectAction::Create { .. } | EffectAction::Extend { .. }
            ) | (EffectAction::Extend { .. }, EffectAction::Extend { .. })
        );
        if moot && older.status == EffectStatus::Pending {
            older.status = EffectStatus::Superseded { by_seq: seq };
            kv.delete(due_key(&older.target, older.seq));
            store(kv, &older);
        }
    }
    let e = Effect {
        seq,
        lease_id: lease_id.to_string(),
        target: target.to_string(),
        action,
        status: EffectStatus::Pending,
        attempts: 0,
        last_error: None,
        not_before_ms: now,
        created_ms: now,
    };
    if matches!(e.action, EffectAction::Create { .. }) {
        kv.put(ix_key(PFX_EFFECT_LIVE, target, lease_id), Vec::new());
    }
    store(kv, &e);
    kv.put(due_key(target, seq), Vec::new());
    kv.put(lease_effect_key(lease_id, seq), Vec::new());
    Ok(seq)
}

/// Removes a settled lease's effect records (retention, with the lease itself).
pub(super) fn forget_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    lease_id: &str,
) -> Result<(), StorageError> {
    for e in effects_of_lease(kv, lease_id)? {
        kv.delete(effect_key(e.seq));
        kv.delete(lease_effect_key(lease_id, e.seq));
        kv.delete(due_key(&e.target, e.seq));
        kv.delete(ix_key(PFX_EFFECT_LIVE, &e.target, lease_id));
    }
    Ok(())
}

/// One page of a target's pending effects, read in commit order (see [`due`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DuePage {
    /// Effects that may run now: past their backoff, and the oldest pending effect of their
    /// lease.
    pub ready: Vec<Effect>,
    /// The earliest backoff among the page's effects that are not ready yet.
    pub next_ms: Option<u64>,
    /// The last seq read; `None` when the page was empty.
    pub last_seq: Option<u64>,
    /// Whether the target may have pending effects after `last_seq` (the page was full).
    pub more: bool,
}

/// A page of at most `scan` pending effects at `target` with a seq above `after` (0: from the
/// first), oldest first: which may run at `now`, and when the others may. A page costs `scan`
/// index reads whatever the backlog, so the executor reads a large backlog of effects in
/// backoff (a database down) page by page, and between pages sleeps until the earliest
/// `next_ms` it saw instead of re-reading it.
pub fn due(
    kv: &(impl KvRead + ?Sized),
    target: &str,
    now: u64,
    after: u64,
    scan: usize,
) -> Result<DuePage, StorageError> {
    let pfx = ix_prefix(PFX_EFFECT_DUE, target);
    let start = if after == 0 {
        pfx.clone()
    } else {
        due_key(target, after.saturating_add(1))
    };
    let keys = kv.range(&start, &prefix_end(&pfx), scan.max(1))?;
    let mut page = DuePage {
        more: keys.len() >= scan.max(1),
        ..DuePage::default()
    };
    for (k, _) in keys {
        let seq = seq_of(&k, pfx.len())?;
        page.last_seq = Some(seq);
        let Some(e) = effect(kv, seq)? else {
            continue;
        };
        if e.not_before_ms > now {
            page.next_ms = Some(
                page.next_ms
                    .map_or(e.not_before_ms, |n| n.min(e.not_before_ms)),
            );
        } else if oldest_pending_of_lease(kv, &e)? {
            page.ready.push(e);
        }
    }
    Ok(page)
}

/// Whether no older effect of `e`'s lease is pending (a create runs before its extend). Read
/// in O(1): `record` leaves at most a create pending before another pending effect of the same
/// lease (a drop supersedes creates and extends, a newer extend an older one), and a lease's
/// create is its first effect.
fn oldest_pending_of_lease(kv: &(impl KvRead + ?Sized), e: &Effect) -> Result<bool, StorageError> {
    let pfx = ix_prefix(PFX_EFFECT_LEASE, &e.lease_id);
    let Some((k, _)) = kv.range(&pfx, &prefix_end(&pfx), 1)?.into_iter().next() else {
        return Ok(true);
    };
    let first = seq_of(&k, pfx.len())?;
    if first == e.seq {
        return Ok(true);
    }
    Ok(!effect(kv, first)?.is_some_and(|f| f.status == EffectStatus::Pending))
}

/// The leases whose credential exists, or may still exist, at `target` (created or being
/// created, and not yet dropped or abandoned), in lease-id order.
pub fn holders(kv: &(impl KvRead + ?Sized), target: &str) -> Result<Vec<String>, StorageError> {
    ids_under(kv, PFX_EFFECT_LIVE, target)
}

/// A lease's state as operators see it, for a credential that lives outside the cluster:
///
/// - `pending`: issued in the cluster, the login not yet created (not returned to the caller);
/// - `active`: created, and the lease active;
/// - `revoking`: revoked or expired in the cluster (introspection already says inactive), the
///   drop still being attempted;
/// - `failed`: as pending or revoking, after [`FAILED_AFTER_ATTEMPTS`] failed attempts (still
///   retried, at the longest interval);
/// - `revoked` / `expired`: dead in the cluster and dropped outside;
/// - `abandoned`: an administrator stopped the retries (`leases abandon`, audited).
///
/// Leases of other kinds have their cluster state only (`active`, `revoked`, `expired`).
pub fn lease_state(lease: &Lease, effects: &[Effect]) -> &'static str {
    if lease.grant.external_target().is_none() {
        return lease.state.name();
    }
    if effects
        .iter()
        .any(|e| matches!(e.status, EffectStatus::Abandoned { .. }))
    {
        return "abandoned";
    }
    let pending = effects.iter().find(|e| e.status == EffectStatus::Pending);
    match (pending, &lease.state) {
        (Some(e), _) if e.attempts >= FAILED_AFTER_ATTEMPTS => "failed",
        (Some(e), LeaseState::Active) if matches!(e.action, EffectAction::Create { .. }) => {
            "pending"
        }
        (Some(e), _) if e.action == EffectAction::Drop => "revoking",
        (_, state) => state.name(),
    }
}

/// A lease as operators see it: [`lease_state`], and while one of its effects is pending, that
/// effect's failed attempts and last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
}

pub fn lease_status(
    kv: &(impl KvRead + ?Sized),
    lease: &Lease,
) -> Result<LeaseStatus, StorageError> {
    if lease.grant.external_target().is_none() {
        return Ok(LeaseStatus {
            state: lease.state.name(),
            attempts: 0,
            last_error: None,
        });
    }
    let effects = effects_of_lease(kv, &lease.id)?;
    let pending = effects.iter().find(|e| e.status == EffectStatus::Pending);
    Ok(LeaseStatus {
        state: lease_state(lease, &effects),
        attempts: pending.map_or(0, |e| e.attempts),
        last_error: pending.and_then(|e| e.last_error.clone()),
    })
}

/// The states `leases list --state` filters on.
pub const LEASE_STATES: [&str; 7] = [
    "pending",
    "active",
    "revoking",
    "failed",
    "revoked",
    "expired",
    "abandoned",
];

/// Every target with pending effects (the executor's list of queues).
pub fn targets_with_pending(kv: &(impl KvRead + ?Sized)) -> Result<Vec<String>, StorageError> {
    let pfx = PFX_EFFECT_DUE.as_bytes();
    let end = prefix_end(pfx);
    let mut out: Vec<String> = Vec::new();
    let mut start = pfx.to_vec();
    loop {
        // One key per target: after each, skip past the target's whole range.
        let page = kv.range(&start, &end, 1)?;
        let Some((k, _)) = page.first() else {
            return Ok(out);
        };
        let rest = &k[pfx.len()..];
        let cut = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let target = String::from_utf8_lossy(&rest[..cut]).into_owned();
        start = prefix_end(&ix_prefix(PFX_EFFECT_DUE, &target));
        out.push(target);
    }
}

/// Settles attempt `attempt` (1-based) of effect `seq`: done, or failed with `error` and not to
/// be tried again before `retry_at_ms`. An outcome for another attempt, or for an effect no
/// longer pending, is refused and changes nothing.
pub(super) fn settle<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    seq: u64,
    attempt: u32,
    error: Option<&str>,
    retry_at_ms: u64,
) -> Result<Result<Settled, Error>, StorageError> {
    let Some(mut e) = effect(kv, seq)? else {
        return Ok(Err(Error::EffectNotFound { seq }));
    };
    if e.status != EffectStatus::Pending || attempt != e.attempts + 1 {
        let state = match e.status {
            EffectStatus::Pending => format!("awaiting attempt {}", e.attempts + 1),
            _ => e.state_name().to_string(),
        };
        return Ok(Err(Error::EffectNotAwaiting {
            seq,
            state,
            attempt,
        }));
    }
    match error {
        None => {
            e.status = EffectStatus::Done { at_ms: now };
            kv.delete(due_key(&e.target, e.seq));
            if e.action == EffectAction::Drop {
                kv.delete(ix_key(PFX_EFFECT_LIVE, &e.target, &e.lease_id));
            }
            store(kv, &e);
            Ok(Ok(Settled::Done(e)))
        }
        Some(text) => {
            let mut text = text.to_string();
            crate::command::truncate_text(&mut text, MAX_EFFECT_ERROR_LEN);
            e.attempts += 1;
            e.last_error = Some(text);
            e.not_before_ms = retry_at_ms.max(now);
            store(kv, &e);
            Ok(Ok(Settled::WillRetry(e)))
        }
    }
}

/// Stops retrying every pending effect of `lease_id` (an administrator cleaned up by hand);
/// the abandoned effects.
pub fn abandon<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    now: u64,
    lease_id: &str,
    by: &str,
    reason: &str,
) -> Result<Vec<Effect>, StorageError> {
    let mut out = Vec::new();
    for mut e in effects_of_lease(kv, lease_id)? {
        if e.status == EffectStatus::Pending {
            e.status = EffectStatus::Abandoned {
                at_ms: now,
                by: by.to_string(),
                reason: reason.to_string(),
            };
            kv.delete(due_key(&e.target, e.seq));
            kv.delete(ix_key(PFX_EFFECT_LIVE, &e.target, &e.lease_id));
            store(kv, &e);
            out.push(e);
        }
    }
    Ok(out)
}

/// `Op::SettleEffect`: only the leader reports outcomes. The audit record names the effect,
/// its lease and target, the attempt, and whether it succeeded (the error text stays in the
/// effect record, where `leases list --state failed` shows it).
pub(super) fn settle_op<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (seq, attempt, error, retry_at_ms): (u64, u32, Option<&str>, u64),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("effect:{seq}"));
    if actor.auth_method != AuthMethod::System {
        return Ok(Err(Error::PermissionDenied(
            "only the leader settles external effects".into(),
        )));
    }
    let settled = match settle(kv, now, seq, attempt, error, retry_at_ms)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let (Settled::Done(e) | Settled::WillRetry(e)) = &settled;
    audit.subject = Some(e.lease_id.clone());
    audit.details = [
        ("effect".to_string(), e.action.name().to_string()),
        ("target".to_string(), e.target.clone()),
        ("attempt".to_string(), attempt.to_string()),
        ("result".to_string(), e.state_name().to_string()),
    ]
    .into();
    Ok(Ok(Outcome::Done))
}

/// The leader's report of an attempt at `e`, stamped: the next attempt's time after a failure
/// is `now` plus [`retry_delay_ms`] with the leader's jitter.
pub fn settle_command(
    e: &Effect,
    error: Option<String>,
    now_ms: u64,
    jitter_permille: u16,
) -> Command {
    Command {
        now_ms,
        actor: Principal::system(),
        op: Op::SettleEffect {
            seq: e.seq,
            attempt: e.attempts + 1,
            retry_at_ms: now_ms + retry_delay_ms(e.attempts, jitter_permille),
            error,
        },
    }
}
