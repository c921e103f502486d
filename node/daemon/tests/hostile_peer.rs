//! A hand-made libp2p peer against real daemons on loopback: it speaks the message protocol
//! byte by byte, so it can send what no honest node sends (crafted changes, requests it
//! never reads the answers to, many streams at once) and watch what the daemon does.
//!
//! Every wait polls with a deadline; daemons are killed and the peer's thread stopped on
//! drop.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use common::*;
use crdt_schema::record::Edit;
use crdt_schema::{Envelope, FieldValue, Identity, OrgId, RecordDoc, RecordId, VerifiedChange};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use mesh_core::wire::{EnvelopeBytes, Message, Need};
use tokio::sync::mpsc;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/stream/1");

/// What the test asks the peer's thread to do.
enum Order {
    /// Open a new outbound message stream to the daemon.
    OpenStream,
    /// Write these raw bytes to stream number `stream` (in opening order, from 0).
    Write { stream: usize, bytes: Vec<u8> },
}

/// What the peer's thread reports.
#[derive(Debug)]
enum Report {
    Connected,
    Disconnected,
    StreamOpened(usize),
    /// A frame the daemon sent (only when the peer reads its inbound streams).
    Message(Vec<u8>),
    /// A write to stream `stream` finished, or failed (the daemon dropped the stream).
    Written {
        stream: usize,
        ok: bool,
    },
}

/// A libp2p node with the daemon's transport (TCP, Noise, Yamux) and message protocol, run
/// on a thread of its own; stopped when dropped.
struct HandMadePeer {
    orders: Option<mpsc::UnboundedSender<Order>>,
    reports: std_mpsc::Receiver<Report>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Reports no wait has claimed yet.
    unclaimed: std::collections::VecDeque<Report>,
}

impl HandMadePeer {
    /// Dials `address` as `identity`. With `read_inbound` false the peer accepts the
    /// daemon's stream but never reads it, as a peer that stopped reading would.
    fn dial(identity: &Identity, address: &str, read_inbound: bool) -> HandMadePeer {
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(identity.secret_bytes())
            .expect("an ed25519 key");
        let address: Multiaddr = address.parse().expect("a multiaddr");
        let (orders, orders_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports) = std_mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(run_peer(
                keypair,
                address,
                read_inbound,
                orders_rx,
                reports_tx,
            ));
        });
        let mut peer = HandMadePeer {
            orders: Some(orders),
            reports,
            thread: Some(thread),
            unclaimed: Default::default(),
        };
        peer.wait_for("the connection", |report| {
            matches!(report, Report::Connected).then_some(())
        });
        peer
    }

    /// Opens a message stream; returns its number.
    fn open_stream(&mut self) -> usize {
        self.order(Order::OpenStream);
        self.wait_for("a stream", |report| match report {
            Report::StreamOpened(stream) => Some(*stream),
            _ => None,
        })
    }

    /// Sends one framed message on `stream`.
    fn send(&mut self, stream: usize, message: &[u8]) {
        let mut bytes = (message.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(message);
        self.write_raw(stream, bytes);
    }

    fn write_raw(&mut self, stream: usize, bytes: Vec<u8>) {
        self.order(Order::Write { stream, bytes });
    }

    /// Writes raw bytes to `stream` and waits until they are written (true) or the write
    /// failed because the daemon dropped the stream (false).
    fn write_and_wait(&mut self, stream: usize, bytes: Vec<u8>) -> bool {
        self.write_raw(stream, bytes);
        self.wait_for("a write", |report| match report {
            Report::Written { stream: done, ok } if *done == stream => Some(*ok),
            _ => None,
        })
    }

    /// Opens a stream and says hello as an honest node of the default org would.
    fn greet(&mut self) -> usize {
        let stream = self.open_stream();
        let hello = Message::Hello {
            name: "hand-made".into(),
            scope: None,
            policy: None,
            org: *OrgId::default().as_bytes(),
        };
        self.send(stream, &hello.encode());
        stream
    }

    fn order(&mut self, order: Order) {
        let _ = self.orders.as_ref().expect("running").send(order);
    }

    /// Waits until a report matches (one that came earlier and matched nothing counts
    /// too); panics at the deadline. Reports that do not match are kept for later waits.
    fn wait_for<T>(&mut self, what: &str, mut matches: impl FnMut(&Report) -> Option<T>) -> T {
        self.wait_until(DEADLINE, &mut matches)
            .unwrap_or_else(|| panic!("timed out waiting for {what}"))
    }

    fn wait_until<T>(
        &mut self,
        wait: Duration,
        matches: &mut impl FnMut(&Report) -> Option<T>,
    ) -> Option<T> {
        if let Some(position) = self.unclaimed.iter().position(|r| matches(r).is_some()) {
            let report = self.unclaimed.remove(position).expect("in range");
            return matches(&report);
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let report = self.reports.recv_timeout(left).ok()?;
            if let Some(value) = matches(&report) {
                return Some(value);
            }
            self.unclaimed.push_back(report);
        }
    }

    /// Whether the daemon closed the connection within `wait`.
    fn disconnected_within(&mut self, wait: Duration) -> bool {
        self.wait_until(wait, &mut |report| {
            matches!(report, Report::Disconnected).then_some(())
        })
        .is_some()
    }
}

impl Drop for HandMadePeer {
    fn drop(&mut self) {
        // Dropping the order channel ends the peer's loop, and its runtime with it.
        self.orders.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn run_peer(
    keypair: libp2p::identity::Keypair,
    address: Multiaddr,
    read_inbound: bool,
    mut orders: mpsc::UnboundedReceiver<Order>,
    reports: std_mpsc::Sender<Report>,
) {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("TCP")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("a behaviour")
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let mut control = swarm.behaviour().new_control();
    let mut incoming = control.accept(PROTOCOL).expect("the protocol");
    swarm.dial(address).expect("dials");
    let mut daemon: Option<PeerId> = None;
    // One writer task per outbound stream, fed through its own channel.
    let mut writers: Vec<mpsc::UnboundedSender<Vec<u8>>> = Vec::new();
    // Inbound streams the peer holds without reading.
    let mut unread: Vec<libp2p::Stream> = Vec::new();
    let (opened_tx, mut opened) = mpsc::unbounded_channel();
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                libp2p::swarm::SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    daemon = Some(peer_id);
                    let _ = reports.send(Report::Connected);
                }
                libp2p::swarm::SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                    let _ = reports.send(Report::Disconnected);
                }
                _ => {}
            },
            Some((_, mut stream)) = incoming.next() => {
                if read_inbound {
                    let reports = reports.clone();
                    tokio::spawn(async move {
                        loop {
                            let mut length = [0u8; 4];
                            if stream.read_exact(&mut length).await.is_err() {
                                return;
                            }
                            let mut bytes = vec![0u8; u32::from_be_bytes(length) as usize];
                            if stream.read_exact(&mut bytes).await.is_err() {
                                return;
                            }
                            let _ = reports.send(Report::Message(bytes));
                        }
                    });
                } else {
                    unread.push(stream);
                }
            }
            Some((number, writer)) = opened.recv() => {
                while writers.len() <= number {
                    writers.push(mpsc::unbounded_channel().0);
                }
                writers[number] = writer;
                let _ = reports.send(Report::StreamOpened(number));
            }
            order = orders.recv() => match order {
                None => return,
                Some(Order::OpenStream) => {
                    let number = writers.len();
                    // Reserve the number now; the writer arrives once the stream is open.
                    writers.push(mpsc::unbounded_channel().0);
                    let mut control = control.clone();
                    let peer = daemon.expect("connected");
                    let opened_tx = opened_tx.clone();
                    let written = reports.clone();
                    tokio::spawn(async move {
                        let Ok(mut stream) = control.open_stream(peer, PROTOCOL).await else {
                            return;
                        };
                        let (writer, mut chunks) = mpsc::unbounded_channel::<Vec<u8>>();
                        let _ = opened_tx.send((number, writer));
                        while let Some(chunk) = chunks.recv().await {
                            let ok = stream.write_all(&chunk).await.is_ok()
                                && stream.flush().await.is_ok();
                            let _ = written.send(Report::Written { stream: number, ok });
                            if !ok {
                                return;
                            }
                        }
                    });
                }
                Some(Order::Write { stream, bytes }) => {
                    let sent = writers.get(stream).is_some_and(|writer| writer.send(bytes).is_ok());
                    if !sent {
                        let _ = reports.send(Report::Written { stream, ok: false });
                    }
                }
            },
        }
    }
}

fn counter(dir: &Path, name: &str) -> u64 {
    status(dir)["counters"][name].as_u64().unwrap_or(0)
}

fn digest(dir: &Path) -> String {
    status(dir)["digest"].as_str().expect("a digest").to_owned()
}

fn push(envelopes: &[&Envelope]) -> Vec<u8> {
    Message::Push {
        changes: envelopes
            .iter()
            .map(|envelope| EnvelopeBytes(envelope.as_bytes().to_vec()))
            .collect(),
    }
    .encode()
}

/// Crafted changes of every class the door must stop, each signed by a key of its own over
/// exactly the bytes sent (so only the door, not the signature check, can refuse them).
struct Crafted {
    /// A valid change that makes `stock/x`, and an edit of it with one byte of its op
    /// columns rewritten so that Automerge panics applying it.
    base: VerifiedChange,
    op_column_mutation: VerifiedChange,
    unknown_column: Envelope,
    non_canonical_run: Envelope,
    compressed_bomb: Envelope,
}

fn crafted() -> Crafted {
    let (first, second) = (Identity::from_seed(70), Identity::from_seed(71));
    let org = OrgId::default();
    let (base_doc, edit) =
        crdt_schema::crafted::edit_of_anothers_objects(&first.node_id(), &second.node_id());
    let record: RecordId = "stock/x".parse().unwrap();
    let base_change = base_doc.changes_after(&[]).pop().unwrap();
    crdt_schema::guard::quiet_guarded_panics();
    let mutant = crdt_schema::crafted::panicking_mutant(&base_doc, &edit)
        .expect("some mutant of the edit panics Automerge");
    let unknown_column = crdt_schema::crafted::with_unknown_column(edit.raw_bytes());
    let non_canonical =
        crdt_schema::crafted::non_canonical_mutant(&edit).expect("a non-canonical mutant");
    let other: RecordId = "stock/y".parse().unwrap();
    // About 8 MB of one repeated byte: a few kilobytes compressed.
    let mut bomb_doc = RecordDoc::new(&second.node_id());
    let bomb_edit = Edit::Put(
        [(
            "blob".to_owned(),
            crdt_schema::FieldEdit::Set(FieldValue::Str("z".repeat(8_000_000))),
        )]
        .into(),
    );
    let mut bomb = bomb_doc.edit(&bomb_edit, 0).unwrap().unwrap();
    let compressed = bomb.bytes().into_owned();
    assert_eq!(compressed[8], 2, "a compressed chunk");
    let bomb_signed = VerifiedChange::sign(&second, &org, other.clone(), bomb);
    Crafted {
        base: VerifiedChange::sign(&first, &org, record.clone(), base_change),
        op_column_mutation: VerifiedChange::sign(&second, &org, record, mutant),
        unknown_column: crdt_schema::crafted::sign_raw(&second, &org, &other, &unknown_column),
        non_canonical_run: crdt_schema::crafted::sign_raw(&second, &org, &other, &non_canonical),
        compressed_bomb: Envelope::encode(&other, &compressed, &bomb_signed.signature()),
    }
}

#[test]
fn crafted_changes_of_every_class_leave_the_node_serving_restartable_and_converging() {
    let crafted = crafted();
    let (a, b) = (TempDir::new("crafted-a"), TempDir::new("crafted-b"));
    init(&a.0, "a");
    init(&b.0, "b");
    let daemon_b = start(&b.0);
    let b_addr = listen_addr(&b.0);
    let daemon_a = start_with_peers(&a.0, std::slice::from_ref(&b_addr));
    let a_addr = listen_addr(&a.0);
    mesh_ok(&a.0, &["put", "stock", "honest", "count=1"]);
    eventually("a and b in step", || {
        (digest(&a.0) == digest(&b.0)).then_some(())
    });

    let attacker = Identity::from_seed(72);
    // The door's refusals: each costs the sender its connection, so each has its own.
    for (class, envelope) in [
        ("unknown op column", &crafted.unknown_column),
        ("non-canonical run", &crafted.non_canonical_run),
        ("compressed bomb", &crafted.compressed_bomb),
    ] {
        let before = counter(&a.0, "changes_rejected");
        let mut peer = HandMadePeer::dial(&attacker, &a_addr, true);
        let stream = peer.greet();
        peer.send(stream, &push(&[envelope]));
        assert!(
            peer.disconnected_within(DEADLINE),
            "{class}: the sender is disconnected"
        );
        assert_eq!(
            counter(&a.0, "changes_rejected"),
            before + 1,
            "{class}: counted once"
        );
        assert!(!has_record(&a.0, "stock", "y"), "{class}: nothing applied");
    }
    // The op-column mutation passes the door (it is canonical) and fails only against the
    // record it edits: it is set aside, never applied.
    let mut peer = HandMadePeer::dial(&attacker, &a_addr, true);
    let stream = peer.greet();
    peer.send(
        stream,
        &push(&[&crafted.base.envelope, &crafted.op_column_mutation.envelope]),
    );
    eventually("the mutation quarantined", || {
        (status(&a.0)["quarantined_changes"].as_u64() >= Some(1)).then_some(())
    });
    drop(peer);
    let count = |dir: &Path| {
        serde_json::from_str::<serde_json::Value>(&mesh_ok(dir, &["get", "stock", "x", "--json"]))
            .unwrap()["fields"]["count"]
            .clone()
    };
    assert_eq!(count(&a.0), 12, "the crafted edit is not applied");
    // Still serving: a write goes through, and reaches b.
    mesh_ok(&a.0, &["put", "stock", "after", "count=2"]);

    // A restart replays the log and checkpoint into the same state, without a crash loop.
    drop(daemon_a);
    let _daemon_a = start_with_peers(&a.0, std::slice::from_ref(&b_addr));
    assert_eq!(count(&a.0), 12);
    assert_eq!(status(&a.0)["quarantined_changes"].as_u64(), Some(1));
    mesh_ok(&a.0, &["put", "stock", "restarted", "count=3"]);
    eventually("a and b in step again", || {
        (digest(&a.0) == digest(&b.0)).then_some(())
    });
    assert_eq!(count(&b.0), 12, "b holds the base, not the crafted edit");
    assert_eq!(status(&b.0)["quarantined_changes"].as_u64(), Some(1));
    assert!(has_record(&b.0, "stock", "restarted"));
    drop(daemon_b);
}

/// A signed change by `author` that makes `record` with one field.
fn signed_put(author: &Identity, record: &str, field: &str) -> Envelope {
    let mut doc = RecordDoc::new(&author.node_id());
    let edit = Edit::Put(
        [(
            field.to_owned(),
            crdt_schema::FieldEdit::Set(FieldValue::Str("v".into())),
        )]
        .into(),
    );
    let change = doc.edit(&edit, 0).unwrap().unwrap();
    VerifiedChange::sign(author, &OrgId::default(), record.parse().unwrap(), change).envelope
}

fn resident_bytes(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id()))
        .expect("the daemon's /proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

#[test]
fn a_peer_that_stops_reading_is_disconnected_by_bytes_queued_long_before_the_message_bound() {
    let dir = TempDir::new("queue-bytes");
    init(&dir.0, "a");
    let _daemon = start(&dir.0);
    let address = listen_addr(&dir.0);
    // 40 records of 100 KB each: a Need for all of them is answered with as many as one
    // round's change bytes allow (2 MiB by default).
    let blob = format!("blob={}", "q".repeat(100_000));
    let records: Vec<String> = (0..40).map(|n| format!("stock/big{n}")).collect();
    for record in &records {
        let id = record.strip_prefix("stock/").unwrap();
        mesh_ok(&dir.0, &["put", "stock", id, &blob]);
    }
    let mut peer = HandMadePeer::dial(&Identity::from_seed(80), &address, false);
    let stream = peer.greet();
    let need = Message::Need {
        needs: records
            .iter()
            .map(|record| Need {
                record: record.clone(),
                heads: Vec::new(),
                ancestors: Vec::new(),
            })
            .collect(),
    }
    .encode();
    // 80 asks: about 160 MB of answers in a few hundred messages, far below the 16,384
    // messages a queue may hold, but past its 64 MiB.
    let asks = 80;
    assert!(asks * mesh_core::limits::SYNC_ROUND_BYTES_DEFAULT > 2 * 64 * 1024 * 1024);
    for _ in 0..asks {
        peer.send(stream, &need);
    }
    assert!(
        peer.disconnected_within(DEADLINE),
        "a peer that reads nothing while 160 MB are owed to it is disconnected"
    );
    // The node serves on.
    mesh_ok(&dir.0, &["put", "stock", "after", "count=1"]);
    assert!(has_record(&dir.0, "stock", "after"));
}

#[test]
fn only_the_newest_inbound_stream_of_a_peer_is_read() {
    let dir = TempDir::new("streams");
    init(&dir.0, "a");
    let daemon = start(&dir.0);
    let address = listen_addr(&dir.0);
    let author = Identity::from_seed(81);
    let mut peer = HandMadePeer::dial(&author, &address, true);
    let first = peer.greet();
    peer.wait_for("the daemon's hello", |report| match report {
        Report::Message(bytes) => {
            matches!(Message::decode(bytes), Ok(Message::Hello { .. })).then_some(())
        }
        _ => None,
    });
    // A second stream replaces the first: a push on the first is dropped, one on the
    // second is taken (the session started by the hello goes on).
    let second = peer.open_stream();
    eventually("the second stream to be the current one", || {
        // Until the daemon has seen the second stream, a write on the first still lands;
        // once it is dropped, writes on it fail.
        (!peer.write_and_wait(first, vec![0])).then_some(())
    });
    peer.send(first, &push(&[&signed_put(&author, "stock/stale", "n")]));
    peer.send(second, &push(&[&signed_put(&author, "stock/fresh", "n")]));
    eventually("the push on the newest stream applied", || {
        has_record(&dir.0, "stock", "fresh").then_some(())
    });
    assert!(!has_record(&dir.0, "stock", "stale"));

    // A hundred streams, each announcing an 8 MiB frame and sending 1 MiB of it: read at
    // once they would hold 100 MiB or more; one at a time, about 1 MiB.
    let before = resident_bytes(&daemon);
    let mut frame = ((8 * 1024 * 1024) as u32).to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(7u8, 1024 * 1024));
    for _ in 0..100 {
        let stream = peer.open_stream();
        peer.write_and_wait(stream, frame.clone());
    }
    let grown = resident_bytes(&daemon).saturating_sub(before);
    assert!(
        grown < 40 * 1024 * 1024,
        "the daemon grew by {} MiB",
        grown / (1024 * 1024)
    );
    mesh_ok(&dir.0, &["put", "stock", "after", "count=1"]);
}

/// A TCP connection to `address` (a `/ip4/…/tcp/…` multiaddr) from source IP `from`, that
/// never starts its handshake.
fn idle_tcp_from(from: [u8; 4], address: &str) -> std::net::TcpStream {
    let port: u16 = address
        .rsplit_once("/tcp/")
        .and_then(|(_, port)| port.split('/').next()?.parse().ok())
        .expect("a TCP port");
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    let source = std::net::SocketAddr::from((from, 0));
    socket
        .bind(&source.into())
        .expect("binds a loopback source");
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.connect(&target.into()).expect("connects");
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream
}

/// Whether the daemon closed this connection (without it, a read times out).
fn closed_by_daemon(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn one_host_cannot_hold_every_handshake_slot() {
    let dir = TempDir::new("per-ip");
    init(&dir.0, "a");
    let _daemon = start(&dir.0);
    let address = listen_addr(&dir.0);
    // 127.0.0.2 plays a stranger opening connections it never finishes.
    let mut held: Vec<_> = (0..8)
        .map(|_| idle_tcp_from([127, 0, 0, 2], &address))
        .collect();
    let mut ninth = idle_tcp_from([127, 0, 0, 2], &address);
    // Closed at once, not at the 10 s handshake timeout that ends the other eight.
    let opened = std::time::Instant::now();
    while !closed_by_daemon(&mut ninth) {
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "the ninth connection from one host is refused at once"
        );
    }
    for stream in &mut held {
        assert!(
            !closed_by_daemon(stream),
            "the first eight wait for their handshake"
        );
    }
    // Another host still gets in, and is served.
    let mut peer = HandMadePeer::dial(&Identity::from_seed(82), &address, true);
    let stream = peer.greet();
    peer.send(
        stream,
        &push(&[&signed_put(&Identity::from_seed(82), "stock/other", "n")]),
    );
    eventually("the other host's push applied", || {
        has_record(&dir.0, "stock", "other").then_some(())
    });
    // Once the stranger's handshakes end, its slots are free again.
    drop(held);
    eventually("a new connection from 127.0.0.2 is let wait", || {
        let mut stream = idle_tcp_from([127, 0, 0, 2], &address);
        (!closed_by_daemon(&mut stream)).then_some(())
    });
}
