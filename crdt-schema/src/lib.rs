//! The pure data model of mesh: identities, records, field schemas and signed changes.
//!
//! This crate does no IO, reads no clock and draws no entropy; everything here is a
//! function of its arguments, which is what lets every node reach the same verdict on the
//! same change.
//!
//! - [`identity`]: ed25519 node keys ([`Identity`], [`NodeId`]) and the org id.
//! - [`record`]: one Automerge document per record ([`RecordDoc`]), typed fields
//!   ([`FieldValue`]), edits and the tombstone, and the JSON form of a record.
//! - [`schema`]: per-collection field schemas and the check of a record against one.
//! - [`change`]: the signed envelope every change travels and is stored in.
//! - [`policy`]: the org's signed policy and the verdict on a change.
//!
//! A node makes a change with [`RecordDoc::edit`], signs it with [`VerifiedChange::sign`],
//! and ships [`VerifiedChange::envelope`]. A receiver calls [`Envelope::verify`] before
//! looking at anything else, and applies only a [`VerifiedChange`].

pub mod change;
pub mod crafted;
pub mod decimal;
pub mod guard;
pub mod identity;
pub mod policy;
pub mod record;
pub mod schema;
pub mod snapshot;
mod verify;

pub use automerge::{Change, ChangeHash};
pub use change::{
    Envelope, KeyCache, ParsedEnvelope, VerifiedCache, VerifiedChange, VerifyError, verify_all,
};
pub use decimal::Decimal;
pub use identity::{Identity, NodeId, OrgId};
pub use record::{Edit, FieldEdit, FieldValue, OtherValue, RecordDoc, RecordId, RecordView};
pub use schema::{CollectionSchema, FieldSchema, FieldType, SchemaError};
