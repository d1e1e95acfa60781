//! `log SESSION`: the session's command log, in the order the operator numbered it.

use jiff::Timestamp;
use kube::api::ListParams;
use liveresponse_api::crd::Command;

use crate::client::Ctx;
use crate::error::Result;
use crate::render::{self, Colors, Format};

pub async fn run(ctx: &Ctx, session: &str, format: Format, colors: Colors) -> Result<()> {
    // Asked first so a mistyped name gets the API server's "not found" rather than an
    // empty log that looks like a session without commands.
    ctx.sessions().get(session).await?;
    let mut commands: Vec<Command> = ctx
        .commands()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.spec.session == session)
        .collect();
    render::sort_commands(&mut commands);
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
