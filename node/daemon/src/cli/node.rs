//! `mesh node run`: the daemon itself, in the foreground.

use anyhow::Context as _;

use super::Context;
use crate::client::ClientError;
use crate::store::DataDir;
use crate::{api, config, driver};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run the daemon in the foreground until Ctrl-C; logs go to stderr.
    Run {
        /// Also dial this peer (a multiaddr like /ip4/10.0.0.2/tcp/4001; repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
        /// Stop when standard input closes: how `mesh demo` makes its nodes end with it,
        /// however it ends (SIGKILL included).
        #[arg(long, hide = true)]
        stop_when_stdin_closes: bool,
    },
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let Command::Run {
        peer,
        json_logs,
        stop_when_stdin_closes,
    } = args.command;
    Ok(run_daemon(
        &context.dir()?,
        &peer,
        json_logs,
        stop_when_stdin_closes,
    )?)
}

/// Resolves once standard input reaches its end (the parent holding the other end of the
/// pipe exited), or never if `watch` is false.
async fn stdin_closed(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let (closed, wait) = tokio::sync::oneshot::channel::<()>();
    // A blocking read on a thread of its own: the runtime has one thread, and stdin is not
    // worth a tokio feature.
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    let _ = wait.await;
}

fn run_daemon(
    dir: &DataDir,
    peers: &[String],
    json_logs: bool,
    stop_when_stdin_closes: bool,
) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json_logs {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = config::FileConfig::load(dir)?;
    let token = std::fs::read_to_string(dir.token())
        .with_context(|| format!("cannot read {}", dir.token().display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (handle, driver) = driver::start(dir, &config, peers)?;
        let listener = tokio::net::TcpListener::bind(&config.api)
            .await
            .with_context(|| format!("cannot listen on {} for the API; is another program using it? set `api` in config.toml", config.api))?;
        let api_addr = listener.local_addr()?.to_string();
        std::fs::write(dir.api_addr(), &api_addr)?;
        let info = api::NodeInfo { name: config.name.clone(), api_addr: api_addr.clone() };
        let state = api::ApiState { node: handle, token: token.trim().to_owned(), info };
        tracing::info!(api = %api_addr, data_dir = %dir.root().display(), "mesh node running; Ctrl-C stops it");
        let server = axum::serve(listener, api::router(state));
        tokio::select! {
            result = driver => result?,
            result = server.into_future() => result.context("the API server stopped")?,
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
            _ = terminated() => tracing::info!("stopping (SIGTERM)"),
            () = stdin_closed(stop_when_stdin_closes) => tracing::info!("stopping (standard input closed)"),
        }
        let _ = std::fs::remove_file(dir.api_addr());
        Ok(())
    })
}
/// Resolves when the process is asked to terminate (SIGTERM: `kill`, systemd, Docker).
async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut signal) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        signal.recv().await;
        return;
    }
    std::future::pending::<()>().await;
}
