//! Crafted change bytes of the kinds a hostile peer sends: for tests, fuzz seed corpora and
//! the simulator's byzantine node. Nothing here is used on the path of real changes.
//!
//! The kinds follow `../shared/reviews/security-2026-12.md` (findings 1 to 3): a valid
//! change with bytes of its op columns rewritten (the checksum fixed up, so Automerge parses
//! it), with an unknown op column added, or compressed.

use sha2::Digest as _;

use crate::record::{Edit, FieldValue, RecordDoc};
use crate::{Change, NodeId, VerifyError};

/// A record made by `first` (text, list and integer fields), and a change by `second` on
/// top that edits objects `first` created: where actor and object indexes matter, so
/// mutants of it reach Automerge's panics.
pub fn edit_of_anothers_objects(first: &NodeId, second: &NodeId) -> (RecordDoc, Change) {
    let put = |fields: Vec<(&str, FieldValue)>| {
        Edit::Put(
            fields
                .into_iter()
                .map(|(name, value)| (name.to_owned(), crate::FieldEdit::Set(value)))
                .collect(),
        )
    };
    let mut doc = RecordDoc::new(first);
    doc.edit(
        &put(vec![
            ("name", FieldValue::Text("Aspirin".into())),
            ("tags", FieldValue::List(vec!["a".into(), "b".into()])),
            ("count", FieldValue::Int(12)),
        ]),
        1,
    )
    .expect("a valid edit");
    let mut theirs = RecordDoc::load(&doc.save(), second).expect("a document just saved");
    let change = theirs
        .edit(
            &put(vec![
                ("name", FieldValue::Text("Aspirin 500".into())),
                ("count", FieldValue::Int(13)),
                ("note", FieldValue::Str("x".into())),
            ]),
            2,
        )
        .expect("a valid edit")
        .expect("fields changed");
    (doc, change)
}

/// The uncompressed change chunk's bytes with one byte rewritten, for every byte after the
/// chunk header and a handful of values each, checksums fixed. Deterministic.
pub fn byte_mutants(bytes: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    (9..bytes.len()).flat_map(move |index| {
        [
            0u8,
            1,
            2,
            3,
            0x7f,
            0x80,
            0xff,
            bytes[index] ^ 1,
            bytes[index] ^ 0x40,
        ]
        .into_iter()
        .filter(move |value| *value != bytes[index])
        .map(move |value| {
            let mut mutant = bytes.to_vec();
            mutant[index] = value;
            fix_checksum(&mut mutant);
            mutant
        })
    })
}

/// The first mutant of `change` (see [`byte_mutants`]) that passes [`crate::change::read_change`]
/// and keeps its author, yet makes Automerge panic when applied to `base`. Panics inside
/// are caught; the hook still prints them.
pub fn panicking_mutant(base: &RecordDoc, change: &Change) -> Option<Change> {
    byte_mutants(change.raw_bytes()).find_map(|mutant| {
        let parsed = crate::change::read_change(&mutant).ok()?;
        if parsed.actor_id() != change.actor_id() {
            return None;
        }
        let mut trial = base.clone();
        match trial.apply(vec![parsed.clone()]) {
            Err(error) if error.to_string().contains("panicked") => Some(parsed),
            _ => None,
        }
    })
}

/// The first mutant of `change` (see [`byte_mutants`]) that Automerge alone parses, with
/// its author and a matching checksum, but that re-encodes to other bytes: a run or a
/// number written in a form Automerge would not write. The door must refuse it.
pub fn non_canonical_mutant(change: &Change) -> Option<Vec<u8>> {
    byte_mutants(change.raw_bytes()).find(|mutant| {
        let Ok(parsed) = parse_unguarded(mutant) else {
            return false;
        };
        if parsed.actor_id() != change.actor_id() || mutant[4..8] != parsed.hash().0[..4] {
            return false;
        }
        let re_encoded = crate::guard::no_panic("decoding the mutant", || {
            Ok(Change::from(parsed.decode()).raw_bytes().to_vec())
        });
        re_encoded.is_ok_and(|bytes| bytes != *mutant)
    })
}

/// Rewrites the checksum so Automerge parses the chunk (it is the first four bytes of
/// SHA-256 over everything after it).
pub fn fix_checksum(bytes: &mut [u8]) {
    let hash = sha2::Sha256::digest(&bytes[8..]);
    bytes[4..8].copy_from_slice(&hash[..4]);
}

/// Parses `bytes` with Automerge alone, without the door: for building crafted changes
/// that the door must then refuse.
pub fn parse_unguarded(bytes: &[u8]) -> Result<Change, VerifyError> {
    Change::from_bytes(bytes.to_vec()).map_err(|error| VerifyError::Change(error.to_string()))
}

/// The change with one more op column (an unused id, one byte of data), lengths and
/// checksum rewritten.
pub fn with_unknown_column(bytes: &[u8]) -> Vec<u8> {
    let (body_len, len_bytes) = uleb(&bytes[9..]);
    let body = &bytes[9 + len_bytes..];
    assert_eq!(body.len() as u64, body_len);
    let mut at = 0;
    let (deps, n) = uleb(&body[at..]);
    at += n + 32 * deps as usize;
    let (actor_len, n) = uleb(&body[at..]);
    at += n + actor_len as usize;
    for _ in 0..3 {
        at += uleb(&body[at..]).1; // seq, start op, time
    }
    let (message_len, n) = uleb(&body[at..]);
    at += n + message_len as usize;
    let (others, n) = uleb(&body[at..]);
    at += n;
    for _ in 0..others {
        let (len, n) = uleb(&body[at..]);
        at += n + len as usize;
    }
    let columns_at = at;
    let (columns, n) = uleb(&body[at..]);
    at += n;
    let mut data_len = 0;
    for _ in 0..columns {
        at += uleb(&body[at..]).1;
        let (len, n) = uleb(&body[at..]);
        at += n;
        data_len += len as usize;
    }
    let specs_end = at;
    let data_end = specs_end + data_len;
    let mut new_body = body[..columns_at].to_vec();
    push_uleb(&mut new_body, columns + 1);
    new_body.extend_from_slice(&body[columns_at + uleb(&body[columns_at..]).1..specs_end]);
    push_uleb(&mut new_body, (15 << 4) | 2);
    push_uleb(&mut new_body, 1);
    new_body.extend_from_slice(&body[specs_end..data_end]);
    new_body.push(7);
    new_body.extend_from_slice(&body[data_end..]);
    let mut chunk = bytes[..9].to_vec();
    push_uleb(&mut chunk, new_body.len() as u64);
    chunk.extend_from_slice(&new_body);
    fix_checksum(&mut chunk);
    chunk
}

fn uleb(bytes: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (index, byte) in bytes.iter().enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return (value, index + 1);
        }
    }
    panic!("truncated uleb")
}

fn push_uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An envelope for `record` carrying `change_bytes` as they are, signed by `identity` over
/// the hash Automerge would compute for them (SHA-256 of the chunk after its magic and
/// checksum). The signature is valid only if the bytes name `identity` as their actor.
pub fn sign_raw(
    identity: &crate::Identity,
    org: &crate::OrgId,
    record: &crate::RecordId,
    change_bytes: &[u8],
) -> crate::Envelope {
    let hash = crate::ChangeHash(sha2::Sha256::digest(change_bytes.get(8..).unwrap_or(&[])).into());
    let signature = identity.sign(&crate::change::signed_message(org, record, &hash));
    crate::Envelope::encode(record, change_bytes, &signature)
}
