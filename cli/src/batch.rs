//! `batch create|get|results|cancel`: one command line on many devices (a BatchCommand).
//! The operator opens a session per device for the batch; these commands create the batch,
//! show its progress, merge every device's records into one table, and cancel it.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_table::Cell;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use liveresponse_api::command::{Tier, parse_command};
use liveresponse_api::crd::{
    BATCH_LABEL, BatchCommand, BatchPhase, BatchSpec, Command, CommandPhase, OutputFormat,
};

use crate::client::{Ctx, merge_patch};
use crate::error::{EXIT_FAILED, EXIT_OK, Error, Result};
use crate::render::{self, Colors, Format};
use crate::sanitize;

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Name of the batch (default: batch-<random>).
    #[arg(long)]
    pub name: Option<String>,
    /// Devices whose labels match, as kubectl's -l: `role=web,env!=dev`, `tier in (a,b)`,
    /// `critical`, `!retired`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// A device by name (repeat for more). With --selector, a device named or matching is
    /// picked.
    #[arg(long = "device", value_name = "NAME")]
    pub devices: Vec<String>,
    /// How many devices run it at the same time.
    #[arg(long, default_value_t = 100)]
    pub max_concurrency: i32,
    /// Give up on a device after this long: `90s`, `10m`, `1h` (default: the namespace's
    /// commandTimeout).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Why (the ticket or incident), recorded in every device's session.
    #[arg(long)]
    pub reason: Option<String>,
    /// Wait until every device has finished, then print the results.
    #[arg(long)]
    pub wait: bool,
    /// The command and its arguments, one shell word each, e.g. `-- processes -name sshd`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Parses a kubectl-style label selector.
pub fn parse_selector(text: &str) -> Result<LabelSelector> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "--selector {text:?}: {why} (examples: role=web, env!=dev, tier in (a,b), critical, !retired)"
        ))
    };
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    let mut labels = BTreeMap::new();
    let mut exprs = Vec::new();
    let req = |key: &str, op: &str, values: Option<Vec<String>>| LabelSelectorRequirement {
        key: key.trim().to_string(),
        operator: op.to_string(),
        values,
    };
    let set = |rest: &str| -> Result<Vec<String>> {
        let rest = rest.trim();
        let inner = rest
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| bad("a set is written (a,b)"))?;
        Ok(inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect())
    };
    for term in terms.iter().map(|t| t.trim()) {
        if term.is_empty() {
            return Err(bad("an empty term"));
        }
        let valid_key = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if let Some((k, v)) = term.split_once("!=") {
            if !valid_key(k.trim()) {
                return Err(bad(&format!("{k:?} is not a label key")));
            }
            exprs.push(req(k, "NotIn", Some(vec![v.trim().to_string()])));
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            if !valid_key(k.trim()) {
                return Err(bad(&format!("{k:?} is not a label key")));
            }
            labels.insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            exprs.push(req(k, "NotIn", Some(set(rest)?)));
        } else if let Some((k, rest)) = term.split_once(" in ") {
            exprs.push(req(k, "In", Some(set(rest)?)));
        } else if let Some(k) = term.strip_prefix('!') {
            if !valid_key(k.trim()) {
                return Err(bad(&format!("{k:?} is not a label key")));
            }
            exprs.push(req(k, "DoesNotExist", None));
        } else if valid_key(term) {
            exprs.push(req(term, "Exists", None));
        } else {
            return Err(bad(&format!("cannot read {term:?}")));
        }
    }
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    })
}

/// `90s`, `10m`, `1h30m` or plain seconds, as a whole number of seconds.
fn parse_timeout(text: &str) -> Result<i64> {
    let secs = liveresponse_api::crd::parse_duration(text)
        .map(|d| d.as_secs() as i64)
        .or_else(|| text.parse::<i64>().ok())
        .filter(|s| (1..=86400).contains(s));
    secs.ok_or_else(|| {
        Error::Usage(format!(
            "--timeout {text:?}: give a duration between 1s and 24h, such as 90s or 10m"
        ))
    })
}

/// The BatchCommand `create` sends, checked locally first so a typo creates nothing.
pub fn build(args: &CreateArgs) -> Result<BatchCommand> {
    let Some((verb, rest)) = args.command.split_first() else {
        return Err(Error::Usage(
            "batch create: no command given after --".into(),
        ));
    };
    let inv = parse_command(verb, rest)?;
    if inv.spec.tier == Tier::Console || !inv.spec.is_command() {
        return Err(Error::Usage(format!(
            "batch create: {} runs in the console, not on devices",
            inv.spec.name
        )));
    }
    if args.selector.is_none() && args.devices.is_empty() {
        return Err(Error::Usage(
            "batch create: say which devices, with --selector LABELS and/or --device NAME".into(),
        ));
    }
    if !(1..=10000).contains(&args.max_concurrency) {
        return Err(Error::Usage(
            "batch create: --max-concurrency is between 1 and 10000".into(),
        ));
    }
    let selector = args.selector.as_deref().map(parse_selector).transpose()?;
    let timeout_seconds = args.timeout.as_deref().map(parse_timeout).transpose()?;
    Ok(BatchCommand {
        metadata: ObjectMeta {
            name: args.name.clone(),
            generate_name: args.name.is_none().then(|| "batch-".to_string()),
            ..Default::default()
        },
        spec: BatchSpec {
            selector,
            devices: args.devices.clone(),
            command: verb.clone(),
            args: rest.to_vec(),
            max_concurrency: args.max_concurrency,
            timeout_seconds,
            reason: args.reason.clone(),
            cancel: false,
        },
        status: None,
    })
}

fn api(ctx: &Ctx) -> Api<BatchCommand> {
    Api::namespaced(ctx.client.clone(), &ctx.namespace)
}

fn phase(b: &BatchCommand) -> Option<BatchPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

pub async fn create(ctx: &Ctx, args: &CreateArgs, colors: Colors) -> Result<i32> {
    let batch = build(args)?;
    let created = api(ctx).create(&PostParams::default(), &batch).await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    println!("batchcommand/{name} created");
    // Say at once what the operator made of it: how many devices, or why it refused.
    let mut b = created;
    let mut waited = Duration::ZERO;
    while phase(&b).is_none() && waited < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        waited += Duration::from_millis(200);
        b = api(ctx).get(&name).await?;
    }
    match phase(&b) {
        None => eprintln!(
            "the operator has not started it yet; follow it with: kubectl liveresponse batch get {name}"
        ),
        Some(BatchPhase::Failed) if b.status.as_ref().is_some_and(|s| s.total == 0) => {
            let why = b.status.and_then(|s| s.message).unwrap_or_default();
            eprintln!("batch {name} could not start: {}", sanitize::line(&why));
            return Ok(EXIT_FAILED);
        }
        Some(_) => {
            let total = b.status.as_ref().map_or(0, |s| s.total);
            eprintln!(
                "{total} device(s) picked; results: kubectl liveresponse batch results {name}"
            );
        }
    }
    if !args.wait {
        return Ok(EXIT_OK);
    }
    while !phase(&b).is_some_and(BatchPhase::is_final) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        b = api(ctx).get(&name).await?;
    }
    results(ctx, &name, Format::Table, colors).await
}

pub async fn get(ctx: &Ctx, name: Option<&str>, format: Format, colors: Colors) -> Result<()> {
    let mut batches = match name {
        Some(n) => vec![api(ctx).get(n).await?],
        None => api(ctx).list(&ListParams::default()).await?.items,
    };
    batches.sort_by_key(|b| {
        (
            b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            b.metadata.name.clone(),
        )
    });
    match format {
        Format::Json => println!("{}", sanitize::json(&render::json_list(&batches)?)),
        Format::Table if batches.is_empty() => {
            eprintln!("no batches in namespace {}", ctx.namespace)
        }
        Format::Table => {
            println!("{}", table(&batches, Timestamp::now(), colors));
            if let [b] = batches.as_slice()
                && let Some(m) = b.status.as_ref().and_then(|s| s.message.as_deref())
            {
                println!("{}", sanitize::line(m));
            }
        }
    }
    Ok(())
}

fn table(batches: &[BatchCommand], now: Timestamp, colors: Colors) -> String {
    let rows = batches
        .iter()
        .map(|b| {
            let st = b.status.clone().unwrap_or_default();
            let line = st.command_line.clone().unwrap_or_else(|| {
                std::iter::once(b.spec.command.clone())
                    .chain(b.spec.args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            vec![
                Cell::new(b.metadata.name.clone().unwrap_or_default()),
                Cell::new(sanitize::line(&line)),
                Cell::new(st.phase.map_or("Pending".into(), |p| format!("{p:?}"))),
                Cell::new(st.total),
                Cell::new(st.counts.succeeded),
                Cell::new(st.counts.failed + st.counts.timed_out),
                Cell::new(st.counts.running),
                Cell::new(st.counts.pending),
                Cell::new(render::relative(
                    now,
                    b.metadata.creation_timestamp.as_ref(),
                )),
            ]
        })
        .collect();
    render::table(
        &[
            "NAME",
            "COMMAND",
            "PHASE",
            "DEVICES",
            "SUCCEEDED",
            "FAILED",
            "RUNNING",
            "WAITING",
            "AGE",
        ],
        rows,
        colors,
    )
}

/// One device's share of the results.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceOutcome {
    pub device: String,
    pub phase: CommandPhase,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub records: Vec<serde_json::Value>,
    pub truncated: Option<String>,
}

/// The merged records with a DEVICE column, then the devices that did not succeed.
pub fn results_table(verb: &str, outcomes: &[DeviceOutcome], colors: Colors) -> String {
    let columns = liveresponse_api::command::find(verb)
        .map(|s| s.columns)
        .unwrap_or_default();
    let mut out = String::new();
    let mut rows = Vec::new();
    for o in outcomes {
        for r in &o.records {
            let mut row = vec![Cell::new(&o.device)];
            if columns.is_empty() {
                row.push(Cell::new(sanitize::line(&r.to_string())));
            } else {
                row.extend(columns.iter().map(|c| {
                    Cell::new(sanitize::line(&liveresponse_api::output::cell(
                        r.get(c.key),
                    )))
                }));
            }
            rows.push(row);
        }
    }
    if !rows.is_empty() {
        let mut headers = vec!["DEVICE"];
        if columns.is_empty() {
            headers.push("RECORD");
        } else {
            headers.extend(columns.iter().map(|c| c.header));
        }
        out.push_str(&render::table(&headers, rows, colors));
        out.push('\n');
    }
    let summary: Vec<Vec<Cell>> = outcomes
        .iter()
        .map(|o| {
            vec![
                Cell::new(&o.device),
                Cell::new(format!("{:?}", o.phase)),
                Cell::new(o.exit_code.map_or("-".into(), |c| c.to_string())),
                Cell::new(o.records.len()),
                Cell::new(sanitize::line(
                    o.error.as_deref().or(o.truncated.as_deref()).unwrap_or(""),
                )),
            ]
        })
        .collect();
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&render::table(
        &["DEVICE", "PHASE", "EXIT", "RECORDS", "ERROR"],
        summary,
        colors,
    ));
    out
}

/// JSON lines: every record with a `device` field, then one line per device that did not
/// succeed, with its phase and error.
pub fn results_json_lines(outcomes: &[DeviceOutcome]) -> Vec<String> {
    let mut lines = Vec::new();
    for o in outcomes {
        for r in &o.records {
            let mut obj = serde_json::Map::new();
            obj.insert("device".into(), o.device.clone().into());
            match r {
                serde_json::Value::Object(m) => obj.extend(
                    m.iter()
                        .filter(|(k, _)| *k != "device")
                        .map(|(k, v)| (k.clone(), v.clone())),
                ),
                other => {
                    obj.insert("record".into(), other.clone());
                }
            }
            lines.push(serde_json::Value::Object(obj).to_string());
        }
        if o.phase != CommandPhase::Succeeded {
            lines.push(
                serde_json::json!({
                    "device": o.device,
                    "phase": o.phase,
                    "exitCode": o.exit_code,
                    "error": o.error,
                })
                .to_string(),
            );
        }
    }
    lines
}

pub async fn results(ctx: &Ctx, name: &str, format: Format, colors: Colors) -> Result<i32> {
    let b = api(ctx).get(name).await?;
    let st = b.status.clone().unwrap_or_default();
    let commands: Api<Command> = ctx.commands();
    let children: BTreeMap<String, Command> = commands
        .list(&ListParams::default().labels(&format!("{BATCH_LABEL}={name}")))
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name.clone().map(|n| (n, c)))
        .collect();
    let outcomes: Vec<DeviceOutcome> = st
        .results
        .iter()
        .map(|r| {
            let child = r.command.as_ref().and_then(|c| children.get(c));
            let output = child
                .and_then(|c| c.status.as_ref())
                .and_then(|s| s.output.as_ref());
            let records = output
                .filter(|o| o.format == OutputFormat::Json)
                .and_then(|o| serde_json::from_str::<Vec<serde_json::Value>>(&o.content).ok())
                .unwrap_or_default();
            let truncated = output.filter(|o| o.truncated).map(|_| {
                format!(
                    "output truncated: kubectl liveresponse download {} --full-output",
                    r.command.clone().unwrap_or_default()
                )
            });
            DeviceOutcome {
                device: r.device.clone(),
                phase: r.phase,
                exit_code: r.exit_code,
                error: r.error.clone(),
                records,
                truncated,
            }
        })
        .collect();
    match format {
        Format::Json => {
            for l in results_json_lines(&outcomes) {
                println!("{}", sanitize::json(&l));
            }
        }
        Format::Table if outcomes.is_empty() => eprintln!(
            "batch {name} has no results yet{}",
            st.message
                .map(|m| format!(": {}", sanitize::line(&m)))
                .unwrap_or_default()
        ),
        Format::Table => {
            println!("{}", results_table(&b.spec.command, &outcomes, colors));
            if !phase(&b).is_some_and(BatchPhase::is_final) {
                eprintln!(
                    "batch {name} is still running: {} running, {} waiting",
                    st.counts.running, st.counts.pending
                );
            }
        }
    }
    let all_ok = outcomes.iter().all(|o| o.phase == CommandPhase::Succeeded);
    Ok(if all_ok && phase(&b) == Some(BatchPhase::Succeeded) {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

pub async fn cancel(ctx: &Ctx, name: &str) -> Result<()> {
    merge_patch(
        &api(ctx),
        name,
        &serde_json::json!({ "spec": { "cancel": true } }),
    )
    .await?;
    println!(
        "batchcommand/{name} cancelled: running devices are being stopped, waiting ones will not start"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn args(cmd: &str) -> CreateArgs {
        CreateArgs {
            name: None,
            selector: Some("role=web".into()),
            devices: vec![],
            max_concurrency: 100,
            timeout: None,
            reason: None,
            wait: false,
            command: words(cmd),
        }
    }

    #[test]
    fn selectors_read_like_kubectls() {
        let s = parse_selector("role=web,env!=dev, tier in (a, b),critical,!retired")
            .unwrap_or_default();
        assert_eq!(
            s.match_labels,
            Some(BTreeMap::from([("role".into(), "web".into())]))
        );
        let ex = s.match_expressions.unwrap_or_default();
        let ops: Vec<(&str, &str)> = ex
            .iter()
            .map(|e| (e.key.as_str(), e.operator.as_str()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("env", "NotIn"),
                ("tier", "In"),
                ("critical", "Exists"),
                ("retired", "DoesNotExist")
            ]
        );
        assert_eq!(ex[1].values, Some(vec!["a".into(), "b".into()]));
        for bad in ["", "role=web,", "a in b", "bad key"] {
            assert!(parse_selector(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn create_checks_the_command_line_before_sending() {
        let b = build(&args("processes -name sshd")).map_err(|e| e.to_string());
        let b = b.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.spec.command, "processes");
        assert_eq!(b.spec.args, words("-name sshd"));
        assert_eq!(b.metadata.generate_name.as_deref(), Some("batch-"));
        assert!(build(&args("procsses")).is_err());
        assert!(build(&args("exit")).is_err());
        let mut no_devices = args("processes");
        no_devices.selector = None;
        let err = build(&no_devices)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--selector"), "{err}");
        let mut t = args("processes");
        t.timeout = Some("10m".into());
        assert_eq!(
            build(&t).ok().and_then(|b| b.spec.timeout_seconds),
            Some(600)
        );
        t.timeout = Some("forever".into());
        assert!(build(&t).is_err());
    }

    #[test]
    fn results_merge_records_under_a_device_column() {
        let outcomes = vec![
            DeviceOutcome {
                device: "web-1".into(),
                phase: CommandPhase::Succeeded,
                exit_code: Some(0),
                error: None,
                records: vec![serde_json::json!({"pid": 42, "name": "sshd"})],
                truncated: None,
            },
            DeviceOutcome {
                device: "web-2".into(),
                phase: CommandPhase::Failed,
                exit_code: None,
                error: Some("DeviceDisconnected: gone".into()),
                records: vec![],
                truncated: None,
            },
        ];
        let text = results_table("processes", &outcomes, Colors::default());
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with("DEVICE"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("web-1") && l.contains("42") && l.contains("sshd")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("web-2") && l.contains("Failed") && l.contains("gone")),
            "{text}"
        );
        let lines = results_json_lines(&outcomes);
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap_or_default();
        assert_eq!(
            (v["device"].as_str(), v["pid"].as_i64()),
            (Some("web-1"), Some(42))
        );
        let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap_or_default();
        assert_eq!(v["phase"], "Failed");
    }
}
