//! `mesh demo`: three nodes on loopback in one command, writing and converging.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::client::Client;
use crate::store::DataDir;

/// Nodes the demo runs.
const NAMES: [&str; 3] = ["hq", "clinic-1", "clinic-2"];

struct Node {
    name: &'static str,
    dir: DataDir,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the demo for `duration` (or until Ctrl-C) in a fresh directory under `root`.
pub fn run(root: Option<PathBuf>, duration: Option<Duration>) -> anyhow::Result<()> {
    let root = root
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id())));
    if root.exists() {
        bail!("{} exists; give the demo an empty --dir", root.display());
    }
    let exe = std::env::current_exe().context("cannot find the mesh binary")?;
    // Signals are caught from here on, so that SIGTERM or Ctrl-C while the nodes start
    // still ends in the cleanup below (taken once the nodes are up).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut stop = {
        let _entered = runtime.enter();
        StopSignals::new()?
    };
    out!("starting 3 nodes on loopback in {}", root.display());
    // Made first, so that each node can trust the other two: a node admits only peers
    // it trusts.
    let mut ids = Vec::new();
    for name in NAMES {
        let dir = DataDir::new(root.join(name));
        let identity = crate::config::init(
            &dir,
            crate::config::InitOptions {
                name: name.to_owned(),
                api: "127.0.0.1:0".into(),
                listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
                org: None,
                mdns: false,
                open: false,
            },
        )?;
        ids.push(identity.node_id());
    }
    for name in NAMES {
        let dir = DataDir::new(root.join(name));
        for (other, id) in NAMES.iter().zip(&ids) {
            if *other != name {
                crate::config::save_trusted_peer(&dir, id)?;
            }
        }
    }
    let mut nodes: Vec<Node> = Vec::new();
    for name in NAMES {
        let dir = DataDir::new(root.join(name));
        let mut command = Command::new(&exe);
        command
            .arg("--data-dir")
            .arg(dir.root())
            .args(["node", "run", "--stop-when-stdin-closes"]);
        if let Some(first) = nodes.first() {
            let address = format!("{}/p2p/{}", wait_listen_addr(&first.dir)?, ids[0]);
            command.args(["--peer", &address]);
        }
        // The node ends when this pipe closes: with the demo, however the demo ends.
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a node")?;
        nodes.push(Node { name, dir, child });
        wait_api(&nodes.last().expect("pushed").dir)?;
    }
    out!("writing records on each node ...");
    let writes: [(&str, &str, Value); 3] = [
        (
            "catalogue",
            "aspirin",
            serde_json::json!({"name": "Aspirin 500 mg", "price": 2.5}),
        ),
        (
            "stock",
            "clinic-1-aspirin",
            serde_json::json!({"count": 40, "site": "clinic-1"}),
        ),
        (
            "visits",
            "clinic-2-0001",
            serde_json::json!({"patient": "p-17", "room": 3}),
        ),
    ];
    for (node, (collection, id, fields)) in nodes.iter().zip(&writes) {
        Client::connect(&node.dir)?.send(
            "PUT",
            &format!("/v1/records/{collection}/{id}"),
            fields,
        )?;
        out!("  {:<9} wrote {collection}/{id}", node.name);
    }
    let started = wall_clock();
    let mut nudged = 0;
    loop {
        // A push that raced a connection still being made waits for the next anti-entropy
        // round (30 s); the demo does not: after each 3 s without convergence it asks every
        // node to sync now.
        if deadline_passed(started, Duration::from_secs(3 * (nudged + 1))) {
            nudged += 1;
            if nudged == 1 {
                out!("not in step after 3 s; asking every node to sync now");
            }
            for node in &nodes {
                let _ = Client::connect(&node.dir)?.send(
                    "POST",
                    "/v1/sync/now",
                    &serde_json::json!({}),
                );
            }
        }
        let digests: Vec<String> = nodes
            .iter()
            .map(|node| status(&node.dir).map(|s| s["digest"].to_string()))
            .collect::<anyhow::Result<_>>()?;
        if digests.iter().all(|digest| digest == &digests[0]) {
            out!(
                "converged in {} ms: every node holds every record",
                started.elapsed().as_millis()
            );
            break;
        }
        if deadline_passed(started, Duration::from_secs(30)) {
            bail!(
                "the nodes did not converge within 30 s; see `mesh status` in {}",
                root.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    print_table(&nodes)?;
    out!("\nthe nodes keep running; try, in another terminal:");
    let mesh = exe.display();
    let (hq, clinic_1, clinic_2) = (
        nodes[0].dir.root().display(),
        nodes[1].dir.root().display(),
        nodes[2].dir.root().display(),
    );
    out!("  {mesh} --data-dir {clinic_1} put stock clinic-1-aspirin count=39");
    out!("  {mesh} --data-dir {hq} get stock clinic-1-aspirin");
    out!("  {mesh} --data-dir {clinic_2} status");
    out!(
        "{}",
        match duration {
            Some(duration) => format!(
                "stopping in {} s (Ctrl-C or SIGTERM stops sooner)",
                duration.as_secs()
            ),
            None => "Ctrl-C (or SIGTERM) stops the demo".to_owned(),
        }
    );
    runtime.block_on(async {
        let until = async {
            match duration {
                Some(duration) => tokio::time::sleep(duration).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until => {}
            () = stop.received() => {}
        }
    });
    drop(nodes);
    let _ = std::fs::remove_dir_all(&root);
    out!("demo stopped");
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment they are made (a signal that comes before
/// anyone waits is kept).
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Must be called inside a tokio runtime.
    fn new() -> anyhow::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    async fn received(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The demo measures its own waits in wall-clock time; nothing here reaches a node.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

fn deadline_passed(started: std::time::Instant, limit: Duration) -> bool {
    wall_clock().duration_since(started) > limit
}

fn wait_api(dir: &DataDir) -> anyhow::Result<()> {
    let started = wall_clock();
    while status(dir).is_err() {
        if deadline_passed(started, Duration::from_secs(20)) {
            bail!(
                "a node did not start within 20 s; run it by hand to see why: mesh --data-dir {} node run",
                dir.root().display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_listen_addr(dir: &DataDir) -> anyhow::Result<String> {
    let started = wall_clock();
    loop {
        if let Ok(status) = status(dir)
            && let Some(addr) = status["listen_addrs"]
                .as_array()
                .and_then(|addrs| addrs.first())
                .and_then(Value::as_str)
        {
            return Ok(addr.to_owned());
        }
        if deadline_passed(started, Duration::from_secs(20)) {
            bail!("a node did not start listening for peers within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(dir: &DataDir) -> anyhow::Result<Value> {
    let client = Client::connect(dir).map_err(|error| anyhow::anyhow!("{error}"))?;
    client
        .get("/v1/status")
        .map_err(|error| anyhow::anyhow!("{error}"))
}

fn print_table(nodes: &[Node]) -> anyhow::Result<()> {
    out!(
        "
{:<10} {:<10} {:>8} {:>10} {:>6}  data dir",
        "node",
        "digest",
        "records",
        "syncs ok",
        "peers"
    );
    for node in nodes {
        let status = status(&node.dir)?;
        let records: u64 = status["records"]
            .as_object()
            .map_or(0, |map| map.values().filter_map(Value::as_u64).sum());
        let peers = status["peers"].as_array().map_or(0, |peers| {
            peers
                .iter()
                .filter(|peer| peer["state"] == "connected")
                .count()
        });
        out!(
            "{:<10} {:<10} {:>8} {:>10} {:>6}  {}",
            node.name,
            &status["digest"].as_str().unwrap_or("?")[..8],
            records,
            status["counters"]["syncs_completed"].as_u64().unwrap_or(0),
            peers,
            node.dir.root().display()
        );
    }
    Ok(())
}
