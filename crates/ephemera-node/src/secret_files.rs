//! Files that hold secrets (the KEK, private keys, the init secret): written owner-only (0600)
//! and refused at start when their mode lets the group or others read them, as OpenSSH does for
//! its private keys. A secret another local user could read is not a secret.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by its group or by others (mode {mode:03o}); it holds a secret: \
         `chmod 600 {path}`"
    )]
    TooOpen { path: String, mode: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a secret file, refusing it when the group or others may read or write it.
pub fn read_private(path: &Path) -> Result<String, SecretFileError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(io(path))
}

/// Creates a secret file with mode 0600 from the start (never world-readable for an instant).
/// Fails if the file exists, so an existing secret is never overwritten.
pub fn create_private(path: &Path, contents: &str) -> Result<(), SecretFileError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_are_refused_and_new_ones_are_private() {
        let dir = std::env::temp_dir().join(format!("eph-secret-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        let _ = std::fs::remove_file(&path);
        create_private(&path, "s3cret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&path).unwrap(), "s3cret");
        assert!(
            create_private(&path, "other").is_err(),
            "overwrote a secret"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_private(&path).unwrap_err().to_string();
        assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
