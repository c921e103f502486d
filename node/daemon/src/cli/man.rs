//! `mesh man`: manual pages, made from the same definitions as `--help`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory;

use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Write one page per command (mesh.1, mesh-put.1, …) into this directory instead of
    /// printing mesh(1).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), ClientError> {
    let command = super::Cli::command();
    let Some(dir) = args.out else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut page)
            .context("cannot render the manual page")?;
        super::output::write_stdout(&page);
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("mesh".to_owned(), command.clone())];
    for sub in command.get_subcommands() {
        pages.push((format!("mesh-{}", sub.get_name()), sub.clone()));
    }
    for (name, page) in &pages {
        let page = page.clone().name(name.clone());
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut bytes)
            .context("cannot render a manual page")?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("wrote {} manual pages to {}", pages.len(), dir.display());
    Ok(())
}
