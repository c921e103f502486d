//! Reads that load documents: a record's view (`mesh get`), a collection's records
//! (`mesh list`), a record's document (`mesh export`), and the accepted changes of a
//! record for checkers. Functions over the records; deleted and quarantine-only records
//! are not shown.

use crdt_schema::{ChangeHash, NodeId, RecordId, RecordView};

use crate::limits::LIST_PAGE_MAX;
use crate::records::{Entry, Records};

/// Whether a record is visible with its document loaded: loading a stored document may
/// find it damaged, and its record then holds nothing until peers send it again.
fn visible_loaded(records: &mut Records, key: &str) -> bool {
    if !records.entry(key).is_some_and(Entry::is_visible) {
        return false;
    }
    records.doc(key);
    records.entry(key).is_some_and(Entry::is_visible)
}

/// A visible record's view, if it is held.
pub(crate) fn record(records: &mut Records, record: &RecordId) -> Option<RecordView> {
    visible_loaded(records, record.as_str()).then(|| records.doc(record.as_str()).view(record))
}

/// A page of the views of a collection's visible, not deleted records, in id order: at
/// most `limit` (0 or more than [`LIST_PAGE_MAX`]: that many) after the record id `after`.
/// Returns the page and the id to continue after, if more records follow.
pub(crate) fn list(
    records: &mut Records,
    collection: &str,
    after: Option<&str>,
    limit: usize,
) -> (Vec<RecordView>, Option<String>) {
    let limit = match limit {
        0 => LIST_PAGE_MAX,
        limit => limit.min(LIST_PAGE_MAX),
    };
    let lower = match after {
        Some(id) => format!("{collection}/{id}"),
        None => format!("{collection}/"),
    };
    let mut keys: Vec<RecordId> = records
        .range(&lower, Some(&format!("{collection}0")), &None)
        .filter(|entry| after.is_none() || entry.record().as_str() != lower)
        .filter(|entry| !entry.is_deleted() && entry.is_visible())
        .map(|entry| entry.record().clone())
        .take(limit + 1)
        .collect();
    let next = (keys.len() > limit).then(|| {
        keys.truncate(limit);
        keys.last().expect("a full page").id().to_owned()
    });
    let mut views = Vec::with_capacity(keys.len());
    for record in &keys {
        if visible_loaded(records, record.as_str()) {
            views.push(records.doc(record.as_str()).view(record));
        }
    }
    (views, next)
}

/// A visible record's saved document, if it is held.
pub(crate) fn export(records: &mut Records, record: &RecordId) -> Option<Vec<u8>> {
    visible_loaded(records, record.as_str()).then(|| records.doc(record.as_str()).save())
}

/// The changes of a record's accepted document: (hash, author, dependencies).
pub(crate) fn accepted_changes(
    records: &mut Records,
    record: &RecordId,
) -> Vec<(ChangeHash, NodeId, Vec<ChangeHash>)> {
    if records.entry(record.as_str()).is_none() {
        return Vec::new();
    }
    records
        .doc(record.as_str())
        .changes_after(&[])
        .iter()
        .filter_map(|change| {
            let author = NodeId::from_slice(change.actor_id().to_bytes()).ok()?;
            Some((change.hash(), author, change.deps().to_vec()))
        })
        .collect()
}
