//! Devices: their status follows the agent's stream (hello facts, connected, lastSeen,
//! which replica holds it), and deleting a Device revokes its agent at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use liveresponse_api::crd::{CommandPhase, Device};
use serde_json::json;
use tokio::sync::mpsc;

use crate::context::{Context, MANAGER, now};
use crate::controllers::command;
use crate::error::Result;
use crate::gateway::{DeviceKey, GatewayEvent};

/// How often a heartbeat refreshes `lastSeen` in the API server (heartbeats come more often;
/// writing each would load the API server for nothing).
const LAST_SEEN_EVERY: Duration = Duration::from_secs(30);

/// Applies gateway events to the API server until the gateway goes away.
pub async fn run_events(ctx: Arc<Context>, mut events: mpsc::UnboundedReceiver<GatewayEvent>) {
    let mut last_write: HashMap<DeviceKey, Instant> = HashMap::new();
    while let Some(ev) = events.recv().await {
        let res = match ev {
            GatewayEvent::Connected { device, hello } => {
                last_write.insert(device.clone(), Instant::now());
                let conditions = vec![condition(
                    true,
                    "AgentConnected",
                    "the agent's stream is open",
                )];
                let status = json!({
                    "hostname": hello.hostname, "os": hello.os, "osVersion": hello.os_version,
                    "arch": hello.arch, "agentVersion": hello.agent_version,
                    "capabilities": hello.capabilities, "connected": true, "lastSeen": now(),
                    "gateway": ctx.gateway.instance(), "conditions": conditions,
                });
                apply_status(&ctx, &device, status).await
            }
            GatewayEvent::Seen { device } => {
                let due = last_write
                    .get(&device)
                    .is_none_or(|t| t.elapsed() >= LAST_SEEN_EVERY);
                if due {
                    last_write.insert(device.clone(), Instant::now());
                    apply_status(
                        &ctx,
                        &device,
                        json!({ "connected": true, "lastSeen": now(),
                        "gateway": ctx.gateway.instance() }),
                    )
                    .await
                } else {
                    Ok(())
                }
            }
            GatewayEvent::Disconnected { device, running } => {
                last_write.remove(&device);
                // A newer stream of the same device may already be registered.
                if ctx.gateway.is_connected(&device) {
                    Ok(())
                } else {
                    let conditions = vec![condition(
                        false,
                        "AgentDisconnected",
                        "the agent's stream closed or stopped sending heartbeats",
                    )];
                    let r = apply_status(
                        &ctx,
                        &device,
                        json!({ "connected": false, "lastSeen": now(),
                        "conditions": conditions }),
                    )
                    .await;
                    for (_, target) in running {
                        let msg = format!(
                            "device {} disconnected while the command ran; run it again once the device is back",
                            target.device.1
                        );
                        let api: Api<liveresponse_api::crd::Command> =
                            Api::namespaced(ctx.client.clone(), &target.namespace);
                        if let Ok(Some(c)) = api.get_opt(&target.name).await {
                            let cancelled = c.spec.cancel;
                            let (phase, reason) = if cancelled {
                                (CommandPhase::Cancelled, "Cancelled")
                            } else {
                                (CommandPhase::Failed, "DeviceDisconnected")
                            };
                            if let Err(e) =
                                command::finish(&ctx, &c, phase, reason, &msg, None).await
                            {
                                tracing::warn!(error = %e, "could not fail a command of a disconnected device");
                            }
                        }
                    }
                    r
                }
            }
            GatewayEvent::Completed {
                uid: _,
                target,
                completed,
                output,
            } => {
                command::complete(
                    &ctx,
                    &target.namespace,
                    &target.name,
                    target.step,
                    completed,
                    output,
                )
                .await
            }
        };
        if let Err(e) = res {
            ctx.metrics
                .reconcile_errors
                .with_label_values(&["device"])
                .inc();
            tracing::warn!(error = %e, "could not record an agent event");
        }
    }
}

fn condition(connected: bool, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "type": "Connected",
        "status": if connected { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    })
}

async fn apply_status(ctx: &Context, device: &DeviceKey, status: serde_json::Value) -> Result<()> {
    let api: Api<Device> = Api::namespaced(ctx.client.clone(), &device.0);
    let patch =
        json!({ "apiVersion": "liveresponse.io/v1alpha1", "kind": "Device", "status": status });
    api.patch_status(
        &device.1,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Closes the stream of any agent whose Device is deleted.
pub async fn watch_deletions(ctx: Arc<Context>) {
    let api: Api<Device> = Api::all(ctx.client.clone());
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        if let Ok(watcher::Event::Delete(d)) = ev {
            let key = (
                d.metadata.namespace.clone().unwrap_or_default(),
                d.metadata.name.clone().unwrap_or_default(),
            );
            tracing::info!(namespace = %key.0, device = %key.1, "device deleted; revoking its agent");
            ctx.gateway.disconnect_device(&key);
        }
    }
}
