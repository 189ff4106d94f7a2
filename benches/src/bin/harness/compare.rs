//! `harness compare`: Ephemera against OpenBao, the same workloads through the same load
//! generator (`ephemera bench`), one cluster at a time so they never share the CPU.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client};
use serde_json::{json, Value};

use crate::cluster::{cpu_seconds, find_or_install_bao, kill9, EphemeraCluster, OpenBaoCluster};
use crate::Flags;

/// Ephemera's operation and its OpenBao equivalent (the `--workload` name is the same).
const WORKLOADS: [(&str, &str); 4] = [
    ("issue", "token create, TTL 600 s"),
    ("renew", "token renew"),
    ("revoke", "token revoke"),
    ("introspect", "token lookup"),
];

struct Settings {
    concurrency: u64,
    duration: String,
    warmup: String,
}

impl Settings {
    /// `ephemera bench` of `workload` under `load` (`--concurrency N` or `--rate R`), with
    /// this run's duration and warm-up.
    fn args(&self, workload: &str, load: [&str; 2]) -> Vec<String> {
        [
            "--output",
            "json",
            "bench",
            "--workload",
            workload,
            load[0],
            load[1],
            "--duration",
            &self.duration,
            "--warmup",
            &self.warmup,
            "--ttl-s",
            "600",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Issuance in an open loop at half the rate the closed loop reached (`closed`: the
    /// issue report), for the same duration: the latency a cluster gives with headroom, with
    /// every request timed from when it was due, so a stall is not hidden.
    fn open_loop_args(&self, closed: &Value) -> Vec<String> {
        let closed_per_s = op(closed, "issue")["throughput_per_s"]
            .as_f64()
            .unwrap_or(0.0);
        let rate = ((closed_per_s / 2.0).max(1.0) as u64).to_string();
        self.args("issue", ["--rate", &rate])
    }

    /// `earlier`: this target's reports so far (issue runs first). A revocation consumes a
    /// lease, so the revoke run gets a pool sized from the issue rate just measured: enough
    /// that no revocation has to issue its own lease, whose time would count as its latency.
    fn bench_args(&self, workload: &str, earlier: &[Value]) -> Vec<String> {
        let mut args = self.args(workload, ["--concurrency", &self.concurrency.to_string()]);
        if let Some(issue) = earlier.first().filter(|_| workload == "revoke") {
            // The issue run had the same duration and warm-up as this one will.
            let run_s = issue["measured_s"].as_f64().unwrap_or(0.0)
                + issue["warmup_s"].as_f64().unwrap_or(0.0);
            let issue_per_s = issue["operations"]["issue"]["throughput_per_s"]
                .as_f64()
                .unwrap_or(0.0);
            let pool = (issue_per_s * run_s * 2.0).clamp(2_000.0, 300_000.0) as u64;
            args.extend(["--pool".to_string(), pool.to_string()]);
        }
        args
    }
}

/// One pass of every measurement against both clusters; `[OpenBao, Ephemera]` in each pair.
struct Pass {
    closed: [Vec<Value>; 2],
    open_loop: [Value; 2],
    failover: [Option<Duration>; 2],
}

pub async fn run(flags: &Flags) -> Result<()> {
    let settings = Settings {
        concurrency: flags.number("concurrency", 64)?,
        duration: flags.value("duration").unwrap_or("20s").to_string(),
        warmup: flags.value("warmup").unwrap_or("3s").to_string(),
    };
    let runs = flags.number("runs", 1)?;
    if !(1..=9).contains(&runs) {
        bail!("--runs {runs}: between 1 and 9");
    }
    let dir = PathBuf::from(flags.value("dir").unwrap_or("target/bench/compare"));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let bao_bin = find_or_install_bao(flags.value("bao"), dir.parent().unwrap_or(&dir))?;
    let bao_version = Command::new(&bao_bin)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let mut passes = Vec::new();
    let mut tables = String::new();
    for n in 1..=runs {
        eprintln!("harness: run {n} of {runs}");
        // Fresh clusters each run, so no run inherits another's state or warm caches.
        let run_dir = dir.join(format!("run-{n}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        let pass = one_pass(&settings, &bao_bin, &run_dir, flags.has("skip-failover")).await?;
        let table = render(&settings, &bao_version, &pass);
        if runs > 1 {
            tables.push_str(&format!("### Run {n} of {runs}\n\n{table}\n"));
        }
        println!("{table}");
        let _ = std::fs::remove_dir_all(&run_dir);
        passes.push(pass);
    }
    let median = Pass {
        closed: [0, 1].map(|t| {
            (0..WORKLOADS.len())
                .map(|w| median_value(&passes.iter().map(|p| &p.closed[t][w]).collect::<Vec<_>>()))
                .collect()
        }),
        open_loop: [0, 1]
            .map(|t| median_value(&passes.iter().map(|p| &p.open_loop[t]).collect::<Vec<_>>())),
        failover: [0, 1].map(|t| {
            let mut d: Vec<Duration> = passes.iter().filter_map(|p| p.failover[t]).collect();
            d.sort();
            d.get(d.len() / 2)
                .copied()
                .filter(|_| d.len() == passes.len())
        }),
    };
    let mut table = render(&settings, &bao_version, &median);
    if runs > 1 {
        table = format!("## Medians of {runs} runs\n\n{table}\n{tables}");
        println!("{table}");
    }
    std::fs::write(dir.join("report.md"), &table)?;
    let to_json = |p: &Pass| {
        json!({
            "openbao": p.closed[0],
            "ephemera": p.closed[1],
            "open_loop_issue": { "openbao": p.open_loop[0], "ephemera": p.open_loop[1] },
            "failover_ms": {
                "openbao": p.failover[0].map(|d| d.as_secs_f64() * 1000.0),
                "ephemera": p.failover[1].map(|d| d.as_secs_f64() * 1000.0),
            },
        })
    };
    let report = json!({
        "concurrency": settings.concurrency,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "openbao_version": bao_version,
        "runs": runs,
        "median": to_json(&median),
        "each_run": passes.iter().map(to_json).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!("harness: reports in {}", dir.display());
    Ok(())
}

/// The median of each number across `reports` that share a shape (the same bench report from
/// several runs): objects are taken key by key, and anything not a number (or missing from a
/// run) is taken from the first report. With an even count, the upper of the two middle values.
fn median_value(reports: &[&Value]) -> Value {
    match reports.first() {
        Some(Value::Object(first)) => Value::Object(
            first
                .iter()
                .map(|(k, v)| {
                    let same: Vec<&Value> = reports.iter().filter_map(|r| r.get(k)).collect();
                    let m = if same.len() == reports.len() {
                        median_value(&same)
                    } else {
                        v.clone()
                    };
                    (k.clone(), m)
                })
                .collect(),
        ),
        Some(Value::Number(_)) => {
            let mut xs: Vec<f64> = reports.iter().filter_map(|v| v.as_f64()).collect();
            if xs.len() != reports.len() {
                return reports[0].clone();
            }
            xs.sort_by(f64::total_cmp);
            json!(xs[xs.len() / 2])
        }
        Some(other) => (*other).clone(),
        None => Value::Null,
    }
}

/// Both clusters, one after the other in `dir`, through every measurement.
async fn one_pass(
    settings: &Settings,
    bao_bin: &std::path::Path,
    dir: &std::path::Path,
    skip_failover: bool,
) -> Result<Pass> {
    eprintln!("harness: starting a 3-node OpenBao cluster");
    let mut bao = OpenBaoCluster::start(bao_bin, &dir.join("openbao"), 3).await?;
    let bao_pids: Vec<u32> = bao.nodes.iter().map(|n| n.pid).collect();
    let mut bao_results = Vec::new();
    for (workload, _) in WORKLOADS {
        eprintln!("harness: OpenBao {workload}");
        let mut args = settings.bench_args(workload, &bao_results);
        args.extend(["--target".to_string(), "openbao".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cpu = cpu_seconds(&bao_pids);
        let report = run_bench(&args, &bao)?;
        bao_results.push(with_cpu(report, workload, cpu_seconds(&bao_pids) - cpu));
    }
    eprintln!("harness: OpenBao issue, open loop");
    let mut args = settings.open_loop_args(&bao_results[0]);
    args.extend(["--target".to_string(), "openbao".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bao_open = run_bench(&args, &bao)?;
    let bao_failover = if skip_failover {
        None
    } else {
        eprintln!("harness: OpenBao failover");
        Some(openbao_failover(&bao).await?)
    };
    bao.stop();
    drop(bao);

    eprintln!("harness: starting a 3-node Ephemera cluster");
    let mut eph = EphemeraCluster::start(&dir.join("ephemera"), 3).await?;
    eph.cli(
        "admin",
        &[
            "role",
            "put",
            "bench",
            "--audience",
            "bench",
            "--scopes",
            "read",
            "--ttl",
            "10m",
            "--max-ttl",
            "1h",
        ],
    )?;
    let eph_pids = eph.pids();
    let mut eph_results = Vec::new();
    for (workload, _) in WORKLOADS {
        eprintln!("harness: Ephemera {workload}");
        let args = settings.bench_args(workload, &eph_results);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cpu = cpu_seconds(&eph_pids);
        let out = eph.cli("workload", &args)?;
        let report = serde_json::from_str::<Value>(&out).context("bench report")?;
        eph_results.push(with_cpu(report, workload, cpu_seconds(&eph_pids) - cpu));
    }
    eprintln!("harness: Ephemera issue, open loop");
    let args = settings.open_loop_args(&eph_results[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let eph_open =
        serde_json::from_str::<Value>(&eph.cli("workload", &args)?).context("bench report")?;
    let eph_failover = if skip_failover {
        None
    } else {
        eprintln!("harness: Ephemera failover");
        Some(ephemera_failover(&eph).await?)
    };
    eph.stop();
    Ok(Pass {
        closed: [bao_results, eph_results],
        open_loop: [bao_open, eph_open],
        failover: [bao_failover, eph_failover],
    })
}

/// `ephemera bench --target openbao` against the cluster; its JSON report.
fn run_bench(args: &[&str], bao: &OpenBaoCluster) -> Result<Value> {
    let out = Command::new(crate::ephemera_bin()?)
        .args(args)
        .env("BAO_ADDR", bao.urls())
        .env("BAO_TOKEN", &bao.root_token)
        .env("BAO_CACERT", &bao.ca_file)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("`ephemera {}` failed ({})", args.join(" "), out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Light load (an issuance every 20 ms through the survivors-to-be), then `kill -9` of the
/// leader, then issuances through the survivors in turn until one succeeds: the time from the
/// kill to that success.
async fn measure_failover<F, Fut>(issue: F, kill: impl FnOnce()) -> Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for n in 0..50 {
        if !issue(n).await {
            bail!("issuance failed before the kill");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    kill();
    let mut n = 0;
    loop {
        if issue(n).await {
            return Ok(killed_at.elapsed());
        }
        if killed_at.elapsed() > Duration::from_secs(120) {
            bail!("no successful issuance within 120 s of the kill");
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn openbao_failover(bao: &OpenBaoCluster) -> Result<Duration> {
    let active = bao.active().await?;
    let survivors: Vec<usize> = (0..bao.nodes.len()).filter(|i| *i != active).collect();
    let active_pid = bao.nodes[active].pid;
    measure_failover(
        |n| {
            let i = survivors[n % survivors.len()];
            async move {
                bao.create_token(i, Duration::from_millis(1000))
                    .await
                    .is_ok()
            }
        },
        || kill9(active_pid),
    )
    .await
}

async fn ephemera_failover(eph: &EphemeraCluster) -> Result<Duration> {
    let leader = eph.leader().await?;
    let tls = eph.workload_tls()?;
    let survivors: Vec<Client> = eph
        .api
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, addr)| {
            Ok(Client::with_tls(addr, None, Some(&tls))?.with_timeout(Duration::from_millis(1000)))
        })
        .collect::<Result<_>>()?;
    let leader_pid = eph.pids()[(leader - 1) as usize];
    measure_failover(
        |n| {
            let c = &survivors[n % survivors.len()];
            async move {
                c.issue(pb::IssueRequest {
                    role: "bench".into(),
                    ttl_s: Some(600),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        },
        || kill9(leader_pid),
    )
    .await
}

fn op<'a>(report: &'a Value, workload: &str) -> &'a Value {
    &report["operations"][workload]
}

/// Adds the cluster's CPU per operation to an issue report: the CPU its nodes used during the
/// run (`cpu_s`, warm-up included) over the operations in it (the warm-up's counted at the
/// measured rate). Only issuance: the other workloads issue their pool inside the same window.
fn with_cpu(mut report: Value, workload: &str, cpu_s: f64) -> Value {
    if workload == "issue" {
        let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
        let ops = op(&report, workload)["throughput_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            * (f("measured_s") + f("warmup_s"));
        if ops > 0.0 {
            report["cpu_ms_per_op"] = json!(cpu_s * 1000.0 / ops);
        }
    }
    report
}

/// Ephemera's p99 against OpenBao's, as "N× lower" or "N× higher" (never "0.3× lower").
fn lower_or_higher(bao_ms: f64, eph_ms: f64) -> String {
    if eph_ms <= bao_ms {
        format!("{:.1}× lower", bao_ms / eph_ms.max(1e-9))
    } else {
        format!("{:.1}× higher", eph_ms / bao_ms.max(1e-9))
    }
}

/// The table: `[OpenBao, Ephemera]` in each pair.
fn render(settings: &Settings, bao_version: &str, pass: &Pass) -> String {
    let [bao, eph] = &pass.closed;
    let open_loop = &pass.open_loop;
    let [bao_failover, eph_failover] = pass.failover;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let errors = |v: &Value| {
        v["errors"]
            .as_object()
            .map_or(0, |e| e.values().filter_map(Value::as_u64).sum::<u64>())
    };
    let mut out = format!(
        "Ephemera vs {bao_version}: 3 nodes each on loopback (TLS), {} concurrent clients, {} per workload after a {} warm-up, same load generator.\n\n\
         | operation (OpenBao equivalent) | OpenBao ops/s | Ephemera ops/s | throughput ratio | OpenBao p50 / p99 ms | Ephemera p50 / p99 ms | p99 ratio | errors (OpenBao / Ephemera) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        settings.concurrency, settings.duration, settings.warmup
    );
    for (i, (workload, equivalent)) in WORKLOADS.iter().enumerate() {
        let (b, e) = (op(&bao[i], workload), op(&eph[i], workload));
        let ratio = f(e, "throughput_per_s") / f(b, "throughput_per_s").max(1e-9);
        let p99_ratio = lower_or_higher(f(b, "p99_ms"), f(e, "p99_ms"));
        out.push_str(&format!(
            "| {workload} ({equivalent}) | {:.0} | {:.0} | {ratio:.1}× | {:.2} / {:.2} | {:.2} / {:.2} | {p99_ratio} | {} / {} |\n",
            f(b, "throughput_per_s"),
            f(e, "throughput_per_s"),
            f(b, "p50_ms"),
            f(b, "p99_ms"),
            f(e, "p50_ms"),
            f(e, "p99_ms"),
            errors(b),
            errors(e),
        ));
    }
    let [b_open, e_open] = [0, 1].map(|t| op(&open_loop[t], "issue"));
    out.push_str(&format!(
        "| issue, open loop at half the closed-loop maximum ({:.0} / {:.0} per s offered) | {:.0} | {:.0} | | {:.2} / {:.2} | {:.2} / {:.2} | {} | {} / {} |\n",
        open_loop[0]["rate_per_s"].as_f64().unwrap_or(0.0),
        open_loop[1]["rate_per_s"].as_f64().unwrap_or(0.0),
        f(b_open, "throughput_per_s"),
        f(e_open, "throughput_per_s"),
        f(b_open, "p50_ms"),
        f(b_open, "p99_ms"),
        f(e_open, "p50_ms"),
        f(e_open, "p99_ms"),
        lower_or_higher(f(b_open, "p99_ms"), f(e_open, "p99_ms")),
        errors(b_open),
        errors(e_open),
    ));
    let cpu = |r: &Value| r["cpu_ms_per_op"].as_f64().unwrap_or(f64::NAN);
    out.push_str(&format!(
        "\nCPU per issuance, all three nodes together (closed loop, from /proc): OpenBao {:.3} ms, Ephemera {:.3} ms.\n",
        cpu(&bao[0]),
        cpu(&eph[0])
    ));
    let ms = |d: Option<Duration>| {
        d.map_or("not measured".to_string(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1000.0)
        })
    };
    out.push_str(&format!(
        "Failover (kill -9 of the leader / active node under light load, until the first successful issuance on a survivor): OpenBao {}, Ephemera {}.\n",
        ms(bao_failover),
        ms(eph_failover)
    ));
    out
}
