//! Clone by snapshot (issue 12, item 4): a node with none of a record's history receives it
//! whole, as its saved document with every change's signature, and each change is still
//! checked as if it had come alone.

use std::time::Duration;

use crdt_schema::{Edit, FieldValue, Identity, OrgId, RecordDoc, VerifiedChange};
use mesh_core::storage::Signature;
use mesh_core::wire::{Message, Snapshot};
use mesh_core::{Command, Config, Reply, SyncRecord};
use mesh_tests::{Harness, fields};

const RECORDS: usize = 300;
const EDITS: usize = 8;

fn key(record: usize) -> String {
    format!("stock/r{record:04}")
}

/// Node 0 writes `EDITS` one-field edits to each of `RECORDS` records, and saves them.
fn head_office(mesh: &mut Harness) {
    for edit in 0..EDITS {
        for record in 0..RECORDS {
            mesh.put(
                0,
                &key(record),
                &[(&format!("f{edit}"), FieldValue::Int(edit as i64))],
            );
        }
    }
    // The checkpoint saves every record; a restart leaves each document in the store only.
    mesh.advance(Duration::from_secs(2));
    mesh.restart(0, Config::default(), 7);
}

fn last_session(mesh: &mut Harness, node: usize) -> SyncRecord {
    let Ok(Reply::History(rows)) = mesh.command(node, Command::History) else {
        panic!("history answers with rows");
    };
    rows.last().cloned().expect("a session ran")
}

fn clone_from_node_0(mesh: &mut Harness) -> SyncRecord {
    mesh.connect(0, 1);
    mesh.run_until_quiet(10_000);
    assert!(mesh.converged());
    last_session(mesh, 1)
}

#[test]
fn a_fresh_node_receives_saved_records_whole_and_keeps_their_documents() {
    let mut mesh = Harness::new(2);
    head_office(&mut mesh);
    let session = clone_from_node_0(&mut mesh);

    assert_eq!(session.snapshots_received, RECORDS as u64, "{session:?}");
    let status = mesh.status(1);
    assert_eq!(status.counters.snapshots_taken, RECORDS as u64);
    assert_eq!(
        status.counters.changes_applied,
        (RECORDS * EDITS) as u64,
        "every change inside the snapshots is admitted and applied"
    );
    assert_eq!(status.counters.changes_rejected, 0);
    assert_eq!(mesh.status(0).counters.snapshots_sent, RECORDS as u64);
    for record in [0, RECORDS / 2, RECORDS - 1] {
        let view = mesh.get(1, &key(record)).expect("cloned");
        for edit in 0..EDITS {
            assert_eq!(
                view.fields.get(&format!("f{edit}")),
                Some(&FieldValue::Int(edit as i64))
            );
        }
    }

    // The taken documents are saved as they came, survive a restart, and take new writes
    // that flow back.
    mesh.advance(Duration::from_secs(2));
    mesh.disconnect(0, 1);
    mesh.restart(1, Config::default(), 8);
    mesh.put(1, &key(3), &[("after", FieldValue::Int(1))]);
    let view = mesh.get(1, &key(3)).expect("after the restart");
    assert_eq!(view.fields.get("f0"), Some(&FieldValue::Int(0)));
    mesh.connect(0, 1);
    mesh.run_until_quiet(10_000);
    assert!(mesh.converged());
    assert_eq!(
        mesh.get(0, &key(3)).unwrap().fields.get("after"),
        Some(&FieldValue::Int(1))
    );
}

#[test]
fn records_with_long_histories_move_in_far_fewer_bytes_whole_than_change_by_change() {
    // Change by change: node 0's documents are all in its cache, so they go as envelopes.
    let mut by_change = Harness::new(2);
    for edit in 0..EDITS {
        for record in 0..RECORDS {
            by_change.put(
                0,
                &key(record),
                &[(&format!("f{edit}"), FieldValue::Int(edit as i64))],
            );
        }
    }
    let envelopes = clone_from_node_0(&mut by_change);
    assert_eq!(envelopes.snapshots_received, 0, "{envelopes:?}");

    let mut whole = Harness::new(2);
    head_office(&mut whole);
    let snapshots = clone_from_node_0(&mut whole);
    assert_eq!(snapshots.changes_received, envelopes.changes_received);
    eprintln!(
        "{RECORDS} records of {EDITS} changes: {} bytes whole, {} change by change",
        snapshots.bytes_received, envelopes.bytes_received
    );
    assert!(
        snapshots.bytes_received * 10 < envelopes.bytes_received * 6,
        "whole: {snapshots:?}\nby change: {envelopes:?}"
    );
}

/// A record written by `author` (harness node index) with `edits` changes, as a snapshot.
fn snapshot_by(author: usize, record: &str, edits: usize) -> (Snapshot, Vec<VerifiedChange>) {
    snapshot_with(author, record, edits, "")
}

/// [`snapshot_by`], each change also setting `note` to `note`.
fn snapshot_with(
    author: usize,
    record: &str,
    edits: usize,
    note: &str,
) -> (Snapshot, Vec<VerifiedChange>) {
    let identity = Identity::from_seed(author as u64 + 1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let mut signed = Vec::new();
    for edit in 0..edits {
        let change = doc
            .edit(
                &Edit::Put(fields(&[
                    ("count", FieldValue::Int(edit as i64)),
                    ("note", FieldValue::Str(format!("{note}{edit}"))),
                ])),
                0,
            )
            .unwrap()
            .unwrap();
        signed.push(VerifiedChange::sign(
            &identity,
            &OrgId::default(),
            record.parse().unwrap(),
            change,
        ));
    }
    let mut by_hash: Vec<&VerifiedChange> = signed.iter().collect();
    by_hash.sort_by_key(|change| change.hash());
    let snapshot = Snapshot {
        record: record.to_owned(),
        document: doc.save(),
        signatures: by_hash
            .iter()
            .map(|change| Signature(change.signature()))
            .collect(),
    };
    (snapshot, signed)
}

fn snapshots_message(snapshots: Vec<Snapshot>) -> Vec<u8> {
    Message::SyncSnapshots {
        session: 1,
        from_initiator: true,
        snapshots,
    }
    .encode()
}

#[test]
fn a_snapshot_whose_signatures_or_document_do_not_hold_is_refused_and_nothing_is_kept() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    let (good, _) = snapshot_by(0, "stock/good", 2);

    // Signatures of another record's changes: every change fails its check.
    let (mut stolen, _) = snapshot_by(0, "stock/a", 2);
    stolen.record = "stock/b".into();
    // One signature too few.
    let (mut short, _) = snapshot_by(0, "stock/c", 2);
    short.signatures.pop();
    // A document with its columns compressed (Automerge would inflate them without a
    // bound): long values make columns past Automerge's threshold for compressing.
    let (mut compressed, _) = snapshot_with(0, "stock/d", 2, &"z".repeat(2000));
    compressed.document = automerge::Automerge::load(&compressed.document)
        .unwrap()
        .save();
    // A byte flipped in the document.
    let (mut flipped, _) = snapshot_by(0, "stock/e", 2);
    let middle = flipped.document.len() / 2;
    flipped.document[middle] ^= 0x20;

    for bad in [stolen, short, flipped] {
        mesh.connect(0, 1);
        mesh.run_until_quiet(100);
        let refused = mesh.status(1).counters.changes_rejected;
        mesh.inject(0, 1, snapshots_message(vec![good.clone(), bad.clone()]));
        mesh.run_until_quiet(100);
        let status = mesh.status(1);
        assert!(
            status.counters.changes_rejected > refused,
            "{bad:?} refused: {:?}",
            status.counters
        );
        assert!(
            mesh.get(1, &bad.record).is_none(),
            "nothing of {bad:?} is kept"
        );
        assert!(
            status
                .peers
                .iter()
                .all(|peer| peer.state == mesh_core::PeerState::Disconnected),
            "the sender of {bad:?} is disconnected"
        );
    }
    // The compressed one is refused before Automerge sees it.
    let with_compressed = snapshots_message(vec![compressed.clone()]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    mesh.inject(0, 1, with_compressed);
    mesh.run_until_quiet(100);
    assert!(mesh.get(1, &compressed.record).is_none());
    let Ok(Reply::Quarantine { refused, .. }) = mesh.command(1, Command::Quarantine) else {
        panic!("quarantine answers");
    };
    assert!(
        refused
            .iter()
            .any(|row| row.reason.contains("compressed columns")),
        "{refused:?}"
    );
}

#[test]
fn a_snapshot_of_a_record_the_node_holds_in_part_adds_only_what_is_missing() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    let (snapshot, changes) = snapshot_by(0, "stock/partial", 3);
    // Node 1 already holds the first change.
    let push = Message::Push {
        changes: vec![mesh_core::wire::EnvelopeBytes(
            changes[0].envelope.as_bytes().to_vec(),
        )],
    };
    mesh.inject(0, 1, push.encode());
    mesh.run_until_quiet(100);
    assert_eq!(mesh.status(1).counters.changes_applied, 1);

    mesh.inject(0, 1, snapshots_message(vec![snapshot]));
    mesh.run_until_quiet(100);
    let status = mesh.status(1);
    assert_eq!(status.counters.changes_applied, 3);
    assert_eq!(status.counters.changes_duplicate, 1);
    assert_eq!(
        status.counters.snapshots_taken, 0,
        "a record held in part is built change by change"
    );
    assert_eq!(
        mesh.get(1, "stock/partial").unwrap().fields.get("count"),
        Some(&FieldValue::Int(2))
    );
    assert_eq!(
        mesh.get(1, "stock/partial").unwrap().fields.get("note"),
        Some(&FieldValue::Str("2".into()))
    );
}
