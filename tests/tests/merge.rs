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

#[test]
fn concurrent_writes_of_one_field_show_the_same_conflict_on_every_node_until_written_again() {
    let mut mesh = mesh_tests::Harness::with_config(2, |index| mesh_core::Config {
        name: ["head-office", "clinic"][index].to_owned(),
        ..mesh_core::Config::default()
    });
    mesh.put(0, "stock/s1", &[("count", FieldValue::Int(50))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    mesh.disconnect(0, 1);
    mesh.put(0, "stock/s1", &[("count", FieldValue::Int(90))]);
    mesh.put(1, "stock/s1", &[("count", FieldValue::Int(70))]);
    mesh.connect(0, 1);
    mesh.run_until_quiet(20);
    assert!(mesh.converged());
    let views: Vec<_> = (0..2)
        .map(|node| mesh.get(node, "stock/s1").unwrap())
        .collect();
    let shown = views[0].fields["count"].clone();
    assert_eq!(
        views[1].fields["count"], shown,
        "the same winner everywhere"
    );
    let others: Vec<_> = views[0].conflicts["count"]
        .iter()
        .map(|other| (other.value.clone(), other.author))
        .collect();
    let (node0, node1) = (mesh.id(0), mesh.id(1));
    let (expected, name) = if shown == FieldValue::Int(90) {
        ((Some(FieldValue::Int(70)), node1), "clinic")
    } else {
        assert_eq!(shown, FieldValue::Int(70));
        ((Some(FieldValue::Int(90)), node0), "head-office")
    };
    assert_eq!(
        others,
        vec![expected.clone()],
        "the other value and its author"
    );
    for view in &views {
        let authors: Vec<_> = view.conflicts["count"].iter().map(|o| o.author).collect();
        assert_eq!(authors, vec![expected.1]);
    }
    for view in &views {
        let named = view.conflicts["count"][0].author_name.as_deref();
        assert_eq!(named, Some(name), "named for the reader, itself or a peer");
    }
    mesh.put(1, "stock/s1", &[("count", FieldValue::Int(75))]);
    mesh.run_until_quiet(20);
    for node in 0..2 {
        let view = mesh.get(node, "stock/s1").unwrap();
        assert!(
            view.conflicts.is_empty(),
            "node {node}: one later write resolves it"
        );
        assert_eq!(view.fields["count"], FieldValue::Int(75));
    }
}
