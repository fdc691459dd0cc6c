//! Cron schedules of function triggers: standard 5-field specs, an optional
//! leading seconds field, and a `TZ=Zone/Name ` (or `CRON_TZ=`) prefix; UTC
//! otherwise. Parsing and evaluation come from the `croner` crate.

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;

use crate::clock::Timestamp;

#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    tz: Option<Tz>,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        let (tz, spec) = match text
            .strip_prefix("TZ=")
            .or_else(|| text.strip_prefix("CRON_TZ="))
        {
            Some(rest) => {
                let (zone, spec) = rest
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("cron {text:?} has a time zone but no schedule"))?;
                let tz: Tz = zone
                    .parse()
                    .map_err(|_| format!("cron {text:?} has an unknown time zone {zone:?}"))?;
                (Some(tz), spec.trim())
            }
            None => (None, text),
        };
        let cron = croner::Cron::new(spec)
            .with_seconds_optional()
            .parse()
            .map_err(|err| format!("invalid cron {text:?}: {err}"))?;
        Ok(Schedule { cron, tz })
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let utc = Utc.timestamp_millis_opt(after.millis()).single()?;
        let next = match self.tz {
            Some(tz) => self
                .cron
                .find_next_occurrence(&utc.with_timezone(&tz), false)
                .ok()?
                .timestamp_millis(),
            None => self
                .cron
                .find_next_occurrence(&utc, false)
                .ok()?
                .timestamp_millis(),
        };
        Some(Timestamp(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2023-11-14T22:13:20.123Z
    const T: Timestamp = Timestamp(1_700_000_000_123);

    #[test]
    fn five_and_six_fields() {
        let every_5m = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(
            every_5m.next_after(T).unwrap().to_rfc3339(),
            "2023-11-14T22:15:00Z"
        );
        let every_2s = Schedule::parse("*/2 * * * * *").unwrap();
        assert_eq!(
            every_2s.next_after(T).unwrap().to_rfc3339(),
            "2023-11-14T22:13:22Z"
        );
        assert!(Schedule::parse("not a cron").is_err());
    }

    #[test]
    fn time_zones() {
        let paris = Schedule::parse("TZ=Europe/Paris 0 9 * * *").unwrap();
        // 09:00 in Paris in November is 08:00 UTC.
        assert_eq!(
            paris.next_after(T).unwrap().to_rfc3339(),
            "2023-11-15T08:00:00Z"
        );
        assert!(Schedule::parse("TZ=Mars/Base 0 9 * * *").is_err());
        assert!(Schedule::parse("CRON_TZ=UTC 0 9 * * *").is_ok());
    }
}
