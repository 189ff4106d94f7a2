//! Database connections (where PostgreSQL logins are created) and the operator's way out of an
//! external effect that can never succeed (`AbandonLease`).
//!
//! A connection's admin password is replicated sealed under the KEK (the receiving node seals
//! it before proposing, bound to the connection's name), so the log, the state and snapshots
//! never hold it in the clear; only the leader's effect executor unseals it, to connect.

use super::*;
use crate::state::effects;

/// `db/{name}` → [`DbConnection`].
const PFX_DB: &str = "db/";
/// Largest sealed password accepted (a 256-byte password sealed, with room to spare).
pub const MAX_SEALED_PASSWORD: usize = 512;
pub const MAX_CA_PEM: usize = 64 * 1024;
const MAX_HOST_LEN: usize = 253;
/// PostgreSQL's identifier limit, for the database and the admin user.
const MAX_PG_NAME: usize = 63;
/// How long a staged root rotation may still land at the database: its `ALTER ROLE` commits
/// only within the executor's attempt deadline (8 s) of its start, on the database server's
/// clock, and this much longer covers that plus a skew of 40 s between the clock that stamped
/// the staging and the clock of the node that later asks. Until then, nothing may settle or
/// overwrite the pending password: it may be about to become the only one the database takes.
pub const ROTATION_IN_FLIGHT_MS: u64 = 48_000;

/// How the executor's connection to the database is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SslMode {
    /// TLS, with the server's certificate checked against the connection's CA and its name.
    VerifyFull,
    /// TLS without checking the server's certificate (libpq's `require`).
    Require,
    /// No TLS (a database on loopback or a private link only; loud in the CLI).
    Disable,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::VerifyFull => "verify-full",
            SslMode::Require => "require",
            SslMode::Disable => "disable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [SslMode::VerifyFull, SslMode::Require, SslMode::Disable]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbConnection {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// The administrative user the executor connects as.
    pub user: String,
    pub sslmode: SslMode,
    /// The CA that signs the server's certificate (PEM), for `verify-full`.
    pub ca_pem: Option<String>,
    /// The admin password, sealed under the KEK (associated data: [`password_aad`]).
    pub sealed_password: Vec<u8>,
    /// A root rotation in progress: the new password, committed before `ALTER ROLE` runs, so
    /// that a crash between the two recovers by trying both.
    pub pending_sealed_password: Option<Vec<u8>>,
    /// When the connection last changed (a put, or a rotation staged or settled).
    pub updated_ms: u64,
}

impl std::fmt::Debug for DbConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConnection")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("sslmode", &self.sslmode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("sealed_password", &"<sealed>")
            .field(
                "pending_sealed_password",
                &self.pending_sealed_password.as_ref().map(|_| "<sealed>"),
            )
            .field("updated_ms", &self.updated_ms)
            .finish()
    }
}

/// The associated data a connection's password is sealed with: a sealed password moved to
/// another connection does not unseal.
pub fn password_aad(name: &str) -> String {
    format!("db-connection/{name}")
}

fn db_key(name: &str) -> Vec<u8> {
    format!("{PFX_DB}{name}").into_bytes()
}

pub fn db_connection(
    kv: &(impl KvRead + ?Sized),
    name: &str,
) -> Result<Option<DbConnection>, StorageError> {
    get(kv, &db_key(name))
}

/// Every connection, by name.
pub fn db_connections(kv: &(impl KvRead + ?Sized)) -> Result<Vec<DbConnection>, StorageError> {
    let pfx = PFX_DB.as_bytes();
    // Connections are configured by hand: a few dozen at most.
    kv.range(pfx, &prefix_end(pfx), usize::MAX)?
        .into_iter()
        .map(|(k, v)| dec(&k, &v))
        .collect()
}

fn text(what: &str, s: &str, max: usize) -> Result<(), Error> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to {max} bytes without whitespace or control characters"
        )));
    }
    Ok(())
}

pub fn validate_sealed_password(sealed: &[u8]) -> Result<(), Error> {
    if sealed.is_empty() || sealed.len() > MAX_SEALED_PASSWORD {
        return Err(Error::InvalidArgument(format!(
            "a sealed password must be 1 to {MAX_SEALED_PASSWORD} bytes"
        )));
    }
    Ok(())
}

/// What the receiving node and `apply` both check of a connection.
pub fn validate_db_connection(c: &DbConnection) -> Result<(), Error> {
    crate::command::validate_name("connection name", &c.name)?;
    text("the database host", &c.host, MAX_HOST_LEN)?;
    if c.port == 0 {
        return Err(Error::InvalidArgument(
            "the database port must not be 0".into(),
        ));
    }
    text("the database name", &c.database, MAX_PG_NAME)?;
    text("the database user", &c.user, MAX_PG_NAME)?;
    for sealed in std::iter::once(&c.sealed_password).chain(&c.pending_sealed_password) {
        validate_sealed_password(sealed)?;
    }
    match &c.ca_pem {
        Some(pem) if pem.len() > MAX_CA_PEM || !pem.contains("-----BEGIN CERTIFICATE-----") => {
            Err(Error::InvalidArgument(format!(
                "the CA must be PEM certificates of at most {MAX_CA_PEM} bytes"
            )))
        }
        None if c.sslmode == SslMode::VerifyFull => Err(Error::InvalidArgument(
            "sslmode verify-full needs the CA that signs the server's certificate (--ca-file)"
                .into(),
        )),
        _ => Ok(()),
    }
}

fn audit_connection(audit: &mut AuditRecord, c: &DbConnection) {
    audit.target = Some(format!("db:{}", c.name));
    audit.details = [
        ("host".to_string(), c.host.clone()),
        ("port".to_string(), c.port.to_string()),
        ("database".to_string(), c.database.clone()),
        ("user".to_string(), c.user.clone()),
        ("sslmode".to_string(), c.sslmode.as_str().to_string()),
    ]
    .into();
}

/// `Op::PutDbConnection`: an administrator creates or replaces a connection: its password, CA
/// or TLS mode at any time; where it points, or as whom, only while no login exists there; and
/// not while a root rotation may still land (the password being put could stop working a
/// moment later). A put replaces a rotation that stopped halfway: the receiving node has just
/// connected with the password it carries. The audit record names where it points, never its
/// password.
pub(super) fn put<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    c: &DbConnection,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit_connection(audit, c);
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    if let Err(e) = validate_db_connection(c) {
        return Ok(Err(e));
    }
    // Pointing a connection at another database while logins exist on the first would send
    // their drops to a server that never had them ("does not exist" is success there), and the
    // logins would outlive their leases.
    if let Some(old) = db_connection(kv, &c.name)? {
        if old.pending_sealed_password.is_some() {
            let age_ms = now.saturating_sub(old.updated_ms);
            if age_ms < ROTATION_IN_FLIGHT_MS {
                return Ok(Err(Error::RootRotation {
                    name: c.name.clone(),
                    why: format!(
                        "a rotation staged {} s ago may still change the password; retry in {} s",
                        age_ms / 1000,
                        (ROTATION_IN_FLIGHT_MS - age_ms).div_ceil(1000)
                    ),
                }));
            }
            audit
                .details
                .insert("replaced_unfinished_rotation".into(), "true".into());
        }
        // Another user is a move too: the logins' drops need a user that may drop them (a
        // member of each, or their creator's ADMIN OPTION on PostgreSQL 16).
        let moved = (&old.host, old.port, &old.database, &old.user)
            != (&c.host, c.port, &c.database, &c.user);
        let holders = effects::holders(kv, &crate::kind::postgres::target_of(&c.name))?;
        if moved && !holders.is_empty() {
            return Ok(Err(Error::ConnectionInUse {
                name: c.name.clone(),
                leases: holders.len() as u64,
            }));
        }
    }
    let mut c = c.clone();
    c.updated_ms = now;
    kv.put(db_key(&c.name), enc(&c));
    Ok(Ok(Outcome::Done))
}

/// `Op::DeleteDbConnection`: refused while logins exist on its database or are being dropped,
/// unless `force`, which revokes those leases and abandons their effects (each effect keeps
/// who abandoned it and why).
pub(super) fn delete<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (name, force): (&str, bool),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("db:{name}"));
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    if db_connection(kv, name)?.is_none() {
        return Ok(Err(Error::UnknownConnection(name.to_string())));
    }
    let target = crate::kind::postgres::target_of(name);
    let holders = effects::holders(kv, &target)?;
    if !holders.is_empty() && !force {
        return Ok(Err(Error::ConnectionInUse {
            name: name.to_string(),
            leases: holders.len() as u64,
        }));
    }
    let reason = format!("database connection {name} deleted with --force");
    for lease_id in &holders {
        abandon_one(kv, actor, now, lease_id, &reason)?;
    }
    audit
        .details
        .insert("abandoned_leases".into(), holders.len().to_string());
    kv.delete(db_key(name));
    Ok(Ok(Outcome::Done))
}

/// Revokes the lease if it is still active and abandons its pending effects; how many effects
/// it abandoned.
fn abandon_one<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    lease_id: &str,
    reason: &str,
) -> Result<usize, StorageError> {
    if let Some(lease) = load_lease(kv, lease_id)? {
        revoke_lease(
            kv,
            now,
            &lease,
            &LeaseState::Revoked {
                at_ms: now,
                by: actor.id.clone(),
            },
        )?;
    }
    Ok(effects::abandon(kv, now, lease_id, &actor.id, reason)?.len())
}

/// `Op::AbandonLease`: an administrator has removed a credential by hand (or accepts that it
/// cannot be); the lease is revoked if it was not, and its effects are no longer retried.
pub(super) fn abandon_lease<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (lease_id, reason): (&str, &str),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.lease_id = Some(lease_id.to_string());
    audit.reason = Some(reason.to_string());
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    let Some(lease) = load_lease(kv, lease_id)? else {
        return Ok(Err(Error::LeaseNotFound(lease_id.to_string())));
    };
    audit.role = Some(lease.role.clone());
    audit.subject = Some(lease.subject.clone());
    let pending = effects::effects_of_lease(kv, lease_id)?
        .iter()
        .any(|e| e.status == effects::EffectStatus::Pending);
    if lease.grant.external_target().is_none() || (!pending && lease.state != LeaseState::Active) {
        return Ok(Err(Error::NothingToAbandon(lease_id.to_string())));
    }
    let n = abandon_one(kv, actor, now, lease_id, reason)?;
    audit
        .details
        .insert("abandoned_effects".into(), n.to_string());
    Ok(Ok(Outcome::Done))
}

/// `Op::StageRootPassword`: the first step of a root rotation. Refused while an earlier
/// rotation is unfinished: its pending password may be the one the database now takes, and
/// replacing it could lose the only working password.
pub(super) fn stage_root<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (name, sealed): (&str, &[u8]),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("db:{name}"));
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    let Some(mut c) = db_connection(kv, name)? else {
        return Ok(Err(Error::UnknownConnection(name.to_string())));
    };
    if c.pending_sealed_password.is_some() {
        return Ok(Err(Error::RootRotation {
            name: name.to_string(),
            why: "an earlier rotation is unfinished and must be settled first".into(),
        }));
    }
    c.pending_sealed_password = Some(sealed.to_vec());
    c.updated_ms = now;
    kv.put(db_key(name), enc(&c));
    Ok(Ok(Outcome::Done))
}

/// `Op::SettleRootPassword`: the pending password becomes the connection's (`promote`: the
/// database took it) or is discarded (the database still takes the old one). An administrator
/// or the leader's executor (which finds out by connecting) settles; a report about another
/// pending password than the current one changes nothing.
pub(super) fn settle_root<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    (name, pending, promote): (&str, &[u8], bool),
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("db:{name}"));
    audit.details.insert(
        "result".into(),
        if promote { "promoted" } else { "discarded" }.into(),
    );
    if let Err(e) = require_admin(actor) {
        return Ok(Err(e));
    }
    let Some(mut c) = db_connection(kv, name)? else {
        return Ok(Err(Error::UnknownConnection(name.to_string())));
    };
    if c.pending_sealed_password.as_deref() != Some(pending) {
        return Ok(Err(Error::RootRotation {
            name: name.to_string(),
            why: "the password being settled is no longer the pending one".into(),
        }));
    }
    if promote {
        c.sealed_password = pending.to_vec();
    }
    c.pending_sealed_password = None;
    c.updated_ms = now;
    kv.put(db_key(name), enc(&c));
    Ok(Ok(Outcome::Done))
}
