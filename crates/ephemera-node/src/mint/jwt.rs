//! RFC 9068 access tokens (see `ephemera_core::token`).

use ephemera_core::token::{self, Claims};
use ephemera_core::types::Lease;
use ephemera_core::Error;

use super::KeyStore;
use crate::node::Node;

pub(super) fn mint(node: &Node, lease: &Lease) -> Result<String, Error> {
    let key = node.unsealed_key(KeyStore::Jwt, &lease.kid)?;
    let claims = Claims::for_lease(lease, &node.issuer()?);
    Ok(token::sign(&claims, &lease.kid, &key))
}
