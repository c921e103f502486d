//! `mesh watch`: record changes as they happen.

use serde_json::Value;

use super::Context;
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Only this collection.
    collection: Option<String>,
    /// Print each change as a line of JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let Args { collection, json } = args;
    let client = context.client()?;
    if let Some(collection) = &collection {
        crdt_schema::record::check_collection(collection).map_err(anyhow::Error::from)?;
    }
    let path = match &collection {
        Some(collection) => format!("/v1/changes?collection={collection}"),
        None => "/v1/changes".to_owned(),
    };
    eprintln!(
        "watching {}; Ctrl-C stops",
        collection.as_deref().unwrap_or("every collection")
    );
    client.follow(&path, |line| {
        if json {
            out!("{line}");
            return;
        }
        let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        match event["record"].as_str() {
            Some(record) => {
                let from = event["from"]
                    .as_str()
                    .map_or("here".to_owned(), |peer| format!("from {peer}"));
                out!("{record} changed {from}");
            }
            None => out!("{line}"),
        }
    })?;
    Ok(())
}
