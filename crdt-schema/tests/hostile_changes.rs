//! Crafted change bytes against the door (`read_change` then `RecordDoc::apply`): nothing
//! panics, and whatever gets through can be saved, loaded and served back unchanged.
//!
//! The mutants follow the probe of `../shared/reviews/security-2026-12.md` (finding 1 and
//! 2): single bytes of a valid change's body rewritten, the checksum fixed up so that
//! Automerge parses them. About one in ten such mutants used to panic inside Automerge.

use std::collections::BTreeMap;

use crdt_schema::change::read_change;
use crdt_schema::crafted::{byte_mutants, edit_of_anothers_objects, with_unknown_column};
use crdt_schema::{Change, Edit, FieldValue, Identity, RecordDoc};

fn base_and_change() -> (RecordDoc, Change) {
    edit_of_anothers_objects(
        &Identity::from_seed(1).node_id(),
        &Identity::from_seed(2).node_id(),
    )
}

fn put(fields: &[(&str, FieldValue)]) -> Edit {
    Edit::Put(
        fields
            .iter()
            .map(|(name, value)| {
                (
                    (*name).to_owned(),
                    crdt_schema::FieldEdit::Set(value.clone()),
                )
            })
            .collect::<BTreeMap<_, _>>(),
    )
}

#[test]
fn no_mutant_of_a_valid_change_panics_and_every_admitted_one_round_trips() {
    // Caught panics print through the hook; keep this test's output readable (the hook
    // is global, so it stays quiet only on this test's thread).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let quiet = std::thread::current()
            .name()
            .is_some_and(|name| name.contains("no_mutant"));
        if !quiet {
            default_hook(info);
        }
    }));
    let (base, change) = base_and_change();
    let bytes = change.raw_bytes().to_vec();
    let mut refused_at_read = 0;
    let mut refused_at_apply = 0;
    let mut admitted = 0;
    for mutant in byte_mutants(&bytes) {
        let Ok(parsed) = read_change(&mutant) else {
            refused_at_read += 1;
            continue;
        };
        let mut doc = base.clone();
        let heads_before = doc.heads();
        if doc.apply(vec![parsed.clone()]).is_err() {
            refused_at_apply += 1;
            assert_eq!(
                doc.heads(),
                heads_before,
                "a refused change leaves the document"
            );
            continue;
        }
        admitted += 1;
        // Whatever got in can be saved, loaded and served back as it came.
        let saved = doc.save();
        let loaded = RecordDoc::load(&saved, &Identity::from_seed(1).node_id())
            .unwrap_or_else(|error| panic!("mutant {mutant:?}: reload failed: {error}"));
        assert_eq!(loaded.heads(), doc.heads());
        if loaded.has_change(&parsed.hash()) {
            let served = loaded.change(&parsed.hash()).unwrap();
            assert_eq!(served.raw_bytes(), &mutant[..]);
        }
    }
    // The sweep exercised all three outcomes, so it can tell a door from no door.
    assert!(refused_at_read > 0, "no mutant was refused at read");
    assert!(admitted > 0, "no mutant was admitted");
    eprintln!(
        "mutants: {refused_at_read} refused at read, {refused_at_apply} at apply, {admitted} admitted"
    );
}

#[test]
fn a_compressed_chunk_is_refused_before_it_is_inflated() {
    let author = Identity::from_seed(1).node_id();
    let mut doc = RecordDoc::new(&author);
    let long = "x".repeat(20_000);
    let mut change = doc
        .edit(&put(&[("blob", FieldValue::Str(long))]), 1)
        .unwrap()
        .unwrap();
    let compressed = change.bytes().into_owned();
    assert_eq!(compressed[8], 2, "automerge compressed the change");
    let error = read_change(&compressed).unwrap_err();
    assert!(error.to_string().contains("chunk type 2"), "{error}");
    // The uncompressed form of the same change is fine.
    assert!(read_change(change.raw_bytes()).is_ok());
}

#[test]
fn an_unknown_column_is_refused_as_non_canonical() {
    let (base, change) = base_and_change();
    let bytes = change.raw_bytes();
    assert!(read_change(bytes).is_ok(), "an honest change is canonical");
    let mutant = with_unknown_column(bytes);
    // Automerge itself takes it: it drops the column, applies the change, and the document
    // then no longer loads (finding 2).
    let parsed = Change::from_bytes(mutant.clone()).expect("automerge parses it");
    let mut plain = base.automerge().clone();
    plain.apply_changes([parsed]).expect("automerge applies it");
    assert!(
        automerge::Automerge::load(&plain.save()).is_err(),
        "the mutant must make a plain document unloadable, or this test shows nothing"
    );
    let error = read_change(&mutant).unwrap_err();
    assert!(error.to_string().contains("canonical"), "{error}");
}

#[test]
fn a_re_encoded_run_is_refused_as_non_canonical() {
    let (_, change) = base_and_change();
    let mutant = crdt_schema::crafted::non_canonical_mutant(&change)
        .expect("some one-byte rewrite of the op columns parses but is not canonical");
    // Automerge parses it, and it re-encodes to other bytes: the envelope's hash would not
    // be the hash the node serves again.
    let parsed = Change::from_bytes(mutant.clone()).expect("automerge parses it");
    assert_ne!(
        Change::from(parsed.decode()).raw_bytes(),
        mutant.as_slice(),
        "the mutant must re-encode differently, or this test shows nothing"
    );
    let error = read_change(&mutant).unwrap_err();
    assert!(error.to_string().contains("canonical"), "{error}");
}
