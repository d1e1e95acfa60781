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
    /// The addresses the rules let through, to apply them again after a reboot.
    #[serde(default)]
    pub gateways: Vec<std::net::SocketAddr>,
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
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

/// The name servers of the host's resolv.conf (below the host root).
fn name_servers(ctx: &ExecContext) -> Vec<std::net::IpAddr> {
    let text = super::read_small_host_file(&ctx.host_root, "/etc/resolv.conf", 64 * 1024)
        .unwrap_or_default();
    parse_resolv_conf(&text)
}

fn parse_resolv_conf(text: &str) -> Vec<std::net::IpAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(ip) = words.next().and_then(|w| w.split('%').next()?.parse().ok())
            && !servers.contains(&ip)
        {
            servers.push(ip);
        }
    }
    servers
}

/// The ruleset: replaces the table in one transaction.
pub fn ruleset(gateways: &[std::net::SocketAddr], dns: &[std::net::IpAddr]) -> String {
    let mut input = String::new();
    let mut output = String::new();
    for ip in dns {
        let family = if ip.is_ipv4() { "ip" } else { "ip6" };
        for proto in ["udp", "tcp"] {
            input.push_str(&format!(
                "    {family} saddr {ip} {proto} sport 53 accept\n"
            ));
            output.push_str(&format!(
                "    {family} daddr {ip} {proto} dport 53 accept\n"
            ));
        }
    }
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

pub(super) fn isolate(ctx: &ExecContext, allow_dns: bool) -> Result<CommandResult, ExecError> {
    let dir = state_dir(ctx)?;
    let url = ctx
        .gateway
        .as_deref()
        .ok_or_else(|| ExecError::Failed("this agent does not know its gateway".into()))?;
    let gateways = gateway_endpoints(url)?;
    let dns = if allow_dns {
        let servers = name_servers(ctx);
        if servers.is_empty() {
            return Err(ExecError::Failed(
                "-allow_dns: /etc/resolv.conf names no name server; isolate without -allow_dns, or fix resolv.conf first".into(),
            ));
        }
        servers
    } else {
        Vec::new()
    };
    let previous = current(dir);
    // Applied again even when recorded: after a reboot the table is gone.
    nft(&ruleset(&gateways, &dns))?;
    if let Some(r) = previous {
        return Ok(result(
            &r,
            "isolated",
            Some(format!("already isolated since {} by {}", r.since, r.by)),
        ));
    }
    let mut allowed = vec!["loopback".to_string()];
    allowed.extend(gateways.iter().map(|g| format!("gateway {g}")));
    allowed.extend(dns.iter().map(|ip| format!("name server {ip}")));
    let r = Record {
        since: jiff::Timestamp::now().to_string(),
        by: if ctx.requested_by.is_empty() {
            format!("command {}", ctx.command_uid)
        } else {
            format!("{} (command {})", ctx.requested_by, ctx.command_uid)
        },
        allowed,
        gateways,
        dns,
    };
    let text = serde_json::to_vec_pretty(&r).unwrap_or_default();
    std::fs::write(record_path(dir), text)
        .map_err(|e| ExecError::Failed(format!("isolated, but cannot record it: {e}")))?;
    tracing::warn!(by = %r.by, "device isolated: only the gateway is reachable");
    Ok(result(&r, "isolated", None))
}

/// At agent start: a recorded isolation is applied again, since a reboot (or anyone with
/// root) may have emptied the kernel's rules while the record says the device is
/// isolated. The gateway is resolved again too, in case its address changed.
pub fn reapply(state_dir: &Path, gateway: &str) -> Result<Option<Record>, ExecError> {
    let Some(r) = current(state_dir) else {
        return Ok(None);
    };
    let mut gateways = r.gateways.clone();
    if let Ok(now) = gateway_endpoints(gateway) {
        for g in now {
            if !gateways.contains(&g) {
                gateways.push(g);
            }
        }
    }
    if gateways.is_empty() {
        return Err(ExecError::Failed(
            "the isolation record names no gateway and the gateway does not resolve: not applied"
                .into(),
        ));
    }
    nft(&ruleset(&gateways, &r.dns))?;
    Ok(Some(r))
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
        let rules = ruleset(
            &[
                "10.0.0.1:8443".parse().expect("addr"),
                "[fd00::1]:443".parse().expect("addr"),
            ],
            &[],
        );
        assert!(!rules.contains("53"));
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

    #[test]
    fn allow_dns_opens_port_53_to_the_name_servers_only() {
        let servers = parse_resolv_conf(
            "# generated\nsearch corp\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n",
        );
        assert_eq!(
            servers,
            vec![
                "10.0.0.53".parse::<std::net::IpAddr>().expect("ip"),
                "fe80::1".parse().expect("ip")
            ]
        );
        let rules = ruleset(&["10.0.0.1:8443".parse().expect("addr")], &servers);
        assert!(rules.contains("ip daddr 10.0.0.53 udp dport 53 accept"));
        assert!(rules.contains("ip daddr 10.0.0.53 tcp dport 53 accept"));
        assert!(rules.contains("ip6 saddr fe80::1 udp sport 53 accept"));
    }

    #[test]
    fn records_of_an_older_agent_still_read() {
        let old = r#"{"since":"2026-12-01T00:00:00Z","by":"uid","allowed":["loopback"]}"#;
        let r: Record = serde_json::from_str(old).expect("reads");
        assert!(r.gateways.is_empty() && r.dns.is_empty());
    }
}
