//! A node that missed a lot catches up through reconciliation in a few round trips.

use crdt_schema::FieldValue;
use mesh_tests::Harness;

const RECORDS: usize = 1000;
const EDITS_PER_RECORD: usize = 10;

/// Node 0 writes 10,000 changes across 1,000 records while node 1 is away.
fn writer_with_history(mesh: &mut Harness) {
    for edit in 0..EDITS_PER_RECORD {
        for record in 0..RECORDS {
            let key = format!("stock/item-{record:04}");
            mesh.put(0, &key, &[("count", FieldValue::Int(edit as i64))]);
        }
    }
}

#[test]
fn a_node_that_missed_10k_changes_on_1k_records_catches_up_in_at_most_8_round_trips() {
    let mut mesh = Harness::new(2);
    writer_with_history(&mut mesh);
    assert_eq!(
        mesh.status(0).counters.changes_local,
        (RECORDS * EDITS_PER_RECORD) as u64
    );

    mesh.connect(0, 1);
    let flights = mesh.run_until_quiet(100);
    let round_trips = flights.div_ceil(2);
    eprintln!("catch-up: {flights} flights, {round_trips} round trips");

    assert!(mesh.converged());
    assert_eq!(
        mesh.status(1).counters.changes_applied,
        (RECORDS * EDITS_PER_RECORD) as u64
    );
    assert!(
        round_trips <= 8,
        "catching up took {round_trips} round trips ({flights} flights)"
    );
}

#[test]
fn a_node_with_old_versions_of_every_record_catches_up_in_at_most_8_round_trips() {
    let mut mesh = Harness::new(2);
    for record in 0..RECORDS {
        mesh.put(
            0,
            &format!("stock/item-{record:04}"),
            &[("count", FieldValue::Int(-1))],
        );
    }
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    assert!(mesh.converged());
    mesh.disconnect(0, 1);
    writer_with_history(&mut mesh);

    mesh.connect(0, 1);
    let flights = mesh.run_until_quiet(100);
    let round_trips = flights.div_ceil(2);
    eprintln!("catch-up: {flights} flights, {round_trips} round trips");

    assert!(mesh.converged());
    assert!(
        round_trips <= 8,
        "catching up took {round_trips} round trips ({flights} flights)"
    );
    let history = mesh.nodes[0].node.status();
    assert_eq!(history.counters.syncs_failed, 0);
}

#[test]
fn converged_nodes_confirm_in_one_round_trip() {
    let mut mesh = Harness::new(2);
    for record in 0..200 {
        mesh.put(
            0,
            &format!("stock/{record}"),
            &[("count", FieldValue::Int(1))],
        );
    }
    mesh.connect(0, 1);
    mesh.run_until_quiet(100);
    let delivered = mesh.messages_delivered;
    let id = mesh.id(1);
    mesh.command(0, mesh_core::Command::SyncNow { peer: Some(id) })
        .unwrap();
    let flights = mesh.run_until_quiet(100);
    // Request, response, end.
    assert_eq!(flights, 3);
    assert_eq!(mesh.messages_delivered - delivered, 3);
}

/// More records differ than one reconciliation message may list (65,536 items): the laptop
/// back after a week. Every record differs on both sides, so the deepest level of ranges
/// lists every record at once unless the rounds stay within the limits. Both nodes must
/// converge, with no message refused and no session failed for a message's size.
#[test]
fn a_difference_larger_than_one_message_may_list_converges_within_the_limits() {
    const DIFFERING: usize = 66_000;
    let mut mesh = Harness::new(2);
    for node in 0..2 {
        for record in 0..DIFFERING {
            let key = format!("stock/r{record:05}");
            mesh.put(node, &key, &[("count", FieldValue::Int(node as i64))]);
        }
    }
    mesh.connect(0, 1);
    let mut flights = mesh.run_until_quiet(10_000);
    // A session that needs more rounds than one session may take ends, and the next timer
    // goes on from what was exchanged.
    for _ in 0..20 {
        if mesh.converged() {
            break;
        }
        mesh.advance(std::time::Duration::from_secs(60));
        flights += mesh.run_until_quiet(10_000);
    }
    eprintln!("a difference of {DIFFERING} records: {flights} flights");
    for node in 0..2 {
        let status = mesh.status(node);
        assert_eq!(
            status.counters.messages_rejected, 0,
            "node {node} refused a message"
        );
        assert_eq!(
            status.counters.changes_applied, DIFFERING as u64,
            "node {node} applied every change of the other"
        );
    }
    assert!(mesh.converged());
}

/// Issue 12's target: after one-field edits of every record, changes flow within 4 round
/// trips of the session's start (the session's history row says in which round they first
/// moved).
#[test]
fn after_every_record_changed_the_changes_flow_within_four_rounds() {
    const EDITED: usize = 10_000;
    let mut mesh = Harness::new(2);
    for record in 0..EDITED {
        mesh.put(
            0,
            &format!("stock/r{record:05}"),
            &[("count", FieldValue::Int(0))],
        );
    }
    mesh.connect(0, 1);
    mesh.run_until_quiet(10_000);
    assert!(mesh.converged());
    mesh.disconnect(0, 1);
    for record in 0..EDITED {
        mesh.put(
            0,
            &format!("stock/r{record:05}"),
            &[("count", FieldValue::Int(1))],
        );
    }
    mesh.connect(0, 1);
    mesh.run_until_quiet(10_000);
    assert!(mesh.converged());
    let mesh_core::Reply::History(rows) = mesh.command(1, mesh_core::Command::History).unwrap()
    else {
        panic!("history answers with rows");
    };
    let last = rows.last().expect("the catch-up session");
    assert!(last.changes_received >= EDITED as u64, "{last:?}");
    let first = last.first_changes_round.expect("changes moved");
    assert!(first <= 4, "changes first moved in round {first}: {last:?}");
}
