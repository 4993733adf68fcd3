//! Budget periods: UTC calendar days and months. A period is `[start, end)`, named by its key
//! (`2026-11-22` for a day, `2026-11` for a month); pause flags carry the key so their owner
//! and end are readable from the flag alone.

use agentbridge_config::BudgetPeriod;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub key: String,
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

fn first_of_next_month(year: i32, month: u32) -> NaiveDate {
    let (y, m) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(NaiveDate::MAX)
}

/// The period of kind `kind` that contains `at`.
pub fn period_of(kind: BudgetPeriod, at: DateTime<Utc>) -> Period {
    let day = at.date_naive();
    match kind {
        BudgetPeriod::Day => Period {
            start: midnight(day),
            end: midnight(day.succ_opt().unwrap_or(NaiveDate::MAX)),
            key: day.format("%Y-%m-%d").to_string(),
        },
        BudgetPeriod::Month => {
            let first = NaiveDate::from_ymd_opt(day.year(), day.month(), 1).unwrap_or(day);
            Period {
                start: midnight(first),
                end: midnight(first_of_next_month(day.year(), day.month())),
                key: first.format("%Y-%m").to_string(),
            }
        }
    }
}

/// Parses a period key (`YYYY-MM` or `YYYY-MM-DD`), as given to `report chargeback --period`.
pub fn parse_period(key: &str) -> Option<Period> {
    if let Ok(d) = NaiveDate::parse_from_str(key, "%Y-%m-%d") {
        return Some(period_of(BudgetPeriod::Day, midnight(d)));
    }
    let d = NaiveDate::parse_from_str(&format!("{key}-01"), "%Y-%m-%d").ok()?;
    Some(period_of(BudgetPeriod::Month, midnight(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_roll_over_at_utc_midnight() {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).single().expect("time");
        let d = period_of(BudgetPeriod::Day, at);
        assert_eq!(d.key, "2026-12-31");
        assert_eq!(d.end, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).single().expect("time"));
        let m = period_of(BudgetPeriod::Month, at);
        assert_eq!(m.key, "2026-12");
        assert_eq!(m.start, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single().expect("time"));
        assert_eq!(m.end, d.end);
        assert_eq!(parse_period("2026-11").map(|p| p.end), Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single());
        assert_eq!(parse_period("2026-11-22").map(|p| p.key), Some("2026-11-22".to_string()));
        assert!(parse_period("november").is_none());
    }
}
