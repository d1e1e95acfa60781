//! The remediation journal, in the agent's state folder: what each remediation changed,
//! with enough to restore it exactly, and the quarantined content itself.
//!
//! An entry is keyed by the Command's uid, so a remediation dispatched twice (an operator
//! restart, a reconnect) or interrupted by an agent restart acts at most once: the intent
//! is written (and synced) before the action, the outcome after it, and a second run of
//! the same uid finds the entry and either answers from it or finishes what the first run
//! started.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where an entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum State {
    /// Recorded before acting: the action may or may not have happened.
    Intent,
    /// The action happened.
    Done,
    /// Recorded before restoring: the undo may or may not have happened.
    Undoing,
    /// Restored.
    Undone,
}

/// An account as it was before it was locked: its /etc/shadow line (which holds the
/// password hash: the journal is readable by the agent only, and no record shows it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountBackup {
    pub name: String,
    pub shadow_line: String,
    /// The line the remediation wrote: undo restores only over this, unless forced.
    pub locked_line: String,
}

/// A line removed from a file (a cron entry, an authorized key, a profile line); the
/// whole file as it was is kept as the entry's blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEdit {
    pub path: String,
    /// 1-based.
    pub line: usize,
    pub removed: String,
    pub before_sha256: String,
    pub after_sha256: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

/// A file as it was before it was quarantined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileBackup {
    /// Device path.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    /// Extended attributes: name and hex value.
    #[serde(default)]
    pub xattrs: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The quarantine id analysts see and `undo` takes.
    pub id: String,
    pub command_uid: String,
    pub entity_type: String,
    pub entity: String,
    /// What was done: "quarantined", "killed"...
    pub action: String,
    /// RFC 3339.
    pub time: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileBackup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountBackup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<FileEdit>,
    /// Symbolic links removed with it (a timer's enablement), path and target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<(String, String)>,
    /// Processes a `remediate process` stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undone_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undone_at: Option<String>,
}

impl Entry {
    /// The intent of command `command_uid` to act on an entity, recorded before acting:
    /// the caller adds what it will change (a file's backup, an account's line...).
    pub fn intent(
        id: &str,
        command_uid: &str,
        entity_type: &str,
        entity: &str,
        action: &str,
    ) -> Self {
        Entry {
            id: id.to_string(),
            command_uid: command_uid.to_string(),
            entity_type: entity_type.to_string(),
            entity: entity.to_string(),
            action: action.to_string(),
            time: jiff::Timestamp::now().to_string(),
            state: State::Intent,
            file: None,
            account: None,
            edit: None,
            links: vec![],
            pids: vec![],
            undone_by: None,
            undone_at: None,
        }
    }

    /// The record remediate, undo and `remediate list` show.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({
            "quarantineId": self.id,
            "entityType": self.entity_type,
            "entity": self.entity,
            "action": self.action,
            "time": self.time,
            "state": self.state,
            "undoneAt": self.undone_at,
        })
    }
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// One writer at a time: two commands must not interleave an entry's steps.
    lock: Mutex<()>,
}

/// The id of the entry of command `uid` (and `part`, for a second entry of the same
/// command): stable, so a replay finds it.
pub fn id_for(uid: &str, part: &str) -> String {
    let digest = Sha256::digest(format!("{uid}/{part}").as_bytes());
    hex::encode(&digest[..6])
}

impl Journal {
    /// Opens (creating) the journal under the agent's state folder; only the agent may
    /// read it (quarantined files are in it).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("journal");
        for d in [dir.join("entries"), dir.join("quarantine")] {
            fs::create_dir_all(&d)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(Journal {
            dir,
            lock: Mutex::new(()),
        })
    }

    /// Held while an entry's steps run.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        self.dir.join("entries").join(format!("{id}.json"))
    }

    /// Where a quarantined file's content is kept.
    pub fn blob(&self, id: &str) -> PathBuf {
        self.dir.join("quarantine").join(id)
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    pub fn get(&self, id: &str) -> Option<Entry> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.len() != 12 {
            return None;
        }
        let text = fs::read_to_string(self.entry_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes an entry durably: a crash leaves the old version or the new one, never half.
    pub fn write(&self, e: &Entry) -> std::io::Result<()> {
        let path = self.entry_path(&e.id);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Ok(d) = fs::File::open(self.dir.join("entries")) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = fs::read_dir(self.dir.join("entries"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        all.sort_by(|a: &Entry, b: &Entry| (&a.time, &a.id).cmp(&(&b.time, &b.id)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_ids_are_stable() {
        let dir = tempfile::tempdir().expect("dir");
        let j = Journal::open(dir.path()).expect("journal");
        let id = id_for("uid-1", "file");
        assert_eq!(id, id_for("uid-1", "file"));
        assert_ne!(id, id_for("uid-2", "file"));
        assert_eq!(id.len(), 12);
        let e = Entry {
            id: id.clone(),
            command_uid: "uid-1".into(),
            entity_type: "file".into(),
            entity: "/tmp/x".into(),
            action: "quarantined".into(),
            time: "2026-12-02T00:00:00Z".into(),
            state: State::Intent,
            file: None,
            account: None,
            edit: None,
            links: vec![],
            pids: vec![],
            undone_by: None,
            undone_at: None,
        };
        j.write(&e).expect("write");
        assert_eq!(j.get(&id), Some(e.clone()));
        assert_eq!(j.list(), vec![e]);
        assert_eq!(j.get("../../etc/passwd"), None);
    }
}
