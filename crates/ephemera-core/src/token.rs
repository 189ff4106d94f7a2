//! RFC 9068 JWT access tokens signed with Ed25519 (RFC 8037 `EdDSA`). A token is a pure function
//! of the committed lease, the issuer and the signing key: any node produces the same bytes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::types::Lease;

/// `nbf` is backdated by this much so verifiers whose clocks run slightly behind accept the token.
pub const NBF_BACKDATE_S: u64 = 5;
/// Upper bound on a token we are willing to parse.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    pub typ: String,
    pub kid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub jti: String,
    pub scope: String,
    pub client_id: String,
    /// RFC 8693 §4.1: who acts for `sub`, the current actor outermost and earlier actors
    /// nested inside (a token obtained by exchange with an actor token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Act>,
}

/// An RFC 8693 actor claim: `{"sub": actor, "act": {earlier actor}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Act {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Act>>,
}

impl Act {
    /// The claim for a chain of actors, newest first; `None` for an empty chain.
    pub fn from_chain(chain: &[String]) -> Option<Act> {
        chain.iter().rev().fold(None, |inner, sub| {
            Some(Act {
                sub: sub.clone(),
                act: inner.map(Box::new),
            })
        })
    }

    /// The chain, newest first.
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.sub.clone()];
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            out.push(a.sub.clone());
            next = a.act.as_deref();
        }
        out
    }
}

impl Claims {
    pub fn for_lease(lease: &Lease, issuer: &str) -> Self {
        let iat = lease.minted_at_ms / 1000;
        Claims {
            iss: issuer.to_string(),
            sub: lease.subject.clone(),
            aud: lease.audience().to_string(),
            exp: lease.expires_at_ms / 1000,
            iat,
            nbf: iat.saturating_sub(NBF_BACKDATE_S),
            jti: lease.id.clone(),
            scope: lease.scopes().join(" "),
            client_id: lease.client_id.clone(),
            act: None,
        }
    }

    /// The claims of a token obtained by exchange: `act` from its actor chain (newest first).
    pub fn with_act(mut self, chain: &[String]) -> Self {
        self.act = Act::from_chain(chain);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not a compact JWS (three base64url segments)")]
    Malformed,
    #[error("token header is invalid: {0}")]
    BadHeader(String),
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
    #[error("unsupported algorithm {0:?}; only EdDSA is accepted")]
    UnsupportedAlgorithm(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token type {0:?} is not an access token (at+jwt)")]
    WrongType(String),
}

pub fn sign(claims: &Claims, kid: &str, key: &SigningKey) -> String {
    let header = Header {
        alg: "EdDSA".into(),
        typ: "at+jwt".into(),
        kid: kid.into(),
    };
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header serialises"));
    let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
    let signing_input = format!("{h}.{c}");
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// A parsed but not yet verified token.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub header: Header,
    pub claims: Claims,
    signing_input: String,
    signature: Vec<u8>,
}

pub fn parse(token: &str) -> Result<Unverified, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| TokenError::Malformed)?;
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|e| TokenError::BadHeader(e.to_string()))?;
    if header.alg != "EdDSA" {
        return Err(TokenError::UnsupportedAlgorithm(header.alg));
    }
    // RFC 9068 section 4: refuse anything that is not an access token (ID tokens, other JWTs).
    if !header.typ.eq_ignore_ascii_case("at+jwt")
        && !header.typ.eq_ignore_ascii_case("application/at+jwt")
    {
        return Err(TokenError::WrongType(header.typ));
    }
    let claims_bytes = URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims =
        serde_json::from_slice(&claims_bytes).map_err(|e| TokenError::BadClaims(e.to_string()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::Malformed)?;
    Ok(Unverified {
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature,
    })
}

impl Unverified {
    pub fn verify(&self, public_key: &[u8; 32]) -> Result<(), TokenError> {
        let vk = VerifyingKey::from_bytes(public_key).map_err(|_| TokenError::BadSignature)?;
        let sig_bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::BadSignature)?;
        vk.verify(
            self.signing_input.as_bytes(),
            &Signature::from_bytes(&sig_bytes),
        )
        .map_err(|_| TokenError::BadSignature)
    }
}

/// The public JWK (RFC 8037) of a signing key.
pub fn jwk(kid: &str, public_key: &[u8; 32]) -> serde_json::Value {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
        "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(public_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::{jwt, Grant};
    use crate::types::LeaseState;

    fn lease() -> Lease {
        Lease {
            id: "l1".into(),
            role: "r".into(),
            subject: "spiffe://x/y".into(),
            client_id: "c".into(),
            purpose: None,
            parent: None,
            ttl_s: 60,
            issued_at_ms: 1_000_000,
            minted_at_ms: 1_000_000,
            expires_at_ms: 1_060_000,
            max_expires_at_ms: 2_000_000,
            renew_after_ms: 1_040_000,
            kid: "k".into(),
            renewals: 0,
            state: LeaseState::Active,
            grant: Grant::Jwt(jwt::Grant {
                audience: "aud".into(),
                scopes: vec!["a".into(), "b".into()],
            }),
        }
    }

    #[test]
    fn sign_is_deterministic_and_verifies() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let claims = Claims::for_lease(&lease(), "https://iss");
        let t1 = sign(&claims, "k", &key);
        assert_eq!(t1, sign(&claims, "k", &key));
        let parsed = parse(&t1).unwrap();
        assert_eq!(parsed.claims, claims);
        assert_eq!(parsed.claims.nbf, 1000 - NBF_BACKDATE_S);
        assert_eq!(parsed.header.typ, "at+jwt");
        parsed.verify(&key.verifying_key().to_bytes()).unwrap();
        let other = SigningKey::from_bytes(&[4; 32]);
        assert_eq!(
            parsed.verify(&other.verifying_key().to_bytes()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn act_nests_the_earlier_actors_inside_the_current_one() {
        let chain = [
            "spiffe://x/tool".to_string(),
            "spiffe://x/agent".to_string(),
        ];
        let claims = Claims::for_lease(&lease(), "https://iss").with_act(&chain);
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(
            json["act"],
            serde_json::json!({"sub": "spiffe://x/tool", "act": {"sub": "spiffe://x/agent"}})
        );
        assert_eq!(claims.act.as_ref().unwrap().chain(), chain);
        let key = SigningKey::from_bytes(&[3; 32]);
        assert_eq!(parse(&sign(&claims, "k", &key)).unwrap().claims, claims);
        // No chain, no claim (a directly issued token has no `act` at all).
        let plain = serde_json::to_value(Claims::for_lease(&lease(), "https://iss")).unwrap();
        assert!(plain.get("act").is_none());
    }

    #[test]
    fn malformed_tokens_are_refused_precisely() {
        assert_eq!(parse("abc").unwrap_err(), TokenError::Malformed);
        assert_eq!(parse("a.b.c.d").unwrap_err(), TokenError::Malformed);
        assert_eq!(
            parse(&"a".repeat(MAX_TOKEN_LEN + 1)).unwrap_err(),
            TokenError::TooLong
        );
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt","kid":"k"}"#);
        assert!(matches!(
            parse(&format!("{none_header}.e30.")).unwrap_err(),
            TokenError::UnsupportedAlgorithm(_)
        ));
        let id_token = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT","kid":"k"}"#);
        assert_eq!(
            parse(&format!("{id_token}.e30.AA")).unwrap_err(),
            TokenError::WrongType("JWT".into())
        );
        // Tampered claims fail the signature.
        let key = SigningKey::from_bytes(&[3; 32]);
        let t = sign(&Claims::for_lease(&lease(), "i"), "k", &key);
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let mut claims = Claims::for_lease(&lease(), "i");
        claims.scope = "admin".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let forged = parse(&parts.join(".")).unwrap();
        assert_eq!(
            forged.verify(&key.verifying_key().to_bytes()),
            Err(TokenError::BadSignature)
        );
    }
}
