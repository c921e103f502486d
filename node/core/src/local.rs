//! This node's own writes: the checks a write must pass before it becomes a change (the
//! node replicates the collection, the policy lets this node write it, the record as of
//! the change follows the policy's and the config's schemas), signing, and undoing local
//! changes whose append failed. Functions over the records; the node routes the results.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{self, Policy};
use crdt_schema::{
    Change, ChangeHash, Edit, Identity, NodeId, RecordDoc, RecordId, VerifiedChange,
};

use crate::admit::author_verdict;
use crate::api::CommandError;
use crate::config::Config;
use crate::records::Records;
use crate::time::Instant;

/// Checks and makes the change `edit` asks of `record`, signed and marked unacknowledged;
/// `None` when the edit changes nothing. Nothing is left behind on refusal.
pub(crate) fn write(
    record: &RecordId,
    edit: &Edit,
    now: Instant,
    config: &Config,
    policy: Option<&Policy>,
    identity: &Identity,
    records: &mut Records,
) -> Result<Option<VerifiedChange>, CommandError> {
    if !config.replicates(record.collection()) {
        let message = format!(
            "this node does not replicate collection `{}`; add it to the node's collections",
            record.collection()
        );
        return Err(CommandError::Invalid(message));
    }
    // A JSON number cannot say "decimal": take the write's numbers as the schemas' types.
    let mut coerced = edit.clone();
    let policy_schema = policy
        .and_then(|policy| policy.collections.get(record.collection()))
        .and_then(|rule| rule.schema.as_ref());
    for schema in policy_schema
        .into_iter()
        .chain(config.schemas.get(record.collection()))
    {
        if let Err(error) = schema.coerce(&mut coerced) {
            let collection = record.collection().to_owned();
            return Err(CommandError::Schema {
                collection,
                errors: vec![error],
            });
        }
    }
    let edit = &coerced;
    let me = identity.node_id();
    let key = record.as_str().to_owned();
    let existed = records.entry(&key).is_some();
    // This node's own quarantined changes of the record (a write a stricter schema
    // rejected) hold sequence numbers of its chain: a new change must build on them, or it
    // would repeat a number and fork the chain on every other node. Built on by a writer,
    // they are accepted with it, so the record as of the new change must pass.
    let own_chain = own_quarantined_chain(records, &me, &key);
    let preview = |records: &mut Records, edit: &Edit| match existed {
        true if own_chain.is_empty() => records.doc(&key).preview(edit),
        true => {
            let mut doc = records.doc(&key).clone();
            let _ = doc.apply(own_chain.clone());
            doc.preview(edit)
        }
        false => RecordDoc::new(&me).preview(edit),
    };
    if let Some(policy) = policy {
        let version = policy.version;
        let forbidden = |reason| CommandError::Forbidden { version, reason };
        author_verdict(Some(policy), &me, record.collection()).map_err(forbidden)?;
        if policy.has_schema(record.collection()) {
            let (fields, deleted) = preview(records, edit);
            crdt_schema::policy::judge_schema(policy, record.collection(), &fields, deleted)
                .map_err(forbidden)?;
        }
    }
    if let Some(schema) = config.schemas.get(record.collection()) {
        let (fields, deleted) = preview(records, edit);
        if let Err(errors) = schema.check(&fields, deleted) {
            let collection = record.collection().to_owned();
            return Err(CommandError::Schema { collection, errors });
        }
    }
    records.create(record);
    if !own_chain.is_empty()
        && let Err(error) = records.doc_mut(&key).apply(own_chain)
    {
        let message = format!("cannot continue this node's changes of {key}: {error}");
        return Err(CommandError::Invalid(message));
    }
    let time_ms = i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
    let change = match records.doc_mut(&key).edit(edit, time_ms) {
        Ok(change) => change,
        Err(error) => {
            if !existed
                && records
                    .entry(&key)
                    .is_some_and(|entry| entry.heads().is_empty())
            {
                // Nothing was written, so the record must not appear.
                records.remove_empty(&key);
            }
            return Err(CommandError::Invalid(error.to_string()));
        }
    };
    Ok(change.map(|change| sign(record.clone(), change, config, identity, records)))
}

/// Signs a change this node made of `record` and marks it unacknowledged until its
/// append completes.
pub(crate) fn sign(
    record: RecordId,
    change: Change,
    config: &Config,
    identity: &Identity,
    records: &mut Records,
) -> VerifiedChange {
    records.note_seq(record.as_str(), identity.node_id(), change.seq());
    let key = record.as_str().to_owned();
    let change = VerifiedChange::sign(identity, &config.org, record, change);
    records.add_unacked(&key, change.hash());
    change
}

/// This node's own quarantined changes of a record with the quarantined changes they
/// build on: what a new local change must build on to continue this node's chain.
pub(crate) fn own_quarantined_chain(records: &Records, me: &NodeId, key: &str) -> Vec<Change> {
    let Some(entry) = records.entry(key) else {
        return Vec::new();
    };
    let mut wanted: Vec<ChangeHash> = entry
        .quarantine()
        .iter()
        .filter(|(_, held)| held.author == *me)
        .map(|(hash, _)| *hash)
        .collect();
    let mut chain = BTreeMap::new();
    while let Some(hash) = wanted.pop() {
        if chain.contains_key(&hash) {
            continue;
        }
        if let Some(held) = entry.quarantine().get(&hash) {
            wanted.extend(held.change.deps().iter().copied());
            chain.insert(hash, held.change.clone());
        }
    }
    chain.into_values().collect()
}

/// Rebuilds a record's document without the given local changes, which never left this
/// node (Automerge cannot remove a change, so the document is rebuilt from the rest).
/// Returns whether the record is still held, and so must be judged again under a policy:
/// the undone write may have carried this node's quarantined changes into the document.
pub(crate) fn undo(
    records: &mut Records,
    me: &NodeId,
    key: &str,
    undone: &BTreeSet<ChangeHash>,
) -> bool {
    let doc = records.doc(key);
    let kept: Vec<_> = doc
        .changes_after(&[])
        .into_iter()
        .filter(|change| !undone.contains(&change.hash()))
        .collect();
    let mut rebuilt = RecordDoc::new(me);
    rebuilt
        .apply(kept)
        .expect("changes taken from a valid document apply to an empty one");
    for hash in undone {
        records.remove_unacked(key, hash);
    }
    let entry = records.entry(key).expect("record exists");
    // A write a newer policy forbade while its append was in flight waits in quarantine;
    // the append failed, so it was never durable and must not be held either.
    let quarantined = entry.quarantine().len();
    let mut quarantine = entry.quarantine().clone();
    quarantine.retain(|hash, _| !undone.contains(hash));
    let quarantine_changed = quarantine.len() != quarantined;
    let nothing_left =
        entry.heads().is_empty() && entry.unacked().is_empty() && quarantine.is_empty();
    records.set_quarantine(key, quarantine);
    if nothing_left {
        records.remove_empty(key);
        return false;
    }
    records.replace_doc(key, rebuilt);
    if quarantine_changed {
        records.refresh_item(key);
    }
    true
}

/// Before a policy applied here takes away someone's right to write a record, this node
/// (if the `new` policy lets it write the record) endorses the record: a change that builds
/// on everything it holds of it. What a valid member built on stays accepted, so the
/// history this node has seen stays, while what the demoted or revoked author writes from
/// now on (or wrote unseen, behind a partition) is rejected, the same on every node.
/// Returns the endorsement of record `key`, if it needs one, for the caller to sign.
pub(crate) fn endorsement(
    records: &mut Records,
    key: &str,
    previous: Option<&Policy>,
    new: &Policy,
    me: NodeId,
    trusted: Option<&BTreeSet<NodeId>>,
    now: Instant,
) -> Option<(RecordId, Change)> {
    let entry = records.entry(key)?;
    if !entry.is_visible() {
        return None;
    }
    let record = entry.record().clone();
    let collection = record.collection();
    if policy::judge_author(new, &me, collection).is_err() {
        return None;
    }
    // Only history by authors who were allowed to write it is kept: under the previous
    // policy, or before the first one this node and its trusted peers. Writes by keys that
    // never had the right (a stranger while the mesh was open) are not laundered into
    // accepted history.
    let was_allowed = |author: &NodeId| match previous {
        Some(previous) => policy::judge_author(previous, author, collection).is_ok(),
        None => *author == me || trusted.is_some_and(|trusted| trusted.contains(author)),
    };
    let loses_a_writer = records
        .doc(key)
        .changes_after(&[])
        .iter()
        .filter_map(|change| NodeId::from_slice(change.actor_id().to_bytes()).ok())
        .any(|author| {
            was_allowed(&author) && policy::judge_author(new, &author, collection).is_err()
        });
    if !loses_a_writer {
        return None;
    }
    let time_ms = i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
    match records.doc_mut(key).endorse(new.version, time_ms) {
        Ok(Some(change)) => Some((record, change)),
        _ => None,
    }
}
