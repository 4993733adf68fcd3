//! JSON writing for the envelope's hot path: the same bytes `serde_json::to_vec` writes for a
//! `serde_json::Value`, faster.
//!
//! Every event the normalizer and the trigger-worker produce is written once, and most of that
//! is copying strings. serde_json looks each byte up in its escape table on the way; here the
//! string is scanned eight bytes at a time for the three things that need escaping (control
//! characters, `"` and `\`), and clean runs are copied whole. Escapes, numbers and map order
//! are serde_json's own (numbers are written by serde_json itself), and the tests compare the
//! two writers on arbitrary values, so the output is byte-for-byte the same.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde_json::Value;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `w` is a control character, `"` or `\`: a byte that must
/// be escaped when writing a JSON string, and one that ends a clean run when reading one.
#[inline]
pub fn needs_escape(w: u64) -> bool {
    // Classic "has a byte below n" / "has a zero byte" tests: exact for "any", which is all
    // that is asked (the exact byte is found by the byte loop).
    let below_space = w.wrapping_sub(ONES * 0x20) & !w;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGHS != 0
}

/// Appends `s` as a JSON string literal, escaped as serde_json escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Clean up to `start`: copied when the next escape (or the end) comes.
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time. The last word of a string of eight bytes or more overlaps the
        // one before it rather than being assembled from single bytes (a byte-wise copy then a
        // word load stalls the CPU longer than the check takes).
        let at = if i + 8 <= bytes.len() {
            i
        } else if bytes.len() >= 8 {
            bytes.len() - 8
        } else {
            escape_bytes(out, bytes, &mut start, i, bytes.len());
            break;
        };
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        let end = at + 8;
        if needs_escape(u64::from_le_bytes(word)) {
            escape_bytes(out, bytes, &mut start, i, end);
        }
        i = end;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Escapes what needs it among `bytes[from..to]`, copying the clean run before each escape.
fn escape_bytes(out: &mut Vec<u8>, bytes: &[u8], start: &mut usize, from: usize, to: usize) {
    for (i, &b) in bytes.iter().enumerate().take(to).skip(from) {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[*start..i]);
        *start = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            }
        }
    }
}

/// Appends `v` as compact JSON, exactly as `serde_json::to_writer` would.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_serde(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Appends a timestamp as serde_json writes chrono's `DateTime<Utc>` (RFC 3339, `Z`, fraction
/// digits in groups of three as needed). Whole seconds in years 0–9999, what vendors send, are
/// written directly; the rest goes through chrono's formatter, which on every event cost as
/// much as writing the whole envelope's attributes.
pub fn write_time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    let (date, time) = (t.date_naive(), t.time());
    let year = date.year();
    // A leap second is a nanosecond value of a second or more.
    if !(0..=9999).contains(&year) || time.nanosecond() != 0 {
        write_serde(out, t);
        return;
    }
    let mut buf = *b"\"0000-00-00T00:00:00Z\"";
    let mut put = |at: usize, n: u32, digits: usize| {
        let mut n = n;
        for i in (at..at + digits).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(1, year.unsigned_abs(), 4);
    put(6, date.month(), 2);
    put(9, date.day(), 2);
    put(12, time.hour(), 2);
    put(15, time.minute(), 2);
    put(18, time.second(), 2);
    out.extend_from_slice(&buf);
}

/// Appends anything serde_json can write (numbers, timestamps: rare enough to take the
/// general path, and then certainly written the same way).
pub fn write_serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let mark = out.len();
    // Writing numbers, strings and timestamps into a Vec cannot fail; if a type's Serialize
    // could, nothing half-written is left behind.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.truncate(mark);
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Map, Number};

    use super::*;

    fn ours(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(&mut out, v);
        out
    }

    proptest! {
        #[test]
        fn timestamps_as_serde_json_writes_them(
            secs in -70_000_000_000i64..260_000_000_000,
            nanos in prop_oneof![Just(0u32), 0u32..2_000_000_000, Just(1_000_000_000u32)],
        ) {
            if let Some(t) = DateTime::from_timestamp(secs, nanos) {
                let mut out = Vec::new();
                write_time(&mut out, &t);
                prop_assert_eq!(String::from_utf8(out).expect("utf-8"), serde_json::to_string(&t).expect("json"));
            }
        }
    }

    #[test]
    fn escapes_as_serde_json_does() {
        let mut every_byte = String::new();
        for c in 0u8..=0x7f {
            every_byte.push(char::from(c));
        }
        for s in [
            "",
            "plain",
            "exactly8",
            "a\"b\\c",
            "line\nbreak\ttab\r\u{8}\u{c}\u{1}\u{1f}\u{7f}",
            "ünïcödé — ✓ 𝄞",
            "\"\"\"\"\"\"\"\"\"",
            "0123456789abcdef0123456789abcdef\"",
            every_byte.as_str(),
        ] {
            let v = Value::String(s.to_string());
            assert_eq!(String::from_utf8(ours(&v)).expect("utf-8"), serde_json::to_string(&v).expect("json"), "{s:?}");
        }
        let v = json!({"b": [1, -2, 3.5, 1e300, 0.1, u64::MAX, i64::MIN, null, true, false], "a": {"": "", "k\"ey": {}}, "c": []});
        assert_eq!(ours(&v), serde_json::to_vec(&v).expect("json"));
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
            any::<String>().prop_map(Value::String),
            "[a-z\"\\\\\n\t\u{0}-\u{1f} é]{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
            ]
        })
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(v in arb_value()) {
            prop_assert_eq!(ours(&v), serde_json::to_vec(&v).expect("json"));
        }
    }
}
