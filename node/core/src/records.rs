//! The node's records: an ordered index of (record, durable heads) with an incremental
//! digest, over documents that are loaded on demand and kept in a cache bounded in bytes.
//!
//! A document leaves the cache as nothing at all when the document store holds it as it is
//! (a completed checkpoint saved it and nothing changed it since: [`Persisted::Yes`]), and
//! is read back from the store when next used; otherwise it leaves as its saved bytes,
//! which the next checkpoint writes out and then drops.
//!
//! The index holds *durable* heads only: a local change joins them when its log append is
//! reported durable, a remote one when it is applied. Reconciliation and status read the
//! index and never load a document. A document may run ahead of its durable heads while
//! local changes wait for their append; those changes are never handed to peers.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crdt_schema::policy::RejectReason;
use crdt_schema::{Change, ChangeHash, NodeId, RecordDoc, RecordId};

use crate::digest::{Accumulator, ItemHash};
use crate::limits::{HEADS_PER_ITEM_MAX, LOADED_DOCUMENT_BASE_BYTES, LOADED_DOCUMENT_CHANGE_BYTES};
use crate::signatures::Signatures;
use crate::storage::DocumentStore;
use crate::time::Instant;

/// Collections a reconciliation covers; `None` means all.
pub type Scope = Option<BTreeSet<String>>;

/// One record's state. The fields are private: every change goes through `Records`, whose
/// mutators keep the record's digest item (and the node's total) in step with its heads
/// and quarantine.
pub struct Entry {
    /// The record's address.
    record: RecordId,
    /// Heads of the durable changes.
    heads: Vec<ChangeHash>,
    /// This record's contribution to digests.
    item: ItemHash,
    /// Whether the record carries a tombstone, as of its last durable change.
    deleted: bool,
    /// Signatures of the durable changes.
    signatures: Signatures,
    /// Local changes made but not yet durable.
    unacked: BTreeSet<ChangeHash>,
    /// Durable, validly signed changes the policy rejects: never applied, never pushed,
    /// but held and reconciled so that every honest node judges the same set.
    quarantine: BTreeMap<ChangeHash, Quarantined>,
    /// The latest sequence number of each author in the document, once computed: what a
    /// new change must continue (Automerge panics on a gap).
    author_seqs: Option<BTreeMap<NodeId, u64>>,
    /// Changed since the last checkpoint.
    dirty: bool,
    /// Whether the document store holds the document as it is now.
    persisted: Persisted,
    body: Body,
    last_used: u64,
    /// What the document is charged in the cache while loaded (0 when not).
    cost: usize,
}

impl Entry {
    /// The record's address.
    pub fn record(&self) -> &RecordId {
        &self.record
    }

    /// Heads of the durable changes.
    pub fn heads(&self) -> &[ChangeHash] {
        &self.heads
    }

    /// This record's contribution to digests.
    pub fn item(&self) -> &ItemHash {
        &self.item
    }

    /// Whether the record carries a tombstone, as of its last durable change.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Signatures of the durable changes.
    pub fn signatures(&self) -> &Signatures {
        &self.signatures
    }

    /// Local changes made but not yet durable.
    pub fn unacked(&self) -> &BTreeSet<ChangeHash> {
        &self.unacked
    }

    /// The changes the policy rejects, held.
    pub fn quarantine(&self) -> &BTreeMap<ChangeHash, Quarantined> {
        &self.quarantine
    }

    /// Whether the record changed since the last checkpoint.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }
}

/// A change the policy rejected, kept with why.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The envelope exactly as received.
    pub envelope: Vec<u8>,
    /// The parsed change.
    pub change: Change,
    /// Its author.
    pub author: NodeId,
    /// The rule it broke under the policy in force.
    pub reason: RejectReason,
    /// When this node rejected it.
    pub rejected_at: Instant,
}

enum Body {
    Loaded(Box<RecordDoc>),
    /// Saved by this process when the cache evicted it before the store held it.
    Saved(Vec<u8>),
    /// As restored with its bytes, not loaded yet: checked against the index when it is.
    Stored(Vec<u8>),
    /// Only in the document store: read and checked against the index when used.
    InStore,
}

/// Whether the document store holds a record's document as the record holds it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisted {
    /// Changed (or handed out to be changed) since the store last saved it, or never saved.
    No,
    /// Handed to the checkpoint in flight, unchanged since.
    Saving,
    /// As the last completed checkpoint stored it (or as restored from the store).
    Yes,
}

/// All records of a node.
pub struct Records {
    entries: BTreeMap<String, Entry>,
    total: Accumulator,
    author: NodeId,
    loaded: BTreeMap<u64, String>,
    use_clock: u64,
    /// What the loaded documents are charged, together, and the most they may be.
    loaded_bytes: usize,
    cache_bytes_max: usize,
    store: Option<Box<dyn DocumentStore>>,
    store_reads: u64,
    /// Quarantined changes held, over all records and by author, ordered by hash: the
    /// bounds against a member that floods many records keep the lowest hashes (see
    /// `Judge::enforce_quarantine_bounds` in judge.rs), so they need the highest at hand.
    quarantined_all: BTreeSet<(ChangeHash, String)>,
    quarantined_by_author: BTreeMap<NodeId, BTreeSet<(ChangeHash, String)>>,
    /// Damage found loading stored documents, not reported yet.
    damaged: Vec<String>,
}

impl Records {
    /// No records; new documents are authored by `author`.
    pub fn new(author: NodeId, cache_bytes_max: usize) -> Records {
        assert!(cache_bytes_max > 0, "the document cache needs some room");
        Records {
            entries: BTreeMap::new(),
            total: Accumulator::default(),
            author,
            loaded: BTreeMap::new(),
            quarantined_all: BTreeSet::new(),
            quarantined_by_author: BTreeMap::new(),
            use_clock: 0,
            loaded_bytes: 0,
            cache_bytes_max,
            store: None,
            store_reads: 0,
            damaged: Vec::new(),
        }
    }

    /// The record's entry, if it exists.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Where documents the index names are read from (see the module doc of storage.rs).
    pub fn set_store(&mut self, store: Box<dyn DocumentStore>) {
        self.store = Some(store);
    }

    /// Notes a local change of the record made but not yet durable.
    pub fn add_unacked(&mut self, key: &str, hash: ChangeHash) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.unacked.insert(hash);
            entry.persisted = Persisted::No;
        }
    }

    /// Forgets a local change that will never be durable as accepted history.
    pub fn remove_unacked(&mut self, key: &str, hash: &ChangeHash) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.unacked.remove(hash);
        }
    }

    /// Marks the record for the next checkpoint.
    pub fn mark_dirty(&mut self, key: &str) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.dirty = true;
            entry.persisted = Persisted::No;
        }
    }

    /// Notes that the record was handed to a checkpoint, as it is now.
    pub fn mark_clean(&mut self, key: &str) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.dirty = false;
            entry.persisted = Persisted::Saving;
        }
    }

    /// The checkpoint that saved `keys` is durable: the store holds each of them that did
    /// not change since, and an evicted one stops keeping its bytes in memory.
    pub fn mark_persisted(&mut self, keys: &[String]) {
        for key in keys {
            if let Some(entry) = self.entries.get_mut(key)
                && entry.persisted == Persisted::Saving
            {
                entry.persisted = Persisted::Yes;
                if self.store.is_some() && matches!(entry.body, Body::Saved(_)) {
                    entry.body = Body::InStore;
                }
            }
        }
    }

    /// Drops the cached sequence numbers of the record's authors; computed again from the
    /// document when next needed.
    pub fn forget_author_seqs(&mut self, key: &str) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.author_seqs = None;
        }
    }

    /// Sets the record's durable heads and the signatures of its accepted changes after
    /// it was judged whole; its digest item follows.
    pub fn set_judged(
        &mut self,
        key: &str,
        heads: Vec<ChangeHash>,
        signatures: BTreeMap<ChangeHash, [u8; 64]>,
    ) {
        let entry = self.entries.get_mut(key).expect("record exists");
        entry.heads = heads;
        entry.signatures = signatures.into_iter().collect();
        self.update_item(key);
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The digest accumulator over all records.
    pub fn total(&self) -> &Accumulator {
        &self.total
    }

    /// Number of loaded documents.
    pub fn loaded_count(&self) -> usize {
        self.loaded.len()
    }

    /// What the loaded documents are charged in the cache, together: at most the cache's
    /// size, or one document's when a single one exceeds it.
    pub fn loaded_bytes(&self) -> usize {
        self.loaded_bytes
    }

    /// Documents read from the store since the start.
    pub fn store_reads(&self) -> u64 {
        self.store_reads
    }

    /// Documents held in memory as saved bytes (evicted before the store held them, or
    /// restored with their bytes), and those bytes together.
    pub fn held_bytes(&self) -> (usize, usize) {
        self.entries
            .values()
            .filter_map(|entry| match &entry.body {
                Body::Saved(bytes) | Body::Stored(bytes) => Some(bytes.len()),
                Body::Loaded(_) | Body::InStore => None,
            })
            .fold((0, 0), |(count, total), len| (count + 1, total + len))
    }

    /// Adds an empty record, or does nothing if it exists.
    pub fn create(&mut self, record: &RecordId) {
        if self.entries.contains_key(record.as_str()) {
            return;
        }
        let item = ItemHash::of(record.as_str(), &[]);
        self.total.add(&item);
        let doc = RecordDoc::new(&self.author);
        self.entries.insert(
            record.as_str().to_owned(),
            Entry {
                record: record.clone(),
                heads: Vec::new(),
                item,
                deleted: false,
                signatures: Signatures::default(),
                unacked: BTreeSet::new(),
                quarantine: BTreeMap::new(),
                author_seqs: Some(BTreeMap::new()),
                dirty: true,
                persisted: Persisted::No,
                body: Body::Loaded(Box::new(doc)),
                last_used: 0,
                cost: 0,
            },
        );
        self.touch(record.as_str());
    }

    /// Replaces a record's quarantine, keeping the tallies right.
    pub fn set_quarantine(&mut self, key: &str, quarantine: BTreeMap<ChangeHash, Quarantined>) {
        let entry = self.entries.get_mut(key).expect("record exists");
        let old = std::mem::take(&mut entry.quarantine);
        // Old first: the tallies are sets, and a change in both must stay counted.
        self.tally(key, &old, false);
        self.tally(key, &quarantine, true);
        self.entries.get_mut(key).expect("exists").quarantine = quarantine;
        self.update_item(key);
    }

    fn tally(&mut self, key: &str, quarantine: &BTreeMap<ChangeHash, Quarantined>, add: bool) {
        for (hash, held) in quarantine {
            let id = (*hash, key.to_owned());
            let by_author = self.quarantined_by_author.entry(held.author).or_default();
            if add {
                by_author.insert(id.clone());
                self.quarantined_all.insert(id);
            } else {
                by_author.remove(&id);
                if by_author.is_empty() {
                    self.quarantined_by_author.remove(&held.author);
                }
                self.quarantined_all.remove(&id);
            }
        }
    }

    /// Quarantined changes held over all records.
    pub fn quarantined_total(&self) -> usize {
        self.quarantined_all.len()
    }

    /// Quarantined changes by `author` held over all records.
    pub fn quarantined_by(&self, author: &NodeId) -> usize {
        self.quarantined_by_author
            .get(author)
            .map_or(0, BTreeSet::len)
    }

    /// The quarantined change with the highest hash, over all records, and its record.
    pub fn highest_quarantined(&self) -> Option<&(ChangeHash, String)> {
        self.quarantined_all.last()
    }

    /// The quarantined change by `author` with the highest hash, and its record.
    pub fn highest_quarantined_by(&self, author: &NodeId) -> Option<&(ChangeHash, String)> {
        self.quarantined_by_author.get(author)?.last()
    }

    /// Drops a quarantined change from a record, and every quarantined change of the record
    /// built on it (held without it, they could never be judged again). Returns how many
    /// were dropped.
    pub fn evict_quarantined(&mut self, key: &str, hash: ChangeHash) -> usize {
        let Some(entry) = self.entries.get_mut(key) else {
            return 0;
        };
        let mut gone: BTreeSet<ChangeHash> = BTreeSet::new();
        if entry.quarantine.contains_key(&hash) {
            gone.insert(hash);
        }
        // Quarantined changes only build on held changes, so a fixpoint over the record's
        // quarantine finds every dependant.
        loop {
            let more: Vec<ChangeHash> = entry
                .quarantine
                .iter()
                .filter(|(held, quarantined)| {
                    !gone.contains(*held)
                        && quarantined
                            .change
                            .deps()
                            .iter()
                            .any(|dep| gone.contains(dep))
                })
                .map(|(held, _)| *held)
                .collect();
            if more.is_empty() {
                break;
            }
            gone.extend(more);
        }
        let mut dropped = BTreeMap::new();
        for hash in &gone {
            if let Some(quarantined) = entry.quarantine.remove(hash) {
                dropped.insert(*hash, quarantined);
            }
        }
        self.tally(key, &dropped, false);
        if !dropped.is_empty() {
            self.refresh_item(key);
        }
        dropped.len()
    }

    /// Removes a record that has neither durable nor pending changes (a first write that
    /// failed), so that it does not appear.
    pub fn remove_empty(&mut self, key: &str) {
        if self.entries.get(key).is_some_and(|entry| {
            entry.heads.is_empty() && entry.unacked.is_empty() && entry.quarantine.is_empty()
        }) {
            let entry = self.entries.remove(key).expect("checked above");
            self.total.remove(&entry.item);
            self.loaded.remove(&entry.last_used);
            self.loaded_bytes -= entry.cost;
        }
    }

    /// Adds records restored from storage, unloaded. Into an empty index (a start) they go
    /// in one pass, which fills the map's nodes: inserted one by one in key order they
    /// would be left half full, about 250 bytes a record more.
    pub fn restore_all(&mut self, restored: Vec<RestoredRecord>) {
        if !self.entries.is_empty() {
            for record in restored {
                self.restore(record);
            }
            return;
        }
        // A record given twice keeps its last entry, as `restore` would.
        let entries: BTreeMap<String, Entry> = restored
            .into_iter()
            .map(|record| (record.record.as_str().to_owned(), restored_entry(record)))
            .collect();
        for (key, entry) in &entries {
            self.tally(key, &entry.quarantine, true);
            self.total.add(&entry.item);
        }
        self.entries = entries;
    }

    /// Adds a record restored from storage, unloaded, replacing any entry it had.
    pub fn restore(&mut self, restored: RestoredRecord) {
        let key = restored.record.as_str().to_owned();
        if let Some(old) = self.entries.remove(&key) {
            self.total.remove(&old.item);
            self.loaded.remove(&old.last_used);
            self.loaded_bytes -= old.cost;
            self.tally(&key, &old.quarantine, false);
        }
        let entry = restored_entry(restored);
        self.tally(&key, &entry.quarantine, true);
        self.total.add(&entry.item);
        self.entries.insert(key, entry);
    }

    /// The record's document to read, loaded if needed. Panics if the record does not
    /// exist.
    ///
    /// A document restored from storage is checked against the index when it is first
    /// loaded (a start loads none). One that does not load, or whose heads are not the
    /// stored heads, is damaged: the record forgets what the document should have held
    /// (heads and signatures; the document wins where it loads), so the digest no longer
    /// claims it and reconciliation brings those changes again from peers. The damage is
    /// reported through [`Records::take_damaged`].
    pub fn doc(&mut self, key: &str) -> &RecordDoc {
        self.load(key);
        match &self.entries[key].body {
            Body::Loaded(doc) => doc,
            Body::Saved(_) | Body::Stored(_) | Body::InStore => unreachable!("loaded above"),
        }
    }

    /// The record's document to change, loaded if needed (as [`Records::doc`]). The store
    /// no longer holds it as it is, so it is not dropped from the cache until a checkpoint
    /// has saved it again.
    pub fn doc_mut(&mut self, key: &str) -> &mut RecordDoc {
        self.load(key);
        let entry = self.entries.get_mut(key).expect("loaded above");
        entry.persisted = Persisted::No;
        match &mut entry.body {
            Body::Loaded(doc) => doc,
            Body::Saved(_) | Body::Stored(_) | Body::InStore => unreachable!("loaded above"),
        }
    }

    fn load(&mut self, key: &str) {
        self.touch(key);
        let author = self.author;
        let entry = self
            .entries
            .get_mut(key)
            .expect("caller checked the record exists");
        let stored = match std::mem::replace(&mut entry.body, Body::InStore) {
            Body::Loaded(doc) => {
                entry.body = Body::Loaded(doc);
                return;
            }
            Body::Saved(bytes) => {
                // Saved by this node from a document every change of which passed the door
                // (`RecordDoc::apply` checks each comes back out as it went in), so this
                // loads. Should it not, an empty document keeps the node up.
                let doc =
                    RecordDoc::load(&bytes, &author).unwrap_or_else(|_| RecordDoc::new(&author));
                entry.body = Body::Loaded(Box::new(doc));
                return;
            }
            Body::Stored(bytes) => Ok(bytes),
            Body::InStore => {
                self.store_reads += 1;
                read_store(self.store.as_deref(), &entry.record)
            }
        };
        let loaded =
            stored.and_then(|bytes| RecordDoc::load(&bytes, &author).map_err(|e| e.to_string()));
        let doc = match loaded {
            Ok(doc) if doc.heads() == entry.heads => {
                entry.body = Body::Loaded(Box::new(doc));
                return;
            }
            Ok(doc) => {
                self.damaged.push(format!(
                    "stored heads of {key} disagree with its document; the document wins"
                ));
                entry.heads = doc.heads();
                doc
            }
            Err(error) => {
                self.damaged.push(format!(
                    "stored record {key} is damaged and was forgotten ({error}); peers will send its changes again"
                ));
                entry.heads.clear();
                entry.signatures.clear();
                entry.deleted = false;
                RecordDoc::new(&author)
            }
        };
        entry.body = Body::Loaded(Box::new(doc));
        self.refresh_item(key);
    }

    /// The saved document of a record restored without its bytes, read from the store.
    pub fn stored_document(&self, record: &RecordId) -> Result<Vec<u8>, String> {
        read_store(self.store.as_deref(), record)
    }

    /// What was found damaged while loading stored documents since the last call, one
    /// message each, for the node to report.
    pub fn take_damaged(&mut self) -> Vec<String> {
        std::mem::take(&mut self.damaged)
    }

    /// Whether the record's document holds `hash`, looking only if the document is loaded:
    /// deduplication must not load documents for a peer's bytes (a message naming many
    /// records would make the node load them all). Every change in a document has its
    /// signature in the index or awaits its append, which callers check first.
    pub fn loaded_doc_has(&self, key: &str, hash: &ChangeHash) -> bool {
        match self.entries.get(key).map(|entry| &entry.body) {
            Some(Body::Loaded(doc)) => doc.has_change(hash),
            _ => false,
        }
    }

    /// The saved bytes of a record's document, saving it now if it is loaded.
    pub fn document_bytes(&mut self, key: &str) -> Vec<u8> {
        match &self.entries.get(key).expect("record exists").body {
            Body::Saved(bytes) | Body::Stored(bytes) => bytes.clone(),
            Body::Loaded(doc) => doc.save(),
            // Read back (and checked) rather than copied from the store unseen.
            Body::InStore => self.doc(key).save(),
        }
    }

    /// The record's saved document as it is now, when it is at hand without Automerge:
    /// held as saved bytes, or in the store. `None` while the document is loaded (it may
    /// hold changes no save has), or when the store cannot answer.
    pub fn saved_bytes_unloaded(&mut self, key: &str) -> Option<Vec<u8>> {
        let entry = self.entries.get(key)?;
        match &entry.body {
            Body::Saved(bytes) | Body::Stored(bytes) => Some(bytes.clone()),
            Body::Loaded(_) => None,
            Body::InStore => {
                self.store_reads += 1;
                read_store(self.store.as_deref(), &entry.record).ok()
            }
        }
    }

    /// Takes `bytes` as the document of a record just created for changes whose every
    /// hash the document holds (a snapshot, checked change by change on admission): they
    /// stay saved bytes, loaded on first use like any saved document, and go to the next
    /// checkpoint as they are instead of being built change by change and saved again.
    /// The caller then marks each change durable.
    pub fn adopt(&mut self, key: &str, bytes: Vec<u8>, deleted: bool) {
        let entry = self
            .entries
            .get_mut(key)
            .expect("the caller created the record");
        debug_assert!(entry.heads.is_empty() && entry.unacked.is_empty());
        self.loaded.remove(&entry.last_used);
        self.loaded_bytes -= entry.cost;
        entry.cost = 0;
        entry.author_seqs = None;
        entry.persisted = Persisted::No;
        entry.deleted = deleted;
        entry.body = Body::Saved(bytes);
    }

    /// Replaces the record's document (after dropping changes that failed to persist).
    pub fn replace_doc(&mut self, key: &str, doc: RecordDoc) {
        let entry = self.entries.get_mut(key).expect("record exists");
        entry.author_seqs = None;
        entry.persisted = Persisted::No;
        entry.body = Body::Loaded(Box::new(doc));
        self.touch(key);
    }

    /// Records that `hash` became durable: moves the durable heads the way Automerge moves
    /// heads, which is exact because durable changes arrive in causal order.
    pub fn mark_durable(
        &mut self,
        key: &str,
        hash: ChangeHash,
        deps: &[ChangeHash],
        signature: [u8; 64],
    ) {
        let entry = self.entries.get_mut(key).expect("record exists");
        entry.heads.retain(|head| !deps.contains(head));
        if let Err(position) = entry.heads.binary_search(&hash) {
            entry.heads.insert(position, hash);
        }
        entry.signatures.insert(hash, signature);
        entry.unacked.remove(&hash);
        self.refresh_item(key);
    }

    /// Marks the record for the next checkpoint and brings its digest item up to date.
    pub fn refresh_item(&mut self, key: &str) {
        self.mark_dirty(key);
        self.update_item(key);
    }

    /// Recomputes a record's digest contribution from its heads and quarantine: every
    /// mutator of either calls it, so the digest is never stale.
    fn update_item(&mut self, key: &str) {
        let entry = self.entries.get_mut(key).expect("record exists");
        let item = ItemHash::of(key, &entry.advertised());
        if item != entry.item {
            self.total.remove(&entry.item);
            self.total.add(&item);
            entry.item = item;
        }
    }

    /// Whether `hash` is a change of record `key` that `me` made and this node holds
    /// (accepted or quarantined).
    pub fn holds_own_change(&mut self, key: &str, hash: &ChangeHash, me: &NodeId) -> bool {
        match self.entry(key) {
            None => false,
            Some(entry) => match entry.quarantine().get(hash) {
                Some(held) => held.author == *me,
                None => self
                    .doc(key)
                    .change(hash)
                    .is_some_and(|held| held.actor_id().to_bytes() == me.as_bytes()),
            },
        }
    }

    /// Keys of every record, in order.
    pub fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Notes that the document now holds `seq` of `author` (a change applied or made).
    pub fn note_seq(&mut self, key: &str, author: NodeId, seq: u64) {
        if let Some(entry) = self.entries.get_mut(key)
            && let Some(seqs) = entry.author_seqs.as_mut()
        {
            let latest = seqs.entry(author).or_default();
            *latest = (*latest).max(seq);
        }
    }

    /// The latest sequence number of each author in the document (computed once, then
    /// kept up to date).
    pub fn author_seqs(&mut self, key: &str) -> BTreeMap<NodeId, u64> {
        if let Some(seqs) = &self.entries.get(key).expect("record exists").author_seqs {
            return seqs.clone();
        }
        let mut seqs: BTreeMap<NodeId, u64> = BTreeMap::new();
        for change in self.doc(key).changes_after(&[]) {
            if let Ok(author) = NodeId::from_slice(change.actor_id().to_bytes()) {
                let latest = seqs.entry(author).or_default();
                *latest = (*latest).max(change.seq());
            }
        }
        self.entries
            .get_mut(key)
            .expect("record exists")
            .author_seqs = Some(seqs.clone());
        seqs
    }

    /// Refreshes the cached tombstone flag from the document.
    pub fn refresh_deleted(&mut self, key: &str) {
        let deleted = self.doc(key).deleted();
        self.entries.get_mut(key).expect("record exists").deleted = deleted;
    }

    /// Entries in `[lower, upper)` whose collection is in `scope`.
    pub fn range<'a>(
        &'a self,
        lower: &str,
        upper: Option<&str>,
        scope: &'a Scope,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        // An empty or reversed range is empty (a `BTreeMap` range would panic).
        let (lower, upper) = match upper {
            Some(upper) if upper <= lower => (upper, Bound::Excluded(upper)),
            Some(upper) => (lower, Bound::Excluded(upper)),
            None => (lower, Bound::Unbounded),
        };
        self.entries
            .range::<str, _>((Bound::Included(lower), upper))
            .map(|(_, entry)| entry)
            .filter(move |entry| in_scope(scope, entry.record.collection()))
    }

    /// The accumulator over `[lower, upper)` within `scope`.
    pub fn accumulate(&self, lower: &str, upper: Option<&str>, scope: &Scope) -> Accumulator {
        let mut accumulator = Accumulator::default();
        for entry in self.range(lower, upper, scope) {
            accumulator.add(&entry.item);
        }
        accumulator
    }

    /// Marks the record most recently used and charges its document to the cache; then
    /// drops the least recently used documents while the cache is over its size (never
    /// the one just used).
    fn touch(&mut self, key: &str) {
        self.use_clock += 1;
        let clock = self.use_clock;
        let entry = self.entries.get_mut(key).expect("record exists");
        self.loaded.remove(&entry.last_used);
        entry.last_used = clock;
        self.loaded.insert(clock, key.to_owned());
        let cost = LOADED_DOCUMENT_BASE_BYTES
            + LOADED_DOCUMENT_CHANGE_BYTES * (entry.signatures.len() + entry.unacked.len());
        self.loaded_bytes = self.loaded_bytes - entry.cost + cost;
        entry.cost = cost;
        while self.loaded_bytes > self.cache_bytes_max && self.loaded.len() > 1 {
            let (_, evicted) = self
                .loaded
                .pop_first()
                .expect("over the limit, so not empty");
            let entry = self
                .entries
                .get_mut(&evicted)
                .expect("cache names existing records");
            self.loaded_bytes -= entry.cost;
            entry.cost = 0;
            // Computed again from the document when it is next loaded: kept for every
            // record, the map would cost about 450 bytes each.
            entry.author_seqs = None;
            if let Body::Loaded(doc) = &entry.body {
                entry.body = if entry.persisted == Persisted::Yes && self.store.is_some() {
                    Body::InStore
                } else {
                    Body::Saved(doc.save())
                };
            }
        }
    }
}

/// A record as restored from storage: its index entry, and its document's bytes or
/// (`None`) its document in the store.
pub struct RestoredRecord {
    /// The record.
    pub record: RecordId,
    /// Heads of its durable changes, as stored.
    pub heads: Vec<ChangeHash>,
    /// Its document's bytes, or `None` when the document store holds it.
    pub document: Option<Vec<u8>>,
    /// The signatures of its changes.
    pub signatures: Signatures,
    /// Whether it is deleted.
    pub deleted: bool,
    /// Its quarantined changes.
    pub quarantine: BTreeMap<ChangeHash, Quarantined>,
}

fn restored_entry(restored: RestoredRecord) -> Entry {
    let RestoredRecord {
        record,
        heads,
        document,
        signatures,
        deleted,
        quarantine,
    } = restored;
    Entry {
        item: ItemHash::of(record.as_str(), &advertised(&heads, &quarantine)),
        record,
        heads,
        deleted,
        signatures,
        unacked: BTreeSet::new(),
        quarantine,
        author_seqs: None,
        dirty: false,
        persisted: match document {
            Some(_) => Persisted::No,
            None => Persisted::Yes,
        },
        body: match document {
            Some(bytes) => Body::Stored(bytes),
            None => Body::InStore,
        },
        last_used: 0,
        cost: 0,
    }
}

/// A record's saved document from the store, or why there is none to load.
fn read_store(store: Option<&dyn DocumentStore>, record: &RecordId) -> Result<Vec<u8>, String> {
    match store.map(|store| store.document(record)) {
        Some(Ok(Some(bytes))) => Ok(bytes),
        Some(Ok(None)) => Err("storage holds no document for it".to_owned()),
        Some(Err(error)) => Err(format!("it could not be read: {error}")),
        None => Err("this node has no document store".to_owned()),
    }
}

/// Whether `collection` is inside `scope`.
pub fn in_scope(scope: &Scope, collection: &str) -> bool {
    scope
        .as_ref()
        .is_none_or(|collections| collections.contains(collection))
}

impl Entry {
    /// Whether the record has changes not yet durable.
    pub fn has_unacked(&self) -> bool {
        !self.unacked.is_empty()
    }

    /// Whether the record has accepted content (a record holding only quarantined changes
    /// does not exist for readers).
    pub fn is_visible(&self) -> bool {
        !self.heads.is_empty() || self.has_unacked()
    }

    /// What this node holds of the record, as peers compare it: the durable heads plus
    /// the quarantined changes no other quarantined change builds on.
    pub fn advertised(&self) -> Vec<ChangeHash> {
        if self
            .quarantine
            .keys()
            .any(|hash| self.unacked.contains(hash))
        {
            // A local change forbidden while its append is in flight is not announced
            // before it is durable.
            let durable: BTreeMap<ChangeHash, Quarantined> = self
                .quarantine
                .iter()
                .filter(|(hash, _)| !self.unacked.contains(hash))
                .map(|(hash, held)| (*hash, held.clone()))
                .collect();
            return advertised(&self.heads, &durable);
        }
        advertised(&self.heads, &self.quarantine)
    }

    /// [`Entry::advertised`] as a message may list it: at most [`HEADS_PER_ITEM_MAX`]
    /// heads, the accepted ones first, then the smallest quarantine hashes. Only a member
    /// flooding one record with changes it may not make, or more concurrent writers of one
    /// record than that, makes the list longer. The item hash covers the whole list, so
    /// nodes that differ beyond the cap still see a difference, and reconciliation sends
    /// what follows the listed heads.
    pub fn advertised_for_wire(&self) -> Vec<ChangeHash> {
        cap_for_wire(self.advertised(), &self.heads)
    }
}

fn cap_for_wire(all: Vec<ChangeHash>, accepted: &[ChangeHash]) -> Vec<ChangeHash> {
    if all.len() <= HEADS_PER_ITEM_MAX {
        return all;
    }
    let accepted: BTreeSet<ChangeHash> = accepted.iter().copied().collect();
    let (mut kept, frontier): (Vec<ChangeHash>, Vec<ChangeHash>) =
        all.into_iter().partition(|hash| accepted.contains(hash));
    let room = HEADS_PER_ITEM_MAX.saturating_sub(kept.len());
    kept.extend(frontier.into_iter().take(room));
    kept.truncate(HEADS_PER_ITEM_MAX);
    kept.sort();
    kept
}

fn advertised(
    heads: &[ChangeHash],
    quarantine: &BTreeMap<ChangeHash, Quarantined>,
) -> Vec<ChangeHash> {
    if quarantine.is_empty() {
        return heads.to_vec();
    }
    let built_on: BTreeSet<ChangeHash> = quarantine
        .values()
        .flat_map(|held| held.change.deps().iter().copied())
        .collect();
    let mut all: Vec<ChangeHash> = heads
        .iter()
        .copied()
        .chain(
            quarantine
                .keys()
                .filter(|hash| !built_on.contains(hash))
                .copied(),
        )
        .collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_schema::{Edit, FieldEdit, FieldValue, Identity};

    /// `count` different first changes of one record by one author: concurrent heads.
    fn concurrent_changes(count: i64) -> Vec<Change> {
        let author = Identity::from_seed(1).node_id();
        (0..count)
            .map(|value| {
                let mut doc = RecordDoc::new(&author);
                let fields = [("n".to_owned(), FieldEdit::Set(FieldValue::Int(value)))].into();
                doc.edit(&Edit::Put(fields), 0).unwrap().unwrap()
            })
            .collect()
    }

    #[test]
    fn advertised_heads_never_exceed_what_a_message_may_list_and_keep_accepted_heads() {
        let mut changes = concurrent_changes(100);
        let accepted: Vec<ChangeHash> = changes.drain(..3).map(|change| change.hash()).collect();
        let quarantine: BTreeMap<ChangeHash, Quarantined> = changes
            .into_iter()
            .map(|change| {
                let held = Quarantined {
                    envelope: Vec::new(),
                    author: Identity::from_seed(1).node_id(),
                    reason: RejectReason::NotAMember {
                        author: Identity::from_seed(1).node_id(),
                    },
                    rejected_at: Instant::from_millis(0),
                    change,
                };
                (held.change.hash(), held)
            })
            .collect();
        let all = advertised(&accepted, &quarantine);
        assert_eq!(all.len(), 100, "the item hash covers every head");
        let listed = cap_for_wire(all, &accepted);
        assert_eq!(listed.len(), HEADS_PER_ITEM_MAX);
        assert!(accepted.iter().all(|hash| listed.contains(hash)));
        assert!(listed.is_sorted());
        // The same held set gives the same list whatever order it was built in.
        let mut reversed = accepted.clone();
        reversed.reverse();
        assert_eq!(
            cap_for_wire(advertised(&reversed, &quarantine), &reversed),
            listed
        );
    }
}
