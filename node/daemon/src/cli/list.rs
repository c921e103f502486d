//! `mesh list`: the live records of a collection.

use super::Context;
use super::output::{print_or, print_record};
use crate::client::ClientError;

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
    let list = context
        .client()?
        .get(&format!("/v1/records/{collection}"))?;
    print_or(args.json, &list, |value| {
        let records = value["records"].as_array().cloned().unwrap_or_default();
        if records.is_empty() {
            out!("no live records in {collection}");
        }
        for record in &records {
            print_record(record);
        }
    });
    Ok(())
}
