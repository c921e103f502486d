//! The `mesh` command line: one module per command, each with its clap arguments and its
//! run function (as jj's `cli/src/commands/` does), a shared [`Context`] for the data
//! directory and the API client, and [`output`] for everything printed.

mod completions;
mod conflicts;
mod delete;
mod demo;
mod export;
mod get;
mod history;
mod init;
mod list;
mod man;
mod node;
mod org;
pub(crate) mod output;
mod peers;
mod policy;
mod put;
mod quarantine;
mod repair;
mod status;
mod sync;
mod watch;

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError};
use crate::store::DataDir;

/// Keep the records of every site in step, without a master server.
#[derive(Parser)]
#[command(name = "mesh", version)]
pub struct Cli {
    /// The node's data directory. Default: $MESH_DATA_DIR, else the platform data directory.
    #[arg(long, global = true, env = "MESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Create a node: its key, config and API token. Prints the node id.
    Init(init::Args),
    /// Run the node.
    Node(node::Args),
    /// The node at a glance: records, digest, peers, last sync.
    Status(status::Args),
    /// Peers and their connection state.
    Peers(peers::Args),
    /// Set fields of a record: FIELD=VALUE, where VALUE is read as null (removes the field),
    /// true/false, an integer, a number with a point, or else text (007 and 1e5 stay text);
    /// FIELD+=N and FIELD-=N add to a counter. Use --json for exact types.
    Put(put::Args),
    /// Read a record.
    Get(get::Args),
    /// List the live records of a collection.
    List(list::Args),
    /// List the records whose fields concurrent writes left with several values.
    Conflicts(conflicts::Args),
    /// Delete a record (a tombstone that syncs like an edit).
    Delete(delete::Args),
    /// Print record changes as they happen, until Ctrl-C.
    Watch(watch::Args),
    /// Sync control.
    Sync(sync::Args),
    /// The history of sync sessions, newest first.
    History(history::Args),
    /// The organisation key, which signs policies.
    Org(org::Args),
    /// Policies: who may write what.
    Policy(policy::Args),
    /// Changes the policy rejected: never applied, kept with the rule they broke.
    Quarantine(quarantine::Args),
    /// Start three nodes on loopback, write on each and watch them converge.
    Demo(demo::Args),
    /// Repair a change log the daemon refused to start with: set each damaged entry aside
    /// (in a file beside the log) and keep every entry around it. The daemon must be stopped.
    Repair,
    /// Write a record's Automerge document (standard binary format) to a file.
    Export(export::Args),
    /// Print a shell completion script (for example `mesh completions bash >
    /// /etc/bash_completion.d/mesh`).
    Completions(completions::Args),
    /// Print the manual page, or write one per command with --out DIR.
    Man(man::Args),
}

/// What every command may need: the data directory (resolved only when asked for, since
/// some commands need none) and a client of the node's API.
pub(crate) struct Context {
    given_data_dir: Option<PathBuf>,
}

impl Context {
    /// The data directory: `--data-dir`, `$MESH_DATA_DIR`, or the platform's.
    pub(crate) fn dir(&self) -> anyhow::Result<DataDir> {
        if let Some(dir) = &self.given_data_dir {
            return Ok(DataDir::new(dir.clone()));
        }
        // $XDG_DATA_HOME/mesh or ~/.local/share/mesh on Linux, the platform's own elsewhere.
        let dirs = directories::ProjectDirs::from("", "", "mesh").ok_or_else(|| {
            anyhow!("cannot find a data directory: pass --data-dir or set MESH_DATA_DIR")
        })?;
        Ok(DataDir::new(dirs.data_dir().to_path_buf()))
    }

    /// Whether the data directory was given (the demo ignores it and says so).
    pub(crate) fn data_dir_given(&self) -> bool {
        self.given_data_dir.is_some()
    }

    /// A client of the running daemon's API.
    pub(crate) fn client(&self) -> Result<Client, ClientError> {
        Client::connect(&self.dir()?)
    }
}

/// Runs the command the user gave.
pub fn run(cli: Cli) -> Result<(), ClientError> {
    let context = Context {
        given_data_dir: cli.data_dir,
    };
    match cli.command {
        Commands::Init(args) => init::run(&context, args),
        Commands::Node(args) => node::run(&context, args),
        Commands::Status(args) => status::run(&context, args),
        Commands::Peers(args) => peers::run(&context, args),
        Commands::Put(args) => put::run(&context, args),
        Commands::Get(args) => get::run(&context, args),
        Commands::List(args) => list::run(&context, args),
        Commands::Conflicts(args) => conflicts::run(&context, args),
        Commands::Delete(args) => delete::run(&context, args),
        Commands::Watch(args) => watch::run(&context, args),
        Commands::Sync(args) => sync::run(&context, args),
        Commands::History(args) => history::run(&context, args),
        Commands::Org(args) => org::run(args),
        Commands::Policy(args) => policy::run(&context, args),
        Commands::Quarantine(args) => quarantine::run(&context, args),
        Commands::Demo(args) => demo::run(&context, args),
        Commands::Repair => repair::run(&context),
        Commands::Export(args) => export::run(&context, args),
        Commands::Completions(args) => completions::run(args),
        Commands::Man(args) => man::run(args),
    }
}

/// The API path of a record, after checking its address: an id may hold any character but
/// `/`, so it is percent-encoded (`a?b` must not become a query).
fn record_path(collection: &str, id: &str) -> anyhow::Result<String> {
    crdt_schema::RecordId::new(collection, id)?;
    let id = percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("/v1/records/{collection}/{id}"))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_paths_escape_the_id_and_refuse_bad_addresses() {
        assert_eq!(
            record_path("stock", "important?old").unwrap(),
            "/v1/records/stock/important%3Fold"
        );
        assert_eq!(
            record_path("stock", "a b#c%").unwrap(),
            "/v1/records/stock/a%20b%23c%25"
        );
        assert!(record_path("stock", "a/b").is_err());
        assert!(record_path("stock", "").is_err());
        assert!(record_path("Stock", "a").is_err());
    }
}
