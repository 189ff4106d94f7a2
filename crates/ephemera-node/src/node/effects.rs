//! The leader's effect executor: it runs the external effects the state records (create a
//! PostgreSQL login, extend it, drop it; see `ephemera_core::state::effects`) and commits each
//! outcome back through Raft.
//!
//! **The problem.** An effect happens outside the cluster, where Raft's guarantees do not
//! reach: the database may be down, the leader may crash halfway through, and a leader that
//! has just been deposed may still be talking to the database while its successor starts on
//! the same lease. The dangerous interleaving is a previous leader's create (or extend)
//! landing *after* the new leader's drop: the drop is settled, the login exists again, and
//! nothing would ever remove it before its `VALID UNTIL`.
//!
//! **The cost.** One database round trip per effect (a connection, a handful of statements),
//! plus one leadership confirmation (a quorum heartbeat, shared with concurrent read barriers)
//! and one Raft write to settle it. Effects of one target (database) run at most
//! [`PER_TARGET_CONCURRENCY`] at a time, in their own task, so a database that is down only
//! delays its own effects. Finding them costs nothing while nothing is due: a target's worker
//! reads its backlog in pages of [`BATCH`], then sleeps until the earliest retry time it saw;
//! when woken by a new command it reads only the effects recorded since its last look (one
//! index read), and it reads the whole backlog again at most every [`RETRY_FIRST`] while it
//! is running effects (the soonest any of them can be due again).
//!
//! **The invariants.**
//! 1. Only the leader executes, and only after confirming its leadership with a quorum
//!    (`read_barrier`, a round that starts after the attempt did) and re-reading the effect:
//!    it must still await exactly this attempt. The settle names the attempt, so a duplicate
//!    or a deposed leader's late report changes nothing (`state::effects::settle`).
//! 2. Every attempt ends within [`ATTEMPT_DEADLINE`], counted from *before* that
//!    confirmation: on the client (a timeout), and on the server (`statement_timeout`,
//!    `lock_timeout` and `idle_in_transaction_session_timeout` on the session). A timer in
//!    this process is not enough, because the process may be stopped (SIGSTOP, a stalled VM)
//!    and resume after the deadline with its next statement ready to send; so a create, an
//!    extend (which could move a validity back) and a root rotation commit only under a fence
//!    the *server* checks, in the same message as their `COMMIT`: the server's clock must not
//!    have passed "the server's time when the fence was set, plus what then remained of the
//!    deadline on this machine's monotonic clock". No clock has to agree with another; only
//!    their rates must (`ephemera_postgres`'s `commit_fence`). A drop is not fenced: landing
//!    late, it removes a login whose lease is already over.
//! 3. A new leader runs drops and extends only once it has led for [`HOLD_OFF`] (more than
//!    one attempt deadline). Why that suffices: a previous leader's attempt was confirmed by a
//!    quorum that answered heartbeats sent after the attempt began; this node's election
//!    needed a quorum of votes, and one voter is in both, which answered the old term before
//!    voting in the new one. So every attempt of an earlier term began before this node became
//!    leader, and has ended (invariant 2) by the time the hold-off is over. Creates are not
//!    held: two concurrent creates of one login are idempotent (the later one fails and is
//!    retried, or resets the same password), and a create can never overtake its own drop
//!    because only the oldest pending effect of a lease runs.
//!
//!    What remains: a database whose own process stalls between checking the fence and
//!    committing (a frozen host). Its login still expires at its `VALID UNTIL` (the lease's
//!    expiry); this is the one case the design bounds by time rather than excludes.
//! 4. The admin password is unsealed only for one attempt here, and for one request at the
//!    node that receives a connection put or a root rotation (`crate::db`); error texts never
//!    carry it (`ephemera-postgres` scrubs them). The issued password is derived from the KEK
//!    and the lease id, as the answering node derives it, and only its SCRAM verifier is sent
//!    to the database.
//! 5. An admin password pending in a root rotation is promoted only on proof that the database
//!    takes it: an attempt with it succeeded, or the server answered in a session it opened.

use std::collections::HashMap;
use std::sync::Arc;

use ephemera_core::kind::{postgres, Grant, RoleSpec};
use ephemera_core::state::effects::{self as fx, Effect, EffectAction, EffectStatus};
use ephemera_core::state::DbConnection;
use ephemera_core::types::Lease;
use ephemera_core::StorageError;
use ephemera_postgres as pg;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::*;

/// The longest one attempt at an effect may take, from before its leadership confirmation to
/// its last statement.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(8);
/// How long a new leader waits before it drops or extends anything (invariant 3).
pub const HOLD_OFF: Duration = Duration::from_secs(10);
/// An attempt that has less than this left after its leadership confirmation is not made (and
/// not counted as a failure): it could only time out.
const MIN_ATTEMPT_TIME: Duration = Duration::from_secs(1);
/// How often the dispatcher looks for targets with pending effects and no worker, besides
/// being woken.
const DISPATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Pending effects one worker reads per page, and so runs at most per round.
const BATCH: usize = 32;
const PER_TARGET_CONCURRENCY: usize = 4;
/// The soonest an effect that has just run can be due again (half the first retry delay, the
/// least jitter gives), so the soonest a worker needs to read its backlog again after running.
const RETRY_FIRST: Duration = Duration::from_millis(fx::RETRY_FIRST_MS / 2);
/// The longest a worker sleeps without reading its backlog (a retry time can be at most this
/// far away; this bounds the effect of a clock step).
const LONGEST_SLEEP: Duration = Duration::from_millis(fx::RETRY_LONGEST_MS);
/// How long a worker waits before it tries again to settle an outcome Raft did not take.
const SETTLE_BACKOFF: Duration = Duration::from_secs(1);
/// Targets served at once (a cluster has a few database connections; this bounds the tasks).
const MAX_TARGETS: usize = 256;

/// The executor's node-local state: the workers by target, and the term this node leads.
pub struct Executor {
    wake: Notify,
    /// Bumped with every wake, so that sleeping workers look for new effects (a `watch`, so a
    /// wake while a worker is busy is seen when it next waits).
    recorded: tokio::sync::watch::Sender<u64>,
    workers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// The term this node leads and when it first saw itself leading it.
    leading: Mutex<Option<(u64, Instant)>>,
}

impl Default for Executor {
    fn default() -> Self {
        Executor {
            wake: Notify::new(),
            recorded: tokio::sync::watch::channel(0).0,
            workers: Mutex::default(),
            leading: Mutex::default(),
        }
    }
}

impl Executor {
    /// New effects may be due: look now rather than at the next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
        self.recorded.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn stop_all(&self) {
        for (_, w) in self.workers.lock().expect("executor lock").drain() {
            // An aborted attempt drops its database connection: an open transaction is rolled
            // back by the server.
            w.abort();
        }
    }
}

/// What one round of a worker found.
#[derive(Default)]
struct Round {
    /// The highest seq read.
    high: u64,
    /// Whether any effect is pending at the target.
    pending: bool,
    /// The earliest retry time seen (leader's clock, ms).
    next_ms: Option<u64>,
    ran: bool,
    /// An outcome Raft did not take.
    unsettled: bool,
    /// A drop or extend waited out the hold-off.
    held: bool,
}

/// Whether a command can record or unblock an effect (the executor is woken after it).
pub(super) fn may_record_effects(op: &Op) -> bool {
    matches!(
        op,
        Op::Issue { .. }
            | Op::Renew { .. }
            | Op::Revoke(_)
            | Op::Expire { .. }
            | Op::GuardEvent(_)
            | Op::SettleEffect { .. }
            | Op::SettleRootPassword { .. }
    )
}

/// Runs the dispatcher until `stop`: every [`DISPATCH_INTERVAL`], or when woken, it starts a
/// worker for each target with pending effects that has none.
pub fn spawn(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = node.effects.wake.notified() => {}
                _ = tokio::time::sleep(DISPATCH_INTERVAL) => {}
            }
            node.dispatch_effects();
        }
        node.effects.stop_all();
    })
}

/// What one attempt does at the database (owned, so the attempt can retry it with the other
/// admin password).
enum Job {
    Create {
        spec: postgres::Spec,
        name: String,
        password: zeroize::Zeroizing<String>,
        valid_until_ms: u64,
    },
    Extend {
        renew: Vec<String>,
        name: String,
        valid_until_ms: u64,
    },
    Drop {
        revocation: Vec<String>,
        terminate_sessions: bool,
        name: String,
    },
}

impl Job {
    async fn run(&self, c: &pg::Connection, deadline: Duration) -> Result<(), pg::Error> {
        let none: &[String] = &[];
        match self {
            Job::Create {
                spec,
                name,
                password,
                valid_until_ms,
            } => {
                let st = pg::Statements {
                    creation: &spec.creation_statements,
                    revocation: none,
                    renew: none,
                    terminate_sessions: spec.terminate_sessions,
                };
                pg::create_login(c, &st, name, password, *valid_until_ms, deadline).await
            }
            Job::Extend {
                renew,
                name,
                valid_until_ms,
            } => {
                let st = pg::Statements {
                    creation: none,
                    revocation: none,
                    renew,
                    terminate_sessions: false,
                };
                pg::extend_login(c, &st, name, *valid_until_ms, deadline).await
            }
            Job::Drop {
                revocation,
                terminate_sessions,
                name,
            } => {
                let st = pg::Statements {
                    creation: none,
                    revocation,
                    renew: none,
                    terminate_sessions: *terminate_sessions,
                };
                pg::drop_login(c, &st, name, deadline).await
            }
        }
    }
}

impl Node {
    /// Whether this node still leads `term`.
    fn leads(&self, term: u64) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.current_term == term
    }

    fn dispatch_effects(self: &Arc<Self>) {
        let (leader, term) = {
            let m = self.raft.metrics().borrow().clone();
            (
                m.state == ServerState::Leader && m.current_leader == Some(self.id),
                m.current_term,
            )
        };
        if !leader {
            *self.effects.leading.lock().expect("executor lock") = None;
            self.effects.stop_all();
            return;
        }
        let since = {
            let mut leading = self.effects.leading.lock().expect("executor lock");
            match *leading {
                Some((t, since)) if t == term => since,
                _ => {
                    // A new term: workers of an earlier one (if any) must not go on.
                    self.effects.stop_all();
                    let now = Instant::now();
                    *leading = Some((term, now));
                    now
                }
            }
        };
        let targets = match fx::targets_with_pending(&self.view) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "reading the targets with pending effects failed");
                return;
            }
        };
        let mut workers = self.effects.workers.lock().expect("executor lock");
        workers.retain(|_, w| !w.is_finished());
        for target in targets {
            if workers.len() >= MAX_TARGETS {
                tracing::warn!(limit = MAX_TARGETS, "too many effect targets; some wait");
                break;
            }
            if workers.contains_key(&target) {
                continue;
            }
            let node = self.clone();
            let t = target.clone();
            workers.insert(
                target,
                tokio::spawn(async move { node.run_target(t, term, since).await }),
            );
        }
    }

    /// One target's worker, for as long as this node leads `term` and the target has pending
    /// effects: it runs what is due, then sleeps until the earliest retry time it saw or until
    /// woken by a new command, when it reads only the effects recorded since it last looked.
    async fn run_target(self: Arc<Self>, target: String, term: u64, since: Instant) {
        let held_until = since + HOLD_OFF;
        let mut recorded = self.effects.recorded.subscribe();
        // The highest seq read so far: a wake reads only what follows it.
        let mut high = 0u64;
        // Whether the next round reads the whole backlog (else only what follows `high`), and
        // when the whole backlog is next read.
        let mut whole = true;
        let mut next_whole = Instant::now();
        loop {
            if !self.leads(term) {
                return;
            }
            recorded.borrow_and_update();
            let from = if whole { 0 } else { high };
            let round = match self.run_round(&target, term, from, held_until).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%target, error = %e, "reading due effects failed");
                    return;
                }
            };
            high = high.max(round.high);
            if whole && !round.pending {
                return; // nothing pending: the dispatcher starts a worker when there is
            }
            let at = self.look_again_at(&round, held_until);
            next_whole = if whole { at } else { next_whole.min(at) };
            tokio::select! {
                _ = tokio::time::sleep_until(next_whole) => whole = true,
                changed = recorded.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    whole = false;
                }
            }
        }
    }

    /// When a worker reads its whole backlog again after `round`: at the earliest retry time
    /// it saw, soon after running anything (an outcome may be a retry), at the end of the
    /// hold-off when something waited for it, and at least every [`LONGEST_SLEEP`].
    fn look_again_at(&self, round: &Round, held_until: Instant) -> Instant {
        let now = Instant::now();
        let mut at = now + LONGEST_SLEEP;
        if let Some(ms) = round.next_ms {
            at = at.min(now + Duration::from_millis(ms.saturating_sub(self.stamp_time())));
        }
        if round.ran {
            at = at.min(
                now + if round.unsettled {
                    SETTLE_BACKOFF
                } else {
                    RETRY_FIRST
                },
            );
        }
        if round.held {
            at = at.min(held_until);
        }
        at
    }

    /// Reads `target`'s pending effects after seq `after`, page by page, running those due.
    async fn run_round(
        self: &Arc<Self>,
        target: &str,
        term: u64,
        after: u64,
        held_until: Instant,
    ) -> Result<Round, StorageError> {
        let mut round = Round {
            high: after,
            ..Round::default()
        };
        let mut after = after;
        loop {
            let page = fx::due(&self.view, target, self.stamp_time(), after, BATCH)?;
            round.pending |= page.last_seq.is_some();
            if let Some(ms) = page.next_ms {
                round.next_ms = Some(round.next_ms.map_or(ms, |n| n.min(ms)));
            }
            // Drops and extends wait out a new leader's hold-off (invariant 3).
            let holding = Instant::now() < held_until;
            let (ready, held): (Vec<Effect>, Vec<Effect>) = page
                .ready
                .into_iter()
                .partition(|e| !holding || matches!(e.action, EffectAction::Create { .. }));
            round.held |= !held.is_empty();
            if !ready.is_empty() {
                round.ran = true;
                let settled = futures::stream::iter(ready)
                    .map(|e| {
                        let node = self.clone();
                        async move { node.attempt(e, term).await }
                    })
                    .buffer_unordered(PER_TARGET_CONCURRENCY)
                    .fold(true, |all, one| async move { all && one })
                    .await;
                round.unsettled |= !settled;
            }
            if let Some(last) = page.last_seq {
                round.high = round.high.max(last);
                after = last;
            }
            if !page.more || !self.leads(term) {
                return Ok(round);
            }
        }
    }

    /// One attempt at `e`, settled through Raft unless leadership was lost; whether nothing is
    /// left to retry soon (false: an outcome Raft did not take, to be tried again after
    /// [`SETTLE_BACKOFF`]).
    async fn attempt(&self, e: Effect, term: u64) -> bool {
        let started = Instant::now();
        // Invariant 1: a quorum confirms this node leads, in a round that began after
        // `started`, and the state read afterwards holds everything committed before.
        if self.read_barrier().await.is_err() || !self.leads(term) {
            return false;
        }
        match fx::effect(&self.view, e.seq) {
            Ok(Some(now)) if now.status == EffectStatus::Pending && now.attempts == e.attempts => {}
            _ => return true,
        }
        let outcome = match self.prepare(&e) {
            Ok((job, conn)) => {
                let remaining = ATTEMPT_DEADLINE.saturating_sub(started.elapsed());
                if remaining < MIN_ATTEMPT_TIME {
                    // The confirmation took the attempt's time: try again, not a failure.
                    tracing::debug!(seq = e.seq, "no time left for the attempt; it waits");
                    return false;
                }
                self.run_job(&job, &conn, remaining)
                    .await
                    .map_err(|err| err.to_string())
            }
            Err(why) => Err(why),
        };
        if !self.leads(term) {
            return false;
        }
        let counter = match &outcome {
            Ok(()) => &self.metrics.effects_done,
            Err(_) => &self.metrics.effects_failed,
        };
        Metrics::inc(counter, 1);
        match &outcome {
            Ok(()) => tracing::info!(
                seq = e.seq, lease = %e.lease_id, target = %e.target,
                effect = e.action.name(), "external effect done"
            ),
            Err(why) => tracing::warn!(
                seq = e.seq, lease = %e.lease_id, target = %e.target,
                effect = e.action.name(), attempt = e.attempts + 1, error = %why,
                "external effect failed; it will be retried"
            ),
        }
        let jitter = {
            let mut b = [0u8; 2];
            self.fill_random(&mut b);
            u16::from_le_bytes(b) % 1001
        };
        let cmd = fx::settle_command(&e, outcome.err(), self.stamp_time(), jitter);
        match self.write_as_leader(cmd).await {
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Ok(_), .. })) => true,
            // Another report settled it first (a duplicate), or it was superseded or
            // abandoned meanwhile: nothing to retry.
            LeaderAttempt::Done(Ok(ForwardReply::Applied {
                result: Err(err), ..
            })) => {
                tracing::info!(seq = e.seq, error = %err, "an effect's outcome was not needed");
                true
            }
            LeaderAttempt::Done(Err(err)) => {
                tracing::warn!(seq = e.seq, error = %err, "settling an external effect failed");
                false
            }
            _ => false,
        }
    }

    /// What `e` does, and where. An `Err` is the attempt's failure, recorded and retried.
    fn prepare(&self, e: &Effect) -> Result<(Job, DbConnection), String> {
        let lease: Lease = state::get_lease(&self.view, &e.lease_id)
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("lease {} is not in the state", e.lease_id))?;
        let Grant::Postgres(g) = &lease.grant else {
            return Err(format!("lease {} has no external credential", e.lease_id));
        };
        let conn = state::db_connection(&self.view, &g.connection)
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("database connection {:?} does not exist", g.connection))?;
        // The role as it is now; a deleted role still has its logins extended and dropped,
        // with the default statements.
        let spec = match state::get_role(&self.view, &lease.role) {
            Ok(Some(role)) => match role.spec {
                RoleSpec::Postgres(s) if s.connection == g.connection => Some(s),
                _ => None,
            },
            Ok(None) => None,
            Err(err) => return Err(err.to_string()),
        };
        let name = g.username.clone();
        let job = match &e.action {
            EffectAction::Create { valid_until_ms } => Job::Create {
                spec: spec.ok_or_else(|| {
                    format!(
                        "role {:?} no longer creates logins on {:?}",
                        lease.role, g.connection
                    )
                })?,
                password: postgres::password(&self.kek, &lease.id, &g.password),
                name,
                valid_until_ms: *valid_until_ms,
            },
            EffectAction::Extend { valid_until_ms } => Job::Extend {
                renew: spec.map(|s| s.renew_statements).unwrap_or_default(),
                name,
                valid_until_ms: *valid_until_ms,
            },
            EffectAction::Drop => {
                let (revocation, terminate_sessions) = spec
                    .map(|s| (s.revocation_statements, s.terminate_sessions))
                    .unwrap_or((Vec::new(), true));
                Job::Drop {
                    revocation,
                    terminate_sessions,
                    name,
                }
            }
        };
        Ok((job, conn))
    }

    /// Runs `job` as the connection's admin. When the database refuses the password and a root
    /// rotation is pending, the pending password is tried, and promoted when the database
    /// proves it takes it (invariant 5): the rotation's `ALTER ROLE` ran but its last step was
    /// lost.
    async fn run_job(
        &self,
        job: &Job,
        conn: &DbConnection,
        deadline: Duration,
    ) -> Result<(), pg::Error> {
        let started = Instant::now();
        let first = self.pg_connection(conn, &conn.sealed_password)?;
        match job.run(&first, deadline).await {
            Err(pg::Error::Authentication { target }) => {
                let Some(pending) = &conn.pending_sealed_password else {
                    return Err(pg::Error::Authentication { target });
                };
                let second = self.pg_connection(conn, pending)?;
                let result = job
                    .run(&second, deadline.saturating_sub(started.elapsed()))
                    .await;
                let taken = match &result {
                    Ok(()) => true,
                    Err(e) => e.session_was_open(),
                };
                if taken {
                    self.promote_root(conn, pending).await;
                }
                result
            }
            other => other,
        }
    }

    /// The leader settles a root rotation whose pending password the database takes.
    async fn promote_root(&self, conn: &DbConnection, pending: &[u8]) {
        let cmd = Command {
            now_ms: self.stamp_time(),
            actor: Principal::system(),
            op: Op::SettleRootPassword {
                name: conn.name.clone(),
                pending: pending.to_vec(),
                promote: true,
            },
        };
        match self.write_as_leader(cmd).await {
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Ok(_), .. })) => {
                tracing::info!(connection = %conn.name, "finished an interrupted root rotation");
            }
            LeaderAttempt::Done(Ok(ForwardReply::Applied { result: Err(e), .. }))
            | LeaderAttempt::Done(Err(e)) => {
                tracing::warn!(connection = %conn.name, error = %e, "settling a root rotation failed");
            }
            _ => {}
        }
    }

    /// The connection `conn` with the admin password `sealed`, unsealed for one attempt.
    pub(crate) fn pg_connection(
        &self,
        conn: &DbConnection,
        sealed: &[u8],
    ) -> Result<pg::Connection, pg::Error> {
        let unsealed = ephemera_core::crypto::unseal_secret(
            &self.kek,
            &state::password_aad(&conn.name),
            sealed,
        )
        .ok()
        .and_then(|p| String::from_utf8(p.to_vec()).ok())
        .ok_or_else(|| pg::Error::Connect {
            target: format!("{}:{}/{}", conn.host, conn.port, conn.database),
            message: "the connection's sealed password does not unseal with this KEK".into(),
        })?;
        Ok(pg::Connection {
            host: conn.host.clone(),
            port: conn.port,
            database: conn.database.clone(),
            user: conn.user.clone(),
            password: zeroize::Zeroizing::new(unsealed),
            sslmode: conn.sslmode,
            ca_pem: conn.ca_pem.clone(),
        })
    }

    /// Waits until the login of `lease` is current at its database: no create or extend of it
    /// pending (each answer carries a credential that works). A credential with no external
    /// part is current at once.
    pub(crate) async fn await_login(&self, lease: &Lease) -> Result<(), Error> {
        if lease.grant.external_target().is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + self.request_timeout;
        let mut applied = self.raft.metrics();
        loop {
            let effects = fx::effects_of_lease(&self.view, &lease.id).map_err(internal)?;
            let waiting = effects.iter().find(|e| {
                e.status == EffectStatus::Pending && !matches!(e.action, EffectAction::Drop)
            });
            let Some(waiting) = waiting else {
                return match effects.iter().find(|e| e.action == EffectAction::Drop) {
                    Some(_) => Err(Error::LeaseRevoked(lease.id.clone())),
                    None => Ok(()),
                };
            };
            let gave_up = waiting.attempts >= fx::FAILED_AFTER_ATTEMPTS;
            if !gave_up {
                match tokio::time::timeout_at(deadline, applied.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return Err(Error::Unavailable("the node is stopping".into())),
                    Err(_) => {}
                }
            }
            let last = waiting
                .last_error
                .as_deref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Err(Error::Unavailable(
                if matches!(waiting.action, EffectAction::Create { .. }) {
                    format!(
                        "lease {} is issued but its login is not created yet{last}; ask again \
                         with the same request_id to receive it once it is, or revoke the lease",
                        lease.id
                    )
                } else {
                    format!(
                        "lease {} is renewed but its login's validity is not moved yet{last}; \
                         the cluster keeps trying",
                        lease.id
                    )
                },
            ));
        }
    }
}
