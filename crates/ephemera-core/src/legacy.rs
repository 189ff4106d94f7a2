//! The versioned format of stored roles and leases, and the decode path for records written by
//! the first layout (before credential kinds were one seam).
//!
//! A record of the current layout is `[0xFF, VERSION]` followed by its bincode encoding. A record
//! of the first layout is bare bincode, which begins with the little-endian length of the role
//! name or lease id: at most 64 bytes (validation never allowed more), so its first byte is never
//! 0xFF and the two cannot be confused. Old records are converted when read and rewritten in the
//! current layout whenever they are next written; nothing is migrated in bulk.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::kind::{jwt, x509_svid, Grant, RoleSpec};
use crate::types::{LeaseState, Role};

const MARK: u8 = 0xFF;
/// The layout of roles and leases written by this code.
pub const RECORD_VERSION: u8 = 2;

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![MARK, RECORD_VERSION];
    bincode::serialize_into(&mut out, v).expect("records serialise");
    out
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StorageError {
    StorageError(format!(
        "corrupt value at {}: {e}",
        String::from_utf8_lossy(key)
    ))
}

/// Decodes a record of the current layout, or converts one of the first.
pub(crate) fn decode<T: DeserializeOwned, V1: DeserializeOwned>(
    key: &[u8],
    bytes: &[u8],
    upgrade: impl FnOnce(V1) -> T,
) -> Result<T, StorageError> {
    match bytes {
        [MARK, RECORD_VERSION, rest @ ..] => {
            bincode::deserialize(rest).map_err(|e| corrupt(key, e))
        }
        [MARK, v, ..] => Err(corrupt(
            key,
            format!("record version {v} is newer than this node understands ({RECORD_VERSION})"),
        )),
        _ => bincode::deserialize::<V1>(bytes)
            .map(upgrade)
            .map_err(|e| corrupt(key, e)),
    }
}

/// The first layout's kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KindV1 {
    Jwt,
    X509Svid,
}

/// A role as the first layout stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleV1 {
    pub name: String,
    pub kind: KindV1,
    pub audience: String,
    pub allowed_scopes: Vec<String>,
    pub default_ttl_s: u64,
    pub max_ttl_s: u64,
    pub environment: Option<String>,
    pub target: Option<String>,
    pub revoke_on_renewal_denied: bool,
    pub issue_rate_per_identity: Option<u32>,
    pub issue_rate: Option<u32>,
    pub max_live_leases_per_identity: Option<u64>,
    pub max_live_leases: Option<u64>,
}

/// A lease as the first layout stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseV1 {
    pub id: String,
    pub role: String,
    pub kind: KindV1,
    pub subject: String,
    pub client_id: String,
    pub audience: String,
    pub scopes: Vec<String>,
    pub purpose: Option<String>,
    pub ttl_s: u64,
    pub issued_at_ms: u64,
    pub minted_at_ms: u64,
    pub expires_at_ms: u64,
    pub max_expires_at_ms: u64,
    pub renew_after_ms: u64,
    pub kid: String,
    pub renewals: u32,
    pub state: LeaseState,
    pub csr_der: Option<Vec<u8>>,
}

pub fn role_from_v1(r: RoleV1) -> Role {
    Role {
        spec: match r.kind {
            KindV1::Jwt => RoleSpec::Jwt(jwt::Spec {
                audience: r.audience,
                allowed_scopes: r.allowed_scopes,
            }),
            KindV1::X509Svid => RoleSpec::X509Svid(x509_svid::Spec {}),
        },
        name: r.name,
        default_ttl_s: r.default_ttl_s,
        max_ttl_s: r.max_ttl_s,
        environment: r.environment,
        target: r.target,
        revoke_on_renewal_denied: r.revoke_on_renewal_denied,
        issue_rate_per_identity: r.issue_rate_per_identity,
        issue_rate: r.issue_rate,
        max_live_leases_per_identity: r.max_live_leases_per_identity,
        max_live_leases: r.max_live_leases,
    }
}

pub fn lease_from_v1(l: LeaseV1) -> crate::types::Lease {
    let grant = match l.kind {
        KindV1::Jwt => Grant::Jwt(jwt::Grant {
            audience: l.audience,
            scopes: l.scopes,
        }),
        KindV1::X509Svid => Grant::X509Svid(x509_svid::Grant {
            public_key_der: l
                .csr_der
                .as_deref()
                .and_then(csr_public_key)
                .unwrap_or_default(),
        }),
    };
    crate::types::Lease {
        id: l.id,
        role: l.role,
        subject: l.subject,
        client_id: l.client_id,
        purpose: l.purpose,
        parent: None,
        ttl_s: l.ttl_s,
        issued_at_ms: l.issued_at_ms,
        minted_at_ms: l.minted_at_ms,
        expires_at_ms: l.expires_at_ms,
        max_expires_at_ms: l.max_expires_at_ms,
        renew_after_ms: l.renew_after_ms,
        kid: l.kid,
        renewals: l.renewals,
        state: l.state,
        grant,
    }
}

/// One DER element.
struct Der<'a> {
    tag: u8,
    content: &'a [u8],
    /// The element with its header.
    whole: &'a [u8],
    rest: &'a [u8],
}

fn der_element(b: &[u8]) -> Option<Der<'_>> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let whole = b.get(..header.checked_add(len)?)?;
    Some(Der {
        tag,
        content: &whole[header..],
        whole,
        rest: &b[whole.len()..],
    })
}

/// The next element, if it has the expected tag.
fn expect(b: &[u8], tag: u8) -> Option<Der<'_>> {
    der_element(b).filter(|d| d.tag == tag)
}

/// The SubjectPublicKeyInfo (DER) inside a PKCS#10 CSR: `CertificationRequest ::= SEQUENCE {
/// certificationRequestInfo SEQUENCE { version, subject, subjectPKInfo, attributes }, ... }`.
/// The first layout kept whole CSRs; the current one keeps only the key.
pub fn csr_public_key(csr: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    let request = expect(csr, SEQUENCE)?;
    let info = expect(request.content, SEQUENCE)?;
    let version = expect(info.content, INTEGER)?;
    let subject = expect(version.rest, SEQUENCE)?;
    let spki = expect(subject.rest, SEQUENCE)?;
    Some(spki.whole.to_vec())
}
