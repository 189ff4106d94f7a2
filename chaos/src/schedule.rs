//! The nemesis plan: a list of timed faults derived only from a seed, so any run can be
//! replayed with `--seed`. Targets that depend on the live cluster (the leader) are resolved
//! when the step runs.

use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// `kill -9` the current leader; restart it when the step ends.
    KillLeader,
    /// `kill -9` a node; restart it when the step ends.
    KillNode { node: u64 },
    /// SIGSTOP a node; SIGCONT when the step ends.
    Pause { node: u64 },
    /// Cut the listed minority off from the rest, both directions.
    Partition { minority: Vec<u64> },
    /// Cut the current leader off from everyone.
    IsolateLeader,
    /// `from` cannot reach `to`; the reverse direction still works.
    OneWay { from: u64, to: u64 },
    /// Every cluster link delays each chunk by `delay_ms`.
    SlowLinks { delay_ms: u64 },
    /// The link `from` → `to` drops its connection on a chunk with this chance (thousandths).
    FlakyLink {
        from: u64,
        to: u64,
        drop_permille: u16,
    },
    /// Restart a node with its clock shifted; restart it with no shift when the step ends.
    ClockOffset { node: u64, offset_ms: i64 },
    /// Restart every node in turn (SIGTERM, start, wait until it answers).
    RollingRestart,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillLeader => "kill_leader",
            Fault::KillNode { .. } => "kill",
            Fault::Pause { .. } => "pause",
            Fault::Partition { .. } => "partition",
            Fault::IsolateLeader => "isolate_leader",
            Fault::OneWay { .. } => "one_way",
            Fault::SlowLinks { .. } => "slow_links",
            Fault::FlakyLink { .. } => "flaky_link",
            Fault::ClockOffset { .. } => "clock_offset",
            Fault::RollingRestart => "rolling_restart",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Offset from the start of the workload.
    pub at_ms: u64,
    pub duration_ms: u64,
    pub fault: Fault,
}

/// Largest clock shift the plan injects; the checker's tolerance is derived from it.
pub const MAX_CLOCK_OFFSET_MS: i64 = 1500;

/// Faults start after a two-second warm-up, each lasts 1-3 s with 0.5-1.5 s of calm after it,
/// and the last one ends by `run_ms`.
pub fn plan(seed: u64, nodes: u64, run_ms: u64) -> Vec<Step> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node = |rng: &mut rand::rngs::StdRng| rng.gen_range(1..=nodes);
    let minority_size = ((nodes - 1) / 2).max(1) as usize;
    let mut steps = Vec::new();
    let mut t: u64 = 2_000;
    loop {
        let duration_ms = rng.gen_range(1_000..=3_000);
        if t + duration_ms > run_ms {
            break;
        }
        let fault = match rng.gen_range(0..11) {
            0 => Fault::KillLeader,
            1 => Fault::KillNode {
                node: node(&mut rng),
            },
            2 => Fault::Pause {
                node: node(&mut rng),
            },
            3 => {
                let mut all: Vec<u64> = (1..=nodes).collect();
                let mut minority = Vec::new();
                for _ in 0..minority_size {
                    minority.push(all.remove(rng.gen_range(0..all.len())));
                }
                minority.sort();
                Fault::Partition { minority }
            }
            4 => Fault::IsolateLeader,
            5 => {
                let from = node(&mut rng);
                let mut to = node(&mut rng);
                while to == from && nodes > 1 {
                    to = node(&mut rng);
                }
                Fault::OneWay { from, to }
            }
            6 => Fault::SlowLinks {
                delay_ms: rng.gen_range(20..=150),
            },
            7 => Fault::ClockOffset {
                node: node(&mut rng),
                offset_ms: rng.gen_range(-MAX_CLOCK_OFFSET_MS..=MAX_CLOCK_OFFSET_MS),
            },
            8 => Fault::RollingRestart,
            9 => {
                let from = node(&mut rng);
                let to = (from % nodes) + 1;
                Fault::FlakyLink {
                    from,
                    to,
                    drop_permille: rng.gen_range(20..=200),
                }
            }
            _ => Fault::KillLeader,
        };
        steps.push(Step {
            at_ms: t,
            duration_ms,
            fault,
        });
        t += duration_ms + rng.gen_range(500..=1_500);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let a = plan(42, 3, 60_000);
        assert_eq!(a, plan(42, 3, 60_000));
        assert_ne!(a, plan(43, 3, 60_000));
        assert!(a.len() >= 10, "{a:?}");
        assert!(a
            .iter()
            .all(|s| s.at_ms >= 2_000 && s.at_ms + s.duration_ms <= 60_000));
        for s in &a {
            match &s.fault {
                Fault::Partition { minority } => assert_eq!(minority.len(), 1),
                Fault::OneWay { from, to } | Fault::FlakyLink { from, to, .. } => {
                    assert_ne!(from, to)
                }
                Fault::KillNode { node } | Fault::Pause { node } => assert!((1..=3).contains(node)),
                _ => {}
            }
        }
    }
}
