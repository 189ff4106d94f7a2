//! The operator commands: each builds a request, sends it with endpoint failover, and prints
//! text or JSON.

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client};
use ephemera_core::audit::AuditRecord;
use serde_json::{json, Value};

use crate::connect::{client, read_file, transport};
use crate::output::print;
use crate::util::{fmt_time, parse_duration_s, shutdown_signal, split_list};
use crate::{
    AuditCmd, BreakglassCmd, Cli, ClusterCmd, Command, KeysCmd, LeasesCmd, Output, RoleCmd,
};

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Server {
            config,
            check: true,
        } => {
            let cfg = ephemera_node::NodeConfig::load(config)?;
            print!("{}", cfg.to_toml()?);
            eprintln!("{}: valid", config.display());
            Ok(())
        }
        Command::Server { config, .. } => server(config).await,
        Command::Cluster(c) => cluster(&cli, c).await,
        Command::Pki(p) => crate::pki::run(p),
        Command::Role(r) => role(&cli, r).await,
        Command::Policy(p) => crate::policy::run(&cli, p).await,
        Command::Quarantine(q) => quarantine(&cli, q).await,
        Command::Bench(b) => crate::bench::run(&cli, b).await,
        Command::Ssh(s) => crate::ssh::run(&cli, s).await,
        Command::Db(crate::DbCmd::Connection(c)) => crate::db::connection(&cli, c).await,
        Command::Leases(LeasesCmd::Abandon { lease_id, reason }) => {
            crate::db::abandon(&cli, lease_id, reason).await
        }
        Command::Watch(crate::WatchCmd::Revocations {
            from,
            limit,
            heartbeats,
        }) => watch_revocations(&cli, *from, *limit, *heartbeats).await,
        Command::Exec(a) => {
            let code = crate::exec::run(&cli, a).await?;
            std::process::exit(code)
        }
        Command::Issue(a) => {
            let c = client(&cli)?;
            let ttl_s = a.ttl.as_deref().map(parse_duration_s).transpose()?;
            let cred = c
                .issue(pb::IssueRequest {
                    role: a.role.clone(),
                    ttl_s,
                    scopes: split_list(&a.scopes),
                    audience: a.audience.clone(),
                    purpose: a.purpose.clone(),
                    request_id: a.request_id.clone(),
                    subject: a.subject.clone(),
                    environment: a.context.environment.clone(),
                    job_id: a.context.job_id.clone(),
                    kind: None,
                })
                .await?;
            print_credential(cli.output, &cred);
            Ok(())
        }
        Command::Renew {
            lease_id,
            increment,
            context,
        } => {
            let c = client(&cli)?;
            let increment_s = increment.as_deref().map(parse_duration_s).transpose()?;
            let cred = c
                .renew(pb::RenewRequest {
                    lease_id: lease_id.clone(),
                    increment_s,
                    environment: context.environment.clone(),
                    job_id: context.job_id.clone(),
                })
                .await?;
            print_credential(cli.output, &cred);
            Ok(())
        }
        Command::Revoke(a) => {
            use pb::revoke_request::Target;
            let target = match (&a.lease_id, &a.subject, &a.role, &a.key, &a.connection) {
                (Some(id), None, None, None, None) => Target::LeaseId(id.clone()),
                (None, Some(s), None, None, None) => Target::Subject(s.clone()),
                (None, None, Some(r), None, None) => Target::Role(r.clone()),
                (None, None, None, Some(k), None) => Target::Kid(k.clone()),
                (None, None, None, None, Some(c)) => Target::Connection(c.clone()),
                _ => {
                    bail!("give exactly one of LEASE_ID, --subject, --role, --key or --connection")
                }
            };
            let r = client(&cli)?
                .revoke(pb::RevokeRequest {
                    target: Some(target),
                })
                .await?;
            print(cli.output, json!({"revoked": r.revoked}), || {
                format!("revoked {} lease(s)", r.revoked)
            });
            Ok(())
        }
        Command::Introspect { credential } => {
            let r = client(&cli)?.introspect(credential).await?;
            let v = if r.active {
                json!({"active": true, "iss": r.iss, "sub": r.sub, "aud": r.aud, "scope": r.scope,
                       "client_id": r.client_id, "exp": r.exp, "iat": r.iat, "nbf": r.nbf, "jti": r.jti,
                       "token_type": r.token_type, "act": r.act, "parent_lease_id": r.parent_lease_id})
            } else {
                json!({"active": false})
            };
            print(cli.output, v.clone(), || {
                if r.active {
                    format!(
                        "active: sub={} aud={} scope={:?} jti={} expires {}",
                        r.sub,
                        r.aud,
                        r.scope,
                        r.jti,
                        fmt_time(r.exp * 1000)
                    )
                } else {
                    "inactive".to_string()
                }
            });
            Ok(())
        }
        Command::Leases(LeasesCmd::List {
            subject,
            role,
            state,
            page_size,
            page_token,
        }) => {
            let r = client(&cli)?
                .list_leases(pb::ListLeasesRequest {
                    subject: subject.clone(),
                    role: role.clone(),
                    state: state.clone(),
                    page_token: page_token.clone(),
                    page_size: *page_size,
                })
                .await?;
            let leases: Vec<Value> = r.leases.iter().map(lease_json).collect();
            print(
                cli.output,
                json!({"leases": leases, "next_page_token": r.next_page_token}),
                || {
                    let mut s = format!(
                        "{:<36} {:<8} {:<12} {:<24} {}",
                        "LEASE", "STATE", "ROLE", "EXPIRES", "SUBJECT"
                    );
                    for l in &r.leases {
                        s.push_str(&format!(
                            "\n{:<36} {:<8} {:<12} {:<24} {}",
                            l.id,
                            l.state,
                            l.role,
                            fmt_time(l.expires_at_ms),
                            l.subject
                        ));
                        if l.attempts > 0 {
                            s.push_str(&format!(
                                "\n    {} failed attempt(s); last error: {}",
                                l.attempts, l.last_error
                            ));
                        }
                    }
                    if !r.next_page_token.is_empty() {
                        s.push_str(&format!("\n(more: --page-token {})", r.next_page_token));
                    }
                    s
                },
            );
            Ok(())
        }
        Command::Keys(k) => keys(&cli, k).await,
        Command::Audit(a) => audit(&cli, a).await,
        Command::Chaos(a) => chaos(a).await,
        Command::Jointoken(crate::JoinTokenCmd::Create { spiffe_id, ttl }) => {
            let ttl_s = parse_duration_s(ttl).context("--ttl")?;
            let t = client(&cli)?
                .admin_call(
                    pb::CreateJoinTokenRequest {
                        spiffe_id: spiffe_id.clone(),
                        ttl_s,
                    },
                    |mut a, r| async move { a.create_join_token(r).await },
                )
                .await?;
            print(
                cli.output,
                json!({"token": t.token, "spiffe_id": t.spiffe_id, "expires_at": fmt_time(t.expires_at_ms)}),
                || {
                    format!(
                        "join token for {} (single use, expires {}):\n{}",
                        t.spiffe_id,
                        fmt_time(t.expires_at_ms),
                        t.token
                    )
                },
            );
            Ok(())
        }
        Command::Svid(crate::SvidCmd::Fetch {
            out,
            join_token,
            ttl,
        }) => {
            let ttl_s = ttl.as_deref().map(parse_duration_s).transpose()?;
            let req = ephemera_pki::new_csr(None)?;
            let svid = client(&cli)?
                .issue_svid(pb::IssueSvidRequest {
                    csr_pem: req.cert_pem.clone(),
                    join_token: join_token.clone(),
                    ttl_s,
                })
                .await?;
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            std::fs::write(out.join("svid.pem"), &svid.cert_pem)?;
            crate::dev::write_private(&out.join("svid.key"), &req.key_pem)?;
            std::fs::write(out.join("bundle.pem"), &svid.bundle_pem)?;
            print(
                cli.output,
                json!({"spiffe_id": svid.spiffe_id, "lease_id": svid.lease_id,
                       "expires_at": fmt_time(svid.expires_at_ms), "out": out}),
                || {
                    format!(
                        "X.509-SVID for {} (lease {}, expires {}) written to {}",
                        svid.spiffe_id,
                        svid.lease_id,
                        fmt_time(svid.expires_at_ms),
                        out.display()
                    )
                },
            );
            Ok(())
        }
    }
}

async fn chaos(a: &crate::ChaosArgs) -> Result<()> {
    if !(1..=9).contains(&a.nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    if a.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let duration =
        std::time::Duration::from_secs(parse_duration_s(&a.duration).context("--duration")?);
    eprintln!(
        "chaos: seed {seed} (replay with --seed {seed}); output in {}",
        a.out.display()
    );
    let report = ephemera_chaos::run(ephemera_chaos::ChaosOptions {
        nodes: a.nodes,
        seed,
        duration,
        clients: a.clients,
        max_ops: a.max_ops,
        out_dir: a.out.clone(),
        ephemera_bin: std::env::current_exe()?,
        postgres: a.postgres,
    })
    .await?;
    let s = &report.summary;
    println!("seed:        {seed}");
    println!(
        "operations:  {}  {}",
        s["operations"], s["operations_by_outcome"]
    );
    println!("faults:      {}", s["faults"]);
    println!("recovery ms: {}", s["recovery_ms"]);
    println!(
        "audit chain: {} records verified",
        s["audit_records_verified"]
    );
    if !s["postgres"].is_null() {
        println!("postgres:    {}", s["postgres"]);
    }
    println!("violations:  {}", report.violations.len());
    for v in &report.violations {
        println!("  [{}] {} (events {:?})", v.kind, v.message, v.events);
    }
    println!("replay:      {}", s["replay"].as_str().unwrap_or_default());
    if !report.violations.is_empty() {
        bail!(
            "{} violation(s); see {}",
            report.violations.len(),
            a.out.join("summary.json").display()
        );
    }
    Ok(())
}

async fn server(config: &std::path::Path) -> Result<()> {
    crate::util::forbid_core_dumps()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = ephemera_node::NodeConfig::load(config)?;
    ephemera_node::run(cfg, shutdown_signal()).await?;
    Ok(())
}

/// `watch revocations`: JSON lines; a stream that ends because this reader fell behind says
/// where to resume.
async fn watch_revocations(
    cli: &Cli,
    from: u64,
    limit: Option<u64>,
    heartbeats: bool,
) -> Result<()> {
    let mut stream = client(cli)?.watch_revocations(from).await?;
    let mut seen = 0u64;
    let mut last = from;
    while limit.is_none_or(|l| seen < l) {
        let event = tokio::select! {
            e = stream.message() => e,
            _ = shutdown_signal() => return Ok(()),
        };
        match event {
            Ok(Some(e)) if e.heartbeat => {
                if heartbeats {
                    println!(
                        "{}",
                        json!({"heartbeat": true, "seq": e.seq, "at_ms": e.at_ms})
                    );
                }
            }
            Ok(Some(e)) => {
                last = e.seq;
                seen += 1;
                let mut line = json!({"seq": e.seq, "at_ms": e.at_ms});
                if !e.lease_id.is_empty() {
                    line["lease_id"] = json!(e.lease_id);
                    line["expires_at_ms"] = json!(e.expires_at_ms);
                }
                if !e.kid.is_empty() {
                    line["kid"] = json!(e.kid);
                }
                println!("{line}");
            }
            Ok(None) => {
                bail!("the node ended the stream after seq {last}; resume with --from {last}")
            }
            Err(status) => bail!("{}; resume with --from {last}", status.message()),
        }
    }
    Ok(())
}

fn print_credential(out: Output, c: &pb::Credential) {
    if let Some(pb::credential::Body::Postgres(p)) = &c.body {
        return print_login(out, c, p);
    }
    let v = json!({
        "lease_id": c.lease_id,
        "kind": c.kind,
        "token": c.token,
        "expires_at": fmt_time(c.expires_at_ms),
        "expires_at_ms": c.expires_at_ms,
        "renew_after": fmt_time(c.renew_after_ms),
        "renew_after_ms": c.renew_after_ms,
        "max_expires_at": fmt_time(c.max_expires_at_ms),
        "issued_at": fmt_time(c.issued_at_ms),
        "kid": c.kid,
        "subject": c.subject,
        "role": c.role,
        "audience": c.audience,
        "scopes": c.scopes,
        "replayed": c.replayed,
    });
    print(out, v, || {
        format!(
            "lease_id:    {}\nexpires_at:  {}\nrenew_after: {}\nmax_expires: {}\nscopes:      {}\ntoken:       {}",
            c.lease_id,
            fmt_time(c.expires_at_ms),
            fmt_time(c.renew_after_ms),
            fmt_time(c.max_expires_at_ms),
            c.scopes.join(" "),
            c.token
        )
    });
}

/// A PostgreSQL login: the one answer that carries a password, printed once.
fn print_login(out: Output, c: &pb::Credential, p: &pb::PostgresLogin) {
    let v = json!({
        "lease_id": c.lease_id,
        "kind": c.kind,
        "username": p.username,
        "password": p.password,
        "connection": p.connection,
        "host": p.host,
        "port": p.port,
        "database": p.database,
        "expires_at": fmt_time(c.expires_at_ms),
        "expires_at_ms": c.expires_at_ms,
        "renew_after": fmt_time(c.renew_after_ms),
        "renew_after_ms": c.renew_after_ms,
        "max_expires_at": fmt_time(c.max_expires_at_ms),
        "max_expires_at_ms": c.max_expires_at_ms,
        "subject": c.subject,
        "role": c.role,
        "replayed": c.replayed,
    });
    print(out, v, || {
        format!(
            "lease_id:    {}\nusername:    {}\npassword:    {}\ndatabase:    {}:{}/{}\nexpires_at:  {}\nrenew_after: {}\nmax_expires: {}",
            c.lease_id,
            p.username,
            p.password,
            p.host,
            p.port,
            p.database,
            fmt_time(c.expires_at_ms),
            fmt_time(c.renew_after_ms),
            fmt_time(c.max_expires_at_ms),
        )
    });
}

fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "lease_id": l.id, "state": l.state, "role": l.role, "subject": l.subject,
        "client_id": l.client_id, "audience": l.audience, "scopes": l.scopes, "purpose": l.purpose,
        "issued_at": fmt_time(l.issued_at_ms), "expires_at": fmt_time(l.expires_at_ms),
        "expires_at_ms": l.expires_at_ms, "max_expires_at": fmt_time(l.max_expires_at_ms),
        "max_expires_at_ms": l.max_expires_at_ms, "renew_after": fmt_time(l.renew_after_ms),
        "kid": l.kid, "renewals": l.renewals, "ttl_s": l.ttl_s, "kind": l.kind,
        "principals": l.principals, "serial": l.serial, "connection": l.connection,
        "username": l.username, "attempts": l.attempts, "last_error": l.last_error,
    })
}

fn role_json(r: &pb::Role) -> Value {
    json!({"name": r.name, "kind": r.kind, "audience": r.audience, "scopes": r.allowed_scopes,
           "ttl_s": r.default_ttl_s, "max_ttl_s": r.max_ttl_s, "environment": r.environment,
           "target": r.target, "revoke_on_renewal_denied": r.revoke_on_renewal_denied,
           "issue_rate_per_identity": r.issue_rate_per_identity, "issue_rate": r.issue_rate,
           "max_live_leases_per_identity": r.max_live_leases_per_identity,
           "max_live_leases": r.max_live_leases, "principals": r.principals,
           "extensions": r.extensions, "critical_options": r.critical_options,
           "host_domains": r.host_domains, "allow_subdomains": r.allow_subdomains,
           "connection": r.connection, "creation_statements": r.creation_statements,
           "revocation_statements": r.revocation_statements,
           "renew_statements": r.renew_statements, "username_template": r.username_template,
           "terminate_sessions": r.terminate_sessions, "password_length": r.password_length,
           "password_classes": r.password_classes})
}

async fn quarantine(cli: &Cli, cmd: &crate::QuarantineCmd) -> Result<()> {
    let c = client(cli)?;
    match cmd {
        crate::QuarantineCmd::List => {
            let r = c
                .admin_call(pb::ListQuarantinesRequest {}, |mut a, r| async move {
                    a.list_quarantines(r).await
                })
                .await?;
            let rows: Vec<Value> = r
                .quarantines
                .iter()
                .map(|q| {
                    json!({"identity": q.identity, "since": fmt_time(q.since_ms), "reason": q.reason,
                           "detail": q.detail, "revoked": q.revoked})
                })
                .collect();
            print(cli.output, json!(rows), || {
                if r.quarantines.is_empty() {
                    return "no quarantined identities".into();
                }
                r.quarantines
                    .iter()
                    .map(|q| {
                        format!(
                            "{} since {} ({}: {}; {} leases revoked)",
                            q.identity,
                            fmt_time(q.since_ms),
                            q.reason,
                            q.detail,
                            q.revoked
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        crate::QuarantineCmd::Release { identity } => {
            c.admin_call(
                pb::ReleaseQuarantineRequest {
                    identity: identity.clone(),
                },
                |mut a, r| async move { a.release_quarantine(r).await },
            )
            .await?;
            print(cli.output, json!({"released": identity}), || {
                format!("released {identity}")
            });
        }
    }
    Ok(())
}

fn role_text(r: &pb::Role) -> String {
    let mut text = format!("{}: kind={}", r.name, r.kind);
    // Each kind's own fields.
    for (label, values) in [
        ("scopes", &r.allowed_scopes),
        ("principals", &r.principals),
        ("extensions", &r.extensions),
        ("critical_options", &r.critical_options),
        ("host_domains", &r.host_domains),
    ] {
        if !values.is_empty() {
            text.push_str(&format!(" {label}={}", values.join(",")));
        }
    }
    if !r.audience.is_empty() {
        text.push_str(&format!(" audience={}", r.audience));
    }
    if r.allow_subdomains {
        text.push_str(" allow_subdomains");
    }
    text.push_str(&format!(
        " ttl={}s max_ttl={}s",
        r.default_ttl_s, r.max_ttl_s
    ));
    for (label, value) in [("environment", &r.environment), ("target", &r.target)] {
        if let Some(v) = value {
            text.push_str(&format!(" {label}={v}"));
        }
    }
    if r.revoke_on_renewal_denied {
        text.push_str(" revoke_on_renewal_denied");
    }
    text
}

pub fn status_json(s: &pb::ClusterStatus) -> Value {
    json!({
        "leader_id": s.leader_id,
        "term": s.term,
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id, "api_addr": n.api_addr, "http_addr": n.http_addr, "cluster_addr": n.cluster_addr,
            "role": n.role, "applied_index": n.applied_index, "voter": n.voter,
            "clock_offset_ms": n.clock_offset_ms,
            "clock_skewed": n.clock_offset_ms.unsigned_abs() > s.max_clock_skew_ms,
        })).collect::<Vec<_>>(),
        "renewal_storm": s.renewal_storm,
        "renewal_rate_per_s": s.renewal_rate_per_s,
        "renewal_baseline_per_s": s.renewal_baseline_per_s,
    })
}

fn status_text(s: &pb::ClusterStatus) -> String {
    let mut out = format!(
        "leader: {}  term: {}  renewals: {:.0}/s (baseline {:.1}/s){}\n",
        s.leader_id,
        s.term,
        s.renewal_rate_per_s,
        s.renewal_baseline_per_s,
        if s.renewal_storm {
            "  RENEWAL STORM: premature renewals deferred, issuance held back"
        } else {
            ""
        }
    );
    out.push_str(&format!(
        "{:<4} {:<12} {:<8} {:<22} {:<22} {:<22} {}",
        "ID", "ROLE", "APPLIED", "API", "HTTP", "CLUSTER", "CLOCK"
    ));
    for n in &s.nodes {
        let skew = if n.clock_offset_ms.unsigned_abs() > s.max_clock_skew_ms {
            " SKEWED: not issuing"
        } else {
            ""
        };
        out.push_str(&format!(
            "\n{:<4} {:<12} {:<8} {:<22} {:<22} {:<22} {:+}ms{skew}",
            n.id,
            n.role,
            n.applied_index,
            n.api_addr,
            n.http_addr,
            n.cluster_addr,
            n.clock_offset_ms
        ));
    }
    out
}

async fn cluster(cli: &Cli, cmd: &ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init {
            issuer,
            ca_cert,
            ca_key,
            ssh_ca_key,
            policy,
            policy_approvals,
            policy_proposal_ttl,
            init_secret_file,
        } => {
            let read = |p: &Option<std::path::PathBuf>, what| {
                p.as_deref().map(|p| read_file(what, p)).transpose()
            };
            let (ca_cert_pem, ca_key_pem) = (
                read(ca_cert, "--ca-cert")?.unwrap_or_default(),
                read(ca_key, "--ca-key")?.unwrap_or_default(),
            );
            let policy_text = read(policy, "--policy")?.unwrap_or_default();
            let policy_proposal_ttl_s =
                parse_duration_s(policy_proposal_ttl).context("--policy-proposal-ttl")?;
            // Initialisation targets one specific node: the first endpoint.
            let c = client(cli)?;
            let first = c.endpoints()[0].clone();
            let init_secret =
                read(init_secret_file, "--init-secret-file")?.map(|s| s.trim().to_string());
            let one = Client::with_tls(&first, init_secret, transport(cli, &first)?.as_ref())?;
            let r = one
                .admin_call(
                    pb::InitClusterRequest {
                        issuer: issuer.clone(),
                        ca_cert_pem,
                        ca_key_pem,
                        policy_text,
                        policy_approvals: Some(*policy_approvals),
                        policy_proposal_ttl_s: Some(policy_proposal_ttl_s),
                        ssh_ca_key: read(ssh_ca_key, "--ssh-ca-key")?.unwrap_or_default(),
                    },
                    |mut a, r| async move { a.init_cluster(r).await },
                )
                .await?;
            print(
                cli.output,
                json!({"admin_token": r.admin_token, "node_id": r.node_id}),
                || {
                    format!(
                    "cluster initialised on node {}.\nAdmin credential (shown once; store it safely):\n\n  export EPHEMERA_TOKEN={}\n",
                    r.node_id, r.admin_token
                )
                },
            );
            Ok(())
        }
        ClusterCmd::Join { node } => {
            let status = client(cli)?
                .add_node(node)
                .await
                .with_context(|| format!("adding the node at {node}"))?;
            print(cli.output, status_json(&status), || status_text(&status));
            Ok(())
        }
        ClusterCmd::Status => {
            let s = client(cli)?
                .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                    a.get_cluster_status(r).await
                })
                .await?;
            print(cli.output, status_json(&s), || status_text(&s));
            Ok(())
        }
        ClusterCmd::Remove { id } => {
            let s = client(cli)?
                .admin_call(pb::RemoveNodeRequest { id: *id }, |mut a, r| async move {
                    a.remove_node(r).await
                })
                .await?;
            print(cli.output, status_json(&s), || status_text(&s));
            Ok(())
        }
        ClusterCmd::Breakglass(BreakglassCmd::Rotate) => {
            let r = client(cli)?
                .admin_call(pb::RotateBreakGlassRequest {}, |mut a, r| async move {
                    a.rotate_break_glass(r).await
                })
                .await?;
            print(cli.output, json!({"admin_token": r.admin_token}), || {
                format!(
                    "break-glass credential rotated; the previous one no longer works.\n\
                     New credential (shown once; store it safely):\n\n  export EPHEMERA_TOKEN={}\n",
                    r.admin_token
                )
            });
            Ok(())
        }
        ClusterCmd::Breakglass(BreakglassCmd::Disable) => {
            client(cli)?
                .admin_call(pb::DisableBreakGlassRequest {}, |mut a, r| async move {
                    a.disable_break_glass(r).await
                })
                .await?;
            print(cli.output, json!({"disabled": true}), || {
                "break-glass credential disabled; `ephemera cluster breakglass rotate` issues a new one"
                    .to_string()
            });
            Ok(())
        }
    }
}

async fn role(cli: &Cli, cmd: &RoleCmd) -> Result<()> {
    let c = client(cli)?;
    match cmd {
        RoleCmd::Put {
            name,
            kind,
            audience,
            scopes,
            principals,
            extensions,
            critical_options,
            host_domains,
            allow_subdomains,
            ttl,
            max_ttl,
            environment,
            target,
            revoke_on_renewal_denied,
            issue_rate_per_identity,
            issue_rate,
            max_live_leases_per_identity,
            max_live_leases,
            connection,
            creation_statements,
            revocation_statements,
            renew_statements,
            username_template,
            terminate_sessions,
            password_length,
            password_classes,
        } => {
            let statements = |what: &str, f: &Option<std::path::PathBuf>| -> Result<Vec<String>> {
                Ok(match f {
                    Some(path) => vec![read_file(what, path)?],
                    None => Vec::new(),
                })
            };
            let role = pb::Role {
                connection: connection.clone().unwrap_or_default(),
                creation_statements: statements("the creation statements", creation_statements)?,
                revocation_statements: statements(
                    "the revocation statements",
                    revocation_statements,
                )?,
                renew_statements: statements("the renew statements", renew_statements)?,
                username_template: username_template.clone().unwrap_or_default(),
                terminate_sessions: *terminate_sessions,
                password_length: *password_length,
                password_classes: split_list(password_classes),
                name: name.clone(),
                kind: kind.clone(),
                audience: audience.clone().unwrap_or_default(),
                allowed_scopes: split_list(scopes),
                principals: split_list(principals),
                extensions: split_list(extensions),
                critical_options: split_list(critical_options),
                host_domains: split_list(host_domains),
                allow_subdomains: *allow_subdomains,
                default_ttl_s: parse_duration_s(ttl).context("--ttl")?,
                max_ttl_s: parse_duration_s(max_ttl).context("--max-ttl")?,
                environment: environment.clone(),
                target: target.clone(),
                revoke_on_renewal_denied: *revoke_on_renewal_denied,
                issue_rate_per_identity: *issue_rate_per_identity,
                issue_rate: *issue_rate,
                max_live_leases_per_identity: *max_live_leases_per_identity,
                max_live_leases: *max_live_leases,
            };
            let r = c
                .admin_call(
                    pb::PutRoleRequest { role: Some(role) },
                    |mut a, r| async move { a.put_role(r).await },
                )
                .await?;
            print(cli.output, role_json(&r), || role_text(&r));
        }
        RoleCmd::Get { name } => {
            let r = c
                .admin_call(
                    pb::GetRoleRequest { name: name.clone() },
                    |mut a, r| async move { a.get_role(r).await },
                )
                .await?;
            print(cli.output, role_json(&r), || role_text(&r));
        }
        RoleCmd::List => {
            let r = c
                .admin_call(pb::ListRolesRequest {}, |mut a, r| async move {
                    a.list_roles(r).await
                })
                .await?;
            print(
                cli.output,
                json!({"roles": r.roles.iter().map(role_json).collect::<Vec<_>>()}),
                || r.roles.iter().map(role_text).collect::<Vec<_>>().join("\n"),
            );
        }
        RoleCmd::Delete { name } => {
            c.admin_call(
                pb::DeleteRoleRequest { name: name.clone() },
                |mut a, r| async move { a.delete_role(r).await },
            )
            .await?;
            print(cli.output, json!({"deleted": name}), || {
                format!("role {name} deleted")
            });
        }
    }
    Ok(())
}

async fn keys(cli: &Cli, cmd: &KeysCmd) -> Result<()> {
    let c = client(cli)?;
    match cmd {
        KeysCmd::List => {
            let r = c
                .admin_call(pb::ListKeysRequest {}, |mut a, r| async move {
                    a.list_keys(r).await
                })
                .await?;
            let v: Vec<Value> = r
                .keys
                .iter()
                .map(|k| {
                    json!({"kid": k.kid, "purpose": k.purpose, "status": k.status,
                           "published": k.published, "public_key": k.public_key,
                           "created_at": fmt_time(k.created_at_ms),
                           "max_token_expiry": fmt_time(k.max_token_expiry_ms)})
                })
                .collect();
            print(cli.output, json!({ "keys": v }), || {
                let mut s = format!(
                    "{:<18} {:<9} {:<10} {:<26} {}",
                    "KID", "STATUS", "PUBLISHED", "CREATED", "LAST TOKEN EXPIRY"
                );
                for k in &r.keys {
                    s.push_str(&format!(
                        "\n{:<18} {:<9} {:<10} {:<26} {}",
                        k.kid,
                        k.status,
                        k.published,
                        fmt_time(k.created_at_ms),
                        fmt_time(k.max_token_expiry_ms)
                    ));
                }
                s
            });
        }
        KeysCmd::Rotate { key } => {
            let k = c
                .admin_call(
                    pb::RotateKeyRequest { key: key.clone() },
                    |mut a, r| async move { a.rotate_key(r).await },
                )
                .await?;
            print(
                cli.output,
                json!({"kid": k.kid, "status": k.status, "purpose": k.purpose,
                       "public_key": k.public_key}),
                || match k.purpose.as_str() {
                    "ssh-ca" => format!(
                        "new active SSH CA key {}; add it to TrustedUserCAKeys:\n{}",
                        k.kid, k.public_key
                    ),
                    _ => format!("new active signing key {}", k.kid),
                },
            );
        }
    }
    Ok(())
}

async fn audit(cli: &Cli, cmd: &AuditCmd) -> Result<()> {
    let c = client(cli)?;
    match cmd {
        AuditCmd::Tail { count, from } => {
            let r = c
                .admin_call(
                    pb::AuditTailRequest {
                        from_seq: from.unwrap_or(0),
                        limit: *count,
                    },
                    |mut a, r| async move { a.audit_tail(r).await },
                )
                .await?;
            let records: Vec<AuditRecord> = r
                .records
                .into_iter()
                .map(crate::audit::record_of)
                .collect::<Result<_>>()?;
            match cli.output {
                Output::Json => {
                    for rec in &records {
                        println!("{}", serde_json::to_string(rec)?);
                    }
                }
                Output::Text => {
                    for a in &records {
                        // What the kind added and what a refusal named, as key=value pairs.
                        let mut pairs: Vec<(&String, &String)> =
                            a.details.iter().chain(a.error_fields.iter()).collect();
                        pairs.sort();
                        let extra: String =
                            pairs.iter().map(|(k, v)| format!(" {k}={v:?}")).collect();
                        println!(
                            "{:>6} {} {:<14} {:<8} actor={} {}{}{}{}{}{extra}",
                            a.seq,
                            fmt_time(a.time_ms),
                            a.action,
                            a.outcome,
                            a.actor,
                            a.role
                                .as_ref()
                                .map(|r| format!("role={r} "))
                                .unwrap_or_default(),
                            a.lease_id
                                .as_ref()
                                .map(|l| format!("lease={l} "))
                                .unwrap_or_default(),
                            a.target
                                .as_ref()
                                .map(|t| format!("target={t} "))
                                .unwrap_or_default(),
                            a.policy_version
                                .map(|v| format!("policy=v{v}[{}] ", a.policy_ids.join(",")))
                                .unwrap_or_default(),
                            a.reason
                                .as_ref()
                                .map(|t| format!("reason={t:?}"))
                                .unwrap_or_default(),
                        );
                    }
                }
            }
        }
        AuditCmd::Verify => crate::audit::verify(cli).await?,
        AuditCmd::Export { since } => crate::audit::export(cli, *since).await?,
    }
    Ok(())
}
