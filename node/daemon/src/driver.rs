//! The driver: one task owns the node core and carries out its effects.
//!
//! It `select!`s over API requests, storage completions and the core's next deadline. Log
//! appends and checkpoints run on one storage thread in order, so a slow fsync never blocks
//! the API; the core keeps at most one append in flight and batches the writes that arrive
//! meanwhile into the next (group commit).

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;

use anyhow::Context;
use crdt_schema::NodeId;
use mesh_core::storage::StorageRequest;
use mesh_core::{
    Command, CommandError, CommandId, Effect, Event, Input, Node, Reply, StorageError, StorageOpId,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::clock::Clock;
use crate::config::FileConfig;
use crate::net::{Net, NetEvent};
use crate::store::{DataDir, Store};

/// A request from the API to the driver.
pub struct Request {
    /// The command.
    pub command: Command,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<Reply, CommandError>>,
}

/// A record change for the change feed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedEvent {
    /// The record.
    pub record: String,
    /// Its new heads.
    pub heads: Vec<String>,
    /// The peer it came from, or `None` for a local write.
    pub from: Option<String>,
    /// That peer's name (its member name under a policy), if known.
    pub from_name: Option<String>,
    /// Who wrote the changes: each with its id and, if known, its name; this node's own
    /// writes are named "this node".
    pub authors: Vec<FeedAuthor>,
    /// Whether the record is now deleted.
    pub deleted: bool,
}

/// An author in the change feed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedAuthor {
    /// Its node id.
    pub id: String,
    /// Its name, if known.
    pub name: Option<String>,
}

/// Handles to a running driver.
#[derive(Clone)]
pub struct Handle {
    /// Sends commands.
    pub requests: mpsc::Sender<Request>,
    /// Subscribes to record changes.
    pub feed: broadcast::Sender<FeedEvent>,
    /// The addresses the node listens on for peers, as they become known.
    pub listen_addrs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Handle {
    /// Runs a command on the node.
    pub async fn command(&self, command: Command) -> anyhow::Result<Result<Reply, CommandError>> {
        let (reply, result) = oneshot::channel();
        self.requests
            .send(Request { command, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the node is shutting down"))?;
        result.await.context("the node stopped before answering")
    }
}

/// How often the driver looks for bootstrap peers to dial again; each address has its own
/// exponential backoff (see `net.rs`).
const REDIAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What woke the driver.
enum Wake {
    Request(Request),
    StorageDone((StorageOpId, Result<(), StorageError>)),
    Net(NetEvent),
    Redial,
    Tick,
}

enum StorageJob {
    Append {
        op: StorageOpId,
        envelopes: Vec<Vec<u8>>,
    },
    Checkpoint {
        op: StorageOpId,
        records: Vec<mesh_core::SavedRecord>,
        policy: Option<Vec<u8>>,
        compact_before: Option<u64>,
    },
}

/// Opens storage and the network, starts the core and returns the handles the API needs
/// with the future that runs the node. Must be called inside the tokio runtime.
pub fn start(
    dir: &DataDir,
    config: &FileConfig,
    extra_peers: &[String],
) -> anyhow::Result<(
    Handle,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let identity = crate::config::identity(dir)?;
    let peers: Vec<String> = config.peers.iter().chain(extra_peers).cloned().collect();
    // Storage first: it holds the data directory's lock, so a second daemon stops before it
    // touches the network.
    let (store, mut restore, report) = Store::open(dir)?;
    if restore.policy.is_none() {
        // The policy given at `mesh init --policy`, until a newer one is saved.
        match std::fs::read(dir.initial_policy()) {
            Ok(bytes) => restore.policy = Some(bytes),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot read {}", dir.initial_policy().display()));
            }
        }
    }
    let net = Net::start(identity.secret_bytes(), &config.listen, &peers, config.mdns)?;
    if let Some(stored) = &restore.policy {
        // Starting without the policy would open the node to every key: refuse instead.
        let org = config.core_config()?.org;
        serde_json::from_slice::<crdt_schema::policy::SignedPolicy>(stored)
            .map_err(|error| anyhow::anyhow!("{error}"))
            .and_then(|signed| signed.verify(&org).map_err(anyhow::Error::from))
            .with_context(|| {
                format!(
                    "the policy stored in the data directory {} is damaged or not the org's; the node will not start open without it: restore the data directory, or move its db directory away and apply the policy again",
                    dir.root().display()
                )
            })?;
    }
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            "cut a torn entry off the end of the change log; it was never acknowledged"
        );
    }
    let mut clock = Clock::default();
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|error| anyhow::anyhow!("no OS randomness: {error}"))?;
    let mut core_config = config.core_config()?;
    if let Some(trusted) = &mut core_config.trusted_peers {
        // A peer named with its id (`--peer /ip4/…/tcp/4001/p2p/<id>`) is trusted.
        for peer in extra_peers {
            match crate::config::peer_id_in(peer) {
                Some(node) => {
                    trusted.insert(node);
                }
                None => tracing::warn!(
                    %peer,
                    "this peer address names no node id (/p2p/<id>): it is listed as pending until approved with `mesh peers approve <id>`"
                ),
            }
        }
    } else {
        tracing::warn!(
            "this node is open (made with --open): without a policy, anyone who reaches its port reads and writes every record"
        );
    }
    let mut node = Node::new(core_config, identity, u64::from_le_bytes(seed));
    node.use_document_store(store.documents());
    let restored_records = restore.records.len() + restore.index.len();
    let replayed = restore.log.len();
    let _ = node.handle(clock.now(), Input::Restore(restore));
    let mut net = net;
    net.set_members(node.members());
    tracing::info!(node = %node.node_id(), records = restored_records, log_entries = replayed, "node restored");

    let (requests_tx, requests) = mpsc::channel::<Request>(1024);
    let (feed, _) = broadcast::channel(1024);
    let (done_tx, done) = mpsc::unbounded_channel::<(StorageOpId, Result<(), StorageError>)>();
    let (jobs, jobs_rx) = std_mpsc::channel::<StorageJob>();
    let appended_total = store.appended_total();
    std::thread::Builder::new()
        .name("mesh-storage".into())
        .spawn(move || storage_thread(store, jobs_rx, done_tx))
        .context("cannot start the storage thread")?;
    let listen_addrs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = Handle {
        requests: requests_tx,
        feed: feed.clone(),
        listen_addrs: listen_addrs.clone(),
    };
    let driver = Driver {
        node,
        clock,
        jobs,
        net,
        listen_addrs,
        pending: BTreeMap::new(),
        next_command: 0,
        feed,
        acked_entries: appended_total,
        in_flight_appends: BTreeMap::new(),
        approving: BTreeMap::new(),
        dir: dir.clone(),
    };
    Ok((handle, driver.run(requests, done)))
}

struct Driver {
    node: Node,
    clock: Clock,
    jobs: std_mpsc::Sender<StorageJob>,
    net: Net,
    listen_addrs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pending: BTreeMap<CommandId, oneshot::Sender<Result<Reply, CommandError>>>,
    next_command: u64,
    feed: broadcast::Sender<FeedEvent>,
    /// Log entries whose appends were reported durable to the core: a checkpoint may
    /// compact exactly these.
    acked_entries: u64,
    in_flight_appends: BTreeMap<StorageOpId, u64>,
    /// `ApprovePeer` commands in flight, with their peer: approvals are saved to config.toml.
    approving: BTreeMap<CommandId, NodeId>,
    dir: DataDir,
}

impl Driver {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut done: mpsc::UnboundedReceiver<(StorageOpId, Result<(), StorageError>)>,
    ) -> anyhow::Result<()> {
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        loop {
            let now = self.clock.now();
            let wait = self.node.next_deadline().map(|at| at.saturating_since(now));
            let wake = tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => Wake::Request(request),
                    None => return Ok(()),
                },
                Some(done) = done.recv() => Wake::StorageDone(done),
                event = self.net.next() => Wake::Net(event),
                _ = redial.tick() => Wake::Redial,
                () = sleep(wait) => Wake::Tick,
            };
            match wake {
                Wake::Request(Request { command, reply }) => {
                    self.next_command += 1;
                    let id = CommandId(self.next_command);
                    self.pending.insert(id, reply);
                    if let Command::ApprovePeer { peer } = &command {
                        self.approving.insert(id, *peer);
                    }
                    self.input(Input::Command { id, command });
                }
                Wake::StorageDone((op, result)) => {
                    if let Some(entries) = self.in_flight_appends.remove(&op)
                        && result.is_ok()
                    {
                        self.acked_entries += entries;
                    }
                    self.input(Input::StorageDone { op, result });
                }
                Wake::Net(event) => self.network(event),
                Wake::Redial => {
                    let now = self.clock.now().as_millis();
                    self.net.redial(now);
                }
                Wake::Tick => self.input(Input::Tick),
            }
        }
    }

    fn network(&mut self, event: NetEvent) {
        match event {
            NetEvent::Connected(peer) => self.input(Input::PeerConnected { peer }),
            NetEvent::Disconnected(peer) => self.input(Input::PeerDisconnected { peer }),
            NetEvent::Message { from, bytes } => self.input(Input::MessageReceived { from, bytes }),
            NetEvent::Refused(peer, address) => self.input(Input::PeerRefused {
                peer,
                address: Some(address),
            }),
            NetEvent::Nothing => {}
        }
        let addrs = self.net.listen_addrs();
        if let Ok(mut shared) = self.listen_addrs.lock()
            && *shared != addrs
        {
            *shared = addrs;
        }
    }

    fn input(&mut self, input: Input) {
        let now = self.clock.now();
        let effects = self.node.handle(now, input);
        for effect in effects {
            self.effect(effect);
        }
    }

    fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::Send { to, bytes } => self.net.send(to, bytes),
            Effect::Disconnect { peer, reason } => {
                tracing::warn!(%peer, %reason, "disconnecting peer");
                self.net.disconnect(peer);
            }
            Effect::Storage { op, request } => {
                let job = match request {
                    StorageRequest::Append { envelopes } => {
                        self.in_flight_appends.insert(op, envelopes.len() as u64);
                        StorageJob::Append { op, envelopes }
                    }
                    StorageRequest::Checkpoint {
                        records,
                        compact_log,
                        policy,
                    } => StorageJob::Checkpoint {
                        op,
                        records,
                        policy,
                        compact_before: compact_log.then_some(self.acked_entries),
                    },
                };
                if self.jobs.send(job).is_err() {
                    tracing::error!("the storage thread stopped; writes will fail");
                }
            }
            Effect::Complete { id, mut result } => {
                if let Ok(Reply::PeerApproved { newly: true, .. }) = &result
                    && let Some(peer) = self.approving.remove(&id)
                {
                    // Admitted at the handshake from now on, and after a restart.
                    self.net.set_members(self.node.members());
                    if let Err(error) = crate::config::save_trusted_peer(&self.dir, &peer) {
                        result = Err(CommandError::Storage(format!(
                            "{peer} is trusted until the daemon stops, but saving it to config.toml failed: {error:#}"
                        )));
                    }
                }
                self.approving.remove(&id);
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            Effect::Emit(event) => self.event(event),
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::RecordChanged {
                record,
                heads,
                from,
                authors,
                deleted,
            } => {
                // Formatting ids and names for every applied change cost about 3% of a
                // clone's CPU (perf) when nobody listened.
                if self.feed.receiver_count() == 0 {
                    return;
                }
                let me = self.node.node_id();
                let name_of = |node: &crdt_schema::NodeId| match *node == me {
                    true => Some("this node".to_owned()),
                    false => self.node.name_of(node),
                };
                let _ = self.feed.send(FeedEvent {
                    record: record.to_string(),
                    heads: heads.iter().map(ToString::to_string).collect(),
                    from_name: from.as_ref().and_then(name_of),
                    from: from.map(|peer| peer.to_string()),
                    authors: authors
                        .iter()
                        .map(|author| FeedAuthor {
                            id: author.to_string(),
                            name: name_of(author),
                        })
                        .collect(),
                    deleted,
                });
            }
            Event::StorageFailed { error } => tracing::error!(%error, "storage failed"),
            Event::ChangeRejected { from, reason } => {
                tracing::warn!(%from, %reason, "change rejected")
            }
            Event::MessageRejected { from, reason } => {
                tracing::warn!(%from, %reason, "message rejected")
            }
            Event::SyncStarted {
                peer,
                session,
                initiator,
            } => tracing::debug!(%peer, session, initiator, "sync started"),
            Event::PolicyAdopted { version } => {
                tracing::info!(version, "policy in force");
                self.net.set_members(self.node.members());
            }
            Event::ChangeQuarantined {
                record,
                change,
                reason,
            } => tracing::warn!(%record, %change, %reason, "change quarantined by the policy"),
            Event::SyncEnded(row) => {
                tracing::info!(peer = %row.peer, outcome = ?row.outcome, received = row.changes_received, sent = row.changes_sent, "sync ended")
            }
        }
    }
}

async fn sleep(wait: Option<std::time::Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

fn storage_thread(
    mut store: Store,
    jobs: std_mpsc::Receiver<StorageJob>,
    done: mpsc::UnboundedSender<(StorageOpId, Result<(), StorageError>)>,
) {
    for job in jobs {
        let (op, result) = match job {
            StorageJob::Append { op, envelopes } => (
                op,
                store.append(&envelopes).map_err(|error| {
                    StorageError(match error.kind() {
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                            format!(
                                "the disk holding the change log is full ({error}); free some space and write again"
                            )
                        }
                        _ => format!("cannot append to the change log: {error}"),
                    })
                }),
            ),
            StorageJob::Checkpoint {
                op,
                records,
                policy,
                compact_before,
            } => (
                op,
                store
                    .checkpoint(&records, policy.as_deref(), compact_before)
                    .map_err(|error| StorageError(format!("cannot save records: {error:#}"))),
            ),
        };
        if done.send((op, result)).is_err() {
            return;
        }
    }
}
