//! The engines behind `analyze`, `scan` and `remediate -auto`: the namespace's rule files
//! (YARA rules and SHA-256 lists, LibraryFiles with `spec.analysis`) compiled into one
//! [`RuleSet`], and the verdict scale every engine reports on.
//!
//! Rule files reach the agent like scripts do (fetched over the command's own stream,
//! checked against the digest the operator pinned), and are compiled once per set of
//! digests: the next command with the same library reuses the compiled rules.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use liveresponse_api::proto::Content;
use serde::Serialize;

use crate::provider::ExecError;

/// How bad an entity looks, in increasing order: the overall verdict is the worst finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Nothing was there to check it against.
    Unknown,
    /// Rules were there and none matched.
    Clean,
    Suspicious,
    Malicious,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Unknown => "unknown",
            Verdict::Clean => "clean",
            Verdict::Suspicious => "suspicious",
            Verdict::Malicious => "malicious",
        }
    }
}

/// One piece of evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    /// `yara`, `sha256` or `builtin`.
    pub engine: &'static str,
    /// What matched: a rule's name (`file:rule`), a listed digest's name, a check's name.
    pub threat: String,
    /// Why, in words.
    pub details: String,
}

/// A rule file fetched and verified, ready to load.
pub struct RuleFile {
    pub content: Content,
    pub path: PathBuf,
}

/// Everything analyze and scan check files against.
#[derive(Default)]
pub struct RuleSet {
    #[cfg(feature = "yara")]
    yara: Option<yara_x::Rules>,
    yara_rules: usize,
    /// Lowercase SHA-256 → the name the list gave it (or the list's name).
    hashes: HashMap<String, String>,
    /// The rule files loaded, for the summary.
    pub sources: Vec<String>,
    /// Rule files that could not be used, and why: shown with every answer.
    pub problems: Vec<String>,
}

/// The largest rule file loaded into memory; rule files are library files, already
/// bounded by maxLibraryFileSize, and this bounds what one can make the agent hold.
const MAX_RULE_FILE: u64 = 64 << 20;

impl RuleSet {
    /// Loads and compiles `files`. A file that does not compile or parse is left out and
    /// named in [`RuleSet::problems`]: one broken file must not blind every analysis.
    pub fn load(files: &[RuleFile]) -> RuleSet {
        let mut set = RuleSet::default();
        #[cfg(feature = "yara")]
        let mut compiler = yara_x::Compiler::new();
        #[cfg(feature = "yara")]
        let mut any_yara = false;
        for f in files {
            let name = &f.content.name;
            let bytes = match std::fs::metadata(&f.path) {
                Ok(m) if m.len() > MAX_RULE_FILE => {
                    set.problems.push(format!(
                        "rule file {name} is {} bytes, more than {MAX_RULE_FILE}: not used",
                        m.len()
                    ));
                    continue;
                }
                _ => match std::fs::read(&f.path) {
                    Ok(b) => b,
                    Err(e) => {
                        set.problems
                            .push(format!("rule file {name} cannot be read: {e}"));
                        continue;
                    }
                },
            };
            match f.content.analysis.as_str() {
                "sha256" => {
                    let text = String::from_utf8_lossy(&bytes);
                    let (entries, bad) = parse_hash_list(&text, name);
                    if bad > 0 {
                        set.problems.push(format!(
                            "rule file {name}: {bad} lines are not a SHA-256 (64 hex digits) and were skipped"
                        ));
                    }
                    set.sources
                        .push(format!("{name} ({} digests)", entries.len()));
                    set.hashes.extend(entries);
                }
                "yara" => {
                    #[cfg(feature = "yara")]
                    {
                        let Ok(text) = std::str::from_utf8(&bytes) else {
                            set.problems
                                .push(format!("rule file {name} is not UTF-8 text: not used"));
                            continue;
                        };
                        // A namespace per file: two files may name a rule alike.
                        compiler.new_namespace(name);
                        match compiler.add_source(text) {
                            Ok(_) => {
                                any_yara = true;
                                set.sources.push(format!("{name} (YARA)"));
                            }
                            Err(e) => set.problems.push(format!(
                                "rule file {name} does not compile: {}",
                                first_line(&e.to_string())
                            )),
                        }
                    }
                    #[cfg(not(feature = "yara"))]
                    set.problems.push(format!(
                        "rule file {name} holds YARA rules, and this agent was built without YARA (the `yara` feature): not used"
                    ));
                }
                other => set.problems.push(format!(
                    "rule file {name} is of kind {other:?}, which this agent does not know: not used"
                )),
            }
        }
        #[cfg(feature = "yara")]
        if any_yara {
            let rules = compiler.build();
            set.yara_rules = rules.iter().len();
            set.yara = Some(rules);
        }
        set
    }

    /// Whether anything can tell a clean file from a bad one: without rules, "nothing
    /// found" means unknown, not clean.
    pub fn has_rules(&self) -> bool {
        self.yara_rules > 0 || !self.hashes.is_empty()
    }

    /// What was checked, for the answer's summary.
    pub fn describe(&self) -> String {
        if self.sources.is_empty() {
            return "built-in checks only (no rule files: LibraryFiles with spec.analysis)".into();
        }
        format!(
            "{} YARA rules and {} digests from {}; built-in checks",
            self.yara_rules,
            self.hashes.len(),
            self.sources.join(", ")
        )
    }

    /// A checker for many files in a row: one YARA scanner, set up once.
    pub fn checker(&self) -> Checker<'_> {
        Checker {
            set: self,
            #[cfg(feature = "yara")]
            scanner: self.yara.as_ref().map(|rules| {
                let mut scanner = yara_x::Scanner::new(rules);
                // A pathological rule must not hold a command past any sensible bound.
                scanner.set_timeout(std::time::Duration::from_secs(60));
                scanner
            }),
        }
    }
}

/// Checks files against a [`RuleSet`].
pub struct Checker<'r> {
    set: &'r RuleSet,
    #[cfg(feature = "yara")]
    scanner: Option<yara_x::Scanner<'r>>,
}

impl Checker<'_> {
    pub fn rules(&self) -> &RuleSet {
        self.set
    }

    /// Checks bytes (a whole file, or its first part when it is larger than the scan
    /// limit) against the digest lists and the YARA rules. `sha256` is the whole file's.
    pub fn check(&mut self, bytes: &[u8], sha256: &str) -> Vec<Finding> {
        let mut found = Vec::new();
        if let Some(name) = self.set.hashes.get(&sha256.to_ascii_lowercase()) {
            found.push(Finding {
                verdict: Verdict::Malicious,
                engine: "sha256",
                threat: name.clone(),
                details: format!("its SHA-256 {sha256} is listed as {name}"),
            });
        }
        #[cfg(feature = "yara")]
        if let Some(scanner) = &mut self.scanner {
            match scanner.scan(bytes) {
                Ok(results) => {
                    for rule in results.matching_rules() {
                        let verdict = rule
                            .metadata()
                            .find(|(k, _)| *k == "verdict")
                            .and_then(|(_, v)| match v {
                                yara_x::MetaValue::String(s) => Some(s),
                                _ => None,
                            })
                            .map_or(Verdict::Malicious, |v| {
                                if v.eq_ignore_ascii_case("suspicious") {
                                    Verdict::Suspicious
                                } else {
                                    Verdict::Malicious
                                }
                            });
                        let description = rule
                            .metadata()
                            .find(|(k, _)| *k == "description")
                            .and_then(|(_, v)| match v {
                                yara_x::MetaValue::String(s) => Some(s.to_string()),
                                _ => None,
                            });
                        let threat = format!("{}:{}", rule.namespace(), rule.identifier());
                        found.push(Finding {
                            verdict,
                            engine: "yara",
                            details: description
                                .unwrap_or_else(|| format!("matches the YARA rule {threat}")),
                            threat,
                        });
                    }
                }
                Err(e) => found.push(Finding {
                    verdict: Verdict::Unknown,
                    engine: "yara",
                    threat: String::new(),
                    details: format!("the YARA scan failed: {e}"),
                }),
            }
        }
        #[cfg(not(feature = "yara"))]
        let _ = bytes;
        found
    }
}

/// `SHA256 [name]` lines; `#` starts a comment. Returns the entries and how many
/// non-empty lines were not one.
fn parse_hash_list(text: &str, list: &str) -> (HashMap<String, String>, usize) {
    let mut entries = HashMap::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let digest = parts.next().unwrap_or_default();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            bad += 1;
            continue;
        }
        let name = parts
            .next()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map_or_else(|| list.to_string(), |n| format!("{list}:{n}"));
        entries.insert(digest.to_ascii_lowercase(), name);
    }
    (entries, bad)
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// The compiled rules of the last library seen, keyed by its files' names and digests.
#[derive(Default)]
pub struct RuleCache(std::sync::Mutex<Option<(String, Arc<RuleSet>)>>);

impl RuleCache {
    /// The set for `rules` if it was compiled already.
    pub fn get(&self, rules: &[Content]) -> Option<Arc<RuleSet>> {
        let key = key_of(rules);
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, set)| set.clone())
    }

    pub fn put(&self, rules: &[Content], set: Arc<RuleSet>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((key_of(rules), set));
    }
}

fn key_of(rules: &[Content]) -> String {
    rules
        .iter()
        .map(|c| format!("{}={}:{}", c.name, c.analysis, c.sha256))
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks `entity` on the way to an action: the `-auto` rule of remediate. Malicious and
/// suspicious act; clean and unknown act only with `-force`.
pub fn may_act(verdict: Verdict, force: bool, entity: &str) -> Result<(), ExecError> {
    match verdict {
        Verdict::Malicious | Verdict::Suspicious => Ok(()),
        _ if force => Ok(()),
        v => Err(ExecError::PermissionDenied(format!(
            "analyze found {entity} {}: not remediated; add -force to remediate it anyway",
            v.as_str()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_file(dir: &std::path::Path, name: &str, kind: &str, text: &str) -> RuleFile {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        RuleFile {
            content: Content {
                name: name.into(),
                analysis: kind.into(),
                ..Default::default()
            },
            path,
        }
    }

    #[test]
    fn hash_lists_name_their_entries_and_count_bad_lines() {
        let good = "a".repeat(64);
        let text = format!(
            "# known bad\n{good} dropper.elf\n\nnot-a-digest\n{} # comment\n",
            "B".repeat(64)
        );
        let (entries, bad) = parse_hash_list(&text, "bad-hashes");
        assert_eq!(bad, 1);
        assert_eq!(
            entries.get(&good).map(String::as_str),
            Some("bad-hashes:dropper.elf")
        );
        assert_eq!(
            entries.get(&"b".repeat(64)).map(String::as_str),
            Some("bad-hashes")
        );
    }

    #[test]
    fn verdicts_without_rules_are_unknown_and_a_listed_digest_is_malicious() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = RuleSet::load(&[]);
        assert!(!empty.has_rules());
        let digest = "c".repeat(64);
        let set = RuleSet::load(&[rule_file(dir.path(), "list", "sha256", &digest)]);
        assert!(set.has_rules());
        let found = set.checker().check(b"whatever", &digest.to_uppercase());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].verdict, Verdict::Malicious);
        assert!(set.checker().check(b"whatever", &"d".repeat(64)).is_empty());
    }

    #[cfg(feature = "yara")]
    #[test]
    fn yara_rules_match_with_their_file_and_a_broken_file_is_named_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = rule_file(
            dir.path(),
            "webshells",
            "yara",
            r#"rule eval_post { meta: description = "PHP eval of POST data" strings: $a = "eval($_POST" condition: $a }
               rule odd { meta: verdict = "suspicious" strings: $b = "base64_decode" condition: $b }"#,
        );
        let broken = rule_file(dir.path(), "broken", "yara", "rule { nope");
        let set = RuleSet::load(&[good, broken]);
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        assert!(set.problems[0].contains("broken"));
        let mut checker = set.checker();
        let found = checker.check(
            b"<?php eval($_POST['x']); base64_decode('');",
            &"0".repeat(64),
        );
        let mut names: Vec<(&str, Verdict)> = found
            .iter()
            .map(|f| (f.threat.as_str(), f.verdict))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("webshells:eval_post", Verdict::Malicious),
                ("webshells:odd", Verdict::Suspicious)
            ]
        );
        assert!(checker.check(b"hello", &"0".repeat(64)).is_empty());
    }

    #[test]
    fn auto_acts_only_on_bad_verdicts_unless_forced() {
        assert!(may_act(Verdict::Malicious, false, "x").is_ok());
        assert!(may_act(Verdict::Suspicious, false, "x").is_ok());
        let e = may_act(Verdict::Clean, false, "/tmp/x").expect_err("refused");
        assert!(e.to_string().contains("-force"), "{e}");
        assert!(may_act(Verdict::Unknown, false, "x").is_err());
        assert!(may_act(Verdict::Clean, true, "x").is_ok());
    }
}
