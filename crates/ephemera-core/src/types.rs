//! Domain types: principals, roles, leases, signing keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a principal proved its identity. Workload identity (issue: mTLS SVIDs, JWT assertions,
/// join tokens) adds variants; every decision and audit record carries the principal whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// The break-glass credential created at `cluster init`.
    BootstrapAdmin,
    /// The cluster itself (leader workers: expiry, key rotation).
    System,
    /// mTLS with an X.509-SVID verified against a trust bundle.
    X509Svid,
    /// A one-time join token (redeemed for a first X.509-SVID).
    JoinToken,
    /// A JWT assertion from a configured OIDC issuer.
    JwtAssertion,
}

impl AuthMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthMethod::BootstrapAdmin => "bootstrap_admin",
            AuthMethod::System => "system",
            AuthMethod::X509Svid => "x509_svid",
            AuthMethod::JoinToken => "join_token",
            AuthMethod::JwtAssertion => "jwt_assertion",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The identity: a SPIFFE ID, an OIDC subject, or a fixed name for built-in principals.
    pub id: String,
    pub auth_method: AuthMethod,
    /// Trust domain or issuer that vouched for the identity, when there is one.
    pub issuer: Option<String>,
    /// Attributes produced by authentication, for policy.
    pub attributes: BTreeMap<String, String>,
    /// Set by the authenticating node when the identity is a configured administrator. It
    /// travels in the command, so `apply` decides the same way on every node. A leader never
    /// takes it from a forwarded request: it derives it again (see the node's routing).
    pub admin: bool,
    /// The break-glass credential as the caller presented it, kept in memory only so that a
    /// leader handed a forwarded break-glass request can check the credential itself. Never
    /// serialised (not in a command, the log or an audit record), never printed.
    #[serde(skip)]
    pub presented: PresentedSecret,
}

/// A credential held in memory for one request (see [`Principal::presented`]): zeroised when
/// dropped, redacted in `Debug`, and not part of a principal's identity (equal to any other).
#[derive(Clone, Default)]
pub struct PresentedSecret(Option<std::sync::Arc<zeroize::Zeroizing<String>>>);

impl PresentedSecret {
    pub fn new(secret: &str) -> Self {
        PresentedSecret(Some(std::sync::Arc::new(zeroize::Zeroizing::new(
            secret.to_string(),
        ))))
    }

    pub fn expose(&self) -> Option<&str> {
        self.0.as_ref().map(|s| s.as_str())
    }
}

impl std::fmt::Debug for PresentedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PresentedSecret(<redacted>)"
        } else {
            "PresentedSecret(none)"
        })
    }
}

/// On the cluster link only (a forwarded break-glass request, over mutual TLS), never in a
/// command: [`Principal::presented`] is skipped.
impl Serialize for PresentedSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.expose().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PresentedSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = zeroize::Zeroizing::new(Option::<String>::deserialize(d)?);
        Ok(match text.as_deref() {
            Some(t) => PresentedSecret::new(t),
            None => PresentedSecret::default(),
        })
    }
}

impl PartialEq for PresentedSecret {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PresentedSecret {}

impl Principal {
    pub const BOOTSTRAP_ADMIN_ID: &'static str = "ephemera:bootstrap-admin";
    pub const SYSTEM_ID: &'static str = "ephemera:system";

    pub fn bootstrap_admin() -> Self {
        Principal {
            id: Self::BOOTSTRAP_ADMIN_ID.into(),
            auth_method: AuthMethod::BootstrapAdmin,
            issuer: None,
            attributes: BTreeMap::new(),
            admin: true,
            presented: PresentedSecret::default(),
        }
    }

    /// The break-glass administrator, holding the credential it presented.
    pub fn bootstrap_admin_presenting(credential: &str) -> Self {
        Principal {
            presented: PresentedSecret::new(credential),
            ..Self::bootstrap_admin()
        }
    }

    pub fn system() -> Self {
        Principal {
            id: Self::SYSTEM_ID.into(),
            auth_method: AuthMethod::System,
            issuer: None,
            attributes: BTreeMap::new(),
            admin: true,
            presented: Default::default(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// A workload authenticated by its X.509-SVID.
    pub fn svid(spiffe_id: String, trust_domain: String, admin: bool) -> Self {
        Principal {
            id: spiffe_id,
            auth_method: AuthMethod::X509Svid,
            issuer: Some(trust_domain),
            attributes: BTreeMap::new(),
            admin,
            presented: Default::default(),
        }
    }

    /// The actor of an audit record for a refused authentication.
    pub fn unauthenticated(method: AuthMethod) -> Self {
        Principal {
            id: "ephemera:unauthenticated".into(),
            auth_method: method,
            issuer: None,
            attributes: BTreeMap::new(),
            admin: false,
            presented: Default::default(),
        }
    }
}

pub use crate::kind::CredentialKind;
use crate::kind::{Grant, RoleSpec};

/// A credential template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    /// What the role's kind allows (a JWT's audience and scopes, an SSH certificate's
    /// principals...); the kind is the spec's.
    pub spec: RoleSpec,
    pub default_ttl_s: u64,
    /// Hard cap on a lease's lifetime, counted from its first issue over all renewals.
    pub max_ttl_s: u64,
    /// Labels for policies to match (`resource.environment`, `resource.target`).
    pub environment: Option<String>,
    pub target: Option<String>,
    /// When policy refuses a renewal (the holder's attributes or the policy changed), revoke
    /// the lease instead of letting it run out.
    pub revoke_on_renewal_denied: bool,
    /// Issuances per second one identity may make from this role, cluster-wide (burst: the
    /// same number); `None`: the cluster default.
    pub issue_rate_per_identity: Option<u32>,
    /// Issuances per second of this role by everyone together, cluster-wide.
    pub issue_rate: Option<u32>,
    /// Live leases of this role one identity may hold (re-issuing instead of renewing hits it).
    pub max_live_leases_per_identity: Option<u64>,
    /// Live leases of this role in all.
    pub max_live_leases: Option<u64>,
}

impl Role {
    pub fn kind(&self) -> CredentialKind {
        self.spec.kind()
    }

    /// The role X.509-SVIDs are issued under unless an administrator has defined it
    /// differently (`role put x509-svid --kind x509-svid ...`).
    pub fn builtin_svid() -> Role {
        Role {
            name: SVID_ROLE.into(),
            spec: RoleSpec::X509Svid(crate::kind::x509_svid::Spec {}),
            default_ttl_s: SVID_DEFAULT_TTL_S,
            max_ttl_s: SVID_MAX_TTL_S,
            environment: None,
            target: None,
            revoke_on_renewal_denied: false,
            issue_rate_per_identity: None,
            issue_rate: None,
            max_live_leases_per_identity: None,
            max_live_leases: None,
        }
    }
}

/// An identity the anomaly detector (or an administrator) has stopped: it gets no issuance and
/// no renewal until released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub identity: String,
    pub since_ms: u64,
    /// The anomaly kind that caused it (`rate_spike`, ...).
    pub reason: String,
    pub detail: String,
    /// Leases revoked when it was quarantined.
    pub revoked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    Active,
    Revoked { at_ms: u64, by: String },
    Expired { at_ms: u64 },
}

impl LeaseState {
    pub fn name(&self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Revoked { .. } => "revoked",
            LeaseState::Expired { .. } => "expired",
        }
    }
}

/// A lease: a kind-agnostic header and the kind's grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub role: String,
    /// The workload identity the credential is bound to (`sub`).
    pub subject: String,
    /// Who requested it (`client_id`).
    pub client_id: String,
    pub purpose: Option<String>,
    /// The lease this one was derived from (token exchange); revoked with it.
    pub parent: Option<String>,
    /// TTL granted at issue; the default renewal increment.
    pub ttl_s: u64,
    pub issued_at_ms: u64,
    /// Time the current credential was minted (`iat`): issue or last renewal.
    pub minted_at_ms: u64,
    pub expires_at_ms: u64,
    /// `issued_at + role max TTL`: no renewal goes past it.
    pub max_expires_at_ms: u64,
    /// Server-chosen time after which the holder should renew.
    pub renew_after_ms: u64,
    /// Key that signs the current credential (the JWT signing key, the SSH CA key); empty when
    /// the cluster CA signs.
    pub kid: String,
    pub renewals: u32,
    pub state: LeaseState,
    /// What the kind recorded: exactly what minting the credential needs.
    pub grant: Grant,
}

impl Lease {
    /// Active at `now_ms`: not revoked, not marked expired, and before its deadline.
    pub fn is_active_at(&self, now_ms: u64) -> bool {
        self.state == LeaseState::Active && now_ms < self.expires_at_ms
    }

    pub fn kind(&self) -> CredentialKind {
        self.grant.kind()
    }

    /// The audience a JWT carries; empty for other kinds.
    pub fn audience(&self) -> &str {
        self.grant.cedar().audience
    }

    /// The scopes a JWT carries; empty for other kinds.
    pub fn scopes(&self) -> &[String] {
        self.grant.cedar().scopes
    }
}

/// A one-time join token, stored by the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub spiffe_id: String,
    pub expires_at_ms: u64,
    pub created_by: String,
    /// Set when redeemed; a token is redeemed at most once, cluster-wide.
    pub used_at_ms: Option<u64>,
}

/// The cluster CA: its certificate and the seed of its Ed25519 key, sealed under the KEK.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    pub trust_domain: String,
    pub cert_pem: String,
    pub sealed_seed: Vec<u8>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Key id under which the CA seed is sealed (the AEAD's associated data).
pub const CLUSTER_CA_KEY_ID: &str = "cluster-ca";
/// Role name of X.509-SVID leases (revoke them all with `revoke --role x509-svid`).
pub const SVID_ROLE: &str = "x509-svid";
pub const SVID_DEFAULT_TTL_S: u64 = 3600;
pub const SVID_MAX_TTL_S: u64 = 24 * 3600;
pub const JOIN_TOKEN_MAX_TTL_S: u64 = 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    /// Signs new credentials.
    Active,
    /// Superseded; verifies what it signed until that has expired.
    Retiring { since_ms: u64 },
    /// Compromised: everything it signed is revoked and it is out of the JWKS.
    Revoked { at_ms: u64 },
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub public_key: [u8; 32],
    /// The private key sealed under the cluster key-encryption key; never in the clear.
    pub sealed_private_key: Vec<u8>,
    pub created_at_ms: u64,
    pub state: KeyState,
    /// Latest `exp` of any credential this key signed; it stays published until then.
    pub max_token_expiry_ms: u64,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("state", &self.state)
            .field("created_at_ms", &self.created_at_ms)
            .field("max_token_expiry_ms", &self.max_token_expiry_ms)
            .finish_non_exhaustive()
    }
}

impl SigningKeyRecord {
    /// Whether verifiers still need the key at `now_ms` (it is in the JWKS).
    pub fn is_published_at(&self, now_ms: u64, skew_ms: u64) -> bool {
        match self.state {
            KeyState::Active => true,
            KeyState::Retiring { .. } => now_ms <= self.max_token_expiry_ms.saturating_add(skew_ms),
            KeyState::Revoked { .. } => false,
        }
    }

    pub fn status_at(&self, now_ms: u64, skew_ms: u64) -> &'static str {
        match self.state {
            KeyState::Active => "active",
            KeyState::Retiring { .. } if self.is_published_at(now_ms, skew_ms) => "retiring",
            KeyState::Retiring { .. } => "retired",
            KeyState::Revoked { .. } => "revoked",
        }
    }
}
