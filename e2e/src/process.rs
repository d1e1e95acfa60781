//! Looking at and poking the stack's processes: their resident memory, and stopping one
//! (SIGSTOP) the way a hung or swapped-out machine stops answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Sends `signal` (a name such as `STOP`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let st = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !st.success() {
        bail!("kill -{signal} {pid} failed ({st})");
    }
    Ok(())
}

/// A process stopped with SIGSTOP; it gets SIGCONT when this is dropped, so a failing
/// test never leaves a frozen agent behind.
pub struct Stopped {
    pid: u32,
    resumed: bool,
}

impl Stopped {
    pub fn new(pid: u32) -> Result<Self> {
        signal(pid, "STOP")?;
        Ok(Self {
            pid,
            resumed: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGCONT now.
    pub fn resume(mut self) -> Result<()> {
        self.resumed = true;
        signal(self.pid, "CONT")
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = signal(self.pid, "CONT");
        }
    }
}

/// Resident memory of a process in bytes (`VmRSS` of /proc/PID/status).
pub fn vm_rss(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// The most resident memory a process had (`VmHWM`), since it started or since
/// [`reset_hwm`].
pub fn vm_hwm(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// Starts `VmHWM` again from the current resident memory, so a peak of the process's
/// start-up does not count as a peak of what is measured next.
pub fn reset_hwm(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// A `kB` field of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("empty {field} line"))?
        .parse()
        .with_context(|| format!("bad {field} line {line:?}"))?;
    Ok(kib * 1024)
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Clone, Copy)]
pub struct RssReport {
    /// Median of the samples taken before [`RssSampler::start`] returned.
    pub baseline: u64,
    pub peak: u64,
    pub samples: usize,
}

impl RssReport {
    /// Peak minus baseline, in bytes.
    pub fn growth(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }
}

impl std::fmt::Display for RssReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        write!(
            f,
            "baseline {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB over {} samples",
            self.baseline as f64 / MIB,
            self.peak as f64 / MIB,
            self.growth() as f64 / MIB,
            self.samples
        )
    }
}

/// Samples a process's VmRSS on its own thread (so a busy test runtime cannot skip
/// samples) until [`RssSampler::stop`].
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, usize)>>,
    baseline: u64,
}

impl RssSampler {
    /// Takes a baseline over `warmup`, then samples every `every` in the background.
    pub fn start(pid: u32, every: Duration, warmup: Duration) -> Result<Self> {
        let mut before = Vec::new();
        let until = Instant::now() + warmup;
        loop {
            before.push(vm_rss(pid)?);
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(every);
        }
        before.sort_unstable();
        let baseline = before[before.len() / 2];
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut n) = (baseline, 0usize);
            while !flag.load(Ordering::SeqCst) {
                // A process that exited has no more memory to report; the caller sees
                // that it is gone by other means.
                if let Ok(rss) = vm_rss(pid) {
                    peak = peak.max(rss);
                    n += 1;
                }
                std::thread::sleep(every);
            }
            (peak, n)
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            baseline,
        })
    }

    pub fn stop(mut self) -> RssReport {
        self.stop.store(true, Ordering::SeqCst);
        let (peak, samples) = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((self.baseline, 0));
        RssReport {
            baseline: self.baseline,
            peak,
            samples,
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
