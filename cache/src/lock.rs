//! Per-key exclusive locks on lock files, so two runs never build the same artifact at once.
//!
//! The OS releases the lock when the holder dies, even by kill -9: there are no stale locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::error::{IoContext, Result};

/// An exclusive lock, held until dropped.
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).ctx("opening lock", path)
}

impl KeyLock {
    /// Take the lock without waiting; `None` when another process holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<KeyLock>> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(KeyLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e).ctx("locking", path),
        }
    }

    /// Wait for the lock.
    pub fn acquire(path: &Path) -> Result<KeyLock> {
        let file = open(path)?;
        file.lock().ctx("locking", path)?;
        Ok(KeyLock { _file: file })
    }
}
