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
    if lease.parent.is_some() {
        let delegation =
            state::delegation(&node.view, &lease.id).map_err(|e| Error::Internal(e.to_string()))?;
        // Fail closed: a derived token without its chain would hide who acted.
        let d = delegation.ok_or_else(|| {
            Error::Internal(format!("lease {} has a parent but no delegation", lease.id))
        })?;
        claims = claims.with_act(&d.act);
    }
    Ok(token::sign(&claims, &lease.kid, &key))
}
