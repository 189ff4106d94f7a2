//! The `Admin` service: cluster, roles, keys, audit, policy, quarantine, join tokens.

use super::*;

impl Api {
    async fn status_pb(&self) -> pb::ClusterStatus {
        let v = self.node.cluster_status().await;
        pb::ClusterStatus {
            leader_id: v.leader_id.unwrap_or(0),
            term: v.term,
            nodes: v
                .nodes
                .into_iter()
                .map(|m| pb::NodeStatus {
                    id: m.id,
                    api_addr: m.info.api_addr,
                    http_addr: m.info.http_addr,
                    cluster_addr: m.info.cluster_addr,
                    role: if !m.voter && m.role != "unreachable" {
                        "learner".into()
                    } else {
                        m.role
                    },
                    applied_index: m.applied_index,
                    voter: m.voter,
                    clock_offset_ms: m.clock_offset_ms,
                })
                .collect(),
            renewal_storm: v.storm.0,
            renewal_rate_per_s: v.storm.1,
            renewal_baseline_per_s: v.storm.2,
            max_clock_skew_ms: self.node.guard.config.max_clock_skew_ms,
        }
    }

    async fn init_cluster(
        &self,
        r: pb::InitClusterRequest,
    ) -> Result<pb::InitClusterResponse, Error> {
        let admin_token = new_break_glass_credential(&self.node);
        initialise(&self.node, self.plaintext, r, &admin_token).await?;
        tracing::info!(
            node_id = self.node.id,
            "cluster initialised; the admin credential was returned to the caller"
        );
        Ok(pb::InitClusterResponse {
            admin_token: admin_token.to_string(),
            node_id: self.node.id,
        })
    }
}

/// Forms the cluster on `node` (`cluster init`, or the automatic bootstrap): Raft with this
/// node alone, then the bootstrap entry with the hash of `admin_token`, the cluster CA, the
/// first signing key, SSH CA and audit key. Everything is checked before anything is written,
/// so a bad request leaves the node uninitialised. Resumable: an earlier attempt that stopped
/// half-way is completed, and one that finished is refused (`AlreadyInitialized`).
pub(crate) async fn initialise(
    node: &Node,
    plaintext: bool,
    r: pb::InitClusterRequest,
    admin_token: &str,
) -> Result<(), Error> {
    let pb::InitClusterRequest {
        issuer,
        ca_cert_pem,
        ca_key_pem,
        policy_text,
        policy_approvals,
        policy_proposal_ttl_s,
        ssh_ca_key,
    } = r;
    let import_ssh_ca = (!ssh_ca_key.is_empty())
        .then(|| node.seal_ssh_ca_key(&ssh_ca_key))
        .transpose()?;
    let policy_text = if policy_text.is_empty() {
        ephemera_policy::DEFAULT_POLICY.to_string()
    } else {
        policy_text
    };
    validate_policy(&policy_text)?;
    let defaults = PolicyGovernance::default();
    let governance = PolicyGovernance {
        approvals_required: policy_approvals.unwrap_or(defaults.approvals_required),
        proposal_ttl_s: policy_proposal_ttl_s.unwrap_or(defaults.proposal_ttl_s),
    };
    ephemera_core::command::validate_governance(&governance)?;
    let initialized = node
        .raft
        .is_initialized()
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    if node.is_bootstrapped()? {
        return Err(Error::AlreadyInitialized);
    }
    let issuer = if issuer.is_empty() {
        let scheme = if plaintext { "http" } else { "https" };
        format!("{scheme}://{}", node.info.http_addr)
    } else {
        issuer
    };
    // An earlier init may have initialised Raft and then failed before the bootstrap entry
    // committed: resume it. If the bootstrap did commit elsewhere, `apply` refuses this one.
    if !initialized {
        let members = BTreeMap::from([(node.id, node.info.clone())]);
        node.raft.initialize(members).await.map_err(|e| match e {
            ephemera_raft::RaftError::APIError(_) => Error::AlreadyInitialized,
            other => Error::Unavailable(other.to_string()),
        })?;
    }
    node.raft
        .wait(Some(Duration::from_secs(10)))
        .current_leader(node.id, "init: become leader")
        .await
        .map_err(|e| Error::Unavailable(format!("did not become leader: {e}")))?;
    node.route_system(Intent::Bootstrap {
        admin_credential_hash: hash_secret(admin_token).to_vec(),
        issuer,
        policy_text,
        governance,
    })
    .await?;
    if !ca_cert_pem.is_empty() || !ca_key_pem.is_empty() {
        let trust_domain = node
            .tls_trust_domain()
            .ok_or_else(|| {
                Error::InvalidArgument("a cluster CA needs a node configured with [tls]".into())
            })?
            .to_string();
        ephemera_pki::check_key_matches(&ca_cert_pem, &ca_key_pem)
            .map_err(|e| Error::InvalidArgument(format!("cluster CA: {e}")))?;
        let sealed_seed = node.seal_ca_key(&ca_key_pem)?;
        node.route_system(Intent::SetClusterCa {
            trust_domain,
            cert_pem: ca_cert_pem,
            sealed_seed,
        })
        .await?;
    }
    if state::active_kid(&node.view)
        .map_err(|e| Error::Internal(e.to_string()))?
        .is_none()
    {
        node.route_system(Intent::RotateKey).await?;
    }
    // The SSH CA is generated here too, so that a cluster answers SSH requests as soon as
    // init returns (the leader's tick only replaces a revoked one).
    if state::active_ssh_ca(&node.view)
        .map_err(|e| Error::Internal(e.to_string()))?
        .is_none()
    {
        node.route_system(import_ssh_ca.unwrap_or(Intent::RotateSshCa))
            .await?;
    }
    if state::active_audit_key(&node.view)
        .map_err(|e| Error::Internal(e.to_string()))?
        .is_none()
    {
        node.route_system(Intent::RotateAuditKey).await?;
    }
    node.spend_init_secret();
    Ok(())
}

/// A fresh break-glass credential (256 random bits), returned once and stored hashed.
pub(crate) fn new_break_glass_credential(node: &Node) -> zeroize::Zeroizing<String> {
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    node.fill_random(secret.as_mut());
    zeroize::Zeroizing::new(format!(
        "{}{}",
        crate::node::BREAK_GLASS_PREFIX,
        URL_SAFE_NO_PAD.encode(secret.as_ref())
    ))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn put_db_connection(
        &self,
        req: Request<pb::PutDbConnectionRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        self.db_put(req).await
    }

    async fn get_db_connection(
        &self,
        req: Request<pb::GetDbConnectionRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        self.db_get(req).await
    }

    async fn list_db_connections(
        &self,
        req: Request<pb::ListDbConnectionsRequest>,
    ) -> Result<Response<pb::ListDbConnectionsResponse>, Status> {
        self.db_list(req).await
    }

    async fn delete_db_connection(
        &self,
        req: Request<pb::DeleteDbConnectionRequest>,
    ) -> Result<Response<pb::DeleteDbConnectionResponse>, Status> {
        self.db_delete(req).await
    }

    async fn rotate_db_root(
        &self,
        req: Request<pb::RotateDbRootRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        self.db_rotate_root(req).await
    }

    async fn abandon_lease(
        &self,
        req: Request<pb::AbandonLeaseRequest>,
    ) -> Result<Response<pb::AbandonLeaseResponse>, Status> {
        self.lease_abandon(req).await
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        let id = ephemera_pki::SpiffeId::parse(&r.spiffe_id)
            .map_err(|e| self.fail(Error::InvalidArgument(e.to_string())))?;
        self.node
            .refuse_admin_identity(&id.to_string())
            .map_err(|e| self.fail(e))?;
        let ttl_s = if r.ttl_s == 0 { 600 } else { r.ttl_s };
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        self.node.fill_random(secret.as_mut());
        let token = format!("eph_jt_{}", URL_SAFE_NO_PAD.encode(secret.as_ref()));
        self.propose(
            actor,
            Intent::CreateJoinToken {
                token_hash: hash_secret(&token).to_vec(),
                spiffe_id: id.to_string(),
                ttl_s,
            },
        )
        .await?;
        Ok(Response::new(pb::JoinToken {
            token,
            spiffe_id: id.to_string(),
            expires_at_ms: self.node.clock.now_ms() + ttl_s * 1000,
        }))
    }

    async fn rotate_break_glass(
        &self,
        req: Request<pb::RotateBreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassCredential>, Status> {
        let actor = self.caller_of(&req)?;
        let admin_token = new_break_glass_credential(&self.node);
        self.propose(
            actor,
            Intent::SetBreakGlass {
                credential_hash: hash_secret(&admin_token).to_vec(),
            },
        )
        .await?;
        Ok(Response::new(pb::BreakGlassCredential {
            admin_token: admin_token.to_string(),
        }))
    }

    async fn disable_break_glass(
        &self,
        req: Request<pb::DisableBreakGlassRequest>,
    ) -> Result<Response<pb::DisableBreakGlassResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.propose(
            actor,
            Intent::SetBreakGlass {
                credential_hash: Vec::new(),
            },
        )
        .await?;
        Ok(Response::new(pb::DisableBreakGlassResponse {}))
    }

    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        Api::init_cluster(self, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.fail(e))
    }

    async fn get_node_info(
        &self,
        _: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let i = &self.node.info;
        Ok(Response::new(pb::NodeInfo {
            id: self.node.id,
            api_addr: i.api_addr.clone(),
            http_addr: i.http_addr.clone(),
            cluster_addr: i.cluster_addr.clone(),
        }))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let actor = self.caller_of(&req)?;
        let (id, info) =
            node_info_from_pb(req.into_inner().node, self.plaintext).map_err(|e| self.fail(e))?;
        self.propose(
            actor,
            Intent::RecordAccess {
                action: "cluster.add_node".into(),
                target: format!("node:{id} {info}"),
            },
        )
        .await?;
        self.node
            .route(Forwarded::AddNode { id, info })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let actor = self.caller_of(&req)?;
        let id = req.into_inner().id;
        self.propose(
            actor,
            Intent::RecordAccess {
                action: "cluster.remove_node".into(),
                target: format!("node:{id}"),
            },
        )
        .await?;
        self.node
            .route(Forwarded::RemoveNode { id })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn get_cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        // An operational probe: authenticated, but not written to the audit chain, so that
        // monitoring does not grow the replicated state.
        self.caller_of(&req)?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn put_role(
        &self,
        req: Request<pb::PutRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req
            .into_inner()
            .role
            .ok_or_else(|| self.fail(Error::InvalidArgument("role is required".into())))?;
        let spec = spec_from_pb(&r).map_err(|e| self.fail(e))?;
        let role = Role {
            name: r.name,
            spec,
            default_ttl_s: r.default_ttl_s,
            max_ttl_s: r.max_ttl_s,
            environment: r.environment,
            target: r.target,
            revoke_on_renewal_denied: r.revoke_on_renewal_denied,
            issue_rate_per_identity: r.issue_rate_per_identity,
            issue_rate: r.issue_rate,
            max_live_leases_per_identity: r.max_live_leases_per_identity,
            max_live_leases: r.max_live_leases,
        };
        match self.propose(actor, Intent::PutRole(role)).await? {
            Outcome::Role(r) => Ok(Response::new(role_to_pb(r))),
            _ => Err(to_status(Error::Internal(
                "put role returned no role".into(),
            ))),
        }
    }

    async fn get_role(
        &self,
        req: Request<pb::GetRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.get_ref().name.clone();
        self.read_audit(&req, &actor, &format!("role:{name}"))
            .await?;
        match state::get_role(&self.node.view, &name)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
        {
            Some(r) => Ok(Response::new(role_to_pb(r))),
            None => Err(self.fail(Error::UnknownRole(name))),
        }
    }

    async fn list_roles(
        &self,
        req: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let roles = state::list_roles(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: roles.into_iter().map(role_to_pb).collect(),
        }))
    }

    async fn delete_role(
        &self,
        req: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.into_inner().name;
        self.propose(actor, Intent::DeleteRole { name }).await?;
        Ok(Response::new(pb::DeleteRoleResponse {}))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let now = self.node.clock.now_ms();
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let jwt_keys = state::list_keys(&self.node.view).map_err(internal)?;
        let ssh_cas = state::list_ssh_cas(&self.node.view).map_err(internal)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: jwt_keys
                .into_iter()
                .map(|k| key_to_pb(k, KeyPurpose::Jwt, now))
                .chain(
                    ssh_cas
                        .into_iter()
                        .map(|k| key_to_pb(k, KeyPurpose::SshCa, now)),
                )
                .collect(),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let actor = self.caller_of(&req)?;
        let (purpose, intent) = match req.get_ref().key.as_str() {
            "" | "jwt" => (KeyPurpose::Jwt, Intent::RotateKey),
            "ssh-ca" => (KeyPurpose::SshCa, Intent::RotateSshCa),
            other => {
                return Err(self.fail(Error::InvalidArgument(format!(
                    "unknown key {other:?}: jwt or ssh-ca"
                ))))
            }
        };
        match self.propose(actor, intent).await? {
            Outcome::KeyAdded { kid } => {
                let rec = match purpose {
                    KeyPurpose::Jwt => state::get_key(&self.node.view, &kid),
                    KeyPurpose::SshCa => state::get_ssh_ca(&self.node.view, &kid),
                }
                .map_err(|e| to_status(Error::Internal(e.to_string())))?
                .ok_or_else(|| to_status(Error::KeyNotFound(kid.clone())))?;
                Ok(Response::new(key_to_pb(
                    rec,
                    purpose,
                    self.node.clock.now_ms(),
                )))
            }
            _ => Err(to_status(Error::Internal("rotate returned no key".into()))),
        }
    }

    async fn list_audit_checkpoints(
        &self,
        req: Request<pb::ListAuditCheckpointsRequest>,
    ) -> Result<Response<pb::ListAuditCheckpointsResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "checkpoints").await?;
        let limit = match req.get_ref().limit {
            0 => 20,
            n => n.min(1000),
        } as usize;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let view = &self.node.view;
        let checkpoints = state::audit_checkpoints(view, limit).map_err(internal)?;
        let keys = state::list_audit_keys(view).map_err(internal)?;
        Ok(Response::new(pb::ListAuditCheckpointsResponse {
            checkpoints: checkpoints
                .into_iter()
                .map(|c| pb::AuditCheckpoint {
                    seq: c.seq,
                    hash: c.hash,
                    kid: c.kid,
                    signature: c.signature,
                    signed_at_ms: c.signed_at_ms,
                })
                .collect(),
            keys: keys
                .into_iter()
                .map(|k| pb::AuditKey {
                    kid: k.kid,
                    public_key: k.public_key.to_vec(),
                })
                .collect(),
        }))
    }

    async fn audit_tail(
        &self,
        req: Request<pb::AuditTailRequest>,
    ) -> Result<Response<pb::AuditTailResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let r = *req.get_ref();
        self.read_audit(&req, &actor, "").await?;
        let limit = if r.limit == 0 { 20 } else { r.limit.min(1000) } as usize;
        let view = &self.node.view;
        let (head_seq, head_hash) =
            state::audit_head(view).map_err(|e| to_status(Error::Internal(e.to_string())))?;
        let from = if r.from_seq == 0 {
            head_seq.saturating_sub(limit as u64 - 1).max(1)
        } else {
            r.from_seq
        };
        let mut records = state::audit_records(view, from, limit)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        // Records appended after the head was read belong to the next page, so that the page
        // always ends at (or before) the head it reports.
        records.retain(|r| r.seq <= head_seq);
        Ok(Response::new(pb::AuditTailResponse {
            records: records
                .into_iter()
                .map(|a| pb::AuditRecord {
                    canonical_json: serde_json::to_string(&a).expect("audit records serialise"),
                    seq: a.seq,
                    time_ms: a.time_ms,
                    actor: a.actor,
                    auth_method: a.auth_method,
                    actor_issuer: a.actor_issuer,
                    actor_attributes: a.actor_attributes.into_iter().collect(),
                    action: a.action,
                    role: a.role,
                    lease_id: a.lease_id,
                    subject: a.subject,
                    ttl_s: a.ttl_s,
                    scopes: a.scopes,
                    audience: a.audience,
                    target: a.target,
                    count: a.count,
                    outcome: a.outcome,
                    reason: a.reason,
                    prev_hash: a.prev_hash,
                    hash: a.hash,
                    policy_version: a.policy_version,
                    policy_ids: a.policy_ids,
                    context: a.context.into_iter().collect(),
                    details: a.details.into_iter().collect(),
                    error_fields: a.error_fields.into_iter().collect(),
                })
                .collect(),
            head_seq,
            head_hash,
        }))
    }

    async fn propose_policy(
        &self,
        req: Request<pb::ProposePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        // Refused here with the validator's message; nothing reaches the log.
        validate_policy(&r.text).map_err(|e| self.fail(e))?;
        let intent = Intent::ProposePolicy {
            text: r.text,
            comment: r.comment.filter(|c| !c.is_empty()),
        };
        self.proposal_reply(self.propose(actor, intent).await?)
    }

    async fn approve_policy(
        &self,
        req: Request<pb::ApprovePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let proposal_id = req.into_inner().proposal_id;
        let outcome = self
            .propose(actor, Intent::ApprovePolicy { proposal_id })
            .await?;
        self.proposal_reply(outcome)
    }

    async fn reject_policy(
        &self,
        req: Request<pb::RejectPolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        let intent = Intent::RejectPolicy {
            proposal_id: r.proposal_id,
            reason: r.reason,
        };
        self.proposal_reply(self.propose(actor, intent).await?)
    }

    async fn get_policy_proposal(
        &self,
        req: Request<pb::GetPolicyProposalRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let id = req.get_ref().proposal_id.clone();
        self.read_audit(&req, &actor, &format!("policy-proposal:{id}"))
            .await?;
        let view = &self.node.view;
        let proposal = state::policy_proposal(view, &id)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .ok_or_else(|| self.fail(Error::ProposalNotFound(id)))?;
        self.proposal_reply(Outcome::Proposal(proposal))
    }

    async fn list_policy_proposals(
        &self,
        req: Request<pb::ListPolicyProposalsRequest>,
    ) -> Result<Response<pb::ListPolicyProposalsResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let include_closed = req.get_ref().include_closed;
        self.read_audit(&req, &actor, "policy-proposals").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let governance = state::policy_governance(view).map_err(internal)?;
        let now = self.node.clock.now_ms();
        let proposals = state::policy_proposals(view)
            .map_err(internal)?
            .into_iter()
            .filter(|p| include_closed || p.status(now) == "pending")
            .map(|p| proposal_to_pb(p, now, governance))
            .collect();
        Ok(Response::new(pb::ListPolicyProposalsResponse { proposals }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let actor = self.caller_of(&req)?;
        let wanted = req.get_ref().version;
        self.read_audit(&req, &actor, "policy").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let active = state::policy_version(view).map_err(internal)?;
        let version = wanted.unwrap_or(active);
        let v = state::policy_at(view, version)
            .map_err(internal)?
            .ok_or_else(|| {
                self.fail(Error::InvalidArgument(format!(
                    "no policy version {version} (the active version is {active})"
                )))
            })?;
        Ok(Response::new(policy_version_to_pb(v, active, true)))
    }

    async fn list_policy_history(
        &self,
        req: Request<pb::ListPolicyHistoryRequest>,
    ) -> Result<Response<pb::ListPolicyHistoryResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "policy-history").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let active = state::policy_version(view).map_err(internal)?;
        let versions = state::policy_history(view)
            .map_err(internal)?
            .into_iter()
            .map(|v| policy_version_to_pb(v, active, false))
            .collect();
        Ok(Response::new(pb::ListPolicyHistoryResponse { versions }))
    }

    async fn list_quarantines(
        &self,
        req: Request<pb::ListQuarantinesRequest>,
    ) -> Result<Response<pb::ListQuarantinesResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let quarantines = state::quarantines(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .into_iter()
            .map(|q| pb::Quarantine {
                identity: q.identity,
                since_ms: q.since_ms,
                reason: q.reason,
                detail: q.detail,
                revoked: q.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListQuarantinesResponse { quarantines }))
    }

    async fn release_quarantine(
        &self,
        req: Request<pb::ReleaseQuarantineRequest>,
    ) -> Result<Response<pb::ReleaseQuarantineResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let identity = req.into_inner().identity;
        self.propose(actor, Intent::ReleaseQuarantine { identity })
            .await?;
        Ok(Response::new(pb::ReleaseQuarantineResponse {}))
    }

    async fn get_state_digest(
        &self,
        req: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigest>, Status> {
        // Operational probe of this node's own copy; not audited (see get_cluster_status).
        self.caller_of(&req)?;
        let node = self.node.clone();
        let digest = tokio::task::spawn_blocking(move || -> Result<pb::StateDigest, Error> {
            let view = &node.view;
            let (_, applied, _) = node.local_status();
            let err = |e: ephemera_core::StorageError| Error::Internal(e.to_string());
            let digest = state::state_digest(view).map_err(err)?;
            let (seq, hash) = state::audit_head(view).map_err(err)?;
            let lease_count =
                ephemera_core::kv::KvRead::range(view, b"lease/", b"lease0", usize::MAX)
                    .map_err(err)?
                    .len() as u64;
            Ok(pb::StateDigest {
                node_id: node.id,
                digest,
                applied_index: applied,
                audit_head_seq: seq,
                audit_head_hash: hash,
                lease_count,
            })
        })
        .await
        .map_err(|e| to_status(Error::Internal(e.to_string())))?
        .map_err(to_status)?;
        Ok(Response::new(digest))
    }
}
