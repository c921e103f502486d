//! `mesh peers`: peers and their connection state; `mesh peers approve`.

use anyhow::anyhow;
use serde_json::{Value, json};

use super::Context;
use super::output::{ago, plural, print_or};
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Trust a peer: without a policy, a node admits only peers it trusts. The id is the
    /// one `mesh peers` lists as pending, or the other node's `mesh init` printed.
    Approve {
        /// The peer's node id (12D3KooW…).
        id: String,
    },
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    match args.command {
        Some(Command::Approve { id }) => {
            let id = id.trim();
            id.parse::<crdt_schema::NodeId>()
                .map_err(|error| anyhow!("`{id}` is not a node id: {error}"))?;
            let reply =
                context
                    .client()?
                    .send("POST", "/v1/peers/approve", &json!({ "peer": id }))?;
            if reply["newly"].as_bool() == Some(true) {
                out!("{id} is trusted: it may connect from now on (saved in config.toml)");
            } else {
                out!("{id} was trusted already");
            }
            if reply["policy_in_force"].as_bool() == Some(true) {
                out!("note: a policy is in force; its members are admitted, whoever is trusted");
            }
            Ok(())
        }
        None => {
            let peers = context.client()?.get("/v1/peers")?;
            print_or(args.json, &peers, |value| {
                print_peers(&value["peers"]);
                print_pending(value);
            });
            Ok(())
        }
    }
}

pub(crate) fn print_peers(peers: &Value) {
    let peers = peers.as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        out!("peers     none yet");
        return;
    }
    out!("peers");
    let label = |peer: &Value| {
        let id = peer["peer_id"].as_str().unwrap_or("?");
        match peer["name"].as_str() {
            Some(name) => format!("{name} ({}…)", &id[..id.len().min(14)]),
            None => format!("{}…", &id[..id.len().min(20)]),
        }
    };
    let width = peers
        .iter()
        .map(|peer| label(peer).chars().count())
        .max()
        .unwrap_or(0);
    for peer in &peers {
        let syncing = if peer["syncing"].as_bool() == Some(true) {
            "  syncing"
        } else {
            ""
        };
        out!(
            "  {:<width$} {:<12} last sync {:<12} behind ~{}{syncing}",
            label(peer),
            peer["state"].as_str().unwrap_or("?"),
            ago(peer["last_sync"].as_u64()),
            peer["behind_estimate"].as_u64().unwrap_or(0)
        );
        if let Some(error) = peer["last_error"].as_str() {
            out!("  {:<width$} last error: {error}", "");
        }
    }
}
/// Peers waiting for `mesh peers approve` (no policy in force, not trusted).
pub(crate) fn print_pending(value: &Value) {
    let pending = value["pending"].as_array().cloned().unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    out!("pending approval (they get nothing until `mesh peers approve ID`):");
    for row in &pending {
        out!(
            "  {}  from {}  ({}, last {})",
            row["peer_id"].as_str().unwrap_or("?"),
            row["address"].as_str().unwrap_or("an unknown address"),
            plural(row["attempts"].as_u64().unwrap_or(0) as usize, "attempt"),
            ago(row["last_at"].as_u64())
        );
    }
}
