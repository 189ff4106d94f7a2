//! The leader's workers: key creation, expiry rounds, guardrail events, clock measurement, and
//! the leader-side guardrails of each proposal.

use super::*;

/// Entries one compaction command removes at most (one per leader tick).
const COMPACTION_PAGE: u32 = 1000;

impl Node {
    // ---- leader workers -------------------------------------------------------------------

    /// One round of the leader's housekeeping: create a signing key if none is active, and
    /// expire leases whose deadline has passed (reading only the head of the deadline index).
    pub async fn leader_tick(&self) {
        if !self.is_leader() {
            return;
        }
        let bootstrapped = matches!(state::admin_credential_hash(&self.view), Ok(Some(_)));
        if bootstrapped && matches!(state::active_kid(&self.view), Ok(None)) {
            if let Err(e) = self.route_system(Intent::RotateKey).await {
                tracing::warn!(error = %e, "creating a signing key failed");
            }
        }
        // Every cluster has an SSH CA (init creates it); a revoked one is replaced at once, and
        // a cluster initialised before SSH certificates existed gets its first here.
        if bootstrapped && matches!(state::active_ssh_ca(&self.view), Ok(None)) {
            if let Err(e) = self.route_system(Intent::RotateSshCa).await {
                tracing::warn!(error = %e, "creating the SSH CA key failed");
            }
        }
        if bootstrapped && matches!(state::active_audit_key(&self.view), Ok(None)) {
            if let Err(e) = self.route_system(Intent::RotateAuditKey).await {
                tracing::warn!(error = %e, "creating the audit key failed");
            }
        }
        if bootstrapped {
            if let Err(e) = self.audit_checkpoint().await {
                tracing::warn!(error = %e, "signing an audit checkpoint failed");
            }
        }
        let mut settled = Vec::new();
        for intent in self.guard.tick(self.clock.now_ms()) {
            if let Intent::GuardEvent(e) = &intent {
                settled.extend(e.identity.clone().filter(|_| e.quarantine));
            }
            if let Err(e) = self.route_system(intent).await {
                tracing::warn!(error = %e, "recording a guardrail event failed");
            }
        }
        self.guard.quarantines_settled(&settled);
        let now = self.stamp_time();
        if let Ok(Some(deadline)) = state::next_deadline(&self.view) {
            if deadline <= now {
                let cmd = Command {
                    now_ms: now,
                    actor: Principal::system(),
                    op: Op::Expire {
                        up_to_ms: now,
                        limit: 10_000,
                    },
                };
                if let LeaderAttempt::Done(Err(e)) = self.write_as_leader(cmd).await {
                    tracing::warn!(error = %e, "expiry round failed");
                }
            }
        }
        if let Ok(true) = state::compaction_due(&self.view, now, &self.housekeeping.retention) {
            let cmd = Command {
                now_ms: now,
                actor: Principal::system(),
                op: Op::Compact {
                    retention: self.housekeeping.retention,
                    limit: COMPACTION_PAGE,
                },
            };
            if let LeaderAttempt::Done(Err(e)) = self.write_as_leader(cmd).await {
                tracing::warn!(error = %e, "compaction round failed");
            }
        }
    }

    /// Signs this node's applied audit head with the active audit key and commits the
    /// checkpoint, once per interval, when records other than the last checkpoint's own were
    /// added since.
    async fn audit_checkpoint(&self) -> Result<(), Error> {
        let Some(kid) = state::active_audit_key(&self.view).map_err(internal)? else {
            return Ok(());
        };
        let (seq, hash) = state::audit_head(&self.view).map_err(internal)?;
        let last = state::audit_checkpoints(&self.view, 1)
            .map_err(internal)?
            .pop();
        let now = self.stamp_time();
        if let Some(last) = &last {
            let recent = now < last.signed_at_ms + self.housekeeping.checkpoint_interval_ms;
            if recent || seq <= last.seq + 1 {
                return Ok(());
            }
        }
        if seq == 0 {
            return Ok(());
        }
        let key = self.unsealed_key(crate::mint::KeyStore::Audit, &kid)?;
        let signature = {
            use ed25519_dalek::Signer;
            key.sign(&ephemera_core::audit::checkpoint_message(seq, &hash))
                .to_bytes()
                .to_vec()
        };
        let cmd = Command {
            now_ms: now,
            actor: Principal::system(),
            op: Op::AuditCheckpoint {
                seq,
                hash,
                kid,
                signature,
            },
        };
        match self.write_as_leader(cmd).await {
            LeaderAttempt::Done(Err(e)) => Err(e),
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Err(e), .. })) => Err(e),
            _ => Ok(()),
        }
    }

    /// Measures this node's clock against the leader's (half the round trip is the error bar).
    pub async fn measure_clock_offset(&self) {
        use std::sync::atomic::Ordering;
        if self.is_leader() {
            self.guard.clock_offset_ms.store(0, Ordering::Relaxed);
            return;
        }
        let Some(leader) = self.current_leader() else {
            return;
        };
        let Some(info) = self.member_info(leader) else {
            return;
        };
        let Ok(mut client) = self.peers.client(leader, &info.cluster_addr) else {
            return;
        };
        let sent = self.clock.now_ms();
        let reply = tokio::time::timeout(
            Duration::from_millis(500),
            client.node_status(NodeStatusRequest {}),
        )
        .await;
        let received = self.clock.now_ms();
        if let Ok(Ok(r)) = reply {
            let leader_now = r.into_inner().now_ms;
            if leader_now > 0 && received >= sent {
                let local_mid = (sent + received) / 2;
                let offset = local_mid as i64 - leader_now as i64;
                self.guard.clock_offset_ms.store(offset, Ordering::Relaxed);
            }
        }
    }

    /// Refuses to issue while this node's clock is further from the leader's than the bound:
    /// its tokens' `iat`/`nbf` and its policy decisions' time would be wrong.
    pub fn check_clock(&self) -> Result<(), Error> {
        let offset_ms = self.guard.clock_offset();
        let bound_ms = self.guard.config.max_clock_skew_ms;
        if offset_ms.unsigned_abs() > bound_ms {
            return Err(Error::ClockSkew {
                offset_ms,
                bound_ms,
            });
        }
        Ok(())
    }

    /// The leader's guardrails for one proposal: cluster-wide limits and storm mitigation for
    /// issuance and renewal, and what the anomaly detector learns from it.
    pub(super) fn leader_guard(&self, p: &Proposal) -> Result<(), Error> {
        // The cluster's own work and the break-glass credential are not workloads to throttle.
        if matches!(
            p.actor.auth_method,
            AuthMethod::System | AuthMethod::BootstrapAdmin
        ) {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let refused = match &p.intent {
            // An exchange mints a new token: the same limits, storms and baselines as an issue.
            Intent::Issue(i)
            | Intent::Exchange(ephemera_core::command::ExchangeIntent { issue: i, .. }) => {
                let role = state::get_role(&self.view, &i.role).map_err(internal)?;
                self.guard
                    .admit_issue(now, &p.actor, role.as_ref(), &i.request, i.ttl_s)
            }
            Intent::Renew(r) => self
                .guard
                .admit_renewal(now, &self.view, &p.actor, &r.lease_id),
            Intent::PolicyDenied(_) => {
                self.guard.observe_denial(now, &p.actor.id);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = &refused {
            Metrics::inc(&self.metrics.guard_refusals, 1);
            if let Some(note) = self.refusal_audit_slot() {
                self.guard.record_refusal(&p.actor.id, format!("{e}{note}"));
            }
        }
        refused
    }

    pub async fn route_system(&self, intent: Intent) -> Result<Outcome, Error> {
        Ok(self
            .propose(Proposal {
                actor: Principal::system(),
                intent,
            })
            .await?
            .0)
    }
}
