//! Digests of record sets: equal digests mean equal records.
//!
//! Each record contributes an item hash, `sha256(key, 0, heads...)`. A set's accumulator
//! is the sum of its item hashes modulo 2^256 plus the count; its fingerprint is a hash
//! of that. Addition makes the accumulator incremental (a record changing heads subtracts
//! its old item hash and adds the new one) and order-free, so any key range of the index
//! has a fingerprint that two nodes compute alike: the basis of range-based set
//! reconciliation. XOR was rejected because two equal items cancel out.

use std::fmt;

use crdt_schema::ChangeHash;
use sha2::{Digest as _, Sha256};

/// Bytes of a range fingerprint on the wire: ample against accidental collision between
/// honest nodes, and half the size of a full hash.
pub const FINGERPRINT_LEN: usize = 16;

/// One record's contribution to a digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ItemHash([u8; 32]);

/// Sum of item hashes modulo 2^256, with the number of items.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Accumulator {
    limbs: [u64; 4],
    count: u64,
}

/// The digest of a whole node or range, as shown to users and compared between nodes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

/// A short fingerprint of a range, as sent on the wire.
pub type Fingerprint = [u8; FINGERPRINT_LEN];

impl ItemHash {
    /// The item hash of a record with these heads.
    pub fn of(key: &str, heads: &[ChangeHash]) -> ItemHash {
        let mut hasher = Sha256::new();
        hasher.update(b"mesh/item/v1");
        hasher.update((key.len() as u32).to_be_bytes());
        hasher.update(key.as_bytes());
        for head in heads {
            hasher.update(head.0);
        }
        ItemHash(hasher.finalize().into())
    }

    fn limbs(&self) -> [u64; 4] {
        std::array::from_fn(|index| {
            u64::from_le_bytes(
                self.0[index * 8..index * 8 + 8]
                    .try_into()
                    .expect("8 bytes"),
            )
        })
    }
}

impl Accumulator {
    /// Adds one item.
    pub fn add(&mut self, item: &ItemHash) {
        let mut carry = false;
        for (limb, add) in self.limbs.iter_mut().zip(item.limbs()) {
            let (sum, overflow_a) = limb.overflowing_add(add);
            let (sum, overflow_b) = sum.overflowing_add(u64::from(carry));
            *limb = sum;
            carry = overflow_a || overflow_b;
        }
        self.count += 1;
    }

    /// Removes one item that was added before.
    pub fn remove(&mut self, item: &ItemHash) {
        assert!(self.count > 0, "removing from an empty accumulator");
        let mut borrow = false;
        for (limb, sub) in self.limbs.iter_mut().zip(item.limbs()) {
            let (difference, underflow_a) = limb.overflowing_sub(sub);
            let (difference, underflow_b) = difference.overflowing_sub(u64::from(borrow));
            *limb = difference;
            borrow = underflow_a || underflow_b;
        }
        self.count -= 1;
    }

    /// Number of items.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest of the items added.
    pub fn digest(&self) -> Digest {
        let mut hasher = Sha256::new();
        hasher.update(b"mesh/digest/v1");
        for limb in self.limbs {
            hasher.update(limb.to_le_bytes());
        }
        hasher.update(self.count.to_le_bytes());
        Digest(hasher.finalize().into())
    }

    /// The short fingerprint of the items added, for reconciliation messages.
    pub fn fingerprint(&self) -> Fingerprint {
        self.digest().0[..FINGERPRINT_LEN]
            .try_into()
            .expect("digest is longer than a fingerprint")
    }
}

impl Digest {
    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..16] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str) -> ItemHash {
        ItemHash::of(key, &[ChangeHash([7; 32])])
    }

    #[test]
    fn order_does_not_matter_and_remove_undoes_add() {
        let (mut forward, mut backward) = (Accumulator::default(), Accumulator::default());
        let keys = ["a/1", "a/2", "b/1", "c/9"];
        keys.iter().for_each(|key| forward.add(&item(key)));
        keys.iter().rev().for_each(|key| backward.add(&item(key)));
        assert_eq!(forward.digest(), backward.digest());
        forward.remove(&item("b/1"));
        assert_ne!(forward.digest(), backward.digest());
        forward.add(&item("b/1"));
        assert_eq!(forward.digest(), backward.digest());
    }

    #[test]
    fn a_duplicated_item_does_not_cancel_out() {
        let mut twice = Accumulator::default();
        twice.add(&item("a/1"));
        twice.add(&item("a/1"));
        assert_ne!(twice.digest(), Accumulator::default().digest());
    }
}
