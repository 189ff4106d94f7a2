//! PostgreSQL logins for Ephemera's effect executor: create a login, extend its validity, drop
//! it, each over one connection with a deadline, and each idempotent, because the executor
//! retries until it has committed an outcome and a new leader may repeat what the old one did.
//!
//! - **Create**: when the role already exists (a create whose outcome was lost), its password
//!   and validity are set again, which is the same as creating it (the password is derived
//!   from the lease, so every attempt sets the same one); otherwise the role's creation
//!   statements run in one transaction.
//! - **Extend**: `ALTER ROLE … VALID UNTIL`, or the role's renew statements. A login that is
//!   gone is an error, not a success: the lease says it should exist.
//! - **Rotate** the connection user's own password.
//!
//! Everything but a drop commits under a fence: the server refuses the `COMMIT` once the
//! attempt's deadline has passed (see `commit_fence`), so a client that was paused cannot make
//! a login exist, or live longer, or change the admin password, after its caller gave up.
//! A drop landing late does no harm: it is final, and a login is never created again under the
//! same name.
//!
//! **Passwords never reach the server in the clear.** `{{password}}` expands to the password's
//! SCRAM-SHA-256 verifier (salted, 4096 iterations), which PostgreSQL stores as it is (as
//! `psql`'s `\password` does); the server's log (`log_statement`, a failing statement) and
//! `pg_stat_activity` can show that verifier, never the password. A role's creation statements
//! must therefore use `{{password}}` where PostgreSQL expects a password (`PASSWORD …`).
//! - **Drop**: a role that does not exist is success. Otherwise logins are stopped first
//!   (`NOLOGIN`), its sessions terminated (unless the role says not to), and then either the
//!   role's revocation statements run, or the default: `REASSIGN OWNED` to the connection's
//!   user, `DROP OWNED` (objects and privileges in this database), `DROP ROLE IF EXISTS`, in one
//!   transaction. A drop that leaves the role in place is an error.
//!
//! Every value put into a statement is quoted by PostgreSQL's own escaping functions
//! (`postgres-protocol`'s `escape_identifier` and `escape_literal`); nothing is concatenated
//! raw. Errors never carry the password: the server can echo part of a statement, so an error
//! text is scrubbed of it before it leaves this crate.

mod tls;

use std::time::Duration;

use ephemera_core::state::SslMode;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::{Client, NoTls};
use zeroize::Zeroizing;

/// Where the executor connects, and as whom.
pub struct Connection {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Zeroizing<String>,
    pub sslmode: SslMode,
    /// PEM certificates that sign the server's certificate (`verify-full`).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{} (sslmode={})",
            self.user,
            self.host,
            self.port,
            self.database,
            self.sslmode.as_str()
        )
    }
}

/// A role's statements (empty lists mean the defaults described above).
#[derive(Debug, Clone, Copy)]
pub struct Statements<'a> {
    pub creation: &'a [String],
    pub revocation: &'a [String],
    pub renew: &'a [String],
    pub terminate_sessions: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {target}: {message}")]
    Connect { target: String, message: String },
    /// The server refused the connection's user and password (SQLSTATE 28P01 or 28000): after
    /// a root rotation whose outcome was lost, the other password may be the right one.
    #[error("the database at {target} refused the connection's credentials")]
    Authentication { target: String },
    #[error("TLS to the database: {0}")]
    Tls(String),
    #[error("{what} did not finish within {secs}s")]
    Timeout { what: &'static str, secs: u64 },
    /// The server refused a statement: it did not take effect (its transaction rolled back).
    #[error("{what} failed: {message}")]
    Statement { what: String, message: String },
    /// The connection ended before the server answered: the statement may or may not have
    /// taken effect.
    #[error("{what}: the connection ended before the server answered ({message})")]
    Lost { what: String, message: String },
    #[error("the login {0} does not exist")]
    Missing(String),
    #[error("the revocation statements left the login {0} in place")]
    StillThere(String),
}

impl Error {
    /// Whether the operation may have taken effect although it failed (its reply was lost, or
    /// its deadline passed while the server was working).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Lost { .. })
    }

    /// Whether the failure shows that the connection's password was accepted: a session was
    /// open and the server answered in it.
    pub fn session_was_open(&self) -> bool {
        matches!(
            self,
            Error::Statement { .. } | Error::Missing(_) | Error::StillThere(_)
        )
    }
}

/// `valid_until_ms` as a PostgreSQL `timestamptz` literal's text (UTC, millisecond precision).
pub fn timestamp(valid_until_ms: u64) -> String {
    let secs = valid_until_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        valid_until_ms % 1000
    )
}

/// A statement template with its placeholders replaced by quoted values: `{{name}}` by the
/// quoted identifier, `{{password}}` (the caller passes the password's verifier, see
/// [`verifier`]) and `{{expiration}}` by quoted literals. A placeholder
/// without a value is an error (the role's validation makes that impossible for its own
/// statements).
pub fn render(
    template: &str,
    name: &str,
    password: Option<&str>,
    expiration: Option<&str>,
) -> Result<Zeroizing<String>, String> {
    let mut out = Zeroizing::new(String::with_capacity(template.len() + 64));
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "an unclosed placeholder".to_string())?;
        let value = match &after[..end] {
            "name" => escape_identifier(name),
            "password" => escape_literal(password.ok_or("{{password}} has no value here")?),
            "expiration" => escape_literal(expiration.ok_or("{{expiration}} has no value here")?),
            other => return Err(format!("unknown placeholder {{{{{other}}}}}")),
        };
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What the server is sent in place of `password`: its SCRAM-SHA-256 verifier, from a fresh
/// salt (so two attempts for one login send different verifiers of the same password).
pub fn verifier(password: &str) -> Zeroizing<String> {
    Zeroizing::new(postgres_protocol::password::scram_sha_256(
        password.as_bytes(),
    ))
}

/// Bounds `op` by `deadline`.
async fn within<T>(
    what: &'static str,
    deadline: Duration,
    op: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(deadline, op)
        .await
        .unwrap_or(Err(Error::Timeout {
            what,
            secs: deadline.as_secs(),
        }))
}

/// A session as `c`'s user, with `c`'s TLS rules (what a relying party's client does; the
/// operations below each open their own).
pub async fn connect(c: &Connection, deadline: Duration) -> Result<Client, Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&c.host)
        .port(c.port)
        .dbname(&c.database)
        .user(&c.user)
        .password(c.password.as_bytes())
        .application_name("ephemera")
        // The server ends a statement the client has given up on, and a transaction left
        // open by a client that stopped, so an attempt's effects and locks end with its
        // deadline on the server too (the executor's hold-off relies on that).
        .options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} \
             -c idle_in_transaction_session_timeout={ms}",
            ms = deadline.as_millis().max(1)
        ))
        .connect_timeout(deadline);
    let target = format!("{}:{}/{}", c.host, c.port, c.database);
    let failed = |e: tokio_postgres::Error| {
        let refused = e
            .as_db_error()
            .is_some_and(|db| matches!(db.code().code(), "28P01" | "28000"));
        if refused {
            Error::Authentication {
                target: target.clone(),
            }
        } else {
            Error::Connect {
                target: target.clone(),
                message: scrub(&e.to_string(), &[c.password.as_str()]),
            }
        }
    };
    let client = match c.sslmode {
        SslMode::Disable => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = cfg.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(drive(conn));
            client
        }
        SslMode::Require | SslMode::VerifyFull => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = tls::connector(c.sslmode, c.ca_pem.as_deref())?;
            let (client, conn) = cfg.connect(tls).await.map_err(failed)?;
            tokio::spawn(drive(conn));
            client
        }
    };
    Ok(client)
}

/// Runs a connection until its client is dropped (then it ends by itself).
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(conn: F) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "database connection ended");
    }
}

/// Error text with every secret removed (the server may echo part of a statement).
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "<redacted>");
    }
    out
}

fn statement_error(what: impl Into<String>, e: tokio_postgres::Error, secrets: &[&str]) -> Error {
    // The server's own message (code and text) says what went wrong; the wrapper's does not.
    match e.as_db_error() {
        Some(db) => Error::Statement {
            what: what.into(),
            message: scrub(&format!("{} ({})", db.message(), db.code().code()), secrets),
        },
        // No answer from the server (the connection closed or broke): the outcome is unknown.
        None => Error::Lost {
            what: what.into(),
            message: scrub(&e.to_string(), secrets),
        },
    }
}

async fn exists(client: &Client, name: &str) -> Result<bool, Error> {
    let rows = client
        .query(
            "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await
        .map_err(|e| statement_error("looking the login up", e, &[]))?;
    Ok(!rows.is_empty())
}

/// Runs a role's `statements` of one `kind` (creation, renew, revocation) in one transaction,
/// each rendered with `(name, password, expiration)`; an error names the statement.
async fn in_transaction(
    client: &mut Client,
    kind: &str,
    statements: &[String],
    (name, password, expiration): (&str, Option<&str>, Option<&str>),
    secrets: &[&str],
    fence: Option<std::time::Instant>,
) -> Result<(), Error> {
    let commit = match fence {
        None => "COMMIT".to_string(),
        Some(at) => commit_fence(client, at).await?,
    };
    // An error drops the connection with the transaction open: the server rolls it back.
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| statement_error(format!("beginning the {kind}"), e, secrets))?;
    for (i, template) in statements.iter().enumerate() {
        let what = format!("{kind} statement {}", i + 1);
        let sql = match render(template, name, password, expiration) {
            Ok(sql) => sql,
            Err(message) => return Err(Error::Statement { what, message }),
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| statement_error(what, e, secrets))?;
    }
    client
        .batch_execute(&commit)
        .await
        .map_err(|e| statement_error(format!("committing the {kind}"), e, secrets))
}

/// A `COMMIT` that the server refuses once the attempt's deadline (`at`, on this machine's
/// monotonic clock) has passed, whatever happened to this process in between (a paused or
/// descheduled leader resuming late): the deadline is translated into the server's own clock
/// now (its time plus what remains), and checked by the server in the same message as the
/// `COMMIT`, so no gap is left between the check and the commit.
async fn commit_fence(client: &Client, at: std::time::Instant) -> Result<String, Error> {
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(|e| statement_error("reading the server's clock", e, &[]))?;
    let server_ms = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    let remaining = at.saturating_duration_since(std::time::Instant::now());
    if remaining.is_zero() {
        return Err(Error::Timeout {
            what: "the attempt",
            secs: 0,
        });
    }
    let fence = escape_literal(&timestamp(server_ms + remaining.as_millis() as u64));
    Ok(format!(
        "DO $fence$ BEGIN IF clock_timestamp() > {fence}::timestamptz THEN \
         RAISE EXCEPTION 'the attempt''s deadline passed before its commit'; END IF; END \
         $fence$; COMMIT"
    ))
}

/// Checks that the connection works and that its user may create logins.
pub async fn check(c: &Connection, deadline: Duration) -> Result<(), Error> {
    within("checking the connection", deadline, async {
        let client = connect(c, deadline).await?;
        let row = client
            .query_one(
                "SELECT rolcreaterole OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| statement_error("reading the connection user's privileges", e, &[]))?;
        if row.get::<_, bool>(0) {
            Ok(())
        } else {
            Err(Error::Statement {
                what: "checking the connection user".into(),
                message: format!("{} may not create roles (CREATEROLE)", c.user),
            })
        }
    })
    .await
}

/// Sets the connection user's own password to `new_password` (a root rotation), over a
/// connection made with the current one. Fenced: the server refuses to commit the change once
/// `deadline` has passed, so a rotation its caller gave up on cannot land later.
pub async fn rotate_password(
    c: &Connection,
    new_password: &str,
    deadline: Duration,
) -> Result<(), Error> {
    let fence = std::time::Instant::now() + deadline;
    let verifier = verifier(new_password);
    let secrets = [new_password, c.password.as_str(), verifier.as_str()];
    within("rotating the connection's password", deadline, async {
        let mut client = connect(c, deadline).await?;
        let statements = ["ALTER ROLE CURRENT_USER WITH PASSWORD {{password}}".to_string()];
        let values = ("", Some(verifier.as_str()), None);
        in_transaction(
            &mut client,
            "rotation",
            &statements,
            values,
            &secrets,
            Some(fence),
        )
        .await
    })
    .await
}

/// Creates the login `name` with `password`, valid until `valid_until_ms`, within `deadline`
/// (after which the server refuses to commit it, whatever happened to this process).
pub async fn create_login(
    c: &Connection,
    st: &Statements<'_>,
    name: &str,
    password: &str,
    valid_until_ms: u64,
    deadline: Duration,
) -> Result<(), Error> {
    let fence = std::time::Instant::now() + deadline;
    create_login_fenced(c, st, (name, password, valid_until_ms), fence, deadline).await
}

/// [`create_login`] with the commit fence apart from the client's own deadline. Public for the
/// test that shows the server enforcing the fence when the client's timer did not fire (as for
/// a process that was stopped); the executor uses [`create_login`].
#[doc(hidden)]
pub async fn create_login_fenced(
    c: &Connection,
    st: &Statements<'_>,
    (name, password, valid_until_ms): (&str, &str, u64),
    fence: std::time::Instant,
    deadline: Duration,
) -> Result<(), Error> {
    let verifier = verifier(password);
    let secrets = [password, c.password.as_str(), verifier.as_str()];
    let expiration = timestamp(valid_until_ms);
    within("creating the login", deadline, async {
        let mut client = connect(c, deadline).await?;
        let values = (name, Some(verifier.as_str()), Some(expiration.as_str()));
        let reset = [
            "ALTER ROLE {{name}} WITH LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}"
                .to_string(),
        ];
        let (kind, statements) = if exists(&client, name).await? {
            ("reset of the existing login", &reset[..])
        } else {
            ("creation", st.creation)
        };
        // Fenced: a create must never land after its deadline, where a new leader's drop of
        // the same login may already have run.
        in_transaction(&mut client, kind, statements, values, &secrets, Some(fence)).await
    })
    .await
}

/// Moves the login's validity to `valid_until_ms`; fenced like a create (a late extend could
/// move the validity back, under a newer one).
pub async fn extend_login(
    c: &Connection,
    st: &Statements<'_>,
    name: &str,
    valid_until_ms: u64,
    deadline: Duration,
) -> Result<(), Error> {
    let fence = std::time::Instant::now() + deadline;
    let secrets = [c.password.as_str()];
    let expiration = timestamp(valid_until_ms);
    let default = ["ALTER ROLE {{name}} VALID UNTIL {{expiration}}".to_string()];
    let statements = if st.renew.is_empty() {
        &default[..]
    } else {
        st.renew
    };
    within("extending the login", deadline, async {
        let mut client = connect(c, deadline).await?;
        if !exists(&client, name).await? {
            return Err(Error::Missing(name.to_string()));
        }
        let values = (name, None, Some(expiration.as_str()));
        in_transaction(
            &mut client,
            "renew",
            statements,
            values,
            &secrets,
            Some(fence),
        )
        .await
    })
    .await
}

/// Drops the login `name`; success when it does not exist.
pub async fn drop_login(
    c: &Connection,
    st: &Statements<'_>,
    name: &str,
    deadline: Duration,
) -> Result<(), Error> {
    let secrets = [c.password.as_str()];
    within("dropping the login", deadline, async {
        let mut client = connect(c, deadline).await?;
        if !exists(&client, name).await? {
            return Ok(());
        }
        let run = |template: &str| render(template, name, None, None);
        let bad = |m: String| Error::Statement {
            what: "rendering the revocation".into(),
            message: m,
        };
        // No new sessions from here on, then the open ones end.
        client
            .batch_execute(&run("ALTER ROLE {{name}} NOLOGIN").map_err(bad)?)
            .await
            .map_err(|e| statement_error("disabling the login", e, &secrets))?;
        if st.terminate_sessions {
            client
                .execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                     WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
                    &[&name],
                )
                .await
                .map_err(|e| statement_error("terminating the login's sessions", e, &secrets))?;
        }
        let default = [
            "REASSIGN OWNED BY {{name}} TO CURRENT_USER".to_string(),
            "DROP OWNED BY {{name}}".to_string(),
            "DROP ROLE IF EXISTS {{name}}".to_string(),
        ];
        let statements = if st.revocation.is_empty() {
            &default[..]
        } else {
            st.revocation
        };
        in_transaction(
            &mut client,
            "revocation",
            statements,
            (name, None, None),
            &secrets,
            None,
        )
        .await?;
        if exists(&client, name).await? {
            return Err(Error::StillThere(name.to_string()));
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_literals() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14 22:13:20.123+00");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00.000+00");
        assert_eq!(timestamp(4_102_444_799_999), "2099-12-31 23:59:59.999+00");
    }

    #[test]
    fn values_are_quoted_by_postgres_escaping_not_concatenated() {
        let sql = render(
            "CREATE ROLE {{name}} PASSWORD {{password}} VALID UNTIL {{expiration}}",
            "a\"b",
            Some("p'w\\d"),
            Some("2030-01-01 00:00:00.000+00"),
        )
        .unwrap();
        assert_eq!(
            *sql,
            "CREATE ROLE \"a\"\"b\" PASSWORD  E'p''w\\\\d' VALID UNTIL '2030-01-01 00:00:00.000+00'"
        );
        // A value that looks like a placeholder is not expanded again.
        let sql = render("{{name}} {{password}}", "{{password}}", Some("x"), None).unwrap();
        assert_eq!(*sql, "\"{{password}}\" 'x'");
        assert!(render("{{password}}", "n", None, None).is_err());
        assert!(render("{{nope}}", "n", None, None).is_err());
    }

    #[test]
    fn secrets_are_scrubbed_from_error_text() {
        assert_eq!(
            scrub("syntax error at or near \"hunter2\"", &["hunter2", ""]),
            "syntax error at or near \"<redacted>\""
        );
    }
}
