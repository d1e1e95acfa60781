//! Waiting for the operator: watch one Command or Session until it reaches a phase,
//! with a spinner on a terminal, and ride out API server outages (reported, then
//! retried with backoff) instead of failing.

use std::fmt::Debug;
use std::io::IsTerminal;
use std::time::Duration;

use futures::{StreamExt, pin_mut};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

use crate::client::lost_connection;
use crate::error::{Error, Result, is_expired_watch, is_transient_watch, watch_detail};
use crate::sanitize;

/// How long a wait stays silent before the spinner appears, so quick commands do not
/// flash one.
pub const SPINNER_DELAY: Duration = Duration::from_millis(300);

/// A spinner with the elapsed time on stderr, shown only on a terminal and only after a
/// delay. Lines printed through it do not tear the spinner.
pub struct Spinner {
    bar: ProgressBar,
    reveal: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    pub fn start(message: impl Into<String>, delay: Duration) -> Spinner {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(sanitize::line(&message.into()).into_owned());
        let reveal = std::io::stderr().is_terminal().then(|| {
            let bar = bar.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(Duration::from_millis(100));
            })
        });
        Spinner { bar, reveal }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        self.bar
            .set_message(sanitize::line(&message.into()).into_owned());
    }

    /// Turns the spinner into a progress bar of a transfer (getfile, putfile, run's
    /// script): bytes moved of `total`.
    /// `unit` is what is counted when not bytes ("files" for a scan).
    pub fn progress(&self, bytes: u64, total: u64, unit: Option<&str>) {
        if self.bar.length() != Some(total) {
            // The unit comes from the status an agent fed: shown as text, never as a template.
            let template = match unit {
                None => "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ({elapsed})",
                Some(_) => "{msg} {bar:30} {pos}/{len} {prefix} ({elapsed})",
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            if let Some(u) = unit {
                self.bar.set_prefix(crate::sanitize::line(u).into_owned());
            }
            self.bar.set_style(style);
            self.bar.set_length(total);
        }
        self.bar.set_position(bytes);
    }

    /// Prints a line on stderr above the spinner.
    pub fn note(&self, line: &str) {
        // Notes quote API errors, which may quote an object another user wrote.
        self.bar.suspend(|| eprintln!("{}", sanitize::text(line)));
    }

    /// A printer like [`Spinner::note`] for a task that outlives this borrow.
    pub fn printer(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |line: &str| bar.suspend(|| eprintln!("{}", sanitize::text(line)))
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(reveal) = self.reveal.take() {
            reveal.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Watches the object `name` until `done` holds for it and returns that version.
///
/// `update` sees every version (for the spinner's text); `notice` gets the lines to show
/// when the connection to the API server is lost and when it is back. Refusals (RBAC)
/// end the wait with an error; the object disappearing ends it with
/// [`Error::Deleted`] / [`Error::NotFound`].
pub async fn until<K>(
    api: Api<K>,
    kind: &'static str,
    name: &str,
    mut done: impl FnMut(&K) -> bool,
    mut update: impl FnMut(&K),
    mut notice: impl FnMut(&str),
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // The default list semantic is a consistent read, so an object created just before
    // the watch starts is in its initial list.
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, config).default_backoff();
    pin_mut!(stream);
    let mut last_error: Option<String> = None;
    let mut seen = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if last_error.take().is_some() {
                    notice("reconnected to the API server");
                }
                match event {
                    Event::Init => seen = false,
                    Event::InitApply(obj) | Event::Apply(obj) => {
                        seen = true;
                        update(&obj);
                        if done(&obj) {
                            return Ok(obj);
                        }
                    }
                    Event::InitDone if !seen => {
                        return Err(Error::NotFound {
                            kind,
                            name: name.to_owned(),
                        });
                    }
                    Event::InitDone => {}
                    Event::Delete(_) => {
                        return Err(Error::Deleted {
                            kind,
                            name: name.to_owned(),
                        });
                    }
                }
            }
            Err(err) if is_expired_watch(&err) => {}
            Err(err) if is_transient_watch(&err) => {
                let detail = watch_detail(&err);
                // One line per outage (or per change of symptom), not one per retry.
                if last_error.as_deref() != Some(detail.as_str()) {
                    notice(&lost_connection(&detail));
                    last_error = Some(detail);
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    // The watcher retries forever; it only ends if its stream is dropped.
    Err(Error::Usage(format!("stopped watching {kind} {name}")))
}

/// Runs `work` unless Ctrl+C comes first (`None`). Once the console has a SIGINT handler,
/// Ctrl+C no longer kills the process, so every API call that could hang races it.
pub async fn interruptible<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        value = work => Some(value),
        _ = tokio::signal::ctrl_c() => None,
    }
}
