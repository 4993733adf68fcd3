//! A read-only, zero-copy JSON document: what the adapters and the mapping engine read raw
//! events from.
//!
//! Parsing a vendor event into `serde_json::Value` allocates a `String` per key and per
//! string value and builds a B-tree per object, then the adapter copies the few values it
//! needs anyway. [`Doc`] borrows strings straight from the raw bytes (unless they contain
//! escapes) and keeps objects as small vectors in source order, which roughly halves the cost
//! of reading an event; only the values an adapter picks are turned into `Value`s. Lookups
//! scan linearly, which for vendor objects (tens of keys) is as fast as a tree. With duplicate
//! keys the last one wins, as in `serde_json::Value`.
//!
//! A source whose reader declares what it reads (a [`Select`]: the Coupa adapter, `mapped`
//! sources, mapping overrides) is parsed with [`Doc::parse_selected`]: the members it never
//! reads are still parsed in full, so the accepted grammar and every error are exactly those
//! of [`Doc::parse`], but nothing is built for them. Coupa invoices carry kilobytes of user,
//! address, account and item records the adapter does not look at; not building them halves
//! the cost of reading one.
//!
//! Both are read first by a JSON reader of our own (`reader`), which scans strings eight bytes
//! at a time and steps over unread members without decoding them; it hands any document it
//! cannot decide exactly as `serde_json` would (every invalid one among them) to `serde_json`,
//! so values and errors stay `serde_json`'s.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

mod reader;

/// One parsed JSON value borrowing from the raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Doc<'a>>),
    Object(Vec<(Cow<'a, str>, Doc<'a>)>),
}

/// The `null` returned for missing lookups that need a reference.
pub static NULL: Doc<'static> = Doc::Null;

impl<'a> Doc<'a> {
    /// Parses JSON bytes (the same grammar, limits and errors as `serde_json::from_slice`).
    pub fn parse(bytes: &'a [u8]) -> Result<Doc<'a>, serde_json::Error> {
        Self::parse_selected(bytes, &Select::All)
    }

    /// Parses JSON bytes like [`Doc::parse`] (same grammar, limits and errors) but builds only
    /// the members `select` names; the others are absent from the result.
    pub fn parse_selected(bytes: &'a [u8], select: &Select) -> Result<Doc<'a>, serde_json::Error> {
        // The fast reader takes the documents it can decide exactly as `serde_json` would and
        // hands every other one (all invalid ones among them) to `serde_json`.
        match std::str::from_utf8(bytes).ok().and_then(|text| reader::read(text, select)) {
            Some(doc) => Ok(doc),
            None => serde_read(bytes, select),
        }
    }

    /// The member `key` of an object (the last one, with duplicates).
    pub fn get(&self, key: &str) -> Option<&Doc<'a>> {
        match self {
            Doc::Object(members) => members.iter().rev().find(|(k, _)| same_key(k, key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// One path step: an object member, or an array element for a numeric segment.
    pub fn step(&self, seg: &str) -> Option<&Doc<'a>> {
        match self {
            Doc::Object(_) => self.get(seg),
            Doc::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
    }

    /// RFC 6901 JSON Pointer lookup.
    pub fn pointer(&self, pointer: &str) -> Option<&Doc<'a>> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        rest.split('/').try_fold(self, |node, token| {
            let token = token.replace("~1", "/").replace("~0", "~");
            node.step(&token)
        })
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Doc::Null)
    }
    pub fn is_object(&self) -> bool {
        matches!(self, Doc::Object(_))
    }
    pub fn is_string(&self) -> bool {
        matches!(self, Doc::String(_))
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Doc::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Doc::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Doc<'a>]> {
        match self {
            Doc::Array(items) => Some(items),
            _ => None,
        }
    }
    pub fn as_object(&self) -> Option<&[(Cow<'a, str>, Doc<'a>)]> {
        match self {
            Doc::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The text of a scalar: strings as they are, numbers in JSON notation, booleans as
    /// `true`/`false`; `None` for null, arrays and objects.
    pub fn text(&self) -> Option<String> {
        match self {
            Doc::String(s) => Some(s.to_string()),
            Doc::Number(n) => Some(n.to_string()),
            Doc::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// [`Doc::text`], `None` when empty or only whitespace.
    pub fn non_empty_text(&self) -> Option<String> {
        match self {
            Doc::String(s) if s.trim().is_empty() => None,
            other => other.text(),
        }
    }

    /// An owned `serde_json::Value` copy.
    pub fn to_value(&self) -> Value {
        match self {
            Doc::Null => Value::Null,
            Doc::Bool(b) => Value::Bool(*b),
            Doc::Number(n) => Value::Number(n.clone()),
            Doc::String(s) => Value::String(s.to_string()),
            Doc::Array(items) => Value::Array(items.iter().map(Doc::to_value).collect()),
            Doc::Object(members) => {
                let mut m = Map::new();
                for (k, v) in members {
                    m.insert(k.to_string(), v.to_value());
                }
                Value::Object(m)
            }
        }
    }

    /// `a string`, `an object` ... for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Doc::Null => "null",
            Doc::Bool(_) => "a boolean",
            Doc::Number(_) => "a number",
            Doc::String(_) => "a string",
            Doc::Array(_) => "an array",
            Doc::Object(_) => "an object",
        }
    }
}

/// [`Doc::parse_selected`] by `serde_json` alone: what the reader hands documents to (public
/// for the benchmark that compares the two).
pub fn serde_read<'a>(bytes: &'a [u8], select: &Select) -> Result<Doc<'a>, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        // Checking the UTF-8 of the whole input at once is much cheaper than checking it
        // string by string, which is all that parsing `&str` instead of bytes skips.
        Ok(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let doc = DocSeed { select }.deserialize(&mut de)?;
            de.end()?;
            Ok(doc)
        }
        // Not UTF-8, so not JSON: parsing the bytes finds the same first error (and names
        // the same position) as `serde_json::from_slice` does.
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let doc = DocSeed { select }.deserialize(&mut de)?;
            de.end()?;
            Ok(doc)
        }
    }
}

impl fmt::Display for Doc<'_> {
    /// Compact JSON, for error details.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_value())
    }
}

impl<'de> Deserialize<'de> for Doc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DocSeed { select: &Select::All }.deserialize(d)
    }
}

/// Which parts of a document a reader looks at: everything, or some members of objects, each
/// with what is read below it. Arrays are stepped through: a selection applies to every
/// element, as the adapters read every line of an invoice the same way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Select {
    #[default]
    All,
    Only(Members),
}

impl Select {
    /// Nothing yet; [`Select::add`] paths to it.
    pub fn none() -> Self {
        Select::Only(Members::default())
    }

    /// The members read along dotted `paths` (`supplier.primary-address.country.code`); the
    /// value at the end of a path is read whole.
    pub fn paths<'p>(paths: impl IntoIterator<Item = &'p str>) -> Self {
        let mut select = Select::none();
        for path in paths {
            select.add(path.split('.'), &Select::All);
        }
        select
    }

    /// Adds a path given as its segments, with what is read of the value at its end (`All`
    /// for the whole value). A numeric segment (an array index, or an object key that looks
    /// like one) keeps the whole value it steps into: indexing is rare and not worth pruning
    /// around.
    pub fn add<S: AsRef<str>>(&mut self, mut segments: impl Iterator<Item = S>, end: &Select) {
        let Select::Only(members) = self else { return };
        let Some(seg) = segments.next() else {
            self.merge(end);
            return;
        };
        let seg = seg.as_ref();
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            *self = Select::All;
            return;
        }
        members.entry(seg).add(segments, end);
    }

    /// Everything `other` reads, added to this selection.
    pub fn merge(&mut self, other: &Select) {
        match (&mut *self, other) {
            (Select::All, _) => {}
            (_, Select::All) => *self = Select::All,
            (Select::Only(mine), Select::Only(theirs)) => {
                for (key, sub) in &theirs.entries {
                    mine.entry(key).merge(sub);
                }
            }
        }
    }

    /// What is read below member `key`; `None` when it is not read at all.
    #[inline]
    fn member(&self, key: &str) -> Option<&Select> {
        match self {
            Select::All => Some(self),
            Select::Only(members) => members.get(key),
        }
    }
}

/// The members a selection reads of an object, with a small hash index: a reader looks up every
/// key of every object it reads, most of them not selected, and a linear search through the
/// selected keys was a tenth of reading a Coupa invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    entries: Vec<(String, Select)>,
    /// Open addressing by [`Members::slot`]: 1 + the entry's position, 0 for an empty slot.
    /// At most [`Members::INDEXED`] entries are indexed (the table stays at most half full);
    /// a larger selection is searched linearly.
    index: [u8; Members::SLOTS],
}

impl Default for Members {
    fn default() -> Self {
        Self { entries: Vec::new(), index: [0; Members::SLOTS] }
    }
}

impl FromIterator<(String, Select)> for Members {
    fn from_iter<I: IntoIterator<Item = (String, Select)>>(iter: I) -> Self {
        let mut members = Members::default();
        for (key, select) in iter {
            members.entry(&key).merge(&select);
        }
        members
    }
}

impl Members {
    const SLOTS: usize = 64;
    const INDEXED: usize = Self::SLOTS / 2;

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key's home slot, from its length and its first and last bytes (what tells vendor
    /// keys apart cheaply; equal ones collide and are probed past).
    #[inline(always)]
    fn slot(key: &[u8]) -> usize {
        let (first, last) = (key.first().copied().unwrap_or(0), key.last().copied().unwrap_or(0));
        let h = (key.len() as u32).wrapping_mul(0x9E37_79B1)
            ^ u32::from(first).wrapping_mul(0x85EB_CA6B)
            ^ u32::from(last).wrapping_mul(0xC2B2_AE35);
        (h >> 26) as usize
    }

    #[inline]
    fn get(&self, key: &str) -> Option<&Select> {
        if self.entries.len() > Self::INDEXED {
            return self.entries.iter().find(|(k, _)| same_key(k, key)).map(|(_, s)| s);
        }
        let mut slot = Self::slot(key.as_bytes());
        loop {
            let (k, select) = self.entries.get(usize::from(self.index[slot]).checked_sub(1)?)?;
            if same_key(k, key) {
                return Some(select);
            }
            slot = (slot + 1) % Self::SLOTS;
        }
    }

    /// The selection below `key`, added as reading nothing yet if it is new.
    fn entry(&mut self, key: &str) -> &mut Select {
        let i = match self.entries.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.entries.push((key.to_string(), Select::none()));
                let i = self.entries.len() - 1;
                if self.entries.len() <= Self::INDEXED {
                    let mut slot = Self::slot(key.as_bytes());
                    while self.index[slot] != 0 {
                        slot = (slot + 1) % Self::SLOTS;
                    }
                    // At most INDEXED (32) entries, so the position fits.
                    self.index[slot] = u8::try_from(i + 1).unwrap_or(u8::MAX);
                }
                i
            }
        };
        &mut self.entries[i].1
    }
}

/// Key equality for the linear searches of objects and selections, without a `memcmp` call:
/// keys are a few bytes long and compared many times per event (on a Coupa invoice those calls
/// were 6 % of normalizing it). Keys of up to sixteen bytes are compared as two overlapping
/// words; vendor keys of one length mostly differ in their first or last bytes anyway.
#[inline(always)]
fn same_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap_or_default());
    match n {
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => a == b,
    }
}

/// Parses a value, building what `select` names.
struct DocSeed<'s> {
    select: &'s Select,
}

impl<'de> DeserializeSeed<'de> for DocSeed<'_> {
    type Value = Doc<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Doc<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_> {
    type Value = Doc<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Doc<'de>, E> {
        Ok(Doc::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Doc<'de>, E> {
        Ok(Doc::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Doc<'de>, E> {
        Ok(Doc::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Doc<'de>, E> {
        Ok(Doc::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Doc<'de>, E> {
        Ok(Doc::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Doc<'de>, E> {
        Number::from_f64(v).map(Doc::Number).ok_or_else(|| E::custom("not a finite number"))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Doc<'de>, E> {
        Ok(Doc::String(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Doc<'de>, E> {
        Ok(Doc::String(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Doc<'de>, E> {
        Ok(Doc::String(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc<'de>, A::Error> {
        // serde_json gives no size hints; a small start saves the first reallocations.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(64));
        while let Some(item) = seq.next_element_seed(DocSeed { select: self.select })? {
            items.push(item);
        }
        Ok(Doc::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16).min(64));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match self.select.member(&key.0) {
                Some(select) => {
                    let value = map.next_value_seed(DocSeed { select })?;
                    members.push((key.0, value));
                }
                None => map.next_value_seed(Skip)?,
            }
        }
        Ok(Doc::Object(members))
    }
}

/// Parses a value the reader does not look at, fully (so it is accepted or refused exactly as
/// when it is built: strings are decoded, escapes and numbers checked), building nothing.
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // As in `Doc`: the one number a built value would refuse.
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("not a finite number"))
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_find_every_selected_key_and_no_other() {
        // Keys that share length and first and last bytes collide in the index; past 32 keys
        // the members are searched linearly.
        let keys: Vec<String> = (0..40)
            .map(|i| match i % 4 {
                0 => format!("k{i}-x"),
                1 => format!("invoice-{i:02}-number"),
                2 => "ab".repeat(i % 9 + 1),
                _ => format!("{}", char::from(b'a' + (i % 26) as u8)),
            })
            .collect();
        for n in [0, 1, 5, 31, 32, 33, 40] {
            let members: Members = keys[..n].iter().map(|k| (k.clone(), Select::All)).collect();
            let distinct: std::collections::BTreeSet<&String> = keys[..n].iter().collect();
            assert_eq!(members.len(), distinct.len());
            let select = Select::Only(members);
            for k in &keys[..n] {
                assert_eq!(select.member(k), Some(&Select::All), "{k} among {n}");
            }
            for k in keys[n..].iter().filter(|k| !distinct.contains(k)).map(String::as_str).chain(["", "k0-y", "zz"]) {
                assert_eq!(select.member(k), None, "{k} among {n}");
            }
        }
    }

    #[test]
    fn same_values_as_serde_json() {
        let raw = br#"{"a": [1, -2, 3.5, true, null, "x\"y"], "b": {"c": "d", "c": "e"}, "a/b": {"~": 1}, "big": 18446744073709551615}"#;
        let doc = Doc::parse(raw).expect("parses");
        let value: Value = serde_json::from_slice(raw).expect("parses");
        assert_eq!(doc.to_value(), value);
        assert_eq!(doc.get("b").and_then(|b| b.get("c")).and_then(Doc::as_str), Some("e"), "last duplicate wins");
        assert_eq!(doc.pointer("/a~1b/~0").map(Doc::to_value), Some(json!(1)));
        assert_eq!(doc.step("a").and_then(|a| a.step("5")).and_then(Doc::as_str), Some("x\"y"));
        assert!(
            matches!(doc.get("b").and_then(|b| b.get("c")), Some(Doc::String(Cow::Borrowed(_)))),
            "no copy without escapes"
        );
        assert!(Doc::parse(b"{").is_err());
        assert!(Doc::parse(b"[1,]").is_err());
    }

    #[test]
    fn errors_are_serde_json_errors() {
        let cases: &[&[u8]] = &[
            b"{",
            b"[1,]",
            b"{\"a\": \"\xff\"}",
            b"{\"a\": 1} \xff",
            b"\xff{\"a\": 1}",
            b"{\"a\": \"\\ud800\"}",
            b"{\"a\": \"tab\there\"}",
            b"[1e999]",
        ];
        for raw in cases {
            let ours = Doc::parse(raw).expect_err("invalid").to_string();
            let theirs = serde_json::from_slice::<Value>(raw).expect_err("invalid").to_string();
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(raw));
        }
    }
}
