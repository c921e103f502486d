//! Field-level merge and convergence of concurrent edits.

use crdt_schema::FieldValue;
use mesh_tests::Harness;

#[test]
fn edits_of_different_fields_made_offline_both_survive() {
    let mut mesh = Harness::new(2);
    mesh.put(
        0,
        "customers/acme",
        &[
            ("phone", FieldValue::Str("555-0100".into())),
            ("city", FieldValue::Str("Basel".into())),
        ],
    );
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());

    // Both laptops go offline and edit different fields of the same record.
    mesh.disconnect(0, 1);
    mesh.put(
        0,
        "customers/acme",
        &[("phone", FieldValue::Str("555-0199".into()))],
    );
    mesh.put(
        1,
        "customers/acme",
        &[("city", FieldValue::Str("Zurich".into()))],
    );
    assert!(!mesh.converged());

    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    for node in 0..2 {
        let record = mesh.get(node, "customers/acme").expect("record exists");
        assert_eq!(
            record.fields["phone"],
            FieldValue::Str("555-0199".into()),
            "node {node}"
        );
        assert_eq!(
            record.fields["city"],
            FieldValue::Str("Zurich".into()),
            "node {node}"
        );
    }
}

#[test]
fn only_the_changed_field_travels() {
    let mut mesh = Harness::new(2);
    let long = "x".repeat(4000);
    mesh.put(
        0,
        "customers/acme",
        &[
            ("notes", FieldValue::Str(long)),
            ("phone", FieldValue::Int(1)),
        ],
    );
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    let before = mesh.bytes_delivered;
    mesh.put(0, "customers/acme", &[("phone", FieldValue::Int(2))]);
    mesh.run_until_quiet(20);
    let edit_bytes = mesh.bytes_delivered - before;
    eprintln!("one-field edit: {edit_bytes} bytes on the wire");
    assert!(mesh.converged());
    assert!(
        edit_bytes < 400,
        "a one-field edit sent {edit_bytes} bytes; the record holds 4 KB"
    );
}

#[test]
fn concurrent_edits_of_one_field_converge_to_one_value_everywhere() {
    let mut mesh = Harness::new(3);
    for node in 0..3 {
        mesh.put(
            node,
            "stock/aspirin",
            &[("count", FieldValue::Int(node as i64 * 10))],
        );
    }
    mesh.connect_all();
    mesh.run_until_quiet(40);
    assert!(mesh.converged());
    let values: Vec<FieldValue> = (0..3)
        .map(|node| mesh.get(node, "stock/aspirin").unwrap().fields["count"].clone())
        .collect();
    assert!(values.iter().all(|value| value == &values[0]), "{values:?}");
}

#[test]
fn a_delete_merges_like_an_edit() {
    let mut mesh = Harness::new(2);
    mesh.put(0, "stock/a", &[("count", FieldValue::Int(1))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    mesh.command(
        1,
        mesh_core::Command::Delete {
            record: "stock/a".parse().unwrap(),
        },
    )
    .unwrap();
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    assert!(mesh.get(0, "stock/a").unwrap().deleted);
    assert_eq!(
        mesh.status(0).records.get("stock"),
        None,
        "deleted records are not counted as live"
    );
}
