//! `ephemera bench`: a load generator against a running cluster. Closed loop (N clients, each
//! sending its next request when the last one answers) or open loop (a fixed arrival rate,
//! latency measured from each request's scheduled time, so a stall is not hidden by coordinated
//! omission). Latencies go into HDR histograms; the report gives throughput, percentiles and
//! errors by kind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client, ClientError};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::util::parse_duration_s;
use crate::{BenchArgs, Cli};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum OpKind {
    Issue,
    Renew,
    Revoke,
    Introspect,
    /// RFC 7662 over HTTP (`POST /oauth2/introspect`), on the nodes of `EPHEMERA_HTTP`.
    IntrospectHttp,
}

impl OpKind {
    const ALL: [OpKind; 5] = [
        OpKind::Issue,
        OpKind::Renew,
        OpKind::Revoke,
        OpKind::Introspect,
        OpKind::IntrospectHttp,
    ];

    fn name(self) -> &'static str {
        match self {
            OpKind::Issue => "issue",
            OpKind::Renew => "renew",
            OpKind::Revoke => "revoke",
            OpKind::Introspect => "introspect",
            OpKind::IntrospectHttp => "introspect-http",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Which operations, in which proportions (weights out of their sum).
fn parse_mix(workload: &str) -> Result<Vec<(OpKind, u32)>> {
    if let Some(kind) = OpKind::parse(workload) {
        return Ok(vec![(kind, 1)]);
    }
    let mut mix = Vec::new();
    for part in workload.split(',') {
        let (name, weight) = part
            .split_once('=')
            .with_context(|| format!("--workload {workload:?}: expected issue, renew, revoke, introspect, introspect-http, or a mix like issue=50,renew=30,introspect=20"))?;
        let Some(kind) = OpKind::parse(name.trim()) else {
            bail!("unknown operation {:?} in --workload", name.trim());
        };
        let weight: u32 = weight
            .trim()
            .parse()
            .with_context(|| format!("weight of {name} in --workload"))?;
        mix.push((kind, weight));
    }
    if mix.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        bail!("--workload weights sum to zero");
    }
    Ok(mix)
}

/// Leases the workload renews, revokes and introspects, issued before measuring. Revocations
/// consume leases of their own, so a renewal never races the revocation of its lease.
struct Pool {
    creds: Mutex<Vec<pb::Credential>>,
    revocable: Mutex<Vec<pb::Credential>>,
    next: AtomicU64,
}

impl Pool {
    fn pick(&self) -> Option<pb::Credential> {
        let creds = self.creds.lock().expect("pool lock");
        if creds.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % creds.len();
        Some(creds[i].clone())
    }

    fn take(&self) -> Option<pb::Credential> {
        self.revocable.lock().expect("pool lock").pop()
    }
}

#[derive(Default)]
struct Recorder {
    latencies: BTreeMap<OpKind, Histogram<u64>>,
    errors: BTreeMap<(OpKind, String), u64>,
}

impl Recorder {
    /// `result`'s error is the failure's class (a gRPC code, an HTTP status, `unreachable`).
    fn record(&mut self, kind: OpKind, micros: u64, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                let h = self.latencies.entry(kind).or_insert_with(|| {
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
                });
                let _ = h.record(micros.clamp(1, 60_000_000));
            }
            Err(class) => {
                *self.errors.entry((kind, class.clone())).or_default() += 1;
            }
        }
    }
}

fn issue_request(role: &str, ttl_s: u64) -> pb::IssueRequest {
    pb::IssueRequest {
        role: role.to_string(),
        ttl_s: Some(ttl_s),
        ..Default::default()
    }
}

fn class(e: &ClientError) -> String {
    match e.code() {
        Some(code) => format!("{code:?}"),
        None => "unreachable".to_string(),
    }
}

/// RFC 7662 introspection over HTTP, round-robin over the nodes' HTTP endpoints.
struct HttpIntrospection {
    client: reqwest::Client,
    urls: Vec<String>,
    bearer: Option<String>,
    next: AtomicU64,
}

impl HttpIntrospection {
    fn new(cli: &Cli, http: &str) -> Result<Self> {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        if let Some(tls) = crate::commands::tls_files(cli)? {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes())?);
            if let Some((cert, key)) = &tls.identity {
                builder = builder.identity(reqwest::Identity::from_pem(
                    format!("{cert}\n{key}").as_bytes(),
                )?);
            }
        }
        Ok(HttpIntrospection {
            client: builder.build()?,
            urls: http
                .split(',')
                .map(|u| format!("{}/oauth2/introspect", u.trim_end_matches('/')))
                .collect(),
            bearer: cli.token.clone(),
            next: AtomicU64::new(0),
        })
    }

    async fn introspect(&self, token: &str) -> Result<(), String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.urls.len();
        let mut req = self.client.post(&self.urls[i]).form(&[("token", token)]);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.map_err(|_| "unreachable".to_string())?;
        if !resp.status().is_success() {
            return Err(format!("http_{}", resp.status().as_u16()));
        }
        let body: Value = resp.json().await.map_err(|_| "bad_response".to_string())?;
        if body["active"] != true {
            return Err("inactive".to_string());
        }
        Ok(())
    }
}

async fn run_op(
    client: &Client,
    http: Option<&HttpIntrospection>,
    kind: OpKind,
    role: &str,
    ttl_s: u64,
    pool: &Pool,
) -> Result<(), String> {
    let done = |r: Result<(), ClientError>| r.map_err(|e| class(&e));
    match kind {
        OpKind::IntrospectHttp => {
            let Some(c) = pool.pick() else {
                return done(client.issue(issue_request(role, ttl_s)).await.map(|_| ()));
            };
            match http {
                Some(h) => h.introspect(&c.token).await,
                None => Err("no_http_endpoint".to_string()),
            }
        }
        grpc => done(run_grpc_op(client, grpc, role, ttl_s, pool).await),
    }
}

async fn run_grpc_op(
    client: &Client,
    kind: OpKind,
    role: &str,
    ttl_s: u64,
    pool: &Pool,
) -> Result<(), ClientError> {
    match kind {
        OpKind::Issue => client.issue(issue_request(role, ttl_s)).await.map(|_| ()),
        OpKind::Renew => {
            let Some(c) = pool.pick() else {
                return client.issue(issue_request(role, ttl_s)).await.map(|_| ());
            };
            client
                .renew(pb::RenewRequest {
                    lease_id: c.lease_id,
                    ..Default::default()
                })
                .await
                .map(|_| ())
        }
        OpKind::Revoke => {
            // Each revoke consumes a lease of the pool; an exhausted pool is refilled by one
            // (untimed) issue first.
            let c = match pool.take() {
                Some(c) => c,
                None => client.issue(issue_request(role, ttl_s)).await?,
            };
            client
                .revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::LeaseId(c.lease_id)),
                })
                .await
                .map(|_| ())
        }
        OpKind::Introspect => {
            let Some(c) = pool.pick() else {
                return client.issue(issue_request(role, ttl_s)).await.map(|_| ());
            };
            client.introspect(&c.token).await.map(|_| ())
        }
        OpKind::IntrospectHttp => unreachable!("run_op handles HTTP"),
    }
}

/// Whether `host:port` or a URL names a loopback address.
fn is_loopback(endpoint: &str) -> bool {
    let authority = endpoint.split("://").last().unwrap_or(endpoint);
    let authority = authority.split('/').next().unwrap_or(authority);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn percentile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<()> {
    let mix = parse_mix(&args.workload)?;
    let duration = args
        .duration
        .as_deref()
        .map(parse_duration_s)
        .transpose()
        .context("--duration")?
        .map(Duration::from_secs);
    if duration.is_none() && args.count.is_none() {
        bail!("give --duration, --count or both: a benchmark must be bounded");
    }
    let warmup = Duration::from_secs(parse_duration_s(&args.warmup).context("--warmup")?);
    let client = Arc::new(crate::commands::client(cli)?);
    let http = if mix.iter().any(|(k, _)| *k == OpKind::IntrospectHttp) {
        let urls = args.http.as_deref().context(
            "introspect-http needs the nodes' HTTP endpoints: set EPHEMERA_HTTP or --http",
        )?;
        Some(Arc::new(HttpIntrospection::new(cli, urls)?))
    } else {
        None
    };
    if !args.allow_remote {
        let http = args
            .http
            .iter()
            .flat_map(|h| h.split(',').map(String::from));
        for e in client.endpoints().into_iter().chain(http) {
            if !is_loopback(&e) {
                bail!(
                    "endpoint {e} is not on loopback; pass --allow-remote to load a remote cluster"
                );
            }
        }
    }
    let pool = Arc::new(Pool {
        creds: Mutex::new(Vec::new()),
        revocable: Mutex::new(Vec::new()),
        next: AtomicU64::new(0),
    });
    // Leases to renew, revoke and introspect, issued before the clock starts.
    let shared = mix
        .iter()
        .any(|(k, _)| !matches!(k, OpKind::Issue | OpKind::Revoke));
    let revokes = mix.iter().any(|(k, _)| *k == OpKind::Revoke);
    if shared || revokes {
        let want = args.pool.max(args.concurrency as usize);
        eprintln!("bench: issuing {want} leases for the workload to use");
        let mut tasks = Vec::new();
        for t in 0..args.concurrency.max(1) {
            let (client, pool, role) = (client.clone(), pool.clone(), args.role.clone());
            let n = want / args.concurrency.max(1) as usize
                + usize::from((t as usize) < want % args.concurrency.max(1) as usize);
            let ttl = args.ttl_s;
            tasks.push(tokio::spawn(async move {
                for i in 0..n {
                    let c = client.issue(issue_request(&role, ttl)).await?;
                    // Alternate when both are wanted.
                    let target = if revokes && (!shared || i % 2 == 1) {
                        &pool.revocable
                    } else {
                        &pool.creds
                    };
                    target.lock().expect("pool lock").push(c);
                }
                Ok::<(), ClientError>(())
            }));
        }
        for t in tasks {
            t.await?.context("issuing the lease pool")?;
        }
    }

    let total_weight: u32 = mix.iter().map(|(_, w)| w).sum();
    let choose = move |n: u64| {
        let mut r = (n.wrapping_mul(2_654_435_761) % u64::from(total_weight)) as u32;
        for (k, w) in &mix {
            if r < *w {
                return *k;
            }
            r -= w;
        }
        mix[0].0
    };
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = duration.map(|d| measure_from + d);
    let count = args.count.unwrap_or(u64::MAX);
    let issued_ops = Arc::new(AtomicU64::new(0));

    // Live progress, once a second, on stderr.
    let progress = {
        let (done, recorder) = (done.clone(), recorder.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = done.load(Ordering::Relaxed);
                let errors: u64 = recorder
                    .lock()
                    .expect("recorder lock")
                    .errors
                    .values()
                    .sum();
                let phase = if Instant::now() < measure_from {
                    "warm-up"
                } else {
                    "measuring"
                };
                eprintln!(
                    "bench: {phase} {:>6.1}s  {:>7} ops/s  {:>8} measured  {errors} errors",
                    started.elapsed().as_secs_f64(),
                    now - last,
                    now
                );
                last = now;
            }
        })
    };

    let keep_going = {
        let issued_ops = issued_ops.clone();
        move || {
            let now = Instant::now();
            end.is_none_or(|e| now < e)
                && (now < measure_from || issued_ops.load(Ordering::Relaxed) < count)
        }
    };
    let mut tasks = Vec::new();
    match args.rate {
        None => {
            for t in 0..args.concurrency.max(1) {
                let (client, pool, recorder, done, role, http) = (
                    client.clone(),
                    pool.clone(),
                    recorder.clone(),
                    done.clone(),
                    args.role.clone(),
                    http.clone(),
                );
                let (keep_going, choose, issued_ops, ttl) = (
                    keep_going.clone(),
                    choose.clone(),
                    issued_ops.clone(),
                    args.ttl_s,
                );
                tasks.push(tokio::spawn(async move {
                    let mut n = u64::from(t) * 1_000_003;
                    while keep_going() {
                        n += 1;
                        let kind = choose(n);
                        let measured = Instant::now() >= measure_from;
                        if measured {
                            issued_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        let t0 = Instant::now();
                        let result =
                            run_op(&client, http.as_deref(), kind, &role, ttl, &pool).await;
                        if measured {
                            let micros = t0.elapsed().as_micros() as u64;
                            recorder
                                .lock()
                                .expect("recorder lock")
                                .record(kind, micros, &result);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        Some(rate) => {
            if rate == 0 {
                bail!("--rate must be at least 1");
            }
            // Open loop: one request every 1/rate seconds, whatever the answers; at most
            // --concurrency in flight (beyond that, requests count as late, not lost).
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(
                args.concurrency.max(1) as usize * 16,
            ));
            let mut n = 0u64;
            let mut next = Instant::now();
            while keep_going() {
                n += 1;
                let scheduled = next;
                next += interval;
                tokio::time::sleep_until(scheduled.into()).await;
                let permit = in_flight.clone().acquire_owned().await?;
                let kind = choose(n);
                let measured = scheduled >= measure_from;
                if measured {
                    issued_ops.fetch_add(1, Ordering::Relaxed);
                }
                let (client, pool, recorder, done, role, ttl, http) = (
                    client.clone(),
                    pool.clone(),
                    recorder.clone(),
                    done.clone(),
                    args.role.clone(),
                    args.ttl_s,
                    http.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let result = run_op(&client, http.as_deref(), kind, &role, ttl, &pool).await;
                    drop(permit);
                    if measured {
                        let micros = scheduled.elapsed().as_micros() as u64;
                        recorder
                            .lock()
                            .expect("recorder lock")
                            .record(kind, micros, &result);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await?;
    }
    progress.abort();
    let measured_s = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-3);

    let recorder = recorder.lock().expect("recorder lock");
    let mut ops = serde_json::Map::new();
    let mut text = format!(
        "{:<11} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
        "operation", "ok", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    let kinds: std::collections::BTreeSet<OpKind> = recorder
        .latencies
        .keys()
        .copied()
        .chain(recorder.errors.keys().map(|(k, _)| *k))
        .collect();
    for kind in kinds {
        let errors: BTreeMap<String, u64> = recorder
            .errors
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, class), n)| (class.clone(), *n))
            .collect();
        let error_total: u64 = errors.values().sum();
        let (ok, p50, p90, p99, p999, max) = match recorder.latencies.get(&kind) {
            Some(h) => (
                h.len(),
                percentile_ms(h, 0.5),
                percentile_ms(h, 0.9),
                percentile_ms(h, 0.99),
                percentile_ms(h, 0.999),
                h.max() as f64 / 1000.0,
            ),
            None => (0, 0.0, 0.0, 0.0, 0.0, 0.0),
        };
        let throughput = ok as f64 / measured_s;
        text.push_str(&format!(
            "{:<11} {ok:>9} {throughput:>10.1} {p50:>9.2} {p90:>9.2} {p99:>9.2} {p999:>9.2} {max:>9.2} {error_total:>7}\n",
            kind.name()
        ));
        ops.insert(
            kind.name().to_string(),
            json!({"ok": ok, "throughput_per_s": throughput, "p50_ms": p50, "p90_ms": p90,
                   "p99_ms": p99, "p999_ms": p999, "max_ms": max, "errors": errors}),
        );
    }
    let report = json!({
        "workload": args.workload,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": args.concurrency,
        "rate_per_s": args.rate,
        "warmup_s": warmup.as_secs_f64(),
        "measured_s": measured_s,
        "endpoints": client.endpoints(),
        "operations": Value::Object(ops),
    });
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    crate::commands::print(cli.output, report, || {
        format!(
            "{} over {measured_s:.1}s ({} mode, {} clients{}):\n{text}",
            args.workload,
            if args.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            args.concurrency,
            args.rate
                .map(|r| format!(", {r} req/s offered"))
                .unwrap_or_default()
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_mix("renew").unwrap(), vec![(OpKind::Renew, 1)]);
        assert_eq!(
            parse_mix("issue=50,introspect=50").unwrap(),
            vec![(OpKind::Issue, 50), (OpKind::Introspect, 50)]
        );
        assert!(parse_mix("issue=0").is_err());
        assert!(parse_mix("fly=1").is_err());
        assert!(parse_mix("everything").is_err());
        assert_eq!(
            parse_mix("introspect-http").unwrap(),
            vec![(OpKind::IntrospectHttp, 1)]
        );
    }

    #[test]
    fn only_loopback_endpoints_pass_without_allow_remote() {
        for e in [
            "127.0.0.1:7000",
            "https://127.0.0.1:8443",
            "localhost:1",
            "[::1]:9",
            "https://[::1]:9/x",
        ] {
            assert!(is_loopback(e), "{e}");
        }
        for e in [
            "10.0.0.1:7000",
            "https://example.com:443",
            "https://10.1.1.1:80/oauth2",
        ] {
            assert!(!is_loopback(e), "{e}");
        }
    }
}
