//! CEL expressions (trigger `expression`, later `if`, keys and priorities),
//! evaluated with the `cel-interpreter` crate over JSON variables.

use std::fmt;
use std::sync::Arc;

use cel_interpreter::{Context, Program, Value};

/// A compiled CEL expression. Cheap to clone.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Program>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = Program::compile(source)
            .map_err(|err| format!("invalid expression {source:?}: {err}"))?;
        Ok(Expr {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a JSON value with the given variables bound.
    pub fn eval(&self, vars: &[(&str, &serde_json::Value)]) -> Result<serde_json::Value, String> {
        let mut context = Context::default();
        for (name, value) in vars {
            let value = cel_interpreter::to_value(value)
                .map_err(|err| format!("cannot bind {name}: {err}"))?;
            context.add_variable_from_value(*name, value);
        }
        let value = self
            .program
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
            match cel_interpreter::to_value(value) {
                Ok(value) => context.add_variable_from_value(*name, value),
                Err(_) => return false,
            }
        }
        matches!(self.program.execute(&context), Ok(Value::Bool(true)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn values() {
        let event = json!({"data": {"user": "u1"}});
        let expr = Expr::compile("event.data.user + '-x'").unwrap();
        assert_eq!(expr.eval(&[("event", &event)]).unwrap(), json!("u1-x"));
    }
}
