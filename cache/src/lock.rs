//! Locks on lock files: per key, exclusive, so two runs never build the same artifact at once;
//! per family of runs, shared by the runs that use it and exclusive for `gc`, which removes it.
//!
//! The OS releases the lock when the holder dies, even by kill -9: there are no stale locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::error::{IoContext, Result};

/// An exclusive or shared lock, held until dropped.
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

    /// Wait for a shared hold of the lock: any number of them at once, none while an exclusive
    /// one is held.
    pub fn acquire_shared(path: &Path) -> Result<KeyLock> {
        let file = open(path)?;
        file.lock_shared().ctx("locking", path)?;
        Ok(KeyLock { _file: file })
    }
}
