//! `mesh delete`: a tombstone that syncs like an edit.

use serde_json::Value;

use super::output::print_written;
use super::{Context, record_path};
use crate::client::ClientError;
use crate::replies::WrittenReply;

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// The record id.
    id: String,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let written: WrittenReply = context.client()?.send_as(
        "DELETE",
        &record_path(&args.collection, &args.id)?,
        &Value::Null,
    )?;
    print_written(&written, "deleted");
    Ok(())
}
