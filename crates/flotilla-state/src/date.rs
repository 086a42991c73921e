//! UTC calendar dates without a date-time dependency (Howard Hinnant's civil algorithms,
//! proleptic Gregorian).

pub(crate) const MS_PER_DAY: i64 = 86_400_000;

/// "YYYY-MM-DD" of a count of days since 1970-01-01.
pub(crate) fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Days since 1970-01-01 of a valid date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds of UTC midnight starting `date` ("YYYY-MM-DD"); None when it is not a
/// real date in that form.
pub fn date_to_ms(date: &str) -> Option<i64> {
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &str| -> Option<i64> {
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (year, month, day) = (num(&date[0..4])?, num(&date[5..7])?, num(&date[8..10])?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * MS_PER_DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(-1), "1969-12-31");
        assert_eq!(civil_date(59), "1970-03-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(19_723), "2024-01-01");
        assert_eq!(civil_date(19_782), "2024-02-29");
        // 1_700_000_000_000 ms is 2023-11-14T22:13:20Z.
        assert_eq!(civil_date(1_700_000_000_000 / MS_PER_DAY), "2023-11-14");
    }

    #[test]
    fn dates_parse_to_utc_midnight_and_round_trip() {
        assert_eq!(date_to_ms("1970-01-01"), Some(0));
        assert_eq!(date_to_ms("2024-03-10"), Some(1_710_028_800_000));
        assert_eq!(date_to_ms("1969-12-31"), Some(-MS_PER_DAY));
        for days in [-700_000, -1, 0, 11_016, 19_782, 2_932_896] {
            assert_eq!(
                date_to_ms(&civil_date(days)),
                Some(days * MS_PER_DAY),
                "{days}"
            );
        }
        for bad in [
            "",
            "2024-3-10",
            "2024-02-30",
            "2023-02-29",
            "1900-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-01-00",
            "2024/01/01",
            "+024-01-01",
            "2024-01-01T00:00",
        ] {
            assert_eq!(date_to_ms(bad), None, "{bad}");
        }
        assert_eq!(date_to_ms("2000-02-29"), Some(11_016 * MS_PER_DAY));
    }
}
