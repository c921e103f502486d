//! `mesh history`: sync sessions, newest first, a page at a time.

use std::collections::BTreeMap;

use crdt_schema::NodeId;
use mesh_core::{SyncOutcome, SyncRecord};
use serde_json::json;

use super::Context;
use super::output::{ago, plural, print_or, print_table, short};
use crate::client::ClientError;
use crate::replies::{HistoryReply, PeersReply};

#[derive(clap::Args)]
pub struct Args {
    /// Rows per page.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Page number, from 1 (newest first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    page: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let Args { limit, page, json } = args;
    let client = context.client()?;
    let rows = client.get_as::<HistoryReply>("/v1/history")?.history;
    let names: BTreeMap<NodeId, String> = client
        .get_as::<PeersReply>("/v1/peers")?
        .peers
        .into_iter()
        .filter_map(|peer| Some((peer.peer_id, peer.name?)))
        .collect();
    let (limit, page) = (limit as usize, page as usize);
    let start = limit.saturating_mul(page - 1);
    let page_rows: Vec<SyncRecord> = rows.iter().skip(start).take(limit).cloned().collect();
    print_or(
        json,
        &json!({ "history": page_rows, "total": rows.len(), "page": page, "limit": limit }),
        |_| {
            if page_rows.is_empty() && !rows.is_empty() {
                out!(
                    "no sessions on page {page}: {} in all, {limit} per page ({} {})",
                    plural(rows.len(), "session"),
                    rows.len().div_ceil(limit),
                    if rows.len().div_ceil(limit) == 1 {
                        "page"
                    } else {
                        "pages"
                    }
                );
            } else {
                print_history(&page_rows, rows.len(), &names);
            }
        },
    );
    Ok(())
}

/// Changes moved, with how many records of them went whole (clone by snapshot).
fn with_whole(changes: u64, records_whole: u64) -> String {
    match records_whole {
        0 => changes.to_string(),
        whole => format!("{changes} ({whole} records whole)"),
    }
}

fn print_history(rows: &[SyncRecord], total: usize, names: &BTreeMap<NodeId, String>) {
    if rows.is_empty() {
        out!("no sync sessions yet");
        return;
    }
    let table = rows
        .iter()
        .map(|row| {
            let took = row
                .ended
                .as_millis()
                .saturating_sub(row.started.as_millis());
            let status = match row.outcome {
                SyncOutcome::Completed => "completed",
                SyncOutcome::Error(_) => "error",
                SyncOutcome::Aborted => "aborted",
            };
            let id = row.peer.to_string();
            let peer = match names.get(&row.peer) {
                Some(name) => format!("{name} ({}…)", short(Some(&id), 14)),
                None => id,
            };
            vec![
                ago(Some(row.started.as_millis())),
                format!("{took} ms"),
                status.to_owned(),
                with_whole(row.changes_received, row.snapshots_received),
                with_whole(row.changes_sent, row.snapshots_sent),
                (row.bytes_received + row.bytes_sent).to_string(),
                peer,
            ]
        })
        .collect();
    print_table(
        &[
            "started", "took", "status", "received", "sent", "bytes", "peer",
        ],
        table,
        &[3, 4, 5],
    );
    out!("{} of {}", rows.len(), plural(total, "session"));
}
