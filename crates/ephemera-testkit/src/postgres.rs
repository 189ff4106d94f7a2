//! A real PostgreSQL server on 127.0.0.1 for the tests, the chaos workload and `ephemera dev
//! --postgres`: its own data directory, TLS with a certificate for `localhost` and 127.0.0.1
//! from a fresh CA, password (SCRAM) authentication over TCP, a superuser for the executor.
//!
//! PostgreSQL refuses to run as root, so when the caller is root its tools run as the
//! `postgres` user (`runuser`), and the directory is handed to that user. `pg_ctl -w` waits
//! until the server accepts connections, or says why it did not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use ephemera_client::{pb, Client, ClientError};
use ephemera_pki::{Ca, LeafUse, SpiffeId};

use crate::files::{random_hex, write_private};
use crate::{io, Error, Result};

/// The superuser the executor connects as.
pub const ADMIN_USER: &str = "ephemera_admin";

/// One running (or stopped) PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    pub admin_password: String,
    /// The CA that signed the server's certificate (for `sslmode=verify-full`).
    pub ca_pem: String,
    running: bool,
}

/// The directory of the installed server's tools (`initdb`, `pg_ctl`), newest version first.
pub fn find_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `tool args…`, as the `postgres` user when we are root.
fn pg_command(tool: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let out = io(cmd.output(), || format!("running {what}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::NotReady(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    if is_root() {
        let mut c = Command::new("chown");
        c.args(["-R", "postgres:postgres"]).arg(path);
        run(c, "chown")?;
    }
    Ok(())
}

impl PgServer {
    /// Creates a cluster in `dir` (which must not exist yet) and starts it on a free port.
    pub fn start(dir: &Path) -> Result<PgServer> {
        let bin = find_bin().ok_or_else(|| {
            Error::NotReady(
                "PostgreSQL's server tools are not installed (tests/run.sh installs them)".into(),
            )
        })?;
        io(std::fs::create_dir_all(dir), || {
            format!("creating {}", dir.display())
        })?;
        let data = dir.join("data");
        let admin_password = io(random_hex(16), || "drawing a password".into())?;
        let pwfile = dir.join("admin.password");
        io(write_private(&pwfile, &admin_password), || {
            "writing the password file".into()
        })?;
        chown_to_postgres(dir)?;
        let mut init = pg_command(&bin.join("initdb"));
        init.arg("-D")
            .arg(&data)
            .args([
                "-U",
                ADMIN_USER,
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "-E", "UTF8", "--locale=C"]);
        run(init, "initdb")?;
        io(std::fs::remove_file(&pwfile), || {
            "removing the password file".into()
        })?;

        let now = SystemTime::now();
        let ca = Ca::generate("postgres.test", now, Duration::from_secs(7 * 86_400))?;
        let id = SpiffeId::parse("spiffe://postgres.test/server")?;
        let leaf = ca.issue(
            &id,
            LeafUse::Node,
            &["localhost"],
            &["127.0.0.1".parse().expect("an address")],
            now,
            Duration::from_secs(7 * 86_400),
        )?;
        io(
            std::fs::write(data.join("server.crt"), &leaf.cert_pem),
            || "writing the server certificate".into(),
        )?;
        io(
            write_private(&data.join("server.key"), &leaf.key_pem),
            || "writing the server key".into(),
        )?;
        chown_to_postgres(&data)?;
        let mut server = PgServer {
            bin,
            data,
            port: 0,
            admin_password,
            ca_pem: ca.cert_pem().to_string(),
            running: false,
        };
        server.resume()?;
        Ok(server)
    }

    /// Starts the stopped server again, on the same port when it is still free.
    pub fn resume(&mut self) -> Result<()> {
        if self.port == 0 {
            self.port = io(crate::ports::free_loopback_port(), || {
                "finding a free port".into()
            })?;
        }
        // Every statement is logged, so that a test searching the server's log for secrets
        // sees everything the cluster sent.
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{}' \
             -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c fsync=off \
             -c max_connections=200 -c log_statement=all",
            self.port,
            self.data.display()
        );
        let mut start = pg_command(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        run(start, "pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are disconnected).
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut stop = pg_command(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-m", "fast", "stop"]);
        run(stop, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// The data directory (a test searches it for secrets that must not be there).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Configures a cluster through `admin` to issue logins on this server: the connection
    /// `connection` (as [`ADMIN_USER`], `verify-full` to `localhost`), then `role`, pointed at
    /// it.
    pub async fn configure(
        &self,
        admin: &Client,
        connection: &str,
        mut role: pb::Role,
    ) -> std::result::Result<(), ClientError> {
        let put = pb::PutDbConnectionRequest {
            name: connection.into(),
            host: "localhost".into(),
            port: u32::from(self.port),
            database: "postgres".into(),
            user: ADMIN_USER.into(),
            password: self.admin_password.clone(),
            sslmode: "verify-full".into(),
            ca_pem: self.ca_pem.clone(),
        };
        admin
            .admin_call(put, |mut a, r| async move { a.put_db_connection(r).await })
            .await?;
        role.kind = "postgres".into();
        role.connection = connection.into();
        admin
            .admin_call(
                pb::PutRoleRequest { role: Some(role) },
                |mut a, r| async move { a.put_role(r).await },
            )
            .await?;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop();
        }
    }
}
