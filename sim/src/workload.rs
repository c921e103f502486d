//! The simulated applications' writes: which record, which fields. Every draw comes
//! from the run's one rng, in the order the world asks.

use std::collections::BTreeMap;

use crdt_schema::{FieldEdit, FieldValue, RecordId};

use crate::rng::SimRng;

/// The counter field of stock counts (see `World::count_stock`); the other writes never
/// touch it.
pub(crate) const COUNTER: &str = "qty";

/// How many stock items are counted: few, so that nodes cut off from each other count the
/// same ones.
const COUNTED_ITEMS: u64 = 4;

/// A stock record whose counter the workload counts.
pub(crate) fn counted_record(rng: &mut SimRng) -> RecordId {
    let id = rng.range(0, COUNTED_ITEMS);
    RecordId::new("stock", &format!("item{id}")).expect("valid names")
}

/// The collections the workload writes.
pub(crate) const COLLECTIONS: [&str; 3] = ["stock", "visits", "catalogue"];

/// A record of one of [`COLLECTIONS`], among `records_per_collection` ids.
pub(crate) fn random_record(rng: &mut SimRng, records_per_collection: u32) -> RecordId {
    let collection = COLLECTIONS[rng.index(COLLECTIONS.len())];
    let id = rng.range(0, u64::from(records_per_collection));
    RecordId::new(collection, &format!("r{id}")).expect("valid names")
}

/// `count` field writes over five field names, of mixed types.
pub(crate) fn random_fields(rng: &mut SimRng, count: usize) -> BTreeMap<String, FieldEdit> {
    (0..count)
        .map(|_| {
            let name = format!("f{}", rng.range(0, 5));
            let value = match rng.range(0, 3) {
                0 => FieldValue::Int(rng.range(0, 1000) as i64),
                1 => FieldValue::Str(format!("v{}", rng.range(0, 1000))),
                _ => FieldValue::Bool(rng.chance(0.5)),
            };
            (name, FieldEdit::Set(value))
        })
        .collect()
}
