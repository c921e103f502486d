//! Strangers and damaged disks, with real daemons on loopback: a node admits only peers it
//! trusts, and a damaged change log stops the node instead of silently losing writes.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

fn record_count(dir: &Path, collection: &str) -> u64 {
    status(dir)["records"][collection].as_u64().unwrap_or(0)
}

#[test]
fn nodes_made_without_open_exchange_nothing_until_approved() {
    let [a, b] = [TempDir::new("closed-a"), TempDir::new("closed-b")];
    let a_id = init_closed_with(&a.0, "alpha", &[]);
    let b_id = init_closed_with(&b.0, "beta", &[]);
    let _a = start(&a.0);
    // b dials a by address alone: neither trusts the other.
    let address = listen_addr(&a.0);
    let _b = start_with_peers(&b.0, std::slice::from_ref(&address));
    mesh_ok(&a.0, &["put", "stock", "from-a", "count=1"]);
    mesh_ok(&b.0, &["put", "stock", "from-b", "count=2"]);

    // a lists b as pending, with the address it came from, and gives it nothing.
    let pending = eventually("b pending at a", || {
        let peers: serde_json::Value =
            serde_json::from_str(&mesh_ok(&a.0, &["peers", "--json"])).unwrap();
        peers["pending"]
            .as_array()?
            .iter()
            .find(|row| row["peer_id"] == b_id.as_str())
            .cloned()
    });
    assert!(
        pending["address"].as_str().unwrap().contains("127.0.0.1"),
        "{pending}"
    );
    let human = mesh_ok(&a.0, &["peers"]);
    assert!(
        human.contains("pending approval") && human.contains(&b_id),
        "{human}"
    );
    assert_eq!(status(&a.0)["open"], false);
    assert!(mesh_ok(&a.0, &["status"]).contains("only trusted peers"));
    // Give them time to exchange, were they to: nothing crosses.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(record_count(&a.0, "stock"), 1);
    assert_eq!(record_count(&b.0, "stock"), 1);
    assert!(!mesh(&a.0, &["get", "stock", "from-b"]).status.success());

    // Each approves the other; b redials and they converge.
    let approved = mesh_ok(&a.0, &["peers", "approve", &b_id]);
    assert!(approved.contains("is trusted"), "{approved}");
    mesh_ok(&b.0, &["peers", "approve", &a_id]);
    eventually("both records on both nodes", || {
        (record_count(&a.0, "stock") == 2 && record_count(&b.0, "stock") == 2).then_some(())
    });
    // The approval is saved.
    let config = std::fs::read_to_string(a.0.join("config.toml")).unwrap();
    assert!(config.contains(&b_id), "{config}");
    let again = mesh_ok(&a.0, &["peers", "approve", &b_id]);
    assert!(again.contains("trusted already"), "{again}");
    let bad = mesh(&a.0, &["peers", "approve", "not-an-id"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_peer_named_by_its_id_is_trusted_by_the_dialler() {
    let [a, b] = [TempDir::new("p2p-a"), TempDir::new("p2p-b")];
    let a_id = init_closed_with(&a.0, "alpha", &[]);
    let b_id = init_closed_with(&b.0, "beta", &[]);
    let _a = start(&a.0);
    mesh_ok(&a.0, &["peers", "approve", &b_id]);
    let address = format!("{}/p2p/{a_id}", listen_addr(&a.0));
    let _b = start_with_peers(&b.0, &[address]);
    mesh_ok(&a.0, &["put", "stock", "x", "count=1"]);
    eventually("the record at b", || {
        mesh(&b.0, &["get", "stock", "x"])
            .status
            .success()
            .then_some(())
    });
}

#[test]
fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("private");
    init(&dir.0, "one");
    let mode = std::fs::metadata(&dir.0).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // A directory loosened by hand is made private again at start.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _daemon = start(&dir.0);
    let mode = std::fs::metadata(&dir.0).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
}

/// Entries of a change log: (offset, length of the whole entry).
fn log_entries(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut entries = Vec::new();
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let length = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        entries.push((at, 8 + length));
        at += 8 + length;
    }
    entries
}

#[test]
fn a_byte_flipped_mid_log_stops_the_node_and_repair_keeps_everything_else() {
    let dir = TempDir::new("midlog");
    init(&dir.0, "laptop");
    // Checkpoints wait an hour: every write stays in the log only.
    let config = dir.0.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("checkpoint_interval_secs = 1\n"), "{text}");
    let text = text.replace(
        "checkpoint_interval_secs = 1\n",
        "checkpoint_interval_secs = 3600\n",
    );
    std::fs::write(&config, text).unwrap();
    let mut daemon = start(&dir.0);
    for n in 0..30 {
        mesh_ok(
            &dir.0,
            &["put", "visits", &format!("v{n}"), &format!("seq={n}")],
        );
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    let log = dir.0.join("changes.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let entries = log_entries(&bytes);
    assert_eq!(entries.len(), 30, "one entry per acknowledged write");
    // A byte in the payload of an entry a third of the way in.
    let (offset, length) = entries[10];
    bytes[offset + length / 2] ^= 0x5a;
    std::fs::write(&log, &bytes).unwrap();

    let refused = mesh(&dir.0, &["node", "run"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("damaged at byte {offset}"))
            && stderr.contains("19 acknowledged entries after it")
            && stderr.contains("mesh repair"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "the log is left as it was"
    );

    let repaired = mesh_ok(&dir.0, &["repair"]);
    assert!(repaired.contains("keeps 29 entries"), "{repaired}");
    let _daemon = start(&dir.0);
    assert_eq!(record_count(&dir.0, "visits"), 29);
    for n in (0..30).filter(|n| *n != 10) {
        let record: serde_json::Value = serde_json::from_str(&mesh_ok(
            &dir.0,
            &["get", "visits", &format!("v{n}"), "--json"],
        ))
        .unwrap();
        assert_eq!(record["fields"]["seq"], n);
    }
    let damaged: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().contains("damaged"))
        .collect();
    assert_eq!(damaged.len(), 1, "the damaged bytes are kept aside");
}

#[test]
fn the_token_is_not_sent_to_a_listener_named_by_a_stale_api_addr() {
    let dir = TempDir::new("stale-addr");
    init(&dir.0, "one");
    // No daemon runs; a stranger listens where a stale api.addr points.
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = stranger.local_addr().unwrap();
    std::fs::write(dir.0.join("api.addr"), address.to_string()).unwrap();
    stranger.set_nonblocking(true).unwrap();
    let output = mesh(&dir.0, &["status"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no mesh daemon is running"), "{stderr}");
    assert!(
        stranger.accept().is_err(),
        "the CLI connected to the stranger"
    );
}

#[test]
fn a_second_daemon_on_a_port_in_use_fails_at_start() {
    let [a, b] = [TempDir::new("port-a"), TempDir::new("port-b")];
    init(&a.0, "alpha");
    init(&b.0, "beta");
    let _a = start(&a.0);
    let address = listen_addr(&a.0);
    // b is set to listen on a's port.
    let config = b.0.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("/ip4/127.0.0.1/tcp/0", &address)).unwrap();
    let output = mesh(&b.0, &["node", "run"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
}
