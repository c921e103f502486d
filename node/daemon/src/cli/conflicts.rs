//! `mesh conflicts`: the records whose fields concurrent writes left with several values.

use super::Context;
use super::list::{PAGE, fetch_page};
use super::output::{plural, print_or, print_record};
use crate::client::ClientError;
use crate::replies::RecordReply;

#[derive(clap::Args)]
pub struct Args {
    /// Only this collection; by default every collection the node holds.
    collection: Option<String>,
    /// Print JSON: the records in conflict, as `mesh get --json` prints each.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let client = context.client()?;
    let collections: Vec<String> = match args.collection {
        Some(collection) => {
            crdt_schema::record::check_collection(&collection).map_err(anyhow::Error::from)?;
            vec![collection]
        }
        None => {
            let status = client.get("/v1/status")?;
            status["records"]
                .as_object()
                .map(|records| records.keys().cloned().collect())
                .unwrap_or_default()
        }
    };
    let mut in_conflict: Vec<RecordReply> = Vec::new();
    for collection in &collections {
        let mut after: Option<String> = None;
        loop {
            let page = fetch_page(&client, collection, after.as_deref(), PAGE)?;
            for record in page.records {
                if record.conflicts.is_empty() {
                    continue;
                }
                if !args.json {
                    // Printed as found: a large collection shows its conflicts at once.
                    print_record(&record);
                }
                in_conflict.push(record);
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    print_or(args.json, &in_conflict, |records| {
        let fields: usize = records.iter().map(|record| record.conflicts.len()).sum();
        if records.is_empty() {
            out!("no conflicts: every field has one value");
        } else {
            out!(
                "{} in conflict ({}); writing a field again resolves it everywhere",
                plural(records.len(), "record"),
                plural(fields, "field")
            );
        }
    });
    Ok(())
}
