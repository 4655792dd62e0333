//! The `webcall` binary: one subcommand per role.

use clap::{Parser, Subcommand};
use std::io::Write;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "webcall", version, about = "Self-hosted video calls: signaling, web client and STUN/TURN in one binary")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "WEBCALL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: web client, signaling WebSocket at /ws.
    Serve(webcall_server::ServeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
    }
}

async fn serve(args: webcall_server::ServeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let ice: Box<dyn webcall_rooms::IceProvider> = Box::new(|_: &str| Vec::new());
    let server = webcall_server::serve(cfg, ice).await?;
    let addr = server.local_addr;
    // Scripts and tests wait for this line (and read the port from it when listening on port 0).
    println!("webcall listening on http://{addr} (signaling at ws://{addr}/ws)");
    std::io::stdout().flush()?;
    server.wait().await?;
    Ok(())
}
