//! Replicated policy data: the committed policy set versions, change proposals and their
//! governance, and the decision stamp a request carries into the log. Evaluation itself lives in
//! `ephemera-policy`; this module only stores and sequences.

use serde::{Deserialize, Serialize};

/// The outcome of the receiving node's policy decision, carried in Issue and Renew commands.
/// `apply` accepts it only if `version` is still the active version when the command commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStamp {
    pub version: u64,
    /// `@id`s of the policies that permitted the request (`break-glass` for the bootstrap
    /// credential, which policy does not bind).
    pub determining: Vec<String>,
    /// Scopes the permitting policies allow; `None` leaves them to the role.
    pub scopes: Option<Vec<String>>,
    /// TTL cap of the permitting policies; `None` leaves it to the role.
    pub max_ttl_s: Option<u64>,
}

impl PolicyStamp {
    pub const BREAK_GLASS: &'static str = "break-glass";
}

/// One committed version of the policy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub text: String,
    /// SHA-256 of `text`, hex.
    pub sha256: String,
    pub activated_at_ms: u64,
    /// The proposal that became this version (`None` for the version set at `cluster init`).
    pub proposal_id: Option<String>,
    pub proposer: String,
    pub approvers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposalState {
    Pending,
    Activated {
        version: u64,
        at_ms: u64,
    },
    Rejected {
        by: String,
        at_ms: u64,
        reason: String,
    },
}

/// A proposed replacement of the whole policy set, waiting for approvals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyProposal {
    pub id: String,
    pub text: String,
    pub sha256: String,
    /// The version this proposal replaces; it cannot activate over any other.
    pub base_version: u64,
    pub proposer: String,
    pub comment: Option<String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Distinct administrators other than the proposer, in approval order.
    pub approvals: Vec<String>,
    pub state: ProposalState,
}

impl PolicyProposal {
    /// Approvals this proposal needs. Separation of duties counts people: normally the
    /// proposer and `approvals_required` others. The break-glass credential is nobody's own
    /// identity (whoever holds it may also hold an administrator's certificate), so its
    /// proposals need one approval more, and it never approves.
    pub fn approvals_needed(&self, governance: &PolicyGovernance) -> u32 {
        let required = governance.approvals_required;
        if required > 0 && self.proposer == crate::types::Principal::BOOTSTRAP_ADMIN_ID {
            required + 1
        } else {
            required
        }
    }

    /// `pending`, `expired`, `activated` or `rejected`, as of `now_ms`.
    pub fn status(&self, now_ms: u64) -> &'static str {
        match self.state {
            ProposalState::Pending if now_ms >= self.expires_at_ms => "expired",
            ProposalState::Pending => "pending",
            ProposalState::Activated { .. } => "activated",
            ProposalState::Rejected { .. } => "rejected",
        }
    }
}

/// Separation of duties, fixed at `cluster init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyGovernance {
    /// Approvals by distinct administrators other than the proposer that a proposal needs.
    pub approvals_required: u32,
    /// How long a proposal stays open.
    pub proposal_ttl_s: u64,
}

impl Default for PolicyGovernance {
    fn default() -> Self {
        PolicyGovernance {
            approvals_required: 1,
            proposal_ttl_s: 7 * 24 * 3600,
        }
    }
}

pub const MAX_APPROVALS_REQUIRED: u32 = 16;
pub const MAX_PROPOSAL_TTL_S: u64 = 90 * 24 * 3600;
/// Policy text size limit, enforced again in `apply` (the node validates the content).
pub const MAX_POLICY_TEXT_LEN: usize = 512 * 1024;
pub const MAX_COMMENT_LEN: usize = 1024;
