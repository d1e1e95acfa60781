//! The agent's logs: JSON lines, filtered by the level the agent was started with and,
//! inside a command, by the level its session chose with `trace`.
//!
//! Each command runs in a [`command_span`] that carries its session and uid, so every line
//! its work logs says which command it belongs to. [`SessionFilter`] looks up the session
//! of the current span: when that session has a level of its own, the level decides;
//! otherwise the agent's global filter does. One analyst raising the level to debug
//! therefore sees their commands' debug lines without flooding the log with everybody
//! else's.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber, span};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

/// Name of the span a command's work runs in.
pub const COMMAND_SPAN: &str = "command";

/// Sessions whose level is remembered; the oldest setting is forgotten beyond this, so a
/// long-lived agent does not grow with every session that ever used `trace`.
const MAX_SESSIONS: usize = 1024;

/// Only our own code runs inside a command span in a way a session owns; the dependencies'
/// callsites (h2, hyper, rustls) keep the global filter's cached, static decision.
const OUR_TARGETS: &[&str] = &["liveresponse_agent", "liveresponse_api"];

/// The span a command's work runs in: every line it logs carries `session` and `uid`.
pub fn command_span(session: &str, uid: &str) -> tracing::Span {
    tracing::info_span!(COMMAND_SPAN, session = %session, uid = %uid)
}

/// The log level each session chose with `trace`; cheap to clone and share.
#[derive(Clone)]
pub struct SessionLevels {
    inner: Arc<Inner>,
}

struct Inner {
    /// What `trace` shows for a session that set nothing: the agent's own filter.
    default: String,
    /// Whether any session set a level: the fast path of every filter decision.
    any: AtomicBool,
    levels: RwLock<Levels>,
}

#[derive(Default)]
struct Levels {
    by_session: HashMap<String, LevelFilter>,
    order: VecDeque<String>,
}

impl SessionLevels {
    /// `default` describes the agent's global filter, e.g. `info`.
    pub fn new(default: impl Into<String>) -> Self {
        SessionLevels {
            inner: Arc::new(Inner {
                default: default.into(),
                any: AtomicBool::new(false),
                levels: RwLock::new(Levels::default()),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Levels> {
        self.inner.levels.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a session's level (`error`, `warn`, `info` or `debug`); returns its name.
    pub fn set(&self, session: &str, level: &str) -> Result<String, String> {
        let filter = match level.trim().to_ascii_lowercase().as_str() {
            "error" => LevelFilter::ERROR,
            "warn" => LevelFilter::WARN,
            "info" => LevelFilter::INFO,
            "debug" => LevelFilter::DEBUG,
            _ => {
                return Err(format!(
                    "bad trace level {level:?}: use debug, info, warn or error"
                ));
            }
        };
        let mut levels = self.inner.levels.write().unwrap_or_else(|p| p.into_inner());
        if levels
            .by_session
            .insert(session.to_owned(), filter)
            .is_none()
        {
            levels.order.push_back(session.to_owned());
            while levels.order.len() > MAX_SESSIONS {
                if let Some(oldest) = levels.order.pop_front() {
                    levels.by_session.remove(&oldest);
                }
            }
        }
        self.inner.any.store(true, Ordering::Release);
        Ok(level_name(filter).to_owned())
    }

    /// The level a session set, if any.
    pub fn get(&self, session: &str) -> Option<LevelFilter> {
        if !self.inner.any.load(Ordering::Acquire) {
            return None;
        }
        self.read().by_session.get(session).copied()
    }

    /// What `trace` without a level shows: the session's level, else the agent's.
    pub fn shown(&self, session: &str) -> String {
        self.get(session)
            .map_or_else(|| self.inner.default.clone(), |l| level_name(l).to_owned())
    }
}

fn level_name(level: LevelFilter) -> &'static str {
    match level {
        LevelFilter::ERROR => "error",
        LevelFilter::WARN => "warn",
        LevelFilter::INFO => "info",
        LevelFilter::DEBUG => "debug",
        LevelFilter::TRACE => "trace",
        _ => "off",
    }
}

/// The session a command span belongs to, kept in the span's extensions.
struct SessionOf(String);

fn is_ours(meta: &Metadata<'_>) -> bool {
    OUR_TARGETS.iter().any(|t| {
        meta.target()
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

fn is_command_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.name() == COMMAND_SPAN && is_ours(meta)
}

/// The global filter, overridden inside a command span by its session's level.
pub struct SessionFilter {
    global: EnvFilter,
    levels: SessionLevels,
}

impl SessionFilter {
    pub fn new(global: EnvFilter, levels: SessionLevels) -> Self {
        SessionFilter { global, levels }
    }

    fn session_level<S>(&self, cx: &Context<'_, S>) -> Option<LevelFilter>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let current = cx.lookup_current()?;
        current.scope().find_map(|span| {
            let extensions = span.extensions();
            let session = extensions.get::<SessionOf>()?;
            self.levels.get(&session.0)
        })
    }
}

impl<S> Filter<S> for SessionFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        // Always kept, whatever the global level, so that the session of the work inside
        // can be found and every line of that work carries the uid.
        if is_command_span(meta) {
            return true;
        }
        if is_ours(meta)
            && self.levels.inner.any.load(Ordering::Acquire)
            && let Some(level) = self.session_level(cx)
        {
            return level >= *meta.level();
        }
        Filter::<S>::enabled(&self.global, meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_ours(meta) {
            // Decided per event: the same line is wanted in one session and not another.
            Interest::sometimes()
        } else {
            Filter::<S>::callsite_enabled(&self.global, meta)
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // A session may ask for debug whatever the global level.
        Filter::<S>::max_level_hint(&self.global).map(|global| global.max(LevelFilter::DEBUG))
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if is_command_span(attrs.metadata()) {
            let mut visitor = SessionField(None);
            attrs.record(&mut visitor);
            if let (Some(session), Some(span)) = (visitor.0, ctx.span(id)) {
                span.extensions_mut().replace(SessionOf(session));
            }
        }
        Filter::<S>::on_new_span(&self.global, attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        Filter::<S>::on_record(&self.global, id, values, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_enter(&self.global, id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_exit(&self.global, id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_close(&self.global, id, ctx);
    }
}

struct SessionField(Option<String>);

impl Visit for SessionField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "session" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "session" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// The agent's log layer: JSON lines to `writer`, each with its span's fields (session,
/// uid), filtered by `global` and the sessions' levels.
pub fn json_layer<S, W>(global: EnvFilter, levels: SessionLevels, writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_writer(writer)
        .with_filter(SessionFilter::new(global, levels))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use tracing_subscriber::prelude::*;

    use super::*;

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    /// Runs `work` under the agent's layer with global level `global`.
    fn logged(global: &str, levels: &SessionLevels, work: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry().with(json_layer(
            EnvFilter::new(global),
            levels.clone(),
            out.clone(),
        ));
        tracing::subscriber::with_default(subscriber, work);
        out.lines()
    }

    fn has(lines: &[String], text: &str) -> bool {
        lines.iter().any(|l| l.contains(text))
    }

    #[test]
    fn a_sessions_level_applies_to_its_commands_only() {
        let levels = SessionLevels::new("info");
        assert_eq!(levels.set("s1", "DEBUG").as_deref(), Ok("debug"));
        let lines = logged("info", &levels, || {
            command_span("s1", "uid-1").in_scope(|| {
                tracing::debug!("debug of s1");
                // Nested spans keep the session of the command around them.
                tracing::info_span!("step").in_scope(|| tracing::debug!("nested debug of s1"));
            });
            command_span("s2", "uid-2").in_scope(|| {
                tracing::debug!("debug of s2");
                tracing::info!("info of s2");
            });
            tracing::debug!("debug outside any command");
            tracing::info!("info outside any command");
        });
        assert!(has(&lines, "\"debug of s1\""), "{lines:#?}");
        assert!(has(&lines, "nested debug of s1"), "{lines:#?}");
        assert!(!has(&lines, "debug of s2"), "{lines:#?}");
        assert!(has(&lines, "info of s2"), "{lines:#?}");
        assert!(!has(&lines, "debug outside"), "{lines:#?}");
        assert!(has(&lines, "info outside"), "{lines:#?}");
        // Every line of a command's work names its command.
        let s1 = lines.iter().find(|l| l.contains("\"debug of s1\""));
        assert!(
            s1.is_some_and(|l| l.contains("\"uid\":\"uid-1\"") && l.contains("\"session\":\"s1\"")),
            "{s1:?}"
        );
    }

    #[test]
    fn a_quieter_session_level_hides_its_info_lines() {
        let levels = SessionLevels::new("info");
        assert!(levels.set("s1", "warn").is_ok());
        let lines = logged("info", &levels, || {
            command_span("s1", "u1").in_scope(|| {
                tracing::info!("info of s1");
                tracing::warn!("warning of s1");
            });
            command_span("s2", "u2").in_scope(|| tracing::info!("info of s2"));
        });
        assert!(!has(&lines, "info of s1"), "{lines:#?}");
        assert!(has(&lines, "warning of s1"), "{lines:#?}");
        assert!(has(&lines, "info of s2"), "{lines:#?}");
    }

    #[test]
    fn command_lines_carry_the_uid_even_under_a_quiet_global_level() {
        let levels = SessionLevels::new("warn");
        let lines = logged("warn", &levels, || {
            command_span("s1", "u-quiet").in_scope(|| tracing::warn!("trouble"));
        });
        let line = lines.iter().find(|l| l.contains("trouble"));
        assert!(
            line.is_some_and(|l| l.contains("\"uid\":\"u-quiet\"")),
            "{lines:#?}"
        );
    }

    #[test]
    fn levels_are_shown_checked_and_bounded() {
        let levels = SessionLevels::new("info");
        assert_eq!(levels.shown("s1"), "info");
        assert_eq!(levels.get("s1"), None);
        assert!(levels.set("s1", "verbose").is_err());
        assert_eq!(levels.set("s1", "debug").as_deref(), Ok("debug"));
        assert_eq!(levels.shown("s1"), "debug");
        assert_eq!(levels.shown("s2"), "info");
        for i in 0..MAX_SESSIONS {
            assert!(levels.set(&format!("other-{i}"), "warn").is_ok());
        }
        // The oldest setting made room for the newer ones.
        assert_eq!(levels.get("s1"), None);
        assert_eq!(
            levels.get(&format!("other-{}", MAX_SESSIONS - 1)),
            Some(LevelFilter::WARN)
        );
    }
}
