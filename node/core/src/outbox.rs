//! The ordered list of effects one `handle` call returns. Parts that talk to the driver
//! take `&mut Outbox`; the node drains it at the end of the call.

use crdt_schema::NodeId;

use crate::api::{CommandError, CommandId, Effect, Event, Reply};
use crate::limits::MESSAGE_BYTES_MAX;
use crate::storage::{StorageOpId, StorageRequest};
use crate::wire::Message;

/// Effects in the order the driver must carry them out.
#[derive(Default)]
pub(crate) struct Outbox {
    effects: Vec<Effect>,
}

impl Outbox {
    /// Sends `message` to `to`.
    pub(crate) fn send(&mut self, to: NodeId, message: &Message) {
        let bytes = message.encode();
        debug_assert!(
            bytes.len() <= MESSAGE_BYTES_MAX,
            "the node never sends what it refuses"
        );
        self.effects.push(Effect::Send { to, bytes });
    }

    /// Tells the application something happened.
    pub(crate) fn emit(&mut self, event: Event) {
        self.effects.push(Effect::Emit(event));
    }

    /// Answers command `id`.
    pub(crate) fn complete(&mut self, id: CommandId, result: Result<Reply, CommandError>) {
        self.effects.push(Effect::Complete { id, result });
    }

    /// Drops the connection to `peer`.
    pub(crate) fn disconnect(&mut self, peer: NodeId, reason: String) {
        self.effects.push(Effect::Disconnect { peer, reason });
    }

    /// Asks the driver to carry out storage request `op`.
    pub(crate) fn storage(&mut self, op: StorageOpId, request: StorageRequest) {
        self.effects.push(Effect::Storage { op, request });
    }

    /// Everything queued since the last call, in order.
    pub(crate) fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}
