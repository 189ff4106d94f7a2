//! X.509-SVIDs: the workload's public key certified by the cluster CA for the lease's SPIFFE ID.

use std::time::Duration;

use ephemera_core::crypto::unseal_secret;
use ephemera_core::kind::x509_svid::Grant;
use ephemera_core::state;
use ephemera_core::types::{Lease, CLUSTER_CA_KEY_ID};
use ephemera_core::Error;

use super::Minted;
use crate::node::Node;

/// An SVID's serial: 0x01 followed by the lease id's 16 bytes, so that a presented certificate
/// names its lease (and a revoked one is refused).
pub fn svid_serial(lease_id: &str) -> Result<Vec<u8>, Error> {
    let mut serial = vec![0x01];
    serial.extend(
        hex::decode(lease_id.trim_start_matches("l_"))
            .map_err(|e| Error::Internal(format!("lease id {lease_id}: {e}")))?,
    );
    Ok(serial)
}

/// The cluster CA, its key unsealed (for this one signature), and its certificate.
pub(crate) fn cluster_ca_signer(node: &Node) -> Result<(ephemera_pki::Ca, String), Error> {
    let ca = state::cluster_ca(&node.view)
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| Error::Unavailable("the cluster has no CA".into()))?;
    let secret = unseal_secret(&node.kek, CLUSTER_CA_KEY_ID, &ca.sealed_seed)?;
    let signer = ephemera_pki::Ca::from_secret(&ca.trust_domain, &ca.cert_pem, &secret)
        .map_err(|e| Error::Internal(format!("loading the cluster CA: {e}")))?;
    Ok((signer, ca.cert_pem))
}

pub(super) fn mint(node: &Node, lease: &Lease, grant: &Grant) -> Result<Minted, Error> {
    let (signer, bundle_pem) = cluster_ca_signer(node)?;
    let pki_err = |e: ephemera_pki::PkiError| Error::Internal(format!("signing an SVID: {e}"));
    let id = ephemera_pki::SpiffeId::parse(&lease.subject).map_err(pki_err)?;
    if grant.public_key_der.is_empty() {
        return Err(Error::Internal(format!(
            "lease {} records no public key (an SVID of the first layout whose CSR could not be read)",
            lease.id
        )));
    }
    let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
    // Backdated a minute for verifiers whose clocks run behind.
    let cert_pem = signer
        .sign_public_key(
            &grant.public_key_der,
            &id,
            &svid_serial(&lease.id)?,
            at(lease.issued_at_ms.saturating_sub(60_000)),
            at(lease.expires_at_ms),
        )
        .map_err(pki_err)?;
    Ok(Minted::X509Svid {
        cert_pem,
        bundle_pem,
    })
}
