//! Connecting to the cluster: endpoints, TLS files and the caller's credential, from the flags
//! and the environment (`EPHEMERA_ADDR`, `EPHEMERA_CA`, `EPHEMERA_CERT`, `EPHEMERA_KEY`,
//! `EPHEMERA_TOKEN`, `EPHEMERA_ASSERTION`).

use anyhow::{bail, Context, Result};
use ephemera_client::{Client, TlsFiles};

use crate::Cli;

pub(crate) fn read_file(what: &str, path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// How to reach `endpoints`: TLS from `EPHEMERA_CA` (and the client identity), or plaintext
/// only when `--insecure-plaintext` asks for it and every endpoint is loopback. A missing
/// `EPHEMERA_CA` is an error, never a silent fall-back that would send a credential in clear.
pub(crate) fn transport(cli: &Cli, endpoints: &str) -> Result<Option<TlsFiles>> {
    let tls = tls_files(cli)?;
    if tls.is_none() {
        check_plaintext(cli.insecure_plaintext, endpoints)?;
    } else if cli.insecure_plaintext {
        bail!("--insecure-plaintext and EPHEMERA_CA contradict each other; unset one");
    }
    Ok(tls)
}

fn check_plaintext(asked: bool, endpoints: &str) -> Result<()> {
    if !asked {
        bail!(
            "EPHEMERA_CA is not set, and the CLI does not talk to the cluster without TLS: set \
             EPHEMERA_CA to the CA that signed the nodes' certificates (`source DIR/dev.env` \
             does), or pass --insecure-plaintext for a plaintext cluster on loopback"
        );
    }
    for endpoint in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        if !is_loopback_endpoint(endpoint) {
            bail!(
                "--insecure-plaintext is refused for {endpoint}: plaintext only to a loopback \
                 address; use TLS (EPHEMERA_CA) for anything else"
            );
        }
    }
    Ok(())
}

/// Whether `endpoint` (`host:port`, optionally `http://host:port/path`) names a loopback
/// address (or `localhost`).
fn is_loopback_endpoint(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// TLS settings from `EPHEMERA_CA`, `EPHEMERA_CERT` and `EPHEMERA_KEY` (or the flags).
fn tls_files(cli: &Cli) -> Result<Option<TlsFiles>> {
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => Some((
            read_file("EPHEMERA_CERT", c)?,
            read_file("EPHEMERA_KEY", k)?,
        )),
        (None, None) => None,
        _ => bail!("set both EPHEMERA_CERT and EPHEMERA_KEY, or neither"),
    };
    match &cli.tls_ca {
        Some(ca) => Ok(Some(TlsFiles {
            ca_pem: read_file("EPHEMERA_CA", ca)?,
            identity,
        })),
        None if identity.is_some() => {
            bail!("EPHEMERA_CERT and EPHEMERA_KEY need EPHEMERA_CA, the CA that signed the nodes' certificates")
        }
        None => Ok(None),
    }
}

pub(crate) fn client(cli: &Cli) -> Result<Client> {
    let addr = cli.addr.as_deref().context(
        "no endpoints: set EPHEMERA_ADDR (e.g. `source .ephemera-dev/dev.env`) or pass --addr",
    )?;
    client_at(cli, addr)
}

/// A client of `addr` (endpoints in the `EPHEMERA_ADDR` format) with `cli`'s credentials.
pub(crate) fn client_at(cli: &Cli, addr: &str) -> Result<Client> {
    let bearer = match (&cli.assertion_file, &cli.assertion) {
        (Some(path), _) => Some(read_file("--assertion-file", path)?.trim().to_string()),
        (None, Some(a)) => Some(a.clone()),
        (None, None) => cli.token.clone(),
    };
    Ok(Client::with_tls(
        addr,
        bearer,
        transport(cli, addr)?.as_ref(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_when_asked_and_only_to_loopback() {
        for ok in [
            "127.0.0.1:7000",
            "127.0.0.1:7000,127.0.0.1:7001",
            "http://127.0.0.1:8000/",
            "[::1]:7000",
            "localhost:7000",
            "127.8.9.10:1",
        ] {
            assert!(check_plaintext(true, ok).is_ok(), "{ok}");
            let e = check_plaintext(false, ok).unwrap_err().to_string();
            assert!(e.contains("EPHEMERA_CA"), "{e}");
        }
        for bad in [
            "10.0.0.5:7000",
            "127.0.0.1:7000,node-2.example:7000",
            "http://example.com:8000",
            "[2001:db8::1]:7000",
            "localhost.attacker.example:7000",
            "127.0.0.1.nip.io:7000",
        ] {
            let e = check_plaintext(true, bad).unwrap_err().to_string();
            assert!(e.contains("loopback"), "{bad}: {e}");
        }
    }
}
