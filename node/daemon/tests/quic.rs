//! Two daemons talking over QUIC only (built with `--features quic`), on loopback.

#![cfg(feature = "quic")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

/// A closed node (the default) listening on QUIC only; returns its id.
fn init_quic(dir: &Path, name: &str) -> String {
    mesh_ok(
        dir,
        &[
            "init",
            "--name",
            name,
            "--api",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--no-mdns",
        ],
    )
    .trim()
    .to_owned()
}

#[test]
fn two_nodes_converge_over_quic() {
    let [a, b] = [TempDir::new("quic-a"), TempDir::new("quic-b")];
    let a_id = init_quic(&a.0, "a");
    let b_id = init_quic(&b.0, "b");
    let _a = start(&a.0);
    // a trusts b; b dials a by its id, which trusts a.
    mesh_ok(&a.0, &["peers", "approve", &b_id]);
    let address = listen_addr(&a.0);
    assert!(address.contains("/quic-v1"), "{address}");
    let _b = start_with_peers(&b.0, &[format!("{address}/p2p/{a_id}")]);
    mesh_ok(&a.0, &["put", "stock", "over-quic", "count=7"]);
    mesh_ok(&b.0, &["put", "stock", "back", "count=8"]);
    eventually("both records on both nodes", || {
        [&a.0, &b.0]
            .iter()
            .all(|dir| {
                ["over-quic", "back"]
                    .iter()
                    .all(|id| mesh(dir, &["get", "stock", id]).status.success())
            })
            .then_some(())
    });
    eventually("equal digests", || {
        (status(&a.0)["digest"] == status(&b.0)["digest"]).then_some(())
    });
}
