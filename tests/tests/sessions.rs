//! Reconciliation sessions: timers, stalls, manual sync, abort, history, scope.

use std::collections::BTreeSet;
use std::time::Duration;

use crdt_schema::{CollectionSchema, FieldSchema, FieldType, FieldValue};
use mesh_core::{Command, CommandError, Config, Reply, SyncOutcome};
use mesh_tests::{Harness, fields};

/// The node of a pair that starts the first session on connect: the lower id.
fn initiator(mesh: &Harness) -> usize {
    if mesh.id(0) < mesh.id(1) { 0 } else { 1 }
}

#[test]
fn a_session_that_loses_a_message_times_out_and_starts_afresh() {
    let mut mesh = Harness::new(2);
    for n in 0..50 {
        mesh.put(0, &format!("stock/{n}"), &[("count", FieldValue::Int(n))]);
    }
    mesh.connect(0, 1);
    // Deliver the hellos, then lose the first reconciliation request.
    mesh.step();
    let lost = mesh.take_in_flight();
    assert!(!lost.is_empty());
    assert!(!mesh.converged());

    mesh.advance(Duration::from_secs(11));
    assert!(
        mesh.converged(),
        "the stalled session restarted and completed"
    );
    let history = match mesh.command(initiator(&mesh), Command::History).unwrap() {
        Reply::History(rows) => rows,
        other => panic!("{other:?}"),
    };
    assert!(matches!(&history[0].outcome, SyncOutcome::Completed));
    assert!(history.iter().any(
        |row| matches!(&row.outcome, SyncOutcome::Error(reason) if reason.contains("no progress"))
    ));
}

#[test]
fn peers_reconcile_on_the_sync_timer() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    // A change that push cannot deliver (the message is lost) arrives by anti-entropy.
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    assert_eq!(mesh.take_in_flight().len(), 1, "the push");
    assert!(!mesh.converged());
    mesh.advance(Duration::from_secs(29));
    assert!(!mesh.converged(), "not before the interval");
    mesh.advance(Duration::from_secs(5));
    assert!(mesh.converged());
    let status = mesh.status(1);
    assert!(status.last_sync.is_some());
    assert!(status.peers[0].last_sync.is_some());
}

#[test]
fn sync_now_and_abort_are_recorded_in_history() {
    let mut mesh = Harness::new(2);
    let a = initiator(&mesh);
    let b = 1 - a;
    for n in 0..100 {
        mesh.put(a, &format!("stock/{n}"), &[("count", FieldValue::Int(n))]);
    }
    mesh.connect(0, 1);
    mesh.step();
    mesh.take_in_flight();
    let Reply::SyncAborted { sessions } = mesh.command(a, Command::SyncAbort).unwrap() else {
        panic!()
    };
    assert_eq!(sessions, 1);
    mesh.run_until_quiet(20);
    assert!(!mesh.converged(), "an aborted sync applies nothing more");

    let peer = mesh.id(b);
    let Reply::SyncStarted { peers } = mesh.command(a, Command::SyncNow { peer: None }).unwrap()
    else {
        panic!()
    };
    assert_eq!(peers, vec![peer]);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    let Reply::History(rows) = mesh.command(a, Command::History).unwrap() else {
        panic!()
    };
    assert_eq!(rows[0].outcome, SyncOutcome::Completed);
    assert_eq!(rows[0].changes_sent, 100);
    assert_eq!(rows[1].outcome, SyncOutcome::Aborted);

    let stranger = crdt_schema::Identity::from_seed(99).node_id();
    let error = mesh
        .command(
            a,
            Command::SyncNow {
                peer: Some(stranger),
            },
        )
        .unwrap_err();
    assert_eq!(error, CommandError::PeerNotConnected(stranger));
}

#[test]
fn reconciliation_covers_only_the_collections_both_peers_replicate() {
    let mut mesh = Harness::with_config(2, |index| Config {
        collections: (index == 1).then(|| BTreeSet::from(["catalogue".to_owned()])),
        ..Config::default()
    });
    mesh.put(
        0,
        "catalogue/p1",
        &[("name", FieldValue::Str("Aspirin".into()))],
    );
    mesh.put(0, "stock/p1", &[("count", FieldValue::Int(3))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    assert!(mesh.get(1, "catalogue/p1").is_some());
    assert!(
        mesh.get(1, "stock/p1").is_none(),
        "node 1 does not replicate stock"
    );
    // Pushes respect the scope too.
    mesh.put(0, "stock/p2", &[("count", FieldValue::Int(3))]);
    mesh.put(
        0,
        "catalogue/p2",
        &[("name", FieldValue::Str("Ibuprofen".into()))],
    );
    mesh.run_until_quiet(20);
    assert!(mesh.get(1, "stock/p2").is_none());
    assert!(mesh.get(1, "catalogue/p2").is_some());
    let error = mesh
        .command(
            1,
            Command::Put {
                record: "stock/p3".parse().unwrap(),
                fields: fields(&[("count", FieldValue::Int(1))]),
            },
        )
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("does not replicate collection `stock`"),
        "{error}"
    );
}

#[test]
fn a_local_write_that_breaks_the_schema_is_refused_before_any_change_exists() {
    let schema = CollectionSchema {
        fields: [
            (
                "name".to_owned(),
                FieldSchema {
                    field_type: FieldType::String,
                    required: true,
                },
            ),
            (
                "price".to_owned(),
                FieldSchema {
                    field_type: FieldType::Float,
                    required: false,
                },
            ),
        ]
        .into(),
        allow_other_fields: false,
    };
    let mut mesh = Harness::with_config(1, |_| Config {
        schemas: [("catalogue".to_owned(), schema.clone())].into(),
        ..Config::default()
    });
    let error = mesh
        .command(
            0,
            Command::Put {
                record: "catalogue/p1".parse().unwrap(),
                fields: fields(&[("price", FieldValue::Str("cheap".into()))]),
            },
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the write breaks the schema of `catalogue`: field `name` is required but missing; field `price` must be float but is string"
    );
    assert!(
        mesh.nodes[0].pending_storage.is_empty() && mesh.nodes[0].log.is_empty(),
        "no change exists"
    );
    assert!(mesh.get(0, "catalogue/p1").is_none());
    mesh.put(
        0,
        "catalogue/p1",
        &[
            ("name", FieldValue::Str("Aspirin".into())),
            ("price", FieldValue::Float(2.5)),
        ],
    );
}

#[test]
fn a_pushed_change_with_missing_dependencies_waits_and_is_pulled() {
    let mut mesh = Harness::new(3);
    mesh.connect(0, 1);
    mesh.connect(1, 2);
    mesh.run_until_quiet(20);
    // Node 2 misses the first change of a record (its push from node 1 is lost) ...
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.step();
    let forwarded = mesh.take_in_flight();
    assert_eq!(forwarded.len(), 1, "node 1 forwards to node 2");
    // ... then receives the second, which depends on the first.
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(2))]);
    mesh.run_until_quiet(20);
    assert!(mesh.converged(), "node 2 asked node 1 for what it lacked");
    assert_eq!(
        mesh.get(2, "stock/a").unwrap().fields["count"],
        FieldValue::Int(2)
    );
    assert_eq!(mesh.status(2).pending_changes, 0);
}

#[test]
fn the_same_scenario_gives_the_same_effects_bit_for_bit() {
    fn run() -> u64 {
        let mut mesh = Harness::new(3);
        for node in 0..3 {
            for n in 0..20 {
                mesh.put(
                    node,
                    &format!("stock/{}", n * 3 + node),
                    &[("count", FieldValue::Int(n as i64))],
                );
            }
        }
        mesh.connect_all();
        mesh.run_until_quiet(100);
        mesh.put(1, "stock/0", &[("count", FieldValue::Int(7))]);
        mesh.disconnect(0, 2);
        mesh.advance(Duration::from_secs(65));
        assert!(mesh.converged());
        mesh.trace_hash()
    }
    assert_eq!(run(), run());
}

#[test]
fn changes_learned_by_reconciliation_reach_the_other_peers_without_waiting_an_interval() {
    // A star: nodes 1 and 2 know only node 0. Node 1 writes while cut off, then reconnects:
    // its session with node 0 brings the change there, and node 0 passes it on to node 2
    // at once rather than at its next 30 s sync.
    let mut mesh = Harness::new(3);
    mesh.connect(0, 2);
    mesh.run_until_quiet(100);
    mesh.put(1, "stock/late", &[("count", FieldValue::Int(1))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    assert!(mesh.get(0, "stock/late").is_some());
    mesh.advance(Duration::from_millis(500));
    assert!(
        mesh.get(2, "stock/late").is_some(),
        "node 2 has the change well before the sync interval"
    );
}

#[test]
fn nodes_of_different_orgs_never_sync_and_both_say_why() {
    let org = |seed: u64| {
        crdt_schema::OrgId::from_bytes(*crdt_schema::Identity::from_seed(seed).node_id().as_bytes())
    };
    let mut mesh = Harness::with_config(2, |index| Config {
        org: org(9000 + index as u64),
        ..Config::default()
    });
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    mesh.advance(Duration::from_secs(60));
    for index in 0..2 {
        let status = mesh.status(index);
        let peer = &status.peers[0];
        let error = peer.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("different orgs"), "node {index}: {error}");
        assert_eq!(
            status.counters.changes_rejected, 0,
            "no change got as far as a verdict"
        );
    }
    assert!(mesh.get(1, "stock/a").is_none());
}

#[test]
fn a_session_that_fails_to_store_what_it_brought_does_not_make_every_peer_resync() {
    let mut mesh = Harness::new(3);
    mesh.connect(0, 2);
    mesh.run_until_quiet(100);
    for n in 0..5 {
        mesh.put(1, &format!("stock/{n}"), &[("count", FieldValue::Int(n))]);
    }
    let sessions_with_2 = |mesh: &mut Harness| match mesh.command(0, Command::History).unwrap() {
        Reply::History(rows) => rows.iter().filter(|row| row.peer == mesh.id(2)).count(),
        other => panic!("{other:?}"),
    };
    let before = sessions_with_2(&mut mesh);
    // Node 0's disk is full: the changes its session with node 1 brings cannot be stored.
    mesh.storage_mode = mesh_tests::StorageMode::Manual;
    mesh.connect(0, 1);
    for _ in 0..20 {
        let appending = mesh.nodes[0].pending_storage.iter().any(|(_, request)| {
            matches!(request, mesh_core::storage::StorageRequest::Append { .. })
        });
        if appending {
            break;
        }
        mesh.step();
    }
    mesh.complete_storage(0, Err("no space left on device".into()));
    mesh.storage_mode = mesh_tests::StorageMode::Immediate;
    mesh.complete_all_storage();
    mesh.advance(Duration::from_secs(2));
    assert_eq!(
        sessions_with_2(&mut mesh),
        before,
        "a failed session is no news: node 2 waits for its interval"
    );
}
