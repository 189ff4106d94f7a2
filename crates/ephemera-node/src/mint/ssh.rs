//! OpenSSH certificates, built and signed with the RustCrypto `ssh-key` crate from the grant
//! `apply` decided (principals, extensions, critical options, serial, key id, nonce, validity).

use ephemera_core::kind::ssh::{CertType, Grant};
use ephemera_core::types::{Lease, SigningKeyRecord};
use ephemera_core::Error;
use ssh_key::certificate::{Builder, CertType as SshCertType};
use ssh_key::private::{Ed25519Keypair, PrivateKey};
use ssh_key::PublicKey;

use super::KeyStore;
use crate::node::Node;

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

/// Parses an OpenSSH public key line as `sshd` will read it; the canonical line (no comment)
/// or a precise error. Certificates are not keys to certify.
pub fn parse_public_key(line: &str) -> Result<String, Error> {
    let key = PublicKey::from_openssh(line.trim()).map_err(|e| {
        Error::InvalidArgument(format!(
            "the public key is not an OpenSSH public key line: {e}"
        ))
    })?;
    let mut key = key;
    key.set_comment("");
    key.to_openssh()
        .map_err(|e| Error::InvalidArgument(format!("the public key cannot be encoded: {e}")))
}

/// `TrustedUserCAKeys` / `@cert-authority` lines of the given CA keys.
pub fn ssh_ca_lines(keys: &[SigningKeyRecord]) -> String {
    keys.iter()
        .map(|k| {
            let mut line = ephemera_core::kind::ssh::ed25519_public_line(
                &k.public_key,
                &format!("ephemera-ssh-ca-{}", k.kid),
            );
            line.push('\n');
            line
        })
        .collect()
}

pub(super) fn mint(node: &Node, lease: &Lease, g: &Grant) -> Result<String, Error> {
    let ca = node.unsealed_key(KeyStore::SshCa, &lease.kid)?;
    let ca = PrivateKey::from(Ed25519Keypair::from(ca.as_ref()));
    let subject = PublicKey::from_openssh(&g.public_key)
        .map_err(|e| internal("the granted public key", e))?;
    let mut b = Builder::new(
        g.nonce.to_vec(),
        subject.key_data().clone(),
        g.valid_after,
        g.valid_before,
    )
    .map_err(|e| internal("certificate validity", e))?;
    let step =
        |r: ssh_key::Result<&mut Builder>| r.map(|_| ()).map_err(|e| internal("certificate", e));
    step(b.serial(g.serial))?;
    step(b.key_id(g.key_id.clone()))?;
    step(b.cert_type(match g.cert_type {
        CertType::User => SshCertType::User,
        CertType::Host => SshCertType::Host,
    }))?;
    for p in &g.principals {
        step(b.valid_principal(p.clone()))?;
    }
    for e in &g.extensions {
        step(b.extension(e.clone(), String::new()))?;
    }
    for (name, value) in &g.critical_options {
        step(b.critical_option(name.clone(), value.clone()))?;
    }
    let cert = b
        .sign(&ca)
        .map_err(|e| internal("signing the certificate", e))?;
    cert.to_openssh()
        .map_err(|e| internal("encoding the certificate", e))
}
