//! `connect DEVICE`: open (or attach to) a session, wait until it is Connected, then hand
//! over to the console.

use std::time::Duration;

use crate::client::Ctx;
use crate::console;
use crate::error::{Error, Result};
use crate::session;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Name of the Device to connect to (see `devices`).
    pub device: String,
    /// Why you need the session (a ticket or incident); recorded in the session.
    #[arg(long)]
    pub reason: Option<String>,
    /// Attach to this existing session instead of opening a new one.
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
}

pub async fn run(ctx: &Ctx, args: &ConnectArgs, no_color: bool) -> Result<i32> {
    let (session, created) = match &args.session {
        Some(name) => (session::attach(ctx, name, &args.device).await?, false),
        None => (
            session::create(ctx, &args.device, args.reason.as_deref()).await?,
            true,
        ),
    };
    let name = session::name_of(&session);
    match session::wait_connected(ctx, &name).await {
        Ok(session) => console::run(ctx, session, no_color).await,
        Err(Error::Interrupted) if created => {
            abandon(ctx, &name).await;
            Err(Error::Interrupted)
        }
        Err(err) => Err(err),
    }
}

/// Ends a session the analyst gave up waiting for, so it does not hold the device's
/// session slot; best effort and brief, the analyst wants out.
pub async fn abandon(ctx: &Ctx, name: &str) {
    match session::end(ctx, name, Duration::from_secs(10)).await {
        Ok(ended) => eprintln!("{}", session::ended_line(name, ended.as_ref())),
        Err(err) => eprintln!(
            "could not disconnect session {name}: {}",
            crate::sanitize::text(&err.to_string())
        ),
    }
}
