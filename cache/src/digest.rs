//! blake3 digests of files, directories and artifacts, and their hex form.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{IoContext, Result};

/// A blake3 digest of bytes: a file, a directory tree, an artifact's output files or a key's
/// preimage. Printed and serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    pub fn from_hasher(hasher: &blake3::Hasher) -> Self {
        ContentHash(*hasher.finalize().as_bytes())
    }

    pub fn of_bytes(bytes: &[u8]) -> Self {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// The first 12 hex digits: enough to tell artifacts apart in a table.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(ContentHash(out))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.short())
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ContentHash::from_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// Files above this size are hashed memory-mapped with blake3's tree parallelism; the digest is
/// the same either way (blake3 is a tree hash), only the speed differs.
const MMAP_THRESHOLD: u64 = 4 << 20;

/// blake3 of a file's bytes.
pub fn hash_file(path: &Path) -> Result<ContentHash> {
    let len = std::fs::metadata(path).ctx("reading metadata of", path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path).ctx("hashing", path)?;
    } else {
        let mut file = std::fs::File::open(path).ctx("opening", path)?;
        std::io::copy(&mut file, &mut hasher).ctx("hashing", path)?;
    }
    Ok(ContentHash::from_hasher(&hasher))
}

/// blake3 over a list of `(name, size, digest)` entries, sorted by name, with length-prefixed
/// framing so that no two different lists hash alike. Used for artifacts and raw directories.
pub(crate) fn hash_listing<'a>(entries: impl IntoIterator<Item = (&'a str, u64, &'a ContentHash)>) -> ContentHash {
    let mut sorted: Vec<_> = entries.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"tinygpt-listing/1\0");
    for (name, size, digest) in sorted {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&size.to_le_bytes());
        hasher.update(digest.as_bytes());
    }
    ContentHash::from_hasher(&hasher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let h = ContentHash::of_bytes(b"tinygpt");
        assert_eq!(ContentHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }

    #[test]
    fn listing_digest_ignores_order_but_not_names() {
        let a = ContentHash::of_bytes(b"a");
        let b = ContentHash::of_bytes(b"b");
        let one = hash_listing([("x", 1, &a), ("y", 1, &b)]);
        let two = hash_listing([("y", 1, &b), ("x", 1, &a)]);
        let renamed = hash_listing([("x", 1, &a), ("z", 1, &b)]);
        assert_eq!(one, two);
        assert_ne!(one, renamed);
    }

    #[test]
    fn mmap_and_streamed_hashing_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let bytes: Vec<u8> = (0..(MMAP_THRESHOLD as usize + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(hash_file(&path).unwrap(), ContentHash::of_bytes(&bytes));
    }
}
