//! Short-lived node certificates, renewed by the node itself.
//!
//! `tls.cert_file` is a bootstrap certificate: the node presents it until it first renews, and
//! again only if the renewed one has expired (a node stopped for longer than
//! `tls.node_cert_ttl_s`). Once the node is a member and the cluster has a CA, it makes a
//! fresh key and asks the leader for a certificate: the leader checks that the certificate the
//! request came with names a current member, commits `IssueNodeCertificate` (audited) and
//! signs exactly what was committed, keeping the host names of the presented certificate. The
//! node checks the result (chains to the cluster CA, names this node, certifies its key),
//! keeps it in `<data_dir>/tls/node.pem` (certificate and key in one file, replaced by a
//! rename, so a crash leaves the old pair or the new one) and swaps it into the identity every
//! listener and peer channel presents. A removed node is refused a renewal, and its last
//! certificate stops working when it expires.

use super::*;
use ephemera_core::state::NodeCertificate;
use ephemera_pki::{SpiffeId, TrustBundles, Usage};
use rustls::pki_types::{CertificateDer, UnixTime};

/// Node certificates are valid from a minute before they are issued, for peers whose clocks
/// run behind.
const BACKDATE_MS: u64 = 60_000;
const RENEWED_FILE: &str = "node.pem";

pub(super) fn plaintext() -> Error {
    Error::InvalidArgument(
        "node certificates are renewed over the mutual-TLS cluster link; this node runs without TLS"
            .into(),
    )
}

/// Whether a certificate valid in `[not_before_s, not_after_s]` should be renewed at `now_s`:
/// once half of its lifetime (not counting the backdated minute) has passed, or at once when
/// it outlives what `ttl_s` allows (a long-lived bootstrap certificate is replaced by a
/// short-lived one as soon as the node can reach the leader). Never when `ttl_s` is 0.
pub fn renewal_due(not_before_s: u64, not_after_s: u64, now_s: u64, ttl_s: u64) -> bool {
    if ttl_s == 0 {
        return false;
    }
    let lifetime = not_after_s
        .saturating_sub(not_before_s)
        .saturating_sub(BACKDATE_MS / 1000);
    lifetime > ttl_s + BACKDATE_MS / 1000 || not_after_s.saturating_sub(now_s) <= lifetime / 2
}

/// A certificate and key this node renewed, as kept on disk.
pub struct RenewedCertificate {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

impl RenewedCertificate {
    /// The renewed certificate kept in `dir`, if there is one that is still valid for `node`
    /// under the cluster CA (`bundle`); `Err` says why one that exists is not used.
    pub fn load(
        dir: &std::path::Path,
        node: &SpiffeId,
        bundle: &TrustBundles,
    ) -> Result<Option<Self>, String> {
        let path = dir.join(RENEWED_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = zeroize::Zeroizing::new(
            crate::secret_files::read_private(&path).map_err(|e| e.to_string())?,
        );
        let at = text
            .find("-----BEGIN PRIVATE KEY-----")
            .ok_or_else(|| format!("{} holds no private key", path.display()))?;
        let renewed = RenewedCertificate {
            cert_pem: text[..at].to_string(),
            key_pem: zeroize::Zeroizing::new(text[at..].to_string()),
        };
        renewed.check(node, bundle).map_err(|e| e.to_string())?;
        Ok(Some(renewed))
    }

    /// Chains to the cluster CA now, names `node`, and the key is the certificate's.
    fn check(&self, node: &SpiffeId, bundle: &TrustBundles) -> Result<(), ephemera_pki::PkiError> {
        let chain = ephemera_pki::parse_certs(&self.cert_pem)?;
        for usage in [Usage::Server, Usage::Client] {
            let id = bundle.verify_svid(&chain, usage, UnixTime::now())?;
            if id != *node {
                return Err(ephemera_pki::PkiError::WrongIdentity {
                    expected: node.to_string(),
                    actual: id.to_string(),
                });
            }
        }
        ephemera_pki::check_key_matches(&self.cert_pem, &self.key_pem)
    }

    /// Replaces the kept pair in one rename (the file is private to this user).
    fn save(&self, dir: &std::path::Path) -> Result<(), String> {
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!("{RENEWED_FILE}.tmp"));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let text = zeroize::Zeroizing::new(format!("{}{}", self.cert_pem, *self.key_pem));
        crate::secret_files::create_private(&tmp, &text).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dir.join(RENEWED_FILE)).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

impl Node {
    /// The leader's side: issues a certificate for `public_key_der` to member `node_id`, with
    /// the host names of `presented` (the certificate its request came with).
    pub(super) async fn issue_node_certificate(
        &self,
        node_id: NodeId,
        presented: &CertificateDer<'_>,
        public_key_der: Vec<u8>,
        ttl_s: u64,
    ) -> LeaderAttempt {
        if !self.is_leader() {
            return LeaderAttempt::NotLeader;
        }
        let cert = match self.node_certificate_for(node_id, presented, public_key_der, ttl_s) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node_id, error = %e, "refused to renew a node certificate");
                return LeaderAttempt::Done(Err(e));
            }
        };
        let cmd = Command {
            now_ms: self.stamp_time(),
            actor: Principal::system(),
            op: Op::IssueNodeCertificate(cert.clone()),
        };
        match self.write_as_leader(cmd).await {
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Ok(_), .. })) => {
                let signed = self.sign_node_certificate(&cert);
                if signed.is_ok() {
                    tracing::info!(
                        node_id,
                        serial = %hex::encode(&cert.serial),
                        not_after_ms = cert.not_after_ms,
                        "issued a node certificate"
                    );
                }
                LeaderAttempt::Done(
                    signed.map(|cert_pem| ForwardReply::NodeCertificate { cert_pem }),
                )
            }
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Err(e), .. })) => {
                LeaderAttempt::Done(Err(e))
            }
            other => other,
        }
    }

    fn node_certificate_for(
        &self,
        node_id: NodeId,
        presented: &CertificateDer<'_>,
        public_key_der: Vec<u8>,
        ttl_s: u64,
    ) -> Result<NodeCertificate, Error> {
        let tls = self.tls.as_ref().ok_or_else(plaintext)?;
        // A current voter or learner: not a removed node, and not one that was never added.
        if self.member_info(node_id).is_none() {
            return Err(Error::PermissionDenied(format!(
                "node {node_id} is not a member of this cluster"
            )));
        }
        let (dns, ips) = ephemera_pki::host_names_of(presented)
            .map_err(|e| Error::InvalidArgument(format!("the presented certificate: {e}")))?;
        let cap = match tls.node_cert_ttl_s {
            0 => *crate::config::NODE_CERT_TTL_RANGE_S.end(),
            own => own,
        };
        let ttl_s = ttl_s.clamp(*crate::config::NODE_CERT_TTL_RANGE_S.start(), cap);
        let now = self.stamp_time();
        let mut serial = vec![0u8; 16];
        self.fill_random(&mut serial);
        // Positive as a DER integer, and never mistaken for an SVID's 0x01 lease serial.
        serial[0] = 0x40 | (serial[0] & 0x3f);
        Ok(NodeCertificate {
            node_id,
            public_key_der,
            dns_names: dns,
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
            serial,
            not_before_ms: now.saturating_sub(BACKDATE_MS),
            not_after_ms: now.saturating_add(ttl_s.saturating_mul(1000)),
        })
    }

    /// Signs exactly what the committed entry says.
    fn sign_node_certificate(&self, c: &NodeCertificate) -> Result<String, Error> {
        let (ca, _) = crate::mint::x509_svid::cluster_ca_signer(self)?;
        let ips: Vec<std::net::IpAddr> = c.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
        ca.sign_key_for_hosts(
            &c.public_key_der,
            &SpiffeId::node(ca.trust_domain(), c.node_id),
            (&c.dns_names, &ips),
            &c.serial,
            at(c.not_before_ms),
            at(c.not_after_ms),
        )
        .map_err(|e| Error::Internal(format!("signing a node certificate: {e}")))
    }

    /// The node's side, run periodically: renews this node's certificate when it is due, the
    /// node is a member and the cluster has a CA. `Ok(true)` when a new certificate is in use.
    pub async fn renew_own_certificate_if_due(&self) -> Result<bool, Error> {
        let Some(tls) = &self.tls else {
            return Ok(false);
        };
        let leaf = tls.identity.chain().remove(0);
        let (not_before, not_after) = ephemera_pki::validity_unix_s(&leaf)
            .map_err(|e| Error::Internal(format!("this node's certificate: {e}")))?;
        let due = renewal_due(
            not_before,
            not_after,
            self.clock.now_ms() / 1000,
            tls.node_cert_ttl_s,
        );
        let has_ca = state::cluster_ca(&self.view)
            .map_err(|e| Error::Internal(e.to_string()))?
            .is_some();
        if !due || !has_ca || self.member_info(self.id).is_none() {
            return Ok(false);
        }
        let pki = |e: ephemera_pki::PkiError| Error::Internal(format!("renewing: {e}"));
        let (public_key_der, key_pem) =
            ephemera_pki::new_key(ephemera_pki::KeyAlgorithm::default()).map_err(pki)?;
        let reply = self
            .route(Forwarded::RenewNodeCertificate {
                public_key_der,
                ttl_s: tls.node_cert_ttl_s,
            })
            .await?;
        let ForwardReply::NodeCertificate { cert_pem } = reply else {
            return Err(Error::Internal(format!(
                "the leader answered a renewal with {reply:?}"
            )));
        };
        let renewed = RenewedCertificate { cert_pem, key_pem };
        let me = SpiffeId::node(&tls.trust_domain, self.id);
        renewed.check(&me, &tls.cluster_bundle).map_err(pki)?;
        renewed
            .save(&tls.renewed_cert_dir)
            .map_err(|e| Error::Internal(format!("keeping the renewed certificate: {e}")))?;
        tls.identity
            .replace(&renewed.cert_pem, &renewed.key_pem)
            .map_err(pki)?;
        tracing::info!(
            not_after_s = ephemera_pki::parse_certs(&renewed.cert_pem)
                .ok()
                .and_then(|c| ephemera_pki::not_after_unix_s(&c[0]).ok()),
            "renewed this node's certificate"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::renewal_due;

    #[test]
    fn renewal_is_due_at_half_life_or_when_the_certificate_outlives_the_ttl() {
        let day = 86_400;
        // A certificate issued at t=1000 for a day (valid from a minute before).
        let (nb, na) = (940, 1000 + day);
        for (now, due) in [
            (1000, false),
            (1000 + day / 2 - 1, false),
            (1000 + day / 2, true),
            (na + 10, true),
        ] {
            assert_eq!(renewal_due(nb, na, now, day), due, "at {now}");
        }
        // A year-long bootstrap certificate is replaced at once; never with renewal off.
        assert!(renewal_due(0, 365 * day, 10, day));
        assert!(!renewal_due(0, 365 * day, 364 * day, 0));
        // A certificate the leader capped below our TTL is not renewed again at once.
        assert!(!renewal_due(940, 1000 + 3600, 1000, day));
    }
}
