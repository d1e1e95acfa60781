//! `log SESSION`: the session's command log, in the order the operator numbered it.

use jiff::Timestamp;

use crate::client::Ctx;
use crate::error::Result;
use crate::render::{self, Colors, Format};
use crate::run::session_commands;

pub async fn run(ctx: &Ctx, session: &str, format: Format, colors: Colors) -> Result<()> {
    // Asked first so a mistyped name gets the API server's "not found" rather than an
    // empty log that looks like a session without commands.
    ctx.sessions().get(session).await?;
    let commands = session_commands(ctx, session).await?;
    match format {
        Format::Json => println!("{}", render::json_list(&commands)?),
        Format::Table if commands.is_empty() => eprintln!("session {session} has no commands"),
        Format::Table => println!(
            "{}",
            render::commands_table(&commands, Timestamp::now(), colors)
        ),
    }
    Ok(())
}
