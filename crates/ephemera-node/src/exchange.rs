//! RFC 8693 token exchange at the receiving node: the request is checked, the subject token
//! (and the actor token, when one is presented) verified, the role chosen, the policy decided
//! (`exchange`, with the new token's delegation depth), and `Intent::Exchange` proposed; `apply`
//! checks again at commit what may have changed in between (`ephemera_core::state::delegation`),
//! and the answer is the new token, minted after commit like every JWT.
//!
//! A subject token is an access token this cluster issued (`access_token`, or `jwt` with this
//! cluster's `iss`): the new token is a child of its lease. Or it is an assertion of a
//! configured OIDC issuer (`id_token`, or `jwt` with that issuer's `iss`), verified as assertion
//! callers are: the new token is for the assertion's subject, expires no later than it, is
//! narrowed to its `scope` claim when it has one, and a `may_act` claim must name the actor.
//! An actor token is always an access token of this cluster (the caller's own).

use ephemera_core::command::{
    ExchangeIntent, ExchangeSubject, Intent, IssueIntent, Outcome, SubjectAssertion,
};
use ephemera_core::kind::{jwt, KindRequest, RoleSpec};
use ephemera_core::state;
use ephemera_core::token::{self, Claims};
use ephemera_core::types::{Lease, Principal, Role};
use ephemera_core::Error;

use crate::authz::CallerContext;
use crate::mint::Minted;
use crate::node::{Node, KEY_PUBLISH_GRACE_MS};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// The token types an exchange issues, and accepts as actor tokens (our access tokens are
/// JWTs).
const OUR_TOKEN_TYPES: [&str; 2] = [ACCESS_TOKEN, JWT];
/// The subject token types: ours, and OIDC issuers' identity assertions.
const SUBJECT_TOKEN_TYPES: [&str; 3] = [ACCESS_TOKEN, JWT, ID_TOKEN];
/// Scopes one request may name.
const MAX_SCOPES: usize = 64;

/// An exchange request's parameters (RFC 8693 §2.1), plus `role`, which names the role that
/// templates the new token when the audience alone does not.
#[derive(Default, Clone, serde::Deserialize)]
pub struct ExchangeRequest {
    pub grant_type: String,
    pub subject_token: String,
    pub subject_token_type: String,
    pub actor_token: Option<String>,
    pub actor_token_type: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    pub requested_token_type: Option<String>,
    pub role: Option<String>,
}

/// Tokens are credentials: `Debug` names everything else.
impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("grant_type", &self.grant_type)
            .field("subject_token", &"<redacted>")
            .field("subject_token_type", &self.subject_token_type)
            .field(
                "actor_token",
                &self.actor_token.as_ref().map(|_| "<redacted>"),
            )
            .field("actor_token_type", &self.actor_token_type)
            .field("audience", &self.audience)
            .field("resource", &self.resource)
            .field("scope", &self.scope)
            .field("requested_token_type", &self.requested_token_type)
            .field("role", &self.role)
            .finish()
    }
}

/// The answer (RFC 8693 §2.2.1).
pub struct Exchanged {
    pub access_token: String,
    pub issued_token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
    pub lease: Lease,
}

/// An exchange's refusal, as RFC 6749 §5.2 and RFC 8693 §2.2.2 name it; `Other` is an error
/// of the cluster (unavailable, rate limited, internal), mapped as everywhere else.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error(transparent)]
    Other(Error),
}

impl ExchangeError {
    /// The RFC error code; `None` for `Other`.
    pub fn oauth_code(&self) -> Option<&'static str> {
        Some(match self {
            ExchangeError::InvalidRequest(_) => "invalid_request",
            ExchangeError::UnsupportedGrantType(_) => "unsupported_grant_type",
            ExchangeError::InvalidGrant(_) => "invalid_grant",
            ExchangeError::InvalidScope(_) => "invalid_scope",
            ExchangeError::InvalidTarget(_) => "invalid_target",
            ExchangeError::UnauthorizedClient(_) => "unauthorized_client",
            ExchangeError::Other(_) => return None,
        })
    }
}

impl From<Error> for ExchangeError {
    fn from(e: Error) -> Self {
        let text = e.to_string();
        match e {
            Error::SubjectTokenRefused(_) | Error::DelegationTooDeep { .. } => {
                ExchangeError::InvalidGrant(text)
            }
            Error::ScopeNotInSubjectToken { .. }
            | Error::NoScopeGranted { .. }
            | Error::NotAllowedByRole { .. } => ExchangeError::InvalidScope(text),
            // RFC 8693 §2.2.2: a target the server will not issue for, by role or by policy.
            Error::AudienceNotAllowed { .. } | Error::UnknownRole(_) | Error::PolicyDenied(_) => {
                ExchangeError::InvalidTarget(text)
            }
            Error::InvalidArgument(_) | Error::TtlAboveCap { .. } | Error::KindMismatch { .. } => {
                ExchangeError::InvalidRequest(text)
            }
            Error::PermissionDenied(_) | Error::Quarantined(_) => {
                ExchangeError::UnauthorizedClient(text)
            }
            other => ExchangeError::Other(other),
        }
    }
}

fn invalid(m: impl Into<String>) -> ExchangeError {
    ExchangeError::InvalidRequest(m.into())
}

fn internal(e: impl std::fmt::Display) -> ExchangeError {
    ExchangeError::Other(Error::Internal(e.to_string()))
}

impl Node {
    /// Exchanges `req`'s subject token for a narrower access token, for the authenticated
    /// `caller_principal`.
    pub async fn exchange_token(
        &self,
        caller_principal: &Principal,
        caller: &CallerContext,
        req: ExchangeRequest,
    ) -> Result<Exchanged, ExchangeError> {
        if req.grant_type != GRANT_TYPE {
            return Err(ExchangeError::UnsupportedGrantType(format!(
                "grant_type must be {GRANT_TYPE}"
            )));
        }
        let audience = check_request(&req)?;
        // Linearizable from here: a subject or actor token revoked before this point is
        // refused (and `apply` refuses a subject token revoked before the commit).
        self.read_barrier().await?;
        let subject = self.verified_subject(&req).await?;
        // An actor token is the caller's own: otherwise anyone holding a token derived from
        // someone could name that someone as the actor.
        let actor = match &req.actor_token {
            Some(t) => {
                let (claims, _) = self.verified(t, "actor token")?;
                if claims.sub != caller_principal.id {
                    return Err(ExchangeError::InvalidGrant(format!(
                        "the actor token's subject is {:?}, not the caller {:?}: an actor token \
                         must be the caller's own",
                        claims.sub, caller_principal.id
                    )));
                }
                if claims.act.is_some() {
                    return Err(ExchangeError::InvalidGrant(
                        "an actor token must not itself be an exchanged token (it carries act)"
                            .into(),
                    ));
                }
                Some(claims.sub)
            }
            None => None,
        };
        subject.check_may_act(actor.as_deref(), &caller_principal.id)?;
        let role = self.exchange_role(req.role.as_deref(), audience.as_deref())?;
        let RoleSpec::Jwt(spec) = &role.spec else {
            unreachable!("exchange_role returns JWT roles only")
        };
        // Narrowing only: the scopes asked for, or else those of the subject token the role
        // allows (none, for an assertion without a scope claim).
        let scopes: Vec<String> = match &req.scope {
            Some(s) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            None => subject
                .scopes()
                .unwrap_or_default()
                .into_iter()
                .filter(|s| spec.allowed_scopes.iter().any(|a| a == s))
                .collect(),
        };
        if scopes.len() > MAX_SCOPES {
            return Err(invalid(format!("at most {MAX_SCOPES} scopes")));
        }
        let before = match &subject {
            SubjectToken::Ours(ours) => {
                let parent = &ours.1;
                state::delegation(&self.view, &parent.id).map_err(internal)?
            }
            SubjectToken::Assertion(..) => None,
        };
        let depth = before.as_ref().map_or(1, |d| d.hops + 1);
        // The new token's chain, as `apply` will build it: this hop's actor, then the earlier.
        let actors: Vec<String> = actor
            .iter()
            .cloned()
            .chain(before.into_iter().flat_map(|d| d.act))
            .collect();
        let mut id = [0u8; 16];
        self.fill_random(&mut id);
        let issue = IssueIntent {
            // The node's own id, so that its retries of this proposal cannot issue twice.
            request_id: Some(format!("srv-{}", hex::encode(id))),
            role: role.name.clone(),
            subject: None,
            ttl_s: None,
            purpose: None,
            request: KindRequest::Jwt(jwt::Request {
                scopes,
                audience: Some(spec.audience.clone()),
            }),
            join_token_hash: None,
            supersedes: None,
            context: caller.for_audit(),
            policy: None,
        };
        let subject_id = subject.subject().to_string();
        let intent = ExchangeIntent {
            issue,
            subject: subject.into_intent(),
            actor,
            max_depth: self.max_delegation_depth,
        };
        ephemera_core::command::validate_intent(&Intent::Exchange(intent.clone()))?;
        let derived = crate::authz::ExchangeContext {
            subject: &subject_id,
            delegation_depth: depth,
            actors: &actors,
        };
        let outcome = self
            .propose_decided(caller_principal, || async {
                let mut x = intent.clone();
                let policy = self
                    .decide_exchange(caller_principal, &role, &x.issue, &derived, caller)
                    .await?;
                x.issue.policy = Some(policy);
                Ok(Intent::Exchange(x))
            })
            .await?;
        let Outcome::Lease { lease, .. } = outcome else {
            return Err(internal("an exchange did not return a lease"));
        };
        let Minted::Jwt(access_token) = self.credential_of(&lease).await? else {
            return Err(internal("an exchange minted something else than a JWT"));
        };
        let now = self.clock.now_ms();
        Ok(Exchanged {
            access_token,
            issued_token_type: ACCESS_TOKEN,
            expires_in: lease.expires_at_ms.saturating_sub(now) / 1000,
            scope: lease.scopes().join(" "),
            lease,
        })
    }

    /// The subject token, verified as its type (and for `jwt`, its issuer) says.
    async fn verified_subject(&self, req: &ExchangeRequest) -> Result<SubjectToken, ExchangeError> {
        let text = &req.subject_token;
        // A token naming this cluster as its issuer is never taken down the OIDC path (an
        // operator who listed the cluster itself as an OIDC issuer would otherwise let a
        // derived token shed its parent and its actor chain).
        let this_cluster = self.issuer().ok();
        let names_us = unverified_issuer(text).is_some_and(|iss| Some(iss) == this_cluster);
        let ours = match req.subject_token_type.as_str() {
            ID_TOKEN if names_us => {
                return Err(invalid(format!(
                    "the subject token is an access token of this cluster: its type is \
                     {ACCESS_TOKEN} or {JWT}, not {ID_TOKEN}"
                )))
            }
            ID_TOKEN => false,
            JWT => names_us || unverified_issuer(text).is_none(),
            _ => true,
        };
        if ours {
            let (claims, lease) = self.verified(text, "subject token")?;
            return Ok(SubjectToken::Ours(Box::new((claims, lease))));
        }
        if self.oidc.is_empty() {
            return Err(ExchangeError::InvalidGrant(
                "the subject token is not this cluster's, and no OIDC issuer is configured".into(),
            ));
        }
        let now_s = self.clock.now_ms() / 1000;
        let verified = self
            .oidc
            .verify(text, now_s)
            .await
            .map_err(|e| ExchangeError::InvalidGrant(format!("the subject token: {e}")))?;
        Ok(SubjectToken::Assertion(verified))
    }

    /// A token this cluster issued, that verifies and is live at this node now.
    fn verified(&self, text: &str, what: &str) -> Result<(Claims, Lease), ExchangeError> {
        let refused = |why: String| ExchangeError::InvalidGrant(format!("the {what} {why}"));
        let parsed = token::parse(text).map_err(|e| refused(format!("is malformed: {e}")))?;
        let key = state::get_key(&self.view, &parsed.header.kid)
            .map_err(internal)?
            .ok_or_else(|| refused("was not signed by this cluster".into()))?;
        let issuer = self.issuer()?;
        if !self.signature_verifies(&parsed, text, &key.public_key) || parsed.claims.iss != issuer {
            return Err(refused("does not verify".into()));
        }
        let now = self.clock.now_ms();
        let now_s = now / 1000;
        if !key.is_published_at(now, KEY_PUBLISH_GRACE_MS)
            || parsed.claims.exp <= now_s
            || parsed.claims.nbf > now_s
        {
            return Err(refused(
                "is expired, not yet valid, or its key was retired".into(),
            ));
        }
        let lease = state::get_lease(&self.view, &parsed.claims.jti)
            .map_err(internal)?
            .ok_or_else(|| refused("names no lease of this cluster".into()))?;
        if !lease.is_active_at(now) {
            return Err(refused(format!("is no longer active (lease {})", lease.id)));
        }
        Ok((parsed.claims, lease))
    }

    /// The JWT role that templates the new token: the one named, or the one whose audience is
    /// the requested one.
    fn exchange_role(
        &self,
        name: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Role, ExchangeError> {
        let target = |m: String| ExchangeError::InvalidTarget(m);
        let role = match name {
            Some(name) => state::get_role(&self.view, name)
                .map_err(internal)?
                .ok_or_else(|| target(format!("unknown role {name:?}")))?,
            None => {
                let audience = audience.expect("checked: an audience or a role");
                let mut matching: Vec<Role> = state::list_roles(&self.view)
                    .map_err(internal)?
                    .into_iter()
                    .filter(|r| matches!(&r.spec, RoleSpec::Jwt(s) if s.audience == audience))
                    .collect();
                match matching.len() {
                    0 => {
                        return Err(target(format!(
                            "no role issues tokens for the audience {audience:?}"
                        )))
                    }
                    1 => matching.remove(0),
                    n => {
                        return Err(target(format!(
                            "{n} roles issue tokens for the audience {audience:?}; name one \
                             with the role parameter"
                        )))
                    }
                }
            }
        };
        match &role.spec {
            RoleSpec::Jwt(s) if audience.is_none_or(|a| a == s.audience) => Ok(role),
            RoleSpec::Jwt(s) => Err(target(format!(
                "role {:?} issues tokens for the audience {:?}, not {:?}",
                role.name,
                s.audience,
                audience.unwrap_or_default()
            ))),
            _ => Err(target(format!(
                "role {:?} does not issue access tokens",
                role.name
            ))),
        }
    }
}

/// A verified subject token.
enum SubjectToken {
    /// An access token this cluster issued, and its (active) lease.
    Ours(Box<(Claims, Lease)>),
    /// An assertion of a configured OIDC issuer.
    Assertion(crate::oidc::VerifiedAssertion),
}

impl SubjectToken {
    /// Whom the new token is for.
    fn subject(&self) -> &str {
        match self {
            SubjectToken::Ours(ours) => &ours.0.sub,
            SubjectToken::Assertion(a) => &a.principal.id,
        }
    }

    /// The scopes the new token is narrowed to; `None`: the subject token bounds none.
    fn scopes(&self) -> Option<Vec<String>> {
        let scope = match self {
            SubjectToken::Ours(ours) => &ours.0.scope,
            SubjectToken::Assertion(a) => a.scope.as_ref()?,
        };
        Some(
            scope
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// RFC 8693 §4.4: a `may_act` claim, when present, names who may act for the subject: the
    /// actor token's subject, or else the caller when the caller is not the subject itself.
    fn check_may_act(&self, actor: Option<&str>, caller: &str) -> Result<(), ExchangeError> {
        let SubjectToken::Assertion(a) = self else {
            return Ok(());
        };
        let Some(allowed) = &a.may_act else {
            return Ok(());
        };
        let acting = actor.or((caller != a.principal.id).then_some(caller));
        match acting {
            Some(who) if !allowed.iter().any(|m| m == who) => Err(ExchangeError::InvalidGrant(
                format!("the subject token's may_act does not name {who:?}"),
            )),
            _ => Ok(()),
        }
    }

    /// What `apply` is told of it.
    fn into_intent(self) -> ExchangeSubject {
        match self {
            SubjectToken::Ours(ours) => ExchangeSubject::Lease(ours.1.id),
            SubjectToken::Assertion(a) => {
                // Only scopes this cluster could ever grant matter for narrowing: one it could
                // not is dropped, which narrows further.
                let scopes = a.scope.as_ref().map(|s| {
                    s.split(' ')
                        .filter(|s| ephemera_core::command::validate_scope(s).is_ok())
                        .take(MAX_SCOPES)
                        .map(String::from)
                        .collect()
                });
                let (jti, replay_until_s) = match a.jti {
                    Some((jti, until)) => (Some(jti), until),
                    None => (None, a.expires_at_s),
                };
                ExchangeSubject::Assertion(SubjectAssertion {
                    subject: a.principal.id,
                    expires_at_ms: a.expires_at_s.saturating_mul(1000),
                    scopes,
                    issuer: a.principal.issuer.unwrap_or_default(),
                    jti,
                    replay_until_ms: replay_until_s.saturating_mul(1000),
                })
            }
        }
    }
}

/// The `iss` claim of a JWT, read without verifying anything: only to tell which verifier
/// applies (this cluster's or an OIDC issuer's), each of which then verifies it fully.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_string)
}

/// The request's parameters checked for presence and consistency (`invalid_request`); the
/// target audience (`audience`, else `resource`).
fn check_request(req: &ExchangeRequest) -> Result<Option<String>, ExchangeError> {
    if req.subject_token.is_empty() {
        return Err(invalid("subject_token is required"));
    }
    if req.subject_token_type.is_empty() {
        return Err(invalid("subject_token_type is required"));
    }
    let ours = |t: &str| OUR_TOKEN_TYPES.contains(&t);
    if !SUBJECT_TOKEN_TYPES.contains(&req.subject_token_type.as_str()) {
        return Err(invalid(format!(
            "subject_token_type {:?} is not supported ({ACCESS_TOKEN}, {JWT} or {ID_TOKEN})",
            req.subject_token_type
        )));
    }
    match (&req.actor_token, &req.actor_token_type) {
        (Some(_), None) => return Err(invalid("actor_token needs actor_token_type")),
        (None, Some(_)) => return Err(invalid("actor_token_type without actor_token")),
        (Some(_), Some(t)) if !ours(t) => {
            return Err(invalid(format!(
                "actor_token_type {t:?} is not supported ({ACCESS_TOKEN} or {JWT})"
            )))
        }
        _ => {}
    }
    if let Some(t) = &req.requested_token_type {
        if !ours(t) {
            return Err(invalid(format!(
                "requested_token_type {t:?} is not issued here ({ACCESS_TOKEN})"
            )));
        }
    }
    let audience = match (&req.audience, &req.resource) {
        (Some(a), Some(r)) if a != r => {
            return Err(invalid("audience and resource name different targets"))
        }
        (a, r) => a.clone().or_else(|| r.clone()),
    };
    if audience.is_none() && req.role.is_none() {
        return Err(invalid("name the target: audience (or resource), or role"));
    }
    Ok(audience)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ExchangeRequest {
        ExchangeRequest {
            grant_type: GRANT_TYPE.into(),
            subject_token: "t".into(),
            subject_token_type: ACCESS_TOKEN.into(),
            audience: Some("api".into()),
            ..Default::default()
        }
    }

    #[test]
    fn inconsistent_parameters_are_invalid_requests() {
        type Change = fn(&mut ExchangeRequest);
        let cases: [(Change, &str); 7] = [
            (|r| r.subject_token.clear(), "subject_token is required"),
            (
                |r| r.subject_token_type.clear(),
                "subject_token_type is required",
            ),
            (
                |r| r.subject_token_type = "urn:ietf:params:oauth:token-type:saml2".into(),
                "not supported",
            ),
            (
                |r| r.actor_token = Some("a".into()),
                "needs actor_token_type",
            ),
            (
                |r| r.actor_token_type = Some(JWT.into()),
                "without actor_token",
            ),
            (
                |r| r.resource = Some("elsewhere".into()),
                "different targets",
            ),
            (|r| r.audience = None, "name the target"),
        ];
        for (change, expected) in cases {
            let mut r = req();
            change(&mut r);
            match check_request(&r) {
                Err(ExchangeError::InvalidRequest(m)) => assert!(m.contains(expected), "{m}"),
                other => panic!("{expected}: {other:?}"),
            }
        }
        assert_eq!(check_request(&req()).unwrap().as_deref(), Some("api"));
        let mut by_resource = req();
        by_resource.audience = None;
        by_resource.resource = Some("api".into());
        assert_eq!(check_request(&by_resource).unwrap().as_deref(), Some("api"));
    }

    #[test]
    fn core_errors_become_rfc_codes() {
        let code = |e: Error| ExchangeError::from(e).oauth_code();
        assert_eq!(
            code(Error::SubjectTokenRefused("revoked".into())),
            Some("invalid_grant")
        );
        assert_eq!(
            code(Error::ScopeNotInSubjectToken { scope: "w".into() }),
            Some("invalid_scope")
        );
        assert_eq!(
            code(Error::PolicyDenied("no".into())),
            Some("invalid_target")
        );
        assert_eq!(
            code(Error::DelegationTooDeep { depth: 6, max: 5 }),
            Some("invalid_grant")
        );
        assert_eq!(code(Error::Unavailable("x".into())), None);
    }
}
