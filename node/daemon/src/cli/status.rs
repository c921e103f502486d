//! `mesh status`: the node at a glance.

use std::collections::BTreeMap;

use mesh_core::Instant;

use super::Context;
use super::output::{ago, plural, print_or, short};
use super::peers::{print_peers, print_pending};
use crate::client::ClientError;
use crate::replies::StatusReply;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let status: StatusReply = context.client()?.get_as("/v1/status")?;
    print_or(args.json, &status, print_status);
    Ok(())
}

fn print_status(reply: &StatusReply) {
    let status = &reply.status;
    out!("node      {}  ({})", reply.name, status.node_id);
    out!("api       {}", reply.api_addr);
    out!(
        "listen    {}",
        if reply.listen_addrs.is_empty() {
            "not yet".to_owned()
        } else {
            reply.listen_addrs.join(", ")
        }
    );
    let total: u64 = status.records.values().sum();
    let by_collection: Vec<String> = status
        .records
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    out!(
        "records   {total}{}",
        if by_collection.is_empty() {
            String::new()
        } else {
            format!("  ({})", by_collection.join(", "))
        }
    );
    out!("digest    {}", status.digest);
    let since_start = |at: Option<Instant>| {
        at.map_or("not since start".to_owned(), |at| ago(Some(at.as_millis())))
    };
    out!(
        "changed   here {}, from peers {}",
        since_start(status.last_local_change),
        since_start(status.last_remote_change)
    );
    out!(
        "last sync {}",
        ago(status.last_sync.map(|at| at.as_millis()))
    );
    let counters = &status.counters;
    out!(
        "rejected  {}, {}; {} in quarantine",
        plural(counters.changes_rejected as usize, "change"),
        plural(counters.messages_rejected as usize, "message"),
        status.quarantined_changes
    );
    match &status.policy {
        Some(policy) => {
            out!(
                "policy    version {}, {}",
                policy.version,
                plural(policy.members as usize, "member")
            );
            if let Some(conflict) = &policy.conflict {
                out!(
                    "  WARNING two different policies claim version {}: {}… is in force, {}… lost the tie; sign a higher version",
                    conflict.version,
                    short(Some(&conflict.kept), 12),
                    short(Some(&conflict.other), 12)
                );
            }
        }
        None if status.open => {
            out!("policy    none");
            out!(
                "  WARNING this node is open (made with --open): anyone who reaches its port reads and writes every record"
            );
        }
        None => out!("policy    none (only trusted peers may connect: `mesh peers approve ID`)"),
    }
    // One line per change, naming every node that rejected it (this node included).
    let mut rejections: BTreeMap<(&str, &str), (&str, Vec<String>)> = BTreeMap::new();
    for row in &status.own_changes_rejected {
        let by = if row.rejected_by == status.node_id {
            "this node".to_owned()
        } else {
            short(Some(&row.rejected_by.to_string()), 14).to_owned() + "…"
        };
        let entry = rejections
            .entry((row.record.as_str(), row.change.as_str()))
            .or_insert_with(|| (row.reason.as_str(), Vec::new()));
        if !entry.1.contains(&by) {
            entry.1.push(by);
        }
    }
    if !rejections.is_empty() {
        out!("own changes rejected ({}):", rejections.len());
        for ((record, change), (reason, by)) in rejections.iter().take(5) {
            out!(
                "  {record} {}…: {reason} (by {})",
                short(Some(change), 12),
                by.join(", ")
            );
        }
        if rejections.len() > 5 {
            out!("  … and {} more: mesh quarantine", rejections.len() - 5);
        }
    }
    let refused = &status.refused_connections;
    if !refused.is_empty() && status.policy.is_some() {
        out!("refused non-members:");
        for row in refused {
            out!(
                "  {} ({}, last {})",
                row.peer_id,
                plural(row.attempts as usize, "attempt"),
                ago(Some(row.last_at.as_millis()))
            );
        }
    }
    print_peers(&status.peers);
    if status.policy.is_none() {
        print_pending(refused);
    }
}
