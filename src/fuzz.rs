//! Fuzzing on stable Rust: random and mutated inputs for every parser of
//! untrusted input (event bodies, SDK replies, function configs, CEL),
//! bounded in time so that `cargo test` runs them in CI. Each target must
//! return (an `Ok` or a clear `Err`), never panic, and keep its bounds.
//! Set `BATON_FUZZ_SECONDS` to run longer and `BATON_FUZZ_SEED` to replay.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::actors::event_api::{normalize_events, MAX_EVENT_BYTES};
use crate::clock::Timestamp;
use crate::core::decide;
use crate::expr::Expr;
use crate::model::function::parse_config;
use crate::model::QueueItem;
use crate::sdk::{parse_reply, SdkReply};
use crate::store::testsuite::sample_run;
use crate::store::Lease;

/// Pieces that have broken parsers before, or sit on a boundary.
const NASTY: &[&str] = &[
    ")",
    "(",
    "))) bad",
    "]",
    "}",
    "'",
    "\"",
    "\\",
    "''' ",
    "!",
    "-",
    "&&",
    "||",
    "==",
    ".",
    "99999999999999999999w",
    "-1",
    "1e309",
    "NaN",
    "inf",
    "0",
    "",
    " ",
    "inngest/x",
    " inngest/function.finished",
    "event.data.a",
    "async.data.b",
    "1h",
    "2999-01-01T00:00:00Z",
    "\u{0}",
    "é",
    "𝄞",
    "null",
    "true",
    "[]",
    "{}",
    "Sleep",
    "WaitForEvent",
    "StepPlanned",
    "DiscoveryRequest",
    "RunComplete",
    "StepRun",
    "InvokeFunction",
    "18446744073709551615",
];

fn budget() -> Duration {
    let seconds = std::env::var("BATON_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(seconds)
}

fn rng(target: &str) -> (u64, StdRng) {
    let seed = std::env::var("BATON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz {target}: seed {seed} (BATON_FUZZ_SEED={seed} replays it)");
    (seed, StdRng::seed_from_u64(seed))
}

fn nasty_text(rng: &mut StdRng) -> String {
    let mut text = String::new();
    for _ in 0..rng.gen_range(0..4) {
        match rng.gen_range(0..4) {
            0 => text.push_str(NASTY[rng.gen_range(0..NASTY.len())]),
            1 => text.push_str(&"(".repeat(rng.gen_range(0..80))),
            2 => text.push(rng.gen_range(' '..='~')),
            _ => text.push_str(&rng.gen_range(0..100_000u32).to_string()),
        }
    }
    text
}

fn number(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..5) {
        0 => json!(rng.gen::<i64>()),
        1 => json!(rng.gen::<u64>()),
        2 => json!(rng.gen::<f64>() * 1e12 - 5e11),
        3 => json!(-1),
        _ => json!(rng.gen_range(0..10)),
    }
}

/// A random JSON value, `depth` levels at most.
fn value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.gen_range(0..if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => number(rng),
        3 => Value::String(nasty_text(rng)),
        4 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.gen_range(0..4) {
                map.insert(nasty_text(rng), value(rng, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// Replaces a random spot of `base` (itself, an object's field or an array
/// item, at any depth) with a random value.
fn mutate(rng: &mut StdRng, base: &mut Value) {
    if rng.gen_bool(0.6) {
        match base {
            Value::Object(map) if !map.is_empty() => {
                let index = rng.gen_range(0..map.len());
                if let Some((_, inner)) = map.iter_mut().nth(index) {
                    return mutate(rng, inner);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let index = rng.gen_range(0..items.len());
                return mutate(rng, &mut items[index]);
            }
            _ => {}
        }
    }
    *base = value(rng, 3);
}

/// Bytes: a JSON text, sometimes cut or with a flipped byte.
fn damaged_bytes(rng: &mut StdRng, value: &Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    match rng.gen_range(0..4) {
        0 if !bytes.is_empty() => bytes.truncate(rng.gen_range(0..bytes.len())),
        1 if !bytes.is_empty() => {
            let index = rng.gen_range(0..bytes.len());
            bytes[index] = rng.gen();
        }
        _ => {}
    }
    bytes
}

/// Runs `case` on fresh random inputs until the time budget is spent, on a
/// thread with the server's stack; a panic fails the test with its input.
fn fuzz(target: &'static str, case: impl Fn(&mut StdRng) + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(crate::THREAD_STACK_BYTES)
        .spawn(move || {
            let (seed, mut rng) = rng(target);
            let deadline = Instant::now() + budget();
            let mut runs = 0u64;
            while Instant::now() < deadline {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng)));
                if let Err(panic) = outcome {
                    panic!(
                        "fuzz {target} panicked after {runs} inputs (seed {seed}): {}",
                        crate::expr::panic_message(panic.as_ref())
                    );
                }
                runs += 1;
            }
            eprintln!("fuzz {target}: {runs} inputs");
            assert!(runs > 0);
        })
        .unwrap()
        .join()
        .unwrap();
}

const NOW: Timestamp = Timestamp(1_700_000_000_000);

#[test]
fn fuzz_event_bodies() {
    fuzz("event bodies", |rng| {
        let mut body = json!([
            {"name": "app/a", "data": {"x": 1}, "user": {}, "ts": 1_700_000_000_000u64, "id": "i", "v": "1"},
            {"name": "app/b"}
        ]);
        for _ in 0..rng.gen_range(0..4) {
            mutate(rng, &mut body);
        }
        let bytes = damaged_bytes(rng, &body);
        let seed = rng.gen_bool(0.3).then(|| nasty_text(rng));
        if let Ok(events) = normalize_events(&bytes, seed.as_deref(), NOW) {
            for event in &events {
                assert!(event.payload.len() <= MAX_EVENT_BYTES);
                assert!(!event
                    .name
                    .trim()
                    .to_ascii_lowercase()
                    .starts_with("inngest/"));
            }
        }
    });
}

#[test]
fn fuzz_sdk_replies() {
    fuzz("sdk replies", |rng| {
        let mut ops = json!([
            {"id": "a", "op": "StepRun", "name": "a", "data": {"n": 1}},
            {"id": "b", "op": "Sleep", "name": "1h", "opts": {"duration": "1h"}},
            {"id": "c", "op": "WaitForEvent", "name": "e",
             "opts": {"event": "e", "timeout": "1h", "if": "event.data.a == async.data.a"}},
            {"id": "d", "op": "StepPlanned", "name": "d", "opts": {"parallelMode": "race"}},
            {"id": "e", "op": "InvokeFunction", "opts": {"function_id": "f", "timeout": "1h"}},
        ]);
        for _ in 0..rng.gen_range(0..4) {
            mutate(rng, &mut ops);
        }
        let status = [200, 201, 206, 400, 500][rng.gen_range(0..5)];
        let body = if status == 201 {
            json!({"status": 206, "headers": {}, "body": ops.to_string()})
        } else {
            ops
        };
        let bytes = damaged_bytes(rng, &body);
        let retry_after = nasty_text(rng);
        let header = |name: &str| match name {
            "x-inngest-sdk" => Some("js".to_string()),
            "x-inngest-req-version" => Some("2".to_string()),
            "retry-after" => Some(retry_after.clone()),
            _ => None,
        };
        let reply = parse_reply(status, header, &bytes, NOW);
        // Whatever the reply, deciding on it must not panic either.
        let run = sample_run("fn", "k");
        let lease = Lease {
            lease_id: 1,
            item: QueueItem::discovery(&run.id, &run.fn_id, 0),
            attempt: rng.gen_range(0..6),
            expires: NOW,
            due: NOW,
        };
        let decision = decide(&run, &lease, &reply, NOW, Duration::from_secs(1));
        if let Some((_, output)) = &decision.finish {
            assert!(output.to_string().len() <= crate::core::MAX_STEP_BYTES + 1_000);
        }
        if let SdkReply::Ops { ops, .. } = &reply {
            assert!(ops.len() < 1_000_000);
        }
    });
}

#[test]
fn fuzz_function_configs() {
    fuzz("function configs", |rng| {
        let mut config = json!({
            "id": "f", "name": "f",
            "triggers": [{"event": "app/a", "expression": "event.data.ok == true"}, {"cron": "* * * * *"}],
            "steps": {"step": {"id": "step", "runtime": {"url": "http://x"}, "retries": {"attempts": 2}}},
            "cancel": [{"event": "app/c", "if": "event.data.k == async.data.k", "timeout": "1h"}],
            "timeouts": {"start": "10s", "finish": "1m"},
            "concurrency": [{"limit": 2, "key": "event.data.u"}],
            "throttle": {"limit": 1, "period": "1s", "burst": 2},
            "rateLimit": {"limit": 1, "period": "1m"},
            "debounce": {"period": "5s", "timeout": "1m"},
            "batchEvents": {"maxSize": 10, "timeout": "2s"},
            "priority": {"run": "event.data.p"},
            "singleton": {"mode": "skip"},
        });
        for _ in 0..rng.gen_range(1..5) {
            mutate(rng, &mut config);
        }
        if let Ok(def) = parse_config(&config) {
            for rule in &def.flow.concurrency {
                assert!(u64::from(rule.limit) <= crate::model::flow::MAX_LIMIT);
            }
            for timeout in [def.start_timeout, def.finish_timeout]
                .into_iter()
                .flatten()
            {
                assert!(timeout <= crate::duration::MAX_DURATION);
            }
        }
    });
}

#[test]
fn fuzz_cel_compile() {
    fuzz("cel compile", |rng| {
        let mut source = String::new();
        for _ in 0..rng.gen_range(1..12) {
            source.push_str(&nasty_text(rng));
            source.push(' ');
        }
        if let Ok(expr) = Expr::compile(&source) {
            let event = value(rng, 3);
            let _ = expr.eval(&[("event", &event), ("async", &event)]);
            let _ = expr.matches(&[("event", &event)]);
        }
    });
}
