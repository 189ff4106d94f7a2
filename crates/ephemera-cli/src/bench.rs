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

/// A credential the workload renews, revokes or introspects: Ephemera's lease id, or OpenBao's
/// token accessor, and the token itself.
#[derive(Clone)]
struct Lease {
    id: String,
    token: String,
}

/// Leases the workload renews, revokes and introspects, issued before measuring. Revocations
/// consume leases of their own, so a renewal never races the revocation of its lease.
struct Pool {
    leases: Mutex<Vec<Lease>>,
    revocable: Mutex<Vec<Lease>>,
    next: AtomicU64,
    /// Revocations that found `revocable` empty and issued their lease first: their latency
    /// includes an issuance, so the report says how many there were.
    revokes_after_issue: AtomicU64,
}

impl Pool {
    fn pick(&self) -> Option<Lease> {
        let leases = self.leases.lock().expect("pool lock");
        if leases.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % leases.len();
        Some(leases[i].clone())
    }

    fn take(&self) -> Option<Lease> {
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

fn class(e: &ClientError) -> String {
    match e.code() {
        Some(code) => format!("{code:?}"),
        None => "unreachable".to_string(),
    }
}

/// An HTTPS client trusting `ca_pem`, presenting `identity` (certificate and key, PEM) if given.
fn https_client(
    ca_pem: Option<&str>,
    identity: Option<&(String, String)>,
) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    if let Some(ca) = ca_pem {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?);
    }
    if let Some((cert, key)) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(
            format!("{cert}\n{key}").as_bytes(),
        )?);
    }
    Ok(builder.build()?)
}

/// The cluster under load. Each worker uses connection `worker % connections`; connection `i`
/// starts at endpoint `i % nodes`, so the load spreads over the nodes as many independent
/// workloads would spread it.
enum Target {
    Ephemera {
        connections: Vec<Client>,
        /// RFC 7662 endpoints (`POST /oauth2/introspect`) of the nodes, for introspect-http.
        http: Option<(reqwest::Client, Vec<String>)>,
        bearer: Option<String>,
        role: String,
        ttl_s: u64,
    },
    /// OpenBao (or Vault) token operations: create with a TTL, renew, revoke, lookup.
    OpenBao {
        http: reqwest::Client,
        urls: Vec<String>,
        root_token: String,
        ttl_s: u64,
    },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Ephemera { .. } => "ephemera",
            Target::OpenBao { .. } => "openbao",
        }
    }

    fn endpoints(&self) -> Vec<String> {
        match self {
            Target::Ephemera { connections, .. } => connections[0].endpoints(),
            Target::OpenBao { urls, .. } => urls.clone(),
        }
    }

    async fn issue(&self, conn: usize) -> Result<Lease, String> {
        match self {
            Target::Ephemera {
                connections,
                role,
                ttl_s,
                ..
            } => {
                let c = connections[conn % connections.len()]
                    .issue(pb::IssueRequest {
                        role: role.clone(),
                        ttl_s: Some(*ttl_s),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| class(&e))?;
                Ok(Lease {
                    id: c.lease_id,
                    token: c.token,
                })
            }
            Target::OpenBao { ttl_s, .. } => {
                let body = self
                    .bao_call(
                        conn,
                        "auth/token/create",
                        json!({"ttl": format!("{ttl_s}s"), "renewable": true}),
                    )
                    .await?;
                let auth = &body["auth"];
                match (auth["accessor"].as_str(), auth["client_token"].as_str()) {
                    (Some(id), Some(token)) => Ok(Lease {
                        id: id.to_string(),
                        token: token.to_string(),
                    }),
                    _ => Err("bad_response".to_string()),
                }
            }
        }
    }

    async fn renew(&self, conn: usize, lease: &Lease) -> Result<(), String> {
        match self {
            Target::Ephemera { connections, .. } => connections[conn % connections.len()]
                .renew(pb::RenewRequest {
                    lease_id: lease.id.clone(),
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| class(&e)),
            Target::OpenBao { ttl_s, .. } => self
                .bao_call(
                    conn,
                    "auth/token/renew",
                    json!({"token": lease.token, "increment": format!("{ttl_s}s")}),
                )
                .await
                .map(drop),
        }
    }

    async fn revoke(&self, conn: usize, lease: &Lease) -> Result<(), String> {
        match self {
            Target::Ephemera { connections, .. } => connections[conn % connections.len()]
                .revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::LeaseId(lease.id.clone())),
                })
                .await
                .map(drop)
                .map_err(|e| class(&e)),
            Target::OpenBao { .. } => self
                .bao_call(conn, "auth/token/revoke", json!({"token": lease.token}))
                .await
                .map(drop),
        }
    }

    /// gRPC introspection, RFC 7662 over HTTP (`over_http`), or OpenBao's token lookup; an
    /// inactive answer is an error.
    async fn introspect(&self, conn: usize, lease: &Lease, over_http: bool) -> Result<(), String> {
        match self {
            Target::Ephemera {
                connections,
                http,
                bearer,
                ..
            } => {
                if !over_http {
                    let r = connections[conn % connections.len()]
                        .introspect(&lease.token)
                        .await
                        .map_err(|e| class(&e))?;
                    return if r.active {
                        Ok(())
                    } else {
                        Err("inactive".to_string())
                    };
                }
                let Some((client, urls)) = http else {
                    return Err("no_http_endpoint".to_string());
                };
                let mut req = client
                    .post(&urls[conn % urls.len()])
                    .form(&[("token", lease.token.as_str())]);
                if let Some(b) = bearer {
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
            Target::OpenBao { .. } => self
                .bao_call(conn, "auth/token/lookup", json!({"token": lease.token}))
                .await
                .map(drop),
        }
    }

    /// `POST /v1/{path}` on connection `conn`'s node; the JSON answer (`null` for 204).
    async fn bao_call(&self, conn: usize, path: &str, body: Value) -> Result<Value, String> {
        let Target::OpenBao {
            http,
            urls,
            root_token,
            ..
        } = self
        else {
            unreachable!("OpenBao call on another target");
        };
        let resp = http
            .post(format!("{}/v1/{path}", urls[conn % urls.len()]))
            .header("X-Vault-Token", root_token)
            .json(&body)
            .send()
            .await
            .map_err(|_| "unreachable".to_string())?;
        if !resp.status().is_success() {
            return Err(format!("http_{}", resp.status().as_u16()));
        }
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        resp.json().await.map_err(|_| "bad_response".to_string())
    }
}

async fn run_op(target: &Target, conn: usize, kind: OpKind, pool: &Pool) -> Result<(), String> {
    // Operations on an empty pool issue instead, so a workload is never starved.
    match kind {
        OpKind::Issue => target.issue(conn).await.map(drop),
        OpKind::Renew => match pool.pick() {
            Some(l) => target.renew(conn, &l).await,
            None => target.issue(conn).await.map(drop),
        },
        OpKind::Revoke => {
            // Each revoke consumes a lease of the pool; an exhausted pool is refilled by one
            // issue first.
            let l = match pool.take() {
                Some(l) => l,
                None => {
                    if pool.revokes_after_issue.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!(
                            "bench: the pool of leases to revoke is empty; each revocation now \
                             issues its lease first (raise --pool)"
                        );
                    }
                    target.issue(conn).await?
                }
            };
            target.revoke(conn, &l).await
        }
        OpKind::Introspect | OpKind::IntrospectHttp => match pool.pick() {
            Some(l) => {
                target
                    .introspect(conn, &l, kind == OpKind::IntrospectHttp)
                    .await
            }
            None => target.issue(conn).await.map(drop),
        },
    }
}

fn build_target(cli: &Cli, args: &BenchArgs, mix: &[(OpKind, u32)]) -> Result<Target> {
    let connections = args.connections.max(1) as usize;
    match args.target.as_str() {
        "ephemera" => {
            let addr = cli.addr.as_deref().context(
                "no endpoints: set EPHEMERA_ADDR (e.g. `source .ephemera-dev/dev.env`) or pass --addr",
            )?;
            let nodes: Vec<&str> = addr
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let bearer = cli.token.clone();
            let tls = crate::connect::transport(cli, addr)?;
            let mut clients = Vec::new();
            for i in 0..connections {
                let mut rotated = nodes.clone();
                rotated.rotate_left(i % nodes.len().max(1));
                clients.push(
                    crate::connect::client_at(cli, &rotated.join(","))?
                        .with_leader_routing(!args.spread_writes),
                );
            }
            let http = if mix.iter().any(|(k, _)| *k == OpKind::IntrospectHttp) {
                let urls = args.http.as_deref().context(
                    "introspect-http needs the nodes' HTTP endpoints: set EPHEMERA_HTTP or --http",
                )?;
                let client = https_client(
                    tls.as_ref().map(|t| t.ca_pem.as_str()),
                    tls.as_ref().and_then(|t| t.identity.as_ref()),
                )?;
                let urls = urls
                    .split(',')
                    .map(|u| format!("{}/oauth2/introspect", u.trim().trim_end_matches('/')))
                    .collect();
                Some((client, urls))
            } else {
                None
            };
            Ok(Target::Ephemera {
                connections: clients,
                http,
                bearer,
                role: args.role.clone(),
                ttl_s: args.ttl_s,
            })
        }
        "openbao" => {
            if mix.iter().any(|(k, _)| *k == OpKind::IntrospectHttp) {
                bail!("introspect-http is Ephemera's RFC 7662 endpoint; OpenBao's token lookup is `introspect`");
            }
            let addr = args.openbao_addr.as_deref().context(
                "--target openbao needs the nodes' URLs: set BAO_ADDR or --openbao-addr",
            )?;
            let root_token = args.openbao_token.clone().context(
                "--target openbao needs a token allowed to create tokens: set BAO_TOKEN",
            )?;
            let ca = match &args.openbao_ca {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            Ok(Target::OpenBao {
                http: https_client(ca.as_deref(), None)?,
                urls: addr
                    .split(',')
                    .map(|u| u.trim().trim_end_matches('/').to_string())
                    .collect(),
                root_token,
                ttl_s: args.ttl_s,
            })
        }
        other => bail!("--target {other:?}: expected ephemera or openbao"),
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
    let target = Arc::new(build_target(cli, args, &mix)?);
    if !args.allow_remote {
        let http = args
            .http
            .iter()
            .flat_map(|h| h.split(',').map(String::from));
        for e in target.endpoints().into_iter().chain(http) {
            if !is_loopback(&e) {
                bail!(
                    "endpoint {e} is not on loopback; pass --allow-remote to load a remote cluster"
                );
            }
        }
    }
    let pool = Arc::new(Pool {
        leases: Mutex::new(Vec::new()),
        revocable: Mutex::new(Vec::new()),
        next: AtomicU64::new(0),
        revokes_after_issue: AtomicU64::new(0),
    });
    // Leases to renew, revoke and introspect, issued before the clock starts.
    let shared = mix
        .iter()
        .any(|(k, _)| !matches!(k, OpKind::Issue | OpKind::Revoke));
    let revokes = mix.iter().any(|(k, _)| *k == OpKind::Revoke);
    if shared || revokes {
        let want = args.pool.max(args.concurrency as usize);
        eprintln!("bench: issuing {want} leases for the workload to use");
        let workers = args.concurrency.max(1) as usize;
        let mut tasks = Vec::new();
        for t in 0..workers {
            let (target, pool) = (target.clone(), pool.clone());
            let n = want / workers + usize::from(t < want % workers);
            tasks.push(tokio::spawn(async move {
                for i in 0..n {
                    let lease = target.issue(t).await?;
                    // Alternate when both are wanted.
                    let into = if revokes && (!shared || i % 2 == 1) {
                        &pool.revocable
                    } else {
                        &pool.leases
                    };
                    into.lock().expect("pool lock").push(lease);
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            if let Err(class) = t.await? {
                bail!("issuing the lease pool failed: {class}");
            }
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
                let (target, pool, recorder, done) =
                    (target.clone(), pool.clone(), recorder.clone(), done.clone());
                let (keep_going, choose, issued_ops) =
                    (keep_going.clone(), choose.clone(), issued_ops.clone());
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
                        let result = run_op(&target, t as usize, kind, &pool).await;
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
                let (target, pool, recorder, done) =
                    (target.clone(), pool.clone(), recorder.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    let result = run_op(&target, n as usize, kind, &pool).await;
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
    let revokes_after_issue = pool.revokes_after_issue.load(Ordering::Relaxed);
    if revokes_after_issue > 0 {
        text.push_str(&format!(
            "{revokes_after_issue} revocations (warm-up included) issued their lease first: \
             their latency includes an issuance (raise --pool)\n"
        ));
    }
    let report = json!({
        "target": target.name(),
        "workload": args.workload,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": args.concurrency,
        "rate_per_s": args.rate,
        "warmup_s": warmup.as_secs_f64(),
        "measured_s": measured_s,
        "connections": args.connections,
        "endpoints": target.endpoints(),
        "operations": Value::Object(ops),
        "revokes_after_issue": revokes_after_issue,
    });
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    crate::output::print(cli.output, report, || {
        format!(
            "{} {} over {measured_s:.1}s ({} mode, {} clients{}):\n{text}",
            target.name(),
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
