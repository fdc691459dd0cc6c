//! Function configs as the SDKs sync them (PROTOCOL §3.5), parsed into what
//! the runner and executor need. The raw config is kept as synced, so later
//! features can read more of it without a migration. Parsing compiles the
//! function's CEL expressions (trigger filters, cancel `if`s, flow-control
//! keys, conditions and priority), so a service that keeps a `FunctionDef`
//! per (id, version) compiles each of them once.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::duration::config_duration;
use crate::expr::Expr;
use crate::model::flow::FlowControl;
use crate::model::FunctionRecord;

/// Retries when the SDK sends none (Inngest's `DefaultRetryCount`).
pub const DEFAULT_RETRIES: u32 = 4;
/// Upper bound on configured retries.
pub const MAX_RETRIES: u32 = 20;

#[derive(Debug, Clone)]
pub enum Trigger {
    Event {
        event: String,
        expression: Option<Expr>,
    },
    Cron {
        cron: String,
        jitter: Option<Duration>,
    },
}

impl Trigger {
    /// Whether an event named `name` (with payload `event`) fires this trigger.
    pub fn matches(&self, name: &str, event: &Value) -> bool {
        match self {
            Trigger::Event {
                event: pattern,
                expression,
            } => {
                event_name_matches(pattern, name)
                    && expression
                        .as_ref()
                        .is_none_or(|expr| expr.matches(&[("event", event)]))
            }
            Trigger::Cron { .. } => false,
        }
    }
}

/// Exact names, or a trailing wildcard (`app/*`, `app.*`) matching a prefix.
pub fn event_name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix) && name.len() > prefix.len(),
        None => pattern == name,
    }
}

/// A `cancel` rule: an event that cancels a running run.
#[derive(Debug, Clone)]
pub struct CancelRule {
    pub event: String,
    /// CEL over `event` (the run's trigger) and `async` (the new event).
    pub expression: Option<Expr>,
    pub timeout: Option<Duration>,
}

/// A synced function, parsed.
#[derive(Debug, Clone)]
pub struct FunctionDef {
    pub id: String,
    pub app_id: String,
    pub name: String,
    pub version: u32,
    pub url: String,
    pub retries: u32,
    pub triggers: Vec<Trigger>,
    pub cancel: Vec<CancelRule>,
    /// `timeouts.start`: cancel a run not started within this.
    pub start_timeout: Option<Duration>,
    /// `timeouts.finish`: cancel a run still running after this.
    pub finish_timeout: Option<Duration>,
    pub flow: FlowControl,
    /// A durable endpoint (`model::endpoint`): an HTTP handler of the app,
    /// called again with its original request, not the SDK's serve URL.
    pub endpoint: bool,
}

impl FunctionDef {
    pub fn max_attempts(&self) -> u32 {
        self.retries + 1
    }

    /// The compiled `if` of this function's cancel rule for `event` whose
    /// source is `source`, as its runs' cancel pauses hold it.
    pub fn cancel_expression(&self, event: &str, source: &str) -> Option<&Expr> {
        self.cancel
            .iter()
            .filter(|rule| rule.event == event)
            .filter_map(|rule| rule.expression.as_ref())
            .find(|expr| expr.source() == source)
    }

    pub fn from_record(record: &FunctionRecord) -> Result<FunctionDef, String> {
        let config: Value = serde_json::from_str(&record.config)
            .map_err(|err| format!("function {} has bad stored config: {err}", record.id))?;
        let mut def = parse_config(&config)?;
        def.app_id = record.app_id.clone();
        def.version = record.version;
        def.url = record.url.clone();
        Ok(def)
    }
}

/// The step of a function config: where to call it, and its retries.
#[derive(Debug, Default, Deserialize)]
struct RawSteps {
    #[serde(default)]
    step: Option<RawStep>,
}

#[derive(Debug, Default, Deserialize)]
struct RawStep {
    #[serde(default)]
    runtime: Option<RawRuntime>,
    #[serde(default)]
    retries: Option<RawRetries>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRuntime {
    #[serde(default)]
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRetries {
    #[serde(default)]
    attempts: Option<u64>,
}

/// One trigger: an event (with an optional CEL `expression`) or a cron
/// schedule (with an optional `jitter`).
#[derive(Debug, Default, Deserialize)]
struct RawTrigger {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    expression: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    jitter: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawCancel {
    #[serde(default)]
    event: Option<String>,
    #[serde(default, rename = "if")]
    expression: Option<String>,
    #[serde(default)]
    timeout: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTimeouts {
    #[serde(default)]
    start: Option<Value>,
    #[serde(default)]
    finish: Option<Value>,
}

/// `config[name]` as `T`: `None` when absent or `null`, an error naming
/// the field when it has another shape. Other fields are not looked at
/// (the SDKs send more than Baton reads).
fn field<T: DeserializeOwned>(config: &Value, name: &str) -> Result<Option<T>, String> {
    match config.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|err| format!("invalid {name}: {err}")),
    }
}

fn blank_to_none(text: Option<String>) -> Option<String> {
    text.filter(|text| !text.trim().is_empty())
}

/// Validates one entry of a sync request's `functions[]`.
pub fn parse_config(config: &Value) -> Result<FunctionDef, String> {
    if !config.is_object() {
        return Err("a function config must be a JSON object".into());
    }
    let id = field::<String>(config, "id")?
        .filter(|id| !id.is_empty())
        .ok_or("a function has no id")?;
    let within = |err: String| format!("function {id}: {err}");
    let name = field::<String>(config, "name")
        .map_err(within)?
        .unwrap_or_else(|| id.clone());
    let step = field::<RawSteps>(config, "steps")
        .map_err(within)?
        .and_then(|steps| steps.step)
        .unwrap_or_default();
    let url = step
        .runtime
        .and_then(|runtime| runtime.url)
        .ok_or_else(|| format!("function {id} has no steps.step.runtime.url"))?;
    let retries = match step.retries.and_then(|retries| retries.attempts) {
        Some(attempts) => Some(attempts),
        None => field::<u64>(config, "retries").map_err(within)?,
    }
    .map_or(DEFAULT_RETRIES, |n| n.min(u64::from(MAX_RETRIES)) as u32);

    let raw_triggers = field::<Vec<RawTrigger>>(config, "triggers")
        .map_err(within)?
        .ok_or_else(|| format!("function {id} has no triggers array"))?;
    if raw_triggers.len() > 10 {
        return Err(format!("function {id} has more than 10 triggers"));
    }
    let mut triggers = Vec::with_capacity(raw_triggers.len());
    for raw in raw_triggers {
        if let Some(event) = raw.event {
            if event.is_empty() {
                return Err(format!("function {id} has a trigger with an empty event"));
            }
            let expression = match blank_to_none(raw.expression) {
                Some(source) => Some(Expr::compile(&source).map_err(within)?),
                None => None,
            };
            triggers.push(Trigger::Event { event, expression });
        } else if let Some(cron) = raw.cron {
            crate::cron::Schedule::parse(&cron).map_err(|err| within(err.to_string()))?;
            let jitter = config_duration(raw.jitter.as_ref())
                .map_err(|err| format!("function {id}: invalid jitter: {err}"))?;
            triggers.push(Trigger::Cron { cron, jitter });
        } else {
            return Err(format!(
                "function {id} has a trigger with neither event nor cron"
            ));
        }
    }
    let mut cancel = Vec::new();
    for rule in field::<Vec<RawCancel>>(config, "cancel")
        .map_err(within)?
        .unwrap_or_default()
    {
        let event = rule
            .event
            .filter(|e| !e.is_empty())
            .ok_or_else(|| format!("function {id} has a cancel rule without an event"))?;
        let expression = match blank_to_none(rule.expression) {
            Some(source) => Some(Expr::compile(&source).map_err(within)?),
            None => None,
        };
        let timeout = config_duration(rule.timeout.as_ref())
            .map_err(|err| format!("function {id}: invalid cancel timeout: {err}"))?;
        cancel.push(CancelRule {
            event,
            expression,
            timeout,
        });
    }
    let timeouts = field::<RawTimeouts>(config, "timeouts")
        .map_err(within)?
        .unwrap_or_default();
    let start_timeout = config_duration(timeouts.start.as_ref())
        .map_err(|err| format!("function {id}: invalid timeouts.start: {err}"))?;
    let finish_timeout = config_duration(timeouts.finish.as_ref())
        .map_err(|err| format!("function {id}: invalid timeouts.finish: {err}"))?;
    let flow = FlowControl::parse(config).map_err(|err| format!("function {id}: {err}"))?;
    Ok(FunctionDef {
        id,
        app_id: String::new(),
        name,
        version: 0,
        url,
        retries,
        triggers,
        cancel,
        start_timeout,
        finish_timeout,
        flow,
        endpoint: config.pointer(crate::model::endpoint::CONFIG_MARKER) == Some(&Value::Bool(true)),
    })
}

/// Removes the `deployId` and `probe` query parameters (PROTOCOL §3.2).
pub fn normalize_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && key != "deployId" && key != "probe"
        })
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards() {
        assert!(event_name_matches("app/a", "app/a"));
        assert!(!event_name_matches("app/a", "app/ab"));
        assert!(event_name_matches("app/*", "app/ab"));
        assert!(!event_name_matches("app/*", "app/"));
        assert!(!event_name_matches("app/*", "other/ab"));
        assert!(event_name_matches("app.*", "app.x"));
    }

    #[test]
    fn urls_lose_deploy_id_and_probe() {
        assert_eq!(
            normalize_url("http://h/api?fnId=a&deployId=x&stepId=step"),
            "http://h/api?fnId=a&stepId=step"
        );
        assert_eq!(normalize_url("http://h/api?deployId=x"), "http://h/api");
        assert_eq!(normalize_url("http://h/api?probe=trust"), "http://h/api");
        assert_eq!(normalize_url("http://h/api"), "http://h/api");
    }

    #[test]
    fn parses_a_js_config() {
        let config = json!({
            "id": "app-fn", "name": "fn",
            "triggers": [{"event": "app/test", "expression": "event.data.ok == true"},
                         {"cron": "*/5 * * * *"}],
            "steps": {"step": {"id": "step", "name": "step",
                "runtime": {"type": "http", "url": "http://127.0.0.1:3000/api/inngest?fnId=app-fn&stepId=step"},
                "retries": {"attempts": 2}}}
        });
        let def = parse_config(&config).unwrap();
        assert_eq!(def.id, "app-fn");
        assert_eq!(def.retries, 2);
        assert_eq!(def.max_attempts(), 3);
        assert_eq!(def.triggers.len(), 2);
        assert!(def.triggers[0].matches("app/test", &json!({"data": {"ok": true}})));
        assert!(def.cancel.is_empty() && def.finish_timeout.is_none());
        assert!(!def.triggers[0].matches("app/test", &json!({"data": {"ok": false}})));
    }

    #[test]
    fn cancel_rules_and_timeouts() {
        let config = json!({"id": "f", "triggers": [{"event": "e"}],
            "steps": {"step": {"runtime": {"url": "http://x"}}},
            "cancel": [{"event": "app/cancel", "if": "event.data.k == async.data.k", "timeout": "1h"}],
            "timeouts": {"start": "10s", "finish": "2m"}});
        let def = parse_config(&config).unwrap();
        assert_eq!(def.cancel.len(), 1);
        assert_eq!(def.cancel[0].timeout, Some(Duration::from_secs(3_600)));
        assert_eq!(def.start_timeout, Some(Duration::from_secs(10)));
        assert_eq!(def.finish_timeout, Some(Duration::from_secs(120)));
        let bad = json!({"id": "f", "triggers": [{"cron": "not a cron"}],
            "steps": {"step": {"runtime": {"url": "http://x"}}}});
        assert!(parse_config(&bad).is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let config = json!({"id": "f", "triggers": [{"event": "e"}],
            "steps": {"step": {"runtime": {"url": "http://x"}}}});
        assert_eq!(parse_config(&config).unwrap().retries, DEFAULT_RETRIES);
        assert!(parse_config(&json!({"triggers": []})).is_err());
        assert!(parse_config(&json!({"id": "f", "triggers": [{}],
            "steps": {"step": {"runtime": {"url": "http://x"}}}}))
        .is_err());
        // Wrong types are refused, naming the field, never read as unset.
        let base = json!({"id": "f", "triggers": [{"event": "e"}],
            "steps": {"step": {"runtime": {"url": "http://x"}}}});
        for (field, value, says) in [
            ("name", json!(5), "invalid name"),
            ("triggers", json!({"event": "e"}), "invalid triggers"),
            ("triggers", json!([{"event": 5}]), "invalid triggers"),
            ("retries", json!(-1), "invalid retries"),
            ("cancel", json!({"event": "x"}), "invalid cancel"),
            (
                "cancel",
                json!([{"event": "x", "timeout": true}]),
                "cancel timeout",
            ),
            ("timeouts", json!({"finish": "soon"}), "timeouts.finish"),
            (
                "steps",
                json!({"step": {"runtime": {"url": 1}}}),
                "invalid steps",
            ),
        ] {
            let mut config = base.clone();
            config[field] = value.clone();
            let err = parse_config(&config).unwrap_err();
            assert!(
                err.starts_with("function f: ") || err.starts_with("function f "),
                "{err}"
            );
            assert!(err.contains(says), "{field} {value}: {err}");
        }
        assert!(parse_config(&json!([base])).is_err());
        // `null` is unset (the Python SDK sends it); retries are capped.
        let mut config = base.clone();
        config["cancel"] = Value::Null;
        config["timeouts"] = json!({"start": null, "finish": "1m"});
        config["retries"] = json!(1_000_000_000_000u64);
        let def = parse_config(&config).unwrap();
        assert_eq!(def.finish_timeout, Some(Duration::from_secs(60)));
        assert_eq!(def.retries, MAX_RETRIES);
    }
}
