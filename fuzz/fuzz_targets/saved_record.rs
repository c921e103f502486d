//! Stored bytes at restore: a saved record (as sled holds it) and a change-log entry, fed
//! to a starting node. Nothing may panic; damage is reported, never trusted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::{Input, Node, Restore, SavedRecord};

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let records = SavedRecord::decode(data).into_iter().collect();
    for restore in [
        Restore {
            records,
            log: Vec::new(),
            policy: None,
        },
        Restore {
            records: Vec::new(),
            log: vec![data.to_vec()],
            policy: Some(data.to_vec()),
        },
    ] {
        let mut node = Node::new(
            mesh_core::Config::default(),
            crdt_schema::Identity::from_seed(104),
            1,
        );
        let now = mesh_core::Instant::from_millis(1_790_000_000_000);
        let _ = node.handle(now, Input::Restore(restore));
        let _ = node.status();
        let _ = node.handle(now, Input::Tick);
    }
});
