//! Proof of local control for `cluster init`. Init returns the break-glass credential and sets
//! the policy and its approval rule, so whoever reaches a fresh node's API first must not win
//! it. A node that may be initialised keeps a one-time init secret in a file only someone with
//! access to the node's files can read (written 0600 at first start, like a database's
//! bootstrap password); init must present it (or an administrator's certificate). Once the
//! cluster is initialised the secret is forgotten and its file deleted.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;

use crate::secret_files::{create_private, read_private};

/// Bearer credentials with this prefix are init secrets.
pub const INIT_SECRET_PREFIX: &str = "eph_init_";

/// The node's init secret, held as its hash.
pub struct InitSecret {
    hash: [u8; 32],
    path: PathBuf,
}

impl std::fmt::Debug for InitSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitSecret")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl InitSecret {
    /// The secret of a node that is not initialised: read from `path`, or created there. A
    /// node that is already initialised deletes a leftover file and has none.
    pub fn prepare(path: &Path, initialised: bool) -> Result<Option<Self>, String> {
        if initialised {
            if path.exists() {
                std::fs::remove_file(path).map_err(|e| {
                    format!(
                        "cannot delete the spent init secret {}: {e}",
                        path.display()
                    )
                })?;
            }
            return Ok(None);
        }
        if !path.exists() {
            let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(bytes.as_mut());
            let secret = zeroize::Zeroizing::new(format!(
                "{INIT_SECRET_PREFIX}{}\n",
                URL_SAFE_NO_PAD.encode(bytes.as_ref())
            ));
            create_private(path, &secret).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), "wrote this node's init secret; `ephemera cluster init --init-secret-file` it");
        }
        let text = zeroize::Zeroizing::new(read_private(path).map_err(|e| e.to_string())?);
        let secret = text.trim();
        if !secret.starts_with(INIT_SECRET_PREFIX) || secret.len() < INIT_SECRET_PREFIX.len() + 32 {
            return Err(format!(
                "{} does not hold an init secret ({INIT_SECRET_PREFIX}...); delete it and restart \
                 to have a new one written",
                path.display()
            ));
        }
        Ok(Some(InitSecret {
            hash: ephemera_core::crypto::hash_secret(secret),
            path: path.to_path_buf(),
        }))
    }

    /// Constant-time comparison with a presented secret.
    pub fn matches(&self, presented: &str) -> bool {
        ephemera_core::crypto::verify_secret(presented.trim(), &self.hash)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Init succeeded: the secret is spent.
    pub fn consume(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot delete the spent init secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_written_once_matched_and_spent() {
        let dir = std::env::temp_dir().join(format!("eph-init-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("init.secret");
        let _ = std::fs::remove_file(&path);
        let s = InitSecret::prepare(&path, false).unwrap().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(s.matches(&text) && s.matches(text.trim()));
        assert!(!s.matches("eph_init_guess") && !s.matches(""));
        // A restart before init reads the same secret.
        let again = InitSecret::prepare(&path, false).unwrap().unwrap();
        assert!(again.matches(&text));
        assert!(!format!("{again:?}").contains(text.trim()));
        again.consume();
        assert!(!path.exists());
        std::fs::write(&path, "x").unwrap();
        assert!(InitSecret::prepare(&path, true).unwrap().is_none());
        assert!(!path.exists(), "a spent secret's file is deleted at start");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
