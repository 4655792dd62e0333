//! `webcall token`: mint a join token for a server started with `--auth-secret`.

use std::time::Duration;

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The secret the server was started with.
    #[arg(long, env = "WEBCALL_AUTH_SECRET", hide_env_values = true)]
    auth_secret: String,
    /// Room the token admits to (`*` for any room).
    #[arg(long)]
    room: String,
    /// Display name the holder appears with.
    #[arg(long)]
    name: Option<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The holder may only receive media (no camera or microphone).
    #[arg(long)]
    subscribe_only: bool,
    /// The holder may start and stop recording the room (the `record` permission; docs/recording.md).
    #[arg(long)]
    record: bool,
}

pub fn run(a: TokenArgs) -> anyhow::Result<()> {
    if a.room != "*" && !webcall_protocol::valid_room_name(&a.room) {
        anyhow::bail!("--room: room names are 1-64 characters of A-Z a-z 0-9 _ - (or * for any room)");
    }
    if let Some(name) = &a.name {
        if !webcall_protocol::valid_display_name(name) {
            anyhow::bail!("--name: display names are at most 64 characters, without control characters");
        }
    }
    println!(
        "{}",
        webcall_server::access::mint_token_with(
            &a.auth_secret,
            &a.room,
            a.name.as_deref(),
            a.ttl,
            !a.subscribe_only,
            a.record
        )
    );
    Ok(())
}
