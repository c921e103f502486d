//! `mesh`: the node daemon and the command line that talks to it.
//!
//! `mesh init` creates a node in a data directory; `mesh node run` runs it in the
//! foreground; every other command talks to the running daemon over its local API.

/// `println!` that ends the program quietly when nobody reads stdout any more
/// (`mesh status | head -1`) instead of panicking.
/// Prints a line on stdout with control characters replaced (see [`printable`]): names,
/// reasons and record text come from peers, and must not reach the terminal as escape codes.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        if let Err(error) = writeln!(std::io::stdout().lock(), "{}", crate::printable(&line)) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {error}");
        }
    }};
}

mod api;
mod changelog;
mod client;
mod clock;
mod config;
mod demo;
mod driver;
mod net;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::client::{Client, ClientError};
use crate::store::DataDir;

/// Keep the records of every site in step, without a master server.
#[derive(Parser)]
#[command(name = "mesh", version, about)]
struct Cli {
    /// The node's data directory. Default: $MESH_DATA_DIR, else the platform data directory.
    #[arg(long, global = true, env = "MESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Create a node: its key, config and API token. Prints the node id.
    Init {
        /// A human name for the node.
        #[arg(long)]
        name: Option<String>,
        /// Where the local API listens (loopback).
        #[arg(long, default_value = config::API_ADDR_DEFAULT)]
        api: String,
        /// Peer-to-peer listen address (repeatable). Default: /ip4/0.0.0.0/tcp/4001.
        #[arg(long)]
        listen: Vec<String>,
        /// Trust this organisation's policies (its org id).
        #[arg(long)]
        org: Option<String>,
        /// Enforce this signed policy (from `mesh policy sign`) from the first start, instead
        /// of accepting every node key until a peer brings the policy. Needs --org.
        #[arg(long, requires = "org")]
        policy: Option<PathBuf>,
        /// Do not look for peers on the local network (mDNS).
        #[arg(long)]
        no_mdns: bool,
        /// Admit every node key as a peer while no policy is in force (anyone who reaches
        /// the port reads and writes everything). Without it, only peers named with
        /// /p2p/<id>, listed in config.toml or approved with `mesh peers approve` connect.
        #[arg(long)]
        open: bool,
    },
    /// Run the node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The node at a glance: records, digest, peers, last sync.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Peers and their connection state.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<PeersCommand>,
    },
    /// Set fields of a record: FIELD=VALUE, where VALUE is read as null (removes the field),
    /// true/false, an integer, a decimal number, or else text; numbers written with a leading
    /// zero (007) stay text. Use --json for exact types.
    Put {
        /// The collection.
        collection: String,
        /// The record id.
        id: String,
        /// Fields to set.
        fields: Vec<String>,
        /// Fields as a JSON object, merged with FIELD=VALUE pairs.
        #[arg(long = "json", value_name = "OBJECT")]
        json_fields: Option<String>,
    },
    /// Read a record.
    Get {
        /// The collection.
        collection: String,
        /// The record id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the live records of a collection.
    List {
        /// The collection.
        collection: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a record (a tombstone that syncs like an edit).
    Delete {
        /// The collection.
        collection: String,
        /// The record id.
        id: String,
    },
    /// Print record changes as they happen, until Ctrl-C.
    Watch {
        /// Only this collection.
        collection: Option<String>,
        /// Print each change as a line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sync control.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// The history of sync sessions, newest first.
    History {
        /// Rows per page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Page number, from 1 (newest first).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        page: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The organisation key, which signs policies.
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Policies: who may write what.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Changes the policy rejected: never applied, kept with the rule they broke.
    Quarantine {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start three nodes on loopback, write on each and watch them converge.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Where to put the nodes' data (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Repair a change log the daemon refused to start with: set each damaged entry aside
    /// (in a file beside the log) and keep every entry around it. The daemon must be stopped.
    Repair,
    /// Write a record's Automerge document (standard binary format) to a file.
    Export {
        /// The collection.
        collection: String,
        /// The record id.
        id: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PeersCommand {
    /// Trust a peer: without a policy, a node admits only peers it trusts. The id is the
    /// one `mesh peers` lists as pending, or the other node's `mesh init` printed.
    Approve {
        /// The peer's node id (12D3KooW…).
        id: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Run the daemon in the foreground until Ctrl-C; logs go to stderr.
    Run {
        /// Also dial this peer (a multiaddr like /ip4/10.0.0.2/tcp/4001; repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
    },
}

#[derive(Subcommand)]
enum OrgCommand {
    /// Create the org key (keep the file offline) and print the org id for `mesh init --org`.
    Init {
        /// Where to write the key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Sign a policy (TOML, see examples/policy.toml) with the org key.
    Sign {
        /// The policy file.
        policy: PathBuf,
        /// The org key file from `mesh org init`.
        #[arg(long)]
        org_key: PathBuf,
        /// Where to write the signed policy.
        #[arg(long)]
        out: PathBuf,
    },
    /// Hand a signed policy to the running node, which enforces it and spreads it to its
    /// peers (it must be signed by the org the node trusts and newer than its own).
    Apply {
        /// The signed policy file from `mesh policy sign`.
        file: PathBuf,
    },
    /// The policy in force: members, roles, who may write what.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Reconcile with every connected peer now (or one), showing progress.
    Now {
        /// Only this peer (its node id).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Stop running syncs; what was applied stays.
    Abort,
}

fn main() -> ExitCode {
    // Automerge panics on some crafted changes; the door catches them, and they need not
    // reach stderr as if the daemon had crashed.
    crdt_schema::guard::quiet_guarded_panics();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::NotFound(message)) => {
            eprintln!("error: {}", printable(&message));
            ExitCode::from(1)
        }
        Err(ClientError::Other(error)) => {
            eprintln!("error: {}", printable(&format!("{error:#}")));
            ExitCode::from(2)
        }
    }
}

/// Where a node listens for peers unless told otherwise; with QUIC built in, also on the
/// same port over UDP.
const LISTEN_DEFAULTS: &[&str] = &[
    "/ip4/0.0.0.0/tcp/4001",
    #[cfg(feature = "quic")]
    "/ip4/0.0.0.0/udp/4001/quic-v1",
];

fn data_dir(given: Option<PathBuf>) -> anyhow::Result<DataDir> {
    if let Some(dir) = given {
        return Ok(DataDir::new(dir));
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .or_else(|| std::env::var_os("APPDATA").map(PathBuf::from))
        .ok_or_else(|| {
            anyhow!("cannot find a data directory: pass --data-dir or set MESH_DATA_DIR")
        })?;
    Ok(DataDir::new(base.join("mesh")))
}

fn run(cli: Cli) -> Result<(), ClientError> {
    match cli.command {
        Commands::Demo { duration, dir } => {
            if cli.data_dir.is_some() {
                eprintln!(
                    "note: the demo makes its own three nodes and ignores --data-dir (and MESH_DATA_DIR); --dir chooses where they live"
                );
            }
            Ok(demo::run(
                dir,
                duration.map(std::time::Duration::from_secs),
            )?)
        }
        Commands::Org {
            command: OrgCommand::Init { out },
        } => {
            let org = config::create_org_key(&out)?;
            out!("{org}");
            eprintln!("wrote the org key to {}; keep it offline", out.display());
            eprintln!("make nodes trust it with: mesh init --org {org}");
            Ok(())
        }
        Commands::Policy {
            command: command @ (PolicyCommand::Apply { .. } | PolicyCommand::Show { .. }),
        } => run_with_node(cli.data_dir, Commands::Policy { command }),
        Commands::Policy {
            command:
                PolicyCommand::Sign {
                    policy,
                    org_key,
                    out,
                },
        } => {
            let signed = config::sign_policy(&policy, &org_key)?;
            std::fs::write(&out, signed)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("signed {} into {}", policy.display(), out.display());
            Ok(())
        }
        command => run_with_node(cli.data_dir, command),
    }
}

fn run_with_node(given_dir: Option<PathBuf>, command: Commands) -> Result<(), ClientError> {
    let dir = data_dir(given_dir)?;
    match command {
        Commands::Init {
            name,
            api,
            listen,
            org,
            policy,
            no_mdns,
            open,
        } => {
            let name = name.unwrap_or_else(|| "node".to_owned());
            // Checked before anything is created: a bad file leaves no half-made node.
            let signed_policy = match (&policy, &org) {
                (Some(path), Some(org)) => Some(config::read_signed_policy(path, org)?),
                _ => None,
            };
            let listen = if listen.is_empty() {
                LISTEN_DEFAULTS
                    .iter()
                    .map(|addr| (*addr).to_owned())
                    .collect()
            } else {
                listen
            };
            let identity = config::init(
                &dir,
                config::InitOptions {
                    name: name.clone(),
                    api,
                    listen,
                    org,
                    mdns: !no_mdns,
                    open,
                },
            )?;
            if let Some((text, version)) = signed_policy {
                std::fs::write(dir.initial_policy(), text)
                    .with_context(|| format!("cannot write {}", dir.initial_policy().display()))?;
                eprintln!("the node enforces policy version {version} from its first start");
            }
            out!("{}", identity.node_id());
            eprintln!("created node `{name}` in {}", dir.root().display());
            eprintln!(
                "start it with: mesh node run --data-dir {}",
                dir.root().display()
            );
            if open {
                eprintln!(
                    "warning: the node is open: without a policy, anyone who reaches its port reads and writes every record"
                );
            } else {
                eprintln!(
                    "it admits only peers it trusts: dial them as /ip4/…/tcp/4001/p2p/<their id>, or approve them with `mesh peers approve <id>`"
                );
            }
            Ok(())
        }
        Commands::Node {
            command: NodeCommand::Run { peer, json_logs },
        } => Ok(run_daemon(&dir, &peer, json_logs)?),
        Commands::Repair => {
            let report = store::repair(&dir)?;
            if report.set_aside.is_empty() && report.truncated_bytes == 0 {
                out!(
                    "the change log is sound: {} entries, nothing to repair",
                    report.entries
                );
                return Ok(());
            }
            for (offset, length) in &report.set_aside {
                out!("set aside {length} damaged bytes at byte {offset}");
            }
            if let Some(file) = &report.damaged_file {
                out!("the damaged bytes are kept in {}", file.display());
            }
            if report.truncated_bytes > 0 {
                out!(
                    "cut a torn entry of {} bytes off the end (never acknowledged)",
                    report.truncated_bytes
                );
            }
            out!(
                "the change log keeps {} entries; start the node again (`mesh node run`); peers can bring the damaged changes again",
                report.entries
            );
            Ok(())
        }
        Commands::Status { json } => {
            let status = Client::connect(&dir)?.get("/v1/status")?;
            print_or(json, &status, print_status);
            Ok(())
        }
        Commands::Peers {
            command: Some(PeersCommand::Approve { id }),
            ..
        } => {
            let id = id.trim();
            id.parse::<crdt_schema::NodeId>()
                .map_err(|error| anyhow!("`{id}` is not a node id: {error}"))?;
            let reply =
                Client::connect(&dir)?.send("POST", "/v1/peers/approve", &json!({ "peer": id }))?;
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
        Commands::Peers {
            json,
            command: None,
        } => {
            let peers = Client::connect(&dir)?.get("/v1/peers")?;
            print_or(json, &peers, |value| {
                print_peers(&value["peers"]);
                print_pending(value);
            });
            Ok(())
        }
        Commands::Put {
            collection,
            id,
            fields,
            json_fields,
        } => {
            let mut object = match json_fields {
                Some(text) => match serde_json::from_str::<Value>(&text)
                    .context("--json is not valid JSON")?
                {
                    Value::Object(object) => object,
                    _ => return Err(anyhow!("--json must be a JSON object of fields").into()),
                },
                None => serde_json::Map::new(),
            };
            for pair in &fields {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow!("`{pair}` is not FIELD=VALUE"))?;
                if object.contains_key(name) {
                    return Err(anyhow!("field `{name}` is given twice").into());
                }
                object.insert(name.to_owned(), parse_value(value)?);
            }
            if object.is_empty() {
                return Err(anyhow!("give fields as FIELD=VALUE or --json '{{...}}'").into());
            }
            let path = record_path(&collection, &id)?;
            let written = Client::connect(&dir)?.send("PUT", &path, &Value::Object(object))?;
            print_written(&written, "written");
            Ok(())
        }
        Commands::Get {
            collection,
            id,
            json,
        } => {
            let record = Client::connect(&dir)?.get(&record_path(&collection, &id)?)?;
            print_or(json, &record, print_record);
            Ok(())
        }
        Commands::List { collection, json } => {
            crdt_schema::record::check_collection(&collection).map_err(anyhow::Error::from)?;
            let list = Client::connect(&dir)?.get(&format!("/v1/records/{collection}"))?;
            print_or(json, &list, |value| {
                let records = value["records"].as_array().cloned().unwrap_or_default();
                if records.is_empty() {
                    out!("no live records in {collection}");
                }
                for record in &records {
                    print_record(record);
                }
            });
            Ok(())
        }
        Commands::Delete { collection, id } => {
            let written = Client::connect(&dir)?.send(
                "DELETE",
                &record_path(&collection, &id)?,
                &Value::Null,
            )?;
            print_written(&written, "deleted");
            Ok(())
        }
        Commands::Watch { collection, json } => {
            let client = Client::connect(&dir)?;
            if let Some(collection) = &collection {
                crdt_schema::record::check_collection(collection).map_err(anyhow::Error::from)?;
            }
            let path = match &collection {
                Some(collection) => format!("/v1/changes?collection={collection}"),
                None => "/v1/changes".to_owned(),
            };
            eprintln!(
                "watching {}; Ctrl-C stops",
                collection.as_deref().unwrap_or("every collection")
            );
            client.follow(&path, |line| {
                if json {
                    out!("{line}");
                    return;
                }
                let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                match event["record"].as_str() {
                    Some(record) => {
                        let from = event["from"]
                            .as_str()
                            .map_or("here".to_owned(), |peer| format!("from {peer}"));
                        out!("{record} changed {from}");
                    }
                    None => out!("{line}"),
                }
            })?;
            Ok(())
        }
        Commands::Sync {
            command: SyncCommand::Now { peer },
        } => sync_now(&Client::connect(&dir)?, peer),
        Commands::Sync {
            command: SyncCommand::Abort,
        } => {
            let aborted = Client::connect(&dir)?.send("POST", "/v1/sync/abort", &json!({}))?;
            out!(
                "aborted {} sync session(s); what was applied stays",
                aborted["sessions"]
            );
            Ok(())
        }
        Commands::History { limit, page, json } => {
            let client = Client::connect(&dir)?;
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
        Commands::Policy {
            command: PolicyCommand::Apply { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let signed: Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a signed policy; make one with `mesh policy sign`",
                    file.display()
                )
            })?;
            let offer = Client::connect(&dir)?.send("POST", "/v1/policy", &signed)?;
            match offer["outcome"].as_str() {
                Some("adopted") => out!(
                    "policy version {} is in force and spreading to peers",
                    offer["version"]
                ),
                Some("unchanged") => {
                    out!("policy version {} was already in force", offer["version"])
                }
                _ => {
                    let offered = signed["policy"]
                        .as_str()
                        .and_then(|policy| serde_json::from_str::<Value>(policy).ok())
                        .map(|policy| policy["version"].clone());
                    let message = if offered.as_ref() == Some(&offer["in_force"]) {
                        format!(
                            "not applied: a different policy of the same version {} is in force and wins the tie (the lower hash wins on every node; status shows the conflict); raise `version` and sign again",
                            offer["in_force"]
                        )
                    } else {
                        format!(
                            "not applied: the node enforces a newer policy (version {}); raise `version` and sign again",
                            offer["in_force"]
                        )
                    };
                    return Err(anyhow!(message).into());
                }
            }
            Ok(())
        }
        Commands::Policy {
            command: PolicyCommand::Show { json },
        } => {
            let policy = Client::connect(&dir)?.get("/v1/policy")?;
            print_or(json, &policy, print_policy);
            Ok(())
        }
        Commands::Quarantine { json } => {
            let rows = Client::connect(&dir)?.get("/v1/quarantine")?;
            print_or(json, &rows, |value| {
                let list = |name: &str| value[name].as_array().cloned().unwrap_or_default();
                print_quarantine(&list("quarantine"), &list("refused"));
            });
            Ok(())
        }
        Commands::Demo { .. } | Commands::Org { .. } | Commands::Policy { .. } => {
            unreachable!("handled before the data directory is resolved")
        }
        Commands::Export {
            collection,
            id,
            out,
        } => {
            let bytes = Client::connect(&dir)?
                .get_bytes(&format!("{}/automerge", record_path(&collection, &id)?))?;
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("wrote {} bytes to {}", bytes.len(), out.display());
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

/// The API path of a record, after checking its address: an id may hold any character but
/// `/`, so it is percent-encoded (`a?b` must not become a query).
fn record_path(collection: &str, id: &str) -> anyhow::Result<String> {
    crdt_schema::RecordId::new(collection, id)?;
    let id = percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("/v1/records/{collection}/{id}"))
}

/// Reads a FIELD=VALUE value. Only what reads back the same becomes a number: `007` stays
/// text (codes keep their zeros), as do `nan` and `inf`, which JSON cannot carry; an
/// integer too large for 64 bits is refused rather than rounded.
fn parse_value(text: &str) -> anyhow::Result<Value> {
    if text.starts_with('+') {
        // `+41 79 …` is a phone number, not a number.
        return Ok(json!(text));
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let integer = !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit());
    let leading_zero = digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.");
    Ok(if text == "null" {
        Value::Null
    } else if text == "true" || text == "false" {
        json!(text == "true")
    } else if leading_zero {
        json!(text)
    } else if integer {
        let number: i64 = text.parse().map_err(|_| {
            anyhow!(
                "`{text}` does not fit a 64-bit integer; to store it as text, use --json '{{\"field\": \"{text}\"}}'"
            )
        })?;
        json!(number)
    } else if let Ok(number) = text.parse::<f64>() {
        if number.is_finite() && text.bytes().any(|byte| byte.is_ascii_digit()) {
            json!(number)
        } else if number.is_finite() || text.bytes().any(|byte| byte.is_ascii_digit()) {
            return Err(anyhow!("`{text}` is out of range for a number"));
        } else {
            json!(text)
        }
    } else {
        json!(text)
    })
}

fn run_daemon(dir: &DataDir, peers: &[String], json_logs: bool) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json_logs {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = config::FileConfig::load(dir)?;
    let token = std::fs::read_to_string(dir.token())
        .with_context(|| format!("cannot read {}", dir.token().display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (handle, driver) = driver::start(dir, &config, peers)?;
        let listener = tokio::net::TcpListener::bind(&config.api)
            .await
            .with_context(|| format!("cannot listen on {} for the API; is another program using it? set `api` in config.toml", config.api))?;
        let api_addr = listener.local_addr()?.to_string();
        std::fs::write(dir.api_addr(), &api_addr)?;
        let info = api::NodeInfo { name: config.name.clone(), api_addr: api_addr.clone() };
        let state = api::ApiState { node: handle, token: token.trim().to_owned(), info };
        tracing::info!(api = %api_addr, data_dir = %dir.root().display(), "mesh node running; Ctrl-C stops it");
        let server = axum::serve(listener, api::router(state));
        tokio::select! {
            result = driver => result?,
            result = server.into_future() => result.context("the API server stopped")?,
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
            _ = terminated() => tracing::info!("stopping (SIGTERM)"),
        }
        let _ = std::fs::remove_file(dir.api_addr());
        Ok(())
    })
}

/// Resolves when the process is asked to terminate (SIGTERM: `kill`, systemd, Docker).
async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut signal) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        signal.recv().await;
        return;
    }
    std::future::pending::<()>().await;
}

/// `text` with every control character but newline and tab, and the Unicode controls that
/// reorder text, replaced by U+FFFD: an escape sequence from a peer (in its name, a refusal
/// reason or a record) would otherwise act on the operator's terminal.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if text.chars().any(unsafe_char) {
        text.chars()
            .map(|c| if unsafe_char(c) { '\u{fffd}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

fn print_or(json: bool, value: &Value, human: impl FnOnce(&Value)) {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(value).expect("values serialise")
        );
    } else {
        human(value);
    }
}

fn print_written(written: &Value, verb: &str) {
    match written["change"].as_str() {
        Some(change) => out!(
            "{} {verb} (change {})",
            written["record"].as_str().unwrap_or("?"),
            &change[..change.len().min(12)]
        ),
        None => out!("{} unchanged", written["record"].as_str().unwrap_or("?")),
    }
}

fn print_record(record: &Value) {
    let deleted = if record["deleted"].as_bool() == Some(true) {
        "  (deleted)"
    } else {
        ""
    };
    out!(
        "{}/{}{deleted}",
        record["collection"].as_str().unwrap_or("?"),
        record["id"].as_str().unwrap_or("?")
    );
    if let Some(fields) = record["fields"].as_object() {
        let width = fields.keys().map(String::len).max().unwrap_or(0);
        for (name, value) in fields {
            match value.as_str() {
                Some(text) => out!("  {name:width$}  {text}"),
                None => out!("  {name:width$}  {value}"),
            }
        }
    }
}

fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let now = mesh_now_ms();
    let seconds = now.saturating_sub(ms) / 1000;
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

fn mesh_now_ms() -> u64 {
    clock::Clock::default().now().as_millis()
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

/// Peers waiting for `mesh peers approve` (no policy in force, not trusted).
fn print_pending(value: &Value) {
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

fn print_policy(view: &Value) {
    let policy = &view["policy"];
    out!(
        "policy version {}  (hash {}…)",
        view["version"],
        short(view["hash"].as_str(), 16)
    );
    out!("members");
    if let Some(members) = policy["members"].as_object() {
        for (name, member) in members {
            let roles: Vec<&str> = member["roles"]
                .as_array()
                .map(|roles| roles.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out!(
                "  {:<16} {:<24} {}",
                name,
                roles.join(","),
                member["node"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(revoked) = policy["revoked"].as_array().filter(|list| !list.is_empty()) {
        out!("revoked");
        for node in revoked {
            out!("  {}", node.as_str().unwrap_or("?"));
        }
    }
    out!("collections (others: any member may write)");
    if let Some(collections) = policy["collections"].as_object() {
        for (name, rule) in collections {
            let writers: Vec<&str> = rule["writers"]
                .as_array()
                .map(|roles| roles.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out!(
                "  {:<16} written by {}{}",
                name,
                writers.join(", "),
                if rule["schema"].is_null() {
                    ""
                } else {
                    "; has a field schema"
                }
            );
        }
    }
    if let Some(conflict) = view["conflict"].as_object() {
        out!(
            "WARNING another policy also claims version {}; the lower hash is in force",
            conflict["version"]
        );
    }
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

fn print_peers(peers: &Value) {
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

/// `count` and the noun, in the plural unless the count is one.
fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The first `len` characters of an id, for tables.
fn short(text: Option<&str>, len: usize) -> &str {
    let text = text.unwrap_or("?");
    text.get(..len).unwrap_or(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(super::printable("hq"), "hq");
        assert_eq!(super::printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(
            super::printable("\u{1b}[2J\u{1b}]0;owned\u{7}hq\u{202e}"),
            "\u{fffd}[2J\u{fffd}]0;owned\u{fffd}hq\u{fffd}"
        );
    }

    use super::*;

    #[test]
    fn values_read_back_as_typed_and_never_become_a_removal() {
        let read = |text: &str| parse_value(text).unwrap();
        assert_eq!(read("12"), json!(12));
        assert_eq!(read("-3"), json!(-3));
        assert_eq!(read("1.5"), json!(1.5));
        assert_eq!(read("0.25"), json!(0.25));
        assert_eq!(read("0"), json!(0));
        assert_eq!(read("true"), json!(true));
        assert_eq!(read("null"), Value::Null);
        assert_eq!(read("007"), json!("007"), "codes keep their zeros");
        assert_eq!(read("nan"), json!("nan"));
        assert_eq!(read("-inf"), json!("-inf"));
        assert_eq!(read("Infinity"), json!("Infinity"));
        assert_eq!(read("Aspirin 500"), json!("Aspirin 500"));
        assert_eq!(read(""), json!(""));
        assert_eq!(read("+41791234567"), json!("+41791234567"));
        assert_eq!(read("+5"), json!("+5"));
        let error = parse_value("99999999999999999999").unwrap_err().to_string();
        assert!(error.contains("does not fit a 64-bit integer"), "{error}");
        assert!(parse_value("1e400").is_err());
    }

    #[test]
    fn record_paths_escape_the_id_and_refuse_bad_addresses() {
        assert_eq!(
            record_path("stock", "important?old").unwrap(),
            "/v1/records/stock/important%3Fold"
        );
        assert_eq!(
            record_path("stock", "a b#c%").unwrap(),
            "/v1/records/stock/a%20b%23c%25"
        );
        assert!(record_path("stock", "a/b").is_err());
        assert!(record_path("stock", "").is_err());
        assert!(record_path("Stock", "a").is_err());
    }
}
