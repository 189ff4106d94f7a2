//! Authentication: X.509-SVIDs, JWT assertions, join tokens and the break-glass credential, with
//! their ingress limits and the sampled audit of refusals.

use super::*;

impl Node {
    // ---- authentication ------------------------------------------------------------------

    /// Authenticates a caller: by the X.509-SVID it presented over mTLS, else by a bearer
    /// credential (the break-glass admin credential). A refused certificate is audited.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        conn: Option<&ConnInfo>,
    ) -> Result<Principal, Error> {
        // A flood from one address is shed before any certificate or signature work.
        let source = conn.and_then(|c| c.remote).map(|a| a.ip());
        if let Err(e) = self.guard.ingress_source(source) {
            let who = source.map_or_else(|| "unknown address".to_string(), |ip| ip.to_string());
            self.audit_ingress_refusal(who, &e).await;
            return Err(e);
        }
        let principal = self.authenticate_caller(bearer, conn).await?;
        if let Err(e) = self.guard.ingress_identity(&principal.id) {
            self.audit_ingress_refusal(principal.id.clone(), &e).await;
            return Err(e);
        }
        Ok(principal)
    }

    /// Records an ingress refusal, sampled like every refusal (the count of the unrecorded ones
    /// goes into the next record).
    pub(super) async fn audit_ingress_refusal(&self, who: String, e: &Error) {
        let Some(note) = self.refusal_audit_slot() else {
            return;
        };
        let event = ephemera_core::command::GuardEvent {
            kind: "refused".into(),
            identity: Some(who),
            detail: format!("{e}{note}"),
            quarantine: false,
            revoke_leases: false,
        };
        if let Err(e) = self.route_system(Intent::GuardEvent(event)).await {
            tracing::warn!(error = %e, "could not audit a refusal");
        }
    }

    pub(super) async fn authenticate_caller(
        &self,
        bearer: Option<&str>,
        conn: Option<&ConnInfo>,
    ) -> Result<Principal, Error> {
        if let Some(certs) = conn
            .and_then(|c| c.peer_certs.as_ref())
            .filter(|c| !c.is_empty())
        {
            return self.authenticate_svid(certs).await;
        }
        let Some(presented) = bearer.filter(|b| !b.is_empty()) else {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated(
                "present a client certificate (X.509-SVID) or a bearer credential".into(),
            ));
        };
        if presented.starts_with(JOIN_TOKEN_PREFIX) {
            let result = self.authenticate_join_token(presented);
            if let Err(e) = &result {
                self.audit_denial(AuthMethod::JoinToken, "a join token".into(), e.to_string())
                    .await;
            }
            return result;
        }
        if !presented.starts_with(BREAK_GLASS_PREFIX) {
            return self.authenticate_assertion(presented).await;
        }
        let result = self.authenticate_break_glass(presented, conn);
        if let Some(e) = result
            .as_ref()
            .err()
            .filter(|e| !matches!(e, Error::NotInitialized))
        {
            Metrics::inc(&self.metrics.auth_failures, 1);
            self.audit_denial(
                AuthMethod::BootstrapAdmin,
                "the break-glass credential".into(),
                e.to_string(),
            )
            .await;
        }
        result
    }

    /// The break-glass credential: refused when disabled, from outside
    /// `break_glass.allowed_sources`, or when it does not match the replicated hash.
    fn authenticate_break_glass(
        &self,
        presented: &str,
        conn: Option<&ConnInfo>,
    ) -> Result<Principal, Error> {
        let Some(stored) = state::admin_credential_hash(&self.view).map_err(internal)? else {
            return Err(Error::NotInitialized);
        };
        if stored.is_empty() {
            return Err(Error::Unauthenticated(
                "the break-glass credential is disabled; an administrator can issue a new one \
                 (`ephemera cluster breakglass rotate`)"
                    .into(),
            ));
        }
        let sources = &self.local.break_glass_sources;
        if !sources.is_empty() {
            let from = conn.and_then(|c| c.remote).map(|a| a.ip());
            if !from.is_some_and(|ip| sources.iter().any(|n| n.contains(ip))) {
                return Err(Error::Unauthenticated(format!(
                    "the break-glass credential is not accepted from {} \
                     (break_glass.allowed_sources)",
                    from.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string())
                )));
            }
        }
        if verify_secret(presented, &stored) {
            Ok(Principal::bootstrap_admin_presenting(presented))
        } else {
            Err(Error::Unauthenticated("invalid credential".into()))
        }
    }

    /// `cluster init`'s gate: proof of control of this node, by the init secret from its file
    /// or an administrator's certificate. Refused outright on a node configured to join.
    /// Nothing is audited through Raft here: an uninitialised node has no log to write to.
    pub(crate) fn authenticate_init(
        &self,
        bearer: Option<&str>,
        conn: Option<&ConnInfo>,
    ) -> Result<(), Error> {
        if self.local.join_only {
            return Err(Error::PermissionDenied(
                "this node refuses init: it only joins an existing cluster (bootstrap.join = true; \
                 add it from a member with `ephemera cluster join`) or forms one itself \
                 (cluster.bootstrap_expect)"
                    .into(),
            ));
        }
        let refused = |why: String| {
            Metrics::inc(&self.metrics.auth_failures, 1);
            tracing::warn!(reason = %why, "cluster init refused");
            Err(Error::Unauthenticated(why))
        };
        if let Some(presented) =
            bearer.filter(|b| b.starts_with(crate::bootstrap::INIT_SECRET_PREFIX))
        {
            let secret = self.local.init_secret.lock().expect("init secret lock");
            return match &*secret {
                Some(s) if s.matches(presented) => Ok(()),
                Some(s) => refused(format!(
                    "the init secret does not match the one in {}",
                    s.path().display()
                )),
                None => Err(Error::AlreadyInitialized),
            };
        }
        if let (Some(tls), Some(certs)) = (
            &self.tls,
            conn.and_then(|c| c.peer_certs.as_ref())
                .filter(|c| !c.is_empty()),
        ) {
            return match self.verify_svid_cached(tls, certs) {
                Ok(id) if tls.admin_ids.contains(&id.to_string()) => Ok(()),
                Ok(id) => refused(format!(
                    "{id} is not an administrator (tls.admin_ids); init needs an administrator's \
                     certificate or the init secret"
                )),
                Err(e) => refused(format!("client certificate refused: {e}")),
            };
        }
        let hint = match &*self.local.init_secret.lock().expect("init secret lock") {
            Some(s) => format!(
                "the init secret from {} (`ephemera cluster init --init-secret-file {}`)",
                s.path().display(),
                s.path().display()
            ),
            None => "the init secret".into(),
        };
        refused(format!(
            "cluster init needs proof of control of this node: {hint}, or an administrator's \
             certificate (tls.admin_ids)"
        ))
    }

    /// Init committed: the init secret is spent.
    pub(crate) fn spend_init_secret(&self) {
        if let Some(s) = self
            .local
            .init_secret
            .lock()
            .expect("init secret lock")
            .take()
        {
            s.consume();
        }
    }

    /// A one-time join token authenticates the identity it was created for, for the one
    /// request that redeems it. Unknown, used and expired tokens are refused here, without a
    /// Raft write, so a stream of bogus tokens cannot grow the log; `apply` consumes the token.
    pub(super) fn authenticate_join_token(&self, token: &str) -> Result<Principal, Error> {
        let hash = ephemera_core::crypto::hash_secret(token);
        let usable = state::join_token(&self.view, &hash)
            .map_err(internal)?
            .filter(|t| t.used_at_ms.is_none() && self.clock.now_ms() < t.expires_at_ms);
        let Some(t) = usable else {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated(
                "join token unknown, already used or expired".into(),
            ));
        };
        Ok(Principal {
            issuer: self.tls.as_ref().map(|tls| tls.trust_domain.clone()),
            id: t.spiffe_id,
            auth_method: AuthMethod::JoinToken,
            attributes: Default::default(),
            admin: false,
            presented: Default::default(),
        })
    }

    /// The lease of the cluster-issued X.509-SVID a connection presented, if any.
    pub fn presented_svid_lease(&self, conn: Option<&ConnInfo>) -> Option<String> {
        let leaf = conn?.peer_certs.as_ref()?.first()?;
        ephemera_pki::serial_of(leaf)
            .ok()
            .and_then(|s| svid_lease_id(&s))
    }

    pub(super) async fn authenticate_svid(
        &self,
        certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Principal, Error> {
        let Some(tls) = &self.tls else {
            return Err(Error::Unauthenticated(
                "this node does not accept client certificates".into(),
            ));
        };
        match self.verify_svid_cached(tls, certs) {
            Ok(id) if self.svid_revoked(&certs[0]) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                let reason =
                    "client certificate refused: its X.509-SVID has been revoked or has expired"
                        .to_string();
                self.audit_denial(AuthMethod::X509Svid, id.to_string(), reason.clone())
                    .await;
                Err(Error::Unauthenticated(reason))
            }
            Ok(id) => {
                let admin = tls.admin_ids.contains(&id.to_string());
                Ok(Principal::svid(id.to_string(), id.trust_domain, admin))
            }
            Err(e) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                let presented = ephemera_pki::spiffe_id_of(&certs[0])
                    .map(|id| id.to_string())
                    .unwrap_or_else(|_| "a certificate without a valid SPIFFE ID".into());
                let reason = format!("client certificate refused: {e}");
                self.audit_denial(AuthMethod::X509Svid, presented, reason.clone())
                    .await;
                Err(Error::Unauthenticated(reason))
            }
        }
    }

    /// The chain check of `verify_svid`, remembered per leaf certificate for a short while.
    pub(super) fn verify_svid_cached(
        &self,
        tls: &NodeTls,
        certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<ephemera_pki::SpiffeId, ephemera_pki::PkiError> {
        let now_ms = self.clock.now_ms();
        let leaf = certs[0].as_ref();
        if let Some((id, until)) = self.verified_svids.get(leaf) {
            if now_ms < until {
                return Ok(id);
            }
        }
        let now = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        let id = tls
            .bundles
            .verify_svid(certs, ephemera_pki::Usage::Client, now)?;
        let not_after_ms = ephemera_pki::not_after_unix_s(&certs[0])?.saturating_mul(1000);
        self.verified_svids.insert(
            leaf.to_vec(),
            (
                id.clone(),
                not_after_ms.min(now_ms + SVID_VERIFICATION_CACHE_MS),
            ),
        );
        Ok(id)
    }

    pub(super) async fn authenticate_assertion(&self, token: &str) -> Result<Principal, Error> {
        if self.oidc.is_empty() {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated("invalid credential".into()));
        }
        let verified = match self.oidc.verify(token, self.clock.now_ms() / 1000).await {
            Ok(v) => v,
            Err(e) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                self.audit_denial(
                    AuthMethod::JwtAssertion,
                    "a JWT assertion".into(),
                    e.to_string(),
                )
                .await;
                return Err(e);
            }
        };
        if let Some((jti, exp_s)) = verified.jti {
            // Consumed through Raft, so a replay is refused on every node.
            self.propose(Proposal {
                actor: verified.principal.clone(),
                intent: Intent::ConsumeAssertion {
                    issuer: verified.principal.issuer.clone().unwrap_or_default(),
                    jti,
                    expires_at_ms: exp_s.saturating_mul(1000),
                },
            })
            .await?;
        }
        Ok(verified.principal)
    }

    /// Takes a slot of the node's refusal-audit rate limit: `None` when the refusal is only
    /// counted, else a note on how many earlier refusals went unrecorded (for its record).
    pub(super) fn refusal_audit_slot(&self) -> Option<String> {
        Some(match self.refusal_audit_count()? {
            0 => String::new(),
            skipped => {
                format!(" ({skipped} earlier refusals on this node were not recorded: rate limit)")
            }
        })
    }

    /// As [`Node::refusal_audit_slot`]: `None` when this refusal is only counted, else how many
    /// earlier ones went unrecorded.
    pub(super) fn refusal_audit_count(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        if self.denial_audits.check().is_err() {
            self.denials_unrecorded.fetch_add(1, Ordering::Relaxed);
            Metrics::inc(&self.metrics.denials_unaudited, 1);
            return None;
        }
        Some(self.denials_unrecorded.swap(0, Ordering::Relaxed))
    }

    /// A renewal refused for a reason that changes nothing (an unknown, foreign, revoked,
    /// expired or non-renewable lease, or one at its maximum lifetime) is refused here, after a
    /// read barrier so that the answer is the cluster's latest, without a Raft write; it is
    /// audited under the refusal sampling. `None`: the renewal goes to the leader.
    pub async fn refuse_renewal_locally(
        &self,
        actor: &Principal,
        lease_id: &str,
        context: &ephemera_core::command::RequestContext,
    ) -> Result<Option<Error>, Error> {
        let check = || {
            state::renewal_refusal(&self.view, actor, lease_id, self.clock.now_ms())
                .map_err(internal)
        };
        // Most renewals are of live leases: only a local refusal pays for the barrier.
        if check()?.is_none() {
            return Ok(None);
        }
        self.read_barrier().await?;
        let Some(refusal) = check()? else {
            return Ok(None);
        };
        if let Some(unrecorded) = self.refusal_audit_count() {
            let record = self.propose(Proposal {
                actor: actor.clone(),
                intent: Intent::RecordRefusal(ephemera_core::command::Refusal {
                    action: ephemera_core::command::RefusedAction::Renew,
                    lease_id: Some(lease_id.to_string()),
                    error: refusal.clone(),
                    unrecorded,
                    context: context.clone(),
                }),
            });
            match record.await {
                // `apply` records the refusal and answers with it.
                Err(e) if e == refusal => {}
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not audit a refused renewal"),
            }
        }
        Ok(Some(refusal))
    }

    /// Records a refused authentication. The refusal stands whether or not the record lands.
    pub(super) async fn audit_denial(
        &self,
        method: AuthMethod,
        presented: String,
        mut reason: String,
    ) {
        let Some(note) = self.refusal_audit_slot() else {
            return;
        };
        reason.push_str(&note);
        let audit = self.propose(Proposal {
            actor: Principal::unauthenticated(method),
            intent: Intent::RecordDenial { presented, reason },
        });
        if let Err(Error::Unavailable(e) | Error::OutcomeUnknown(e)) = audit.await {
            tracing::warn!(error = %e, "could not audit a refused authentication");
        }
    }

    /// Records a policy refusal (under the rate limit unless `always`). The refusal stands
    /// whether or not the record lands; the outcome is the record's, when it landed.
    pub(crate) async fn audit_refusal(
        &self,
        actor: Principal,
        mut denial: ephemera_core::command::PolicyDenial,
        always: bool,
    ) -> Option<Outcome> {
        if !always {
            denial.reason.push_str(&self.refusal_audit_slot()?);
        }
        // `propose` fits the reason within the log's limits rather than lose the record.
        match self
            .propose(Proposal {
                actor,
                intent: Intent::PolicyDenied(denial),
            })
            .await
        {
            Ok((outcome, _)) => Some(outcome),
            Err(e) => {
                tracing::warn!(error = %e, "could not audit a policy refusal");
                None
            }
        }
    }

    /// Whether a certificate is an X.509-SVID this cluster issued whose lease is no longer
    /// active. (Certificates issued outside the cluster, like `dev`'s, have no lease.)
    pub(super) fn svid_revoked(&self, leaf: &rustls::pki_types::CertificateDer<'_>) -> bool {
        let Some(lease_id) = ephemera_pki::serial_of(leaf)
            .ok()
            .and_then(|s| svid_lease_id(&s))
        else {
            return false;
        };
        match state::get_lease(&self.view, &lease_id) {
            Ok(Some(lease)) => !lease.is_active_at(self.clock.now_ms()),
            Ok(None) => false,
            // Fail closed: a certificate we cannot check is not accepted.
            Err(_) => true,
        }
    }

    /// Administrators' identities are never minted by the cluster CA (through a join token or
    /// an SVID request): otherwise one administrator could mint a second and approve their own
    /// policy change.
    pub fn refuse_admin_identity(&self, spiffe_id: &str) -> Result<(), Error> {
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.admin_ids.contains(spiffe_id))
        {
            return Err(Error::PermissionDenied(format!(
                "{spiffe_id} is an administrator identity; the cluster does not issue those"
            )));
        }
        Ok(())
    }

    /// Seals an imported SSH CA key (an unencrypted Ed25519 OpenSSH private key) under the KEK:
    /// the intent that makes it the active SSH CA.
    pub fn seal_ssh_ca_key(&self, openssh_pem: &str) -> Result<Intent, Error> {
        let key = ssh_key::PrivateKey::from_openssh(openssh_pem.trim())
            .map_err(|e| Error::InvalidArgument(format!("SSH CA key: {e}")))?;
        if key.is_encrypted() {
            return Err(Error::InvalidArgument(
                "SSH CA key: it is encrypted; import an unencrypted copy (the cluster seals it)"
                    .into(),
            ));
        }
        let Some(pair) = key.key_data().ed25519() else {
            return Err(Error::InvalidArgument(format!(
                "SSH CA key: it is {}, not Ed25519",
                key.algorithm()
            )));
        };
        let seed = zeroize::Zeroizing::new(pair.private.to_bytes());
        let public_key = pair.public.0;
        if ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes()
            != public_key
        {
            return Err(Error::InvalidArgument(
                "SSH CA key: its public half does not match its private half".into(),
            ));
        }
        let kid = ephemera_core::crypto::kid_for(&public_key);
        let mut nonce = [0u8; ephemera_core::crypto::NONCE_LEN];
        self.fill_random(&mut nonce);
        Ok(Intent::ImportSshCa {
            sealed_private_key: ephemera_core::crypto::seal_private_key(
                &self.kek, &kid, &seed, nonce,
            ),
            kid,
            public_key,
        })
    }

    /// Seals the cluster CA's key under the KEK for replication.
    pub fn seal_ca_key(&self, key_pem: &str) -> Result<Vec<u8>, Error> {
        let secret = ephemera_pki::ca_key_secret(key_pem)
            .map_err(|e| Error::InvalidArgument(format!("CA key: {e}")))?;
        let mut nonce = [0u8; ephemera_core::crypto::NONCE_LEN];
        self.fill_random(&mut nonce);
        Ok(ephemera_core::crypto::seal_secret(
            &self.kek,
            ephemera_core::types::CLUSTER_CA_KEY_ID,
            &secret,
            nonce,
        ))
    }

    pub fn tls_trust_domain(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.trust_domain.as_str())
    }
}
