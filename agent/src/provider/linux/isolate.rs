//! `isolate` and `release` on Linux: one nftables table of the agent's own, whose input and
//! output chains drop everything but loopback and the agent's connection to its gateway.
//! `release` deletes exactly that table. The isolation is recorded in the state folder, so
//! it is reported (heartbeats, the Device's status) and survives an agent restart: the
//! kernel keeps the table when the agent stops.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::provider::{CommandResult, ExecContext, ExecError};

/// The agent's table; nothing else is touched.
pub const TABLE: &str = "liveresponse_isolation";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub since: String,
    pub by: String,
    /// What stays reachable, for the analyst.
    pub allowed: Vec<String>,
}

pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("isolation.json")
}

/// The isolation this agent recorded, if the device is isolated.
pub fn current(state_dir: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(record_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The gateway's addresses and port, from its URL.
fn gateway_endpoints(url: &str) -> Result<Vec<std::net::SocketAddr>, ExecError> {
    let hostport = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:443")
    };
    let addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| ExecError::Failed(format!("cannot resolve the gateway {hostport}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ExecError::Failed(format!(
            "the gateway {hostport} resolves to no address"
        )));
    }
    Ok(addrs)
}

/// The ruleset: replaces the table in one transaction.
pub fn ruleset(gateways: &[std::net::SocketAddr]) -> String {
    let mut input = String::new();
    let mut output = String::new();
    for g in gateways {
        let family = if g.is_ipv4() { "ip" } else { "ip6" };
        input.push_str(&format!(
            "    {family} saddr {} tcp sport {} accept\n",
            g.ip(),
            g.port()
        ));
        output.push_str(&format!(
            "    {family} daddr {} tcp dport {} accept\n",
            g.ip(),
            g.port()
        ));
    }
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  chain input {{\n    type filter hook input priority -100; policy drop;\n    iif \"lo\" accept\n{input}  }}\n  chain output {{\n    type filter hook output priority -100; policy drop;\n    oif \"lo\" accept\n{output}  }}\n}}\n"
    )
}

fn nft(script: &str) -> Result<(), ExecError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ExecError::Failed(
                "isolate needs nftables (the nft program) on the device: install it (apt-get install nftables)".into(),
            ),
            _ => ExecError::Failed(format!("cannot run nft: {e}")),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| ExecError::Failed(format!("cannot talk to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ExecError::Failed(format!("nft failed: {e}")))?;
    if !out.status.success() {
        return Err(ExecError::Failed(format!(
            "nft refused the rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn state_dir(ctx: &ExecContext) -> Result<&Path, ExecError> {
    ctx.state_dir
        .as_deref()
        .ok_or_else(|| ExecError::Failed("this agent has no state folder".into()))
}

fn result(r: &Record, state: &str, note: Option<String>) -> CommandResult {
    let message = if state == "isolated" {
        format!(
            "only {} are reachable, since {}",
            r.allowed.join(" and "),
            r.since
        )
    } else {
        format!("the network is open again (isolated since {})", r.since)
    };
    let mut out = CommandResult::with_records(vec![serde_json::json!({
        "state": state,
        "message": message,
        "since": r.since,
        "by": r.by,
        "allowed": r.allowed.join(", "),
    })]);
    out.warnings.extend(note);
    out
}

pub(super) fn isolate(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let dir = state_dir(ctx)?;
    let url = ctx
        .gateway
        .as_deref()
        .ok_or_else(|| ExecError::Failed("this agent does not know its gateway".into()))?;
    let gateways = gateway_endpoints(url)?;
    let previous = current(dir);
    // Applied again even when recorded: after a reboot the table is gone.
    nft(&ruleset(&gateways))?;
    if let Some(r) = previous {
        return Ok(result(
            &r,
            "isolated",
            Some(format!("already isolated since {} by {}", r.since, r.by)),
        ));
    }
    let mut allowed = vec!["loopback".to_string()];
    allowed.extend(gateways.iter().map(|g| format!("gateway {g}")));
    let r = Record {
        since: jiff::Timestamp::now().to_string(),
        by: ctx.command_uid.clone(),
        allowed,
    };
    let text = serde_json::to_vec_pretty(&r).unwrap_or_default();
    std::fs::write(record_path(dir), text)
        .map_err(|e| ExecError::Failed(format!("isolated, but cannot record it: {e}")))?;
    tracing::warn!(by = %r.by, "device isolated: only the gateway is reachable");
    Ok(result(&r, "isolated", None))
}

pub(super) fn release(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let dir = state_dir(ctx)?;
    let Some(r) = current(dir) else {
        // The table may still be there (a lost record): delete it all the same.
        let _ = nft(&format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n"
        ));
        return Ok(CommandResult {
            records: vec![
                serde_json::json!({"state": "released", "message": "the device was not isolated", "since": null, "by": null, "allowed": "everything"}),
            ],
            warnings: vec!["the device was not isolated: nothing to release".into()],
            ..CommandResult::default()
        });
    };
    nft(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))?;
    std::fs::remove_file(record_path(dir))
        .map_err(|e| ExecError::Failed(format!("released, but cannot clear the record: {e}")))?;
    tracing::warn!("device released from isolation");
    let mut out = result(&r, "released", None);
    out.records[0]["allowed"] = serde_json::json!("everything");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_lets_only_the_gateway_and_loopback_through() {
        let rules = ruleset(&[
            "10.0.0.1:8443".parse().expect("addr"),
            "[fd00::1]:443".parse().expect("addr"),
        ]);
        assert!(rules.starts_with("add table inet liveresponse_isolation\ndelete table"));
        assert!(rules.contains("policy drop;"));
        assert!(rules.contains("ip daddr 10.0.0.1 tcp dport 8443 accept"));
        assert!(rules.contains("ip saddr 10.0.0.1 tcp sport 8443 accept"));
        assert!(rules.contains("ip6 daddr fd00::1 tcp dport 443 accept"));
        assert!(rules.contains("oif \"lo\" accept"));
        assert_eq!(
            gateway_endpoints("https://127.0.0.1:9443").expect("resolved"),
            vec!["127.0.0.1:9443".parse().expect("addr")]
        );
    }
}
