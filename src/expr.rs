//! CEL expressions (trigger `expression`, `if`s, keys and priorities),
//! evaluated with the `cel-interpreter` crate over JSON variables.
//!
//! A function's expressions are compiled once, when its config is parsed
//! into a `FunctionDef`, and the services keep that definition per
//! (function id, version). Only expressions that arrive at run time (a
//! `waitForEvent` `if`) go through [`Expr::cached`], a bounded map by text.

use std::fmt;
use std::sync::Arc;

use std::collections::HashMap;

use cel_interpreter::{Context, Program, Value};

/// JSON to CEL. Integers become CEL `int` (not `uint`, which is what a
/// generic serializer picks for non-negative numbers), so that
/// `event.data.n * 2` and `event.data.n == 3` work as users expect.
pub fn to_cel(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => match n.as_u64() {
                Some(u) => Value::UInt(u),
                None => Value::Float(n.as_f64().unwrap_or(0.0)),
            },
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(to_cel).collect()))
        }
        serde_json::Value::Object(map) => {
            let map: HashMap<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            Value::from(map)
        }
    }
}

/// Most expressions [`Expr::cached`] keeps: with each source at most
/// [`MAX_EXPRESSION_BYTES`], the map stays within tens of MB.
const MAX_COMPILED: usize = 10_000;

static COMPILED: std::sync::LazyLock<ByText> =
    std::sync::LazyLock::new(|| ByText::bounded(MAX_COMPILED));

/// Compiled expressions by source text, at most `max` of them.
struct ByText {
    max: usize,
    compiled: std::sync::Mutex<HashMap<Arc<str>, Expr>>,
}

impl ByText {
    fn bounded(max: usize) -> ByText {
        ByText {
            max,
            compiled: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Expr>> {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get_or_compile(&self, source: &str) -> Result<Expr, String> {
        if let Some(expr) = self.lock().get(source) {
            return Ok(expr.clone());
        }
        let expr = Expr::compile(source)?;
        let mut compiled = self.lock();
        if compiled.len() >= self.max {
            // Bounded: a flood of distinct sources (waits with per-run
            // literals) starts over rather than grows.
            compiled.clear();
        }
        compiled.insert(expr.source.clone(), expr.clone());
        Ok(expr)
    }
}

/// A compiled CEL expression. Cheap to clone.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Program>,
}

/// Two expressions are equal when their sources are.
impl PartialEq for Expr {
    fn eq(&self, other: &Expr) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

/// Longest expression accepted, bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4_096;
/// Deepest nesting of brackets and unary operators accepted. The parser and
/// the evaluator recurse once per level, so this bounds their stack use.
pub const MAX_EXPRESSION_DEPTH: usize = 32;
/// Most binary operators and calls in one expression: each adds a level to
/// the tree the evaluator walks recursively.
pub const MAX_EXPRESSION_TERMS: usize = 256;

/// Checks the size and shape of an expression before it is parsed: the
/// parser recurses per nesting level and would overflow the stack.
pub fn check_bounds(source: &str) -> Result<(), String> {
    let shown = || {
        let cut: String = source.chars().take(60).collect();
        if cut.len() < source.len() {
            format!("{cut:?}…")
        } else {
            format!("{cut:?}")
        }
    };
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "expression {} is {} bytes; the limit is {MAX_EXPRESSION_BYTES}",
            shown(),
            source.len()
        ));
    }
    let bytes = source.as_bytes();
    let (mut depth, mut deepest, mut terms) = (0usize, 0usize, 0usize);
    // Unary operators in a row (`!!!x`, `--x`) nest like brackets.
    let mut unary_run = 0usize;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match byte {
            b'"' | b'\'' => {
                // Skip a string literal (escapes included); an unclosed one
                // runs to the end and the parser reports it.
                let triple = bytes.get(index..index + 3) == Some(&[byte, byte, byte][..]);
                let quote_len = if triple { 3 } else { 1 };
                index += quote_len;
                while index < bytes.len() {
                    if bytes[index] == b'\\' {
                        index += 2;
                        continue;
                    }
                    if bytes[index] == byte
                        && (!triple || bytes.get(index..index + 3) == Some(&[byte, byte, byte][..]))
                    {
                        index += quote_len;
                        break;
                    }
                    index += 1;
                }
                unary_run = 0;
                continue;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                terms += 1;
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'!' | b'-' => {
                if bytes.get(index + 1) != Some(&b'=') {
                    unary_run += 1;
                }
                terms += 1;
            }
            b'&' | b'|' | b'=' | b'<' | b'>' | b'+' | b'*' | b'/' | b'%' | b'?' | b'.' | b',' => {
                terms += 1
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => unary_run = 0,
        }
        deepest = deepest.max(depth + unary_run);
        if deepest > MAX_EXPRESSION_DEPTH {
            return Err(format!(
                "expression {} nests more than {MAX_EXPRESSION_DEPTH} levels deep",
                shown()
            ));
        }
        if terms > MAX_EXPRESSION_TERMS {
            return Err(format!(
                "expression {} has more than {MAX_EXPRESSION_TERMS} operators",
                shown()
            ));
        }
        index += 1;
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Programs compiled on this thread, for tests that check a program is
    /// compiled once (tests run on threads of their own).
    static COMPILES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many programs [`Expr::compile`] has compiled on this thread.
#[cfg(test)]
pub(crate) fn compiles_on_this_thread() -> u64 {
    COMPILES.with(std::cell::Cell::get)
}

thread_local! {
    /// Set while running CEL under `catch_unwind`: its panics are expected
    /// (and reported as errors), so the panic hook stays quiet.
    static EXPECTED_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook that prints every panic as before, except the
/// parser's and interpreter's, which become expression errors instead of
/// alarming backtraces on stderr.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !EXPECTED_PANIC.with(std::cell::Cell::get) {
            default(info);
        }
    }));
}

/// `catch_unwind` with the panic hook quiet.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let was = EXPECTED_PANIC.with(|flag| flag.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    EXPECTED_PANIC.with(|flag| flag.set(was));
    result
}

/// A panic's message, for errors.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl Expr {
    /// Parses `source`, bounded in size and depth. The parser panics on some
    /// inputs (`")"`), so a panic is caught and reported as invalid.
    pub fn compile(source: &str) -> Result<Expr, String> {
        check_bounds(source)?;
        let program = catch_quietly(|| Program::compile(source))
            .map_err(|panic| {
                format!(
                    "invalid expression {source:?}: the parser failed ({})",
                    panic_message(panic.as_ref())
                )
            })?
            .map_err(|err| format!("invalid expression {source:?}: {err}"))?;
        #[cfg(test)]
        COMPILES.with(|count| count.set(count.get() + 1));
        Ok(Expr {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    /// [`Expr::compile`], once per source text in the process, for
    /// expressions that come from the app at run time: the same
    /// `waitForEvent` `if` of many runs is compiled once. A function's own
    /// expressions do not come here: its `FunctionDef` holds them compiled.
    /// Bounded by [`MAX_COMPILED`]. Failures are not kept (the executor
    /// refuses a wait whose `if` does not compile, so they are rare here).
    pub fn cached(source: &str) -> Result<Expr, String> {
        COMPILED.get_or_compile(source)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a JSON value with the given variables bound.
    pub fn eval(&self, vars: &[(&str, &serde_json::Value)]) -> Result<serde_json::Value, String> {
        let mut context = Context::default();
        for (name, value) in vars {
            context.add_variable_from_value(*name, to_cel(value));
        }
        let value = self
            .execute(&context)
            .map_err(|err| format!("expression {:?} failed: {err}", self.source))?;
        value
            .json()
            .map_err(|err| format!("expression {:?} gave no JSON value: {err:?}", self.source))
    }

    /// Evaluates as a condition: only `true` is true; errors are false, as a
    /// filter that cannot be evaluated must not match.
    pub fn matches(&self, vars: &[(&str, &serde_json::Value)]) -> bool {
        let mut context = Context::default();
        for (name, value) in vars {
            context.add_variable_from_value(*name, to_cel(value));
        }
        matches!(self.execute(&context), Ok(Value::Bool(true)))
    }

    /// Runs the program; a panic in the interpreter is an error, never a
    /// crash of the caller.
    fn execute(&self, context: &Context) -> Result<Value, String> {
        let program = &self.program;
        catch_quietly(|| program.execute(context))
            .map_err(|panic| format!("the interpreter failed: {}", panic_message(panic.as_ref())))?
            .map_err(|err| err.to_string())
    }
}

/// Finds a conjunct `event.<a> == async.<b>` (either way round) at the top
/// level of `source` and returns (`b`, the JSON of `event.<a>` in
/// `trigger`): every event that matches the expression has that value at
/// path `b`. `None` when there is no such conjunct or the value is missing.
pub fn async_equality_key(source: &str, trigger: &serde_json::Value) -> Option<(String, String)> {
    if source.contains("||") || source.contains('(') || source.contains('!') {
        return None; // not a plain conjunction
    }
    let is_path = |text: &str| {
        !text.is_empty()
            && text.split('.').all(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
    };
    for conjunct in source.split("&&") {
        let Some((left, right)) = conjunct.split_once("==") else {
            continue;
        };
        let (left, right) = (left.trim(), right.trim());
        let pair = match (left.strip_prefix("event."), right.strip_prefix("async.")) {
            (Some(event_path), Some(async_path)) => Some((event_path, async_path)),
            _ => match (right.strip_prefix("event."), left.strip_prefix("async.")) {
                (Some(event_path), Some(async_path)) => Some((event_path, async_path)),
                _ => None,
            },
        };
        let Some((event_path, async_path)) = pair else {
            continue;
        };
        if !is_path(event_path) || !is_path(async_path) {
            continue;
        }
        let value = json_path(trigger, event_path)?;
        if value.is_null() || value.is_object() || value.is_array() {
            return None;
        }
        return Some((async_path.to_string(), value.to_string()));
    }
    None
}

/// The value at a dotted path (`data.user.id`) of a JSON object.
pub fn json_path<'a>(value: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .try_fold(value, |value, part| value.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cached_expressions_are_compiled_once() {
        let source = "event.data.cached_once_test == 1";
        let first = Expr::cached(source).unwrap();
        let second = Expr::cached(source).unwrap();
        assert!(Arc::ptr_eq(&first.program, &second.program));
        assert!(second.matches(&[("event", &json!({"data": {"cached_once_test": 1}}))]));
        assert!(
            Expr::cached("event.data ==").is_err(),
            "errors are not cached as programs"
        );
    }

    #[test]
    fn the_cache_by_text_is_bounded() {
        let cache = ByText::bounded(3);
        for n in 0..10 {
            let source = format!("event.data.n == {n}");
            let expr = cache.get_or_compile(&source).unwrap();
            assert_eq!(expr.source(), source);
            assert!(cache.lock().len() <= 3, "{} kept", cache.lock().len());
            assert!(cache.lock().contains_key(source.as_str()));
        }
        assert_eq!(COMPILED.max, MAX_COMPILED);
    }

    #[test]
    fn malformed_expressions_are_errors_not_panics() {
        for source in ["event.data.n ==", "event.data.n == (", "&& true", ""] {
            assert!(Expr::compile(source).is_err(), "{source:?} compiled");
        }
    }

    #[test]
    fn conditions_over_events() {
        let event = json!({"name": "app/a", "data": {"ok": true, "n": 3, "user": "u1"}});
        let check = |src: &str| Expr::compile(src).unwrap().matches(&[("event", &event)]);
        assert!(check("event.data.ok == true"));
        assert!(check("event.data.n > 2 && event.data.user == 'u1'"));
        assert!(!check("event.data.n > 3"));
        // A missing field is an evaluation error, which does not match.
        assert!(!check("event.data.missing == 1"));
        assert!(Expr::compile("event.data.(").is_err());
    }

    #[test]
    fn hostile_sources_are_errors() {
        // Threads of the server get the stack that the bounds assume (see
        // `main`); debug builds need it.
        std::thread::Builder::new()
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(hostile_sources)
            .unwrap()
            .join()
            .unwrap();
    }

    fn hostile_sources() {
        // The parser panics on a lone `)`; that is an error, not a panic.
        for source in [")", "))) bad", "(", "]", "}{", "event.data.a == ')'"] {
            let _ = Expr::compile(source);
        }
        assert!(Expr::compile(")").is_err());
        let deep = format!("{}1{}", "(".repeat(300), ")".repeat(300));
        assert!(Expr::compile(&deep).unwrap_err().contains("levels deep"));
        let nots = format!("{}true", "!".repeat(400));
        assert!(Expr::compile(&nots).unwrap_err().contains("levels deep"));
        let chain = vec!["1"; 2_000].join("+");
        assert!(Expr::compile(&chain).is_err());
        assert!(Expr::compile(&"a".repeat(MAX_EXPRESSION_BYTES + 1))
            .unwrap_err()
            .contains("bytes"));
        // Brackets inside strings do not count.
        let quoted = format!("event.data.s == '{}'", "(".repeat(100));
        assert!(Expr::compile(&quoted).is_ok());
        // Just inside the bounds compiles and evaluates.
        let nested = format!(
            "{}event.data.n{} == 3",
            "(".repeat(MAX_EXPRESSION_DEPTH - 1),
            ")".repeat(MAX_EXPRESSION_DEPTH - 1)
        );
        let event = json!({"data": {"n": 3}});
        assert!(Expr::compile(&nested)
            .unwrap()
            .matches(&[("event", &event)]));
    }

    #[test]
    fn equality_keys_for_indexing() {
        let trigger = json!({"data": {"key": "k1", "n": 3, "obj": {}}});
        let key = |src: &str| async_equality_key(src, &trigger);
        assert_eq!(
            key("event.data.key == async.data.key"),
            Some(("data.key".into(), "\"k1\"".into()))
        );
        assert_eq!(
            key("async.data.id == event.data.n"),
            Some(("data.id".into(), "3".into()))
        );
        assert_eq!(
            key("event.data.key == async.data.key && async.data.ok == true"),
            Some(("data.key".into(), "\"k1\"".into()))
        );
        assert_eq!(
            key("event.data.key == async.data.key || async.data.ok"),
            None
        );
        assert_eq!(key("async.data.ok == true"), None);
        assert_eq!(key("event.data.missing == async.data.key"), None);
        assert_eq!(key("event.data.obj == async.data.obj"), None);
        assert_eq!(json_path(&trigger, "data.n"), Some(&json!(3)));
    }

    #[test]
    fn values() {
        let event = json!({"data": {"user": "u1", "n": 3, "f": 1.5}});
        let eval = |src: &str| {
            Expr::compile(src)
                .unwrap()
                .eval(&[("event", &event)])
                .unwrap()
        };
        assert_eq!(eval("event.data.user + '-x'"), json!("u1-x"));
        assert_eq!(eval("event.data.n * 2"), json!(6));
        assert_eq!(eval("event.data.n == 3"), json!(true));
        assert_eq!(eval("event.data.f * 2.0"), json!(3.0));
    }
}
