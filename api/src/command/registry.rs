//! The one table that describes every command. The parser, `help`, the CLI's completion,
//! the admission policy's list of advanced commands and the agent's dispatcher all read
//! it, so a command exists exactly when it has a row here.

use serde::Serialize;

/// Who may run a command, and where it is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Read-only investigation; any live response role.
    Basic,
    /// Changes the device or moves files; needs the advanced role.
    Advanced,
    /// Handled by the CLI only, never sent to an agent.
    Console,
}

impl Tier {
    /// Lowercase name, as in the Command resource and the RBAC roles.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Basic => "basic",
            Tier::Advanced => "advanced",
            Tier::Console => "console",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a command is answered. Every list of "who handles what" (the console's dispatch,
/// the agent's own commands, the provider's work) is derived from this, so adding a
/// command is one registry row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// `kubectl liveresponse` answers it itself, without creating a Command: from the
    /// terminal, its own copy of this registry (`help`) or the session's Command log
    /// (`status`). Console-tier ones never become a Command; a Command may still carry a
    /// basic one (written by hand or by a playbook), and then the agent answers it with
    /// what it knows ([`agent_commands`]).
    Console,
    /// The operator, from the Kubernetes API (the LibraryFile resources): nothing on the
    /// device is involved.
    Operator,
    /// The agent itself, the same on every OS (`trace`: its log level).
    Agent,
    /// The agent's OS provider: what the device holds.
    Provider,
}

/// Which default timeout applies when a Command sets none: LiveResponseSettings
/// `commandTimeout` or `longCommandTimeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutClass {
    Normal,
    /// Work that grows with the device: walking a file tree, moving a file, a script.
    Long,
}

/// Operating system of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Windows,
    Linux,
    Macos,
}

impl Platform {
    /// Lowercase name, as in `Device.status.os`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Windows => "windows",
            Platform::Linux => "linux",
            Platform::Macos => "macos",
        }
    }

    /// The platform named by `Device.status.os` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Platform> {
        [Platform::Windows, Platform::Linux, Platform::Macos]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a parameter value must look like; the parser checks and canonicalises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// Any string, including the empty one.
    Text,
    /// A non-empty path on the device (interpreted by the agent, so any syntax).
    Path,
    /// A whole number that fits in a `u64`.
    UInt,
    /// One of a fixed set of lowercase words, matched case-insensitively.
    Choice(&'static [&'static str]),
}

/// A positional or named (`-name value`) parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ValueKind,
    pub required: bool,
    pub help: &'static str,
}

/// A flag: `-name` on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlagSpec {
    pub name: &'static str,
    pub help: &'static str,
}

/// A table-mode column; `key` is the JSON field of an output record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Column {
    pub key: &'static str,
    pub header: &'static str,
}

/// Everything known about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CommandSpec {
    /// One word, or two for a sub-command (`library delete`).
    pub name: &'static str,
    /// Other words that run this command when typed (`disconnect` for `exit`). A Command
    /// resource always stores the canonical verb.
    pub aliases: &'static [&'static str],
    /// Words from other shells (`ls`, `ps`) that do not run anything here but make the
    /// parser suggest this command.
    pub hints: &'static [&'static str],
    pub tier: Tier,
    pub handler: Handler,
    pub platforms: &'static [Platform],
    /// In the fixed order they are typed; optional ones come last.
    pub positional: &'static [ParamSpec],
    /// `-name value`, in any order.
    pub named: &'static [ParamSpec],
    pub flags: &'static [FlagSpec],
    /// Commands that `-auto` runs first, with the same entity.
    pub prerequisites: &'static [&'static str],
    pub columns: &'static [Column],
    pub background_allowed: bool,
    pub timeout: TimeoutClass,
    pub summary: &'static str,
    pub help: &'static str,
    pub examples: &'static [&'static str],
}

impl CommandSpec {
    /// First word of the name: what a Command resource stores in `spec.command`.
    pub fn verb(&self) -> &'static str {
        self.name
            .split_once(' ')
            .map_or(self.name, |(verb, _)| verb)
    }

    /// Second word of a sub-command's name.
    pub fn subcommand(&self) -> Option<&'static str> {
        self.name.split_once(' ').map(|(_, sub)| sub)
    }

    pub fn supports(&self, platform: Platform) -> bool {
        self.platforms.contains(&platform)
    }

    /// A positional or named parameter by its canonical name.
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.positional
            .iter()
            .chain(self.named.iter())
            .find(|p| p.name == name)
    }

    pub fn flag(&self, name: &str) -> Option<&'static FlagSpec> {
        self.flags.iter().find(|f| f.name == name)
    }

    /// Whether the global `-output table|json` applies; console commands print for
    /// themselves.
    pub fn accepts_output(&self) -> bool {
        self.tier != Tier::Console
    }

    /// Whether a Command resource may carry it (the admission policy's list).
    pub fn is_command(&self) -> bool {
        self.tier != Tier::Console
    }

    /// Whether the agent answers a Command carrying it by itself, without its provider:
    /// its own commands, and the console's that a Command may still carry.
    pub fn answered_by_agent(&self) -> bool {
        match self.handler {
            Handler::Agent => true,
            Handler::Console => self.is_command(),
            Handler::Operator | Handler::Provider => false,
        }
    }
}

const ALL: &[Platform] = &[Platform::Windows, Platform::Linux, Platform::Macos];
const WINDOWS: &[Platform] = &[Platform::Windows];

/// Entity types of `remediate`, `undo` and `analyze`; `analyze` takes the same ones
/// so that `remediate -auto` can hand its entity to it unchanged.
pub const ENTITY_TYPES: &[&str] = &[
    "file",
    "process",
    "service",
    "registry",
    "scheduledtask",
    "startupitem",
    "user",
];

/// Verbs whose result is a file the agent streams to the artifact store (resumable):
/// a getfile's file, a collect's package.
pub fn moves_a_file(verb: &str) -> bool {
    matches!(verb, "getfile" | "collect")
}

/// Verbs that cut a device off its network: they need `create` on `commands/isolate`
/// besides the advanced tier (the liveresponse-responder role).
pub const ISOLATION_VERBS: &[&str] = &["isolate", "release"];
/// Verbs whose `user` entity acts on accounts: `create` on `commands/accounts` too.
pub const ACCOUNT_VERBS: &[&str] = &["remediate", "undo"];

const fn required(name: &'static str, kind: ValueKind, help: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        required: true,
        help,
    }
}

const fn optional(name: &'static str, kind: ValueKind, help: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        required: false,
        help,
    }
}

const fn flag(name: &'static str, help: &'static str) -> FlagSpec {
    FlagSpec { name, help }
}

const fn col(key: &'static str, header: &'static str) -> Column {
    Column { key, header }
}

const NONE_PARAMS: &[ParamSpec] = &[];
const NONE_FLAGS: &[FlagSpec] = &[];
const NONE_COLUMNS: &[Column] = &[];

const ENTITY: ParamSpec = required(
    "entity",
    ValueKind::Text,
    "The entity: a path, process id, service name, registry value (KEY\\VALUE), task path or startup item name.",
);

const AUTO_REMEDIATION_COLUMNS: &[Column] = &[
    col("entityType", "TYPE"),
    col("entity", "ENTITY"),
    col("action", "ACTION"),
    col("quarantineId", "QUARANTINE ID"),
];

static REGISTRY: &[CommandSpec] = &[
    // ---- Basic ----
    CommandSpec {
        name: "cd",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required(
            "path",
            ValueKind::Path,
            "Directory to change to, absolute or relative to the current one.",
        )],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[col("path", "PATH")],
        // A background `cd` would race the commands that rely on the directory it sets.
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Change the session's working directory",
        help: "Relative paths in later commands resolve against the new directory; it is recorded in the session's status.workingDirectory.",
        examples: &["cd C:\\Windows\\Temp", "cd \"/var/log/my app\"", "cd .."],
    },
    CommandSpec {
        name: "connections",
        aliases: &[],
        hints: &["netstat"],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("protocol", "PROTO"),
            col("localAddress", "LOCAL ADDRESS"),
            col("localPort", "LOCAL PORT"),
            col("remoteAddress", "REMOTE ADDRESS"),
            col("remotePort", "REMOTE PORT"),
            col("state", "STATE"),
            col("pid", "PID"),
            col("processName", "PROCESS"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List active network connections",
        help: "TCP and UDP sockets with their owning process, like netstat.",
        examples: &["connections", "connections -output json"],
    },
    CommandSpec {
        name: "dir",
        aliases: &[],
        hints: &["ls"],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[optional(
            "path",
            ValueKind::Path,
            "Directory to list; the working directory when omitted.",
        )],
        named: NONE_PARAMS,
        flags: &[flag("full_path", "Show full paths instead of names.")],
        prerequisites: &[],
        columns: &[
            col("name", "NAME"),
            col("type", "TYPE"),
            col("size", "SIZE"),
            col("modified", "MODIFIED"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List the files and subdirectories of a directory",
        help: "Lists one directory, not recursively; use findfile to search a tree.",
        examples: &["dir", "dir \"C:\\Program Files\" -full_path", "dir /etc"],
    },
    CommandSpec {
        name: "drivers",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("name", "NAME"),
            col("size", "SIZE"),
            col("usedBy", "USED BY"),
            col("state", "STATE"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List loaded drivers and kernel modules",
        help: "Windows drivers, Linux kernel modules or macOS kernel extensions.",
        examples: &["drivers"],
    },
    CommandSpec {
        name: "fileinfo",
        aliases: &[],
        hints: &["stat"],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required("path", ValueKind::Path, "File to describe.")],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("path", "PATH"),
            col("size", "SIZE"),
            col("sha256", "SHA256"),
            col("modified", "MODIFIED"),
            col("owner", "OWNER"),
            col("mode", "MODE"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Show size, hashes, owner and times of a file",
        help: "Hashes the whole file; getfile -auto runs it first so the download can be verified.",
        examples: &[
            "fileinfo C:\\Windows\\System32\\drivers\\etc\\hosts",
            "fileinfo \"/tmp/dossier é/file ü.txt\"",
        ],
    },
    CommandSpec {
        name: "findfile",
        aliases: &[],
        hints: &["find"],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required(
            "name",
            ValueKind::Text,
            "File name or glob (* and ?) to look for.",
        )],
        named: &[
            optional(
                "root",
                ValueKind::Path,
                "Directory to search under; all local drives or / when omitted.",
            ),
            optional(
                "max_results",
                ValueKind::UInt,
                "Stop after this many matches.",
            ),
            optional(
                "timeout_seconds",
                ValueKind::UInt,
                "Stop searching after this many seconds.",
            ),
        ],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("path", "PATH"),
            col("size", "SIZE"),
            col("modified", "MODIFIED"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Long,
        summary: "Search the file system for files by name",
        help: "Walks the tree below -root and lists files whose name matches; large trees take time, so bound it with -max_results or -timeout_seconds, or run it in the background.",
        examples: &[
            "findfile evil.exe",
            "findfile \"*.ps1\" -root C:\\Users -max_results 100",
            "findfile id_rsa -root /home -timeout_seconds 60 &",
        ],
    },
    CommandSpec {
        name: "help",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[
            optional("command", ValueKind::Text, "Command to describe."),
            optional(
                "subcommand",
                ValueKind::Text,
                "Second word of a sub-command (library delete, remediate list).",
            ),
        ],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        // The help text itself, one record per line: the same answer everywhere.
        columns: &[col("text", "HELP")],
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "List commands, or describe one",
        help: "Without a command, lists every command with a one-line summary; with one, shows its usage, parameters and examples.",
        examples: &["help", "help getfile", "help library delete"],
    },
    CommandSpec {
        name: "status",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[optional(
            "id",
            ValueKind::UInt,
            "Command id in this session; all commands when omitted.",
        )],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("id", "ID"),
            col("command", "COMMAND"),
            col("phase", "PHASE"),
            col("started", "STARTED"),
            col("duration", "DURATION"),
        ],
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Show the status of commands in this session",
        help: "Reads the Command log of the session: phase, start time and duration of each command.",
        examples: &["status", "status 3"],
    },
    CommandSpec {
        name: "persistence",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("mechanism", "MECHANISM"),
            col("name", "NAME"),
            col("location", "LOCATION"),
            col("command", "COMMAND"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List known persistence mechanisms",
        help: "Run keys, services, scheduled tasks, WMI subscriptions, cron, systemd units, launchd agents, shell profiles and similar autostart locations.",
        examples: &["persistence", "persistence -output json > persistence.json"],
    },
    CommandSpec {
        name: "processes",
        aliases: &[],
        hints: &["ps"],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: &[
            optional(
                "pid",
                ValueKind::UInt,
                "Show only the process with this id.",
            ),
            optional(
                "name",
                ValueKind::Text,
                "Show only processes with this image name (case-insensitive).",
            ),
        ],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("pid", "PID"),
            col("ppid", "PPID"),
            col("name", "NAME"),
            col("user", "USER"),
            col("memory", "MEMORY"),
            col("commandLine", "COMMAND LINE"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List running processes",
        help: "Every process with its parent, owner, memory use and command line.",
        examples: &[
            "processes",
            "processes -pid 4242",
            "processes -name powershell.exe -output json",
        ],
    },
    CommandSpec {
        name: "registry",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: WINDOWS,
        positional: &[optional(
            "key",
            ValueKind::Text,
            "Registry key, e.g. HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Run; the hives when omitted.",
        )],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("key", "KEY"),
            col("name", "NAME"),
            col("type", "TYPE"),
            col("data", "DATA"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Show the values and subkeys of a registry key",
        help: "Windows only.",
        examples: &[
            "registry HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Run",
            "registry \"HKCU\\Software\\My Vendor\"",
        ],
    },
    CommandSpec {
        name: "scheduledtasks",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[optional("name", ValueKind::Text, "Show only this task.")],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("name", "NAME"),
            col("schedule", "SCHEDULE"),
            col("command", "COMMAND"),
            col("source", "SOURCE"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List scheduled tasks",
        help: "Task Scheduler on Windows, cron and systemd timers on Linux, launchd jobs on macOS.",
        examples: &[
            "scheduledtasks",
            "scheduledtasks \"\\Microsoft\\Windows\\Defrag\\ScheduledDefrag\"",
        ],
    },
    CommandSpec {
        name: "services",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[optional("name", ValueKind::Text, "Show only this service.")],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("name", "NAME"),
            col("state", "STATE"),
            col("subState", "SUB-STATE"),
            col("description", "DESCRIPTION"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List services and their state",
        help: "Windows services, systemd units on Linux, launchd daemons on macOS.",
        examples: &["services", "services sshd"],
    },
    CommandSpec {
        name: "startupfolders",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("location", "LOCATION"),
            col("name", "NAME"),
            col("target", "TARGET"),
            col("user", "USER"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List the contents of startup folders",
        help: "Windows Startup folders, XDG autostart directories on Linux, login items on macOS.",
        examples: &["startupfolders"],
    },
    CommandSpec {
        name: "trace",
        aliases: &[],
        hints: &[],
        tier: Tier::Basic,
        handler: Handler::Agent,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: &[optional(
            "level",
            ValueKind::Choice(&["debug", "info", "warn", "error"]),
            "Log level of the agent for this session; shows the current one when omitted.",
        )],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[col("level", "LEVEL")],
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Show or set the agent's log level for this session",
        help: "Raise it to debug while troubleshooting a command that fails.",
        examples: &["trace", "trace -level debug"],
    },
    // ---- Console ----
    CommandSpec {
        name: "cls",
        aliases: &[],
        hints: &["clear"],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Clear the console screen",
        help: "Only affects the local terminal.",
        examples: &["cls"],
    },
    CommandSpec {
        name: "connect",
        aliases: &[],
        hints: &[],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[required(
            "device",
            ValueKind::Text,
            "Name of the Device to open a session with.",
        )],
        named: &[optional(
            "reason",
            ValueKind::Text,
            "Why you need the session; recorded in the session.",
        )],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Open a live response session with a device",
        help: "Creates a LiveResponseSession and waits until it is Connected; ends the current session first.",
        examples: &[
            "connect web-01",
            "connect web-01 -reason \"INC-4711 suspicious logins\"",
        ],
    },
    CommandSpec {
        name: "jobs",
        aliases: &[],
        hints: &[],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("id", "ID"),
            col("command", "COMMAND"),
            col("phase", "PHASE"),
            col("started", "STARTED"),
        ],
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "List the commands running in the background",
        help: "Bring one to the foreground with fg ID.",
        examples: &["jobs"],
    },
    CommandSpec {
        name: "fg",
        aliases: &[],
        hints: &[],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[required(
            "id",
            ValueKind::UInt,
            "Id of the background command, as listed by jobs.",
        )],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Wait for a background command and show its output",
        help: "Ctrl-C stops waiting without cancelling the command.",
        examples: &["fg 3"],
    },
    CommandSpec {
        name: "download",
        aliases: &[],
        hints: &[],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[required(
            "id",
            ValueKind::Text,
            "Id of the getfile (as status lists it), or the Command's name.",
        )],
        named: NONE_PARAMS,
        flags: &[flag(
            "full_output",
            "The command's whole output instead of a getfile's file (when it outgrew 64 KiB).",
        )],
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Download a getfile's file, or a command's whole output, to this computer",
        help: "Through the Kubernetes API server with your credentials (audited); resumes a partial download and verifies the sha256. `> FILE` names the local file; by default it is the device file's name in the current folder.",
        examples: &["download 4 > evidence.bin", "download 7 -full_output"],
    },
    CommandSpec {
        name: "exit",
        aliases: &["disconnect"],
        hints: &["quit", "logout"],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "End the session and leave the console",
        help: "Sets the session to Disconnected; background commands keep running until they finish.",
        examples: &["exit"],
    },
    // ---- Advanced ----
    CommandSpec {
        name: "analyze",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[
            required(
                "type",
                ValueKind::Choice(ENTITY_TYPES),
                "Kind of entity to analyse.",
            ),
            ENTITY,
        ],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("entity", "ENTITY"),
            col("verdict", "VERDICT"),
            col("engine", "ENGINE"),
            col("details", "DETAILS"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Analyse an entity and give a verdict",
        help: "Checks the file behind the entity (the file itself, or a process's executable as the kernel holds it, even when deleted) against the namespace's YARA rules and SHA-256 lists (LibraryFiles with spec.analysis), plus built-in checks that need no rules: a process whose executable was deleted or replaced, an executable in a world-writable directory, a listening process whose executable is outside package paths. The verdict is malicious, suspicious, clean (rules were there and found nothing) or unknown (nothing to check it against), with the evidence.",
        examples: &[
            "analyze file C:\\Users\\Public\\evil.exe",
            "analyze process 4242",
        ],
    },
    CommandSpec {
        name: "collect",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("path", "PACKAGE"),
            col("size", "SIZE"),
            col("sha256", "SHA256"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Long,
        summary: "Collect an investigation package",
        help: "Gathers processes, connections, services, persistence, scheduled tasks, recent logs, shell histories, accounts, installed packages and /etc metadata into one .tar.gz with a manifest of sha256 per entry, moved to the artifact store like a getfile; fetch it with `download`.",
        examples: &["collect &"],
    },
    CommandSpec {
        name: "getfile",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required("path", ValueKind::Path, "File to download.")],
        named: NONE_PARAMS,
        flags: &[flag(
            "auto",
            "Run fileinfo first, so the download can be verified.",
        )],
        prerequisites: &["fileinfo"],
        columns: &[
            col("path", "PATH"),
            col("size", "SIZE"),
            col("sha256", "SHA256"),
            col("artifact", "ARTIFACT"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Long,
        summary: "Download a file from the device",
        help: "Streams the file to the artifact store, verified by sha256; fetch it with `kubectl liveresponse download`. Bounded by the maxFileSize setting.",
        examples: &[
            "getfile \"C:\\Program Files\\Vendor\\agent.log\" -auto",
            "getfile /var/log/auth.log &",
        ],
    },
    CommandSpec {
        name: "isolate",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: &[flag(
            "allow_dns",
            "Keep the device's name servers (from /etc/resolv.conf) reachable on port 53.",
        )],
        prerequisites: &[],
        columns: &[col("state", "STATE"), col("message", "MESSAGE")],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Cut the device off the network, except for live response",
        help: "Blocks all traffic but loopback and the agent's connection to its gateway (and, with -allow_dns, the name servers); it holds across agent restarts and reboots (the agent applies it again when it starts) until release.",
        examples: &["isolate", "isolate -allow_dns"],
    },
    CommandSpec {
        name: "release",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[col("state", "STATE"), col("message", "MESSAGE")],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Release the device from isolation",
        help: "Removes exactly the rules isolate added (the agent's own nftables table).",
        examples: &["release"],
    },
    CommandSpec {
        name: "library",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Operator,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("name", "NAME"),
            col("fileName", "FILE"),
            col("analysis", "RULES"),
            col("phase", "PHASE"),
            col("signed", "SIGNED"),
            col("size", "SIZE"),
            col("description", "DESCRIPTION"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List the library files that run and putfile can use",
        help: "Shows the LibraryFile resources of this namespace; add one with kubectl apply or `kubectl liveresponse library upload`.",
        examples: &["library"],
    },
    CommandSpec {
        name: "library delete",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Operator,
        platforms: ALL,
        positional: &[required(
            "name",
            ValueKind::Text,
            "File name of the library file to delete.",
        )],
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[col("fileName", "FILE"), col("state", "STATE")],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Delete a file from the library",
        help: "Deletes the LibraryFile resource; devices that already received it keep their copy.",
        examples: &["library delete collect-logs.ps1"],
    },
    CommandSpec {
        name: "library upload",
        aliases: &[],
        hints: &[],
        tier: Tier::Console,
        handler: Handler::Console,
        platforms: ALL,
        positional: &[required(
            "file",
            ValueKind::Path,
            "Local file to add to the library.",
        )],
        named: &[
            optional(
                "signature",
                ValueKind::Path,
                "Its SSH signature (ssh-keygen -Y sign -n liveresponse.io -f KEY FILE).",
            ),
            optional("description", ValueKind::Text, "What the file is for."),
            optional(
                "name",
                ValueKind::Text,
                "Name of the LibraryFile (default: from the file name).",
            ),
            optional(
                "analysis",
                ValueKind::Choice(&["yara", "sha256"]),
                "Make it a rule file for analyze and scan: YARA rules, or a SHA-256 list.",
            ),
        ],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: NONE_COLUMNS,
        background_allowed: false,
        timeout: TimeoutClass::Normal,
        summary: "Add a local file to the namespace's library (library admins)",
        help: "Sends the content through the file API, names it in a LibraryFile by sha256 and waits until the operator says Ready or Invalid.",
        examples: &[
            "library upload ./collect-logs.sh -description \"Collects logs\"",
            "library upload ./webshells.yar -analysis yara",
        ],
    },
    CommandSpec {
        name: "putfile",
        aliases: &[],
        hints: &["upload"],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required(
            "name",
            ValueKind::Text,
            "File name of the library file to copy to the device.",
        )],
        named: NONE_PARAMS,
        flags: &[
            flag(
                "overwrite",
                "Replace a file of the same name on the device.",
            ),
            flag(
                "keep",
                "Keep the file on the device when the agent restarts.",
            ),
        ],
        prerequisites: &[],
        columns: &[
            col("path", "PATH"),
            col("size", "SIZE"),
            col("sha256", "SHA256"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Copy a library file to the device",
        help: "The agent fetches the file from the operator and checks its size, sha256 and, unless unsigned files are allowed, its signature before it writes it to its drop folder (the agent's --drop-dir). Files put without -keep are removed when the agent restarts.",
        examples: &[
            "putfile collect-logs.sh",
            "putfile triage.sh -overwrite -keep",
        ],
    },
    CommandSpec {
        name: "remediate",
        aliases: &[],
        hints: &["kill"],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[
            required(
                "type",
                ValueKind::Choice(ENTITY_TYPES),
                "Kind of entity to remediate.",
            ),
            ENTITY,
        ],
        named: NONE_PARAMS,
        flags: &[
            flag(
                "auto",
                "Run analyze on the entity first, and act only on a malicious or suspicious verdict.",
            ),
            flag(
                "force",
                "With -auto: act even when analyze finds the entity clean or cannot tell.",
            ),
            flag(
                "quarantine",
                "process: also quarantine the process's executable.",
            ),
        ],
        prerequisites: &["analyze"],
        columns: AUTO_REMEDIATION_COLUMNS,
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Remediate an entity (quarantine, kill, disable, remove)",
        help: "Quarantines a file, kills a process, stops and disables a service, removes a registry value, scheduled task or startup item. The agent journals a backup first, so undo can reverse it.",
        examples: &[
            "remediate file \"C:\\Users\\Public\\evil.exe\" -auto",
            "remediate process 4242",
            "remediate scheduledtask \"\\Microsoft\\Windows\\Evil Task\"",
        ],
    },
    CommandSpec {
        name: "remediate list",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: NONE_PARAMS,
        named: NONE_PARAMS,
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("quarantineId", "ID"),
            col("entityType", "TYPE"),
            col("entity", "ENTITY"),
            col("action", "ACTION"),
            col("time", "TIME"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "List the remediations the agent has journaled",
        help: "Everything undo can reverse on this device.",
        examples: &["remediate list"],
    },
    CommandSpec {
        name: "run",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[required(
            "name",
            ValueKind::Text,
            "File name of the library script to run.",
        )],
        named: &[optional(
            "parameters",
            ValueKind::Text,
            "One argument for the script, passed as it is: no shell and no splitting, so ; & | $ ( ) arrive literally.",
        )],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("exitCode", "EXIT CODE"),
            col("stdout", "STDOUT"),
            col("stderr", "STDERR"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Long,
        summary: "Run a library script on the device",
        help: "The script is fetched and verified like putfile (size, sha256, signature), then started without a shell: by its #! line, or by its extension (.sh, .py, .pl...). Its stdout, stderr and exit code are the result; cancel stops the whole process tree.",
        examples: &[
            "run collect-logs.sh",
            "run collect-logs.sh -parameters \"/var/log/auth.log\"",
        ],
    },
    CommandSpec {
        name: "scan",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[optional(
            "path",
            ValueKind::Path,
            "File or directory to scan; a quick scan (running executables, /tmp, /var/tmp, /dev/shm) when omitted.",
        )],
        named: &[
            optional(
                "max_files",
                ValueKind::UInt,
                "Stop after this many files (100000 when omitted).",
            ),
            optional(
                "max_file_size",
                ValueKind::UInt,
                "Skip files larger than this many bytes (64 MiB when omitted).",
            ),
        ],
        flags: NONE_FLAGS,
        prerequisites: &[],
        columns: &[
            col("path", "PATH"),
            col("verdict", "VERDICT"),
            col("threat", "THREAT"),
            col("engine", "ENGINE"),
        ],
        background_allowed: true,
        timeout: TimeoutClass::Long,
        summary: "Scan files with the library's YARA rules and hash lists",
        help: "Walks the folder (without following links or leaving its filesystem) and checks every regular file against the namespace's YARA rules and SHA-256 lists (LibraryFiles with spec.analysis) and the built-in checks, within max_files, max_file_size and the command's timeout; each finding is a row, and the warnings say what was skipped. Cancel stops it. Nothing is changed: remediate acts on what it finds.",
        examples: &["scan", "scan /home &", "scan /tmp -max_files 5000"],
    },
    CommandSpec {
        name: "undo",
        aliases: &[],
        hints: &[],
        tier: Tier::Advanced,
        handler: Handler::Provider,
        platforms: ALL,
        positional: &[
            required(
                "type",
                ValueKind::Choice(ENTITY_TYPES),
                "Kind of entity to restore.",
            ),
            required(
                "entity",
                ValueKind::Text,
                "The remediated entity, as given to remediate, or its quarantine id.",
            ),
        ],
        named: NONE_PARAMS,
        flags: &[flag(
            "force",
            "Restore even over a file that exists again at the path.",
        )],
        prerequisites: &[],
        columns: AUTO_REMEDIATION_COLUMNS,
        background_allowed: true,
        timeout: TimeoutClass::Normal,
        summary: "Reverse a remediation",
        help: "Restores the entity from the agent's journal (see remediate list). A killed process cannot be brought back.",
        examples: &[
            "undo file \"C:\\Users\\Public\\evil.exe\"",
            "undo service EvilSvc",
        ],
    },
];

/// Every command, basic first, then console, then advanced.
pub fn registry() -> &'static [CommandSpec] {
    REGISTRY
}

/// The command with exactly this name (`"library delete"`), ignoring ASCII case.
pub fn find(name: &str) -> Option<&'static CommandSpec> {
    REGISTRY.iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// The one-word command that `word` is an alias of (`disconnect` → `exit`).
pub fn alias_of(word: &str) -> Option<&'static CommandSpec> {
    REGISTRY
        .iter()
        .find(|s| s.aliases.iter().any(|a| a.eq_ignore_ascii_case(word)))
}

/// The command a word from another shell hints at (`ls` → `dir`).
pub fn hinted_by(word: &str) -> Option<&'static CommandSpec> {
    REGISTRY
        .iter()
        .find(|s| s.hints.iter().any(|h| h.eq_ignore_ascii_case(word)))
}

/// Default timeout class of a Command's `spec.command`: [`TimeoutClass::Long`] when any
/// command of that word is long, so a sub-command never gets less time than its verb.
/// An unknown verb is [`TimeoutClass::Normal`] (the parser refuses it anyway).
pub fn timeout_class(verb: &str) -> TimeoutClass {
    family(verb)
        .map(|s| s.timeout)
        .max()
        .unwrap_or(TimeoutClass::Normal)
}

/// Distinct first words of the commands that pass `keep`, sorted.
fn verbs_where(keep: impl Fn(&CommandSpec) -> bool) -> Vec<&'static str> {
    let mut verbs: Vec<&'static str> = REGISTRY
        .iter()
        .filter(|s| keep(s))
        .map(CommandSpec::verb)
        .collect();
    verbs.sort_unstable();
    verbs.dedup();
    verbs
}

/// Distinct first words of the advanced commands, sorted: what the admission policy
/// must treat as advanced in `Command.spec.command`.
pub fn advanced_verbs() -> Vec<&'static str> {
    verbs_where(|s| s.tier == Tier::Advanced)
}

/// Verbs that only the console understands (`cls`, `jobs`...): never a Command.
pub fn console_verbs() -> Vec<&'static str> {
    // `library upload` is the console's, but `library` is a command verb too.
    let commands = command_verbs();
    verbs_where(|s| !s.is_command())
        .into_iter()
        .filter(|v| !commands.contains(v))
        .collect()
}

/// Verbs a Command may carry: every verb but the console's own.
pub fn command_verbs() -> Vec<&'static str> {
    verbs_where(CommandSpec::is_command)
}

/// Names of the commands this handler answers, in registry order.
pub fn handled_by(handler: Handler) -> Vec<&'static str> {
    REGISTRY
        .iter()
        .filter(|s| s.handler == handler)
        .map(|s| s.name)
        .collect()
}

/// Names of the commands the agent answers itself when a Command carries them
/// ([`CommandSpec::answered_by_agent`]), in registry order.
pub fn agent_commands() -> Vec<&'static str> {
    REGISTRY
        .iter()
        .filter(|s| s.answered_by_agent())
        .map(|s| s.name)
        .collect()
}

/// Distinct first words of all commands, sorted (for completion and suggestions).
pub fn verbs() -> Vec<&'static str> {
    verbs_where(|_| true)
}

/// The commands that share a first word, in registry order (`library`, `library delete`).
pub(crate) fn family(verb: &str) -> impl Iterator<Item = &'static CommandSpec> + '_ {
    REGISTRY
        .iter()
        .filter(move |s| s.verb().eq_ignore_ascii_case(verb))
}
