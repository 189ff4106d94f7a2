//! Connecting to the cluster: endpoints, TLS files and the caller's credential, from the flags
//! and the environment (`EPHEMERA_ADDR`, `EPHEMERA_CA`, `EPHEMERA_CERT`, `EPHEMERA_KEY`,
//! `EPHEMERA_TOKEN`, `EPHEMERA_ASSERTION`).

use anyhow::{bail, Context, Result};
use ephemera_client::{Client, TlsFiles};

use crate::Cli;

pub(crate) fn read_file(what: &str, path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// TLS settings from `EPHEMERA_CA`, `EPHEMERA_CERT` and `EPHEMERA_KEY` (or the flags).
pub(crate) fn tls_files(cli: &Cli) -> Result<Option<TlsFiles>> {
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
    Ok(Client::with_tls(addr, bearer, tls_files(cli)?.as_ref())?)
}
