//! Ed25519 signature checks of change envelopes, one at a time or many at once, with
//! ed25519-zebra (ZIP 215 rules) plus one rule of ours.
//!
//! Every path accepts exactly the same signatures, whatever batch a signature arrives in,
//! because two honest nodes must never disagree about a change:
//! - The check is **cofactored**: `[8]([s]B - R - [k]A)` must be the identity, alone or
//!   summed over a batch with random weights. With the cofactorless check of
//!   `verify_strict`, a signer could put a small torsion component into its nonce; such a
//!   signature fails alone but passes a random batch one time in eight, so nodes batching
//!   differently would disagree. Cofactored, it passes everywhere. ZIP 215 specifies exactly
//!   this, alone and in batches.
//! - `s` must be canonical (ZIP 215), and the author key must not be of small order (ours: a
//!   weak key lets anyone sign "as" it; ZIP 215 allows one).
//! - A batch that fails is checked one signature at a time, so only the bad ones fail.
//!
//! This was a check written here on curve25519-dalek until the hostile-input work; the
//! tests keep it as the reference and show both accept the same signatures. ed25519-zebra
//! batches faster (it sums the terms of each author once; BENCHMARKS.md has both).
//!
//! Batch weights come from a ChaCha20 generator seeded by a hash of the whole batch, so the
//! verdict is a function of the batch alone (as ed25519-dalek's batch check derives its
//! weights), and a forger who cannot predict the weights before fixing the batch passes
//! with probability 2^-128.

use ed25519_dalek::VerifyingKey;
use ed25519_zebra::batch::{Item, Verifier};
use ed25519_zebra::{Signature, VerificationKeyBytes};
use rand_core::SeedableRng as _;
use sha2::{Digest as _, Sha512};

/// Domain separation for the batch weights.
const BATCH_CONTEXT: &[u8] = b"mesh/verify-batch/v2";

/// One signature, decoded and ready to check.
pub(crate) struct Prepared {
    item: Item,
    /// What the batch weights are derived from.
    transcript: [u8; 64],
}

/// Prepares a signature by `key` over `message`; `None` if it cannot be valid at all.
pub(crate) fn prepare(
    key: &VerifyingKey,
    message: &[u8],
    signature: &[u8; 64],
) -> Option<Prepared> {
    if key.is_weak() {
        return None;
    }
    let mut transcript = Sha512::new();
    transcript.update(key.as_bytes());
    transcript.update(signature);
    transcript.update(Sha512::digest(message));
    let item = Item::from((
        VerificationKeyBytes::from(key.to_bytes()),
        Signature::from_bytes(signature),
        message,
    ));
    Some(Prepared {
        item,
        transcript: transcript.finalize().into(),
    })
}

/// Checks one signature.
pub(crate) fn check_one(prepared: &Prepared) -> bool {
    prepared.item.clone().verify_single().is_ok()
}

/// Checks many signatures at once (tests; the node uses [`check_batch_refs`]): true only if
/// every one is valid (up to a chance of 2^-128 for a forged batch).
#[cfg(test)]
pub(crate) fn check_batch(items: &[Prepared]) -> bool {
    check_batch_refs(&items.iter().collect::<Vec<_>>())
}

/// [`check_batch`] over references.
pub(crate) fn check_batch_refs(items: &[&Prepared]) -> bool {
    match items {
        [] => true,
        [one] => check_one(one),
        _ => {
            let mut seed = Sha512::new();
            seed.update(BATCH_CONTEXT);
            for item in items {
                seed.update(item.transcript);
            }
            let seed: [u8; 64] = seed.finalize().into();
            let seed: [u8; 32] = seed[..32].try_into().expect("64 bytes");
            let mut batch = Verifier::new();
            for item in items {
                batch.queue(item.item.clone());
            }
            batch
                .verify(rand_chacha::ChaCha20Rng::from_seed(seed))
                .is_ok()
        }
    }
}

/// The check as it was written here on curve25519-dalek before ed25519-zebra took over:
/// the reference the differential test compares against.
#[cfg(test)]
mod reference {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
    use curve25519_dalek::scalar::Scalar;
    use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
    use ed25519_dalek::VerifyingKey;
    use sha2::{Digest as _, Sha512};

    /// Domain separation for the batch weights.
    const BATCH_CONTEXT: &[u8] = b"mesh/verify-batch/v1";

    /// One signature, decoded and ready to check.
    pub(super) struct Prepared {
        a: EdwardsPoint,
        r: EdwardsPoint,
        s: Scalar,
        k: Scalar,
        /// What the batch weights are derived from.
        transcript: [u8; 64],
    }

    /// Decodes a signature by `key` over `message`; `None` if it cannot be valid at all.
    pub(super) fn prepare(
        key: &VerifyingKey,
        message: &[u8],
        signature: &[u8; 64],
    ) -> Option<Prepared> {
        if key.is_weak() {
            return None;
        }
        let r_bytes: [u8; 32] = signature[..32].try_into().expect("64 bytes split in two");
        let s_bytes: [u8; 32] = signature[32..].try_into().expect("64 bytes split in two");
        let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))?;
        let r = CompressedEdwardsY(r_bytes).decompress()?;
        let mut hasher = Sha512::new();
        hasher.update(r_bytes);
        hasher.update(key.as_bytes());
        hasher.update(message);
        let hram: [u8; 64] = hasher.finalize().into();
        let k = Scalar::from_bytes_mod_order_wide(&hram);
        let mut transcript = Sha512::new();
        transcript.update(hram);
        transcript.update(s_bytes);
        Some(Prepared {
            a: key.to_edwards(),
            r,
            s,
            k,
            transcript: transcript.finalize().into(),
        })
    }

    /// Checks one signature.
    pub(super) fn check_one(item: &Prepared) -> bool {
        // [k](-A) + [s]B - R, times the cofactor.
        let sb_minus_ka =
            EdwardsPoint::vartime_double_scalar_mul_basepoint(&item.k, &(-item.a), &item.s);
        (sb_minus_ka - item.r).mul_by_cofactor().is_identity()
    }

    /// Checks many signatures at once (tests; the node uses [`check_batch_refs`]): true only if every one is valid (up to a chance of
    /// 2^-128 for a forged batch). Weights come from a hash of every input, as in
    /// ed25519-dalek's batch verification, so the result is a function of the batch alone.
    pub(super) fn check_batch(items: &[Prepared]) -> bool {
        check_batch_refs(&items.iter().collect::<Vec<_>>())
    }

    /// [`check_batch`] over references.
    pub(super) fn check_batch_refs(items: &[&Prepared]) -> bool {
        match items {
            [] => true,
            [one] => check_one(one),
            _ => {
                let mut seed = Sha512::new();
                seed.update(BATCH_CONTEXT);
                for item in items {
                    seed.update(item.transcript);
                }
                let seed: [u8; 64] = seed.finalize().into();
                let weights: Vec<Scalar> = (0..items.len() as u64)
                    .map(|index| {
                        let mut hasher = Sha512::new();
                        hasher.update(seed);
                        hasher.update(index.to_le_bytes());
                        let bytes: [u8; 64] = hasher.finalize().into();
                        let low: [u8; 16] = bytes[..16].try_into().expect("64 bytes");
                        Scalar::from(u128::from_le_bytes(low))
                    })
                    .collect();
                let basepoint: Scalar = -items
                    .iter()
                    .zip(&weights)
                    .map(|(item, weight)| weight * item.s)
                    .sum::<Scalar>();
                let scalars = std::iter::once(basepoint)
                    .chain(weights.iter().copied())
                    .chain(
                        items
                            .iter()
                            .zip(&weights)
                            .map(|(item, weight)| weight * item.k),
                    );
                let points = std::iter::once(ED25519_BASEPOINT_POINT)
                    .chain(items.iter().map(|item| item.r))
                    .chain(items.iter().map(|item| item.a));
                EdwardsPoint::vartime_multiscalar_mul(scalars, points)
                    .mul_by_cofactor()
                    .is_identity()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::EIGHT_TORSION;
    use curve25519_dalek::edwards::EdwardsPoint;
    use curve25519_dalek::scalar::Scalar;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(seed: u8, message: &[u8]) -> (VerifyingKey, [u8; 64]) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        (key.verifying_key(), key.sign(message).to_bytes())
    }

    /// A signature whose nonce carries a torsion component, made with the secret key: the
    /// cofactorless check refuses it, the cofactored one accepts it.
    fn torsioned(seed: u8, message: &[u8]) -> (VerifyingKey, [u8; 64]) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let expanded = Sha512::digest([seed; 32]);
        let mut secret: [u8; 32] = expanded[..32].try_into().unwrap();
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        let a_scalar = Scalar::from_bytes_mod_order(secret);
        let nonce = Scalar::from_bytes_mod_order_wide(&Sha512::digest(b"nonce").into());
        let r = EdwardsPoint::mul_base(&nonce) + EIGHT_TORSION[1];
        let r_bytes = r.compress().to_bytes();
        let mut hasher = Sha512::new();
        hasher.update(r_bytes);
        hasher.update(key.verifying_key().as_bytes());
        hasher.update(message);
        let k = Scalar::from_bytes_mod_order_wide(&hasher.finalize().into());
        let s = nonce + k * a_scalar;
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&r_bytes);
        signature[32..].copy_from_slice(s.as_bytes());
        (key.verifying_key(), signature)
    }

    #[test]
    fn good_signatures_pass_alone_and_in_batches_and_a_bad_one_fails_its_batch() {
        let messages: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 40]).collect();
        let items: Vec<Prepared> = messages
            .iter()
            .enumerate()
            .map(|(index, message)| {
                let (key, signature) = signed(index as u8 % 4 + 1, message);
                prepare(&key, message, &signature).unwrap()
            })
            .collect();
        assert!(items.iter().all(check_one));
        assert!(check_batch(&items));

        let (key, signature) = signed(1, b"one message");
        let wrong = prepare(&key, b"another message", &signature).unwrap();
        assert!(!check_one(&wrong));
        let mut mixed: Vec<Prepared> = messages
            .iter()
            .map(|message| {
                let (key, signature) = signed(2, message);
                prepare(&key, message, &signature).unwrap()
            })
            .collect();
        mixed.insert(7, wrong);
        assert!(!check_batch(&mixed));
    }

    #[test]
    fn a_torsioned_nonce_is_judged_the_same_alone_and_in_any_batch() {
        let (key, signature) = torsioned(9, b"crafted");
        assert!(
            key.verify_strict(
                b"crafted",
                &ed25519_dalek::Signature::from_bytes(&signature)
            )
            .is_err(),
            "the cofactorless check refuses it"
        );
        let crafted = || prepare(&key, b"crafted", &signature).unwrap();
        assert!(check_one(&crafted()));
        for size in 1..24u8 {
            let mut batch: Vec<Prepared> = (0..size)
                .map(|index| {
                    let message = [index; 8];
                    let (key, signature) = signed(3, &message);
                    prepare(&key, &message, &signature).unwrap()
                })
                .collect();
            batch.push(crafted());
            assert!(check_batch(&batch), "batch of {}", size + 1);
        }
    }

    #[test]
    fn weak_keys_and_non_canonical_scalars_are_refused() {
        let weak = VerifyingKey::from_bytes(&EIGHT_TORSION[0].compress().to_bytes()).unwrap();
        assert!(prepare(&weak, b"m", &[0; 64]).is_none());
        let (key, mut signature) = signed(5, b"m");
        signature[63] |= 0xf0;
        assert!(prepare(&key, b"m", &signature).is_none_or(|prepared| !check_one(&prepared)));
    }

    /// The verdict of the check this crate used before (curve25519-dalek, written here).
    fn reference(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
        super::reference::prepare(key, message, signature)
            .is_some_and(|prepared| super::reference::check_one(&prepared))
    }

    fn ours(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
        prepare(key, message, signature).is_some_and(|prepared| check_one(&prepared))
    }

    #[test]
    fn ed25519_zebra_with_our_rule_accepts_exactly_what_the_old_check_did() {
        let mut cases: Vec<(VerifyingKey, Vec<u8>, [u8; 64])> = Vec::new();
        for seed in 1..=40u8 {
            let message = vec![seed; seed as usize];
            let (key, signature) = signed(seed, &message);
            cases.push((key, message.clone(), signature));
            // Every single-bit flip of the signature, and another message.
            for bit in (0..512).step_by(7) {
                let mut flipped = signature;
                flipped[bit / 8] ^= 1 << (bit % 8);
                cases.push((key, message.clone(), flipped));
            }
            cases.push((key, b"another".to_vec(), signature));
            // A torsioned nonce, and a non-canonical s (s + l).
            let (tkey, tsig) = torsioned(seed, &message);
            cases.push((tkey, message.clone(), tsig));
            let s = Scalar::from_canonical_bytes(signature[32..].try_into().unwrap()).unwrap();
            let mut wide = [0u8; 32];
            // The group order l, little-endian.
            let mut l = [0u8; 32];
            l[..16].copy_from_slice(&[
                0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
                0xde, 0x14,
            ]);
            l[31] = 0x10;
            let mut carry = 0u16;
            for index in 0..32 {
                let sum = u16::from(s.as_bytes()[index]) + u16::from(l[index]) + carry;
                wide[index] = sum as u8;
                carry = sum >> 8;
            }
            let mut non_canonical = signature;
            non_canonical[32..].copy_from_slice(&wide);
            cases.push((key, message.clone(), non_canonical));
        }
        // R as a non-canonical encoding (y + p) of a valid point, where one exists.
        let (key, signature) = signed(3, b"m");
        let mut r = signature;
        r[0] = r[0].wrapping_add(19);
        r[31] |= 0x7f;
        cases.push((key, b"m".to_vec(), r));
        let mut accepted = 0;
        for (key, message, signature) in &cases {
            let (a, b) = (
                ours(key, message, signature),
                reference(key, message, signature),
            );
            assert_eq!(a, b, "verdicts differ for key {:?}", key.as_bytes());
            accepted += usize::from(a);
        }
        // And in batches: every window of the cases, as a batch, gets the same verdict from
        // both, which is "all of them valid".
        for window in cases.chunks(7) {
            let ours: Vec<Prepared> = window
                .iter()
                .filter_map(|(key, message, signature)| prepare(key, message, signature))
                .collect();
            let theirs: Vec<super::reference::Prepared> = window
                .iter()
                .filter_map(|(key, message, signature)| {
                    super::reference::prepare(key, message, signature)
                })
                .collect();
            // A batch passes if and only if every signature in it is valid.
            let ours_valid = window
                .iter()
                .filter(|(k, m, s)| prepare(k, m, s).is_some())
                .all(|(k, m, s)| reference(k, m, s));
            let theirs_valid = window
                .iter()
                .filter(|(k, m, s)| super::reference::prepare(k, m, s).is_some())
                .all(|(k, m, s)| reference(k, m, s));
            assert_eq!(check_batch(&ours), ours_valid);
            assert_eq!(super::reference::check_batch(&theirs), theirs_valid);
        }
        // Both accepted the honest and torsioned signatures, and refused the rest.
        assert_eq!(accepted, 80, "of {} cases", cases.len());
        // The one rule ed25519-zebra lacks: a small-order key.
        let weak = VerifyingKey::from_bytes(&EIGHT_TORSION[0].compress().to_bytes()).unwrap();
        assert!(!ours(&weak, b"m", &[0; 64]) && !reference(&weak, b"m", &[0; 64]));
        assert!(
            ed25519_zebra::VerificationKey::try_from(weak.to_bytes()).is_ok(),
            "ed25519-zebra alone takes a small-order key; the extra rule refuses it"
        );
    }
}
