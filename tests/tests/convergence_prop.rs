//! Property: whatever the operations, delivery order and duplicates, once every pair is
//! connected and the network is quiet, every node has the same digest and the same records.

use std::time::Duration;

use crdt_schema::FieldValue;
use mesh_core::Command;
use mesh_tests::{Harness, fields};
use proptest::prelude::*;

const NODES: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Put {
        node: usize,
        record: u8,
        field: u8,
        value: i64,
    },
    Delete {
        node: usize,
        record: u8,
    },
    Connect(usize, usize),
    Disconnect(usize, usize),
    Deliver {
        nth: usize,
        duplicate: bool,
    },
    Advance {
        seconds: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    prop_oneof![
        4 => (node.clone(), 0..6u8, 0..3u8, -5..5i64)
            .prop_map(|(node, record, field, value)| Op::Put { node, record, field, value }),
        1 => (node.clone(), 0..6u8).prop_map(|(node, record)| Op::Delete { node, record }),
        2 => (node.clone(), node.clone()).prop_map(|(a, b)| Op::Connect(a, b)),
        1 => (node.clone(), node).prop_map(|(a, b)| Op::Disconnect(a, b)),
        6 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(nth, duplicate)| Op::Deliver { nth, duplicate }),
        1 => (1..40u64).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

fn record(index: u8) -> crdt_schema::RecordId {
    let collection = if index.is_multiple_of(2) {
        "stock"
    } else {
        "visits"
    };
    format!("{collection}/r{index}").parse().unwrap()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut mesh = Harness::new(NODES);
    for op in ops {
        match *op {
            Op::Put {
                node,
                record: index,
                field,
                value,
            } => {
                let command = Command::Put {
                    record: record(index),
                    fields: fields(&[(&format!("f{field}"), FieldValue::Int(value))]),
                };
                mesh.command(node, command)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Delete {
                node,
                record: index,
            } => {
                // Deleting a record the node never saw is refused; that is fine here.
                let _ = mesh.command(
                    node,
                    Command::Delete {
                        record: record(index),
                    },
                );
            }
            Op::Connect(a, b) if a != b => mesh.connect(a, b),
            Op::Disconnect(a, b) if a != b => mesh.disconnect(a, b),
            Op::Connect(..) | Op::Disconnect(..) => {}
            Op::Deliver { nth, duplicate } => {
                mesh.deliver_nth(nth, duplicate);
            }
            Op::Advance { seconds } => mesh.advance(Duration::from_secs(seconds)),
        }
    }
    // Heal: fresh connections between every pair, ordered delivery, timers run.
    mesh.disconnect_all();
    mesh.connect_all();
    mesh.run_until_quiet(1000);
    mesh.advance(Duration::from_secs(70));
    prop_assert!(
        mesh.converged(),
        "digests differ: {:?}",
        (0..NODES).map(|n| mesh.digest(n)).collect::<Vec<_>>()
    );
    for index in 0..6 {
        let key = record(index).to_string();
        let views: Vec<_> = (0..NODES)
            .map(|node| mesh.get(node, &key).map(|view| (view.fields, view.deleted)))
            .collect();
        prop_assert!(
            views.iter().all(|view| view == &views[0]),
            "{key}: {views:?}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_operations_in_any_delivery_order_converge(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}
