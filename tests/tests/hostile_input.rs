//! Bytes from a peer never panic a node: bad input is refused, counted, and changes nothing.

use crdt_schema::record::Edit;
use crdt_schema::{Envelope, FieldValue, Identity, OrgId, RecordDoc, VerifiedChange};
use mesh_core::limits::MESSAGE_BYTES_MAX;
use mesh_core::wire::{EnvelopeBytes, Message};
use mesh_tests::Harness;

/// Two connected, converged nodes; returns the harness and node 1's digest.
fn converged_pair() -> (Harness, mesh_core::Digest) {
    let mut mesh = Harness::new(2);
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    let digest = mesh.digest(1);
    (mesh, digest)
}

/// Delivers `bytes` from node 0 to node 1 and checks the refusal was counted and nothing
/// changed.
fn assert_refused(bytes: Vec<u8>, counter: fn(&mesh_core::Status) -> u64) {
    let (mut mesh, digest) = converged_pair();
    let before = counter(&mesh.status(1));
    mesh.inject(0, 1, bytes);
    mesh.run_until_quiet(20);
    let status = mesh.status(1);
    assert_eq!(counter(&status), before + 1, "the refusal is counted");
    assert_eq!(mesh.digest(1), digest, "nothing changed");
    let peer = status
        .peers
        .iter()
        .find(|peer| peer.peer_id == mesh.id(0))
        .unwrap();
    assert_eq!(
        peer.state,
        mesh_core::PeerState::Disconnected,
        "the sender is disconnected"
    );
}

fn messages_rejected(status: &mesh_core::Status) -> u64 {
    status.counters.messages_rejected
}

fn changes_rejected(status: &mesh_core::Status) -> u64 {
    status.counters.changes_rejected
}

/// A validly signed change by node 0's key for `record`.
fn signed_change(record: &str) -> VerifiedChange {
    let identity = Identity::from_seed(1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let edit = Edit::Put([("count".to_owned(), Some(FieldValue::Int(99)))].into());
    let change = doc.edit(&edit, 0).unwrap().unwrap();
    VerifiedChange::sign(
        &identity,
        &OrgId::default(),
        record.parse().unwrap(),
        change,
    )
}

fn push(envelope: Vec<u8>) -> Vec<u8> {
    Message::Push {
        changes: vec![EnvelopeBytes(envelope)],
    }
    .encode()
}

#[test]
fn garbage_bytes_are_refused() {
    assert_refused(
        b"\x01this is not a message at all".to_vec(),
        messages_rejected,
    );
    assert_refused(vec![0xff; 64], messages_rejected);
    assert_refused(Vec::new(), messages_rejected);
}

#[test]
fn truncated_messages_are_refused() {
    let full = push(signed_change("stock/b").envelope.into_bytes());
    for len in [1, 2, full.len() / 2, full.len() - 1] {
        let (mut mesh, digest) = converged_pair();
        mesh.inject(0, 1, full[..len].to_vec());
        mesh.run_until_quiet(20);
        let status = mesh.status(1);
        assert_eq!(
            status.counters.messages_rejected + status.counters.changes_rejected,
            1,
            "truncated at {len}"
        );
        assert_eq!(mesh.digest(1), digest, "truncated at {len}");
    }
}

#[test]
fn oversized_messages_are_refused_before_decoding() {
    let mut huge = push(signed_change("stock/b").envelope.into_bytes());
    huge.resize(MESSAGE_BYTES_MAX + 1, 0);
    assert_refused(huge, messages_rejected);
}

#[test]
fn a_change_with_a_bad_signature_is_refused() {
    let mut envelope = signed_change("stock/b").envelope.into_bytes();
    let last = envelope.len() - 1;
    envelope[last] ^= 0x55;
    assert_refused(push(envelope), changes_rejected);
}

#[test]
fn a_valid_change_replayed_into_another_record_is_refused() {
    let original = signed_change("stock/b").envelope.into_bytes();
    // Same change bytes and signature, envelope rewritten to name stock/c.
    let key_len = u16::from_be_bytes([original[1], original[2]]) as usize;
    let rest = &original[3 + key_len..];
    let mut replayed = vec![original[0]];
    replayed.extend_from_slice(&7u16.to_be_bytes());
    replayed.extend_from_slice(b"stock/c");
    replayed.extend_from_slice(rest);
    assert!(
        Envelope::from_bytes(replayed.clone())
            .verify(&OrgId::default())
            .is_err()
    );
    assert_refused(push(replayed), changes_rejected);
}

#[test]
fn a_message_before_hello_is_refused() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    // Drop the hellos, then speak out of turn.
    mesh.take_in_flight();
    mesh.inject(0, 1, push(signed_change("stock/b").envelope.into_bytes()));
    mesh.run_until_quiet(20);
    assert_eq!(mesh.status(1).counters.messages_rejected, 1);
    assert_eq!(mesh.status(1).records_total, 0);
}

#[test]
fn overlapping_reconciliation_ranges_are_refused() {
    use mesh_core::wire::{Range, RangeSummary, Round};
    let range = |lower: &str| Range {
        lower: lower.into(),
        upper: None,
        summary: RangeSummary::Fingerprint {
            fingerprint: [0; 16],
            count: 5,
        },
    };
    let round = Round {
        session: 1,
        ranges: vec![range(""), range("a")],
        needs: vec![],
        policy: None,
    };
    assert_refused(Message::SyncRequest(round).encode(), messages_rejected);
}
