//! Pure checks the contract names: GB 11643 identity numbers, GB 32100 organisation codes,
//! the time format, code lists and size limits.

use chrono::{DateTime, FixedOffset, NaiveDate};

/// A batch carries at most this many records.
pub const MAX_BATCH: usize = 500;

/// The one time zone of the product: China Standard Time (UTC+8, no daylight saving), in
/// which the platform's hospitals write times, "today" is reckoned (future checks, whole-day
/// ranges) and the simulator keeps its clock. The database's own zone (`database.timezone`)
/// only changes how PostgreSQL prints times; every time sent carries its offset.
pub const CHINA_OFFSET_SECS: i32 = 8 * 3600;

pub fn china() -> FixedOffset {
    FixedOffset::east_opt(CHINA_OFFSET_SECS).expect("a valid offset")
}

/// Now, in China Standard Time.
pub fn china_now() -> DateTime<FixedOffset> {
    chrono::Utc::now().with_timezone(&china())
}
/// A PDF is at most 10 MiB.
pub const MAX_PDF_BYTES: usize = 10 * 1024 * 1024;
/// Event times may be at most this far in the future.
pub const FUTURE_SLACK_SECS: i64 = 300;

pub const ID_TYPES: [&str; 5] = ["01", "02", "03", "04", "99"];
pub const GENDER_CODES: [&str; 4] = ["0", "1", "2", "9"];
pub const VISIT_TYPES: [&str; 4] = [OUTPATIENT, "2", "3", "4"];
/// Visit type 1, 门诊: what serve checks as when a terminal names none (CDS Hooks' order-sign
/// carries no visit type).
pub const OUTPATIENT: &str = "1";
pub const ABNORMAL_FLAGS: [&str; 4] = ["1", "2", "3", "4"];
pub const STATUS_CODES: [&str; 2] = ["0", "1"];
pub const STAFF_ROLES: [&str; 5] = ["doctor", "technician", "nurse", "pharmacist", "other"];
pub const EXAM_CLASSES: [&str; 9] = ["CT", "MR", "DR", "US", "ES", "ECG", "NM", "PATH", "OTHER"];
/// 职称 (`titleCode`): the health professional titles of GB/T 8561-2001 — 医师 231–235, 药剂
/// 241–245, 护理 251–255, 技师 261–265 (主任 … 士). The contract names the field without a code
/// list; this is hmr's reading (docs/protocol.md), so an unmapped word is caught before upload.
pub const TITLE_CODES: [&str; 20] = [
    "231", "232", "233", "234", "235", "241", "242", "243", "244", "245", "251", "252", "253", "254", "255", "261",
    "262", "263", "264", "265",
];

/// Why a resident identity number (id type `01`) is invalid, or `None` when valid.
/// `birth_date` (`YYYY-MM-DD`), when given, must match the one inside the number.
pub fn id_card_problem(id_no: &str, birth_date: Option<&str>) -> Option<&'static str> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = id_no.as_bytes();
    if bytes.len() != 18
        || !bytes[..17].iter().all(u8::is_ascii_digit)
        || !(bytes[17].is_ascii_digit() || bytes[17] == b'X')
    {
        return Some("format");
    }
    let sum: u32 = bytes[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    if CHECK[(sum % 11) as usize] != bytes[17] {
        return Some("checksum");
    }
    let embedded = &id_no[6..14];
    let Ok(born) = NaiveDate::parse_from_str(embedded, "%Y%m%d") else {
        return Some("birth-date");
    };
    if let Some(given) = birth_date {
        if NaiveDate::parse_from_str(given, "%Y-%m-%d").ok() != Some(born) {
            return Some("birth-date-mismatch");
        }
    }
    None
}

/// The check character completing 17 digits of a resident identity number.
pub fn id_card_check_char(first17: &str) -> char {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17.bytes().zip(WEIGHTS).map(|(b, w)| u32::from(b - b'0') * w).sum();
    b"10X98765432"[(sum % 11) as usize] as char
}

const ORG_CHARS: &str = "0123456789ABCDEFGHJKLMNPQRTUWXY";
const ORG_WEIGHTS: [usize; 17] = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28];

/// The check character completing 17 characters of a 统一社会信用代码 (GB 32100-2015).
pub fn org_code_check_char(first17: &str) -> Option<char> {
    let mut sum = 0;
    for (c, w) in first17.chars().zip(ORG_WEIGHTS) {
        sum += ORG_CHARS.find(c)? * w;
    }
    let check = (31 - sum % 31) % 31;
    ORG_CHARS.chars().nth(check)
}

pub fn org_code_valid(code: &str) -> bool {
    code.len() == 18
        && code.is_ascii()
        && code.chars().all(|c| ORG_CHARS.contains(c))
        && org_code_check_char(&code[..17]) == code.chars().nth(17)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]±HH:MM` (numeric offset and seconds required).
pub fn parse_time(value: &str) -> Option<DateTime<FixedOffset>> {
    let b = value.as_bytes();
    // The offset must be numeric: `…±HH:MM`, never `Z`.
    if b.len() < 25 || !matches!(b[b.len() - 6], b'+' | b'-') || b[b.len() - 3] != b':' || b[10] != b'T' {
        return None;
    }
    // Seconds are required: `HH:MM:SS` right after the `T`.
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    DateTime::parse_from_rfc3339(value).ok()
}

pub fn parse_date(value: &str) -> Option<NaiveDate> {
    if value.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()
}

/// Formats a time the way the contract wants it (seconds and numeric offset).
pub fn format_time(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// Trims and upper-cases an identity number for matching a person.
pub fn normalise_id_no(id_no: &str) -> String {
    id_no.trim().to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_card_checks() {
        let first = "44130219900307123";
        let full = format!("{first}{}", id_card_check_char(first));
        assert_eq!(id_card_problem(&full, Some("1990-03-07")), None);
        assert_eq!(id_card_problem(&full, Some("1990-03-08")), Some("birth-date-mismatch"));
        let wrong = format!("{first}{}", if full.ends_with('0') { '1' } else { '0' });
        assert_eq!(id_card_problem(&wrong, None), Some("checksum"));
        assert_eq!(id_card_problem("4413021990030712", None), Some("format"));
        assert_eq!(
            id_card_problem(&full.to_lowercase().replace('X', "x"), None).is_some(),
            full.ends_with('X')
        );
        // Known valid sample from GB 11643's appendix.
        assert_eq!(id_card_problem("11010519491231002X", Some("1949-12-31")), None);
    }

    #[test]
    fn org_codes() {
        // A published example of a valid code.
        assert!(org_code_valid("91350100M000100Y43"));
        assert!(!org_code_valid("91350100M000100Y44"));
        let first = "12441300MB2C00000";
        let code = format!("{first}{}", org_code_check_char(first).unwrap());
        assert!(org_code_valid(&code));
    }

    #[test]
    fn times() {
        assert!(parse_time("2024-06-01T08:30:00+08:00").is_some());
        assert!(parse_time("2024-06-01T08:30:00.123+08:00").is_some());
        assert!(parse_time("2024-06-01T08:30:00Z").is_none());
        assert!(parse_time("2024-06-01T08:30+08:00").is_none());
        assert!(parse_time("2024-06-01 08:30:00+08:00").is_none());
        assert!(parse_date("2024-06-01").is_some());
        assert!(parse_date("2024-6-1").is_none());
    }
}
