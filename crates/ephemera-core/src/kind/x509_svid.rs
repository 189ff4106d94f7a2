//! X.509-SVIDs signed by the cluster CA for a workload's own key (from a CSR whose signature the
//! receiving node verified). The lease keeps the public key, not the CSR. Certificates are not
//! extended: a workload rotates by fetching a new SVID, which supersedes the old one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CedarView, CredentialKind, GrantContext, Kind, Renewal, SignerKind};
use crate::command::{refuse_node_identity, validate_spiffe_id};
use crate::error::Error;

/// Largest SubjectPublicKeyInfo accepted (an RSA-4096 key is about 550 bytes).
pub const MAX_PUBLIC_KEY_DER: usize = 2048;

/// An SVID role allows identities of the cluster CA's trust domain; it has nothing of its own
/// beyond the common role fields (TTLs, limits, budgets, labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// DER SubjectPublicKeyInfo of the key the certificate certifies.
    pub public_key_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub public_key_der: Vec<u8>,
}

pub struct X509Svid;

impl Kind for X509Svid {
    const NAME: CredentialKind = CredentialKind::X509Svid;
    const RENEWAL: Renewal = Renewal::Reissue {
        how: "an X.509-SVID is rotated by fetching a new one (`ephemera svid fetch`), not renewed",
    };
    const SIGNER: SignerKind = SignerKind::ClusterCa;
    type Spec = Spec;
    type Request = Request;
    type Grant = Grant;

    fn validate_spec(_spec: &Spec) -> Result<(), Error> {
        Ok(())
    }

    fn validate_request(r: &Request) -> Result<(), Error> {
        if r.public_key_der.is_empty() || r.public_key_der.len() > MAX_PUBLIC_KEY_DER {
            return Err(Error::InvalidArgument(format!(
                "the public key must be 1 to {MAX_PUBLIC_KEY_DER} bytes of DER"
            )));
        }
        Ok(())
    }

    fn grant(_spec: &Spec, r: &Request, ctx: &GrantContext<'_>) -> Result<Grant, Error> {
        let Some(trust_domain) = &ctx.signer.trust_domain else {
            return Err(Error::Unavailable(
                "the cluster has no CA to issue X.509-SVIDs".into(),
            ));
        };
        // Only identities of the CA's own trust domain (a break-glass caller has no SPIFFE ID).
        validate_spiffe_id(ctx.subject)?;
        refuse_node_identity(ctx.subject)?;
        if !ctx
            .subject
            .starts_with(&format!("spiffe://{trust_domain}/"))
        {
            return Err(Error::InvalidArgument(format!(
                "{} is not in the cluster's trust domain {trust_domain}",
                ctx.subject
            )));
        }
        Ok(Grant {
            public_key_der: r.public_key_der.clone(),
        })
    }

    fn cedar_role(_spec: &Spec) -> CedarView<'_> {
        CedarView::default()
    }

    fn cedar_request<'a>(_spec: &'a Spec, _r: &'a Request) -> CedarView<'a> {
        CedarView::default()
    }

    fn cedar_grant(_g: &Grant) -> CedarView<'_> {
        CedarView::default()
    }

    fn audit(_g: &Grant) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}
