//! The recorded history: one event per client operation, with invocation and completion times
//! (Unix ms on the harness's clock) and what came back.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Issue {
        request_id: String,
        /// The subject the lease was issued for (absent: the caller itself).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
    },
    Renew {
        lease_id: String,
    },
    Revoke {
        lease_id: String,
    },
    /// Bulk revocation of every lease of a subject.
    RevokeSubject {
        subject: String,
    },
    Introspect {
        lease_id: String,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Issue { .. } => "issue",
            Op::Renew { .. } => "renew",
            Op::Revoke { .. } => "revoke",
            Op::RevokeSubject { .. } => "revoke_subject",
            Op::Introspect { .. } => "introspect",
        }
    }
}

/// `Ok`: the operation happened. `Fail`: it certainly did not (a definite refusal). `Unknown`:
/// it may or may not have happened (timeout, node unreachable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Fail { error: String },
    Unknown { error: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    pub lease_id: Option<String>,
    pub expires_at_ms: Option<u64>,
    pub max_expires_at_ms: Option<u64>,
    /// Introspection's answer.
    pub active: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    /// The client that issued it.
    pub process: u32,
    /// The node it was sent to (1-based).
    pub node: u64,
    #[serde(flatten)]
    pub op: Op,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(default)]
    pub result: OpResult,
}

/// A fault the nemesis injected, for the report and the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub kind: String,
    pub detail: String,
    /// Nodes it affected (1-based).
    pub nodes: Vec<u64>,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// One lease as a node reports it at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalLease {
    pub id: String,
    pub state: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub max_expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigest {
    pub applied_index: u64,
    pub state_digest: String,
    pub audit_head: String,
}

/// What each node holds once faults have stopped and the cluster has settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Per node (1-based id), its leases; `None` if it could not be read.
    pub leases: Vec<(u64, Option<Vec<FinalLease>>)>,
    /// Per node: its digest, or `None` if it could not be read.
    pub digests: Vec<(u64, Option<NodeDigest>)>,
    /// Result of recomputing the audit chain (`Err` with the reason).
    pub audit_chain: Result<u64, String>,
    /// Per node: milliseconds after healing until a write through it succeeded, or `None`.
    pub recovery_ms: Vec<(u64, Option<u64>)>,
    /// Role max TTL, to check each lease's cap.
    pub role_max_ttl_s: u64,
}

impl Default for FinalState {
    fn default() -> Self {
        FinalState {
            leases: Vec::new(),
            digests: Vec::new(),
            audit_chain: Err("not checked".into()),
            recovery_ms: Vec::new(),
            role_max_ttl_s: 0,
        }
    }
}
