//! `disconnect SESSION`: ask the operator to end a session and wait until it has.

use crate::client::Ctx;
use crate::error::Result;
use crate::session::{self, DISCONNECT_TIMEOUT};

pub async fn run(ctx: &Ctx, name: &str) -> Result<()> {
    let ended = session::end(ctx, name, DISCONNECT_TIMEOUT).await?;
    println!("{}", session::ended_line(name, ended.as_ref()));
    Ok(())
}
