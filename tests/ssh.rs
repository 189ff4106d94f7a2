//! SSH certificates end to end: a real `sshd` (Debian's openssh-server, on 127.0.0.1 with a
//! throw-away host key) trusts the cluster's SSH CA from `GET /v1/ssh/ca.pub` and refuses what
//! the KRL from `GET /v1/ssh/krl` revokes. `tests/run.sh` installs openssh-server if missing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::*;

const SSHD: &str = "/usr/sbin/sshd";

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An `sshd` in the foreground on a loopback port; killed when dropped.
struct Sshd {
    child: Child,
    port: u16,
}

impl Sshd {
    /// `trusted_ca` and `krl` are files that the test rewrites as it goes: sshd reads both on
    /// every connection.
    fn start(dir: &Path, trusted_ca: &Path, krl: &Path) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run the tests with `bash tests/run.sh`, which installs openssh-server"
        );
        std::fs::create_dir_all("/run/sshd").expect("sshd's privilege separation directory");
        let host_key = dir.join("host_key");
        new_key(&host_key, "ed25519", &[]);
        // Logins are as root (no user to create); the principals file maps root to `alice`.
        let principals = dir.join("principals");
        std::fs::create_dir_all(&principals).unwrap();
        std::fs::write(principals.join("root"), "alice\n").unwrap();
        let port = ephemera_testkit::ports::free_loopback_port().unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nPidFile none\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 AuthorizedKeysFile none\nTrustedUserCAKeys {}\nRevokedKeys {}\n\
                 AuthorizedPrincipalsFile {}/%u\nPermitRootLogin prohibit-password\nStrictModes no\n\
                 LogLevel VERBOSE\n",
                host_key.display(),
                trusted_ca.display(),
                krl.display(),
                principals.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sshd");
        // Ready once it says so; its log goes on to the test's stderr.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("sshd: {line}");
                if line.contains("Server listening on 127.0.0.1") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("sshd did not start listening within 20 s");
        Sshd { child, port }
    }

    /// Runs `command` over ssh as root with `key` and its certificate `cert`.
    fn ssh(&self, key: &Path, cert: &Path, tty: bool, command: &str) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-i"])
            .arg(key)
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-p",
            ])
            .arg(self.port.to_string());
        if tty {
            cmd.arg("-tt");
        }
        cmd.arg("root@127.0.0.1").arg(command).stdin(Stdio::null());
        run(&mut cmd)
    }

    fn logs_in(&self, key: &Path, cert: &Path) -> bool {
        let out = self.ssh(key, cert, false, "echo logged-in");
        let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).contains("logged-in");
        if !ok {
            eprintln!("login refused: {}", text(&out));
        }
        ok
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new unencrypted key pair at `path` (`path.pub` beside it).
fn new_key(path: &Path, algorithm: &str, extra: &[&str]) {
    let out = run(Command::new("ssh-keygen")
        .args(["-q", "-t", algorithm, "-N", ""])
        .args(extra)
        .arg("-f")
        .arg(path));
    assert!(out.status.success(), "{}", text(&out));
}

/// `ssh-keygen -Q`: whether the KRL revokes the certificate (exit 1), or not (exit 0).
fn keygen_says_revoked(krl: &Path, cert: &Path) -> bool {
    let out = run(Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(krl)
        .arg(cert));
    match out.status.code() {
        Some(0) => false,
        Some(1) => true,
        _ => panic!("ssh-keygen -Q failed: {}", text(&out)),
    }
}

struct Workload<'a> {
    cluster: &'a DevCluster,
    dir: PathBuf,
    key: PathBuf,
}

impl Workload<'_> {
    /// Signs the workload's key under `role`; the certificate's path and the CLI's JSON.
    fn sign(&self, name: &str, args: &[&str]) -> Result<(PathBuf, serde_json::Value), String> {
        let cert = self.dir.join(format!("{name}-cert.pub"));
        let mut all = vec!["ssh", "sign", "--output", "json", "--public-key"];
        let key_pub = format!("{}.pub", self.key.display());
        let cert_s = cert.display().to_string();
        all.extend([key_pub.as_str(), "--out", cert_s.as_str()]);
        all.extend(args);
        let out = self.cluster.cli_as("workload", &all);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok((cert, serde_json::from_slice(&out.stdout).unwrap()))
    }
}

fn fetch_to(cluster: &DevCluster, what: &str, node: usize, out: &Path) {
    let http = cluster.http_urls()[node].clone();
    let o = match what {
        "krl" => cluster.cli(&[
            "ssh",
            "krl",
            "--http",
            &http,
            "--out",
            &out.display().to_string(),
        ]),
        _ => cluster.cli(&["ssh", "ca", "--http", &http]),
    };
    assert!(o.status.success(), "ssh {what}: {}", text(&o));
    if what == "ca" {
        std::fs::write(out, &o.stdout).unwrap();
    }
}

/// The acceptance of SSH certificates: a real sshd accepts a fresh user certificate for
/// `alice`, refuses one for `bob`, an expired one and a revoked one (once the KRL is refreshed
/// from any node), `ssh-keygen -Q` agrees with the KRL, and a certificate without
/// `permit-pty` runs a command but gets no PTY.
#[test]
fn sshd_honours_certificates_and_the_krl() {
    let cluster = DevCluster::start(3, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for args in [
        &[
            "role",
            "put",
            "ops",
            "--kind",
            "ssh-user",
            "--principals",
            "alice,bob",
            "--extensions",
            "permit-pty",
            "--ttl",
            "5m",
            "--max-ttl",
            "1h",
        ][..],
        &[
            "role",
            "put",
            "ops-nopty",
            "--kind",
            "ssh-user",
            "--principals",
            "alice",
            "--ttl",
            "5m",
            "--max-ttl",
            "1h",
        ][..],
    ] {
        let out = cluster.cli(args);
        assert!(out.status.success(), "{}", text(&out));
    }
    // The cluster creates its SSH CA at init; every node serves the same key line.
    let ca = dir.join("trusted_ca.pub");
    fetch_to(&cluster, "ca", 0, &ca);
    let other = dir.join("ca-from-node-3.pub");
    fetch_to(&cluster, "ca", 2, &other);
    assert_eq!(std::fs::read(&ca).unwrap(), std::fs::read(&other).unwrap());
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .starts_with("ssh-ed25519 "));
    let krl = dir.join("revoked.krl");
    fetch_to(&cluster, "krl", 1, &krl);
    let sshd = Sshd::start(dir, &ca, &krl);

    let key = dir.join("id_ed25519");
    new_key(&key, "ed25519", &[]);
    let w = Workload {
        cluster: &cluster,
        dir: dir.to_path_buf(),
        key: key.clone(),
    };

    // A fresh certificate for alice logs in, with a PTY when asked for one.
    let (alice, json) = w
        .sign("alice", &["--role", "ops", "--principals", "alice"])
        .unwrap();
    assert_eq!(json["principals"], serde_json::json!(["alice"]));
    assert!(json["serial"].as_u64().unwrap() > 0);
    let lease = json["lease_id"].as_str().unwrap().to_string();
    assert!(json["key_id"].as_str().unwrap().contains(&lease));
    assert!(sshd.logs_in(&key, &alice));
    let tty = sshd.ssh(&key, &alice, true, "true");
    assert!(tty.status.success(), "PTY with permit-pty: {}", text(&tty));
    assert!(!keygen_says_revoked(&krl, &alice));

    // bob is the role's, but root's principals file names only alice.
    let (bob, _) = w
        .sign("bob", &["--role", "ops", "--principals", "bob"])
        .unwrap();
    assert!(!sshd.logs_in(&key, &bob));
    // carol is not the role's: the cluster refuses to sign at all.
    let e = w
        .sign("carol", &["--role", "ops", "--principals", "carol"])
        .unwrap_err();
    assert!(e.contains("principal \"carol\" is not allowed"), "{e}");

    // Without permit-pty: a command runs, a PTY is refused.
    let (nopty, json) = w.sign("nopty", &["--role", "ops-nopty"]).unwrap();
    assert_eq!(json["principals"], serde_json::json!(["alice"]));
    assert!(sshd.logs_in(&key, &nopty));
    let tty = sshd.ssh(&key, &nopty, true, "true");
    assert!(
        !tty.status.success(),
        "a PTY without permit-pty: {}",
        text(&tty)
    );
    assert!(
        String::from_utf8_lossy(&tty.stderr).contains("PTY allocation request failed"),
        "{}",
        text(&tty)
    );

    // An expired certificate is refused (valid_before is in whole seconds).
    let (short, json) = w.sign("short", &["--role", "ops", "--ttl", "1s"]).unwrap();
    let valid_before = json["valid_before"].as_u64().unwrap();
    while SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= valid_before
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sshd.logs_in(&key, &short));

    // Revoked through node 3; the KRL fetched from node 1 refuses it at once.
    let out = cluster.cli(&["--addr", &cluster.apis()[2], "revoke", &lease]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        sshd.logs_in(&key, &alice),
        "the old KRL does not name it yet"
    );
    fetch_to(&cluster, "krl", 0, &krl);
    assert!(keygen_says_revoked(&krl, &alice));
    assert!(!keygen_says_revoked(&krl, &nopty));
    assert!(!sshd.logs_in(&key, &alice));
    assert!(
        sshd.logs_in(&key, &nopty),
        "only the revoked certificate is refused"
    );
    // Every node serves the same KRL content.
    let krls: Vec<Vec<u8>> = (0..3)
        .map(|n| {
            let f = dir.join(format!("krl-{n}"));
            fetch_to(&cluster, "krl", n, &f);
            let mut b = std::fs::read(&f).unwrap();
            // Bytes 20..28 are generated_date: the state's clock, which moves with every entry.
            b[20..28].fill(0);
            b
        })
        .collect();
    assert!(
        krls.windows(2).all(|w| w[0] == w[1]),
        "the nodes' KRLs differ"
    );

    // Revoking by role puts every certificate of the role in the KRL.
    let out = cluster.cli(&["revoke", "--role", "ops-nopty"]);
    assert!(out.status.success(), "{}", text(&out));
    fetch_to(&cluster, "krl", 2, &krl);
    assert!(keygen_says_revoked(&krl, &nopty));
    assert!(!sshd.logs_in(&key, &nopty));

    // Renewal is re-issue, said precisely.
    let out = cluster.cli_as("workload", &["renew", &lease]);
    assert!(!out.status.success());
    let (_, json) = w.sign("again", &["--role", "ops"]).unwrap();
    let out = cluster.cli_as("workload", &["renew", json["lease_id"].as_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be extended"),
        "{}",
        text(&out)
    );
}

/// Asking for what the role does not allow is refused precisely, and nothing is issued.
#[test]
fn ssh_requests_beyond_the_role_are_refused_and_nothing_is_issued() {
    let cluster = DevCluster::start(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("id_ed25519");
    new_key(&key, "ed25519", &[]);
    let out = cluster.cli(&[
        "role",
        "put",
        "ops",
        "--kind",
        "ssh-user",
        "--principals",
        "alice",
        "--extensions",
        "permit-pty",
        "--critical-options",
        "force-command",
        "--ttl",
        "5m",
        "--max-ttl",
        "1h",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Flags of another kind are refused, not ignored.
    let out = cluster.cli(&[
        "role",
        "put",
        "bad",
        "--kind",
        "ssh-user",
        "--principals",
        "alice",
        "--scopes",
        "read",
        "--ttl",
        "5m",
        "--max-ttl",
        "1h",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("scopes do not apply to ssh-user roles"),
        "{}",
        text(&out)
    );
    let w = Workload {
        cluster: &cluster,
        dir: tmp.path().to_path_buf(),
        key,
    };
    for (args, want) in [
        (
            &["--principals", "root"][..],
            "principal \"root\" is not allowed",
        ),
        (
            &["--extensions", "permit-port-forwarding"][..],
            "extension \"permit-port-forwarding\" is not allowed",
        ),
        (
            &["--critical-option", "source-address=10.0.0.0/8"][..],
            "critical option \"source-address\" is not allowed",
        ),
        (&["--ttl", "2h"][..], "exceeds the maximum TTL"),
        (
            &["--extensions", "permit-everything"][..],
            "unknown extension",
        ),
    ] {
        let mut all = vec!["--role", "ops"];
        all.extend(args);
        let e = w.sign("x", &all).unwrap_err();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // A JWT issue against the SSH role names the mismatch.
    let out = cluster.cli_as("workload", &["issue", "--role", "ops"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("issues ssh-user credentials"),
        "{}",
        text(&out)
    );
    let leases = cluster.cli_json(&["leases", "list", "--role", "ops"]);
    assert_eq!(leases["leases"].as_array().unwrap().len(), 0, "{leases}");
    // What is allowed is issued, with the forced command.
    let (cert, json) = w
        .sign(
            "ok",
            &[
                "--role",
                "ops",
                "--critical-option",
                "force-command=/bin/true",
            ],
        )
        .unwrap();
    assert_eq!(json["cert_type"], "user");
    let shown = run(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("force-command /bin/true"), "{shown}");
    assert!(shown.contains("permit-pty"), "{shown}");
    assert!(
        shown.contains(&format!("Serial: {}", json["serial"])),
        "{shown}"
    );
}

/// An SSH CA can be imported at `cluster init` (here through `ephemera dev --ssh-ca-key`): the
/// cluster publishes that CA and signs with it, so hosts that already trust it keep working.
#[test]
fn an_imported_ssh_ca_is_published_and_signs() {
    let keys = tempfile::tempdir().unwrap();
    let ca = keys.path().join("ca");
    new_key(&ca, "ed25519", &["-C", "old-ca"]);
    let cluster = DevCluster::start(1, &["--ssh-ca-key", &ca.display().to_string()]);
    let published = cluster.cli(&["ssh", "ca", "--http", &cluster.http_urls()[0]]);
    assert!(published.status.success(), "{}", text(&published));
    let ours = std::fs::read_to_string(format!("{}.pub", ca.display())).unwrap();
    let key_of = |line: &str| {
        line.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        key_of(&String::from_utf8_lossy(&published.stdout)),
        key_of(&ours),
        "the published CA is not the imported one"
    );
    let out = cluster.cli(&[
        "role",
        "put",
        "ops",
        "--kind",
        "ssh-user",
        "--principals",
        "alice",
        "--ttl",
        "5m",
        "--max-ttl",
        "1h",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("id_ed25519");
    new_key(&key, "ed25519", &[]);
    let w = Workload {
        cluster: &cluster,
        dir: tmp.path().to_path_buf(),
        key,
    };
    let (cert, _) = w.sign("a", &["--role", "ops"]).unwrap();
    let shown = run(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert));
    let fingerprint = run(Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(format!("{}.pub", ca.display())));
    let fp = String::from_utf8_lossy(&fingerprint.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&fp),
        "the certificate is not signed by the imported CA {fp}: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
    // A key that is not Ed25519, or encrypted, is refused at init with a precise error.
    let rsa = keys.path().join("rsa");
    new_key(&rsa, "rsa", &["-b", "2048"]);
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["dev", "--nodes", "1", "--dir"])
        .arg(dir.path())
        .arg("--ssh-ca-key")
        .arg(&rsa));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not Ed25519"),
        "{}",
        text(&out)
    );
}
