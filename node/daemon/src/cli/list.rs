//! `mesh list`: the live records of a collection, fetched a page at a time.

use super::Context;
use super::output::{print_or, print_record};
use crate::client::{Client, ClientError};
use crate::replies::RecordsReply;

/// Records asked for in one page (the API's largest page).
pub(super) const PAGE: usize = 1000;

/// One page of at most `limit` of a collection's live records, after the id `after`.
pub(super) fn fetch_page(
    client: &Client,
    collection: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<RecordsReply, ClientError> {
    let mut path = format!("/v1/records/{collection}?limit={limit}");
    if let Some(after) = after {
        let after =
            percent_encoding::utf8_percent_encode(after, percent_encoding::NON_ALPHANUMERIC);
        path.push_str(&format!("&after={after}"));
    }
    client.get_as(&path)
}

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// Print at most this many records; by default every one.
    #[arg(long)]
    limit: Option<usize>,
    /// Start after this record id (the one a limited listing says to go on after).
    #[arg(long)]
    after: Option<String>,
    /// Print JSON: `{"records": [...], "next": ID or null}`.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let collection = args.collection;
    crdt_schema::record::check_collection(&collection).map_err(anyhow::Error::from)?;
    let client = context.client()?;
    let mut all = RecordsReply {
        records: Vec::new(),
        next: args.after,
    };
    let mut listed = 0;
    let mut first = true;
    loop {
        let wanted = args.limit.map_or(PAGE, |limit| (limit - listed).min(PAGE));
        if wanted == 0 || (!first && all.next.is_none()) {
            break;
        }
        first = false;
        let page = fetch_page(&client, &collection, all.next.as_deref(), wanted)?;
        listed += page.records.len();
        all.next = page.next;
        if args.json {
            all.records.extend(page.records);
        } else {
            // Printed as pages arrive: a large collection shows at once and costs one page.
            page.records.iter().for_each(print_record);
        }
    }
    print_or(args.json, &all, |all| {
        if listed == 0 {
            out!("no live records in {collection}");
        }
        if let Some(next) = &all.next {
            out!("more records follow: mesh list {collection} --after {next}");
        }
    });
    Ok(())
}
