//! Real Ephemera nodes on loopback, one OS process each, for everything that starts them:
//! the end-to-end tests, the chaos harness, the benchmark harness and `ephemera dev`. One
//! place knows how: free ports ([`ports`]), secret files ([`files`]), the directory layout,
//! the CA and node certificates, configurations built as [`NodeConfig`] values and saved
//! (never hand-written TOML), spawning, `kill -9`, pause, graceful stop, restart once the
//! storage lock is free ([`process`]), adding nodes, and finding the leader ([`LocalCluster`]).

pub mod cluster;
pub mod files;
pub mod overlay;
pub mod ports;
pub mod postgres;
pub mod process;

pub use cluster::{ClusterSpec, Layout, LocalCluster};
pub use ephemera_node::NodeConfig;
pub use process::NodeProcess;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Pki(#[from] ephemera_pki::PkiError),
    #[error(transparent)]
    Config(#[from] ephemera_node::config::ConfigError),
    #[error(transparent)]
    Client(#[from] ephemera_client::ClientError),
    /// A node did not answer, elect or exit in time.
    #[error("{0}")]
    NotReady(String),
    /// The cluster is not in a state for the call (the node exists, or still runs).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches what was being done to an IO error.
pub(crate) fn io<T>(r: std::io::Result<T>, context: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|source| Error::Io {
        context: context(),
        source,
    })
}
