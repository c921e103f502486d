//! `mesh init`: create a node.

use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::client::ClientError;
use crate::config;

#[derive(clap::Args)]
pub struct Args {
    /// A human name for the node.
    #[arg(long)]
    name: Option<String>,
    /// Where the local API listens (loopback).
    #[arg(long, default_value = config::API_ADDR_DEFAULT)]
    api: String,
    /// Peer-to-peer listen address (repeatable). Default: /ip4/0.0.0.0/tcp/4001.
    #[arg(long)]
    listen: Vec<String>,
    /// Trust this organisation's policies (its org id).
    #[arg(long)]
    org: Option<String>,
    /// Enforce this signed policy (from `mesh policy sign`) from the first start, instead
    /// of accepting every node key until a peer brings the policy. Needs --org.
    #[arg(long, requires = "org")]
    policy: Option<PathBuf>,
    /// Do not look for peers on the local network (mDNS).
    #[arg(long)]
    no_mdns: bool,
    /// Admit every node key as a peer while no policy is in force (anyone who reaches
    /// the port reads and writes everything). Without it, only peers named with
    /// /p2p/<id>, listed in config.toml or approved with `mesh peers approve` connect.
    #[arg(long)]
    open: bool,
}

/// Where a node listens for peers unless told otherwise; with QUIC built in, also on the
/// same port over UDP.
const LISTEN_DEFAULTS: &[&str] = &[
    "/ip4/0.0.0.0/tcp/4001",
    #[cfg(feature = "quic")]
    "/ip4/0.0.0.0/udp/4001/quic-v1",
];
pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let dir = context.dir()?;
    let Args {
        name,
        api,
        listen,
        org,
        policy,
        no_mdns,
        open,
    } = args;
    let name = name.unwrap_or_else(|| "node".to_owned());
    // Checked before anything is created: a bad file leaves no half-made node.
    let signed_policy = match (&policy, &org) {
        (Some(path), Some(org)) => Some(config::read_signed_policy(path, org)?),
        _ => None,
    };
    let listen = if listen.is_empty() {
        LISTEN_DEFAULTS
            .iter()
            .map(|addr| (*addr).to_owned())
            .collect()
    } else {
        listen
    };
    let identity = config::init(
        &dir,
        config::InitOptions {
            name: name.clone(),
            api,
            listen,
            org,
            mdns: !no_mdns,
            open,
        },
    )?;
    if let Some((text, version)) = signed_policy {
        std::fs::write(dir.initial_policy(), text)
            .with_context(|| format!("cannot write {}", dir.initial_policy().display()))?;
        eprintln!("the node enforces policy version {version} from its first start");
    }
    out!("{}", identity.node_id());
    eprintln!("created node `{name}` in {}", dir.root().display());
    eprintln!(
        "start it with: mesh node run --data-dir {}",
        dir.root().display()
    );
    if open {
        eprintln!(
            "warning: the node is open: without a policy, anyone who reaches its port reads and writes every record"
        );
    } else {
        eprintln!(
            "it admits only peers it trusts: dial them as /ip4/…/tcp/4001/p2p/<their id>, or approve them with `mesh peers approve <id>`"
        );
    }
    Ok(())
}
