//! A full disk: the daemon's data directory lives on a small tmpfs in a mount namespace the
//! test creates itself (`unshare -rm`, no root needed), so the disk really runs out of space.
//! Writes are refused with a clear error, nothing acknowledged is lost, reads go on, and the
//! node takes writes again once space returns. The test reaches the namespace's files
//! through `/proc/PID/root`; the API is on loopback, which the namespace shares.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The daemon in its own mount namespace, on a tmpfs of `size`.
fn start_on_tmpfs(dir: &Path, size: &str) -> (Daemon, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{dir}' && \
         '{mesh}' --data-dir '{dir}' init --name small --api 127.0.0.1:0 \
           --listen /ip4/127.0.0.1/tcp/0 --no-mdns >/dev/null 2>&1 && \
         exec '{mesh}' --data-dir '{dir}' node run",
        dir = dir.display(),
        mesh = MESH,
    );
    let child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare runs (util-linux)");
    let pid = child.id();
    let daemon = Daemon { child };
    // The data directory as this process sees it: through the daemon's root.
    let seen = PathBuf::from(format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap());
    eventually("the daemon on the tmpfs to answer", || {
        mesh(&seen, &["status", "--json"])
            .status
            .success()
            .then_some(())
    });
    (daemon, seen)
}

/// Fills the tmpfs to the last byte with a file that can be deleted later.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let byte = [0u8; 1];
    while file.write_all(&byte).is_ok() {}
    filler
}

#[test]
fn a_full_disk_refuses_writes_clearly_loses_nothing_and_recovers() {
    let outside = TempDir::new("disk-full");
    let (daemon, dir) = start_on_tmpfs(&outside.0, "4m");
    for n in 0..20 {
        mesh_ok(
            &dir,
            &["put", "stock", &format!("item{n}"), &format!("count={n}")],
        );
    }

    let filler = fill(&dir);
    // The log's last block may still have room for a few entries; the disk is full once a
    // write needs a new block.
    let mut acked = Vec::new();
    let refused = loop {
        let id = format!("late{}", acked.len());
        let output = mesh(&dir, &["put", "stock", &id, "count=99"]);
        if !output.status.success() {
            break (id, output);
        }
        acked.push(id);
        assert!(acked.len() < 100, "the full disk never refused a write");
    };
    assert_eq!(
        refused.1.status.code(),
        Some(2),
        "a write on a full disk fails"
    );
    let message = String::from_utf8_lossy(&refused.1.stderr);
    eprintln!("refused after {} more writes: {message}", acked.len());
    assert!(
        message.contains("disk")
            && message.contains("full")
            && message.contains("nothing was written"),
        "{message}"
    );

    // Reads go on, every acknowledged write is there, and the refused one is not.
    for n in 0..20 {
        let record: serde_json::Value = serde_json::from_str(&mesh_ok(
            &dir,
            &["get", "stock", &format!("item{n}"), "--json"],
        ))
        .unwrap();
        assert_eq!(record["fields"]["count"], n);
    }
    for id in &acked {
        assert!(
            mesh(&dir, &["get", "stock", id]).status.success(),
            "{id} was acknowledged"
        );
    }
    assert_eq!(
        mesh(&dir, &["get", "stock", &refused.0]).status.code(),
        Some(1),
        "the refused write left nothing"
    );
    let status = status(&dir);
    assert!(status["counters"]["storage_errors"].as_u64().unwrap() >= 1);

    // Space returns: writes are taken again, with no restart.
    std::fs::remove_file(filler).unwrap();
    eventually("writes to be taken again", || {
        mesh(&dir, &["put", "stock", &refused.0, "count=100"])
            .status
            .success()
            .then_some(())
    });
    let record: serde_json::Value =
        serde_json::from_str(&mesh_ok(&dir, &["get", "stock", &refused.0, "--json"])).unwrap();
    assert_eq!(record["fields"]["count"], 100);
    assert_eq!(status["records"]["stock"], 20 + acked.len());

    // Freeze the daemon, take its data directory as it is on the tmpfs, kill it, and start
    // a daemon on the copy: the failed appends left the log clean, so everything
    // acknowledged comes back.
    let pid = daemon.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let copy = TempDir::new("disk-full-copy");
    copy_dir(&dir, &copy.0);
    drop(daemon);
    let _restarted = start(&copy.0);
    for n in 0..20 {
        let record: serde_json::Value = serde_json::from_str(&mesh_ok(
            &copy.0,
            &["get", "stock", &format!("item{n}"), "--json"],
        ))
        .unwrap();
        assert_eq!(record["fields"]["count"], n);
    }
    for id in acked.iter().chain([&refused.0]) {
        assert!(
            mesh(&copy.0, &["get", "stock", id]).status.success(),
            "{id} survives"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "filler" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
