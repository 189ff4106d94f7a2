//! `ephemera`: the server, a local development cluster, and the operator CLI.

mod audit;
mod bench;
mod commands;
mod connect;
mod db;
mod dev;
mod exec;
mod output;
mod pki;
mod policy;
mod ssh;
mod util;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ephemera",
    version,
    about = "Raft-replicated issuer of short-lived credentials"
)]
pub struct Cli {
    /// API endpoints, comma-separated; tried in turn.
    #[arg(long, global = true, env = "EPHEMERA_ADDR", hide_env_values = true)]
    pub addr: Option<String>,
    /// Credential for the API (the admin credential from `cluster init`).
    #[arg(long, global = true, env = "EPHEMERA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A JWT assertion from a configured OIDC issuer (e.g. a CI job's OIDC token); used
    /// instead of EPHEMERA_TOKEN.
    #[arg(
        long,
        global = true,
        env = "EPHEMERA_ASSERTION",
        hide_env_values = true
    )]
    pub assertion: Option<String>,
    /// Read the assertion from this file (e.g. a projected Kubernetes service-account token).
    #[arg(long, global = true)]
    pub assertion_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the nodes' certificates; enables TLS.
    #[arg(long = "tls-ca", global = true, env = "EPHEMERA_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Talk to the cluster without TLS. Refused unless every endpoint is loopback: the CLI
    /// never sends a credential unencrypted over a network.
    #[arg(long, global = true, env = "EPHEMERA_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// This client's X.509-SVID (PEM) for mTLS authentication.
    #[arg(long = "tls-cert", global = true, env = "EPHEMERA_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long = "tls-key", global = true, env = "EPHEMERA_KEY")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a local cluster on loopback, one process per node.
    Dev(DevArgs),
    /// Run one node.
    Server {
        #[arg(long)]
        config: PathBuf,
        /// Only read and validate the configuration, print it, and exit (0 when valid).
        #[arg(long)]
        check: bool,
    },
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Certificates to start a cluster from: a CA, node and client certificates.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Credential templates.
    #[command(subcommand)]
    Role(RoleCmd),
    /// Issue a credential.
    Issue(IssueArgs),
    /// Run a command with a credential that lives as long as it does: issued before it starts,
    /// renewed while it runs, revoked when it ends (`ephemera exec --role R -- CMD ARGS...`).
    Exec(exec::ExecArgs),
    /// Follow the cluster's revocations (for verifiers that check tokens offline).
    #[command(subcommand)]
    Watch(WatchCmd),
    /// Extend a lease (never past its role's max TTL). Policy decides again, in the current
    /// context.
    Renew {
        lease_id: String,
        /// How far to extend from now, e.g. 5m (default: the lease's TTL).
        #[arg(long)]
        increment: Option<String>,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Revoke one lease, or every lease of a subject, a role or a signing key.
    Revoke(RevokeArgs),
    /// Ask the cluster whether a token is active (linearizable).
    Introspect {
        /// The token to check.
        #[arg(value_name = "TOKEN")]
        credential: String,
    },
    #[command(subcommand)]
    Leases(LeasesCmd),
    #[command(subcommand)]
    Keys(KeysCmd),
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Run a cluster under injected faults and check the history (see README, "Chaos testing").
    Chaos(ChaosArgs),
    /// One-time join tokens, redeemed for a first X.509-SVID.
    #[command(subcommand)]
    Jointoken(JoinTokenCmd),
    /// X.509-SVIDs issued by the cluster CA.
    #[command(subcommand)]
    Svid(SvidCmd),
    /// OpenSSH certificates signed by the cluster's SSH CA, and its revocation list.
    #[command(subcommand)]
    Ssh(SshCmd),
    /// Cedar policies: who may obtain which role, in which context (see README, "Policy").
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Identities the anomaly detector stopped (see README, "Guardrails").
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Load a running cluster (EPHEMERA_ADDR) and report throughput and latency percentiles.
    Bench(BenchArgs),
    /// Databases that PostgreSQL logins are created on (see README, "PostgreSQL logins").
    #[command(subcommand)]
    Db(DbCmd),
}

#[derive(Subcommand)]
pub enum DbCmd {
    #[command(subcommand)]
    Connection(DbConnectionCmd),
}

#[derive(Subcommand)]
pub enum DbConnectionCmd {
    /// Create or replace a connection; it is tried first (reachable, password accepted,
    /// CREATEROLE), and nothing is stored when it does not work.
    Put {
        name: String,
        /// postgres://USER@HOST:PORT/DATABASE (the password goes in --password-file).
        #[arg(long)]
        url: String,
        /// A file holding the admin user's password (one line).
        #[arg(long)]
        password_file: PathBuf,
        /// The CA (PEM) that signs the server's certificate; needed for verify-full.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// verify-full (the CA and the host name are checked), require (encrypted, not
        /// checked) or disable (no TLS).
        #[arg(long, default_value = "verify-full")]
        sslmode: String,
    },
    Get {
        name: String,
    },
    List,
    /// Refused while logins exist on it; --force abandons them (each revoked and audited).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Give the admin user a new password only the cluster knows.
    RotateRoot {
        name: String,
    },
}

#[derive(Args)]
pub struct BenchArgs {
    /// issue, renew, revoke, introspect, or a weighted mix: issue=50,renew=30,introspect=20.
    #[arg(long, default_value = "issue")]
    pub workload: String,
    /// Role to issue from (it must exist).
    #[arg(long, default_value = "bench")]
    pub role: String,
    /// TTL of the issued credentials, seconds.
    #[arg(long, default_value_t = 600)]
    pub ttl_s: u64,
    /// Closed loop: this many clients, each sending its next request when the last answers.
    /// Open loop (with --rate): the cap on requests in flight is 16 times this.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Open loop: requests per second, whatever the answers (latency from the scheduled time).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Measure for this long (after the warm-up), e.g. 30s.
    #[arg(long)]
    pub duration: Option<String>,
    /// Measure at most this many operations.
    #[arg(long)]
    pub count: Option<u64>,
    /// Run unmeasured for this long first.
    #[arg(long, default_value = "3s")]
    pub warmup: String,
    /// Leases issued before measuring, for renew, revoke and introspect to use.
    #[arg(long, default_value_t = 2000)]
    pub pool: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Allow endpoints that are not on loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// The nodes' HTTP endpoints, for introspect-http.
    #[arg(long, env = "EPHEMERA_HTTP", hide_env_values = true)]
    pub http: Option<String>,
    /// Connections (each starting at a different node) the clients share.
    #[arg(long, default_value_t = 8)]
    pub connections: u32,
    /// Send writes to whichever node a connection starts at (followers forward them), instead
    /// of to the leader the nodes name: to measure what the forwarding hop costs.
    #[arg(long)]
    pub spread_writes: bool,
    /// What to load: `ephemera`, or `openbao` for the same workloads as OpenBao (or Vault)
    /// token operations: create with a TTL, renew, revoke, lookup.
    #[arg(long, default_value = "ephemera")]
    pub target: String,
    /// OpenBao nodes' URLs, comma-separated.
    #[arg(long, env = "BAO_ADDR", hide_env_values = true)]
    pub openbao_addr: Option<String>,
    /// OpenBao token allowed to create tokens.
    #[arg(long, env = "BAO_TOKEN", hide_env_values = true)]
    pub openbao_token: Option<String>,
    /// CA certificate (PEM) that signed OpenBao's listener certificates.
    #[arg(long, env = "BAO_CACERT")]
    pub openbao_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum QuarantineCmd {
    List,
    /// Let a quarantined identity issue and renew again.
    Release {
        identity: String,
    },
}

/// Runtime context a workload declares with a request, for policy and the audit record.
#[derive(Args)]
pub struct ContextArgs {
    /// Environment the workload runs in (`context.environment`).
    #[arg(long)]
    pub environment: Option<String>,
    /// CI job, agent task or run id (`context.job_id`).
    #[arg(long)]
    pub job_id: Option<String>,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Propose the policies in FILE... (concatenated) as the new policy set. It is validated
    /// against the schema first and takes effect once other administrators approve it.
    Propose {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Why the change is made (shown to approvers, kept with the proposal).
        #[arg(long)]
        comment: Option<String>,
    },
    /// Approve a proposal (as an administrator other than its proposer).
    Approve { proposal_id: String },
    /// Reject (or, as its proposer, withdraw) a proposal.
    Reject {
        proposal_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Print the active policy set, or a committed version.
    Show {
        #[arg(long)]
        version: Option<u64>,
    },
    /// Committed versions, oldest first, with who proposed and approved each.
    History,
    /// Pending proposals (with --all, closed ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// What a proposal would change against the active version; or between two versions.
    Diff {
        /// A proposal id; without one, give --from and --to.
        proposal_id: Option<String>,
        #[arg(long, requires = "to", conflicts_with = "proposal_id")]
        from: Option<u64>,
        #[arg(long, requires = "from")]
        to: Option<u64>,
    },
    /// Validate the policies in FILE... against the schema locally, without a cluster.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
}

#[derive(Subcommand)]
pub enum JoinTokenCmd {
    /// Create a join token for a SPIFFE ID (shown once).
    Create {
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

#[derive(Subcommand)]
pub enum SvidCmd {
    /// Generate a key here, have the cluster sign it, and write svid.pem, svid.key, bundle.pem.
    /// With --join-token, for a workload that has no SVID yet; otherwise rotates the SVID of
    /// EPHEMERA_CERT/EPHEMERA_KEY.
    Fetch {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        join_token: Option<String>,
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Args)]
pub struct ChaosArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Seed of the fault schedule and the workload; printed, so a run can be replayed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long faults are injected, e.g. 60s or 10m.
    #[arg(long, default_value = "60s")]
    pub duration: String,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 6)]
    pub clients: u32,
    /// Stop the workload after this many operations even if time remains.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_ops: u64,
    /// Where the summary, history.jsonl, timeline.svg and node logs go.
    #[arg(long, default_value = "chaos-out")]
    pub out: PathBuf,
    /// Also issue, renew and revoke PostgreSQL logins on a real server started on 127.0.0.1
    /// (PostgreSQL must be installed), and check the database after healing.
    #[arg(long)]
    pub postgres: bool,
}

#[derive(Args)]
pub struct DevArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Directory for node data, configs, logs and dev.env.
    #[arg(long, default_value = ".ephemera-dev")]
    pub dir: PathBuf,
    /// Key algorithm of the cluster CA and the certificates it issues: ecdsa-p256 (what every
    /// TLS stack, gRPC core's included, negotiates) or ed25519.
    #[arg(long, default_value = "ecdsa-p256")]
    pub key_algorithm: String,
    /// Raft snapshot threshold (entries since the last snapshot); small values exercise snapshots.
    #[arg(long)]
    pub snapshot_logs: Option<u64>,
    /// Lifetime of the certificates each node renews for itself from the cluster CA
    /// (`tls.node_cert_ttl_s`); the nodes' bootstrap certificates, made here, live a year.
    #[arg(long, default_value_t = 86_400)]
    pub node_cert_ttl_s: u64,
    /// Import this SSH CA (an unencrypted Ed25519 OpenSSH private key) into a fresh cluster
    /// instead of generating one.
    #[arg(long)]
    pub ssh_ca_key: Option<PathBuf>,
    /// Also start a throw-away PostgreSQL server on 127.0.0.1 (PostgreSQL must be installed)
    /// and configure the connection `dev-postgres` and the role `dev-db` on it, for the tour.
    #[arg(long)]
    pub postgres: bool,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Initialise a new cluster on the first endpoint; prints the admin credential once.
    Init {
        /// `iss` of issued tokens (default: the node's HTTP URL).
        #[arg(long, default_value = "")]
        issuer: String,
        /// The cluster CA certificate and key (PEM) for issuing X.509-SVIDs; the key is sealed
        /// under the key-encryption key and replicated.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// The SSH CA to import: an unencrypted Ed25519 OpenSSH private key (`ssh-keygen -t
        /// ed25519 -N ''`); sealed under the key-encryption key. Default: the cluster creates one.
        #[arg(long)]
        ssh_ca_key: Option<PathBuf>,
        /// Policy version 1, Cedar (default: administrators only; workloads get nothing).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Approvals by administrators other than the proposer a policy change needs.
        #[arg(long, default_value_t = 1)]
        policy_approvals: u32,
        /// How long a policy proposal stays open, e.g. 7d.
        #[arg(long, default_value = "7d")]
        policy_proposal_ttl: String,
        /// The node's init secret (the node writes it to `<data_dir>/init.secret` at first
        /// start), the proof of control of the node that init needs. Without it, init needs
        /// an administrator's certificate (EPHEMERA_CERT/EPHEMERA_KEY, in `tls.admin_ids`).
        #[arg(long, env = "EPHEMERA_INIT_SECRET_FILE")]
        init_secret_file: Option<PathBuf>,
    },
    /// Add a running, uninitialised node (given by its API address) to the cluster.
    Join {
        #[arg(long)]
        node: String,
    },
    Status,
    /// Remove a member by id.
    Remove {
        id: u64,
    },
    /// Manage the break-glass credential (audited; an administrator's).
    #[command(subcommand)]
    Breakglass(BreakglassCmd),
}

#[derive(Subcommand)]
pub enum BreakglassCmd {
    /// Replace the break-glass credential with a new one, printed once; the old one stops
    /// working at once. Also re-enables a disabled break-glass.
    Rotate,
    /// Disable the break-glass credential: no bearer of it is accepted until a rotate.
    Disable,
}

// Parsed once per process; boxing the largest variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum RoleCmd {
    /// Define a role; each kind takes its own flags (a flag of another kind is refused).
    Put {
        name: String,
        /// jwt, x509-svid, ssh-user, ssh-host or postgres.
        #[arg(long, default_value = "jwt")]
        kind: String,
        /// jwt: the audience of every token.
        #[arg(long)]
        audience: Option<String>,
        /// jwt: allowed scopes, comma-separated.
        #[arg(long)]
        scopes: Option<String>,
        /// ssh-user: the principals (login names) certificates may carry, comma-separated
        /// (none: no one may log in with them).
        #[arg(long)]
        principals: Option<String>,
        /// ssh-user: extensions certificates may carry, e.g. permit-pty,permit-port-forwarding.
        #[arg(long)]
        extensions: Option<String>,
        /// ssh-user: critical options certificates may carry: force-command, source-address,
        /// verify-required.
        #[arg(long)]
        critical_options: Option<String>,
        /// ssh-host: the domains host names must be in, comma-separated.
        #[arg(long)]
        host_domains: Option<String>,
        /// ssh-host: also names below the host domains.
        #[arg(long)]
        allow_subdomains: bool,
        /// Default TTL, e.g. 5m.
        #[arg(long)]
        ttl: String,
        /// Hard cap over all renewals, e.g. 1h.
        #[arg(long)]
        max_ttl: String,
        /// Label for policies (`resource.environment`).
        #[arg(long)]
        environment: Option<String>,
        /// Label for policies (`resource.target`).
        #[arg(long)]
        target: Option<String>,
        /// Revoke a lease when policy refuses its renewal (default: refuse, let it expire).
        #[arg(long)]
        revoke_on_renewal_denied: bool,
        /// Issuances per second one identity may make from this role, cluster-wide.
        #[arg(long)]
        issue_rate_per_identity: Option<u32>,
        /// Issuances per second of this role by everyone, cluster-wide.
        #[arg(long)]
        issue_rate: Option<u32>,
        /// Live leases of this role one identity may hold.
        #[arg(long)]
        max_live_leases_per_identity: Option<u64>,
        /// Live leases of this role in all.
        #[arg(long)]
        max_live_leases: Option<u64>,
        /// postgres: the database connection logins are created on.
        #[arg(long)]
        connection: Option<String>,
        /// postgres: a file of SQL run in one transaction to create a login, with {{name}},
        /// {{password}} and {{expiration}} (quoted by the server's escaping rules).
        #[arg(long)]
        creation_statements: Option<PathBuf>,
        /// postgres: SQL run to drop a login ({{name}}); default: revoke, reassign and drop
        /// what it owns, drop the role.
        #[arg(long)]
        revocation_statements: Option<PathBuf>,
        /// postgres: SQL run to extend a login ({{name}}, {{expiration}}); default: ALTER
        /// ROLE ... VALID UNTIL.
        #[arg(long)]
        renew_statements: Option<PathBuf>,
        /// postgres: the login name, from {{role}}, {{random}} (required) and {{unix_time}}
        /// (default eph_{{role}}_{{random}}; at most 63 bytes).
        #[arg(long)]
        username_template: Option<String>,
        /// postgres: terminate a login's sessions when it is dropped (default true).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        terminate_sessions: Option<bool>,
        /// postgres: length of issued passwords (default 32).
        #[arg(long)]
        password_length: Option<u32>,
        /// postgres: character classes every password contains, comma-separated: lower,
        /// upper, digit, symbol (default lower,upper,digit).
        #[arg(long)]
        password_classes: Option<String>,
    },
    Get {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Args)]
pub struct IssueArgs {
    #[arg(long)]
    pub role: String,
    #[arg(long)]
    pub ttl: Option<String>,
    /// Requested scopes, comma-separated. The credential carries those the role and the
    /// policy allow, and none that were not asked for.
    #[arg(long)]
    pub scopes: Option<String>,
    #[arg(long)]
    pub audience: Option<String>,
    #[arg(long)]
    pub purpose: Option<String>,
    /// Idempotency key: a retry with the same id returns the same lease.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Issue on behalf of this workload identity (admin only).
    #[arg(long)]
    pub subject: Option<String>,
    #[command(flatten)]
    pub context: ContextArgs,
}

#[derive(Subcommand)]
pub enum WatchCmd {
    /// Print each revocation as a JSON line, in commit order: those after `--from`, then new
    /// ones as they commit (until interrupted, or `--limit` lines).
    Revocations {
        /// The last sequence number already seen (0: from the oldest the cluster keeps).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many revocations.
        #[arg(long)]
        limit: Option<u64>,
        /// Also print the heartbeats (`{"heartbeat":true,"seq":…,"at_ms":…}`): every
        /// revocation committed before `at_ms` has been printed.
        #[arg(long)]
        heartbeats: bool,
    },
}

#[derive(Args)]
pub struct RevokeArgs {
    pub lease_id: Option<String>,
    #[arg(long, conflicts_with_all = ["lease_id", "role", "key"])]
    pub subject: Option<String>,
    #[arg(long, conflicts_with_all = ["lease_id", "subject", "key"])]
    pub role: Option<String>,
    #[arg(long, conflicts_with_all = ["lease_id", "subject", "role", "connection"])]
    pub key: Option<String>,
    /// Every login on this database connection.
    #[arg(long, conflicts_with_all = ["lease_id", "subject", "role", "key"])]
    pub connection: Option<String>,
}

#[derive(Subcommand)]
pub enum SshCmd {
    /// Have the cluster certify a public key (the private key never leaves this machine).
    Sign {
        /// An ssh-user or ssh-host role.
        #[arg(long)]
        role: String,
        /// The OpenSSH public key file to certify (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        public_key: std::path::PathBuf,
        /// Principals, comma-separated (ssh-user: default every principal of the role;
        /// ssh-host: the host names, required).
        #[arg(long)]
        principals: Option<String>,
        /// e.g. 5m; at most the role's max TTL.
        #[arg(long)]
        ttl: Option<String>,
        /// Exactly these extensions, comma-separated (default: the role's).
        #[arg(long)]
        extensions: Option<String>,
        /// NAME=VALUE, repeatable (force-command=..., source-address=10.0.0.0/8).
        #[arg(long = "critical-option")]
        critical_options: Vec<String>,
        #[arg(long)]
        purpose: Option<String>,
        /// Idempotency key: a retry with the same id returns the same certificate.
        #[arg(long)]
        request_id: Option<String>,
        /// Where to write the certificate (default: beside the key, `NAME-cert.pub`).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Print the SSH CA public key line(s), for sshd's TrustedUserCAKeys or @cert-authority.
    Ca {
        /// The nodes' HTTP endpoints, comma-separated; tried in turn.
        #[arg(long, env = "EPHEMERA_HTTP")]
        http: String,
    },
    /// Fetch the current KRL (OpenSSH key revocation list) for sshd's RevokedKeys; the file is
    /// replaced atomically.
    Krl {
        #[arg(long)]
        out: std::path::PathBuf,
        /// The nodes' HTTP endpoints, comma-separated; tried in turn.
        #[arg(long, env = "EPHEMERA_HTTP")]
        http: String,
    },
}

#[derive(Subcommand)]
pub enum LeasesCmd {
    List {
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// active, revoked or expired; for logins that live outside the cluster also pending,
        /// revoking, failed (retried, with its last error) and abandoned.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Stop retrying a login's creation or removal (you removed it by hand, or accept that it
    /// cannot be); the lease is revoked if it was not. Administrators only; audited.
    Abandon {
        lease_id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    List,
    /// Make a new signing key active; old keys stay published until their tokens expire.
    Rotate {
        /// jwt (the token signing key) or ssh-ca (the SSH CA key).
        #[arg(long, default_value = "jwt")]
        key: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print the newest records.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        count: u32,
        /// Start at this sequence number instead.
        #[arg(long)]
        from: Option<u64>,
    },
    /// Recompute every node's hash chain, check it against the signed checkpoints and the
    /// other nodes, and print the heads.
    Verify,
    /// Print records from `--since` to the head as JSON lines (for a SIEM or an archive).
    Export {
        #[arg(long, default_value_t = 1)]
        since: u64,
    },
}

/// glibc's malloc was about a fifth of a node's CPU under issuance (allocation and free of
/// sled's pages, HTTP/2 frames, protobuf messages); mimalloc's thread-local free lists cost
/// a fraction of that (the README's Performance section has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(commands::run(cli));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
