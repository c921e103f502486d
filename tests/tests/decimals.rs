//! Exact decimals: a price written as a number lands as the decimal meant on every node,
//! or is refused when a float may have rounded it.

use crdt_schema::{CollectionSchema, Decimal, FieldSchema, FieldType, FieldValue};
use mesh_core::{Command, CommandError, Config};
use mesh_tests::{Harness, fields};

fn catalogue() -> CollectionSchema {
    CollectionSchema {
        fields: [(
            "price".to_owned(),
            FieldSchema {
                field_type: FieldType::Decimal,
                required: true,
            },
        )]
        .into(),
        allow_other_fields: true,
    }
}

fn decimal(text: &str) -> FieldValue {
    FieldValue::Decimal(Decimal::parse(text).unwrap())
}

#[test]
fn a_price_written_as_a_number_is_the_decimal_meant_on_every_node() {
    let mut mesh = Harness::with_config(2, |_| Config {
        schemas: [("catalogue".to_owned(), catalogue())].into(),
        ..Config::default()
    });
    mesh.connect(0, 1);
    mesh.put(
        0,
        "catalogue/aspirin",
        &[("price", FieldValue::Float(12.5))],
    );
    mesh.put(0, "catalogue/gauze", &[("price", FieldValue::Int(3))]);
    mesh.put(
        0,
        "catalogue/tape",
        &[("price", decimal("0.30000000000000004"))],
    );
    mesh.run_until_quiet(50);
    assert!(mesh.converged());
    for node in 0..2 {
        let price = |mesh: &mut Harness, id: &str| {
            mesh.get(node, &format!("catalogue/{id}")).unwrap().fields["price"].clone()
        };
        assert_eq!(price(&mut mesh, "aspirin"), decimal("12.50"), "node {node}");
        assert_eq!(price(&mut mesh, "gauze"), decimal("3"), "node {node}");
        assert_eq!(price(&mut mesh, "tape"), decimal("0.30000000000000004"));
    }
    let rounded = Command::Put {
        record: "catalogue/aspirin".parse().unwrap(),
        fields: fields(&[("price", FieldValue::Float(0.1 + 0.2))]),
    };
    let Err(CommandError::Schema { errors, .. }) = mesh.command(0, rounded) else {
        panic!("a float that may be a rounding must be refused for a decimal field");
    };
    assert!(errors[0].to_string().contains("$decimal"), "{}", errors[0]);
    let text = Command::Put {
        record: "catalogue/aspirin".parse().unwrap(),
        fields: fields(&[("price", FieldValue::Str("12.50".into()))]),
    };
    assert!(
        matches!(mesh.command(0, text), Err(CommandError::Schema { .. })),
        "a string is not a decimal"
    );
    assert_eq!(
        mesh.get(0, "catalogue/aspirin").unwrap().fields["price"],
        decimal("12.5")
    );
}
