//! Decoding a message from a peer allocates in proportion to the message, never 25 times
//! it: limits are checked while decoding (security review, finding 4).

use mesh_core::limits::MESSAGE_BYTES_MAX;
use mesh_core::wire::{Message, WIRE_VERSION};

/// Counts the bytes live at once, and the peak.
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// `[version][variant][uleb count][count × one byte]`: a list of `count` empty elements.
fn list_of_empties(variant: u8, count: usize) -> Vec<u8> {
    let mut bytes = vec![WIRE_VERSION, variant];
    let mut value = count as u64;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.resize(bytes.len() + count, 0);
    bytes
}

#[test]
fn a_message_of_empty_list_elements_is_refused_before_it_is_allocated() {
    // Variant 3 is Push: nearly 8 MiB of zero-length envelopes, one byte each.
    let count = MESSAGE_BYTES_MAX - 16;
    let message = list_of_empties(3, count);
    assert!(message.len() <= MESSAGE_BYTES_MAX);
    // One test in this binary, so no other thread allocates meanwhile.
    let before = ALLOCATOR.allocated();
    let result = Message::decode(&message);
    let peak = ALLOCATOR.max_allocated().saturating_sub(before);
    assert!(result.is_err(), "{count} changes are over the limit");
    // Unbounded, decoding would build millions of Vecs (about 200 MB) first.
    assert!(peak < 4 * 1024 * 1024, "decoding allocated {peak} bytes");

    // A list at its limit still decodes.
    let message = list_of_empties(3, mesh_core::limits::CHANGES_PER_MESSAGE_MAX);
    let Ok(Message::Push { changes }) = Message::decode(&message) else {
        panic!("a push at the limit decodes");
    };
    assert_eq!(changes.len(), mesh_core::limits::CHANGES_PER_MESSAGE_MAX);
}
