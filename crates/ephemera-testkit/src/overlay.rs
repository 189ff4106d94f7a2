//! Settings layered over a generated node configuration, as TOML text (a benchmark's relaxed
//! `[guard]`, `ephemera dev`'s `node.toml` and `oidc.toml`, a test's `[bootstrap]`).
//!
//! Tables merge key by key, recursively; any other value, arrays included, replaces the
//! configuration's. The result is parsed back into a [`NodeConfig`] and validated, so a typo
//! in an overlay is refused with the node's own error, not silently ignored.

use ephemera_node::config::ConfigError;
use ephemera_node::NodeConfig;

pub fn apply(config: &NodeConfig, overlay: &str) -> Result<NodeConfig, ConfigError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        ConfigError::Invalid(format!("configuration overlay: {what}: {e}"))
    };
    let mut base: toml::Table =
        toml::from_str(&config.to_toml()?).map_err(|e| invalid("the base", &e))?;
    let over: toml::Table = toml::from_str(overlay).map_err(|e| invalid("not TOML", &e))?;
    merge(&mut base, over);
    let merged: NodeConfig = toml::Value::Table(base)
        .try_into()
        .map_err(|e| invalid("refused", &e))?;
    merged.validate()?;
    Ok(merged)
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NodeConfig {
        let a = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let mut c = NodeConfig::new(1, "d".into(), [a(1), a(2), a(3)], "k".into());
        c.insecure_plaintext = true;
        c.raft.snapshot_logs_since_last = 500;
        c
    }

    #[test]
    fn tables_merge_values_replace_and_typos_are_refused() {
        let c = apply(
            &base(),
            "expiry_interval_ms = 250\n[raft]\nheartbeat_interval_ms = 50\n[bootstrap]\njoin = true\n\
             [[peer_cluster_addrs]]\nid = 2\naddr = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        assert_eq!(c.expiry_interval_ms, 250);
        assert_eq!(c.raft.heartbeat_interval_ms, 50);
        // The rest of [raft] is kept.
        assert_eq!(c.raft.snapshot_logs_since_last, 500);
        assert!(c.bootstrap.join);
        assert_eq!(c.peer_cluster_addrs.len(), 1);
        assert_eq!(apply(&base(), "").unwrap().expiry_interval_ms, 1000);

        let typo = apply(&base(), "[raft]\nheartbeat_ms = 50\n").unwrap_err();
        assert!(typo.to_string().contains("heartbeat_ms"), "{typo}");
        let invalid = apply(&base(), "[raft]\nelection_timeout_min_ms = 10\n").unwrap_err();
        assert!(
            invalid.to_string().contains("election_timeout_min_ms"),
            "{invalid}"
        );
        assert!(apply(&base(), "[raft").is_err());
    }
}
