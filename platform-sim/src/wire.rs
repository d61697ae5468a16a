//! Reading requests the way section 7 asks: exact content types, UTF-8, no duplicate keys,
//! `null` as absent, unknown fields refused, serde errors turned into `{field, reason}`.

use std::fmt;

use axum::http::{header, HeaderMap};
use hmr_protocol::paths::{CONTENT_JSON, CONTENT_PDF};
use hmr_protocol::FieldError;
use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::error::SimError;

/// A header's value as text; `None` when absent or not visible ASCII.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Checks `Content-Type` is `expected` (parameters allowed; a charset must be UTF-8).
pub fn require_content_type(headers: &HeaderMap, expected: &str) -> Result<(), SimError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(SimError::invalid("Content-Type", "required"));
    };
    let value = value
        .to_str()
        .map_err(|_| SimError::invalid("Content-Type", "unsupported"))?;
    let mut parts = value.split(';').map(str::trim);
    if !parts.next().is_some_and(|m| m.eq_ignore_ascii_case(expected)) {
        return Err(SimError::invalid("Content-Type", "unsupported"));
    }
    for param in parts {
        if let Some((k, v)) = param.split_once('=') {
            let v = v.trim().trim_matches('"');
            if k.trim().eq_ignore_ascii_case("charset") && !v.eq_ignore_ascii_case("utf-8") {
                return Err(SimError::invalid("Content-Type", "charset"));
            }
        }
    }
    Ok(())
}

/// The JSON body as a value: content type, `Content-Length`, UTF-8, syntax and duplicate
/// keys checked; `null` members removed (null counts as absent).
pub fn json_value(headers: &HeaderMap, body: &[u8]) -> Result<Value, SimError> {
    require_content_type(headers, CONTENT_JSON)?;
    if !headers.contains_key(header::CONTENT_LENGTH) {
        return Err(SimError::invalid("Content-Length", "required"));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(SimError::invalid("body", "encoding"));
    }
    let mut value = parse_strict(body)?;
    strip_nulls(&mut value);
    Ok(value)
}

/// Parses JSON text refusing duplicate keys at any depth.
pub fn parse_strict(body: &[u8]) -> Result<Value, SimError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match serde_path_to_error::deserialize::<_, Strict>(&mut de) {
        Ok(Strict(v)) => v,
        Err(e) => {
            let message = strip_position(&e.inner().to_string());
            let path = path_string(e.path());
            if let Some(key) = between(&message, "duplicate key `", "`") {
                return Err(SimError::invalid(join(&path, key), "duplicate-key"));
            }
            return Err(SimError::invalid(
                if path.is_empty() { "body".into() } else { path },
                "syntax",
            ));
        }
    };
    // Trailing characters after the value.
    de.end().map_err(|_| SimError::invalid("body", "syntax"))?;
    Ok(value)
}

/// A typed value from a checked JSON value; errors name the field by its path.
pub fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = path_string(e.path());
        vec![field_error(&path, &e.inner().to_string())]
    })
}

/// Maps a serde message to the contract's reasons.
fn field_error(path: &str, message: &str) -> FieldError {
    let message = strip_position(message);
    let at = |p: &str| if p.is_empty() { "body".to_owned() } else { p.to_owned() };
    if let Some(name) = between(&message, "missing field `", "`") {
        return FieldError::new(join(path, name), "required");
    }
    if let Some(name) = between(&message, "unknown field `", "`") {
        return FieldError::new(join(path, name), "unknown-field");
    }
    if message.starts_with("unknown variant") {
        return FieldError::new(at(path), "code");
    }
    if message.starts_with("invalid value: integer") {
        return FieldError::new(at(path), "range");
    }
    if message.starts_with("invalid type") || message.starts_with("invalid length") {
        return FieldError::new(at(path), "type");
    }
    FieldError::new(at(path), "format")
}

/// Query parameters of a GET as a JSON object of strings, so the same typed parsing (and
/// its `unknown-field`) applies. A repeated parameter is refused.
pub fn query_value(raw: Option<&str>) -> Result<Value, SimError> {
    let mut map = Map::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k).ok_or_else(|| SimError::invalid("query", "encoding"))?;
        let value = decode(v).ok_or_else(|| SimError::invalid(key.clone(), "encoding"))?;
        if map.insert(key.clone(), Value::String(value)).is_some() {
            return Err(SimError::invalid(key, "duplicate-key"));
        }
    }
    Ok(Value::Object(map))
}

fn decode(s: &str) -> Option<String> {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The PDF body checks of sections 4 and 7 that need no state.
pub fn pdf_checks(headers: &HeaderMap, body: &[u8], hash_header: &str) -> Result<String, SimError> {
    if body.len() > hmr_protocol::checks::MAX_PDF_BYTES {
        return Err(SimError::TooLarge(format!(
            "PDF of {} bytes is over 10 MiB",
            body.len()
        )));
    }
    require_content_type(headers, CONTENT_PDF)?;
    let Some(claimed) = header(headers, hash_header) else {
        return Err(SimError::invalid(hash_header, "required"));
    };
    let actual = sha256_hex(body);
    if !claimed.trim().eq_ignore_ascii_case(&actual) {
        return Err(SimError::invalid(hash_header, "mismatch"));
    }
    if !body.starts_with(b"%PDF-") {
        return Err(SimError::invalid("body", "format"));
    }
    Ok(actual)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// serde_json appends ` at line L column C` to its messages.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// `path` + `.name`, unless the path already ends at that key (serde_path_to_error records
/// the key of an unknown field for some deserializers and not for others).
fn join(path: &str, name: &str) -> String {
    if path == name || path.ends_with(&format!(".{name}")) {
        path.to_owned()
    } else if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// `items[2].itemCode` style, the form validate.rs uses.
fn path_string(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// A JSON value that refuses duplicate object keys (serde_json keeps the last one).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmr_protocol::{LabReport, Revoke};

    #[test]
    fn duplicate_keys_are_found_at_depth() {
        let err = parse_strict(br#"{"a":1,"b":{"c":1,"c":2}}"#).unwrap_err();
        assert_eq!(err.field_errors(), vec![FieldError::new("b.c", "duplicate-key")]);
        let err = parse_strict(br#"{"a":1,"a":1}"#).unwrap_err();
        assert_eq!(err.field_errors(), vec![FieldError::new("a", "duplicate-key")]);
        assert_eq!(parse_strict(b"{} x").unwrap_err().field_errors()[0].reason, "syntax");
        assert!(parse_strict(br#"{"x":[{"a":1},{"a":2}]}"#).is_ok());
    }

    #[test]
    fn serde_errors_become_fields() {
        let v = serde_json::json!({"version": 1, "reason": "r", "revokedAt": "t", "operatorNo": "o", "extra": 1});
        assert_eq!(
            typed::<Revoke>(v).unwrap_err(),
            vec![FieldError::new("extra", "unknown-field")]
        );
        let v = serde_json::json!({"version": "1", "reason": "r", "revokedAt": "t", "operatorNo": "o"});
        assert_eq!(
            typed::<Revoke>(v).unwrap_err(),
            vec![FieldError::new("version", "type")]
        );
        let v = serde_json::json!({"version": -1, "reason": "r", "revokedAt": "t", "operatorNo": "o"});
        assert_eq!(
            typed::<Revoke>(v).unwrap_err(),
            vec![FieldError::new("version", "range")]
        );
        let v = serde_json::json!({"version": 1, "revokedAt": "t", "operatorNo": "o"});
        assert_eq!(
            typed::<Revoke>(v).unwrap_err(),
            vec![FieldError::new("reason", "required")]
        );
        let v = serde_json::json!({"reportNo": "L", "version": 1, "patientId": "P", "idType": "01", "idNo": "x",
            "name": "n", "reportedAt": "t", "auditorNo": "a", "items": [{"itemCode": "c", "itemName": "n", "resultValue": "1", "bogus": 1}]});
        assert_eq!(
            typed::<LabReport>(v).unwrap_err(),
            vec![FieldError::new("items[0].bogus", "unknown-field")]
        );
    }

    #[test]
    fn nulls_are_absent_and_queries_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json; charset=utf-8".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
        let v = json_value(&headers, br#"{"a":null,"b":[{"c":null}]}"#).unwrap();
        assert_eq!(v, serde_json::json!({"b":[{}]}));
        let q = query_value(Some("idNo=11%2001X&type=all&x=")).unwrap();
        assert_eq!(q, serde_json::json!({"idNo": "11 01X", "type": "all", "x": ""}));
        assert_eq!(
            query_value(Some("a=1&a=2")).unwrap_err().field_errors()[0].reason,
            "duplicate-key"
        );
    }
}
