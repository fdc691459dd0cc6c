//! Flow-control bookkeeping shared by every backend: the GCRA of rate limits
//! and throttles ([`Gcra`]), and the one primitive a backend provides for
//! it, [`StateStore::update_flow`](crate::store::StateStore::update_flow):
//! an atomic read-modify-write of one record ([`FlowRecord`]) in one slot
//! ([`FlowSlot`]). What each flow-control call does with the record is
//! decided here and in the trait's provided methods, once; backends only
//! store it.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::model::records::Record;
use crate::model::{BatchRecord, DebounceRecord};
use crate::store::StoreResult;

/// A GCRA bucket: `limit` per `period`, and for a throttle `burst` starts
/// let through at once (a rate limit tolerates a whole period's worth).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Gcra {
    /// Milliseconds between two arrivals at the steady rate (at least 1).
    fn emission(&self) -> i64 {
        (self.period.as_millis() as i64 / i64::from(self.limit.max(1))).max(1)
    }

    /// The arrival time after `stored` (the key's, if any) at `now`.
    fn arrival(stored: Option<i64>, now: Timestamp) -> i64 {
        stored.unwrap_or(i64::MIN).max(now.millis())
    }

    /// Rate limit: the arrival time to store after one take, or `None`
    /// when the key has no slot left (store nothing then).
    pub fn take(&self, stored: Option<i64>, now: Timestamp) -> Option<i64> {
        let tolerance = self.period.as_millis() as i64 - self.emission();
        let tat = Self::arrival(stored, now);
        (tat - now.millis() <= tolerance).then_some(tat + self.emission())
    }

    /// Throttle: the arrival time to store and when the reserved start may
    /// happen.
    pub fn reserve(&self, stored: Option<i64>, now: Timestamp) -> (i64, Timestamp) {
        let tolerance = self.emission() * i64::from(self.burst.max(1) - 1);
        let tat = Self::arrival(stored, now);
        let allowed = (tat - tolerance).max(now.millis());
        (tat + self.emission(), Timestamp(allowed))
    }
}

/// Where a flow-control record lives: its kind and the rule's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSlot<'a> {
    /// A rate limit's GCRA arrival time.
    RateLimit(&'a str),
    /// A throttle's GCRA arrival time.
    Throttle(&'a str),
    Debounce(&'a str),
    /// The open batch.
    Batch(&'a str),
    /// The run that holds a singleton.
    Singleton(&'a str),
}

impl<'a> FlowSlot<'a> {
    /// The rule's key.
    pub fn key(self) -> &'a str {
        match self {
            FlowSlot::RateLimit(key)
            | FlowSlot::Throttle(key)
            | FlowSlot::Debounce(key)
            | FlowSlot::Batch(key)
            | FlowSlot::Singleton(key) => key,
        }
    }

    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            FlowSlot::RateLimit(_) => "rate_limit",
            FlowSlot::Throttle(_) => "throttle",
            FlowSlot::Debounce(_) => "debounce",
            FlowSlot::Batch(_) => "batch",
            FlowSlot::Singleton(_) => "singleton",
        }
    }

    /// Decodes what a backend stored in this slot; arrival times with the
    /// backend's own encoding (`arrival`).
    pub fn decode(
        self,
        bytes: &[u8],
        arrival: impl Fn(&[u8]) -> Option<i64>,
    ) -> StoreResult<FlowRecord> {
        Ok(match self {
            FlowSlot::RateLimit(_) | FlowSlot::Throttle(_) => {
                FlowRecord::Arrival(arrival(bytes).ok_or_else(|| {
                    crate::store::StoreError::new(
                        crate::store::StoreErrorKind::Corrupt,
                        format!("a damaged GCRA arrival time under {:?}", self.key()),
                    )
                })?)
            }
            FlowSlot::Debounce(_) => FlowRecord::Debounce(DebounceRecord::from_bytes(bytes)?),
            FlowSlot::Batch(_) => FlowRecord::Batch(BatchRecord::from_bytes(bytes)?),
            FlowSlot::Singleton(_) => FlowRecord::Holder(String::from_utf8_lossy(bytes).into()),
        })
    }
}

/// A flow-control record.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowRecord {
    /// A GCRA arrival time, ms.
    Arrival(i64),
    Debounce(DebounceRecord),
    Batch(BatchRecord),
    /// A singleton's holder, a run id.
    Holder(String),
}

impl FlowRecord {
    /// Encodes the record; arrival times with the backend's own encoding.
    pub fn to_bytes(&self, arrival: impl Fn(i64) -> Vec<u8>) -> Vec<u8> {
        match self {
            FlowRecord::Arrival(tat) => arrival(*tat),
            FlowRecord::Debounce(record) => record.to_bytes(),
            FlowRecord::Batch(record) => record.to_bytes(),
            FlowRecord::Holder(run_id) => run_id.as_bytes().to_vec(),
        }
    }
}

/// What an update leaves in its slot.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowWrite {
    /// Nothing changes.
    Keep,
    Put(FlowRecord),
    /// The slot is emptied.
    Clear,
}

/// Decides a slot's new content from its record (if any). A backend may
/// call it more than once (an optimistic write that lost a race reads
/// again); only the last call's decision is stored.
pub type FlowChange<'a> = &'a mut (dyn FnMut(Option<FlowRecord>) -> FlowWrite + Send);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_refuse_past_the_limit_and_throttles_reserve_later() {
        let second = Duration::from_secs(1);
        let t0 = Timestamp(10_000);
        let two_a_second = Gcra {
            limit: 2,
            period: second,
            burst: 1,
        };
        let first = two_a_second.take(None, t0).expect("a first take");
        let second_take = two_a_second.take(Some(first), t0).expect("a second");
        assert_eq!(two_a_second.take(Some(second_take), t0), None);
        let later = t0.plus(Duration::from_millis(500));
        assert!(two_a_second.take(Some(second_take), later).is_some());

        let one_a_second = Gcra {
            limit: 1,
            period: second,
            burst: 1,
        };
        let (tat, allowed) = one_a_second.reserve(None, t0);
        assert_eq!(allowed, t0);
        let (_, allowed) = one_a_second.reserve(Some(tat), t0);
        assert_eq!(allowed, t0.plus(second));
        let burst_of_two = Gcra {
            burst: 2,
            ..one_a_second
        };
        let (tat, _) = burst_of_two.reserve(None, t0);
        assert_eq!(burst_of_two.reserve(Some(tat), t0).1, t0);
    }
}
