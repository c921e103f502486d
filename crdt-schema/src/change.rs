//! Signed change envelopes.
//!
//! Every Automerge change travels and is stored inside an envelope: the record it belongs
//! to, the raw change bytes, and the author's ed25519 signature over
//! `(org id, record, change hash)`. Binding the record stops a valid change from being
//! replayed into another record; binding the org stops it crossing organisations.
//!
//! Verification works on the bytes as received: the change hash is computed by Automerge
//! from the raw change chunk, and the author is the change's own actor id, so nothing is
//! re-encoded before it is checked.
//!
//! Encoding, all integers big-endian:
//! `[version u8 = 1][record len u16][record utf-8][change len u32][change][signature 64]`.

use automerge::{Change, ChangeHash};
use sha2::Digest as _;

use crate::identity::{Identity, NodeId, OrgId};
use crate::record::RecordId;

/// The envelope format version.
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Largest change an envelope may carry, in bytes.
pub const CHANGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Domain separation for change signatures.
const SIGNING_CONTEXT: &[u8] = b"mesh/change/v1";

/// A change with its signature, as bytes that can be stored and sent unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    bytes: Vec<u8>,
}

/// A change whose envelope parsed and whose signature is valid for its author.
///
/// Only [`Envelope::verify`] and [`VerifiedChange::sign`] make one, so a function that
/// takes a `VerifiedChange` needs no further signature check.
#[derive(Clone, Debug)]
pub struct VerifiedChange {
    /// The record the author signed the change for.
    pub record: RecordId,
    /// The change's author: its Automerge actor id.
    pub author: NodeId,
    /// The parsed change.
    pub change: Change,
    /// The envelope exactly as received or made.
    pub envelope: Envelope,
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes end early, run long, or carry an unknown version.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The record address inside is invalid.
    #[error("envelope names an invalid record: {0}")]
    Record(String),
    /// Automerge cannot parse the change.
    #[error("envelope carries a change automerge cannot read: {0}")]
    Change(String),
    /// The change's actor id is not an ed25519 public key.
    #[error("the change's author is not a node key")]
    Author,
    /// The signature does not match the author, org, record and change hash.
    #[error("bad signature for change {hash} by {author} on {record}")]
    Signature {
        /// The record named in the envelope.
        record: String,
        /// The change's author.
        author: String,
        /// The change's hash.
        hash: String,
    },
}

/// The bytes a change signature covers, for code that checks signatures another way (a
/// benchmark against another ed25519 crate).
pub fn signed_message_for(org: &OrgId, record: &RecordId, hash: &ChangeHash) -> Vec<u8> {
    signed_message(org, record, hash)
}

/// The bytes a change signature covers.
pub(crate) fn signed_message(org: &OrgId, record: &RecordId, hash: &ChangeHash) -> Vec<u8> {
    let record = record.as_str().as_bytes();
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + 32 + 2 + record.len() + 32);
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(org.as_bytes());
    message.extend_from_slice(&(record.len() as u16).to_be_bytes());
    message.extend_from_slice(record);
    message.extend_from_slice(&hash.0);
    message
}

impl Envelope {
    /// Wraps bytes received from a peer or read from the log; nothing is checked until
    /// [`Envelope::verify`].
    pub fn from_bytes(bytes: Vec<u8>) -> Envelope {
        Envelope { bytes }
    }

    /// The encoded envelope.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded envelope, consumed.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the envelope is empty (never true for a valid one).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Builds an envelope from its parts.
    pub fn encode(
        record: &RecordId,
        change_bytes: &[u8],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Envelope {
        let key = record.as_str().as_bytes();
        let mut bytes =
            Vec::with_capacity(1 + 2 + key.len() + 4 + change_bytes.len() + SIGNATURE_LEN);
        bytes.push(ENVELOPE_VERSION);
        bytes.extend_from_slice(&(key.len() as u16).to_be_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(&(change_bytes.len() as u32).to_be_bytes());
        bytes.extend_from_slice(change_bytes);
        bytes.extend_from_slice(signature);
        Envelope { bytes }
    }

    /// Splits the envelope into (record text, change bytes, signature) without judging them.
    fn parts(&self) -> Result<(&str, &[u8], &[u8; SIGNATURE_LEN]), VerifyError> {
        let bytes = &self.bytes[..];
        let (&version, rest) = bytes.split_first().ok_or(VerifyError::Malformed("empty"))?;
        if version != ENVELOPE_VERSION {
            return Err(VerifyError::Malformed("unknown envelope version"));
        }
        let (key_len, rest) = split_be::<2>(rest)?;
        let key_len = u16::from_be_bytes(key_len) as usize;
        if rest.len() < key_len {
            return Err(VerifyError::Malformed("truncated record"));
        }
        let (key, rest) = rest.split_at(key_len);
        let key =
            std::str::from_utf8(key).map_err(|_| VerifyError::Malformed("record is not utf-8"))?;
        let (change_len, rest) = split_be::<4>(rest)?;
        let change_len = u32::from_be_bytes(change_len) as usize;
        if change_len > CHANGE_BYTES_MAX {
            return Err(VerifyError::Malformed("change too large"));
        }
        if rest.len() != change_len + SIGNATURE_LEN {
            return Err(VerifyError::Malformed("length does not match its header"));
        }
        let (change, signature) = rest.split_at(change_len);
        let signature: &[u8; SIGNATURE_LEN] = signature.try_into().expect("length checked above");
        Ok((key, change, signature))
    }

    /// The record named in the envelope, without verifying anything else. For routing
    /// only: trust nothing in it until [`Envelope::verify`] succeeds.
    pub fn record_unverified(&self) -> Option<RecordId> {
        self.parts().ok()?.0.parse().ok()
    }

    /// Parses the change and checks the signature against the change's own actor id.
    pub fn verify(&self, org: &OrgId) -> Result<VerifiedChange, VerifyError> {
        self.verify_with(org, &mut KeyCache::default())
    }

    /// Like [`Envelope::verify`], reusing decompressed author keys from `keys`: a node
    /// verifies many changes by few authors, and decompressing a key costs about a sixth
    /// of a verification.
    pub fn verify_with(
        &self,
        org: &OrgId,
        keys: &mut KeyCache,
    ) -> Result<VerifiedChange, VerifyError> {
        self.parse()?.verify(org, keys)
    }

    /// The record key and change hash the bytes claim, computed without parsing the change:
    /// Automerge's change hash is SHA-256 over the chunk after its magic and checksum. Lets
    /// a receiver drop a copy of a change it holds for the price of one hash; anything
    /// else must go through [`Envelope::parse`].
    pub fn claimed_identity(&self) -> Option<(&str, ChangeHash)> {
        let (record, change, _) = self.parts().ok()?;
        let chunk = change.get(8..)?;
        let hash: [u8; 32] = sha2::Sha256::digest(chunk).into();
        Some((record, ChangeHash(hash)))
    }

    /// Parses the envelope and its change without checking the signature, so a receiver can
    /// recognise a change it already holds before paying for a verification. Nothing in a
    /// [`ParsedEnvelope`] may be trusted until [`ParsedEnvelope::verify`] succeeds.
    pub fn parse(&self) -> Result<ParsedEnvelope, VerifyError> {
        let (record_key, change_bytes, signature) = self.parts()?;
        let record: RecordId = record_key
            .parse()
            .map_err(|error: crate::record::NameError| VerifyError::Record(error.to_string()))?;
        let change = read_change(change_bytes)?;
        Ok(ParsedEnvelope {
            record,
            change,
            signature: *signature,
            envelope: self.clone(),
        })
    }
}

/// The four bytes every Automerge chunk starts with.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type byte (after the magic and checksum) of an uncompressed change.
const CHUNK_TYPE_CHANGE: u8 = 1;

/// The one door between change bytes this node did not make and Automerge: parses a change
/// only if nothing about it can hurt the node later.
///
/// Refused, with a reason and without panicking:
/// - any chunk but an uncompressed change, checked before Automerge sees the bytes, so a
///   compressed chunk is never inflated (a 510 KB chunk inflated to 1.5 GiB);
/// - bytes Automerge cannot parse, or whose parse or decode panics (caught);
/// - a checksum that does not match the contents;
/// - a change that does not re-encode to exactly the bytes received. Automerge drops unknown
///   columns and accepts non-canonical runs, while the hash, and so the signature, covers the
///   bytes as received; such a change applies, but the document can then no longer be saved
///   and loaded, and it is served back under another hash. Honest changes are canonical.
///
/// Whether a change applies depends on the document it meets: [`RecordDoc::apply`] is the
/// second half of the door.
///
/// [`RecordDoc::apply`]: crate::record::RecordDoc::apply
pub fn read_change(change_bytes: &[u8]) -> Result<Change, VerifyError> {
    if change_bytes.len() < 9 || change_bytes[..4] != CHUNK_MAGIC {
        return Err(VerifyError::Change("not an automerge chunk".into()));
    }
    if change_bytes[8] != CHUNK_TYPE_CHANGE {
        return Err(VerifyError::Change(format!(
            "chunk type {} is not an uncompressed change",
            change_bytes[8]
        )));
    }
    let change = crate::guard::no_panic("parsing the change", || {
        Change::from_bytes(change_bytes.to_vec())
            .map_err(|error| VerifyError::Change(error.to_string()))
    })?;
    // Automerge parses a change whose checksum field is wrong; the checksum is the
    // first four bytes of the hash, so a mismatch means the bytes were altered.
    if change_bytes.get(4..8) != Some(&change.hash().0[..4]) {
        return Err(VerifyError::Change(
            "checksum does not match contents".into(),
        ));
    }
    let canonical = crate::guard::no_panic("decoding the change", || {
        Ok(Change::from(change.decode()).raw_bytes() == change_bytes)
    })?;
    if !canonical {
        return Err(VerifyError::Change(
            "the change is not canonically encoded (it would re-encode to other bytes)".into(),
        ));
    }
    Ok(change)
}

/// An envelope whose framing and change parsed, but whose signature is not yet checked.
pub struct ParsedEnvelope {
    /// The record the envelope names (unverified).
    record: RecordId,
    /// The parsed change (unverified authorship). Private, like the record: what is
    /// verified must be exactly what was parsed from the envelope's bytes.
    change: Change,
    signature: [u8; SIGNATURE_LEN],
    envelope: Envelope,
}

impl ParsedEnvelope {
    /// The record the envelope names (not yet verified).
    pub fn record(&self) -> &RecordId {
        &self.record
    }

    /// The change's hash, computed from the bytes received.
    pub fn hash(&self) -> ChangeHash {
        self.change.hash()
    }

    /// Checks the signature against the change's own actor id.
    pub fn verify(self, org: &OrgId, keys: &mut KeyCache) -> Result<VerifiedChange, VerifyError> {
        let ParsedEnvelope {
            record,
            change,
            signature,
            envelope,
        } = self;
        let (author, key) = keys.key(change.actor_id().to_bytes())?;
        let message = signed_message(org, &record, &change.hash());
        let valid = crate::verify::prepare(&key, &message, &signature)
            .is_some_and(|prepared| crate::verify::check_one(&prepared));
        if !valid {
            return Err(VerifyError::Signature {
                record: record.to_string(),
                author: author.to_string(),
                hash: change.hash().to_string(),
            });
        }
        Ok(VerifiedChange {
            record,
            author,
            change,
            envelope,
        })
    }
}

impl ParsedEnvelope {
    /// Like [`ParsedEnvelope::verify`], but first asks `cache` whether these exact bytes
    /// already passed verification for `org`, and records them when they pass now. The
    /// cache holds only digests of envelopes that passed a real check, so a hit is as good
    /// as a verification.
    pub fn verify_cached(
        self,
        org: &OrgId,
        keys: &mut KeyCache,
        cache: &VerifiedCache,
    ) -> Result<VerifiedChange, VerifyError> {
        let digest = cache.digest(org, self.envelope.as_bytes());
        if cache.contains(&digest) {
            let author = NodeId::from_slice(self.change.actor_id().to_bytes())
                .map_err(|_| VerifyError::Author)?;
            let ParsedEnvelope {
                record,
                change,
                envelope,
                ..
            } = self;
            return Ok(VerifiedChange {
                record,
                author,
                change,
                envelope,
            });
        }
        let verified = self.verify(org, keys)?;
        cache.insert(digest);
        Ok(verified)
    }
}

/// Verifies many envelopes at once (one multiscalar multiplication for all; see
/// `verify.rs`), skipping those `cache` already holds. Each result is exactly what
/// [`ParsedEnvelope::verify`] would give for that envelope alone.
pub fn verify_all(
    org: &OrgId,
    keys: &mut KeyCache,
    cache: Option<&VerifiedCache>,
    parsed: Vec<ParsedEnvelope>,
) -> Vec<Result<VerifiedChange, VerifyError>> {
    struct Pending {
        index: usize,
        parsed: ParsedEnvelope,
        author: NodeId,
        prepared: Option<crate::verify::Prepared>,
        digest: Option<[u8; 32]>,
    }
    let mut results: Vec<Option<Result<VerifiedChange, VerifyError>>> =
        (0..parsed.len()).map(|_| None).collect();
    let mut pending = Vec::new();
    for (index, parsed) in parsed.into_iter().enumerate() {
        let digest = cache.map(|cache| cache.digest(org, parsed.envelope.as_bytes()));
        if let (Some(cache), Some(digest)) = (cache, &digest)
            && cache.contains(digest)
        {
            results[index] = Some(parsed.verify_cached(org, keys, cache));
            continue;
        }
        let (author, key) = match keys.key(parsed.change.actor_id().to_bytes()) {
            Ok(found) => found,
            Err(error) => {
                results[index] = Some(Err(error));
                continue;
            }
        };
        let message = signed_message(org, &parsed.record, &parsed.change.hash());
        let prepared = crate::verify::prepare(&key, &message, &parsed.signature);
        pending.push(Pending {
            index,
            parsed,
            author,
            prepared,
            digest,
        });
    }
    // One check for the whole batch; if it fails, each signature alone finds the bad ones.
    let all_prepared = pending.iter().all(|item| item.prepared.is_some());
    let batch_ok = all_prepared && {
        let items: Vec<&crate::verify::Prepared> = pending
            .iter()
            .filter_map(|item| item.prepared.as_ref())
            .collect();
        crate::verify::check_batch_refs(&items)
    };
    for item in pending {
        let valid = batch_ok || item.prepared.as_ref().is_some_and(crate::verify::check_one);
        let ParsedEnvelope {
            record,
            change,
            envelope,
            ..
        } = item.parsed;
        results[item.index] = Some(if valid {
            if let (Some(cache), Some(digest)) = (cache, item.digest) {
                cache.insert(digest);
            }
            Ok(VerifiedChange {
                record,
                author: item.author,
                change,
                envelope,
            })
        } else {
            Err(VerifyError::Signature {
                record: record.to_string(),
                author: item.author.to_string(),
                hash: change.hash().to_string(),
            })
        });
    }
    results
        .into_iter()
        .map(|result| result.expect("every envelope got a result"))
        .collect()
}

/// Digests of envelopes that passed verification, shared by every node holding a clone:
/// nodes in one process (the simulator's, a benchmark's) need not check the same bytes
/// twice, since a signature check is a pure function of the bytes and the org. Bounded by
/// [`VERIFIED_CACHE_MAX`]; past it the cache starts afresh.
#[derive(Clone, Default, Debug)]
pub struct VerifiedCache(std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<[u8; 32]>>>);

/// Most digests a [`VerifiedCache`] holds.
pub const VERIFIED_CACHE_MAX: usize = 1 << 20;

impl VerifiedCache {
    fn digest(&self, org: &OrgId, bytes: &[u8]) -> [u8; 32] {
        let mut hasher = sha2::Sha256::new();
        hasher.update(org.as_bytes());
        hasher.update(bytes);
        hasher.finalize().into()
    }

    fn contains(&self, digest: &[u8; 32]) -> bool {
        self.0
            .lock()
            .map(|set| set.contains(digest))
            .unwrap_or(false)
    }

    fn insert(&self, digest: [u8; 32]) {
        if let Ok(mut set) = self.0.lock() {
            if set.len() >= VERIFIED_CACHE_MAX {
                set.clear();
            }
            set.insert(digest);
        }
    }

    /// Marks `bytes` as verified for `org` without checking them. Only for tests that build
    /// a node with a broken verifier (one that accepts every signature), to show that the
    /// simulator's independent checks catch it; nothing in a node calls it.
    pub fn trust_unchecked(&self, org: &OrgId, bytes: &[u8]) {
        self.insert(self.digest(org, bytes));
    }

    /// How many digests it holds.
    pub fn len(&self) -> usize {
        self.0.lock().map(|set| set.len()).unwrap_or(0)
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decompressed verifying keys of recent authors, bounded by [`KEY_CACHE_MAX`].
#[derive(Default)]
pub struct KeyCache {
    keys: std::collections::BTreeMap<[u8; 32], ed25519_dalek::VerifyingKey>,
}

/// Most keys a [`KeyCache`] holds before it starts afresh.
pub const KEY_CACHE_MAX: usize = 4096;

impl KeyCache {
    /// The author and decompressed key for an actor id, if it is a valid ed25519 key.
    fn key(&mut self, actor: &[u8]) -> Result<(NodeId, ed25519_dalek::VerifyingKey), VerifyError> {
        let bytes: [u8; 32] = actor.try_into().map_err(|_| VerifyError::Author)?;
        if let Some(key) = self.keys.get(&bytes) {
            return Ok((NodeId::from_verifying_key(key), *key));
        }
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| VerifyError::Author)?;
        if self.keys.len() >= KEY_CACHE_MAX {
            self.keys.clear();
        }
        self.keys.insert(bytes, key);
        Ok((NodeId::from_verifying_key(&key), key))
    }
}

fn split_be<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), VerifyError> {
    if bytes.len() < N {
        return Err(VerifyError::Malformed("truncated header"));
    }
    let (head, rest) = bytes.split_at(N);
    Ok((head.try_into().expect("split at N"), rest))
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envelope({} bytes)", self.bytes.len())
    }
}

impl VerifiedChange {
    /// Signs a change this node just made. Asserts that the change's actor is this node:
    /// signing someone else's change would forge authorship.
    pub fn sign(
        identity: &Identity,
        org: &OrgId,
        record: RecordId,
        change: Change,
    ) -> VerifiedChange {
        let author = identity.node_id();
        assert_eq!(
            change.actor_id().to_bytes(),
            author.as_bytes(),
            "a node signs only its own changes"
        );
        let signature = identity.sign(&signed_message(org, &record, &change.hash()));
        let envelope = Envelope::encode(&record, change.raw_bytes(), &signature);
        VerifiedChange {
            record,
            author,
            change,
            envelope,
        }
    }

    /// The change's hash.
    pub fn hash(&self) -> ChangeHash {
        self.change.hash()
    }

    /// The signature, to store beside the change.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        let bytes = self.envelope.as_bytes();
        bytes[bytes.len() - SIGNATURE_LEN..]
            .try_into()
            .expect("envelopes end with the signature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Edit, FieldValue, RecordDoc};

    fn signed(org: &OrgId, record: &str) -> VerifiedChange {
        let identity = Identity::from_seed(3);
        let mut doc = RecordDoc::new(&identity.node_id());
        let edit = Edit::Put([("a".to_owned(), crate::FieldEdit::Set(FieldValue::Int(1)))].into());
        let change = doc.edit(&edit, 0).unwrap().unwrap();
        VerifiedChange::sign(&identity, org, record.parse().unwrap(), change)
    }

    #[test]
    fn a_signed_change_verifies_and_names_its_author() {
        let org = OrgId::from_bytes([9; 32]);
        let change = signed(&org, "stock/1");
        let verified = change.envelope.verify(&org).unwrap();
        assert_eq!(verified.author, Identity::from_seed(3).node_id());
        assert_eq!(verified.hash(), change.hash());
        assert_eq!(verified.record.as_str(), "stock/1");
    }

    #[test]
    fn the_claimed_hash_is_the_hash_automerge_computes() {
        let org = OrgId::from_bytes([9; 32]);
        let change = signed(&org, "stock/1");
        let (record, claimed) = change.envelope.claimed_identity().unwrap();
        assert_eq!(record, "stock/1");
        assert_eq!(claimed, change.hash());
    }

    #[test]
    fn replay_into_another_record_or_org_fails_the_signature() {
        let org = OrgId::from_bytes([9; 32]);
        let change = signed(&org, "stock/1");
        let (_, raw, signature) = change.envelope.parts().unwrap();
        let replayed = Envelope::encode(&"stock/2".parse().unwrap(), raw, signature);
        assert!(matches!(
            replayed.verify(&org),
            Err(VerifyError::Signature { .. })
        ));
        let other_org = OrgId::from_bytes([8; 32]);
        assert!(matches!(
            change.envelope.verify(&other_org),
            Err(VerifyError::Signature { .. })
        ));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused_without_panic() {
        let org = OrgId::from_bytes([9; 32]);
        let bytes = signed(&org, "stock/1").envelope.into_bytes();
        for len in 0..bytes.len() {
            assert!(
                Envelope::from_bytes(bytes[..len].to_vec())
                    .verify(&org)
                    .is_err()
            );
        }
        for index in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[index] ^= 0x01;
            assert!(
                Envelope::from_bytes(flipped).verify(&org).is_err(),
                "byte {index}"
            );
        }
    }
}
