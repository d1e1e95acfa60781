//! The interactive console of a connected session.
//!
//! Every line is parsed with the registry before anything is sent, so a typo costs no
//! API call. Commands the registry gives to the console (`Handler::Console`: `help`,
//! `status`, `jobs`...) run here; everything else becomes a Command resource the operator
//! runs, on the device or itself.
//!
//! Ctrl+C: at the prompt rustyline has the terminal in raw mode and reports it as
//! `Interrupted` (a new prompt). While a command runs, the terminal is in cooked mode,
//! so Ctrl+C is a SIGINT that tokio's handler turns into a future raced against the
//! wait ([`run::wait_final`]); the command is cancelled on the device and the console
//! stays.

use jiff::Timestamp;
use liveresponse_api::command::{ConsoleLine, Handler, OutputFormat, help_answer, parse_line};
use liveresponse_api::crd::{Command, LiveResponseSession};
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use crate::client::Ctx;
use crate::error::{EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Error, Result};
use crate::render::{self, Colors};
use crate::run::{self, OnInterrupt, Waited};
use crate::sanitize;
use crate::session::{self, DISCONNECT_TIMEOUT};
use crate::wait::interruptible;

/// What a typed line asks for. Decided without I/O, so it is tested on its own.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// A blank line.
    Nothing,
    /// `cls`.
    Clear,
    /// `help` or `help CMD`: text printed (or written to a `> file`) locally.
    Print {
        text: String,
        redirect: Option<String>,
    },
    /// `jobs`.
    Jobs,
    /// `status` or `status ID`: the session's command log, from its Command objects.
    Status {
        id: Option<i64>,
        format: OutputFormat,
        redirect: Option<String>,
    },
    /// `fg ID`.
    Foreground { id: i64, redirect: Option<String> },
    /// `exit` or `disconnect`: end the session and leave.
    End,
    /// `connect` while connected.
    AlreadyConnected,
    /// `download ID|NAME [-full_output] [> file]`: through the file API, to this computer.
    Download {
        /// A command id of this session, or a Command's name.
        target: String,
        full_output: bool,
        to: Option<String>,
    },
    /// `library upload FILE [-signature F] [-description T] [-name N]`.
    LibraryUpload {
        file: String,
        signature: Option<String>,
        description: Option<String>,
        name: Option<String>,
        analysis: Option<String>,
    },
    /// A device command: becomes a Command resource.
    Run(ConsoleLine),
    /// The line is wrong; the text says how (with the usage when the command is known).
    Invalid(String),
}

/// Decides what a console line does.
pub fn dispatch(line: &str) -> Action {
    if line.trim().is_empty() {
        return Action::Nothing;
    }
    let parsed = match parse_line(line) {
        Ok(parsed) => parsed,
        Err(err) => return Action::Invalid(err.to_string()),
    };
    let inv = &parsed.invocation;
    if inv.spec.handler != Handler::Console {
        return Action::Run(parsed);
    }
    let redirect = parsed.redirect.clone();
    match inv.spec.name {
        "cls" => Action::Clear,
        "exit" => Action::End,
        "connect" => Action::AlreadyConnected,
        "jobs" => Action::Jobs,
        "download" => Action::Download {
            target: inv.get("id").unwrap_or_default().to_owned(),
            full_output: inv.has_flag("full_output"),
            to: redirect,
        },
        "library upload" => Action::LibraryUpload {
            file: inv.get("file").unwrap_or_default().to_owned(),
            signature: inv.get("signature").map(str::to_owned),
            description: inv.get("description").map(str::to_owned),
            name: inv.get("name").map(str::to_owned),
            analysis: inv.get("analysis").map(str::to_owned),
        },
        "fg" => match id_of(inv.get("id")) {
            Ok(id) => Action::Foreground { id, redirect },
            Err(raw) => Action::Invalid(format!("fg: there is no command {raw}")),
        },
        // The registry is compiled into this binary: no need to ask anyone.
        "help" => match help_answer(inv) {
            Ok(text) => Action::Print { text, redirect },
            Err(err) => Action::Invalid(err.to_string()),
        },
        "status" => match inv.get("id").map(|raw| id_of(Some(raw))).transpose() {
            Ok(id) => Action::Status {
                id,
                format: inv.output.unwrap_or_default(),
                redirect,
            },
            Err(raw) => Action::Invalid(format!("status: there is no command {raw}")),
        },
        // A command the registry gives to the console but this console does not know: the
        // dispatch test catches it before a user does.
        other => Action::Invalid(format!("{other}: not available in this console")),
    }
}

/// A command id as typed; the text back when it cannot be one.
fn id_of(raw: Option<&str>) -> std::result::Result<i64, String> {
    let raw = raw.unwrap_or_default();
    raw.parse::<i64>().map_err(|_| raw.to_owned())
}

/// Lines kept for the up arrow; in memory only, since lines may name sensitive paths.
const HISTORY_SIZE: usize = 1000;

/// Reads one line with a fresh editor seeded with the history.
///
/// A fresh editor each time, because rustyline (without its signal-hook feature, which
/// mishandles typed-ahead input in rustyline 17) installs its own SIGINT handler for the
/// editor's lifetime and puts the previous one back when dropped. Dropping it after each
/// line gives SIGINT back to tokio while a command runs, so Ctrl+C can cancel it.
fn read_line(prompt: &str, history: &[String]) -> rustyline::Result<String> {
    let mut editor = DefaultEditor::new()?;
    for line in history {
        editor.add_history_entry(line.as_str())?;
    }
    editor.readline(prompt)
}

/// Installs tokio's SIGINT handler now, before the first editor, so that the handler each
/// editor restores when dropped is tokio's.
fn install_interrupt_handler() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let _ = signal(SignalKind::interrupt())?;
    }
    #[cfg(windows)]
    {
        let _ = tokio::signal::windows::ctrl_c()?;
    }
    Ok(())
}

fn clear_screen() {
    use std::io::{IsTerminal, Write};
    if std::io::stdout().is_terminal() {
        print!("\x1b[2J\x1b[H");
        let _ = std::io::stdout().flush();
    }
}

/// The prompt: device, time connected and working directory,
/// e.g. `[host-1 00:03:12] /var/log> `.
pub fn prompt(device: &str, connected_seconds: i64, working_directory: Option<&str>) -> String {
    let clock = render::clock(connected_seconds);
    // Both come from the device: its name is the analyst's choice, but the working
    // directory is whatever path the host had, and the prompt is redrawn on every line.
    let device = sanitize::line(device);
    match working_directory
        .filter(|d| !d.is_empty())
        .map(sanitize::line)
    {
        Some(dir) => format!("[{device} {clock}] {dir}> "),
        None => format!("[{device} {clock}]> "),
    }
}

fn local_time(time: Timestamp) -> String {
    time.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

struct Console<'a> {
    ctx: &'a Ctx,
    session: LiveResponseSession,
    name: String,
    started: Timestamp,
    out: Colors,
    err: Colors,
}

/// Runs the console until the session ends; returns the exit status.
pub async fn run(ctx: &Ctx, session: LiveResponseSession, no_color: bool) -> Result<i32> {
    let name = session::name_of(&session);
    let started = session
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or_else(Timestamp::now, |t| t.0);
    let mut console = Console {
        ctx,
        session,
        name,
        started,
        out: Colors::stdout(no_color),
        err: Colors::stderr(no_color),
    };
    console.header();
    console.repl().await
}

impl Console<'_> {
    fn device(&self) -> &str {
        &self.session.spec.device
    }

    fn header(&self) {
        let c = self.out;
        println!(
            "{} {} {}",
            c.bold("Live response session"),
            c.bold(&self.name),
            c.dim(&format!("on device {}", sanitize::line(self.device()))),
        );
        // The requester and reason were typed by whoever opened the session.
        let reason = self
            .session
            .spec
            .reason
            .as_deref()
            .map(|r| format!(" - reason: {}", sanitize::line(r)))
            .unwrap_or_default();
        println!(
            "requested by {} - connected since {}{reason}",
            sanitize::line(&self.session.spec.requested_by),
            local_time(self.started),
        );
        println!(
            "{}",
            c.dim("Type 'help' for commands, 'exit' to end the session. Ctrl+C cancels a running command.")
        );
    }

    /// Reloads the session (its working directory changes with `cd`). `Some(exit status)`
    /// when it ended behind the console's back (expired, disconnected elsewhere).
    async fn refresh(&mut self) -> Option<i32> {
        let api = self.ctx.sessions();
        let get = api.get(&self.name);
        // A slow API server must not hold the prompt back; the next command reports it.
        if let Ok(Ok(s)) = tokio::time::timeout(std::time::Duration::from_secs(5), get).await {
            self.session = s;
        }
        if session::phase_of(&self.session).is_some_and(|p| p.is_final()) {
            eprintln!("{}", session::ended_line(&self.name, Some(&self.session)));
            return Some(EXIT_FAILED);
        }
        None
    }

    fn prompt(&self) -> String {
        let wd = self
            .session
            .status
            .as_ref()
            .and_then(|s| s.working_directory.as_deref());
        prompt(
            self.device(),
            Timestamp::now().as_second() - self.started.as_second(),
            wd,
        )
    }

    async fn repl(&mut self) -> Result<i32> {
        install_interrupt_handler()?;
        let mut history: Vec<String> = Vec::new();
        loop {
            if let Some(code) = self.refresh().await {
                return Ok(code);
            }
            let prompt = self.prompt();
            let past = history.clone();
            // rustyline blocks; keep it off the runtime's workers so the signal handler
            // and any watch keep running.
            let read = tokio::task::spawn_blocking(move || read_line(&prompt, &past)).await?;
            let line = match read {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => {
                    println!("exit");
                    return Ok(self.end().await);
                }
                Err(err) => return Err(err.into()),
            };
            if !line.trim().is_empty() && history.last() != Some(&line) {
                history.push(line.clone());
                if history.len() > HISTORY_SIZE {
                    history.remove(0);
                }
            }
            match dispatch(&line) {
                Action::Nothing => {}
                Action::Clear => clear_screen(),
                Action::Print { text, redirect } => {
                    self.print_local(&text, redirect.as_deref(), false)
                }
                Action::Jobs => self.jobs().await,
                Action::Status {
                    id,
                    format,
                    redirect,
                } => self.status(id, format, redirect.as_deref()).await,
                Action::Foreground { id, redirect } => {
                    self.foreground(id, redirect.as_deref()).await
                }
                Action::End => return Ok(self.end().await),
                Action::AlreadyConnected => println!(
                    "already connected to {} (session {}); type 'exit' to end it first",
                    sanitize::line(self.device()),
                    self.name
                ),
                Action::Run(line) => self.execute(&line).await,
                Action::Download {
                    target,
                    full_output,
                    to,
                } => self.download(&target, full_output, to.as_deref()).await,
                Action::LibraryUpload {
                    file,
                    signature,
                    description,
                    name,
                    analysis,
                } => {
                    let upload = crate::library::Upload {
                        file: std::path::Path::new(&file),
                        name: name.as_deref(),
                        signature: signature.as_deref().map(std::path::Path::new),
                        description: description.as_deref(),
                        analysis: analysis.as_deref().and_then(crate::library::analysis_of),
                    };
                    match interruptible(crate::library::upload(self.ctx, &upload)).await {
                        Some(Ok(())) => {}
                        Some(Err(err)) => self.error(&err.to_string()),
                        None => self.error("interrupted"),
                    }
                }
                Action::Invalid(message) => self.error(&message),
            }
        }
    }

    /// `download`: a command id of this session is looked up; anything else is taken as
    /// a Command's name.
    async fn download(&self, target: &str, full_output: bool, to: Option<&str>) {
        if target.contains(['/', '\\']) {
            return self.error(&format!(
                "download brings a command's result to this computer; to copy {target} from the device, run `getfile {target}` first, then `download ID`"
            ));
        }
        let name = match target.parse::<i64>() {
            Ok(id) => match self.commands().await {
                Ok(commands) => match commands
                    .iter()
                    .find(|c| c.status.as_ref().and_then(|s| s.id) == Some(id))
                {
                    Some(c) => c.metadata.name.clone().unwrap_or_default(),
                    None => return self.error(&format!("download: there is no command {id}")),
                },
                Err(err) => return self.error(&err.to_string()),
            },
            Err(_) => target.to_owned(),
        };
        let work = crate::download::run(
            self.ctx,
            &name,
            to.map(std::path::Path::new),
            full_output,
            false,
        );
        match interruptible(work).await {
            Some(Ok(())) => {}
            Some(Err(err)) => self.error(&err.to_string()),
            None => self.error("interrupted; run download again to resume"),
        }
    }

    fn error(&self, message: &str) {
        eprintln!("{} {}", self.err.red("error:"), sanitize::text(message));
    }

    /// Prints text the console composed (help, a status answer) or writes it unchanged to
    /// `redirect`; `json` says the text is a JSON document, whose values must stay exact.
    fn print_local(&self, text: &str, redirect: Option<&str>, json: bool) {
        let text = match redirect {
            Some(_) => std::borrow::Cow::Borrowed(text),
            None if json => sanitize::json(text),
            None => sanitize::text(text),
        };
        let text = text.as_ref();
        match redirect {
            Some(path) => match run::write_output(std::path::Path::new(path), text) {
                Ok(n) => println!("wrote {n} bytes to {path}"),
                Err(err) => self.error(&err.to_string()),
            },
            None => print!(
                "{}",
                if text.ends_with('\n') {
                    text.to_owned()
                } else {
                    format!("{text}\n")
                }
            ),
        }
    }

    async fn execute(&self, line: &ConsoleLine) {
        let built = run::build_command(&self.name, &line.invocation, line.background);
        let name = built.metadata.name.clone().unwrap_or_default();
        let submitted = interruptible(run::create(self.ctx, built)).await;
        let command = match submitted {
            Some(Ok(command)) => command,
            Some(Err(err)) => return self.error(&err.to_string()),
            None => {
                // The create may have reached the API server: cancel what it made.
                return match run::cancel_if_created(self.ctx, &name).await {
                    Ok(true) => self.error(&format!("interrupted; {name} was cancelled")),
                    Ok(false) => self.error("interrupted; nothing was created"),
                    Err(err) => self.error(&format!(
                        "interrupted; {name} may have been created and could not be cancelled: {err}"
                    )),
                };
            }
        };
        let name = command.metadata.name.clone().unwrap_or_default();
        if line.background {
            return self.started_in_background(&name).await;
        }
        match run::wait_final(self.ctx, &name, &run::label(&command), OnInterrupt::Cancel).await {
            Ok(Waited::Final(command)) => self.present(&command, line.redirect.as_deref()),
            Ok(Waited::Detached) => println!(
                "stopped waiting; {name} is being cancelled (see 'jobs' or 'kubectl liveresponse log {}')",
                self.name
            ),
            Err(err) => self.error(&err.to_string()),
        }
    }

    fn present(&self, command: &Command, redirect: Option<&str>) {
        if let Err(err) = run::present(command, redirect, self.err) {
            self.error(&err.to_string());
        }
    }

    async fn started_in_background(&self, name: &str) {
        match run::wait_started(self.ctx, name).await {
            Ok(Some(command)) => {
                let id = command
                    .status
                    .as_ref()
                    .and_then(|s| s.id)
                    .map_or_else(|| name.to_owned(), |id| id.to_string());
                println!("[{id}] started in the background");
                // A quick command may be done before its id reached us; say so, but leave
                // the output to `fg` as for any background command.
                if let Some(phase) = run::phase_of(&command).filter(|p| p.is_final()) {
                    println!("[{id}] {phase:?} (fg {id} shows its output)");
                }
            }
            Ok(None) => println!("[{name}] started in the background"),
            Err(err) => self.error(&err.to_string()),
        }
    }

    /// This session's commands, in log order.
    async fn commands(&self) -> Result<Vec<Command>> {
        interruptible(run::session_commands(self.ctx, &self.name))
            .await
            .ok_or(Error::Interrupted)?
    }

    async fn status(&self, id: Option<i64>, format: OutputFormat, redirect: Option<&str>) {
        let answer = self.commands().await.and_then(|commands| {
            render::status_answer(&commands, id, format, &self.name, Timestamp::now())
        });
        match answer {
            Ok(text) => self.print_local(&text, redirect, format == OutputFormat::Json),
            Err(err) => self.error(&err.to_string()),
        }
    }

    async fn jobs(&self) {
        match self.commands().await {
            Ok(commands) => {
                let jobs: Vec<Command> =
                    commands.into_iter().filter(|c| c.spec.background).collect();
                if jobs.is_empty() {
                    println!("no background commands in this session");
                } else {
                    println!("{}", render::jobs_table(&jobs, Timestamp::now(), self.out));
                }
            }
            Err(err) => self.error(&err.to_string()),
        }
    }

    async fn foreground(&self, id: i64, redirect: Option<&str>) {
        let commands = match self.commands().await {
            Ok(c) => c,
            Err(err) => return self.error(&err.to_string()),
        };
        let Some(command) = commands
            .into_iter()
            .find(|c| c.status.as_ref().and_then(|s| s.id) == Some(id))
        else {
            return self.error(&format!(
                "fg: there is no command {id} in this session (see 'jobs')"
            ));
        };
        if run::phase_of(&command).is_some_and(|p| p.is_final()) {
            return self.present(&command, redirect);
        }
        let name = command.metadata.name.clone().unwrap_or_default();
        match run::wait_final(self.ctx, &name, &run::label(&command), OnInterrupt::Detach).await {
            Ok(Waited::Final(command)) => self.present(&command, redirect),
            Ok(Waited::Detached) => {
                println!("stopped waiting; [{id}] keeps running in the background")
            }
            Err(err) => self.error(&err.to_string()),
        }
    }

    /// Ends the session; the console's exit status.
    async fn end(&self) -> i32 {
        match interruptible(session::end(self.ctx, &self.name, DISCONNECT_TIMEOUT)).await {
            Some(Ok(session)) => {
                println!("{}", session::ended_line(&self.name, session.as_ref()));
                EXIT_OK
            }
            Some(Err(err)) => {
                self.error(&format!("disconnecting {}: {err}", self.name));
                err.exit_code()
            }
            None => {
                self.error(&format!(
                    "stopped waiting; session {} was asked to disconnect",
                    self.name
                ));
                EXIT_INTERRUPTED
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use liveresponse_api::command::{help_overview, registry};

    use super::*;

    fn run_line(line: &str) -> ConsoleLine {
        match dispatch(line) {
            Action::Run(l) => l,
            other => panic!("{line}: expected a Command, got {other:?}"),
        }
    }

    #[test]
    fn prompt_escapes_what_the_device_wrote() {
        let p = prompt("host-1", 5, Some("/tmp/\x1b]0;pwned\x07\ndir"));
        assert_eq!(p, "[host-1 00:00:05] /tmp/\\x1b]0;pwned\\x07\\x0adir> ");
        assert_eq!(
            prompt("h\u{202e}", 0, Some("/données/日本")),
            "[h\\u202e 00:00:00] /données/日本> "
        );
    }

    #[test]
    fn blank_lines_do_nothing() {
        assert_eq!(dispatch(""), Action::Nothing);
        assert_eq!(dispatch("   \t "), Action::Nothing);
    }

    #[test]
    fn console_commands_stay_local() {
        assert_eq!(dispatch("cls"), Action::Clear);
        assert_eq!(dispatch("CLS"), Action::Clear);
        assert_eq!(dispatch("exit"), Action::End);
        assert_eq!(dispatch("disconnect"), Action::End);
        assert_eq!(dispatch("Disconnect "), Action::End);
        assert_eq!(dispatch("jobs"), Action::Jobs);
        assert_eq!(
            dispatch("fg 3"),
            Action::Foreground {
                id: 3,
                redirect: None
            }
        );
        assert_eq!(
            dispatch("fg 3 > out.txt"),
            Action::Foreground {
                id: 3,
                redirect: Some("out.txt".into())
            }
        );
        assert_eq!(dispatch("connect other-host"), Action::AlreadyConnected);
    }

    #[test]
    fn help_is_answered_from_the_registry() {
        match dispatch("help") {
            Action::Print { text, redirect } => {
                assert_eq!(text, help_overview());
                assert_eq!(redirect, None);
            }
            other => panic!("{other:?}"),
        }
        match dispatch("help library delete > h.txt") {
            Action::Print { text, redirect } => {
                assert!(text.starts_with("library delete"), "{text}");
                assert_eq!(redirect.as_deref(), Some("h.txt"));
            }
            other => panic!("{other:?}"),
        }
        match dispatch("help nosuch") {
            Action::Invalid(msg) => assert!(msg.contains("unknown command 'nosuch'"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    /// The registry decides what stays in the console: each command's first example is
    /// answered here exactly when its handler is the console.
    #[test]
    fn console_dispatch_follows_the_registry() {
        for spec in registry() {
            let action = dispatch(spec.examples[0]);
            if spec.handler == Handler::Console {
                assert!(
                    !matches!(action, Action::Run(_) | Action::Invalid(_)),
                    "{}: {action:?}",
                    spec.name
                );
            } else {
                assert!(
                    matches!(action, Action::Run(_)),
                    "{}: {action:?}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn status_reads_the_session_log_here() {
        assert_eq!(
            dispatch("status"),
            Action::Status {
                id: None,
                format: OutputFormat::Table,
                redirect: None
            }
        );
        assert_eq!(
            dispatch("Status 3 -output json > s.json"),
            Action::Status {
                id: Some(3),
                format: OutputFormat::Json,
                redirect: Some("s.json".into())
            }
        );
        assert!(matches!(
            dispatch("status 99999999999999999999"),
            Action::Invalid(_)
        ));
        assert!(matches!(dispatch("status x"), Action::Invalid(_)));
        assert!(matches!(dispatch("status &"), Action::Invalid(_)));
        // trace is the agent's: it goes to the device as a Command.
        assert!(matches!(dispatch("trace -level debug"), Action::Run(_)));
        assert!(matches!(dispatch("trace"), Action::Run(_)));
    }

    #[test]
    fn device_commands_become_commands() {
        let l = run_line("processes -name sshd");
        assert_eq!(l.invocation.verb(), "processes");
        assert!(!l.background);
        let l = run_line("findfile secret.txt &");
        assert!(l.background);
        let l = run_line("processes > out.txt");
        assert_eq!(l.redirect.as_deref(), Some("out.txt"));
        let l = run_line("getfile /etc/hostname");
        assert_eq!(l.invocation.verb(), "getfile");
        let l = run_line("cd /var/log");
        assert_eq!(l.invocation.verb(), "cd");
    }

    #[test]
    fn parse_errors_are_shown_with_usage_and_create_nothing() {
        match dispatch("processes -pid notanumber") {
            Action::Invalid(msg) => {
                assert!(msg.contains("usage: processes"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        match dispatch("procesess") {
            Action::Invalid(msg) => assert!(msg.contains("did you mean 'processes'"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // Console commands cannot go to the background.
        assert!(matches!(dispatch("jobs &"), Action::Invalid(_)));
        assert!(matches!(dispatch("disconnect now"), Action::Invalid(_)));
        assert!(matches!(dispatch("exit now"), Action::Invalid(_)));
        assert!(matches!(dispatch("fg"), Action::Invalid(_)));
    }

    #[test]
    fn prompt_shows_device_clock_and_directory() {
        assert_eq!(
            prompt("host-1", 192, Some("/var/log")),
            "[host-1 00:03:12] /var/log> "
        );
        assert_eq!(prompt("host-1", 0, None), "[host-1 00:00:00]> ");
        assert_eq!(prompt("host-1", 5, Some("")), "[host-1 00:00:05]> ");
    }
}
