//! A signed policy from a peer or a file: parsing, verifying and re-encoding never panic,
//! and a policy that verifies is canonical (its text is its own canonical encoding).

#![no_main]

use crdt_schema::policy::SignedPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let Ok(signed) = serde_json::from_slice::<SignedPolicy>(data) else {
        return;
    };
    let org =
        crdt_schema::OrgId::from_bytes(*crdt_schema::Identity::from_seed(105).node_id().as_bytes());
    if let Ok(policy) = signed.verify(&org) {
        assert_eq!(
            policy.canonical(),
            signed.policy,
            "a verified policy is canonical"
        );
    }
});
