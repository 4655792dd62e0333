//! Standalone webcall STUN/TURN server for manual tests and the benchmark:
//! `cargo run --release -p webcall-turn --example turn_server -- --turn-listen 127.0.0.1:3478 --turn-secret s3cret --turn-allow-peer 127.0.0.0/8`
use clap::Parser;

/// webcall's STUN/TURN server, standalone (manual tests and bench/turn/run.sh)
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    turn: webcall_turn::TurnArgs,
    /// Tokio worker threads [default: number of cores]
    #[arg(long)]
    threads: Option<usize>,
    /// Accept RFC 5766 channel numbers up to 0x7FFF (coturn's turnutils_uclient picks from that range)
    #[arg(long)]
    legacy_channel_numbers: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        rt.worker_threads(n);
    }
    rt.enable_all().build()?.block_on(async {
        let mut cfg = cli.turn.into_config(None)?;
        cfg.legacy_channel_numbers = cli.legacy_channel_numbers;
        let secret = cfg.secret.clone();
        let handle = webcall_turn::TurnServer::start(cfg).await?;
        println!("listening {} secret {}", handle.addr(), secret);
        tokio::signal::ctrl_c().await?;
        let stats = handle.stats();
        println!("{stats:?}");
        handle.shutdown().await;
        Ok(())
    })
}
