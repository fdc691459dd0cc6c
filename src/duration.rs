//! Inngest "time strings" (`"1w2d3h4m5s"`, `"500ms"`) and the ISO dates the
//! SDKs put in `Sleep` ops. An empty string means zero, as the JS SDK sends
//! `""` for inputs its own parser did not understand.

use std::time::Duration;

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
