//! The API contract on the real control plane: CRDs, RBAC tiers, admission policies and
//! schema validation, exercised as each user would with kubectl. The API is installed by
//! `e2e::stack::Stack::up` before the tests.

use anyhow::{Result, bail, ensure};
use e2e::Cluster;

use crate::Env;

/// A namespace with the example tenant bindings applied.
pub async fn tenant(c: &Cluster, prefix: &str) -> Result<String> {
    let ns = c.namespace(prefix).await?;
    let bindings =
        std::fs::read_to_string(e2e::repo_root().join("config/rbac/bindings-example.yaml"))?
            .replace("NAMESPACE", &ns);
    c.kubectl_ok("admin", &["apply", "-f", "-"], Some(&bindings))?;
    Ok(ns)
}

/// `kubectl apply` (create) as a user: Ok(stdout) or Err(stderr).
fn apply(
    c: &Cluster,
    user: &str,
    ns: &str,
    yaml: &str,
) -> Result<std::result::Result<String, String>> {
    let out = c.kubectl(user, &["-n", ns, "create", "-f", "-"], Some(yaml))?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn kubectl_as(
    c: &Cluster,
    user: &str,
    args: &[&str],
) -> Result<std::result::Result<String, String>> {
    let out = c.kubectl(user, args, None)?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn must_fail(
    what: &str,
    r: std::result::Result<String, String>,
    needles: &[&str],
) -> Result<String> {
    match r {
        Ok(out) => bail!("{what} should have been refused, but succeeded: {out}"),
        Err(err) => {
            for n in needles {
                ensure!(
                    err.contains(n),
                    "{what}: the refusal should mention {n:?}, got: {err}"
                );
            }
            Ok(err)
        }
    }
}

fn must_pass(what: &str, r: std::result::Result<String, String>) -> Result<String> {
    r.map_err(|e| anyhow::anyhow!("{what} should have succeeded: {e}"))
}

fn command(name: &str, verb: &str, args: &[&str]) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| serde_json::to_string(a).unwrap_or_default())
        .collect();
    format!(
        "apiVersion: liveresponse.io/v1alpha1\nkind: Command\nmetadata: {{name: {name}}}\nspec:\n  session: s1\n  command: {verb}\n  args: [{}]\n",
        args.join(", ")
    )
}

fn session(name: &str, requested_by: &str) -> String {
    format!(
        "apiVersion: liveresponse.io/v1alpha1\nkind: LiveResponseSession\nmetadata: {{name: {name}}}\nspec:\n  device: host-1\n  requestedBy: {requested_by}\n  reason: INC-42\n"
    )
}

const LIBRARY_FILE: &str = "apiVersion: liveresponse.io/v1alpha1
kind: LibraryFile
metadata: {name: collect}
spec:
  fileName: collect.sh
  description: collects logs
  source: {inline: \"#!/bin/sh\\necho hi\\n\"}
";

const SETTINGS: &str = "apiVersion: liveresponse.io/v1alpha1
kind: LiveResponseSettings
metadata: {name: default}
spec: {enabled: true}
";

/// Everything applies and is usable: CRDs established, explain shows our docs, the
/// category lists, the policies type-check.
pub async fn api_is_installed_and_documented(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "explain").await?;
    let explain = c.kubectl_ok("admin", &["explain", "lrc.spec.args"], None)?;
    ensure!(
        explain.contains("Everything typed after the verb"),
        "explain lrc.spec.args: {explain}"
    );
    let explain = c.kubectl_ok("admin", &["explain", "lrs.spec.requestedBy"], None)?;
    ensure!(
        explain.contains("SelfSubjectReview") || explain.contains("auth whoami"),
        "{explain}"
    );
    must_pass(
        "kubectl get liveresponse",
        kubectl_as(c, "analyst-basic", &["-n", &ns, "get", "liveresponse"])?,
    )?;
    for policy in [
        "liveresponse-command-tier",
        "liveresponse-session-requester",
    ] {
        let warnings = c.kubectl_ok(
            "admin",
            &[
                "get",
                "validatingadmissionpolicy",
                policy,
                "-o",
                "jsonpath={.status.typeChecking}",
            ],
            None,
        )?;
        ensure!(
            !warnings.contains("warning"),
            "policy {policy} does not type-check: {warnings}"
        );
    }
    // The printer columns make `kubectl get` a dashboard.
    c.kubectl_ok(
        "analyst-basic",
        &["-n", &ns, "create", "-f", "-"],
        Some(&session("s1", "analyst-basic")),
    )?;
    let table = c.kubectl_ok("admin", &["-n", &ns, "get", "lrs"], None)?;
    for col in [
        "DEVICE",
        "REQUESTER",
        "PHASE",
        "STARTED",
        "AGE",
        "host-1",
        "analyst-basic",
    ] {
        ensure!(table.contains(col), "kubectl get lrs lacks {col}: {table}");
    }
    c.kubectl_ok(
        "analyst-basic",
        &["-n", &ns, "create", "-f", "-"],
        Some(&command("c1", "processes", &[])),
    )?;
    let table = c.kubectl_ok("admin", &["-n", &ns, "get", "lrc"], None)?;
    for col in ["SESSION", "ID", "COMMAND", "PHASE", "DURATION", "AGE"] {
        ensure!(table.contains(col), "kubectl get lrc lacks {col}: {table}");
    }
    c.drop_namespace(&ns).await
}

/// The basic tier: basic commands yes, advanced no, status never, spec frozen but cancel.
pub async fn basic_analyst_tier(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "basic").await?;
    must_pass(
        "basic: processes",
        apply(
            c,
            "analyst-basic",
            &ns,
            &command("ps", "processes", &["-name", "sshd"]),
        )?,
    )?;
    must_fail(
        "basic: getfile",
        apply(
            c,
            "analyst-basic",
            &ns,
            &command("gf", "getfile", &["/etc/hostname"]),
        )?,
        &["getfile", "liveresponse-advanced"],
    )?;
    must_fail(
        "basic: run",
        apply(c, "analyst-basic", &ns, &command("run", "run", &["x.sh"]))?,
        &["run", "liveresponse-advanced"],
    )?;
    // Status belongs to the operator.
    must_fail(
        "basic: patch status",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrc",
                "ps",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Succeeded"}}"#,
            ],
        )?,
        &["forbidden"],
    )?;
    c.kubectl_ok(
        "analyst-basic",
        &["-n", &ns, "create", "-f", "-"],
        Some(&session("mine", "analyst-basic")),
    )?;
    must_fail(
        "basic: patch session status",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrs",
                "mine",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Connected"}}"#,
            ],
        )?,
        &["forbidden"],
    )?;
    must_fail(
        "basic: change args",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrc",
                "ps",
                "--type=merge",
                "-p",
                r#"{"spec":{"args":["-name","bash"]}}"#,
            ],
        )?,
        &["spec.args is immutable"],
    )?;
    must_fail(
        "basic: change command",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrc",
                "ps",
                "--type=merge",
                "-p",
                r#"{"spec":{"command":"dir"}}"#,
            ],
        )?,
        &["spec.command is immutable"],
    )?;
    must_pass(
        "basic: cancel",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrc",
                "ps",
                "--type=merge",
                "-p",
                r#"{"spec":{"cancel":true}}"#,
            ],
        )?,
    )?;
    must_fail(
        "basic: un-cancel",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrc",
                "ps",
                "--type=merge",
                "-p",
                r#"{"spec":{"cancel":false}}"#,
            ],
        )?,
        &["cannot go back to false"],
    )?;
    // Console-only and unknown verbs never become Commands.
    must_fail(
        "basic: cls",
        apply(c, "analyst-basic", &ns, &command("cls", "cls", &[]))?,
        &["console command"],
    )?;
    must_fail(
        "basic: unknown",
        apply(c, "analyst-basic", &ns, &command("nope", "frobnicate", &[]))?,
        &["unknown command \"frobnicate\""],
    )?;
    c.drop_namespace(&ns).await
}

/// The advanced tier may run advanced commands.
pub async fn advanced_analyst_tier(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "advanced").await?;
    must_pass(
        "advanced: getfile",
        apply(
            c,
            "analyst-advanced",
            &ns,
            &command("gf", "getfile", &["/etc/hostname", "-auto"]),
        )?,
    )?;
    must_pass(
        "advanced: processes",
        apply(c, "analyst-advanced", &ns, &command("ps", "processes", &[]))?,
    )?;
    must_pass(
        "advanced: remediate",
        apply(
            c,
            "analyst-advanced",
            &ns,
            &command("rm", "remediate", &["file", "/tmp/x", "-auto"]),
        )?,
    )?;
    c.drop_namespace(&ns).await
}

/// A user with no role can create nothing.
pub async fn outsider_can_create_nothing(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "outsider").await?;
    for (what, yaml) in [
        ("session", session("s", "outsider")),
        ("command", command("c", "processes", &[])),
        ("library file", LIBRARY_FILE.to_string()),
        ("settings", SETTINGS.to_string()),
    ] {
        must_fail(
            &format!("outsider: {what}"),
            apply(c, "outsider", &ns, &yaml)?,
            &["forbidden"],
        )?;
    }
    must_fail(
        "outsider: list",
        kubectl_as(c, "outsider", &["-n", &ns, "get", "lrc"])?,
        &["forbidden"],
    )?;
    c.drop_namespace(&ns).await
}

/// Sessions are opened in one's own name and changed only by their requester.
pub async fn sessions_belong_to_their_requester(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "requester").await?;
    must_fail(
        "basic: session for someone else",
        apply(
            c,
            "analyst-basic",
            &ns,
            &session("theirs", "analyst-advanced"),
        )?,
        &[
            "spec.requestedBy must be your own user name",
            "analyst-basic",
        ],
    )?;
    must_pass(
        "basic: own session",
        apply(c, "analyst-basic", &ns, &session("mine", "analyst-basic"))?,
    )?;
    must_fail(
        "advanced: disconnect someone else's session",
        kubectl_as(
            c,
            "analyst-advanced",
            &[
                "-n",
                &ns,
                "patch",
                "lrs",
                "mine",
                "--type=merge",
                "-p",
                r#"{"spec":{"state":"Disconnected"}}"#,
            ],
        )?,
        &["belongs to analyst-basic"],
    )?;
    must_fail(
        "basic: change device",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrs",
                "mine",
                "--type=merge",
                "-p",
                r#"{"spec":{"device":"other"}}"#,
            ],
        )?,
        &["spec.device is immutable"],
    )?;
    must_pass(
        "basic: disconnect own session",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrs",
                "mine",
                "--type=merge",
                "-p",
                r#"{"spec":{"state":"Disconnected"}}"#,
            ],
        )?,
    )?;
    must_fail(
        "basic: reactivate",
        kubectl_as(
            c,
            "analyst-basic",
            &[
                "-n",
                &ns,
                "patch",
                "lrs",
                "mine",
                "--type=merge",
                "-p",
                r#"{"spec":{"state":"Active"}}"#,
            ],
        )?,
        &["cannot be reactivated"],
    )?;
    c.drop_namespace(&ns).await
}

/// Library files are for library admins, settings for settings admins.
pub async fn library_and_settings_admins(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "admins").await?;
    must_fail(
        "basic: library file",
        apply(c, "analyst-basic", &ns, LIBRARY_FILE)?,
        &["forbidden"],
    )?;
    must_pass(
        "library-admin: library file",
        apply(c, "library-admin", &ns, LIBRARY_FILE)?,
    )?;
    must_fail(
        "library-admin: settings",
        apply(c, "library-admin", &ns, SETTINGS)?,
        &["forbidden"],
    )?;
    must_fail(
        "basic: settings",
        apply(c, "analyst-basic", &ns, SETTINGS)?,
        &["forbidden"],
    )?;
    must_pass(
        "settings-admin: settings",
        apply(c, "settings-admin", &ns, SETTINGS)?,
    )?;
    must_fail(
        "advanced: edit settings",
        kubectl_as(
            c,
            "analyst-advanced",
            &[
                "-n",
                &ns,
                "patch",
                "lrset",
                "default",
                "--type=merge",
                "-p",
                r#"{"spec":{"maxSessions":100}}"#,
            ],
        )?,
        &["forbidden"],
    )?;
    must_pass(
        "settings-admin: edit settings",
        kubectl_as(
            c,
            "settings-admin",
            &[
                "-n",
                &ns,
                "patch",
                "lrset",
                "default",
                "--type=merge",
                "-p",
                r#"{"spec":{"maxSessions":2}}"#,
            ],
        )?,
    )?;
    // Defaults are filled in by the API server from the schema.
    let got = c.kubectl_ok(
        "admin",
        &[
            "-n",
            &ns,
            "get",
            "lrset",
            "default",
            "-o",
            "jsonpath={.spec.idleTimeout} {.spec.maxSessions} {.spec.maxFileSize}",
        ],
        None,
    )?;
    ensure!(got == "30m 2 3Gi", "settings defaults: {got}");
    c.drop_namespace(&ns).await
}

/// Invalid objects are refused with messages a user understands.
pub async fn invalid_objects_are_explained(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = tenant(c, "invalid").await?;
    let two_sources = LIBRARY_FILE.replace(
        "source: {inline: \"#!/bin/sh\\necho hi\\n\"}",
        "source: {inline: \"x\", configMapRef: {name: scripts, key: collect.sh}}",
    );
    must_fail(
        "two sources",
        apply(c, "library-admin", &ns, &two_sources)?,
        &["exactly one of configMapRef, secretRef, inline or artifact"],
    )?;
    let no_source =
        LIBRARY_FILE.replace("source: {inline: \"#!/bin/sh\\necho hi\\n\"}", "source: {}");
    must_fail(
        "no source",
        apply(c, "library-admin", &ns, &no_source)?,
        &["exactly one of"],
    )?;
    for bad in ["../collect.sh", "dir/collect.sh", "..", "a\\\\b.ps1"] {
        let yaml = LIBRARY_FILE.replace("fileName: collect.sh", &format!("fileName: \"{bad}\""));
        must_fail(
            &format!("fileName {bad}"),
            apply(c, "library-admin", &ns, &yaml)?,
            &["plain file name"],
        )?;
    }
    let wrong_name = SETTINGS.replace("name: default", "name: custom");
    must_fail(
        "settings name",
        apply(c, "settings-admin", &ns, &wrong_name)?,
        &["must be named 'default'"],
    )?;
    let negative = command("neg", "processes", &[]) + "  timeoutSeconds: -5\n";
    must_fail(
        "negative timeout",
        apply(c, "analyst-basic", &ns, &negative)?,
        &["timeoutSeconds", "greater than or equal to 1"],
    )?;
    for (field, value, needle) in [
        ("idleTimeout", "-5m", "idleTimeout"),
        ("idleTimeout", "forever", "idleTimeout"),
        ("idleTimeout", "48h", "between 1s and 24h"),
        ("maxFileSize", "2Ti", "maxFileSize must be a size"),
        ("maxSessions", "0", "maxSessions"),
    ] {
        let yaml = SETTINGS.replace(
            "spec: {enabled: true}",
            &format!("spec: {{enabled: true, {field}: \"{value}\"}}"),
        );
        let yaml = if field == "maxSessions" {
            yaml.replace("\"0\"", "0")
        } else {
            yaml
        };
        must_fail(
            &format!("settings {field}={value}"),
            apply(c, "settings-admin", &ns, &yaml)?,
            &[needle],
        )?;
    }
    let bad_session = session("bad", "analyst-basic") + "  idleTimeout: 10x\n";
    must_fail(
        "session idleTimeout",
        apply(c, "analyst-basic", &ns, &bad_session)?,
        &["idleTimeout"],
    )?;
    c.drop_namespace(&ns).await
}
