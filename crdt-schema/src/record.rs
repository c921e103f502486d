//! Records: one Automerge document per record, addressed `collection/id`.
//!
//! Fields are keys at the document root. Each field holds one typed value ([`FieldValue`]);
//! a delete is the tombstone field `_deleted`, so a delete merges like any other edit
//! (last writer wins against a concurrent edit of the same field, never against other
//! fields). Names that start with `_` are reserved for such bookkeeping fields.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, Change, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map as JsonMap, Value as Json};

use crate::change::VerifyError;
use crate::decimal::Decimal;
use crate::identity::NodeId;

/// Longest collection name, in bytes.
pub const COLLECTION_BYTES_MAX: usize = 64;
/// Longest record id within a collection, in bytes.
pub const RECORD_ID_BYTES_MAX: usize = 256;
/// Longest field name, in bytes.
pub const FIELD_NAME_BYTES_MAX: usize = 128;
/// Most fields one record may hold.
pub const FIELDS_MAX: usize = 1024;
/// The tombstone field.
pub const DELETED_FIELD: &str = "_deleted";
/// The hidden field a policy endorsement writes (see [`RecordDoc::endorse`]).
pub const ENDORSED_FIELD: &str = "_endorsed";

/// The address of a record: `collection/id`.
///
/// Records sort by their key text, which is also the order of reconciliation ranges.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    key: String,
    slash: usize,
}

/// Why a record address or field name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The collection name is empty, too long, or uses other characters.
    #[error(
        "collection `{0}` is not valid: use 1 to {COLLECTION_BYTES_MAX} lowercase letters, digits, `_` or `-`, starting with a letter"
    )]
    Collection(String),
    /// The record id is empty, too long, or contains `/` or control characters.
    #[error(
        "record id `{0}` is not valid: use 1 to {RECORD_ID_BYTES_MAX} bytes without `/` or control characters"
    )]
    RecordId(String),
    /// The key has no `/` between collection and id.
    #[error("`{0}` is not a record address: write it as collection/id")]
    Address(String),
    /// The field name is empty, too long, reserved or has control characters.
    #[error(
        "field name `{0}` is not valid: use 1 to {FIELD_NAME_BYTES_MAX} bytes, no control characters, not starting with `_`"
    )]
    Field(String),
}

/// One typed field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A short string, replaced whole on each edit.
    Str(String),
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    /// Collaborative text: concurrent edits of different parts merge character by character.
    Text(String),
    /// A list of strings, replaced whole on each edit.
    List(Vec<String>),
    /// A reference to another record.
    Ref(RecordId),
    /// An exact decimal (prices, amounts), never a float: stored as its canonical text in a
    /// `{"$decimal": text}` map, as a reference is.
    Decimal(Decimal),
    /// A counter: concurrent increments on different nodes add up instead of one value
    /// replacing the other. Changed only by [`FieldEdit::Add`] once it exists.
    Counter(i64),
}

/// What one edit does to one field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldEdit {
    /// Set the field to this value (a counter field refuses this: add to it instead).
    Set(FieldValue),
    /// Remove the field.
    Remove,
    /// Add this amount (negative to subtract) to the field, which must be a counter.
    Add(i64),
}

impl From<Option<FieldValue>> for FieldEdit {
    fn from(value: Option<FieldValue>) -> FieldEdit {
        value.map_or(FieldEdit::Remove, FieldEdit::Set)
    }
}

/// One edit of a record, as the caller asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Set, remove or add to fields; other fields are left alone. Writing to a deleted
    /// record brings it back.
    Put(BTreeMap<String, FieldEdit>),
    /// Mark the record deleted.
    Delete,
}

/// A value of a field that concurrent writes left beside the one shown: Automerge keeps
/// every concurrent value and shows the one whose operation has the greatest id.
#[derive(Debug, Clone, PartialEq)]
pub struct OtherValue {
    /// The value (`None` when it is of a kind mesh does not read).
    pub value: Option<FieldValue>,
    /// Who wrote it.
    pub author: NodeId,
    /// The author's name, where the reader knows it (a member name under a policy, a peer's
    /// node name otherwise); filled in by the node, not the document.
    pub author_name: Option<String>,
    /// When its author's clock says it was written, in ms since 1970.
    pub time_ms: i64,
}

/// A record as read: its fields, tombstone and heads.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordView {
    /// The record's address.
    pub record: RecordId,
    /// The current value of every field.
    pub fields: BTreeMap<String, FieldValue>,
    /// The fields whose concurrent writes left other values beside the one shown, with
    /// those values; empty when nothing is in conflict. Writing the field clears it.
    pub conflicts: BTreeMap<String, Vec<OtherValue>>,
    /// Whether the record carries a tombstone.
    pub deleted: bool,
    /// The hashes of the latest changes.
    pub heads: Vec<ChangeHash>,
}

/// Why a JSON value cannot become a [`FieldValue`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct JsonFieldError {
    /// The field's name.
    pub field: String,
    /// What is wrong with its value.
    pub problem: String,
}

/// Why a document cannot be edited or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// The edit names an invalid field.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The edit sets more fields than a record may hold.
    #[error("a record may hold at most {FIELDS_MAX} fields")]
    TooManyFields,
    /// The edit sets a counter field outright, which would drop concurrent increments.
    #[error(
        "field `{0}` is a counter: add to it with {{\"$inc\": N}} (`{0}+=N` or `{0}-=N` on the command line) instead of setting it"
    )]
    CounterSet(String),
    /// The edit adds to a field that is not a counter.
    #[error(
        "field `{0}` is not a counter: create one with {{\"$counter\": N}} before adding to it"
    )]
    NotACounter(String),
    /// Automerge refused the operation or the bytes.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The changes or bytes would damage the document (Automerge panicked on them, or
    /// could not give them back as they came); the document is as it was.
    #[error("{0}")]
    Damaging(String),
}

/// One record's Automerge document, with this node as the actor of new changes.
#[derive(Debug, Clone)]
pub struct RecordDoc {
    doc: Automerge,
}

impl RecordId {
    /// The address of record `id` in `collection`, if both names are valid.
    pub fn new(collection: &str, id: &str) -> Result<RecordId, NameError> {
        check_collection(collection)?;
        check_record_id(id)?;
        Ok(RecordId {
            key: format!("{collection}/{id}"),
            slash: collection.len(),
        })
    }

    /// The collection name.
    pub fn collection(&self) -> &str {
        &self.key[..self.slash]
    }

    /// The id within the collection.
    pub fn id(&self) -> &str {
        &self.key[self.slash + 1..]
    }

    /// The `collection/id` text, which is also the sort key.
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

impl FromStr for RecordId {
    type Err = NameError;

    fn from_str(key: &str) -> Result<RecordId, NameError> {
        let (collection, id) = key
            .split_once('/')
            .ok_or_else(|| NameError::Address(key.to_owned()))?;
        RecordId::new(collection, id)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({})", self.key)
    }
}

impl serde::Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.key)
    }
}

impl<'de> serde::Deserialize<'de> for RecordId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a collection name.
pub fn check_collection(name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name.len() <= COLLECTION_BYTES_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(NameError::Collection(name.to_owned()))
    }
}

fn check_record_id(id: &str) -> Result<(), NameError> {
    let valid = !id.is_empty()
        && id.len() <= RECORD_ID_BYTES_MAX
        && !id.chars().any(|c| c == '/' || c.is_control());
    if valid {
        Ok(())
    } else {
        Err(NameError::RecordId(id.to_owned()))
    }
}

/// Checks a field name: user fields never start with `_`.
pub fn check_field_name(name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name.len() <= FIELD_NAME_BYTES_MAX
        && !name.starts_with('_')
        && !name.chars().any(char::is_control);
    if valid {
        Ok(())
    } else {
        Err(NameError::Field(name.to_owned()))
    }
}

impl FieldValue {
    /// The value as JSON. Types that JSON lacks are tagged objects:
    /// `{"$timestamp": ms}`, `{"$ref": "collection/id"}`, `{"$text": "..."}`.
    pub fn to_json(&self) -> Json {
        match self {
            FieldValue::Str(text) => Json::String(text.clone()),
            FieldValue::Int(number) => Json::from(*number),
            FieldValue::Float(number) => Json::from(*number),
            FieldValue::Bool(flag) => Json::Bool(*flag),
            FieldValue::Timestamp(ms) => tagged("$timestamp", Json::from(*ms)),
            FieldValue::Text(text) => tagged("$text", Json::String(text.clone())),
            FieldValue::List(items) => Json::from(items.clone()),
            FieldValue::Ref(record) => tagged("$ref", Json::String(record.to_string())),
            FieldValue::Counter(count) => tagged("$counter", Json::from(*count)),
            FieldValue::Decimal(decimal) => tagged("$decimal", Json::String(decimal.to_string())),
        }
    }

    /// The value a JSON value stands for: the inverse of [`FieldValue::to_json`].
    /// `null` means "remove the field" and so gives `None`.
    pub fn from_json(field: &str, json: &Json) -> Result<Option<FieldValue>, JsonFieldError> {
        let problem = |problem: &str| JsonFieldError {
            field: field.to_owned(),
            problem: problem.to_owned(),
        };
        let value = match json {
            Json::Null => return Ok(None),
            Json::Bool(flag) => FieldValue::Bool(*flag),
            Json::String(text) => FieldValue::Str(text.clone()),
            Json::Number(number) => match number.as_i64() {
                Some(integer) => FieldValue::Int(integer),
                None => FieldValue::Float(
                    number
                        .as_f64()
                        .ok_or_else(|| problem("number out of range"))?,
                ),
            },
            Json::Array(items) => FieldValue::List(
                items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| problem("lists may hold only strings"))?,
            ),
            Json::Object(object) => from_tagged_json(object).map_err(|text| problem(&text))?,
        };
        Ok(Some(value))
    }

    /// The name of the value's type, as used in schemas and error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Str(_) => "string",
            FieldValue::Int(_) => "integer",
            FieldValue::Float(_) => "float",
            FieldValue::Bool(_) => "bool",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Text(_) => "text",
            FieldValue::List(_) => "list",
            FieldValue::Ref(_) => "reference",
            FieldValue::Counter(_) => "counter",
            FieldValue::Decimal(_) => "decimal",
        }
    }
}

impl FieldEdit {
    /// The edit a JSON value asks for: `null` removes the field, `{"$inc": N}` adds N to
    /// a counter, anything else sets the value [`FieldValue::from_json`] reads.
    pub fn from_json(field: &str, json: &Json) -> Result<FieldEdit, JsonFieldError> {
        if let Json::Object(object) = json
            && let Some(amount) = object.get("$inc")
        {
            return match (object.len(), amount.as_i64()) {
                (1, Some(amount)) => Ok(FieldEdit::Add(amount)),
                _ => Err(JsonFieldError {
                    field: field.to_owned(),
                    problem: "$inc must be the object's only key, with a 64-bit integer".into(),
                }),
            };
        }
        Ok(FieldValue::from_json(field, json)?.into())
    }
}

fn tagged(tag: &str, value: Json) -> Json {
    let mut object = JsonMap::new();
    object.insert(tag.to_owned(), value);
    Json::Object(object)
}

fn from_tagged_json(object: &JsonMap<String, Json>) -> Result<FieldValue, String> {
    let mut entries = object.iter();
    let (Some((tag, value)), None) = (entries.next(), entries.next()) else {
        return Err(
            "objects must have exactly one key: $timestamp, $text, $ref, $decimal, $counter or $inc"
                .to_owned(),
        );
    };
    match (tag.as_str(), value) {
        ("$timestamp", Json::Number(ms)) => ms
            .as_i64()
            .map(FieldValue::Timestamp)
            .ok_or_else(|| "$timestamp must be integer milliseconds since 1970".to_owned()),
        ("$text", Json::String(text)) => Ok(FieldValue::Text(text.clone())),
        ("$ref", Json::String(key)) => key
            .parse()
            .map(FieldValue::Ref)
            .map_err(|error: NameError| error.to_string()),
        ("$counter", Json::Number(count)) => count
            .as_i64()
            .map(FieldValue::Counter)
            .ok_or_else(|| "$counter must be a 64-bit integer".to_owned()),
        ("$counter", _) => Err("$counter must be a 64-bit integer".to_owned()),
        ("$decimal", Json::String(text)) => Decimal::parse(text)
            .map(FieldValue::Decimal)
            .map_err(|error| error.to_string()),
        ("$decimal", _) => Err(
            "$decimal must be a string of digits, like \"12.50\", so that it stays exact"
                .to_owned(),
        ),
        ("$timestamp", _) => Err("$timestamp must be integer milliseconds since 1970".to_owned()),
        ("$text", _) => Err("$text must be a string".to_owned()),
        ("$ref", _) => Err("$ref must be a string like \"collection/id\"".to_owned()),
        _ => Err(format!(
            "unknown or mistyped tag `{tag}`: use {{\"$timestamp\": ms}}, {{\"$text\": \"...\"}}, {{\"$ref\": \"collection/id\"}}, {{\"$decimal\": \"12.50\"}}, {{\"$counter\": N}} or {{\"$inc\": N}}"
        )),
    }
}

impl RecordView {
    /// The record as a JSON object: `{"collection", "id", "deleted", "heads", "fields"}`.
    pub fn to_json(&self) -> Json {
        let fields: JsonMap<String, Json> = self
            .fields
            .iter()
            .map(|(name, value)| (name.clone(), value.to_json()))
            .collect();
        let mut json = serde_json::json!({
            "collection": self.record.collection(),
            "id": self.record.id(),
            "deleted": self.deleted,
            "heads": self.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "fields": fields,
        });
        if !self.conflicts.is_empty() {
            json["conflicts"] = self.conflicts_json();
        }
        json
    }

    /// The conflicts as JSON: `{"field": [{"value", "author", "author_name", "time_ms"}]}`.
    pub fn conflicts_json(&self) -> Json {
        let conflicts: JsonMap<String, Json> = self
            .conflicts
            .iter()
            .map(|(name, others)| {
                let others = others
                    .iter()
                    .map(|other| {
                        serde_json::json!({
                            "value": other.value.as_ref().map_or(Json::Null, FieldValue::to_json),
                            "author": other.author.to_string(),
                            "author_name": other.author_name,
                            "time_ms": other.time_ms,
                        })
                    })
                    .collect();
                (name.clone(), Json::Array(others))
            })
            .collect();
        Json::Object(conflicts)
    }
}

impl RecordDoc {
    /// An empty document whose new changes are authored by `author`.
    pub fn new(author: &NodeId) -> RecordDoc {
        RecordDoc {
            doc: Automerge::new().with_actor(author.actor_id()),
        }
    }

    /// Loads a saved document; new changes are authored by `author`.
    pub fn load(bytes: &[u8], author: &NodeId) -> Result<RecordDoc, DocError> {
        let doc = crate::guard::no_panic("loading a document", || {
            Automerge::load(bytes).map_err(|error| VerifyError::Change(error.to_string()))
        })
        .map_err(|error| DocError::Damaging(error.to_string()))?;
        Ok(RecordDoc {
            doc: doc.with_actor(author.actor_id()),
        })
    }

    /// Loads a saved document only to read it: new changes would get a random actor.
    pub(crate) fn load_to_read(bytes: &[u8]) -> Result<RecordDoc, DocError> {
        let doc = crate::guard::no_panic("loading a document", || {
            Automerge::load(bytes).map_err(|error| VerifyError::Change(error.to_string()))
        })
        .map_err(|error| DocError::Damaging(error.to_string()))?;
        Ok(RecordDoc { doc })
    }

    /// The whole document in Automerge's standard binary format, with no column
    /// compressed: a node sends its saved documents to peers as they are (clone by
    /// snapshot, `snapshot.rs`), and a peer loads only uncompressed ones, since Automerge
    /// inflates compressed columns without a bound.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save_nocompress()
    }

    /// The underlying Automerge document.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// The hashes of the latest changes, sorted.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Whether the document holds the change with this hash.
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    /// Hashes behind the heads, nearest first, at most `limit` of them: lets a peer whose
    /// history forked from ours find the last change we share.
    pub fn ancestors(&self, limit: usize) -> Vec<ChangeHash> {
        let mut seen: std::collections::BTreeSet<ChangeHash> = self.heads().into_iter().collect();
        let mut frontier: std::collections::VecDeque<ChangeHash> = seen.iter().copied().collect();
        let mut ancestors = Vec::new();
        while let Some(hash) = frontier.pop_front() {
            let Some(meta) = self.doc.get_change_meta_by_hash(&hash) else {
                continue;
            };
            for dep in meta.deps {
                if ancestors.len() == limit {
                    return ancestors;
                }
                if seen.insert(dep) {
                    ancestors.push(dep);
                    frontier.push_back(dep);
                }
            }
        }
        ancestors
    }

    /// The change with this hash, if the document holds it.
    pub fn change(&self, hash: &ChangeHash) -> Option<Change> {
        self.doc.get_change_by_hash(hash)
    }

    /// Every change not in the history of `have`; hashes the document does not hold are
    /// ignored, so the answer errs towards sending too much, never too little.
    pub fn changes_after(&self, have: &[ChangeHash]) -> Vec<Change> {
        let known: Vec<ChangeHash> = have
            .iter()
            .filter(|hash| self.has_change(hash))
            .copied()
            .collect();
        self.doc.get_changes(&known)
    }

    /// Applies changes whose dependencies the caller has checked are present, all or none.
    ///
    /// The second half of the door for foreign changes (the first is
    /// [`crate::change::read_change`]): whether Automerge panics on a change depends on the
    /// document it meets, so the changes are applied to a copy under a panic guard, and
    /// each must then come back out of the copy as the very bytes that went in (Automerge
    /// rebuilds a change from its op set to serve or save it, and a change it cannot
    /// rebuild would make the document unsavable). Only then does the copy replace the
    /// document; on any failure the document is untouched.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        let hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
        let mut trial = self.doc.clone();
        let result = crate::guard::no_panic("applying a change", || {
            trial
                .apply_changes(changes)
                .map_err(|error| VerifyError::Change(error.to_string()))?;
            for hash in &hashes {
                // A change Automerge queued for a missing dependency is not in the
                // document, and is not this check's concern.
                if trial.get_change_meta_by_hash(hash).is_none() {
                    continue;
                }
                let served = trial.get_change_by_hash(hash).map(|change| change.hash());
                if served != Some(*hash) {
                    return Err(VerifyError::Change(format!(
                        "change {hash} does not come back out of the document as it went in"
                    )));
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                self.doc = trial;
                Ok(())
            }
            Err(VerifyError::Change(reason)) => Err(DocError::Damaging(reason)),
            Err(other) => Err(DocError::Damaging(other.to_string())),
        }
    }

    /// Whether the tombstone is set.
    pub fn deleted(&self) -> bool {
        matches!(
            self.doc.get(ROOT, DELETED_FIELD),
            Ok(Some((Value::Scalar(value), _))) if matches!(value.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// The current value of every user field.
    pub fn fields(&self) -> BTreeMap<String, FieldValue> {
        self.doc
            .keys(ROOT)
            .filter(|key| !key.starts_with('_'))
            .filter_map(|key| {
                let value = self.field(&key)?;
                Some((key, value))
            })
            .collect()
    }

    /// The current value of one field.
    pub fn field(&self, name: &str) -> Option<FieldValue> {
        let (value, object) = self.doc.get(ROOT, name).ok()??;
        self.read_value(value, &object)
    }

    /// Every user field that concurrent writes left with several values, and the values
    /// beside the one shown, each with its author and claimed time.
    pub fn conflicts(&self) -> BTreeMap<String, Vec<OtherValue>> {
        let mut conflicts = BTreeMap::new();
        // The record's changes, read once and only if some field is in conflict.
        let mut changes: Option<Vec<Change>> = None;
        for name in self.doc.keys(ROOT).filter(|key| !key.starts_with('_')) {
            let Ok(values) = self.doc.get_all(ROOT, name.as_str()) else {
                continue;
            };
            if values.len() < 2 {
                continue;
            }
            let shown = self
                .doc
                .get(ROOT, name.as_str())
                .ok()
                .flatten()
                .map(|(_, id)| id);
            let others: Vec<OtherValue> = values
                .into_iter()
                .filter(|(_, id)| Some(id) != shown.as_ref())
                .filter_map(|(value, id)| {
                    let changes = changes.get_or_insert_with(|| self.doc.get_changes(&[]));
                    let (author, time_ms) = op_author(changes, &id)?;
                    Some(OtherValue {
                        value: self.read_value(value, &id),
                        author,
                        author_name: None,
                        time_ms,
                    })
                })
                .collect();
            if !others.is_empty() {
                conflicts.insert(name, others);
            }
        }
        conflicts
    }

    /// A field's value as mesh reads it, from what Automerge holds there.
    fn read_value(&self, value: Value<'_>, object: &automerge::ObjId) -> Option<FieldValue> {
        let object = object.clone();
        match value {
            Value::Scalar(scalar) => match scalar.as_ref() {
                ScalarValue::Str(text) => Some(FieldValue::Str(text.to_string())),
                ScalarValue::Int(number) => Some(FieldValue::Int(*number)),
                ScalarValue::Uint(number) => i64::try_from(*number).ok().map(FieldValue::Int),
                ScalarValue::F64(number) => Some(FieldValue::Float(*number)),
                ScalarValue::Boolean(flag) => Some(FieldValue::Bool(*flag)),
                ScalarValue::Timestamp(ms) => Some(FieldValue::Timestamp(*ms)),
                ScalarValue::Counter(count) => Some(FieldValue::Counter(i64::from(count))),
                _ => None,
            },
            Value::Object(ObjType::Text) => self.doc.text(&object).ok().map(FieldValue::Text),
            Value::Object(ObjType::List) => Some(FieldValue::List(
                self.doc
                    .list_range(&object, ..)
                    .filter_map(|item| match item.value {
                        automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) => {
                            Some(text.to_string())
                        }
                        _ => None,
                    })
                    .collect(),
            )),
            Value::Object(ObjType::Map) => {
                let tagged = |tag| match self.doc.get(&object, tag).ok()?? {
                    (Value::Scalar(scalar), _) => match scalar.as_ref() {
                        ScalarValue::Str(text) => Some(text.to_string()),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(key) = tagged("$ref") {
                    key.parse().ok().map(FieldValue::Ref)
                } else {
                    Decimal::parse(&tagged("$decimal")?)
                        .ok()
                        .map(FieldValue::Decimal)
                }
            }
            Value::Object(_) => None,
        }
    }

    /// The record's fields and tombstone as of `heads` (a change and its history, for a
    /// verdict that must not depend on what arrived since).
    pub fn state_at(
        &self,
        heads: &[ChangeHash],
    ) -> Result<(BTreeMap<String, FieldValue>, bool), DocError> {
        let past = RecordDoc {
            doc: self.doc.fork_at(heads)?,
        };
        Ok((past.fields(), past.deleted()))
    }

    /// The record as read now.
    pub fn view(&self, record: &RecordId) -> RecordView {
        RecordView {
            record: record.clone(),
            fields: self.fields(),
            conflicts: self.conflicts(),
            deleted: self.deleted(),
            heads: self.heads(),
        }
    }

    /// What the record's fields would be after `edit`, without changing anything: lets the
    /// caller check a schema before any change exists.
    pub fn preview(&self, edit: &Edit) -> (BTreeMap<String, FieldValue>, bool) {
        let mut fields = self.fields();
        match edit {
            Edit::Put(updates) => {
                for (name, update) in updates {
                    match update {
                        FieldEdit::Set(value) => {
                            fields.insert(name.clone(), value.clone());
                        }
                        FieldEdit::Remove => {
                            fields.remove(name);
                        }
                        FieldEdit::Add(amount) => {
                            if let Some(FieldValue::Counter(count)) = fields.get_mut(name) {
                                *count = count.wrapping_add(*amount);
                            }
                        }
                    }
                }
                (fields, false)
            }
            Edit::Delete => (fields, true),
        }
    }

    /// Makes one change for `edit`, stamped `time_ms`. Fields whose value is unchanged are
    /// not written, so only changed fields travel; `None` means nothing changed.
    pub fn edit(&mut self, edit: &Edit, time_ms: i64) -> Result<Option<Change>, DocError> {
        if let Edit::Put(updates) = edit {
            if updates.len() > FIELDS_MAX {
                return Err(DocError::TooManyFields);
            }
            for name in updates.keys() {
                check_field_name(name)?;
            }
        }
        let mut tx = self.doc.transaction();
        let result = write_edit(&mut tx, edit);
        if let Err(error) = result {
            tx.rollback();
            return Err(error);
        }
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(time_ms));
        Ok(hash.map(|hash| {
            self.doc
                .get_change_by_hash(&hash)
                .expect("a change just committed is in the document")
        }))
    }
}

impl RecordDoc {
    /// Makes a change that builds on everything the document holds without changing any
    /// field a reader sees (it sets the hidden `_endorsed` field to `version`). A node that
    /// puts a stricter policy in force endorses the records it holds, so the history it has
    /// seen stays accepted history under the new policy.
    pub fn endorse(&mut self, version: u64, time_ms: i64) -> Result<Option<Change>, DocError> {
        let mut tx = self.doc.transaction();
        if let Err(error) = tx.put(ROOT, ENDORSED_FIELD, version) {
            tx.rollback();
            return Err(error.into());
        }
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(time_ms));
        Ok(hash.map(|hash| {
            self.doc
                .get_change_by_hash(&hash)
                .expect("a change just committed is in the document")
        }))
    }
}

fn write_edit(
    tx: &mut automerge::transaction::Transaction<'_>,
    edit: &Edit,
) -> Result<(), DocError> {
    let deleted = matches!(
        tx.get(ROOT, DELETED_FIELD)?,
        Some((Value::Scalar(value), _)) if matches!(value.as_ref(), ScalarValue::Boolean(true))
    );
    match edit {
        Edit::Delete => {
            if !deleted {
                tx.put(ROOT, DELETED_FIELD, true)?;
            }
        }
        Edit::Put(updates) => {
            if deleted {
                tx.put(ROOT, DELETED_FIELD, false)?;
            }
            for (name, update) in updates {
                write_field(tx, name, update)?;
            }
        }
    }
    Ok(())
}

fn write_field(
    tx: &mut automerge::transaction::Transaction<'_>,
    name: &str,
    update: &FieldEdit,
) -> Result<(), DocError> {
    let current = tx.get(ROOT, name)?;
    let is_counter = matches!(&current, Some((Value::Scalar(old), _))
        if matches!(old.as_ref(), ScalarValue::Counter(_)));
    let value = match update {
        FieldEdit::Remove => {
            if current.is_some() {
                tx.delete(ROOT, name)?;
            }
            return Ok(());
        }
        FieldEdit::Add(amount) => {
            if !is_counter {
                return Err(DocError::NotACounter(name.to_owned()));
            }
            if *amount != 0 {
                tx.increment(ROOT, name, *amount)?;
            }
            return Ok(());
        }
        FieldEdit::Set(_) if is_counter => return Err(DocError::CounterSet(name.to_owned())),
        FieldEdit::Set(value) => value,
    };
    let scalar = match value {
        FieldValue::Str(text) => Some(ScalarValue::Str(text.as_str().into())),
        FieldValue::Int(number) => Some(ScalarValue::Int(*number)),
        FieldValue::Float(number) => Some(ScalarValue::F64(*number)),
        FieldValue::Bool(flag) => Some(ScalarValue::Boolean(*flag)),
        FieldValue::Timestamp(ms) => Some(ScalarValue::Timestamp(*ms)),
        FieldValue::Counter(count) => Some(ScalarValue::counter(*count)),
        FieldValue::Text(_) | FieldValue::List(_) | FieldValue::Ref(_) | FieldValue::Decimal(_) => {
            None
        }
    };
    if let Some(scalar) = scalar {
        let unchanged =
            matches!(&current, Some((Value::Scalar(old), _)) if old.as_ref() == &scalar);
        if !unchanged {
            tx.put(ROOT, name, scalar)?;
        }
        return Ok(());
    }
    match value {
        FieldValue::Text(text) => match current {
            // Edit existing text in place so concurrent edits of other parts survive.
            Some((Value::Object(ObjType::Text), object)) => tx.update_text(&object, text)?,
            _ => {
                let object = tx.put_object(ROOT, name, ObjType::Text)?;
                tx.splice_text(&object, 0, 0, text)?;
            }
        },
        FieldValue::List(items) => {
            let same = matches!(&current, Some((Value::Object(ObjType::List), object))
            if tx.length(object) == items.len()
                && tx.list_range(object, ..).zip(items).all(|(item, want)| {
                    matches!(item.value, automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) if text == want.as_str())
                }));
            if !same {
                let object = tx.put_object(ROOT, name, ObjType::List)?;
                for (index, item) in items.iter().enumerate() {
                    tx.insert(&object, index, item.as_str())?;
                }
            }
        }
        FieldValue::Ref(record) => {
            let map = held_map(current);
            write_tagged(tx, name, map, "$ref", record.as_str())?;
        }
        FieldValue::Decimal(decimal) => {
            let map = held_map(current);
            write_tagged(tx, name, map, "$decimal", decimal.as_str())?;
        }
        _ => unreachable!("scalars were written above"),
    }
    Ok(())
}

/// The author of the operation `id` and the time of the change among `changes` that
/// holds it.
fn op_author(changes: &[Change], id: &automerge::ObjId) -> Option<(NodeId, i64)> {
    let automerge::ObjId::Id(counter, actor, _) = id else {
        return None;
    };
    let author = NodeId::from_slice(actor.to_bytes()).ok()?;
    let time_ms = changes
        .iter()
        .find(|change| {
            change.actor_id() == actor
                && (change.start_op().get()..change.start_op().get() + change.len() as u64)
                    .contains(counter)
        })
        .map_or(0, Change::timestamp);
    Some((author, time_ms))
}

/// The map a field holds, if it holds one.
fn held_map(current: Option<(Value<'_>, automerge::ObjId)>) -> Option<automerge::ObjId> {
    match current {
        Some((Value::Object(ObjType::Map), object)) => Some(object),
        _ => None,
    }
}

/// Writes a `{tag: text}` map into field `name`, unless it already holds exactly that.
fn write_tagged(
    tx: &mut automerge::transaction::Transaction<'_>,
    name: &str,
    current: Option<automerge::ObjId>,
    tag: &str,
    text: &str,
) -> Result<(), DocError> {
    let same = matches!(&current, Some(object)
        if tx.length(object) == 1
            && matches!(tx.get(object, tag), Ok(Some((Value::Scalar(held), _)))
                if matches!(held.as_ref(), ScalarValue::Str(held) if held.as_str() == text)));
    if !same {
        let object = tx.put_object(ROOT, name, ObjType::Map)?;
        tx.put(&object, tag, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn put(fields: &[(&str, FieldValue)]) -> Edit {
        Edit::Put(
            fields
                .iter()
                .map(|(name, value)| ((*name).to_owned(), FieldEdit::Set(value.clone())))
                .collect(),
        )
    }

    #[test]
    fn every_field_type_round_trips_through_the_document_and_json() {
        let author = Identity::from_seed(1).node_id();
        let record = RecordId::new("stock", "item-1").unwrap();
        let values = [
            ("name", FieldValue::Str("Paracetamol".into())),
            ("count", FieldValue::Int(-42)),
            ("price", FieldValue::Float(1.5)),
            ("active", FieldValue::Bool(true)),
            ("seen", FieldValue::Timestamp(1_790_000_000_000)),
            ("notes", FieldValue::Text("take with water".into())),
            ("tags", FieldValue::List(vec!["a".into(), "b".into()])),
            (
                "item",
                FieldValue::Ref(RecordId::new("catalogue", "p1").unwrap()),
            ),
            ("on_hand", FieldValue::Counter(7)),
            (
                "unit_price",
                FieldValue::Decimal(Decimal::parse("12.50").unwrap()),
            ),
        ];
        let mut doc = RecordDoc::new(&author);
        doc.edit(&put(&values), 0).unwrap().expect("a change");
        let reloaded = RecordDoc::load(&doc.save(), &author).unwrap();
        let view = reloaded.view(&record);
        for (name, value) in &values {
            assert_eq!(view.fields.get(*name), Some(value), "{name}");
            let json = value.to_json();
            assert_eq!(
                FieldValue::from_json(name, &json).unwrap().as_ref(),
                Some(value)
            );
        }
        assert!(!view.deleted);
    }

    #[test]
    fn an_unchanged_put_makes_no_change_and_a_one_field_put_writes_one_op() {
        let mut doc = RecordDoc::new(&Identity::from_seed(1).node_id());
        let edit = put(&[("a", FieldValue::Int(1)), ("b", FieldValue::Int(2))]);
        assert!(doc.edit(&edit, 0).unwrap().is_some());
        assert!(doc.edit(&edit, 0).unwrap().is_none());
        let change = doc
            .edit(&put(&[("a", FieldValue::Int(3))]), 0)
            .unwrap()
            .unwrap();
        assert_eq!(change.len(), 1, "only the changed field is in the change");
    }

    #[test]
    fn delete_is_a_tombstone_and_a_later_put_restores_the_record() {
        let mut doc = RecordDoc::new(&Identity::from_seed(1).node_id());
        doc.edit(&put(&[("a", FieldValue::Int(1))]), 0).unwrap();
        doc.edit(&Edit::Delete, 0).unwrap();
        assert!(doc.deleted());
        doc.edit(&put(&[("b", FieldValue::Int(1))]), 0).unwrap();
        assert!(!doc.deleted());
    }

    #[test]
    fn invalid_names_are_refused_with_the_rule() {
        assert!(RecordId::new("Stock", "x").is_err());
        assert!(RecordId::new("stock", "a/b").is_err());
        assert!("stock".parse::<RecordId>().is_err());
        let mut doc = RecordDoc::new(&Identity::from_seed(1).node_id());
        let error = doc
            .edit(&put(&[("_deleted", FieldValue::Bool(false))]), 0)
            .unwrap_err();
        assert!(error.to_string().contains("_deleted"), "{error}");
    }

    fn add(name: &str, amount: i64) -> Edit {
        Edit::Put([(name.to_owned(), FieldEdit::Add(amount))].into())
    }

    #[test]
    fn concurrent_increments_of_a_counter_add_up_in_both_orders() {
        let (a, b) = (
            Identity::from_seed(1).node_id(),
            Identity::from_seed(2).node_id(),
        );
        let mut first = RecordDoc::new(&a);
        first
            .edit(&put(&[("count", FieldValue::Counter(10))]), 0)
            .unwrap();
        let mut second = RecordDoc::load(&first.save(), &b).unwrap();
        let plus = first.edit(&add("count", 5), 0).unwrap().unwrap();
        let minus = second.edit(&add("count", -3), 0).unwrap().unwrap();
        first.apply(vec![minus]).unwrap();
        second.apply(vec![plus]).unwrap();
        assert_eq!(first.field("count"), Some(FieldValue::Counter(12)));
        assert_eq!(second.field("count"), Some(FieldValue::Counter(12)));
        let reloaded = RecordDoc::load(&second.save(), &a).unwrap();
        assert_eq!(reloaded.field("count"), Some(FieldValue::Counter(12)));
    }

    #[test]
    fn a_counter_refuses_being_set_and_only_a_counter_takes_an_increment() {
        let mut doc = RecordDoc::new(&Identity::from_seed(1).node_id());
        doc.edit(
            &put(&[
                ("count", FieldValue::Counter(1)),
                ("plain", FieldValue::Int(4)),
            ]),
            0,
        )
        .unwrap();
        let set = doc
            .edit(&put(&[("count", FieldValue::Int(9))]), 0)
            .unwrap_err();
        assert!(
            matches!(set, DocError::CounterSet(ref name) if name == "count"),
            "{set}"
        );
        assert!(set.to_string().contains("$inc"), "{set}");
        let again = doc.edit(&put(&[("count", FieldValue::Counter(9))]), 0);
        assert!(matches!(again, Err(DocError::CounterSet(_))));
        let inc = doc.edit(&add("plain", 1), 0).unwrap_err();
        assert!(
            matches!(inc, DocError::NotACounter(ref name) if name == "plain"),
            "{inc}"
        );
        assert!(matches!(
            doc.edit(&add("absent", 1), 0),
            Err(DocError::NotACounter(_))
        ));
        assert_eq!(
            doc.field("count"),
            Some(FieldValue::Counter(1)),
            "nothing written"
        );
        assert!(
            doc.edit(&add("count", 0), 0).unwrap().is_none(),
            "adding 0 changes nothing"
        );
        let removed = Edit::Put([("count".to_owned(), FieldEdit::Remove)].into());
        doc.edit(&removed, 0).unwrap().unwrap();
        assert_eq!(doc.field("count"), None, "a counter can be removed");
    }

    #[test]
    fn json_asks_for_an_increment_with_inc_and_a_counter_with_counter() {
        use serde_json::json;
        assert_eq!(
            FieldEdit::from_json("c", &json!({"$inc": -3})).unwrap(),
            FieldEdit::Add(-3)
        );
        assert_eq!(
            FieldEdit::from_json("c", &json!({"$counter": 5})).unwrap(),
            FieldEdit::Set(FieldValue::Counter(5))
        );
        assert_eq!(
            FieldEdit::from_json("c", &Json::Null).unwrap(),
            FieldEdit::Remove
        );
        assert_eq!(
            FieldEdit::from_json("c", &json!(1e5)).unwrap(),
            FieldEdit::Set(FieldValue::Float(1e5))
        );
        assert!(FieldEdit::from_json("c", &json!({"$inc": 1.5})).is_err());
        assert!(FieldEdit::from_json("c", &json!({"$inc": 1, "$x": 2})).is_err());
        assert!(FieldEdit::from_json("c", &json!({"$counter": "5"})).is_err());
        assert_eq!(FieldValue::Counter(5).to_json(), json!({"$counter": 5}));
    }

    #[test]
    fn concurrent_values_of_a_field_are_listed_beside_the_one_shown_until_it_is_written() {
        let (a, b) = (
            Identity::from_seed(1).node_id(),
            Identity::from_seed(2).node_id(),
        );
        let mut first = RecordDoc::new(&a);
        first
            .edit(&put(&[("count", FieldValue::Int(50))]), 1)
            .unwrap();
        let mut second = RecordDoc::load(&first.save(), &b).unwrap();
        let ninety = first
            .edit(&put(&[("count", FieldValue::Int(90))]), 2)
            .unwrap()
            .unwrap();
        let seventy = second
            .edit(&put(&[("count", FieldValue::Int(70))]), 3)
            .unwrap()
            .unwrap();
        first.apply(vec![seventy]).unwrap();
        second.apply(vec![ninety]).unwrap();
        let record = RecordId::new("stock", "s1").unwrap();
        let (one, two) = (first.view(&record), second.view(&record));
        assert_eq!(one.fields, two.fields, "the same value wins on both");
        assert_eq!(one.conflicts, two.conflicts);
        let shown = one.fields["count"].clone();
        let others = &one.conflicts["count"];
        assert_eq!(others.len(), 1);
        let other = &others[0];
        let (loser, author, time) = if shown == FieldValue::Int(90) {
            (FieldValue::Int(70), b, 3)
        } else {
            (FieldValue::Int(90), a, 2)
        };
        assert_eq!(
            (other.value.clone(), other.author, other.time_ms),
            (Some(loser), author, time)
        );
        assert!(one.to_json()["conflicts"]["count"][0]["author"].is_string());
        first
            .edit(&put(&[("count", FieldValue::Int(75))]), 4)
            .unwrap();
        assert!(first.conflicts().is_empty(), "a later write resolves it");
    }

    #[test]
    fn json_refuses_mixed_lists_and_unknown_tags() {
        let error = FieldValue::from_json("tags", &serde_json::json!(["a", 1])).unwrap_err();
        assert_eq!(error.field, "tags");
        assert!(FieldValue::from_json("x", &serde_json::json!({"$what": 1})).is_err());
        assert_eq!(FieldValue::from_json("x", &Json::Null).unwrap(), None);
    }
}
