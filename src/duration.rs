//! Inngest "time strings" (`"1w2d3h4m5s"`, `"500ms"`) and the ISO dates the
//! SDKs put in `Sleep` ops. An empty string means zero, as the JS SDK sends
//! `""` for inputs its own parser did not understand. [`duration_from_json`]
//! is the one reader of durations in SDK JSON (op options and function
//! configs).

use std::time::Duration;

use serde_json::Value;

use crate::clock::Timestamp;

/// Longest duration accepted anywhere (100 years): checked before any
/// arithmetic, so a huge number is an error rather than a panic.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 86_400);
/// Longest sleep, and the furthest date a sleep may name.
pub const MAX_SLEEP: Duration = Duration::from_secs(366 * 86_400);

/// Seconds (from JSON or a config) as a duration: finite, not negative, at
/// most [`MAX_DURATION`].
pub fn duration_from_secs(seconds: f64) -> Result<Duration, String> {
    if !seconds.is_finite() {
        return Err(format!("{seconds} is not a number of seconds"));
    }
    if seconds < 0.0 {
        return Err(format!("{seconds} is negative; a duration must not be"));
    }
    if seconds > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "{seconds} seconds is longer than the most accepted ({} days)",
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A duration in SDK JSON (op options, function configs): `null` is none;
/// a string is a time string ([`parse_time_str`]; `""` is zero); a number
/// is **milliseconds**, as the JS SDK's `timeStr` reads a number. Neither
/// SDK sends numbers (both send time strings, and Inngest's Go server takes
/// only strings), so a number is Baton's extension, read in the unit a JS
/// author means. Negative, non-finite or huge values, and any other JSON
/// type, are errors.
pub fn duration_from_json(value: &Value) -> Result<Option<Duration>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_time_str(text).map(Some),
        Value::Number(number) => {
            let millis = number
                .as_f64()
                .ok_or_else(|| format!("{number} is not a number of milliseconds"))?;
            if millis < 0.0 {
                return Err(format!("{number} ms is negative; a duration must not be"));
            }
            duration_from_secs(millis / 1_000.0).map(Some).map_err(|_| {
                format!(
                    "{number} ms is longer than the most accepted ({} days)",
                    MAX_DURATION.as_secs() / 86_400
                )
            })
        }
        other => Err(format!(
            "{other} is not a duration (a time string such as \"1m30s\", or milliseconds)"
        )),
    }
}

/// A duration field of a function config: as [`duration_from_json`], but
/// absent or `""` is unset (the SDKs send `""` for an option left empty).
pub fn config_duration(value: Option<&Value>) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(value) => duration_from_json(value),
    }
}

/// Parses a sequence of `<number><unit>` pairs, units `ns us µs ms s m h d w`.
pub fn parse_time_str(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("time string {text:?} has a number without a unit"))?;
        if number_len == 0 {
            return Err(format!("time string {text:?} is not <number><unit>..."));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite())
            .ok_or_else(|| format!("time string {text:?} has a bad number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3_600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            other => {
                return Err(format!(
                    "time string {text:?} has an unknown unit {other:?}"
                ))
            }
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    duration_from_secs(total).map_err(|_| {
        format!(
            "time string {text:?} is longer than the most accepted ({} days)",
            MAX_DURATION.as_secs() / 86_400
        )
    })
}

/// Parses an RFC 3339 / ISO 8601 date such as `2026-11-25T16:23:15.083Z`.
pub fn parse_iso_date(text: &str) -> Option<Timestamp> {
    let parsed =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(Timestamp(
        (parsed.unix_timestamp_nanos() / 1_000_000) as i64,
    ))
}

/// When a `Sleep` op named `name` ends, as GO reads it: a date when the text
/// looks like one, else a time string from `now`. Sleeps longer than
/// [`MAX_SLEEP`] (or dates further away) are refused.
pub fn sleep_until(name: &str, now: Timestamp) -> Result<Timestamp, String> {
    let latest = now.plus(MAX_SLEEP);
    let days = MAX_SLEEP.as_secs() / 86_400;
    if name.len() >= 10 {
        if let Some(at) = parse_iso_date(name) {
            if at > latest {
                return Err(format!(
                    "sleep until {name:?} is more than {days} days away; the most is {days} days"
                ));
            }
            return Ok(at);
        }
    }
    let duration = parse_time_str(name)?;
    if duration > MAX_SLEEP {
        return Err(format!(
            "sleep of {name:?} is longer than the most accepted ({days} days)"
        ));
    }
    Ok(now.plus(duration))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn check(text: &str, expected_ms: u128) {
        assert_eq!(
            parse_time_str(text).unwrap().as_millis(),
            expected_ms,
            "{text}"
        );
    }

    #[test]
    fn time_strings() {
        check("", 0);
        check("5s", 5_000);
        check("1m", 60_000);
        check(
            "1w2d3h4m5s",
            ((7 + 2) * 86_400 + 3 * 3_600 + 4 * 60 + 5) * 1_000,
        );
        check("250ms", 250);
        check("1.5h", 5_400_000);
        assert!(parse_time_str("5").is_err());
        assert!(parse_time_str("5 parsecs").is_err());
        assert!(parse_time_str("s").is_err());
        // Huge numbers are errors, not panics.
        assert!(parse_time_str("99999999999999999999w").is_err());
        assert!(parse_time_str(&format!("{}s", "9".repeat(400))).is_err());
        assert!(duration_from_secs(-1.0).is_err());
        assert!(duration_from_secs(f64::NAN).is_err());
        assert!(duration_from_secs(1e30).is_err());
        assert_eq!(
            duration_from_secs(1.5).unwrap(),
            Duration::from_millis(1_500)
        );
    }

    #[test]
    fn json_durations_are_time_strings_or_milliseconds() {
        let read = |value: Value| duration_from_json(&value);
        assert_eq!(read(Value::Null), Ok(None));
        assert_eq!(read(json!("1m30s")), Ok(Some(Duration::from_secs(90))));
        assert_eq!(read(json!("")), Ok(Some(Duration::ZERO)));
        assert_eq!(read(json!(1500)), Ok(Some(Duration::from_millis(1_500))));
        assert_eq!(read(json!(0.5)), Ok(Some(Duration::from_micros(500))));
        for bad in [
            json!(-1),
            json!(1e300),
            json!("5"),
            json!(true),
            json!({"seconds": 5}),
            json!([5]),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
        // In configs, absent and "" are unset; everything else as above.
        assert_eq!(config_duration(None), Ok(None));
        assert_eq!(config_duration(Some(&json!(""))), Ok(None));
        assert_eq!(
            config_duration(Some(&json!(2000))),
            Ok(Some(Duration::from_secs(2)))
        );
        assert!(config_duration(Some(&json!(-5))).is_err());
    }

    #[test]
    fn sleeps_accept_dates_and_durations() {
        let now = Timestamp(1_000_000);
        assert_eq!(sleep_until("2s", now).unwrap(), Timestamp(1_002_000));
        assert_eq!(sleep_until("", now).unwrap(), now);
        assert_eq!(
            sleep_until("2023-11-14T22:13:20.123Z", Timestamp(1_699_000_000_000)).unwrap(),
            Timestamp(1_700_000_000_123)
        );
        // Beyond the cap: refused, as a date or as a duration.
        assert!(sleep_until("367d", now).is_err());
        assert!(sleep_until("99999999999999999999w", now).is_err());
        assert!(sleep_until("2100-01-01T00:00:00Z", Timestamp(1_700_000_000_000)).is_err());
        assert!(sleep_until("366d", now).is_ok());
    }
}
