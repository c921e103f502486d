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
    let edit = Edit::Put(
        [(
            "count".to_owned(),
            crdt_schema::FieldEdit::Set(FieldValue::Int(99)),
        )]
        .into(),
    );
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

/// Two changes to `stock/x` signed by keys of their own (not node 0's): the first makes the
/// record, the second is a crafted edit of the first's objects that makes Automerge panic
/// when applied (finding 1 of the security review). Node 0 relays both.
fn base_and_panicking_change() -> (VerifiedChange, VerifiedChange) {
    let first = Identity::from_seed(7);
    let second = Identity::from_seed(8);
    let (base, edit) =
        crdt_schema::crafted::edit_of_anothers_objects(&first.node_id(), &second.node_id());
    let record: crdt_schema::RecordId = "stock/x".parse().unwrap();
    let base_change = base.changes_after(&[]).pop().unwrap();
    let crafted = quietly(|| crdt_schema::crafted::panicking_mutant(&base, &edit))
        .expect("some mutant of the edit panics Automerge");
    let org = OrgId::default();
    (
        VerifiedChange::sign(&first, &org, record.clone(), base_change),
        VerifiedChange::sign(&second, &org, record, crafted),
    )
}

/// Runs `work` with the panic hook silenced on this thread (caught panics still print).
fn quietly<T>(work: impl FnOnce() -> T) -> T {
    let name = std::thread::current().name().map(str::to_owned);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().map(str::to_owned) != name {
            default_hook(info);
        }
    }));
    let result = work();
    let _ = std::panic::take_hook();
    result
}

#[test]
fn a_signed_change_that_panics_automerge_is_quarantined_and_survives_a_restart() {
    let (base, crafted) = base_and_panicking_change();
    let (mut mesh, _) = converged_pair();
    let message = Message::Push {
        changes: vec![
            EnvelopeBytes(base.envelope.as_bytes().to_vec()),
            EnvelopeBytes(crafted.envelope.as_bytes().to_vec()),
        ],
    };
    quietly(|| {
        mesh.inject(0, 1, message.encode());
        mesh.run_until_quiet(40);
    });
    let record: crdt_schema::RecordId = "stock/x".parse().unwrap();
    // Node 1 holds the base, applied, and the crafted change set aside, never applied.
    assert!(mesh.nodes[1].node.holds_change(&record, &base.hash()));
    assert!(
        mesh.nodes[1]
            .node
            .holds_quarantined(&record, &crafted.hash())
    );
    let view = mesh.get(1, "stock/x").unwrap();
    assert_eq!(
        view.fields["count"],
        FieldValue::Int(12),
        "the crafted edit is not applied"
    );
    assert!(mesh.status(1).counters.changes_rejected >= 1);
    // It still serves and converges: node 0 learns both by reconciliation and judges alike.
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(2))]);
    quietly(|| {
        mesh.command(0, mesh_core::Command::SyncNow { peer: None })
            .unwrap();
        mesh.run_until_quiet(40);
    });
    let s0 = mesh.status(0);
    let s1 = mesh.status(1);
    assert!(
        mesh.converged(),
        "both nodes hold the same records and quarantine: {:?} {:?} {:?} {:?} {:?} {:?}",
        mesh.nodes[0].node.quarantined(),
        mesh.nodes[1].node.quarantined(),
        s0.peers,
        s1.peers,
        s0.counters,
        s1.counters
    );
    assert!(
        mesh.nodes[0]
            .node
            .holds_quarantined(&record, &crafted.hash())
    );

    // A restart from node 1's checkpoint and log replays it without panicking.
    mesh.advance(std::time::Duration::from_secs(2));
    let digest = mesh.digest(1);
    let restore = mesh_core::Restore {
        records: mesh.nodes[1].saved.values().cloned().collect(),
        index: Vec::new(),
        log: mesh.nodes[1].log.clone(),
        policy: None,
    };
    let mut restarted = mesh_core::Node::new(
        mesh_core::Config::default(),
        crdt_schema::Identity::from_seed(2),
        0,
    );
    quietly(|| restarted.handle(mesh.now, mesh_core::Input::Restore(restore)));
    assert_eq!(restarted.digest(), digest);
    assert!(restarted.holds_quarantined(&record, &crafted.hash()));
}

#[test]
fn a_non_canonical_change_is_refused_at_the_door() {
    let identity = Identity::from_seed(1);
    let (_, edit) = crdt_schema::crafted::edit_of_anothers_objects(
        &Identity::from_seed(9).node_id(),
        &identity.node_id(),
    );
    let mutant = crdt_schema::crafted::with_unknown_column(edit.raw_bytes());
    let change = crdt_schema::crafted::parse_unguarded(&mutant).unwrap();
    let signed = VerifiedChange::sign(
        &identity,
        &OrgId::default(),
        "stock/b".parse().unwrap(),
        change,
    );
    assert_refused(push(signed.envelope.into_bytes()), changes_rejected);
}

#[test]
fn a_compressed_change_is_refused_before_it_is_inflated() {
    let identity = Identity::from_seed(1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let edit = Edit::Put(
        [(
            "blob".to_owned(),
            crdt_schema::FieldEdit::Set(FieldValue::Str("z".repeat(50_000))),
        )]
        .into(),
    );
    let mut change = doc.edit(&edit, 0).unwrap().unwrap();
    let compressed = change.bytes().into_owned();
    assert_eq!(compressed[8], 2, "a compressed chunk");
    // The hash, and so the signature, is over the uncompressed chunk: the compressed one
    // carries a valid signature.
    let record: crdt_schema::RecordId = "stock/b".parse().unwrap();
    let signed = VerifiedChange::sign(&identity, &OrgId::default(), record.clone(), change);
    let envelope = Envelope::encode(&record, &compressed, &signed.signature());
    assert_refused(push(envelope.into_bytes()), changes_rejected);
}

#[test]
fn a_receipt_for_a_change_the_node_does_not_hold_as_its_own_is_ignored() {
    let (mut mesh, _) = converged_pair();
    let own = mesh.nodes[0].node.status().own_changes_rejected.len();
    // Node 1 invents receipts: for a change that does not exist, and for node 0's record
    // under a hash node 0 never made.
    for change in [[7u8; 32], [8u8; 32]] {
        let receipt = Message::Receipt {
            record: "stock/a".into(),
            change,
            reason: "forged".into(),
        };
        mesh.inject(1, 0, receipt.encode());
    }
    let receipt = Message::Receipt {
        record: "stock/nothing".into(),
        change: [9u8; 32],
        reason: "forged".into(),
    };
    mesh.inject(1, 0, receipt.encode());
    mesh.run_until_quiet(20);
    assert_eq!(mesh.status(0).own_changes_rejected.len(), own);
}

#[test]
fn a_second_hello_on_one_connection_is_refused() {
    let (mut mesh, digest) = converged_pair();
    let hello = Message::Hello {
        name: "again".into(),
        scope: None,
        policy: None,
        org: *OrgId::default().as_bytes(),
    };
    let before = mesh.status(1).counters.messages_rejected;
    mesh.inject(0, 1, hello.encode());
    mesh.run_until_quiet(20);
    let status = mesh.status(1);
    assert_eq!(status.counters.messages_rejected, before + 1);
    assert_eq!(mesh.digest(1), digest);
    let peer = status
        .peers
        .iter()
        .find(|peer| peer.peer_id == mesh.id(0))
        .unwrap();
    assert_eq!(peer.state, mesh_core::PeerState::Disconnected);
}

#[test]
fn changes_waiting_for_their_dependencies_are_bounded_in_bytes() {
    use mesh_core::limits::PENDING_BYTES_MAX;
    let identity = Identity::from_seed(5);
    let (mut mesh, _) = converged_pair();
    // 80 changes of about 1 MiB, each building on a change that is never sent.
    let big = "x".repeat(1024 * 1024);
    let mut batch = Vec::new();
    for n in 0..80 {
        let mut doc = RecordDoc::new(&identity.node_id());
        let first = Edit::Put(
            [(
                "a".to_owned(),
                crdt_schema::FieldEdit::Set(FieldValue::Int(1)),
            )]
            .into(),
        );
        doc.edit(&first, 0).unwrap();
        let second = Edit::Put(
            [(
                "blob".to_owned(),
                crdt_schema::FieldEdit::Set(FieldValue::Str(big.clone())),
            )]
            .into(),
        );
        let change = doc.edit(&second, 0).unwrap().unwrap();
        let signed = VerifiedChange::sign(
            &identity,
            &OrgId::default(),
            format!("stock/big-{n}").parse().unwrap(),
            change,
        );
        batch.push(EnvelopeBytes(signed.envelope.into_bytes()));
        if batch.len() == 6 {
            let push = Message::Push {
                changes: std::mem::take(&mut batch),
            };
            mesh.inject(0, 1, push.encode());
        }
    }
    mesh.inject(0, 1, Message::Push { changes: batch }.encode());
    mesh.run_until_quiet(100);
    let status = mesh.status(1);
    let held_bytes = status.pending_changes as usize * (1024 * 1024);
    assert!(
        held_bytes <= PENDING_BYTES_MAX,
        "{} pending changes of 1 MiB",
        status.pending_changes
    );
    assert!(status.pending_changes > 0, "some are held");
    assert!(
        status.counters.changes_dropped > 0,
        "the rest are counted as dropped"
    );
}

/// A node restarted from a checkpoint of `records` records of about 1 MiB each, none of
/// whose documents is loaded, and greeted by a peer. Returns the node, the peer, the time,
/// and every record's changes as signed envelopes (rebuilt from the checkpoint).
fn restarted_with_big_records(
    records: usize,
) -> (
    mesh_core::Node,
    crdt_schema::NodeId,
    mesh_core::Instant,
    Vec<EnvelopeBytes>,
) {
    let mut mesh = Harness::new(1);
    let big = "b".repeat(1024 * 1024);
    for n in 0..records {
        mesh.put(
            0,
            &format!("stock/big-{n:03}"),
            &[("blob", FieldValue::Str(big.clone()))],
        );
    }
    // Checkpointed, so the restart takes them from the saved records, not the log.
    mesh.advance(std::time::Duration::from_secs(2));
    mesh.complete_all_storage();
    let saved: Vec<mesh_core::SavedRecord> = mesh.nodes[0].saved.values().cloned().collect();
    let author = Identity::from_seed(1).node_id();
    let mut envelopes = Vec::new();
    for record in &saved {
        let doc = RecordDoc::load(&record.document, &author).expect("a saved document");
        for change in doc.changes_after(&[]) {
            let (_, signature) = record
                .signatures
                .iter()
                .find(|(hash, _)| *hash == change.hash().0)
                .expect("every change is signed");
            let envelope = Envelope::encode(&record.record, change.raw_bytes(), &signature.0);
            envelopes.push(EnvelopeBytes(envelope.into_bytes()));
        }
    }
    let restore = mesh_core::Restore {
        records: saved,
        index: Vec::new(),
        log: mesh.nodes[0].log.clone(),
        policy: None,
    };
    let mut node = mesh_core::Node::new(mesh_core::Config::default(), Identity::from_seed(1), 0);
    let now = mesh.now;
    node.handle(now, mesh_core::Input::Restore(restore));
    assert_eq!(node.status().records_total as usize, records);
    assert_eq!(
        node.status().loaded_documents,
        0,
        "the restart loads no document, or this test shows nothing"
    );
    let peer = Identity::from_seed(9).node_id();
    node.handle(now, mesh_core::Input::PeerConnected { peer });
    let hello = Message::Hello {
        name: "asker".into(),
        scope: None,
        policy: None,
        org: *OrgId::default().as_bytes(),
    };
    node.handle(
        now,
        mesh_core::Input::MessageReceived {
            from: peer,
            bytes: hello.encode(),
        },
    );
    (node, peer, now, envelopes)
}

fn bytes_sent(effects: &[mesh_core::Effect]) -> usize {
    effects
        .iter()
        .map(|effect| match effect {
            mesh_core::Effect::Send { bytes, .. } => bytes.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn a_round_that_asks_for_everything_loads_only_what_its_budget_sends() {
    use mesh_core::limits::SYNC_ROUND_BYTES_DEFAULT;
    use mesh_core::wire::{Range, RangeSummary, Round};
    let (mut node, peer, now, _) = restarted_with_big_records(40);
    // "I have nothing at all": a tiny message that asks for the whole database.
    let round = Round {
        session: 1,
        ranges: vec![Range {
            lower: String::new(),
            upper: None,
            summary: RangeSummary::Fingerprint {
                fingerprint: [0; 16],
                count: 0,
            },
        }],
        needs: vec![],
        policy: None,
    };
    let effects = node.handle(
        now,
        mesh_core::Input::MessageReceived {
            from: peer,
            bytes: Message::SyncRequest(round).encode(),
        },
    );
    let sent = bytes_sent(&effects);
    assert!(
        sent > SYNC_ROUND_BYTES_DEFAULT / 2,
        "the round sends changes ({sent} bytes)"
    );
    assert!(
        // The change that finds the budget spent still goes when it is the first.
        sent <= SYNC_ROUND_BYTES_DEFAULT + 64 * 1024,
        "one round sends at most its budget ({sent} bytes)"
    );
    // 2 MiB of 1 MiB records, plus the one that found the budget spent.
    let loaded = node.status().loaded_documents;
    assert!(loaded <= 3, "{loaded} of 40 documents loaded for one round");
}

#[test]
fn duplicates_of_held_changes_load_no_document() {
    let (mut node, peer, now, envelopes) = restarted_with_big_records(20);
    assert!(envelopes.len() >= 20);
    // The peer pushes back every change the node holds, four (about 4 MiB) a message.
    for changes in envelopes.chunks(4) {
        let push = Message::Push {
            changes: changes.to_vec(),
        };
        node.handle(
            now,
            mesh_core::Input::MessageReceived {
                from: peer,
                bytes: push.encode(),
            },
        );
    }
    let status = node.status();
    assert_eq!(
        status.loaded_documents, 0,
        "telling duplicates apart loads no document"
    );
    assert!(
        status.counters.changes_duplicate >= 20,
        "{:?}",
        status.counters
    );
}
