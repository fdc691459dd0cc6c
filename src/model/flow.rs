//! Flow-control settings of a function (PROTOCOL §3.5): concurrency,
//! throttle, rate limit, idempotency, debounce, batching, priority,
//! singleton. Parsed from the synced config; both SDKs' shapes. Keys,
//! conditions and priorities are compiled here, once per parsed config.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::duration::config_duration;
use crate::expr::Expr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Fn,
    Env,
    Account,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyRule {
    pub limit: u32,
    pub key: Option<Expr>,
    pub scope: Scope,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleRule {
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
    pub key: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitRule {
    pub limit: u32,
    pub period: Duration,
    pub key: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DebounceRule {
    pub period: Duration,
    pub key: Option<Expr>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchRule {
    pub max_size: u32,
    pub timeout: Duration,
    pub key: Option<Expr>,
    /// Only events for which this is true are batched; others run alone.
    pub condition: Option<Expr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingletonMode {
    Skip,
    Cancel,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SingletonRule {
    pub mode: SingletonMode,
    pub key: Option<Expr>,
}

/// Every flow-control rule of one function.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowControl {
    pub concurrency: Vec<ConcurrencyRule>,
    pub throttle: Option<ThrottleRule>,
    pub rate_limit: Option<RateLimitRule>,
    /// CEL key: one run per key per 24 h.
    pub idempotency: Option<Expr>,
    pub debounce: Option<DebounceRule>,
    pub batch: Option<BatchRule>,
    /// CEL giving seconds by which a run jumps ahead (negative: behind).
    pub priority: Option<Expr>,
    pub singleton: Option<SingletonRule>,
}

/// One concurrency limit as sent: `{limit, key?, scope?}`.
#[derive(Debug, Default, Deserialize)]
struct RawConcurrency {
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawThrottle {
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    period: Option<Value>,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRateLimit {
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    period: Option<Value>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDebounce {
    #[serde(default)]
    period: Option<Value>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    timeout: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawBatch {
    #[serde(default, rename = "maxSize")]
    max_size: Option<u64>,
    #[serde(default)]
    timeout: Option<Value>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, rename = "if")]
    condition: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPriority {
    #[serde(default)]
    run: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSingleton {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

/// `value` as `T`, or an error naming `what`; `null` is `None`.
fn typed<T: DeserializeOwned>(value: Option<&Value>, what: &str) -> Result<Option<T>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|err| format!("invalid {what}: {err}")),
    }
}

/// A CEL expression (a key, a condition), compiled: blank is none, and it
/// must compile.
fn expr(source: Option<String>, what: &str) -> Result<Option<Expr>, String> {
    match source.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(source) => Expr::compile(source)
            .map(Some)
            .map_err(|err| format!("{what}: {err}")),
        None => Ok(None),
    }
}

fn duration(value: Option<&Value>, what: &str) -> Result<Option<Duration>, String> {
    config_duration(value).map_err(|err| format!("{what}: {err}"))
}

fn required_duration(value: Option<&Value>, what: &str) -> Result<Duration, String> {
    duration(value, what)?.ok_or_else(|| format!("{what} is required"))
}

/// Largest limit (concurrency, throttle, rate limit, burst, batch size)
/// accepted: far above any real need, far below where counting overflows.
pub const MAX_LIMIT: u64 = 100_000;

fn limit(value: Option<u64>, what: &str) -> Result<u32, String> {
    let n = value
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{what} must be a positive integer"))?;
    bounded(n, what)
}

fn bounded(n: u64, what: &str) -> Result<u32, String> {
    if n > MAX_LIMIT {
        return Err(format!("{what} is {n}; the most is {MAX_LIMIT}"));
    }
    Ok(n as u32)
}

impl FlowControl {
    pub fn parse(config: &Value) -> Result<FlowControl, String> {
        let mut flow = FlowControl::default();
        // A number, a rule, a list of rules, or Python's `{"fn": [...]}`.
        let concurrency: Vec<&Value> = match config.get("concurrency") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(rules)) => rules.iter().collect(),
            Some(Value::Object(map)) if map.contains_key("fn") => match map.get("fn") {
                Some(Value::Array(rules)) => rules.iter().collect(),
                _ => return Err("invalid concurrency: fn must be a list of limits".into()),
            },
            Some(rule) => vec![rule],
        };
        if concurrency.len() > 2 {
            return Err("concurrency takes at most two limits".into());
        }
        for rule in concurrency {
            let rule = match rule {
                Value::Number(_) => RawConcurrency {
                    limit: typed(Some(rule), "concurrency")?,
                    ..RawConcurrency::default()
                },
                rule => typed(Some(rule), "concurrency")?.unwrap_or_default(),
            };
            // A limit of 0 means "no limit" in the SDKs' configs.
            if rule.limit == Some(0) {
                continue;
            }
            let scope = match rule.scope.as_deref() {
                None | Some("fn") => Scope::Fn,
                Some("env") => Scope::Env,
                Some("account") => Scope::Account,
                Some(other) => return Err(format!("unknown concurrency scope {other:?}")),
            };
            flow.concurrency.push(ConcurrencyRule {
                limit: limit(rule.limit, "concurrency.limit")?,
                key: expr(rule.key, "concurrency.key")?,
                scope,
            });
        }
        if let Some(rule) = typed::<RawThrottle>(config.get("throttle"), "throttle")? {
            flow.throttle = Some(ThrottleRule {
                limit: limit(rule.limit, "throttle.limit")?,
                period: required_duration(rule.period.as_ref(), "throttle.period")?,
                burst: bounded(rule.burst.unwrap_or(1).max(1), "throttle.burst")?,
                key: expr(rule.key, "throttle.key")?,
            });
        }
        if let Some(rule) = typed::<RawRateLimit>(config.get("rateLimit"), "rateLimit")? {
            flow.rate_limit = Some(RateLimitRule {
                limit: limit(rule.limit, "rateLimit.limit")?,
                period: required_duration(rule.period.as_ref(), "rateLimit.period")?,
                key: expr(rule.key, "rateLimit.key")?,
            });
        }
        flow.idempotency = expr(
            typed(config.get("idempotency"), "idempotency")?,
            "idempotency",
        )?;
        if let Some(rule) = typed::<RawDebounce>(config.get("debounce"), "debounce")? {
            flow.debounce = Some(DebounceRule {
                period: required_duration(rule.period.as_ref(), "debounce.period")?,
                key: expr(rule.key, "debounce.key")?,
                timeout: duration(rule.timeout.as_ref(), "debounce.timeout")?,
            });
        }
        if let Some(rule) = typed::<RawBatch>(config.get("batchEvents"), "batchEvents")? {
            flow.batch = Some(BatchRule {
                max_size: limit(rule.max_size, "batchEvents.maxSize")?,
                timeout: required_duration(rule.timeout.as_ref(), "batchEvents.timeout")?,
                key: expr(rule.key, "batchEvents.key")?,
                condition: expr(rule.condition, "batchEvents.if")?,
            });
        }
        if let Some(priority) = typed::<RawPriority>(config.get("priority"), "priority")? {
            flow.priority = expr(priority.run, "priority.run")?;
        }
        if let Some(rule) = typed::<RawSingleton>(config.get("singleton"), "singleton")? {
            let mode = match rule.mode.as_deref() {
                Some("skip") | None => SingletonMode::Skip,
                Some("cancel") => SingletonMode::Cancel,
                Some(other) => return Err(format!("unknown singleton mode {other:?}")),
            };
            flow.singleton = Some(SingletonRule {
                mode,
                key: expr(rule.key, "singleton.key")?,
            });
        }
        Ok(flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn concurrency_shapes() {
        let parse = |v: Value| {
            FlowControl::parse(&json!({ "concurrency": v }))
                .unwrap()
                .concurrency
        };
        assert_eq!(
            parse(json!(3)),
            [ConcurrencyRule {
                limit: 3,
                key: None,
                scope: Scope::Fn
            }]
        );
        assert_eq!(
            parse(json!({"limit": 2, "key": "event.data.user"})),
            [ConcurrencyRule {
                limit: 2,
                key: Some(Expr::compile("event.data.user").unwrap()),
                scope: Scope::Fn
            }]
        );
        let two = parse(json!([{"limit": 5, "scope": "env", "key": "event.data.a"}, {"limit": 1}]));
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].scope, Scope::Env);
        assert!(parse(json!([])).is_empty());
        // Absurd limits are refused, not silently broken.
        for bad in [
            json!({"concurrency": 18446744073709551615u64}),
            json!({"concurrency": {"limit": 4294967296u64}}),
            json!({"throttle": {"limit": 1, "period": "1s", "burst": 1000000000}}),
            json!({"batchEvents": {"maxSize": 100001, "timeout": "1s"}}),
            json!({"debounce": {"period": -1}}),
            json!({"rateLimit": {"limit": 1, "period": "99999999999999999999w"}}),
        ] {
            assert!(FlowControl::parse(&bad).is_err(), "{bad}");
        }
        assert!(FlowControl::parse(
            &json!({"concurrency": [{"limit": 1}, {"limit": 1}, {"limit": 1}]})
        )
        .is_err());
    }

    #[test]
    fn every_rule() {
        let flow = FlowControl::parse(&json!({
            "throttle": {"limit": 1, "period": "1s"},
            "rateLimit": {"limit": 10, "period": "1m", "key": "event.data.k"},
            "idempotency": "event.data.id",
            "debounce": {"period": "5s", "timeout": "1m"},
            "batchEvents": {"maxSize": 5, "timeout": "2s", "if": "event.data.ok"},
            "priority": {"run": "event.data.p"},
            "singleton": {"mode": "cancel", "key": "event.data.u"},
        }))
        .unwrap();
        assert_eq!(flow.throttle.unwrap().burst, 1);
        assert_eq!(flow.rate_limit.unwrap().period, Duration::from_secs(60));
        assert_eq!(
            flow.idempotency.as_ref().map(Expr::source),
            Some("event.data.id")
        );
        assert_eq!(
            flow.debounce.unwrap().timeout,
            Some(Duration::from_secs(60))
        );
        assert_eq!(flow.batch.unwrap().max_size, 5);
        assert_eq!(
            flow.priority.as_ref().map(Expr::source),
            Some("event.data.p")
        );
        assert_eq!(flow.singleton.unwrap().mode, SingletonMode::Cancel);
        assert!(FlowControl::parse(&json!({"throttle": {"limit": 0, "period": "1s"}})).is_err());
        assert!(FlowControl::parse(&json!({"debounce": {}})).is_err());
        // Durations are time strings, or milliseconds (`duration_from_json`).
        let flow =
            FlowControl::parse(&json!({"debounce": {"period": 5000, "timeout": ""}})).unwrap();
        let debounce = flow.debounce.unwrap();
        assert_eq!(debounce.period, Duration::from_secs(5));
        assert_eq!(debounce.timeout, None, "an empty duration is unset");
        assert!(FlowControl::parse(&json!({"debounce": {"period": true}})).is_err());
        // Wrong types are refused, naming the rule, never read as unset.
        for (bad, says) in [
            (json!({"throttle": 5}), "invalid throttle"),
            (
                json!({"throttle": {"limit": 1, "period": "1s", "key": 3}}),
                "invalid throttle",
            ),
            (
                json!({"idempotency": ["event.data.id"]}),
                "invalid idempotency",
            ),
            (json!({"priority": "event.data.p"}), "invalid priority"),
            (json!({"concurrency": -1}), "invalid concurrency"),
            (json!({"concurrency": {"fn": 2}}), "invalid concurrency"),
            (
                json!({"concurrency": [{"limit": "2"}]}),
                "invalid concurrency",
            ),
            (
                json!({"singleton": {"mode": "later"}}),
                "unknown singleton mode",
            ),
            (
                json!({"batchEvents": {"maxSize": 2, "timeout": "1s", "if": false}}),
                "invalid batchEvents",
            ),
        ] {
            let err = FlowControl::parse(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // `null` is unset, as the Python SDK sends it.
        let flow = FlowControl::parse(&json!({"throttle": null, "rateLimit":
            {"limit": 1, "period": "1s", "key": null}, "priority": {"run": null}}))
        .unwrap();
        assert!(flow.throttle.is_none() && flow.priority.is_none());
        assert_eq!(flow.rate_limit.unwrap().key, None);
    }
}
