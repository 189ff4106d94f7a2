//! A bounded memory of verifications already done, so a hot request path does not repeat an
//! expensive check on the same input: an X.509-SVID chain per connection's leaf certificate,
//! an Ed25519 signature per introspected token (about 60 µs each on this machine, a quarter
//! of the CPU an introspection costs under load, since a resource server asks about the same
//! token many times).
//!
//! Correctness: an entry only says "this exact input passed this check, with this result";
//! the caller keys it by the whole input (the leaf's DER, or a SHA-256 of the token with the
//! key it was verified under), and checks what can change since (expiry, revocation, whether
//! the key is still published) on every request, outside the cache.
//!
//! Bounds: two generations of at most `capacity / 2` entries each. When the young one fills,
//! the old one is dropped and the young one becomes old; a hit in the old generation moves the
//! entry back to the young one. So memory stays under `capacity` entries, entries in use stay,
//! and no eviction costs more than dropping a map.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

pub struct Verified<K, V> {
    generations: Mutex<(HashMap<K, V>, HashMap<K, V>)>,
    half: usize,
}

impl<K: Hash + Eq, V: Clone> Verified<K, V> {
    pub fn new(capacity: usize) -> Self {
        Verified {
            generations: Mutex::new((HashMap::new(), HashMap::new())),
            half: (capacity / 2).max(1),
        }
    }

    /// What was recorded for `key`, if it is still remembered.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut g = self.generations.lock().expect("verification cache lock");
        if let Some(v) = g.0.get(key) {
            return Some(v.clone());
        }
        let (k, v) = g.1.remove_entry(key)?;
        Self::insert_young(&mut g, self.half, k, v.clone());
        Some(v)
    }

    pub fn insert(&self, key: K, value: V) {
        let mut g = self.generations.lock().expect("verification cache lock");
        Self::insert_young(&mut g, self.half, key, value);
    }

    fn insert_young(g: &mut (HashMap<K, V>, HashMap<K, V>), half: usize, key: K, value: V) {
        if g.0.len() >= half && !g.0.contains_key(&key) {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(key, value);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.generations.lock().unwrap();
        g.0.len() + g.1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_stays_within_its_capacity_and_keeps_what_is_used() {
        let cache = Verified::new(8);
        for k in 0..4u32 {
            cache.insert(k, k * 10);
        }
        // 0..4 fill the young generation; 4 makes them old.
        cache.insert(4, 40);
        // A hit on an old entry brings it back.
        assert_eq!(cache.get(&0), Some(0));
        for k in 5..8u32 {
            cache.insert(k, k * 10);
        }
        assert!(cache.len() <= 8, "{}", cache.len());
        // Another turn over: what was not used since is gone, what was used stays.
        cache.insert(8, 80);
        assert_eq!(cache.get(&0), Some(0), "used, so kept");
        assert_eq!(cache.get(&1), None, "unused for two generations");
        for k in 100..1000u32 {
            cache.insert(k, k);
            assert!(cache.len() <= 8);
        }
        assert_eq!(cache.get(&999), Some(999));
        assert_eq!(cache.get(&7), None);
    }
}
