//! The simulated device's provider (`lr-sim-agents`): a small fixed fixture, answered at
//! once, so a benchmark measures the control plane and not the host it runs on.

use liveresponse_api::command::Invocation;

use crate::provider::{CommandResult, ExecContext, ExecError, Provider};

/// What the simulated provider answers `processes` with.
pub const FIXTURE_PROCESSES: [(u32, u32, &str, &str, u64, &str); 3] = [
    (1, 0, "systemd", "root", 12_582_912, "/sbin/init"),
    (
        421,
        1,
        "sshd",
        "root",
        7_340_032,
        "sshd: /usr/sbin/sshd -D [listener]",
    ),
    (4242, 421, "bash", "analyst", 5_242_880, "-bash --login"),
];

/// Answers from the fixture at once; every other verb gets a plain refusal.
pub struct SimProvider;

impl Provider for SimProvider {
    fn os(&self) -> &'static str {
        "linux"
    }

    fn capabilities(&self) -> Vec<&'static str> {
        vec!["processes"]
    }

    fn execute(&self, _ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
        if inv.spec.name != "processes" {
            return Err(ExecError::NotSupported {
                command: inv.spec.name.to_owned(),
                os: "the simulated agent (it answers only processes)".to_owned(),
            });
        }
        let pid =
            match inv.get("pid") {
                Some(p) => Some(p.parse::<u64>().map_err(|_| {
                    ExecError::InvalidArgument(format!("-pid {p:?} is not a number"))
                })?),
                None => None,
            };
        let name = inv.get("name").map(str::to_lowercase);
        let records: Vec<serde_json::Value> = FIXTURE_PROCESSES
            .iter()
            .filter(|p| pid.is_none_or(|want| u64::from(p.0) == want))
            .filter(|p| name.as_deref().is_none_or(|n| p.2 == n))
            .map(|(pid, ppid, name, user, memory, cmd)| {
                serde_json::json!({
                    "pid": pid, "ppid": ppid, "name": name, "user": user,
                    "memory": memory, "commandLine": cmd,
                })
            })
            .collect();
        if let Some(pid) = pid
            && records.is_empty()
        {
            return Err(ExecError::NotFound(format!("no process with pid {pid}")));
        }
        Ok(CommandResult::with_records(records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::command::parse_command;

    fn run(line: &str) -> Result<CommandResult, ExecError> {
        let mut words = line.split_whitespace();
        let verb = words.next().expect("a verb");
        let args: Vec<String> = words.map(str::to_string).collect();
        let inv = parse_command(verb, &args).expect("parses");
        SimProvider.execute(&ExecContext::new("/"), &inv)
    }

    #[test]
    fn processes_come_from_the_fixture_and_filter() {
        let all = run("processes").expect("processes");
        assert_eq!(all.records.len(), FIXTURE_PROCESSES.len());
        let one = run("processes -name SSHD").expect("by name");
        assert_eq!(one.records.len(), 1);
        assert_eq!(one.records[0]["pid"], 421);
        assert!(matches!(
            run("processes -pid 7"),
            Err(ExecError::NotFound(_))
        ));
        let other = run("connections").expect_err("not simulated");
        assert!(other.to_string().contains("simulated agent"), "{other}");
    }
}
