//! Range reconciliation, one round at a time: given a peer's round (fingerprints of key
//! ranges, item lists, needs), what to answer. Pure over the records: the sessions
//! (sync.rs) decide when rounds go and what they cost.
//!
//! **Every answer fits in one message, whatever the size of the difference.** An answer
//! holds at most the node's [`RoundBudget`] of ranges, items, needs and change bytes,
//! which is never more than a peer accepts on decoding (the wire's limits). Ranges are
//! answered in key order; a range that differs is split or listed only while one more range
//! still fits after it. Once one does not, it and every range after it go back as a single
//! range with this node's fingerprint of their whole span, and the peer splits that span in
//! the next round. So each round settles the lowest ranges, no answer grows past the
//! budget, and a difference of any size streams through rounds. Needs past their bound and
//! changes past the round's bytes are left for a later pass: the answer says it was
//! truncated, so the initiator compares the roots again before it ends.

use std::collections::BTreeMap;

use crdt_schema::{ChangeHash, RecordId};

use crate::admit;
use crate::digest::Accumulator;
use crate::history;
use crate::limits::*;
use crate::pipeline::Pipeline;
use crate::records::{Records, Scope, in_scope};
use crate::wire::{EnvelopeBytes, Hash, Item, Need, Range, RangeSummary, Round, Snapshot};

/// What answering one round produced.
pub(crate) struct RoundOutput {
    budget: RoundBudget,
    pub(crate) ranges: Vec<Range>,
    pub(crate) needs: Vec<Need>,
    pub(crate) changes: Vec<Vec<u8>>,
    /// Records sent whole to a peer that has none of them (session rounds only).
    pub(crate) snapshots: Vec<Snapshot>,
    /// Change and snapshot bytes in this answer, toward the round's budget.
    pub(crate) changes_bytes: usize,
    /// Whether records the peer lacks may go as snapshots.
    snapshots_allowed: bool,
    /// Items listed over all of `ranges`.
    pub(crate) items: usize,
    /// Whether something was left out (changes past the round's bytes, needs past their
    /// bound): another pass must follow.
    pub(crate) truncated: bool,
}

impl RoundOutput {
    /// An empty answer within `budget` (see [`RoundBudget::effective`]).
    pub(crate) fn new(budget: RoundBudget) -> RoundOutput {
        RoundOutput {
            budget: budget.effective(),
            ranges: Vec::new(),
            needs: Vec::new(),
            changes: Vec::new(),
            snapshots: Vec::new(),
            changes_bytes: 0,
            snapshots_allowed: false,
            items: 0,
            truncated: false,
        }
    }

    /// An empty answer within `budget` that sends records the peer lacks as snapshots,
    /// for a session: its snapshot batches go before its round message.
    pub(crate) fn for_session(budget: RoundBudget) -> RoundOutput {
        RoundOutput {
            snapshots_allowed: true,
            ..RoundOutput::new(budget)
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
            && self.needs.is_empty()
            && self.changes.is_empty()
            && self.snapshots.is_empty()
    }

    /// Whether nothing of the round's change bytes is spent yet: the first change or
    /// snapshot of a round always goes, so that one larger than a small budget still moves.
    fn nothing_sent(&self) -> bool {
        self.changes.is_empty() && self.snapshots.is_empty()
    }

    /// Adds record `key` whole for a peer that has none of it: a snapshot when allowed and
    /// at hand, its envelopes otherwise; unless the round's budget is spent.
    pub(crate) fn add_whole(&mut self, records: &mut Records, key: &str) {
        if self.snapshots_allowed
            && let Some(snapshot) = history::snapshot(records, key)
        {
            let bytes = snapshot.wire_bytes();
            if !self.nothing_sent() && self.changes_bytes + bytes > self.budget.change_bytes {
                self.truncated = true;
                return;
            }
            self.changes_bytes += bytes;
            self.snapshots.push(snapshot);
            return;
        }
        self.add_changes(history::envelopes_after(records, key, &[]));
    }

    /// Adds envelopes unless the round's budget is spent.
    pub(crate) fn add_changes(&mut self, envelopes: Vec<Vec<u8>>) {
        for envelope in envelopes {
            if !self.nothing_sent()
                && self.changes_bytes + envelope.len() > self.budget.change_bytes
            {
                self.truncated = true;
                return;
            }
            self.changes_bytes += envelope.len();
            self.changes.push(envelope);
        }
    }

    /// Whether `ranges` more ranges listing `items` items fit with one range to spare (for
    /// the span of the ranges not answered, should the next not fit).
    fn has_room(&self, ranges: usize, items: usize) -> bool {
        self.ranges.len() + ranges < self.budget.ranges && self.items + items <= self.budget.items
    }

    /// Whether another need fits; if not, the answer is truncated.
    fn has_room_for_need(&mut self) -> bool {
        if self.needs.len() < self.budget.needs {
            return true;
        }
        self.truncated = true;
        false
    }
}

pub(crate) fn hashes(heads: &[ChangeHash]) -> Vec<Hash> {
    heads.iter().map(|hash| hash.0).collect()
}

pub(crate) fn change_hashes(heads: &[Hash]) -> Vec<ChangeHash> {
    heads.iter().map(|hash| ChangeHash(*hash)).collect()
}

/// Splits snapshots into message-sized batches (each snapshot is at most
/// [`SYNC_BATCH_BYTES_MAX`], see `history::snapshot`).
pub(crate) fn snapshot_batches(snapshots: Vec<Snapshot>) -> Vec<Vec<Snapshot>> {
    let mut batches = Vec::new();
    let mut batch: Vec<Snapshot> = Vec::new();
    let (mut bytes, mut signatures) = (0, 0);
    for snapshot in snapshots {
        if !batch.is_empty()
            && (bytes + snapshot.wire_bytes() > SYNC_BATCH_BYTES_MAX
                || signatures + snapshot.signatures.len() > CHANGES_PER_MESSAGE_MAX
                || batch.len() == SNAPSHOTS_PER_MESSAGE_MAX)
        {
            batches.push(std::mem::take(&mut batch));
            (bytes, signatures) = (0, 0);
        }
        bytes += snapshot.wire_bytes();
        signatures += snapshot.signatures.len();
        batch.push(snapshot);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Splits envelopes into message-sized batches.
pub(crate) fn batches(changes: Vec<Vec<u8>>) -> Vec<Vec<EnvelopeBytes>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for change in changes {
        if !batch.is_empty()
            && (bytes + change.len() > SYNC_BATCH_BYTES_MAX
                || batch.len() == CHANGES_PER_MESSAGE_MAX)
        {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += change.len();
        batch.push(EnvelopeBytes(change));
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

pub(crate) fn root_range(records: &Records, scope: &Scope) -> Range {
    let accumulator = records.accumulate("", None, scope);
    Range {
        lower: String::new(),
        upper: None,
        summary: RangeSummary::Fingerprint {
            fingerprint: accumulator.fingerprint(),
            count: accumulator.count(),
        },
    }
}

/// What answering reads and changes: the records (documents load on demand) and the
/// pipeline, whose changes count as held.
pub(crate) struct Reconcile<'a> {
    pub(crate) records: &'a mut Records,
    pub(crate) pipeline: &'a Pipeline,
    /// What one answer may hold.
    pub(crate) budget: RoundBudget,
}

impl Reconcile<'_> {
    /// Answers every range and need of a round. An error is a protocol violation.
    pub(crate) fn answer_round(
        &mut self,
        scope: &Scope,
        round: &Round,
    ) -> Result<RoundOutput, String> {
        let mut output = RoundOutput::for_session(self.budget);
        let mut previous_upper: Option<&str> = Some("");
        for range in &round.ranges {
            // Ranges must be increasing and not overlap, or a peer could make us list the
            // same records again and again.
            match previous_upper {
                Some(upper) if range.lower.as_str() >= upper => {}
                _ => return Err("reconciliation ranges overlap or are out of order".into()),
            }
            if let Some(upper) = &range.upper
                && upper <= &range.lower
            {
                return Err("reconciliation range is empty or reversed".into());
            }
            previous_upper = range.upper.as_deref();
            let answered = match &range.summary {
                RangeSummary::Fingerprint { fingerprint, count } => {
                    self.answer_fingerprint(scope, range, (fingerprint, *count), &mut output)
                }
                RangeSummary::Items(items) => {
                    self.answer_items(scope, range, items, &mut output)?;
                    true
                }
            };
            if !answered {
                // No room for this range's answer: it and the rest go back as one span.
                let last = round.ranges.last().expect("this range is one");
                let accumulator =
                    self.records
                        .accumulate(&range.lower, last.upper.as_deref(), scope);
                output.ranges.push(Range {
                    lower: range.lower.clone(),
                    upper: last.upper.clone(),
                    summary: RangeSummary::Fingerprint {
                        fingerprint: accumulator.fingerprint(),
                        count: accumulator.count(),
                    },
                });
                break;
            }
        }
        for need in &round.needs {
            self.answer_need(scope, need, &mut output);
        }
        Ok(output)
    }

    /// Answers a peer's fingerprint `(fingerprint, count)` of `range`; false if the answer
    /// would not fit in `output` (nothing was added then).
    fn answer_fingerprint(
        &mut self,
        scope: &Scope,
        range: &Range,
        (fingerprint, count): (&crate::digest::Fingerprint, u64),
        output: &mut RoundOutput,
    ) -> bool {
        let upper = range.upper.as_deref();
        let mine: Vec<(String, crate::digest::ItemHash, Vec<Hash>)> = self
            .records
            .range(&range.lower, upper, scope)
            .map(|entry| {
                (
                    entry.record().as_str().to_owned(),
                    *entry.item(),
                    hashes(&entry.advertised_for_wire()),
                )
            })
            .collect();
        let mut accumulator = Accumulator::default();
        mine.iter().for_each(|(_, item, _)| accumulator.add(item));
        if accumulator.count() == count && &accumulator.fingerprint() == fingerprint {
            return true;
        }
        if count == 0 {
            // They have nothing here: send everything.
            for (key, _, _) in &mine {
                if output.truncated {
                    // The round's budget is spent: the rest waits for the next round,
                    // and no document is loaded for changes that would not be sent.
                    break;
                }
                output.add_whole(self.records, key);
            }
            return true;
        }
        if mine.len() <= RANGE_ITEMS_THRESHOLD {
            if !output.has_room(1, mine.len()) {
                return false;
            }
            output.items += mine.len();
            let items = mine
                .into_iter()
                .map(|(record, _, heads)| Item { record, heads })
                .collect();
            output.ranges.push(Range {
                lower: range.lower.clone(),
                upper: range.upper.clone(),
                summary: RangeSummary::Items(items),
            });
            return true;
        }
        let chunk = mine.len().div_ceil(RANGE_FANOUT);
        let parts: Vec<&[(String, crate::digest::ItemHash, Vec<Hash>)]> =
            mine.chunks(chunk).collect();
        if !output.has_room(parts.len(), 0) {
            return false;
        }
        for (index, part) in parts.iter().enumerate() {
            let lower = match index {
                0 => range.lower.clone(),
                _ => part[0].0.clone(),
            };
            let upper = match parts.get(index + 1) {
                Some(next) => Some(next[0].0.clone()),
                None => range.upper.clone(),
            };
            let mut accumulator = Accumulator::default();
            part.iter().for_each(|(_, item, _)| accumulator.add(item));
            output.ranges.push(Range {
                lower,
                upper,
                summary: RangeSummary::Fingerprint {
                    fingerprint: accumulator.fingerprint(),
                    count: accumulator.count(),
                },
            });
        }
        true
    }

    fn answer_items(
        &mut self,
        scope: &Scope,
        range: &Range,
        items: &[Item],
        output: &mut RoundOutput,
    ) -> Result<(), String> {
        let mut theirs: BTreeMap<&str, &[Hash]> = BTreeMap::new();
        for item in items {
            let inside = item.record >= range.lower
                && range
                    .upper
                    .as_ref()
                    .is_none_or(|upper| &item.record < upper);
            let record: RecordId = item
                .record
                .parse()
                .map_err(|_| format!("item names an invalid record `{}`", item.record))?;
            if !inside {
                return Err(format!("item `{}` lies outside its range", item.record));
            }
            if in_scope(scope, record.collection()) {
                theirs.insert(item.record.as_str(), &item.heads);
            }
        }
        let missing_there: Vec<String> = self
            .records
            .range(&range.lower, range.upper.as_deref(), scope)
            .filter(|entry| !theirs.contains_key(entry.record().as_str()))
            .map(|entry| entry.record().as_str().to_owned())
            .collect();
        for key in missing_there {
            if output.truncated {
                break;
            }
            output.add_whole(self.records, &key);
        }
        for (key, heads) in theirs {
            self.compare(key, &change_hashes(heads), None, output);
        }
        Ok(())
    }

    pub(crate) fn answer_need(&mut self, scope: &Scope, need: &Need, output: &mut RoundOutput) {
        let Ok(record) = need.record.parse::<RecordId>() else {
            return;
        };
        if !in_scope(scope, record.collection()) {
            return;
        }
        let heads = change_hashes(&need.heads);
        let ancestors = change_hashes(&need.ancestors);
        self.compare(&need.record, &heads, Some(&ancestors), output);
    }

    /// Compares our copy of a record with a peer's heads (and, for a need, some of its older
    /// hashes): sends what the peer lacks and asks for what we lack.
    fn compare(
        &mut self,
        key: &str,
        their_heads: &[ChangeHash],
        their_ancestors: Option<&[ChangeHash]>,
        output: &mut RoundOutput,
    ) {
        let Some(entry) = self.records.entry(key) else {
            if !their_heads.is_empty() && output.has_room_for_need() {
                output.needs.push(history::need(self.records, key));
            }
            return;
        };
        if entry.advertised() == their_heads {
            return;
        }
        let all_known = their_heads
            .iter()
            .all(|head| admit::holds(self.records, self.pipeline, key, head));
        if all_known {
            if output.truncated {
                return;
            }
            if their_heads.is_empty() {
                output.add_whole(self.records, key);
                return;
            }
            let envelopes = history::envelopes_after(self.records, key, their_heads);
            output.add_changes(envelopes);
            return;
        }
        if let Some(ancestors) = their_ancestors
            && !output.truncated
        {
            // Their history forked from ours: send what follows the hashes we share.
            let have: Vec<ChangeHash> = their_heads.iter().chain(ancestors).copied().collect();
            let envelopes = history::envelopes_after(self.records, key, &have);
            output.add_changes(envelopes);
        }
        if output.has_room_for_need() {
            output.needs.push(history::need(self.records, key));
        }
    }
}
