//! Benchmark harness: starts clusters on loopback, drives `ephemera bench` against them and
//! prints what it measured. Run through `benches/compare` and `benches/large-state`, which
//! build it and the `ephemera` binary in release mode first.
//!
//! - `compare`: a 3-node OpenBao cluster (integrated Raft, TLS) and a 3-node Ephemera cluster,
//!   the same workloads at the same concurrency and duration, one table with the ratios; then
//!   `kill -9` of each cluster's leader under light load and the time to the first successful
//!   issuance on a survivor.
//! - `large-state`: one million live leases on a 3-node Ephemera cluster; disk and memory per
//!   node, the time for a restarted node to serve again, and for a new node to install a
//!   snapshot.

mod cluster;
mod compare;
mod large_state;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

fn usage() -> &'static str {
    "usage: harness compare [--concurrency N] [--duration 20s] [--warmup 3s] [--dir DIR] [--bao PATH] [--skip-failover] [--runs N]\n\
     \x20      harness large-state [--leases N] [--concurrency N] [--dir DIR]"
}

/// `--name value` pairs after the subcommand.
pub struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Flags> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let Some(name) = args[i].strip_prefix("--") else {
                bail!("unexpected argument {:?}\n{}", args[i], usage());
            };
            let value = args.get(i + 1).filter(|v| !v.starts_with("--")).cloned();
            i += 1 + usize::from(value.is_some());
            out.push((name.to_string(), value));
        }
        Ok(Flags(out))
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    pub fn number(&self, name: &str, default: u64) -> Result<u64> {
        match self.value(name) {
            Some(v) => v.parse().with_context(|| format!("--{name} {v:?}")),
            None => Ok(default),
        }
    }

    /// Refuses flags the subcommand does not know (a misspelt bound would silently be ignored).
    fn only(&self, known: &[&str]) -> Result<()> {
        for (n, _) in &self.0 {
            if !known.contains(&n.as_str()) {
                bail!("unknown flag --{n}\n{}", usage());
            }
        }
        Ok(())
    }
}

/// The `ephemera` binary built next to this one.
pub fn ephemera_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("harness has no parent directory")?
        .join("ephemera");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p ephemera-cli`)",
            bin.display()
        );
    }
    Ok(bin)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("{}", usage());
    };
    let flags = Flags::parse(&args[1..])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd.as_str() {
        "compare" => {
            flags.only(&[
                "concurrency",
                "duration",
                "warmup",
                "dir",
                "bao",
                "skip-failover",
                "runs",
            ])?;
            rt.block_on(compare::run(&flags))
        }
        "large-state" => {
            flags.only(&["leases", "concurrency", "dir"])?;
            rt.block_on(large_state::run(&flags))
        }
        _ => bail!("unknown command {cmd:?}\n{}", usage()),
    }
}
