//! `ephemera exec`: a credential bound to the life of a command. The wrapper issues it, hands
//! it to the child (an environment variable, and a 0600 file if asked), renews it before
//! `renew_after`, forwards SIGINT, SIGTERM and SIGHUP to the child (SIGKILL once the grace
//! period after SIGINT or SIGTERM is over), and revokes the lease when the child ends, whatever
//! the reason. A `kill -9` of the wrapper leaves only the credential's TTL.
//!
//! `--with ROLE[=ENV]` gives the child more credentials, each renewed on its own schedule. They
//! are issued one after another before the child starts; if one cannot be issued, those already
//! issued are revoked and the child never runs. One renewal is in flight at a time, beside the
//! child and the signals, so a slow cluster never delays a forwarded signal or the exit.
//!
//! The child does not inherit the wrapper's own cluster credentials (`EPHEMERA_TOKEN`,
//! `EPHEMERA_ASSERTION`, `EPHEMERA_CERT`, `EPHEMERA_KEY` and dev's approver pair): it holds
//! only the credential it was given, which ends with it. If the wrapper fails after the child
//! started, it kills the child (and waits for it) before it revokes.
//!
//! Exit status: the child's, or 128 + the signal that ended it; 1 when the wrapper itself
//! failed.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ephemera_client::{pb, Client, ClientError};
use tokio::signal::unix::{signal, SignalKind};

use crate::connect::client;
use crate::util::{parse_duration_s, split_list};
use crate::{Cli, IssueArgs};

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub issue: IssueArgs,
    /// The environment variable that carries the credential (a JWT, a certificate, a password).
    #[arg(long, default_value = "EPHEMERA_CREDENTIAL")]
    pub env: String,
    /// Also write the credential to this file (mode 0600), rewritten at each renewal and
    /// removed at exit.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// How long the child has after a forwarded SIGINT or SIGTERM before it is killed.
    #[arg(long, default_value = "30s")]
    pub grace: String,
    /// Another credential for the child, of a role's defaults: `ROLE` (in
    /// `EPHEMERA_CREDENTIAL_ROLE`) or `ROLE=ENV_NAME`; repeatable. Its lease id is in
    /// `ENV_NAME_LEASE_ID`, a PostgreSQL login's user name in `ENV_NAME_USER`.
    #[arg(long = "with", value_name = "ROLE[=ENV]")]
    pub with: Vec<String>,
    /// What to do when policy refuses a renewal: `signal:NAME` (tell the child, e.g.
    /// `signal:SIGHUP`), `restart` (stop the child, issue anew, start it again) or `exit`
    /// (stop the child). By default the child runs on until the credential expires.
    #[arg(long)]
    pub on_renew_denied: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// What to do when a renewal is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDenied {
    Nothing,
    Signal(i32),
    Restart,
    Exit,
}

fn parse_on_denied(s: Option<&str>) -> Result<OnDenied> {
    Ok(match s {
        None => OnDenied::Nothing,
        Some("restart") => OnDenied::Restart,
        Some("exit") => OnDenied::Exit,
        Some(s) => match s.strip_prefix("signal:").map(signal_number) {
            Some(Some(n)) => OnDenied::Signal(n),
            _ => bail!(
                "--on-renew-denied must be signal:NAME (SIGHUP, SIGUSR1, SIGUSR2, SIGTERM, \
                 SIGINT), restart or exit; not {s:?}"
            ),
        },
    })
}

fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        _ => return None,
    })
}

/// The wrapper's own credentials, which the child must not inherit.
const WRAPPER_CREDENTIALS: [&str; 6] = [
    "EPHEMERA_TOKEN",
    "EPHEMERA_ASSERTION",
    "EPHEMERA_CERT",
    "EPHEMERA_KEY",
    "EPHEMERA_APPROVER_CERT",
    "EPHEMERA_APPROVER_KEY",
];

/// The signals forwarded to the child, registered before anything is issued (so that one that
/// arrives early does not end the wrapper with the lease left to its TTL).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// How one run of the child ended.
enum Ended {
    Exited(i32),
    /// A renewal was refused and the child was stopped to start again.
    Restart,
}

/// One credential the child holds, and where it finds it.
struct Held {
    cred: pb::Credential,
    /// The variable with its secret (`--env` for the first, `--with`'s name for the others).
    env: String,
    /// The first credential: its lease id is `EPHEMERA_LEASE_ID`, a PostgreSQL login sets the
    /// `PG*` variables, and `--file` holds it.
    first: bool,
    renewing: bool,
}

/// `--with ROLE[=ENV]`: another credential, of the role's defaults, in `ENV` (by default
/// `EPHEMERA_CREDENTIAL_` and the role's name in capitals, other characters as `_`).
fn parse_with(spec: &str) -> Result<(String, String)> {
    let (role, env) = match spec.split_once('=') {
        Some((role, env)) => (role.to_string(), env.to_string()),
        None => {
            let suffix: String = spec
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            (spec.to_string(), format!("EPHEMERA_CREDENTIAL_{suffix}"))
        }
    };
    let valid_env = !env.is_empty()
        && !env.starts_with(|c: char| c.is_ascii_digit())
        && env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if role.is_empty() || !valid_env {
        bail!("--with must be ROLE or ROLE=ENV_NAME, not {spec:?}");
    }
    Ok((role, env))
}

pub async fn run(cli: &Cli, a: &ExecArgs) -> Result<i32> {
    let on_denied = parse_on_denied(a.on_renew_denied.as_deref())?;
    let grace = Duration::from_secs(parse_duration_s(&a.grace)?);
    let ttl_s = a.issue.ttl.as_deref().map(parse_duration_s).transpose()?;
    let with = a
        .with
        .iter()
        .map(|w| parse_with(w))
        .collect::<Result<Vec<_>>>()?;
    // Every variable the child gets from the wrapper, so no two credentials share one.
    let mut names: Vec<String> = ["EPHEMERA_LEASE_ID", "PGUSER", "PGPASSWORD", "PGHOST"]
        .into_iter()
        .chain(["PGPORT", "PGDATABASE"])
        .map(String::from)
        .chain(std::iter::once(a.env.clone()))
        .collect();
    for (_, env) in &with {
        names.extend([
            env.clone(),
            format!("{env}_LEASE_ID"),
            format!("{env}_USER"),
        ]);
    }
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two credentials would share the variable {}", w[0]);
    }
    let mut signals = Signals {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
    };
    let c = client(cli)?;
    let first = pb::IssueRequest {
        role: a.issue.role.clone(),
        ttl_s,
        scopes: split_list(&a.issue.scopes),
        audience: a.issue.audience.clone(),
        purpose: a.issue.purpose.clone(),
        request_id: None,
        subject: a.issue.subject.clone(),
        environment: a.issue.context.environment.clone(),
        job_id: a.issue.context.job_id.clone(),
        kind: None,
    };
    let requests: Vec<(pb::IssueRequest, String)> = std::iter::once((first.clone(), a.env.clone()))
        .chain(with.into_iter().map(|(role, env)| {
            let req = pb::IssueRequest {
                role,
                ttl_s: None,
                scopes: Vec::new(),
                audience: None,
                ..first.clone()
            };
            (req, env)
        }))
        .collect();
    loop {
        // Every lease issued here is revoked before the wrapper returns, including when a later
        // one cannot be issued.
        let mut held: Vec<Held> = Vec::new();
        let mut issued = Ok(());
        for (req, env) in &requests {
            match c.issue(req.clone()).await {
                Ok(cred) => held.push(Held {
                    cred,
                    env: env.clone(),
                    first: held.is_empty(),
                    renewing: true,
                }),
                Err(e) => {
                    issued = Err(anyhow::Error::new(e))
                        .with_context(|| format!("issuing a credential of role {}", req.role));
                    break;
                }
            }
        }
        let ended = match issued {
            Ok(()) => supervise(&c, &mut held, a, (grace, on_denied), &mut signals).await,
            Err(e) => Err(e),
        };
        // Whatever happened, the leases end with the run.
        if let Some(f) = &a.file {
            let _ = std::fs::remove_file(f);
        }
        for h in &held {
            revoke(&c, &h.cred).await;
        }
        match ended? {
            Ended::Exited(code) => return Ok(code),
            Ended::Restart => eprintln!("ephemera exec: renewal refused; starting again"),
        }
    }
}

async fn revoke(c: &Client, cred: &pb::Credential) {
    let req = pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::LeaseId(cred.lease_id.clone())),
    };
    if let Err(e) = c.revoke(req).await {
        eprintln!(
            "ephemera exec: warning: revoking lease {} failed ({e}); it expires by itself at \
             {}",
            cred.lease_id,
            crate::util::fmt_time(cred.expires_at_ms)
        );
    }
}

/// The credential's secret text and the extra variables of its kind: for the first credential
/// a PostgreSQL login's `PG*` variables, for another its user name in `{ENV}_USER`.
fn secret_of(h: &Held) -> (String, Vec<(String, String)>) {
    match &h.cred.body {
        Some(pb::credential::Body::Postgres(p)) if h.first => (
            p.password.clone(),
            vec![
                ("PGUSER".into(), p.username.clone()),
                ("PGPASSWORD".into(), p.password.clone()),
                ("PGHOST".into(), p.host.clone()),
                ("PGPORT".into(), p.port.to_string()),
                ("PGDATABASE".into(), p.database.clone()),
            ],
        ),
        Some(pb::credential::Body::Postgres(p)) => (
            p.password.clone(),
            vec![(format!("{}_USER", h.env), p.username.clone())],
        ),
        _ => (h.cred.token.clone(), Vec::new()),
    }
}

/// Writes `secret` to `path` atomically: a new 0600 file beside it, renamed over it, so a
/// reader sees the old credential or the new one, never a part, and a file or symlink already
/// at `path` neither keeps its mode nor redirects the write.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Runs the child once with the credentials, renewing them, until the child ends (or is
/// stopped for a restart).
async fn supervise(
    c: &Client,
    held: &mut [Held],
    a: &ExecArgs,
    (grace, on_denied): (Duration, OnDenied),
    signals: &mut Signals,
) -> Result<Ended> {
    if let Some(f) = &a.file {
        write_secret(f, &secret_of(&held[0]).0)?;
    }
    let mut command = tokio::process::Command::new(&a.command[0]);
    command.args(&a.command[1..]);
    for name in WRAPPER_CREDENTIALS {
        command.env_remove(name);
    }
    for h in held.iter() {
        let (secret, extra) = secret_of(h);
        let lease_var = if h.first {
            "EPHEMERA_LEASE_ID".to_string()
        } else {
            format!("{}_LEASE_ID", h.env)
        };
        command
            .env(&h.env, secret)
            .env(lease_var, &h.cred.lease_id)
            .envs(extra);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {:?}", a.command[0]))?;
    let Some(pid) = child.id() else {
        bail!("the child ended before it could be supervised");
    };
    let pid = pid as i32;
    let result = run_child(c, held, a, (grace, on_denied), signals, &mut child, pid).await;
    if result.is_err() {
        // The wrapper cannot supervise any more: the child must not outlive its credential.
        // SAFETY: kill(2) with the child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait().await;
    }
    result
}

/// The credential to renew next, and when; `None` when none is being renewed.
fn next_renewal(held: &[Held]) -> Option<(usize, u64)> {
    held.iter()
        .enumerate()
        .filter(|(_, h)| h.renewing)
        .map(|(i, h)| (i, h.cred.renew_after_ms))
        .min_by_key(|(_, at)| *at)
}

async fn run_child(
    c: &Client,
    held: &mut [Held],
    a: &ExecArgs,
    (grace, on_denied): (Duration, OnDenied),
    signals: &mut Signals,
    child: &mut tokio::process::Child,
    pid: i32,
) -> Result<Ended> {
    let send = |sig: i32| {
        // SAFETY: kill(2) with the child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, sig) };
    };
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut restart = false;
    // At most one renewal in flight, polled by the loop beside the child and the signals, so a
    // slow cluster never delays forwarding a signal or noticing the child's exit (each call is
    // bounded by the client's deadline).
    type InFlight<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = (usize, Result<pb::Credential, ClientError>)> + 'a>,
    >;
    let mut in_flight: Option<InFlight<'_>> = None;
    // Renewals start at least a second apart: a client clock ahead of the cluster's must not
    // turn them into a loop.
    let mut earliest = tokio::time::Instant::now();
    loop {
        let due = match (&in_flight, next_renewal(held)) {
            (None, Some((i, at))) => {
                let at = tokio::time::Instant::now() + crate::util::until_ms(at);
                Some((i, at.max(earliest)))
            }
            _ => None,
        };
        tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for the child")?;
                if restart {
                    return Ok(Ended::Restart);
                }
                let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                return Ok(Ended::Exited(code));
            }
            // A stop asked for by the user is final, even during a restart.
            _ = signals.int.recv() => {
                restart = false;
                send(libc::SIGINT);
                kill_at.get_or_insert(tokio::time::Instant::now() + grace);
            }
            _ = signals.term.recv() => {
                restart = false;
                send(libc::SIGTERM);
                kill_at.get_or_insert(tokio::time::Instant::now() + grace);
            }
            _ = signals.hup.recv() => send(libc::SIGHUP),
            _ = async { tokio::time::sleep_until(kill_at.expect("set")).await }, if kill_at.is_some() => {
                eprintln!("ephemera exec: the child did not stop within {grace:?}; killing it");
                send(libc::SIGKILL);
                kill_at = None;
            }
            _ = async { tokio::time::sleep_until(due.expect("set").1).await }, if due.is_some() => {
                let i = due.expect("set").0;
                earliest = tokio::time::Instant::now() + Duration::from_secs(1);
                let lease_id = held[i].cred.lease_id.clone();
                in_flight = Some(Box::pin(async move { (i, renew(c, &lease_id).await) }));
            }
            (i, renewed) = async { in_flight.as_mut().expect("set").await }, if in_flight.is_some() => {
                in_flight = None;
                let h = &mut held[i];
                match renewed {
                    Ok(next) => {
                        h.cred = next;
                        if let (true, Some(f)) = (h.first, &a.file) {
                            write_secret(f, &secret_of(h).0)?;
                        }
                    }
                    Err(e) if refused_by_policy(&e) => {
                        h.renewing = false;
                        eprintln!("ephemera exec: renewal of lease {} refused: {e}", h.cred.lease_id);
                        match on_denied {
                            OnDenied::Nothing => {}
                            OnDenied::Signal(sig) => send(sig),
                            OnDenied::Restart | OnDenied::Exit => {
                                restart = on_denied == OnDenied::Restart;
                                send(libc::SIGTERM);
                                kill_at.get_or_insert(tokio::time::Instant::now() + grace);
                            }
                        }
                    }
                    Err(e) => {
                        // At its cap, or the cluster unreachable: the credential lives on until
                        // it expires; try again later unless it cannot be extended at all.
                        eprintln!("ephemera exec: renewal of lease {} failed: {e}", h.cred.lease_id);
                        if e.code() == Some(tonic::Code::FailedPrecondition) {
                            h.renewing = false;
                        } else {
                            h.cred.renew_after_ms = crate::util::now_ms() + 5_000;
                        }
                    }
                }
            }
        }
    }
}

async fn renew(c: &Client, lease_id: &str) -> Result<pb::Credential, ClientError> {
    c.renew(pb::RenewRequest {
        lease_id: lease_id.to_string(),
        ..Default::default()
    })
    .await
}

fn refused_by_policy(e: &ClientError) -> bool {
    e.code() == Some(tonic::Code::PermissionDenied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_names_a_role_and_a_variable() {
        assert_eq!(
            parse_with("db-ro").unwrap(),
            ("db-ro".into(), "EPHEMERA_CREDENTIAL_DB_RO".into())
        );
        assert_eq!(
            parse_with("tools=TOOL_TOKEN").unwrap(),
            ("tools".into(), "TOOL_TOKEN".into())
        );
        for bad in ["", "=X", "r=", "r=1X", "r=A-B", "r=A B"] {
            assert!(parse_with(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn on_renew_denied_is_parsed_precisely() {
        assert_eq!(parse_on_denied(None).unwrap(), OnDenied::Nothing);
        assert_eq!(
            parse_on_denied(Some("signal:SIGHUP")).unwrap(),
            OnDenied::Signal(libc::SIGHUP)
        );
        assert_eq!(
            parse_on_denied(Some("signal:USR1")).unwrap(),
            OnDenied::Signal(libc::SIGUSR1)
        );
        assert_eq!(parse_on_denied(Some("restart")).unwrap(), OnDenied::Restart);
        assert_eq!(parse_on_denied(Some("exit")).unwrap(), OnDenied::Exit);
        for bad in ["signal:SIGKILL", "signal:", "reboot"] {
            assert!(parse_on_denied(Some(bad)).is_err(), "{bad}");
        }
    }
}
