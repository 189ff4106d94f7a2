//! `ephemera exec`: a credential bound to the life of a command. The wrapper issues it, hands
//! it to the child (an environment variable, and a 0600 file if asked), renews it before
//! `renew_after`, forwards SIGINT, SIGTERM and SIGHUP to the child (SIGKILL once the grace
//! period after SIGINT or SIGTERM is over), and revokes the lease when the child ends, whatever
//! the reason. A `kill -9` of the wrapper leaves only the credential's TTL.
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

pub async fn run(cli: &Cli, a: &ExecArgs) -> Result<i32> {
    let on_denied = parse_on_denied(a.on_renew_denied.as_deref())?;
    let grace = Duration::from_secs(parse_duration_s(&a.grace)?);
    let ttl_s = a.issue.ttl.as_deref().map(parse_duration_s).transpose()?;
    let mut signals = Signals {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
    };
    let c = client(cli)?;
    loop {
        let cred = c
            .issue(pb::IssueRequest {
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
            })
            .await
            .context("issuing the credential")?;
        let ended = supervise(&c, &cred, a, (grace, on_denied), &mut signals).await;
        // Whatever happened, the lease ends with the run.
        if let Some(f) = &a.file {
            let _ = std::fs::remove_file(f);
        }
        revoke(&c, &cred).await;
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

/// The credential's secret text and the extra variables of its kind.
fn secret_of(cred: &pb::Credential) -> (String, Vec<(&'static str, String)>) {
    match &cred.body {
        Some(pb::credential::Body::Postgres(p)) => (
            p.password.clone(),
            vec![
                ("PGUSER", p.username.clone()),
                ("PGPASSWORD", p.password.clone()),
                ("PGHOST", p.host.clone()),
                ("PGPORT", p.port.to_string()),
                ("PGDATABASE", p.database.clone()),
            ],
        ),
        _ => (cred.token.clone(), Vec::new()),
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

/// Runs the child once with `cred`, renewing it, until the child ends (or is stopped for a
/// restart).
async fn supervise(
    c: &Client,
    cred: &pb::Credential,
    a: &ExecArgs,
    (grace, on_denied): (Duration, OnDenied),
    signals: &mut Signals,
) -> Result<Ended> {
    let (secret, extra) = secret_of(cred);
    if let Some(f) = &a.file {
        write_secret(f, &secret)?;
    }
    let mut command = tokio::process::Command::new(&a.command[0]);
    command.args(&a.command[1..]);
    for name in WRAPPER_CREDENTIALS {
        command.env_remove(name);
    }
    let mut child = command
        .env(&a.env, &secret)
        .env("EPHEMERA_LEASE_ID", &cred.lease_id)
        .envs(extra)
        .spawn()
        .with_context(|| format!("cannot start {:?}", a.command[0]))?;
    let Some(pid) = child.id() else {
        bail!("the child ended before it could be supervised");
    };
    let pid = pid as i32;
    let result = run_child(c, cred, a, (grace, on_denied), signals, &mut child, pid).await;
    if result.is_err() {
        // The wrapper cannot supervise any more: the child must not outlive its credential.
        // SAFETY: kill(2) with the child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait().await;
    }
    result
}

async fn run_child(
    c: &Client,
    cred: &pb::Credential,
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
    let mut current = cred.clone();
    let mut renewing = true;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut restart = false;
    loop {
        let renew_in = crate::util::until_ms(current.renew_after_ms);
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
            _ = tokio::time::sleep(renew_in), if renewing => {
                match renew(c, &current).await {
                    Ok(next) => {
                        current = next;
                        if let Some(f) = &a.file {
                            write_secret(f, &secret_of(&current).0)?;
                        }
                    }
                    Err(e) if refused_by_policy(&e) => {
                        renewing = false;
                        eprintln!("ephemera exec: renewal refused: {e}");
                        match on_denied {
                            OnDenied::Nothing => {}
                            OnDenied::Signal(sig) => send(sig),
                            OnDenied::Restart | OnDenied::Exit => {
                                restart = on_denied == OnDenied::Restart;
                                send(libc::SIGTERM);
                                kill_at = Some(tokio::time::Instant::now() + grace);
                            }
                        }
                    }
                    Err(e) => {
                        // At its cap, or the cluster unreachable: the credential lives on until
                        // it expires; try again later unless it cannot be extended at all.
                        eprintln!("ephemera exec: renewal failed: {e}");
                        if e.code() == Some(tonic::Code::FailedPrecondition) {
                            renewing = false;
                        } else {
                            current.renew_after_ms = crate::util::now_ms() + 5_000;
                        }
                    }
                }
            }
        }
    }
}

async fn renew(c: &Client, cred: &pb::Credential) -> Result<pb::Credential, ClientError> {
    c.renew(pb::RenewRequest {
        lease_id: cred.lease_id.clone(),
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
