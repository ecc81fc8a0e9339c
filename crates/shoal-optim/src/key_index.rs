//! The key -> slot index of the sparse table: open addressing with linear probing over
//! two flat arrays (keys, slots: 12 bytes a bucket, no padding, no control bytes), a
//! capacity that grows by a quarter (not doubling) and a load of up to 90%, so the index
//! costs 13.3 to 16.7 bytes per row instead of a general map's 20 to 40.

use crate::hash::mix64;

/// A bucket holding no key.
const EMPTY: u32 = u32::MAX;
/// Highest load before growing, as a fraction num/den.
const LOAD: (usize, usize) = (9, 10);

/// Maps distinct `u64` keys to `u32` slots (`u32::MAX` is reserved).
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyIndex {
    keys: Vec<u64>,
    slots: Vec<u32>,
    len: usize,
}

impl KeyIndex {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes of the two bucket arrays.
    pub fn bytes(&self) -> usize {
        self.keys.capacity() * 8 + self.slots.capacity() * 4
    }

    /// The first bucket to probe for `key` (the hash scaled onto the capacity: any
    /// capacity works, not only powers of two).
    fn home(&self, key: u64) -> usize {
        ((mix64(key) as u128 * self.keys.len() as u128) >> 64) as usize
    }

    /// The bucket holding `key`, or the empty bucket where it would go.
    fn find(&self, key: u64) -> (usize, bool) {
        let cap = self.keys.len();
        let mut b = self.home(key);
        loop {
            if self.slots[b] == EMPTY {
                return (b, false);
            }
            if self.keys[b] == key {
                return (b, true);
            }
            b += 1;
            if b == cap {
                b = 0;
            }
        }
    }

    pub fn get(&self, key: u64) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        match self.find(key) {
            (b, true) => Some(self.slots[b]),
            _ => None,
        }
    }

    /// Adds `key -> slot` unless `key` is there; returns whether it was added.
    pub fn insert_new(&mut self, key: u64, slot: u32) -> bool {
        debug_assert!(slot != EMPTY);
        if (self.len + 1) * LOAD.1 > self.keys.len() * LOAD.0 {
            let cap = self.keys.len();
            self.rebuild((cap + cap / 4).max(1024));
        }
        match self.find(key) {
            (_, true) => false,
            (b, false) => {
                self.keys[b] = key;
                self.slots[b] = slot;
                self.len += 1;
                true
            }
        }
    }

    /// Every (key, slot), in bucket order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.keys
            .iter()
            .zip(&self.slots)
            .filter(|(_, &s)| s != EMPTY)
            .map(|(&k, &s)| (k, s))
    }

    /// Gives every entry the slot `new_slot(slot)`, dropping those it maps to `None`,
    /// and fits the capacity to what is left.
    pub fn remap(&mut self, new_slot: impl Fn(u32) -> Option<u32>) {
        let kept: Vec<(u64, u32)> = self
            .iter()
            .filter_map(|(k, s)| new_slot(s).map(|n| (k, n)))
            .collect();
        self.clear_to(kept.len());
        for (k, s) in kept {
            self.insert_new(k, s);
        }
    }

    /// Empties the index, sized for `n` keys.
    pub fn clear_to(&mut self, n: usize) {
        self.len = 0;
        self.keys = Vec::new();
        self.slots = Vec::new();
        let cap = (n * LOAD.1).div_ceil(LOAD.0) + 1;
        self.rebuild(cap.max(1024));
    }

    /// Moves every entry into `cap` buckets.
    fn rebuild(&mut self, cap: usize) {
        let old_keys = std::mem::replace(&mut self.keys, vec![0; cap]);
        let old_slots = std::mem::replace(&mut self.slots, vec![EMPTY; cap]);
        for (k, s) in old_keys.into_iter().zip(old_slots) {
            if s != EMPTY {
                let (b, _) = self.find(k);
                self.keys[b] = k;
                self.slots[b] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Against the standard map: inserts (new and repeated), lookups of present and
    /// absent keys, growth through several capacities, remapping with removals.
    #[test]
    fn behaves_as_a_map() {
        let mut ix = KeyIndex::default();
        let mut reference: HashMap<u64, u32> = HashMap::new();
        let mut x = 1u64;
        for i in 0..50_000u32 {
            // Some sequential keys (a poor hash would cluster them), some random, some repeated.
            x = mix64(x);
            let key = match i % 3 {
                0 => i as u64,
                1 => x,
                _ => (x % 1000) * 7,
            };
            let fresh = !reference.contains_key(&key);
            if fresh {
                reference.insert(key, i);
            }
            assert_eq!(ix.insert_new(key, i), fresh);
        }
        assert_eq!(ix.len(), reference.len());
        for (&k, &s) in &reference {
            assert_eq!(ix.get(k), Some(s));
        }
        for k in 1_000_000..1_001_000u64 {
            assert_eq!(ix.get(k), reference.get(&k).copied());
        }
        let mut pairs: Vec<(u64, u32)> = ix.iter().collect();
        pairs.sort();
        let mut want: Vec<(u64, u32)> = reference.iter().map(|(&k, &s)| (k, s)).collect();
        want.sort();
        assert_eq!(pairs, want);
        // The load stays within bounds, so the index costs 12/0.9 to 12/0.72 bytes a key.
        let per_key = ix.bytes() as f64 / ix.len() as f64;
        assert!((13.3..=16.8).contains(&per_key), "{per_key} bytes per key");
        // Remap: drop odd slots, halve the even ones.
        ix.remap(|s| (s % 2 == 0).then_some(s / 2));
        for (&k, &s) in &reference {
            assert_eq!(ix.get(k), (s % 2 == 0).then_some(s / 2));
        }
        assert_eq!(ix.len(), reference.values().filter(|s| *s % 2 == 0).count());
    }
}
