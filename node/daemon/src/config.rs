//! `config.toml`: the node's settings, and `mesh init`, which writes them.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use crdt_schema::{Identity, OrgId};
use serde::{Deserialize, Serialize};

use crate::store::DataDir;

/// The API address used when none is configured.
pub const API_ADDR_DEFAULT: &str = "127.0.0.1:7710";

/// The node's settings as written in `config.toml`. Every field but `name` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// A misspelt key (`peer = [...]`) would otherwise be ignored, leaving a node that never
// dials anyone and no clue why.
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A human name for the node, shown in status. Set by `mesh init --name`.
    pub name: String,
    /// Where the local HTTP API listens. Loopback only. Default: `127.0.0.1:7710`.
    #[serde(default = "api_default")]
    pub api: String,
    /// Peer-to-peer listen addresses. Default: none.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Peers to dial on start. Default: none.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Find peers on the local network with mDNS. Default: true.
    #[serde(default = "mdns_default")]
    pub mdns: bool,
    /// Seconds between anti-entropy syncs with each peer. Default: 30.
    #[serde(default = "sync_interval_default")]
    pub sync_interval_secs: u64,
    /// Seconds applied changes may wait before their records are checkpointed to sled and
    /// the change log is compacted. Default: 1.
    #[serde(default = "checkpoint_interval_default")]
    pub checkpoint_interval_secs: u64,
    /// The org id whose changes this node accepts. Default: none (the all-zero org).
    #[serde(default)]
    pub org: Option<String>,
    /// Collections this node replicates. Default: all.
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    /// Admit every key as a peer while no policy is in force (`mesh init --open`): anyone
    /// who reaches the port reads and writes everything. Default: false, only the trusted
    /// peers below, peers named with `/p2p/<id>` in `peers` or `--peer`, and peers approved
    /// with `mesh peers approve` are admitted.
    #[serde(default)]
    pub open: bool,
    /// Node ids of peers this node trusts while no policy is in force (written by `mesh
    /// peers approve`). Default: none.
    #[serde(default)]
    pub trusted_peers: Vec<String>,
}

/// The node id a multiaddr names in its `/p2p/<id>` part, if any.
pub fn peer_id_in(address: &str) -> Option<crdt_schema::NodeId> {
    let address: libp2p::Multiaddr = address.parse().ok()?;
    address.iter().find_map(|part| match part {
        libp2p::multiaddr::Protocol::P2p(peer) => peer.to_string().parse().ok(),
        _ => None,
    })
}

fn api_default() -> String {
    API_ADDR_DEFAULT.to_owned()
}

fn mdns_default() -> bool {
    true
}

fn sync_interval_default() -> u64 {
    30
}

fn checkpoint_interval_default() -> u64 {
    1
}

impl FileConfig {
    /// Reads `config.toml`.
    pub fn load(dir: &DataDir) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(dir.config()).with_context(|| {
            format!(
                "no node in {}: run `mesh init --data-dir {}` first",
                dir.root().display(),
                dir.root().display()
            )
        })?;
        let config: FileConfig = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid mesh config", dir.config().display()))?;
        config.core_config()?;
        Ok(config)
    }

    /// The core's configuration.
    pub fn core_config(&self) -> anyhow::Result<mesh_core::Config> {
        let org = match &self.org {
            Some(text) => text
                .parse::<OrgId>()
                .map_err(|error| anyhow::anyhow!("org `{text}`: {error}"))?,
            None => OrgId::default(),
        };
        if let Some(collections) = &self.collections {
            for collection in collections {
                crdt_schema::record::check_collection(collection)?;
            }
        }
        if self.sync_interval_secs == 0 {
            bail!("sync_interval_secs must be at least 1");
        }
        if self.checkpoint_interval_secs == 0 {
            bail!("checkpoint_interval_secs must be at least 1");
        }
        check_api_address(&self.api)?;
        for address in &self.listen {
            check_listen_address(address)?;
        }
        let trusted_peers = if self.open {
            None
        } else {
            let mut trusted = std::collections::BTreeSet::new();
            for text in &self.trusted_peers {
                let node = text.parse::<crdt_schema::NodeId>().map_err(|error| {
                    anyhow::anyhow!("trusted peer `{text}` is not a node id: {error}")
                })?;
                trusted.insert(node);
            }
            trusted.extend(self.peers.iter().filter_map(|peer| peer_id_in(peer)));
            Some(trusted)
        };
        Ok(mesh_core::Config {
            name: self.name.clone(),
            trusted_peers,
            org,
            collections: self
                .collections
                .as_ref()
                .map(|list| list.iter().cloned().collect()),
            sync_interval: Duration::from_secs(self.sync_interval_secs),
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs),
            ..mesh_core::Config::default()
        })
    }
}

/// The API must stay on this machine: it is guarded by a token file, not by TLS.
fn check_api_address(api: &str) -> anyhow::Result<()> {
    let address: std::net::SocketAddr = api
        .parse()
        .with_context(|| format!("api `{api}` is not an address like 127.0.0.1:7710"))?;
    if !address.ip().is_loopback() {
        bail!(
            "api `{api}` is not a loopback address: the API is for this machine only (127.0.0.1 or [::1]); peers connect on the listen addresses"
        );
    }
    Ok(())
}

/// A listen address must be a multiaddr this build can listen on.
fn check_listen_address(text: &str) -> anyhow::Result<()> {
    let address: libp2p::Multiaddr = text.parse().with_context(|| {
        format!("listen address `{text}` is not a multiaddr like /ip4/0.0.0.0/tcp/4001")
    })?;
    let quic = address
        .iter()
        .any(|part| matches!(part, libp2p::multiaddr::Protocol::QuicV1));
    if quic && !cfg!(feature = "quic") {
        bail!(
            "listen address `{text}` needs QUIC, which this build of mesh lacks (build it with --features quic)"
        );
    }
    let tcp = address
        .iter()
        .any(|part| matches!(part, libp2p::multiaddr::Protocol::Tcp(_)));
    if !tcp && !quic {
        bail!("listen address `{text}` names no transport: end it with /tcp/PORT");
    }
    Ok(())
}

/// What `mesh init` creates.
pub struct InitOptions {
    /// The node's name.
    pub name: String,
    /// The API address.
    pub api: String,
    /// Peer-to-peer listen addresses.
    pub listen: Vec<String>,
    /// The org to trust.
    pub org: Option<String>,
    /// Whether to find peers with mDNS.
    pub mdns: bool,
    /// Whether to admit every key while no policy is in force.
    pub open: bool,
}

/// Adds `peer` to `trusted_peers` in `config.toml` (after `mesh peers approve`), rewriting
/// the file through a temporary one and a rename.
pub fn save_trusted_peer(dir: &DataDir, peer: &crdt_schema::NodeId) -> anyhow::Result<()> {
    let mut config = FileConfig::load(dir)?;
    let text = peer.to_string();
    if config.trusted_peers.contains(&text) {
        return Ok(());
    }
    config.trusted_peers.push(text);
    let temporary = dir.config().with_extension("toml.new");
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(toml::to_string_pretty(&config)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.config())
        .with_context(|| format!("cannot replace {}", dir.config().display()))?;
    Ok(())
}

/// Creates a node in `dir`: key, config and API token. Refuses to overwrite a node.
pub fn init(dir: &DataDir, options: InitOptions) -> anyhow::Result<Identity> {
    check_node_name(&options.name)?;
    if dir.is_initialised() {
        bail!(
            "{} already holds a node; use another --data-dir, or delete it to start over",
            dir.root().display()
        );
    }
    std::fs::create_dir_all(dir.root())
        .with_context(|| format!("cannot create {}", dir.root().display()))?;
    make_private_dir(dir.root())?;
    let config = FileConfig {
        name: options.name,
        api: options.api,
        listen: options.listen,
        peers: Vec::new(),
        mdns: options.mdns,
        sync_interval_secs: sync_interval_default(),
        checkpoint_interval_secs: checkpoint_interval_default(),
        org: options.org,
        collections: None,
        open: options.open,
        trusted_peers: Vec::new(),
    };
    config.core_config()?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|error| anyhow::anyhow!("no OS randomness: {error}"))?;
    let identity = Identity::from_secret_bytes(secret);
    let mut token = [0u8; 24];
    getrandom::fill(&mut token).map_err(|error| anyhow::anyhow!("no OS randomness: {error}"))?;
    let token: String = token.iter().map(|byte| format!("{byte:02x}")).collect();
    write_private(&dir.key(), &secret)?;
    write_private(&dir.token(), token.as_bytes())?;
    std::fs::write(dir.config(), toml::to_string_pretty(&config)?)?;
    Ok(identity)
}

/// Creates the org key file (hex, mode 0600) and returns the org id.
pub fn create_org_key(path: &Path) -> anyhow::Result<OrgId> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|error| anyhow::anyhow!("no OS randomness: {error}"))?;
    let identity = Identity::from_secret_bytes(secret);
    let text: String = secret.iter().map(|byte| format!("{byte:02x}")).collect();
    write_private(path, format!("{text}\n").as_bytes()).with_context(|| {
        format!(
            "{} exists or cannot be created; an org key is never overwritten",
            path.display()
        )
    })?;
    Ok(OrgId::from_bytes(*identity.node_id().as_bytes()))
}

/// A node's name is shown to people (status, peers, the demo): it must say something, fit
/// in a hello, and hold no control characters.
pub fn check_node_name(name: &str) -> anyhow::Result<()> {
    use mesh_core::limits::NAME_BYTES_MAX;
    if name.trim().is_empty() {
        bail!("a node's name cannot be empty; give --name, such as --name hq");
    }
    if name.len() > NAME_BYTES_MAX {
        bail!(
            "a node's name holds at most {NAME_BYTES_MAX} bytes; `{name}` has {}",
            name.len()
        );
    }
    if name.chars().any(char::is_control) {
        bail!("a node's name cannot hold control characters");
    }
    Ok(())
}

/// Reads a policy in TOML, checks it, and signs it with the org key; returns the signed
/// policy as JSON.
pub fn sign_policy(policy: &Path, org_key: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(policy)
        .with_context(|| format!("cannot read {}", policy.display()))?;
    let policy: crdt_schema::policy::Policy = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid policy", policy.display()))?;
    policy.validate()?;
    for warning in policy_warnings(&policy) {
        eprintln!("warning: {warning}");
    }
    let key = std::fs::read_to_string(org_key)
        .with_context(|| format!("cannot read {}", org_key.display()))?;
    let key = key.trim();
    let bytes: Option<Vec<u8>> = (0..key.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(key.get(index..index + 2)?, 16).ok())
        .collect();
    let secret: [u8; 32] = bytes
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("{} is not an org key (64 hex digits)", org_key.display())
        })?;
    let signed = policy.sign(&Identity::from_secret_bytes(secret));
    Ok(serde_json::to_string_pretty(&signed)?)
}

/// What in a well-formed policy is most likely a mistake: a role a collection names that no
/// member holds, a collection nobody may write, a member role no collection names (a typo
/// such as `stie`), and `replicated_by`, which is not enforced yet.
pub fn policy_warnings(policy: &crdt_schema::policy::Policy) -> Vec<String> {
    let mut warnings = Vec::new();
    for (collection, role) in policy.roles_without_members() {
        warnings.push(format!(
            "collection `{collection}` may be written by role `{role}`, which no member holds"
        ));
    }
    let held: std::collections::BTreeSet<&String> = policy
        .members
        .values()
        .flat_map(|member| &member.roles)
        .collect();
    for (collection, rule) in &policy.collections {
        if rule.writers.is_empty() {
            warnings.push(format!(
                "collection `{collection}` lists no writers: nobody may write it"
            ));
        } else if !rule.writers.iter().any(|role| held.contains(role)) {
            warnings.push(format!(
                "no member holds a writer role of collection `{collection}`: nobody may write it"
            ));
        }
        if rule.replicated_by.is_some() {
            warnings.push(format!(
                "collection `{collection}`: `replicated_by` is not enforced yet; every member receives it"
            ));
        }
    }
    let named: std::collections::BTreeSet<&String> = policy
        .collections
        .values()
        .flat_map(|rule| {
            rule.writers
                .iter()
                .chain(rule.replicated_by.iter().flatten())
        })
        .collect();
    for (name, member) in &policy.members {
        for role in &member.roles {
            if !named.contains(role) {
                warnings.push(format!(
                    "member `{name}` has role `{role}`, which no collection names"
                ));
            }
        }
    }
    warnings
}

/// Reads a signed policy file and checks it is the org's; returns its text and version.
pub fn read_signed_policy(path: &Path, org: &str) -> anyhow::Result<(String, u64)> {
    let org: OrgId = org
        .parse()
        .map_err(|error| anyhow::anyhow!("org `{org}`: {error}"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let signed: crdt_schema::policy::SignedPolicy =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a signed policy; make one with `mesh policy sign`",
                path.display()
            )
        })?;
    let policy = signed
        .verify(&org)
        .with_context(|| format!("{} cannot be enforced", path.display()))?;
    Ok((text, policy.version))
}

/// Reads the node's identity.
pub fn identity(dir: &DataDir) -> anyhow::Result<Identity> {
    let bytes =
        std::fs::read(dir.key()).with_context(|| format!("cannot read {}", dir.key().display()))?;
    let secret: [u8; 32] = bytes.try_into().map_err(|_| {
        anyhow::anyhow!("{} is damaged: a node key is 32 bytes", dir.key().display())
    })?;
    Ok(Identity::from_secret_bytes(secret))
}

/// Makes a directory readable by its owner only (0700): the data directory holds every
/// record, the change log and sled's files, which would otherwise follow the umask.
/// Returns whether the mode had to change.
pub fn make_private_dir(path: &Path) -> anyhow::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private (0700)", path.display()))?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes a file only the owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_warns_about_roles_and_collections_that_are_likely_typos() {
        let node = Identity::from_seed(1).node_id();
        let policy: crdt_schema::policy::Policy = toml::from_str(&format!(
            r#"
version = 1
[members.hq]
node = "{node}"
roles = ["master"]
[members.clinic1]
node = "{node}"
roles = ["stie"]
[collections.catalogue]
writers = ["master"]
[collections.stock]
writers = ["site"]
replicated_by = ["master"]
"#
        ))
        .unwrap();
        let warnings = policy_warnings(&policy).join("\n");
        assert!(
            warnings.contains("member `clinic1` has role `stie`, which no collection names"),
            "{warnings}"
        );
        assert!(
            warnings.contains("role `site`, which no member holds"),
            "{warnings}"
        );
        assert!(
            warnings.contains("no member holds a writer role of collection `stock`"),
            "{warnings}"
        );
        assert!(
            warnings.contains("`replicated_by` is not enforced yet"),
            "{warnings}"
        );
        assert!(
            !warnings.contains("catalogue"),
            "catalogue is fine: {warnings}"
        );
        assert!(!warnings.contains("`hq`"), "hq's role is named: {warnings}");
    }

    #[test]
    fn a_node_name_must_say_something_and_fit_in_a_hello() {
        assert!(check_node_name("hq").is_ok());
        assert!(check_node_name("clinic 2 (Lusaka)").is_ok());
        for bad in ["", "   ", "a\u{1b}[2J", &"x".repeat(129)] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unknown_key_in_the_config_is_refused_by_name() {
        let good = "name = \"hq\"\npeers = [\"/ip4/10.0.0.2/tcp/4001\"]\n";
        assert!(toml::from_str::<FileConfig>(good).is_ok());
        let typo = "name = \"hq\"\npeer = [\"/ip4/10.0.0.2/tcp/4001\"]\n";
        let error = toml::from_str::<FileConfig>(typo).unwrap_err().to_string();
        assert!(error.contains("unknown field `peer`"), "{error}");
        assert!(
            error.contains("peers"),
            "the error lists the keys there are: {error}"
        );
    }
}
