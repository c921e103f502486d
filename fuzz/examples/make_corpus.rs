//! Writes the seed corpora (`fuzz/corpus/<target>/`) from real changes, messages, logs,
//! saved records and policies: `cargo run --manifest-path fuzz/Cargo.toml --example
//! make_corpus`. The seeds are committed; run this again when a format changes.

use std::collections::BTreeMap;
use std::path::Path;

use crdt_schema::policy::{CollectionRule, Member, Policy};
use crdt_schema::{Edit, FieldValue, Identity, RecordDoc, VerifiedChange};
use mesh_core::storage::Signature;
use mesh_core::wire::{EnvelopeBytes, Item, Message, Need, Range, RangeSummary, Round, Snapshot};
use mesh_core::{Effect, Input, Instant, Node, StorageRequest};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn put(pairs: &[(&str, FieldValue)]) -> Edit {
    Edit::Put(
        pairs
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

fn main() {
    let org = mesh_fuzz::org();
    let (base, edit) = mesh_fuzz::base();
    let record: crdt_schema::RecordId = "stock/x".parse().unwrap();

    // envelope_apply: raw changes and envelopes, honest and crafted.
    let base_change = base.changes_after(&[]).pop().unwrap();
    write("envelope_apply", "base-change", base_change.raw_bytes());
    write(
        "envelope_apply",
        "edit-of-anothers-objects",
        edit.raw_bytes(),
    );
    write(
        "envelope_apply",
        "unknown-column",
        &crdt_schema::crafted::with_unknown_column(edit.raw_bytes()),
    );
    let mut big = RecordDoc::new(&mesh_fuzz::first().node_id());
    let mut compressible = big
        .edit(&put(&[("blob", FieldValue::Str("z".repeat(4000)))]), 0)
        .unwrap()
        .unwrap();
    write("envelope_apply", "compressed", &compressible.bytes());
    let signed = VerifiedChange::sign(&mesh_fuzz::second(), &org, record.clone(), edit.clone());
    write("envelope_apply", "envelope", signed.envelope.as_bytes());

    // wire_decode: one message of each kind.
    let envelope = EnvelopeBytes(signed.envelope.as_bytes().to_vec());
    let need = Need {
        record: "stock/x".into(),
        heads: vec![[1; 32]],
        ancestors: vec![[2; 32]],
    };
    let round = Round {
        session: 3,
        ranges: vec![
            Range {
                lower: String::new(),
                upper: Some("stock/m".into()),
                summary: RangeSummary::Fingerprint {
                    fingerprint: [7; 16],
                    count: 12,
                },
            },
            Range {
                lower: "stock/m".into(),
                upper: None,
                summary: RangeSummary::Items(vec![Item {
                    record: "stock/x".into(),
                    heads: vec![[3; 32]],
                }]),
            },
        ],
        needs: vec![need.clone()],
        policy: None,
    };
    // A record whole, as a peer clones it: its saved document and its one signature.
    let mut whole = RecordDoc::new(&mesh_fuzz::second().node_id());
    let only = whole
        .edit(&put(&[("count", FieldValue::Int(3))]), 0)
        .unwrap()
        .unwrap();
    let only = VerifiedChange::sign(&mesh_fuzz::second(), &org, record.clone(), only);
    let snapshot = Snapshot {
        record: record.to_string(),
        document: whole.save(),
        signatures: vec![Signature(only.signature())],
    };
    let mut expand_seed = vec![1u8];
    expand_seed.extend_from_slice(&snapshot.document);
    write("snapshot_expand", "one-change", &expand_seed);
    write("snapshot_expand", "compressible", &{
        let mut seed = vec![1u8];
        seed.extend_from_slice(&big.automerge().save());
        seed
    });
    let messages = [
        Message::Hello {
            name: "hq".into(),
            scope: Some(vec!["stock".into()]),
            policy: None,
            org: *org.as_bytes(),
        },
        Message::Push {
            changes: vec![envelope.clone()],
        },
        Message::Need { needs: vec![need] },
        Message::SyncRequest(round.clone()),
        Message::SyncResponse(round),
        Message::SyncChanges {
            session: 3,
            from_initiator: true,
            changes: vec![envelope],
        },
        Message::SyncSnapshots {
            session: 3,
            from_initiator: false,
            snapshots: vec![snapshot.clone()],
        },
        Message::SyncEnd {
            session: 3,
            completed: true,
        },
        Message::Receipt {
            record: "stock/x".into(),
            change: edit.hash().0,
            reason: "no".into(),
        },
        Message::Announce {
            record: "stock/x".into(),
            heads: vec![[4; 32]],
        },
    ];
    for (index, message) in messages.iter().enumerate() {
        write(
            "wire_decode",
            &format!("message-{index}"),
            &message.encode(),
        );
    }

    // node_messages: the peer's own record, made and edited by it (0xff-tagged change
    // bytes, which the target signs as the peer), then messages, then a tick (0xfe).
    let peer = mesh_fuzz::second().node_id();
    let mut own = RecordDoc::new(&peer);
    let made = own
        .edit(
            &put(&[
                ("name", FieldValue::Text("Aspirin".into())),
                ("tags", FieldValue::List(vec!["a".into()])),
            ]),
            1,
        )
        .unwrap()
        .unwrap();
    let edited = own
        .edit(&put(&[("name", FieldValue::Text("Aspirin 500".into()))]), 2)
        .unwrap()
        .unwrap();
    let mut sequence = Vec::new();
    let mut chunk = |bytes: &[u8]| {
        sequence.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        sequence.extend_from_slice(bytes);
    };
    for change in [&made, &edited] {
        let mut tagged = vec![0xff];
        tagged.extend_from_slice(change.raw_bytes());
        chunk(&tagged);
    }
    for message in &messages {
        chunk(&message.encode());
    }
    chunk(&[0xfe]);
    write("node_messages", "sequence", &sequence);

    // changelog_open: a log body (the target adds the magic) of three entries.
    let mut log = Vec::new();
    for entry in [b"first".as_slice(), signed.envelope.as_bytes(), b"third"] {
        log.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        log.extend_from_slice(&crc32fast::hash(entry).to_le_bytes());
        log.extend_from_slice(entry);
    }
    write("changelog_open", "three-entries", &log);

    // saved_record: what a node checkpoints, and a log entry.
    let mut node = Node::new(mesh_core::Config::default(), Identity::from_seed(104), 1);
    let mut now = Instant::from_millis(1_790_000_000_000);
    let mut saved = Vec::new();
    let mut inputs = vec![Input::Command {
        id: mesh_core::CommandId(1),
        command: mesh_core::Command::Put {
            record: "stock/a".parse().unwrap(),
            fields: [(
                "count".to_owned(),
                crdt_schema::FieldEdit::Set(FieldValue::Int(3)),
            )]
            .into(),
        },
    }];
    for _ in 0..3 {
        while let Some(input) = inputs.pop() {
            for effect in node.handle(now, input) {
                if let Effect::Storage { op, request } = effect {
                    match request {
                        StorageRequest::Append { envelopes } => saved.extend(envelopes),
                        StorageRequest::Checkpoint { records, .. } => {
                            for (index, record) in records.iter().enumerate() {
                                write("saved_record", &format!("record-{index}"), &record.encode());
                            }
                        }
                    }
                    inputs.push(Input::StorageDone { op, result: Ok(()) });
                }
            }
        }
        now = Instant::from_millis(now.as_millis() + 2_000);
        inputs.push(Input::Tick);
    }
    for (index, entry) in saved.iter().enumerate() {
        write("saved_record", &format!("log-entry-{index}"), entry);
    }

    // signed_policy: a policy signed by the org key the target trusts.
    let org_key = Identity::from_seed(105);
    let policy = Policy {
        unnamed_collections: Default::default(),
        version: 1,
        members: [(
            "hq".to_owned(),
            Member {
                node: mesh_fuzz::first().node_id(),
                roles: ["master".to_owned()].into(),
            },
        )]
        .into(),
        revoked: Default::default(),
        collections: [(
            "catalogue".to_owned(),
            CollectionRule {
                writers: ["master".to_owned()].into(),
                ..Default::default()
            },
        )]
        .into(),
    };
    let signed_policy = policy.sign(&org_key);
    write(
        "signed_policy",
        "policy-v1",
        &serde_json::to_vec(&signed_policy).unwrap(),
    );
    println!("seed corpora written under fuzz/corpus/");
}
