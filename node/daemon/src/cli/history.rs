//! `mesh history`: sync sessions, newest first, a page at a time.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Context;
use super::output::{ago, plural, print_or, short};
use crate::client::ClientError;

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
    let history = client.get("/v1/history")?;
    let names: BTreeMap<String, String> = client.get("/v1/peers")?["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|peer| {
            Some((
                peer["peer_id"].as_str()?.to_owned(),
                peer["name"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let rows = history["history"].as_array().cloned().unwrap_or_default();
    let (limit, page) = (limit as usize, page as usize);
    let start = limit.saturating_mul(page - 1);
    let page_rows: Vec<Value> = rows.iter().skip(start).take(limit).cloned().collect();
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

fn print_history(rows: &[Value], total: usize, names: &BTreeMap<String, String>) {
    if rows.is_empty() {
        out!("no sync sessions yet");
        return;
    }
    out!(
        "{:<14} {:<10} {:<10} {:>8} {:>8} {:>10}  peer",
        "started",
        "took",
        "status",
        "received",
        "sent",
        "bytes"
    );
    for row in rows {
        let started = row["started"].as_u64();
        let took = row["ended"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(started.unwrap_or(0));
        out!(
            "{:<14} {:<10} {:<10} {:>8} {:>8} {:>10}  {}",
            ago(started),
            format!("{took} ms"),
            row["outcome"]["status"].as_str().unwrap_or("?"),
            row["changes_received"].as_u64().unwrap_or(0),
            row["changes_sent"].as_u64().unwrap_or(0),
            row["bytes_received"].as_u64().unwrap_or(0) + row["bytes_sent"].as_u64().unwrap_or(0),
            match row["peer"].as_str().map(|id| (id, names.get(id))) {
                Some((id, Some(name))) => format!("{name} ({}…)", short(Some(id), 14)),
                Some((id, None)) => id.to_owned(),
                None => "?".to_owned(),
            }
        );
    }
    out!("{} of {}", rows.len(), plural(total, "session"));
}
