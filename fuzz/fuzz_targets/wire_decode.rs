//! Bytes from a peer as a message: decoding never panics, stays within the limits (the
//! run's -rss_limit_mb catches an allocation out of proportion), and what decodes encodes
//! back to a message that decodes to the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::wire::Message;

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    if let Ok(message) = Message::decode(data) {
        let again = Message::decode(&message.encode()).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
});
