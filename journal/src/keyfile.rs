//! Secret key files (the signing key, the data key): readable by their owner only, created on
//! first use with mode 600, refused when others can read them.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a new key to {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not {what}")]
    Invalid { path: String, what: &'static str },
    #[error("the key file {path} is readable by others than its owner (chmod 600 it)")]
    Permissions { path: String },
    #[error("no randomness to make a key")]
    Random,
}

/// The bytes of the owner-only key file at `path`, or of a new one made by `create` (written
/// with mode 600, parents created) when there is none.
pub fn load_or_create(
    path: &Path,
    create: impl FnOnce() -> Result<Vec<u8>, KeyError>,
) -> Result<Vec<u8>, KeyError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let shown = || path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)
                .map_err(|source| KeyError::Read {
                    path: shown(),
                    source,
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions { path: shown() });
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = create()?;
            let write = |source| KeyError::Write {
                path: shown(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(write)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(write)?;
            std::io::Write::write_all(&mut f, &bytes).map_err(write)?;
            f.sync_all().map_err(write)?;
            Ok(bytes)
        }
        Err(source) => Err(KeyError::Read {
            path: shown(),
            source,
        }),
    }
}

/// The bytes of an existing owner-only key file (never creates one).
pub fn load(path: &Path) -> Result<Vec<u8>, KeyError> {
    load_or_create(path, || {
        Err(KeyError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })
    })
}
