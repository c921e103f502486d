//! Counters: concurrent increments on different nodes add up on every node.

use crdt_schema::{FieldEdit, FieldValue};
use mesh_core::{Command, CommandError};
use mesh_tests::Harness;

const RECORD: &str = "stock/paracetamol";

fn counter(mesh: &mut Harness, node: usize) -> Option<FieldValue> {
    mesh.get(node, RECORD)?.fields.get("on_hand").cloned()
}

#[test]
fn increments_made_on_three_cut_off_nodes_all_count_after_they_reconnect() {
    let mut mesh = Harness::new(3);
    mesh.put(0, RECORD, &[("on_hand", FieldValue::Counter(100))]);
    mesh.connect_all();
    mesh.run_until_quiet(50);
    assert!(mesh.converged());

    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        mesh.disconnect(a, b);
    }
    // Head office receives 40, the clinic dispenses 3 and then 2, the van dispenses 10.
    mesh.add(0, RECORD, "on_hand", 40);
    mesh.add(1, RECORD, "on_hand", -3);
    mesh.add(1, RECORD, "on_hand", -2);
    mesh.add(2, RECORD, "on_hand", -10);
    assert_eq!(counter(&mut mesh, 1), Some(FieldValue::Counter(95)));

    mesh.connect_all();
    mesh.run_until_quiet(50);
    assert!(mesh.converged());
    for node in 0..3 {
        assert_eq!(
            counter(&mut mesh, node),
            Some(FieldValue::Counter(125)),
            "node {node}: 100 + 40 - 3 - 2 - 10"
        );
    }
}

#[test]
fn a_counter_set_outright_or_a_plain_field_incremented_is_refused_and_nothing_written() {
    let mut mesh = Harness::new(1);
    mesh.put(
        0,
        RECORD,
        &[
            ("on_hand", FieldValue::Counter(5)),
            ("name", FieldValue::Str("P".into())),
        ],
    );
    let heads = mesh.get(0, RECORD).unwrap().heads;
    let set = Command::Put {
        record: RECORD.parse().unwrap(),
        fields: [("on_hand".to_owned(), FieldEdit::Set(FieldValue::Int(9)))].into(),
    };
    let Err(CommandError::Invalid(message)) = mesh.command(0, set) else {
        panic!("setting a counter outright must be refused");
    };
    assert!(
        message.contains("on_hand") && message.contains("$inc"),
        "{message}"
    );
    let add_to_text = Command::Put {
        record: RECORD.parse().unwrap(),
        fields: [("name".to_owned(), FieldEdit::Add(1))].into(),
    };
    let Err(CommandError::Invalid(message)) = mesh.command(0, add_to_text) else {
        panic!("adding to a string must be refused");
    };
    assert!(message.contains("not a counter"), "{message}");
    let view = mesh.get(0, RECORD).unwrap();
    assert_eq!(view.heads, heads, "no change was made");
    assert_eq!(view.fields["on_hand"], FieldValue::Counter(5));
}
