//! The event API service: validates incoming events (PROTOCOL §2), stores
//! them durably, then publishes them on the bus. A `200` is only sent once
//! the events are on disk (the data store shares flushes between requests).

use actix::prelude::*;
use base64::Engine;
use serde_json::{Map, Value};
use ulid::Ulid;

use crate::clock::Timestamp;
use crate::model::EventRecord;
use crate::store::{Backends, StoreError};

/// Most events in one request (GO's limit).
pub const MAX_EVENTS_PER_REQUEST: usize = 5_000;
/// Largest single event, bytes of JSON (GO's `AbsoluteMaxEventSize`).
pub const MAX_EVENT_BYTES: usize = 3 << 20;

/// Longest event name, bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 256;

/// Earliest and latest accepted `ts` (1980-01-01, 2100-01-01), ms.
const MIN_TS: i64 = 315_532_800_000;
const MAX_TS: i64 = 4_102_444_800_000;

/// Why a request's events were refused; nothing was stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvents(pub String);

/// Parses `x-inngest-event-id-seed: <millis>,<base64 of 10 bytes>`.
pub fn parse_seed(header: &str) -> Option<(u64, [u8; 10])> {
    let (millis, entropy) = header.trim().split_once(',')?;
    let millis: u64 = millis.trim().parse().ok().filter(|m| *m > 0)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(entropy.trim())
        .ok()?;
    let entropy: [u8; 10] = bytes.try_into().ok()?;
    Some((millis, entropy))
}

/// The id of the `index`-th (0-based) event of a request with this seed: the
/// last 4 entropy bytes, read big-endian, plus the 1-based position.
pub fn seeded_id(seed: (u64, [u8; 10]), index: usize) -> Ulid {
    let (millis, mut entropy) = seed;
    let counter = u32::from_be_bytes([entropy[6], entropy[7], entropy[8], entropy[9]])
        .wrapping_add(index as u32 + 1);
    entropy[6..10].copy_from_slice(&counter.to_be_bytes());
    let mut random = 0u128;
    for byte in entropy {
        random = (random << 8) | u128::from(byte);
    }
    Ulid::from_parts(millis, random)
}

/// Validates and normalizes a request body into event records.
pub fn normalize_events(
    body: &[u8],
    seed_header: Option<&str>,
    now: Timestamp,
) -> Result<Vec<EventRecord>, InvalidEvents> {
    let invalid = |message: String| InvalidEvents(message);
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|err| invalid(format!("the body is not valid JSON: {err}")))?;
    let raw_events = match parsed {
        Value::Array(events) => events,
        object @ Value::Object(_) => vec![object],
        _ => {
            return Err(invalid(
                "the body must be an event object or an array of events".into(),
            ))
        }
    };
    if raw_events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(invalid(format!(
            "too many events in one request: {} (at most {MAX_EVENTS_PER_REQUEST})",
            raw_events.len()
        )));
    }
    let seed = seed_header.and_then(parse_seed);
    raw_events
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            normalize_event(raw, index, seed, now)
                .map_err(|message| invalid(format!("event {index}: {message}")))
        })
        .collect()
}

fn normalize_event(
    raw: Value,
    index: usize,
    seed: Option<(u64, [u8; 10])>,
    now: Timestamp,
) -> Result<EventRecord, String> {
    let Value::Object(mut fields) = raw else {
        return Err("an event must be a JSON object".into());
    };
    let name = match fields.remove("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err("the event name is required".into())
        }
        Some(_) => return Err("the event name must be a string".into()),
    };
    if name.len() > MAX_EVENT_NAME_BYTES {
        return Err(format!(
            "the event name is {} bytes; the most is {MAX_EVENT_NAME_BYTES}",
            name.len()
        ));
    }
    if name.trim().to_ascii_lowercase().starts_with("inngest/") {
        return Err(format!(
            "event name {name:?} is reserved: names starting with inngest/ are internal"
        ));
    }
    let mut data = match fields.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(data)) => data,
        Some(_) => return Err("the event data must be a JSON object".into()),
    };
    data.remove("_inngest");
    let user = match fields.remove("user") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(user)) => user,
        Some(_) => return Err("the event user must be a JSON object".into()),
    };
    let ts = match fields.remove("ts") {
        None | Some(Value::Null) => now.millis(),
        Some(Value::Number(n)) => match n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)) {
            Some(0) => now.millis(),
            Some(ts) if (MIN_TS..MAX_TS).contains(&ts) => ts,
            _ => {
                return Err(format!(
                    "the event ts {n} is not a time between 1980 and 2100 in ms"
                ))
            }
        },
        Some(_) => return Err("the event ts must be a number of milliseconds".into()),
    };
    let internal_id = match seed {
        Some(seed) => seeded_id(seed, index),
        None => Ulid::new(),
    }
    .to_string();
    let id = match fields.remove("id") {
        None | Some(Value::Null) => internal_id.clone(),
        Some(Value::String(id)) if id.is_empty() => internal_id.clone(),
        Some(Value::String(id)) => id,
        Some(_) => return Err("the event id must be a string".into()),
    };
    let mut payload = Map::new();
    payload.insert("name".into(), Value::String(name.clone()));
    payload.insert("data".into(), Value::Object(data));
    payload.insert("id".into(), Value::String(id.clone()));
    payload.insert("ts".into(), Value::from(ts));
    payload.insert("user".into(), Value::Object(user));
    match fields.remove("v") {
        None | Some(Value::Null) => {}
        Some(Value::String(v)) => {
            payload.insert("v".into(), Value::String(v));
        }
        Some(_) => return Err("the event version v must be a string".into()),
    }
    // Sessions: the user's and the inherited layer, resolved into one.
    if let Some(meta) = crate::model::sessions::resolve_meta(fields.get("meta"))? {
        payload.insert("meta".into(), meta);
    }
    let payload = Value::Object(payload).to_string();
    if payload.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "the event is {} bytes; the most is {MAX_EVENT_BYTES}",
            payload.len()
        ));
    }
    Ok(EventRecord {
        internal_id,
        name,
        id,
        received_at: now.millis(),
        payload,
        target_fn: None,
    })
}

/// Stores events durably, then publishes them: the one path every event
/// takes, from users, from functions, and from Baton itself.
pub async fn publish_events(backends: &Backends, events: &[EventRecord]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    backends.data.put_events(events).await?;
    // The events are durable; a failed publish is recovered by the runner's
    // sweep of pending events, so it does not fail the request.
    if let Err(err) = backends.bus.publish(events).await {
        tracing::warn!(error = %err, "cannot publish events; the runner picks them up from the data store within a minute");
    }
    Ok(())
}

pub struct EventApi {
    backends: Backends,
}

impl EventApi {
    pub fn new(backends: Backends) -> EventApi {
        EventApi { backends }
    }
}

impl Actor for EventApi {
    type Context = Context<Self>;
}

/// Stores and publishes validated events; replies with their ids once they
/// are on disk. The flag says the ids were derived from the SDK's seed
/// header, so they may name events stored already.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, StoreError>")]
pub struct IngestEvents(pub Vec<EventRecord>, pub bool);

/// Whether two payloads are the same event sent again (an SDK retry): equal
/// but for `ts`, which defaults to the time of receipt.
fn same_event(stored: &str, new: &str) -> bool {
    let strip = |text: &str| {
        let mut value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.remove("ts");
        }
        value
    };
    strip(stored) == strip(new)
}

/// Seeded ids are unique per payload and never overwrite a stored event: an
/// event already stored under its id with the same payload is an SDK retry
/// (its id is answered and nothing is stored again); with another payload
/// it gets a fresh id.
async fn settle_seeded_ids(
    backends: &Backends,
    events: Vec<EventRecord>,
) -> Result<(Vec<EventRecord>, Vec<String>), StoreError> {
    let mut fresh = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    for mut event in events {
        if let Some(stored) = backends.data.get_event(&event.internal_id).await? {
            if same_event(&stored.payload, &event.payload) {
                ids.push(stored.internal_id);
                continue;
            }
            let id = Ulid::new().to_string();
            tracing::warn!(seeded_id = %event.internal_id, new_id = %id,
                "an event seed was reused with another payload; the event gets a fresh id");
            if event.id == event.internal_id {
                let mut payload: Value =
                    serde_json::from_str(&event.payload).unwrap_or(Value::Null);
                payload["id"] = Value::String(id.clone());
                event.payload = payload.to_string();
                event.id = id.clone();
            }
            event.internal_id = id;
        }
        ids.push(event.internal_id.clone());
        fresh.push(event);
    }
    Ok((fresh, ids))
}

impl Handler<IngestEvents> for EventApi {
    type Result = ResponseFuture<Result<Vec<String>, StoreError>>;

    fn handle(
        &mut self,
        IngestEvents(events, seeded): IngestEvents,
        _: &mut Self::Context,
    ) -> Self::Result {
        let backends = self.backends.clone();
        Box::pin(async move {
            if seeded {
                let (fresh, ids) = settle_seeded_ids(&backends, events).await?;
                publish_events(&backends, &fresh).await?;
                return Ok(ids);
            }
            publish_events(&backends, &events).await?;
            Ok(events.into_iter().map(|e| e.internal_id).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_700_000_000_000);

    fn ok(body: &str) -> Vec<EventRecord> {
        normalize_events(body.as_bytes(), None, NOW).unwrap()
    }

    #[track_caller]
    fn bad(body: &str, expected: &str) {
        let err = normalize_events(body.as_bytes(), None, NOW).unwrap_err();
        assert!(err.0.contains(expected), "{body}: {err}");
    }

    #[test]
    fn objects_and_arrays() {
        assert_eq!(ok(r#"{"name":"a/b"}"#).len(), 1);
        let events = ok(
            r#"[{"name":"a/b","data":{"x":1,"_inngest":{}}},{"name":"c","id":"mine","ts":1700000000001}]"#,
        );
        assert_eq!(events.len(), 2);
        let first: Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(first["data"], serde_json::json!({"x": 1}));
        assert_eq!(first["ts"], serde_json::json!(NOW.millis()));
        assert_eq!(first["id"], Value::String(events[0].internal_id.clone()));
        assert_eq!(events[1].id, "mine");
        assert!(ok("[]").is_empty());
    }

    #[test]
    fn refusals() {
        bad("{", "not valid JSON");
        bad("3", "event object or an array");
        bad(r#"[{"data":{}}]"#, "name is required");
        bad(r#"[{"name":""}]"#, "name is required");
        bad(r#"[{"name":7}]"#, "must be a string");
        bad(r#"[{"name":"Inngest/function.failed"}]"#, "reserved");
        bad(r#"[{"name":"a","data":[1]}]"#, "data must be a JSON object");
        bad(r#"[{"name":"a","data":"x"}]"#, "data must be a JSON object");
        bad(r#"[{"name":"a","ts":5}]"#, "between 1980 and 2100");
        bad(r#"[{"name":"ok"},{"name":"inngest/x"}]"#, "event 1");
        bad(r#"[{"name":" inngest/function.finished"}]"#, "reserved");
        bad(
            &format!(r#"{{"name":"{}"}}"#, "n".repeat(300)),
            "the most is 256",
        );
    }

    #[test]
    fn sessions_are_resolved_and_kept() {
        let events = ok(r#"[
            {"name":"a","meta":{"sessions":{"org":"override"},"propagated_sessions":{"org":"acme","team":"core"},"other":1}},
            {"name":"b","meta":{"sessions":{}}},
            {"name":"c"}
        ]"#);
        let payload = |i: usize| serde_json::from_str::<Value>(&events[i].payload).unwrap();
        assert_eq!(
            payload(0)["meta"],
            serde_json::json!({"sessions": {"org": "override", "team": "core"}})
        );
        assert!(payload(1).get("meta").is_none());
        assert!(payload(2).get("meta").is_none());
        bad(
            r#"[{"name":"a","meta":{"sessions":{"org":true}}}]"#,
            "event 0: event session \"org\"",
        );
        bad(r#"[{"name":"a","meta":[]}]"#, "meta must be an object");
    }

    #[test]
    fn seeded_ids_follow_go() {
        // entropy: 10 bytes, last four = 0x000000ff.
        let entropy = [1, 2, 3, 4, 5, 6, 0, 0, 0, 0xff];
        let header = format!(
            "1700000000000,{}",
            base64::engine::general_purpose::STANDARD.encode(entropy)
        );
        let seed = parse_seed(&header).unwrap();
        let first = seeded_id(seed, 0);
        assert_eq!(first.timestamp_ms(), 1_700_000_000_000);
        assert_eq!(first.random() & 0xffff_ffff, 0x100);
        assert_eq!(seeded_id(seed, 1).random() & 0xffff_ffff, 0x101);
        // Same seed, same ids: an SDK retry is idempotent.
        let a = normalize_events(br#"[{"name":"a"},{"name":"b"}]"#, Some(&header), NOW).unwrap();
        let b = normalize_events(br#"[{"name":"a"},{"name":"b"}]"#, Some(&header), NOW).unwrap();
        assert_eq!(a[1].internal_id, b[1].internal_id);
        assert_ne!(a[0].internal_id, a[1].internal_id);
        assert!(parse_seed("0,AAAAAAAAAAAAAA==").is_none());
        assert!(parse_seed("17,AAAA").is_none());
    }
}
