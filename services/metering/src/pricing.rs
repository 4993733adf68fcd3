//! Prices runs in credits. A model's price is the configured entry with the latest
//! `effective_from` on or before the run's completion date (UTC), so a price change applies from
//! its date on and a month that straddles it is split exactly.
//!
//! Arithmetic is integer: prices are micro-credits per million tokens, and one run costs
//! `round_half_up((uncached_input × input + cached × cached_input + output × output) / 10^6)`
//! micro-credits, computed in 128 bits and rounded once per run. Credits are computed when a run
//! is recorded and stored with the price's date; nothing recomputes them later.

use std::collections::HashMap;

use agentbridge_config::{MicroCredits, PriceConfig};
use agentbridge_contracts::UsageRecord;
use chrono::NaiveDate;

/// The price table, by model, each model's entries sorted by date.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    by_model: HashMap<String, Vec<PriceConfig>>,
}

/// The price of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    pub credits_micro: MicroCredits,
    /// No price covered the model on the run's date: `credits_micro` is 0 and the run is
    /// flagged and alerted on, never dropped.
    pub price_missing: bool,
    /// The `effective_from` of the entry used.
    pub effective_from: Option<NaiveDate>,
}

impl PriceBook {
    pub fn new(prices: &[PriceConfig]) -> Self {
        let mut by_model: HashMap<String, Vec<PriceConfig>> = HashMap::new();
        for p in prices {
            by_model.entry(p.model.clone()).or_default().push(p.clone());
        }
        for entries in by_model.values_mut() {
            entries.sort_by_key(|p| p.effective_from);
        }
        Self { by_model }
    }

    /// The entry in force for `model` on `date`.
    pub fn lookup(&self, model: &str, date: NaiveDate) -> Option<&PriceConfig> {
        self.by_model.get(model)?.iter().rev().find(|p| p.effective_from <= date)
    }

    pub fn price(&self, usage: &UsageRecord) -> Priced {
        let date = usage.completed_at.date_naive();
        match self.lookup(&usage.model, date) {
            Some(p) => Priced {
                credits_micro: credits(p, usage.input_tokens, usage.cached_input_tokens, usage.output_tokens),
                price_missing: false,
                effective_from: Some(p.effective_from),
            },
            None => Priced { credits_micro: 0, price_missing: true, effective_from: None },
        }
    }
}

/// Micro-credits of one run under price `p`. Cached tokens are part of `input`; more cached
/// than input tokens is treated as all input cached.
pub fn credits(p: &PriceConfig, input: u64, cached: u64, output: u64) -> MicroCredits {
    let cached = cached.min(input);
    let uncached = input - cached;
    let cached_price = p.cached_input_per_million.unwrap_or(p.input_per_million);
    let numerator = i128::from(uncached) * i128::from(p.input_per_million)
        + i128::from(cached) * i128::from(cached_price)
        + i128::from(output) * i128::from(p.output_per_million);
    let rounded = (numerator + 500_000) / 1_000_000;
    // Saturate instead of wrapping: a run worth more than 9.2 trillion credits is bad input,
    // and a saturated value is visible in every report.
    MicroCredits::try_from(rounded).unwrap_or(MicroCredits::MAX)
}

/// `1234567` → `"1.234567"`.
pub fn format_credits(micro: i128) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn price(from: &str, input: i64, cached: Option<i64>, output: i64) -> PriceConfig {
        PriceConfig {
            model: "m".into(),
            effective_from: from.parse().expect("date"),
            input_per_million: input,
            cached_input_per_million: cached,
            output_per_million: output,
        }
    }

    fn usage(day: u32, input: u64, cached: u64, output: u64) -> UsageRecord {
        UsageRecord {
            run_id: "r".into(),
            idempotency_key: "k".into(),
            agent: "a".into(),
            agent_version: None,
            model: "m".into(),
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            tool_calls: 0,
            latency_ms: None,
            status: "completed".into(),
            business_process: None,
            department: None,
            cost_center: None,
            environment: None,
            source_system: None,
            source_event_id: None,
            started_at: None,
            completed_at: Utc.with_ymd_and_hms(2026, 11, day, 12, 0, 0).single().expect("time"),
        }
    }

    #[test]
    fn prices_by_effective_date_with_cached_input() {
        // 2.5 credits / M input, 1.25 / M cached, 10 / M output; from the 15th: 5 / 2.5 / 20.
        let book = PriceBook::new(&[
            price("2026-11-15", 5_000_000, Some(2_500_000), 20_000_000),
            price("2026-11-01", 2_500_000, Some(1_250_000), 10_000_000),
        ]);
        // 1M input of which 400k cached, 100k output: 0.6×2.5 + 0.4×1.25 + 0.1×10 = 3.0 credits.
        let before = book.price(&usage(14, 1_000_000, 400_000, 100_000));
        assert_eq!(before.credits_micro, 3_000_000);
        assert_eq!(before.effective_from, "2026-11-01".parse().ok());
        let after = book.price(&usage(15, 1_000_000, 400_000, 100_000));
        assert_eq!(after.credits_micro, 6_000_000);
        let mut unknown = usage(15, 1, 0, 1);
        unknown.model = "other".into();
        assert_eq!(book.price(&unknown), Priced { credits_micro: 0, price_missing: true, effective_from: None });
        let old = book.price(&usage(1, 1, 0, 0));
        assert!(!old.price_missing);
    }

    #[test]
    fn rounds_half_up_once_per_run() {
        let p = price("2026-01-01", 1_500_000, None, 0);
        // 1 token at 1.5 credits / M = 1.5 micro-credits → 2.
        assert_eq!(credits(&p, 1, 0, 0), 2);
        assert_eq!(credits(&p, 3, 0, 0), 5); // 4.5 → 5
        assert_eq!(credits(&p, 2, 5, 0), 3); // cached clamped to input, priced as input
        assert_eq!(format_credits(1_234_567), "1.234567");
        assert_eq!(format_credits(-5), "-0.000005");
    }
}
