//! Flow-control settings of a function (PROTOCOL §3.5): concurrency,
//! throttle, rate limit, idempotency, debounce, batching, priority,
//! singleton. Parsed from the synced config; both SDKs' shapes.

use std::time::Duration;

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
    pub key: Option<String>,
    pub scope: Scope,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleRule {
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitRule {
    pub limit: u32,
    pub period: Duration,
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DebounceRule {
    pub period: Duration,
    pub key: Option<String>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchRule {
    pub max_size: u32,
    pub timeout: Duration,
    pub key: Option<String>,
    /// Only events for which this is true are batched; others run alone.
    pub condition: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingletonMode {
    Skip,
    Cancel,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SingletonRule {
    pub mode: SingletonMode,
    pub key: Option<String>,
}

/// Every flow-control rule of one function.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowControl {
    pub concurrency: Vec<ConcurrencyRule>,
    pub throttle: Option<ThrottleRule>,
    pub rate_limit: Option<RateLimitRule>,
    /// CEL key: one run per key per 24 h.
    pub idempotency: Option<String>,
    pub debounce: Option<DebounceRule>,
    pub batch: Option<BatchRule>,
    /// CEL giving seconds by which a run jumps ahead (negative: behind).
    pub priority: Option<String>,
    pub singleton: Option<SingletonRule>,
}

fn text(value: Option<&Value>) -> Option<String> {
    value
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn expr(value: Option<&Value>, what: &str) -> Result<Option<String>, String> {
    match text(value) {
        Some(source) => {
            Expr::cached(&source).map_err(|err| format!("{what}: {err}"))?;
            Ok(Some(source))
        }
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

fn limit(value: Option<&Value>, what: &str) -> Result<u32, String> {
    let n = value
        .and_then(Value::as_u64)
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
        let concurrency: Vec<&Value> = match config.get("concurrency") {
            None | Some(Value::Null) => Vec::new(),
            Some(number @ Value::Number(_)) => vec![number],
            Some(Value::Array(rules)) => rules.iter().collect(),
            Some(object @ Value::Object(map)) if map.contains_key("fn") => map
                .get("fn")
                .and_then(Value::as_array)
                .map(|rules| rules.iter().collect())
                .unwrap_or_else(|| vec![object]),
            Some(object) => vec![object],
        };
        if concurrency.len() > 2 {
            return Err("concurrency takes at most two limits".into());
        }
        for rule in concurrency {
            if let Some(n) = rule.as_u64() {
                if n > 0 {
                    flow.concurrency.push(ConcurrencyRule {
                        limit: bounded(n, "concurrency")?,
                        key: None,
                        scope: Scope::Fn,
                    });
                }
                continue;
            }
            // A limit of 0 means "no limit" in the SDKs' configs.
            if rule.get("limit").and_then(Value::as_u64) == Some(0) {
                continue;
            }
            let scope = match rule.get("scope").and_then(Value::as_str) {
                None | Some("fn") => Scope::Fn,
                Some("env") => Scope::Env,
                Some("account") => Scope::Account,
                Some(other) => return Err(format!("unknown concurrency scope {other:?}")),
            };
            flow.concurrency.push(ConcurrencyRule {
                limit: limit(rule.get("limit"), "concurrency.limit")?,
                key: expr(rule.get("key"), "concurrency.key")?,
                scope,
            });
        }
        if let Some(rule) = config.get("throttle").filter(|v| !v.is_null()) {
            flow.throttle = Some(ThrottleRule {
                limit: limit(rule.get("limit"), "throttle.limit")?,
                period: required_duration(rule.get("period"), "throttle.period")?,
                burst: bounded(
                    rule.get("burst")
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .max(1),
                    "throttle.burst",
                )?,
                key: expr(rule.get("key"), "throttle.key")?,
            });
        }
        if let Some(rule) = config.get("rateLimit").filter(|v| !v.is_null()) {
            flow.rate_limit = Some(RateLimitRule {
                limit: limit(rule.get("limit"), "rateLimit.limit")?,
                period: required_duration(rule.get("period"), "rateLimit.period")?,
                key: expr(rule.get("key"), "rateLimit.key")?,
            });
        }
        flow.idempotency = expr(config.get("idempotency"), "idempotency")?;
        if let Some(rule) = config.get("debounce").filter(|v| !v.is_null()) {
            flow.debounce = Some(DebounceRule {
                period: required_duration(rule.get("period"), "debounce.period")?,
                key: expr(rule.get("key"), "debounce.key")?,
                timeout: duration(rule.get("timeout"), "debounce.timeout")?,
            });
        }
        if let Some(rule) = config.get("batchEvents").filter(|v| !v.is_null()) {
            flow.batch = Some(BatchRule {
                max_size: limit(rule.get("maxSize"), "batchEvents.maxSize")?,
                timeout: required_duration(rule.get("timeout"), "batchEvents.timeout")?,
                key: expr(rule.get("key"), "batchEvents.key")?,
                condition: expr(rule.get("if"), "batchEvents.if")?,
            });
        }
        flow.priority = expr(config.pointer("/priority/run"), "priority.run")?;
        if let Some(rule) = config.get("singleton").filter(|v| !v.is_null()) {
            let mode = match rule.get("mode").and_then(Value::as_str) {
                Some("skip") | None => SingletonMode::Skip,
                Some("cancel") => SingletonMode::Cancel,
                Some(other) => return Err(format!("unknown singleton mode {other:?}")),
            };
            flow.singleton = Some(SingletonRule {
                mode,
                key: expr(rule.get("key"), "singleton.key")?,
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
                key: Some("event.data.user".into()),
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
        assert_eq!(flow.idempotency.as_deref(), Some("event.data.id"));
        assert_eq!(
            flow.debounce.unwrap().timeout,
            Some(Duration::from_secs(60))
        );
        assert_eq!(flow.batch.unwrap().max_size, 5);
        assert_eq!(flow.priority.as_deref(), Some("event.data.p"));
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
    }
}
