//! `mesh quarantine`: changes the policy rejected, and changes refused on arrival.

use mesh_core::status::{QuarantineRow, RefusedChange};

use super::Context;
use super::output::{ago, plural, print_or, print_table, short};
use crate::client::ClientError;
use crate::replies::QuarantineReply;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let reply: QuarantineReply = context.client()?.get_as("/v1/quarantine")?;
    print_or(args.json, &reply, |reply| {
        print_quarantine(&reply.quarantine, &reply.refused)
    });
    Ok(())
}

fn print_quarantine(rows: &[QuarantineRow], refused: &[RefusedChange]) {
    if rows.is_empty() {
        out!("quarantine is empty: every change held was accepted");
    } else {
        let table = rows
            .iter()
            .map(|row| {
                let author = match &row.author_name {
                    Some(name) => name.clone(),
                    None => format!("{}…", short(Some(&row.author.to_string()), 14)),
                };
                vec![
                    row.record.clone(),
                    format!("{}…", short(Some(&row.change), 12)),
                    author,
                    row.reason_text.clone(),
                ]
            })
            .collect();
        print_table(&["record", "change", "author", "reason"], table, &[]);
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
                ago(Some(row.at.as_millis())),
                short(Some(&row.from.to_string()), 14),
                row.reason
            );
        }
    }
}
