//! What the fuzz targets share: a quiet panic hook that still lets the node's own panic
//! guards work, the base document crafted changes apply to, and a node driven in memory.

use std::sync::{Once, OnceLock};

use crdt_schema::{Change, Identity, NodeId, OrgId, RecordDoc};
use mesh_core::{Effect, Input, Instant, Node};

/// The author of the base document and of the fuzzed changes.
pub fn first() -> Identity {
    Identity::from_seed(101)
}

/// The author whose change edits the base document's objects.
pub fn second() -> Identity {
    Identity::from_seed(102)
}

/// The org every target signs for.
pub fn org() -> OrgId {
    OrgId::default()
}

/// libfuzzer-sys aborts on every panic, before unwinding, which would turn the panics the
/// node catches inside Automerge (its door) into crashes. This puts a hook back that does
/// nothing: a panic that escapes still reaches libfuzzer-sys's own `catch_unwind` around
/// the target, which aborts, so escaped panics are still found.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

/// The base document (text, list and integer fields by [`first`]) and [`second`]'s edit of
/// its objects, made once.
pub fn base() -> &'static (RecordDoc, Change) {
    static BASE: OnceLock<(RecordDoc, Change)> = OnceLock::new();
    BASE.get_or_init(|| {
        crdt_schema::crafted::edit_of_anothers_objects(&first().node_id(), &second().node_id())
    })
}

/// A node with a connected, greeted peer, whose storage completes at once.
pub struct Driven {
    /// The node.
    pub node: Node,
    /// The peer.
    pub peer: NodeId,
    /// The node's clock.
    pub now: Instant,
}

impl Driven {
    /// A node holding a few records, connected to [`second`] as a peer that said hello.
    pub fn new() -> Driven {
        let mut driven = Driven {
            node: Node::new(mesh_core::Config::default(), Identity::from_seed(103), 7),
            peer: second().node_id(),
            now: Instant::from_millis(1_790_000_000_000),
        };
        for n in 0..3 {
            let fields = [(
                "count".to_owned(),
                crdt_schema::FieldEdit::Set(crdt_schema::FieldValue::Int(n)),
            )]
            .into();
            driven.input(Input::Command {
                id: mesh_core::CommandId(n as u64 + 1),
                command: mesh_core::Command::Put {
                    record: format!("stock/{n}").parse().expect("a valid record"),
                    fields,
                },
            });
        }
        let peer = driven.peer;
        driven.input(Input::PeerConnected { peer });
        let hello = mesh_core::wire::Message::Hello {
            name: "fuzz".into(),
            scope: None,
            policy: None,
            org: *org().as_bytes(),
        };
        driven.input(Input::MessageReceived {
            from: peer,
            bytes: hello.encode(),
        });
        driven
    }

    /// Feeds one input, completing storage requests at once, until nothing is left.
    pub fn input(&mut self, input: Input) {
        let mut queue = vec![input];
        let mut steps = 0;
        while let Some(input) = queue.pop() {
            steps += 1;
            assert!(steps < 100_000, "the node keeps asking for work");
            for effect in self.node.handle(self.now, input) {
                if let Effect::Storage { op, .. } = effect {
                    queue.push(Input::StorageDone { op, result: Ok(()) });
                }
            }
        }
    }

    /// Moves time on and ticks.
    pub fn tick(&mut self, millis: u64) {
        self.now = Instant::from_millis(self.now.as_millis() + millis);
        self.input(Input::Tick);
    }
}

impl Default for Driven {
    fn default() -> Driven {
        Driven::new()
    }
}
