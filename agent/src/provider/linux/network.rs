//! connections: TCP and UDP sockets over IPv4 and IPv6 with their owning process.
//!
//! Reads the live /proc (the agent's network namespace, the host's when the DaemonSet
//! runs on the host network), not `host_root`: sockets are kernel state, not files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use procfs::FromBufReadSI;
use procfs::net::{TcpNetEntries, TcpState, UdpNetEntries, UdpState};
use serde::Serialize;

use super::hostfs::{Accounts, HostFs};
use super::system::read_proc_bytes;
use super::to_records;
use crate::provider::{CommandResult, ExecContext, ExecError};

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ConnectionRecord {
    /// tcp, tcp6, udp or udp6, as netstat names them.
    protocol: &'static str,
    local_address: String,
    local_port: u16,
    remote_address: String,
    remote_port: u16,
    state: &'static str,
    /// The lowest pid holding the socket; several share one after a fork.
    pid: Option<u32>,
    process_name: Option<String>,
    pids: Vec<u32>,
    uid: u32,
    user: String,
    inode: u64,
}

pub(super) struct Socket {
    pub(super) protocol: &'static str,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) state: &'static str,
    pub(super) uid: u32,
    pub(super) inode: u64,
}

pub(super) fn connections(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let mut sockets = Vec::new();
    let mut warnings = Vec::new();
    let mut readable = 0;
    for (protocol, table) in [
        ("tcp", read_table(ctx, "tcp").and_then(|t| parse_tcp(&t))),
        ("tcp6", read_table(ctx, "tcp6").and_then(|t| parse_tcp(&t))),
        ("udp", read_table(ctx, "udp").and_then(|t| parse_udp(&t))),
        ("udp6", read_table(ctx, "udp6").and_then(|t| parse_udp(&t))),
    ] {
        match table {
            Ok(entries) => {
                readable += 1;
                sockets.extend(entries.into_iter().map(|mut s| {
                    s.protocol = protocol;
                    s
                }));
            }
            // No IPv6 in the kernel is normal; other failures the analyst should know.
            Err(e) => warnings.push(format!("could not read the {protocol} table: {e}")),
        }
    }
    if readable == 0 {
        return Err(ExecError::Failed(format!(
            "cannot read any socket table from /proc/net: {}",
            warnings.join("; ")
        )));
    }
    ctx.check()?;

    let owners = socket_owners(ctx)?;
    let accounts = Accounts::load(&HostFs::of(ctx));
    let mut rows: Vec<ConnectionRecord> = sockets
        .into_iter()
        .map(|s| {
            let (pids, name) = owners
                .get(&s.inode)
                .filter(|_| s.inode != 0)
                .map(|o| (o.pids.clone(), Some(o.name.clone())))
                .unwrap_or((Vec::new(), None));
            ConnectionRecord {
                protocol: s.protocol,
                local_address: s.local.ip().to_string(),
                local_port: s.local.port(),
                remote_address: s.remote.ip().to_string(),
                remote_port: s.remote.port(),
                state: s.state,
                pid: pids.first().copied(),
                process_name: name,
                pids,
                uid: s.uid,
                user: accounts.user(s.uid),
                inode: s.inode,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (
            a.protocol,
            a.local_port,
            &a.local_address,
            a.remote_port,
            &a.remote_address,
            a.inode,
        )
            .cmp(&(
                b.protocol,
                b.local_port,
                &b.local_address,
                b.remote_port,
                &b.remote_address,
                b.inode,
            ))
    });
    let mut result = CommandResult::with_records(to_records(&rows)?);
    result.warnings = warnings;
    Ok(result)
}

/// A socket table is about 150 bytes a socket: this is some 400 000 sockets, far more than
/// a host has, and it bounds what a flood of sockets can make the agent hold.
const TABLE_CAP: u64 = 64 << 20;

/// Reads `/proc/<agent pid>/net/<table>` (what `/proc/net` links to, named without links so
/// the link-refusing reader takes it), bounded; procfs's own reader has no limit.
fn read_table(ctx: &ExecContext, table: &str) -> Result<Vec<u8>, String> {
    read_table_of(ctx, std::process::id(), table)
}

/// The same table as process `pid` sees it (its network namespace), as bounded.
pub(super) fn read_table_of(ctx: &ExecContext, pid: u32, table: &str) -> Result<Vec<u8>, String> {
    let path = format!("/proc/{pid}/net/{table}");
    read_proc_bytes(ctx, Path::new(&path), TABLE_CAP).map_err(|e| e.to_string())
}

/// procfs's parser of a table's text, the same as `procfs::net::tcp()` ran.
pub(super) fn parse_tcp(table: &[u8]) -> Result<Vec<Socket>, String> {
    let entries = TcpNetEntries::from_buf_read(table, procfs::current_system_info())
        .map_err(|e| e.to_string())?
        .0;
    Ok(entries
        .into_iter()
        .map(|e| Socket {
            protocol: "",
            local: e.local_address,
            remote: e.remote_address,
            state: tcp_state(&e.state),
            uid: e.uid,
            inode: e.inode,
        })
        .collect())
}

pub(super) fn parse_udp(table: &[u8]) -> Result<Vec<Socket>, String> {
    let entries = UdpNetEntries::from_buf_read(table, procfs::current_system_info())
        .map_err(|e| e.to_string())?
        .0;
    Ok(entries
        .into_iter()
        .map(|e| Socket {
            protocol: "",
            local: e.local_address,
            remote: e.remote_address,
            // UDP has no connection; ss calls an unconnected socket UNCONN.
            state: match e.state {
                UdpState::Established => "ESTABLISHED",
                UdpState::Close => "UNCONN",
            },
            uid: e.uid,
            inode: e.inode,
        })
        .collect())
}

fn tcp_state(state: &TcpState) -> &'static str {
    match state {
        TcpState::Established => "ESTABLISHED",
        TcpState::SynSent => "SYN_SENT",
        TcpState::SynRecv => "SYN_RECV",
        TcpState::FinWait1 => "FIN_WAIT1",
        TcpState::FinWait2 => "FIN_WAIT2",
        TcpState::TimeWait => "TIME_WAIT",
        TcpState::Close => "CLOSE",
        TcpState::CloseWait => "CLOSE_WAIT",
        TcpState::LastAck => "LAST_ACK",
        TcpState::Listen => "LISTEN",
        TcpState::Closing => "CLOSING",
        TcpState::NewSynRecv => "NEW_SYN_RECV",
    }
}

struct Owner {
    pids: Vec<u32>,
    name: String,
}

/// Socket inode -> the processes holding it, from /proc/*/fd. Processes that exit or
/// hide their fds (other users' without CAP_SYS_PTRACE) are skipped: their sockets show
/// without a pid rather than failing the command.
fn socket_owners(ctx: &ExecContext) -> Result<HashMap<u64, Owner>, ExecError> {
    let mut owners: HashMap<u64, Owner> = HashMap::new();
    let all = procfs::process::all_processes()
        .map_err(|e| ExecError::Failed(format!("cannot list processes in /proc: {e}")))?;
    for process in all {
        ctx.check()?;
        let Ok(process) = process else { continue };
        let Ok(fds) = process.fd() else { continue };
        let pid = u32::try_from(process.pid()).unwrap_or_default();
        let mut name = None;
        // The fd directory and stat (its comm is at most 16 bytes) have kernel-bounded sizes.
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                let name = name
                    .get_or_insert_with(|| {
                        process
                            .stat()
                            .map(|s| s.comm)
                            .unwrap_or_else(|_| String::new())
                    })
                    .clone();
                let owner = owners.entry(inode).or_insert_with(|| Owner {
                    pids: Vec::new(),
                    name,
                });
                if !owner.pids.contains(&pid) {
                    owner.pids.push(pid);
                }
            }
        }
    }
    for owner in owners.values_mut() {
        owner.pids.sort_unstable();
    }
    Ok(owners)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;

    fn find<'a>(
        records: &'a [serde_json::Value],
        protocol: &str,
        port: u16,
    ) -> Option<&'a serde_json::Value> {
        records
            .iter()
            .find(|r| r["protocol"] == protocol && r["localPort"] == port)
    }

    #[test]
    fn shows_our_listeners_with_their_pid() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp6 = std::net::TcpListener::bind("[::1]:0").ok();
        let dir = tempfile::tempdir().unwrap();
        let result = run(&ctx(dir.path()), "connections", &[]).unwrap();
        assert_columns("connections", &result);
        let me = std::process::id();

        let port = tcp.local_addr().unwrap().port();
        let r = find(&result.records, "tcp", port).unwrap_or_else(|| panic!("no tcp {port}"));
        assert_eq!(r["localAddress"], "127.0.0.1");
        assert_eq!(r["state"], "LISTEN");
        assert_eq!(r["pid"], me);
        assert!(r["processName"].is_string());

        let port = udp.local_addr().unwrap().port();
        let r = find(&result.records, "udp", port).unwrap_or_else(|| panic!("no udp {port}"));
        assert_eq!(r["state"], "UNCONN");
        assert_eq!(r["pid"], me);

        if let Some(tcp6) = tcp6 {
            let port = tcp6.local_addr().unwrap().port();
            let r = find(&result.records, "tcp6", port).unwrap_or_else(|| panic!("no tcp6 {port}"));
            assert_eq!(r["localAddress"], "::1");
            assert_eq!(r["state"], "LISTEN");
            assert_eq!(r["pid"], me);
        }
    }

    #[test]
    fn established_connection_has_both_ends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let result = run(&ctx(dir.path()), "connections", &[]).unwrap();
        let r = find(&result.records, "tcp", client_port).unwrap();
        assert_eq!(r["state"], "ESTABLISHED");
        assert_eq!(r["remotePort"], port);
        assert_eq!(r["remoteAddress"], "127.0.0.1");
    }
}
