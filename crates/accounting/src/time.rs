//! UTC calendar dates without a date library: the ledger stores unix milliseconds, reports and
//! the price catalog speak `YYYY-MM-DD` (UTC). The day arithmetic is Howard Hinnant's
//! `days_from_civil` / `civil_from_days` (proleptic Gregorian calendar), the same mapping
//! SQLite's `strftime('%Y-%m-%d', …, 'unixepoch')` uses, so a day computed here and a day
//! grouped in SQL agree.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::AccountingError;

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of the date `y-m-d`.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = i64::from((m + 9) % 12); // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date `(y, m, d)` of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both casts are of values in [1, 31] and [1, 12].
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parse a strict `YYYY-MM-DD` (a real calendar date) into its day number since 1970-01-01.
pub fn parse_day(s: &str) -> Result<i64, AccountingError> {
    let bad = || AccountingError::BadDate(s.to_owned());
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let digits = |r: std::ops::Range<usize>| -> Result<u32, AccountingError> {
        let part = &s[r];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(y), m, d);
    // 2025-02-30 maps to 2025-03-02: the round trip rejects days a month does not have.
    if civil_from_days(days) != (i64::from(y), m, d) {
        return Err(bad());
    }
    Ok(days)
}

/// Unix milliseconds at 00:00 UTC of `YYYY-MM-DD`.
pub fn day_start_ms(s: &str) -> Result<i64, AccountingError> {
    Ok(parse_day(s)? * MS_PER_DAY)
}

/// The UTC date `YYYY-MM-DD` of a unix time in milliseconds.
pub fn utc_day(unix_ms: i64) -> String {
    let (y, m, d) = civil_from_days(unix_ms.div_euclid(MS_PER_DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix time in seconds.
pub fn utc_datetime(unix_s: i64) -> String {
    let secs = unix_s.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02}",
        utc_day(unix_s.div_euclid(86_400) * MS_PER_DAY),
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Now, in unix milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_days() {
        assert_eq!(parse_day("1970-01-01").ok(), Some(0));
        assert_eq!(parse_day("2000-03-01").ok(), Some(11_017));
        // 2025-11-30 00:00:00 UTC = 1764460800 (date -u -d 2025-11-30 +%s).
        assert_eq!(day_start_ms("2025-11-30").ok(), Some(1_764_460_800_000));
        assert_eq!(utc_day(1_764_460_800_000 + MS_PER_DAY - 1), "2025-11-30");
        assert_eq!(utc_day(1_764_460_800_000 + MS_PER_DAY), "2025-12-01");
        assert_eq!(utc_day(-1), "1969-12-31");
        assert_eq!(utc_datetime(1_764_460_800 + 3661), "2025-11-30 01:01:01");
    }

    #[test]
    fn round_trip_every_day_of_four_centuries() {
        for z in days_from_civil(1900, 1, 1)..days_from_civil(2300, 1, 1) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
            assert_eq!(parse_day(&format!("{y:04}-{m:02}-{d:02}")).ok(), Some(z));
        }
    }

    #[test]
    fn rejects_non_dates() {
        for s in [
            "2025-02-29",
            "2024-02-30",
            "2025-13-01",
            "2025-00-10",
            "2025-1-01",
            "25-11-30",
            "2025/11/30",
            "2025-11-3x",
            "",
            "2025-11-30T00",
        ] {
            assert!(parse_day(s).is_err(), "{s} should be rejected");
        }
        assert!(parse_day("2024-02-29").is_ok());
    }
}
