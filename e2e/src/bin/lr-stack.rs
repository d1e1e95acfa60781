//! `lr-stack up|down`: the demo's start-up, the same code the end-to-end tests use. `up`
//! brings up the local control plane, installs the API, creates the `demo` namespace with
//! live response enabled, starts the operator and an agent for this machine, and waits until
//! its Device is connected. Both are idempotent; `down` stops exactly what `up` started.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use e2e::Cluster;
use e2e::stack::Stack;

const NAMESPACE: &str = "demo";

fn state() -> PathBuf {
    std::env::var_os("LR_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::repo_root().join("e2e/.state/cluster"))
}

/// This machine's name as a Device name (a DNS label).
fn device_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = host
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "this-machine".into()
    } else {
        name
    }
}

fn up() -> anyhow::Result<()> {
    let cluster = Cluster::up(&state())?;
    let stack = Stack::up(cluster)?;
    stack.tenant(NAMESPACE, "")?;
    let device = device_name();
    stack.start_agent(NAMESPACE, &device, std::path::Path::new("/"), &[])?;
    stack.wait_device(NAMESPACE, &device, true, Duration::from_secs(60))?;
    println!(
        "live response is up: operator, and an agent for this machine enrolled as device {device}"
    );
    println!(
        "export KUBECONFIG={}",
        stack.cluster.kubeconfig("admin").display()
    );
    println!("namespace: {NAMESPACE}");
    println!("device: {device}");
    println!("logs and pid files: {}", stack.dir.display());
    Ok(())
}

fn down() -> anyhow::Result<()> {
    let state = state();
    if state.join("stack").exists() {
        let stack = Stack {
            cluster: Cluster {
                state: state.clone(),
                bin: PathBuf::new(),
            },
            dir: state.join("stack"),
            children: Default::default(),
        };
        stack.down()?;
    }
    let out = std::process::Command::new(e2e::cluster_script())
        .arg("down")
        .env("LR_STATE_DIR", &state)
        .status()?;
    if !out.success() {
        anyhow::bail!("e2e/cluster.sh down failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let verb = std::env::args().nth(1).unwrap_or_default();
    let r = match verb.as_str() {
        "up" => up(),
        "down" => down(),
        "device" => {
            println!("{}", device_name());
            Ok(())
        }
        _ => {
            eprintln!("usage: lr-stack up|down|device");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lr-stack: {e:#}");
            ExitCode::FAILURE
        }
    }
}
