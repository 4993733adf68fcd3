//! The fast path of [`Doc::parse_selected`](super::Doc::parse_selected): a JSON reader written
//! for the shape of vendor events, with `serde_json` behind it for everything else.
//!
//! Reading a raw event was half of the normalizer's time on Coupa invoices, and most of that
//! was `serde_json`'s visitor machinery stepping through members nobody reads. This reader
//! scans strings eight bytes at a time, skips unread members without decoding them and builds
//! only what the selection names.
//!
//! It never decides anything `serde_json` would decide differently: it answers `None`
//! ("ask `serde_json`") for every input it refuses and for everything it does not handle
//! exactly as `serde_json` does — surrogate escapes, numbers that are not plain integers where
//! the value is built, floats near the edge of the `f64` range, nesting deeper than
//! [`MAX_DEPTH`]. So the accepted grammar, every value and every error message stay
//! `serde_json`'s. `tests/normalizer_proptest.rs` compares the two paths on arbitrary, mutated
//! and vendor documents; the tests here check that the reader does answer for the usual ones.

use std::borrow::Cow;

use serde_json::Number;

use super::{Doc, Select};

/// Nesting this reader follows before leaving the document to `serde_json` (whose own limit,
/// 128, is an error there; staying well under it keeps that error `serde_json`'s).
const MAX_DEPTH: u32 = 100;

/// Reads `text` as one JSON value building what `select` names, or `None` to say that
/// `serde_json` must parse it (because it is invalid, or unusual; see the module doc).
pub(super) fn read<'a>(text: &'a str, select: &Select) -> Option<Doc<'a>> {
    let mut r = Reader { text, bytes: text.as_bytes(), pos: 0 };
    let doc = r.value(select, MAX_DEPTH)?;
    r.whitespace();
    (r.pos == r.bytes.len()).then_some(doc)
}

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn whitespace(&mut self) {
        // A byte loop, not a word-wise scan: runs here are short (one space, or a newline and
        // indentation), and a loop's exit the CPU predicts beats a mask whose computation
        // every following load has to wait for (measured: the word-wise scan read Coupa
        // invoices 15 % slower).
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Skips whitespace and takes `b` if it comes next.
    #[inline]
    fn eat(&mut self, b: u8) -> bool {
        self.whitespace();
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// One value. Scalars are read inline, so a member's string goes straight into its
    /// object rather than through a returned `Option<Doc>` (copying those was a tenth of the
    /// reading time); containers have their own functions.
    #[inline(always)]
    fn value(&mut self, select: &Select, depth: u32) -> Option<Doc<'a>> {
        self.whitespace();
        match self.peek()? {
            b'{' => self.object(select, depth),
            b'[' => self.array(select, depth),
            b'"' => {
                self.pos += 1;
                self.string().map(Doc::String)
            }
            b't' => self.literal(b"true").map(|()| Doc::Bool(true)),
            b'f' => self.literal(b"false").map(|()| Doc::Bool(false)),
            b'n' => self.literal(b"null").map(|()| Doc::Null),
            _ => {
                let (text, whole) = self.number()?;
                // A whole number that fits `u64` (or `i64` when negative) is an integer `Number`;
                // any other number (and `-0`, a float there) is `serde_json`'s own parse of the
                // number's text alone.
                whole
                    .then(|| integer(text))
                    .flatten()
                    .or_else(|| serde_json::from_str::<Number>(text).ok())
                    .map(Doc::Number)
            }
        }
    }

    #[inline(never)]
    fn object(&mut self, select: &Select, depth: u32) -> Option<Doc<'a>> {
        let depth = depth.checked_sub(1)?;
        self.pos += 1;
        // As many members as are read, so a selected object never grows its vector.
        let mut members = Vec::with_capacity(match select {
            Select::All => 16,
            Select::Only(read) => read.len(),
        });
        if self.eat(b'}') {
            return Some(Doc::Object(members));
        }
        loop {
            if !self.eat(b'"') {
                return None;
            }
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            match select.member(&key) {
                Some(select) => {
                    let value = self.value(select, depth)?;
                    members.push((key, value));
                }
                None => self.skip_value(depth)?,
            }
            if !self.eat(b',') {
                return self.eat(b'}').then_some(Doc::Object(members));
            }
        }
    }

    #[inline(never)]
    fn array(&mut self, select: &Select, depth: u32) -> Option<Doc<'a>> {
        let depth = depth.checked_sub(1)?;
        self.pos += 1;
        let mut items = Vec::with_capacity(4);
        if self.eat(b']') {
            return Some(Doc::Array(items));
        }
        loop {
            items.push(self.value(select, depth)?);
            if !self.eat(b',') {
                return self.eat(b']').then_some(Doc::Array(items));
            }
        }
    }

    /// [`Reader::skip`] with strings and `null` taken inline: most unread values are one of
    /// those, and stepping over them without a call took 2.5 % fewer instructions per Coupa
    /// invoice (reading it faster in three of four alternating runs).
    #[inline(always)]
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        self.whitespace();
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                self.skip_string()
            }
            b'n' => self.literal(b"null"),
            _ => self.skip(depth),
        }
    }

    /// Steps over a value nobody reads, checking it as strictly as building it would.
    fn skip(&mut self, depth: u32) -> Option<()> {
        self.whitespace();
        match self.peek()? {
            b'{' => {
                let depth = depth.checked_sub(1)?;
                self.pos += 1;
                if self.eat(b'}') {
                    return Some(());
                }
                loop {
                    if !self.eat(b'"') {
                        return None;
                    }
                    self.skip_string()?;
                    if !self.eat(b':') {
                        return None;
                    }
                    self.skip_value(depth)?;
                    if !self.eat(b',') {
                        return self.eat(b'}').then_some(());
                    }
                }
            }
            b'[' => {
                let depth = depth.checked_sub(1)?;
                self.pos += 1;
                if self.eat(b']') {
                    return Some(());
                }
                loop {
                    self.skip_value(depth)?;
                    if !self.eat(b',') {
                        return self.eat(b']').then_some(());
                    }
                }
            }
            b'"' => {
                self.pos += 1;
                self.skip_string()
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => {
                let (text, whole) = self.number()?;
                // A number `serde_json` might find out of range (an error there) goes to it; any
                // other well-formed number is accepted there too, whole ones of up to 300 digits
                // without parsing them.
                ((whole && text.len() <= 300) || text.parse::<f64>().is_ok_and(|f| f.abs() < 1e300)).then_some(())
            }
        }
    }

    /// The text of a number in JSON's grammar, and whether it is written as a whole number (no
    /// fraction or exponent; `-0` excepted: `serde_json` reads that as a float).
    fn number(&mut self) -> Option<(&'a str, bool)> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut plain = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
            plain = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
            plain = false;
        }
        let text = &self.text[start..self.pos];
        Some((text, plain && text != "-0"))
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    /// Moves to the next `"`, `\` or control character of a string (or the end of the input).
    #[inline]
    fn skip_plain(&mut self) {
        while let Some(word) = self.bytes.get(self.pos..self.pos + 8) {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            if agentbridge_contracts::json::needs_escape(word) {
                break;
            }
            self.pos += 8;
        }
        while self.peek().is_some_and(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.pos += 1;
        }
    }

    /// The rest of a string whose opening quote was taken: borrowed unless it has escapes.
    #[inline(always)]
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.pos;
        self.skip_plain();
        if self.peek()? == b'"' {
            self.pos += 1;
            return Some(Cow::Borrowed(&self.text[start..self.pos - 1]));
        }
        self.escaped_string(start).map(Cow::Owned)
    }

    /// The rest of a string from `start` with escapes: its decoded text.
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Option<String> {
        let mut owned = String::with_capacity(self.pos - start + 16);
        let mut run = start;
        loop {
            owned.push_str(&self.text[run..self.pos]);
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(owned);
                }
                b'\\' => {
                    self.pos += 1;
                    owned.push(self.escape()?);
                }
                _ => return None,
            }
            run = self.pos;
            self.skip_plain();
        }
    }

    #[inline(always)]
    fn skip_string(&mut self) -> Option<()> {
        loop {
            self.skip_plain();
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => {
                    self.pos += 1;
                    self.escape()?;
                }
                _ => return None,
            }
        }
    }

    /// The character of the escape after a `\`; `None` for invalid escapes and for
    /// surrogates (pairs and lone ones alike are left to `serde_json`).
    fn escape(&mut self) -> Option<char> {
        let c = match self.peek()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hex = self.text.get(self.pos + 1..self.pos + 5)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                self.pos += 4;
                // `from_u32` refuses exactly the surrogates.
                char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
            }
            _ => return None,
        };
        self.pos += 1;
        Some(c)
    }
}

/// A plain integer's `Number`, as `serde_json` makes it.
fn integer(text: &str) -> Option<Number> {
    if text.starts_with('-') {
        text.parse::<i64>().ok().map(Number::from)
    } else {
        text.parse::<u64>().ok().map(Number::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::serde_read;

    /// Whenever the reader answers, `serde_json` accepts the input and builds the same `Doc`.
    fn agrees(text: &str, select: &Select) {
        if let Some(doc) = read(text, select) {
            match serde_read(text.as_bytes(), select) {
                Ok(theirs) => assert_eq!(doc, theirs, "{text}"),
                Err(e) => panic!("read {text:?}, which serde_json refuses: {e}"),
            }
        }
    }

    fn selections() -> Vec<Select> {
        vec![Select::All, Select::none(), Select::paths(["a", "b.c", "items.id", "x.y.z"])]
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let cases = [
            r#"{"a": 1, "b": {"c": "d\n\"é\u00e9\u2028\b\f\r\t\/\\\u001f", "e": [1, 2.5, -3, 1e5]}, "z": null}"#,
            r#"[true, false, null, "", {}, [], -0, 0, -1, 18446744073709551615, -9223372036854775808]"#,
            r#"{"a": 18446744073709551616, "b": -9223372036854775809, "x": 123456789012345678901234}"#,
            r#" {"a" : [ 1 , { "b" : "c" } ] , "a" : "last" } "#,
            r#"{"items": [{"id": 1, "skip": {"deep": [[["x"]]]}}, {"id": "2"}]}"#,
            r#""just a string""#,
            "12",
            r#"{"a": 1.7976931348623157e308, "x": 1e-400, "y": -0.0}"#,
        ];
        for text in cases {
            for select in selections() {
                agrees(text, &select);
            }
        }
        // The common shapes are read here, not handed over.
        assert!(read(cases[0], &Select::All).is_some() && read(cases[4], &selections()[2]).is_some());
    }

    #[test]
    fn hands_over_what_it_does_not_decide() {
        for text in [
            "",
            " ",
            "{",
            "[1,]",
            r#"{"a": 1,}"#,
            r#"{"a" 1}"#,
            r#"{"a": "\ud800"}"#,
            r#"{"a": "\ud83d\ude00"}"#,
            r#"{"a": "\x"}"#,
            "{\"a\": \"tab\there\"}",
            "[01]",
            "[1.]",
            "[-]",
            "[1e]",
            "[1e999]",
            "tru",
            "nul",
            "{} x",
            &"[".repeat(101),
        ] {
            for select in selections() {
                assert!(read(text, &select).is_none(), "{text:?}");
            }
        }
    }

    /// Every published payload the tests carry, read whole and with the adapters'
    /// selections, then broken at every few bytes (a byte replaced, or the rest cut off).
    #[test]
    fn agrees_with_serde_json_on_vendor_payloads_and_their_mutations() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let mut selects = selections();
        selects.push(Select::paths(crate::adapters::coupa::READS.iter().copied()));
        let mut read_whole = 0;
        for entry in std::fs::read_dir(dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("fixture");
            for select in &selects {
                agrees(&text, select);
                read_whole += usize::from(read(&text, select).is_some());
            }
            let bytes = text.as_bytes();
            for i in (0..bytes.len()).step_by(3) {
                for with in [b'"', b'\\', b'}', b',', b'1', b'\n'] {
                    let mut broken = bytes.to_vec();
                    broken[i] = with;
                    if let Ok(t) = std::str::from_utf8(&broken) {
                        agrees(t, &selects[3]);
                    }
                }
                if let Some(t) = text.get(..i) {
                    agrees(t, &selects[i % 4]);
                }
            }
        }
        assert!(read_whole >= 20, "the fixtures are read here, not handed over ({read_whole})");
    }
}
