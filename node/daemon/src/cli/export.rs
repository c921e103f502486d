//! `mesh export`: a record's Automerge document, in the standard binary format.

use std::path::PathBuf;

use anyhow::Context as _;

use super::{Context, record_path};
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// The record id.
    id: String,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let path = format!("{}/automerge", record_path(&args.collection, &args.id)?);
    let bytes = context.client()?.get_bytes(&path)?;
    std::fs::write(&args.out, &bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {} bytes to {}", bytes.len(), args.out.display());
    Ok(())
}
