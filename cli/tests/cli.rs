//! The binary as a script sees it, without a cluster: a bad command line is refused
//! before any API call (exit 2), and a missing kubeconfig is an error (exit 1).

use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    let result = Command::new(env!("CARGO_BIN_EXE_kubectl-liveresponse"))
        .args(args)
        // Any attempt to reach a cluster fails loudly instead of finding a real one.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("NO_COLOR", "1")
        .output();
    match result {
        Ok(output) => output,
        Err(e) => panic!("cannot run kubectl-liveresponse: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_the_subcommands() {
    let out = cli(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    for sub in [
        "devices",
        "sessions",
        "log",
        "disconnect",
        "connect",
        "exec",
    ] {
        assert!(stdout.contains(sub), "{sub} missing:\n{stdout}");
    }
    assert!(stdout.contains("--no-color"), "{stdout}");
}

#[test]
fn exec_parse_error_exits_2_with_usage_before_any_api_call() {
    let out = cli(&["exec", "host-1", "--", "processes", "-pid", "abc"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("usage: processes"), "{stderr}");
    assert!(
        !stderr.contains("kubeconfig"),
        "contacted the cluster: {stderr}"
    );
    assert!(out.stdout.is_empty());

    let out = cli(&["exec", "host-1", "--", "procesess"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("did you mean 'processes'"));
}

#[test]
fn exec_refuses_console_commands() {
    let out = cli(&["exec", "host-1", "--", "jobs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("console command"));
}

#[test]
fn exec_help_needs_no_cluster() {
    let out = cli(&["exec", "host-1", "--", "help", "getfile"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("getfile"));
}

#[test]
fn missing_kubeconfig_is_an_error_not_a_crash() {
    let out = cli(&["devices", "-o", "json"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn clap_usage_errors_exit_2() {
    assert_eq!(cli(&["exec", "host-1"]).status.code(), Some(2));
    assert_eq!(cli(&["devices", "-o", "yaml"]).status.code(), Some(2));
}

#[test]
fn exec_status_needs_a_session_before_any_api_call() {
    let out = cli(&["exec", "host-1", "--", "status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--session"), "{stderr}");
    assert!(
        !stderr.contains("kubeconfig"),
        "contacted the cluster: {stderr}"
    );
}
