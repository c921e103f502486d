//! Stored bytes at restore: a saved record (as the old layout held it), an index entry
//! with these bytes as its document in the document store, and a change-log entry, fed to
//! a starting node that then reads the record. Nothing may panic; damage is reported, never
//! trusted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::storage::{DocumentStore, SavedIndex};
use mesh_core::{Command, CommandId, Input, Node, Restore, SavedRecord, StorageError};

/// A document store that answers every record with the same bytes.
struct Answers(Vec<u8>);

impl DocumentStore for Answers {
    fn document(&self, _: &crdt_schema::RecordId) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(Some(self.0.clone()))
    }
}

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let records: Vec<SavedRecord> = SavedRecord::decode(data).into_iter().collect();
    let index: Vec<SavedIndex> = SavedIndex::decode(data).into_iter().collect();
    let named: Vec<_> = records
        .iter()
        .map(|saved| saved.record.clone())
        .chain(index.iter().map(|saved| saved.record.clone()))
        .collect();
    for restore in [
        Restore {
            records,
            ..Restore::default()
        },
        Restore {
            index,
            ..Restore::default()
        },
        Restore {
            log: vec![data.to_vec()],
            policy: Some(data.to_vec()),
            ..Restore::default()
        },
    ] {
        let mut node = Node::new(
            mesh_core::Config::default(),
            crdt_schema::Identity::from_seed(104),
            1,
        );
        node.use_document_store(Box::new(Answers(data.to_vec())));
        let now = mesh_core::Instant::from_millis(1_790_000_000_000);
        let _ = node.handle(now, Input::Restore(restore));
        let _ = node.status();
        for (id, record) in named.iter().enumerate() {
            let command = Command::Get {
                record: record.clone(),
            };
            let id = CommandId(id as u64);
            let _ = node.handle(now, Input::Command { id, command });
        }
        let _ = node.handle(now, Input::Tick);
    }
});
