//! Change bytes from outside, through the door: nothing panics, and a change the door lets
//! into a document leaves it savable, loadable and serving the change as it came.

#![no_main]

use crdt_schema::change::read_change;
use crdt_schema::{Envelope, RecordDoc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let _ = Envelope::from_bytes(data.to_vec()).verify(&mesh_fuzz::org());
    let Ok(change) = read_change(data) else {
        return;
    };
    let (base, _) = mesh_fuzz::base();
    for start in [base.clone(), RecordDoc::new(&mesh_fuzz::first().node_id())] {
        let mut doc = start;
        if doc.apply(vec![change.clone()]).is_err() || !doc.has_change(&change.hash()) {
            continue;
        }
        let saved = doc.save();
        let loaded = RecordDoc::load(&saved, &mesh_fuzz::first().node_id())
            .expect("a document the door let a change into loads again");
        assert_eq!(loaded.heads(), doc.heads(), "heads survive save and load");
        let served = loaded
            .change(&change.hash())
            .expect("the loaded document holds the change");
        assert_eq!(served.raw_bytes(), data, "the change is served as it came");
        let all: Vec<_> = loaded.changes_after(&[]).iter().map(|c| c.hash()).collect();
        assert!(all.contains(&change.hash()));
    }
});
