//! Checks a history and the final state against Ephemera's guarantees. Pure: it reads the
//! recorded history and final state, so corrupted histories can be fed to it in tests.

use std::collections::HashMap;

use serde::Serialize;

use crate::history::{Event, FinalState, Op, Outcome};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: &'static str,
    pub message: String,
    /// Ids of the history events involved.
    pub events: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// How long after its cap a lease may still be reported active: the largest injected clock
    /// offset plus the granularity of token `exp` (seconds).
    pub clock_tolerance_ms: u64,
    /// How soon after healing every node must accept a write.
    pub recovery_bound_ms: u64,
}

fn v(kind: &'static str, message: String, events: Vec<u64>) -> Violation {
    Violation {
        kind,
        message,
        events,
    }
}

pub fn check(history: &[Event], fin: &FinalState, cfg: &CheckConfig) -> Vec<Violation> {
    let mut out = Vec::new();
    let ok = |e: &&Event| e.outcome == Outcome::Ok;

    // Index what was acknowledged, per lease.
    let mut issued: HashMap<&str, &Event> = HashMap::new();
    let mut revoked_ok: HashMap<&str, Vec<&Event>> = HashMap::new();
    let mut revoke_attempted: HashMap<&str, Vec<&Event>> = HashMap::new();
    let mut extended: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in history.iter().filter(ok) {
        match &e.op {
            Op::Issue { .. } => {
                if let Some(id) = e.result.lease_id.as_deref() {
                    issued.insert(id, e);
                    extended.entry(id).or_default().push(e);
                }
            }
            Op::Renew { lease_id } => extended.entry(lease_id).or_default().push(e),
            Op::Revoke { lease_id } => revoked_ok.entry(lease_id).or_default().push(e),
            Op::RevokeSubject { .. } | Op::Introspect { .. } => {}
        }
    }
    for e in history {
        if let (Op::Revoke { lease_id }, Outcome::Ok | Outcome::Unknown { .. }) =
            (&e.op, &e.outcome)
        {
            revoke_attempted.entry(lease_id).or_default().push(e);
        }
    }
    // A bulk revocation of a subject revokes every lease of the subject whose issuance was
    // acknowledged before it began; one issued while it ran may or may not be revoked. One
    // whose outcome is unknown may have revoked any of them.
    for b in history {
        let Op::RevokeSubject { subject } = &b.op else {
            continue;
        };
        if matches!(b.outcome, Outcome::Fail { .. }) {
            continue;
        }
        for (id, i) in &issued {
            let Op::Issue {
                subject: Some(of), ..
            } = &i.op
            else {
                continue;
            };
            if of != subject || i.invoke_ms > b.complete_ms {
                continue;
            }
            revoke_attempted.entry(*id).or_default().push(b);
            if b.outcome == Outcome::Ok && i.complete_ms < b.invoke_ms {
                revoked_ok.entry(*id).or_default().push(b);
            }
        }
    }

    // 1. No acknowledged issuance is lost, and each lease is in the state it should be in.
    for (node, leases) in &fin.leases {
        let Some(leases) = leases else {
            out.push(v(
                "unreadable_node",
                format!("node {node}: final state could not be read"),
                vec![],
            ));
            continue;
        };
        let held: HashMap<&str, _> = leases.iter().map(|l| (l.id.as_str(), l)).collect();
        for (id, e) in &issued {
            match held.get(id) {
                None => out.push(v(
                    "lost_ack",
                    format!("node {node}: acknowledged lease {id} does not exist"),
                    vec![e.id],
                )),
                Some(l) => {
                    if let Some(r) = revoked_ok.get(id) {
                        // Revoking a lease that had already expired is a successful no-op.
                        let expired_first = l.state == "expired"
                            && r.iter()
                                .any(|r| l.expires_at_ms <= r.complete_ms + cfg.clock_tolerance_ms);
                        if l.state != "revoked" && !expired_first {
                            out.push(v(
                                "lost_revoke",
                                format!(
                                    "node {node}: lease {id} was revoked (acknowledged) but is {}",
                                    l.state
                                ),
                                r.iter().map(|e| e.id).collect(),
                            ));
                        }
                    } else if l.state == "revoked" && !revoke_attempted.contains_key(id) {
                        out.push(v(
                            "phantom_revoke",
                            format!("node {node}: lease {id} is revoked but nobody revoked it"),
                            vec![e.id],
                        ));
                    }
                }
            }
        }
        // 3a. No lease outlives its hard cap.
        for l in leases {
            if l.expires_at_ms > l.max_expires_at_ms
                || (fin.role_max_ttl_s > 0
                    && l.max_expires_at_ms > l.issued_at_ms + fin.role_max_ttl_s * 1000)
            {
                out.push(v(
                    "past_cap",
                    format!(
                        "node {node}: lease {} expires at {} beyond its cap {} (issued {})",
                        l.id, l.expires_at_ms, l.max_expires_at_ms, l.issued_at_ms
                    ),
                    issued
                        .get(l.id.as_str())
                        .map(|e| vec![e.id])
                        .unwrap_or_default(),
                ));
            }
        }
    }

    // 2. Revocation is linearizable: an introspection that starts after a revoke was
    // acknowledged never reports the lease active, on any node.
    for e in history.iter().filter(ok) {
        let Op::Introspect { lease_id } = &e.op else {
            continue;
        };
        if e.result.active != Some(true) {
            continue;
        }
        if let Some(revs) = revoked_ok.get(lease_id.as_str()) {
            for r in revs.iter().filter(|r| r.complete_ms < e.invoke_ms) {
                out.push(v(
                    "active_after_revoke",
                    format!(
                        "introspection of {lease_id} on node {} at {} answered active, but its revoke was acknowledged at {} by node {}",
                        e.node, e.invoke_ms, r.complete_ms, r.node
                    ),
                    vec![r.id, e.id],
                ));
            }
        }
        // 3b. ...nor active past its cap (beyond clock tolerance).
        if let Some(cap) = extended
            .get(lease_id.as_str())
            .and_then(|es| es.iter().filter_map(|x| x.result.max_expires_at_ms).max())
        {
            if e.invoke_ms > cap + cfg.clock_tolerance_ms {
                out.push(v(
                    "active_past_cap",
                    format!(
                        "introspection of {lease_id} on node {} at {} answered active after its cap {}",
                        e.node, e.invoke_ms, cap
                    ),
                    vec![e.id],
                ));
            }
        }
    }

    // 3c. A renewal never shortens a lease nor passes the cap.
    for (id, es) in &extended {
        for r in es.iter().filter(|e| matches!(e.op, Op::Renew { .. })) {
            let (Some(exp), Some(cap)) = (r.result.expires_at_ms, r.result.max_expires_at_ms)
            else {
                continue;
            };
            if exp > cap {
                out.push(v(
                    "renew_past_cap",
                    format!("renewal of {id} to {exp} passes its cap {cap}"),
                    vec![r.id],
                ));
            }
            for before in es.iter().filter(|b| b.complete_ms < r.invoke_ms) {
                if let Some(prev) = before.result.expires_at_ms {
                    if exp < prev {
                        out.push(v(
                            "renew_shortened",
                            format!("renewal of {id} set expiry {exp}, earlier than the acknowledged {prev}"),
                            vec![before.id, r.id],
                        ));
                    }
                }
            }
        }
    }

    // 5. Convergence: identical state digests and audit heads, and the chain verifies.
    let digests: Vec<_> = fin
        .digests
        .iter()
        .filter_map(|(n, d)| d.as_ref().map(|d| (n, d)))
        .collect();
    if digests.len() != fin.digests.len() {
        out.push(v(
            "unreadable_node",
            "a node's digest could not be read".into(),
            vec![],
        ));
    }
    if let Some((first_node, first)) = digests.first() {
        for (n, d) in &digests[1..] {
            if d.state_digest != first.state_digest || d.audit_head != first.audit_head {
                out.push(v(
                    "divergence",
                    format!(
                        "node {n} (applied {}, digest {}, audit head {}) differs from node {first_node} (applied {}, digest {}, audit head {})",
                        d.applied_index, d.state_digest, d.audit_head, first.applied_index, first.state_digest, first.audit_head
                    ),
                    vec![],
                ));
            }
        }
    }
    if let Err(reason) = &fin.audit_chain {
        out.push(v(
            "audit_chain",
            format!("the audit chain does not verify: {reason}"),
            vec![],
        ));
    }

    // 6. Recovery: once faults stop, writes succeed through every node within the bound.
    for (node, ms) in &fin.recovery_ms {
        match ms {
            Some(ms) if *ms <= cfg.recovery_bound_ms => {}
            Some(ms) => out.push(v(
                "slow_recovery",
                format!(
                    "node {node} accepted a write only {ms} ms after healing (bound {} ms)",
                    cfg.recovery_bound_ms
                ),
                vec![],
            )),
            None => out.push(v(
                "no_recovery",
                format!("node {node} never accepted a write after healing"),
                vec![],
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{FinalLease, NodeDigest, OpResult};

    fn digest(state: &str) -> Option<NodeDigest> {
        Some(NodeDigest {
            applied_index: 10,
            state_digest: state.into(),
            audit_head: "h".into(),
        })
    }

    fn ev(id: u64, node: u64, op: Op, t: (u64, u64), outcome: Outcome, result: OpResult) -> Event {
        Event {
            id,
            process: 0,
            node,
            op,
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome,
            result,
        }
    }

    fn issue(id: u64, lease: &str, t: (u64, u64)) -> Event {
        ev(
            id,
            1,
            Op::Issue {
                request_id: format!("r{id}"),
                subject: Some("s".into()),
            },
            t,
            Outcome::Ok,
            OpResult {
                lease_id: Some(lease.into()),
                expires_at_ms: Some(t.1 + 5_000),
                max_expires_at_ms: Some(t.1 + 10_000),
                active: None,
            },
        )
    }

    fn lease(id: &str, state: &str, issued: u64) -> FinalLease {
        FinalLease {
            id: id.into(),
            state: state.into(),
            issued_at_ms: issued,
            expires_at_ms: issued + 5_000,
            max_expires_at_ms: issued + 10_000,
        }
    }

    fn healthy(leases: Vec<FinalLease>) -> FinalState {
        FinalState {
            leases: (1..=3).map(|n| (n, Some(leases.clone()))).collect(),
            digests: (1..=3).map(|n| (n, digest("d"))).collect(),
            audit_chain: Ok(10),
            recovery_ms: (1..=3).map(|n| (n, Some(100))).collect(),
            role_max_ttl_s: 10,
        }
    }

    fn cfg() -> CheckConfig {
        CheckConfig {
            clock_tolerance_ms: 1000,
            recovery_bound_ms: 10_000,
        }
    }

    fn kinds(vs: &[Violation]) -> Vec<&'static str> {
        vs.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_consistent_history_passes() {
        let h = vec![
            issue(1, "a", (0, 10)),
            ev(
                2,
                2,
                Op::Revoke {
                    lease_id: "a".into(),
                },
                (20, 30),
                Outcome::Ok,
                OpResult::default(),
            ),
            ev(
                3,
                3,
                Op::Introspect {
                    lease_id: "a".into(),
                },
                (25, 35),
                Outcome::Ok,
                OpResult {
                    active: Some(true),
                    ..Default::default()
                },
            ),
            ev(
                4,
                3,
                Op::Introspect {
                    lease_id: "a".into(),
                },
                (40, 45),
                Outcome::Ok,
                OpResult {
                    active: Some(false),
                    ..Default::default()
                },
            ),
        ];
        let fin = healthy(vec![lease("a", "revoked", 10)]);
        assert_eq!(check(&h, &fin, &cfg()), vec![]);
    }

    /// A bulk revocation of a subject covers the leases acknowledged before it began ("a"); a
    /// lease issued while it ran ("b") may end either way, and its revocation is no phantom.
    #[test]
    fn a_bulk_revocation_covers_the_subjects_earlier_leases() {
        let bulk = ev(
            3,
            2,
            Op::RevokeSubject {
                subject: "s".into(),
            },
            (20, 30),
            Outcome::Ok,
            OpResult::default(),
        );
        let consistent = vec![issue(1, "a", (0, 10)), issue(2, "b", (15, 25)), bulk];
        for b_state in ["revoked", "active"] {
            let fin = healthy(vec![lease("a", "revoked", 10), lease("b", b_state, 25)]);
            assert_eq!(check(&consistent, &fin, &cfg()), vec![], "b {b_state}");
        }
        let mut broken = consistent.clone();
        broken.push(ev(
            4,
            3,
            Op::Introspect {
                lease_id: "a".into(),
            },
            (40, 45),
            Outcome::Ok,
            OpResult {
                active: Some(true),
                ..Default::default()
            },
        ));
        let fin = healthy(vec![lease("a", "active", 10), lease("b", "revoked", 25)]);
        let mut found = kinds(&check(&broken, &fin, &cfg()));
        found.sort();
        assert_eq!(
            found,
            [
                "active_after_revoke",
                "lost_revoke",
                "lost_revoke",
                "lost_revoke"
            ]
        );
    }

    #[test]
    fn a_lost_acknowledgement_is_reported() {
        let h = vec![issue(1, "a", (0, 10)), issue(2, "b", (0, 12))];
        let mut fin = healthy(vec![lease("a", "active", 10), lease("b", "active", 12)]);
        fin.leases[1].1 = Some(vec![lease("a", "active", 10)]);
        let vs = check(&h, &fin, &cfg());
        assert_eq!(kinds(&vs), vec!["lost_ack"]);
        assert_eq!(vs[0].events, vec![2]);
        assert!(vs[0].message.contains("node 2"));
    }

    #[test]
    fn an_active_answer_after_an_acknowledged_revoke_is_reported() {
        let h = vec![
            issue(1, "a", (0, 10)),
            ev(
                2,
                1,
                Op::Revoke {
                    lease_id: "a".into(),
                },
                (20, 30),
                Outcome::Ok,
                OpResult::default(),
            ),
            ev(
                3,
                3,
                Op::Introspect {
                    lease_id: "a".into(),
                },
                (31, 40),
                Outcome::Ok,
                OpResult {
                    active: Some(true),
                    ..Default::default()
                },
            ),
        ];
        let vs = check(&h, &healthy(vec![lease("a", "revoked", 10)]), &cfg());
        assert_eq!(kinds(&vs), vec!["active_after_revoke"]);
        assert_eq!(vs[0].events, vec![2, 3]);
    }

    #[test]
    fn a_lease_past_its_cap_is_reported() {
        let h = vec![
            issue(1, "a", (0, 10)),
            ev(
                2,
                1,
                Op::Renew {
                    lease_id: "a".into(),
                },
                (100, 110),
                Outcome::Ok,
                OpResult {
                    lease_id: Some("a".into()),
                    expires_at_ms: Some(20_000),
                    max_expires_at_ms: Some(10_010),
                    active: None,
                },
            ),
            ev(
                3,
                2,
                Op::Introspect {
                    lease_id: "a".into(),
                },
                (12_000, 12_010),
                Outcome::Ok,
                OpResult {
                    active: Some(true),
                    ..Default::default()
                },
            ),
        ];
        let mut past = lease("a", "active", 10);
        past.expires_at_ms = 20_000;
        let vs = check(&h, &healthy(vec![past]), &cfg());
        let k = kinds(&vs);
        assert!(k.contains(&"past_cap"), "{vs:?}");
        assert!(k.contains(&"active_past_cap"), "{vs:?}");
        assert!(k.contains(&"renew_past_cap"), "{vs:?}");
    }

    #[test]
    fn a_shortening_renewal_divergence_and_no_recovery_are_reported() {
        let h = vec![
            issue(1, "a", (0, 10)),
            ev(
                2,
                1,
                Op::Renew {
                    lease_id: "a".into(),
                },
                (100, 110),
                Outcome::Ok,
                OpResult {
                    lease_id: Some("a".into()),
                    expires_at_ms: Some(3_000),
                    max_expires_at_ms: Some(10_010),
                    active: None,
                },
            ),
        ];
        let mut fin = healthy(vec![lease("a", "active", 10)]);
        fin.digests[2].1 = digest("other");
        fin.recovery_ms[0].1 = None;
        fin.audit_chain = Err("record 7 altered".into());
        let k = kinds(&check(&h, &fin, &cfg()));
        for want in [
            "renew_shortened",
            "divergence",
            "no_recovery",
            "audit_chain",
        ] {
            assert!(k.contains(&want), "{want} missing from {k:?}");
        }
    }

    #[test]
    fn unknown_outcomes_are_not_held_against_the_cluster() {
        // A revoke that timed out may or may not have happened; either final state is fine,
        // and an issue that timed out need not exist.
        let h = vec![
            issue(1, "a", (0, 10)),
            ev(
                2,
                1,
                Op::Revoke {
                    lease_id: "a".into(),
                },
                (20, 30),
                Outcome::Unknown {
                    error: "timeout".into(),
                },
                OpResult::default(),
            ),
            ev(
                3,
                1,
                Op::Issue {
                    request_id: "x".into(),
                    subject: None,
                },
                (20, 30),
                Outcome::Unknown {
                    error: "timeout".into(),
                },
                OpResult::default(),
            ),
        ];
        assert_eq!(
            check(&h, &healthy(vec![lease("a", "revoked", 10)]), &cfg()),
            vec![]
        );
        assert_eq!(
            check(&h, &healthy(vec![lease("a", "active", 10)]), &cfg()),
            vec![]
        );
    }
}
