//! Checks on values the relay sends: UUIDs, ISO-8601 timestamps, the shape of a delivered
//! message; and the test process's own open-file limits.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// `8-4-4-4-12` hexadecimal digits.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parse an ISO-8601 / RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`) to Unix seconds.
pub fn parse_iso8601(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.chars()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() {
            return None;
        }
        frac = format!("0.{digits}").parse().ok()?;
        rest = &r[digits.len()..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some((days * 86400 + h * 3600 + mi * 60 + se - offset_secs) as f64 + frac)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Assert the shape of a delivered message object.
pub fn assert_message_shape(m: &Value, room: &str, from: &str, text: &str) {
    assert_eq!(m["room"], room, "message room: {m}");
    assert_eq!(m["from"], from, "message from: {m}");
    assert_eq!(m["text"], text, "message text: {m}");
    let id = m["id"]
        .as_str()
        .unwrap_or_else(|| panic!("message id must be a string: {m}"));
    assert!(is_uuid(id), "message id must be a UUID: {m}");
    let sent_at = m["sentAt"]
        .as_str()
        .unwrap_or_else(|| panic!("sentAt must be a string: {m}"));
    let t = parse_iso8601(sent_at).unwrap_or_else(|| panic!("sentAt must be ISO-8601: {m}"));
    assert!(
        (t - unix_now()).abs() < 120.0,
        "sentAt must be about now: {m}"
    );
    assert!(
        m["seq"].as_u64().is_some_and(|s| s >= 1),
        "seq must be a positive integer: {m}"
    );
}

/// Read a file of the test process's resource limits: (soft, hard) max open files.
pub fn own_open_file_limits() -> Option<(Option<u64>, Option<u64>)> {
    let mut s = String::new();
    std::fs::File::open("/proc/self/limits")
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    let parse = |f: &str| f.parse::<u64>().ok();
    Some((parse(fields.first()?), parse(fields.get(1)?)))
}
