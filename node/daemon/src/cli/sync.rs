//! `mesh sync now` (with progress) and `mesh sync abort`.

use anyhow::anyhow;
use serde_json::{Value, json};

use super::Context;
use super::output::plural;
use crate::client::{Client, ClientError};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Reconcile with every connected peer now (or one), showing progress.
    Now {
        /// Only this peer (its node id).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Stop running syncs; what was applied stays.
    Abort,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    match args.command {
        Command::Now { peer } => sync_now(&context.client()?, peer),
        Command::Abort => {
            let aborted = context
                .client()?
                .send("POST", "/v1/sync/abort", &json!({}))?;
            out!(
                "aborted {} sync session(s); what was applied stays",
                aborted["sessions"]
            );
            Ok(())
        }
    }
}

/// Starts a sync and shows its progress until every session ends.
fn sync_now(client: &Client, peer: Option<String>) -> Result<(), ClientError> {
    let before = client.get("/v1/status")?;
    let known = before["peers"].as_array().cloned().unwrap_or_default();
    // A peer may be named by id or by its name.
    let peer = match peer {
        Some(given) if given.parse::<crdt_schema::NodeId>().is_err() => {
            let named: Vec<&str> = known
                .iter()
                .filter(|p| p["name"].as_str() == Some(given.as_str()))
                .filter_map(|p| p["peer_id"].as_str())
                .collect();
            match named.as_slice() {
                [id] => Some((*id).to_owned()),
                [] => {
                    return Err(anyhow!(
                        "no peer is named or has the id `{given}`; `mesh peers` lists them"
                    )
                    .into());
                }
                _ => {
                    return Err(anyhow!(
                        "several peers are named `{given}`; give the node id (`mesh peers`)"
                    )
                    .into());
                }
            }
        }
        other => other,
    };
    let body = match &peer {
        Some(peer) => json!({ "peer": peer }),
        None => json!({}),
    };
    let started = client.send("POST", "/v1/sync/now", &body)?;
    let targets: Vec<String> = started["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Connected peers that are no targets never greeted properly (another org): say why.
    let troubled: Vec<(String, String)> = known
        .iter()
        .filter(|p| p["state"] == "connected")
        .filter(|p| !targets.iter().any(|t| p["peer_id"] == t.as_str()))
        .filter(|p| peer.is_none() || p["peer_id"].as_str() == peer.as_deref())
        .filter_map(|p| {
            let name = p["name"].as_str().or(p["peer_id"].as_str())?.to_owned();
            Some((name, p["last_error"].as_str()?.to_owned()))
        })
        .collect();
    if targets.is_empty() {
        if troubled.is_empty() {
            out!("no peer is connected; nothing to sync (see `mesh peers`)");
            return Ok(());
        }
        for (name, error) in &troubled {
            out!("  {name}: {error}");
        }
        return Err(anyhow!(
            "no peer can sync: {} connected but not greeted (see above)",
            plural(troubled.len(), "peer")
        )
        .into());
    }
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{spinner} {prefix:<8} {msg}")
        .expect("a valid template");
    let [fetch, apply, send] = ["fetching", "applying", "sending"].map(|prefix| {
        let bar = bars.add(
            indicatif::ProgressBar::new_spinner()
                .with_style(style.clone())
                .with_prefix(prefix),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    });
    let totals = |status: &Value| -> (u64, u64, u64) {
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        let sum = |field: &str| {
            peers
                .iter()
                .map(|p| p["counters"][field].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        (
            sum("changes_received"),
            status["counters"]["changes_applied"].as_u64().unwrap_or(0),
            sum("changes_sent"),
        )
    };
    let base = totals(&before);
    let mut polls = 0;
    let status = loop {
        let status = client.get("/v1/status")?;
        let (received, applied, sent) = totals(&status);
        fetch.set_message(format!("{} changes", received - base.0));
        apply.set_message(format!("{} changes", applied.saturating_sub(base.1)));
        send.set_message(format!("{} changes", sent.saturating_sub(base.2)));
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        let busy = peers
            .iter()
            .any(|p| targets.iter().any(|t| p["peer_id"] == t.as_str()) && p["syncing"] == true);
        polls += 1;
        if !busy || polls > 600 {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for bar in [&fetch, &apply, &send] {
        bar.finish();
    }
    let (received, applied, sent) = totals(&status);
    let in_sync = status["peers"].as_array().map_or(0, |peers| {
        peers
            .iter()
            .filter(|p| {
                targets.iter().any(|t| p["peer_id"] == t.as_str())
                    && p["last_error"].is_null()
                    && !p["last_sync"].is_null()
            })
            .count()
    });
    out!(
        "received {} changes, applied {}, sent {}; in sync with {}",
        received - base.0,
        applied.saturating_sub(base.1),
        sent.saturating_sub(base.2),
        plural(in_sync, "peer")
    );
    for (name, error) in &troubled {
        out!("  {name}: {error}");
    }
    if in_sync < targets.len() || !troubled.is_empty() {
        for p in status["peers"].as_array().into_iter().flatten() {
            if targets.iter().any(|t| p["peer_id"] == t.as_str())
                && let Some(error) = p["last_error"].as_str()
            {
                let name = p["name"].as_str().or(p["peer_id"].as_str()).unwrap_or("?");
                out!("  {name}: {error}");
            }
        }
        let still = if polls > 600 {
            " (still syncing after 60 s; it goes on in the background)"
        } else {
            ""
        };
        return Err(anyhow!(
            "not in sync with {} of {}{still}",
            targets.len() - in_sync + troubled.len(),
            plural(targets.len() + troubled.len(), "peer")
        )
        .into());
    }
    Ok(())
}
