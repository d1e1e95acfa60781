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

use crate::provider::{ExecContext, ExecError, human_size};

/// Linux's own limit on symbolic links followed while resolving one path (ELOOP).
const MAX_SYMLINKS: u32 = 40;

/// Most configuration files a parser reads (crontabs, units, profiles, authorized_keys)
/// are a few KiB; anything past this is not something a person wrote for the machine.
pub(crate) const CONFIG_CAP: u64 = 4 << 20;
/// passwd and group of a large host without a directory service.
pub(crate) const ACCOUNTS_CAP: u64 = 32 << 20;
/// Kernel pseudo files (/proc, /sys) the agent parses.
pub(crate) const PROC_CAP: u64 = 1 << 20;
/// Reads and hashes go by this much between cancel checks.
const READ_CHUNK: usize = 256 * 1024;

/// The host file system below `root`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostFs<'a> {
    root: &'a Path,
    /// The command reading: its cancel flag stops long reads, and files refused get a
    /// note in its warnings.
    ctx: Option<&'a ExecContext>,
}

impl<'a> HostFs<'a> {
    #[cfg(test)]
    pub(crate) fn new(root: &'a Path) -> Self {
        HostFs::at(root)
    }

    fn at(root: &'a Path) -> Self {
        HostFs { root, ctx: None }
    }

    pub(crate) fn of(ctx: &'a ExecContext) -> Self {
        HostFs {
            root: &ctx.host_root,
            ctx: Some(ctx),
        }
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

    /// Reads a configuration file of at most [`CONFIG_CAP`]; see [`HostFs::read_capped`].
    pub(crate) fn read_to_string(&self, device: &str) -> io::Result<String> {
        self.read_capped(device, CONFIG_CAP)
    }

    /// Reads a host file (links resolved within the root) of at most `cap` bytes; invalid
    /// UTF-8 is replaced, as these are configuration files meant for people. A file that
    /// is not regular or too large is refused with a note for the command's warnings,
    /// since the callers treat a missing file as normal and would hide it otherwise.
    pub(crate) fn read_capped(&self, device: &str, cap: u64) -> io::Result<String> {
        let canonical = self.canonical(device)?;
        // Masked units link here; its content is empty by definition, and a character
        // device would otherwise be refused with a note for every masked unit.
        if canonical == "/dev/null" {
            return Ok(String::new());
        }
        let result = open_regular(self.root, &canonical, false)
            .and_then(|(mut file, meta)| read_bounded(&mut file, &meta, cap, device, self.ctx));
        match result {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Err(ReadError::Io(e)) => Err(e),
            Err(ReadError::Refused(why)) => {
                if let Some(ctx) = self.ctx {
                    ctx.note(format!("skipped {why}"));
                }
                Err(io::Error::other(why))
            }
            Err(ReadError::Stopped(e)) => Err(io::Error::new(io::ErrorKind::Interrupted, e)),
        }
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
        let passwd = hfs
            .read_capped("/etc/passwd", ACCOUNTS_CAP)
            .unwrap_or_default();
        let group = hfs
            .read_capped("/etc/group", ACCOUNTS_CAP)
            .unwrap_or_default();
        Accounts::parse(&passwd, &group)
    }

    /// The accounts of passwd and group texts; lines that are not entries are skipped.
    pub(crate) fn parse(passwd: &str, group: &str) -> Self {
        let mut accounts = Accounts::default();
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

/// Why a host file was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    /// Not a regular file, too large, on a pseudo file system: the message says which.
    Refused(String),
    /// The command was cancelled or ran out of time while reading.
    Stopped(ExecError),
}

impl ReadError {
    /// As the analyst reads it, naming the device path.
    pub(crate) fn into_exec(self, path: &str) -> ExecError {
        match self {
            ReadError::Io(e) => io_error(&e, path),
            ReadError::Refused(why) => ExecError::Failed(why),
            ReadError::Stopped(e) => e,
        }
    }
}

/// What a file of this type is called in messages.
fn kind_of(ft: fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link (swapped in while it was being opened)"
    } else {
        "not a regular file"
    }
}

/// The kernel file systems whose files are generated on read: sizes lie (0 or 4096),
/// some reads never end or block (`/proc/kmsg`, `trace_pipe`) and some consume what
/// they return (`/proc/kmsg` drains the kernel log from syslog).
fn pseudo_fs_name(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0x7363_6673 => "securityfs",
        0x0027_e0eb => "cgroup",
        0x6367_7270 => "cgroup2",
        0xcafe_4a11 => "bpf",
        0x6265_6570 => "configfs",
        0x6165_676c => "pstore",
        0xde5e_81e4 => "efivarfs",
        _ => return None,
    })
}

fn fs_magic(file: &fs::File) -> Option<i64> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: the descriptor is open for the duration of the call and `stat` is a
    // buffer of the right type for the kernel to fill.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Some(stat.f_type as i64)
}

/// Opens a host file for reading only if it is a regular file, checked on the opened
/// descriptor so a file swapped after the check cannot slip through:
/// - first with `O_PATH | O_NOFOLLOW`, which runs no driver code (opening some devices
///   has effects: a tape rewinds, a watchdog arms) and does not wait for a FIFO writer;
/// - then, only for a regular file, reopened through `/proc/self/fd` (the same inode,
///   whatever the path now names) with `O_NONBLOCK | O_NOCTTY`, and `O_NOATIME` where the
///   kernel allows it, so hashing evidence leaves its access time alone.
///
/// Files on kernel pseudo file systems are refused when `refuse_pseudo` (hashing them is
/// meaningless and may drain them) and otherwise allowed for a bounded read.
pub(crate) fn open_regular(
    root: &Path,
    device: &str,
    refuse_pseudo: bool,
) -> Result<(fs::File, fs::Metadata), ReadError> {
    let handle = open_in_root(root, device).map_err(|e| {
        // A link swapped into a path already resolved (O_NOFOLLOW, ELOOP).
        if e.raw_os_error() == Some(libc::ELOOP) {
            ReadError::Refused(format!("{device} is a symbolic link; not read"))
        } else {
            ReadError::Io(e)
        }
    })?;
    let meta = handle.metadata().map_err(ReadError::Io)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::Refused(format!(
            "{device} is {}; not read",
            kind_of(meta.file_type())
        )));
    }
    if refuse_pseudo && let Some(name) = fs_magic(&handle).and_then(pseudo_fs_name) {
        return Err(ReadError::Refused(format!(
            "{device} is on {name}, a kernel pseudo file system whose files are generated as they are read; not read"
        )));
    }
    let host = HostFs::at(root).host_path(device);
    let file = reopen(&handle, &host).map_err(ReadError::Io)?;
    let reopened = file.metadata().map_err(ReadError::Io)?;
    if (reopened.dev(), reopened.ino()) != (meta.dev(), meta.ino()) {
        return Err(ReadError::Refused(format!(
            "{device} was replaced while it was being opened; not read"
        )));
    }
    Ok((file, meta))
}

/// Opens the device path `device` below `root` as an `O_PATH` handle, resolved by the
/// kernel so that no symbolic link leads out of `root`, even one swapped in after
/// [`HostFs::resolve`] looked: `openat2` with `RESOLVE_IN_ROOT` (Linux 5.6) treats `/`
/// and `..` as `root`, as a chroot would; where it is missing (older kernels, seccomp
/// filters that answer ENOSYS or EPERM), a walk one component at a time with
/// `O_NOFOLLOW` refuses any link on the way, since a resolved path has none. The final
/// component is never followed: a link there is returned as such for the caller to refuse.
pub(crate) fn open_in_root(root: &Path, device: &str) -> io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    let root_dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)?;
    let relative = device.trim_start_matches('/');
    if relative.is_empty() {
        return Ok(root_dir);
    }
    let name = std::ffi::CString::new(relative.as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut how: libc::open_how = unsafe {
        // SAFETY: open_how is plain integers; all zero is its documented default.
        std::mem::zeroed()
    };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, NUL-terminated name, and `how` with its true size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("openat2: bad descriptor"))?;
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        return Ok(unsafe { fs::File::from_raw_fd(fd) });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG) => {}
        _ => return Err(err),
    }
    walk_nofollow(root_dir, Path::new(relative).as_os_str().as_bytes())
}

/// The fallback of [`open_in_root`]: one `openat` per component, none followed.
fn walk_nofollow(root_dir: fs::File, relative: &[u8]) -> io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let parts: Vec<&[u8]> = relative
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let mut dir = root_dir;
    for (i, part) in parts.iter().enumerate() {
        if *part == b".." {
            // A resolved path has no `..`; one here was not made by HostFs::resolve.
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let last = i + 1 == parts.len();
        let name = std::ffi::CString::new(*part)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = libc::O_PATH
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last { 0 } else { libc::O_DIRECTORY };
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            // O_PATH | O_NOFOLLOW | O_DIRECTORY on a link: ENOTDIR, i.e. swapped in.
            return Err(if !last && err.raw_os_error() == Some(libc::ENOTDIR) {
                io::Error::from_raw_os_error(libc::ELOOP)
            } else {
                err
            });
        }
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        dir = unsafe { fs::File::from_raw_fd(fd) };
    }
    Ok(dir)
}

fn reopen(handle: &fs::File, host: &Path) -> io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    // Without /proc (a minimal container), the path is opened again; the caller compares
    // the inodes, and O_NOFOLLOW still refuses a link swapped in.
    let path = if by_fd.exists() {
        by_fd.as_path()
    } else {
        host
    };
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    let extra = if path == host { libc::O_NOFOLLOW } else { 0 };
    let open = |noatime: i32| {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | extra | noatime)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        // Only the owner or CAP_FOWNER may ask for O_NOATIME.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => open(0),
        other => other,
    }
}

/// Reads an opened file of at most `cap` bytes, checking for cancellation between chunks.
/// A file whose size says more is refused unread; a pseudo file that claims less but
/// keeps giving is refused once past the cap.
pub(crate) fn read_bounded(
    file: &mut fs::File,
    meta: &fs::Metadata,
    cap: u64,
    device: &str,
    ctx: Option<&ExecContext>,
) -> Result<Vec<u8>, ReadError> {
    let too_large = |size: u64| {
        ReadError::Refused(format!(
            "{device} is {}, more than the {} read of such files; not read",
            human_size(size),
            human_size(cap)
        ))
    };
    if meta.len() > cap {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if let Some(ctx) = ctx {
            ctx.check().map_err(ReadError::Stopped)?;
        }
        let n = read_some(file, &mut buf, device)?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&buf[..n]);
        if bytes.len() as u64 > cap {
            return Err(too_large(bytes.len() as u64));
        }
    }
}

/// One read; EAGAIN means a file that only pretends to be regular and would block.
fn read_some(file: &mut fs::File, buf: &mut [u8], device: &str) -> Result<usize, ReadError> {
    loop {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(ReadError::Refused(format!(
                    "{device} has no data now and would block; not read"
                )));
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// The first `cap` bytes of a kernel file of the agent's own /proc whose length a process
/// controls (/proc/PID/cmdline, environ), and whether there was more. Unlike
/// [`read_bounded`] it keeps what fits: the start of a huge command line is still evidence.
pub(crate) fn read_prefix(path: &Path, cap: usize) -> io::Result<(Vec<u8>, bool)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let mut bytes = Vec::new();
    // One byte past the cap tells a cut from a file of exactly `cap` bytes.
    file.take(cap as u64 + 1).read_to_end(&mut bytes)?;
    let cut = bytes.len() > cap;
    bytes.truncate(cap);
    Ok((bytes, cut))
}

/// Reads a small host file such as /etc/hostname (links resolved within `root`), at most
/// `cap` bytes: the hello must not stall on a FIFO or swallow a huge file planted there.
pub(crate) fn read_small_host_file(root: &Path, device: &str, cap: u64) -> io::Result<String> {
    HostFs::at(root).read_capped(device, cap)
}

/// SHA-256, SHA-1 and MD5 of a host file in one pass, streamed in chunks with a cancel
/// check between them, so that a huge file neither fills memory nor holds up a cancel.
/// Only regular files on real file systems: anything else is refused with a clear error.
pub(crate) fn hash_file(ctx: &ExecContext, device: &str) -> Result<Hashes, ReadError> {
    let (mut file, _) = open_regular(&ctx.host_root, device, true)?;
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        ctx.check().map_err(ReadError::Stopped)?;
        let n = read_some(&mut file, &mut buf, device)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        sha256.update(chunk);
        sha1.update(chunk);
        md5.update(chunk);
    }
    Ok(Hashes {
        sha256: hex::encode(sha256.finalize()),
        sha1: hex::encode(sha1.finalize()),
        md5: hex::encode(md5.finalize()),
    })
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

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn non_regular_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        mkfifo(&root.join("etc/fifo"));
        let ctx = ExecContext::new(root);
        let hfs = HostFs::of(&ctx);
        let started = std::time::Instant::now();
        let err = hfs.read_to_string("/etc/fifo").unwrap_err();
        assert_eq!(err.to_string(), "/etc/fifo is a FIFO; not read");
        let err = hash_file(&ctx, "/etc/fifo").unwrap_err();
        assert_eq!(
            err.into_exec("/etc/fifo").to_string(),
            "/etc/fifo is a FIFO; not read"
        );
        let err = hash_file(&ExecContext::new("/"), "/dev/zero").unwrap_err();
        assert_eq!(
            err.into_exec("/dev/zero").to_string(),
            "/dev/zero is a character device; not read"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(
            ctx.take_notes(),
            vec!["skipped /etc/fifo is a FIFO; not read"]
        );
    }

    #[test]
    fn pseudo_files_are_not_hashed_but_read_bounded() {
        let ctx = ExecContext::new("/");
        for path in ["/proc/kmsg", "/proc/self/status"] {
            if !Path::new(path).exists() {
                continue;
            }
            let err = hash_file(&ctx, path).unwrap_err();
            let text = err.into_exec(path).to_string();
            assert!(
                text.contains("kernel pseudo file system") || text.contains("permission"),
                "{path}: {text}"
            );
        }
        let (mut file, meta) = open_regular(Path::new("/"), "/proc/self/status", false).unwrap();
        let status = read_bounded(&mut file, &meta, PROC_CAP, "/proc/self/status", None).unwrap();
        assert!(String::from_utf8_lossy(&status).contains("Pid:"));
        let (mut file, meta) = open_regular(Path::new("/"), "/proc/self/status", false).unwrap();
        let err = read_bounded(&mut file, &meta, 16, "/proc/self/status", None).unwrap_err();
        assert!(matches!(err, ReadError::Refused(ref m) if m.contains("more than the 16 bytes")));
    }

    #[test]
    fn read_prefix_keeps_the_start_and_says_when_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abcdef").unwrap();
        assert_eq!(read_prefix(&path, 4).unwrap(), (b"abcd".to_vec(), true));
        assert_eq!(read_prefix(&path, 6).unwrap(), (b"abcdef".to_vec(), false));
        // A kernel file whose size says 0 is read as far as the cap too.
        let (cmdline, cut) = read_prefix(Path::new("/proc/self/cmdline"), 1 << 20).unwrap();
        assert!(!cmdline.is_empty() && !cut);
    }

    #[test]
    fn hostname_file_is_read_bounded() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/hostname"), "node-1\n").unwrap();
        assert_eq!(
            read_small_host_file(dir.path(), "/etc/hostname", 64).unwrap(),
            "node-1\n"
        );
        fs::write(dir.path().join("etc/hostname"), "x".repeat(100)).unwrap();
        assert!(read_small_host_file(dir.path(), "/etc/hostname", 64).is_err());
    }

    #[test]
    fn large_files_are_refused_unread_and_cancel_stops_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::File::create(root.join("huge"))
            .unwrap()
            .set_len(30 << 30)
            .unwrap();
        let ctx = ExecContext::new(root);
        let hfs = HostFs::of(&ctx);
        let err = hfs.read_to_string("/huge").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/huge is 30 GiB, more than the 4 MiB read of such files; not read"
        );
        ctx.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = hash_file(&ctx, "/huge").unwrap_err();
        assert!(matches!(err, ReadError::Stopped(ExecError::Cancelled)));
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(12), "12 bytes");
    }

    #[test]
    fn a_link_swapped_in_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("real"), "x").unwrap();
        symlink("/etc/hostname", root.join("swapped")).unwrap();
        let err = open_regular(root, "/swapped", false).unwrap_err();
        assert!(
            matches!(err, ReadError::Refused(ref m) if m.contains("symbolic link")),
            "{err:?}"
        );
        let ctx = ExecContext::new(root);
        assert_eq!(HostFs::of(&ctx).read_to_string("/real").unwrap(), "x");
        // Masked units: no note, no content.
        fs::create_dir_all(root.join("dev")).unwrap();
        symlink("/dev/null", root.join("masked")).unwrap();
        fs::write(root.join("dev/null"), "").unwrap();
        assert_eq!(HostFs::of(&ctx).read_to_string("/masked").unwrap(), "");
        assert!(ctx.take_notes().is_empty());
    }

    /// Links whose targets point out of the root, absolute and by `..`: the kernel's
    /// resolution keeps both inside, and the fallback walk refuses any link at all.
    #[test]
    fn kernel_resolution_stays_in_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "inside\n").unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../../../../../../etc", root.join("rel")).unwrap();
        for device in ["/abs/passwd", "/rel/passwd", "/etc/passwd"] {
            let mut file = open_in_root(root, device).unwrap();
            let meta = file.metadata().unwrap();
            let inside = fs::metadata(root.join("etc/passwd")).unwrap();
            assert_eq!(
                (meta.dev(), meta.ino()),
                (inside.dev(), inside.ino()),
                "{device}"
            );
            // O_PATH handles cannot be read; the inode comparison above is the proof.
            assert!(file.read(&mut [0u8; 8]).is_err());
        }
        // Not on the machine's /etc either: a file only the real /etc has.
        assert!(open_in_root(root, "/abs/hostname").is_err());
        let root_dir = fs::File::open(root).unwrap();
        let err = walk_nofollow(root_dir, b"abs/passwd").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        let root_dir = fs::File::open(root).unwrap();
        assert!(walk_nofollow(root_dir, b"etc/passwd").is_ok());
        let root_dir = fs::File::open(root).unwrap();
        assert!(walk_nofollow(root_dir, b"etc/../etc/passwd").is_err());
    }
}
