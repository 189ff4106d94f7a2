//! `ephemera db connection ...` and `ephemera leases abandon`: the databases PostgreSQL
//! logins are created on, and the operator's way out of an effect that cannot succeed.

use anyhow::{bail, Context, Result};
use ephemera_client::pb;
use serde_json::{json, Value};

use crate::connect::{client, read_file};
use crate::output::print;
use crate::util::fmt_time;
use crate::{Cli, DbConnectionCmd};

/// `postgres://USER@HOST[:PORT]/DATABASE` → (user, host, port, database). A password in the
/// URL is refused: it would sit in the shell history and the process list.
pub(crate) fn parse_url(url: &str) -> Result<(String, String, u16, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .context("the URL must start with postgres://")?;
    let (user, rest) = rest
        .split_once('@')
        .context("the URL must name the admin user: postgres://USER@HOST:PORT/DB")?;
    if user.contains(':') {
        bail!("put the password in --password-file, not in the URL");
    }
    let (authority, database) = rest
        .split_once('/')
        .context("the URL must name the database: postgres://USER@HOST:PORT/DB")?;
    if database.is_empty() || database.contains(['/', '?', '#']) {
        bail!("the database in the URL must be a plain name (options are flags)");
    }
    let (host, port) = match authority.strip_prefix('[') {
        // [v6]:port
        Some(v6) => {
            let (h, p) = v6
                .split_once(']')
                .context("an unclosed [ in the URL's host")?;
            (h, p.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => 5432,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("{p:?} is not a TCP port"))?,
    };
    if host.is_empty() || user.is_empty() {
        bail!("the URL needs a user and a host: postgres://USER@HOST:PORT/DB");
    }
    Ok((
        user.to_string(),
        host.to_string(),
        port,
        database.to_string(),
    ))
}

fn connection_json(c: &pb::DbConnection) -> Value {
    json!({"name": c.name, "host": c.host, "port": c.port, "database": c.database,
           "user": c.user, "sslmode": c.sslmode, "ca": !c.ca_pem.is_empty(),
           "root_rotation_pending": c.root_rotation_pending, "live_leases": c.live_leases,
           "updated_at": fmt_time(c.updated_at_ms)})
}

fn connection_text(c: &pb::DbConnection) -> String {
    format!(
        "{}: postgres://{}@{}:{}/{} sslmode={} live_leases={}{}",
        c.name,
        c.user,
        c.host,
        c.port,
        c.database,
        c.sslmode,
        c.live_leases,
        if c.root_rotation_pending {
            " (root rotation unfinished)"
        } else {
            ""
        }
    )
}

pub(crate) async fn connection(cli: &Cli, cmd: &DbConnectionCmd) -> Result<()> {
    let c = client(cli)?;
    match cmd {
        DbConnectionCmd::Put {
            name,
            url,
            password_file,
            ca_file,
            sslmode,
        } => {
            let (user, host, port, database) = parse_url(url)?;
            let password = zeroize::Zeroizing::new(read_file("the password file", password_file)?);
            // One line: the trailing newline an editor adds is not part of the password.
            let password =
                zeroize::Zeroizing::new(password.trim_end_matches(['\n', '\r']).to_string());
            let ca_pem = ca_file
                .as_deref()
                .map(|p| read_file("the CA file", p))
                .transpose()?
                .unwrap_or_default();
            if sslmode == "disable" {
                eprintln!(
                    "warning: sslmode=disable sends the admin password and every issued one to \
                     {host} unencrypted; use it only on loopback or a private link"
                );
            }
            let req = pb::PutDbConnectionRequest {
                name: name.clone(),
                host,
                port: u32::from(port),
                database,
                user,
                password: password.to_string(),
                sslmode: sslmode.clone(),
                ca_pem,
            };
            let r = c
                .admin_call(req, |mut a, r| async move { a.put_db_connection(r).await })
                .await?;
            print(cli.output, connection_json(&r), || connection_text(&r));
        }
        DbConnectionCmd::Get { name } => {
            let r = c
                .admin_call(
                    pb::GetDbConnectionRequest { name: name.clone() },
                    |mut a, r| async move { a.get_db_connection(r).await },
                )
                .await?;
            print(cli.output, connection_json(&r), || connection_text(&r));
        }
        DbConnectionCmd::List => {
            let r = c
                .admin_call(pb::ListDbConnectionsRequest {}, |mut a, r| async move {
                    a.list_db_connections(r).await
                })
                .await?;
            print(
                cli.output,
                json!({"connections": r.connections.iter().map(connection_json).collect::<Vec<_>>()}),
                || {
                    if r.connections.is_empty() {
                        "no database connections".to_string()
                    } else {
                        r.connections
                            .iter()
                            .map(connection_text)
                            .collect::<Vec<_>>()
                            .join("\n")
                    }
                },
            );
        }
        DbConnectionCmd::Delete { name, force } => {
            c.admin_call(
                pb::DeleteDbConnectionRequest {
                    name: name.clone(),
                    force: *force,
                },
                |mut a, r| async move { a.delete_db_connection(r).await },
            )
            .await?;
            print(cli.output, json!({"deleted": name}), || {
                format!("database connection {name} deleted")
            });
        }
        DbConnectionCmd::RotateRoot { name } => {
            let r = c
                .admin_call(
                    pb::RotateDbRootRequest { name: name.clone() },
                    |mut a, r| async move { a.rotate_db_root(r).await },
                )
                .await?;
            print(cli.output, connection_json(&r), || {
                format!(
                    "rotated the admin password of {}; only the cluster knows it now",
                    r.name
                )
            });
        }
    }
    Ok(())
}

pub(crate) async fn abandon(cli: &Cli, lease_id: &str, reason: &str) -> Result<()> {
    client(cli)?
        .admin_call(
            pb::AbandonLeaseRequest {
                lease_id: lease_id.to_string(),
                reason: reason.to_string(),
            },
            |mut a, r| async move { a.abandon_lease(r).await },
        )
        .await?;
    print(cli.output, json!({"abandoned": lease_id}), || {
        format!("lease {lease_id} abandoned: its effects are no longer retried")
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_name_user_host_port_and_database_and_never_a_password() {
        assert_eq!(
            parse_url("postgres://admin@db.internal:6432/orders").unwrap(),
            ("admin".into(), "db.internal".into(), 6432, "orders".into())
        );
        assert_eq!(
            parse_url("postgresql://a@[::1]/d").unwrap(),
            ("a".into(), "::1".into(), 5432, "d".into())
        );
        for bad in [
            "mysql://a@h/d",
            "postgres://a:secret@h/d",
            "postgres://h:5432/d",
            "postgres://a@h:0/d",
            "postgres://a@h:99999/d",
            "postgres://a@h/",
            "postgres://a@h/d?sslmode=disable",
            "postgres://@h/d",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }
}
