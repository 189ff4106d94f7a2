//! Chaos testing for Ephemera: real node processes on loopback with every node-to-node link
//! behind a fault proxy, a concurrent workload through the public API, a nemesis plan derived
//! from a printed seed, and a checker that verifies the recorded history against the cluster's
//! guarantees (`checker`), with a JSON-lines history and an SVG timeline as output.

pub mod checker;
pub mod history;
pub mod postgres;
pub mod proxy;
pub mod runner;
pub mod schedule;
pub mod svg;
pub mod workload;

pub use runner::{run, ChaosError, ChaosOptions, Report};
