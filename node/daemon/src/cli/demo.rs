//! `mesh demo`: three nodes on loopback converging.

use std::path::PathBuf;

use super::Context;
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Where to put the nodes' data (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    if context.data_dir_given() {
        eprintln!(
            "note: the demo makes its own three nodes and ignores --data-dir (and MESH_DATA_DIR); --dir chooses where they live"
        );
    }
    Ok(crate::demo::run(
        args.dir,
        args.duration.map(std::time::Duration::from_secs),
    )?)
}
