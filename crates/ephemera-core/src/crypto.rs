//! Key sealing, credential hashing and constant-time comparison. Pure: keys and nonces are
//! passed in, never drawn here.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;

pub const NONCE_LEN: usize = 12;

/// The cluster key-encryption key. Never printed.
#[derive(Clone)]
pub struct Kek([u8; 32]);

impl Kek {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Kek(bytes)
    }

    /// Parses the KEK file format: 64 hex characters, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut raw = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
            Error::InvalidArgument("key-encryption key must be 64 hex characters".into())
        })?);
        if raw.len() != 32 {
            return Err(Error::InvalidArgument(
                "key-encryption key must be 32 bytes (64 hex characters)".into(),
            ));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw);
        raw.zeroize();
        Ok(Kek(key))
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    /// Identifies the KEK without revealing it, so nodes can detect a mismatched KEK file.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"ephemera-kek-fingerprint-v1");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }
}

impl Kek {
    /// A secret for one lease, derived from the KEK: HMAC-SHA256 keyed by the KEK over a
    /// purpose label and the lease id. A PostgreSQL login's password is drawn from it on the
    /// node that answers and on the leader's executor, so it is never written anywhere. (A new
    /// KEK derives other secrets; only logins still being created would notice.)
    pub fn lease_secret(&self, purpose: &str, lease_id: &str) -> Zeroizing<[u8; 32]> {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(b"ephemera/lease-secret/v1\0");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(lease_id.as_bytes());
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

impl Drop for Kek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek(fingerprint={})", self.fingerprint())
    }
}

/// Seals a 32-byte private key under the KEK, bound to its key id.
pub fn seal_private_key(
    kek: &Kek,
    kid: &str,
    secret: &[u8; 32],
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    seal_secret(kek, kid, secret, nonce)
}

/// Seals a secret of any length (a PKCS#8 key document) under the KEK, bound to `kid`.
pub fn seal_secret(kek: &Kek, kid: &str, secret: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&kek.0));
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: secret,
                aad: kid.as_bytes(),
            },
        )
        .expect("ChaCha20-Poly1305 encryption of a short secret cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

pub fn unseal_private_key(
    kek: &Kek,
    kid: &str,
    sealed: &[u8],
) -> Result<Zeroizing<[u8; 32]>, Error> {
    let plain = unseal_secret(kek, kid, sealed)?;
    if plain.len() != 32 {
        return Err(Error::Internal(format!(
            "sealed key {kid} has the wrong length"
        )));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&plain);
    Ok(out)
}

/// Opens what [`seal_secret`] sealed.
pub fn unseal_secret(kek: &Kek, kid: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    if sealed.len() < NONCE_LEN {
        return Err(Error::Internal(format!("sealed key {kid} is truncated")));
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&kek.0));
    let plain = Zeroizing::new(
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: kid.as_bytes() })
            .map_err(|_| {
                Error::Internal(format!(
                    "cannot unseal signing key {kid}: the key-encryption key does not match the cluster's"
                ))
            })?,
    );
    Ok(plain)
}

/// Key id derived from the public key, so it is stable and needs no extra randomness.
pub fn kid_for(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

/// Hash under which a bearer secret (the bootstrap credential) is stored.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ephemera-secret-v1:");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Constant-time check of a presented secret against its stored hash.
pub fn verify_secret(presented: &str, stored_hash: &[u8]) -> bool {
    let h = hash_secret(presented);
    stored_hash.len() == 32 && bool::from(h.as_slice().ct_eq(stored_hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_binding() {
        let kek = Kek::from_bytes([7; 32]);
        let secret = [42u8; 32];
        let sealed = seal_private_key(&kek, "k1", &secret, [1; NONCE_LEN]);
        assert!(!sealed.windows(32).any(|w| w == secret));
        assert_eq!(*unseal_private_key(&kek, "k1", &sealed).unwrap(), secret);
        // Bound to the kid: a sealed key cannot be replayed under another id.
        assert!(unseal_private_key(&kek, "k2", &sealed).is_err());
        assert!(unseal_private_key(&Kek::from_bytes([8; 32]), "k1", &sealed).is_err());
    }

    #[test]
    fn secret_verification() {
        let h = hash_secret("s3cret");
        assert!(verify_secret("s3cret", &h));
        assert!(!verify_secret("s3cret2", &h));
        assert!(!verify_secret("s3cret", &h[..31]));
    }

    #[test]
    fn kek_parse_rejects_bad_input_without_echoing_it() {
        let err = Kek::parse("zz").unwrap_err().to_string();
        assert!(!err.contains("zz"));
        assert!(Kek::parse(&"ab".repeat(31)).is_err());
        assert!(Kek::parse(&format!(" {}\n", "ab".repeat(32))).is_ok());
        assert!(!format!("{:?}", Kek::from_bytes([9; 32])).contains("0909"));
    }
}
