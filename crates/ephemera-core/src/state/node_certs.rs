//! Node certificates the cluster CA issued to its members.
//!
//! A node renews its own certificate (its SPIFFE X.509-SVID `.../ephemera/node/N`) before half
//! its lifetime has passed: it makes a fresh key and sends the public key to the leader over
//! the cluster link; the leader checks that the sender (the node id in the certificate it
//! presented) is a current member, and proposes this entry with the host names of that
//! certificate. Once committed, the leader signs with the cluster CA exactly what the entry
//! says. So every certificate a member holds is in the log and the audit chain, a removed node
//! gets none, and its last one stops working when it expires.

use super::*;
use crate::kind::x509_svid::MAX_PUBLIC_KEY_DER;

/// At most this many DNS names and as many IP addresses in a node certificate.
pub const MAX_NODE_HOST_NAMES: usize = 16;
const MAX_DNS_NAME_LEN: usize = 253;

/// What the leader certifies for node `node_id`; also the record of the latest one per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificate {
    pub node_id: u64,
    /// The node's new public key, DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    pub dns_names: Vec<String>,
    /// Textual IP addresses.
    pub ips: Vec<String>,
    /// 16 random bytes, stamped by the leader.
    pub serial: Vec<u8>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

fn node_cert_key(node_id: u64) -> Vec<u8> {
    format!("{PFX_NODE_CERT}{node_id:020}").into_bytes()
}

/// The latest certificate issued to `node_id`, if any.
pub fn node_certificate(
    kv: &(impl KvRead + ?Sized),
    node_id: u64,
) -> Result<Option<NodeCertificate>, StorageError> {
    get(kv, &node_cert_key(node_id))
}

fn malformed(c: &NodeCertificate, now: u64) -> Option<String> {
    let bad_dns = |d: &String| {
        d.is_empty()
            || d.len() > MAX_DNS_NAME_LEN
            || !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
    };
    if c.public_key_der.is_empty() || c.public_key_der.len() > MAX_PUBLIC_KEY_DER {
        Some(format!(
            "the public key must be 1 to {MAX_PUBLIC_KEY_DER} bytes of DER"
        ))
    } else if c.dns_names.len() > MAX_NODE_HOST_NAMES || c.ips.len() > MAX_NODE_HOST_NAMES {
        Some(format!(
            "at most {MAX_NODE_HOST_NAMES} DNS names and IP addresses each"
        ))
    } else if let Some(d) = c.dns_names.iter().find(|d| bad_dns(d)) {
        Some(format!("{d:?} is not a DNS name"))
    } else if let Some(ip) = c
        .ips
        .iter()
        .find(|ip| ip.parse::<std::net::IpAddr>().is_err())
    {
        Some(format!("{ip:?} is not an IP address"))
    } else if c.serial.len() != 16 {
        Some("the serial is 16 bytes".into())
    } else if c.not_after_ms <= now.max(c.not_before_ms) {
        Some("the certificate would be expired when issued".into())
    } else {
        None
    }
}

pub(super) fn issue<R: KvRead + ?Sized>(
    kv: &mut Overlay<'_, R>,
    actor: &Principal,
    now: u64,
    cert: &NodeCertificate,
    audit: &mut AuditRecord,
) -> Result<ApplyResult, StorageError> {
    audit.target = Some(format!("node:{}", cert.node_id));
    audit.details = [
        ("serial".to_string(), hex::encode(&cert.serial)),
        ("not_after_ms".to_string(), cert.not_after_ms.to_string()),
    ]
    .into();
    if actor.auth_method != AuthMethod::System {
        return Ok(Err(Error::PermissionDenied(
            "only the leader issues node certificates".into(),
        )));
    }
    let Some(ca) = cluster_ca(kv)? else {
        return Ok(Err(Error::Unavailable(
            "the cluster has no CA to renew node certificates".into(),
        )));
    };
    audit.subject = Some(format!(
        "spiffe://{}/ephemera/node/{}",
        ca.trust_domain, cert.node_id
    ));
    if let Some(why) = malformed(cert, now) {
        return Ok(Err(Error::InvalidArgument(why)));
    }
    kv.put(node_cert_key(cert.node_id), enc(cert));
    Ok(Ok(Outcome::Done))
}
