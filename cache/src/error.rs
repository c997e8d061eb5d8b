//! Errors of the store: every variant names the path it was working on.

use std::path::PathBuf;

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest `{}` is unreadable: {source}", path.display())]
    BadManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("stage output `{name}` is not a file the store keeps (a hidden name, or the manifest's)")]
    BadOutputName { name: String },
    #[error("stage wrote no output files")]
    EmptyArtifact,
    #[error("the files staged for artifact {key} are not the ones its manifest lists")]
    NotAsManifest { key: String },
}

/// Attach the failing action and path to an io error, so messages read
/// "creating `/x/y`: permission denied" rather than a bare "permission denied".
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| CacheError::Io { action, path: path.to_path_buf(), source })
    }
}
