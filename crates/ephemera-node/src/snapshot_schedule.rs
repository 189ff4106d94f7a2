//! When this node builds its next snapshot.
//!
//! **The problem.** openraft's policy counts log entries, and group commit puts many commands
//! in one entry: under load a million issuances fit in about 55,000 entries, the log was never
//! purged, and sled's recovery at the next start grew from 8 s to 22 s (`benches/large-state`).
//! Counting commands instead fixes that, but every node applies the same commands, so every
//! node reached the threshold at the same moment and all three built a snapshot at once. A
//! build copies the whole state; on the two-core test machine three concurrent builds took the
//! CPU the requests needed: issuance in an open loop at 1,400/s with a snapshot every 20,000
//! commands had a p99 of 846 ms (p50 97 ms), against 102 ms (p50 18 ms) with none.
//!
//! **The rule.** A node asks for a snapshot once `every` commands, or `every` log entries,
//! have been applied since its last snapshot (built or installed). The first threshold after
//! start is longer by a fraction of `every` that depends on the node id (0, 1/5, ... 4/5), so
//! nodes with consecutive ids build at different times, and keep doing so: each resets when
//! its own snapshot lands, and all apply at the same pace. openraft's own policy is off.
//!
//! **Invariant.** At most `every * 9 / 5` commands and entries are applied between two
//! snapshot requests (so the log stays bounded as before, within a factor), and a request is
//! made at most once per threshold crossing.

/// Counters of one node, and when it next asks for a snapshot.
#[derive(Debug)]
pub struct SnapshotSchedule {
    every: u64,
    threshold: u64,
    base_commands: u64,
    base_index: u64,
    last_snapshot: Option<u64>,
}

impl SnapshotSchedule {
    /// `commands`: the applied-commands counter now; `snapshot_index`: the current snapshot's
    /// last log index, if any.
    pub fn new(every: u64, node_id: u64, commands: u64, snapshot_index: Option<u64>) -> Self {
        let every = every.max(1);
        SnapshotSchedule {
            every,
            threshold: every + every * (node_id.saturating_sub(1) % 5) / 5,
            base_commands: commands,
            base_index: snapshot_index.unwrap_or(0),
            last_snapshot: snapshot_index,
        }
    }

    /// Whether to ask for a snapshot now, given the counters: applied commands, the applied
    /// log index and the current snapshot's index.
    pub fn due(&mut self, commands: u64, applied_index: u64, snapshot_index: Option<u64>) -> bool {
        if snapshot_index != self.last_snapshot {
            // A snapshot landed (built here or installed from the leader): count from it.
            self.last_snapshot = snapshot_index;
            self.base_commands = commands;
            self.base_index = snapshot_index.unwrap_or(0);
            self.threshold = self.every;
            return false;
        }
        let since = commands
            .saturating_sub(self.base_commands)
            .max(applied_index.saturating_sub(self.base_index));
        if since < self.threshold {
            return false;
        }
        // Counted from the request, so a build that takes long is not asked for again.
        self.base_commands = commands;
        self.base_index = applied_index;
        self.threshold = self.every;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes applying the same commands ask at different times, every `every` commands
    /// each, and a snapshot landing (installed or built) restarts the count.
    #[test]
    fn nodes_ask_in_turn_and_count_from_their_last_snapshot() {
        let every = 1000;
        let mut nodes: Vec<SnapshotSchedule> = (1..=3)
            .map(|id| SnapshotSchedule::new(every, id, 0, None))
            .collect();
        let mut asked: Vec<Vec<u64>> = vec![Vec::new(); 3];
        // 10 commands per entry (group commit).
        for commands in (10..=5000).step_by(10) {
            for (i, n) in nodes.iter_mut().enumerate() {
                if n.due(commands, commands / 10, None) {
                    asked[i].push(commands);
                }
            }
        }
        assert_eq!(asked[0], [1000, 2000, 3000, 4000, 5000]);
        assert_eq!(asked[1], [1200, 2200, 3200, 4200]);
        assert_eq!(asked[2], [1400, 2400, 3400, 4400]);

        // Entries count too (one command per entry, or entries with no command at all).
        let mut n = SnapshotSchedule::new(every, 1, 0, None);
        assert!(!n.due(0, 999, None));
        assert!(n.due(0, 1000, None));
        // A snapshot installed from the leader at index 1500: counting starts there.
        assert!(!n.due(10, 1500, Some(1500)));
        assert!(!n.due(500, 2499, Some(1500)));
        assert!(n.due(1010, 2499, Some(1500)));
    }
}
