//! Node-local counters, exported in Prometheus text format by `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    pub issued: AtomicU64,
    pub renewed: AtomicU64,
    pub revoke_calls: AtomicU64,
    pub leases_revoked: AtomicU64,
    pub introspections: AtomicU64,
    pub forwarded: AtomicU64,
    /// Log entries this node wrote as leader for clients' commands, and the commands in them
    /// (their ratio is the group commit's mean batch size).
    pub leader_entries: AtomicU64,
    pub leader_commands: AtomicU64,
    pub auth_failures: AtomicU64,
    pub denials_unaudited: AtomicU64,
    pub policy_allowed: AtomicU64,
    pub policy_denied: AtomicU64,
    pub guard_refusals: AtomicU64,
    /// External effects (database logins) this node executed as leader, by outcome.
    pub effects_done: AtomicU64,
    pub effects_failed: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn policy_decision(&self, allowed: bool) {
        let counter = if allowed {
            &self.policy_allowed
        } else {
            &self.policy_denied
        };
        Self::inc(counter, 1);
    }

    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .expect("metrics lock")
            .entry(kind)
            .or_default() += 1;
    }

    pub fn render(&self, out: &mut String) {
        let counters = [
            (
                "ephemera_credentials_issued_total",
                &self.issued,
                "Credentials issued by this node",
            ),
            (
                "ephemera_credentials_renewed_total",
                &self.renewed,
                "Renewals served by this node",
            ),
            (
                "ephemera_revoke_requests_total",
                &self.revoke_calls,
                "Revoke requests served by this node",
            ),
            (
                "ephemera_leases_revoked_total",
                &self.leases_revoked,
                "Leases revoked through this node",
            ),
            (
                "ephemera_introspections_total",
                &self.introspections,
                "Introspections served by this node",
            ),
            (
                "ephemera_forwarded_total",
                &self.forwarded,
                "Writes forwarded to the leader",
            ),
            (
                "ephemera_leader_entries_total",
                &self.leader_entries,
                "Log entries written as leader for commands (group commit)",
            ),
            (
                "ephemera_leader_commands_total",
                &self.leader_commands,
                "Commands written as leader, in those entries",
            ),
            (
                "ephemera_auth_failures_total",
                &self.auth_failures,
                "Refused authentications",
            ),
            (
                "ephemera_auth_denials_unaudited_total",
                &self.denials_unaudited,
                "Refused authentications and policy denials not written to the audit chain (rate limit)",
            ),
            (
                "ephemera_policy_allowed_total",
                &self.policy_allowed,
                "Workload requests policy permitted on this node",
            ),
            (
                "ephemera_policy_denied_total",
                &self.policy_denied,
                "Workload requests policy refused on this node",
            ),
            (
                "ephemera_guard_refusals_total",
                &self.guard_refusals,
                "Requests the leader refused by a cluster-wide limit or storm mitigation",
            ),
            (
                "ephemera_effects_done_total",
                &self.effects_done,
                "External effects (create, extend, drop a database login) this node completed as leader",
            ),
            (
                "ephemera_effects_failed_total",
                &self.effects_failed,
                "Attempts at external effects that failed on this node (each is retried)",
            ),
        ];
        for (name, c, help) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP ephemera_request_errors_total Refused requests by error kind\n# TYPE ephemera_request_errors_total counter");
        for (kind, n) in self.errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "ephemera_request_errors_total{{kind=\"{kind}\"}} {n}");
        }
    }
}
