//! Credential kinds: the one seam every kind plugs into.
//!
//! A kind is one module here ([`jwt`], [`x509_svid`], [`ssh`], [`postgres`]) implementing [`Kind`]: what a role
//! of the kind allows (its spec), what a caller asks for (its request), what the lease records
//! (its grant), validation, the randomness the leader stamps, how it renews, and the attributes
//! policy sees. The node has one mint module per kind that turns a committed grant into the
//! credential. Everything else (authentication, policy, quarantine, limits, budgets, the clock
//! check, the lease header, revocation, audit) is the same pipeline for every kind.
//!
//! The enums below are the only place that lists the kinds: adding a kind adds a module, a
//! variant to each enum and one arm to each `match` in this file.

pub mod jwt;
pub mod krl;
pub mod postgres;
pub mod ssh;
pub mod x509_svid;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::Entropy;
use crate::error::Error;
use crate::policy::PolicyStamp;

/// The name of a credential kind, as roles, leases, policies and the CLI spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CredentialKind {
    Jwt,
    /// An X.509-SVID signed by the cluster CA for a workload's own key.
    X509Svid,
    /// An OpenSSH user certificate signed by the cluster's SSH CA.
    SshUser,
    /// An OpenSSH host certificate signed by the cluster's SSH CA.
    SshHost,
    /// A PostgreSQL login (a role with a password) created on a database connection.
    Postgres,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 5] = [
        CredentialKind::Jwt,
        CredentialKind::X509Svid,
        CredentialKind::SshUser,
        CredentialKind::SshHost,
        CredentialKind::Postgres,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            CredentialKind::Jwt => "jwt",
            CredentialKind::X509Svid => "x509-svid",
            CredentialKind::SshUser => "ssh-user",
            CredentialKind::SshHost => "ssh-host",
            CredentialKind::Postgres => "postgres",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a kind's lease is prolonged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease is extended and a fresh credential minted for it (JWTs).
    Extend,
    /// The credential cannot be extended; the holder obtains a new one (certificates).
    Reissue { how: &'static str },
}

/// What signs a kind's credentials; `apply` resolves it from the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignerKind {
    /// The active JWT signing key.
    JwtKey,
    /// The cluster CA (X.509).
    ClusterCa,
    /// The active SSH CA key.
    SshCa,
    /// Nothing signs it: the credential is a login that exists outside the cluster.
    None,
}

/// The signer `apply` found for a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The signing key's id (the JWT `kid`, the SSH CA's key id); empty for the cluster CA.
    pub kid: String,
    /// The cluster CA's trust domain, for X.509-SVIDs.
    pub trust_domain: Option<String>,
    /// For SSH certificates: the serial this grant gets (unique cluster-wide, never 0).
    pub serial: u64,
}

/// Everything `apply` knows when it turns a request into a grant.
#[derive(Debug, Clone)]
pub struct GrantContext<'a> {
    pub lease_id: &'a str,
    pub role: &'a str,
    pub subject: &'a str,
    pub now_ms: u64,
    pub expires_at_ms: u64,
    pub policy: &'a PolicyStamp,
    pub signer: &'a Signer,
    pub stamp: &'a KindStamp,
}

/// What policy sees of a role or a request, whatever its kind: the attributes of the Cedar
/// `Role` entity and of the request context that are not common to every kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CedarView<'a> {
    pub audience: &'a str,
    pub scopes: &'a [String],
    /// SSH principals (user names or host names).
    pub principals: &'a [String],
}

/// What a request asks for in itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked<'a> {
    pub audience: Option<&'a str>,
    pub scopes: &'a [String],
    pub principals: &'a [String],
}

/// One credential kind.
pub trait Kind {
    const NAME: CredentialKind;
    const RENEWAL: Renewal;
    const SIGNER: SignerKind;
    /// What a role of this kind allows.
    type Spec;
    /// What a caller asks for.
    type Request;
    /// What the lease records: exactly what minting needs, nothing more.
    type Grant;

    fn validate_spec(spec: &Self::Spec) -> Result<(), Error>;
    fn validate_request(request: &Self::Request) -> Result<(), Error>;
    /// The leader's randomness for this request (chosen before proposing, so `apply` and minting
    /// are functions of the log).
    fn stamp(_request: &Self::Request, _entropy: &mut dyn Entropy) -> KindStamp {
        KindStamp::None
    }
    /// The grant for a request under a role and a policy decision, or a precise refusal.
    fn grant(
        spec: &Self::Spec,
        request: &Self::Request,
        ctx: &GrantContext<'_>,
    ) -> Result<Self::Grant, Error>;
    fn cedar_role(spec: &Self::Spec) -> CedarView<'_>;
    fn cedar_request<'a>(spec: &'a Self::Spec, request: &'a Self::Request) -> CedarView<'a>;
    fn cedar_grant(grant: &Self::Grant) -> CedarView<'_>;
    /// Kind-specific facts for the audit record (never secret).
    fn audit(grant: &Self::Grant) -> BTreeMap<String, String>;
}

/// A role's kind-specific part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleSpec {
    Jwt(jwt::Spec),
    X509Svid(x509_svid::Spec),
    Ssh(ssh::Spec),
    Postgres(postgres::Spec),
}

/// A request's kind-specific part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KindRequest {
    Jwt(jwt::Request),
    X509Svid(x509_svid::Request),
    Ssh(ssh::Request),
    Postgres(postgres::Request),
}

/// A lease's kind-specific part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    Jwt(jwt::Grant),
    X509Svid(x509_svid::Grant),
    Ssh(ssh::Grant),
    Postgres(postgres::Grant),
}

/// Randomness the leader chose for one request's kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KindStamp {
    None,
    /// The OpenSSH certificate nonce.
    Nonce([u8; 32]),
}

impl RoleSpec {
    pub fn kind(&self) -> CredentialKind {
        match self {
            RoleSpec::Jwt(_) => jwt::Jwt::NAME,
            RoleSpec::X509Svid(_) => x509_svid::X509Svid::NAME,
            RoleSpec::Ssh(s) => s.kind(),
            RoleSpec::Postgres(_) => postgres::Postgres::NAME,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        match self {
            RoleSpec::Jwt(s) => jwt::Jwt::validate_spec(s),
            RoleSpec::X509Svid(s) => x509_svid::X509Svid::validate_spec(s),
            RoleSpec::Ssh(s) => ssh::Ssh::validate_spec(s),
            RoleSpec::Postgres(s) => postgres::Postgres::validate_spec(s),
        }
    }

    /// The canonical form stored: lists sorted and unique, so equal roles encode equally.
    pub fn normalise(&mut self) {
        let tidy = |v: &mut Vec<String>| {
            v.sort();
            v.dedup();
        };
        match self {
            RoleSpec::Jwt(s) => tidy(&mut s.allowed_scopes),
            RoleSpec::X509Svid(_) => {}
            RoleSpec::Ssh(s) => {
                tidy(&mut s.principals);
                tidy(&mut s.host_domains);
                tidy(&mut s.extensions);
                tidy(&mut s.critical_options);
            }
            RoleSpec::Postgres(_) => {}
        }
    }

    pub fn renewal(&self) -> Renewal {
        renewal_of(self.kind())
    }

    pub fn signer(&self) -> SignerKind {
        match self {
            RoleSpec::Jwt(_) => jwt::Jwt::SIGNER,
            RoleSpec::X509Svid(_) => x509_svid::X509Svid::SIGNER,
            RoleSpec::Ssh(_) => ssh::Ssh::SIGNER,
            RoleSpec::Postgres(_) => postgres::Postgres::SIGNER,
        }
    }

    pub fn cedar(&self) -> CedarView<'_> {
        match self {
            RoleSpec::Jwt(s) => jwt::Jwt::cedar_role(s),
            RoleSpec::X509Svid(s) => x509_svid::X509Svid::cedar_role(s),
            RoleSpec::Ssh(s) => ssh::Ssh::cedar_role(s),
            RoleSpec::Postgres(s) => postgres::Postgres::cedar_role(s),
        }
    }

    /// What policy sees of `request` under this role (the role's defaults fill what the
    /// request leaves out). A request of another kind shows nothing; `grant` refuses it.
    pub fn cedar_request<'a>(&'a self, request: &'a KindRequest) -> CedarView<'a> {
        match (self, request) {
            (RoleSpec::Jwt(s), KindRequest::Jwt(r)) => jwt::Jwt::cedar_request(s, r),
            (RoleSpec::X509Svid(s), KindRequest::X509Svid(r)) => {
                x509_svid::X509Svid::cedar_request(s, r)
            }
            (RoleSpec::Ssh(s), KindRequest::Ssh(r)) => ssh::Ssh::cedar_request(s, r),
            (RoleSpec::Postgres(s), KindRequest::Postgres(r)) => {
                postgres::Postgres::cedar_request(s, r)
            }
            _ => CedarView::default(),
        }
    }

    /// The grant for `request`, or a precise refusal; the one place where a role's kind meets
    /// a request's.
    pub fn grant(&self, request: &KindRequest, ctx: &GrantContext<'_>) -> Result<Grant, Error> {
        match (self, request) {
            (RoleSpec::Jwt(s), KindRequest::Jwt(r)) => jwt::Jwt::grant(s, r, ctx).map(Grant::Jwt),
            (RoleSpec::X509Svid(s), KindRequest::X509Svid(r)) => {
                x509_svid::X509Svid::grant(s, r, ctx).map(Grant::X509Svid)
            }
            (RoleSpec::Ssh(s), KindRequest::Ssh(r)) => ssh::Ssh::grant(s, r, ctx).map(Grant::Ssh),
            (RoleSpec::Postgres(s), KindRequest::Postgres(r)) => {
                postgres::Postgres::grant(s, r, ctx).map(Grant::Postgres)
            }
            (spec, request) => Err(Error::KindMismatch {
                role: ctx.role.to_string(),
                role_kind: spec.kind().as_str().into(),
                requested: request.kind_family().into(),
            }),
        }
    }
}

pub fn renewal_of(kind: CredentialKind) -> Renewal {
    match kind {
        CredentialKind::Jwt => jwt::Jwt::RENEWAL,
        CredentialKind::X509Svid => x509_svid::X509Svid::RENEWAL,
        CredentialKind::SshUser | CredentialKind::SshHost => ssh::Ssh::RENEWAL,
        CredentialKind::Postgres => postgres::Postgres::RENEWAL,
    }
}

impl KindRequest {
    /// The family of kinds the request is for (`ssh` covers user and host certificates).
    pub fn kind_family(&self) -> &'static str {
        match self {
            KindRequest::Jwt(_) => "jwt",
            KindRequest::X509Svid(_) => "x509-svid",
            KindRequest::Ssh(_) => "ssh",
            KindRequest::Postgres(_) => "postgres",
        }
    }

    /// What the request asks for in itself (before a role fills in defaults), for the audit
    /// record of a request refused before its role was looked at.
    pub fn asked(&self) -> Asked<'_> {
        match self {
            KindRequest::Jwt(r) => Asked {
                audience: r.audience.as_deref(),
                scopes: &r.scopes,
                principals: &[],
            },
            KindRequest::X509Svid(_) | KindRequest::Postgres(_) => Asked::default(),
            KindRequest::Ssh(r) => Asked {
                audience: None,
                scopes: &[],
                principals: &r.principals,
            },
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        match self {
            KindRequest::Jwt(r) => jwt::Jwt::validate_request(r),
            KindRequest::X509Svid(r) => x509_svid::X509Svid::validate_request(r),
            KindRequest::Ssh(r) => ssh::Ssh::validate_request(r),
            KindRequest::Postgres(r) => postgres::Postgres::validate_request(r),
        }
    }

    pub fn stamp(&self, entropy: &mut dyn Entropy) -> KindStamp {
        match self {
            KindRequest::Jwt(r) => jwt::Jwt::stamp(r, entropy),
            KindRequest::X509Svid(r) => x509_svid::X509Svid::stamp(r, entropy),
            KindRequest::Ssh(r) => ssh::Ssh::stamp(r, entropy),
            KindRequest::Postgres(r) => postgres::Postgres::stamp(r, entropy),
        }
    }
}

impl Grant {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Grant::Jwt(_) => jwt::Jwt::NAME,
            Grant::X509Svid(_) => x509_svid::X509Svid::NAME,
            Grant::Ssh(g) => g.cert_type.kind(),
            Grant::Postgres(_) => postgres::Postgres::NAME,
        }
    }

    /// What signs this grant's credential.
    pub fn signer(&self) -> SignerKind {
        match self {
            Grant::Jwt(_) => jwt::Jwt::SIGNER,
            Grant::X509Svid(_) => x509_svid::X509Svid::SIGNER,
            Grant::Ssh(_) => ssh::Ssh::SIGNER,
            Grant::Postgres(_) => postgres::Postgres::SIGNER,
        }
    }

    /// Where the credential lives outside the cluster, if it does: the effects target whose
    /// executor creates, extends and drops it.
    pub fn external_target(&self) -> Option<String> {
        match self {
            Grant::Postgres(g) => Some(g.target()),
            Grant::Jwt(_) | Grant::X509Svid(_) | Grant::Ssh(_) => None,
        }
    }

    pub fn cedar(&self) -> CedarView<'_> {
        match self {
            Grant::Jwt(g) => jwt::Jwt::cedar_grant(g),
            Grant::X509Svid(g) => x509_svid::X509Svid::cedar_grant(g),
            Grant::Ssh(g) => ssh::Ssh::cedar_grant(g),
            Grant::Postgres(g) => postgres::Postgres::cedar_grant(g),
        }
    }

    /// The narrowest role spec that allows this grant: what policy sees of a lease whose role
    /// has since been deleted.
    pub fn implied_spec(&self) -> RoleSpec {
        match self {
            Grant::Jwt(g) => RoleSpec::Jwt(jwt::Spec {
                audience: g.audience.clone(),
                allowed_scopes: g.scopes.clone(),
            }),
            Grant::X509Svid(_) => RoleSpec::X509Svid(x509_svid::Spec {}),
            Grant::Ssh(g) => RoleSpec::Ssh(ssh::Spec {
                cert_type: g.cert_type,
                principals: match g.cert_type {
                    ssh::CertType::User => g.principals.clone(),
                    ssh::CertType::Host => Vec::new(),
                },
                host_domains: match g.cert_type {
                    ssh::CertType::User => Vec::new(),
                    ssh::CertType::Host => g.principals.clone(),
                },
                allow_subdomains: false,
                extensions: g.extensions.clone(),
                critical_options: g.critical_options.keys().cloned().collect(),
            }),
            // Policy sees nothing kind-specific of a PostgreSQL role; the statements are not
            // the grant's to know.
            Grant::Postgres(g) => RoleSpec::Postgres(postgres::Spec {
                connection: g.connection.clone(),
                creation_statements: Vec::new(),
                revocation_statements: Vec::new(),
                renew_statements: Vec::new(),
                username_template: postgres::DEFAULT_USERNAME_TEMPLATE.into(),
                terminate_sessions: true,
                password: g.password.clone(),
            }),
        }
    }

    /// A revoked certificate's entry in the KRL: `(valid_before in Unix seconds, serial)`.
    pub fn krl_entry(&self) -> Option<(u64, u64)> {
        match self {
            Grant::Ssh(g) => Some((g.valid_before, g.serial)),
            Grant::Jwt(_) | Grant::X509Svid(_) | Grant::Postgres(_) => None,
        }
    }

    pub fn audit(&self) -> BTreeMap<String, String> {
        match self {
            Grant::Jwt(g) => jwt::Jwt::audit(g),
            Grant::X509Svid(g) => x509_svid::X509Svid::audit(g),
            Grant::Ssh(g) => ssh::Ssh::audit(g),
            Grant::Postgres(g) => postgres::Postgres::audit(g),
        }
    }
}

// ---- validation helpers shared by the kinds ----

pub(crate) fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Printable text without control characters (and without whitespace unless allowed).
pub(crate) fn validate_text(
    what: &str,
    s: &str,
    max: usize,
    allow_space: bool,
) -> Result<(), Error> {
    if s.is_empty() || s.len() > max {
        return Err(invalid(format!("{what} must be 1 to {max} bytes")));
    }
    if s.chars()
        .any(|c| c.is_control() || (!allow_space && c.is_whitespace()))
    {
        return Err(invalid(format!(
            "{what} must not contain control characters{}",
            if allow_space { "" } else { " or whitespace" }
        )));
    }
    Ok(())
}
