//! Forming and keeping the cluster from `[cluster] peers`, with no `cluster init` or
//! `cluster join` by hand. One task per node; it acts only on the node that forms the cluster
//! (before there is one) and on the leader (after).
//!
//! **Forming.** Only the listed node with the lowest id forms a cluster (a fixed choice, so the
//! two sides of a partition can never both form one), and only when it has no bootstrap entry
//! yet and at least `bootstrap_expect - 1` other listed nodes answer, proving their ids over
//! mutual TLS, with no Raft state and not being added by anyone. If any listed node answers
//! *with* Raft state, a cluster exists and this node waits to be added to it. Forming is
//! `cluster init` (resumable: a node that stopped half-way finishes on restart), with the
//! break-glass credential written to `cluster.admin_credential_file` (0600) before its hash is
//! committed, so it is never lost.
//!
//! **Joining.** Each round, the leader probes every listed node that is not a voter. One that
//! answers as that id with no Raft state (or a learner whose addition stopped half-way) is
//! admitted, added as a learner, caught up and promoted: the path `cluster join` takes
//! ([`Node::change_member`]). A listed node with Raft state that is not a member (another
//! cluster's, or one an operator removed) is left alone: only `cluster join` adds it.
//!
//! **Replacing.** A listed *voter* that answers with no Raft state lost its data directory (a
//! replaced disk or pod volume). It refuses Raft traffic until admitted (see
//! [`Node::accepts_raft`]), so it cannot vote with an empty log; the leader removes it (the
//! other voters' majority commits that) and the next round adds it again, never in place. A
//! node that merely restarted has its Raft state and is left alone, and a node that does not
//! answer is never removed.
//!
//! Bounds: one round every [`ROUND_EVERY`], each probe within [`PROBE_DEADLINE`], one change
//! at a time (an addition waits at most the catch-up limit).

use std::sync::Arc;
use std::time::Duration;

use ephemera_core::Error;
use ephemera_proto::internal::{NodeStatusRequest, NodeStatusResponse};
use ephemera_raft::NodeInfo;
use tokio::sync::watch;

use crate::config::{NodeConfig, PeerAddr};
use crate::Node;

pub const ROUND_EVERY: Duration = Duration::from_secs(2);
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// What a listed node said about itself over the cluster link.
async fn probe(node: &Node, peer: &PeerAddr) -> Result<NodeStatusResponse, String> {
    let call = async {
        let mut client = node
            .peers
            .client(peer.id, &peer.addr)
            .map_err(|e| e.to_string())?;
        client
            .node_status(NodeStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string())
    };
    let status = tokio::time::timeout(PROBE_DEADLINE, call)
        .await
        .map_err(|_| format!("no answer within {} s", PROBE_DEADLINE.as_secs()))??;
    // Over mTLS the certificate already proved the id; on plaintext links only this check does.
    if status.id != peer.id {
        return Err(format!("it says it is node {}", status.id));
    }
    Ok(status)
}

/// The listed nodes other than this one.
fn others(cfg: &NodeConfig) -> impl Iterator<Item = &PeerAddr> {
    cfg.cluster.peers.iter().filter(|p| p.id != cfg.node_id)
}

/// Runs until `stop`. Does nothing when no peers are listed.
pub fn spawn(
    node: Arc<Node>,
    cfg: NodeConfig,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if cfg.cluster.peers.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let forms = cfg.cluster.bootstrap_expect > 0 && cfg.bootstrapper() == cfg.node_id;
        loop {
            let round = async {
                if forms {
                    if let Err(e) = form(&node, &cfg).await {
                        tracing::warn!(error = %e, "forming the cluster");
                    }
                }
                if node.is_leader() {
                    reconcile(&node, &cfg).await;
                }
            };
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = round => {}
            }
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = tokio::time::sleep(ROUND_EVERY) => {}
            }
        }
    }))
}

/// One attempt at forming the cluster on the designated node (see the module doc).
async fn form(node: &Node, cfg: &NodeConfig) -> Result<(), Error> {
    if node.is_bootstrapped()? {
        return Ok(());
    }
    let members: Vec<u64> = node.membership(|m| m.nodes().map(|(id, _)| *id).collect());
    // Raft state with other members: this node was added to a cluster that someone else
    // formed. Raft state of its own alone: an earlier forming stopped half-way; finish it.
    let resuming = members == [node.id];
    if !members.is_empty() && !resuming {
        return Ok(());
    }
    if !resuming {
        if node
            .local
            .admitted
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(()); // a leader is adding this node
        }
        let mut new = 0;
        for peer in others(cfg) {
            match probe(node, peer).await {
                Ok(s) if s.has_membership => {
                    tracing::info!(
                        peer = peer.id,
                        "a listed node is already in a cluster; waiting to be added to it"
                    );
                    return Ok(());
                }
                Ok(s) if !s.admitted => new += 1,
                Ok(_) => {}
                Err(e) => tracing::debug!(peer = peer.id, error = %e, "listed node not up"),
            }
        }
        if 1 + new < cfg.cluster.bootstrap_expect {
            tracing::info!(
                up = 1 + new,
                expect = cfg.cluster.bootstrap_expect,
                "waiting for the listed nodes before forming the cluster"
            );
            return Ok(());
        }
    }
    let request = init_request(cfg)?;
    let admin_token = crate::grpc::new_break_glass_credential(node);
    write_admin_credential(&cfg.admin_credential_path(), &admin_token)?;
    crate::grpc::initialise(node, cfg.insecure_plaintext, request, &admin_token).await?;
    tracing::info!(
        node_id = node.id,
        credential_file = %cfg.admin_credential_path().display(),
        "formed the cluster; the break-glass credential is in the file: store it safely and delete the file"
    );
    Ok(())
}

/// `cluster init`'s request from the configuration: the cluster CA when `ca_key_file` is set,
/// the default policy.
fn init_request(cfg: &NodeConfig) -> Result<ephemera_proto::v1::InitClusterRequest, Error> {
    let mut r = ephemera_proto::v1::InitClusterRequest {
        issuer: cfg.cluster.issuer.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let (Some(key), Some(tls)) = (&cfg.cluster.ca_key_file, &cfg.tls) {
        let read = |p: &std::path::Path, private: bool| {
            let text = if private {
                crate::secret_files::read_private(p).map_err(|e| e.to_string())
            } else {
                std::fs::read_to_string(p).map_err(|e| e.to_string())
            };
            text.map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
        };
        r.ca_cert_pem = read(&tls.ca_file, false)?;
        r.ca_key_pem = read(key, true)?;
    }
    Ok(r)
}

/// Writes the credential 0600, replacing what an earlier attempt left (that one's hash was never
/// committed, or this node would be bootstrapped and not be here).
fn write_admin_credential(path: &std::path::Path, token: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let failed = |e: String| {
        Error::Unavailable(format!(
            "cannot write the break-glass credential to {}: {e}",
            path.display()
        ))
    };
    crate::secret_files::create_private(&tmp, &format!("{token}\n"))
        .map_err(|e| failed(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| failed(e.to_string()))
}

/// The leader's round: add listed nodes that are not voters, remove listed voters that came
/// back with no Raft state (see the module doc).
async fn reconcile(node: &Node, cfg: &NodeConfig) {
    for peer in others(cfg) {
        let (is_member, is_voter) = node.membership(|m| {
            (
                m.get_node(&peer.id).is_some(),
                m.voter_ids().any(|v| v == peer.id),
            )
        });
        let status = match probe(node, peer).await {
            Ok(s) => s,
            Err(e) => {
                if !is_voter {
                    tracing::debug!(peer = peer.id, error = %e, "listed node not up");
                }
                continue;
            }
        };
        let change = if is_voter {
            if status.has_membership || status.admitted {
                continue; // a member, or one being added
            }
            tracing::warn!(
                peer = peer.id,
                "listed voter has no Raft state (a new data directory): removing it, to add it again"
            );
            node.change_member(peer.id, None).await
        } else {
            // Not a member, or a learner whose addition stopped half-way. A non-member with
            // Raft state of its own is not ours to take (another cluster's node, or one an
            // operator removed): only `cluster join` by hand adds it.
            if !is_member && status.has_membership {
                tracing::warn!(
                    peer = peer.id,
                    "listed node has Raft state but is not a member; not adding it (wipe its \
                     data directory, or `cluster join` it)"
                );
                continue;
            }
            let info = NodeInfo {
                api_addr: status.api_addr,
                http_addr: status.http_addr,
                cluster_addr: status.cluster_addr,
            };
            if info.cluster_addr.is_empty() {
                continue; // a node of an older version: `cluster join` adds it
            }
            tracing::info!(peer = peer.id, learner = is_member, %info, "adding a listed node");
            node.change_member(peer.id, Some(info)).await
        };
        match change {
            Ok(()) => tracing::info!(peer = peer.id, "membership changed"),
            Err(e) => tracing::warn!(peer = peer.id, error = %e, "changing the membership"),
        }
        if !node.is_leader() {
            return;
        }
    }
}
