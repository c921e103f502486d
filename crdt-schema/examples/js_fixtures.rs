//! Writes records as mesh stores them, for `tests/js/automerge_compat.mjs` to load with the
//! JavaScript Automerge library: `cargo run -p crdt-schema --example js_fixtures -- DIR`.
//! Each fixture is `NAME.automerge` (the saved document) and `NAME.json` (the record as
//! mesh reads it from that document, in the API's JSON form).

use std::path::Path;

use crdt_schema::{Decimal, Edit, FieldEdit, FieldValue, Identity, RecordDoc, RecordId};

fn put(fields: &[(&str, FieldEdit)]) -> Edit {
    Edit::Put(
        fields
            .iter()
            .map(|(name, edit)| ((*name).to_owned(), edit.clone()))
            .collect(),
    )
}

fn write(dir: &Path, name: &str, record: &RecordId, doc: &RecordDoc) {
    std::fs::write(dir.join(format!("{name}.automerge")), doc.save()).expect("write");
    let json = doc.view(record).to_json();
    std::fs::write(dir.join(format!("{name}.json")), json.to_string()).expect("write");
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: js_fixtures DIR");
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).expect("create the directory");
    let (head_office, clinic) = (Identity::from_seed(1), Identity::from_seed(2));
    let record: RecordId = "stock/paracetamol".parse().expect("valid");

    // Every field type; a counter created at 10, then +5 at head office and -3 at a
    // clinic concurrently.
    let mut ours = RecordDoc::new(&head_office.node_id());
    ours.edit(
        &put(&[
            (
                "name",
                FieldEdit::Set(FieldValue::Str("Paracetamol 500".into())),
            ),
            ("on_hand", FieldEdit::Set(FieldValue::Counter(10))),
            ("pack", FieldEdit::Set(FieldValue::Int(20))),
            ("weight_g", FieldEdit::Set(FieldValue::Float(0.5))),
            (
                "checked",
                FieldEdit::Set(FieldValue::Timestamp(1_790_000_000_000)),
            ),
            (
                "price",
                FieldEdit::Set(FieldValue::Decimal(
                    Decimal::parse("12.50").expect("a decimal"),
                )),
            ),
            (
                "supplier",
                FieldEdit::Set(FieldValue::Ref("suppliers/acme".parse().expect("valid"))),
            ),
            ("notes", FieldEdit::Set(FieldValue::Text("keep dry".into()))),
            (
                "tags",
                FieldEdit::Set(FieldValue::List(vec!["pain".into(), "otc".into()])),
            ),
        ]),
        1,
    )
    .expect("edit");
    let mut theirs = RecordDoc::load(&ours.save(), &clinic.node_id()).expect("load");
    let plus = ours
        .edit(&put(&[("on_hand", FieldEdit::Add(5))]), 2)
        .expect("edit")
        .expect("a change");
    let minus = theirs
        .edit(&put(&[("on_hand", FieldEdit::Add(-3))]), 2)
        .expect("edit")
        .expect("a change");
    ours.apply(vec![minus]).expect("merge");
    theirs.apply(vec![plus]).expect("merge");
    write(dir, "every_type", &record, &ours);
    println!("wrote fixtures to {}", dir.display());
}
