//! `ephemera audit verify` and `ephemera audit export`. Verification does not trust the node it
//! asks: it recomputes every node's chain from its records, checks each against the signed
//! checkpoints (verified with the cluster's audit keys), and compares the nodes with each other.
//! A record edited on one node's disk breaks that node's chain, disagrees with the checkpoints
//! and with the other nodes, and the report names the node.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client};
use ephemera_core::audit::{verify_checkpoint, AuditRecord, ChainVerifier};
use serde_json::json;

use crate::connect::{client, client_at};
use crate::output::print;
use crate::Cli;

const PAGE: u32 = 1000;

pub(crate) fn record_of(r: pb::AuditRecord) -> Result<AuditRecord> {
    serde_json::from_str(&r.canonical_json)
        .with_context(|| format!("audit record {} is not valid JSON", r.seq))
}

async fn tail(c: &Client, from_seq: u64) -> Result<pb::AuditTailResponse> {
    Ok(c.admin_call(
        pb::AuditTailRequest {
            from_seq,
            limit: PAGE,
        },
        |mut a, r| async move { a.audit_tail(r).await },
    )
    .await?)
}

/// What one node's chain looked like.
struct NodeChain {
    endpoint: String,
    records: u64,
    head: String,
    /// Hashes at the sequence numbers the report compares (checkpoints, the common head).
    hashes: BTreeMap<u64, String>,
}

/// Walks a node's whole chain, recomputing it, and keeps the hashes at `wanted`.
async fn walk(c: &Client, endpoint: &str, wanted: &[u64]) -> Result<NodeChain> {
    let mut verifier = ChainVerifier::default();
    let mut hashes = BTreeMap::new();
    loop {
        let page = tail(c, verifier.count() + 1).await?;
        let n = page.records.len();
        for r in page.records {
            let rec = record_of(r)?;
            verifier
                .push(&rec)
                .with_context(|| format!("node {endpoint}: its audit chain is broken"))?;
            if wanted.binary_search(&rec.seq).is_ok() {
                hashes.insert(rec.seq, rec.hash);
            }
        }
        if n == 0 || verifier.count() >= page.head_seq {
            if verifier.head() != page.head_hash {
                bail!(
                    "node {endpoint}: recomputed head {} differs from the head it reports ({})",
                    verifier.head(),
                    page.head_hash
                );
            }
            return Ok(NodeChain {
                endpoint: endpoint.to_string(),
                records: verifier.count(),
                head: verifier.head().to_string(),
                hashes,
            });
        }
    }
}

pub async fn verify(cli: &Cli) -> Result<()> {
    let endpoints = client(cli)?.endpoints();
    let mut problems: Vec<String> = Vec::new();
    // 1. Every node's checkpoints, each verified with the audit key it names; the nodes must
    //    agree on the keys and on the checkpoints.
    let mut keys: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut checkpoints: BTreeMap<u64, String> = BTreeMap::new();
    let mut clients = Vec::new();
    for ep in &endpoints {
        let c = client_at(cli, ep)?;
        let listed = c
            .admin_call(
                pb::ListAuditCheckpointsRequest { limit: 1000 },
                |mut a, r| async move { a.list_audit_checkpoints(r).await },
            )
            .await;
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("node {ep}: unreachable, not verified: {e}"));
                continue;
            }
        };
        for k in listed.keys {
            match keys.get(&k.kid) {
                Some(known) if *known != k.public_key => problems.push(format!(
                    "node {ep}: audit key {} differs from another node's",
                    k.kid
                )),
                _ => {
                    keys.insert(k.kid, k.public_key);
                }
            }
        }
        for cp in listed.checkpoints {
            let key: Option<[u8; 32]> =
                keys.get(&cp.kid).and_then(|k| k.as_slice().try_into().ok());
            if !key.is_some_and(|k| verify_checkpoint(&k, cp.seq, &cp.hash, &cp.signature)) {
                problems.push(format!(
                    "node {ep}: checkpoint {} is not signed by an audit key of this cluster",
                    cp.seq
                ));
                continue;
            }
            match checkpoints.get(&cp.seq) {
                Some(h) if *h != cp.hash => problems.push(format!(
                    "node {ep}: checkpoint {} differs from another node's",
                    cp.seq
                )),
                _ => {
                    checkpoints.insert(cp.seq, cp.hash);
                }
            }
        }
        clients.push((ep.clone(), c));
    }
    // 2. The heads: the nodes are compared at the lowest one.
    let mut common = u64::MAX;
    for (ep, c) in &clients {
        match tail(c, u64::MAX).await {
            Ok(t) => common = common.min(t.head_seq),
            Err(e) => problems.push(format!("node {ep}: cannot read its audit head: {e}")),
        }
    }
    let mut wanted: Vec<u64> = checkpoints.keys().copied().collect();
    if common != u64::MAX && common > 0 {
        wanted.push(common);
    }
    wanted.sort_unstable();
    wanted.dedup();
    // 3. Each chain, recomputed, against the checkpoints and against the others.
    let mut chains = Vec::new();
    for (ep, c) in &clients {
        match walk(c, ep, &wanted).await {
            Ok(chain) => {
                for (seq, hash) in &checkpoints {
                    if *seq <= chain.records && chain.hashes.get(seq) != Some(hash) {
                        problems.push(format!(
                            "node {ep}: record {seq} does not match the signed checkpoint"
                        ));
                    }
                }
                chains.push(chain);
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if let Some(first) = chains.first() {
        for other in &chains[1..] {
            if first.hashes.get(&common) != other.hashes.get(&common) {
                problems.push(format!(
                    "nodes {} and {} disagree at record {common}",
                    first.endpoint, other.endpoint
                ));
            }
        }
    }
    let latest = checkpoints.keys().next_back().copied();
    let nodes: Vec<serde_json::Value> = chains
        .iter()
        .map(|c| json!({"endpoint": c.endpoint, "records": c.records, "head": c.head}))
        .collect();
    if !problems.is_empty() {
        bail!(
            "audit chain verification FAILED:\n  {}",
            problems.join("\n  ")
        );
    }
    print(
        cli.output,
        json!({
            "verified": true,
            "nodes": nodes,
            "checkpoints": checkpoints.len(),
            "latest_checkpoint": latest,
        }),
        || {
            let mut out = format!(
                "audit chain verified on {} nodes against {} signed checkpoint(s){}:",
                chains.len(),
                checkpoints.len(),
                latest
                    .map(|s| format!(" (latest at record {s})"))
                    .unwrap_or_default()
            );
            for c in &chains {
                out.push_str(&format!(
                    "\n  {}: {} records, head {}",
                    c.endpoint, c.records, c.head
                ));
            }
            out
        },
    );
    Ok(())
}

/// Streams records from `since` to the head as JSON lines (one canonical record per line), for
/// a SIEM or an archive.
pub async fn export(cli: &Cli, since: u64) -> Result<()> {
    use std::io::Write;
    let c = client(cli)?;
    let mut next = since.max(1);
    let head = tail(&c, u64::MAX).await?.head_seq;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while next <= head {
        let page = tail(&c, next).await?;
        if page.records.is_empty() {
            break;
        }
        for r in page.records {
            if r.seq > head {
                break;
            }
            next = r.seq + 1;
            writeln!(out, "{}", r.canonical_json)?;
        }
    }
    out.flush()?;
    Ok(())
}
