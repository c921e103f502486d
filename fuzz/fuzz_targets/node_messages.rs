//! A node with records and a greeted peer, fed what the peer sends: messages (each prefixed
//! by a two-byte length), and, after a 0xff tag, change bytes the peer signs as their
//! author, so that crafted changes pass the signature check and reach the door. Nothing
//! may panic, and the node's queues stay within their bounds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::Input;
use mesh_core::wire::{EnvelopeBytes, Message};

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let mut driven = mesh_fuzz::Driven::new();
    let peer = driven.peer;
    let mut rest = data;
    while rest.len() >= 2 {
        let length = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let body = &rest[2..];
        let (chunk, after) = body.split_at(length.min(body.len()));
        rest = after;
        let bytes = match chunk.split_first() {
            Some((0xff, change)) => {
                let envelope = crdt_schema::crafted::sign_raw(
                    &mesh_fuzz::second(),
                    &mesh_fuzz::org(),
                    &"stock/x".parse().expect("a valid record"),
                    change,
                );
                Message::Push {
                    changes: vec![EnvelopeBytes(envelope.into_bytes())],
                }
                .encode()
            }
            Some((0xfe, _)) => {
                driven.tick(31_000);
                continue;
            }
            _ => chunk.to_vec(),
        };
        driven.input(Input::MessageReceived { from: peer, bytes });
        if driven
            .node
            .status()
            .peers
            .iter()
            .all(|p| p.state != mesh_core::PeerState::Connected)
        {
            // Refused: the peer is cut off; connect it again for what follows.
            driven.input(Input::PeerDisconnected { peer });
            driven.input(Input::PeerConnected { peer });
        }
    }
    driven.tick(1_000);
    let queues = driven.node.queues();
    assert!(queues.pending_changes <= mesh_core::limits::PENDING_CHANGES_MAX);
});
