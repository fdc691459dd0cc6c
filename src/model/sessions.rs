//! Event sessions (`meta.sessions`): string ids under a few keys
//! (`{"org": "acme"}`) that group the runs an event starts, and the runs
//! and events those runs cause.
//!
//! An event may carry two layers: `sessions`, set by the user, and
//! `propagated_sessions`, stamped by the SDK from the sending run's
//! `ctx.sessions` (by `step.sendEvent`, `step.invoke`, and `inngest.send`
//! inside a run). [`resolve_meta`] folds them into the one `sessions` map
//! that is stored and handed to functions, as Inngest's server does when
//! it receives the event: the user's keys win, `null` for a key (or for the
//! whole field) cuts inherited ones, and inherited keys fill the remaining
//! places in byte order. Functions compute their `ctx.sessions` from their
//! events' sessions (the SDK intersects a batch's).

use serde_json::{Map, Value};

/// Most sessions on one event (Inngest's `MaxEventSessions`).
pub const MAX_EVENT_SESSIONS: usize = 5;
/// Longest session key, bytes.
pub const MAX_SESSION_KEY_BYTES: usize = 128;
/// Longest session id, bytes.
pub const MAX_SESSION_ID_BYTES: usize = 512;

/// The user's layer: its ids, the keys it cuts, and whether it was `null`
/// (cut everything inherited).
struct Manual {
    sessions: Map<String, Value>,
    cuts: Vec<String>,
    clear_all: bool,
}

/// A session id as sent: a string, or a number (kept as its text).
fn session_id(key: &str, value: &Value, what: &str) -> Result<String, String> {
    match value {
        Value::String(id) => Ok(id.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!("event session {key:?} must be {what}")),
    }
}

fn manual_layer(value: Option<&Value>) -> Result<Manual, String> {
    let mut manual = Manual {
        sessions: Map::new(),
        cuts: Vec::new(),
        clear_all: false,
    };
    match value {
        None => {}
        Some(Value::Null) => manual.clear_all = true,
        Some(Value::Object(fields)) => {
            for (key, value) in fields {
                if value.is_null() {
                    manual.cuts.push(key.clone());
                } else {
                    let id = session_id(key, value, "a string, number, or null")?;
                    manual.sessions.insert(key.clone(), Value::String(id));
                }
            }
        }
        Some(_) => return Err("the event's meta.sessions must be an object".into()),
    }
    Ok(manual)
}

fn propagated_layer(value: Option<&Value>) -> Result<Map<String, Value>, String> {
    let mut sessions = Map::new();
    match value {
        None | Some(Value::Null) => {}
        Some(Value::Object(fields)) => {
            for (key, value) in fields {
                let id = session_id(key, value, "a string or number")?;
                sessions.insert(key.clone(), Value::String(id));
            }
        }
        Some(_) => return Err("the event's meta.propagated_sessions must be an object".into()),
    }
    Ok(sessions)
}

/// Resolves an event's `meta` as sent into the `meta` to store with it:
/// `{"sessions": {...}}`, or `None` when it has no sessions. Other fields
/// of `meta` are not kept. Errors say what is wrong, for a 400.
pub fn resolve_meta(meta: Option<&Value>) -> Result<Option<Value>, String> {
    let fields = match meta {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err("the event meta must be an object".into()),
    };
    let manual = manual_layer(fields.get("sessions"))?;
    let mut propagated = propagated_layer(fields.get("propagated_sessions"))?;
    if manual.clear_all {
        propagated.clear();
    }
    for key in &manual.cuts {
        propagated.remove(key);
    }
    let mut sessions = manual.sessions;
    // Inherited keys fill the places left, in byte order, so the same
    // layers always give the same sessions.
    let mut inherited: Vec<(String, Value)> = propagated.into_iter().collect();
    inherited.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, id) in inherited {
        if sessions.len() >= MAX_EVENT_SESSIONS {
            break;
        }
        sessions.entry(key).or_insert(id);
    }
    validate(&sessions)?;
    if sessions.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::json!({ "sessions": sessions })))
}

fn validate(sessions: &Map<String, Value>) -> Result<(), String> {
    if sessions.len() > MAX_EVENT_SESSIONS {
        return Err(format!(
            "an event may carry at most {MAX_EVENT_SESSIONS} sessions; this one has {}",
            sessions.len()
        ));
    }
    for (key, id) in sessions {
        let id = id.as_str().unwrap_or_default();
        if key.is_empty() {
            return Err("event session keys cannot be empty".into());
        }
        if key.len() > MAX_SESSION_KEY_BYTES {
            return Err(format!(
                "event session key {key:?} is longer than {MAX_SESSION_KEY_BYTES} bytes"
            ));
        }
        if id.is_empty() {
            return Err(format!("event session {key:?} cannot have an empty id"));
        }
        if id.len() > MAX_SESSION_ID_BYTES {
            return Err(format!(
                "event session {key:?} has an id longer than {MAX_SESSION_ID_BYTES} bytes"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn check(meta: Value, expected: Value) {
        assert_eq!(
            resolve_meta(Some(&meta)).unwrap(),
            (!expected.is_null()).then(|| json!({ "sessions": expected }))
        );
    }

    #[test]
    fn layers_resolve_as_inngest_does() {
        check(
            json!({"sessions": {"org": "acme", "n": 7}}),
            json!({"org": "acme", "n": "7"}),
        );
        check(
            json!({"propagated_sessions": {"org": "acme"}}),
            json!({"org": "acme"}),
        );
        // The user's layer wins per key; inherited keys are kept beside it.
        check(
            json!({"sessions": {"org": "override"}, "propagated_sessions": {"org": "acme", "team": "core"}}),
            json!({"org": "override", "team": "core"}),
        );
        // null cuts one inherited key, or all of them.
        check(
            json!({"sessions": {"team": null}, "propagated_sessions": {"org": "acme", "team": "core"}}),
            json!({"org": "acme"}),
        );
        check(
            json!({"sessions": null, "propagated_sessions": {"org": "acme"}}),
            Value::Null,
        );
        // Inherited keys fill the places left, in byte order.
        check(
            json!({"sessions": {"a": "1", "b": "2", "c": "3", "d": "4"},
                   "propagated_sessions": {"z": "9", "y": "8", "e": "5"}}),
            json!({"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}),
        );
        check(json!({"other": 1}), Value::Null);
        check(json!({"sessions": {}}), Value::Null);
        assert_eq!(resolve_meta(None).unwrap(), None);
    }

    #[test]
    fn bad_sessions_are_refused() {
        for (meta, message) in [
            (json!("x"), "meta must be an object"),
            (json!({"sessions": [1]}), "must be an object"),
            (
                json!({"sessions": {"org": true}}),
                "string, number, or null",
            ),
            (
                json!({"propagated_sessions": {"org": null}}),
                "string or number",
            ),
            (json!({"sessions": {"": "x"}}), "cannot be empty"),
            (json!({"sessions": {"org": ""}}), "empty id"),
            (
                json!({"sessions": {"k": "x".repeat(513)}}),
                "longer than 512",
            ),
            (
                json!({"sessions": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}}),
                "at most 5",
            ),
        ] {
            let err = resolve_meta(Some(&meta)).unwrap_err();
            assert!(err.contains(message), "{meta}: {err}");
        }
    }
}
