//! Peers over libp2p: the only module that knows libp2p.
//!
//! TCP with Noise and Yamux (and QUIC with the `quic` cargo feature); identify; connection limits; a membership gate; and one
//! long-lived stream per peer and direction, `/mesh/stream/1`, carrying the core's messages
//! as `[length u32 BE][bytes]` frames. The core needs messages in order per connection (a
//! round's changes before the round), which one stream gives for free, and a stream opened
//! once costs no protocol negotiation per message: a one-field edit travels in about 250
//! bytes. A writer task per peer drains that peer's queue into its stream (everything queued
//! goes out in one write); a reader task per inbound stream hands frames to the driver. A
//! failed write means lost messages, which the core treats as a dropped connection, so the
//! peer is disconnected; frames of a stream that is not the peer's current one are dropped.
//!
//! The node's ed25519 key is the libp2p key, so a node id and a PeerId are the same text.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::Duration;

use anyhow::Context;
use crdt_schema::NodeId;
use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::mdns;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, noise, tcp, yamux,
};
use mesh_core::limits::MESSAGE_BYTES_MAX;
use tokio::sync::mpsc;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/stream/1");
/// Most bytes one write to a stream gathers from the queue.
const WRITE_BYTES_MAX: usize = 1024 * 1024;
/// Most messages queued for one peer; past it the peer is too slow and is disconnected.
const QUEUE_MESSAGES_MAX: usize = 16_384;
/// Most bytes queued for one peer; past it the peer is disconnected as not keeping up.
const QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most bytes reserved for a frame before its bytes arrive.
const FRAME_PREALLOCATE_MAX: usize = 64 * 1024;
/// Established connections, in all and per peer, and pending ones.
const CONNECTIONS_MAX: u32 = 256;
const CONNECTIONS_PER_PEER_MAX: u32 = 2;
const PENDING_CONNECTIONS_MAX: u32 = 64;
/// Most inbound connections from one IP address still in their handshake: one host cannot
/// hold every pending slot (each is held up to the 10 s handshake timeout) and keep the
/// others out. Admitted peers behind one NAT rarely handshake more than a few at once.
const PENDING_CONNECTIONS_PER_IP_MAX: u32 = 8;
/// Most stream events (mostly received messages) waiting for the driver. A full queue
/// stops the readers, and TCP flow control then slows the peers that send too much,
/// instead of received messages piling up in memory.
const TASK_EVENTS_MAX: usize = 64;

/// What the network reports to the driver.
#[derive(Debug)]
pub enum NetEvent {
    /// First connection to a peer.
    Connected(NodeId),
    /// Last connection to a peer closed.
    Disconnected(NodeId),
    /// A message from a peer.
    Message {
        /// The peer.
        from: NodeId,
        /// The message.
        bytes: Vec<u8>,
    },
    /// A peer that is not admitted (not a member, or not trusted) connected and was
    /// refused; with the address it came from or was dialled at.
    Refused(NodeId, String),
    /// Nothing for the core (internal bookkeeping happened).
    Nothing,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: membership::Behaviour,
    per_ip: per_ip::Behaviour,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    streams: libp2p_stream::Behaviour,
}

/// The queue of one connected peer, drained by its writer task.
struct Outbox {
    queue: mpsc::Sender<Vec<u8>>,
    /// Bytes in `queue`, bounded by [`QUEUE_BYTES_MAX`]: the message bound alone would let
    /// a peer that stops reading hold 16,384 messages of up to 8 MiB.
    queued_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Which connection of the peer the writer serves.
    generation: u64,
}

/// What the stream tasks tell the network.
enum TaskEvent {
    /// A new inbound stream of the peer, and the reader task that will read it once told
    /// to start (so that this event comes before any of its frames).
    Opened {
        peer: PeerId,
        stream: u64,
        reader: tokio::task::AbortHandle,
        start: tokio::sync::oneshot::Sender<()>,
    },
    /// A frame arrived on an inbound stream.
    Frame {
        peer: PeerId,
        stream: u64,
        bytes: Vec<u8>,
    },
    /// A stream failed or ended: messages may be lost, so the connection must go (unless
    /// the stream is no longer the peer's current one).
    Failed {
        peer: PeerId,
        stream: StreamOf,
        error: String,
    },
}

/// Which stream a task served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamOf {
    /// The writer of this connection generation.
    Writer(u64),
    /// The inbound stream with this number.
    Reader(u64),
}

/// The peer-to-peer side of a node.
pub struct Net {
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    outboxes: BTreeMap<PeerId, Outbox>,
    next_generation: u64,
    /// Each connected peer's current inbound stream and its reader; frames of any other
    /// are dropped, and an older reader is stopped: one live inbound stream per peer.
    inbound: BTreeMap<PeerId, (u64, tokio::task::AbortHandle)>,
    tasks_tx: mpsc::Sender<TaskEvent>,
    tasks: mpsc::Receiver<TaskEvent>,
    bootstrap: Vec<Multiaddr>,
    listening: BTreeSet<Multiaddr>,
    /// Which peer answered at each bootstrap address.
    dialed: BTreeMap<Multiaddr, PeerId>,
    /// When each bootstrap address may be dialled again.
    backoff: BTreeMap<Multiaddr, Backoff>,
}

/// First and longest wait between dials of a bootstrap address that does not answer.
const REDIAL_DELAY_MIN_MS: u64 = 1_000;
const REDIAL_DELAY_MAX_MS: u64 = 30_000;

/// Exponential backoff for one bootstrap address: the wait doubles after each dial, up to
/// [`REDIAL_DELAY_MAX_MS`], and starts again from the minimum when a connection the peer
/// used drops (a peer that just went away is most likely back soon).
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next_ms: u64,
    delay_ms: u64,
}

impl Backoff {
    /// Whether the address may be dialled at `now_ms`; if so, notes the dial and doubles
    /// the wait before the next.
    fn dial_due(&mut self, now_ms: u64) -> bool {
        if self.next_ms > now_ms {
            return false;
        }
        self.next_ms = now_ms + self.delay_ms;
        self.delay_ms = (self.delay_ms * 2).min(REDIAL_DELAY_MAX_MS);
        true
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next_ms: 0,
            delay_ms: REDIAL_DELAY_MIN_MS,
        }
    }
}

impl Net {
    /// Starts listening, dials the bootstrap peers and, with `mdns`, finds peers on the
    /// local network (mDNS sends multicast: tests and the demo turn it off).
    pub fn start(
        secret: [u8; 32],
        listen: &[String],
        peers: &[String],
        use_mdns: bool,
    ) -> anyhow::Result<Net> {
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(secret)
            .context("the node key is not an ed25519 key")?;
        for address in listen {
            check_port_free(address)?;
        }
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(CONNECTIONS_MAX))
            .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX))
            .with_max_pending_incoming(Some(PENDING_CONNECTIONS_MAX))
            .with_max_pending_outgoing(Some(PENDING_CONNECTIONS_MAX));
        let builder = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .context("cannot set up TCP with Noise and Yamux")?;
        // QUIC (`--features quic`): listen on `/ip4/…/udp/PORT/quic-v1` addresses too. It
        // pulls in quinn and ring, about 40% more to a clean build, so it is opt-in.
        #[cfg(feature = "quic")]
        let builder = builder.with_quic();
        let mut swarm = builder
            .with_behaviour(|key| Behaviour {
                members: membership::Behaviour::default(),
                per_ip: per_ip::Behaviour::new(PENDING_CONNECTIONS_PER_IP_MAX),
                limits: connection_limits::Behaviour::new(limits),
                mdns: Toggle::from(
                    use_mdns
                        .then(|| {
                            mdns::tokio::Behaviour::new(
                                mdns::Config::default(),
                                key.public().to_peer_id(),
                            )
                        })
                        .transpose()
                        .unwrap_or_else(|error| {
                            tracing::warn!(%error, "mDNS is unavailable; peers must be named");
                            None
                        }),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/mesh/1.0.0".into(),
                    key.public(),
                )),
                streams: libp2p_stream::Behaviour::new(),
            })
            .context("cannot build the network behaviour")?
            .with_swarm_config(|config| {
                config.with_idle_connection_timeout(Duration::from_secs(3600))
            })
            .build();
        for address in listen {
            let address: Multiaddr = address.parse().with_context(|| {
                format!("`{address}` is not a multiaddr like /ip4/0.0.0.0/tcp/4001")
            })?;
            swarm
                .listen_on(address.clone())
                .with_context(|| format!("cannot listen on {address}"))?;
        }
        let bootstrap = peers
            .iter()
            .map(|peer| {
                peer.parse().with_context(|| {
                    format!("peer `{peer}` is not a multiaddr like /ip4/10.0.0.2/tcp/4001")
                })
            })
            .collect::<anyhow::Result<Vec<Multiaddr>>>()?;
        let mut control = swarm.behaviour().streams.new_control();
        let incoming = control
            .accept(PROTOCOL)
            .context("the message protocol is registered twice")?;
        let (tasks_tx, tasks) = mpsc::channel(TASK_EVENTS_MAX);
        tokio::spawn(accept_streams(incoming, tasks_tx.clone()));
        // No dial here: the driver's redial timer fires at once and dials with the clock.
        Ok(Net {
            swarm,
            control,
            outboxes: BTreeMap::new(),
            next_generation: 0,
            inbound: BTreeMap::new(),
            tasks_tx,
            tasks,
            bootstrap,
            listening: BTreeSet::new(),
            dialed: BTreeMap::new(),
            backoff: BTreeMap::new(),
        })
    }

    /// The addresses the node listens on.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listening.iter().map(ToString::to_string).collect()
    }

    /// Dials every bootstrap address whose peer is not connected and whose backoff has
    /// passed (`now_ms`: the clock in milliseconds). Called on start and on a timer.
    pub fn redial(&mut self, now_ms: u64) {
        let connected: BTreeSet<PeerId> = self.swarm.connected_peers().copied().collect();
        for address in self.bootstrap.clone() {
            let known = address.iter().find_map(|part| match part {
                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            let learned = self.dialed.get(&address).copied();
            if known
                .or(learned)
                .is_some_and(|peer| connected.contains(&peer))
            {
                continue;
            }
            if !self
                .backoff
                .entry(address.clone())
                .or_default()
                .dial_due(now_ms)
            {
                continue;
            }
            if let Err(error) = self.swarm.dial(address.clone()) {
                tracing::debug!(%address, %error, "dial failed");
            }
        }
    }

    /// Sets who may connect: `None` lets anyone (no policy in force); otherwise only these
    /// node ids. Connections from others are refused during the handshake, before any
    /// message, and current connections of non-members are closed.
    pub fn set_members(&mut self, members: Option<Vec<NodeId>>) {
        let members = members.map(|nodes| nodes.iter().filter_map(peer_id).collect());
        self.swarm.behaviour_mut().members.set(members);
    }

    /// Queues a message to a peer; its writer task sends it in order.
    pub fn send(&mut self, to: NodeId, bytes: Vec<u8>) {
        let Some(peer) = peer_id(&to) else {
            return;
        };
        let Some(outbox) = self.outboxes.get(&peer) else {
            return;
        };
        use std::sync::atomic::Ordering;
        let length = bytes.len();
        if outbox.queued_bytes.load(Ordering::Relaxed) + length > QUEUE_BYTES_MAX {
            tracing::warn!(%peer, "peer is not keeping up ({QUEUE_BYTES_MAX} bytes queued); disconnecting");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        outbox.queued_bytes.fetch_add(length, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Full(_)) = outbox.queue.try_send(bytes) {
            outbox.queued_bytes.fetch_sub(length, Ordering::Relaxed);
            tracing::warn!(%peer, "peer is not keeping up; disconnecting");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Drops the connection to a peer.
    pub fn disconnect(&mut self, peer: NodeId) {
        if let Some(peer) = peer_id(&peer) {
            if self.swarm.behaviour().members.lingers(&peer) {
                // A dialled peer that is not admitted: the gate closes it a moment later,
                // once the other side has seen it (see `membership`).
                return;
            }
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// The next event for the core.
    pub async fn next(&mut self) -> NetEvent {
        tokio::select! {
            event = self.swarm.select_next_some() => self.handle(event),
            Some(event) = self.tasks.recv() => self.task_event(event),
        }
    }

    fn task_event(&mut self, event: TaskEvent) -> NetEvent {
        match event {
            TaskEvent::Opened {
                peer,
                stream,
                reader,
                start,
            } => {
                // The newest stream of a connected peer wins; the reader of any other stops.
                let newer = self
                    .inbound
                    .get(&peer)
                    .is_none_or(|(current, _)| stream > *current);
                if self.outboxes.contains_key(&peer) && newer {
                    if let Some((_, old)) = self.inbound.insert(peer, (stream, reader)) {
                        old.abort();
                    }
                    let _ = start.send(());
                } else {
                    reader.abort();
                }
                NetEvent::Nothing
            }
            TaskEvent::Frame {
                peer,
                stream,
                bytes,
            } => match (
                self.inbound.get(&peer).map(|(current, _)| *current) == Some(stream),
                node_id(&peer),
            ) {
                (true, Some(from)) => NetEvent::Message { from, bytes },
                _ => NetEvent::Nothing,
            },
            TaskEvent::Failed {
                peer,
                stream,
                error,
            } => {
                let current = match stream {
                    StreamOf::Writer(generation) => self
                        .outboxes
                        .get(&peer)
                        .is_some_and(|outbox| outbox.generation == generation),
                    StreamOf::Reader(id) => {
                        self.inbound.get(&peer).map(|(current, _)| *current) == Some(id)
                    }
                };
                if current {
                    // Lost messages: the core expects the connection to drop with them.
                    tracing::warn!(%peer, %error, "the message stream failed; reconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                NetEvent::Nothing
            }
        }
    }

    fn handle(&mut self, event: SwarmEvent<BehaviourEvent>) -> NetEvent {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening for peers");
                self.listening.insert(address);
                NetEvent::Nothing
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.dialed.insert(address.clone(), peer_id);
                }
                match (num_established.get(), node_id(&peer_id)) {
                    (1, Some(node)) => {
                        tracing::info!(peer = %peer_id, "peer connected");
                        self.next_generation += 1;
                        let generation = self.next_generation;
                        let (queue, queued) = mpsc::channel(QUEUE_MESSAGES_MAX);
                        let queued_bytes = std::sync::Arc::default();
                        tokio::spawn(write_stream(
                            self.control.clone(),
                            peer_id,
                            generation,
                            queued,
                            std::sync::Arc::clone(&queued_bytes),
                            self.tasks_tx.clone(),
                        ));
                        self.outboxes.insert(
                            peer_id,
                            Outbox {
                                queue,
                                queued_bytes,
                                generation,
                            },
                        );
                        if let Some((_, reader)) = self.inbound.remove(&peer_id) {
                            reader.abort();
                        }
                        NetEvent::Connected(node)
                    }
                    (_, None) => {
                        // Only ed25519 keys can be node ids.
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                        NetEvent::Nothing
                    }
                    _ => NetEvent::Nothing,
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.outboxes.remove(&peer_id);
                // Only a connection the peer used (it opened its message stream) resets the
                // backoff: one it refused at the handshake (not a member of its policy)
                // must not be redialled every second.
                if let Some((_, reader)) = self.inbound.remove(&peer_id) {
                    reader.abort();
                    for (address, _) in self.dialed.iter().filter(|(_, peer)| **peer == peer_id) {
                        self.backoff.remove(address);
                    }
                }
                tracing::info!(peer = %peer_id, "peer disconnected");
                node_id(&peer_id).map_or(NetEvent::Nothing, NetEvent::Disconnected)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Members(membership::Refused(peer, address))) => {
                tracing::warn!(%peer, %address, "refused a connection from a node that is not admitted (not a policy member, or not trusted: `mesh peers approve`)");
                node_id(&peer).map_or(NetEvent::Nothing, |node| {
                    NetEvent::Refused(node, address.to_string())
                })
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let connected: BTreeSet<PeerId> = self.swarm.connected_peers().copied().collect();
                for (peer, address) in found {
                    if !connected.contains(&peer) {
                        tracing::info!(%peer, %address, "found a peer on the local network");
                        let _ = self.swarm.dial(address);
                    }
                }
                NetEvent::Nothing
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "could not connect");
                NetEvent::Nothing
            }
            _ => NetEvent::Nothing,
        }
    }
}

fn node_id(peer: &PeerId) -> Option<NodeId> {
    peer.to_string().parse().ok()
}

/// Opens the stream to a peer and writes its queued messages into it, in order, as
/// `[length u32 BE][bytes]` frames, everything waiting at once in one write.
async fn write_stream(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    generation: u64,
    mut queued: mpsc::Receiver<Vec<u8>>,
    queued_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    events: mpsc::Sender<TaskEvent>,
) {
    use std::sync::atomic::Ordering;
    let failed = |error: String| TaskEvent::Failed {
        peer,
        stream: StreamOf::Writer(generation),
        error,
    };
    let mut stream = match control.open_stream(peer, PROTOCOL).await {
        Ok(stream) => stream,
        Err(error) => {
            let _ = events
                .send(failed(format!("cannot open the message stream: {error}")))
                .await;
            return;
        }
    };
    let mut buffer = Vec::new();
    while let Some(first) = queued.recv().await {
        buffer.clear();
        frame(&mut buffer, &first);
        queued_bytes.fetch_sub(first.len(), Ordering::Relaxed);
        while buffer.len() < WRITE_BYTES_MAX
            && let Ok(next) = queued.try_recv()
        {
            frame(&mut buffer, &next);
            queued_bytes.fetch_sub(next.len(), Ordering::Relaxed);
        }
        let written = async {
            stream.write_all(&buffer).await?;
            stream.flush().await
        };
        if let Err(error) = written.await {
            let _ = events.send(failed(error.to_string())).await;
            return;
        }
    }
    // The peer disconnected: its queue was dropped.
    let _ = stream.close().await;
}

fn frame(buffer: &mut Vec<u8>, message: &[u8]) {
    buffer.extend_from_slice(&(message.len() as u32).to_be_bytes());
    buffer.extend_from_slice(message);
}

/// Takes every inbound message stream and starts a reader for it.
async fn accept_streams(
    mut incoming: libp2p_stream::IncomingStreams,
    events: mpsc::Sender<TaskEvent>,
) {
    let mut next_stream = 0u64;
    while let Some((peer, stream)) = incoming.next().await {
        next_stream += 1;
        let (start, started) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(read_stream(
            peer,
            next_stream,
            stream,
            started,
            events.clone(),
        ))
        .abort_handle();
        let opened = TaskEvent::Opened {
            peer,
            stream: next_stream,
            reader,
            start,
        };
        if events.send(opened).await.is_err() {
            return;
        }
    }
}

/// Reads frames from one inbound stream until it ends; a frame over the size limit or a
/// broken stream fails it.
async fn read_stream(
    peer: PeerId,
    stream_id: u64,
    mut stream: libp2p::Stream,
    started: tokio::sync::oneshot::Receiver<()>,
    events: mpsc::Sender<TaskEvent>,
) {
    // Told to start once the network made this the peer's current stream (a stale one is
    // aborted instead).
    if started.await.is_err() {
        return;
    }
    loop {
        let failed = |error: String| TaskEvent::Failed {
            peer,
            stream: StreamOf::Reader(stream_id),
            error,
        };
        let length = match read_u32(&mut stream).await {
            Ok(length) => length as usize,
            // Ended or broken: if this is still the peer's current stream (its connection
            // is still up), messages may have been lost with it.
            Err(error) => {
                let _ = events.send(failed(error.to_string())).await;
                return;
            }
        };
        if length > MESSAGE_BYTES_MAX {
            let _ = events
                .send(failed(format!(
                    "a {length}-byte message; the limit is {MESSAGE_BYTES_MAX}"
                )))
                .await;
            return;
        }
        // Grown as the bytes arrive: a peer that announces 8 MiB and sends nothing costs
        // nothing.
        let mut bytes = Vec::with_capacity(length.min(FRAME_PREALLOCATE_MAX));
        let read = (&mut stream)
            .take(length as u64)
            .read_to_end(&mut bytes)
            .await;
        if let Err(error) = read {
            let _ = events.send(failed(error.to_string())).await;
            return;
        }
        if bytes.len() != length {
            let _ = events
                .send(failed("the stream ended inside a frame".into()))
                .await;
            return;
        }
        let frame = TaskEvent::Frame {
            peer,
            stream: stream_id,
            bytes,
        };
        if events.send(frame).await.is_err() {
            return;
        }
    }
}

async fn read_u32<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    io.read_exact(&mut bytes).await?;
    Ok(u32::from_be_bytes(bytes))
}

fn peer_id(node: &NodeId) -> Option<PeerId> {
    node.to_string().parse().ok()
}

/// Fails if a TCP listen address names a port something else already listens on. libp2p
/// listens with SO_REUSEPORT, so a second daemon on the same port would start and Linux
/// would share incoming connections between the two: peers meant for one would land on
/// the other. A plain bind (without SO_REUSEPORT) fails on a port in use, whoever holds it.
fn check_port_free(address: &str) -> anyhow::Result<()> {
    let Ok(address) = address.parse::<Multiaddr>() else {
        return Ok(());
    };
    let mut ip = None;
    let mut port = None;
    for part in address.iter() {
        match part {
            libp2p::multiaddr::Protocol::Ip4(v4) => ip = Some(std::net::IpAddr::V4(v4)),
            libp2p::multiaddr::Protocol::Ip6(v6) => ip = Some(std::net::IpAddr::V6(v6)),
            libp2p::multiaddr::Protocol::Tcp(number) => port = Some(number),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => anyhow::bail!(
            "TCP port {port} on {ip} is already in use (another mesh daemon, or another program): choose another --listen address in config.toml"
        ),
        Err(error) => Err(error).with_context(|| format!("cannot listen on {address}")),
    }
}

/// Bounds the inbound connections one IP address has in their handshake.
mod per_ip {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::net::IpAddr;
    use std::task::{Context, Poll};

    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    };
    use libp2p::{Multiaddr, PeerId};

    #[derive(Debug)]
    struct TooManyPending(IpAddr, u32);

    impl std::fmt::Display for TooManyPending {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{} already has {} connections in their handshake",
                self.0, self.1
            )
        }
    }

    impl std::error::Error for TooManyPending {}

    pub struct Behaviour {
        max: u32,
        /// The address of each pending inbound connection this behaviour counted.
        pending: BTreeMap<ConnectionId, IpAddr>,
        per_ip: BTreeMap<IpAddr, u32>,
    }

    impl Behaviour {
        pub fn new(max: u32) -> Behaviour {
            Behaviour {
                max,
                pending: BTreeMap::new(),
                per_ip: BTreeMap::new(),
            }
        }

        /// The handshake ended, in a connection or in a failure.
        fn settled(&mut self, connection: ConnectionId) {
            let Some(ip) = self.pending.remove(&connection) else {
                return;
            };
            if let Some(count) = self.per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
    }

    fn ip_of(address: &Multiaddr) -> Option<IpAddr> {
        address.iter().find_map(|protocol| match protocol {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })
    }

    impl NetworkBehaviour for Behaviour {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = Infallible;

        fn handle_pending_inbound_connection(
            &mut self,
            connection: ConnectionId,
            _: &Multiaddr,
            remote: &Multiaddr,
        ) -> Result<(), ConnectionDenied> {
            let Some(ip) = ip_of(remote) else {
                return Ok(());
            };
            let count = self.per_ip.entry(ip).or_default();
            if *count >= self.max {
                tracing::debug!(%ip, "refused: too many connections in their handshake");
                return Err(ConnectionDenied::new(TooManyPending(ip, *count)));
            }
            *count += 1;
            self.pending.insert(connection, ip);
            Ok(())
        }

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm) {
            match event {
                FromSwarm::ConnectionEstablished(established) => {
                    self.settled(established.connection_id)
                }
                FromSwarm::ListenFailure(failure) => self.settled(failure.connection_id),
                FromSwarm::ConnectionClosed(closed) => self.settled(closed.connection_id),
                _ => {}
            }
        }

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            event: THandlerOutEvent<Self>,
        ) {
            let never: Infallible = event;
            match never {}
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
            Poll::Pending
        }
    }
}

/// Refuses connections from peers that are not members of the policy in force.
mod membership {
    use std::collections::{BTreeSet, VecDeque};
    use std::convert::Infallible;
    use std::task::{Context, Poll, Waker};

    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;
    use libp2p::swarm::{
        CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
    };
    use libp2p::{Multiaddr, PeerId};

    /// How long a dialled, not admitted peer's connection stays open (carrying nothing).
    const LINGER: std::time::Duration = std::time::Duration::from_millis(500);

    /// A peer was refused, with its address.
    #[derive(Debug)]
    pub struct Refused(pub PeerId, pub Multiaddr);

    #[derive(Debug)]
    struct NotAMember(PeerId);

    impl std::fmt::Display for NotAMember {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{} is not admitted: not a member of the org's policy, or (without a policy) not a trusted peer",
                self.0
            )
        }
    }

    impl std::error::Error for NotAMember {}

    /// `members` is `None` for an open mesh: everyone may connect. Otherwise the policy's
    /// members, or without a policy the trusted peers.
    #[derive(Default)]
    pub struct Behaviour {
        members: Option<BTreeSet<PeerId>>,
        refused: VecDeque<(PeerId, Multiaddr)>,
        /// Dialled peers that are not admitted, let through the transport and closed when
        /// the timer fires: the other side then sees the connection and can list this node
        /// as pending (closed at once, it fails before the other side counts it).
        lingering: BTreeSet<PeerId>,
        linger_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        close: VecDeque<PeerId>,
        connected: BTreeSet<PeerId>,
        waker: Option<Waker>,
    }

    impl Behaviour {
        /// Whether `peer` is a dialled, not admitted peer that the gate closes itself.
        pub fn lingers(&self, peer: &PeerId) -> bool {
            self.lingering.contains(peer)
        }

        pub fn set(&mut self, members: Option<BTreeSet<PeerId>>) {
            if let Some(members) = &members {
                self.close
                    .extend(self.connected.iter().filter(|peer| !members.contains(peer)));
            }
            self.members = members;
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }

        /// Refuses a peer that is not admitted, and reports it with its address. A
        /// connection this node dialled is let through the transport (the core refuses it
        /// at once, before any message): denied here too, it would close before the other
        /// side had counted it, and that side could never list this node as pending.
        fn enforce(
            &mut self,
            peer: PeerId,
            address: &Multiaddr,
            dialled: bool,
        ) -> Result<(), ConnectionDenied> {
            match &self.members {
                Some(members) if !members.contains(&peer) => {
                    if self.refused.len() < 64 {
                        self.refused.push_back((peer, address.clone()));
                    }
                    if let Some(waker) = self.waker.take() {
                        waker.wake();
                    }
                    if dialled {
                        self.lingering.insert(peer);
                        if self.linger_timer.is_none() {
                            self.linger_timer = Some(Box::pin(tokio::time::sleep(LINGER)));
                        }
                        Ok(())
                    } else {
                        Err(ConnectionDenied::new(NotAMember(peer)))
                    }
                }
                _ => Ok(()),
            }
        }
    }

    impl NetworkBehaviour for Behaviour {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = Refused;

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            peer: PeerId,
            _: &Multiaddr,
            remote: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            self.enforce(peer, remote, false)?;
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            peer: PeerId,
            address: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            self.enforce(peer, address, true)?;
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm) {
            match event {
                FromSwarm::ConnectionEstablished(established) => {
                    self.connected.insert(established.peer_id);
                }
                FromSwarm::ConnectionClosed(closed) if closed.remaining_established == 0 => {
                    self.connected.remove(&closed.peer_id);
                }
                _ => {}
            }
        }

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            event: THandlerOutEvent<Self>,
        ) {
            let never: Infallible = event;
            match never {}
        }

        fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Refused, THandlerInEvent<Self>>> {
            if let Some((peer, address)) = self.refused.pop_front() {
                return Poll::Ready(ToSwarm::GenerateEvent(Refused(peer, address)));
            }
            if let Some(timer) = &mut self.linger_timer
                && timer.as_mut().poll(cx).is_ready()
            {
                self.linger_timer = None;
                let lingering = std::mem::take(&mut self.lingering);
                self.close.extend(lingering);
            }
            if let Some(peer) = self.close.pop_front() {
                return Poll::Ready(ToSwarm::CloseConnection {
                    peer_id: peer,
                    connection: CloseConnection::All,
                });
            }
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redial_waits_double_up_to_the_longest() {
        let mut backoff = Backoff::default();
        let mut dials = Vec::new();
        for second in 0..120u64 {
            if backoff.dial_due(second * 1000) {
                dials.push(second);
            }
        }
        assert_eq!(dials, [0, 1, 3, 7, 15, 31, 61, 91]);
    }
}
