//! The API's replies as types, shared by the handlers that send them (`api.rs`) and the CLI
//! that reads them (`cli/`): a field renamed on one side fails to compile on the other,
//! instead of printing "?" at run time.

use mesh_core::status::{PeerStatus, SyncRecord};
use mesh_core::status::{QuarantineRow, RefusedChange, RefusedPeer};
use std::collections::BTreeMap;

use crdt_schema::{NodeId, RecordView};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /v1/status`: the core's status and what only the daemon knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// The core's view of the node.
    #[serde(flatten)]
    pub status: mesh_core::Status,
    /// The node's name from `config.toml`.
    pub name: String,
    /// The same as `counters.changes_rejected`.
    pub rejected_changes: u64,
    /// Where the API listens.
    pub api_addr: String,
    /// Where the node listens for peers, once known.
    pub listen_addrs: Vec<String>,
}

/// `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersReply {
    /// Every peer the node knows.
    pub peers: Vec<PeerStatus>,
    /// Keys waiting for `mesh peers approve` (only while no policy is in force).
    pub pending: Vec<RefusedPeer>,
    /// Whether the node admits every key (`mesh init --open`, no policy).
    pub open: bool,
}

/// `GET /v1/history`: sync sessions, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryReply {
    /// The sessions.
    pub history: Vec<SyncRecord>,
}

/// `GET /v1/quarantine`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineReply {
    /// Changes the policy rejected, held.
    pub quarantine: Vec<QuarantineRow>,
    /// Changes refused on arrival (bad signature, malformed): not held.
    pub refused: Vec<RefusedChange>,
}

/// `GET /v1/records/{collection}/{id}`: one record as the API shows it. Fields are in
/// the API's JSON form (`{"$timestamp": ms}` and the like, see `FieldValue::to_json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordReply {
    /// The collection.
    pub collection: String,
    /// Whether the record is deleted (a tombstone).
    pub deleted: bool,
    /// The fields.
    pub fields: BTreeMap<String, Value>,
    /// The record's durable heads, hex.
    pub heads: Vec<String>,
    /// The record id within the collection.
    pub id: String,
    /// Fields whose concurrent writes left other values beside the one shown: per field,
    /// those values with `value`, `author`, `author_name` and `time_ms`. Absent when
    /// nothing is in conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, Vec<OtherValueReply>>,
}

/// One value a conflict left beside the one shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherValueReply {
    /// The value, in the API's JSON form (`null` if of a kind mesh does not read).
    pub value: Value,
    /// Its author's node id.
    pub author: String,
    /// Its author's name, where the node knows it.
    pub author_name: Option<String>,
    /// When its author's clock says it was written, ms since 1970.
    pub time_ms: i64,
}

impl From<&RecordView> for RecordReply {
    fn from(view: &RecordView) -> RecordReply {
        RecordReply {
            collection: view.record.collection().to_owned(),
            deleted: view.deleted,
            fields: view
                .fields
                .iter()
                .map(|(name, value)| (name.clone(), value.to_json()))
                .collect(),
            heads: view.heads.iter().map(ToString::to_string).collect(),
            id: view.record.id().to_owned(),
            conflicts: serde_json::from_value(view.conflicts_json())
                .expect("the conflicts' JSON is an OtherValueReply map"),
        }
    }
}

/// `GET /v1/records/{collection}`: a page of its live records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordsReply {
    /// The records, by id.
    pub records: Vec<RecordReply>,
    /// The id to ask the next page after (`?after=`); `None` on the last page.
    pub next: Option<String>,
}

/// `PUT` or `DELETE /v1/records/{collection}/{id}`: what the write did, once durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenReply {
    /// The new change, hex; `None` when the write changed nothing.
    pub change: Option<String>,
    /// Whether the record changed.
    pub changed: bool,
    /// The record's heads after the write, hex.
    pub heads: Vec<String>,
    /// The record, `collection/id`.
    pub record: String,
}

/// `POST /v1/peers/approve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedReply {
    /// The peer now trusted.
    pub peer: NodeId,
    /// Whether it was not trusted before.
    pub newly: bool,
    /// Whether a policy is in force (its members are admitted, whoever is trusted).
    pub policy_in_force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_schema::{FieldValue, RecordId};

    #[test]
    fn a_record_reply_is_the_json_the_api_always_sent() {
        let view = RecordView {
            record: "stock/s1".parse::<RecordId>().unwrap(),
            fields: BTreeMap::from([
                ("count".to_owned(), FieldValue::Int(3)),
                ("name".to_owned(), FieldValue::Str("gauze".into())),
                ("at".to_owned(), FieldValue::Timestamp(5)),
            ]),
            deleted: false,
            heads: Vec::new(),
            conflicts: BTreeMap::from([(
                "count".to_owned(),
                vec![crdt_schema::OtherValue {
                    value: Some(FieldValue::Int(4)),
                    author: crdt_schema::Identity::from_seed(2).node_id(),
                    author_name: Some("clinic".into()),
                    time_ms: 7,
                }],
            )]),
        };
        let reply = serde_json::to_value(RecordReply::from(&view)).unwrap();
        assert_eq!(reply, view.to_json());
        let back: RecordReply = serde_json::from_value(reply).unwrap();
        assert_eq!(back.fields["at"], serde_json::json!({"$timestamp": 5}));
    }
}
