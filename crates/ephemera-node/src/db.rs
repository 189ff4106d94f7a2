//! Database connections at the receiving node: the admin password is sealed here, before
//! anything is proposed, so that the Raft log, the state and snapshots only ever hold it
//! sealed; a connection is tried before it is stored; and root rotation runs its three steps
//! (stage the new password, `ALTER ROLE`, promote it) so that a crash anywhere in between is
//! recovered by trying both passwords.

use ephemera_core::command::{Intent, Proposal};
use ephemera_core::crypto::{seal_secret, NONCE_LEN};
use ephemera_core::kind::postgres::{password_from_seed, CharClass, PasswordPolicy};
use ephemera_core::state::{self, DbConnection, ROTATION_IN_FLIGHT_MS};
use ephemera_core::types::Principal;
use ephemera_core::Error;
use ephemera_postgres as pg;
use zeroize::Zeroizing;

use crate::node::effects::ATTEMPT_DEADLINE;
use crate::node::Node;

/// The longest admin password accepted (sealed, it fits `state::MAX_SEALED_PASSWORD`).
pub const MAX_ADMIN_PASSWORD: usize = 256;
// A staged rotation younger than `ROTATION_IN_FLIGHT_MS` may still be running on another node
// (its `ALTER ROLE` is fenced to one attempt deadline): a second rotation refuses to settle it,
// and `apply` refuses to replace it, since either could discard the password the database is
// about to take.
const _: () = assert!(ROTATION_IN_FLIGHT_MS > 2 * ATTEMPT_DEADLINE.as_millis() as u64);
/// Length of a rotated admin password (letters and digits: any client library takes them).
const ROOT_PASSWORD_LEN: u16 = 40;

/// A connection as an administrator describes it: its name, and where and as whom to connect
/// (the password in the clear, in memory only).
pub struct ConnectionInput {
    pub name: String,
    pub target: pg::Connection,
}

fn seal(node: &Node, name: &str, password: &str) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    node.fill_random(&mut nonce);
    seal_secret(
        &node.kek,
        &state::password_aad(name),
        password.as_bytes(),
        nonce,
    )
}

fn refused(name: &str, e: pg::Error) -> Error {
    Error::InvalidArgument(format!(
        "database connection {name:?} does not work, so it was not stored: {e}"
    ))
}

impl Node {
    /// Creates or replaces a connection, once it has been tried: a server that cannot be
    /// reached, a password it refuses or a user without CREATEROLE is a precise error, and
    /// nothing is stored.
    pub async fn put_db_connection(
        &self,
        actor: &Principal,
        input: ConnectionInput,
    ) -> Result<DbConnection, Error> {
        let t = input.target;
        if t.password.is_empty() || t.password.len() > MAX_ADMIN_PASSWORD {
            return Err(Error::InvalidArgument(format!(
                "the admin password must be 1 to {MAX_ADMIN_PASSWORD} bytes"
            )));
        }
        let conn = DbConnection {
            sealed_password: seal(self, &input.name, &t.password),
            name: input.name,
            host: t.host,
            port: t.port,
            database: t.database,
            user: t.user,
            sslmode: t.sslmode,
            ca_pem: t.ca_pem,
            pending_sealed_password: None,
            updated_ms: 0,
        };
        state::validate_db_connection(&conn)?;
        let pg_conn = self
            .pg_connection(&conn, &conn.sealed_password)
            .map_err(|e| refused(&conn.name, e))?;
        pg::check(&pg_conn, ATTEMPT_DEADLINE)
            .await
            .map_err(|e| refused(&conn.name, e))?;
        self.propose(Proposal {
            actor: actor.clone(),
            intent: Intent::PutDbConnection(conn.clone()),
        })
        .await?;
        self.db_connection_now(&conn.name)
    }

    /// The connection as this node has applied it.
    pub fn db_connection_now(&self, name: &str) -> Result<DbConnection, Error> {
        state::db_connection(&self.view, name)
            .map_err(|e| Error::Internal(e.to_string()))?
            .ok_or_else(|| Error::UnknownConnection(name.to_string()))
    }

    /// Rotates the connection user's password to one only the cluster knows: settle any
    /// unfinished rotation, stage the new password, `ALTER ROLE`, promote it.
    pub async fn rotate_db_root(
        &self,
        actor: &Principal,
        name: &str,
    ) -> Result<DbConnection, Error> {
        self.read_barrier().await?;
        let mut conn = self.db_connection_now(name)?;
        if conn.pending_sealed_password.is_some() {
            self.settle_unfinished_rotation(actor, &conn).await?;
            conn = self.db_connection_now(name)?;
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        self.fill_random(seed.as_mut());
        let policy = PasswordPolicy {
            length: ROOT_PASSWORD_LEN,
            classes: [CharClass::Lower, CharClass::Upper, CharClass::Digit].into(),
        };
        let new_password = password_from_seed(&seed, &policy);
        let staged = seal(self, name, &new_password);
        self.propose(Proposal {
            actor: actor.clone(),
            intent: Intent::StageRootPassword {
                name: name.to_string(),
                sealed_password: staged.clone(),
            },
        })
        .await?;
        let current = self
            .pg_connection(&conn, &conn.sealed_password)
            .map_err(|e| Error::Internal(e.to_string()))?;
        match pg::rotate_password(&current, &new_password, ATTEMPT_DEADLINE).await {
            Ok(()) => {}
            // The database may or may not have taken it (no answer, or no answer in time): the
            // pending password stays, and the next use of the connection (or the next
            // rotate-root, once the fenced `ALTER ROLE` can no longer commit) finds out which
            // works.
            Err(e) if e.outcome_unknown() => {
                return Err(Error::OutcomeUnknown(format!(
                    "the new password of {name:?} is staged, but the database did not confirm \
                     it ({e}); run rotate-root again in {} s to settle it",
                    ROTATION_IN_FLIGHT_MS / 1000
                )))
            }
            // Certainly not applied (no session, or the server refused and rolled back):
            // discard it.
            Err(e) => {
                self.settle_root(actor, name, &staged, false).await?;
                return Err(Error::Unavailable(format!(
                    "rotating the password of {name:?} failed, and the old one still works: {e}"
                )));
            }
        }
        match self.settle_root(actor, name, &staged, true).await {
            Ok(()) => {}
            // The leader's executor may have promoted it first (it found the old one refused).
            Err(Error::RootRotation { .. })
                if self.db_connection_now(name)?.sealed_password == staged => {}
            Err(e) => return Err(e),
        }
        self.db_connection_now(name)
    }

    /// A staged password whose rotation stopped halfway: whichever password the database takes
    /// is kept. Refused while the rotation may still be running elsewhere.
    async fn settle_unfinished_rotation(
        &self,
        actor: &Principal,
        conn: &DbConnection,
    ) -> Result<(), Error> {
        let Some(pending) = conn.pending_sealed_password.clone() else {
            return Ok(());
        };
        let age_ms = self.clock.now_ms().saturating_sub(conn.updated_ms);
        if age_ms < ROTATION_IN_FLIGHT_MS {
            return Err(Error::RootRotation {
                name: conn.name.clone(),
                why: format!(
                    "a rotation staged {} s ago may still be running; retry in {} s",
                    age_ms / 1000,
                    (ROTATION_IN_FLIGHT_MS - age_ms).div_ceil(1000)
                ),
            });
        }
        let works = |sealed: &[u8]| {
            let c = self.pg_connection(conn, sealed);
            async move {
                match c {
                    Ok(c) => pg::check(&c, ATTEMPT_DEADLINE).await,
                    Err(e) => Err(e),
                }
            }
        };
        match works(&conn.sealed_password).await {
            Ok(()) => self.settle_root(actor, &conn.name, &pending, false).await,
            Err(pg::Error::Authentication { .. }) => match works(&pending).await {
                Ok(()) => self.settle_root(actor, &conn.name, &pending, true).await,
                Err(e) => Err(Error::Unavailable(format!(
                    "neither the current nor the pending password of {:?} could be confirmed: \
                     {e}",
                    conn.name
                ))),
            },
            Err(e) => Err(Error::Unavailable(format!(
                "cannot settle the unfinished rotation of {:?}: {e}",
                conn.name
            ))),
        }
    }

    async fn settle_root(
        &self,
        actor: &Principal,
        name: &str,
        pending: &[u8],
        promote: bool,
    ) -> Result<(), Error> {
        self.propose(Proposal {
            actor: actor.clone(),
            intent: Intent::SettleRootPassword {
                name: name.to_string(),
                pending: pending.to_vec(),
                promote,
            },
        })
        .await
        .map(|_| ())
    }
}
