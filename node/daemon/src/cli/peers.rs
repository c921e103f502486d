//! `mesh peers`: peers and their connection state; `mesh peers approve`.

use anyhow::anyhow;
use mesh_core::PeerState;
use mesh_core::status::PeerStatus;
use mesh_core::status::RefusedPeer;
use serde_json::json;

use super::Context;
use super::output::{ago, plural, print_or, print_table, short};
use crate::client::ClientError;
use crate::replies::{ApprovedReply, PeersReply};

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
            let reply: ApprovedReply =
                context
                    .client()?
                    .send_as("POST", "/v1/peers/approve", &json!({ "peer": id }))?;
            if reply.newly {
                out!("{id} is trusted: it may connect from now on (saved in config.toml)");
            } else {
                out!("{id} was trusted already");
            }
            if reply.policy_in_force {
                out!("note: a policy is in force; its members are admitted, whoever is trusted");
            }
            Ok(())
        }
        None => {
            let reply: PeersReply = context.client()?.get_as("/v1/peers")?;
            print_or(args.json, &reply, |reply| {
                print_peers(&reply.peers);
                print_pending(&reply.pending);
            });
            Ok(())
        }
    }
}

pub(crate) fn print_peers(peers: &[PeerStatus]) {
    if peers.is_empty() {
        out!("peers     none yet");
        return;
    }
    out!("peers");
    let rows = peers
        .iter()
        .map(|peer| {
            let id = peer.peer_id.to_string();
            let label = match &peer.name {
                Some(name) => format!("{name} ({}…)", short(Some(&id), 14)),
                None => format!("{}…", short(Some(&id), 20)),
            };
            let state = match peer.state {
                PeerState::Connected => "connected",
                PeerState::Connecting => "connecting",
                PeerState::Disconnected => "disconnected",
            };
            let note = match (&peer.last_error, peer.syncing) {
                (_, true) => "syncing".to_owned(),
                (Some(error), false) => format!("last error: {error}"),
                (None, false) => String::new(),
            };
            vec![
                label,
                state.to_owned(),
                ago(peer.last_sync.map(|at| at.as_millis())),
                format!("~{}", peer.behind_estimate),
                note,
            ]
        })
        .collect();
    print_table(&["peer", "state", "last sync", "behind", ""], rows, &[3]);
}

/// Peers waiting for `mesh peers approve` (no policy in force, not trusted).
pub(crate) fn print_pending(pending: &[RefusedPeer]) {
    if pending.is_empty() {
        return;
    }
    out!("pending approval (they get nothing until `mesh peers approve ID`):");
    for row in pending {
        out!(
            "  {}  from {}  ({}, last {})",
            row.peer_id,
            row.address.as_deref().unwrap_or("an unknown address"),
            plural(row.attempts as usize, "attempt"),
            ago(Some(row.last_at.as_millis()))
        );
    }
}
