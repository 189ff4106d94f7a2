//! Leadership and routing: proposals executed on the leader or forwarded once, membership
//! changes, and the linearizable read barriers.

use super::certs;
use super::effects;
use super::*;
use ephemera_raft::network::PeerCallError;

impl Node {
    /// Guards a read. A break-glass read is recorded in the audit chain first; that committed
    /// write, applied here, also serves as the read barrier. Other reads take a plain barrier.
    pub async fn read_access(
        &self,
        principal: &Principal,
        action: &str,
        target: &str,
    ) -> Result<(), Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            self.propose(Proposal {
                actor: principal.clone(),
                intent: Intent::RecordAccess {
                    action: action.to_string(),
                    target: target.to_string(),
                },
            })
            .await?;
            Ok(())
        } else {
            self.read_barrier().await
        }
    }

    // ---- leadership and routing -----------------------------------------------------------

    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(self.id) && m.state == ServerState::Leader
    }

    /// The public API address of the leader this node knows, if any.
    pub fn leader_api_addr(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|info| info.api_addr.clone())
    }

    pub(super) fn member_info(&self, id: NodeId) -> Option<NodeInfo> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// The time the leader stamps: its clock, but never behind what is already applied.
    pub(super) fn stamp_time(&self) -> u64 {
        let applied = state::last_time(&self.view).unwrap_or(0);
        self.clock.now_ms().max(applied)
    }

    /// Proposes on behalf of a caller from any node and waits until this node has applied it.
    pub async fn propose(&self, mut proposal: Proposal) -> Result<(Outcome, u64), Error> {
        ephemera_core::command::fit_audit_text(&mut proposal.intent);
        validate_intent(&proposal.intent)?;
        let credential = proposal.actor.presented.clone();
        match self
            .route(Forwarded::Propose {
                proposal,
                credential,
            })
            .await?
        {
            ForwardReply::Applied { result, log_index } => {
                // Committed, with a known result; this node must apply it before it can sign or
                // serve reads that include it.
                self.wait_applied(log_index).await.map_err(|_| {
                    Error::OutcomeUnknown(
                        "the write was committed but this node has not applied it yet".into(),
                    )
                })?;
                Ok((result?, log_index))
            }
            ForwardReply::MembershipChanged
            | ForwardReply::NotLeader
            | ForwardReply::NodeCertificate { .. } => {
                Err(internal("unexpected reply to a proposal"))
            }
        }
    }

    /// Sends a call to the leader: executed here if this node leads, otherwise forwarded once.
    /// A forward is retried only when it certainly did not execute (not the leader, or the
    /// connection was refused); any other failure is reported, since the write may have landed.
    pub async fn route(&self, call: Forwarded) -> Result<ForwardReply, Error> {
        let budget = match call {
            // A join returns once the new node has caught up, which takes as long as copying
            // the state to it.
            Forwarded::AddNode { .. } => CATCH_UP_LIMIT + self.request_timeout,
            _ => self.request_timeout,
        };
        let deadline = Instant::now() + budget;
        loop {
            match self.current_leader() {
                Some(leader) if leader == self.id => {
                    match self.execute_as_leader(call.clone()).await {
                        LeaderAttempt::Done(r) => return r,
                        LeaderAttempt::NotLeader => {}
                    }
                }
                Some(leader) => {
                    if let Some(info) = self.member_info(leader) {
                        match self.forward(leader, &info, &call, deadline).await {
                            Ok(Some(reply)) => {
                                Metrics::inc(&self.metrics.forwarded, 1);
                                return reply;
                            }
                            Ok(None) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "no leader reachable within the request deadline; retry".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Ok(None)` means "did not execute, try again".
    pub(super) async fn forward(
        &self,
        leader: NodeId,
        info: &NodeInfo,
        call: &Forwarded,
        deadline: Instant,
    ) -> Result<Option<Result<ForwardReply, Error>>, Error> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let req = ForwardRequest {
            proposal: encode(call),
        };
        let answer = self
            .peers
            .call_within(leader, &info.cluster_addr, remaining, |mut c| async move {
                c.forward(req).await
            })
            .await;
        match answer {
            Err(PeerCallError::Address(e)) => Err(internal(e)),
            Err(PeerCallError::TimedOut) => Err(Error::OutcomeUnknown(
                "the leader did not answer in time".into(),
            )),
            // Only a failure to connect proves the request was never sent.
            Ok(Err(status)) if is_connect_failure(&status) => Ok(None),
            Ok(Err(status)) => Err(Error::OutcomeUnknown(format!(
                "forwarding to the leader failed: {}",
                status.message()
            ))),
            Ok(Ok(resp)) => {
                let reply: Result<ForwardReply, Error> =
                    decode(&resp.into_inner().result).map_err(internal)?;
                match reply {
                    Ok(ForwardReply::NotLeader) => Ok(None),
                    other => Ok(Some(other)),
                }
            }
        }
    }

    /// Executes a call forwarded by member `sender` (`None` on plaintext links) if this node is
    /// the leader; forwarded calls are never forwarded again (the hop budget is one). What the
    /// sender says about the caller's privileges is not taken on trust: see
    /// [`Node::rederive_actor`].
    /// Executes a call a member forwarded. `sender` is the node id in the certificate it
    /// presented on the cluster link (`None` on plaintext links), `sender_cert` that
    /// certificate.
    pub async fn handle_forwarded(
        &self,
        call: Forwarded,
        sender: Option<NodeId>,
        sender_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<ForwardReply, Error> {
        let call = match call {
            Forwarded::RenewNodeCertificate {
                public_key_der,
                ttl_s,
            } => {
                let (Some(id), Some(cert)) = (sender, sender_cert) else {
                    return Err(certs::plaintext());
                };
                return match self
                    .issue_node_certificate(id, &cert, public_key_der, ttl_s)
                    .await
                {
                    LeaderAttempt::Done(r) => r,
                    LeaderAttempt::NotLeader => Ok(ForwardReply::NotLeader),
                };
            }
            Forwarded::Propose {
                proposal,
                credential,
            } => match self.rederive_actor(proposal, &credential) {
                Ok(proposal) => Forwarded::Propose {
                    proposal,
                    credential,
                },
                Err(e) => {
                    tracing::warn!(sender = ?sender, error = %e, "refused a forwarded proposal");
                    return Err(e);
                }
            },
            other => other,
        };
        match self.execute_as_leader(call).await {
            LeaderAttempt::Done(r) => r,
            LeaderAttempt::NotLeader => Ok(ForwardReply::NotLeader),
        }
    }

    pub(super) async fn execute_as_leader(&self, call: Forwarded) -> LeaderAttempt {
        match call {
            Forwarded::Propose { proposal: p, .. } => {
                if !self.is_leader() {
                    return LeaderAttempt::NotLeader;
                }
                if let Err(e) = self.leader_guard(&p) {
                    return LeaderAttempt::Done(Err(e));
                }
                let cmd = {
                    let mut entropy = self.entropy.lock().expect("entropy lock");
                    stamp(p, self.stamp_time(), entropy.as_mut(), &self.kek)
                };
                self.write_as_leader(cmd).await
            }
            Forwarded::AddNode { id, info } => self.add_node(id, info).await,
            Forwarded::RemoveNode { id } => self.remove_node(id).await,
            // The leader renewing its own certificate: the request is its own.
            Forwarded::RenewNodeCertificate {
                public_key_der,
                ttl_s,
            } => match self.tls.as_ref().map(|t| t.identity.chain().remove(0)) {
                Some(own) => {
                    self.issue_node_certificate(self.id, &own, public_key_der, ttl_s)
                        .await
                }
                None => LeaderAttempt::Done(Err(certs::plaintext())),
            },
        }
    }

    /// The leader's own view of a forwarded proposal's actor. Administrator status is derived
    /// again from this node's configuration (`tls.admin_ids`) and the replicated break-glass
    /// hash, never taken from the flag the sender set; a break-glass actor must come with the
    /// credential, which is checked here; the system principal is the leader's own, so a
    /// member may forward it only for the refusal records it writes on the cluster's behalf.
    pub(super) fn rederive_actor(
        &self,
        mut p: Proposal,
        credential: &ephemera_core::types::PresentedSecret,
    ) -> Result<Proposal, Error> {
        p.actor.admin = match p.actor.auth_method {
            // The record of a refused break-glass attempt: its actor is unauthenticated.
            _ if matches!(p.intent, Intent::RecordDenial { .. }) => false,
            AuthMethod::BootstrapAdmin => {
                let stored = state::admin_credential_hash(&self.view).map_err(internal)?;
                let checked = matches!(
                    (credential.expose(), stored.as_deref()),
                    (Some(c), Some(h)) if !h.is_empty() && verify_secret(c, h)
                );
                if !checked {
                    return Err(Error::Unauthenticated(
                        "a forwarded break-glass request did not carry a credential the leader \
                         could verify"
                            .into(),
                    ));
                }
                true
            }
            AuthMethod::System => {
                let refusal_record = matches!(
                    &p.intent,
                    Intent::GuardEvent(e) if !e.quarantine && !e.revoke_leases
                );
                if !refusal_record {
                    return Err(Error::PermissionDenied(
                        "only the leader acts as the system principal".into(),
                    ));
                }
                true
            }
            AuthMethod::X509Svid => self
                .tls
                .as_ref()
                .is_some_and(|t| t.admin_ids.contains(&p.actor.id)),
            AuthMethod::JoinToken | AuthMethod::JwtAssertion => false,
        };
        Ok(p)
    }

    /// `read` of the membership this node's Raft is in (the watch borrow never outlives it).
    pub(crate) fn membership<T>(
        &self,
        read: impl FnOnce(&openraft::Membership<NodeId, NodeInfo>) -> T,
    ) -> T {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        read(m.membership_config.membership())
    }

    /// Whether this node has Raft state: a membership, from `initialize` or from a leader.
    pub fn has_membership(&self) -> bool {
        self.membership(|m| m.nodes().next().is_some())
    }

    /// The voters of the membership this node's Raft is in.
    fn voters(&self) -> BTreeSet<NodeId> {
        self.membership(|m| m.voter_ids().collect())
    }

    /// Whether the cluster's bootstrap entry has been applied here.
    pub fn is_bootstrapped(&self) -> Result<bool, Error> {
        Ok(state::admin_credential_hash(&self.view)
            .map_err(internal)?
            .is_some())
    }

    /// Raft messages (append, vote, snapshot) are refused by a node with no Raft state until a
    /// leader admits it. Why: a node whose data directory was wiped comes back with the same
    /// id and address, and the old membership still counts it. Were it to take Raft traffic,
    /// it would vote with an empty log and count towards commits it no longer holds, so an
    /// entry the cluster acknowledged could be lost. Refused, it stays out until a leader
    /// removes it and adds it again (the automatic joiner does both; see [`crate::autojoin`]).
    pub fn accepts_raft(&self) -> Result<(), Error> {
        if self.has_membership()
            || self
                .local
                .admitted
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        // Unavailable: to the leader, a node it cannot replicate to yet.
        Err(Error::Unavailable(format!(
            "node {} has no Raft state and no leader has admitted it: a node with a new data \
             directory joins only by being added (remove it from the membership first if it \
             was a member)",
            self.id
        )))
    }

    /// A leader is about to add this node. Returns whether the node already had Raft state
    /// (admission then changes nothing).
    pub fn admit(&self) -> bool {
        if self.has_membership() {
            return true;
        }
        if !self
            .local
            .admitted
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::info!(
                node_id = self.id,
                "admitted by a leader: accepting Raft messages"
            );
        }
        false
    }

    /// Whether node `peer` may talk to this node over the cluster listener: a current member
    /// (voter or learner, including a join in progress, which is a learner). A node with no
    /// membership yet is waiting to be added: it answers any node of its trust domain (the
    /// leader that adds it must reach it), but takes Raft messages only once admitted
    /// ([`Self::accepts_raft`]).
    pub fn admit_peer(&self, peer: NodeId) -> Result<(), Error> {
        if self.membership(|m| m.nodes().next().is_none() || m.get_node(&peer).is_some()) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "node {peer} is not a member of this cluster"
        )))
    }

    /// Writes a stamped command through the group commit (see [`crate::group_commit`]): with
    /// the others that reach the leader while earlier writes are in flight, as one entry.
    pub(super) async fn write_as_leader(&self, cmd: Command) -> LeaderAttempt {
        let wake_executor = effects::may_record_effects(&cmd.op);
        let written = match self.group_commit.get() {
            Some(group) => {
                let bytes = ephemera_raft::encoded_len(&cmd);
                group.submit(cmd, bytes).await
            }
            None => {
                Metrics::inc(&self.metrics.leader_entries, 1);
                Metrics::inc(&self.metrics.leader_commands, 1);
                write_entry(self.raft.clone(), vec![cmd]).await.pop()
            }
        };
        let written = written.unwrap_or_else(|| {
            LeaderAttempt::Done(Err(Error::OutcomeUnknown(
                "the node's writer stopped before the write was answered".into(),
            )))
        });
        if wake_executor && matches!(written, LeaderAttempt::Done(Ok(_))) {
            self.effects.wake();
        }
        written
    }

    pub(super) async fn add_node(&self, id: NodeId, info: NodeInfo) -> LeaderAttempt {
        let fail = |e: String| LeaderAttempt::Done(Err(Error::Unavailable(e)));
        if !self.is_leader() {
            return LeaderAttempt::NotLeader;
        }
        // Refuse before touching the membership unless the address answers as node `id`: over
        // mTLS the peer must prove that identity, so a node holding another id's certificate is
        // never added and never receives Raft traffic.
        let probe = async {
            let mut client = self
                .peers
                .client(id, &info.cluster_addr)
                .map_err(|e| e.to_string())?;
            client
                .node_status(NodeStatusRequest {})
                .await
                .map_err(|s| s.message().to_string())
        };
        // A voter that lost its data must not be admitted in place (see `accepts_raft`); a
        // learner may, as it never votes.
        let is_voter = self.voters().contains(&id);
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(r)) if r.get_ref().id == id && is_voter && !r.get_ref().has_membership => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "node {id} is a voter but has no Raft state: its data directory is new. \
                     Remove it (`cluster remove {id}`), then add it again"
                ))))
            }
            Ok(Ok(r)) if r.get_ref().id == id => {}
            Ok(Ok(r)) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "the node at {} says it is node {}, not {id}",
                    info.cluster_addr,
                    r.get_ref().id
                ))))
            }
            Ok(Err(e)) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "cannot reach node {id} at {} with its expected identity: {e}",
                    info.cluster_addr
                ))))
            }
            Err(_) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "node {id} at {} did not answer within 5 s",
                    info.cluster_addr
                ))))
            }
        }
        // A node with no Raft state refuses Raft messages until admitted (see
        // `accepts_raft`). A node of an older version has no admission: it is added as before.
        let admit = async {
            let mut client = self
                .peers
                .client(id, &info.cluster_addr)
                .map_err(|e| e.to_string())?;
            match client
                .admit(ephemera_proto::internal::AdmitRequest {})
                .await
            {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
                Err(s) => Err(s.message().to_string()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), admit).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail(format!("admitting node {id}: {e}")),
            Err(_) => return fail(format!("node {id} did not answer the admission within 5 s")),
        }
        // Catch-up (from the log or a snapshot) happens here, before it may vote.
        match tokio::time::timeout(CATCH_UP_LIMIT, self.raft.add_learner(id, info, true)).await {
            Err(_) => {
                return fail(format!(
                    "node {id} did not catch up within {} s",
                    CATCH_UP_LIMIT.as_secs()
                ))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                return LeaderAttempt::NotLeader
            }
            Ok(Err(e)) => return fail(format!("adding node {id}: {e}")),
            Ok(Ok(_)) => {}
        }
        let mut voters = self.voters();
        voters.insert(id);
        match self.raft.change_membership(voters, false).await {
            Ok(_) => LeaderAttempt::Done(Ok(ForwardReply::MembershipChanged)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                LeaderAttempt::NotLeader
            }
            Err(e) => fail(format!("promoting node {id}: {e}")),
        }
    }

    /// [`Self::add_node`] and [`Self::remove_node`] for a caller on the leader itself (the
    /// automatic joiner), with "not the leader" as an error.
    pub(crate) async fn change_member(
        &self,
        id: NodeId,
        add: Option<NodeInfo>,
    ) -> Result<(), Error> {
        let attempt = match add {
            Some(info) => self.add_node(id, info).await,
            None => self.remove_node(id).await,
        };
        match attempt {
            LeaderAttempt::Done(r) => r.map(|_| ()),
            LeaderAttempt::NotLeader => Err(Error::Unavailable("no longer the leader".into())),
        }
    }

    pub(super) async fn remove_node(&self, id: NodeId) -> LeaderAttempt {
        if !self.is_leader() {
            return LeaderAttempt::NotLeader;
        }
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        if membership.get_node(&id).is_none() {
            return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                "node {id} is not a member"
            ))));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
        if voters.is_empty() {
            return LeaderAttempt::Done(Err(Error::InvalidArgument(
                "cannot remove the last voter".into(),
            )));
        }
        match self.raft.change_membership(voters, false).await {
            Ok(_) => LeaderAttempt::Done(Ok(ForwardReply::MembershipChanged)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                LeaderAttempt::NotLeader
            }
            Err(e) => {
                LeaderAttempt::Done(Err(Error::Unavailable(format!("removing node {id}: {e}"))))
            }
        }
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        self.raft
            .wait(Some(self.request_timeout))
            .applied_index_at_least(Some(index), "wait for local apply")
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("this node is behind the leader: {e}")))
    }

    /// Linearizable read barrier: after it returns, this node's state reflects every write that
    /// was acknowledged (by any node) before the barrier started.
    /// Waits until this node has applied everything committed before the call: a
    /// linearizable read follows. Concurrent callers share rounds.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        match self.barriers.get() {
            Some(c) => c
                .next_round()
                .await
                .unwrap_or_else(|| Err(Error::Unavailable("node stopping".into()))),
            None => self.read_barrier_round().await,
        }
    }

    pub(super) async fn read_barrier_round(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.current_leader() {
                Some(leader) if leader == self.id => {
                    match tokio::time::timeout(remaining, self.raft.ensure_linearizable()).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {}
                        // The followers' acknowledgements did not all arrive within a heartbeat
                        // (an overloaded machine): confirm leadership again, within the
                        // deadline, as a follower's barrier does when the leader says so.
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {}
                        Ok(Err(e)) => return Err(Error::Unavailable(format!("read barrier: {e}"))),
                        Err(_) => return Err(Error::Unavailable("read barrier timed out".into())),
                    }
                }
                Some(leader) => {
                    if let Some(info) = self.member_info(leader) {
                        let answer = self
                            .peers
                            .call_within(
                                leader,
                                &info.cluster_addr,
                                remaining,
                                |mut c| async move { c.read_index(ReadIndexRequest {}).await },
                            )
                            .await;
                        match answer {
                            Err(PeerCallError::Address(e)) => return Err(internal(e)),
                            Ok(Ok(r)) => return self.wait_applied(r.into_inner().index).await,
                            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {}
                            Ok(Err(s)) => {
                                return Err(Error::Unavailable(format!(
                                    "read barrier: {}",
                                    s.message()
                                )))
                            }
                            Err(PeerCallError::TimedOut) => {
                                return Err(Error::Unavailable("read barrier timed out".into()))
                            }
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "no leader reachable for a linearizable read".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Leader side of a follower's read barrier (concurrent requests share rounds).
    pub async fn read_index(&self) -> Result<u64, Error> {
        match self.read_indexes.get() {
            Some(c) => c
                .next_round()
                .await
                .unwrap_or_else(|| Err(Error::Unavailable("node stopping".into()))),
            None => self.read_index_round().await,
        }
    }

    pub(super) async fn read_index_round(&self) -> Result<u64, Error> {
        match tokio::time::timeout(self.request_timeout, self.raft.get_read_log_id()).await {
            Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(Error::Unavailable("not the leader".into()))
            }
            Ok(Err(e)) => Err(Error::Unavailable(format!("read index: {e}"))),
            Err(_) => Err(Error::Unavailable("read index timed out".into())),
        }
    }
}

/// Writes `commands` as one log entry (a lone command as itself, several as `Op::Batch`) and
/// answers each with its own result, in order: what [`crate::group_commit`] asks of a writer.
pub(super) async fn write_entry(raft: Raft, mut commands: Vec<Command>) -> Vec<LeaderAttempt> {
    let n = commands.len();
    let entry = if n == 1 {
        commands.pop().expect("one command")
    } else {
        Command {
            now_ms: commands.iter().map(|c| c.now_ms).max().unwrap_or(0),
            actor: Principal::system(),
            op: Op::Batch(commands),
        }
    };
    let each = |f: &dyn Fn() -> LeaderAttempt| (0..n).map(|_| f()).collect();
    match raft.client_write(entry).await {
        Ok(resp) => {
            let log_index = resp.log_id.index;
            let applied =
                |result| LeaderAttempt::Done(Ok(ForwardReply::Applied { result, log_index }));
            match resp.data {
                Ok(Outcome::Batch(results)) if n > 1 && results.len() == n => {
                    results.into_iter().map(applied).collect()
                }
                data if n == 1 => vec![applied(data)],
                // A refused batch (this leader never builds one: oversized or nested).
                _ => each(&|| applied(Err(internal("the state machine refused a batch entry")))),
            }
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            each(&|| LeaderAttempt::NotLeader)
        }
        // The entry may have been appended before the failure.
        Err(e) => each(&|| LeaderAttempt::Done(Err(Error::OutcomeUnknown(format!("raft: {e}"))))),
    }
}
