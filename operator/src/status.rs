//! Helpers every status writer shares: conditions in the `metav1.Condition` shape whose
//! `lastTransitionTime` moves only when the status really changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets the condition of `type_` in `conditions`: a new entry, or an update that keeps
/// `lastTransitionTime` when `status` did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    let status = if status { "True" } else { "False" };
    let message = truncate(message, 1024);
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// The first `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    liveresponse_api::output::truncate(s, max).0.to_string()
}

/// An agent-provided text bounded to `max` bytes; a cut says how much was dropped, so a
/// reader knows the message is not whole.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let kept = truncate(s, max.saturating_sub(40));
    let dropped = s.len() - kept.len();
    format!("{kept}… [{dropped} more bytes cut]")
}

/// A machine-readable reason as an agent sent it: CamelCase letters and digits only, at most
/// 64 of them; anything else becomes `AgentError`.
pub fn reason(s: &str) -> String {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        s.to_string()
    } else if s.is_empty() {
        String::new()
    } else {
        "AgentError".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_texts_are_bounded_and_say_so() {
        let long = "x".repeat(10 << 20);
        let b = bounded(&long, 4096);
        assert!(b.len() <= 4096 + 8, "{}", b.len());
        assert!(b.ends_with("more bytes cut]"), "{}", &b[b.len() - 40..]);
        assert_eq!(bounded("short", 4096), "short");
        assert_eq!(reason("NotFound"), "NotFound");
        assert_eq!(reason("Not\u{1b}Found"), "AgentError");
        assert_eq!(reason(&"A".repeat(65)), "AgentError");
        assert_eq!(reason(""), "");
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let t0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap_or_default();
        let t1: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap_or_default();
        let t2: jiff::Timestamp = "2026-01-01T00:02:00Z".parse().unwrap_or_default();
        let mut cs = vec![];
        set_condition(
            &mut cs,
            "Ready",
            false,
            "Connecting",
            "waiting",
            Some(1),
            t0,
        );
        set_condition(&mut cs, "Ready", false, "Connecting", "still", Some(1), t1);
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time.0, t0);
        assert_eq!(cs[0].message, "still");
        set_condition(&mut cs, "Ready", true, "Connected", "ok", Some(2), t2);
        assert_eq!(cs[0].last_transition_time.0, t2);
        assert_eq!(cs[0].status, "True");
        assert_eq!(cs[0].observed_generation, Some(2));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
