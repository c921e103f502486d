//! A write is durable before it is acknowledged, and acknowledged before it is announced.

use crdt_schema::FieldValue;
use mesh_core::storage::{Restore, StorageRequest};
use mesh_core::{Command, CommandError, Config, Effect, Input, Node, Reply};
use mesh_tests::{Harness, StorageMode, fields};

fn put(record: &str, value: i64) -> Command {
    Command::Put {
        record: record.parse().unwrap(),
        fields: fields(&[("count", FieldValue::Int(value))]),
    }
}

#[test]
fn a_write_is_acknowledged_only_after_its_append_is_durable_and_announced_only_after_that() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    mesh.storage_mode = StorageMode::Manual;
    mesh.nodes[0].effects.clear();

    let id = mesh.command_async(0, put("stock/a", 1));
    let effects = std::mem::take(&mut mesh.nodes[0].effects);
    assert!(
        matches!(&effects[..], [Effect::Storage { request: StorageRequest::Append { envelopes }, .. }] if envelopes.len() == 1),
        "only the append is asked for: {effects:?}"
    );
    assert!(
        mesh.completion(id).is_none(),
        "not acknowledged before durable"
    );
    assert_eq!(mesh.in_flight(), 0, "not announced before durable");

    mesh.complete_storage(0, Ok(()));
    let effects = std::mem::take(&mut mesh.nodes[0].effects);
    let complete = effects
        .iter()
        .position(|e| matches!(e, Effect::Complete { .. }))
        .expect("acknowledged");
    let send = effects
        .iter()
        .position(|e| matches!(e, Effect::Send { .. }))
        .expect("announced");
    assert!(
        complete < send,
        "acknowledged before announced: {effects:?}"
    );
    assert!(matches!(
        mesh.completion(id),
        Some(Ok(Reply::Written { changed: true, .. }))
    ));
}

#[test]
fn writes_that_arrive_during_an_append_share_the_next_one() {
    let mut mesh = Harness::new(1);
    mesh.storage_mode = StorageMode::Manual;
    let first = mesh.command_async(0, put("stock/a", 1));
    let rest: Vec<_> = (0..16)
        .map(|n| mesh.command_async(0, put(&format!("stock/{n}"), n)))
        .collect();
    assert_eq!(
        mesh.nodes[0].pending_storage.len(),
        1,
        "one append in flight"
    );
    mesh.complete_storage(0, Ok(()));
    assert!(mesh.completion(first).is_some());
    let pending = &mesh.nodes[0].pending_storage;
    assert_eq!(pending.len(), 1);
    assert!(
        matches!(&pending[0].1, StorageRequest::Append { envelopes } if envelopes.len() == 16),
        "group commit"
    );
    mesh.complete_storage(0, Ok(()));
    assert!(
        rest.iter()
            .all(|id| matches!(mesh.completion(*id), Some(Ok(_))))
    );
}

#[test]
fn a_failed_append_fails_its_writes_and_leaves_no_trace() {
    let mut mesh = Harness::new(2);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.run_until_quiet(20);
    let digest = mesh.digest(0);
    mesh.storage_mode = StorageMode::Manual;

    let update = mesh.command_async(0, put("stock/a", 2));
    let create = mesh.command_async(0, put("stock/new", 1));
    mesh.complete_storage(0, Err("no space left on device".into()));
    mesh.complete_all_storage();
    for id in [update, create] {
        assert!(
            matches!(mesh.completion(id), Some(Err(CommandError::Storage(message))) if message.contains("no space"))
        );
    }
    assert_eq!(mesh.in_flight(), 0, "nothing announced");
    mesh.storage_mode = StorageMode::Immediate;
    assert_eq!(mesh.digest(0), digest);
    assert_eq!(
        mesh.get(0, "stock/a").unwrap().fields["count"],
        FieldValue::Int(1)
    );
    assert!(
        mesh.get(0, "stock/new").is_none(),
        "a failed create leaves no record"
    );
    assert_eq!(mesh.status(0).counters.storage_errors, 1);

    // Space returns: the node writes again, and the change reaches the peer.
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(3))]);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    assert_eq!(
        mesh.get(1, "stock/a").unwrap().fields["count"],
        FieldValue::Int(3)
    );
}

#[test]
fn a_restarted_node_recovers_every_acknowledged_write_from_checkpoint_and_log() {
    let mut mesh = Harness::new(1);
    for n in 0..20 {
        mesh.put(0, &format!("stock/{n}"), &[("count", FieldValue::Int(n))]);
    }
    // Checkpoint half-way, then write more that only reach the log.
    mesh.advance(std::time::Duration::from_secs(2));
    assert!(!mesh.nodes[0].saved.is_empty(), "a checkpoint was taken");
    for n in 0..20 {
        mesh.put(
            0,
            &format!("stock/{n}"),
            &[("count", FieldValue::Int(n + 100))],
        );
    }
    let digest = mesh.digest(0);

    let restore = Restore {
        records: mesh.nodes[0].saved.values().cloned().collect(),
        index: Vec::new(),
        log: mesh.nodes[0].log.clone(),
        policy: None,
    };
    let mut restarted = Node::new(Config::default(), crdt_schema::Identity::from_seed(1), 0);
    restarted.handle(mesh.now, Input::Restore(restore));
    assert_eq!(restarted.digest(), digest);
    let effects = restarted.handle(
        mesh.now,
        Input::Command {
            id: mesh_core::CommandId(1),
            command: Command::Get {
                record: "stock/7".parse().unwrap(),
            },
        },
    );
    let Some(Effect::Complete {
        result: Ok(Reply::Record(Some(view))),
        ..
    }) = effects.first()
    else {
        panic!("{effects:?}")
    };
    assert_eq!(view.fields["count"], FieldValue::Int(107));
}

#[test]
fn a_damaged_stored_record_is_reported_when_first_loaded_and_not_trusted() {
    let mut mesh = Harness::new(2);
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.put(0, "stock/b", &[("count", FieldValue::Int(2))]);
    mesh.advance(std::time::Duration::from_secs(2));
    let mut saved: Vec<_> = mesh.nodes[0].saved.values().cloned().collect();
    assert_eq!(saved.len(), 2);
    saved[0].document.truncate(10);
    let mut restarted = Node::new(Config::default(), crdt_schema::Identity::from_seed(1), 0);
    restarted.handle(
        mesh.now,
        Input::Restore(Restore {
            records: saved,
            index: Vec::new(),
            log: Vec::new(),
            policy: None,
        }),
    );
    // A start reads the index only: the damage shows when the document is first loaded.
    assert_eq!(restarted.queues().loaded_documents, 0);
    let effects = restarted.handle(
        mesh.now,
        Input::Command {
            id: mesh_core::CommandId(1),
            command: Command::Get {
                record: "stock/a".parse().unwrap(),
            },
        },
    );
    assert!(
        matches!(
            effects.first(),
            Some(Effect::Complete {
                result: Ok(Reply::Record(None)),
                ..
            })
        ),
        "a damaged record reads as absent: {effects:?}"
    );
    assert!(
        effects.iter().any(|effect| matches!(effect, Effect::Emit(mesh_core::Event::StorageFailed { error }) if error.contains("stock/a is damaged"))),
        "{effects:?}"
    );
    assert_eq!(restarted.status().counters.storage_errors, 1);
    assert_eq!(
        restarted.status().records.get("stock"),
        Some(&1),
        "the damaged record is not trusted"
    );
    assert_ne!(
        restarted.digest(),
        mesh.digest(0),
        "the digest no longer claims the damaged record's changes, so peers send them again"
    );
}

#[test]
fn a_restarted_node_answers_status_and_lists_before_it_loads_any_document() {
    let mut mesh = Harness::new(1);
    for record in 0..50 {
        mesh.put(
            0,
            &format!("stock/r{record:02}"),
            &[("count", FieldValue::Int(record))],
        );
    }
    mesh.command(
        0,
        Command::Delete {
            record: "stock/r07".parse().unwrap(),
        },
    )
    .unwrap();
    mesh.advance(std::time::Duration::from_secs(2));
    let mut restore = Restore {
        records: mesh.nodes[0].saved.values().cloned().collect(),
        index: Vec::new(),
        log: mesh.nodes[0].log.clone(),
        policy: None,
    };
    assert_eq!(restore.records.len(), 50, "everything is in the checkpoint");
    // A document no one reads is damaged: a start that loaded documents would find it.
    let unread = restore
        .records
        .iter_mut()
        .find(|saved| saved.record.as_str() == "stock/r40")
        .expect("saved");
    unread.document.truncate(10);
    let mut restarted = Node::new(Config::default(), crdt_schema::Identity::from_seed(1), 0);
    let effects = restarted.handle(mesh.now, Input::Restore(restore));
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Emit(mesh_core::Event::StorageFailed { .. }))),
        "a start reads no document, so it finds no damage: {effects:?}"
    );
    assert_eq!(
        restarted.queues().loaded_documents,
        0,
        "a start loads no document"
    );
    assert_eq!(restarted.digest(), mesh.digest(0));
    let status = restarted.status();
    assert_eq!(
        status.records.get("stock"),
        Some(&49),
        "the deleted record is known as deleted"
    );
    assert_eq!(restarted.queues().loaded_documents, 0);
    let effects = restarted.handle(
        mesh.now,
        Input::Command {
            id: mesh_core::CommandId(1),
            command: Command::Get {
                record: "stock/r33".parse().unwrap(),
            },
        },
    );
    let Some(Effect::Complete {
        result: Ok(Reply::Record(Some(view))),
        ..
    }) = effects.first()
    else {
        panic!("{effects:?}")
    };
    assert_eq!(view.fields["count"], FieldValue::Int(33));
    assert_eq!(
        restarted.queues().loaded_documents,
        1,
        "a read loads only its document"
    );
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Emit(mesh_core::Event::StorageFailed { .. }))),
        "{effects:?}"
    );
}
