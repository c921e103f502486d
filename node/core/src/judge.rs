//! The verdicts that need no node: pure functions of the changes a node holds of one record
//! (and, for schemas, of the policy). `policy.rs` calls them while judging a record whole;
//! every honest node computes the same result from the same held set, whatever the order
//! things arrived in.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{self, Policy, RejectReason};
use crdt_schema::{Change, ChangeHash, NodeId, RecordDoc};

/// For Kahn's order over the held changes: how many held dependencies each change waits
/// for, and which held changes depend on each.
#[allow(clippy::type_complexity)]
fn dependency_graph(
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
) -> (
    BTreeMap<ChangeHash, usize>,
    BTreeMap<ChangeHash, Vec<ChangeHash>>,
) {
    let mut waiting: BTreeMap<ChangeHash, usize> = BTreeMap::new();
    let mut dependants: BTreeMap<ChangeHash, Vec<ChangeHash>> = BTreeMap::new();
    for (hash, (change, _)) in held {
        let deps: Vec<ChangeHash> = change
            .deps()
            .iter()
            .filter(|dep| held.contains_key(*dep))
            .copied()
            .collect();
        waiting.insert(*hash, deps.len());
        for dep in deps {
            dependants.entry(dep).or_default().push(*hash);
        }
    }
    (waiting, dependants)
}

/// The sound held changes (not in `broken`) that Automerge cannot take, applied one at a
/// time in dependency order (ties by hash, so every node replays alike), and everything
/// built on them.
pub(crate) fn damaging_changes(
    me: &NodeId,
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
    broken: &BTreeMap<ChangeHash, RejectReason>,
) -> BTreeMap<ChangeHash, RejectReason> {
    let mut damaging: BTreeMap<ChangeHash, RejectReason> = BTreeMap::new();
    let (mut waiting, dependants) = dependency_graph(held);
    let mut ready: BTreeSet<ChangeHash> = waiting
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(hash, _)| *hash)
        .collect();
    let mut scratch = RecordDoc::new(me);
    while let Some(hash) = ready.pop_first() {
        let (change, author) = &held[&hash];
        let dep_bad = change
            .deps()
            .iter()
            .any(|dep| damaging.contains_key(dep) || broken.contains_key(dep));
        if !broken.contains_key(&hash) {
            let problem = if dep_bad {
                Some("it builds on a change that cannot be applied".to_owned())
            } else {
                scratch
                    .apply(vec![change.clone()])
                    .err()
                    .map(|error| error.to_string())
            };
            if let Some(problem) = problem {
                damaging.insert(
                    hash,
                    RejectReason::Damaging {
                        author: *author,
                        problem,
                    },
                );
            }
        }
        for next in dependants.get(&hash).into_iter().flatten() {
            let count = waiting.get_mut(next).expect("counted above");
            *count -= 1;
            if *count == 0 {
                ready.insert(*next);
            }
        }
    }
    damaging
}

/// The held changes that do not continue their author's chain, with why: a sequence number
/// that is not one more than the author's latest in the change's own history, a number two
/// held changes of one author share (a fork), or a dependency that is itself broken. A pure
/// function of the held set.
pub(crate) fn broken_history(
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
) -> BTreeMap<ChangeHash, RejectReason> {
    let reason = |change: &Change, author: &NodeId| RejectReason::BrokenHistory {
        author: *author,
        seq: change.seq(),
    };
    let mut broken: BTreeMap<ChangeHash, RejectReason> = BTreeMap::new();
    let mut by_position: BTreeMap<(NodeId, u64), Vec<ChangeHash>> = BTreeMap::new();
    for (hash, (change, author)) in held {
        by_position
            .entry((*author, change.seq()))
            .or_default()
            .push(*hash);
    }
    for hashes in by_position.values().filter(|hashes| hashes.len() > 1) {
        for hash in hashes {
            let (change, author) = &held[hash];
            broken.insert(*hash, reason(change, author));
        }
    }
    // Dependencies first (Kahn's order); each change learns its authors' latest numbers in
    // its own history.
    let (mut waiting, dependants) = dependency_graph(held);
    let mut ready: Vec<ChangeHash> = waiting
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(hash, _)| *hash)
        .collect();
    let mut latest: BTreeMap<ChangeHash, BTreeMap<NodeId, u64>> = BTreeMap::new();
    while let Some(hash) = ready.pop() {
        let (change, author) = &held[&hash];
        let mut history: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut dep_broken = false;
        for dep in change.deps().iter().filter(|dep| held.contains_key(*dep)) {
            dep_broken |= broken.contains_key(dep);
            for (who, seq) in latest.get(dep).into_iter().flatten() {
                let entry = history.entry(*who).or_default();
                *entry = (*entry).max(*seq);
            }
        }
        let before = history.get(author).copied().unwrap_or(0);
        if dep_broken || change.seq() != before + 1 {
            broken.insert(hash, reason(change, author));
        }
        let own = history.entry(*author).or_default();
        *own = (*own).max(change.seq());
        latest.insert(hash, history);
        for next in dependants.get(&hash).into_iter().flatten() {
            let count = waiting.get_mut(next).expect("counted above");
            *count -= 1;
            if *count == 0 {
                ready.push(*next);
            }
        }
    }
    broken
}

/// Whether the record as of `hash` (the change and its history) follows the collection's
/// schema: a verdict that does not depend on what arrived later.
pub(crate) fn schema_verdict(
    policy: &Policy,
    collection: &str,
    doc: &RecordDoc,
    hash: &ChangeHash,
) -> Result<(), RejectReason> {
    match doc.state_at(&[*hash]) {
        Ok((fields, deleted)) => policy::judge_schema(policy, collection, &fields, deleted),
        Err(error) => Err(RejectReason::Schema {
            collection: collection.to_owned(),
            errors: vec![error.to_string()],
        }),
    }
}
