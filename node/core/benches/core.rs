//! Write and apply throughput of the node core against plain Automerge doing the same
//! put and commit in the same run, so the figures are ratios on whatever machine runs them.
//!
//! `cargo bench -p mesh-core`; BENCHMARKS.md records the figures.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ROOT};
use crdt_schema::{FieldEdit, FieldValue, Identity};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::wire::{EnvelopeBytes, Message};
use mesh_core::{Command, CommandId, Config, Effect, Input, Instant, Node};

const FIELDS: usize = 5;

fn record_fields(value: i64) -> BTreeMap<String, FieldEdit> {
    (0..FIELDS)
        .map(|field| {
            (
                format!("field{field}"),
                FieldEdit::Set(FieldValue::Int(value + field as i64)),
            )
        })
        .collect()
}

/// Runs one command through the node and completes its log append, as a driver would.
fn write(node: &mut Node, now: Instant, id: u64, command: Command) {
    let effects = node.handle(
        now,
        Input::Command {
            id: CommandId(id),
            command,
        },
    );
    for effect in effects {
        if let Effect::Storage { op, .. } = effect {
            let done = node.handle(now, Input::StorageDone { op, result: Ok(()) });
            black_box(done);
        }
    }
}

fn automerge_put(doc: &mut Automerge, value: i64) {
    let mut tx = doc.transaction();
    for field in 0..FIELDS {
        tx.put(ROOT, format!("field{field}"), value + field as i64)
            .unwrap();
    }
    tx.commit_with(CommitOptions::default().with_time(0));
}

fn create(c: &mut Criterion) {
    let mut group = c.benchmark_group("create_record");
    group.throughput(Throughput::Elements(1));
    let identity = Identity::from_seed(1);
    let now = Instant::from_millis(1_790_000_000_000);
    group.bench_function("mesh", |b| {
        let mut node = Node::new(Config::default(), identity.clone(), 1);
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let record = format!("stock/item-{n}").parse().unwrap();
            write(
                &mut node,
                now,
                n,
                Command::Put {
                    record,
                    fields: record_fields(n as i64),
                },
            );
        });
    });
    let actor = identity.node_id().actor_id();
    group.bench_function("automerge", |b| {
        let mut docs = Vec::new();
        let mut n = 0i64;
        b.iter(|| {
            n += 1;
            let mut doc = Automerge::new().with_actor(actor.clone());
            automerge_put(&mut doc, n);
            docs.push(doc);
        });
    });
    group.finish();
}

fn edit(c: &mut Criterion) {
    let mut group = c.benchmark_group("edit_one_field");
    group.throughput(Throughput::Elements(1));
    let identity = Identity::from_seed(1);
    let now = Instant::from_millis(1_790_000_000_000);
    group.bench_function("mesh", |b| {
        let mut node = Node::new(Config::default(), identity.clone(), 1);
        let record: crdt_schema::RecordId = "stock/item".parse().unwrap();
        write(
            &mut node,
            now,
            0,
            Command::Put {
                record: record.clone(),
                fields: record_fields(0),
            },
        );
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let fields = [(
                "field0".to_owned(),
                FieldEdit::Set(FieldValue::Int(n as i64)),
            )]
            .into();
            write(
                &mut node,
                now,
                n,
                Command::Put {
                    record: record.clone(),
                    fields,
                },
            );
        });
    });
    group.bench_function("automerge", |b| {
        let mut doc = Automerge::new().with_actor(identity.node_id().actor_id());
        automerge_put(&mut doc, 0);
        let mut n = 0i64;
        b.iter(|| {
            n += 1;
            let mut tx = doc.transaction();
            tx.put(ROOT, "field0", n).unwrap();
            tx.commit_with(CommitOptions::default().with_time(0));
        });
    });
    group.finish();
}

/// 10,000 changes: 1,000 records edited 10 times each by another node.
fn remote_changes() -> (Vec<Vec<u8>>, Vec<Vec<automerge::Change>>) {
    remote_changes_for(crdt_schema::OrgId::default())
}

fn remote_changes_for(org: crdt_schema::OrgId) -> (Vec<Vec<u8>>, Vec<Vec<automerge::Change>>) {
    let author = Identity::from_seed(2);
    let config = Config {
        org,
        ..Config::default()
    };
    let mut node = Node::new(config, author, 2);
    let now = Instant::from_millis(1_790_000_000_000);
    let mut envelopes = Vec::new();
    let mut id = 0;
    for edit in 0..10 {
        for record in 0..1000 {
            id += 1;
            let record = format!("stock/item-{record:04}").parse().unwrap();
            let fields = [("count".to_owned(), FieldEdit::Set(FieldValue::Int(edit)))].into();
            let effects = node.handle(
                now,
                Input::Command {
                    id: CommandId(id),
                    command: Command::Put { record, fields },
                },
            );
            for effect in effects {
                if let Effect::Storage {
                    op,
                    request:
                        mesh_core::StorageRequest::Append {
                            envelopes: appended,
                        },
                } = effect
                {
                    envelopes.extend(appended);
                    node.handle(now, Input::StorageDone { op, result: Ok(()) });
                }
            }
        }
    }
    let mut per_record: BTreeMap<String, Vec<automerge::Change>> = BTreeMap::new();
    for envelope in &envelopes {
        let verified = crdt_schema::Envelope::from_bytes(envelope.clone())
            .verify(&org)
            .unwrap();
        per_record
            .entry(verified.record.to_string())
            .or_default()
            .push(verified.change);
    }
    (envelopes, per_record.into_values().collect())
}

fn apply_remote(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_10k_remote_changes");
    group.throughput(Throughput::Elements(10_000));
    group.sample_size(10);
    let (envelopes, changes) = remote_changes();
    let sender = Identity::from_seed(2).node_id();
    let now = Instant::from_millis(1_790_000_000_000);
    // Pushes of up to 1,000 changes, as a sync session would batch them.
    let messages: Vec<Vec<u8>> = envelopes
        .chunks(1000)
        .map(|chunk| {
            Message::Push {
                changes: chunk.iter().cloned().map(EnvelopeBytes).collect(),
            }
            .encode()
        })
        .collect();
    group.bench_function("mesh_verified", |b| {
        b.iter_batched(
            || {
                let mut node = Node::new(Config::default(), Identity::from_seed(1), 1);
                node.handle(now, Input::PeerConnected { peer: sender });
                let hello = Message::Hello {
                    name: "bench".into(),
                    scope: None,
                    policy: None,
                    org: *Config::default().org.as_bytes(),
                }
                .encode();
                node.handle(
                    now,
                    Input::MessageReceived {
                        from: sender,
                        bytes: hello,
                    },
                );
                node
            },
            |mut node| {
                for message in &messages {
                    let effects = node.handle(
                        now,
                        Input::MessageReceived {
                            from: sender,
                            bytes: message.clone(),
                        },
                    );
                    for effect in effects {
                        if let Effect::Storage { op, .. } = effect {
                            node.handle(now, Input::StorageDone { op, result: Ok(()) });
                        }
                    }
                }
                assert_eq!(node.status().counters.changes_applied, 10_000);
                node
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("automerge", |b| {
        b.iter_batched(
            || changes.clone(),
            |changes| {
                let docs: Vec<Automerge> = changes
                    .into_iter()
                    .map(|record| {
                        let mut doc = Automerge::new();
                        doc.apply_changes(record).unwrap();
                        doc
                    })
                    .collect();
                docs
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// The policy issue's figure: 10,000 remote changes verified, judged under a policy and
/// applied, against the same changes whose signatures were checked beforehand (a shared
/// cache of verified envelopes answers instead), in the same run.
fn verify_judge_apply(c: &mut Criterion) {
    use crdt_schema::policy::{CollectionRule, Member, Policy};
    let mut group = c.benchmark_group("verify_judge_apply_10k");
    group.throughput(Throughput::Elements(10_000));
    group.sample_size(10);
    let org = Identity::from_seed(9000);
    let org_id = crdt_schema::OrgId::from_bytes(*org.node_id().as_bytes());
    let (envelopes, _) = remote_changes_for(org_id);
    let sender = Identity::from_seed(2).node_id();
    let member = |seed: u64, role: &str| Member {
        node: Identity::from_seed(seed).node_id(),
        roles: [role.to_owned()].into(),
    };
    let policy = Policy {
        unnamed_collections: Default::default(),
        version: 1,
        members: [
            ("hq".to_owned(), member(1, "master")),
            ("clinic".to_owned(), member(2, "site")),
        ]
        .into(),
        collections: [(
            "stock".to_owned(),
            CollectionRule {
                writers: ["master".to_owned(), "site".to_owned()].into(),
                ..Default::default()
            },
        )]
        .into(),
        ..Policy::default()
    }
    .sign(&org);
    let now = Instant::from_millis(1_790_000_000_000);
    let messages: Vec<Vec<u8>> = envelopes
        .chunks(1000)
        .map(|chunk| {
            Message::Push {
                changes: chunk.iter().cloned().map(EnvelopeBytes).collect(),
            }
            .encode()
        })
        .collect();
    let setup = |cache: Option<crdt_schema::VerifiedCache>| {
        let config = Config {
            org: org_id,
            verified_cache: cache,
            ..Config::default()
        };
        let mut node = Node::new(config, Identity::from_seed(1), 1);
        let mut effects = node.handle(
            now,
            Input::Command {
                id: CommandId(1),
                command: Command::ApplyPolicy {
                    signed: policy.clone(),
                },
            },
        );
        // The command is answered once the checkpoint holding the policy completes.
        let saves: Vec<_> = effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Storage { op, .. } => Some(*op),
                _ => None,
            })
            .collect();
        for op in saves {
            effects.extend(node.handle(now, Input::StorageDone { op, result: Ok(()) }));
        }
        assert!(
            effects
                .iter()
                .any(|effect| matches!(effect, Effect::Complete { result: Ok(_), .. }))
        );
        node.handle(now, Input::PeerConnected { peer: sender });
        let hello = Message::Hello {
            name: "bench".into(),
            scope: None,
            policy: node.status().policy.map(|_| mesh_core::wire::PolicyTag {
                version: 1,
                hash: policy.hash(),
            }),
            org: *org_id.as_bytes(),
        }
        .encode();
        node.handle(
            now,
            Input::MessageReceived {
                from: sender,
                bytes: hello,
            },
        );
        node
    };
    let run = |mut node: Node| {
        for message in &messages {
            let effects = node.handle(
                now,
                Input::MessageReceived {
                    from: sender,
                    bytes: message.clone(),
                },
            );
            for effect in effects {
                if let Effect::Storage { op, .. } = effect {
                    node.handle(now, Input::StorageDone { op, result: Ok(()) });
                }
            }
        }
        assert_eq!(node.status().counters.changes_applied, 10_000);
        node
    };
    group.bench_function("verified", |b| {
        b.iter_batched(|| setup(None), run, BatchSize::PerIteration);
    });
    // Check every signature once, outside the measurement; the runs then find them checked.
    let checked = crdt_schema::VerifiedCache::default();
    run(setup(Some(checked.clone())));
    assert_eq!(checked.len(), 10_000);
    group.bench_function("signatures_checked_beforehand", |b| {
        b.iter_batched(
            || setup(Some(checked.clone())),
            run,
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// The floor under every figure above: one ed25519 signature per change made, one
/// verification per change received.
/// What the door for foreign change bytes costs (`read_change`: chunk type, panic guard,
/// canonical re-encoding; `RecordDoc::apply`: apply on a copy under a guard, each change
/// served back as it came), against Automerge's own parse and apply of the same 10,000
/// changes one at a time, in the same run. The node pays this on top of the
/// `verify_judge_apply` baseline's work of older builds.
fn door(c: &mut Criterion) {
    let mut group = c.benchmark_group("door_10k");
    group.sample_size(10);
    group.throughput(Throughput::Elements(10_000));
    let (_, changes) = remote_changes();
    let bytes: Vec<Vec<Vec<u8>>> = changes
        .iter()
        .map(|record| {
            record
                .iter()
                .map(|change| change.raw_bytes().to_vec())
                .collect()
        })
        .collect();
    let author = Identity::from_seed(3).node_id();
    group.bench_function("guarded", |b| {
        b.iter(|| {
            bytes
                .iter()
                .map(|record| {
                    let mut doc = crdt_schema::RecordDoc::new(&author);
                    for change in record {
                        let change = crdt_schema::change::read_change(change).unwrap();
                        doc.apply(vec![change]).unwrap();
                    }
                    doc
                })
                .collect::<Vec<_>>()
        });
    });
    group.bench_function("automerge_alone", |b| {
        b.iter(|| {
            bytes
                .iter()
                .map(|record| {
                    let mut doc = Automerge::new();
                    for change in record {
                        let change = automerge::Change::from_bytes(change.clone()).unwrap();
                        doc.apply_changes([change]).unwrap();
                    }
                    doc
                })
                .collect::<Vec<_>>()
        });
    });
    group.finish();
}

fn signature(c: &mut Criterion) {
    let mut group = c.benchmark_group("signature");
    group.throughput(Throughput::Elements(1));
    let identity = Identity::from_seed(1);
    let org = crdt_schema::OrgId::default();
    let mut doc = crdt_schema::RecordDoc::new(&identity.node_id());
    let edit = crdt_schema::Edit::Put(record_fields(1));
    let change = doc.edit(&edit, 0).unwrap().unwrap();
    let record: crdt_schema::RecordId = "stock/item".parse().unwrap();
    group.bench_function("sign_change", |b| {
        b.iter(|| {
            crdt_schema::VerifiedChange::sign(&identity, &org, record.clone(), change.clone())
        });
    });
    let envelope =
        crdt_schema::VerifiedChange::sign(&identity, &org, record.clone(), change.clone()).envelope;
    let mut keys = crdt_schema::KeyCache::default();
    group.bench_function("verify_change", |b| {
        b.iter(|| envelope.verify_with(&org, &mut keys).unwrap());
    });
    group.finish();
}

/// crdt-schema's own ed25519 check (verify.rs) against ed25519-zebra, which accepts the
/// same signatures (see the differential test in verify.rs): one signature alone, and a
/// batch of 1,000 by 10 authors, in the same run.
fn ed25519(c: &mut Criterion) {
    use rand_core::SeedableRng as _;
    let org = crdt_schema::OrgId::default();
    let authors: Vec<Identity> = (1..=10).map(Identity::from_seed).collect();
    let envelopes: Vec<crdt_schema::Envelope> = (0..1000)
        .map(|n| {
            let identity = &authors[n % authors.len()];
            let mut doc = crdt_schema::RecordDoc::new(&identity.node_id());
            let edit = crdt_schema::Edit::Put(record_fields(n as i64));
            let change = doc.edit(&edit, 0).unwrap().unwrap();
            let record = format!("stock/item-{n}").parse().unwrap();
            crdt_schema::VerifiedChange::sign(identity, &org, record, change).envelope
        })
        .collect();
    // What each check needs: (key bytes, signature, signed message), taken from the
    // envelopes by the same rule the nodes use.
    let zebra_items: Vec<([u8; 32], [u8; 64], Vec<u8>)> = envelopes
        .iter()
        .map(|envelope| {
            let verified = envelope.verify(&org).unwrap();
            let message =
                crdt_schema::change::signed_message_for(&org, &verified.record, &verified.hash());
            (*verified.author.as_bytes(), verified.signature(), message)
        })
        .collect();
    let mut group = c.benchmark_group("ed25519");
    group.sample_size(10);
    group.bench_function("one/crdt_schema", |b| {
        let mut keys = crdt_schema::KeyCache::default();
        b.iter(|| envelopes[0].verify_with(&org, &mut keys).unwrap());
    });
    let zebra_keys: Vec<ed25519_zebra::VerificationKey> = zebra_items
        .iter()
        .map(|(key, _, _)| ed25519_zebra::VerificationKey::try_from(*key).unwrap())
        .collect();
    group.bench_function("one/ed25519_zebra", |b| {
        let (_, signature, message) = &zebra_items[0];
        let signature = ed25519_zebra::Signature::from_bytes(signature);
        b.iter(|| zebra_keys[0].verify(&signature, message).unwrap());
    });
    group.throughput(Throughput::Elements(1000));
    group.bench_function("batch_1000/crdt_schema", |b| {
        let mut keys = crdt_schema::KeyCache::default();
        b.iter(|| {
            let parsed: Vec<_> = envelopes.iter().map(|e| e.parse().unwrap()).collect();
            let results = crdt_schema::verify_all(&org, &mut keys, None, parsed);
            assert!(results.iter().all(Result::is_ok));
        });
    });
    group.bench_function("batch_1000/ed25519_zebra", |b| {
        b.iter(|| {
            // Parsing as the nodes do, so both sides pay for it.
            let parsed: Vec<_> = envelopes.iter().map(|e| e.parse().unwrap()).collect();
            let mut batch = ed25519_zebra::batch::Verifier::new();
            for (key, signature, message) in &zebra_items {
                let key = ed25519_zebra::VerificationKeyBytes::from(*key);
                batch.queue((
                    key,
                    ed25519_zebra::Signature::from_bytes(signature),
                    message,
                ));
            }
            let rng = rand_chacha::ChaCha20Rng::seed_from_u64(parsed.len() as u64);
            batch.verify(rng).unwrap();
        });
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! { name = benches; config = config(); targets = create, edit, apply_remote, verify_judge_apply, door, signature, ed25519 }
criterion_main!(benches);
