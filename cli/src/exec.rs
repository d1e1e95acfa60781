//! `exec DEVICE -- COMMAND...`: one command, for scripts and CI. Its output goes to
//! stdout and nothing else does; the exit status says whether it succeeded.

use jiff::Timestamp;
use liveresponse_api::command::{
    Handler, Invocation, OutputFormat, Tier, help_answer, parse_command,
};

use crate::client::{Ctx, Target};
use crate::connect::abandon;
use crate::error::{EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Error, Result};
use crate::render::{self, Colors};
use crate::run::{self, OnInterrupt, Waited};
use crate::sanitize;
use crate::session::{self, DISCONNECT_TIMEOUT};

#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Name of the Device to run the command on.
    pub device: String,
    /// Run in this existing session instead of opening a new one (it is left open).
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
    /// Why you need the session; recorded in the session it opens.
    #[arg(long)]
    pub reason: Option<String>,
    /// Leave the session it opened connected, for the next exec --session.
    #[arg(long)]
    pub keep_session: bool,
    /// The command and its arguments, one shell word each, e.g.
    /// `-- findfile "my file.txt"` or `-- processes -name sshd -output json`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// What `exec` will do with the words after `--`.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Print help locally; no session needed.
    Help(String),
    /// Show the command log of the `--session` session, or one command of it.
    Status {
        id: Option<i64>,
        format: OutputFormat,
    },
    /// Send this to the device.
    Run(Invocation),
}

/// Builds the invocation from shell words. Each word is one argument, as in a Command's
/// `spec.args`, so the shell's quoting is enough: `"my file.txt"` needs no console quotes.
pub fn plan(words: &[String]) -> Result<Plan> {
    let Some((first, rest)) = words.split_first() else {
        return Err(Error::Usage("exec: no command given after --".to_owned()));
    };
    let inv = parse_command(first, rest)?;
    if inv.spec.tier == Tier::Console {
        return Err(Error::Usage(format!(
            "exec: {} is a console command; exec runs device commands (use connect for an interactive session)",
            inv.spec.name
        )));
    }
    if inv.spec.handler != Handler::Console {
        return Ok(Plan::Run(inv));
    }
    // What the console answers itself, exec answers the same way.
    match inv.spec.name {
        "help" => Ok(Plan::Help(help_answer(&inv)?)),
        "status" => {
            let id = match inv.get("id") {
                Some(raw) => Some(raw.parse::<i64>().map_err(|_| {
                    Error::Usage(format!("exec: status: there is no command {raw}"))
                })?),
                None => None,
            };
            Ok(Plan::Status {
                id,
                format: inv.output.unwrap_or_default(),
            })
        }
        other => Err(Error::Usage(format!(
            "exec: {other} is answered by the console only (use connect)"
        ))),
    }
}

pub async fn run(target: &Target, args: &ExecArgs, no_color: bool) -> Result<i32> {
    // Parsed before the cluster is contacted: a typo costs nothing and exits 2.
    let inv = match plan(&args.command)? {
        Plan::Help(text) => {
            print!("{text}");
            return Ok(EXIT_OK);
        }
        Plan::Status { id, format } => {
            // A session exec opens has no log yet: status reads an existing one.
            let Some(session) = &args.session else {
                return Err(Error::Usage(
                    "exec: status shows a session's command log; name the session with --session (kubectl liveresponse sessions lists them)".to_owned(),
                ));
            };
            return status(target, &args.device, session, id, format).await;
        }
        Plan::Run(inv) => inv,
    };
    let ctx = Ctx::new(target).await?;
    let (name, created) = match &args.session {
        Some(name) => (
            session::name_of(&session::attach(&ctx, name, &args.device).await?),
            false,
        ),
        None => (
            session::name_of(&session::create(&ctx, &args.device, args.reason.as_deref()).await?),
            true,
        ),
    };
    let result = run_in(&ctx, &name, &inv, no_color).await;
    if created && !args.keep_session {
        if matches!(result, Err(Error::Interrupted)) {
            abandon(&ctx, &name).await;
        } else if let Err(err) = session::end(&ctx, &name, DISCONNECT_TIMEOUT).await {
            eprintln!(
                "warning: could not disconnect session {name}: {}",
                sanitize::text(&err.to_string())
            );
        }
    } else if created {
        eprintln!("session {name} stays connected");
    }
    result
}

/// `exec DEVICE --session NAME -- status [ID]`: the same answer as the console's.
async fn status(
    target: &Target,
    device: &str,
    session: &str,
    id: Option<i64>,
    format: OutputFormat,
) -> Result<i32> {
    let ctx = Ctx::new(target).await?;
    // Asked first so a mistyped name gets "not found" rather than an empty log; an ended
    // session's log is still worth reading, so only the device is checked.
    let found = ctx.sessions().get(session).await?;
    if found.spec.device != device {
        return Err(Error::WrongDevice {
            name: session.to_owned(),
            actual: found.spec.device,
            wanted: device.to_owned(),
        });
    }
    let commands = run::session_commands(&ctx, session).await?;
    let answer = render::status_answer(&commands, id, format, session, Timestamp::now())?;
    // Command lines and agent error messages are in it; JSON values stay exact.
    let shown = match format {
        OutputFormat::Json => sanitize::json(&answer),
        OutputFormat::Table => sanitize::text(&answer),
    };
    print!("{shown}");
    Ok(EXIT_OK)
}

async fn run_in(ctx: &Ctx, name: &str, inv: &Invocation, no_color: bool) -> Result<i32> {
    session::wait_connected(ctx, name).await?;
    let command = run::submit(ctx, name, inv, false).await?;
    let command_name = command.metadata.name.clone().unwrap_or_default();
    match run::wait_final(
        ctx,
        &command_name,
        &run::label(&command),
        OnInterrupt::Cancel,
    )
    .await?
    {
        Waited::Final(command) => {
            let ok = run::present(&command, None, Colors::stderr(no_color))?;
            Ok(if ok { EXIT_OK } else { EXIT_FAILED })
        }
        Waited::Detached => {
            eprintln!("stopped waiting; {command_name} is being cancelled");
            Ok(EXIT_INTERRUPTED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::command::parse_line;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| (*s).to_owned()).collect()
    }

    fn invocation(w: &[&str]) -> Invocation {
        match plan(&words(w)) {
            Ok(Plan::Run(inv)) => inv,
            other => panic!("{w:?}: {other:?}"),
        }
    }

    fn line(text: &str) -> Invocation {
        match parse_line(text) {
            Ok(l) => l.invocation,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn shell_words_are_arguments_as_is() {
        assert_eq!(
            invocation(&["processes", "-name", "sshd"]),
            line("processes -name sshd")
        );
        // A word with spaces is one value: the shell already grouped it.
        assert_eq!(
            invocation(&["findfile", "my file.txt"]),
            line("findfile \"my file.txt\"")
        );
        assert_eq!(
            invocation(&["getfile", "C:\\Program Files\\x.exe", "-auto"]),
            line("getfile \"C:\\Program Files\\x.exe\" -auto")
        );
    }

    #[test]
    fn operators_are_plain_values_in_exec() {
        // `&` and `>` are console syntax; in exec the shell has its own.
        let inv = invocation(&["findfile", "&"]);
        assert_eq!(inv.get("name"), Some("&"));
    }

    #[test]
    fn sub_commands_and_output_format() {
        let inv = invocation(&["library", "delete", "x.ps1"]);
        assert_eq!(inv.spec.name, "library delete");
        let inv = invocation(&["processes", "-output", "json"]);
        assert_eq!(
            inv.output,
            Some(liveresponse_api::command::OutputFormat::Json)
        );
    }

    #[test]
    fn bad_lines_are_usage_errors() {
        for bad in [
            &["procesess"][..],
            &["processes", "-pid", "x"][..],
            &["jobs"][..],
            &["exit"][..],
            &[][..],
        ] {
            match plan(&words(bad)) {
                Err(err) => assert_eq!(err.exit_code(), crate::error::EXIT_USAGE, "{bad:?}: {err}"),
                Ok(p) => panic!("{bad:?} should be refused, got {p:?}"),
            }
        }
    }

    #[test]
    fn status_is_answered_from_the_log_not_the_device() {
        assert_eq!(
            plan(&words(&["status"])).ok(),
            Some(Plan::Status {
                id: None,
                format: OutputFormat::Table
            })
        );
        assert_eq!(
            plan(&words(&["status", "3", "-output", "json"])).ok(),
            Some(Plan::Status {
                id: Some(3),
                format: OutputFormat::Json
            })
        );
        // Ids beyond any command are refused before the cluster is asked.
        match plan(&words(&["status", "99999999999999999999"])) {
            Err(err) => assert_eq!(err.exit_code(), crate::error::EXIT_USAGE, "{err}"),
            other => panic!("{other:?}"),
        }
        // trace is the agent's: it becomes a Command.
        assert!(matches!(
            plan(&words(&["trace", "-level", "debug"])),
            Ok(Plan::Run(_))
        ));
    }

    /// Every command a Command may carry has a plan: the console's own answered here,
    /// the rest sent to the cluster.
    #[test]
    fn exec_dispatch_follows_the_registry() {
        for spec in liveresponse_api::command::registry() {
            let Ok(line) = parse_line(spec.examples[0]) else {
                panic!("{}: example does not parse", spec.name);
            };
            let inv = line.invocation;
            let mut w = vec![inv.verb().to_owned()];
            w.extend(inv.args());
            let planned = plan(&w);
            match (spec.tier, spec.handler) {
                (Tier::Console, _) => assert!(planned.is_err(), "{}", spec.name),
                (_, Handler::Console) => assert!(
                    matches!(planned, Ok(Plan::Help(_) | Plan::Status { .. })),
                    "{}: {planned:?}",
                    spec.name
                ),
                _ => assert!(matches!(planned, Ok(Plan::Run(_))), "{}", spec.name),
            }
        }
    }

    #[test]
    fn help_needs_no_session() {
        match plan(&words(&["help", "getfile"])) {
            Ok(Plan::Help(text)) => assert!(text.starts_with("getfile"), "{text}"),
            other => panic!("{other:?}"),
        }
    }
}
