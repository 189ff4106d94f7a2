//! RFC 9068 access tokens (see `ephemera_core::token`).

use ephemera_core::state;
use ephemera_core::token::{self, Claims};
use ephemera_core::types::Lease;
use ephemera_core::Error;

use super::KeyStore;
use crate::node::Node;

/// The token of `lease`; one obtained by exchange carries its actor chain as `act`.
pub(super) fn mint(node: &Node, lease: &Lease) -> Result<String, Error> {
    let key = node.unsealed_key(KeyStore::Jwt, &lease.kid)?;
    let mut claims = Claims::for_lease(lease, &node.issuer()?);
    // Every exchanged token has a delegation record (one exchanged from an OIDC assertion has
    // no parent, but may have actors).
    let delegation =
        state::delegation(&node.view, &lease.id).map_err(|e| Error::Internal(e.to_string()))?;
    match delegation {
        Some(d) => claims = claims.with_act(&d.act),
        // Fail closed: a derived token without its chain would hide who acted.
        None if lease.parent.is_some() => {
            return Err(Error::Internal(format!(
                "lease {} has a parent but no delegation",
                lease.id
            )))
        }
        None => {}
    }
    Ok(token::sign(&claims, &lease.kid, &key))
}
