//! The hot bodies — `update`, `connect`, `disconnect` — read without building a JSON
//! tree: one pass of serde_json over the body borrows each field's raw text
//! ([`RawValue`]), and only the fields a call reads are decoded. A message is kept as
//! the text the publisher sent, with the whitespace between its tokens taken out: it is
//! never parsed into a tree and written out again.
//!
//! The answers are exactly those of the tree-based reading in `api` (`parse_object`
//! and the `parse_*` functions), which stays the reference: whatever this reading
//! cannot vouch for — JSON that does not parse, a body that is not an object, a number
//! out of range, nesting past serde_json's limit — is handed back as [`Fallback`], and
//! the caller reads the body the tree-based way, which names the problem as it always
//! did. Field errors (missing, wrong type, unknown key, bad name, too large) are made
//! here, in the same order and words. The property tests in `api` hold both readings
//! to the same answers.
//!
//! What differs, by design, is only the stored form of a message: the tree-based
//! reading wrote it out canonically (object keys sorted, duplicate keys dropped,
//! escapes and numbers rewritten); this one keeps it as sent, minus whitespace. Both
//! are compact JSON on one line, and both mean the same value to any JSON parser that
//! keeps the last of duplicate keys.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{MAX_BATCH, bad_batch_size, bad_request};
use crate::engine::Update;
use crate::error::{ApiError, ErrorCode};
use crate::names;

/// Deepest nesting of arrays and objects serde_json builds a tree of (its recursion
/// limit, counted from the body's own braces): a body past it is refused as bad JSON
/// by the tree-based reading, so this one hands it back.
const MAX_NESTING: usize = 127;

/// This reading cannot vouch for the body: read it the tree-based way, which answers
/// exactly as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fallback;

/// The updates of an update body and whether it was a batch, or the precise refusal.
pub(super) type ParsedUpdates = Result<(Vec<Update>, bool), ApiError>;

/// An update body: `{"track", "message"}` or `{"updates": […]}`.
pub(super) fn updates(bytes: &[u8], max_message_bytes: usize) -> Result<ParsedUpdates, Fallback> {
    let object = Object::parse(bytes, ["track", "message", "updates"], 1)?;
    let [track, message, batch] = object.values;
    let Some(batch) = batch else {
        return Ok(update(&object, track, message, max_message_bytes).map(|u| (vec![u], false)));
    };
    // Besides `updates`, nothing: `track` and `message` are unknown here too.
    let present = [(track.is_some(), "track"), (message.is_some(), "message")];
    let extra = present.iter().filter(|(p, _)| *p).map(|(_, name)| *name);
    if let Some(key) = first_key(object.unknown.as_deref(), extra) {
        return Ok(Err(unknown_field(key)));
    }
    if !batch.raw.get().starts_with('[') {
        return Ok(Err(bad_request(
            "\"updates\" must be an array of {\"track\", \"message\"}",
        )));
    }
    let items: Vec<&RawValue> = serde_json::from_str(batch.raw.get()).map_err(|_| Fallback)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Ok(Err(bad_batch_size(items.len())));
    }
    let mut updates = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        if !item.get().starts_with('{') {
            return Ok(Err(bad_request(format!("updates[{i}] must be an object"))));
        }
        // Nesting and numbers were checked with the whole array.
        let item = Object::parse(item.get().as_bytes(), ["track", "message"], usize::MAX)?;
        let [track, message] = item.values;
        match update(&item, track, message, max_message_bytes) {
            Ok(update) => updates.push(update),
            Err(e) => {
                return Ok(Err(ApiError {
                    message: format!("updates[{i}]: {}", e.message),
                    ..e
                }));
            }
        }
    }
    Ok(Ok((updates, true)))
}

/// One update from its object's fields (`unknown` besides `track` and `message`).
fn update<const N: usize>(
    object: &Object<'_, N>,
    track: Option<Field<'_>>,
    message: Option<Field<'_>>,
    max_message_bytes: usize,
) -> Result<Update, ApiError> {
    let track = track_field(track)?;
    let message = message.ok_or_else(|| bad_request("\"message\" is missing (any JSON value)"))?;
    only_known(object)?;
    let json = compact(message.raw.get(), message.spaced);
    if json.len() > max_message_bytes {
        return Err(ApiError::too_large(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {} bytes as JSON; the limit is {max_message_bytes}",
                json.len()
            ),
        ));
    }
    Ok(Update {
        track: track.into(),
        json: json.into(),
    })
}

/// A connect body: `{"uid", "track"}`.
pub(super) fn connect(bytes: &[u8]) -> Result<Result<(String, String), ApiError>, Fallback> {
    let object = Object::parse(bytes, ["uid", "track"], 1)?;
    let [uid, track] = object.values;
    let fields = uid_field(uid).and_then(|uid| Ok((uid, track_field(track)?)));
    Ok(fields.and_then(|(uid, track)| {
        only_known(&object)?;
        Ok((uid.into_owned(), track.into_owned()))
    }))
}

/// A disconnect body: `{"uid"}` or `{"uid", "track"}`.
pub(super) fn disconnect(
    bytes: &[u8],
) -> Result<Result<(String, Option<String>), ApiError>, Fallback> {
    let object = Object::parse(bytes, ["uid", "track"], 1)?;
    let [uid, track] = object.values;
    let fields = uid_field(uid).and_then(|uid| {
        let track = track.map(|track| track_field(Some(track))).transpose()?;
        Ok((uid, track))
    });
    Ok(fields.and_then(|(uid, track)| {
        only_known(&object)?;
        Ok((uid.into_owned(), track.map(Cow::into_owned)))
    }))
}

/// Refuses an object with a key besides the ones read.
fn only_known<const N: usize>(object: &Object<'_, N>) -> Result<(), ApiError> {
    match &object.unknown {
        Some(key) => Err(unknown_field(key)),
        None => Ok(()),
    }
}

fn unknown_field(key: &str) -> ApiError {
    bad_request(format!("unknown field \"{key}\""))
}

/// The first in byte order of `unknown` and `extra`: the key the tree-based reading
/// (a map sorted by key) names.
fn first_key<'k>(
    unknown: Option<&'k str>,
    extra: impl Iterator<Item = &'k str>,
) -> Option<&'k str> {
    unknown.into_iter().chain(extra).min()
}

fn string_field<'a>(field: Option<Field<'a>>, key: &str) -> Result<Cow<'a, str>, ApiError> {
    let field = field.ok_or_else(|| bad_request(format!("\"{key}\" is missing")))?;
    if !field.raw.get().starts_with('"') {
        return Err(bad_request(format!("\"{key}\" must be a string")));
    }
    let raw = field.raw.get();
    // Without escapes the text between the quotes is the string: serde_json checked it
    // (UTF-8, no control characters) as it read the body.
    if !raw.contains('\\')
        && let Some(text) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"'))
    {
        return Ok(Cow::Borrowed(text));
    }
    // Cannot fail, for the same reason.
    let Ok(Text(text)) = serde_json::from_str(raw) else {
        return Err(bad_request(format!("\"{key}\" must be a string")));
    };
    Ok(text)
}

fn track_field<'a>(field: Option<Field<'a>>) -> Result<Cow<'a, str>, ApiError> {
    let track = string_field(field, "track")?;
    names::check_track(&track).map_err(|e| ApiError::bad_field(ErrorCode::BadTrack, e.0))?;
    Ok(track)
}

fn uid_field<'a>(field: Option<Field<'a>>) -> Result<Cow<'a, str>, ApiError> {
    let uid = string_field(field, "uid")?;
    names::check_uid(&uid).map_err(|e| ApiError::bad_field(ErrorCode::BadUid, e.0))?;
    Ok(uid)
}

/// `text` (valid JSON) without the whitespace between its tokens.
fn compact(text: &str, spaced: bool) -> String {
    if !spaced {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        out.push(c);
    }
    out
}

/// One field's value: its raw text, and whether it has whitespace between tokens.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    raw: &'a RawValue,
    spaced: bool,
}

/// A JSON object's fields named in `names` (the last value of each, as the tree-based
/// reading keeps), and the first in byte order of its other keys.
struct Object<'a, const N: usize> {
    values: [Option<Field<'a>>; N],
    unknown: Option<Cow<'a, str>>,
}

impl<'a, const N: usize> Object<'a, N> {
    /// Reads `bytes` as one object whose values sit `depth` levels deep (1 for a body;
    /// `usize::MAX` for an object whose values were checked already).
    fn parse(bytes: &'a [u8], names: [&'static str; N], depth: usize) -> Result<Self, Fallback> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let object = ObjectSeed { names, depth }
            .deserialize(&mut deserializer)
            .map_err(|_| Fallback)?;
        deserializer.end().map_err(|_| Fallback)?;
        Ok(object)
    }
}

struct ObjectSeed<const N: usize> {
    names: [&'static str; N],
    depth: usize,
}

impl<'de, const N: usize> DeserializeSeed<'de> for ObjectSeed<N> {
    type Value = Object<'de, N>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for ObjectSeed<N> {
    type Value = Object<'de, N>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = Object {
            values: [None; N],
            unknown: None,
        };
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            let raw: &'de RawValue = map.next_value()?;
            let room = MAX_NESTING.saturating_sub(self.depth);
            // A string has no numbers, nesting or whitespace outside it to check.
            let spaced = if raw.get().starts_with('"') {
                false
            } else if self.depth == usize::MAX {
                check(raw.get(), None) == Ok(true)
            } else {
                check(raw.get(), Some(room)).map_err(|()| de::Error::custom("refused"))?
            };
            let field = Field { raw, spaced };
            match self.names.iter().position(|name| *name == key) {
                Some(i) => object.values[i] = Some(field),
                None => {
                    if object.unknown.as_deref().is_none_or(|first| *key < *first) {
                        object.unknown = Some(key);
                    }
                }
            }
        }
        Ok(object)
    }
}

/// A JSON string, borrowed from the body when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Says whether `text` (valid JSON) has whitespace between tokens; with `room`, first
/// checks what serde_json's reading of a raw value lets through but its building of a
/// tree refuses: arrays and objects nested more than `room` deep, and numbers out of
/// the range of an `f64`. Without `room` (a value already checked as part of a larger
/// one) it stops at the first whitespace.
fn check(text: &str, room: Option<usize>) -> Result<bool, ()> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut spaced = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                i = string_end(bytes, i);
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if room.is_some_and(|room| depth > room) {
                    return Err(());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' => {
                if room.is_none() {
                    return Ok(true);
                }
                spaced = true;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while bytes
                    .get(i)
                    .is_some_and(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    i += 1;
                }
                if room.is_some() {
                    check_number(&text[start..i])?;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(spaced)
}

/// Where the string opening at `start` ends (just past its closing quote).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// A number token the way serde_json's tree building takes it: a short integer always
/// fits; anything else is read by serde_json itself, which refuses what overflows.
fn check_number(token: &str) -> Result<(), ()> {
    let digits = token.strip_prefix('-').unwrap_or(token);
    if digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(());
    }
    serde_json::from_str::<f64>(token).map(drop).map_err(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    /// The limit is serde_json's: a body is refused exactly where its tree would be.
    #[test]
    fn nesting_limit_is_serde_jsons() {
        for levels in 120..130 {
            let body = format!("{{\"track\":\":d\",\"message\":{}}}", nested(levels));
            let tree = serde_json::from_str::<serde_json::Value>(&body).is_ok();
            let here = updates(body.as_bytes(), usize::MAX).is_ok();
            assert_eq!(here, tree, "{levels} levels");
            let batch = format!(
                "{{\"updates\":[{{\"track\":\":d\",\"message\":{}}}]}}",
                nested(levels)
            );
            let tree = serde_json::from_str::<serde_json::Value>(&batch).is_ok();
            let here = updates(batch.as_bytes(), usize::MAX).is_ok();
            assert_eq!(here, tree, "{levels} levels in a batch");
        }
    }

    #[test]
    fn numbers_out_of_range_fall_back() {
        for number in ["1e999", "-1e400", &"9".repeat(400), "1.5e308999"] {
            let body = format!("{{\"track\":\":d\",\"message\":[{number}]}}");
            assert!(
                matches!(updates(body.as_bytes(), usize::MAX), Err(Fallback)),
                "{number}"
            );
            let body = format!("{{\"track\":\":d\",\"message\":1,\"x\":{number}}}");
            assert!(
                matches!(updates(body.as_bytes(), usize::MAX), Err(Fallback)),
                "{number}"
            );
        }
        for number in [
            "1e308",
            "-0",
            "1e-999",
            &"9".repeat(300),
            "0.1",
            "12345678901234567890",
        ] {
            let body = format!("{{\"track\":\":d\",\"message\":{number}}}");
            assert!(updates(body.as_bytes(), usize::MAX).is_ok(), "{number}");
        }
    }

    #[test]
    fn messages_are_kept_as_sent_without_whitespace() {
        let body = "{ \"track\" : \":d\" ,\n \"message\" : { \"b\" : [ 1 , 2.50 ] , \"a\" : \" x\\\" \\u00e9 \" } }";
        let Ok(Ok((parsed, false))) = updates(body.as_bytes(), usize::MAX) else {
            panic!("not taken");
        };
        assert_eq!(&*parsed[0].json, r#"{"b":[1,2.50],"a":" x\" \u00e9 "}"#);
        assert_eq!(&*parsed[0].track, ":d");
    }
}
