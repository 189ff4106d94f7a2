//! `ephemera policy`: propose, review and approve Cedar policy sets.

use anyhow::{bail, Context, Result};
use ephemera_client::pb;
use ephemera_policy::{PolicyBook, SCHEMA_TEXT};
use serde_json::{json, Value};

use crate::connect::client;
use crate::output::print;
use crate::util::fmt_time;
use crate::{Cli, PolicyCmd};

/// One policy set from several files: a deployment keeps, say, its administrators' policies and
/// each team's in files of their own.
fn read_policy(paths: &[std::path::PathBuf]) -> Result<String> {
    let mut text = String::new();
    for path in paths {
        let part = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&part);
    }
    Ok(text)
}

fn proposal_json(p: &pb::PolicyProposal) -> Value {
    json!({
        "id": p.id, "status": p.status, "sha256": p.sha256, "base_version": p.base_version,
        "proposer": p.proposer, "comment": p.comment, "created_at": fmt_time(p.created_at_ms),
        "expires_at": fmt_time(p.expires_at_ms), "approvals": p.approvals,
        "approvals_required": p.approvals_required,
        "activated_version": (p.activated_version > 0).then_some(p.activated_version),
        "rejected_by": (!p.rejected_by.is_empty()).then_some(&p.rejected_by),
        "reject_reason": (!p.reject_reason.is_empty()).then_some(&p.reject_reason),
    })
}

fn proposal_text(p: &pb::PolicyProposal) -> String {
    let mut t = format!(
        "proposal {} ({}): replaces version {}, proposed by {}, {}/{} approvals, expires {}\n  sha256 {}",
        p.id,
        p.status,
        p.base_version,
        p.proposer,
        p.approvals.len(),
        p.approvals_required,
        fmt_time(p.expires_at_ms),
        p.sha256
    );
    if !p.comment.is_empty() {
        t.push_str(&format!("\n  comment: {}", p.comment));
    }
    if !p.approvals.is_empty() {
        t.push_str(&format!("\n  approved by: {}", p.approvals.join(", ")));
    }
    match p.status.as_str() {
        "activated" => t.push_str(&format!("\n  active as version {}", p.activated_version)),
        "rejected" => t.push_str(&format!(
            "\n  rejected by {}: {}",
            p.rejected_by, p.reject_reason
        )),
        "pending" => t.push_str(&format!(
            "\n  review with `ephemera policy diff {0}`; approve with `ephemera policy approve {0}`",
            p.id
        )),
        _ => {}
    }
    t
}

fn version_json(v: &pb::PolicyVersion) -> Value {
    json!({
        "version": v.version, "active": v.active, "sha256": v.sha256,
        "activated_at": fmt_time(v.activated_at_ms), "proposal_id": v.proposal_id,
        "proposer": v.proposer, "approvers": v.approvers,
    })
}

fn version_line(v: &pb::PolicyVersion) -> String {
    format!(
        "v{}{} {} by {}{}{} sha256 {}",
        v.version,
        if v.active { " (active)" } else { "" },
        fmt_time(v.activated_at_ms),
        v.proposer,
        if v.approvers.is_empty() {
            String::new()
        } else {
            format!(", approved by {}", v.approvers.join(", "))
        },
        if v.proposal_id.is_empty() {
            String::new()
        } else {
            format!(" ({})", v.proposal_id)
        },
        &v.sha256[..v.sha256.len().min(16)]
    )
}

/// A review of `new` against `old`: which policies (by `@id`) are added, removed or changed,
/// then a unified diff of the source.
fn review(old_label: &str, old: &str, new_label: &str, new: &str) -> Result<(Value, String)> {
    let compile = |text: &str, what: &str| {
        PolicyBook::compile(text, 0).map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let d = ephemera_policy::diff(&compile(old, old_label)?, &compile(new, new_label)?);
    let unified = similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_label, new_label)
        .to_string();
    let mut text = String::new();
    for (what, ids) in [
        ("added", &d.added),
        ("removed", &d.removed),
        ("changed", &d.changed),
    ] {
        if !ids.is_empty() {
            text.push_str(&format!("{what}: {}\n", ids.join(", ")));
        }
    }
    if text.is_empty() {
        text.push_str("no policy changes\n");
    }
    text.push('\n');
    text.push_str(&unified);
    Ok((
        json!({"added": d.added, "removed": d.removed, "changed": d.changed, "unified": unified}),
        text,
    ))
}

pub async fn run(cli: &Cli, cmd: &PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Validate { files } => {
            let text = read_policy(files)?;
            let book = PolicyBook::compile(&text, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
            let ids = book.policy_ids().to_vec();
            print(cli.output, json!({"valid": true, "policies": ids}), || {
                format!("valid: {} policies ({})", ids.len(), ids.join(", "))
            });
            return Ok(());
        }
        PolicyCmd::Schema => {
            print!("{SCHEMA_TEXT}");
            return Ok(());
        }
        _ => {}
    }
    let c = client(cli)?;
    match cmd {
        PolicyCmd::Propose { files, comment } => {
            let text = read_policy(files)?;
            // The node validates too; checking here first gives the message without a round trip.
            PolicyBook::compile(&text, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
            let p = c
                .admin_call(
                    pb::ProposePolicyRequest {
                        text,
                        comment: comment.clone(),
                    },
                    |mut a, r| async move { a.propose_policy(r).await },
                )
                .await?;
            print(cli.output, proposal_json(&p), || proposal_text(&p));
        }
        PolicyCmd::Approve { proposal_id } => {
            let p = c
                .admin_call(
                    pb::ApprovePolicyRequest {
                        proposal_id: proposal_id.clone(),
                    },
                    |mut a, r| async move { a.approve_policy(r).await },
                )
                .await?;
            print(cli.output, proposal_json(&p), || proposal_text(&p));
        }
        PolicyCmd::Reject {
            proposal_id,
            reason,
        } => {
            let p = c
                .admin_call(
                    pb::RejectPolicyRequest {
                        proposal_id: proposal_id.clone(),
                        reason: reason.clone(),
                    },
                    |mut a, r| async move { a.reject_policy(r).await },
                )
                .await?;
            print(cli.output, proposal_json(&p), || proposal_text(&p));
        }
        PolicyCmd::Show { version } => {
            let v = get_version(&c, *version).await?;
            let mut j = version_json(&v);
            j["text"] = json!(v.text);
            print(cli.output, j, || {
                format!("// {}\n{}", version_line(&v), v.text)
            });
        }
        PolicyCmd::History => {
            let h = c
                .admin_call(pb::ListPolicyHistoryRequest {}, |mut a, r| async move {
                    a.list_policy_history(r).await
                })
                .await?;
            print(
                cli.output,
                json!(h.versions.iter().map(version_json).collect::<Vec<_>>()),
                || {
                    h.versions
                        .iter()
                        .map(version_line)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        PolicyCmd::List { all } => {
            let l = c
                .admin_call(
                    pb::ListPolicyProposalsRequest {
                        include_closed: *all,
                    },
                    |mut a, r| async move { a.list_policy_proposals(r).await },
                )
                .await?;
            print(
                cli.output,
                json!(l.proposals.iter().map(proposal_json).collect::<Vec<_>>()),
                || {
                    if l.proposals.is_empty() {
                        return "no pending proposals".into();
                    }
                    l.proposals
                        .iter()
                        .map(proposal_text)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        PolicyCmd::Diff {
            proposal_id,
            from,
            to,
        } => {
            let (old_label, old, new_label, new) = match (proposal_id, from, to) {
                (Some(id), None, None) => {
                    let p = c
                        .admin_call(
                            pb::GetPolicyProposalRequest {
                                proposal_id: id.clone(),
                            },
                            |mut a, r| async move { a.get_policy_proposal(r).await },
                        )
                        .await?;
                    let base = get_version(&c, Some(p.base_version)).await?;
                    (
                        format!("v{}", base.version),
                        base.text,
                        format!("proposal {id}"),
                        p.text,
                    )
                }
                (None, Some(from), Some(to)) => {
                    let (a, b) = (
                        get_version(&c, Some(*from)).await?,
                        get_version(&c, Some(*to)).await?,
                    );
                    (format!("v{from}"), a.text, format!("v{to}"), b.text)
                }
                _ => bail!("give a proposal id, or --from and --to versions"),
            };
            let (j, text) = review(&old_label, &old, &new_label, &new)?;
            print(cli.output, j, || text);
        }
        PolicyCmd::Validate { .. } | PolicyCmd::Schema => unreachable!("handled above"),
    }
    Ok(())
}

async fn get_version(
    c: &ephemera_client::Client,
    version: Option<u64>,
) -> Result<pb::PolicyVersion> {
    Ok(
        c.admin_call(pb::GetPolicyRequest { version }, |mut a, r| async move {
            a.get_policy(r).await
        })
        .await?,
    )
}
