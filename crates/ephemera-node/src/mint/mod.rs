//! Minting: a committed lease becomes its credential, on the node that answers. One module per
//! kind; each is a pure function of the grant and the signing key (Ed25519 signatures are
//! deterministic), so every node mints the same bytes for the same lease.

mod jwt;
mod ssh;
pub(crate) mod x509_svid;

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use ephemera_core::crypto::unseal_private_key;
use ephemera_core::kind::Grant;
use ephemera_core::state;
use ephemera_core::types::Lease;
use ephemera_core::Error;

use crate::node::Node;

pub use ssh::{parse_public_key, ssh_ca_lines};

/// A credential, as its kind's relying party takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Minted {
    /// A compact JWS.
    Jwt(String),
    X509Svid {
        cert_pem: String,
        bundle_pem: String,
    },
    /// An OpenSSH certificate line.
    Ssh(String),
    /// A database login the executor has created.
    Postgres {
        username: String,
        password: Password,
    },
}

/// A password handed to its caller: zeroised when dropped, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(zeroize::Zeroizing<String>);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Which replicated key store a signing key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyStore {
    Jwt,
    SshCa,
    Audit,
}

impl Node {
    /// Mints the credential of a committed lease.
    pub fn mint(&self, lease: &Lease) -> Result<Minted, Error> {
        match &lease.grant {
            Grant::Jwt(_) => jwt::mint(self, lease).map(Minted::Jwt),
            Grant::X509Svid(g) => x509_svid::mint(self, lease, g),
            Grant::Ssh(g) => ssh::mint(self, lease, g).map(Minted::Ssh),
            // The password is derived from the KEK and the lease id, as the leader's executor
            // derived it to create the login (the caller waited for that: `await_login`).
            Grant::Postgres(g) => Ok(Minted::Postgres {
                username: g.username.clone(),
                password: Password(ephemera_core::kind::postgres::password(
                    &self.kek,
                    &lease.id,
                    &g.password,
                )),
            }),
        }
    }

    /// A signing key, unsealed once and cached by key id.
    pub(crate) fn unsealed_key(
        &self,
        store: KeyStore,
        kid: &str,
    ) -> Result<Arc<SigningKey>, Error> {
        if let Some(k) = self.keys.lock().expect("key cache lock").get(kid) {
            return Ok(k.clone());
        }
        let rec = match store {
            KeyStore::Jwt => state::get_key(&self.view, kid),
            KeyStore::SshCa => state::get_ssh_ca(&self.view, kid),
            KeyStore::Audit => state::get_audit_key(&self.view, kid),
        }
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| Error::KeyNotFound(kid.to_string()))?;
        let seed = unseal_private_key(&self.kek, kid, &rec.sealed_private_key)?;
        let key = Arc::new(SigningKey::from_bytes(&seed));
        self.keys
            .lock()
            .expect("key cache lock")
            .insert(kid.to_string(), key.clone());
        Ok(key)
    }
}
