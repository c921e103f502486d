//! The signatures of a record's durable changes, as a sorted vector.
//!
//! Every record in the index holds one of these, so its size is what 100,000 records cost:
//! a `BTreeMap` allocates a node of eleven slots (about 1 KB of hashes and signatures) for
//! even one change, where this holds exactly 96 bytes per change. Records have few changes
//! each, so inserting into the middle of the vector is cheap.

use crdt_schema::ChangeHash;

/// The signatures of a record's changes, by change hash, in hash order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signatures(Vec<(ChangeHash, [u8; 64])>);

impl Signatures {
    /// Whether the change `hash` has its signature here.
    pub fn contains_key(&self, hash: &ChangeHash) -> bool {
        self.position(hash).is_ok()
    }

    /// The signature of the change `hash`.
    pub fn get(&self, hash: &ChangeHash) -> Option<&[u8; 64]> {
        self.position(hash).ok().map(|index| &self.0[index].1)
    }

    /// Adds (or replaces) the signature of `hash`.
    pub fn insert(&mut self, hash: ChangeHash, signature: [u8; 64]) {
        match self.position(&hash) {
            Ok(index) => self.0[index].1 = signature,
            Err(index) => {
                // Exactly one more: `Vec` would otherwise round a first insert up to four
                // slots (384 bytes), for every record.
                self.0.reserve_exact(1);
                self.0.insert(index, (hash, signature));
            }
        }
    }

    /// Forgets every signature.
    pub fn clear(&mut self) {
        self.0 = Vec::new();
    }

    /// Number of signatures.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every (hash, signature), in hash order.
    pub fn iter(&self) -> impl Iterator<Item = (&ChangeHash, &[u8; 64])> {
        self.0.iter().map(|(hash, signature)| (hash, signature))
    }

    fn position(&self, hash: &ChangeHash) -> Result<usize, usize> {
        self.0.binary_search_by(|(held, _)| held.cmp(hash))
    }
}

impl Signatures {
    /// Signatures in any order, sorted in place; a hash given twice keeps the last.
    pub fn from_unsorted(mut all: Vec<(ChangeHash, [u8; 64])>) -> Signatures {
        // Stable, so of equal hashes the last given ends last.
        all.sort_by_key(|(hash, _)| *hash);
        // `dedup_by` removes `later` when it returns true: keep its signature first.
        all.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = later.1;
            }
            same
        });
        all.shrink_to_fit();
        Signatures(all)
    }
}

impl FromIterator<(ChangeHash, [u8; 64])> for Signatures {
    /// Collects signatures in any order; a hash given twice keeps the last signature.
    fn from_iter<I: IntoIterator<Item = (ChangeHash, [u8; 64])>>(iter: I) -> Signatures {
        Signatures::from_unsorted(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a `BTreeMap` doing the same inserts: same lookups, same order.
        #[test]
        fn behaves_as_a_map_in_hash_order(
            inserts in proptest::collection::vec((0u8..16, any::<u8>()), 0..40),
            collected in proptest::collection::vec((0u8..16, any::<u8>()), 0..40),
        ) {
            let hash = |byte: u8| ChangeHash([byte; 32]);
            let mut signatures = Signatures::default();
            let mut model = BTreeMap::new();
            for (key, value) in inserts {
                signatures.insert(hash(key), [value; 64]);
                model.insert(hash(key), [value; 64]);
            }
            prop_assert_eq!(signatures.len(), model.len());
            for key in 0u8..16 {
                prop_assert_eq!(signatures.get(&hash(key)), model.get(&hash(key)));
                prop_assert_eq!(signatures.contains_key(&hash(key)), model.contains_key(&hash(key)));
            }
            prop_assert!(signatures.iter().eq(model.iter()));

            let from: Signatures = collected.iter().map(|(key, value)| (hash(*key), [*value; 64])).collect();
            let model: BTreeMap<_, _> = collected.iter().map(|(key, value)| (hash(*key), [*value; 64])).collect();
            prop_assert!(from.iter().eq(model.iter()));
        }
    }
}
