//! Everything the CLI prints about resources: kubectl-style tables, `-o json`, durations,
//! relative times and colours. Pure functions of the objects and "now", so the tests can
//! pin the output.

use std::io::IsTerminal;

use comfy_table::{Cell, Color, Table, presets};
use jiff::Timestamp;
use liveresponse_api::command::{OutputFormat, find, parse_command};
use liveresponse_api::crd::{
    Command, CommandPhase, Device, LiveResponseSession, SessionPhase, Time,
};
use liveresponse_api::output::render;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sanitize;

/// `-o table|json` of the listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Whether to colour one output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Colors {
    pub enabled: bool,
}

/// Colours only for a terminal, and never when `--no-color` is given or `NO_COLOR` is set
/// to a non-empty value (<https://no-color.org>).
pub fn colors_enabled(no_color_flag: bool, no_color_env: Option<&str>, is_tty: bool) -> bool {
    !no_color_flag && no_color_env.is_none_or(str::is_empty) && is_tty
}

impl Colors {
    pub fn stdout(no_color: bool) -> Colors {
        let env = std::env::var("NO_COLOR").ok();
        Colors {
            enabled: colors_enabled(no_color, env.as_deref(), std::io::stdout().is_terminal()),
        }
    }

    pub fn stderr(no_color: bool) -> Colors {
        let env = std::env::var("NO_COLOR").ok();
        Colors {
            enabled: colors_enabled(no_color, env.as_deref(), std::io::stderr().is_terminal()),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.enabled {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    pub fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }

    pub fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }
}

/// Compact duration for tables: `42s`, `3m12s`, `1h02m`, `2d03h`.
pub fn format_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Wall-clock duration for the prompt: `00:03:12` (hours keep growing past 99).
pub fn clock(seconds: i64) -> String {
    let s = seconds.max(0);
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

/// Seconds from `from` to `to`.
pub fn seconds_between(from: &Time, to: Timestamp) -> i64 {
    to.as_second() - from.0.as_second()
}

/// `5s ago`, `3m ago`; `-` when unknown. A time slightly ahead of this machine's clock
/// (skew) reads as `just now` rather than a negative age.
pub fn relative(now: Timestamp, time: Option<&Time>) -> String {
    let Some(time) = time else {
        return "-".to_owned();
    };
    let s = seconds_between(time, now);
    if s <= 0 {
        return "just now".to_owned();
    }
    let coarse = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    };
    format!("{coarse} ago")
}

/// The items as a kubectl `List`, so `jq '.items[]'` works as it does on kubectl output.
pub fn json_list<T: Serialize>(items: &[T]) -> Result<String> {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {},
    });
    Ok(serde_json::to_string_pretty(&list)?)
}

/// A kubectl-looking table: no borders, upper-case headers, three spaces between columns.
pub fn table(headers: &[&str], rows: Vec<Vec<Cell>>, colors: Colors) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    if colors.enabled {
        table.enforce_styling();
    } else {
        table.force_no_tty();
    }
    table.set_header(headers.iter().map(Cell::new));
    for row in rows {
        table.add_row(row);
    }
    let last = headers.len().saturating_sub(1);
    for i in 0..headers.len() {
        if let Some(column) = table.column_mut(i) {
            column.set_padding((0, if i == last { 0 } else { 3 }));
        }
    }
    table.trim_fmt()
}

/// A table cell of text that may come from a device or another user: one line, escaped.
fn cell(text: impl AsRef<str>) -> Cell {
    let text = text.as_ref().replace(['\n', '\r', '\t'], " ");
    Cell::new(sanitize::line(&text))
}

fn colored(text: String, color: Option<Color>, colors: Colors) -> Cell {
    let cell = cell(text);
    match color {
        Some(c) if colors.enabled => cell.fg(c),
        _ => cell,
    }
}

fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "-".to_owned(),
    }
}

pub fn command_phase_color(phase: Option<CommandPhase>) -> Option<Color> {
    match phase? {
        CommandPhase::Succeeded => Some(Color::Green),
        CommandPhase::Failed | CommandPhase::TimedOut => Some(Color::Red),
        CommandPhase::Cancelled => Some(Color::Yellow),
        CommandPhase::Running => Some(Color::Cyan),
        CommandPhase::Pending | CommandPhase::Queued => None,
    }
}

pub fn session_phase_color(phase: Option<SessionPhase>) -> Option<Color> {
    match phase? {
        SessionPhase::Connected => Some(Color::Green),
        SessionPhase::Rejected | SessionPhase::Failed => Some(Color::Red),
        SessionPhase::Expired => Some(Color::Yellow),
        SessionPhase::Pending | SessionPhase::Connecting | SessionPhase::Disconnected => None,
    }
}

pub fn devices_table(devices: &[Device], now: Timestamp, colors: Colors) -> String {
    let rows = devices
        .iter()
        .map(|d| {
            let status = d.status.clone().unwrap_or_default();
            let os = os_text(status.os, status.os_version.as_deref());
            let (connected, color) = if status.connected {
                ("yes", Color::Green)
            } else {
                ("no", Color::Red)
            };
            vec![
                cell(d.metadata.name.clone().unwrap_or_default()),
                cell(or_dash(status.hostname.as_deref())),
                cell(os),
                colored(connected.to_owned(), Some(color), colors),
                cell(relative(now, status.last_seen.as_ref())),
                cell(or_dash(status.active_session.as_deref())),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "HOSTNAME",
            "OS",
            "CONNECTED",
            "LAST SEEN",
            "SESSION",
        ],
        rows,
        colors,
    )
}

/// The OS column: the agent's own description when it names the family already
/// (`Linux (Debian GNU/Linux 12)`), else the family with it (`linux (24.04)`).
pub fn os_text(os: Option<liveresponse_api::crd::OsFamily>, version: Option<&str>) -> String {
    let version = version.map(str::trim).filter(|v| !v.is_empty());
    match (os.map(os_name), version) {
        (Some(family), Some(v)) if v.to_lowercase().contains(family) => v.to_owned(),
        (Some(family), Some(v)) => format!("{family} ({v})"),
        (Some(family), None) => family.to_owned(),
        (None, v) => or_dash(v),
    }
}

fn os_name(os: liveresponse_api::crd::OsFamily) -> &'static str {
    use liveresponse_api::crd::OsFamily;
    match os {
        OsFamily::Windows => "windows",
        OsFamily::Linux => "linux",
        OsFamily::Macos => "macos",
    }
}

/// How long a session has been (or was) connected: from its start to its end, or to now
/// while it is still open.
pub fn session_duration(session: &LiveResponseSession, now: Timestamp) -> String {
    let Some(status) = &session.status else {
        return "-".to_owned();
    };
    let Some(start) = &status.start_time else {
        return "-".to_owned();
    };
    let end = match (&status.end_time, status.phase) {
        (Some(end), _) => end.0,
        (None, Some(phase)) if phase.is_final() => return "-".to_owned(),
        (None, _) => now,
    };
    format_duration(seconds_between(start, end))
}

pub fn sessions_table(sessions: &[LiveResponseSession], now: Timestamp, colors: Colors) -> String {
    let rows = sessions
        .iter()
        .map(|s| {
            let phase = s.status.as_ref().and_then(|st| st.phase);
            vec![
                cell(s.metadata.name.clone().unwrap_or_default()),
                cell(&s.spec.requested_by),
                cell(&s.spec.device),
                colored(phase_name(phase), session_phase_color(phase), colors),
                cell(relative(
                    now,
                    s.status.as_ref().and_then(|st| st.start_time.as_ref()),
                )),
                cell(session_duration(s, now)),
                cell(or_dash(s.spec.reason.as_deref())),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "REQUESTER",
            "DEVICE",
            "PHASE",
            "STARTED",
            "DURATION",
            "REASON",
        ],
        rows,
        colors,
    )
}

fn phase_name<P: std::fmt::Debug>(phase: Option<P>) -> String {
    phase.map_or_else(|| "-".to_owned(), |p| format!("{p:?}"))
}

/// The command as the log shows it: the operator's canonical line once it has one,
/// before that the line rebuilt from the spec.
pub fn command_line(command: &Command) -> String {
    if let Some(line) = command.status.as_ref().and_then(|s| s.command_line.clone()) {
        return line;
    }
    match parse_command(&command.spec.command, &command.spec.args) {
        Ok(inv) => inv.render(),
        Err(_) => std::iter::once(command.spec.command.as_str())
            .chain(command.spec.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The operator's duration once the command finished; while it runs, the time since it
/// started (with a `+` to say it is still growing).
pub fn command_duration(command: &Command, now: Timestamp) -> String {
    let Some(status) = &command.status else {
        return "-".to_owned();
    };
    if let Some(d) = status.duration.as_deref().filter(|d| !d.is_empty()) {
        return d.to_owned();
    }
    match (&status.start_time, status.phase) {
        (Some(start), Some(phase)) if !phase.is_final() => {
            format!("{}+", format_duration(seconds_between(start, now)))
        }
        _ => "-".to_owned(),
    }
}

/// Orders a session's commands as its log: by id, and those without one yet (just
/// created) last, oldest first.
pub fn sort_commands(commands: &mut [Command]) {
    commands.sort_by(|a, b| {
        let key = |c: &Command| {
            (
                c.status.as_ref().and_then(|s| s.id).unwrap_or(i64::MAX),
                c.metadata.creation_timestamp.as_ref().map(|t| t.0),
                c.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
}

fn id_cell(command: &Command) -> Cell {
    cell(
        command
            .status
            .as_ref()
            .and_then(|s| s.id)
            .map_or_else(|| "-".to_owned(), |id| id.to_string()),
    )
}

/// The command log of `log SESSION`.
pub fn commands_table(commands: &[Command], now: Timestamp, colors: Colors) -> String {
    let rows = commands
        .iter()
        .map(|c| {
            let phase = c.status.as_ref().and_then(|s| s.phase);
            let started = c
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .or(c.metadata.creation_timestamp.as_ref());
            vec![
                id_cell(c),
                cell(command_line(c)),
                colored(phase_name(phase), command_phase_color(phase), colors),
                cell(command_duration(c, now)),
                cell(relative(now, started)),
            ]
        })
        .collect();
    table(
        &["ID", "COMMAND", "PHASE", "DURATION", "STARTED"],
        rows,
        colors,
    )
}

/// The console's `jobs`.
pub fn jobs_table(commands: &[Command], now: Timestamp, colors: Colors) -> String {
    let rows = commands
        .iter()
        .map(|c| {
            let phase = c.status.as_ref().and_then(|s| s.phase);
            vec![
                id_cell(c),
                cell(command_line(c)),
                colored(phase_name(phase), command_phase_color(phase), colors),
                cell(relative(
                    now,
                    c.status.as_ref().and_then(|s| s.start_time.as_ref()),
                )),
            ]
        })
        .collect();
    table(&["ID", "COMMAND", "PHASE", "STARTED"], rows, colors)
}

/// One row of `status`: the registry's columns of the command log (id, command, phase,
/// started, duration), plus the Command's name and error for `-output json`.
pub fn status_record(command: &Command, now: Timestamp) -> serde_json::Value {
    let status = command.status.as_ref();
    let started = status.and_then(|s| s.start_time.as_ref()).map_or_else(
        || "-".to_owned(),
        |t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );
    let mut record = serde_json::json!({
        "id": status.and_then(|s| s.id),
        "command": command_line(command),
        "phase": phase_name(status.and_then(|s| s.phase)),
        "started": started,
        "duration": command_duration(command, now),
        "name": command.metadata.name,
    });
    if let Some(error) = status.and_then(|s| s.error.as_ref()) {
        record["error"] = serde_json::json!({ "reason": error.reason, "message": error.message });
    }
    record
}

/// What `status` (the session's whole log) or `status ID` (one command) shows, in the
/// requested format. `commands` are the session's, in log order.
pub fn status_answer(
    commands: &[Command],
    id: Option<i64>,
    format: OutputFormat,
    session: &str,
    now: Timestamp,
) -> Result<String> {
    let spec =
        find("status").ok_or_else(|| Error::Usage("status is not in the registry".into()))?;
    let chosen: Vec<&Command> = match id {
        None => commands.iter().collect(),
        Some(id) => {
            let one = commands
                .iter()
                .find(|c| c.status.as_ref().and_then(|s| s.id) == Some(id));
            match one {
                Some(c) => vec![c],
                None => {
                    return Err(Error::NotFound {
                        kind: "command",
                        name: format!("{id} in session {session}"),
                    });
                }
            }
        }
    };
    if chosen.is_empty() && format == OutputFormat::Table {
        return Ok(format!("session {session} has no commands yet\n"));
    }
    let records: Vec<serde_json::Value> = chosen.iter().map(|c| status_record(c, now)).collect();
    let mut text = render(spec, &records, format);
    // One command in a table: say why it did not succeed, as Defender's status does.
    if let ([one], Some(_), OutputFormat::Table) = (chosen.as_slice(), id, format)
        && let Some(error) = one.status.as_ref().and_then(|s| s.error.as_ref())
    {
        text.push_str(&format!("{}: {}\n", error.reason, error.message));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use liveresponse_api::crd::{
        CommandError, CommandSpec, CommandStatus, DeviceSpec, DeviceStatus, OsFamily, SessionSpec,
        SessionState, SessionStatus,
    };

    fn ts(s: &str) -> Timestamp {
        match s.parse() {
            Ok(t) => t,
            Err(e) => panic!("bad test timestamp {s}: {e}"),
        }
    }

    fn time(s: &str) -> Time {
        Time(ts(s))
    }

    const NOW: &str = "2026-05-01T12:00:00Z";

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("team-a".to_owned()),
            ..Default::default()
        }
    }

    fn plain() -> Colors {
        Colors { enabled: false }
    }

    #[test]
    fn durations_are_compact() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(192), "3m12s");
        assert_eq!(format_duration(3720), "1h02m");
        assert_eq!(format_duration(2 * 86400 + 3 * 3600 + 59), "2d03h");
        assert_eq!(format_duration(-5), "0s");
        assert_eq!(clock(192), "00:03:12");
        assert_eq!(clock(100 * 3600 + 1), "100:00:01");
    }

    #[test]
    fn relative_times() {
        let now = ts(NOW);
        assert_eq!(relative(now, Some(&time("2026-05-01T11:59:55Z"))), "5s ago");
        assert_eq!(relative(now, Some(&time("2026-05-01T11:57:00Z"))), "3m ago");
        assert_eq!(relative(now, Some(&time("2026-05-01T09:00:00Z"))), "3h ago");
        assert_eq!(relative(now, Some(&time("2026-04-28T12:00:00Z"))), "3d ago");
        assert_eq!(
            relative(now, Some(&time("2026-05-01T12:00:02Z"))),
            "just now"
        );
        assert_eq!(relative(now, None), "-");
    }

    #[test]
    fn colors_only_on_a_terminal_without_opt_out() {
        assert!(colors_enabled(false, None, true));
        assert!(colors_enabled(false, Some(""), true));
        assert!(!colors_enabled(false, None, false));
        assert!(!colors_enabled(true, None, true));
        assert!(!colors_enabled(false, Some("1"), true));
        assert_eq!(Colors { enabled: false }.red("x"), "x");
        assert_eq!(Colors { enabled: true }.red("x"), "\x1b[31mx\x1b[0m");
    }

    fn device(name: &str, status: Option<DeviceStatus>) -> Device {
        Device {
            metadata: meta(name),
            spec: DeviceSpec::default(),
            status,
        }
    }

    #[test]
    fn device_and_user_text_in_tables_is_escaped() {
        let now = ts(NOW);
        let devices = vec![device(
            "host-1",
            Some(DeviceStatus {
                hostname: Some("evil\x1b]0;pwned\x07\u{202e}host".into()),
                os_version: Some("Linux\x1b[2J".into()),
                ..Default::default()
            }),
        )];
        let t = devices_table(&devices, now, plain());
        assert!(!t.contains('\x1b') && !t.contains('\u{202e}'), "{t:?}");
        assert!(t.contains("evil\\x1b]0;pwned\\x07\\u202ehost"), "{t}");
        assert!(t.contains("Linux\\x1b[2J"), "{t}");
        // Colours are the CLI's own escapes and stay.
        let colored = devices_table(&devices, now, Colors { enabled: true });
        assert!(colored.contains("\x1b[") && !colored.contains("\x1b]0;"));
    }

    #[test]
    fn devices_table_has_every_column() {
        let now = ts(NOW);
        let devices = vec![
            device(
                "host-1",
                Some(DeviceStatus {
                    hostname: Some("host-1.corp".into()),
                    os: Some(OsFamily::Linux),
                    os_version: Some("24.04".into()),
                    connected: true,
                    last_seen: Some(time("2026-05-01T11:59:55Z")),
                    active_session: Some("host-1-abcde".into()),
                    ..Default::default()
                }),
            ),
            device("new-box", None),
        ];
        let out = devices_table(&devices, now, plain());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let header: Vec<&str> = lines[0].split("   ").map(str::trim).collect();
        assert_eq!(
            header
                .iter()
                .filter(|h| !h.is_empty())
                .copied()
                .collect::<Vec<_>>(),
            [
                "NAME",
                "HOSTNAME",
                "OS",
                "CONNECTED",
                "LAST SEEN",
                "SESSION"
            ]
        );
        assert!(lines[1].starts_with("host-1 "), "{out}");
        for want in [
            "host-1.corp",
            "linux (24.04)",
            "yes",
            "5s ago",
            "host-1-abcde",
        ] {
            assert!(lines[1].contains(want), "{want} missing in {out}");
        }
        assert!(lines[2].starts_with("new-box"), "{out}");
        assert!(lines[2].contains(" no "), "{out}");
        assert!(!out.contains('\x1b'), "no colour when disabled: {out:?}");
        assert!(
            out.lines().all(|l| l == l.trim_end()),
            "trailing spaces: {out:?}"
        );
    }

    #[test]
    fn os_column_does_not_repeat_the_family() {
        assert_eq!(
            os_text(Some(OsFamily::Linux), Some("Linux (Debian GNU/Linux 12)")),
            "Linux (Debian GNU/Linux 12)"
        );
        assert_eq!(
            os_text(Some(OsFamily::Windows), Some("Windows Server 2022 (20348)")),
            "Windows Server 2022 (20348)"
        );
        assert_eq!(os_text(Some(OsFamily::Macos), Some("14.5")), "macos (14.5)");
        assert_eq!(os_text(Some(OsFamily::Linux), Some(" ")), "linux");
        assert_eq!(os_text(None, None), "-");
    }

    #[test]
    fn coloured_table_only_when_enabled() {
        let devices = vec![device(
            "d",
            Some(DeviceStatus {
                connected: true,
                ..Default::default()
            }),
        )];
        let out = devices_table(&devices, ts(NOW), Colors { enabled: true });
        assert!(out.contains('\x1b'), "{out:?}");
    }

    fn session(
        name: &str,
        phase: SessionPhase,
        start: Option<&str>,
        end: Option<&str>,
        reason: Option<&str>,
    ) -> LiveResponseSession {
        LiveResponseSession {
            metadata: meta(name),
            spec: SessionSpec {
                device: "host-1".into(),
                reason: reason.map(str::to_owned),
                requested_by: "alice".into(),
                idle_timeout: None,
                state: SessionState::Active,
            },
            status: Some(SessionStatus {
                phase: Some(phase),
                start_time: start.map(time),
                end_time: end.map(time),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn session_durations_run_to_now_or_to_the_end() {
        let now = ts(NOW);
        let open = session(
            "a",
            SessionPhase::Connected,
            Some("2026-05-01T11:56:48Z"),
            None,
            None,
        );
        assert_eq!(session_duration(&open, now), "3m12s");
        let ended = session(
            "b",
            SessionPhase::Disconnected,
            Some("2026-05-01T10:00:00Z"),
            Some("2026-05-01T11:02:00Z"),
            None,
        );
        assert_eq!(session_duration(&ended, now), "1h02m");
        let rejected = session("c", SessionPhase::Rejected, None, None, None);
        assert_eq!(session_duration(&rejected, now), "-");
    }

    #[test]
    fn sessions_table_is_the_dashboard() {
        let now = ts(NOW);
        let sessions = vec![session(
            "host-1-x7k2p",
            SessionPhase::Connected,
            Some("2026-05-01T11:56:48Z"),
            None,
            Some("INC-4711 suspicious logins"),
        )];
        let out = sessions_table(&sessions, now, plain());
        let mut lines = out.lines();
        let header = lines.next().unwrap_or_default();
        for h in [
            "NAME",
            "REQUESTER",
            "DEVICE",
            "PHASE",
            "STARTED",
            "DURATION",
            "REASON",
        ] {
            assert!(header.contains(h), "{h} missing: {out}");
        }
        let row = lines.next().unwrap_or_default();
        for want in [
            "host-1-x7k2p",
            "alice",
            "host-1",
            "Connected",
            "3m ago",
            "3m12s",
            "INC-4711 suspicious logins",
        ] {
            assert!(row.contains(want), "{want} missing: {out}");
        }
    }

    fn command(
        name: &str,
        id: Option<i64>,
        phase: CommandPhase,
        duration: Option<&str>,
    ) -> Command {
        Command {
            metadata: ObjectMeta {
                creation_timestamp: Some(time("2026-05-01T11:58:00Z")),
                ..meta(name)
            },
            spec: CommandSpec {
                session: "host-1-x7k2p".into(),
                command: "processes".into(),
                args: vec!["-name".into(), "sshd".into()],
                output: OutputFormat::Table,
                background: false,
                timeout_seconds: None,
                cancel: false,
            },
            status: Some(CommandStatus {
                id,
                phase: Some(phase),
                // The agent has not started a Pending command.
                start_time: (phase != CommandPhase::Pending).then(|| time("2026-05-01T11:59:48Z")),
                duration: duration.map(str::to_owned),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn command_log_sorted_by_id_with_durations() {
        let now = ts(NOW);
        let mut commands = vec![
            command("c-new", None, CommandPhase::Pending, None),
            command("c-2", Some(2), CommandPhase::Running, None),
            command("c-10", Some(10), CommandPhase::Cancelled, Some("4.0s")),
            command("c-1", Some(1), CommandPhase::Succeeded, Some("1.2s")),
        ];
        sort_commands(&mut commands);
        let names: Vec<_> = commands
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, ["c-1", "c-2", "c-10", "c-new"]);
        assert_eq!(command_duration(&commands[0], now), "1.2s");
        // Pending has no start to count from...
        assert_eq!(command_duration(&commands[3], now), "-");
        // ...but Running does, and says it is still growing.
        assert_eq!(command_duration(&commands[1], now), "12s+");

        let out = commands_table(&commands, now, plain());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[1].starts_with('1'), "{out}");
        assert!(lines[1].contains("processes -name sshd"), "{out}");
        assert!(lines[1].contains("Succeeded"), "{out}");
        assert!(lines[3].starts_with("10"), "{out}");
        assert!(lines[4].starts_with('-'), "{out}");
    }

    #[test]
    fn command_line_prefers_the_operators_canonical_line() {
        let mut c = command("c", Some(1), CommandPhase::Succeeded, None);
        assert_eq!(command_line(&c), "processes -name sshd");
        if let Some(s) = c.status.as_mut() {
            s.command_line = Some("processes -name \"sshd\"".into());
        }
        assert_eq!(command_line(&c), "processes -name \"sshd\"");
        c.status = None;
        c.spec.command = "nosuchverb".into();
        assert_eq!(command_line(&c), "nosuchverb -name sshd");
    }

    #[test]
    fn json_list_is_a_kubectl_list() {
        let c = command("c-1", Some(1), CommandPhase::Succeeded, Some("1.2s"));
        let text = match json_list(&[c]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => panic!("{e}: {text}"),
        };
        assert_eq!(value["kind"], "List");
        assert_eq!(value["items"][0]["status"]["id"], 1);
        assert_eq!(value["items"][0]["status"]["duration"], "1.2s");
        assert_eq!(value["items"][0]["kind"], "Command");
    }

    #[test]
    fn status_is_the_session_log_in_the_registry_columns() {
        let now = ts(NOW);
        let mut failed = command("c-2", Some(2), CommandPhase::Failed, Some("0.3s"));
        if let Some(s) = failed.status.as_mut() {
            s.error = Some(CommandError {
                reason: "NotFound".into(),
                message: "no process with pid 7".into(),
            });
        }
        let commands = vec![
            command("c-1", Some(1), CommandPhase::Succeeded, Some("1.2s")),
            failed,
            command("c-3", Some(3), CommandPhase::Running, None),
        ];
        let text = status_answer(&commands, None, OutputFormat::Table, "s", now);
        let text = text.unwrap_or_else(|e| panic!("{e}"));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for (header, next) in [
            ("ID", "COMMAND"),
            ("COMMAND", "PHASE"),
            ("PHASE", "STARTED"),
            ("STARTED", "DURATION"),
        ] {
            let (a, b) = (lines[0].find(header), lines[0].find(next));
            assert!(a.is_some() && a < b, "{header} before {next}: {text}");
        }
        assert!(lines[1].starts_with("1 "), "{text}");
        for want in [
            "processes -name sshd",
            "Succeeded",
            "2026-05-01T11:59:48Z",
            "1.2s",
        ] {
            assert!(lines[1].contains(want), "{want} missing: {text}");
        }
        assert!(
            lines[3].contains("Running") && lines[3].ends_with("12s+"),
            "{text}"
        );
        // The whole log does not repeat each error; status ID does.
        assert!(!text.contains("no process with pid 7"), "{text}");

        let one = status_answer(&commands, Some(2), OutputFormat::Table, "s", now);
        let one = one.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.lines().count(), 3, "{one}");
        assert!(one.contains("Failed"), "{one}");
        assert!(one.ends_with("NotFound: no process with pid 7\n"), "{one}");

        let json = status_answer(&commands, Some(2), OutputFormat::Json, "s", now);
        let json: serde_json::Value =
            serde_json::from_str(&json.unwrap_or_default()).unwrap_or_default();
        assert_eq!(json[0]["id"], 2);
        assert_eq!(json[0]["name"], "c-2");
        assert_eq!(json[0]["error"]["reason"], "NotFound");

        let missing = status_answer(&commands, Some(9), OutputFormat::Table, "s", now);
        assert!(missing.is_err_and(|e| e.to_string() == "command 9 in session s not found"),);
        let empty = status_answer(&[], None, OutputFormat::Table, "s", now);
        assert_eq!(
            empty.ok().as_deref(),
            Some("session s has no commands yet\n")
        );
        let empty = status_answer(&[], None, OutputFormat::Json, "s", now);
        assert_eq!(empty.ok().as_deref(), Some("[]"));
    }
}
