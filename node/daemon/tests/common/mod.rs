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
pub fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    eventually_within(what, DEADLINE, check)
}

/// As [`eventually`], with a deadline of `within` for work known to take long.
pub fn eventually_within<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
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

/// One HTTP/1.1 request to the API at `addr`: (status, body).
pub fn http(addr: &str, request_line: &str, token: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr.trim()).expect("connects");
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{request_line} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Writes `body(record)` to `stock/rNNNNN` for every record below `records`, through the
/// API with 4 writers.
pub fn write_records(dir: &Path, records: usize, body: impl Fn(usize) -> String + Sync) {
    let addr = std::fs::read_to_string(dir.join("api.addr")).expect("the daemon wrote its API");
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    std::thread::scope(|scope| {
        for writer in 0..4 {
            let (addr, token, body) = (&addr, &token, &body);
            scope.spawn(move || {
                for record in (writer..records).step_by(4) {
                    let (status, answer) = http(
                        addr,
                        &format!("PUT /v1/records/stock/r{record:05}"),
                        Some(token.trim()),
                        &body(record),
                    );
                    assert_eq!(status, 200, "{answer}");
                }
            });
        }
    });
}
