//! `mesh`: the node daemon and the command line that talks to it.
//!
//! `mesh init` creates a node in a data directory; `mesh node run` runs it in the
//! foreground; every other command talks to the running daemon over its local API. Each
//! command lives in its own module under `cli/`.

/// `println!` that ends the program quietly when nobody reads stdout any more
/// (`mesh status | head -1`) instead of panicking.
/// Prints a line on stdout with control characters replaced (see
/// [`cli::output::printable`]): names, reasons and record text come from peers, and must
/// not reach the terminal as escape codes.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        if let Err(error) =
            writeln!(std::io::stdout().lock(), "{}", crate::cli::output::printable(&line))
        {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {error}");
        }
    }};
}

mod api;
mod changelog;
mod cli;
mod client;
mod clock;
mod config;
mod demo;
mod driver;
mod net;
mod replies;
mod store;

use std::process::ExitCode;

use clap::Parser;

use crate::client::ClientError;

fn main() -> ExitCode {
    // Automerge panics on some crafted changes; the door catches them, and they need not
    // reach stderr as if the daemon had crashed.
    crdt_schema::guard::quiet_guarded_panics();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::NotFound(message)) => {
            eprintln!("error: {}", cli::output::printable(&message));
            ExitCode::from(1)
        }
        Err(ClientError::Other(error)) => {
            eprintln!("error: {}", cli::output::printable(&format!("{error:#}")));
            ExitCode::from(2)
        }
    }
}
