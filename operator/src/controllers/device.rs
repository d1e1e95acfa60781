//! Devices, the one writer of `Device.status`: woken by the gateway when an agent comes,
//! goes or is seen, and by sessions when they start or end. Each wake recomputes the whole
//! status from the gateway's link and the session cache ([`desired`], pure) and writes it
//! only when it changed (or `lastSeen` is older than [`LAST_SEEN_EVERY`]). A device whose
//! link changed wakes its sessions and commands. Deleting a Device revokes its agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use liveresponse_api::crd::{Device, DeviceStatus, LiveResponseSession, SessionPhase, Time};

use crate::context::{Context, MANAGER};
use crate::gateway::{DeviceKey, Link};
use crate::status::set_condition;

/// How often a heartbeat refreshes `lastSeen` in the API server (heartbeats come more often;
/// writing each would load the API server for nothing).
pub const LAST_SEEN_EVERY: Duration = Duration::from_secs(30);

/// The status a Device should have. `link` is this replica's view (None: it never saw the
/// agent, e.g. after a restart); facts the agent reported earlier are kept from `current`.
pub fn desired(
    current: &DeviceStatus,
    link: Option<&Link>,
    active_session: Option<String>,
    instance: &str,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> DeviceStatus {
    let mut st = current.clone();
    let connected = link.is_some_and(|l| l.connected);
    if let Some(h) = link.and_then(|l| l.hello.as_ref()) {
        // Hostname and OS are the device's identity: the first hello sets them, a later
        // one cannot change them (see `identity_changes`).
        if st.hostname.is_none() {
            st.hostname = Some(h.hostname.clone());
        }
        if st.os.is_none() {
            st.os = os_family(&h.os);
        }
        st.os_version = Some(h.os_version.clone());
        st.arch = Some(h.arch.clone());
        st.agent_version = Some(h.agent_version.clone());
        st.capabilities = h.capabilities.clone();
        st.isolation = h
            .isolation
            .as_ref()
            .map(|i| liveresponse_api::crd::DeviceIsolation {
                since: i.since.clone(),
                by: i.by.clone(),
            });
    }
    if let Some(seen) = link.and_then(|l| l.last_seen) {
        let stale = st.last_seen.as_ref().is_none_or(|t| {
            seen.duration_since(t.0)
                >= jiff::SignedDuration::try_from(LAST_SEEN_EVERY).unwrap_or_default()
        });
        // Connecting or disconnecting is news; a heartbeat only every LAST_SEEN_EVERY.
        if stale || st.connected != connected {
            st.last_seen = Some(Time(seen));
        }
    }
    if connected {
        st.gateway = Some(instance.to_string());
    }
    st.connected = connected;
    st.active_session = active_session;
    let (reason, message) = if connected {
        ("AgentConnected", "the agent's stream is open")
    } else {
        (
            "AgentDisconnected",
            "the agent's stream is closed or stopped sending heartbeats",
        )
    };
    set_condition(
        &mut st.conditions,
        "Ready",
        connected,
        reason,
        message,
        generation,
        now,
    );
    st
}

/// The CRD knows three OS families; anything else an agent says is not recorded.
fn os_family(os: &str) -> Option<liveresponse_api::crd::OsFamily> {
    serde_json::from_value(serde_json::Value::String(os.to_string())).ok()
}

/// What a hello claims that differs from the identity the Device recorded: worth an Event
/// (a stolen certificate, or a host rebuilt under the same name), never a silent overwrite.
pub fn identity_changes(
    current: &DeviceStatus,
    hello: &liveresponse_api::proto::Hello,
) -> Vec<String> {
    let mut changes = vec![];
    if let Some(h) = &current.hostname
        && *h != hello.hostname
    {
        changes.push(format!(
            "hostname {:?} (recorded {h:?})",
            crate::status::truncate(&hello.hostname, 64)
        ));
    }
    if let Some(os) = current.os
        && os_family(&hello.os) != Some(os)
    {
        changes.push(format!(
            "os {:?} (recorded {os:?})",
            crate::status::truncate(&hello.os, 32)
        ));
    }
    changes
}

/// The session that holds the device: a live one that is Connected (or admitted and
/// Connecting), the oldest first.
pub fn active_session(sessions: &[Arc<LiveResponseSession>], key: &DeviceKey) -> Option<String> {
    let mut live: Vec<&LiveResponseSession> = sessions
        .iter()
        .map(|s| s.as_ref())
        .filter(|s| s.namespace().as_deref() == Some(key.0.as_str()) && s.spec.device == key.1)
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter(|s| {
            matches!(
                s.status.as_ref().and_then(|st| st.phase),
                Some(SessionPhase::Connected)
            )
        })
        .collect();
    live.sort_by_key(|s| (s.creation_timestamp().map(|t| t.0), s.name_any()));
    live.first().map(|s| s.name_any())
}

/// Applies device wakes to the API server, one device at a time, until the process ends.
pub async fn run(ctx: Arc<Context>) {
    // Whether each device was connected when last written: a change wakes its sessions.
    let mut was: HashMap<DeviceKey, bool> = HashMap::new();
    // What was last reported as an Event per device, so a wake does not repeat it.
    let mut refused_seen: HashMap<DeviceKey, u64> = HashMap::new();
    let mut identity_warned: HashMap<DeviceKey, String> = HashMap::new();
    // After a restart, devices this replica never saw are marked disconnected once agents
    // had time to come back.
    let sweep = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sweep.restart_grace).await;
        for d in sweep.devices.state() {
            sweep
                .gateway
                .device_wakes
                .wake((d.namespace().unwrap_or_default(), d.name_any()));
        }
    });
    loop {
        let key = ctx.gateway.device_wakes.next().await;
        let Some(dev) = ctx.devices.get(&ObjectRef::new(&key.1).within(&key.0)) else {
            // Enrolled moments ago (not in the cache yet) or deleted: look again soon.
            let (c, k) = (ctx.clone(), key.clone());
            if ctx.gateway.is_connected(&key) {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    c.gateway.device_wakes.wake(k);
                });
            }
            continue;
        };
        let link = ctx.gateway.link(&key);
        let sessions = ctx.sessions.state();
        let current = dev.status.clone().unwrap_or_default();
        if let Some(l) = &link {
            let seen = refused_seen.entry(key.clone()).or_insert(0);
            if l.duplicates_refused > *seen {
                *seen = l.duplicates_refused;
                ctx.event(
                    dev.as_ref(),
                    true,
                    "DuplicateConnection",
                    format!(
                        "a second agent presented this device's certificate while its stream was live and was refused ({} so far); if this device was not re-installed, its certificate may be stolen: delete the Device to revoke it",
                        l.duplicates_refused
                    ),
                )
                .await;
            }
            if let Some(h) = l.hello.as_ref().filter(|_| l.connected) {
                let changes = identity_changes(&current, h);
                let note = changes.join(", ");
                if !changes.is_empty() && identity_warned.get(&key) != Some(&note) {
                    ctx.event(
                        dev.as_ref(),
                        true,
                        "IdentityChanged",
                        format!(
                            "the agent now reports {note}; the Device keeps its recorded identity. Delete and re-enroll the Device if the host really changed"
                        ),
                    )
                    .await;
                    identity_warned.insert(key.clone(), note);
                }
            }
        }
        let want = desired(
            &current,
            link.as_ref(),
            active_session(&sessions, &key),
            ctx.gateway.instance(),
            dev.metadata.generation,
            jiff::Timestamp::now(),
        );
        if want != current
            && let Err(e) = write(&ctx, &key, &want).await
        {
            ctx.metrics
                .reconcile_errors
                .with_label_values(&["device"])
                .inc();
            tracing::warn!(namespace = %key.0, device = %key.1, error = %e, "could not write a device's status");
            let (c, k) = (ctx.clone(), key.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.gateway.device_wakes.wake(k);
            });
            continue;
        }
        if was.insert(key.clone(), want.connected) != Some(want.connected) {
            wake_dependents(&ctx, &key, &sessions);
        }
    }
}

/// A device that came or went concerns its live sessions and their commands.
fn wake_dependents(ctx: &Context, key: &DeviceKey, sessions: &[Arc<LiveResponseSession>]) {
    for s in sessions {
        if s.namespace().as_deref() == Some(key.0.as_str())
            && s.spec.device == key.1
            && !s
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(|p| p.is_final())
        {
            ctx.session_wakes.wake(ObjectRef::from_obj(s.as_ref()));
            for c in ctx.session_commands(&key.0, &s.name_any()) {
                ctx.gateway
                    .command_wakes
                    .wake(ObjectRef::from_obj(c.as_ref()));
            }
        }
    }
}

async fn write(ctx: &Context, key: &DeviceKey, st: &DeviceStatus) -> crate::error::Result<()> {
    let api: Api<Device> = Api::namespaced(ctx.client.clone(), &key.0);
    let patch = serde_json::json!({
        "apiVersion": "liveresponse.io/v1alpha1", "kind": "Device", "status": st,
    });
    api.patch_status(
        &key.1,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Keeps the Device cache filled and closes the stream of any agent whose Device is
/// deleted, or being deleted. After a relist (a watch that expired or an API server that
/// restarted), deletions that happened meanwhile come as absences, not events: every
/// connected device missing from the new list is looked up, and cut if it is gone.
pub async fn watch(
    ctx_gateway: Arc<crate::gateway::Gateway>,
    writer: kube::runtime::reflector::store::Writer<Device>,
    client: kube::Client,
) {
    let reader = writer.as_reader();
    let api: Api<Device> = Api::all(client.clone());
    let stream = kube::runtime::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Delete(d)) => {
                revoke(&ctx_gateway, &client, key_of(&d)).await;
            }
            Ok(watcher::Event::Apply(d)) if d.metadata.deletion_timestamp.is_some() => {
                revoke(&ctx_gateway, &client, key_of(&d)).await;
            }
            Ok(watcher::Event::InitDone) => {
                for key in unlisted(ctx_gateway.connected_devices(), &reader) {
                    // Enrolled after the list was taken? Ask before cutting.
                    let api: Api<Device> = Api::namespaced(client.clone(), &key.0);
                    match api.get_opt(&key.1).await {
                        Ok(Some(d)) if d.metadata.deletion_timestamp.is_none() => {}
                        Ok(_) => revoke(&ctx_gateway, &client, key).await,
                        Err(e) => {
                            tracing::warn!(namespace = %key.0, device = %key.1, error = %e, "could not check a connected device after a relist")
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Connected devices that a fresh list lacks (or lists as being deleted).
fn unlisted(
    connected: Vec<DeviceKey>,
    listed: &kube::runtime::reflector::Store<Device>,
) -> Vec<DeviceKey> {
    connected
        .into_iter()
        .filter(|key| {
            listed
                .get(&ObjectRef::new(&key.1).within(&key.0))
                .is_none_or(|d| d.metadata.deletion_timestamp.is_some())
        })
        .collect()
}

fn key_of(d: &Device) -> DeviceKey {
    (d.namespace().unwrap_or_default(), d.name_any())
}

async fn revoke(gateway: &crate::gateway::Gateway, client: &kube::Client, key: DeviceKey) {
    if gateway.is_connected(&key) {
        tracing::info!(namespace = %key.0, device = %key.1, "device deleted; revoking its agent");
    }
    gateway.disconnect_device(&key);
    if let Err(e) = crate::gateway::record_revocation(client.clone(), &key.0, &key.1).await {
        tracing::warn!(namespace = %key.0, device = %key.1, error = %e, "could not record the revocation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::proto::Hello;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap_or_default()
    }

    fn link(connected: bool, seen: &str) -> Link {
        Link {
            connected,
            hello: Some(Hello {
                hostname: "web-1".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            last_seen: Some(ts(seen)),
            disconnected_at: None,
            duplicates_refused: 0,
        }
    }

    #[test]
    fn a_relist_reveals_devices_deleted_while_unwatched() {
        let device = |name: &str, deleting: bool| {
            let mut d = Device::new(name, Default::default());
            d.metadata.namespace = Some("t".into());
            if deleting {
                d.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
            }
            d
        };
        let (reader, mut writer) = kube::runtime::reflector::store::<Device>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(device("kept", false)));
        writer.apply_watcher_event(&watcher::Event::InitApply(device("going", true)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let key = |n: &str| ("t".to_string(), n.to_string());
        let connected = vec![key("kept"), key("going"), key("gone")];
        assert_eq!(
            unlisted(connected, &reader),
            vec![key("going"), key("gone")]
        );
    }

    #[test]
    fn a_connecting_agent_fills_the_status() {
        let now = ts("2026-01-01T00:00:00Z");
        let st = desired(
            &DeviceStatus::default(),
            Some(&link(true, "2026-01-01T00:00:00Z")),
            None,
            "op-1",
            Some(1),
            now,
        );
        assert!(st.connected);
        assert_eq!(st.hostname.as_deref(), Some("web-1"));
        assert_eq!(st.gateway.as_deref(), Some("op-1"));
        assert_eq!(st.last_seen.map(|t| t.0), Some(now));
        assert_eq!(st.conditions[0].type_, "Ready");
        assert_eq!(st.conditions[0].status, "True");
    }

    #[test]
    fn heartbeats_refresh_last_seen_only_every_30s() {
        let t0 = ts("2026-01-01T00:00:00Z");
        let st = desired(
            &DeviceStatus::default(),
            Some(&link(true, "2026-01-01T00:00:00Z")),
            None,
            "op-1",
            Some(1),
            t0,
        );
        let later = desired(
            &st,
            Some(&link(true, "2026-01-01T00:00:10Z")),
            None,
            "op-1",
            Some(1),
            t0,
        );
        assert_eq!(later, st, "a heartbeat 10s later changes nothing");
        let much_later = desired(
            &st,
            Some(&link(true, "2026-01-01T00:00:31Z")),
            None,
            "op-1",
            Some(1),
            t0,
        );
        assert_eq!(
            much_later.last_seen.map(|t| t.0),
            Some(ts("2026-01-01T00:00:31Z"))
        );
    }

    #[test]
    fn a_hello_cannot_change_the_recorded_identity() {
        let now = ts("2026-01-01T00:00:00Z");
        let first = desired(
            &DeviceStatus::default(),
            Some(&link(true, "2026-01-01T00:00:00Z")),
            None,
            "op-1",
            Some(1),
            now,
        );
        let mut other = link(true, "2026-01-01T00:01:00Z");
        if let Some(h) = other.hello.as_mut() {
            h.hostname = "attacker".into();
            h.os = "windows".into();
        }
        let after = desired(&first, Some(&other), None, "op-1", Some(1), now);
        assert_eq!(after.hostname.as_deref(), Some("web-1"));
        assert_eq!(after.os, first.os);
        let hello = other.hello.unwrap_or_default();
        let changes = identity_changes(&after, &hello);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].contains("attacker"), "{changes:?}");
        let same = link(true, "2026-01-01T00:01:00Z").hello.unwrap_or_default();
        assert!(identity_changes(&after, &same).is_empty());
    }

    #[test]
    fn after_a_restart_an_unseen_device_is_disconnected_and_keeps_its_facts() {
        let now = ts("2026-01-01T00:00:00Z");
        let before = desired(
            &DeviceStatus::default(),
            Some(&link(true, "2025-12-31T23:59:00Z")),
            Some("s1".into()),
            "op-1",
            Some(1),
            now,
        );
        let st = desired(&before, None, None, "op-2", Some(1), now);
        assert!(!st.connected);
        assert_eq!(st.hostname.as_deref(), Some("web-1"));
        assert_eq!(st.active_session, None);
        assert_eq!(st.conditions[0].status, "False");
        assert_eq!(st.conditions[0].reason, "AgentDisconnected");
    }
}
