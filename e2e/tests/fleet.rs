//! The simulated fleet (`lr-sim-agents`, issue 12): simulated devices enroll and connect as
//! real agents do, and answer through the real pipeline from their fixture. This keeps the
//! benchmark's simulator honest in CI at the cost of ten devices.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::lr::{self, Cmd};
use liveresponse_agent::sim::FIXTURE_PROCESSES;
use liveresponse_api::crd::{CommandPhase, SessionPhase};

use crate::Env;

const T: Duration = Duration::from_secs(60);
const SIMS: usize = 10;

pub async fn simulated_agents_answer_from_their_fixture(env: &'static Env) -> Result<()> {
    let ns = "lr-sim-fleet";
    let name = "sims-fleet";
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.start_sim_agents(name, ns, 1, SIMS, &[], &[])?;
    let result = async {
        for i in 1..=SIMS {
            s.wait_device(ns, &format!("sim-{i:05}"), true, T)
                .with_context(|| format!("lr-sim-agents log:\n{}", s.tail(name)))?;
        }
        let client = env.cluster.client("analyst-advanced").await?;
        lr::open_session(&client, ns, "s7", "sim-00007", "analyst-advanced", None).await?;
        lr::wait_session(&client, ns, "s7", SessionPhase::Connected, T).await?;

        let c = Cmd::new("s7", "processes", &[])
            .json()
            .run(&client, ns, "ps")
            .await?;
        lr::succeeded(&c)?;
        let rows = lr::records(&c)?;
        let got: Vec<(u64, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r["pid"].as_u64().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default().to_string(),
                    r["commandLine"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let want: Vec<(u64, String, String)> = FIXTURE_PROCESSES
            .iter()
            .map(|p| (u64::from(p.0), p.2.to_string(), p.5.to_string()))
            .collect();
        ensure!(
            got == want,
            "processes on a simulated device: {got:?}, want {want:?}"
        );

        let c = Cmd::new("s7", "processes", &["-name", "sshd"])
            .json()
            .run(&client, ns, "ps-sshd")
            .await?;
        let rows = lr::records(&c)?;
        ensure!(
            rows.len() == 1 && rows[0]["pid"].as_u64() == Some(421),
            "processes -name sshd: {rows:?}"
        );

        // Anything beyond the fixture is refused in words, not answered with nothing (the
        // operator already refuses what the hello's capabilities leave out).
        let c = Cmd::new("s7", "connections", &[])
            .run(&client, ns, "conn")
            .await?;
        ensure!(
            lr::phase(&c) == Some(CommandPhase::Failed),
            "connections on a simulated device ended {:?}",
            lr::phase(&c)
        );
        let why = lr::error(&c).map(|e| e.message).unwrap_or_default();
        ensure!(
            why.contains("not implemented by this agent") || why.contains("not supported"),
            "connections: {why:?}"
        );
        Ok(())
    }
    .await;
    s.stop_sim_agents(name);
    result
}
