//! Table tests of the whole language, and the registry's consistency.

use std::collections::{BTreeMap, BTreeSet};

use super::parser::split_line;
use super::*;

fn spec(name: &str) -> &'static CommandSpec {
    find(name).unwrap_or_else(|| panic!("no command {name:?} in the registry"))
}

/// A line that must parse, and what it must parse to.
struct Valid {
    line: &'static str,
    command: &'static str,
    positional: Vec<(&'static str, &'static str)>,
    named: Vec<(&'static str, &'static str)>,
    flags: Vec<&'static str>,
    output: Option<OutputFormat>,
    background: bool,
    redirect: Option<&'static str>,
}

fn ok(line: &'static str, command: &'static str) -> Valid {
    Valid {
        line,
        command,
        positional: Vec::new(),
        named: Vec::new(),
        flags: Vec::new(),
        output: None,
        background: false,
        redirect: None,
    }
}

impl Valid {
    fn pos(mut self, name: &'static str, value: &'static str) -> Self {
        self.positional.push((name, value));
        self
    }
    fn named(mut self, name: &'static str, value: &'static str) -> Self {
        self.named.push((name, value));
        self
    }
    fn flag(mut self, name: &'static str) -> Self {
        self.flags.push(name);
        self
    }
    fn json(mut self) -> Self {
        self.output = Some(OutputFormat::Json);
        self
    }
    fn table(mut self) -> Self {
        self.output = Some(OutputFormat::Table);
        self
    }
    fn bg(mut self) -> Self {
        self.background = true;
        self
    }
    fn to(mut self, file: &'static str) -> Self {
        self.redirect = Some(file);
        self
    }

    fn expected(&self) -> ConsoleLine {
        ConsoleLine {
            invocation: Invocation {
                spec: spec(self.command),
                positional: self
                    .positional
                    .iter()
                    .map(|(n, v)| (*n, (*v).to_owned()))
                    .collect(),
                named: self
                    .named
                    .iter()
                    .map(|(n, v)| (*n, (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
                flags: self.flags.iter().copied().collect::<BTreeSet<_>>(),
                output: self.output,
            },
            background: self.background,
            redirect: self.redirect.map(str::to_owned),
        }
    }
}

fn valid_cases() -> Vec<Valid> {
    vec![
        // cd
        ok(r"cd C:\Windows\Temp", "cd").pos("path", r"C:\Windows\Temp"),
        ok(r#"CD "C:\Program Files\a b""#, "cd").pos("path", r"C:\Program Files\a b"),
        ok("cd ..", "cd").pos("path", ".."),
        ok(r#"cd "/tmp/dossier é""#, "cd").pos("path", "/tmp/dossier é"),
        // connections
        ok("connections", "connections"),
        ok("connections -output json", "connections").json(),
        ok("connections -OUTPUT Json > conns.json", "connections")
            .json()
            .to("conns.json"),
        // dir
        ok("dir", "dir"),
        ok(r#"dir "C:\Program Files" -full_path"#, "dir")
            .pos("path", r"C:\Program Files")
            .flag("full_path"),
        ok("dir -Full_Path /etc", "dir")
            .pos("path", "/etc")
            .flag("full_path"),
        ok("dir&", "dir").bg(),
        ok("dir a&b", "dir").pos("path", "a&b"),
        ok("dir a>b", "dir").pos("path", "a>b"),
        // drivers
        ok("drivers &", "drivers").bg(),
        // fileinfo
        ok(r#"fileinfo "/tmp/dossier é/file ü.txt""#, "fileinfo")
            .pos("path", "/tmp/dossier é/file ü.txt"),
        ok(
            r"fileinfo C:\Windows\System32\drivers\etc\hosts",
            "fileinfo",
        )
        .pos("path", r"C:\Windows\System32\drivers\etc\hosts"),
        // findfile
        ok("findfile evil.exe", "findfile").pos("name", "evil.exe"),
        ok(
            r#"findfile "*.ps1" -root C:\Users -max_results 100"#,
            "findfile",
        )
        .pos("name", "*.ps1")
        .named("root", r"C:\Users")
        .named("max_results", "100"),
        ok(r#"findfile "-weird""#, "findfile").pos("name", "-weird"),
        ok(
            "findfile id_rsa -timeout_seconds 060 -root /home &",
            "findfile",
        )
        .pos("name", "id_rsa")
        .named("timeout_seconds", "60")
        .named("root", "/home")
        .bg(),
        ok(r#"findfile a"b c"d"#, "findfile").pos("name", "ab cd"),
        ok(r#"findfile "&""#, "findfile").pos("name", "&"),
        ok(r#"findfile ">x""#, "findfile").pos("name", ">x"),
        ok(r#"findfile "say ""hi""" -max_results 0"#, "findfile")
            .pos("name", "say \"hi\"")
            .named("max_results", "0"),
        ok(r#"findfile """#, "findfile").pos("name", ""),
        ok(
            r#"findfile -root "C:\Program Files\" x.dll -output table"#,
            "findfile",
        )
        .pos("name", "x.dll")
        .named("root", r"C:\Program Files\")
        .table(),
        // help
        ok("help", "help"),
        ok("help getfile", "help").pos("command", "getfile"),
        ok("help library delete", "help")
            .pos("command", "library")
            .pos("subcommand", "delete"),
        // status
        ok("status", "status"),
        ok("status 3", "status").pos("id", "3"),
        // persistence
        ok("persistence -output json > persistence.json", "persistence")
            .json()
            .to("persistence.json"),
        // processes
        ok("processes", "processes"),
        ok("processes -pid 4242", "processes").named("pid", "4242"),
        ok("processes -name powershell.exe -output json", "processes")
            .named("name", "powershell.exe")
            .json(),
        ok(r#"Processes -NAME "svc host.exe" -pid 4 &"#, "processes")
            .named("name", "svc host.exe")
            .named("pid", "4")
            .bg(),
        ok(
            r#"processes > "C:\Users\me\My Documents\procs.txt""#,
            "processes",
        )
        .to(r"C:\Users\me\My Documents\procs.txt"),
        ok("processes >procs.txt", "processes").to("procs.txt"),
        ok(r#"processes >"my procs.txt"&"#, "processes")
            .to("my procs.txt")
            .bg(),
        ok("processes & > out.txt", "processes").bg().to("out.txt"),
        ok("processes > out.txt &", "processes").bg().to("out.txt"),
        ok(r#"processes -name "&""#, "processes").named("name", "&"),
        ok("processes -name a&", "processes")
            .named("name", "a")
            .bg(),
        // registry
        ok(
            r"registry HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Run",
            "registry",
        )
        .pos("key", r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Run"),
        ok("registry", "registry"),
        // scheduledtasks, services, startupfolders
        ok(
            r#"scheduledtasks "\Microsoft\Windows\Defrag\ScheduledDefrag""#,
            "scheduledtasks",
        )
        .pos("name", r"\Microsoft\Windows\Defrag\ScheduledDefrag"),
        ok("services sshd", "services").pos("name", "sshd"),
        ok("startupfolders", "startupfolders"),
        // trace
        ok("trace -level DEBUG", "trace").named("level", "debug"),
        // console
        ok("cls", "cls"),
        ok(
            r#"connect web-01 -reason "INC-4711 suspicious logins""#,
            "connect",
        )
        .pos("device", "web-01")
        .named("reason", "INC-4711 suspicious logins"),
        ok("jobs", "jobs"),
        ok("fg 3", "fg").pos("id", "3"),
        ok("download 4 -full_output", "download")
            .pos("id", "4")
            .flag("full_output"),
        ok(
            "library upload ./x.sh -description \"Collects logs\"",
            "library upload",
        )
        .pos("file", "./x.sh")
        .named("description", "Collects logs"),
        ok("exit", "exit"),
        // analyze, collect
        ok(r#"analyze FILE "C:\Users\Public\evil.exe""#, "analyze")
            .pos("type", "file")
            .pos("entity", r"C:\Users\Public\evil.exe"),
        ok("collect &", "collect").bg(),
        // getfile
        ok(
            r#"getfile "C:\Program Files\Vendor\agent.log" -auto"#,
            "getfile",
        )
        .pos("path", r"C:\Program Files\Vendor\agent.log")
        .flag("auto"),
        ok("getfile /var/log/auth.log &", "getfile")
            .pos("path", "/var/log/auth.log")
            .bg(),
        ok(r"getfile -AUTO C:\x.txt", "getfile")
            .pos("path", r"C:\x.txt")
            .flag("auto"),
        ok(
            r#"getfile "C:\Program Files\a b.txt" -auto -output json > meta.json &"#,
            "getfile",
        )
        .pos("path", r"C:\Program Files\a b.txt")
        .flag("auto")
        .json()
        .to("meta.json")
        .bg(),
        ok(r#"getfile "/tmp/dossier é/file ü.txt"&"#, "getfile")
            .pos("path", "/tmp/dossier é/file ü.txt")
            .bg(),
        // isolate, release
        ok("isolate", "isolate"),
        ok("release -output json", "release").json(),
        // library
        ok("library", "library"),
        ok("library -output json", "library").json(),
        ok("library delete collect-logs.ps1", "library delete").pos("name", "collect-logs.ps1"),
        ok(r#"LIBRARY DELETE "my script.ps1""#, "library delete").pos("name", "my script.ps1"),
        ok(r#"library delete "-x.ps1" &"#, "library delete")
            .pos("name", "-x.ps1")
            .bg(),
        ok("library delete x.ps1 -output json", "library delete")
            .pos("name", "x.ps1")
            .json(),
        // putfile
        ok("putfile collect-logs.ps1", "putfile").pos("name", "collect-logs.ps1"),
        ok("putfile triage.sh -keep -overwrite", "putfile")
            .pos("name", "triage.sh")
            .flag("overwrite")
            .flag("keep"),
        // remediate
        ok(
            r#"remediate file "C:\Users\Public\evil.exe" -auto"#,
            "remediate",
        )
        .pos("type", "file")
        .pos("entity", r"C:\Users\Public\evil.exe")
        .flag("auto"),
        ok("remediate Process 4242", "remediate")
            .pos("type", "process")
            .pos("entity", "4242"),
        ok(
            r#"remediate scheduledtask "\Microsoft\Windows\Evil Task" -output json"#,
            "remediate",
        )
        .pos("type", "scheduledtask")
        .pos("entity", r"\Microsoft\Windows\Evil Task")
        .json(),
        ok(
            r"remediate registry HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Run\evil &",
            "remediate",
        )
        .pos("type", "registry")
        .pos(
            "entity",
            r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Run\evil",
        )
        .bg(),
        ok("remediate list", "remediate list"),
        ok("remediate LIST -output json", "remediate list").json(),
        // run
        ok("run collect-logs.ps1", "run").pos("name", "collect-logs.ps1"),
        ok(
            r#"run collect-logs.ps1 -parameters "-Verbose -Path C:\x""#,
            "run",
        )
        .pos("name", "collect-logs.ps1")
        .named("parameters", r"-Verbose -Path C:\x"),
        ok("run triage.sh -parameters -v", "run")
            .pos("name", "triage.sh")
            .named("parameters", "-v"),
        ok(r#"run x.ps1 -parameters "" &"#, "run")
            .pos("name", "x.ps1")
            .named("parameters", "")
            .bg(),
        ok(
            r#"run x.ps1 -parameters "-Name ""a b"" -Out 'C:\r s'" > run.txt"#,
            "run",
        )
        .pos("name", "x.ps1")
        .named("parameters", r#"-Name "a b" -Out 'C:\r s'"#)
        .to("run.txt"),
        // scan, undo
        ok("scan", "scan"),
        ok("scan /home &", "scan").pos("path", "/home").bg(),
        ok(r#"undo file "C:\Users\Public\evil.exe""#, "undo")
            .pos("type", "file")
            .pos("entity", r"C:\Users\Public\evil.exe"),
        ok("undo service EvilSvc", "undo")
            .pos("type", "service")
            .pos("entity", "EvilSvc"),
    ]
}

/// The `command` and `args` a Command resource would hold for a console line: the first
/// word, then each remaining token exactly as typed, quotes included.
fn command_and_args(line: &str) -> (String, Vec<String>) {
    let (tokens, _, _) = split_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let verb = tokens[0].text.clone();
    let args = tokens[1..]
        .iter()
        .map(|t| line[t.raw.clone()].to_owned())
        .collect();
    (verb, args)
}

#[test]
fn valid_lines_parse_to_the_expected_invocation() {
    for case in valid_cases() {
        let got = parse_line(case.line).unwrap_or_else(|e| panic!("{:?}: {e}", case.line));
        assert_eq!(got, case.expected(), "line {:?}", case.line);
    }
}

#[test]
fn every_command_has_a_valid_case() {
    let cases = valid_cases();
    for spec in registry() {
        assert!(
            cases.iter().any(|c| c.command == spec.name),
            "no valid line for {}",
            spec.name
        );
    }
}

#[test]
fn parse_command_agrees_with_parse_line() {
    for case in valid_cases() {
        let (verb, args) = command_and_args(case.line);
        let got = parse_command(&verb, &args);
        assert_eq!(
            got,
            Ok(case.expected().invocation),
            "{:?} as {verb:?} {args:?}",
            case.line
        );
    }
}

#[test]
fn canonical_forms_parse_back() {
    for case in valid_cases() {
        let line = case.expected();
        let inv = &line.invocation;
        assert_eq!(
            parse_command(inv.verb(), &inv.args()).as_ref(),
            Ok(inv),
            "args of {:?}: {:?}",
            case.line,
            inv.args()
        );
        assert_eq!(
            parse_line(&inv.render()).map(|l| l.invocation).as_ref(),
            Ok(inv),
            "render of {:?}: {}",
            case.line,
            inv.render()
        );
        assert_eq!(
            parse_line(&line.render()).as_ref(),
            Ok(&line),
            "{}",
            line.render()
        );
    }
}

#[test]
fn rendering_examples() {
    let render = |line: &str| {
        parse_line(line)
            .map(|l| l.render())
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
    };
    assert_eq!(
        render(r#"GETFILE -auto "C:\Program Files\a b.txt"  -Output JSON&"#),
        r#"getfile "C:\Program Files\a b.txt" -auto -output json &"#
    );
    assert_eq!(
        render(r#"findfile -max_results 5 "-x" -root C:\ & > "o u.txt""#),
        r#"findfile "-x" -root C:\ -max_results 5 > "o u.txt" &"#
    );
    assert_eq!(render("library DELETE a.ps1"), "library delete a.ps1");
    assert_eq!(
        render(r#"run s.ps1 -parameters "-Verbose -Path C:\x""#),
        r#"run s.ps1 -parameters "-Verbose -Path C:\x""#
    );
}

#[test]
fn args_are_the_canonical_command_resource_arguments() {
    let args = |line: &str| {
        parse_line(line)
            .map(|l| l.invocation.args())
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
    };
    assert_eq!(args("library delete x.ps1"), vec!["delete", "x.ps1"]);
    assert_eq!(
        args(r#"run s.ps1 -parameters "-Verbose -Path C:\x""#),
        vec!["s.ps1", "-parameters", r"-Verbose -Path C:\x"]
    );
    assert_eq!(
        args(r#"getfile "C:\Program Files\a b.txt" -auto &"#),
        vec![r"C:\Program Files\a b.txt", "-auto"]
    );
    assert_eq!(args(r#"findfile "-weird""#), vec![r#""-weird""#]);
    assert_eq!(args(r#"findfile "a""b""#), vec![r#""a""b""#]);
    // What a GitOps user writes by hand works without console quoting.
    let by_hand = parse_command(
        "run",
        &[
            "s.ps1".into(),
            "-parameters".into(),
            "-Verbose -Path C:\\x".into(),
        ],
    );
    assert_eq!(
        by_hand.map(|i| i.get("parameters").map(str::to_owned)),
        Ok(Some(r"-Verbose -Path C:\x".to_owned()))
    );
    // The whole name in `command` is accepted too.
    assert_eq!(
        parse_command("library delete", &["x.ps1".into()]).map(|i| i.spec.name),
        Ok("library delete")
    );
}

#[test]
fn accessors() {
    let line =
        parse_line(r#"findfile x -ROOT "C:\a b" -max_results 3"#).unwrap_or_else(|e| panic!("{e}"));
    let inv = line.invocation;
    assert_eq!(inv.verb(), "findfile");
    assert_eq!(inv.get("name"), Some("x"));
    assert_eq!(inv.get("root"), Some(r"C:\a b"));
    assert_eq!(inv.get("Max_Results"), Some("3"));
    assert_eq!(inv.get("timeout_seconds"), None);
    let inv = parse_line("putfile a -keep")
        .unwrap_or_else(|e| panic!("{e}"))
        .invocation;
    assert!(inv.has_flag("keep") && inv.has_flag("KEEP"));
    assert!(!inv.has_flag("overwrite"));
    let inv = parse_line("library delete a")
        .unwrap_or_else(|e| panic!("{e}"))
        .invocation;
    assert_eq!(inv.verb(), "library");
}

/// A line that must fail, the error it must give, and the command whose usage the message
/// must show.
struct Invalid {
    line: &'static str,
    kind: ParseErrorKind,
    usage_of: Option<&'static str>,
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn bad(line: &'static str, kind: ParseErrorKind, usage_of: Option<&'static str>) -> Invalid {
    Invalid {
        line,
        kind,
        usage_of,
    }
}

fn invalid_cases() -> Vec<Invalid> {
    use ParseErrorKind as K;
    let whole = format!("a whole number from 0 to {}", u64::MAX);
    vec![
        bad("", K::Empty, None),
        bad(" \t  ", K::Empty, None),
        bad(
            "procesess",
            K::UnknownCommand {
                name: s("procesess"),
                suggestion: Some(s("processes")),
            },
            None,
        ),
        bad(
            "xyzzy -pid 3",
            K::UnknownCommand {
                name: s("xyzzy"),
                suggestion: None,
            },
            None,
        ),
        bad(
            "dir&&",
            K::UnknownCommand {
                name: s("dir&"),
                suggestion: Some(s("dir")),
            },
            None,
        ),
        bad(
            "getfile",
            K::MissingParameter {
                command: s("getfile"),
                parameter: s("path"),
            },
            Some("getfile"),
        ),
        bad(
            "getfile -auto &",
            K::MissingParameter {
                command: s("getfile"),
                parameter: s("path"),
            },
            Some("getfile"),
        ),
        bad(
            "remediate",
            K::MissingParameter {
                command: s("remediate"),
                parameter: s("type"),
            },
            Some("remediate list"),
        ),
        bad(
            "remediate file",
            K::MissingParameter {
                command: s("remediate"),
                parameter: s("entity"),
            },
            Some("remediate"),
        ),
        bad(
            "library delete",
            K::MissingParameter {
                command: s("library delete"),
                parameter: s("name"),
            },
            Some("library delete"),
        ),
        bad(
            "fg",
            K::MissingParameter {
                command: s("fg"),
                parameter: s("id"),
            },
            Some("fg"),
        ),
        bad(
            r"cd C:\a b",
            K::UnexpectedArgument {
                command: s("cd"),
                value: s("b"),
            },
            Some("cd"),
        ),
        bad(
            "processes 42",
            K::UnexpectedArgument {
                command: s("processes"),
                value: s("42"),
            },
            Some("processes"),
        ),
        bad(
            "processes -",
            K::UnexpectedArgument {
                command: s("processes"),
                value: s("-"),
            },
            Some("processes"),
        ),
        bad(
            "library remove x.ps1",
            K::UnexpectedArgument {
                command: s("library"),
                value: s("remove"),
            },
            Some("library delete"),
        ),
        bad(
            r#"library "delete" x.ps1"#,
            K::UnexpectedArgument {
                command: s("library"),
                value: s("delete"),
            },
            Some("library"),
        ),
        bad(
            r#"findfile "-weird" x"#,
            K::UnexpectedArgument {
                command: s("findfile"),
                value: s("x"),
            },
            Some("findfile"),
        ),
        bad(
            "dir -fullpath",
            K::UnknownParameter {
                command: s("dir"),
                name: s("fullpath"),
            },
            Some("dir"),
        ),
        bad(
            "jobs -output json",
            K::UnknownParameter {
                command: s("jobs"),
                name: s("output"),
            },
            Some("jobs"),
        ),
        bad(
            "getfile x -Force",
            K::UnknownParameter {
                command: s("getfile"),
                name: s("force"),
            },
            Some("getfile"),
        ),
        bad(
            "findfile x -root",
            K::MissingValue {
                command: s("findfile"),
                name: s("root"),
            },
            Some("findfile"),
        ),
        bad(
            "run x.ps1 -parameters &",
            K::MissingValue {
                command: s("run"),
                name: s("parameters"),
            },
            Some("run"),
        ),
        bad(
            "processes -output",
            K::MissingValue {
                command: s("processes"),
                name: s("output"),
            },
            Some("processes"),
        ),
        bad(
            "processes -pid abc",
            K::InvalidValue {
                command: s("processes"),
                name: s("pid"),
                value: s("abc"),
                expected: whole.clone(),
            },
            Some("processes"),
        ),
        bad(
            "processes -pid -1",
            K::InvalidValue {
                command: s("processes"),
                name: s("pid"),
                value: s("-1"),
                expected: whole.clone(),
            },
            Some("processes"),
        ),
        bad(
            "findfile x -max_results 18446744073709551616",
            K::InvalidValue {
                command: s("findfile"),
                name: s("max_results"),
                value: s("18446744073709551616"),
                expected: whole.clone(),
            },
            Some("findfile"),
        ),
        bad(
            "fg one",
            K::InvalidValue {
                command: s("fg"),
                name: s("id"),
                value: s("one"),
                expected: whole,
            },
            Some("fg"),
        ),
        bad(
            "remediate proc 42",
            K::InvalidValue {
                command: s("remediate"),
                name: s("type"),
                value: s("proc"),
                expected: s(
                    "one of file, process, service, registry, scheduledtask, startupitem, user",
                ),
            },
            Some("remediate list"),
        ),
        bad(
            "trace -level verbose",
            K::InvalidValue {
                command: s("trace"),
                name: s("level"),
                value: s("verbose"),
                expected: s("one of debug, info, warn, error"),
            },
            Some("trace"),
        ),
        bad(
            "processes -output xml",
            K::InvalidValue {
                command: s("processes"),
                name: s("output"),
                value: s("xml"),
                expected: s("table or json"),
            },
            Some("processes"),
        ),
        bad(
            r#"dir """#,
            K::InvalidValue {
                command: s("dir"),
                name: s("path"),
                value: s(""),
                expected: s("a non-empty path"),
            },
            Some("dir"),
        ),
        bad(
            "processes -pid 1 -PID 2",
            K::DuplicateParameter {
                command: s("processes"),
                name: s("pid"),
            },
            Some("processes"),
        ),
        bad(
            "putfile x -keep -keep",
            K::DuplicateParameter {
                command: s("putfile"),
                name: s("keep"),
            },
            Some("putfile"),
        ),
        bad(
            "dir -output json -output table",
            K::DuplicateParameter {
                command: s("dir"),
                name: s("output"),
            },
            Some("dir"),
        ),
        bad(
            r#"getfile "C:\a"#,
            K::UnterminatedQuote { position: 8 },
            None,
        ),
        bad(
            r#"run x -parameters "a ""b"#,
            K::UnterminatedQuote { position: 18 },
            None,
        ),
        bad(
            "processes >",
            K::MisplacedOperator {
                operator: s(">"),
                problem: s("> needs a file name after it"),
            },
            Some("processes"),
        ),
        bad(
            r#"processes > """#,
            K::MisplacedOperator {
                operator: s(">"),
                problem: s("> needs a file name after it"),
            },
            Some("processes"),
        ),
        bad(
            "processes > &",
            K::MisplacedOperator {
                operator: s(">"),
                problem: s("> needs a file name after it"),
            },
            Some("processes"),
        ),
        bad(
            "processes > a b",
            K::MisplacedOperator {
                operator: s(">"),
                problem: s(
                    "a redirect must be the last thing on the line: > file (quote a value that starts with >)",
                ),
            },
            Some("processes"),
        ),
        bad(
            "processes & -pid 3",
            K::MisplacedOperator {
                operator: s("&"),
                problem: s(
                    "& goes at the end of the line, once (quote a value that starts with &)",
                ),
            },
            Some("processes"),
        ),
        bad(
            "processes & > x &",
            K::MisplacedOperator {
                operator: s("&"),
                problem: s(
                    "& goes at the end of the line, once (quote a value that starts with &)",
                ),
            },
            Some("processes"),
        ),
        bad(
            "&",
            K::MisplacedOperator {
                operator: s("&"),
                problem: s("there is no command before it"),
            },
            None,
        ),
        bad(
            "> out.txt",
            K::MisplacedOperator {
                operator: s(">"),
                problem: s("there is no command before it"),
            },
            None,
        ),
        bad(
            r"cd C:\ &",
            K::BackgroundNotAllowed { command: s("cd") },
            Some("cd"),
        ),
        bad(
            "jobs &",
            K::BackgroundNotAllowed { command: s("jobs") },
            Some("jobs"),
        ),
        bad(
            "help getfile&",
            K::BackgroundNotAllowed { command: s("help") },
            Some("help"),
        ),
    ]
}

#[test]
fn invalid_lines_give_the_expected_error_and_usage() {
    for case in invalid_cases() {
        let err = match parse_line(case.line) {
            Ok(line) => panic!("{:?} parsed as {line:?}", case.line),
            Err(err) => err,
        };
        assert_eq!(err.kind, case.kind, "line {:?}", case.line);
        let text = err.to_string();
        assert!(!text.lines().next().unwrap_or("").is_empty(), "{text}");
        match case.usage_of {
            Some(name) => {
                let usage = usage(spec(name));
                assert!(
                    text.contains("\nusage: ") && text.contains(&usage),
                    "{:?}: {text:?} lacks {usage:?}",
                    case.line
                );
            }
            None => assert_eq!(err.usage, None, "{:?}", case.line),
        }
    }
}

#[test]
fn error_messages_say_exactly_what_is_wrong() {
    let msg = |line: &str| {
        parse_line(line)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        msg("getfile"),
        "getfile: missing required parameter <path>\nusage: getfile <path> [-auto] [-output table|json]"
    );
    assert_eq!(
        msg("procesess"),
        "unknown command 'procesess'; did you mean 'processes'?"
    );
    assert!(
        msg("processes -pid abc")
            .starts_with("processes: invalid value 'abc' for pid: expected a whole number")
    );
    assert!(msg("library delete").contains(
        "usage: library [-output table|json]\n       library delete <name> [-output table|json]\n       library upload <file>"
    ));
    assert!(msg(r#"getfile "C:\a"#).starts_with("unterminated quote: the \" at column 9"));
}

#[test]
fn parse_command_errors() {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        parse_command("", &[]).map_err(|e| e.kind),
        Err(ParseErrorKind::Empty)
    );
    assert_eq!(
        parse_command("getfil", &strings(&["x"])).map_err(|e| e.kind),
        Err(ParseErrorKind::UnknownCommand {
            name: s("getfil"),
            suggestion: Some(s("getfile"))
        })
    );
    // In args, `&` and `>` are plain values: background and output have their own fields.
    assert_eq!(
        parse_command("findfile", &strings(&["&"])).map(|i| i.get("name").map(str::to_owned)),
        Ok(Some(s("&")))
    );
    assert_eq!(
        parse_command("findfile", &strings(&["-weird"])).map_err(|e| e.kind),
        Err(ParseErrorKind::UnknownParameter {
            command: s("findfile"),
            name: s("weird")
        })
    );
    // The column is where the quote would be on the equivalent console line.
    assert_eq!(
        parse_command("getfile", &strings(&["-auto", "\"C:\\a"])).map_err(|e| e.kind),
        Err(ParseErrorKind::UnterminatedQuote { position: 14 })
    );
}

// ---- registry consistency ----

#[test]
fn names_are_unique_and_well_formed() {
    let mut seen = BTreeSet::new();
    for spec in registry() {
        assert!(seen.insert(spec.name), "duplicate {}", spec.name);
        assert_eq!(spec.name, spec.name.to_lowercase(), "{}", spec.name);
        assert!(spec.name.split(' ').count() <= 2, "{}", spec.name);
        if let Some(sub) = spec.subcommand() {
            let parent = find(spec.verb());
            assert!(parent.is_some(), "{} has no parent command", spec.name);
            assert!(!sub.is_empty() && !sub.contains(' '), "{}", spec.name);
        }
    }
}

#[test]
fn every_prerequisite_exists_and_auto_runs_them() {
    for spec in registry() {
        for pre in spec.prerequisites {
            let pre =
                find(pre).unwrap_or_else(|| panic!("{}: unknown prerequisite {pre}", spec.name));
            assert_ne!(pre.tier, Tier::Console, "{}", spec.name);
            // The operator hands the entity to the prerequisite unchanged.
            let kinds = |s: &CommandSpec| s.positional.iter().map(|p| p.kind).collect::<Vec<_>>();
            assert_eq!(kinds(pre), kinds(spec), "{} -> {}", spec.name, pre.name);
        }
        assert_eq!(
            spec.flag("auto").is_some(),
            !spec.prerequisites.is_empty(),
            "{}: -auto and prerequisites go together",
            spec.name
        );
    }
}

#[test]
fn parameters_are_well_formed() {
    for spec in registry() {
        let mut names = BTreeSet::new();
        let all = spec
            .positional
            .iter()
            .chain(spec.named)
            .map(|p| p.name)
            .chain(spec.flags.iter().map(|f| f.name));
        for name in all {
            assert!(names.insert(name), "{}: {name} twice", spec.name);
            assert_ne!(name, "output", "{}: output is global", spec.name);
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}: bad name {name:?}",
                spec.name
            );
        }
        let first_optional = spec.positional.iter().position(|p| !p.required);
        if let Some(i) = first_optional {
            assert!(
                spec.positional[i..].iter().all(|p| !p.required),
                "{}: a required positional after an optional one",
                spec.name
            );
        }
        for p in spec.positional.iter().chain(spec.named) {
            assert!(!p.help.is_empty(), "{}: {} has no help", spec.name, p.name);
            if let ValueKind::Choice(choices) = p.kind {
                assert!(!choices.is_empty());
                for c in choices {
                    assert_eq!(*c, c.to_lowercase(), "{}: choice {c}", spec.name);
                }
            }
        }
    }
}

#[test]
fn help_texts_examples_and_columns_are_present() {
    for spec in registry() {
        assert!(
            !spec.summary.is_empty() && !spec.help.is_empty(),
            "{}",
            spec.name
        );
        assert!(!spec.examples.is_empty(), "{} has no example", spec.name);
        assert!(!spec.platforms.is_empty(), "{}", spec.name);
        if spec.tier != Tier::Console {
            assert!(!spec.columns.is_empty(), "{} has no columns", spec.name);
        } else {
            assert!(!spec.background_allowed, "{}", spec.name);
        }
        let keys: BTreeSet<&str> = spec.columns.iter().map(|c| c.key).collect();
        assert_eq!(
            keys.len(),
            spec.columns.len(),
            "{}: duplicate column",
            spec.name
        );
    }
}

#[test]
fn every_example_parses_as_its_own_command() {
    for spec in registry() {
        for example in spec.examples {
            match parse_line(example) {
                Ok(line) => assert_eq!(line.invocation.spec.name, spec.name, "{example}"),
                Err(e) => panic!("example {example:?} of {}: {e}", spec.name),
            }
        }
    }
}

#[test]
fn platform_support() {
    assert_eq!(spec("registry").platforms, &[Platform::Windows]);
    assert!(!spec("registry").supports(Platform::Linux));
    assert!(spec("processes").supports(Platform::Macos));
    assert_eq!(Platform::from_name("Linux"), Some(Platform::Linux));
    assert_eq!(Platform::from_name("plan9"), None);
}

#[test]
fn advanced_verbs_are_the_first_words_of_advanced_commands() {
    let verbs = advanced_verbs();
    for v in ["getfile", "run", "putfile", "remediate", "library"] {
        assert!(verbs.contains(&v), "{v} missing from {verbs:?}");
    }
    for v in ["processes", "cd", "jobs", "library delete"] {
        assert!(!verbs.contains(&v), "{v} in {verbs:?}");
    }
    let mut sorted = verbs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(verbs, sorted);
}

#[test]
fn tiers_match_the_design() {
    let tier_of = |names: &[&str], tier: Tier| {
        for name in names {
            assert_eq!(spec(name).tier, tier, "{name}");
        }
    };
    tier_of(
        &[
            "cd",
            "connections",
            "dir",
            "drivers",
            "fileinfo",
            "findfile",
            "help",
            "status",
            "persistence",
            "processes",
            "registry",
            "scheduledtasks",
            "services",
            "startupfolders",
            "trace",
        ],
        Tier::Basic,
    );
    tier_of(
        &[
            "cls",
            "connect",
            "jobs",
            "fg",
            "download",
            "library upload",
            "exit",
        ],
        Tier::Console,
    );
    tier_of(
        &[
            "analyze",
            "collect",
            "getfile",
            "isolate",
            "release",
            "library",
            "library delete",
            "putfile",
            "remediate",
            "remediate list",
            "run",
            "scan",
            "undo",
        ],
        Tier::Advanced,
    );
    assert_eq!(registry().len(), 35);
}

#[test]
fn find_is_exact_and_case_insensitive() {
    assert_eq!(find("GetFile").map(|s| s.name), Some("getfile"));
    assert_eq!(
        find("Library Delete").map(|s| s.name),
        Some("library delete")
    );
    assert_eq!(find("getfil"), None);
    assert_eq!(find("library  delete"), None);
}

#[test]
fn registry_serializes() {
    let json = serde_json::to_value(spec("remediate")).unwrap_or_default();
    assert_eq!(json["tier"], "advanced");
    assert_eq!(json["platforms"][0], "windows");
    assert_eq!(json["positional"][0]["kind"]["choice"][0], "file");
    assert_eq!(json["columns"][0]["key"], "entityType");
    assert_eq!(
        serde_json::to_string(&OutputFormat::Json).unwrap_or_default(),
        "\"json\""
    );
}

#[test]
fn long_timeouts_are_the_designs() {
    let long: Vec<&str> = registry()
        .iter()
        .filter(|s| s.timeout == TimeoutClass::Long)
        .map(|s| s.name)
        .collect();
    // The design's three, and collect and scan, which walk the whole device as findfile does.
    assert_eq!(long, ["findfile", "collect", "getfile", "run", "scan"]);
    assert_eq!(timeout_class("getfile"), TimeoutClass::Long);
    assert_eq!(timeout_class("processes"), TimeoutClass::Normal);
    assert_eq!(timeout_class("library"), TimeoutClass::Normal);
    assert_eq!(timeout_class("no-such-verb"), TimeoutClass::Normal);
}

#[test]
fn handlers_partition_the_registry() {
    assert_eq!(
        handled_by(Handler::Console),
        [
            "help",
            "status",
            "cls",
            "connect",
            "jobs",
            "fg",
            "download",
            "exit",
            "library upload"
        ]
    );
    assert_eq!(handled_by(Handler::Agent), ["trace"]);
    assert_eq!(handled_by(Handler::Operator), ["library", "library delete"]);
    let total: usize = [
        Handler::Console,
        Handler::Operator,
        Handler::Agent,
        Handler::Provider,
    ]
    .into_iter()
    .map(|h| handled_by(h).len())
    .sum();
    assert_eq!(total, registry().len());
    // Console-tier commands are answered by the console and nowhere else.
    for s in registry().iter().filter(|s| s.tier == Tier::Console) {
        assert_eq!(s.handler, Handler::Console, "{}", s.name);
        assert!(!s.answered_by_agent(), "{}", s.name);
    }
    assert_eq!(agent_commands(), ["help", "status", "trace"]);
    assert_eq!(
        console_verbs(),
        ["cls", "connect", "download", "exit", "fg", "jobs"],
        "the admission policy's console list"
    );
    for v in command_verbs() {
        assert!(!console_verbs().contains(&v), "{v}");
    }
}

#[test]
fn aliases_run_their_command_and_hints_only_suggest() {
    for line in ["disconnect", "DISCONNECT"] {
        let parsed = parse_line(line).map(|l| l.invocation.spec.name);
        assert_eq!(parsed, Ok("exit"), "{line}");
    }
    assert!(parse_line("disconnect now").is_err());
    assert_eq!(
        help_for("disconnect").map(|h| h.starts_with("exit")),
        Ok(true)
    );
    assert!(
        help_for("exit").is_ok_and(|h| h.contains("Also typed as: disconnect")),
        "{:?}",
        help_for("exit")
    );
    // A hint is not a command.
    assert!(parse_line("ls").is_err());
    assert_eq!(hinted_by("PS").map(|s| s.name), Some("processes"));
    assert_eq!(alias_of("ls"), None);
    // No word is two things at once.
    let mut words: Vec<&str> = verbs();
    for s in registry() {
        words.extend(s.aliases);
        words.extend(s.hints);
    }
    let all = words.len();
    words.sort_unstable();
    words.dedup();
    assert_eq!(
        words.len(),
        all,
        "a word is both a verb, an alias or a hint"
    );
}

#[test]
fn help_answer_is_the_overview_or_the_topic() {
    let answer = |line: &str| {
        parse_line(line)
            .map_err(|e| e.to_string())
            .and_then(|l| help_answer(&l.invocation).map_err(|e| e.to_string()))
    };
    assert_eq!(answer("help"), Ok(help_overview()));
    assert_eq!(
        answer("help library delete"),
        help_for("library delete").map_err(|e| e.to_string())
    );
    assert!(answer("help nosuch").is_err_and(|e| e.contains("unknown command")));
}
