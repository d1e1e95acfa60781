//! The host's file system as seen through `host_root`.
//!
//! In a DaemonSet the host is mounted at `/host`, and its symbolic links are written for
//! the host: `/lib -> /usr/lib` taken literally from inside the container would read the
//! container's `/usr/lib`. So every path is resolved here one component at a time, with
//! absolute link targets re-rooted at `host_root` and `..` stopping at it, like a chroot
//! would. Paths that leave this module are device paths: absolute, without `host_root`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use sha2::Digest;

use crate::provider::{ExecContext, ExecError};

/// Linux's own limit on symbolic links followed while resolving one path (ELOOP).
const MAX_SYMLINKS: u32 = 40;

/// The host file system below `root`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostFs<'a> {
    root: &'a Path,
}

impl<'a> HostFs<'a> {
    pub(crate) fn new(root: &'a Path) -> Self {
        HostFs { root }
    }

    pub(crate) fn of(ctx: &'a ExecContext) -> Self {
        HostFs::new(&ctx.host_root)
    }

    /// Where the agent finds a device path. The path should come from [`HostFs::resolve`]
    /// (or be a listing of a resolved directory); otherwise links in it are followed by
    /// the kernel, outside our control.
    pub(crate) fn host_path(&self, device: impl AsRef<Path>) -> PathBuf {
        let device = device.as_ref();
        let relative = device.strip_prefix("/").unwrap_or(device);
        if relative.as_os_str().is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(relative)
        }
    }

    /// The device path of a host path below the root.
    pub(crate) fn device_path(&self, host: &Path) -> String {
        match host.strip_prefix(self.root) {
            Ok(rest) if rest.as_os_str().is_empty() => "/".to_owned(),
            Ok(rest) => format!("/{}", rest.to_string_lossy()),
            // Not below the root: can only happen for paths this module did not build.
            Err(_) => host.to_string_lossy().into_owned(),
        }
    }

    /// Resolves `path` (absolute, or relative to the device directory `base`) to a
    /// canonical device path: every symbolic link resolved against the root, `.` and `..`
    /// applied physically (after the links before them), `..` never above the root. The
    /// final component is followed too when `follow_last`.
    pub(crate) fn resolve(&self, base: &str, path: &str, follow_last: bool) -> io::Result<String> {
        let path = Path::new(path);
        let mut pending: VecDeque<OsString> = VecDeque::new();
        if !path.has_root() {
            pending.extend(components(Path::new(base)));
        }
        pending.extend(components(path));

        let mut resolved = self.root.to_path_buf();
        let mut depth = 0usize;
        let mut links = 0u32;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                if depth > 0 {
                    resolved.pop();
                    depth -= 1;
                }
                continue;
            }
            let candidate = resolved.join(&name);
            let meta = fs::symlink_metadata(&candidate)?;
            let last = pending.is_empty();
            if meta.file_type().is_symlink() && (follow_last || !last) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let target = fs::read_link(&candidate)?;
                if target.has_root() {
                    resolved = self.root.to_path_buf();
                    depth = 0;
                }
                for component in components(&target).into_iter().rev() {
                    pending.push_front(component);
                }
                continue;
            }
            if !last && !meta.is_dir() {
                return Err(io::Error::from(io::ErrorKind::NotADirectory));
            }
            resolved = candidate;
            depth += 1;
        }
        Ok(self.device_path(&resolved))
    }

    /// Resolves an absolute device path, following every link.
    pub(crate) fn canonical(&self, device: &str) -> io::Result<String> {
        self.resolve("/", device, true)
    }

    /// Reads a host file (links resolved within the root); invalid UTF-8 is replaced, as
    /// these are configuration files meant for people.
    pub(crate) fn read_to_string(&self, device: &str) -> io::Result<String> {
        let canonical = self.canonical(device)?;
        let bytes = fs::read(self.host_path(&canonical))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Metadata of a device path, following links within the root.
    pub(crate) fn metadata(&self, device: &str) -> io::Result<fs::Metadata> {
        let canonical = self.canonical(device)?;
        fs::metadata(self.host_path(&canonical))
    }

    /// Names in a host directory (links resolved within the root), sorted; a missing
    /// directory is simply empty, since most of the places we look are optional.
    pub(crate) fn list(&self, device_dir: &str) -> Vec<String> {
        let Ok(canonical) = self.canonical(device_dir) else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(self.host_path(&canonical)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The regular files (after following links) directly in a device directory, as
    /// device paths joined to the directory as given, sorted.
    pub(crate) fn files_in(&self, device_dir: &str) -> Vec<String> {
        self.list(device_dir)
            .into_iter()
            .map(|name| join(device_dir, &name))
            .filter(|path| self.metadata(path).is_ok_and(|m| m.is_file()))
            .collect()
    }

    pub(crate) fn is_dir(&self, device: &str) -> bool {
        self.metadata(device).is_ok_and(|m| m.is_dir())
    }

    pub(crate) fn exists(&self, device: &str) -> bool {
        self.metadata(device).is_ok()
    }

    /// The target of a symbolic link at a device path, resolved within the root to a
    /// device path (whether or not it exists). `None` when it is not a link.
    pub(crate) fn link_target(&self, device: &str) -> Option<String> {
        let parent = parent(device);
        let canonical_parent = self.canonical(parent).ok()?;
        let name = Path::new(device).file_name()?;
        let host = self.host_path(&canonical_parent).join(name);
        let target = fs::read_link(host).ok()?;
        let target = target.to_string_lossy();
        Some(normalize(&canonical_parent, &target))
    }
}

/// The components of a path that matter for resolution, as owned names; `..` is kept as
/// such, `.` and the root are dropped.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// `dir/name` as a device path.
pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The parent of a device path ("/" for "/" and top-level paths).
pub(crate) fn parent(device: &str) -> &str {
    match device.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((parent, _)) => parent,
    }
}

/// The last component of a device path.
pub(crate) fn file_name(device: &str) -> &str {
    device
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("/")
}

/// `path` made absolute against `base` and cleaned of `.` and `..` textually, without
/// touching the file system: how a path is named in messages, as the analyst meant it.
pub(crate) fn normalize(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let start = if path.starts_with('/') { "" } else { base };
    for part in start.split('/').chain(path.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    format!("/{}", parts.join("/"))
}

/// An I/O error turned into what the analyst should read, naming the device path.
pub(crate) fn io_error(err: &io::Error, path: &str) -> ExecError {
    match err.kind() {
        io::ErrorKind::NotFound => {
            ExecError::NotFound(format!("no such file or directory: {path}"))
        }
        io::ErrorKind::NotADirectory => ExecError::NotFound(format!(
            "no such file or directory: {path} (a parent is not a directory)"
        )),
        io::ErrorKind::PermissionDenied => {
            ExecError::PermissionDenied(format!("permission denied: {path}"))
        }
        _ => ExecError::Failed(format!("{path}: {err}")),
    }
}

/// RFC 3339 in UTC, to the second: what listings show.
pub(crate) fn rfc3339(time: SystemTime) -> Option<String> {
    let ts = jiff::Timestamp::try_from(time).ok()?;
    jiff::Timestamp::from_second(ts.as_second())
        .ok()
        .map(|t| t.to_string())
}

/// RFC 3339 in UTC with the file system's sub-second precision: fileinfo keeps it for
/// timelines.
pub(crate) fn rfc3339_precise(time: SystemTime) -> Option<String> {
    jiff::Timestamp::try_from(time).ok().map(|t| t.to_string())
}

pub(crate) fn rfc3339_from_unix(seconds: i64, nanos: i64) -> Option<String> {
    let ns = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    jiff::Timestamp::from_nanosecond(ns)
        .ok()
        .map(|t| t.to_string())
}

/// "file", "directory", "symlink" or "other" (devices, sockets, pipes).
pub(crate) fn type_name(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

/// `ls -l` style mode: `-rwxr-sr-t`.
pub(crate) fn mode_string(meta: &fs::Metadata) -> String {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        'l'
    } else if ft.is_dir() {
        'd'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        '-'
    };
    let mode = meta.permissions().mode();
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    let special = |exec_mask: u32, special_mask: u32, set: char, unset: char, plain: char| match (
        mode & exec_mask != 0,
        mode & special_mask != 0,
    ) {
        (true, true) => set,
        (false, true) => unset,
        (true, false) => plain,
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S', 'x'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S', 'x'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T', 'x'),
    ]
    .into_iter()
    .collect()
}

/// Size as listings show it: none for directories, whose "size" is only the kernel's
/// bookkeeping.
pub(crate) fn listing_size(meta: &fs::Metadata) -> Option<u64> {
    (!meta.is_dir()).then_some(meta.len())
}

/// Users and groups of the host, from its own /etc/passwd and /etc/group: the agent's
/// container has other ones, so libc's getpwuid would name the wrong users.
#[derive(Debug, Default, Clone)]
pub(crate) struct Accounts {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    /// (user, home directory) in /etc/passwd order.
    homes: Vec<(String, String)>,
}

impl Accounts {
    pub(crate) fn load(hfs: &HostFs) -> Self {
        let mut accounts = Accounts::default();
        if let Ok(passwd) = hfs.read_to_string("/etc/passwd") {
            for line in passwd.lines() {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 7 || line.starts_with('#') {
                    continue;
                }
                if let Ok(uid) = fields[2].parse::<u32>() {
                    // getpwuid answers with the first entry of a uid.
                    accounts
                        .users
                        .entry(uid)
                        .or_insert_with(|| fields[0].to_owned());
                }
                accounts
                    .homes
                    .push((fields[0].to_owned(), fields[5].to_owned()));
            }
        }
        if let Ok(group) = hfs.read_to_string("/etc/group") {
            for line in group.lines() {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 3 || line.starts_with('#') {
                    continue;
                }
                if let Ok(gid) = fields[2].parse::<u32>() {
                    accounts
                        .groups
                        .entry(gid)
                        .or_insert_with(|| fields[0].to_owned());
                }
            }
        }
        accounts
    }

    /// The user's name, or the number when the host does not know it.
    pub(crate) fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub(crate) fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }

    /// Home directories that exist, each once, with their user: /root, those of
    /// /etc/passwd, and every directory in /home (named after it when passwd does not
    /// know it), in that order.
    pub(crate) fn homes(&self, hfs: &HostFs) -> Vec<Home> {
        let mut seen = std::collections::HashSet::new();
        let mut homes = Vec::new();
        let mut candidates: Vec<(String, String)> = vec![("root".to_owned(), "/root".to_owned())];
        candidates.extend(self.homes.iter().cloned());
        candidates.extend(
            hfs.list("/home")
                .into_iter()
                .map(|name| (name.clone(), join("/home", &name))),
        );
        for (user, path) in candidates {
            if !path.starts_with('/') || path == "/" {
                continue;
            }
            let Ok(canonical) = hfs.canonical(&path) else {
                continue;
            };
            if !hfs.is_dir(&canonical) || !seen.insert(canonical) {
                continue;
            }
            homes.push(Home { user, path });
        }
        homes
    }
}

/// A user's home directory (device path, as /etc/passwd or /home names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Home {
    pub user: String,
    pub path: String,
}

/// Hashes of a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hashes {
    pub sha256: String,
    pub sha1: String,
    pub md5: String,
}

/// O_NOATIME: reading a file to hash it must not change the access time an investigator
/// may need later. The value is the generic one, shared by the architectures listed.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "s390x",
    target_arch = "loongarch64"
))]
const O_NOATIME: i32 = 0o1_000_000;
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "s390x",
    target_arch = "loongarch64"
)))]
const O_NOATIME: i32 = 0;

/// Opens a host file for reading without touching its access time where the kernel lets
/// us (only the owner or CAP_FOWNER may ask for that).
pub(crate) fn open_quietly(host: &Path) -> io::Result<fs::File> {
    let quiet = fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOATIME)
        .open(host);
    match quiet {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && O_NOATIME != 0 => {
            fs::File::open(host)
        }
        other => other,
    }
}

/// SHA-256, SHA-1 and MD5 of a host file in one pass, checking for cancellation between
/// chunks so that a huge file does not hold up a cancel.
pub(crate) fn hash_file(ctx: &ExecContext, host: &Path) -> io::Result<Result<Hashes, ExecError>> {
    let mut file = open_quietly(host)?;
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = ctx.check() {
            return Ok(Err(e));
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        sha256.update(chunk);
        sha1.update(chunk);
        md5.update(chunk);
    }
    Ok(Ok(Hashes {
        sha256: hex::encode(sha256.finalize()),
        sha1: hex::encode(sha1.finalize()),
        md5: hex::encode(md5.finalize()),
    }))
}

/// The owner and group of a file, as names.
pub(crate) fn owner_of(accounts: &Accounts, meta: &fs::Metadata) -> (String, String) {
    (accounts.user(meta.uid()), accounts.group(meta.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_keeps_links_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("usr/lib/x")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../../..", root.join("usr/lib/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let hfs = HostFs::new(root);
        assert_eq!(hfs.resolve("/", "/lib/x", true).unwrap(), "/usr/lib/x");
        assert_eq!(hfs.resolve("/usr", "lib/x/..", true).unwrap(), "/usr/lib");
        assert_eq!(hfs.resolve("/", "/usr/lib/up/../..", true).unwrap(), "/");
        assert_eq!(hfs.resolve("/", "../../..", true).unwrap(), "/");
        assert_eq!(hfs.resolve("/", "/lib", false).unwrap(), "/lib");
        assert!(hfs.resolve("/", "/loop1", true).is_err());
        assert_eq!(
            hfs.resolve("/", "/nope", true).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(hfs.link_target("/lib").as_deref(), Some("/usr/lib"));
        assert_eq!(hfs.link_target("/usr/lib/up").as_deref(), Some("/"));
    }

    #[test]
    fn path_helpers() {
        assert_eq!(normalize("/a/b", "../c/./d"), "/a/c/d");
        assert_eq!(normalize("/a", "/x/../../y"), "/y");
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert_eq!(file_name("/a/b/"), "b");
        assert_eq!(file_name("/"), "/");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
    }

    #[test]
    fn mode_strings_follow_ls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o4754)).unwrap();
        assert_eq!(mode_string(&fs::metadata(&file).unwrap()), "-rwsr-xr--");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            mode_string(&fs::metadata(dir.path()).unwrap()),
            "drwxrwxrwt"
        );
    }

    #[test]
    fn accounts_come_from_the_host_root() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::create_dir_all(dir.path().join("home/bob")).unwrap();
        fs::create_dir_all(dir.path().join("srv/alice")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/srv/alice:/bin/sh\nbroken\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:alice\n",
        )
        .unwrap();
        let hfs = HostFs::new(dir.path());
        let accounts = Accounts::load(&hfs);
        assert_eq!(accounts.user(1000), "alice");
        assert_eq!(accounts.user(4242), "4242");
        assert_eq!(accounts.group(50), "staff");
        let homes = accounts.homes(&hfs);
        let names: Vec<(&str, &str)> = homes
            .iter()
            .map(|h| (h.user.as_str(), h.path.as_str()))
            .collect();
        assert_eq!(names, vec![("alice", "/srv/alice"), ("bob", "/home/bob")]);
    }
}
