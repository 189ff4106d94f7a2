//! OpenSSH user and host certificates (PROTOCOL.certkeys) signed by the cluster's SSH CA for
//! the caller's own public key; the private key never leaves the caller. A certificate cannot be
//! extended, so renewal is re-issue. Revocation is published as a KRL ([`super::krl`]).
//!
//! Everything a certificate says is decided here, in `apply`: the principals, the extensions and
//! critical options (each one the role does not list is refused, never silently dropped), the
//! serial (a cluster-wide counter in the replicated state, never 0), the key id (naming the
//! lease and the subject, so `sshd`'s log ties a login to its lease), and the nonce (stamped by
//! the leader). Minting after commit is then a pure function of the grant and the CA key.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{
    invalid, validate_text, CedarView, CredentialKind, GrantContext, Kind, KindStamp, Renewal,
    SignerKind,
};
use crate::command::Entropy;
use crate::error::Error;

/// The extensions OpenSSH defines for user certificates.
pub const KNOWN_EXTENSIONS: &[&str] = &[
    "no-touch-required",
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];
/// The critical options OpenSSH defines for user certificates.
pub const KNOWN_CRITICAL_OPTIONS: &[&str] = &["force-command", "source-address", "verify-required"];
/// Public key algorithms accepted for the certified key.
pub const KEY_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
pub const MAX_PRINCIPALS: usize = 64;
pub const MAX_PRINCIPAL_LEN: usize = 256;
pub const MAX_PUBLIC_KEY_LEN: usize = 4096;
pub const MAX_OPTION_VALUE_LEN: usize = 1024;
/// `valid_after` is backdated by this much for hosts whose clocks run behind (like JWT `nbf`).
pub const VALID_AFTER_BACKDATE_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertType {
    User,
    Host,
}

impl CertType {
    pub fn kind(self) -> CredentialKind {
        match self {
            CertType::User => CredentialKind::SshUser,
            CertType::Host => CredentialKind::SshHost,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub cert_type: CertType,
    /// User certificates: the principals (login names) a certificate may carry. Empty allows
    /// no one.
    pub principals: Vec<String>,
    /// Host certificates: the domains host names must be in.
    pub host_domains: Vec<String>,
    /// Host certificates: also names below the domains (`a.example.internal`).
    pub allow_subdomains: bool,
    /// Extensions a certificate may carry (user certificates; each must be in
    /// [`KNOWN_EXTENSIONS`]).
    pub extensions: Vec<String>,
    /// Critical options a certificate may carry (user certificates).
    pub critical_options: Vec<String>,
}

impl Spec {
    pub fn kind(&self) -> CredentialKind {
        self.cert_type.kind()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The key to certify, as an OpenSSH public key line (`ssh-ed25519 AAAA...`; a comment is
    /// dropped by the receiving node).
    pub public_key: String,
    /// User certificates: empty asks for every principal the role allows. Host certificates:
    /// the host names, at least one.
    pub principals: Vec<String>,
    /// `None` asks for every extension the role allows; `Some` for exactly these.
    pub extensions: Option<Vec<String>>,
    /// Name → value (`force-command` → the command, `source-address` → CIDR list).
    pub critical_options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub cert_type: CertType,
    pub public_key: String,
    pub principals: Vec<String>,
    /// Sorted, unique (the certificate lists them in this order).
    pub extensions: Vec<String>,
    pub critical_options: BTreeMap<String, String>,
    pub serial: u64,
    pub key_id: String,
    pub nonce: [u8; 32],
    /// Unix seconds.
    pub valid_after: u64,
    pub valid_before: u64,
}

pub struct Ssh;

/// A refusal of something the role does not list (structured, so its audit record is too).
fn not_allowed(what: &str, value: &str, role: &str, allowed: &[String]) -> Error {
    Error::NotAllowedByRole {
        what: what.into(),
        value: value.into(),
        role: role.into(),
        allowed: if allowed.is_empty() {
            "none".into()
        } else {
            allowed.join(", ")
        },
    }
}

/// The SSH wire encoding of a string (`uint32` length, then the bytes).
pub fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The public key blob of an Ed25519 key, as certificates and KRLs name a CA.
pub fn ed25519_public_blob(public_key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(51);
    put_string(&mut out, b"ssh-ed25519");
    put_string(&mut out, public_key);
    out
}

/// The `authorized_keys`/`TrustedUserCAKeys` line of an Ed25519 public key.
pub fn ed25519_public_line(public_key: &[u8; 32], comment: &str) -> String {
    format!(
        "ssh-ed25519 {} {comment}",
        STANDARD.encode(ed25519_public_blob(public_key))
    )
}

fn validate_principal(p: &str) -> Result<(), Error> {
    validate_text("principal", p, MAX_PRINCIPAL_LEN, false)?;
    if p.contains(',') {
        return Err(invalid(format!("principal {p:?} must not contain ','")));
    }
    Ok(())
}

fn validate_host_name(what: &str, h: &str) -> Result<(), Error> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {h:?} is not a lower-case DNS name"
        )))
    }
}

fn validate_names(what: &str, names: &[String], known: &[&str]) -> Result<(), Error> {
    for n in names {
        if !known.contains(&n.as_str()) {
            return Err(invalid(format!(
                "unknown {what} {n:?}; known: {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

fn unique_count(v: &[String]) -> usize {
    let mut s: Vec<&String> = v.iter().collect();
    s.sort();
    s.dedup();
    s.len()
}

/// Checks the shape of an OpenSSH public key line: a known algorithm and a base64 blob that
/// names the same algorithm. Returns the canonical `algorithm base64` form.
pub fn canonical_public_key(line: &str) -> Result<String, Error> {
    if line.len() > MAX_PUBLIC_KEY_LEN {
        return Err(invalid(format!(
            "the public key must be at most {MAX_PUBLIC_KEY_LEN} bytes"
        )));
    }
    let mut parts = line.split_whitespace();
    let (Some(alg), Some(b64)) = (parts.next(), parts.next()) else {
        return Err(invalid(
            "the public key must be an OpenSSH public key line (`ssh-ed25519 AAAA...`)".into(),
        ));
    };
    if !KEY_ALGORITHMS.contains(&alg) {
        return Err(invalid(format!(
            "public key algorithm {alg:?} is not accepted; use one of {}",
            KEY_ALGORITHMS.join(", ")
        )));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|_| invalid("the public key's base64 does not decode".into()))?;
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(alg.as_bytes()) {
        return Err(invalid(format!(
            "the public key's blob is not an {alg} key"
        )));
    }
    Ok(format!("{alg} {b64}"))
}

impl Kind for Ssh {
    // The family's name; a spec or grant says whether it is a user or a host certificate.
    const NAME: CredentialKind = CredentialKind::SshUser;
    const RENEWAL: Renewal = Renewal::Reissue {
        how: "an SSH certificate cannot be extended; sign a new one (`ephemera ssh sign`)",
    };
    const SIGNER: SignerKind = SignerKind::SshCa;
    type Spec = Spec;
    type Request = Request;
    type Grant = Grant;

    fn validate_spec(spec: &Spec) -> Result<(), Error> {
        if spec.principals.len() > MAX_PRINCIPALS || spec.host_domains.len() > MAX_PRINCIPALS {
            return Err(invalid(format!("at most {MAX_PRINCIPALS} principals")));
        }
        match spec.cert_type {
            CertType::User => {
                spec.principals
                    .iter()
                    .try_for_each(|p| validate_principal(p))?;
                if !spec.host_domains.is_empty() || spec.allow_subdomains {
                    return Err(invalid(
                        "host domains belong to ssh-host roles, not ssh-user roles".into(),
                    ));
                }
                validate_names("extension", &spec.extensions, KNOWN_EXTENSIONS)?;
                validate_names(
                    "critical option",
                    &spec.critical_options,
                    KNOWN_CRITICAL_OPTIONS,
                )?;
            }
            CertType::Host => {
                if spec.host_domains.is_empty() {
                    return Err(invalid(
                        "an ssh-host role needs at least one host domain".into(),
                    ));
                }
                spec.host_domains
                    .iter()
                    .try_for_each(|d| validate_host_name("host domain", d))?;
                if !spec.principals.is_empty()
                    || !spec.extensions.is_empty()
                    || !spec.critical_options.is_empty()
                {
                    return Err(invalid(
                        "principals, extensions and critical options belong to ssh-user roles; \
                         a host certificate names hosts within the role's host domains"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_request(r: &Request) -> Result<(), Error> {
        canonical_public_key(&r.public_key)?;
        if r.principals.len() > MAX_PRINCIPALS {
            return Err(invalid(format!("at most {MAX_PRINCIPALS} principals")));
        }
        r.principals
            .iter()
            .try_for_each(|p| validate_principal(p))?;
        if unique_count(&r.principals) != r.principals.len() {
            return Err(invalid("principals must be unique".into()));
        }
        if let Some(ext) = &r.extensions {
            validate_names("extension", ext, KNOWN_EXTENSIONS)?;
        }
        for (name, value) in &r.critical_options {
            validate_names(
                "critical option",
                std::slice::from_ref(name),
                KNOWN_CRITICAL_OPTIONS,
            )?;
            if value.len() > MAX_OPTION_VALUE_LEN || value.chars().any(|c| c.is_control()) {
                return Err(invalid(format!(
                    "critical option {name} must be at most {MAX_OPTION_VALUE_LEN} bytes without control characters"
                )));
            }
        }
        Ok(())
    }

    fn stamp(_r: &Request, entropy: &mut dyn Entropy) -> KindStamp {
        let mut nonce = [0u8; 32];
        entropy.fill(&mut nonce);
        KindStamp::Nonce(nonce)
    }

    fn grant(spec: &Spec, r: &Request, ctx: &GrantContext<'_>) -> Result<Grant, Error> {
        let KindStamp::Nonce(nonce) = ctx.stamp else {
            return Err(Error::Internal(
                "an SSH certificate request was not stamped with a nonce".into(),
            ));
        };
        if ctx.signer.serial == 0 {
            return Err(Error::Internal("SSH certificate serial 0".into()));
        }
        let principals = match spec.cert_type {
            CertType::User => {
                let principals = if r.principals.is_empty() {
                    spec.principals.clone()
                } else {
                    r.principals.clone()
                };
                if principals.is_empty() {
                    return Err(Error::PermissionDenied(format!(
                        "role {:?} allows no principal",
                        ctx.role
                    )));
                }
                if let Some(p) = principals.iter().find(|p| !spec.principals.contains(p)) {
                    return Err(not_allowed("principal", p, ctx.role, &spec.principals));
                }
                principals
            }
            CertType::Host => {
                if r.principals.is_empty() {
                    return Err(invalid(
                        "a host certificate needs the host names it is for (--principals)".into(),
                    ));
                }
                for h in &r.principals {
                    validate_host_name("host name", h)?;
                    let inside = spec.host_domains.iter().any(|d| {
                        h == d || (spec.allow_subdomains && h.ends_with(&format!(".{d}")))
                    });
                    if !inside {
                        return Err(Error::PermissionDenied(format!(
                            "host name {h:?} is not within the host domains of role {:?} ({}{})",
                            ctx.role,
                            spec.host_domains.join(", "),
                            if spec.allow_subdomains {
                                ", subdomains allowed"
                            } else {
                                "; subdomains not allowed"
                            }
                        )));
                    }
                }
                r.principals.clone()
            }
        };
        let mut extensions = match (&r.extensions, spec.cert_type) {
            (None, _) => spec.extensions.clone(),
            (Some(asked), _) => {
                if let Some(e) = asked.iter().find(|e| !spec.extensions.contains(e)) {
                    return Err(not_allowed("extension", e, ctx.role, &spec.extensions));
                }
                asked.clone()
            }
        };
        extensions.sort();
        extensions.dedup();
        if let Some(o) = r
            .critical_options
            .keys()
            .find(|o| !spec.critical_options.contains(o))
        {
            return Err(not_allowed(
                "critical option",
                o,
                ctx.role,
                &spec.critical_options,
            ));
        }
        Ok(Grant {
            cert_type: spec.cert_type,
            public_key: canonical_public_key(&r.public_key)?,
            principals,
            extensions,
            critical_options: r.critical_options.clone(),
            serial: ctx.signer.serial,
            key_id: format!("lease={} sub={}", ctx.lease_id, ctx.subject),
            nonce: *nonce,
            valid_after: ctx.now_ms.saturating_sub(VALID_AFTER_BACKDATE_MS) / 1000,
            valid_before: ctx.expires_at_ms / 1000,
        })
    }

    fn cedar_role(spec: &Spec) -> CedarView<'_> {
        CedarView {
            audience: "",
            scopes: &[],
            principals: match spec.cert_type {
                CertType::User => &spec.principals,
                CertType::Host => &spec.host_domains,
            },
        }
    }

    fn cedar_request<'a>(spec: &'a Spec, r: &'a Request) -> CedarView<'a> {
        CedarView {
            audience: "",
            scopes: &[],
            principals: if r.principals.is_empty() && spec.cert_type == CertType::User {
                &spec.principals
            } else {
                &r.principals
            },
        }
    }

    fn cedar_grant(g: &Grant) -> CedarView<'_> {
        CedarView {
            audience: "",
            scopes: &[],
            principals: &g.principals,
        }
    }

    fn audit(g: &Grant) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            ("principals".to_string(), g.principals.join(",")),
            ("serial".to_string(), g.serial.to_string()),
            ("key_id".to_string(), g.key_id.clone()),
        ]);
        if !g.extensions.is_empty() {
            m.insert("extensions".into(), g.extensions.join(","));
        }
        if !g.critical_options.is_empty() {
            m.insert(
                "critical_options".into(),
                g.critical_options
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        m
    }
}
