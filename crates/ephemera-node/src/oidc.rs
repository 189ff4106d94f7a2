//! Workload authentication by JWT assertions from OIDC issuers (Kubernetes service-account
//! tokens, CI platforms' OIDC tokens): issuer, audience, allowed algorithms, bounded leeway, keys
//! from a JWKS file or the issuer's `jwks_uri` (cached, refreshed on an unknown `kid`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ephemera_core::types::{AuthMethod, Principal};
use ephemera_core::Error;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// Leeway is for clock skew, not for accepting stale assertions.
pub const MAX_LEEWAY_S: u64 = 300;
/// An unknown `kid` refreshes the JWKS at most this often (a flood of bogus kids cannot make
/// us hammer the issuer).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// A fetched JWKS is refreshed after this long even if every kid is known.
const JWKS_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim, exactly.
    pub issuer: String,
    /// The `aud` the assertion must carry.
    pub audience: String,
    /// A JWKS file, or
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// the issuer's JWKS URL (https, or http on loopback).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Accepted algorithms: asymmetric only. Default: RS256, ES256, EdDSA.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Principal attributes from claims: attribute name → JSON pointer into the claims
    /// (e.g. `namespace = "/kubernetes.io/namespace"`, `repository = "/repository"`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Refuse an assertion whose `jti` was already used, cluster-wide, within its lifetime.
    #[serde(default)]
    pub refuse_replay: bool,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
fn default_leeway() -> u64 {
    30
}

/// What an assertion proved.
#[derive(Debug, Clone)]
pub struct VerifiedAssertion {
    pub principal: Principal,
    /// For replay refusal: the `jti` and the last second (expiry plus leeway) it is accepted.
    pub jti: Option<(String, u64)>,
    /// Its `exp`, Unix seconds.
    pub expires_at_s: u64,
    /// Its `scope` claim (space-separated), when it has one; what a token exchanged from it is
    /// narrowed to.
    pub scope: Option<String>,
    /// RFC 8693 §4.4 `may_act`, when present: the principal ids it names as allowed to act for
    /// the subject (empty when it names none in a form this cluster reads).
    pub may_act: Option<Vec<String>>,
}

/// The principal ids a `may_act` claim names. With an `iss`, its `sub` is that issuer's
/// subject, `{iss}#{sub}` as this cluster names it. Without one, `sub` is an identity of this
/// cluster as it stands (such as a SPIFFE ID), or a subject of the assertion's own issuer.
fn may_act_ids(claim: &serde_json::Value, issuer: &str) -> Vec<String> {
    let Some(sub) = claim.get("sub").and_then(|s| s.as_str()) else {
        return Vec::new();
    };
    match claim.get("iss").and_then(|s| s.as_str()) {
        Some(iss) => vec![format!("{iss}#{sub}")],
        None => vec![sub.to_string(), format!("{issuer}#{sub}")],
    }
}

struct Issuer {
    config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: Mutex<Keys>,
    /// Held while the JWKS is fetched: concurrent requests with an unknown `kid` wait for one
    /// fetch instead of each making their own (single flight).
    refreshing: tokio::sync::Mutex<()>,
}

/// Largest JWKS document read; a longer body is refused as it streams in, never buffered.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// `jwks_uri` must be https, or http to a loopback address (a local test issuer). The URL is
/// parsed, so that `http://127.0.0.1.attacker.example/` is not taken for loopback.
fn check_jwks_uri(uri: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(uri).map_err(|e| format!("jwks_uri {uri:?}: {e}"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" if !host.is_empty() => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "jwks_uri {uri:?} must be https (plain http only to a loopback address)"
        )),
    }
}

struct Keys {
    set: JwkSet,
    fetched: Option<Instant>,
}

pub struct Verifier {
    issuers: Vec<Issuer>,
    http: Option<reqwest::Client>,
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name
        .parse()
        .map_err(|_| format!("unknown algorithm {name:?}"))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(format!(
            "{name} is symmetric: an issuer's public key must never be usable as an HMAC secret"
        )),
        a => Ok(a),
    }
}

impl Verifier {
    pub fn new(configs: &[IssuerConfig]) -> Result<Self, String> {
        let mut issuers = Vec::new();
        for c in configs {
            if c.leeway_s > MAX_LEEWAY_S {
                return Err(format!(
                    "oidc issuer {}: leeway_s above {MAX_LEEWAY_S}",
                    c.issuer
                ));
            }
            let algorithms = c
                .algorithms
                .iter()
                .map(|a| parse_algorithm(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("oidc issuer {}: {e}", c.issuer))?;
            let set = match (&c.jwks_file, &c.jwks_uri) {
                (Some(f), None) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| format!("oidc issuer {}: {}: {e}", c.issuer, f.display()))?;
                    serde_json::from_str(&text)
                        .map_err(|e| format!("oidc issuer {}: invalid JWKS: {e}", c.issuer))?
                }
                (None, Some(uri)) => {
                    check_jwks_uri(uri).map_err(|e| format!("oidc issuer {}: {e}", c.issuer))?;
                    JwkSet { keys: Vec::new() }
                }
                _ => {
                    return Err(format!(
                        "oidc issuer {}: set exactly one of jwks_file and jwks_uri",
                        c.issuer
                    ))
                }
            };
            issuers.push(Issuer {
                config: c.clone(),
                algorithms,
                keys: Mutex::new(Keys { set, fetched: None }),
                refreshing: tokio::sync::Mutex::new(()),
            });
        }
        let http = configs
            .iter()
            .any(|c| c.jwks_uri.is_some())
            .then(|| {
                // A redirect could lead the fetch anywhere (an internal address, plain HTTP):
                // the configured URL is the only one fetched.
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
            })
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(Verifier { issuers, http })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies an assertion; `now_s` is the node's clock.
    pub async fn verify(&self, token: &str, now_s: u64) -> Result<VerifiedAssertion, Error> {
        let refuse = |m: String| Error::Unauthenticated(format!("assertion refused: {m}"));
        if token.len() > 16 * 1024 {
            return Err(refuse("longer than 16 KiB".into()));
        }
        // Read `alg` and `iss` ourselves first, so that every refusal says precisely why.
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("not a JWT".into()));
        };
        let header: serde_json::Value = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("malformed header".into()))?;
        let claims: serde_json::Value = URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("malformed claims".into()))?;
        let alg_name = header["alg"].as_str().unwrap_or_default();
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(refuse("alg none is never accepted".into()));
        }
        let iss = claims["iss"]
            .as_str()
            .ok_or_else(|| refuse("no iss claim".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or_else(|| refuse(format!("issuer {iss:?} is not trusted")))?;
        let alg = alg_name
            .parse::<Algorithm>()
            .ok()
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or_else(|| refuse(format!("algorithm {alg_name:?} is not allowed for {iss}")))?;
        let kid = header["kid"]
            .as_str()
            .ok_or_else(|| refuse("no kid in the header".into()))?;
        let key = self
            .key(issuer, kid)
            .await?
            .ok_or_else(|| refuse(format!("unknown kid {kid:?}")))?;
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = issuer.config.leeway_s;
        validation.set_issuer(&[&issuer.config.issuer]);
        validation.set_audience(&[&issuer.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                refuse(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired".into(),
                    ErrorKind::ImmatureSignature => "not yet valid".into(),
                    ErrorKind::InvalidAudience => {
                        format!("wrong audience (expected {})", issuer.config.audience)
                    }
                    ErrorKind::InvalidSignature => "bad signature".into(),
                    ErrorKind::InvalidAlgorithm => "the key does not match the algorithm".into(),
                    other => format!("{other:?}"),
                })
            })?;
        // jsonwebtoken compares exp with its own clock; hold it to ours too.
        let exp = data.claims["exp"].as_u64().unwrap_or(0);
        if exp.saturating_add(issuer.config.leeway_s) < now_s {
            return Err(refuse("expired".into()));
        }
        let sub = data.claims["sub"].as_str().unwrap_or_default();
        let mut attributes = BTreeMap::new();
        for (name, pointer) in &issuer.config.attributes {
            if let Some(v) = data.claims.pointer(pointer) {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                attributes.insert(name.clone(), v);
            }
        }
        let jti = issuer
            .config
            .refuse_replay
            // Consumed for as long as verification would still accept it: exp plus leeway.
            .then(|| {
                data.claims["jti"]
                    .as_str()
                    .map(|j| (j.to_string(), exp.saturating_add(issuer.config.leeway_s)))
            })
            .flatten();
        if issuer.config.refuse_replay && jti.is_none() {
            return Err(refuse(
                "this issuer requires a jti claim (replay protection)".into(),
            ));
        }
        Ok(VerifiedAssertion {
            principal: Principal {
                // Namespaced by issuer: two issuers' subjects never collide.
                id: format!("{}#{sub}", issuer.config.issuer),
                auth_method: AuthMethod::JwtAssertion,
                issuer: Some(issuer.config.issuer.clone()),
                attributes,
                admin: false,
                presented: Default::default(),
            },
            jti,
            expires_at_s: exp,
            scope: data.claims["scope"].as_str().map(str::to_string),
            may_act: data
                .claims
                .get("may_act")
                .map(|m| may_act_ids(m, &issuer.config.issuer)),
        })
    }

    async fn key(&self, issuer: &Issuer, kid: &str) -> Result<Option<DecodingKey>, Error> {
        let find = |keys: &Keys| {
            keys.set
                .find(kid)
                .and_then(|j| DecodingKey::from_jwk(j).ok())
        };
        let (found, refresh, seen) = {
            let keys = issuer.keys.lock().expect("jwks lock");
            let stale = keys.fetched.is_none_or(|t| t.elapsed() > JWKS_TTL);
            let may_refetch = keys
                .fetched
                .is_none_or(|t| t.elapsed() > MIN_REFRESH_INTERVAL);
            let found = find(&keys);
            let refresh =
                issuer.config.jwks_uri.is_some() && (stale || (found.is_none() && may_refetch));
            (found, refresh, keys.fetched)
        };
        if !refresh {
            return Ok(found);
        }
        let (Some(uri), Some(http)) = (&issuer.config.jwks_uri, &self.http) else {
            return Ok(found);
        };
        let _flight = issuer.refreshing.lock().await;
        {
            // Another request fetched while this one waited: its result serves.
            let keys = issuer.keys.lock().expect("jwks lock");
            if keys.fetched != seen {
                return Ok(find(&keys));
            }
        }
        match fetch(http, uri).await {
            Ok(set) => {
                let mut keys = issuer.keys.lock().expect("jwks lock");
                keys.set = set;
                keys.fetched = Some(Instant::now());
                Ok(find(&keys))
            }
            Err(e) => {
                tracing::warn!(issuer = %issuer.config.issuer, error = %e, "JWKS fetch failed; using the cached keys");
                issuer.keys.lock().expect("jwks lock").fetched = Some(Instant::now());
                Ok(found)
            }
        }
    }
}

async fn fetch(http: &reqwest::Client, uri: &str) -> Result<JwkSet, String> {
    let mut resp = http.get(uri).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        // Redirects included: they are not followed.
        return Err(format!("HTTP {}", resp.status()));
    }
    let too_long = || format!("JWKS larger than {} KiB", MAX_JWKS_BYTES / 1024);
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("invalid JWKS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> IssuerConfig {
        IssuerConfig {
            issuer: "https://issuer.test".into(),
            audience: "ephemera".into(),
            jwks_file: None,
            jwks_uri: Some("http://127.0.0.1:1/jwks".into()),
            algorithms: default_algorithms(),
            leeway_s: 30,
            attributes: BTreeMap::new(),
            refuse_replay: false,
        }
    }

    #[test]
    fn unsafe_issuer_configurations_are_refused() {
        let mut hs = config();
        hs.algorithms = vec!["HS256".into()];
        assert!(Verifier::new(&[hs]).err().unwrap().contains("symmetric"));
        let mut lenient = config();
        lenient.leeway_s = 3600;
        assert!(Verifier::new(&[lenient]).err().unwrap().contains("leeway"));
        for bad in [
            "http://issuer.test/jwks",
            "http://127.0.0.1.attacker.example/jwks",
            "http://localhost.attacker.example/jwks",
            "http://[::2]/jwks",
            "ftp://127.0.0.1/jwks",
            "not a url",
        ] {
            let mut plain = config();
            plain.jwks_uri = Some(bad.into());
            let e = Verifier::new(&[plain]).err().unwrap();
            assert!(e.contains("jwks_uri"), "{bad}: {e}");
        }
        for good in [
            "https://issuer.test/jwks",
            "http://127.0.0.1:8080/jwks",
            "http://127.5.0.1/jwks",
            "http://[::1]:9/jwks",
            "http://localhost/jwks",
        ] {
            assert!(check_jwks_uri(good).is_ok(), "{good}");
        }
        let mut both = config();
        both.jwks_file = Some("/x".into());
        assert!(Verifier::new(&[both])
            .err()
            .unwrap()
            .contains("exactly one"));
    }

    /// Keys come from the issuer's jwks_uri, once, then from the cache.
    #[tokio::test]
    async fn jwks_is_fetched_from_the_uri_and_cached() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        let body = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"k1","alg":"EdDSA"}}]}}"#
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let served = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let mut c = config();
        c.jwks_uri = Some(format!("http://{addr}/jwks"));
        let verifier = Verifier::new(&[c]).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let pkcs8 = {
            let mut der = vec![
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            der.extend_from_slice(&[7; 32]);
            der
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "https://issuer.test", "aud": "ephemera", "sub": "w", "exp": now + 60});
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&pkcs8),
        )
        .unwrap();
        // Twenty requests at once, with keys not yet fetched: one fetch serves them all.
        let all = futures::future::join_all((0..20).map(|_| verifier.verify(&token, now))).await;
        for v in all {
            assert_eq!(v.unwrap().principal.id, "https://issuer.test#w");
        }
        for _ in 0..3 {
            let v = verifier.verify(&token, now).await.unwrap();
            assert_eq!(v.principal.id, "https://issuer.test#w");
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the JWKS must be fetched once and cached"
        );
    }
}
