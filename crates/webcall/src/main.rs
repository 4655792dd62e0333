//! The `webcall` binary: one subcommand per role.

mod check;
mod serve;
mod token;
mod turn;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "webcall",
    // The version and the commit built from (build.rs; "unknown" outside a git checkout).
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("WEBCALL_GIT_COMMIT"), ")"),
    about = "Self-hosted video calls: signaling, web client and STUN/TURN in one binary"
)]
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
    /// Join a room as a native WebRTC peer: send a test pattern (VP8 and Opus) or an IVF file, record, chat, echo.
    #[cfg(feature = "peer")]
    Peer(webcall_peer::PeerArgs),
    /// Check `serve` settings without serving: ports, certificate, TURN address, Redis.
    Check(webcall_server::ServeArgs),
    /// Mint a signed join token for servers started with --auth-secret.
    Token(token::TokenArgs),
    /// Run only the built-in STUN/TURN server (credentials: TURN REST with --turn-secret, as coturn's).
    Turn(turn::TurnCmdArgs),
    /// Load-test a signaling server (webcall or PeerJS): relay rate, latency, CPU and memory per connection.
    #[cfg(feature = "bench")]
    Bench(webcall_bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The peer's TURN client (turn-client-proto, stun-proto) logs every poll at INFO: keep it to warnings by default.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,turn_client_proto=warn,stun_proto=warn,turn_types=warn"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve::run(args)),
        // Exit at once with the peer's code: the stdin reader thread would keep a runtime shutdown waiting.
        #[cfg(feature = "peer")]
        Command::Peer(args) => std::process::exit(rt.block_on(webcall_peer::run(args))),
        Command::Token(args) => token::run(args),
        Command::Check(args) => rt.block_on(check::run(args)),
        Command::Turn(args) => rt.block_on(turn::run(args)),
        // The generator runs on its own runtime (one thread by default, so it can be pinned to one core).
        #[cfg(feature = "bench")]
        Command::Bench(args) => webcall_bench::run(args),
    }
}
