//! A record sent whole (clone by snapshot): arbitrary document bytes and signatures are
//! taken apart into envelopes. Nothing may panic or allocate without bound; whatever comes
//! out must still fail or pass the envelope checks like any change from a peer.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let record: crdt_schema::RecordId = "stock/x".parse().unwrap();
    // The first byte says how many signatures come with the document.
    let Some((&count, document)) = data.split_first() else {
        return;
    };
    let signatures = vec![[7u8; 64]; usize::from(count % 8)];
    // An odd count fixes the checksum up, so mutants get past it to Automerge's loader.
    let mut document = document.to_vec();
    if count % 2 == 1 && document.len() > 8 {
        crdt_schema::crafted::fix_checksum(&mut document);
    }
    if let Ok(expanded) = crdt_schema::snapshot::expand(&record, &document, &signatures) {
        assert_eq!(expanded.envelopes.len(), signatures.len());
        for envelope in expanded.envelopes {
            // The signatures are made up, so none may verify.
            assert!(envelope.verify(&mesh_fuzz::org()).is_err());
        }
    }
});
