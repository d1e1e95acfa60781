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
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
