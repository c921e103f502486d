//! `mesh list`: the live records of a collection.

use super::Context;
use super::output::{print_or, print_record};
use crate::client::ClientError;
use crate::replies::RecordsReply;

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let collection = args.collection;
    crdt_schema::record::check_collection(&collection).map_err(anyhow::Error::from)?;
    let list: RecordsReply = context
        .client()?
        .get_as(&format!("/v1/records/{collection}"))?;
    print_or(args.json, &list, |list| {
        if list.records.is_empty() {
            out!("no live records in {collection}");
        }
        for record in &list.records {
            print_record(record);
        }
    });
    Ok(())
}
