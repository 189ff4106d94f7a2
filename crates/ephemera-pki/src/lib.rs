//! Ephemera's X.509 side: SPIFFE IDs, the cluster CA (Ed25519, rcgen), X.509-SVID verification
//! against per-trust-domain bundles, and the rustls configurations of the listeners and peers.
//! No IO beyond what rustls does on the sockets it is given.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as RustlsDn, SignatureScheme};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    BadSpiffeId(String, &'static str),
    #[error("the certificate has no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    SeveralUriSans(usize),
    #[error("the certificate is a CA certificate, not an X.509-SVID")]
    IsCa,
    #[error("no trust bundle for trust domain {0:?}")]
    UntrustedDomain(String),
    #[error("the certificate has expired or is not yet valid")]
    Expired,
    #[error("the certificate is not signed by the trust bundle of {0:?}")]
    UntrustedIssuer(String),
    #[error("the certificate is not valid for this use: {0}")]
    WrongUsage(String),
    #[error("the certificate could not be parsed: {0}")]
    Malformed(String),
    #[error("expected {expected}, the peer presented {actual}")]
    WrongIdentity { expected: String, actual: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("invalid PEM: {0}")]
    Pem(String),
}

// ------------------------------------------------------------------------------------------
// SPIFFE IDs
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    /// Begins with '/'.
    pub path: String,
}

impl SpiffeId {
    /// Parses per the SPIFFE ID specification: lowercase trust domain, non-empty path segments
    /// without `.`/`..`, no query, fragment, port or userinfo.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let bad = |why| PkiError::BadSpiffeId(s.to_string(), why);
        if s.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme must be spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(bad(
                "trust domain may contain only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        if path.is_empty() {
            return Err(bad("a workload SPIFFE ID needs a path"));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("path segments must be non-empty and not '.' or '..'"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(bad(
                    "path may contain only letters, digits, '.', '-' and '_'",
                ));
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }

    /// The identity of cluster node `id`.
    pub fn node(trust_domain: &str, id: u64) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            path: format!("/ephemera/node/{id}"),
        }
    }

    /// The node id, if this is a node identity.
    pub fn node_id(&self) -> Option<u64> {
        self.path.strip_prefix("/ephemera/node/")?.parse().ok()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

// ------------------------------------------------------------------------------------------
// PEM
// ------------------------------------------------------------------------------------------

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?
        .ok_or_else(|| PkiError::Pem("no PRIVATE KEY block".into()))
}

// ------------------------------------------------------------------------------------------
// The CA
// ------------------------------------------------------------------------------------------

/// A certificate and its private key, PEM-encoded. The key is secret: no Debug.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafUse {
    /// A node: server and client authentication.
    Node,
    /// A workload or an admin: client authentication.
    Client,
}

/// The key algorithm of the cluster CA and the certificates it issues. ECDSA P-256 by
/// default: gRPC core's TLS stack (behind the Python, C++, Ruby and C# gRPC clients) and
/// browsers do not negotiate Ed25519 certificates. Ed25519 stays available by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    Ed25519,
}

impl KeyAlgorithm {
    pub fn parse(name: &str) -> Result<Self, PkiError> {
        match name {
            "ecdsa-p256" => Ok(KeyAlgorithm::EcdsaP256),
            "ed25519" => Ok(KeyAlgorithm::Ed25519),
            other => Err(PkiError::Generate(format!(
                "unknown key algorithm {other:?} (ecdsa-p256 or ed25519)"
            ))),
        }
    }

    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &PKCS_ED25519,
        }
    }

    fn of(key: &KeyPair) -> Result<Self, PkiError> {
        if key.algorithm() == &PKCS_ED25519 {
            Ok(KeyAlgorithm::Ed25519)
        } else if key.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            Ok(KeyAlgorithm::EcdsaP256)
        } else {
            Err(PkiError::Pem(
                "unsupported key algorithm (use ECDSA P-256 or Ed25519)".into(),
            ))
        }
    }

    fn generate(self) -> Result<KeyPair, PkiError> {
        KeyPair::generate_for(self.rcgen()).map_err(gen_err)
    }
}

/// Signs for rcgen with RFC 6979 deterministic ECDSA (ring's is randomised), so that the CA's
/// signature, like an Ed25519 one, is a function of what it signs: every node mints the same
/// certificate for the same lease.
struct DeterministicP256 {
    key: p256::ecdsa::SigningKey,
    public: Vec<u8>,
}

impl rcgen::RemoteKeyPair for DeterministicP256 {
    fn public_key(&self) -> &[u8] {
        &self.public
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use p256::ecdsa::signature::Signer;
        let sig: p256::ecdsa::Signature = self.key.sign(msg);
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A private key's PKCS#8 document, wiped when dropped.
type SecretDer = zeroize::Zeroizing<Vec<u8>>;

/// The CA's signing key: Ed25519 as ring has it, ECDSA P-256 through [`DeterministicP256`].
/// With the PKCS#8 document of a P-256 key (a remote key pair cannot serialise itself).
fn signing_key(key: KeyPair) -> Result<(KeyPair, Option<SecretDer>), PkiError> {
    if KeyAlgorithm::of(&key)? == KeyAlgorithm::Ed25519 {
        return Ok((key, None));
    }
    use p256::pkcs8::DecodePrivateKey;
    let der = zeroize::Zeroizing::new(key.serialize_der());
    let secret = p256::SecretKey::from_pkcs8_der(&der)
        .map_err(|e| PkiError::Pem(format!("ECDSA P-256 key: {e}")))?;
    let signing = p256::ecdsa::SigningKey::from(secret);
    let public = signing
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let remote = KeyPair::from_remote(Box::new(DeterministicP256 {
        key: signing,
        public,
    }))
    .map_err(gen_err)?;
    Ok((remote, Some(der)))
}

/// A private key as PEM that every TLS stack reads.
fn key_pem_of(key: &KeyPair) -> Result<String, PkiError> {
    match KeyAlgorithm::of(key)? {
        KeyAlgorithm::Ed25519 => ed25519_pkcs8_v1_pem(key),
        KeyAlgorithm::EcdsaP256 => Ok(key.serialize_pem()),
    }
}

pub struct Ca {
    trust_domain: String,
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The PKCS#8 document of a P-256 key (its signer cannot serialise itself).
    key_der: Option<SecretDer>,
    cert_pem: String,
    alg: KeyAlgorithm,
}

fn gen_err(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// PEM of an Ed25519 key as PKCS#8 v1 (RFC 8410). ring produces v2 documents (with the public
/// key embedded), which OpenSSL 3.0, and so curl, cannot read; v1 holds the same seed and every
/// TLS stack reads it.
fn ed25519_pkcs8_v1_pem(key: &KeyPair) -> Result<String, PkiError> {
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = key.serialize_der();
    let seed = match der.get(..16) {
        Some(p) if p == V1_PREFIX => return Ok(key.serialize_pem()),
        Some(p) if p == V2_PREFIX && der.len() >= 48 => &der[16..48],
        _ => return Err(PkiError::Generate("unexpected Ed25519 key encoding".into())),
    };
    let mut v1 = V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    Ok(pem_block("PRIVATE KEY", &v1))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Ca {
    /// A new root for `trust_domain` with the default key algorithm (ECDSA P-256), valid from
    /// `now` for `validity`.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Ca, PkiError> {
        Self::generate_with(KeyAlgorithm::default(), trust_domain, now, validity)
    }

    /// A new root whose key, and the keys of the leaves it issues, use `alg`.
    pub fn generate_with(
        alg: KeyAlgorithm,
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Ca, PkiError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}/ca"))?;
        let (key, key_der) = signing_key(alg.generate()?)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ephemera");
        dn.push(DnType::CommonName, format!("Ephemera CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(gen_err)?,
        )];
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert,
            key,
            key_der,
            cert_pem,
            alg,
        })
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
        Self::with_key(trust_domain, cert_pem, key)
    }

    fn with_key(trust_domain: &str, cert_pem: &str, key: KeyPair) -> Result<Ca, PkiError> {
        let alg = KeyAlgorithm::of(&key)?;
        let (key, key_der) = signing_key(key)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(gen_err)?;
        // rcgen signs with a Certificate object; re-deriving it from the same parameters and
        // key gives the same subject and key identifier, which is what children reference.
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert,
            key,
            key_der,
            cert_pem: cert_pem.to_string(),
            alg,
        })
    }

    /// Rebuilds the CA from its certificate and its key's secret as [`ca_key_secret`] gives
    /// it (an Ed25519 seed, or a PKCS#8 document).
    pub fn from_secret(trust_domain: &str, cert_pem: &str, secret: &[u8]) -> Result<Ca, PkiError> {
        let key = match <&[u8; 32]>::try_from(secret) {
            Ok(seed) => key_from_seed(seed)?,
            Err(_) => {
                let der = rustls::pki_types::PrivatePkcs8KeyDer::from(secret.to_vec());
                KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
                    .map_err(gen_err)?
            }
        };
        Self::with_key(trust_domain, cert_pem, key)
    }

    /// The algorithm of the CA's key (and of the keys it gives its leaves).
    pub fn key_algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    /// Certifies `spki_der` (a DER SubjectPublicKeyInfo, from a CSR whose signature was
    /// verified when it was received) as the X.509-SVID of `id`.
    pub fn sign_public_key(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        serial: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, PkiError> {
        self.sign_key_for_hosts(spki_der, id, (&[], &[]), serial, not_before, not_after)
    }

    /// As [`Ca::sign_public_key`], also valid for these DNS names and IP addresses: a node's
    /// renewed certificate keeps the host names of the one it replaces.
    pub fn sign_key_for_hosts(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        (dns_names, ips): (&[String], &[IpAddr]),
        serial: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, PkiError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| PkiError::Malformed(format!("public key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ephemera");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(id.to_string().try_into().map_err(gen_err)?)];
        for d in dns_names {
            sans.push(SanType::DnsName(d.as_str().try_into().map_err(gen_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&public_key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok(cert.pem())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> Result<String, PkiError> {
        match &self.key_der {
            Some(der) => Ok(pem_block("PRIVATE KEY", der)),
            None => key_pem_of(&self.key),
        }
    }

    /// Issues a client certificate carrying exactly these URI SANs, valid in
    /// `[not_before, not_before + ttl]`. For tests and tooling that need certificates an
    /// X.509-SVID verifier must refuse (no SPIFFE ID, several, expired).
    pub fn issue_raw(
        &self,
        uris: &[&str],
        not_before: SystemTime,
        ttl: Duration,
    ) -> Result<Issued, PkiError> {
        let key = self.alg.generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI((*u).try_into()?)))
            .collect::<Result<_, rcgen::Error>>()
            .map_err(gen_err)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = (not_before + ttl).into();
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key_pem_of(&key)?,
        })
    }

    /// Issues a leaf certificate with a fresh key (of the CA's algorithm) for `id`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        usage: LeafUse,
        dns_names: &[&str],
        ips: &[IpAddr],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Issued, PkiError> {
        let key = self.alg.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ephemera");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(id.to_string().try_into().map_err(gen_err)?)];
        for d in dns_names {
            sans.push(SanType::DnsName((*d).try_into().map_err(gen_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match usage {
            LeafUse::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafUse::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + ttl).into();
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key_pem_of(&key)?,
        })
    }
}

/// A certificate signing request whose signature has been verified.
#[derive(Debug, Clone)]
pub struct ParsedCsr {
    pub der: Vec<u8>,
    /// The requester's public key (DER SubjectPublicKeyInfo): what the certificate certifies.
    pub spki_der: Vec<u8>,
    /// The SPIFFE ID it asks for, if it carries a URI SAN.
    pub spiffe_id: Option<SpiffeId>,
}

/// Largest CSR accepted, PEM or DER.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// Parses a PEM CSR and verifies its signature (proof that the requester holds the key).
pub fn parse_csr(pem: &str) -> Result<ParsedCsr, PkiError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(PkiError::Pem(format!(
            "CSR larger than {MAX_CSR_BYTES} bytes"
        )));
    }
    let der = rustls_pemfile::csr(&mut pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?
        .ok_or_else(|| PkiError::Pem("no CERTIFICATE REQUEST block".into()))?;
    let params = rcgen::CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| PkiError::Malformed(format!("CSR: {e}")))?;
    let uris: Vec<String> = params
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    let spiffe_id = match uris.len() {
        0 => None,
        1 => Some(SpiffeId::parse(&uris[0])?),
        n => return Err(PkiError::SeveralUriSans(n)),
    };
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| PkiError::Malformed(format!("CSR: {e}")))?;
    let spki_der = parsed.certification_request_info.subject_pki.raw.to_vec();
    Ok(ParsedCsr {
        der: der.to_vec(),
        spki_der,
        spiffe_id,
    })
}

/// Checks that `key_pem` is the private key of the certificate `cert_pem`.
pub fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    let certs = parse_certs(cert_pem)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&certs[0])
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
    if parsed.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
        Ok(())
    } else {
        Err(PkiError::Pem(
            "the key does not belong to the certificate".into(),
        ))
    }
}

/// A fresh key (ECDSA P-256) and a CSR for it (with `id` as its URI SAN, if given). For
/// workloads.
pub fn new_csr(id: Option<&SpiffeId>) -> Result<Issued, PkiError> {
    new_csr_with(KeyAlgorithm::default(), id)
}

/// As [`new_csr`], with a key of `alg`.
pub fn new_csr_with(alg: KeyAlgorithm, id: Option<&SpiffeId>) -> Result<Issued, PkiError> {
    let key = alg.generate()?;
    let mut params = CertificateParams::default();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(gen_err)?)];
    }
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    Ok(Issued {
        cert_pem: csr.pem().map_err(gen_err)?,
        key_pem: key_pem_of(&key)?,
    })
}

/// A fresh private key of `alg`: its DER SubjectPublicKeyInfo, and the key in PEM (secret).
pub fn new_key(alg: KeyAlgorithm) -> Result<(Vec<u8>, zeroize::Zeroizing<String>), PkiError> {
    let key = alg.generate()?;
    Ok((
        key.public_key_der(),
        zeroize::Zeroizing::new(key_pem_of(&key)?),
    ))
}

/// A CA key's secret, as it is sealed for replication: the 32-byte seed of an Ed25519 key,
/// or the PKCS#8 document of an ECDSA P-256 key. [`Ca::from_secret`] reads either.
pub fn ca_key_secret(key_pem: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
    match KeyAlgorithm::of(&key)? {
        KeyAlgorithm::Ed25519 => Ok(zeroize::Zeroizing::new(ed25519_seed(key_pem)?.to_vec())),
        KeyAlgorithm::EcdsaP256 => Ok(zeroize::Zeroizing::new(key.serialize_der())),
    }
}

/// The 32-byte seed of an Ed25519 private key in PEM (PKCS#8 v1 or v2).
pub fn ed25519_seed(key_pem: &str) -> Result<[u8; 32], PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
    let der = key.serialize_der();
    if der.len() < 48 || der[..7] != [0x30, der[1], 0x02, 0x01, der[4], 0x30, 0x05] {
        return Err(PkiError::Pem("not an Ed25519 PKCS#8 key".into()));
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&der[16..48]);
    Ok(seed)
}

fn key_from_seed(seed: &[u8; 32]) -> Result<KeyPair, PkiError> {
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = V1_PREFIX.to_vec();
    der.extend_from_slice(seed);
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519).map_err(gen_err)
}

// ------------------------------------------------------------------------------------------
// Verification
// ------------------------------------------------------------------------------------------

/// Trusted roots, by trust domain: ours and external ones (e.g. a SPIRE bundle).
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    roots: HashMap<String, Vec<CertificateDer<'static>>>,
}

/// Which end of a TLS connection a certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

impl TrustBundles {
    pub fn add(&mut self, trust_domain: &str, bundle_pem: &str) -> Result<(), PkiError> {
        let certs = parse_certs(bundle_pem)?;
        self.roots
            .entry(trust_domain.to_string())
            .or_default()
            .extend(certs);
        Ok(())
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &String> {
        self.roots.keys()
    }

    /// Verifies an X.509-SVID chain (leaf first): exactly one URI SAN, a valid SPIFFE ID, not a
    /// CA, chaining within its validity period to the bundle of *its own* trust domain (a root of
    /// another domain cannot vouch for it).
    pub fn verify_svid(
        &self,
        chain: &[CertificateDer<'_>],
        usage: Usage,
        now: UnixTime,
    ) -> Result<SpiffeId, PkiError> {
        let leaf = chain.first().ok_or(PkiError::NoSpiffeId)?;
        let id = spiffe_id_of(leaf)?;
        let roots = self
            .roots
            .get(&id.trust_domain)
            .ok_or_else(|| PkiError::UntrustedDomain(id.trust_domain.clone()))?;
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| PkiError::Malformed(e.to_string()))?;
        let eku = match usage {
            Usage::Client => webpki::KeyUsage::client_auth(),
            Usage::Server => webpki::KeyUsage::server_auth(),
        };
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            eku,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                PkiError::Expired
            }
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                PkiError::UntrustedIssuer(id.trust_domain.clone())
            }
            other => PkiError::WrongUsage(format!("{other:?}")),
        })?;
        Ok(id)
    }
}

/// The certificate's serial number, big-endian, without leading zero bytes.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    let raw = parsed.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    Ok(raw[start..].to_vec())
}

/// When the certificate expires, seconds since the Unix epoch.
pub fn not_after_unix_s(cert: &CertificateDer<'_>) -> Result<u64, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    Ok(parsed.validity().not_after.timestamp().max(0) as u64)
}

/// The SPIFFE ID in a certificate's URI SAN; refuses none, several, or a CA certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    if parsed.is_ca() {
        return Err(PkiError::IsCa);
    }
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(u.to_string());
            }
        }
    }
    match uris.len() {
        0 => Err(PkiError::NoSpiffeId),
        1 => SpiffeId::parse(&uris[0]),
        n => Err(PkiError::SeveralUriSans(n)),
    }
}

// ------------------------------------------------------------------------------------------
// rustls configurations
// ------------------------------------------------------------------------------------------

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: PkiError) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// Who may connect as a client.
#[derive(Debug, Clone)]
pub enum ClientPolicy {
    /// Cluster listener: a valid SVID of a node of this trust domain is required.
    Nodes { trust_domain: String },
    /// API listeners: any certificate (or none) passes the handshake; the request path verifies
    /// it, so a refusal gets a precise status and an audit record.
    VerifyPerRequest,
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundles: Arc<TrustBundles>,
    policy: ClientPolicy,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[RustlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.policy {
            ClientPolicy::VerifyPerRequest => Ok(ClientCertVerified::assertion()),
            ClientPolicy::Nodes { trust_domain } => {
                let mut chain = vec![end_entity.clone()];
                chain.extend(intermediates.iter().cloned());
                let id = self
                    .bundles
                    .verify_svid(&chain, Usage::Client, now)
                    .map_err(tls_err)?;
                if id.trust_domain != *trust_domain || id.node_id().is_none() {
                    return Err(tls_err(PkiError::WrongIdentity {
                        expected: format!("spiffe://{trust_domain}/ephemera/node/<id>"),
                        actual: id.to_string(),
                    }));
                }
                Ok(ClientCertVerified::assertion())
            }
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        matches!(self.policy, ClientPolicy::Nodes { .. })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies that the server is exactly the node we meant to reach.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundles: Arc<TrustBundles>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = self
            .bundles
            .verify_svid(&chain, Usage::Server, now)
            .map_err(tls_err)?;
        if id != self.expected {
            return Err(tls_err(PkiError::WrongIdentity {
                expected: self.expected.to_string(),
                actual: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A node's identity: its certificate chain and key, replaceable while the node runs.
///
/// Node certificates are short-lived and renewed by the node (see `ephemera-node`'s
/// `node_cert`), so the listeners and the peer channels must pick up a new certificate without
/// a restart. Every clone shares one cell: [`Identity::replace`] changes what the next TLS
/// handshake of every listener and every peer channel presents; connections already
/// established keep the certificate they were authenticated with (the cluster listener checks
/// membership on every request, not only at the handshake).
#[derive(Clone)]
pub struct Identity {
    current: Arc<std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.current().cert.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Ok(Identity {
            current: Arc::new(std::sync::RwLock::new(certified_key(cert_pem, key_pem)?)),
        })
    }

    /// Presents `cert_pem` and `key_pem` from the next handshake on. Refused (and nothing
    /// changes) unless the key is the certificate's and the certificate names the same SPIFFE
    /// ID as the current one.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        check_key_matches(cert_pem, key_pem)?;
        let next = certified_key(cert_pem, key_pem)?;
        let (was, now) = (self.spiffe_id()?, spiffe_id_of(&next.cert[0])?);
        if was != now {
            return Err(PkiError::WrongIdentity {
                expected: was.to_string(),
                actual: now.to_string(),
            });
        }
        *self.current.write().expect("identity lock") = next;
        Ok(())
    }

    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current.read().expect("identity lock").clone()
    }

    /// The certificate presented now (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current().cert.clone()
    }

    pub fn spiffe_id(&self) -> Result<SpiffeId, PkiError> {
        spiffe_id_of(&self.current().cert[0])
    }
}

fn certified_key(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, PkiError> {
    let chain = parse_certs(cert_pem)?;
    let key = provider()
        .key_provider
        .load_private_key(parse_key(key_pem)?)
        .map_err(|e| PkiError::Pem(format!("the private key cannot sign: {e}")))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, key)))
}

impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The DNS names and IP addresses a certificate is valid for (its non-URI SANs).
pub fn host_names_of(cert: &CertificateDer<'_>) -> Result<(Vec<String>, Vec<IpAddr>), PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                    _ => return Err(PkiError::Malformed("an IP SAN of odd length".into())),
                },
                _ => {}
            }
        }
    }
    Ok((dns, ips))
}

/// When the certificate became valid and when it expires, seconds since the Unix epoch.
pub fn validity_unix_s(cert: &CertificateDer<'_>) -> Result<(u64, u64), PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    let v = parsed.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

/// Server configuration of a listener. `alpn`: `h2` for gRPC, plus `http/1.1` for HTTP.
pub fn server_config(
    identity: &Identity,
    bundles: Arc<TrustBundles>,
    policy: ClientPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        bundles,
        policy,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity.clone()));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Client configuration for reaching exactly `expected` (a node), presenting `identity`.
pub fn peer_client_config(
    identity: &Identity,
    bundles: Arc<TrustBundles>,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundles,
        expected,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(identity.clone()));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests;
