//! Raft for Ephemera: openraft type configuration, the sled log store and state-machine store
//! (and in-memory ones for simulation), and the tonic transport between nodes.

// openraft's trait signatures fix the error types (StorageError, RaftError); they are large by
// design and not ours to box.
#![allow(clippy::result_large_err)]

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod mem;
pub mod network;
pub mod store;

pub type NodeId = u64;

/// How to reach a member. Replicated in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Public gRPC API (`ephemera.v1`).
    pub api_addr: String,
    /// HTTP listener (JWKS, introspection, metrics).
    pub http_addr: String,
    /// Cluster listener (Raft, forwarding).
    pub cluster_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "api={} http={} cluster={}",
            self.api_addr, self.http_addr, self.cluster_addr
        )
    }
}

/// The state machine's answer to a log entry; membership and blank entries answer `Done`.
pub type Response = ephemera_core::command::ApplyResult;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = ephemera_core::command::Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        // The snapshot file itself (header and state): sent and received in chunks, never held
        // whole in memory just to be sent.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, NodeInfo, RaftError<E>>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, NodeInfo>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, NodeInfo>;

/// Encoding of everything that crosses the cluster listener or lands in the log.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("raft payloads serialise")
}

/// The length [`encode`] gives, without encoding.
pub fn encoded_len<T: Serialize>(v: &T) -> usize {
    bincode::serialized_size(v).map_or(usize::MAX, |n| n as usize)
}

pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}
