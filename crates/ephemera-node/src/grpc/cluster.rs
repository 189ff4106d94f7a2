//! The internal service on the cluster listener: Raft, forwarding, read index, node status.

use super::*;

/// The internal service on the cluster listener.
#[derive(Clone)]
pub struct ClusterService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl ipb::cluster_server::Cluster for ClusterService {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_append_entries(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn vote(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_vote(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_install_snapshot(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn forward(
        &self,
        req: Request<ipb::ForwardRequest>,
    ) -> Result<Response<ipb::ForwardResponse>, Status> {
        let call: Forwarded = decode(&req.into_inner().proposal)
            .map_err(|e| Status::invalid_argument(format!("undecodable forwarded call: {e}")))?;
        let reply = self.node.handle_forwarded(call).await;
        Ok(Response::new(ipb::ForwardResponse {
            result: encode(&reply),
        }))
    }

    async fn read_index(
        &self,
        _: Request<ipb::ReadIndexRequest>,
    ) -> Result<Response<ipb::ReadIndexResponse>, Status> {
        self.node
            .read_index()
            .await
            .map(|index| Response::new(ipb::ReadIndexResponse { index }))
            .map_err(to_status)
    }

    async fn node_status(
        &self,
        _: Request<ipb::NodeStatusRequest>,
    ) -> Result<Response<ipb::NodeStatusResponse>, Status> {
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
        }))
    }
}
