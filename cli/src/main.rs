//! `kubectl-liveresponse`: the analyst's console, installed as a kubectl plugin so that
//! `kubectl liveresponse ...` runs it.
//!
//! It talks only to the Kubernetes API server, with the analyst's own kubeconfig
//! credentials, never to an agent or to the operator directly. Everything it does is an
//! ordinary API call on the `liveresponse.io` resources: it lists Devices, creates a
//! LiveResponseSession (stamped with the caller's name from a SelfSubjectReview) and
//! Commands, watches their `status` until the operator reports a phase, and merge-patches
//! `spec.state: Disconnected` / `spec.cancel: true`. So RBAC decides what the analyst may
//! do, admission policies may refuse a command (their message is shown as is), and the
//! API server's audit log plus the Command objects are the record of the session.

mod batch;
mod client;
mod connect;
mod console;
mod devices;
mod disconnect;
mod download;
mod error;
mod exec;
mod library;
mod log;
mod render;
mod run;
mod sanitize;
mod session;
mod sessions;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{Ctx, Target};
use crate::error::{EXIT_FAILED, EXIT_OK, Result};
use crate::render::{Colors, Format};

const AFTER_HELP: &str = "\
In the console (connect), type 'help' for the device commands. Ctrl+C cancels the running
command on the device and keeps the console; Ctrl+D or 'exit' ends the session.

Exit status: 0 success; 1 the command failed, was cancelled or timed out, the session was
rejected, or the API server refused or could not be reached; 2 the command line is wrong
(nothing was created); 130 you stopped waiting with Ctrl+C.";

/// Live response for Kubernetes: investigate and remediate a device from your terminal.
///
/// Sessions and commands are Kubernetes resources; this tool creates and watches them
/// with your kubeconfig credentials.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-liveresponse",
    bin_name = "kubectl liveresponse",
    version,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// Namespace (tenant) of the devices and sessions (default: the context's namespace).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Never colour the output (also: NO_COLOR=1).
    #[arg(long, global = true)]
    no_color: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the enrolled devices: hostname, OS, connected, last seen, active session.
    Devices {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// The sessions dashboard: requester, device, phase, start and duration.
    Sessions {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// The command log of a session: id, command line, phase, duration.
    Log {
        /// Name of the session.
        session: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// End a session.
    Disconnect {
        /// Name of the session.
        session: String,
    },
    /// Open a session with a device and start the interactive console.
    Connect(connect::ConnectArgs),
    /// Run one command on a device and print its output; exits non-zero when it fails.
    Exec(exec::ExecArgs),
    /// Manage the namespace's library of scripts for run and putfile.
    #[command(subcommand)]
    Library(LibraryCmd),
    /// Run one command on many devices at once (a BatchCommand) and read the results.
    #[command(subcommand)]
    Batch(BatchCmd),
    /// Download the file a getfile brought back, or a command's whole output (resumes,
    /// verifies its sha256).
    Download {
        /// Name of the Command (`kubectl liveresponse log SESSION` shows them).
        command: String,
        /// Where to write it (default: the file's name, or COMMAND.txt / .json for an
        /// output, in the current folder).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The command's whole output, kept when it outgrew status.output (64 KiB).
        #[arg(long)]
        full_output: bool,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BatchCmd {
    /// Run a command on every device a label selector or a name picks, e.g.
    /// `batch create -l role=web -- processes -name sshd`.
    Create(batch::CreateArgs),
    /// List the batches, or show one: phase and how many devices are where.
    Get {
        /// Name of a batch (default: all of the namespace).
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Every device's records in one table with a DEVICE column (or JSON lines with
    /// `-o json`), then the devices that did not succeed. Exits 1 unless all succeeded.
    Results {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Stop a batch: running devices are cancelled, waiting ones never start.
    Cancel { name: String },
}

#[derive(Debug, Subcommand)]
enum LibraryCmd {
    /// Upload a script through the file API and name it in a LibraryFile; waits for the
    /// operator to check it (size, sha256, signature).
    Upload {
        /// The file to upload.
        file: PathBuf,
        /// LibraryFile name (default: from the file name).
        #[arg(long)]
        name: Option<String>,
        /// SSH signature (`ssh-keygen -Y sign -n liveresponse.io -f KEY FILE` writes FILE.sig).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// What the script does, shown by `library`.
        #[arg(long)]
        description: Option<String>,
        /// Make it a rule file for analyze and scan: `yara` (YARA rules) or `sha256` (a
        /// list of malicious SHA-256 digests).
        #[arg(long, value_parser = ["yara", "sha256"])]
        analysis: Option<String>,
    },
}

/// Rust ignores SIGPIPE, which turns `kubectl liveresponse log S -o json | head` into a
/// panic at the next print; a command-line tool should just stop, as kubectl does.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: runs first in main, before any other thread exists, and SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    default_sigpipe();
    let cli = Cli::parse();
    // kube's rustls may be built with more than one crypto provider in the workspace;
    // say which one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            return ExitCode::from(EXIT_FAILED as u8);
        }
    };
    let code = match runtime.block_on(run(&cli)) {
        Ok(code) => code,
        Err(err) => {
            // An error may quote the API server, the agent or another user's object.
            eprintln!(
                "{} {}",
                Colors::stderr(cli.no_color).red("error:"),
                sanitize::text(&err.to_string())
            );
            err.exit_code()
        }
    };
    // Background watches and a readline thread may still be parked; do not wait for them.
    runtime.shutdown_background();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn run(cli: &Cli) -> Result<i32> {
    let target = Target {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
        namespace: cli.namespace.clone(),
    };
    let colors = Colors::stdout(cli.no_color);
    // exec parses its command line before it needs a client.
    if let Cmd::Exec(args) = &cli.command {
        return exec::run(&target, args, cli.no_color).await;
    }
    let ctx = Ctx::new(&target).await?;
    match &cli.command {
        Cmd::Devices { output } => devices::run(&ctx, *output, colors).await?,
        Cmd::Sessions { output } => sessions::run(&ctx, *output, colors).await?,
        Cmd::Log { session, output } => log::run(&ctx, session, *output, colors).await?,
        Cmd::Disconnect { session } => disconnect::run(&ctx, session).await?,
        Cmd::Connect(args) => return connect::run(&ctx, args, cli.no_color).await,
        Cmd::Library(LibraryCmd::Upload {
            file,
            name,
            signature,
            description,
            analysis,
        }) => {
            library::upload(
                &ctx,
                &library::Upload {
                    file,
                    name: name.as_deref(),
                    signature: signature.as_deref(),
                    description: description.as_deref(),
                    analysis: analysis.as_deref().and_then(library::analysis_of),
                },
            )
            .await?
        }
        Cmd::Download {
            command,
            output,
            full_output,
            quiet,
        } => download::run(&ctx, command, output.as_deref(), *full_output, *quiet).await?,
        Cmd::Batch(BatchCmd::Create(args)) => return batch::create(&ctx, args, colors).await,
        Cmd::Batch(BatchCmd::Get { name, output }) => {
            batch::get(&ctx, name.as_deref(), *output, colors).await?
        }
        Cmd::Batch(BatchCmd::Results { name, output }) => {
            return batch::results(&ctx, name, *output, colors).await;
        }
        Cmd::Batch(BatchCmd::Cancel { name }) => batch::cancel(&ctx, name).await?,
        Cmd::Exec(_) => {}
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_the_double_dash() {
        let cli = match Cli::try_parse_from([
            "kubectl-liveresponse",
            "-n",
            "team-a",
            "exec",
            "host-1",
            "--keep-session",
            "--",
            "processes",
            "-name",
            "sshd",
        ]) {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cli.namespace.as_deref(), Some("team-a"));
        match cli.command {
            Cmd::Exec(args) => {
                assert_eq!(args.device, "host-1");
                assert!(args.keep_session);
                assert_eq!(args.command, ["processes", "-name", "sshd"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn listings_take_output_json() {
        match Cli::try_parse_from(["k", "log", "s-1", "-o", "json", "--no-color"]) {
            Ok(Cli {
                command: Cmd::Log { session, output },
                no_color,
                ..
            }) => {
                assert_eq!(session, "s-1");
                assert_eq!(output, Format::Json);
                assert!(no_color);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["k", "devices", "-o", "yaml"]).is_err());
    }
}
