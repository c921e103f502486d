//! `mesh completions SHELL`: shell completion for every command and flag.

use clap::CommandFactory;

use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> Result<(), ClientError> {
    let mut command = super::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "mesh", &mut script);
    super::output::write_stdout(&script);
    Ok(())
}
