//! `sessions`: the dashboard of who is connected to what, oldest first.

use jiff::Timestamp;
use kube::api::ListParams;
use liveresponse_api::crd::LiveResponseSession;

use crate::client::Ctx;
use crate::error::Result;
use crate::render::{self, Colors, Format};

pub async fn run(ctx: &Ctx, format: Format, colors: Colors) -> Result<()> {
    let mut sessions: Vec<LiveResponseSession> =
        ctx.sessions().list(&ListParams::default()).await?.items;
    sessions.sort_by(|a, b| {
        let key = |s: &LiveResponseSession| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    match format {
        Format::Json => println!("{}", render::json_list(&sessions)?),
        Format::Table if sessions.is_empty() => {
            eprintln!("no sessions in namespace {}", ctx.namespace)
        }
        Format::Table => println!(
            "{}",
            render::sessions_table(&sessions, Timestamp::now(), colors)
        ),
    }
    Ok(())
}
