//! `mesh get`: read a record.

use super::output::{print_or, print_record};
use super::{Context, record_path};
use crate::client::ClientError;
use crate::replies::RecordReply;

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// The record id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let record: RecordReply = context
        .client()?
        .get_as(&record_path(&args.collection, &args.id)?)?;
    print_or(args.json, &record, print_record);
    Ok(())
}
