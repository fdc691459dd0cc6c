//! The ops of a 206 answer as types (PROTOCOL §4.5): [`Opcode`] names every
//! opcode the JS SDK 4.24 and the Python SDK 0.5.19 send, with an explicit
//! [`Opcode::Unsupported`] for anything else, and each opcode's `opts`
//! parse into a validated struct of its own ([`Sleep`], [`WaitForEvent`],
//! [`WaitForSignal`], [`Invoke`], [`GatewayRequest`], [`DeferAdd`],
//! [`DeferAbort`]). A malformed op is an `Err` with a message naming the
//! field; the executor fails the run with it. Nothing here panics or does
//! IO, and nothing turns a wrong type into a silent default.
//!
//! Unknown fields are ignored everywhere (the SDKs add fields such as
//! `type`, `input` or `stackLine`), and `null` reads as absent (the Python
//! SDK sends `null` for unset options).

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::duration::{duration_from_json, MAX_SLEEP};

use super::Op;

/// Longest signal name, bytes.
pub const MAX_SIGNAL_BYTES: usize = 1_024;

/// An op's kind, from its `op` field. Serialized as the SDKs spell it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// A step's result, possibly wrapped in `{data}` (legacy, v0 runs).
    Step,
    /// A step's result, never wrapped.
    StepRun,
    /// A step threw; retried while attempts are left.
    StepError,
    /// A step failed for good.
    StepFailed,
    /// A step found and not run: run it next (a parallel group).
    StepPlanned,
    /// The JS SDK did not find the step it was asked to run.
    StepNotFound,
    Sleep,
    WaitForEvent,
    WaitForSignal,
    InvokeFunction,
    /// `step.ai.infer`: the server calls an AI provider.
    AiGateway,
    /// `step.fetch`: the server makes the HTTP call.
    Gateway,
    RunComplete,
    /// A durable endpoint's completion: `data` is `{data, ...}`.
    SyncRunComplete,
    /// The SDK asks to be called again.
    DiscoveryRequest,
    /// A lazy op: schedule a deferred run (`actors::defer`).
    DeferAdd,
    /// A lazy op: take a defer back.
    DeferAbort,
    /// Any other text (or none): not something this Baton can do.
    Unsupported(String),
}

/// A missing `op` field.
impl Default for Opcode {
    fn default() -> Opcode {
        Opcode::Unsupported(String::new())
    }
}

impl Opcode {
    pub fn parse(text: &str) -> Opcode {
        match text {
            "Step" => Opcode::Step,
            "StepRun" => Opcode::StepRun,
            "StepError" => Opcode::StepError,
            "StepFailed" => Opcode::StepFailed,
            "StepPlanned" => Opcode::StepPlanned,
            "StepNotFound" => Opcode::StepNotFound,
            "Sleep" => Opcode::Sleep,
            "WaitForEvent" => Opcode::WaitForEvent,
            "WaitForSignal" => Opcode::WaitForSignal,
            "InvokeFunction" => Opcode::InvokeFunction,
            "AIGateway" => Opcode::AiGateway,
            "Gateway" => Opcode::Gateway,
            "RunComplete" => Opcode::RunComplete,
            "SyncRunComplete" => Opcode::SyncRunComplete,
            "DiscoveryRequest" => Opcode::DiscoveryRequest,
            "DeferAdd" => Opcode::DeferAdd,
            "DeferAbort" => Opcode::DeferAbort,
            other => Opcode::Unsupported(other.to_string()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Opcode::Step => "Step",
            Opcode::StepRun => "StepRun",
            Opcode::StepError => "StepError",
            Opcode::StepFailed => "StepFailed",
            Opcode::StepPlanned => "StepPlanned",
            Opcode::StepNotFound => "StepNotFound",
            Opcode::Sleep => "Sleep",
            Opcode::WaitForEvent => "WaitForEvent",
            Opcode::WaitForSignal => "WaitForSignal",
            Opcode::InvokeFunction => "InvokeFunction",
            Opcode::AiGateway => "AIGateway",
            Opcode::Gateway => "Gateway",
            Opcode::RunComplete => "RunComplete",
            Opcode::SyncRunComplete => "SyncRunComplete",
            Opcode::DiscoveryRequest => "DiscoveryRequest",
            Opcode::DeferAdd => "DeferAdd",
            Opcode::DeferAbort => "DeferAbort",
            Opcode::Unsupported(text) => text,
        }
    }

    /// A lazy op rides along the others and never drives the run alone
    /// (GO `OpcodeIsLazy`): the defer ops.
    pub fn is_lazy(&self) -> bool {
        matches!(self, Opcode::DeferAdd | Opcode::DeferAbort)
    }
}

impl From<&str> for Opcode {
    fn from(text: &str) -> Opcode {
        Opcode::parse(text)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As the wire name in quotes, so messages read as they did with strings.
impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for Opcode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Opcode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Opcode, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(Opcode::parse(&text))
    }
}

/// How a step of a parallel group ends the group (`parallelMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParallelMode {
    /// The group goes on when all its steps are done.
    #[default]
    Wait,
    /// The first step to finish wins (`group.parallel({mode: "race"})`).
    Race,
    /// A mode this Baton does not know: as `Wait`.
    #[serde(other)]
    Other,
}

/// A `Sleep`: until a date, or for a time string (`duration::sleep_until`
/// reads it). The JS and Python SDKs put it in `name`; `opts.duration`,
/// when there, wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sleep {
    pub until: String,
}

/// A `WaitForEvent`: the event to wait for, how long, and the CEL
/// expression (over `event`, the trigger, and `async`, the candidate)
/// that must hold. A timeout of zero has already expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitForEvent {
    pub event: String,
    pub timeout: Option<Duration>,
    pub expression: Option<String>,
}

/// What a second wait for a signal name does (`onConflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// The second wait fails its run.
    #[default]
    Fail,
    /// The second wait takes the name over.
    Replace,
}

/// A `WaitForSignal`: the signal name (not empty, at most
/// [`MAX_SIGNAL_BYTES`]), how long, and what to do on a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitForSignal {
    pub signal: String,
    pub timeout: Option<Duration>,
    pub on_conflict: OnConflict,
}

/// An `InvokeFunction`: the callee, the data of its invoke event (an
/// object), the event's `meta` as sent (sessions, resolved by the
/// executor), and how long to wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoke {
    pub function_id: String,
    pub data: Value,
    pub meta: Option<Value>,
    pub timeout: Option<Duration>,
}

/// The HTTP call of a `Gateway` (`step.fetch`) or `AIGateway`
/// (`step.ai.infer`) op, which the server makes (`SdkClient::fetch`).
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRequest {
    pub url: String,
    /// `GET` when not given; AI calls are always `POST`.
    pub method: String,
    /// Header values that are not strings are left out.
    pub headers: Vec<(String, String)>,
    /// The body as sent: a string as is, anything else as JSON text.
    pub body: Option<String>,
    /// The AI provider's key, and its API's shape (`openai`, `anthropic`,
    /// `gemini`, `bedrock`, ...).
    pub auth_key: String,
    pub format: String,
}

/// A `DeferAdd`: the deferred function's slug, its input and meta as sent
/// (their shape and size are checked by `actors::defer`, which keeps a bad
/// one as rejected rather than failing the run).
#[derive(Debug, Clone, PartialEq)]
pub struct DeferAdd {
    pub fn_slug: String,
    pub input: Option<Value>,
    pub meta: Option<Value>,
}

/// A `DeferAbort`: the hashed id of the defer to take back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferAbort {
    pub target: String,
}

/// An op's `opts` object, read field by field so that an error names the
/// field. Absent or `null` opts are empty; `null` fields are absent.
struct Opts<'a>(Option<&'a Map<String, Value>>);

impl<'a> Opts<'a> {
    fn of(opts: Option<&'a Value>) -> Result<Opts<'a>, String> {
        match opts {
            None | Some(Value::Null) => Ok(Opts(None)),
            Some(Value::Object(map)) => Ok(Opts(Some(map))),
            Some(other) => Err(format!("opts must be an object, not {other}")),
        }
    }

    fn value(&self, name: &str) -> Option<&'a Value> {
        self.0
            .and_then(|map| map.get(name))
            .filter(|value| !value.is_null())
    }

    fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        self.value(name)
            .map(|value| T::deserialize(value).map_err(|err| format!("opts.{name}: {err}")))
            .transpose()
    }

    fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.get::<String>(name)
    }

    /// A text field that must be there and not empty.
    fn required_text(&self, name: &str) -> Result<String, String> {
        self.text(name)?
            .filter(|text| !text.is_empty())
            .ok_or_else(|| format!("opts.{name} is required"))
    }

    /// A duration field (`duration_from_json`).
    fn duration(&self, name: &str) -> Result<Option<Duration>, String> {
        match self.value(name) {
            None => Ok(None),
            Some(value) => duration_from_json(value).map_err(|err| format!("opts.{name}: {err}")),
        }
    }

    /// A pause's timeout: at most [`MAX_SLEEP`] (GO's one year).
    fn timeout(&self) -> Result<Option<Duration>, String> {
        match self.duration("timeout")? {
            Some(timeout) if timeout > MAX_SLEEP => Err(format!(
                "timeout is longer than the most accepted ({} days)",
                MAX_SLEEP.as_secs() / 86_400
            )),
            timeout => Ok(timeout),
        }
    }
}

impl Op {
    fn options(&self) -> Result<Opts<'_>, String> {
        Opts::of(self.opts.as_ref())
    }

    /// `opts.parallelMode`, on any op.
    pub fn parallel_mode(&self) -> Result<ParallelMode, String> {
        Ok(self
            .options()?
            .get::<ParallelMode>("parallelMode")?
            .unwrap_or_default())
    }

    pub fn sleep(&self) -> Result<Sleep, String> {
        let opts = self.options()?;
        Ok(Sleep {
            until: opts
                .text("duration")?
                .or_else(|| self.name.clone())
                .unwrap_or_default(),
        })
    }

    pub fn wait_for_event(&self) -> Result<WaitForEvent, String> {
        let opts = self.options()?;
        Ok(WaitForEvent {
            // The JS SDK names the event in `name` too; older ones only there.
            event: opts
                .text("event")?
                .or_else(|| self.name.clone())
                .unwrap_or_default(),
            timeout: opts.timeout()?,
            expression: opts.text("if")?.filter(|text| !text.trim().is_empty()),
        })
    }

    pub fn wait_for_signal(&self) -> Result<WaitForSignal, String> {
        let opts = self.options()?;
        let signal = opts
            .text("signal")?
            .filter(|name| !name.is_empty())
            .ok_or("the signal name is required")?;
        if signal.len() > MAX_SIGNAL_BYTES {
            return Err(format!(
                "the signal name is {} bytes; the most is {MAX_SIGNAL_BYTES}",
                signal.len()
            ));
        }
        Ok(WaitForSignal {
            signal,
            timeout: opts.timeout()?,
            on_conflict: opts.get("conflict")?.unwrap_or_default(),
        })
    }

    pub fn invoke(&self) -> Result<Invoke, String> {
        let opts = self.options()?;
        let function_id = opts.required_text("function_id")?;
        let payload =
            Opts::of(opts.value("payload")).map_err(|err| format!("opts.payload: {err}"))?;
        let data = payload
            .get::<Map<String, Value>>("data")
            .map_err(|err| format!("opts.payload.data must be an object ({err})"))?;
        Ok(Invoke {
            function_id,
            data: Value::Object(data.unwrap_or_default()),
            meta: payload.value("meta").cloned(),
            timeout: opts.timeout()?,
        })
    }

    pub fn defer_add(&self) -> Result<DeferAdd, String> {
        let opts = self.options()?;
        Ok(DeferAdd {
            fn_slug: opts.required_text("fn_slug")?,
            input: opts.value("input").cloned(),
            meta: opts.value("meta").cloned(),
        })
    }

    pub fn defer_abort(&self) -> Result<DeferAbort, String> {
        Ok(DeferAbort {
            target: self.options()?.required_text("target_hashed_id")?,
        })
    }
}

/// Parses the opts of a `Gateway` or `AIGateway` op. The executor keeps
/// them as sent (`Fetch::opts`) and `SdkClient::fetch` reads them here when
/// it makes the call, so that a bad request is the step's error, as on
/// Inngest, not the run's.
pub fn gateway_request(opts: &Value) -> Result<GatewayRequest, String> {
    let opts = Opts::of(Some(opts))?;
    let url = opts
        .text("url")?
        .filter(|url| !url.is_empty())
        .ok_or("the step has no url")?;
    let headers = opts
        .get::<Map<String, Value>>("headers")?
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, value)| match value {
            Value::String(value) => Some((name, value)),
            _ => None,
        })
        .collect();
    let body = match opts.value("body") {
        None => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => Some(other.to_string()),
    };
    Ok(GatewayRequest {
        url,
        method: opts.text("method")?.unwrap_or_else(|| "GET".into()),
        headers,
        body,
        auth_key: opts.text("auth_key")?.unwrap_or_default(),
        format: opts.text("format")?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(kind: &str, name: Option<&str>, opts: Value) -> Op {
        serde_json::from_value(json!({"id": "h", "op": kind, "name": name, "opts": opts})).unwrap()
    }

    #[test]
    fn opcodes_round_trip_and_unknown_ones_are_kept() {
        for name in [
            "Step",
            "StepRun",
            "StepError",
            "StepFailed",
            "StepPlanned",
            "StepNotFound",
            "Sleep",
            "WaitForEvent",
            "WaitForSignal",
            "InvokeFunction",
            "AIGateway",
            "Gateway",
            "RunComplete",
            "SyncRunComplete",
            "DiscoveryRequest",
            "DeferAdd",
            "DeferAbort",
        ] {
            let opcode = Opcode::parse(name);
            assert!(!matches!(opcode, Opcode::Unsupported(_)), "{name}");
            assert_eq!(opcode.as_str(), name);
            assert_eq!(serde_json::to_value(&opcode).unwrap(), json!(name));
        }
        assert_eq!(
            Opcode::parse("Teleport"),
            Opcode::Unsupported("Teleport".into())
        );
        // Case matters, as in GO.
        assert_eq!(
            Opcode::parse("steprun"),
            Opcode::Unsupported("steprun".into())
        );
        assert_eq!(format!("{:?}", Opcode::AiGateway), "\"AIGateway\"");
        assert!(Opcode::DeferAdd.is_lazy() && !Opcode::StepRun.is_lazy());
        // A missing op is unsupported; a non-string one is a bad reply.
        let parsed: Op = serde_json::from_value(json!({"id": "x"})).unwrap();
        assert_eq!(parsed.op, Opcode::Unsupported(String::new()));
        assert!(serde_json::from_value::<Op>(json!({"id": "x", "op": 7})).is_err());
    }

    #[test]
    fn sleeps_read_opts_then_name() {
        assert_eq!(
            op("Sleep", Some("2s"), Value::Null).sleep().unwrap().until,
            "2s"
        );
        assert_eq!(
            op("Sleep", Some("2s"), json!({"duration": "1m"}))
                .sleep()
                .unwrap()
                .until,
            "1m"
        );
        assert_eq!(op("Sleep", None, json!({})).sleep().unwrap().until, "");
        assert!(op("Sleep", None, json!({"duration": 5})).sleep().is_err());
    }

    #[test]
    fn waits_for_events() {
        let wait = op(
            "WaitForEvent",
            Some("app/named"),
            json!({"event": "app/reply", "timeout": "1h", "if": "  "}),
        )
        .wait_for_event()
        .unwrap();
        assert_eq!(wait.event, "app/reply");
        assert_eq!(wait.timeout, Some(Duration::from_secs(3_600)));
        assert_eq!(wait.expression, None, "a blank expression is none");
        // Python: `null`s for unset options; the event in `name`.
        let wait = op(
            "WaitForEvent",
            Some("app/py"),
            json!({"if": null, "timeout": "10s", "event": null}),
        )
        .wait_for_event()
        .unwrap();
        assert_eq!(wait.event, "app/py");
        // An empty timeout has expired already.
        let wait = op("WaitForEvent", Some("e"), json!({"timeout": ""}))
            .wait_for_event()
            .unwrap();
        assert_eq!(wait.timeout, Some(Duration::ZERO));
        for bad in [
            json!({"timeout": "1y"}),
            json!({"timeout": "367d"}),
            json!({"timeout": -5}),
            json!({"timeout": true}),
            json!({"if": 3}),
            json!({"event": ["a"]}),
            json!("opts as text"),
        ] {
            let result = op("WaitForEvent", Some("e"), bad.clone()).wait_for_event();
            assert!(result.is_err(), "{bad}: {result:?}");
        }
        // Numbers are milliseconds.
        let wait = op("WaitForEvent", Some("e"), json!({"timeout": 1500}))
            .wait_for_event()
            .unwrap();
        assert_eq!(wait.timeout, Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn waits_for_signals() {
        let wait = op(
            "WaitForSignal",
            None,
            json!({"signal": "s", "timeout": "1m", "conflict": "replace"}),
        )
        .wait_for_signal()
        .unwrap();
        assert_eq!(
            wait,
            WaitForSignal {
                signal: "s".into(),
                timeout: Some(Duration::from_secs(60)),
                on_conflict: OnConflict::Replace,
            }
        );
        // The JS SDK leaves `conflict` out when not given.
        let wait = op("WaitForSignal", None, json!({"signal": "s"}))
            .wait_for_signal()
            .unwrap();
        assert_eq!((wait.on_conflict, wait.timeout), (OnConflict::Fail, None));
        for bad in [
            Value::Null,
            json!({"signal": ""}),
            json!({"signal": 5}),
            json!({"signal": "s".repeat(MAX_SIGNAL_BYTES + 1)}),
            json!({"signal": "s", "conflict": "merge"}),
            json!({"signal": "s", "conflict": 1}),
            json!({"signal": "s", "timeout": "soon"}),
        ] {
            let result = op("WaitForSignal", None, bad.clone()).wait_for_signal();
            assert!(result.is_err(), "{bad}: {result:?}");
        }
    }

    #[test]
    fn invokes() {
        let invoke = op(
            "InvokeFunction",
            None,
            json!({"function_id": "app-f", "payload": {"data": {"x": 1}, "v": null,
                   "meta": {"sessions": {}}}, "timeout": null}),
        )
        .invoke()
        .unwrap();
        assert_eq!(invoke.function_id, "app-f");
        assert_eq!(invoke.data, json!({"x": 1}));
        assert_eq!(invoke.meta, Some(json!({"sessions": {}})));
        assert_eq!(invoke.timeout, None);
        let bare = op("InvokeFunction", None, json!({"function_id": "f"}))
            .invoke()
            .unwrap();
        assert_eq!(bare.data, json!({}));
        for bad in [
            json!({}),
            json!({"function_id": ""}),
            json!({"function_id": "f", "payload": {"data": [1]}}),
            json!({"function_id": "f", "payload": "x"}),
            json!({"function_id": "f", "timeout": "forever"}),
        ] {
            let result = op("InvokeFunction", None, bad.clone()).invoke();
            assert!(result.is_err(), "{bad}: {result:?}");
        }
    }

    #[test]
    fn gateway_requests() {
        let request = gateway_request(&json!({"url": "http://x", "method": "POST",
            "headers": {"a": "1", "b": 2}, "body": {"k": true}, "type": "step.fetch"}))
        .unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.headers, [("a".to_string(), "1".to_string())]);
        assert_eq!(request.body.as_deref(), Some(r#"{"k":true}"#));
        let plain = gateway_request(&json!({"url": "http://x", "body": "text"})).unwrap();
        assert_eq!(
            (plain.method.as_str(), plain.body.as_deref()),
            ("GET", Some("text"))
        );
        assert_eq!(
            gateway_request(&Value::Null).unwrap_err(),
            "the step has no url"
        );
        assert!(gateway_request(&json!({"url": 1})).is_err());
        assert!(gateway_request(&json!({"url": "http://x", "headers": []})).is_err());
    }

    #[test]
    fn defers_and_parallel_modes() {
        let add = op("DeferAdd", None, json!({"fn_slug": "app-d", "input": null}))
            .defer_add()
            .unwrap();
        assert_eq!((add.fn_slug.as_str(), add.input), ("app-d", None));
        assert!(op("DeferAdd", None, json!({})).defer_add().is_err());
        assert!(op("DeferAdd", None, json!({"fn_slug": 1}))
            .defer_add()
            .is_err());
        assert_eq!(
            op("DeferAbort", None, json!({"target_hashed_id": "t"}))
                .defer_abort()
                .unwrap()
                .target,
            "t"
        );
        assert!(op("DeferAbort", None, Value::Null).defer_abort().is_err());
        let mode = |opts: Value| op("StepPlanned", None, opts).parallel_mode();
        assert_eq!(mode(Value::Null), Ok(ParallelMode::Wait));
        assert_eq!(
            mode(json!({"parallelMode": "race"})),
            Ok(ParallelMode::Race)
        );
        assert_eq!(
            mode(json!({"parallelMode": "later"})),
            Ok(ParallelMode::Other)
        );
        assert!(mode(json!({"parallelMode": 1})).is_err());
    }
}
