//! Several real daemons on loopback converging over libp2p. Every wait polls with a
//! deadline; every daemon is killed on drop.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

fn digest(dir: &Path) -> String {
    status(dir)["digest"].as_str().expect("a digest").to_owned()
}

fn converged(dirs: &[&Path]) -> Option<String> {
    let digests: Vec<String> = dirs.iter().map(|dir| digest(dir)).collect();
    digests
        .iter()
        .all(|digest| digest == &digests[0])
        .then(|| digests[0].clone())
}

fn field(dir: &Path, collection: &str, id: &str, name: &str) -> Option<serde_json::Value> {
    let output = mesh(dir, &["get", collection, id, "--json"]);
    if !output.status.success() {
        return None;
    }
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let value = record["fields"][name].clone();
    (!value.is_null()).then_some(value)
}

#[test]
fn three_nodes_converge_after_writes_on_each() {
    let dirs = [
        TempDir::new("three-a"),
        TempDir::new("three-b"),
        TempDir::new("three-c"),
    ];
    for (dir, name) in dirs.iter().zip(["a", "b", "c"]) {
        init(&dir.0, name);
    }
    let _a = start(&dirs[0].0);
    let hub = listen_addr(&dirs[0].0);
    let _b = start_with_peers(&dirs[1].0, std::slice::from_ref(&hub));
    let _c = start_with_peers(&dirs[2].0, &[hub]);
    for (index, dir) in dirs.iter().enumerate() {
        for n in 0..5 {
            mesh_ok(
                &dir.0,
                &[
                    "put",
                    "stock",
                    &format!("n{index}-{n}"),
                    &format!("count={n}"),
                ],
            );
        }
    }
    let paths: Vec<&Path> = dirs.iter().map(|dir| dir.0.as_path()).collect();
    eventually("three equal digests", || converged(&paths));
    for dir in &paths {
        assert_eq!(status(dir)["records"]["stock"], 15);
    }
}

#[test]
fn a_counter_counted_on_two_nodes_while_apart_adds_up_on_both() {
    let (a, b) = (TempDir::new("counter-a"), TempDir::new("counter-b"));
    init(&a.0, "a");
    init(&b.0, "b");
    let _a = start(&a.0);
    let hub = listen_addr(&a.0);
    let b_daemon = start_with_peers(&b.0, std::slice::from_ref(&hub));
    let created = mesh(
        &a.0,
        &[
            "put",
            "stock",
            "s1",
            "--json",
            r#"{"on_hand": {"$counter": 10}}"#,
        ],
    );
    assert!(created.status.success(), "{created:?}");
    eventually("the counter on b", || field(&b.0, "stock", "s1", "on_hand"));
    drop(b_daemon);
    // Apart: a receives 5, then b (started alone) dispenses 3, never having seen the 5.
    mesh_ok(&a.0, &["put", "stock", "s1", "on_hand+=5"]);
    let b_alone = start(&b.0);
    mesh_ok(&b.0, &["put", "stock", "s1", "on_hand-=3"]);
    assert_eq!(
        field(&b.0, "stock", "s1", "on_hand").unwrap(),
        serde_json::json!({"$counter": 7})
    );
    let set = mesh(&b.0, &["put", "stock", "s1", "on_hand=99"]);
    assert!(
        !set.status.success(),
        "setting a counter outright is refused"
    );
    let said = String::from_utf8_lossy(&set.stderr);
    assert!(
        said.contains("is a counter") && said.contains("on_hand+=N"),
        "{said}"
    );
    drop(b_alone);
    let _b = start_with_peers(&b.0, &[hub]);
    eventually("converged", || converged(&[&a.0, &b.0]));
    for dir in [&a.0, &b.0] {
        assert_eq!(
            field(dir, "stock", "s1", "on_hand").unwrap(),
            serde_json::json!({"$counter": 12}),
            "10 + 5 - 3"
        );
    }
    let shown = mesh_ok(&a.0, &["get", "stock", "s1"]);
    assert!(shown.contains("12 (counter)"), "{shown}");
}

#[test]
fn a_field_two_nodes_set_while_apart_is_shown_in_conflict_until_written_again() {
    let (a, b) = (TempDir::new("conflict-a"), TempDir::new("conflict-b"));
    init(&a.0, "head-office");
    init(&b.0, "clinic");
    let _a = start(&a.0);
    let hub = listen_addr(&a.0);
    let b_daemon = start_with_peers(&b.0, std::slice::from_ref(&hub));
    mesh_ok(&a.0, &["put", "stock", "s1", "count=50", "name=gauze"]);
    eventually("the record on b", || field(&b.0, "stock", "s1", "count"));
    assert_eq!(
        mesh_ok(&b.0, &["conflicts"]).trim(),
        "no conflicts: every field has one value"
    );
    drop(b_daemon);
    mesh_ok(&a.0, &["put", "stock", "s1", "count=90"]);
    let b_alone = start(&b.0);
    mesh_ok(&b.0, &["put", "stock", "s1", "count=70"]);
    drop(b_alone);
    let _b = start_with_peers(&b.0, &[hub]);
    eventually("converged", || converged(&[&a.0, &b.0]));
    for dir in [&a.0, &b.0] {
        let listed: serde_json::Value =
            serde_json::from_str(&mesh_ok(dir, &["conflicts", "--json"])).unwrap();
        let records = listed.as_array().unwrap();
        assert_eq!(records.len(), 1, "{listed}");
        let shown = &records[0]["fields"]["count"];
        let other = &records[0]["conflicts"]["count"][0];
        let (value, author) = if *shown == 90 {
            (70, "clinic")
        } else {
            (90, "head-office")
        };
        assert_eq!(other["value"], value, "{listed}");
        assert_eq!(other["author_name"], author, "{listed}");
        assert!(
            records[0]["conflicts"].get("name").is_none(),
            "only the field both set"
        );
        let human = mesh_ok(dir, &["get", "stock", "s1"]);
        assert!(human.contains("(conflict: 1 other)"), "{human}");
        assert!(
            human.contains(&format!("also {value} by {author}")),
            "{human}"
        );
        let summary = mesh_ok(dir, &["conflicts", "stock"]);
        assert!(
            summary.contains("1 record in conflict (1 field)"),
            "{summary}"
        );
    }
    mesh_ok(&a.0, &["put", "stock", "s1", "count=75"]);
    eventually("the conflict resolved on b", || {
        let listed = mesh_ok(&b.0, &["conflicts", "--json"]);
        (listed.trim() == "[]").then_some(())
    });
}

#[test]
fn edits_of_different_fields_on_two_nodes_both_survive() {
    let (a, b) = (TempDir::new("fields-a"), TempDir::new("fields-b"));
    init(&a.0, "a");
    init(&b.0, "b");
    let _a = start(&a.0);
    let _b = start_with_peers(&b.0, &[listen_addr(&a.0)]);
    mesh_ok(
        &a.0,
        &["put", "customers", "acme", "phone=555-0100", "city=Basel"],
    );
    eventually("the record on b", || {
        field(&b.0, "customers", "acme", "city")
    });
    mesh_ok(&a.0, &["put", "customers", "acme", "phone=555-0199"]);
    mesh_ok(&b.0, &["put", "customers", "acme", "city=Zurich"]);
    eventually("converged", || converged(&[&a.0, &b.0]));
    for dir in [&a.0, &b.0] {
        assert_eq!(
            field(dir, "customers", "acme", "phone").unwrap(),
            "555-0199"
        );
        assert_eq!(field(dir, "customers", "acme", "city").unwrap(), "Zurich");
    }
}

#[test]
fn a_node_killed_after_acknowledged_writes_restarts_with_them_and_catches_up() {
    let (a, b) = (TempDir::new("kill-a"), TempDir::new("kill-b"));
    init(&a.0, "a");
    init(&b.0, "b");
    let _a = start(&a.0);
    let hub = listen_addr(&a.0);
    let mut b_daemon = start_with_peers(&b.0, std::slice::from_ref(&hub));
    for n in 0..20 {
        mesh_ok(
            &b.0,
            &["put", "visits", &format!("v{n}"), &format!("seq={n}")],
        );
    }
    b_daemon.child.kill().unwrap();
    b_daemon.child.wait().unwrap();
    // While b is down, a writes too.
    for n in 0..5 {
        mesh_ok(&a.0, &["put", "stock", &format!("s{n}"), "count=1"]);
    }
    let _b = start_with_peers(&b.0, &[hub]);
    assert_eq!(
        status(&b.0)["records"]["visits"],
        20,
        "every acknowledged write survived the kill"
    );
    eventually("converged", || converged(&[&a.0, &b.0]));
    assert_eq!(status(&a.0)["records"]["visits"], 20);
    assert_eq!(status(&b.0)["records"]["stock"], 5);
}

#[test]
fn a_node_started_later_catches_up() {
    let (a, late) = (TempDir::new("late-a"), TempDir::new("late-b"));
    init(&a.0, "a");
    init(&late.0, "late");
    let _a = start(&a.0);
    for n in 0..100 {
        mesh_ok(
            &a.0,
            &[
                "put",
                "catalogue",
                &format!("item{n}"),
                &format!("price={n}"),
            ],
        );
    }
    let _late = start_with_peers(&late.0, &[listen_addr(&a.0)]);
    eventually("converged", || converged(&[&a.0, &late.0]));
    assert_eq!(status(&late.0)["records"]["catalogue"], 100);
    let history = mesh_ok(&late.0, &["history", "--json"]);
    assert!(history.contains("completed"), "{history}");
}

#[test]
fn the_demo_starts_three_nodes_that_converge_and_stops_cleanly() {
    let root = TempDir::new("demo");
    let output = std::process::Command::new(MESH)
        .args(["demo", "--duration", "1", "--dir"])
        .arg(&root.0)
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("converged in"), "{stdout}");
    assert!(stdout.contains("clinic-2"), "{stdout}");
    assert!(!root.0.exists(), "the demo cleans up its nodes");
}

#[test]
fn watch_prints_changes_from_peers_as_they_arrive() {
    use std::io::BufRead;
    let (a, b) = (TempDir::new("watch-a"), TempDir::new("watch-b"));
    init(&a.0, "a");
    init(&b.0, "b");
    let _a = start(&a.0);
    let _b = start_with_peers(&b.0, &[listen_addr(&a.0)]);
    eventually("connected", || {
        let peers = status(&b.0)["peers"].as_array()?.clone();
        peers
            .iter()
            .any(|peer| peer["state"] == "connected")
            .then_some(())
    });
    let watch = |args: &[&str]| {
        let mut watcher = Daemon {
            child: std::process::Command::new(MESH)
                .arg("--data-dir")
                .arg(&b.0)
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mesh watch runs"),
        };
        let stdout = watcher.child.stdout.take().expect("piped");
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        (watcher, received)
    };
    let (_text_watcher, text_lines) = watch(&["watch", "stock"]);
    let (_json_watcher, json_lines) = watch(&["watch", "stock", "--json"]);
    // The feed subscribes when the request arrives; write until both watchers saw a change.
    let (mut text, mut json) = (None, None);
    eventually("a change in both watch outputs", || {
        mesh_ok(
            &a.0,
            &[
                "put",
                "stock",
                "aspirin",
                &format!("count={}", rand_count()),
            ],
        );
        let wait = std::time::Duration::from_millis(200);
        text = text.take().or_else(|| text_lines.recv_timeout(wait).ok());
        json = json.take().or_else(|| json_lines.recv_timeout(wait).ok());
        (text.is_some() && json.is_some()).then_some(())
    });
    // Named by its author (the peer's name: no policy here), not by a relaying id.
    let line = text.expect("seen");
    assert_eq!(line, "stock/aspirin changed by a", "{line}");
    let line = json.expect("seen");
    let event: serde_json::Value = serde_json::from_str(&line).expect("one JSON object a line");
    assert_eq!(event["record"], "stock/aspirin", "{line}");
    assert!(
        event["from"]
            .as_str()
            .is_some_and(|from| from.starts_with("12D3KooW"))
    );
    assert_eq!(event["authors"][0]["name"], "a", "{line}");
    assert_eq!(event["deleted"], false, "{line}");
    // A delete says so.
    mesh_ok(&a.0, &["delete", "stock", "aspirin"]);
    let deleted = eventually("the delete in the watch output", || {
        text_lines
            .recv_timeout(std::time::Duration::from_millis(200))
            .ok()
            .filter(|line| line.contains("deleted"))
    });
    assert_eq!(deleted, "stock/aspirin deleted by a");
}

#[test]
fn sync_now_takes_a_peer_by_name_and_fails_clearly_for_an_unknown_one() {
    let (a, b) = (TempDir::new("syncnow-a"), TempDir::new("syncnow-b"));
    init(&a.0, "alpha");
    init(&b.0, "beta");
    let _a = start(&a.0);
    let _b = start_with_peers(&b.0, &[listen_addr(&a.0)]);
    eventually("the peers to greet each other", || {
        (status(&b.0)["peers"][0]["name"] == "alpha").then_some(())
    });
    mesh_ok(&a.0, &["put", "stock", "aspirin", "count=3"]);
    let done = mesh_ok(&b.0, &["sync", "now", "--peer", "alpha"]);
    assert!(done.contains("in sync with 1 peer"), "{done}");
    assert!(field(&b.0, "stock", "aspirin", "count").is_some());
    let unknown = mesh(&b.0, &["sync", "now", "--peer", "gamma"]);
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no peer is named"), "{stderr}");
}

/// A value that differs between calls, so every put is a change.
fn rand_count() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    COUNT.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn nodes_of_different_orgs_say_so_and_sync_now_fails() {
    let work = TempDir::new("orgs-work");
    std::fs::create_dir_all(&work.0).unwrap();
    let org = |file: &str| {
        let key = work.0.join(file);
        mesh_ok(&work.0, &["org", "init", "--out", key.to_str().unwrap()])
            .trim()
            .to_owned()
    };
    let (one, two) = (org("one.key"), org("two.key"));
    let (a, b) = (TempDir::new("orgs-a"), TempDir::new("orgs-b"));
    init_with(&a.0, "alpha", &["--org", &one]);
    init_with(&b.0, "beta", &["--org", &two]);
    let _a = start(&a.0);
    let _b = start_with_peers(&b.0, &[listen_addr(&a.0)]);
    eventually("alpha to report beta's org", || {
        let error = status(&a.0)["peers"][0]["last_error"].as_str()?.to_owned();
        error.contains("different orgs").then_some(())
    });
    let output = mesh(&a.0, &["sync", "now"]);
    assert_eq!(output.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("beta: this peer trusts org"), "{stdout}");
}

/// Starts `mesh demo` in `root` and waits until its three nodes answer; returns the demo
/// and the nodes' API addresses.
fn demo_running(root: &Path) -> (std::process::Child, Vec<String>) {
    let demo = std::process::Command::new(MESH)
        .args(["demo", "--dir"])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the demo starts");
    let addresses = ["hq", "clinic-1", "clinic-2"]
        .iter()
        .map(|name| {
            let dir = root.join(name);
            eventually("a demo node to answer", || {
                mesh(&dir, &["status", "--json"])
                    .status
                    .success()
                    .then_some(())
            });
            std::fs::read_to_string(dir.join("api.addr")).expect("an api.addr")
        })
        .collect();
    (demo, addresses)
}

fn all_stopped(addresses: &[String]) -> Option<()> {
    addresses
        .iter()
        .all(|address| std::net::TcpStream::connect(address.trim()).is_err())
        .then_some(())
}

#[test]
fn the_demo_stops_its_nodes_on_sigterm_and_even_when_killed() {
    let root = TempDir::new("demo-term");
    let (mut demo, addresses) = demo_running(&root.0);
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(terminated.success());
    let status = demo.wait().expect("the demo ends");
    assert!(
        status.success(),
        "SIGTERM stops the demo cleanly: {status:?}"
    );
    eventually("every demo node to stop", || all_stopped(&addresses));
    assert!(!root.0.exists(), "and its directory goes");

    // SIGKILL leaves the demo no chance to clean up: its nodes still end with it.
    let root = TempDir::new("demo-kill");
    let (mut demo, addresses) = demo_running(&root.0);
    demo.kill().expect("SIGKILL");
    let _ = demo.wait();
    eventually("every demo node to stop after the demo was killed", || {
        all_stopped(&addresses)
    });
}

/// Issue 12: a laptop clones 20,000 records, stops while head office edits every one of
/// them, and starts again. Before it meets a peer it answers status and reads with no
/// document loaded; then the difference (larger than a message may list of either side's
/// rounds at the old limits) streams over, and it converges.
#[test]
fn a_laptop_restarted_after_a_large_difference_answers_at_once_and_converges() {
    const RECORDS: usize = 20_000;
    const LONG: std::time::Duration = std::time::Duration::from_secs(180);
    let (hq, laptop) = (TempDir::new("large-hq"), TempDir::new("large-laptop"));
    init(&hq.0, "hq");
    init(&laptop.0, "laptop");
    let _hq = start(&hq.0);
    let hub = listen_addr(&hq.0);
    write_records(&hq.0, RECORDS, |record| {
        format!(r#"{{"count": {record}, "site": "s{}"}}"#, record % 7)
    });
    let cloning = start_with_peers(&laptop.0, std::slice::from_ref(&hub));
    eventually_within("the laptop to clone", LONG, || {
        converged(&[&hq.0, &laptop.0])
    });
    // Its checkpoint holds everything once the log is compacted to its header.
    let log = laptop.0.join("changes.log");
    eventually("the laptop's log to be compacted", || {
        (std::fs::metadata(&log).ok()?.len() == 8).then_some(())
    });
    drop(cloning);

    write_records(&hq.0, RECORDS, |record| {
        format!(r#"{{"count": {}}}"#, record + 1)
    });

    // Alone first: the start reads the index, and no document until one is asked for.
    let alone = start(&laptop.0);
    let at_start = status(&laptop.0);
    assert_eq!(at_start["records"]["stock"], RECORDS as u64);
    assert_eq!(at_start["loaded_documents"], 0, "{at_start}");
    assert_eq!(
        field(&laptop.0, "stock", "r12345", "count"),
        Some(serde_json::json!(12345)),
        "the laptop's own copy, from before the edits"
    );
    assert_eq!(status(&laptop.0)["loaded_documents"], 1);
    drop(alone);

    let _laptop = start_with_peers(&laptop.0, &[hub]);
    eventually_within("the laptop to catch up", LONG, || {
        converged(&[&hq.0, &laptop.0])
    });
    assert_eq!(
        field(&laptop.0, "stock", "r12345", "count"),
        Some(serde_json::json!(12346))
    );
    assert_eq!(status(&laptop.0)["records"]["stock"], RECORDS as u64);
}
