//! UTC timestamp formatting without a calendar library: RFC 3339 with microseconds for rows,
//! and Hive-style `dt=YYYY-MM-DD/hour=HH` partitions for object names.

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year (proleptic Gregorian).
    pub year: i64,
    /// Month, 1..=12.
    pub month: u32,
    /// Day of month, 1..=31.
    pub day: u32,
    /// Hour, 0..=23.
    pub hour: u32,
    /// Minute, 0..=59.
    pub minute: u32,
    /// Second, 0..=59.
    pub second: u32,
    /// Microsecond, 0..=999_999.
    pub micros: u32,
}

impl Civil {
    /// Splits microseconds since the Unix epoch (negative before 1970).
    pub fn from_unix_micros(micros: i64) -> Civil {
        let secs = micros.div_euclid(1_000_000);
        let sub = micros.rem_euclid(1_000_000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        // Days to civil date: H. Hinnant's algorithm (public domain), proleptic Gregorian.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod / 60 % 60,
            second: sod % 60,
            micros: sub,
        }
    }
}

/// Appends `2026-11-27T09:00:00.123456Z`. Years must be 1..=9999 (callers validate); others
/// are written modulo 10,000.
pub fn write_rfc3339_micros(out: &mut String, unix_micros: i64) {
    let c = Civil::from_unix_micros(unix_micros);
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut buf[0..4], c.year.rem_euclid(10_000) as u32);
    put_digits(&mut buf[5..7], c.month);
    put_digits(&mut buf[8..10], c.day);
    put_digits(&mut buf[11..13], c.hour);
    put_digits(&mut buf[14..16], c.minute);
    put_digits(&mut buf[17..19], c.second);
    put_digits(&mut buf[20..26], c.micros);
    out.extend(buf.iter().map(|b| *b as char));
}

/// Writes `v` as zero-padded decimal digits filling `dst`.
fn put_digits(dst: &mut [u8], mut v: u32) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

thread_local! {
    /// The last day formatted on this thread: rows of a batch share their day.
    static LAST_DAY: std::cell::Cell<(i64, [u8; 10])> = const { std::cell::Cell::new((i64::MIN, [0; 10])) };
}

/// Appends `"2026-11-27T09:00:00.123456Z"` as bytes (no quotes); the date part is cached per
/// thread, so consecutive instants of one day cost a few divisions.
pub fn push_rfc3339_micros(out: &mut Vec<u8>, unix_micros: i64) {
    let secs = unix_micros.div_euclid(1_000_000);
    let day = secs.div_euclid(86_400);
    let date = LAST_DAY.with(|c| {
        let (d, text) = c.get();
        if d == day {
            return text;
        }
        let civil = Civil::from_unix_micros(unix_micros);
        let mut t = *b"0000-00-00";
        put_digits(&mut t[0..4], civil.year.rem_euclid(10_000) as u32);
        put_digits(&mut t[5..7], civil.month);
        put_digits(&mut t[8..10], civil.day);
        c.set((day, t));
        t
    });
    let sod = secs.rem_euclid(86_400) as u32;
    let mut t = *b"T00:00:00.000000Z";
    put_digits(&mut t[1..3], sod / 3600);
    put_digits(&mut t[4..6], sod / 60 % 60);
    put_digits(&mut t[7..9], sod % 60);
    put_digits(&mut t[10..16], unix_micros.rem_euclid(1_000_000) as u32);
    out.extend_from_slice(&date);
    out.extend_from_slice(&t);
}

/// `2026-11-27T09:00:00.123456Z`.
pub fn rfc3339_micros(unix_micros: i64) -> String {
    let mut s = String::with_capacity(27);
    write_rfc3339_micros(&mut s, unix_micros);
    s
}

/// `dt=2026-11-27/hour=09`, the Hive partition of an instant.
pub fn hive_partition(unix_micros: i64) -> String {
    let c = Civil::from_unix_micros(unix_micros);
    format!(
        "dt={:04}-{:02}-{:02}/hour={:02}",
        c.year, c.month, c.day, c.hour
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses a UTC instant: `YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)`, to µs
/// since the epoch (fraction digits past the sixth are truncated). `None` when malformed.
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !(1..=12).contains(&mo)
        || !(1..=month_days).contains(&d)
    {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    if b.len() == 10 {
        return Some(days * 86_400_000_000);
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 6 {
                micros = micros * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..6 {
            micros *= 10;
        }
    }
    match &b[i..] {
        b"Z" | b"z" | b"+00:00" => {}
        _ => return None,
    }
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec);
    Some(secs * 1_000_000 + micros)
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        // Values checked against `date -u -d @SECONDS`.
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_795_770_000_123_456),
            "2026-11-27T09:00:00.123456Z"
        );
        assert_eq!(
            rfc3339_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            rfc3339_micros(-62_135_596_800_000_000),
            "0001-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339_micros(253_402_300_799_999_999),
            "9999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn byte_form_matches_and_survives_day_changes() {
        for m in [
            0,
            1_795_770_000_123_456,
            -1,
            951_782_400_000_000,
            1_795_770_000_123_456 + 86_400_000_000,
            253_402_300_799_999_999,
        ] {
            let mut out = Vec::new();
            push_rfc3339_micros(&mut out, m);
            assert_eq!(String::from_utf8(out).unwrap(), rfc3339_micros(m), "{m}");
        }
    }

    #[test]
    fn parses_what_it_formats_and_common_forms() {
        for m in [
            0,
            1_795_770_000_123_456,
            -1,
            951_782_400_000_000,
            253_402_300_799_999_999,
            -62_135_596_800_000_000,
        ] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_micros(m)), Some(m), "{m}");
        }
        assert_eq!(parse_rfc3339_utc("2026-11-27"), Some(1_795_737_600_000_000));
        assert_eq!(
            parse_rfc3339_utc("2026-11-27T09:00:00Z"),
            Some(1_795_770_000_000_000)
        );
        assert_eq!(
            parse_rfc3339_utc("2026-11-27T09:00:00.5+00:00"),
            Some(1_795_770_000_500_000)
        );
        assert_eq!(
            parse_rfc3339_utc("2026-11-27T09:00:00.123456789Z"),
            Some(1_795_770_000_123_456)
        );
        for bad in [
            "",
            "2026-13-01",
            "2026-11-27T09:00:00",
            "2026-11-27T09:00:00+02:00",
            "2026/11/27",
            "2026-11-27T9:00:00Z",
            "2026-11-27T09:00:00.Z",
            // Days a month does not have.
            "2026-02-29",
            "2026-02-31",
            "2026-04-31",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
        // A leap day: the day after February 28th.
        assert_eq!(
            parse_rfc3339_utc("2028-02-29").map(|t| t - parse_rfc3339_utc("2028-02-28").unwrap()),
            Some(86_400_000_000)
        );
    }

    #[test]
    fn hive_partition_of_an_instant() {
        assert_eq!(
            hive_partition(1_795_770_000_123_456),
            "dt=2026-11-27/hour=09"
        );
    }
}
