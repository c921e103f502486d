//! The document cache is bounded in bytes, and a document it drops is read back from the
//! node's document store (as sled in the daemon), not kept in memory as bytes (issue 12,
//! item 3). A document the store damaged is found when read, reported, and brought again
//! by a peer.

use std::time::Duration;

use crdt_schema::FieldValue;
use mesh_core::limits::LOADED_DOCUMENT_BASE_BYTES;
use mesh_core::{Config, Effect, Event};
use mesh_tests::Harness;

const RECORDS: i64 = 200;

/// Room for about four small documents.
fn small_cache() -> Config {
    Config {
        document_cache_bytes: 4 * LOADED_DOCUMENT_BASE_BYTES + 2048,
        ..Config::default()
    }
}

fn key(record: i64) -> String {
    format!("stock/r{record:03}")
}

fn count_of(mesh: &mut Harness, node: usize, record: i64) -> Option<FieldValue> {
    mesh.get(node, &key(record))
        .and_then(|view| view.fields.get("count").cloned())
}

#[test]
fn a_node_keeps_only_its_cache_loaded_and_reads_the_rest_back_from_its_store() {
    let mut mesh = Harness::with_config(1, |_| small_cache());
    for record in 0..RECORDS {
        mesh.put(
            0,
            &key(record),
            &[
                ("count", FieldValue::Int(record)),
                ("name", FieldValue::Text(format!("item {record}"))),
            ],
        );
    }
    let queues = mesh.nodes[0].node.queues();
    assert!(queues.loaded_documents <= 5, "{queues:?}");
    assert!(
        queues.held_documents.0 > 100,
        "before the checkpoint, dropped documents are kept as bytes: {queues:?}"
    );
    mesh.advance(Duration::from_secs(2));
    let queues = mesh.nodes[0].node.queues();
    assert_eq!(
        queues.held_documents,
        (0, 0),
        "once saved, a dropped document is only in the store"
    );

    for record in 0..RECORDS {
        assert_eq!(
            count_of(&mut mesh, 0, record),
            Some(FieldValue::Int(record))
        );
    }
    let queues = mesh.nodes[0].node.queues();
    assert!(
        queues.store_reads >= RECORDS as u64 - 5,
        "documents are read back from the store: {queues:?}"
    );
    assert_eq!(
        queues.held_documents,
        (0, 0),
        "reading keeps nothing: {queues:?}"
    );
    assert!(queues.loaded_document_bytes <= small_cache().document_cache_bytes);

    // Documents read back from the store take new changes, which are saved again.
    for record in 0..RECORDS {
        mesh.put(
            0,
            &key(record),
            &[("count", FieldValue::Int(record + 1000))],
        );
    }
    mesh.advance(Duration::from_secs(2));
    assert_eq!(mesh.nodes[0].node.queues().held_documents, (0, 0));
    for record in 0..RECORDS {
        assert_eq!(
            count_of(&mut mesh, 0, record),
            Some(FieldValue::Int(record + 1000))
        );
    }

    // A restart reads the index only, and every document from the store when used.
    let digest = mesh.digest(0);
    let effects = mesh.restart(0, small_cache(), 9);
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Emit(Event::StorageFailed { .. }))),
        "{effects:?}"
    );
    assert_eq!(mesh.nodes[0].node.queues().loaded_documents, 0);
    assert_eq!(mesh.nodes[0].node.queues().store_reads, 0);
    assert_eq!(mesh.digest(0), digest);
    assert_eq!(mesh.status(0).records["stock"], RECORDS as u64);
    for record in 0..RECORDS {
        assert_eq!(
            count_of(&mut mesh, 0, record),
            Some(FieldValue::Int(record + 1000))
        );
        assert_eq!(
            mesh.get(0, &key(record)).unwrap().fields["name"],
            FieldValue::Text(format!("item {record}"))
        );
    }
    assert!(mesh.nodes[0].node.queues().store_reads >= RECORDS as u64);
}

#[test]
fn a_document_the_store_damaged_is_reported_when_read_and_brought_again_by_a_peer() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    for record in 0..20 {
        mesh.put(0, &key(record), &[("count", FieldValue::Int(record))]);
    }
    mesh.run_until_quiet(1_000);
    mesh.advance(Duration::from_secs(5));
    assert!(mesh.converged());
    assert!(mesh.nodes[1].saved.len() == 20, "node 1 saved everything");

    mesh.disconnect(0, 1);
    let damaged: crdt_schema::RecordId = key(5).parse().unwrap();
    mesh.nodes[1]
        .documents
        .set(&damaged, vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]);
    let effects = mesh.restart(1, Config::default(), 3);
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Emit(Event::StorageFailed { .. }))),
        "the start reads no document, so it finds no damage yet"
    );
    assert_eq!(
        mesh.digest(1),
        mesh.digest(0),
        "the index claims everything"
    );

    assert_eq!(
        count_of(&mut mesh, 1, 5),
        None,
        "a damaged document is not trusted"
    );
    assert!(
        mesh.nodes[1].events.iter().any(|event| matches!(
            event,
            Event::StorageFailed { error } if error.contains("stock/r005")
        )),
        "the damage is reported: {:?}",
        mesh.nodes[1].events
    );
    assert_ne!(
        mesh.digest(1),
        mesh.digest(0),
        "the record's changes are no longer claimed"
    );
    assert_eq!(count_of(&mut mesh, 1, 6), Some(FieldValue::Int(6)));

    mesh.connect(0, 1);
    mesh.run_until_quiet(1_000);
    mesh.advance(Duration::from_secs(40));
    assert!(mesh.converged(), "the peer sends the record again");
    assert_eq!(count_of(&mut mesh, 1, 5), Some(FieldValue::Int(5)));
}
