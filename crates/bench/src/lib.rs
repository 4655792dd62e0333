//! `webcall bench`: a load generator for signaling servers, written in Rust so that it is not the bottleneck.
//!
//! It speaks two protocols: webcall's (`join`, then `offer`/`answer` relayed by peer id, see docs/protocol.md) and
//! the PeerJS server's (`/peerjs?key=…&id=…&token=…`, `OPEN`, then `OFFER`/`ANSWER` with `dst`, relayed with
//! `src`), so the same client code measures both servers in the same run. It reads the server's CPU time and
//! resident memory from `/proc/PID` (`--server-pid`), which is the fair figure on a small machine where the
//! generator competes for CPU.
//!
//! Every run is bounded in time and in connections, and only dials the URL it is given (loopback in bench/).

mod calls;
mod conns;
mod floor;
mod procfs;
mod proto;
mod relay;
mod stats;

use clap::{Args, Subcommand, ValueEnum};

/// `webcall bench`: measure a signaling server (webcall or PeerJS) under load.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Clients in rooms of two relay offer/answer-sized messages: relayed msgs/s, one-way latency, server CPU
    /// per relayed message.
    Relay(relay::RelayArgs),
    /// Open and join many connections, then hold them idle: connection + join rate, server CPU per connection,
    /// server memory per idle connection at each count.
    Connections(conns::ConnArgs),
    /// Native peers (`webcall peer`) call each other through a webcall server: join → ICE connected → DTLS
    /// connected → first video frame, and call setups per second with several calls at once.
    Calls(calls::CallArgs),
    /// The kernel floor of a relay: pairs of plain TCP clients through `floor-server` (one read and one write per
    /// message, nothing else), server CPU per relayed message, for `relay` figures to be read against.
    Floor(floor::FloorArgs),
    /// The relay `floor` measures (loopback only; prints its address).
    FloorServer(floor::FloorServerArgs),
}

/// Which server the generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// webcall's protocol v1 at `/ws`.
    Webcall,
    /// The PeerJS server (npm `peer`) at `/peerjs`.
    Peerjs,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Webcall => "webcall",
            Target::Peerjs => "peerjs",
        }
    }
}

/// Options shared by every benchmark.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Protocol to speak.
    #[arg(long, value_enum, default_value_t = Target::Webcall)]
    pub target: Target,
    /// WebSocket URL: `ws://127.0.0.1:8080/ws` (webcall) or `ws://127.0.0.1:9000/peerjs` (PeerJS).
    #[arg(long)]
    pub url: String,
    /// The server's process id: its CPU time and memory are read from /proc/PID. Several (`--server-pid A,B` or
    /// the flag repeated), for several nodes: `relay` sums their CPU time; `connections` reads the first.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Spread connections over the source addresses 127.0.0.1 … 127.0.0.N (more ephemeral ports).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub sources: u8,
    /// Generator threads: 1 runs everything on the calling thread.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print the result as one JSON object on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl Common {
    /// The first `--server-pid`, if any.
    pub fn first_server_pid(&self) -> Option<u32> {
        self.server_pid.first().copied()
    }
}

/// Runs one benchmark to completion.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let threads = match &args.command {
        BenchCommand::Relay(a) => a.common.threads,
        BenchCommand::Connections(a) => a.common.threads,
        BenchCommand::Calls(_) | BenchCommand::Floor(_) => 1,
        BenchCommand::FloorServer(a) => return floor::serve(a.clone()),
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    let result = rt.block_on(async {
        match args.command {
            BenchCommand::Relay(a) => relay::run(a).await,
            BenchCommand::Connections(a) => conns::run(a).await,
            BenchCommand::Calls(a) => calls::run(a).await,
            BenchCommand::Floor(a) => floor::run(a).await,
            BenchCommand::FloorServer(_) => unreachable!("served above"),
        }
    });
    // Connections still open are dropped with the runtime; nothing waits for their close handshakes.
    rt.shutdown_background();
    let (human, json, json_out) = result?;
    eprintln!("{human}");
    if json_out {
        println!("{json}");
    }
    Ok(())
}
