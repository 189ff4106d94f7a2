//! Policy decision time for a realistic set of Cedar policies (issue 4: tens of microseconds).
//! Prints the median and p99 of individually timed decisions, then criterion's estimates.
//!
//! Run: `cargo bench -p ephemera-benches --bench policy_decision`

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use ephemera_benches::policy_fixture::{ci_job, deploy_context, deploy_role, realistic_policy_set};
use ephemera_policy::{Action, PolicyBook};

const REPOSITORIES: usize = 40;
const SERVICES: usize = 20;

fn percentile(sorted_ns: &[u128], p: f64) -> f64 {
    let i = ((sorted_ns.len() - 1) as f64 * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

/// Times 20,000 decisions one by one (allowed and denied alternately) and prints the median.
fn print_median(book: &PolicyBook) {
    let scopes = vec!["deploy:staging".to_string()];
    let ctx = deploy_context(&scopes);
    let (allowed, denied, role) = (
        ci_job(REPOSITORIES - 2),
        ci_job(REPOSITORIES - 1),
        deploy_role(),
    );
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..20_000 {
        let principal = if i % 2 == 0 { &allowed } else { &denied };
        let start = Instant::now();
        black_box(book.decide(principal, Action::Issue, &role, &ctx));
        samples.push(start.elapsed().as_nanos());
    }
    samples.sort_unstable();
    println!(
        "policy decision over {} policies: median {:.1} µs, p90 {:.1} µs, p99 {:.1} µs ({} decisions, one core)",
        book.policy_ids().len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples.len()
    );
}

fn main() {
    let text = realistic_policy_set(REPOSITORIES, SERVICES);
    let book = PolicyBook::compile(&text, 1).expect("the benchmark policy set is valid");
    print_median(&book);

    let mut c = Criterion::default().configure_from_args();
    let scopes = vec!["deploy:staging".to_string()];
    let ctx = deploy_context(&scopes);
    let role = deploy_role();
    let allowed = ci_job(REPOSITORIES - 2);
    let denied = ci_job(REPOSITORIES - 1);
    c.bench_function("policy/decide_allow", |b| {
        b.iter(|| book.decide(black_box(&allowed), Action::Issue, &role, &ctx))
    });
    c.bench_function("policy/decide_deny", |b| {
        b.iter(|| book.decide(black_box(&denied), Action::Issue, &role, &ctx))
    });
    // The fixed cost of a decision (entities, context, request) over an almost empty slice.
    c.bench_function("policy/decide_overhead", |b| {
        b.iter(|| book.decide(black_box(&denied), Action::Exchange, &role, &ctx))
    });
    c.bench_function("policy/compile", |b| {
        b.iter(|| PolicyBook::compile(black_box(&text), 1).unwrap())
    });
    c.final_summary();
}
