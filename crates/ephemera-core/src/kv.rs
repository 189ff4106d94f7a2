//! The ordered key-value view that [`crate::state`] applies commands over. The Raft crate
//! implements [`KvRead`] on sled; tests and simulations use [`MemKv`]. `apply` never writes to
//! storage directly: it writes into an [`Overlay`], whose write set the caller commits atomically.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::error::StorageError;

pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Entries with `start <= key < end` in ascending key order, at most `limit` of them.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, StorageError>;
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Pending writes layered over a read view. `None` is a deletion.
pub struct Overlay<'a, R: KvRead + ?Sized> {
    base: &'a R,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a, R: KvRead + ?Sized> Overlay<'a, R> {
    pub fn new(base: &'a R) -> Self {
        Overlay {
            base,
            writes: BTreeMap::new(),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// The write set, in key order, for an atomic commit.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl<R: KvRead + ?Sized> KvRead for Overlay<'_, R> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, StorageError> {
        let pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .writes
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .collect();
        // Each pending entry can hide at most one base entry, so this many base entries suffice.
        let base = self
            .base
            .range(start, end, limit.saturating_add(pending.len()))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (k, v) in pending {
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

/// In-memory store for tests and simulation.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct MemKv {
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemKv {
    pub fn commit(&mut self, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        for (k, v) in writes {
            match v {
                Some(v) => {
                    self.map.insert(k, v);
                }
                None => {
                    self.map.remove(&k);
                }
            }
        }
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.map.get(key).cloned())
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, StorageError> {
        Ok(self
            .map
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_range_merges_puts_and_hides_deletes() {
        let mut base = MemKv::default();
        for k in [b"a1", b"a2", b"a3", b"b1"] {
            base.map.insert(k.to_vec(), b"base".to_vec());
        }
        let mut ov = Overlay::new(&base);
        ov.delete(b"a1".to_vec());
        ov.delete(b"a2".to_vec());
        ov.put(b"a25".to_vec(), b"new".to_vec());
        let got = ov.range(b"a", &prefix_end(b"a"), 2).unwrap();
        let keys: Vec<_> = got.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, vec![b"a25".to_vec(), b"a3".to_vec()]);
        assert_eq!(ov.get(b"a1").unwrap(), None);
        assert_eq!(ov.get(b"b1").unwrap(), Some(b"base".to_vec()));
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }
}
