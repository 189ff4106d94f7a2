//! `ephemera-fuzz [--target NAME] [--iterations N] [--seed S]`: runs the fuzz targets (all, or
//! one) and prints, per target, how many inputs ran and how long it took. A panic is reported
//! with the seed, the iteration and the input (hex), and the exit status is 1.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let iterations: u64 = value("--iterations")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = value("--seed").and_then(|v| v.parse().ok()).unwrap_or(1);
    let only = value("--target");
    // Parsers that panic are what we look for; keep the default hook from printing each one.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    for target in ephemera_fuzz::TARGETS {
        if only.as_deref().is_some_and(|o| o != target.name) {
            continue;
        }
        let corpus = ephemera_fuzz::corpus(target.name);
        let started = Instant::now();
        match ephemera_fuzz::fuzz(target, &corpus, seed, iterations) {
            Ok(()) => println!(
                "{}: {iterations} inputs from {} corpus entries in {:.1} s, no panic",
                target.name,
                corpus.len(),
                started.elapsed().as_secs_f64()
            ),
            Err(f) => {
                failed = true;
                println!(
                    "{}: PANIC at seed {} iteration {}: {}\n  input (hex): {}\n  replay: ephemera-fuzz --target {} --seed {} --iterations {}",
                    f.target,
                    f.seed,
                    f.iteration,
                    f.message,
                    f.input.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    f.target,
                    f.seed,
                    f.iteration
                );
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
