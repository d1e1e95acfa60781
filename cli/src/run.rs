//! Running one command: create the Command, wait for its final phase (Ctrl+C cancels it
//! on the device, not just the wait), and show its output or write it to a file. The
//! console and `exec` both come through here.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use liveresponse_api::command::Invocation;
use liveresponse_api::crd::{Command, CommandPhase, CommandSpec, OutputFormat};

use crate::client::{Ctx, merge_patch, retry};
use crate::error::{Error, Result};
use crate::render::{Colors, command_line, sort_commands};
use crate::sanitize;
use crate::wait::{self, SPINNER_DELAY, Spinner};

/// A new Command name in `session`: named here rather than by the API server, so a Ctrl+C
/// while the create is on its way can still cancel what it created.
pub fn new_name(session: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    // Object names are at most 253 characters.
    let prefix: String = session.chars().take(240).collect();
    format!("{prefix}-{suffix}")
}

/// The Command resource for an invocation typed in `session`.
pub fn build_command(session: &str, inv: &Invocation, background: bool) -> Command {
    let output = inv.output.unwrap_or_default();
    Command {
        metadata: ObjectMeta {
            name: Some(new_name(session)),
            ..Default::default()
        },
        spec: CommandSpec {
            session: session.to_owned(),
            command: inv.verb().to_owned(),
            args: inv.args(),
            output,
            background,
            timeout_seconds: None,
            cancel: false,
        },
        status: None,
    }
}

/// Creates the Command. A refusal (RBAC, the admission policy for advanced commands)
/// comes back as the API server's own message.
pub async fn submit(
    ctx: &Ctx,
    session: &str,
    inv: &Invocation,
    background: bool,
) -> Result<Command> {
    create(ctx, build_command(session, inv, background)).await
}

/// Creates a built Command (see [`build_command`]).
pub async fn create(ctx: &Ctx, command: Command) -> Result<Command> {
    Ok(ctx
        .commands()
        .create(&PostParams::default(), &command)
        .await?)
}

/// Cancels a command that may or may not have been created (a Ctrl+C came while its create
/// was on its way): nothing to do when it does not exist.
pub async fn cancel_if_created(ctx: &Ctx, name: &str) -> Result<bool> {
    let patch = serde_json::json!({ "spec": { "cancel": true } });
    let api = ctx.commands();
    match retry(|_| {}, || merge_patch(&api, name, &patch)).await {
        Ok(_) => Ok(true),
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The commands of a session, in log order. The API server cannot select them by
/// session, so the namespace's Commands are listed and filtered here.
pub async fn session_commands(ctx: &Ctx, session: &str) -> Result<Vec<Command>> {
    let mut commands: Vec<Command> = ctx
        .commands()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.spec.session == session)
        .collect();
    sort_commands(&mut commands);
    Ok(commands)
}

pub fn phase_of(command: &Command) -> Option<CommandPhase> {
    command.status.as_ref().and_then(|s| s.phase)
}

fn is_final(command: &Command) -> bool {
    phase_of(command).is_some_and(CommandPhase::is_final)
}

/// What the first Ctrl+C during a wait does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Cancel the command for real (`spec.cancel: true`) and keep waiting until it is
    /// final; a second Ctrl+C stops waiting.
    Cancel,
    /// Only stop waiting; the command goes on (`fg`, as its help says).
    Detach,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    Final(Box<Command>),
    /// The analyst stopped waiting; the command may still be running.
    Detached,
}

/// Waits until the command `name` is final, with a spinner after a moment.
pub async fn wait_final(
    ctx: &Ctx,
    name: &str,
    label: &str,
    on_interrupt: OnInterrupt,
) -> Result<Waited> {
    let spinner = Spinner::start(label.to_owned(), SPINNER_DELAY);
    let waiting = wait::until(
        ctx.commands(),
        "command",
        name,
        is_final,
        |c: &Command| {
            let phase = phase_of(c).map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
            spinner.set_message(format!("{label}: {phase}"));
            if let Some(p) = c.status.as_ref().and_then(|s| s.progress.as_ref()) {
                spinner.progress(
                    u64::try_from(p.bytes).unwrap_or(0),
                    u64::try_from(p.total_bytes).unwrap_or(0),
                    p.unit.as_deref(),
                );
            }
        },
        |line| spinner.note(line),
    );
    tokio::pin!(waiting);
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            result = &mut waiting => return result.map(|c| Waited::Final(Box::new(c))),
            _ = tokio::signal::ctrl_c() => {
                if on_interrupt == OnInterrupt::Detach || cancel_sent {
                    return Ok(Waited::Detached);
                }
                cancel_sent = true;
                spinner.note("cancelling... (press Ctrl+C again to stop waiting)");
                // In a task, so the wait (and a second Ctrl+C) go on while the patch
                // retries through an outage.
                let api = ctx.commands();
                let name = name.to_owned();
                let note = spinner.printer();
                tokio::spawn(async move {
                    let patch = serde_json::json!({ "spec": { "cancel": true } });
                    let result = retry(
                        |line| note(&line),
                        || merge_patch(&api, &name, &patch),
                    )
                    .await;
                    if let Err(err) = result {
                        note(&format!("error: cannot cancel {name}: {err}"));
                    }
                });
            }
        }
    }
}

/// Waits until the operator has given the command its id (so `[id] started in the
/// background` can be printed) or it has already finished. `None` on Ctrl+C.
pub async fn wait_started(ctx: &Ctx, name: &str) -> Result<Option<Command>> {
    let spinner = Spinner::start(format!("starting {name}"), SPINNER_DELAY);
    let waiting = wait::until(
        ctx.commands(),
        "command",
        name,
        |c: &Command| c.status.as_ref().and_then(|s| s.id).is_some() || is_final(c),
        |_| {},
        |line| spinner.note(line),
    );
    tokio::select! {
        result = waiting => result.map(Some),
        _ = tokio::signal::ctrl_c() => Ok(None),
    }
}

/// What to show for a finished command, decided without touching the terminal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `output.content`, for stdout or the redirect file.
    pub content: Option<String>,
    /// Lines for stderr that do not mean failure: warnings, truncation, a moved file.
    pub notes: Vec<String>,
    /// Why it did not succeed.
    pub error: Option<String>,
    pub succeeded: bool,
}

pub fn report(command: &Command) -> Report {
    let status = command.status.clone().unwrap_or_default();
    let mut report = Report {
        succeeded: status.phase == Some(CommandPhase::Succeeded),
        ..Report::default()
    };
    for step in &status.steps {
        if step.phase != CommandPhase::Succeeded {
            report
                .notes
                .push(format!("step {}: {:?}", step.command_line, step.phase));
        }
    }
    if let Some(output) = status.output {
        if output.truncated {
            report.notes.push(format!(
                "output truncated: the full output is {} bytes (sha256 {})",
                output.size,
                output.sha256.as_deref().unwrap_or("unknown"),
            ));
        }
        report
            .notes
            .extend(output.warnings.iter().map(|w| format!("note: {w}")));
        report.content = Some(output.content);
    }
    if let Some(file) = status.file {
        report.notes.push(format!(
            "file {}: {} bytes, sha256 {}",
            file.path, file.size, file.sha256
        ));
    }
    if !report.succeeded {
        let phase = status
            .phase
            .map_or_else(|| "did not finish".to_owned(), |p| format!("{p:?}"));
        report.error = Some(match status.error {
            Some(e) => format!("{phase} ({}): {}", e.reason, e.message),
            None => phase,
        });
    }
    report
}

/// Writes a command's output to a local file (the console's `> file`); returns the
/// number of bytes written.
pub fn write_output(path: &Path, content: &str) -> Result<usize> {
    std::fs::write(path, content).map_err(|source| Error::WriteFile {
        path: path.display().to_string(),
        source,
    })?;
    Ok(content.len())
}

/// Prints a finished command: output on stdout (or into `redirect`), notes and the
/// error on stderr. Returns whether it succeeded.
pub fn present(command: &Command, redirect: Option<&str>, err: Colors) -> Result<bool> {
    let report = report(command);
    if let Some(content) = &report.content {
        match redirect {
            Some(path) => {
                let n = write_output(Path::new(path), content)?;
                println!("wrote {n} bytes to {path}");
            }
            None if content.is_empty() => {}
            None => {
                // The agent rendered this from host data; the file above keeps it exact.
                let shown = match command.spec.output {
                    OutputFormat::Json => sanitize::json(content),
                    OutputFormat::Table => sanitize::text(content),
                };
                if shown.ends_with('\n') {
                    print!("{shown}");
                } else {
                    println!("{shown}");
                }
            }
        }
    } else if let Some(path) = redirect.filter(|_| report.succeeded) {
        // A command that succeeded with no output still leaves the file the analyst
        // asked for, so a script can rely on it.
        let n = write_output(Path::new(path), "")?;
        println!("wrote {n} bytes to {path}");
    }
    for note in &report.notes {
        eprintln!("{}", err.yellow(&sanitize::text(note)));
    }
    if let Some(error) = &report.error {
        eprintln!("{} {}", err.red("error:"), sanitize::text(error));
    }
    Ok(report.succeeded)
}

/// The label of a command while it runs.
pub fn label(command: &Command) -> String {
    sanitize::line(&command_line(command)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::command::{parse_command, parse_line};
    use liveresponse_api::crd::{CommandError, CommandOutput, CommandStatus, OutputFormat};

    fn line(text: &str) -> liveresponse_api::command::ConsoleLine {
        match parse_line(text) {
            Ok(l) => l,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn command_carries_verb_args_output_and_background() {
        let l = line("processes -name sshd -output json &");
        let c = build_command("host-1-x7k2p", &l.invocation, l.background);
        let name = c.metadata.name.clone().unwrap_or_default();
        assert!(name.starts_with("host-1-x7k2p-"), "{name}");
        assert_eq!(name.len(), "host-1-x7k2p-".len() + 8);
        assert_ne!(
            build_command("host-1-x7k2p", &l.invocation, false)
                .metadata
                .name,
            c.metadata.name,
            "each command gets its own name"
        );
        assert_eq!(c.spec.session, "host-1-x7k2p");
        assert_eq!(c.spec.command, "processes");
        assert_eq!(c.spec.output, OutputFormat::Json);
        assert!(c.spec.background);
        assert!(!c.spec.cancel);
        // The args parse back to the same invocation: what the operator will run.
        match parse_command(&c.spec.command, &c.spec.args) {
            Ok(inv) => assert_eq!(inv, l.invocation),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn sub_commands_put_their_second_word_in_args() {
        let l = line("library delete \"my script.ps1\"");
        let c = build_command("s", &l.invocation, false);
        assert_eq!(c.spec.command, "library");
        assert_eq!(c.spec.args, ["delete", "my script.ps1"]);
        assert_eq!(c.spec.output, OutputFormat::Table);
    }

    fn finished(
        phase: CommandPhase,
        output: Option<CommandOutput>,
        error: Option<CommandError>,
    ) -> Command {
        let mut c = build_command("s", &line("processes").invocation, false);
        c.status = Some(CommandStatus {
            id: Some(1),
            phase: Some(phase),
            output,
            error,
            ..Default::default()
        });
        c
    }

    fn output(content: &str, warnings: &[&str]) -> CommandOutput {
        match serde_json::from_value(serde_json::json!({
            "format": "table",
            "content": content,
            "truncated": false,
            "warnings": warnings,
        })) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn report_of_a_success_has_output_and_warnings() {
        let c = finished(
            CommandPhase::Succeeded,
            Some(output("PID  NAME\n1    init\n", &["skipped /proc/kcore"])),
            None,
        );
        let r = report(&c);
        assert!(r.succeeded);
        assert_eq!(r.content.as_deref(), Some("PID  NAME\n1    init\n"));
        assert_eq!(r.notes, ["note: skipped /proc/kcore"]);
        assert_eq!(r.error, None);
    }

    #[test]
    fn report_of_a_failure_has_reason_and_message() {
        let c = finished(
            CommandPhase::Failed,
            None,
            Some(CommandError {
                reason: "NotSupported".into(),
                message: "registry is not supported on linux".into(),
            }),
        );
        let r = report(&c);
        assert!(!r.succeeded);
        assert_eq!(
            r.error.as_deref(),
            Some("Failed (NotSupported): registry is not supported on linux")
        );
        let cancelled = report(&finished(CommandPhase::Cancelled, None, None));
        assert_eq!(cancelled.error.as_deref(), Some("Cancelled"));
    }

    #[test]
    fn redirect_writes_the_content_to_a_local_file() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let path = dir.path().join("out.txt");
        let n = match write_output(&path, "PID  NAME\n1    init\n") {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(n, 20);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            "PID  NAME\n1    init\n"
        );

        let c = finished(CommandPhase::Succeeded, Some(output("hello\n", &[])), None);
        let redirect = dir.path().join("again.txt");
        let ok = present(&c, redirect.to_str(), Colors::default());
        assert!(matches!(ok, Ok(true)), "{ok:?}");
        assert_eq!(
            std::fs::read_to_string(&redirect).unwrap_or_default(),
            "hello\n"
        );

        let missing = dir.path().join("no/such/dir/out.txt");
        let err = write_output(&missing, "x");
        assert!(
            matches!(&err, Err(Error::WriteFile { path, .. }) if path.ends_with("out.txt")),
            "{err:?}"
        );
    }
}
