//! The org's policy in the core: propagation, membership, verdicts on local and remote
//! changes, quarantine and receipts, and re-judging when a newer policy arrives.

use std::collections::BTreeSet;
use std::time::Duration;

use crdt_schema::policy::{CollectionRule, Member, Policy, RejectReason, SignedPolicy};
use crdt_schema::{Edit, FieldValue, Identity, NodeId, OrgId, RecordDoc, VerifiedChange};
use mesh_core::storage::Signature;
use mesh_core::wire::{EnvelopeBytes, Message, Snapshot};
use mesh_core::{Command, CommandError, Config, PolicyOffer, Reply};
use mesh_tests::{Harness, fields};

const HQ: usize = 0;
const CLINIC1: usize = 1;
const CLINIC2: usize = 2;

fn org() -> Identity {
    Identity::from_seed(9000)
}

fn org_id() -> OrgId {
    OrgId::from_bytes(*org().node_id().as_bytes())
}

/// Harness node `index` has the identity of seed `index + 1`.
fn node_id(index: usize) -> NodeId {
    Identity::from_seed(index as u64 + 1).node_id()
}

/// A policy: `members` are (name, node index, role); catalogue is written by masters,
/// stock by masters and sites.
fn policy(version: u64, members: &[(&str, usize, &str)], revoked: &[usize]) -> SignedPolicy {
    let rule = |writers: &[&str]| CollectionRule {
        writers: writers.iter().map(|role| (*role).to_owned()).collect(),
        ..Default::default()
    };
    Policy {
        unnamed_collections: Default::default(),
        version,
        members: members
            .iter()
            .map(|(name, index, role)| {
                (
                    (*name).to_owned(),
                    Member {
                        node: node_id(*index),
                        roles: [(*role).to_owned()].into(),
                    },
                )
            })
            .collect(),
        revoked: revoked.iter().map(|index| node_id(*index)).collect(),
        collections: [
            ("catalogue".to_owned(), rule(&["master"])),
            ("stock".to_owned(), rule(&["master", "site"])),
        ]
        .into(),
    }
    .sign(&org())
}

/// Like [`standard`], but clinic1 is a master too (version 2 of `standard` demotes it).
fn clinic1_a_master(version: u64) -> SignedPolicy {
    policy(
        version,
        &[
            ("hq", HQ, "master"),
            ("clinic1", CLINIC1, "master"),
            ("clinic2", CLINIC2, "site"),
        ],
        &[],
    )
}

fn standard(version: u64) -> SignedPolicy {
    policy(
        version,
        &[
            ("hq", HQ, "master"),
            ("clinic1", CLINIC1, "site"),
            ("clinic2", CLINIC2, "site"),
        ],
        &[],
    )
}

fn mesh(count: usize) -> Harness {
    Harness::with_config(count, |_| Config {
        org: org_id(),
        ..Config::default()
    })
}

fn apply(mesh: &mut Harness, index: usize, signed: SignedPolicy) -> PolicyOffer {
    match mesh.command(index, Command::ApplyPolicy { signed }) {
        Ok(Reply::PolicyOffered(offer)) => offer,
        other => panic!("apply failed: {other:?}"),
    }
}

fn try_put(
    mesh: &mut Harness,
    index: usize,
    record: &str,
    pairs: &[(&str, FieldValue)],
) -> Result<Reply, CommandError> {
    mesh.command(
        index,
        Command::Put {
            record: record.parse().unwrap(),
            fields: fields(pairs),
        },
    )
}

fn version(mesh: &mut Harness, index: usize) -> Option<u64> {
    mesh.status(index).policy.map(|policy| policy.version)
}

fn quarantined(mesh: &Harness, index: usize) -> Vec<(String, crdt_schema::ChangeHash)> {
    mesh.nodes[index].node.quarantined()
}

/// Runs anti-entropy until every node agrees (each pair syncs on its timer).
fn settle(mesh: &mut Harness) {
    mesh.run_until_quiet(10_000);
    for _ in 0..3 {
        mesh.advance(Duration::from_secs(40));
    }
}

#[test]
fn a_policy_applied_at_one_node_reaches_every_node_and_masters_alone_write_reference_data() {
    let mut mesh = mesh(3);
    mesh.connect_all();
    mesh.run_until_quiet(100);
    assert_eq!(
        apply(&mut mesh, HQ, standard(1)),
        PolicyOffer::Adopted { version: 1 }
    );
    mesh.run_until_quiet(100);
    for index in 0..3 {
        assert_eq!(version(&mut mesh, index), Some(1), "node {index}");
    }

    mesh.put(HQ, "catalogue/aspirin", &[("price", FieldValue::Int(12))]);
    mesh.run_until_quiet(100);
    for index in [CLINIC1, CLINIC2] {
        let view = mesh
            .get(index, "catalogue/aspirin")
            .expect("reached the clinic");
        assert_eq!(view.fields["price"], FieldValue::Int(12));
    }

    let digest = mesh.digest(HQ);
    let refused = try_put(
        &mut mesh,
        CLINIC1,
        "catalogue/aspirin",
        &[("price", FieldValue::Int(1))],
    );
    let Err(CommandError::Forbidden { version, reason }) = refused else {
        panic!("a clinic's catalogue write must be refused: {refused:?}");
    };
    assert_eq!(version, 1);
    assert!(matches!(reason, RejectReason::MayNotWrite { .. }));
    let message = CommandError::Forbidden { version, reason }.to_string();
    assert!(
        message.contains("`clinic1` may not write `catalogue`") && message.contains("[master]"),
        "{message}"
    );
    mesh.run_until_quiet(100);
    assert!(mesh.converged());
    assert_eq!(mesh.digest(HQ), digest, "nothing changed anywhere");

    mesh.put(CLINIC1, "stock/aspirin", &[("count", FieldValue::Int(40))]);
    mesh.run_until_quiet(100);
    assert_eq!(
        mesh.get(HQ, "stock/aspirin").unwrap().fields["count"],
        FieldValue::Int(40)
    );
    assert!(mesh.converged());
}

#[test]
fn older_foreign_and_tied_policies_resolve_the_same_way_everywhere() {
    let mut mesh = mesh(2);
    mesh.connect_all();
    mesh.run_until_quiet(100);
    apply(&mut mesh, HQ, standard(2));
    mesh.run_until_quiet(100);
    assert_eq!(
        apply(&mut mesh, CLINIC1, standard(1)),
        PolicyOffer::Older { in_force: 2 }
    );

    // Signed by a key that is not the org's: refused with an error naming the problem.
    let forged = Policy {
        unnamed_collections: Default::default(),
        version: 9,
        ..Policy::default()
    }
    .sign(&Identity::from_seed(4242));
    let error = mesh
        .command(HQ, Command::ApplyPolicy { signed: forged })
        .unwrap_err();
    assert!(
        error.to_string().contains("signature does not match org"),
        "{error}"
    );

    // Two different policies of version 3, one applied on each side: both keep the one
    // with the lower hash, and both raise the alarm.
    let a = standard(3);
    let b = policy(
        3,
        &[("hq", HQ, "master"), ("clinic1", CLINIC1, "master")],
        &[],
    );
    let winner = if a.hash() < b.hash() { &a } else { &b }.hash();
    mesh.disconnect(HQ, CLINIC1);
    apply(&mut mesh, HQ, a);
    apply(&mut mesh, CLINIC1, b);
    mesh.connect(HQ, CLINIC1);
    mesh.run_until_quiet(100);
    for index in [HQ, CLINIC1] {
        let status = mesh.status(index);
        let policy = status.policy.expect("in force");
        assert_eq!(policy.hash, hex(&winner), "node {index}");
    }
    let conflicts = [HQ, CLINIC1]
        .iter()
        .filter(|index| mesh.status(**index).policy.unwrap().conflict.is_some())
        .count();
    assert!(
        conflicts >= 1,
        "the side that lost the tie raises the alarm"
    );
    // Signing a higher version is the fix the alarm asks for; once it is in force the
    // alarm goes, everywhere.
    apply(&mut mesh, HQ, standard(4));
    mesh.run_until_quiet(100);
    for index in [HQ, CLINIC1] {
        let policy = mesh.status(index).policy.expect("in force");
        assert_eq!(policy.version, 4, "node {index}");
        assert_eq!(
            policy.conflict, None,
            "node {index}: the version 3 tie is settled"
        );
    }
}

#[test]
fn non_members_are_refused_and_listed() {
    let mut mesh = mesh(4);
    apply(&mut mesh, HQ, standard(1));
    mesh.put(HQ, "catalogue/aspirin", &[("price", FieldValue::Int(12))]);
    // Node 3 is not in the policy.
    mesh.connect(HQ, 3);
    mesh.run_until_quiet(100);
    assert!(mesh.get(3, "catalogue/aspirin").is_none());
    let status = mesh.status(HQ);
    assert_eq!(status.refused_connections.len(), 1);
    assert_eq!(status.refused_connections[0].peer_id, node_id(3));
    assert!(
        status
            .peers
            .iter()
            .all(|peer| peer.peer_id != node_id(3) || peer.state != mesh_core::PeerState::Connected)
    );
    // The refused node cannot be told, but its status suggests why.
    let refused_side = mesh.status(3);
    let hq = refused_side
        .peers
        .iter()
        .find(|peer| peer.peer_id == node_id(HQ))
        .expect("node 3 knows of hq");
    let hint = hq.last_error.as_deref().unwrap_or_default();
    assert!(hint.contains("may not list this node"), "{hint}");
}

/// A site member crafts a catalogue change with its own key and pushes it directly.
fn forged_catalogue_change(author: usize, record: &str) -> VerifiedChange {
    let identity = Identity::from_seed(author as u64 + 1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let change = doc
        .edit(
            &Edit::Put(fields(&[("price", FieldValue::Int(0))])),
            1_790_000_000_000,
        )
        .unwrap()
        .unwrap();
    VerifiedChange::sign(&identity, &org_id(), record.parse().unwrap(), change)
}

#[test]
fn an_unauthorised_change_is_quarantined_everywhere_never_applied_and_the_author_told() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    let change = forged_catalogue_change(CLINIC1, "catalogue/aspirin");
    let push = Message::Push {
        changes: vec![EnvelopeBytes(change.envelope.as_bytes().to_vec())],
    };
    // Clinic1 holds its change (as the node that made it would; here it is judged there
    // too), so a receipt for it is one it takes.
    mesh.inject(CLINIC2, CLINIC1, push.encode());
    mesh.run_until_quiet(100);
    mesh.inject(CLINIC1, HQ, push.encode());
    mesh.run_until_quiet(100);
    assert!(mesh.get(HQ, "catalogue/aspirin").is_none(), "never applied");
    let rows = match mesh.command(HQ, Command::Quarantine) {
        Ok(Reply::Quarantine { held, .. }) => held,
        other => panic!("{other:?}"),
    };
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].author, node_id(CLINIC1));
    assert_eq!(rows[0].author_name.as_deref(), Some("clinic1"));
    assert!(matches!(rows[0].reason, RejectReason::MayNotWrite { .. }));
    assert_eq!(mesh.status(HQ).counters.changes_rejected, 1);
    // The author hears of it.
    let own = mesh.status(CLINIC1).own_changes_rejected;
    assert!(
        own.iter()
            .any(|row| row.rejected_by == node_id(HQ) && row.reason.contains("may not write")),
        "{own:?}"
    );

    // Anti-entropy brings the same quarantine to every node, and nobody applies it.
    settle(&mut mesh);
    assert!(mesh.converged());
    for index in 0..3 {
        assert_eq!(
            quarantined(&mesh, index),
            quarantined(&mesh, HQ),
            "node {index}"
        );
        assert!(
            mesh.get(index, "catalogue/aspirin").is_none(),
            "node {index}"
        );
    }
}

#[test]
fn a_record_sent_whole_with_an_unauthorised_change_is_judged_change_by_change() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // A catalogue record whose document holds a master's change and then a site's.
    let record = "catalogue/ibuprofen";
    let master = Identity::from_seed(HQ as u64 + 1);
    let site = Identity::from_seed(CLINIC1 as u64 + 1);
    let mut doc = RecordDoc::new(&master.node_id());
    let mut signed = Vec::new();
    for (author, price) in [(&master, 5), (&site, 0)] {
        doc = RecordDoc::load(&doc.save(), &author.node_id()).unwrap();
        let change = doc
            .edit(&Edit::Put(fields(&[("price", FieldValue::Int(price))])), 0)
            .unwrap()
            .unwrap();
        signed.push(VerifiedChange::sign(
            author,
            &org_id(),
            record.parse().unwrap(),
            change,
        ));
    }
    signed.sort_by_key(|change| change.hash());
    let whole = Message::SyncSnapshots {
        session: 1,
        from_initiator: true,
        snapshots: vec![Snapshot {
            record: record.into(),
            document: doc.save(),
            signatures: signed
                .iter()
                .map(|change| Signature(change.signature()))
                .collect(),
        }],
    };
    mesh.inject(CLINIC2, HQ, whole.encode());
    mesh.run_until_quiet(100);
    let view = mesh
        .get(HQ, record)
        .expect("the master's change is applied");
    assert_eq!(view.fields.get("price"), Some(&FieldValue::Int(5)));
    let status = mesh.status(HQ);
    assert_eq!(
        status.counters.snapshots_taken, 0,
        "the document is not taken whole"
    );
    assert_eq!(status.counters.changes_rejected, 1);
    let held = quarantined(&mesh, HQ);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        held[0].1,
        signed
            .iter()
            .find(|c| c.author == site.node_id())
            .unwrap()
            .hash()
    );
}

#[test]
fn a_master_demoted_while_cut_off_loses_what_it_wrote_meanwhile_on_every_node() {
    let mut mesh = mesh(3);
    let v1 = clinic1_a_master(1);
    apply(&mut mesh, HQ, v1);
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // While master, clinic1 writes reference data that everybody sees.
    mesh.put(CLINIC1, "catalogue/early", &[("price", FieldValue::Int(5))]);
    mesh.run_until_quiet(100);

    // Cut off, clinic1 keeps writing as a master; meanwhile hq demotes it.
    mesh.disconnect(HQ, CLINIC1);
    mesh.disconnect(CLINIC1, CLINIC2);
    mesh.put(CLINIC1, "catalogue/late", &[("price", FieldValue::Int(99))]);
    mesh.put(CLINIC1, "catalogue/early", &[("price", FieldValue::Int(6))]);
    assert_eq!(
        apply(&mut mesh, HQ, standard(2)),
        PolicyOffer::Adopted { version: 2 }
    );
    mesh.run_until_quiet(100);

    mesh.connect_all();
    settle(&mut mesh);
    assert!(mesh.converged(), "all digests equal");
    for index in 0..3 {
        assert_eq!(version(&mut mesh, index), Some(2));
        assert!(
            mesh.get(index, "catalogue/late").is_none(),
            "node {index} must not show the demoted master's later write"
        );
        let early = mesh
            .get(index, "catalogue/early")
            .expect("endorsed history stays");
        assert_eq!(early.fields["price"], FieldValue::Int(5), "node {index}");
        assert_eq!(quarantined(&mesh, index).len(), 2, "node {index}");
        assert_eq!(quarantined(&mesh, index), quarantined(&mesh, HQ));
    }
    let own = mesh.status(CLINIC1).own_changes_rejected;
    assert!(
        own.len() >= 2,
        "the clinic sees its own rejected changes: {own:?}"
    );
    // And a write it tries now is refused at once.
    assert!(matches!(
        try_put(
            &mut mesh,
            CLINIC1,
            "catalogue/new",
            &[("price", FieldValue::Int(1))]
        ),
        Err(CommandError::Forbidden { version: 2, .. })
    ));
}

#[test]
fn a_revoked_node_keeps_what_a_member_built_on_and_nothing_after() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    mesh.put(CLINIC2, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.run_until_quiet(100);
    mesh.put(
        HQ,
        "stock/a",
        &[("note", FieldValue::Str("checked".into()))],
    );
    mesh.run_until_quiet(100);
    mesh.disconnect(CLINIC2, HQ);
    mesh.disconnect(CLINIC2, CLINIC1);
    mesh.put(CLINIC2, "stock/b", &[("count", FieldValue::Int(2))]);
    apply(
        &mut mesh,
        HQ,
        policy(
            2,
            &[("hq", HQ, "master"), ("clinic1", CLINIC1, "site")],
            &[CLINIC2],
        ),
    );
    mesh.run_until_quiet(100);
    assert_eq!(
        mesh.get(CLINIC1, "stock/a").unwrap().fields["count"],
        FieldValue::Int(1),
        "built on by hq, so part of accepted history"
    );
    // The revoked node cannot connect any more.
    mesh.connect(CLINIC2, HQ);
    mesh.run_until_quiet(100);
    assert!(mesh.get(HQ, "stock/b").is_none());
    assert!(!mesh.status(HQ).refused_connections.is_empty());
}

#[test]
fn policy_and_quarantine_survive_a_restart() {
    let mut mesh = mesh(2);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    let change = forged_catalogue_change(CLINIC1, "catalogue/x");
    let push = Message::Push {
        changes: vec![EnvelopeBytes(change.envelope.as_bytes().to_vec())],
    };
    mesh.inject(CLINIC1, HQ, push.encode());
    mesh.run_until_quiet(100);
    mesh.advance(Duration::from_secs(5));
    let digest = mesh.digest(HQ);
    let held = quarantined(&mesh, HQ);
    assert_eq!(held.len(), 1);

    let restore = mesh_core::Restore {
        records: mesh.nodes[HQ].saved.values().cloned().collect(),
        index: Vec::new(),
        log: mesh.nodes[HQ].log.clone(),
        policy: mesh.nodes[HQ].policy.clone(),
    };
    let mut restarted = mesh_core::Node::new(
        Config {
            org: org_id(),
            ..Config::default()
        },
        Identity::from_seed(HQ as u64 + 1),
        7,
    );
    restarted.handle(mesh.now, mesh_core::Input::Restore(restore));
    assert_eq!(restarted.digest(), digest);
    assert_eq!(restarted.quarantined(), held);
    assert_eq!(restarted.policy().map(|policy| policy.version), Some(1));
    assert!(!restarted.admits(&Identity::from_seed(77).node_id()));
}

#[test]
fn verdicts_do_not_depend_on_arrival_order() {
    // The same changes reach two fresh nodes in opposite orders; they end equal.
    let sources: Vec<VerifiedChange> = vec![
        forged_catalogue_change(CLINIC1, "catalogue/a"),
        forged_catalogue_change(CLINIC2, "catalogue/b"),
    ];
    let mut digests = BTreeSet::new();
    let mut quarantines = BTreeSet::new();
    for reverse in [false, true] {
        let mut mesh = mesh(3);
        apply(&mut mesh, HQ, standard(1));
        mesh.connect(HQ, CLINIC1);
        mesh.run_until_quiet(100);
        let mut order = sources.clone();
        if reverse {
            order.reverse();
        }
        for change in order {
            let push = Message::Push {
                changes: vec![EnvelopeBytes(change.envelope.as_bytes().to_vec())],
            };
            mesh.inject(CLINIC1, HQ, push.encode());
            mesh.run_until_quiet(100);
        }
        digests.insert(mesh.digest(HQ).to_string());
        quarantines.insert(format!("{:?}", quarantined(&mesh, HQ)));
    }
    assert_eq!(digests.len(), 1);
    assert_eq!(quarantines.len(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[test]
fn a_change_that_breaks_the_policy_schema_is_refused_locally_and_quarantined_remotely() {
    use crdt_schema::{CollectionSchema, FieldSchema, FieldType};
    let mut policy = Policy {
        unnamed_collections: Default::default(),
        version: 1,
        members: [
            (
                "hq".to_owned(),
                Member {
                    node: node_id(HQ),
                    roles: ["master".to_owned()].into(),
                },
            ),
            (
                "clinic1".to_owned(),
                Member {
                    node: node_id(CLINIC1),
                    roles: ["site".to_owned()].into(),
                },
            ),
        ]
        .into(),
        ..Policy::default()
    };
    policy.collections.insert(
        "catalogue".to_owned(),
        CollectionRule {
            writers: ["master".to_owned()].into(),
            schema: Some(CollectionSchema {
                fields: [(
                    "price".to_owned(),
                    FieldSchema {
                        field_type: FieldType::Integer,
                        required: true,
                    },
                )]
                .into(),
                allow_other_fields: false,
            }),
            ..Default::default()
        },
    );
    let mut mesh = mesh(2);
    apply(&mut mesh, HQ, policy.sign(&org()));
    mesh.connect_all();
    mesh.run_until_quiet(100);

    let refused = try_put(
        &mut mesh,
        HQ,
        "catalogue/a",
        &[("price", FieldValue::Str("cheap".into()))],
    );
    assert!(
        matches!(
            refused,
            Err(CommandError::Forbidden {
                reason: RejectReason::Schema { .. },
                ..
            })
        ),
        "{refused:?}"
    );
    mesh.put(HQ, "catalogue/b", &[("price", FieldValue::Int(3))]);

    // The master's own key, but a change that breaks the schema, crafted outside its node.
    let identity = Identity::from_seed(HQ as u64 + 1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let change = doc
        .edit(
            &Edit::Put(fields(&[("colour", FieldValue::Str("red".into()))])),
            1_790_000_000_000,
        )
        .unwrap()
        .unwrap();
    let change = VerifiedChange::sign(&identity, &org_id(), "catalogue/c".parse().unwrap(), change);
    let push = Message::Push {
        changes: vec![EnvelopeBytes(change.envelope.as_bytes().to_vec())],
    };
    mesh.inject(HQ, CLINIC1, push.encode());
    mesh.run_until_quiet(100);
    assert!(mesh.get(CLINIC1, "catalogue/c").is_none());
    assert!(mesh.get(CLINIC1, "catalogue/b").is_some());
    let rows = match mesh.command(CLINIC1, Command::Quarantine) {
        Ok(Reply::Quarantine { held, .. }) => held,
        other => panic!("{other:?}"),
    };
    assert_eq!(rows.len(), 1);
    assert!(
        matches!(rows[0].reason, RejectReason::Schema { .. }),
        "{rows:?}"
    );
}

#[test]
fn a_change_with_a_bad_signature_is_not_held_but_listed_as_refused() {
    let mut mesh = mesh(2);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    let change = forged_catalogue_change(CLINIC1, "catalogue/aspirin");
    let mut bytes = change.envelope.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let push = Message::Push {
        changes: vec![EnvelopeBytes(bytes)],
    };
    mesh.inject(CLINIC1, HQ, push.encode());
    mesh.run_until_quiet(100);
    let Ok(Reply::Quarantine { held, refused }) = mesh.command(HQ, Command::Quarantine) else {
        panic!("quarantine answers");
    };
    assert!(held.is_empty(), "a bad signature is never held");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].from, node_id(CLINIC1));
    assert!(refused[0].reason.contains("bad signature"), "{refused:?}");
}

#[test]
fn changes_that_break_their_authors_chain_never_crash_a_node_and_are_quarantined_alike() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // clinic1 may write stock, and crafts with its own key: two different first changes of
    // one record (a forked chain), and a change claiming to be its fifth on a fresh record.
    let identity = Identity::from_seed(CLINIC1 as u64 + 1);
    let make = |value: i64| {
        let mut doc = RecordDoc::new(&identity.node_id());
        doc.edit(
            &Edit::Put(fields(&[("count", FieldValue::Int(value))])),
            1_790_000_000_000,
        )
        .unwrap()
        .unwrap()
    };
    let (first, second) = (make(1), make(2));
    let mut expanded = make(3).decode();
    expanded.seq = 5;
    expanded.hash = None;
    let gap: automerge::Change = expanded.into();
    let sign = |record: &str, change: automerge::Change| {
        VerifiedChange::sign(&identity, &org_id(), record.parse().unwrap(), change)
    };
    let crafted = [
        sign("stock/forked", first),
        sign("stock/forked", second),
        sign("stock/gap", gap),
    ];
    for change in &crafted {
        let push = Message::Push {
            changes: vec![EnvelopeBytes(change.envelope.as_bytes().to_vec())],
        };
        mesh.inject(CLINIC1, HQ, push.encode());
        mesh.run_until_quiet(100);
    }
    settle(&mut mesh);
    assert!(mesh.converged());
    for index in 0..3 {
        assert!(mesh.get(index, "stock/forked").is_none(), "node {index}");
        assert!(mesh.get(index, "stock/gap").is_none(), "node {index}");
        let held: Vec<_> = quarantined(&mesh, index)
            .into_iter()
            .map(|(_, hash)| hash)
            .collect();
        for change in &crafted {
            assert!(held.contains(&change.hash()), "node {index}");
        }
    }
    let Ok(Reply::Quarantine { held, .. }) = mesh.command(HQ, Command::Quarantine) else {
        panic!("quarantine answers");
    };
    assert!(
        held.iter()
            .all(|row| matches!(row.reason, RejectReason::BrokenHistory { .. })),
        "{held:?}"
    );
}

#[test]
fn a_member_flooding_one_record_with_forbidden_changes_cannot_stall_honest_sync() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // clinic1 crafts 100 different first changes of one catalogue record (100 concurrent
    // heads), all in one push: more than a record may hold in quarantine, and more heads
    // than a reconciliation message may list for one record.
    let flood = forbidden_flood("catalogue/flood", 100);
    mesh.inject(CLINIC1, HQ, Message::Push { changes: flood }.encode());
    mesh.run_until_quiet(1000);
    // Honest writes made afterwards still reach every node, and the mesh converges.
    try_put(
        &mut mesh,
        HQ,
        "catalogue/after",
        &[("price", FieldValue::Int(7))],
    )
    .unwrap();
    try_put(
        &mut mesh,
        CLINIC2,
        "stock/after",
        &[("count", FieldValue::Int(3))],
    )
    .unwrap();
    settle(&mut mesh);
    assert!(mesh.converged(), "honest nodes converge despite the flood");
    for index in 0..3 {
        assert!(mesh.get(index, "catalogue/after").is_some(), "node {index}");
        assert!(mesh.get(index, "stock/after").is_some(), "node {index}");
        assert!(mesh.get(index, "catalogue/flood").is_none(), "node {index}");
        let held = quarantined(&mesh, index).len();
        assert!(
            held <= mesh_core::limits::QUARANTINE_PER_RECORD_MAX,
            "node {index} holds {held} quarantined changes of one record"
        );
    }
    for index in 0..3 {
        assert_eq!(
            mesh.status(index).counters.messages_rejected,
            0,
            "node {index} refused no honest message"
        );
    }
}

/// `count` changes by clinic1's key to one catalogue record (which it may not write), each
/// a first change of its own: as many concurrent heads.
fn forbidden_flood(record: &str, count: i64) -> Vec<EnvelopeBytes> {
    flood_by(&Identity::from_seed(CLINIC1 as u64 + 1), record, count)
}

/// `count` first changes of `record` by `identity`, each setting `price` to its number.
fn flood_by(identity: &Identity, record: &str, count: i64) -> Vec<EnvelopeBytes> {
    (0..count)
        .map(|value| {
            let mut doc = RecordDoc::new(&identity.node_id());
            let change = doc
                .edit(
                    &Edit::Put(fields(&[("price", FieldValue::Int(value))])),
                    1_790_000_000_000,
                )
                .unwrap()
                .unwrap();
            let signed = VerifiedChange::sign(identity, &org_id(), record.parse().unwrap(), change);
            EnvelopeBytes(signed.envelope.as_bytes().to_vec())
        })
        .collect()
}

#[test]
fn nodes_flooded_with_different_forbidden_changes_hold_the_same_ones_after_exchanging() {
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // clinic1 sends half of 100 forbidden changes of one record to hq and the other half to
    // clinic2: each may hold 32, and each first holds 32 of its own half.
    let flood = forbidden_flood("catalogue/flood", 100);
    let (to_hq, to_clinic2) = flood.split_at(50);
    mesh.inject(
        CLINIC1,
        HQ,
        Message::Push {
            changes: to_hq.to_vec(),
        }
        .encode(),
    );
    mesh.inject(
        CLINIC1,
        CLINIC2,
        Message::Push {
            changes: to_clinic2.to_vec(),
        }
        .encode(),
    );
    settle(&mut mesh);
    let held: Vec<BTreeSet<crdt_schema::ChangeHash>> = (0..3)
        .map(|index| {
            quarantined(&mesh, index)
                .into_iter()
                .map(|(_, hash)| hash)
                .collect()
        })
        .collect();
    assert_eq!(held[HQ].len(), mesh_core::limits::QUARANTINE_PER_RECORD_MAX);
    assert_eq!(
        held[HQ], held[CLINIC2],
        "hq and clinic2 hold the same changes"
    );
    assert_eq!(held[HQ], held[CLINIC1]);
    assert!(mesh.converged(), "and their digests agree");
}

#[test]
fn one_peer_relaying_forbidden_changes_by_many_keys_is_slowed_not_believed() {
    use mesh_core::limits::{QUARANTINE_PEER_WINDOW, QUARANTINE_PER_PEER_PER_WINDOW};
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // clinic1 relays changes by 10 keys that are not members, each well inside the
    // per-author and per-record bounds: 4,960 in all, more than a peer may relay at once.
    let flood: Vec<EnvelopeBytes> = (0..10u64)
        .flat_map(|key| {
            let stranger = Identity::from_seed(70_000 + key);
            (0..16)
                .flat_map(|record| flood_by(&stranger, &format!("catalogue/k{key}-{record}"), 31))
                .collect::<Vec<_>>()
        })
        .collect();
    let send = |mesh: &mut Harness| {
        for batch in flood.chunks(1000) {
            mesh.inject(
                CLINIC1,
                HQ,
                Message::Push {
                    changes: batch.to_vec(),
                }
                .encode(),
            );
            mesh.run_until_quiet(1000);
        }
    };
    send(&mut mesh);
    let held = quarantined(&mesh, HQ).len();
    assert!(
        held <= QUARANTINE_PER_PEER_PER_WINDOW,
        "hq took {held} forbidden changes from one peer at once"
    );
    assert!(mesh.status(HQ).counters.changes_dropped > 0);
    // Slowed, not refused for good: once the window is over the rest are taken.
    mesh.advance(QUARANTINE_PEER_WINDOW + Duration::from_secs(1));
    send(&mut mesh);
    assert_eq!(quarantined(&mesh, HQ).len(), flood.len());
    // And hq's own relay to clinic2 goes at the same rate, to the same end.
    settle(&mut mesh);
    assert_eq!(quarantined(&mesh, CLINIC2).len(), flood.len());
    assert!(mesh.converged());
}

#[test]
fn a_policy_that_refuses_unnamed_collections_turns_a_typo_into_an_error() {
    let mut mesh = mesh(3);
    let mut strict: Policy = serde_json::from_str(&standard(1).policy).unwrap();
    strict.unnamed_collections = crdt_schema::policy::UnnamedCollections::Refused;
    apply(&mut mesh, HQ, strict.sign(&org()));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // A named collection is written as before.
    try_put(
        &mut mesh,
        CLINIC1,
        "stock/c1",
        &[("count", FieldValue::Int(1))],
    )
    .unwrap();
    // A typo is refused at once, with the rule.
    match try_put(
        &mut mesh,
        CLINIC1,
        "stokc/c1",
        &[("count", FieldValue::Int(1))],
    ) {
        Err(CommandError::Forbidden { reason, .. }) => assert_eq!(
            reason,
            RejectReason::UnnamedCollection {
                collection: "stokc".into()
            }
        ),
        other => panic!("a write to an unnamed collection: {other:?}"),
    }
    // And a change to it from a node that did not refuse it is quarantined everywhere.
    let identity = Identity::from_seed(CLINIC1 as u64 + 1);
    let mut doc = RecordDoc::new(&identity.node_id());
    let change = doc
        .edit(&Edit::Put(fields(&[("count", FieldValue::Int(2))])), 0)
        .unwrap()
        .unwrap();
    let signed = VerifiedChange::sign(&identity, &org_id(), "stokc/c2".parse().unwrap(), change);
    let push = Message::Push {
        changes: vec![EnvelopeBytes(signed.envelope.as_bytes().to_vec())],
    };
    mesh.inject(CLINIC1, HQ, push.encode());
    settle(&mut mesh);
    assert!(mesh.converged());
    for index in [HQ, CLINIC2] {
        assert!(mesh.get(index, "stokc/c2").is_none(), "node {index}");
        assert_eq!(quarantined(&mesh, index).len(), 1, "node {index}");
        assert!(mesh.get(index, "stock/c1").is_some(), "node {index}");
    }
}

#[test]
fn a_policy_signed_before_unnamed_collections_existed_is_still_canonical() {
    // The canonical text of an open policy has no `unnamed_collections` key, so policies
    // signed by earlier versions verify and are canonical as before.
    let signed = standard(1);
    assert!(!signed.policy.contains("unnamed_collections"));
    let mut strict: Policy = serde_json::from_str(&signed.policy).unwrap();
    strict.unnamed_collections = crdt_schema::policy::UnnamedCollections::Refused;
    assert!(
        strict
            .canonical()
            .contains("\"unnamed_collections\":\"refused\"")
    );
}

#[test]
fn an_applied_policy_is_acknowledged_only_once_it_is_durable() {
    let mut mesh = mesh(1);
    mesh.storage_mode = mesh_tests::StorageMode::Manual;
    let id = mesh.command_async(
        HQ,
        Command::ApplyPolicy {
            signed: standard(1),
        },
    );
    assert!(
        mesh.completion(id).is_none(),
        "not answered before it is saved"
    );
    assert_eq!(version(&mut mesh, HQ), Some(1), "but in force at once");
    // The checkpoint carrying it fails (a full disk): the command says so.
    mesh.complete_storage(HQ, Err("no space left on device".into()));
    match mesh.completion(id) {
        Some(Err(CommandError::Storage(message))) => {
            assert!(message.contains("could not be saved"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(mesh.nodes[HQ].policy.is_none());
    // Applied again as the error says: answered once it is saved this time.
    let id = mesh.command_async(
        HQ,
        Command::ApplyPolicy {
            signed: standard(1),
        },
    );
    assert!(
        mesh.completion(id).is_none(),
        "not answered before it is saved"
    );
    mesh.complete_all_storage();
    assert!(matches!(
        mesh.completion(id),
        Some(Ok(Reply::PolicyOffered(PolicyOffer::Unchanged {
            version: 1
        })))
    ));
    assert!(mesh.nodes[HQ].policy.is_some());

    // A newer one is answered when the checkpoint holding it completes.
    let id = mesh.command_async(
        HQ,
        Command::ApplyPolicy {
            signed: standard(2),
        },
    );
    assert!(mesh.completion(id).is_none());
    mesh.complete_all_storage();
    assert!(matches!(
        mesh.completion(id),
        Some(Ok(Reply::PolicyOffered(PolicyOffer::Adopted {
            version: 2
        })))
    ));
    let saved: SignedPolicy = serde_json::from_slice(mesh.nodes[HQ].policy.as_ref().unwrap())
        .expect("the saved policy parses");
    assert_eq!(saved.verify(&org_id()).unwrap().version, 2);
}

#[test]
fn a_demotion_goes_in_force_only_once_its_endorsements_are_durable() {
    let mut mesh = mesh(3);
    let v1 = clinic1_a_master(1);
    apply(&mut mesh, HQ, v1);
    mesh.connect_all();
    mesh.run_until_quiet(100);
    mesh.put(CLINIC1, "catalogue/early", &[("price", FieldValue::Int(5))]);
    mesh.run_until_quiet(100);

    // The endorsement's append fails (a full disk): the demotion is not applied anywhere.
    mesh.storage_mode = mesh_tests::StorageMode::Manual;
    let id = mesh.command_async(
        HQ,
        Command::ApplyPolicy {
            signed: standard(2),
        },
    );
    assert_eq!(
        version(&mut mesh, HQ),
        Some(1),
        "not in force before it is endorsed"
    );
    mesh.complete_storage(HQ, Err("no space left on device".into()));
    match mesh.completion(id) {
        Some(Err(CommandError::Storage(message))) => {
            assert!(message.contains("was not applied"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    mesh.storage_mode = mesh_tests::StorageMode::Immediate;
    mesh.complete_all_storage();
    mesh.run_until_quiet(100);
    for index in 0..3 {
        assert_eq!(version(&mut mesh, index), Some(1), "node {index}");
    }

    // Applied again: the endorsement reaches the peers first, then the policy.
    mesh.storage_mode = mesh_tests::StorageMode::Manual;
    let id = mesh.command_async(
        HQ,
        Command::ApplyPolicy {
            signed: standard(2),
        },
    );
    assert_eq!(
        mesh.in_flight(),
        0,
        "nothing leaves before the endorsement is durable"
    );
    mesh.complete_storage(HQ, Ok(()));
    assert_eq!(version(&mut mesh, HQ), Some(2), "in force once endorsed");
    assert!(
        mesh.completion(id).is_none(),
        "answered once the policy is saved"
    );
    mesh.complete_all_storage();
    assert!(matches!(
        mesh.completion(id),
        Some(Ok(Reply::PolicyOffered(PolicyOffer::Adopted {
            version: 2
        })))
    ));
    mesh.storage_mode = mesh_tests::StorageMode::Immediate;
    mesh.run_until_quiet(100);
    for index in 0..3 {
        assert_eq!(version(&mut mesh, index), Some(2), "node {index}");
        let early = mesh.get(index, "catalogue/early").expect("endorsed");
        assert_eq!(early.fields["price"], FieldValue::Int(5), "node {index}");
    }
}

#[test]
fn a_policy_that_would_cut_off_the_node_applying_it_is_refused_there() {
    let mut mesh = mesh(3);
    let without_clinic2 = policy(
        2,
        &[("hq", HQ, "master"), ("clinic1", CLINIC1, "site")],
        &[],
    );
    let error = mesh
        .command(
            CLINIC2,
            Command::ApplyPolicy {
                signed: without_clinic2.clone(),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("does not list this node as a member"),
        "{error}"
    );
    let revoking = policy(2, &[("hq", HQ, "master")], &[CLINIC1]);
    let error = mesh
        .command(CLINIC1, Command::ApplyPolicy { signed: revoking })
        .unwrap_err()
        .to_string();
    assert!(error.contains("revokes this node"), "{error}");
    assert_eq!(version(&mut mesh, CLINIC2), None);
    // Applied where it keeps its author a member, it is in force (and would reach clinic2
    // from there, cutting it off as intended).
    assert_eq!(
        apply(&mut mesh, HQ, without_clinic2),
        PolicyOffer::Adopted { version: 2 }
    );
}

#[test]
fn a_node_writing_again_after_a_schema_rejected_its_own_change_keeps_every_node_equal() {
    use crdt_schema::{CollectionSchema, FieldSchema, FieldType};
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // Under version 1 the catalogue has no schema: hq writes a price as text.
    mesh.put(HQ, "catalogue/x", &[("price", FieldValue::Int(3))]);
    mesh.put(
        HQ,
        "catalogue/x",
        &[("price", FieldValue::Str("abc".into()))],
    );
    mesh.run_until_quiet(100);
    // Version 2 requires an integer price: hq's own last change is rejected everywhere.
    let mut v2 = standard(2).verify(&org_id()).unwrap();
    v2.collections.get_mut("catalogue").unwrap().schema = Some(CollectionSchema {
        fields: [(
            "price".to_owned(),
            FieldSchema {
                field_type: FieldType::Integer,
                required: true,
            },
        )]
        .into(),
        allow_other_fields: false,
    });
    apply(&mut mesh, HQ, v2.sign(&org()));
    settle(&mut mesh);
    assert_eq!(quarantined(&mesh, HQ).len(), 1);
    // A write that does not fix the price is refused, naming the field.
    let refused = try_put(
        &mut mesh,
        HQ,
        "catalogue/x",
        &[("name", FieldValue::Str("x".into()))],
    );
    assert!(
        matches!(refused, Err(CommandError::Forbidden { .. })),
        "{refused:?}"
    );
    // hq writes again: the new change continues its chain through the rejected one, so no
    // node sees a fork, and built on by a writer, the rejected change is accepted with it.
    mesh.put(HQ, "catalogue/x", &[("price", FieldValue::Int(5))]);
    settle(&mut mesh);
    assert!(mesh.converged(), "every node holds the same records");
    for index in 0..3 {
        let record = mesh.get(index, "catalogue/x").expect("the record");
        assert_eq!(record.fields["price"], FieldValue::Int(5), "node {index}");
        assert!(quarantined(&mesh, index).is_empty(), "node {index}");
    }
}

#[test]
fn under_a_policy_peers_are_shown_by_their_member_name_not_the_one_they_claim() {
    // Every node calls itself "hq".
    let mut mesh = Harness::with_config(3, |_| Config {
        org: org_id(),
        name: "hq".into(),
        ..Config::default()
    });
    mesh.connect_all();
    mesh.run_until_quiet(100);
    let claimed: Vec<Option<String>> = mesh
        .status(HQ)
        .peers
        .iter()
        .map(|peer| peer.name.clone())
        .collect();
    assert_eq!(
        claimed,
        vec![Some("hq".to_owned()); 2],
        "without a policy, the claim"
    );
    apply(&mut mesh, HQ, standard(1));
    mesh.run_until_quiet(100);
    let mut shown: Vec<(NodeId, Option<String>)> = mesh
        .status(HQ)
        .peers
        .iter()
        .map(|peer| (peer.peer_id, peer.name.clone()))
        .collect();
    shown.sort();
    let mut expected = vec![
        (node_id(CLINIC1), Some("clinic1".to_owned())),
        (node_id(CLINIC2), Some("clinic2".to_owned())),
    ];
    expected.sort();
    assert_eq!(shown, expected);
}

#[test]
fn the_first_policy_does_not_turn_a_strangers_writes_into_accepted_history() {
    // Finding 9 of the security review: an open mesh took a catalogue write from a key that
    // was never a member; the first policy must not endorse it.
    let mut mesh = mesh(3);
    mesh.connect_all();
    mesh.run_until_quiet(100);
    let stranger = Identity::from_seed(777);
    let mut doc = RecordDoc::new(&stranger.node_id());
    let edit = Edit::Put(
        [(
            "price".to_owned(),
            crdt_schema::FieldEdit::Set(FieldValue::Int(1)),
        )]
        .into(),
    );
    let change = doc.edit(&edit, 0).unwrap().unwrap();
    let signed = VerifiedChange::sign(&stranger, &org_id(), "catalogue/x".parse().unwrap(), change);
    let push = Message::Push {
        changes: vec![EnvelopeBytes(signed.envelope.as_bytes().to_vec())],
    };
    mesh.inject(CLINIC1, HQ, push.encode());
    settle(&mut mesh);
    assert!(
        mesh.get(HQ, "catalogue/x").is_some(),
        "open: accepted before the policy"
    );
    apply(&mut mesh, HQ, standard(1));
    settle(&mut mesh);
    for index in 0..3 {
        assert!(
            mesh.get(index, "catalogue/x").is_none(),
            "node {index} still shows the stranger's catalogue write"
        );
        assert!(
            quarantined(&mesh, index)
                .iter()
                .any(|(record, hash)| record == "catalogue/x" && *hash == signed.hash()),
            "node {index}"
        );
    }
}

#[test]
fn a_member_flooding_many_records_is_bounded_over_all_records() {
    use mesh_core::limits::{QUARANTINE_PER_AUTHOR_MAX, QUARANTINE_PER_RECORD_MAX};
    let mut mesh = mesh(3);
    apply(&mut mesh, HQ, standard(1));
    mesh.connect_all();
    mesh.run_until_quiet(100);
    // clinic1 writes catalogue records it may not write: the per-record bound in each of
    // enough records to pass the per-author bound.
    let records = QUARANTINE_PER_AUTHOR_MAX / QUARANTINE_PER_RECORD_MAX + 4;
    let flood: Vec<EnvelopeBytes> = (0..records)
        .flat_map(|record| {
            forbidden_flood(
                &format!("catalogue/flood-{record}"),
                QUARANTINE_PER_RECORD_MAX as i64,
            )
        })
        .collect();
    for batch in flood.chunks(1000) {
        mesh.inject(
            CLINIC1,
            HQ,
            Message::Push {
                changes: batch.to_vec(),
            }
            .encode(),
        );
        mesh.run_until_quiet(1000);
    }
    let held = quarantined(&mesh, HQ).len();
    assert!(
        held <= QUARANTINE_PER_AUTHOR_MAX,
        "hq holds {held} quarantined changes by one author"
    );
    assert!(mesh.status(HQ).counters.changes_dropped > 0);
}
