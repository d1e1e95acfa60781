//! The Linux provider: one module per command family.
//!
//! Host files (configuration, home directories, the tree findfile walks) are read below
//! `host_root` through [`hostfs::HostFs`]. Kernel state (processes, sockets, modules) is
//! read from the agent's own `/proc`, which is the host's when the agent runs with
//! `hostPID` and the host network, as the DaemonSet does.

use liveresponse_api::command::Invocation;
use serde::Serialize;

use super::{CommandResult, ExecContext, ExecError, OpenedFile, Provider};

mod analyze;
mod collect;
mod files;
mod hostfs;
pub mod isolate;
mod network;
mod persistence;
mod processes;
mod remediate;
mod scripts;
mod system;

#[cfg(test)]
mod fuzz;

pub(crate) use hostfs::read_small_host_file;

/// The device commands this provider implements so far, all with `Handler::Provider` in
/// the registry (a test checks it); the registry says who answers the others.
const COMMANDS: &[&str] = &[
    "analyze",
    "cd",
    "collect",
    "connections",
    "dir",
    "drivers",
    "fileinfo",
    "findfile",
    "getfile",
    "isolate",
    "persistence",
    "processes",
    "putfile",
    "release",
    "remediate",
    "remediate list",
    "run",
    "scan",
    "scheduledtasks",
    "services",
    "startupfolders",
    "undo",
];

#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxProvider;

impl LinuxProvider {
    pub fn new() -> Self {
        LinuxProvider
    }
}

impl Provider for LinuxProvider {
    fn os(&self) -> &'static str {
        "linux"
    }

    fn capabilities(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn open_file(&self, ctx: &ExecContext, path: &str) -> Result<OpenedFile, ExecError> {
        files::open_for_transfer(ctx, path)
    }

    fn collect(&self, ctx: &ExecContext, out: &std::path::Path) -> Result<(), ExecError> {
        collect::build(self, ctx, out)
    }

    fn run_script(
        &self,
        ctx: &ExecContext,
        script: &std::path::Path,
        params: &[String],
        cwd: &std::path::Path,
        max_output: usize,
    ) -> Result<CommandResult, ExecError> {
        scripts::run_script(ctx, script, params, cwd, max_output)
    }

    fn execute(&self, ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
        ctx.check()?;
        let mut result = match inv.spec.name {
            "cd" => files::cd(ctx, inv),
            "dir" => files::dir(ctx, inv),
            "fileinfo" => files::fileinfo(ctx, inv),
            "findfile" => files::findfile(ctx, inv),
            "processes" => processes::processes(ctx, inv),
            "connections" => network::connections(ctx),
            "drivers" => system::drivers(ctx),
            "services" => system::services(ctx, inv),
            "scheduledtasks" => persistence::scheduledtasks(ctx, inv),
            "startupfolders" => persistence::startupfolders(ctx),
            "persistence" => persistence::persistence(ctx),
            "analyze" => analyze::analyze(ctx, inv),
            "scan" => analyze::scan(ctx, inv),
            "remediate" => remediate::remediate(ctx, inv),
            "remediate list" => remediate::list(ctx),
            "undo" => remediate::undo(ctx, inv),
            "isolate" => isolate::isolate(ctx, inv.has_flag("allow_dns")),
            "release" => isolate::release(ctx),
            // Streamed by the executor through open_file, not answered as records.
            "getfile" | "putfile" | "run" | "collect" => Err(ExecError::Failed(format!(
                "{} is carried out by the agent's executor",
                inv.spec.name
            ))),
            other => Err(ExecError::NotSupported {
                command: other.to_owned(),
                os: "linux".to_owned(),
            }),
        }?;
        result.warnings.extend(ctx.take_notes());
        Ok(result)
    }
}

/// Records from typed rows, so that every command's keys are spelled in one place.
pub(crate) fn to_records<T: Serialize>(rows: &[T]) -> Result<Vec<serde_json::Value>, ExecError> {
    rows.iter()
        .map(|row| {
            serde_json::to_value(row)
                .map_err(|e| ExecError::Failed(format!("cannot encode a record: {e}")))
        })
        .collect()
}

/// A required parameter; the parser enforces presence, this only keeps the provider from
/// trusting that blindly.
pub(crate) fn required<'a>(inv: &'a Invocation, name: &str) -> Result<&'a str, ExecError> {
    inv.get(name)
        .ok_or_else(|| ExecError::InvalidArgument(format!("{} needs a {name}", inv.spec.name)))
}

/// An optional whole-number parameter.
pub(crate) fn number(inv: &Invocation, name: &str) -> Result<Option<u64>, ExecError> {
    inv.get(name)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ExecError::InvalidArgument(format!("-{name} must be a whole number, not {v:?}"))
            })
        })
        .transpose()
}

/// "a, b, c and 4 more": keeps warnings short when many things were skipped.
pub(crate) fn summarize(items: &[String], total: usize, shown: usize) -> String {
    let mut text = items
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if total > shown {
        text.push_str(&format!(" and {} more", total - shown));
    }
    text
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use liveresponse_api::command::{Invocation, parse_command};

    use crate::provider::{CommandResult, ExecContext, ExecError, Provider};

    use super::LinuxProvider;

    pub(crate) fn inv(command: &str, args: &[&str]) -> Invocation {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        match parse_command(command, &args) {
            Ok(inv) => inv,
            Err(e) => panic!("{command} {args:?} does not parse: {e}"),
        }
    }

    pub(crate) fn run(
        ctx: &ExecContext,
        command: &str,
        args: &[&str],
    ) -> Result<CommandResult, ExecError> {
        LinuxProvider::new().execute(ctx, &inv(command, args))
    }

    pub(crate) fn ctx(root: &Path) -> ExecContext {
        ExecContext::new(root)
    }

    /// Every record carries every table column of the command.
    pub(crate) fn assert_columns(command: &str, result: &CommandResult) {
        let spec = liveresponse_api::command::find(command).unwrap();
        for record in &result.records {
            let object = record.as_object().unwrap();
            for column in spec.columns {
                assert!(
                    object.contains_key(column.key),
                    "{command}: record {record} lacks column {}",
                    column.key
                );
            }
        }
    }

    pub(crate) fn write(root: &Path, device: &str, content: &str) {
        let path = root.join(device.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, content).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn registry_is_not_supported() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&ctx(dir.path()), "registry", &[]).unwrap_err();
        assert_eq!(err.reason(), "NotSupported");
        assert_eq!(err.to_string(), "registry is not supported on linux");
    }

    #[test]
    fn capabilities_are_registry_commands_for_linux() {
        let provider = LinuxProvider::new();
        assert_eq!(provider.os(), "linux");
        for name in provider.capabilities() {
            let spec = liveresponse_api::command::find(name).unwrap();
            assert!(spec.supports(liveresponse_api::command::Platform::Linux));
            // Advanced verbs are the ones that move or change things, or read any file.
            assert!(
                spec.tier == liveresponse_api::command::Tier::Basic
                    || [
                        "analyze",
                        "scan",
                        "collect",
                        "getfile",
                        "isolate",
                        "release",
                        "putfile",
                        "run",
                        "remediate",
                        "remediate list",
                        "undo"
                    ]
                    .contains(&name),
                "{name} is advanced"
            );
            assert_eq!(
                spec.handler,
                liveresponse_api::command::Handler::Provider,
                "{name} is not the provider's to answer"
            );
        }
        assert!(!provider.capabilities().contains(&"registry"));
    }

    #[test]
    fn cancelled_before_start() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        ctx.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(run(&ctx, "dir", &[]), Err(ExecError::Cancelled)));
    }
}
