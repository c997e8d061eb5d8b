//! How a run and a plan use a remote cache: which of its failures are warnings (the stage is
//! built locally instead) and which stop the run.

use std::sync::atomic::{AtomicBool, Ordering};

use cache::{Artifact, Manifest, Remote, RemoteError, RemoteResult, Staging, Store};

use crate::error::EngineError;

/// A remote and the policy for its failures.
pub struct RemoteUse {
    pub remote: Remote,
    /// Every failure of the remote is an error rather than a warning.
    pub required: bool,
    /// Set after the remote was unreachable once: the rest of the run stops asking it, rather
    /// than waiting out a timeout per stage.
    down: AtomicBool,
}

impl RemoteUse {
    /// Open `remote` and ask it once whether it answers and takes the credentials: bad
    /// credentials are an error; an unreachable remote a warning (or an error when required),
    /// after which nothing more is asked of it.
    pub fn connect(remote: Remote, required: bool, warn: &dyn Fn(&str)) -> Result<Self, EngineError> {
        let this = RemoteUse { remote, required, down: AtomicBool::new(false) };
        this.consult(this.remote.check(), warn)?;
        Ok(this)
    }

    /// Whether the remote is still worth asking in this run.
    pub fn usable(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// The value of a remote call, `None` after a failure that only warrants a warning (told to
    /// `warn`): a damaged object, or an unreachable remote unless it is required. Anything else
    /// stops the run: bad credentials, a local store error, an unreachable required remote.
    pub fn consult<T>(&self, result: RemoteResult<T>, warn: &dyn Fn(&str)) -> Result<Option<T>, EngineError> {
        match result {
            Ok(value) => Ok(Some(value)),
            // Damage is never the user's to fix: the artifact is built again and re-uploaded.
            Err(e @ RemoteError::Corrupt { .. }) => {
                warn(&format!("{e}; building locally"));
                Ok(None)
            }
            Err(e @ RemoteError::Unavailable { .. }) if !self.required => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    warn(&format!("{e}; building locally (--remote-required makes this an error)"));
                }
                Ok(None)
            }
            Err(RemoteError::Interrupted) => Err(EngineError::Interrupted),
            Err(e) => Err(EngineError::Remote(e)),
        }
    }

    /// Download `manifest`'s artifact into `staging` and publish it; on a failure that only
    /// warrants a warning, the staging area comes back empty for a local build.
    pub fn download_into(
        &self,
        store: &Store,
        staging: Staging,
        manifest: Manifest,
        on_bytes: &dyn Fn(u64),
        cancel: &AtomicBool,
        warn: &dyn Fn(&str),
    ) -> Result<Result<Artifact, Staging>, EngineError> {
        match self.consult(self.remote.download(&manifest, &staging, on_bytes, cancel), warn)? {
            Some(()) => Ok(Ok(store.adopt(staging, manifest)?)),
            None => Ok(Err(staging)),
        }
    }
}
