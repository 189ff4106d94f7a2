//! The internal service on the cluster listener: Raft, forwarding, read index, node status.

use super::*;
use ephemera_raft::NodeId;

/// The internal service on the cluster listener.
#[derive(Clone)]
pub struct ClusterService {
    pub node: Arc<Node>,
}

impl ClusterService {
    /// The node that sent a request: the id in its certificate (the TLS handshake has checked
    /// the certificate against the cluster CA), provided that node is a member of this
    /// cluster. `None` on plaintext links, which carry no identity.
    fn sender<T>(&self, req: &Request<T>) -> Result<Option<NodeId>, Status> {
        if self.node.tls_trust_domain().is_none() {
            return Ok(None);
        }
        let id = req
            .extensions()
            .get::<crate::conn::ConnInfo>()
            .and_then(|c| c.peer_certs.as_ref())
            .and_then(|certs| certs.first())
            .and_then(|leaf| ephemera_pki::spiffe_id_of(leaf).ok())
            .and_then(|id| id.node_id())
            .ok_or_else(|| Status::unauthenticated("no node certificate on the cluster link"))?;
        self.node.admit_peer(id).map_err(to_status)?;
        Ok(Some(id))
    }
}

#[tonic::async_trait]
impl ipb::cluster_server::Cluster for ClusterService {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        self.node.accepts_raft().map_err(to_status)?;
        serve_append_entries(&self.node.raft, sender, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn vote(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        self.node.accepts_raft().map_err(to_status)?;
        serve_vote(&self.node.raft, sender, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        self.node.accepts_raft().map_err(to_status)?;
        serve_install_snapshot(&self.node.raft, sender, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn forward(
        &self,
        req: Request<ipb::ForwardRequest>,
    ) -> Result<Response<ipb::ForwardResponse>, Status> {
        let sender = self.sender(&req)?;
        let sender_cert = req
            .extensions()
            .get::<crate::conn::ConnInfo>()
            .and_then(|c| c.peer_certs.as_ref())
            .and_then(|certs| certs.first())
            .map(|c| c.clone().into_owned());
        let call: Forwarded = decode(&req.into_inner().proposal)
            .map_err(|e| Status::invalid_argument(format!("undecodable forwarded call: {e}")))?;
        let reply = self.node.handle_forwarded(call, sender, sender_cert).await;
        Ok(Response::new(ipb::ForwardResponse {
            result: encode(&reply),
        }))
    }

    async fn read_index(
        &self,
        req: Request<ipb::ReadIndexRequest>,
    ) -> Result<Response<ipb::ReadIndexResponse>, Status> {
        self.sender(&req)?;
        self.node
            .read_index()
            .await
            .map(|index| Response::new(ipb::ReadIndexResponse { index }))
            .map_err(to_status)
    }

    async fn node_status(
        &self,
        req: Request<ipb::NodeStatusRequest>,
    ) -> Result<Response<ipb::NodeStatusResponse>, Status> {
        self.sender(&req)?;
        let (state, applied_index, leader) = self.node.local_status();
        let (renewal_storm, renewal_rate_per_s, renewal_baseline_per_s) =
            self.node.guard.storm_state();
        Ok(Response::new(ipb::NodeStatusResponse {
            id: self.node.id,
            state,
            applied_index,
            current_leader: leader.unwrap_or(0),
            now_ms: self.node.clock.now_ms(),
            clock_offset_ms: self.node.guard.clock_offset(),
            renewal_storm,
            renewal_rate_per_s,
            renewal_baseline_per_s,
            has_membership: self.node.has_membership(),
            admitted: self
                .node
                .local
                .admitted
                .load(std::sync::atomic::Ordering::Acquire),
            api_addr: self.node.info.api_addr.clone(),
            http_addr: self.node.info.http_addr.clone(),
            cluster_addr: self.node.info.cluster_addr.clone(),
        }))
    }

    async fn admit(
        &self,
        req: Request<ipb::AdmitRequest>,
    ) -> Result<Response<ipb::AdmitResponse>, Status> {
        let sender = self.sender(&req)?;
        let has_membership = self.node.admit();
        tracing::debug!(by = ?sender, has_membership, "admission request");
        Ok(Response::new(ipb::AdmitResponse { has_membership }))
    }
}
