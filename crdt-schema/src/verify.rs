//! Ed25519 signature checks of change envelopes, one at a time or many at once.
//!
//! Every path accepts exactly the same signatures, whatever batch a signature arrives in,
//! because two honest nodes must never disagree about a change:
//! - The check is **cofactored**: `[8]([s]B - R - [k]A)` must be the identity, alone or
//!   summed over a batch with random weights. With the cofactorless check of
//!   `verify_strict`, a signer could put a small torsion component into its nonce; such a
//!   signature fails alone but passes a random batch one time in eight, so nodes batching
//!   differently would disagree. Cofactored, it passes everywhere.
//! - `s` must be canonical and the author key must not be of small order (a weak key lets
//!   anyone sign "as" it).
//! - A batch that fails is checked one signature at a time, so only the bad ones fail.
//!
//! Batching costs about a third to a half of one check per signature (one multiscalar
//! multiplication for the whole batch), which is what keeps verification from dominating
//! the receive path (see BENCHMARKS.md).

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha512};

/// Domain separation for the batch weights.
const BATCH_CONTEXT: &[u8] = b"mesh/verify-batch/v1";

/// One signature, decoded and ready to check.
pub(crate) struct Prepared {
    a: EdwardsPoint,
    r: EdwardsPoint,
    s: Scalar,
    k: Scalar,
    /// What the batch weights are derived from.
    transcript: [u8; 64],
}

/// Decodes a signature by `key` over `message`; `None` if it cannot be valid at all.
pub(crate) fn prepare(
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
pub(crate) fn check_one(item: &Prepared) -> bool {
    // [k](-A) + [s]B - R, times the cofactor.
    let sb_minus_ka =
        EdwardsPoint::vartime_double_scalar_mul_basepoint(&item.k, &(-item.a), &item.s);
    (sb_minus_ka - item.r).mul_by_cofactor().is_identity()
}

/// Checks many signatures at once (tests; the node uses [`check_batch_refs`]): true only if every one is valid (up to a chance of
/// 2^-128 for a forged batch). Weights come from a hash of every input, as in
/// ed25519-dalek's batch verification, so the result is a function of the batch alone.
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

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::EIGHT_TORSION;
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
        assert!(prepare(&key, b"m", &signature).is_none());
    }
}
