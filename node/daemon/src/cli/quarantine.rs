//! `mesh quarantine`: changes the policy rejected, and changes refused on arrival.

use serde_json::Value;

use super::Context;
use super::output::{ago, plural, print_or, short};
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let rows = context.client()?.get("/v1/quarantine")?;
    print_or(args.json, &rows, |value| {
        let list = |name: &str| value[name].as_array().cloned().unwrap_or_default();
        print_quarantine(&list("quarantine"), &list("refused"));
    });
    Ok(())
}

fn print_quarantine(rows: &[Value], refused: &[Value]) {
    if rows.is_empty() {
        out!("quarantine is empty: every change held was accepted");
    } else {
        out!("{:<28} {:<14} {:<18} reason", "record", "change", "author");
        for row in rows {
            let author = match row["author_name"].as_str() {
                Some(name) => name.to_owned(),
                None => format!("{}…", short(row["author"].as_str(), 14)),
            };
            out!(
                "{:<28} {:<14} {:<18} {}",
                row["record"].as_str().unwrap_or("?"),
                format!("{}…", short(row["change"].as_str(), 12)),
                author,
                row["reason_text"].as_str().unwrap_or("?")
            );
        }
        out!(
            "{} in quarantine; they are never applied",
            plural(rows.len(), "change")
        );
    }
    if !refused.is_empty() {
        out!("");
        out!("refused on arrival (not held; the sender was disconnected):");
        for row in refused.iter().rev().take(20) {
            out!(
                "  {:<12} from {}…: {}",
                ago(row["at"].as_u64()),
                short(row["from"].as_str(), 14),
                row["reason"].as_str().unwrap_or("?")
            );
        }
    }
}
