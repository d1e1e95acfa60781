//! `devices`: the enrolled endpoints of the namespace and whether they can be reached.

use jiff::Timestamp;
use kube::api::ListParams;
use liveresponse_api::crd::Device;

use crate::client::Ctx;
use crate::error::Result;
use crate::render::{self, Colors, Format};

pub async fn run(ctx: &Ctx, format: Format, colors: Colors) -> Result<()> {
    let mut devices: Vec<Device> = ctx.devices().list(&ListParams::default()).await?.items;
    devices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    match format {
        Format::Json => println!("{}", render::json_list(&devices)?),
        Format::Table if devices.is_empty() => {
            eprintln!("no devices in namespace {}", ctx.namespace)
        }
        Format::Table => println!(
            "{}",
            render::devices_table(&devices, Timestamp::now(), colors)
        ),
    }
    Ok(())
}
