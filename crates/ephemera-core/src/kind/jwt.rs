//! RFC 9068 JWT access tokens: an audience and a downscoped set of scopes, signed after commit
//! with the active EdDSA key (see [`crate::token`]). Renewed by extension.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{validate_text, CedarView, CredentialKind, GrantContext, Kind, Renewal, SignerKind};
use crate::error::Error;

pub const MAX_AUDIENCE_LEN: usize = 256;
pub const MAX_SCOPE_LEN: usize = 128;
pub const MAX_SCOPES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub audience: String,
    /// Scopes a credential of this role may carry, sorted and unique.
    pub allowed_scopes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The credential carries at most these (and nothing when none are asked for).
    pub scopes: Vec<String>,
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub audience: String,
    pub scopes: Vec<String>,
}

pub struct Jwt;

/// RFC 6749 scope-token: printable ASCII except space, '"' and '\'.
pub fn validate_scope(s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_SCOPE_LEN {
        return Err(Error::InvalidArgument(format!(
            "scope must be 1 to {MAX_SCOPE_LEN} characters"
        )));
    }
    if !s
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    {
        return Err(Error::InvalidArgument(format!(
            "scope {s:?} must be printable ASCII without spaces, '\"' or '\\'"
        )));
    }
    Ok(())
}

pub fn validate_scopes(scopes: &[String]) -> Result<(), Error> {
    if scopes.len() > MAX_SCOPES {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_SCOPES} scopes"
        )));
    }
    scopes.iter().try_for_each(|s| validate_scope(s))
}

impl Kind for Jwt {
    const NAME: CredentialKind = CredentialKind::Jwt;
    const RENEWAL: Renewal = Renewal::Extend;
    const SIGNER: SignerKind = SignerKind::JwtKey;
    type Spec = Spec;
    type Request = Request;
    type Grant = Grant;

    fn validate_spec(spec: &Spec) -> Result<(), Error> {
        validate_text("audience", &spec.audience, MAX_AUDIENCE_LEN, false)?;
        validate_scopes(&spec.allowed_scopes)?;
        if spec.allowed_scopes.is_empty() {
            return Err(Error::InvalidArgument(
                "a JWT role must allow at least one scope".into(),
            ));
        }
        Ok(())
    }

    fn validate_request(r: &Request) -> Result<(), Error> {
        validate_scopes(&r.scopes)?;
        if let Some(a) = &r.audience {
            validate_text("audience", a, MAX_AUDIENCE_LEN, false)?;
        }
        Ok(())
    }

    fn grant(spec: &Spec, r: &Request, ctx: &GrantContext<'_>) -> Result<Grant, Error> {
        if let Some(aud) = &r.audience {
            if *aud != spec.audience {
                return Err(Error::AudienceNotAllowed {
                    requested: aud.clone(),
                    role: ctx.role.to_string(),
                    allowed: spec.audience.clone(),
                });
            }
        }
        // Downscoping: requested ∩ role ∩ policy. Nothing beyond what was asked for.
        let mut scopes: Vec<String> = r
            .scopes
            .iter()
            .filter(|s| spec.allowed_scopes.iter().any(|a| a == *s))
            .filter(|s| {
                ctx.policy
                    .scopes
                    .as_ref()
                    .is_none_or(|granted| granted.contains(s))
            })
            .cloned()
            .collect();
        scopes.sort();
        scopes.dedup();
        if scopes.is_empty() && !r.scopes.is_empty() {
            return Err(Error::NoScopeGranted {
                requested: r.scopes.join(" "),
                role: ctx.role.to_string(),
            });
        }
        Ok(Grant {
            audience: spec.audience.clone(),
            scopes,
        })
    }

    fn cedar_role(spec: &Spec) -> CedarView<'_> {
        CedarView {
            audience: &spec.audience,
            scopes: &spec.allowed_scopes,
            principals: &[],
        }
    }

    fn cedar_request<'a>(spec: &'a Spec, r: &'a Request) -> CedarView<'a> {
        CedarView {
            audience: r.audience.as_deref().unwrap_or(&spec.audience),
            scopes: &r.scopes,
            principals: &[],
        }
    }

    fn cedar_grant(g: &Grant) -> CedarView<'_> {
        CedarView {
            audience: &g.audience,
            scopes: &g.scopes,
            principals: &[],
        }
    }

    fn audit(_g: &Grant) -> BTreeMap<String, String> {
        // Audience and scopes have their own audit fields.
        BTreeMap::new()
    }
}
