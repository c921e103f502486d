//! Peers over libp2p: the only module that knows libp2p.
//!
//! TCP with Noise and Yamux; identify; connection limits; and one request-response protocol,
//! `/mesh/messages/1`, that carries the core's messages. The core needs messages in order
//! per connection (a round's changes before the round), and request-response runs each
//! request on its own stream, so each peer has one request in flight at a time: messages
//! that wait meanwhile travel together in the next request. A failed request means a lost
//! message, which the core treats as a dropped connection, so the peer is disconnected.
//!
//! The node's ed25519 key is the libp2p key, so a node id and a PeerId are the same text.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::Duration;

use anyhow::Context;
use crdt_schema::NodeId;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::mdns;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, noise, tcp, yamux,
};
use mesh_core::limits::MESSAGE_BYTES_MAX;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/messages/1");
/// Most messages batched in one request.
const BATCH_MESSAGES_MAX: usize = 256;
/// Most bytes in one request: a batch never splits a message, so one full message always fits.
const BATCH_BYTES_MAX: usize = MESSAGE_BYTES_MAX + 64 * 1024;
/// Most messages queued for one peer; past it the peer is too slow and is disconnected.
const QUEUE_MESSAGES_MAX: usize = 16_384;
/// Established connections, in all and per peer, and pending ones.
const CONNECTIONS_MAX: u32 = 256;
const CONNECTIONS_PER_PEER_MAX: u32 = 2;
const PENDING_CONNECTIONS_MAX: u32 = 64;

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
    /// A peer that is not a member tried to connect and was refused.
    Refused(NodeId),
    /// Nothing for the core (internal bookkeeping happened).
    Nothing,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: membership::Behaviour,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    messages: request_response::Behaviour<MessageCodec>,
}

#[derive(Default)]
struct Outbox {
    in_flight: Option<OutboundRequestId>,
    queued: Vec<Vec<u8>>,
}

/// The peer-to-peer side of a node.
pub struct Net {
    swarm: Swarm<Behaviour>,
    outboxes: BTreeMap<PeerId, Outbox>,
    bootstrap: Vec<Multiaddr>,
    listening: BTreeSet<Multiaddr>,
    /// Which peer answered at each bootstrap address.
    dialed: BTreeMap<Multiaddr, PeerId>,
    /// Messages that arrived in one request, handed to the core one at a time.
    inbox: std::collections::VecDeque<(NodeId, Vec<u8>)>,
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
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(CONNECTIONS_MAX))
            .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX))
            .with_max_pending_incoming(Some(PENDING_CONNECTIONS_MAX))
            .with_max_pending_outgoing(Some(PENDING_CONNECTIONS_MAX));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .context("cannot set up TCP with Noise and Yamux")?
            .with_behaviour(|key| Behaviour {
                members: membership::Behaviour::default(),
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
                messages: request_response::Behaviour::with_codec(
                    MessageCodec,
                    [(PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30))
                        .with_max_concurrent_streams(64),
                ),
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
        let mut net = Net {
            swarm,
            outboxes: BTreeMap::new(),
            bootstrap,
            listening: BTreeSet::new(),
            dialed: BTreeMap::new(),
            inbox: Default::default(),
        };
        net.redial();
        Ok(net)
    }

    /// The addresses the node listens on.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listening.iter().map(ToString::to_string).collect()
    }

    /// Dials every bootstrap address whose peer is not connected. Called on start and on a
    /// timer, which is the reconnect backoff.
    pub fn redial(&mut self) {
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

    /// Queues a message to a peer; sends it now if nothing is in flight to that peer.
    pub fn send(&mut self, to: NodeId, bytes: Vec<u8>) {
        let Ok(peer) = to.to_string().parse::<PeerId>() else {
            return;
        };
        let outbox = self.outboxes.entry(peer).or_default();
        if outbox.queued.len() >= QUEUE_MESSAGES_MAX {
            tracing::warn!(%peer, "peer is not keeping up; disconnecting");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        outbox.queued.push(bytes);
        self.flush(peer);
    }

    /// Drops the connection to a peer.
    pub fn disconnect(&mut self, peer: NodeId) {
        if let Ok(peer) = peer.to_string().parse::<PeerId>() {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn flush(&mut self, peer: PeerId) {
        let Some(outbox) = self.outboxes.get_mut(&peer) else {
            return;
        };
        if outbox.in_flight.is_some() || outbox.queued.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = outbox.queued.first() {
            if !batch.is_empty()
                && (batch.len() == BATCH_MESSAGES_MAX || bytes + next.len() > BATCH_BYTES_MAX)
            {
                break;
            }
            bytes += next.len();
            batch.push(outbox.queued.remove(0));
        }
        let id = self
            .swarm
            .behaviour_mut()
            .messages
            .send_request(&peer, batch);
        self.outboxes
            .get_mut(&peer)
            .expect("present above")
            .in_flight = Some(id);
    }

    /// The next event for the core.
    pub async fn next(&mut self) -> NetEvent {
        if let Some((from, bytes)) = self.inbox.pop_front() {
            return NetEvent::Message { from, bytes };
        }
        let event = self.swarm.select_next_some().await;
        self.handle(event)
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
                        self.outboxes.insert(peer_id, Outbox::default());
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
                tracing::info!(peer = %peer_id, "peer disconnected");
                node_id(&peer_id).map_or(NetEvent::Nothing, NetEvent::Disconnected)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Messages(event)) => self.message_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Members(membership::Refused(peer))) => {
                tracing::warn!(%peer, "refused a connection from a node that is not a member");
                node_id(&peer).map_or(NetEvent::Nothing, NetEvent::Refused)
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

    fn message_event(&mut self, event: request_response::Event<Vec<Vec<u8>>, ()>) -> NetEvent {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .messages
                        .send_response(channel, ());
                    let Some(from) = node_id(&peer) else {
                        return NetEvent::Nothing;
                    };
                    self.inbox
                        .extend(request.into_iter().map(|bytes| (from, bytes)));
                    match self.inbox.pop_front() {
                        Some((from, bytes)) => NetEvent::Message { from, bytes },
                        None => NetEvent::Nothing,
                    }
                }
                request_response::Message::Response { request_id, .. } => {
                    if let Some(outbox) = self.outboxes.get_mut(&peer)
                        && outbox.in_flight == Some(request_id)
                    {
                        outbox.in_flight = None;
                        self.flush(peer);
                    }
                    NetEvent::Nothing
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                // A lost message: the core expects the connection to drop with it.
                tracing::warn!(%peer, %error, "a message to the peer was lost; reconnecting");
                self.outboxes.remove(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
                NetEvent::Nothing
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound message failed");
                NetEvent::Nothing
            }
            request_response::Event::ResponseSent { .. } => NetEvent::Nothing,
        }
    }
}

fn node_id(peer: &PeerId) -> Option<NodeId> {
    peer.to_string().parse().ok()
}

/// Frames a batch of messages: `[count u32]` then `[length u32][bytes]` each, big-endian.
#[derive(Clone, Default)]
struct MessageCodec;

impl request_response::Codec for MessageCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<Vec<u8>>;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<Vec<u8>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let count = read_u32(io).await? as usize;
        if count > BATCH_MESSAGES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{count} messages in one batch; the limit is {BATCH_MESSAGES_MAX}"),
            ));
        }
        let mut messages = Vec::with_capacity(count);
        let mut total = 0usize;
        for _ in 0..count {
            let length = read_u32(io).await? as usize;
            total += length;
            if length > MESSAGE_BYTES_MAX || total > BATCH_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a {length}-byte message; the limit is {MESSAGE_BYTES_MAX}"),
                ));
            }
            let mut bytes = vec![0; length];
            io.read_exact(&mut bytes).await?;
            messages.push(bytes);
        }
        Ok(messages)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        messages: Vec<Vec<u8>>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let mut buffer =
            Vec::with_capacity(4 + messages.iter().map(|m| m.len() + 4).sum::<usize>());
        buffer.extend_from_slice(&(messages.len() as u32).to_be_bytes());
        for message in &messages {
            buffer.extend_from_slice(&(message.len() as u32).to_be_bytes());
            buffer.extend_from_slice(message);
        }
        io.write_all(&buffer).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, (): ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&[1]).await?;
        io.close().await
    }
}

async fn read_u32<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    io.read_exact(&mut bytes).await?;
    Ok(u32::from_be_bytes(bytes))
}

fn peer_id(node: &NodeId) -> Option<PeerId> {
    node.to_string().parse().ok()
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

    /// A peer was refused.
    #[derive(Debug)]
    pub struct Refused(pub PeerId);

    #[derive(Debug)]
    struct NotAMember(PeerId);

    impl std::fmt::Display for NotAMember {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} is not a member of the org's policy", self.0)
        }
    }

    impl std::error::Error for NotAMember {}

    /// `members` is `None` while no policy is in force: everyone may connect.
    #[derive(Default)]
    pub struct Behaviour {
        members: Option<BTreeSet<PeerId>>,
        refused: VecDeque<PeerId>,
        close: VecDeque<PeerId>,
        connected: BTreeSet<PeerId>,
        waker: Option<Waker>,
    }

    impl Behaviour {
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

        fn enforce(&mut self, peer: PeerId) -> Result<(), ConnectionDenied> {
            match &self.members {
                Some(members) if !members.contains(&peer) => {
                    self.refused.push_back(peer);
                    if let Some(waker) = self.waker.take() {
                        waker.wake();
                    }
                    Err(ConnectionDenied::new(NotAMember(peer)))
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
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            self.enforce(peer)?;
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            peer: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            self.enforce(peer)?;
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
            if let Some(peer) = self.refused.pop_front() {
                return Poll::Ready(ToSwarm::GenerateEvent(Refused(peer)));
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
