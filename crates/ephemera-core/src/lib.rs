//! Pure domain logic of Ephemera. No IO, no clock, no randomness of its own: time and entropy
//! come in through [`Clock`] and [`command::Entropy`], and storage through [`kv::KvRead`].

pub mod audit;
pub mod command;
pub mod crypto;
pub mod error;
pub mod guard;
pub mod kind;
pub mod kv;
pub mod legacy;
pub mod policy;
pub mod state;
pub mod token;
pub mod types;

pub use error::{Error, ErrorCode, StorageError};

/// Source of wall-clock time in Unix milliseconds, injected so tests can control it.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

#[cfg(test)]
mod tests;
