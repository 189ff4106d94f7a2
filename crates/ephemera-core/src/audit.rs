//! The tamper-evident audit chain. Each record's hash covers the previous hash and the record's
//! canonical JSON, so altering, dropping or reordering any record changes every later hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub actor: String,
    pub auth_method: String,
    /// Trust domain or issuer that vouched for the actor.
    pub actor_issuer: Option<String>,
    /// The actor's attributes from authentication (e.g. repository, namespace).
    pub actor_attributes: std::collections::BTreeMap<String, String>,
    pub action: String,
    pub role: Option<String>,
    pub lease_id: Option<String>,
    pub subject: Option<String>,
    pub ttl_s: Option<u64>,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    /// What a bulk or key operation addressed (`role:web`, `key:abc`).
    pub target: Option<String>,
    /// How many leases a bulk operation touched.
    pub count: Option<u64>,
    /// `ok` or `denied`.
    pub outcome: String,
    /// Error kind and message for a denial. Never secret material.
    pub reason: Option<String>,
    /// The policy set version that decided the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// `@id`s of the policies that determined the decision (the permits of an allow, the
    /// forbids of a denial; empty when nothing permitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// The runtime context the request was decided in (source address, environment, job id).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub context: std::collections::BTreeMap<String, String>,
    /// What the credential's kind adds: its kind, an SSH certificate's principals, serial and
    /// key id. Never secret.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub details: std::collections::BTreeMap<String, String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// Hash of this record chained to `prev_hash` (the `hash` field itself is excluded).
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let body = serde_json::to_vec(&unhashed).expect("audit record serialises");
        let mut h = Sha256::new();
        h.update(b"ephemera-audit-v1\n");
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(&body);
        hex::encode(h.finalize())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("audit record {seq}: sequence gap (expected {expected})")]
    SequenceGap { seq: u64, expected: u64 },
    #[error("audit record {seq}: prev_hash does not match the previous record's hash")]
    BrokenLink { seq: u64 },
    #[error("audit record {seq}: hash does not match its content (record altered)")]
    BadHash { seq: u64 },
}

/// Incremental verifier, so a long chain can be checked page by page.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    head: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            next_seq: 1,
            head: GENESIS_HASH.to_string(),
        }
    }
}

impl ChainVerifier {
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), ChainError> {
        if r.seq != self.next_seq {
            return Err(ChainError::SequenceGap {
                seq: r.seq,
                expected: self.next_seq,
            });
        }
        if r.prev_hash != self.head {
            return Err(ChainError::BrokenLink { seq: r.seq });
        }
        if r.compute_hash() != r.hash {
            return Err(ChainError::BadHash { seq: r.seq });
        }
        self.head = r.hash.clone();
        self.next_seq += 1;
        Ok(())
    }

    pub fn head(&self) -> &str {
        &self.head
    }

    pub fn count(&self) -> u64 {
        self.next_seq - 1
    }
}
