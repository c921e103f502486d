//! `mesh org init`: the organisation key, which signs policies.

use std::path::PathBuf;

use crate::client::ClientError;
use crate::config;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Create the org key (keep the file offline) and print the org id for `mesh init --org`.
    Init {
        /// Where to write the key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: Args) -> Result<(), ClientError> {
    let Command::Init { out } = args.command;
    let org = config::create_org_key(&out)?;
    out!("{org}");
    eprintln!("wrote the org key to {}; keep it offline", out.display());
    eprintln!("make nodes trust it with: mesh init --org {org}");
    Ok(())
}
