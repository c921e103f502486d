//! `mesh status`: the node at a glance.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Context;
use super::output::{ago, plural, print_or, short};
use super::peers::{print_peers, print_pending};
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let status = context.client()?.get("/v1/status")?;
    print_or(args.json, &status, print_status);
    Ok(())
}

fn print_status(status: &Value) {
    out!(
        "node      {}  ({})",
        status["name"].as_str().unwrap_or("?"),
        status["node_id"].as_str().unwrap_or("?")
    );
    out!("api       {}", status["api_addr"].as_str().unwrap_or("?"));
    let listen: Vec<&str> = status["listen_addrs"]
        .as_array()
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out!(
        "listen    {}",
        if listen.is_empty() {
            "not yet".to_owned()
        } else {
            listen.join(", ")
        }
    );
    let records: BTreeMap<String, u64> =
        serde_json::from_value(status["records"].clone()).unwrap_or_default();
    let total: u64 = records.values().sum();
    let by_collection: Vec<String> = records
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
    out!("digest    {}", status["digest"].as_str().unwrap_or("?"));
    let since_start = |ms: Option<u64>| ms.map_or("not since start".to_owned(), |ms| ago(Some(ms)));
    out!(
        "changed   here {}, from peers {}",
        since_start(status["last_local_change"].as_u64()),
        since_start(status["last_remote_change"].as_u64())
    );
    out!("last sync {}", ago(status["last_sync"].as_u64()));
    let counters = &status["counters"];
    let count = |value: &Value| value.as_u64().unwrap_or(0) as usize;
    out!(
        "rejected  {}, {}; {} in quarantine",
        plural(count(&counters["changes_rejected"]), "change"),
        plural(count(&counters["messages_rejected"]), "message"),
        count(&status["quarantined_changes"])
    );
    match status["policy"].as_object() {
        Some(policy) => {
            out!(
                "policy    version {}, {}",
                policy["version"],
                plural(count(&policy["members"]), "member")
            );
            if let Some(conflict) = policy["conflict"].as_object() {
                out!(
                    "  WARNING two different policies claim version {}: {}… is in force, {}… lost the tie; sign a higher version",
                    conflict["version"],
                    short(conflict["kept"].as_str(), 12),
                    short(conflict["other"].as_str(), 12)
                );
            }
        }
        None if status["open"].as_bool() == Some(true) => {
            out!("policy    none");
            out!(
                "  WARNING this node is open (made with --open): anyone who reaches its port reads and writes every record"
            );
        }
        None => out!("policy    none (only trusted peers may connect: `mesh peers approve ID`)"),
    }
    let own = status["own_changes_rejected"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // One line per change, naming every node that rejected it (this node included).
    let mut rejections: BTreeMap<(String, String), (String, Vec<String>)> = BTreeMap::new();
    for row in &own {
        let key = (
            row["record"].as_str().unwrap_or("?").to_owned(),
            row["change"].as_str().unwrap_or("?").to_owned(),
        );
        let by = if row["rejected_by"] == status["node_id"] {
            "this node".to_owned()
        } else {
            short(row["rejected_by"].as_str(), 14).to_owned() + "…"
        };
        let entry = rejections
            .entry(key)
            .or_insert_with(|| (row["reason"].as_str().unwrap_or("?").to_owned(), Vec::new()));
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
    let refused = status["refused_connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !refused.is_empty() && !status["policy"].is_null() {
        out!("refused non-members:");
        for row in &refused {
            out!(
                "  {} ({}, last {})",
                row["peer_id"].as_str().unwrap_or("?"),
                plural(count(&row["attempts"]), "attempt"),
                ago(row["last_at"].as_u64())
            );
        }
    }
    print_peers(&status["peers"]);
    print_pending(&json!({
        "pending": if status["policy"].is_null() { refused } else { Vec::new() },
    }));
}
