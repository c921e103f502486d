//! Helpers for tests that run real daemons: temporary data directories, the `mesh` binary,
//! polling with a deadline, daemons killed on drop.

#![allow(dead_code, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const MESH: &str = env!("CARGO_BIN_EXE_mesh");
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A data directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("mesh-daemon-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon, killed on drop.
pub struct Daemon {
    pub child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mesh(dir: &Path, args: &[&str]) -> Output {
    Command::new(MESH)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("mesh runs")
}

pub fn mesh_ok(dir: &Path, args: &[&str]) -> String {
    let output = mesh(dir, args);
    assert!(
        output.status.success(),
        "mesh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

pub fn init(dir: &Path, name: &str) {
    init_with(dir, name, &[]);
}

/// `mesh init --open` on loopback without mDNS, plus `extra` arguments; returns the node
/// id. Open: these tests are about other things than admission, and their nodes meet by
/// address alone (`closed_mesh.rs` tests the closed default).
pub fn init_with(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut with_open = vec!["--open"];
    with_open.extend_from_slice(extra);
    init_closed_with(dir, name, &with_open)
}

/// `mesh init` on loopback without mDNS (closed: only trusted peers connect), plus `extra`
/// arguments; returns the node id.
pub fn init_closed_with(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "init",
        "--name",
        name,
        "--api",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ];
    args.extend_from_slice(extra);
    mesh_ok(dir, &args).trim().to_owned()
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn start(dir: &Path) -> Daemon {
    start_with_peers(dir, &[])
}

/// Whether the node of `dir` holds the record (live or deleted).
pub fn has_record(dir: &Path, collection: &str, id: &str) -> bool {
    mesh(dir, &["get", collection, id, "--json"])
        .status
        .success()
}

pub fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&mesh_ok(dir, &["status", "--json"])).expect("status is JSON")
}

/// Starts a daemon that also dials `peers`.
pub fn start_with_peers(dir: &Path, peers: &[String]) -> Daemon {
    let _ = std::fs::remove_file(dir.join("api.addr"));
    let mut command = Command::new(MESH);
    command.arg("--data-dir").arg(dir).args(["node", "run"]);
    for peer in peers {
        command.args(["--peer", peer]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the daemon starts");
    let daemon = Daemon { child };
    eventually("the API to answer", || {
        mesh(dir, &["status", "--json"])
            .status
            .success()
            .then_some(())
    });
    daemon
}

/// The first address a daemon listens on for peers.
pub fn listen_addr(dir: &Path) -> String {
    eventually("a listen address", || {
        status(dir)["listen_addrs"]
            .as_array()?
            .first()?
            .as_str()
            .map(str::to_owned)
    })
}
