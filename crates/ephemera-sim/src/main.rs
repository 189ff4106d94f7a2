//! `ephemera-sim`: runs the deterministic simulation for one seed or a range of seeds.
//!
//! ```text
//! ephemera-sim --seed 42 --output json      # one run, one JSON object
//! ephemera-sim --seeds 1..10000 --jobs 2    # many runs; failures and a summary
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use ephemera_sim::{run, SimOptions, SimReport};

#[derive(Parser)]
#[command(about = "Deterministic simulation of an Ephemera cluster")]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run the seeds `A..B` (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    /// Seeds run at once, each in a thread of its own.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// `json` (one object per run) or `text`.
    #[arg(long, default_value = "text")]
    output: String,
    /// How long faults are injected in each run (simulated ms).
    #[arg(long, default_value_t = SimOptions::default().run_ms)]
    run_ms: u64,
    /// Write the history of a `--seed` run here, one JSON event per line.
    #[arg(long, requires = "seed")]
    history: Option<std::path::PathBuf>,
    /// Partitions drop messages (black holes) instead of holding them.
    #[arg(long)]
    black_holes: bool,
    /// Upper bound on the workload's operations in each run.
    #[arg(long, default_value_t = SimOptions::default().max_ops)]
    max_ops: u64,
}

fn print(report: &SimReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("reports serialise")
        );
    } else {
        println!(
            "seed {}: {} operations ({} acknowledged), {} faults, {} simulated ms, {} violations, history {}",
            report.seed,
            report.operations,
            report.acknowledged,
            report.faults.len(),
            report.simulated_ms,
            report.violations.len(),
            report.history_hash
        );
        for v in &report.violations {
            println!("  {}: {}", v.kind, v.message);
        }
        if !report.violations.is_empty() {
            println!("  replay: {}", report.replay);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs on request only (EPHEMERA_SIM_LOG=info, ...): a run's nodes log to stderr.
    if let Ok(filter) = std::env::var("EPHEMERA_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let json = match args.output.as_str() {
        "json" => true,
        "text" => false,
        other => bail!("--output must be json or text, not {other:?}"),
    };
    let opts = SimOptions {
        run_ms: args.run_ms,
        max_ops: args.max_ops,
        black_holes: args.black_holes,
        ..Default::default()
    };
    let (from, to) = match (args.seed, &args.seeds) {
        (Some(s), _) => (s, s + 1),
        (None, Some(range)) => {
            let (a, b) = range
                .split_once("..")
                .context("--seeds takes A..B, for example 1..10000")?;
            let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
            if a >= b {
                bail!("--seeds {range}: the range is empty");
            }
            (a, b)
        }
        (None, None) => bail!("give --seed N or --seeds A..B"),
    };
    if to - from == 1 {
        let report = run(from, &opts).map_err(|e| anyhow::anyhow!("seed {from}: {e}"))?;
        if let Some(path) = &args.history {
            let lines: Vec<String> = report
                .history
                .iter()
                .map(|e| serde_json::to_string(e).expect("events serialise"))
                .collect();
            std::fs::write(path, lines.join("\n") + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        print(&report, json);
        if !report.violations.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    // Many seeds: each in a process of its own. A run is reproducible only in a fresh process:
    // tokio numbers tasks process-wide, and the order in which a crashed host's tasks are
    // dropped (and so its connections closed) follows those numbers.
    let exe = std::env::current_exe().context("finding this program")?;
    let next = AtomicU64::new(from);
    let failed = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= to {
                    return;
                }
                let out = std::process::Command::new(&exe)
                    .args(["--seed", &seed.to_string(), "--output", "json"])
                    .args(["--run-ms", &opts.run_ms.to_string()])
                    .args(["--max-ops", &opts.max_ops.to_string()])
                    .args(opts.black_holes.then_some("--black-holes"))
                    .output();
                let report = out
                    .as_ref()
                    .ok()
                    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
                match report {
                    Some(r) => {
                        let violations = r["violations"].as_array().map_or(0, Vec::len);
                        if json {
                            println!("{r}");
                        } else if violations > 0 {
                            let mut kinds = std::collections::BTreeMap::new();
                            for v in r["violations"].as_array().into_iter().flatten() {
                                *kinds.entry(v["kind"].to_string()).or_insert(0) += 1;
                            }
                            println!(
                                "seed {seed}: {violations} violations {kinds:?}; first: {}\n  replay: {}",
                                r["violations"][0]["message"], r["replay"]
                            );
                        }
                        if violations > 0 {
                            failed.lock().expect("failed").push(seed);
                        }
                    }
                    None => {
                        let why = match &out {
                            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                            Err(e) => e.to_string(),
                        };
                        eprintln!("seed {seed}: the simulation failed: {why}");
                        errors.lock().expect("errors").push(seed);
                    }
                }
            });
        }
    });
    let (mut failed, mut errors) = (failed.into_inner()?, errors.into_inner()?);
    failed.sort_unstable();
    errors.sort_unstable();
    eprintln!(
        "{} seeds in {:.0} s: {} with violations {:?}, {} failed to run {:?}",
        to - from,
        started.elapsed().as_secs_f64(),
        failed.len(),
        failed,
        errors.len(),
        errors
    );
    if !failed.is_empty() || !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
