//! The live response stack on a local control plane: the API installed, the operator and
//! agents running as processes with pid files and logs in a state folder. `make demo-up`
//! (through the `lr-stack` binary) and the end-to-end tests both start it with this code.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Cluster;

/// Namespace of the operator itself (CA Secret, leader Lease).
pub const OPERATOR_NAMESPACE: &str = "liveresponse-system";

/// A started stack.
pub struct Stack {
    pub cluster: Cluster,
    /// Pid files, logs, agent state, bootstrap tokens.
    pub dir: PathBuf,
    /// Processes this `Stack` value started, to learn how one exited.
    pub children: std::sync::Mutex<Vec<(String, std::process::Child)>>,
}

/// Where cargo put the binaries (`make build` / `cargo build --bins`). `LR_PROFILE=release`
/// picks the optimised ones (`cargo build --release`), which a benchmark needs; anything
/// else, or nothing, the debug ones the tests and the demo use.
pub fn target_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    target.join(profile_dir()).join(name)
}

/// The folder under the target directory that `LR_PROFILE` names. Only `release` leaves
/// `debug`: a typo must not send the tests to a stale or missing folder.
pub fn profile_dir() -> &'static str {
    match std::env::var("LR_PROFILE").as_deref() {
        Ok("release") => "release",
        _ => "debug",
    }
}

/// The address the file API listens on: the API server must reach it, and Endpoints refuse
/// loopback addresses, so it is a routable address of this machine. A veth pair gives one
/// that no network owns (what a pod IP is, without a kubelet); without the privilege to
/// add it, the machine's first global address serves.
const FILES_IP: &str = "10.254.254.1";
const FILES_IF: &str = "lr-files0";

fn files_ip() -> Result<String> {
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                )
            })
    };
    let (_, shown) = ip(&["-4", "-o", "addr", "show", "dev", FILES_IF]).unwrap_or_default();
    if shown.contains(FILES_IP) {
        return Ok(FILES_IP.into());
    }
    let made = ip(&[
        "link",
        "add",
        FILES_IF,
        "type",
        "veth",
        "peer",
        "name",
        "lr-files1",
    ])
    .is_ok_and(|r| r.0)
        && ip(&["link", "set", "lr-files1", "up"]).is_ok_and(|r| r.0)
        && ip(&["addr", "add", &format!("{FILES_IP}/32"), "dev", FILES_IF]).is_ok_and(|r| r.0)
        && ip(&["link", "set", FILES_IF, "up"]).is_ok_and(|r| r.0);
    if made {
        return Ok(FILES_IP.into());
    }
    let (_, global) = ip(&["-4", "-o", "addr", "show", "scope", "global"])
        .context("running `ip` (Debian's iproute2) to find an address for the file API")?;
    global
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .context("no routable IPv4 address for the file API: could not add a veth pair (needs CAP_NET_ADMIN) and the machine has no global address")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether the pid in `file` runs `exe` (a recycled pid belongs to another program).
fn pid_alive(file: &Path, exe: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie is as good as gone.
    if stat.contains(") Z ") {
        return None;
    }
    (link
        .file_name()?
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        == exe)
        .then_some(pid)
}

fn kill(pid: u32, signal: &str) {
    let _ = Proc::new("kill").args([signal, &pid.to_string()]).status();
}

impl Stack {
    /// Installs the API and starts the operator unless it already runs (idempotent).
    pub fn up(cluster: Cluster) -> Result<Self> {
        let dir = cluster.state.join("stack");
        std::fs::create_dir_all(&dir)?;
        let stack = Self {
            cluster,
            dir,
            children: Default::default(),
        };
        for bin in ["liveresponse-operator", "liveresponse-agent"] {
            if !target_bin(bin).exists() {
                let how = if profile_dir() == "release" {
                    "`cargo build --release --workspace --bins`"
                } else {
                    "`cargo build --bins` (or `make build`)"
                };
                bail!(
                    "{} is not built: run {how} first",
                    target_bin(bin).display()
                );
            }
        }
        stack.install_api()?;
        stack
            .cluster
            .kubectl_ok(
                "admin",
                &[
                    "create",
                    "namespace",
                    OPERATOR_NAMESPACE,
                    "--dry-run=client",
                    "-o",
                    "yaml",
                ],
                None,
            )
            .and_then(|y| {
                stack
                    .cluster
                    .kubectl_ok("admin", &["apply", "-f", "-"], Some(&y))
            })?;
        stack.start_operator()?;
        Ok(stack)
    }

    /// Applies CRDs, roles and admission policies and waits until discovery serves them.
    pub fn install_api(&self) -> Result<()> {
        let root = crate::repo_root();
        let c = &self.cluster;
        // The kustomize bases, as a platform engineer applies them.
        for (flag, p) in [
            ("-f", "crds"),
            ("-k", "config/rbac"),
            ("-k", "config/admission"),
        ] {
            c.kubectl_ok(
                "admin",
                &["apply", flag, &root.join(p).to_string_lossy()],
                None,
            )?;
        }
        c.kubectl_ok(
            "admin",
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "-f",
                &root.join("crds").to_string_lossy(),
            ],
            None,
        )?;
        // Ready means a Command passes admission: discovery serves the kinds, and the
        // mutating policy can type its objects (it resolves CRD schemas a little later).
        let probe = "apiVersion: liveresponse.io/v1alpha1\nkind: Command\nmetadata: {name: probe, namespace: default}\nspec: {session: probe, command: processes}\n---\napiVersion: liveresponse.io/v1alpha1\nkind: BatchCommand\nmetadata: {name: probe, namespace: default}\nspec: {devices: [probe], command: processes}\n";
        let mut last = String::new();
        for _ in 0..150 {
            let out = c.kubectl(
                "admin",
                &["create", "--dry-run=server", "-f", "-"],
                Some(probe),
            )?;
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the live response API never became ready: {last}")
    }

    fn pidfile(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    /// Log file of a process of the stack.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn spawn(&self, name: &str, exe: &Path, args: &[String]) -> Result<u32> {
        self.spawn_env(name, exe, args, &[])
    }

    fn spawn_env(
        &self,
        name: &str,
        exe: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))?;
        let child = Proc::new(exe)
            .args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig("admin"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: it outlives `make demo-up` and ^C in that terminal.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        std::fs::write(self.pidfile(name), child.id().to_string())?;
        let pid = child.id();
        if let Ok(mut c) = self.children.lock() {
            c.push((name.to_string(), child));
        }
        Ok(pid)
    }

    /// How a process started by this `Stack` ended, if it did.
    fn exit_status(&self, name: &str) -> String {
        let Ok(mut children) = self.children.lock() else {
            return String::new();
        };
        children
            .iter_mut()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.try_wait().ok().flatten())
            .map(|st| format!(" ({st})"))
            .unwrap_or_default()
    }

    /// The gateway URL agents connect to.
    pub fn gateway(&self) -> Result<String> {
        let port = std::fs::read_to_string(self.dir.join("gateway.port"))
            .context("the operator was never started")?;
        Ok(format!("https://127.0.0.1:{}", port.trim()))
    }

    /// The operator's /metrics URL.
    pub fn metrics_url(&self) -> Result<String> {
        let port = std::fs::read_to_string(self.dir.join("metrics.port"))
            .context("the operator was never started")?;
        Ok(format!("http://127.0.0.1:{}/metrics", port.trim()))
    }

    /// The CA agents pin (the operator writes it on start).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Pid of the running operator, if any.
    /// The operator's artifact store (a local directory).
    pub fn artifact_dir(&self) -> PathBuf {
        self.dir.join("artifacts")
    }

    /// The Service and EndpointSlice the API server reaches the file API through (the
    /// operator registers the APIService itself).
    fn publish_files_api(&self, addr: &str) -> Result<()> {
        let (ip, port) = addr.rsplit_once(':').context("files address")?;
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: liveresponse-files, namespace: {OPERATOR_NAMESPACE}}}\nspec:\n  ports: [{{name: https, port: 443, targetPort: {port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: liveresponse-files\n  namespace: {OPERATOR_NAMESPACE}\n  labels: {{kubernetes.io/service-name: liveresponse-files, endpointslice.kubernetes.io/managed-by: liveresponse-e2e}}\naddressType: IPv4\nendpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}]\nports: [{{name: https, port: {port}, protocol: TCP}}]\n"
        );
        self.cluster
            .kubectl_ok("admin", &["apply", "-f", "-"], Some(&yaml))?;
        Ok(())
    }

    pub fn operator_pid(&self) -> Option<u32> {
        pid_alive(&self.pidfile("operator"), "liveresponse-operator")
    }

    /// Starts the operator (a no-op when it runs) and waits until its gateway accepts.
    pub fn start_operator(&self) -> Result<()> {
        self.start_operator_with(&[])
    }

    /// [`Stack::start_operator`] with extra flags (another artifact store, say).
    pub fn start_operator_with(&self, extra: &[String]) -> Result<()> {
        self.start_operator_env(extra, &[])
    }

    /// [`Stack::start_operator_with`], with extra environment (credentials, say).
    pub fn start_operator_env(&self, extra: &[String], env: &[(String, String)]) -> Result<()> {
        if self.operator_pid().is_some() {
            return Ok(());
        }
        // Keep ports across restarts, so agents find the gateway where it was.
        let port = |f: &str| -> Result<u16> {
            match std::fs::read_to_string(self.dir.join(f)) {
                Ok(p) => Ok(p.trim().parse()?),
                Err(_) => {
                    let p = free_port()?;
                    std::fs::write(self.dir.join(f), p.to_string())?;
                    Ok(p)
                }
            }
        };
        let (gw, metrics) = (port("gateway.port")?, port("metrics.port")?);
        let files = format!("{}:{}", files_ip()?, port("files.port")?);
        self.publish_files_api(&files)?;
        let args = vec![
            "--namespace".into(),
            OPERATOR_NAMESPACE.into(),
            "--gateway-addr".into(),
            format!("127.0.0.1:{gw}"),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
            "--ca-out".into(),
            self.ca_file().to_string_lossy().into_owned(),
            "--instance".into(),
            "operator-0".into(),
            "--artifact-dir".into(),
            self.artifact_dir().to_string_lossy().into_owned(),
            "--files-addr".into(),
            files,
            "--artifact-gc-interval-seconds".into(),
            "2".into(),
            "--artifact-gc-grace-seconds".into(),
            "20".into(),
        ];
        let mut args = args;
        // Tests want a disconnection seen quickly; a benchmark may ask for the default.
        if !extra.iter().any(|a| a == "--heartbeat-seconds") {
            args.extend(["--heartbeat-seconds".into(), "2".into()]);
        }
        args.extend(extra.iter().cloned());
        let _ = std::fs::remove_file(self.ca_file());
        let start = || -> Result<()> {
            self.spawn_env("operator", &target_bin("liveresponse-operator"), &args, env)?;
            // The lease of a killed predecessor must expire first (15 s at most).
            self.wait(
                "the operator's gateway",
                Duration::from_secs(60),
                "operator",
                || {
                    Ok(self.ca_file().exists()
                        && std::net::TcpStream::connect(("127.0.0.1", gw)).is_ok())
                },
            )
        };
        // One retry, loudly: a start-up that fails twice is a real failure.
        start().or_else(|e| {
            eprintln!("stack: the operator did not start ({e:#}); trying once more");
            start()
        })
    }

    /// Starts a second operator replica (own ports, instance `operator-1`); it must wait for
    /// the Lease while the first one leads. Returns its log file.
    pub fn start_standby_operator(&self) -> Result<PathBuf> {
        let args = vec![
            "--namespace".into(),
            OPERATOR_NAMESPACE.into(),
            "--gateway-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--instance".into(),
            "operator-1".into(),
            "--artifact-dir".into(),
            self.dir
                .join("artifacts-standby")
                .to_string_lossy()
                .into_owned(),
        ];
        self.spawn(
            "operator-standby",
            &target_bin("liveresponse-operator"),
            &args,
        )?;
        Ok(self.log("operator-standby"))
    }

    /// Stops the standby replica.
    pub fn stop_standby_operator(&self) {
        if let Some(pid) = pid_alive(&self.pidfile("operator-standby"), "liveresponse-operator") {
            kill(pid, "-KILL");
            self.wait_gone(pid);
        }
    }

    /// Kills the operator (SIGKILL: a crash, not a clean stop).
    pub fn kill_operator(&self) {
        if let Some(pid) = self.operator_pid() {
            kill(pid, "-KILL");
            self.wait_gone(pid);
        }
    }

    fn wait_gone(&self, pid: u32) {
        for _ in 0..100 {
            let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if gone {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        proc_name: &str,
        mut ok: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if ok()? {
                return Ok(());
            }
            let exe = if proc_name == "operator" {
                "liveresponse-operator"
            } else {
                "liveresponse-agent"
            };
            if pid_alive(&self.pidfile(proc_name), exe).is_none() {
                bail!(
                    "{proc_name} exited{} while waiting for {what}; its log:\n{}",
                    self.exit_status(proc_name),
                    self.tail(proc_name)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out waiting for {what}; {proc_name} log:\n{}",
                    self.tail(proc_name)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of a process's log.
    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A tenant namespace with live response enabled (plus `settings` YAML fields merged into
    /// the spec), the example role bindings and a bootstrap token.
    pub fn tenant(&self, ns: &str, extra_settings: &str) -> Result<()> {
        let c = &self.cluster;
        let y = c.kubectl_ok(
            "admin",
            &["create", "namespace", ns, "--dry-run=client", "-o", "yaml"],
            None,
        )?;
        c.kubectl_ok("admin", &["apply", "-f", "-"], Some(&y))?;
        let bindings =
            std::fs::read_to_string(crate::repo_root().join("config/rbac/bindings-example.yaml"))?
                .replace("NAMESPACE", ns);
        c.kubectl_ok("admin", &["apply", "-f", "-"], Some(&bindings))?;
        let settings = format!(
            "apiVersion: liveresponse.io/v1alpha1\nkind: LiveResponseSettings\nmetadata: {{name: default, namespace: {ns}}}\nspec:\n  enabled: true\n{extra_settings}"
        );
        c.kubectl_ok("admin", &["apply", "-f", "-"], Some(&settings))?;
        self.bootstrap_token(ns)?;
        Ok(())
    }

    /// Creates (once) the namespace's bootstrap token Secret and returns its file.
    pub fn bootstrap_token(&self, ns: &str) -> Result<PathBuf> {
        let file = self.dir.join(format!("{ns}.token"));
        if file.exists() {
            return Ok(file);
        }
        let token = format!("{:032x}", rand_u128());
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: liveresponse-bootstrap\n  namespace: {ns}\n  labels: {{liveresponse.io/bootstrap-token: \"true\"}}\nstringData: {{token: \"{token}\"}}\n"
        );
        self.cluster
            .kubectl_ok("admin", &["apply", "-f", "-"], Some(&secret))?;
        std::fs::write(&file, &token)?;
        Ok(file)
    }

    fn agent_name(ns: &str, device: &str) -> String {
        format!("agent-{ns}-{device}")
    }

    /// The state folder (key, certificate) of an agent.
    pub fn agent_dir(&self, ns: &str, device: &str) -> PathBuf {
        self.dir.join(Self::agent_name(ns, device))
    }

    /// Pid of a running agent.
    pub fn agent_pid(&self, ns: &str, device: &str) -> Option<u32> {
        pid_alive(
            &self.pidfile(&Self::agent_name(ns, device)),
            "liveresponse-agent",
        )
    }

    /// Starts an agent for this machine as `device` in `ns` (enrolling it on first start),
    /// reading host files under `host_root`. A no-op when it runs.
    pub fn start_agent(
        &self,
        ns: &str,
        device: &str,
        host_root: &Path,
        extra: &[&str],
    ) -> Result<()> {
        self.start_agent_via(ns, device, host_root, &self.gateway()?, extra)
    }

    /// [`Stack::start_agent`], with the agent dialing `gateway` (a proxy in front of the
    /// real gateway, say) instead of [`Stack::gateway`].
    pub fn start_agent_via(
        &self,
        ns: &str,
        device: &str,
        host_root: &Path,
        gateway: &str,
        extra: &[&str],
    ) -> Result<()> {
        self.start_agent_in(ns, device, host_root, gateway, None, extra)
    }

    /// [`Stack::start_agent_via`], inside the network namespace `netns` when given (`ip
    /// netns exec`, which execs the agent: the pid file holds the agent's pid).
    pub fn start_agent_in(
        &self,
        ns: &str,
        device: &str,
        host_root: &Path,
        gateway: &str,
        netns: Option<&str>,
        extra: &[&str],
    ) -> Result<()> {
        if self.agent_pid(ns, device).is_some() {
            return Ok(());
        }
        // Each agent gets its own copy of the namespace's token: an agent deletes its token
        // file once enrolled.
        let shared = self.bootstrap_token(ns)?;
        let dir = self.agent_dir(ns, device);
        std::fs::create_dir_all(&dir)?;
        let token = dir.join("bootstrap.token");
        std::fs::copy(&shared, &token)?;
        let mut args: Vec<String> = vec![
            "--gateway".into(),
            gateway.into(),
            "--state-dir".into(),
            self.agent_dir(ns, device).to_string_lossy().into_owned(),
            "--ca-file".into(),
            self.ca_file().to_string_lossy().into_owned(),
            "--namespace".into(),
            ns.into(),
            "--bootstrap-token-file".into(),
            token.to_string_lossy().into_owned(),
            "--device".into(),
            device.into(),
            "--host-root".into(),
            host_root.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        match netns {
            None => self.spawn(
                &Self::agent_name(ns, device),
                &target_bin("liveresponse-agent"),
                &args,
            )?,
            Some(netns) => {
                let mut wrapped: Vec<String> = vec![
                    "netns".into(),
                    "exec".into(),
                    netns.into(),
                    target_bin("liveresponse-agent")
                        .to_string_lossy()
                        .into_owned(),
                ];
                wrapped.extend(args);
                self.spawn(
                    &Self::agent_name(ns, device),
                    Path::new("/usr/sbin/ip"),
                    &wrapped,
                )?
            }
        };
        Ok(())
    }

    /// Starts `lr-sim-agents`: `count` simulated devices `sim-NNNNN` from number `first`
    /// in `ns`, enrolling with the namespace's bootstrap token (plus `extra_tokens`, token
    /// files of the same namespace that spread the enrollments). Their state lives in one
    /// folder per process; `name` tells processes apart. A no-op when it runs.
    pub fn start_sim_agents(
        &self,
        name: &str,
        ns: &str,
        first: usize,
        count: usize,
        extra_tokens: &[PathBuf],
        extra: &[&str],
    ) -> Result<u32> {
        let pidfile = self.pidfile(name);
        if let Some(pid) = pid_alive(&pidfile, "lr-sim-agents") {
            return Ok(pid);
        }
        let mut args: Vec<String> = vec![
            "--gateway".into(),
            self.gateway()?,
            "--state-dir".into(),
            self.dir
                .join(format!("{name}-state"))
                .to_string_lossy()
                .into_owned(),
            "--ca-file".into(),
            self.ca_file().to_string_lossy().into_owned(),
            "--namespace".into(),
            ns.into(),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--bootstrap-token-file".into(),
            self.bootstrap_token(ns)?.to_string_lossy().into_owned(),
        ];
        for t in extra_tokens {
            args.push("--bootstrap-token-file".into());
            args.push(t.to_string_lossy().into_owned());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, &target_bin("lr-sim-agents"), &args)
    }

    /// Pid of a running `lr-sim-agents` started as `name`.
    pub fn sim_agents_pid(&self, name: &str) -> Option<u32> {
        pid_alive(&self.pidfile(name), "lr-sim-agents")
    }

    /// Stops an `lr-sim-agents` process (SIGKILL: its devices drop as a crash would).
    pub fn stop_sim_agents(&self, name: &str) {
        if let Some(pid) = self.sim_agents_pid(name) {
            kill(pid, "-KILL");
            self.wait_gone(pid);
        }
    }

    /// Kills an agent (SIGKILL).
    pub fn kill_agent(&self, ns: &str, device: &str) {
        if let Some(pid) = self.agent_pid(ns, device) {
            kill(pid, "-KILL");
            self.wait_gone(pid);
        }
    }

    /// Freezes an agent with SIGSTOP; it is continued when the returned value is dropped.
    pub fn stop_agent(&self, ns: &str, device: &str) -> Result<crate::process::Stopped> {
        let pid = self
            .agent_pid(ns, device)
            .with_context(|| format!("the agent of {device} in {ns} is not running"))?;
        crate::process::Stopped::new(pid)
    }

    /// Waits until the Device reports `connected == want`.
    pub fn wait_device(&self, ns: &str, device: &str, want: bool, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let out = self.cluster.kubectl(
                "admin",
                &[
                    "-n",
                    ns,
                    "get",
                    "lrdev",
                    device,
                    "-o",
                    "jsonpath={.status.connected}",
                ],
                None,
            )?;
            let got = String::from_utf8_lossy(&out.stdout).trim() == "true";
            if out.status.success() && got == want {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "device {device} in {ns} did not become connected={want} within {timeout:?}; agent log:\n{}\noperator log:\n{}",
                    self.tail(&Self::agent_name(ns, device)),
                    self.tail("operator")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops every process of the stack (by pid file) and forgets them.
    pub fn down(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pid") {
                for exe in [
                    "liveresponse-operator",
                    "liveresponse-agent",
                    "lr-sim-agents",
                ] {
                    if let Some(pid) = pid_alive(&path, exe) {
                        kill(pid, "-TERM");
                        self.wait_gone(pid);
                        if pid_alive(&path, exe).is_some() {
                            kill(pid, "-KILL");
                            self.wait_gone(pid);
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }
}

fn rand_u128() -> u128 {
    use std::io::Read;
    let mut buf = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom")
        && f.read_exact(&mut buf).is_ok()
    {
        return u128::from_le_bytes(buf);
    }
    // /dev/urandom exists on every Linux; this is only a fallback for a broken sandbox.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
