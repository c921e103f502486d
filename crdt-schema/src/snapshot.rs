//! A record's whole history as one compacted document: how a node that has none of a
//! record receives it (clone by snapshot).
//!
//! A snapshot is the record's saved Automerge document plus the author's signature of every
//! change in it, in the order of the change hashes. Nothing is trusted because it came in
//! a document: [`expand`] loads the document under the panic guard, takes each change back
//! out of it, and frames it with its signature as the [`Envelope`] the author would have
//! sent, so each change still goes through the same door, signature check and policy
//! verdict as one that came alone. What the snapshot saves is the sender loading the
//! document and the receiver building it change by change and saving it again: the receiver
//! keeps the document bytes it checked.
//!
//! Automerge inflates DEFLATE-compressed columns while loading, without a bound, so a
//! snapshot document must be a single uncompressed document chunk ([`check_document`]),
//! as a change must be an uncompressed change chunk. Nodes save their documents
//! uncompressed ([`crate::RecordDoc::save`]) so that they can send them as they are.

use std::collections::BTreeSet;

use automerge::ChangeHash;
use sha2::Digest as _;

use crate::change::{Envelope, SIGNATURE_LEN, VerifyError};
use crate::record::{RecordDoc, RecordId};

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_TYPE_DOCUMENT: u8 = 0;
/// The bit of a column specification that marks a DEFLATE-compressed column.
const COLUMN_DEFLATE: u64 = 0b1000;

/// What the header of a document chunk says, read without Automerge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentHeader {
    /// The heads the document claims, in the order stored.
    pub heads: Vec<ChangeHash>,
}

/// Checks that `bytes` are exactly one uncompressed Automerge document chunk with a valid
/// checksum, and returns its heads; reads only the chunk's header and column metadata.
pub fn check_document(bytes: &[u8]) -> Result<DocumentHeader, String> {
    let mut input = Reader { bytes, at: 0 };
    if input.take(4)? != CHUNK_MAGIC {
        return Err("not an automerge chunk".into());
    }
    let checksum: [u8; 4] = input.take(4)?.try_into().expect("four bytes");
    let header_start = input.at;
    let chunk_type = input.take(1)?[0];
    if chunk_type != CHUNK_TYPE_DOCUMENT {
        return Err(format!("chunk type {chunk_type} is not a document"));
    }
    let length = input.uleb()?;
    let body_start = input.at;
    if (bytes.len() - body_start) as u64 != length {
        return Err("the document is not exactly one chunk".into());
    }
    // The checksum is the first four bytes of SHA-256 over type, length and body.
    let digest = sha2::Sha256::digest(&bytes[header_start..]);
    if digest[..4] != checksum {
        return Err("document checksum does not match its contents".into());
    }
    let actors = input.uleb()?;
    for _ in 0..actors {
        let length = input.uleb()?;
        input.take(usize::try_from(length).map_err(|_| "actor id too long")?)?;
    }
    let head_count = input.uleb()?;
    let mut heads = Vec::new();
    for _ in 0..head_count {
        let hash: [u8; 32] = input.take(32)?.try_into().expect("32 bytes");
        heads.push(ChangeHash(hash));
    }
    let mut columns = Vec::new();
    for _ in 0..2 {
        // The change columns' metadata, then the op columns'.
        let count = input.uleb()?;
        for _ in 0..count {
            let spec = input.uleb()?;
            let length = usize::try_from(input.uleb()?).map_err(|_| "column too long")?;
            if spec & COLUMN_DEFLATE != 0 {
                return Err("the document has compressed columns".into());
            }
            columns.push((spec, length));
        }
    }
    // The columns' data follows in the same order. A run-length encoded column states how
    // many rows each run repeats, and Automerge's loader expands every run into memory: a
    // few bytes could claim billions of rows. Count them before Automerge sees anything.
    for (spec, length) in columns {
        let data = input.take(length)?;
        let rows = column_rows(spec & COLUMN_TYPE_MASK, data)?;
        if rows > DOCUMENT_COLUMN_ROWS_MAX {
            return Err(format!(
                "a column of the document claims more than {DOCUMENT_COLUMN_ROWS_MAX} rows"
            ));
        }
    }
    Ok(DocumentHeader { heads })
}

/// The most rows one column of a received document may claim: 262,144 operations or
/// changes, which Automerge loads in tens of megabytes. A record's text of 50,000
/// characters is 50,000 rows; a larger record travels change by change.
pub const DOCUMENT_COLUMN_ROWS_MAX: u64 = 1 << 18;
const COLUMN_TYPE_MASK: u64 = 0b111;
const COLUMN_BOOLEAN: u64 = 4;
const COLUMN_DELTA: u64 = 3;
const COLUMN_STRING: u64 = 5;
const COLUMN_RAW: u64 = 7;

/// How many rows a column of type `column_type` encodes, stopping once past the bound.
fn column_rows(column_type: u64, data: &[u8]) -> Result<u64, String> {
    let mut input = Reader { bytes: data, at: 0 };
    let mut rows: u64 = 0;
    let done =
        |input: &Reader<'_>, rows: u64| input.at >= data.len() || rows > DOCUMENT_COLUMN_ROWS_MAX;
    match column_type {
        COLUMN_RAW => {}
        COLUMN_BOOLEAN => {
            // Alternating run lengths of false and true.
            while !done(&input, rows) {
                rows = rows.saturating_add(input.uleb()?);
            }
        }
        _ => {
            // Runs: a positive count repeats one value, a negative one lists that many
            // values, zero is followed by a count of nulls.
            let skip_value = |input: &mut Reader<'_>| -> Result<(), String> {
                match column_type {
                    COLUMN_STRING => {
                        let length = input.uleb()?;
                        input.take(usize::try_from(length).map_err(|_| "string too long")?)?;
                    }
                    COLUMN_DELTA => {
                        input.sleb()?;
                    }
                    _ => {
                        input.uleb()?;
                    }
                }
                Ok(())
            };
            while !done(&input, rows) {
                let count = input.sleb()?;
                if count > 0 {
                    rows = rows.saturating_add(count.unsigned_abs());
                    skip_value(&mut input)?;
                } else if count < 0 {
                    let listed = count.unsigned_abs();
                    rows = rows.saturating_add(listed);
                    for _ in 0..listed.min(DOCUMENT_COLUMN_ROWS_MAX + 1) {
                        skip_value(&mut input)?;
                    }
                } else {
                    rows = rows.saturating_add(input.uleb()?);
                }
            }
        }
    }
    Ok(rows)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("the document ends early")?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn uleb(&mut self) -> Result<u64, String> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number in the document is too long".into())
    }

    fn sleb(&mut self) -> Result<i64, String> {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let byte = self.take(1)?[0];
            if shift < 64 {
                value |= i64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
            if shift >= 70 {
                return Err("a number in the document is too long".into());
            }
        }
    }
}

/// A snapshot taken apart: every change as the envelope its author signed, in dependency
/// order, and what the document says of the record.
#[derive(Debug)]
pub struct Expanded {
    /// The changes as envelopes, in the order Automerge lists them (dependencies first).
    pub envelopes: Vec<Envelope>,
    /// Every change hash in the document.
    pub hashes: BTreeSet<ChangeHash>,
    /// Whether the record is deleted in the document.
    pub deleted: bool,
}

/// Takes a snapshot of `record` apart: `signatures` are those of the document's changes in
/// the order of their hashes, one each. The envelopes still have to pass admission (their
/// signatures are checked there, with everything else).
pub fn expand(
    record: &RecordId,
    document: &[u8],
    signatures: &[[u8; SIGNATURE_LEN]],
) -> Result<Expanded, VerifyError> {
    let header = check_document(document).map_err(VerifyError::Change)?;
    if header.heads.is_empty() {
        return Err(VerifyError::Change("the document holds no change".into()));
    }
    let doc = RecordDoc::load_to_read(document)
        .map_err(|error| VerifyError::Change(error.to_string()))?;
    let changes = crate::guard::no_panic("taking changes out of a document", || {
        Ok(doc.automerge().get_changes(&[]))
    })?;
    if changes.len() != signatures.len() {
        return Err(VerifyError::Change(format!(
            "the document holds {} changes but {} signatures came with it",
            changes.len(),
            signatures.len()
        )));
    }
    let mut by_hash: Vec<ChangeHash> = changes.iter().map(|change| change.hash()).collect();
    by_hash.sort_unstable();
    let hashes: BTreeSet<ChangeHash> = by_hash.iter().copied().collect();
    let envelopes = changes
        .iter()
        .map(|change| {
            let index = by_hash
                .binary_search(&change.hash())
                .expect("every hash is listed");
            Envelope::encode(record, change.raw_bytes(), &signatures[index])
        })
        .collect();
    Ok(Expanded {
        envelopes,
        hashes,
        deleted: doc.deleted(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Edit;
    use crate::{FieldValue, Identity, OrgId, VerifiedChange};

    fn saved_record(edits: usize) -> (RecordId, Vec<u8>, Vec<[u8; 64]>) {
        let author = Identity::from_seed(7);
        let record: RecordId = "stock/s1".parse().unwrap();
        let mut doc = RecordDoc::new(&author.node_id());
        let mut signed = Vec::new();
        for n in 0..edits {
            let edit = Edit::Put(
                [(
                    format!("f{n}"),
                    crate::FieldEdit::Set(FieldValue::Str("x".repeat(300 * (n + 1)))),
                )]
                .into(),
            );
            let change = doc.edit(&edit, 0).unwrap().unwrap();
            let verified = VerifiedChange::sign(&author, &OrgId::default(), record.clone(), change);
            signed.push((verified.hash(), verified.signature()));
        }
        signed.sort_by_key(|(hash, _)| *hash);
        let signatures = signed.into_iter().map(|(_, signature)| signature).collect();
        (record, doc.save(), signatures)
    }

    #[test]
    fn a_saved_document_expands_into_the_envelopes_its_author_signed() {
        let (record, document, signatures) = saved_record(3);
        let expanded = expand(&record, &document, &signatures).unwrap();
        assert_eq!(expanded.envelopes.len(), 3);
        assert_eq!(expanded.hashes.len(), 3);
        for envelope in expanded.envelopes {
            let verified = envelope.verify(&OrgId::default()).unwrap();
            assert!(expanded.hashes.contains(&verified.hash()));
        }
    }

    #[test]
    fn saved_documents_are_uncompressed_so_they_can_travel_as_they_are() {
        // 900-byte strings make columns far over Automerge's 256-byte compression threshold.
        let (_, document, _) = saved_record(3);
        assert!(check_document(&document).is_ok());
        let compressed = automerge::Automerge::load(&document).unwrap().save();
        assert_eq!(
            check_document(&compressed),
            Err("the document has compressed columns".into())
        );
    }

    #[test]
    fn a_document_whose_runs_claim_more_rows_than_it_may_is_refused_before_loading() {
        // Found by the snapshot_expand fuzz target: a document whose third column's first
        // run repeats one value about 2^56 times, which made Automerge's loader allocate
        // gigabytes. (Its second column, cut short in the fuzzer's input, is made a valid
        // one-row run here so that the refusal is the row count's.)
        let document: &[u8] = &[
            0x85, 0x6f, 0x4a, 0x83, 0x86, 0xed, 0x5c, 0x03, 0x00, 0x82, 0x01, 0x01, 0x20, 0x91,
            0x98, 0xe3, 0xae, 0xa7, 0x7a, 0xbf, 0x29, 0x85, 0x7a, 0x93, 0x6c, 0xf9, 0xb9, 0x03,
            0x54, 0x93, 0xb6, 0x2a, 0x40, 0x34, 0x72, 0x1e, 0xe1, 0xc6, 0xec, 0x23, 0xd2, 0x5f,
            0x4b, 0xf1, 0x0b, 0x01, 0x2c, 0xf9, 0x69, 0xa7, 0x50, 0xc5, 0xbd, 0xd3, 0xc3, 0x96,
            0xdf, 0xb3, 0xb2, 0x80, 0xb4, 0xb2, 0xa5, 0xa9, 0x18, 0x6a, 0x89, 0x0d, 0x17, 0x01,
            0xaa, 0x55, 0x7e, 0x28, 0x98, 0xed, 0xfe, 0xa2, 0x06, 0x01, 0x02, 0x03, 0x02, 0x13,
            0x23, 0x23, 0x02, 0x40, 0x02, 0x56, 0x05, 0x00, 0x00, 0x00, 0x01, 0x00, 0xdd, 0xfe,
            0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x80, 0x01, 0x02, 0x7f, 0x00, 0x7f,
            0x01, 0xff, 0x01, 0x7f, 0x00, 0x7f, 0x00, 0x7f, 0x07, 0x7f, 0x05, 0x63, 0x6f, 0x75,
            0x6e, 0x74, 0x7f, 0x00, 0x7f, 0x01, 0x01, 0x7f, 0x01, 0x7f, 0x14, 0x03, 0x7f, 0x00,
            0x00,
        ];
        let mut document = document.to_vec();
        crate::crafted::fix_checksum(&mut document);
        let refused = check_document(&document).unwrap_err();
        assert!(refused.contains("rows"), "{refused}");
        assert!(expand(&"stock/x".parse().unwrap(), &document, &[[7; 64]]).is_err());
    }

    #[test]
    fn a_long_text_is_many_rows_in_few_bytes_and_still_within_the_bound() {
        let author = Identity::from_seed(7);
        let mut doc = RecordDoc::new(&author.node_id());
        let text = "y".repeat(50_000);
        let edit = Edit::Put(
            [(
                "notes".to_owned(),
                crate::FieldEdit::Set(FieldValue::Text(text)),
            )]
            .into(),
        );
        doc.edit(&edit, 0).unwrap().unwrap();
        let saved = doc.save();
        assert!(check_document(&saved).is_ok(), "{} bytes", saved.len());
    }

    #[test]
    fn a_snapshot_with_wrong_signatures_or_bytes_is_refused() {
        let (record, document, signatures) = saved_record(2);
        assert!(expand(&record, &document, &signatures[..1]).is_err());
        let mut flipped = document.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(expand(&record, &flipped, &signatures).is_err());
        let mut longer = document.clone();
        longer.extend_from_slice(&document);
        assert!(expand(&record, &longer, &signatures).is_err());
        // Swapped signatures expand, and then fail their check.
        let swapped = [signatures[1], signatures[0]];
        let expanded = expand(&record, &document, &swapped).unwrap();
        assert!(
            expanded
                .envelopes
                .into_iter()
                .any(|envelope| envelope.verify(&OrgId::default()).is_err())
        );
    }
}
