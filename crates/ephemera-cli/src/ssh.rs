//! `ephemera ssh sign | ca | krl`: OpenSSH certificates through the one Issue pipeline, and the
//! CA key and revocation list every node publishes over HTTPS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ephemera_client::pb;
use serde_json::json;

use crate::connect::{client, transport};
use crate::output::print;
use crate::util::{fmt_time, parse_duration_s, split_list};
use crate::{Cli, SshCmd};

pub async fn run(cli: &Cli, cmd: &SshCmd) -> Result<()> {
    match cmd {
        SshCmd::Sign {
            role,
            public_key,
            principals,
            ttl,
            extensions,
            critical_options,
            purpose,
            request_id,
            out,
        } => {
            let key = std::fs::read_to_string(public_key)
                .with_context(|| format!("cannot read the public key {}", public_key.display()))?;
            let mut options = HashMap::new();
            for o in critical_options {
                let (name, value) = o.split_once('=').map_or((o.as_str(), ""), |(n, v)| (n, v));
                if options
                    .insert(name.to_string(), value.to_string())
                    .is_some()
                {
                    bail!("--critical-option {name} given twice");
                }
            }
            let ttl_s = ttl.as_deref().map(parse_duration_s).transpose()?;
            let cred = client(cli)?
                .issue(pb::IssueRequest {
                    role: role.clone(),
                    ttl_s,
                    purpose: purpose.clone(),
                    request_id: request_id.clone(),
                    kind: Some(pb::issue_request::Kind::Ssh(pb::SshCertificateRequest {
                        public_key: key.trim().to_string(),
                        principals: split_list(principals),
                        set_extensions: extensions.is_some(),
                        extensions: split_list(extensions),
                        critical_options: options,
                    })),
                    ..Default::default()
                })
                .await?;
            let Some(pb::credential::Body::Ssh(cert)) = &cred.body else {
                bail!(
                    "role {role} issued a {} credential, not an SSH certificate",
                    cred.kind
                );
            };
            let out = out.clone().unwrap_or_else(|| cert_path_for(public_key));
            write_atomically(&out, format!("{}\n", cert.certificate).as_bytes())?;
            print(
                cli.output,
                json!({
                    "lease_id": cred.lease_id, "serial": cert.serial, "key_id": cert.key_id,
                    "principals": cert.principals, "cert_type": cert.cert_type,
                    "valid_after": cert.valid_after, "valid_before": cert.valid_before,
                    "certificate_file": out, "replayed": cred.replayed,
                }),
                || {
                    format!(
                        "lease_id:     {}\nserial:       {}\nkey_id:       {}\nprincipals:   {}\nvalid:        {} .. {}\ncertificate:  {}",
                        cred.lease_id,
                        cert.serial,
                        cert.key_id,
                        cert.principals.join(","),
                        fmt_time(cert.valid_after * 1000),
                        fmt_time(cert.valid_before * 1000),
                        out.display()
                    )
                },
            );
        }
        SshCmd::Ca { http } => {
            let body = fetch(cli, http, "/v1/ssh/ca.pub").await?;
            let text = String::from_utf8(body).context("the CA keys are not text")?;
            print(
                cli.output,
                json!({ "keys": text.lines().collect::<Vec<_>>() }),
                || text.trim_end().to_string(),
            );
        }
        SshCmd::Krl { out, http } => {
            let body = fetch(cli, http, "/v1/ssh/krl").await?;
            write_atomically(out, &body)?;
            print(
                cli.output,
                json!({ "file": out, "bytes": body.len() }),
                || format!("wrote {} ({} bytes)", out.display(), body.len()),
            );
        }
    }
    Ok(())
}

/// `id_ed25519.pub` → `id_ed25519-cert.pub`, where `ssh` looks for it.
fn cert_path_for(public_key: &Path) -> PathBuf {
    let name = public_key
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("key.pub");
    let stem = name.strip_suffix(".pub").unwrap_or(name);
    public_key.with_file_name(format!("{stem}-cert.pub"))
}

/// Writes through a temporary file and a rename, so `sshd` never reads half a KRL (a KRL it
/// cannot parse refuses every key).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp = path.with_extension("tmp-ephemera");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(d) = dir {
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    }
    Ok(())
}

/// GET `route` from the first node of `endpoints` that answers.
async fn fetch(cli: &Cli, endpoints: &str, route: &str) -> Result<Vec<u8>> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(std::time::Duration::from_secs(10));
    if let Some(tls) = transport(cli, endpoints)? {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes())?);
    }
    let http = builder.build()?;
    let mut last = None;
    for base in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let url = format!("{}{route}", base.trim_end_matches('/'));
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(r.bytes().await?.to_vec()),
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                // A refusal is the cluster's answer, not a node being down.
                if status.is_client_error() {
                    bail!("{url}: {status}: {}", text.trim());
                }
                last = Some(anyhow::anyhow!("{url}: {status}: {}", text.trim()));
            }
            Err(e) => last = Some(anyhow::anyhow!("{url}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no HTTP endpoints: set EPHEMERA_HTTP")))
}
