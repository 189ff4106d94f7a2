//! `ephemera pki`: the certificates a production cluster starts from, for operators without a
//! PKI of their own: a cluster CA, the nodes' bootstrap certificates, and client identities
//! (administrators). Keys are written 0600 and never overwrite an existing file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ephemera_pki::{Ca, LeafUse, SpiffeId};

use crate::util::parse_duration_s;

#[derive(Subcommand)]
pub enum PkiCmd {
    /// A new cluster CA: `<out>/ca.crt` and `<out>/ca.key`.
    Ca {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 3650d.
        #[arg(long, default_value = "3650d")]
        ttl: String,
    },
    /// A node's bootstrap certificate (spiffe://<trust domain>/ephemera/node/<id>, server and
    /// client authentication): `<out>/node-<id>.crt` and `<out>/node-<id>.key`.
    Node {
        /// The directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        id: u64,
        /// DNS names clients may reach the node at (repeat the flag for several).
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime. A node renews its own certificate once it is a member; this one is used
        /// to join, and after being stopped longer than `tls.node_cert_ttl_s`.
        #[arg(long, default_value = "365d")]
        ttl: String,
    },
    /// A client identity (an administrator, a workload): `<out>/<name>.crt`, `<out>/<name>.key`.
    Client {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        trust_domain: String,
        /// The SPIFFE ID, e.g. spiffe://example.org/ops/admin.
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
}

pub fn run(cmd: &PkiCmd) -> Result<()> {
    let now = SystemTime::now();
    let ttl = |t: &str| -> Result<Duration> {
        let s = parse_duration_s(t)?;
        if s == 0 {
            bail!("--ttl must be positive");
        }
        Ok(Duration::from_secs(s))
    };
    match cmd {
        PkiCmd::Ca {
            trust_domain,
            out,
            ttl: t,
        } => {
            let ca = Ca::generate(trust_domain, now, ttl(t)?)?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            write_pair(out, "ca", ca.cert_pem(), &ca.key_pem()?)
        }
        PkiCmd::Node {
            ca,
            trust_domain,
            id,
            dns,
            ip,
            out,
            ttl: t,
        } => {
            if *id == 0 {
                bail!("--id must be non-zero");
            }
            let ca = load_ca(ca, trust_domain)?;
            let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
            let issued = ca.issue(
                &SpiffeId::node(trust_domain, *id),
                LeafUse::Node,
                &dns,
                ip,
                now,
                ttl(t)?,
            )?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            write_pair(
                out,
                &format!("node-{id}"),
                &issued.cert_pem,
                &issued.key_pem,
            )
        }
        PkiCmd::Client {
            ca,
            trust_domain,
            spiffe_id,
            name,
            out,
            ttl: t,
        } => {
            let id = SpiffeId::parse(spiffe_id)?;
            let ca = load_ca(ca, trust_domain)?;
            let issued = ca.issue(&id, LeafUse::Client, &[], &[], now, ttl(t)?)?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            write_pair(out, name, &issued.cert_pem, &issued.key_pem)
        }
    }
}

fn load_ca(dir: &Path, trust_domain: &str) -> Result<Ca> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(Ca::from_pem(
        trust_domain,
        &read("ca.crt")?,
        &read("ca.key")?,
    )?)
}

/// `<dir>/<name>.crt` (0644) and `<dir>/<name>.key` (0600); refuses to replace either.
fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> Result<()> {
    let (crt, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    for p in [&crt, &k] {
        if p.exists() {
            bail!("{} exists; not replacing it", p.display());
        }
    }
    ephemera_node::secret_files::create_private(&k, key)?;
    std::fs::write(&crt, cert).with_context(|| format!("writing {}", crt.display()))?;
    println!("wrote {} and {}", crt.display(), k.display());
    Ok(())
}
